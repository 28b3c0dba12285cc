//! AVX2+FMA+F16C dot products (llama.cpp's `ggml-cpu/arch/x86/quants.c` scheme; candle's
//! `quantized/avx.rs` is a Rust shape of the same), compiled per function with
//! `#[target_feature]` so a default build has them; the caller checks [`super::has_avx2`].
//!
//! - Q4_0, Q4_1, Q5_0, Q5_1: each block is unpacked to 32 unsigned bytes `q` (0..32) with
//!   `[d, m]` (Q4_0 and Q5_0 as `m = -8 d`, `-16 d`), so one `maddubs` against the i8
//!   activations gives `sum(q q_x)` and the minimum's term is `m s_x`; one weight block is
//!   unpacked once for four activation rows when there are four.
//! - Q8_0: signs moved onto the activations so `maddubs` multiplies |w| by sign(w) x.
//! - Q4_K, Q5_K, Q6_K: each 32 values unpacked to bytes, `maddubs` by the activations, `madd`
//!   by the group's scale into i32, one f32 scaling per super-block; the minimums' term from the
//!   activation's group sums (Q6_K's offset 32 as `maddubs(32, q_x)`); a super-block is
//!   unpacked once for four activation rows when there are four.
//!
//! No product saturates `maddubs`'s i16 pairs: at most 2 * 63 * 128 (Q6_K).

use std::arch::x86_64::*;

use super::{BlockQ8K, BlockQ8_1, WeightType, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK_K};

/// `out[i] = dot(w, x row i)` for rows `from..to` of a 32-element type.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `ty` dots Q8_1; `w` holds `kb` blocks, `x` at least
/// `to * kb` blocks, `out` at least `to` values.
pub(super) unsafe fn rows_q8_1(
    ty: WeightType,
    w: &[u8],
    x: &[BlockQ8_1],
    kb: usize,
    from: usize,
    to: usize,
    out: &mut [f32],
) {
    // SAFETY: the caller's.
    unsafe {
        match ty {
            WeightType::Q4_0 => rows_min::<Q4_0>(w, x, kb, from, to, out),
            WeightType::Q4_1 => rows_min::<Q4_1>(w, x, kb, from, to, out),
            WeightType::Q5_0 => rows_min::<Q5_0>(w, x, kb, from, to, out),
            WeightType::Q5_1 => rows_min::<Q5_1>(w, x, kb, from, to, out),
            WeightType::Q8_0 => rows_q8_0(w, x, kb, from, to, out),
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
                unreachable!("{ty:?} dots Q8_K blocks")
            }
        }
    }
}

/// A K-quant kernel: one weight row (`kb` blocks) against activation rows `i..i + R`.
type KRows<const R: usize> = unsafe fn(&[u8], &[BlockQ8K], usize, usize) -> [f32; R];

/// `out[i] = dot(w, x row i)` for rows `from..to` of a K-quant.
///
/// # Safety
/// As [`rows_q8_1`], with `ty` a K-quant and `x` Q8_K blocks.
pub(super) unsafe fn rows_q8k(
    ty: WeightType,
    w: &[u8],
    x: &[BlockQ8K],
    kb: usize,
    from: usize,
    to: usize,
    out: &mut [f32],
) {
    let (one, four): (KRows<1>, KRows<4>) = match ty {
        WeightType::Q4K => (dot_q4k::<1>, dot_q4k::<4>),
        WeightType::Q5K => (dot_q5k::<1>, dot_q5k::<4>),
        WeightType::Q6K => (dot_q6k::<1>, dot_q6k::<4>),
        _ => unreachable!("{ty:?} dots Q8_1 blocks"),
    };
    let mut i = from;
    while i + 4 <= to {
        // SAFETY: rows i..i + 4 are below `to`; the caller's lengths and features.
        out[i..i + 4].copy_from_slice(&unsafe { four(w, x, kb, i) });
        i += 4;
    }
    while i < to {
        // SAFETY: as above.
        out[i] = unsafe { one(w, x, kb, i) }[0];
        i += 1;
    }
}

/// Bytes ahead of the block being read that a row's dot product asks the cache for: weights
/// stream from memory once per token, and the hardware prefetcher alone left the loads of a
/// decode step's weights waiting on memory (most of the kernel's samples sat on them).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the cache line at `p` (any address: a prefetch never faults, and one past the end of
/// the weights is only wasted).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: a prefetch has no effect on memory and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// Sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The f16 at `p` as f32.
///
/// # Safety
/// F16C must be present; two bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's two bytes.
    let h = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// The 32 nibbles of the 16 bytes at `p` as bytes: low nibbles first, then the high ones.
///
/// # Safety
/// AVX2 must be present; 16 bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's 16 bytes.
    let tmp = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
        _mm256_set1_epi8(0x0F),
    )
}

/// `0x10` in byte `i` where bit `i` of the little-endian u32 at `p` is set, else 0 (the fifth
/// bits of a Q5 block; llama.cpp's `bytes_from_bits_32`).
///
/// # Safety
/// AVX2 must be present; 4 bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    // SAFETY: the caller's 4 bytes.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u32) };
    // Byte i holds byte i / 8 of `bits`; OR-ing every bit but i % 8 makes it all ones iff
    // that bit is set.
    let bytes = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// A 32-element type whose blocks read as `w = d q + m` with `q` unsigned (0..32).
pub(super) trait Unpack {
    /// Bytes a block.
    const BYTES: usize;
    /// The block at `blk`: `(q as 32 bytes, [d, m, 0, 0])`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; `BYTES` bytes must be readable at `blk`.
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128);
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;

/// `[d, -zero * d, 0, 0]` for the f16 `d` at `p`.
///
/// # Safety
/// F16C must be present; two bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn d_offset(p: *const u8, zero: f32) -> __m128 {
    // SAFETY: the caller's.
    let d = unsafe { f16_at(p) };
    _mm_mul_ps(_mm_set1_ps(d), _mm_set_ps(0.0, 0.0, -zero, 1.0))
}

/// `[d, m, 0, 0]` from the two f16 at `p`.
///
/// # Safety
/// F16C must be present; four bytes must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn d_min(p: *const u8) -> __m128 {
    // SAFETY: the caller's.
    _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
        std::ptr::read_unaligned(p as *const i32)
    }))
}

/// Q8_0 read as unsigned bytes: `q + 128` (sign bit flipped) with `m = -128 d`, so it dots as
/// the other types do (the int8 GEMM's `dpbusd` multiplies unsigned weights by signed
/// activations).
pub(super) struct Q8_0Offset;

impl Unpack for Q8_0Offset {
    const BYTES: usize = Q8_0_BLOCK_BYTES;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller's 34 bytes: d, 32 i8 values.
        unsafe {
            let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            (
                _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN)),
                d_offset(blk, 128.0),
            )
        }
    }
}

impl Unpack for Q4_0 {
    const BYTES: usize = 18;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller's 18 bytes: d, 16 bytes of nibbles.
        unsafe { (nibbles(blk.add(2)), d_offset(blk, 8.0)) }
    }
}

impl Unpack for Q4_1 {
    const BYTES: usize = Q4_1_BLOCK_BYTES;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller's 20 bytes: d, m, nibbles.
        unsafe { (nibbles(blk.add(4)), d_min(blk)) }
    }
}

impl Unpack for Q5_0 {
    const BYTES: usize = 22;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller's 22 bytes: d, qh, nibbles.
        unsafe {
            let q = _mm256_or_si256(nibbles(blk.add(6)), fifth_bits(blk.add(2)));
            (q, d_offset(blk, 16.0))
        }
    }
}

impl Unpack for Q5_1 {
    const BYTES: usize = 24;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller's 24 bytes: d, m, qh, nibbles.
        unsafe {
            let q = _mm256_or_si256(nibbles(blk.add(8)), fifth_bits(blk.add(4)));
            (q, d_min(blk))
        }
    }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1` AVX2 path for any [`Unpack`] type: `maddubs` of the
/// unsigned values against the i8 activations, pairs summed to i32, scaled by `d_w * d_x` into
/// an f32 accumulator; the minimum's term `m_w * s_x` summed on the side.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `w` must hold `x.len()` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_min<U: Unpack>(w: &[u8], x: &[BlockQ8_1]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    // Two independent chains (even and odd blocks), so the adds do not wait on each other's
    // latency; named, not an array indexed by `b & 1`, which the compiler kept on the stack
    // (a store and a reload per block).
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // Lane 1 accumulates m_w * s_x (lane 0 holds d_w * d_x sums, unused).
    let (mut mins0, mut mins1) = (_mm_setzero_ps(), _mm_setzero_ps());
    let p = w.as_ptr();
    // One block's `(d_w d_x, m_w s_x)` products and its `d_w d_x`-scaled dot as f32 lanes.
    let block = |b: usize, y: &BlockQ8_1| {
        // SAFETY: block b is inside `w` (the caller's lengths); `y.d` and `y.s` are adjacent
        // f32 (`repr(C)`).
        unsafe {
            let (qx, dm) = U::unpack(p.add(b * U::BYTES));
            let ds = _mm_castpd_ps(_mm_load_sd((y as *const BlockQ8_1).cast::<f64>()));
            let prod = _mm_mul_ps(dm, ds);
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let dot = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy));
            (prod, _mm256_cvtepi32_ps(dot))
        }
    };
    let pairs = x.len() / 2;
    for i in 0..pairs {
        let b = 2 * i;
        prefetch(p.wrapping_add(b * U::BYTES + PREFETCH_AHEAD));
        let (p0, d0) = block(b, &x[b]);
        let (p1, d1) = block(b + 1, &x[b + 1]);
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(p0), d0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(p1), d1, acc1);
        mins0 = _mm_add_ps(mins0, p0);
        mins1 = _mm_add_ps(mins1, p1);
    }
    if x.len() % 2 == 1 {
        let b = x.len() - 1;
        let (p0, d0) = block(b, &x[b]);
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(p0), d0, acc0);
        mins0 = _mm_add_ps(mins0, p0);
    }
    let m = _mm_add_ps(mins0, mins1);
    hsum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1))
}

/// [`dot_min`] of one weight row against four activation rows `i..i + 4` at once: each weight
/// block is unpacked once for the four (prefill's reuse).
///
/// # Safety
/// As [`dot_min`]; `w` holds `kb` blocks, `x` at least `(i + 4) * kb` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_min<U: Unpack>(w: &[u8], x: &[BlockQ8_1], kb: usize, i: usize) -> [f32; 4] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut mins = _mm_setzero_ps();
    let p = w.as_ptr();
    for b in 0..kb {
        // SAFETY: block b of the row and of rows i..i + 4 are in bounds (the caller's
        // lengths).
        unsafe {
            let (qx, dm) = U::unpack(p.add(b * U::BYTES));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_shuffle_ps(dm, dm, 0b01_01_01_01);
            let ys = [
                x.get_unchecked(i * kb + b),
                x.get_unchecked((i + 1) * kb + b),
                x.get_unchecked((i + 2) * kb + b),
                x.get_unchecked((i + 3) * kb + b),
            ];
            mins = _mm_fmadd_ps(m, _mm_set_ps(ys[3].s, ys[2].s, ys[1].s, ys[0].s), mins);
            for r in 0..4 {
                let qy = _mm256_loadu_si256(ys[r].qs.as_ptr() as *const __m256i);
                let dot = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * ys[r].d), _mm256_cvtepi32_ps(dot), acc[r]);
            }
        }
    }
    let mut m = [0f32; 4];
    // SAFETY: four f32 fit in `m`.
    unsafe { _mm_storeu_ps(m.as_mut_ptr(), mins) };
    [
        hsum(acc[0]) + m[0],
        hsum(acc[1]) + m[1],
        hsum(acc[2]) + m[2],
        hsum(acc[3]) + m[3],
    ]
}

/// [`dot_min`] of one weight row against activation rows `from..to` into `out[from..to]`,
/// four rows at a time.
///
/// # Safety
/// As [`dot_min`]; `w` holds `kb` blocks, `x` at least `to * kb` blocks, `out` `to` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_min<U: Unpack>(
    w: &[u8],
    x: &[BlockQ8_1],
    kb: usize,
    from: usize,
    to: usize,
    out: &mut [f32],
) {
    let mut i = from;
    while i + 4 <= to {
        // SAFETY: rows i..i + 4 are below `to`.
        out[i..i + 4].copy_from_slice(&unsafe { dot4_min::<U>(w, x, kb, i) });
        i += 4;
    }
    while i < to {
        // SAFETY: the caller's lengths.
        out[i] = unsafe { dot_min::<U>(w, &x[i * kb..(i + 1) * kb]) };
        i += 1;
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` AVX2 path: signs moved onto the activations so
/// `maddubs` multiplies |w| (unsigned) by sign(w) * x (signed), pairs summed to i32,
/// scaled by `d_w * d_x` into f32 accumulators.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `w` must hold `x.len()` Q8_0 blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0(w: &[u8], x: &[BlockQ8_1]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let p = w.as_ptr();
    // One block's `d_w d_x`-scaled dot, added into `acc`.
    let block = |b: usize, y: &BlockQ8_1, acc: __m256| {
        // SAFETY: block b is inside `w` (34 bytes; the caller's lengths).
        unsafe {
            let blk = p.add(b * Q8_0_BLOCK_BYTES);
            let d = f16_at(blk);
            let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let ax = _mm256_sign_epi8(qw, qw);
            let sy = _mm256_sign_epi8(qy, qw);
            let dot = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy));
            _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(dot), acc)
        }
    };
    // Two chains in named registers (see `dot_min`).
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in 0..x.len() / 2 {
        prefetch(p.wrapping_add(2 * i * Q8_0_BLOCK_BYTES + PREFETCH_AHEAD));
        acc0 = block(2 * i, &x[2 * i], acc0);
        acc1 = block(2 * i + 1, &x[2 * i + 1], acc1);
    }
    if x.len() % 2 == 1 {
        acc0 = block(x.len() - 1, &x[x.len() - 1], acc0);
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// [`dot_q8_0`] of one weight row against activation rows `from..to` into `out[from..to]`.
///
/// # Safety
/// As [`dot_q8_0`]; `w` holds `kb` blocks, `x` at least `to * kb` blocks, `out` `to` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_0(w: &[u8], x: &[BlockQ8_1], kb: usize, from: usize, to: usize, out: &mut [f32]) {
    for i in from..to {
        // SAFETY: the caller's lengths.
        out[i] = unsafe { dot_q8_0(w, &x[i * kb..(i + 1) * kb]) };
    }
}

/// The eight 6-bit scales (bytes 0..8) and eight minimums (bytes 8..16) of a Q4_K/Q5_K block's
/// 12 packed scale bytes at `p` (llama.cpp's `utmp` shuffle).
///
/// # Safety
/// 12 bytes must be readable at `p`.
#[inline]
unsafe fn k4_scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    // SAFETY: the caller's 12 bytes.
    let u = unsafe {
        [
            std::ptr::read_unaligned(p as *const u32),
            std::ptr::read_unaligned(p.add(4) as *const u32),
            std::ptr::read_unaligned(p.add(8) as *const u32),
        ]
    };
    [
        u[0] & KMASK1,
        (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4),
        u[1] & KMASK1,
        ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4),
    ]
}

/// The minimums' term of one Q4_K/Q5_K super-block, `[4]` i32 partial sums of
/// `mn_g * sum_g(q_x)` over the eight 32-groups (the group sums from `bsums`).
///
/// # Safety
/// AVX2 must be present.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_min_term(mins: __m128i, y: &BlockQ8K) -> __m128i {
    // SAFETY: `bsums` is 32 bytes.
    let sums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i) };
    // Pairs of 16-sums: the eight 32-group sums.
    let sums = _mm_hadd_epi16(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256(sums, 1),
    );
    _mm_madd_epi16(mins, sums)
}

/// The activation blocks `b` of rows `i..i + R`.
///
/// # Safety
/// `x` must hold at least `(i + R) * kb` blocks and `b < kb`.
#[inline]
unsafe fn rows_at<const R: usize>(x: &[BlockQ8K], kb: usize, i: usize, b: usize) -> [&BlockQ8K; R] {
    // SAFETY: the caller's bounds.
    std::array::from_fn(|r| unsafe { x.get_unchecked((i + r) * kb + b) })
}

/// `hsum(acc[r]) + ` the four lanes of `acc_m[r]`, for each row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn finish<const R: usize>(acc: [__m256; R], acc_m: [__m128; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[r] = hsum(acc[r]) + _mm_cvtss_f32(m);
    }
    out
}

/// The part of a Q4_K / Q5_K super-block at `blk` that does not depend on its values: adds each
/// row's minimum term `-dmin d_x sum(mn * group sums)` to `acc_m` and returns the eight i16
/// group scales in both halves of a register (for [`group_scales`]).
///
/// # Safety
/// AVX2, FMA and F16C must be present; 16 bytes (d, dmin, scales[12]) must be readable at
/// `blk`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_scales_and_min_terms<const R: usize>(
    blk: *const u8,
    ys: &[&BlockQ8K; R],
    acc_m: &mut [__m128; R],
) -> __m256i {
    // SAFETY: the caller's 16 bytes.
    let (dmin, sm) = unsafe { (f16_at(blk.add(2)), k4_scales_mins(blk.add(4))) };
    // SAFETY: `sm` is 16 bytes.
    let sm = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(sm.as_ptr() as *const __m128i) });
    let mins = _mm256_extracti128_si256(sm, 1);
    for r in 0..R {
        let prod = _mm_cvtepi32_ps(k4_min_term(mins, ys[r]));
        acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-dmin * ys[r].d), prod, acc_m[r]);
    }
    let sc = _mm256_castsi256_si128(sm);
    _mm256_set_m128i(sc, sc)
}

/// Adds the dot products of 64-value group `j` (values `ql` for its first 32, `qh` for the
/// next 32, unsigned) with every row's activations, each half's pairs weighted by its group
/// scale (`lo`, `hi`), into `sumi`.
///
/// # Safety
/// AVX2 must be present.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_group_dots<const R: usize>(
    ys: &[&BlockQ8K; R],
    j: usize,
    (ql, qh): (__m256i, __m256i),
    (lo, hi): (__m256i, __m256i),
    sumi: &mut [__m256i; R],
) {
    for r in 0..R {
        // SAFETY: a Q8_K block holds 256 values; group j's are 64 j .. 64 j + 64.
        let (yl, yh) = unsafe {
            let q8 = ys[r].qs.as_ptr();
            (
                _mm256_loadu_si256(q8.add(64 * j) as *const __m256i),
                _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i),
            )
        };
        let pl = _mm256_madd_epi16(lo, _mm256_maddubs_epi16(ql, yl));
        let ph = _mm256_madd_epi16(hi, _mm256_maddubs_epi16(qh, yh));
        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
    }
}

/// ggml's `ggml_vec_dot_q4_K_q8_K` AVX2 path, for one weight row against activation rows
/// `i..i + R` (each super-block's scales and nibbles unpacked once for the `R`).
///
/// # Safety
/// AVX2, FMA and F16C must be present; `w` must hold `kb` Q4_K blocks, `x` at least
/// `(i + R) * kb` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k<const R: usize>(w: &[u8], x: &[BlockQ8K], kb: usize, i: usize) -> [f32; R] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY: block b (144 bytes: d, dmin, scales[12], qs[128]) is inside `w`; the rows'
        // blocks b are inside `x` (the caller's lengths).
        unsafe {
            let blk = w.as_ptr().add(b * 144);
            let ys = rows_at::<R>(x, kb, i, b);
            let d = f16_at(blk);
            let scales = k4_scales_and_min_terms(blk, &ys, &mut acc_m);
            let q4 = blk.add(16);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let (lo, hi) = group_scales(scales, j);
                let bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
                let ql = _mm256_and_si256(bits, m4);
                let qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                k4_group_dots(&ys, j, (ql, qh), (lo, hi), &mut sumi);
            }
            for r in 0..R {
                let v = _mm256_set1_ps(d * ys[r].d);
                acc[r] = _mm256_fmadd_ps(v, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    finish(acc, acc_m)
}

/// Scales of 32-groups `2 j` and `2 j + 1` in every i16 lane, from the eight i16 scales in
/// both halves of `scales`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group_scales(scales: __m256i, j: usize) -> (__m256i, __m256i) {
    // Bytes 2 g and 2 g + 1 (lane g) into every lane.
    let (g0, g1) = (4 * j as i16, 4 * j as i16 + 2);
    (
        _mm256_shuffle_epi8(scales, _mm256_set1_epi16(g0 | ((g0 + 1) << 8))),
        _mm256_shuffle_epi8(scales, _mm256_set1_epi16(g1 | ((g1 + 1) << 8))),
    )
}

/// ggml's `ggml_vec_dot_q5_K_q8_K` AVX2 path: as [`dot_q4k`] with each value's fifth bit from
/// `qh`.
///
/// # Safety
/// As [`dot_q4k`], with Q5_K blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5k<const R: usize>(w: &[u8], x: &[BlockQ8K], kb: usize, i: usize) -> [f32; R] {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY: block b (176 bytes: d, dmin, scales[12], qh[32], qs[128]) is inside `w`;
        // the rows' blocks b are inside `x` (the caller's lengths).
        unsafe {
            let blk = w.as_ptr().add(b * 176);
            let ys = rows_at::<R>(x, kb, i, b);
            let d = f16_at(blk);
            let scales = k4_scales_and_min_terms(blk, &ys, &mut acc_m);
            // Bit 2 j of qh[l] tops value 64 j + l, bit 2 j + 1 value 64 j + 32 + l: shift
            // the next bit down to bit 0 of each byte (16-bit shifts; the mask drops what
            // crosses from the neighbouring byte).
            let mut top = _mm256_loadu_si256(blk.add(16) as *const __m256i);
            let q5 = blk.add(48);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let (lo, hi) = group_scales(scales, j);
                let bits = _mm256_loadu_si256(q5.add(32 * j) as *const __m256i);
                let tl = _mm256_slli_epi16(_mm256_and_si256(top, one), 4);
                top = _mm256_srli_epi16(top, 1);
                let th = _mm256_slli_epi16(_mm256_and_si256(top, one), 4);
                top = _mm256_srli_epi16(top, 1);
                let ql = _mm256_or_si256(_mm256_and_si256(bits, m4), tl);
                let qh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), th);
                k4_group_dots(&ys, j, (ql, qh), (lo, hi), &mut sumi);
            }
            for r in 0..R {
                let v = _mm256_set1_ps(d * ys[r].d);
                acc[r] = _mm256_fmadd_ps(v, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    finish(acc, acc_m)
}

/// ggml's `ggml_vec_dot_q6_K_q8_K` AVX2 path: values `q` in 0..64 multiply the activations
/// unsigned, and `32 q_x` (`maddubs(32, q_x)`) is subtracted for the offset; each 16 values'
/// i8 scale is applied by `madd`. Rows `i..i + R` as in [`dot_q4k`].
///
/// # Safety
/// As [`dot_q4k`], with Q6_K blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k<const R: usize>(w: &[u8], x: &[BlockQ8K], kb: usize, i: usize) -> [f32; R] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY: block b (210 bytes: ql[128], qh[64], scales[16], d) is inside `w`; the
        // rows' blocks b are inside `x` (the caller's lengths).
        unsafe {
            let blk = w.as_ptr().add(b * 210);
            let ys = rows_at::<R>(x, kb, i, b);
            let d = f16_at(blk.add(208));
            let scales = _mm_loadu_si128(blk.add(192) as *const __m128i);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..2 {
                let ql = blk.add(64 * j);
                let lo = _mm256_loadu_si256(ql as *const __m256i);
                let hi = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let top = _mm256_loadu_si256(blk.add(128 + 32 * j) as *const __m256i);
                // The two bits above each nibble, shifted to bits 4 and 5.
                let t0 = _mm256_slli_epi16(_mm256_and_si256(top, m2), 4);
                let t1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(top, 2), m2), 4);
                let t2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(top, 4), m2), 4);
                let t3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(top, 6), m2), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(lo, m4), t0),
                    _mm256_or_si256(_mm256_and_si256(hi, m4), t1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4), t2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4), t3),
                ];
                for (k, &q) in q.iter().enumerate() {
                    // Scales of 16-groups 8 j + 2 k (i16 lanes 0..8) and + 1 (lanes 8..16).
                    let g = (8 * j + 2 * k) as i64;
                    let pick =
                        _mm_set_epi64x(0x0101_0101_0101_0101 * (g + 1), 0x0101_0101_0101_0101 * g);
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for r in 0..R {
                        let yk = ys[r].qs.as_ptr().add(128 * j + 32 * k);
                        let yk = _mm256_loadu_si256(yk as *const __m256i);
                        let p = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(q, yk),
                            _mm256_maddubs_epi16(m32, yk),
                        );
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(sc, p));
                    }
                }
            }
            for r in 0..R {
                let v = _mm256_set1_ps(d * ys[r].d);
                acc[r] = _mm256_fmadd_ps(v, _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    finish(acc, [_mm_setzero_ps(); R])
}

/// A K-quant super-block read as `w = a_g q + b_g` for each group `g` of [`UnpackK::GROUP`]
/// values, `q` unsigned (the int8 GEMM's packing, [`super::avx512`]).
pub(super) trait UnpackK {
    /// Bytes a super-block.
    const BYTES: usize;
    /// Values a group shares a scale over: 32 (Q4_K, Q5_K) or 16 (Q6_K).
    const GROUP: usize;
    /// The super-block at `blk`: its 256 values into `q` in order, `a_g` and `b_g` into the
    /// first `256 / GROUP` entries of `a` and `b`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; `BYTES` bytes must be readable at `blk`.
    unsafe fn unpack(blk: *const u8, q: &mut [u8; QK_K], a: &mut [f32; 16], b: &mut [f32; 16]);
}

pub(super) struct Q4K;
pub(super) struct Q5K;
pub(super) struct Q6K;

/// Stores a Q4_K/Q5_K super-block's `a_g = d sc_g`, `b_g = -dmin mn_g` from its header at `blk`.
///
/// # Safety
/// F16C must be present; 16 bytes (d, dmin, scales[12]) must be readable at `blk`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_affine(blk: *const u8, a: &mut [f32; 16], b: &mut [f32; 16]) {
    // SAFETY: the caller's 16 bytes.
    let (d, dmin, sm) = unsafe { (f16_at(blk), f16_at(blk.add(2)), k4_scales_mins(blk.add(4))) };
    let bytes = |i: usize| (sm[i / 4] >> (8 * (i % 4))) as u8 as f32;
    for g in 0..8 {
        a[g] = d * bytes(g);
        b[g] = -dmin * bytes(8 + g);
    }
}

impl UnpackK for Q4K {
    const BYTES: usize = 144;
    const GROUP: usize = 32;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8, q: &mut [u8; QK_K], a: &mut [f32; 16], b: &mut [f32; 16]) {
        let m4 = _mm256_set1_epi8(0x0F);
        // SAFETY: the caller's 144 bytes (d, dmin, scales[12], qs[128]); `q` holds 256 bytes.
        unsafe {
            k4_affine(blk, a, b);
            let out = q.as_mut_ptr() as *mut __m256i;
            for j in 0..4 {
                let bits = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                _mm256_storeu_si256(out.add(2 * j), _mm256_and_si256(bits, m4));
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                _mm256_storeu_si256(out.add(2 * j + 1), hi);
            }
        }
    }
}

impl UnpackK for Q5K {
    const BYTES: usize = 176;
    const GROUP: usize = 32;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8, q: &mut [u8; QK_K], a: &mut [f32; 16], b: &mut [f32; 16]) {
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        // SAFETY: the caller's 176 bytes (d, dmin, scales[12], qh[32], qs[128]); `q` holds
        // 256 bytes.
        unsafe {
            k4_affine(blk, a, b);
            let out = q.as_mut_ptr() as *mut __m256i;
            // The fifth bits as in `dot_q5k`.
            let mut top = _mm256_loadu_si256(blk.add(16) as *const __m256i);
            for j in 0..4 {
                let bits = _mm256_loadu_si256(blk.add(48 + 32 * j) as *const __m256i);
                let tl = _mm256_slli_epi16(_mm256_and_si256(top, one), 4);
                top = _mm256_srli_epi16(top, 1);
                let th = _mm256_slli_epi16(_mm256_and_si256(top, one), 4);
                top = _mm256_srli_epi16(top, 1);
                let lo = _mm256_or_si256(_mm256_and_si256(bits, m4), tl);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), th);
                _mm256_storeu_si256(out.add(2 * j), lo);
                _mm256_storeu_si256(out.add(2 * j + 1), hi);
            }
        }
    }
}

impl UnpackK for Q6K {
    const BYTES: usize = 210;
    const GROUP: usize = 16;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const u8, q: &mut [u8; QK_K], a: &mut [f32; 16], b: &mut [f32; 16]) {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        // SAFETY: the caller's 210 bytes (ql[128], qh[64], scales[16], d); `q` holds 256
        // bytes.
        unsafe {
            let d = f16_at(blk.add(208));
            for g in 0..16 {
                let sc = d * (*blk.add(192 + g) as i8) as f32;
                a[g] = sc;
                b[g] = -32.0 * sc;
            }
            let out = q.as_mut_ptr() as *mut __m256i;
            // The values as in `dot_q6k`, in order: 128 j + 32 k + l.
            for j in 0..2 {
                let ql = blk.add(64 * j);
                let lo = _mm256_loadu_si256(ql as *const __m256i);
                let hi = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let top = _mm256_loadu_si256(blk.add(128 + 32 * j) as *const __m256i);
                let t = |s: i32| {
                    let shifted = match s {
                        0 => top,
                        2 => _mm256_srli_epi16(top, 2),
                        4 => _mm256_srli_epi16(top, 4),
                        _ => _mm256_srli_epi16(top, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(shifted, m2), 4)
                };
                let qs = [
                    _mm256_or_si256(_mm256_and_si256(lo, m4), t(0)),
                    _mm256_or_si256(_mm256_and_si256(hi, m4), t(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4), t(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4), t(6)),
                ];
                for (k, v) in qs.into_iter().enumerate() {
                    _mm256_storeu_si256(out.add(4 * j + k), v);
                }
            }
        }
    }
}
