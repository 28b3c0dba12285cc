//! The CPU paged-attention kernel.
//!
//! Decode calls (one query row per sequence, no mass) take the split path in [`split`]: items
//! are (sequence, slot partition) over every KV head, merged by log-sum-exp. Other calls
//! (prefill, chunked prefill, mass wanted) split work over (sequence, KV head) pairs on rayon's
//! pool; a work item handles every query row of its sequence and every query head of its GQA
//! group, so each K and V row is read once per group and query row. Per row: scores of the
//! visible, valid slots (one pass over each key row computes the dot products of the whole
//! group, in independent 8-wide accumulators), softmax in f32, then the V rows weighted into f32
//! accumulators. f32 rows are read in place, f16/bf16 rows are widened into a small buffer. The
//! loops are compiled twice (baseline x86-64 and AVX2+FMA, picked at run time), so a default
//! build still uses the wide units. Scratch is per thread and reused across calls: a warmed-up
//! call allocates only its output (and, with `mass`, one buffer per work item).

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::kvtype::{hadamard, hadamard_size, KvType, KvTypes};
use crate::store::KvStore;
use crate::view::{AttentionParams, SeqQuery};
use blocks::{E4Block, Q4Block, Q8Block};

#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;
pub mod quant;
pub mod spin;
mod split;
pub mod swiglu;
pub(crate) use split::Split;

/// What an element type must offer the AVX2 loops (nothing on other targets).
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Lanes as ArchLanes;
/// What an element type must offer the AVX2 loops (nothing on other targets).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait ArchLanes {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> ArchLanes for T {}

/// Element types the store may hold, widened to f32 for compute: floats, or blocks of `PER`
/// values ([`blocks`]). Row offsets into a store slice are in these units: a row of `d` values
/// is `d / PER` of them.
pub(crate) trait Elem: Copy + Send + Sync + ArchLanes {
    /// Values per stored unit.
    const PER: usize = 1;
    /// The row as f32 without copying, when it already is f32.
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
    /// Widens `src` into `dst` (`src.len() * PER` values).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// [`Elem::widen`] with AVX2+F16C instructions.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_avx2(src: &[Self], dst: &mut [f32]) {
        Self::widen(src, dst)
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_avx2(src: &[f16], dst: &mut [f32]) {
        // SAFETY: the caller guarantees AVX2 and F16C.
        unsafe { avx2::widen(src, dst) }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_avx2(src: &[bf16], dst: &mut [f32]) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { avx2::widen(src, dst) }
    }
}

/// Multiply-add, fused or not: the inner loops are compiled twice, for the baseline target
/// (mul + add) and for AVX2+FMA (fused), and the CPU picks one at run time.
trait Madd {
    fn madd(acc: f32, a: f32, b: f32) -> f32;

    /// Dot products of every query row of a group (`group x d`) with one key row.
    #[inline(always)]
    fn group_dots(q: &[f32], k: &[f32], out: &mut [f32]) {
        portable_group_dots::<Self>(q, k, out)
    }

    /// `acc += sum_j w[j] * rows[j]`: one load and one store of each accumulator per block.
    #[inline(always)]
    fn axpy_block(acc: &mut [f32], w: &[f32; VB], rows: &[&[f32]; VB]) {
        portable_axpy_block::<Self>(acc, w, rows)
    }

    /// `x[i] = exp(x[i] - max[i])` (0 where `max[i]` is -inf: nothing visible), `sums[i] += x[i]`.
    #[inline(always)]
    fn exp_row(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
        for ((x, m), l) in x.iter_mut().zip(max).zip(sums) {
            let e = if *m == f32::NEG_INFINITY {
                0.0
            } else {
                (*x - m).exp()
            };
            *x = e;
            *l += e;
        }
    }

    /// [`Madd::exp_row`] over consecutive rows of `max.len()` values (a run of slots' scores).
    #[inline(always)]
    fn exp_rows(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
        for row in x.chunks_exact_mut(max.len()) {
            Self::exp_row(row, max, sums);
        }
    }

    /// Running column maxima of consecutive rows of `max.len()` values (a run of slots'
    /// scores): `max[i] = max(max[i], x[r][i])`, NaN skipped.
    #[inline(always)]
    fn max_rows(x: &[f32], max: &mut [f32]) {
        for row in x.chunks_exact(max.len()) {
            for (m, v) in max.iter_mut().zip(row) {
                if *v > *m {
                    *m = *v;
                }
            }
        }
    }

    /// Widens a stored row to f32 with the loops this instantiation may use.
    #[inline(always)]
    fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        T::widen(src, dst)
    }

    /// Scores of every query head (`q`: `heads x d`, grouped by KV head) against up to `VB`
    /// tokens' stored key rows (`keys[t]`: `row = kv_heads x d` elements) into `out[t]`
    /// (`heads` floats each); `buf` (at least `row`) holds a widened row where this
    /// instantiation needs one.
    ///
    /// # Safety
    /// `keys.len() == out.len() <= VB`; every `keys[t]` points at `row` readable elements, every
    /// `out[t]` at `heads` writable floats that nothing else references during the call.
    #[inline(always)]
    unsafe fn tile_dots<T: Elem>(
        q: &[f32],
        keys: &[*const T],
        out: &[*mut f32],
        (d, row): (usize, usize),
        buf: &mut [f32],
    ) {
        let heads = q.len() / d;
        let group = heads * d / row;
        for (&key, &dst) in keys.iter().zip(out) {
            // SAFETY: the caller's contract (`row` values are `row / PER` stored units).
            let (src, dst) = unsafe {
                (
                    std::slice::from_raw_parts(key, row / T::PER),
                    std::slice::from_raw_parts_mut(dst, heads),
                )
            };
            let key: &[f32] = match T::as_f32(src) {
                Some(key) => key,
                None => {
                    T::widen(src, &mut buf[..row]);
                    &buf[..row]
                }
            };
            for (h, key) in key.chunks_exact(d).enumerate() {
                portable_group_dots::<Self>(
                    &q[h * group * d..(h + 1) * group * d],
                    key,
                    &mut dst[h * group..(h + 1) * group],
                );
            }
        }
    }

    /// `acc[hd] += sum_j w[j][hd] * rows[j][head of hd]` for every query head `hd` (`acc`:
    /// `heads x d`, `w[j]`: token j's `heads` weights), over `VB` stored token rows of
    /// `row = kv_heads x d` elements; `buf` (at least `VB x row`) holds widened rows where needed.
    ///
    /// # Safety
    /// Every `rows[j]` points at `row` readable elements, every `w[j]` at `heads` floats.
    #[inline(always)]
    unsafe fn token_axpy<T: Elem>(
        acc: &mut [f32],
        w: &[*const f32; VB],
        rows: &[*const T; VB],
        (d, row): (usize, usize),
        buf: &mut [f32],
    ) {
        let group = acc.len() / row;
        let wide: [&[f32]; VB] = std::array::from_fn(|j| {
            // SAFETY: the caller guarantees `row` readable values (`row / PER` units).
            let src = unsafe { std::slice::from_raw_parts(rows[j], row / T::PER) };
            match T::as_f32(src) {
                // SAFETY: f32 storage: the same memory, alive for the whole call.
                Some(r) => unsafe { std::slice::from_raw_parts(r.as_ptr(), row) },
                None => {
                    let dst = &mut buf[j * row..(j + 1) * row];
                    T::widen(src, dst);
                    // SAFETY: `buf`'s rows are disjoint and not written again in this call.
                    unsafe { std::slice::from_raw_parts(dst.as_ptr(), row) }
                }
            }
        });
        for h in 0..row / d {
            let rows_h: [&[f32]; VB] = wide.map(|r| &r[h * d..(h + 1) * d]);
            for g in 0..group {
                let hd = h * group + g;
                // SAFETY: `hd < heads`, inside every weight row (the caller's contract).
                let wg: [f32; VB] = std::array::from_fn(|j| unsafe { *w[j].add(hd) });
                portable_axpy_block::<Self>(&mut acc[hd * d..(hd + 1) * d], &wg, &rows_h);
            }
        }
    }
}

/// Separate multiply and add (any x86-64 / other targets).
struct Plain;
impl Madd for Plain {
    #[inline(always)]
    fn madd(acc: f32, a: f32, b: f32) -> f32 {
        acc + a * b
    }
}

/// Fused multiply-add and AVX2 loops (only called from `#[target_feature(enable =
/// "avx2,fma,f16c")]` code, after [`wide_loops`] said yes).
#[cfg(target_arch = "x86_64")]
struct Fused;
#[cfg(target_arch = "x86_64")]
impl Madd for Fused {
    #[inline(always)]
    fn madd(acc: f32, a: f32, b: f32) -> f32 {
        a.mul_add(b, acc)
    }

    #[inline(always)]
    fn group_dots(q: &[f32], k: &[f32], out: &mut [f32]) {
        // SAFETY: `Fused` is only used from functions compiled with AVX2 and FMA, which run
        // only after the CPU was checked to have them.
        unsafe { avx2::group_dots(q, k, out) }
    }

    #[inline(always)]
    fn axpy_block(acc: &mut [f32], w: &[f32; VB], rows: &[&[f32]; VB]) {
        let d = acc.len();
        let ptrs: [*const f32; VB] = std::array::from_fn(|j| rows[j][..d].as_ptr());
        // SAFETY: as for `group_dots`; every row has at least `d` elements (sliced above).
        unsafe { avx2::axpy_block(acc, w, &ptrs) }
    }

    #[inline(always)]
    unsafe fn tile_dots<T: Elem>(
        q: &[f32],
        keys: &[*const T],
        out: &[*mut f32],
        (d, row): (usize, usize),
        _: &mut [f32],
    ) {
        // SAFETY: AVX2/FMA/F16C as for `group_dots`; pointers by the caller's contract.
        unsafe { avx2::tile_dots(q, keys, out, row / d, d) }
    }

    #[inline(always)]
    unsafe fn token_axpy<T: Elem>(
        acc: &mut [f32],
        w: &[*const f32; VB],
        rows: &[*const T; VB],
        (d, row): (usize, usize),
        _: &mut [f32],
    ) {
        let group = acc.len() / row;
        for h in 0..row / d {
            let first = h * group;
            // SAFETY: `h * d + d <= row` and `first + group <= heads`: inside each row and
            // weight row by the caller's contract.
            let rows_h: [*const T; VB] = rows.map(|p| unsafe { p.add(h * d / T::PER) });
            let w_h: [*const f32; VB] = w.map(|p| unsafe { p.add(first) });
            // SAFETY: AVX2/FMA/F16C as for `group_dots`; `d` elements at each row pointer and
            // `group` weights at each weight pointer.
            unsafe { avx2::group_axpy(&mut acc[first * d..(first + group) * d], &w_h, &rows_h, d) };
        }
    }

    #[inline(always)]
    fn exp_row(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
        // SAFETY: as for `group_dots`.
        unsafe { avx2::exp_row(x, max, sums) }
    }

    #[inline(always)]
    fn exp_rows(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
        // SAFETY: as for `group_dots`.
        unsafe { avx2::exp_rows(x, max, sums) }
    }

    #[inline(always)]
    fn max_rows(x: &[f32], max: &mut [f32]) {
        // SAFETY: as for `group_dots`.
        unsafe { avx2::max_rows(x, max) }
    }

    #[inline(always)]
    fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        // SAFETY: `Fused` runs only where AVX2, FMA and F16C were detected.
        unsafe { T::widen_avx2(src, dst) }
    }
}

/// Dot products of `N` query rows (`q`, `N x d`) with one key row, in `N x 8` independent
/// accumulators: one pass over the key row serves a whole GQA group, and the independent
/// chains hide the add latency.
#[inline(always)]
fn dots<M: Madd + ?Sized, const N: usize>(q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = k.len();
    let mut acc = [[0f32; 8]; N];
    let chunks = d / 8;
    for c in 0..chunks {
        let kc: &[f32; 8] = k[c * 8..c * 8 + 8].try_into().unwrap();
        for (g, a) in acc.iter_mut().enumerate() {
            let qc: &[f32; 8] = q[g * d + c * 8..g * d + c * 8 + 8].try_into().unwrap();
            for i in 0..8 {
                a[i] = M::madd(a[i], qc[i], kc[i]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        let mut sum = 0.0;
        for i in chunks * 8..d {
            sum = M::madd(sum, q[g * d + i], k[i]);
        }
        out[g] = sum + ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
}

/// Dot products of every query row of a group (`group x d`) with one key row.
#[inline(always)]
fn group_dots<M: Madd>(q: &[f32], k: &[f32], out: &mut [f32]) {
    M::group_dots(q, k, out)
}

/// [`Madd::group_dots`] in portable code: 4-row blocks, then the 1..3 remaining rows together.
#[inline(always)]
fn portable_group_dots<M: Madd + ?Sized>(q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = k.len();
    let group = out.len();
    let mut g = 0;
    while g + 4 <= group {
        dots::<M, 4>(&q[g * d..], k, &mut out[g..g + 4]);
        g += 4;
    }
    match group - g {
        3 => dots::<M, 3>(&q[g * d..], k, &mut out[g..]),
        2 => dots::<M, 2>(&q[g * d..], k, &mut out[g..]),
        1 => dots::<M, 1>(&q[g * d..], k, &mut out[g..]),
        _ => {}
    }
}

/// Value rows accumulated per block in pass 3.
const VB: usize = 8;

/// `acc += sum_j w[j] * rows[j]` on the widest loops `M` has.
#[inline(always)]
fn axpy_block<M: Madd>(acc: &mut [f32], w: &[f32; VB], rows: &[&[f32]; VB]) {
    M::axpy_block(acc, w, rows)
}

/// [`Madd::axpy_block`] in portable code.
#[inline(always)]
fn portable_axpy_block<M: Madd + ?Sized>(acc: &mut [f32], w: &[f32; VB], rows: &[&[f32]; VB]) {
    let d = acc.len();
    let rows: [&[f32]; VB] = std::array::from_fn(|j| &rows[j][..d]);
    for (i, a) in acc.iter_mut().enumerate() {
        let mut x = *a;
        for j in 0..VB {
            x = M::madd(x, w[j], rows[j][i]);
        }
        *a = x;
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Rotated queries for keys stored rotated ([`crate::kvtype::hadamard`]).
    static Q_ROT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// Use the baseline loops even where AVX2+FMA exist (tests cover both instantiations).
    baseline: bool,
    /// The mass is each slot's peak weight over the rows and query heads of a work item
    /// ([`crate::paged_attention_peak`]), max-combined, instead of their sum.
    peak: bool,
    /// Tables per sequence ([`crate::paged_attention_lanes`]; 1 otherwise): lane `h` serves
    /// query heads `h * heads / lanes ..`; decode calls only.
    lanes: usize,
}

/// A raw output pointer shared by work items that write disjoint index ranges (attention:
/// their own rows x heads; split partials and quantized products: their own chunks).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user writes disjoint index ranges through it (see each use).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One call's inputs, whatever the stored element type.
#[derive(Clone, Copy)]
struct Call<'a, 's> {
    q: &'a [f32],
    out: OutPtr,
    seqs: &'a [SeqQuery<'s>],
    params: &'a AttentionParams,
    dims: Dims,
    want_mass: bool,
    split: Split,
}

/// Paged attention on the CPU; see [`crate::paged_attention`] for the contract.
pub(crate) fn attention(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
) -> Result<Tensor> {
    attention_with(q, store, seqs, params, mass, false, Split::Auto, false)
}

/// Paged attention on the CPU with peak mass; see [`crate::paged_attention_peak`].
pub(crate) fn attention_peak(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    peak: &mut [f32],
) -> Result<Tensor> {
    attention_with(q, store, seqs, params, Some(peak), false, Split::Auto, true)
}

/// Decode attention over per-head lanes on the CPU; see [`crate::paged_attention_lanes`] (which
/// checked the inputs and sends only decode calls here).
pub(crate) fn attention_lanes(
    q: &Tensor,
    store: &KvStore,
    lanes: usize,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
) -> Result<Tensor> {
    attention_inner(
        q,
        store,
        seqs,
        params,
        None,
        false,
        Split::Auto,
        false,
        lanes,
    )
}

#[allow(clippy::too_many_arguments)]
fn attention_with(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
    baseline: bool,
    split: Split,
    peak: bool,
) -> Result<Tensor> {
    attention_inner(q, store, seqs, params, mass, baseline, split, peak, 1)
}

#[allow(clippy::too_many_arguments)]
fn attention_inner(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
    baseline: bool,
    split: Split,
    peak: bool,
    lanes: usize,
) -> Result<Tensor> {
    let (total_q, heads, head_dim) = q.dims3()?;
    let dims = Dims {
        heads,
        kv_heads: store.kv_heads(),
        head_dim,
        block_size: store.block_size(),
        baseline,
        peak,
        lanes,
    };
    let q32 = q.to_dtype(DType::F32)?.contiguous()?;
    let (q_storage, q_layout) = q32.storage_and_layout();
    let q_off = q_layout.start_offset();
    let Storage::Cpu(CpuStorage::F32(q_data)) = &*q_storage else {
        return Err(KernelError::Invalid("queries must be on the CPU".into()));
    };
    let q_data = &q_data[q_off..q_off + total_q * heads * head_dim];
    let mut out = vec![0f32; total_q * heads * head_dim];
    let types = store.types();
    let hd = hadamard_size(head_dim);
    // Keys stored rotated (`H k`): the queries are rotated too, so every score is unchanged.
    // The rotated copy lives in a per-thread buffer reused across calls.
    let mut q_rot = Q_ROT.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let q_data = if types.rotates_k() {
        q_rot.clear();
        q_rot.extend_from_slice(q_data);
        hadamard(&mut q_rot, hd);
        &q_rot[..]
    } else {
        q_data
    };
    let (k_storage, k_layout) = store.k().storage_and_layout();
    let (v_storage, v_layout) = store.v().storage_and_layout();
    let (ko, vo) = (k_layout.start_offset(), v_layout.start_offset());
    let call = Call {
        q: q_data,
        out: OutPtr(out.as_mut_ptr()),
        seqs,
        params,
        dims,
        want_mass: mass.is_some(),
        split,
    };
    let k_rows = Rows::of(&k_storage, ko, types.k);
    let v_rows = Rows::of(&v_storage, vo, types.v);
    let masses = match (k_rows, v_rows) {
        (Some(Rows::F32(k)), Some(Rows::F32(v))) => run(k, v, &call),
        (Some(Rows::BF16(k)), Some(Rows::BF16(v))) => run(k, v, &call),
        // f16 and the block types in any pairing (llama.cpp's `-ctk` / `-ctv`).
        (Some(Rows::F16(k)), Some(v)) => match v {
            Rows::F16(v) => run(k, v, &call),
            Rows::Q8(v) => run(k, v, &call),
            Rows::Q4(v) => run(k, v, &call),
            _ => return Err(pair_error(types)),
        },
        (Some(Rows::Q8(k)), Some(v)) => match v {
            Rows::F16(v) => run(k, v, &call),
            Rows::Q8(v) => run(k, v, &call),
            Rows::Q4(v) => run(k, v, &call),
            _ => return Err(pair_error(types)),
        },
        (Some(Rows::Q4(k)), Some(v)) => match v {
            Rows::F16(v) => run(k, v, &call),
            Rows::Q8(v) => run(k, v, &call),
            Rows::Q4(v) => run(k, v, &call),
            _ => return Err(pair_error(types)),
        },
        (Some(Rows::E4(k)), Some(Rows::E4(v))) => run(k, v, &call),
        (None, _) | (_, None) => {
            return Err(KernelError::DType {
                what: "KvStore (CPU kernel)",
                dtype: store.dtype(),
            })
        }
        _ => return Err(pair_error(types)),
    };
    if let (Some(mass), Some(parts)) = (mass, masses) {
        let mut offset = 0;
        for (s, seq) in seqs.iter().enumerate() {
            let seg = &mut mass[offset..offset + seq.kv.num_slots];
            for part in &parts[s * dims.kv_heads..(s + 1) * dims.kv_heads] {
                for (m, p) in seg.iter_mut().zip(part) {
                    *m = if peak { m.max(*p) } else { *m + p };
                }
            }
            offset += seq.kv.num_slots;
        }
    }
    Q_ROT.with(|cell| *cell.borrow_mut() = q_rot);
    drop(q_storage);
    // Values stored rotated (`H v`): the weighted sum is `H` times the one of the values, and
    // `H` is its own inverse.
    if types.rotates_v() {
        hadamard(&mut out, hd);
    }
    let out = Tensor::from_vec(out, (total_q, heads, head_dim), &Device::Cpu)?;
    Ok(out.to_dtype(q.dtype())?)
}

/// A store tensor's CPU data as rows of its [`KvType`].
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q8(&'a [Q8Block]),
    Q4(&'a [Q4Block]),
    E4(&'a [E4Block]),
}

impl<'a> Rows<'a> {
    /// The data of `storage` from element `offset`, if it is CPU data of type `t`.
    fn of(storage: &'a Storage, offset: usize, t: KvType) -> Option<Self> {
        let Storage::Cpu(cpu) = storage else {
            return None;
        };
        Some(match (cpu, t) {
            (CpuStorage::F32(x), KvType::F32) => Self::F32(&x[offset..]),
            (CpuStorage::F16(x), KvType::F16) => Self::F16(&x[offset..]),
            (CpuStorage::BF16(x), KvType::BF16) => Self::BF16(&x[offset..]),
            (CpuStorage::U8(x), KvType::Q8_0) => Self::Q8(Q8Block::slice(&x[offset..])),
            (CpuStorage::U8(x), KvType::Q4_0) => Self::Q4(Q4Block::slice(&x[offset..])),
            (CpuStorage::U8(x), KvType::E4M3) => Self::E4(E4Block::slice(&x[offset..])),
            _ => return None,
        })
    }
}

/// K and V types the CPU kernel has no instantiation for.
pub(crate) fn pair_error(types: KvTypes) -> KernelError {
    KernelError::Invalid(format!(
        "KV pages of K {} and V {}: f32, bf16 and e4m3 pages pair only with themselves; f16, \
         q8_0 and q4_0 pair with each other",
        types.k, types.v
    ))
}

fn run<K: Elem, V: Elem>(k: &[K], v: &[V], call: &Call<'_, '_>) -> Option<Vec<Vec<f32>>> {
    let Call {
        q,
        out,
        seqs,
        params,
        dims,
        want_mass,
        split,
    } = *call;
    if split::applies(seqs, want_mass, split) || dims.lanes > 1 {
        debug_assert!(split::applies(seqs, want_mass, Split::Auto));
        split::run(k, v, q, out, seqs, params, dims, split);
        return None;
    }
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

/// Whether this call may use the AVX2+FMA+F16C instantiation.
#[cfg(target_arch = "x86_64")]
#[inline]
fn wide_loops(dims: Dims) -> bool {
    !dims.baseline
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// All query rows and query heads of one sequence that read KV head `h`, on the widest
/// instruction set the CPU has.
#[allow(clippy::too_many_arguments)]
fn work_item<K: Elem, V: Elem>(
    k: &[K],
    v: &[V],
    q: &[f32],
    out: OutPtr,
    seq: &SeqQuery<'_>,
    h: usize,
    params: &AttentionParams,
    dims: Dims,
    want_mass: bool,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if wide_loops(dims) {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { work_item_avx2(k, v, q, out, seq, h, params, dims, want_mass) };
    }
    work_item_body::<K, V, Plain>(k, v, q, out, seq, h, params, dims, want_mass)
}

/// [`work_item_body`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn work_item_avx2<K: Elem, V: Elem>(
    k: &[K],
    v: &[V],
    q: &[f32],
    out: OutPtr,
    seq: &SeqQuery<'_>,
    h: usize,
    params: &AttentionParams,
    dims: Dims,
    want_mass: bool,
) -> Option<Vec<f32>> {
    work_item_body::<K, V, Fused>(k, v, q, out, seq, h, params, dims, want_mass)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn work_item_body<K: Elem, V: Elem, M: Madd>(
    k: &[K],
    v: &[V],
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
        ..
    } = dims;
    let group = heads / kv_heads;
    let n = seq.kv.num_slots;
    let mut mass = want_mass.then(|| vec![0f32; n]);
    // Scratch is taken out of the thread-local rather than used inside `with`'s closure: a
    // closure would be compiled without this function's target features (no FMA inlining).
    let mut scratch = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        // Layout: scores [n x group] (slot-major: one slot's group scores are adjacent) |
        // widened rows [VB x d] | a zero row [d] | accumulators [group x d].
        let need = group * n + VB * d + d + group * d;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (scores, rest) = scratch.split_at_mut(group * n);
        let (rows, rest) = rest.split_at_mut(VB * d);
        let (zero, acc) = rest.split_at_mut(d);
        zero.fill(0.0);
        let zero: &[f32] = zero;
        let acc = &mut acc[..group * d];
        // Row offsets in stored units: `d / PER` per (slot, KV head) row of each of K and V.
        let (dk, dv) = (d / K::PER, d / V::PER);
        let k_row = |page: u32, off: usize| ((page as usize * bs + off) * kv_heads + h) * dk;
        let v_row = |page: u32, off: usize| ((page as usize * bs + off) * kv_heads + h) * dv;
        for r in 0..seq.num_q {
            let qrow = seq.q_start + r;
            let qs = &q[(qrow * heads + h * group) * d..(qrow * heads + (h + 1) * group) * d];
            let (lo, hi) = params.visible(seq.first_slot + r, n);
            let mut max = vec_max_init(group);
            // Pass 1: scores, one pass over each key row for the whole group.
            for s in lo..hi {
                prefetch_slot(k, seq, s + PREFETCH, hi, bs, &k_row, dk);
                let sc = &mut scores[s * group..(s + 1) * group];
                if !seq.kv.is_valid(s) {
                    sc.fill(f32::NEG_INFINITY);
                    continue;
                }
                let base = k_row(seq.kv.pages[s / bs], s % bs);
                let src = &k[base..base + dk];
                let key = match K::as_f32(src) {
                    Some(key) => key,
                    None => {
                        let row = &mut rows[..d];
                        M::widen::<K>(src, row);
                        &*row
                    }
                };
                group_dots::<M>(qs, key, sc);
                for (g, x) in sc.iter_mut().enumerate() {
                    *x *= params.scale;
                    if *x > max[g] {
                        max[g] = *x;
                    }
                }
            }
            // Pass 2: softmax weights (in place, normalised) per head.
            let mut sum = [0f32; MAX_GROUP];
            M::exp_rows(
                &mut scores[lo * group..hi * group],
                &max[..group],
                &mut sum[..group],
            );
            for x in &mut sum[..group] {
                *x = if *x > 0.0 { 1.0 / *x } else { 0.0 };
            }
            // Pass 3: weighted V rows into f32 accumulators, VB slots at a time, so each
            // accumulator is loaded and stored once per block rather than once per slot.
            acc.fill(0.0);
            let mut s = lo;
            while s < hi {
                let mut block: [*const f32; VB] = [zero.as_ptr(); VB];
                let mut w = [0f32; VB * MAX_GROUP];
                let mut count = 0;
                while count < VB && s < hi {
                    prefetch_slot(v, seq, s + PREFETCH, hi, bs, &v_row, dv);
                    if seq.kv.is_valid(s) {
                        let base = v_row(seq.kv.pages[s / bs], s % bs);
                        let src = &v[base..base + dv];
                        block[count] = match V::as_f32(src) {
                            Some(value) => value.as_ptr(),
                            None => {
                                let dst = &mut rows[count * d..(count + 1) * d];
                                M::widen::<V>(src, dst);
                                dst.as_ptr()
                            }
                        };
                        let (mut slot_mass, mut slot_peak) = (0.0, 0f32);
                        for g in 0..group {
                            let x = scores[s * group + g] * sum[g];
                            w[g * VB + count] = x;
                            slot_mass += x;
                            slot_peak = slot_peak.max(x);
                        }
                        if let Some(m) = mass.as_mut() {
                            m[s] = if dims.peak {
                                m[s].max(slot_peak)
                            } else {
                                m[s] + slot_mass
                            };
                        }
                        count += 1;
                    }
                    s += 1;
                }
                // SAFETY: every pointer is the start of `d` live f32s: a row of `v` (f32
                // storage), a row of `rows`, or `zero`; none is written while `block` is used.
                let block: [&[f32]; VB] =
                    block.map(|p| unsafe { std::slice::from_raw_parts(p, d) });
                for (g, a) in acc.chunks_exact_mut(d).enumerate() {
                    let wg: &[f32; VB] = w[g * VB..(g + 1) * VB].try_into().unwrap();
                    axpy_block::<M>(a, wg, &block);
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
    }
    SCRATCH.with(|cell| *cell.borrow_mut() = scratch);
    mass
}

/// Slots ahead whose rows are prefetched. One (slot, KV head) row is `head_dim` elements at a
/// stride of `kv_heads x head_dim` (the page layout keeps a token's heads together), a pattern
/// the hardware prefetchers do not follow across 4 KiB pages; without this, long contexts are
/// bound by memory latency, not bandwidth.
const PREFETCH: usize = 6;

/// Prefetches the row of logical slot `s` (if visible and held) into the cache.
#[inline(always)]
fn prefetch_slot<T>(
    data: &[T],
    seq: &SeqQuery<'_>,
    s: usize,
    hi: usize,
    bs: usize,
    slot_row: &impl Fn(u32, usize) -> usize,
    d: usize,
) {
    if s >= hi {
        return;
    }
    let page = seq.kv.pages[s / bs];
    let base = slot_row(page, s % bs);
    prefetch(&data[base..base + d]);
}

/// Prefetches every cache line of `row` into L1.
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(row);
        let ptr = row.as_ptr().cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: `line < bytes`, so the address lies inside `row`; a prefetch has no
            // architectural effect and SSE is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Largest GQA group handled with stack arrays.
pub(crate) const MAX_GROUP: usize = 64;

#[inline]
fn vec_max_init(group: usize) -> [f32; MAX_GROUP] {
    debug_assert!(group <= MAX_GROUP);
    [f32::NEG_INFINITY; MAX_GROUP]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::dense_attention;
    use layerkv::TableView;
    // NaN-aware: NaN anywhere, or an unmatched infinity, fails `d < tol`.
    use layerkv_testkit::max_abs_diff;

    /// Both instantiations of the loops (baseline and AVX2+FMA where the CPU has them) against
    /// the dense reference, with a GQA group of 6 (one 4-wide block + two singles), head_dim 20
    /// (a tail after the 8-wide chunks), f32 and f16.
    #[test]
    fn baseline_and_wide_loops_match_the_reference() {
        for dtype in [DType::F32, DType::F16] {
            let dev = Device::Cpu;
            let mut store = KvStore::new(6, 4, 2, 20, dtype, &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (24, 2, 20), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (24, 2, 20), &dev).unwrap();
            let slots: Vec<u32> = (0..24).rev().collect();
            store.write(&slots, &k, &v).unwrap();
            let pages = [5u32, 2, 0, 3, 1];
            let valid = [0b1111_0111_1111_1101_1111u64];
            let seqs = [SeqQuery {
                kv: TableView {
                    pages: &pages,
                    num_slots: 19,
                    valid: Some(&valid),
                },
                q_start: 0,
                num_q: 3,
                first_slot: 16,
            }];
            let params = AttentionParams {
                scale: 0.3,
                window: Some(12),
                include_diagonal: true,
            };
            let q = Tensor::randn(0f32, 1.0, (3, 12, 20), &dev).unwrap();
            let (want, want_mass) = dense_attention(&q, &store, &seqs, &params).unwrap();
            for baseline in [true, false] {
                let mut mass = vec![0f32; 19];
                let got = attention_with(
                    &q,
                    &store,
                    &seqs,
                    &params,
                    Some(&mut mass),
                    baseline,
                    Split::Auto,
                    false,
                )
                .unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-5, "{dtype:?} baseline={baseline}: {diff}");
                for (m, w) in mass.iter().zip(&want_mass) {
                    assert!((m - w).abs() < 1e-4, "{dtype:?} baseline={baseline}: mass");
                }
                // Peak mass, max-combined into a buffer that already holds some values.
                let (_, want_peak) =
                    crate::reference::dense_attention_peak(&q, &store, &seqs, &params).unwrap();
                let mut peak: Vec<f32> = (0..19).map(|s| (s % 3) as f32 * 0.2).collect();
                let before = peak.clone();
                let got = attention_with(
                    &q,
                    &store,
                    &seqs,
                    &params,
                    Some(&mut peak),
                    baseline,
                    Split::Auto,
                    true,
                )
                .unwrap();
                assert!(max_abs_diff(&got, &want) < 1e-5);
                for (s, ((p, w), b)) in peak.iter().zip(&want_peak).zip(&before).enumerate() {
                    let want = w.max(*b);
                    assert!(
                        (p - want).abs() < 1e-5,
                        "{dtype:?} baseline={baseline} slot {s}: peak {p}, want {want}"
                    );
                }
                assert!(
                    want_peak.iter().zip(&want_mass).any(|(p, m)| m - p > 0.1),
                    "peak and sum must differ here, or the check is vacuous"
                );
            }
        }
    }
    /// Quantized pages (Q8_0, Q4_0, e4m3, and K/V pairs with f16) against "dequantize, then the
    /// dense reference": prefill rows with mass and peak mass (the per-head path) and decode
    /// (the split path, partitions of one page and automatic), both loop instantiations, head
    /// dims of one and three blocks, odd lengths across page boundaries, holes.
    #[test]
    fn quantized_pages_match_dequantize_then_reference() {
        let dev = Device::Cpu;
        let pairs = [
            (KvType::Q8_0, KvType::Q8_0),
            (KvType::Q4_0, KvType::Q4_0),
            (KvType::Q8_0, KvType::Q4_0),
            (KvType::F16, KvType::Q8_0),
            (KvType::Q4_0, KvType::F16),
            (KvType::E4M3, KvType::E4M3),
        ];
        for ((k_type, v_type), (kv_heads, d, heads)) in pairs
            .into_iter()
            .flat_map(|p| [(2, 32, 6), (1, 96, 3), (3, 64, 9)].map(|s| (p, s)))
        {
            // Rotated rows, and for one shape the plain ones.
            let types = KvTypes::new(k_type, v_type).with_rotation(d != 96);
            let bs = 4;
            let mut store = KvStore::with_types(12, bs, kv_heads, d, types, &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (48, kv_heads, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (48, kv_heads, d), &dev).unwrap();
            let slots: Vec<u32> = (0..48).rev().collect();
            store.write(&slots, &k, &v).unwrap();
            // The pages hold rounded values: not the f32 input, or the check below would not
            // see a kernel that ignored the scales.
            let stored = store.k_f32().unwrap();
            assert!(max_abs_diff(&stored.reshape((48, kv_heads, d)).unwrap(), &k) > 1e-4);
            let pages = [7u32, 2, 11, 0, 5, 9, 3];
            let valid = [0b1101_1111_1111_1011_1111_1111_1110u64];
            let prefill = [SeqQuery {
                kv: TableView {
                    pages: &pages,
                    num_slots: 27,
                    valid: Some(&valid),
                },
                q_start: 0,
                num_q: 3,
                first_slot: 24,
            }];
            let params = AttentionParams {
                scale: 0.2,
                window: None,
                include_diagonal: true,
            };
            let what = format!("K {k_type} V {v_type} kv_heads={kv_heads} d={d}");
            let q = Tensor::randn(0f32, 1.0, (3, heads, d), &dev).unwrap();
            let (want, want_mass) = dense_attention(&q, &store, &prefill, &params).unwrap();
            let (_, want_peak) =
                crate::reference::dense_attention_peak(&q, &store, &prefill, &params).unwrap();
            for baseline in [true, false] {
                let mut mass = vec![0f32; 27];
                let got = attention_with(
                    &q,
                    &store,
                    &prefill,
                    &params,
                    Some(&mut mass),
                    baseline,
                    Split::Auto,
                    false,
                )
                .unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-5, "{what} prefill baseline={baseline}: {diff}");
                for (m, w) in mass.iter().zip(&want_mass) {
                    assert!((m - w).abs() < 1e-4, "{what} baseline={baseline}: mass");
                }
                let mut peak = vec![0f32; 27];
                attention_with(
                    &q,
                    &store,
                    &prefill,
                    &params,
                    Some(&mut peak),
                    baseline,
                    Split::Auto,
                    true,
                )
                .unwrap();
                for (p, w) in peak.iter().zip(&want_peak) {
                    assert!((p - w).abs() < 1e-5, "{what} baseline={baseline}: peak");
                }
            }
            let decode = [SeqQuery {
                num_q: 1,
                first_slot: 26,
                ..prefill[0]
            }];
            let q1 = q.narrow(0, 0, 1).unwrap();
            let (want, _) = dense_attention(&q1, &store, &decode, &params).unwrap();
            for split in [Split::Slots(1), Split::Auto, Split::Off] {
                for baseline in [true, false] {
                    let got =
                        attention_with(&q1, &store, &decode, &params, None, baseline, split, false)
                            .unwrap();
                    let diff = max_abs_diff(&got, &want);
                    assert!(
                        diff < 1e-5,
                        "{what} decode {split:?} baseline={baseline}: {diff}"
                    );
                }
            }
        }
    }

    /// f32, bf16 and e4m3 pages pair only with themselves: another pairing is a typed error, not a
    /// panic or a silent conversion. The CUDA kernels have an entry point for exactly the
    /// pairings the CPU reads, so both devices refuse the same ones, and every entry named is
    /// in the source's list.
    #[test]
    fn unsupported_kv_pairs_are_refused() {
        let dev = Device::Cpu;
        let seqs = [SeqQuery {
            kv: TableView {
                pages: &[0],
                num_slots: 1,
                valid: None,
            },
            q_start: 0,
            num_q: 1,
            first_slot: 0,
        }];
        let params = AttentionParams {
            scale: 1.0,
            window: None,
            include_diagonal: true,
        };
        let q = Tensor::zeros((1, 1, 32), DType::F32, &dev).unwrap();
        let mut entries = 0;
        for k in KvType::ALL {
            for v in KvType::ALL {
                let types = KvTypes::new(k, v);
                let store = KvStore::with_types(2, 4, 1, 32, types, &dev).unwrap();
                let cpu = attention(&q, &store, &seqs, &params, None);
                if let Err(err) = &cpu {
                    let want = format!("K {k} and V {v}");
                    assert!(err.to_string().contains(&want), "{err}");
                }
                let cuda = crate::cuda::partial_entry(k, v);
                assert_eq!(cuda.is_some(), cpu.is_ok(), "K {k}, V {v}: {cuda:?}");
                entries += usize::from(cpu.is_ok());
            }
            let mass = crate::cuda::mass_entry(k);
            assert!(
                crate::cuda::CUDA_ENTRY_POINTS.contains(&mass.as_str()),
                "{mass}"
            );
        }
        assert_eq!(entries, 12);
        let types = KvTypes::new(KvType::F32, KvType::Q8_0);
        let store = KvStore::with_types(2, 4, 1, 32, types, &dev).unwrap();
        let err = attention(&q, &store, &seqs, &params, None).unwrap_err();
        assert!(err.to_string().contains("K f32 and V q8_0"), "{err}");
    }

    /// The decode split against the dense reference and the per-head path: partitions of one
    /// page, a few pages and automatic; holes, a returned page, windows, upward sharing (no
    /// diagonal), a sequence that sees nothing; both loop instantiations; f32/f16/bf16.
    #[test]
    fn decode_split_matches_the_reference() {
        let dev = Device::Cpu;
        // (kv_heads, head_dim, heads): every GQA group size the AVX2 loops specialise (1-8, and
        // wider groups in pieces of eight), head dims with 16-, 8- and scalar-wide remainders.
        let shapes = [
            (3, 20, 12),
            (2, 24, 2),
            (2, 40, 4),
            (1, 48, 3),
            (2, 16, 10),
            (1, 12, 6),
            (1, 8, 7),
            (1, 32, 8),
            (1, 36, 11),
            (2, 72, 18),
        ];
        for ((kv_heads, d, heads), dtype) in shapes
            .into_iter()
            .flat_map(|s| [DType::F32, DType::F16, DType::BF16].map(|t| (s, t)))
        {
            let bs = 4;
            let mut store = KvStore::new(16, bs, kv_heads, d, dtype, &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (64, kv_heads, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (64, kv_heads, d), &dev).unwrap();
            let slots: Vec<u32> = (0..64).rev().collect();
            store.write(&slots, &k, &v).unwrap();
            let a = [9u32, 2, 14, 0, 7, 3, 11, 5, 1];
            // b's second page holds no valid slot (its bits are clear).
            let b = [4u32, 15, 12, 6, 8];
            let valid_b = [0b11_1111_1111_0000_1111u64];
            let c = [10u32];
            let valid_a = [0b1011_1111_0111_1111_1111_1111_1101_1111_1110u64];
            for (window, include_diagonal) in [(None, true), (Some(9), true), (None, false)] {
                let seqs = [
                    SeqQuery {
                        kv: TableView {
                            pages: &a,
                            num_slots: 35,
                            valid: Some(&valid_a),
                        },
                        q_start: 0,
                        num_q: 1,
                        first_slot: 34,
                    },
                    SeqQuery {
                        kv: TableView {
                            pages: &b,
                            num_slots: 18,
                            valid: Some(&valid_b),
                        },
                        q_start: 1,
                        num_q: 1,
                        first_slot: 17,
                    },
                    SeqQuery {
                        kv: TableView {
                            pages: &c,
                            num_slots: 1,
                            valid: None,
                        },
                        q_start: 2,
                        num_q: 1,
                        first_slot: 0,
                    },
                ];
                let params = AttentionParams {
                    scale: 0.3,
                    window,
                    include_diagonal,
                };
                let q = Tensor::randn(0f32, 1.0, (3, heads, d), &dev).unwrap();
                let (want, _) = dense_attention(&q, &store, &seqs, &params).unwrap();
                for split in [Split::Slots(1), Split::Slots(8), Split::Auto, Split::Off] {
                    for baseline in [true, false] {
                        let got = attention_with(
                            &q, &store, &seqs, &params, None, baseline, split, false,
                        )
                        .unwrap();
                        let diff = max_abs_diff(&got, &want);
                        assert!(
                            diff < 1e-5,
                            "{dtype:?} kv_heads={kv_heads} d={d} heads={heads} {window:?} \
                             diag={include_diagonal} {split:?} baseline={baseline}: {diff}"
                        );
                    }
                }
            }
        }
    }

    /// Decode over per-head lanes (one table per lane, as `paged_attention_lanes` reads them)
    /// against the dense reference run on lane-major queries, lane by lane: lanes of different
    /// lengths, validity masks and pages, one lane that sees nothing and a sequence none of
    /// whose lanes sees anything (zeros), windows, a hidden diagonal, partitions of one page,
    /// two pages and automatic, both instantiations, float and block pages. Seen failing with every lane reading lane 0's table (`seqs[part.seq]` for
    /// `seqs[h * n + part.seq]`) and with each lane's scores written at head 0.
    #[test]
    fn decode_lanes_match_the_reference() {
        let dev = Device::Cpu;
        // (lanes, head_dim, heads): SmolLM2's 3 lanes of 3 heads, lanes of one head, of 8 and
        // of 10 heads (wider than a vector), head dims with remainders.
        let shapes = [(3, 20, 9), (2, 24, 2), (4, 16, 32), (2, 12, 20), (3, 64, 9)];
        let types = [
            KvTypes::both(KvType::F32),
            KvTypes::both(KvType::F16),
            KvTypes::both(KvType::BF16),
            KvTypes::new(KvType::Q8_0, KvType::Q4_0),
        ];
        for ((lanes, d, heads), t) in shapes
            .into_iter()
            .flat_map(|s| types.map(|t| (s, t)))
            .filter(|((_, d, _), t)| !t.k.is_quantized() || d % 32 == 0)
        {
            let bs = 4;
            let mut store = KvStore::with_types(24, bs, 1, d, t, &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (96, 1, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (96, 1, d), &dev).unwrap();
            let slots: Vec<u32> = (0..96).rev().collect();
            store.write(&slots, &k, &v).unwrap();
            // Per lane (tables cycle over these): pages, slots, validity.
            type Table<'a> = (&'a [u32], usize, Option<&'a [u64]>);
            let tables: [Table<'_>; 4] = [
                (
                    &[9, 2, 14, 0, 7, 3, 11, 5, 1],
                    35,
                    Some(&[0b1011_1111_0111_1111_1111_1111_1101_1111_1110]),
                ),
                (&[4, 15, 12, 6, 8], 18, Some(&[0b11_1111_1111_0000_1111])),
                (&[10], 1, None),
                (&[16, 17, 18, 19, 20, 21, 22], 27, None),
            ];
            // Sequence 1's lane 1 sees nothing (every slot evicted), and no lane of sequence 2.
            let none = [0u64];
            for (window, include_diagonal) in [(None, true), (Some(9), true), (None, false)] {
                let mut seqs = Vec::new();
                for h in 0..lanes {
                    for i in 0..3 {
                        let (pages, num_slots, valid) = tables[(h + i) % tables.len()];
                        let valid = if (i, h) == (1, 1) || i == 2 {
                            Some(&none[..])
                        } else {
                            valid
                        };
                        seqs.push(SeqQuery {
                            kv: TableView {
                                pages,
                                num_slots,
                                valid,
                            },
                            q_start: i,
                            num_q: 1,
                            first_slot: num_slots - 1,
                        });
                    }
                }
                let params = AttentionParams {
                    scale: 0.3,
                    window,
                    include_diagonal,
                };
                let q = Tensor::randn(0f32, 1.0, (3, heads, d), &dev).unwrap();
                // The reference: lane-major queries, each (lane, sequence) a sequence of its own.
                let per = heads / lanes;
                let q_lanes = q
                    .reshape((3, lanes, per, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((lanes * 3, per, d))
                    .unwrap();
                let lane_seqs: Vec<SeqQuery<'_>> = seqs
                    .iter()
                    .enumerate()
                    .map(|(j, s)| SeqQuery { q_start: j, ..*s })
                    .collect();
                let (want, _) = dense_attention(&q_lanes, &store, &lane_seqs, &params).unwrap();
                let want = want
                    .reshape((lanes, 3, per, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((3, heads, d))
                    .unwrap();
                let label = format!(
                    "{t} lanes={lanes} d={d} heads={heads} {window:?} diag={include_diagonal}"
                );
                for split in [Split::Slots(1), Split::Slots(8), Split::Auto] {
                    for baseline in [true, false] {
                        let got = attention_inner(
                            &q, &store, &seqs, &params, None, baseline, split, false, lanes,
                        )
                        .unwrap();
                        let diff = max_abs_diff(&got, &want);
                        assert!(diff < 1e-5, "{label} {split:?} baseline={baseline}: {diff}");
                    }
                }
                // The public entry, and its lane-major path for rows of more than one query.
                let got = crate::paged_attention_lanes(&q, &store, lanes, &seqs, &params).unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-5, "{label} paged_attention_lanes: {diff}");
            }
        }
    }

    /// `paged_attention_lanes` refuses lanes that do not divide the heads or the sequences, and
    /// lanes of one sequence at different query rows, naming what is wrong.
    #[test]
    fn lanes_refuse_mismatched_inputs() {
        let dev = Device::Cpu;
        let store = KvStore::new(4, 4, 1, 8, DType::F32, &dev).unwrap();
        let q = Tensor::zeros((2, 6, 8), DType::F32, &dev).unwrap();
        let pages = [0u32, 1];
        let seq = |q_start| SeqQuery {
            kv: TableView {
                pages: &pages,
                num_slots: 5,
                valid: None,
            },
            q_start,
            num_q: 1,
            first_slot: 4,
        };
        let params = AttentionParams {
            scale: 1.0,
            window: None,
            include_diagonal: true,
        };
        let err = |lanes, seqs: &[SeqQuery<'_>]| {
            crate::paged_attention_lanes(&q, &store, lanes, seqs, &params)
                .unwrap_err()
                .to_string()
        };
        assert!(err(4, &[seq(0); 4]).contains("4 lanes"));
        assert!(err(3, &[seq(0); 4]).contains("4 sequences a multiple"));
        assert!(err(0, &[]).contains("0 lanes"));
        let e = err(2, &[seq(0), seq(1), seq(1), seq(0)]);
        assert!(e.contains("sequence 0 lane 1"), "{e}");
        let ok = crate::paged_attention_lanes(&q, &store, 3, &[seq(0), seq(0), seq(0)], &params);
        assert_eq!(ok.unwrap().dims(), &[2, 6, 8]);
    }
}
