//! Drive layerkv from your own model loop, without layerkv's runner (`Engine`): the cache's step
//! protocol (`reserve` -> write K/V and attend per layer -> `retain`), with the kernels'
//! `StepExecutor` executing every plan the protocol hands out (page copies, sink re-rotations,
//! score rows, compaction moves) on the page store, around the per-layer pieces of a model.
//!
//! `cargo run --release --example custom_engine` runs it on the embedded default model
//! (SmolLM2-135M, fetched on first use); `-- --model DIR` on any llama-family directory. The
//! test suite runs it on a tiny random model (`tests/examples.rs`).
//!
//! The policy stacks a KVSharer-style pair (the last layer reads the sixth, or the first on a
//! small model) with StreamingLLM sinks and H2O heavy hitters in a union, so the loop exercises
//! every plan: sink captures and re-rotations, score rows, compaction moves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::{
    Budget, CacheConfig, KvCache, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention, Step,
};
use layerkv_kernels::{AttentionParams, KvStore, StepExecutor};
use layerkv_model::rope::Rope;
use layerkv_model::{assets, tokenizer, Model};

/// What a run measured.
#[derive(Debug)]
pub struct Summary {
    /// Tokens streamed through the loop.
    pub tokens: usize,
    /// Perplexity of the text under the policy.
    pub perplexity: f64,
    /// KV bytes held at the end.
    pub kv_bytes: usize,
    /// Slots evicted over the run.
    pub evicted: usize,
    /// K/V rows the compactions moved.
    pub moved: usize,
}

/// The example's policy for a model of `n` layers: the last layer reads the sixth (the first
/// on a small model), every owner keeps 4 sinks + 64 recent tokens and 32 heavy hitters.
pub fn policy(n: usize) -> layerkv::Result<Policy> {
    let pair = (n - 1, if n > 6 { 5 } else { 0 });
    PolicyBuilder::new(LayerMap::kvsharer(n, &[pair].into_iter().collect())?)
        .retention(Retention::Union {
            parts: vec![
                Retention::SinkWindow {
                    sinks: 4,
                    window: 64,
                },
                Retention::HeavyHitter {
                    heavy: Budget::Tokens(32),
                    recent: Budget::Tokens(1),
                },
            ],
        })
        .build()
}

/// Streams `text` token by token through a hand-written loop on the model in `dir`.
pub fn run(
    dir: &Path,
    text: &str,
    report_every: usize,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let model = Model::load(dir, DType::F32, &Device::Cpu)?;
    let tok = tokenizer::load(dir)?;
    let cfg = model.config().clone();
    let n = model.num_layers();
    let policy = policy(n)?;
    let map = policy.layer_map().clone();
    let (kvh, d) = (cfg.num_key_value_heads, cfg.head_dim());
    let config = CacheConfig {
        block_size: 16,
        num_pages: 2048,
        bytes_per_token: 2 * kvh * d * 4,
        ..CacheConfig::default()
    };
    let cache = KvCache::new(Arc::new(policy), config)?;
    let mut store = KvStore::new(config.num_pages, 16, kvh, d, DType::F32, &Device::Cpu)?;
    let mut exec = StepExecutor::new();
    let mut step = Step::new();

    let ids = tok.encode(text)?;
    cache.add_sequence(0)?;
    let (mut nll, mut evicted, mut moved) = (0f64, 0, 0);
    for (t, &id) in ids.iter().enumerate() {
        // 1. Reserve; the executor runs the copies and re-rotations it planned. An error
        //    anywhere before `retain` drops `reserved`, which rolls the step back.
        let mut reserved = cache.reserve(&[(0, &[id])], &mut step)?;
        exec.begin(&reserved, &mut store, model.rope())?;
        // 2. The layers: owners write K/V (K rotated at the text position); everyone attends,
        //    adding the attention mass H2O scores with into the step.
        let (cos, sin) = model
            .rope()
            .tables(&[reserved.position(0)], DType::F32, &Device::Cpu)?;
        let mut x = model.embed(&[id])?;
        for layer in 0..n {
            let g = map.group_of(layer);
            let (normed, q) = model.attn_input(layer, &x)?;
            let q = Rope::apply(&q, &cos, &sin)?;
            if map.owns_kv(layer) {
                let (k, v) = model.kv(layer, &normed)?;
                let k_rotated = Rope::apply(&k, &cos, &sin)?;
                exec.write(&reserved, &mut store, &cache, g, &k, &k_rotated, &v)?;
            }
            let params = AttentionParams {
                scale: 1.0 / (d as f32).sqrt(),
                window: cache.layer_window(layer),
                include_diagonal: true,
            };
            let out = exec.attend(&q, &store, &cache, &mut reserved, g, &params)?;
            x = model.attn_output_and_mlp(layer, &x, &out)?;
        }
        let logits = model.logits(&x)?;
        // 3. Retain: each group's rule decides, holes get compacted, and the executor moves
        //    the rows and keeps the new sinks' keys, as one transaction (emptied pages return
        //    to the pool once the rows moved; a failed move puts the step back). An engine
        //    that carries on after errors also calls `exec.abort(&mut store)` when a step
        //    fails after `begin` (it writes back the sinks' keys re-rotated in place).
        let outcome = reserved.retain_with(|step| exec.finish(step, &mut store))?;

        (evicted, moved) = (evicted + outcome.evicted_slots, moved + outcome.moved_slots);
        if let Some(&next) = ids.get(t + 1) {
            let logp = Model::log_softmax(&logits)?.squeeze(0)?.to_vec1::<f32>()?;
            nll -= f64::from(logp[next as usize]);
        }
        if report_every > 0 && (t % report_every == report_every - 1 || t + 1 == ids.len()) {
            let mem = cache.memory(0)?;
            println!(
                "token {:>4}: {:>8} KV bytes ({} pages over {} groups), {evicted} slots evicted, {moved} rows moved so far",
                t + 1,
                mem.total_bytes,
                mem.pages_per_group.iter().sum::<usize>(),
                map.num_groups(),
            );
        }
    }
    let summary = Summary {
        tokens: ids.len(),
        perplexity: (nll / (ids.len() - 1) as f64).exp(),
        kv_bytes: cache.memory(0)?.total_bytes,
        evicted,
        moved,
    };
    cache.free(0)?;
    exec.free(0);
    Ok(summary)
}

#[allow(dead_code)] // the test suite calls `run` directly
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = match args.iter().position(|a| a == "--model") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--model needs a directory")?),
        None => assets::ensure_default_model()?,
    };
    let text = "The Jargon File is a glossary of hacker slang. ".repeat(12);
    let s = run(&dir, &text, 100)?;
    println!(
        "perplexity {:.3} over {} tokens, {} KV bytes held at the end",
        s.perplexity, s.tokens, s.kv_bytes
    );
    Ok(())
}
