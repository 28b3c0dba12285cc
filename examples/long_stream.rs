//! StreamingLLM sinks + window over a long text: the memory it holds is printed as it
//! streams, and stays flat. `cargo run --release --example long_stream [TOKENS]` runs it on the
//! embedded default model and the Python docs (fetched on first use); the test suite runs it on
//! a tiny random model (`tests/examples.rs`).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::{LayerMap, PolicyBuilder, Retention};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::eval::token_nll;
use layerkv_model::{assets, tokenizer, Model};

/// One line of the stream's report.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Tokens streamed so far.
    pub tokens: usize,
    /// KV bytes held.
    pub kv_bytes: usize,
    /// Running perplexity.
    pub perplexity: f64,
}

/// Streams the first `total` tokens of `text` through the model in `dir` under 4 sinks + a
/// 252-token window, 32 tokens a step; reports every `report_every` tokens and at the end.
pub fn run(
    dir: &Path,
    text: &str,
    total: usize,
    report_every: usize,
) -> Result<Vec<Report>, Box<dyn std::error::Error>> {
    let model = Arc::new(Model::load(dir, DType::F32, &Device::Cpu)?);
    let tok = tokenizer::load(dir)?;
    let mut ids = tok.encode(text)?;
    ids.truncate(total);
    let policy = PolicyBuilder::new(LayerMap::identity(model.num_layers())?)
        .retention(Retention::SinkWindow {
            sinks: 4,
            window: 252,
        })
        .build()?;
    let config = EngineConfig {
        num_pages: model.num_layers() * 40,
        prefill_chunk: 32,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Arc::new(policy), config)?;
    engine.add_sequence(0)?;
    let (mut nll, mut count) = (0f64, 0usize);
    let mut reports = Vec::new();
    for (i, chunk) in ids.chunks(32).enumerate() {
        let logits = engine.step(&[(0, chunk)], LogitsRows::All)?;
        let start = i * 32;
        let end = (start + chunk.len()).min(ids.len() - 1);
        if end > start {
            let rows = logits.narrow(0, 0, end - start)?;
            for x in token_nll(&rows, &ids[start + 1..=end])? {
                nll += f64::from(x);
                count += 1;
            }
        }
        let done = start + chunk.len();
        if done % report_every == 0 || done == ids.len() {
            let bytes = engine.cache().memory(0)?.total_bytes;
            let ppl = (nll / count.max(1) as f64).exp();
            println!("{done:>6} tokens: KV {bytes:>9} bytes, running perplexity {ppl:.2}");
            reports.push(Report {
                tokens: done,
                kv_bytes: bytes,
                perplexity: ppl,
            });
        }
    }
    engine.free(0)?;
    Ok(reports)
}

#[allow(dead_code)] // the test suite calls `run` directly
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args().nth(1).map_or(Ok(8192), |a| a.parse())?;
    let dir = assets::ensure_default_model()?;
    let texts = assets::ensure_default_texts()?;
    let text = std::fs::read_to_string(&texts.python_docs)?;
    run(&dir, &text, total, 1024)?;
    Ok(())
}
