//! `layerkv generate`: one prompt, one reply streamed to stdout as it is generated; `--chat`
//! wraps the prompt in the model's own chat template. Also the pieces `chat` shares: the model,
//! policy and device flags ([`ModelArgs`]), the sampling flags ([`SamplingArgs`]) and the
//! loaded [`Runner`] (model, tokenizer, engine sized for `--max-context`, stop criteria).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::DType;
use layerkv::{plan::Planner, LayerKvPolicy, SeqId};
use layerkv_model::chat::{ChatTemplate, Message};
use layerkv_model::engine::{Engine, EngineConfig};
use layerkv_model::generate::{
    complete, stop_tokens, Completion, GenerationConfig, Sampler, Sampling, StopCriteria,
};
use layerkv_model::tokenizer::Tokenizer;
use layerkv_model::Model;

use crate::device::DeviceArgs;
use crate::policy_spec;

/// Token slots per KV page of the engines built here.
const BLOCK_SIZE: usize = 16;

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

/// A model loaded for generation: tokenizer, engine under the policy, stop criteria, sampling.
pub struct Runner {
    /// The model directory.
    pub dir: PathBuf,
    /// The model.
    pub model: Arc<Model>,
    /// Its tokenizer (with the BOS prefix `tokenizer_config.json` asks for).
    pub tokenizer: Tokenizer,
    /// The engine (one KV pool sized for `max_context` tokens under the policy).
    pub engine: Engine,
    /// Sampling settings.
    pub sampling: Sampling,
    /// EOS ids, stop strings and the token budget per reply.
    pub stop: StopCriteria,
    planner: Planner,
    kv_dtype: DType,
    policy_name: String,
}

impl Runner {
    /// Loads the model of `args` (converting a GGUF once), its tokenizer and generation
    /// defaults, and builds an engine under the policy.
    pub fn load(args: &ModelArgs, flags: &SamplingArgs) -> Result<Self> {
        let (device, dtype) = args.device.resolve()?;
        let dir = match &args.model {
            Some(d) => layerkv_model::assets::resolve_model(d)?,
            None => layerkv_model::assets::ensure_default_model()
                .context("fetching the default model")?,
        };
        let model = Arc::new(
            Model::load(&dir, dtype, &device)
                .with_context(|| format!("loading {}", dir.display()))?,
        );
        let tokenizer = layerkv_model::tokenizer::load(&dir)?;
        let gen = GenerationConfig::load(&dir)?;
        let (sampling, max_new_tokens) = flags.resolve(&gen)?;
        let policy = Arc::new(policy_spec::parse(&args.policy, model.num_layers())?);
        let cfg = EngineConfig {
            block_size: BLOCK_SIZE,
            sliding_window: args.window,
            kv_dtype: dtype,
            ..EngineConfig::default()
        };
        let planner = Planner {
            block_size: BLOCK_SIZE,
            sliding_window: args.window,
            model_window: model.config().sliding_window,
            step_tokens: cfg.prefill_chunk,
        };
        ensure!(args.max_context > 0, "--max-context must be positive");
        let num_pages = planner.pages_per_sequence(policy.as_ref(), args.max_context)
            + policy.layer_map().num_groups();
        let engine = Engine::new(model.clone(), policy, EngineConfig { num_pages, ..cfg })?;
        let stop_tokens = stop_tokens(&dir, model.config(), &gen, &tokenizer);
        Ok(Self {
            dir,
            model,
            tokenizer,
            engine,
            sampling,
            stop: StopCriteria {
                max_new_tokens,
                stop_tokens,
                stop_strings: flags.stop.clone(),
            },
            planner,
            kv_dtype: dtype,
            policy_name: args.policy.clone(),
        })
    }

    /// The model's chat template; its end-of-turn token joins the stop tokens.
    pub fn chat_template(&mut self) -> Result<ChatTemplate> {
        let t = ChatTemplate::load(&self.dir)?;
        if let Some(id) = t.end_of_turn().and_then(|m| self.tokenizer.token_id(&m)) {
            if !self.stop.stop_tokens.contains(&id) {
                self.stop.stop_tokens.push(id);
            }
        }
        Ok(t)
    }

    /// Errors unless `seq` can take `new_tokens` more tokens plus a full reply within the pool.
    pub fn check_room(&self, seq: SeqId, new_tokens: usize) -> Result<()> {
        let held = self.engine.cache().num_tokens(seq)?;
        let need = held + new_tokens + self.stop.max_new_tokens;
        let pages = self
            .planner
            .pages_per_sequence(self.engine.policy().as_ref(), need);
        let have = self.engine.config().num_pages;
        ensure!(
            pages <= have,
            "the conversation would reach {need} tokens, more than the KV pool sized by \
             --max-context holds under this policy ({pages} pages needed, {have} allocated): \
             raise --max-context, /reset, or use a policy that evicts (e.g. identity+stream:4:1020)"
        );
        Ok(())
    }

    /// Generates a reply to `prompt` appended to `seq`, streaming its text to stdout.
    pub fn reply(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Completion> {
        self.check_room(seq, prompt.len())?;
        let mut out = std::io::stdout();
        let c = complete(
            &mut self.engine,
            seq,
            prompt,
            sampler,
            &self.stop,
            &self.tokenizer,
            |piece| {
                // A closed stdout (`| head`) ends nothing here: the reply still completes.
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            },
        )?;
        let _ = writeln!(out);
        Ok(c)
    }

    /// "KV 1.2 MiB held for 812 tokens (identity: 21.9 MiB)" for `seq`, from the cache's own
    /// accounting.
    pub fn memory_line(&self, seq: SeqId) -> Result<String> {
        let held = self.engine.cache().memory(seq)?.total_bytes;
        let tokens = self.engine.cache().num_tokens(seq)?;
        let identity = self.model.config().identity_kv_bytes(
            tokens,
            BLOCK_SIZE,
            self.kv_dtype.size_in_bytes(),
        );
        Ok(format!(
            "KV {} held for {tokens} tokens (identity: {}) under {}",
            human_bytes(held),
            human_bytes(identity),
            self.policy_name
        ))
    }
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs `layerkv generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let mut r = Runner::load(&args.model, &args.sampling)?;
    let mut sampler = Sampler::new(r.sampling);
    let seq: SeqId = 0;
    let ids = if args.chat {
        let template = r.chat_template()?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.as_str()));
        }
        messages.push(Message::new("user", args.prompt.as_str()));
        let text = template.render(&messages, true)?;
        // The template writes the special tokens (BOS included) itself.
        r.tokenizer.clone().with_bos_prefix(None).encode(&text)?
    } else {
        if ChatTemplate::load(&r.dir).is_ok() {
            tracing::info!("the model has a chat template: `--chat` applies it (instruct models answer that way)");
        }
        print!("{}", args.prompt);
        r.tokenizer.encode(&args.prompt)?
    };
    ensure!(!ids.is_empty(), "--prompt is empty");
    r.engine.add_sequence(seq)?;
    let c = r.reply(seq, &ids, &mut sampler)?;
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s; {}",
        c.num_prompt_tokens,
        c.tokens.len(),
        c.prefill_tokens_per_sec,
        c.decode_tokens_per_sec,
        r.memory_line(seq)?
    );
    r.engine.free(seq)?;
    Ok(())
}
