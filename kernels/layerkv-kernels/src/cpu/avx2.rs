//! Hand-vectorised AVX2+FMA+F16C loops. The compiler turned the portable group dot products
//! into 2-wide loads and stack spills and chained the value updates; written with intrinsics
//! they run on full 8-wide registers with independent accumulators. The dot products and value
//! updates read stored rows of any [`Lanes`] type directly (f16/bf16 converted in registers),
//! so the decode path never writes widened rows to memory.

use std::arch::x86_64::*;

use half::{bf16, f16};

/// A stored element type the AVX2 loops read directly.
pub(crate) trait Lanes: Copy {
    /// Eight elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// Eight elements must be readable at `p`; the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
    /// One element as f32 (for tails).
    fn to_f32(self) -> f32;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable elements.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Lanes for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: eight f16 are 16 readable bytes; the caller guarantees F16C.
        unsafe { load8_f16(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: eight bf16 are 16 readable bytes; the caller guarantees AVX2.
        unsafe { load8_bf16(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
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
        let k0 = unsafe { T::load8(kp.add(c)) };
        let k1 = unsafe { T::load8(kp.add(c + 8)) };
        for g in 0..N {
            let q0 = unsafe { _mm256_loadu_ps(qp.add(g * d + c)) };
            let q1 = unsafe { _mm256_loadu_ps(qp.add(g * d + c + 8)) };
            even[g] = _mm256_fmadd_ps(q0, k0, even[g]);
            odd[g] = _mm256_fmadd_ps(q1, k1, odd[g]);
        }
        c += 16;
    }
    if c + 8 <= d {
        let k0 = unsafe { T::load8(kp.add(c)) };
        for (g, e) in even.iter_mut().enumerate() {
            let q0 = unsafe { _mm256_loadu_ps(qp.add(g * d + c)) };
            *e = _mm256_fmadd_ps(q0, k0, *e);
        }
        c += 8;
    }
    for g in 0..N {
        let mut sum = hsum(_mm256_add_ps(even[g], odd[g]));
        for i in c..d {
            sum = q[g * d + i].mul_add(k[i].to_f32(), sum);
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
                let r = unsafe { T::load8(rows[j].add(i + 8 * c)) };
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
            x = _mm256_fmadd_ps(wv[j], unsafe { T::load8(rows[j].add(i)) }, x);
        }
        unsafe { _mm256_storeu_ps(ap.add(i), x) };
        i += 8;
    }
    for (k, a) in acc.iter_mut().enumerate().skip(i) {
        for j in 0..VB {
            // SAFETY: `k < d`, inside row j by the caller's contract.
            *a = w[j].mul_add(unsafe { *rows[j].add(k) }.to_f32(), *a);
        }
    }
}

/// Widens stored elements to f32, eight lanes at a time (F16C for f16, a shift for bf16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn widen<T: Lanes>(src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`: eight elements readable at `src[i]`, eight f32 writable at
        // `dst[i]`; the features are enabled on this function.
        unsafe { _mm256_storeu_ps(dp.add(i), T::load8(sp.add(i))) };
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
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
