//! Allocator microbenchmark on a serving-like trace, three allocators side by side:
//! - `layerkv`: `KvCache` (block tables + cross-layer `BlockPool`), identity policy (1 group) and
//!   a 30-layer CLA-2 policy (15 groups) to show the cost of cross-layer tables;
//! - `hashmap`: a straightforward baseline, `HashMap<u64, Vec<u32>>` page lists + a free stack;
//! - `mistralrs`: mistral.rs 0.8.1's own `BlockPool` (compiled unchanged from the registry
//!   source) with per-sequence block lists, used the way its KV-cache manager uses it.
//!
//! The trace: 256 live sequences, prompts of 64..1024 tokens appended at once, then token-by-token
//! decode for 32..512 steps round-robin, 10% of new sequences forked from a live one (parallel
//! sampling, copy-on-write of the shared tail page), finished sequences freed and replaced. Every
//! allocator computes the physical slot of every token. `cargo bench --bench allocator` prints
//! ns/token and ns/op with ratios; under `cargo test` the trace runs once, small, and the three
//! allocators must end with the same number of pages in use.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use layerkv::{CacheConfig, KvCache, LayerMap, Policy, PolicyBuilder, Step};
use mistralrs_block_pool::paged_attention::block_pool::BlockPool as MistralPool;

const BLOCK: usize = 16;

/// One operation of the trace.
#[derive(Clone, Copy, Debug)]
enum Op {
    Add(u64),
    Append(u64, u32),
    Fork(u64, u64),
    Free(u64),
}

struct Trace {
    ops: Vec<Op>,
    tokens: usize,
}

fn trace(live: usize, total_tokens: usize, seed: u64) -> Trace {
    let mut s = seed | 1;
    let mut rnd = move |n: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % n
    };
    let mut ops = Vec::new();
    let mut next_id = 0u64;
    // (id, decode steps left)
    let mut seqs: Vec<(u64, u64)> = Vec::new();
    let mut tokens = 0usize;
    let mut start = |seqs: &mut Vec<(u64, u64)>,
                     ops: &mut Vec<Op>,
                     rnd: &mut dyn FnMut(u64) -> u64,
                     tokens: &mut usize| {
        let id = next_id;
        next_id += 1;
        if !seqs.is_empty() && rnd(10) == 0 {
            let parent = seqs[rnd(seqs.len() as u64) as usize].0;
            ops.push(Op::Fork(parent, id));
        } else {
            let prompt = 64 + rnd(961) as u32;
            ops.push(Op::Add(id));
            ops.push(Op::Append(id, prompt));
            *tokens += prompt as usize;
        }
        seqs.push((id, 32 + rnd(481)));
    };
    for _ in 0..live {
        start(&mut seqs, &mut ops, &mut rnd, &mut tokens);
    }
    while tokens < total_tokens {
        let mut i = 0;
        while i < seqs.len() {
            let (id, left) = seqs[i];
            ops.push(Op::Append(id, 1));
            tokens += 1;
            if left == 1 {
                ops.push(Op::Free(id));
                seqs.swap_remove(i);
                start(&mut seqs, &mut ops, &mut rnd, &mut tokens);
            } else {
                seqs[i].1 -= 1;
                i += 1;
            }
        }
    }
    for (id, _) in seqs {
        ops.push(Op::Free(id));
    }
    Trace { ops, tokens }
}

/// The allocator interface the trace drives; `pages_in_use` checks the three agree.
trait Allocator {
    fn run(&mut self, op: Op);
    fn pages_in_use(&self) -> usize;
}

struct Ours {
    cache: KvCache,
    step: Step,
    tokens: Vec<u32>,
}

impl Ours {
    fn new(policy: Policy, num_pages: usize) -> Self {
        let config = CacheConfig {
            block_size: BLOCK,
            num_pages,
            bytes_per_token: 1,
            ..CacheConfig::default()
        };
        Self {
            cache: KvCache::new(Arc::new(policy), config).unwrap(),
            step: Step::new(),
            tokens: vec![0; 1024],
        }
    }
}

impl Allocator for Ours {
    fn run(&mut self, op: Op) {
        match op {
            Op::Add(id) => self.cache.add_sequence(id).unwrap(),
            Op::Append(id, n) => {
                let reserved = self
                    .cache
                    .reserve(&[(id, &self.tokens[..n as usize])], &mut self.step)
                    .unwrap();
                black_box(reserved.group_slots(0));
                reserved.retain().unwrap();
            }
            Op::Fork(p, c) => self.cache.fork(p, c).unwrap(),
            Op::Free(id) => self.cache.free(id).unwrap(),
        }
    }
    fn pages_in_use(&self) -> usize {
        self.cache.pool_stats().num_used
    }
}

/// The straightforward baseline: page lists in a HashMap, refcounts in a Vec, a free stack.
struct Naive {
    tables: HashMap<u64, (Vec<u32>, usize)>,
    refs: Vec<u32>,
    free: Vec<u32>,
    slots: Vec<u32>,
}

impl Naive {
    fn new(num_pages: usize) -> Self {
        Self {
            tables: HashMap::new(),
            refs: vec![0; num_pages],
            free: (0..num_pages as u32).rev().collect(),
            slots: Vec::new(),
        }
    }
}

fn take(free: &mut Vec<u32>, refs: &mut [u32]) -> u32 {
    let p = free.pop().expect("pool exhausted");
    refs[p as usize] = 1;
    p
}

fn release(free: &mut Vec<u32>, refs: &mut [u32], p: u32) {
    refs[p as usize] -= 1;
    if refs[p as usize] == 0 {
        free.push(p);
    }
}

impl Allocator for Naive {
    fn run(&mut self, op: Op) {
        let Self {
            tables,
            refs,
            free,
            slots,
        } = self;
        match op {
            Op::Add(id) => {
                tables.insert(id, (Vec::new(), 0));
            }
            Op::Append(id, n) => {
                let (pages, len) = tables.get_mut(&id).unwrap();
                slots.clear();
                if *len % BLOCK != 0 && refs[*pages.last().unwrap() as usize] > 1 {
                    let old = pages.pop().unwrap();
                    let new = take(free, refs);
                    release(free, refs, old);
                    pages.push(new);
                }
                for _ in 0..n {
                    if *len % BLOCK == 0 {
                        pages.push(take(free, refs));
                    }
                    slots.push(pages[*len / BLOCK] * BLOCK as u32 + (*len % BLOCK) as u32);
                    *len += 1;
                }
                black_box(&*slots);
            }
            Op::Fork(p, c) => {
                let t = tables[&p].clone();
                for &page in &t.0 {
                    refs[page as usize] += 1;
                }
                tables.insert(c, t);
            }
            Op::Free(id) => {
                let (pages, _) = tables.remove(&id).unwrap();
                for p in pages {
                    release(free, refs, p);
                }
            }
        }
    }
    fn pages_in_use(&self) -> usize {
        self.refs.len() - self.free.len()
    }
}

/// mistral.rs's BlockPool with block lists per sequence, as its KV-cache manager drives it:
/// `get_new_blocks` for new pages, `touch` to share on fork, `free_blocks` (reversed) on free.
struct Mistral {
    pool: MistralPool,
    tables: HashMap<u64, (Vec<usize>, usize)>,
    slots: Vec<usize>,
}

impl Mistral {
    fn new(num_pages: usize) -> Self {
        // +1: mistral.rs reserves block 0 as its null block.
        Self {
            pool: MistralPool::new(num_pages + 1, false, BLOCK),
            tables: HashMap::new(),
            slots: Vec::new(),
        }
    }
}

impl Allocator for Mistral {
    fn run(&mut self, op: Op) {
        let Self {
            pool,
            tables,
            slots,
        } = self;
        match op {
            Op::Add(id) => {
                tables.insert(id, (Vec::new(), 0));
            }
            Op::Append(id, n) => {
                let (blocks, len) = tables.get_mut(&id).unwrap();
                slots.clear();
                if *len % BLOCK != 0 && pool.block_ref_cnt(*blocks.last().unwrap()) > 1 {
                    let old = blocks.pop().unwrap();
                    let new = pool.get_new_blocks(1).expect("pool exhausted");
                    pool.free_blocks(&[old]);
                    blocks.extend(new);
                }
                let need = (*len + n as usize).div_ceil(BLOCK) - blocks.len();
                if need > 0 {
                    blocks.extend(pool.get_new_blocks(need).expect("pool exhausted"));
                }
                for _ in 0..n {
                    slots.push(blocks[*len / BLOCK] * BLOCK + *len % BLOCK);
                    *len += 1;
                }
                black_box(&*slots);
            }
            Op::Fork(p, c) => {
                let t = tables[&p].clone();
                pool.touch(&t.0);
                tables.insert(c, t);
            }
            Op::Free(id) => {
                let (mut blocks, _) = tables.remove(&id).unwrap();
                blocks.reverse();
                pool.free_blocks(&blocks);
            }
        }
    }
    fn pages_in_use(&self) -> usize {
        self.pool.num_gpu_blocks() - self.pool.num_free_blocks() - 1
    }
}

const NUM_PAGES: usize = 64 * 1024;

/// The same trace reduced to page operations (what reaches a block pool): allocate `count`
/// pages into consecutive handles, release or retain the pages of a run of handles.
#[derive(Clone, Copy)]
enum PoolOp {
    Alloc { first: u32, count: u32 },
    Release { start: u32, len: u32 },
    Retain { start: u32, len: u32 },
}

struct PoolTrace {
    ops: Vec<PoolOp>,
    lists: Vec<u32>,
    num_handles: usize,
    num_pages_ops: usize,
}

fn pool_trace(t: &Trace) -> PoolTrace {
    let mut tables: HashMap<u64, (Vec<u32>, usize)> = HashMap::new();
    let mut refs: Vec<u32> = Vec::new();
    let (mut ops, mut lists) = (Vec::new(), Vec::new());
    let mut next = 0u32;
    let mut page_ops = 0;
    for &op in &t.ops {
        match op {
            Op::Add(id) => {
                tables.insert(id, (Vec::new(), 0));
            }
            Op::Append(id, n) => {
                let (h, len) = tables.get_mut(&id).unwrap();
                if *len % BLOCK != 0 && refs[*h.last().unwrap() as usize] > 1 {
                    let old = h.pop().unwrap();
                    ops.push(PoolOp::Alloc {
                        first: next,
                        count: 1,
                    });
                    refs.push(1);
                    h.push(next);
                    next += 1;
                    let start = lists.len() as u32;
                    lists.push(old);
                    refs[old as usize] -= 1;
                    ops.push(PoolOp::Release { start, len: 1 });
                    page_ops += 2;
                }
                let need = (*len + n as usize).div_ceil(BLOCK) - h.len();
                if need > 0 {
                    ops.push(PoolOp::Alloc {
                        first: next,
                        count: need as u32,
                    });
                    refs.resize(refs.len() + need, 1);
                    h.extend(next..next + need as u32);
                    next += need as u32;
                    page_ops += need;
                }
                *len += n as usize;
            }
            Op::Fork(p, c) => {
                let t = tables[&p].clone();
                let start = lists.len() as u32;
                for &x in &t.0 {
                    lists.push(x);
                    refs[x as usize] += 1;
                }
                ops.push(PoolOp::Retain {
                    start,
                    len: t.0.len() as u32,
                });
                page_ops += t.0.len();
                tables.insert(c, t);
            }
            Op::Free(id) => {
                let (h, _) = tables.remove(&id).unwrap();
                let start = lists.len() as u32;
                for &x in h.iter().rev() {
                    lists.push(x);
                    refs[x as usize] -= 1;
                }
                ops.push(PoolOp::Release {
                    start,
                    len: h.len() as u32,
                });
                page_ops += h.len();
            }
        }
    }
    PoolTrace {
        ops,
        lists,
        num_handles: next as usize,
        num_pages_ops: page_ops,
    }
}

/// Runs the page-operation trace on layerkv's `BlockPool` (one page per call, no allocation).
fn run_pool_ours(t: &PoolTrace) -> f64 {
    let mut pool = layerkv::BlockPool::new(NUM_PAGES).unwrap();
    let mut pages = vec![0u32; t.num_handles];
    let t0 = Instant::now();
    for &op in &t.ops {
        match op {
            PoolOp::Alloc { first, count } => {
                for h in first..first + count {
                    pages[h as usize] = pool.allocate().unwrap();
                }
            }
            PoolOp::Release { start, len } => {
                for &h in &t.lists[start as usize..(start + len) as usize] {
                    pool.release(pages[h as usize]).unwrap();
                }
            }
            PoolOp::Retain { start, len } => {
                for &h in &t.lists[start as usize..(start + len) as usize] {
                    pool.retain(pages[h as usize]).unwrap();
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(pool.stats().num_used, 0);
    secs
}

/// The same page-operation trace on mistral.rs's `BlockPool`, through its batch API
/// (`get_new_blocks(count)`, `free_blocks(ids)`, `touch(ids)`).
fn run_pool_mistral(t: &PoolTrace) -> f64 {
    let mut pool = MistralPool::new(NUM_PAGES + 1, false, BLOCK);
    let mut pages = vec![0usize; t.num_handles];
    let mut ids: Vec<usize> = Vec::with_capacity(4096);
    let t0 = Instant::now();
    for &op in &t.ops {
        match op {
            PoolOp::Alloc { first, count } => {
                let got = pool.get_new_blocks(count as usize).unwrap();
                pages[first as usize..(first + count) as usize].copy_from_slice(&got);
            }
            PoolOp::Release { start, len } => {
                ids.clear();
                ids.extend(
                    t.lists[start as usize..(start + len) as usize]
                        .iter()
                        .map(|&h| pages[h as usize]),
                );
                pool.free_blocks(&ids);
            }
            PoolOp::Retain { start, len } => {
                ids.clear();
                ids.extend(
                    t.lists[start as usize..(start + len) as usize]
                        .iter()
                        .map(|&h| pages[h as usize]),
                );
                pool.touch(&ids);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(pool.num_free_blocks(), NUM_PAGES);
    secs
}

fn make(name: &str) -> Box<dyn Allocator> {
    match name {
        "layerkv" => Box::new(Ours::new(Policy::identity(1).unwrap(), NUM_PAGES)),
        "layerkv-cla2-30l" => Box::new(Ours::new(
            PolicyBuilder::new(LayerMap::cla(30, 2).unwrap())
                .build()
                .unwrap(),
            NUM_PAGES * 15,
        )),
        "hashmap" => Box::new(Naive::new(NUM_PAGES)),
        "mistralrs" => Box::new(Mistral::new(NUM_PAGES)),
        _ => unreachable!(),
    }
}

fn run_trace(name: &str, t: &Trace) -> (f64, usize) {
    let mut a = make(name);
    let t0 = Instant::now();
    for &op in &t.ops {
        a.run(op);
    }
    let secs = t0.elapsed().as_secs_f64();
    (secs, a.pages_in_use())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let names = ["layerkv", "hashmap", "mistralrs", "layerkv-cla2-30l"];
    if !bench {
        // Test mode: one small trace; all allocators must agree and end empty.
        let t = trace(32, 20_000, 7);
        let mut mid = Vec::new();
        for name in ["layerkv", "hashmap", "mistralrs", "layerkv-cla2-30l"] {
            let mut a = make(name);
            for (i, &op) in t.ops.iter().enumerate() {
                a.run(op);
                if i == t.ops.len() / 2 {
                    mid.push(a.pages_in_use());
                }
            }
            assert_eq!(a.pages_in_use(), 0, "{name} leaked pages");
        }
        assert_eq!(
            mid[0], mid[1],
            "layerkv and the baseline disagree on pages in use"
        );
        assert_eq!(
            mid[0], mid[2],
            "layerkv and mistral.rs disagree on pages in use"
        );
        assert_eq!(mid[3], mid[0] * 15, "15 groups hold 15x the pages");
        let pt = pool_trace(&t);
        run_pool_ours(&pt);
        run_pool_mistral(&pt);
        println!("allocator trace check: 1 passed, 0 failed");
        return;
    }
    let t = trace(256, 400_000, 42);
    let num_ops = t.ops.len();
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let mut group = c.benchmark_group("allocator-trace");
    for name in names {
        group.bench_function(name, |b| b.iter(|| run_trace(name, &t)));
    }
    let pt = pool_trace(&t);
    group.bench_function("pool-ops/layerkv", |b| b.iter(|| run_pool_ours(&pt)));
    group.bench_function("pool-ops/mistralrs", |b| b.iter(|| run_pool_mistral(&pt)));
    group.finish();
    // Summary: median of 7 runs each, same trace, same process.
    let mut med = HashMap::new();
    for name in names {
        let mut v: Vec<f64> = (0..7).map(|_| run_trace(name, &t).0).collect();
        v.sort_by(f64::total_cmp);
        med.insert(name, v[3]);
    }
    let median = |f: &dyn Fn() -> f64| {
        let mut v: Vec<f64> = (0..7).map(|_| f()).collect();
        v.sort_by(f64::total_cmp);
        v[3]
    };
    let ours_pool = median(&|| run_pool_ours(&pt));
    let mistral_pool = median(&|| run_pool_mistral(&pt));
    println!(
        "\npool operations only ({} page ops in {} calls), same trace:",
        pt.num_pages_ops,
        pt.ops.len()
    );
    println!(
        "{:<18} {:>10} {:>11} {:>16}",
        "pool", "ns/token", "ns/page-op", "vs layerkv"
    );
    for (name, secs) in [("layerkv", ours_pool), ("mistralrs", mistral_pool)] {
        println!(
            "{:<18} {:>10.2} {:>11.2} {:>15.2}x",
            name,
            secs * 1e9 / t.tokens as f64,
            secs * 1e9 / pt.num_pages_ops as f64,
            secs / ours_pool
        );
    }
    println!(
        "\nfull manager (block tables + pool + slot mapping), trace: {} ops, {} tokens, block size {BLOCK}",
        num_ops, t.tokens
    );
    println!(
        "{:<18} {:>10} {:>10} {:>16}",
        "allocator", "ns/token", "ns/op", "vs layerkv"
    );
    for name in names {
        let s = med[name];
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>15.2}x",
            name,
            s * 1e9 / t.tokens as f64,
            s * 1e9 / num_ops as f64,
            s / med["layerkv"]
        );
    }
}
