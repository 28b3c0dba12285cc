//! StreamingLLM: keep the first `sinks` tokens (attention sinks) and the most recent tokens.
//!
//! StreamingLLM evicts *before* appending, so the token being processed attends to the sinks
//! plus a window of `window` tokens that includes itself. Retention runs after a step, so it
//! keeps `window - 1` recent slots: the next token then completes the window. O(sinks + window)
//! per call; positions come from logical slot indices, so no scores are needed.

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
    for s in 0..sinks.min(num_slots) {
        if bits::get(valid, s) {
            bits::set(keep, s);
        }
    }
    select_recent(window.saturating_sub(1), num_slots, valid, keep);
}

/// Marks the last `recent` logical slots that are still valid.
pub(crate) fn select_recent(recent: usize, num_slots: usize, valid: &[u64], keep: &mut [u64]) {
    for s in num_slots.saturating_sub(recent)..num_slots {
        if bits::get(valid, s) {
            bits::set(keep, s);
        }
    }
}
