//! The CPU paged-attention kernel.
//!
//! Work is split over (sequence, KV head) pairs on rayon's pool; a work item handles every query
//! row of its sequence and every query head of its GQA group, so each K and V row is read once
//! per group and query row. Per row: scores of the visible, valid slots (one dot product per
//! head), softmax in f32, then the V rows weighted into f32 accumulators. Dot products and axpys
//! run over fixed 8-wide chunks that LLVM vectorises; f16/bf16 rows are widened into a small
//! buffer first. Scratch (scores, widened rows) is per thread and reused across calls, so a
//! warmed-up call allocates only its output (and, with `mass`, one buffer per work item).

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::store::KvStore;
use crate::view::{AttentionParams, SeqQuery};

/// Element types the store may hold, widened to f32 for compute.
pub(crate) trait Elem: Copy + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Elem for f32 {
    #[inline]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    #[inline]
    fn widen(src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl Elem for bf16 {
    #[inline]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = 0.0;
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum + acc.iter().sum::<f32>()
}

#[inline]
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += w * b;
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

/// A raw output pointer shared by work items that write disjoint (row, head) ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: work items write disjoint index ranges (their own rows x their own heads).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Paged attention on the CPU; see [`crate::paged_attention`] for the contract.
pub(crate) fn attention(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
) -> Result<Tensor> {
    let (total_q, heads, head_dim) = q.dims3()?;
    let dims = Dims {
        heads,
        kv_heads: store.kv_heads(),
        head_dim,
        block_size: store.block_size(),
    };
    let q32 = q.to_dtype(DType::F32)?.contiguous()?;
    let (q_storage, q_layout) = q32.storage_and_layout();
    let q_off = q_layout.start_offset();
    let Storage::Cpu(CpuStorage::F32(q_data)) = &*q_storage else {
        return Err(KernelError::Invalid("queries must be on the CPU".into()));
    };
    let q_data = &q_data[q_off..q_off + total_q * heads * head_dim];
    let mut out = vec![0f32; total_q * heads * head_dim];
    let (k_storage, k_layout) = store.k().storage_and_layout();
    let (v_storage, v_layout) = store.v().storage_and_layout();
    let (ko, vo) = (k_layout.start_offset(), v_layout.start_offset());
    let ptr = OutPtr(out.as_mut_ptr());
    let masses = match (&*k_storage, &*v_storage) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => run(
            &k[ko..],
            &v[vo..],
            q_data,
            ptr,
            seqs,
            params,
            dims,
            mass.is_some(),
        ),
        (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => run(
            &k[ko..],
            &v[vo..],
            q_data,
            ptr,
            seqs,
            params,
            dims,
            mass.is_some(),
        ),
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => run(
            &k[ko..],
            &v[vo..],
            q_data,
            ptr,
            seqs,
            params,
            dims,
            mass.is_some(),
        ),
        _ => {
            return Err(KernelError::DType {
                what: "KvStore (CPU kernel)",
                dtype: store.dtype(),
            })
        }
    };
    if let (Some(mass), Some(parts)) = (mass, masses) {
        let mut offset = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let seg = &mut mass[offset..offset + seq.kv.num_slots];
            for part in &parts[s * dims.kv_heads..(s + 1) * dims.kv_heads] {
                for (m, p) in seg.iter_mut().zip(part) {
                    *m += p;
                }
            }
            offset += seq.kv.num_slots;
        }
    }
    drop(q_storage);
    let out = Tensor::from_vec(out, (total_q, heads, head_dim), &Device::Cpu)?;
    Ok(out.to_dtype(q.dtype())?)
}

#[allow(clippy::too_many_arguments)]
fn run<T: Elem>(
    k: &[T],
    v: &[T],
    q: &[f32],
    out: OutPtr,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    dims: Dims,
    want_mass: bool,
) -> Option<Vec<Vec<f32>>> {
    let items = seqs.len() * dims.kv_heads;
    let results: Vec<Option<Vec<f32>>> = (0..items)
        .into_par_iter()
        .map(|item| {
            let (s, h) = (item / dims.kv_heads, item % dims.kv_heads);
            work_item(k, v, q, out, &seqs[s], h, params, dims, want_mass)
        })
        .collect();
    want_mass.then(|| results.into_iter().map(|m| m.unwrap_or_default()).collect())
}

/// All query rows and query heads of one sequence that read KV head `h`.
#[allow(clippy::too_many_arguments)]
fn work_item<T: Elem>(
    k: &[T],
    v: &[T],
    q: &[f32],
    out: OutPtr,
    seq: &SeqQuery<'_>,
    h: usize,
    params: &AttentionParams,
    dims: Dims,
    want_mass: bool,
) -> Option<Vec<f32>> {
    let Dims {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
    } = dims;
    let group = heads / kv_heads;
    let n = seq.kv.num_slots;
    let mut mass = want_mass.then(|| vec![0f32; n]);
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        // Layout: scores [group x n] | widened row [d] | accumulators [group x d].
        let need = group * n + d + group * d;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (scores, rest) = scratch.split_at_mut(group * n);
        let (row, acc) = rest.split_at_mut(d);
        let acc = &mut acc[..group * d];
        let slot_row = |page: u32, off: usize| ((page as usize * bs + off) * kv_heads + h) * d;
        for r in 0..seq.num_q {
            let qrow = seq.q_start + r;
            let (lo, hi) = params.visible(seq.q_pos + r, n);
            let mut max = vec_max_init(group);
            // Pass 1: scores.
            for s in lo..hi {
                if !seq.kv.is_valid(s, bs) {
                    for g in 0..group {
                        scores[g * n + s] = f32::NEG_INFINITY;
                    }
                    continue;
                }
                let base = slot_row(seq.kv.pages[s / bs], s % bs);
                T::widen(&k[base..base + d], row);
                for g in 0..group {
                    let qh = h * group + g;
                    let qv = &q[(qrow * heads + qh) * d..(qrow * heads + qh + 1) * d];
                    let sc = dot(qv, row) * params.scale;
                    scores[g * n + s] = sc;
                    if sc > max[g] {
                        max[g] = sc;
                    }
                }
            }
            // Pass 2: softmax weights (in place) and their sums.
            let mut sum = [0f32; MAX_GROUP];
            for g in 0..group {
                if max[g] == f32::NEG_INFINITY {
                    continue;
                }
                for sc in &mut scores[g * n + lo..g * n + hi] {
                    let e = (*sc - max[g]).exp();
                    *sc = e;
                    sum[g] += e;
                }
            }
            // Pass 3: weighted V.
            acc.fill(0.0);
            for s in lo..hi {
                if !seq.kv.is_valid(s, bs) {
                    continue;
                }
                let base = slot_row(seq.kv.pages[s / bs], s % bs);
                T::widen(&v[base..base + d], row);
                for g in 0..group {
                    if sum[g] == 0.0 {
                        continue;
                    }
                    let w = scores[g * n + s] / sum[g];
                    axpy(&mut acc[g * d..(g + 1) * d], w, row);
                    if let Some(m) = mass.as_mut() {
                        m[s] += w;
                    }
                }
            }
            for g in 0..group {
                let qh = h * group + g;
                let dst = (qrow * heads + qh) * d;
                // SAFETY: (qrow, qh) is written by this work item only; dst..dst+d is in bounds
                // of the [total_q, heads, d] output allocated by the caller.
                unsafe {
                    std::ptr::copy_nonoverlapping(acc[g * d..].as_ptr(), out.0.add(dst), d);
                }
            }
        }
    });
    mass
}

/// Largest GQA group handled with stack arrays.
pub(crate) const MAX_GROUP: usize = 64;

#[inline]
fn vec_max_init(group: usize) -> [f32; MAX_GROUP] {
    debug_assert!(group <= MAX_GROUP);
    [f32::NEG_INFINITY; MAX_GROUP]
}
