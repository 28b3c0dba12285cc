//! Quantized matrix products: layerkv's `quant::matmul` (AVX2 picked at run time) against
//! candle 0.10.2's `QMatMul::forward` (scalar dot products in a default build) on the same
//! GGUF weight bytes, in the same run, for every type the kernels run.
//!
//! Shapes `[n, k]` (weight rows x columns): SmolLM2-135M's 576x576 (attention), 1536x576
//! (gate/up), 576x1536 (down), and a Qwen2-0.5B-like 896x4864 (down); the K-quants only where
//! `k` is a multiple of 256 (576 is not: llama.cpp stores those tensors in other types). Rows
//! `m` = 1 (decode), 4 and 16 (small batches) against candle's `QMatMul`; and `m` = 512 (a
//! prefill) on the 896x4864 shape against the dense path prefill takes without the int8 GEMM
//! (dequantize the weight, candle's f32 matmul) and, on a CPU with AVX-512 VNNI, against
//! layerkv's own AVX2 kernels (`matmul_on(Isa::Avx2)`), so the GEMM's gain is measured in the
//! same run. Every side includes quantizing the activations.
//!
//! `cargo bench --bench quant_matmul` runs criterion's benchmarks (`quant_matmul/<type>/
//! <n>x<k>/m<m>/<side>`) and then prints a table of medians and baseline / layerkv ratios from
//! the same samples; under `cargo test` one small case per type runs and layerkv and candle
//! must agree.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::Criterion;
use layerkv_kernels::quant::{self, WeightType};

const TYPES: [(WeightType, GgmlDType); 8] = [
    (WeightType::Q4_0, GgmlDType::Q4_0),
    (WeightType::Q4_1, GgmlDType::Q4_1),
    (WeightType::Q5_0, GgmlDType::Q5_0),
    (WeightType::Q5_1, GgmlDType::Q5_1),
    (WeightType::Q8_0, GgmlDType::Q8_0),
    (WeightType::Q4K, GgmlDType::Q4K),
    (WeightType::Q5K, GgmlDType::Q5K),
    (WeightType::Q6K, GgmlDType::Q6K),
];

const SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (896, 4864)];

const ROWS: [usize; 3] = [1, 4, 16];

/// A prefill's rows, on [`PREFILL_SHAPE`] only (candle's scalar `QMatMul` would take minutes).
const PREFILL_ROWS: usize = 512;
const PREFILL_SHAPE: (usize, usize) = (896, 4864);

/// One weight in both forms: its GGUF bytes for layerkv, a `QMatMul` for candle.
struct Weight {
    ty: WeightType,
    n: usize,
    k: usize,
    bytes: Vec<u8>,
    candle: QMatMul,
}

fn values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut rng = layerkv::SplitMix64::new(seed);
    (0..len)
        .map(|_| scale * (2.0 * rng.next_f64() as f32 - 1.0))
        .collect()
}

/// A random `[n, k]` weight quantized to `dtype` by candle (real blocks: valid scales).
fn weight(ty: WeightType, dtype: GgmlDType, n: usize, k: usize) -> Weight {
    let w = Tensor::from_vec(
        values(n as u64 * 7 + k as u64, n * k, 0.05),
        (n, k),
        &Device::Cpu,
    )
    .unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let bytes = q.data().unwrap().to_vec();
    assert_eq!(bytes.len(), n * k / ty.block_elems() * ty.block_bytes());
    let candle = QMatMul::from_arc(Arc::new(q)).unwrap();
    Weight {
        ty,
        n,
        k,
        bytes,
        candle,
    }
}

fn ours(w: &Weight, x: &[f32], m: usize, y: &mut [f32]) {
    quant::matmul(w.ty, &w.bytes, w.n, w.k, x, m, y).unwrap();
}

fn candle(w: &Weight, x: &Tensor) -> Tensor {
    w.candle.forward(x).unwrap()
}

/// The dense path: the weight dequantized to f32, then candle's f32 matmul.
fn dense(w: &Weight, x: &Tensor) -> Tensor {
    let mut f = vec![0f32; w.n * w.k];
    quant::dequantize(w.ty, &w.bytes, &mut f).unwrap();
    let f = Tensor::from_vec(f, (w.n, w.k), &Device::Cpu).unwrap();
    x.matmul(&f.t().unwrap()).unwrap()
}

/// Under `cargo test`: layerkv and candle agree on one small product per type (they quantize
/// the activations slightly differently, f16 vs f32 scales, so within 1% of the largest output).
fn check() {
    for (ty, dtype) in TYPES {
        let (n, k, m) = (37, 2 * ty.block_elems().max(256), 3);
        let w = weight(ty, dtype, n, k);
        let x = values(5, m * k, 1.0);
        let mut y = vec![f32::NAN; m * n];
        ours(&w, &x, m, &mut y);
        let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let theirs: Vec<f32> = candle(&w, &xt).flatten_all().unwrap().to_vec1().unwrap();
        let amax = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = y
            .iter()
            .zip(&theirs)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(
            diff <= 0.01 * amax,
            "{ty:?}: layerkv and candle differ by {diff} (max |y| {amax})"
        );
    }
    println!("quant_matmul bench check: 1 passed, 0 failed");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        check();
        return;
    }
    let isa = quant::Isa::detect();
    println!(
        "layerkv instruction set: {isa:?}, rayon threads: {}",
        rayon::current_num_threads()
    );
    let mut crit = Criterion::default().sample_size(10).configure_from_args();
    // Seconds per call of every sample criterion took, keyed by (case, side).
    let samples: RefCell<BTreeMap<(String, &str), Vec<f64>>> = RefCell::default();
    let mut cases = Vec::new();
    // Times `f` as `side` of `case` in `g`, keeping the samples for the table.
    let time = |g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
                case: &str,
                side: &'static str,
                f: &mut dyn FnMut()| {
        g.bench_function(side, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                let d = t.elapsed();
                let mut s = samples.borrow_mut();
                let v = s.entry((case.to_string(), side)).or_default();
                v.push(d.as_secs_f64() / iters as f64);
                d
            })
        });
    };
    for (ty, dtype) in TYPES {
        for (n, k) in SHAPES {
            if k % ty.block_elems() != 0 {
                continue;
            }
            let w = weight(ty, dtype, n, k);
            let prefill = ((n, k) == PREFILL_SHAPE).then_some(PREFILL_ROWS);
            for m in ROWS.into_iter().chain(prefill) {
                let x = values(11, m * k, 1.0);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let mut y = vec![0f32; m * n];
                let case = format!("{ty:?}/{n}x{k}/m{m}");
                let mut g = crit.benchmark_group(format!("quant_matmul/{case}"));
                time(&mut g, &case, "layerkv", &mut || {
                    ours(&w, black_box(&x), m, &mut y)
                });
                if m == PREFILL_ROWS {
                    time(&mut g, &case, "dense", &mut || {
                        drop(black_box(dense(&w, black_box(&xt))))
                    });
                    if isa > quant::Isa::Avx2 {
                        time(&mut g, &case, "layerkv-avx2", &mut || {
                            quant::matmul_on(quant::Isa::Avx2, w.ty, &w.bytes, n, k, &x, m, &mut y)
                                .unwrap()
                        });
                    }
                } else {
                    time(&mut g, &case, "candle", &mut || {
                        drop(black_box(candle(&w, black_box(&xt))))
                    });
                }
                g.finish();
                cases.push(case);
            }
        }
    }
    // The last 10 samples of each side are criterion's measurement (earlier ones: warm-up).
    let median = |case: &str, side: &str| {
        let s = samples.borrow();
        let v = s.get(&(case.to_string(), side))?;
        let mut v = v[v.len().saturating_sub(10)..].to_vec();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    println!(
        "\n{:<24} {:>12} {:>14} {:>12} {:>16}",
        "type/nxk/rows", "layerkv us", "baseline", "baseline us", "baseline/layerkv"
    );
    for case in cases {
        let Some(a) = median(&case, "layerkv") else {
            continue; // filtered out on the command line
        };
        for side in ["candle", "dense", "layerkv-avx2"] {
            if let Some(b) = median(&case, side) {
                println!(
                    "{case:<24} {:>12.1} {side:>14} {:>12.1} {:>15.2}x",
                    a * 1e6,
                    b * 1e6,
                    b / a
                );
            }
        }
    }
}
