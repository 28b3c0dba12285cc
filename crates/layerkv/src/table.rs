//! [`BlockTable`]: one sequence's pages for one KV group, in logical order, with a slot
//! validity bitset for token-level eviction and the text position of every slot.
//!
//! Logical slot `s` lives in page `pages[s / block_size]` at offset `s % block_size`; its
//! physical slot (the index the kernels write to) is `page * block_size + offset`. A table holds
//! only live pages: when retention leaves a page without a valid slot the page goes back to the
//! pool and leaves the table, and when scattered holes add up to a page the cache compacts the
//! survivors into fewer pages (a move plan the engine executes). Either way the logical slots
//! after the change are renumbered, so a table's size, its bitset and every per-slot buffer are
//! bounded by the tokens it keeps, never by how many tokens the sequence has streamed. Tables
//! are mutated only by [`crate::KvCache`]; engines read them.
//!
//! The bitset and the positions are materialised on the first retention decision: until then
//! every filled slot is valid, slot `s` holds text position `s`, and an append touches neither
//! (one dependent memory access fewer per token).

use crate::bits;
use crate::pool::PageId;

/// One sequence's pages of one KV group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) pages: Vec<PageId>,
    pub(crate) num_slots: usize,
    /// Validity bits over logical slots when `bitset`; empty (all filled slots valid) before.
    pub(crate) valid: Vec<u64>,
    /// Text position of each logical slot when `bitset`; empty (slot == position) before.
    pub(crate) positions: Vec<u32>,
    pub(crate) bitset: bool,
    pub(crate) num_valid: usize,
    /// Whether the tail page may also be held by another table (set by a fork). While false,
    /// the tail's refcount is known to be 1 and an append skips the copy-on-write check (one
    /// pool lookup fewer per token).
    pub(crate) tail_shared: bool,
    /// `pages.last()` (when there is one), kept beside the counters so an append inside the
    /// tail page computes its slots without touching `pages`.
    pub(crate) tail: PageId,
}

impl Default for BlockTable {
    /// An empty table (its tail is the null page, as after its last page left).
    fn default() -> Self {
        Self {
            pages: Vec::new(),
            num_slots: 0,
            valid: Vec::new(),
            positions: Vec::new(),
            bitset: false,
            num_valid: 0,
            tail_shared: false,
            tail: crate::pool::NULL_PAGE,
        }
    }
}

/// What the attention kernel needs of one table (borrowed, no copies).
#[derive(Debug, Clone, Copy)]
pub struct TableView<'a> {
    /// Page ids in logical order.
    pub pages: &'a [PageId],
    /// Logical slots filled.
    pub num_slots: usize,
    /// Validity bitset over logical slots; `None` when every slot is valid.
    pub valid: Option<&'a [u64]>,
}

impl TableView<'_> {
    /// Whether logical slot `s` holds a live token (filled and its validity bit set).
    #[inline]
    pub fn is_valid(&self, s: usize) -> bool {
        s < self.num_slots && self.valid.is_none_or(|v| v[s / 64] >> (s % 64) & 1 == 1)
    }
}

impl BlockTable {
    /// Page ids in logical order (every one held by this table).
    pub fn pages(&self) -> &[PageId] {
        &self.pages
    }

    /// Logical slots filled.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Slots still valid (not evicted): the number of tokens the group attends to.
    pub fn num_valid(&self) -> usize {
        self.num_valid
    }

    /// The validity bitset over logical slots (bit `s % 64` of word `s / 64`); `None` while
    /// every filled slot is valid.
    pub fn valid(&self) -> Option<&[u64]> {
        (self.num_valid != self.num_slots).then_some(&self.valid[..])
    }

    /// Whether logical slot `s` holds a live token.
    pub fn is_valid(&self, s: usize) -> bool {
        s < self.num_slots && (!self.bitset || bits::get(&self.valid, s))
    }

    /// Text position of logical slot `s` (`None` if out of range).
    pub fn position(&self, s: usize) -> Option<usize> {
        if s >= self.num_slots {
            return None;
        }
        Some(if self.bitset {
            self.positions[s] as usize
        } else {
            s
        })
    }

    /// Pages held.
    pub fn num_pages_held(&self) -> usize {
        self.pages.len()
    }

    /// The physical slot of logical slot `s` (`None` if out of range).
    pub fn physical_slot(&self, s: usize, block_size: usize) -> Option<u32> {
        if s >= self.num_slots {
            return None;
        }
        let page = self.pages[s / block_size];
        Some(page * block_size as u32 + (s % block_size) as u32)
    }

    /// The kernel's view; the bitset is omitted while nothing is evicted.
    pub fn view(&self) -> TableView<'_> {
        TableView {
            pages: &self.pages,
            num_slots: self.num_slots,
            valid: self.valid(),
        }
    }

    /// Materialises the validity bits (every filled slot set) and positions (slot == position)
    /// if they were not yet.
    pub(crate) fn materialise(&mut self) {
        if !self.bitset {
            self.valid.clear();
            self.valid.resize(bits::words_for(self.num_slots), 0);
            bits::set_range(&mut self.valid, 0, self.num_slots);
            self.positions.clear();
            self.positions.extend(0..self.num_slots as u32);
            self.bitset = true;
        }
    }

    /// Valid slots in logical page `index`.
    pub(crate) fn valid_in_page(&self, index: usize, block_size: usize) -> usize {
        let lo = index * block_size;
        let hi = (lo + block_size).min(self.num_slots);
        if !self.bitset {
            return hi.saturating_sub(lo);
        }
        bits::count_range(&self.valid, lo, hi)
    }

    /// Appends a page at the end.
    pub(crate) fn push_page(&mut self, page: PageId) {
        self.pages.push(page);
        self.tail = page;
    }

    /// Replaces logical page `index`.
    pub(crate) fn set_page(&mut self, index: usize, page: PageId) {
        self.pages[index] = page;
        if index + 1 == self.pages.len() {
            self.tail = page;
        }
    }

    /// Drops pages past `len` (the caller releases them) and resets the tail.
    pub(crate) fn truncate_pages(&mut self, len: usize) {
        self.pages.truncate(len);
        self.tail = self.pages.last().copied().unwrap_or(crate::pool::NULL_PAGE);
    }

    /// Marks `n` new slots valid at text positions `first_position..` (the pages must already
    /// be in place).
    pub(crate) fn push_slots(&mut self, n: usize, first_position: usize) {
        let lo = self.num_slots;
        self.num_slots += n;
        self.num_valid += n;
        if self.bitset {
            self.valid.resize(bits::words_for(self.num_slots), 0);
            bits::set_range(&mut self.valid, lo, self.num_slots);
            self.positions
                .extend((first_position..first_position + n).map(|p| p as u32));
        }
    }

    /// Undoes the last `push_slots` of `n` slots.
    pub(crate) fn pop_slots(&mut self, n: usize) {
        let hi = self.num_slots;
        self.num_slots -= n;
        self.num_valid -= n;
        if self.bitset {
            for s in self.num_slots..hi {
                bits::clear(&mut self.valid, s);
            }
            self.valid.truncate(bits::words_for(self.num_slots));
            self.positions.truncate(self.num_slots);
        }
    }
}
