//! The bad-input table: each caller mistake is its own test and must come back as a typed error
//! that names what and where, with no state changed and no page leaked.

use std::sync::Arc;

use layerkv::{CacheConfig, Error, KvCache, LayerMap, Policy, PolicyBuilder, Retention, Step};

fn cache(policy: Policy, num_pages: usize) -> KvCache {
    let config = CacheConfig {
        block_size: 4,
        num_pages,
        bytes_per_token: 8,
        ..CacheConfig::default()
    };
    KvCache::new(Arc::new(policy), config).unwrap()
}

#[test]
fn malformed_layer_types_string() {
    let e = LayerMap::from_layer_types("0_1_x_3").unwrap_err();
    assert!(
        matches!(&e, Error::Parse { position, .. } if position == "entry 2"),
        "{e}"
    );
    assert!(LayerMap::from_layer_types("").is_err());
    assert!(LayerMap::from_layer_types("0__1").is_err());
}

#[test]
fn cyclic_map() {
    let e = LayerMap::new(vec![0, 2, 3, 1]).unwrap_err();
    assert_eq!(e, Error::Cycle { layer: 1 });
    assert!(e.to_string().contains("layer 1"));
}

#[test]
fn wrong_layer_count() {
    let e = serde_json::from_str::<LayerMap>(r#"{"num_layers": 4, "kv_source": [0, 0, 0]}"#)
        .unwrap_err();
    assert!(e.to_string().contains("expected 4 layers, got 3"), "{e}");
    let e = LayerMap::preset("0_0_2", 4).unwrap_err();
    assert_eq!(
        e,
        Error::WrongLayerCount {
            what: "layer_types",
            expected: 4,
            actual: 3
        }
    );
    let e = LayerMap::with_sliding(vec![0, 0], vec![true]).unwrap_err();
    assert_eq!(
        e,
        Error::WrongLayerCount {
            what: "sliding_window",
            expected: 2,
            actual: 1
        }
    );
}

#[test]
fn target_out_of_range() {
    let e = LayerMap::from_layer_types("0_0_7").unwrap_err();
    assert_eq!(
        e,
        Error::SourceOutOfRange {
            layer: 2,
            source_layer: 7,
            num_layers: 3
        }
    );
    assert!(e.to_string().contains("layer 2 reads layer 7"));
}

#[test]
fn window_smaller_than_sinks() {
    let e = PolicyBuilder::new(LayerMap::identity(2).unwrap())
        .retention(Retention::SinkWindow {
            sinks: 8,
            window: 4,
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidRetention { reason, .. } if reason.contains("smaller than sinks")),
        "{e}"
    );
}

#[test]
fn zero_budget() {
    let e = Retention::SinkWindow {
        sinks: 0,
        window: 0,
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("zero budget"), "{e}");
    let e = Retention::Union { parts: vec![] }.validate().unwrap_err();
    assert!(e.to_string().contains("zero budget"), "{e}");
}

#[test]
fn pool_exhausted_in_the_middle_of_a_multi_group_append() {
    // 3 groups x 2 pages for 8 tokens: the third group cannot get its pages.
    let c = cache(Policy::identity(3).unwrap(), 5);
    c.add_sequence(1).unwrap();
    let mut step = Step::new();
    let before = (c.pool_stats(), c.memory(1).unwrap());
    let e = c.reserve(&[(1, &[0; 8])], &mut step).unwrap_err();
    assert_eq!(
        e,
        Error::PoolExhausted {
            requested: 6,
            available: 5
        }
    );
    assert_eq!((c.pool_stats(), c.memory(1).unwrap()), before);
    c.check_invariants().unwrap();
    // Still usable afterwards.
    c.reserve(&[(1, &[0; 4])], &mut step)
        .unwrap()
        .retain()
        .unwrap();
    c.free(1).unwrap();
    assert_eq!(c.pool_stats().num_used, 0);
}

#[test]
fn fork_and_free_of_unknown_or_freed_sequences() {
    let c = cache(Policy::identity(1).unwrap(), 8);
    assert_eq!(c.fork(1, 2).unwrap_err(), Error::UnknownSequence(1));
    assert_eq!(c.free(1).unwrap_err(), Error::UnknownSequence(1));
    c.add_sequence(1).unwrap();
    c.fork(1, 2).unwrap();
    assert_eq!(c.fork(1, 2).unwrap_err(), Error::SequenceExists(2));
    c.free(1).unwrap();
    assert_eq!(c.free(1).unwrap_err(), Error::UnknownSequence(1));
    assert_eq!(c.fork(1, 3).unwrap_err(), Error::UnknownSequence(1));
    c.free(2).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn policy_file_with_unknown_fields() {
    let text = r#"{"name": "p", "layer_map": {"num_layers": 1, "kv_source": [0]}, "retention": {"default": {"kind": "full"}, "typo": 1}}"#;
    let e = Policy::parse(text, "json").unwrap_err();
    assert!(
        matches!(&e, Error::PolicyFile(m) if m.contains("unknown field `typo`")),
        "{e}"
    );
    let text = "[layer_map]\nnum_layers = 1\nkv_source = [0]\n[retention.default]\nkind = \"sink_window\"\nsinks = 1\nwindow = 4\nwindw = 3\n";
    let e = Policy::parse(text, "toml").unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
}

#[test]
fn upward_map_rejected_where_the_engine_cannot_run_it() {
    let e = LayerMap::lckv(8, 1, 1)
        .unwrap()
        .require_downward("this engine")
        .unwrap_err();
    assert_eq!(
        e,
        Error::UpwardReference {
            layer: 1,
            source_layer: 6,
            context: "this engine"
        }
    );
}

#[test]
fn retention_override_for_a_layer_that_shares() {
    let e = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
        .group_retention(1, Retention::Full)
        .build()
        .unwrap_err();
    assert_eq!(e, Error::NotAnOwner { layer: 1 });
}
