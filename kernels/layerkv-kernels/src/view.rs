//! The kernels' inputs that describe what to read: one sequence's pages of one KV group
//! ([`SeqKv`]), where its queries sit ([`SeqQuery`]) and the attention rule
//! ([`AttentionParams`]). Plain borrowed data: the allocator lays it out, the kernels only read.

use crate::NULL_PAGE;

/// One sequence's view of one KV group, as the allocator lays it out.
#[derive(Debug, Clone, Copy)]
pub struct SeqKv<'a> {
    /// Page ids in logical order ([`NULL_PAGE`] for pages returned by eviction).
    pub pages: &'a [u32],
    /// Logical slots filled (`<= pages.len() * block_size`).
    pub num_slots: usize,
    /// Validity bitset over logical slots (bit `s % 64` of word `s / 64`); `None` = all valid.
    pub valid: Option<&'a [u64]>,
}

/// Query rows of one sequence inside the packed query tensor (varlen, like flash-attn).
#[derive(Debug, Clone, Copy)]
pub struct SeqQuery<'a> {
    /// The KV the rows attend to.
    pub kv: SeqKv<'a>,
    /// First row of this sequence in `q`.
    pub q_start: usize,
    /// Number of rows (1 for decode).
    pub num_q: usize,
    /// Logical slot of row 0; row r sits at `q_pos + r`.
    pub q_pos: usize,
}

/// The attention rule shared by every sequence of a call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    /// Softmax scale (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Sliding window: a row at slot p sees slots s with `s + window > p`.
    pub window: Option<usize>,
    /// Whether a row sees its own slot (true: normal and downward sharing; false: upward
    /// sharing, where the target layer's KV of the current token does not exist yet).
    pub include_diagonal: bool,
}

impl SeqKv<'_> {
    /// Whether logical slot `s` holds a live token (filled, on a held page, valid bit set).
    #[inline]
    pub fn is_valid(&self, s: usize, block_size: usize) -> bool {
        s < self.num_slots
            && self.pages[s / block_size] != NULL_PAGE
            && self.valid.is_none_or(|v| v[s / 64] >> (s % 64) & 1 == 1)
    }
}

impl AttentionParams {
    /// Visible slot range `[lo, hi)` of a row at logical slot `p` (validity not applied).
    #[inline]
    pub fn visible(&self, p: usize, num_slots: usize) -> (usize, usize) {
        let hi = if self.include_diagonal { p + 1 } else { p }.min(num_slots);
        let lo = match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        (lo.min(hi), hi)
    }
}
