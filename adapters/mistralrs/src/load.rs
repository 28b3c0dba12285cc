//! Loading a Hugging Face model directory through mistral.rs's own pieces: its sharded
//! safetensors var builder and its `QuantMethod` linears, with in-situ quantization (ISQ) run by
//! mistral.rs's immediate-ISQ path on the same tensors, with the same predicates, as
//! `mistralrs::TextModelBuilder::with_isq`. The result is a [`layerkv_model::Model`], so the
//! forward pass, the cache and the kernels are layerkv's: one forward pass for every loader.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use layerkv_model::{Layer, Model, ModelConfig, ModelParts, Projection};
use mistralrs_quant::{IsqType, QuantMethod, ShardedSafeTensors, ShardedVarBuilder};
use regex::Regex;

use crate::error::{AdapterError, Result};

/// A mistral.rs linear (dense or ISQ-quantized) as a layerkv [`Projection`].
#[derive(Debug)]
pub struct QuantLinear(pub Arc<dyn QuantMethod>);

impl Projection for QuantLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Quantized methods take their own activation dtype and give back the caller's, as
        // mistral.rs's llama/qwen2/mistral attention and MLP do around every matmul.
        self.0.forward_autocast(x)
    }
}

/// The weights mistral.rs quantizes under ISQ for llama, mistral and qwen2: the LM head and the
/// seven projections of every layer (its loaders' `isq_layer_regexes`, restated because they
/// are private). Embeddings and norms stay dense; a tied LM head is quantized too (see
/// [`load_model`]).
pub fn isq_predicates() -> Vec<Regex> {
    [
        r"lm_head\.(weight|bias)$",
        r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$",
        r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$",
        r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$",
        r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$",
        r"layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)$",
        r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)$",
        r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)$",
    ]
    .iter()
    .map(|r| Regex::new(r).expect("static regex"))
    .collect()
}

/// Clears mistral.rs's thread-local immediate-ISQ setting when loading ends, errors included.
struct IsqScope;

impl IsqScope {
    fn enter(isq: Option<IsqType>) -> Self {
        if isq.is_some() {
            mistralrs_quant::set_immediate_isq(isq, isq_predicates());
        }
        Self
    }
}

impl Drop for IsqScope {
    fn drop(&mut self) {
        mistralrs_quant::clear_immediate_isq();
    }
}

/// Loads `dir` (config already parsed into `cfg`) with mistral.rs's var builder and linears,
/// quantizing the projections to `isq` if given, activations in `dtype` on `device`.
pub fn load_model(
    dir: &Path,
    cfg: ModelConfig,
    dtype: DType,
    device: &Device,
    isq: Option<IsqType>,
) -> Result<Model> {
    let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    if config_text.contains("\"quantization_config\"") {
        return Err(AdapterError::Unsupported {
            path: dir.to_path_buf(),
            what: "pre-quantized checkpoints (config.json has quantization_config) are not \
                   supported; load the unquantized checkpoint and quantize it in situ \
                   (with_isq)"
                .into(),
        });
    }
    let files = layerkv_model::weights::safetensors_files(dir)?;
    let load_err = |e: candle_core::Error| AdapterError::Load {
        path: dir.to_path_buf(),
        what: layerkv_model::ModelError::from(e).to_string(),
    };
    let _isq = IsqScope::enter(isq);
    // SAFETY: the files are memory-mapped read-only for the duration of loading; like every
    // safetensors mmap loader (candle's, mistral.rs's) this assumes nobody truncates them
    // meanwhile.
    let vb =
        unsafe { ShardedSafeTensors::sharded(&files, dtype, device, None, Arc::new(|_| true)) }
            .map_err(load_err)?;
    let h = cfg.hidden_size;
    let d = cfg.head_dim();
    let q_out = cfg.num_attention_heads * d;
    let kv_out = cfg.num_key_value_heads * d;
    let bias = cfg.attention_bias();
    let linear =
        |vb: ShardedVarBuilder, i: usize, o: usize, b: bool| -> Result<Box<dyn Projection>> {
            let layer = mistralrs_quant::linear_b(i, o, b, &None, vb).map_err(load_err)?;
            Ok(Box::new(QuantLinear(layer)))
        };
    let vb_m = vb.pp("model");
    let embed = vb_m
        .pp("embed_tokens")
        .get((cfg.vocab_size, h), "weight")
        .map_err(load_err)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let l = vb_m.pp(format!("layers.{i}"));
        let attn = l.pp("self_attn");
        let mlp = l.pp("mlp");
        let ffn = cfg.intermediate_size;
        layers.push(Layer {
            input_norm: l.pp("input_layernorm").get(h, "weight").map_err(load_err)?,
            q_proj: linear(attn.pp("q_proj"), h, q_out, bias)?,
            k_proj: linear(attn.pp("k_proj"), h, kv_out, bias)?,
            v_proj: linear(attn.pp("v_proj"), h, kv_out, bias)?,
            o_proj: linear(attn.pp("o_proj"), q_out, h, false)?,
            post_norm: l
                .pp("post_attention_layernorm")
                .get(h, "weight")
                .map_err(load_err)?,
            gate_proj: linear(mlp.pp("gate_proj"), h, ffn, false)?,
            up_proj: linear(mlp.pp("up_proj"), h, ffn, false)?,
            down_proj: linear(mlp.pp("down_proj"), ffn, h, false)?,
        });
    }
    let norm = vb_m.pp("norm").get(h, "weight").map_err(load_err)?;
    // A tied head is built from the embedding by mistral.rs's `ReplicatedLayer::from_linear`,
    // which quantizes it under ISQ whatever the predicates say (as its llama/qwen2 loaders do).
    let lm_head: Box<dyn Projection> =
        if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            let head = candle_nn::Linear::new(embed.clone(), None);
            Box::new(QuantLinear(
                mistralrs_quant::ReplicatedLayer::from_linear(head).map_err(load_err)?,
            ))
        } else {
            linear(vb.pp("lm_head"), h, cfg.vocab_size, false)?
        };
    let parts = ModelParts {
        embed,
        layers,
        norm,
        lm_head,
    };
    Ok(Model::from_parts(cfg, parts)?)
}
