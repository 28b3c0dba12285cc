//! Measures policies on one model and one token stream: perplexity, KV bytes, greedy agreement
//! with identity, batch-1 prefill/decode speed and decode throughput at a fixed KV budget.
//! Identity is always the first policy, so every ratio is against a baseline from the same run.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use layerkv::{plan, LayerKvPolicy, Policy, SeqId};
use layerkv_model::engine::{Engine, EngineConfig, LogitsRows};
use layerkv_model::eval::{greedy_agreement, perplexity};
use layerkv_model::generate::{argmax, generate, Sampling};
use layerkv_model::Model;

use crate::report::Row;

/// Evaluation settings.
#[derive(Debug, Clone)]
pub struct MeasureConfig {
    /// Perplexity context.
    pub context: usize,
    /// Perplexity stride.
    pub stride: usize,
    /// Tokens per step.
    pub chunk: usize,
    /// The fixed KV budget, in identity sequences of `budget_len` tokens.
    pub budget_seqs: usize,
    /// Sequence length for the throughput column.
    pub budget_len: usize,
    /// Every perplexity window prefills at least this many tokens as its prompt before scoring
    /// (0: Hugging Face's sliding evaluation).
    pub min_prompt: usize,
    /// Window of the policy's sliding-window layers.
    pub sliding_window: Option<usize>,
    /// KV page types (`--kv-dtype`).
    pub kv_dtype: layerkv_model::KvTypes,
    /// Prefill the prompts of policies that probe (KVzip) layer-major (`--layer-major`).
    pub layer_major: bool,
}

const BLOCK_SIZE: usize = 16;
const DECODE_STEPS: usize = 16;

fn engine(
    model: &Arc<Model>,
    policy: Arc<Policy>,
    num_pages: usize,
    cfg: &MeasureConfig,
    kv_dtype: layerkv_model::KvTypes,
) -> Result<Engine> {
    let mut e = Engine::new(
        model.clone(),
        policy,
        EngineConfig {
            block_size: BLOCK_SIZE,
            num_pages,
            sliding_window: cfg.sliding_window,
            prefill_chunk: cfg.chunk.max(1),
            kv_dtype,
            ..EngineConfig::default()
        },
    )?;
    if cfg.layer_major && e.probe_chunk().is_some() {
        if let Err(err) = e.set_layer_major(true) {
            tracing::warn!("prefilling step by step: {err}");
        }
    }
    Ok(e)
}

/// The planner of the engines this module builds (steps of `chunk` tokens).
pub fn planner(model: &Model, cfg: &MeasureConfig) -> plan::Planner {
    plan::Planner {
        block_size: BLOCK_SIZE,
        sliding_window: cfg.sliding_window,
        model_window: model.config().sliding_window,
        step_tokens: cfg.chunk.max(1),
        lanes: model.config().num_key_value_heads,
    }
}

/// Measures every policy in its KV page types (the first must be identity, in
/// `cfg.kv_dtype`) and returns one row each; a row whose types differ from `cfg.kv_dtype` is
/// named `POLICY@TYPES`. The throughput budget is identity's bytes, so smaller pages fit more
/// sequences in it.
pub fn measure_all(
    model: Arc<Model>,
    tokens: &[u32],
    policies: Vec<(Policy, layerkv_model::KvTypes)>,
    cfg: &MeasureConfig,
) -> Result<Vec<Row>> {
    let n_layers = model.num_layers();
    let eval_pages = n_layers * (cfg.context.max(cfg.budget_len) / BLOCK_SIZE + 2) * 2;
    let identity = Arc::new(policies[0].0.clone());
    let mut reference = engine(&model, identity.clone(), eval_pages, cfg, cfg.kv_dtype)?;
    let budget_pages =
        cfg.budget_seqs * plan::pages_per_sequence(identity.as_ref(), BLOCK_SIZE, cfg.budget_len);
    let budget_bytes =
        budget_pages * BLOCK_SIZE * model.config().kv_bytes_per_token_per_layer(cfg.kv_dtype);
    // Agreement runs over a whole context window (a prompt of `min_prompt` tokens, or a
    // quarter of it): shorter runs would end before a budget of half the context evicts.
    let agree_len = cfg.context.min(tokens.len());
    let agree_prompt = cfg.min_prompt.max(agree_len / 4).min(agree_len);
    let prompt = &tokens[..128.min(tokens.len() / 2)];
    let bar = ProgressBar::new(policies.len() as u64 * 4);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    for (policy, kv) in policies {
        let name = if kv == cfg.kv_dtype {
            policy.name().to_string()
        } else {
            format!("{}@{kv}", policy.name())
        };
        let groups = policy.layer_map().num_groups();
        // A per-head policy's pages hold one KV head, and smaller page types fewer bytes: as
        // many more pages in identity's bytes.
        let lanes = planner(&model, cfg).lanes_of(&policy);
        let page_bytes = BLOCK_SIZE * model.config().kv_bytes_per_token_per_layer(kv) / lanes;
        let budget_pages = budget_bytes / page_bytes;
        let policy = Arc::new(policy);
        let mut e = engine(&model, policy.clone(), eval_pages * lanes, cfg, kv)?;
        bar.set_message(format!("{name}: perplexity"));
        let ppl = perplexity(
            &mut e,
            tokens,
            cfg.context,
            cfg.stride,
            cfg.chunk,
            cfg.min_prompt,
        )?;
        bar.inc(1);
        bar.set_message(format!("{name}: greedy agreement"));
        let agreement = greedy_agreement(
            &mut reference,
            &mut e,
            &tokens[..agree_len],
            agree_prompt,
            cfg.chunk,
        )?;
        bar.inc(1);
        bar.set_message(format!("{name}: batch-1 speed"));
        let g = generate(&mut e, 1, prompt, 32, Sampling::greedy(), &[])?;
        bar.inc(1);
        bar.set_message(format!("{name}: throughput at a fixed KV budget"));
        let batch = planner(&model, cfg)
            .max_sequences(policy.as_ref(), cfg.budget_len, budget_pages)
            .min(64);
        let sequence_pages =
            planner(&model, cfg).pages_per_sequence(policy.as_ref(), cfg.budget_len);
        let tput = throughput(&model, policy, budget_pages, batch, tokens, cfg, kv)?;
        bar.inc(1);
        let fits = match batch {
            0 => "no sequence fits the throughput budget".to_string(),
            _ => format!("batch {batch} -> {tput:.1} tok/s"),
        };
        let line = format!(
            "{name}: ppl {:.3}, KV {} bytes, agreement {:.3}, decode {:.1} tok/s, {fits}",
            ppl.ppl, ppl.peak_kv_bytes, agreement, g.decode_tokens_per_sec
        );
        // indicatif drops println when stderr is not a terminal (CI logs): say it there anyway.
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        rows.push(Row {
            policy: name,
            groups,
            ppl: ppl.ppl,
            nll: ppl.nll,
            kv_bytes: ppl.peak_kv_bytes,
            agreement,
            prefill_tps: g.prefill_tokens_per_sec,
            decode_tps: g.decode_tokens_per_sec,
            batch_at_budget: batch,
            throughput_at_budget: tput,
            budget_bytes: budget_pages * page_bytes,
            sequence_bytes: sequence_pages * page_bytes,
        });
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// Decode tokens/s of `batch` sequences of `cfg.budget_len` tokens sharing a pool of
/// `num_pages` pages: each prefills `budget_len - DECODE_STEPS` tokens of the text in chunks of
/// `cfg.chunk` (retention between chunks, as in serving), then all decode together. The batch
/// comes from the same planner the cache's bounds follow, so it never runs out of pages.
fn throughput(
    model: &Arc<Model>,
    policy: Arc<Policy>,
    num_pages: usize,
    batch: usize,
    tokens: &[u32],
    cfg: &MeasureConfig,
    kv_dtype: layerkv_model::KvTypes,
) -> Result<f64> {
    let len = cfg.budget_len;
    if batch == 0 {
        return Ok(0.0);
    }
    let mut e = engine(model, policy, num_pages, cfg, kv_dtype)?;
    let prompt_len = len.saturating_sub(DECODE_STEPS).max(1);
    let mut next = Vec::with_capacity(batch);
    for b in 0..batch {
        let seq = b as SeqId;
        e.add_sequence(seq)?;
        let off = (b * 37) % tokens.len().saturating_sub(prompt_len).max(1);
        let p = &tokens[off..(off + prompt_len).min(tokens.len())];
        // The engine prefills in chunks of `cfg.chunk` (retention in between) under an
        // evicting policy.
        let logits = e.step(&[(seq, p)], LogitsRows::Last)?;
        next.push(argmax(&logits.squeeze(0)?.to_vec1::<f32>()?));
    }
    let t0 = Instant::now();
    for _ in 0..DECODE_STEPS {
        let step: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let batch_in: Vec<(SeqId, &[u32])> = step
            .iter()
            .enumerate()
            .map(|(b, t)| (b as SeqId, &t[..]))
            .collect();
        let logits = e.step(&batch_in, LogitsRows::Last)?;
        for (b, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
            next[b] = argmax(row);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    for b in 0..batch {
        e.free(b as SeqId)?;
    }
    Ok((batch * DECODE_STEPS) as f64 / secs.max(1e-9))
}
