//! [`GroupScores`]: one sequence's per-slot scores in one group, the attention mass score-based
//! retentions (H2O, SnapKV) decide with. A leaf of the cache module.

/// A group's per-slot scores (only the kinds its retention needs are kept non-empty).
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupScores {
    pub(crate) accumulated: Vec<f32>,
    pub(crate) last: Vec<f32>,
    pub(crate) observed: Vec<f32>,
    /// The most mass of any probe step (KVzip); `+inf` where no probe looked.
    pub(crate) probed: Vec<f32>,
}
