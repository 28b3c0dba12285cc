//! KVSharer calibration on tiny random-weight models written to disk with the real safetensors
//! writer and loaded by the real loader (the path users hit), and the cache under the map it
//! returns:
//! - calibration is deterministic for a seed, returns a downward map with the requested number
//!   of sharing layers, accepts nothing at cosine threshold 1.0, and rejects bad input with a
//!   clear error (empty or too short text, share fraction outside [0, 1), more sharing layers
//!   than the model can have, NaN in the hidden states);
//! - under a calibrated map with many groups, after every prefill and decode step of a batch,
//!   every owning group of every sequence holds exactly the tokens its retention keeps (all of
//!   them, or the sinks and the window), at the right positions, readers hold no bytes, and the
//!   logits equal a dense token-by-token reference of the same map and retention. (The
//!   authors' released "real share" cache overwrote kept layers with a single token during
//!   decode once there were more kept layers than the layer index.)
//! - sinks + window under sharing in multi-token steps past the window (prefill chunks, decode
//!   steps of several tokens, and a model of the real one's attention shape at page size 16)
//!   equals the dense reference of the same steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use layerkv::calibrate::{
    calibrate, Acceptance, Calibration, CalibrationConfig, PairOrder, ShareTarget,
};
use layerkv::{Error, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention};
use layerkv_model::calibrate::{text_samples, EngineCalibrator};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows, PrefillMode};
use layerkv_model::rope::Rope;
use layerkv_model::Model;
use layerkv_testkit::max_abs_diff;

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 48;
const BLOCK: usize = 4;

/// The tokenizer's alphabet: one token per character (byte-level, `Ġ` is the space).
const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789Ġ.";

fn vocab() -> usize {
    ALPHABET.chars().count()
}

/// Writes a tiny llama model directory with `layers` layers and seeded random weights;
/// `nan_norm` puts a NaN into the final norm (NaN final hidden states, finite K/V).
fn tiny_model(layers: usize, seed: u64, nan_norm: bool) -> PathBuf {
    tiny_model_shaped(layers, seed, nan_norm, (HIDDEN, HEADS, KV_HEADS))
}

/// [`tiny_model`] with `(hidden, heads, kv_heads)`.
fn tiny_model_shaped(
    layers: usize,
    seed: u64,
    nan_norm: bool,
    (hidden, heads, kv_heads): (usize, usize, usize),
) -> PathBuf {
    let dir = layerkv_testkit::unique_scratch(&format!(
        "calibrate-{layers}-{seed}-{nan_norm}-{hidden}-{heads}-{kv_heads}"
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": FFN, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": vocab(),
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
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
    let d = hidden / heads;
    let s = 1.0 / (hidden as f32).sqrt();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        rand(&[vocab(), hidden], 1.0, 0.0),
    );
    t.insert("lm_head.weight".into(), rand(&[vocab(), hidden], 0.3, 0.0));
    let mut norm = rand(&[hidden], 0.1, 1.0).to_vec1::<f32>().unwrap();
    if nan_norm {
        norm[3] = f32::NAN;
    }
    t.insert(
        "model.norm.weight".into(),
        Tensor::new(norm, &Device::Cpu).unwrap(),
    );
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape, scale) in [
            ("self_attn.q_proj", [heads * d, hidden], 2.0 * s),
            ("self_attn.k_proj", [kv_heads * d, hidden], 2.0 * s),
            ("self_attn.v_proj", [kv_heads * d, hidden], s),
            ("self_attn.o_proj", [hidden, heads * d], s),
            ("mlp.gate_proj", [FFN, hidden], s),
            ("mlp.up_proj", [FFN, hidden], s),
            ("mlp.down_proj", [hidden, FFN], 1.0 / (FFN as f32).sqrt()),
        ] {
            t.insert(format!("{p}.{name}.weight"), rand(&shape, scale, 0.0));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), rand(&[hidden], 0.1, 1.0));
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    write_tokenizer(&dir);
    dir
}

/// A byte-level BPE tokenizer.json over [`ALPHABET`] (no merges: one token per character).
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = ALPHABET
        .chars()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

fn load(dir: &Path) -> Arc<Model> {
    Arc::new(Model::load(dir, DType::F32, &Device::Cpu).unwrap())
}

/// Calibration text: paragraphs of letters, digits, spaces and full stops.
fn text() -> String {
    (0..6)
        .map(|p| {
            (0..40)
                .map(|w| format!("w{}x{}", (p * 7 + w * 3) % 23, (p + w) % 5))
                .collect::<Vec<_>>()
                .join(" ")
                + "."
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn samples(dir: &Path, count: usize, len: usize) -> Vec<Vec<u32>> {
    let tokenizer = layerkv_model::tokenizer::load(dir).unwrap();
    text_samples(&tokenizer, &text(), count, len).unwrap()
}

fn config(target: ShareTarget, order: PairOrder, acceptance: Acceptance) -> CalibrationConfig {
    CalibrationConfig {
        target,
        order,
        acceptance,
        max_candidates: None,
    }
}

fn run(model: &Arc<Model>, samples: &[Vec<u32>], cfg: &CalibrationConfig) -> Calibration {
    let mut cal = EngineCalibrator::new(model.clone(), EngineConfig::default());
    calibrate(&mut cal, samples, cfg, &mut |_| {}).unwrap()
}

fn err_text(model: &Arc<Model>, samples: &[Vec<u32>], cfg: &CalibrationConfig) -> String {
    let mut cal = EngineCalibrator::new(model.clone(), EngineConfig::default());
    match calibrate(&mut cal, samples, cfg, &mut |_| {}) {
        Err(Error::Calibration { what }) => what,
        Err(other) => other.to_string(),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn text_samples_are_fixed_length_and_bad_text_is_an_error() {
    let dir = tiny_model(4, 1, false);
    let tokenizer = layerkv_model::tokenizer::load(&dir).unwrap();
    let s = text_samples(&tokenizer, &text(), 4, 24).unwrap();
    assert_eq!(s.len(), 4);
    assert!(s.iter().all(|x| x.len() == 24));
    assert_eq!(s, text_samples(&tokenizer, &text(), 4, 24).unwrap());
    // More samples than paragraphs: all six, not an error.
    assert_eq!(text_samples(&tokenizer, &text(), 50, 24).unwrap().len(), 6);
    let msg = |r: layerkv_model::Result<Vec<Vec<u32>>>| r.unwrap_err().to_string();
    assert!(msg(text_samples(&tokenizer, "", 4, 24)).contains("empty"));
    assert!(msg(text_samples(&tokenizer, " \n\n \n", 4, 24)).contains("empty"));
    assert!(msg(text_samples(&tokenizer, "short. text.", 4, 24))
        .contains("no paragraph of at least 24 tokens"));
    assert!(msg(text_samples(&tokenizer, &text(), 4, 1)).contains("at least 2 tokens"));
    assert!(msg(text_samples(&tokenizer, &text(), 0, 24)).contains("at least 1 sample"));
}

#[test]
fn calibration_is_deterministic_downward_and_reaches_the_count() {
    let dir = tiny_model(8, 2, false);
    let model = load(&dir);
    let samples = samples(&dir, 3, 16);
    let lenient = Acceptance::Cosine { threshold: -1.0 };
    for order in [
        PairOrder::Dissimilar,
        PairOrder::Similar,
        PairOrder::Random { seed: 5 },
    ] {
        for k in [1, 3, 4] {
            let cfg = config(ShareTarget::Layers(k), order, lenient);
            let a = run(&model, &samples, &cfg);
            assert_eq!(a.num_shared(), k, "{order} k = {k}");
            assert!(a.reached_target());
            assert_eq!(a.map.num_groups(), 8 - k);
            assert!(!a.map.needs_upward());
            assert!(a.map.owns_kv(0));
            for (&l, &s) in &a.pairs {
                assert!(s < l && a.map.owns_kv(s), "{order}: {l} -> {s}");
            }
            // The same seed and inputs give the same search, bit for bit.
            assert_eq!(a, run(&model, &samples, &cfg), "{order} k = {k}");
        }
    }
    let cfg = |seed| config(ShareTarget::Layers(3), PairOrder::Random { seed }, lenient);
    let tried = |c: &Calibration| -> Vec<(usize, usize)> {
        c.candidates
            .iter()
            .map(|c| (c.layer, c.pair_source))
            .collect()
    };
    let (a, b) = (
        run(&model, &samples, &cfg(5)),
        run(&model, &samples, &cfg(6)),
    );
    assert_ne!(tried(&a), tried(&b), "another seed tries other pairs");
    // A fraction rounds to whole layers: 0.3 of 8 is 2.
    let frac = config(ShareTarget::Fraction(0.3), PairOrder::Dissimilar, lenient);
    assert_eq!(run(&model, &samples, &frac).num_shared(), 2);
}

#[test]
fn threshold_one_accepts_nothing() {
    let dir = tiny_model(6, 3, false);
    let model = load(&dir);
    let samples = samples(&dir, 2, 12);
    let cfg = config(
        ShareTarget::Layers(2),
        PairOrder::Dissimilar,
        Acceptance::Cosine { threshold: 1.0 },
    );
    let c = run(&model, &samples, &cfg);
    assert_eq!(c.num_shared(), 0);
    assert_eq!(c.map, LayerMap::identity(6).unwrap());
    assert!(!c.reached_target());
    assert_eq!(c.candidates.len(), 15, "every pair scored, none accepted");
    assert!(c.candidates.iter().all(|c| !c.accepted && c.cosine < 1.0));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tiny_model(6, 4, false);
    let model = load(&dir);
    let samples = samples(&dir, 2, 12);
    let lenient = Acceptance::Cosine { threshold: -1.0 };
    for f in [1.0, 1.5, -0.25, f64::NAN] {
        let cfg = config(ShareTarget::Fraction(f), PairOrder::Dissimilar, lenient);
        assert!(
            err_text(&model, &samples, &cfg).contains("outside [0, 1)"),
            "{f}"
        );
    }
    let cfg = config(ShareTarget::Layers(6), PairOrder::Dissimilar, lenient);
    assert!(err_text(&model, &samples, &cfg).contains("can share at most 5"));
    let cfg = config(ShareTarget::Layers(1), PairOrder::Dissimilar, lenient);
    assert!(err_text(&model, &[], &cfg).contains("no calibration samples"));
    assert!(err_text(&model, &[vec![3]], &cfg).contains("sample 0 has 1 tokens"));
    // NaN in the final norm: the K/V are finite, the hidden states are not.
    let nan = load(&tiny_model(6, 4, true));
    let msg = err_text(&nan, &samples, &cfg);
    assert!(msg.contains("hidden state of sample 0 holds NaN"), "{msg}");
}

/// The map and retention applied densely, token by token, independently of the cache: per
/// group the kept tokens' pre-RoPE K/V and text positions; every layer attends over its group's
/// kept tokens (StreamingLLM sinks rotated to sit right before the first kept token after them,
/// everything else at its text position); after every token a sinks+window group keeps its
/// first `sinks` and last `window - 1` tokens. Returns each token's logits `[1, vocab]`.
fn dense_reference(model: &Model, policy: &Policy, text: &[u32]) -> Vec<Tensor> {
    dense_reference_in_steps(model, policy, text, &vec![1; text.len()])
}

/// [`dense_reference`] with the text in steps of `steps` tokens: retention runs after each
/// step only, so a step's tokens attend to what the group kept before the step plus the step's
/// own tokens up to themselves (the semantics of a multi-token engine step).
fn dense_reference_in_steps(
    model: &Model,
    policy: &Policy,
    text: &[u32],
    steps: &[usize],
) -> Vec<Tensor> {
    let mut ends = std::collections::BTreeSet::new();
    let mut end = 0;
    for &s in steps {
        end += s;
        ends.insert(end);
    }
    assert_eq!(end, text.len());
    let cfg = model.config();
    let (heads, kvh, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let map = policy.layer_map();
    let groups = map.num_groups();
    let mut pos: Vec<Vec<usize>> = vec![Vec::new(); groups];
    let mut keys: Vec<Vec<Tensor>> = vec![Vec::new(); groups];
    let mut values: Vec<Vec<Tensor>> = vec![Vec::new(); groups];
    let mut out = Vec::new();
    for (t, &tok) in text.iter().enumerate() {
        let mut x = model.embed(&[tok]).unwrap();
        for l in 0..map.num_layers() {
            let g = map.group_of(l);
            let (normed, q) = model.attn_input(l, &x).unwrap();
            if map.owns_kv(l) {
                let (k, v) = model.kv(l, &normed).unwrap();
                pos[g].push(t);
                keys[g].push(k);
                values[g].push(v);
            }
            let n = pos[g].len();
            let sinks = policy.retention(g).sinks();
            let shift = if sinks > 0 && n > sinks {
                pos[g][sinks] - sinks
            } else {
                0
            };
            let rot: Vec<usize> = (0..n)
                .map(|j| if j < sinks { shift + j } else { pos[g][j] })
                .collect();
            let (cos, sin) = model.rope().tables(&rot, DType::F32, &Device::Cpu).unwrap();
            let k_all = Rope::apply(&Tensor::cat(&keys[g], 0).unwrap(), &cos, &sin).unwrap();
            let v_all = Tensor::cat(&values[g], 0).unwrap();
            let (qc, qs) = model.rope().tables(&[t], DType::F32, &Device::Cpu).unwrap();
            let q = Rope::apply(&q, &qc, &qs).unwrap();
            let mut rows = Vec::new();
            for h in 0..heads {
                let kv = h / (heads / kvh);
                let kh = k_all.narrow(1, kv, 1).unwrap().squeeze(1).unwrap();
                let vh = v_all.narrow(1, kv, 1).unwrap().squeeze(1).unwrap();
                let qh = q.narrow(1, h, 1).unwrap().squeeze(1).unwrap();
                let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                rows.push(p.matmul(&vh).unwrap());
            }
            let attn = Tensor::stack(&rows, 1).unwrap();
            x = model.attn_output_and_mlp(l, &x, &attn).unwrap();
        }
        out.push(model.logits(&x).unwrap());
        if !ends.contains(&(t + 1)) {
            continue;
        }
        for g in 0..groups {
            if let Retention::SinkWindow { sinks, window } = *policy.retention(g) {
                let n = pos[g].len();
                let keep: Vec<usize> = (0..n).filter(|&j| j < sinks || j + window > n).collect();
                pos[g] = keep.iter().map(|&j| pos[g][j]).collect();
                keys[g] = keep.iter().map(|&j| keys[g][j].clone()).collect();
                values[g] = keep.iter().map(|&j| values[g][j].clone()).collect();
            }
        }
    }
    out
}

/// The text positions a group keeps after `seen` tokens, computed from the rule's definition.
fn expected_positions(retention: &Retention, seen: usize) -> Vec<usize> {
    match *retention {
        Retention::Full => (0..seen).collect(),
        Retention::SinkWindow { sinks, window } => (0..seen)
            .filter(|&p| p < sinks || p + window > seen)
            .collect(),
        ref other => panic!("not covered: {other:?}"),
    }
}

/// Prefill two sequences of different lengths, then decode them together; after every step,
/// every owning group's table against its retention, and the logits against the reference.
fn check_cache(model: &Arc<Model>, policy: Policy, texts: &[Vec<u32>], prompts: &[usize]) {
    let name = policy.name().to_string();
    let map = policy.layer_map().clone();
    let want: Vec<Vec<Tensor>> = texts
        .iter()
        .map(|t| dense_reference(model, &policy, t))
        .collect();
    let cfg = EngineConfig {
        block_size: BLOCK,
        num_pages: 1024,
        kv_dtype: layerkv_model::KvType::F32.into(),
        sliding_window: None,
        prefill: PrefillMode::TokenByToken,
        prefill_chunk: 1,
        prefix_caching: false,
    };
    let mut e = Engine::new(model.clone(), Arc::new(policy.clone()), cfg).unwrap();
    let check = |e: &Engine, seen: &[usize], step: &str| {
        let r = e.cache().read();
        for (seq, &n) in seen.iter().enumerate() {
            for g in 0..map.num_groups() {
                let table = r.table(seq as u64, g).unwrap();
                let retention = policy.retention(g);
                let positions: Vec<usize> = (0..table.num_slots())
                    .filter(|&s| table.is_valid(s))
                    .map(|s| table.position(s).unwrap())
                    .collect();
                assert_eq!(
                    table.num_valid(),
                    retention.max_tokens(n),
                    "{name} {step} seq {seq} group {g} (owner {}): {} valid after {n} tokens",
                    map.owner(g),
                    table.num_valid()
                );
                assert_eq!(
                    positions,
                    expected_positions(retention, n),
                    "{name} {step} seq {seq} group {g}"
                );
                assert!(table.num_pages_held() <= table.num_valid().div_ceil(BLOCK) + 1);
            }
            let mem = e.cache().memory(seq as u64).unwrap();
            for l in 0..map.num_layers() {
                assert_eq!(
                    mem.bytes_per_layer[l] == 0,
                    !map.owns_kv(l),
                    "{name} {step} layer {l}: {} bytes",
                    mem.bytes_per_layer[l]
                );
            }
        }
        drop(r);
        e.cache().check_invariants().unwrap();
    };
    let mut seen = vec![0; texts.len()];
    for (seq, (text, &p)) in texts.iter().zip(prompts).enumerate() {
        e.add_sequence(seq as u64).unwrap();
        let logits = e
            .step(&[(seq as u64, &text[..p])], LogitsRows::All)
            .unwrap();
        for (t, reference) in want[seq][..p].iter().enumerate() {
            let d = max_abs_diff(&logits.narrow(0, t, 1).unwrap(), reference);
            assert!(d <= 1e-4, "{name} seq {seq} prompt token {t}: {d}");
        }
        seen[seq] = p;
    }
    check(&e, &seen, "after the prompts");
    let longest = texts.iter().map(Vec::len).max().unwrap();
    let mut evicted = false;
    for step in 0.. {
        let batch: Vec<(u64, &[u32])> = (0..texts.len())
            .filter(|&s| seen[s] < texts[s].len())
            .map(|s| (s as u64, &texts[s][seen[s]..seen[s] + 1]))
            .collect();
        if batch.is_empty() {
            break;
        }
        let logits = e.step(&batch, LogitsRows::Last).unwrap();
        for (row, &(seq, _)) in batch.iter().enumerate() {
            let s = seq as usize;
            let d = max_abs_diff(&logits.narrow(0, row, 1).unwrap(), &want[s][seen[s]]);
            assert!(d <= 1e-4, "{name} decode step {step} seq {s}: {d}");
            seen[s] += 1;
            evicted |= policy.retention(0).max_tokens(seen[s]) < seen[s];
        }
        check(&e, &seen, &format!("decode step {step}"));
    }
    assert_eq!(seen.iter().max(), Some(&longest));
    let evicts = !policy.retention(0).is_full();
    assert_eq!(evicted, evicts, "{name}: the window was never passed");
    for seq in 0..texts.len() {
        e.free(seq as u64).unwrap();
    }
    assert_eq!(
        e.cache().pool_stats().num_used,
        0,
        "{name}: freeing returns every page"
    );
}

#[test]
fn every_group_keeps_what_its_retention_allows_under_a_calibrated_map() {
    const LAYERS: usize = 12;
    let dir = tiny_model(LAYERS, 9, false);
    let model = load(&dir);
    // Calibrate half the layers away: 6 groups, most with several readers.
    let cfg = config(
        ShareTarget::Layers(6),
        PairOrder::Dissimilar,
        Acceptance::Cosine { threshold: -1.0 },
    );
    let cal = run(&model, &samples(&dir, 3, 16), &cfg);
    let map = cal.map.clone();
    assert_eq!(map.num_groups(), 6, "{map}");
    assert!(
        (0..LAYERS).any(|l| !map.owns_kv(l) && map.owner(map.group_of(l)) + 1 < l),
        "some layer reads a group owned further down: {map}"
    );
    let texts: Vec<Vec<u32>> = [(3u32, 30usize), (7, 23)]
        .iter()
        .map(|&(a, n)| {
            (0..n as u32)
                .map(|i| (i * 13 + a) % vocab() as u32)
                .collect()
        })
        .collect();
    let prompts = [9, 5];
    let full = PolicyBuilder::new(map.clone())
        .name("calibrated")
        .build()
        .unwrap();
    check_cache(&model, full, &texts, &prompts);
    let stream = PolicyBuilder::new(map)
        .name("calibrated+stream:2:6")
        .retention(Retention::SinkWindow {
            sinks: 2,
            window: 6,
        })
        .build()
        .unwrap();
    check_cache(&model, stream, &texts, &prompts);
}

/// Sinks + window under a map with several readers per group, past the window in multi-token
/// steps: the prompt prefilled in chunks of 4 (`prefill_chunk`, retention between chunks), then
/// decode steps of 3 tokens (as `layerkv eval --chunk 3` runs them), against the dense
/// reference of the same steps.
#[test]
fn multi_token_steps_past_the_window_match_the_dense_reference() {
    let model = load(&tiny_model(8, 10, false));
    let map = LayerMap::new(vec![0, 0, 2, 0, 4, 2, 6, 6]).unwrap();
    let policy = PolicyBuilder::new(map)
        .name("shared+stream:2:6")
        .retention(Retention::SinkWindow {
            sinks: 2,
            window: 6,
        })
        .build()
        .unwrap();
    let (prompt, decode, total) = (12, 3, 30);
    let text: Vec<u32> = (0..total as u32)
        .map(|i| (i * 11 + 4) % vocab() as u32)
        .collect();
    let mut steps = vec![4; prompt / 4];
    steps.extend(vec![decode; (total - prompt) / decode]);
    let want = dense_reference_in_steps(&model, &policy, &text, &steps);
    let cfg = EngineConfig {
        block_size: BLOCK,
        num_pages: 512,
        kv_dtype: layerkv_model::KvType::F32.into(),
        sliding_window: None,
        prefill: PrefillMode::TokenByToken,
        prefill_chunk: 4,
        prefix_caching: false,
    };
    let mut e = Engine::new(model.clone(), Arc::new(policy.clone()), cfg).unwrap();
    e.add_sequence(0).unwrap();
    let mut rows = vec![e.step(&[(0, &text[..prompt])], LogitsRows::All).unwrap()];
    for start in (prompt..total).step_by(decode) {
        let step = &text[start..start + decode];
        rows.push(e.step(&[(0, step)], LogitsRows::All).unwrap());
        let seen = start + decode;
        let table = e.cache().read().table(0, 0).unwrap().num_valid();
        assert_eq!(
            table,
            policy.retention(0).max_tokens(seen),
            "after {seen} tokens"
        );
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let bad: Vec<(usize, f32)> = want
        .iter()
        .enumerate()
        .map(|(t, w)| (t, max_abs_diff(&got.narrow(0, t, 1).unwrap(), w)))
        .filter(|(_, d)| *d > 1e-4)
        .collect();
    assert!(bad.is_empty(), "tokens whose logits differ: {bad:?}");
}

/// The same on a model of the real one's attention shape (head_dim 64, 3 query heads per KV
/// head) at page size 16 and a window of 100: contexts past the kernels' split threshold, a
/// whole page evicted per 16-token step, as `layerkv eval --chunk 16` runs sinks + window.
#[test]
fn sixteen_token_steps_past_a_long_window_match_the_dense_reference() {
    let model = load(&tiny_model_shaped(3, 11, false, (384, 6, 2)));
    let map = LayerMap::new(vec![0, 0, 2]).unwrap();
    let policy = PolicyBuilder::new(map)
        .name("shared+stream:4:100")
        .retention(Retention::SinkWindow {
            sinks: 4,
            window: 100,
        })
        .build()
        .unwrap();
    let (chunk, total) = (16, 224);
    let text: Vec<u32> = (0..total as u32)
        .map(|i| (i * 11 + 4) % vocab() as u32)
        .collect();
    let want = dense_reference_in_steps(&model, &policy, &text, &vec![chunk; total / chunk]);
    let cfg = EngineConfig {
        block_size: 16,
        num_pages: 512,
        kv_dtype: layerkv_model::KvType::F32.into(),
        sliding_window: None,
        prefill: PrefillMode::TokenByToken,
        prefill_chunk: chunk,
        prefix_caching: false,
    };
    let mut e = Engine::new(model.clone(), Arc::new(policy.clone()), cfg).unwrap();
    e.add_sequence(0).unwrap();
    let mut rows = Vec::new();
    for start in (0..total).step_by(chunk) {
        rows.push(
            e.step(&[(0, &text[start..start + chunk])], LogitsRows::All)
                .unwrap(),
        );
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let bad: Vec<(usize, f32)> = want
        .iter()
        .enumerate()
        .map(|(t, w)| (t, max_abs_diff(&got.narrow(0, t, 1).unwrap(), w)))
        .filter(|(_, d)| *d > 1e-3)
        .collect();
    assert!(bad.is_empty(), "tokens whose logits differ: {bad:?}");
}
