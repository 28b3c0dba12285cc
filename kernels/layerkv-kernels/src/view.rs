//! The kernels' inputs that describe what to read: where a sequence's queries sit
//! ([`SeqQuery`]) over one KV group's table ([`layerkv::TableView`], the allocator's own view,
//! borrowed as it is) and the attention rule ([`AttentionParams`]). Plain borrowed data: the
//! allocator lays it out, the kernels only read.

use layerkv::TableView;

/// Query rows of one sequence inside the packed query tensor (varlen, like flash-attn).
#[derive(Debug, Clone, Copy)]
pub struct SeqQuery<'a> {
    /// The KV the rows attend to.
    pub kv: TableView<'a>,
    /// First row of this sequence in `q`.
    pub q_start: usize,
    /// Number of rows (1 for decode).
    pub num_q: usize,
    /// Logical slot of row 0 in `kv`; row r sits at `first_slot + r`.
    pub first_slot: usize,
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
