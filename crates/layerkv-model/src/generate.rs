//! Token generation: greedy, temperature and nucleus (top-p) sampling with a seeded RNG, and a
//! generation loop that reports prefill and decode throughput.
//!
//! Sampling is O(vocab log vocab) only when top-p < 1 (a sort of the candidates); greedy and
//! plain temperature sampling are O(vocab).

use std::time::Instant;

use layerkv::SeqId;

use crate::engine::{Engine, LogitsRows};
use crate::error::Result;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// RNG seed (same seed, same tokens).
    pub seed: u64,
}

impl Sampling {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler (splitmix64 stream).
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    state: u64,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `cfg`.
    pub fn new(cfg: Sampling) -> Self {
        Self {
            cfg,
            state: cfg.seed ^ 0x5851_f42d_4c95_7f2d,
            scratch: Vec::new(),
        }
    }

    fn next_f32(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.cfg.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (((l - max) / t).exp(), i as u32)),
        );
        let total: f32 = self.scratch.iter().map(|p| p.0).sum();
        let mut mass = total;
        if self.cfg.top_p < 1.0 {
            self.scratch.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            let mut acc = 0.0;
            let mut keep = self.scratch.len();
            for (i, p) in self.scratch.iter().enumerate() {
                acc += p.0;
                if acc >= self.cfg.top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            self.scratch.truncate(keep);
            mass = acc;
        }
        let mut u = self.next_f32() * mass;
        for &(p, i) in &self.scratch {
            if u < p {
                return i;
            }
            u -= p;
        }
        self.scratch.last().map_or(0, |p| p.1)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// What a generation produced and how fast.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Prompt tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Generated tokens per second (after the first).
    pub decode_tokens_per_sec: f64,
}

/// Prefills `prompt` into a new sequence `seq`, then samples up to `max_new` tokens, stopping
/// early at any of `eos`. The sequence is freed at the end.
pub fn generate(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
) -> Result<Generation> {
    let mut sampler = Sampler::new(sampling);
    engine.add_sequence(seq)?;
    let result = (|| {
        let t0 = Instant::now();
        let logits = engine.step(&[(seq, prompt)], LogitsRows::Last)?;
        let prefill = t0.elapsed().as_secs_f64();
        let mut tokens = Vec::with_capacity(max_new);
        let mut next = sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?);
        let t1 = Instant::now();
        while tokens.len() < max_new {
            tokens.push(next);
            if eos.contains(&next) || tokens.len() == max_new {
                break;
            }
            let logits = engine.step(&[(seq, &[next])], LogitsRows::Last)?;
            next = sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?);
        }
        let decode = t1.elapsed().as_secs_f64();
        Ok(Generation {
            prefill_tokens_per_sec: prompt.len() as f64 / prefill.max(1e-9),
            decode_tokens_per_sec: (tokens.len().saturating_sub(1)) as f64 / decode.max(1e-9),
            tokens,
        })
    })();
    engine.free(seq)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(Sampling::greedy()).sample(&logits), 1);
        let cfg = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..32).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..32).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-p drops the tail: {a:?}"
        );
        assert!(a.contains(&1) && a.contains(&2));
    }
}
