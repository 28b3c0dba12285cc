//! The naive dense reference: gather each sequence's pages into contiguous K/V, then
//! `softmax(mask(q k^T * scale)) v` with candle ops in f32. Slow (it materialises every score
//! and copies the context), obviously correct, device-agnostic: the tests check the paged
//! kernels against it, and devices without a kernel of their own fall back to it.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::store::KvStore;
use crate::view::{AttentionParams, SeqQuery};

/// Dense attention for the same inputs as [`crate::paged_attention`]. Returns the output
/// (`[total_q, heads, head_dim]`, f32) and the per-slot attention mass (concatenated per
/// sequence, summed over heads and rows).
pub fn dense_attention(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
) -> Result<(Tensor, Vec<f32>)> {
    dense(q, store, seqs, params, false)
}

/// [`dense_attention`] whose mass is each slot's peak weight over every row and head
/// ([`crate::paged_attention_peak`]'s contract).
pub fn dense_attention_peak(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
) -> Result<(Tensor, Vec<f32>)> {
    dense(q, store, seqs, params, true)
}

fn dense(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    peak: bool,
) -> Result<(Tensor, Vec<f32>)> {
    let (total_q, heads, d) = q.dims3()?;
    let (bs, kvh) = (store.block_size(), store.kv_heads());
    let group = heads / kvh;
    let dev = q.device();
    // Dequantized for block types: the reference computes with the values the kernels read.
    let flat_k = store.k_f32()?.reshape((store.num_pages() * bs, kvh, d))?;
    let flat_v = store.v_f32()?.reshape((store.num_pages() * bs, kvh, d))?;
    let q = q.to_dtype(DType::F32)?;
    let mut out = Tensor::zeros((total_q, heads, d), DType::F32, dev)?;
    let mut mass = Vec::new();
    for s in seqs {
        let n = s.kv.num_slots;
        let mut seg = vec![0f32; n];
        if n == 0 || s.num_q == 0 {
            mass.extend(seg);
            continue;
        }
        let rows: Vec<u32> = (0..n)
            .map(|l| s.kv.pages[l / bs] * bs as u32 + (l % bs) as u32)
            .collect();
        let idx = Tensor::new(rows.as_slice(), dev)?;
        // [kvh, n, d] -> repeat each KV head for its query heads -> [heads, n, d].
        let k = flat_k.index_select(&idx, 0)?.transpose(0, 1)?;
        let v = flat_v.index_select(&idx, 0)?.transpose(0, 1)?;
        let k = repeat_heads(&k, group)?;
        let v = repeat_heads(&v, group)?;
        let qs = q
            .narrow(0, s.q_start, s.num_q)?
            .transpose(0, 1)?
            .contiguous()?; // [heads, rows, d]
        let scores = (qs.matmul(&k.t()?.contiguous()?)? * f64::from(params.scale))?; // [heads, rows, n]
        let mut mask = vec![0f32; s.num_q * n];
        for r in 0..s.num_q {
            let (lo, hi) = params.visible(s.first_slot + r, n);
            for slot in lo..hi {
                if s.kv.is_valid(slot) {
                    mask[r * n + slot] = 1.0;
                }
            }
        }
        let mask_t =
            Tensor::from_vec(mask.clone(), (1, s.num_q, n), &Device::Cpu)?.to_device(dev)?;
        let neg = Tensor::full(f32::NEG_INFINITY, scores.shape(), dev)?;
        let masked = mask_t
            .broadcast_as(scores.shape())?
            .ne(0f32)?
            .where_cond(&scores, &neg)?;
        let max = masked.max_keepdim(D::Minus1)?;
        // Rows that see nothing: keep them finite, zero them below.
        let max = max.clamp(-1e30f32, f32::INFINITY)?;
        let e = masked.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let probs = e.broadcast_div(&sum.clamp(1e-30f32, f32::INFINITY)?)?;
        let o = probs.matmul(&v.contiguous()?)?.transpose(0, 1)?; // [rows, heads, d]
        out = out.slice_assign(
            &[s.q_start..s.q_start + s.num_q, 0..heads, 0..d],
            &o.contiguous()?,
        )?;
        let m = if peak {
            probs.max(0)?.max(0)?
        } else {
            probs.sum(0)?.sum(0)?
        };
        let m = m.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        for (a, b) in seg.iter_mut().zip(m) {
            *a += b;
        }
        mass.extend(seg);
    }
    Ok((out, mass))
}

fn repeat_heads(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.contiguous()?);
    }
    let (kvh, n, d) = x.dims3()?;
    Ok(x.unsqueeze(1)?
        .broadcast_as((kvh, group, n, d))?
        .reshape((kvh * group, n, d))?)
}

/// [`dense_attention`] with the [`crate::paged_attention`] calling convention (mass added into
/// a caller buffer, output in q's dtype).
pub(crate) fn attention_on_device(
    q: &Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
    peak: bool,
) -> Result<Tensor> {
    let (out, m) = dense(q, store, seqs, params, peak)?;
    if let Some(buf) = mass {
        for (a, b) in buf.iter_mut().zip(m) {
            *a = if peak { a.max(b) } else { *a + b };
        }
    }
    Ok(out.to_dtype(q.dtype())?)
}
