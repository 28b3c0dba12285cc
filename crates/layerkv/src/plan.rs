//! Capacity planning: how many sequences fit in a memory budget under a policy, and how long a
//! single sequence can grow.
//!
//! Bounds come from the same rules the cache applies: a group keeps at most what its retention
//! keeps ([`crate::Retention::max_tokens`]) and, when every layer reading it slides, at most its
//! window; the tokens of one step sit on top until retention runs; the cache compacts whenever a
//! group's holes reach a page, so a group holds at most one page beyond its live tokens. Sharing
//! layers hold nothing. A plan never promises more than the allocator delivers. O(groups).

use crate::config::{group_window, CacheConfig};
use crate::policy::{lane_retentions, LayerKvPolicy};

/// Planning parameters: the cache's block size and windows, and the tokens one step appends
/// before retention runs (1 for decode; the prefill chunk for chunked prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planner {
    /// Token slots per page.
    pub block_size: usize,
    /// Window of the layers the map marks sliding.
    pub sliding_window: Option<usize>,
    /// Window of every other layer (a model-wide sliding window).
    pub model_window: Option<usize>,
    /// Tokens a step appends on top of what retention keeps.
    pub step_tokens: usize,
    /// Lanes of a per-head policy's group ([`CacheConfig::lanes`], the model's KV heads): each
    /// holds its own pages, of one head. Per-group policies ignore it.
    pub lanes: usize,
}

impl Planner {
    /// A planner with no sliding windows and one-token steps.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            sliding_window: None,
            model_window: None,
            step_tokens: 1,
            lanes: 1,
        }
    }

    /// The planner of a cache config (one-token steps).
    pub fn from_config(config: &CacheConfig) -> Self {
        Self {
            block_size: config.block_size,
            sliding_window: config.sliding_window,
            model_window: config.model_window,
            step_tokens: 1,
            lanes: config.lanes.max(1),
        }
    }

    /// The same planner for steps of `tokens` tokens.
    pub fn with_step_tokens(mut self, tokens: usize) -> Self {
        self.step_tokens = tokens.max(1);
        self
    }

    /// Upper bound on the pages `group` of one sequence of `seq_len` tokens holds at any time
    /// (each of its lanes that keeps the group's retention, with [`Planner::lanes`] above 1).
    pub fn pages_per_group(
        &self,
        policy: &dyn LayerKvPolicy,
        group: usize,
        seq_len: usize,
    ) -> usize {
        self.pages_under(policy, group, policy.retention(group), seq_len)
    }

    /// Upper bound on the pages lane `head` of `group` holds (its own retention, see
    /// [`LayerKvPolicy::lane_retention`]).
    pub fn pages_per_lane(
        &self,
        policy: &dyn LayerKvPolicy,
        group: usize,
        head: usize,
        seq_len: usize,
    ) -> usize {
        self.pages_under(policy, group, policy.lane_retention(group, head), seq_len)
    }

    fn pages_under(
        &self,
        policy: &dyn LayerKvPolicy,
        group: usize,
        retention: &crate::Retention,
        seq_len: usize,
    ) -> usize {
        let bs = self.block_size.max(1);
        let map = policy.layer_map();
        let full = seq_len.div_ceil(bs);
        let window = group_window(map, group, self.sliding_window, self.model_window);
        if retention.is_full() && window.is_none() {
            return full;
        }
        let extra = self.step_tokens.saturating_sub(1);
        let mut kept = retention.max_tokens(seq_len);
        if let Some(w) = window {
            kept = kept.min(w.saturating_sub(1));
        }
        let live = (kept + 1 + extra).min(seq_len);
        (live.div_ceil(bs) + 1).min(full)
    }

    /// Lanes per group under `policy`: [`Planner::lanes`] for a per-head policy, else 1.
    pub fn lanes_of(&self, policy: &dyn LayerKvPolicy) -> usize {
        crate::policy::lanes_per_group(policy, self.lanes)
    }

    /// Upper bound on the pages one sequence of `seq_len` tokens holds under `policy`.
    pub fn pages_per_sequence(&self, policy: &dyn LayerKvPolicy, seq_len: usize) -> usize {
        let lanes = self.lanes_of(policy);
        (0..policy.layer_map().num_groups())
            .map(|g| {
                (0..lanes)
                    .map(|h| self.pages_per_lane(policy, g, h, seq_len))
                    .sum::<usize>()
            })
            .sum()
    }

    /// Upper bound on the pages one sequence holds from the end of its prompt of `prompt_len`
    /// tokens on, while it generates up to `max_tokens` more, one a step (decode, and replay
    /// after a preemption): SnapKV and KVzip have compressed the prompt by then, so a
    /// scheduler can plan a request for less once its prompt is done. Never above
    /// [`Planner::pages_per_sequence`] of the whole length.
    ///
    /// Bounded over the whole sequence, not lane by lane: an adaptive split (AdaKV) moves
    /// budget between the lanes of a group, or of every group, so one lane may keep more than
    /// its own budget while the lanes together keep no more than theirs. Each lane holds at
    /// most two pages beyond its tokens' dense count (a partly filled last page, and the holes
    /// compaction leaves, which stay under a page).
    pub fn pages_after_prompt(
        &self,
        policy: &dyn LayerKvPolicy,
        prompt_len: usize,
        max_tokens: usize,
    ) -> usize {
        let total = prompt_len.saturating_add(max_tokens);
        let whole = self.pages_per_sequence(policy, total);
        let lanes = self.lanes_of(policy);
        let groups = policy.layer_map().num_groups();
        let tokens: usize = lane_retentions(policy, lanes)
            .map(|(_, _, r)| {
                // What it keeps, and the step's token appended before the step retains.
                let kept = r.max_tokens_after_prompt(prompt_len, max_tokens);
                (kept + 1).min(total)
            })
            .sum();
        let bound = tokens.div_ceil(self.block_size.max(1)) + 2 * groups * lanes;
        bound.min(whole)
    }

    /// Upper bound on the pages one sequence holds while its prompt of `prompt_len` tokens is
    /// prefilled in steps of at most [`Planner::step_tokens`] (probe steps included): a lane
    /// whose retention compresses during prefill ([`crate::Retention::compresses_in_prefill`],
    /// KVzip with `prefill`) holds what it keeps after a step plus the next step's tokens; any
    /// other lane is bounded as in [`Planner::pages_per_sequence`] of the prompt and a step.
    /// Bounded over those lanes together, as [`Planner::pages_after_prompt`] is (an AdaKV split
    /// moves budget between them), with two pages of slack per lane.
    pub fn pages_in_prompt(&self, policy: &dyn LayerKvPolicy, prompt_len: usize) -> usize {
        let len = prompt_len.saturating_add(self.step_tokens);
        let (mut tokens, mut compressing, mut pages) = (0usize, 0usize, 0usize);
        for (g, h, r) in lane_retentions(policy, self.lanes_of(policy)) {
            if r.compresses_in_prefill() {
                let kept = r.max_tokens_in_prompt(prompt_len, self.step_tokens);
                tokens = tokens.saturating_add(kept.saturating_add(self.step_tokens).min(len));
                compressing += 1;
            } else {
                pages = pages.saturating_add(self.pages_per_lane(policy, g, h, len));
            }
        }
        let bound = tokens
            .div_ceil(self.block_size.max(1))
            .saturating_add(2 * compressing)
            .saturating_add(pages);
        bound.min(self.pages_per_sequence(policy, len))
    }

    /// Sequences of `seq_len` tokens that fit in a pool of `num_pages` pages.
    pub fn max_sequences(
        &self,
        policy: &dyn LayerKvPolicy,
        seq_len: usize,
        num_pages: usize,
    ) -> usize {
        match self.pages_per_sequence(policy, seq_len) {
            0 => usize::MAX,
            per => num_pages / per,
        }
    }

    /// The longest single sequence that fits in `num_pages` pages (`None`: unbounded, every
    /// group's memory stays flat; capped at `limit` tokens to bound the search).
    pub fn max_context(
        &self,
        policy: &dyn LayerKvPolicy,
        num_pages: usize,
        limit: usize,
    ) -> Option<usize> {
        if self.pages_per_sequence(policy, limit) <= num_pages
            && self.pages_per_sequence(policy, limit / 2) == self.pages_per_sequence(policy, limit)
        {
            return None;
        }
        // Pages grow monotonically with the length: binary search the largest that fits.
        let (mut lo, mut hi) = (0usize, limit);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.pages_per_sequence(policy, mid) <= num_pages {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(lo)
    }
}

/// Upper bound on pages one sequence of `seq_len` tokens holds under `policy` (one-token steps,
/// no sliding windows).
pub fn pages_per_sequence(policy: &dyn LayerKvPolicy, block_size: usize, seq_len: usize) -> usize {
    Planner::new(block_size).pages_per_sequence(policy, seq_len)
}

/// Sequences of `seq_len` tokens that fit in a pool of `num_pages` pages (one-token steps, no
/// sliding windows).
pub fn max_sequences(
    policy: &dyn LayerKvPolicy,
    block_size: usize,
    seq_len: usize,
    num_pages: usize,
) -> usize {
    Planner::new(block_size).max_sequences(policy, seq_len, num_pages)
}

/// Bytes one sequence of `seq_len` tokens needs at most (`bytes_per_token` per group and token).
pub fn bytes_per_sequence(
    policy: &dyn LayerKvPolicy,
    block_size: usize,
    bytes_per_token: usize,
    seq_len: usize,
) -> usize {
    pages_per_sequence(policy, block_size, seq_len) * block_size * bytes_per_token
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerMap, Policy, PolicyBuilder, Retention};

    #[test]
    fn sharing_and_windows_multiply_capacity() {
        let id = Policy::identity(8).unwrap();
        let cla = PolicyBuilder::new(LayerMap::cla(8, 2).unwrap())
            .build()
            .unwrap();
        let both = PolicyBuilder::new(LayerMap::cla(8, 2).unwrap())
            .retention(Retention::SinkWindow {
                sinks: 16,
                window: 240,
            })
            .build()
            .unwrap();
        assert_eq!(pages_per_sequence(&id, 16, 4096), 8 * 256);
        assert_eq!(max_sequences(&cla, 16, 4096, 8 * 256), 2);
        // 16 sinks + 239 kept + the step's token = 256 tokens: 16 pages + 1 of slack.
        assert_eq!(pages_per_sequence(&both, 16, 4096), 4 * (16 + 1));
        assert_eq!(bytes_per_sequence(&id, 16, 10, 16), 8 * 160);
        let p = Planner::new(16);
        assert_eq!(p.max_context(&both, 1000, 1 << 20), None);
        assert_eq!(p.max_context(&id, 8 * 4, 1 << 20), Some(64));
    }

    /// A per-head policy's group holds a set of (one-head) pages per lane; a per-group policy
    /// ignores the lane count. Checked against a cache that runs the policy.
    #[test]
    fn lanes_multiply_pages_of_per_head_policies_only() {
        let group = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .retention(Retention::SinkWindow {
                sinks: 4,
                window: 29,
            })
            .build()
            .unwrap();
        let head = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .retention(Retention::SinkWindow {
                sinks: 4,
                window: 29,
            })
            .per_head(true)
            .build()
            .unwrap();
        let mut p = Planner::new(16);
        p.lanes = 3;
        let per_group = p.pages_per_sequence(&group, 1000);
        // 4 sinks + 28 window + the step's token: 3 pages + 1 of slack per group.
        assert_eq!(per_group, 2 * (3 + 1));
        assert_eq!(p.pages_per_sequence(&head, 1000), 3 * per_group);
        let config = CacheConfig {
            block_size: 16,
            num_pages: 64,
            bytes_per_token: 2,
            lanes: 3,
            ..CacheConfig::default()
        };
        let cache = crate::KvCache::new(std::sync::Arc::new(head), config).unwrap();
        cache.add_sequence(0).unwrap();
        let mut step = crate::Step::new();
        let mut peak = 0;
        for t in 0..200u32 {
            cache
                .reserve(&[(0, &[t])], &mut step)
                .unwrap()
                .retain()
                .unwrap();
            peak = peak.max(cache.pool_stats().num_used);
        }
        assert!(peak <= 3 * per_group, "{peak} pages held");
        assert_eq!(Planner::from_config(&config).lanes, 3);
    }

    #[test]
    fn sliding_layers_hold_their_window() {
        let map = LayerMap::from_layer_types("0s_1s_2_2").unwrap();
        let policy = PolicyBuilder::new(map).build().unwrap();
        let mut p = Planner::new(16);
        p.sliding_window = Some(64);
        // Two sliding groups of 64 tokens (4 pages + 1), one full group of 4096 tokens.
        assert_eq!(p.pages_per_sequence(&policy, 4096), 2 * 5 + 256);
    }
}
