//! `layerkv calibrate --heads`: DuoAttention-style head roles, training-free. Every KV head of
//! every layer is scored on pass-key probes hidden in the calibration text
//! ([`layerkv_model::heads::retrieval_scores`]: the attention mass the teacher-forced answer
//! puts on the key's tokens); the top `--retrieval-heads` fraction keep every token, the others
//! keep `--others` (sinks + a window). Writes the policy file, and beside it the scores
//! (`.heads.json`) and their layer x head heatmap (`.heads.png`).
//!
//! Stability: the probes come in two halves with different seeds (so different keys, depths
//! and haystack cuts); each half picks its own heads, and the overlap of the two picks
//! (Jaccard: shared / either) is printed and recorded. The policy uses the mean of both halves.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use layerkv::{LayerKvPolicy, Policy};
use layerkv_model::heads::{retrieval_scores, role_policy, RetrievalScores};
use layerkv_model::needle::{Generator, Grid, Task};
use layerkv_model::SessionOptions;

use crate::calibrate_cmd::CalibrateArgs;
use crate::plot;

/// Tokens past a probe's context: the chat template, the question and the answer.
const PROBE_SLACK: usize = 128;

/// Shared / either of two sets of lanes.
fn jaccard(a: &[(usize, usize)], b: &[(usize, usize)]) -> f64 {
    let shared = a.iter().filter(|x| b.contains(x)).count();
    let either = a.len() + b.len() - shared;
    if either == 0 {
        1.0
    } else {
        shared as f64 / either as f64
    }
}

/// Runs `layerkv calibrate --heads`.
pub fn run(args: &CalibrateArgs) -> Result<()> {
    if !(args.retrieval_heads > 0.0 && args.retrieval_heads <= 1.0) {
        bail!(
            "--retrieval-heads must be in (0, 1], got {}",
            args.retrieval_heads
        );
    }
    if args.head_probes == 0 {
        bail!("--head-probes must be positive");
    }
    let text_path = args.text_path()?;
    let (dir, model, dtype) = args.device.load_model(args.model.as_deref())?;
    let n = model.num_layers();
    let kv_heads = model.config().num_key_value_heads;
    let others = Policy::from_spec(&format!("identity+{}", args.others), n)
        .with_context(|| format!("--others {}", args.others))?
        .retention(0)
        .clone();
    // Room past the context for the chat template, the question and the answer.
    let room = model
        .config()
        .max_position_embeddings
        .saturating_sub(PROBE_SLACK);
    let length = args.retrieval_len.min(room);
    if length < 64 {
        bail!(
            "the model's context ({} tokens) leaves no room for a pass-key probe of at least \
             64 tokens",
            model.config().max_position_embeddings
        );
    }
    let tokenizer = layerkv_model::tokenizer::load(&dir)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let generator = Generator::new(&text, &tokenizer)
        .with_context(|| format!("pass-key probes from {}", text_path.display()))?;
    let k = args.head_probes;
    let grid = Grid {
        tasks: vec![Task::Passkey],
        lengths: vec![length],
        depths: (0..k).map(|i| (i as f64 + 0.5) / k as f64).collect(),
        samples: 1,
    };
    let seed = args.seed.unwrap_or(0);
    let options = SessionOptions {
        // The probe's prompt wraps the context in the template, the preamble and the question;
        // a tokenizer that splits finely makes that much longer than the context alone.
        max_context: (2 * length + 4 * PROBE_SLACK).min(model.config().max_position_embeddings),
        kv_dtype: dtype,
        ..SessionOptions::default()
    };
    let t0 = Instant::now();
    let mut halves: Vec<RetrievalScores> = Vec::new();
    for (half, s) in [seed, seed.wrapping_add(1)].into_iter().enumerate() {
        let samples = generator.grid(&grid, s)?;
        let scores = retrieval_scores(&dir, model.clone(), &samples, options.clone(), |i| {
            eprintln!("half {} (seed {s}): probe {}/{k}", half + 1, i + 1)
        })?;
        if scores.probes == 0 {
            bail!(
                "no probe of seed {s} located its pass key in the prompt's tokens (the \
                 tokenizer merges the digits with their neighbours)"
            );
        }
        halves.push(scores);
    }
    let lanes = n * kv_heads;
    let count = ((args.retrieval_heads * lanes as f64).round() as usize).clamp(1, lanes);
    let mean = RetrievalScores {
        scores: (0..n)
            .map(|l| {
                (0..kv_heads)
                    .map(|h| (halves[0].scores[l][h] + halves[1].scores[l][h]) / 2.0)
                    .collect()
            })
            .collect(),
        probes: halves[0].probes + halves[1].probes,
        skipped: halves[0].skipped + halves[1].skipped,
    };
    let (pick_a, pick_b, picked) = (halves[0].top(count), halves[1].top(count), mean.top(count));
    let stability = jaccard(&pick_a, &pick_b);
    let name = format!(
        "heads-{count}of{lanes}-full+{}",
        args.others.replace(':', "-")
    );
    let policy = role_policy(&name, n, &picked, others)?;
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    policy
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let record = serde_json::json!({
        "model": dir,
        "text": text_path,
        "probe_len": length,
        "probes_per_half": k,
        "seeds": [seed, seed.wrapping_add(1)],
        "probes": mean.probes,
        "skipped": mean.skipped,
        "retrieval_heads": count,
        "lanes": lanes,
        "others": args.others,
        "scores": mean.scores,
        "scores_by_half": [&halves[0].scores, &halves[1].scores],
        "picked": picked,
        "picked_by_half": [&pick_a, &pick_b],
        "stability_jaccard": stability,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let json_path = args.output.with_extension("heads.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = args.output.with_extension("heads.png");
    plot::heatmap(
        &png_path,
        &mean.scores,
        "retrieval score per KV head (layer up, head across)",
        "layer (up), KV head (across)",
    )?;
    let shared = pick_a.iter().filter(|x| pick_b.contains(x)).count();
    println!(
        "{count} of {lanes} KV heads keep every token, the others {} ({} probes of {length} \
         tokens, {:.0} s)",
        args.others,
        mean.probes,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "retrieval heads (layer.head, best first): {}",
        picked
            .iter()
            .map(|(l, h)| format!("{l}.{h}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "stability: the two halves (seeds {seed} and {}) pick {shared} of {count} heads in \
         common (Jaccard {stability:.2})",
        seed.wrapping_add(1)
    );
    println!(
        "wrote {} ({}), {} and {}",
        args.output.display(),
        policy.name(),
        json_path.display(),
        png_path.display()
    );
    debug_assert!(policy.per_head());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaccard_counts_shared_over_either() {
        assert_eq!(jaccard(&[(0, 1), (2, 0)], &[(2, 0), (3, 1)]), 1.0 / 3.0);
        assert_eq!(jaccard(&[], &[]), 1.0);
        assert_eq!(jaccard(&[(1, 1)], &[(1, 1)]), 1.0);
    }
}
