//! [`LayerKvModel`]: a mistral.rs-loaded model whose KV cache is layerkv's, with the
//! generation, chat, perplexity and memory calls a mistral.rs user reaches for.
//!
//! Every call runs on a fresh sequence that it frees at the end (mistral.rs's behaviour with
//! its prefix cache off): a chat call renders and prefills the whole conversation. What the
//! sequence held at its end is kept in [`LayerKvModel::last_memory`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use layerkv::plan::Planner;
use layerkv::SeqId;
use layerkv_model::chat::{ChatTemplate, Message};
use layerkv_model::engine::{Engine, LogitsRows};
use layerkv_model::eval::{perplexity, Perplexity};
use layerkv_model::generate::{complete, Completion, Sampler, Sampling, StopCriteria};
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::Model;
use mistralrs_quant::IsqType;

use crate::error::{AdapterError, Result};

/// The one sequence id the calls use.
const SEQ: SeqId = 0;

/// KV memory of a sequence under the policy beside what the identity policy would hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMemory {
    /// Tokens the sequence had seen.
    pub tokens: usize,
    /// KV bytes its pages held under the policy.
    pub held_bytes: usize,
    /// KV bytes the identity policy holds for as many tokens (every layer, every token, whole
    /// pages).
    pub identity_bytes: usize,
}

impl KvMemory {
    /// `held / identity` (1.0 when nothing was held).
    pub fn ratio(&self) -> f64 {
        if self.identity_bytes == 0 {
            1.0
        } else {
            self.held_bytes as f64 / self.identity_bytes as f64
        }
    }
}

/// A model loaded by mistral.rs's loader and run by layerkv's engine under a policy; built by
/// [`crate::LayerKvModelBuilder`].
#[derive(Debug)]
pub struct LayerKvModel {
    pub(crate) dir: PathBuf,
    pub(crate) engine: Engine,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) sampling: Sampling,
    pub(crate) stop: StopCriteria,
    pub(crate) planner: Planner,
    pub(crate) isq: Option<IsqType>,
    pub(crate) policy_name: String,
    pub(crate) last_memory: Option<KvMemory>,
}

impl LayerKvModel {
    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded model (weights as mistral.rs loaded and quantized them).
    pub fn model(&self) -> &Arc<Model> {
        self.engine.model()
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        &self.policy_name
    }

    /// The ISQ type the projections were quantized to, if any.
    pub fn isq(&self) -> Option<IsqType> {
        self.isq
    }

    /// The tokenizer of the model directory.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The engine (policy, cache, kernels), for batched stepping with the step protocol.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// When replies end.
    pub fn stop_criteria(&self) -> &StopCriteria {
        &self.stop
    }

    /// The KV memory of the last call's sequence when it ended.
    pub fn last_memory(&self) -> Option<KvMemory> {
        self.last_memory
    }

    /// Logits `[ids.len(), vocab]` (f32) of every prompt position, as mistral.rs's raw-logits
    /// request returns them; `ids` are used as given (no BOS is added).
    pub fn prompt_logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.check_request(ids.len(), 0)?;
        self.run(|engine| Ok(engine.step(&[(SEQ, ids)], LogitsRows::All)?))
    }

    /// Continues `prompt` (plain text; the tokenizer adds BOS if the model wants it), handing
    /// each piece of text to `on_text` as it is generated.
    pub fn generate(&mut self, prompt: &str, on_text: impl FnMut(&str)) -> Result<Completion> {
        let ids = self.tokenizer.encode(prompt)?;
        self.generate_ids(&ids, on_text)
    }

    /// Continues the token ids `prompt` (used as given).
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion> {
        self.check_request(prompt.len(), self.stop.max_new_tokens)?;
        let mut sampler = Sampler::new(self.sampling);
        let (tokenizer, stop) = (self.tokenizer.clone(), self.stop.clone());
        self.run(|engine| {
            Ok(complete(
                engine,
                SEQ,
                prompt,
                &mut sampler,
                &stop,
                &tokenizer,
                &mut on_text,
            )?)
        })
    }

    /// Answers the conversation `messages` through the model's own chat template, stopping at
    /// its end of turn; the reply's text streams to `on_text`.
    pub fn chat(&mut self, messages: &[Message], on_text: impl FnMut(&str)) -> Result<Completion> {
        let template = ChatTemplate::load(&self.dir)?;
        let text = template.render(messages, true)?;
        // The template writes BOS and the role markers itself.
        let ids = self.tokenizer.clone().with_bos_prefix(None).encode(&text)?;
        let saved = self.stop.stop_tokens.clone();
        if let Some(id) = template
            .end_of_turn()
            .and_then(|m| self.tokenizer.token_id(&m))
        {
            self.stop.stop_tokens.push(id);
        }
        let reply = self.generate_ids(&ids, on_text);
        self.stop.stop_tokens = saved;
        reply
    }

    /// Perplexity of `text` in windows of `context` tokens every `stride` tokens, under the
    /// policy (retention runs every 16 tokens).
    pub fn perplexity(&mut self, text: &str, context: usize, stride: usize) -> Result<Perplexity> {
        let tokens = self.tokenizer.encode(text)?;
        if tokens.len() < 2 {
            return Err(AdapterError::Request(format!(
                "perplexity needs at least 2 tokens, the text has {}",
                tokens.len()
            )));
        }
        self.check_request(context.min(tokens.len()), 0)?;
        Ok(perplexity(
            &mut self.engine,
            &tokens,
            context,
            stride,
            16,
            0,
        )?)
    }

    /// Errors unless a sequence of `prompt + reply` tokens fits the pool under the policy.
    fn check_request(&self, prompt: usize, reply: usize) -> Result<()> {
        if prompt == 0 {
            return Err(AdapterError::Request("the prompt is empty".into()));
        }
        let need = self
            .planner
            .pages_per_sequence(self.engine.policy().as_ref(), prompt + reply);
        let have = self.engine.config().num_pages;
        if need > have {
            return Err(AdapterError::Request(format!(
                "{prompt} prompt tokens + {reply} reply tokens need {need} KV pages under policy \
                 {:?}, the pool has {have}: raise with_max_context or use a policy that evicts",
                self.policy_name
            )));
        }
        Ok(())
    }

    /// Runs `f` on a fresh sequence, records its memory and frees it whatever `f` returned.
    fn run<T>(&mut self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        self.engine.add_sequence(SEQ)?;
        let out = f(&mut self.engine);
        if let (Ok(mem), Ok(tokens)) = (
            self.engine.cache().memory(SEQ),
            self.engine.cache().num_tokens(SEQ),
        ) {
            self.last_memory = Some(KvMemory {
                tokens,
                held_bytes: mem.total_bytes,
                identity_bytes: self.identity_bytes(tokens),
            });
        }
        self.engine.free(SEQ)?;
        out
    }

    /// KV bytes of `tokens` tokens under the identity policy, in whole pages.
    pub fn identity_bytes(&self, tokens: usize) -> usize {
        self.engine.model().config().identity_kv_bytes(
            tokens,
            self.planner.block_size,
            self.engine.config().kv_dtype.size_in_bytes(),
        )
    }
}
