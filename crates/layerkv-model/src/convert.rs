//! GGUF -> Hugging Face model directory (`config.json`, `tokenizer.json`, `model.safetensors`),
//! so a quantised llama GGUF (the embedded default) becomes a standard directory that layerkv
//! and mistral.rs both load.
//!
//! Every tensor is dequantised to f32 (candle's GGUF reader), renamed from llama.cpp names to
//! Hugging Face names, and the Q/K projections are un-permuted: llama.cpp's converter reorders
//! each head's rows from HF's rotate-half pairing (i, i + d/2) to interleaved pairs (2i, 2i+1).
//! Cost: one pass over the weights; memory: the f32 model once.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{io, ModelError, Result};
use crate::tokenizer::{tokenizer_json_from_gguf, GgufVocab};

fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| ModelError::Corrupt {
        path: path.into(),
        what: format!("GGUF metadata `{key}` is missing"),
    })
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| ModelError::Corrupt {
            path: path.into(),
            what: format!("`{key}`: {e}"),
        })
}

fn meta_f32(c: &Content, key: &str, path: &Path) -> Result<f32> {
    meta(c, key, path)?
        .to_f32()
        .map_err(|e| ModelError::Corrupt {
            path: path.into(),
            what: format!("`{key}`: {e}"),
        })
}

fn meta_strings(c: &Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let v = meta(c, key, path)?
        .to_vec()
        .map_err(|e| ModelError::Corrupt {
            path: path.into(),
            what: format!("`{key}`: {e}"),
        })?;
    v.iter()
        .map(|x| {
            x.to_string().cloned().map_err(|e| ModelError::Corrupt {
                path: path.into(),
                what: format!("`{key}`: {e}"),
            })
        })
        .collect()
}

/// The Hugging Face name of a llama.cpp tensor name (`None` for tensors the runner ignores).
pub fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's Q/K row permutation: rows `[heads * d, in]` in interleaved-pair order
/// back to rotate-half order.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's permutation (the inverse of [`unpermute_qk`]); used to build test GGUFs.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Converts a llama GGUF file into a model directory at `out` (created; files overwritten).
pub fn gguf_to_model_dir(gguf: &Path, out: &Path) -> Result<()> {
    let mut reader = BufReader::new(File::open(gguf).map_err(io(gguf))?);
    let content = Content::read(&mut reader).map_err(|e| ModelError::Corrupt {
        path: gguf.into(),
        what: format!("not a readable GGUF file: {e}"),
    })?;
    let arch = meta(&content, "general.architecture", gguf)?
        .to_string()
        .map_err(|e| ModelError::Corrupt {
            path: gguf.into(),
            what: e.to_string(),
        })?
        .clone();
    if arch != "llama" {
        return Err(ModelError::UnknownArchitecture(arch));
    }
    let layers = meta_usize(&content, "llama.block_count", gguf)?;
    let hidden = meta_usize(&content, "llama.embedding_length", gguf)?;
    let heads = meta_usize(&content, "llama.attention.head_count", gguf)?;
    let kv_heads = meta_usize(&content, "llama.attention.head_count_kv", gguf).unwrap_or(heads);
    let vocab = GgufVocab {
        tokens: meta_strings(&content, "tokenizer.ggml.tokens", gguf)?,
        merges: meta_strings(&content, "tokenizer.ggml.merges", gguf).unwrap_or_default(),
        token_types: match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map(|xs| xs.iter().filter_map(|x| x.to_i32().ok()).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        },
        pre: content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default(),
    };
    let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(hf) = hf_name(&name) else { continue };
        let q = content
            .tensor(&mut reader, &name, &Device::Cpu)
            .map_err(|e| ModelError::Corrupt {
                path: gguf.into(),
                what: format!("tensor {name}: {e}"),
            })?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if name.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, kv_heads)?;
        }
        tensors.insert(hf, t);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let ffn = tensors
        .get("model.layers.0.mlp.up_proj.weight")
        .map(|t| t.dims()[0])
        .ok_or_else(|| ModelError::Corrupt {
            path: gguf.into(),
            what: "no blk.0.ffn_up.weight".into(),
        })?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden / heads,
        "rms_norm_eps": meta_f32(&content, "llama.attention.layer_norm_rms_epsilon", gguf)?,
        "rope_theta": meta_f32(&content, "llama.rope.freq_base", gguf).unwrap_or(10_000.0),
        "max_position_embeddings": meta_usize(&content, "llama.context_length", gguf).unwrap_or(4096),
        "vocab_size": vocab.tokens.len(),
        "tie_word_embeddings": tied,
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    });
    std::fs::create_dir_all(out).map_err(io(out))?;
    let cfg_path = out.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(io(&cfg_path))?;
    let tok_path = out.join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json_from_gguf(&vocab)?).map_err(io(&tok_path))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        // Head 0 rows 0..4 = pairs (0, 2), (1, 3) interleaved: 0, 2, 1, 3.
        let col0: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col0, vec![0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
