//! layerkv-mistralrs beside mistral.rs itself on one model directory, in one run:
//! 1. identity policy: prompt logits vs `TextModelBuilder`'s raw logits (f32), greedy text;
//! 2. the same with ISQ Q8_0 on both sides;
//! 3. batch-1 decode tok/s of both;
//! 4. at a fixed KV budget (what mistral.rs's own cache needs for `--budget-seqs` sequences of
//!    `--len` tokens), as many sequences as fit on each side and the aggregate tok/s, for
//!    identity, a calibrated sharing map and the map stacked with sinks + window.
//!
//! ```text
//! cargo run --release -p layerkv-mistralrs --example versus -- [MODEL_DIR]
//! ```
//!
//! mistral.rs's cache bytes are computed from its layout (`NormalCache`: every layer, K and V
//! `[kv_heads, capacity, head_dim]`, capacity grown in 512-token steps): it is private and
//! cannot be measured from outside. layerkv's are the pages its allocator holds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use layerkv::{LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention, SeqId};
use layerkv_mistralrs::{IsqType, LayerKvModel, LayerKvModelBuilder};
use layerkv_model::engine::LogitsRows;
use layerkv_testkit::max_abs_diff;
use mistralrs::{ModelDType, Response, TextModelBuilder, TokenSource};

#[path = "../tests/common/mistralrs_request.rs"]
mod mistralrs_request;
use mistralrs_request::{describe, greedy_request};

const PROMPT_TOKENS: usize = 256;
const GREEDY_TOKENS: usize = 32;
const DECODE_TOKENS: usize = 64;
/// Sequence length of the budget rows and how many identity sequences the budget holds in
/// mistral.rs's cache.
const BUDGET_LEN: usize = 512;
const BUDGET_SEQS: usize = 4;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn oracle(dir: &Path, isq: Option<IsqType>, seqs: usize) -> Res<mistralrs::Model> {
    let mut b = TextModelBuilder::new(dir.to_string_lossy())
        .with_token_source(TokenSource::None)
        .with_force_cpu()
        .with_dtype(ModelDType::F32)
        .with_prefix_cache_n(None)
        .with_max_num_seqs(seqs);
    if let Some(q) = isq {
        b = b.with_isq(q);
    }
    Ok(tokio_rt().block_on(b.build())?)
}

fn tokio_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().expect("tokio runtime"))
}

fn raw_logits(m: &mistralrs::Model, ids: &[u32]) -> Res<Tensor> {
    tokio_rt().block_on(async {
        let (req, mut rx) = greedy_request(ids, true, 1, 0);
        m.inner().get_sender(None)?.send(req).await?;
        match rx.recv().await {
            Some(Response::Raw { logits_chunks, .. }) => {
                Ok(logits_chunks[0].to_device(&Device::Cpu)?)
            }
            other => Err(format!("expected raw logits, got {}", describe(other.as_ref())).into()),
        }
    })
}

/// Greedy completions of every prompt, sent at once; returns the texts, the generated tokens
/// and the wall seconds from the first send to the last answer.
fn complete_all(
    m: &mistralrs::Model,
    prompts: &[Vec<u32>],
    max_len: usize,
) -> Res<(Vec<String>, usize, f64, f32)> {
    tokio_rt().block_on(async {
        let sender = m.inner().get_sender(None)?;
        let t0 = Instant::now();
        let mut rxs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (req, rx) = greedy_request(p, false, max_len, i);
            sender.send(req).await?;
            rxs.push(rx);
        }
        let (mut texts, mut tokens, mut decode_rate) = (Vec::new(), 0, 0f32);
        for mut rx in rxs {
            match rx.recv().await {
                Some(Response::CompletionDone(r)) => {
                    tokens += r.usage.completion_tokens;
                    decode_rate = r.usage.avg_compl_tok_per_sec;
                    texts.push(r.choices[0].text.clone());
                }
                other => {
                    return Err(
                        format!("expected a completion, got {}", describe(other.as_ref())).into(),
                    )
                }
            }
        }
        Ok((texts, tokens, t0.elapsed().as_secs_f64(), decode_rate))
    })
}

/// mistral.rs's KV bytes for one sequence of `len` tokens (its `NormalCache` layout, f32).
fn mistralrs_kv_bytes(m: &LayerKvModel, len: usize) -> usize {
    let c = m.model().config();
    let capacity = len.div_ceil(512) * 512;
    c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim() * 4 * capacity
}

/// Prefills `n` sequences of `prompt` and decodes `steps` greedy tokens in one batch; returns
/// generated tokens, wall seconds (prefill included) and the peak KV bytes held.
fn ours_batch(
    m: &mut LayerKvModel,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Res<(usize, f64, usize)> {
    let e = m.engine_mut();
    let t0 = Instant::now();
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        e.add_sequence(i as SeqId)?;
        let logits = e.step(&[(i as SeqId, p.as_slice())], LogitsRows::Last)?;
        next.push(logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?);
    }
    let mut peak = e.cache().used_bytes();
    for _ in 1..steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let batch: Vec<(SeqId, &[u32])> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| (i as SeqId, &t[..]))
            .collect();
        let logits = e.step(&batch, LogitsRows::Last)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
        peak = peak.max(e.cache().used_bytes());
    }
    let secs = t0.elapsed().as_secs_f64();
    for i in 0..prompts.len() {
        e.free(i as SeqId)?;
    }
    Ok((prompts.len() * steps, secs, peak))
}

fn main() -> Res<()> {
    let dir = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => layerkv_model::assets::ensure_default_model()?,
    };
    let texts = layerkv_model::assets::ensure_default_texts()?;
    let text = std::fs::read_to_string(&texts.jargon)?;
    let ours = LayerKvModelBuilder::new(&dir)
        .with_max_tokens(GREEDY_TOKENS)
        .build()?;
    let all = ours.tokenizer().encode(&text)?;
    let prompt = all[..PROMPT_TOKENS].to_vec();
    println!(
        "model {} | prompt {PROMPT_TOKENS} Jargon File tokens | CPU f32",
        dir.display()
    );

    // 1-2. Logits and greedy text against mistral.rs, dense and Q8_0.
    for isq in [None, Some(IsqType::Q8_0)] {
        let theirs = oracle(&dir, isq, 1)?;
        let mut mine = LayerKvModelBuilder::new(&dir).with_max_tokens(GREEDY_TOKENS);
        if let Some(q) = isq {
            mine = mine.with_isq(q);
        }
        let mut mine = mine.build()?;
        let my_logits = mine.prompt_logits(&prompt)?;
        let their_logits = raw_logits(&theirs, &prompt)?;
        let diff = max_abs_diff(&my_logits, &their_logits);
        // How far apart are two f32-equivalent computations under this quantization? Our own
        // logits with the prompt split in two steps differ from one step only by f32 rounding
        // (1e-6); 8-bit activation quantization can turn such rounding into whole steps.
        let split = {
            let e = mine.engine_mut();
            e.add_sequence(9)?;
            let a = e.step(&[(9, &prompt[..100])], LogitsRows::All)?;
            let b = e.step(&[(9, &prompt[100..])], LogitsRows::All)?;
            e.free(9)?;
            Tensor::cat(&[a, b], 0)?
        };
        let self_diff = max_abs_diff(&my_logits, &split);
        let agree = {
            let (a, b) = (
                my_logits.argmax(1)?.to_vec1::<u32>()?,
                their_logits.argmax(1)?.to_vec1::<u32>()?,
            );
            a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
        };
        println!(
            "{:>5}: top-1 agreement with mistral.rs over the {PROMPT_TOKENS} prompt positions {:.1}%; \
             layerkv against itself with the prompt in 2 steps: max abs diff {self_diff:.3e}",
            isq.map_or("f32".to_string(), |q| format!("{q:?}")),
            100.0 * agree
        );
        let (their_texts, _, _, _) =
            complete_all(&theirs, std::slice::from_ref(&prompt), GREEDY_TOKENS)?;
        let their_text = &their_texts[0];
        let my_text = mine.generate_ids(&prompt, |_| {})?.text;
        println!(
            "{:>5}: logits max abs diff {diff:.3e}; greedy {GREEDY_TOKENS} tokens {}",
            isq.map_or("f32".to_string(), |q| format!("{q:?}")),
            if &my_text == their_text {
                "equal".to_string()
            } else {
                format!("DIFFER:\n  ours  {my_text:?}\n  their {their_text:?}")
            }
        );
        // 3. Batch-1 decode speed on the same prompt.
        let (_, n, secs, rate) =
            complete_all(&theirs, std::slice::from_ref(&prompt), DECODE_TOKENS)?;
        let mut timed = LayerKvModelBuilder::new(&dir)
            .with_max_tokens(DECODE_TOKENS)
            .with_stop_strings(vec![]);
        if let Some(q) = isq {
            timed = timed.with_isq(q);
        }
        let mut timed = timed.build()?;
        let c = timed.generate_ids(&prompt, |_| {})?;
        println!(
            "       batch-1 decode: mistral.rs {rate:.1} tok/s ({n} tokens, {secs:.2} s with prefill), layerkv {:.1} tok/s ({} tokens): {:.2}x",
            c.decode_tokens_per_sec,
            c.tokens.len(),
            c.decode_tokens_per_sec / f64::from(rate).max(1e-9)
        );
    }

    // 4. Fixed KV budget.
    let budget = BUDGET_SEQS * mistralrs_kv_bytes(&ours, BUDGET_LEN);
    let prompt_len = BUDGET_LEN - DECODE_TOKENS;
    println!(
        "\nKV budget {budget} bytes = mistral.rs's cache for {BUDGET_SEQS} sequences of {BUDGET_LEN} tokens ({prompt_len} prompt + {DECODE_TOKENS} greedy)"
    );
    let layers = ours.model().num_layers();
    let map_file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/smollm2-kvsharer-4L.toml");
    let map = Policy::load(&map_file)?.layer_map().clone();
    let policies: Vec<Policy> = vec![
        Policy::identity(layers)?,
        PolicyBuilder::new(map.clone())
            .name("kvsharer 4L")
            .build()?,
        PolicyBuilder::new(map.clone())
            .name("kvsharer 4L + stream:4:124")
            .retention(Retention::SinkWindow {
                sinks: 4,
                window: 124,
            })
            .build()?,
        PolicyBuilder::new(LayerMap::identity(layers)?)
            .name("identity + stream:4:124")
            .retention(Retention::SinkWindow {
                sinks: 4,
                window: 124,
            })
            .build()?,
    ];
    let per_seq = mistralrs_kv_bytes(&ours, BUDGET_LEN);
    let theirs_n = budget / per_seq;
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| all[i * 97..i * 97 + prompt_len].to_vec())
        .collect();
    let theirs = oracle(&dir, None, theirs_n)?;
    let (_, n, secs, _) = complete_all(&theirs, &prompts[..theirs_n], DECODE_TOKENS)?;
    let their_tps = n as f64 / secs;
    println!("| engine / policy | KV bytes per sequence (x mistral.rs) | sequences in budget | tok/s, prefill + decode (x mistral.rs) |");
    println!("|---|---|---|---|");
    println!("| mistral.rs 0.8.1 | {per_seq} | {theirs_n} | {their_tps:.1} |");
    for policy in &policies {
        let name = policy.name().to_string();
        let mut m = LayerKvModelBuilder::new(&dir)
            .with_policy(policy.clone())
            .with_max_context(BUDGET_LEN)
            .build()?;
        // Measure one sequence's peak to size the batch, then run as many as fit.
        let (_, _, one) = ours_batch(&mut m, &prompts[..1], DECODE_TOKENS)?;
        let fit = (budget / one.max(1)).clamp(1, prompts.len());
        let mut m = LayerKvModelBuilder::new(&dir)
            .with_policy(policy.clone())
            .with_max_context(BUDGET_LEN)
            .with_max_sequences(fit)
            .build()?;
        let (n, secs, peak) = ours_batch(&mut m, &prompts[..fit], DECODE_TOKENS)?;
        let tps = n as f64 / secs;
        println!(
            "| layerkv {name} | {one} ({:.3}) | {fit} (peak {peak}) | {tps:.1} ({:.2}x) |",
            one as f64 / per_seq as f64,
            tps / their_tps
        );
    }
    Ok(())
}
