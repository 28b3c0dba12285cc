//! Stacks a cross-layer sharing map with StreamingLLM retention, saves the policy as a file,
//! and shows what each factor saves on a 30-layer model streaming 4096 tokens:
//! `cargo run --example stack_policies`.

use std::sync::Arc;

use layerkv::{CacheConfig, KvCache, LayerMap, Policy, PolicyBuilder, Retention, Step};

/// Streams `tokens` one-token steps through the cache's step protocol (no model: the slots and
/// moves it plans are what an engine would execute) and returns the bytes held at the end.
fn stream(policy: Policy, tokens: u32) -> layerkv::Result<usize> {
    // SmolLM2-135M: 3 KV heads x 64 dims, K and V, bf16.
    let config = CacheConfig {
        block_size: 16,
        num_pages: 16_384,
        bytes_per_token: 2 * 3 * 64 * 2,
        ..CacheConfig::default()
    };
    let cache = KvCache::new(Arc::new(policy), config)?;
    cache.add_sequence(0)?;
    let mut step = Step::new();
    for t in 0..tokens {
        let reserved = cache.reserve(&[(0, &[t])], &mut step)?;
        // An engine writes K/V at reserved.group_slots(group) and attends here.
        reserved.retain()?;
        // ... and executes step.moves() on its page tensors here.
    }
    Ok(cache.memory(0)?.total_bytes)
}

/// Runs the example (the test suite calls it too).
pub fn main() -> layerkv::Result<()> {
    let n = 30;
    let window = Retention::SinkWindow {
        sinks: 4,
        window: 508,
    };
    let policies = [
        PolicyBuilder::new(LayerMap::identity(n)?)
            .name("identity")
            .build()?,
        PolicyBuilder::new(LayerMap::cla(n, 2)?)
            .name("cla:2")
            .build()?,
        PolicyBuilder::new(LayerMap::identity(n)?)
            .name("stream:4:508")
            .retention(window.clone())
            .build()?,
        PolicyBuilder::new(LayerMap::cla(n, 2)?)
            .name("cla:2+stream:4:508")
            .retention(window)
            .build()?,
    ];
    let path = std::env::temp_dir().join("layerkv-cla2-stream.toml");
    policies[3].save(&path)?;
    println!("saved {}:\n{}", path.display(), policies[3].to_toml()?);
    let base = stream(policies[0].clone(), 4096)? as f64;
    for p in policies {
        let name = p.name().to_string();
        let bytes = stream(p, 4096)?;
        println!(
            "{name:<22} {bytes:>10} bytes  ({:.3} of identity)",
            bytes as f64 / base
        );
    }
    Ok(())
}
