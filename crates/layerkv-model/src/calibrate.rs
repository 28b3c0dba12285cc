//! [`EngineCalibrator`]: the model side of KVSharer calibration
//! ([`layerkv::calibrate::CalibrationModel`]) for a loaded [`Model`], and [`text_samples`], the
//! calibration samples of a text.
//!
//! - Reference K/V: a plain causal dense forward written with the [`Model`] pieces (one sample
//!   at a time, the same attention the engine computes, no cache), keeping each layer's K after
//!   RoPE (what Hugging Face's `past_key_values` hold, which the authors' code compares) and V,
//!   averaged element-wise over the samples as `[kv_heads, seq, head_dim]` f32.
//! - Candidate runs go through [`Engine`], the path users run: one engine per map (its pool
//!   sized for all samples), all samples in one batched step of [`Engine::step_hidden`], which
//!   returns the final hidden states (after the final norm) directly; the NLL comes from
//!   [`Model::head_logits`] on those same states, one sample at a time.
//!
//! - Retrieval probes (optional, [`EngineCalibrator::with_retrieval`]): needle samples asked
//!   through a [`Session`] under the candidate map, query-aware and greedy, the path users
//!   chat through; calibration rejects a candidate that loses one the current map answers.
//!
//! Cost: per run, one engine forward of every sample's tokens plus one `[seq, hidden] x
//! [hidden, vocab]` LM-head product per sample; the engine's pool holds
//! `samples x ceil(seq / block_size)` pages per KV group for the run.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use layerkv::calibrate::{CalibrationModel, LayerKv, RunOutput};
use layerkv::{LayerMap, PolicyBuilder, SeqId};

use crate::engine::{Engine, EngineConfig};
use crate::error::{ModelError, Result};
use crate::eval::token_nll;
use crate::model::Model;
use crate::needle::{run_sample, QueryMode, Sample};
use crate::rope::Rope;
use crate::session::{Session, SessionOptions};
use crate::tokenizer::Tokenizer;

/// Runs a [`Model`] for calibration: reference K/V from a dense forward, candidate maps through
/// the [`Engine`].
#[derive(Debug)]
pub struct EngineCalibrator {
    model: Arc<Model>,
    config: EngineConfig,
    probes: Option<RetrievalProbes>,
}

/// The retrieval probes of calibration's retrieval rule: needle samples (say pass keys at a
/// few depths, from [`crate::needle::Generator`]) asked under each candidate map.
#[derive(Debug, Clone)]
pub struct RetrievalProbes {
    /// The model directory (tokenizer, chat template).
    pub model_dir: PathBuf,
    /// The samples, asked in this order.
    pub samples: Vec<Sample>,
    /// Options of the probe sessions (context length, KV dtype; sampling is greedy anyway).
    pub options: SessionOptions,
}

impl EngineCalibrator {
    /// A calibrator for `model`, running candidates with engines of `config` (its `num_pages`
    /// is raised to what a run of all samples needs).
    pub fn new(model: Arc<Model>, config: EngineConfig) -> Self {
        Self {
            model,
            config,
            probes: None,
        }
    }

    /// Turns the retrieval rule on with these probes.
    pub fn with_retrieval(mut self, probes: RetrievalProbes) -> Self {
        self.probes = Some(probes);
        self
    }

    /// Which probes the model answers under `map` (`None` without probes).
    fn probe(&self, map: &LayerMap) -> Result<Option<Vec<bool>>> {
        let Some(p) = &self.probes else {
            return Ok(None);
        };
        let policy = PolicyBuilder::new(map.clone())
            .name(format!("calibration candidate {map}"))
            .build()?;
        let mut session =
            Session::new(&p.model_dir, self.model.clone(), policy, p.options.clone())?;
        session.chat_template()?;
        let answers = p
            .samples
            .iter()
            .map(|s| Ok(run_sample(&mut session, s, QueryMode::QueryAware)?.correct()))
            .collect::<Result<Vec<bool>>>()?;
        Ok(Some(answers))
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
        for (s, sample) in samples.iter().enumerate() {
            if sample.len() < 2 {
                return Err(ModelError::Config(format!(
                    "calibration sample {s} has {} tokens, at least 2 needed",
                    sample.len()
                )));
            }
        }
        let policy = PolicyBuilder::new(map.clone())
            .name(format!("calibration candidate {map}"))
            .build()?;
        let block = self.config.block_size.max(1);
        let pages: usize = samples.iter().map(|s| s.len().div_ceil(block)).sum();
        let config = EngineConfig {
            num_pages: self.config.num_pages.max(pages * map.num_groups()),
            ..self.config
        };
        let mut engine = Engine::new(self.model.clone(), Arc::new(policy), config)?;
        let hidden = engine_hidden(&mut engine, samples)?;
        let (mut sum, mut count) = (0f64, 0usize);
        let mut out = Vec::with_capacity(samples.len());
        let mut row = 0;
        for sample in samples {
            let h = hidden.narrow(0, row, sample.len())?;
            row += sample.len();
            let logits = self.model.head_logits(&h.narrow(0, 0, sample.len() - 1)?)?;
            for nll in token_nll(&logits, &sample[1..])? {
                sum += f64::from(nll);
                count += 1;
            }
            out.push(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(RunOutput {
            hidden: out,
            nll: sum / count.max(1) as f64,
        })
    }
}

/// The one place that drives the engine: sample `s` as fresh sequence `s`, all samples in one
/// batched step; the final hidden states of every token `[total tokens, hidden]`, samples in
/// order. The sequences are freed again, also when the step fails.
pub fn engine_hidden(engine: &mut Engine, samples: &[Vec<u32>]) -> Result<Tensor> {
    for s in 0..samples.len() {
        engine.add_sequence(s as SeqId)?;
    }
    let batch: Vec<(SeqId, &[u32])> = samples
        .iter()
        .enumerate()
        .map(|(s, t)| (s as SeqId, t.as_slice()))
        .collect();
    let hidden = engine.step_hidden(&batch);
    for s in 0..samples.len() {
        engine.free(s as SeqId)?;
    }
    hidden
}

/// The calibration samples of `text`: its first `count` paragraphs (blank-line separated,
/// whitespace collapsed) with at least `len` tokens, each truncated to `len` tokens. The same
/// text and options always give the same samples. Errors when `count` is 0, `len < 2`, or the
/// text has no such paragraph (an empty or too short text); fewer than `count` paragraphs is
/// not an error (the caller can compare the length).
pub fn text_samples(
    tokenizer: &Tokenizer,
    text: &str,
    count: usize,
    len: usize,
) -> Result<Vec<Vec<u32>>> {
    if count == 0 {
        return Err(ModelError::Config(
            "calibration needs at least 1 sample".into(),
        ));
    }
    if len < 2 {
        return Err(ModelError::Config(format!(
            "calibration samples need at least 2 tokens each (asked {len})"
        )));
    }
    let mut out = Vec::with_capacity(count);
    for paragraph in text.split("\n\n") {
        if out.len() == count {
            break;
        }
        let joined = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        if joined.len() < len {
            continue; // fewer bytes than tokens wanted: cannot have enough tokens
        }
        let mut ids = tokenizer.encode(&joined)?;
        if ids.len() >= len {
            ids.truncate(len);
            out.push(ids);
        }
    }
    if out.is_empty() {
        return Err(ModelError::Config(if text.trim().is_empty() {
            "the calibration text is empty".into()
        } else {
            format!("the calibration text has no paragraph of at least {len} tokens")
        }));
    }
    Ok(out)
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

    fn retrieval(&mut self, map: &LayerMap) -> layerkv::Result<Option<Vec<bool>>> {
        self.probe(map).map_err(to_core)
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
    fn identity_run_returns_the_dense_final_hidden_states_and_nll() {
        for tied in [true, false] {
            let (model, gain) = tiny(tied, 3);
            let mut cal = EngineCalibrator::new(model.clone(), config());
            let samples = samples();
            let out = cal
                .run(&LayerMap::identity(LAYERS).unwrap(), &samples)
                .unwrap();
            let mut nll = 0f64;
            for (s, sample) in samples.iter().enumerate() {
                let (_, x) = cal.dense_forward(sample).unwrap();
                let u = candle_nn::ops::rms_norm(&x, &gain, 1e-5).unwrap();
                let logits = model.logits(&x).unwrap();
                nll += token_nll(&logits.narrow(0, 0, 11).unwrap(), &sample[1..])
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x))
                    .sum::<f64>();
                let u = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(out.hidden[s].len(), 12 * HIDDEN);
                let diff = max_rel_diff(&out.hidden[s], &u);
                assert!(diff < 1e-5, "tied {tied} sample {s}: {diff}");
            }
            let want = nll / (3.0 * 11.0);
            assert!(
                (out.nll - want).abs() < 1e-5 * want,
                "tied {tied}: nll {} vs dense {want}",
                out.nll
            );
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
            max_candidates: None,
        };
        let mut seen = 0;
        let result = calibrate(&mut cal, &samples, &cfg, &mut |_| seen += 1).unwrap();
        assert_eq!(result.num_shared(), 2);
        assert_eq!(seen, 2);
        assert!(!result.map.needs_upward());
        assert_eq!(result.map.num_groups(), LAYERS - 2);
    }
}
