//! `layerkv calibrate`: KVSharer's training-free calibration on a real model and text, written
//! as a policy file plus, beside it, the layer distance matrix (`.distances.json`), its heatmap
//! (`.heatmap.png`) and the calibration NLL after each accepted layer (`.steps.png`).
//!
//! Samples are the first `--samples` paragraphs (blank-line separated, whitespace collapsed) of
//! the text with at least `--sample-len` tokens, each truncated to `--sample-len` tokens: the
//! same text and options always give the same samples. The search is
//! [`layerkv::calibrate::calibrate`] over [`EngineCalibrator`]; every scored candidate is
//! printed to stderr. Cost: one dense forward per sample for the distances, then one engine run
//! of all samples per scored candidate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use layerkv::calibrate::{
    calibrate, Acceptance, CalibrationConfig, CalibrationModel, Candidate, PairOrder, ShareTarget,
};
use layerkv::PolicyBuilder;
use layerkv_model::calibrate::EngineCalibrator;
use layerkv_model::engine::EngineConfig;
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::Model;

use crate::plot;

/// Options of `layerkv calibrate`.
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// Model directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration text (default: the Python 3.11 docs).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Number of calibration samples.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 64)]
    sample_len: usize,
    /// Fraction of layers that should share, in [0, 1).
    #[arg(long, default_value_t = 0.25)]
    share: f64,
    /// Number of layers that should share (instead of --share).
    #[arg(long, conflicts_with = "share")]
    layers: Option<usize>,
    /// Pair order: KVSharer's dissimilar-first, or an ablation.
    #[arg(long, value_enum, default_value_t = OrderArg::Dissimilar)]
    order: OrderArg,
    /// Seed of `--order random`.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Acceptance rule: mean cosine of final hidden states, or relative NLL increase.
    #[arg(long, value_enum, default_value_t = AcceptArg::Cosine)]
    accept: AcceptArg,
    /// Threshold of the rule: cosine must exceed it (default 0.5); with `nll`, the largest
    /// allowed relative NLL increase (default 0.05 = 5%).
    #[arg(long)]
    threshold: Option<f64>,
    /// Policy file to write (.toml or .json); the distances and the heatmap go beside it.
    #[arg(long, short, default_value = "policy.toml")]
    output: PathBuf,
}

/// `--order`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum OrderArg {
    Dissimilar,
    Similar,
    Random,
    Adjacent,
}

/// `--accept`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptArg {
    Cosine,
    Nll,
}

impl CalibrateArgs {
    fn config(&self) -> CalibrationConfig {
        let order = match self.order {
            OrderArg::Dissimilar => PairOrder::Dissimilar,
            OrderArg::Similar => PairOrder::Similar,
            OrderArg::Random => PairOrder::Random { seed: self.seed },
            OrderArg::Adjacent => PairOrder::Adjacent,
        };
        let acceptance = match self.accept {
            AcceptArg::Cosine => Acceptance::Cosine {
                threshold: self.threshold.unwrap_or(0.5),
            },
            AcceptArg::Nll => Acceptance::Nll {
                max_increase: self.threshold.unwrap_or(0.05),
            },
        };
        let target = match self.layers {
            Some(k) => ShareTarget::Layers(k),
            None => ShareTarget::Fraction(self.share),
        };
        CalibrationConfig {
            target,
            order,
            acceptance,
        }
    }
}

/// `path` with its extension replaced by `suffix` (`policy.toml` -> `policy.distances.json`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    path.with_extension(suffix)
}

/// The first `count` paragraphs of `text` with at least `len` tokens, truncated to `len`.
pub fn samples(
    tokenizer: &Tokenizer,
    text: &str,
    count: usize,
    len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(count);
    for paragraph in text.split("\n\n") {
        if out.len() == count {
            break;
        }
        let joined = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        if joined.len() < len {
            continue; // fewer bytes than tokens wanted: cannot have enough tokens
        }
        let mut ids = tokenizer.encode(&joined)?;
        if ids.len() >= len {
            ids.truncate(len);
            out.push(ids);
        }
    }
    Ok(out)
}

/// Runs the command.
pub fn run(args: CalibrateArgs) -> Result<()> {
    let t0 = Instant::now();
    if args.sample_len < 2 {
        bail!("--sample-len must be at least 2 (got {})", args.sample_len);
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => {
            layerkv_model::assets::ensure_default_model().context("fetching the default model")?
        }
    };
    let text_path = match &args.text {
        Some(t) => t.clone(),
        None => {
            layerkv_model::assets::ensure_default_texts()
                .context("fetching the default texts")?
                .python_docs
        }
    };
    let model = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu)?);
    let tokenizer = layerkv_model::tokenizer::load(&dir)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let samples = samples(&tokenizer, &text, args.samples, args.sample_len)?;
    if samples.is_empty() {
        bail!(
            "{} has no paragraph of at least {} tokens",
            text_path.display(),
            args.sample_len
        );
    }
    if samples.len() < args.samples {
        eprintln!(
            "warning: only {} paragraphs of {} has at least {} tokens; calibrating on those",
            samples.len(),
            text_path.display(),
            args.sample_len
        );
    }
    let config = args.config();
    let n = model.num_layers();
    let pages_per_group = args.sample_len.div_ceil(16);
    let engine_config = EngineConfig {
        block_size: 16,
        num_pages: pages_per_group * n + 16,
        ..EngineConfig::default()
    };
    let mut calibrator = EngineCalibrator::new(model.clone(), engine_config);
    eprintln!(
        "calibrating {} ({n} layers) on {} samples of {} tokens from {}: target {:?}, order {}, rule {:?}",
        dir.display(),
        samples.len(),
        args.sample_len,
        text_path.display(),
        config.target,
        config.order,
        config.acceptance
    );
    let mut report = |c: &Candidate| {
        eprintln!(
            "pair {:>2}->{:<2}{} distance {:>8.3}  score {:>8.5}  nll {:.4}  {}  (shared {})",
            c.layer,
            c.pair_source,
            if c.source == c.pair_source {
                String::from("       ")
            } else {
                format!(" (={:>2})", c.source)
            },
            c.distance,
            c.score,
            c.nll,
            if c.accepted { "accepted" } else { "rejected" },
            c.num_shared
        );
    };
    let result = calibrate(&mut calibrator, &samples, &config, &mut report)?;
    debug_assert_eq!(calibrator.num_layers(), n);

    let name = format!(
        "kvsharer-{}-{}of{}",
        match args.order {
            OrderArg::Dissimilar => "dissimilar",
            OrderArg::Similar => "similar",
            OrderArg::Random => "random",
            OrderArg::Adjacent => "adjacent",
        },
        result.num_shared(),
        n
    );
    let policy = PolicyBuilder::new(result.map.clone()).name(name).build()?;
    policy
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let json_path = beside(&args.output, "distances.json");
    std::fs::write(&json_path, result.distances.to_json())
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = beside(&args.output, "heatmap.png");
    let title = format!(
        "KVSharer layer distances ({})",
        dir.file_name().map_or_else(
            || dir.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        )
    );
    if let Err(e) = plot::heatmap(&png_path, result.distances.rows(), &title, "layer") {
        eprintln!("warning: heatmap not written: {e:#}");
    }
    // Quality after each accepted step (DESIGN.md: "quality and memory after each step").
    let steps_path = beside(&args.output, "steps.png");
    let mut steps = vec![(0.0, result.reference_nll)];
    steps.extend(
        result
            .candidates
            .iter()
            .filter(|c| c.accepted)
            .map(|c| (c.num_shared as f64, c.nll)),
    );
    let series = [(String::from("calibration NLL"), steps)];
    let steps_title = "KVSharer: calibration NLL after each accepted layer";
    if let Err(e) = plot::line_chart(
        &steps_path,
        steps_title,
        "shared layers",
        "mean NLL (nats)",
        &series,
    ) {
        eprintln!("warning: step chart not written: {e:#}");
    }

    println!(
        "{} of {} target layers share ({}): map {}",
        result.num_shared(),
        result.target_shared,
        if result.reached_target() {
            "target reached"
        } else {
            "pairs exhausted before the target"
        },
        result.map
    );
    println!(
        "pairs {:?}; KV kept {:.1}% of layers; calibration NLL {:.4} -> {:.4}, cosine {:.4}; hidden-state readout {:?}",
        result.pairs,
        100.0 * result.map.kv_fraction(),
        result.reference_nll,
        result.final_nll,
        result.final_cosine,
        calibrator.readout()
    );
    println!(
        "scored {} candidates ({} pairs skipped); wrote {}, {}, {}, {}; total {:.1}s",
        result.candidates.len(),
        result.num_skipped,
        args.output.display(),
        json_path.display(),
        png_path.display(),
        steps_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_sit_beside_the_policy() {
        assert_eq!(
            beside(Path::new("out/policy.toml"), "distances.json"),
            PathBuf::from("out/policy.distances.json")
        );
        assert_eq!(
            beside(Path::new("p.json"), "heatmap.png"),
            PathBuf::from("p.heatmap.png")
        );
    }

    #[test]
    fn flags_build_the_config() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: CalibrateArgs,
        }
        let w = Wrap::try_parse_from([
            "x", "--layers", "3", "--order", "random", "--seed", "9", "--accept", "nll",
        ])
        .unwrap();
        let c = w.args.config();
        assert_eq!(c.target, ShareTarget::Layers(3));
        assert_eq!(c.order, PairOrder::Random { seed: 9 });
        assert_eq!(c.acceptance, Acceptance::Nll { max_increase: 0.05 });
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert_eq!(w.args.config(), CalibrationConfig::default());
        assert!(Wrap::try_parse_from(["x", "--layers", "3", "--share", "0.5"]).is_err());
    }
}
