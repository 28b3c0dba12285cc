//! [`Weights`]: the tensors of a Hugging Face model directory (`model.safetensors` or sharded
//! `model-NNNNN-of-NNNNN.safetensors`), converted to one dtype on one device, handed out by name
//! with their shape checked against the config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Named tensors of a model.
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
}

/// The safetensors files of a model directory, in order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(crate::error::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("model-") && n.ends_with(".safetensors") && n.contains("-of-")
            })
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(ModelError::MissingFile(single));
    }
    Ok(shards)
}

impl Weights {
    /// Loads every safetensors file of `dir`, converting floats to `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in safetensors_files(dir)? {
            let bytes = std::fs::read(&file).map_err(crate::error::io(&file))?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
                ModelError::Corrupt {
                    path: file.clone(),
                    what: format!(
                        "not a readable safetensors file (truncated or corrupt?): {}",
                        crate::error::candle_message(&e)
                    ),
                }
            })?;
            for (name, t) in loaded {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                tensors.insert(name, t);
            }
        }
        Ok(Self {
            tensors,
            source: dir.to_path_buf(),
        })
    }

    /// Wraps already loaded tensors (tests, converters).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Self {
            tensors,
            source: source.into(),
        }
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns `name`, checking that its shape is `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                source_file: self.source.clone(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}
