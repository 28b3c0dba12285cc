//! The int8 GEMM of every kernel type on AVX-512 VNNI: the products of many activation rows
//! (prefill, batched decode), where the per-row dot products of [`super::avx2`] unpack each
//! weight block once per four rows and spend most of their instructions on scaling.
//!
//! Weight rows are packed in groups of [`GROUP`] (one per i32 lane of a 512-bit register), as
//! llama.cpp's repacked `q4_0_8x8` layout does with eight: for each block, register `g` holds
//! bytes `4g..4g + 4` of the block's unsigned values (see [`super::avx2::Unpack`]; Q8_0 as
//! `q + 128` with `m = -128 d`) of all sixteen rows, then the sixteen `d` and the sixteen `m`.
//! One `dpbusd` per four values then multiplies sixteen rows by the same four activation bytes
//! (broadcast), so a block costs eight `dpbusd` per activation row and one scaling for the
//! sixteen rows: `acc += cvt(dot) * d_w * d_x + m_w * s_x`, against the sixteen scalings the
//! per-row kernels need.
//!
//! The K-quants pack the same way per scale group (32 values for Q4_K and Q5_K, 16 for Q6_K):
//! the group's values as unsigned bytes ([`super::avx2::UnpackK`]), then `a_g` and `b_g` of
//! `w = a_g q + b_g` for the sixteen rows; a super-block sums `cvt(dot_g) a_g + b_g sum_g(q_x)`
//! over its groups (the group sums from Q8_K's `bsums`) and scales the sum by `d_x` once.
//!
//! Packing happens per call, a few groups at a time into a per-thread scratch that stays in L2
//! while every activation row passes (it costs about what a few activation rows cost, so
//! [`super::GEMM_FROM_ROWS`] rows are needed to pay for it); the weights stay in the file's
//! blocks in memory. No i32 lane overflows: 32 products of at most 255 * 128 per block.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::avx2::{Q8_0Offset, Unpack, UnpackK, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K};
use super::{BlockQ8K, BlockQ8_1, WeightType, QK, QK_K};

/// Weight rows in a packed group: one per i32 lane.
const GROUP: usize = 16;
/// Weight rows packed at a time: their blocks stay in L2 while the activation rows pass.
const PACK_ROWS: usize = 2 * GROUP;
/// Activation rows a pass over the packed rows covers (they stay in L2 with them).
const ACT_TILE: usize = 64;
/// Activation rows one microkernel call computes against a group.
const TILE: usize = 4;

thread_local! {
    /// Packed weight groups; 64-byte units, so every packed block starts on a cache line.
    static PACKED: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// `y[i * n + j] = dot(weight row j, activation row i)` for the weight rows `first..first +
/// rows` and every activation row `0..m`, for a 32-element `ty`.
///
/// # Safety
/// AVX2, FMA, F16C, AVX-512F and AVX-512 VNNI must be present; `w` holds `first + rows` rows
/// of `kb` blocks, `x` holds `m * kb` blocks, `y` points to `m * n` writable values of which
/// no other thread writes columns `first..first + rows` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_q8_1(
    ty: WeightType,
    w: &[u8],
    kb: usize,
    first: usize,
    rows: usize,
    x: &[BlockQ8_1],
    m: usize,
    y: *mut f32,
    n: usize,
) {
    let args = (w, kb, first, rows, x, m, y, n);
    // SAFETY: the caller's.
    unsafe {
        match ty {
            WeightType::Q4_0 => gemm::<Small<Q4_0>>(args),
            WeightType::Q4_1 => gemm::<Small<Q4_1>>(args),
            WeightType::Q5_0 => gemm::<Small<Q5_0>>(args),
            WeightType::Q5_1 => gemm::<Small<Q5_1>>(args),
            WeightType::Q8_0 => gemm::<Small<Q8_0Offset>>(args),
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
                unreachable!("{ty:?} dots Q8_K blocks")
            }
        }
    }
}

/// [`gemm_q8_1`] for a K-quant `ty` and Q8_K activations.
///
/// # Safety
/// As [`gemm_q8_1`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_q8k(
    ty: WeightType,
    w: &[u8],
    kb: usize,
    first: usize,
    rows: usize,
    x: &[BlockQ8K],
    m: usize,
    y: *mut f32,
    n: usize,
) {
    let args = (w, kb, first, rows, x, m, y, n);
    // SAFETY: the caller's.
    unsafe {
        match ty {
            WeightType::Q4K => gemm::<Super<Q4K, 8>>(args),
            WeightType::Q5K => gemm::<Super<Q5K, 8>>(args),
            WeightType::Q6K => gemm::<Super<Q6K, 4>>(args),
            _ => unreachable!("{ty:?} dots Q8_1 blocks"),
        }
    }
}

/// A GEMM's arguments: weight bytes, blocks a row, first row, rows, activations, activation
/// rows, output, output columns.
type Args<'a, A> = (
    &'a [u8],
    usize,
    usize,
    usize,
    &'a [A],
    usize,
    *mut f32,
    usize,
);

/// How a family of types packs a group of sixteen weight rows and dots it.
trait Packing {
    /// The activation blocks.
    type Act;
    /// Bytes of a weight row's block in the file.
    const BLOCK_BYTES: usize;
    /// Bytes of one block of sixteen packed rows (a multiple of 64).
    const PACKED_BYTES: usize;
    /// Packs `valid` (at most [`GROUP`]) rows of `kb` blocks, `row_bytes` apart from `src`,
    /// into `dst` (`kb * PACKED_BYTES` bytes); missing rows are zeros.
    ///
    /// # Safety
    /// AVX2, FMA, F16C and AVX-512F must be present; the lengths as said.
    unsafe fn pack(src: &[u8], row_bytes: usize, valid: usize, kb: usize, dst: *mut u8);
    /// The sixteen rows packed at `pk` (`kb` blocks) against `C` activation rows (`x`,
    /// `stride` blocks apart): lane `r` of result `c` is `dot(row r, activation row c)`.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 VNNI must be present; the lengths as said.
    unsafe fn kernel<const C: usize>(
        pk: *const u8,
        kb: usize,
        x: *const Self::Act,
        stride: usize,
    ) -> [__m512; C];
}

/// The 32-element types: one group a block.
struct Small<U>(std::marker::PhantomData<U>);
/// The K-quants, `W` registers (`4 W` values) a scale group.
struct Super<U, const W: usize>(std::marker::PhantomData<U>);

/// The GEMM over one run of weight rows for a [`Packing`].
///
/// # Safety
/// As [`gemm_q8_1`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni")]
unsafe fn gemm<P: Packing>((w, kb, first, rows, x, m, y, n): Args<'_, P::Act>) {
    let row_bytes = kb * P::BLOCK_BYTES;
    let group_bytes = kb * P::PACKED_BYTES;
    PACKED.with_borrow_mut(|packed| {
        let units = PACK_ROWS / GROUP * group_bytes / 64;
        if packed.len() < units {
            packed.resize(units, _mm512_setzero_si512());
        }
        let base = packed.as_mut_ptr() as *mut u8;
        for p in (0..rows).step_by(PACK_ROWS) {
            let pr = PACK_ROWS.min(rows - p);
            let groups = pr.div_ceil(GROUP);
            for g in 0..groups {
                let valid = GROUP.min(pr - g * GROUP);
                let src = &w[(first + p + g * GROUP) * row_bytes..];
                // SAFETY: `valid` rows of `row_bytes` from `src` are inside `w`; group `g` of
                // the scratch is `group_bytes` long (sized above).
                unsafe { P::pack(src, row_bytes, valid, kb, base.add(g * group_bytes)) };
            }
            for tile in (0..m).step_by(ACT_TILE) {
                let tile_end = (tile + ACT_TILE).min(m);
                for g in 0..groups {
                    let valid = GROUP.min(pr - g * GROUP);
                    let col = first + p + g * GROUP;
                    // SAFETY: group `g` was packed above; rows `i..i + TILE` (or `i`) of `x`
                    // are below `m`; `y`'s columns `col..col + valid` are the caller's.
                    unsafe {
                        let pk = base.add(g * group_bytes);
                        let mut i = tile;
                        while i + TILE <= tile_end {
                            let acc = P::kernel::<TILE>(pk, kb, x.as_ptr().add(i * kb), kb);
                            for (c, a) in acc.iter().enumerate() {
                                store(*a, y.add((i + c) * n + col), valid);
                            }
                            i += TILE;
                        }
                        while i < tile_end {
                            let [a] = P::kernel::<1>(pk, kb, x.as_ptr().add(i * kb), kb);
                            store(a, y.add(i * n + col), valid);
                            i += 1;
                        }
                    }
                }
            }
        }
    });
}

/// Writes the first `valid` lanes of `v` to `p`.
///
/// # Safety
/// AVX-512F must be present; `valid` (at most 16) values must be writable at `p`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store(v: __m512, p: *mut f32, valid: usize) {
    // SAFETY: the caller's `valid` values.
    unsafe {
        if valid == GROUP {
            _mm512_storeu_ps(p, v);
        } else {
            _mm512_mask_storeu_ps(p, ((1u32 << valid) - 1) as __mmask16, v);
        }
    }
}

/// `u32` `t` of each of sixteen rows' values (`q[r]`) as lane `r` of one register, stored at
/// `out`.
///
/// # Safety
/// AVX-512F must be present; 64 bytes must be writable at `out`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_lanes<const N: usize>(q: &[[u32; N]; GROUP], t: usize, out: *mut u8) {
    let lanes = _mm512_set_epi32(
        q[15][t] as i32,
        q[14][t] as i32,
        q[13][t] as i32,
        q[12][t] as i32,
        q[11][t] as i32,
        q[10][t] as i32,
        q[9][t] as i32,
        q[8][t] as i32,
        q[7][t] as i32,
        q[6][t] as i32,
        q[5][t] as i32,
        q[4][t] as i32,
        q[3][t] as i32,
        q[2][t] as i32,
        q[1][t] as i32,
        q[0][t] as i32,
    );
    // SAFETY: the caller's 64 bytes.
    unsafe { _mm512_storeu_si512(out as *mut __m512i, lanes) };
}

/// Sixteen f32 at `out`.
///
/// # Safety
/// AVX-512F must be present; 64 bytes must be writable at `out`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store16(v: &[f32; GROUP], out: *mut u8) {
    // SAFETY: the caller's 64 bytes; `v` is 16 values.
    unsafe { _mm512_storeu_ps(out as *mut f32, _mm512_loadu_ps(v.as_ptr())) };
}

/// Two chains of `dpbusd` over `W` registers of weights against the activation bytes at `q`
/// (four per register, broadcast), summed.
///
/// # Safety
/// AVX-512F and AVX-512 VNNI must be present; `4 W` bytes must be readable at `q`.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dots<const W: usize>(w: &[__m512i; W], q: *const i32) -> __m512i {
    let (mut i0, mut i1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut j = 0;
    while j < W {
        // SAFETY: the caller's `4 W` bytes.
        unsafe {
            i0 = _mm512_dpbusd_epi32(i0, w[j], _mm512_set1_epi32(q.add(j).read_unaligned()));
            i1 = _mm512_dpbusd_epi32(
                i1,
                w[j + 1],
                _mm512_set1_epi32(q.add(j + 1).read_unaligned()),
            );
        }
        j += 2;
    }
    _mm512_add_epi32(i0, i1)
}

impl<U: Unpack> Packing for Small<U> {
    type Act = BlockQ8_1;
    const BLOCK_BYTES: usize = U::BYTES;
    /// 32 values of 16 rows, 16 `d`, 16 `m` (ten cache lines).
    const PACKED_BYTES: usize = QK * GROUP + 2 * GROUP * 4;

    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn pack(src: &[u8], row_bytes: usize, valid: usize, kb: usize, dst: *mut u8) {
        // Row r's unpacked block, as eight u32 of four values each.
        let mut q = [[0u32; QK / 4]; GROUP];
        let mut d = [0f32; GROUP];
        let mut mn = [0f32; GROUP];
        for b in 0..kb {
            for r in 0..valid {
                // SAFETY: block b of row r is inside `src` (the caller's rows).
                unsafe {
                    let (qv, dm) = U::unpack(src.as_ptr().add(r * row_bytes + b * U::BYTES));
                    _mm256_storeu_si256(q[r].as_mut_ptr() as *mut __m256i, qv);
                    d[r] = _mm_cvtss_f32(dm);
                    mn[r] = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 0b01));
                }
            }
            // SAFETY: block b is `PACKED_BYTES` at `dst` (the caller's); rows past `valid`
            // stay zero (q, d and m).
            unsafe {
                let out = dst.add(b * Self::PACKED_BYTES);
                for t in 0..QK / 4 {
                    store_lanes(&q, t, out.add(64 * t));
                }
                store16(&d, out.add(QK * GROUP));
                store16(&mn, out.add(QK * GROUP + 64));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn kernel<const C: usize>(
        pk: *const u8,
        kb: usize,
        x: *const BlockQ8_1,
        stride: usize,
    ) -> [__m512; C] {
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..kb {
            // SAFETY: block b of the group and of each activation row (the caller's lengths).
            unsafe {
                let blk = pk.add(b * Self::PACKED_BYTES);
                let w: [__m512i; 8] =
                    std::array::from_fn(|g| _mm512_load_si512(blk.add(64 * g) as *const __m512i));
                let dw = _mm512_load_ps(blk.add(QK * GROUP) as *const f32);
                let mw = _mm512_load_ps(blk.add(QK * GROUP + 64) as *const f32);
                for (c, acc) in acc.iter_mut().enumerate() {
                    let yb = &*x.add(c * stride + b);
                    let dot = _mm512_cvtepi32_ps(dots(&w, yb.qs.as_ptr() as *const i32));
                    *acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(yb.d)), *acc);
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(yb.s), *acc);
                }
            }
        }
        acc
    }
}

impl<U: UnpackK, const W: usize> Super<U, W> {
    /// Scale groups a super-block.
    const GROUPS: usize = QK_K / (4 * W);
    /// Bytes of one packed scale group: `W` registers of values, 16 `a`, 16 `b`.
    const GROUP_BYTES: usize = 64 * W + 2 * GROUP * 4;
}

impl<U: UnpackK, const W: usize> Packing for Super<U, W> {
    type Act = BlockQ8K;
    const BLOCK_BYTES: usize = U::BYTES;
    const PACKED_BYTES: usize = Self::GROUPS * Self::GROUP_BYTES;

    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn pack(src: &[u8], row_bytes: usize, valid: usize, kb: usize, dst: *mut u8) {
        debug_assert_eq!(U::GROUP, 4 * W);
        let mut q = [[0u32; QK_K / 4]; GROUP];
        let mut a = [[0f32; 16]; GROUP];
        let mut bias = [[0f32; 16]; GROUP];
        for b in 0..kb {
            for r in 0..valid {
                // SAFETY: block b of row r is inside `src`; `q[r]` is 256 bytes.
                unsafe {
                    let qr = &mut *(q[r].as_mut_ptr() as *mut [u8; QK_K]);
                    U::unpack(
                        src.as_ptr().add(r * row_bytes + b * U::BYTES),
                        qr,
                        &mut a[r],
                        &mut bias[r],
                    );
                }
            }
            for g in 0..Self::GROUPS {
                // SAFETY: group g of block b is `GROUP_BYTES` inside the caller's `dst`; rows
                // past `valid` stay zero.
                unsafe {
                    let out = dst.add(b * Self::PACKED_BYTES + g * Self::GROUP_BYTES);
                    for j in 0..W {
                        store_lanes(&q, g * W + j, out.add(64 * j));
                    }
                    store16(&std::array::from_fn(|r| a[r][g]), out.add(64 * W));
                    store16(&std::array::from_fn(|r| bias[r][g]), out.add(64 * W + 64));
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn kernel<const C: usize>(
        pk: *const u8,
        kb: usize,
        x: *const BlockQ8K,
        stride: usize,
    ) -> [__m512; C] {
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..kb {
            let mut t = [_mm512_setzero_ps(); C];
            for g in 0..Self::GROUPS {
                // SAFETY: group g of block b and each activation row's block b (the caller's
                // lengths).
                unsafe {
                    let blk = pk.add(b * Self::PACKED_BYTES + g * Self::GROUP_BYTES);
                    let w: [__m512i; W] = std::array::from_fn(|j| {
                        _mm512_load_si512(blk.add(64 * j) as *const __m512i)
                    });
                    let aw = _mm512_load_ps(blk.add(64 * W) as *const f32);
                    let bw = _mm512_load_ps(blk.add(64 * W + 64) as *const f32);
                    for (c, t) in t.iter_mut().enumerate() {
                        let yb = &*x.add(c * stride + b);
                        let q = yb.qs.as_ptr().add(4 * W * g) as *const i32;
                        let dot = _mm512_cvtepi32_ps(dots(&w, q));
                        // The group's sum of activation values from the 16-value sums.
                        let sum = if W == 8 {
                            yb.bsums[2 * g] as i32 + yb.bsums[2 * g + 1] as i32
                        } else {
                            yb.bsums[g] as i32
                        };
                        *t = _mm512_fmadd_ps(dot, aw, *t);
                        *t = _mm512_fmadd_ps(bw, _mm512_set1_ps(sum as f32), *t);
                    }
                }
            }
            for (c, (acc, t)) in acc.iter_mut().zip(t).enumerate() {
                // SAFETY: block b of activation row c (the caller's lengths).
                let d = unsafe { (*x.add(c * stride + b)).d };
                *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(d), *acc);
            }
        }
        acc
    }
}
