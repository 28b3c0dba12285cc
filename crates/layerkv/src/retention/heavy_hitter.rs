//! H2O: keep the `heavy` slots with the largest accumulated attention mass plus the `recent`
//! most recent slots.
//!
//! Selection is a partial sort (`select_nth_unstable`) of candidate slot indices in a
//! caller-owned scratch buffer: O(num_slots) expected time, no allocation once the scratch has
//! grown to the table's size.

use crate::bits;

/// Marks the `heavy` highest-scoring valid slots outside the recent window, plus the window.
pub(crate) fn select(
    heavy: usize,
    recent: usize,
    num_slots: usize,
    valid: &[u64],
    scores: &[f32],
    keep: &mut [u64],
    scratch: &mut Vec<u32>,
) {
    let recent_start = super::sink_window::select_recent(recent, num_slots, valid, keep);
    top_k(heavy, 0..recent_start, valid, |s| scores[s], keep, scratch);
}

/// Marks the `k` valid slots of `range` with the largest `score` (ties broken towards the
/// earlier slot, so results are deterministic).
pub(crate) fn top_k(
    k: usize,
    range: std::ops::Range<usize>,
    valid: &[u64],
    score: impl Fn(usize) -> f32,
    keep: &mut [u64],
    scratch: &mut Vec<u32>,
) {
    if k == 0 {
        return;
    }
    scratch.clear();
    scratch.extend(range.filter(|&s| bits::get(valid, s)).map(|s| s as u32));
    if scratch.len() > k {
        let order = |a: &u32, b: &u32| {
            score(*b as usize)
                .total_cmp(&score(*a as usize))
                .then(a.cmp(b))
        };
        scratch.select_nth_unstable_by(k - 1, order);
        scratch.truncate(k);
    }
    for &s in scratch.iter() {
        bits::set(keep, s as usize);
    }
}
