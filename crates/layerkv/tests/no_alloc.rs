//! Zero-allocation checks of the hot paths (STYLE.md house rule 2), through a counting
//! `#[global_allocator]` that wraps `System`.
//!
//! Counting is per thread (const-initialised thread-locals, which never allocate themselves), so
//! the other tests of this binary running in parallel do not disturb a measurement. Every
//! `alloc`, `alloc_zeroed` and `realloc` made while the flag is on counts as one allocation;
//! `dealloc` is counted separately (a hot path that frees is dropping something it built).
//!
//! What is asserted, and why:
//! - [`BlockPool`]: `allocate`, `release`, `retain`, `lookup` (hit and miss) and `register`
//!   allocate nothing, ever, after construction (free-page and cached-page bookkeeping and the
//!   prefix map are sized at construction), including while the prefix map turns over at full
//!   occupancy (tombstones must be cleaned up in place, not by growing the table).
//! - a protocol step of one token under a policy that never evicts ([`KvCache::reserve`] +
//!   [`layerkv::Reservation::retain`] with a reused [`Step`]): a table's page list and
//!   validity bitset grow by `Vec` doubling, so a single append can reallocate. Exactly zero is
//!   asserted over a stretch of appends that crosses no capacity doubling (from 4097 tokens held
//!   to 8192, with 16-token pages: page lists stay within 257..=512 entries and bitsets within
//!   65..=128 words, the capacities doubling growth reached at 4097 tokens), and the amortised
//!   count is asserted from a fresh sequence: at most two `Vec`s per group reallocate, each at
//!   most `log2(n) + 1` times over `n` appends.
//! - a protocol step with `SinkWindow`: same
//!   stretch, exactly zero (the step's buffers, the keep bitsets and the compaction scratch are
//!   reused; the tables are renumbered as pages leave, so they stay window-sized).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use layerkv::{
    BlockPool, CacheConfig, KvCache, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention,
    Step,
};

/// Counts allocations of the current thread while [`ACTIVE`] is on.
struct Counting;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static DEALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn bump(counter: &'static std::thread::LocalKey<Cell<usize>>) {
    // `try_with`: allocations during thread teardown must not panic.
    if ACTIVE.try_with(Cell::get).unwrap_or(false) {
        let _ = counter.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every call forwards to `System` unchanged; the bookkeeping touches only
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump(&ALLOCS);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        bump(&DEALLOCS);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and deallocations made by `f` on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Count {
    allocs: usize,
    deallocs: usize,
}

const NONE: Count = Count {
    allocs: 0,
    deallocs: 0,
};

fn count<R>(f: impl FnOnce() -> R) -> (R, Count) {
    ALLOCS.with(|c| c.set(0));
    DEALLOCS.with(|c| c.set(0));
    ACTIVE.with(|a| a.set(true));
    let r = f();
    ACTIVE.with(|a| a.set(false));
    let counted = Count {
        allocs: ALLOCS.with(Cell::get),
        deallocs: DEALLOCS.with(Cell::get),
    };
    (r, counted)
}

#[test]
fn the_counter_sees_allocations() {
    let (v, c) = count(|| std::hint::black_box(vec![1u8; 10]));
    drop(v);
    assert_eq!(c.allocs, 1);
    let ((), c) = count(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(3))));
    assert_eq!(
        c,
        Count {
            allocs: 1,
            deallocs: 1
        }
    );
}

#[test]
fn pool_operations_allocate_nothing() {
    const PAGES: usize = 1024;
    let mut pool = BlockPool::new(PAGES).unwrap();
    let mut held = [0u32; 64];
    let mut next_hash = 1u64;
    let (ops, c) = count(|| {
        let mut ops = 0usize;
        for round in 0..2_000u64 {
            // A request takes 64 pages, forks (retain), drops the fork, and publishes its full
            // blocks for prefix reuse.
            for p in held.iter_mut() {
                *p = pool.allocate().unwrap();
            }
            for &p in &held {
                pool.retain(p).unwrap();
                pool.release(p).unwrap();
                pool.register(p, next_hash).unwrap();
                next_hash += 1;
            }
            ops += 64 * 4;
            // A later request finds the previous round's blocks by hash (hits, and misses for
            // hashes long evicted), then releases everything; pages become cached and are
            // evicted LRU by later allocations, which drops their hashes.
            for k in 0..64 {
                let hit = pool.lookup(next_hash - 1 - k);
                let miss = pool.lookup(round * 7 + 1);
                if let Some(page) = hit {
                    pool.release(page).unwrap();
                }
                if let Some(page) = miss {
                    pool.release(page).unwrap();
                }
            }
            for &p in &held {
                pool.release(p).unwrap();
            }
            ops += 64 * 4;
        }
        ops
    });
    assert!(ops >= 1_000_000);
    assert_eq!(
        c, NONE,
        "BlockPool hot path allocated over {ops} operations"
    );
    pool.check_invariants().unwrap();
    let stats = pool.stats();
    assert_eq!(stats.num_used, 0);
    assert!(stats.cache_evictions > 0 && stats.prefix_hits > 0 && stats.prefix_misses > 0);
}

#[test]
fn pool_prefix_map_churn_at_full_occupancy_allocates_nothing() {
    // Steady state of a serving engine with prefix caching: every page carries a hash, and each
    // allocation evicts the LRU cached page (removing its hash) before the new page registers
    // a fresh one, so the prefix map turns over at full occupancy.
    const PAGES: usize = 4096;
    let mut pool = BlockPool::new(PAGES).unwrap();
    let mut next_hash = 1u64;
    for _ in 0..PAGES {
        let p = pool.allocate().unwrap();
        pool.register(p, next_hash).unwrap();
        next_hash += 1;
    }
    for p in 0..PAGES as u32 {
        pool.release(p).unwrap();
    }
    assert_eq!(pool.stats().num_cached, PAGES);
    let ((), c) = count(|| {
        for _ in 0..200_000 {
            let p = pool.allocate().unwrap();
            pool.register(p, next_hash).unwrap();
            next_hash = next_hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            pool.release(p).unwrap();
        }
    });
    assert_eq!(
        c, NONE,
        "BlockPool::register allocated while the prefix map turned over at full occupancy"
    );
    pool.check_invariants().unwrap();
}

fn cache(policy: Policy, num_pages: usize) -> KvCache {
    KvCache::new(
        Arc::new(policy),
        CacheConfig {
            block_size: 16,
            num_pages,
            bytes_per_token: 2,
            ..CacheConfig::default()
        },
    )
    .unwrap()
}

/// Runs protocol steps of one token `from..to` on sequence 1 (reserve, then retain); returns
/// what they allocated.
fn decode_steps(c: &KvCache, step: &mut Step, from: u32, to: u32) -> Count {
    let ((), counted) = count(|| {
        for token in from..to {
            let reserved = c.reserve(&[(1, &[token])], step).unwrap();
            std::hint::black_box(reserved.slots(0, 0));
            reserved.retain().unwrap();
            std::hint::black_box(step.moves());
        }
    });
    counted
}

/// Tokens held after warm-up and at the end of the measured stretch: with 16-token pages, no
/// table `Vec` (nor the eviction's keep bitset) doubles in between.
const WARM: u32 = 4097;
const END: u32 = 8192;

#[test]
fn append_of_one_token_allocates_nothing_once_warm() {
    for policy in [
        Policy::identity(1).unwrap(),
        PolicyBuilder::new(LayerMap::cla(30, 2).unwrap())
            .build()
            .unwrap(),
    ] {
        let groups = policy.layer_map().num_groups();
        let c = cache(policy, 600 * groups);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        decode_steps(&c, &mut step, 0, WARM);
        let counted = decode_steps(&c, &mut step, WARM, END);
        assert_eq!(
            counted,
            NONE,
            "{} appends with {groups} groups allocated",
            END - WARM
        );
        c.check_invariants().unwrap();
    }
}

#[test]
fn append_allocations_are_amortised_logarithmic() {
    const N: u32 = 10_000;
    for policy in [
        Policy::identity(1).unwrap(),
        PolicyBuilder::new(LayerMap::cla(30, 2).unwrap())
            .build()
            .unwrap(),
    ] {
        let groups = policy.layer_map().num_groups();
        let c = cache(policy, 700 * groups);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        // The first step sizes the step's buffers (one slot list per group) and the tables.
        decode_steps(&c, &mut step, 0, 1);
        let counted = decode_steps(&c, &mut step, 1, N);
        // Per group: the page list and the validity bitset, each doubling at most
        // log2(N) + 1 times.
        let bound = groups * 2 * (N.ilog2() as usize + 1);
        assert!(
            counted.allocs <= bound,
            "{N} appends with {groups} groups made {} allocations (bound {bound})",
            counted.allocs
        );
        assert!(counted.deallocs <= counted.allocs);
    }
}

#[test]
fn sink_window_eviction_allocates_nothing_once_warm() {
    for (layers, stride) in [(1, 1), (30, 2)] {
        let policy = PolicyBuilder::new(LayerMap::cla(layers, stride).unwrap())
            .retention(Retention::SinkWindow {
                sinks: 4,
                window: 256,
            })
            .build()
            .unwrap();
        let groups = policy.layer_map().num_groups();
        let c = cache(policy, 64 * groups);
        c.add_sequence(1).unwrap();
        let mut step = Step::new();
        decode_steps(&c, &mut step, 0, WARM);
        let counted = decode_steps(&c, &mut step, WARM, END);
        assert_eq!(
            counted,
            NONE,
            "{} reserve + retain steps with {groups} groups allocated",
            END - WARM
        );
        // 4 sinks + 255 recent tokens: 17 pages dense, at most one more for the holes.
        assert!(c.pool_stats().num_used <= groups * 18);
        // The tables hold the window, not the 8192 tokens streamed by.
        let r = c.read();
        for g in 0..groups {
            let t = r.table(1, g).unwrap();
            assert_eq!(t.num_valid(), 4 + 255);
            assert!(t.num_slots() < 4 + 255 + 16, "{} slots", t.num_slots());
        }
        drop(r);
        c.check_invariants().unwrap();
    }
}

/// Lanes: a per-head policy with AdaKV's split, evicting every step (H2O, whose lanes decide
/// one by one), allocates nothing once warm: the joint decision gathers its lanes only where it
/// can run (shown failing, 61,425 allocations: one per group and step, when the lanes were
/// gathered every step).
#[test]
fn per_head_adakv_decode_allocates_nothing_once_warm() {
    use layerkv::Budget;
    let policy = PolicyBuilder::new(LayerMap::cla(30, 2).unwrap())
        .retention(Retention::HeavyHitter {
            heavy: Budget::Tokens(64),
            recent: Budget::Tokens(64),
        })
        .adaptive(0.2)
        .build()
        .unwrap();
    let lanes = 3;
    let groups = policy.layer_map().num_groups() * lanes;
    let c = KvCache::new(
        Arc::new(policy),
        CacheConfig {
            block_size: 16,
            num_pages: 600 * groups,
            bytes_per_token: 2,
            lanes,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    c.add_sequence(1).unwrap();
    let mut step = Step::new();
    decode_steps(&c, &mut step, 0, WARM);
    let counted = decode_steps(&c, &mut step, WARM, END);
    assert_eq!(
        counted,
        NONE,
        "{} decode steps with {groups} lanes allocated",
        END - WARM
    );
    c.check_invariants().unwrap();
}
