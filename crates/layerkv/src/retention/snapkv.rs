//! SnapKV: once, at the end of prefill, keep the last `observe` slots (the observation window)
//! and the `budget - observe` prefix slots that the observation window attended to most, after
//! max-pooling the scores over `pool` neighbouring slots (so kept tokens come with their context).
//!
//! The scores are the attention mass of the observation-window queries only (see
//! [`crate::ScoreNeed::ObservationWindow`]). O(num_slots x pool); no allocation beyond the
//! caller-owned scratch.

use crate::bits;

/// Marks the observation window and the top pooled prefix slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select(
    observe: usize,
    budget: usize,
    pool: usize,
    num_slots: usize,
    valid: &[u64],
    scores: &[f32],
    keep: &mut [u64],
    scratch: &mut Vec<u32>,
) {
    let window_start = super::sink_window::select_recent(observe, num_slots, valid, keep);
    let half = pool / 2;
    let pooled = |s: usize| {
        let lo = s.saturating_sub(half);
        let hi = (s + half + 1).min(window_start);
        (lo..hi)
            .filter(|&t| bits::get(valid, t))
            .map(|t| scores[t])
            .fold(f32::NEG_INFINITY, f32::max)
    };
    super::heavy_hitter::top_k(
        budget.saturating_sub(observe),
        0..window_start,
        valid,
        pooled,
        keep,
        scratch,
    );
}
