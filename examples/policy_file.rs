//! Write, load, validate and print a stacked policy file: a KVSharer-style sharing map, a
//! StreamingLLM default for every group and a SnapKV override for one group. Also shows the
//! typed error a broken file gives. `cargo run --example policy_file`

use layerkv::{Budget, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention};

/// Runs the example (the test suite calls it too).
pub fn main() -> layerkv::Result<()> {
    let map = LayerMap::from_kvsharer_json(30, r#"{"29": 5, "27": 3, "25": 1}"#)?;
    let policy = PolicyBuilder::new(map)
        .name("kvsharer3+streaming, snapkv on layer 0")
        .retention(Retention::streaming(1020))
        .group_retention(
            0,
            Retention::SnapKv {
                observe: 32,
                budget: Budget::Tokens(512),
                pool: 7,
            },
        )
        .build()?;
    let path = std::env::temp_dir().join("layerkv-policy-file-example.toml");
    policy.save(&path)?;
    let back = Policy::load(&path)?;
    assert_eq!(back, policy, "a policy file round-trips exactly");
    println!(
        "{}:\n{}",
        path.display(),
        std::fs::read_to_string(&path).unwrap_or_default()
    );
    let map = back.layer_map();
    println!(
        "{} layers, {} KV groups ({:.0}% of the layers keep KV)",
        map.num_layers(),
        map.num_groups(),
        100.0 * map.kv_fraction()
    );
    for g in 0..map.num_groups() {
        if back.retention(g) != back.retention(1) || g < 2 {
            println!(
                "  group {g} (owner layer {}): {}",
                map.owner(g),
                back.retention(g)
            );
        }
    }
    // A broken file is a typed error that says what and where.
    let broken = "[layer_map]\nnum_layers = 4\nkv_source = [0, 0, 3]\n";
    match Policy::parse(broken, "toml") {
        Err(e) => println!("broken file: {e}"),
        Ok(_) => unreachable!("three sources for four layers"),
    }
    Ok(())
}
