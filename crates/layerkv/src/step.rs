//! [`Step`]: the step protocol any engine drives around its attention kernels so that a
//! policy holds: what to write where, what to re-rotate, which attention mass to hand back,
//! and which K/V rows to move after retention. The library owns the state and the plans; the
//! engine only executes them on its tensors (`layerkv_kernels::StepExecutor` executes every
//! plan on a `KvStore`).
//!
//! One step of a batch of sequences (each with one or more new tokens; prefill chunks and
//! decode tokens mix freely). The rows of the step are the new tokens of every sequence in
//! batch order: sequence `i` owns rows [`Step::rows`]`(i)`.
//!
//! 1. [`crate::KvCache::reserve`] returns a [`crate::Reservation`]: slots for every sequence's
//!    new tokens in every owning group, all or nothing across the batch, and the plans to
//!    execute before attention: page copies for copy-on-write ([`Step::copies`]) and StreamingLLM
//!    sink re-rotations ([`Step::rerotations`]; the sinks' pre-RoPE keys are kept from the rows
//!    [`Step::sink_rows`] names when they are first written).
//! 2. Per layer: owners project K/V, rotate K at the rows' positions ([`Step::position`] + row)
//!    and write K/V at [`Step::group_slots`]; every layer attends over its group's table
//!    ([`crate::CacheReader::view`]), row 0 of sequence `i` at logical slot
//!    [`Step::first_slot`]. Where the group needs scores, every layer reading the group adds its
//!    attention mass into [`Step::mass_mut`], and SnapKV's observation rows
//!    ([`Step::observe_rows`]) run once more into [`Step::observed_mass_mut`]. Hand back the mass
//!    of one real pass only: call [`Step::clear_mass`] before each pass of an iterative prefill.
//! 3. [`crate::Reservation::retain_with`]: each group's retention decides with each sequence's
//!    own [`Phase`] and, when the holes add up to a page, survivors are compacted; the engine
//!    executes [`Step::moves`] (gather, then scatter) inside it, and the emptied pages return
//!    to the pool once the moves ran. ([`crate::Reservation::retain`] returns them at once: then
//!    execute the moves before any other reserve.)
//! 4. On failure between 1 and 3 (the moves included), drop the reservation (or call
//!    [`crate::Reservation::rollback`]): every table, refcount, score and sink shift is restored.
//!
//! A `Step` is reused from step to step: its buffers keep their capacity, so a warmed-up step
//! allocates nothing. Per-step cost is O(new tokens + live slots of the batch), never the
//! length of what has streamed by. See `docs/glossary.md` for slot, position, page and group.

use std::ops::Range;

use crate::cache::GroupScores;
use crate::compact::SlotMove;
use crate::ids::SeqId;
use crate::map::GroupId;
use crate::pool::PageId;
use crate::retention::{Phase, ScoreNeed};
use crate::table::BlockTable;

/// Live slots at the start of a prompt that a probe step's scored rows see beside the replayed
/// chunk ([`Step::probe_seen`]; KVzip's attention sinks).
pub const PROBE_SINKS: usize = 4;

/// A page the engine copies before any write of the step (copy-on-write after a fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCopy {
    /// The shared page to copy from.
    pub src: PageId,
    /// The sequence's new private page.
    pub dst: PageId,
}

/// Re-rotation of one sequence's sinks in one group (StreamingLLM positions inside the cache):
/// write the sinks' keys rotated at positions `position + j` into the slots
/// [`Step::rerotation_slots`] gives, sink `j` at the `j`-th slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerotation {
    /// Index of the sequence in the step's batch.
    pub index: usize,
    /// The group.
    pub group: GroupId,
    /// RoPE position sink 0 is rotated to (the sinks sit right before the first kept token).
    pub position: usize,
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
    /// Retained by [`crate::Reservation::retain_with`], its moves not yet executed: the
    /// tables show the new layout, the pages compaction emptied are still held (pinned) and
    /// [`Step::retain_undo`] can put everything back.
    Retaining,
    Retained,
}

/// What a transactional retain restores of one (sequence, group): the table and scores as
/// they were after reserve.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetainUndo {
    pub(crate) index: usize,
    pub(crate) group: GroupId,
    pub(crate) table: BlockTable,
    pub(crate) scores: GroupScores,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSeq {
    pub(crate) seq: SeqId,
    pub(crate) num_new: usize,
    /// First row of the sequence in the step.
    pub(crate) row_start: usize,
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
/// [`crate::Reservation::retain`] and the attention-mass buffers in between. See the module
/// docs.
#[derive(Debug, Default)]
pub struct Step {
    pub(crate) state: StepState,
    pub(crate) num_groups: usize,
    pub(crate) seqs: Vec<StepSeq>,
    /// Per group: the physical slots of every row, in batch order.
    pub(crate) slots: Vec<Vec<u32>>,
    /// Per (sequence, group), `i * num_groups + g`: the logical slot of the sequence's row 0.
    pub(crate) first_slots: Vec<usize>,
    pub(crate) copies: Vec<PageCopy>,
    pub(crate) undo: Vec<Undo>,
    /// The step's tokens, batch order (prefix caching registers full blocks at retain).
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
    pub(crate) outcome: RetainOutcome,
    /// Transactional retain: the (sequence, group) states it changed, the first
    /// `retain_undo_len` entries (the buffers keep their capacity from step to step).
    pub(crate) retain_undo: Vec<RetainUndo>,
    pub(crate) retain_undo_len: usize,
    /// Transactional retain: pages compaction emptied, held (pinned) until the moves ran.
    pub(crate) held: Vec<PageId>,
    /// A probe step ([`crate::KvCache::reserve_probe`]): scored, then rolled back.
    pub(crate) probe: bool,
    /// A probe step's rows before this one (per sequence) are its prefix: attended, not scored.
    pub(crate) probe_from: usize,
    /// The text positions whose slots a probe step scores (the prompt tokens it replays).
    pub(crate) probe_positions: Range<usize>,
    /// Per (sequence, group), `i * num_groups + g`: the slots a probe step's scored rows see
    /// (empty where the group needs no probe).
    pub(crate) probe_seen: Vec<Vec<u64>>,
}

impl Step {
    /// An empty step (reuse it for every step of an engine).
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn reset(&mut self, num_groups: usize) {
        self.state = StepState::Idle;
        self.num_groups = num_groups;
        self.seqs.clear();
        self.slots.resize_with(num_groups, Vec::new);
        for s in &mut self.slots {
            s.clear();
        }
        self.first_slots.clear();
        self.copies.clear();
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
        self.outcome = RetainOutcome::default();
        self.retain_undo_len = 0;
        self.held.clear();
        self.probe = false;
        self.probe_from = 0;
        self.probe_positions = 0..0;
        for v in &mut self.probe_seen {
            v.clear();
        }
    }

    /// Sequences in the step, in batch order.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether this is a probe step ([`crate::KvCache::reserve_probe`]): its tokens are
    /// attended, then rolled back by [`crate::Reservation::finish_probe`], never retained. Its
    /// scored rows ([`Step::observe_rows`]) run into [`Step::observed_mass_mut`].
    pub fn is_probe(&self) -> bool {
        self.probe
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

    /// Rows of the step (new tokens of every sequence).
    pub fn num_rows(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.row_start + s.num_new)
    }

    /// The rows of sequence `i` among the step's rows.
    pub fn rows(&self, i: usize) -> Range<usize> {
        let s = &self.seqs[i];
        s.row_start..s.row_start + s.num_new
    }

    /// Physical slots of sequence `i`'s new tokens in `group`, in order.
    pub fn slots(&self, i: usize, group: GroupId) -> &[u32] {
        &self.slots[group][self.rows(i)]
    }

    /// Physical slots of every row in `group`, in batch order (where an owner layer writes the
    /// step's K/V).
    pub fn group_slots(&self, group: GroupId) -> &[u32] {
        &self.slots[group]
    }

    /// Logical slot of sequence `i`'s row 0 in `group`: row `r` sits at `first_slot + r` (the
    /// kernels' [`crate::TableView`] numbering).
    pub fn first_slot(&self, i: usize, group: GroupId) -> usize {
        self.first_slots[i * self.num_groups + group]
    }

    /// Pages to copy, in order, before any write (copy-on-write after a fork).
    pub fn copies(&self) -> &[PageCopy] {
        &self.copies
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
    /// `observe` tokens) that this step holds; in a probe step, the rows it scores (those
    /// after its prefix) in a group whose retention needs probes.
    pub fn observe_rows(&self, i: usize, group: GroupId) -> Range<usize> {
        if self.probe {
            let n = self.seqs[i].num_new;
            return if self.score_need(group).probe {
                self.probe_from.min(n)..n
            } else {
                0..0
            };
        }
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

    /// In a probe step, the validity bitset over sequence `i`'s slots in `group` that the scored
    /// rows attend to ([`Step::observe_rows`]): the first [`PROBE_SINKS`] live slots, the
    /// replayed tokens' own slots and the probe's new slots, as KVzip scores a chunk (so a
    /// chunk far from the probe competes with no other part of the prompt for the rows'
    /// attention). `None` outside probe steps or where the group needs no probe.
    pub fn probe_seen(&self, i: usize, group: GroupId) -> Option<&[u64]> {
        self.probe_seen
            .get(i * self.num_groups + group)
            .filter(|v| self.probe && !v.is_empty())
            .map(|v| &v[..])
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
