//! [`SchedulerOutput`]: what one [`crate::Scheduler::schedule`] decided, as plain data for the
//! engine: per scheduled request its sequence, the stream positions and tokens it feeds, and
//! whether a token is sampled after them; plus the step's counts and preemptions.
//!
//! The caller owns one output and passes it to every step: its buffers keep their capacity,
//! so a warmed-up step allocates nothing. Reading is O(1) per entry.

use std::ops::Range;

use crate::ids::{RequestId, SeqId};

/// What a scheduled request feeds this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduledKind {
    /// A chunk of its prompt (a whole chunk: from a multiple of the prefill chunk to the next
    /// one or to the prompt's end).
    Prefill,
    /// One token it generated before a preemption, fed back to rebuild its cache exactly as it
    /// was; nothing is sampled.
    Replay,
    /// Its last generated token; the next one is sampled.
    Decode,
}

/// One request of a step, in the batch order of the [`crate::Step`] the scheduler reserved:
/// entry `i` is the step's sequence `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRequest {
    /// The request.
    pub id: RequestId,
    /// Its cache sequence (the request id).
    pub seq: SeqId,
    /// What it feeds.
    pub kind: ScheduledKind,
    /// Positions in the request's stream (prompt, then generated tokens) of the tokens fed:
    /// their text positions.
    pub positions: Range<usize>,
    /// Whether the engine samples a token after this step's last token (a chunk that ends the
    /// prompt of a request that has generated nothing yet, or a decode); hand it to
    /// [`crate::Scheduler::update`].
    pub samples: bool,
    /// Where the tokens sit in [`SchedulerOutput`]'s token buffer.
    pub(crate) tokens: Range<usize>,
}

impl ScheduledRequest {
    /// Tokens fed.
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }
}

/// What one step schedules. Reuse one output across steps (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct SchedulerOutput {
    pub(crate) step: u64,
    pub(crate) scheduled: Vec<ScheduledRequest>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) preempted: Vec<RequestId>,
    pub(crate) num_scheduled_tokens: usize,
    pub(crate) num_samples: usize,
}

impl SchedulerOutput {
    /// An empty output.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn clear(&mut self, step: u64) {
        self.step = step;
        self.preempted.clear();
        self.clear_entries();
    }

    /// Drops the scheduled entries (nothing was reserved), keeping the preemptions.
    pub(crate) fn clear_entries(&mut self) {
        self.scheduled.clear();
        self.tokens.clear();
        self.num_scheduled_tokens = 0;
        self.num_samples = 0;
    }

    /// The scheduler's step number this output belongs to (1 for the first step).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The scheduled requests, decodes and replays first, then prefill chunks; entry `i` is
    /// the reserved step's sequence `i`.
    pub fn scheduled(&self) -> &[ScheduledRequest] {
        &self.scheduled
    }

    /// The tokens `entry` (an entry of this output) feeds.
    pub fn tokens(&self, entry: &ScheduledRequest) -> &[u32] {
        &self.tokens[entry.tokens.clone()]
    }

    /// Whether nothing was scheduled (no step was reserved; the caller waits for requests or
    /// for pages).
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Requests scheduled.
    pub fn len(&self) -> usize {
        self.scheduled.len()
    }

    /// Tokens fed this step, over every request (at most the token budget).
    pub fn num_scheduled_tokens(&self) -> usize {
        self.num_scheduled_tokens
    }

    /// Entries that sample a token: [`crate::Scheduler::update`] expects that many.
    pub fn num_samples(&self) -> usize {
        self.num_samples
    }

    /// Requests preempted while this step was scheduled (newest first); they wait at the front
    /// of the queue with their generated tokens.
    pub fn preempted(&self) -> &[RequestId] {
        &self.preempted
    }
}
