//! GGUF -> Hugging Face model directory (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `model.safetensors`), so a (quantised) llama, mistral or qwen2 GGUF
//! becomes a standard directory that layerkv and mistral.rs both load.
//!
//! What it reads:
//! - `general.architecture` = `llama`, `mistral` or `qwen2` (anything else is an error naming
//!   it), and the hyper-parameters under that prefix (`{arch}.block_count`,
//!   `{arch}.attention.head_count_kv`, `{arch}.rope.freq_base`, ...);
//! - every tensor type candle 0.10.2 dequantises (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//!   Q2K..Q6K) plus Q8K (dequantised here: candle's GGUF reader refuses it); Q8_1 (candle
//!   cannot dequantise it) and the types candle does not read (i-quants, F64, ...) are errors
//!   naming the tensor;
//! - the tokenizer of the metadata, byte-level BPE or SentencePiece BPE (see
//!   [`crate::tokenizer`]).
//!
//! Tensors are renamed from llama.cpp to Hugging Face names and dequantised to f32 (or the dtype
//! of [`ConvertOptions`]). For `llama` and `mistral` the Q/K projections (weights and biases) are
//! un-permuted: llama.cpp's converter reorders each head's rows from HF's rotate-half pairing
//! (i, i + d/2) to interleaved pairs (2i, 2i+1) because its llama kernels rotate interleaved
//! pairs. `qwen2` uses NEOX (rotate-half) RoPE in llama.cpp and is not permuted. A llama-3
//! `rope_freqs.weight` is matched against the llama-3 scaling formula and becomes
//! `rope_scaling` in `config.json` (an error if it matches no known parameters).
//!
//! Everything the header decides (architecture, tokenizer, tensor types, file length) is checked
//! before the first tensor is read, so an unsupported file fails in milliseconds; a bounded
//! pre-scan of the header checks every count and length against the file size first, so a
//! corrupt header is an error, never a huge allocation. Cost: one pass
//! over the weights; memory: the converted model once.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{candle_message, io, ModelError, Result};
use crate::tokenizer::{
    canonical_pre, check_gguf_tokenizer_model, tokenizer_config_from_gguf,
    tokenizer_json_from_gguf, GgufVocab,
};

/// The GGUF architectures the converter reads.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2";

/// A GGUF `general.architecture` the converter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llama` (also llama-3, SmolLM, and most mistral GGUFs): permuted Q/K.
    Llama,
    /// `mistral`: the llama tensor layout, permuted Q/K, optional sliding window.
    Mistral,
    /// `qwen2`: Q/K/V biases, NEOX RoPE (not permuted).
    Qwen2,
}

impl Architecture {
    /// Parses a `general.architecture` value.
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The name in GGUF metadata and in `config.json`'s `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Whether llama.cpp permuted this architecture's Q/K rows (interleaved RoPE).
    pub fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }

    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How to convert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvertOptions {
    /// Dtype of the written float tensors (f32 by default; f16/bf16 halve the file).
    pub dtype: DType,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self { dtype: DType::F32 }
    }
}

/// What a GGUF file holds, as the converter read it (printed by `layerkv convert`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// `general.architecture`.
    pub architecture: Architecture,
    /// Decoder layers.
    pub num_layers: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Embedding rows (`vocab_size` of the config).
    pub vocab_size: usize,
    /// Tokens in the tokenizer metadata.
    pub num_tokens: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Sliding window (mistral).
    pub sliding_window: Option<usize>,
    /// Q/K/V biases present.
    pub qkv_bias: bool,
    /// No `output.weight`: the LM head is the embedding.
    pub tied_embeddings: bool,
    /// Llama-3 RoPE scaling recovered from `rope_freqs.weight`: `(factor, low, high, original)`.
    pub llama3_rope_scaling: Option<(f64, f64, f64, usize)>,
    /// Tensor count per GGUF type (e.g. `"Q4_1" -> 210`).
    pub tensor_types: BTreeMap<String, usize>,
    /// Tensors the converter does not use.
    pub ignored_tensors: Vec<String>,
    /// `tokenizer.ggml.model`.
    pub tokenizer_model: String,
    /// The pre-tokenizer used (canonical name; `default` when `tokenizer.ggml.pre` is absent).
    pub pre_tokenizer: String,
    /// `tokenizer.ggml.pre` as written (empty when absent).
    pub pre_tokenizer_raw: String,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: bool,
    /// A chat template is present.
    pub has_chat_template: bool,
}

pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.into(),
        what: what.into(),
    }
}

pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        path: path.into(),
        what: what.into(),
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::I64(x) => Some(x),
        _ => as_u64(v).and_then(|x| i64::try_from(x).ok()),
    }
}

/// Metadata of one file, with errors that name the file and the key.
struct Meta<'a> {
    c: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.c.metadata.get(key) {
            None => Ok(None),
            Some(v) => as_u64(v)
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    corrupt(
                        self.path,
                        format!("`{key}` is {v:?}, not a non-negative integer"),
                    )
                }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| corrupt(self.path, format!("GGUF metadata `{key}` is missing")))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_usize(key)?
            .map(|x| {
                u32::try_from(x)
                    .map_err(|_| corrupt(self.path, format!("`{key}` = {x} does not fit in u32")))
            })
            .transpose()
    }

    /// A float as f64 through its shortest decimal form (1e-5f32 -> 1e-5, not 9.99999974e-6).
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.c.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => as_i64(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| corrupt(self.path, format!("`{key}` is {v:?}, not a number"))),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.c.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(corrupt(
                self.path,
                format!("`{key}` is a {:?}, not a string", v.value_type()),
            )),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.c.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_u64(v)
                .map(|x| Some(x != 0))
                .ok_or_else(|| corrupt(self.path, format!("`{key}` is {v:?}, not a bool"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.c.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(corrupt(
                self.path,
                format!("`{key}` is a {:?}, not an array", v.value_type()),
            )),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Some(a) = self.array(key)? else {
            return Ok(Vec::new());
        };
        a.iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(corrupt(
                    self.path,
                    format!("`{key}`[{i}] is {other:?}, not a string"),
                )),
            })
            .collect()
    }

    fn floats(&self, key: &str) -> Result<Vec<f32>> {
        let Some(a) = self.array(key)? else {
            return Ok(Vec::new());
        };
        a.iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                other => Err(corrupt(
                    self.path,
                    format!("`{key}`[{i}] is {other:?}, not a float"),
                )),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        let Some(a) = self.array(key)? else {
            return Ok(Vec::new());
        };
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                as_i64(x)
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| corrupt(self.path, format!("`{key}`[{i}] is {x:?}, not an i32")))
            })
            .collect()
    }
}

/// The Hugging Face name of a llama.cpp tensor name (`None` for tensors the runner ignores).
pub fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The llama.cpp tensor name of a Hugging Face name (the inverse of [`hf_name`]; `None` for
/// names it does not map). Used to write test GGUFs.
pub fn gguf_name(hf: &str) -> Option<String> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = name.rsplit_once('.')?;
    let g = match base {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Undoes llama.cpp's Q/K row permutation: rows `[heads * d, in]` (or a bias `[heads * d]`) in
/// interleaved-pair order back to rotate-half order.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, false)
}

/// llama.cpp's permutation (the inverse of [`unpermute_qk`]); used to build test GGUFs.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, true)
}

fn permute_rows(w: &Tensor, heads: usize, forward: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (rows, cols) = match dims[..] {
        [r] => (r, 1),
        [r, c] => (r, c),
        _ => {
            return Err(ModelError::Config(format!(
                "Q/K permutation of a tensor of shape {dims:?} (expected 1 or 2 dimensions)"
            )))
        }
    };
    if heads == 0 || rows % heads != 0 || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "Q/K permutation: {rows} rows are not {heads} heads of an even width"
        )));
    }
    let d = rows / heads;
    let split = if forward { (2, d / 2) } else { (d / 2, 2) };
    Ok(w.reshape((heads, split.0, split.1, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Llama-3 RoPE scaling factors per frequency, as llama.cpp's converter writes
/// `rope_freqs.weight` (each frequency is divided by its factor).
pub fn llama3_rope_factors(
    theta: f64,
    head_dim: usize,
    (factor, low, high, original): (f64, f64, f64, usize),
) -> Vec<f64> {
    let old = original as f64;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Bytes a tensor of `elems` elements of `dtype` takes, or why it cannot be stored.
pub(crate) fn tensor_bytes(dtype: GgmlDType, elems: usize) -> std::result::Result<usize, String> {
    let block = dtype.block_size();
    if !elems.is_multiple_of(block) {
        return Err(format!(
            "{elems} elements are not a multiple of the {dtype:?} block size {block}"
        ));
    }
    Ok(elems / block * dtype.type_size())
}

/// Header of a GGUF file plus everything decided from it, before any tensor is read.
pub(crate) struct Plan {
    pub(crate) content: Content,
    pub(crate) summary: GgufSummary,
    pub(crate) config: serde_json::Value,
    pub(crate) tokenizer_json: String,
    pub(crate) tokenizer_config: serde_json::Value,
}

pub(crate) fn read_header(path: &Path) -> Result<(BufReader<File>, Content, u64)> {
    if !path.exists() {
        return Err(ModelError::MissingFile(path.into()));
    }
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut reader = BufReader::new(file);
    // candle's reader allocates what length fields say: check them against the file first.
    let problem = check_header(&mut reader, len).map_err(|what| {
        corrupt(
            path,
            format!("not a readable GGUF file (truncated or not GGUF?): {what}"),
        )
    })?;
    if let Some(what) = problem {
        return Err(unsupported(path, what));
    }
    reader.seek(SeekFrom::Start(0)).map_err(io(path))?;
    // Belt and braces: a panic inside candle's reader becomes an error too.
    let read =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
    let content = match read {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(corrupt(
                path,
                format!(
                    "not a readable GGUF file (truncated or not GGUF?): {}",
                    candle_message(&e)
                ),
            ))
        }
        Err(_) => {
            return Err(corrupt(
                path,
                "not a readable GGUF file: a length field of the header is impossible",
            ))
        }
    };
    Ok((reader, content, len))
}

/// Walks a GGUF header checking every count and length against the bytes left in the file
/// (and the tensor ranks and element counts), so the real reader never allocates what a corrupt
/// or truncated header claims. O(header size), no allocation beyond one scratch buffer.
///
/// `Ok(Some(what))` names the first tensor whose type candle cannot read (an unsupported file,
/// not a corrupt one).
fn check_header<R: Read + Seek>(
    r: &mut R,
    file_len: u64,
) -> std::result::Result<Option<String>, String> {
    struct Walk<'a, R> {
        r: &'a mut R,
        len: u64,
        v1: bool,
    }
    impl<R: Read + Seek> Walk<'_, R> {
        fn left(&mut self) -> std::result::Result<u64, String> {
            let pos = self.r.stream_position().map_err(|e| e.to_string())?;
            Ok(self.len.saturating_sub(pos))
        }
        fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
            let mut b = [0u8; N];
            self.r
                .read_exact(&mut b)
                .map_err(|_| format!("the file ends inside {what}"))?;
            Ok(b)
        }
        fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
            Ok(u32::from_le_bytes(self.bytes(what)?))
        }
        fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
            Ok(u64::from_le_bytes(self.bytes(what)?))
        }
        fn count(&mut self, what: &str) -> std::result::Result<u64, String> {
            if self.v1 {
                self.u32(what).map(u64::from)
            } else {
                self.u64(what)
            }
        }
        fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
            if n > self.left()? {
                return Err(format!(
                    "{what} claims {n} bytes but the file has {} left",
                    self.left()?
                ));
            }
            self.r
                .seek(SeekFrom::Current(n as i64))
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        fn string(&mut self, what: &str) -> std::result::Result<(), String> {
            let n = self.count(what)?;
            self.skip(n, what)
        }
        /// A string read whole (tensor names), up to 4 KiB.
        fn short_string(&mut self, what: &str) -> std::result::Result<String, String> {
            let n = self.count(what)?;
            if n > 4096 || n > self.left()? {
                return Err(format!("{what}: a name of {n} bytes"));
            }
            let mut b = vec![0u8; n as usize];
            self.r
                .read_exact(&mut b)
                .map_err(|_| format!("the file ends inside {what}"))?;
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
        fn value(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<(), String> {
            match ty {
                0 | 1 | 7 => self.skip(1, what),
                2 | 3 => self.skip(2, what),
                4..=6 => self.skip(4, what),
                10..=12 => self.skip(8, what),
                8 => self.string(what),
                9 if depth < 4 => {
                    let elem = self.u32(what)?;
                    let n = self.count(what)?;
                    let min = match elem {
                        0 | 1 | 7 => 1,
                        2 | 3 => 2,
                        4..=6 | 9 => 4,
                        8 if self.v1 => 4,
                        _ => 8,
                    };
                    if n.saturating_mul(min) > self.left()? {
                        return Err(format!(
                            "{what}: an array of {n} elements does not fit in the file"
                        ));
                    }
                    match elem {
                        8 | 9 => (0..n).try_for_each(|_| self.value(elem, what, depth + 1)),
                        _ => self.value_run(elem, n, what),
                    }
                }
                9 => Err(format!("{what}: arrays nested too deep")),
                other => Err(format!("{what}: unknown value type {other}")),
            }
        }
        fn value_run(&mut self, elem: u32, n: u64, what: &str) -> std::result::Result<(), String> {
            let size = match elem {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                other => return Err(format!("{what}: unknown array element type {other}")),
            };
            self.skip(n * size, what)
        }
    }
    let mut w = Walk {
        r,
        len: file_len,
        v1: false,
    };
    let magic = w.u32("the magic number")?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!("magic 0x{magic:08x} is not GGUF"));
    }
    let version = w.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not 1, 2 or 3"));
    }
    w.v1 = version == 1;
    let tensors = w.count("the tensor count")?;
    let kvs = w.count("the metadata count")?;
    // Each metadata entry takes at least a key length and a type; each tensor at least a
    // name length, a rank, a type and an offset.
    if kvs.saturating_mul(12) > w.left()? || tensors.saturating_mul(24) > w.left()? {
        return Err(format!(
            "{kvs} metadata entries and {tensors} tensors do not fit in {file_len} bytes"
        ));
    }
    for i in 0..kvs {
        let what = format!("metadata entry {i}");
        w.string(&what)?;
        let ty = w.u32(&what)?;
        w.value(ty, &what, 0)?;
    }
    let mut unsupported = None;
    for i in 0..tensors {
        let what = format!("tensor info {i}");
        let name = w.short_string(&what)?;
        let rank = w.u32(&what)?;
        if rank > 4 {
            return Err(format!("{what}: rank {rank} (GGML tensors have at most 4)"));
        }
        let mut elems: u64 = 1;
        for _ in 0..rank {
            let d = if w.v1 {
                u64::from(w.u32(&what)?)
            } else {
                w.u64(&what)?
            };
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= file_len.saturating_mul(8))
                .ok_or_else(|| format!("{what}: more elements than the file could hold"))?;
        }
        let ty = w.u32(&what)?;
        w.u64(&what)?;
        if unsupported.is_none() {
            unsupported = ggml_type_problem(ty).map(|p| format!("tensor {name}: {p}"));
        }
    }
    Ok(unsupported)
}

/// Why a GGML type id cannot be converted (`None`: candle 0.10.2 reads it).
fn ggml_type_problem(ty: u32) -> Option<String> {
    let name = match ty {
        0..=3 | 6..=15 | 30 => return None,
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    Some(format!(
        "GGML type {ty} ({name}) is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, \
         Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K)"
    ))
}

pub(crate) fn plan(path: &Path, content: Content, file_len: u64) -> Result<Plan> {
    let m = Meta { c: &content, path };
    let arch_name = m
        .opt_string("general.architecture")?
        .ok_or_else(|| corrupt(path, "GGUF metadata `general.architecture` is missing"))?;
    let arch = Architecture::from_gguf(&arch_name).ok_or_else(|| {
        unsupported(
            path,
            format!(
                "general.architecture = {arch_name:?} is not supported \
                 (supported: {SUPPORTED_ARCHITECTURES})"
            ),
        )
    })?;
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");

    // Tokenizer first: it is the cheapest to refuse.
    let vocab = GgufVocab {
        model: m.opt_string("tokenizer.ggml.model")?.unwrap_or_default(),
        tokens: m.strings("tokenizer.ggml.tokens")?,
        merges: m.strings("tokenizer.ggml.merges")?,
        scores: m.floats("tokenizer.ggml.scores")?,
        add_space_prefix: m.opt_bool("tokenizer.ggml.add_space_prefix")?,
        token_types: m.ints("tokenizer.ggml.token_type")?,
        pre: m.opt_string("tokenizer.ggml.pre")?.unwrap_or_default(),
        bos_id: m.opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_id: m.opt_u32("tokenizer.ggml.eos_token_id")?,
        unk_id: m.opt_u32("tokenizer.ggml.unknown_token_id")?,
        pad_id: m.opt_u32("tokenizer.ggml.padding_token_id")?,
        add_bos: m.opt_bool("tokenizer.ggml.add_bos_token")?,
        add_eos: m.opt_bool("tokenizer.ggml.add_eos_token")?,
        chat_template: m.opt_string("tokenizer.chat_template")?,
    };
    let tok_err = |e: ModelError| match e {
        ModelError::Tokenizer(what) => unsupported(path, what),
        other => other,
    };
    check_gguf_tokenizer_model(&vocab.model).map_err(tok_err)?;
    // SentencePiece has no pre-tokenizer: llama.cpp ignores `pre` for it, and so do we.
    let pre = if vocab.model == "llama" {
        "none (SentencePiece)"
    } else {
        canonical_pre(&vocab.pre).map_err(tok_err)?
    };

    // Tensor types and the file length.
    let mut tensor_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut ignored_tensors = Vec::new();
    let mut by_offset: Vec<(&String, &TensorInfo)> = content.tensor_infos.iter().collect();
    by_offset.sort_by_key(|(name, info)| (info.offset, name.as_str()));
    for (name, info) in by_offset {
        *tensor_types
            .entry(format!("{:?}", info.ggml_dtype))
            .or_default() += 1;
        if info.ggml_dtype == GgmlDType::Q8_1 {
            return Err(unsupported(
                path,
                format!("tensor {name}: GGUF type Q8_1 cannot be dequantised (candle 0.10.2 has no Q8_1 dequantisation)"),
            ));
        }
        let bytes = tensor_bytes(info.ggml_dtype, info.shape.elem_count())
            .map_err(|e| corrupt(path, format!("tensor {name}: {e}")))?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|x| x.checked_add(bytes as u64));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "truncated: tensor {name} ({:?}, shape {:?}) ends at byte {} but the file has {file_len} bytes",
                        info.ggml_dtype,
                        info.shape.dims(),
                        content.tensor_data_offset as u128 + info.offset as u128 + bytes as u128
                    ),
                ))
            }
        }
        if hf_name(name).is_none() && name != "rope_freqs.weight" {
            ignored_tensors.push(name.clone());
        }
    }
    ignored_tensors.sort();
    // Rows of a 2-D tensor (GGUF dims reversed by candle: `[rows, cols]`).
    let rows_of = |name: &str| -> Result<usize> {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| corrupt(path, format!("tensor {name} is missing")))?;
        match info.shape.dims() {
            &[rows, _] => Ok(rows),
            other => Err(corrupt(
                path,
                format!("tensor {name} has shape {other:?}, expected 2 dimensions"),
            )),
        }
    };

    let num_layers = m.usize(&key("block_count"))?;
    let hidden_size = m.usize(&key("embedding_length"))?;
    let num_heads = m.usize(&key("attention.head_count"))?;
    if num_heads == 0 {
        return Err(corrupt(
            path,
            format!("`{}` is 0", key("attention.head_count")),
        ));
    }
    let num_kv_heads = m
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let head_dim = match m.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => m
            .opt_usize(&key("rope.dimension_count"))?
            .unwrap_or(hidden_size / num_heads),
    };
    if let Some(rope_dims) = m.opt_usize(&key("rope.dimension_count"))? {
        if rope_dims != head_dim {
            return Err(unsupported(
                path,
                format!(
                    "partial RoPE ({rope_dims} of {head_dim} head dimensions) is not supported"
                ),
            ));
        }
    }
    if let Some(kind) = m.opt_string(&key("rope.scaling.type"))? {
        if kind != "none" {
            return Err(unsupported(
                path,
                format!(
                    "`{}` = {kind:?} is not supported (only llama-3 rope_freqs)",
                    key("rope.scaling.type")
                ),
            ));
        }
    }
    let vocab_size = rows_of("token_embd.weight")?;
    if vocab.tokens.len() > vocab_size {
        return Err(corrupt(
            path,
            format!(
                "{} tokens in tokenizer.ggml.tokens but token_embd.weight has only {vocab_size} rows",
                vocab.tokens.len()
            ),
        ));
    }
    let intermediate_size = match m.opt_usize(&key("feed_forward_length"))? {
        Some(f) => f,
        None => rows_of("blk.0.ffn_up.weight")?,
    };
    let rope_theta = m.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let rms_norm_eps = m
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            corrupt(
                path,
                format!(
                    "GGUF metadata `{}` is missing",
                    key("attention.layer_norm_rms_epsilon")
                ),
            )
        })?;
    let context_length = m.opt_usize(&key("context_length"))?.unwrap_or(4096);
    let sliding_window = match arch {
        Architecture::Mistral => m.opt_usize(&key("attention.sliding_window"))?,
        _ => None,
    };
    let has = |n: &str| content.tensor_infos.contains_key(n);
    let qkv_bias = has("blk.0.attn_q.bias");
    if arch == Architecture::Qwen2 && !qkv_bias {
        return Err(corrupt(
            path,
            "qwen2 needs Q/K/V biases but tensor blk.0.attn_q.bias is missing",
        ));
    }
    let tied_embeddings = !has("output.weight");

    let summary = GgufSummary {
        architecture: arch,
        num_layers,
        hidden_size,
        intermediate_size,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        num_tokens: vocab.tokens.len(),
        context_length,
        rope_theta,
        rms_norm_eps,
        sliding_window,
        qkv_bias,
        tied_embeddings,
        llama3_rope_scaling: None,
        tensor_types,
        ignored_tensors,
        tokenizer_model: vocab.model.clone(),
        pre_tokenizer: pre.to_string(),
        pre_tokenizer_raw: vocab.pre.clone(),
        add_bos_token: vocab.add_bos.unwrap_or(false),
        has_chat_template: vocab.chat_template.is_some(),
    };
    let tokenizer_json = tokenizer_json_from_gguf(&vocab).map_err(tok_err)?;
    let tokenizer_config = tokenizer_config_from_gguf(&vocab).map_err(tok_err)?;

    let mut config = json!({
        "architectures": [arch.hf_class()],
        "model_type": a,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "max_position_embeddings": context_length,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied_embeddings,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "pad_token_id": vocab.pad_id,
        "torch_dtype": "float32",
    });
    match arch {
        Architecture::Llama => {
            config["attention_bias"] = json!(qkv_bias);
        }
        Architecture::Mistral => {
            if qkv_bias {
                return Err(unsupported(
                    path,
                    "mistral with Q/K/V biases is not supported (config.json has no key for them)",
                ));
            }
            config["sliding_window"] = json!(sliding_window);
        }
        Architecture::Qwen2 => {
            config["use_sliding_window"] = json!(false);
            config["sliding_window"] = json!(context_length);
            config["max_window_layers"] = json!(num_layers);
        }
    }
    // A llama-3 `rope_freqs.weight` needs one tiny tensor read: see `apply_rope_freqs`.
    Ok(Plan {
        content,
        summary,
        config,
        tokenizer_json,
        tokenizer_config,
    })
}

/// Matches `rope_freqs.weight` against llama-3 scaling (llama.cpp writes the default
/// low 1 / high 4 / original 8192 of Llama 3.x unless the config said otherwise).
fn llama3_from_freqs(
    path: &Path,
    freqs: &[f32],
    theta: f64,
    head_dim: usize,
    original_hint: Option<usize>,
) -> Result<(f64, f64, f64, usize)> {
    if freqs.len() != head_dim / 2 {
        return Err(corrupt(
            path,
            format!(
                "rope_freqs.weight has {} values, expected head_dim / 2 = {}",
                freqs.len(),
                head_dim / 2
            ),
        ));
    }
    let factor = freqs.iter().fold(1.0f64, |m, &x| m.max(x as f64));
    let mut originals = vec![8192usize];
    originals.extend(original_hint.filter(|&o| o != 8192));
    for original in originals {
        let params = (factor, 1.0, 4.0, original);
        let want = llama3_rope_factors(theta, head_dim, params);
        let ok = want
            .iter()
            .zip(freqs)
            .all(|(&w, &g)| (w - g as f64).abs() <= 1e-3 * w.abs().max(1.0));
        if ok {
            return Ok(params);
        }
    }
    Err(unsupported(
        path,
        format!(
            "rope_freqs.weight matches no llama-3 RoPE scaling (tried factor {factor}, \
             low 1, high 4, original context 8192): this RoPE scaling is not supported"
        ),
    ))
}

/// Reads a GGUF header and reports what a conversion would do, reading no tensor data except a
/// llama-3 `rope_freqs.weight`. Fails like [`gguf_to_model_dir`] does on unsupported files.
pub fn read_gguf_summary(gguf: &Path) -> Result<GgufSummary> {
    let (mut reader, content, len) = read_header(gguf)?;
    let mut p = plan(gguf, content, len)?;
    apply_rope_freqs(gguf, &mut reader, &mut p)?;
    Ok(p.summary)
}

pub(crate) fn apply_rope_freqs(
    path: &Path,
    reader: &mut BufReader<File>,
    p: &mut Plan,
) -> Result<()> {
    if !p.content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(());
    }
    let t = read_tensor(path, reader, &p.content, "rope_freqs.weight")?;
    let freqs: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let hint = Meta {
        c: &p.content,
        path,
    }
    .opt_usize(&format!(
        "{}.rope.scaling.original_context_length",
        p.summary.architecture.name()
    ))?;
    let params = llama3_from_freqs(path, &freqs, p.summary.rope_theta, p.summary.head_dim, hint)?;
    p.summary.llama3_rope_scaling = Some(params);
    p.config["rope_scaling"] = json!({
        "rope_type": "llama3",
        "factor": params.0,
        "low_freq_factor": params.1,
        "high_freq_factor": params.2,
        "original_max_position_embeddings": params.3,
    });
    Ok(())
}

/// Dequantises one tensor to f32 on the CPU.
fn read_tensor(
    path: &Path,
    reader: &mut BufReader<File>,
    content: &Content,
    name: &str,
) -> Result<Tensor> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| corrupt(path, format!("tensor {name} is missing")))?;
    let fail = |e: String| corrupt(path, format!("tensor {name} ({:?}): {e}", info.ggml_dtype));
    if info.ggml_dtype == GgmlDType::Q8K {
        // candle's GGUF reader refuses Q8K; its blocks are {d: f32, qs: [i8; 256], bsums: [i16; 16]}.
        let elems = info.shape.elem_count();
        let bytes = tensor_bytes(GgmlDType::Q8K, elems).map_err(fail)?;
        let mut raw = vec![0u8; bytes];
        reader
            .seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .map_err(io(path))?;
        reader
            .read_exact(&mut raw)
            .map_err(|e| fail(e.to_string()))?;
        let data = dequantize_q8k(&raw);
        return Ok(Tensor::from_vec(data, info.shape.dims(), &Device::Cpu)?);
    }
    let q = content
        .tensor(reader, name, &Device::Cpu)
        .map_err(|e| fail(candle_message(&e)))?;
    q.dequantize(&Device::Cpu)
        .map_err(|e| fail(candle_message(&e)))
}

/// Q8K blocks (292 bytes: f32 scale, 256 i8 values, 16 i16 sums) to f32.
pub(crate) fn dequantize_q8k(raw: &[u8]) -> Vec<f32> {
    const QK_K: usize = 256;
    const BLOCK: usize = 4 + QK_K + QK_K / 16 * 2;
    let mut out = Vec::with_capacity(raw.len() / BLOCK * QK_K);
    for block in raw.chunks_exact(BLOCK) {
        let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        out.extend(block[4..4 + QK_K].iter().map(|&q| d * (q as i8) as f32));
    }
    out
}

/// Writes `config.json` (`config`), `tokenizer.json` and `tokenizer_config.json` of a planned
/// file into `out` (created): everything a session reads from a model directory but the weights.
pub(crate) fn write_metadata(out: &Path, config: &serde_json::Value, p: &Plan) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Json {
            path: path.clone(),
            what: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io(&path))
    };
    write_json("config.json", config)?;
    write_json("tokenizer_config.json", &p.tokenizer_config)?;
    let tok_path = out.join("tokenizer.json");
    std::fs::write(&tok_path, &p.tokenizer_json).map_err(io(&tok_path))
}

/// Writes the metadata of a GGUF file as a model directory without weights (`config.json`,
/// `tokenizer.json`, `tokenizer_config.json`): what a session reads beside a model loaded with
/// [`crate::quantized::load_gguf`]. Reads no tensor data but a llama-3 `rope_freqs.weight`.
pub fn gguf_metadata_to_dir(gguf: &Path, out: &Path) -> Result<GgufSummary> {
    let (mut reader, content, len) = read_header(gguf)?;
    let mut p = plan(gguf, content, len)?;
    apply_rope_freqs(gguf, &mut reader, &mut p)?;
    write_metadata(out, &p.config, &p)?;
    Ok(p.summary)
}

/// Converts a llama, mistral or qwen2 GGUF file into a model directory at `out` (created;
/// files overwritten), writing f32 tensors. Returns what it read.
pub fn gguf_to_model_dir(gguf: &Path, out: &Path) -> Result<GgufSummary> {
    gguf_to_model_dir_with(gguf, out, &ConvertOptions::default())
}

/// [`gguf_to_model_dir`] with options (the written dtype).
pub fn gguf_to_model_dir_with(
    gguf: &Path,
    out: &Path,
    opts: &ConvertOptions,
) -> Result<GgufSummary> {
    if !opts.dtype.is_float() {
        return Err(ModelError::Config(format!(
            "conversion dtype {:?} is not a float type",
            opts.dtype
        )));
    }
    let (mut reader, content, len) = read_header(gguf)?;
    let mut p = plan(gguf, content, len)?;
    apply_rope_freqs(gguf, &mut reader, &mut p)?;
    let s = &p.summary;
    let mut names: Vec<&String> = p.content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let mut t = read_tensor(gguf, &mut reader, &p.content, name)?;
        if s.architecture.permutes_qk() {
            let is = |base: &str| {
                name.ends_with(&format!("{base}.weight")) || name.ends_with(&format!("{base}.bias"))
            };
            let heads = if is("attn_q") {
                Some(s.num_heads)
            } else if is("attn_k") {
                Some(s.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                t = unpermute_qk(&t, heads)
                    .map_err(|e| corrupt(gguf, format!("tensor {name}: {e}")))?;
            }
        }
        if t.dtype() != opts.dtype {
            t = t.to_dtype(opts.dtype)?;
        }
        tensors.insert(hf, t);
    }
    if !tensors.contains_key("model.layers.0.mlp.up_proj.weight") {
        return Err(corrupt(gguf, "tensor blk.0.ffn_up.weight is missing"));
    }
    let mut config = p.config.clone();
    config["torch_dtype"] = json!(match opts.dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    });
    write_metadata(out, &config, &p)?;
    let st_path: PathBuf = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st_path).map_err(|e| {
        corrupt(
            &st_path,
            format!("writing safetensors: {}", candle_message(&e)),
        )
    })?;
    Ok(p.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face_and_back() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
        for n in [
            "blk.7.attn_k.bias",
            "blk.1.ffn_down.weight",
            "output.weight",
            "output_norm.weight",
        ] {
            assert_eq!(gguf_name(&hf_name(n).unwrap()).unwrap(), n);
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        // Head 0 rows 0..4 = pairs (0, 2), (1, 3) interleaved: 0, 2, 1, 3.
        let col0: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col0, vec![0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Biases permute like one column of the weight.
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        let pb: Vec<f32> = permute_qk(&b, 2).unwrap().to_vec1().unwrap();
        assert_eq!(pb, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert!(permute_qk(&b, 3).is_err());
    }

    #[test]
    fn llama3_factors_are_recovered() {
        let params = (8.0, 1.0, 4.0, 8192);
        let f: Vec<f32> = llama3_rope_factors(500_000.0, 64, params)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        assert_eq!(f[0], 1.0);
        assert_eq!(*f.last().unwrap(), 8.0);
        let got = llama3_from_freqs(Path::new("x.gguf"), &f, 500_000.0, 64, None).unwrap();
        assert_eq!(got, params);
        let mut bad = f.clone();
        bad[20] *= 1.5;
        assert!(llama3_from_freqs(Path::new("x.gguf"), &bad, 500_000.0, 64, None).is_err());
    }

    #[test]
    fn q8k_dequantises_like_candle() {
        use candle_core::quantized::QTensor;
        let v: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(v, (2, 256), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8K).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(dequantize_q8k(&q.data().unwrap()), want);
    }
}
