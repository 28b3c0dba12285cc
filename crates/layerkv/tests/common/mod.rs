//! Checks shared by the invariant and soak tests, written against the public API only:
//!
//! - [`recount`]: pool conservation recounted from every sequence's tables (distinct pages,
//!   holders per page, no page in two groups or twice in one table) and compared with the
//!   pool's counters, which the pool keeps on its own (`num_used` is not `total - free -
//!   cached`);
//! - [`Shadow`]: a stand-in for the engine's K/V store that executes what the step protocol
//!   tells an engine to execute (page copies, writes at the reserved slots, compaction moves)
//!   and remembers, per physical slot, which token of which text position of which group was
//!   written there. [`Shadow::check`] then asserts that every valid slot of a sequence holds
//!   that sequence's own token at the slot's text position: a table pointing at another
//!   sequence's page, a copy or a move planned wrong, a prefix hit on the wrong page all fail
//!   it, while the refcounts may still balance.
//!
//! (`dead_code`: each test binary uses its own part.)
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use layerkv::{CacheReader, KvCache, PageId, SeqId, Step, NULL_PAGE};

/// What [`recount`] found in the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recount {
    /// Distinct pages the tables hold (must equal the pool's `num_used`).
    pub distinct_pages: usize,
    /// Page holdings summed over tables (a page shared by a fork counts once per table).
    pub holdings: usize,
}

/// Recounts pool conservation from the tables of `live`, which must list every registered
/// sequence, under one read lock, and compares it with the pool's own counters:
/// `num_used == distinct pages held`, `num_free + num_cached == total - used`,
/// `used <= peak_used <= total`; every page id in range and not null, no page twice in one
/// table, no page in two groups. (Refcount == holders per page is `check_invariants`' part:
/// refcounts are not public.)
pub fn recount(cache: &KvCache, live: &[SeqId]) -> Result<Recount, String> {
    let groups = cache.policy().layer_map().num_groups();
    let num_pages = cache.config().num_pages;
    let r = cache.read();
    let stats = r.pool_stats();
    // Page -> (its group, tables holding it).
    let mut holders: HashMap<PageId, (usize, u32)> = HashMap::new();
    let mut in_table = HashSet::new();
    let mut holdings = 0;
    for &seq in live {
        for g in 0..groups {
            let t = r
                .table(seq, g)
                .map_err(|e| format!("seq {seq} group {g}: {e}"))?;
            in_table.clear();
            for (i, &p) in t.pages().iter().enumerate() {
                if p == NULL_PAGE || p as usize >= num_pages {
                    return Err(format!("seq {seq} group {g}: page {i} is {p}"));
                }
                if !in_table.insert(p) {
                    return Err(format!("seq {seq} group {g}: page {p} twice in one table"));
                }
                let h = holders.entry(p).or_insert((g, 0));
                if h.0 != g {
                    return Err(format!("page {p} is in group {} and group {g}", h.0));
                }
                h.1 += 1;
                holdings += 1;
            }
        }
    }
    // Copy-on-write sources that reserved steps hold until they retain or roll back.
    for &p in r.pinned_pages() {
        holders.entry(p).or_insert((usize::MAX, 0));
    }
    let used = holders.len();
    if stats.num_pages != num_pages || stats.num_used != used {
        return Err(format!(
            "tables and reserved steps hold {used} distinct pages of {num_pages}; pool says {} \
             used of {}",
            stats.num_used, stats.num_pages
        ));
    }
    if stats.num_free + stats.num_cached + used != num_pages {
        return Err(format!(
            "{} free + {} cached + {used} held by tables != {num_pages}",
            stats.num_free, stats.num_cached
        ));
    }
    if stats.peak_used < used || stats.peak_used > num_pages {
        return Err(format!(
            "peak {} outside [{used} held, {num_pages}]",
            stats.peak_used
        ));
    }
    Ok(Recount {
        distinct_pages: used,
        holdings,
    })
}

/// The K/V store as the step protocol drives it, one word per physical slot (see the module
/// docs). Slots are atomics so that threads write their own pages without a lock; checks run
/// while no thread is inside a step.
pub struct Shadow {
    block_size: usize,
    slots: Vec<AtomicU64>,
}

/// Never a written word: [`Shadow::content`] sets bit 63.
const UNWRITTEN: u64 = 0;

impl Shadow {
    /// A store of `num_pages` pages of `block_size` slots, nothing written.
    pub fn new(num_pages: usize, block_size: usize) -> Self {
        Self {
            block_size,
            slots: (0..num_pages * block_size)
                .map(|_| AtomicU64::new(UNWRITTEN))
                .collect(),
        }
    }

    /// The word for `token` at text `position` in `group`.
    pub fn content(token: u32, position: usize, group: usize) -> u64 {
        1 << 63 | u64::from(token) << 24 | (position as u64 & 0xf_ffff) << 4 | group as u64 & 0xf
    }

    fn copy_page(&self, src: PageId, dst: PageId) {
        let bs = self.block_size;
        for o in 0..bs {
            let v = self.slots[src as usize * bs + o].load(Ordering::Relaxed);
            self.slots[dst as usize * bs + o].store(v, Ordering::Relaxed);
        }
    }

    /// What an engine executes after a reserve: the copy-on-write page copies, then the new
    /// tokens' K/V at the reserved slots of every group. `batch` is the reserved batch.
    pub fn write_step(&self, step: &Step, batch: &[(SeqId, &[u32])], groups: usize) {
        for c in step.copies() {
            self.copy_page(c.src, c.dst);
        }
        for (i, &(_, tokens)) in batch.iter().enumerate() {
            let position = step.position(i);
            for g in 0..groups {
                for (j, &slot) in step.slots(i, g).iter().enumerate() {
                    self.slots[slot as usize]
                        .store(Self::content(tokens[j], position + j, g), Ordering::Relaxed);
                }
            }
        }
    }

    /// What an engine executes after a retain: the compaction moves, every source gathered
    /// before any destination is written (they may overlap).
    pub fn apply_moves(&self, step: &Step, gathered: &mut Vec<u64>) {
        gathered.clear();
        gathered.extend(
            step.moves()
                .iter()
                .map(|m| self.slots[m.src as usize].load(Ordering::Relaxed)),
        );
        for (m, &v) in step.moves().iter().zip(gathered.iter()) {
            self.slots[m.dst as usize].store(v, Ordering::Relaxed);
        }
    }

    /// Every valid slot of `seq` in every group holds `history[position]` at its text position.
    pub fn check(
        &self,
        r: &CacheReader<'_>,
        seq: SeqId,
        history: &[u32],
        groups: usize,
    ) -> Result<(), String> {
        for g in 0..groups {
            let t = r
                .table(seq, g)
                .map_err(|e| format!("seq {seq} group {g}: {e}"))?;
            for s in (0..t.num_slots()).filter(|&s| t.is_valid(s)) {
                let position = t.position(s).expect("slot in range");
                let slot = t.physical_slot(s, self.block_size).expect("slot in range");
                let Some(&token) = history.get(position) else {
                    return Err(format!(
                        "seq {seq} group {g}: slot {s} at position {position} beyond the \
                         {} tokens it was given",
                        history.len()
                    ));
                };
                let want = Self::content(token, position, g);
                let got = self.slots[slot as usize].load(Ordering::Relaxed);
                if got != want {
                    return Err(format!(
                        "seq {seq} group {g}: slot {s} (physical {slot}) should hold token \
                         {token} at position {position}, holds {}",
                        describe(got)
                    ));
                }
            }
        }
        Ok(())
    }
}

fn describe(word: u64) -> String {
    if word == UNWRITTEN {
        return "nothing ever written".into();
    }
    format!(
        "token {} at position {} of group {}",
        (word >> 24) as u32,
        (word >> 4) & 0xf_ffff,
        word & 0xf
    )
}
