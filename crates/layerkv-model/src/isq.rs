//! In-situ quantization (`--weights q8_0|q4_k|...`): a Hugging Face safetensors directory
//! loaded with its projections, LM head and token embedding quantized at load into GGUF block
//! types, then run by the same [`QuantizedLinear`] / [`QuantizedEmbedding`] code as a GGUF
//! file ([`crate::quantized`]), as mistral.rs's ISQ and llama.cpp's `llama-quantize` do.
//!
//! Which tensor gets which type follows llama.cpp's `llama_tensor_get_type` for the simple
//! mixes, so a model quantized here is comparable with the same model's GGUF:
//! - projections take the requested type; a K-quant (256-element super-blocks) falls back where
//!   a row is not a whole number of super-blocks (SmolLM2's 576 columns): Q4_K to Q5_0, Q5_K to
//!   Q5_1, Q6_K to Q8_0, as llama.cpp does;
//! - the LM head (and, for a tied model, the token embedding it shares) takes Q6_K, or Q8_0
//!   where rows are not whole super-blocks, unless Q8_0 was requested: the head's rounding
//!   reaches every logit, so llama.cpp keeps it at 6 to 8 bits;
//! - an untied model's token embedding takes the requested type (only looked-up rows are ever
//!   dequantized); norms and biases stay f32.
//!
//! The f32 weights are read once and each tensor is dropped as soon as it is quantized, so the
//! resident memory afterwards is the quantized size.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{candle_message, ModelError, Result};
use crate::linear::Projection;
use crate::model::{Layer, Model};
use crate::quantized::{QuantizedEmbedding, QuantizedLinear, QuantizedOptions};
use crate::weights::Weights;

/// The `--weights` names of the types [`load_isq`] quantizes to, with their GGUF types.
pub const ISQ_TYPES: [(&str, GgmlDType); 8] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// The GGUF type of an ISQ name (`q8_0`, `q4_k`, ...; case-insensitive), `None` if unknown.
pub fn isq_type(name: &str) -> Option<GgmlDType> {
    let name = name.to_ascii_lowercase();
    ISQ_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, ty)| ty)
}

/// The type a projection of `cols` input columns gets when `requested` was asked for: the
/// requested one, or llama.cpp's fallback where `cols` is not a whole number of its blocks.
pub fn projection_type(requested: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(requested.block_size()) {
        return requested;
    }
    let fallback = match requested {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        // Not even 32-element blocks: keep the row unquantized (llama.cpp keeps F16/F32).
        GgmlDType::F32
    }
}

/// The type of the LM head (and a tied embedding) of `cols` columns under `requested`.
pub fn head_type(requested: GgmlDType, cols: usize) -> GgmlDType {
    let wanted = if requested == GgmlDType::Q8_0 {
        GgmlDType::Q8_0
    } else {
        GgmlDType::Q6K
    };
    projection_type(wanted, cols)
}

/// What [`load_isq`] did: how many tensors went to each type, and their bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IsqReport {
    /// `(type, tensors, bytes)` for each type used, in first-use order.
    pub types: Vec<(GgmlDType, usize, usize)>,
    /// Bytes of the f32 weights the quantized tensors replaced.
    pub f32_bytes: usize,
}

impl IsqReport {
    fn add(&mut self, ty: GgmlDType, elems: usize) {
        let bytes = elems / ty.block_size() * ty.type_size();
        self.f32_bytes += elems * 4;
        match self.types.iter_mut().find(|(t, _, _)| *t == ty) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += bytes;
            }
            None => self.types.push((ty, 1, bytes)),
        }
    }

    /// Total bytes of the quantized tensors.
    pub fn bytes(&self) -> usize {
        self.types.iter().map(|&(_, _, b)| b).sum()
    }

    /// One line: `q4_k: 150 tensors 60.1 MiB, q8_0: ...`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .types
            .iter()
            .map(|&(ty, n, b)| format!("{ty:?}: {n} tensors {:.1} MiB", b as f64 / 1048576.0))
            .collect();
        format!(
            "{} ({:.1} MiB, {:.2}x smaller than f32)",
            parts.join(", "),
            self.bytes() as f64 / 1048576.0,
            self.f32_bytes as f64 / self.bytes().max(1) as f64
        )
    }
}

/// A model quantized at load, and what went where.
#[derive(Debug)]
pub struct IsqModel {
    /// The model (f32 activations).
    pub model: Model,
    /// Types and bytes.
    pub report: IsqReport,
}

/// Quantizes `t` (f32, `[rows, cols]`, on the CPU) to `ty`, with its storage on `device`.
fn quantize(name: &str, t: &Tensor, ty: GgmlDType, device: &Device) -> Result<Arc<QTensor>> {
    let fail = |e: candle_core::Error| {
        ModelError::Config(format!(
            "quantizing {name} to {ty:?}: {}",
            candle_message(&e)
        ))
    };
    let q = QTensor::quantize(&t.contiguous()?, ty).map_err(fail)?;
    if device.is_cpu() {
        return Ok(Arc::new(q));
    }
    let bytes = q.data().map_err(fail)?;
    let storage = QStorage::from_data(Cow::Borrowed(&bytes), device, ty).map_err(fail)?;
    Ok(Arc::new(QTensor::new(storage, t.dims()).map_err(fail)?))
}

/// Loads the safetensors model in `dir` with its weights quantized to `requested` (see the
/// module docs for which tensor gets which type), projections on `device`, the embedding table
/// on the CPU. Errors name the tensor.
pub fn load_isq(dir: &Path, requested: GgmlDType, device: &Device) -> Result<IsqModel> {
    load_isq_with(dir, requested, device, &QuantizedOptions::default())
}

/// [`load_isq`] with the quantized layers' options.
pub fn load_isq_with(
    dir: &Path,
    requested: GgmlDType,
    device: &Device,
    opts: &QuantizedOptions,
) -> Result<IsqModel> {
    if !ISQ_TYPES.iter().any(|&(_, ty)| ty == requested) {
        return Err(ModelError::Config(format!(
            "in-situ quantization to {requested:?} is not supported (types: {})",
            ISQ_TYPES.map(|(n, _)| n).join(", ")
        )));
    }
    let cfg = ModelConfig::load(dir)?;
    let mut weights = Weights::load(dir, DType::F32, &Device::Cpu)?;
    let mut report = IsqReport::default();
    let (w, r) = (&mut weights, &mut report);
    let (h, d) = (cfg.hidden_size, cfg.head_dim());
    let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let ffn = cfg.intermediate_size;
    let bias = cfg.attention_bias();

    let linear = |w: &mut Weights,
                  report: &mut IsqReport,
                  name: String,
                  (out_dim, in_dim): (usize, usize),
                  bias: bool,
                  ty: GgmlDType|
     -> Result<Box<dyn Projection>> {
        let weight = w.take(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(
                w.take(&format!("{name}.bias"), &[out_dim])?
                    .to_device(device)?,
            )
        } else {
            None
        };
        if ty == GgmlDType::F32 {
            return Ok(Box::new(candle_nn::Linear::new(
                weight.to_device(device)?,
                bias,
            )));
        }
        report.add(ty, out_dim * in_dim);
        let q = quantize(&name, &weight, ty, device)?;
        Ok(Box::new(
            QuantizedLinear::new(q, bias)?.with_dense_from_rows(opts.dense_from_rows),
        ))
    };
    let proj = |cols: usize| projection_type(requested, cols);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let sa = format!("{p}.self_attn");
        let mlp = format!("{p}.mlp");
        layers.push(Layer {
            input_norm: w
                .take(&format!("{p}.input_layernorm.weight"), &[h])?
                .to_device(device)?,
            q_proj: linear(w, r, format!("{sa}.q_proj"), (q_out, h), bias, proj(h))?,
            k_proj: linear(w, r, format!("{sa}.k_proj"), (kv_out, h), bias, proj(h))?,
            v_proj: linear(w, r, format!("{sa}.v_proj"), (kv_out, h), bias, proj(h))?,
            o_proj: linear(w, r, format!("{sa}.o_proj"), (h, q_out), false, proj(q_out))?,
            post_norm: w
                .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?
                .to_device(device)?,
            gate_proj: linear(w, r, format!("{mlp}.gate_proj"), (ffn, h), false, proj(h))?,
            up_proj: linear(w, r, format!("{mlp}.up_proj"), (ffn, h), false, proj(h))?,
            down_proj: linear(w, r, format!("{mlp}.down_proj"), (h, ffn), false, proj(ffn))?,
        });
    }
    let norm = w.take("model.norm.weight", &[h])?.to_device(device)?;
    let embed_name = "model.embed_tokens.weight";
    let embed = w.take(embed_name, &[cfg.vocab_size, h])?;
    let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
    let embed_ty = if tied {
        head_type(requested, h)
    } else {
        proj(h)
    };
    if embed_ty == GgmlDType::F32 {
        return Err(ModelError::Config(format!(
            "in-situ quantization needs a hidden size that is a multiple of 32 (got {h})"
        )));
    }
    r.add(embed_ty, cfg.vocab_size * h);
    let embed_q = quantize(embed_name, &embed, embed_ty, &Device::Cpu)?;
    let lm_head: Box<dyn Projection> = if tied {
        let head = if device.is_cpu() {
            embed_q.clone()
        } else {
            quantize(embed_name, &embed, embed_ty, device)?
        };
        Box::new(QuantizedLinear::new(head, None)?.with_dense_from_rows(opts.dense_from_rows))
    } else {
        drop(embed);
        linear(
            w,
            r,
            "lm_head".into(),
            (cfg.vocab_size, h),
            false,
            head_type(requested, h),
        )?
    };
    let embed = QuantizedEmbedding::new(embed_q)?;
    let model = Model::from_quantized_parts(cfg, embed, layers, norm, lm_head, device)?;
    Ok(IsqModel { model, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_and_fall_back_as_llama_cpp() {
        assert_eq!(isq_type("Q4_K"), Some(GgmlDType::Q4K));
        assert_eq!(isq_type("q8_0"), Some(GgmlDType::Q8_0));
        assert_eq!(isq_type("q3_k"), None);
        assert_eq!(projection_type(GgmlDType::Q4K, 512), GgmlDType::Q4K);
        assert_eq!(projection_type(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(projection_type(GgmlDType::Q5K, 576), GgmlDType::Q5_1);
        assert_eq!(projection_type(GgmlDType::Q6K, 576), GgmlDType::Q8_0);
        assert_eq!(projection_type(GgmlDType::Q4_0, 576), GgmlDType::Q4_0);
        assert_eq!(projection_type(GgmlDType::Q4_0, 48), GgmlDType::F32);
        assert_eq!(head_type(GgmlDType::Q4_0, 512), GgmlDType::Q6K);
        assert_eq!(head_type(GgmlDType::Q4_0, 576), GgmlDType::Q8_0);
        assert_eq!(head_type(GgmlDType::Q8_0, 512), GgmlDType::Q8_0);
    }
}
