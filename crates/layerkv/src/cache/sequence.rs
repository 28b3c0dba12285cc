//! One sequence's state in the cache: a block table per KV group, the retention's per-slot
//! scores, the prompt length, the StreamingLLM sink shift and (prefix caching) the token-chain
//! hashes; and the lock-guarded [`State`] of all sequences with the pool.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::compact::Compactor;
use crate::ids::SeqId;
use crate::map::GroupId;
use crate::pool::{BlockPool, PageId};
use crate::table::BlockTable;

use super::scores::GroupScores;
use super::scratch::RetainScratch;

/// Hashes engine-chosen `u64` sequence ids with one folded multiply (SipHash would dominate a
/// single-token append).
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        let m = u128::from(x ^ self.0) * 0x9e37_79b9_7f4a_7c15_u128;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    /// Group 0's table, inline: the common one-group append then reads no second allocation.
    pub(crate) first: BlockTable,
    /// Groups 1.. .
    pub(crate) rest: Vec<BlockTable>,
    /// Token-chain hash after each full block (prefix caching only).
    pub(crate) chain: Vec<u64>,
    /// Tokens of the current partial block (prefix caching only).
    pub(crate) partial: Vec<u32>,
    /// Tokens appended so far: the text position of the next token.
    pub(crate) num_tokens: usize,
    /// Prompt length; `None` until declared or until the first step (which then is the prompt).
    pub(crate) prompt_len: Option<usize>,
    /// Per group scores (empty when the policy needs none).
    pub(crate) scores: Vec<GroupScores>,
    /// Per group: the position the sinks are currently rotated to sit at (empty without sinks).
    pub(crate) sink_shift: Vec<usize>,
}

impl Sequence {
    pub(crate) fn table(&self, g: GroupId) -> &BlockTable {
        if g == 0 {
            &self.first
        } else {
            &self.rest[g - 1]
        }
    }

    pub(crate) fn table_mut(&mut self, g: GroupId) -> &mut BlockTable {
        if g == 0 {
            &mut self.first
        } else {
            &mut self.rest[g - 1]
        }
    }

    pub(crate) fn tables(&self) -> impl Iterator<Item = &BlockTable> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    pub(crate) fn tables_mut(&mut self) -> impl Iterator<Item = &mut BlockTable> {
        std::iter::once(&mut self.first).chain(&mut self.rest)
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) pool: BlockPool,
    pub(crate) seqs: HashMap<SeqId, Sequence, BuildHasherDefault<SeqHasher>>,
    pub(crate) compactor: Compactor,
    /// Retain's decisions and score copies, reused from step to step.
    pub(crate) scratch: RetainScratch,
    /// Shared pages that reserved steps copied away from (copy-on-write): each is held by its
    /// step until the step retains (then released) or rolls back (then its table points at it
    /// again), so another sequence letting go of it in between cannot free it under the step.
    pub(crate) pinned: Vec<PageId>,
}

/// Drops one pin of `page` (a reserved step's copy-on-write source).
pub(crate) fn unpin(pinned: &mut Vec<PageId>, page: PageId) {
    if let Some(i) = pinned.iter().position(|&p| p == page) {
        pinned.swap_remove(i);
    } else {
        debug_assert!(false, "page {page} was not pinned");
    }
}
