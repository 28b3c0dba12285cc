//! Layer-major prefill: KVzip's prompt-end compression without ever holding the whole prompt
//! in every layer (the engine's [`crate::engine::Engine::set_layer_major`]).
//!
//! Run step by step, KVzip holds the whole prompt and a probe in every layer until the prompt
//! ends, because its scores need every prompt token computed over the whole context; prefill
//! steps that compress as they go compute later tokens over a compressed past and lose what
//! KVzip keeps (`docs/benchmarks.md`). Layer-major order keeps both: every prompt token goes
//! through layer 0, then layer 1, and so on, so each layer's K/V are those of the whole
//! context while only one layer's prompt is held at a time.
//!
//! Two passes over the layers, each holding one layer's prompt in a **scratch** cache (a
//! one-layer cache of the same lanes, page type and block size, whose pages are the extra
//! memory this costs, sized for exactly the most the passes hold at once and returned by
//! [`LayerMajor::prefill`]):
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

/// One layer's scratch: a one-layer cache with the engine's lanes, its page tensors and an
/// executor.
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
    /// probe step, in every lane.
    fn scratch_pages(&self, n: usize, probe_rows: usize) -> usize {
        let bs = self.cache.config().block_size;
        self.cache.lanes() * (n - 1 + probe_rows).max(n).div_ceil(bs)
    }

    fn scratch(&self, num_pages: usize) -> Result<Scratch> {
        let lanes = self.cache.lanes();
        let main = self.cache.config();
        let policy = PolicyBuilder::new(LayerMap::identity(1)?)
            .retention(self.policy.retention(0).clone())
            .per_head(self.policy.per_head())
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
                lanes,
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
        // Pass 1: every lane's probe scores, layer by layer.
        let mut x = model.embed(head)?;
        let mut px = probes
            .iter()
            .map(|(t, _, _)| model.embed(t))
            .collect::<Result<Vec<_>>>()?;
        let mut scores = vec![Vec::new(); self.cache.num_groups()];
        for layer in 0..map.num_layers() {
            scratch.begin(n)?;
            x = scratch.prompt(model, layer, &x, head, 0, self.prefill_chunk, |_, _, _| {
                Ok(())
            })?;
            for (j, (tokens, unscored, replayed)) in probes.iter().enumerate() {
                px[j] = scratch.probe(model, layer, &px[j], tokens, *unscored, replayed.clone())?;
            }
            let g = map.group_of(layer);
            for h in 0..lanes {
                let mut s = scratch.cache.probe_scores(SCRATCH_SEQ, h)?;
                s.resize(n, f32::INFINITY);
                scores[self.cache.lane(g, h)] = s;
            }
            scratch.end()?;
        }
        // Pass 2: the cache decides, then every layer writes the rows its lanes keep.
        let kept = self.cache.adopt_prompt(seq, n, &scores)?;
        let bs = self.cache.config().block_size;
        let mut x = model.embed(prompt)?;
        let heads_per_lane = self.store.kv_heads();
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            scratch.begin(n)?;
            let store = &mut *self.store;
            let cache = self.cache;
            let mut write = |at: Range<usize>, k: &Tensor, v: &Tensor| -> Result<()> {
                for h in 0..lanes {
                    let lane = cache.lane(g, h);
                    let pos = &kept[lane];
                    let lo = pos.partition_point(|&p| (p as usize) < at.start);
                    let hi = pos.partition_point(|&p| (p as usize) < at.end);
                    if lo == hi {
                        continue;
                    }
                    let slots: Vec<u32> = {
                        let reader = cache.read();
                        let table = reader.table(seq, lane)?;
                        (lo..hi)
                            .map(|s| table.physical_slot(s, bs).expect("adopted slot"))
                            .collect()
                    };
                    let rows: Vec<u32> = pos[lo..hi].iter().map(|&p| p - at.start as u32).collect();
                    let rows = Tensor::new(rows.as_slice(), k.device())?;
                    let pick = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.index_select(&rows, 0)?
                            .narrow(1, h * heads_per_lane, heads_per_lane)?
                            .contiguous()?)
                    };
                    store.write(&slots, &pick(k)?, &pick(v)?)?;
                }
                Ok(())
            };
            // The head in prefill steps, then the last token alone, as the step path runs them.
            let x_head = x.narrow(0, 0, n - 1)?;
            let x_head = scratch.prompt(
                model,
                layer,
                &x_head,
                head,
                0,
                self.prefill_chunk,
                &mut write,
            )?;
            let x_last = x.narrow(0, n - 1, 1)?;
            let x_last = scratch.prompt(
                model,
                layer,
                &x_last,
                &prompt[n - 1..],
                n - 1,
                1,
                &mut write,
            )?;
            x = Tensor::cat(&[x_head, x_last], 0)?;
            scratch.end()?;
        }
        Ok((x, num_pages * scratch.cache.config().page_bytes()))
    }

    /// The probe steps of a prompt whose tokens but the last are `context`: (tokens, unscored
    /// rows, replayed positions) per step, as the engine's step path builds them.
    fn probe_steps(&self, context: &[u32]) -> Vec<(Vec<u32>, usize, Range<usize>)> {
        let mut steps = Vec::new();
        let mut start = 0;
        while start < context.len() {
            let end = start.saturating_add(self.probe_chunk).min(context.len());
            let tail = &context[start.saturating_sub(PROBE_TAIL)..start];
            let mut tokens = self.probe_prefix.to_vec();
            tokens.extend_from_slice(tail);
            tokens.extend_from_slice(&context[start..end]);
            steps.push((tokens, self.probe_prefix.len() + tail.len(), start..end));
            start = end;
        }
        steps
    }
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

    /// Appends `tokens` (at text positions `first..`, input `x` of layer `layer`) in steps of
    /// `chunk`, runs the layer on each and retains it; `write` gets each step's positions and
    /// rotated keys and values. Returns the layer's output rows.
    #[allow(clippy::too_many_arguments)]
    fn prompt(
        &mut self,
        model: &Model,
        layer: usize,
        x: &Tensor,
        tokens: &[u32],
        first: usize,
        chunk: usize,
        mut write: impl FnMut(Range<usize>, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut a = 0;
        while a < tokens.len() {
            let b = a.saturating_add(chunk).min(tokens.len());
            let batch = [(SCRATCH_SEQ, &tokens[a..b])];
            let mut reserved = self.cache.reserve(&batch, &mut self.step)?;
            let xs = x.narrow(0, a, b - a)?;
            let (y, k, v) = layer_pass(
                model,
                layer,
                &xs,
                &mut reserved,
                &mut self.store,
                &self.cache,
                &mut self.exec,
            )?;
            write(first + a..first + b, &k, &v)?;
            let (exec, store) = (&mut self.exec, &mut self.store);
            reserved.retain_with(|step| {
                let gathered = exec.gather(step, store)?;
                exec.complete(gathered, store)?;
                Ok::<(), ModelError>(())
            })?;
            out.push(y);
            a = b;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// One probe step at layer `layer` (input `x`): scored, then rolled back. Returns the
    /// probe rows' output of the layer.
    fn probe(
        &mut self,
        model: &Model,
        layer: usize,
        x: &Tensor,
        tokens: &[u32],
        unscored: usize,
        replayed: Range<usize>,
    ) -> Result<Tensor> {
        let batch = [(SCRATCH_SEQ, tokens)];
        let mut reserved = self
            .cache
            .reserve_probe(&batch, unscored, replayed, &mut self.step)?;
        let r = layer_pass(
            model,
            layer,
            x,
            &mut reserved,
            &mut self.store,
            &self.cache,
            &mut self.exec,
        );
        let r = r.and_then(|(y, _, _)| {
            reserved.finish_probe()?;
            Ok(y)
        });
        self.exec.abort(&mut self.store)?;
        r
    }
}

/// Layer `layer` over a reserved one-group step of the scratch: its K/V written, attention,
/// output projection and MLP. Returns the output and the rotated keys and values.
fn layer_pass(
    model: &Model,
    layer: usize,
    x: &Tensor,
    step: &mut Reservation<'_>,
    store: &mut KvStore,
    cache: &KvCache,
    exec: &mut StepExecutor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let positions: Vec<usize> = (0..step.num_new(0)).map(|j| step.position(0) + j).collect();
    let (cos, sin) = model
        .rope()
        .tables(&positions, model.dtype(), model.device())?;
    let (normed, q) = model.attn_input(layer, x)?;
    let q = Rope::apply(&q, &cos, &sin)?;
    let (k, v) = model.kv(layer, &normed)?;
    let k_rotated = Rope::apply(&k, &cos, &sin)?;
    exec.write(step, store, cache, 0, &k, &k_rotated, &v)?;
    let params = AttentionParams {
        scale: 1.0 / (model.config().head_dim() as f32).sqrt(),
        window: None,
        include_diagonal: true,
    };
    let out = exec.attend(&q, store, cache, step, 0, &params)?;
    let y = model.attn_output_and_mlp(layer, x, &out)?;
    Ok((y, k_rotated, v))
}
