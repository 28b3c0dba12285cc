//! Token generation: a seeded [`Sampler`] with the controls llama.cpp and mistral.rs users
//! expect, defaults from a model's `generation_config.json` ([`GenerationConfig`]), streaming
//! detokenization with stop strings ([`TextStream`]) and the generation loops ([`generate`],
//! [`complete`], and [`generate_batch`] for several replies decoded together) that report
//! prefill and decode throughput.
//!
//! The sampler applies, in this order (transformers' and llama.cpp's order): repetition,
//! presence and frequency penalties over the last [`Sampling::penalty_last_n`] tokens of the
//! context, then temperature (0 = greedy over the penalised logits), top-k, top-p, min-p; it
//! draws from what is left with a splitmix64 stream seeded by [`Sampling::seed`] (same seed,
//! same logits: same tokens).
//!
//! Cost per token: O(vocab) to copy, penalise (O(`penalty_last_n`)), soften and filter; top-k
//! adds an O(vocab) selection and an O(k log k) sort; top-p without top-k sorts the whole
//! vocabulary, O(vocab log vocab). The sampler's buffers are reused: after its first token it
//! allocates nothing.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use layerkv::SeqId;
use serde_json::Value;

use crate::engine::{Engine, LogitsRows};
use crate::error::{io, ModelError, Result};
use crate::tokenizer::Tokenizer;

/// How the next token is chosen. Every filter has an "off" value, the default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax of the penalised logits); otherwise logits are divided by it before
    /// the softmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's (0 = off).
    pub min_p: f32,
    /// CTRL / transformers repetition penalty: a logit of a token seen in the window is divided
    /// by it when positive, multiplied when negative (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every token in the window
    /// (0 = off).
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted from a token's logit once per occurrence in the
    /// window (0 = off).
    pub frequency_penalty: f32,
    /// How many of the latest context tokens (prompt included) the penalties look at
    /// (llama.cpp's `repeat_last_n`).
    pub penalty_last_n: usize,
    /// RNG seed (same seed, same tokens).
    pub seed: u64,
}

impl Sampling {
    /// Argmax decoding, every filter off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }

    fn penalises(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

/// The generation defaults a model ships in `generation_config.json` (transformers' format);
/// every field is optional, absent ones leave [`Sampling`]'s defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// `do_sample`: false (transformers' default) means greedy whatever the temperature.
    pub do_sample: Option<bool>,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
    /// `eos_token_id` (a number or a list).
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; an absent file is the empty config.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Self::parse(&text).map_err(|what| ModelError::Json { path, what })
    }

    /// Parses generation_config.json text (`null` fields count as absent).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let float = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let int = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: float("temperature"),
            top_k: int("top_k"),
            top_p: float("top_p"),
            min_p: float("min_p"),
            repetition_penalty: float("repetition_penalty"),
            max_new_tokens: int("max_new_tokens"),
            eos_token_ids,
        })
    }

    /// The sampling these defaults ask for, as transformers reads them: greedy unless
    /// `do_sample` is true; when sampling, temperature 1 and top-k 50 unless set.
    /// The repetition penalty applies either way.
    pub fn sampling(&self) -> Sampling {
        let mut s = Sampling::greedy();
        if self.do_sample == Some(true) {
            s.temperature = self.temperature.unwrap_or(1.0);
            s.top_k = self.top_k.unwrap_or(50);
            s.top_p = self.top_p.unwrap_or(1.0);
            s.min_p = self.min_p.unwrap_or(0.0);
        }
        s.repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        s
    }
}

/// The tokens that end a reply of the model in `dir`: `config.json`'s and
/// `generation_config.json`'s EOS ids and the `eos_token` of `tokenizer_config.json`, sorted,
/// without duplicates. A chat adds its template's end of turn
/// ([`crate::chat::ChatTemplate::end_of_turn`]).
pub fn stop_tokens(
    dir: &Path,
    config: &crate::ModelConfig,
    generation: &GenerationConfig,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    let mut stop = config.eos_token_ids();
    stop.extend(&generation.eos_token_ids);
    if let Some(eos) = crate::chat::ChatTemplate::load(dir)
        .ok()
        .and_then(|t| tokenizer.token_id(&t.special_tokens().eos))
    {
        stop.push(eos);
    }
    stop.sort_unstable();
    stop.dedup();
    stop
}

/// A seeded sampler: [`Sampler::sample`] picks a token and adds it to the penalty window;
/// [`Sampler::observe`] adds prompt tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    state: u64,
    /// (weight, token): logits, then unnormalised probabilities of the surviving tokens.
    candidates: Vec<(f32, u32)>,
    /// The penalty window, oldest first.
    recent: VecDeque<u32>,
    /// Occurrences in the window, by token id.
    counts: Vec<u32>,
    /// Distinct tokens of the window.
    distinct: Vec<u32>,
}

impl Sampler {
    /// A sampler for `cfg`.
    pub fn new(cfg: Sampling) -> Self {
        let window = if cfg.penalises() {
            cfg.penalty_last_n
        } else {
            0
        };
        Self {
            cfg,
            state: cfg.seed ^ 0x5851_f42d_4c95_7f2d,
            candidates: Vec::new(),
            recent: VecDeque::with_capacity(window),
            counts: Vec::new(),
            distinct: Vec::with_capacity(window),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Sampling {
        &self.cfg
    }

    /// Adds context tokens (a prompt) to the penalty window.
    pub fn observe(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.accept(t);
        }
    }

    fn accept(&mut self, token: u32) {
        if !self.cfg.penalises() {
            return;
        }
        if self.recent.len() == self.cfg.penalty_last_n {
            if let Some(old) = self.recent.pop_front() {
                let c = &mut self.counts[old as usize];
                *c -= 1;
                if *c == 0 {
                    if let Some(i) = self.distinct.iter().position(|&t| t == old) {
                        self.distinct.swap_remove(i);
                    }
                }
            }
        }
        let i = token as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        if self.counts[i] == 0 {
            self.distinct.push(token);
        }
        self.counts[i] += 1;
        self.recent.push_back(token);
    }

    fn next_f32(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// The tokens that survive the penalties and filters for one row of logits, with their
    /// probabilities (summing to 1), most likely first when top-k or top-p sorted them.
    /// Greedy gives the single argmax with probability 1.
    pub fn candidates(&mut self, logits: &[f32]) -> &[(f32, u32)] {
        let cfg = self.cfg;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        if cfg.penalises() {
            if self.counts.len() < logits.len() {
                // Once: every token id a row can pick then has its counter.
                self.counts.resize(logits.len(), 0);
            }
            for &t in &self.distinct {
                let Some(c) = self.candidates.get_mut(t as usize) else {
                    continue;
                };
                let n = self.counts[t as usize] as f32;
                if cfg.repetition_penalty != 1.0 {
                    c.0 = if c.0 > 0.0 {
                        c.0 / cfg.repetition_penalty
                    } else {
                        c.0 * cfg.repetition_penalty
                    };
                }
                c.0 -= cfg.frequency_penalty * n + cfg.presence_penalty;
            }
        }
        let max = self
            .candidates
            .iter()
            .map(|c| c.0)
            .fold(f32::NEG_INFINITY, f32::max);
        if cfg.temperature <= 0.0 || !max.is_finite() {
            let best = self
                .candidates
                .iter()
                .fold(None::<(f32, u32)>, |b, &c| match b {
                    Some(b) if b.0 >= c.0 => Some(b),
                    _ => Some(c),
                })
                .map_or(0, |c| c.1);
            self.candidates.clear();
            self.candidates.push((1.0, best));
            return &self.candidates;
        }
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let mut sorted = false;
        if cfg.top_k > 0 && cfg.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(cfg.top_k - 1, desc);
            self.candidates.truncate(cfg.top_k);
            self.candidates.sort_unstable_by(desc);
            sorted = true;
        }
        // Softmax weights (unnormalised): the most likely token weighs 1.
        let mut total = 0.0;
        for c in &mut self.candidates {
            c.0 = ((c.0 - max) / cfg.temperature).exp();
            total += c.0;
        }
        if cfg.top_p < 1.0 {
            if !sorted {
                self.candidates.sort_unstable_by(desc);
            }
            let mut acc = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                acc += c.0;
                if acc >= cfg.top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        if cfg.min_p > 0.0 {
            let top = self.candidates.iter().map(|c| c.0).fold(0.0, f32::max);
            let threshold = cfg.min_p * top;
            self.candidates.retain(|c| c.0 >= threshold);
        }
        let total: f32 = self.candidates.iter().map(|c| c.0).sum();
        for c in &mut self.candidates {
            c.0 /= total;
        }
        &self.candidates
    }

    /// Picks a token from one row of logits and adds it to the penalty window.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.candidates(logits);
        let mut u = self.next_f32();
        let mut pick = self.candidates.last().map_or(0, |c| c.1);
        for &(p, t) in &self.candidates {
            if u < p {
                pick = t;
                break;
            }
            u -= p;
        }
        self.accept(pick);
        pick
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Incremental detokenization: turns a growing list of tokens into text pieces as soon as they
/// are final (a character split over tokens waits for its last byte; a suffix that could begin
/// a stop string waits until it cannot), and cuts the text before the first stop string.
///
/// Each token decodes a window from the previous piece's start (the "prefix offset" method of
/// text-generation-inference), so the cost per token is O(window), not O(text).
#[derive(Debug)]
pub struct TextStream {
    stop_strings: Vec<String>,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    emitted: usize,
    stopped: Option<usize>,
}

impl TextStream {
    /// A stream stopping at any of `stop_strings` (each [`TextStream::push`] decodes with the
    /// tokenizer it is given, so a server can keep one stream per request beside one
    /// tokenizer).
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self {
            stop_strings,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stopped: None,
        }
    }

    /// Adds a token; returns the text that became final (possibly empty). After a stop string
    /// completes, [`TextStream::stopped`] names it and further tokens are ignored.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<&str> {
        if self.stopped.is_some() {
            return Ok("");
        }
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') {
            let delta = match full.strip_prefix(prefix.as_str()) {
                Some(d) => d,
                None => full.get(prefix.len()..).unwrap_or(""),
            };
            self.text.push_str(delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        Ok(self.release())
    }

    /// Cuts at a completed stop string, or holds back a suffix that may start one; returns the
    /// newly final text.
    fn release(&mut self) -> &str {
        let start = self.emitted;
        let hit = self
            .stop_strings
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| {
                self.text[start..]
                    .find(s.as_str())
                    .map(|at| (start + at, i))
            })
            .min();
        if let Some((at, i)) = hit {
            self.text.truncate(at);
            self.stopped = Some(i);
            self.emitted = at;
            return &self.text[start..at];
        }
        let mut hold = 0;
        for s in &self.stop_strings {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && k <= self.text.len() - start && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let end = self.text.len() - hold;
        self.emitted = end;
        &self.text[start..end]
    }

    /// Releases whatever is still held back (the stream ends without a stop string).
    pub fn finish(&mut self) -> &str {
        let start = self.emitted;
        self.emitted = self.text.len();
        &self.text[start..]
    }

    /// Index of the stop string that ended the text, if one did.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// The text so far (cut before the stop string, if one completed).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// What a generation produced and how fast.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Prompt tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Generated tokens per second (after the first).
    pub decode_tokens_per_sec: f64,
}

/// When [`complete`] stops.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopCriteria {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Tokens that end the reply (EOS, end of turn); they are not part of the text.
    pub stop_tokens: Vec<u32>,
    /// Strings that end the reply when the decoded text contains one; the text is cut before
    /// it.
    pub stop_strings: Vec<String>,
}

/// Why [`complete`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was sampled (the last of [`Completion::tokens`]).
    Token(u32),
    /// The stop string of this index completed.
    String(usize),
    /// [`StopCriteria::max_new_tokens`] tokens were generated.
    MaxTokens,
}

/// A reply: tokens, text, why it ended, and its speed.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Generated token ids, the stop token included.
    pub tokens: Vec<u32>,
    /// Decoded text: stop token excluded, cut before a stop string.
    pub text: String,
    /// Why generation ended.
    pub stop: StopReason,
    /// Tokens the prompt step appended.
    pub num_prompt_tokens: usize,
    /// Prompt tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Generated tokens per second (after the first).
    pub decode_tokens_per_sec: f64,
}

/// Prefills `prompt` into the live sequence `seq`, then samples until `on_token` says stop or
/// `max_new` tokens. Every sampled token but the last is appended to the sequence. Returns the
/// tokens and the prefill and decode seconds.
fn run(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_new: usize,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<(Vec<u32>, f64, f64)> {
    sampler.observe(prompt);
    let mut tokens = Vec::with_capacity(max_new.min(4096));
    if max_new == 0 {
        return Ok((tokens, 0.0, 0.0));
    }
    let t0 = Instant::now();
    let logits = engine.step(&[(seq, prompt)], LogitsRows::Last)?;
    let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&row);
        tokens.push(next);
        if on_token(next)? || tokens.len() >= max_new {
            break;
        }
        let logits = engine.step(&[(seq, &[next])], LogitsRows::Last)?;
        row = logits.squeeze(0)?.to_vec1::<f32>()?;
    }
    Ok((tokens, prefill, t1.elapsed().as_secs_f64()))
}

/// Prefills `prompt` into a new sequence `seq`, then samples up to `max_new` tokens, stopping
/// early at any of `eos`. The sequence is freed at the end.
pub fn generate(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
) -> Result<Generation> {
    let mut sampler = Sampler::new(sampling);
    engine.add_sequence(seq)?;
    let result = run(engine, seq, prompt, &mut sampler, max_new, |t| {
        Ok(eos.contains(&t))
    });
    engine.free(seq)?;
    let (tokens, prefill, decode) = result?;
    Ok(Generation {
        prefill_tokens_per_sec: prompt.len() as f64 / prefill.max(1e-9),
        decode_tokens_per_sec: (tokens.len().saturating_sub(1)) as f64 / decode.max(1e-9),
        tokens,
    })
}

/// Appends `prompt` to the live sequence `seq` (a new sequence's whole prompt, or the next
/// turn of a conversation whose earlier turns the sequence still holds) and samples a reply
/// until `stop` says so, handing each piece of final text to `on_text` as soon as it is known
/// (streaming). The sequence stays in the engine, holding the prompt and every generated
/// token except the last one sampled.
pub fn complete(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopCriteria,
    tokenizer: &Tokenizer,
    mut on_text: impl FnMut(&str),
) -> Result<Completion> {
    let mut stream = TextStream::new(stop.stop_strings.clone());
    let mut reason = StopReason::MaxTokens;
    let (tokens, prefill, decode) = run(engine, seq, prompt, sampler, stop.max_new_tokens, |t| {
        if stop.stop_tokens.contains(&t) {
            reason = StopReason::Token(t);
            return Ok(true);
        }
        let piece = stream.push(tokenizer, t)?;
        if !piece.is_empty() {
            on_text(piece);
        }
        if let Some(i) = stream.stopped() {
            reason = StopReason::String(i);
            return Ok(true);
        }
        Ok(false)
    })?;
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(rest);
    }
    Ok(Completion {
        text: stream.text().to_string(),
        stop: reason,
        num_prompt_tokens: prompt.len(),
        prefill_tokens_per_sec: prompt.len() as f64 / prefill.max(1e-9),
        decode_tokens_per_sec: (tokens.len().saturating_sub(1)) as f64 / decode.max(1e-9),
        tokens,
    })
}

/// [`generate_batch`]'s result: one reply per sequence and the batch's throughput.
#[derive(Debug, Clone)]
pub struct BatchGeneration {
    /// Generated token ids per sequence, in `seqs` order (a stop token ends and is included).
    pub tokens: Vec<Vec<u32>>,
    /// Prompt tokens per second (the prompt is prefilled once).
    pub prefill_tokens_per_sec: f64,
    /// Decode steps after the first token: one row per live sequence each.
    pub decode_steps: usize,
    /// Tokens generated per second over all sequences after the first token of each.
    pub decode_tokens_per_sec: f64,
}

/// `seqs.len()` replies to one `prompt`, decoded together: the prompt is prefilled once into
/// `seqs[0]`, which is forked into the others (their prompt pages are shared, copy on write),
/// then every live sequence appends one token per step, in one batch. Sequence `i` samples with
/// `sampling`'s seed plus `i`, so greedy replies are identical and sampled ones differ. A
/// sequence stops at any of `eos` or after `max_new` tokens. The sequences are freed at the
/// end, whatever happened. This is batched decoding as a server runs it, without a scheduler:
/// the pool must hold every sequence.
pub fn generate_batch(
    engine: &mut Engine,
    seqs: &[SeqId],
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
) -> Result<BatchGeneration> {
    let Some(&first) = seqs.first() else {
        return Err(ModelError::Request("generate_batch: no sequences".into()));
    };
    engine.add_sequence(first)?;
    let mut added = vec![first];
    let result = run_batch(engine, seqs, &mut added, prompt, max_new, sampling, eos);
    let mut freed = Ok(());
    for &s in &added {
        if let Err(e) = engine.free(s) {
            freed = freed.and(Err(e));
        }
    }
    let out = result?;
    freed?;
    Ok(out)
}

fn run_batch(
    engine: &mut Engine,
    seqs: &[SeqId],
    added: &mut Vec<SeqId>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    eos: &[u32],
) -> Result<BatchGeneration> {
    let n = seqs.len();
    let mut samplers: Vec<Sampler> = (0..n as u64)
        .map(|i| {
            let mut s = Sampler::new(Sampling {
                seed: sampling.seed.wrapping_add(i),
                ..sampling
            });
            s.observe(prompt);
            s
        })
        .collect();
    let mut tokens = vec![Vec::with_capacity(max_new.min(4096)); n];
    if max_new == 0 {
        return Ok(BatchGeneration {
            tokens,
            prefill_tokens_per_sec: 0.0,
            decode_steps: 0,
            decode_tokens_per_sec: 0.0,
        });
    }
    let t0 = Instant::now();
    let logits = engine.step(&[(seqs[0], prompt)], LogitsRows::Last)?;
    let row = logits.squeeze(0)?.to_vec1::<f32>()?;
    let prefill = t0.elapsed().as_secs_f64();
    for &s in &seqs[1..] {
        engine.fork(seqs[0], s)?;
        added.push(s);
    }
    // Each sequence's first token comes from the shared prompt logits.
    let mut live: Vec<usize> = Vec::with_capacity(n);
    let mut next = vec![0u32; n];
    for i in 0..n {
        let t = samplers[i].sample(&row);
        tokens[i].push(t);
        next[i] = t;
        if !eos.contains(&t) && max_new > 1 {
            live.push(i);
        }
    }
    let t1 = Instant::now();
    let (mut steps, mut decoded) = (0usize, 0usize);
    while !live.is_empty() {
        let batch: Vec<(SeqId, &[u32])> = live
            .iter()
            .map(|&i| (seqs[i], std::slice::from_ref(&next[i])))
            .collect();
        let rows = engine.step(&batch, LogitsRows::Last)?.to_vec2::<f32>()?;
        steps += 1;
        decoded += live.len();
        let mut still = Vec::with_capacity(live.len());
        for (&i, row) in live.iter().zip(&rows) {
            let t = samplers[i].sample(row);
            tokens[i].push(t);
            next[i] = t;
            if !eos.contains(&t) && tokens[i].len() < max_new {
                still.push(i);
            }
        }
        live = still;
    }
    let decode = t1.elapsed().as_secs_f64();
    Ok(BatchGeneration {
        tokens,
        prefill_tokens_per_sec: prompt.len() as f64 / prefill.max(1e-9),
        decode_steps: steps,
        decode_tokens_per_sec: decoded as f64 / decode.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut Sampling)) -> Sampling {
        let mut s = Sampling {
            temperature: 1.0,
            ..Sampling::greedy()
        };
        f(&mut s);
        s
    }

    /// Candidates as (token, probability), sorted by token.
    fn dist(cfg: Sampling, context: &[u32], logits: &[f32]) -> Vec<(u32, f32)> {
        let mut s = Sampler::new(cfg);
        s.observe(context);
        let mut d: Vec<(u32, f32)> = s.candidates(logits).iter().map(|&(p, t)| (t, p)).collect();
        d.sort_by_key(|c| c.0);
        d
    }

    fn softmax(l: &[f32]) -> Vec<f32> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    fn assert_dist(got: &[(u32, f32)], want: &[(u32, f32)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
            assert!((g.1 - w.1).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// Probabilities 0.5, 0.25, 0.15, 0.1 at temperature 1.
    const QUARTERS: [f32; 4] = [
        -std::f32::consts::LN_2,
        -2.0 * std::f32::consts::LN_2,
        -1.897_12,
        -std::f32::consts::LN_10,
    ];

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(Sampling::greedy()).sample(&logits), 1);
        let cfg = with(|s| {
            s.top_p = 0.9;
            s.seed = 7;
        });
        let run = |cfg: Sampling| -> Vec<u32> {
            let mut s = Sampler::new(cfg);
            (0..64).map(|_| s.sample(&logits)).collect()
        };
        let a = run(cfg);
        assert_eq!(a, run(cfg), "same seed, same tokens");
        assert_ne!(
            a,
            run(Sampling { seed: 8, ..cfg }),
            "another seed, other tokens"
        );
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-p drops the tail: {a:?}"
        );
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn temperature_zero_is_greedy_and_temperature_scales() {
        let logits = [0.3, 1.0, 0.9, -2.0];
        for seed in 0..50 {
            let mut s = Sampler::new(Sampling {
                seed,
                top_k: 3,
                top_p: 0.5,
                ..Sampling::greedy()
            });
            assert_eq!(s.sample(&logits), 1);
        }
        let p = softmax(&logits.map(|l| l / 2.0));
        let want: Vec<(u32, f32)> = p.iter().enumerate().map(|(i, &p)| (i as u32, p)).collect();
        assert_dist(&dist(with(|s| s.temperature = 2.0), &[], &logits), &want);
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let logits = [1.0, 5.0, 3.0, 4.0, 2.0];
        let p = softmax(&[5.0, 4.0]);
        let d = dist(with(|s| s.top_k = 2), &[], &logits);
        assert_dist(&d, &[(1, p[0]), (3, p[1])]);
        // k at or past the vocabulary keeps everything.
        assert_eq!(dist(with(|s| s.top_k = 5), &[], &logits).len(), 5);
        assert_eq!(dist(with(|s| s.top_k = 9), &[], &logits).len(), 5);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        let d = dist(with(|s| s.top_p = 0.45), &[], &QUARTERS);
        assert_dist(&d, &[(0, 1.0)]);
        let d = dist(with(|s| s.top_p = 0.7), &[], &QUARTERS);
        assert_dist(&d, &[(0, 2.0 / 3.0), (1, 1.0 / 3.0)]);
        let d = dist(with(|s| s.top_p = 0.8), &[], &QUARTERS);
        assert_dist(&d, &[(0, 0.5 / 0.9), (1, 0.25 / 0.9), (2, 0.15 / 0.9)]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // Threshold 0.4 * 0.5 = 0.2: 0.5 and 0.25 stay.
        let d = dist(with(|s| s.min_p = 0.4), &[], &QUARTERS);
        assert_dist(&d, &[(0, 2.0 / 3.0), (1, 1.0 / 3.0)]);
        // Threshold 0.125: 0.1 goes.
        let d = dist(with(|s| s.min_p = 0.25), &[], &QUARTERS);
        assert_dist(&d, &[(0, 0.5 / 0.9), (1, 0.25 / 0.9), (2, 0.15 / 0.9)]);
        // With top-k 3 first: threshold 0.55 * 0.5 keeps token 0 alone.
        let d = dist(
            with(|s| {
                s.top_k = 3;
                s.min_p = 0.55;
            }),
            &[],
            &QUARTERS,
        );
        assert_dist(&d, &[(0, 1.0)]);
    }

    #[test]
    fn penalties_change_the_logits_of_tokens_in_the_window() {
        let logits = [2.0, -1.0, 0.5, 1.0];
        // Repetition 2: positive logits halve, negative ones double; unseen tokens unchanged.
        let d = dist(with(|s| s.repetition_penalty = 2.0), &[0, 1, 1], &logits);
        let p = softmax(&[1.0, -2.0, 0.5, 1.0]);
        assert_dist(&d, &[(0, p[0]), (1, p[1]), (2, p[2]), (3, p[3])]);
        // Presence once, frequency per occurrence.
        let d = dist(
            with(|s| {
                s.presence_penalty = 0.5;
                s.frequency_penalty = 0.25;
            }),
            &[0, 0, 1],
            &logits,
        );
        let p = softmax(&[2.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.5, 1.0]);
        assert_dist(&d, &[(0, p[0]), (1, p[1]), (2, p[2]), (3, p[3])]);
        // Only the last `penalty_last_n` tokens count: token 0 left the window.
        let d = dist(
            with(|s| {
                s.repetition_penalty = 2.0;
                s.penalty_last_n = 2;
            }),
            &[0, 2, 3],
            &logits,
        );
        let p = softmax(&[2.0, -1.0, 0.25, 0.5]);
        assert_dist(&d, &[(0, p[0]), (1, p[1]), (2, p[2]), (3, p[3])]);
        // Greedy applies penalties too, and sampled tokens join the window.
        let mut s = Sampler::new(Sampling {
            repetition_penalty: 4.0,
            ..Sampling::greedy()
        });
        assert_eq!(s.sample(&logits), 0);
        assert_eq!(
            s.sample(&logits),
            3,
            "token 0 is penalised to 0.5 after it was picked"
        );
    }

    #[test]
    fn generation_config_defaults_follow_transformers() {
        let g = GenerationConfig::parse(
            r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7],
                "repetition_penalty": 1.1, "max_new_tokens": 99}"#,
        )
        .unwrap();
        let s = g.sampling();
        assert_eq!((s.temperature, s.top_k, s.top_p), (0.6, 50, 0.9));
        assert_eq!(s.repetition_penalty, 1.1);
        assert_eq!(
            (g.eos_token_ids.clone(), g.max_new_tokens),
            (vec![2, 7], Some(99))
        );
        // Without do_sample transformers decodes greedily whatever the temperature says.
        let g = GenerationConfig::parse(r#"{"temperature": 0.6, "eos_token_id": 2}"#).unwrap();
        assert_eq!(g.sampling().temperature, 0.0);
        assert_eq!(g.eos_token_ids, vec![2]);
        assert!(GenerationConfig::parse("{").is_err());
    }

    /// A byte-level tokenizer whose ids are the bytes (GPT-2's byte-to-char table, no merges).
    pub(crate) fn byte_tokenizer() -> Tokenizer {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xa1..=0xac);
        printable.extend(0xae..=0xff);
        let mut extra = 0;
        let mut vocab = serde_json::Map::new();
        for b in 0u32..256 {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            vocab.insert(char::from_u32(c).unwrap().to_string(), b.into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_json(&json.to_string()).unwrap()
    }

    fn stream(text: &str, stops: &[&str]) -> (Vec<String>, String, Option<usize>) {
        let tok = byte_tokenizer();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(stops);
        let mut pieces = Vec::new();
        for &b in text.as_bytes() {
            let piece = s.push(&tok, u32::from(b)).unwrap();
            pieces.push(piece.to_string());
        }
        pieces.push(s.finish().to_string());
        (pieces, s.text().to_string(), s.stopped())
    }

    #[test]
    fn stop_strings_are_cut_and_never_shown() {
        let (pieces, text, stopped) = stream("Hello world END more", &["XYZ", "END"]);
        assert_eq!(text, "Hello world ");
        assert_eq!(pieces.concat(), "Hello world ");
        assert_eq!(stopped, Some(1));
        // A held-back prefix that turns out not to be a stop string is released.
        let (pieces, text, stopped) = stream("an ENtry", &["END"]);
        assert_eq!((text.as_str(), stopped), ("an ENtry", None));
        assert_eq!(pieces.concat(), "an ENtry");
        assert_eq!(
            pieces[3..6],
            ["", "", "ENt"],
            "'E', 'EN' wait: they may start END"
        );
        // Held back at the very end, released by finish.
        let (pieces, text, _) = stream("fin E", &["END"]);
        assert_eq!(
            (pieces.concat().as_str(), text.as_str()),
            ("fin E", "fin E")
        );
        assert_eq!(pieces.last().unwrap(), "E");
    }

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        // "é" is two bytes, "€" three: no piece ever ends inside one.
        let (pieces, text, _) = stream("café €5", &[]);
        assert_eq!(text, "café €5");
        assert_eq!(pieces.concat(), "café €5");
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
        // A stop string right after a multi-byte character.
        let (_, text, stopped) = stream("naïve<END>x", &["<END>"]);
        assert_eq!((text.as_str(), stopped), ("naïve", Some(0)));
    }
}
