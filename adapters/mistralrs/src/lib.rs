//! # layerkv-mistralrs
//!
//! Runs mistral.rs models under a layerkv policy. mistral.rs 0.8.1 does not let an outside
//! crate replace its KV cache (its model, cache and sequence types are private), so the adapter
//! splits the work at the one seam it offers: **weights and quantization are mistral.rs's**
//! (its sharded safetensors var builder, its `QuantMethod` linears, its in-situ quantization
//! with the same predicates as `TextModelBuilder::with_isq`), **attention and the KV cache are
//! layerkv's** (the policy, the cross-layer block allocator, retention, the paged kernels).
//! The forward pass is `layerkv-model`'s, generic over [`layerkv_model::Projection`], which
//! mistral.rs's linears implement here: there is no second copy of the llama/qwen2/mistral
//! layer code.
//!
//! ```no_run
//! use layerkv::{LayerKvPolicy, PolicyBuilder, Retention};
//! use layerkv_mistralrs::{IsqType, LayerKvModelBuilder, Message};
//!
//! // A calibrated sharing map, stacked with sinks + a recent window on the layers that own KV.
//! let file = layerkv::Policy::load("calibrated.toml")?;
//! let policy = PolicyBuilder::new(file.layer_map().clone())
//!     .retention(Retention::SinkWindow { sinks: 4, window: 252 })
//!     .build()?;
//! let mut model = LayerKvModelBuilder::new("SmolLM2-135M-Instruct")
//!     .with_policy(policy)
//!     .with_isq(IsqType::Q8_0)
//!     .build()?;
//! let reply = model.chat(&[Message::new("user", "What is a KV cache?")], |t| print!("{t}"))?;
//! let mem = model.last_memory().unwrap();
//! println!("\n{} tokens, KV {} bytes ({:.0}% of identity)", mem.tokens, mem.held_bytes,
//!          100.0 * mem.ratio());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `UPSTREAM.md` (next to this crate's manifest) proposes the hook that would let mistral.rs
//! run layerkv policies inside its own scheduler, with a patch against mistralrs-core 0.8.1.

mod builder;
mod error;
pub mod load;
mod model;

pub use builder::LayerKvModelBuilder;
pub use error::{AdapterError, Result};
pub use layerkv_model::chat::Message;
pub use layerkv_model::generate::{Completion, Sampling, StopReason};
pub use mistralrs_quant::IsqType;
pub use model::{KvMemory, LayerKvModel};

/// README's Rust snippets, compiled (and, where they need no model file, run) as doctests so
/// they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
