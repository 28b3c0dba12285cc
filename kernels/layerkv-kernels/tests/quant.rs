//! The quantized kernels of every weight type against dequantize-then-f32 on seeded random
//! blocks (valid finite f16 scales, every bit pattern of values, scales and fifth/sixth bits):
//! - `dequantize` equals candle's dequantization of the same bytes (`QTensor`), so the byte
//!   layouts are proven independently of this crate's code;
//! - the dispatched dot product (AVX2+FMA+F16C on a CPU that has them) equals the portable one
//!   and the f64 dot of the dequantized weight and dequantized activations, both within f32
//!   rounding (relative 1e-5 of `sum |w x|`), for odd block counts;
//! - `matmul_on` every instruction set this CPU has (portable, AVX2, AVX-512 VNNI's int8 GEMM
//!   from 8 rows) against the f64 product of the dequantized weight and the *unquantized*
//!   activations, within the activation quantization bound, for n not a multiple of the
//!   chunk or packed group (16) or the four-row group, m = 1, 3, 5, 9, 33, 70 (past one cache
//!   tile), k one block and several (up to 40 blocks);
//! - bad lengths and a mismatched activation form are errors.
//!
//! Comparisons are written `diff <= tol` so a NaN fails them, and outputs start as NaN so an
//! unwritten one fails too.
//!
//! Checked by breaking the code, one change at a time; each made these tests fail: AVX2
//! nibble halves swapped, Q5 fifth-bit bytes swapped, Q4_0/Q5_0 offsets dropped or off by
//! one, Q4_K scales of a group pair swapped, the K4 minimums' sign flipped, the 6-bit
//! scale/min unpacking shifted, Q5_K's two fifth bits swapped, Q6_K's 16-group scales or its
//! high-bit pairs mixed up, the four-row kernel reading a wrong row (only the matmul test),
//! the portable Q5_K/Q5_0/Q6_K bit positions, Q4_0 offset and `get_scale_min_k4` bytes (also
//! the candle cross-check), and Q8_K sums over 15 values, a flipped Q8_K scale or floor
//! rounding.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::f16;
use layerkv_kernels::quant::{
    dequantize, dot, dot_portable, has_avx2, matmul, matmul_on, quantize_q8_1, quantize_q8_k,
    Activation, ActivationBlock, BlockQ8K, BlockQ8_1, Isa, WeightType,
};

const TYPES: [WeightType; 8] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

/// The project's seeded generator, with uniforms in [-1, 1).
struct Rng(layerkv::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(layerkv::SplitMix64::new(seed))
    }
    fn byte(&mut self) -> u8 {
        self.0.next_u64() as u8
    }
    fn bytes(&mut self, out: &mut Vec<u8>, n: usize) {
        for _ in 0..n {
            out.push(self.byte());
        }
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (2.0 * self.0.next_f64() - 1.0) as f32
    }
    /// An f16 scale of magnitude `base * [1, 11)`, negative when `signed` and a coin says so.
    fn scale(&mut self, out: &mut Vec<u8>, base: f32, signed: bool) -> f32 {
        let mut d = base * (1.0 + 10.0 * self.unit().abs());
        if signed && self.byte() & 1 == 1 {
            d = -d;
        }
        let h = f16::from_f32(d);
        assert!(h.is_finite() && h != f16::ZERO);
        out.extend_from_slice(&h.to_le_bytes());
        h.to_f32()
    }
}

fn candle_dtype(ty: WeightType) -> GgmlDType {
    match ty {
        WeightType::Q4_0 => GgmlDType::Q4_0,
        WeightType::Q4_1 => GgmlDType::Q4_1,
        WeightType::Q5_0 => GgmlDType::Q5_0,
        WeightType::Q5_1 => GgmlDType::Q5_1,
        WeightType::Q8_0 => GgmlDType::Q8_0,
        WeightType::Q4K => GgmlDType::Q4K,
        WeightType::Q5K => GgmlDType::Q5K,
        WeightType::Q6K => GgmlDType::Q6K,
    }
}

/// `blocks` random blocks of `ty` in the GGUF layout, scales like real weights (|w| about
/// 0.01-0.2); Q4_0 and Q5_0 scales of either sign, as llama.cpp's quantizer writes them.
fn weight_blocks(rng: &mut Rng, ty: WeightType, blocks: usize) -> Vec<u8> {
    let mut w = Vec::with_capacity(blocks * ty.block_bytes());
    for _ in 0..blocks {
        let start = w.len();
        match ty {
            WeightType::Q4_0 => {
                rng.scale(&mut w, 0.002, true);
                rng.bytes(&mut w, 16);
            }
            WeightType::Q4_1 | WeightType::Q5_1 => {
                let d = rng.scale(&mut w, 0.002, false);
                let top = if ty == WeightType::Q4_1 { 8.0 } else { 16.0 };
                let m = -top * d * (1.0 + 0.2 * rng.unit());
                w.extend_from_slice(&f16::from_f32(m).to_le_bytes());
                rng.bytes(&mut w, if ty == WeightType::Q4_1 { 16 } else { 4 + 16 });
            }
            WeightType::Q5_0 => {
                rng.scale(&mut w, 0.001, true);
                rng.bytes(&mut w, 4 + 16);
            }
            WeightType::Q8_0 => {
                rng.scale(&mut w, 0.0002, false);
                for _ in 0..32 {
                    // -127..=127, as llama.cpp's quantizer writes.
                    w.push((rng.0.next_u64() % 255) as u8 ^ 0x80);
                }
            }
            WeightType::Q4K | WeightType::Q5K => {
                rng.scale(&mut w, 0.0001, false); // d: times 6-bit scales
                rng.scale(&mut w, 0.0001, false); // dmin: times 6-bit minimums
                rng.bytes(
                    &mut w,
                    12 + if ty == WeightType::Q5K { 32 } else { 0 } + 128,
                );
            }
            WeightType::Q6K => {
                rng.bytes(&mut w, 128 + 64 + 16);
                rng.scale(&mut w, 0.00005, false); // times i8 scales and -32..32
            }
        }
        assert_eq!(w.len() - start, ty.block_bytes(), "{ty:?}");
    }
    w
}

fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| 3.0 * rng.unit()).collect()
}

/// What the tests read back from an activation block form.
trait Blocks: ActivationBlock {
    /// The dequantized values `d * qs`.
    fn values(blocks: &[Self]) -> Vec<f32>;
}

impl Blocks for BlockQ8_1 {
    fn values(blocks: &[Self]) -> Vec<f32> {
        blocks
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
            .collect()
    }
}

impl Blocks for BlockQ8K {
    fn values(blocks: &[Self]) -> Vec<f32> {
        blocks
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
            .collect()
    }
}

fn dequantized(ty: WeightType, w: &[u8]) -> Vec<f32> {
    let mut out = vec![f32::NAN; w.len() / ty.block_bytes() * ty.block_elems()];
    dequantize(ty, w, &mut out).unwrap();
    out
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn abs_dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum()
}

/// The largest error quantizing the activations `x` costs the dot with `w`: in each activation
/// block (32 or 256 values) every value moves by at most half a step, `amax / 127 / 2`
/// (Q8_1: `d = amax / 127`; Q8_K: `|d| = amax / 127`, and no value is clamped), so
/// `|w . x - w . x_q| <= sum_blocks amax_b / 254 * sum_b |w|`. Derived from `x` alone, not
/// from the quantizer under test.
fn activation_bound(w: &[f32], x: &[f32], block: usize) -> f64 {
    w.chunks(block)
        .zip(x.chunks(block))
        .map(|(wb, xb)| {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            amax / 254.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum()
}

/// One random dot of `blocks` blocks of `ty` against activation form `A`: the dispatched and
/// portable kernels against each other and the dequantized f64 dot.
fn check_dot<A: Blocks>(rng: &mut Rng, ty: WeightType, blocks: usize) {
    let be = ty.block_elems();
    let w = weight_blocks(rng, ty, blocks);
    let x = activations(rng, blocks * be);
    let mut xq = vec![A::ZERO_BLOCK; blocks];
    A::quantize(&x, &mut xq).unwrap();
    let wf = dequantized(ty, &w);
    let xf = A::values(&xq);
    let want = dot_f64(&wf, &xf);
    let scale = abs_dot_f64(&wf, &xf);
    let got = dot(ty, &w, &xq).unwrap() as f64;
    let portable = dot_portable(ty, &w, &xq).unwrap() as f64;
    // f32 rounding of sums of `blocks * be` products: relative 1e-5 of sum |w x| is ~100 ulps.
    let tol = 1e-5 * scale;
    assert!(
        (got - want).abs() <= tol,
        "{ty:?}, {blocks} blocks: kernel {got} vs dequantized f64 {want} (scale {scale})"
    );
    assert!(
        (portable - want).abs() <= tol,
        "{ty:?}, {blocks} blocks: portable {portable} vs dequantized f64 {want}"
    );
    assert!(
        (got - portable).abs() <= tol,
        "{ty:?}, {blocks} blocks: kernel {got} vs portable {portable}"
    );
    let exact = dot_f64(&wf, &x);
    let bound = activation_bound(&wf, &x, be);
    assert!(
        (got - exact).abs() <= bound * 1.001 + tol,
        "{ty:?}, {blocks} blocks: {got} vs f32 activations {exact}, bound {bound}"
    );
}

#[test]
fn dot_products_match_dequantized_f32_and_each_other() {
    eprintln!("AVX2+FMA+F16C path: {}", has_avx2());
    let mut rng = Rng::new(0x5eed_0001);
    for ty in TYPES {
        let counts: &[usize] = match ty.activation() {
            Activation::Q8_1 => &[1, 3, 5, 17, 19, 37],
            Activation::Q8K => &[1, 2, 3, 5],
        };
        for &blocks in counts {
            for _ in 0..20 {
                match ty.activation() {
                    Activation::Q8_1 => check_dot::<BlockQ8_1>(&mut rng, ty, blocks),
                    Activation::Q8K => check_dot::<BlockQ8K>(&mut rng, ty, blocks),
                }
            }
        }
    }
}

/// A value no product here yields, written past the end of an output.
const GUARD: f32 = 1.0e30;

#[test]
fn matmul_matches_dequantized_f32() {
    let mut rng = Rng::new(0x5eed_0002);
    for ty in TYPES {
        let be = ty.block_elems();
        // 300 rows: decode splits them in chunks of more than 16 rows, the GEMM in several
        // packed groups and a partial one.
        for (n, kb) in [
            (1usize, 1usize),
            (7, 1),
            (37, 3),
            (21, 5),
            (300, 2),
            (50, 40),
        ] {
            let k = kb * be;
            let w = weight_blocks(&mut rng, ty, n * kb);
            let wf = dequantized(ty, &w);
            for (m, isa) in [1usize, 3, 5, 9, 33, 70]
                .into_iter()
                .flat_map(|m| Isa::ALL.map(|isa| (m, isa)))
                .filter(|(_, isa)| isa.available())
            {
                let x = activations(&mut rng, m * k);
                // Guard values past the end: a kernel that writes past `m * n` changes them.
                let mut buf = vec![f32::NAN; m * n + 16];
                buf[m * n..].fill(GUARD);
                matmul_on(isa, ty, &w, n, k, &x, m, &mut buf[..m * n]).unwrap();
                assert!(
                    buf[m * n..].iter().all(|&v| v == GUARD),
                    "{ty:?} {isa:?} n {n} k {k} m {m}: wrote past the output"
                );
                let y = &buf[..m * n];
                for i in 0..m {
                    let xr = &x[i * k..(i + 1) * k];
                    // The row as the kernel sees it, for the tight f32-rounding check.
                    let xf = match ty.activation() {
                        Activation::Q8_1 => {
                            let mut q = vec![BlockQ8_1::ZERO; kb];
                            quantize_q8_1(xr, &mut q).unwrap();
                            BlockQ8_1::values(&q)
                        }
                        Activation::Q8K => {
                            let mut q = vec![BlockQ8K::ZERO; kb];
                            quantize_q8_k(xr, &mut q).unwrap();
                            BlockQ8K::values(&q)
                        }
                    };
                    for j in 0..n {
                        let wr = &wf[j * k..(j + 1) * k];
                        let got = y[i * n + j] as f64;
                        let scale = abs_dot_f64(wr, xr);
                        let exact = dot_f64(wr, xr);
                        let bound = activation_bound(wr, xr, be) * 1.001 + 1e-5 * scale;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{ty:?} {isa:?} n {n} k {k} m {m}: y[{i}, {j}] = {got}, f32 \
                             {exact}, bound {bound}"
                        );
                        let want = dot_f64(wr, &xf);
                        assert!(
                            (got - want).abs() <= 1e-5 * abs_dot_f64(wr, &xf),
                            "{ty:?} {isa:?} n {n} k {k} m {m}: y[{i}, {j}] = {got}, \
                             quantized activations {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_matches_candle() {
    let mut rng = Rng::new(0x5eed_0003);
    for ty in TYPES {
        let (rows, k) = (5, 3 * ty.block_elems());
        let w = weight_blocks(&mut rng, ty, rows * 3);
        let ours = dequantized(ty, &w);
        let storage =
            QStorage::from_data(Cow::Borrowed(&w), &Device::Cpu, candle_dtype(ty)).unwrap();
        let theirs: Vec<f32> = QTensor::new(storage, (rows, k))
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(a.is_finite(), "{ty:?}: value {i} is {a}");
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{ty:?}: value {i} (block {}, element {}): ours {a}, candle {b}",
                i / ty.block_elems(),
                i % ty.block_elems()
            );
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    for ty in TYPES {
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        let w = vec![0u8; 2 * bb];
        let x = vec![0f32; 2 * be];
        let mut y = [f32::NAN; 4];
        assert!(matmul(ty, &w, 1, 2 * be, &x, 1, &mut y[..1]).is_ok());
        assert!(matmul(ty, &w, 2, be, &x[..be], 1, &mut y[..2]).is_ok());
        // k not a whole number of blocks (the K-quants also refuse 32-value blocks).
        assert!(matmul(ty, &w, 1, be + 1, &x[..be + 1], 1, &mut y[..1]).is_err());
        if be > 32 {
            assert!(matmul(ty, &w, 1, 32, &x[..32], 1, &mut y[..1]).is_err());
        }
        // Weight bytes, activations or outputs of the wrong length.
        assert!(matmul(ty, &w[..2 * bb - 1], 1, 2 * be, &x, 1, &mut y[..1]).is_err());
        assert!(matmul(ty, &w, 1, 2 * be, &x[..be], 1, &mut y[..1]).is_err());
        assert!(matmul(ty, &w, 1, 2 * be, &x, 1, &mut y[..2]).is_err());
        assert!(matmul(ty, &w, 1, 2 * be, &x, 2, &mut y[..2]).is_err());
        let mut out = vec![0f32; 2 * be];
        assert!(dequantize(ty, &w, &mut out).is_ok());
        assert!(dequantize(ty, &w[..bb + 1], &mut out[..be]).is_err());
        assert!(dequantize(ty, &w, &mut out[..be]).is_err());
        // The wrong activation form, or the wrong number of blocks.
        let (q1, qk) = ([BlockQ8_1::ZERO; 16], [BlockQ8K::ZERO; 2]);
        match ty.activation() {
            Activation::Q8_1 => {
                assert!(dot(ty, &w, &q1[..2]).is_ok());
                assert!(dot(ty, &w, &q1[..3]).is_err());
                assert!(dot(ty, &w[..bb], &qk[..1]).is_err());
                assert!(dot_portable(ty, &w[..bb], &qk[..1]).is_err());
            }
            Activation::Q8K => {
                assert!(dot(ty, &w, &qk).is_ok());
                assert!(dot(ty, &w, &qk[..1]).is_err());
                assert!(dot(ty, &w[..bb], &q1[..8]).is_err());
                assert!(dot_portable(ty, &w[..bb], &q1[..8]).is_err());
            }
        }
    }
}
