//! [`Engine`]: runs a [`Model`] with a [`LayerKvPolicy`] by driving `layerkv`'s step protocol
//! ([`layerkv::Step`]): the cache reserves slots and plans copies, sink re-rotations and score
//! rows; the engine projects, rotates, writes and attends; the cache retains and plans
//! compaction moves, which the engine executes on its [`KvStore`]. Everything a policy needs
//! lives in the library; this runner is one client of it (the `custom_engine` example is
//! another).
//!
//! One step takes a batch of sequences, each with one or more new tokens (decode, prefill and
//! chunked prefill mix freely). Per layer: owners project K/V, rotate K at the tokens' text
//! positions and write both into their group's slots; every layer rotates its queries and runs
//! paged attention over the group it reads, adding its attention mass into the step's buffers
//! where the group's retention needs scores. After the step each group's retention runs.
//!
//! Semantics (DESIGN.md):
//! - downward sharing runs in one pass per step;
//! - upward sharing (a layer reads a higher layer's group) never sees its own token's KV
//!   (diagonal masked); decode is one pass, prefill runs token by token or LCKV's iterative
//!   parallel prefill ([`PrefillMode`]), and only the final pass's attention mass counts;
//! - StreamingLLM positions: K is stored rotated at text positions, so the window keeps its
//!   relative distances; the sinks are re-rotated (from a copy of their pre-RoPE keys) to sit
//!   right before the first kept token after them, which equals RoPE at positions inside the
//!   cache, for O(sinks) work per step;
//! - under a policy that evicts, prompts longer than [`EngineConfig::prefill_chunk`] are split
//!   into chunks with retention in between, so memory stays within the policy's bound.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use layerkv::{CacheConfig, GroupId, KvCache, LayerKvPolicy, SeqId, Step};
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

/// Which rows a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsRows {
    /// The last new token of each sequence: `[batch, ...]`.
    Last,
    /// Every new token, sequences in batch order: `[total_tokens, ...]`.
    All,
}

/// What a step returns for its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// f32 logits `[rows, vocab]`.
    Logits,
    /// Final hidden states after the final norm `[rows, hidden]` (calibration).
    Hidden,
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
    /// Window of the layers the policy's map marks sliding (YOCO's `s` layers); required when
    /// the map has any. The model's own `sliding_window` (mistral) applies to the others.
    pub sliding_window: Option<usize>,
    /// Prefill of policies with upward sharing.
    pub prefill: PrefillMode,
    /// Under a policy that evicts, the most tokens of one sequence a step appends before
    /// retention runs (longer prompts are split).
    pub prefill_chunk: usize,
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
            prefill_chunk: 256,
        }
    }
}

/// Row layout of one pass over a batch.
struct Layout {
    row_start: Vec<usize>,
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
    step: Step,
    /// Pre-RoPE keys of each sequence's StreamingLLM sinks, per group (deep copies).
    sinks: HashMap<(SeqId, GroupId), Tensor>,
    /// Sink keys captured during the current step, committed when it retains.
    staged: HashMap<(SeqId, GroupId), Vec<Tensor>>,
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
        if let Some(layer) = (0..map.num_layers()).find(|&l| map.is_sliding(l)) {
            if config.sliding_window.is_none() {
                return Err(ModelError::Config(format!(
                    "layer {layer} is a sliding-window layer of the policy but no window is set \
                     (give one, e.g. `--window 256`)"
                )));
            }
        }
        if config.prefill_chunk == 0 {
            return Err(ModelError::Config("prefill_chunk must be positive".into()));
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
                sliding_window: config.sliding_window,
                model_window: cfg.sliding_window,
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
            step: Step::new(),
            sinks: HashMap::new(),
            staged: HashMap::new(),
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

    /// The page tensors.
    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Registers a new, empty sequence (its first step is its prompt unless
    /// [`Engine::set_prompt_len`] says otherwise).
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        Ok(self.cache.add_sequence(seq)?)
    }

    /// Declares the prompt length of `seq` when the prompt arrives in several steps.
    pub fn set_prompt_len(&mut self, seq: SeqId, prompt_len: usize) -> Result<()> {
        Ok(self.cache.set_prompt_len(seq, prompt_len)?)
    }

    /// A child sequence sharing every page of `parent` (parallel sampling).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        self.cache.fork(parent, child)?;
        let copies: Vec<_> = self
            .sinks
            .iter()
            .filter(|((s, _), _)| *s == parent)
            .map(|(&(_, g), k)| ((child, g), k.clone()))
            .collect();
        self.sinks.extend(copies);
        Ok(())
    }

    /// Frees a sequence and all its pages.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)?;
        self.sinks.retain(|(s, _), _| *s != seq);
        Ok(())
    }

    /// Runs one step: appends `tokens` to each sequence, runs the model, applies retention.
    /// Returns f32 logits of the requested rows.
    pub fn step(&mut self, batch: &[(SeqId, &[u32])], rows: LogitsRows) -> Result<Tensor> {
        self.run(batch, rows, Output::Logits)
    }

    /// [`Engine::step`] returning the final hidden states (after the final norm) of every new
    /// token, `[total_tokens, hidden]`, instead of logits.
    pub fn step_hidden(&mut self, batch: &[(SeqId, &[u32])]) -> Result<Tensor> {
        self.run(batch, LogitsRows::All, Output::Hidden)
    }

    fn run(&mut self, batch: &[(SeqId, &[u32])], rows: LogitsRows, out: Output) -> Result<Tensor> {
        if batch.is_empty() || batch.iter().any(|(_, t)| t.is_empty()) {
            return Err(ModelError::Config(
                "a step needs at least one token per sequence".into(),
            ));
        }
        let map = self.policy.layer_map();
        let upward = map.needs_upward();
        let longest = batch.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let evicts = (0..map.num_groups())
            .any(|g| !self.policy.retention(g).is_full() || self.cache.group_window(g).is_some());
        let chunk = if upward && self.config.prefill == PrefillMode::TokenByToken {
            1
        } else if evicts {
            self.config.prefill_chunk
        } else {
            usize::MAX
        };
        if longest > chunk {
            return self.chunked(batch, rows, out, chunk);
        }
        self.one_step(batch, rows, out, upward && longest > 1)
    }

    /// Splits the batch's tokens into steps of at most `chunk` tokens per sequence (retention
    /// between them); a sequence's first step then declares its whole prompt.
    fn chunked(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
        chunk: usize,
    ) -> Result<Tensor> {
        for &(seq, tokens) in batch {
            if self.cache.num_tokens(seq)? == 0 {
                self.cache.set_prompt_len(seq, tokens.len())?;
            }
        }
        let longest = batch.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let mut per_seq: Vec<Vec<Tensor>> = vec![Vec::new(); batch.len()];
        let upward = self.policy.layer_map().needs_upward();
        let mut start = 0;
        while start < longest {
            let idx: Vec<usize> = (0..batch.len())
                .filter(|&i| start < batch[i].1.len())
                .collect();
            let sub: Vec<(SeqId, &[u32])> = idx
                .iter()
                .map(|&i| {
                    let t = batch[i].1;
                    (batch[i].0, &t[start..(start + chunk).min(t.len())])
                })
                .collect();
            let multi = sub.iter().any(|(_, t)| t.len() > 1);
            let x = self.one_step(&sub, LogitsRows::All, out, upward && multi)?;
            let mut row = 0;
            for (&i, (_, t)) in idx.iter().zip(&sub) {
                let keep = match rows {
                    LogitsRows::All => x.narrow(0, row, t.len())?,
                    LogitsRows::Last => x.narrow(0, row + t.len() - 1, 1)?,
                };
                if rows == LogitsRows::Last {
                    per_seq[i].clear();
                }
                per_seq[i].push(keep);
                row += t.len();
            }
            start += chunk;
        }
        let picked: Vec<Tensor> = per_seq.into_iter().flatten().collect();
        Ok(Tensor::cat(&picked, 0)?)
    }

    /// One protocol step: reserve, run the layers (iteratively for upward prefill), retain;
    /// roll back if anything fails in between.
    fn one_step(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
        iterative: bool,
    ) -> Result<Tensor> {
        self.staged.clear();
        let mut step = std::mem::take(&mut self.step);
        let result = self
            .cache
            .reserve(batch, &mut step)
            .map_err(ModelError::from);
        let result = result.and_then(|()| {
            let r = self.forward(&mut step, batch, iterative, rows, out);
            match r {
                Ok(x) => match self.cache.retain(&mut step) {
                    Ok(_) => Ok(x),
                    Err(e) => {
                        self.cache.rollback(&mut step)?;
                        Err(e.into())
                    }
                },
                Err(e) => {
                    self.cache.rollback(&mut step)?;
                    Err(e)
                }
            }
        });
        let result = result.and_then(|x| {
            // Compaction moves, then the sink keys this step captured.
            let moves = step.moves();
            if !moves.is_empty() {
                let src: Vec<u32> = moves.iter().map(|m| m.src).collect();
                let dst: Vec<u32> = moves.iter().map(|m| m.dst).collect();
                self.store.move_slots(&src, &dst)?;
            }
            for (key, parts) in self.staged.drain() {
                let mut all: Vec<Tensor> = self.sinks.remove(&key).into_iter().collect();
                all.extend(parts);
                self.sinks.insert(key, Tensor::cat(&all, 0)?);
            }
            Ok(x)
        });
        self.step = step;
        result
    }

    /// Copies, re-rotations and the layer passes of a reserved step; returns the requested
    /// rows (logits or hidden states).
    fn forward(
        &mut self,
        step: &mut Step,
        batch: &[(SeqId, &[u32])],
        iterative: bool,
        rows: LogitsRows,
        out: Output,
    ) -> Result<Tensor> {
        for c in step.copies().collect::<Vec<_>>() {
            self.store.copy_page(c.src, c.dst)?;
        }
        self.rerotate_sinks(step)?;
        let layout = self.layout(step, batch)?;
        let x = if iterative {
            self.zero_upward_targets(&layout)?;
            let (max_passes, tolerance) = match self.config.prefill {
                PrefillMode::Iterative {
                    max_passes,
                    tolerance,
                } => (max_passes, tolerance),
                PrefillMode::TokenByToken => (1, 0.0),
            };
            let mut prev: Option<Vec<Tensor>> = None;
            let mut x = None;
            for _ in 0..max_passes.max(1) {
                // Only the final pass's attention mass counts.
                step.clear_mass();
                self.staged.clear();
                let mut keys = Vec::new();
                x = Some(self.run_layers(step, &layout, Some(&mut keys))?);
                let done = match &prev {
                    Some(p) => max_abs_diff(p, &keys)? <= tolerance,
                    None => keys.is_empty(),
                };
                prev = Some(keys);
                if done {
                    break;
                }
            }
            x.expect("at least one pass ran")
        } else {
            self.run_layers(step, &layout, None)?
        };
        let x = match rows {
            LogitsRows::All => x,
            LogitsRows::Last => {
                let idx: Vec<u32> = (0..step.len())
                    .map(|i| (layout.row_start[i] + step.num_new(i) - 1) as u32)
                    .collect();
                x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?
            }
        };
        match out {
            Output::Logits => self.model.logits(&x),
            Output::Hidden => self.model.final_hidden(&x),
        }
    }

    /// Row layout and RoPE tables (text positions) of a reserved step.
    fn layout(&self, step: &Step, batch: &[(SeqId, &[u32])]) -> Result<Layout> {
        let num_groups = self.policy.layer_map().num_groups();
        let mut layout = Layout {
            row_start: Vec::with_capacity(step.len()),
            tokens: Vec::new(),
            slots: vec![Vec::new(); num_groups],
            cos: Tensor::zeros(1, DType::F32, self.model.device())?,
            sin: Tensor::zeros(1, DType::F32, self.model.device())?,
        };
        let mut positions = Vec::new();
        for (i, (_, tokens)) in batch.iter().enumerate() {
            layout.tokens.extend_from_slice(tokens);
            layout.row_start.push(positions.len());
            positions.extend((0..step.num_new(i)).map(|j| step.position(i) + j));
            for (g, slots) in layout.slots.iter_mut().enumerate() {
                slots.extend_from_slice(step.slots(i, g));
            }
        }
        let (cos, sin) =
            self.model
                .rope()
                .tables(&positions, self.model.dtype(), self.model.device())?;
        layout.cos = cos;
        layout.sin = sin;
        Ok(layout)
    }

    /// Writes each planned sink re-rotation: the sinks' pre-RoPE keys rotated at their new
    /// positions inside the cache.
    fn rerotate_sinks(&mut self, step: &Step) -> Result<()> {
        for r in step.rerotations() {
            let seq = step.seq(r.index);
            let slots = step.rerotation_slots(r);
            let keys = self.sinks.get(&(seq, r.group)).ok_or_else(|| {
                ModelError::Config(format!(
                    "sequence {seq} group {}: sink keys were never captured",
                    r.group
                ))
            })?;
            let n = slots.len().min(keys.dim(0)?);
            let positions: Vec<usize> = (0..n).map(|j| r.first_position + j).collect();
            let (cos, sin) =
                self.model
                    .rope()
                    .tables(&positions, self.model.dtype(), self.model.device())?;
            let k = Rope::apply(&keys.narrow(0, 0, n)?, &cos, &sin)?;
            self.store.write_keys(&slots[..n], &k)?;
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

    /// Runs every layer over the step's rows; returns the last layer's output. When
    /// `target_keys` is given, the rotated keys of upward-target groups are pushed to it.
    fn run_layers(
        &mut self,
        step: &mut Step,
        layout: &Layout,
        mut target_keys: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let model = self.model.clone();
        let policy = self.policy.clone();
        let map = policy.layer_map();
        let mut x = model.embed(&layout.tokens)?;
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            let (normed, q) = model.attn_input(layer, &x)?;
            let q = Rope::apply(&q, &layout.cos, &layout.sin)?;
            if map.owns_kv(layer) {
                let (k, v) = model.kv(layer, &normed)?;
                self.capture_sinks(step, layout, g, &k)?;
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
                window: self.cache.layer_window(layer),
                include_diagonal: !map.is_upward(layer),
            };
            let reader = self.cache.read();
            let mut seqs = Vec::with_capacity(step.len());
            for i in 0..step.len() {
                let view = reader.view(step.seq(i), g)?;
                seqs.push(SeqQuery {
                    kv: SeqKv {
                        pages: view.pages,
                        num_slots: view.num_slots,
                        valid: view.valid,
                    },
                    q_start: layout.row_start[i],
                    num_q: step.num_new(i),
                    q_pos: step.q_pos(i, g),
                });
            }
            let out = paged_attention(&q, &self.store, &seqs, &params, step.mass_mut(g))?;
            if step.observed_mass_mut(g).is_some() {
                // SnapKV: the mass of the prompt's observation rows only, from a second call.
                let mut rows = Vec::new();
                let mut obs = Vec::with_capacity(seqs.len());
                for (i, s) in seqs.iter().enumerate() {
                    let r = step.observe_rows(i, g);
                    let start = rows.len();
                    rows.extend((r.start..r.end).map(|j| (s.q_start + j) as u32));
                    obs.push(SeqQuery {
                        kv: s.kv,
                        q_start: start,
                        num_q: r.len(),
                        q_pos: s.q_pos + r.start,
                    });
                }
                let idx = Tensor::new(rows.as_slice(), q.device())?;
                let q_obs = q.index_select(&idx, 0)?;
                paged_attention(
                    &q_obs,
                    &self.store,
                    &obs,
                    &params,
                    step.observed_mass_mut(g),
                )?;
            }
            drop(seqs);
            drop(reader);
            x = model.attn_output_and_mlp(layer, &x, &out)?;
        }
        Ok(x)
    }

    /// Stages deep copies of the pre-RoPE keys of the rows that are sinks of group `g`.
    fn capture_sinks(
        &mut self,
        step: &Step,
        layout: &Layout,
        g: GroupId,
        k: &Tensor,
    ) -> Result<()> {
        for i in 0..step.len() {
            let r = step.sink_rows(i, g);
            if r.is_empty() {
                continue;
            }
            let rows = k
                .narrow(0, layout.row_start[i] + r.start, r.len())?
                .copy()?;
            self.staged.entry((step.seq(i), g)).or_default().push(rows);
        }
        Ok(())
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
