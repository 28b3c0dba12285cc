//! [`Engine`]: runs a [`Model`] with a [`LayerKvPolicy`] by driving `layerkv`'s step protocol
//! ([`layerkv::Step`]): the cache reserves slots and plans copies, sink re-rotations and score
//! rows ([`layerkv::Reservation`]); the kernels' [`StepExecutor`] executes those plans on the
//! [`KvStore`] and runs attention; the cache retains and plans compaction moves, which the
//! executor executes. Everything a policy needs lives in the libraries; this runner is one
//! client of them (the `custom_engine` example is another).
//!
//! One step takes a batch of sequences, each with one or more new tokens (decode, prefill and
//! chunked prefill mix freely). Per layer: owners project K/V, rotate K at the tokens' text
//! positions and write both into their group's slots; every layer rotates its queries and runs
//! paged attention over the group it reads, adding its attention mass into the step's buffers
//! where the group's retention needs scores. After the step each group's retention runs.
//!
//! Semantics (docs/glossary.md names the terms):
//! - downward sharing runs in one pass per step;
//! - upward sharing (a layer reads a higher layer's group) never sees its own token's KV
//!   (diagonal masked); decode is one pass, prefill runs token by token or LCKV's iterative
//!   parallel prefill ([`PrefillMode`]), and only the final pass's attention mass counts;
//! - StreamingLLM positions: K is stored rotated at text positions, so the window keeps its
//!   relative distances; the sinks are re-rotated (from a copy of their pre-RoPE keys) to sit
//!   right before the first kept token after them, which equals RoPE at positions inside the
//!   cache, for O(sinks) work per step;
//! - under a policy that evicts, prompts longer than [`EngineConfig::prefill_chunk`] are split
//!   into chunks with retention in between, so memory stays within the policy's bound;
//! - under a policy that probes (KVzip, [`layerkv::Retention::probe_chunk`]) a new sequence's
//!   prompt runs all but its last token, then probe steps that replay it after the
//!   [`Engine::set_probe_prefix`] tokens ([`layerkv::KvCache::reserve_probe`], scored and
//!   rolled back), then its last token, where the retention decides with the probes' scores;
//!   KVzip compressing during prefill ([`layerkv::Retention::compresses_in_prefill`]) probes
//!   each prefill chunk right after it instead, so every next chunk's step compresses.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use layerkv::{
    CacheConfig, KvCache, LayerKvPolicy, Reservation, Scheduler, SchedulerOutput, SeqId, Step,
};
use layerkv_kernels::{AttentionParams, KvStore, KvType, KvTypes, StepExecutor};

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
    /// KV page types: f32, f16 or bf16, or llama.cpp's Q8_0 / Q4_0 blocks (CPU); K and V may
    /// differ (`KvType::F16.into()`: both f16).
    pub kv_dtype: KvTypes,
    /// Window of the layers the policy's map marks sliding (YOCO's `s` layers); required when
    /// the map has any. The model's own `sliding_window` (mistral) applies to the others.
    pub sliding_window: Option<usize>,
    /// Prefill of policies with upward sharing.
    pub prefill: PrefillMode,
    /// Under a policy that evicts, the most tokens of one sequence a step appends before
    /// retention runs (longer prompts are split).
    pub prefill_chunk: usize,
    /// Reuse the KV pages of prompt prefixes across sequences (full pages, looked up when a
    /// scheduler admits a request, see [`layerkv::KvCache::add_sequence_with_prefix`]). The
    /// cache turns it off for a policy that evicts, whose pages depend on more than their
    /// prefix ([`layerkv::KvCache::prefix_caching`] says whether it is on).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_pages: 4096,
            kv_dtype: KvTypes::both(KvType::F32),
            sliding_window: None,
            prefill: PrefillMode::Iterative {
                max_passes: 64,
                tolerance: 1e-4,
            },
            prefill_chunk: 256,
            prefix_caching: false,
        }
    }
}

/// A stage of a protocol step where [`Engine::inject_fault`] makes the step fail, to test that
/// a failure anywhere changes nothing (the cache, the store's rows for live slots, the scores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailStage {
    /// Right after the reserve, before anything is written.
    AfterReserve,
    /// After the copy-on-write page copies (only a step with copies reaches it).
    AfterCopies,
    /// After the sinks' in-place re-rotation (only a step with re-rotations reaches it).
    AfterRerotation,
    /// In layer `l`, after its K/V were written and before it attends (every layer of the
    /// first pass of an iterative prefill).
    Layer(usize),
    /// After the logits, before the retain.
    BeforeRetain,
    /// After the retain, with the compaction moves gathered but not yet written (only a step
    /// with moves reaches it).
    InMoves,
}

/// A failure armed by [`Engine::inject_fault`]: at `stage` of the `step`-th protocol step (0:
/// the first) of the next engine call. A prompt split into chunks runs one protocol step per
/// chunk; under KVzip a probe is a protocol step too ([`Engine::step_scheduled`] runs the
/// pending probes first, and a fault there fails the probe, not the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Protocol step of the next call (its prefill chunk).
    pub step: usize,
    /// Where in that step.
    pub stage: FailStage,
}

/// The tokens of a step's rows and their RoPE tables (text positions).
struct Rows {
    tokens: Vec<u32>,
    cos: Tensor,
    sin: Tensor,
}

/// Lanes per KV group for a model of `kv_heads` KV heads under `policy`: one per KV head for a
/// per-head policy ([`LayerKvPolicy::per_head`]), else 1. A pool's pages hold
/// `kv_heads / lanes` heads each.
pub fn kv_lanes(kv_heads: usize, policy: &dyn LayerKvPolicy) -> usize {
    layerkv::lanes_per_group(policy, kv_heads)
}

/// Prompt tokens before a probe's chunk that it replays unscored, so the copy has a start
/// (KVzip's "starting with" the previous chunk's last 8 tokens).
pub const PROBE_TAIL: usize = 8;

/// Rows a probing prompt of `len` tokens runs before its probes (`probing`: all but the last).
fn head_len(len: usize, probing: bool) -> usize {
    len - usize::from(probing)
}

/// A model, a policy, a cache and its page tensors.
#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    policy: Arc<dyn LayerKvPolicy>,
    cache: KvCache,
    store: KvStore,
    exec: StepExecutor,
    config: EngineConfig,
    step: Step,
    /// Prompt tokens per probe step when the policy probes (KVzip).
    probe_chunk: Option<usize>,
    /// Whether the policy compresses prompts while they prefill (KVzip with `prefill`): each
    /// prefill step's tokens are probed right after it.
    compresses_in_prefill: bool,
    /// Tokens a probe step puts before the prompt tokens it replays.
    probe_prefix: Vec<u32>,
    /// Armed by [`Engine::inject_fault`] for the next call.
    fault: Option<Fault>,
    /// Protocol steps the current call has run (where the armed fault fires).
    steps_in_call: usize,
    /// Sequences whose probes failed in [`Engine::step_scheduled`], with why.
    probe_failures: Vec<(SeqId, ModelError)>,
    /// The probing requests of a call (a buffer kept across calls).
    probe_ids: Vec<layerkv::RequestId>,
    /// Whether probing prompts prefill layer-major ([`Engine::set_layer_major`]).
    layer_major: bool,
    /// The most scratch bytes a layer-major prefill took since [`Engine::reset_scratch_peak`].
    scratch_peak: usize,
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
        // A per-head policy gives each KV head a lane: pages of one head.
        let lanes = kv_lanes(kv_heads, policy.as_ref());
        let heads_per_page = kv_heads / lanes;
        let bytes_per_token = heads_per_page * config.kv_dtype.token_head_bytes(head_dim);
        let cache = KvCache::new(
            policy.clone(),
            CacheConfig {
                block_size: config.block_size,
                num_pages: config.num_pages,
                bytes_per_token,
                prefix_caching: config.prefix_caching,
                sliding_window: config.sliding_window,
                model_window: cfg.sliding_window,
                lanes,
            },
        )?;
        let store = KvStore::with_types(
            config.num_pages,
            config.block_size,
            heads_per_page,
            head_dim,
            config.kv_dtype,
            model.device(),
        )?;
        let probe_chunk = layerkv::probe_chunk(policy.as_ref(), lanes);
        let compresses_in_prefill = layerkv::compresses_in_prefill(policy.as_ref(), lanes);
        Ok(Self {
            model,
            policy,
            cache,
            store,
            exec: StepExecutor::new(),
            config,
            step: Step::new(),
            probe_chunk,
            compresses_in_prefill,
            probe_prefix: Vec::new(),
            fault: None,
            steps_in_call: 0,
            probe_failures: Vec::new(),
            probe_ids: Vec::new(),
            layer_major: false,
            scratch_peak: 0,
        })
    }

    /// Arms a failure for the next [`Engine::step`], [`Engine::step_hidden`] or
    /// [`Engine::step_scheduled`] call (a failpoint, as fail-rs's): that call fails with
    /// [`ModelError::Fault`] when its protocol step `fault.step` reaches `fault.stage`, and
    /// disarms either way. For tests of what a failure leaves behind: nothing, in the cache
    /// and in the store's rows for live slots, with one exception: a prompt split into chunks
    /// that fails after its first chunk keeps the chunks already retained, unless the
    /// sequence was empty before the call (then it is empty again).
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Sets the tokens every probe step puts before the prompt tokens it replays (KVzip's
    /// "repeat the previous context" turn; [`crate::Session`] sets its chat template's). Empty
    /// by default: the probe then replays the prompt right after it.
    pub fn set_probe_prefix(&mut self, tokens: Vec<u32>) {
        self.probe_prefix = tokens;
    }

    /// Prefills KVzip's prompts **layer-major** ([`Engine::step`] and the calls on it; not
    /// [`Engine::step_scheduled`]): every prompt token through one layer before the next, so a
    /// sequence holds one lane of one layer's whole prompt (in a scratch cache) and the kept
    /// tokens of every layer instead of its whole prompt in every layer, with the same scores, kept
    /// tokens and logits as the step-by-step path, at the price of a second prefill (see
    /// `layer_major.rs`). Fails, changing nothing, unless the policy is KVzip deciding at the
    /// prompt's end on a map where every layer owns its KV, with no sliding layers and no
    /// prefix caching ([`layerkv::KvCache::check_adoptable`]).
    pub fn set_layer_major(&mut self, on: bool) -> Result<()> {
        if on {
            if self.probe_chunk.is_none() {
                return Err(ModelError::Config(
                    "layer-major prefill is for KVzip (kvzip:B), but the policy runs no probes"
                        .into(),
                ));
            }
            crate::layer_major::check(self.policy.as_ref(), &self.cache)?;
        }
        self.layer_major = on;
        Ok(())
    }

    /// Whether probing prompts prefill layer-major ([`Engine::set_layer_major`]).
    pub fn layer_major(&self) -> bool {
        self.layer_major
    }

    /// The most bytes of scratch pages a layer-major prefill held since the last
    /// [`Engine::reset_scratch_peak`] (one lane of one layer: the prompt and a probe step):
    /// memory on top of the pool's, which a measured peak must add.
    pub fn scratch_peak_bytes(&self) -> usize {
        self.scratch_peak
    }

    /// Restarts [`Engine::scratch_peak_bytes`] (as [`layerkv::KvCache::reset_peak`] does the
    /// pool's high-water mark).
    pub fn reset_scratch_peak(&mut self) {
        self.scratch_peak = 0;
    }

    /// Prompt tokens per probe step when the policy probes ([`layerkv::Retention::KvZip`]).
    pub fn probe_chunk(&self) -> Option<usize> {
        self.probe_chunk
    }

    /// The most tokens a probe step holds on top of its prompt (prefix, tail and chunk; 0 when
    /// the policy does not probe): room a request needs beyond its own tokens.
    pub fn probe_tokens(&self) -> usize {
        self.probe_chunk.map_or(0, |c| {
            c.saturating_add(PROBE_TAIL + self.probe_prefix.len())
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

    /// Whether any group can drop tokens (a retention that is not `Full`, or a window): such
    /// a policy prefills long prompts in chunks, and can stream past the model's context.
    pub fn evicts(&self) -> bool {
        self.cache.evicts()
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
        self.exec.fork(parent, child);
        Ok(())
    }

    /// Frees a sequence and all its pages.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)?;
        self.exec.free(seq);
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
        self.call(|e| e.dispatch(batch, rows, out))
    }

    /// One engine call: its protocol steps count from 0 for the armed fault, which is disarmed
    /// after it whether it fired or not.
    fn call<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.steps_in_call = 0;
        let r = f(self);
        self.fault = None;
        r
    }

    fn dispatch(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
    ) -> Result<Tensor> {
        if batch.is_empty() || batch.iter().any(|(_, t)| t.is_empty()) {
            return Err(ModelError::Config(
                "a step needs at least one token per sequence".into(),
            ));
        }
        if let Some(chunk) = self.probe_chunk {
            let probing = self.probing(batch)?;
            if probing.iter().any(|&p| p) {
                return self.probed(batch, &probing, rows, out, chunk);
            }
        }
        self.plain(batch, rows, out)
    }

    /// [`Engine::dispatch`] without probes: one step, or chunks under a policy that evicts.
    fn plain(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
    ) -> Result<Tensor> {
        let map = self.policy.layer_map();
        let upward = map.needs_upward();
        let longest = batch.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let chunk = self.prefill_steps();
        if longest > chunk {
            return self.chunked(batch, rows, out, chunk);
        }
        self.one_step(batch, rows, out, upward && longest > 1)
    }

    /// Tokens per step of a long batch: one token at a time for upward prefill token by
    /// token, the prefill chunk under a policy that evicts (retention between chunks), else
    /// all at once.
    fn prefill_steps(&self) -> usize {
        let upward = self.policy.layer_map().needs_upward();
        if upward && self.config.prefill == PrefillMode::TokenByToken {
            1
        } else if self.evicts() {
            self.config.prefill_chunk
        } else {
            usize::MAX
        }
    }

    /// Splits the batch's tokens into steps of at most `chunk` tokens per sequence (retention
    /// between them); an empty sequence without a declared prompt declares these tokens as its
    /// prompt. On failure, the
    /// sequences that were empty are emptied again (what earlier chunks retained cannot be
    /// rolled back, but an empty sequence can be restored exactly); the others keep what the
    /// chunks before the failed one appended.
    fn chunked(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
        chunk: usize,
    ) -> Result<Tensor> {
        self.restoring_fresh(batch, |e, fresh| {
            e.declare_prompts(batch, fresh)?;
            e.chunks(batch, rows, out, chunk, None)
        })
    }

    /// Declares this call's tokens as the prompt of each `fresh` sequence that declared none
    /// (one that did keeps its own).
    fn declare_prompts(&self, batch: &[(SeqId, &[u32])], fresh: &[SeqId]) -> Result<()> {
        for &(seq, tokens) in batch {
            if fresh.contains(&seq) && self.cache.prompt_len(seq)?.is_none() {
                self.cache.set_prompt_len(seq, tokens.len())?;
            }
        }
        Ok(())
    }

    /// Runs `f` with the ids of the batch's empty sequences; if it fails, those sequences are
    /// emptied again, with the prompt length they had declared (what `f` retained of the
    /// others cannot be rolled back).
    fn restoring_fresh<T>(
        &mut self,
        batch: &[(SeqId, &[u32])],
        f: impl FnOnce(&mut Self, &[SeqId]) -> Result<T>,
    ) -> Result<T> {
        let mut fresh = Vec::new();
        for &(seq, _) in batch {
            if self.cache.num_tokens(seq)? == 0 {
                fresh.push((seq, self.cache.prompt_len(seq)?));
            }
        }
        let ids: Vec<SeqId> = fresh.iter().map(|&(s, _)| s).collect();
        let r = f(self, &ids);
        if r.is_err() {
            for &(seq, prompt_len) in &fresh {
                self.cache.free(seq)?;
                self.exec.free(seq);
                self.cache.add_sequence(seq)?;
                if let Some(p) = prompt_len {
                    self.cache.set_prompt_len(seq, p)?;
                }
            }
        }
        r
    }

    /// Which batch entries probe: an empty sequence whose whole prompt (2 tokens or more) is
    /// this call's tokens.
    fn probing(&self, batch: &[(SeqId, &[u32])]) -> Result<Vec<bool>> {
        batch
            .iter()
            .map(|&(seq, t)| {
                let declared = self.cache.prompt_len(seq)?;
                Ok(t.len() > 1
                    && self.cache.num_tokens(seq)? == 0
                    && declared.is_none_or(|p| p == t.len()))
            })
            .collect()
    }

    /// A batch with probing prompts: every token but the probing prompts' last, the probe
    /// steps of each probing prompt, then their last tokens (the prompt's end, where the
    /// retention decides); the rows are put back in batch order.
    fn probed(
        &mut self,
        batch: &[(SeqId, &[u32])],
        probing: &[bool],
        rows: LogitsRows,
        out: Output,
        chunk: usize,
    ) -> Result<Tensor> {
        if self.layer_major {
            return self.restoring_fresh(batch, |e, fresh| {
                e.declare_prompts(batch, fresh)?;
                e.layer_major_batch(batch, probing, rows, out, chunk)
            });
        }
        self.restoring_fresh(batch, |e, fresh| {
            e.declare_prompts(batch, fresh)?;
            let head: Vec<(SeqId, &[u32])> = batch
                .iter()
                .zip(probing)
                .map(|(&(s, t), &p)| (s, if p { &t[..t.len() - 1] } else { t }))
                .collect();
            let x_head = if e.compresses_in_prefill {
                // Each prefill step's tokens probed right after it, so the next step compresses;
                // steps of the prefill chunk, as the scheduler's (upward maps prefilled token
                // by token too: a probe per token would score nothing like the served steps).
                let steps = e.config.prefill_chunk;
                e.chunks(&head, rows, out, steps, Some((probing, chunk)))?
            } else {
                let x = e.plain(&head, rows, out)?;
                for (&(seq, t), _) in batch.iter().zip(probing).filter(|(_, &p)| p) {
                    e.probe(seq, &t[..t.len() - 1], 0..t.len() - 1, chunk)?;
                }
                x
            };
            let tail: Vec<(SeqId, &[u32])> = batch
                .iter()
                .zip(probing)
                .filter(|(_, &p)| p)
                .map(|(&(s, t), _)| (s, &t[t.len() - 1..]))
                .collect();
            let x_tail = e.plain(&tail, LogitsRows::All, out)?;
            let (mut at_head, mut at_tail) = (0, 0);
            let mut parts = Vec::with_capacity(batch.len() * 2);
            for ((_, t), &p) in batch.iter().zip(probing) {
                let n_head = match rows {
                    LogitsRows::All => head_len(t.len(), p),
                    LogitsRows::Last => 1,
                };
                if rows == LogitsRows::All || !p {
                    parts.push(x_head.narrow(0, at_head, n_head)?);
                }
                at_head += n_head;
                if p {
                    parts.push(x_tail.narrow(0, at_tail, 1)?);
                    at_tail += 1;
                }
            }
            Ok(Tensor::cat(&parts, 0)?)
        })
    }

    /// [`Engine::probed`] layer-major: each probing prompt prefilled layer by layer
    /// ([`crate::layer_major`]), then the other entries as [`Engine::plain`] runs them; the rows
    /// in batch order. The probing sequences go first: they were empty, so a failure of the
    /// others' steps after them is undone by [`Engine::restoring_fresh`], while a failed prefill
    /// has not moved the others yet.
    fn layer_major_batch(
        &mut self,
        batch: &[(SeqId, &[u32])],
        probing: &[bool],
        rows: LogitsRows,
        out: Output,
        chunk: usize,
    ) -> Result<Tensor> {
        let mut own: Vec<Option<Tensor>> = Vec::with_capacity(batch.len());
        for (&(seq, t), &p) in batch.iter().zip(probing) {
            if !p {
                own.push(None);
                continue;
            }
            let mut run = crate::layer_major::LayerMajor {
                model: &self.model,
                policy: &self.policy,
                cache: &self.cache,
                store: &mut self.store,
                prefill_chunk: self.config.prefill_chunk,
                probe_chunk: chunk,
                probe_prefix: &self.probe_prefix,
            };
            let (x, scratch) = run.prefill(seq, t)?;
            self.scratch_peak = self.scratch_peak.max(scratch);
            let x = match rows {
                LogitsRows::All => x,
                LogitsRows::Last => x.narrow(0, t.len() - 1, 1)?,
            };
            own.push(Some(match out {
                Output::Logits => self.model.logits(&x)?,
                Output::Hidden => self.model.final_hidden(&x)?,
            }));
        }
        let others: Vec<(SeqId, &[u32])> = batch
            .iter()
            .zip(probing)
            .filter(|(_, &p)| !p)
            .map(|(&b, _)| b)
            .collect();
        let x_others = if others.is_empty() {
            None
        } else {
            Some(self.plain(&others, rows, out)?)
        };
        let mut parts = Vec::with_capacity(batch.len());
        let mut at = 0;
        for ((_, t), x) in batch.iter().zip(own) {
            if let Some(x) = x {
                parts.push(x);
                continue;
            }
            let k = match rows {
                LogitsRows::All => t.len(),
                LogitsRows::Last => 1,
            };
            let x = x_others.as_ref().expect("a plain step ran for the others");
            parts.push(x.narrow(0, at, k)?);
            at += k;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The probe steps of positions `at` of `seq`'s prompt `context` (all but its last
    /// token): chunks of `chunk` tokens, each after the probe prefix and the last
    /// [`PROBE_TAIL`] tokens of the context before it (where to start copying from, as
    /// KVzip's later chunks say), scored on the chunk's own slots and rolled back.
    fn probe(&mut self, seq: SeqId, context: &[u32], at: Range<usize>, chunk: usize) -> Result<()> {
        let upward = self.policy.layer_map().needs_upward();
        let room = chunk.min(at.len());
        let mut tokens = Vec::with_capacity(self.probe_prefix.len() + PROBE_TAIL + room);
        let mut start = at.start;
        while start < at.end {
            let (end, unscored) = crate::layer_major::probe_step(
                &self.probe_prefix,
                &context[..at.end],
                start,
                chunk,
                &mut tokens,
            );
            let batch = [(seq, tokens.as_slice())];
            let (mut run, step) = self.parts();
            let reserved = run
                .cache
                .reserve_probe(&batch, unscored, start..end, step)?;
            run.probe(reserved, &batch, upward && tokens.len() > 1)?;
            start = end;
        }
        Ok(())
    }

    /// Splits the batch's tokens into steps of at most `chunk` tokens per sequence (retention
    /// between them). With `probes` (KVzip compressing during prefill: which entries probe,
    /// and the probe chunk), each probing entry's step is followed by the probes of its own
    /// tokens, so the next step's retention compresses with their scores.
    fn chunks(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
        chunk: usize,
        probes: Option<(&[bool], usize)>,
    ) -> Result<Tensor> {
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
                    (
                        batch[i].0,
                        &t[start..start.saturating_add(chunk).min(t.len())],
                    )
                })
                .collect();
            let multi = sub.iter().any(|(_, t)| t.len() > 1);
            let x = self.one_step(&sub, LogitsRows::All, out, upward && multi)?;
            if let Some((probing, probe_chunk)) = probes {
                for &i in idx.iter().filter(|&&i| probing[i]) {
                    let (seq, t) = batch[i];
                    let end = start.saturating_add(chunk).min(t.len());
                    self.probe(seq, t, start..end, probe_chunk)?;
                }
            }
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

    /// One protocol step: reserve, run the layers (iteratively for upward prefill), retain.
    /// The reservation rolls the step back if anything fails before it is retained.
    fn one_step(
        &mut self,
        batch: &[(SeqId, &[u32])],
        rows: LogitsRows,
        out: Output,
        iterative: bool,
    ) -> Result<Tensor> {
        let (mut run, step) = self.parts();
        let reserved = run.cache.reserve(batch, step)?;
        let pick = match rows {
            LogitsRows::All => None,
            LogitsRows::Last => Some((0..batch.len()).collect::<Vec<_>>()),
        };
        run.run(reserved, batch, pick.as_deref(), out, iterative)
    }

    /// Runs the step `scheduler` schedules into `out` (continuous batching, see
    /// [`layerkv::Scheduler`]): the scheduler admits, batches and reserves (preempting when the pool
    /// is out of pages), then the layers run and the step is retained. Returns the f32 logits
    /// `[n, vocab]` of the entries that [`layerkv::ScheduledRequest::samples`], in `out`'s
    /// order (`n` may be 0), or `None` when nothing was scheduled. The caller samples and hands
    /// the tokens to [`Scheduler::update`].
    ///
    /// Steps keep the scheduler's fixed prefill chunks, so give it this engine's
    /// [`EngineConfig::prefill_chunk`] as its `prefill_chunk`: a policy that evicts then sees
    /// the same steps as under [`Engine::step`]. Under a policy that probes (KVzip) the
    /// scheduler ends a prompt's chunks one token early and holds the request back until its
    /// probes ran ([`Scheduler::probing`]); the engine runs up to a prefill chunk's worth
    /// of them before each step, so a call may probe and schedule nothing (`None`; call
    /// again while [`Scheduler::num_probing`] is not 0). Plan the probes' room with
    /// [`Scheduler::with_probe_tokens`] of [`Engine::probe_tokens`], and end the requests of
    /// [`Engine::take_probe_failures`] after each call. Sequences the scheduler frees
    /// (preemption, [`Scheduler::finish`], length) must also be dropped from the engine's
    /// executor with [`Engine::forget`].
    pub fn step_scheduled(
        &mut self,
        scheduler: &mut Scheduler,
        out: &mut SchedulerOutput,
    ) -> Result<Option<Tensor>> {
        self.call(|e| e.scheduled(scheduler, out))
    }

    fn scheduled(
        &mut self,
        scheduler: &mut Scheduler,
        out: &mut SchedulerOutput,
    ) -> Result<Option<Tensor>> {
        if let Some(chunk) = self.probe_chunk {
            self.pending_probes(scheduler, chunk);
        }
        let (mut run, step) = self.parts();
        let scheduled = scheduler.schedule(run.cache, step, out);
        for &id in out.preempted() {
            run.exec.free(id);
        }
        let Some(reserved) = scheduled? else {
            self.drop_preempted_probe_failures(out);
            return Ok(None);
        };
        let batch: Vec<(SeqId, &[u32])> = out
            .scheduled()
            .iter()
            .map(|e| (e.seq, out.tokens(e)))
            .collect();
        let pick: Vec<usize> = (0..batch.len())
            .filter(|&i| out.scheduled()[i].samples)
            .collect();
        let upward = run.policy.layer_map().needs_upward();
        let iterative = upward && batch.iter().any(|(_, t)| t.len() > 1);
        let x = run.run(reserved, &batch, Some(&pick), Output::Logits, iterative);
        self.drop_preempted_probe_failures(out);
        Ok(Some(x?))
    }

    /// A request the step preempted was requeued for recompute, which prefills and probes it
    /// again: a probe of it that failed before the step is moot (settling it would end the
    /// request instead).
    fn drop_preempted_probe_failures(&mut self, out: &SchedulerOutput) {
        self.probe_failures
            .retain(|(seq, _)| !out.preempted().contains(seq));
    }

    /// Runs the probe steps the scheduler has pending (KVzip: after the update of the step
    /// that brought a prompt to one token before its end, or under `prefill` after each
    /// prefill step; [`Scheduler::probing`]): for every probing request, oldest first, probe
    /// steps one chunk at a time while their rows (prefix, tail and replayed chunk) fit a
    /// prefill chunk (at least one step each). A long prompt's probes then take several
    /// calls, and the requests decoding beside it get a token at each instead of waiting for
    /// all of them, as chunked prefill bounds a step; every probing request moves on at each
    /// call. A probing request is not scheduled meanwhile, so its probes see what an
    /// unbatched run's see. A failed probe changed nothing; it is recorded for its request
    /// ([`Engine::take_probe_failures`]), which probes no more in this call.
    fn pending_probes(&mut self, scheduler: &mut Scheduler, chunk: usize) {
        let budget = self.config.prefill_chunk;
        let mut ids = std::mem::take(&mut self.probe_ids);
        ids.clear();
        ids.extend(scheduler.probing());
        for &id in &ids {
            let mut ran = 0;
            while let Some(p) = scheduler.pending_probe(id) {
                let (seq, at) = (p.seq, p.positions.clone());
                let end = at.start.saturating_add(chunk).min(at.end);
                let rows = self.probe_prefix.len() + PROBE_TAIL.min(at.start) + (end - at.start);
                if ran > 0 && ran + rows > budget {
                    break;
                }
                if let Err(err) = self.probe(seq, p.context, at.start..end, chunk) {
                    self.probe_failures.push((seq, err));
                    break;
                }
                if let Err(err) = scheduler.probed(id, at.start..end) {
                    self.probe_failures.push((seq, err.into()));
                    break;
                }
                ran += rows;
            }
        }
        self.probe_ids = ids;
    }

    /// The sequences whose probes failed in [`Engine::step_scheduled`] since the last call,
    /// with why. Each probe that failed was rolled back (the sequence holds what it held
    /// before; its request is still probing), but the prompt is not scored yet: preempt the
    /// request (recompute) where the pool was out of pages, else end it.
    pub fn take_probe_failures(&mut self) -> Vec<(SeqId, ModelError)> {
        std::mem::take(&mut self.probe_failures)
    }

    /// The engine split for one step: what runs it, and the step buffer it is reserved into
    /// (borrowed apart, so a reservation of the step can live beside the runner).
    fn parts(&mut self) -> (Execute<'_>, &mut Step) {
        let fault = self
            .fault
            .filter(|f| f.step == self.steps_in_call)
            .map(|f| f.stage);
        self.steps_in_call += 1;
        let run = Execute {
            fault,
            model: &self.model,
            policy: &self.policy,
            cache: &self.cache,
            config: &self.config,
            store: &mut self.store,
            exec: &mut self.exec,
        };
        (run, &mut self.step)
    }

    /// Drops the executor's state of `seq` (its sinks' stashed keys) after something other than
    /// [`Engine::free`] freed it in the cache: a [`Scheduler`] finishing, cancelling or
    /// preempting a request. Unknown sequences are ignored.
    pub fn forget(&mut self, seq: SeqId) {
        self.exec.free(seq);
    }
}

/// What runs a reserved step: the model and its policy, the cache, the page tensors and the
/// step executor.
struct Execute<'a> {
    /// Where this step fails on purpose ([`Engine::inject_fault`]).
    fault: Option<FailStage>,
    model: &'a Model,
    policy: &'a Arc<dyn LayerKvPolicy>,
    cache: &'a KvCache,
    config: &'a EngineConfig,
    store: &'a mut KvStore,
    exec: &'a mut StepExecutor,
}

/// [`ModelError::Fault`] when the armed stage is `here`.
fn fail_at(armed: Option<FailStage>, here: FailStage) -> Result<()> {
    match armed {
        Some(a) if a == here => Err(ModelError::Fault(here)),
        _ => Ok(()),
    }
}

impl Execute<'_> {
    /// Runs the reserved step: its plans, the layers (iteratively for upward prefill), the
    /// logits, then the retain with the compaction moves as one transaction; returns `out`
    /// for every row (`pick` `None`) or for the last row of the batch entries `pick` lists.
    /// On any failure the cache is rolled back (the reservation's drop) and the executor
    /// writes back what it overwrote in place, so the step changed nothing.
    fn run(
        &mut self,
        reserved: Reservation<'_>,
        batch: &[(SeqId, &[u32])],
        pick: Option<&[usize]>,
        out: Output,
        iterative: bool,
    ) -> Result<Tensor> {
        let r = self.execute(reserved, batch, pick, out, iterative);
        if r.is_err() {
            self.exec.abort(self.store)?;
        }
        r
    }

    /// Runs a reserved probe step: its plans and the layers (no logits), then
    /// [`Reservation::finish_probe`]; the executor then writes back what it overwrote in place
    /// (re-rotated sinks), so the probe leaves nothing but its scores.
    fn probe(
        &mut self,
        reserved: Reservation<'_>,
        batch: &[(SeqId, &[u32])],
        iterative: bool,
    ) -> Result<()> {
        let r = self.run_probe(reserved, batch, iterative);
        self.exec.abort(self.store)?;
        r
    }

    fn run_probe(
        &mut self,
        mut reserved: Reservation<'_>,
        batch: &[(SeqId, &[u32])],
        iterative: bool,
    ) -> Result<()> {
        let (model, store, exec) = (self.model, &mut *self.store, &mut *self.exec);
        fail_at(self.fault, FailStage::AfterReserve)?;
        let mut layers = Layers::new(model, self.policy.layer_map(), self.cache, batch, &reserved)?;
        layers.fault = self.fault;
        exec.copy_pages(&reserved, store)?;
        exec.rerotate(&reserved, store, model.rope())?;
        if iterative {
            let prefill = self.config.prefill;
            layers.iterate(store, exec, &mut reserved, prefill)?;
        } else {
            layers.run(store, exec, &mut reserved, None)?;
        }
        Ok(reserved.finish_probe()?)
    }

    fn execute(
        &mut self,
        mut reserved: Reservation<'_>,
        batch: &[(SeqId, &[u32])],
        pick: Option<&[usize]>,
        out: Output,
        iterative: bool,
    ) -> Result<Tensor> {
        let (model, store, exec, fault) =
            (self.model, &mut *self.store, &mut *self.exec, self.fault);
        fail_at(fault, FailStage::AfterReserve)?;
        let mut layers = Layers::new(model, self.policy.layer_map(), self.cache, batch, &reserved)?;
        layers.fault = fault;
        exec.copy_pages(&reserved, store)?;
        if !reserved.copies().is_empty() {
            fail_at(fault, FailStage::AfterCopies)?;
        }
        exec.rerotate(&reserved, store, model.rope())?;
        if !reserved.rerotations().is_empty() {
            fail_at(fault, FailStage::AfterRerotation)?;
        }
        let x = if iterative {
            let prefill = self.config.prefill;
            layers.iterate(store, exec, &mut reserved, prefill)?
        } else {
            layers.run(store, exec, &mut reserved, None)?
        };
        let x = match pick {
            None => x,
            Some(entries) => {
                let idx: Vec<u32> = entries
                    .iter()
                    .map(|&i| (reserved.rows(i).end - 1) as u32)
                    .collect();
                x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?
            }
        };
        let x = match out {
            Output::Logits => model.logits(&x)?,
            Output::Hidden => model.final_hidden(&x)?,
        };
        fail_at(fault, FailStage::BeforeRetain)?;
        reserved.retain_with(|step| {
            let gathered = exec.gather(step, store)?;
            if gathered.is_some() {
                fail_at(fault, FailStage::InMoves)?;
            }
            exec.complete(gathered, store)?;
            Ok::<(), ModelError>(())
        })?;
        Ok(x)
    }
}

/// One pass of every layer over a reserved step's rows.
struct Layers<'a> {
    model: &'a Model,
    map: &'a layerkv::LayerMap,
    cache: &'a KvCache,
    rows: Rows,
    /// Where the step fails on purpose ([`FailStage::Layer`]).
    fault: Option<FailStage>,
}

impl<'a> Layers<'a> {
    /// The rows of a reserved step: tokens in batch order, RoPE tables at text positions.
    fn new(
        model: &'a Model,
        map: &'a layerkv::LayerMap,
        cache: &'a KvCache,
        batch: &[(SeqId, &[u32])],
        step: &Step,
    ) -> Result<Self> {
        let mut tokens = Vec::with_capacity(step.num_rows());
        let mut positions = Vec::with_capacity(step.num_rows());
        for (i, (_, t)) in batch.iter().enumerate() {
            tokens.extend_from_slice(t);
            positions.extend((0..step.num_new(i)).map(|j| step.position(i) + j));
        }
        let (cos, sin) = model
            .rope()
            .tables(&positions, model.dtype(), model.device())?;
        Ok(Self {
            model,
            map,
            cache,
            rows: Rows { tokens, cos, sin },
            fault: None,
        })
    }

    /// LCKV's iterative parallel prefill: passes until the upward targets' keys change by at
    /// most the tolerance; an error if they never do within `max_passes` (or turn NaN).
    fn iterate(
        &self,
        store: &mut KvStore,
        exec: &mut StepExecutor,
        step: &mut Step,
        prefill: PrefillMode,
    ) -> Result<Tensor> {
        self.zero_upward_targets(store, step)?;
        let (max_passes, tolerance) = match prefill {
            PrefillMode::Iterative {
                max_passes,
                tolerance,
            } => (max_passes.max(1), tolerance),
            PrefillMode::TokenByToken => (1, 0.0),
        };
        let mut prev: Option<Vec<Tensor>> = None;
        let mut change = f32::INFINITY;
        for _ in 0..max_passes {
            // Only the final pass's attention mass counts.
            step.clear_mass();
            let mut keys = Vec::new();
            let x = self.run(store, exec, step, Some(&mut keys))?;
            change = match &prev {
                Some(p) => max_abs_diff(p, &keys)?,
                None if keys.is_empty() => 0.0,
                None => f32::INFINITY,
            };
            if change.is_nan() {
                return Err(ModelError::Config(
                    "iterative prefill: the upward targets' keys are NaN".into(),
                ));
            }
            if change <= tolerance {
                return Ok(x);
            }
            prev = Some(keys);
        }
        Err(ModelError::Config(format!(
            "iterative prefill did not converge in {max_passes} passes (last change {change:e} > \
             tolerance {tolerance:e}); raise max_passes or use PrefillMode::TokenByToken"
        )))
    }

    /// Writes zeros into this step's slots of groups that layers below their owner read, so
    /// the first iterative pass sees zero KV (as LCKV initialises it).
    fn zero_upward_targets(&self, store: &mut KvStore, step: &Step) -> Result<()> {
        let cfg = self.model.config();
        let lanes = self.cache.lanes();
        for g in 0..self.map.num_groups() {
            if self.map.readers(g).iter().any(|&l| self.map.is_upward(l)) {
                for h in 0..lanes {
                    let slots = step.group_slots(self.cache.lane(g, h));
                    let z = Tensor::zeros(
                        (slots.len(), cfg.num_key_value_heads / lanes, cfg.head_dim()),
                        DType::F32,
                        self.model.device(),
                    )?;
                    store.write(slots, &z, &z)?;
                }
            }
        }
        Ok(())
    }

    /// Runs every layer over the step's rows; returns the last layer's output. When
    /// `target_keys` is given, the rotated keys of upward-target groups are pushed to it.
    fn run(
        &self,
        store: &mut KvStore,
        exec: &mut StepExecutor,
        step: &mut Step,
        mut target_keys: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (model, map) = (self.model, self.map);
        let Rows { tokens, cos, sin } = &self.rows;
        let mut x = model.embed(tokens)?;
        for layer in 0..map.num_layers() {
            let g = map.group_of(layer);
            let (normed, q) = model.attn_input(layer, &x)?;
            let q = Rope::apply(&q, cos, sin)?;
            if map.owns_kv(layer) {
                let (k, v) = model.kv(layer, &normed)?;
                let k_rotated = Rope::apply(&k, cos, sin)?;
                exec.write(step, store, self.cache, g, &k, &k_rotated, &v)?;
                if let Some(keys) = target_keys.as_deref_mut() {
                    if map.readers(g).iter().any(|&l| map.is_upward(l)) {
                        keys.push(k_rotated);
                    }
                }
            }
            fail_at(self.fault, FailStage::Layer(layer))?;
            let params = AttentionParams {
                scale: 1.0 / (model.config().head_dim() as f32).sqrt(),
                window: self.cache.layer_window(layer),
                include_diagonal: !map.is_upward(layer),
            };
            let out = exec.attend(&q, store, self.cache, step, g, &params)?;
            x = model.attn_output_and_mlp(layer, &x, &out)?;
        }
        Ok(x)
    }
}

/// The largest absolute difference, NaN if any element of either side is NaN (candle's `max`
/// skips NaN after the first element, so it is not used here).
fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> Result<f32> {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x.to_dtype(DType::F32)? - y.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for v in d {
            if v.is_nan() {
                return Ok(f32::NAN);
            }
            worst = worst.max(v);
        }
    }
    Ok(worst)
}
