//! The CUDA kernels: `paged_attention.cu` (split-K paged attention, the attention-mass pass,
//! the store's scatter and page copy), compiled with NVRTC at first use so the crate builds
//! without a CUDA toolkit.
//!
//! - [`plan`]: host-side flattening of a batch into the kernels' arrays (always built, tested).
//! - `launch` (feature `cuda`): NVRTC, module loading and launches on candle's cudarc.
//! - `candle` (feature `cuda`): glue from candle's `CudaStorage` to `launch`.

#[cfg(feature = "cuda")]
pub(crate) mod candle;
#[cfg(feature = "cuda")]
pub mod launch;
pub mod plan;

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc;

/// CUDA C++ source of the kernels (no includes; NVRTC compiles it as is).
pub const CUDA_SOURCE: &str = include_str!("paged_attention.cu");

/// Entry points the source defines, for engines that load the PTX themselves.
pub const CUDA_ENTRY_POINTS: &[&str] = &[
    "layerkv_attn_partial_f32",
    "layerkv_attn_partial_f16",
    "layerkv_attn_partial_bf16",
    "layerkv_attn_mass_f32",
    "layerkv_attn_mass_f16",
    "layerkv_attn_mass_bf16",
    "layerkv_attn_reduce",
    "layerkv_scatter_rows_u32",
    "layerkv_scatter_rows_u16",
    "layerkv_copy_u32",
    "layerkv_copy_u16",
];
