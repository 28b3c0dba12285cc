//! Step protocol 1/3 and its undo: [`Core::reserve`] appends every sequence's new tokens to
//! each group's table (all or nothing across the batch), plans page copies and sink
//! re-rotations into the [`Step`], and records what [`Core::rollback`] restores.
//!
//! The check comes first: the pages the whole batch needs (new pages plus copy-on-write of
//! shared tails) against the pool's available pages; nothing changes on failure. A decode
//! step of one token costs O(groups) with no allocation once the step's buffers have grown.

use crate::error::{Error, Result};
use crate::ids::SeqId;
use crate::pool::BlockPool;
use crate::step::{PageCopy, Rerotation, Step, StepSeq, StepState, Undo};
use crate::table::BlockTable;

use super::sequence::{unpin, State};
use super::Core;

impl Core {
    /// See [`crate::KvCache::reserve`].
    /// `probe`: a probe step, its scored rows and positions
    /// ([`crate::KvCache::reserve_probe`]).
    pub(crate) fn reserve(
        &self,
        st: &mut State,
        batch: &[(SeqId, &[u32])],
        step: &mut Step,
        probe: Option<(usize, std::ops::Range<usize>)>,
    ) -> Result<()> {
        if matches!(step.state, StepState::Reserved | StepState::Retaining) {
            return Err(Error::InvalidConfig(
                "reserve: the previous step was neither retained nor rolled back".into(),
            ));
        }
        let groups = self.num_groups();
        step.reset(groups);
        step.probe = probe.is_some();
        if let Some((rows_from, positions)) = probe {
            step.probe_from = rows_from;
            step.probe_positions = positions;
        }
        if let Err(e) = self.check(st, batch, step) {
            step.seqs.clear();
            return Err(e);
        }
        // Apply: nothing below can fail on a consistent state.
        for (i, &(seq, tokens)) in batch.iter().enumerate() {
            self.append(st, seq, tokens, step)?;
            let s = st.seqs.get_mut(&seq).expect("appended above");
            if s.prompt_len.is_none() && step.seqs[i].position == 0 {
                s.prompt_len = Some(step.seqs[i].prompt_len);
            }
            self.plan_rerotations(s, i, step);
        }
        if self.caching {
            for &(_, tokens) in batch {
                step.tokens.extend_from_slice(tokens);
            }
        }
        step.needs.extend_from_slice(&self.needs);
        step.sinks.extend_from_slice(&self.sinks);
        // Mass buffers: one segment per sequence of its slots in the group, batch order.
        for g in 0..groups {
            let need = self.needs[g];
            let mut total = 0;
            step.offsets.push(0);
            for &(seq, _) in batch {
                total += st.seqs[&seq].table(g).num_slots;
                step.offsets.push(total);
            }
            if need.all_rows() && !step.probe {
                step.mass[g].resize(total, 0.0);
                step.wants_mass[g] = true;
            }
            let observes = if step.probe {
                need.probe
            } else {
                need.observe > 0
            };
            if step.probe && need.probe {
                self.plan_probe_seen(st, batch, g, step);
            }
            if observes && (0..batch.len()).any(|i| !step.observe_rows(i, g).is_empty()) {
                step.observed_mass[g].resize(total, 0.0);
                step.wants_observed[g] = true;
            }
        }
        step.state = StepState::Reserved;
        Ok(())
    }

    /// Checks the batch (changes nothing but `step.seqs`): known and distinct sequences, at
    /// least one token each, pages available. Forks appending in one batch may count one copy
    /// too many: the check stays conservative.
    fn check(&self, st: &State, batch: &[(SeqId, &[u32])], step: &mut Step) -> Result<()> {
        let b = Blocks::new(self.config.block_size);
        let mut needed = 0;
        let mut row_start = 0;
        for (i, &(seq, tokens)) in batch.iter().enumerate() {
            if batch[..i].iter().any(|&(other, _)| other == seq) {
                return Err(Error::InvalidConfig(format!(
                    "sequence {seq} appears twice in one step"
                )));
            }
            let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            if tokens.is_empty() {
                return Err(Error::InvalidConfig(format!(
                    "sequence {seq}: a step needs at least one new token"
                )));
            }
            for t in s.tables() {
                needed += pages_needed(t, tokens.len(), b, &st.pool);
            }
            // The first step of a sequence is its prompt unless one was declared.
            step.seqs.push(StepSeq {
                seq,
                num_new: tokens.len(),
                row_start,
                position: s.num_tokens,
                prompt_len: s.prompt_len.unwrap_or(if s.num_tokens == 0 {
                    tokens.len()
                } else {
                    0
                }),
                prompt_declared: s.prompt_len.is_some(),
            });
            row_start += tokens.len();
        }
        if needed > st.pool.num_available() {
            return Err(Error::PoolExhausted {
                requested: needed,
                available: st.pool.num_available(),
            });
        }
        Ok(())
    }

    /// Appends `tokens` to every table of `seq` (pages checked available), recording the
    /// undo entries and the step's slots, first slots and copies.
    fn append(&self, st: &mut State, seq: SeqId, tokens: &[u32], step: &mut Step) -> Result<()> {
        let bs = self.config.block_size;
        let b = Blocks::new(bs);
        let n = tokens.len();
        let s = st.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let position = s.num_tokens;
        for (g, t) in s.tables_mut().enumerate() {
            step.first_slots.push(t.num_slots);
            let mut undo = Undo {
                num_slots: t.num_slots,
                num_pages: t.pages.len(),
                tail_shared: t.tail_shared,
                copy: None,
                sink_shift: 0,
            };
            if b.offset(t.num_slots) != 0 {
                let last = t.pages.len() - 1;
                let page = t.tail;
                if t.tail_shared && st.pool.refcount(page)? > 1 {
                    // The source stays held (pinned) until the step retains or rolls back.
                    let dst = st.pool.allocate()?;
                    st.pinned.push(page);
                    let copy = PageCopy { src: page, dst };
                    step.copies.push(copy);
                    undo.copy = Some(copy);
                    t.set_page(last, dst);
                }
            }
            // From here on the tail page is this table's alone: a fresh page, a private copy,
            // or a page whose other holders have let go.
            t.tail_shared = false;
            let end = t.num_slots + n;
            while t.pages.len() < b.count(end) {
                t.push_page(st.pool.allocate()?);
            }
            // Physical slots page by page (one division per call, not per token); the tail
            // page comes from `tail`, so a decode step does not read `pages`.
            let slots = &mut step.slots[g];
            let (mut index, mut offset, mut left) =
                (b.index(t.num_slots), b.offset(t.num_slots), n);
            while left > 0 {
                let page = if index + 1 == t.pages.len() {
                    t.tail
                } else {
                    t.pages[index]
                };
                let base = page * bs as u32;
                let take = (bs - offset).min(left);
                slots.extend((offset..offset + take).map(|o| base + o as u32));
                left -= take;
                index += 1;
                offset = 0;
            }
            t.push_slots(n, position);
            step.undo.push(undo);
        }
        s.num_tokens += n;
        if !s.scores.is_empty() {
            for g in 0..self.needs.len() {
                let len = s.table(g).num_slots;
                let (need, sc) = (self.needs[g], &mut s.scores[g]);
                for (wanted, v) in [
                    (need.accumulated, &mut sc.accumulated),
                    (need.last, &mut sc.last),
                    (need.observe > 0, &mut sc.observed),
                ] {
                    if wanted {
                        v.resize(len, 0.0);
                    }
                }
                if need.probe {
                    // Not probed yet: kept by KVzip unless a probe step scores it.
                    sc.probed.resize(len, f32::INFINITY);
                }
            }
        }
        Ok(())
    }

    /// Plans the re-rotation of sequence `i`'s sinks in every group with sinks whose shift
    /// changes: the sinks are the first `sinks` valid slots (compaction may have moved them off
    /// slot 0, never out of order) and sit right before the first kept token after them.
    fn plan_rerotations(&self, s: &mut super::sequence::Sequence, i: usize, step: &mut Step) {
        let groups = self.num_groups();
        for g in 0..groups {
            let sinks = self.sinks[g];
            if sinks == 0 {
                continue;
            }
            let t = s.table(g);
            let mut sinks_end = 0;
            let mut found = 0;
            while found < sinks && sinks_end < t.num_slots {
                found += usize::from(t.is_valid(sinks_end));
                sinks_end += 1;
            }
            let shift = match (sinks_end..t.num_slots).find(|&x| t.is_valid(x)) {
                Some(x) if t.num_valid > sinks => {
                    t.position(x).expect("in range").saturating_sub(sinks)
                }
                _ => 0,
            };
            step.undo[i * groups + g].sink_shift = s.sink_shift[g];
            if shift != s.sink_shift[g] {
                let start = step.rerotation_slots.len();
                let bs = self.config.block_size;
                step.rerotation_slots.extend(
                    (0..sinks_end)
                        .filter(|&x| t.is_valid(x))
                        .map(|x| t.physical_slot(x, bs).expect("in range")),
                );
                step.rerotations.push(Rerotation {
                    index: i,
                    group: g,
                    position: shift,
                    slots: start..step.rerotation_slots.len(),
                });
                s.sink_shift[g] = shift;
            }
        }
    }

    /// See [`crate::Reservation::rollback`].
    /// Fills [`Step::probe_seen`] for group `g` of a reserved probe step.
    fn plan_probe_seen(&self, st: &State, batch: &[(SeqId, &[u32])], g: usize, step: &mut Step) {
        let groups = self.num_groups();
        if step.probe_seen.len() < batch.len() * groups {
            step.probe_seen.resize_with(batch.len() * groups, Vec::new);
        }
        for (i, &(seq, _)) in batch.iter().enumerate() {
            let t = st.seqs[&seq].table(g);
            let before = step.undo[i * groups + g].num_slots;
            let seen = &mut step.probe_seen[i * groups + g];
            seen.clear();
            seen.resize(crate::bits::words_for(t.num_slots), 0);
            let mut sinks = 0;
            for x in 0..t.num_slots {
                if !t.is_valid(x) {
                    continue;
                }
                let sink = sinks < crate::step::PROBE_SINKS;
                sinks += 1;
                let replayed = t
                    .position(x)
                    .is_some_and(|p| step.probe_positions.contains(&p));
                if sink || replayed || x >= before {
                    crate::bits::set(seen, x);
                }
            }
        }
    }

    /// See [`crate::Reservation::finish_probe`]: folds a probe step's mass into the probe
    /// scores of the slots that existed before it (max), before the rollback drops its tokens.
    pub(crate) fn fold_probe(&self, st: &mut State, step: &Step) -> Result<()> {
        if step.state != StepState::Reserved {
            return Err(Error::InvalidConfig(
                "finish_probe: no reserved step to finish".into(),
            ));
        }
        let groups = self.num_groups();
        let n_seqs = step.seqs.len();
        for (i, ss) in step.seqs.iter().enumerate() {
            let s = st
                .seqs
                .get_mut(&ss.seq)
                .ok_or(Error::UnknownSequence(ss.seq))?;
            for g in 0..groups {
                if !(self.needs[g].probe && step.wants_observed[g]) {
                    continue;
                }
                let before = step.undo[i * groups + g].num_slots;
                let lo = step.offsets[g * (n_seqs + 1) + i];
                let mass = &step.observed_mass[g][lo..lo + before];
                let t = if g == 0 { &s.first } else { &s.rest[g - 1] };
                let Some(sc) = s.scores.get_mut(g) else {
                    continue;
                };
                for (x, (p, &m)) in sc.probed[..before].iter_mut().zip(mass).enumerate() {
                    // Only the replayed tokens' own slots: the rest of the prompt draws
                    // attention from every probe by position alone.
                    if t.position(x)
                        .is_some_and(|q| step.probe_positions.contains(&q))
                    {
                        *p = if p.is_finite() { p.max(m) } else { m };
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn rollback(&self, st: &mut State, step: &mut Step) -> Result<()> {
        if step.state != StepState::Reserved {
            return Err(Error::InvalidConfig(
                "rollback: no reserved step to roll back".into(),
            ));
        }
        let groups = self.num_groups();
        for (i, ss) in step.seqs.iter().enumerate() {
            let s = st
                .seqs
                .get_mut(&ss.seq)
                .ok_or(Error::UnknownSequence(ss.seq))?;
            for g in 0..groups {
                let u = step.undo[i * groups + g];
                let t = s.table_mut(g);
                let added = t.num_slots - u.num_slots;
                t.pop_slots(added);
                for &page in &t.pages[u.num_pages..] {
                    st.pool.release(page)?;
                }
                t.truncate_pages(u.num_pages);
                if let Some(c) = u.copy {
                    unpin(&mut st.pinned, c.src);
                    st.pool.release(c.dst)?;
                    let last = t.pages.len() - 1;
                    t.set_page(last, c.src);
                }
                t.tail_shared = u.tail_shared;
                let n = t.num_slots;
                if let Some(sc) = s.scores.get_mut(g) {
                    for v in [
                        &mut sc.accumulated,
                        &mut sc.last,
                        &mut sc.observed,
                        &mut sc.probed,
                    ] {
                        v.truncate(n);
                    }
                }
                if let Some(shift) = s.sink_shift.get_mut(g) {
                    *shift = u.sink_shift;
                }
            }
            s.num_tokens = ss.position;
            if !ss.prompt_declared {
                s.prompt_len = None;
            }
        }
        step.state = StepState::Idle;
        Ok(())
    }
}

/// Slot arithmetic for a power-of-two block size: shifts and masks instead of divisions, which
/// would cost more than the rest of a single-token append.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    size: usize,
    shift: u32,
}

impl Blocks {
    fn new(size: usize) -> Self {
        debug_assert!(size.is_power_of_two());
        Self {
            size,
            shift: size.trailing_zeros(),
        }
    }

    /// Logical page of slot `s`.
    #[inline]
    fn index(self, s: usize) -> usize {
        s >> self.shift
    }

    /// Offset of slot `s` in its page.
    #[inline]
    fn offset(self, s: usize) -> usize {
        s & (self.size - 1)
    }

    /// Pages that hold `n` slots.
    #[inline]
    fn count(self, n: usize) -> usize {
        (n + self.size - 1) >> self.shift
    }
}

/// Pages an append of `n` tokens needs in table `t`.
fn pages_needed(t: &BlockTable, n: usize, b: Blocks, pool: &BlockPool) -> usize {
    if n == 0 {
        return 0;
    }
    let grow = b.count(t.num_slots + n) - t.pages.len();
    let tail = if b.offset(t.num_slots) != 0 {
        usize::from(t.tail_shared && pool.refcount(t.tail).is_ok_and(|rc| rc > 1))
    } else {
        0
    };
    grow + tail
}
