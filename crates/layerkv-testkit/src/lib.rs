//! Test support: [`TinyModel`] writes a tiny seeded random-weight Hugging Face model directory
//! (`config.json`, `model.safetensors` through candle's safetensors writer, a real byte-level BPE
//! `tokenizer.json`, `tokenizer_config.json`, optionally a chat template) that the loaders users
//! hit (layerkv's, mistral.rs's) read like any downloaded model; and the small comparisons the
//! tests share ([`max_abs_diff`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// The architectures the runner supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM` (a `sliding_window` field).
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v biases.
    Qwen2,
}

/// Special tokens of the byte-level vocabulary, at ids 256, 257, 258.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML template (SmolLM2's shape) for tiny chat models.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape and contents of a tiny model directory.
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// Architecture (config fields and biases).
    pub arch: Arch,
    /// Vocabulary: 259 is the byte-level vocabulary with [`SPECIAL_TOKENS`]; fewer gives
    /// tokens `t0..tN` without merges or specials.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ffn: usize,
    /// Whether the LM head is the embedding (no `lm_head.weight`).
    pub tied: bool,
    /// Weight seed.
    pub seed: u64,
    /// `chat_template` of `tokenizer_config.json`.
    pub chat_template: Option<String>,
}

impl TinyModel {
    /// A 4-layer llama with the byte-level vocabulary, GQA (4 query, 2 KV heads), an untied
    /// head and the ChatML template; sizes are multiples of 32 so 8-bit block quantization
    /// applies to every projection.
    pub fn llama(seed: u64) -> Self {
        Self {
            arch: Arch::Llama,
            vocab: 259,
            hidden: 64,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            tied: false,
            seed,
            chat_template: Some(CHATML.into()),
        }
    }

    /// [`TinyModel::llama`] as qwen2: q/k/v biases and a tied head.
    pub fn qwen2(seed: u64) -> Self {
        Self {
            arch: Arch::Qwen2,
            tied: true,
            ..Self::llama(seed)
        }
    }

    /// Writes the directory `dir` (created if missing) and returns it.
    pub fn write(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), self.tokenizer().to_string()).unwrap();
        let mut tc = serde_json::json!({"add_bos_token": false});
        if self.vocab >= 259 {
            tc["bos_token"] = SPECIAL_TOKENS[1].into();
            tc["eos_token"] = SPECIAL_TOKENS[0].into();
        }
        if let Some(t) = &self.chat_template {
            tc["chat_template"] = t.as_str().into();
        }
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        candle_core::safetensors::save(&self.weights(), dir.join("model.safetensors")).unwrap();
        dir.to_path_buf()
    }

    /// `config.json`.
    pub fn config(&self) -> serde_json::Value {
        let (architecture, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let (bos, eos) = if self.vocab >= 259 {
            (257, 256)
        } else {
            (1, 2)
        };
        let mut c = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32"
        });
        match self.arch {
            Arch::Llama => {}
            Arch::Mistral => c["sliding_window"] = serde_json::Value::Null,
            Arch::Qwen2 => {
                c["sliding_window"] = 512.into();
                c["max_window_layers"] = self.layers.into();
                c["use_sliding_window"] = false.into();
            }
        }
        c
    }

    /// `tokenizer.json`: a real byte-level BPE tokenizer (no merges).
    pub fn tokenizer(&self) -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        if self.vocab >= 259 {
            for (i, c) in byte_chars().into_iter().enumerate() {
                vocab.insert(c, i.into());
            }
            for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
                vocab.insert(t.to_string(), (256 + i).into());
                added.push(
                    serde_json::json!({"id": 256 + i, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
                );
            }
        } else {
            for i in 0..self.vocab {
                vocab.insert(format!("t{i}"), i.into());
            }
        }
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        })
    }

    /// Seeded random weights, scaled so activations stay O(1) through the layers.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let mut state = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rand = |shape: &[usize], scale: f32, offset: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale + offset
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let (h, f) = (self.hidden, self.ffn);
        let d = h / self.heads;
        let s = 1.0 / (h as f32).sqrt();
        let mut t = HashMap::new();
        t.insert(
            "model.embed_tokens.weight".to_string(),
            rand(&[self.vocab, h], 1.0, 0.0),
        );
        if !self.tied {
            t.insert("lm_head.weight".into(), rand(&[self.vocab, h], 0.3, 0.0));
        }
        t.insert("model.norm.weight".into(), rand(&[h], 0.1, 1.0));
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let mut put = |name: &str, shape: &[usize], scale: f32, offset: f32| {
                t.insert(format!("{p}.{name}"), rand(shape, scale, offset));
            };
            put(
                "self_attn.q_proj.weight",
                &[self.heads * d, h],
                2.0 * s,
                0.0,
            );
            put(
                "self_attn.k_proj.weight",
                &[self.kv_heads * d, h],
                2.0 * s,
                0.0,
            );
            put("self_attn.v_proj.weight", &[self.kv_heads * d, h], s, 0.0);
            put("self_attn.o_proj.weight", &[h, self.heads * d], s, 0.0);
            if self.arch == Arch::Qwen2 {
                put("self_attn.q_proj.bias", &[self.heads * d], 0.5, 0.0);
                put("self_attn.k_proj.bias", &[self.kv_heads * d], 0.5, 0.0);
                put("self_attn.v_proj.bias", &[self.kv_heads * d], 0.5, 0.0);
            }
            put("mlp.gate_proj.weight", &[f, h], s, 0.0);
            put("mlp.up_proj.weight", &[f, h], s, 0.0);
            put(
                "mlp.down_proj.weight",
                &[h, f],
                1.0 / (f as f32).sqrt(),
                0.0,
            );
            put("input_layernorm.weight", &[h], 0.1, 1.0);
            put("post_attention_layernorm.weight", &[h], 0.1, 1.0);
        }
        t
    }
}

/// GPT-2's byte-to-character table: the vocabulary string of each byte token.
pub fn byte_chars() -> Vec<String> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xa1..=0xac);
    printable.extend(0xae..=0xff);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// The largest absolute difference between two tensors of the same shape, compared in f32,
/// such that `max_abs_diff(a, b) <= tol` fails on any NaN: NaN when either tensor holds a NaN,
/// infinity when an infinity is not matched by the same infinity at the same index (equal
/// infinities differ by 0). A tensor reduction would not do: candle's CPU `max` skips a NaN
/// after index 0.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "max_abs_diff of different shapes");
    let values = |t: &Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
    };
    max_abs_diff_f32(&values(a), &values(b))
}

/// [`max_abs_diff`] of two slices of the same length.
pub fn max_abs_diff_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff of different lengths");
    let mut worst = 0f32;
    for (&x, &y) in a.iter().zip(b) {
        // `x == y` first: equal infinities match (their difference would be NaN).
        let d = if x == y { 0.0 } else { (x - y).abs() };
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}

/// A directory path under the system temp dir that no other call in this process returns
/// (`name` and a counter): tests run in parallel, and two writing the same model's files while
/// a third loads them read half-written ones. Not created.
pub fn unique_scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("layerkv-test-{}-{name}-{n}", std::process::id()))
}

/// A fresh empty directory under the system temp dir, unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("layerkv-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// Shown to fail: with the previous body (`(a - b).abs().flatten_all().max(0)`), the NaN
    /// after index 0 came back as 0.0 and `d <= 1e-4` held.
    #[test]
    fn nan_and_unmatched_infinities_fail_a_tolerance() {
        let base = [1.0, 2.0, 3.0, 4.0];
        for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            for at in [0, 2, 3] {
                let mut v = base;
                v[at] = bad;
                for d in [
                    max_abs_diff(&t(&v), &t(&base)),
                    max_abs_diff(&t(&base), &t(&v)),
                ] {
                    let within_tolerance = d <= 1e-4;
                    assert!(!within_tolerance, "value {i} at {at}: {d}");
                    assert!(d.is_nan() || d == f32::INFINITY, "value {i} at {at}: {d}");
                }
            }
        }
        // NaN on both sides at the same index is still a NaN, not a match.
        let v = [1.0, f32::NAN];
        assert!(max_abs_diff(&t(&v), &t(&v)).is_nan());
        // Opposite infinities differ; equal ones match.
        let (p, n) = ([0.0, f32::INFINITY], [0.0, f32::NEG_INFINITY]);
        assert_eq!(max_abs_diff(&t(&p), &t(&n)), f32::INFINITY);
        assert_eq!(max_abs_diff(&t(&p), &t(&p)), 0.0);
    }

    #[test]
    fn finite_differences_are_the_largest_absolute_one() {
        let a = Tensor::new(&[[1.0f32, -2.0], [3.0, 4.5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1.5f32, -2.0], [1.0, 4.0]], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 2.0);
        // Other dtypes compare in f32.
        let a16 = a.to_dtype(candle_core::DType::BF16).unwrap();
        let b16 = b.to_dtype(candle_core::DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&a16, &b16), 2.0);
    }
}
