//! The Q4_1 x Q8_1 and Q8_0 x Q8_0 kernels against dequantize-then-f32 on seeded random
//! blocks, for each weight type:
//! - the dispatched dot product (AVX2+FMA+F16C on a CPU that has them) equals the portable one
//!   and the f32 dot of the dequantized weight and dequantized activations (relative 1e-5), for
//!   odd block counts;
//! - against the unquantized activations, within the Q8 rounding bound;
//! - `matmul` equals the per-row dot products for m = 1, a few rows, and more rows than
//!   one cache tile, with a row count that leaves a partial rayon chunk.
//!
//! Fails if a nibble goes to the wrong element (e.g. swapping the high and low halves in the
//! AVX2 unpacking), if the minimum's term is dropped, or if the matmul's transpose mixes rows:
//! checked once by swapping the AVX2 unpacking's halves.

use half::f16;
use layerkv_kernels::quant::{
    dequantize, dot, dot_portable, has_avx2, matmul, quantize_q8_1, BlockQ8_1, WeightType, QK,
};

const TYPES: [WeightType; 2] = [WeightType::Q4_1, WeightType::Q8_0];

/// The project's seeded generator, with uniforms in [-1, 1).
struct Rng(layerkv::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(layerkv::SplitMix64::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (2.0 * self.0.next_f64() - 1.0) as f32
    }
}

/// `blocks` random blocks of `ty`: scales like real weights (Q4_1: d ~ 0.01, m ~ -8 d;
/// Q8_0: d ~ 0.001).
fn weight_blocks(rng: &mut Rng, ty: WeightType, blocks: usize) -> Vec<u8> {
    let mut w = Vec::with_capacity(blocks * ty.block_bytes());
    for _ in 0..blocks {
        match ty {
            WeightType::Q4_1 => {
                let d = 0.002 + 0.02 * rng.unit().abs();
                let m = -8.0 * d * (1.0 + 0.2 * rng.unit());
                w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                w.extend_from_slice(&f16::from_f32(m).to_le_bytes());
                for _ in 0..16 {
                    w.push(rng.next() as u8);
                }
            }
            WeightType::Q8_0 => {
                let d = 0.0002 + 0.002 * rng.unit().abs();
                w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for _ in 0..QK {
                    // -127..=127, as llama.cpp's quantizer writes.
                    w.push((rng.next() % 255) as u8 ^ 0x80);
                }
            }
        }
    }
    w
}

fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| 3.0 * rng.unit()).collect()
}

fn dequantize_q8_1(x: &[BlockQ8_1]) -> Vec<f32> {
    x.iter()
        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
        .collect()
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn dot_product_matches_dequantized_f32() {
    eprintln!("AVX2+FMA+F16C path: {}", has_avx2());
    let mut rng = Rng::new(0x5eed_0001);
    for (ty, blocks) in TYPES
        .iter()
        .flat_map(|&t| [1usize, 3, 5, 17, 19, 37].map(|b| (t, b)))
    {
        for _ in 0..20 {
            let w = weight_blocks(&mut rng, ty, blocks);
            let x = activations(&mut rng, blocks * QK);
            let mut xq = vec![BlockQ8_1::ZERO; blocks];
            quantize_q8_1(&x, &mut xq).unwrap();
            let mut wf = vec![0f32; blocks * QK];
            dequantize(ty, &w, &mut wf).unwrap();
            let xf = dequantize_q8_1(&xq);
            let want = dot_f64(&wf, &xf);
            let scale: f64 = wf.iter().zip(&xf).map(|(a, b)| (a * b).abs() as f64).sum();
            let got = dot(ty, &w, &xq).unwrap() as f64;
            let portable = dot_portable(ty, &w, &xq) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale,
                "{ty:?}, {blocks} blocks: kernel {got} vs dequantized f32 {want} (scale {scale})"
            );
            assert!(
                (portable - want).abs() <= 1e-5 * scale,
                "{ty:?}, {blocks} blocks: portable {portable} vs dequantized f32 {want}"
            );
            // Against the unquantized activations: each x moves by at most d/2 = amax/254.
            let exact = dot_f64(&wf, &x);
            let bound: f64 = wf
                .chunks(QK)
                .zip(&xq)
                .map(|(wb, b)| wb.iter().map(|v| v.abs() as f64).sum::<f64>() * b.d as f64 / 2.0)
                .sum();
            assert!(
                (got - exact).abs() <= bound * 1.001 + 1e-5 * scale,
                "{ty:?}, {blocks} blocks: {got} vs f32 {exact}, bound {bound}"
            );
        }
    }
}

#[test]
fn matmul_matches_row_dots() {
    let mut rng = Rng::new(0x5eed_0002);
    let (n, kb) = (37usize, 5usize);
    let k = kb * QK;
    for ty in TYPES {
        let w = weight_blocks(&mut rng, ty, n * kb);
        let mut wf = vec![0f32; n * k];
        dequantize(ty, &w, &mut wf).unwrap();
        for m in [1usize, 3, 70] {
            let x = activations(&mut rng, m * k);
            let mut y = vec![f32::NAN; m * n];
            matmul(ty, &w, n, k, &x, m, &mut y).unwrap();
            for i in 0..m {
                let mut xq = vec![BlockQ8_1::ZERO; kb];
                quantize_q8_1(&x[i * k..(i + 1) * k], &mut xq).unwrap();
                let xf = dequantize_q8_1(&xq);
                for j in 0..n {
                    let wrow = &wf[j * k..(j + 1) * k];
                    let want = dot_f64(wrow, &xf);
                    let scale: f64 = wrow
                        .iter()
                        .zip(&xf)
                        .map(|(a, b)| (a * b).abs() as f64)
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "{ty:?}, m {m}: y[{i}, {j}] = {got}, dequantized f32 {want}"
                    );
                }
            }
        }
    }
}
