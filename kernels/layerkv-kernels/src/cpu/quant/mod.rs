//! Quantized matrix products on the CPU for the common GGUF weight types, which candle 0.10.2
//! runs on its scalar path in a default build (its AVX dot products are compiled only under
//! `-C target-feature=+avx`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-element blocks) and Q4_K,
//! Q5_K, Q6_K (256-element super-blocks). The block layouts are listed in `portable.rs`.
//!
//! The scheme is llama.cpp's (`ggml-quants.c`, `ggml-cpu/arch/x86/quants.c`): activations are
//! quantized once per row to the blocks the weight type dots ([`WeightType::activation`]):
//! - 32-element types against [`BlockQ8_1`] (i8 values, a scale `d`, `s = d * sum`): a block
//!   `w = d_w q + m_w` dots as `d_w d_x sum(q q_x) + m_w s_x` (Q4_0, Q5_0 and Q8_0 have no
//!   `m_w`; llama.cpp pairs them with Q8_0 blocks, which are these without `s`);
//! - K-quants against [`BlockQ8K`] (256 i8 values, one scale, sums of each 16): per 32 or 16
//!   values `w = d sc q - dmin mn`, so the minimum's term is `dmin mn` times a group sum.
//!
//! Our activation scales stay f32 (llama.cpp rounds Q8_0/Q8_1's to f16), a hair more precise.
//!
//! The dot products run on AVX2+FMA+F16C when the CPU has them (detected at run time with
//! `is_x86_feature_detected!`; the build needs no target flags) and on portable loops
//! otherwise; both give the same sums up to f32 rounding. [`matmul`] quantizes the activation
//! rows once, then splits the weight rows in a few contiguous chunks per thread over the
//! spinning pool ([`super::spin::SpinPool`]); within a chunk, activation rows go in tiles so a
//! tile stays in cache while the chunk's weight rows stream past it, the rows' next bytes
//! prefetched ahead of the loads, and the 32-element types other than Q8_0 unpack each weight block once for
//! four activation rows. Cost: `m * n * k / 32` block dots (or `/ 256` super-block dots);
//! memory: the quantized activations (`m * k` bytes and a little) plus, for `m > 1`, one
//! `[n, m]` f32 buffer.

mod activation;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use super::spin::SpinPool;
use super::OutPtr;

use rayon::prelude::*;

pub use activation::{quantize_q8_1, quantize_q8_k, ActivationBlock, BlockQ8K, BlockQ8_1};

use crate::error::{KernelError, Result};

/// Elements per block of the 32-element types and of Q8_1.
pub const QK: usize = 32;
/// Elements per super-block of the K-quants and of Q8_K.
pub const QK_K: usize = 256;
/// Bytes of one GGUF Q8_0 block: f16 `d`, 32 i8 values.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes of one GGUF Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles (element `j` in the low
/// nibble of byte `j`, element `j + 16` in its high nibble).
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// A GGUF weight type these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// 4-bit values with a scale per 32 (18 bytes a block).
    Q4_0,
    /// 4-bit values with a scale and a minimum per 32 (20 bytes a block).
    Q4_1,
    /// 5-bit values with a scale per 32 (22 bytes a block).
    Q5_0,
    /// 5-bit values with a scale and a minimum per 32 (24 bytes a block).
    Q5_1,
    /// 8-bit values with a scale per 32 (34 bytes a block).
    Q8_0,
    /// 4-bit values, 6-bit scales and minimums per 32, per 256 (144 bytes a super-block).
    Q4K,
    /// 5-bit values, 6-bit scales and minimums per 32, per 256 (176 bytes a super-block).
    Q5K,
    /// 6-bit values, 8-bit scales per 16, per 256 (210 bytes a super-block).
    Q6K,
}

/// The quantized activation form a weight type dots against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// [`BlockQ8_1`]: 32 values a block.
    Q8_1,
    /// [`BlockQ8K`]: 256 values a block.
    Q8K,
}

impl WeightType {
    /// Bytes of one block ([`Self::block_elems`] weights).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => Q4_1_BLOCK_BYTES,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Weights per block: [`QK`] or, for the K-quants, [`QK_K`]. A row's length must be a
    /// multiple of it.
    pub fn block_elems(self) -> usize {
        match self.activation() {
            Activation::Q8_1 => QK,
            Activation::Q8K => QK_K,
        }
    }

    /// The activation blocks this type dots against.
    pub fn activation(self) -> Activation {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => Activation::Q8_1,
            Self::Q4K | Self::Q5K | Self::Q6K => Activation::Q8K,
        }
    }
}

/// Dequantizes blocks of `ty` (`w.len()` whole blocks) into `out` (`ty.block_elems()` values a
/// block).
pub fn dequantize(ty: WeightType, w: &[u8], out: &mut [f32]) -> Result<()> {
    let (bb, be) = (ty.block_bytes(), ty.block_elems());
    if !w.len().is_multiple_of(bb) || out.len() != w.len() / bb * be {
        return Err(KernelError::Invalid(format!(
            "dequantize {ty:?}: {} bytes and {} outputs are not whole blocks of {bb} bytes and \
             {be} values",
            w.len(),
            out.len()
        )));
    }
    // Chunks of 16 KiB of output over rayon's pool (a prefill dequantizes whole weights).
    let blocks = 4096 / be;
    w.par_chunks(blocks * bb)
        .zip(out.par_chunks_mut(blocks * be))
        .for_each(|(w, out)| portable::dequantize_blocks(ty, w, out));
    Ok(())
}

/// An error unless `ty` dots activation blocks `A` and `w` holds `x.len()` blocks.
fn check_dot<A: ActivationBlock>(what: &str, ty: WeightType, w: &[u8], x: &[A]) -> Result<()> {
    if ty.activation() != A::KIND {
        return Err(KernelError::Invalid(format!(
            "{what} {ty:?}: dots {:?} activation blocks, given {:?}",
            ty.activation(),
            A::KIND
        )));
    }
    if w.len() != x.len() * ty.block_bytes() {
        return Err(KernelError::Invalid(format!(
            "{what} {ty:?}: {} weight bytes for {} activation blocks",
            w.len(),
            x.len()
        )));
    }
    Ok(())
}

/// The portable dot product of one weight row of `ty` (`x.len()` blocks) and one quantized
/// activation row of the form `ty` dots ([`WeightType::activation`]).
pub fn dot_portable<A: ActivationBlock>(ty: WeightType, w: &[u8], x: &[A]) -> Result<f32> {
    check_dot("dot_portable", ty, w, x)?;
    Ok(A::dot_portable(ty, w, x))
}

/// Whether this CPU runs the AVX2+FMA+F16C dot products.
pub fn has_avx2() -> bool {
    Isa::Avx2.available()
}

/// The instruction sets the products run on, narrowest first. [`matmul`] picks the widest
/// this CPU has ([`Isa::detect`]); [`matmul_on`] takes one, so each can be checked and timed
/// on a CPU that has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops: any CPU.
    Portable,
    /// AVX2, FMA and F16C: per-row dot products (`maddubs`).
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512F and AVX-512 VNNI: from [`GEMM_FROM_ROWS`] activation rows,
    /// an int8 GEMM (`dpbusd` over weight rows packed sixteen to a register); fewer rows run as
    /// on [`Isa::Avx2`].
    Avx512Vnni,
}

impl Isa {
    /// Every instruction set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni];

    /// Whether this CPU has it (detected at run time; a build needs no target flags).
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The widest this CPU has.
    pub fn detect() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .rev()
                .find(|isa| isa.available())
                .unwrap_or(Isa::Portable)
        })
    }
}

/// Whether products with many activation rows (prefill) run on the int8 GEMM on this CPU
/// (AVX-512 VNNI; every [`WeightType`]). Where they do not, a caller does better to dequantize
/// and run a dense f32 product from a few dozen rows on (as llama.cpp's BLAS path).
pub fn has_int8_gemm() -> bool {
    Isa::detect() >= Isa::Avx512Vnni
}

/// The dot product of one weight row of `ty` and one activation row of `x.len()` blocks of the
/// form `ty` dots, on the widest units this CPU has.
pub fn dot<A: ActivationBlock>(ty: WeightType, w: &[u8], x: &[A]) -> Result<f32> {
    check_dot("dot", ty, w, x)?;
    let mut out = [0f32];
    A::rows_dot(ty, has_avx2(), w, x, x.len(), 0, 1, &mut out);
    Ok(out[0])
}

/// The fewest weight rows a task computes.
const ROWS_PER_TASK: usize = 16;
/// Chunks of weight rows per pool thread (see [`matmul_with`]).
const TASKS_PER_THREAD: usize = 4;
/// Activation rows quantized on the calling thread; more go to rayon (a prefill's).
const INLINE_QUANTIZE_ROWS: usize = 64;
/// Activation rows computed against a task's weight rows before moving on (cache tile).
const ACT_TILE: usize = 64;
/// Activation rows from which [`Isa::Avx512Vnni`] runs the int8 GEMM:
/// packing a weight's rows costs about what a few rows of per-row dot products do.
pub const GEMM_FROM_ROWS: usize = 8;
/// Weight rows of a GEMM task are a multiple of this (the packed groups' sixteen).
const GEMM_ROWS_ALIGN: usize = 16;

/// `y [m, n] = x [m, k] W^T` for a weight `W [n, k]` of `ty` given as its GGUF bytes (row `j`
/// is bytes `j * k / block_elems * block_bytes ..`). `k` must be a multiple of
/// `ty.block_elems()` (32, or 256 for the K-quants).
pub fn matmul(
    ty: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    matmul_on(Isa::detect(), ty, w, n, k, x, m, y)
}

/// [`matmul`] on the instruction set `isa`, an error if this CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    isa: Isa,
    ty: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    if !isa.available() {
        return Err(KernelError::Invalid(format!(
            "matmul {ty:?}: this CPU does not run {isa:?}"
        )));
    }
    let be = ty.block_elems();
    if !k.is_multiple_of(be) {
        return Err(KernelError::Invalid(format!(
            "matmul {ty:?}: k = {k} is not a multiple of the type's {be}-value blocks"
        )));
    }
    let row_bytes = k / be * ty.block_bytes();
    if w.len() != n * row_bytes || x.len() != m * k || y.len() != m * n {
        return Err(KernelError::Invalid(format!(
            "matmul {ty:?}: [{n}, {k}] weight needs {} bytes (got {}), x [{m}, {k}] {} values \
             (got {}), y [{m}, {n}] {} (got {})",
            n * row_bytes,
            w.len(),
            m * k,
            x.len(),
            m * n,
            y.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    match ty.activation() {
        Activation::Q8_1 => matmul_with::<BlockQ8_1>(isa, ty, w, n, k, x, m, y),
        Activation::Q8K => matmul_with::<BlockQ8K>(isa, ty, w, n, k, x, m, y),
    }
}

/// [`matmul`] after its checks, with activations quantized to `A` (the form `ty` dots).
#[allow(clippy::too_many_arguments)]
fn matmul_with<A: ActivationBlock>(
    isa: Isa,
    ty: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    let kb = k / A::ELEMS;
    let row_bytes = kb * ty.block_bytes();
    let mut xq = vec![A::ZERO_BLOCK; m * kb];
    if m <= INLINE_QUANTIZE_ROWS {
        // Inline: a rayon call from outside its pool parks the caller until a worker ran it.
        for (q, r) in xq.chunks_mut(kb.max(1)).zip(x.chunks(k)) {
            A::quantize(r, q)?;
        }
    } else if kb > 0 {
        xq.par_chunks_mut(kb)
            .zip(x.par_chunks(k))
            .try_for_each(|(q, r)| A::quantize(r, q))?;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && m >= GEMM_FROM_ROWS {
        gemm(ty, w, n, kb, &xq, m, y);
        return Ok(());
    }
    let avx2 = isa >= Isa::Avx2;
    // One task: weight rows `first..`, outputs `out[j - first][i]` for every activation row i.
    let task = |first: usize, out: &mut [f32]| {
        let rows = out.len() / m;
        for tile in (0..m).step_by(ACT_TILE) {
            let tile_end = (tile + ACT_TILE).min(m);
            for r in 0..rows {
                let j = first + r;
                let wrow = &w[j * row_bytes..(j + 1) * row_bytes];
                let out = &mut out[r * m..(r + 1) * m];
                A::rows_dot(ty, avx2, wrow, &xq, kb, tile, tile_end, out);
            }
        }
    };
    // On the spinning pool, whose workers are still awake from the previous product (rayon's
    // would have fallen asleep in the gap and need waking, ~200 times a decode step). A few
    // contiguous chunks of weight rows a thread: each claim is a compare-and-swap on a line the
    // threads share, and one per 16 rows cost more than the rows' imbalance saves (about 13,000
    // claims a token on the default model); a long run of rows also streams better.
    let pool = SpinPool::global();
    let per = n
        .div_ceil(TASKS_PER_THREAD * pool.threads())
        .max(ROWS_PER_TASK);
    // One row (decode) is written in place; more go through `[n, m]` and are transposed.
    let mut yt = if m == 1 {
        Vec::new()
    } else {
        vec![0f32; n * m]
    };
    let out = OutPtr(if m == 1 {
        y.as_mut_ptr()
    } else {
        yt.as_mut_ptr()
    });
    pool.run(n.div_ceil(per), &|c| {
        let first = c * per;
        let rows = per.min(n - first);
        // SAFETY: task `c` alone writes weight rows `first..first + rows` (`m` values each) of
        // the output buffer, which outlives `run`.
        let out = unsafe { std::slice::from_raw_parts_mut(out.get().add(first * m), rows * m) };
        task(first, out);
    });
    if m > 1 {
        for (i, row) in y.chunks_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = yt[j * m + i];
            }
        }
    }
    Ok(())
}

/// The int8 GEMM ([`avx512`]) over the spinning pool: each task a run of weight rows (a
/// multiple of sixteen), written straight into `y [m, n]`.
#[cfg(target_arch = "x86_64")]
fn gemm<A: ActivationBlock>(
    ty: WeightType,
    w: &[u8],
    n: usize,
    kb: usize,
    xq: &[A],
    m: usize,
    y: &mut [f32],
) {
    let pool = SpinPool::global();
    let per = n
        .div_ceil(TASKS_PER_THREAD * pool.threads())
        .next_multiple_of(GEMM_ROWS_ALIGN);
    let out = OutPtr(y.as_mut_ptr());
    pool.run(n.div_ceil(per), &|c| {
        let first = c * per;
        let rows = per.min(n - first);
        // SAFETY: the caller checked AVX-512 VNNI (`Isa::Avx512Vnni.available()`) and the
        // lengths (`w` is `n` rows of `kb` blocks, `xq` `m` rows, `y` `m * n` values); task `c`
        // alone writes columns `first..first + rows`, and `y` outlives `run`.
        unsafe { A::gemm(ty, w, kb, first, rows, xq, m, out.get(), n) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lengths_are_errors() {
        let mut y = [0f32; 2];
        let q = WeightType::Q4_1;
        assert!(matmul(q, &[0; 20], 1, 33, &[0.0; 33], 1, &mut y[..1]).is_err());
        assert!(matmul(q, &[0; 19], 1, 32, &[0.0; 32], 1, &mut y[..1]).is_err());
        assert!(matmul(q, &[0; 20], 1, 32, &[0.0; 32], 2, &mut y).is_err());
        assert!(dot(q, &[0; 20], &[BlockQ8_1::ZERO; 2]).is_err());
        assert!(dot(WeightType::Q8_0, &[0; 20], &[BlockQ8_1::ZERO; 1]).is_err());
        // A K-quant row is whole 256-value super-blocks and dots Q8_K blocks.
        let k = WeightType::Q4K;
        assert!(matmul(k, &[0; 144], 1, 32, &[0.0; 32], 1, &mut y[..1]).is_err());
        assert!(matmul(k, &[0; 144], 1, 256, &[0.0; 256], 1, &mut y[..1]).is_ok());
        assert!(dot(k, &[0; 144], &[BlockQ8_1::ZERO; 8]).is_err());
        assert!(dot(q, &[0; 20], &[BlockQ8K::ZERO; 1]).is_err());
        assert!(dot_portable(k, &[0; 144], &[BlockQ8K::ZERO; 1]).is_ok());
    }
}
