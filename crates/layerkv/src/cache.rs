//! [`KvCache`]: the manager. Per sequence it keeps one [`BlockTable`] per KV group of the
//! policy (layers that read another layer's KV have no table and hold no pages), the
//! retention's per-slot scores, the prompt length and the StreamingLLM sink shift, and it runs
//! the step protocol ([`crate::Step`]) that any engine drives around its attention kernels:
//! `reserve` slots, write K/V and attend, `retain` (or `rollback` on failure).
//!
//! Every mutating call is all-or-nothing: it checks the pool and its arguments first, and an
//! error leaves every table, refcount, score and counter as it was. One `RwLock` guards the
//! state: reserves, retains, forks and frees take it exclusively for O(tokens + live slots)
//! work; views for the kernels share it ([`KvCache::read`]). `KvCache` is `Send + Sync`.
//!
//! Hot path: `reserve`/`append` with a reused [`crate::Step`] / [`SlotMapping`] allocates
//! nothing once the sequence's tables and the buffers have grown (tables grow by doubling and
//! keep their capacity when retention shrinks them).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bits;
use crate::compact::Compactor;
use crate::error::{Error, Result};
use crate::map::GroupId;
use crate::policy::LayerKvPolicy;
use crate::pool::{chain_hash, group_block_hash, BlockPool, PageId, PoolStats, NULL_PAGE};
use crate::retention::{RetainInput, ScoreNeed, Scores};
use crate::step::{Rerotation, RetainOutcome, Step, StepSeq, StepState, Undo};
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
    /// Window (in cache slots) of the layers the policy's map marks sliding.
    pub sliding_window: Option<usize>,
    /// Window of every layer the map does not mark sliding (a model-wide sliding window, as in
    /// Mistral's config); `None` for full attention.
    pub model_window: Option<usize>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_pages: 0,
            bytes_per_token: 1,
            prefix_caching: false,
            sliding_window: None,
            model_window: None,
        }
    }
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
            ..Self::default()
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
    pub(crate) slots: Vec<Vec<u32>>,
    pub(crate) first_slot: Vec<usize>,
    pub(crate) first_position: Vec<usize>,
    pub(crate) copies: Vec<PageCopy>,
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

    /// Cache position of the first new token in `group`: tokens still valid before it.
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

/// A group's per-slot scores (only the kinds its retention needs are kept non-empty).
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupScores {
    pub(crate) accumulated: Vec<f32>,
    pub(crate) last: Vec<f32>,
    pub(crate) observed: Vec<f32>,
}

#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    /// Group 0's table, inline: the common one-group append then reads no second allocation.
    first: BlockTable,
    /// Groups 1.. .
    rest: Vec<BlockTable>,
    /// Token-chain hash after each full block (prefix caching only).
    chain: Vec<u64>,
    /// Tokens of the current partial block (prefix caching only).
    partial: Vec<u32>,
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
pub(crate) struct State {
    pub(crate) pool: BlockPool,
    pub(crate) seqs: HashMap<SeqId, Sequence, BuildHasherDefault<SeqHasher>>,
    compactor: Compactor,
}

/// The immutable half of a cache: policy, sizes, per-group facts derived once.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) policy: Arc<dyn LayerKvPolicy>,
    pub(crate) config: CacheConfig,
    caching: bool,
    /// Per group: the scores its retention needs.
    pub(crate) needs: Vec<ScoreNeed>,
    /// Per group: StreamingLLM sinks to re-rotate.
    pub(crate) sinks: Vec<usize>,
    /// Per group: the window beyond which no reader looks (every reader slides).
    pub(crate) windows: Vec<Option<usize>>,
    /// Per group: whether anything can evict (retention or window).
    pub(crate) evicts: Vec<bool>,
    any_scores: bool,
    any_sinks: bool,
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
        if config.block_size == 0 || config.bytes_per_token == 0 {
            return Err(Error::InvalidConfig(format!(
                "block_size ({}) and bytes_per_token ({}) must be positive",
                config.block_size, config.bytes_per_token
            )));
        }
        if !config.block_size.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "block_size must be a power of two (slot arithmetic uses shifts), got {}",
                config.block_size
            )));
        }
        for (what, w) in [
            ("sliding_window", config.sliding_window),
            ("model_window", config.model_window),
        ] {
            if w == Some(0) {
                return Err(Error::InvalidConfig(format!("{what} must be positive")));
            }
        }
        let map = policy.layer_map();
        if let Some(layer) = (0..map.num_layers()).find(|&l| map.is_sliding(l)) {
            if config.sliding_window.is_none() {
                return Err(Error::InvalidConfig(format!(
                    "layer {layer} is a sliding-window layer of the map but the cache config sets no sliding_window"
                )));
            }
        }
        let groups = map.num_groups();
        let layer_window = |l: usize| {
            if map.is_sliding(l) {
                config.sliding_window
            } else {
                config.model_window
            }
        };
        let windows: Vec<Option<usize>> = (0..groups)
            .map(|g| {
                map.readers(g)
                    .iter()
                    .map(|&l| layer_window(l))
                    .try_fold(0usize, |acc, w| w.map(|w| acc.max(w)))
            })
            .collect();
        let needs: Vec<ScoreNeed> = (0..groups).map(|g| policy.score_need(g)).collect();
        let sinks: Vec<usize> = (0..groups).map(|g| policy.retention(g).sinks()).collect();
        let evicts: Vec<bool> = (0..groups)
            .map(|g| !policy.retention(g).is_full() || windows[g].is_some())
            .collect();
        Ok(Self {
            core: Core {
                caching: config.prefix_caching && !evicts.iter().any(|&e| e),
                any_scores: needs.iter().any(|n| !n.is_none()),
                any_sinks: sinks.iter().any(|&s| s > 0),
                needs,
                sinks,
                windows,
                evicts,
                policy,
                config,
            },
            state: RwLock::new(State {
                pool: BlockPool::new(config.num_pages)?,
                seqs: HashMap::default(),
                compactor: Compactor::default(),
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

    /// The attention window of `layer` in cache slots (`None`: full attention). Engines pass it
    /// to the kernels so the cache and the kernels agree.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        if self.core.policy.layer_map().is_sliding(layer) {
            self.core.config.sliding_window
        } else {
            self.core.config.model_window
        }
    }

    /// The window beyond which no reader of `group` looks (every reader slides), so the cache
    /// frees what falls out of it.
    pub fn group_window(&self, group: GroupId) -> Option<usize> {
        self.core.windows.get(group).copied().flatten()
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

    /// Registers an empty sequence. Its first step is taken as its whole prompt unless
    /// [`KvCache::set_prompt_len`] says otherwise.
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

    /// Declares the prompt length of `seq` (chunked prefill): steps before it are
    /// [`Phase::Prefill`], the step that appends its last token is [`Phase::PromptEnd`] (SnapKV
    /// compresses there, observing the last queries of the prompt across chunks).
    pub fn set_prompt_len(&self, seq: SeqId, prompt_len: usize) -> Result<()> {
        let mut st = self.state.write();
        let s = st.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        if prompt_len == 0 || s.num_tokens >= prompt_len {
            return Err(Error::InvalidConfig(format!(
                "sequence {seq}: prompt length {prompt_len} must exceed the {} tokens already appended",
                s.num_tokens
            )));
        }
        s.prompt_len = Some(prompt_len);
        Ok(())
    }

    /// Tokens appended to `seq` so far (the text position of its next token).
    pub fn num_tokens(&self, seq: SeqId) -> Result<usize> {
        let st = self.state.read();
        Ok(st
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))?
            .num_tokens)
    }

    /// Reserves slots for `tokens.len()` new tokens in every group of `seq`, all or nothing,
    /// and writes where they go into `out`, without retention or rollback (the allocator's raw
    /// interface; engines that apply a policy use [`KvCache::reserve`]). Fails with
    /// [`Error::PoolExhausted`] (the engine's preemption signal) without changing anything.
    pub fn append(&self, seq: SeqId, tokens: &[u32], out: &mut SlotMapping) -> Result<()> {
        self.append_batch(&[(seq, tokens)], std::slice::from_mut(out))
    }

    /// [`KvCache::append`] for several sequences at once, all or nothing across the batch.
    pub fn append_batch(&self, batch: &[(SeqId, &[u32])], out: &mut [SlotMapping]) -> Result<()> {
        self.core
            .append_batch(&mut self.state.write(), batch, out, None)
    }

    /// Step protocol 1/3: reserves slots for a batch (all or nothing across it) and plans what
    /// the engine executes before attention: page copies, sink re-rotations, which rows are
    /// sinks, which rows' attention mass each group needs. See [`Step`].
    pub fn reserve(&self, batch: &[(SeqId, &[u32])], step: &mut Step) -> Result<()> {
        self.core.reserve(&mut self.state.write(), batch, step)
    }

    /// Step protocol 2/3: takes the step's attention mass, runs every group's retention for
    /// every sequence with its own phase, returns pages left empty to the pool and plans the
    /// compaction moves ([`Step::moves`]) the engine executes before its next reserve.
    /// All or nothing: on error nothing changed and the step can still be rolled back.
    pub fn retain(&self, step: &mut Step) -> Result<RetainOutcome> {
        self.core.retain(&mut self.state.write(), step)
    }

    /// Step protocol, on failure after [`KvCache::reserve`]: restores every table, refcount,
    /// score, sink shift and counter of the step's sequences as before the reserve. (Cached
    /// prefix pages that the reserve recycled for new pages stay recycled.)
    pub fn rollback(&self, step: &mut Step) -> Result<()> {
        self.core.rollback(&mut self.state.write(), step)
    }

    /// A child sequence that shares every page of `parent` (refcounts + 1) and a copy of its
    /// scores, prompt length and sink state; the first append into a shared partial page
    /// copies it (see [`SlotMapping::copies`]).
    pub fn fork(&self, parent: SeqId, child: SeqId) -> Result<()> {
        self.core.fork(&mut self.state.write(), parent, child)
    }

    /// Drops `seq` with its scores and releases every page it holds (cached pages stay
    /// reusable by prefix).
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
    /// (worst case over token placement, steps of one token).
    pub fn capacity(&self, seq_len: usize) -> usize {
        crate::plan::Planner::from_config(&self.core.config).max_sequences(
            self.core.policy.as_ref(),
            seq_len,
            self.core.config.num_pages,
        )
    }

    /// Checks every cross-structure invariant (O(pages + slots)): pool free list and counters,
    /// refcount == number of tables holding the page, table lengths and validity counts, score
    /// lengths, the compaction bound (fewer holes than a page). For tests and debugging.
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
                        "seq {id} group {g}: num_valid {} != bitset {counted}",
                        t.num_valid
                    ));
                }
                if t.bitset && t.positions.len() != t.num_slots {
                    return Err(format!(
                        "seq {id} group {g}: {} positions for {} slots",
                        t.positions.len(),
                        t.num_slots
                    ));
                }
                if let Some(sc) = s.scores.get(g) {
                    for (what, v) in [
                        ("accumulated", &sc.accumulated),
                        ("last", &sc.last),
                        ("observed", &sc.observed),
                    ] {
                        if !v.is_empty() && v.len() != t.num_slots {
                            return Err(format!(
                                "seq {id} group {g}: {} {what} scores for {} slots",
                                v.len(),
                                t.num_slots
                            ));
                        }
                    }
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
                    if p == NULL_PAGE {
                        return Err(format!("seq {id} group {g}: page {i} is null"));
                    }
                    if t.bitset && t.valid_in_page(i, bs) == 0 {
                        return Err(format!(
                            "seq {id} group {g}: page {i} ({p}) holds no valid slot"
                        ));
                    }
                    *holders.entry(p).or_default() += 1;
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
        let groups = self.num_groups();
        Sequence {
            first: BlockTable::default(),
            rest: vec![BlockTable::default(); groups - 1],
            chain: Vec::new(),
            partial: Vec::with_capacity(if self.caching {
                self.config.block_size
            } else {
                0
            }),
            num_tokens: 0,
            prompt_len: None,
            scores: if self.any_scores {
                vec![GroupScores::default(); groups]
            } else {
                Vec::new()
            },
            sink_shift: if self.any_sinks {
                vec![0; groups]
            } else {
                Vec::new()
            },
        }
    }

    pub(crate) fn check_group(&self, group: GroupId) -> Result<()> {
        if group < self.num_groups() {
            Ok(())
        } else {
            Err(Error::UnknownGroup {
                group,
                num_groups: self.num_groups(),
            })
        }
    }

    pub(crate) fn num_groups(&self) -> usize {
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
                    t.push_slots(bs, t.num_slots);
                }
                s.chain.push(chain);
                parent = chain;
            }
        }
        let reused = s.chain.len() * self.config.block_size;
        s.num_tokens = reused;
        st.seqs.insert(seq, s);
        Ok(reused)
    }

    /// Appends the batch; with `undo`, records what a rollback needs (one entry per sequence
    /// and group) and defers prefix registration to `retain`.
    fn append_batch(
        &self,
        st: &mut State,
        batch: &[(SeqId, &[u32])],
        out: &mut [SlotMapping],
        mut undo: Option<&mut Vec<Undo>>,
    ) -> Result<()> {
        if out.len() < batch.len() {
            return Err(Error::InvalidConfig(format!(
                "append_batch: {} sequences but {} slot mappings",
                batch.len(),
                out.len()
            )));
        }
        let bs = self.config.block_size;
        let b = Blocks::new(bs);
        // Plan: pages needed (new pages + copy-on-write of a shared tail page). Forks
        // appending in one batch may count one copy too many: the check stays conservative.
        let mut needed = 0;
        for (i, &(seq, tokens)) in batch.iter().enumerate() {
            if batch[..i].iter().any(|&(other, _)| other == seq) {
                return Err(Error::InvalidConfig(format!(
                    "sequence {seq} appears twice in one step"
                )));
            }
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
            let position = s.num_tokens;
            out.reset(s.num_tables());
            for (g, t) in s.tables_mut().enumerate() {
                out.first_slot[g] = t.num_slots;
                out.first_position[g] = t.num_valid;
                let mut entry = Undo {
                    num_slots: t.num_slots,
                    num_pages: t.pages.len(),
                    tail_shared: t.tail_shared,
                    copy: None,
                    sink_shift: 0,
                };
                if n == 0 {
                    if let Some(u) = undo.as_deref_mut() {
                        u.push(entry);
                    }
                    continue;
                }
                if b.offset(t.num_slots) != 0 {
                    let last = t.pages.len() - 1;
                    let page = t.tail;
                    if t.tail_shared && st.pool.refcount(page)? > 1 {
                        let dst = st.pool.allocate()?;
                        st.pool.release(page)?;
                        let copy = PageCopy { src: page, dst };
                        out.copies.push(copy);
                        entry.copy = Some(copy);
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
                t.push_slots(n, position);
                if let Some(u) = undo.as_deref_mut() {
                    u.push(entry);
                }
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
                }
            }
            if undo.is_none() && self.caching && n > 0 {
                self.register_full_blocks(&mut st.pool, s, tokens)?;
            }
        }
        Ok(())
    }

    fn reserve(&self, st: &mut State, batch: &[(SeqId, &[u32])], step: &mut Step) -> Result<()> {
        if step.state == StepState::Reserved {
            return Err(Error::InvalidConfig(
                "reserve: the previous step was neither retained nor rolled back".into(),
            ));
        }
        let groups = self.num_groups();
        step.reset(groups, batch.len());
        // Prompt lengths before this step (the first step of a sequence is its prompt unless
        // one was declared), checked before anything changes.
        for &(seq, tokens) in batch {
            let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            let prompt_len =
                s.prompt_len
                    .unwrap_or(if s.num_tokens == 0 { tokens.len() } else { 0 });
            step.seqs.push(StepSeq {
                seq,
                num_new: tokens.len(),
                position: s.num_tokens,
                prompt_len,
                prompt_declared: s.prompt_len.is_some(),
            });
        }
        self.append_batch(st, batch, &mut step.mappings, Some(&mut step.undo))?;
        if self.caching {
            for &(_, tokens) in batch {
                step.tokens.extend_from_slice(tokens);
            }
        }
        // Nothing below fails: prompt lengths, score buffers, sink re-rotation plans.
        for (i, &(seq, _)) in batch.iter().enumerate() {
            let s = st.seqs.get_mut(&seq).expect("appended above");
            if s.prompt_len.is_none() && step.seqs[i].position == 0 {
                s.prompt_len = Some(step.seqs[i].prompt_len);
            }
            for g in 0..groups {
                let sinks = self.sinks[g];
                if sinks == 0 {
                    continue;
                }
                let t = s.table(g);
                // The sinks are the first `sinks` valid slots (compaction may have moved them
                // off slot 0, never out of order); they sit right before the first kept token
                // after them.
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
                        first_position: shift,
                        slots: start..step.rerotation_slots.len(),
                    });
                    s.sink_shift[g] = shift;
                }
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
            if need.all_rows() {
                step.mass[g].resize(total, 0.0);
                step.wants_mass[g] = true;
            }
            if need.observe > 0 && (0..batch.len()).any(|i| !step.observe_rows(i, g).is_empty()) {
                step.observed_mass[g].resize(total, 0.0);
                step.wants_observed[g] = true;
            }
        }
        step.state = StepState::Reserved;
        Ok(())
    }

    fn rollback(&self, st: &mut State, step: &mut Step) -> Result<()> {
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
                    st.pool.retain(c.src)?;
                    st.pool.release(c.dst)?;
                    let last = t.pages.len() - 1;
                    t.set_page(last, c.src);
                }
                t.tail_shared = u.tail_shared;
                let n = t.num_slots;
                if let Some(sc) = s.scores.get_mut(g) {
                    for v in [&mut sc.accumulated, &mut sc.last, &mut sc.observed] {
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

    fn retain(&self, st: &mut State, step: &mut Step) -> Result<RetainOutcome> {
        if step.state != StepState::Reserved {
            return Err(Error::InvalidConfig(
                "retain: no reserved step (call reserve first, once per step)".into(),
            ));
        }
        let groups = self.num_groups();
        let bs = self.config.block_size;
        step.moves.clear();
        step.keep_words.clear();
        // Phase 1 (fallible, changes nothing): fold the step's mass into scratch copies of the
        // scores and decide what every (sequence, group) keeps.
        for (i, ss) in step.seqs.iter().enumerate() {
            let s = st
                .seqs
                .get_mut(&ss.seq)
                .ok_or(Error::UnknownSequence(ss.seq))?;
            let phase = ss.phase();
            for g in 0..groups {
                if !self.evicts[g] {
                    continue;
                }
                let t = s.table_mut(g);
                t.materialise();
                let n = t.num_slots;
                let lo = step.offsets[g * (step.seqs.len() + 1) + i];
                let seg = lo..lo + n;
                let need = self.needs[g];
                let pair = step.keep_ranges.len();
                if step.score_scratch.len() <= pair {
                    step.score_scratch.push(GroupScores::default());
                }
                let scratch = &mut step.score_scratch[pair];
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
                let words = bits::words_for(n);
                let start = step.keep_words.len();
                step.keep_words.resize(start + words, 0);
                let keep = &mut step.keep_words[start..];
                let retention = self.policy.retention(g);
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
                        },
                        phase,
                    };
                    retention.select(&input, keep, &mut step.scratch)?;
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
                step.keep_ranges.push((i, g, start));
            }
        }
        // Phase 2 (cannot fail on a consistent state): install scores, clear dropped slots,
        // free and compact pages.
        let mut outcome = RetainOutcome::default();
        let State {
            pool,
            seqs,
            compactor,
        } = st;
        for (pair, &(i, g, start)) in step.keep_ranges.iter().enumerate() {
            let ss = &step.seqs[i];
            let s = seqs.get_mut(&ss.seq).expect("checked in phase 1");
            if let Some(sc) = s.scores.get_mut(g) {
                let scratch = &mut step.score_scratch[pair];
                std::mem::swap(&mut sc.accumulated, &mut scratch.accumulated);
                std::mem::swap(&mut sc.last, &mut scratch.last);
                std::mem::swap(&mut sc.observed, &mut scratch.observed);
            }
            let t = s.table_mut(g);
            let words = bits::words_for(t.num_slots);
            let keep = &step.keep_words[start..start + words];
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
                        &mut [&mut sc.accumulated, &mut sc.last, &mut sc.observed],
                        &mut step.moves,
                    ),
                    None => compactor.apply(t, bs, &mut [], &mut step.moves),
                }
                for &p in &compactor.freed {
                    pool.release(p)?;
                }
                outcome.freed_pages += compactor.freed.len();
                outcome.moved_slots += step.moves.len() - before;
            }
        }
        if self.caching {
            let mut off = 0;
            for ss in &step.seqs {
                let s = seqs.get_mut(&ss.seq).expect("in the step");
                let tokens = &step.tokens[off..off + ss.num_new];
                off += ss.num_new;
                self.register_full_blocks(pool, s, tokens)?;
            }
        }
        step.outcome = outcome;
        step.state = StepState::Retained;
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
            for &page in &t.pages {
                st.pool.retain(page)?;
            }
        }
        st.seqs.insert(child, p);
        Ok(())
    }

    fn free(&self, st: &mut State, seq: SeqId) -> Result<()> {
        let s = st.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        for t in s.tables() {
            for &page in &t.pages {
                st.pool.release(page)?;
            }
        }
        Ok(())
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
        self.core.append_batch(
            &mut self.state,
            &[(seq, tokens)],
            std::slice::from_mut(out),
            None,
        )
    }

    /// See [`KvCache::append_batch`].
    pub fn append_batch(
        &mut self,
        batch: &[(SeqId, &[u32])],
        out: &mut [SlotMapping],
    ) -> Result<()> {
        self.core.append_batch(&mut self.state, batch, out, None)
    }

    /// See [`KvCache::reserve`].
    pub fn reserve(&mut self, batch: &[(SeqId, &[u32])], step: &mut Step) -> Result<()> {
        self.core.reserve(&mut self.state, batch, step)
    }

    /// See [`KvCache::retain`].
    pub fn retain(&mut self, step: &mut Step) -> Result<RetainOutcome> {
        self.core.retain(&mut self.state, step)
    }

    /// See [`KvCache::rollback`].
    pub fn rollback(&mut self, step: &mut Step) -> Result<()> {
        self.core.rollback(&mut self.state, step)
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
        usize::from(t.tail_shared && pool.refcount(t.tail).is_ok_and(|rc| rc > 1))
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
    use crate::retention::{Phase, Retention};
    use crate::step::Step;

    fn cache(policy: Policy, num_pages: usize, bs: usize) -> KvCache {
        KvCache::new(
            Arc::new(policy),
            CacheConfig {
                block_size: bs,
                num_pages,
                bytes_per_token: 8,
                prefix_caching: true,
                ..CacheConfig::default()
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
        let mut step = Step::new();
        for t in 0..20u32 {
            c.reserve(&[(7, &[t])], &mut step).unwrap();
            c.retain(&mut step).unwrap();
            c.check_invariants().unwrap();
        }
        let r = c.read();
        let t = r.table(7, 0).unwrap();
        // 2 sinks + the 3 most recent tokens, renumbered: the table does not grow with the text.
        assert_eq!(t.num_valid(), 5);
        assert!(t.num_slots() <= 5 + 1, "{} slots", t.num_slots());
        assert!(t.num_pages_held() <= 4);
        let kept: Vec<usize> = (0..t.num_slots())
            .filter(|&s| t.is_valid(s))
            .map(|s| t.position(s).unwrap())
            .collect();
        assert_eq!(kept, vec![0, 1, 17, 18, 19]);
        drop(r);
        c.reserve(&[(7, &[99])], &mut step).unwrap();
        assert_eq!(step.position(0), 20);
        assert_eq!(step.cache_position(0, 0), 5);
        // The sinks sit right before the first kept window token (text position 17).
        let r = &step.rerotations()[0];
        assert_eq!(r.first_position, 15);
        assert_eq!(step.rerotation_slots(r).len(), 2);
        c.retain(&mut step).unwrap();
    }

    #[test]
    fn rollback_restores_everything() {
        let p = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .retention(Retention::HeavyHitter {
                heavy: crate::retention::Budget::Tokens(3),
                recent: crate::retention::Budget::Tokens(2),
            })
            .build()
            .unwrap();
        let c = cache(p, 32, 4);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        c.reserve(&[(1, &[1, 2, 3, 4, 5, 6])], &mut step).unwrap();
        c.retain(&mut step).unwrap();
        c.fork(1, 2).unwrap();
        let before = (c.pool_stats(), c.memory(1).unwrap(), c.memory(2).unwrap());
        let tables = |c: &KvCache| {
            let r = c.read();
            (0..2)
                .map(|g| {
                    (
                        r.table(1, g).unwrap().clone(),
                        r.table(2, g).unwrap().clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let t0 = tables(&c);
        c.reserve(&[(1, &[7, 8]), (2, &[9])], &mut step).unwrap();
        assert!(
            step.copies().count() > 0,
            "the forked tails are copied on write"
        );
        c.rollback(&mut step).unwrap();
        assert_eq!(
            (c.pool_stats(), c.memory(1).unwrap(), c.memory(2).unwrap()),
            before
        );
        assert_eq!(tables(&c), t0);
        assert_eq!(c.num_tokens(1).unwrap(), 6);
        c.check_invariants().unwrap();
        assert!(c.rollback(&mut step).is_err(), "nothing to roll back twice");
        assert!(c.retain(&mut step).is_err(), "nothing reserved");
    }

    #[test]
    fn phases_follow_the_declared_prompt() {
        let p = PolicyBuilder::new(LayerMap::identity(1).unwrap())
            .retention(Retention::SnapKv {
                observe: 3,
                budget: crate::retention::Budget::Tokens(5),
                pool: 1,
            })
            .build()
            .unwrap();
        let c = cache(p, 32, 4);
        c.add_sequence(1).unwrap();
        c.set_prompt_len(1, 10).unwrap();
        let mut step = Step::new();
        c.reserve(&[(1, &[0; 4])], &mut step).unwrap();
        assert_eq!(step.phase(0), Phase::Prefill);
        assert!(step.observe_rows(0, 0).is_empty());
        assert!(step.observed_mass_mut(0).is_none());
        c.retain(&mut step).unwrap();
        c.reserve(&[(1, &[0; 6])], &mut step).unwrap();
        assert_eq!(step.phase(0), Phase::PromptEnd);
        assert_eq!(step.observe_rows(0, 0), 3..6);
        // The observation rows attended most to slots 1 and 4.
        let mass = step.observed_mass_mut(0).unwrap();
        assert_eq!(mass.len(), 10);
        mass[1] = 5.0;
        mass[4] = 3.0;
        let out = c.retain(&mut step).unwrap();
        assert_eq!(out.evicted_slots, 5);
        let r = c.read();
        let t = r.table(1, 0).unwrap();
        let kept: Vec<usize> = (0..t.num_slots())
            .filter(|&s| t.is_valid(s))
            .map(|s| t.position(s).unwrap())
            .collect();
        assert_eq!(kept, vec![1, 4, 7, 8, 9]);
        drop(r);
        c.reserve(&[(1, &[0])], &mut step).unwrap();
        assert_eq!(step.phase(0), Phase::Decode);
        c.retain(&mut step).unwrap();
        assert!(c.set_prompt_len(1, 4).is_err());
        c.check_invariants().unwrap();
    }

    #[test]
    fn heavy_hitters_compact_into_fewer_pages() {
        let p = PolicyBuilder::new(LayerMap::identity(1).unwrap())
            .retention(Retention::HeavyHitter {
                heavy: crate::retention::Budget::Tokens(6),
                recent: crate::retention::Budget::Tokens(2),
            })
            .build()
            .unwrap();
        let c = cache(p, 64, 4);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        let mut max_pages = 0;
        for t in 0..200u32 {
            c.reserve(&[(1, &[t])], &mut step).unwrap();
            // Token positions divisible by 7 draw attention and become heavy hitters.
            let r = c.read();
            let table = r.table(1, 0).unwrap();
            let weights: Vec<f32> = (0..table.num_slots())
                .map(|s| {
                    let p = table.position(s).unwrap();
                    if p % 7 == 0 {
                        1.0 + p as f32 / 1000.0
                    } else {
                        0.01
                    }
                })
                .collect();
            drop(r);
            step.mass_mut(0).unwrap().copy_from_slice(&weights);
            c.retain(&mut step).unwrap();
            c.check_invariants().unwrap();
            max_pages = max_pages.max(c.memory(1).unwrap().pages_per_group[0]);
        }
        // 8 kept tokens: 2 pages dense, 3 with the one page of slack compaction allows.
        assert!(max_pages <= 3, "{max_pages} pages");
        let r = c.read();
        let t = r.table(1, 0).unwrap();
        assert!(t.num_slots() < 12);
        let kept: Vec<usize> = (0..t.num_slots())
            .filter(|&s| t.is_valid(s))
            .map(|s| t.position(s).unwrap())
            .collect();
        // Early multiples of 7 accumulated the most mass: H2O keeps them.
        assert_eq!(kept, vec![0, 7, 14, 21, 28, 35, 198, 199]);
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
            c.read().view(1, 5).unwrap_err(),
            Error::UnknownGroup { group: 5, .. }
        ));
        let mut step = Step::new();
        assert_eq!(
            c.reserve(&[(1, &[1]), (1, &[2])], &mut step).unwrap_err(),
            Error::InvalidConfig("sequence 1 appears twice in one step".into())
        );
        assert!(KvCache::new(
            Arc::new(Policy::identity(1).unwrap()),
            CacheConfig {
                block_size: 0,
                num_pages: 1,
                bytes_per_token: 1,
                ..CacheConfig::default()
            }
        )
        .is_err());
    }
}
