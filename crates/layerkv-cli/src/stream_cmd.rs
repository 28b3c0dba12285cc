//! `layerkv stream`: one long sequence far past the model's context under several policies:
//! NLL and KV bytes per 1k-token bucket, a table and a PNG of the curves. Identity runs until
//! the model's context (past it the unmodified model has no positions it was trained on);
//! StreamingLLM's claim is that sinks + window keep the loss flat with flat memory, and that a
//! window without sinks does not.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use layerkv::{LayerKvPolicy, Policy};
use layerkv_model::engine::{Engine, EngineConfig};
use layerkv_model::eval::stream_nll;

use crate::device::DeviceArgs;

/// Options of `layerkv stream`.
#[derive(clap::Args)]
pub struct StreamArgs {
    /// Model directory or GGUF file (default: the embedded default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text file (default: the Python 3.11 documentation, from Debian).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens to stream.
    #[arg(long, default_value_t = 32768)]
    tokens: usize,
    /// Policies (files or specs). Default: `identity`, `identity+stream:0:W`,
    /// `identity+stream:4:W` with W = `--window`.
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// Recent window of the default StreamingLLM policies.
    #[arg(long, default_value_t = 1020)]
    window: usize,
    /// Tokens per step (retention between steps).
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// Bucket size for the NLL curve.
    #[arg(long, default_value_t = 1024)]
    bucket: usize,
    /// Identity stops at this many tokens (default: the model's context length).
    #[arg(long)]
    identity_limit: Option<usize>,
    /// Where to write the PNG of the curves.
    #[arg(long, default_value = "stream.png")]
    plot: PathBuf,
    /// Write the buckets as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs the command.
pub fn run(args: StreamArgs) -> Result<()> {
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => layerkv_model::assets::ensure_default_texts()?.python_docs,
    };
    let (dir, model, dtype) = args.device.load_model(args.model.as_deref())?;
    let tokenizer = layerkv_model::tokenizer::load(&dir)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let mut tokens = tokenizer.encode(&text)?;
    anyhow::ensure!(
        tokens.len() >= args.tokens,
        "{} has only {} tokens, {} asked",
        text_path.display(),
        tokens.len(),
        args.tokens
    );
    tokens.truncate(args.tokens);
    let n = model.num_layers();
    let specs: Vec<String> = if args.policies.is_empty() {
        vec![
            "identity".into(),
            format!("identity+stream:0:{}", args.window),
            format!("identity+stream:4:{}", args.window),
        ]
    } else {
        args.policies.clone()
    };
    let context = model.config().max_position_embeddings;
    let identity_limit = args.identity_limit.unwrap_or(context).min(args.tokens);
    eprintln!(
        "streaming {} tokens of {} through {} policies (model context {context}; identity stops at {identity_limit})",
        tokens.len(),
        text_path.display(),
        specs.len()
    );
    let mut series = Vec::new();
    let mut rows = Vec::new();
    for spec in &specs {
        let policy: Policy = layerkv::Policy::from_spec(spec, n)?;
        let full = (0..policy.layer_map().num_groups()).all(|g| policy.retention(g).is_full());
        let len = if full { identity_limit } else { tokens.len() };
        let pages = policy.layer_map().num_groups() * (len / 16 + args.chunk / 16 + 4);
        let mut e = Engine::new(
            model.clone(),
            Arc::new(policy),
            EngineConfig {
                num_pages: pages,
                prefill_chunk: args.chunk.max(1),
                kv_dtype: dtype,
                ..EngineConfig::default()
            },
        )?;
        let t0 = std::time::Instant::now();
        let (buckets, total) = stream_nll(&mut e, &tokens[..len], args.chunk, args.bucket)?;
        eprintln!(
            "{spec}: {len} tokens in {:.0} s, ppl {:.3}, peak KV {} bytes",
            t0.elapsed().as_secs_f64(),
            total.ppl,
            total.peak_kv_bytes
        );
        series.push((
            spec.clone(),
            buckets
                .iter()
                .map(|b| (b.start as f64 / 1000.0, b.nll))
                .collect::<Vec<_>>(),
        ));
        rows.push((spec.clone(), buckets, total));
    }
    // Table: one row per bucket, NLL and KV MiB per policy.
    let mut header = "| tokens |".to_string();
    let mut rule = "| --- |".to_string();
    for (spec, _, _) in &rows {
        header.push_str(&format!(" {spec} NLL | KV MiB | tok/s |"));
        rule.push_str(" --- | --- | --- |");
    }
    println!("{header}\n{rule}");
    let num_buckets = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    for b in 0..num_buckets {
        let mut line = format!("| {}k |", b * args.bucket / 1024);
        for (_, buckets, _) in &rows {
            match buckets.get(b) {
                Some(x) => line.push_str(&format!(
                    " {:.3} | {:.1} | {:.0} |",
                    x.nll,
                    x.kv_bytes as f64 / (1 << 20) as f64,
                    x.tokens_per_sec
                )),
                None => line.push_str(" - | - | - |"),
            }
        }
        println!("{line}");
    }
    for (spec, _, total) in &rows {
        println!(
            "{spec}: ppl {:.3} over {} tokens, peak KV {:.1} MiB, {:.0} tok/s",
            total.ppl,
            total.num_predicted + 1,
            total.peak_kv_bytes as f64 / (1 << 20) as f64,
            total.tokens_per_sec
        );
    }
    crate::plot::line_chart(
        &args.plot,
        "NLL per token while streaming",
        "tokens streamed (thousands)",
        "mean NLL per bucket (nats)",
        &series,
    )?;
    eprintln!("wrote {}", args.plot.display());
    if let Some(p) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|(spec, b, t)| {
                serde_json::json!({
                    "policy": spec,
                    "ppl": t.ppl,
                    "peak_kv_bytes": t.peak_kv_bytes,
                    "buckets": b.iter().map(|x| serde_json::json!({"start": x.start, "nll": x.nll, "kv_bytes": x.kv_bytes, "tokens_per_sec": x.tokens_per_sec})).collect::<Vec<_>>(),
                })
            })
            .collect();
        std::fs::write(p, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
