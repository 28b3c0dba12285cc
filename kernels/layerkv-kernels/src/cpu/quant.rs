//! Quantized matrix products on the CPU for the GGUF types that candle 0.10.2 runs on its
//! scalar path in a default build (its AVX dot products are compiled only under
//! `-C target-feature=+avx`): Q4_1 (the default GGUF's linear layers) and Q8_0 (its token
//! embedding, which a tied model's LM head multiplies by).
//!
//! The scheme is llama.cpp's (`ggml-quants.c`, `ggml-cpu/arch/x86/quants.c`): activations are
//! quantized per 32-element block to [`BlockQ8_1`] (i8 values, a scale `d` and `s = d * sum`).
//! A Q4_1 weight block `w = d_w * q + m_w` (q in 0..16) dots an activation block as
//! `d_w * d_x * sum(q * q_x) + m_w * s_x` (`Q4_1 x Q8_1`); a Q8_0 block `w = d_w * q` as
//! `d_w * d_x * sum(q * q_x)` (`Q8_0 x Q8_0`, `s` unused). Our activation blocks keep `d` and
//! `s` in f32 (llama.cpp rounds them to f16), so they are a hair more precise than llama.cpp's.
//!
//! The dot products run on AVX2+FMA+F16C when the CPU has them (detected at run time with
//! `is_x86_feature_detected!`; the build needs no target flags) and on portable loops
//! otherwise; both give the same sums up to f32 rounding. [`matmul`] quantizes the activation
//! rows once, then splits the weight rows over rayon's pool in chunks; within a chunk,
//! activation rows go in tiles so a tile stays in cache while the chunk's weight rows (a few
//! KiB) stay in L1, and Q4_1 unpacks each weight block once for four activation rows. Cost:
//! `m * n * k / 32` block dots; memory: the quantized activations (`m * k / 32` blocks of 40
//! bytes) plus, for `m > 1`, one `[n, m]` f32 buffer.

use rayon::prelude::*;

use super::spin::{SpinPool, MAX_TASKS};
use crate::error::{KernelError, Result};

/// The output of a product, shared by the tasks that write disjoint rows of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint ranges (see the uses).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Elements per block of Q4_1, Q8_0 and Q8_1.
pub const QK: usize = 32;
/// Bytes of one GGUF Q8_0 block: f16 `d`, 32 i8 values.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// A GGUF weight type these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// 4-bit values with a scale and a minimum per 32 (20 bytes a block).
    Q4_1,
    /// 8-bit values with a scale per 32 (34 bytes a block).
    Q8_0,
}

impl WeightType {
    /// Bytes of one block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BLOCK_BYTES,
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
        }
    }
}
/// Bytes of one GGUF Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles (element `j` in the low
/// nibble of byte `j`, element `j + 16` in its high nibble).
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// One block of 32 activations quantized to i8: `x ~ d * qs`, and `s = d * sum(qs)` (the
/// term a Q4_1 block's minimum multiplies).
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

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), as llama.cpp's
/// `quantize_row_q8_1` does (round half away from zero).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) -> Result<()> {
    if x.len() != out.len() * QK {
        return Err(KernelError::Invalid(format!(
            "quantize_q8_1: {} values do not fill {} blocks of {QK}",
            x.len(),
            out.len()
        )));
    }
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
    Ok(())
}

/// Dequantizes blocks of `ty` (`w.len()` whole blocks) into `out` (32 values a block).
pub fn dequantize(ty: WeightType, w: &[u8], out: &mut [f32]) -> Result<()> {
    let bb = ty.block_bytes();
    if w.len() % bb != 0 || out.len() != w.len() / bb * QK {
        return Err(KernelError::Invalid(format!(
            "dequantize {ty:?}: {} bytes and {} outputs are not whole blocks of each other",
            w.len(),
            out.len()
        )));
    }
    // Chunks of 64 blocks over rayon's pool (a prefill dequantizes whole weights).
    w.par_chunks(64 * bb)
        .zip(out.par_chunks_mut(64 * QK))
        .for_each(|(w, out)| dequantize_blocks(ty, w, out));
    Ok(())
}

fn dequantize_blocks(ty: WeightType, w: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (b, out) in w.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        match ty {
            WeightType::Q4_1 => {
                let (d, m) = block_dm(b);
                for j in 0..QK / 2 {
                    out[j] = d * (b[4 + j] & 0x0F) as f32 + m;
                    out[j + QK / 2] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
            WeightType::Q8_0 => {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (o, &q) in out.iter_mut().zip(&b[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
    }
}

fn block_dm(b: &[u8]) -> (f32, f32) {
    (
        half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        half::f16::from_le_bytes([b[2], b[3]]).to_f32(),
    )
}

/// The portable dot product of one weight row of `ty` (`x.len()` blocks) and one quantized
/// activation row.
pub fn dot_portable(ty: WeightType, w: &[u8], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(ty.block_bytes()).zip(x) {
        match ty {
            WeightType::Q4_1 => {
                let (d, m) = block_dm(b);
                let mut isum = 0i32;
                for j in 0..QK / 2 {
                    isum += (b[4 + j] & 0x0F) as i32 * y.qs[j] as i32;
                    isum += (b[4 + j] >> 4) as i32 * y.qs[j + QK / 2] as i32;
                }
                sum += d * y.d * isum as f32 + m * y.s;
            }
            WeightType::Q8_0 => {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                let isum: i32 = b[2..]
                    .iter()
                    .zip(&y.qs)
                    .map(|(&q, &v)| (q as i8) as i32 * v as i32)
                    .sum();
                sum += d * y.d * isum as f32;
            }
        }
    }
    sum
}

/// Whether this CPU runs the AVX2+FMA+F16C dot product.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The dot product of one weight row of `ty` and one activation row of `x.len()` blocks, on
/// the widest units this CPU has.
pub fn dot(ty: WeightType, w: &[u8], x: &[BlockQ8_1]) -> Result<f32> {
    if w.len() != x.len() * ty.block_bytes() {
        return Err(KernelError::Invalid(format!(
            "dot {ty:?}: {} weight bytes for {} activation blocks",
            w.len(),
            x.len()
        )));
    }
    let mut out = [0f32];
    rows_dot(ty, has_avx2(), w, x, x.len(), 0, 1, &mut out);
    Ok(out[0])
}

/// Weight rows a rayon task computes.
const ROWS_PER_TASK: usize = 16;
/// Activation rows computed against a task's weight rows before moving on (cache tile).
const ACT_TILE: usize = 64;

/// `y [m, n] = x [m, k] W^T` for a weight `W [n, k]` of `ty` given as its GGUF bytes (row `j`
/// is bytes `j * k / 32 * block_bytes ..`). `k` must be a multiple of 32.
pub fn matmul(
    ty: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    if k % QK != 0 {
        return Err(KernelError::Invalid(format!(
            "matmul {ty:?}: k = {k} is not a multiple of {QK}"
        )));
    }
    let kb = k / QK;
    let row_bytes = kb * ty.block_bytes();
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
    let mut xq = vec![BlockQ8_1::ZERO; m * kb];
    if m == 1 {
        // Inline: a rayon call from outside its pool parks the caller until a worker ran it.
        quantize_q8_1(x, &mut xq)?;
    } else if kb > 0 {
        xq.par_chunks_mut(kb)
            .zip(x.par_chunks(k))
            .try_for_each(|(q, r)| quantize_q8_1(r, q))?;
    }
    let avx2 = has_avx2();
    // One task: weight rows `first..`, outputs `out[j - first][i]` for every activation row i.
    let task = |first: usize, out: &mut [f32]| {
        let rows = out.len() / m;
        for tile in (0..m).step_by(ACT_TILE) {
            let tile_end = (tile + ACT_TILE).min(m);
            for r in 0..rows {
                let j = first + r;
                let wrow = &w[j * row_bytes..(j + 1) * row_bytes];
                let out = &mut out[r * m..(r + 1) * m];
                rows_dot(ty, avx2, wrow, &xq, kb, tile, tile_end, out);
            }
        }
    };
    let chunks = n.div_ceil(ROWS_PER_TASK);
    if m == 1 && chunks <= MAX_TASKS {
        // Decode: on the spinning pool, whose workers are still awake from the previous product.
        let out = OutPtr(y.as_mut_ptr());
        SpinPool::global().run(chunks, &|c| {
            let first = c * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(n - first);
            // SAFETY: task `c` alone writes rows `first..first + rows` of `y`, which outlives
            // `run`.
            let out = unsafe { std::slice::from_raw_parts_mut(out.get().add(first), rows) };
            task(first, out);
        });
        return Ok(());
    }
    if m == 1 {
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, out)| task(c * ROWS_PER_TASK, out));
        return Ok(());
    }
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(c, out)| task(c * ROWS_PER_TASK, out));
    y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = yt[j * m + i];
        }
    });
    Ok(())
}

/// `out[i] = dot(wrow, xq row i)` for activation rows `from..to`.
#[allow(clippy::too_many_arguments)]
fn rows_dot(
    ty: WeightType,
    avx2: bool,
    wrow: &[u8],
    xq: &[BlockQ8_1],
    kb: usize,
    from: usize,
    to: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is `has_avx2()`; `wrow` is `kb` blocks and `xq` holds `to` rows of `kb`.
        unsafe {
            match ty {
                WeightType::Q4_1 => avx2::rows_q4_1(wrow, xq, kb, from, to, out),
                WeightType::Q8_0 => avx2::rows_q8_0(wrow, xq, kb, from, to, out),
            }
        };
        return;
    }
    let _ = avx2;
    for i in from..to {
        out[i] = dot_portable(ty, wrow, &xq[i * kb..(i + 1) * kb]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_1, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES};

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

    /// ggml's `ggml_vec_dot_q4_1_q8_1` AVX2 path: nibbles unpacked to bytes, `maddubs` against
    /// the i8 activations, pairs summed to i32, scaled by `d_w * d_x` into an f32 accumulator;
    /// the minimum's term `m_w * s_x` summed on the side.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; `w` must hold `x.len()` blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1(w: &[u8], x: &[BlockQ8_1]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        // Lane 1 accumulates m_w * s_x (lane 0 holds d_w * d_x sums, unused).
        let mut mins = [_mm_setzero_ps(); 2];
        let p = w.as_ptr();
        // Two independent chains, so the adds do not wait on each other's latency.
        for (b, y) in x.iter().enumerate() {
            let c = b & 1;
            // SAFETY: block b is inside `w` (20 bytes; the caller's lengths).
            let (scale, dot, prod) = unsafe { q4_1_block(p.add(b * Q4_1_BLOCK_BYTES), y) };
            acc[c] = _mm256_fmadd_ps(scale, dot, acc[c]);
            mins[c] = _mm_add_ps(mins[c], prod);
        }
        let m = _mm_add_ps(mins[0], mins[1]);
        hsum(_mm256_add_ps(acc[0], acc[1])) + _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1))
    }

    /// One Q4_1 block at `blk` against `y`: `(d_w * d_x` in every lane, the eight i32 pair
    /// sums of `q * q_x` as f32, `[d_w * d_x, m_w * s_x, 0, 0])`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; 20 bytes must be readable at `blk`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(blk: *const u8, y: &BlockQ8_1) -> (__m256, __m256, __m128) {
        // SAFETY: the caller's 20 bytes; `y.d` and `y.s` are adjacent f32 (`repr(C)`).
        unsafe {
            // d and m (two f16) to f32 in one conversion; [d_x, s_x] in one load.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk as *const i32,
            )));
            let ds = _mm_castpd_ps(_mm_load_sd((y as *const BlockQ8_1).cast::<f64>()));
            let prod = _mm_mul_ps(dm, ds);
            let tmp = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let qx = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
                _mm256_set1_epi8(0x0F),
            );
            let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let dot = _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(qx, qy));
            (_mm256_broadcastss_ps(prod), _mm256_cvtepi32_ps(dot), prod)
        }
    }

    /// [`dot_q4_1`] of one weight row against four activation rows `i..i + 4` at once: each weight
    /// block is unpacked once for the four (prefill's reuse).
    ///
    /// # Safety
    /// As [`dot_q4_1`]; `w` holds `kb` blocks, `x` at least `(i + 4) * kb` blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_q4_1(w: &[u8], x: &[BlockQ8_1], kb: usize, i: usize) -> [f32; 4] {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = _mm_setzero_ps();
        let p = w.as_ptr();
        for b in 0..kb {
            // SAFETY: block b of the row and of rows i..i + 4 are in bounds (the caller's
            // lengths).
            unsafe {
                let blk = p.add(b * Q4_1_BLOCK_BYTES);
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk as *const i32,
                )));
                let d = _mm_cvtss_f32(dm);
                let m = _mm_shuffle_ps(dm, dm, 0b01_01_01_01);
                let ys = [
                    x.get_unchecked(i * kb + b),
                    x.get_unchecked((i + 1) * kb + b),
                    x.get_unchecked((i + 2) * kb + b),
                    x.get_unchecked((i + 3) * kb + b),
                ];
                mins = _mm_fmadd_ps(m, _mm_set_ps(ys[3].s, ys[2].s, ys[1].s, ys[0].s), mins);
                let tmp = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp), low);
                for r in 0..4 {
                    let qy = _mm256_loadu_si256(ys[r].qs.as_ptr() as *const __m256i);
                    let dot = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy));
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * ys[r].d),
                        _mm256_cvtepi32_ps(dot),
                        acc[r],
                    );
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

    /// [`dot_q4_1`] of one weight row against activation rows `from..to` into `out[from..to]`,
    /// four rows at a time.
    ///
    /// # Safety
    /// As [`dot_q4_1`]; `w` holds `kb` blocks, `x` at least `to * kb` blocks, `out` `to` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_q4_1(
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
            out[i..i + 4].copy_from_slice(&unsafe { dot4_q4_1(w, x, kb, i) });
            i += 4;
        }
        while i < to {
            // SAFETY: the caller's lengths.
            out[i] = unsafe { dot_q4_1(w, &x[i * kb..(i + 1) * kb]) };
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
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let p = w.as_ptr();
        for (b, y) in x.iter().enumerate() {
            // SAFETY: block b is inside `w` (34 bytes; the caller's lengths).
            unsafe {
                let blk = p.add(b * Q8_0_BLOCK_BYTES);
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk as *const u16,
                ) as i32)));
                let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                let ax = _mm256_sign_epi8(qw, qw);
                let sy = _mm256_sign_epi8(qy, qw);
                let dot = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy));
                let scale = _mm256_set1_ps(d * y.d);
                if b % 2 == 0 {
                    acc0 = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc0);
                } else {
                    acc1 = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc1);
                }
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// [`dot_q8_0`] of one weight row against activation rows `from..to` into `out[from..to]`.
    ///
    /// # Safety
    /// As [`dot_q8_0`]; `w` holds `kb` blocks, `x` at least `to * kb` blocks, `out` `to`
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_q8_0(
        w: &[u8],
        x: &[BlockQ8_1],
        kb: usize,
        from: usize,
        to: usize,
        out: &mut [f32],
    ) {
        for i in from..to {
            // SAFETY: the caller's lengths.
            out[i] = unsafe { dot_q8_0(w, &x[i * kb..(i + 1) * kb]) };
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
    fn bad_lengths_are_errors() {
        let mut y = [0f32; 2];
        let q = WeightType::Q4_1;
        assert!(matmul(q, &[0; 20], 1, 33, &[0.0; 33], 1, &mut y[..1]).is_err());
        assert!(matmul(q, &[0; 19], 1, 32, &[0.0; 32], 1, &mut y[..1]).is_err());
        assert!(matmul(q, &[0; 20], 1, 32, &[0.0; 32], 2, &mut y).is_err());
        assert!(dot(q, &[0; 20], &[BlockQ8_1::ZERO; 2]).is_err());
        assert!(dot(WeightType::Q8_0, &[0; 20], &[BlockQ8_1::ZERO; 1]).is_err());
    }
}
