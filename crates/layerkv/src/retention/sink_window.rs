//! StreamingLLM: keep the first `sinks` tokens (attention sinks) and the most recent tokens.
//!
//! StreamingLLM evicts *before* appending, so the token being processed attends to the sinks
//! plus a window of `window` tokens that includes itself. Retention runs after a step, so it
//! keeps `window - 1` recent slots: the next token then completes the window. O(sinks + window)
//! per call; sinks and window are counted over valid slots (survivors keep their order), so no
//! scores or positions are needed.

use crate::bits;

/// Marks the sinks and the recent window among the valid slots of a table with `num_slots`
/// logical slots.
pub(crate) fn select(
    sinks: usize,
    window: usize,
    num_slots: usize,
    valid: &[u64],
    keep: &mut [u64],
) {
    select_first(sinks, num_slots, valid, keep);
    select_recent(window.saturating_sub(1), num_slots, valid, keep);
}

/// Marks the first `count` valid slots. Sinks are counted, not taken at slots `0..count`:
/// compaction may pack them towards the window, leaving holes before them (never reordering).
pub(crate) fn select_first(count: usize, num_slots: usize, valid: &[u64], keep: &mut [u64]) {
    let (mut left, mut s) = (count, 0);
    while left > 0 && s < num_slots {
        if bits::get(valid, s) {
            bits::set(keep, s);
            left -= 1;
        }
        s += 1;
    }
}

/// Marks the last `recent` valid slots (the most recent tokens: holes among them, left by
/// compaction or score eviction, do not shrink the window) and returns the first of them
/// (`num_slots` when `recent` is 0).
pub(crate) fn select_recent(
    recent: usize,
    num_slots: usize,
    valid: &[u64],
    keep: &mut [u64],
) -> usize {
    let (mut left, mut s) = (recent, num_slots);
    while left > 0 && s > 0 {
        s -= 1;
        if bits::get(valid, s) {
            bits::set(keep, s);
            left -= 1;
        }
    }
    s
}
