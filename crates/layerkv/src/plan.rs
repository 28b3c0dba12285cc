//! Capacity planning: how many sequences fit in a memory budget under a policy.
//!
//! Bounds are worst cases over token placement (score-based retentions may scatter kept tokens
//! one per page), so a plan never promises more than the allocator can deliver. O(groups).

use crate::policy::LayerKvPolicy;

/// Upper bound on pages one sequence of `seq_len` tokens holds under `policy`.
pub fn pages_per_sequence(policy: &dyn LayerKvPolicy, block_size: usize, seq_len: usize) -> usize {
    (0..policy.layer_map().num_groups())
        .map(|g| policy.retention(g).max_pages(seq_len, block_size))
        .sum()
}

/// Sequences of `seq_len` tokens that fit in a pool of `num_pages` pages.
pub fn max_sequences(
    policy: &dyn LayerKvPolicy,
    block_size: usize,
    seq_len: usize,
    num_pages: usize,
) -> usize {
    match pages_per_sequence(policy, block_size, seq_len) {
        0 => usize::MAX,
        per => num_pages / per,
    }
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
        assert_eq!(pages_per_sequence(&both, 16, 4096), 4 * (1 + 16));
        assert_eq!(bytes_per_sequence(&id, 16, 10, 16), 8 * 160);
    }
}
