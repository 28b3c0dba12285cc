//! `--device cpu|cuda[:N]` and `--dtype f32|bf16|f16`: where a command runs the model and in
//! which float type. CUDA is a build-time feature (`cargo build --features cuda`, which needs
//! the CUDA toolkit); a binary built without it says so in one line instead of failing later.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

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
}

/// Parses a dtype name.
pub fn dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => bail!("--dtype {other:?}: unknown dtype (f32, bf16, f16)"),
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
        };
        assert!(args("cpu", "f16").resolve().is_ok());
        let e = args("cpu", "bf16").resolve().unwrap_err().to_string();
        assert!(e.contains("--dtype bf16 on cpu"), "{e}");
        assert!(dtype("f64").is_err());
    }
}
