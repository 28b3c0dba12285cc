//! The examples, run (not only compiled) on a tiny random model that the testkit writes through
//! the same writer users' model directories go through, so they cannot rot. Each asserts one
//! figure that a broken example would get wrong.

use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::eval::token_nll;
use layerkv_model::{tokenizer, Model};
use layerkv_testkit::{scratch, TinyModel};

#[path = "../examples/custom_engine.rs"]
mod custom_engine;
#[path = "../examples/long_stream.rs"]
mod long_stream;
#[path = "../examples/policy_file.rs"]
mod policy_file;
#[path = "../examples/stack_policies.rs"]
mod stack_policies;

fn text() -> String {
    "The Jargon File is a glossary of hacker slang. ".repeat(12)
}

/// The hand-written loop equals layerkv's own engine under the same policy, token by token.
/// (Shown to fail: dropping `exec.begin` from the example's loop leaves the sinks unrotated
/// and moves the perplexity by more than 1%; dropping `exec.finish` skips the compaction
/// moves, and the perplexity differs as well.)
#[test]
fn custom_engine_matches_the_engine() {
    let dir = TinyModel::llama(11).write(&scratch("example-custom-engine"));
    let got = custom_engine::run(&dir, &text(), 0).unwrap();
    assert!(got.evicted > 0 && got.moved > 0, "{got:?}: every plan ran");

    let model = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu).unwrap());
    let policy = custom_engine::policy(model.num_layers()).unwrap();
    let config = EngineConfig {
        num_pages: 2048,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Arc::new(policy), config).unwrap();
    let ids = tokenizer::load(&dir).unwrap().encode(&text()).unwrap();
    engine.add_sequence(0).unwrap();
    let mut nll = 0f64;
    for (t, &id) in ids.iter().enumerate() {
        let logits = engine.step(&[(0, &[id])], LogitsRows::All).unwrap();
        if let Some(&next) = ids.get(t + 1) {
            nll += f64::from(token_nll(&logits, &[next]).unwrap()[0]);
        }
    }
    let want = (nll / (ids.len() - 1) as f64).exp();
    assert_eq!(got.tokens, ids.len());
    assert!(
        (got.perplexity - want).abs() <= 1e-4 * want,
        "example {} vs engine {want}",
        got.perplexity
    );
    assert_eq!(got.kv_bytes, engine.cache().memory(0).unwrap().total_bytes);
}

/// Memory stays flat once the window is full.
#[test]
fn long_stream_holds_flat_memory() {
    let dir = TinyModel::llama(12).write(&scratch("example-long-stream"));
    let reports = long_stream::run(&dir, &text().repeat(2), 1024, 128).unwrap();
    let after_window: Vec<usize> = reports
        .iter()
        .filter(|r| r.tokens >= 512)
        .map(|r| r.kv_bytes)
        .collect();
    assert!(after_window.len() >= 3, "{reports:?}");
    let (lo, hi) = (
        after_window.iter().min().unwrap(),
        after_window.iter().max().unwrap(),
    );
    // 4 sinks + 252 tokens + one chunk of 32 = 18 pages at most per layer (4 layers, 2 KV
    // heads x 16 dims x f32 x K and V = 256 bytes a token).
    assert!(*hi <= 4 * 18 * 16 * 256, "{reports:?}");
    assert!(hi - lo <= 4 * 2 * 16 * 256, "{reports:?}");
    assert!(
        reports.iter().all(|r| r.perplexity.is_finite()),
        "{reports:?}"
    );
}

#[test]
fn policy_file_runs() {
    policy_file::main().unwrap();
}

#[test]
fn stack_policies_runs() {
    stack_policies::main().unwrap();
}
