//! The bad-input table: each caller mistake is its own test and must come back as a typed error
//! that names what and where, with no state changed and no page leaked.

use std::sync::Arc;

use layerkv::{
    bits, BlockPool, CacheConfig, CustomRetention, Error, KvCache, LayerKvPolicy, LayerMap, Policy,
    PolicyBuilder, RetainInput, Retention, RetentionRule, ScoreNeed, SeqId, Step,
};

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

/// A pool of zero pages is a typed error at construction (not a cache on which every step
/// fails, and not a panic), and so is a budget that buys no page. Shown to fail with the
/// `num_pages == 0` check removed from `BlockPool::new` (the cache is built; its first reserve
/// is `PoolExhausted`).
#[test]
fn zero_pages() {
    let policy = || Arc::new(Policy::identity(2).unwrap());
    for config in [
        CacheConfig {
            num_pages: 0,
            ..CacheConfig::default()
        },
        // 16 tokens of 64 bytes per page: 1000 bytes buy none.
        CacheConfig::for_budget(16, 64, 1000),
    ] {
        assert_eq!(config.num_pages, 0);
        let e = KvCache::new(policy(), config).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig(m) if m.contains("got 0")),
            "{e}"
        );
    }
    assert!(matches!(
        BlockPool::new(0).unwrap_err(),
        Error::InvalidConfig(_)
    ));
}

/// A custom rule written against the public trait: keep the slots at even text positions, and
/// always the newest token.
#[derive(Debug)]
struct EvenPositions;

impl RetentionRule for EvenPositions {
    fn name(&self) -> String {
        "even-positions".into()
    }

    fn score_need(&self) -> ScoreNeed {
        ScoreNeed::NONE
    }

    fn select(
        &self,
        input: &RetainInput<'_>,
        keep: &mut [u64],
        _scratch: &mut Vec<u32>,
    ) -> layerkv::Result<()> {
        let newest = (0..input.num_slots)
            .rev()
            .find(|&s| bits::get(input.valid, s));
        for s in 0..input.num_slots {
            if input.positions[s].is_multiple_of(2) || Some(s) == newest {
                bits::set(keep, s);
            }
        }
        Ok(())
    }

    fn max_tokens(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(2) + 1
    }
}

/// A custom rule that refuses to decide once the sequence reaches `at` tokens.
#[derive(Debug)]
struct FailsAt {
    at: usize,
}

impl RetentionRule for FailsAt {
    fn name(&self) -> String {
        format!("fails-at-{}", self.at)
    }

    fn score_need(&self) -> ScoreNeed {
        ScoreNeed::NONE
    }

    fn select(
        &self,
        input: &RetainInput<'_>,
        keep: &mut [u64],
        _scratch: &mut Vec<u32>,
    ) -> layerkv::Result<()> {
        if input.num_tokens >= self.at {
            return Err(Error::InvalidRetention {
                retention: self.name(),
                reason: format!("{} tokens", input.num_tokens),
            });
        }
        keep.copy_from_slice(&input.valid[..keep.len()]);
        Ok(())
    }
}

fn kept_positions(c: &KvCache, seq: u64, group: usize) -> Vec<usize> {
    let r = c.read();
    let t = r.table(seq, group).unwrap();
    (0..t.num_slots())
        .filter(|&s| t.is_valid(s))
        .map(|s| t.position(s).unwrap())
        .collect()
}

/// `Retention::Custom` through the public `RetentionRule` trait: the cache calls it like a
/// built-in rule, in every group, with the text positions of the renumbered slots. Shown to
/// fail with `% 2 == 0` changed to `% 2 == 1` in the rule (the kept positions differ).
#[test]
fn custom_retention_keeps_what_it_selects() {
    let rule = Retention::Custom(CustomRetention(Arc::new(EvenPositions)));
    let policy = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
        .retention(rule)
        .build()
        .unwrap();
    assert_eq!(policy.retention(1).to_string(), "even-positions");
    let c = cache(policy, 32);
    c.add_sequence(1).unwrap();
    let mut step = Step::new();
    for t in 0..21u32 {
        c.reserve(&[(1, &[t])], &mut step)
            .unwrap()
            .retain()
            .unwrap();
        c.check_invariants().unwrap();
    }
    // Even positions 0..=20; 19 was the newest once and was dropped when 20 came.
    let even: Vec<usize> = (0..=20).step_by(2).collect();
    for g in 0..2 {
        assert_eq!(kept_positions(&c, 1, g), even, "group {g}");
    }
    // The table shrank with what it keeps: 11 tokens in 4-slot pages, at most one page of
    // holes (the compaction bound).
    assert!(c.memory(1).unwrap().pages_per_group.iter().all(|&p| p <= 4));
}

/// A custom rule's error comes back from `retain` as it is, and the failed retain rolls the
/// step back (the reservation is dropped). Shown to fail with the rule's error ignored in
/// `retain` (`let _ =` for `?`: the retain succeeds and evicts).
#[test]
fn custom_retention_errors_leave_the_step_to_roll_back() {
    let rule = Retention::Custom(CustomRetention(Arc::new(FailsAt { at: 6 })));
    let policy = PolicyBuilder::new(LayerMap::identity(1).unwrap())
        .retention(rule)
        .build()
        .unwrap();
    let c = cache(policy, 8);
    c.add_sequence(1).unwrap();
    let mut step = Step::new();
    c.reserve(&[(1, &[1, 2, 3, 4, 5])], &mut step)
        .unwrap()
        .retain()
        .unwrap();
    let before = (
        c.pool_stats(),
        c.memory(1).unwrap(),
        c.read().table(1, 0).unwrap().clone(),
    );
    let reserved = c.reserve(&[(1, &[6])], &mut step).unwrap();
    let e = reserved.retain().unwrap_err();
    assert!(
        matches!(&e, Error::InvalidRetention { retention, .. } if retention == "fails-at-6"),
        "{e}"
    );
    assert_eq!(c.pool_stats(), before.0);
    assert_eq!(c.memory(1).unwrap(), before.1);
    assert_eq!(c.read().table(1, 0).unwrap().pages(), before.2.pages());
    assert_eq!(kept_positions(&c, 1, 0), vec![0, 1, 2, 3, 4]);
    assert_eq!(c.num_tokens(1).unwrap(), 5);
    c.check_invariants().unwrap();
}

fn prefix_cache(retention: Retention, model_window: Option<usize>, caching: bool) -> KvCache {
    let policy = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
        .retention(retention)
        .build()
        .unwrap();
    let config = CacheConfig {
        block_size: 4,
        num_pages: 64,
        bytes_per_token: 8,
        prefix_caching: caching,
        model_window,
        ..CacheConfig::default()
    };
    KvCache::new(Arc::new(policy), config).unwrap()
}

/// Pages in use after two sequences with the same 14-token prompt, each added through a prefix
/// lookup and stepped (reserve + retain) over the part not found; and what the second lookup
/// reused.
fn two_sequences_with_one_prompt(c: &KvCache) -> (usize, usize, usize) {
    let prompt: Vec<u32> = (100..114).collect();
    let mut step = Step::new();
    let mut reused = Vec::new();
    for seq in [1, 2] {
        let r = c.add_sequence_with_prefix(seq, &prompt).unwrap();
        c.reserve(&[(seq, &prompt[r..])], &mut step)
            .unwrap()
            .retain()
            .unwrap();
        reused.push(r);
    }
    c.check_invariants().unwrap();
    assert_eq!(reused[0], 0, "nothing to find for the first sequence");
    (
        c.pool_stats().num_used,
        reused[1],
        c.pool_stats().prefix_hits as usize,
    )
}

/// Prefix caching is only on for policies that never evict: asked for with an evicting
/// retention or a window, it switches itself off (a block's KV would depend on more than its
/// prefix); with full retention it is on and the second sequence reuses the first one's full
/// blocks. Shown to fail with `BlockPool::lookup` always missing (no page reused, 2 x 8 pages
/// used) and with the cache's `caching` flag ignoring `evicts` (an evicting policy reports
/// prefix caching on).
#[test]
fn prefix_caching_is_on_only_for_policies_that_never_evict() {
    let streaming = Retention::SinkWindow {
        sinks: 1,
        window: 8,
    };
    assert!(!prefix_cache(streaming.clone(), None, true).prefix_caching());
    assert!(!prefix_cache(Retention::Full, Some(8), true).prefix_caching());
    assert!(!prefix_cache(Retention::Full, None, false).prefix_caching());
    let on = prefix_cache(Retention::Full, None, true);
    assert!(on.prefix_caching());

    // 14 tokens in 4-slot pages: 4 pages a group, 2 groups. The second sequence finds the 3
    // full blocks (12 tokens, 6 pages) and takes 2 new pages for the last 2 tokens.
    let (used, reused, hits) = two_sequences_with_one_prompt(&on);
    assert_eq!((reused, hits), (12, 6));
    assert_eq!(used, 8 + 2);
    // Without prefix caching the same two sequences hold twice the pages of one.
    let off = prefix_cache(Retention::Full, None, false);
    assert_eq!(two_sequences_with_one_prompt(&off), (2 * 8, 0, 0));
    // And an evicting policy that asked for it reuses nothing either.
    let evicting = prefix_cache(Retention::Full, Some(64), true);
    assert_eq!(two_sequences_with_one_prompt(&evicting), (2 * 8, 0, 0));
}

#[test]
fn lanes_that_do_not_fit_the_policy() {
    let config = |lanes| CacheConfig {
        block_size: 4,
        num_pages: 8,
        bytes_per_token: 8,
        lanes,
        ..CacheConfig::default()
    };
    let group = Arc::new(Policy::identity(2).unwrap());
    let e = KvCache::new(group.clone(), config(0)).unwrap_err();
    assert!(e.to_string().contains("lanes must be positive"), "{e}");
    // Lanes are for per-head policies: a per-group policy's tokens are one set per group.
    let e = KvCache::new(group, config(2)).unwrap_err();
    assert!(e.to_string().contains("2 lanes per group"), "{e}");
    let head = Policy::from_spec("identity+h2o:2:2+per-head", 2).unwrap();
    let c = KvCache::new(Arc::new(head), config(3)).unwrap();
    assert_eq!((c.lanes(), c.num_groups(), c.lane(1, 2)), (3, 6, 5));
    // A role for a head the model does not have.
    let roles = PolicyBuilder::new(LayerMap::identity(2).unwrap())
        .lane_retention(1, 4, Retention::Full)
        .build()
        .unwrap();
    let e = KvCache::new(Arc::new(roles), config(3)).unwrap_err();
    assert!(e.to_string().contains("KV head 4"), "{e}");
    // An unknown lane is an unknown group, named with the lane count.
    c.add_sequence(0).unwrap();
    let e = c.read().table(0, 6).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnknownGroup {
                group: 6,
                num_groups: 6
            }
        ),
        "{e}"
    );
}

#[test]
fn adaptive_floor_out_of_range() {
    let text = r#"
        per_head = true
        adaptive_floor = 1.5
        [layer_map]
        num_layers = 2
        kv_source = [0, 1]
    "#;
    let e = Policy::parse(text, "toml").unwrap_err();
    assert!(
        e.to_string().contains("adaptive_floor must be in [0, 1]"),
        "{e}"
    );
    let e = Policy::from_spec("identity+snapkv:8+adakv:-1", 2).unwrap_err();
    assert!(e.to_string().contains("not a floor"), "{e}");
}

/// `adopt_prompt` (a prompt prefilled layer-major outside the cache): every caller mistake is
/// a typed error naming it, with the cache unchanged; a pool too small for the kept slots is
/// `PoolExhausted` with nothing taken; a policy that is not KVzip deciding at the prompt's end
/// is refused. The good call keeps each lane's top-scored positions and the last token.
#[test]
fn adopt_prompt_rejects_bad_input_and_changes_nothing() {
    let kvzip = Retention::KvZip {
        budget: layerkv::Budget::Tokens(3),
        chunk: 4,
        pool: 1,
        prefill: false,
    };
    let policy = PolicyBuilder::new(LayerMap::identity(2).unwrap())
        .retention(kvzip.clone())
        .build()
        .unwrap();
    let c = cache(policy.clone(), 16);
    c.add_sequence(1).unwrap();
    let n = 6;
    let good: Vec<Vec<f32>> = (0..2)
        .map(|g| {
            let mut s: Vec<f32> = (0..n - 1).map(|x| ((x * 7 + g * 3) % 5) as f32).collect();
            s.push(f32::INFINITY);
            s
        })
        .collect();
    let before = c.snapshot();
    let bad = |scores: &[Vec<f32>], seq: SeqId, len: usize, what: &str| {
        let e = c.adopt_prompt(seq, len, scores).unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert_eq!(c.snapshot(), before, "{what}");
    };
    bad(&good[..1], 1, n, "1 score vectors for 2 allocator groups");
    bad(
        &good,
        1,
        n - 1,
        "group 0 has 6 scores for a prompt of 5 tokens",
    );
    bad(&good, 1, 0, "an empty prompt");
    bad(&good, 9, n, "9");
    let mut nan = good.clone();
    nan[1][2] = f32::NAN;
    bad(&nan, 1, n, "group 1's score of token 2 is NaN");
    c.set_prompt_len(1, n + 2).unwrap();
    let before = c.snapshot();
    let e = c.adopt_prompt(1, n, &good).unwrap_err();
    assert!(
        e.to_string().contains("declared a prompt of 8 tokens"),
        "{e}"
    );
    assert_eq!(c.snapshot(), before);
    // Too few pages: 2 groups x 1 page needed, 1 free.
    let small = cache(policy, 1);
    small.add_sequence(1).unwrap();
    let e = small.adopt_prompt(1, n, &good).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PoolExhausted {
                requested: 2,
                available: 1
            }
        ),
        "{e}"
    );
    assert_eq!(small.pool_stats().num_used, 0);
    assert_eq!(small.num_tokens(1).unwrap(), 0);
    // The good call.
    let c = cache(
        PolicyBuilder::new(LayerMap::identity(2).unwrap())
            .retention(kvzip)
            .build()
            .unwrap(),
        16,
    );
    c.add_sequence(1).unwrap();
    let kept = c.adopt_prompt(1, n, &good).unwrap();
    for (g, k) in kept.iter().enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| good[g][b].total_cmp(&good[g][a]).then(a.cmp(&b)));
        let mut want: Vec<u32> = order[..3].iter().map(|&x| x as u32).collect();
        want.sort_unstable();
        assert_eq!(k, &want, "group {g}");
        let r = c.read();
        let t = r.table(1, g).unwrap();
        let positions: Vec<usize> = (0..t.num_slots()).map(|s| t.position(s).unwrap()).collect();
        assert_eq!(
            positions,
            want.iter().map(|&p| p as usize).collect::<Vec<_>>()
        );
    }
    assert_eq!(c.num_tokens(1).unwrap(), n);
    assert_eq!(c.pool_stats().num_used, 2);
    c.check_invariants().unwrap();
    let e = c.adopt_prompt(1, n, &good).unwrap_err();
    assert!(e.to_string().contains("already holds 6 tokens"), "{e}");
    // Not KVzip deciding at the prompt's end.
    let stream = cache(
        PolicyBuilder::new(LayerMap::identity(2).unwrap())
            .retention(Retention::streaming(4))
            .build()
            .unwrap(),
        16,
    );
    stream.add_sequence(1).unwrap();
    let e = stream.adopt_prompt(1, n, &good).unwrap_err();
    assert!(e.to_string().contains("only KVzip deciding"), "{e}");
    assert_eq!(stream.pool_stats().num_used, 0);
}
