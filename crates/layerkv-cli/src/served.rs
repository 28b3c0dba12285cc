//! The demo's served run: the same burst of requests through the real server on loopback
//! (`layerkv_server`: HTTP, the engine thread, continuous batching) under each policy, at one
//! KV budget: as many pages as identity needs for two of the requests. A policy that holds
//! less admits more of the burst at once.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use layerkv::{Policy, SchedulerConfig};
use layerkv_model::batch::Batcher;
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::{Model, Session, SessionOptions};
use layerkv_server::bench::{BenchConfig, BenchReport};
use serde::Serialize;

use crate::report::truncate_start;

/// Flags of the demo's served run.
#[derive(clap::Args, Clone)]
pub struct ServedOpts {
    /// Requests in the served burst (0: no served run).
    #[arg(long, default_value_t = 12)]
    pub served_requests: usize,
    /// Prompt tokens of each served request (capped to fit the model's context).
    #[arg(long, default_value_t = 768)]
    pub served_prompt: usize,
    /// Tokens each served request generates.
    #[arg(long, default_value_t = 32)]
    pub served_max_tokens: usize,
    /// Prefill chunk of the served run (a window policy's peak is its window plus a chunk).
    #[arg(long, default_value_t = 32)]
    pub served_chunk: usize,
    /// Context length of the retrieval check (a pass key at three depths, both query modes;
    /// capped to the model's context less 1024; 0: no check).
    #[arg(long, default_value_t = 1024)]
    pub retrieval_len: usize,
}

/// One policy's served run.
#[derive(Debug, Clone, Serialize)]
pub struct ServedRow {
    /// The policy.
    pub policy: String,
    /// The KV pool in bytes (the same for every row).
    pub budget_bytes: usize,
    /// The load benchmark's report.
    pub report: BenchReport,
}

/// Serves the burst under each policy; returns a row per policy.
pub fn run(
    dir: &Path,
    model: &Arc<Model>,
    dtype: layerkv_model::KvTypes,
    tokenizer: &Tokenizer,
    text: &str,
    policies: &[Policy],
    opts: &ServedOpts,
) -> Result<Vec<ServedRow>> {
    let context = model.config().max_position_embeddings;
    let max_tokens = opts.served_max_tokens.max(1);
    let prompt = opts
        .served_prompt
        .min(context.saturating_sub(max_tokens + 64))
        .max(8);
    let sample: String = text.chars().take(40_000).collect();
    let chars_per_token = sample.chars().count() as f64 / tokenizer.encode(&sample)?.len() as f64;
    // Two of the requests under identity, in whole pages per layer.
    let page_bytes = Session::page_bytes_for(model, &Policy::identity(model.num_layers())?, dtype);
    let pages_per_layer = (prompt + max_tokens + 16).div_ceil(16);
    let num_pages = 2 * pages_per_layer * model.num_layers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for policy in policies {
        let name = policy.name().to_string();
        let options = SessionOptions {
            max_context: context,
            kv_dtype: dtype,
            // A per-head policy's pages hold one KV head: as many more of them in the same bytes.
            num_pages: Some(
                num_pages * layerkv_model::kv_lanes(model.config().num_key_value_heads, policy),
            ),
            prefill_chunk: Some(opts.served_chunk),
            ..SessionOptions::default()
        };
        let session = Session::new(dir, model.clone(), policy.clone(), options)
            .with_context(|| format!("a served session under {name}"))?;
        let config = SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: opts.served_chunk + 63,
            prefill_chunk: opts.served_chunk,
            ..SchedulerConfig::default()
        };
        let batcher = Batcher::new(session, config)?;
        let (engine, thread) = layerkv_server::EngineHandle::spawn(batcher, "demo".into(), 64);
        let bench = BenchConfig {
            url: String::new(),
            model: None,
            rate: None,
            requests: opts.served_requests,
            max_concurrency: opts.served_requests,
            prompt_tokens: prompt,
            chars_per_token,
            max_tokens,
            text: text.to_string(),
            seed: 7,
            disconnect: 0.0,
            ban_tokens: Vec::new(),
        };
        let report = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(layerkv_server::serve(listener, engine, async {
                let _ = stopped.await;
            }));
            let report = layerkv_server::bench::run(&BenchConfig { url, ..bench }).await;
            let _ = stop.send(());
            server.await??;
            report.map_err(|e| anyhow::anyhow!("the served run under {name}: {e}"))
        })?;
        thread.join();
        anyhow::ensure!(
            report.errors == 0 && report.completed == opts.served_requests,
            "the served run under {}: {} of {} requests answered ({})",
            policy.name(),
            report.completed,
            opts.served_requests,
            report.first_error.as_deref().unwrap_or("no error text")
        );
        rows.push(ServedRow {
            policy: policy.name().to_string(),
            budget_bytes: num_pages * page_bytes,
            report,
        });
    }
    Ok(rows)
}

/// The served rows as a table, ratios against the first (identity) row.
pub fn table(rows: &[ServedRow]) -> String {
    let Some(base) = rows.first() else {
        return String::new();
    };
    let mut s = format!(
        "{:<40} {:>8} {:>7} {:>11} {:>7} {:>8}\n",
        "served policy", "req/s", "x", "p99 TTFT s", "x", "running"
    );
    for r in rows {
        let b = &r.report;
        s += &format!(
            "{:<40} {:>8.3} {:>7.2} {:>11.2} {:>7.2} {:>8}\n",
            truncate_start(&r.policy, 40),
            b.request_throughput,
            b.request_throughput / base.report.request_throughput.max(1e-12),
            b.ttft.p99_ms / 1e3,
            b.ttft.p99_ms / base.report.ttft.p99_ms.max(1e-12),
            b.peak_running.map_or("n/a".into(), |p| format!("{p:.0}"))
        );
    }
    s
}
