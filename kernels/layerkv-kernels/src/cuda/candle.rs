//! Glue from candle's CUDA storage to the launches: views of candle's own buffers go to the
//! kernels and the output comes back as a candle tensor, so nothing is copied on the way.

use std::sync::Mutex;

use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor,
};

use super::launch;
use super::plan::{self, LaunchPlan};
use crate::error::{KernelError, Result};
use crate::store::KvStore;
use crate::view::{AttentionParams, SeqQuery};

fn candle_err(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Paged attention on a CUDA device; see [`crate::paged_attention`] for the contract.
pub(crate) fn attention(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
) -> Result<Tensor> {
    let (total_q, heads, d) = q.dims3()?;
    if total_q == 0 {
        return Ok(Tensor::zeros((0, heads, d), q.dtype(), q.device())?);
    }
    let plan = plan::plan(
        seqs,
        total_q,
        heads,
        store.kv_heads(),
        d,
        store.block_size(),
        params,
    )?;
    // Block rows stored rotated: q.k = (Hq).(Hk), and the output of rotated values is rotated
    // back (H is its own inverse).
    let types = store.types();
    let mut q32 = q.to_dtype(DType::F32)?.contiguous()?;
    if types.rotates_k() {
        q32 = rotate(&q32, store)?;
    }
    let op = AttentionOp {
        store,
        plan,
        mass: mass.as_ref().map(|m| Mutex::new(vec![0f32; m.len()])),
    };
    let mut out = q32.apply_op1_no_bwd(&op)?;
    if types.rotates_v() {
        out = rotate(&out, store)?;
    }
    if let (Some(mass), Some(acc)) = (mass, op.mass) {
        let acc = acc.into_inner().unwrap_or_else(|p| p.into_inner());
        for (m, a) in mass.iter_mut().zip(&acc) {
            *m += a;
        }
    }
    Ok(out.to_dtype(q.dtype())?)
}

/// `x` (`[rows, heads, head_dim]` f32) with every head's row times the store's Walsh-Hadamard
/// matrix.
fn rotate(x: &Tensor, store: &KvStore) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = store.head_dim();
    let h = store
        .rotation()
        .ok_or_else(|| KernelError::Invalid("the store keeps no rotation matrix".into()))?;
    Ok(x.reshape((x.elem_count() / d, d))?
        .matmul(h)?
        .reshape(dims)?)
}

/// The attention call as a candle op on the (f32, contiguous) queries.
struct AttentionOp<'a> {
    store: &'a KvStore,
    plan: LaunchPlan,
    mass: Option<Mutex<Vec<f32>>>,
}

impl CustomOp1 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "layerkv-paged-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("layerkv-paged-attention: the CUDA op was given CPU queries")
    }

    fn cuda_fwd(&self, q: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.device.clone();
        let stream = dev.cuda_stream();
        let Some((q0, q1)) = l.contiguous_offsets() else {
            bail!("layerkv-paged-attention: queries must be contiguous")
        };
        let qv = q.as_cuda_slice::<f32>()?.slice(q0..q1);
        let (ks, kl) = self.store.k().storage_and_layout();
        let (vs, vl) = self.store.v().storage_and_layout();
        let (Storage::Cuda(ks), Storage::Cuda(vs)) = (&*ks, &*vs) else {
            bail!("layerkv-paged-attention: the KvStore is not on a CUDA device")
        };
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let mut mass = self
            .mass
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        let mass = mass.as_deref_mut().map(|m| m.as_mut_slice());
        let plan = &self.plan;
        let types = self.store.types();
        let out = {
            use CudaStorageSlice::{BF16, F16, F32, U8};
            macro_rules! launch {
                ($k:expr, $v:expr) => {
                    launch::attention(
                        &stream,
                        types,
                        &qv,
                        &$k.slice(ko..),
                        &$v.slice(vo..),
                        plan,
                        mass,
                    )
                };
            }
            match (&ks.slice, &vs.slice) {
                (F32(k), F32(v)) => launch!(k, v),
                (F16(k), F16(v)) => launch!(k, v),
                (BF16(k), BF16(v)) => launch!(k, v),
                (F16(k), U8(v)) => launch!(k, v),
                (U8(k), F16(v)) => launch!(k, v),
                (U8(k), U8(v)) => launch!(k, v),
                _ => bail!(
                    "layerkv-paged-attention: no CUDA kernel reads K pages {} with V pages {}",
                    types.k,
                    types.v
                ),
            }
        }
        .map_err(candle_err)?;
        let p = plan.params;
        let shape = Shape::from((p.total_q as usize, p.heads as usize, p.head_dim as usize));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// `KvStore::write` on CUDA storage (both tensors contiguous, same dtype).
pub(crate) fn scatter_rows(
    dst: &mut CudaStorage,
    dst_layout: &Layout,
    src: &CudaStorage,
    src_layout: &Layout,
    rows: &[u32],
    row: usize,
) -> candle_core::Result<()> {
    let (Some((d0, _)), Some((s0, s1))) = (
        dst_layout.contiguous_offsets(),
        src_layout.contiguous_offsets(),
    ) else {
        bail!("layerkv-scatter-rows needs contiguous tensors")
    };
    let stream = dst.device.cuda_stream();
    use CudaStorageSlice::{BF16, F16, F32, U8};
    match (&mut dst.slice, &src.slice) {
        (F32(d), F32(s)) => {
            launch::scatter_rows(&stream, &mut d.slice_mut(d0..), &s.slice(s0..s1), rows, row)
        }
        (F16(d), F16(s)) => {
            launch::scatter_rows(&stream, &mut d.slice_mut(d0..), &s.slice(s0..s1), rows, row)
        }
        (BF16(d), BF16(s)) => {
            launch::scatter_rows(&stream, &mut d.slice_mut(d0..), &s.slice(s0..s1), rows, row)
        }
        (U8(d), U8(s)) => {
            launch::scatter_rows(&stream, &mut d.slice_mut(d0..), &s.slice(s0..s1), rows, row)
        }
        _ => bail!("layerkv-scatter-rows: dtype mismatch"),
    }
    .map_err(candle_err)
}

/// `KvStore::copy_page` on CUDA storage: block `src` of `row` storage units onto block `dst`.
pub(crate) fn copy_rows(
    buf: &mut CudaStorage,
    layout: &Layout,
    src: usize,
    dst: usize,
    row: usize,
) -> candle_core::Result<()> {
    let Some((o, _)) = layout.contiguous_offsets() else {
        bail!("layerkv-copy-page needs a contiguous tensor")
    };
    let stream = buf.device.cuda_stream();
    let (a, b) = (src * row, dst * row);
    use CudaStorageSlice::{BF16, F16, F32, U8};
    match &mut buf.slice {
        F32(s) => launch::copy_within(&stream, &mut s.slice_mut(o..), a, b, row),
        F16(s) => launch::copy_within(&stream, &mut s.slice_mut(o..), a, b, row),
        BF16(s) => launch::copy_within(&stream, &mut s.slice_mut(o..), a, b, row),
        U8(s) => launch::copy_within(&stream, &mut s.slice_mut(o..), a, b, row),
        _ => bail!("layerkv-copy-page: unsupported dtype"),
    }
    .map_err(candle_err)
}
