//! The demo's retrieval check: a 5-digit pass key hidden in the evaluation text at three
//! depths, asked through the chat template in both query modes (the question after the
//! context, and the context compressed first with the question as a later turn), under each
//! of the demo's policies. Perplexity alone hides what eviction breaks; this is the first
//! thing that shows whether the answers survive.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use layerkv::Policy;
use layerkv_model::needle::{run_sample, Generator, Grid, QueryMode, Task};
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::{Model, Session, SessionOptions};
use serde::Serialize;

use crate::report::truncate_start;

/// Tokens of room beside the context (preamble, chat template, question, answer).
pub const SLACK: usize = 1024;

/// Needle depths of the check.
const DEPTHS: [f64; 3] = [0.1, 0.5, 0.9];

/// One policy's retrieval score.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalRow {
    /// The policy.
    pub policy: String,
    /// Context length in tokens.
    pub length: usize,
    /// Right answers, query-aware.
    pub aware: usize,
    /// Right answers, query-agnostic.
    pub agnostic: usize,
    /// Samples per mode.
    pub samples: usize,
}

/// The context length the check runs at: `wanted`, or what the model's context leaves room
/// for; `None` when that is under 128 tokens.
pub fn length(model: &Model, wanted: usize) -> Option<usize> {
    let room = model.config().max_position_embeddings.saturating_sub(SLACK);
    let n = wanted.min(room);
    (n >= 128).then_some(n)
}

/// Runs the pass-key check at `length` tokens under each policy.
pub fn run(
    dir: &Path,
    model: &Arc<Model>,
    dtype: layerkv_model::KvTypes,
    tokenizer: &Tokenizer,
    text: &str,
    policies: &[Policy],
    length: usize,
) -> Result<Vec<RetrievalRow>> {
    let grid = Grid {
        tasks: vec![Task::Passkey],
        lengths: vec![length],
        depths: DEPTHS.to_vec(),
        samples: 1,
    };
    let samples = Generator::new(text, tokenizer)?.grid(&grid, 0)?;
    let mut rows = Vec::new();
    for policy in policies {
        let name = policy.name().to_string();
        let options = SessionOptions {
            max_context: length + SLACK,
            kv_dtype: dtype,
            ..SessionOptions::default()
        };
        let mut session = Session::new(dir, model.clone(), policy.clone(), options)
            .with_context(|| format!("a retrieval session under {name}"))?;
        session.chat_template()?;
        let mut right = [0usize; 2];
        for s in &samples {
            for (k, mode) in [QueryMode::QueryAware, QueryMode::QueryAgnostic]
                .into_iter()
                .enumerate()
            {
                let o = run_sample(&mut session, s, mode)
                    .with_context(|| format!("pass key under {name} ({mode})"))?;
                right[k] += usize::from(o.correct());
            }
        }
        rows.push(RetrievalRow {
            policy: name,
            length,
            aware: right[0],
            agnostic: right[1],
            samples: samples.len(),
        });
    }
    Ok(rows)
}

/// One line per policy: right answers per mode.
pub fn table(rows: &[RetrievalRow]) -> String {
    let mut s = format!(
        "{:<48} {:>14} {:>14}\n",
        "retrieval (pass key)", "query-aware", "query-agnostic"
    );
    for r in rows {
        s += &format!(
            "{:<48} {:>14} {:>14}\n",
            truncate_start(&r.policy, 48),
            format!("{}/{}", r.aware, r.samples),
            format!("{}/{}", r.agnostic, r.samples)
        );
    }
    s
}
