//! Quantized rows as the kernels see them: a row of `head_dim` values is `head_dim / 32`
//! blocks ([`Q8Block`], [`Q4Block`], llama.cpp's Q8_0 and Q4_0 layouts; [`E4Block`], MXFP8
//! e4m3), read through the same
//! [`Elem`] / `Lanes` loops as float rows: the portable loops dequantize a row into scratch, the
//! AVX2 loops dequantize eight values at a time in registers.

use half::f16;

use super::Elem;
use crate::kvtype::{
    dequantize_e4m3, dequantize_q4_0, dequantize_q8_0, e4m3_decode, e8m0_scale, QK,
};

/// One Q8_0 block: an f16 scale (little-endian) and 32 signed quants. Alignment 1, so a
/// page's bytes are a slice of blocks wherever they start.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8Block([u8; 34]);

/// One Q4_0 block: an f16 scale and 16 bytes of nibbles.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q4Block([u8; 18]);

/// One MXFP8 block: an E8M0 scale byte and 32 e4m3 codes.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct E4Block([u8; 33]);

/// What the block types share: byte views and the [`Elem`] impl (portable:
/// dequantize with `$dequantize`; AVX2: the `Lanes` loads).
macro_rules! block_common {
    ($t:ty, $n:expr, $dequantize:path) => {
        impl $t {
            /// `bytes` as whole blocks (a trailing partial block is dropped).
            pub(crate) fn slice(bytes: &[u8]) -> &[Self] {
                // SAFETY: the type is `repr(C)` over `[u8; N]`: size N, alignment 1, any bit
                // pattern valid; the length is the whole blocks inside `bytes`.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / $n) }
            }

            fn bytes(src: &[Self]) -> &[u8] {
                // SAFETY: as for `slice`, the other way.
                unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), src.len() * $n) }
            }
        }

        impl Elem for $t {
            const PER: usize = QK;
            #[inline(always)]
            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }
            #[inline(always)]
            fn widen(src: &[Self], dst: &mut [f32]) {
                $dequantize(Self::bytes(src), dst);
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn widen_avx2(src: &[Self], dst: &mut [f32]) {
                // SAFETY: the caller guarantees AVX2 and F16C.
                unsafe { super::avx2::widen(src, dst) }
            }
        }
    };
}
block_common!(Q8Block, 34, dequantize_q8_0);
block_common!(Q4Block, 18, dequantize_q4_0);
block_common!(E4Block, 33, dequantize_e4m3);

/// The f16 scale of an llama.cpp block (its first two bytes).
#[inline(always)]
fn f16_scale(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

impl Q8Block {
    /// Value `j` (< 32).
    #[inline(always)]
    pub(crate) fn value(&self, j: usize) -> f32 {
        f16_scale(&self.0) * (self.0[2 + j] as i8) as f32
    }
}

impl Q4Block {
    /// Value `j` (< 32).
    #[inline(always)]
    pub(crate) fn value(&self, j: usize) -> f32 {
        let b = self.0[2 + j % (QK / 2)];
        let q = if j < QK / 2 { b & 0x0f } else { b >> 4 };
        f16_scale(&self.0) * (q as i32 - 8) as f32
    }
}

impl E4Block {
    /// Value `j` (< 32).
    #[inline(always)]
    pub(crate) fn value(&self, j: usize) -> f32 {
        e8m0_scale(self.0[0]) * e4m3_decode(self.0[1 + j])
    }
}
