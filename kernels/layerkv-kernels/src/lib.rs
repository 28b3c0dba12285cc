//! # layerkv-kernels
//!
//! Paged attention over the block tables that `layerkv`'s allocator lays out: one call serves a
//! batch of sequences, each with one query row (decode) or many (prefill, chunked prefill on top
//! of cached context), GQA/MQA, sliding windows, slot-level validity masks (token eviction),
//! diagonal masking for upward cross-layer sharing, and an optional per-slot attention-mass
//! output for score-based retention (H2O, SnapKV).
//!
//! The kernels never see a policy: they read pages, lengths and masks (the allocator's
//! [`layerkv::TableView`]) and the rule ([`AttentionParams`]). [`StepExecutor`] executes the
//! step protocol's plans (page copies, sink re-rotations, compaction moves) on a [`KvStore`].
//! [`reference`](mod@reference) is a naive dense implementation used by the tests. [`quant`]
//! holds the quantized matrix products (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the Q4_K, Q5_K, Q6_K
//! K-quants; AVX2 per-row kernels, an AVX-512 VNNI int8 GEMM for many rows, a portable
//! fallback, picked at run time) that GGUF models run in their own types use where candle has
//! no vectorised path; [`swiglu`] is SwiGLU's elementwise half in one vectorized pass.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use layerkv::TableView;
//! use layerkv_kernels::{paged_attention, AttentionParams, KvStore, SeqQuery};
//!
//! let mut store = KvStore::new(8, 4, 2, 16, DType::F32, &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (6, 2, 16), &Device::Cpu)?;
//! store.write(&[12, 13, 14, 15, 4, 5], &k, &k)?;        // pages 3 and 1
//! let q = Tensor::randn(0f32, 1.0, (1, 4, 16), &Device::Cpu)?;
//! let seq = SeqQuery {
//!     kv: TableView { pages: &[3, 1], num_slots: 6, valid: None },
//!     q_start: 0,
//!     num_q: 1,
//!     first_slot: 5,
//! };
//! let params = AttentionParams { scale: 0.25, window: None, include_diagonal: true };
//! let out = paged_attention(&q, &store, &[seq], &params, None)?;
//! assert_eq!(out.dims(), &[1, 4, 16]);
//! # Ok::<(), layerkv_kernels::KernelError>(())
//! ```

mod cpu;
pub mod cuda;
mod error;
mod exec;
pub mod kvtype;
pub mod reference;
mod store;
mod view;

pub use cpu::quant;
pub use cpu::spin;
pub use cpu::swiglu::{silu_mul, swiglu};
pub use error::{KernelError, Result};
pub use exec::{KeyRotation, StepExecutor};
pub use kvtype::{KvType, KvTypes};
pub use store::{GatheredMoves, KvStore};
pub use view::{AttentionParams, SeqQuery};

/// Paged attention for a batch of sequences.
///
/// `q`: `[total_q, heads, head_dim]` (f32/f16/bf16, on the store's device), `heads` a multiple
/// of the store's `kv_heads`. Row r of sequence s attends, with f32 accumulation, to the valid
/// slots of `s.kv` visible from logical slot `s.first_slot + r` under `params`; a row that sees no
/// slot outputs zeros. Returns `[total_q, heads, head_dim]` in q's dtype.
///
/// `mass`: if given, *adds* to it, per sequence, the attention probability each logical slot
/// received, summed over heads and query rows; its layout is the concatenation of per-sequence
/// segments of `kv.num_slots` entries in `seqs` order. Adding lets every layer that reads a KV
/// group accumulate into one buffer.
pub fn paged_attention(
    q: &candle_core::Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    mass: Option<&mut [f32]>,
) -> Result<candle_core::Tensor> {
    validate(q, store, seqs, mass.as_deref())?;
    if q.device().is_cpu() {
        return cpu::attention(q, store, seqs, params, mass);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::candle::attention(q, store, seqs, params, mass);
    }
    // Other devices (Metal) use the dense reference until a kernel is written for them.
    reference::attention_on_device(q, store, seqs, params, mass, false)
}

/// [`paged_attention`] whose mass is, per slot, the **peak** weight any row and any query head
/// puts on it, max-combined into `peak` (which must hold one entry per slot of every
/// sequence, as `mass` does). KVzip scores a context token by the most attention any query of
/// the context's reconstruction gives it; a sum over rows instead lets tokens every row
/// glances at (the latest ones, by position) outscore the one a row copies from.
///
/// The CPU kernel computes it in the same pass as the output; other devices (CUDA included)
/// run the dense reference for it, correct but slow: it is only used by probe steps.
pub fn paged_attention_peak(
    q: &candle_core::Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
    peak: &mut [f32],
) -> Result<candle_core::Tensor> {
    validate(q, store, seqs, Some(peak))?;
    if q.device().is_cpu() {
        return cpu::attention_peak(q, store, seqs, params, peak);
    }
    reference::attention_on_device(q, store, seqs, params, Some(peak), true)
}

/// Paged attention over per-head lanes (`layerkv::CacheConfig::lanes`: every KV head of a group
/// in its own table), with the queries and the output in the model's layout.
///
/// `q`: `[total_q, heads, head_dim]` as for [`paged_attention`]; `store` holds one-head pages
/// (`kv_heads` 1 under lanes); `seqs` is lane-major: lane `h` of sequence `i` at
/// `seqs[h * n + i]` (`n = seqs.len() / lanes`), each over that lane's table, every lane of a
/// sequence with the same `q_start` and `num_q` (rows of `q`, not of a lane-major copy). Query
/// head `j` reads lane `j / (heads / lanes)`. Returns `[total_q, heads, head_dim]`.
///
/// Decode calls on the CPU (one row per sequence) run one work item per slot range of a
/// sequence over all its lanes, with one softmax and one merge over all its heads (no
/// transposes; the lanes of a sequence share their items' setup and their merge); other calls
/// run [`paged_attention`] over the lanes as sequences of lane-major queries (no mass:
/// [`paged_attention`] with such queries gives it).
pub fn paged_attention_lanes(
    q: &candle_core::Tensor,
    store: &KvStore,
    lanes: usize,
    seqs: &[SeqQuery<'_>],
    params: &AttentionParams,
) -> Result<candle_core::Tensor> {
    let (rows, heads, _) = q.dims3()?;
    if lanes == 0 || !heads.is_multiple_of(lanes) || !seqs.len().is_multiple_of(lanes) {
        return Err(KernelError::Shape {
            what: "q",
            expected: format!(
                "heads a multiple of {lanes} lanes, and {} sequences a multiple of them too",
                seqs.len()
            ),
            actual: q.dims().to_vec(),
        });
    }
    let n = seqs.len() / lanes;
    for (k, s) in seqs.iter().enumerate() {
        let first = &seqs[k % n];
        if (s.q_start, s.num_q) != (first.q_start, first.num_q) {
            return Err(KernelError::Invalid(format!(
                "sequence {} lane {}: rows {}..{}, lane 0 has {}..{} (every lane of a sequence \
                 reads the same query rows)",
                k % n,
                k / n,
                s.q_start,
                s.q_start + s.num_q,
                first.q_start,
                first.q_start + first.num_q
            )));
        }
    }
    validate_lanes(q, store, seqs, None, lanes)?;
    if lanes == 1 {
        return paged_attention(q, store, seqs, params, None);
    }
    if q.device().is_cpu() && seqs.iter().all(|s| s.num_q == 1) {
        return cpu::attention_lanes(q, store, lanes, seqs, params);
    }
    let q_lanes = lane_major(q, lanes)?;
    let lane_seqs: Vec<SeqQuery<'_>> = seqs
        .iter()
        .enumerate()
        .map(|(k, s)| SeqQuery {
            q_start: (k / n) * rows + s.q_start,
            ..*s
        })
        .collect();
    model_major(
        &paged_attention(&q_lanes, store, &lane_seqs, params, None)?,
        lanes,
    )
}

/// `[rows, heads, d]` to lane-major `[lanes x rows, heads / lanes, d]`: lane `h`'s rows at
/// `h * rows ..`, each with its `heads / lanes` query heads (the caller checked the division).
pub(crate) fn lane_major(
    q: &candle_core::Tensor,
    lanes: usize,
) -> candle_core::Result<candle_core::Tensor> {
    let (rows, heads, d) = q.dims3()?;
    q.reshape((rows, lanes, heads / lanes, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((lanes * rows, heads / lanes, d))
}

/// The inverse of [`lane_major`]: `[lanes x rows, per, d]` back to `[rows, lanes x per, d]`.
pub(crate) fn model_major(out: &candle_core::Tensor, lanes: usize) -> Result<candle_core::Tensor> {
    let (lane_rows, per, d) = out.dims3()?;
    let rows = lane_rows / lanes;
    Ok(out
        .reshape((lanes, rows, per, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((rows, lanes * per, d))?)
}

fn validate(
    q: &candle_core::Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    mass: Option<&[f32]>,
) -> Result<()> {
    validate_lanes(q, store, seqs, mass, 1)
}

/// [`validate`] for `q`'s heads split over `lanes` tables (the group bound is per lane).
fn validate_lanes(
    q: &candle_core::Tensor,
    store: &KvStore,
    seqs: &[SeqQuery<'_>],
    mass: Option<&[f32]>,
    lanes: usize,
) -> Result<()> {
    let dims = q.dims();
    let shape_err = |expected: String| KernelError::Shape {
        what: "q",
        expected,
        actual: dims.to_vec(),
    };
    let &[total_q, heads, head_dim] = dims else {
        return Err(shape_err("[total_q, heads, head_dim]".into()));
    };
    if head_dim != store.head_dim() {
        return Err(shape_err(format!(
            "head_dim {} (the store's)",
            store.head_dim()
        )));
    }
    let per_lane = heads / lanes;
    if heads == 0
        || !per_lane.is_multiple_of(store.kv_heads())
        || per_lane / store.kv_heads() > cpu::MAX_GROUP
    {
        let per = if lanes > 1 { " per lane" } else { "" };
        return Err(shape_err(format!(
            "a multiple of kv_heads ({}) heads{per}, at most {} per KV head",
            store.kv_heads(),
            cpu::MAX_GROUP
        )));
    }
    if !matches!(
        q.dtype(),
        candle_core::DType::F32 | candle_core::DType::F16 | candle_core::DType::BF16
    ) {
        return Err(KernelError::DType {
            what: "q",
            dtype: q.dtype(),
        });
    }
    if !q.device().same_device(store.device()) {
        return Err(KernelError::Invalid(
            "q and the store are on different devices".into(),
        ));
    }
    let bs = store.block_size();
    let mut slots = 0;
    for (i, s) in seqs.iter().enumerate() {
        if s.q_start + s.num_q > total_q {
            return Err(KernelError::Invalid(format!(
                "sequence {i}: rows {}..{} exceed q's {total_q} rows",
                s.q_start,
                s.q_start + s.num_q
            )));
        }
        if s.kv.num_slots > s.kv.pages.len() * bs {
            return Err(KernelError::Invalid(format!(
                "sequence {i}: {} slots do not fit in {} pages of {bs}",
                s.kv.num_slots,
                s.kv.pages.len()
            )));
        }
        if let Some(v) = s.kv.valid {
            if v.len() * 64 < s.kv.num_slots {
                return Err(KernelError::Invalid(format!(
                    "sequence {i}: validity mask has {} bits for {} slots",
                    v.len() * 64,
                    s.kv.num_slots
                )));
            }
        }
        // Every page must be in the store (tables hold only live pages), so the kernels need
        // no per-slot page check.
        if let Some(&p) =
            s.kv.pages
                .iter()
                .find(|&&p| p as usize >= store.num_pages())
        {
            return Err(KernelError::Page {
                what: format!("sequence {i}"),
                page: p,
                num_pages: store.num_pages(),
            });
        }
        slots += s.kv.num_slots;
    }
    if let Some(m) = mass {
        if m.len() != slots {
            return Err(KernelError::Invalid(format!(
                "mass buffer has {} entries, the sequences have {slots} slots",
                m.len()
            )));
        }
    }
    Ok(())
}
