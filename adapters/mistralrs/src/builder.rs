//! [`LayerKvModelBuilder`]: mistral.rs-style configuration of a model under a layerkv policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::{LayerKvPolicy, Policy};
use layerkv_model::generate::Sampling;
use layerkv_model::KvTypes;
use layerkv_model::{ModelConfig, Session, SessionOptions};
use mistralrs_quant::IsqType;

use crate::error::{AdapterError, Result};
use crate::load::load_model;
use crate::model::LayerKvModel;

/// Builds a [`LayerKvModel`] from a local Hugging Face model directory (llama, mistral or
/// qwen2 safetensors), in the style of `mistralrs::TextModelBuilder`:
///
/// ```no_run
/// use layerkv_mistralrs::{IsqType, LayerKvModelBuilder};
/// let policy = layerkv::Policy::load("calibrated.toml")?;
/// let mut model = LayerKvModelBuilder::new("models/SmolLM2-135M-Instruct")
///     .with_policy(policy)
///     .with_isq(IsqType::Q8_0)
///     .build()?;
/// let reply = model.generate("The KV cache is", |piece| print!("{piece}"))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LayerKvModelBuilder {
    dir: PathBuf,
    policy: Option<Policy>,
    dtype: DType,
    kv_types: Option<KvTypes>,
    device: Device,
    isq: Option<IsqType>,
    max_context: usize,
    max_sequences: usize,
    max_tokens: Option<usize>,
    sampling: Option<Sampling>,
    stop_strings: Vec<String>,
    sliding_window: Option<usize>,
}

impl LayerKvModelBuilder {
    /// A builder for the model directory `dir`: identity policy, f32 on the CPU, no ISQ, a KV
    /// pool for one sequence of 4096 tokens, sampling from `generation_config.json`.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
            policy: None,
            dtype: DType::F32,
            kv_types: None,
            device: Device::Cpu,
            isq: None,
            max_context: 4096,
            max_sequences: 1,
            max_tokens: None,
            sampling: None,
            stop_strings: Vec::new(),
            sliding_window: None,
        }
    }

    /// The layerkv policy (sharing map and retention); it must have the model's layer count.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The policy from a spec, the grammar the `layerkv` CLI takes (`cla:2+stream:4:252`,
    /// `calibrated.toml+snapkv:512`, a policy file; see [`Policy::from_spec`]), parsed for
    /// the model's layer count.
    pub fn with_policy_spec(mut self, spec: &str) -> Result<Self> {
        let layers = ModelConfig::load(&self.dir)?.num_hidden_layers;
        self.policy = Some(Policy::from_spec(spec, layers)?);
        Ok(self)
    }

    /// Activation and KV dtype (f32, bf16 or f16).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// KV page types apart from the activation dtype: llama.cpp's Q8_0 / Q4_0 blocks or MXFP8
    /// e4m3 blocks (`KvType::E4M3`, mistral.rs's `f8e4m3` cache type in blocks; CPU; head_dim a
    /// multiple of 32), or a float type; K and V may differ (`KvTypes::new(KvType::Q8_0,
    /// KvType::Q4_0)`, llama.cpp's `-ctk q8_0 -ctv q4_0`; Q8_0 / Q4_0 rows are stored rotated, as
    /// llama.cpp's are, unless `with_rotation(false)`; e4m3 pairs only with itself).
    pub fn with_kv_types(mut self, kv: impl Into<KvTypes>) -> Self {
        self.kv_types = Some(kv.into());
        self
    }

    /// The device (the CPU unless the crate's `cuda` build gives another).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Quantizes the projections in situ while loading, with mistral.rs's ISQ (e.g. `Q8_0`,
    /// `Q4K`).
    pub fn with_isq(mut self, isq: IsqType) -> Self {
        self.isq = Some(isq);
        self
    }

    /// The longest sequence (prompt and reply) the KV pool is sized for under the policy.
    pub fn with_max_context(mut self, tokens: usize) -> Self {
        self.max_context = tokens;
        self
    }

    /// How many sequences of [`Self::with_max_context`] tokens the KV pool holds at once (for
    /// batched stepping through [`LayerKvModel::engine_mut`]; the convenience calls use one).
    pub fn with_max_sequences(mut self, sequences: usize) -> Self {
        self.max_sequences = sequences;
        self
    }

    /// Most tokens per reply (default: `generation_config.json`'s `max_new_tokens`, else 256).
    pub fn with_max_tokens(mut self, tokens: usize) -> Self {
        self.max_tokens = Some(tokens);
        self
    }

    /// Sampling (default: `generation_config.json`'s, else greedy).
    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = Some(sampling);
        self
    }

    /// Strings that end a reply (cut before them).
    pub fn with_stop_strings(mut self, stops: Vec<String>) -> Self {
        self.stop_strings = stops;
        self
    }

    /// Window of the layers a YOCO-style map marks sliding.
    pub fn with_sliding_window(mut self, window: usize) -> Self {
        self.sliding_window = Some(window);
        self
    }

    /// Loads the weights through mistral.rs (quantizing them if asked), the tokenizer and the
    /// generation defaults, and sizes the KV pool for [`Self::with_max_context`] tokens.
    pub fn build(self) -> Result<LayerKvModel> {
        let dir = self.dir;
        let cfg = ModelConfig::load(&dir)?;
        let layers = cfg.num_hidden_layers;
        let policy = match self.policy {
            Some(p) => p,
            None => Policy::identity(layers)?,
        };
        if policy.layer_map().num_layers() != layers {
            return Err(AdapterError::Policy(layerkv::Error::WrongLayerCount {
                what: "policy for this model (config.json num_hidden_layers)",
                expected: layers,
                actual: policy.layer_map().num_layers(),
            }));
        }
        if self.max_context == 0 || self.max_sequences == 0 {
            return Err(AdapterError::Request(
                "with_max_context and with_max_sequences must be positive".into(),
            ));
        }
        let kv_dtype = match self.kv_types {
            Some(kv) => kv,
            None => KvTypes::float(self.dtype).ok_or_else(|| {
                AdapterError::Request(format!(
                    "with_dtype({:?}): the dtype must be f32, f16 or bf16",
                    self.dtype
                ))
            })?,
        };
        let model = Arc::new(load_model(&dir, cfg, self.dtype, &self.device, self.isq)?);
        let options = SessionOptions {
            max_context: self.max_context,
            max_sequences: self.max_sequences,
            kv_dtype,
            sliding_window: self.sliding_window,
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            stop_strings: self.stop_strings,
            ..SessionOptions::default()
        };
        let session = Session::new(&dir, model, policy, options)?;
        Ok(LayerKvModel {
            session,
            isq: self.isq,
            last_memory: None,
        })
    }
}
