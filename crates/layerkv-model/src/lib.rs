//! # layerkv-model
//!
//! Llama-family decoders (llama, mistral, qwen2) on candle whose KV cache goes through a `layerkv`
//! policy, the cross-layer block allocator and the paged kernels: loading Hugging Face model
//! directories ([`weights`], [`config`], [`tokenizer`]), GGUF conversion ([`convert`]), GGUF models
//! run in their own quantized types ([`quantized`]), safetensors models quantized at load
//! ([`isq`]), the embedded default model and texts ([`assets`]), the linear layers the forward pass
//! is generic over ([`linear`]), the policy-driven forward pass ([`engine`]), chat templates
//! ([`chat`]), sampling and generation ([`generate`]), the session every client serves requests
//! through ([`session`]), evaluation ([`eval`]), retrieval tasks under a policy ([`needle`]) and
//! the model side of KVSharer calibration ([`calibrate`]).

pub mod assets;
pub mod batch;
pub mod calibrate;
pub mod chat;
pub mod config;
pub mod convert;
pub mod engine;
mod error;
pub mod eval;
pub mod generate;
pub mod heads;
pub mod isq;
mod layer_major;
pub mod linear;
mod model;
pub mod needle;
pub mod quantized;
pub mod rope;
pub mod session;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use engine::kv_lanes;
pub use error::{ModelError, Result};
/// KV page types of [`SessionOptions::kv_dtype`] and [`engine::EngineConfig::kv_dtype`].
pub use layerkv_kernels::{KvType, KvTypes};
pub use linear::Projection;
pub use model::{Layer, Model, ModelParts};
pub use session::{KvMemory, Session, SessionOptions};
