//! Host side of a CUDA paged-attention call: flattens a batch's block tables, validity masks
//! and query placement into the flat arrays `paged_attention.cu` reads, and picks the split
//! size so one block's scores fit in shared memory. Pure host code, so it is compiled and
//! tested on every build, GPU or not.

use crate::error::{KernelError, Result};
use crate::view::{AttentionParams, SeqQuery};

/// Ints per sequence in `seq_info` (must match `SEQ_INFO` in `paged_attention.cu`).
pub const SEQ_INFO: usize = 8;
/// Threads per attention block (must match `THREADS` in `paged_attention.cu`).
pub const THREADS: u32 = 128;
/// Largest head dimension the kernel holds in registers (32 lanes x 8).
pub const MAX_HEAD_DIM: usize = 256;
/// Shared memory a block may use without opting in to more (bytes).
const SHARED_LIMIT: usize = 48 * 1024;
/// Logical slots per chunk (the block's shared-memory score buffer) when shared memory allows.
const DEFAULT_PART: usize = 256;
/// Smallest chunk the planner falls back to for wide GQA groups.
const MIN_PART: usize = 32;
/// Attention blocks a call aims for: enough to fill a large GPU several times over. Calls with
/// fewer (query row, KV head) pairs split the context (flash-decoding), so batch-1 decode fills
/// the GPU; calls with more (long prefill) keep one split per row, whose block walks every chunk,
/// so the partial buffers stay the size of the output instead of growing with rows x context.
const TARGET_BLOCKS: usize = 2048;

/// The kernels' scalar arguments (`struct Params` in `paged_attention.cu`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaunchParams {
    /// Query rows in the call.
    pub total_q: i32,
    /// Query heads.
    pub heads: i32,
    /// KV heads.
    pub kv_heads: i32,
    /// Head dimension.
    pub head_dim: i32,
    /// Slots per page.
    pub block_size: i32,
    /// Logical slots per chunk.
    pub part: i32,
    /// Splits along the context.
    pub num_splits: i32,
    /// Chunks per split.
    pub chunks: i32,
    /// Sliding window (-1: none).
    pub window: i32,
    /// 1 if a row sees its own slot.
    pub include_diag: i32,
    /// Softmax scale.
    pub scale: f32,
}

/// Everything a CUDA call uploads, built on the host.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// Scalar arguments.
    pub params: LaunchParams,
    /// Sequence index of each query row (-1: the row belongs to no sequence and outputs 0).
    pub row_seq: Vec<i32>,
    /// `SEQ_INFO` ints per sequence: q_start, num_q, first_slot, num_slots, page offset, validity
    /// word offset (-1: all valid), mass offset, padding.
    pub seq_info: Vec<i32>,
    /// Every sequence's page ids, concatenated (never empty: device buffers need a length; the
    /// same holds for `seq_info`, padded with one unused entry when there are no sequences).
    pub pages: Vec<u32>,
    /// Every sequence's validity words, concatenated (never empty).
    pub valid: Vec<u64>,
    /// Entries of the mass buffer (sum of `num_slots`).
    pub mass_len: usize,
    /// Dynamic shared memory per attention block (bytes).
    pub shared_bytes: u32,
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::Invalid(format!("{what} {v} exceeds i32")))
}

/// Shared memory of one block: scores `[group x part]`, queries `[group x d]`, physical rows
/// `[part]`, max, sum and rescale factor `[group]`.
fn shared_bytes(group: usize, head_dim: usize, part: usize) -> usize {
    4 * (group * part + group * head_dim + part + 3 * group)
}

/// Plans one call; `seqs` are already validated against `q` and the store.
pub fn plan(
    seqs: &[SeqQuery<'_>],
    total_q: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    params: &AttentionParams,
) -> Result<LaunchPlan> {
    if head_dim > MAX_HEAD_DIM {
        return Err(KernelError::Invalid(format!(
            "CUDA kernel: head_dim {head_dim} exceeds {MAX_HEAD_DIM}"
        )));
    }
    let group = heads / kv_heads;
    let mut part = DEFAULT_PART;
    while shared_bytes(group, head_dim, part) > SHARED_LIMIT && part > MIN_PART {
        part /= 2;
    }
    let shared = shared_bytes(group, head_dim, part);
    if shared > SHARED_LIMIT {
        return Err(KernelError::Invalid(format!(
            "CUDA kernel: a GQA group of {group} heads x head_dim {head_dim} needs {shared} bytes \
             of shared memory (limit {SHARED_LIMIT})"
        )));
    }
    let mut row_seq = vec![-1i32; total_q];
    let mut seq_info = Vec::with_capacity(seqs.len() * SEQ_INFO);
    let (mut pages, mut valid) = (Vec::new(), Vec::new());
    let (mut mass_len, mut max_slots) = (0usize, 0usize);
    for (i, s) in seqs.iter().enumerate() {
        for r in &mut row_seq[s.q_start..s.q_start + s.num_q] {
            *r = int("sequence index", i)?;
        }
        let valid_off = match s.kv.valid {
            Some(words) => {
                let off = int("validity words", valid.len())?;
                valid.extend_from_slice(&words[..s.kv.num_slots.div_ceil(64)]);
                off
            }
            None => -1,
        };
        seq_info.extend([
            int("q_start", s.q_start)?,
            int("num_q", s.num_q)?,
            int("first_slot", s.first_slot)?,
            int("num_slots", s.kv.num_slots)?,
            int("page offset", pages.len())?,
            valid_off,
            int("mass offset", mass_len)?,
            0,
        ]);
        pages.extend_from_slice(s.kv.pages);
        mass_len += s.kv.num_slots;
        max_slots = max_slots.max(s.kv.num_slots);
    }
    if pages.is_empty() {
        pages.push(0);
    }
    if seq_info.is_empty() {
        seq_info.extend([0; SEQ_INFO]);
    }
    if valid.is_empty() {
        valid.push(0);
    }
    // The kernels index slots and mass entries with i32; the last split may end up to one
    // split (< max_slots + part) past the longest context.
    int("mass length", mass_len)?;
    int("slots", 2 * max_slots + part)?;
    // A window wider than any position is no window; clamp rather than fail.
    let window = params
        .window
        .map_or(-1, |w| w.min(i32::MAX as usize) as i32);
    let total_chunks = max_slots.div_ceil(part).max(1);
    let chunks = total_chunks.div_ceil(TARGET_BLOCKS.div_ceil((total_q * kv_heads).max(1)));
    // Recounted from `chunks` so that no split starts past the longest context.
    let splits = total_chunks.div_ceil(chunks);
    Ok(LaunchPlan {
        params: LaunchParams {
            total_q: int("total_q", total_q)?,
            heads: int("heads", heads)?,
            kv_heads: int("kv_heads", kv_heads)?,
            head_dim: int("head_dim", head_dim)?,
            block_size: int("block_size", block_size)?,
            part: int("part", part)?,
            num_splits: int("splits", splits)?,
            chunks: int("chunks", chunks)?,
            window,
            include_diag: params.include_diagonal as i32,
            scale: params.scale,
        },
        row_seq,
        seq_info,
        pages,
        valid,
        mass_len,
        shared_bytes: shared as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerkv::TableView;

    #[test]
    fn flattens_sequences_in_order() {
        let (p0, p1) = ([3u32, 1], [0u32, 2, 4]);
        let mask = [0b1011u64];
        let seqs = [
            SeqQuery {
                kv: TableView {
                    pages: &p0,
                    num_slots: 6,
                    valid: None,
                },
                q_start: 0,
                num_q: 1,
                first_slot: 5,
            },
            SeqQuery {
                kv: TableView {
                    pages: &p1,
                    num_slots: 4,
                    valid: Some(&mask),
                },
                q_start: 2,
                num_q: 2,
                first_slot: 2,
            },
        ];
        let params = AttentionParams {
            scale: 0.5,
            window: Some(8),
            include_diagonal: false,
        };
        let p = plan(&seqs, 4, 8, 2, 64, 4, &params).unwrap();
        assert_eq!(p.row_seq, [0, -1, 1, 1]);
        assert_eq!(&p.seq_info[..8], &[0, 1, 5, 6, 0, -1, 0, 0]);
        assert_eq!(&p.seq_info[8..], &[2, 2, 2, 4, 2, 0, 6, 0]);
        assert_eq!(p.pages, [3, 1, 0, 2, 4]);
        assert_eq!(p.valid, [0b1011]);
        assert_eq!(p.mass_len, 10);
        assert_eq!((p.params.window, p.params.include_diag), (8, 0));
        assert_eq!((p.params.part, p.params.num_splits), (256, 1));
    }

    #[test]
    fn long_contexts_split_and_wide_groups_shrink_the_split() {
        let pages: Vec<u32> = (0..64).collect();
        let seq = SeqQuery {
            kv: TableView {
                pages: &pages,
                num_slots: 1000,
                valid: None,
            },
            q_start: 0,
            num_q: 1,
            first_slot: 999,
        };
        let params = AttentionParams {
            scale: 1.0,
            window: None,
            include_diagonal: true,
        };
        let p = plan(&[seq], 1, 32, 8, 128, 16, &params).unwrap();
        assert_eq!((p.params.part, p.params.num_splits), (256, 4));
        assert!(p.shared_bytes as usize <= SHARED_LIMIT);
        let wide = plan(&[seq], 1, 64, 1, 128, 16, &params).unwrap();
        assert!(wide.params.part < 256 && wide.shared_bytes as usize <= SHARED_LIMIT);
        assert_eq!(
            wide.params.num_splits as usize,
            1000usize.div_ceil(wide.params.part as usize)
        );
        assert!(plan(&[seq], 1, 64, 1, 512, 16, &params).is_err());
        let empty = plan(&[], 0, 8, 8, 64, 16, &params).unwrap();
        assert_eq!((empty.pages.len(), empty.seq_info.len()), (1, SEQ_INFO));
    }

    /// Long prefill keeps one split per row (its block walks every chunk), so the partials are
    /// the output's size; a decode batch splits only as far as the GPU needs blocks.
    #[test]
    fn splits_are_capped_by_the_blocks_a_call_needs() {
        let pages: Vec<u32> = (0..2048).collect();
        let params = AttentionParams {
            scale: 1.0,
            window: Some(usize::MAX),
            include_diagonal: true,
        };
        let seq = |q_start, num_q, num_slots| SeqQuery {
            kv: TableView {
                pages: &pages,
                num_slots,
                valid: None,
            },
            q_start,
            num_q,
            first_slot: num_slots - num_q,
        };
        // 8k-token prefill: 4096 rows x 8 KV heads are blocks enough; one split of 32 chunks.
        let p = plan(&[seq(0, 4096, 8192)], 4096, 32, 8, 128, 16, &params).unwrap();
        assert_eq!((p.params.num_splits, p.params.chunks), (1, 32));
        assert_eq!(p.params.window, i32::MAX);
        // 32 sequences decoding at 32k: 256 (row, KV head) pairs, 8 splits of 16 chunks.
        let batch: Vec<SeqQuery<'_>> = (0..32).map(|i| seq(i, 1, 32768)).collect();
        let p = plan(&batch, 32, 32, 8, 128, 16, &params).unwrap();
        assert_eq!((p.params.num_splits, p.params.chunks), (8, 16));
        // Batch-1 decode at 32k: 128 one-chunk splits.
        let p = plan(&[seq(0, 1, 32768)], 1, 32, 8, 128, 16, &params).unwrap();
        assert_eq!((p.params.num_splits, p.params.chunks), (128, 1));
        // Every case covers the context (splits x chunks x part >= slots) and no split starts
        // past it.
        for (s, q) in [
            (8192, 4096),
            (32768, 1),
            (1000, 700),
            (300, 299),
            (5000, 900),
        ] {
            let p = plan(&[seq(0, q, s)], q, 4, 1, 64, 16, &params).unwrap();
            let split = (p.params.chunks * p.params.part) as usize;
            let splits = p.params.num_splits as usize;
            assert!(
                splits * split >= s && (splits - 1) * split < s,
                "{s} slots: {p:?}"
            );
        }
    }
}
