//! `layerkv serve`: an OpenAI-compatible server for a model under a policy, with continuous
//! batching in a KV pool of `--kv-budget` bytes (see `layerkv_server`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerkv::{LayerKvPolicy, Policy, SchedulerConfig};
use layerkv_model::batch::Batcher;
use layerkv_model::{Session, SessionOptions};

use crate::device::DeviceArgs;
use crate::generate_cmd::load_model;
use crate::plan_cmd::{human, parse_bytes};

/// Flags of `layerkv serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Policy spec or file (see `layerkv policy --help`).
    #[arg(long, default_value = "identity")]
    pub policy: String,
    /// Window of the policy's sliding layers, if its map has any.
    #[arg(long)]
    pub window: Option<usize>,
    /// KV memory for all requests together, e.g. `512MiB`, `2GiB`.
    #[arg(long, default_value = "512MiB")]
    pub kv_budget: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests running at once, at most.
    #[arg(long, default_value_t = 64)]
    pub max_seqs: usize,
    /// Tokens per engine step, at most (decodes + one prefill chunk; default: a chunk beside
    /// every other request's decode).
    #[arg(long)]
    pub max_batched_tokens: Option<usize>,
    /// Requests waiting at most; more are refused with 429.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Admit requests whose planned peaks add up to this many times the pool (1: never run out
    /// of pages; above 1, preemption by recompute handles the shortfall).
    #[arg(long, default_value_t = 1.0)]
    pub overcommit: f64,
    /// Prompt tokens per request per step: retention runs between chunks, so under a policy
    /// that evicts, a request's peak is its kept tokens plus one chunk (smaller chunks admit
    /// more requests; larger ones prefill faster).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Reuse the KV pages of prompt prefixes across requests (a shared system prompt is
    /// computed once). Only for policies that never evict; others ignore it.
    #[arg(long)]
    pub prefix_caching: bool,
    /// A reply's length when the request gives no `max_tokens`.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// The model name clients pass (default: a GGUF file's name without `.gguf`, else the model
    /// directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs the server until SIGINT or SIGTERM, then answers what is in flight and exits.
pub fn run(args: ServeArgs) -> Result<()> {
    if !(args.overcommit >= 1.0 && args.overcommit.is_finite()) {
        bail!("--overcommit must be at least 1, got {}", args.overcommit);
    }
    let budget = parse_bytes(&args.kv_budget)?;
    let (dir, model, dtype) = load_model(args.model.as_ref(), &args.device)?;
    let policy = Policy::from_spec(&args.policy, model.num_layers())
        .with_context(|| format!("--policy {}", args.policy))?;
    let page_bytes = Session::page_bytes_for(&model, &policy, dtype);
    let num_pages = budget / page_bytes;
    let groups = policy.layer_map().num_groups()
        * layerkv_model::kv_lanes(model.config().num_key_value_heads, &policy);
    if num_pages < groups {
        bail!(
            "--kv-budget {}: {} pages of {} bytes, fewer than the policy's {groups} KV groups",
            args.kv_budget,
            num_pages,
            page_bytes
        );
    }
    let options = SessionOptions {
        max_context: model.config().max_position_embeddings,
        kv_dtype: dtype,
        sliding_window: args.window,
        num_pages: Some(num_pages),
        prefill_chunk: Some(args.prefill_chunk),
        prefix_caching: args.prefix_caching,
        ..SessionOptions::default()
    };
    let session = Session::new(&dir, model, policy, options)
        .with_context(|| format!("a session under --policy {}", args.policy))?;
    let chunk = session.engine().config().prefill_chunk;
    let config = SchedulerConfig {
        max_num_seqs: args.max_seqs,
        max_num_batched_tokens: args
            .max_batched_tokens
            .unwrap_or(chunk + args.max_seqs.max(1) - 1),
        prefill_chunk: chunk,
        max_waiting: args.max_waiting,
        admission_pages: (args.overcommit > 1.0)
            .then_some((num_pages as f64 * args.overcommit) as usize),
    };
    let batcher = Batcher::new(session, config).context("the scheduler's sizes")?;
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(args.model.as_deref(), &dir));
    let policy_name = batcher.session().policy_name().to_string();
    let (engine, thread) =
        layerkv_server::EngineHandle::spawn(batcher, name.clone(), args.max_tokens);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "serving {name:?} under {policy_name} with a KV pool of {} ({num_pages} pages of \
             {page_bytes} bytes)",
            human(num_pages * page_bytes)
        );
        println!("listening on http://{local}");
        layerkv_server::serve(listener, engine, layerkv_server::shutdown_signal())
            .await
            .context("serving")
    })?;
    eprintln!("shutting down: answering the requests in flight");
    thread.join();
    Ok(())
}

/// The served name when `--served-model-name` is not given: a model file's stem (a GGUF runs
/// from a cache directory whose name clients could not guess), else the directory's name.
fn default_name(model: Option<&Path>, dir: &Path) -> String {
    let name = match model {
        Some(m) if m.is_file() => m.file_stem(),
        _ => dir.file_name(),
    };
    name.map_or("model".into(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gguf_is_served_under_its_file_name() {
        let dir = layerkv_testkit::scratch("serve-name");
        let file = dir.join("qwen2.5-0.5b.Q5_0.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let cache = Path::new("/cache/gguf-qwen2.5-0.5b-3b7f-meta");
        assert_eq!(default_name(Some(&file), cache), "qwen2.5-0.5b.Q5_0");
        // A directory (or the default model) keeps the directory's name.
        assert_eq!(default_name(Some(&dir), Path::new("/m/SmolLM2")), "SmolLM2");
        assert_eq!(default_name(None, Path::new("/m/SmolLM2")), "SmolLM2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
