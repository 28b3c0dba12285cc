//! Decode attention: layerkv's paged CPU kernel against candle's contiguous attention
//! (`softmax(q k^T * scale) v` with GQA as a grouped matmul) on the same data, in the same run,
//! plus a streaming-read bandwidth probe so the kernel's achieved KV bytes/s can be read as a
//! fraction of what this machine's memory delivers.
//!
//! The same data is also laid out in **lanes** (per-head retention, `+per-head` policies): pages
//! of one KV head, a table per (sequence, KV head), one `paged_attention_lanes` call as
//! `StepExecutor::attend` makes it; its column is the lane layout's time over the group
//! layout's.
//!
//! Shapes: Llama-like (32 heads, 8 KV heads, head_dim 128) and SmolLM2-135M (9, 3, 64); contexts
//! 512..32k; batches 1, 8, 32 (combinations above a KV-size cap are skipped); f32, f16, Q8_0 and
//! Q4_0 pages (queries and candle's copies in f16 for the block types, which candle has no
//! attention for). The `x f16` column is a row's paged time over the f16 pages' paged time at
//! the same shape, context and batch, measured in the same run. `cargo bench --bench attention`
//! prints the table; under `cargo test` one small case runs and the two implementations must
//! agree.
//!
//! The two paged layouts are timed interleaved (one call of each per round, medians), so a
//! neighbour's burst on a shared machine slows both alike; candle runs on its own before them.
//! For profiling: `LAYERKV_BENCH_FILTER` (a row label's substring), `LAYERKV_BENCH_REPS`
//! (repetitions), `LAYERKV_BENCH_ONLY=paged|candle|lanes` (time one, the others once) and
//! `LAYERKV_BENCH_NO_BW=1` (skip the bandwidth probes); `LAYERKV_BENCH_PAGES=shuffled` hands out
//! pages in a seeded random order (a pool after churn) instead of in allocation order.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::Criterion;
use layerkv::TableView;
use layerkv_kernels::{
    paged_attention, paged_attention_lanes, AttentionParams, KvStore, KvType, KvTypes, SeqQuery,
};
use rayon::prelude::*;

const BLOCK: usize = 16;

struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ctx: usize,
    batch: usize,
    /// The page type.
    kv: KvType,
    /// Queries and candle's contiguous K/V: f32 for f32 pages, else f16.
    dtype: DType,
}

struct Prepared {
    store: KvStore,
    tables: Vec<Vec<u32>>,
    /// The lane layout: pages of one head, table `b * kv_heads + h` for sequence b's head h.
    lane_store: KvStore,
    lane_tables: Vec<Vec<u32>>,
    q: Tensor,
    /// Contiguous copies for candle: [batch, kv_heads, ctx, d].
    k: Tensor,
    v: Tensor,
    q4: Tensor,
}

fn prepare(c: &Case) -> Prepared {
    let dev = Device::Cpu;
    let pages_per_seq = c.ctx / BLOCK;
    let num_pages = pages_per_seq * c.batch;
    let types = KvTypes::both(c.kv);
    let mut store =
        KvStore::with_types(num_pages, BLOCK, c.kv_heads, c.head_dim, types, &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (c.batch, c.ctx, c.kv_heads, c.head_dim), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (c.batch, c.ctx, c.kv_heads, c.head_dim), &dev).unwrap();
    // Pages of different sequences interleave, as a shared pool hands them out; with
    // `LAYERKV_BENCH_PAGES=shuffled`, in a seeded random order (a pool after churn, where the
    // layers' groups interleave too) for both layouts.
    let order = page_order(num_pages);
    let tables: Vec<Vec<u32>> = (0..c.batch)
        .map(|b| (0..pages_per_seq).map(|p| order[p * c.batch + b]).collect())
        .collect();
    for (b, table) in tables.iter().enumerate() {
        let slots: Vec<u32> = (0..c.ctx)
            .map(|s| table[s / BLOCK] * BLOCK as u32 + (s % BLOCK) as u32)
            .collect();
        store
            .write(&slots, &k.get(b).unwrap(), &v.get(b).unwrap())
            .unwrap();
    }
    // Lanes: every (sequence, head) its own pages, interleaved over the pool the same way.
    let lanes = c.batch * c.kv_heads;
    let mut lane_store =
        KvStore::with_types(pages_per_seq * lanes, BLOCK, 1, c.head_dim, types, &dev).unwrap();
    let lane_order = page_order(pages_per_seq * lanes);
    let lane_tables: Vec<Vec<u32>> = (0..lanes)
        .map(|l| {
            (0..pages_per_seq)
                .map(|p| lane_order[p * lanes + l])
                .collect()
        })
        .collect();
    for (l, table) in lane_tables.iter().enumerate() {
        let (b, h) = (l / c.kv_heads, l % c.kv_heads);
        let slots: Vec<u32> = (0..c.ctx)
            .map(|s| table[s / BLOCK] * BLOCK as u32 + (s % BLOCK) as u32)
            .collect();
        let head = |t: &Tensor| t.get(b).unwrap().narrow(1, h, 1).unwrap();
        lane_store.write(&slots, &head(&k), &head(&v)).unwrap();
    }
    let q = Tensor::randn(0f32, 1.0, (c.batch, c.heads, c.head_dim), &dev).unwrap();
    let group = c.heads / c.kv_heads;
    let to_contig = |t: Tensor| {
        t.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .to_dtype(c.dtype)
            .unwrap()
    };
    Prepared {
        store,
        tables,
        lane_store,
        lane_tables,
        q4: q
            .reshape((c.batch, c.kv_heads, group, c.head_dim))
            .unwrap()
            .to_dtype(c.dtype)
            .unwrap(),
        q: q.to_dtype(c.dtype).unwrap(),
        k: to_contig(k),
        v: to_contig(v),
    }
}

/// Page ids `0..n` in pool order: as allocated, or seeded-shuffled under
/// `LAYERKV_BENCH_PAGES=shuffled`.
fn page_order(n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if std::env::var("LAYERKV_BENCH_PAGES").is_ok_and(|v| v == "shuffled") {
        let mut rng = layerkv::SplitMix64::new(17);
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
    }
    order
}

fn ours(c: &Case, p: &Prepared) -> Tensor {
    let seqs: Vec<SeqQuery<'_>> = p
        .tables
        .iter()
        .enumerate()
        .map(|(b, t)| SeqQuery {
            kv: TableView {
                pages: t,
                num_slots: c.ctx,
                valid: None,
            },
            q_start: b,
            num_q: 1,
            first_slot: c.ctx - 1,
        })
        .collect();
    let params = AttentionParams {
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        window: None,
        include_diagonal: true,
    };
    paged_attention(&p.q, &p.store, &seqs, &params, None).unwrap()
}

/// The lane layout as `StepExecutor::attend` runs it: one `paged_attention_lanes` call, every
/// sequence's query row read by all its lanes (lane-major queries, `seqs[h * batch + s]`).
fn lanes(c: &Case, p: &Prepared) -> Tensor {
    let (b, kvh) = (c.batch, c.kv_heads);
    let mut seqs = Vec::with_capacity(kvh * b);
    for h in 0..kvh {
        for s in 0..b {
            seqs.push(SeqQuery {
                kv: TableView {
                    pages: &p.lane_tables[s * kvh + h],
                    num_slots: c.ctx,
                    valid: None,
                },
                q_start: s,
                num_q: 1,
                first_slot: c.ctx - 1,
            });
        }
    }
    let params = AttentionParams {
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        window: None,
        include_diagonal: true,
    };
    paged_attention_lanes(&p.q, &p.lane_store, kvh, &seqs, &params).unwrap()
}

fn candle(c: &Case, p: &Prepared) -> Tensor {
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let att = (p.q4.matmul(&p.k.t().unwrap()).unwrap() * scale).unwrap();
    let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32).unwrap())
        .unwrap()
        .to_dtype(c.dtype)
        .unwrap();
    att.matmul(&p.v)
        .unwrap()
        .reshape((c.batch, c.heads, c.head_dim))
        .unwrap()
}

/// Median seconds of each function over its repetitions, called in rounds (one call of each
/// function still repeating per round) after one warm-up call each.
fn interleaved_medians(fs: &mut [(usize, &mut dyn FnMut())]) -> Vec<f64> {
    let mut times: Vec<Vec<f64>> = fs
        .iter()
        .map(|(reps, _)| Vec::with_capacity(*reps))
        .collect();
    for (_, f) in fs.iter_mut() {
        f();
    }
    let rounds = fs.iter().map(|(reps, _)| *reps).max().unwrap_or(0);
    for round in 0..rounds {
        for ((reps, f), t) in fs.iter_mut().zip(&mut times) {
            if round < *reps {
                let start = Instant::now();
                f();
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

fn median(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[reps / 2]
}

/// Streaming-read bandwidth (bytes/s) with the same thread pool: sum a 1 GiB buffer.
fn bandwidth() -> f64 {
    let buf = vec![1f32; 256 << 20];
    let bytes = (buf.len() * 4) as f64;
    let secs = median(
        || {
            // Eight independent lanes per chunk so the adds vectorise and memory is the limit.
            let s: f32 = buf
                .par_chunks(1 << 16)
                .map(|c| {
                    let mut acc = [0f32; 16];
                    for x in c.chunks_exact(16) {
                        for i in 0..16 {
                            acc[i] += x[i];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum();
            black_box(s);
        },
        5,
    );
    bytes / secs
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (heads, kv_heads, head_dim, cap) in [(32, 8, 128, 1 << 16), (9, 3, 64, 1 << 18)] {
        // The page types of one shape, context and batch run back to back: their ratios are
        // taken a few seconds apart, not minutes.
        for ctx in [512, 2048, 8192, 32768] {
            for batch in [1, 8, 32] {
                for kv in [
                    KvType::F32,
                    KvType::F16,
                    KvType::Q8_0,
                    KvType::Q4_0,
                    KvType::E4M3,
                ] {
                    if ctx * batch <= cap {
                        out.push(Case {
                            heads,
                            kv_heads,
                            head_dim,
                            ctx,
                            batch,
                            kv,
                            dtype: if kv == KvType::F32 {
                                DType::F32
                            } else {
                                DType::F16
                            },
                        });
                    }
                }
            }
        }
    }
    out
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        let c = Case {
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            ctx: 256,
            batch: 3,
            kv: KvType::F32,
            dtype: DType::F32,
        };
        let p = prepare(&c);
        let diff = |a: Tensor, b: Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let d = diff(ours(&c, &p), candle(&c, &p));
        assert!(d < 1e-4, "paged and contiguous attention differ by {d}");
        let d = diff(lanes(&c, &p), ours(&c, &p));
        assert!(d < 1e-6, "the lane and group layouts differ by {d}");
        println!("attention bench check: 2 passed, 0 failed");
        return;
    }
    // `LAYERKV_BENCH_FILTER=32h/8kv/d128:f32:32768x1` (a substring of `shape:dtype:ctxxbatch`)
    // runs only the matching table rows, for profiling.
    let filter = std::env::var("LAYERKV_BENCH_FILTER").ok();
    let mut crit = Criterion::default().sample_size(10).configure_from_args();
    if filter.is_none() {
        let c = Case {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            ctx: 8192,
            batch: 1,
            kv: KvType::F32,
            dtype: DType::F32,
        };
        let p = prepare(&c);
        let mut g = crit.benchmark_group("decode-llama-8k-b1-f32");
        g.bench_function("layerkv-paged", |b| b.iter(|| ours(&c, &p)));
        g.bench_function("candle-contiguous", |b| b.iter(|| candle(&c, &p)));
        g.finish();
    }
    // The streaming read is probed before and after the table and the higher figure is the
    // reference: this machine is shared, and a probe taken while a neighbour is busy would make
    // every ratio look better than it is.
    // `LAYERKV_BENCH_NO_BW=1` skips the probes (a profile of the kernels alone).
    let probe = || {
        if std::env::var_os("LAYERKV_BENCH_NO_BW").is_some() {
            f64::NAN
        } else {
            bandwidth()
        }
    };
    let bw_start = probe();
    let mut rows = Vec::new();
    for c in cases() {
        let label = format!(
            "{}h/{}kv/d{}:{}:{}x{}",
            c.heads, c.kv_heads, c.head_dim, c.kv, c.ctx, c.batch
        );
        if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
            continue;
        }
        let p = prepare(&c);
        // `LAYERKV_BENCH_REPS` raises the repetitions (for a profiler's samples).
        let reps = std::env::var("LAYERKV_BENCH_REPS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(if c.ctx * c.batch >= 1 << 16 { 5 } else { 11 });
        // `LAYERKV_BENCH_ONLY=paged|candle|lanes` times one of the three (the others run
        // once), so a profile shows that one alone.
        let only = std::env::var("LAYERKV_BENCH_ONLY").ok();
        let reps_of = |what: &str| match &only {
            Some(o) if o != what => 1,
            _ => reps,
        };
        // candle first, on its own (its thread pool spins on after a call and would slow the
        // call that follows it); then the two paged layouts interleaved, one call of each per
        // round, so a neighbour's burst on this shared machine slows both alike and their
        // ratio holds.
        let t_candle = median(|| drop(black_box(candle(&c, &p))), reps_of("candle"));
        let t = interleaved_medians(&mut [
            (reps_of("paged"), &mut || drop(black_box(ours(&c, &p)))),
            (reps_of("lanes"), &mut || drop(black_box(lanes(&c, &p)))),
        ]);
        let (t_ours, t_lanes) = (t[0], t[1]);
        eprintln!(
            "{label}: paged {:.1} us, candle {:.1} us, lanes {:.1} us",
            t_ours * 1e6,
            t_candle * 1e6,
            t_lanes * 1e6
        );
        rows.push((c, t_ours, t_candle, t_lanes));
    }
    let bw_end = probe();
    let bw = bw_start.max(bw_end);
    println!(
        "\nstreaming read bandwidth: {:.2} GB/s before, {:.2} GB/s after the table ({} threads); \
         % bw is against the higher",
        bw_start / 1e9,
        bw_end / 1e9,
        rayon::current_num_threads()
    );
    let f16_time = |c: &Case| {
        rows.iter()
            .find(|(r, ..)| {
                r.kv == KvType::F16
                    && (r.heads, r.kv_heads, r.head_dim, r.ctx, r.batch)
                        == (c.heads, c.kv_heads, c.head_dim, c.ctx, c.batch)
            })
            .map(|r| r.1)
    };
    let vs_f16: Vec<String> = rows
        .iter()
        .map(|(c, t, ..)| match f16_time(c) {
            Some(f) => format!("{:.2}x", t / f),
            None => "-".into(),
        })
        .collect();
    println!(
        "{:<22} {:>6} {:>6} {:>5} {:>11} {:>11} {:>8} {:>9} {:>7} {:>10} {:>7}",
        "shape",
        "pages",
        "ctx",
        "batch",
        "paged us",
        "candle us",
        "speedup",
        "KV GB/s",
        "% bw",
        "lanes/grp",
        "x f16"
    );
    for ((c, t_ours, t_candle, t_lanes), vs_f16) in rows.iter().zip(vs_f16) {
        let (t_ours, t_candle, t_lanes) = (*t_ours, *t_candle, *t_lanes);
        let kv_bytes =
            (c.batch * c.ctx * c.kv_heads * KvTypes::both(c.kv).token_head_bytes(c.head_dim))
                as f64;
        println!(
            "{:<22} {:>6} {:>6} {:>5} {:>11.1} {:>11.1} {:>7.2}x {:>9.2} {:>6.1}% {:>9.2}x {:>7}",
            format!("{}h/{}kv/d{}", c.heads, c.kv_heads, c.head_dim),
            c.kv,
            c.ctx,
            c.batch,
            t_ours * 1e6,
            t_candle * 1e6,
            t_candle / t_ours,
            kv_bytes / t_ours / 1e9,
            100.0 * kv_bytes / t_ours / bw,
            t_lanes / t_ours,
            vs_f16
        );
    }
}
