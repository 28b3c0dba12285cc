//! [`SchedulerConfig`]: the sizes of a [`crate::Scheduler`] (batch width, per-step token
//! budget, prefill chunk, queue cap, admission pages) and their validation. Pure data; O(1).

use crate::error::{Error, Result};

/// The sizes of a [`crate::Scheduler`].
///
/// ```
/// use layerkv::SchedulerConfig;
///
/// let config = SchedulerConfig { max_num_seqs: 8, ..SchedulerConfig::default() };
/// config.validate()?;
/// // A chunk that cannot fit beside the other requests' decodes is refused.
/// let bad = SchedulerConfig { max_num_batched_tokens: 64, prefill_chunk: 64, ..config };
/// assert!(bad.validate().is_err());
/// # Ok::<(), layerkv::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests running at once (holding cache sequences), at most.
    pub max_num_seqs: usize,
    /// Tokens one step feeds to the model, at most (decode tokens + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Prefill chunk size: a prompt is fed in chunks that start at multiples of it.
    pub prefill_chunk: usize,
    /// Waiting requests, at most: [`crate::Scheduler::add_request`] beyond it fails with
    /// [`Error::QueueFull`] (requests requeued by preemption are never refused).
    pub max_waiting: usize,
    /// Pages admission may plan for: the sum of the running requests' planned peaks stays at or
    /// below it. `None`: the pool's pages, so admitted requests never run out of pages while the
    /// planner's bound holds. A value above the pool overcommits (more requests run at once,
    /// betting that they stop before `max_tokens`), and preemption handles the pages that run
    /// out; an overcommitted admission also needs the head's first chunk free in the pool (its
    /// whole peak once it was preempted), so a preempted request is not readmitted on the
    /// pages its preemption freed. Must not be below the pool's pages.
    pub admission_pages: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            prefill_chunk: 512,
            max_waiting: 1024,
            admission_pages: None,
        }
    }
}

impl SchedulerConfig {
    /// Checks the sizes: every count at least 1, and room in the token budget for one whole
    /// prefill chunk beside the decodes of every other running request
    /// (`prefill_chunk + max_num_seqs - 1 <= max_num_batched_tokens`), so the oldest prefilling
    /// request always gets its next chunk and no prompt starves behind decodes.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidSchedulerConfig(reason));
        for (name, value) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("max_waiting", self.max_waiting),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        let need = self.prefill_chunk.saturating_add(self.max_num_seqs - 1);
        if need > self.max_num_batched_tokens {
            return bad(format!(
                "max_num_batched_tokens ({}) must hold a prefill chunk ({}) beside {} decodes: \
                 at least {need}",
                self.max_num_batched_tokens,
                self.prefill_chunk,
                self.max_num_seqs - 1
            ));
        }
        Ok(())
    }

    /// [`SchedulerConfig::validate`] plus the checks against a pool of `num_pages` pages.
    pub(crate) fn validate_for_pool(&self, num_pages: usize) -> Result<()> {
        self.validate()?;
        if let Some(pages) = self.admission_pages {
            if pages < num_pages {
                return Err(Error::InvalidSchedulerConfig(format!(
                    "admission_pages ({pages}) must not be below the pool's {num_pages} pages \
                     (a request the pool holds must stay admissible)"
                )));
            }
        }
        Ok(())
    }
}
