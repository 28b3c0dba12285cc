//! A warmed-up CPU attention call allocates its output and nothing that grows with the work:
//! counted on every thread (rayon's workers included) by a counting `#[global_allocator]`.
//!
//! This binary holds a single test, so nothing else runs while a call is measured. Each case
//! counts the least of five calls: rayon's job queues allocate now and then on their own (a new
//! block of the global injector every 63 jobs sent in from outside the pool, deque growth),
//! amortised over calls and not ours to remove. What a call
//! may allocate: the output tensor (its buffer, candle's `Arc`ed storage, shape and strides)
//! and, for f16/bf16 queries, the f32 copy of the queries and the output's conversion back.
//! What it must not: anything per token, per page, per work item or per sequence (the split
//! plan, the partials and the score scratch are thread-local and reused). So the count must be
//! the same for a short and a long context and for one and eight sequences, and the bytes must
//! stay within the output's few copies.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use candle_core::{DType, Device, Tensor};
use layerkv::TableView;
use layerkv_kernels::{paged_attention, AttentionParams, KvStore, KvType, KvTypes, SeqQuery};

struct Counting;

static ACTIVE: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

fn bump(size: usize) {
    if ACTIVE.load(Relaxed) {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size, Relaxed);
    }
}

// SAFETY: every call forwards to `System` unchanged; the bookkeeping is three atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One batch: `batch` sequences of `ctx` cached tokens, each with `num_q` new query rows.
struct Case {
    store: KvStore,
    tables: Vec<Vec<u32>>,
    q: Tensor,
    ctx: usize,
    num_q: usize,
}

const BLOCK: usize = 16;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;

/// Pages of `kv`, queries of `dtype`.
fn case(kv: KvType, dtype: DType, batch: usize, ctx: usize, num_q: usize) -> Case {
    let dev = Device::Cpu;
    let pages = ctx.div_ceil(BLOCK);
    let types = KvTypes::both(kv);
    let mut store =
        KvStore::with_types(pages * batch, BLOCK, KV_HEADS, HEAD_DIM, types, &dev).unwrap();
    // Sequences' pages interleave, as a shared pool hands them out.
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| (0..pages).map(|p| (p * batch + b) as u32).collect())
        .collect();
    let slots: Vec<u32> = tables
        .iter()
        .flat_map(|t| (0..ctx).map(|s| t[s / BLOCK] * BLOCK as u32 + (s % BLOCK) as u32))
        .collect();
    let k = Tensor::randn(0f32, 1.0, (slots.len(), KV_HEADS, HEAD_DIM), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (slots.len(), KV_HEADS, HEAD_DIM), &dev).unwrap();
    store.write(&slots, &k, &v).unwrap();
    let q = Tensor::randn(0f32, 1.0, (batch * num_q, HEADS, HEAD_DIM), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Case {
        store,
        tables,
        q,
        ctx,
        num_q,
    }
}

/// Allocations and bytes of the cheapest of five calls, after three warm-up calls.
fn measure(c: &Case) -> (usize, usize) {
    let seqs: Vec<SeqQuery<'_>> = c
        .tables
        .iter()
        .enumerate()
        .map(|(b, t)| SeqQuery {
            kv: TableView {
                pages: t,
                num_slots: c.ctx,
                valid: None,
            },
            q_start: b * c.num_q,
            num_q: c.num_q,
            first_slot: c.ctx - c.num_q,
        })
        .collect();
    let params = AttentionParams {
        scale: 0.125,
        window: None,
        include_diagonal: true,
    };
    let call = || paged_attention(&c.q, &c.store, &seqs, &params, None).unwrap();
    for _ in 0..3 {
        drop(call());
    }
    (0..5)
        .map(|_| {
            ALLOCS.store(0, Relaxed);
            BYTES.store(0, Relaxed);
            ACTIVE.store(true, Relaxed);
            let out = call();
            ACTIVE.store(false, Relaxed);
            drop(out);
            (ALLOCS.load(Relaxed), BYTES.load(Relaxed))
        })
        .min()
        .unwrap()
}

#[test]
fn warmed_up_calls_allocate_only_their_output() {
    // Float pages, and block pages (read in place: no widened copy of a page is kept).
    for (kv, dtype) in [
        (KvType::F32, DType::F32),
        (KvType::F16, DType::F16),
        (KvType::Q8_0, DType::F16),
        (KvType::Q4_0, DType::F16),
        (KvType::E4M3, DType::F16),
    ] {
        // Decode (the split path) and chunked prefill (the per-(sequence, KV head) path).
        for num_q in [1, 8] {
            let mut counts = Vec::new();
            for (batch, ctx) in [(1, 200), (1, 5000), (8, 200), (8, 5000)] {
                let c = case(kv, dtype, batch, ctx, num_q);
                let (allocs, bytes) = measure(&c);
                let out_f32 = batch * num_q * HEADS * HEAD_DIM * 4;
                // The f32 output, and for f16 the f32 queries and the f16 output beside it.
                let limit = 3 * out_f32 + 4096;
                assert!(
                    bytes <= limit,
                    "{kv} pages batch {batch} ctx {ctx} num_q {num_q}: {allocs} allocations \
                     of {bytes} bytes, more than the output's copies ({limit})"
                );
                counts.push(allocs);
            }
            assert!(
                counts.iter().all(|n| *n == counts[0]) && counts[0] <= 16,
                "{kv} pages num_q {num_q}: allocations per call {counts:?} (batches 1/1/8/8, \
                 contexts 200/5000/200/5000) must not grow with the work"
            );
        }
    }
}
