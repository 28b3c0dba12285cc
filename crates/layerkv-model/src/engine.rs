//! [`Engine`]: runs a [`Model`] with a [`LayerKvPolicy`]: the model asks the policy which KV
//! group each layer reads, the [`KvCache`] hands out slots, the kernels read the pages.
//!
//! One step takes a batch of sequences, each with one or more new tokens (decode, prefill and
//! chunked prefill mix freely). Per layer: owners project K/V, rotate K at the tokens' positions
//! and write both into their group's slots; every layer rotates its queries and runs paged
//! attention over the group it reads. After the step each group's retention runs and emptied
//! pages go back to the pool.
//!
//! Semantics (DESIGN.md):
//! - downward sharing runs in one pass per step;
//! - upward sharing (a layer reads a higher layer's group) never sees its own token's KV
//!   (diagonal masked); decode is one pass, prefill runs token by token or LCKV's iterative
//!   parallel prefill ([`PrefillMode`]);
//! - StreamingLLM positions: K is stored rotated at text positions, so the window keeps its
//!   relative distances; the sinks are re-rotated to sit right before the window (position
//!   `i + evicted`), which is exactly RoPE at positions inside the cache, for O(sinks) work per
//!   step instead of re-rotating the whole cache.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use layerkv::{
    CacheConfig, GroupId, KvCache, LayerKvPolicy, Phase, Retention, ScoreNeed, SeqId, SlotMapping,
};
use layerkv_kernels::{paged_attention, AttentionParams, KvStore, SeqKv, SeqQuery};

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::rope::Rope;

/// How prompts are prefilled when the policy has upward sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrefillMode {
    /// One token per pass: always exact.
    TokenByToken,
    /// LCKV's iterative parallel prefill: all prompt tokens per pass, upward layers reading the
    /// previous pass's KV (zeros at first), until the upward targets' K changes by less than
    /// `tolerance` (max abs) or `max_passes` passes ran. Exact once passes > prompt length.
    Iterative {
        /// Upper bound on passes.
        max_passes: usize,
        /// Convergence threshold on the targets' keys.
        tolerance: f32,
    },
}

/// Which rows of logits a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsRows {
    /// The last new token of each sequence: `[batch, vocab]`.
    Last,
    /// Every new token, sequences in batch order: `[total_tokens, vocab]`.
    All,
}

/// Engine sizes and modes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Token slots per page.
    pub block_size: usize,
    /// Pages in the pool (all groups of all sequences).
    pub num_pages: usize,
    /// KV storage dtype (f32, f16 or bf16).
    pub kv_dtype: DType,
    /// Window of sliding-window layers; defaults to the model config's `sliding_window`.
    pub sliding_window: Option<usize>,
    /// Prefill of policies with upward sharing.
    pub prefill: PrefillMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_pages: 4096,
            kv_dtype: DType::F32,
            sliding_window: None,
            prefill: PrefillMode::Iterative {
                max_passes: 64,
                tolerance: 1e-4,
            },
        }
    }
}

/// Per-sequence state the engine keeps beside the cache.
#[derive(Debug, Default)]
struct SeqState {
    /// Accumulated attention mass per group and logical slot (H2O).
    scores: Vec<Vec<f32>>,
    /// Observation-window mass per group, from the last prefill (SnapKV).
    observed: Vec<Vec<f32>>,
    /// Pre-RoPE K and V of each StreamingLLM group's sink tokens, and their current shift.
    sinks: Vec<Option<Sinks>>,
}

#[derive(Debug)]
struct Sinks {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    shift: usize,
}

/// Row layout of one pass over a batch.
struct Layout {
    seqs: Vec<SeqId>,
    row_start: Vec<usize>,
    num_rows: Vec<usize>,
    /// Logical slot of each sequence's first new token (same in every group).
    q_pos: Vec<usize>,
    tokens: Vec<u32>,
    /// Physical slots of all rows, per group.
    slots: Vec<Vec<u32>>,
    cos: Tensor,
    sin: Tensor,
}

/// A model, a policy, a cache and its page tensors.
#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    policy: Arc<dyn LayerKvPolicy>,
    cache: KvCache,
    store: KvStore,
    config: EngineConfig,
    window: Option<usize>,
    state: HashMap<SeqId, SeqState>,
    mappings: Vec<SlotMapping>,
}

impl Engine {
    /// An engine for `model` under `policy` (whose map must have the model's layer count).
    pub fn new(
        model: Arc<Model>,
        policy: Arc<dyn LayerKvPolicy>,
        config: EngineConfig,
    ) -> Result<Self> {
        let map = policy.layer_map();
        map.require_layers(model.num_layers())?;
        let cfg = model.config();
        let window = config.sliding_window.or(cfg.sliding_window);
        if let Some(layer) = (0..map.num_layers()).find(|&l| map.is_sliding(l)) {
            if window.is_none() {
                return Err(ModelError::Config(format!(
                    "layer {layer} is a sliding-window layer but neither the model nor the engine config sets a window"
                )));
            }
        }
        let kv_heads = cfg.num_key_value_heads;
        let head_dim = cfg.head_dim();
        let bytes_per_token = 2 * kv_heads * head_dim * config.kv_dtype.size_in_bytes();
        let cache = KvCache::new(
            policy.clone(),
            CacheConfig {
                block_size: config.block_size,
                num_pages: config.num_pages,
                bytes_per_token,
                prefix_caching: false,
            },
        )?;
        let store = KvStore::new(
            config.num_pages,
            config.block_size,
            kv_heads,
            head_dim,
            config.kv_dtype,
            model.device(),
        )?;
        Ok(Self {
            model,
            policy,
            cache,
            store,
            config,
            window,
            state: HashMap::new(),
            mappings: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The policy.
    pub fn policy(&self) -> &Arc<dyn LayerKvPolicy> {
        &self.policy
    }

    /// The KV-cache manager (memory reports, pool statistics, capacity).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Registers a new, empty sequence.
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.cache.add_sequence(seq)?;
        let g = self.policy.layer_map().num_groups();
        self.state.insert(
            seq,
            SeqState {
                scores: vec![Vec::new(); g],
                observed: vec![Vec::new(); g],
                sinks: (0..g).map(|_| None).collect(),
            },
        );
        Ok(())
    }

    /// Frees a sequence and all its pages.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)?;
        self.state.remove(&seq);
        Ok(())
    }

    /// Runs one step: appends `tokens` to each sequence, runs the model, applies retention
    /// (`phase` tells score-based retentions whether this was the prompt). Returns f32 logits.
    pub fn step(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        phase: Phase,
    ) -> Result<Tensor> {
        if batch.is_empty() || batch.iter().any(|(_, t)| t.is_empty()) {
            return Err(ModelError::Config(
                "a step needs at least one token per sequence".into(),
            ));
        }
        let upward = self.policy.layer_map().needs_upward();
        let multi = batch.iter().any(|(_, t)| t.len() > 1);
        let logits = if upward && multi {
            match self.config.prefill {
                PrefillMode::TokenByToken => self.token_by_token(batch, rows)?,
                PrefillMode::Iterative {
                    max_passes,
                    tolerance,
                } => {
                    let layout = self.append(batch)?;
                    self.zero_upward_targets(&layout)?;
                    let mut prev: Option<Vec<Tensor>> = None;
                    let mut x = None;
                    for _ in 0..max_passes.max(1) {
                        let mut keys = Vec::new();
                        let out = self.run_layers(&layout, phase, Some(&mut keys))?;
                        x = Some(out);
                        let done = match &prev {
                            Some(p) => max_abs_diff(p, &keys)? <= tolerance,
                            None => keys.is_empty(),
                        };
                        prev = Some(keys);
                        if done {
                            break;
                        }
                    }
                    let x = x.expect("at least one pass ran");
                    self.finish(&layout, &x, rows, phase)?
                }
            }
        } else {
            let layout = self.append(batch)?;
            let x = self.run_layers(&layout, phase, None)?;
            self.finish(&layout, &x, rows, phase)?
        };
        Ok(logits)
    }

    /// Prefill of upward-sharing policies one token per pass (exact).
    fn token_by_token(&mut self, batch: &[(SeqId, &[u32])], rows: LogitsRows) -> Result<Tensor> {
        let longest = batch.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let mut per_seq: Vec<Vec<Tensor>> = vec![Vec::new(); batch.len()];
        for j in 0..longest {
            let idx: Vec<usize> = (0..batch.len()).filter(|&i| j < batch[i].1.len()).collect();
            let sub: Vec<(SeqId, &[u32])> = idx
                .iter()
                .map(|&i| (batch[i].0, &batch[i].1[j..j + 1]))
                .collect();
            let phase = if j + 1 == longest {
                Phase::Prefill
            } else {
                Phase::Decode
            };
            let layout = self.append(&sub)?;
            let x = self.run_layers(&layout, phase, None)?;
            let logits = self.finish(&layout, &x, LogitsRows::All, phase)?;
            for (r, &i) in idx.iter().enumerate() {
                per_seq[i].push(logits.narrow(0, r, 1)?);
            }
        }
        let picked: Vec<Tensor> = match rows {
            LogitsRows::All => per_seq.into_iter().flatten().collect(),
            LogitsRows::Last => per_seq.into_iter().filter_map(|mut v| v.pop()).collect(),
        };
        Ok(Tensor::cat(&picked, 0)?)
    }

    /// Reserves slots for the batch and lays out its rows.
    fn append(&mut self, batch: &[(SeqId, &[u32])]) -> Result<Layout> {
        if self.mappings.len() < batch.len() {
            self.mappings.resize_with(batch.len(), SlotMapping::new);
        }
        self.cache
            .append_batch(batch, &mut self.mappings[..batch.len()])?;
        let num_groups = self.policy.layer_map().num_groups();
        let mut layout = Layout {
            seqs: Vec::with_capacity(batch.len()),
            row_start: Vec::with_capacity(batch.len()),
            num_rows: Vec::with_capacity(batch.len()),
            q_pos: Vec::with_capacity(batch.len()),
            tokens: Vec::new(),
            slots: vec![Vec::new(); num_groups],
            cos: Tensor::zeros(1, DType::F32, self.model.device())?,
            sin: Tensor::zeros(1, DType::F32, self.model.device())?,
        };
        let mut positions = Vec::new();
        for (i, &(seq, tokens)) in batch.iter().enumerate() {
            let m = &self.mappings[i];
            for c in m.copies() {
                self.store.copy_page(c.src, c.dst)?;
            }
            layout.seqs.push(seq);
            layout.row_start.push(layout.tokens.len());
            layout.num_rows.push(tokens.len());
            layout.q_pos.push(m.first_slot(0));
            layout.tokens.extend_from_slice(tokens);
            positions.extend((0..tokens.len()).map(|j| m.first_slot(0) + j));
            for (g, slots) in layout.slots.iter_mut().enumerate() {
                slots.extend_from_slice(m.slots(g));
            }
            let st = self
                .state
                .get_mut(&seq)
                .ok_or(layerkv::Error::UnknownSequence(seq))?;
            for g in 0..num_groups {
                if self.policy.score_need(g) == ScoreNeed::Accumulated {
                    st.scores[g].resize(m.first_slot(g) + tokens.len(), 0.0);
                }
            }
        }
        let (cos, sin) =
            self.model
                .rope()
                .tables(&positions, self.model.dtype(), self.model.device())?;
        layout.cos = cos;
        layout.sin = sin;
        self.rerotate_sinks(batch)?;
        Ok(layout)
    }

    /// Re-rotates StreamingLLM sinks to positions `i + evicted` when evictions moved the window.
    fn rerotate_sinks(&mut self, batch: &[(SeqId, &[u32])]) -> Result<()> {
        let reader = self.cache.read();
        for (i, &(seq, _)) in batch.iter().enumerate() {
            let m = &self.mappings[i];
            let st = self
                .state
                .get_mut(&seq)
                .ok_or(layerkv::Error::UnknownSequence(seq))?;
            for (g, sinks) in st.sinks.iter_mut().enumerate() {
                let Some(s) = sinks else { continue };
                let shift = m.first_slot(g) - m.first_position(g);
                if shift == s.shift || s.k.is_empty() {
                    continue;
                }
                let table = reader.table(seq, g)?;
                let n = s.k.len();
                let mut slots = Vec::with_capacity(n);
                for j in 0..n {
                    let slot = table
                        .physical_slot(j, self.config.block_size)
                        .ok_or_else(|| {
                            ModelError::Config(format!("sink {j} of group {g} was evicted"))
                        })?;
                    slots.push(slot);
                }
                let positions: Vec<usize> = (0..n).map(|j| j + shift).collect();
                let (cos, sin) = self.model.rope().tables(
                    &positions,
                    self.model.dtype(),
                    self.model.device(),
                )?;
                let k = Rope::apply(&Tensor::cat(&s.k, 0)?, &cos, &sin)?;
                let v = Tensor::cat(&s.v, 0)?;
                self.store.write(&slots, &k, &v)?;
                s.shift = shift;
            }
        }
        Ok(())
    }

    /// Writes zeros into this step's slots of groups that layers below their owner read, so
    /// the first iterative pass sees zero KV (as LCKV initialises it).
    fn zero_upward_targets(&mut self, layout: &Layout) -> Result<()> {
        let map = self.policy.layer_map().clone();
        let cfg = self.model.config();
        for g in 0..map.num_groups() {
            if map.readers(g).iter().any(|&l| map.is_upward(l)) {
                let rows = layout.slots[g].len();
                let z = Tensor::zeros(
                    (rows, cfg.num_key_value_heads, cfg.head_dim()),
                    self.config.kv_dtype,
                    self.model.device(),
                )?;
                self.store.write(&layout.slots[g], &z, &z)?;
            }
        }
        Ok(())
    }

    /// Runs every layer over the layout's rows; returns the final hidden states. When
    /// `target_keys` is given, the rotated keys of upward-target groups are pushed to it.
    fn run_layers(
        &mut self,
        layout: &Layout,
        phase: Phase,
        mut target_keys: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let model = self.model.clone();
        let policy = self.policy.clone();
        let map = policy.layer_map();
        let mut x = model.embed(&layout.tokens)?;
        let mut step_mass: Vec<Option<Vec<f32>>> = vec![None; map.num_groups()];
        let mut obs_mass: Vec<Option<Vec<f32>>> = vec![None; map.num_groups()];
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            let (normed, q) = model.attn_input(layer, &x)?;
            let q = Rope::apply(&q, &layout.cos, &layout.sin)?;
            if map.owns_kv(layer) {
                let (k, v) = model.kv(layer, &normed)?;
                self.capture_sinks(layout, g, &k, &v)?;
                let k = Rope::apply(&k, &layout.cos, &layout.sin)?;
                self.store.write(&layout.slots[g], &k, &v)?;
                if let Some(keys) = target_keys.as_deref_mut() {
                    if map.readers(g).iter().any(|&l| map.is_upward(l)) {
                        keys.push(k);
                    }
                }
            }
            let params = AttentionParams {
                scale: 1.0 / (model.config().head_dim() as f32).sqrt(),
                // Sliding layers of the map, or every layer of a sliding-window model (mistral).
                window: if map.is_sliding(layer) {
                    self.window
                } else {
                    model.config().sliding_window
                },
                include_diagonal: !map.is_upward(layer),
            };
            let reader = self.cache.read();
            let mut seqs = Vec::with_capacity(layout.seqs.len());
            let mut total_slots = 0;
            for (i, &seq) in layout.seqs.iter().enumerate() {
                let view = reader.view(seq, g)?;
                total_slots += view.num_slots;
                seqs.push(SeqQuery {
                    kv: SeqKv {
                        pages: view.pages,
                        num_slots: view.num_slots,
                        valid: view.valid,
                    },
                    q_start: layout.row_start[i],
                    num_q: layout.num_rows[i],
                    q_pos: layout.q_pos[i],
                });
            }
            let need = policy.score_need(g);
            let mass = if need == ScoreNeed::Accumulated {
                let buf = step_mass[g].get_or_insert_with(|| vec![0.0; total_slots]);
                Some(&mut buf[..])
            } else {
                None
            };
            let out = paged_attention(&q, &self.store, &seqs, &params, mass)?;
            if let (ScoreNeed::ObservationWindow(w), Phase::Prefill) = (need, phase) {
                // SnapKV: the mass of the last `w` prompt queries only, from a second, small call.
                let mut rows = Vec::new();
                let mut obs = Vec::with_capacity(seqs.len());
                for s in &seqs {
                    let n = s.num_q.min(w);
                    let start = rows.len();
                    rows.extend((s.q_start + s.num_q - n..s.q_start + s.num_q).map(|r| r as u32));
                    obs.push(SeqQuery {
                        kv: s.kv,
                        q_start: start,
                        num_q: n,
                        q_pos: s.q_pos + s.num_q - n,
                    });
                }
                let idx = Tensor::new(rows.as_slice(), q.device())?;
                let q_obs = q.index_select(&idx, 0)?;
                let buf = obs_mass[g].get_or_insert_with(|| vec![0.0; total_slots]);
                paged_attention(&q_obs, &self.store, &obs, &params, Some(&mut buf[..]))?;
            }
            drop(seqs);
            drop(reader);
            x = model.attn_output_and_mlp(layer, &x, &out)?;
        }
        // Hand the step's attention mass to each sequence's per-group buffers.
        let reader = self.cache.read();
        for g in 0..map.num_groups() {
            for (buf, observed) in [(&step_mass[g], false), (&obs_mass[g], true)] {
                let Some(buf) = buf else { continue };
                let mut off = 0;
                for &seq in &layout.seqs {
                    let n = reader.table(seq, g)?.num_slots();
                    let st = self
                        .state
                        .get_mut(&seq)
                        .ok_or(layerkv::Error::UnknownSequence(seq))?;
                    let dst = if observed {
                        &mut st.observed[g]
                    } else {
                        &mut st.scores[g]
                    };
                    if observed {
                        dst.clear();
                        dst.extend_from_slice(&buf[off..off + n]);
                    } else {
                        dst.resize(n, 0.0);
                        for (d, s) in dst.iter_mut().zip(&buf[off..off + n]) {
                            *d += s;
                        }
                    }
                    off += n;
                }
            }
        }
        Ok(x)
    }

    /// Keeps pre-RoPE K/V of StreamingLLM sink tokens (the first `sinks` slots of a group).
    fn capture_sinks(&mut self, layout: &Layout, g: GroupId, k: &Tensor, v: &Tensor) -> Result<()> {
        let Retention::SinkWindow { sinks, .. } = self.policy.retention(g) else {
            return Ok(());
        };
        let sinks = *sinks;
        for (i, &seq) in layout.seqs.iter().enumerate() {
            let q_pos = layout.q_pos[i];
            if q_pos >= sinks {
                continue;
            }
            let st = self
                .state
                .get_mut(&seq)
                .ok_or(layerkv::Error::UnknownSequence(seq))?;
            let s = st.sinks[g].get_or_insert_with(|| Sinks {
                k: Vec::new(),
                v: Vec::new(),
                shift: 0,
            });
            let take = (sinks - q_pos).min(layout.num_rows[i]);
            // Rows may be recomputed by iterative passes: keep the latest.
            s.k.truncate(q_pos);
            s.v.truncate(q_pos);
            for r in 0..take {
                let row = layout.row_start[i] + r;
                s.k.push(k.narrow(0, row, 1)?);
                s.v.push(v.narrow(0, row, 1)?);
            }
        }
        Ok(())
    }

    /// Logits for the requested rows, then retention for every group.
    fn finish(
        &mut self,
        layout: &Layout,
        x: &Tensor,
        rows: LogitsRows,
        phase: Phase,
    ) -> Result<Tensor> {
        let x = match rows {
            LogitsRows::All => x.clone(),
            LogitsRows::Last => {
                let idx: Vec<u32> = (0..layout.seqs.len())
                    .map(|i| (layout.row_start[i] + layout.num_rows[i] - 1) as u32)
                    .collect();
                x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?
            }
        };
        let logits = self.model.logits(&x)?;
        let map = self.policy.layer_map();
        for g in 0..map.num_groups() {
            let retention = self.policy.retention(g);
            if retention.is_full() {
                continue;
            }
            for &seq in &layout.seqs {
                let st = self
                    .state
                    .get(&seq)
                    .ok_or(layerkv::Error::UnknownSequence(seq))?;
                let scores = match self.policy.score_need(g) {
                    ScoreNeed::None => None,
                    ScoreNeed::Accumulated => Some(&st.scores[g][..]),
                    ScoreNeed::ObservationWindow(_) => (phase == Phase::Prefill
                        && !st.observed[g].is_empty())
                    .then_some(&st.observed[g][..]),
                };
                self.cache.evict(seq, g, scores, phase)?;
            }
        }
        Ok(logits)
    }
}

fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> Result<f32> {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x.to_dtype(DType::F32)? - y.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    Ok(worst)
}
