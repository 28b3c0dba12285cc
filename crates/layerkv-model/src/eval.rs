//! Quality and memory measurements of a policy on real text: perplexity with a fixed context
//! and stride, streaming NLL per 1k-token bucket, and greedy-token agreement with a reference.
//!
//! Every function feeds a sequence's prompt in one [`Engine::step`] (the engine splits it into
//! prefill chunks of [`crate::engine::EngineConfig::prefill_chunk`] under an evicting policy)
//! and the rest in steps of `chunk` tokens; retention runs between steps, so `chunk = 1` is
//! exact StreamingLLM/H2O behaviour and larger chunks let a chunk's tokens see each other
//! before eviction (faster, slightly more context).

use std::time::Instant;

use candle_core::{Tensor, D};
use layerkv::SeqId;

use crate::engine::{Engine, LogitsRows};
use crate::error::Result;
use crate::generate::argmax;

/// Perplexity of a token stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Mean negative log-likelihood per predicted token (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Predicted tokens.
    pub num_predicted: usize,
    /// Most KV bytes one sequence held at any moment of the run: the pool's high-water mark,
    /// inside prefill chunks too (SnapKV holds its whole prompt until the prompt ends).
    pub peak_kv_bytes: usize,
    /// KV bytes per layer at the largest footprint seen after a step.
    pub kv_bytes_per_layer: Vec<usize>,
    /// Tokens processed per second (all chunks).
    pub tokens_per_sec: f64,
}

/// NLL of each row's target: `logits [rows, vocab]`, `targets[rows]`.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    Ok(logp.gather(&idx, 1)?.squeeze(1)?.neg()?.to_vec1::<f32>()?)
}

/// Runs `tokens` through a fresh sequence: the first `prompt_len` tokens as its prompt (one
/// engine step, which the engine splits into prefill chunks under an evicting policy), then the
/// rest in steps of `chunk` tokens, and calls `on_nll(position, nll)` for every token whose
/// position is `>= score_from` (`score_from >= 1`). Returns the peak KV bytes, the pool's
/// high-water mark while the sequence ran (inside the engine's prefill chunks too, so SnapKV's
/// whole prompt counts; a layer-major prefill's scratch pages added), and the per-layer bytes of
/// the largest footprint seen after a step (each footprint also reported to `on_memory(end,
/// bytes)`). The sequence is freed at the end; other sequences of the engine are held constant
/// meanwhile.
#[allow(clippy::too_many_arguments)]
fn run_sequence(
    engine: &mut Engine,
    seq: SeqId,
    tokens: &[u32],
    prompt_len: usize,
    chunk: usize,
    score_from: usize,
    mut on_nll: impl FnMut(usize, f32),
    mut on_memory: impl FnMut(usize, usize),
) -> Result<(usize, Vec<usize>)> {
    engine.add_sequence(seq)?;
    let before = engine.cache().pool_stats().num_used;
    engine.cache().reset_peak();
    engine.reset_scratch_peak();
    let result = (|| {
        let mut peak = (0, Vec::new());
        let mut start = 0;
        let chunk = chunk.max(1);
        let prompt_len = prompt_len.clamp(1, tokens.len());
        while start < tokens.len() {
            let end = if start == 0 {
                prompt_len
            } else {
                (start + chunk).min(tokens.len())
            };
            let logits = engine.step(&[(seq, &tokens[start..end])], LogitsRows::All)?;
            // Row r predicts token start + r + 1.
            let last = end.min(tokens.len() - 1);
            if last > start {
                let first_row = score_from.saturating_sub(1).max(start) - start;
                if start + first_row < last {
                    let rows = logits.narrow(0, first_row, last - start - first_row)?;
                    let targets = &tokens[start + first_row + 1..=last];
                    for (i, nll) in token_nll(&rows, targets)?.into_iter().enumerate() {
                        on_nll(start + first_row + 1 + i, nll);
                    }
                }
            }
            let mem = engine.cache().memory(seq)?;
            on_memory(end, mem.total_bytes);
            if mem.total_bytes > peak.0 {
                peak = (mem.total_bytes, mem.bytes_per_layer);
            }
            start = end;
        }
        let stats = engine.cache().pool_stats();
        let page_bytes = engine.cache().config().page_bytes();
        // A layer-major prefill's scratch pages come on top of the pool's.
        peak.0 = peak
            .0
            .max(stats.peak_used.saturating_sub(before) * page_bytes + engine.scratch_peak_bytes());
        Ok(peak)
    })();
    engine.free(seq)?;
    result
}

/// Perplexity with windows of `context` tokens every `stride` tokens (Hugging Face's sliding
/// evaluation): each window is a fresh sequence whose unscored part is its prompt; only tokens
/// not scored by an earlier window count, so every token is predicted once with at least
/// `context - stride` tokens of context. With `min_prompt > 0` every window, the first
/// included, prefills at least that many tokens as its prompt before anything is scored (the
/// long-prompt-then-continue shape SnapKV compresses for).
pub fn perplexity(
    engine: &mut Engine,
    tokens: &[u32],
    context: usize,
    stride: usize,
    chunk: usize,
    min_prompt: usize,
) -> Result<Perplexity> {
    let stride = stride.clamp(1, context.max(1));
    let t0 = Instant::now();
    let (mut sum, mut count, mut processed) = (0f64, 0usize, 0usize);
    let mut peak = (0, Vec::new());
    let mut scored_until = 0usize;
    let mut begin = 0;
    while begin < tokens.len().saturating_sub(1) {
        let end = (begin + context).min(tokens.len());
        let window = &tokens[begin..end];
        let score_from = scored_until.saturating_sub(begin).max(1).max(min_prompt);
        let p = run_sequence(
            engine,
            u64::MAX - 1,
            window,
            score_from,
            chunk,
            score_from,
            |_, nll| {
                sum += f64::from(nll);
                count += 1;
            },
            |_, _| {},
        )?;
        processed += window.len();
        if p.0 > peak.0 {
            peak = p;
        }
        scored_until = end;
        if end == tokens.len() {
            break;
        }
        begin += stride;
    }
    let nll = sum / count.max(1) as f64;
    Ok(Perplexity {
        nll,
        ppl: nll.exp(),
        num_predicted: count,
        peak_kv_bytes: peak.0,
        kv_bytes_per_layer: peak.1,
        tokens_per_sec: processed as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

/// One bucket of a streaming evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamBucket {
    /// First text position of the bucket.
    pub start: usize,
    /// Mean NLL of the bucket's predicted tokens.
    pub nll: f64,
    /// Largest KV bytes the sequence held while the bucket streamed by.
    pub kv_bytes: usize,
    /// Tokens per second of the steps that ended in the bucket (step cost at this depth).
    pub tokens_per_sec: f64,
}

/// Streaming evaluation over one long sequence: mean NLL and peak KV bytes per bucket of
/// `bucket` positions (e.g. 1000), plus the overall perplexity. Texts longer than the model's
/// context show whether a policy keeps the loss flat (StreamingLLM) or not (full cache past the
/// training length), and whether its memory stays flat.
pub fn stream_nll(
    engine: &mut Engine,
    tokens: &[u32],
    chunk: usize,
    bucket: usize,
) -> Result<(Vec<StreamBucket>, Perplexity)> {
    let bucket = bucket.max(1);
    let n = tokens.len().div_ceil(bucket);
    let mut sums = vec![(0f64, 0usize); n];
    let mut bytes = vec![0usize; n];
    let mut time = vec![(0f64, 0usize); n];
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0usize);
    let peak = run_sequence(
        engine,
        u64::MAX - 2,
        tokens,
        chunk,
        chunk,
        1,
        |pos, nll| {
            let b = &mut sums[pos / bucket];
            b.0 += f64::from(nll);
            b.1 += 1;
        },
        |end, kv| {
            let i = (end - 1) / bucket;
            bytes[i] = bytes[i].max(kv);
            let now = Instant::now();
            time[i].0 += now.duration_since(last.0).as_secs_f64();
            time[i].1 += end - last.1;
            last = (now, end);
        },
    )?;
    let (sum, count) = sums.iter().fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let nll = sum / count.max(1) as f64;
    let buckets = sums
        .iter()
        .zip(&bytes)
        .zip(&time)
        .enumerate()
        .filter(|(_, ((b, _), _))| b.1 > 0)
        .map(|(i, ((b, &kv), t))| StreamBucket {
            start: i * bucket,
            nll: b.0 / b.1 as f64,
            kv_bytes: kv,
            tokens_per_sec: t.1 as f64 / t.0.max(1e-9),
        })
        .collect();
    Ok((
        buckets,
        Perplexity {
            nll,
            ppl: nll.exp(),
            num_predicted: count,
            peak_kv_bytes: peak.0,
            kv_bytes_per_layer: peak.1,
            tokens_per_sec: tokens.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        },
    ))
}

/// Teacher-forced greedy agreement: the fraction of positions of `tokens` (after the first
/// `prompt_len`) where both engines' argmax predictions are the same token.
pub fn greedy_agreement(
    reference: &mut Engine,
    candidate: &mut Engine,
    tokens: &[u32],
    prompt_len: usize,
    chunk: usize,
) -> Result<f64> {
    let mut preds = [Vec::new(), Vec::new()];
    for (e, out) in [reference, candidate].into_iter().zip(preds.iter_mut()) {
        let seq = u64::MAX - 3;
        e.add_sequence(seq)?;
        let r = (|| -> Result<()> {
            let mut start = 0;
            while start < tokens.len() {
                let end = if start == 0 {
                    prompt_len.max(1).min(tokens.len())
                } else {
                    (start + chunk.max(1)).min(tokens.len())
                };
                let logits = e.step(&[(seq, &tokens[start..end])], LogitsRows::All)?;
                for row in logits.to_vec2::<f32>()? {
                    out.push(argmax(&row));
                }
                start = end;
            }
            Ok(())
        })();
        e.free(seq)?;
        r?;
    }
    let from = prompt_len.saturating_sub(1);
    let n = preds[0].len().saturating_sub(from);
    let same = preds[0][from..]
        .iter()
        .zip(&preds[1][from..])
        .filter(|(a, b)| a == b)
        .count();
    Ok(same as f64 / n.max(1) as f64)
}
