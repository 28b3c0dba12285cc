//! [`KvStore`]: the page tensors behind the allocator's page ids. K and V are candle tensors of
//! shape `[num_pages, block_size, kv_heads, head_dim]` (f32, f16 or bf16, CPU or CUDA), so they
//! cross into engines built on candle (mistral.rs) without conversion; or, for the block types
//! of [`KvType`] (Q8_0, Q4_0; CPU), `U8` tensors `[num_pages, block_size, kv_heads, row_bytes]`.
//! K and V may differ in type. Writes quantize; nothing else does: moves and copies move bytes.
//!
//! Writes are in place (candle in-place ops): `write` scatters n new tokens' K/V rows into their
//! physical slots (`page * block_size + offset`) in O(n x kv_heads x head_dim); `copy_page`
//! copies one page for copy-on-write in O(page); `move_slots` executes the cache's compaction
//! plans (gather, then scatter) and `write_keys` the re-rotation of StreamingLLM sinks. The
//! page tensors never reallocate after `new`.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use layerkv::SlotMove;

use crate::error::{KernelError, Result};
use crate::kvtype::{
    dequantize_rows, hadamard, hadamard_matrix, hadamard_size, quantize_rows, KvType, KvTypes,
};

/// K and V pages of every KV group of every sequence.
///
/// `Clone` is shallow, like candle's `Tensor`: a clone shares the pages, and writes through one
/// are seen through the other (an engine hands clones to its layers).
#[derive(Debug, Clone)]
pub struct KvStore {
    k: Tensor,
    v: Tensor,
    num_pages: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    types: KvTypes,
    /// The Walsh-Hadamard matrix (`[head_dim, head_dim]` f32) where block rows are stored
    /// rotated on a CUDA device, whose kernels get rotated queries and give rotated outputs;
    /// the CPU kernels rotate in place, and other devices run the dense reference on
    /// dequantized rows, so they keep none.
    rot: Option<Tensor>,
}

impl KvStore {
    /// Zeroed float pages of `dtype` (f32, f16 or bf16) for K and V.
    pub fn new(
        num_pages: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t = KvType::from_dtype(dtype).ok_or(KernelError::DType {
            what: "KvStore",
            dtype,
        })?;
        Self::with_types(
            num_pages,
            block_size,
            kv_heads,
            head_dim,
            KvTypes::both(t),
            device,
        )
    }

    /// Zeroed pages of the given K and V types. Block types need a `head_dim` that is a
    /// multiple of 32.
    pub fn with_types(
        num_pages: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        types: KvTypes,
        device: &Device,
    ) -> Result<Self> {
        if num_pages == 0 || block_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::Invalid(format!(
                "KvStore sizes must be positive: {num_pages} pages x {block_size} slots x {kv_heads} heads x {head_dim}"
            )));
        }
        for t in [types.k, types.v] {
            t.check_head_dim(head_dim)?;
        }
        let rotates = types.rotates_k() || types.rotates_v();
        let rot = if rotates && device.is_cuda() {
            let h = hadamard_matrix(head_dim);
            Some(Tensor::from_vec(h, (head_dim, head_dim), device)?)
        } else {
            None
        };
        let pages = |t: KvType| {
            let shape = (num_pages, block_size, kv_heads, t.row_units(head_dim));
            Tensor::zeros(shape, t.storage_dtype(), device)
        };
        Ok(Self {
            k: pages(types.k)?,
            v: pages(types.v)?,
            num_pages,
            block_size,
            kv_heads,
            head_dim,
            types,
            rot,
        })
    }

    /// The rotation matrix the CUDA kernels' queries and outputs are rotated by (`None` on other
    /// devices, or where no rows are stored rotated): `x` rotated is `x` times it.
    pub fn rotation(&self) -> Option<&Tensor> {
        self.rot.as_ref()
    }

    /// Key pages `[num_pages, block_size, kv_heads, head_dim]` (floats), or
    /// `[num_pages, block_size, kv_heads, row_bytes]` (`U8`, block types).
    pub fn k(&self) -> &Tensor {
        &self.k
    }

    /// Value pages, shaped as [`KvStore::k`].
    pub fn v(&self) -> &Tensor {
        &self.v
    }

    /// Key pages as f32 values `[num_pages, block_size, kv_heads, head_dim]` (for block types a
    /// dequantized copy, rotated back where rows are stored rotated): the values the kernels'
    /// attention amounts to, for references and tests.
    pub fn k_f32(&self) -> Result<Tensor> {
        self.values_f32(&self.k, self.types.k)
    }

    /// Value pages as f32 values; see [`KvStore::k_f32`].
    pub fn v_f32(&self) -> Result<Tensor> {
        self.values_f32(&self.v, self.types.v)
    }

    fn values_f32(&self, t: &Tensor, ty: KvType) -> Result<Tensor> {
        if !ty.is_quantized() {
            return Ok(t.to_dtype(DType::F32)?);
        }
        let bytes = t.flatten_all()?.to_vec1::<u8>()?;
        let rows = self.num_pages * self.block_size * self.kv_heads;
        let mut out = vec![0f32; rows * self.head_dim];
        dequantize_rows(ty, &bytes, self.head_dim, &mut out);
        if self.types.rotate && ty.rotates() {
            hadamard(&mut out, hadamard_size(self.head_dim));
        }
        Ok(Tensor::from_vec(
            out,
            (
                self.num_pages,
                self.block_size,
                self.kv_heads,
                self.head_dim,
            ),
            t.device(),
        )?)
    }

    /// The K and V page types.
    pub fn types(&self) -> KvTypes {
        self.types
    }

    /// Pages in the store.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Token slots per page.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Storage dtype of the key pages (`U8` for block types; see [`KvStore::types`]).
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// The device of the pages.
    pub fn device(&self) -> &Device {
        self.k.device()
    }

    /// Bytes of one page (K and V, block scales included).
    pub fn page_bytes(&self) -> usize {
        self.block_size * self.kv_heads * self.types.token_head_bytes(self.head_dim)
    }

    /// Writes `k` and `v` (`[n, kv_heads, head_dim]`, any float dtype) into physical slots
    /// `slots[i] = page * block_size + offset`, quantizing rows for block types.
    pub fn write(&mut self, slots: &[u32], k: &Tensor, v: &Tensor) -> Result<()> {
        let want = [slots.len(), self.kv_heads, self.head_dim];
        for (what, t) in [("k", k), ("v", v)] {
            if t.dims() != want {
                return Err(KernelError::Shape {
                    what,
                    expected: format!("{want:?} (slots, kv_heads, head_dim)"),
                    actual: t.dims().to_vec(),
                });
            }
        }
        let limit = self.num_pages * self.block_size;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= limit) {
            return Err(KernelError::Page {
                what: format!("write slot {bad}"),
                page: bad / self.block_size as u32,
                num_pages: self.num_pages,
            });
        }
        if slots.is_empty() {
            return Ok(());
        }
        let (k, v) = (self.encode(k, self.types.k)?, self.encode(v, self.types.v)?);
        self.scatter_raw(slots, Some(&k), Some(&v))
    }

    /// `x` (`[n, kv_heads, head_dim]` floats) as stored rows of type `t`: the store's float
    /// dtype, or quantized blocks (Q8_0 and Q4_0 of the rotated rows, unless the store's types
    /// say `:plain`; e4m3 of the rows as they are).
    fn encode(&self, x: &Tensor, t: KvType) -> Result<Tensor> {
        if !t.is_quantized() {
            return Ok(x.to_dtype(t.storage_dtype())?.contiguous()?);
        }
        let n = x.dim(0)?;
        let mut values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if self.types.rotate && t.rotates() {
            hadamard(&mut values, hadamard_size(self.head_dim));
        }
        let rb = t.row_bytes(self.head_dim);
        let mut bytes = vec![0u8; n * self.kv_heads * rb];
        quantize_rows(t, &values, self.head_dim, &mut bytes);
        Ok(Tensor::from_vec(bytes, (n, self.kv_heads, rb), x.device())?)
    }

    /// Writes stored rows (already in each tensor's storage type) into physical slots,
    /// checked by the caller.
    fn scatter_raw(&mut self, slots: &[u32], k: Option<&Tensor>, v: Option<&Tensor>) -> Result<()> {
        let rows = [(&self.k, k, self.types.k), (&self.v, v, self.types.v)];
        for (dst, src, t) in rows {
            if let Some(src) = src {
                let op = ScatterRows {
                    dst_rows: slots,
                    row: self.kv_heads * t.row_units(self.head_dim),
                };
                dst.inplace_op2(&src.contiguous()?, &op)?;
            }
        }
        Ok(())
    }

    /// Writes only keys into physical slots: re-rotated StreamingLLM sinks, whose values do
    /// not change. `k` is `[n, kv_heads, head_dim]` floats (quantized here, for block types,
    /// once: the caller rotates the sink's pre-RoPE key, never a stored one), or stored rows as
    /// [`KvStore::read_keys`] returns them (written back as they are: a rollback).
    pub fn write_keys(&mut self, slots: &[u32], k: &Tensor) -> Result<()> {
        let raw = self.types.k.is_quantized() && k.dtype() == DType::U8;
        let last = if raw {
            self.types.k.row_units(self.head_dim)
        } else {
            self.head_dim
        };
        let want = [slots.len(), self.kv_heads, last];
        if k.dims() != want {
            return Err(KernelError::Shape {
                what: "k",
                expected: format!("{want:?} (slots, kv_heads, head_dim)"),
                actual: k.dims().to_vec(),
            });
        }
        self.check_slots("write_keys", slots)?;
        if slots.is_empty() {
            return Ok(());
        }
        let k = if raw {
            k.clone()
        } else {
            self.encode(k, self.types.k)?
        };
        self.scatter_raw(slots, Some(&k), None)
    }

    /// Executes a compaction plan ([`layerkv::Step::moves`]): K and V rows move from physical
    /// slot `src` to `dst` of each move. All sources are gathered before any destination is
    /// written, so the plan's sources and destinations may overlap. O(moves x kv_heads x
    /// head_dim), on any device.
    pub fn move_slots(&mut self, moves: &[SlotMove]) -> Result<()> {
        match self.gather_moves(moves)? {
            Some(g) => self.scatter_moves(g),
            None => Ok(()),
        }
    }

    /// The first half of [`KvStore::move_slots`]: checks the plan and copies every source row
    /// out, writing nothing (`None` for an empty plan). A failure here leaves the store as it
    /// was, which is what lets a step abort after its retain.
    pub fn gather_moves(&self, moves: &[SlotMove]) -> Result<Option<GatheredMoves>> {
        if moves.is_empty() {
            return Ok(None);
        }
        let src: Vec<u32> = moves.iter().map(|m| m.src).collect();
        let dst: Vec<u32> = moves.iter().map(|m| m.dst).collect();
        self.check_slots("move_slots source", &src)?;
        self.check_slots("move_slots destination", &dst)?;
        let k = self.read_rows(&self.k, self.types.k, &src)?;
        let v = self.read_rows(&self.v, self.types.v, &src)?;
        Ok(Some(GatheredMoves { dst, k, v }))
    }

    /// The second half of [`KvStore::move_slots`]: writes the gathered rows to their
    /// destinations (checked when gathered), as stored: a move never requantizes.
    pub fn scatter_moves(&mut self, gathered: GatheredMoves) -> Result<()> {
        self.scatter_raw(&gathered.dst, Some(&gathered.k), Some(&gathered.v))
    }

    /// The keys at physical `slots` as stored (a copy): `[n, kv_heads, head_dim]` in the
    /// store's float dtype, or `[n, kv_heads, row_bytes]` blocks (`U8`).
    pub fn read_keys(&self, slots: &[u32]) -> Result<Tensor> {
        self.check_slots("read_keys", slots)?;
        self.read_rows(&self.k, self.types.k, slots)
    }

    /// The values at physical `slots` as stored (a copy); see [`KvStore::read_keys`].
    pub fn read_values(&self, slots: &[u32]) -> Result<Tensor> {
        self.check_slots("read_values", slots)?;
        self.read_rows(&self.v, self.types.v, slots)
    }

    fn read_rows(&self, t: &Tensor, ty: KvType, slots: &[u32]) -> Result<Tensor> {
        let total = self.num_pages * self.block_size;
        let units = ty.row_units(self.head_dim);
        let idx = Tensor::new(slots, t.device())?;
        Ok(t.reshape((total, self.kv_heads * units))?
            .index_select(&idx, 0)?
            .reshape((slots.len(), self.kv_heads, units))?)
    }

    fn check_slots(&self, what: &str, slots: &[u32]) -> Result<()> {
        let limit = self.num_pages * self.block_size;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= limit) {
            return Err(KernelError::Page {
                what: format!("{what} slot {bad}"),
                page: bad / self.block_size as u32,
                num_pages: self.num_pages,
            });
        }
        Ok(())
    }

    /// Copies page `src` onto page `dst` (copy-on-write after a fork).
    pub fn copy_page(&mut self, src: u32, dst: u32) -> Result<()> {
        for (what, p) in [("copy_page src", src), ("copy_page dst", dst)] {
            if p as usize >= self.num_pages {
                return Err(KernelError::Page {
                    what: what.into(),
                    page: p,
                    num_pages: self.num_pages,
                });
            }
        }
        for (t, ty) in [(&self.k, self.types.k), (&self.v, self.types.v)] {
            let op = CopyRows {
                src: src as usize,
                dst: dst as usize,
                row: self.block_size * self.kv_heads * ty.row_units(self.head_dim),
            };
            t.inplace_op1(&op)?;
        }
        Ok(())
    }
}

/// K/V rows a compaction plan gathered and has not written yet ([`KvStore::gather_moves`]).
#[derive(Debug)]
pub struct GatheredMoves {
    dst: Vec<u32>,
    k: Tensor,
    v: Tensor,
}

/// Scatters contiguous source rows into destination rows of a contiguous tensor.
struct ScatterRows<'a> {
    dst_rows: &'a [u32],
    row: usize,
}

fn scatter<T: Copy>(dst: &mut [T], off: usize, src: &[T], rows: &[u32], row: usize) {
    for (i, &r) in rows.iter().enumerate() {
        let d = off + r as usize * row;
        dst[d..d + row].copy_from_slice(&src[i * row..(i + 1) * row]);
    }
}

impl InplaceOp2 for ScatterRows<'_> {
    fn name(&self) -> &'static str {
        "layerkv-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((o1, _)), Some((o2, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("scatter-rows needs contiguous tensors");
        };
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                scatter(d, o1, &s[o2..], self.dst_rows, self.row)
            }
            (CpuStorage::F16(d), CpuStorage::F16(s)) => {
                scatter(d, o1, &s[o2..], self.dst_rows, self.row)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => {
                scatter(d, o1, &s[o2..], self.dst_rows, self.row)
            }
            (CpuStorage::U8(d), CpuStorage::U8(s)) => {
                scatter(d, o1, &s[o2..], self.dst_rows, self.row)
            }
            _ => candle_core::bail!("scatter-rows: dtype mismatch"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::candle::scatter_rows(s1, l1, s2, l2, self.dst_rows, self.row)
    }
}

/// Copies one block of `row` elements onto another inside a contiguous tensor.
struct CopyRows {
    src: usize,
    dst: usize,
    row: usize,
}

impl candle_core::InplaceOp1 for CopyRows {
    fn name(&self) -> &'static str {
        "layerkv-copy-page"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((o, _)) = l.contiguous_offsets() else {
            candle_core::bail!("copy-page needs a contiguous tensor");
        };
        let (a, b, n) = (o + self.src * self.row, o + self.dst * self.row, self.row);
        match s {
            CpuStorage::F32(v) => v.copy_within(a..a + n, b),
            CpuStorage::F16(v) => v.copy_within(a..a + n, b),
            CpuStorage::BF16(v) => v.copy_within(a..a + n, b),
            CpuStorage::U8(v) => v.copy_within(a..a + n, b),
            _ => candle_core::bail!("copy-page: unsupported dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        crate::cuda::candle::copy_rows(s, l, self.src, self.dst, self.row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &Tensor) -> Vec<f32> {
        t.reshape((8, 2))
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn moves_gather_before_they_scatter() {
        let mut store = KvStore::new(4, 2, 1, 2, DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::from_vec(
            (0..16).map(|x| (x / 2) as f32).collect(),
            (8, 1, 2),
            &Device::Cpu,
        )
        .unwrap();
        let v = (&k * 10.0).unwrap();
        store.write(&[0, 1, 2, 3, 4, 5, 6, 7], &k, &v).unwrap();
        // Slot 2 is read and written by the same plan.
        let mv = |src, dst| SlotMove { src, dst };
        store.move_slots(&[mv(2, 1), mv(3, 2), mv(5, 3)]).unwrap();
        assert_eq!(rows(store.k()), vec![0., 2., 3., 5., 4., 5., 6., 7.]);
        assert_eq!(rows(store.v()), vec![0., 20., 30., 50., 40., 50., 60., 70.]);
        let sink = Tensor::full(9f32, (1, 1, 2), &Device::Cpu).unwrap();
        store.write_keys(&[7], &sink).unwrap();
        assert_eq!(rows(store.k())[7], 9.0);
        assert_eq!(rows(store.v())[7], 70.0);
        assert!(store.move_slots(&[mv(1, 8)]).is_err());
        assert!(store.move_slots(&[mv(8, 1)]).is_err());
    }

    /// `kvtype::round_trip`, which dense references attend to, is what the store gives back
    /// from `k_f32`/`v_f32` for every type, rotated or not, K and V apart.
    #[test]
    fn round_trip_is_what_the_store_holds() {
        use crate::kvtype::round_trip;
        let dev = Device::Cpu;
        let (q8, q4, f16) = (KvType::Q8_0, KvType::Q4_0, KvType::F16);
        let e4 = KvType::E4M3;
        let pairs = [
            (q8, q4),
            (q4, f16),
            (KvType::BF16, KvType::BF16),
            (q8, q8),
            (e4, e4),
        ];
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 2000) as f32 / 500.0 - 2.0
        };
        for (k, v) in pairs {
            for rotate in [true, false] {
                let types = KvTypes::new(k, v).with_rotation(rotate);
                let mut store = KvStore::with_types(2, 2, 2, 64, types, &dev).unwrap();
                let kx: Vec<f32> = (0..4 * 2 * 64).map(|_| next()).collect();
                let vx: Vec<f32> = (0..4 * 2 * 64).map(|_| next()).collect();
                let t = |x: &[f32]| Tensor::from_vec(x.to_vec(), (4, 2, 64), &dev).unwrap();
                store.write(&[0, 1, 2, 3], &t(&kx), &t(&vx)).unwrap();
                for (want, got, is_k) in [(kx, store.k_f32(), true), (vx, store.v_f32(), false)] {
                    let mut want = want;
                    round_trip(types, is_k, 64, &mut want);
                    let got = got
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert!(want == got, "{types} ({}): K {is_k}", usize::from(rotate));
                }
            }
        }
    }

    /// Block pages: a write rounds once; moves, copy-on-write copies and a rollback of
    /// re-rotated keys move the stored bytes exactly; a re-rotation quantizes the fresh key.
    #[test]
    fn quantized_rows_move_as_bytes() {
        let dev = Device::Cpu;
        for t in [KvType::Q8_0, KvType::Q4_0, KvType::E4M3] {
            let types = KvTypes::both(t);
            let mut store = KvStore::with_types(4, 2, 2, 64, types, &dev).unwrap();
            assert_eq!(store.page_bytes(), 2 * 2 * 2 * t.row_bytes(64));
            let k = Tensor::randn(0f32, 1.0, (8, 2, 64), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (8, 2, 64), &dev).unwrap();
            store.write(&[0, 1, 2, 3, 4, 5, 6, 7], &k, &v).unwrap();
            let bytes = |s: &KvStore, slots: &[u32]| {
                let k = s.read_keys(slots).unwrap().flatten_all().unwrap();
                let v = s.read_values(slots).unwrap().flatten_all().unwrap();
                (k.to_vec1::<u8>().unwrap(), v.to_vec1::<u8>().unwrap())
            };
            let before = bytes(&store, &[2, 3, 5]);
            let mv = |src, dst| SlotMove { src, dst };
            store.move_slots(&[mv(2, 1), mv(3, 2), mv(5, 3)]).unwrap();
            assert_eq!(bytes(&store, &[1, 2, 3]), before);
            let page2 = bytes(&store, &[2, 3]);
            store.copy_page(1, 3).unwrap();
            assert_eq!(bytes(&store, &[6, 7]), page2);
            // A re-rotated key is quantized from floats; the old rows go back as bytes.
            let old = store.read_keys(&[7]).unwrap();
            let fresh = Tensor::randn(0f32, 1.0, (1, 2, 64), &dev).unwrap();
            store.write_keys(&[7], &fresh).unwrap();
            let mut want = KvStore::with_types(4, 2, 2, 64, types, &dev).unwrap();
            want.write(&[7], &fresh, &fresh).unwrap();
            assert_eq!(bytes(&store, &[7]).0, bytes(&want, &[7]).0);
            assert_ne!(
                bytes(&store, &[7]).0,
                old.flatten_all().unwrap().to_vec1::<u8>().unwrap()
            );
            store.write_keys(&[7], &old).unwrap();
            assert_eq!(bytes(&store, &[6, 7]), page2);
            // The dequantized pages are close to what was written, not equal.
            let got = store.v_f32().unwrap().reshape((8, 2, 64)).unwrap();
            let diff = layerkv_testkit::max_abs_diff(
                &got.narrow(0, 0, 1).unwrap(),
                &v.narrow(0, 0, 1).unwrap(),
            );
            assert!(
                diff > 0.0 && diff < if t == KvType::Q4_0 { 0.6 } else { 0.25 },
                "{t}: {diff}"
            );
        }
        let err = KvStore::with_types(4, 2, 2, 48, KvTypes::both(KvType::Q8_0), &dev).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
    }
}
