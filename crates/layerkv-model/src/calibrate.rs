//! [`EngineCalibrator`]: the model side of KVSharer calibration
//! ([`layerkv::calibrate::CalibrationModel`]) for a loaded [`Model`].
//!
//! - Reference K/V: a plain causal dense forward written with the [`Model`] pieces (one sample
//!   at a time, the same attention the engine computes, no cache), keeping each layer's K after
//!   RoPE (what Hugging Face's `past_key_values` hold, which the authors' code compares) and V,
//!   averaged element-wise over the samples as `[kv_heads, seq, head_dim]` f32.
//! - Candidate runs go through [`Engine`], the path users run: one engine per map, one fresh
//!   sequence per sample, all of its tokens in one step. The one function that drives the engine
//!   is [`engine_logits`].
//! - Final hidden states: the engine returns logits only, so the calibrator recovers the hidden
//!   states from them. The LM head is linear (`logits = u W^T`, `u` = the final norm's output),
//!   so probing [`Model::logits`] with `sqrt(hidden) x` one-hot rows gives `P = c diag(g) W^T`
//!   (`g` the final norm's gain, `c = sqrt(hidden / (1 + eps))`), and least squares against
//!   `P` (normal equations, Cholesky in f64) returns `y = u / g` exactly up to rounding. When the
//!   embeddings are tied (`W` = the embedding matrix, checked numerically) `g` follows from `P`
//!   and the vectors are `u` itself ([`HiddenReadout::Exact`]); otherwise `y`, the final norm's
//!   output before its per-channel gain ([`HiddenReadout::Normalized`]). Should `P P^T` not be
//!   positive definite (vocabulary smaller than the hidden size), the stopgap is the log-softmax
//!   rows centred per row ([`HiddenReadout::CenteredLogProbs`]).
//!
//! Cost: the readout is built once (one `[hidden, hidden]` forward of the LM head, the f64
//! Gram matrix `P P^T`, an `O(hidden^3)` Cholesky inverse); per run, the engine's forward of
//! every sample plus `[tokens, vocab] x [vocab, hidden]` and `[tokens, hidden] x [hidden,
//! hidden]` products.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use layerkv::calibrate::{CalibrationModel, LayerKv, RunOutput};
use layerkv::{LayerMap, PolicyBuilder, SeqId};

use crate::engine::{Engine, EngineConfig, LogitsRows};
use crate::error::{ModelError, Result};
use crate::eval::token_nll;
use crate::model::Model;
use crate::rope::Rope;

/// What the calibrator's "final hidden states" are (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenReadout {
    /// The final norm's output, recovered exactly from the logits (tied embeddings).
    Exact,
    /// The final norm's output divided by its per-channel gain (untied LM head).
    Normalized,
    /// Stopgap: log-softmax rows centred per row (the readout could not be inverted).
    CenteredLogProbs,
}

/// The least-squares readout of hidden states from logits.
#[derive(Debug)]
struct Readout {
    kind: HiddenReadout,
    /// `P`, `[hidden, vocab]` f32, on the model's device.
    probe: Tensor,
    /// `(P P^T)^-1 diag(scale)`, `[hidden, hidden]` f64: logits `L` give hidden states
    /// `(L P^T) inv`, with `scale` = `c` (times `g` when known) folded in.
    inv: Tensor,
}

/// Runs a [`Model`] for calibration: reference K/V from a dense forward, candidate maps through
/// the [`Engine`].
#[derive(Debug)]
pub struct EngineCalibrator {
    model: Arc<Model>,
    config: EngineConfig,
    readout: Option<Readout>,
}

impl EngineCalibrator {
    /// A calibrator for `model`, running candidates with engines of `config`.
    pub fn new(model: Arc<Model>, config: EngineConfig) -> Self {
        Self {
            model,
            config,
            readout: None,
        }
    }

    /// How hidden states are read out (`None` before the first run).
    pub fn readout(&self) -> Option<HiddenReadout> {
        self.readout.as_ref().map(|r| r.kind)
    }

    /// Per layer, K after RoPE and V of one sample, `[kv_heads, seq, head_dim]` f32, and the last
    /// layer's output `[seq, hidden]` (before the final norm).
    fn dense_forward(&self, tokens: &[u32]) -> Result<(Vec<(Tensor, Tensor)>, Tensor)> {
        let m = &self.model;
        let cfg = m.config();
        let (t, heads, kv_heads, d) = (
            tokens.len(),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = m.rope().tables(&positions, m.dtype(), m.device())?;
        let mask = causal_mask(t, cfg.sliding_window, m.device())?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut x = m.embed(tokens)?;
        let mut kv = Vec::with_capacity(m.num_layers());
        for layer in 0..m.num_layers() {
            let (normed, q) = m.attn_input(layer, &x)?;
            let q = Rope::apply(&q, &cos, &sin)?;
            let (k, v) = m.kv(layer, &normed)?;
            let k = Rope::apply(&k, &cos, &sin)?;
            // [seq, heads, d] -> [heads, seq, d] in f32.
            let qh = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
            let kh = k.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
            let vh = v.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
            let rep = heads / kv_heads;
            let expand = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(1)?
                    .expand((kv_heads, rep, t, d))?
                    .reshape((heads, t, d))?)
            };
            let (kr, vr) = (expand(&kh)?, expand(&vh)?);
            let scores = (qh.matmul(&kr.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs
                .matmul(&vr)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(m.dtype())?;
            x = m.attn_output_and_mlp(layer, &x, &out)?;
            kv.push((kh, vh));
        }
        Ok((kv, x))
    }

    /// Builds the readout on first use.
    fn ensure_readout(&mut self) -> Result<&Readout> {
        if self.readout.is_none() {
            self.readout = Some(build_readout(&self.model)?);
        }
        Ok(self.readout.as_ref().expect("just built"))
    }

    /// Hidden-state vector of one sample's logits `[seq, vocab]`, flattened.
    fn hidden_of(&mut self, logits: &Tensor) -> Result<Vec<f32>> {
        let r = self.ensure_readout()?;
        if r.kind == HiddenReadout::CenteredLogProbs {
            let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
            let centred = logp.broadcast_sub(&logp.mean_keepdim(D::Minus1)?)?;
            return Ok(centred.flatten_all()?.to_vec1::<f32>()?);
        }
        let b = logits.matmul(&r.probe.t()?)?.to_dtype(DType::F64)?;
        let h = b.matmul(&r.inv)?.to_dtype(DType::F32)?;
        Ok(h.flatten_all()?.to_vec1::<f32>()?)
    }

    fn reference(&self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
        let cfg = self.model.config();
        let (kv_heads, d) = (cfg.num_key_value_heads, cfg.head_dim());
        let seq = samples.first().map_or(0, Vec::len);
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
        for (s, sample) in samples.iter().enumerate() {
            if sample.len() != seq {
                return Err(ModelError::Config(format!(
                    "calibration sample {s} has {} tokens, sample 0 has {seq}",
                    sample.len()
                )));
            }
            let (kv, _) = self.dense_forward(sample)?;
            if sums.is_empty() {
                let len = kv_heads * seq * d;
                sums = vec![(vec![0.0; len], vec![0.0; len]); kv.len()];
            }
            for ((sk, sv), (k, v)) in sums.iter_mut().zip(&kv) {
                let k = k.flatten_all()?.to_vec1::<f32>()?;
                let v = v.flatten_all()?.to_vec1::<f32>()?;
                for (a, b) in sk.iter_mut().zip(&k) {
                    *a += f64::from(*b);
                }
                for (a, b) in sv.iter_mut().zip(&v) {
                    *a += f64::from(*b);
                }
            }
        }
        let n = samples.len().max(1) as f64;
        Ok(sums
            .into_iter()
            .map(|(k, v)| LayerKv {
                k: k.into_iter().map(|x| (x / n) as f32).collect(),
                v: v.into_iter().map(|x| (x / n) as f32).collect(),
                kv_heads,
                seq,
                head_dim: d,
            })
            .collect())
    }

    fn run_map(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
        let policy = PolicyBuilder::new(map.clone())
            .name(format!("calibration candidate {map}"))
            .build()?;
        let mut engine = Engine::new(self.model.clone(), Arc::new(policy), self.config)?;
        let (mut sum, mut count) = (0f64, 0usize);
        let mut hidden = Vec::with_capacity(samples.len());
        for (s, sample) in samples.iter().enumerate() {
            if sample.len() < 2 {
                return Err(ModelError::Config(format!(
                    "calibration sample {s} has {} tokens, at least 2 needed",
                    sample.len()
                )));
            }
            let logits = engine_logits(&mut engine, s as SeqId, sample)?;
            let rows = logits.narrow(0, 0, sample.len() - 1)?;
            for nll in token_nll(&rows, &sample[1..])? {
                sum += f64::from(nll);
                count += 1;
            }
            hidden.push(self.hidden_of(&logits)?);
        }
        Ok(RunOutput {
            hidden,
            nll: sum / count.max(1) as f64,
        })
    }
}

/// The one place that drives the engine: a fresh sequence, all `tokens` in one step, f32 logits
/// of every token `[tokens, vocab]`, the sequence freed again.
pub fn engine_logits(engine: &mut Engine, seq: SeqId, tokens: &[u32]) -> Result<Tensor> {
    engine.add_sequence(seq)?;
    let logits = engine.step(&[(seq, tokens)], LogitsRows::All);
    engine.free(seq)?;
    logits
}

impl CalibrationModel for EngineCalibrator {
    fn num_layers(&self) -> usize {
        self.model.num_layers()
    }

    fn reference_kv(&mut self, samples: &[Vec<u32>]) -> layerkv::Result<Vec<LayerKv>> {
        self.reference(samples).map_err(to_core)
    }

    fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> layerkv::Result<RunOutput> {
        self.run_map(map, samples).map_err(to_core)
    }
}

/// Model errors as core errors (core errors pass through unchanged).
fn to_core(e: ModelError) -> layerkv::Error {
    match e {
        ModelError::Core(c) => c,
        other => layerkv::Error::Calibration {
            what: format!("model: {other}"),
        },
    }
}

/// Additive causal mask `[seq, seq]` (0 where key j is visible to query i, -inf elsewhere),
/// limited to the last `window` keys when set (as the engine's sliding window).
fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            if !visible {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, t), device)?)
}

fn build_readout(model: &Model) -> Result<Readout> {
    let cfg = model.config();
    let h = cfg.hidden_size;
    let dev = model.device();
    let c = (h as f64 / (1.0 + cfg.rms_norm_eps)).sqrt();
    let x = (Tensor::eye(h, DType::F32, dev)? * (h as f64).sqrt())?.to_dtype(model.dtype())?;
    let probe = model.logits(&x)?; // [h, vocab] f32
    let p64 = probe.to_dtype(DType::F64)?;
    let gram = p64.matmul(&p64.t()?)?.flatten_all()?.to_vec1::<f64>()?;
    let Some(chol) = cholesky(gram, h) else {
        tracing::warn!(
            "calibration: the LM head cannot be inverted (vocab {} < hidden {h}?); using centred \
             log-probabilities as the hidden-state stopgap",
            cfg.vocab_size
        );
        return Ok(Readout {
            kind: HiddenReadout::CenteredLogProbs,
            inv: Tensor::zeros((1, 1), DType::F64, dev)?,
            probe,
        });
    };
    // Tied embeddings: row k of P is c g_k E[:, k]; recover g and check the fit.
    let mut scale = vec![c; h];
    let mut kind = HiddenReadout::Normalized;
    if cfg.tie_word_embeddings {
        let p = probe.to_vec2::<f32>()?;
        let ids: Vec<u32> = (0..cfg.vocab_size as u32).collect();
        let e = model
            .embed(&ids)?
            .to_dtype(DType::F32)?
            .t()?
            .contiguous()?
            .to_vec2::<f32>()?; // [h, vocab]
        let mut gain = vec![0f64; h];
        let mut fits = true;
        for k in 0..h {
            let ee: f64 = e[k].iter().map(|&a| f64::from(a).powi(2)).sum();
            let pe: f64 = p[k]
                .iter()
                .zip(&e[k])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let pp: f64 = p[k].iter().map(|&a| f64::from(a).powi(2)).sum();
            if ee <= 0.0 || pp <= 0.0 {
                fits = false;
                break;
            }
            let g = pe / (c * ee);
            // Residual of P[k] - c g E[k] relative to P[k].
            let resid = (pp - 2.0 * c * g * pe + (c * g).powi(2) * ee).max(0.0) / pp;
            if resid > 1e-4 {
                fits = false;
                break;
            }
            gain[k] = g;
        }
        if fits {
            for (s, g) in scale.iter_mut().zip(&gain) {
                *s *= g;
            }
            kind = HiddenReadout::Exact;
        }
    }
    // Column j of the inverse solves G x = e_j; scale column j by scale[j].
    let mut inv = vec![0f64; h * h];
    let mut unit = vec![0f32; h];
    for j in 0..h {
        unit.iter_mut().for_each(|u| *u = 0.0);
        unit[j] = 1.0;
        let col = cholesky_solve(&chol, h, &unit);
        for (i, x) in col.iter().enumerate() {
            inv[i * h + j] = x * scale[j];
        }
    }
    Ok(Readout {
        kind,
        probe,
        inv: Tensor::from_vec(inv, (h, h), dev)?,
    })
}

/// Lower Cholesky factor of a symmetric `n x n` matrix (row-major), `None` unless positive
/// definite.
fn cholesky(mut a: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 1e-12 * a[j * n + j].abs().max(f64::MIN_POSITIVE) {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    Some(a)
}

/// Solves `L L^T z = b` for the lower factor `l`.
fn cholesky_solve(l: &[f64], n: usize, b: &[f32]) -> Vec<f64> {
    let mut w: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
    for i in 0..n {
        let mut s = w[i];
        for k in 0..i {
            s -= l[i * n + k] * w[k];
        }
        w[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = w[i];
        for k in i + 1..n {
            s -= l[k * n + i] * w[k];
        }
        w[i] = s / l[i * n + i];
    }
    w
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use layerkv::calibrate::{calibrate, Acceptance, CalibrationConfig, PairOrder, ShareTarget};

    use super::*;
    use crate::config::ModelConfig;
    use crate::weights::Weights;

    const VOCAB: usize = 64;
    const HIDDEN: usize = 32;
    const LAYERS: usize = 6;

    /// A tiny random llama in memory; returns it and its final-norm gain.
    fn tiny(tied: bool, seed: u64) -> (Arc<Model>, Tensor) {
        let cfg = ModelConfig::parse(
            &serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": HIDDEN, "intermediate_size": 48, "num_hidden_layers": LAYERS,
                "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": VOCAB,
                "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2
            })
            .to_string(),
        )
        .unwrap();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rand = |shape: &[usize], scale: f32, offset: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale + offset
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let s = 1.0 / (HIDDEN as f32).sqrt();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert(
            "model.embed_tokens.weight".into(),
            rand(&[VOCAB, HIDDEN], 1.0, 0.0),
        );
        if !tied {
            t.insert("lm_head.weight".into(), rand(&[VOCAB, HIDDEN], 0.3, 0.0));
        }
        let gain = rand(&[HIDDEN], 0.3, 1.0);
        t.insert("model.norm.weight".into(), gain.clone());
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            for (name, shape, scale) in [
                ("self_attn.q_proj", [HIDDEN, HIDDEN], 2.0 * s),
                ("self_attn.k_proj", [16, HIDDEN], 2.0 * s),
                ("self_attn.v_proj", [16, HIDDEN], s),
                ("self_attn.o_proj", [HIDDEN, HIDDEN], s),
                ("mlp.gate_proj", [48, HIDDEN], s),
                ("mlp.up_proj", [48, HIDDEN], s),
                ("mlp.down_proj", [HIDDEN, 48], 1.0 / 48f32.sqrt()),
            ] {
                t.insert(format!("{p}.{name}.weight"), rand(&shape, scale, 0.0));
            }
            t.insert(
                format!("{p}.input_layernorm.weight"),
                rand(&[HIDDEN], 0.1, 1.0),
            );
            t.insert(
                format!("{p}.post_attention_layernorm.weight"),
                rand(&[HIDDEN], 0.1, 1.0),
            );
        }
        let mut w = Weights::from_tensors(t, "memory");
        (Arc::new(Model::from_weights(cfg, &mut w).unwrap()), gain)
    }

    fn samples() -> Vec<Vec<u32>> {
        (0..3)
            .map(|s| (0..12).map(|t| ((s * 17 + t * 5) % VOCAB) as u32).collect())
            .collect()
    }

    fn config() -> EngineConfig {
        EngineConfig {
            num_pages: 64,
            ..EngineConfig::default()
        }
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn identity_run_recovers_the_dense_final_hidden_states() {
        for tied in [true, false] {
            let (model, gain) = tiny(tied, 3);
            let mut cal = EngineCalibrator::new(model.clone(), config());
            let samples = samples();
            let out = cal
                .run(&LayerMap::identity(LAYERS).unwrap(), &samples)
                .unwrap();
            let want_kind = if tied {
                HiddenReadout::Exact
            } else {
                HiddenReadout::Normalized
            };
            assert_eq!(cal.readout(), Some(want_kind));
            for (s, sample) in samples.iter().enumerate() {
                let (_, x) = cal.dense_forward(sample).unwrap();
                let ones = Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap();
                let g = if tied { &gain } else { &ones };
                let u = candle_nn::ops::rms_norm(&x, g, 1e-5).unwrap();
                let u = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(out.hidden[s].len(), 12 * HIDDEN);
                let diff = max_rel_diff(&out.hidden[s], &u);
                assert!(diff < 1e-3, "tied {tied} sample {s}: {diff}");
            }
            assert!(out.nll.is_finite() && out.nll > 0.0);
        }
    }

    #[test]
    fn reference_kv_is_the_sample_mean_in_head_major_layout() {
        let (model, _) = tiny(true, 5);
        let mut cal = EngineCalibrator::new(model, config());
        let samples = samples();
        let kv = cal.reference_kv(&samples).unwrap();
        assert_eq!(kv.len(), LAYERS);
        let mut manual = vec![0f32; 2 * 12 * 8];
        for sample in &samples {
            let (layers, _) = cal.dense_forward(sample).unwrap();
            let k = layers[2].0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (m, x) in manual.iter_mut().zip(k) {
                *m += x / 3.0;
            }
        }
        assert_eq!((kv[2].kv_heads, kv[2].seq, kv[2].head_dim), (2, 12, 8));
        assert!(max_rel_diff(&kv[2].k, &manual) < 1e-5);
    }

    #[test]
    fn sharing_changes_the_run_and_calibration_returns_a_downward_map() {
        let (model, _) = tiny(true, 7);
        let mut cal = EngineCalibrator::new(model, config());
        let samples = samples();
        let reference = cal
            .run(&LayerMap::identity(LAYERS).unwrap(), &samples)
            .unwrap();
        let shared = cal
            .run(&LayerMap::new(vec![0, 1, 2, 3, 4, 0]).unwrap(), &samples)
            .unwrap();
        assert!(max_rel_diff(&shared.hidden[0], &reference.hidden[0]) > 1e-3);
        let cfg = CalibrationConfig {
            target: ShareTarget::Layers(2),
            order: PairOrder::Dissimilar,
            acceptance: Acceptance::Cosine { threshold: -1.0 },
        };
        let mut seen = 0;
        let result = calibrate(&mut cal, &samples, &cfg, &mut |_| seen += 1).unwrap();
        assert_eq!(result.num_shared(), 2);
        assert_eq!(seen, 2);
        assert!(!result.map.needs_upward());
        assert_eq!(result.map.num_groups(), LAYERS - 2);
    }

    #[test]
    fn cholesky_solves_a_small_system() {
        let a = vec![4.0, 2.0, 2.0, 3.0];
        let l = cholesky(a, 2).unwrap();
        let z = cholesky_solve(&l, 2, &[2.0, 5.0]);
        assert!((4.0 * z[0] + 2.0 * z[1] - 2.0).abs() < 1e-12);
        assert!((2.0 * z[0] + 3.0 * z[1] - 5.0).abs() < 1e-12);
        assert!(cholesky(vec![1.0, 2.0, 2.0, 1.0], 2).is_none());
    }
}
