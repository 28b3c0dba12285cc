//! [`RetainScratch`]: the buffers retain decides into, kept in the cache's state (under the
//! same lock as the tables) so a warmed-up retain allocates nothing.

use crate::map::GroupId;

use super::scores::GroupScores;

/// Retain's decisions and score copies, reused from step to step (it lives in the cache's
/// state, under the same lock as the tables it decides for).
#[derive(Debug, Default)]
pub(crate) struct RetainScratch {
    /// Keep bits of every decided (sequence, group), back to back.
    pub(crate) keep_words: Vec<u64>,
    /// (sequence index, group, offset into `keep_words`) of every decision.
    pub(crate) keep_ranges: Vec<(usize, GroupId, usize)>,
    /// The retentions' own scratch.
    pub(crate) rule: Vec<u32>,
    /// AdaKV's joint decisions' scratch.
    pub(crate) joint: crate::retention::JointScratch,
    /// Per decision: the scores with this step's mass folded in.
    pub(crate) scores: Vec<GroupScores>,
}
