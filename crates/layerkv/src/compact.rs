//! Compaction: turning evicted token slots into freed pages.
//!
//! After a retention decision a table may hold pages without a valid slot (a window moved past
//! them) and scattered holes (score-based eviction). [`Compactor`] plans the table's new layout:
//! empty pages are dropped (no data moves), then, while the holes add up to at least a page, the
//! shortest run of adjacent pages whose holes reach a page is repacked into one page fewer,
//! packing its survivors towards the run's start or its end, whichever moves fewer slots (for
//! sinks + window that moves the few sinks into the window's first page instead of moving the
//! window). Survivors keep their order and their stored rotation. The invariant after every
//! decision: fewer than `block_size` holes, so a group holds at most one page more than its
//! live tokens need.
//!
//! Pages held by another table too (after a fork) never receive moved data. The plan is a list
//! of physical moves from each survivor's old slot to its final slot, to be executed with a
//! gather then a scatter (sources and destinations may overlap), before the next append reuses
//! a freed page. Cost O(slots of the table) per change; nothing is allocated once the scratch
//! buffers have grown.

use crate::bits;
use crate::pool::PageId;
use crate::table::BlockTable;

const NONE: u32 = u32::MAX;

/// A K/V row move of the compaction plan: physical slot `src` to physical slot `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMove {
    /// Physical slot the survivor is read from.
    pub src: u32,
    /// Physical slot it is written to.
    pub dst: u32,
}

/// Reusable scratch for planning and applying a table's new layout.
#[derive(Debug, Default, Clone)]
pub(crate) struct Compactor {
    /// New logical slot -> old logical slot (`NONE`: a hole).
    entries: Vec<u32>,
    pages: Vec<PageId>,
    shared: Vec<bool>,
    holes: Vec<usize>,
    tmp: Vec<u32>,
    old_positions: Vec<u32>,
    old_scores: Vec<f32>,
    /// Pages the last plan dropped (the caller releases them).
    pub(crate) freed: Vec<PageId>,
}

impl Compactor {
    /// Plans a new layout for `t` (materialised). Returns `false`, planning nothing, when no
    /// page is empty and the holes add up to less than a page.
    pub(crate) fn plan(
        &mut self,
        t: &BlockTable,
        bs: usize,
        is_shared: impl Fn(PageId) -> bool,
    ) -> bool {
        debug_assert!(t.bitset);
        let n = t.num_slots;
        let holes = n - t.num_valid;
        let any_empty = (0..t.pages.len()).any(|i| t.valid_in_page(i, bs) == 0);
        if !any_empty && holes < bs {
            return false;
        }
        self.entries.clear();
        self.pages.clear();
        self.shared.clear();
        self.freed.clear();
        for (i, &page) in t.pages.iter().enumerate() {
            let (lo, hi) = (i * bs, ((i + 1) * bs).min(n));
            if bits::count_range(&t.valid, lo, hi) == 0 {
                self.freed.push(page);
                continue;
            }
            self.pages.push(page);
            self.shared.push(is_shared(page));
            self.entries.extend((lo..lo + bs).map(|s| {
                if s < hi && bits::get(&t.valid, s) {
                    s as u32
                } else {
                    NONE
                }
            }));
        }
        self.trim(bs);
        while let Some((a, b)) = self.shortest_run(bs) {
            self.repack(a, b, bs);
            self.trim(bs);
        }
        true
    }

    /// Logical slots of the planned layout.
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops trailing holes (slots past the last survivor become unfilled capacity) and the
    /// pages left without an entry.
    fn trim(&mut self, bs: usize) {
        while self.entries.last() == Some(&NONE) {
            self.entries.pop();
        }
        while self.pages.len() > self.entries.len().div_ceil(bs) {
            let p = self.pages.pop().expect("more pages than the entries need");
            self.shared.pop();
            self.freed.push(p);
        }
    }

    /// Holes per planned page (the last page counts only up to the last survivor); the shortest
    /// run of adjacent private pages whose holes reach `bs`.
    fn shortest_run(&mut self, bs: usize) -> Option<(usize, usize)> {
        let n = self.len();
        self.holes.clear();
        for i in 0..self.pages.len() {
            let (lo, hi) = (i * bs, ((i + 1) * bs).min(n));
            let h = if lo >= hi {
                0
            } else {
                self.entries[lo..hi].iter().filter(|&&e| e == NONE).count()
            };
            self.holes.push(h);
        }
        if self.holes.iter().sum::<usize>() < bs {
            return None;
        }
        let mut best: Option<(usize, usize)> = None;
        let mut a = 0;
        let mut sum = 0;
        for b in 0..self.pages.len() {
            if self.shared[b] {
                a = b + 1;
                sum = 0;
                continue;
            }
            sum += self.holes[b];
            while a < b && sum - self.holes[a] >= bs {
                sum -= self.holes[a];
                a += 1;
            }
            if sum >= bs && best.is_none_or(|(x, y)| b - a < y - x) {
                best = Some((a, b));
            }
        }
        best
    }

    /// Repacks pages `a..=b` into one page fewer, towards the run's start (freeing page `b`) or
    /// its end (freeing page `a`), whichever moves fewer survivors.
    fn repack(&mut self, a: usize, b: usize, bs: usize) {
        let lo = a * bs;
        let hi = ((b + 1) * bs).min(self.len());
        let run = &self.entries[lo..hi];
        let first_hole = run.iter().position(|&e| e == NONE).unwrap_or(run.len());
        let last_hole = run.iter().rposition(|&e| e == NONE).unwrap_or(0);
        let left_moves = run[first_hole..].iter().filter(|&&e| e != NONE).count();
        let right_moves = run[..last_hole].iter().filter(|&&e| e != NONE).count();
        self.tmp.clear();
        self.tmp.extend(run.iter().copied().filter(|&e| e != NONE));
        let survivors = self.tmp.len();
        let span = hi - lo;
        let region = &mut self.entries[lo..hi];
        region.fill(NONE);
        if left_moves <= right_moves {
            region[..survivors].copy_from_slice(&self.tmp);
            // Page b's entries (now holes or the run's tail) leave; later pages shift down.
            let page_lo = b * bs;
            let page_hi = ((b + 1) * bs).min(self.entries.len());
            // Survivors fit in pages a..b, so page b's entries are all holes.
            debug_assert!(self.entries[page_lo..page_hi].iter().all(|&e| e == NONE));
            self.entries.drain(page_lo..page_hi);
            let p = self.pages.remove(b);
            self.shared.remove(b);
            self.freed.push(p);
        } else {
            region[span - survivors..].copy_from_slice(&self.tmp);
            let page_hi = (a + 1) * bs;
            debug_assert!(self.entries[lo..page_hi].iter().all(|&e| e == NONE));
            self.entries.drain(lo..page_hi);
            let p = self.pages.remove(a);
            self.shared.remove(a);
            self.freed.push(p);
        }
    }

    /// Rewrites `t` to the planned layout and pushes the moves the data needs onto `moves`.
    /// `scores` are per-slot buffers of the table (same length as its slots, or empty when
    /// unused), permuted alike.
    pub(crate) fn apply(
        &mut self,
        t: &mut BlockTable,
        bs: usize,
        scores: &mut [&mut Vec<f32>],
        moves: &mut Vec<SlotMove>,
    ) {
        let old_phys = |t: &BlockTable, s: usize| t.pages[s / bs] * bs as u32 + (s % bs) as u32;
        let new_n = self.entries.len();
        // Moves first, while the old page list is still in `t`.
        for (x, &o) in self.entries.iter().enumerate() {
            if o == NONE {
                continue;
            }
            let dst = self.pages[x / bs] * bs as u32 + (x % bs) as u32;
            let src = old_phys(t, o as usize);
            if src != dst {
                moves.push(SlotMove { src, dst });
            }
        }
        self.old_positions.clear();
        self.old_positions.extend_from_slice(&t.positions);
        t.positions.clear();
        t.positions.extend(self.entries.iter().map(|&o| {
            if o == NONE {
                0
            } else {
                self.old_positions[o as usize]
            }
        }));
        for buf in scores.iter_mut().filter(|b| !b.is_empty()) {
            self.old_scores.clear();
            self.old_scores.extend_from_slice(buf);
            buf.clear();
            buf.extend(self.entries.iter().map(|&o| {
                if o == NONE {
                    0.0
                } else {
                    self.old_scores[o as usize]
                }
            }));
        }
        t.valid.clear();
        t.valid.resize(bits::words_for(new_n), 0);
        for (x, &o) in self.entries.iter().enumerate() {
            if o != NONE {
                bits::set(&mut t.valid, x);
            }
        }
        t.num_slots = new_n;
        t.pages.clear();
        t.pages.extend_from_slice(&self.pages);
        t.tail = t.pages.last().copied().unwrap_or(crate::pool::NULL_PAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of `pages` (ids 10, 11, ...) of block size 4 with the given valid slots.
    fn table(num_slots: usize, valid: &[usize]) -> BlockTable {
        let bs = 4;
        let mut t = BlockTable::default();
        for i in 0..num_slots.div_ceil(bs) {
            t.push_page(10 + i as u32);
        }
        t.push_slots(num_slots, 0);
        t.materialise();
        t.valid.fill(0);
        for &s in valid {
            bits::set(&mut t.valid, s);
        }
        t.num_valid = valid.len();
        t
    }

    fn run(t: &mut BlockTable, shared: &[PageId]) -> (Vec<SlotMove>, Vec<PageId>) {
        let mut c = Compactor::default();
        let mut moves = Vec::new();
        if c.plan(t, 4, |p| shared.contains(&p)) {
            let mut s = (0..t.num_slots).map(|x| x as f32).collect::<Vec<_>>();
            c.apply(t, 4, &mut [&mut s], &mut moves);
            // Scores follow their slots: a survivor's score is its old logical index.
            for (x, score) in s.iter().enumerate() {
                if t.is_valid(x) {
                    assert_eq!(*score as u32, t.positions[x]);
                }
            }
        }
        (moves, c.freed)
    }

    #[test]
    fn empty_pages_leave_without_moves() {
        // Pages 10 [0..4) and 11 [4..8) empty, 12 holds 8..12.
        let mut t = table(12, &[8, 9, 10, 11]);
        let (moves, freed) = run(&mut t, &[]);
        assert!(moves.is_empty());
        assert_eq!(freed, vec![10, 11]);
        assert_eq!(t.pages, vec![12]);
        assert_eq!(t.num_slots, 4);
        assert_eq!(t.positions, vec![8, 9, 10, 11]);
    }

    #[test]
    fn sinks_move_into_the_window_page() {
        // Sink 0 on page 10 (3 holes); page 11 has 1 evicted slot then the window.
        let mut t = table(12, &[0, 5, 6, 7, 8, 9, 10, 11]);
        let (moves, freed) = run(&mut t, &[]);
        // Right-packing moves the sink (left-packing would move three window tokens).
        assert_eq!(moves, vec![SlotMove { src: 40, dst: 44 }]);
        assert_eq!(freed, vec![10]);
        assert_eq!(t.pages, vec![11, 12]);
        assert_eq!(t.num_valid, 8);
        let kept: Vec<u32> = (0..t.num_slots)
            .filter(|&x| t.is_valid(x))
            .map(|x| t.positions[x])
            .collect();
        assert_eq!(kept, vec![0, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(t.num_slots, t.num_valid);
    }

    #[test]
    fn scattered_holes_compact_to_one_page_of_slack() {
        let valid: Vec<usize> = (0..40).filter(|s| s % 3 != 1).collect();
        let mut t = table(40, &valid);
        let (moves, freed) = run(&mut t, &[]);
        assert!(!moves.is_empty() && !freed.is_empty());
        assert!(
            t.num_slots - t.num_valid < 4,
            "{} holes",
            t.num_slots - t.num_valid
        );
        assert!(t.pages.len() <= valid.len().div_ceil(4) + 1);
        let kept: Vec<u32> = (0..t.num_slots)
            .filter(|&x| t.is_valid(x))
            .map(|x| t.positions[x])
            .collect();
        assert_eq!(kept, valid.iter().map(|&s| s as u32).collect::<Vec<_>>());
        // Every destination is a kept page, every source an old one; no destination twice.
        let mut dsts: Vec<u32> = moves.iter().map(|m| m.dst).collect();
        dsts.sort_unstable();
        dsts.dedup();
        assert_eq!(dsts.len(), moves.len());
        assert!(moves.iter().all(|m| t.pages.contains(&(m.dst / 4))));
    }

    #[test]
    fn shared_pages_receive_nothing() {
        let valid: Vec<usize> = (0..16).filter(|s| s % 2 == 0).collect();
        let mut t = table(16, &valid);
        let (moves, _) = run(&mut t, &[10, 11, 12, 13]);
        assert!(moves.is_empty());
        assert_eq!(t.pages.len(), 4);
    }
}
