//! [`CacheConfig`]: the sizes of a cache (pages, slots per page, bytes per slot, windows). Plain
//! data, read by the cache and by the planner.

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

