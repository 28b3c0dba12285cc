//! [`Projection`]: the one thing the decoder asks of its linear layers, so the same layer code
//! runs on candle's dense [`candle_nn::Linear`] (safetensors and GGUF loading here) and on any
//! engine's own, possibly quantized, linears (mistral.rs's `QuantMethod` through
//! `layerkv-mistralrs`) without a second copy of the forward pass.

use std::fmt::Debug;

use candle_core::{Module, Tensor};

/// A linear map `x [rows, in] -> x W^T + b [rows, out]`, returned in `x`'s dtype.
///
/// Implementations may hold their weights quantized; they convert activations themselves.
pub trait Projection: Debug + Send + Sync {
    /// Applies the map to `x [rows, in]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl Projection for candle_nn::Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Module::forward(self, x)
    }
}
