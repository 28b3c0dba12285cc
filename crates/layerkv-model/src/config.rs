//! [`ModelConfig`]: the parts of a Hugging Face `config.json` the runner needs, for
//! `model_type` llama, mistral and qwen2, normalised (KV heads, head_dim, biases, window).

use std::path::Path;

use layerkv_kernels::KvTypes;
use serde_json::Value;

use crate::error::{io, ModelError, Result};

/// Rotary scaling variants the runner implements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was trained with before scaling.
        original_max_position_embeddings: usize,
    },
}

/// Model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (GQA/MQA).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden / heads` unless set).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Embedding rows.
    pub vocab_size: usize,
    /// LM head shares the embedding.
    pub tie_word_embeddings: bool,
    /// Sliding window applied to every layer (mistral; qwen2 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// Q/K/V projections have biases (qwen2; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// BOS token id.
    pub bos_token_id: Option<u32>,
    /// EOS token ids.
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            ModelError::Config(format!("`{key}` is missing or not a non-negative integer"))
        })
}

fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(ModelError::MissingFile(path));
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Self::parse(&text).map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses config.json text.
    pub fn parse(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: "config.json".into(),
            what: e.to_string(),
        })?;
        // `model_type`, else the first of `architectures` (`LlamaForCausalLM` -> llama).
        let model_type = match v.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => {
                let arch = v
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match arch {
                    "LlamaForCausalLM" => "llama".into(),
                    "MistralForCausalLM" => "mistral".into(),
                    "Qwen2ForCausalLM" => "qwen2".into(),
                    other => other.to_string(),
                }
            }
        };
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ModelError::UnknownArchitecture(model_type));
        }
        let hidden_size = get_usize(&v, "hidden_size")?;
        let num_attention_heads = get_usize(&v, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(ModelError::Config(
                "num_attention_heads must be positive".into(),
            ));
        }
        let num_key_value_heads =
            opt_usize(&v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::Config(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = opt_usize(&v, "head_dim").unwrap_or(hidden_size / num_attention_heads);
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str| {
                    rs.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| ModelError::Config(format!("rope_scaling.{k} is missing")))
                };
                match kind {
                    "default" => None,
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: get_usize(
                            rs,
                            "original_max_position_embeddings",
                        )?,
                    }),
                    other => {
                        return Err(ModelError::Config(format!(
                            "rope_scaling type {other:?} is not supported (llama3)"
                        )))
                    }
                }
            }
        };
        let sliding_window = match model_type.as_str() {
            "mistral" => opt_usize(&v, "sliding_window"),
            "qwen2" if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                opt_usize(&v, "sliding_window")
            }
            _ => None,
        };
        let qkv_bias =
            model_type == "qwen2" || v.get("attention_bias").and_then(Value::as_bool) == Some(true);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size")?,
            num_hidden_layers: get_usize(&v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: opt_usize(&v, "max_position_embeddings").unwrap_or(4096),
            vocab_size: get_usize(&v, "vocab_size")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            sliding_window,
            qkv_bias,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
            model_type,
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Whether Q/K/V projections carry biases.
    pub fn attention_bias(&self) -> bool {
        self.qkv_bias
    }

    /// EOS ids (may be empty).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    /// KV bytes one token takes in one layer that owns KV, in pages of `kv` (block scales
    /// included).
    pub fn kv_bytes_per_token_per_layer(&self, kv: KvTypes) -> usize {
        self.num_key_value_heads * kv.token_head_bytes(self.head_dim)
    }

    /// KV bytes the identity policy holds for `tokens` tokens: every layer, whole pages of
    /// `block_size` slots (the baseline a policy's memory is reported against).
    pub fn identity_kv_bytes(&self, tokens: usize, block_size: usize, kv: KvTypes) -> usize {
        tokens.div_ceil(block_size)
            * block_size
            * self.num_hidden_layers
            * self.kv_bytes_per_token_per_layer(kv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "vocab_size": 100, "max_position_embeddings": 1024, "eos_token_id": [1, 2],
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;

    #[test]
    fn parses_llama3_mistral_qwen2() {
        let c = ModelConfig::parse(LLAMA3).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        let m = ModelConfig::parse(
            &LLAMA3
                .replace("\"llama\"", "\"mistral\"")
                .replace("\"rope_scaling\"", "\"sliding_window\": 256, \"x\""),
        )
        .unwrap();
        assert_eq!(m.sliding_window, Some(256));
        let q = ModelConfig::parse(&LLAMA3.replace("\"llama\"", "\"qwen2\"")).unwrap();
        assert!(q.attention_bias() && q.sliding_window.is_none());
    }

    #[test]
    fn rejects_unknown_architectures_and_bad_heads() {
        assert!(matches!(
            ModelConfig::parse(&LLAMA3.replace("\"llama\"", "\"gpt2\"")).unwrap_err(),
            ModelError::UnknownArchitecture(a) if a == "gpt2"
        ));
        let e = ModelConfig::parse(
            &LLAMA3.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = ModelConfig::parse(&LLAMA3.replace("\"vocab_size\": 100,", "")).unwrap_err();
        assert!(e.to_string().contains("vocab_size"), "{e}");
        assert!(matches!(
            ModelConfig::load(Path::new("/nonexistent")).unwrap_err(),
            ModelError::MissingFile(_)
        ));
    }
}
