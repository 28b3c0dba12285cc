//! [`StepExecutor`]: executes the step protocol's plans on a [`KvStore`], so an engine's loop
//! is reserve, then per layer [`StepExecutor::write`] and [`StepExecutor::attend`], then retain
//! and [`StepExecutor::finish`], with nothing else to remember:
//!
//! - [`StepExecutor::begin`]: page copies (copy-on-write after a fork), then StreamingLLM sink
//!   re-rotations from the executor's own stash of the sinks' pre-RoPE keys;
//! - [`StepExecutor::write`]: an owner layer's K (rotated) and V into the step's slots, staging
//!   a deep copy of the pre-RoPE keys of rows that become sinks;
//! - [`StepExecutor::attend`]: paged attention of one layer over its group's tables, adding the
//!   attention mass (and SnapKV's observation mass) into the step's buffers where the group
//!   needs it;
//! - [`StepExecutor::finish`], inside [`layerkv::Reservation::retain_with`]: compaction
//!   moves (gathered, then scattered), then the staged sink keys join the stash.
//! - [`StepExecutor::abort`], when the step fails anywhere after `begin`: the sinks' keys that
//!   re-rotation overwrote in place are written back and the staged keys dropped, so with the
//!   cache's rollback the store's rows for live slots are as before the step. (Without it the
//!   cache would roll the sink shift back while the store kept the keys rotated for the failed
//!   step, and a next step that plans no re-rotation would attend to wrongly rotated sinks.)
//!
//! The stash holds `sinks x kv_heads x head_dim` keys per (sequence, group) with sinks:
//! O(sinks) work per step, independent of the stream's length.

use std::collections::HashMap;

use candle_core::Tensor;
use layerkv::{GroupId, KvCache, SeqId, Step};

use crate::error::{KernelError, Result};
use crate::store::{GatheredMoves, KvStore};
use crate::view::{AttentionParams, SeqQuery};
use crate::{
    lane_major, model_major, paged_attention, paged_attention_lanes, paged_attention_peak,
};

/// How keys are rotated (the model's RoPE): the executor re-rotates sinks with it.
pub trait KeyRotation {
    /// `keys` `[rows, kv_heads, head_dim]` (pre-RoPE), row `j` rotated at `positions[j]`.
    fn rotate_keys(&self, keys: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor>;
}

/// The kernel's queries for `group`: lane by lane ([`KvCache::lane`]), each step sequence over
/// the lane's table, lane `h`'s rows starting at `h * lane_rows` (the lane-major query layout;
/// `lane_rows` 0 for [`paged_attention_lanes`]' every lane at the step's own rows, as without
/// lanes).
fn lane_queries<'a>(
    step: &Step,
    reader: &'a layerkv::CacheReader<'_>,
    cache: &KvCache,
    group: GroupId,
    lane_rows: usize,
) -> Result<Vec<SeqQuery<'a>>> {
    let mut seqs = Vec::with_capacity(cache.lanes() * step.len());
    for h in 0..cache.lanes() {
        let lane = cache.lane(group, h);
        for i in 0..step.len() {
            seqs.push(SeqQuery {
                kv: reader.view(step.seq(i), lane)?,
                q_start: h * lane_rows + step.rows(i).start,
                num_q: step.num_new(i),
                first_slot: step.first_slot(i, lane),
            });
        }
    }
    Ok(seqs)
}

/// Copies of a probe step's [`Step::probe_seen`] masks, one per query of `lane_queries`
/// (empty outside probe steps: no allocation there).
fn probe_seen(step: &Step, cache: &KvCache, group: GroupId, queries: usize) -> Vec<Vec<u64>> {
    if !step.is_probe() {
        return Vec::new();
    }
    let n = step.len().max(1);
    (0..queries)
        .map(|k| {
            step.probe_seen(k % n, cache.lane(group, k / n))
                .map(<[u64]>::to_vec)
                .unwrap_or_default()
        })
        .collect()
}

/// Executes a step's plans on a store and owns the sinks' pre-RoPE keys. See the module docs.
#[derive(Debug, Default)]
pub struct StepExecutor {
    /// Pre-RoPE keys of each sequence's StreamingLLM sinks, per group (deep copies).
    sinks: HashMap<(SeqId, GroupId), Tensor>,
    /// Sink keys captured during the current step, committed by `finish`.
    staged: HashMap<(SeqId, GroupId), Tensor>,
    /// Keys the current step's re-rotations overwrote, with their slots, for `abort`.
    overwritten: Vec<(Vec<u32>, Tensor)>,
    positions: Vec<usize>,
    rows: Vec<u32>,
    /// Attention mass of every lane of a group, lane-major (lanes only).
    mass: Vec<f32>,
}

impl StepExecutor {
    /// An executor with an empty stash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Before the layers of a reserved step: [`StepExecutor::copy_pages`], then
    /// [`StepExecutor::rerotate`].
    pub fn begin(
        &mut self,
        step: &Step,
        store: &mut KvStore,
        rope: &dyn KeyRotation,
    ) -> Result<()> {
        self.copy_pages(step, store)?;
        self.rerotate(step, store, rope)
    }

    /// The step's page copies (copy-on-write after a fork), into pages only this step holds.
    /// Drops what an unfinished earlier step staged.
    pub fn copy_pages(&mut self, step: &Step, store: &mut KvStore) -> Result<()> {
        self.staged.clear();
        self.overwritten.clear();
        for c in step.copies() {
            store.copy_page(c.src, c.dst)?;
        }
        Ok(())
    }

    /// The step's sink re-rotations: the sinks' stashed pre-RoPE keys rotated by `rope` at
    /// their new positions, written in place (the keys they replace are kept for
    /// [`StepExecutor::abort`]). After [`StepExecutor::copy_pages`].
    pub fn rerotate(
        &mut self,
        step: &Step,
        store: &mut KvStore,
        rope: &dyn KeyRotation,
    ) -> Result<()> {
        for r in step.rerotations() {
            let seq = step.seq(r.index);
            let slots = step.rerotation_slots(r);
            let keys = self.sinks.get(&(seq, r.group)).ok_or_else(|| {
                KernelError::Invalid(format!(
                    "sequence {seq} group {}: sink keys were never written through this \
                     executor",
                    r.group
                ))
            })?;
            let n = slots.len().min(keys.dim(0)?);
            self.positions.clear();
            self.positions.extend((0..n).map(|j| r.position + j));
            let k = rope.rotate_keys(&keys.narrow(0, 0, n)?, &self.positions)?;
            let old = store.read_keys(&slots[..n])?;
            store.write_keys(&slots[..n], &k)?;
            self.overwritten.push((slots[..n].to_vec(), old));
        }
        Ok(())
    }

    /// Writes an owner layer's K/V of every row of the step into `group`'s slots: `k` pre-RoPE
    /// (the rows that become sinks are staged from it), `k_rotated` at the rows' positions, all
    /// `[rows, kv_heads, head_dim]`. With lanes ([`KvCache::lanes`]), KV head `h` goes to lane
    /// [`KvCache::lane`]`(group, h)`, whose pages hold one head. Writing a group again in the
    /// same step (an iterative prefill pass) replaces what the earlier pass staged.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        step: &Step,
        store: &mut KvStore,
        cache: &KvCache,
        group: GroupId,
        k: &Tensor,
        k_rotated: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let lanes = cache.lanes();
        if lanes == 1 {
            return self.write_lane(step, store, group, k, k_rotated, v);
        }
        if k.dim(1)? != lanes {
            return Err(KernelError::Shape {
                what: "k",
                expected: format!("{lanes} KV heads (one per lane)"),
                actual: k.dims().to_vec(),
            });
        }
        for h in 0..lanes {
            let head = |t: &Tensor| t.narrow(1, h, 1);
            let lane = cache.lane(group, h);
            self.write_lane(step, store, lane, &head(k)?, &head(k_rotated)?, &head(v)?)?;
        }
        Ok(())
    }

    /// [`StepExecutor::write`] into one allocator group (a lane, or a group without lanes).
    fn write_lane(
        &mut self,
        step: &Step,
        store: &mut KvStore,
        group: GroupId,
        k: &Tensor,
        k_rotated: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        for i in 0..step.len() {
            let r = step.sink_rows(i, group);
            if r.is_empty() {
                continue;
            }
            let rows = k.narrow(0, step.rows(i).start + r.start, r.len())?.copy()?;
            self.staged.insert((step.seq(i), group), rows);
        }
        store.write(step.group_slots(group), k_rotated, v)
    }

    /// Paged attention of one layer reading `group`, `q` `[rows, heads, head_dim]` for every
    /// row of the step. Adds the layer's attention mass into the step's buffers where the
    /// group needs scores, and runs SnapKV's observation rows once more into the observation
    /// buffer. With lanes, query head `j` reads lane `j / (heads / lanes)`: one kernel call
    /// runs every (sequence, lane) pair, and each lane's mass lands in its own buffer.
    pub fn attend(
        &mut self,
        q: &Tensor,
        store: &KvStore,
        cache: &KvCache,
        step: &mut Step,
        group: GroupId,
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let lanes = cache.lanes();
        if lanes == 1 {
            return self.attend_group(q, store, cache, step, group, params);
        }
        let (rows, heads, _) = q.dims3()?;
        if heads % lanes != 0 {
            return Err(KernelError::Shape {
                what: "q",
                expected: format!("a multiple of {lanes} heads (one group per lane)"),
                actual: q.dims().to_vec(),
            });
        }
        let reader = cache.read();
        let wants_mass = (0..lanes).any(|h| step.mass_mut(cache.lane(group, h)).is_some());
        let observed = (0..lanes).any(|h| step.observed_mass_mut(cache.lane(group, h)).is_some());
        if !wants_mass && !observed {
            // Queries and output in the model's layout: every lane of a sequence at its rows.
            let seqs = lane_queries(step, &reader, cache, group, 0)?;
            return paged_attention_lanes(q, store, lanes, &seqs, params);
        }
        // Lane-major queries: rows of lane h are h * rows .. (h + 1) * rows, each a sequence of
        // the kernel's over the lane's table.
        let q_lanes = lane_major(q, lanes)?;
        let seqs = lane_queries(step, &reader, cache, group, rows)?;
        let out = if wants_mass {
            let out = self.attend_scratch(&q_lanes, store, &seqs, params)?;
            self.add_lane_mass(step, cache, group, &seqs, |s, l| s.mass_mut(l));
            out
        } else {
            paged_attention(&q_lanes, store, &seqs, params, None)?
        };
        if observed {
            let seen = probe_seen(step, cache, group, seqs.len());
            let obs = self.observation_queries(step, cache, group, &seqs, &seen);
            let idx = Tensor::new(self.rows.as_slice(), q.device())?;
            let q_obs = q_lanes.index_select(&idx, 0)?;
            let peak = step.is_probe();
            self.mass.clear();
            self.mass
                .resize(obs.iter().map(|s| s.kv.num_slots).sum(), 0.0);
            if peak {
                paged_attention_peak(&q_obs, store, &obs, params, &mut self.mass)?;
            } else {
                paged_attention(&q_obs, store, &obs, params, Some(&mut self.mass))?;
            }
            self.add_lane_mass(step, cache, group, &obs, |s, l| s.observed_mass_mut(l));
        }
        drop(reader);
        model_major(&out, lanes)
    }

    /// SnapKV's observation rows of every query of `seqs` (as [`lane_queries`] lays them out):
    /// their row indices into `self.rows` (for an `index_select` of the queries), and one query
    /// each over the same table, numbered from 0 in that selection.
    fn observation_queries<'a>(
        &mut self,
        step: &Step,
        cache: &KvCache,
        group: GroupId,
        seqs: &[SeqQuery<'a>],
        seen: &'a [Vec<u64>],
    ) -> Vec<SeqQuery<'a>> {
        let n = step.len().max(1);
        self.rows.clear();
        let mut obs = Vec::with_capacity(seqs.len());
        for (k, s) in seqs.iter().enumerate() {
            let r = step.observe_rows(k % n, cache.lane(group, k / n));
            let start = self.rows.len();
            self.rows
                .extend((r.start..r.end).map(|j| (s.q_start + j) as u32));
            // A probe's scored rows see the sinks, their chunk and the probe only (KVzip).
            let mut kv = s.kv;
            if let Some(v) = seen.get(k).filter(|v| !v.is_empty()) {
                kv.valid = Some(v);
            }
            obs.push(SeqQuery {
                kv,
                q_start: start,
                num_q: r.len(),
                first_slot: s.first_slot + r.start,
            });
        }
        obs
    }

    /// Attention over lane-major `seqs` with the mass summed into `self.mass` (zeroed first),
    /// lane by lane in `seqs` order.
    fn attend_scratch(
        &mut self,
        q: &Tensor,
        store: &KvStore,
        seqs: &[SeqQuery<'_>],
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let slots: usize = seqs.iter().map(|s| s.kv.num_slots).sum();
        self.mass.clear();
        self.mass.resize(slots, 0.0);
        paged_attention(q, store, seqs, params, Some(&mut self.mass))
    }

    /// Adds each lane's segment of `self.mass` into the buffer `buffer` picks for the lane
    /// (lanes whose retention needs no scores have none).
    fn add_lane_mass(
        &self,
        step: &mut Step,
        cache: &KvCache,
        group: GroupId,
        seqs: &[SeqQuery<'_>],
        buffer: impl Fn(&mut Step, GroupId) -> Option<&mut [f32]>,
    ) {
        let mut at = 0;
        for (h, lane_seqs) in seqs.chunks(step.len().max(1)).enumerate() {
            let lane = cache.lane(group, h);
            let n: usize = lane_seqs.iter().map(|s| s.kv.num_slots).sum();
            let peak = step.is_probe();
            if let Some(m) = buffer(step, lane) {
                for (d, s) in m.iter_mut().zip(&self.mass[at..at + n]) {
                    // A probe's peak mass combines by max, over layers too (KVzip).
                    *d = if peak { d.max(*s) } else { *d + s };
                }
            }
            at += n;
        }
    }

    /// [`StepExecutor::attend`] without lanes.
    fn attend_group(
        &mut self,
        q: &Tensor,
        store: &KvStore,
        cache: &KvCache,
        step: &mut Step,
        group: GroupId,
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let reader = cache.read();
        let seqs = lane_queries(step, &reader, cache, group, 0)?;
        let out = paged_attention(q, store, &seqs, params, step.mass_mut(group))?;
        if step.observed_mass_mut(group).is_some() {
            // SnapKV: the mass of the prompt's observation rows only, from a second call.
            let seen = probe_seen(step, cache, group, seqs.len());
            let obs = self.observation_queries(step, cache, group, &seqs, &seen);
            let idx = Tensor::new(self.rows.as_slice(), q.device())?;
            let q_obs = q.index_select(&idx, 0)?;
            let peak = step.is_probe();
            let buf = step.observed_mass_mut(group).expect("checked above");
            if peak {
                // A probe step (KVzip): each slot's peak weight, max-combined over layers.
                paged_attention_peak(&q_obs, store, &obs, params, buf)?;
            } else {
                paged_attention(&q_obs, store, &obs, params, Some(buf))?;
            }
        }
        Ok(out)
    }

    /// After retain (inside [`layerkv::Reservation::retain_with`]): executes the compaction
    /// moves, then stashes the sink keys this step captured.
    pub fn finish(&mut self, step: &Step, store: &mut KvStore) -> Result<()> {
        let gathered = self.gather(step, store)?;
        self.complete(gathered, store)
    }

    /// The first half of [`StepExecutor::finish`]: the moves' source rows, copied out
    /// ([`KvStore::gather_moves`]); nothing is written, so a failure here can still abort.
    pub fn gather(&self, step: &Step, store: &KvStore) -> Result<Option<GatheredMoves>> {
        store.gather_moves(step.moves())
    }

    /// The second half of [`StepExecutor::finish`]: writes the gathered rows, then stashes the
    /// sink keys this step captured.
    pub fn complete(&mut self, gathered: Option<GatheredMoves>, store: &mut KvStore) -> Result<()> {
        // The fallible part first, so a failure leaves the store unwritten.
        let mut stash = Vec::with_capacity(self.staged.len());
        for (key, part) in &self.staged {
            let all = match self.sinks.get(key) {
                Some(prev) => Tensor::cat(&[prev, part], 0)?,
                None => part.clone(),
            };
            stash.push((*key, all));
        }
        if let Some(g) = gathered {
            store.scatter_moves(g)?;
        }
        self.staged.clear();
        self.overwritten.clear();
        self.sinks.extend(stash);
        Ok(())
    }

    /// After a step failed anywhere past [`StepExecutor::begin`] (and before
    /// [`StepExecutor::complete`]): writes back the sink keys its re-rotations overwrote (last
    /// first) and drops the keys it staged. The cache's rollback does the rest.
    pub fn abort(&mut self, store: &mut KvStore) -> Result<()> {
        self.staged.clear();
        while let Some((slots, old)) = self.overwritten.pop() {
            store.write_keys(&slots, &old)?;
        }
        Ok(())
    }

    /// Gives `child` a copy of `parent`'s stashed sink keys (after [`KvCache::fork`]).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let copies: Vec<_> = self
            .sinks
            .iter()
            .filter(|((s, _), _)| *s == parent)
            .map(|(&(_, g), k)| ((child, g), k.clone()))
            .collect();
        self.sinks.extend(copies);
    }

    /// Drops `seq`'s stashed sink keys (after [`KvCache::free`]).
    pub fn free(&mut self, seq: SeqId) {
        self.sinks.retain(|(s, _), _| *s != seq);
    }
}
