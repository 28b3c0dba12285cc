//! GGUF conversion against the same weights written directly as a Hugging Face directory, on
//! tiny random models written with candle's real GGUF writer:
//! - llama, mistral (sliding window shorter than the text) and qwen2 (biases, tied embeddings,
//!   not permuted) in F32: converted logits == direct logits (max abs diff <= 1e-4, f32), and
//!   the converted config equals the direct one; llama/mistral GGUFs carry llama.cpp's Q/K
//!   permutation as the real converter writes it;
//! - every tensor type: converted weights == candle's dequantisation of the same quantised
//!   tensor (<= 1e-6) and within the type's error bound of the original; a Q8_0 model's logits
//!   == the direct model of its dequantised weights (<= 1e-4) and within 0.05 of the original;
//! - the converted config.json parses as candle-transformers' llama/mistral/qwen2 configs, and
//!   candle-transformers' Qwen2 on the converted qwen2 directory gives our logits (<= 1e-4);
//! - a llama-3 `rope_freqs.weight` becomes `rope_scaling` (same config, same logits);
//! - the tokenizer and tokenizer_config.json from the metadata (pre-tokenizers, BOS, template);
//! - `resolve_model` converts once and reuses the cache;
//! - unknown architecture, unknown pre-tokenizer and tokenizer model, truncated and missing files
//!   give errors that name the problem;
//! - a SentencePiece (tokenizer.ggml.model = llama) vocabulary becomes a working tokenizer;
//! - run quantized ([`load_gguf`]), every weight type gives the logits of the same file
//!   converted to f32, within what quantizing the activations to Q8 blocks costs (llama, with
//!   its Q/K permutation undone on quantized rows, and qwen2 with biases and a tied head); a
//!   wrong tensor shape is an error naming the tensor, an unsupported type one naming the file
//!   and the tensor; from `dense_from_rows` rows a prefill runs on the dequantized weights and
//!   gives the f32 conversion's logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use layerkv::Policy;
use layerkv_model::convert::{gguf_name, gguf_to_model_dir, permute_qk, read_gguf_summary};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows, PrefillMode};
use layerkv_model::quantized::{load_gguf, load_gguf_with, QuantizedOptions};
use layerkv_model::{Model, ModelConfig, ModelError};
use layerkv_testkit::max_abs_diff;

const VOCAB: usize = 64;
const PROMPT: [u32; 11] = [3, 17, 42, 5, 9, 60, 33, 8, 21, 14, 50];

/// Shape and flavour of a tiny model.
#[derive(Clone, Copy)]
struct Spec {
    arch: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    theta: f32,
    eps: f32,
    /// Q/K/V biases and no `output.weight` (qwen2).
    qwen2: bool,
    sliding_window: Option<usize>,
    pre: &'static str,
}

fn spec(arch: &'static str) -> Spec {
    let base = Spec {
        arch,
        hidden: 32,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        ffn: 64,
        theta: 100_000.0,
        eps: 1e-5,
        qwen2: false,
        sliding_window: None,
        pre: "llama-bpe",
    };
    match arch {
        "mistral" => Spec {
            sliding_window: Some(6),
            pre: "default",
            ..base
        },
        "qwen2" => Spec {
            qwen2: true,
            theta: 1_000_000.0,
            eps: 1e-6,
            pre: "qwen2",
            ..base
        },
        _ => base,
    }
}

/// This test's scratch directory: `<temp>/layerkv-gguf-test-<pid>/<test name>`.
fn scratch() -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    std::env::temp_dir()
        .join(format!("layerkv-gguf-test-{}", std::process::id()))
        .join(test)
}

/// A fresh path in this test's scratch directory.
fn tmp(name: &str) -> PathBuf {
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// Removes this test's scratch directory when the test passes (kept for a failing one).
struct Clean;

impl Drop for Clean {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let dir = scratch();
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent); // only once empty
            }
        }
    }
}

/// Seeded random weights under Hugging Face names.
fn weights(s: &Spec, seed: u64) -> HashMap<String, Tensor> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rand = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (h, d) = (s.hidden, s.hidden / s.heads);
    let sc = 1.0 / (h as f32).sqrt();
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[VOCAB, h], 1.0));
    if !s.qwen2 {
        t.insert("lm_head.weight".into(), rand(&[VOCAB, h], 0.3));
    }
    t.insert("model.norm.weight".into(), (rand(&[h], 0.1) + 1.0).unwrap());
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for (name, shape, scale) in [
            ("self_attn.q_proj.weight", [s.heads * d, h], sc * 2.0),
            ("self_attn.k_proj.weight", [s.kv_heads * d, h], sc * 2.0),
            ("self_attn.v_proj.weight", [s.kv_heads * d, h], sc),
            ("self_attn.o_proj.weight", [h, s.heads * d], sc),
            ("mlp.gate_proj.weight", [s.ffn, h], sc),
            ("mlp.up_proj.weight", [s.ffn, h], sc),
            (
                "mlp.down_proj.weight",
                [h, s.ffn],
                1.0 / (s.ffn as f32).sqrt(),
            ),
        ] {
            t.insert(format!("{p}.{name}"), rand(&shape, scale));
        }
        if s.qwen2 {
            for (name, rows) in [
                ("q", s.heads * d),
                ("k", s.kv_heads * d),
                ("v", s.kv_heads * d),
            ] {
                t.insert(
                    format!("{p}.self_attn.{name}_proj.bias"),
                    rand(&[rows], 0.5),
                );
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{norm}.weight"),
                (rand(&[h], 0.1) + 1.0).unwrap(),
            );
        }
    }
    t
}

/// Writes the direct Hugging Face directory of `w` (config.json + model.safetensors).
fn write_hf_dir(dir: &Path, s: &Spec, w: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = serde_json::json!({
        "model_type": s.arch,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": s.eps as f64,
        "rope_theta": s.theta as f64,
        "max_position_embeddings": 512,
        "vocab_size": VOCAB,
        "tie_word_embeddings": s.qwen2,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    // f32 -> f64 through the shortest decimal, as a human writes config.json.
    config["rms_norm_eps"] = serde_json::json!(s.eps.to_string().parse::<f64>().unwrap());
    if let Some(w) = s.sliding_window {
        config["sliding_window"] = serde_json::json!(w);
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();
}

/// Token strings, types and merges of a tiny byte-level BPE vocabulary of VOCAB tokens.
fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend(('a'..='z').map(|c| c.to_string()));
    tokens.push("Ġ".into());
    tokens.extend(('0'..='9').map(|c| c.to_string()));
    let pairs = [
        ("t", "h"),
        ("h", "e"),
        ("Ġ", "t"),
        ("Ġ", "a"),
        ("i", "n"),
        ("e", "r"),
        ("a", "n"),
        ("o", "n"),
        ("r", "e"),
        ("Ġt", "he"),
        ("e", "d"),
        ("o", "r"),
        ("Ġ", "s"),
        ("Ġ", "w"),
        ("i", "s"),
        ("a", "t"),
        ("e", "n"),
        ("Ġ", "o"),
        ("Ġ", "c"),
        ("1", "2"),
        ("Ġ", "b"),
        ("l", "l"),
        ("o", "u"),
        ("Ġ", "i"),
    ];
    let mut merges = Vec::new();
    for (a, b) in pairs {
        assert!(tokens.contains(&a.to_string()) && tokens.contains(&b.to_string()));
        tokens.push(format!("{a}{b}"));
        merges.push(format!("{a} {b}"));
    }
    assert_eq!(tokens.len(), VOCAB);
    let types = (0..VOCAB).map(|i| if i < 3 { 3 } else { 1 }).collect();
    (tokens, types, merges)
}

const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}";

/// GGUF metadata of `s` (keys prefixed by its architecture) and the tiny tokenizer.
fn metadata(s: &Spec) -> Vec<(String, Value)> {
    let a = s.arch;
    let (tokens, types, merges) = vocab();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(s.layers as u32)),
        (format!("{a}.context_length"), Value::U32(512)),
        (format!("{a}.embedding_length"), Value::U32(s.hidden as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(s.ffn as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(s.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(s.kv_heads as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(s.theta)),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32((s.hidden / s.heads) as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(s.eps),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(s.pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(s.arch == "llama"),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(TEMPLATE.into()),
        ),
    ];
    if let Some(w) = s.sliding_window {
        m.push((
            format!("{a}.attention.sliding_window"),
            Value::U32(w as u32),
        ));
    }
    m
}

/// Writes `w` as a GGUF with candle's writer: llama.cpp names, Q/K permuted for the llama
/// family as llama.cpp's converter does, 2-D weights in `dtype` (norms and biases F32).
fn write_gguf(path: &Path, s: &Spec, w: &HashMap<String, Tensor>, dtype: GgmlDType) {
    write_gguf_with(path, s, w, dtype, metadata(s), s.arch != "qwen2");
}

fn write_gguf_with(
    path: &Path,
    s: &Spec,
    w: &HashMap<String, Tensor>,
    dtype: GgmlDType,
    meta: Vec<(String, Value)>,
    permute: bool,
) {
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let mut qtensors = Vec::new();
    for hf in names {
        let mut t = w[hf].clone();
        if permute && (hf.contains("q_proj") || hf.contains("k_proj")) {
            let heads = if hf.contains("q_proj") {
                s.heads
            } else {
                s.kv_heads
            };
            t = permute_qk(&t, heads).unwrap();
        }
        let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        // Names without a Hugging Face twin (rope_freqs.weight) are written as they are.
        let name = gguf_name(hf).unwrap_or_else(|| hf.clone());
        qtensors.push((name, QTensor::quantize(&t, ty).unwrap()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Logits of the prompt (every row) and of four greedy decode steps under the identity policy.
/// The one place that drives the engine (its step API is being reworked).
fn run_logits(dir: &Path) -> Tensor {
    run_model_logits(Arc::new(
        Model::load(dir, DType::F32, &Device::Cpu).unwrap(),
    ))
}

/// [`run_logits`] of a loaded model.
fn run_model_logits(model: Arc<Model>) -> Tensor {
    let cfg = EngineConfig {
        block_size: 4,
        num_pages: 256,
        kv_dtype: layerkv_model::KvType::F32.into(),
        sliding_window: None,
        prefill: PrefillMode::TokenByToken,
        prefill_chunk: 256,
        prefix_caching: false,
    };
    let layers = model.num_layers();
    let mut e = Engine::new(model, Arc::new(Policy::identity(layers).unwrap()), cfg).unwrap();
    e.add_sequence(0).unwrap();
    let mut rows = vec![e.step(&[(0, &PROMPT)], LogitsRows::All).unwrap()];
    for _ in 0..4 {
        let last = rows.last().unwrap();
        let next: u32 = last
            .narrow(0, last.dim(0).unwrap() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        rows.push(e.step(&[(0, &[next])], LogitsRows::Last).unwrap());
    }
    Tensor::cat(&rows, 0).unwrap()
}

/// Writes the model of `arch` both ways, converts the GGUF and returns (direct, converted).
fn both_ways(arch: &'static str, seed: u64, dtype: GgmlDType) -> (PathBuf, PathBuf) {
    let s = spec(arch);
    let w = weights(&s, seed);
    let direct = tmp(&format!("{arch}-{seed}-direct"));
    write_hf_dir(&direct, &s, &w);
    let gguf = tmp(&format!("{arch}-{seed}.gguf"));
    write_gguf(&gguf, &s, &w, dtype);
    let converted = tmp(&format!("{arch}-{seed}-converted"));
    let summary = gguf_to_model_dir(&gguf, &converted).unwrap();
    assert_eq!(summary.architecture.name(), arch);
    assert_eq!(summary.num_layers, s.layers);
    assert_eq!(summary.num_kv_heads, s.kv_heads);
    assert_eq!(summary.tied_embeddings, s.qwen2);
    assert_eq!(summary.qkv_bias, s.qwen2);
    (direct, converted)
}

fn check_f32_round_trip(arch: &'static str, seed: u64) {
    let (direct, converted) = both_ways(arch, seed, GgmlDType::F32);
    let want = ModelConfig::load(&direct).unwrap();
    let got = ModelConfig::load(&converted).unwrap();
    assert_eq!(got, want, "{arch}: converted config differs");
    let d = max_abs_diff(&run_logits(&converted), &run_logits(&direct));
    assert!(d <= 1e-4, "{arch}: converted logits differ by {d}");
    // The written config.json is what other loaders expect (candle-transformers' structs,
    // which mistral.rs's mirror).
    let text = std::fs::read_to_string(converted.join("config.json")).unwrap();
    use candle_transformers::models as ct;
    match arch {
        "llama" => drop(serde_json::from_str::<ct::llama::LlamaConfig>(&text).unwrap()),
        "mistral" => drop(serde_json::from_str::<ct::mistral::Config>(&text).unwrap()),
        _ => drop(serde_json::from_str::<ct::qwen2::Config>(&text).unwrap()),
    }
}

#[test]
fn converted_qwen2_runs_in_candle_transformers() {
    let _clean = Clean;
    // An independent reference on the converted directory itself: candle-transformers' Qwen2
    // (last-row prefill logits) == our engine's.
    use candle_transformers::models::qwen2;
    let (_, converted) = both_ways("qwen2", 27, GgmlDType::F32);
    let cfg: qwen2::Config =
        serde_json::from_str(&std::fs::read_to_string(converted.join("config.json")).unwrap())
            .unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[converted.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut theirs = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    let ids = Tensor::new(&PROMPT[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b = theirs
        .forward(&ids, 0)
        .unwrap()
        .reshape((1, VOCAB))
        .unwrap();
    let a = run_logits(&converted)
        .narrow(0, PROMPT.len() - 1, 1)
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-4, "candle-transformers' qwen2 differs by {d}");
}

#[test]
fn llama_f32_round_trip_matches_the_direct_model() {
    let _clean = Clean;
    check_f32_round_trip("llama", 11);
}

#[test]
fn mistral_f32_round_trip_matches_the_direct_model() {
    let _clean = Clean;
    check_f32_round_trip("mistral", 12);
    let (_, converted) = both_ways("mistral", 13, GgmlDType::F32);
    assert_eq!(
        ModelConfig::load(&converted).unwrap().sliding_window,
        Some(6)
    );
}

#[test]
fn qwen2_f32_round_trip_matches_the_direct_model() {
    let _clean = Clean;
    check_f32_round_trip("qwen2", 14);
}

#[test]
fn llama_gguf_without_the_permutation_converts_to_another_model() {
    let _clean = Clean;
    // The round trips above exercise the un-permutation: skipping llama.cpp's permutation when
    // writing a llama GGUF gives a different model (and qwen2, not permuted, matches above).
    let s = spec("llama");
    let w = weights(&s, 15);
    let direct = tmp("llama-15-direct");
    write_hf_dir(&direct, &s, &w);
    let gguf = tmp("llama-15-unpermuted.gguf");
    write_gguf_with(&gguf, &s, &w, GgmlDType::F32, metadata(&s), false);
    let converted = tmp("llama-15-unpermuted");
    gguf_to_model_dir(&gguf, &converted).unwrap();
    let d = max_abs_diff(&run_logits(&converted), &run_logits(&direct));
    assert!(
        d > 1e-2,
        "un-permuting an unpermuted GGUF changed nothing ({d})"
    );
}

#[test]
fn llama3_rope_freqs_become_rope_scaling() {
    let _clean = Clean;
    // head_dim 8 at theta 500000: frequencies in all three llama-3 regions (kept, smoothed,
    // divided by the factor).
    let s = Spec {
        theta: 500_000.0,
        ..spec("llama")
    };
    let mut w = weights(&s, 26);
    let direct = tmp("llama3-direct");
    write_hf_dir(&direct, &s, &w);
    let cfg_path = direct.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let factors: Vec<f32> = layerkv_model::convert::llama3_rope_factors(
        500_000.0,
        s.hidden / s.heads,
        (8.0, 1.0, 4.0, 8192),
    )
    .into_iter()
    .map(|x| x as f32)
    .collect();
    assert!(factors[0] == 1.0 && factors[2] > 1.0 && factors[2] < 8.0 && factors[3] == 8.0);
    w.insert(
        "rope_freqs.weight".into(),
        Tensor::new(factors, &Device::Cpu).unwrap(),
    );
    let gguf = tmp("llama3.gguf");
    write_gguf(&gguf, &s, &w, GgmlDType::F32);
    let converted = tmp("llama3-converted");
    let summary = gguf_to_model_dir(&gguf, &converted).unwrap();
    assert_eq!(summary.llama3_rope_scaling, Some((8.0, 1.0, 4.0, 8192)));
    assert!(
        summary.ignored_tensors.is_empty(),
        "{:?}",
        summary.ignored_tensors
    );
    assert_eq!(
        ModelConfig::load(&converted).unwrap(),
        ModelConfig::load(&direct).unwrap()
    );
    let d = max_abs_diff(&run_logits(&converted), &run_logits(&direct));
    assert!(d <= 1e-4, "llama-3 scaled logits differ by {d}");
}

/// Error bound of one quantised type relative to the tensor's largest magnitude: about twice
/// half a quantisation step (block scales are themselves quantised in the K types).
fn relative_bound(t: GgmlDType) -> f32 {
    match t {
        GgmlDType::F16 => 1e-3,
        GgmlDType::BF16 => 8e-3,
        GgmlDType::Q8_0 | GgmlDType::Q8K => 1.0 / 64.0,
        GgmlDType::Q6K => 1.0 / 16.0,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 1.0 / 8.0,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 1.0 / 4.0,
        _ => 0.6, // Q2K, Q3K
    }
}

/// Every tensor type candle writes and the loaders read.
const ALL_TYPES: [GgmlDType; 13] = [
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// A llama spec of `layers` layers with 256-wide rows, so the K-quants' 256-element blocks fit.
fn wide_spec(layers: usize) -> Spec {
    Spec {
        hidden: 256,
        layers,
        ffn: 256,
        ..spec("llama")
    }
}

#[test]
fn every_tensor_type_dequantises_like_candle() {
    let _clean = Clean;
    let s = wide_spec(1);
    let w = weights(&s, 16);
    for ty in ALL_TYPES {
        let gguf = tmp(&format!("types-{ty:?}.gguf"));
        write_gguf(&gguf, &s, &w, ty);
        let summary = read_gguf_summary(&gguf).unwrap();
        assert_eq!(summary.tensor_types[&format!("{ty:?}")], 7 + 2);
        let out = tmp(&format!("types-{ty:?}"));
        gguf_to_model_dir(&gguf, &out).unwrap();
        let got =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, orig) in &w {
            let g = &got[name];
            assert_eq!(g.dtype(), DType::F32);
            if orig.rank() != 2 {
                assert_eq!(max_abs_diff(g, orig), 0.0, "{ty:?} {name}");
                continue;
            }
            // Quantising rows commutes with the row permutation, so the converted weight is
            // exactly candle's dequantisation of the quantised original.
            let exact = QTensor::quantize(orig, ty)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            assert!(max_abs_diff(g, &exact) <= 1e-6, "{ty:?} {name}");
            let amax = orig
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // A tolerance scaled by an infinite (or NaN-skipping) maximum would accept anything.
            assert!(amax.is_finite(), "{ty:?} {name}: max |weight| {amax}");
            let err = max_abs_diff(g, orig);
            assert!(
                err <= relative_bound(ty) * amax,
                "{ty:?} {name}: error {err} > {} x {amax}",
                relative_bound(ty)
            );
        }
    }
}

#[test]
fn q8_0_model_round_trips_within_tolerance() {
    let _clean = Clean;
    let s = spec("llama");
    let w = weights(&s, 17);
    let (direct, converted) = both_ways("llama", 17, GgmlDType::Q8_0);
    let original = run_logits(&direct);
    let got = run_logits(&converted);
    // Against the original f32 weights: within the stated 0.05 (Q8_0 keeps ~2 decimal digits).
    let d = max_abs_diff(&got, &original);
    assert!(d <= 0.05, "Q8_0 logits differ from the f32 model by {d}");
    // Against the dequantised weights written directly: the conversion itself is exact.
    let deq: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, t)| {
            let t = if t.rank() == 2 {
                QTensor::quantize(t, GgmlDType::Q8_0)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect();
    let deq_dir = tmp("llama-17-dequantised");
    write_hf_dir(&deq_dir, &s, &deq);
    let d = max_abs_diff(&got, &run_logits(&deq_dir));
    assert!(
        d <= 1e-4,
        "Q8_0 logits differ from its dequantised weights by {d}"
    );
}

#[test]
fn tokenizer_and_its_config_come_from_the_metadata() {
    let _clean = Clean;
    let (_, llama) = both_ways("llama", 18, GgmlDType::F32);
    let t = layerkv_model::tokenizer::load(&llama).unwrap();
    let (tokens, _, _) = vocab();
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    // add_bos_token = true: BOS first; llama-bpe keeps "12" whole and the space apart.
    let ids = t.encode("the 12").unwrap();
    assert_eq!(ids, vec![1, id("th"), id("e"), id("Ġ"), id("12")]);
    assert_eq!(t.decode(&ids).unwrap(), "the 12");
    // Control tokens are special: matched whole, skipped when decoding.
    assert_eq!(t.encode("<|im_end|>").unwrap(), vec![1, 2]);
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(llama.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["chat_template"], TEMPLATE);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], true);

    // qwen2: no BOS, every digit alone.
    let (_, qwen) = both_ways("qwen2", 19, GgmlDType::F32);
    let q = layerkv_model::tokenizer::load(&qwen).unwrap();
    assert_eq!(q.bos_prefix(), None);
    assert_eq!(
        q.encode("the 12").unwrap(),
        vec![id("th"), id("e"), id("Ġ"), id("1"), id("2")]
    );
    // mistral here uses the GPT-2 regex: the space joins the number.
    let (_, mistral) = both_ways("mistral", 20, GgmlDType::F32);
    let m = layerkv_model::tokenizer::load(&mistral).unwrap();
    assert_eq!(
        m.encode("the 12").unwrap(),
        vec![id("th"), id("e"), id("Ġ"), id("12")]
    );
}

#[test]
fn sentencepiece_tokenizer_converts() {
    let _clean = Clean;
    // A mistral GGUF with a SentencePiece vocabulary (tokens + scores, no merges), as llama.cpp
    // writes mistral v0.x: BOS added, ▁ for spaces, byte fallback.
    let s = spec("mistral");
    let pieces = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x21>",
        "\u{2581}",
        "\u{2581}t",
        "he",
        "\u{2581}the",
        "t",
        "h",
        "e",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -5.0, -5.0];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 1];
    let mut meta: Vec<(String, Value)> = metadata(&s)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("tokenizer.ggml."))
        .collect();
    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|x| Value::String(x.to_string())).collect());
    meta.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(&pieces)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|&x| Value::F32(x)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&x| Value::I32(x)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ]);
    let gguf = tmp("spm.gguf");
    write_gguf_with(&gguf, &s, &weights(&s, 28), GgmlDType::F32, meta, true);
    let out = tmp("spm");
    let summary = gguf_to_model_dir(&gguf, &out).unwrap();
    assert_eq!(summary.tokenizer_model, "llama");
    let t = layerkv_model::tokenizer::load(&out).unwrap();
    // "the the!" -> <s> ▁the ▁the <0x21>
    let ids = t.encode("the the!").unwrap();
    assert_eq!(ids, vec![1, 7, 7, 3]);
    assert_eq!(t.decode(&ids).unwrap(), "the the!");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<s>");
    assert_eq!(tc["unk_token"], "<unk>");
}

/// Set in the child process that runs the body of
/// `resolve_model_converts_once_and_reuses_the_cache`.
const RESOLVE_CHILD: &str = "LAYERKV_GGUF_TEST_RESOLVE_CHILD";

/// `resolve_model` caches under `$LAYERKV_HOME`. Setting that variable in this process
/// (`set_var`) would race with every other test thread reading the environment (`temp_dir`
/// reads `TMPDIR`; glibc's `setenv` may move `environ` under a concurrent `getenv`), so the body
/// runs in a child process of this test binary, started with `LAYERKV_HOME` pointing at a
/// scratch directory. The parent checks the child ran exactly this test and passed. Shown to
/// fail: with a test name that matches nothing (the child runs 0 tests) and with the child's
/// `starts_with(&home)` assertion inverted.
#[test]
fn resolve_model_converts_once_and_reuses_the_cache() {
    let _clean = Clean;
    let Some(home) = std::env::var_os(RESOLVE_CHILD).map(PathBuf::from) else {
        let home = tmp("home");
        let name = "resolve_model_converts_once_and_reuses_the_cache";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env("LAYERKV_HOME", &home)
            .env(RESOLVE_CHILD, &home)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed"),
            "child run failed:\n{stdout}\n{stderr}"
        );
        assert!(
            home.join("models").is_dir(),
            "the child did not cache under LAYERKV_HOME"
        );
        return;
    };
    let s = spec("qwen2");
    let gguf = tmp("resolve.gguf");
    write_gguf(&gguf, &s, &weights(&s, 21), GgmlDType::F32);
    let dir = layerkv_model::assets::resolve_model(&gguf).unwrap();
    assert!(dir.starts_with(&home), "{}", dir.display());
    assert!(dir.join("model.safetensors").exists());
    let marker = dir.join("marker");
    std::fs::write(&marker, "kept").unwrap();
    assert_eq!(layerkv_model::assets::resolve_model(&gguf).unwrap(), dir);
    assert!(marker.exists(), "the cached conversion was redone");
    // A directory resolves to itself.
    assert_eq!(layerkv_model::assets::resolve_model(&dir).unwrap(), dir);
    // A different file (size changes) gets another directory.
    let mut meta = metadata(&s);
    meta.push(("general.name".into(), Value::String("changed".into())));
    write_gguf_with(&gguf, &s, &weights(&s, 21), GgmlDType::F32, meta, false);
    let again = layerkv_model::assets::resolve_model(&gguf).unwrap();
    assert_ne!(again, dir);
    assert!(matches!(
        layerkv_model::assets::resolve_model(&tmp("absent.gguf")).unwrap_err(),
        ModelError::MissingFile(_)
    ));
}

fn convert_error(meta_edit: impl Fn(&mut Vec<(String, Value)>)) -> String {
    let s = spec("llama");
    let mut meta = metadata(&s);
    meta_edit(&mut meta);
    let gguf = tmp(&format!("bad-{}.gguf", meta.len()));
    write_gguf_with(&gguf, &s, &weights(&s, 22), GgmlDType::F32, meta, true);
    let out = tmp("bad-out");
    let e = gguf_to_model_dir(&gguf, &out).unwrap_err();
    assert!(!out.exists(), "a failed conversion wrote {}", out.display());
    assert!(matches!(e, ModelError::Unsupported { .. }), "{e:?}");
    e.to_string()
}

fn set(meta: &mut [(String, Value)], key: &str, v: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
}

#[test]
fn unsupported_files_are_clear_errors() {
    let _clean = Clean;
    let e = convert_error(|m| {
        set(m, "general.architecture", Value::String("gpt2".into()));
    });
    assert!(
        e.contains("\"gpt2\"") && e.contains("llama, mistral, qwen2"),
        "{e}"
    );
    let e = convert_error(|m| set(m, "tokenizer.ggml.pre", Value::String("mystery".into())));
    assert!(e.contains("\"mystery\"") && e.contains("llama-bpe"), "{e}");
    let e = convert_error(|m| set(m, "tokenizer.ggml.model", Value::String("bert".into())));
    assert!(e.contains("\"bert\"") && e.contains("SentencePiece"), "{e}");
    // A type candle cannot read (an i-quant): named with its tensor, before anything is read.
    let s = spec("llama");
    let gguf = tmp("iq4.gguf");
    write_gguf(&gguf, &s, &weights(&s, 25), GgmlDType::F32);
    let mut bytes = std::fs::read(&gguf).unwrap();
    let name = b"output.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    // name, rank (u32), two u64 dims, then the type id.
    let ty = at + name.len() + 4 + 16;
    assert_eq!(bytes[ty..ty + 4], 0u32.to_le_bytes());
    bytes[ty..ty + 4].copy_from_slice(&23u32.to_le_bytes());
    std::fs::write(&gguf, &bytes).unwrap();
    let e = gguf_to_model_dir(&gguf, &tmp("iq4-out")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported { what, .. }
            if what.contains("IQ4_XS") && what.contains("output.weight")),
        "{e}"
    );
    // Run quantized, the same file is refused the same way, naming the file and the tensor.
    let e = load_gguf(&gguf, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported { what, path }
            if what.contains("IQ4_XS") && what.contains("output.weight") && path == &gguf),
        "{e}"
    );
    // Q8_1 is a type candle reads but cannot dequantise.
    let s = spec("llama");
    let gguf = tmp("q8_1.gguf");
    write_gguf(&gguf, &s, &weights(&s, 24), GgmlDType::Q8_1);
    let e = gguf_to_model_dir(&gguf, &tmp("q8_1-out")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported { what, .. } if what.contains("Q8_1")),
        "{e}"
    );
    let e = load_gguf(&gguf, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported { what, .. } if what.contains("Q8_1")),
        "{e}"
    );
}

#[test]
fn truncated_and_missing_files_are_clear_errors() {
    let _clean = Clean;
    let s = spec("llama");
    let gguf = tmp("truncated.gguf");
    write_gguf(&gguf, &s, &weights(&s, 23), GgmlDType::F32);
    let bytes = std::fs::read(&gguf).unwrap();
    // Cut inside the tensor data.
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    let e = gguf_to_model_dir(&gguf, &tmp("truncated-out")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Corrupt { what, .. } if what.contains("truncated")),
        "{e}"
    );
    assert!(e.to_string().contains("truncated.gguf"), "{e}");
    // Cut inside the header.
    std::fs::write(&gguf, &bytes[..40]).unwrap();
    let e = gguf_to_model_dir(&gguf, &tmp("truncated-out")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Corrupt { what, .. } if what.contains("not a readable GGUF")),
        "{e}"
    );
    // Impossible length fields (a corrupt header) are errors, not allocations: the first
    // key's length (bytes 24..32) and the tensor count (bytes 8..16).
    for (at, what) in [(24, "claims"), (8, "do not fit")] {
        let mut bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&gguf, &bad).unwrap();
        let e = gguf_to_model_dir(&gguf, &tmp("truncated-out")).unwrap_err();
        assert!(
            matches!(&e, ModelError::Corrupt { what: w, .. } if w.contains(what)),
            "{e}"
        );
    }
    // Not a GGUF at all.
    std::fs::write(&gguf, b"hello, world, this is text").unwrap();
    assert!(matches!(
        gguf_to_model_dir(&gguf, &tmp("truncated-out")).unwrap_err(),
        ModelError::Corrupt { .. }
    ));
    let e = gguf_to_model_dir(&tmp("missing.gguf"), &tmp("missing-out")).unwrap_err();
    assert!(matches!(e, ModelError::MissingFile(_)), "{e}");
}

/// Largest |logit| of `t`.
fn amax(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The quantized model of `gguf` against the same file converted to f32: the weights are the
/// same numbers, so what differs is the activations' quantization to Q8 blocks (llama.cpp's
/// scheme; with `dense_from_rows` at most the prompt's length, none: the prompt runs on the
/// dequantized weights in f32). Returns the max |logit difference| relative to the largest
/// |logit|.
fn quantized_vs_converted(gguf: &Path, converted: &Path, opts: QuantizedOptions) -> f32 {
    let q = load_gguf_with(gguf, &Device::Cpu, &opts).unwrap();
    // The prompt's rows only: the greedy continuation may part at a near tie of a random model.
    let rows = PROMPT.len();
    let got = run_model_logits(Arc::new(q.model))
        .narrow(0, 0, rows)
        .unwrap();
    let want = run_logits(converted).narrow(0, 0, rows).unwrap();
    let scale = amax(&want);
    assert!(scale.is_finite() && scale > 0.0, "max |logit| {scale}");
    max_abs_diff(&got, &want) / scale
}

#[test]
fn quantized_gguf_runs_like_its_f32_conversion() {
    // Fails if the quantized loader skips the Q/K un-permutation of quantized rows (llama's
    // error jumps to ~1), drops qwen2's biases, or mis-reads a type's blocks.
    let _clean = Clean;
    let wide = wide_spec(2);
    let w = weights(&wide, 21);
    for ty in ALL_TYPES {
        let gguf = tmp(&format!("q-{ty:?}.gguf"));
        write_gguf(&gguf, &wide, &w, ty);
        let converted = tmp(&format!("q-{ty:?}"));
        gguf_to_model_dir(&gguf, &converted).unwrap();
        let kernels = QuantizedOptions {
            dense_from_rows: None,
        };
        let rel = quantized_vs_converted(&gguf, &converted, kernels);
        // Measured: 0.0056-0.0093 for the quantized types, 0 for F16 and BF16 (prompt rows,
        // seed 21).
        assert!(
            rel <= 0.02,
            "{ty:?}: quantized vs f32 logits differ by {rel} (relative)"
        );
    }
    for arch in ["llama", "qwen2"] {
        let s = spec(arch);
        let w = weights(&s, 22);
        let gguf = tmp(&format!("{arch}-q4_1.gguf"));
        write_gguf(&gguf, &s, &w, GgmlDType::Q4_1);
        let converted = tmp(&format!("{arch}-q4_1"));
        gguf_to_model_dir(&gguf, &converted).unwrap();
        let rel = quantized_vs_converted(&gguf, &converted, QuantizedOptions::default());
        assert!(
            rel <= 0.02,
            "{arch}: quantized vs f32 logits differ by {rel} (relative)"
        );
    }
}

#[test]
fn quantized_prefill_runs_dense_on_the_dequantized_weights() {
    // From `dense_from_rows` rows, products of the types layerkv's kernels run dequantize their
    // weight and multiply in f32: the prompt's logits are the f32 conversion's. Fails if the
    // dense path reads the wrong weight bytes (a K-quant row is k / 256 super-blocks); the
    // chunking of large weights is checked on the real model's LM head (tests/quantized.rs).
    let _clean = Clean;
    let s = wide_spec(2);
    let w = weights(&s, 26);
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let gguf = tmp(&format!("dense-{ty:?}.gguf"));
        write_gguf(&gguf, &s, &w, ty);
        let converted = tmp(&format!("dense-{ty:?}"));
        gguf_to_model_dir(&gguf, &converted).unwrap();
        let dense = QuantizedOptions {
            dense_from_rows: Some(2),
        };
        let rel = quantized_vs_converted(&gguf, &converted, dense);
        assert!(
            rel <= 1e-5,
            "{ty:?}: dense prefill differs by {rel} (relative)"
        );
    }
}

#[test]
fn quantized_gguf_with_a_wrong_shape_names_the_tensor() {
    let _clean = Clean;
    let s = spec("llama");
    let mut w = weights(&s, 23);
    let up = "model.layers.1.mlp.up_proj.weight";
    // Rebuilt from its values: candle's `QTensor::quantize` reads a narrowed view's whole
    // storage (`copy` keeps it), which a debug assertion in candle catches in test builds.
    let short = w[up].narrow(0, 0, s.ffn - 32).unwrap();
    let values = short.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    w.insert(
        up.into(),
        Tensor::from_vec(values, short.dims(), short.device()).unwrap(),
    );
    let gguf = tmp("bad-shape.gguf");
    write_gguf(&gguf, &s, &w, GgmlDType::Q8_0);
    let err = load_gguf(&gguf, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, .. } if name.contains("blk.1.ffn_up.weight")),
        "{err}"
    );
}
