//! The quantized activation blocks weight blocks dot against: [`BlockQ8_1`] (32 values, for
//! the 32-element weight types) and [`BlockQ8K`] (256 values, for the K-quants), with the
//! quantizers llama.cpp uses for them. Quantizing a row costs two passes over its values.

use super::{Activation, QK, QK_K};
use crate::error::{KernelError, Result};

/// One block of 32 activations quantized to i8: `x ~ d * qs`, and `s = d * sum(qs)` (the
/// term a Q4_1 or Q5_1 block's minimum multiplies).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale: `max |x| / 127`.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    /// The quantized values.
    pub qs: [i8; QK],
}

impl BlockQ8_1 {
    /// An all-zero block.
    pub const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

/// One super-block of 256 activations quantized to i8 (llama.cpp's `block_q8_K`): `x ~ d * qs`,
/// and the sums of each 16 values, which a K-quant's per-group minimums multiply.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale: `-max / 127` for the value of largest magnitude `max` (so that value maps to -127).
    pub d: f32,
    /// The quantized values, in -127..=127.
    pub qs: [i8; QK_K],
    /// `bsums[g] = sum(qs[16 g..16 g + 16])`.
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// An all-zero block.
    pub const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), as llama.cpp's
/// `quantize_row_q8_1` does (round half away from zero).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) -> Result<()> {
    check_len("quantize_q8_1", x.len(), out.len(), QK)?;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        unsafe { q8_1_rows_avx2(x, out) };
        return Ok(());
    }
    q8_1_rows(x, out);
    Ok(())
}

/// [`quantize_q8_1`]'s loop compiled for AVX2: the rounding is then an instruction, not a
/// libm call per value (which took about a tenth of a prefill).
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_1_rows_avx2(x: &[f32], out: &mut [BlockQ8_1]) {
    q8_1_rows(x, out)
}

#[inline(always)]
fn q8_1_rows(x: &[f32], out: &mut [BlockQ8_1]) {
    for (block, out) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in out.qs.iter_mut().zip(block) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        out.d = d;
        out.s = d * sum as f32;
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` blocks), as llama.cpp's
/// `quantize_row_q8_K_ref` does: the scale maps the value of largest magnitude to -127 (not
/// -128, so a sign flip never overflows), rounding half to even like its `nearest_int`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) -> Result<()> {
    check_len("quantize_q8_k", x.len(), out.len(), QK_K)?;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        unsafe { q8_k_rows_avx2(x, out) };
        return Ok(());
    }
    q8_k_rows(x, out);
    Ok(())
}

/// [`quantize_q8_k`]'s loop compiled for AVX2 (see [`q8_1_rows_avx2`]).
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_k_rows_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    q8_k_rows(x, out)
}

#[inline(always)]
fn q8_k_rows(x: &[f32], out: &mut [BlockQ8K]) {
    for (block, out) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *out = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in out.qs.iter_mut().zip(block) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, g) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        out.d = 1.0 / iscale;
    }
}

fn check_len(what: &str, values: usize, blocks: usize, per: usize) -> Result<()> {
    if values == blocks * per {
        return Ok(());
    }
    Err(KernelError::Invalid(format!(
        "{what}: {values} values do not fill {blocks} blocks of {per}"
    )))
}

/// A quantized activation block type: [`BlockQ8_1`] or [`BlockQ8K`]. Which one a weight type
/// dots is [`super::WeightType::activation`]. Sealed: the kernels exist for these two only.
pub trait ActivationBlock: Copy + Send + Sync + sealed::Sealed {
    /// Values per block.
    const ELEMS: usize;
    /// Which form this is.
    const KIND: Activation;
    /// An all-zero block.
    const ZERO_BLOCK: Self;
    /// Quantizes `x` (`out.len() * ELEMS` values) into `out`.
    fn quantize(x: &[f32], out: &mut [Self]) -> Result<()>;
}

impl ActivationBlock for BlockQ8_1 {
    const ELEMS: usize = QK;
    const KIND: Activation = Activation::Q8_1;
    const ZERO_BLOCK: Self = Self::ZERO;
    fn quantize(x: &[f32], out: &mut [Self]) -> Result<()> {
        quantize_q8_1(x, out)
    }
}

impl ActivationBlock for BlockQ8K {
    const ELEMS: usize = QK_K;
    const KIND: Activation = Activation::Q8K;
    const ZERO_BLOCK: Self = Self::ZERO;
    fn quantize(x: &[f32], out: &mut [Self]) -> Result<()> {
        quantize_q8_k(x, out)
    }
}

pub(super) mod sealed {
    use super::super::{portable, WeightType};
    use super::{BlockQ8K, BlockQ8_1};

    /// The per-activation-form dispatch to the kernels (crate-internal).
    pub trait Sealed: Sized {
        /// `out[i] = dot(wrow, xq row i)` for activation rows `from..to` of `kb` blocks each;
        /// `ty` dots this form (checked by the caller).
        #[allow(clippy::too_many_arguments)]
        fn rows_dot(
            ty: WeightType,
            avx2: bool,
            wrow: &[u8],
            xq: &[Self],
            kb: usize,
            from: usize,
            to: usize,
            out: &mut [f32],
        );
        /// The portable dot of one weight row and one activation row.
        fn dot_portable(ty: WeightType, w: &[u8], x: &[Self]) -> f32;
        /// The int8 GEMM ([`super::super::avx512`]) of weight rows `first..first + rows`
        /// (`kb` blocks each) against all `m` activation rows into `y [m, n]`.
        ///
        /// # Safety
        /// As `avx512::gemm_q8_1`: AVX-512 VNNI present, the lengths, columns
        /// `first..first + rows` of `y` this call's alone.
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm(
            ty: WeightType,
            w: &[u8],
            kb: usize,
            first: usize,
            rows: usize,
            x: &[Self],
            m: usize,
            y: *mut f32,
            n: usize,
        );
    }

    impl Sealed for BlockQ8_1 {
        fn rows_dot(
            ty: WeightType,
            avx2: bool,
            wrow: &[u8],
            xq: &[Self],
            kb: usize,
            from: usize,
            to: usize,
            out: &mut [f32],
        ) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `avx2` is `has_avx2()`; `wrow` is `kb` blocks and `xq` holds `to`
                // rows of `kb`.
                unsafe { super::super::avx2::rows_q8_1(ty, wrow, xq, kb, from, to, out) };
                return;
            }
            let _ = avx2;
            for i in from..to {
                out[i] = portable::dot_q8_1(ty, wrow, &xq[i * kb..(i + 1) * kb]);
            }
        }
        fn dot_portable(ty: WeightType, w: &[u8], x: &[Self]) -> f32 {
            portable::dot_q8_1(ty, w, x)
        }
        #[cfg(target_arch = "x86_64")]
        unsafe fn gemm(
            ty: WeightType,
            w: &[u8],
            kb: usize,
            first: usize,
            rows: usize,
            x: &[Self],
            m: usize,
            y: *mut f32,
            n: usize,
        ) {
            // SAFETY: the caller's.
            unsafe { super::super::avx512::gemm_q8_1(ty, w, kb, first, rows, x, m, y, n) }
        }
    }

    impl Sealed for BlockQ8K {
        fn rows_dot(
            ty: WeightType,
            avx2: bool,
            wrow: &[u8],
            xq: &[Self],
            kb: usize,
            from: usize,
            to: usize,
            out: &mut [f32],
        ) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as for `BlockQ8_1`.
                unsafe { super::super::avx2::rows_q8k(ty, wrow, xq, kb, from, to, out) };
                return;
            }
            let _ = avx2;
            for i in from..to {
                out[i] = portable::dot_q8k(ty, wrow, &xq[i * kb..(i + 1) * kb]);
            }
        }
        fn dot_portable(ty: WeightType, w: &[u8], x: &[Self]) -> f32 {
            portable::dot_q8k(ty, w, x)
        }
        #[cfg(target_arch = "x86_64")]
        unsafe fn gemm(
            ty: WeightType,
            w: &[u8],
            kb: usize,
            first: usize,
            rows: usize,
            x: &[Self],
            m: usize,
            y: *mut f32,
            n: usize,
        ) {
            // SAFETY: the caller's.
            unsafe { super::super::avx512::gemm_q8k(ty, w, kb, first, rows, x, m, y, n) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_1_blocks_hold_scale_and_sum() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let mut q = [BlockQ8_1::ZERO; 2];
        quantize_q8_1(&x, &mut q).unwrap();
        for (b, block) in q.iter().zip(x.chunks(QK)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(b.d, amax / 127.0);
            assert!(b.qs.iter().any(|&v| v.abs() == 127));
            let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert_eq!(b.s, b.d * sum as f32);
        }
        assert!(quantize_q8_1(&x[..63], &mut q).is_err());
    }

    #[test]
    fn q8_k_blocks_hold_scale_and_group_sums() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let mut q = [BlockQ8K::ZERO; 2];
        quantize_q8_k(&x, &mut q).unwrap();
        for (b, block) in q.iter().zip(x.chunks(QK_K)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((b.d.abs() - amax / 127.0).abs() <= 1e-6 * amax);
            assert!(b.qs.iter().any(|&v| v.abs() == 127));
            for (g, &s) in b.bsums.iter().enumerate() {
                let want: i16 = b.qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
                assert_eq!(s, want);
            }
            for (&q, &v) in b.qs.iter().zip(block) {
                assert!((b.d * q as f32 - v).abs() <= b.d.abs() * 0.5001);
            }
        }
        let mut zero = [BlockQ8K::ZERO; 1];
        quantize_q8_k(&[0.0; QK_K], &mut zero).unwrap();
        assert_eq!(zero[0], BlockQ8K::ZERO);
        assert!(quantize_q8_k(&x[..300], &mut q).is_err());
    }

    #[test]
    fn weight_types_name_their_activation_form() {
        use super::super::WeightType::*;
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] {
            assert_eq!(ty.activation(), BlockQ8_1::KIND);
            assert_eq!(ty.block_elems(), BlockQ8_1::ELEMS);
        }
        for ty in [Q4K, Q5K, Q6K] {
            assert_eq!(ty.activation(), BlockQ8K::KIND);
            assert_eq!(ty.block_elems(), BlockQ8K::ELEMS);
        }
    }
}
