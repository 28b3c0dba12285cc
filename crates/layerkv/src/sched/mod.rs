//! Continuous batching, tensor-free: the [`Scheduler`] decides each step which requests run
//! and which tokens each feeds (chunked prefill mixed with decode under one token budget), and
//! reserves the step in the [`crate::KvCache`]; any engine then executes the step protocol
//! ([`crate::Step`]) for that batch. The model is vLLM v1's `core/sched` (one `schedule()`
//! returning plain data, preemption of the newest request by recompute); what differs is that
//! admission counts what the **policy** holds.
//!
//! # Design
//! - **Requests** are identified by a caller-chosen [`RequestId`] and run on the cache
//!   sequence of the same id. A request's stream is its prompt followed by its generated
//!   tokens; the scheduler keeps both, and how many of the stream's tokens the cache holds.
//! - **Refusal** ([`Scheduler::add_request`]): an empty prompt, `max_tokens == 0`, a duplicate
//!   id, a full queue ([`crate::Error::QueueFull`], a server's 429/503) and a request whose
//!   planned peak exceeds the whole pool ([`crate::Error::RequestTooLarge`], a 400) are typed
//!   errors. The peak is [`crate::plan::Planner::pages_per_sequence`] of `prompt + max_tokens`
//!   tokens under the cache's policy with steps of one prefill chunk: phase-aware, so a sinks +
//!   window retention counts its window (plus a chunk), SnapKV its whole sequence (the prompt
//!   is held whole until it ends), identity everything.
//! - **Admission** (waiting to running, FIFO, head-of-line): the queue's head runs when fewer
//!   than `max_num_seqs` requests run and the running requests' planned peaks plus its own fit
//!   the admission pages (the pool's, unless [`SchedulerConfig::admission_pages`]
//!   overcommits; then the pool must also have the head's first chunk free, or its whole peak
//!   once it was preempted). Counting the policy's peak and never identity's is what lets a 25%-KV
//!   policy run about 4x the requests. **A request's plan drops when its prompt is done** to
//!   what it holds from there on ([`crate::plan::Planner::pages_after_prompt`]): SnapKV and
//!   KVzip hold the whole prompt until it ends and their budget (plus what they generate)
//!   after, so the pages planned
//!   for the rest of their prompt go to the next request in the queue (a preempted request is
//!   planned at its peak again). Admission creates the cache sequence and declares the
//!   original prompt length (also after a preemption), so retention sees each step's phase.
//!   With the cache's prefix caching on (policies that never evict), the prompt's longest
//!   cached run of full pages is reused and counts as computed
//!   ([`crate::KvCache::add_sequence_with_prefix`]).
//! - **Batch** (per step): running decodes and replays first, one token each, then prefill
//!   chunks, under `max_num_batched_tokens`. **Chunk boundaries are fixed** at multiples of
//!   `prefill_chunk` from the stream's start: a prefilling request gets its whole next chunk or
//!   nothing, so retention (which runs between steps) sees the same steps under load as
//!   unloaded. The config guarantees room for one chunk beside every other request's decode,
//!   so the oldest prefill always progresses.
//! - **Probes** (KVzip, a retention with [`crate::Retention::probe_chunk`]): a prompt's
//!   chunks stop one token before its end and the last token is a step of its own; the step
//!   that ended one token short ([`Scheduler::probe_due`]; under KVzip compressing during
//!   prefill, every prefill step) leaves the request **probing**: it is not scheduled, its
//!   cache state held, until the engine has run its probe steps
//!   ([`Scheduler::probing`], [`Scheduler::probed`]), so the retention decides with their
//!   scores at the prompt's end, as in an unbatched run. The engine runs a bounded amount of
//!   probe work per step (a prefill chunk's worth), so the other requests keep decoding
//!   between a long prompt's probe steps, as chunked prefill keeps them decoding between its
//!   chunks. Admission plans the probes' tokens on top of the prompt
//!   ([`Scheduler::with_probe_tokens`]); a probe that finds the pool out of pages preempts its
//!   request between steps ([`Scheduler::preempt`]).
//! - **Preemption**: when `reserve` finds the pool out of pages
//!   ([`crate::Error::PoolExhausted`]), the newest running request is preempted by recompute:
//!   its sequence is freed, its generated tokens are kept, it goes back to the front of the
//!   queue and leaves the batch, and the reserve is retried. Without overcommit this happens
//!   only when the planner's bound is broken (a custom retention that keeps more than it
//!   declares, or pages taken by another user of the cache). Nothing panics and no request is
//!   lost; a step whose batch empties returns an empty output.
//! - **Resumption**: a preempted request re-prefills its original prompt in the same fixed
//!   chunks, then **replays** its generated tokens one per step ([`ScheduledKind::Replay`]:
//!   decode steps that sample nothing), then decodes. Every retention sees the same sequence
//!   of steps as in an unpreempted run, so greedy outputs are equal.
//! - **Finishing**: [`Scheduler::update`] finishes a request at `max_tokens`
//!   ([`FinishReason::Length`]); the caller ends one on a stop condition with
//!   [`Scheduler::finish`] or cancels it with [`Scheduler::cancel`]. Its pages return to the
//!   pool at once.
//!
//! # The step loop
//! `schedule` (reserves, returning a [`crate::Reservation`]) → the engine writes K/V and
//! attends (attention mass into the step where the policy needs scores) →
//! [`crate::Reservation::retain`] → `update` with the tokens
//! sampled for the entries that [`ScheduledRequest::samples`]. Cancel and finish between steps.
//! Under a policy that probes, run the pending probe steps between steps too
//! ([`Scheduler::probing`], [`Scheduler::probed`]): a probing request is never scheduled, so a
//! loop that skips them waits forever.
//!
//! ```
//! use std::sync::Arc;
//! use layerkv::{
//!     CacheConfig, KvCache, Policy, Scheduler, SchedulerConfig, SchedulerOutput, Step,
//! };
//!
//! let policy = Arc::new(Policy::identity(2)?);
//! let cache = KvCache::new(policy, CacheConfig { block_size: 4, num_pages: 64, ..CacheConfig::default() })?;
//! let config = SchedulerConfig { max_num_seqs: 4, max_num_batched_tokens: 16, prefill_chunk: 8, ..SchedulerConfig::default() };
//! let mut scheduler = Scheduler::new(config, &cache)?;
//! scheduler.add_request(1, vec![5; 20], 3)?;
//! scheduler.add_request(2, vec![6; 4], 2)?;
//! let (mut step, mut out, mut sampled) = (Step::new(), SchedulerOutput::new(), Vec::new());
//! let mut finished = Vec::new();
//! while finished.len() < 2 {
//!     let Some(reserved) = scheduler.schedule(&cache, &mut step, &mut out)? else { break };
//!     assert!(out.num_scheduled_tokens() <= 16);
//!     // ... the engine writes K/V at reserved.group_slots(g) and attends ...
//!     reserved.retain_with(|_step| Ok::<(), layerkv::Error>(()))?; // (identity: no moves)
//!     sampled.clear();
//!     sampled.extend(out.scheduled().iter().filter(|e| e.samples).map(|e| (e.id, 42)));
//!     scheduler.update(&cache, &out, &sampled)?;
//!     finished.extend(scheduler.drain_finished());
//! }
//! assert_eq!(finished[0].output, [42, 42]); // request 2: 4 prompt tokens, 2 generated
//! assert_eq!(cache.pool_stats().num_used, 0);
//! # Ok::<(), layerkv::Error>(())
//! ```
//!
//! # Costs
//! `schedule` is O(running + tokens of the batch) plus the cache's reserve; `update` O(batch);
//! `add_request` O(1); `finish`/`cancel` O(running + waiting). With a reused
//! [`SchedulerOutput`] and [`crate::Step`], a warmed-up step allocates nothing in the
//! scheduler.

mod config;
mod output;
mod request;
mod scheduler;

pub use config::SchedulerConfig;
pub use output::{ScheduledKind, ScheduledRequest, SchedulerOutput};
pub use request::{FinishReason, FinishedRequest, RequestId, RequestInfo, RequestState};
pub use scheduler::{PendingProbe, Scheduler};
