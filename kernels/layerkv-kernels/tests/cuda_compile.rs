//! The CUDA kernels compile, without a GPU: NVRTC (the same compiler the `cuda` feature uses at
//! run time) turns `CUDA_SOURCE` into PTX for Ampere and Hopper, every entry point is present,
//! and `ptxas` assembles the PTX for sm_80 and sm_90 without register spills.
//!
//! The tools come from PyPI (`nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-nvcc`); README's test
//! command installs them (`scripts/cuda-tools`) and points `LAYERKV_NVRTC` / `LAYERKV_PTXAS` at
//! them. A missing tool
//! fails these tests (with the install command) instead of skipping them. That the kernels
//! compute the right numbers is only checked on a GPU (`--features cuda`).

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;
use std::process::Command;

use layerkv_kernels::cuda::{CUDA_ENTRY_POINTS, CUDA_SOURCE};

type Program = *mut std::ffi::c_void;

fn tool(var: &str, relative: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let home = std::env::var("LAYERKV_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/layerkv")
        });
    let p = home.join("cuda-13.5").join(relative);
    assert!(
        p.exists(),
        "{} not found: set {var} or run `source scripts/cuda-tools` (README's test command does \
         this)",
        p.display(),
    );
    p
}

/// NVRTC through its C API, loaded at run time.
struct Nvrtc {
    lib: libloading::Library,
}

impl Nvrtc {
    fn load() -> Self {
        let path = tool("LAYERKV_NVRTC", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        // SAFETY: loading NVRTC runs no initialisation code with preconditions.
        let lib = unsafe { libloading::Library::new(&path) }
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        Self { lib }
    }

    /// Compiles `src`; Ok(PTX) or Err(log).
    fn compile(&self, src: &str, arch: &str) -> Result<String, String> {
        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> c_int;
        type Get = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut Program) -> c_int;
        // SAFETY: the symbols have these signatures in NVRTC 12 (nvrtc.h); every buffer passed
        // is sized by the matching *Size call; the program is destroyed once.
        unsafe {
            let create: libloading::Symbol<Create> = self.lib.get(b"nvrtcCreateProgram").unwrap();
            let compile: libloading::Symbol<Compile> =
                self.lib.get(b"nvrtcCompileProgram").unwrap();
            let log_size: libloading::Symbol<Size> =
                self.lib.get(b"nvrtcGetProgramLogSize").unwrap();
            let get_log: libloading::Symbol<Get> = self.lib.get(b"nvrtcGetProgramLog").unwrap();
            let ptx_size: libloading::Symbol<Size> = self.lib.get(b"nvrtcGetPTXSize").unwrap();
            let get_ptx: libloading::Symbol<Get> = self.lib.get(b"nvrtcGetPTX").unwrap();
            let destroy: libloading::Symbol<Destroy> =
                self.lib.get(b"nvrtcDestroyProgram").unwrap();
            let src = CString::new(src).unwrap();
            let name = CString::new("paged_attention.cu").unwrap();
            let mut prog: Program = std::ptr::null_mut();
            let rc = create(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(rc, 0, "nvrtcCreateProgram failed");
            let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
                .map(|o| CString::new(o).unwrap());
            let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
            let rc = compile(prog, ptrs.len() as c_int, ptrs.as_ptr());
            let mut n = 0usize;
            log_size(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            get_log(prog, log.as_mut_ptr().cast());
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let out = if rc == 0 {
                ptx_size(prog, &mut n);
                let mut ptx = vec![0u8; n.max(1)];
                get_ptx(prog, ptx.as_mut_ptr().cast());
                Ok(CStr::from_bytes_until_nul(&ptx)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned())
            } else {
                Err(log)
            };
            destroy(&mut prog);
            out
        }
    }
}

#[test]
fn kernels_compile_for_ampere_and_hopper_with_every_entry_point() {
    let nvrtc = Nvrtc::load();
    for arch in ["compute_80", "compute_90"] {
        let ptx = nvrtc
            .compile(CUDA_SOURCE, arch)
            .unwrap_or_else(|log| panic!("NVRTC ({arch}) rejected the kernels:\n{log}"));
        for entry in CUDA_ENTRY_POINTS {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{arch}: PTX lacks entry point {entry}"
            );
        }
        let defined = ptx.matches(".visible .entry").count();
        assert_eq!(
            defined,
            CUDA_ENTRY_POINTS.len(),
            "{arch}: unlisted entry points"
        );
    }
}

#[test]
fn nvrtc_reports_errors_with_their_line() {
    let nvrtc = Nvrtc::load();
    let broken = CUDA_SOURCE.replace("float acc = 0.f;", "float acc = undefined_name;");
    let log = nvrtc
        .compile(&broken, "compute_80")
        .expect_err("a source with an undefined name must not compile");
    assert!(log.contains("undefined_name"), "log: {log}");
}

#[test]
fn ptx_assembles_for_sm80_and_sm90_without_spills() {
    let nvrtc = Nvrtc::load();
    let ptxas = tool("LAYERKV_PTXAS", "nvidia/cu13/bin/ptxas");
    let dir = std::env::temp_dir().join(format!("layerkv-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (virt, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        let ptx = nvrtc.compile(CUDA_SOURCE, virt).expect("compiles");
        let src = dir.join(format!("{sm}.ptx"));
        std::fs::write(&src, ptx).unwrap();
        let out = Command::new(&ptxas)
            .arg(format!("-arch={sm}"))
            .arg("-v")
            .arg(&src)
            .arg("-o")
            .arg(dir.join(format!("{sm}.cubin")))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
        let report = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas {sm} failed:\n{report}");
        let functions = report.matches("Compiling entry function").count();
        assert_eq!(functions, CUDA_ENTRY_POINTS.len(), "{sm}:\n{report}");
        for line in report.lines().filter(|l| l.contains("spill stores")) {
            assert!(
                line.contains("0 bytes spill stores, 0 bytes spill loads"),
                "{sm}: register spills: {line}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
