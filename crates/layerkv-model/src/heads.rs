//! Head roles: which KV heads retrieve. A retrieval head is one whose queries, while the model
//! copies a fact out of its context, put their attention on that fact (the copy-paste criterion
//! of Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024);
//! DuoAttention keeps full KV for such heads and sinks + a window for the rest.
//!
//! [`retrieval_scores`] measures it training-free on pass-key probes built from the user's text
//! ([`crate::needle`]): each probe's prompt is prefilled under identity with a lane per KV head
//! that keeps every token and accumulates its attention mass (a `+per-head` H2O with a budget
//! beyond the context), then the right answer is fed as one teacher-forced step, and each lane's
//! score is the attention mass that step's rows put on the pass key's tokens, per answer token
//! and query head (the mean probability, 0..1). Cost: one prefill of each probe plus one step
//! of its answer.

use std::path::Path;
use std::sync::Arc;

use layerkv::{Budget, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention};

use crate::chat::Message;
use crate::engine::LogitsRows;
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::needle::{Sample, SAMPLE_SEQ};
use crate::session::{Session, SessionOptions};

/// Per (layer, KV head): the mean attention probability the answer's query heads put on the
/// needle's tokens, averaged over the probes that located their needle.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalScores {
    /// `scores[layer][head]`.
    pub scores: Vec<Vec<f64>>,
    /// Probes measured.
    pub probes: usize,
    /// Probes skipped because the needle's tokens were not found in the prompt (a tokenizer
    /// that merges the value with its neighbours).
    pub skipped: usize,
}

impl RetrievalScores {
    /// The `count` highest-scoring (layer, head) lanes, best first (ties towards the lower
    /// layer, then head).
    pub fn top(&self, count: usize) -> Vec<(usize, usize)> {
        let mut lanes: Vec<(f64, usize, usize)> = self
            .scores
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &s)| (s, l, h)))
            .collect();
        lanes.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        lanes
            .into_iter()
            .take(count)
            .map(|(_, l, h)| (l, h))
            .collect()
    }
}

/// The probe policy: identity, a lane per KV head, every token kept, attention mass
/// accumulated per lane.
fn probe_policy(num_layers: usize) -> Result<Policy> {
    Ok(PolicyBuilder::new(LayerMap::identity(num_layers)?)
        .name("head-probe")
        .retention(Retention::HeavyHitter {
            heavy: Budget::Tokens(1 << 40),
            recent: Budget::Tokens(1),
        })
        .per_head(true)
        .build()?)
}

/// Where `value`'s tokens sit in `ids` (every occurrence; spelled alone or after a space).
fn spans(session: &Session, ids: &[u32], value: &str) -> Result<Vec<std::ops::Range<usize>>> {
    let mut out = Vec::new();
    for spelled in [value.to_string(), format!(" {value}")] {
        let needle = session.tokenizer().encode(&spelled)?;
        if needle.is_empty() || needle.len() > ids.len() {
            continue;
        }
        for start in 0..=ids.len() - needle.len() {
            let r = start..start + needle.len();
            if ids[r.clone()] == needle[..] && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Scores every (layer, KV head) of `model` (loaded from `dir`) on `samples` (pass-key or
/// other single-needle probes, asked query-aware through the chat template). `progress` gets
/// each probe's index as it finishes.
pub fn retrieval_scores(
    dir: &Path,
    model: Arc<Model>,
    samples: &[Sample],
    options: SessionOptions,
    mut progress: impl FnMut(usize),
) -> Result<RetrievalScores> {
    let cfg = model.config();
    let (layers, kv_heads) = (model.num_layers(), cfg.num_key_value_heads);
    let per_lane = (cfg.num_attention_heads / kv_heads) as f64;
    let policy = probe_policy(layers)?;
    let mut session = Session::new(dir, model, policy, options)?;
    if session.engine().cache().lanes() != kv_heads {
        return Err(ModelError::Config(
            "the probe session has no lane per KV head".into(),
        ));
    }
    let mut sum = vec![vec![0f64; kv_heads]; layers];
    let (mut probes, mut skipped) = (0, 0);
    for (i, sample) in samples.iter().enumerate() {
        let content = format!(
            "{}\n\n{}\n\n{}",
            sample.preamble, sample.context, sample.question.question
        );
        let prompt = session.chat_prompt(&[Message::new("user", content)])?;
        let mut found = Vec::new();
        for v in &sample.question.answers {
            found.extend(spans(&session, &prompt, v)?);
        }
        if found.is_empty() {
            skipped += 1;
            progress(i);
            continue;
        }
        let answer = session.tokenizer().encode(&format!(
            "The answer is {}.",
            sample.question.answers.join(", ")
        ))?;
        let ((), _) = session.with_sequence(SAMPLE_SEQ, |s| {
            s.check_room(Some(SAMPLE_SEQ), prompt.len() + answer.len(), 1)?;
            let engine = s.engine_mut();
            engine.step(&[(SAMPLE_SEQ, &prompt)], LogitsRows::Last)?;
            let before = accumulated(engine.cache(), layers * kv_heads)?;
            engine.step(&[(SAMPLE_SEQ, &answer)], LogitsRows::Last)?;
            let after = accumulated(engine.cache(), layers * kv_heads)?;
            // Every token is kept and never moved: logical slot = position.
            for (lane, (a, b)) in after.iter().zip(&before).enumerate() {
                let mass: f64 = found
                    .iter()
                    .flat_map(|r| r.clone())
                    .map(|slot| f64::from(a[slot] - b[slot]))
                    .sum();
                sum[lane / kv_heads][lane % kv_heads] += mass / (answer.len() as f64 * per_lane);
            }
            Ok(())
        })?;
        probes += 1;
        progress(i);
    }
    if probes > 0 {
        for v in sum.iter_mut().flatten() {
            *v /= probes as f64;
        }
    }
    Ok(RetrievalScores {
        scores: sum,
        probes,
        skipped,
    })
}

/// Each lane's accumulated attention mass per slot for [`SAMPLE_SEQ`].
fn accumulated(cache: &layerkv::KvCache, lanes: usize) -> Result<Vec<Vec<f32>>> {
    let snap = cache.snapshot();
    let seq = snap
        .sequences
        .get(&SAMPLE_SEQ)
        .ok_or(layerkv::Error::UnknownSequence(SAMPLE_SEQ))?;
    if seq.scores.len() != lanes {
        return Err(ModelError::Config(format!(
            "the probe cache scores {} lanes, the model has {lanes}",
            seq.scores.len()
        )));
    }
    Ok(seq.scores.iter().map(|s| s[0].clone()).collect())
}

/// A DuoAttention-style policy: the `picked` (layer, head) lanes keep every token, every other
/// lane keeps `others` (sinks + a window).
pub fn role_policy(
    name: &str,
    num_layers: usize,
    picked: &[(usize, usize)],
    others: Retention,
) -> Result<Policy> {
    let mut b = PolicyBuilder::new(LayerMap::identity(num_layers)?)
        .name(name)
        .retention(others)
        .per_head(true);
    for &(layer, head) in picked {
        b = b.lane_retention(layer, head, Retention::Full);
    }
    let p = b.build()?;
    debug_assert!(p.per_head());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_orders_by_score_then_lane() {
        let s = RetrievalScores {
            scores: vec![vec![0.1, 0.5], vec![0.5, 0.0], vec![0.9, 0.2]],
            probes: 1,
            skipped: 0,
        };
        assert_eq!(s.top(3), vec![(2, 0), (0, 1), (1, 0)]);
        assert_eq!(s.top(0), Vec::<(usize, usize)>::new());
    }
}
