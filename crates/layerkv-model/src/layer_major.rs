//! Layer-major prefill: KVzip's prompt-end compression without ever holding the whole prompt
//! in every layer (the engine's [`crate::engine::Engine::set_layer_major`]).
//!
//! Run step by step, KVzip holds the whole prompt and a probe in every layer until the prompt
//! ends, because its scores need every prompt token computed over the whole context; prefill
//! steps that compress as they go compute later tokens over a compressed past and lose what
//! KVzip keeps (`docs/benchmarks.md`). Layer-major order keeps both: every prompt token goes
//! through layer 0, then layer 1, and so on, so each layer's K/V are those of the whole
//! context while only one layer's prompt is held at a time; and with a KV head per lane
//! (per-head policies) only one lane's: the lanes of a layer attend independently, so they take
//! turns (each recomputes the layer's Q/K/V projections and keeps its heads), and their
//! attention outputs are joined before the output projection and the MLP.
//!
//! Two passes over the layers, each holding one lane of one layer's prompt in a **scratch**
//! cache (a one-layer, one-lane cache of the same heads per lane, page type and block size,
//! whose pages are the extra memory this costs, sized for exactly the most the passes hold at
//! once and returned by [`LayerMajor::prefill`]):
//! 1. **Scores**: layer `l` prefills the prompt's tokens but the last, in the engine's prefill
//!    steps, then runs the probe steps (the probe prefix, the tail, a chunk of the prompt) on
//!    their own hidden states at `l`, exactly the steps and kernels the step-by-step path runs,
//!    so the scores are the same; the lanes' scores are read back and the scratch freed.
//! 2. **Rows**: the main cache decides with every layer's scores at once (AdaKV's split across
//!    layers needs them all; [`layerkv::KvCache::adopt_prompt`]) and takes pages for the kept
//!    slots only; the prompt then runs through the layers again, and each layer writes the
//!    K/V rows its lanes keep into the main store. Its last layer's output is the prompt's,
//!    computed over the whole context, as the step-by-step path's.
//!
//! The price is a second prefill of the prompt (measured in `docs/benchmarks.md`). Only KVzip
//! deciding at the prompt's end qualifies ([`layerkv::KvCache::check_adoptable`]), on a map
//! where every layer owns its KV (a layer that reads a lower one's would need that layer's
//! whole prompt held until it ran).

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use layerkv::{
    CacheConfig, KvCache, LayerKvPolicy, LayerMap, PolicyBuilder, Reservation, SeqId, Step,
};
use layerkv_kernels::{AttentionParams, KvStore, StepExecutor};

use crate::engine::PROBE_TAIL;
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::rope::Rope;

/// The scratch sequence's id (the scratch cache holds no other).
const SCRATCH_SEQ: SeqId = 0x006c_6179_6572;

/// What a layer-major prefill reads from its engine.
pub(crate) struct LayerMajor<'a> {
    pub(crate) model: &'a Model,
    pub(crate) policy: &'a Arc<dyn LayerKvPolicy>,
    pub(crate) cache: &'a KvCache,
    pub(crate) store: &'a mut KvStore,
    /// Tokens per prefill step (the engine's prefill chunk).
    pub(crate) prefill_chunk: usize,
    /// Prompt tokens per probe step.
    pub(crate) probe_chunk: usize,
    /// Tokens every probe step puts before the prompt tokens it replays.
    pub(crate) probe_prefix: &'a [u32],
}

/// One lane of one layer's scratch: a one-layer, one-lane cache (one lane's heads), its page
/// tensors and an executor.
struct Scratch {
    cache: KvCache,
    store: KvStore,
    exec: StepExecutor,
    step: Step,
}

/// Why the engine cannot prefill layer-major under `policy` (`Ok` when it can).
pub(crate) fn check(policy: &dyn LayerKvPolicy, cache: &KvCache) -> Result<()> {
    let map = policy.layer_map();
    if let Some(l) = (0..map.num_layers()).find(|&l| !map.owns_kv(l) || map.group_of(l) != l) {
        return Err(ModelError::Config(format!(
            "layer-major prefill needs every layer to own its KV in a group of its own, but \
             layer {l} reads group {} (a sharing map)",
            map.group_of(l)
        )));
    }
    cache.check_adoptable()?;
    Ok(())
}

impl LayerMajor<'_> {
    /// Pages a scratch pool needs for a prompt of `n` tokens whose longest probe step has
    /// `probe_rows` rows, exactly: the larger of the prompt and its tokens but the last with a
    /// probe step, in one lane (the lanes of a layer take turns).
    fn scratch_pages(&self, n: usize, probe_rows: usize) -> usize {
        let bs = self.cache.config().block_size;
        (n - 1 + probe_rows).max(n).div_ceil(bs)
    }

    /// A one-layer, one-lane scratch: the main store's heads per lane, page types and block
    /// size; the retention of the policy's first lane (the scratch's prompt never ends, so only
    /// its probe scores are read).
    fn scratch(&self, num_pages: usize) -> Result<Scratch> {
        let main = self.cache.config();
        let policy = PolicyBuilder::new(LayerMap::identity(1)?)
            .retention(self.policy.lane_retention(0, 0).clone())
            .build()?;
        let cache = KvCache::new(
            Arc::new(policy),
            CacheConfig {
                block_size: main.block_size,
                num_pages,
                bytes_per_token: main.bytes_per_token,
                prefix_caching: false,
                sliding_window: None,
                model_window: None,
                lanes: 1,
            },
        )?;
        let store = KvStore::with_types(
            num_pages,
            main.block_size,
            self.store.kv_heads(),
            self.store.head_dim(),
            self.store.types(),
            self.model.device(),
        )?;
        Ok(Scratch {
            cache,
            store,
            exec: StepExecutor::new(),
            step: Step::new(),
        })
    }

    /// Prefills `prompt` (2 tokens or more) into the empty sequence `seq` layer by layer and
    /// installs it compressed; returns the last layer's output for every prompt row (before
    /// the final norm) and the bytes of the scratch pages (allocated for exactly the most the
    /// passes hold at once). On failure the sequence may hold adopted pages: the caller frees
    /// it.
    pub(crate) fn prefill(&mut self, seq: SeqId, prompt: &[u32]) -> Result<(Tensor, usize)> {
        let n = prompt.len();
        let model = self.model;
        let map = self.policy.layer_map();
        let lanes = self.cache.lanes();
        let head = &prompt[..n - 1];
        let probes = self.probe_steps(head);
        let probe_rows = probes.iter().map(|(t, _, _)| t.len()).max().unwrap_or(0);
        let num_pages = self.scratch_pages(n, probe_rows);
        let mut scratch = self.scratch(num_pages)?;
        let chunks = |len: usize, step: usize| -> Vec<Range<usize>> {
            (0..len)
                .step_by(step)
                .map(|a| a..a.saturating_add(step).min(len))
                .collect()
        };
        let head_steps = chunks(n - 1, self.prefill_chunk);
        // Pass 1: every lane's probe scores, layer by layer, lane by lane.
        let mut x = model.embed(head)?;
        let mut px = probes
            .iter()
            .map(|(t, _, _)| model.embed(t))
            .collect::<Result<Vec<_>>>()?;
        let mut scores = vec![Vec::new(); self.cache.num_groups()];
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            let mut attn = Vec::with_capacity(lanes);
            let mut probe_attn: Vec<Vec<Tensor>> = (0..probes.len())
                .map(|_| Vec::with_capacity(lanes))
                .collect();
            for h in 0..lanes {
                let lane = LaneInput::new(model, layer, h, lanes);
                scratch.begin(n)?;
                attn.push(scratch.prompt(&lane, &x, head, &head_steps, |_, _, _| Ok(()))?);
                for (j, (tokens, unscored, replayed)) in probes.iter().enumerate() {
                    let out = scratch.probe(&lane, &px[j], tokens, *unscored, replayed.clone())?;
                    probe_attn[j].push(out);
                }
                let mut s = scratch.cache.probe_scores(SCRATCH_SEQ, 0)?;
                s.resize(n, f32::INFINITY);
                scores[self.cache.lane(g, h)] = s;
                scratch.end()?;
            }
            x = finish_layer(model, layer, &x, &attn, &head_steps)?;
            for (j, parts) in probe_attn.into_iter().enumerate() {
                let rows = 0..px[j].dim(0)?;
                let parts: Vec<Vec<Tensor>> = parts.into_iter().map(|a| vec![a]).collect();
                px[j] = finish_layer(model, layer, &px[j], &parts, std::slice::from_ref(&rows))?;
            }
        }
        // Pass 2: the cache decides, then every layer writes the rows its lanes keep.
        let kept = self.cache.adopt_prompt(seq, n, &scores)?;
        let bs = self.cache.config().block_size;
        // The head in prefill steps, then the last token alone, as the step path runs them.
        let mut steps = head_steps.clone();
        steps.push(n - 1..n);
        let mut x = model.embed(prompt)?;
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            let mut attn = Vec::with_capacity(lanes);
            for h in 0..lanes {
                let lane = LaneInput::new(model, layer, h, lanes);
                let main_lane = self.cache.lane(g, h);
                let pos = &kept[main_lane];
                let store = &mut *self.store;
                let cache = self.cache;
                let write = |at: Range<usize>, k: &Tensor, v: &Tensor| -> Result<()> {
                    let lo = pos.partition_point(|&p| (p as usize) < at.start);
                    let hi = pos.partition_point(|&p| (p as usize) < at.end);
                    if lo == hi {
                        return Ok(());
                    }
                    let slots: Vec<u32> = {
                        let reader = cache.read();
                        let table = reader.table(seq, main_lane)?;
                        (lo..hi)
                            .map(|s| table.physical_slot(s, bs).expect("adopted slot"))
                            .collect()
                    };
                    let rows: Vec<u32> = pos[lo..hi].iter().map(|&p| p - at.start as u32).collect();
                    let rows = Tensor::new(rows.as_slice(), k.device())?;
                    store.write(
                        &slots,
                        &k.index_select(&rows, 0)?.contiguous()?,
                        &v.index_select(&rows, 0)?.contiguous()?,
                    )?;
                    Ok(())
                };
                scratch.begin(n)?;
                attn.push(scratch.prompt(&lane, &x, prompt, &steps, write)?);
                scratch.end()?;
            }
            x = finish_layer(model, layer, &x, &attn, &steps)?;
        }
        Ok((x, num_pages * scratch.cache.config().page_bytes()))
    }

    /// The probe steps of a prompt whose tokens but the last are `context`: (tokens, unscored
    /// rows, replayed positions) per step, as the engine's step path builds them.
    fn probe_steps(&self, context: &[u32]) -> Vec<(Vec<u32>, usize, Range<usize>)> {
        let mut steps = Vec::new();
        let mut start = 0;
        while start < context.len() {
            let mut tokens = Vec::new();
            let (end, unscored) = probe_step(
                self.probe_prefix,
                context,
                start,
                self.probe_chunk,
                &mut tokens,
            );
            steps.push((tokens, unscored, start..end));
            start = end;
        }
        steps
    }
}

/// The probe step replaying `context[start..]`: the probe prefix, the last [`PROBE_TAIL`]
/// context tokens before `start` (where to start copying from, as KVzip's later chunks say),
/// then up to `chunk` tokens from `start`, written into `tokens` (cleared first). Returns the
/// end of the replayed positions and the rows before them, which are not scored. The one
/// definition of a probe step, for the step path and the layer-major one alike (their scores
/// must match).
pub(crate) fn probe_step(
    prefix: &[u32],
    context: &[u32],
    start: usize,
    chunk: usize,
    tokens: &mut Vec<u32>,
) -> (usize, usize) {
    let end = start.saturating_add(chunk).min(context.len());
    let tail = &context[start.saturating_sub(PROBE_TAIL)..start];
    tokens.clear();
    tokens.extend_from_slice(prefix);
    tokens.extend_from_slice(tail);
    tokens.extend_from_slice(&context[start..end]);
    (end, prefix.len() + tail.len())
}

/// One lane's share of a layer: its query heads and KV heads (all of them without lanes).
struct LaneInput<'a> {
    model: &'a Model,
    layer: usize,
    lane: usize,
    lanes: usize,
}

impl<'a> LaneInput<'a> {
    fn new(model: &'a Model, layer: usize, lane: usize, lanes: usize) -> Self {
        Self {
            model,
            layer,
            lane,
            lanes,
        }
    }

    /// The lane's rotated queries, pre-RoPE keys, rotated keys and values for rows `x` at
    /// text positions `positions` (the projections of the whole layer, narrowed: recomputed
    /// per lane rather than held for the whole prompt).
    fn project(&self, x: &Tensor, positions: &[usize]) -> Result<[Tensor; 4]> {
        let model = self.model;
        let (cos, sin) = model
            .rope()
            .tables(positions, model.dtype(), model.device())?;
        let (normed, q) = model.attn_input(self.layer, x)?;
        let (k, v) = model.kv(self.layer, &normed)?;
        let q = narrow_lane(&q, self.lane, self.lanes)?;
        let k = narrow_lane(&k, self.lane, self.lanes)?;
        let v = narrow_lane(&v, self.lane, self.lanes)?;
        let q = Rope::apply(&q, &cos, &sin)?;
        let k_rotated = Rope::apply(&k, &cos, &sin)?;
        Ok([q, k, k_rotated, v])
    }
}

/// Heads `[lane * per, (lane + 1) * per)` of `t` `[rows, heads, d]`, `per = heads / lanes`.
fn narrow_lane(t: &Tensor, lane: usize, lanes: usize) -> Result<Tensor> {
    if lanes == 1 {
        return Ok(t.clone());
    }
    let per = t.dim(1)? / lanes;
    Ok(t.narrow(1, lane * per, per)?.contiguous()?)
}

/// The rest of layer `layer` for rows `x`, step by step as `steps` cut them: every lane's
/// attention output (`attn[lane]`, one tensor per step) joined, the output projection and the
/// MLP.
fn finish_layer(
    model: &Model,
    layer: usize,
    x: &Tensor,
    attn: &[Vec<Tensor>],
    steps: &[Range<usize>],
) -> Result<Tensor> {
    let mut out = Vec::with_capacity(steps.len());
    for (i, r) in steps.iter().enumerate() {
        let heads: Vec<&Tensor> = attn.iter().map(|lane| &lane[i]).collect();
        let a = Tensor::cat(&heads, 1)?;
        out.push(model.attn_output_and_mlp(layer, &x.narrow(0, r.start, r.len())?, &a)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

impl Scratch {
    /// A fresh scratch sequence whose prompt never ends (so nothing is evicted there).
    fn begin(&mut self, n: usize) -> Result<()> {
        self.cache.add_sequence(SCRATCH_SEQ)?;
        self.cache.set_prompt_len(SCRATCH_SEQ, n + 1)?;
        Ok(())
    }

    /// Frees the scratch sequence (its pages return to the scratch pool).
    fn end(&mut self) -> Result<()> {
        self.exec.free(SCRATCH_SEQ);
        self.cache.free(SCRATCH_SEQ)?;
        Ok(())
    }

    /// Appends `tokens` (from text position 0, input `x` of the layer) in `steps`, runs
    /// the lane's attention on each and retains it; `write` gets each step's positions and the
    /// lane's rotated keys and values. Returns the lane's attention output per step.
    fn prompt(
        &mut self,
        lane: &LaneInput<'_>,
        x: &Tensor,
        tokens: &[u32],
        steps: &[Range<usize>],
        mut write: impl FnMut(Range<usize>, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(steps.len());
        for r in steps {
            let batch = [(SCRATCH_SEQ, &tokens[r.clone()])];
            let mut reserved = self.cache.reserve(&batch, &mut self.step)?;
            let xs = x.narrow(0, r.start, r.len())?;
            let (a, k, v) = lane_attention(
                lane,
                &xs,
                &mut reserved,
                &mut self.store,
                &self.cache,
                &mut self.exec,
            )?;
            write(r.clone(), &k, &v)?;
            let (exec, store) = (&mut self.exec, &mut self.store);
            reserved.retain_with(|step| {
                let gathered = exec.gather(step, store)?;
                exec.complete(gathered, store)?;
                Ok::<(), ModelError>(())
            })?;
            out.push(a);
        }
        Ok(out)
    }

    /// One probe step of the lane (the probe rows' input `x` of the layer): scored, then
    /// rolled back. Returns the lane's attention output for the probe rows.
    fn probe(
        &mut self,
        lane: &LaneInput<'_>,
        x: &Tensor,
        tokens: &[u32],
        unscored: usize,
        replayed: Range<usize>,
    ) -> Result<Tensor> {
        let batch = [(SCRATCH_SEQ, tokens)];
        let mut reserved = self
            .cache
            .reserve_probe(&batch, unscored, replayed, &mut self.step)?;
        let r = lane_attention(
            lane,
            x,
            &mut reserved,
            &mut self.store,
            &self.cache,
            &mut self.exec,
        );
        let r = r.and_then(|(a, _, _)| {
            reserved.finish_probe()?;
            Ok(a)
        });
        self.exec.abort(&mut self.store)?;
        r
    }
}

/// One lane of a layer over a reserved step of the scratch: the lane's K/V written, its
/// attention. Returns the attention output `[rows, heads per lane, d]` and the lane's rotated
/// keys and values.
fn lane_attention(
    lane: &LaneInput<'_>,
    x: &Tensor,
    step: &mut Reservation<'_>,
    store: &mut KvStore,
    cache: &KvCache,
    exec: &mut StepExecutor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let positions: Vec<usize> = (0..step.num_new(0)).map(|j| step.position(0) + j).collect();
    let [q, k, k_rotated, v] = lane.project(x, &positions)?;
    exec.write(step, store, cache, 0, &k, &k_rotated, &v)?;
    let params = AttentionParams {
        scale: 1.0 / (lane.model.config().head_dim() as f32).sqrt(),
        window: None,
        include_diagonal: true,
    };
    let out = exec.attend(&q, store, cache, step, 0, &params)?;
    Ok((out, k_rotated, v))
}
