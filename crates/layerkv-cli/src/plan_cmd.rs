//! `layerkv plan`: how many sequences of a context length fit in a KV-memory budget, and the
//! longest single context, for the unmodified model and for a policy, from the same accounting
//! the cache enforces ([`layerkv::plan::Planner`]). Reads only the model's `config.json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use layerkv::plan::Planner;
use layerkv::{LayerKvPolicy, Policy};
use layerkv_model::{KvTypes, ModelConfig};

/// Options of `layerkv plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Model directory or GGUF file (only its config is read; default: the embedded default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Policies to plan (files or specs); identity is always the first row.
    #[arg(long = "policy", required = true)]
    policies: Vec<String>,
    /// KV-memory budget, e.g. `8GiB`, `512MiB`, `1.5GB`.
    #[arg(long, default_value = "8GiB")]
    budget: String,
    /// Context length per sequence, e.g. `32k`, `4096`.
    #[arg(long, default_value = "32k")]
    context: String,
    /// KV page type: f32, bf16, f16, q8_0, q4_0 or e4m3 (block scales counted), or `K,V` (e.g.
    /// `q8_0,q4_0`).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Token slots per page.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Window of the policy's sliding-window layers.
    #[arg(long)]
    window: Option<usize>,
    /// Tokens a step appends before retention runs (the prefill chunk).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
}

/// Parses `8GiB`, `512MiB`, `2GB`, `1e9` into bytes.
pub fn parse_bytes(text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("budget {text:?}: {num:?} is not a number"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => bail!("budget {text:?}: unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    if !(n.is_finite() && n > 0.0) {
        bail!("budget {text:?} must be positive");
    }
    Ok((n * scale) as usize)
}

/// Parses `32k`, `4096`, `1M` into tokens.
pub fn parse_tokens(text: &str) -> Result<usize> {
    let t = text.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix('k') {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1024 * 1024)
    } else {
        (t.as_str(), 1)
    };
    let n: usize = num
        .trim()
        .parse()
        .with_context(|| format!("context {text:?} is not a token count (e.g. 4096, 32k)"))?;
    if n == 0 {
        bail!("context must be positive");
    }
    Ok(n * scale)
}

pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024f64.powi(3) {
        format!("{:.2} GiB", b / 1024f64.powi(3))
    } else if b >= 1024f64.powi(2) {
        format!("{:.1} MiB", b / 1024f64.powi(2))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Runs the command: prints one row per policy.
pub fn run(args: PlanArgs) -> Result<()> {
    let dir = match &args.model {
        // A GGUF's config is in its header: no conversion needed.
        Some(p) if layerkv_model::assets::is_gguf_file(p)? => {
            layerkv_model::assets::gguf_metadata_dir(p)?
        }
        Some(p) => layerkv_model::assets::resolve_model(p)?,
        None => layerkv_model::assets::ensure_default_model()?,
    };
    let cfg = ModelConfig::load(&dir).with_context(|| format!("model {}", dir.display()))?;
    let kv = KvTypes::parse(&args.dtype).with_context(|| {
        format!(
            "unknown dtype {:?} (f32, bf16, f16, q8_0, q4_0, e4m3, or K,V such as q8_0,q4_0)",
            args.dtype
        )
    })?;
    kv.k.check_head_dim(cfg.head_dim())?;
    kv.v.check_head_dim(cfg.head_dim())?;
    if !args.block_size.is_power_of_two() {
        bail!(
            "--block-size must be a power of two, got {}",
            args.block_size
        );
    }
    let budget = parse_bytes(&args.budget)?;
    let context = parse_tokens(&args.context)?;
    let bytes_per_token = cfg.kv_bytes_per_token_per_layer(kv);
    let page_bytes = bytes_per_token * args.block_size;
    let num_pages = budget / page_bytes;
    let planner = Planner {
        block_size: args.block_size,
        sliding_window: args.window,
        model_window: cfg.sliding_window,
        step_tokens: args.chunk,
        lanes: cfg.num_key_value_heads,
    };
    let n = cfg.num_hidden_layers;
    let mut policies: Vec<Policy> = vec![Policy::identity(n)?];
    for p in &args.policies {
        policies.push(layerkv::Policy::from_spec(p, n)?);
    }
    println!(
        "model {} ({n} layers, {} KV heads x {}, {}), budget {} = {num_pages} pages of {} tokens ({}), context {context}",
        dir.display(),
        cfg.num_key_value_heads,
        cfg.head_dim(),
        args.dtype,
        human(budget),
        args.block_size,
        human(page_bytes),
    );
    println!("| policy | KV groups | KV per sequence at {context} | sequences that fit | longest single context |");
    println!("| --- | --- | --- | --- | --- |");
    let limit = 1 << 26;
    for p in &policies {
        let map = p.layer_map();
        if let Some(l) = (0..n).find(|&l| map.is_sliding(l)) {
            if args.window.is_none() {
                bail!(
                    "policy {}: layer {l} slides but no --window is given",
                    p.name()
                );
            }
        }
        // A per-head policy's pages hold one KV head: smaller, and more of them in the budget.
        let lanes = planner.lanes_of(p);
        let page_bytes = page_bytes / lanes;
        let num_pages = budget / page_bytes.max(1);
        let pages = planner.pages_per_sequence(p, context);
        let fit = planner.max_sequences(p, context, num_pages);
        let longest = match planner.max_context(p, num_pages, limit) {
            None => "unbounded (memory stays flat)".to_string(),
            Some(0) => "none fits".to_string(),
            Some(t) => format!("{t} tokens"),
        };
        let fit = if fit == 0 {
            format!("none (one needs {})", human(pages * page_bytes))
        } else {
            fit.to_string()
        };
        println!(
            "| {} | {} | {} | {fit} | {longest} |",
            p.name(),
            map.num_groups(),
            human(pages * page_bytes),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert!(parse_bytes("8 parsecs").is_err());
        assert!(parse_bytes("-1GiB").is_err());
        assert_eq!(parse_tokens("32k").unwrap(), 32768);
        assert_eq!(parse_tokens("4096").unwrap(), 4096);
        assert!(parse_tokens("lots").is_err());
    }
}
