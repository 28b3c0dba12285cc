//! The CPU decode path: one query row per sequence, no attention mass.
//!
//! Work items are (sequence, slot partition) and cover every KV head. A page keeps one token's
//! rows of all heads together, so an item streams whole pages front to back, which the hardware
//! prefetchers follow (a per-head item reads one short row per 4 KiB on Llama shapes), and a
//! batch-1 context spreads over every thread instead of over `kv_heads` items. Each item leaves
//! an unnormalised partial per query head (running max, exp-sum, weighted V sum); a sequence's
//! partials merge by log-sum-exp, as in flash-decoding.
//!
//! With per-head lanes ([`crate::paged_attention_lanes`]) a sequence has one table per lane and
//! an item covers the same slot range of every lane: it walks each lane's slots for that lane's
//! query heads into one score row of all the heads, so the softmax and the merge run over every
//! head of the sequence at once and the queries and outputs keep the model's layout.

use std::cell::RefCell;

use super::spin::SpinPool;
use super::{Dims, Elem, Madd, OutPtr, Plain, SCRATCH, VB};
use crate::view::{AttentionParams, SeqQuery};

/// How the decode path splits contexts (tests force small partitions).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))] // `Off` and `Slots` exist for the tests.
pub(crate) enum Split {
    /// Partitions sized for balance over the thread pool.
    Auto,
    /// Use the per-(sequence, KV head) path instead.
    Off,
    /// Partitions of this many slots (rounded up to whole pages).
    Slots(usize),
}

/// Smallest automatic partition, in slots: below it the partial write and merge cost more than
/// the balance gains.
const MIN_PART: usize = 64;

/// Largest automatic partition, in slots: keeps a partition's scores (`slots x heads` f32) in
/// the core's L2 cache between the key and the value pass.
const MAX_PART: usize = 512;

/// Work items per thread the automatic split aims for, so uneven items still balance.
const ITEMS_PER_THREAD: usize = 4;

/// Fewest slots ahead whose token rows are prefetched.
const PREFETCH: usize = 2;

/// Bytes ahead to prefetch at least (up to 16 slots). Per-slot prefetches pay even within a
/// page (without them the decode path took 1.3-2x as long on an AMD EPYC), and the distance
/// must be in bytes: two slots are 768 bytes of a SmolLM2 group's f16 rows but 256 of one of
/// its lanes', too close to hide a miss (the lane layout took 1.25-1.4x the group layout's time
/// at two slots, 1.1-1.25x at 1,536 bytes).
const PREFETCH_BYTES: usize = 1536;

/// Slots `[start, end)` of sequence `seq`.
#[derive(Clone, Copy, Debug)]
struct Part {
    seq: usize,
    start: usize,
    end: usize,
}

/// The caller's reusable plan: parts, the first part of each sequence (plus an end marker), and
/// the partials buffer.
#[derive(Default)]
struct Plan {
    parts: Vec<Part>,
    first: Vec<usize>,
    partials: Vec<f32>,
}

thread_local! {
    static PLAN: RefCell<Plan> = RefCell::new(Plan::default());
}

/// Whether a call takes the decode path.
pub(crate) fn applies(seqs: &[SeqQuery<'_>], want_mass: bool, split: Split) -> bool {
    !want_mass && !matches!(split, Split::Off) && seqs.iter().all(|s| s.num_q == 1)
}

/// Decode attention for every sequence (each has exactly one query row) into `out`, which the
/// caller zeroed (rows that see no valid slot stay zero). With `dims.lanes > 1`, `seqs` is
/// lane-major (lane `h` of sequence `i` at `h * n + i`, `n = seqs.len() / lanes`, every lane of
/// a sequence at the same query row) and lane `h` serves query heads `h * heads / lanes ..`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<K: Elem, V: Elem>(
    k: &[K],
    v: &[V],
    q: &[f32],
    out: OutPtr,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    dims: Dims,
    split: Split,
) {
    let mut plan = PLAN.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    make_plan(&mut plan, seqs, dims.lanes, params, dims.block_size, split);
    let stride = dims.heads * (dims.head_dim + 2);
    let need = plan.parts.len() * stride;
    if plan.partials.len() < need {
        plan.partials.resize(need, 0.0);
    }
    let Plan {
        parts,
        first,
        partials,
    } = &mut plan;
    // On the spinning pool, like the decode step's quantized products around it: its workers
    // are awake, rayon's would have to be woken (and the two pools would fight over the cores).
    let pool = SpinPool::global();
    let base = OutPtr(partials.as_mut_ptr());
    let parts = &*parts;
    let n = seqs.len() / dims.lanes;
    pool.run(parts.len(), &|i| {
        // SAFETY: task `i` alone writes partial `i`; `partials` holds `need` values.
        let partial = unsafe { std::slice::from_raw_parts_mut(base.get().add(i * stride), stride) };
        let part = parts[i];
        part_item(k, v, q, seqs, n, part, params, dims, partial)
    });
    let (first, partials) = (&*first, &*partials);
    pool.run(n, &|s| {
        merge(
            &partials[first[s] * stride..first[s + 1] * stride],
            seqs[s].q_start,
            dims,
            out,
        )
    });
    PLAN.with(|cell| *cell.borrow_mut() = plan);
}

/// Splits each sequence's visible range (over all its lanes) into partitions aligned to
/// multiples of the partition length (itself a whole number of pages).
fn make_plan(
    plan: &mut Plan,
    seqs: &[SeqQuery<'_>],
    lanes: usize,
    params: &AttentionParams,
    block_size: usize,
    split: Split,
) {
    let n = seqs.len() / lanes;
    let visible = |i: usize| {
        (0..lanes)
            .map(|h| {
                let s = &seqs[h * n + i];
                params.visible(s.first_slot, s.kv.num_slots)
            })
            .filter(|(lo, hi)| lo < hi)
            .fold((usize::MAX, 0), |(a, b), (lo, hi)| (a.min(lo), b.max(hi)))
    };
    let len = match split {
        Split::Slots(n) => n.max(1),
        _ => {
            // Balance the slots of every lane: a part covers its range in each lane.
            let total: usize = seqs
                .iter()
                .map(|s| {
                    let (lo, hi) = params.visible(s.first_slot, s.kv.num_slots);
                    hi - lo
                })
                .sum();
            let items = ITEMS_PER_THREAD * SpinPool::global().threads() * lanes;
            total.div_ceil(items).clamp(MIN_PART, MAX_PART)
        }
    };
    let len = len.div_ceil(block_size) * block_size;
    plan.parts.clear();
    plan.first.clear();
    for i in 0..n {
        plan.first.push(plan.parts.len());
        let (lo, hi) = visible(i);
        let mut start = lo;
        while start < hi {
            let end = ((start / len + 1) * len).min(hi);
            plan.parts.push(Part { seq: i, start, end });
            start = end;
        }
    }
    plan.first.push(plan.parts.len());
}

/// One partition on the widest instruction set the CPU has.
#[allow(clippy::too_many_arguments)]
fn part_item<K: Elem, V: Elem>(
    k: &[K],
    v: &[V],
    q: &[f32],
    seqs: &[SeqQuery<'_>],
    n: usize,
    part: Part,
    params: &AttentionParams,
    dims: Dims,
    partial: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::wide_loops(dims) {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        return unsafe { part_item_avx2(k, v, q, seqs, n, part, params, dims, partial) };
    }
    part_body::<K, V, Plain>(k, v, q, seqs, n, part, params, dims, partial)
}

/// [`part_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn part_item_avx2<K: Elem, V: Elem>(
    k: &[K],
    v: &[V],
    q: &[f32],
    seqs: &[SeqQuery<'_>],
    n: usize,
    part: Part,
    params: &AttentionParams,
    dims: Dims,
    partial: &mut [f32],
) {
    part_body::<K, V, super::Fused>(k, v, q, seqs, n, part, params, dims, partial)
}

/// Scores, exponentials and the weighted V sum of one partition, for every query head; writes
/// `[max; heads] [exp-sum; heads] [acc; heads x head_dim]` into `partial`. Each lane's slots of
/// the partition go through its own table for its own query heads (one lane without lanes).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn part_body<K: Elem, V: Elem, M: Madd>(
    k: &[K],
    v: &[V],
    q: &[f32],
    seqs: &[SeqQuery<'_>],
    n: usize,
    part: Part,
    params: &AttentionParams,
    dims: Dims,
    partial: &mut [f32],
) {
    let Dims {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
        lanes,
        ..
    } = dims;
    // Per lane: its query heads and the stored row of one token (every KV head of its table).
    let lane_heads = heads / lanes;
    let row = kv_heads * d;
    let len = part.end - part.start;
    let (maxes, rest) = partial.split_at_mut(heads);
    let (sums, acc) = rest.split_at_mut(heads);
    let mut scratch = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        // Layout: scores [len x heads] | widened token rows [VB x row] | a zero row
        // [max(row, heads)] | scaled queries [heads x d].
        let zero_len = row.max(heads);
        let need = heads * len + VB * row + zero_len + heads * d;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (scores, rest) = scratch.split_at_mut(heads * len);
        let (rows, rest) = rest.split_at_mut(VB * row);
        let (zero, rest) = rest.split_at_mut(zero_len);
        zero.fill(0.0);
        let zero: &[f32] = zero;
        // The softmax scale goes into the queries once instead of into every score (every
        // lane of a sequence reads the same query row).
        let q_start = seqs[part.seq].q_start;
        let qs = &mut rest[..heads * d];
        for (x, q) in qs
            .iter_mut()
            .zip(&q[q_start * heads * d..(q_start + 1) * heads * d])
        {
            *x = q * params.scale;
        }
        let qs: &[f32] = qs;
        // A token's rows (every KV head of a table) in stored units of K and V.
        let (row_k, row_v) = (row / K::PER, row / V::PER);
        let ahead_k = (PREFETCH_BYTES / (row_k * std::mem::size_of::<K>())).clamp(PREFETCH, 16);
        let ahead_v = (PREFETCH_BYTES / (row_v * std::mem::size_of::<V>())).clamp(PREFETCH, 16);
        let sp = scores.as_mut_ptr();
        // SAFETY (score rows): `s - part.start < len`, so row `s` lies inside `scores`.
        let score_row = |s: usize| unsafe { sp.add((s - part.start) * heads) };
        // Where slot `s` of a lane's table starts, in stored units of `units` per token row.
        let token = |seq: &SeqQuery<'_>, s: usize, units: usize| {
            (seq.kv.pages[s / bs] as usize * bs + s % bs) * units
        };
        // Lane `h`'s query, and the slots of the part it sees.
        let lane = |h: usize| {
            let seq = &seqs[h * n + part.seq];
            let (lo, hi) = params.visible(seq.first_slot, seq.kv.num_slots);
            let lo = lo.clamp(part.start, part.end);
            (seq, lo, hi.clamp(lo, part.end))
        };

        // Pass 1: scores of every query head, VB valid tokens per call (the kernel shares each
        // query load between tokens and each key conversion between the group's heads). Slots
        // a lane does not see (outside its visible range, or evicted) score -inf in its heads.
        for h in 0..lanes {
            let (seq, lo, hi) = lane(h);
            let first = h * lane_heads;
            let unseen = |s: usize| {
                // SAFETY: a score row of `heads` floats (see `score_row`), `first + lane_heads
                // <= heads`.
                unsafe { std::slice::from_raw_parts_mut(score_row(s).add(first), lane_heads) }
                    .fill(f32::NEG_INFINITY)
            };
            (part.start..lo).chain(hi..part.end).for_each(unseen);
            let lane_q = &qs[first * d..(first + lane_heads) * d];
            let mut s = lo;
            while s < hi {
                let mut keys = [zero.as_ptr().cast::<K>(); VB];
                let mut out = [std::ptr::null_mut::<f32>(); VB];
                let mut count = 0;
                while count < VB && s < hi {
                    if s + ahead_k < hi {
                        let base = token(seq, s + ahead_k, row_k);
                        super::prefetch(&k[base..base + row_k]);
                    }
                    if seq.kv.is_valid(s) {
                        let base = token(seq, s, row_k);
                        keys[count] = k[base..base + row_k].as_ptr();
                        // SAFETY: inside score row `s` (see `unseen`).
                        out[count] = unsafe { score_row(s).add(first) };
                        count += 1;
                    } else {
                        unseen(s);
                    }
                    s += 1;
                }
                // SAFETY: each key pointer starts a token's `row` stored elements; each output
                // is `lane_heads` floats of a distinct score row, not referenced elsewhere
                // during the call.
                unsafe { M::tile_dots::<K>(lane_q, &keys[..count], &out[..count], (d, row), rows) };
            }
        }
        let scores = &mut scores[..len * heads];

        // Pass 2: per-head maxima.
        maxes.fill(f32::NEG_INFINITY);
        M::max_rows(scores, maxes);

        // Pass 3: exponentials and their sums, then the weighted value rows, VB valid slots
        // per accumulator load/store. Eight heads or more in one table: the exponentials are
        // taken token by token in the value loop, so that their arithmetic overlaps the value
        // rows' memory traffic instead of running alone. Fewer (a small GQA group), or lanes
        // (whose value loops each cover a few heads): every slot of the part (held ones and
        // holes, which give 0) in one pass first, eight lanes at a time across slots.
        sums.fill(0.0);
        acc.fill(0.0);
        let across = heads < 8 || lanes > 1;
        if across {
            M::exp_rows(scores, maxes, sums);
        }
        let sp = scores.as_mut_ptr();
        for h in 0..lanes {
            let (seq, lo, hi) = lane(h);
            let first = h * lane_heads;
            let acc = &mut acc[first * d..(first + lane_heads) * d];
            let mut s = lo;
            while s < hi {
                // All-zero bytes are 0.0 in f32, f16 and bf16, and a block of scale 0: `zero`
                // serves every element type (a block row is fewer bytes than an f32 row), as
                // rows and as weights.
                let mut block: [*const V; VB] = [zero.as_ptr().cast::<V>(); VB];
                let mut w: [*const f32; VB] = [zero.as_ptr(); VB];
                let mut count = 0;
                while count < VB && s < hi {
                    if s + ahead_v < hi {
                        let base = token(seq, s + ahead_v, row_v);
                        super::prefetch(&v[base..base + row_v]);
                    }
                    if seq.kv.is_valid(s) {
                        let base = token(seq, s, row_v);
                        block[count] = v[base..base + row_v].as_ptr();
                        // SAFETY: `s - part.start < len`: score row `s` lies inside `scores`,
                        // and no other reference to it is alive.
                        let sc = unsafe {
                            std::slice::from_raw_parts_mut(
                                sp.add((s - part.start) * heads + first),
                                lane_heads,
                            )
                        };
                        if !across {
                            M::exp_row(sc, maxes, sums);
                        }
                        w[count] = sc.as_ptr();
                        count += 1;
                    }
                    s += 1;
                }
                // SAFETY: every pointer is the start of `row` live elements (a token's rows of
                // `v` or `zero`: `row` f32s, at least `row` elements of any narrower type) and
                // every weight pointer of `lane_heads` floats (a lane's part of a score row, or
                // `zero`).
                unsafe { M::token_axpy::<V>(acc, &w, &block, (d, row), rows) };
            }
        }
    }
    SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
}

/// Merges one sequence's partials into its output row: per head,
/// `sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p` with `M = max_p m_p`.
fn merge(partials: &[f32], q_start: usize, dims: Dims, out: OutPtr) {
    let (heads, d) = (dims.heads, dims.head_dim);
    let stride = heads * (d + 2);
    let parts = partials.len() / stride;
    for hd in 0..heads {
        let part = |p: usize| &partials[p * stride..(p + 1) * stride];
        let max = (0..parts)
            .map(|p| part(p)[hd])
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            continue;
        }
        let total: f32 = (0..parts)
            .map(|p| (part(p)[hd] - max).exp() * part(p)[heads + hd])
            .sum();
        if total <= 0.0 {
            continue;
        }
        // SAFETY: (q_start, hd) is this sequence's own output row (each sequence has one query
        // row) and lies inside the [total_q, heads, d] output the caller allocated.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.0.add((q_start * heads + hd) * d), d) };
        for p in 0..parts {
            let scale = (part(p)[hd] - max).exp() / total;
            let acc = &part(p)[2 * heads + hd * d..2 * heads + (hd + 1) * d];
            for (o, a) in dst.iter_mut().zip(acc) {
                *o += scale * a;
            }
        }
    }
}
