//! [`Batcher`]: continuous batching of completion requests over a [`Session`], the engine side
//! of a server. Requests arrive at any time with their own length, sampling and stop strings;
//! each [`Batcher::step`] lets `layerkv`'s [`Scheduler`] pick the batch (admission by the
//! policy's planned peak pages, chunked prefill mixed with decode, preemption by recompute),
//! runs it through [`Engine::step_scheduled`], samples one token per finished prompt or decode
//! with the request's own seeded [`Sampler`], detokenizes incrementally and reports what
//! happened as [`BatchEvent`]s.
//!
//! A request ends at a stop token (the model's EOS, the chat template's end of turn), at one of
//! its stop strings (the text is cut before it), at `max_tokens`, or when it is cancelled;
//! its pages go back to the pool at once in every case.
//!
//! One thread owns a batcher (the server's engine thread); it is not shared.
//!
//! Costs per step: the engine's step, O(vocab) sampling per sampled token, O(window)
//! detokenization per token, and one `String` per token event (the text goes to another
//! thread).

use std::collections::HashMap;

use layerkv::{FinishReason, RequestId, Scheduler, SchedulerConfig, SchedulerOutput};

use crate::engine::Engine;
use crate::error::{ModelError, Result};
use crate::generate::{Sampler, Sampling, TextStream};
use crate::session::Session;

/// One completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// How tokens are chosen (seeded).
    pub sampling: Sampling,
    /// Strings that end the reply; the text is cut before the first one.
    pub stop_strings: Vec<String>,
    /// Generate `max_tokens` tokens whatever the stop tokens (load benchmarks; vLLM's
    /// `ignore_eos`). Stop strings still apply.
    pub ignore_eos: bool,
}

/// What happened to a request during a step.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchEvent {
    /// Request `id` generated `token`; `text` is the text that became final with it (empty
    /// while a character or a possible stop string is incomplete, and for a stop token).
    Token {
        /// The request.
        id: RequestId,
        /// The generated token.
        token: u32,
        /// Final text released by this token.
        text: String,
    },
    /// Request `id` ended; its pages are back in the pool. Always its last event.
    Done {
        /// The request.
        id: RequestId,
        /// Why: [`FinishReason::Stop`] (stop token or string), [`FinishReason::Length`]
        /// (`max_tokens`) or [`FinishReason::Cancelled`].
        reason: FinishReason,
        /// Tokens of its prompt.
        prompt_tokens: usize,
        /// Tokens it generated (a stop token included).
        completion_tokens: usize,
        /// Times it was preempted and recomputed.
        preemptions: usize,
    },
    /// Request `id` was dropped because a step failed (an engine error, not the request's
    /// fault); its pages are back in the pool. Always its last event.
    Failed {
        /// The request.
        id: RequestId,
        /// The engine's error.
        message: String,
    },
}

/// Counters and gauges of a batcher, for a server's `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Requests holding a cache sequence.
    pub running: usize,
    /// Requests waiting for admission (new or preempted).
    pub waiting: usize,
    /// Running requests whose prompt's probe steps (KVzip) are still to run; counted in
    /// `running` too.
    pub probing: usize,
    /// Preemptions since the batcher was made.
    pub preemptions: u64,
    /// Pages in the pool.
    pub pages_total: usize,
    /// Pages in use now.
    pub pages_used: usize,
    /// The most pages in use at any moment since the batcher was made.
    pub pages_peak: usize,
    /// Pages admission plans for the running requests: each one's peak until its prompt is
    /// done, then what it holds from there on ([`Scheduler::planned_pages`]).
    pub pages_planned: usize,
    /// Bytes of one page (all its slots' K and V).
    pub page_bytes: usize,
    /// KV bytes the running requests hold under the policy.
    pub kv_bytes: usize,
    /// KV bytes the identity policy would hold for the same requests' tokens.
    pub identity_kv_bytes: usize,
    /// Prompt tokens of the requests added.
    pub prompt_tokens: u64,
    /// Tokens generated (replays after preemption not counted again).
    pub generated_tokens: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Requests that ended with [`FinishReason::Stop`].
    pub finished_stop: u64,
    /// Requests that ended with [`FinishReason::Length`].
    pub finished_length: u64,
    /// Requests cancelled.
    pub cancelled: u64,
    /// Requests dropped by a failed step.
    pub failed: u64,
}

/// A live request's decoding state.
#[derive(Debug)]
struct Live {
    sampler: Sampler,
    text: TextStream,
    prompt_tokens: usize,
    generated: usize,
    ignore_eos: bool,
}

/// Continuous batching over a [`Session`]. See the module docs.
#[derive(Debug)]
pub struct Batcher {
    session: Session,
    scheduler: Scheduler,
    out: SchedulerOutput,
    live: HashMap<RequestId, Live>,
    stop_tokens: Vec<u32>,
    sampled: Vec<(RequestId, u32)>,
    /// Requests the last update finished at their length, with their preemptions.
    by_length: Vec<(RequestId, usize)>,
    stats: BatchStats,
}

impl Batcher {
    /// A batcher over `session` with the scheduler's sizes `config`. The scheduler's
    /// `prefill_chunk` is set to the engine's, so a policy that evicts sees the same steps as
    /// an unbatched run. The chat template's end-of-turn token joins the stop tokens when the
    /// model has a template.
    pub fn new(mut session: Session, mut config: SchedulerConfig) -> Result<Self> {
        // A model without a chat template still serves plain completions.
        let _ = session.chat_template();
        config.prefill_chunk = session.engine().config().prefill_chunk;
        let scheduler = Scheduler::new(config, session.engine().cache())?
            .with_probe_tokens(session.engine().probe_tokens());
        let stop_tokens = session.stop_criteria().stop_tokens.clone();
        let cache = session.engine().cache();
        let stats = BatchStats {
            pages_total: cache.config().num_pages,
            page_bytes: cache.config().block_size * cache.config().bytes_per_token,
            ..BatchStats::default()
        };
        cache.reset_peak();
        Ok(Self {
            session,
            scheduler,
            out: SchedulerOutput::new(),
            live: HashMap::new(),
            stop_tokens,
            sampled: Vec::new(),
            by_length: Vec::new(),
            stats,
        })
    }

    /// The session (model, tokenizer, chat template, policy).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session, mutably (to render chat prompts).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The scheduler (queues, planned pages).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Queues request `id`. Fails, queuing nothing, on a bad request: an empty prompt,
    /// `max_tokens` 0, a prompt plus `max_tokens` over the model's context under a policy that
    /// never evicts ([`ModelError::Request`]); a request whose planned peak exceeds the whole
    /// pool ([`layerkv::Error::RequestTooLarge`]), a duplicate id, or a full queue
    /// ([`layerkv::Error::QueueFull`]).
    pub fn add(&mut self, id: RequestId, request: BatchRequest) -> Result<()> {
        let BatchRequest {
            prompt,
            max_tokens,
            sampling,
            stop_strings,
            ignore_eos,
        } = request;
        if prompt.is_empty() {
            return Err(ModelError::Request("the prompt is empty".into()));
        }
        if max_tokens == 0 {
            return Err(ModelError::Request("max_tokens must be at least 1".into()));
        }
        let vocab = self.session.model().config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Request(format!(
                "prompt token {bad} is outside the model's vocabulary of {vocab} tokens"
            )));
        }
        let context = self.session.model().config().max_position_embeddings;
        if !self.session.engine().evicts() && prompt.len() + max_tokens > context {
            return Err(ModelError::Request(format!(
                "this model's context is {context} tokens, but {} were requested ({} in the \
                 prompt, {max_tokens} to generate); policy {:?} keeps every token",
                prompt.len() + max_tokens,
                prompt.len(),
                self.session.policy_name()
            )));
        }
        let prompt_tokens = prompt.len();
        let mut sampler = Sampler::new(sampling);
        sampler.observe(&prompt);
        self.scheduler.add_request(id, prompt, max_tokens)?;
        self.live.insert(
            id,
            Live {
                sampler,
                text: TextStream::new(stop_strings),
                prompt_tokens,
                generated: 0,
                ignore_eos,
            },
        );
        self.stats.prompt_tokens += prompt_tokens as u64;
        Ok(())
    }

    /// Cancels request `id` (waiting or running): its pages go back to the pool at once and a
    /// [`BatchEvent::Done`] with [`FinishReason::Cancelled`] is pushed. `false` when the
    /// batcher does not hold it (it already ended).
    pub fn cancel(&mut self, id: RequestId, events: &mut Vec<BatchEvent>) -> Result<bool> {
        if !self.live.contains_key(&id) {
            return Ok(false);
        }
        let done = self.end(id, FinishReason::Cancelled, true)?;
        self.stats.cancelled += 1;
        events.push(done);
        Ok(true)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.live.is_empty()
    }

    /// The live request ids (waiting or running), in no order.
    pub fn live(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.live.keys().copied()
    }

    /// Runs one step and pushes its events. `false` when nothing could run (no requests, or
    /// every scheduled request was preempted). When the engine's step fails, it changed
    /// nothing (the engine rolls a failed step back), so only the requests it ran are dropped,
    /// each with a [`BatchEvent::Failed`]; the others carry on. A failure after the step
    /// (sampling, the scheduler's update) drops every live request. Either way the error is
    /// returned. Under a policy that probes (KVzip), a request whose probes failed (they run
    /// before the step, a prefill chunk's worth per call) ends with a [`BatchEvent::Failed`]
    /// of its own (or, when they found the pool out of pages, is preempted by recompute), and
    /// the step still returns `true`; so does a call that only ran probes.
    /// Each call is traced at debug level (`RUST_LOG=layerkv_model=debug`): the step, its
    /// entries and tokens, the requests probing before it and its wall time.
    pub fn step(&mut self, events: &mut Vec<BatchEvent>) -> Result<bool> {
        let start = std::time::Instant::now();
        let probing = self.scheduler.num_probing();
        let r = self.run_step(events, probing > 0);
        tracing::debug!(
            step = self.scheduler.num_steps(),
            entries = self.out.len(),
            tokens = self.out.num_scheduled_tokens(),
            probing,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        r
    }

    /// [`Batcher::step`]'s work; `probing`: whether a request had probe steps pending.
    fn run_step(&mut self, events: &mut Vec<BatchEvent>, probing: bool) -> Result<bool> {
        // Under KVzip a call may run a prompt's probe steps and schedule nothing beside them:
        // that is work done.
        let engine: &mut Engine = self.session.engine_mut();
        let logits = match engine.step_scheduled(&mut self.scheduler, &mut self.out) {
            Ok(Some(logits)) => logits,
            Ok(None) => {
                let probe_failures = self.session.engine_mut().take_probe_failures();
                self.settle_probe_failures(probe_failures, events)?;
                return Ok(probing);
            }
            Err(e) => {
                // Probes that failed before the failed step: their requests, not in it, are
                // still probing and retry at the next call (a failure there is settled then).
                drop(self.session.engine_mut().take_probe_failures());
                let mut ids: Vec<RequestId> = self.out.scheduled().iter().map(|x| x.id).collect();
                ids.retain(|id| self.live.contains_key(id));
                if ids.is_empty() {
                    ids = self.live.keys().copied().collect();
                }
                return self.fail(ids, e, events);
            }
        };
        let result = self.after_step(&logits, events);
        let probe_failures = self.session.engine_mut().take_probe_failures();
        match result {
            Ok(()) => {
                self.settle_probe_failures(probe_failures, events)?;
                Ok(true)
            }
            Err(e) => {
                let ids = self.live.keys().copied().collect();
                self.fail(ids, e, events)
            }
        }
    }

    /// Requests whose probes failed in the call (KVzip: rolled back, nothing else changed; they
    /// ran before the step, and their requests, probing, were not in it), settled after the
    /// step's update (or after a call that scheduled nothing): out of pages (an overcommitted
    /// pool), preempted by recompute as a step short of pages preempts, to prefill and probe
    /// again; anything else, or a preemption refused, ends the request.
    fn settle_probe_failures(
        &mut self,
        failures: Vec<(RequestId, ModelError)>,
        events: &mut Vec<BatchEvent>,
    ) -> Result<()> {
        for (id, e) in failures {
            if !self.live.contains_key(&id) {
                continue;
            }
            let short = matches!(e, ModelError::Core(layerkv::Error::PoolExhausted { .. }));
            let cache = self.session.engine().cache();
            if short && self.scheduler.preempt(id, cache).is_ok() {
                self.session.engine_mut().forget(id);
            } else {
                self.drop_failed(id, e.to_string(), events)?;
            }
        }
        Ok(())
    }

    /// Ends `ids` with [`BatchEvent::Failed`] and returns `e`.
    fn fail(
        &mut self,
        ids: Vec<RequestId>,
        e: ModelError,
        events: &mut Vec<BatchEvent>,
    ) -> Result<bool> {
        let message = e.to_string();
        for id in ids {
            self.drop_failed(id, message.clone(), events)?;
        }
        Err(e)
    }

    /// Ends live request `id` with a [`BatchEvent::Failed`] saying `message`.
    fn drop_failed(
        &mut self,
        id: RequestId,
        message: String,
        events: &mut Vec<BatchEvent>,
    ) -> Result<()> {
        self.end(id, FinishReason::Cancelled, true)?;
        self.stats.failed += 1;
        events.push(BatchEvent::Failed { id, message });
        Ok(())
    }

    /// Samples the step's tokens, updates the scheduler and pushes the events.
    fn after_step(
        &mut self,
        logits: &candle_core::Tensor,
        events: &mut Vec<BatchEvent>,
    ) -> Result<()> {
        self.stats.steps += 1;
        let vocab = logits.dim(1)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        self.sampled.clear();
        let sampling = self.out.scheduled().iter().filter(|e| e.samples);
        for (k, e) in sampling.enumerate() {
            let live = self.live.get_mut(&e.id).ok_or_else(|| {
                ModelError::Config(format!("request {} was scheduled but is not live", e.id))
            })?;
            let token = live.sampler.sample(&logits[k * vocab..(k + 1) * vocab]);
            self.sampled.push((e.id, token));
        }
        let cache = self.session.engine().cache();
        self.scheduler.update(cache, &self.out, &self.sampled)?;
        self.by_length.clear();
        self.by_length.extend(
            self.scheduler
                .drain_finished()
                .map(|f| (f.id, f.num_preemptions)),
        );
        for i in 0..self.sampled.len() {
            let (id, token) = self.sampled[i];
            let at_length = self.by_length.iter().find(|f| f.0 == id).map(|f| f.1);
            let live = self.live.get_mut(&id).expect("sampled requests are live");
            live.generated += 1;
            self.stats.generated_tokens += 1;
            if !live.ignore_eos && self.stop_tokens.contains(&token) {
                events.push(BatchEvent::Token {
                    id,
                    token,
                    text: String::new(),
                });
                self.finish(id, FinishReason::Stop, at_length, events)?;
                continue;
            }
            let mut text = live.text.push(self.session.tokenizer(), token)?.to_string();
            let reason = if live.text.stopped().is_some() {
                Some(FinishReason::Stop)
            } else if at_length.is_some() {
                text.push_str(live.text.finish());
                Some(FinishReason::Length)
            } else {
                None
            };
            events.push(BatchEvent::Token { id, token, text });
            if let Some(reason) = reason {
                self.finish(id, reason, at_length, events)?;
            }
        }
        Ok(())
    }

    /// Ends a request that stopped or reached its length (`at_length`: the scheduler already
    /// finished it, with that many preemptions) and pushes its `Done`.
    fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        at_length: Option<usize>,
        events: &mut Vec<BatchEvent>,
    ) -> Result<()> {
        let mut done = self.end(id, reason, at_length.is_none())?;
        if let (Some(n), BatchEvent::Done { preemptions, .. }) = (at_length, &mut done) {
            *preemptions = n;
        }
        match reason {
            FinishReason::Length => self.stats.finished_length += 1,
            _ => self.stats.finished_stop += 1,
        }
        events.push(done);
        Ok(())
    }

    /// Ends a live request: finishes it in the scheduler with `reason` (when `in_scheduler`:
    /// not already finished there at its length), drops the executor's and the decoding
    /// state. Returns its `Done` event.
    fn end(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        in_scheduler: bool,
    ) -> Result<BatchEvent> {
        let live = self.live.remove(&id).expect("ended requests are live");
        let mut preemptions = 0;
        if in_scheduler {
            let cache = self.session.engine().cache();
            preemptions = self.scheduler.finish(id, reason, cache)?.num_preemptions;
        }
        self.session.engine_mut().forget(id);
        Ok(BatchEvent::Done {
            id,
            reason,
            prompt_tokens: live.prompt_tokens,
            completion_tokens: live.generated,
            preemptions,
        })
    }

    /// Counters and gauges now.
    pub fn stats(&self) -> BatchStats {
        let cache = self.session.engine().cache();
        let pool = cache.pool_stats();
        let mut identity = 0;
        for &id in self.scheduler.running() {
            if let Ok(tokens) = cache.num_tokens(id) {
                identity += self.session.identity_bytes(tokens);
            }
        }
        BatchStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            probing: self.scheduler.num_probing(),
            preemptions: self.scheduler.num_preemptions_total(),
            pages_used: pool.num_used,
            pages_peak: pool.peak_used,
            pages_planned: self.scheduler.planned_pages(),
            kv_bytes: pool.num_used * self.stats.page_bytes,
            identity_kv_bytes: identity,
            ..self.stats
        }
    }
}
