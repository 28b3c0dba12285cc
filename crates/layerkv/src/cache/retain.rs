//! Step protocol 3/3: [`Core::retain`] folds the step's attention mass into each group's
//! scores, asks each group's retention which slots stay (per sequence, with its own phase),
//! returns emptied pages to the pool and plans compaction moves into the [`Step`].
//!
//! Two phases: the first decides into [`RetainScratch`] and changes nothing (an error leaves
//! the step reserved, so it can still be rolled back); the second installs the decisions and
//! cannot fail on a consistent state. Cost O(live slots of the batch).
//!
//! A transactional retain ([`crate::Reservation::retain_with`]) also copies each decided
//! (sequence, group)'s table and scores into the step and holds the pages compaction empties
//! (pinned, as copy-on-write sources are) until the engine has executed the moves:
//! [`Core::commit`] then lets them go, and [`Core::abort`] puts the copies back and rolls the
//! reservation back, so a failure while moving changes nothing. The copies cost
//! O(live slots) of memcpy, the same order as the decision itself.

use crate::bits;
use crate::error::{Error, Result};
use crate::retention::{RetainInput, Scores};
use crate::step::{RetainOutcome, Step, StepState};

use super::scores::GroupScores;
use super::sequence::{unpin, State};
use super::Core;

impl Core {
    /// AdaKV: replaces the per-lane decisions just made for sequence `s` from scratch entry
    /// `first` on (the lanes of one group, or of every group under
    /// [`crate::LayerKvPolicy::adaptive_across_layers`]) with one joint decision, where their
    /// retention has one at this phase ([`crate::Retention::select_joint`]); the window and
    /// validity masks are applied again after it.
    fn decide_jointly(
        &self,
        rs: &mut super::scratch::RetainScratch,
        s: &super::sequence::Sequence,
        first: usize,
        floor: f64,
        phase: crate::retention::Phase,
    ) {
        let lanes = self.config.lanes;
        let tables = rs.keep_ranges[first..].iter().map(|&(_, t, _)| t);
        let group = rs.keep_ranges[first].1 / lanes;
        let retention = self.policy.retention(group);
        if !retention.has_joint_form(phase) {
            // Nothing to decide jointly (decode steps): gather nothing, allocate nothing.
            return;
        }
        let shared = tables.clone().all(|t| {
            // Heads with roles of their own do not share the budget.
            self.policy.lane_retention(t / lanes, t % lanes) == retention
        });
        if !shared {
            return;
        }
        let start = rs.keep_ranges[first].2;
        let mut words = &mut rs.keep_words[start..];
        let mut joint = Vec::with_capacity(rs.keep_ranges.len() - first);
        let probes = retention.joint_reads_probes();
        for (pair, &(_, table, _)) in rs.keep_ranges[first..].iter().enumerate() {
            let t = s.table(table);
            let n = t.num_slots;
            let (keep, rest) = std::mem::take(&mut words).split_at_mut(bits::words_for(n));
            words = rest;
            joint.push(crate::retention::JointLane {
                num_slots: n,
                valid: &t.valid,
                scores: if probes {
                    &rs.scores[first + pair].probed
                } else {
                    &rs.scores[first + pair].observed
                },
                keep,
            });
        }
        if !retention.select_joint(&mut joint, s.num_tokens, phase, floor, &mut rs.joint) {
            // No joint form here: the per-lane decisions stand.
            return;
        }
        for (lane, table) in joint.into_iter().zip(tables) {
            if let Some(w) = self.windows[table] {
                let cut = lane.num_slots.saturating_sub(w.saturating_sub(1));
                for x in 0..cut {
                    bits::clear(lane.keep, x);
                }
            }
            for (k, v) in lane.keep.iter_mut().zip(lane.valid) {
                *k &= v;
            }
        }
    }

    /// See [`crate::Reservation::retain`].
    pub(crate) fn retain(
        &self,
        st: &mut State,
        step: &mut Step,
        transactional: bool,
    ) -> Result<RetainOutcome> {
        if step.state != StepState::Reserved {
            return Err(Error::InvalidConfig(
                "retain: no reserved step (call reserve first, once per step)".into(),
            ));
        }
        if step.probe {
            return Err(Error::InvalidConfig(
                "retain: a probe step is never kept (end it with Reservation::finish_probe)".into(),
            ));
        }
        let groups = self.num_groups();
        let bs = self.config.block_size;
        step.moves.clear();
        let State {
            pool,
            seqs,
            compactor,
            scratch: rs,
            pinned,
        } = st;
        rs.keep_words.clear();
        rs.keep_ranges.clear();
        step.retain_undo_len = 0;
        step.held.clear();
        // Phase 1 (fallible, changes nothing): fold the step's mass into scratch copies of the
        // scores and decide what every (sequence, group) keeps.
        let lanes = self.config.lanes;
        let floor = self.policy.adaptive_floor();
        let across_layers = self.policy.adaptive_across_layers();
        for (i, ss) in step.seqs.iter().enumerate() {
            let s = seqs
                .get_mut(&ss.seq)
                .ok_or(Error::UnknownSequence(ss.seq))?;
            let phase = ss.phase();
            let seq_first = rs.keep_ranges.len();
            for g in 0..groups {
                if !self.evicts[g] {
                    continue;
                }
                if transactional {
                    // Before `materialise`, so an abort restores the exact representation.
                    let k = step.retain_undo_len;
                    if step.retain_undo.len() <= k {
                        step.retain_undo.push(Default::default());
                    }
                    let u = &mut step.retain_undo[k];
                    u.index = i;
                    u.group = g;
                    u.table.clone_from(s.table(g));
                    match s.scores.get(g) {
                        Some(sc) => u.scores.clone_from(sc),
                        None => {
                            u.scores.accumulated.clear();
                            u.scores.last.clear();
                            u.scores.observed.clear();
                            u.scores.probed.clear();
                        }
                    }
                    step.retain_undo_len += 1;
                }
                let t = s.table_mut(g);
                t.materialise();
                let n = t.num_slots;
                let lo = step.offsets[g * (step.seqs.len() + 1) + i];
                let seg = lo..lo + n;
                let need = self.needs[g];
                let pair = rs.keep_ranges.len();
                if rs.scores.len() <= pair {
                    rs.scores.push(GroupScores::default());
                }
                let scratch = &mut rs.scores[pair];
                let sc = s.scores.get(g);
                fold(
                    &mut scratch.accumulated,
                    need.accumulated,
                    sc.map(|x| &x.accumulated[..]),
                    step.wants_mass[g].then(|| &step.mass[g][seg.clone()]),
                );
                fold(
                    &mut scratch.last,
                    need.last,
                    None,
                    step.wants_mass[g].then(|| &step.mass[g][seg.clone()]),
                );
                fold(
                    &mut scratch.observed,
                    need.observe > 0,
                    sc.map(|x| &x.observed[..]),
                    step.wants_observed[g].then(|| &step.observed_mass[g][seg.clone()]),
                );
                fold(
                    &mut scratch.probed,
                    need.probe,
                    sc.map(|x| &x.probed[..]),
                    None,
                );
                let words = bits::words_for(n);
                let start = rs.keep_words.len();
                rs.keep_words.resize(start + words, 0);
                let keep = &mut rs.keep_words[start..];
                let retention = self.retention(g);
                let t = s.table(g);
                if !retention.is_full() {
                    let input = RetainInput {
                        num_slots: n,
                        num_tokens: s.num_tokens,
                        valid: &t.valid,
                        positions: &t.positions,
                        scores: Scores {
                            accumulated: need.accumulated.then_some(&scratch.accumulated[..]),
                            last: need.last.then_some(&scratch.last[..]),
                            observed: (need.observe > 0).then_some(&scratch.observed[..]),
                            probed: need.probe.then_some(&scratch.probed[..]),
                        },
                        phase,
                    };
                    retention.select(&input, keep, &mut rs.rule)?;
                } else {
                    keep.copy_from_slice(&t.valid[..words]);
                }
                if let Some(w) = self.windows[g] {
                    // No reader looks further back than `w - 1` slots from the next token.
                    let cut = n.saturating_sub(w.saturating_sub(1));
                    for x in 0..cut {
                        bits::clear(keep, x);
                    }
                }
                for (k, v) in keep.iter_mut().zip(&t.valid) {
                    *k &= v;
                }
                rs.keep_ranges.push((i, g, start));
                if let Some(floor) = floor.filter(|_| lanes > 1 && !across_layers) {
                    // Only when every lane of the group decided: a lane that keeps everything
                    // (a head role) has no entry, and its group no joint decision.
                    let n = rs.keep_ranges.len();
                    let last_lane = g % lanes == lanes - 1;
                    let whole = last_lane
                        && n >= lanes
                        && matches!(rs.keep_ranges[n - lanes], (si, t, _) if si == i && t + lanes == g + 1);
                    if whole {
                        self.decide_jointly(rs, s, n - lanes, floor, phase);
                    }
                }
            }
            if let Some(floor) = floor.filter(|_| across_layers) {
                if rs.keep_ranges.len() > seq_first {
                    self.decide_jointly(rs, s, seq_first, floor, phase);
                }
            }
        }
        // Phase 2 (cannot fail on a consistent state): install scores, clear dropped slots,
        // free and compact pages.
        let mut outcome = RetainOutcome::default();
        for (pair, &(i, g, start)) in rs.keep_ranges.iter().enumerate() {
            let ss = &step.seqs[i];
            let s = seqs.get_mut(&ss.seq).expect("checked in phase 1");
            if let Some(sc) = s.scores.get_mut(g) {
                let scratch = &mut rs.scores[pair];
                std::mem::swap(&mut sc.accumulated, &mut scratch.accumulated);
                std::mem::swap(&mut sc.last, &mut scratch.last);
                std::mem::swap(&mut sc.observed, &mut scratch.observed);
                std::mem::swap(&mut sc.probed, &mut scratch.probed);
            }
            let t = s.table_mut(g);
            let words = bits::words_for(t.num_slots);
            let keep = &rs.keep_words[start..start + words];
            let mut dropped = 0;
            for (v, &k) in t.valid.iter_mut().zip(keep) {
                dropped += (*v & !k).count_ones() as usize;
                *v &= k;
            }
            t.num_valid -= dropped;
            outcome.evicted_slots += dropped;
            let t = s.table(g);
            if compactor.plan(t, bs, |p| pool.refcount(p).is_ok_and(|rc| rc > 1)) {
                let before = step.moves.len();
                let t = if g == 0 {
                    &mut s.first
                } else {
                    &mut s.rest[g - 1]
                };
                match s.scores.get_mut(g) {
                    Some(sc) => compactor.apply(
                        t,
                        bs,
                        &mut [
                            &mut sc.accumulated,
                            &mut sc.last,
                            &mut sc.observed,
                            &mut sc.probed,
                        ],
                        &mut step.moves,
                    ),
                    None => compactor.apply(t, bs, &mut [], &mut step.moves),
                }
                if transactional {
                    // Held until the moves ran: nothing else may reuse them before.
                    pinned.extend_from_slice(&compactor.freed);
                    step.held.extend_from_slice(&compactor.freed);
                } else {
                    for &p in &compactor.freed {
                        pool.release(p)?;
                    }
                }
                outcome.freed_pages += compactor.freed.len();
                outcome.moved_slots += step.moves.len() - before;
            }
        }
        step.outcome = outcome;
        step.state = StepState::Retaining;
        if !transactional {
            self.commit(st, step)?;
        }
        Ok(outcome)
    }

    /// Commits a retained step whose moves have run: releases the pages compaction emptied
    /// and the copy-on-write sources, and registers the step's full blocks for prefix
    /// caching.
    pub(crate) fn commit(&self, st: &mut State, step: &mut Step) -> Result<()> {
        if step.state != StepState::Retaining {
            return Err(Error::InvalidConfig(
                "commit: no retained step to commit".into(),
            ));
        }
        let State {
            pool, seqs, pinned, ..
        } = st;
        for &p in &step.held {
            unpin(pinned, p);
            pool.release(p)?;
        }
        step.held.clear();
        if self.caching {
            let mut off = 0;
            for ss in &step.seqs {
                let s = seqs.get_mut(&ss.seq).expect("in the step");
                let tokens = &step.tokens[off..off + ss.num_new];
                off += ss.num_new;
                self.register_full_blocks(pool, s, tokens)?;
            }
        }
        // The copy-on-write sources this step held: the step is committed, so let go.
        for u in &step.undo {
            if let Some(c) = u.copy {
                unpin(pinned, c.src);
                pool.release(c.src)?;
            }
        }
        step.retain_undo_len = 0;
        step.state = StepState::Retained;
        Ok(())
    }

    /// Undoes a transactional retain whose moves failed (the tables, scores and held pages as
    /// after reserve), then rolls the reservation back.
    pub(crate) fn abort(&self, st: &mut State, step: &mut Step) -> Result<()> {
        if step.state != StepState::Retaining {
            return Err(Error::InvalidConfig(
                "abort: no retained step to abort".into(),
            ));
        }
        for k in 0..step.retain_undo_len {
            let u = &mut step.retain_undo[k];
            let seq = step.seqs[u.index].seq;
            let s = st.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
            std::mem::swap(s.table_mut(u.group), &mut u.table);
            if let Some(sc) = s.scores.get_mut(u.group) {
                std::mem::swap(sc, &mut u.scores);
            }
        }
        step.retain_undo_len = 0;
        // The emptied pages are back in the restored tables, which still hold their reference.
        for &p in &step.held {
            unpin(&mut st.pinned, p);
        }
        step.held.clear();
        step.moves.clear();
        step.outcome = RetainOutcome::default();
        step.state = StepState::Reserved;
        self.rollback(st, step)
    }
}

/// `dst = old + mass` for one score kind, `dst = mass` when there is no `old` (the latest
/// step's mass), `dst = old` without mass; leaves `dst` empty when the kind is not `needed`.
fn fold(dst: &mut Vec<f32>, needed: bool, old: Option<&[f32]>, mass: Option<&[f32]>) {
    dst.clear();
    if !needed {
        return;
    }
    match (old, mass) {
        (Some(o), Some(m)) => dst.extend(o.iter().zip(m).map(|(a, b)| a + b)),
        (Some(o), None) => dst.extend_from_slice(o),
        (None, Some(m)) => dst.extend_from_slice(m),
        (None, None) => {}
    }
}
