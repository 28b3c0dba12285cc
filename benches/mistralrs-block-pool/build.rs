//! Locates mistralrs-core 0.8.1's `paged_attention/{block_pool,block_hash}.rs` in the cargo
//! registry (downloading the crate source with `cargo info` if it is not there yet) and writes a
//! module file that compiles them unchanged through `#[path]`. Nothing is copied.

use std::path::{Path, PathBuf};
use std::process::Command;

const CRATE: &str = "mistralrs-core-0.8.1";

fn find(registry_src: &Path) -> Option<PathBuf> {
    for index in std::fs::read_dir(registry_src).ok()?.flatten() {
        let dir = index.path().join(CRATE).join("src").join("paged_attention");
        if dir.join("block_pool.rs").exists() && dir.join("block_hash.rs").exists() {
            return Some(dir);
        }
    }
    None
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME must be set");
    let src = cargo_home.join("registry").join("src");
    let dir = find(&src).or_else(|| {
        // `cargo info` downloads and unpacks the crate source into the registry.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["info", "mistralrs-core@0.8.1"])
            .current_dir(std::env::temp_dir())
            .status();
        match status {
            Ok(s) if s.success() => find(&src),
            _ => None,
        }
    });
    let Some(dir) = dir else {
        panic!(
            "mistralrs-core 0.8.1 source not found under {} and `cargo info mistralrs-core@0.8.1` could not fetch it; \
             run that command once with registry access",
            src.display()
        );
    };
    let module = format!(
        "/// mistral.rs's paged-attention block pool (unchanged source from the registry).\n\
         pub mod paged_attention {{\n\
             #[path = {:?}]\n    pub mod block_hash;\n\
             #[path = {:?}]\n    pub mod block_pool;\n\
         }}\n",
        dir.join("block_hash.rs"),
        dir.join("block_pool.rs")
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"))
        .join("mistralrs_block_pool.rs");
    std::fs::write(out, module).expect("write module file");
}
