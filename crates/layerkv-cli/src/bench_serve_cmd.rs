//! `layerkv bench-serve`: the load benchmark against any OpenAI-compatible server (see
//! `layerkv_server::bench`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use layerkv_server::bench::{run as bench, table, BenchConfig};

/// Flags of `layerkv bench-serve`.
#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`.
    #[arg(long)]
    pub url: String,
    /// `model` of the requests (default: none sent; servers use their one model).
    #[arg(long)]
    pub model: Option<String>,
    /// Mean request arrivals per second (Poisson), or `inf` to send them all at once.
    #[arg(long, default_value = "inf")]
    pub rate: String,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub max_concurrency: usize,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Characters per token of the server's tokenizer (to cut prompts).
    #[arg(long, default_value_t = 4.0)]
    pub chars_per_token: f64,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Text the prompts are cut from (default: the Jargon File, fetched on first use).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Seed of the arrivals and prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of clients that disconnect after their first streamed chunk (soak testing).
    #[arg(long, default_value_t = 0.0)]
    pub disconnect: f64,
    /// Token ids to ban with `logit_bias` -100 (comma-separated), for servers that ignore
    /// `ignore_eos`: pass the model's end-of-sequence ids so they generate `--max-tokens` too.
    #[arg(long, value_delimiter = ',')]
    pub ban_tokens: Vec<u32>,
    /// Also write the report as JSON to this file (`-`: stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs the benchmark and prints its table.
pub fn run(args: BenchServeArgs) -> Result<()> {
    let rate = match args.rate.as_str() {
        "inf" => None,
        r => {
            let r: f64 = r
                .parse()
                .with_context(|| format!("--rate {r:?}: a number or inf"))?;
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rate must be positive, got {r}");
            }
            Some(r)
        }
    };
    if !(0.0..=1.0).contains(&args.disconnect) {
        bail!("--disconnect must be in [0, 1], got {}", args.disconnect);
    }
    let path = match &args.text {
        Some(p) => p.clone(),
        None => {
            layerkv_model::assets::ensure_default_texts()
                .context("fetching the Jargon File")?
                .jargon
        }
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = BenchConfig {
        url: args.url.clone(),
        model: args.model.clone(),
        rate,
        requests: args.requests,
        max_concurrency: args.max_concurrency,
        prompt_tokens: args.prompt_tokens,
        chars_per_token: args.chars_per_token,
        max_tokens: args.max_tokens,
        text,
        seed: args.seed,
        disconnect: args.disconnect,
        ban_tokens: args.ban_tokens.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime
        .block_on(bench(&config))
        .map_err(|e| anyhow::anyhow!("bench-serve against {}: {e}", args.url))?;
    let stdout_json = args.json.as_deref() == Some(std::path::Path::new("-"));
    let out = table(&report);
    if stdout_json {
        eprint!("{out}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{out}");
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
    }
    Ok(())
}
