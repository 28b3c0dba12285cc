//! [`KvCache`]: the manager. Per sequence it keeps one [`BlockTable`] per KV group of the
//! policy (layers that read another layer's KV have no table and hold no pages), hands out
//! slots for new tokens, applies each group's retention and returns emptied pages to the pool
//! at once.
//!
//! Every mutating call is all-or-nothing: it checks the pool and its arguments first, and an
//! error leaves every table, refcount and counter as it was. One `RwLock` guards the state:
//! appends, evictions, forks and frees take it exclusively for O(tokens + pages) work; views for
//! the kernels share it ([`KvCache::read`]). `KvCache` is `Send + Sync`.
//!
//! Hot path: `append` with a reused [`SlotMapping`] allocates nothing once the sequence's
//! tables and the mapping have grown (tables grow by doubling, amortised O(1) per token).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bits;
use crate::error::{Error, Result};
use crate::map::GroupId;
use crate::policy::LayerKvPolicy;
use crate::pool::{chain_hash, group_block_hash, BlockPool, PageId, PoolStats, NULL_PAGE};
use crate::retention::{Phase, RetainInput};
use crate::table::{BlockTable, TableView};

/// A sequence id chosen by the engine.
pub type SeqId = u64;

/// Sizes of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Token slots per page.
    pub block_size: usize,
    /// Pages in the pool (shared by every group of every sequence).
    pub num_pages: usize,
    /// Bytes one token occupies in one group: `2 (K and V) x kv_heads x head_dim x dtype bytes`.
    pub bytes_per_token: usize,
    /// Reuse full pages across sequences with the same prefix. Only takes effect for policies
    /// that never evict (a block's KV then depends on the prefix alone).
    pub prefix_caching: bool,
}

impl CacheConfig {
    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.block_size * self.bytes_per_token
    }

    /// A config whose pool fills `budget_bytes`.
    pub fn for_budget(block_size: usize, bytes_per_token: usize, budget_bytes: usize) -> Self {
        Self {
            block_size,
            num_pages: budget_bytes / (block_size * bytes_per_token).max(1),
            bytes_per_token,
            prefix_caching: false,
        }
    }
}

/// A page the engine must copy before writing new slots (copy-on-write after a fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCopy {
    /// The shared page to copy from.
    pub src: PageId,
    /// The sequence's new private page.
    pub dst: PageId,
}

/// Where `append` put the new tokens: reuse one mapping across calls to avoid allocation.
#[derive(Debug, Clone, Default)]
pub struct SlotMapping {
    slots: Vec<Vec<u32>>,
    first_slot: Vec<usize>,
    first_position: Vec<usize>,
    copies: Vec<PageCopy>,
}

impl SlotMapping {
    /// An empty mapping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Physical slots (`page * block_size + offset`) of the new tokens in `group`, in order.
    pub fn slots(&self, group: GroupId) -> &[u32] {
        &self.slots[group]
    }

    /// Logical slot index of the first new token in `group` (the kernels' `q_pos`).
    pub fn first_slot(&self, group: GroupId) -> usize {
        self.first_slot[group]
    }

    /// Cache position of the first new token in `group`: tokens still valid before it. RoPE
    /// positions inside the cache (StreamingLLM) count from here; without eviction it equals
    /// the text position.
    pub fn first_position(&self, group: GroupId) -> usize {
        self.first_position[group]
    }

    /// Pages to copy (in order) before writing, from copy-on-write of shared pages.
    pub fn copies(&self) -> &[PageCopy] {
        &self.copies
    }

    fn reset(&mut self, num_groups: usize) {
        if self.slots.len() != num_groups {
            self.slots.resize_with(num_groups, Vec::new);
            self.first_slot.resize(num_groups, 0);
            self.first_position.resize(num_groups, 0);
        }
        for s in &mut self.slots {
            s.clear();
        }
        self.copies.clear();
    }
}

/// What one eviction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictOutcome {
    /// Slots that were valid and are not anymore.
    pub evicted_slots: usize,
    /// Pages returned to the pool.
    pub freed_pages: usize,
}

/// Memory held by one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryReport {
    /// Pages held per group.
    pub pages_per_group: Vec<usize>,
    /// Bytes per layer: a group's bytes are charged to its owner layer; readers hold 0 bytes.
    pub bytes_per_layer: Vec<usize>,
    /// Total bytes (pages held x page bytes).
    pub total_bytes: usize,
}

/// Hashes engine-chosen `u64` sequence ids with one folded multiply (SipHash would dominate a
/// single-token append).
#[derive(Default)]
struct SeqHasher(u64);

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
struct Sequence {
    /// Group 0's table, inline: the common one-group append then reads no second allocation.
    first: BlockTable,
    /// Groups 1.. .
    rest: Vec<BlockTable>,
    /// Token-chain hash after each full block (prefix caching only).
    chain: Vec<u64>,
    /// Tokens of the current partial block (prefix caching only).
    partial: Vec<u32>,
}

impl Sequence {
    fn table(&self, g: GroupId) -> &BlockTable {
        if g == 0 {
            &self.first
        } else {
            &self.rest[g - 1]
        }
    }

    fn table_mut(&mut self, g: GroupId) -> &mut BlockTable {
        if g == 0 {
            &mut self.first
        } else {
            &mut self.rest[g - 1]
        }
    }

    fn tables(&self) -> impl Iterator<Item = &BlockTable> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    fn tables_mut(&mut self) -> impl Iterator<Item = &mut BlockTable> {
        std::iter::once(&mut self.first).chain(&mut self.rest)
    }

    fn num_tables(&self) -> usize {
        1 + self.rest.len()
    }
}

#[derive(Debug)]
struct State {
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence, BuildHasherDefault<SeqHasher>>,
    keep: Vec<u64>,
    scratch: Vec<u32>,
}

/// The immutable half of a cache: policy, sizes, whether prefix caching is on.
#[derive(Debug)]
struct Core {
    policy: Arc<dyn LayerKvPolicy>,
    config: CacheConfig,
    caching: bool,
}

/// The KV-cache manager for one model and one policy.
#[derive(Debug)]
pub struct KvCache {
    core: Core,
    state: RwLock<State>,
}

/// Exclusive access for a batch of mutations under one lock (a scheduler step): the same
/// operations as [`KvCache`], without a lock round trip per call.
pub struct CacheWriter<'a> {
    core: &'a Core,
    state: RwLockWriteGuard<'a, State>,
}

/// Shared read access to every sequence's tables, for building kernel batches.
pub struct CacheReader<'a> {
    cache: &'a KvCache,
    state: RwLockReadGuard<'a, State>,
}

impl CacheReader<'_> {
    /// The table of `seq` for `group`.
    pub fn table(&self, seq: SeqId, group: GroupId) -> Result<&BlockTable> {
        let s = self
            .state
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        self.cache.core.check_group(group)?;
        Ok(s.table(group))
    }

    /// The kernel view of `seq`'s table for `group`.
    pub fn view(&self, seq: SeqId, group: GroupId) -> Result<TableView<'_>> {
        Ok(self.table(seq, group)?.view())
    }

    /// Pool counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.state.pool.stats()
    }
}

impl KvCache {
    /// A cache for `policy` with an empty pool of `config.num_pages` pages.
    pub fn new(policy: Arc<dyn LayerKvPolicy>, config: CacheConfig) -> Result<Self> {
        if !config.block_size.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "block_size must be a power of two (slot arithmetic uses shifts), got {}",
                config.block_size
            )));
        }
        if config.block_size == 0 || config.bytes_per_token == 0 {
            return Err(Error::InvalidConfig(format!(
                "block_size ({}) and bytes_per_token ({}) must be positive",
                config.block_size, config.bytes_per_token
            )));
        }
        let map = policy.layer_map();
        let never_evicts = (0..map.num_groups()).all(|g| policy.retention(g).is_full());
        Ok(Self {
            core: Core {
                caching: config.prefix_caching && never_evicts,
                policy,
                config,
            },
            state: RwLock::new(State {
                pool: BlockPool::new(config.num_pages)?,
                seqs: HashMap::default(),
                keep: Vec::new(),
                scratch: Vec::new(),
            }),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Arc<dyn LayerKvPolicy> {
        &self.core.policy
    }

    /// The sizes.
    pub fn config(&self) -> &CacheConfig {
        &self.core.config
    }

    /// Whether prefix caching is active (requested and the policy never evicts).
    pub fn prefix_caching(&self) -> bool {
        self.core.caching
    }

    /// Exclusive access for several mutations under one lock (e.g. a scheduler step).
    pub fn lock(&self) -> CacheWriter<'_> {
        CacheWriter {
            core: &self.core,
            state: self.state.write(),
        }
    }

    /// Shared read access for kernels (hold it while attention reads the tables).
    pub fn read(&self) -> CacheReader<'_> {
        CacheReader {
            cache: self,
            state: self.state.read(),
        }
    }

    /// Registers an empty sequence.
    pub fn add_sequence(&self, seq: SeqId) -> Result<()> {
        self.core.add_sequence(&mut self.state.write(), seq)
    }

    /// Registers a sequence and reuses cached pages for the longest prefix of `prompt` whose
    /// full blocks are cached in every group. Returns the number of prompt tokens whose KV is
    /// already in the cache (a multiple of `block_size`, leaving at least one token to compute).
    pub fn add_sequence_with_prefix(&self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        self.core
            .add_sequence_with_prefix(&mut self.state.write(), seq, prompt)
    }

    /// Reserves slots for `tokens.len()` new tokens in every group of `seq`, all or nothing,
    /// and writes where they go into `out`. Token ids are only used for prefix hashing.
    /// Fails with [`Error::PoolExhausted`] (the engine's preemption signal) without changing
    /// anything if the pool cannot hold them.
    pub fn append(&self, seq: SeqId, tokens: &[u32], out: &mut SlotMapping) -> Result<()> {
        self.append_batch(&[(seq, tokens)], std::slice::from_mut(out))
    }

    /// [`KvCache::append`] for several sequences at once (a batched step), all or nothing across
    /// the whole batch: `out[i]` receives the slots of `batch[i]`.
    pub fn append_batch(&self, batch: &[(SeqId, &[u32])], out: &mut [SlotMapping]) -> Result<()> {
        self.core.append_batch(&mut self.state.write(), batch, out)
    }

    /// Applies `group`'s retention to `seq`: clears the validity of dropped slots and returns
    /// pages left without a valid slot to the pool at once. `scores` (one per logical slot) are
    /// required by score-based retentions ([`crate::LayerKvPolicy::score_need`]).
    pub fn evict(
        &self,
        seq: SeqId,
        group: GroupId,
        scores: Option<&[f32]>,
        phase: Phase,
    ) -> Result<EvictOutcome> {
        self.core
            .evict(&mut self.state.write(), seq, group, scores, phase)
    }

    /// A child sequence that shares every page of `parent` (refcounts + 1); the first append
    /// into a shared partial page copies it (see [`SlotMapping::copies`]).
    pub fn fork(&self, parent: SeqId, child: SeqId) -> Result<()> {
        self.core.fork(&mut self.state.write(), parent, child)
    }

    /// Drops `seq` and releases every page it holds (cached pages stay reusable by prefix).
    pub fn free(&self, seq: SeqId) -> Result<()> {
        self.core.free(&mut self.state.write(), seq)
    }

    /// Whether `seq` is registered.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.state.read().seqs.contains_key(&seq)
    }

    /// Registered sequences.
    pub fn num_sequences(&self) -> usize {
        self.state.read().seqs.len()
    }

    /// Memory held by `seq`, per group and per layer.
    pub fn memory(&self, seq: SeqId) -> Result<MemoryReport> {
        let st = self.state.read();
        let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
        let map = self.core.policy.layer_map();
        let pages_per_group: Vec<usize> = s.tables().map(BlockTable::num_pages_held).collect();
        let mut bytes_per_layer = vec![0; map.num_layers()];
        for (g, &pages) in pages_per_group.iter().enumerate() {
            bytes_per_layer[map.owner(g)] = pages * self.core.config.page_bytes();
        }
        Ok(MemoryReport {
            total_bytes: pages_per_group.iter().sum::<usize>() * self.core.config.page_bytes(),
            pages_per_group,
            bytes_per_layer,
        })
    }

    /// Bytes of every page in use (all sequences).
    pub fn used_bytes(&self) -> usize {
        self.pool_stats().num_used * self.core.config.page_bytes()
    }

    /// Pool counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.state.read().pool.stats()
    }

    /// How many sequences of `seq_len` tokens this cache's pool can hold under the policy
    /// (worst case over token placement).
    pub fn capacity(&self, seq_len: usize) -> usize {
        crate::plan::max_sequences(
            self.core.policy.as_ref(),
            self.core.config.block_size,
            seq_len,
            self.core.config.num_pages,
        )
    }

    /// Checks every cross-structure invariant (O(pages + slots)): pool free list and counters,
    /// refcount == number of tables holding the page, table lengths and validity counts. For
    /// tests and debugging.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let st = self.state.read();
        st.pool.check_invariants()?;
        let bs = self.core.config.block_size;
        let mut holders: HashMap<PageId, u32> = HashMap::new();
        for (id, s) in &st.seqs {
            for (g, t) in s.tables().enumerate() {
                if t.pages.len() != t.num_slots.div_ceil(bs) {
                    return Err(format!(
                        "seq {id} group {g}: {} pages for {} slots",
                        t.pages.len(),
                        t.num_slots
                    ));
                }
                let counted = if t.bitset {
                    bits::count(&t.valid)
                } else {
                    t.num_slots
                };
                if counted != t.num_valid {
                    return Err(format!(
                        "seq {id} group {g}: num_valid {} != bitset",
                        t.num_valid
                    ));
                }
                let tail = t.pages.last().copied().unwrap_or(NULL_PAGE);
                if !t.pages.is_empty() && t.tail != tail {
                    return Err(format!(
                        "seq {id} group {g}: tail {} but last page {tail}",
                        t.tail
                    ));
                }
                // A partly filled tail not marked shared must be this table's alone (full
                // tails may be shared, e.g. prefix-cache hits: appends start a new page).
                if !t.tail_shared && tail != NULL_PAGE && t.num_slots % bs != 0 {
                    let rc = st.pool.refcount(tail).map_err(|e| e.to_string())?;
                    if rc != 1 {
                        return Err(format!(
                            "seq {id} group {g}: tail page {tail} has refcount {rc} but is \
                             not marked shared"
                        ));
                    }
                }
                for (i, &p) in t.pages.iter().enumerate() {
                    let live = t.valid_in_page(i, bs);
                    if p == NULL_PAGE {
                        if live != 0 {
                            return Err(format!(
                                "seq {id} group {g}: null page {i} has {live} valid slots"
                            ));
                        }
                    } else {
                        *holders.entry(p).or_default() += 1;
                    }
                }
            }
        }
        for page in 0..st.pool.num_pages() as PageId {
            let rc = st.pool.refcount(page).map_err(|e| e.to_string())?;
            let held = holders.get(&page).copied().unwrap_or(0);
            if rc != held {
                return Err(format!(
                    "page {page}: refcount {rc} but {held} tables hold it"
                ));
            }
        }
        Ok(())
    }
}

impl Core {
    fn register_full_blocks(
        &self,
        pool: &mut BlockPool,
        s: &mut Sequence,
        tokens: &[u32],
    ) -> Result<()> {
        let bs = self.config.block_size;
        let map = self.policy.layer_map();
        let fp = self.policy.fingerprint();
        for &t in tokens {
            s.partial.push(t);
            if s.partial.len() == bs {
                let chain = chain_hash(s.chain.last().copied().unwrap_or(0), &s.partial);
                let block = s.chain.len();
                for (g, &owner) in map.owners().iter().enumerate() {
                    let page = s.table(g).pages[block];
                    pool.register(page, group_block_hash(chain, owner, fp))?;
                }
                s.chain.push(chain);
                s.partial.clear();
            }
        }
        Ok(())
    }

    fn empty_sequence(&self) -> Sequence {
        Sequence {
            first: BlockTable::default(),
            rest: vec![BlockTable::default(); self.num_groups() - 1],
            chain: Vec::new(),
            partial: Vec::with_capacity(if self.caching {
                self.config.block_size
            } else {
                0
            }),
        }
    }

    fn check_group(&self, group: GroupId) -> Result<()> {
        if group < self.num_groups() {
            Ok(())
        } else {
            Err(Error::UnknownGroup {
                group,
                num_groups: self.num_groups(),
            })
        }
    }

    fn num_groups(&self) -> usize {
        self.policy.layer_map().num_groups()
    }

    fn add_sequence(&self, st: &mut State, seq: SeqId) -> Result<()> {
        if st.seqs.contains_key(&seq) {
            return Err(Error::SequenceExists(seq));
        }
        st.seqs.insert(seq, self.empty_sequence());
        Ok(())
    }

    fn add_sequence_with_prefix(
        &self,
        st: &mut State,
        seq: SeqId,
        prompt: &[u32],
    ) -> Result<usize> {
        if st.seqs.contains_key(&seq) {
            return Err(Error::SequenceExists(seq));
        }
        let mut s = self.empty_sequence();
        if self.caching {
            let bs = self.config.block_size;
            let map = self.policy.layer_map();
            let fp = self.policy.fingerprint();
            let mut parent = 0;
            for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
                let chain = chain_hash(parent, block);
                let all_cached = map
                    .owners()
                    .iter()
                    .all(|&owner| st.pool.contains_hash(group_block_hash(chain, owner, fp)));
                if !all_cached {
                    break;
                }
                for (g, &owner) in map.owners().iter().enumerate() {
                    let page = st
                        .pool
                        .lookup(group_block_hash(chain, owner, fp))
                        .expect("hash checked above under the same lock");
                    let t = s.table_mut(g);
                    t.push_page(page);
                    t.push_slots(bs);
                }
                s.chain.push(chain);
                parent = chain;
            }
        }
        let reused = s.chain.len() * self.config.block_size;
        st.seqs.insert(seq, s);
        Ok(reused)
    }

    fn append_batch(
        &self,
        st: &mut State,
        batch: &[(SeqId, &[u32])],
        out: &mut [SlotMapping],
    ) -> Result<()> {
        if out.len() != batch.len() {
            return Err(Error::InvalidConfig(format!(
                "append_batch: {} sequences but {} slot mappings",
                batch.len(),
                out.len()
            )));
        }
        let bs = self.config.block_size;
        let b = Blocks::new(bs);
        // Plan: pages needed (new pages + copy-on-write of a shared or evicted tail page). Forks
        // appending in one batch may count one copy too many: the check stays conservative.
        let mut needed = 0;
        for &(seq, tokens) in batch {
            let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            for t in s.tables() {
                needed += pages_needed(t, tokens.len(), b, &st.pool);
            }
        }
        if needed > st.pool.num_available() {
            return Err(Error::PoolExhausted {
                requested: needed,
                available: st.pool.num_available(),
            });
        }
        // Apply: nothing below can fail.
        for (&(seq, tokens), out) in batch.iter().zip(out.iter_mut()) {
            let n = tokens.len();
            let s = st.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
            out.reset(s.num_tables());
            for (g, t) in s.tables_mut().enumerate() {
                out.first_slot[g] = t.num_slots;
                out.first_position[g] = t.num_valid;
                if n == 0 {
                    continue;
                }
                if b.offset(t.num_slots) != 0 {
                    let last = t.pages.len() - 1;
                    let page = t.tail;
                    if page == NULL_PAGE {
                        t.set_page(last, st.pool.allocate()?);
                    } else if t.tail_shared && st.pool.refcount(page)? > 1 {
                        let dst = st.pool.allocate()?;
                        st.pool.release(page)?;
                        out.copies.push(PageCopy { src: page, dst });
                        t.set_page(last, dst);
                    }
                }
                // From here on the tail page is this table's alone: a fresh page, a private
                // copy, or a page whose other holders have let go.
                t.tail_shared = false;
                let end = t.num_slots + n;
                while t.pages.len() < b.count(end) {
                    t.push_page(st.pool.allocate()?);
                }
                // Physical slots page by page (one division per call, not per token); the
                // tail page comes from `tail`, so a decode step does not read `pages`.
                let slots = &mut out.slots[g];
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
                t.push_slots(n);
            }
            if self.caching && n > 0 {
                self.register_full_blocks(&mut st.pool, s, tokens)?;
            }
        }
        Ok(())
    }

    fn evict(
        &self,
        st: &mut State,
        seq: SeqId,
        group: GroupId,
        scores: Option<&[f32]>,
        phase: Phase,
    ) -> Result<EvictOutcome> {
        self.check_group(group)?;
        let retention = self.policy.retention(group);
        if retention.is_full() {
            return Ok(EvictOutcome::default());
        }
        let bs = self.config.block_size;
        let s = st.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let t = s.table_mut(group);
        if let Some(sc) = scores {
            if sc.len() != t.num_slots {
                return Err(Error::ScoreLength {
                    group,
                    expected: t.num_slots,
                    actual: sc.len(),
                });
            }
        }
        st.keep.clear();
        st.keep.resize(bits::words_for(t.num_slots), 0);
        let input = RetainInput {
            num_slots: t.num_slots,
            valid: t.bits_mut(),
            scores,
            phase,
        };
        retention
            .select(&input, &mut st.keep, &mut st.scratch)
            .map_err(|e| match e {
                Error::ScoreLength {
                    expected, actual, ..
                } => Error::ScoreLength {
                    group,
                    expected,
                    actual,
                },
                other => other,
            })?;
        let mut outcome = EvictOutcome::default();
        let (mut lo_word, mut hi_word) = (usize::MAX, 0);
        for (w, (valid, keep)) in t.bits_mut().iter_mut().zip(&st.keep).enumerate() {
            let dropped = *valid & !keep;
            if dropped != 0 {
                *valid &= keep;
                outcome.evicted_slots += dropped.count_ones() as usize;
                lo_word = lo_word.min(w);
                hi_word = w;
            }
        }
        if outcome.evicted_slots > 0 {
            // Return every page in the touched range that has no valid slot left.
            let first = lo_word * 64 / bs;
            let last = (hi_word * 64 + 63).min(t.num_slots - 1) / bs;
            for index in first..=last {
                let page = t.pages[index];
                if page != NULL_PAGE && t.valid_in_page(index, bs) == 0 {
                    st.pool.release(page)?;
                    t.set_page(index, NULL_PAGE);
                    outcome.freed_pages += 1;
                }
            }
        }
        t.num_valid -= outcome.evicted_slots;
        Ok(outcome)
    }

    fn fork(&self, st: &mut State, parent: SeqId, child: SeqId) -> Result<()> {
        if st.seqs.contains_key(&child) {
            return Err(Error::SequenceExists(child));
        }
        let ps = st
            .seqs
            .get_mut(&parent)
            .ok_or(Error::UnknownSequence(parent))?;
        // Both now hold every page, the tails included: the next append checks for sharing.
        for t in ps.tables_mut() {
            t.tail_shared = true;
        }
        let p = ps.clone();
        for t in p.tables() {
            for &page in t.pages.iter().filter(|&&p| p != NULL_PAGE) {
                st.pool.retain(page)?;
            }
        }
        st.seqs.insert(child, p);
        Ok(())
    }

    fn free(&self, st: &mut State, seq: SeqId) -> Result<()> {
        let s = st.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        for t in s.tables() {
            for &page in t.pages.iter().filter(|&&p| p != NULL_PAGE) {
                st.pool.release(page)?;
            }
        }
        Ok(())
    }
}

impl CacheWriter<'_> {
    /// See [`KvCache::add_sequence`].
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.core.add_sequence(&mut self.state, seq)
    }

    /// See [`KvCache::add_sequence_with_prefix`].
    pub fn add_sequence_with_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        self.core
            .add_sequence_with_prefix(&mut self.state, seq, prompt)
    }

    /// See [`KvCache::append`].
    pub fn append(&mut self, seq: SeqId, tokens: &[u32], out: &mut SlotMapping) -> Result<()> {
        self.core
            .append_batch(&mut self.state, &[(seq, tokens)], std::slice::from_mut(out))
    }

    /// See [`KvCache::append_batch`].
    pub fn append_batch(
        &mut self,
        batch: &[(SeqId, &[u32])],
        out: &mut [SlotMapping],
    ) -> Result<()> {
        self.core.append_batch(&mut self.state, batch, out)
    }

    /// See [`KvCache::evict`].
    pub fn evict(
        &mut self,
        seq: SeqId,
        group: GroupId,
        scores: Option<&[f32]>,
        phase: Phase,
    ) -> Result<EvictOutcome> {
        self.core.evict(&mut self.state, seq, group, scores, phase)
    }

    /// See [`KvCache::fork`].
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        self.core.fork(&mut self.state, parent, child)
    }

    /// See [`KvCache::free`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.core.free(&mut self.state, seq)
    }

    /// The table of `seq` for `group`.
    pub fn table(&self, seq: SeqId, group: GroupId) -> Result<&BlockTable> {
        let s = self
            .state
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))?;
        self.core.check_group(group)?;
        Ok(s.table(group))
    }

    /// Pool counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.state.pool.stats()
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
        let page = t.tail;
        usize::from(
            page == NULL_PAGE || (t.tail_shared && pool.refcount(page).is_ok_and(|rc| rc > 1)),
        )
    } else {
        0
    };
    grow + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::LayerMap;
    use crate::policy::{Policy, PolicyBuilder};
    use crate::retention::Retention;

    fn cache(policy: Policy, num_pages: usize, bs: usize) -> KvCache {
        KvCache::new(
            Arc::new(policy),
            CacheConfig {
                block_size: bs,
                num_pages,
                bytes_per_token: 8,
                prefix_caching: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn sharing_layers_hold_no_pages() {
        let p = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .build()
            .unwrap();
        let c = cache(p, 64, 4);
        c.add_sequence(1).unwrap();
        let mut m = SlotMapping::new();
        c.append(1, &[1, 2, 3, 4, 5], &mut m).unwrap();
        let r = c.memory(1).unwrap();
        assert_eq!(r.pages_per_group, vec![2, 2]);
        assert_eq!(r.bytes_per_layer, vec![64, 0, 64, 0]);
        assert_eq!(r.total_bytes, 128);
        assert_eq!(m.slots(0).len(), 5);
        c.check_invariants().unwrap();
    }

    #[test]
    fn streaming_eviction_frees_pages_at_once() {
        let p = PolicyBuilder::new(LayerMap::identity(1).unwrap())
            .retention(Retention::SinkWindow {
                sinks: 2,
                window: 4,
            })
            .build()
            .unwrap();
        let c = cache(p, 16, 2);
        c.add_sequence(7).unwrap();
        let mut m = SlotMapping::new();
        for t in 0..20u32 {
            c.append(7, &[t], &mut m).unwrap();
            c.evict(7, 0, None, Phase::Decode).unwrap();
            c.check_invariants().unwrap();
        }
        let r = c.read();
        let t = r.table(7, 0).unwrap();
        assert_eq!(t.num_slots(), 20);
        assert_eq!(t.num_valid(), 5);
        assert_eq!(t.num_pages_held(), 3);
        assert!(
            t.is_valid(0) && t.is_valid(1) && !t.is_valid(2) && !t.is_valid(16) && t.is_valid(17)
        );
        drop(r);
        let mut m = SlotMapping::new();
        c.append(7, &[99], &mut m).unwrap();
        assert_eq!(m.first_position(0), 5);
        assert_eq!(m.first_slot(0), 20);
    }

    #[test]
    fn exhausted_pool_leaves_state_unchanged() {
        let c = cache(
            PolicyBuilder::new(LayerMap::identity(3).unwrap())
                .build()
                .unwrap(),
            5,
            4,
        );
        c.add_sequence(1).unwrap();
        let mut m = SlotMapping::new();
        c.append(1, &[0; 4], &mut m).unwrap();
        let before = (c.pool_stats(), c.memory(1).unwrap());
        let err = c.append(1, &[0], &mut m).unwrap_err();
        assert_eq!(
            err,
            Error::PoolExhausted {
                requested: 3,
                available: 2
            }
        );
        assert_eq!((c.pool_stats(), c.memory(1).unwrap()), before);
        c.check_invariants().unwrap();
    }

    #[test]
    fn batched_append_is_all_or_nothing() {
        let c = cache(Policy::identity(2).unwrap(), 6, 4);
        c.add_sequence(1).unwrap();
        c.add_sequence(2).unwrap();
        let mut out = vec![SlotMapping::new(), SlotMapping::new()];
        c.append_batch(&[(1, &[1, 2]), (2, &[3])], &mut out)
            .unwrap();
        assert_eq!(out[0].slots(1).len(), 2);
        assert_eq!(out[1].slots(0).len(), 1);
        let before = c.pool_stats();
        let err = c
            .append_batch(&[(1, &[0; 3]), (2, &[0; 12])], &mut out)
            .unwrap_err();
        assert_eq!(
            err,
            Error::PoolExhausted {
                requested: 8,
                available: 2
            }
        );
        assert_eq!(c.pool_stats(), before);
        assert!(c.append_batch(&[(1, &[0])], &mut out).is_err());
        assert_eq!(
            c.append_batch(&[(1, &[0]), (9, &[0])], &mut out)
                .unwrap_err(),
            Error::UnknownSequence(9)
        );
        c.check_invariants().unwrap();
    }

    #[test]
    fn fork_shares_and_copies_on_write() {
        let c = cache(Policy::identity(1).unwrap(), 8, 4);
        c.add_sequence(1).unwrap();
        let mut m = SlotMapping::new();
        c.append(1, &[1, 2, 3, 4, 5, 6], &mut m).unwrap();
        c.fork(1, 2).unwrap();
        assert_eq!(c.pool_stats().num_used, 2);
        c.append(2, &[7], &mut m).unwrap();
        assert_eq!(m.copies().len(), 1);
        let copy = m.copies()[0];
        assert_eq!(m.slots(0), &[copy.dst * 4 + 2]);
        // The parent keeps writing into its own page without a copy.
        c.append(1, &[8], &mut m).unwrap();
        assert!(m.copies().is_empty());
        assert_eq!(m.slots(0), &[copy.src * 4 + 2]);
        c.check_invariants().unwrap();
        c.free(1).unwrap();
        c.free(2).unwrap();
        assert_eq!(c.free(2).unwrap_err(), Error::UnknownSequence(2));
        assert_eq!(c.fork(9, 10).unwrap_err(), Error::UnknownSequence(9));
        assert_eq!(c.pool_stats().num_used, 0);
    }

    #[test]
    fn prefix_cache_reuses_full_blocks_per_group() {
        let c = cache(
            PolicyBuilder::new(LayerMap::cla(2, 2).unwrap())
                .build()
                .unwrap(),
            8,
            2,
        );
        assert!(c.prefix_caching());
        let prompt = [5, 6, 7, 8, 9];
        assert_eq!(c.add_sequence_with_prefix(1, &prompt).unwrap(), 0);
        let mut m = SlotMapping::new();
        c.append(1, &prompt, &mut m).unwrap();
        c.free(1).unwrap();
        assert_eq!(c.pool_stats().num_cached, 2);
        assert_eq!(c.add_sequence_with_prefix(2, &prompt).unwrap(), 4);
        assert_eq!(c.pool_stats().prefix_hits, 2);
        c.append(2, &prompt[4..], &mut m).unwrap();
        assert_eq!(m.first_slot(0), 4);
        c.check_invariants().unwrap();
        // A different policy never hits these pages.
        let other = cache(Policy::identity(2).unwrap(), 8, 2);
        assert_eq!(other.add_sequence_with_prefix(3, &prompt).unwrap(), 0);
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let c = cache(Policy::identity(2).unwrap(), 8, 4);
        let mut m = SlotMapping::new();
        assert_eq!(
            c.append(1, &[1], &mut m).unwrap_err(),
            Error::UnknownSequence(1)
        );
        c.add_sequence(1).unwrap();
        assert_eq!(c.add_sequence(1).unwrap_err(), Error::SequenceExists(1));
        assert!(matches!(
            c.evict(1, 5, None, Phase::Decode).unwrap_err(),
            Error::UnknownGroup { group: 5, .. }
        ));
        assert!(c.read().view(1, 2).is_err());
        let h2o = PolicyBuilder::new(LayerMap::identity(1).unwrap())
            .retention(Retention::HeavyHitter {
                heavy: crate::retention::Budget::Tokens(1),
                recent: crate::retention::Budget::Tokens(1),
            })
            .build()
            .unwrap();
        let c = cache(h2o, 8, 4);
        c.add_sequence(1).unwrap();
        c.append(1, &[1, 2, 3], &mut m).unwrap();
        assert_eq!(
            c.evict(1, 0, Some(&[1.0]), Phase::Decode).unwrap_err(),
            Error::ScoreLength {
                group: 0,
                expected: 3,
                actual: 1
            }
        );
        assert_eq!(
            c.evict(1, 0, None, Phase::Decode).unwrap_err(),
            Error::ScoreLength {
                group: 0,
                expected: 3,
                actual: 0
            }
        );
        let out = c
            .evict(1, 0, Some(&[0.0, 5.0, 0.0]), Phase::Decode)
            .unwrap();
        assert_eq!(out.evicted_slots, 1);
        assert!(!c.read().table(1, 0).unwrap().is_valid(0));
        assert!(KvCache::new(
            Arc::new(Policy::identity(1).unwrap()),
            CacheConfig {
                block_size: 0,
                num_pages: 1,
                bytes_per_token: 1,
                prefix_caching: false
            }
        )
        .is_err());
    }
}
