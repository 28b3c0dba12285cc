//! The CPU paged kernel against the dense reference on seeded random cases: shapes, block sizes
//! (1, 4, 16, 32), shuffled page ids, lengths at and around page boundaries, validity masks with
//! holes, whole evicted pages (no valid slot), GQA ratios 1/3/4 and MQA, sliding windows, masked diagonals,
//! batches mixing decode and chunked prefill, f32/f16/bf16 storage; plus the attention mass.
//! Tolerances: f32 storage 1e-5 (relative to the output's scale), f16/bf16 storage 2e-2.
//!
//! Every input (shapes, page ids, masks and the Q/K/V values) comes from the case's seed, so a
//! failure names a case that reruns identically. Comparisons are NaN-aware (the testkit's
//! `max_abs_diff_f32`).

use candle_core::{DType, Device, Tensor};
use layerkv_kernels::reference::dense_attention;
use layerkv_kernels::{paged_attention, AttentionParams, KernelError, KvStore, SeqQuery};
use layerkv_testkit::max_abs_diff_f32;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }
    /// `n` standard normal values (Box-Muller).
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.unit(), self.unit());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }
    /// A seeded standard normal f32 tensor (`Tensor::randn` on the CPU is unseeded).
    fn randn(&mut self, shape: (usize, usize, usize), dev: &Device) -> Tensor {
        Tensor::from_vec(self.normals(shape.0 * shape.1 * shape.2), shape, dev).unwrap()
    }
}

/// The values of `t` as f32, flattened (from any device).
fn values(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The output scale a relative tolerance applies to: the largest magnitude, at least 1.
/// Non-finite outputs fail here (a tolerance scaled by infinity would accept anything).
fn scale_of(want: &[f32], what: &str) -> f32 {
    assert!(
        want.iter().all(|x| x.is_finite()),
        "{what}: non-finite reference"
    );
    want.iter().fold(1f32, |m, x| m.max(x.abs()))
}

struct Case {
    store: KvStore,
    pages: Vec<Vec<u32>>,
    valid: Vec<Option<Vec<u64>>>,
    num_slots: Vec<usize>,
    num_q: Vec<usize>,
    first_slot: Vec<usize>,
    q: Tensor,
    params: AttentionParams,
}

fn build(seed: u64, dtype: DType) -> Case {
    build_sized(seed, dtype, 90)
}

/// [`build`] with contexts of up to `max_len` slots in the random draw (and, beyond 90, chunks
/// of up to 600 query rows, so long prefill is drawn too).
fn build_sized(seed: u64, dtype: DType, max_len: usize) -> Case {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let bs = [1, 4, 16, 32][rng.below(4)];
    let kv_heads = [1, 2, 3][rng.below(3)];
    let group = [1, 3, 4][rng.below(3)];
    let head_dim = [8, 16, 20, 64][rng.below(4)];
    let batch = 1 + rng.below(4);
    let mut num_slots = Vec::new();
    let mut num_q = Vec::new();
    for _ in 0..batch {
        let n = match rng.below(5) {
            0 => 1,
            1 => bs,
            2 => bs + 1,
            _ => 1 + rng.below(max_len),
        };
        num_slots.push(n);
        num_q.push(if rng.below(2) == 0 {
            1
        } else {
            1 + rng.below(n.min(if max_len > 90 { 600 } else { 9 }))
        });
    }
    let total_pages: usize = num_slots.iter().map(|n| n.div_ceil(bs)).sum::<usize>() + 3;
    // Shuffled physical pages.
    let mut ids: Vec<u32> = (0..total_pages as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut next = 0;
    let mut pages = Vec::new();
    let mut valid = Vec::new();
    let holes = rng.below(3) == 0;
    for &n in &num_slots {
        let np = n.div_ceil(bs);
        let p: Vec<u32> = ids[next..next + np].to_vec();
        next += np;
        if holes {
            let mut v = vec![0u64; n.div_ceil(64)];
            for s in 0..n {
                if s == n - 1 || rng.below(4) != 0 {
                    v[s / 64] |= 1 << (s % 64);
                }
            }
            // Evict whole pages in the middle: none of their slots is valid.
            for i in 0..p.len() {
                if (i + 1) * bs < n && rng.below(4) == 0 {
                    for s in i * bs..(i + 1) * bs {
                        v[s / 64] &= !(1 << (s % 64));
                    }
                }
            }
            valid.push(Some(v));
        } else {
            valid.push(None);
        }
        pages.push(p);
    }
    let dev = Device::Cpu;
    let mut store = KvStore::new(total_pages, bs, kv_heads, head_dim, dtype, &dev).unwrap();
    let all = total_pages * bs;
    let k = rng.randn((all, kv_heads, head_dim), &dev);
    let v = rng.randn((all, kv_heads, head_dim), &dev);
    let slots: Vec<u32> = (0..all as u32).collect();
    store.write(&slots, &k, &v).unwrap();
    let total_q: usize = num_q.iter().sum();
    let q = rng
        .randn((total_q, kv_heads * group, head_dim), &dev)
        .to_dtype(dtype)
        .unwrap();
    let first_slot = num_slots
        .iter()
        .zip(&num_q)
        .map(|(&n, &nq)| n - nq + usize::from(rng.below(4) == 0).min(nq))
        .collect();
    let params = AttentionParams {
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: (rng.below(3) == 0).then(|| 1 + rng.below(20)),
        include_diagonal: rng.below(4) != 0,
    };
    Case {
        store,
        pages,
        valid,
        num_slots,
        num_q,
        first_slot,
        q,
        params,
    }
}

fn seqs(c: &Case) -> Vec<SeqQuery<'_>> {
    let mut start = 0;
    (0..c.pages.len())
        .map(|i| {
            let s = SeqQuery {
                kv: layerkv::TableView {
                    pages: &c.pages[i],
                    num_slots: c.num_slots[i],
                    valid: c.valid[i].as_deref(),
                },
                q_start: start,
                num_q: c.num_q[i],
                first_slot: c.first_slot[i],
            };
            start += c.num_q[i];
            s
        })
        .collect()
}

/// Paged vs dense on case `seed`. Shown to fail: with a NaN written into the last output value
/// (the `max(0)` reduction this replaced let it through), and with `Tensor::randn` inputs
/// (`cases_are_reproducible_from_their_seed`).
fn check(seed: u64, dtype: DType, tol: f32) {
    let c = build(seed, dtype);
    let s = seqs(&c);
    let total: usize = c.num_slots.iter().sum();
    let mut mass = vec![0.5f32; total];
    let got = paged_attention(&c.q, &c.store, &s, &c.params, Some(&mut mass)).unwrap();
    assert_eq!(got.dtype(), dtype);
    let (want, want_mass) = dense_attention(&c.q, &c.store, &s, &c.params).unwrap();
    let (got, want) = (values(&got), values(&want));
    let scale = scale_of(&want, &format!("seed {seed} {dtype:?}"));
    let diff = max_abs_diff_f32(&got, &want);
    assert!(
        diff <= tol * scale,
        "seed {seed} {dtype:?}: max diff {diff} (scale {scale}), params {:?}",
        c.params
    );
    scale_of(&want_mass, &format!("seed {seed} {dtype:?} mass"));
    for (i, (m, w)) in mass.iter().zip(&want_mass).enumerate() {
        assert!(
            (m - 0.5 - w).abs() <= 1e-3 * w.max(1.0),
            "seed {seed}: mass[{i}] {} vs {w}",
            m - 0.5
        );
    }
}

#[test]
fn paged_matches_reference_f32() {
    for seed in 0..150 {
        check(seed, DType::F32, 1e-5);
    }
}

#[test]
fn paged_matches_reference_f16_bf16() {
    for seed in 0..60 {
        check(seed, DType::F16, 2e-2);
        check(seed + 1000, DType::BF16, 2e-2);
    }
}

/// A seed names one case: building it twice gives the same inputs bit for bit, so a failure
/// reruns. Shown to fail with `Tensor::randn` back in `build_sized`.
#[test]
fn cases_are_reproducible_from_their_seed() {
    for seed in [0, 7, 1003] {
        let (a, b) = (build(seed, DType::F32), build(seed, DType::F32));
        for (x, y) in [
            (a.store.k(), b.store.k()),
            (a.store.v(), b.store.v()),
            (&a.q, &b.q),
        ] {
            let (x, y) = (values(x), values(y));
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "seed {seed}"
            );
        }
        assert_eq!(
            (a.pages, a.first_slot),
            (b.pages, b.first_slot),
            "seed {seed}"
        );
    }
}

#[test]
fn mass_sums_to_rows_times_heads() {
    // Every row that sees at least one slot spreads probability 1 per head.
    let c = build(7, DType::F32);
    let s = seqs(&c);
    let total: usize = c.num_slots.iter().sum();
    let mut mass = vec![0f32; total];
    let params = AttentionParams {
        window: None,
        include_diagonal: true,
        ..c.params
    };
    paged_attention(&c.q, &c.store, &s, &params, Some(&mut mass)).unwrap();
    let heads = c.q.dims()[1];
    let mut off = 0;
    for (i, seq) in s.iter().enumerate() {
        let sum: f32 = mass[off..off + c.num_slots[i]].iter().sum();
        let rows_seeing = (0..seq.num_q)
            .filter(|&r| {
                (0..=(seq.first_slot + r).min(seq.kv.num_slots - 1)).any(|x| seq.kv.is_valid(x))
            })
            .count();
        assert!(
            (sum - (rows_seeing * heads) as f32).abs() < 1e-3,
            "seq {i}: {sum}"
        );
        off += c.num_slots[i];
    }
}

#[test]
fn store_write_and_copy_page() {
    let dev = Device::Cpu;
    let mut store = KvStore::new(4, 2, 1, 4, DType::BF16, &dev).unwrap();
    let k = Tensor::arange(0f32, 8.0, &dev)
        .unwrap()
        .reshape((2, 1, 4))
        .unwrap();
    store.write(&[3, 6], &k, &(&k * 2.0).unwrap()).unwrap();
    store.copy_page(3, 0).unwrap();
    let pages = store
        .k()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((8, 4))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(pages[3], vec![0.0, 1.0, 2.0, 3.0]);
    assert_eq!(pages[6], vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!(pages[0], vec![4.0, 5.0, 6.0, 7.0]); // page 3 = slots 6, 7 copied to page 0
    let v = store
        .v()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((8, 4))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(v[3], vec![0.0, 2.0, 4.0, 6.0]);
    assert_eq!(store.page_bytes(), 2 * 2 * 4 * 2);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let dev = Device::Cpu;
    let mut store = KvStore::new(2, 4, 2, 8, DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap();
    assert!(matches!(
        store.write(&[8], &k, &k).unwrap_err(),
        KernelError::Page { page: 2, .. }
    ));
    assert!(matches!(
        store.write(&[0, 1], &k, &k).unwrap_err(),
        KernelError::Shape { .. }
    ));
    assert!(matches!(
        store.copy_page(0, 5).unwrap_err(),
        KernelError::Page { page: 5, .. }
    ));
    assert!(KvStore::new(2, 4, 2, 8, DType::U32, &dev).is_err());
    let params = AttentionParams {
        scale: 1.0,
        window: None,
        include_diagonal: true,
    };
    let seq = |pages: &'static [u32], n| SeqQuery {
        kv: layerkv::TableView {
            pages,
            num_slots: n,
            valid: None,
        },
        q_start: 0,
        num_q: 1,
        first_slot: 0,
    };
    let q = Tensor::zeros((1, 4, 8), DType::F32, &dev).unwrap();
    assert!(paged_attention(&q, &store, &[seq(&[0], 5)], &params, None).is_err());
    assert!(matches!(
        paged_attention(&q, &store, &[seq(&[7], 1)], &params, None).unwrap_err(),
        KernelError::Page { page: 7, .. }
    ));
    let bad_heads = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
    assert!(matches!(
        paged_attention(&bad_heads, &store, &[seq(&[0], 1)], &params, None).unwrap_err(),
        KernelError::Shape { .. }
    ));
    let mut short = vec![0f32; 3];
    assert!(paged_attention(&q, &store, &[seq(&[0], 1)], &params, Some(&mut short)).is_err());
    let rows = SeqQuery {
        q_start: 1,
        ..seq(&[0], 1)
    };
    assert!(paged_attention(&q, &store, &[rows], &params, None).is_err());
}

/// CUDA == CPU on the same random cases, and the device scatter/page copy (`--features cuda`,
/// needs a GPU; the kernels' compilation is checked without one in `cuda_compile.rs`). Seeds
/// from 120 on draw contexts of up to 3000 slots and prefill chunks of up to 600 rows, so the
/// kernels split a context over several blocks (few rows) and walk several chunks per block
/// (rows x KV heads beyond the planner's block target): the online softmax across chunks and
/// the log-sum-exp merge across splits both run.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_cpu() {
    let dev = Device::new_cuda(0).expect("--features cuda: no CUDA device");
    for seed in 0..140 {
        for (dtype, tol) in [
            (DType::F32, 1e-5f32),
            (DType::F16, 2e-2),
            (DType::BF16, 2e-2),
        ] {
            let c = build_sized(seed, dtype, if seed < 120 { 90 } else { 3000 });
            let (n, bs) = (c.store.num_pages(), c.store.block_size());
            let (kvh, d) = (c.store.kv_heads(), c.store.head_dim());
            let mut gpu = KvStore::new(n, bs, kvh, d, dtype, &dev).unwrap();
            // Write pages in reverse through the scatter, then copy page 0 onto itself's twin
            // and back, so both device store ops run before attention reads them.
            let rows: Vec<u32> = (0..(n * bs) as u32).rev().collect();
            let flat = |t: &Tensor| {
                let t = t.reshape((n * bs, kvh, d)).unwrap();
                let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
                t.index_select(&idx, 0).unwrap().to_device(&dev).unwrap()
            };
            gpu.write(&rows, &flat(c.store.k()), &flat(c.store.v()))
                .unwrap();
            if n > 1 {
                gpu.copy_page(0, 1).unwrap();
                // A deep copy: `KvStore::clone` shares the pages.
                let mut twin = KvStore::new(n, bs, kvh, d, dtype, &Device::Cpu).unwrap();
                let all: Vec<u32> = (0..(n * bs) as u32).collect();
                let whole = |t: &Tensor| t.reshape((n * bs, kvh, d)).unwrap();
                twin.write(&all, &whole(c.store.k()), &whole(c.store.v()))
                    .unwrap();
                twin.copy_page(0, 1).unwrap();
                let (a, b) = (gpu.k().to_device(&Device::Cpu).unwrap(), twin.k());
                let same = a
                    .to_dtype(DType::F32)
                    .unwrap()
                    .eq(&b.to_dtype(DType::F32).unwrap());
                let all = same.unwrap().flatten_all().unwrap().min(0).unwrap();
                assert_eq!(
                    all.to_scalar::<u8>().unwrap(),
                    1,
                    "seed {seed}: device store ops"
                );
                gpu.write(&rows, &flat(c.store.k()), &flat(c.store.v()))
                    .unwrap();
            }
            let s = seqs(&c);
            let total: usize = c.num_slots.iter().sum();
            let (mut m_cpu, mut m_gpu) = (vec![0f32; total], vec![0f32; total]);
            let want = paged_attention(&c.q, &c.store, &s, &c.params, Some(&mut m_cpu)).unwrap();
            let q = c.q.to_device(&dev).unwrap();
            let got = paged_attention(&q, &gpu, &s, &c.params, Some(&mut m_gpu)).unwrap();
            let (got, want) = (values(&got), values(&want));
            let scale = scale_of(&want, &format!("seed {seed} {dtype:?}"));
            let diff = max_abs_diff_f32(&got, &want);
            assert!(
                diff <= tol * scale,
                "seed {seed} {dtype:?}: CUDA vs CPU {diff}"
            );
            for (i, (g, w)) in m_gpu.iter().zip(&m_cpu).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-3 * w.max(1.0),
                    "seed {seed}: mass[{i}] {g} vs {w}"
                );
            }
        }
    }
}

/// CUDA == CPU on Q8_0 / Q4_0 pages (`--features cuda`, needs a GPU): for every K/V pairing of
/// block and f16 pages, rotated and plain, the same float rows written through both stores'
/// `write` (the device scatter of block bytes) and one page copied, the stored bytes equal, and
/// the GPU kernels (block loaders, rotated queries and outputs) give the CPU kernels' outputs
/// and attention mass. Only cases whose head_dim is whole blocks (64) are drawn into it.
#[cfg(feature = "cuda")]
#[test]
fn cuda_block_pages_match_cpu() {
    use layerkv_kernels::{KvType, KvTypes};
    let dev = Device::new_cuda(0).expect("--features cuda: no CUDA device");
    let (q8, q4, f16) = (KvType::Q8_0, KvType::Q4_0, KvType::F16);
    let e4 = KvType::E4M3;
    let pairs = [(q8, q8), (q4, q4), (q8, q4), (f16, q8), (q4, f16), (e4, e4)];
    let mut ran = 0;
    for seed in 0..140 {
        let c = build_sized(seed, DType::F32, if seed < 120 { 90 } else { 3000 });
        let (n, bs) = (c.store.num_pages(), c.store.block_size());
        let (kvh, d) = (c.store.kv_heads(), c.store.head_dim());
        if d % 32 != 0 {
            continue;
        }
        for (k, v) in pairs {
            for rotate in [true, false] {
                let types = KvTypes::new(k, v).with_rotation(rotate);
                let what = format!("seed {seed} {types}");
                let all: Vec<u32> = (0..(n * bs) as u32).collect();
                let rows = |t: &Tensor, on: &Device| {
                    t.reshape((n * bs, kvh, d)).unwrap().to_device(on).unwrap()
                };
                let mut cpu = KvStore::with_types(n, bs, kvh, d, types, &Device::Cpu).unwrap();
                let mut gpu = KvStore::with_types(n, bs, kvh, d, types, &dev).unwrap();
                let (ck, cv) = (
                    rows(c.store.k(), &Device::Cpu),
                    rows(c.store.v(), &Device::Cpu),
                );
                cpu.write(&all, &ck, &cv).unwrap();
                gpu.write(&all, &rows(c.store.k(), &dev), &rows(c.store.v(), &dev))
                    .unwrap();
                if n > 1 {
                    cpu.copy_page(0, 1).unwrap();
                    gpu.copy_page(0, 1).unwrap();
                }
                for (a, b) in [(cpu.k(), gpu.k()), (cpu.v(), gpu.v())] {
                    let bytes = |t: &Tensor| {
                        let t = t.to_device(&Device::Cpu).unwrap();
                        match t.dtype() {
                            DType::U8 => t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                            _ => values(&t).iter().flat_map(|x| x.to_le_bytes()).collect(),
                        }
                    };
                    assert!(bytes(a) == bytes(b), "{what}: device store ops");
                }
                let s = seqs(&c);
                let total: usize = c.num_slots.iter().sum();
                let (mut m_cpu, mut m_gpu) = (vec![0f32; total], vec![0f32; total]);
                let want = paged_attention(&c.q, &cpu, &s, &c.params, Some(&mut m_cpu)).unwrap();
                let q = c.q.to_device(&dev).unwrap();
                let got = paged_attention(&q, &gpu, &s, &c.params, Some(&mut m_gpu)).unwrap();
                let (got, want) = (values(&got), values(&want));
                let scale = scale_of(&want, &what);
                let diff = max_abs_diff_f32(&got, &want);
                assert!(diff <= 1e-4 * scale, "{what}: CUDA vs CPU {diff}");
                for (i, (g, w)) in m_gpu.iter().zip(&m_cpu).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-3 * w.max(1.0),
                        "{what}: mass[{i}] {g} vs {w}"
                    );
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 100, "only {ran} block-page cases drawn");
}
