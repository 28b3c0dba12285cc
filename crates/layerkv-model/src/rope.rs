//! Rotary position embeddings (RoPE) at arbitrary per-row positions.
//!
//! Rows of one step belong to different sequences and, for StreamingLLM sinks, to positions
//! that are not their text positions, so the tables are built per call from a list of positions
//! rather than sliced from a precomputed range. Angles are computed in f64 so positions far past
//! the training context (long streams) stay accurate before the cast to the model's dtype.
//! Layout is Hugging Face's (`rotate_half`: dimension i pairs with i + head_dim/2). Building a
//! table is O(rows x head_dim / 2).

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies of one model's rotary embedding.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// The model's frequencies: `theta^(-2i/d)`, adjusted by llama3 scaling when configured.
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim();
        let theta = cfg.rope_theta;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = cfg.rope_scaling
        {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        Self { inv_freq }
    }

    /// `(cos, sin)` tables of shape `[positions.len(), head_dim / 2]`.
    pub fn tables(
        &self,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x` of shape `[rows, heads, head_dim]`, row r at the position of table row r.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rows, heads, d) = x.dims3()?;
        let x4 = x.reshape((1, rows, heads, d))?;
        candle_nn::rotary_emb::rope_thd(&x4.contiguous()?, cos, sin)?.reshape((rows, heads, d))
    }
}

impl layerkv_kernels::KeyRotation for Rope {
    fn rotate_keys(&self, keys: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (cos, sin) = self.tables(positions, keys.dtype(), keys.device())?;
        Rope::apply(keys, &cos, &sin)
    }
}
