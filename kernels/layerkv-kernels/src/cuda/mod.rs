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

/// Entry points the source defines, for engines that load the PTX themselves. Partial attention
/// is named by the page type when K and V share it, by K's then V's type otherwise; the mass
/// pass reads keys only and is named by K's type.
pub const CUDA_ENTRY_POINTS: &[&str] = &[
    "layerkv_attn_partial_f32",
    "layerkv_attn_partial_f16",
    "layerkv_attn_partial_bf16",
    "layerkv_attn_partial_q8_0",
    "layerkv_attn_partial_q4_0",
    "layerkv_attn_partial_q8_0_q4_0",
    "layerkv_attn_partial_q4_0_q8_0",
    "layerkv_attn_partial_f16_q8_0",
    "layerkv_attn_partial_f16_q4_0",
    "layerkv_attn_partial_q8_0_f16",
    "layerkv_attn_partial_q4_0_f16",
    "layerkv_attn_partial_e4m3",
    "layerkv_attn_mass_f32",
    "layerkv_attn_mass_f16",
    "layerkv_attn_mass_bf16",
    "layerkv_attn_mass_q8_0",
    "layerkv_attn_mass_q4_0",
    "layerkv_attn_mass_e4m3",
    "layerkv_attn_reduce",
    "layerkv_scatter_rows_u32",
    "layerkv_scatter_rows_u16",
    "layerkv_scatter_rows_u8",
    "layerkv_copy_u32",
    "layerkv_copy_u16",
    "layerkv_copy_u8",
];

/// The partial-attention entry point for K pages `k` and V pages `v` (`None`: a pairing the
/// kernels do not read, as on the CPU: f32, bf16 and e4m3 pair only with themselves).
pub fn partial_entry(k: crate::KvType, v: crate::KvType) -> Option<String> {
    let name = if k == v {
        k.name().to_string()
    } else {
        format!("{}_{}", k.name(), v.name())
    };
    let entry = format!("layerkv_attn_partial_{name}");
    CUDA_ENTRY_POINTS.contains(&entry.as_str()).then_some(entry)
}

/// The attention-mass entry point for K pages `k`.
pub fn mass_entry(k: crate::KvType) -> String {
    format!("layerkv_attn_mass_{}", k.name())
}
