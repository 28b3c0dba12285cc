//! Randomised invariant tests of the allocator stack: random policies (sharing maps stacked with
//! retentions) under random sequences of add / append / step (reserve, attention mass, retain or
//! rollback) / fork / free, checking after
//! every step that pages are conserved, refcounts equal the number of tables holding a page, no
//! page is written while shared, sharing layers hold no pages, and accounted bytes equal pages
//! held x page bytes. Plus a multi-threaded run through one shared cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use layerkv::{
    Budget, CacheConfig, Error, KvCache, LayerKvPolicy, LayerMap, PolicyBuilder, Retention, Step,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add,
    Append { seq: usize, n: usize },
    Evict { seq: usize },
    Fork { seq: usize },
    Free { seq: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Add),
        6 => (0..8usize, 1..12usize).prop_map(|(seq, n)| Op::Append { seq, n }),
        3 => (0..8usize).prop_map(|seq| Op::Evict { seq }),
        1 => (0..8usize).prop_map(|seq| Op::Fork { seq }),
        1 => (0..8usize).prop_map(|seq| Op::Free { seq }),
    ]
}

fn map(num_layers: usize, kind: u8, arg: usize) -> LayerMap {
    match kind % 5 {
        0 => LayerMap::identity(num_layers).unwrap(),
        1 => LayerMap::cla(num_layers, 1 + arg % 3).unwrap(),
        2 => LayerMap::mlkv(num_layers, 1 + arg % num_layers).unwrap(),
        3 => LayerMap::lckv(num_layers, 1, (arg % (num_layers - 1)).min(num_layers - 2)).unwrap(),
        _ => {
            // A KVSharer-like map: some layers read a lower layer.
            let pairs: BTreeMap<usize, usize> = (1..num_layers)
                .filter(|l| (l + arg) % 3 == 0)
                .map(|l| (l, (l * 7 + arg) % l))
                .collect();
            LayerMap::kvsharer(num_layers, &pairs).unwrap()
        }
    }
}

fn retention(kind: u8, a: usize, b: usize) -> Retention {
    match kind % 5 {
        0 => Retention::Full,
        1 => Retention::SinkWindow {
            sinks: a % 4,
            window: 4 + b % 20,
        },
        2 => Retention::HeavyHitter {
            heavy: Budget::Tokens(a % 10),
            recent: Budget::Tokens(1 + b % 10),
        },
        3 => Retention::SnapKv {
            observe: 2,
            budget: Budget::Tokens(3 + a % 10),
            pool: 3,
        },
        _ => Retention::Union {
            parts: vec![
                Retention::SinkWindow {
                    sinks: 1,
                    window: 2 + a % 6,
                },
                Retention::HeavyHitter {
                    heavy: Budget::Ratio(0.25),
                    recent: Budget::Tokens(1 + b % 4),
                },
            ],
        },
    }
}

fn check(cache: &KvCache, live: &[u64], tag: &str) -> Result<(), TestCaseError> {
    cache
        .check_invariants()
        .map_err(|e| TestCaseError::fail(format!("{tag}: {e}")))?;
    let stats = cache.pool_stats();
    prop_assert_eq!(
        stats.num_free + stats.num_used + stats.num_cached,
        stats.num_pages,
        "{}",
        tag
    );
    let map = cache.policy().layer_map().clone();
    let page_bytes = cache.config().page_bytes();
    let mut held = 0;
    for &seq in live {
        let m = cache.memory(seq).unwrap();
        for layer in 0..map.num_layers() {
            if !map.owns_kv(layer) {
                prop_assert_eq!(
                    m.bytes_per_layer[layer],
                    0,
                    "sharing layer {} holds bytes",
                    layer
                );
            }
        }
        prop_assert_eq!(
            m.total_bytes,
            m.pages_per_group.iter().sum::<usize>() * page_bytes
        );
        prop_assert_eq!(m.bytes_per_layer.iter().sum::<usize>(), m.total_bytes);
        held += m.pages_per_group.iter().sum::<usize>();
    }
    // Pages can be shared between forks, so held counts each holder; used pages never exceed it.
    prop_assert!(
        stats.num_used <= held,
        "{} used > {} held",
        stats.num_used,
        held
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(
        num_layers in 2..10usize,
        map_kind in any::<u8>(),
        map_arg in 0..16usize,
        ret_kind in any::<u8>(),
        ret_a in 0..16usize,
        ret_b in 0..16usize,
        block_size in prop::sample::select(vec![1usize, 2, 4, 16]),
        num_pages in 4..96usize,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let policy = PolicyBuilder::new(map(num_layers, map_kind, map_arg))
            .retention(retention(ret_kind, ret_a, ret_b))
            .build()
            .unwrap();
        let num_groups = policy.layer_map().num_groups();
        let config = CacheConfig { block_size, num_pages, bytes_per_token: 24, prefix_caching: caching, ..CacheConfig::default() };
        let cache = KvCache::new(Arc::new(policy), config).unwrap();
        let mut live: Vec<u64> = Vec::new();
        let mut next_id = 0u64;
        let mut step_buf = Step::new();
        let mut token = 0u32;
        for (step, op) in ops.into_iter().enumerate() {
            let tag = format!("step {step} {op:?}");
            match op {
                Op::Add => {
                    cache.add_sequence(next_id).unwrap();
                    live.push(next_id);
                    next_id += 1;
                }
                Op::Append { seq, n } if !live.is_empty() => {
                    let id = live[seq % live.len()];
                    let tokens: Vec<u32> = (0..n as u32).map(|i| (token + i) % 7).collect();
                    token += n as u32;
                    let before = (cache.pool_stats(), cache.memory(id).unwrap());
                    match cache.reserve(&[(id, &tokens)], &mut step_buf) {
                        Ok(reserved) => {
                            // Every written slot is on a page this table holds alone.
                            let r = cache.read();
                            for g in 0..num_groups {
                                prop_assert_eq!(reserved.slots(0, g).len(), n);
                                let t = r.table(id, g).unwrap();
                                for &s in reserved.slots(0, g) {
                                    let page = s / block_size as u32;
                                    prop_assert!(t.pages().contains(&page));
                                    let holders = live.iter().filter(|&&o| {
                                        r.table(o, g).unwrap().pages().contains(&page)
                                    }).count();
                                    prop_assert_eq!(holders, 1, "{}: page {} written while shared", tag, page);
                                }
                            }
                            drop(r);
                            reserved.retain().unwrap();
                        }
                        Err(Error::PoolExhausted { .. }) => {
                            prop_assert_eq!((cache.pool_stats(), cache.memory(id).unwrap()), before, "{}", tag);
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("{tag}: {e}"))),
                    }
                }
                Op::Evict { seq } if !live.is_empty() => {
                    // One protocol step: reserve a token, hand back attention mass, retain (or
                    // roll back every fourth time and check nothing changed).
                    let id = live[seq % live.len()];
                    let before = (cache.pool_stats(), cache.memory(id).unwrap(), cache.num_tokens(id).unwrap());
                    let mut reserved = match cache.reserve(&[(id, &[token % 7])], &mut step_buf) {
                        Ok(reserved) => reserved,
                        Err(Error::PoolExhausted { .. }) => {
                            prop_assert_eq!((cache.pool_stats(), cache.memory(id).unwrap(), cache.num_tokens(id).unwrap()), before, "{}", tag);
                            check(&cache, &live, &tag)?;
                            continue;
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("{tag}: {e}"))),
                    };
                    token += 1;
                    let fill = |buf: Option<&mut [f32]>, g: usize| {
                        for (i, m) in buf.into_iter().flatten().enumerate() {
                            *m = ((i * 31 + g * 7 + step) % 13) as f32;
                        }
                    };
                    for g in 0..num_groups {
                        fill(reserved.mass_mut(g), g);
                        fill(reserved.observed_mass_mut(g), g);
                    }
                    if step % 4 == 0 {
                        reserved.rollback().unwrap();
                        // Cached prefix pages the reserve recycled stay recycled (their contents
                        // are gone); everything held is as before.
                        let held = |s: layerkv::PoolStats| (s.num_used, s.num_free + s.num_cached);
                        let after = cache.pool_stats();
                        prop_assert_eq!(held(after), held(before.0), "{}: rollback", tag);
                        prop_assert_eq!((cache.memory(id).unwrap(), cache.num_tokens(id).unwrap()), (before.1.clone(), before.2), "{}: rollback", tag);
                    } else {
                        reserved.retain().unwrap();
                        // Kept tokens never exceed what the retention allows.
                        let n_tokens = cache.num_tokens(id).unwrap();
                        let r = cache.read();
                        for g in 0..num_groups {
                            let retention = cache.policy().retention(g);
                            if matches!(retention, Retention::SinkWindow { .. } | Retention::HeavyHitter { .. }) {
                                let t = r.table(id, g).unwrap();
                                let bound = retention.max_tokens(n_tokens);
                                prop_assert!(t.num_valid() <= bound, "{}: group {} keeps {} > {}", tag, g, t.num_valid(), bound);
                            }
                        }
                    }
                }
                Op::Fork { seq } if !live.is_empty() => {
                    let id = live[seq % live.len()];
                    cache.fork(id, next_id).unwrap();
                    live.push(next_id);
                    next_id += 1;
                }
                Op::Free { seq } if !live.is_empty() => {
                    let id = live.remove(seq % live.len());
                    cache.free(id).unwrap();
                    prop_assert_eq!(cache.free(id).unwrap_err(), Error::UnknownSequence(id));
                }
                _ => {}
            }
            check(&cache, &live, &tag)?;
        }
        for id in live.drain(..) {
            cache.free(id).unwrap();
        }
        let stats = cache.pool_stats();
        prop_assert_eq!(stats.num_used, 0, "pages leaked");
        prop_assert_eq!(stats.num_free + stats.num_cached, num_pages);
    }
}

#[test]
fn threads_share_one_cache_and_conserve_pages() {
    let policy = PolicyBuilder::new(LayerMap::cla(6, 2).unwrap())
        .retention(Retention::SinkWindow {
            sinks: 2,
            window: 30,
        })
        .build()
        .unwrap();
    let cache = Arc::new(
        KvCache::new(
            Arc::new(policy),
            CacheConfig {
                block_size: 4,
                num_pages: 400,
                bytes_per_token: 16,
                ..CacheConfig::default()
            },
        )
        .unwrap(),
    );
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let mut protocol = Step::new();
                let mut exhausted = 0;
                for round in 0..50u64 {
                    let id = t * 1000 + round;
                    cache.add_sequence(id).unwrap();
                    for step in 0..(20 + round % 40) {
                        match cache.reserve(&[(id, &[step as u32])], &mut protocol) {
                            Ok(reserved) => {
                                reserved.retain().unwrap();
                            }
                            Err(Error::PoolExhausted { .. }) => exhausted += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    if round % 2 == 0 {
                        cache.fork(id, id + 500).unwrap();
                        cache.free(id + 500).unwrap();
                    }
                    cache.free(id).unwrap();
                }
                exhausted
            })
        })
        .collect();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for h in handles {
        *seen.entry(h.join().unwrap()).or_default() += 1;
    }
    cache.check_invariants().unwrap();
    let stats = cache.pool_stats();
    assert_eq!(stats.num_used, 0);
    assert_eq!(stats.num_free + stats.num_cached, 400);
    assert_eq!(cache.num_sequences(), 0);
}
