//! [`Step`]: the step protocol any engine drives around its attention kernels so that a
//! policy holds: what to write where, what to re-rotate, which attention mass to hand back,
//! and which K/V rows to move after retention. The library owns the state and the plans; the
//! engine only executes them on its tensors.
//!
//! One step of a batch of sequences (each with one or more new tokens; prefill chunks and
//! decode tokens mix freely):
//!
//! 1. [`crate::KvCache::reserve`]: slots for every sequence's new tokens in every owning group,
//!    all or nothing across the batch. The engine then copies pages for copy-on-write
//!    ([`Step::copies`]) and re-rotates StreamingLLM sinks ([`Step::rerotations`]: write the
//!    sinks' keys rotated at `first_position + j`; keep their pre-RoPE keys from the rows
//!    [`Step::sink_rows`] names when they are first written).
//! 2. Per layer: owners project K/V, rotate K at [`Step::position`] + row (text positions) and
//!    write K/V at [`Step::slots`]; every layer attends over its group's table
//!    ([`crate::CacheReader::view`]) with its rows at logical slot [`Step::q_pos`]. Where the
//!    group needs scores, pass [`Step::mass_mut`] to every layer reading the group (the kernels
//!    add into it), and for SnapKV's observation window run the rows [`Step::observe_rows`]
//!    once more into [`Step::observed_mass_mut`]. Hand back the mass of one real pass only:
//!    call [`Step::clear_mass`] before each pass of an iterative prefill.
//! 3. [`crate::KvCache::retain`]: each group's retention decides with each sequence's own
//!    [`Phase`]; emptied pages return to the pool at once and, when the holes add up to a page,
//!    survivors are compacted: execute [`Step::moves`] (gather, then scatter) before the next
//!    reserve.
//! 4. On failure between 1 and 3: [`crate::KvCache::rollback`] restores every table, refcount,
//!    score and sink shift.
//!
//! A `Step` is reused from step to step: its buffers keep their capacity, so a warmed-up step
//! allocates nothing. Per-step cost is O(new tokens + live slots of the batch), never the
//! length of what has streamed by.

use std::ops::Range;

use crate::cache::{GroupScores, PageCopy, SeqId, SlotMapping};
use crate::compact::SlotMove;
use crate::map::GroupId;
use crate::retention::{Phase, ScoreNeed};

/// Re-rotation of one sequence's sinks in one group (StreamingLLM positions inside the cache):
/// write the sinks' keys rotated at positions `first_position + j` into the slots
/// [`Step::rerotation_slots`] gives, sink `j` at the `j`-th slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerotation {
    /// Index of the sequence in the step's batch.
    pub index: usize,
    /// The group.
    pub group: GroupId,
    /// RoPE position of sink 0.
    pub first_position: usize,
    pub(crate) slots: Range<usize>,
}

/// What a retain did, summed over the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetainOutcome {
    /// Slots that were valid and are not anymore.
    pub evicted_slots: usize,
    /// Pages returned to the pool.
    pub freed_pages: usize,
    /// K/V rows the compaction moves ([`Step::moves`]).
    pub moved_slots: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum StepState {
    #[default]
    Idle,
    Reserved,
    Retained,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSeq {
    pub(crate) seq: SeqId,
    pub(crate) num_new: usize,
    /// Text position of the first new token.
    pub(crate) position: usize,
    pub(crate) prompt_len: usize,
    pub(crate) prompt_declared: bool,
}

impl StepSeq {
    pub(crate) fn phase(&self) -> Phase {
        let end = self.position + self.num_new;
        if end < self.prompt_len {
            Phase::Prefill
        } else if self.position < self.prompt_len {
            Phase::PromptEnd
        } else {
            Phase::Decode
        }
    }
}

/// What a rollback restores of one (sequence, group).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Undo {
    pub(crate) num_slots: usize,
    pub(crate) num_pages: usize,
    pub(crate) tail_shared: bool,
    pub(crate) copy: Option<PageCopy>,
    pub(crate) sink_shift: usize,
}

/// One step of the protocol: the plans of [`crate::KvCache::reserve`] and
/// [`crate::KvCache::retain`] and the attention-mass buffers in between. See the module docs.
#[derive(Debug, Default)]
pub struct Step {
    pub(crate) state: StepState,
    pub(crate) num_groups: usize,
    pub(crate) seqs: Vec<StepSeq>,
    pub(crate) mappings: Vec<SlotMapping>,
    pub(crate) undo: Vec<Undo>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) rerotations: Vec<Rerotation>,
    pub(crate) rerotation_slots: Vec<u32>,
    /// Per group, `seqs + 1` segment offsets into the mass buffers.
    pub(crate) offsets: Vec<usize>,
    pub(crate) mass: Vec<Vec<f32>>,
    pub(crate) observed_mass: Vec<Vec<f32>>,
    pub(crate) wants_mass: Vec<bool>,
    pub(crate) wants_observed: Vec<bool>,
    pub(crate) needs: Vec<ScoreNeed>,
    pub(crate) sinks: Vec<usize>,
    pub(crate) moves: Vec<SlotMove>,
    pub(crate) keep_words: Vec<u64>,
    pub(crate) keep_ranges: Vec<(usize, GroupId, usize)>,
    pub(crate) scratch: Vec<u32>,
    pub(crate) score_scratch: Vec<GroupScores>,
    pub(crate) outcome: RetainOutcome,
}

impl Step {
    /// An empty step (reuse it for every step of an engine).
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn reset(&mut self, num_groups: usize, batch: usize) {
        self.state = StepState::Idle;
        self.num_groups = num_groups;
        self.seqs.clear();
        if self.mappings.len() < batch {
            self.mappings.resize_with(batch, SlotMapping::new);
        }
        self.undo.clear();
        self.tokens.clear();
        self.rerotations.clear();
        self.rerotation_slots.clear();
        self.offsets.clear();
        self.mass.resize_with(num_groups, Vec::new);
        self.observed_mass.resize_with(num_groups, Vec::new);
        for v in self.mass.iter_mut().chain(self.observed_mass.iter_mut()) {
            v.clear();
        }
        self.wants_mass.clear();
        self.wants_mass.resize(num_groups, false);
        self.wants_observed.clear();
        self.wants_observed.resize(num_groups, false);
        self.needs.clear();
        self.sinks.clear();
        self.moves.clear();
        self.keep_words.clear();
        self.keep_ranges.clear();
        self.outcome = RetainOutcome::default();
    }

    /// Sequences in the step, in batch order.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether the step has no sequence.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The id of sequence `i`.
    pub fn seq(&self, i: usize) -> SeqId {
        self.seqs[i].seq
    }

    /// New tokens of sequence `i` (its query rows).
    pub fn num_new(&self, i: usize) -> usize {
        self.seqs[i].num_new
    }

    /// Text position of sequence `i`'s first new token: its RoPE position (StreamingLLM keeps
    /// text positions for the window and re-rotates only the sinks).
    pub fn position(&self, i: usize) -> usize {
        self.seqs[i].position
    }

    /// The phase of sequence `i` in this step.
    pub fn phase(&self, i: usize) -> Phase {
        self.seqs[i].phase()
    }

    /// Physical slots of sequence `i`'s new tokens in `group`, in order.
    pub fn slots(&self, i: usize, group: GroupId) -> &[u32] {
        self.mappings[i].slots(group)
    }

    /// Logical slot of sequence `i`'s first new token in `group` (the kernels' `q_pos`).
    pub fn q_pos(&self, i: usize, group: GroupId) -> usize {
        self.mappings[i].first_slot(group)
    }

    /// Cache position of sequence `i`'s first new token in `group` (valid tokens before it).
    pub fn cache_position(&self, i: usize, group: GroupId) -> usize {
        self.mappings[i].first_position(group)
    }

    /// Pages to copy, in order, before any write (copy-on-write after a fork).
    pub fn copies(&self) -> impl Iterator<Item = PageCopy> + '_ {
        self.mappings[..self.seqs.len()]
            .iter()
            .flat_map(|m| m.copies().iter().copied())
    }

    /// Sink re-rotations to execute before attention.
    pub fn rerotations(&self) -> &[Rerotation] {
        &self.rerotations
    }

    /// The physical slots of a re-rotation's sinks, sink `j` at index `j`.
    pub fn rerotation_slots(&self, r: &Rerotation) -> &[u32] {
        &self.rerotation_slots[r.slots.clone()]
    }

    /// Rows of sequence `i`'s new tokens that are sinks of `group`: keep their pre-RoPE keys
    /// (by copy) to re-rotate them later.
    pub fn sink_rows(&self, i: usize, group: GroupId) -> Range<usize> {
        let s = &self.seqs[i];
        let sinks = self.sinks.get(group).copied().unwrap_or(0);
        let end = sinks.min(s.position + s.num_new).saturating_sub(s.position);
        0..end
    }

    /// The scores `group` needs.
    pub fn score_need(&self, group: GroupId) -> ScoreNeed {
        self.needs.get(group).copied().unwrap_or_default()
    }

    /// Rows of sequence `i` in SnapKV's observation window of `group` (the prompt's last
    /// `observe` tokens) that this step holds.
    pub fn observe_rows(&self, i: usize, group: GroupId) -> Range<usize> {
        let w = self.score_need(group).observe;
        if w == 0 {
            return 0..0;
        }
        let s = &self.seqs[i];
        let lo = s.prompt_len.saturating_sub(w).max(s.position);
        let hi = s.prompt_len.min(s.position + s.num_new);
        if lo >= hi {
            0..0
        } else {
            lo - s.position..hi - s.position
        }
    }

    /// The buffer every layer reading `group` adds its attention mass of all rows into
    /// (`None` when the group needs none). Segments follow the batch order, one entry per
    /// logical slot of each sequence's table (the kernels' layout).
    pub fn mass_mut(&mut self, group: GroupId) -> Option<&mut [f32]> {
        self.wants_mass
            .get(group)
            .copied()
            .unwrap_or(false)
            .then(|| &mut self.mass[group][..])
    }

    /// The buffer the observation rows' mass of `group` goes into (`None` when no sequence of
    /// the step has observation rows for it).
    pub fn observed_mass_mut(&mut self, group: GroupId) -> Option<&mut [f32]> {
        self.wants_observed
            .get(group)
            .copied()
            .unwrap_or(false)
            .then(|| &mut self.observed_mass[group][..])
    }

    /// Zeroes the mass buffers (before each pass of an iterative prefill, so only the final
    /// pass counts).
    pub fn clear_mass(&mut self) {
        for v in self.mass.iter_mut().chain(self.observed_mass.iter_mut()) {
            v.fill(0.0);
        }
    }

    /// K/V rows to move after retain (gather all sources, then scatter), before the next
    /// reserve.
    pub fn moves(&self) -> &[SlotMove] {
        &self.moves
    }

    /// What the last retain did.
    pub fn outcome(&self) -> RetainOutcome {
        self.outcome
    }
}
