//! `--device cpu|cuda[:N]`, `--dtype f32|bf16|f16`, `--weights quantized|f32|TYPE` and
//! `--kv-dtype`: where a command runs the model, in which float type, whether a GGUF runs in
//! its own quantized types or converted to a dense model directory, and the KV pages' type
//! ([`DeviceArgs::load_model`]). CUDA is a build-time feature (`cargo build --features cuda`,
//! which needs the CUDA toolkit); a binary built without it says so in one line instead of
//! failing later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use layerkv_model::{assets, isq, quantized, KvType, KvTypes, Model};

/// The KV page types `--kv-dtype` and a policy's `@TYPES` accept, for their errors.
const KV_TYPES: &str =
    "f32, f16, bf16, q8_0, q4_0, e4m3 (MXFP8 blocks), or K,V such as q8_0,q4_0; `:plain` after it \
     for unrotated integer blocks";

/// A policy spec of `eval` or `needle` with an optional `@TYPES` suffix giving that policy its
/// own KV page types (`identity@q8_0`, `identity+snapkv:256+adakv@q8_0,q4_0`), so one run
/// compares page types at the same baseline; without one, `default` (the command's
/// `--kv-dtype`). A spec that names an existing file is taken whole.
pub fn policy_page_types(spec: &str, default: KvTypes) -> Result<(&str, KvTypes)> {
    if Path::new(spec).is_file() {
        return Ok((spec, default));
    }
    let Some((policy, types)) = spec.rsplit_once('@') else {
        return Ok((spec, default));
    };
    let kv = KvTypes::parse(types.trim()).with_context(|| {
        format!("policy {spec:?}: unknown KV page types {types:?} after '@' ({KV_TYPES})")
    })?;
    Ok((policy, kv))
}

/// The device and dtype flags of the commands that run a model.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a binary built with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights, activations and KV storage dtype: f32, f16 or bf16 (bf16 on cuda only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// How the weights run: `quantized` (a GGUF `--model` in its own tensor types, f32
    /// activations, about the file's size in memory; model directories run dense), `f32` (a
    /// GGUF converted once to a dense model directory, where `--dtype` applies), or a type to
    /// quantize any model to at load: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k
    /// (llama.cpp's fallbacks where rows are not whole 256-blocks; the LM head at Q6_K or Q8_0).
    #[arg(long, default_value = "quantized")]
    pub weights: String,
    /// KV page type: `auto` (f16 when the weights run quantized, as llama.cpp's default cache
    /// type; else `--dtype`), f32, f16, bf16, llama.cpp's block types q8_0 (8.5 bits per
    /// value) and q4_0 (4.5 bits), or e4m3 (the 8-bit float of fp8 caches, in MXFP8 blocks:
    /// 8.25 bits); `K,V` gives keys and values their own types (llama.cpp's `-ctk`/`-ctv`,
    /// e.g. `q8_0,q4_0`; e4m3 pairs only with itself). q8_0 and q4_0 rows are stored rotated
    /// by a Walsh-Hadamard transform, as llama.cpp's quantized caches are (`:plain` after the
    /// type stores them as they are, e.g. `q4_0:plain`). The attention kernels read every type
    /// in place, so a smaller type also cuts the KV bytes each decode step reads.
    #[arg(long, default_value = "auto")]
    pub kv_dtype: String,
}

/// How a GGUF file's weights run (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// In the file's own tensor types ([`quantized::load_gguf`]).
    Quantized,
    /// Converted once to a dense model directory.
    Dense,
    /// Quantized at load to this type ([`isq::load_isq`]).
    Isq(GgmlDType),
}

/// Parses a `--weights` value.
pub fn weights(name: &str) -> Result<Weights> {
    match name {
        "quantized" => Ok(Weights::Quantized),
        "f32" | "dense" => Ok(Weights::Dense),
        other => match isq::isq_type(other) {
            Some(ty) => Ok(Weights::Isq(ty)),
            None => bail!(
                "--weights {other:?}: unknown (quantized, f32, {})",
                isq::ISQ_TYPES.map(|(n, _)| n).join(", ")
            ),
        },
    }
}

impl DeviceArgs {
    /// The parsed device and dtype.
    pub fn resolve(&self) -> Result<(Device, DType)> {
        let dtype = dtype(&self.dtype)?;
        let device = device(&self.device)?;
        if device.is_cpu() && dtype == DType::BF16 {
            bail!(
                "--dtype bf16 on cpu: candle's CPU matmul has no bf16; use f16 or f32 on cpu \
                 (bf16 runs on cuda)"
            );
        }
        Ok((device, dtype))
    }

    /// The model directory of `model` and the model loaded from it: a GGUF file under
    /// `--weights quantized` loads in its own types (the directory then holds its config and
    /// tokenizer only); any other path is resolved (a GGUF converted once) and loaded dense in
    /// `--dtype`; none is the embedded default, fetched on first use. Returns the directory,
    /// the model and the KV page types (`--kv-dtype`).
    pub fn load_model(&self, model: Option<&Path>) -> Result<(PathBuf, Arc<Model>, KvTypes)> {
        let (dir, model, dtype) = self.load_weights(model)?;
        let kv = match self.kv_dtype.as_str() {
            "auto" if model.is_quantized() => KvTypes::both(KvType::F16),
            "auto" => KvTypes::float(dtype).context("--kv-dtype auto: no float type")?,
            spec => KvTypes::parse(spec)
                .with_context(|| format!("--kv-dtype {spec:?}: unknown (auto, {KV_TYPES})"))?,
        };
        Ok((dir, model, kv))
    }

    /// [`Self::load_model`] returning the activation dtype instead of the KV dtype.
    fn load_weights(&self, model: Option<&Path>) -> Result<(PathBuf, Arc<Model>, DType)> {
        let (device, dtype) = self.resolve()?;
        let mode = weights(&self.weights)?;
        // A directory that keeps a GGUF's quantized tensors (`convert --dtype quantized`).
        if let Some(gguf) = model.and_then(assets::quantized_model_file) {
            let dir = model.map(Path::to_path_buf).unwrap_or_default();
            if mode == Weights::Quantized {
                if dtype != DType::F32 {
                    bail!(
                        "--dtype {} with a quantized model directory: quantized weights take \
                         f32 activations; pass --weights f32 to run it converted in {}",
                        self.dtype,
                        self.dtype
                    );
                }
                let q = quantized::load_gguf(&gguf, &device)
                    .with_context(|| format!("loading {} quantized", gguf.display()))?;
                return Ok((dir, Arc::new(q.model), DType::F32));
            }
            return self.load_weights(Some(&gguf));
        }
        if let Some(path) = model {
            if mode == Weights::Quantized && assets::is_gguf_file(path)? {
                if dtype != DType::F32 {
                    bail!(
                        "--dtype {} with a GGUF run quantized: quantized weights take f32 \
                         activations; pass --weights f32 to run the GGUF converted in {}",
                        self.dtype,
                        self.dtype
                    );
                }
                let dir = assets::gguf_metadata_dir(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let q = quantized::load_gguf(path, &device)
                    .with_context(|| format!("loading {} quantized", path.display()))?;
                return Ok((dir, Arc::new(q.model), DType::F32));
            }
        }
        let dir = match model {
            Some(d) => assets::resolve_model(d)?,
            None => assets::ensure_default_model().context("fetching the default model")?,
        };
        if let Weights::Isq(ty) = mode {
            if dtype != DType::F32 {
                bail!(
                    "--dtype {} with --weights {}: quantized weights take f32 activations",
                    self.dtype,
                    self.weights
                );
            }
            let q = isq::load_isq(&dir, ty, &device)
                .with_context(|| format!("quantizing {} to {ty:?} at load", dir.display()))?;
            eprintln!("quantized at load: {}", q.report.summary());
            return Ok((dir, Arc::new(q.model), DType::F32));
        }
        let m = Model::load(&dir, dtype, &device)
            .with_context(|| format!("loading {}", dir.display()))?;
        Ok((dir, Arc::new(m), dtype))
    }
}

/// Parses a dtype name (`--dtype`).
pub fn dtype(name: &str) -> Result<DType> {
    dtype_named(name, "--dtype")
}

/// Parses a dtype name given to `flag`.
fn dtype_named(name: &str, flag: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => bail!("{flag} {other:?}: unknown dtype (f32, bf16, f16)"),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens that device.
pub fn device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .with_context(|| format!("--device {spec:?}: {n:?} is not a GPU number"))?,
            None => bail!("--device {spec:?}: unknown device (cpu, cuda, cuda:N)"),
        },
    };
    open_cuda(spec, ordinal)
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .with_context(|| format!("--device {spec}: cannot open CUDA device {ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device> {
    bail!(
        "--device {spec}: this layerkv was built without CUDA; rebuild with \
         `cargo build --release -p layerkv-cli --features cuda` (needs the CUDA toolkit)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse() {
        assert!(device("cpu").unwrap().is_cpu());
        assert!(device("tpu")
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda, cuda:N"));
        assert!(device("cuda:x")
            .unwrap_err()
            .to_string()
            .contains("not a GPU number"));
        #[cfg(not(feature = "cuda"))]
        assert!(device("cuda:1")
            .unwrap_err()
            .to_string()
            .contains("built without CUDA"));
        assert_eq!(dtype("bf16").unwrap(), DType::BF16);
        let args = |device: &str, dtype: &str| DeviceArgs {
            device: device.into(),
            dtype: dtype.into(),
            weights: "quantized".into(),
            kv_dtype: "auto".into(),
        };
        assert_eq!(weights("f32").unwrap(), Weights::Dense);
        assert!(weights("q4")
            .unwrap_err()
            .to_string()
            .contains("quantized, f32, q4_0"));
        assert_eq!(weights("Q4_K").unwrap(), Weights::Isq(GgmlDType::Q4K));
        assert!(args("cpu", "f16").resolve().is_ok());
        let e = args("cpu", "bf16").resolve().unwrap_err().to_string();
        assert!(e.contains("--dtype bf16 on cpu"), "{e}");
        assert!(dtype("f64").is_err());
    }
}
