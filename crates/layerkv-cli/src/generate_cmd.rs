//! `layerkv generate`: one prompt, one reply streamed to stdout as it is generated; `--chat`
//! wraps the prompt in the model's own chat template. Also the pieces `chat` shares: the model,
//! policy and device flags ([`ModelArgs`]), the sampling flags ([`SamplingArgs`]), and the
//! [`Session`] they load.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use layerkv::{Policy, SeqId};
use layerkv_model::chat::{ChatTemplate, Message};
use layerkv_model::generate::{generate_batch, Completion, GenerationConfig, Sampler, Sampling};
use layerkv_model::{Model, Session, SessionOptions};

use crate::device::DeviceArgs;

/// Which model runs where, under which policy.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory or GGUF file (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Policy file or spec (see `policy --help`), e.g. `identity+stream:4:1020`.
    #[arg(long, default_value = "identity")]
    pub policy: String,
    /// Window of the policy's sliding-window layers (`s`-suffixed layer_types, `yoco`).
    #[arg(long)]
    pub window: Option<usize>,
    /// Longest conversation in tokens; the KV pool is sized for it under the policy (a policy
    /// that evicts needs only its window, whatever this says).
    #[arg(long, default_value_t = 4096)]
    pub max_context: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Sampling flags; unset ones come from the model's `generation_config.json`, else greedy.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty over the last `--repeat-last-n` tokens (1 = off).
    #[arg(long, visible_alias = "repetition-penalty")]
    pub repeat_penalty: Option<f32>,
    /// Presence penalty (0 = off).
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty (0 = off).
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Context tokens the penalties look back over.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// RNG seed (same seed, same reply).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per reply (default: generation_config.json's max_new_tokens, else 256).
    #[arg(long, visible_alias = "max-new")]
    pub max_tokens: Option<usize>,
    /// Stop when the reply contains this text (cut from the output); repeatable.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampling and the token budget: flags over `defaults`.
    pub fn resolve(&self, defaults: &GenerationConfig) -> Result<(Sampling, usize)> {
        let mut s = defaults.sampling();
        let set = |v: Option<f32>, name: &str, ok: fn(f32) -> bool, slot: &mut f32| {
            if let Some(v) = v {
                ensure!(ok(v), "--{name} {v}: out of range");
                *slot = v;
            }
            Ok(())
        };
        set(
            self.temperature,
            "temperature",
            |v| v >= 0.0,
            &mut s.temperature,
        )?;
        set(self.top_p, "top-p", |v| v > 0.0 && v <= 1.0, &mut s.top_p)?;
        set(
            self.min_p,
            "min-p",
            |v| (0.0..1.0).contains(&v),
            &mut s.min_p,
        )?;
        set(
            self.repeat_penalty,
            "repeat-penalty",
            |v| v > 0.0,
            &mut s.repetition_penalty,
        )?;
        set(
            self.presence_penalty,
            "presence-penalty",
            f32::is_finite,
            &mut s.presence_penalty,
        )?;
        set(
            self.frequency_penalty,
            "frequency-penalty",
            f32::is_finite,
            &mut s.frequency_penalty,
        )?;
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        s.penalty_last_n = self.repeat_last_n;
        s.seed = self.seed;
        let max = self.max_tokens.or(defaults.max_new_tokens).unwrap_or(256);
        Ok((s, max))
    }
}

/// The model directory of `--model` and the model loaded from it (see
/// [`DeviceArgs::load_model`]: a GGUF runs quantized unless `--weights f32`; none: the
/// embedded default, fetched on first use). Returns the directory, the model and the dtype.
pub fn load_model(
    model: Option<&PathBuf>,
    device: &DeviceArgs,
) -> Result<(PathBuf, Arc<Model>, layerkv_model::KvTypes)> {
    device.load_model(model.map(PathBuf::as_path))
}

impl ModelArgs {
    /// Loads the model (converting a GGUF once), its tokenizer and generation defaults, and a
    /// session under `--policy` whose pool holds `--max-context` tokens.
    pub fn session(&self, flags: &SamplingArgs) -> Result<Session> {
        self.session_for(flags, 1)
    }

    /// [`Self::session`] with a pool for `sequences` sequences of `--max-context` tokens.
    pub fn session_for(&self, flags: &SamplingArgs, sequences: usize) -> Result<Session> {
        let (dir, model, dtype) = load_model(self.model.as_ref(), &self.device)?;
        let (sampling, max_tokens) = flags.resolve(&GenerationConfig::load(&dir)?)?;
        let policy = Policy::from_spec(&self.policy, model.num_layers())?;
        let options = SessionOptions {
            max_context: self.max_context,
            max_sequences: sequences.max(1),
            kv_dtype: dtype,
            sliding_window: self.window,
            max_tokens: Some(max_tokens),
            sampling: Some(sampling),
            stop_strings: flags.stop.clone(),
            ..SessionOptions::default()
        };
        Session::new(&dir, model, policy, options).with_context(|| {
            format!(
                "--policy {} with --max-context {}",
                self.policy, self.max_context
            )
        })
    }
}

/// Generates a reply to `prompt` appended to `seq`, streaming its text to stdout.
pub fn reply(
    session: &mut Session,
    seq: SeqId,
    prompt: &[u32],
    sampler: &mut Sampler,
) -> Result<Completion> {
    let mut out = std::io::stdout();
    let c = session.complete(seq, prompt, sampler, |piece| {
        // A closed stdout (`| head`) ends nothing here: the reply still completes.
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(c)
}

/// "KV 1.2 MiB held for 812 tokens (identity: 21.9 MiB) under POLICY" for `seq`, from the
/// cache's own accounting.
pub fn memory_line(session: &Session, seq: SeqId) -> Result<String> {
    let m = session.memory(seq)?;
    Ok(format!(
        "KV {} held for {} tokens (identity: {}) under {}",
        human_bytes(m.held_bytes),
        m.tokens,
        human_bytes(m.identity_bytes),
        session.policy_name()
    ))
}

/// Bytes with a binary unit.
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.2} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// `layerkv generate` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as a user message through the model's chat template (instruct models).
    #[arg(long)]
    pub chat: bool,
    /// System message (with `--chat`).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Decode N replies to the prompt together, one batch of N rows per step: the prompt is
    /// prefilled once and forked (its pages shared), reply `i` samples with seed `--seed + i`
    /// (greedy replies are identical). Prints every reply when the batch ends, and the batch's
    /// throughput over all sequences: batched decoding as a server runs it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,
    /// Keep generating past end-of-sequence and end-of-turn tokens, to `--max-tokens` (for
    /// benchmarks, as llama.cpp's `--ignore-eos`).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs `layerkv generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    ensure!(
        args.batch == 1 || args.sampling.stop.is_empty(),
        "--stop applies to one reply; with --batch {} the replies end at end tokens or \
         --max-tokens",
        args.batch
    );
    let mut session = args
        .model
        .session_for(&args.sampling, args.batch as usize)?;
    if args.ignore_eos {
        session.stop_criteria_mut().stop_tokens.clear();
    }
    let mut sampler = Sampler::new(session.sampling());
    let ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.as_str()));
        }
        messages.push(Message::new("user", args.prompt.as_str()));
        session.chat_prompt(&messages)?
    } else {
        if ChatTemplate::load(session.dir()).is_ok() {
            tracing::info!("the model has a chat template: `--chat` applies it (instruct models answer that way)");
        }
        if args.batch == 1 {
            print!("{}", args.prompt);
        }
        session.tokenizer().encode(&args.prompt)?
    };
    if args.batch > 1 {
        return run_batch(&mut session, &ids, args.batch as usize);
    }
    let seq: SeqId = 0;
    session.engine_mut().add_sequence(seq)?;
    let c = reply(&mut session, seq, &ids, &mut sampler)?;
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s; {}",
        c.num_prompt_tokens,
        c.tokens.len(),
        c.prefill_tokens_per_sec,
        c.decode_tokens_per_sec,
        memory_line(&session, seq)?
    );
    session.engine_mut().free(seq)?;
    Ok(())
}

/// `generate --batch N`: N replies decoded together; each printed after a `--- reply i` line.
fn run_batch(session: &mut Session, ids: &[u32], n: usize) -> Result<()> {
    let seqs: Vec<SeqId> = (0..n as SeqId).collect();
    let stop = session.stop_criteria().clone();
    let sampling = session.sampling();
    session.check_room(None, ids.len(), stop.max_new_tokens)?;
    let g = generate_batch(
        session.engine_mut(),
        &seqs,
        ids,
        stop.max_new_tokens,
        sampling,
        &stop.stop_tokens,
    )?;
    let mut out = std::io::stdout().lock();
    for (i, tokens) in g.tokens.iter().enumerate() {
        let text = match tokens.last() {
            Some(t) if stop.stop_tokens.contains(t) => &tokens[..tokens.len() - 1],
            _ => &tokens[..],
        };
        let _ = writeln!(out, "--- reply {i}");
        let _ = writeln!(out, "{}", session.tokenizer().decode(text)?);
    }
    let longest = g.tokens.iter().map(Vec::len).max().unwrap_or(0);
    eprintln!(
        "{n} sequences x {longest} generated; prefill {:.1} tok/s, decode {:.1} tok/s over all \
         sequences ({} prompt tokens once, {} batched steps)",
        g.prefill_tokens_per_sec,
        g.decode_tokens_per_sec,
        ids.len(),
        g.decode_steps
    );
    Ok(())
}
