//! [`Scheduler`]: the waiting queue, the running list, admission, the per-step batch and
//! preemption. See the [module docs](super) for the design and the step loop.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use super::config::SchedulerConfig;
use super::output::{ScheduledKind, ScheduledRequest, SchedulerOutput};
use super::request::{FinishReason, FinishedRequest, Request, RequestId, RequestInfo, Work};
use crate::cache::{KvCache, Reservation};
use crate::error::{Error, Result};
use crate::ids::SeqId;
use crate::plan::Planner;
use crate::policy::LayerKvPolicy;
use crate::step::Step;

/// Continuous batching over one [`KvCache`]: requests wait in a FIFO queue, are admitted while
/// their planned peak pages fit, and each step feeds decodes and fixed prefill chunks under a
/// token budget. The design (admission, batching, fixed chunk
/// boundaries, preemption) is documented in `src/sched/mod.rs`.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    policy: Arc<dyn LayerKvPolicy>,
    planner: Planner,
    num_pages: usize,
    admission_pages: usize,
    requests: HashMap<RequestId, Request>,
    /// FIFO; preempted requests go back to the front.
    waiting: VecDeque<RequestId>,
    /// Admission order: the last one is the newest (the one preemption picks).
    running: Vec<RequestId>,
    /// Sum of the running requests' planned pages (`Request::planned`).
    planned_pages: usize,
    num_preemptions: u64,
    /// Steps scheduled so far (the number of the last output).
    step: u64,
    /// Whether the last output has been neither updated nor found abandoned.
    pending: bool,
    finished: Vec<FinishedRequest>,
    /// Always empty: the allocation of the reserve batch, kept from step to step.
    batch: Vec<(SeqId, &'static [u32])>,
    /// Whether the policy scores prompts with probe steps (KVzip): a prompt's last token then
    /// runs as a step of its own, after the engine probed the tokens before it.
    probes: bool,
    /// Tokens a probe step holds on top of the prompt ([`Scheduler::with_probe_tokens`]).
    probe_tokens: usize,
    /// Whether the policy compresses prompts while they prefill (KVzip with `prefill`): the
    /// engine then probes after every prefill step, and a plan holds no whole prompt.
    compresses_in_prefill: bool,
}

impl Scheduler {
    /// A scheduler for `cache`: it plans with the cache's policy, block size and windows, and
    /// steps of `config.prefill_chunk` tokens. Fails on an invalid config
    /// ([`SchedulerConfig::validate`], or `admission_pages` below the pool).
    pub fn new(config: SchedulerConfig, cache: &KvCache) -> Result<Self> {
        let num_pages = cache.config().num_pages;
        config.validate_for_pool(num_pages)?;
        let policy = cache.policy();
        let lanes = crate::policy::lanes_per_group(policy.as_ref(), cache.config().lanes.max(1));
        let probes = crate::policy::probe_chunk(policy.as_ref(), lanes).is_some();
        let compresses_in_prefill = crate::policy::compresses_in_prefill(policy.as_ref(), lanes);
        Ok(Self {
            config,
            policy: Arc::clone(cache.policy()),
            planner: Planner::from_config(cache.config()).with_step_tokens(config.prefill_chunk),
            num_pages,
            admission_pages: config.admission_pages.unwrap_or(num_pages),
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            planned_pages: 0,
            num_preemptions: 0,
            step: 0,
            pending: false,
            finished: Vec::new(),
            batch: Vec::new(),
            probes,
            probe_tokens: 0,
            compresses_in_prefill,
        })
    }

    /// The same scheduler planning `tokens` more per request for its probe steps, under a
    /// policy that probes (KVzip; an engine's `probe_tokens`): a probe holds its tokens on top
    /// of the prompt while the prompt is still whole, which the planner's peak of `prompt +
    /// max_tokens` does not cover when `max_tokens` is short. Set it before adding requests.
    pub fn with_probe_tokens(mut self, tokens: usize) -> Self {
        self.probe_tokens = if self.probes { tokens } else { 0 };
        // A probe step appends its tokens at once, as a prefill chunk does: a group that keeps
        // a window holds them on top of it.
        self.planner = self
            .planner
            .with_step_tokens(self.config.prefill_chunk.max(self.probe_tokens));
        self
    }

    /// Whether the policy scores prompts with probe steps (KVzip). Then a prompt's prefill
    /// chunks stop before its last token, which runs as a step of its own; the step whose work
    /// ends one token before the prompt's end ([`Scheduler::probe_due`]) leaves the request
    /// probing, held until the engine has run its probes ([`Scheduler::probing`]), so the
    /// retention decides with their scores at the prompt's end, as an unbatched run does.
    pub fn probes(&self) -> bool {
        self.probes
    }

    /// The probes due after the step `entry` belongs to, under a policy that probes, for a
    /// prompt of two tokens or more: the prompt's tokens before its last (what the probes
    /// replay) and the positions among them to score. Plain KVzip probes all of them once,
    /// after the step whose work ended one token before the prompt's last; KVzip compressing
    /// during prefill ([`crate::Retention::compresses_in_prefill`]) probes each prefill
    /// step's own tokens right after it. `None` otherwise, or when the scheduler no longer
    /// holds the request. [`Scheduler::update`] leaves such a request probing
    /// ([`Scheduler::probing`]).
    pub fn probe_due(&self, entry: &ScheduledRequest) -> Option<(&[u32], Range<usize>)> {
        let r = self.requests.get(&entry.id)?;
        let at = due(self.probes, self.compresses_in_prefill, r, entry)?;
        Some((&r.prompt[..r.prompt.len() - 1], at))
    }

    /// The running requests with probe steps to run (KVzip), oldest admission first: after
    /// the update of the step that made them due ([`Scheduler::probe_due`]) a request is not
    /// scheduled until the engine has run them ([`Scheduler::pending_probe`]) and said so with
    /// [`Scheduler::probed`]. The engine runs a bounded share of them between steps, so the
    /// other requests keep decoding meanwhile. O(running).
    pub fn probing(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.running
            .iter()
            .copied()
            .filter(|id| !self.requests[id].probing.is_empty())
    }

    /// Request `id`'s probe steps still to run, if it is running and has any.
    pub fn pending_probe(&self, id: RequestId) -> Option<PendingProbe<'_>> {
        let r = self.requests.get(&id).filter(|r| r.running)?;
        (!r.probing.is_empty()).then(|| PendingProbe {
            id,
            seq: id,
            context: &r.prompt[..r.prompt.len() - 1],
            positions: r.probing.clone(),
        })
    }

    /// Running requests with probe steps to run ([`RequestState::Probing`]). O(running).
    ///
    /// [`RequestState::Probing`]: super::RequestState::Probing
    pub fn num_probing(&self) -> usize {
        self.probing().count()
    }

    /// The engine ran request `id`'s probe steps over `positions`, a leading part of its
    /// pending ones ([`Scheduler::pending_probe`]); when none are left the request is scheduled
    /// again. Fails, changing nothing, on an id that is not running
    /// ([`Error::UnknownRequest`]) or positions that do not start its pending ones
    /// ([`Error::UpdateMismatch`]).
    pub fn probed(&mut self, id: RequestId, positions: Range<usize>) -> Result<()> {
        let r = self
            .requests
            .get_mut(&id)
            .filter(|r| r.running)
            .ok_or(Error::UnknownRequest(id))?;
        let pending = &r.probing;
        if positions.start != pending.start || positions.end > pending.end || positions.is_empty() {
            return Err(Error::UpdateMismatch(format!(
                "probed {positions:?} of request {id}, whose pending probes are {pending:?}"
            )));
        }
        r.probing.start = positions.end;
        Ok(())
    }

    /// The sizes.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The peak pages a request of `prompt_len` prompt tokens and `max_tokens` generated tokens
    /// holds under the policy, phase-aware ([`Planner::pages_per_sequence`] with steps of one
    /// prefill chunk): a window holds its window plus a chunk, SnapKV the whole sequence (its
    /// prompt is held whole until the prompt ends), identity everything; under a policy that
    /// probes, the probe's tokens beside the prompt too; KVzip compressing during prefill the
    /// larger of [`Planner::pages_in_prompt`] and what it holds after the prompt. A request's
    /// plan until its prompt is done (then [`crate::plan::Planner::pages_after_prompt`]).
    pub fn peak_pages(&self, prompt_len: usize, max_tokens: usize) -> usize {
        // A probe holds its tokens beside the prompt's first `prompt_len - 1`.
        let held = max_tokens.max(self.probe_tokens);
        let policy = self.policy.as_ref();
        let whole = self
            .planner
            .pages_per_sequence(policy, prompt_len.saturating_add(held));
        if !self.compresses_in_prefill {
            return whole;
        }
        // KVzip compressing while it prefills never holds the whole prompt: its peak is the
        // larger of the prompt's steps and what it holds after them.
        let in_prompt = self.planner.pages_in_prompt(policy, prompt_len);
        let after = self
            .planner
            .pages_after_prompt(policy, prompt_len, max_tokens);
        in_prompt.max(after).min(whole)
    }

    /// Queues a request at the back of the waiting queue. Its cache sequence is created at
    /// admission. Fails, queuing nothing, on an empty prompt ([`Error::EmptyPrompt`]),
    /// `max_tokens == 0` ([`Error::ZeroMaxTokens`]), an id the scheduler holds
    /// ([`Error::RequestExists`]), a peak larger than the whole pool
    /// ([`Error::RequestTooLarge`]) or a full queue ([`Error::QueueFull`]), in that order.
    /// O(1) amortised (allocates the request's output buffer, `max_tokens` tokens).
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt(id));
        }
        if max_tokens == 0 {
            return Err(Error::ZeroMaxTokens(id));
        }
        if self.requests.contains_key(&id) {
            return Err(Error::RequestExists(id));
        }
        let peak = self.peak_pages(prompt.len(), max_tokens);
        if peak > self.num_pages {
            return Err(Error::RequestTooLarge {
                request: id,
                pages_needed: peak,
                num_pages: self.num_pages,
            });
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(Error::QueueFull {
                max_waiting: self.config.max_waiting,
            });
        }
        let after_prompt = self
            .planner
            .pages_after_prompt(self.policy.as_ref(), prompt.len(), max_tokens)
            .min(peak);
        let mut r = Request::new(prompt, max_tokens, peak);
        r.after_prompt_pages = after_prompt;
        self.requests.insert(id, r);
        self.waiting.push_back(id);
        Ok(())
    }

    /// Schedules one step into `out` and reserves it in `cache` through `step` (the step
    /// protocol's `reserve`): the engine then writes K/V and attends through the returned
    /// [`Reservation`], calls [`Reservation::retain`] and hands the sampled tokens to
    /// [`Scheduler::update`].
    ///
    /// 1. Admission: while the queue's head fits (`running < max_num_seqs` and the running
    ///    requests' plans plus its peak stay within the admission pages), it gets its cache
    ///    sequence (prompt length declared) and runs. A request is planned at its peak until
    ///    its prompt is done, then at what it holds from there on.
    /// 2. Batch: every running decode or replay (one token each, admission order), then prefill
    ///    chunks in admission order, each whole or not at all, until the token budget or the
    ///    first chunk that does not fit.
    /// 3. `reserve`; when the pool is out of pages, the newest running request is preempted
    ///    (its sequence freed, its generated tokens kept, requeued at the front), dropped from
    ///    the batch, and the reserve retried.
    ///
    /// `None` (and an empty `out`) means nothing was reserved (no request runnable, or every
    /// one preempted): wait for requests or for pages, or, while [`Scheduler::num_probing`] is
    /// not 0, run the pending probes (every running request may be probing). To abandon a scheduled step, drop the
    /// reservation (it rolls back) and schedule again without updating. Errors other than running
    /// out of pages (a cache sequence freed behind the scheduler's back, another cache than the
    /// scheduler's, a retained step that was never updated) are returned with nothing reserved.
    /// O(running + batch tokens) plus the cache's reserve; no allocation once warm.
    pub fn schedule<'a>(
        &mut self,
        cache: &'a KvCache,
        step: &'a mut Step,
        out: &mut SchedulerOutput,
    ) -> Result<Option<Reservation<'a>>> {
        self.check_cache(cache)?;
        if self.pending {
            self.check_abandoned(cache)?;
        }
        self.step += 1;
        self.pending = false;
        out.clear(self.step);
        self.admit(cache)?;
        self.fill(out);
        while !out.is_empty() {
            let mut batch: Vec<(SeqId, &[u32])> = std::mem::take(&mut self.batch);
            batch.extend(
                out.scheduled
                    .iter()
                    .map(|e| (e.seq, &out.tokens[e.tokens.clone()])),
            );
            let reserved = cache.reserve_unguarded(&batch, step);
            self.batch = recycle(batch);
            match reserved {
                Ok(()) => {
                    self.pending = true;
                    return Ok(Some(Reservation::new(cache, step)));
                }
                Err(Error::PoolExhausted { .. }) => {
                    let victim = match self.preempt_newest(cache) {
                        Ok(victim) => victim,
                        Err(e) => {
                            out.clear_entries();
                            return Err(e);
                        }
                    };
                    out.preempted.push(victim);
                    if let Some(i) = out.scheduled.iter().position(|e| e.id == victim) {
                        let e = out.scheduled.remove(i);
                        out.num_scheduled_tokens -= e.num_tokens();
                        out.num_samples -= usize::from(e.samples);
                    }
                }
                Err(e) => {
                    out.clear_entries();
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// Takes the engine's results of the step `out` scheduled (after [`Reservation::retain`]):
    /// advances every scheduled request past its tokens and appends the sampled tokens, one per
    /// entry of `out` that [`ScheduledRequest::samples`], in the output's order. A request that
    /// reaches `max_tokens` finishes with [`FinishReason::Length`]: its pages go back to the
    /// pool at once and it waits in [`Scheduler::drain_finished`]. Entries of requests
    /// finished or cancelled since the step was scheduled are skipped.
    ///
    /// Fails, changing nothing, when `out` is not the last scheduled output, was already
    /// updated, or `sampled` does not list exactly the sampling entries' ids in order
    /// ([`Error::UpdateMismatch`]). A finished request whose sequence was freed behind the
    /// scheduler's back still finishes; the cache's error is returned after the update.
    /// O(batch).
    pub fn update(
        &mut self,
        cache: &KvCache,
        out: &SchedulerOutput,
        sampled: &[(RequestId, u32)],
    ) -> Result<()> {
        if !self.pending || out.step != self.step {
            return Err(Error::UpdateMismatch(format!(
                "output of step {} is not the pending step (last scheduled: {}, {})",
                out.step,
                self.step,
                if self.pending {
                    "not updated"
                } else {
                    "already updated or empty"
                }
            )));
        }
        if sampled.len() != out.num_samples {
            return Err(Error::UpdateMismatch(format!(
                "{} sampled tokens for the {} sampling entries of step {}",
                sampled.len(),
                out.num_samples,
                out.step
            )));
        }
        let sampling = out.scheduled.iter().filter(|e| e.samples);
        for (e, &(id, _)) in sampling.zip(sampled) {
            if e.id != id {
                return Err(Error::UpdateMismatch(format!(
                    "sampled token for request {id} where the output's next sampling entry is \
                     request {}",
                    e.id
                )));
            }
        }
        self.pending = false;
        let mut next_sample = sampled.iter();
        let mut any_finished = false;
        let mut first_error = None;
        for e in &out.scheduled {
            let token = if e.samples {
                next_sample.next().map(|&(_, t)| t)
            } else {
                None
            };
            let Some(r) = self.requests.get_mut(&e.id) else {
                continue;
            };
            if !r.running || r.num_computed != e.positions.start {
                continue;
            }
            r.num_computed = e.positions.end;
            if let Some(at) = due(self.probes, self.compresses_in_prefill, r, e) {
                // Not scheduled again until the engine ran these probes (`probing`).
                r.probing = at;
            }
            if r.num_computed >= r.prompt.len() && r.planned > r.after_prompt_pages {
                // The prompt is done (SnapKV and KVzip compressed it): plan what it holds from
                // here on, and let admission use the rest.
                self.planned_pages -= r.planned - r.after_prompt_pages;
                r.planned = r.after_prompt_pages;
            }
            if let Some(token) = token {
                r.output.push(token);
                if r.output.len() >= r.max_tokens {
                    let r = self.requests.remove(&e.id).expect("looked up above");
                    self.planned_pages -= r.planned;
                    if let Err(err) = cache.free(e.seq) {
                        first_error.get_or_insert(err);
                    }
                    self.finished
                        .push(r.into_finished(e.id, FinishReason::Length));
                    any_finished = true;
                }
            }
        }
        if any_finished {
            let requests = &self.requests;
            self.running.retain(|id| requests.contains_key(id));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Ends request `id` now with `reason` (e.g. [`FinishReason::Stop`] when the caller saw a
    /// stop token), waiting or running; a running request's pages go back to the pool at once.
    /// Returns it with its tokens. Call it between steps (not between `schedule` and
    /// `retain`). Fails on an unknown id ([`Error::UnknownRequest`]). O(running + waiting).
    pub fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        cache: &KvCache,
    ) -> Result<FinishedRequest> {
        let r = self.requests.get(&id).ok_or(Error::UnknownRequest(id))?;
        if r.running {
            cache.free(id)?;
            self.planned_pages -= r.planned;
            self.running.retain(|&x| x != id);
        } else {
            self.waiting.retain(|&x| x != id);
        }
        let r = self.requests.remove(&id).expect("looked up above");
        Ok(r.into_finished(id, reason))
    }

    /// Cancels request `id`, waiting or running: its pages go back to the pool at once
    /// ([`Scheduler::finish`] with [`FinishReason::Cancelled`]).
    pub fn cancel(&mut self, id: RequestId, cache: &KvCache) -> Result<FinishedRequest> {
        self.finish(id, FinishReason::Cancelled, cache)
    }

    /// Takes the requests [`Scheduler::update`] finished ([`FinishReason::Length`]) since the
    /// last drain, in finishing order.
    pub fn drain_finished(&mut self) -> std::vec::Drain<'_, FinishedRequest> {
        self.finished.drain(..)
    }

    /// Requests running (holding a cache sequence).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Preemptions since the scheduler was made.
    pub fn num_preemptions_total(&self) -> u64 {
        self.num_preemptions
    }

    /// Steps scheduled so far (empty ones included).
    pub fn num_steps(&self) -> u64 {
        self.step
    }

    /// Sum of the running requests' planned pages (at most the admission pages): each one's
    /// peak until its prompt is done, then its peak from there on
    /// ([`crate::plan::Planner::pages_after_prompt`]).
    pub fn planned_pages(&self) -> usize {
        self.planned_pages
    }

    /// The pages admission plans for ([`SchedulerConfig::admission_pages`], by default the
    /// pool's).
    pub fn admission_pages(&self) -> usize {
        self.admission_pages
    }

    /// Running requests, oldest admission first.
    pub fn running(&self) -> &[RequestId] {
        &self.running
    }

    /// Waiting requests, in admission order (the head is admitted next).
    pub fn waiting(&self) -> impl ExactSizeIterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
    }

    /// A snapshot of request `id` (`None` when the scheduler does not hold it).
    pub fn request(&self, id: RequestId) -> Option<RequestInfo> {
        self.requests.get(&id).map(Request::info)
    }

    /// The tokens request `id` has generated so far (`None` when the scheduler does not hold
    /// it).
    pub fn output(&self, id: RequestId) -> Option<&[u32]> {
        self.requests.get(&id).map(|r| &r.output[..])
    }

    /// The scheduler plans with the policy and pool it was made for.
    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if !Arc::ptr_eq(cache.policy(), &self.policy) || cache.config().num_pages != self.num_pages
        {
            return Err(Error::InvalidSchedulerConfig(
                "schedule: the cache is not the one the scheduler was made for".into(),
            ));
        }
        Ok(())
    }

    /// The last step was not updated: fine if it was rolled back (the cache holds what the
    /// scheduler thinks), an error if it was retained (updating was forgotten, and scheduling
    /// again would feed its tokens twice).
    fn check_abandoned(&self, cache: &KvCache) -> Result<()> {
        for &id in &self.running {
            let held = cache.num_tokens(id)?;
            let computed = self.requests[&id].num_computed;
            if held != computed {
                return Err(Error::UpdateMismatch(format!(
                    "step {} was retained but not updated (request {id}: the cache holds {held} \
                     tokens, the scheduler {computed})",
                    self.step
                )));
            }
        }
        Ok(())
    }

    /// Moves the waiting queue's head to running while it fits (FIFO, head-of-line).
    fn admit(&mut self, cache: &KvCache) -> Result<()> {
        while let Some(&id) = self.waiting.front() {
            if self.running.len() >= self.config.max_num_seqs {
                break;
            }
            let r = self
                .requests
                .get_mut(&id)
                .expect("waiting requests are held");
            if self.planned_pages + r.planned > self.admission_pages {
                break;
            }
            if self.admission_pages > self.num_pages {
                // Overcommitted: the plan no longer guarantees pages. Admit only while the
                // pool has the head's first chunk free beyond one page per group for each
                // running request (each may open a page this step), and a request that was
                // preempted only when its whole peak is free: otherwise it is readmitted on
                // the pages its own preemption freed and preempted again.
                let first = if r.num_preemptions > 0 {
                    r.peak_pages
                } else {
                    self.planner.pages_per_sequence(
                        self.policy.as_ref(),
                        r.prompt.len().min(self.config.prefill_chunk),
                    )
                };
                let groups = cache.num_groups();
                let stats = cache.pool_stats();
                let spare =
                    (stats.num_free + stats.num_cached).saturating_sub(self.running.len() * groups);
                if first > spare {
                    break;
                }
            }
            // With prefix caching on, the prompt's cached full pages are taken as computed.
            let cached = cache.add_sequence_with_prefix(id, &r.prompt)?;
            if let Err(e) = cache.set_prompt_len(id, r.prompt.len()) {
                cache.free(id)?;
                return Err(e);
            }
            self.waiting.pop_front();
            r.running = true;
            r.num_computed = cached;
            self.planned_pages += r.planned;
            self.running.push(id);
        }
        Ok(())
    }

    /// Decodes and replays first, then whole prefill chunks, under the token budget.
    fn fill(&self, out: &mut SchedulerOutput) {
        let budget = self.config.max_num_batched_tokens;
        let chunk = self.config.prefill_chunk;
        for prefill in [false, true] {
            for &id in &self.running {
                let r = &self.requests[&id];
                if !r.probing.is_empty() {
                    // Held until its probes ran (`probing`).
                    continue;
                }
                let work = r.next_work(chunk, self.probes);
                if (work.kind == ScheduledKind::Prefill) != prefill {
                    continue;
                }
                if out.num_scheduled_tokens + work.positions.len() > budget {
                    // FIFO: a later request never overtakes one that does not fit.
                    break;
                }
                push(out, id, r, work);
            }
        }
    }

    /// Preempts running request `id` by recompute between steps (after
    /// [`Scheduler::update`]), as a step that finds the pool out of pages preempts the newest:
    /// its sequence is freed, its generated tokens are kept, and it goes back to the front of
    /// the queue. For work outside the scheduled steps that found the pool out of pages (an
    /// engine's probe steps under KVzip). Fails on an id that is not running
    /// ([`Error::UnknownRequest`]) and with a step scheduled but not updated
    /// ([`Error::UpdateMismatch`]), changing nothing.
    pub fn preempt(&mut self, id: RequestId, cache: &KvCache) -> Result<()> {
        if self.pending {
            return Err(Error::UpdateMismatch(format!(
                "preempt request {id}: step {} is scheduled but not updated",
                self.step
            )));
        }
        let Some(i) = self.running.iter().position(|&x| x == id) else {
            return Err(Error::UnknownRequest(id));
        };
        cache.free(id)?;
        self.running.remove(i);
        self.requeue(id);
        Ok(())
    }

    /// Preempts the newest running request by recompute: frees its sequence, keeps its
    /// generated tokens and requeues it at the front.
    fn preempt_newest(&mut self, cache: &KvCache) -> Result<RequestId> {
        let &id = self
            .running
            .last()
            .expect("a non-empty batch has running requests");
        cache.free(id)?;
        self.running.pop();
        self.requeue(id);
        Ok(id)
    }

    /// A running request whose sequence was freed goes back to the front of the queue.
    fn requeue(&mut self, id: RequestId) {
        let r = self
            .requests
            .get_mut(&id)
            .expect("running requests are held");
        r.running = false;
        r.num_computed = 0;
        r.probing = 0..0;
        r.num_preemptions += 1;
        self.planned_pages -= r.planned;
        r.planned = r.peak_pages;
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }
}

/// The positions [`Scheduler::probe_due`] gives for `entry` of request `r`, under a policy
/// that probes (`probes`), compressing during prefill or not.
fn due(
    probes: bool,
    compresses_in_prefill: bool,
    r: &Request,
    entry: &ScheduledRequest,
) -> Option<Range<usize>> {
    let len = r.prompt.len();
    if !probes || entry.kind != ScheduledKind::Prefill || len < 2 {
        return None;
    }
    let at = &entry.positions;
    if compresses_in_prefill {
        (at.start < len - 1).then(|| at.start..at.end.min(len - 1))
    } else {
        (at.end == len - 1).then_some(0..len - 1)
    }
}

/// Probe steps a running request still needs (KVzip; [`Scheduler::pending_probe`]): the engine
/// replays `positions` of `context` (the prompt before its last token) in probe steps of
/// `seq`, then reports them with [`Scheduler::probed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingProbe<'a> {
    /// The request.
    pub id: RequestId,
    /// Its cache sequence.
    pub seq: SeqId,
    /// Its prompt before the last token (what the probe steps replay from).
    pub context: &'a [u32],
    /// The prompt positions still to probe.
    pub positions: Range<usize>,
}

fn push(out: &mut SchedulerOutput, id: RequestId, r: &Request, work: Work) {
    let start = out.tokens.len();
    out.tokens
        .extend_from_slice(r.tokens(work.positions.clone()));
    out.num_scheduled_tokens += work.positions.len();
    out.num_samples += usize::from(work.samples);
    out.scheduled.push(ScheduledRequest {
        id,
        seq: id,
        kind: work.kind,
        positions: work.positions,
        samples: work.samples,
        tokens: start..out.tokens.len(),
    });
}

/// Empties `batch` and returns its allocation with the borrow's lifetime erased: collecting
/// a `vec::IntoIter` into a `Vec` of an element of the same layout reuses the buffer, so the
/// reserve batch allocates only while it grows.
fn recycle(mut batch: Vec<(SeqId, &[u32])>) -> Vec<(SeqId, &'static [u32])> {
    batch.clear();
    batch
        .into_iter()
        .map(|_| -> (SeqId, &'static [u32]) { unreachable!("the batch was cleared") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycle_keeps_the_allocation() {
        let tokens = [1u32, 2, 3];
        let mut batch: Vec<(SeqId, &[u32])> = Vec::with_capacity(8);
        batch.push((1, &tokens[..]));
        let ptr = batch.as_ptr() as usize;
        let kept = recycle(batch);
        assert!(kept.is_empty());
        assert_eq!(kept.capacity(), 8);
        assert_eq!(kept.as_ptr() as usize, ptr);
    }
}
