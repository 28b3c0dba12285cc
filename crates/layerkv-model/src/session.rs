//! [`Session`]: a model under a policy, ready to serve requests. The one place that sizes the
//! KV pool from the planner, checks that a request fits (the model's context, the pool under
//! the policy), knows the stop tokens (EOS, the chat template's end of turn) and runs
//! completions. The CLI's `generate` and `chat`, the mistral.rs adapter and the server are its
//! clients; none of them repeats this bookkeeping.
//!
//! The model comes from the caller ([`Session::load`] reads a model directory; the adapter
//! hands in a model whose projections mistral.rs loaded), the policy too (parse one with
//! [`layerkv::Policy::from_spec`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::plan::Planner;
use layerkv::{LayerKvPolicy, Policy, SeqId};
use layerkv_kernels::{KvType, KvTypes};

use crate::chat::{ChatTemplate, Message};
use crate::engine::{kv_lanes, Engine, EngineConfig};
use crate::error::{ModelError, Result};
use crate::generate::{
    complete, stop_tokens, Completion, GenerationConfig, Sampler, Sampling, StopCriteria,
};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Token slots per KV page in every session.
pub const BLOCK_SIZE: usize = 16;

/// What a KVzip probe step asks before it replays the prompt (KVzip's own wording).
pub const PROBE_REQUEST: &str = "Repeat the previous context exactly.";

/// Tokens a default-sized pool keeps for a probe step's prefix (the [`PROBE_REQUEST`] turn).
const PROBE_PREFIX_ROOM: usize = 64;

/// How a session is sized and how it samples. `Default` gives one sequence of 4096 tokens,
/// f32 KV, `generation_config.json`'s sampling and reply length.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOptions {
    /// The longest sequence (prompt and reply) the pool is sized for under the policy.
    pub max_context: usize,
    /// How many such sequences the pool holds at once.
    pub max_sequences: usize,
    /// KV page types (f32, f16, bf16, or Q8_0 / Q4_0 blocks; K and V may differ).
    pub kv_dtype: KvTypes,
    /// Window of the layers the policy's map marks sliding (YOCO's `s` layers).
    pub sliding_window: Option<usize>,
    /// Most tokens per reply (`None`: `generation_config.json`'s `max_new_tokens`, else 256).
    pub max_tokens: Option<usize>,
    /// Sampling (`None`: `generation_config.json`'s, else greedy).
    pub sampling: Option<Sampling>,
    /// Strings that end a reply (the text is cut before them).
    pub stop_strings: Vec<String>,
    /// Pages in the KV pool, when the pool is sized by a memory budget (a server's
    /// `--kv-budget`, see [`Session::page_bytes_for`]) rather than by `max_sequences`
    /// sequences of `max_context` tokens (`None`). Must hold at least one page per group.
    pub num_pages: Option<usize>,
    /// Most prompt tokens of one sequence per step under a policy that evicts (retention runs
    /// between chunks, so a window holds its window plus one chunk at its peak); `None`:
    /// [`EngineConfig`]'s default (256).
    pub prefill_chunk: Option<usize>,
    /// Reuse the KV pages of prompt prefixes across requests ([`EngineConfig::prefix_caching`];
    /// off by itself under a policy that evicts).
    pub prefix_caching: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            max_context: 4096,
            max_sequences: 1,
            kv_dtype: KvTypes::both(KvType::F32),
            sliding_window: None,
            max_tokens: None,
            sampling: None,
            stop_strings: Vec::new(),
            num_pages: None,
            prefill_chunk: None,
            prefix_caching: false,
        }
    }
}

/// KV memory of a sequence under the policy beside what the identity policy would hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMemory {
    /// Tokens the sequence has seen.
    pub tokens: usize,
    /// KV bytes its pages hold under the policy.
    pub held_bytes: usize,
    /// KV bytes the identity policy holds for as many tokens (every layer, every token, whole
    /// pages).
    pub identity_bytes: usize,
}

impl KvMemory {
    /// `held / identity` (1.0 when nothing is held).
    pub fn ratio(&self) -> f64 {
        if self.identity_bytes == 0 {
            1.0
        } else {
            self.held_bytes as f64 / self.identity_bytes as f64
        }
    }
}

/// A model, its tokenizer and an engine under a policy, with the stop criteria and sampling
/// defaults of its directory. See the module docs.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    engine: Engine,
    tokenizer: Tokenizer,
    sampling: Sampling,
    stop: StopCriteria,
    planner: Planner,
    policy_name: String,
    template: Option<ChatTemplate>,
}

impl Session {
    /// Loads the model directory `dir` (safetensors, f32/f16/bf16 on `device`) and builds a
    /// session under `policy`.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        policy: Policy,
        options: SessionOptions,
    ) -> Result<Self> {
        let model = Arc::new(Model::load(dir, dtype, device)?);
        Self::new(dir, model, policy, options)
    }

    /// A session for `model` (loaded from `dir` by any loader) under `policy`: the tokenizer,
    /// the generation defaults and the chat template come from `dir`; the pool holds
    /// `max_sequences` sequences of `max_context` tokens at the policy's peak.
    pub fn new(
        dir: &Path,
        model: Arc<Model>,
        policy: Policy,
        options: SessionOptions,
    ) -> Result<Self> {
        if options.max_context == 0 || options.max_sequences == 0 {
            return Err(ModelError::Config(
                "max_context and max_sequences must be positive".into(),
            ));
        }
        policy.layer_map().require_layers(model.num_layers())?;
        let tokenizer = crate::tokenizer::load(dir)?;
        let vocab = model.config().vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(ModelError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                config: vocab,
            });
        }
        let generation = GenerationConfig::load(dir)?;
        let stop = StopCriteria {
            max_new_tokens: options
                .max_tokens
                .or(generation.max_new_tokens)
                .unwrap_or(256),
            stop_tokens: stop_tokens(dir, model.config(), &generation, &tokenizer),
            stop_strings: options.stop_strings,
        };
        let sampling = options.sampling.unwrap_or_else(|| generation.sampling());
        let defaults = EngineConfig::default();
        let engine_config = EngineConfig {
            block_size: BLOCK_SIZE,
            kv_dtype: options.kv_dtype,
            sliding_window: options.sliding_window,
            prefill_chunk: options.prefill_chunk.unwrap_or(defaults.prefill_chunk),
            prefix_caching: options.prefix_caching,
            ..defaults
        };
        let planner = Planner {
            block_size: BLOCK_SIZE,
            sliding_window: options.sliding_window,
            model_window: model.config().sliding_window,
            step_tokens: engine_config.prefill_chunk,
            lanes: model.config().num_key_value_heads,
        };
        let num_groups = policy.layer_map().num_groups() * planner.lanes_of(&policy);
        let num_pages = match options.num_pages {
            Some(n) if n < num_groups => {
                return Err(ModelError::Config(format!(
                    "a pool of {n} KV pages cannot hold one page for each of the policy's \
                     {num_groups} KV groups"
                )))
            }
            Some(n) => n,
            // One page per group of slack: a partly filled page at each end of the live range.
            None => {
                // Room for a probe step on top (KVzip; its prefix is a chat turn, well under
                // PROBE_PREFIX_ROOM tokens).
                let probe = layerkv::probe_chunk(&policy, planner.lanes_of(&policy))
                    .map_or(0, |c| c + PROBE_PREFIX_ROOM);
                options.max_sequences
                    * (planner.pages_per_sequence(&policy, options.max_context + probe)
                        + num_groups)
            }
        };
        let policy_name = policy.name().to_string();
        let engine = Engine::new(
            model,
            Arc::new(policy),
            EngineConfig {
                num_pages,
                ..engine_config
            },
        )?;
        let mut session = Self {
            dir: dir.to_path_buf(),
            engine,
            tokenizer,
            sampling,
            stop,
            planner,
            policy_name,
            template: None,
        };
        if session.engine.probe_chunk().is_some() {
            let prefix = session.probe_prefix()?;
            session.engine.set_probe_prefix(prefix);
        }
        Ok(session)
    }

    /// KVzip's probe turn, put before the prompt tokens each probe step replays: a user turn
    /// asking for the context again ([`PROBE_REQUEST`]) and the opening of the reply, in the
    /// chat template's markup (the text between a closed exchange and the next reply); plain
    /// text for a model without a template.
    fn probe_prefix(&mut self) -> Result<Vec<u32>> {
        let exchange = vec![Message::new("user", "x"), Message::new("assistant", "y")];
        let turn = match self.chat_template() {
            Ok(t) => {
                let base = t.render(&exchange, false)?;
                let mut asked = exchange.clone();
                asked.push(Message::new("user", PROBE_REQUEST));
                let full = t.render(&asked, true)?;
                full.strip_prefix(base.as_str()).map(str::to_string)
            }
            Err(_) => None,
        };
        let text = turn.unwrap_or_else(|| format!("\n\n{PROBE_REQUEST}\n"));
        self.encode_chat(&text)
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        self.engine.model()
    }

    /// The engine (cache, store, policy), for batched stepping with the step protocol.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, mutably.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// The tokenizer (with the BOS prefix `tokenizer_config.json` asks for).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The default sampling settings.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// When replies end: reply length, stop tokens (EOS, and the end of turn once the chat
    /// template was loaded) and stop strings.
    pub fn stop_criteria(&self) -> &StopCriteria {
        &self.stop
    }

    /// The stop criteria, to change the reply length or the stop strings.
    pub fn stop_criteria_mut(&mut self) -> &mut StopCriteria {
        &mut self.stop
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        &self.policy_name
    }

    /// The capacity planner the pool was sized with.
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The model's chat template (loaded once); its end-of-turn token joins the stop tokens.
    pub fn chat_template(&mut self) -> Result<&ChatTemplate> {
        if self.template.is_none() {
            let t = ChatTemplate::load(&self.dir)?;
            if let Some(id) = t.end_of_turn().and_then(|m| self.tokenizer.token_id(&m)) {
                if !self.stop.stop_tokens.contains(&id) {
                    self.stop.stop_tokens.push(id);
                }
            }
            self.template = Some(t);
        }
        Ok(self.template.as_ref().expect("loaded above"))
    }

    /// `messages` rendered through the chat template, opening the assistant's reply.
    pub fn chat_text(&mut self, messages: &[Message]) -> Result<String> {
        self.chat_template()?.render(messages, true)
    }

    /// Token ids of `text` the chat template rendered (the template writes BOS and the role
    /// markers itself, so no BOS is added).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.clone().with_bos_prefix(None).encode(text)
    }

    /// Token ids of `messages` rendered through the chat template, ready for the assistant's
    /// reply.
    pub fn chat_prompt(&mut self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.chat_text(messages)?;
        self.encode_chat(&text)
    }

    /// Errors unless `seq` (`None`: a new sequence) can take `new_tokens` more tokens and then
    /// `reply_tokens` generated ones: the prompt is not empty, a policy that never evicts stays
    /// within the model's context, and the pool holds the sequence at the policy's peak.
    pub fn check_room(
        &self,
        seq: Option<SeqId>,
        new_tokens: usize,
        reply_tokens: usize,
    ) -> Result<()> {
        if new_tokens == 0 {
            return Err(ModelError::Request("the prompt is empty".into()));
        }
        let held = match seq {
            Some(s) => self.engine.cache().num_tokens(s)?,
            None => 0,
        };
        let policy = self.engine.policy();
        let context = self.model().config().max_position_embeddings;
        if !self.engine.evicts() && held + new_tokens > context {
            return Err(ModelError::Request(format!(
                "{} tokens exceed the model's context of {context} tokens (policy {:?} keeps \
                 every token; a policy that evicts, e.g. identity+stream:4:1020, streams past it)",
                held + new_tokens,
                self.policy_name
            )));
        }
        // A probing policy holds a probe step on top of the prompt before its last token.
        let need = held + new_tokens + reply_tokens.max(self.engine.probe_tokens());
        let pages = self.planner.pages_per_sequence(policy.as_ref(), need);
        let have = self.engine.config().num_pages;
        if pages > have {
            return Err(ModelError::Request(format!(
                "{need} tokens ({held} held + {new_tokens} new + {reply_tokens} to generate) need \
                 {pages} KV pages under policy {:?}, the pool has {have}: raise the context the \
                 pool is sized for, or use a policy that evicts",
                self.policy_name
            )));
        }
        Ok(())
    }

    /// Appends `prompt` to the live sequence `seq` and generates a reply with `sampler`, text
    /// streamed to `on_text` (see [`crate::generate::complete`]); checks the room first.
    pub fn complete(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        sampler: &mut Sampler,
        on_text: impl FnMut(&str),
    ) -> Result<Completion> {
        self.check_room(Some(seq), prompt.len(), self.stop.max_new_tokens)?;
        complete(
            &mut self.engine,
            seq,
            prompt,
            sampler,
            &self.stop,
            &self.tokenizer,
            on_text,
        )
    }

    /// Runs `f` on a fresh sequence `seq` and frees it afterwards, whatever `f` returned;
    /// returns what `f` returned and the sequence's memory when it ended.
    pub fn with_sequence<T>(
        &mut self,
        seq: SeqId,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<(T, KvMemory)> {
        self.engine.add_sequence(seq)?;
        let out = f(self);
        let memory = self.memory(seq);
        self.engine.free(seq)?;
        Ok((out?, memory?))
    }

    /// What `seq` holds under the policy beside what identity would hold.
    pub fn memory(&self, seq: SeqId) -> Result<KvMemory> {
        let cache = self.engine.cache();
        let tokens = cache.num_tokens(seq)?;
        Ok(KvMemory {
            tokens,
            held_bytes: cache.memory(seq)?.total_bytes,
            identity_bytes: self.identity_bytes(tokens),
        })
    }

    /// Bytes of one KV page of `model` under `policy` with page types `kv` (K and V of
    /// [`BLOCK_SIZE`] tokens of one layer group, or of one KV head of it for a per-head
    /// policy, block scales included): a memory budget divided by it is a pool size.
    pub fn page_bytes_for(model: &Model, policy: &dyn LayerKvPolicy, kv: KvTypes) -> usize {
        let cfg = model.config();
        let heads = cfg.num_key_value_heads / kv_lanes(cfg.num_key_value_heads, policy);
        BLOCK_SIZE * heads * kv.token_head_bytes(cfg.head_dim())
    }

    /// KV bytes of `tokens` tokens under the identity policy, in whole pages.
    pub fn identity_bytes(&self, tokens: usize) -> usize {
        self.model()
            .config()
            .identity_kv_bytes(tokens, BLOCK_SIZE, self.engine.config().kv_dtype)
    }
}
