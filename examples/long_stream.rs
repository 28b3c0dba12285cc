//! StreamingLLM sinks + window over a long text on the embedded default model (fetched on first
//! use): the memory it holds is printed as it streams, and stays flat.
//! `cargo run --release --example long_stream [TOKENS]`

use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::{LayerMap, PolicyBuilder, Retention};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::eval::token_nll;
use layerkv_model::{assets, tokenizer, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args().nth(1).map_or(Ok(8192), |a| a.parse())?;
    let dir = assets::ensure_default_model()?;
    let texts = assets::ensure_default_texts()?;
    let model = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu)?);
    let tok = tokenizer::load(&dir)?;
    let mut ids = tok.encode(&std::fs::read_to_string(&texts.python_docs)?)?;
    ids.truncate(total);
    let policy = PolicyBuilder::new(LayerMap::identity(model.num_layers())?)
        .retention(Retention::SinkWindow {
            sinks: 4,
            window: 252,
        })
        .build()?;
    let config = EngineConfig {
        num_pages: 30 * 40,
        prefill_chunk: 32,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Arc::new(policy), config)?;
    engine.add_sequence(0)?;
    let (mut nll, mut count) = (0f64, 0usize);
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
        if (start + chunk.len()) % 1024 == 0 || start + chunk.len() == ids.len() {
            let mem = engine.cache().memory(0)?;
            println!(
                "{:>6} tokens: KV {:>9} bytes, running perplexity {:.2}",
                start + chunk.len(),
                mem.total_bytes,
                (nll / count.max(1) as f64).exp()
            );
        }
    }
    Ok(())
}
