//! Device side of the CUDA kernels, on cudarc alone: NVRTC compilation (once per process),
//! module loading (once per CUDA context), uploads and launches. The candle glue (`candle.rs`)
//! hands in views of candle's own buffers, so nothing is copied between candle and the kernels.

use std::sync::{Arc, Mutex, OnceLock};

use super::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use super::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use super::plan::{LaunchParams, LaunchPlan, THREADS};
use crate::error::{KernelError, Result};
use crate::{KvType, KvTypes};

// SAFETY: `LaunchParams` is `repr(C)` with only i32/f32 fields, the layout of `struct Params`
// in `paged_attention.cu`.
unsafe impl DeviceRepr for LaunchParams {}

/// The scatter/copy kernel for storage units of `T`: f32 (4 bytes), f16/bf16 (2), block bytes.
fn unit_index<T>() -> Result<usize> {
    match std::mem::size_of::<T>() {
        4 => Ok(0),
        2 => Ok(1),
        1 => Ok(2),
        n => Err(KernelError::Invalid(format!(
            "no CUDA copy kernel for {n}-byte page units"
        ))),
    }
}

/// The loaded kernels of one device.
struct Kernels {
    /// Partial attention per (K type, V type) the source instantiates.
    partial: Vec<((KvType, KvType), CudaFunction)>,
    /// The mass pass per K type.
    mass: Vec<(KvType, CudaFunction)>,
    reduce: CudaFunction,
    /// Row scatter for 4-, 2- and 1-byte units.
    scatter: [CudaFunction; 3],
    /// Page copy for 4-, 2- and 1-byte units.
    copy: [CudaFunction; 3],
}

fn device_err(what: &str) -> impl FnOnce(super::cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Invalid(format!("CUDA {what}: {e:?}"))
}

/// PTX of `paged_attention.cu`, compiled by NVRTC on first use.
fn ptx() -> Result<String> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = CompileOptions {
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        compile_ptx_with_opts(super::CUDA_SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .clone()
    .map_err(|e| KernelError::Invalid(format!("NVRTC failed to compile the kernels: {e}")))
}

/// The kernels of `stream`'s CUDA context, loaded once per context (candle uses each device's
/// primary context; a caller with another context on the same device gets its own module,
/// since functions are only valid in the context that loaded them).
fn kernels(stream: &Arc<CudaStream>) -> Result<Arc<Kernels>> {
    static LOADED: Mutex<Vec<(usize, Arc<Kernels>)>> = Mutex::new(Vec::new());
    let ctx = stream.context();
    let key = ctx.cu_ctx() as usize;
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(c, _)| *c == key) {
        return Ok(k.clone());
    }
    let module = ctx
        .load_module(Ptx::from_src(ptx()?))
        .map_err(device_err("module load"))?;
    let f = |name: &str| {
        module
            .load_function(name)
            .map_err(device_err("function load"))
    };
    let mut partial = Vec::new();
    for k in KvType::ALL {
        for v in KvType::ALL {
            if let Some(name) = super::partial_entry(k, v) {
                partial.push(((k, v), f(&name)?));
            }
        }
    }
    let mass = KvType::ALL
        .into_iter()
        .map(|k| Ok((k, f(&super::mass_entry(k))?)))
        .collect::<Result<Vec<_>>>()?;
    let k = Arc::new(Kernels {
        partial,
        mass,
        reduce: f("layerkv_attn_reduce")?,
        scatter: [
            f("layerkv_scatter_rows_u32")?,
            f("layerkv_scatter_rows_u16")?,
            f("layerkv_scatter_rows_u8")?,
        ],
        copy: [
            f("layerkv_copy_u32")?,
            f("layerkv_copy_u16")?,
            f("layerkv_copy_u8")?,
        ],
    });
    loaded.push((key, k.clone()));
    Ok(k)
}

/// Runs paged attention: `q` is `[total_q, heads, head_dim]` f32 (rotated by the caller where
/// the store keeps key rows rotated), `k`/`v` the store's pages of `types` (storage units:
/// f32, u16 for f16/bf16, bytes for blocks). Returns the f32 output (rotated where value rows
/// are); adds the per-slot attention mass into `mass` when given.
pub fn attention<K, V>(
    stream: &Arc<CudaStream>,
    types: KvTypes,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, K>,
    v: &CudaView<'_, V>,
    plan: &LaunchPlan,
    mass: Option<&mut [f32]>,
) -> Result<CudaSlice<f32>> {
    let kern = kernels(stream)?;
    let unsupported = || crate::cpu::pair_error(types);
    let partial = kern
        .partial
        .iter()
        .find(|(kv, _)| *kv == (types.k, types.v))
        .map(|(_, f)| f)
        .ok_or_else(unsupported)?;
    let mass_fn = kern
        .mass
        .iter()
        .find(|(t, _)| *t == types.k)
        .map(|(_, f)| f)
        .ok_or_else(unsupported)?;
    let p: LaunchParams = plan.params;
    let (total_q, heads, d) = (p.total_q as usize, p.heads as usize, p.head_dim as usize);
    let splits = p.num_splits as usize;
    let row_seq = stream
        .clone_htod(&plan.row_seq)
        .map_err(device_err("upload"))?;
    let seq_info = stream
        .clone_htod(&plan.seq_info)
        .map_err(device_err("upload"))?;
    let pages = stream
        .clone_htod(&plan.pages)
        .map_err(device_err("upload"))?;
    let valid = stream
        .clone_htod(&plan.valid)
        .map_err(device_err("upload"))?;
    if total_q == 0 {
        return stream.alloc_zeros::<f32>(1).map_err(device_err("alloc"));
    }
    // The kernels write every element of these (each attention block its whole partial, the
    // merge every row and head), so they are not cleared first.
    let alloc = |n: usize| {
        // SAFETY: f32 has no invalid bit patterns, and every element is written by the
        // kernels below before anything reads it.
        unsafe { stream.alloc::<f32>(n.max(1)) }.map_err(device_err("alloc"))
    };
    let mut part_out = alloc(splits * total_q * heads * d)?;
    let mut part_m = alloc(splits * total_q * heads)?;
    let mut part_l = alloc(splits * total_q * heads)?;
    let mut out = alloc(total_q * heads * d)?;
    let mut row_m = alloc(total_q * heads)?;
    let mut row_l = alloc(total_q * heads)?;
    let blocks = (p.total_q as u32, p.kv_heads as u32, p.num_splits as u32);
    let attn_cfg = LaunchConfig {
        grid_dim: blocks,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: plan.shared_bytes,
    };
    let mut b = stream.launch_builder(partial);
    b.arg(&p)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&row_seq)
        .arg(&seq_info)
        .arg(&pages)
        .arg(&valid)
        .arg(&mut part_out)
        .arg(&mut part_m)
        .arg(&mut part_l);
    // SAFETY: argument order and types match `layerkv_attn_partial_*` of `types` (found above); every buffer is sized
    // from the plan the kernel indexes with (validated sequences, splits x rows x heads x d).
    unsafe { b.launch(attn_cfg) }.map_err(device_err("launch partial"))?;
    let reduce_cfg = LaunchConfig {
        grid_dim: (p.total_q as u32, p.heads as u32, 1),
        block_dim: ((d as u32).div_ceil(32).clamp(1, 4) * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&kern.reduce);
    b.arg(&p)
        .arg(&part_out)
        .arg(&part_m)
        .arg(&part_l)
        .arg(&mut out)
        .arg(&mut row_m)
        .arg(&mut row_l);
    // SAFETY: matches `layerkv_attn_reduce`; buffers sized as above.
    unsafe { b.launch(reduce_cfg) }.map_err(device_err("launch reduce"))?;
    if let Some(mass) = mass {
        // Accumulated with atomics: starts at zero.
        let mut dev_mass = stream
            .alloc_zeros::<f32>(plan.mass_len.max(1))
            .map_err(device_err("alloc"))?;
        let mut b = stream.launch_builder(mass_fn);
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(&row_seq)
            .arg(&seq_info)
            .arg(&pages)
            .arg(&valid)
            .arg(&row_m)
            .arg(&row_l)
            .arg(&mut dev_mass);
        // SAFETY: matches `layerkv_attn_mass_*`; `dev_mass` has one entry per sequence slot.
        unsafe { b.launch(attn_cfg) }.map_err(device_err("launch mass"))?;
        let host = stream
            .clone_dtoh(&dev_mass)
            .map_err(device_err("download"))?;
        for (m, h) in mass.iter_mut().zip(&host) {
            *m += h;
        }
    }
    Ok(out)
}

/// `KvStore::write` on the device: row `rows[i]` of `dst` (rows of `row` storage units: f32,
/// f16/bf16 bits, or block bytes) = row i of `src`.
pub fn scatter_rows<T>(
    stream: &Arc<CudaStream>,
    dst: &mut CudaViewMut<'_, T>,
    src: &CudaView<'_, T>,
    rows: &[u32],
    row: usize,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let kern = kernels(stream)?;
    let dev_rows = stream.clone_htod(rows).map_err(device_err("upload"))?;
    let row = i32::try_from(row).map_err(|_| KernelError::Invalid("row too long".into()))?;
    let cfg = LaunchConfig {
        grid_dim: (rows.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&kern.scatter[unit_index::<T>()?]);
    b.arg(dst).arg(src).arg(&dev_rows).arg(&row);
    // SAFETY: matches `layerkv_scatter_rows_u{32,16,8}` (the kernel of `T`'s unit size: f32,
    // f16/bf16, block bytes); the caller checked every row index against the store.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(device_err("launch scatter"))
}

/// `KvStore::copy_page` on the device: storage units `src..src + n` onto `dst..dst + n`.
pub fn copy_within<T>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaViewMut<'_, T>,
    src: usize,
    dst: usize,
    n: usize,
) -> Result<()> {
    let kern = kernels(stream)?;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).clamp(1, 1024), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (src, dst, n) = (src as u64, dst as u64, n as u64);
    let mut b = stream.launch_builder(&kern.copy[unit_index::<T>()?]);
    b.arg(buf).arg(&src).arg(&dst).arg(&n);
    // SAFETY: matches `layerkv_copy_u{32,16,8}` of `T`'s unit size; the caller checked both pages against the store.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(device_err("launch copy"))
}
