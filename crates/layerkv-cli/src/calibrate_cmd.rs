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
//!
//! The retrieval rule (`--retrieval-probes N`, default 3; 0 turns it off): `N` pass keys hidden
//! in the calibration text at `--retrieval-len` tokens (depths spread evenly), asked through the
//! chat template under the unmodified model and then under every candidate the acceptance rule
//! accepts; a candidate that loses a pass key the current map finds is rejected. Perplexity and
//! hidden-state similarity do not see a forgotten fact; this does. Cost: `N` chats of
//! `--retrieval-len` tokens per probed map.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use layerkv::calibrate::{
    calibrate, Acceptance, Calibration, CalibrationConfig, Candidate, PairOrder, ShareTarget,
};
use layerkv::{LayerMap, Policy, PolicyBuilder};
use layerkv_model::calibrate::{text_samples, EngineCalibrator, RetrievalProbes};
use layerkv_model::engine::EngineConfig;
use layerkv_model::needle::{Generator, Grid, Task};
use layerkv_model::SessionOptions;

use crate::device::DeviceArgs;
use crate::plot;

/// Options of `layerkv calibrate`.
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// Model directory (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Calibration text (default: the Python 3.11 docs).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Number of calibration samples.
    #[arg(long, default_value_t = 30)]
    pub samples: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tokens per sample.
    #[arg(long, default_value_t = 64)]
    pub sample_len: usize,
    /// Fraction of layers that should share, in [0, 1).
    #[arg(long, default_value_t = 0.25)]
    pub share: f64,
    /// Number of layers that should share (instead of --share).
    #[arg(long, conflicts_with = "share")]
    pub layers: Option<usize>,
    /// Pair order: dissimilar (KVSharer), similar, random[:SEED], adjacent.
    #[arg(long, default_value = "dissimilar", value_parser = parse_order)]
    pub order: OrderSpec,
    /// Seed of `--order random` without `:SEED`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Acceptance rule: cosine[:T] (mean cosine of final hidden states > T, default 0.5) or
    /// nll[:T] (calibration NLL at most (1 + T) x the unmodified model's, default 0.05).
    #[arg(long, default_value = "cosine", value_parser = parse_accept)]
    pub accept: AcceptSpec,
    /// Threshold of the rule (instead of `--accept RULE:T`).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Stop after scoring this many candidates (a strict rule may otherwise score every pair).
    #[arg(long)]
    pub max_candidates: Option<usize>,
    /// Also write the map after this many accepted layers (comma-separated counts), as
    /// `OUTPUT` with the extension `K.toml`: the same search stopped at `K`.
    #[arg(long, value_delimiter = ',')]
    pub save_at: Vec<usize>,
    /// Retrieval probes (pass keys in the text, query-aware, greedy): a candidate that loses
    /// one the current map finds is rejected. 0 turns the rule off.
    #[arg(long, default_value_t = 3)]
    pub retrieval_probes: usize,
    /// Context length of the retrieval probes, in tokens (capped by the model's context).
    #[arg(long, default_value_t = 1024)]
    pub retrieval_len: usize,
    /// Calibrate head roles instead of a sharing map (DuoAttention-style): score every KV head
    /// on pass-key probes from the text and write a per-head policy whose retrieval heads
    /// keep every token and whose other heads keep `--others` (see `heads_cmd`).
    #[arg(long)]
    pub heads: bool,
    /// `--heads`: pass-key probes per half (two halves, seeds `--seed` and `--seed + 1`, whose
    /// picks give the stability figure).
    #[arg(long, default_value_t = 6)]
    pub head_probes: usize,
    /// `--heads`: the fraction of KV heads (lanes) that keep every token.
    #[arg(long, default_value_t = 0.2)]
    pub retrieval_heads: f64,
    /// `--heads`: the retention of the other heads (`stream:SINKS:WINDOW`, or any retention of
    /// a policy spec).
    #[arg(long, default_value = "stream:4:60")]
    pub others: String,
    /// Policy file to write (.toml or .json); the distances, the candidates and the plots go
    /// beside it.
    #[arg(long, short, default_value = "policy.toml")]
    pub output: PathBuf,
}

/// `--order`: the order, and whether a random order named its seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderSpec {
    order: PairOrder,
    seeded: bool,
}

impl From<PairOrder> for OrderSpec {
    fn from(order: PairOrder) -> Self {
        Self {
            order,
            seeded: true,
        }
    }
}

impl From<Acceptance> for AcceptSpec {
    fn from(a: Acceptance) -> Self {
        match a {
            Acceptance::Cosine { threshold } => Self {
                nll: false,
                threshold: Some(threshold),
            },
            Acceptance::Nll { max_increase } => Self {
                nll: true,
                threshold: Some(max_increase),
            },
        }
    }
}

/// `--accept`: the rule and its threshold, when given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptSpec {
    nll: bool,
    threshold: Option<f64>,
}

fn parse_order(text: &str) -> std::result::Result<OrderSpec, String> {
    match text.split_once(':') {
        None => match text {
            "dissimilar" => Ok(PairOrder::Dissimilar.into()),
            "similar" => Ok(PairOrder::Similar.into()),
            "adjacent" => Ok(PairOrder::Adjacent.into()),
            // The seed comes from --seed (0 unless given); see CalibrateArgs::config.
            "random" => Ok(OrderSpec {
                order: PairOrder::Random { seed: 0 },
                seeded: false,
            }),
            other => Err(format!(
                "unknown order {other:?} (dissimilar, similar, random[:SEED], adjacent)"
            )),
        },
        Some(("random", seed)) => seed
            .parse()
            .map(|seed| PairOrder::Random { seed }.into())
            .map_err(|_| format!("random:{seed}: the seed is not a whole number")),
        Some(_) => Err(format!(
            "unknown order {text:?} (dissimilar, similar, random[:SEED], adjacent)"
        )),
    }
}

fn parse_accept(text: &str) -> std::result::Result<AcceptSpec, String> {
    let (rule, threshold) = match text.split_once(':') {
        None => (text, None),
        Some((r, t)) => (
            r,
            Some(
                t.parse::<f64>()
                    .map_err(|_| format!("{text}: {t:?} is not a number"))?,
            ),
        ),
    };
    match rule {
        "cosine" => Ok(AcceptSpec {
            nll: false,
            threshold,
        }),
        "nll" => Ok(AcceptSpec {
            nll: true,
            threshold,
        }),
        other => Err(format!("unknown rule {other:?} (cosine[:T], nll[:T])")),
    }
}

impl CalibrateArgs {
    /// `--text`, or the default calibration text (the Python docs, fetched on first use).
    pub fn text_path(&self) -> Result<PathBuf> {
        Ok(match &self.text {
            Some(t) => t.clone(),
            None => {
                layerkv_model::assets::ensure_default_texts()
                    .context("fetching the default texts")?
                    .python_docs
            }
        })
    }

    /// The search settings these options ask for.
    pub fn config(&self) -> CalibrationConfig {
        let order = match self.order {
            OrderSpec {
                order: PairOrder::Random { seed },
                seeded: false,
            } => PairOrder::Random {
                seed: self.seed.unwrap_or(seed),
            },
            spec => spec.order,
        };
        let threshold = self.threshold.or(self.accept.threshold);
        let acceptance = if self.accept.nll {
            Acceptance::Nll {
                max_increase: threshold.unwrap_or(0.05),
            }
        } else {
            Acceptance::Cosine {
                threshold: threshold.unwrap_or(0.5),
            }
        };
        let target = match self.layers {
            Some(k) => ShareTarget::Layers(k),
            None => ShareTarget::Fraction(self.share),
        };
        CalibrationConfig {
            target,
            order,
            acceptance,
            max_candidates: self.max_candidates,
        }
    }
}

/// `path` with its extension replaced by `suffix` (`policy.toml` -> `policy.distances.json`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    path.with_extension(suffix)
}

/// Short names of the search settings (policy names, cache keys): `dissimilar`, `random7`,
/// `cos0.5`, `nll0.05`.
pub fn order_name(order: &PairOrder) -> String {
    match order {
        PairOrder::Random { seed } => format!("random{seed}"),
        other => other.to_string(),
    }
}

/// See [`order_name`].
pub fn acceptance_name(acceptance: &Acceptance) -> String {
    match acceptance {
        Acceptance::Cosine { threshold } => format!("cos{threshold}"),
        Acceptance::Nll { max_increase } => format!("nll{max_increase}"),
    }
}

/// A calibrated map as a named policy.
fn policy_of(map: &LayerMap, config: &CalibrationConfig, num_layers: usize) -> Result<Policy> {
    let name = format!(
        "kvsharer-{}-{}-{}of{num_layers}",
        order_name(&config.order),
        acceptance_name(&config.acceptance),
        num_layers - map.num_groups(),
    );
    Ok(PolicyBuilder::new(map.clone()).name(name).build()?)
}

/// What [`calibrate_to_file`] did.
#[derive(Debug)]
pub struct Calibrated {
    /// The search's result.
    pub calibration: Calibration,
    /// The policy file written.
    pub policy_path: PathBuf,
    /// The calibration text.
    pub text: PathBuf,
    /// Samples used (fewer than asked when the text has fewer long paragraphs).
    pub num_samples: usize,
    /// Wall time of the search (distances, reference and candidate runs), seconds.
    pub search_seconds: f64,
}

/// Calibrates on the model and text of `args` and writes the policy file and, beside it, the
/// distances (`.distances.json`), every candidate with the settings and the wall time
/// (`.candidates.json`), the heatmap (`.heatmap.png`), the NLL after each accepted layer
/// (`.steps.png`) and the `--save-at` maps. Progress goes to stderr unless `quiet`.
pub fn calibrate_to_file(args: &CalibrateArgs, quiet: bool) -> Result<Calibrated> {
    let text_path = args.text_path()?;
    let (dir, model, dtype) = args.device.load_model(args.model.as_deref())?;
    let tokenizer = layerkv_model::tokenizer::load(&dir)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let samples = text_samples(&tokenizer, &text, args.samples, args.sample_len)
        .with_context(|| format!("calibration samples of {}", text_path.display()))?;
    if samples.len() < args.samples {
        eprintln!(
            "warning: only {} paragraphs of {} have at least {} tokens; calibrating on those",
            samples.len(),
            text_path.display(),
            args.sample_len
        );
    }
    let config = args.config();
    let n = model.num_layers();
    let engine_config = EngineConfig {
        kv_dtype: dtype,
        ..EngineConfig::default()
    };
    let mut calibrator = EngineCalibrator::new(model.clone(), engine_config);
    let probe_len = crate::retrieval::length(&model, args.retrieval_len);
    if args.retrieval_probes > 0 && probe_len.is_none() {
        eprintln!(
            "warning: the model's context ({} tokens) leaves no room for a pass-key probe of at \
             least 128 tokens; calibrating without the retrieval rule",
            model.config().max_position_embeddings
        );
    }
    if let Some(length) = probe_len.filter(|_| args.retrieval_probes > 0) {
        let n = args.retrieval_probes;
        let grid = Grid {
            tasks: vec![Task::Passkey],
            lengths: vec![length],
            depths: (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect(),
            samples: 1,
        };
        let samples = Generator::new(&text, &tokenizer)
            .and_then(|g| g.grid(&grid, 0))
            .with_context(|| format!("retrieval probes from {}", text_path.display()))?;
        calibrator = calibrator.with_retrieval(RetrievalProbes {
            model_dir: dir.clone(),
            samples,
            options: SessionOptions {
                max_context: length + crate::retrieval::SLACK,
                kv_dtype: dtype,
                ..SessionOptions::default()
            },
        });
    }
    if !quiet {
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
    }
    let mut report = |c: &Candidate| {
        if quiet {
            return;
        }
        let retrieval = match (c.retrieval, c.lost_retrieval) {
            (Some(r), true) => format!("  retrieval {r} (lost a pass key)"),
            (Some(r), false) => format!("  retrieval {r}"),
            (None, _) => String::new(),
        };
        eprintln!(
            "pair {:>2}->{:<2}{} distance {:>8.3}  cosine {:>8.5}  nll {:.4}  {}{retrieval}  (shared {})",
            c.layer,
            c.pair_source,
            if c.source == c.pair_source {
                String::from("      ")
            } else {
                format!(" (={:>2})", c.source)
            },
            c.distance,
            c.cosine,
            c.nll,
            if c.accepted { "accepted" } else { "rejected" },
            c.num_shared
        );
    };
    let t0 = Instant::now();
    let result = calibrate(&mut calibrator, &samples, &config, &mut report)?;
    let search_seconds = t0.elapsed().as_secs_f64();

    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let policy = policy_of(&result.map, &config, n)?;
    policy
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    for &k in &args.save_at {
        let Some(map) = result.map_at(k) else {
            eprintln!(
                "warning: --save-at {k}: only {} layers were accepted",
                result.num_shared()
            );
            continue;
        };
        let path = beside(&args.output, &format!("{k}.toml"));
        policy_of(&map, &config, n)?
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let json_path = beside(&args.output, "distances.json");
    std::fs::write(&json_path, result.distances.to_json())
        .with_context(|| format!("writing {}", json_path.display()))?;
    let record = serde_json::json!({
        "model": dir,
        "text": text_path,
        "num_samples": samples.len(),
        "sample_len": args.sample_len,
        "order": config.order,
        "acceptance": config.acceptance,
        "target_shared": result.target_shared,
        "num_shared": result.num_shared(),
        "map": result.map.to_layer_types(),
        "pairs": result.pairs,
        "reference_nll": result.reference_nll,
        "final_nll": result.final_nll,
        "final_cosine": result.final_cosine,
        "retrieval_probes": result.num_probes,
        "retrieval_len": probe_len.filter(|_| result.num_probes > 0),
        "reference_retrieval": result.reference_retrieval,
        "final_retrieval": result.final_retrieval,
        "max_candidates": config.max_candidates,
        "num_skipped": result.num_skipped,
        "search_seconds": search_seconds,
        "candidates": result.candidates,
    });
    let record_path = beside(&args.output, "candidates.json");
    std::fs::write(&record_path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", record_path.display()))?;
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
    // Quality after each accepted step, as KVSharer reports it (quality and memory per step).
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
    Ok(Calibrated {
        calibration: result,
        policy_path: args.output.clone(),
        text: text_path,
        num_samples: samples.len(),
        search_seconds,
    })
}

/// Runs the command.
pub fn run(args: CalibrateArgs) -> Result<()> {
    if args.heads {
        return crate::heads_cmd::run(&args);
    }
    let t0 = Instant::now();
    let done = calibrate_to_file(&args, false)?;
    let result = &done.calibration;
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
        "pairs {:?}; KV kept {:.1}% of layers; calibration NLL {:.4} -> {:.4}, cosine {:.4}",
        result.pairs,
        100.0 * result.map.kv_fraction(),
        result.reference_nll,
        result.final_nll,
        result.final_cosine,
    );
    if let (Some(r), Some(f)) = (result.reference_retrieval, result.final_retrieval) {
        let lost = result
            .candidates
            .iter()
            .filter(|c| c.lost_retrieval)
            .count();
        println!(
            "retrieval probes (pass keys): unmodified model {r}/{n}, calibrated map {f}/{n}; \
             {lost} candidates rejected for losing one",
            n = result.num_probes
        );
    }
    println!(
        "scored {} candidates ({} pairs skipped) in {:.1}s; wrote {} and its .distances.json, \
         .candidates.json, .heatmap.png, .steps.png; total {:.1}s",
        result.candidates.len(),
        result.num_skipped,
        done.search_seconds,
        done.policy_path.display(),
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
        let parse = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            Wrap::try_parse_from(all).map(|w| w.args.config())
        };
        let c = parse(&[
            "--layers", "3", "--order", "random", "--seed", "9", "--accept", "nll",
        ])
        .unwrap();
        assert_eq!(c.target, ShareTarget::Layers(3));
        assert_eq!(c.order, PairOrder::Random { seed: 9 });
        assert_eq!(c.acceptance, Acceptance::Nll { max_increase: 0.05 });
        let c = parse(&["--order", "random:7", "--accept", "cosine:0.9"]).unwrap();
        assert_eq!(c.order, PairOrder::Random { seed: 7 });
        assert_eq!(c.acceptance, Acceptance::Cosine { threshold: 0.9 });
        let c = parse(&[
            "--order",
            "random",
            "--accept",
            "nll:0.1",
            "--threshold",
            "0.2",
        ])
        .unwrap();
        assert_eq!(c.order, PairOrder::Random { seed: 0 });
        assert_eq!(c.acceptance, Acceptance::Nll { max_increase: 0.2 });
        assert_eq!(parse(&[]).unwrap(), CalibrationConfig::default());
        assert!(parse(&["--layers", "3", "--share", "0.5"]).is_err());
        assert!(parse(&["--order", "sideways"]).is_err());
        assert!(parse(&["--order", "random:x"]).is_err());
        assert!(parse(&["--accept", "cosine:high"]).is_err());
        assert!(parse(&["--accept", "l2"]).is_err());
        let w = Wrap::try_parse_from(["x", "--save-at", "4,8"]).unwrap();
        assert_eq!(w.args.save_at, vec![4, 8]);
        assert_eq!(
            parse(&["--max-candidates", "40"]).unwrap().max_candidates,
            Some(40)
        );
    }

    #[test]
    fn names_of_the_settings() {
        assert_eq!(order_name(&PairOrder::Random { seed: 3 }), "random3");
        assert_eq!(order_name(&PairOrder::Similar), "similar");
        assert_eq!(
            acceptance_name(&Acceptance::Cosine { threshold: 0.5 }),
            "cos0.5"
        );
        assert_eq!(
            acceptance_name(&Acceptance::Nll { max_increase: 0.05 }),
            "nll0.05"
        );
    }
}
