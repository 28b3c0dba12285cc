//! Drive layerkv from your own model loop, without layerkv's runner (`Engine`): the cache's step
//! protocol (`reserve` -> write K/V, attend, hand back attention mass -> `retain` -> execute the
//! moves), the paged kernels and the page store, around the per-layer pieces of the embedded
//! default model (SmolLM2-135M, fetched on first use).
//!
//! `cargo run --release --example custom_engine`
//!
//! The policy stacks a KVSharer-style pair (layer 29 reads layer 5) with StreamingLLM sinks
//! and H2O heavy hitters in a union, so the loop exercises every plan the protocol hands out:
//! sink captures and re-rotations, score rows, compaction moves.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use layerkv::{
    Budget, CacheConfig, KvCache, LayerKvPolicy, LayerMap, PolicyBuilder, Retention, Step,
};
use layerkv_kernels::{paged_attention, AttentionParams, KvStore, SeqKv, SeqQuery};
use layerkv_model::rope::Rope;
use layerkv_model::{assets, tokenizer, Model};

fn main() -> anyhow_free::Result<()> {
    let dir = assets::ensure_default_model()?;
    let model = Model::load(&dir, DType::F32, &Device::Cpu)?;
    let tok = tokenizer::load(&dir)?;
    let cfg = model.config().clone();
    let n = model.num_layers();
    let policy = PolicyBuilder::new(LayerMap::kvsharer(n, &[(29, 5)].into_iter().collect())?)
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
        .build()?;
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
    let mut step = Step::new();
    // Pre-RoPE keys of each group's sinks: the engine's half of StreamingLLM positions.
    let mut sinks: HashMap<usize, Tensor> = HashMap::new();

    let text = "The Jargon File is a glossary of hacker slang. ".repeat(12);
    let ids = tok.encode(&text)?;
    cache.add_sequence(0)?;
    let mut nll = 0f64;
    for (t, &id) in ids.iter().enumerate() {
        // 1. Reserve one slot per owning group; execute the plans it hands out.
        cache.reserve(&[(0, &[id])], &mut step)?;
        for c in step.copies() {
            store.copy_page(c.src, c.dst)?;
        }
        for r in step.rerotations() {
            let slots = step.rerotation_slots(r);
            let keys = &sinks[&r.group];
            let pos: Vec<usize> = (0..slots.len()).map(|j| r.first_position + j).collect();
            let (cos, sin) = model.rope().tables(&pos, DType::F32, &Device::Cpu)?;
            store.write_keys(
                slots,
                &Rope::apply(&keys.narrow(0, 0, slots.len())?, &cos, &sin)?,
            )?;
        }
        // 2. The layers: owners write K (rotated at the text position) and V; everyone attends.
        let (cos, sin) = model
            .rope()
            .tables(&[step.position(0)], DType::F32, &Device::Cpu)?;
        let mut x = model.embed(&[id])?;
        for layer in 0..n {
            let g = map.group_of(layer);
            let (normed, q) = model.attn_input(layer, &x)?;
            let q = Rope::apply(&q, &cos, &sin)?;
            if map.owns_kv(layer) {
                let (k, v) = model.kv(layer, &normed)?;
                if !step.sink_rows(0, g).is_empty() {
                    let prev = sinks.remove(&g).into_iter();
                    let all: Vec<Tensor> = prev.chain([k.copy()?]).collect();
                    sinks.insert(g, Tensor::cat(&all, 0)?);
                }
                store.write(step.slots(0, g), &Rope::apply(&k, &cos, &sin)?, &v)?;
            }
            let reader = cache.read();
            let view = reader.view(0, g)?;
            let seq = SeqQuery {
                kv: SeqKv {
                    pages: view.pages,
                    num_slots: view.num_slots,
                    valid: view.valid,
                },
                q_start: 0,
                num_q: 1,
                q_pos: step.q_pos(0, g),
            };
            let params = AttentionParams {
                scale: 1.0 / (d as f32).sqrt(),
                window: cache.layer_window(layer),
                include_diagonal: true,
            };
            // H2O reads the mass every reader layer adds into the step's buffer.
            let out = paged_attention(&q, &store, &[seq], &params, step.mass_mut(g))?;
            drop(reader);
            x = model.attn_output_and_mlp(layer, &x, &out)?;
        }
        let logits = model.logits(&x)?;
        if let Some(&next) = ids.get(t + 1) {
            let logp = Model::log_softmax(&logits)?.squeeze(0)?.to_vec1::<f32>()?;
            nll -= f64::from(logp[next as usize]);
        }
        // 3. Retain: each group's rule decides; emptied pages return; holes get compacted.
        let outcome = cache.retain(&mut step)?;
        let (src, dst): (Vec<u32>, Vec<u32>) = step.moves().iter().map(|m| (m.src, m.dst)).unzip();
        store.move_slots(&src, &dst)?;
        if t % 100 == 99 || t + 1 == ids.len() {
            let mem = cache.memory(0)?;
            println!(
                "token {:>4}: {:>8} KV bytes ({} pages over {} groups), last retain evicted {}, freed {} pages, moved {} rows",
                t + 1,
                mem.total_bytes,
                mem.pages_per_group.iter().sum::<usize>(),
                map.num_groups(),
                outcome.evicted_slots,
                outcome.freed_pages,
                outcome.moved_slots
            );
        }
    }
    println!(
        "perplexity {:.3} over {} tokens with {} of {} groups",
        (nll / (ids.len() - 1) as f64).exp(),
        ids.len(),
        map.num_groups(),
        n
    );
    cache.free(0)?;
    Ok(())
}

/// The example's error type: any error, printed.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}
