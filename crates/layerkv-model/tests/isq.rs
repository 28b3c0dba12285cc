//! In-situ quantization ([`load_isq`]) on tiny models written by the testkit through the real
//! safetensors writer, checked against a dense model built independently from candle's own
//! quantize-then-dequantize of each tensor in the type llama.cpp's rules give it (written out
//! here per case, not computed by the code under test):
//! - with every product dense (`dense_from_rows: Some(1)`), the logits equal that model's
//!   (<= 1e-4): the bytes, the types and the wiring (a tied head sharing the embedding, qwen2's
//!   biases) are exactly those;
//! - on the quantized kernels (activations quantized to Q8 blocks) within 2% of its logits;
//! - the report counts every tensor once, in its type, and its bytes;
//! - an unsupported type and a hidden size that is not a multiple of 32 are errors.
//!
//! Shown to fail: a Q8_0 head where llama.cpp picks Q6_K (wide-q4_k: 0.145 apart), Q4_K falling
//! back to Q4_0 instead of Q5_0 (llama-q4_k: 0.81 apart).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use layerkv::Policy;
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::isq::{load_isq, load_isq_with, ISQ_TYPES};
use layerkv_model::quantized::QuantizedOptions;
use layerkv_model::weights::Weights;
use layerkv_model::{Model, ModelConfig};
use layerkv_testkit::{max_abs_diff, scratch, TinyModel};

const PROMPT: [u32; 9] = [3, 17, 42, 5, 9, 60, 33, 8, 21];

/// Prompt logits, then three decode steps of fixed tokens (the decode products run at one
/// row). Fixed, not greedy: two models whose top logits nearly tie would otherwise feed each
/// other different tokens and diverge for a reason that is not an error.
fn logits(model: Arc<Model>) -> Tensor {
    // The default prefill (iterative) runs the whole prompt in one pass under identity: the
    // prompt's products run at 9 rows.
    let cfg = EngineConfig {
        block_size: 4,
        num_pages: 64,
        ..EngineConfig::default()
    };
    let layers = model.num_layers();
    let mut e = Engine::new(model, Arc::new(Policy::identity(layers).unwrap()), cfg).unwrap();
    e.add_sequence(0).unwrap();
    let mut rows = vec![e.step(&[(0, &PROMPT)], LogitsRows::All).unwrap()];
    for next in [7u32, 44, 13] {
        rows.push(e.step(&[(0, &[next])], LogitsRows::Last).unwrap());
    }
    Tensor::cat(&rows, 0).unwrap()
}

/// Which type each tensor class gets: (projections, LM head, untied embedding).
struct Types {
    proj: GgmlDType,
    head: GgmlDType,
    embed: GgmlDType,
}

/// The dense model of `tiny`'s weights, each quantized to its type and dequantized by candle.
fn dequantized_model(tiny: &TinyModel, dir: &Path, t: &Types) -> Model {
    let mut w = tiny.weights();
    let round = |x: &Tensor, ty: GgmlDType| {
        QTensor::quantize(x, ty)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let names: Vec<String> = w.keys().cloned().collect();
    let mut out = HashMap::new();
    for name in names {
        let x = w.remove(&name).unwrap();
        let x = if name == "model.embed_tokens.weight" {
            round(&x, if tiny.tied { t.head } else { t.embed })
        } else if name == "lm_head.weight" {
            round(&x, t.head)
        } else if name.ends_with("_proj.weight") {
            round(&x, t.proj)
        } else {
            x // norms and biases stay f32
        };
        out.insert(name, x);
    }
    let cfg = ModelConfig::load(dir).unwrap();
    Model::from_weights(cfg, &mut Weights::from_tensors(out, dir)).unwrap()
}

fn wide(seed: u64) -> TinyModel {
    TinyModel {
        hidden: 256,
        ffn: 512,
        ..TinyModel::llama(seed)
    }
}

/// (model, requested type, expected types). 64-wide rows take llama.cpp's K-quant fallbacks
/// and a Q8_0 head; 256-wide rows take the K-quants themselves and a Q6_K head.
fn cases() -> Vec<(&'static str, TinyModel, GgmlDType, Types)> {
    use GgmlDType::*;
    let t = |proj, head, embed| Types { proj, head, embed };
    vec![
        ("llama-q4_0", TinyModel::llama(5), Q4_0, t(Q4_0, Q8_0, Q4_0)),
        ("llama-q4_1", TinyModel::llama(5), Q4_1, t(Q4_1, Q8_0, Q4_1)),
        ("llama-q5_0", TinyModel::llama(5), Q5_0, t(Q5_0, Q8_0, Q5_0)),
        ("llama-q5_1", TinyModel::llama(5), Q5_1, t(Q5_1, Q8_0, Q5_1)),
        ("llama-q8_0", TinyModel::llama(5), Q8_0, t(Q8_0, Q8_0, Q8_0)),
        ("llama-q4_k", TinyModel::llama(5), Q4K, t(Q5_0, Q8_0, Q5_0)),
        ("llama-q5_k", TinyModel::llama(5), Q5K, t(Q5_1, Q8_0, Q5_1)),
        ("llama-q6_k", TinyModel::llama(5), Q6K, t(Q8_0, Q8_0, Q8_0)),
        ("qwen2-q4_1", TinyModel::qwen2(6), Q4_1, t(Q4_1, Q8_0, Q4_1)),
        ("wide-q4_k", wide(7), Q4K, t(Q4K, Q6K, Q4K)),
        ("wide-q5_k", wide(7), Q5K, t(Q5K, Q6K, Q5K)),
        ("wide-q6_k", wide(7), Q6K, t(Q6K, Q6K, Q6K)),
        ("wide-q8_0", wide(7), Q8_0, t(Q8_0, Q8_0, Q8_0)),
    ]
}

#[test]
fn isq_models_are_their_dequantized_weights() {
    // Fails if a tensor gets another type than llama.cpp's rule (the dequantized model would
    // differ), if the tied head does not share the embedding's type, or if a bias is dropped.
    let root = scratch("isq-models");
    let mut seen = Vec::new();
    for (name, tiny, requested, types) in cases() {
        let dir = tiny.write(&root.join(name));
        let reference = Arc::new(dequantized_model(&tiny, &dir, &types));
        let want = logits(reference);
        let dense = QuantizedOptions {
            dense_from_rows: Some(1),
        };
        let isq = load_isq_with(&dir, requested, &Device::Cpu, &dense).unwrap();
        let got = logits(Arc::new(isq.model));
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: dense ISQ logits differ by {d}");

        let isq = load_isq(&dir, requested, &Device::Cpu).unwrap();
        let report = isq.report.clone();
        let got = logits(Arc::new(isq.model));
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(
            rel.is_finite() && rel <= 0.02,
            "{name}: ISQ on the quantized kernels differs by {rel} (relative)"
        );
        seen.push(format!("{name}: {rel:.4}"));

        // 7 projections per layer, the embedding, and the head unless tied.
        let tensors: usize = report.types.iter().map(|&(_, n, _)| n).sum();
        let want_tensors = 7 * tiny.layers + 1 + usize::from(!tiny.tied);
        assert_eq!(tensors, want_tensors, "{name}: {:?}", report.types);
        assert!(
            report.types.iter().any(|&(ty, _, _)| ty == types.proj),
            "{name}: {:?}",
            report.types
        );
        let f32_params = tiny.layers
            * (2 * tiny.hidden * tiny.hidden
                + 2 * tiny.hidden * tiny.hidden / 2
                + 3 * tiny.hidden * tiny.ffn)
            + tiny.vocab * tiny.hidden * (1 + usize::from(!tiny.tied));
        assert_eq!(report.f32_bytes, 4 * f32_params, "{name}");
        assert!(
            report.bytes() * 3 < report.f32_bytes,
            "{name}: {}",
            report.summary()
        );
    }
    eprintln!("ISQ vs dequantized, relative: {}", seen.join(", "));
}

#[test]
fn unsupported_requests_are_errors() {
    let root = scratch("isq-errors");
    let dir = TinyModel::llama(1).write(&root.join("llama"));
    let e = load_isq(&dir, GgmlDType::Q2K, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    let names = ISQ_TYPES.map(|(n, _)| n).join(", ");
    assert!(e.to_string().contains(&names), "{e}");
    let narrow = TinyModel {
        hidden: 48,
        heads: 4,
        ffn: 96,
        ..TinyModel::llama(1)
    };
    let dir = narrow.write(&root.join("narrow"));
    let e = load_isq(&dir, GgmlDType::Q8_0, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
}
