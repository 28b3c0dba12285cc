//! Hand-vectorised AVX2+FMA+F16C loops. The compiler turned the portable group dot products
//! into 2-wide loads and stack spills and chained the value updates; written with intrinsics
//! they run on full 8-wide registers with independent accumulators. The dot products and value
//! updates read stored rows of any [`Lanes`] type directly (f16/bf16 converted in registers),
//! so the decode path never writes widened rows to memory.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::blocks::{E4Block, Q4Block, Q8Block};
use crate::kvtype::QK;

/// A stored element type the AVX2 loops read directly: a float, or a block of `BLOCK` values
/// (Q8_0, Q4_0, e4m3) dequantized in registers.
pub(crate) trait Lanes: Copy {
    /// Values per stored unit (1 for floats, 32 for a block).
    const BLOCK: usize = 1;
    /// Values `c .. c + 8` of the row at `p` as f32 lanes (`c` a multiple of 8).
    ///
    /// # Safety
    /// The row must hold `c + 8` readable values; the CPU must have AVX2 and F16C.
    unsafe fn load8_at(p: *const Self, c: usize) -> __m256;
    /// The scale of the block holding value `c`, in all lanes, for [`Lanes::load8_scaled`]
    /// (floats: unused, optimised away).
    ///
    /// # Safety
    /// As for [`Lanes::load8_at`].
    #[inline(always)]
    unsafe fn scale_at(_p: *const Self, _c: usize) -> __m256 {
        _mm256_setzero_ps()
    }
    /// [`Lanes::load8_at`] with the block's scale already converted (a loop over a block's
    /// four 8-lane chunks converts it once).
    ///
    /// # Safety
    /// As for [`Lanes::load8_at`]; `scale` is [`Lanes::scale_at`] of the same block.
    #[inline(always)]
    unsafe fn load8_scaled(p: *const Self, c: usize, _scale: __m256) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { Self::load8_at(p, c) }
    }
    /// Value `i` of the row at `p` (for tails).
    ///
    /// # Safety
    /// The row must hold `i + 1` readable values.
    unsafe fn at(p: *const Self, i: usize) -> f32;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8_at(p: *const f32, c: usize) -> __m256 {
        // SAFETY: the caller guarantees eight readable elements.
        unsafe { _mm256_loadu_ps(p.add(c)) }
    }
    #[inline(always)]
    unsafe fn at(p: *const f32, i: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *p.add(i) }
    }
}

impl Lanes for f16 {
    #[inline(always)]
    unsafe fn load8_at(p: *const f16, c: usize) -> __m256 {
        // SAFETY: eight f16 are 16 readable bytes; the caller guarantees F16C.
        unsafe { load8_f16(p.add(c)) }
    }
    #[inline(always)]
    unsafe fn at(p: *const f16, i: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *p.add(i) }.to_f32()
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn load8_at(p: *const bf16, c: usize) -> __m256 {
        // SAFETY: eight bf16 are 16 readable bytes; the caller guarantees AVX2.
        unsafe { load8_bf16(p.add(c)) }
    }
    #[inline(always)]
    unsafe fn at(p: *const bf16, i: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *p.add(i) }.to_f32()
    }
}

/// `Lanes` for a block type: `$scale` reads a block's scale (all eight lanes), `$values` eight
/// of its values times a given scale; a plain load is the two together.
macro_rules! block_lanes {
    ($t:ty, $scale:ident, $values:ident) => {
        impl Lanes for $t {
            const BLOCK: usize = QK;
            #[inline(always)]
            unsafe fn load8_at(p: *const $t, c: usize) -> __m256 {
                // SAFETY: as for `load8_scaled`.
                unsafe { Self::load8_scaled(p, c, Self::scale_at(p, c)) }
            }
            #[inline(always)]
            unsafe fn scale_at(p: *const $t, c: usize) -> __m256 {
                // SAFETY: block `c / 32` is readable (the caller's contract).
                unsafe { $scale(p.add(c / QK).cast()) }
            }
            #[inline(always)]
            unsafe fn load8_scaled(p: *const $t, c: usize, scale: __m256) -> __m256 {
                // SAFETY: block `c / 32` is readable, and each loader reads 8 values at
                // `c % 32` inside its block (Q8_0: quants at `2 + c % 32 .. + 8 <= 34`; Q4_0:
                // nibble bytes at `2 + c % 16 .. + 8 <= 18`; e4m3: codes at `1 + c % 32 .. + 8
                // <= 33`).
                unsafe { $values(p.add(c / QK).cast(), c % QK, scale) }
            }
            #[inline(always)]
            unsafe fn at(p: *const $t, i: usize) -> f32 {
                // SAFETY: the caller's contract.
                unsafe { (*p.add(i / QK)).value(i % QK) }
            }
        }
    };
}
block_lanes!(Q8Block, scale8, ints8_q8);
block_lanes!(Q4Block, scale8, ints8_q4);
block_lanes!(E4Block, scale8_e8m0, codes8_e4m3);

/// An MXFP8 block's scale (its E8M0 first byte, `2^(e - 127)`) times 2^8 in all eight lanes:
/// [`codes8_e4m3`] gives each value over 2^8.
///
/// # Safety
/// One byte readable at `b`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale8_e8m0(b: *const u8) -> __m256 {
    // SAFETY: the caller guarantees a readable byte. The quantizer writes scale bytes 1 to
    // 246, so byte + 8 is a finite f32 exponent.
    let e = unsafe { *b } as i32 + 8;
    _mm256_castsi256_ps(_mm256_set1_epi32(e << 23))
}

/// Values `j .. j + 8` of the MXFP8 block at `b`, times `scale` / 2^8. An e4m3 code
/// `S EEEE MMM` moved into an f16's bits as `S 0EEEE MMM0000000` is the same value times 2^-8
/// (f16's exponent bias is 15, e4m3's 7), subnormals included, so F16C converts it: no table.
/// Each byte goes to the top of a 16-bit lane (an unpack with zeros), an arithmetic shift by
/// one copies the sign into bit 14, and a mask clears that copy and the low bits: three
/// instructions to the f16 bits.
///
/// # Safety
/// A whole block (33 bytes) readable at `b`; `j + 8 <= 32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn codes8_e4m3(b: *const u8, j: usize, scale: __m256) -> __m256 {
    // SAFETY: the caller's contract: bytes `1 + j .. 1 + j + 8 <= 33`.
    let codes = unsafe { _mm_loadl_epi64(b.add(1 + j).cast()) };
    let high = _mm_unpacklo_epi8(_mm_setzero_si128(), codes);
    let bits = _mm_and_si128(_mm_srai_epi16::<1>(high), _mm_set1_epi16(0xbf80u16 as i16));
    _mm256_mul_ps(_mm256_cvtph_ps(bits), scale)
}

/// A block's f16 scale (its first two bytes) in all eight lanes.
///
/// # Safety
/// Two bytes readable at `b`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale8(b: *const u8) -> __m256 {
    // SAFETY: the caller guarantees two readable bytes.
    let bits = unsafe { b.cast::<u16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// Values `j .. j + 8` of the Q8_0 block at `b`, times `scale` (the block's, [`scale8`]).
///
/// # Safety
/// A whole block (34 bytes) readable at `b`; `j + 8 <= 32`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ints8_q8(b: *const u8, j: usize, scale: __m256) -> __m256 {
    // SAFETY: the caller's contract.
    let q = unsafe { _mm_loadl_epi64(b.add(2 + j).cast()) };
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale)
}

/// Values `j .. j + 8` of the Q4_0 block at `b` (low nibbles of bytes `j..` for `j < 16`, high
/// nibbles of bytes `j - 16..` above), times `scale` (the block's, [`scale8`]).
///
/// # Safety
/// A whole block (18 bytes) readable at `b`; `j + 8 <= 32`, `j` a multiple of 8.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ints8_q4(b: *const u8, j: usize, scale: __m256) -> __m256 {
    // SAFETY: the caller's contract: bytes `2 + j % 16 .. + 8 <= 18`.
    let raw = unsafe { _mm_loadl_epi64(b.add(2 + j % 16).cast()) };
    let nib = if j >= 16 {
        _mm_srli_epi16::<4>(raw)
    } else {
        raw
    };
    let nib = _mm_and_si128(nib, _mm_set1_epi8(0x0f));
    let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8));
    _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale)
}

/// # Safety
/// 16 bytes readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f16(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// # Safety
/// 16 bytes readable at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_bf16(p: *const bf16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    let h = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Dot products of `N` query rows (`q`, `N x d`) with one key row `k` (length `d`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dots<T: Lanes, const N: usize>(q: &[f32], k: &[T], out: &mut [f32]) {
    let d = k.len();
    assert!(q.len() >= N * d && out.len() >= N);
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut even = [_mm256_setzero_ps(); N];
    let mut odd = [_mm256_setzero_ps(); N];
    let mut c = 0;
    // SAFETY (all loads below): `c + 16 <= d` (or `c + 8 <= d`), and row g of `q` spans
    // `g * d .. (g + 1) * d <= q.len()` (asserted above), so every 8-lane load is in bounds.
    while c + 16 <= d {
        let k0 = unsafe { T::load8_at(kp, c) };
        let k1 = unsafe { T::load8_at(kp, c + 8) };
        for g in 0..N {
            let q0 = unsafe { _mm256_loadu_ps(qp.add(g * d + c)) };
            let q1 = unsafe { _mm256_loadu_ps(qp.add(g * d + c + 8)) };
            even[g] = _mm256_fmadd_ps(q0, k0, even[g]);
            odd[g] = _mm256_fmadd_ps(q1, k1, odd[g]);
        }
        c += 16;
    }
    if c + 8 <= d {
        let k0 = unsafe { T::load8_at(kp, c) };
        for (g, e) in even.iter_mut().enumerate() {
            let q0 = unsafe { _mm256_loadu_ps(qp.add(g * d + c)) };
            *e = _mm256_fmadd_ps(q0, k0, *e);
        }
        c += 8;
    }
    for g in 0..N {
        let mut sum = hsum(_mm256_add_ps(even[g], odd[g]));
        for i in c..d {
            // SAFETY: `i < d`, inside the key row.
            sum = q[g * d + i].mul_add(unsafe { T::at(kp, i) }, sum);
        }
        out[g] = sum;
    }
}

/// Dot products of every query row of a group (`out.len()` rows of `q`) with one key row.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn group_dots<T: Lanes>(q: &[f32], k: &[T], out: &mut [f32]) {
    let d = k.len();
    let group = out.len();
    let mut g = 0;
    while g + 4 <= group {
        dots::<T, 4>(&q[g * d..], k, &mut out[g..g + 4]);
        g += 4;
    }
    match group - g {
        3 => dots::<T, 3>(&q[g * d..], k, &mut out[g..]),
        2 => dots::<T, 2>(&q[g * d..], k, &mut out[g..]),
        1 => dots::<T, 1>(&q[g * d..], k, &mut out[g..]),
        _ => {}
    }
}

/// `acc += sum_j w[j] * rows[j]` over `VB` rows of `acc.len()` stored elements each: four
/// 8-lane chunks of `acc` in flight, so the chained multiply-adds of one chunk do not wait on
/// each other.
///
/// # Safety
/// Every `rows[j]` must point at `acc.len()` readable elements.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn axpy_block<T: Lanes>(
    acc: &mut [f32],
    w: &[f32; super::VB],
    rows: &[*const T; super::VB],
) {
    const VB: usize = super::VB;
    let d = acc.len();
    let wv: [__m256; VB] = std::array::from_fn(|j| _mm256_set1_ps(w[j]));
    let ap = acc.as_mut_ptr();
    let mut i = 0;
    // SAFETY (all loads and stores below): `i + 32 <= d` (or `i + 8 <= d`), `acc` has `d`
    // elements and every row at least `d` (the caller's contract).
    while i + 32 <= d {
        let mut a: [__m256; 4] =
            std::array::from_fn(|c| unsafe { _mm256_loadu_ps(ap.add(i + 8 * c)) });
        for j in 0..VB {
            for (c, x) in a.iter_mut().enumerate() {
                let r = unsafe { T::load8_at(rows[j], i + 8 * c) };
                *x = _mm256_fmadd_ps(wv[j], r, *x);
            }
        }
        for (c, x) in a.iter().enumerate() {
            unsafe { _mm256_storeu_ps(ap.add(i + 8 * c), *x) };
        }
        i += 32;
    }
    while i + 8 <= d {
        let mut x = unsafe { _mm256_loadu_ps(ap.add(i)) };
        for j in 0..VB {
            x = _mm256_fmadd_ps(wv[j], unsafe { T::load8_at(rows[j], i) }, x);
        }
        unsafe { _mm256_storeu_ps(ap.add(i), x) };
        i += 8;
    }
    for (k, a) in acc.iter_mut().enumerate().skip(i) {
        for j in 0..VB {
            // SAFETY: `k < d`, inside row j by the caller's contract.
            *a = w[j].mul_add(unsafe { T::at(rows[j], k) }, *a);
        }
    }
}

/// The lane sums of eight vectors as the eight lanes of one (`out[i] = sum(v[i])`): six
/// horizontal adds and a cross-half add instead of eight separate reductions.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum8(v: &[__m256; 8]) -> __m256 {
    // hadd(a, b) = [a01 a23 b01 b23 | a45 a67 b45 b67] (per 128-bit half).
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t2 = _mm256_hadd_ps(v[4], v[5]);
    let t3 = _mm256_hadd_ps(v[6], v[7]);
    // u0 = [v0 v1 v2 v3 (lanes 0-3) | v0 v1 v2 v3 (lanes 4-7)], u1 the same for v4..v7.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// Dot products of `G` query rows (`q`, `G x d`) with `S` key rows (`G * S <= 8`), into
/// `out[s * G + g]`: each query chunk is loaded once for `S` keys and each key chunk converted
/// once for `G` queries, in `G * S` independent accumulators reduced together by [`hsum8`].
///
/// # Safety
/// `G x d` floats readable at `q`, `d` elements at every `keys[s]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots_tile<T: Lanes, const G: usize, const S: usize>(
    q: *const f32,
    keys: &[*const T],
    d: usize,
) -> [f32; 8] {
    debug_assert!(G * S <= 8 && keys.len() >= S);
    let mut acc = [[_mm256_setzero_ps(); G]; S];
    let mut scale = [_mm256_setzero_ps(); S];
    let mut c = 0;
    // SAFETY (all loads below): `c + 8 <= d`; row g of `q` and every key row hold `d` elements
    // (the caller's contract).
    while c + 8 <= d {
        // A block's scale is converted once for its four chunks (floats: nothing).
        if c % T::BLOCK == 0 {
            scale = std::array::from_fn(|s| unsafe { T::scale_at(keys[s], c) });
        }
        let qv: [__m256; G] = std::array::from_fn(|g| unsafe { _mm256_loadu_ps(q.add(g * d + c)) });
        for (s, a) in acc.iter_mut().enumerate() {
            let kv = unsafe { T::load8_scaled(keys[s], c, scale[s]) };
            for (x, qg) in a.iter_mut().zip(&qv) {
                *x = _mm256_fmadd_ps(*qg, kv, *x);
            }
        }
        c += 8;
    }
    let mut v = [_mm256_setzero_ps(); 8];
    for (s, a) in acc.iter().enumerate() {
        v[s * G..s * G + G].copy_from_slice(a);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), hsum8(&v)) };
    for i in c..d {
        for s in 0..S {
            // SAFETY: `i < d`, inside key row s.
            let k = unsafe { T::at(keys[s], i) };
            for g in 0..G {
                // SAFETY: `i < d`, inside query row g.
                out[s * G + g] = unsafe { *q.add(g * d + i) }.mul_add(k, out[s * G + g]);
            }
        }
    }
    out
}

/// Scores of `G` query heads (rows `q`, `G x d`) against every key row in `keys` (`d` elements
/// each), `S` keys per tile and the rest one by one; token t's scores go to `out[t][0..G]`.
///
/// # Safety
/// As for [`dots_tile`]; every `out[t]` points at `G` writable floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots_run<T: Lanes, const G: usize, const S: usize>(
    q: *const f32,
    keys: &[*const T],
    out: &[*mut f32],
    d: usize,
) {
    let mut t = 0;
    while t + S <= keys.len() {
        // SAFETY: the caller's contract, for keys t..t + S.
        let r = unsafe { dots_tile::<T, G, S>(q, &keys[t..], d) };
        for s in 0..S {
            // SAFETY: `out[t + s]` has `G` writable floats.
            unsafe { std::ptr::copy_nonoverlapping(r[s * G..].as_ptr(), out[t + s], G) };
        }
        t += S;
    }
    while t < keys.len() {
        // SAFETY: as above, for key t alone.
        let r = unsafe { dots_tile::<T, G, 1>(q, &keys[t..], d) };
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), out[t], G) };
        t += 1;
    }
}

/// [`dots_run`] for a run-time head count of at most 8.
///
/// # Safety
/// As for [`dots_run`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dots_heads<T: Lanes>(
    g: usize,
    q: *const f32,
    keys: &[*const T],
    out: &[*mut f32],
    d: usize,
) {
    // SAFETY (every arm): the caller's contract; `G * S <= 8` in every instantiation.
    unsafe {
        match g {
            1 => dots_run::<T, 1, 8>(q, keys, out, d),
            2 => dots_run::<T, 2, 4>(q, keys, out, d),
            3 => dots_run::<T, 3, 2>(q, keys, out, d),
            4 => dots_run::<T, 4, 2>(q, keys, out, d),
            5 => dots_run::<T, 5, 1>(q, keys, out, d),
            6 => dots_run::<T, 6, 1>(q, keys, out, d),
            7 => dots_run::<T, 7, 1>(q, keys, out, d),
            _ => dots_run::<T, 8, 1>(q, keys, out, d),
        }
    }
}

/// Scores of every query head (`q`: `heads x d`, grouped by KV head) against up to
/// [`super::VB`] tokens' stored key rows (`keys[t]`: `kv_heads x d` elements) into `out[t]`
/// (`heads` floats each): per KV head, tiles of `S` tokens share each query load (`S = 8 / G`
/// for a group of `G <= 8` heads; wider groups go eight heads at a time).
///
/// # Safety
/// `keys.len() == out.len() <= VB`; every `keys[t]` points at `kv_heads * d` readable elements
/// and every `out[t]` at `heads` writable floats, and `heads` is a multiple of `kv_heads`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn tile_dots<T: Lanes>(
    q: &[f32],
    keys: &[*const T],
    out: &[*mut f32],
    kv_heads: usize,
    d: usize,
) {
    const VB: usize = super::VB;
    let n = keys.len();
    assert!(n == out.len() && n <= VB && q.len().is_multiple_of(kv_heads * d));
    let group = q.len() / (kv_heads * d);
    let mut kh = [std::ptr::null::<T>(); VB];
    let mut oh = [std::ptr::null_mut::<f32>(); VB];
    for h in 0..kv_heads {
        for t in 0..n {
            // SAFETY: `h * d + d <= kv_heads * d`: inside token t's key row.
            kh[t] = unsafe { keys[t].add(h * d / T::BLOCK) };
        }
        let mut g = 0;
        while g < group {
            let take = (group - g).min(8);
            let first = h * group + g;
            for t in 0..n {
                // SAFETY: `first + take <= heads`: inside token t's score row.
                oh[t] = unsafe { out[t].add(first) };
            }
            // SAFETY: query rows `first .. first + take` are inside `q` (asserted above); key
            // and score pointers as set up above.
            unsafe { dots_heads(take, q.as_ptr().add(first * d), &kh[..n], &oh[..n], d) };
            g += take;
        }
    }
}

/// `acc[g][c..] += sum_j w[j][g] * rows[j][c..]` for `G` heads and `CH` 8-lane chunks from
/// column `c`: the `G x CH` accumulators stay in registers over all `VB` rows, each row chunk is
/// loaded (converted) once for the group and each weight broadcast once for `CH` chunks.
///
/// # Safety
/// `c + 8 * CH <= d`; as for [`group_axpy`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn axpy_cols<T: Lanes, const G: usize, const CH: usize>(
    acc: *mut f32,
    w: &[*const f32; super::VB],
    rows: &[*const T; super::VB],
    d: usize,
    c: usize,
) {
    // SAFETY (all loads and stores below): head g's columns `c .. c + 8 * CH` lie inside its
    // `d` accumulators, row j's inside its `d` elements, and `g < G` inside weight row j (the
    // caller's contract).
    let mut a: [[__m256; CH]; G] = std::array::from_fn(|g| {
        std::array::from_fn(|k| unsafe { _mm256_loadu_ps(acc.add(g * d + c + 8 * k)) })
    });
    for j in 0..super::VB {
        let r: [__m256; CH] = std::array::from_fn(|k| unsafe { T::load8_at(rows[j], c + 8 * k) });
        for (g, ag) in a.iter_mut().enumerate() {
            let wv = unsafe { _mm256_broadcast_ss(&*w[j].add(g)) };
            for (x, rk) in ag.iter_mut().zip(&r) {
                *x = _mm256_fmadd_ps(wv, *rk, *x);
            }
        }
    }
    for (g, ag) in a.iter().enumerate() {
        for (k, x) in ag.iter().enumerate() {
            unsafe { _mm256_storeu_ps(acc.add(g * d + c + 8 * k), *x) };
        }
    }
}

/// [`axpy_cols`] over every column of `G` heads: `CH`-chunk steps, then single chunks, then a
/// scalar tail.
///
/// # Safety
/// As for [`group_axpy`], with `G` heads.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn axpy_heads<T: Lanes, const G: usize, const CH: usize>(
    acc: *mut f32,
    w: &[*const f32; super::VB],
    rows: &[*const T; super::VB],
    d: usize,
) {
    let mut c = 0;
    // SAFETY (both loops): `c + 8 * CH <= d` (or `c + 8 <= d`); the rest is the caller's.
    while c + 8 * CH <= d {
        unsafe { axpy_cols::<T, G, CH>(acc, w, rows, d, c) };
        c += 8 * CH;
    }
    while c + 8 <= d {
        unsafe { axpy_cols::<T, G, 1>(acc, w, rows, d, c) };
        c += 8;
    }
    for i in c..d {
        for g in 0..G {
            // SAFETY: `i < d` inside row j and head g's accumulators, `g < G` inside weight row
            // j.
            unsafe {
                let mut x = *acc.add(g * d + i);
                for j in 0..super::VB {
                    x = (*w[j].add(g)).mul_add(T::at(rows[j], i), x);
                }
                *acc.add(g * d + i) = x;
            }
        }
    }
}

/// `acc[g] += sum_j w[j][g] * rows[j]` for the query heads `g` of one GQA group (`acc`:
/// `group x d`; `w[j]`: token j's weights for the group's heads) over `VB` stored rows of `d`
/// elements. Column blocks of the group's accumulators stay in registers across the rows (at
/// least eight independent multiply-add chains where the group allows), each row chunk is
/// loaded and converted once for the whole group, and the weights are broadcast straight from
/// the score rows.
///
/// # Safety
/// Every `rows[j]` must point at `d` readable elements and every `w[j]` at `acc.len() / d`
/// readable floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn group_axpy<T: Lanes>(
    acc: &mut [f32],
    w: &[*const f32; super::VB],
    rows: &[*const T; super::VB],
    d: usize,
) {
    let group = acc.len() / d;
    assert!(acc.len() == group * d);
    let mut g = 0;
    // Groups wider than eight heads go eight at a time.
    while g < group {
        let take = (group - g).min(8);
        // SAFETY: heads `g .. g + take` of the group: their accumulators lie inside `acc`, and
        // their weights at offsets `g ..` inside each weight row (the caller's contract).
        unsafe {
            let ap = acc.as_mut_ptr().add(g * d);
            let wg = w.map(|p| p.add(g));
            match take {
                1 => axpy_heads::<T, 1, 8>(ap, &wg, rows, d),
                2 => axpy_heads::<T, 2, 4>(ap, &wg, rows, d),
                3 => axpy_heads::<T, 3, 2>(ap, &wg, rows, d),
                4 => axpy_heads::<T, 4, 2>(ap, &wg, rows, d),
                5 => axpy_heads::<T, 5, 1>(ap, &wg, rows, d),
                6 => axpy_heads::<T, 6, 1>(ap, &wg, rows, d),
                7 => axpy_heads::<T, 7, 1>(ap, &wg, rows, d),
                _ => axpy_heads::<T, 8, 1>(ap, &wg, rows, d),
            }
        }
        g += take;
    }
}

/// Widens stored elements to f32, eight lanes at a time (F16C for f16, a shift for bf16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn widen<T: Lanes>(src: &[T], dst: &mut [f32]) {
    let n = (src.len() * T::BLOCK).min(dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`: eight values readable in `src` from value `i`, eight f32
        // writable at `dst[i]`; the features are enabled on this function.
        unsafe { _mm256_storeu_ps(dp.add(i), T::load8_at(sp, i)) };
        i += 8;
    }
    for (j, x) in dst.iter_mut().enumerate().take(n).skip(i) {
        // SAFETY: `j < n`, inside `src`'s values.
        *x = unsafe { T::at(sp, j) };
    }
}

/// `exp` of eight lanes (Cephes' single-precision polynomial, about 1 ulp on [-87, 88]); lanes
/// below -87 (including -inf) give exactly 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp8(x: __m256) -> __m256 {
    let live = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    // x = n ln2 + r with |r| <= ln2 / 2; ln2 split in two for an exact n ln2.
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), live)
}

/// `out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]`, eight lanes at a time ([`exp8`]: a gate
/// above 87 gives `gate * up`, one below -88 about 0, as the exact formula does in f32).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len().min(up.len()).min(out.len());
    let (gp, up_, op) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, and all three slices hold at least `n` values.
        unsafe {
            let g = _mm256_loadu_ps(gp.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(op.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up_.add(i))));
        }
        i += 8;
    }
    for j in i..n {
        out[j] = gate[j] / (1.0 + (-gate[j]).exp()) * up[j];
    }
}

/// `x[i] = exp(x[i] - max[i])` (0 where `max[i]` is -inf), `sums[i] += x[i]`, eight lanes at a
/// time.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn exp_row(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
    let n = x.len().min(max.len()).min(sums.len());
    let (xp, mp, sp) = (x.as_mut_ptr(), max.as_ptr(), sums.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, and all three slices hold at least `n` elements.
        unsafe {
            let m = _mm256_loadu_ps(mp.add(i));
            // With max = -inf every lane of the row is -inf too: -inf - -inf is NaN, which the
            // comparison in `exp8` turns into 0, as it does for -inf scores.
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(i)), m));
            _mm256_storeu_ps(xp.add(i), e);
            _mm256_storeu_ps(sp.add(i), _mm256_add_ps(_mm256_loadu_ps(sp.add(i)), e));
        }
        i += 8;
    }
    for j in i..n {
        let e = if max[j] == f32::NEG_INFINITY {
            0.0
        } else {
            (x[j] - max[j]).exp()
        };
        x[j] = e;
        sums[j] += e;
    }
}

/// [`exp_row`] over consecutive rows of `m = max.len()` values (`x`: rows x `m`, e.g. the scores
/// of a run of slots, one row per slot): `x[r][i] = exp(x[r][i] - max[i])`, `sums[i] +=` the
/// column's sum. Eight lanes at a time across row boundaries, with `max` repeated in a pattern of
/// `lcm(m, 8)` values, so a group of 3 heads takes three vector exps per eight slots instead of
/// three scalar ones per slot. Widths whose pattern is over 9 vectors, and multiples of 8 (no
/// lane wasted), go row by row.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn exp_rows(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
    let m = max.len().min(sums.len());
    if m == 0 {
        return;
    }
    let (max, sums) = (&max[..m], &mut sums[..m]);
    let n = x.len() - x.len() % m;
    let x = &mut x[..n];
    if !m.is_multiple_of(8) {
        // `lcm(m, 8) / 8 = m / gcd(m, 8)`, odd for every `m` not a multiple of 8.
        // SAFETY (every arm): the CPU has AVX2 and FMA (this function's own contract).
        unsafe {
            match m / gcd(m, 8) {
                1 => return exp_rows_p::<1>(x, max, sums),
                3 => return exp_rows_p::<3>(x, max, sums),
                5 => return exp_rows_p::<5>(x, max, sums),
                7 => return exp_rows_p::<7>(x, max, sums),
                9 => return exp_rows_p::<9>(x, max, sums),
                _ => {}
            }
        }
    }
    for row in x.chunks_exact_mut(m) {
        exp_row(row, max, sums);
    }
}

/// [`exp_rows`] with a pattern of `P` vectors (`P = lcm(m, 8) / 8`), kept in registers. For
/// right results `8 P` must be a multiple of `m = max.len()` (the pattern repeats every `P`
/// vectors), `x.len()` a multiple of `m` and `sums` as long as `max`; every memory access is
/// bounded by the slices whatever they are.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn exp_rows_p<const P: usize>(x: &mut [f32], max: &[f32], sums: &mut [f32]) {
    let m = max.len();
    let mv: [__m256; P] = std::array::from_fn(|k| {
        let lanes: [f32; 8] = std::array::from_fn(|l| max[(8 * k + l) % m]);
        // SAFETY: `lanes` holds eight floats.
        unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
    });
    let mut sv = [_mm256_setzero_ps(); P];
    let (n, xp) = (x.len(), x.as_mut_ptr());
    let mut i = 0;
    // With max = -inf every value of its column is -inf too: -inf - -inf is NaN, which the
    // comparison in `exp8` turns into 0, as it does for -inf scores.
    while i + 8 * P <= n {
        for k in 0..P {
            // SAFETY: `i + 8 k + 8 <= n`.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(i + 8 * k)), mv[k]));
                _mm256_storeu_ps(xp.add(i + 8 * k), e);
                sv[k] = _mm256_add_ps(sv[k], e);
            }
        }
        i += 8 * P;
    }
    // What is left of a period: vector `k` of the pattern at offset `8 k`.
    let mut k = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(i)), mv[k]));
            _mm256_storeu_ps(xp.add(i), e);
            sv[k] = _mm256_add_ps(sv[k], e);
        }
        i += 8;
        k += 1;
    }
    for (k, v) in sv.iter().enumerate() {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *v) };
        for (l, e) in lanes.iter().enumerate() {
            sums[(8 * k + l) % m] += e;
        }
    }
    // The last values (fewer than 8): the pattern goes on at column `i % m`.
    for (j, v) in x.iter_mut().enumerate().skip(i) {
        let c = j % m;
        let e = if max[c] == f32::NEG_INFINITY {
            0.0
        } else {
            (*v - max[c]).exp()
        };
        *v = e;
        sums[c] += e;
    }
}

/// Column maxima of consecutive rows of `m = max.len()` values (`x`: rows x `m`, the scores of a
/// run of slots) into `max` (which holds the running maxima): eight lanes at a time across row
/// boundaries, in a pattern of `lcm(m, 8)` values as [`exp_rows`] does. Row by row, a group of 3
/// heads took three scalar compare-and-branch steps per slot, the slowest part of a lane's
/// decode item. NaN scores are skipped as the scalar `x > max` skips them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn max_rows(x: &[f32], max: &mut [f32]) {
    let m = max.len();
    if m == 0 {
        return;
    }
    let x = &x[..x.len() - x.len() % m];
    // SAFETY (every arm): the CPU has AVX2 (this function's own contract).
    unsafe {
        match m / gcd(m, 8) {
            1 => max_rows_p::<1>(x, max),
            2 => max_rows_p::<2>(x, max),
            3 => max_rows_p::<3>(x, max),
            4 => max_rows_p::<4>(x, max),
            5 => max_rows_p::<5>(x, max),
            6 => max_rows_p::<6>(x, max),
            7 => max_rows_p::<7>(x, max),
            8 => max_rows_p::<8>(x, max),
            9 => max_rows_p::<9>(x, max),
            _ => {
                for row in x.chunks_exact(m) {
                    for (mx, v) in max.iter_mut().zip(row) {
                        if *v > *mx {
                            *mx = *v;
                        }
                    }
                }
            }
        }
    }
}

/// [`max_rows`] with a pattern of `P` vectors (`8 P` a multiple of `m = max.len()`, `x.len()` a
/// multiple of `m`); every memory access is bounded by the slices whatever they are.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn max_rows_p<const P: usize>(x: &[f32], max: &mut [f32]) {
    let m = max.len();
    let mut mv = [_mm256_set1_ps(f32::NEG_INFINITY); P];
    let (n, xp) = (x.len(), x.as_ptr());
    let mut i = 0;
    // `_mm256_max_ps(v, acc)` returns `acc` where `v` is NaN: NaN scores are skipped.
    while i + 8 * P <= n {
        for (k, a) in mv.iter_mut().enumerate() {
            // SAFETY: `i + 8 k + 8 <= n`.
            *a = _mm256_max_ps(unsafe { _mm256_loadu_ps(xp.add(i + 8 * k)) }, *a);
        }
        i += 8 * P;
    }
    let mut k = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`.
        mv[k] = _mm256_max_ps(unsafe { _mm256_loadu_ps(xp.add(i)) }, mv[k]);
        i += 8;
        k += 1;
    }
    for (k, v) in mv.iter().enumerate() {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *v) };
        for (l, e) in lanes.iter().enumerate() {
            let c = (8 * k + l) % m;
            if *e > max[c] {
                max[c] = *e;
            }
        }
    }
    for (j, v) in x.iter().enumerate().skip(i) {
        let c = j % m;
        if *v > max[c] {
            max[c] = *v;
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_features() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    /// The polynomial exp against `f32::exp`, over the range softmax feeds it (x - max <= 0)
    /// and a little above; -inf and NaN lanes give 0.
    #[test]
    fn exp_row_matches_std_exp() {
        assert!(have_features(), "this x86-64 CPU lacks AVX2/FMA/F16C");
        let xs: Vec<f32> = (0..20_000).map(|i| -95.0 + i as f32 * 0.005).collect();
        for chunk in xs.chunks(19) {
            let mut x = chunk.to_vec();
            let max = vec![0.0f32; x.len()];
            let mut sums = vec![0.0f32; x.len()];
            // SAFETY: the features were checked above.
            unsafe { exp_row(&mut x, &max, &mut sums) };
            for (got, arg) in x.iter().zip(chunk) {
                // Below -87 the vector lanes flush to 0 and the scalar tail is subnormal: both
                // are far below anything a softmax weight can notice.
                let want = arg.exp();
                assert!(
                    (got - want).abs() <= 2.0 * f32::EPSILON * want + 1e-37,
                    "exp({arg}) = {got}, want {want}"
                );
            }
            assert_eq!(x, sums);
        }
        let mut x = [f32::NEG_INFINITY; 9];
        let mut sums = [0.0f32; 9];
        // SAFETY: as above.
        unsafe { exp_row(&mut x, &[f32::NEG_INFINITY; 9], &mut sums) };
        assert_eq!(x, [0.0; 9]);
        assert_eq!(sums, [0.0; 9]);
    }

    /// `exp_rows` over runs of rows of every width from 1 to 20, 36 and 72 (9-vector patterns,
    /// and past them) against `exp_row` row by row: values within 2 ulp-ish, column sums within 1e-5
    /// relative, a column whose max is -inf all zeros. Seen failing with the pattern's
    /// lane-to-column map off by one (`(8 * k + l + 1) % m`).
    #[test]
    fn exp_rows_match_exp_row_row_by_row() {
        if !have_features() {
            return;
        }
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * -30.0
        };
        for m in (1..=20).chain([36, 72]) {
            for rows in [1usize, 2, 3, 7, 8, 9, 25] {
                let mut max: Vec<f32> = (0..m).map(|_| next() * 0.1).collect();
                if m > 2 {
                    max[1] = f32::NEG_INFINITY;
                }
                let x: Vec<f32> = (0..rows * m)
                    .map(|j| {
                        if max[j % m] == f32::NEG_INFINITY {
                            f32::NEG_INFINITY
                        } else {
                            max[j % m] + next()
                        }
                    })
                    .collect();
                let (mut want, mut want_sums) = (x.clone(), vec![0.5f32; m]);
                for row in want.chunks_exact_mut(m) {
                    // SAFETY: features checked above.
                    unsafe { exp_row(row, &max, &mut want_sums) };
                }
                let (mut got, mut got_sums) = (x.clone(), vec![0.5f32; m]);
                // SAFETY: features checked above.
                unsafe { exp_rows(&mut got, &max, &mut got_sums) };
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-30) + 1e-37,
                        "m {m} rows {rows} value {j}: {g} vs {w}"
                    );
                }
                for (c, (g, w)) in got_sums.iter().zip(&want_sums).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs(),
                        "m {m} rows {rows} column {c}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// `max_rows` over runs of rows of every width from 1 to 20, 36, 72 and 80 (the scalar
    /// fallback) against the scalar loop, with -inf columns, NaN scores (skipped) and running
    /// maxima already above some columns. Seen failing with the pattern's lane-to-column map
    /// off by one (`(8 * k + l + 1) % m`).
    #[test]
    fn max_rows_match_the_scalar_maxima() {
        if !have_features() {
            return;
        }
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 20.0 - 10.0
        };
        for m in (1..=20).chain([36, 72, 80]) {
            for rows in [1usize, 2, 3, 7, 8, 9, 25] {
                let mut x: Vec<f32> = (0..rows * m).map(|_| next()).collect();
                if m > 2 {
                    for r in 0..rows {
                        x[r * m + 1] = f32::NEG_INFINITY;
                    }
                }
                x[(rows * m) / 2] = f32::NAN;
                let start: Vec<f32> = (0..m)
                    .map(|c| if c % 4 == 3 { 9.5 } else { f32::NEG_INFINITY })
                    .collect();
                let mut want = start.clone();
                for row in x.chunks_exact(m) {
                    for (mx, v) in want.iter_mut().zip(row) {
                        if *v > *mx {
                            *mx = *v;
                        }
                    }
                }
                let mut got = start.clone();
                // SAFETY: features checked above.
                unsafe { max_rows(&x, &mut got) };
                for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits(),
                        "m {m} rows {rows} column {c}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Blocks widen in registers exactly as the scalar dequantizers do (Q8_0, Q4_0: every
    /// 8-lane position of a block, low and high nibbles).
    #[test]
    fn blocks_widen_like_the_scalar_dequantizers() {
        assert!(have_features(), "this x86-64 CPU lacks AVX2/FMA/F16C");
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.13)
            .collect();
        let mut q8 = vec![0u8; 3 * 34];
        crate::kvtype::quantize_q8_0(&x, &mut q8);
        let mut q4 = vec![0u8; 3 * 18];
        crate::kvtype::quantize_q4_0(&x, &mut q4);
        let mut want = vec![0f32; 96];
        let mut got = vec![0f32; 96];
        crate::kvtype::dequantize_q8_0(&q8, &mut want);
        // SAFETY: features checked above; `Q8Block` is 34 bytes of alignment 1.
        unsafe { widen(Q8Block::slice(&q8), &mut got) };
        assert_eq!(got, want);
        crate::kvtype::dequantize_q4_0(&q4, &mut want);
        // SAFETY: as above.
        unsafe { widen(Q4Block::slice(&q4), &mut got) };
        assert_eq!(got, want);
        assert_ne!(got, vec![0f32; 96]);
    }

    /// F16C and the bf16 shift widen exactly like the `half` crate, tails included.
    #[test]
    fn widening_matches_half() {
        assert!(have_features(), "this x86-64 CPU lacks AVX2/FMA/F16C");
        let src: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let h: Vec<half::f16> = src.iter().map(|x| half::f16::from_f32(*x)).collect();
        let b: Vec<half::bf16> = src.iter().map(|x| half::bf16::from_f32(*x)).collect();
        let mut got = vec![0.0f32; src.len()];
        // SAFETY: as above.
        unsafe { widen(&h, &mut got) };
        assert!(got.iter().zip(&h).all(|(g, w)| *g == w.to_f32()));
        // SAFETY: as above.
        unsafe { widen(&b, &mut got) };
        assert!(got.iter().zip(&b).all(|(g, w)| *g == w.to_f32()));
    }
}
