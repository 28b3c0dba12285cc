//! [`KvStore`]: the page tensors behind the allocator's page ids. K and V are candle tensors of
//! shape `[num_pages, block_size, kv_heads, head_dim]` (f32, f16 or bf16, CPU or CUDA), so they
//! cross into engines built on candle (mistral.rs) without conversion.
//!
//! Writes are in place (candle in-place ops): `write` scatters n new tokens' K/V rows into their
//! physical slots (`page * block_size + offset`) in O(n x kv_heads x head_dim); `copy_page`
//! copies one page for copy-on-write in O(page); `move_slots` executes the cache's compaction
//! plans (gather, then scatter) and `write_keys` the re-rotation of StreamingLLM sinks. The
//! page tensors never reallocate after `new`.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use layerkv::SlotMove;

use crate::error::{KernelError, Result};

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
}

impl KvStore {
    /// Zeroed pages.
    pub fn new(
        num_pages: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(KernelError::DType {
                what: "KvStore",
                dtype,
            });
        }
        if num_pages == 0 || block_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::Invalid(format!(
                "KvStore sizes must be positive: {num_pages} pages x {block_size} slots x {kv_heads} heads x {head_dim}"
            )));
        }
        let shape = (num_pages, block_size, kv_heads, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            num_pages,
            block_size,
            kv_heads,
            head_dim,
        })
    }

    /// Key pages `[num_pages, block_size, kv_heads, head_dim]`.
    pub fn k(&self) -> &Tensor {
        &self.k
    }

    /// Value pages `[num_pages, block_size, kv_heads, head_dim]`.
    pub fn v(&self) -> &Tensor {
        &self.v
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

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// The device of the pages.
    pub fn device(&self) -> &Device {
        self.k.device()
    }

    /// Bytes of one page (K and V).
    pub fn page_bytes(&self) -> usize {
        2 * self.block_size * self.kv_heads * self.head_dim * self.dtype().size_in_bytes()
    }

    /// Writes `k` and `v` (`[n, kv_heads, head_dim]`, any float dtype) into physical slots
    /// `slots[i] = page * block_size + offset`.
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
        let row = self.kv_heads * self.head_dim;
        let op = ScatterRows {
            dst_rows: slots,
            row,
        };
        for (dst, src) in [(&self.k, k), (&self.v, v)] {
            let src = src.to_dtype(dst.dtype())?.contiguous()?;
            dst.inplace_op2(&src, &op)?;
        }
        Ok(())
    }

    /// Writes only keys (`[n, kv_heads, head_dim]`) into physical slots: re-rotated
    /// StreamingLLM sinks, whose values do not change.
    pub fn write_keys(&mut self, slots: &[u32], k: &Tensor) -> Result<()> {
        let want = [slots.len(), self.kv_heads, self.head_dim];
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
        let op = ScatterRows {
            dst_rows: slots,
            row: self.kv_heads * self.head_dim,
        };
        let src = k.to_dtype(self.k.dtype())?.contiguous()?;
        self.k.inplace_op2(&src, &op)?;
        Ok(())
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
        let k = self.read_rows(&self.k, &src)?;
        let v = self.read_rows(&self.v, &src)?;
        Ok(Some(GatheredMoves { dst, k, v }))
    }

    /// The second half of [`KvStore::move_slots`]: writes the gathered rows to their
    /// destinations (checked when gathered).
    pub fn scatter_moves(&mut self, gathered: GatheredMoves) -> Result<()> {
        self.write(&gathered.dst, &gathered.k, &gathered.v)
    }

    /// The keys at physical `slots`, `[n, kv_heads, head_dim]` in the store's dtype (a copy).
    pub fn read_keys(&self, slots: &[u32]) -> Result<Tensor> {
        self.check_slots("read_keys", slots)?;
        self.read_rows(&self.k, slots)
    }

    /// The values at physical `slots`, `[n, kv_heads, head_dim]` in the store's dtype (a copy).
    pub fn read_values(&self, slots: &[u32]) -> Result<Tensor> {
        self.check_slots("read_values", slots)?;
        self.read_rows(&self.v, slots)
    }

    fn read_rows(&self, t: &Tensor, slots: &[u32]) -> Result<Tensor> {
        let total = self.num_pages * self.block_size;
        let row = self.kv_heads * self.head_dim;
        let idx = Tensor::new(slots, t.device())?;
        Ok(t.reshape((total, row))?.index_select(&idx, 0)?.reshape((
            slots.len(),
            self.kv_heads,
            self.head_dim,
        ))?)
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
        let row = self.block_size * self.kv_heads * self.head_dim;
        let op = CopyRows {
            src: src as usize,
            dst: dst as usize,
            row,
        };
        for t in [&self.k, &self.v] {
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
}
