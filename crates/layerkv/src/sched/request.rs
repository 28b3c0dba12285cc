//! One request of the [`crate::Scheduler`]: its token stream (prompt, then generated tokens),
//! how much of the stream the cache holds, and what its next step feeds. Also the plain-data
//! types callers see of a request: [`RequestState`], [`RequestInfo`], [`FinishReason`],
//! [`FinishedRequest`]. Every operation is O(1) except the token copy of a step (O(tokens)).

use std::ops::Range;

use super::output::ScheduledKind;

pub use crate::ids::RequestId;

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It generated `max_tokens` tokens.
    Length,
    /// The caller saw a stop condition (EOS, a stop string) and called
    /// [`crate::Scheduler::finish`].
    Stop,
    /// The caller cancelled it ([`crate::Scheduler::cancel`]; e.g. the client disconnected).
    Cancelled,
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestState {
    /// In the waiting queue, holding no pages (new, or preempted).
    Waiting,
    /// Running, feeding its prompt in chunks.
    Prefill,
    /// Running after a preemption: feeding back tokens it generated before, one per step,
    /// without sampling.
    Replay,
    /// Running, feeding its last generated token and sampling the next.
    Decode,
    /// Running, its prompt's probe steps (KVzip) pending: not scheduled until the engine ran
    /// them ([`crate::Scheduler::probing`]), its cache state held meanwhile.
    Probing,
}

impl RequestState {
    /// Whether the request is running (holds a cache sequence).
    pub fn is_running(self) -> bool {
        self != RequestState::Waiting
    }
}

/// A snapshot of one request, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo {
    /// Where it is.
    pub state: RequestState,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// The most tokens it generates.
    pub max_tokens: usize,
    /// Tokens generated so far (kept across preemptions).
    pub num_output: usize,
    /// Tokens of its stream (prompt, then generated) the cache holds, as of the last update;
    /// 0 while waiting.
    pub num_computed: usize,
    /// Times it was preempted.
    pub num_preemptions: usize,
    /// Its peak pages under the policy (its plan until its prompt is done).
    pub peak_pages: usize,
    /// The pages it is planned for now: its peak until its prompt is done, then what it holds
    /// from there on (less under SnapKV and KVzip, which compress the prompt at its end).
    pub planned_pages: usize,
}

/// A request that left the scheduler, with its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedRequest {
    /// The request.
    pub id: RequestId,
    /// Why it finished.
    pub reason: FinishReason,
    /// Its prompt.
    pub prompt: Vec<u32>,
    /// The tokens it generated.
    pub output: Vec<u32>,
    /// Times it was preempted.
    pub num_preemptions: usize,
}

/// The scheduler's record of one request.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) prompt: Vec<u32>,
    /// Generated tokens; capacity `max_tokens` from the start (no growth on the hot path).
    pub(crate) output: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) peak_pages: usize,
    /// Its peak from the end of its prompt on ([`crate::plan::Planner::pages_after_prompt`]).
    pub(crate) after_prompt_pages: usize,
    /// What the scheduler plans for it now: `peak_pages`, or `after_prompt_pages` once its
    /// prompt is done (again `peak_pages` after a preemption).
    pub(crate) planned: usize,
    /// Tokens of the stream in the cache as of the last update (0 while waiting).
    pub(crate) num_computed: usize,
    pub(crate) running: bool,
    pub(crate) num_preemptions: usize,
    /// Prompt positions whose probe steps are still to run (empty: none pending).
    pub(crate) probing: Range<usize>,
}

/// What one step feeds of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Work {
    /// Stream positions fed.
    pub(crate) positions: Range<usize>,
    pub(crate) kind: ScheduledKind,
    /// Whether the step's last token is the stream's last, so a token is sampled after it.
    pub(crate) samples: bool,
}

impl Request {
    pub(crate) fn new(prompt: Vec<u32>, max_tokens: usize, peak_pages: usize) -> Self {
        Self {
            prompt,
            output: Vec::with_capacity(max_tokens),
            max_tokens,
            peak_pages,
            after_prompt_pages: peak_pages,
            planned: peak_pages,
            num_computed: 0,
            running: false,
            num_preemptions: 0,
            probing: 0..0,
        }
    }

    /// Prompt, then generated tokens.
    pub(crate) fn stream_len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    pub(crate) fn state(&self) -> RequestState {
        if !self.running {
            RequestState::Waiting
        } else if !self.probing.is_empty() {
            RequestState::Probing
        } else if self.num_computed < self.prompt.len() {
            RequestState::Prefill
        } else if self.num_computed + 1 < self.stream_len() {
            RequestState::Replay
        } else {
            RequestState::Decode
        }
    }

    /// The next step's work of a running request. A prefill chunk runs from the cache's end to
    /// the next multiple of `chunk` (or the prompt's end): boundaries never depend on load.
    /// Replay and decode feed one token; only the stream's last token samples. With
    /// `hold_last` (a policy that probes) the prompt's last token is a step of its own.
    pub(crate) fn next_work(&self, chunk: usize, hold_last: bool) -> Work {
        let start = self.num_computed;
        let (end, kind) = match self.state() {
            RequestState::Prefill => {
                let len = self.prompt.len();
                let boundary = (start / chunk + 1) * chunk;
                let end = if hold_last && start + 1 < len {
                    boundary.min(len - 1)
                } else {
                    boundary.min(len)
                };
                (end, ScheduledKind::Prefill)
            }
            RequestState::Replay => (start + 1, ScheduledKind::Replay),
            // (The scheduler never asks a probing request for work: `fill` skips it.)
            RequestState::Decode | RequestState::Waiting | RequestState::Probing => {
                (start + 1, ScheduledKind::Decode)
            }
        };
        Work {
            positions: start..end,
            kind,
            samples: end == self.stream_len(),
        }
    }

    /// The tokens at stream positions `range`, which lie inside the prompt or inside the
    /// output (a chunk never crosses the prompt's end; replay and decode feed one token).
    pub(crate) fn tokens(&self, range: Range<usize>) -> &[u32] {
        let p = self.prompt.len();
        if range.end <= p {
            &self.prompt[range]
        } else {
            &self.output[range.start - p..range.end - p]
        }
    }

    pub(crate) fn info(&self) -> RequestInfo {
        RequestInfo {
            state: self.state(),
            prompt_len: self.prompt.len(),
            max_tokens: self.max_tokens,
            num_output: self.output.len(),
            num_computed: self.num_computed,
            num_preemptions: self.num_preemptions,
            peak_pages: self.peak_pages,
            planned_pages: self.planned,
        }
    }

    pub(crate) fn into_finished(self, id: RequestId, reason: FinishReason) -> FinishedRequest {
        FinishedRequest {
            id,
            reason,
            prompt: self.prompt,
            output: self.output,
            num_preemptions: self.num_preemptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next work (chunks of 4) of `r` once `computed` tokens ran: its positions, kind and
    /// whether it samples.
    fn work_at(
        r: &mut Request,
        computed: usize,
        hold_last: bool,
    ) -> (Range<usize>, ScheduledKind, bool) {
        r.num_computed = computed;
        let w = r.next_work(4, hold_last);
        (w.positions, w.kind, w.samples)
    }

    #[test]
    fn work_follows_fixed_chunks_then_replay_then_decode() {
        let mut r = Request::new(vec![7; 10], 4, 1);
        r.running = true;
        let prefill = ScheduledKind::Prefill;
        assert_eq!(work_at(&mut r, 0, false), (0..4, prefill, false));
        assert_eq!(work_at(&mut r, 8, false), (8..10, prefill, true));
        // Resumed after a preemption with 3 tokens generated: the prompt's end samples nothing,
        // the first two generated tokens replay, the third decodes.
        r.output.extend([1, 2, 3]);
        assert!(!r.next_work(4, false).samples);
        r.num_computed = 10;
        assert_eq!(r.state(), RequestState::Replay);
        assert_eq!(r.tokens(r.next_work(4, false).positions), &[1]);
        r.num_computed = 12;
        let w = r.next_work(4, false);
        assert_eq!((w.kind, w.samples), (ScheduledKind::Decode, true));
        assert_eq!(r.tokens(w.positions), &[3]);
    }

    /// Under a policy that probes, the prompt's last token is a step of its own (the engine
    /// probes the tokens before it in between); a one-token prompt has nothing to probe.
    #[test]
    fn a_probing_prompt_ends_with_its_last_token_alone() {
        let mut r = Request::new(vec![7; 10], 4, 1);
        r.running = true;
        let prefill = ScheduledKind::Prefill;
        assert_eq!(work_at(&mut r, 0, true), (0..4, prefill, false));
        assert_eq!(work_at(&mut r, 8, true), (8..9, prefill, false));
        assert_eq!(work_at(&mut r, 9, true), (9..10, prefill, true));
        let mut one = Request::new(vec![7], 4, 1);
        one.running = true;
        assert_eq!(one.next_work(4, true).positions, 0..1);
        // A prompt that ends on a chunk boundary: the chunk before stops one short.
        let mut r = Request::new(vec![7; 8], 4, 1);
        r.running = true;
        r.num_computed = 4;
        assert_eq!(r.next_work(4, true).positions, 4..7);
    }
}
