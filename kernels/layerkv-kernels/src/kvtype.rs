//! [`KvType`]: what one K or V page row holds. Besides candle's float dtypes, two of
//! llama.cpp's block formats, so that figures compare with its `-ctk` / `-ctv` directly:
//!
//! - **Q8_0**: blocks of 32 values, an f16 scale `d` and 32 signed bytes (`x = d q`): 34 bytes
//!   per 32 values, 0.53x f16;
//! - **Q4_0**: blocks of 32 values, an f16 scale and 16 bytes of nibbles (`x = d (q - 8)`, value
//!   `j` in the low nibble of byte `j`, value `16 + j` in its high nibble): 18 bytes, 0.28x f16;
//! - **e4m3** (the 8-bit float of vLLM's and mistral.rs's fp8 caches) in the OCP Microscaling
//!   block layout (MXFP8): 32 e4m3 values and a shared power-of-two scale (one E8M0 byte):
//!   33 bytes per 32 values, 0.52x f16. The scale is the smallest power of two that keeps the
//!   block's largest magnitude within e4m3's 448, so no value saturates (short of magnitudes
//!   past 448 x 2^119, which the largest scale the kernels read leaves at 448 x 2^119).
//!
//! A quantized page keeps the float page's shape with a row of bytes in place of a row of
//! values (`[num_pages, block_size, kv_heads, row_bytes]`, stored as `U8`), so every operation
//! that moves whole `(slot, head)` rows (compaction, copy-on-write, rollback) moves blocks as
//! they are: values are rounded once, when written ([`quantize_q8_0`], [`quantize_q4_0`], the
//! rounding of llama.cpp's reference `quantize_row_*_ref`; [`quantize_e4m3`]).
//!
//! **Rotation.** A few channels of a key carry most of its magnitude, and one outlier sets a
//! whole block's scale, so 4-bit blocks lose the small channels. As llama.cpp does for its
//! quantized caches (and QuaRot, KVQuant before it), block rows are stored rotated by an
//! orthonormal Walsh-Hadamard transform `H` over each head's values ([`hadamard`]), which
//! spreads an outlier over every channel: keys as `H k` with queries rotated to `H q` (scores
//! are unchanged, `H` being orthonormal), values as `H v` with each attention output rotated
//! back (`H` is its own inverse). On by default for the integer blocks ([`KvTypes::rotate`],
//! [`KvType::rotates`]); e4m3 rows are stored as they are.

use std::fmt;

use candle_core::DType;
use half::f16;

use crate::error::{KernelError, Result};

/// Values per quantized block (Q8_0, Q4_0 and e4m3).
pub const QK: usize = 32;

/// The type of the values of one K or V page row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// llama.cpp's Q8_0 blocks (8.5 bits per value).
    Q8_0,
    /// llama.cpp's Q4_0 blocks (4.5 bits per value).
    Q4_0,
    /// e4m3 floats in MX blocks (8.25 bits per value; see the module docs).
    E4M3,
}

impl KvType {
    /// Every type, in the order the CLI lists them.
    pub const ALL: [KvType; 6] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::E4M3,
    ];

    /// The name the CLI and policy files use (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `e4m3`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::E4M3 => "e4m3",
        }
    }

    /// The type named `name` (see [`KvType::name`]).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether rows are blocks of bytes rather than float values.
    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4_0 | Self::E4M3)
    }

    /// Whether rows of this type are stored rotated when [`KvTypes::rotate`] is on: the integer
    /// blocks, whose one scale per block an outlier would set. An e4m3 value carries its own
    /// exponent, and rotating its rows measured no better (`docs/quantized-kv-pages.md`).
    pub fn rotates(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4_0)
    }

    /// The float type, for a float dtype (f32, f16, bf16); `None` for others.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// The dtype of the page tensor: the float dtype, or `U8` for blocks.
    pub fn storage_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::Q8_0 | Self::Q4_0 | Self::E4M3 => DType::U8,
        }
    }

    /// Bytes of one row of `head_dim` values (block scales included).
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F32 => 4 * head_dim,
            Self::F16 | Self::BF16 => 2 * head_dim,
            Self::Q8_0 => head_dim.div_ceil(QK) * 34,
            Self::Q4_0 => head_dim.div_ceil(QK) * 18,
            Self::E4M3 => head_dim.div_ceil(QK) * 33,
        }
    }

    /// Storage elements (of [`KvType::storage_dtype`]) of one row of `head_dim` values.
    pub fn row_units(self, head_dim: usize) -> usize {
        if self.is_quantized() {
            self.row_bytes(head_dim)
        } else {
            head_dim
        }
    }

    /// Checks that rows of `head_dim` values fit this type: blocks need whole blocks.
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        if self.is_quantized() && !head_dim.is_multiple_of(QK) {
            return Err(KernelError::Invalid(format!(
                "{} KV pages need a head_dim that is a multiple of {QK} (this model's is \
                 {head_dim}); use f16 or bf16 pages",
                self.name()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The K and V page types of a store (llama.cpp's `-ctk` / `-ctv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvTypes {
    /// Key pages.
    pub k: KvType,
    /// Value pages.
    pub v: KvType,
    /// Store integer block rows (Q8_0, Q4_0: [`KvType::rotates`]) rotated by a Walsh-Hadamard
    /// transform (see the module docs); float and e4m3 rows are never rotated. `true` unless a
    /// spec says `:plain`.
    pub rotate: bool,
}

impl KvTypes {
    /// Keys of type `k`, values of type `v`, block rows rotated.
    pub fn new(k: KvType, v: KvType) -> Self {
        Self { k, v, rotate: true }
    }

    /// K and V of one type.
    pub fn both(t: KvType) -> Self {
        Self::new(t, t)
    }

    /// These types with block rows rotated or not.
    pub fn with_rotation(self, rotate: bool) -> Self {
        Self { rotate, ..self }
    }

    /// Parses `TYPE` (K and V) or `K,V` (e.g. `q8_0`, `q8_0,q4_0`), with `:plain` after it for
    /// block rows stored unrotated (`q4_0:plain`).
    pub fn parse(spec: &str) -> Option<Self> {
        let (spec, rotate) = match spec.trim().strip_suffix(":plain") {
            Some(s) => (s, false),
            None => (spec.trim(), true),
        };
        let types = match spec.split_once(',') {
            None => Self::both(KvType::parse(spec)?),
            Some((k, v)) => Self::new(KvType::parse(k.trim())?, KvType::parse(v.trim())?),
        };
        Some(types.with_rotation(rotate))
    }

    /// Whether key rows are stored rotated (then queries are rotated too).
    pub fn rotates_k(self) -> bool {
        self.rotate && self.k.rotates()
    }

    /// Whether value rows are stored rotated (then attention outputs are rotated back).
    pub fn rotates_v(self) -> bool {
        self.rotate && self.v.rotates()
    }

    /// Float pages of `dtype` for K and V (`None` for a dtype that is not f32, f16 or bf16).
    pub fn float(dtype: DType) -> Option<Self> {
        KvType::from_dtype(dtype).map(Self::both)
    }

    /// Bytes of one token of one KV head: a K row and a V row.
    pub fn token_head_bytes(self, head_dim: usize) -> usize {
        self.k.row_bytes(head_dim) + self.v.row_bytes(head_dim)
    }

    /// Whether either K or V is quantized.
    pub fn is_quantized(self) -> bool {
        self.k.is_quantized() || self.v.is_quantized()
    }
}

impl From<KvType> for KvTypes {
    fn from(t: KvType) -> Self {
        Self::both(t)
    }
}

impl fmt::Display for KvTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)?;
        } else {
            write!(f, "{},{}", self.k, self.v)?;
        }
        if !self.rotate && (self.k.rotates() || self.v.rotates()) {
            f.write_str(":plain")?;
        }
        Ok(())
    }
}

/// The Walsh-Hadamard size for rows of `head_dim` values: the largest power of two dividing
/// it (the whole head for 64, 128, 256; blocks of 32 for 96), so one transform never mixes
/// two heads.
pub fn hadamard_size(head_dim: usize) -> usize {
    1 << head_dim.trailing_zeros()
}

/// The matrix of [`hadamard`] over rows of `head_dim` values (`head_dim x head_dim`, row
/// major): a row vector times it is the row rotated. Block-diagonal where `head_dim` is not a
/// power of two; symmetric, and its own inverse.
pub fn hadamard_matrix(head_dim: usize) -> Vec<f32> {
    let mut m = vec![0f32; head_dim * head_dim];
    for i in 0..head_dim {
        m[i * head_dim + i] = 1.0;
    }
    // Row i becomes H e_i, that is column i of H; H is symmetric, so the rows are H's.
    hadamard(&mut m, hadamard_size(head_dim));
    m
}

/// Rotates every consecutive run of `n` values of `x` (a power of two) by the orthonormal
/// Walsh-Hadamard transform, in place: `H` is symmetric and `H H = I`, so applying it twice
/// gives `x` back (to rounding).
pub fn hadamard(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len().is_multiple_of(n));
    let scale = 1.0 / (n as f32).sqrt();
    for row in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (row[j], row[j + h]);
                    row[j] = a + b;
                    row[j + h] = a - b;
                }
            }
            h *= 2;
        }
        for v in row.iter_mut() {
            *v *= scale;
        }
    }
}

/// llama.cpp's `quantize_row_q8_0_ref` for one row (`x.len()` a multiple of 32) into
/// `out` (34 bytes per block): `d = max|x| / 127`, `q = round(x / d)` (half away from zero),
/// `d` stored as f16.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (o, v) in ob[2..].iter_mut().zip(xb) {
            *o = ((v * id).round() as i8) as u8;
        }
    }
}

/// llama.cpp's `quantize_row_q4_0_ref` for one row into `out` (18 bytes per block): the value
/// of largest magnitude `m` (with its sign) gives `d = m / -8`, `q = min(15, trunc(x / d +
/// 8.5))`.
pub fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            ob[2 + j] = q(xb[j]) | (q(xb[j + QK / 2]) << 4);
        }
    }
}

/// Inverse of [`quantize_q8_0`] (`x.len()` values from `x.len() / 32` blocks).
pub fn dequantize_q8_0(blocks: &[u8], x: &mut [f32]) {
    for (b, xb) in blocks.chunks_exact(34).zip(x.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (o, &q) in xb.iter_mut().zip(&b[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Inverse of [`quantize_q4_0`].
pub fn dequantize_q4_0(blocks: &[u8], x: &mut [f32]) {
    for (b, xb) in blocks.chunks_exact(18).zip(x.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for j in 0..QK / 2 {
            xb[j] = d * ((b[2 + j] & 0x0f) as i32 - 8) as f32;
            xb[j + QK / 2] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
        }
    }
}

/// The largest finite e4m3 value (`S.1111.110`; `S.1111.111` is NaN, never written).
pub const E4M3_MAX: f32 = 448.0;

/// One e4m3 code for `x`: round to nearest, ties to even, as the OCP 8-bit float spec and
/// CUDA's `__nv_cvt_float_to_fp8` (saturating) do; subnormals below 2^-6 in steps of 2^-9;
/// magnitudes past 448 saturate to it, and NaN gives a zero (the blocks never hand either).
pub fn e4m3_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign;
    }
    let a = x.abs().min(E4M3_MAX);
    // The value's exponent (at least -6: the subnormals share the smallest one), its step
    // (3 mantissa bits), and the count of steps, rounded half to even.
    let exp = if a < 2f32.powi(-6) {
        -6
    } else {
        (a.to_bits() >> 23) as i32 - 127
    };
    let step = 2f32.powi(exp - 3);
    // Dividing by a power of two is exact. `n` is 0..=16: 16 carries into the next exponent,
    // and below 8 only at exponent -6 (a subnormal).
    let n = (a / step).round_ties_even() as u32;
    let (exp, n) = if n == 16 { (exp + 1, 8) } else { (exp, n) };
    let code = if n < 8 {
        n // subnormal: exponent field 0
    } else {
        (((exp + 7) as u32) << 3) | (n - 8)
    };
    sign | (code.min(0x7e) as u8)
}

/// The value of e4m3 code `b` (NaN for `S.1111.111`).
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 0x0f) as i32, (b & 7) as f32);
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    sign * if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The largest E8M0 scale byte written: the kernels apply a block's scale times 2^8 (see
/// `codes8_e4m3`), and byte 246 + 8 is the largest finite f32 exponent.
const E8M0_MAX: i32 = 246;

/// The power-of-two scale of an E8M0 byte, `2^(e - 127)` (byte 0 is 2^-127, a subnormal f32,
/// as OCP reads it; 255, NaN, is never written).
pub fn e8m0_scale(e: u8) -> f32 {
    if e == 0 {
        f32::from_bits(1 << 22)
    } else {
        f32::from_bits((e as u32) << 23)
    }
}

/// MXFP8 (e4m3) blocks for one row (`x.len()` a multiple of 32) into `out` (33 bytes per
/// block): the E8M0 scale `2^s` with the smallest `s` such that `max|x| / 2^s <= 448`, then
/// each value divided by it (exact) and rounded to e4m3.
pub fn quantize_e4m3(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(33)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut e: i32 = if amax > 0.0 {
            (amax / E4M3_MAX).log2().ceil() as i32
        } else {
            0
        };
        // log2 of a float is not exact at powers of two: settle on the smallest that fits.
        while e > -126 && amax / 2f32.powi(e - 1) <= E4M3_MAX {
            e -= 1;
        }
        while amax / 2f32.powi(e) > E4M3_MAX {
            e += 1;
        }
        // Past the largest scale byte, magnitudes saturate at 448 x 2^119 (`e4m3_encode`).
        let e = e.clamp(-126, E8M0_MAX - 127);
        ob[0] = (e + 127) as u8;
        let inv = 1.0 / e8m0_scale(ob[0]);
        for (o, v) in ob[1..].iter_mut().zip(xb) {
            *o = e4m3_encode(v * inv);
        }
    }
}

/// Inverse of [`quantize_e4m3`].
pub fn dequantize_e4m3(blocks: &[u8], x: &mut [f32]) {
    for (b, xb) in blocks.chunks_exact(33).zip(x.chunks_exact_mut(QK)) {
        let s = e8m0_scale(b[0]);
        for (o, &q) in xb.iter_mut().zip(&b[1..]) {
            *o = s * e4m3_decode(q);
        }
    }
}

/// Quantizes rows of `head_dim` f32 values into `t`'s row bytes.
pub(crate) fn quantize_rows(t: KvType, x: &[f32], head_dim: usize, out: &mut [u8]) {
    let rb = t.row_bytes(head_dim);
    for (xr, or) in x.chunks_exact(head_dim).zip(out.chunks_exact_mut(rb)) {
        match t {
            KvType::Q8_0 => quantize_q8_0(xr, or),
            KvType::Q4_0 => quantize_q4_0(xr, or),
            KvType::E4M3 => quantize_e4m3(xr, or),
            _ => unreachable!("quantize_rows is only called for block types"),
        }
    }
}

/// Dequantizes rows of `t`'s row bytes into `head_dim` f32 values each.
pub(crate) fn dequantize_rows(t: KvType, bytes: &[u8], head_dim: usize, out: &mut [f32]) {
    let rb = t.row_bytes(head_dim);
    for (br, or) in bytes.chunks_exact(rb).zip(out.chunks_exact_mut(head_dim)) {
        match t {
            KvType::Q8_0 => dequantize_q8_0(br, or),
            KvType::Q4_0 => dequantize_q4_0(br, or),
            KvType::E4M3 => dequantize_e4m3(br, or),
            _ => unreachable!("dequantize_rows is only called for block types"),
        }
    }
}

/// Rows of `head_dim` values as a store of `types` gives them back (`k` selects K's type, else
/// V's): rounded to f16 or bf16, or rotated where the types rotate, quantized, dequantized and
/// rotated back; f32 unchanged. What a dense reference attends to in order to match the
/// kernels on such pages.
pub fn round_trip(types: KvTypes, k: bool, head_dim: usize, x: &mut [f32]) {
    let t = if k { types.k } else { types.v };
    match t {
        KvType::F32 => {}
        KvType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        KvType::BF16 => x
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        KvType::Q8_0 | KvType::Q4_0 | KvType::E4M3 => {
            let rotate = types.rotate && t.rotates();
            if rotate {
                hadamard(x, hadamard_size(head_dim));
            }
            let mut bytes = vec![0u8; t.row_bytes(head_dim)];
            for row in x.chunks_exact_mut(head_dim) {
                quantize_rows(t, row, head_dim, &mut bytes);
                dequantize_rows(t, &bytes, head_dim, row);
            }
            if rotate {
                hadamard(x, hadamard_size(head_dim));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    /// candle's blocks as bytes (both are `repr(C)`: an f16 then the quants, no padding).
    fn as_bytes<T>(blocks: &[T]) -> Vec<u8> {
        // SAFETY: any initialised value may be read as bytes; the length is the slice's size.
        unsafe {
            std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
        }
        .to_vec()
    }

    /// Our blocks are byte for byte candle's (an independent port of llama.cpp's reference
    /// quantizers), and dequantize to the same values.
    #[test]
    fn blocks_match_candles_ggml_port() {
        let mut x = seeded(32 * 40, 7);
        // Blocks with exact zeros, ties at .5 and one all-zero block.
        x[..32].fill(0.0);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        let mut q8 = vec![0u8; 40 * 34];
        quantize_q8_0(&x, &mut q8);
        let mut theirs = vec![BlockQ8_0::zeros(); 40];
        BlockQ8_0::from_float(&x, &mut theirs);
        assert_eq!(q8, as_bytes(&theirs));
        let mut q4 = vec![0u8; 40 * 18];
        quantize_q4_0(&x, &mut q4);
        let mut theirs4 = vec![BlockQ4_0::zeros(); 40];
        BlockQ4_0::from_float(&x, &mut theirs4);
        assert_eq!(q4, as_bytes(&theirs4));
        let (mut ours, mut want) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        dequantize_q8_0(&q8, &mut ours);
        BlockQ8_0::to_float(&theirs, &mut want);
        assert_eq!(ours, want);
        dequantize_q4_0(&q4, &mut ours);
        BlockQ4_0::to_float(&theirs4, &mut want);
        assert_eq!(ours, want);
        // Q8_0 is within half a step of every value (plus the f16 rounding of the scale).
        dequantize_q8_0(&q8, &mut ours);
        for (xb, ob) in x.chunks(32).zip(ours.chunks(32)) {
            let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            assert!(xb
                .iter()
                .zip(ob)
                .all(|(a, b)| (a - b).abs() <= 0.57 * step + 1e-6));
        }
    }

    /// The transform against its definition (`H[i][j] = (-1)^popcount(i & j) / sqrt(n)`), and
    /// applied twice it is the identity.
    #[test]
    fn hadamard_matches_its_definition_and_inverts() {
        let n = 64;
        let x = seeded(2 * n, 3);
        let mut y = x.clone();
        hadamard(&mut y, n);
        for (r, (xr, yr)) in x.chunks(n).zip(y.chunks(n)).enumerate() {
            for (i, got) in yr.iter().enumerate() {
                let want: f32 = (0..n)
                    .map(|j| {
                        if (i & j).count_ones() % 2 == 0 {
                            xr[j]
                        } else {
                            -xr[j]
                        }
                    })
                    .sum::<f32>()
                    / (n as f32).sqrt();
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} value {i}: {got} vs {want}"
                );
            }
        }
        hadamard(&mut y, n);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    /// The GPU path rotates by a matmul with this matrix; it must equal the in-place transform
    /// the CPU path and the store use, for a power-of-two head and a block-diagonal one.
    #[test]
    fn hadamard_matrix_rotates_as_the_transform_does() {
        for d in [64, 96] {
            let m = hadamard_matrix(d);
            let x = seeded(3 * d, 11);
            let mut want = x.clone();
            hadamard(&mut want, hadamard_size(d));
            for (r, (xr, wr)) in x.chunks(d).zip(want.chunks(d)).enumerate() {
                for (j, w) in wr.iter().enumerate() {
                    let got: f32 = (0..d).map(|i| xr[i] * m[i * d + j]).sum();
                    assert!(
                        (got - w).abs() < 1e-5,
                        "d {d} row {r} value {j}: {got} vs {w}"
                    );
                }
            }
        }
    }

    /// e4m3 codes against candle's F8E4M3 (the `float8` crate: a port of CUDA's conversion,
    /// round to nearest even) over seeded values of every magnitude, subnormals and ties
    /// included; every finite code round-trips; and the MX blocks never saturate, take the
    /// smallest scale that avoids it, and keep every value within half an e4m3 step.
    #[test]
    fn e4m3_matches_candles_f8e4m3_and_blocks_do_not_saturate() {
        for b in 0..=255u8 {
            if b & 0x7f == 0x7f {
                assert!(e4m3_decode(b).is_nan());
                continue;
            }
            assert_eq!(e4m3_encode(e4m3_decode(b)), b, "code {b:#04x}");
        }
        // Values spread over e4m3's whole range (2^-10 .. 448), both signs, plus exact ties
        // (midpoints between neighbouring codes) and the subnormal range.
        let mut x: Vec<f32> = seeded(4000, 5)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * 2f32.powi((i % 19) as i32 - 10))
            .map(|v| v.clamp(-E4M3_MAX, E4M3_MAX))
            .collect();
        for b in 0..0x7eu8 {
            let (lo, hi) = (e4m3_decode(b), e4m3_decode(b + 1));
            x.extend([(lo + hi) / 2.0, -(lo + hi) / 2.0, lo * 0.999 + hi * 0.001]);
        }
        let t = candle_core::Tensor::new(x.as_slice(), &candle_core::Device::Cpu).unwrap();
        let theirs: Vec<f32> = t
            .to_dtype(DType::F8E4M3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (v, want) in x.iter().zip(&theirs) {
            let got = e4m3_decode(e4m3_encode(*v));
            assert!(got == *want, "{v}: ours {got}, candle's {want}");
        }
        let row: Vec<f32> = seeded(32 * 64, 9)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi((i / 32 % 9) as i32 - 4))
            .collect();
        let mut blocks = vec![0u8; 64 * 33];
        quantize_e4m3(&row, &mut blocks);
        let mut back = vec![0f32; row.len()];
        dequantize_e4m3(&blocks, &mut back);
        for (b, (xb, ob)) in blocks.chunks(33).zip(row.chunks(32).zip(back.chunks(32))) {
            let s = e8m0_scale(b[0]);
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                amax / s <= E4M3_MAX && amax / (s / 2.0) > E4M3_MAX,
                "scale {s}"
            );
            for (v, got) in xb.iter().zip(ob) {
                // Half a step of the value's binade (3 mantissa bits), or of the subnormals.
                let binade = (v.abs() / s).max(2f32.powi(-6)).log2().floor();
                let half_step = s * 2f32.powi(binade as i32 - 4);
                assert!((v - got).abs() <= half_step * 1.0001, "{v} -> {got}");
            }
        }
        // The extremes: a block near f32's largest magnitude keeps a scale byte the kernels'
        // 2^8-scaled read can hold (saturating at 448 x 2^119), finite values; NaN encodes to
        // zero (the block maximum skips it); byte 0 is OCP's 2^-127.
        let mut huge = seeded(32, 13);
        huge[3] = f32::MAX;
        huge[4] = f32::NAN;
        let mut b = [0u8; 33];
        quantize_e4m3(&huge, &mut b);
        let mut back = [0f32; 32];
        dequantize_e4m3(&b, &mut back);
        assert!(
            b[0] <= 246 && back.iter().all(|v| v.is_finite()),
            "{}",
            b[0]
        );
        assert_eq!(back[3], 448.0 * 2f32.powi(119));
        assert_eq!((e4m3_encode(f32::NAN), back[4]), (0, 0.0));
        assert_eq!(e8m0_scale(0), 2f32.powi(-127));
        assert_eq!(e8m0_scale(127), 1.0);
    }

    #[test]
    fn names_and_sizes() {
        for t in KvType::ALL {
            assert_eq!(KvType::parse(t.name()), Some(t));
        }
        assert_eq!(KvType::Q8_0.row_bytes(64), 68);
        assert_eq!(KvType::Q4_0.row_bytes(64), 36);
        assert_eq!(KvType::F16.row_bytes(64), 128);
        assert_eq!(KvType::E4M3.row_bytes(64), 66);
        assert!(KvType::E4M3.is_quantized() && !KvType::E4M3.rotates());
        // e4m3 rows are never rotated; `:plain` means nothing for them and is not printed.
        let e4 = KvTypes::parse("e4m3").unwrap();
        assert!(!e4.rotates_k() && !e4.rotates_v() && e4.to_string() == "e4m3");
        assert_eq!(
            KvTypes::parse("q8_0, q4_0"),
            Some(KvTypes::new(KvType::Q8_0, KvType::Q4_0))
        );
        let plain = KvTypes::parse("q4_0:plain").unwrap();
        assert!(!plain.rotate && !plain.rotates_k() && plain.to_string() == "q4_0:plain");
        assert!(KvTypes::parse("q8_0,f16").unwrap().rotates_k());
        assert!(!KvTypes::parse("q8_0,f16").unwrap().rotates_v());
        assert_eq!(hadamard_size(64), 64);
        assert_eq!(hadamard_size(96), 32);
        assert_eq!(KvTypes::parse("q8"), None);
        assert!(KvType::Q4_0.check_head_dim(48).is_err());
        assert!(KvType::F16.check_head_dim(48).is_ok());
    }
}
