//! [`CacheConfig`]: the sizes of a cache (pages, slots per page, bytes per slot, windows). Plain
//! data, read by the cache and by the planner, with the one rule for windows both apply.

use crate::map::{GroupId, LayerMap};

/// Sizes of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Token slots per page.
    pub block_size: usize,
    /// Pages in the pool (shared by every group of every sequence).
    pub num_pages: usize,
    /// Bytes one token occupies in one group: `2 (K and V) x kv_heads x head_dim x dtype bytes`.
    pub bytes_per_token: usize,
    /// Reuse full pages across sequences with the same prefix. Only takes effect for policies
    /// that never evict (a block's KV then depends on the prefix alone).
    pub prefix_caching: bool,
    /// Window (in cache slots) of the layers the policy's map marks sliding.
    pub sliding_window: Option<usize>,
    /// Window of every layer the map does not mark sliding (a model-wide sliding window, as in
    /// Mistral's config); `None` for full attention.
    pub model_window: Option<usize>,
    /// Lanes per KV group: 1, or the model's KV heads for a per-head policy
    /// ([`crate::LayerKvPolicy::per_head`]). Each lane (one KV head of one group) is then an
    /// allocator group of its own, with its own table, scores, retention and pages, and
    /// `bytes_per_token` is one lane's (`2 x head_dim x dtype bytes`).
    pub lanes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_pages: 0,
            bytes_per_token: 1,
            prefix_caching: false,
            sliding_window: None,
            model_window: None,
            lanes: 1,
        }
    }
}

impl CacheConfig {
    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.block_size * self.bytes_per_token
    }

    /// A config whose pool fills `budget_bytes`.
    pub fn for_budget(block_size: usize, bytes_per_token: usize, budget_bytes: usize) -> Self {
        Self {
            block_size,
            num_pages: budget_bytes / (block_size * bytes_per_token).max(1),
            bytes_per_token,
            ..Self::default()
        }
    }
}

/// The attention window of `layer`: `sliding` for the layers the map marks sliding, `model`
/// (a model-wide sliding window, or `None` for full attention) for the others.
pub(crate) fn layer_window(
    map: &LayerMap,
    layer: usize,
    sliding: Option<usize>,
    model: Option<usize>,
) -> Option<usize> {
    if map.is_sliding(layer) {
        sliding
    } else {
        model
    }
}

/// The window beyond which no reader of `group` looks: the widest reader's window, `None` as
/// soon as one reader attends to everything.
pub(crate) fn group_window(
    map: &LayerMap,
    group: GroupId,
    sliding: Option<usize>,
    model: Option<usize>,
) -> Option<usize> {
    map.readers(group)
        .iter()
        .map(|&l| layer_window(map, l, sliding, model))
        .try_fold(0usize, |acc, w| w.map(|w| acc.max(w)))
}
