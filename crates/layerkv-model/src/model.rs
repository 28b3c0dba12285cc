//! The llama-family decoder weights (llama, mistral, qwen2) and the per-layer pieces of the
//! forward pass that do not touch the KV cache: norms, projections, MLP, logits.
//!
//! The model is policy-independent: one loaded [`Model`] serves engines with different policies
//! (the demo compares them on the same weights). What the policy changes, which layers compute
//! K/V and which cache they read, lives in [`crate::engine`]. K/V projections are counted
//! ([`Model::kv_projections`]) so tests can prove that sharing layers skip them.
//!
//! Linear layers are [`Projection`]s: [`Model::load`] builds candle's dense ones, and an engine
//! adapter hands in its own (quantized) ones through [`Model::from_parts`], and
//! [`crate::quantized::load_gguf`] builds a GGUF's in their own types through
//! [`Model::from_quantized_parts`] (its token embedding stays quantized too), so there is one
//! forward pass whatever loaded the weights.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::Linear;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Projection;
use crate::quantized::QuantizedEmbedding;
use crate::rope::Rope;
use crate::weights::Weights;

/// One decoder layer's weights: RMS norm weights `[hidden]` and the seven projections.
#[derive(Debug)]
pub struct Layer {
    /// `input_layernorm.weight`.
    pub input_norm: Tensor,
    /// `hidden -> heads * head_dim` (qwen2: with bias).
    pub q_proj: Box<dyn Projection>,
    /// `hidden -> kv_heads * head_dim` (qwen2: with bias).
    pub k_proj: Box<dyn Projection>,
    /// `hidden -> kv_heads * head_dim` (qwen2: with bias).
    pub v_proj: Box<dyn Projection>,
    /// `heads * head_dim -> hidden`.
    pub o_proj: Box<dyn Projection>,
    /// `post_attention_layernorm.weight`.
    pub post_norm: Tensor,
    /// `hidden -> intermediate`.
    pub gate_proj: Box<dyn Projection>,
    /// `hidden -> intermediate`.
    pub up_proj: Box<dyn Projection>,
    /// `intermediate -> hidden`.
    pub down_proj: Box<dyn Projection>,
}

/// Everything [`Model::from_parts`] needs besides the config.
#[derive(Debug)]
pub struct ModelParts {
    /// Token embeddings `[vocab, hidden]`, in the activation dtype.
    pub embed: Tensor,
    /// The decoder layers, bottom first.
    pub layers: Vec<Layer>,
    /// Final norm weight `[hidden]`.
    pub norm: Tensor,
    /// `hidden -> vocab` (tied models: the embedding matrix).
    pub lm_head: Box<dyn Projection>,
}

/// The token embedding table: dense rows, or quantized rows dequantized on lookup.
#[derive(Debug)]
enum Embedding {
    Dense(Tensor),
    Quantized(QuantizedEmbedding),
}

/// A llama-family decoder on one device.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Box<dyn Projection>,
    rope: Rope,
    dtype: DType,
    device: Device,
    kv_projections: AtomicU64,
}

impl Model {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let mut weights = Weights::load(dir, dtype, device)?;
        Self::from_weights(cfg, &mut weights)
    }

    /// Builds the model from loaded weights, checking every tensor's shape against the config.
    pub fn from_weights(cfg: ModelConfig, w: &mut Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let d = cfg.head_dim();
        let q_out = cfg.num_attention_heads * d;
        let kv_out = cfg.num_key_value_heads * d;
        let bias = cfg.attention_bias();
        let linear = |w: &mut Weights,
                      name: String,
                      out_dim: usize,
                      in_dim: usize,
                      bias: bool|
         -> Result<Box<dyn Projection>> {
            let weight = w.take(&format!("{name}.weight"), &[out_dim, in_dim])?;
            let bias = if bias {
                Some(w.take(&format!("{name}.bias"), &[out_dim])?)
            } else {
                None
            };
            Ok(Box::new(Linear::new(weight, bias)))
        };
        let embed = w.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: linear(w, format!("{p}.self_attn.q_proj"), q_out, h, bias)?,
                k_proj: linear(w, format!("{p}.self_attn.k_proj"), kv_out, h, bias)?,
                v_proj: linear(w, format!("{p}.self_attn.v_proj"), kv_out, h, bias)?,
                o_proj: linear(w, format!("{p}.self_attn.o_proj"), h, q_out, false)?,
                post_norm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: linear(
                    w,
                    format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                )?,
                up_proj: linear(
                    w,
                    format!("{p}.mlp.up_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                )?,
                down_proj: linear(
                    w,
                    format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = w.take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.take("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let parts = ModelParts {
            embed,
            layers,
            norm,
            lm_head: Box::new(Linear::new(lm_head, None)),
        };
        Self::from_parts(cfg, parts)
    }

    /// Builds the model from weights loaded elsewhere (an engine adapter's own loader and
    /// quantized linears). Checks the layer count and the embedding and norm shapes against the
    /// config; the projections are trusted to map the config's sizes.
    pub fn from_parts(cfg: ModelConfig, parts: ModelParts) -> Result<Self> {
        let check_embed = (cfg.vocab_size, cfg.hidden_size);
        if parts.embed.dims() != [check_embed.0, check_embed.1] {
            return Err(ModelError::ShapeMismatch {
                name: "model.embed_tokens.weight".into(),
                expected: vec![check_embed.0, check_embed.1],
                actual: parts.embed.dims().to_vec(),
            });
        }
        let dtype = parts.embed.dtype();
        let device = parts.embed.device().clone();
        Self::assemble(
            cfg,
            Embedding::Dense(parts.embed),
            parts.layers,
            parts.norm,
            parts.lm_head,
            dtype,
            device,
        )
    }

    /// Builds a model whose token embedding stays quantized (rows are dequantized on lookup,
    /// as llama.cpp's `get_rows` does); activations are f32 on `device`. Checks what
    /// [`Model::from_parts`] checks.
    pub fn from_quantized_parts(
        cfg: ModelConfig,
        embed: QuantizedEmbedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Box<dyn Projection>,
        device: &Device,
    ) -> Result<Self> {
        let expected = [cfg.vocab_size, cfg.hidden_size];
        if embed.dims() != expected {
            return Err(ModelError::ShapeMismatch {
                name: "model.embed_tokens.weight".into(),
                expected: expected.to_vec(),
                actual: embed.dims().to_vec(),
            });
        }
        Self::assemble(
            cfg,
            Embedding::Quantized(embed),
            layers,
            norm,
            lm_head,
            DType::F32,
            device.clone(),
        )
    }

    fn assemble(
        cfg: ModelConfig,
        embed: Embedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Box<dyn Projection>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let check = |name: &str, t: &Tensor, expected: &[usize]| -> Result<()> {
            if t.dims() == expected {
                Ok(())
            } else {
                Err(ModelError::ShapeMismatch {
                    name: name.into(),
                    expected: expected.to_vec(),
                    actual: t.dims().to_vec(),
                })
            }
        };
        if layers.len() != cfg.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "{} decoder layers given, the config says num_hidden_layers = {}",
                layers.len(),
                cfg.num_hidden_layers
            )));
        }
        check("model.norm.weight", &norm, &[h])?;
        for (i, l) in layers.iter().enumerate() {
            check(
                &format!("model.layers.{i}.input_layernorm.weight"),
                &l.input_norm,
                &[h],
            )?;
            check(
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                &l.post_norm,
                &[h],
            )?;
        }
        Ok(Self {
            rope: Rope::new(&cfg),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device,
            kv_projections: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Weight dtype (activations use it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Whether the weights run in quantized types ([`Model::from_quantized_parts`]: a GGUF in
    /// its own types, or a model quantized at load).
    pub fn is_quantized(&self) -> bool {
        matches!(self.embed, Embedding::Quantized(_))
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// How many (layer x step) K/V projections have run since load: sharing layers add none.
    pub fn kv_projections(&self) -> u64 {
        self.kv_projections.load(Ordering::Relaxed)
    }

    /// Token embeddings `[rows, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        match &self.embed {
            Embedding::Dense(table) => {
                let ids = Tensor::new(tokens, &self.device)?;
                Ok(table.index_select(&ids, 0)?)
            }
            Embedding::Quantized(table) => table.lookup(tokens, &self.device),
        }
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            x,
            weight,
            self.cfg.rms_norm_eps as f32,
        )?)
    }

    /// Normalises the layer input and projects the queries: `(normed x, q [rows, heads, d])`.
    pub fn attn_input(&self, layer: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[layer];
        let normed = self.rms_norm(x, &l.input_norm)?;
        let q = l.q_proj.forward(&normed)?;
        let rows = q.dim(0)?;
        let q = q.reshape((rows, self.cfg.num_attention_heads, self.cfg.head_dim()))?;
        Ok((normed, q))
    }

    /// K and V projections `[rows, kv_heads, d]` of a layer that owns its KV (counted).
    pub fn kv(&self, layer: usize, normed: &Tensor) -> Result<(Tensor, Tensor)> {
        self.kv_projections.fetch_add(1, Ordering::Relaxed);
        let l = &self.layers[layer];
        let rows = normed.dim(0)?;
        let shape = (rows, self.cfg.num_key_value_heads, self.cfg.head_dim());
        let k = l.k_proj.forward(normed)?.reshape(shape)?;
        let v = l.v_proj.forward(normed)?.reshape(shape)?;
        Ok((k, v))
    }

    /// Output projection, residual, post-attention norm, SwiGLU MLP, residual.
    pub fn attn_output_and_mlp(&self, layer: usize, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let rows = attn.dim(0)?;
        let attn = attn.reshape((rows, self.cfg.num_attention_heads * self.cfg.head_dim()))?;
        let x = (x + l.o_proj.forward(&attn)?)?;
        let h = self.rms_norm(&x, &l.post_norm)?;
        let mlp = layerkv_kernels::swiglu(&l.gate_proj.forward(&h)?, &l.up_proj.forward(&h)?)?;
        Ok((x + l.down_proj.forward(&mlp)?)?)
    }

    /// The final norm of the last layer's output: the hidden states the LM head reads
    /// (Hugging Face's `hidden_states[-1]`), `[rows, hidden]`.
    pub fn final_hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.rms_norm(x, &self.norm)
    }

    /// Final norm and LM head: f32 logits `[rows, vocab]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head_logits(&self.final_hidden(x)?)
    }

    /// The LM head alone, on final hidden states (the output of [`Model::final_hidden`] or
    /// [`crate::engine::Engine::step_hidden`]): f32 logits `[rows, vocab]`.
    pub fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Log-softmax of f32 logits along the vocabulary.
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
    }
}
