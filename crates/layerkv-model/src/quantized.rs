//! GGUF models run in their own tensor types: [`load_gguf`] reads a llama, mistral or qwen2
//! GGUF straight into a [`Model`] whose linear layers are [`QuantizedLinear`]s over candle
//! [`QTensor`]s of the file's types (Q4_0, Q4_1, Q8_0, K-quants, ...), with no f32 copy of the
//! weights.
//!
//! What stays quantized and what does not:
//! - every projection and the LM head: matmuls run on the quantized blocks with the activations
//!   quantized to the type's dot-product blocks (Q8_1/Q8K), as llama.cpp does: Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K on the CPU through
//!   [`layerkv_kernels::quant::matmul`] (AVX2, or AVX-512 VNNI's int8 GEMM from 8 rows,
//!   picked at run time; candle's dot products are scalar unless built with AVX enabled), every
//!   other type (Q2_K, Q3_K, Q8_K, F16, ...) and every type on CUDA through candle's
//!   [`QMatMul`]; on a CPU without the int8 GEMM, from [`DENSE_FROM_ROWS`] rows (prefill) the
//!   kernels' types dequantize their weight in chunks and run candle's f32 matmul instead, as
//!   llama.cpp's BLAS backend does, so prefill keeps the f32 path's speed;
//! - the token embedding ([`QuantizedEmbedding`]): only the looked-up rows are dequantized
//!   (llama.cpp's `get_rows`); a tied model's LM head is the same quantized matrix;
//! - norm weights and biases: f32 (a few KiB per layer).
//!
//! Header, config, tokenizer and the name mapping are [`crate::convert`]'s, so the quantized
//! path accepts and refuses exactly the files the converter does. Llama-arch Q/K rows are
//! un-permuted by moving whole rows' bytes (a row is a run of whole blocks). Resident memory is
//! about the file's size; loading reads each tensor once.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use layerkv_kernels::quant;

use crate::config::ModelConfig;
use crate::convert::{
    apply_rope_freqs, corrupt, hf_name, plan, read_header, tensor_bytes, unpermute_qk, GgufSummary,
    Plan,
};
use crate::error::{candle_message, io, ModelError, Result};
use crate::linear::Projection;
use crate::model::{Layer, Model};

/// A linear layer over a quantized weight `[out, in]` (plus an optional f32 bias `[out]`).
///
/// Activations go in and come out in the caller's dtype; the product runs in f32 over the
/// quantized blocks.
#[derive(Debug)]
pub struct QuantizedLinear {
    weight: Arc<QTensor>,
    matmul: QMatMul,
    bias: Option<Tensor>,
    dense_from_rows: Option<usize>,
}

/// Rows from which a product of the kernels' types on a CPU without the int8 GEMM
/// ([`quant::has_int8_gemm`]) dequantizes its weight into f32 chunks and runs candle's f32
/// matmul (prefill): the dequantization is paid once for all rows, and the f32 matmul uses the
/// widest units the CPU has (llama.cpp's BLAS backend does the same from 32 rows).
pub const DENSE_FROM_ROWS: usize = 32;

/// Most f32 values a dense product dequantizes at a time (16 MiB): a large LM head goes in
/// chunks of its rows, so the scratch stays small.
const DENSE_CHUNK_VALUES: usize = 1 << 22;

/// How [`load_gguf_with`] builds the quantized layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedOptions {
    /// Rows from which products of the kernels' types on the CPU run dense (see [`DENSE_FROM_ROWS`]);
    /// `None`: always on the quantized kernels (activations quantized to Q8 blocks). The
    /// default is [`default_dense_from_rows`].
    pub dense_from_rows: Option<usize>,
}

impl Default for QuantizedOptions {
    fn default() -> Self {
        Self {
            dense_from_rows: default_dense_from_rows(),
        }
    }
}

/// `None` on a CPU with the int8 GEMM ([`quant::has_int8_gemm`]: AVX-512 VNNI, 2-3x the dense
/// path at 512 rows), else `Some(DENSE_FROM_ROWS)`.
pub fn default_dense_from_rows() -> Option<usize> {
    (!quant::has_int8_gemm()).then_some(DENSE_FROM_ROWS)
}

impl QuantizedLinear {
    /// Wraps a quantized weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            weight,
            matmul,
            bias,
            dense_from_rows: default_dense_from_rows(),
        })
    }

    /// Sets the rows from which products of the kernels' types run dense ([`DENSE_FROM_ROWS`]);
    /// `None`: never (the default where [`default_dense_from_rows`] is).
    pub fn with_dense_from_rows(mut self, rows: Option<usize>) -> Self {
        self.dense_from_rows = rows;
        self
    }

    /// The weight's GGUF type.
    pub fn dtype(&self) -> GgmlDType {
        self.weight.dtype()
    }

    /// The types of [`layerkv_kernels::quant`] on the CPU: layerkv's AVX2 kernels (candle's
    /// run scalar in a default build).
    fn forward_cpu(&self, ty: quant::WeightType, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, k) = self.weight.shape().dims2()?;
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("input {dims:?} does not end in the weight's {k} columns");
        }
        let m = x.elem_count() / k;
        let w = self.weight.data()?;
        let fail = |e: layerkv_kernels::KernelError| candle_core::Error::Msg(e.to_string());
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        if self.dense_from_rows.is_some_and(|r| m >= r) {
            // Dequantize chunks of weight rows and multiply in f32.
            let x = x.reshape((m, k))?;
            let row_bytes = k / ty.block_elems() * ty.block_bytes();
            let rows_per_chunk = (DENSE_CHUNK_VALUES / k.max(1)).clamp(1, n.max(1));
            let mut parts = Vec::with_capacity(n.div_ceil(rows_per_chunk));
            for first in (0..n).step_by(rows_per_chunk) {
                let rows = rows_per_chunk.min(n - first);
                let mut buf = vec![0f32; rows * k];
                let bytes = &w[first * row_bytes..(first + rows) * row_bytes];
                quant::dequantize(ty, bytes, &mut buf).map_err(fail)?;
                let chunk = Tensor::from_vec(buf, (rows, k), x.device())?;
                parts.push(x.matmul(&chunk.t()?)?);
            }
            let y = if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 1)?
            };
            return y.reshape(dims);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; m * n];
        quant::matmul(ty, &w, n, k, &xs, m, &mut y).map_err(fail)?;
        Tensor::from_vec(y, dims, x.device())
    }
}

impl Projection for QuantizedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let kernel = match self.weight.dtype() {
            GgmlDType::Q4_0 => Some(quant::WeightType::Q4_0),
            GgmlDType::Q4_1 => Some(quant::WeightType::Q4_1),
            GgmlDType::Q5_0 => Some(quant::WeightType::Q5_0),
            GgmlDType::Q5_1 => Some(quant::WeightType::Q5_1),
            GgmlDType::Q8_0 => Some(quant::WeightType::Q8_0),
            GgmlDType::Q4K => Some(quant::WeightType::Q4K),
            GgmlDType::Q5K => Some(quant::WeightType::Q5K),
            GgmlDType::Q6K => Some(quant::WeightType::Q6K),
            _ => None,
        };
        let y = match kernel {
            Some(ty) if x.device().is_cpu() && self.weight.device().is_cpu() => {
                self.forward_cpu(ty, &x)?
            }
            _ => self.matmul.forward(&x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.to_dtype(dtype)
    }
}

/// A token embedding table kept in its GGUF type on the CPU: a lookup dequantizes only the
/// requested rows (a row is a run of whole blocks), so the table costs its quantized size.
#[derive(Debug)]
pub struct QuantizedEmbedding {
    table: Arc<QTensor>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl QuantizedEmbedding {
    /// Wraps a CPU table `[vocab, hidden]`.
    pub fn new(table: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = table.shape().dims2()?;
        let dtype = table.dtype();
        if !matches!(table.device(), Device::Cpu) {
            return Err(ModelError::Config(
                "a quantized embedding table must live on the CPU".into(),
            ));
        }
        let row_bytes = tensor_bytes(dtype, cols).map_err(ModelError::Config)?;
        Ok(Self {
            table,
            rows,
            cols,
            row_bytes,
        })
    }

    /// `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The quantized table (a tied LM head multiplies by it).
    pub fn table(&self) -> &Arc<QTensor> {
        &self.table
    }

    /// The f32 rows of `tokens`, `[tokens, hidden]` on `device`.
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        let data = self.table.data()?;
        let mut raw = Vec::with_capacity(tokens.len() * self.row_bytes);
        for &t in tokens {
            let t = t as usize;
            if t >= self.rows {
                return Err(ModelError::Request(format!(
                    "token id {t} is outside the embedding's {} rows",
                    self.rows
                )));
            }
            raw.extend_from_slice(&data[t * self.row_bytes..(t + 1) * self.row_bytes]);
        }
        // Borrowed: candle's `from_data` copies out of a slice of the Cow it is handed, which
        // would dangle for an owned one.
        let storage = QStorage::from_data(Cow::Borrowed(&raw), &Device::Cpu, self.table.dtype())?;
        let rows = QTensor::new(storage, (tokens.len(), self.cols))?;
        Ok(rows.dequantize(device)?)
    }
}

/// Reads tensors of one planned GGUF file.
struct Reader<'a> {
    path: &'a Path,
    reader: BufReader<File>,
    plan: &'a Plan,
    opts: QuantizedOptions,
}

impl Reader<'_> {
    /// The raw bytes, type and `[rows, cols]`-style dims of `name`.
    fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let info = self
            .plan
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| corrupt(self.path, format!("tensor {name} is missing")))?;
        let bytes = tensor_bytes(info.ggml_dtype, info.shape.elem_count())
            .map_err(|e| corrupt(self.path, format!("tensor {name}: {e}")))?;
        let mut raw = vec![0u8; bytes];
        self.reader
            .seek(SeekFrom::Start(
                self.plan.content.tensor_data_offset + info.offset,
            ))
            .map_err(io(self.path))?;
        self.reader
            .read_exact(&mut raw)
            .map_err(|e| corrupt(self.path, format!("tensor {name}: {e}")))?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec(), raw))
    }

    /// The Hugging Face name of `gguf` for errors.
    fn hf(gguf: &str) -> String {
        hf_name(gguf).unwrap_or_else(|| gguf.to_string())
    }

    fn check(gguf: &str, dims: &[usize], expected: &[usize]) -> Result<()> {
        if dims == expected {
            Ok(())
        } else {
            Err(ModelError::ShapeMismatch {
                name: format!("{gguf} ({})", Self::hf(gguf)),
                expected: expected.to_vec(),
                actual: dims.to_vec(),
            })
        }
    }

    /// A quantized tensor `name` of shape `expected` on `device`; `unpermute_heads`: undo
    /// llama.cpp's Q/K row permutation over that many heads (whole rows' bytes move).
    fn qtensor(
        &mut self,
        name: &str,
        expected: &[usize],
        unpermute_heads: Option<usize>,
        device: &Device,
    ) -> Result<Arc<QTensor>> {
        let (dtype, dims, mut raw) = self.raw(name)?;
        Self::check(name, &dims, expected)?;
        if let Some(heads) = unpermute_heads {
            raw = unpermute_row_bytes(&raw, dims[0], heads)
                .map_err(|e| corrupt(self.path, format!("tensor {name}: {e}")))?;
        }
        let fail = |e: candle_core::Error| ModelError::Unsupported {
            path: self.path.into(),
            what: format!(
                "tensor {name} ({dtype:?}): cannot run quantized: {}",
                candle_message(&e)
            ),
        };
        // Borrowed: candle's `from_data` copies out of a slice of the Cow it is handed, which
        // would dangle for an owned one.
        let storage = QStorage::from_data(Cow::Borrowed(&raw), device, dtype).map_err(fail)?;
        Ok(Arc::new(QTensor::new(storage, dims).map_err(fail)?))
    }

    /// A small tensor (norm, bias) as f32 on `device`.
    fn dense(
        &mut self,
        name: &str,
        expected: &[usize],
        unpermute_heads: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let q = self.qtensor(name, expected, None, &Device::Cpu)?;
        let t = q.dequantize(&Device::Cpu)?;
        let t = match unpermute_heads {
            Some(heads) => unpermute_qk(&t, heads)
                .map_err(|e| corrupt(self.path, format!("tensor {name}: {e}")))?,
            None => t,
        };
        Ok(t.to_device(device)?)
    }

    fn linear(
        &mut self,
        base: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        unpermute_heads: Option<usize>,
        device: &Device,
    ) -> Result<Box<dyn Projection>> {
        let w = self.qtensor(
            &format!("{base}.weight"),
            &[out_dim, in_dim],
            unpermute_heads,
            device,
        )?;
        let b = if bias {
            Some(self.dense(&format!("{base}.bias"), &[out_dim], unpermute_heads, device)?)
        } else {
            None
        };
        Ok(Box::new(
            QuantizedLinear::new(w, b)?.with_dense_from_rows(self.opts.dense_from_rows),
        ))
    }
}

/// Rows `[heads * d]` of `row_bytes` each, reordered from llama.cpp's interleaved-pair order
/// back to rotate-half order (the row order [`unpermute_qk`] gives).
fn unpermute_row_bytes(raw: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>> {
    let order = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    let order: Vec<f32> = unpermute_qk(&order, heads)?.to_vec1()?;
    let row_bytes = raw.len() / rows.max(1);
    let mut out = Vec::with_capacity(raw.len());
    for src in order {
        let src = src as usize;
        out.extend_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
    }
    Ok(out)
}

/// A model loaded from a GGUF file with its weights in their own types.
#[derive(Debug)]
pub struct GgufModel {
    /// The model (f32 activations).
    pub model: Model,
    /// What the header said (the same summary `layerkv convert` prints).
    pub summary: GgufSummary,
}

/// Loads a llama, mistral or qwen2 GGUF file into a [`Model`] whose projections, LM head and
/// token embedding stay in the file's tensor types (see the module docs). `device` holds the
/// projections; the embedding table stays on the CPU. Errors name the file and the tensor
/// (unsupported types and architectures, shapes, truncation).
pub fn load_gguf(gguf: &Path, device: &Device) -> Result<GgufModel> {
    load_gguf_with(gguf, device, &QuantizedOptions::default())
}

/// [`load_gguf`] with options (when products run dense).
pub fn load_gguf_with(gguf: &Path, device: &Device, opts: &QuantizedOptions) -> Result<GgufModel> {
    let (mut reader, content, len) = read_header(gguf)?;
    let mut p = plan(gguf, content, len)?;
    apply_rope_freqs(gguf, &mut reader, &mut p)?;
    let cfg = ModelConfig::parse(&p.config.to_string())?;
    let s = p.summary.clone();
    let mut r = Reader {
        path: gguf,
        reader,
        plan: &p,
        opts: *opts,
    };
    let (h, d) = (cfg.hidden_size, cfg.head_dim());
    let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let ffn = cfg.intermediate_size;
    let bias = cfg.attention_bias();
    let permute = s.architecture.permutes_qk();
    let q_heads = permute.then_some(cfg.num_attention_heads);
    let k_heads = permute.then_some(cfg.num_key_value_heads);

    let embed = r.qtensor(
        "token_embd.weight",
        &[cfg.vocab_size, h],
        None,
        &Device::Cpu,
    )?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let b = format!("blk.{i}");
        layers.push(Layer {
            input_norm: r.dense(&format!("{b}.attn_norm.weight"), &[h], None, device)?,
            q_proj: r.linear(&format!("{b}.attn_q"), q_out, h, bias, q_heads, device)?,
            k_proj: r.linear(&format!("{b}.attn_k"), kv_out, h, bias, k_heads, device)?,
            v_proj: r.linear(&format!("{b}.attn_v"), kv_out, h, bias, None, device)?,
            o_proj: r.linear(&format!("{b}.attn_output"), h, q_out, false, None, device)?,
            post_norm: r.dense(&format!("{b}.ffn_norm.weight"), &[h], None, device)?,
            gate_proj: r.linear(&format!("{b}.ffn_gate"), ffn, h, false, None, device)?,
            up_proj: r.linear(&format!("{b}.ffn_up"), ffn, h, false, None, device)?,
            down_proj: r.linear(&format!("{b}.ffn_down"), h, ffn, false, None, device)?,
        });
    }
    let norm = r.dense("output_norm.weight", &[h], None, device)?;
    let lm_head: Box<dyn Projection> = if !s.tied_embeddings {
        r.linear("output", cfg.vocab_size, h, false, None, device)?
    } else if matches!(device, Device::Cpu) {
        // Tied: the LM head multiplies by the embedding's own quantized matrix (one copy).
        Box::new(
            QuantizedLinear::new(embed.clone(), None)?.with_dense_from_rows(opts.dense_from_rows),
        )
    } else {
        let head = r.qtensor("token_embd.weight", &[cfg.vocab_size, h], None, device)?;
        Box::new(QuantizedLinear::new(head, None)?.with_dense_from_rows(opts.dense_from_rows))
    };
    let embed = QuantizedEmbedding::new(embed)?;
    let model = Model::from_quantized_parts(cfg, embed, layers, norm, lm_head, device)?;
    Ok(GgufModel { model, summary: s })
}
