//! [`KvCache`]: the manager. Per sequence it keeps one [`BlockTable`] per KV group of the
//! policy (layers that read another layer's KV have no table and hold no pages), the
//! retention's per-slot scores, the prompt length and the StreamingLLM sink shift, and it runs
//! the step protocol ([`crate::Step`]) that any engine drives around its attention kernels:
//! [`KvCache::reserve`] slots (a [`Reservation`]), write K/V and attend,
//! [`Reservation::retain`] (or drop the reservation to roll back).
//!
//! Every mutating call is all-or-nothing: it checks the pool and its arguments first, and an
//! error leaves every table, refcount, score and counter as it was. One `RwLock` guards the
//! state: reserves, retains, forks and frees take it exclusively for O(tokens + live slots)
//! work; views for the kernels share it ([`KvCache::read`]). `KvCache` is `Send + Sync`.
//!
//! The module's files follow its concepts: [`sequence`](self) state (tables, scores), reserve
//! and its undo, retain and compaction decisions, prefix caching, the guard, and the invariant
//! checks.
//!
//! Hot path: `reserve` with a reused [`crate::Step`] allocates nothing once the sequence's
//! tables and the buffers have grown (tables grow by doubling and keep their capacity when
//! retention shrinks them).

mod adopt;
mod check;
mod guard;
mod prefix;
mod reserve;
mod retain;
mod scores;
mod scratch;
mod sequence;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard};

use crate::compact::Compactor;
use crate::config::{group_window, layer_window, CacheConfig};
use crate::error::{Error, Result};
use crate::ids::SeqId;
use crate::map::GroupId;
use crate::policy::LayerKvPolicy;
use crate::pool::{BlockPool, PoolStats};
use crate::retention::ScoreNeed;
use crate::step::Step;
use crate::table::{BlockTable, TableView};

pub use guard::Reservation;
pub(crate) use scores::GroupScores;
use scratch::RetainScratch;
use sequence::{Sequence, State};

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

/// A deep copy of one sequence's bookkeeping ([`KvCache::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSnapshot {
    /// Tokens appended so far.
    pub num_tokens: usize,
    /// The declared (or first step's) prompt length.
    pub prompt_len: Option<usize>,
    /// One table per group.
    pub tables: Vec<BlockTable>,
    /// Per group: the accumulated, last-step and observed per-slot scores (empty where the
    /// group's retention needs none).
    pub scores: Vec<[Vec<f32>; 4]>,
    /// Per group: the position the sinks are rotated to (empty without sinks).
    pub sink_shift: Vec<usize>,
    /// Prefix caching: the token-chain hash after each full block, and the partial block.
    pub prefix: (Vec<u64>, Vec<u32>),
}

/// A deep copy of the cache's bookkeeping: what a failed step must leave exactly as it was.
/// Equality ignores the pool's high-water mark (see [`PoolStats`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSnapshot {
    /// Pool counters.
    pub pool: PoolStats,
    /// Pages held by reserved steps (sorted).
    pub pinned: Vec<crate::pool::PageId>,
    /// Every sequence, by id.
    pub sequences: std::collections::BTreeMap<SeqId, SequenceSnapshot>,
}

/// The KV-cache manager for one model and one policy.
#[derive(Debug)]
pub struct KvCache {
    core: Core,
    state: RwLock<State>,
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

    /// Pages steps hold outside any table, counted as used by the pool: shared pages reserved
    /// steps copied away from (copy-on-write sources, until they retain or roll back), and
    /// pages a [`Reservation::retain_with`] emptied (until its moves ran).
    pub fn pinned_pages(&self) -> &[crate::pool::PageId] {
        &self.state.pinned
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
        if config.lanes == 0 {
            return Err(Error::InvalidConfig(
                "lanes must be positive (1, or the model's KV heads for a per-head policy)".into(),
            ));
        }
        if config.lanes > 1 && !policy.per_head() {
            return Err(Error::InvalidConfig(format!(
                "{} lanes per group, but the policy keeps one set of tokens per group \
                 (lanes above 1 are for per-head policies)",
                config.lanes
            )));
        }
        let map = policy.layer_map();
        if let Some(layer) = (0..map.num_layers()).find(|&l| map.is_sliding(l)) {
            if config.sliding_window.is_none() {
                return Err(Error::InvalidConfig(format!(
                    "layer {layer} is a sliding-window layer of the map but the cache config sets no sliding_window"
                )));
            }
        }
        // Lanes are groups of the lane map; everything below indexes by lane.
        let lanes = config.lanes;
        let map = map.lanes(lanes)?;
        let groups = map.num_groups();
        let windows: Vec<Option<usize>> = (0..groups)
            .map(|g| group_window(&map, g, config.sliding_window, config.model_window))
            .collect();
        if policy.lanes_named() > lanes {
            return Err(Error::InvalidConfig(format!(
                "the policy gives KV head {} a retention of its own, but the cache has {lanes} \
                 lane(s) per group (the model's KV heads for a per-head policy)",
                policy.lanes_named() - 1
            )));
        }
        let retention = |lane: usize| policy.lane_retention(lane / lanes, lane % lanes);
        let needs: Vec<ScoreNeed> = (0..groups).map(|g| retention(g).score_need()).collect();
        let sinks: Vec<usize> = (0..groups).map(|g| retention(g).sinks()).collect();
        let evicts: Vec<bool> = (0..groups)
            .map(|g| !retention(g).is_full() || windows[g].is_some())
            .collect();
        Ok(Self {
            core: Core {
                map,
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
                scratch: RetainScratch::default(),
                pinned: Vec::new(),
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

    /// Lanes per KV group ([`CacheConfig::lanes`]): with more than one, every [`GroupId`] the
    /// cache takes and reports (step slots, views, scores, [`MemoryReport::pages_per_group`]) is
    /// a lane, [`KvCache::lane`].
    pub fn lanes(&self) -> usize {
        self.core.config.lanes
    }

    /// The allocator group of KV head `head` of the policy's group `group`:
    /// `group * lanes + head` (`group` itself with one lane).
    pub fn lane(&self, group: GroupId, head: usize) -> GroupId {
        group * self.core.config.lanes + head
    }

    /// Whether any allocator group can drop tokens (a retention that is not `Full`, for any
    /// lane, or a window): such a policy prefills long prompts in chunks.
    pub fn evicts(&self) -> bool {
        self.core.evicts.iter().any(|&e| e)
    }

    /// Allocator groups: the policy's groups times [`KvCache::lanes`].
    pub fn num_groups(&self) -> usize {
        self.core.num_groups()
    }

    /// Whether prefix caching is active (requested and the policy never evicts).
    pub fn prefix_caching(&self) -> bool {
        self.core.caching
    }

    /// The attention window of `layer` in cache slots (`None`: full attention). Engines pass it
    /// to the kernels so the cache and the kernels agree.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let c = &self.core.config;
        layer_window(
            self.core.policy.layer_map(),
            layer,
            c.sliding_window,
            c.model_window,
        )
    }

    /// The window beyond which no reader of `group` (an allocator group: a lane with lanes)
    /// looks (every reader slides), so the cache frees what falls out of it.
    pub fn group_window(&self, group: GroupId) -> Option<usize> {
        self.core.windows.get(group).copied().flatten()
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
    /// [`crate::Phase::Prefill`], the step that appends its last token is [`crate::Phase::PromptEnd`] (SnapKV
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

    /// The prompt length of `seq`: declared, or taken from its first step; `None` before.
    pub fn prompt_len(&self, seq: SeqId) -> Result<Option<usize>> {
        let st = self.state.read();
        Ok(st
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq))?
            .prompt_len)
    }

    /// A deep copy of every sequence's tables, scores, counters and the pool's counters, for
    /// tests and debugging: compare one taken before a step with one taken after it failed.
    /// O(pages + slots).
    pub fn snapshot(&self) -> CacheSnapshot {
        let st = self.state.read();
        let mut pinned = st.pinned.clone();
        pinned.sort_unstable();
        let groups = self.core.num_groups();
        let sequences = st
            .seqs
            .iter()
            .map(|(&id, s)| {
                let scores = (0..groups)
                    .map(|g| match s.scores.get(g) {
                        Some(sc) => [
                            sc.accumulated.clone(),
                            sc.last.clone(),
                            sc.observed.clone(),
                            sc.probed.clone(),
                        ],
                        None => Default::default(),
                    })
                    .collect();
                let snap = SequenceSnapshot {
                    num_tokens: s.num_tokens,
                    prompt_len: s.prompt_len,
                    tables: s.tables().cloned().collect(),
                    scores,
                    sink_shift: s.sink_shift.clone(),
                    prefix: (s.chain.clone(), s.partial.clone()),
                };
                (id, snap)
            })
            .collect();
        CacheSnapshot {
            pool: st.pool.stats(),
            pinned,
            sequences,
        }
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

    /// Step protocol 1/3: reserves slots for a batch (all or nothing across it) and plans what
    /// the engine executes before attention: page copies, sink re-rotations, which rows are
    /// sinks, which rows' attention mass each group needs (see [`Step`]). The returned
    /// [`Reservation`] derefs to the step; [`Reservation::retain`] commits it, and dropping it
    /// uncommitted rolls the step back, so an early `?` cannot leave the cache reserved.
    ///
    /// Fails with [`Error::PoolExhausted`] (the engine's preemption signal) without changing
    /// anything.
    pub fn reserve<'a>(
        &'a self,
        batch: &[(SeqId, &[u32])],
        step: &'a mut Step,
    ) -> Result<Reservation<'a>> {
        self.reserve_unguarded(batch, step)?;
        Ok(Reservation::new(self, step))
    }

    /// [`KvCache::reserve`] without the guard, for callers in the crate that retry a reserve
    /// in a loop (the scheduler) and wrap the step in a [`Reservation`] once it succeeds.
    pub(crate) fn reserve_unguarded(
        &self,
        batch: &[(SeqId, &[u32])],
        step: &mut Step,
    ) -> Result<()> {
        self.core
            .reserve(&mut self.state.write(), batch, step, None)
    }

    /// Reserves a **probe step** (KVzip's scoring pass): like [`KvCache::reserve`], but the
    /// step's tokens are scored and then dropped. Each sequence's first `prefix` rows (KVzip's
    /// "repeat the context" request) are attended but not scored; the rows after them replay
    /// the prompt tokens at text positions `replayed`. The engine runs the layers on it as on
    /// any step: every layer reading a group whose retention needs probes hands back the mass
    /// of the scored rows ([`Step::observe_rows`]) through [`Step::observed_mass_mut`], as
    /// SnapKV's observation rows do (peak weights, `paged_attention_peak`, in the kernels'
    /// executor). [`Reservation::finish_probe`] then keeps, for each slot at a `replayed`
    /// position, the most mass of any probe so far, and rolls the tokens back. Run probes after
    /// a prompt's other tokens and before its last, so the retention decides with them at the
    /// prompt's end; [`crate::Retention::probe_chunk`] says how many prompt tokens one probe
    /// replays.
    pub fn reserve_probe<'a>(
        &'a self,
        batch: &[(SeqId, &[u32])],
        prefix: usize,
        replayed: std::ops::Range<usize>,
        step: &'a mut Step,
    ) -> Result<Reservation<'a>> {
        self.core.reserve(
            &mut self.state.write(),
            batch,
            step,
            Some((prefix, replayed)),
        )?;
        Ok(Reservation::new(self, step))
    }

    /// A child sequence that shares every page of `parent` (refcounts + 1) and a copy of its
    /// scores, prompt length and sink state; the first append into a shared partial page
    /// copies it (see [`Step::copies`]).
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
            bytes_per_layer[map.owner(g / self.core.config.lanes)] +=
                pages * self.core.config.page_bytes();
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

    /// Starts a new high-water measurement: [`PoolStats::peak_used`] becomes the pages in use
    /// now, and from here on counts the most pages in use at any moment (inside steps too,
    /// where a chunked prompt or a copy-on-write peaks).
    pub fn reset_peak(&self) {
        self.state.write().pool.reset_peak();
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
}

/// The immutable half of a cache: policy, sizes, per-group facts derived once.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) policy: Arc<dyn LayerKvPolicy>,
    /// The policy's map with [`CacheConfig::lanes`] lanes per group: its groups are the
    /// allocator's.
    pub(crate) map: crate::map::LayerMap,
    pub(crate) config: CacheConfig,
    pub(crate) caching: bool,
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

impl Core {
    pub(crate) fn empty_sequence(&self) -> Sequence {
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
        self.map.num_groups()
    }

    /// The retention of allocator group `lane` (its own under a per-lane role, else its policy
    /// group's).
    pub(crate) fn retention(&self, lane: GroupId) -> &crate::retention::Retention {
        let lanes = self.config.lanes;
        self.policy.lane_retention(lane / lanes, lane % lanes)
    }

    pub(crate) fn add_sequence(&self, st: &mut State, seq: SeqId) -> Result<()> {
        if st.seqs.contains_key(&seq) {
            return Err(Error::SequenceExists(seq));
        }
        st.seqs.insert(seq, self.empty_sequence());
        Ok(())
    }

    pub(crate) fn fork(&self, st: &mut State, parent: SeqId, child: SeqId) -> Result<()> {
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

    pub(crate) fn free(&self, st: &mut State, seq: SeqId) -> Result<()> {
        let s = st.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        for t in s.tables() {
            for &page in &t.pages {
                st.pool.release(page)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::LayerMap;
    use crate::policy::{Policy, PolicyBuilder};
    use crate::retention::{Phase, Retention};
    use crate::step::Step;

    /// Appends `tokens` to `seq` as one committed step.
    fn append(c: &KvCache, seq: SeqId, tokens: &[u32], step: &mut Step) -> Result<()> {
        c.reserve(&[(seq, tokens)], step)?.retain().map(|_| ())
    }

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
        let mut step = Step::new();
        let reserved = c.reserve(&[(1, &[1, 2, 3, 4, 5])], &mut step).unwrap();
        assert_eq!(reserved.slots(0, 0).len(), 5);
        assert_eq!(reserved.group_slots(1).len(), 5);
        reserved.retain().unwrap();
        let r = c.memory(1).unwrap();
        assert_eq!(r.pages_per_group, vec![2, 2]);
        assert_eq!(r.bytes_per_layer, vec![64, 0, 64, 0]);
        assert_eq!(r.total_bytes, 128);
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
            append(&c, 7, &[t], &mut step).unwrap();
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
        let num_slots = t.num_slots();
        drop(r);
        let reserved = c.reserve(&[(7, &[99])], &mut step).unwrap();
        assert_eq!(reserved.position(0), 20);
        assert_eq!(reserved.first_slot(0, 0), num_slots);
        // The sinks sit right before the first kept window token (text position 17).
        let r = &reserved.rerotations()[0];
        assert_eq!(r.position, 15);
        assert_eq!(reserved.rerotation_slots(r).len(), 2);
        reserved.retain().unwrap();
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
        append(&c, 1, &[1, 2, 3, 4, 5, 6], &mut step).unwrap();
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
        let reserved = c.reserve(&[(1, &[7, 8]), (2, &[9])], &mut step).unwrap();
        assert!(
            !reserved.copies().is_empty(),
            "the forked tails are copied on write"
        );
        reserved.rollback().unwrap();
        assert_eq!(
            (c.pool_stats(), c.memory(1).unwrap(), c.memory(2).unwrap()),
            before
        );
        assert_eq!(tables(&c), t0);
        assert_eq!(c.num_tokens(1).unwrap(), 6);
        c.check_invariants().unwrap();
        // Dropping an uncommitted reservation rolls back the same way.
        drop(c.reserve(&[(1, &[7, 8]), (2, &[9])], &mut step).unwrap());
        assert_eq!(
            (c.pool_stats(), c.memory(1).unwrap(), c.memory(2).unwrap()),
            before
        );
        assert_eq!(tables(&c), t0);
        c.check_invariants().unwrap();
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
        let mut reserved = c.reserve(&[(1, &[0; 4])], &mut step).unwrap();
        assert_eq!(reserved.phase(0), Phase::Prefill);
        assert!(reserved.observe_rows(0, 0).is_empty());
        assert!(reserved.observed_mass_mut(0).is_none());
        reserved.retain().unwrap();
        let mut reserved = c.reserve(&[(1, &[0; 6])], &mut step).unwrap();
        assert_eq!(reserved.phase(0), Phase::PromptEnd);
        assert_eq!(reserved.observe_rows(0, 0), 3..6);
        // The observation rows attended most to slots 1 and 4.
        let mass = reserved.observed_mass_mut(0).unwrap();
        assert_eq!(mass.len(), 10);
        mass[1] = 5.0;
        mass[4] = 3.0;
        let out = reserved.retain().unwrap();
        assert_eq!(out.evicted_slots, 5);
        let r = c.read();
        let t = r.table(1, 0).unwrap();
        let kept: Vec<usize> = (0..t.num_slots())
            .filter(|&s| t.is_valid(s))
            .map(|s| t.position(s).unwrap())
            .collect();
        assert_eq!(kept, vec![1, 4, 7, 8, 9]);
        drop(r);
        let reserved = c.reserve(&[(1, &[0])], &mut step).unwrap();
        assert_eq!(reserved.phase(0), Phase::Decode);
        reserved.retain().unwrap();
        assert!(c.set_prompt_len(1, 4).is_err());
        c.check_invariants().unwrap();
    }

    /// One layer under KVzip keeping 4 tokens, probes of 3, pages of 4 slots.
    fn kvzip_cache() -> KvCache {
        let p = PolicyBuilder::new(LayerMap::identity(1).unwrap())
            .retention(Retention::KvZip {
                budget: crate::retention::Budget::Tokens(4),
                chunk: 3,
                pool: 1,
                prefill: false,
            })
            .build()
            .unwrap();
        cache(p, 32, 4)
    }

    #[test]
    fn probes_score_the_prompt_and_leave_nothing_else() {
        let c = kvzip_cache();
        c.add_sequence(1).unwrap();
        c.set_prompt_len(1, 9).unwrap();
        let mut step = Step::new();
        let mut reserved = c.reserve(&[(1, &[0; 8])], &mut step).unwrap();
        assert!(
            reserved.mass_mut(0).is_none(),
            "a prompt step of KVzip needs no mass"
        );
        reserved.retain().unwrap();
        let before = (c.snapshot(), c.pool_stats());
        // Two probes of 6 tokens each (a new page): the most mass per slot stays.
        for (hot, m) in [([1usize, 5], 2.0f32), ([5, 6], 3.0)] {
            let mut reserved = c
                .reserve_probe(&[(1, &[0; 6])], 2, 0..7, &mut step)
                .unwrap();
            assert!(reserved.is_probe());
            assert_eq!(
                reserved.observe_rows(0, 0),
                2..6,
                "the prefix is not scored"
            );
            assert!(reserved.mass_mut(0).is_none());
            let mass = reserved.observed_mass_mut(0).unwrap();
            assert_eq!(mass.len(), 14);
            mass.fill(0.5);
            for h in hot {
                mass[h] = m;
            }
            // The probe's own rows are not scored.
            mass[9] = 100.0;
            reserved.finish_probe().unwrap();
        }
        let (after, pool) = (c.snapshot(), c.pool_stats());
        assert_eq!(pool, before.1, "a probe holds no page afterwards");
        let (a, b) = (&after.sequences[&1], &before.0.sequences[&1]);
        assert_eq!((&a.tables, a.num_tokens), (&b.tables, b.num_tokens));
        assert_eq!(
            a.scores[0][3][..7],
            [0.5, 2.0, 0.5, 0.5, 0.5, 3.0, 3.0],
            "max over probes, per slot they replayed"
        );
        assert_eq!(
            a.scores[0][3][7],
            f32::INFINITY,
            "position 7 was not replayed"
        );
        c.check_invariants().unwrap();
        // A probe step cannot be kept; a plain step cannot end as a probe.
        let reserved = c.reserve_probe(&[(1, &[0])], 0, 0..8, &mut step).unwrap();
        assert!(reserved.retain().is_err());
        assert_eq!(c.pool_stats(), pool);
        let reserved = c.reserve(&[(1, &[0])], &mut step).unwrap();
        assert!(reserved.finish_probe().is_err());
        assert_eq!(c.snapshot().sequences[&1].tables, a.tables);
        // The prompt's last token: the top 2 probed slots plus the two unprobed tokens.
        let reserved = c.reserve(&[(1, &[0])], &mut step).unwrap();
        assert_eq!(reserved.phase(0), Phase::PromptEnd);
        assert_eq!(reserved.retain().unwrap().evicted_slots, 5);
        let r = c.read();
        let t = r.table(1, 0).unwrap();
        let kept: Vec<usize> = (0..t.num_slots())
            .filter(|&s| t.is_valid(s))
            .map(|s| t.position(s).unwrap())
            .collect();
        assert_eq!(kept, vec![5, 6, 7, 8]);
        drop(r);
        c.check_invariants().unwrap();
    }

    #[test]
    fn kvzip_without_probes_is_an_error() {
        let c = kvzip_cache();
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        let before = c.pool_stats();
        let e = c
            .reserve(&[(1, &[0; 9])], &mut step)
            .unwrap()
            .retain()
            .unwrap_err();
        assert!(e.to_string().contains("probe"), "{e}");
        assert_eq!(c.pool_stats(), before);
        assert_eq!(c.num_tokens(1).unwrap(), 0);
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
            let mut reserved = c.reserve(&[(1, &[t])], &mut step).unwrap();
            // Token positions divisible by 7 draw attention and become heavy hitters.
            let r = c.read();
            let table = r.table(1, 0).unwrap();
            let weights: Vec<f32> = (0..table.num_slots())
                .map(|s| {
                    let p = table.position(s).unwrap();
                    if p.is_multiple_of(7) {
                        1.0 + p as f32 / 1000.0
                    } else {
                        0.01
                    }
                })
                .collect();
            drop(r);
            reserved.mass_mut(0).unwrap().copy_from_slice(&weights);
            reserved.retain().unwrap();
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
        let mut step = Step::new();
        append(&c, 1, &[0; 4], &mut step).unwrap();
        let before = (c.pool_stats(), c.memory(1).unwrap());
        let err = c.reserve(&[(1, &[0])], &mut step).unwrap_err();
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
    fn batched_reserve_is_all_or_nothing() {
        let c = cache(Policy::identity(2).unwrap(), 6, 4);
        c.add_sequence(1).unwrap();
        c.add_sequence(2).unwrap();
        let mut step = Step::new();
        let reserved = c.reserve(&[(1, &[1, 2]), (2, &[3])], &mut step).unwrap();
        assert_eq!(reserved.slots(0, 1).len(), 2);
        assert_eq!(reserved.slots(1, 0).len(), 1);
        assert_eq!(reserved.rows(1), 2..3);
        reserved.retain().unwrap();
        let before = c.pool_stats();
        let err = c
            .reserve(&[(1, &[0; 3]), (2, &[0; 12])], &mut step)
            .unwrap_err();
        assert_eq!(
            err,
            Error::PoolExhausted {
                requested: 8,
                available: 2
            }
        );
        assert_eq!(c.pool_stats(), before);
        assert!(step.is_empty(), "a failed reserve plans nothing");
        assert_eq!(
            c.reserve(&[(1, &[0]), (9, &[0])], &mut step).unwrap_err(),
            Error::UnknownSequence(9)
        );
        assert_eq!(c.num_tokens(1).unwrap(), 2);
        c.check_invariants().unwrap();
    }

    #[test]
    fn fork_shares_and_copies_on_write() {
        let c = cache(Policy::identity(1).unwrap(), 8, 4);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        append(&c, 1, &[1, 2, 3, 4, 5, 6], &mut step).unwrap();
        c.fork(1, 2).unwrap();
        assert_eq!(c.pool_stats().num_used, 2);
        let reserved = c.reserve(&[(2, &[7])], &mut step).unwrap();
        assert_eq!(reserved.copies().len(), 1);
        let copy = reserved.copies()[0];
        assert_eq!(reserved.slots(0, 0), &[copy.dst * 4 + 2]);
        reserved.retain().unwrap();
        // The parent keeps writing into its own page without a copy.
        let reserved = c.reserve(&[(1, &[8])], &mut step).unwrap();
        assert!(reserved.copies().is_empty());
        assert_eq!(reserved.slots(0, 0), &[copy.src * 4 + 2]);
        reserved.retain().unwrap();
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
        let mut step = Step::new();
        append(&c, 1, &prompt, &mut step).unwrap();
        c.free(1).unwrap();
        assert_eq!(c.pool_stats().num_cached, 2);
        assert_eq!(c.add_sequence_with_prefix(2, &prompt).unwrap(), 4);
        assert_eq!(c.pool_stats().prefix_hits, 2);
        let reserved = c.reserve(&[(2, &prompt[4..])], &mut step).unwrap();
        assert_eq!(reserved.first_slot(0, 0), 4);
        reserved.retain().unwrap();
        c.check_invariants().unwrap();
        // Another prompt prefix misses.
        assert_eq!(c.add_sequence_with_prefix(3, &[5, 6, 7, 0, 9]).unwrap(), 2);
        assert_eq!(c.add_sequence_with_prefix(4, &[1, 6, 7, 8, 9]).unwrap(), 0);
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let c = cache(Policy::identity(2).unwrap(), 8, 4);
        let mut step = Step::new();
        assert_eq!(
            c.reserve(&[(1, &[1])], &mut step).unwrap_err(),
            Error::UnknownSequence(1)
        );
        c.add_sequence(1).unwrap();
        assert_eq!(c.add_sequence(1).unwrap_err(), Error::SequenceExists(1));
        assert!(matches!(
            c.read().view(1, 5).unwrap_err(),
            Error::UnknownGroup { group: 5, .. }
        ));
        assert_eq!(
            c.reserve(&[(1, &[1]), (1, &[2])], &mut step).unwrap_err(),
            Error::InvalidConfig("sequence 1 appears twice in one step".into())
        );
        assert!(matches!(
            c.reserve(&[(1, &[])], &mut step).unwrap_err(),
            Error::InvalidConfig(_)
        ));
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
