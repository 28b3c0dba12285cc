//! What one decode step costs after N tokens have streamed by, identity vs StreamingLLM
//! (4 sinks + a 1020-token window), at N = 2k / 8k / 32k:
//! - `protocol`: the cache alone (`KvCache::reserve` + `retain` for one token, a 30-layer map,
//!   no tensors), the part every engine driving the step protocol pays;
//! - `engine`: a real decode step of the embedded default (SmolLM2-135M, fetched on first use)
//!   through `Engine::step` (kernels, store, retention), on the Python docs.
//!
//! Under a window the step should cost the same at every N (logical slots are renumbered, so
//! nothing walks evicted tokens); identity grows with N. Identity's engine row stops at the
//! model's trained context (8192): past it the model is out of distribution and the quadratic
//! prefill to reach 32k would take most of an hour on a small CPU.
//!
//! `cargo bench --bench step_cost` prints the table (medians, ratios against the same policy at
//! 2k and against identity at the same N). Under `cargo test` it streams 256 and 1024 tokens with
//! a 60-token window and checks that the windowed cache holds the same bytes at both lengths
//! while identity's grow.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use layerkv::{CacheConfig, KvCache, LayerMap, Policy, PolicyBuilder, Retention, Step};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::{assets, tokenizer, Model};

const LAYERS: usize = 30;
const BLOCK: usize = 16;

fn policy(window: Option<usize>, layers: usize) -> Policy {
    let b = PolicyBuilder::new(LayerMap::identity(layers).expect("identity map"));
    match window {
        Some(window) => b.retention(Retention::SinkWindow { sinks: 4, window }),
        None => b,
    }
    .build()
    .expect("policy")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns of one single-token `reserve` + `retain` after `streamed` tokens.
fn protocol_step_ns(window: Option<usize>, streamed: usize) -> (f64, usize) {
    let pages = LAYERS * (streamed + 4096) / BLOCK + LAYERS * 4;
    let config = CacheConfig {
        block_size: BLOCK,
        num_pages: pages,
        bytes_per_token: 2 * 3 * 64 * 4,
        ..CacheConfig::default()
    };
    let cache = KvCache::new(Arc::new(policy(window, LAYERS)), config).expect("cache");
    cache.add_sequence(0).expect("add");
    cache.set_prompt_len(0, 1).expect("prompt");
    let mut step = Step::new();
    let chunk = vec![0u32; 256];
    let mut done = 0;
    while done < streamed {
        let n = (streamed - done).min(256);
        cache
            .reserve(&[(0, &chunk[..n])], &mut step)
            .expect("reserve")
            .retain()
            .expect("retain");
        done += n;
    }
    let one = [0u32];
    let mut samples = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        for _ in 0..200 {
            let reserved = cache.reserve(&[(0, &one)], &mut step).expect("reserve");
            reserved.retain().expect("retain");
        }
        samples.push(t.elapsed().as_nanos() as f64 / 200.0);
    }
    let bytes = cache.memory(0).expect("memory").total_bytes;
    (median(samples), bytes)
}

/// Median ms of one real decode step after `streamed` tokens of `ids`, and the KV bytes held.
fn engine_step_ms(
    model: &Arc<Model>,
    ids: &[u32],
    window: Option<usize>,
    streamed: usize,
    steps: usize,
) -> (f64, usize) {
    let held = window.map_or(streamed + steps + 64, |w| w + 4 + 256 + BLOCK);
    let config = EngineConfig {
        num_pages: model.num_layers() * (held / BLOCK + 4),
        ..EngineConfig::default()
    };
    let policy = policy(window, model.num_layers());
    let mut engine = Engine::new(model.clone(), Arc::new(policy), config).expect("engine");
    engine.add_sequence(0).expect("add");
    engine.set_prompt_len(0, streamed).expect("prompt");
    for chunk in ids[..streamed].chunks(256) {
        engine
            .step(&[(0, chunk)], LogitsRows::Last)
            .expect("prefill step");
    }
    let mut samples = Vec::new();
    for &t in &ids[streamed..streamed + steps] {
        let start = Instant::now();
        engine
            .step(&[(0, &[t])], LogitsRows::Last)
            .expect("decode step");
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let bytes = engine.cache().memory(0).expect("memory").total_bytes;
    (median(samples), bytes)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (lengths, window, steps): (&[usize], usize, usize) = if bench {
        (&[2048, 8192, 32768], 1020, 24)
    } else {
        (&[256, 1024], 60, 4)
    };
    let dir = assets::ensure_default_model().expect("embedded default model");
    let texts = assets::ensure_default_texts().expect("default texts");
    let model = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu).expect("model"));
    let tok = tokenizer::load(&dir).expect("tokenizer");
    let text = std::fs::read_to_string(&texts.python_docs).expect("python docs");
    let ids = tok.encode(&text).expect("encode");
    let longest = lengths[lengths.len() - 1] + steps;
    assert!(
        ids.len() >= longest,
        "the Python docs hold {} tokens, need {longest}",
        ids.len()
    );
    let context = model.config().max_position_embeddings;

    if !bench {
        let (_, id_short) = engine_step_ms(&model, &ids, None, lengths[0], steps);
        let (_, id_long) = engine_step_ms(&model, &ids, None, lengths[1], steps);
        let (_, win_short) = engine_step_ms(&model, &ids, Some(window), lengths[0], steps);
        let (_, win_long) = engine_step_ms(&model, &ids, Some(window), lengths[1], steps);
        assert!(
            id_long > id_short,
            "identity must grow: {id_short} -> {id_long}"
        );
        assert_eq!(win_short, win_long, "sinks + window must hold flat memory");
        let (_, p_short) = protocol_step_ns(Some(window), lengths[0]);
        let (_, p_long) = protocol_step_ns(Some(window), lengths[1]);
        assert_eq!(p_short, p_long, "the cache alone must hold flat memory");
        println!("step_cost bench check: 2 passed, 0 failed");
        return;
    }

    println!(
        "decode step after N streamed tokens, SmolLM2-135M f32, CPU ({} threads), window {window}",
        cpu_threads()
    );
    println!(
        "| N | policy | protocol ns/step | engine ms/step | KV bytes | vs same policy at {} | vs identity at N |",
        lengths[0]
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut first: [Option<f64>; 2] = [None, None];
    for &n in lengths {
        let mut identity_ms = None;
        for (k, (name, w)) in [("identity", None), ("stream:4:1020", Some(window))]
            .into_iter()
            .enumerate()
        {
            let (pns, _) = protocol_step_ns(w, n);
            if w.is_none() && n > context {
                println!(
                    "| {n} | {name} | {pns:.0} | n/a (past the model's {context}-token context) | | | |"
                );
                continue;
            }
            let (ms, bytes) = engine_step_ms(&model, &ids, w, n, steps);
            let base = *first[k].get_or_insert(ms);
            if w.is_none() {
                identity_ms = Some(ms);
            }
            let vs_id = identity_ms
                .filter(|_| w.is_some())
                .map_or(String::new(), |i| format!("{:.2}x", ms / i));
            println!(
                "| {n} | {name} | {pns:.0} | {ms:.2} | {bytes} | {:.2}x | {vs_id} |",
                ms / base
            );
        }
    }
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
