//! [`LayerKvModel`]: a mistral.rs-loaded model whose KV cache is layerkv's, with the
//! generation, chat, perplexity and memory calls a mistral.rs user reaches for. It is a thin
//! face on a [`layerkv_model::Session`] (the pool sizing, room checks and stop tokens the CLI
//! and the server use too).
//!
//! Every call runs on a fresh sequence that it frees at the end (mistral.rs's behaviour with
//! its prefix cache off): a chat call renders and prefills the whole conversation. What the
//! sequence held at its end is kept in [`LayerKvModel::last_memory`].

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use layerkv::SeqId;
use layerkv_model::chat::Message;
use layerkv_model::engine::{Engine, LogitsRows};
use layerkv_model::eval::{perplexity, Perplexity};
use layerkv_model::generate::{Completion, Sampler, StopCriteria};
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::{Model, Session};
use mistralrs_quant::IsqType;

use crate::error::{AdapterError, Result};

pub use layerkv_model::KvMemory;

/// The one sequence id the calls use.
const SEQ: SeqId = 0;

/// A model loaded by mistral.rs's loader and run by layerkv's engine under a policy; built by
/// [`crate::LayerKvModelBuilder`].
#[derive(Debug)]
pub struct LayerKvModel {
    pub(crate) session: Session,
    pub(crate) isq: Option<IsqType>,
    pub(crate) last_memory: Option<KvMemory>,
}

impl LayerKvModel {
    /// The model directory.
    pub fn dir(&self) -> &Path {
        self.session.dir()
    }

    /// The model (mistral.rs's projections inside layerkv's forward pass).
    pub fn model(&self) -> &Arc<Model> {
        self.session.model()
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        self.session.policy_name()
    }

    /// The ISQ type the projections were quantized to, if any.
    pub fn isq(&self) -> Option<IsqType> {
        self.isq
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.session.tokenizer()
    }

    /// The engine, to step batches of sequences with the step protocol.
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.session.engine_mut()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        self.session.engine()
    }

    /// The session under the model (room checks, stop tokens, memory accounting).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// When replies end.
    pub fn stop_criteria(&self) -> &StopCriteria {
        self.session.stop_criteria()
    }

    /// The KV memory of the last call's sequence when it ended.
    pub fn last_memory(&self) -> Option<KvMemory> {
        self.last_memory
    }

    /// Logits `[ids.len(), vocab]` (f32) of every prompt position, as mistral.rs's raw-logits
    /// request returns them; `ids` are used as given (no BOS is added).
    pub fn prompt_logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.session.check_room(None, ids.len(), 0)?;
        self.run(|s| s.engine_mut().step(&[(SEQ, ids)], LogitsRows::All))
    }

    /// Continues `prompt` (plain text; the tokenizer adds BOS if the model wants it), handing
    /// each piece of text to `on_text` as it is generated.
    pub fn generate(&mut self, prompt: &str, on_text: impl FnMut(&str)) -> Result<Completion> {
        let ids = self.session.tokenizer().encode(prompt)?;
        self.generate_ids(&ids, on_text)
    }

    /// Continues the token ids `prompt` (used as given).
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        on_text: impl FnMut(&str),
    ) -> Result<Completion> {
        let mut sampler = Sampler::new(self.session.sampling());
        self.run(|s| s.complete(SEQ, prompt, &mut sampler, on_text))
    }

    /// Answers the conversation `messages` through the model's own chat template, stopping at
    /// its end of turn; the reply's text streams to `on_text`.
    pub fn chat(&mut self, messages: &[Message], on_text: impl FnMut(&str)) -> Result<Completion> {
        let ids = self.session.chat_prompt(messages)?;
        self.generate_ids(&ids, on_text)
    }

    /// Perplexity of `text` in windows of `context` tokens every `stride` tokens, under the
    /// policy (retention runs every 16 tokens).
    pub fn perplexity(&mut self, text: &str, context: usize, stride: usize) -> Result<Perplexity> {
        let tokens = self.session.tokenizer().encode(text)?;
        if tokens.len() < 2 {
            return Err(AdapterError::Request(format!(
                "perplexity needs at least 2 tokens, the text has {}",
                tokens.len()
            )));
        }
        self.session
            .check_room(None, context.min(tokens.len()), 0)?;
        Ok(perplexity(
            self.session.engine_mut(),
            &tokens,
            context,
            stride,
            16,
            0,
        )?)
    }

    /// Runs `f` on a fresh sequence, records its memory and frees it whatever `f` returned.
    fn run<T>(&mut self, f: impl FnOnce(&mut Session) -> layerkv_model::Result<T>) -> Result<T> {
        let (out, memory) = self.session.with_sequence(SEQ, f)?;
        self.last_memory = Some(memory);
        Ok(out)
    }

    /// KV bytes of `tokens` tokens under the identity policy, in whole pages.
    pub fn identity_bytes(&self, tokens: usize) -> usize {
        self.session.identity_bytes(tokens)
    }
}
