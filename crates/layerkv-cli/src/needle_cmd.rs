//! `layerkv needle`: retrieval accuracy (RULER-style pass key and needle tasks, exact match)
//! per policy, per task and per query mode, on one model and one haystack text.
//!
//! One model is loaded once; each policy gets its own [`Session`] over it (identity first, as
//! the reference, added when not named). Every policy answers the same samples
//! ([`layerkv_model::needle::Generator`], one seed), in the query-aware mode (the question ends
//! the prompt), the query-agnostic mode (the context is prefilled and compressed first, the
//! questions come as later turns) or both. Stdout: a table of accuracy per policy, task and
//! mode, with each accuracy as a fraction of identity's; `--plot-dir`: a depth x length
//! accuracy heatmap PNG per policy and mode; `--json`: every sample's answers and the table.
//! Progress lines go to stderr.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use layerkv::Policy;
use layerkv_model::needle::{run_sample, Generator, Grid, Outcome, QueryMode, Sample, Task};
use layerkv_model::{Session, SessionOptions};
use serde::Serialize;

use crate::device::DeviceArgs;

/// Room in the pool past the context for the template, the questions and the answers.
const PROMPT_SLACK: usize = 1024;

/// `layerkv needle` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct NeedleArgs {
    /// Model directory or GGUF file (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Policies (files or specs, see `policy --help`); identity is always run first, in
    /// `--kv-dtype` pages. `SPEC@TYPES` runs one in its own page types (`identity@q8_0`,
    /// `identity+kvzip:256+adakv:0@q4_0`).
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// Tasks, comma-separated: passkey, niah_number, niah_word, niah_uuid, multikey,
    /// multivalue, multiquery (or `all`).
    #[arg(long, default_value = "passkey", value_delimiter = ',')]
    pub task: Vec<String>,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, default_value = "512,1024,2048", value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Needle depths (fraction of the context before the needle), comma-separated.
    #[arg(long, default_value = "0.1,0.5,0.9", value_delimiter = ',')]
    pub depths: Vec<f64>,
    /// Samples per (task, length, depth) cell.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Query mode: aware (the question ends the prompt), agnostic (the context first, the
    /// questions as later turns) or both.
    #[arg(long, default_value = "both", value_parser = ["aware", "agnostic", "both"])]
    pub mode: String,
    /// Seed of the task generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Haystack text file (default: the Jargon File).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Window of the policy's sliding-window layers (`s`-suffixed layer_types, `yoco`).
    #[arg(long)]
    pub window: Option<usize>,
    /// Most tokens of a prompt one step prefills under a policy that evicts (retention runs
    /// between steps, so a window's peak is the window plus one chunk); default the
    /// session's, 256.
    #[arg(long)]
    pub chunk: Option<usize>,
    /// Prefill KVzip's prompts layer-major (every prompt token through a layer before the
    /// next; see `Engine::set_layer_major`): the same answers as step by step, with one layer's
    /// prompt held at a time instead of the whole prompt. Applies to the policies that probe
    /// (KVzip) and qualify (`kvzip:B` on a map where every layer owns its KV); the others run
    /// step by step, and the log says which ran how and why.
    #[arg(long)]
    pub layer_major: bool,
    /// Write every sample's answers and the table as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a depth x length heatmap PNG per policy and mode into this directory.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// One sample's result under one policy and mode (a JSON record).
#[derive(Serialize)]
struct Record {
    policy: String,
    task: String,
    mode: String,
    length: usize,
    depth: f64,
    index: usize,
    context_tokens: usize,
    correct: bool,
    recall: f64,
    answers: Vec<String>,
    expected: Vec<Vec<String>>,
    held_tokens: Vec<usize>,
    /// The most KV bytes the sample's sequence held at any moment (the pool's high-water mark).
    peak_kv_bytes: usize,
}

/// Accuracy of one policy on one task in one mode (a table row).
#[derive(Serialize, Clone)]
struct Row {
    policy: String,
    task: String,
    mode: String,
    samples: usize,
    correct: usize,
    accuracy: f64,
    /// accuracy / identity's accuracy (None when identity's is 0).
    of_identity: Option<f64>,
    /// The largest peak KV bytes of the cell's samples.
    peak_kv_bytes: usize,
    /// `peak_kv_bytes` / identity's.
    peak_of_identity: Option<f64>,
}

#[derive(Serialize)]
struct Report<'a> {
    seed: u64,
    lengths: &'a [usize],
    depths: &'a [f64],
    samples_per_cell: usize,
    rows: &'a [Row],
    records: &'a [Record],
}

fn parse_tasks(names: &[String]) -> Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for n in names {
        let n = n.trim();
        if n == "all" {
            tasks.extend(Task::ALL);
        } else {
            tasks.push(n.parse::<Task>()?);
        }
    }
    tasks.dedup();
    ensure!(!tasks.is_empty(), "--task names no task");
    Ok(tasks)
}

fn modes(mode: &str) -> Vec<QueryMode> {
    match mode {
        "aware" => vec![QueryMode::QueryAware],
        "agnostic" => vec![QueryMode::QueryAgnostic],
        _ => vec![QueryMode::QueryAware, QueryMode::QueryAgnostic],
    }
}

/// A file-name-safe version of a policy spec.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Runs `layerkv needle`.
pub fn run(args: NeedleArgs) -> Result<()> {
    let tasks = parse_tasks(&args.task)?;
    ensure!(
        !args.lengths.is_empty() && args.lengths.iter().all(|&l| l > 0),
        "--lengths needs positive lengths"
    );
    ensure!(
        !args.depths.is_empty() && args.depths.iter().all(|d| (0.0..=1.0).contains(d)),
        "--depths needs fractions in 0..=1"
    );
    ensure!(args.samples > 0, "--samples must be positive");
    ensure!(args.chunk != Some(0), "--chunk must be positive");
    let (dir, model, dtype) = crate::generate_cmd::load_model(args.model.as_ref(), &args.device)?;
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => layerkv_model::assets::ensure_default_texts()?.jargon,
    };
    let text = read_text(&text_path)?;
    let n = model.num_layers();
    let mut specs = vec!["identity".to_string()];
    specs.extend(args.policies.iter().filter(|p| *p != "identity").cloned());
    let longest = *args.lengths.iter().max().unwrap_or(&0);
    let modes = modes(&args.mode);
    let grid = Grid {
        tasks: tasks.clone(),
        lengths: args.lengths.clone(),
        depths: args.depths.clone(),
        samples: args.samples,
    };
    let tokenizer = layerkv_model::tokenizer::load(&dir)?;
    let samples = Generator::new(&text, &tokenizer)?.grid(&grid, args.seed)?;
    eprintln!(
        "needle: {} samples ({} tasks x {} lengths x {} depths x {}), {} policies, modes {}",
        samples.len(),
        tasks.len(),
        args.lengths.len(),
        args.depths.len(),
        args.samples,
        specs.len(),
        modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(",")
    );
    let mut records = Vec::new();
    for spec in &specs {
        let (policy_spec, kv) = crate::device::policy_page_types(spec, dtype)?;
        let policy =
            Policy::from_spec(policy_spec, n).with_context(|| format!("policy {spec:?}"))?;
        let options = SessionOptions {
            max_context: longest + PROMPT_SLACK,
            kv_dtype: kv,
            sliding_window: args.window,
            prefill_chunk: args.chunk,
            ..SessionOptions::default()
        };
        let mut session = Session::new(&dir, model.clone(), policy, options)
            .with_context(|| format!("a session under {spec:?}"))?;
        session.chat_template()?;
        if args.layer_major && session.engine().probe_chunk().is_some() {
            match session.engine_mut().set_layer_major(true) {
                Ok(()) => eprintln!("needle: {spec} prefills its prompts layer-major"),
                Err(e) => eprintln!("needle: {spec} prefills step by step: {e}"),
            }
        }
        for (i, s) in samples.iter().enumerate() {
            for &mode in &modes {
                session.engine().cache().reset_peak();
                session.engine_mut().reset_scratch_peak();
                let o = run_sample(&mut session, s, mode).with_context(|| {
                    format!(
                        "{spec}: {} at {} tokens, depth {} ({mode})",
                        s.task, s.length, s.depth
                    )
                })?;
                eprintln!(
                    "[{spec}] {}/{} {} len {} depth {} #{} {mode}: {} ({:?})",
                    i + 1,
                    samples.len(),
                    s.task,
                    s.length,
                    s.depth,
                    s.index,
                    if o.correct() { "right" } else { "wrong" },
                    o.turns.first().map_or("", |t| t.answer.trim()),
                );
                let cache = session.engine().cache();
                // A layer-major prefill's scratch pages come on top of the pool's.
                let peak = cache.pool_stats().peak_used * cache.config().page_bytes()
                    + session.engine().scratch_peak_bytes();
                records.push(record(spec, s, &o, peak));
            }
        }
    }
    let rows = table_rows(&specs, &tasks, &modes, &records);
    println!("{}", render(&rows));
    println!(
        "accuracy: exact match (every expected value in the answer), {} samples per task and \
         mode ({} lengths x {} depths x {}), greedy, seed {}; x id = accuracy / identity's; peak \
         KV bytes: the most any sample's sequence held at once (the pool's high-water mark, plus a \
         layer-major prefill's scratch pages)",
        args.lengths.len() * args.depths.len() * args.samples,
        args.lengths.len(),
        args.depths.len(),
        args.samples,
        args.seed
    );
    if let Some(d) = &args.plot_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        for spec in &specs {
            for &mode in &modes {
                let m = heat(&records, spec, mode, &args.lengths, &args.depths);
                let path = d.join(format!("needle-{}-{mode}.png", slug(spec)));
                let title = format!(
                    "{spec} ({mode}): x = length {:?}, y = depth {:?}",
                    args.lengths, args.depths
                );
                crate::plot::heatmap_in(
                    &path,
                    &m,
                    &title,
                    "length (x) / depth (y) index",
                    (0.0, 1.0),
                )?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if let Some(p) = &args.json {
        let report = Report {
            seed: args.seed,
            lengths: &args.lengths,
            depths: &args.depths,
            samples_per_cell: args.samples,
            rows: &rows,
            records: &records,
        };
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The haystack text: a gzip file is refused with a hint, anything else read as UTF-8.
fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        bail!("{} is gzip-compressed: gunzip it first", path.display());
    }
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

fn record(policy: &str, s: &Sample, o: &Outcome, peak_kv_bytes: usize) -> Record {
    Record {
        policy: policy.to_string(),
        task: s.task.to_string(),
        mode: o.mode.to_string(),
        length: s.length,
        depth: s.depth,
        index: s.index,
        context_tokens: s.num_context_tokens,
        correct: o.correct(),
        recall: o.recall(),
        answers: o.turns.iter().map(|t| t.answer.clone()).collect(),
        expected: o.turns.iter().map(|t| t.expected.clone()).collect(),
        held_tokens: o.turns.iter().map(|t| t.held_tokens).collect(),
        peak_kv_bytes,
    }
}

fn table_rows(
    specs: &[String],
    tasks: &[Task],
    modes: &[QueryMode],
    records: &[Record],
) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for spec in specs {
        for task in tasks {
            for mode in modes {
                let (task, mode) = (task.to_string(), mode.to_string());
                let cell: Vec<_> = records
                    .iter()
                    .filter(|r| &r.policy == spec && r.task == task && r.mode == mode)
                    .collect();
                let correct = cell.iter().filter(|r| r.correct).count();
                let accuracy = correct as f64 / cell.len().max(1) as f64;
                let peak = cell.iter().map(|r| r.peak_kv_bytes).max().unwrap_or(0);
                let reference = rows
                    .iter()
                    .find(|r| r.policy == specs[0] && r.task == task && r.mode == mode);
                let peak_reference = reference.map_or(peak, |r| r.peak_kv_bytes);
                let reference = reference.map_or(accuracy, |r| r.accuracy);
                rows.push(Row {
                    policy: spec.clone(),
                    task,
                    mode,
                    samples: cell.len(),
                    correct,
                    accuracy,
                    of_identity: (reference > 0.0).then(|| accuracy / reference),
                    peak_kv_bytes: peak,
                    peak_of_identity: (peak_reference > 0)
                        .then(|| peak as f64 / peak_reference as f64),
                });
            }
        }
    }
    rows
}

fn render(rows: &[Row]) -> String {
    let w = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<w$}  {:<11}  {:<8}  {:>7}  {:>8}  {:>6}  {:>13}  {:>6}\n",
        "policy", "task", "mode", "right", "accuracy", "x id", "peak KV bytes", "x id"
    );
    for r in rows {
        let ratio = r.of_identity.map_or("-".to_string(), |x| format!("{x:.2}"));
        let peak = r
            .peak_of_identity
            .map_or("-".to_string(), |x| format!("{x:.3}"));
        out.push_str(&format!(
            "{:<w$}  {:<11}  {:<8}  {:>7}  {:>8.3}  {:>6}  {:>13}  {:>6}\n",
            r.policy,
            r.task,
            r.mode,
            format!("{}/{}", r.correct, r.samples),
            r.accuracy,
            ratio,
            r.peak_kv_bytes,
            peak
        ));
    }
    out.trim_end().to_string()
}

/// Accuracy of `policy` in `mode` over every task: rows = depths, columns = lengths.
fn heat(
    records: &[Record],
    policy: &str,
    mode: QueryMode,
    lengths: &[usize],
    depths: &[f64],
) -> Vec<Vec<f64>> {
    let mode = mode.to_string();
    depths
        .iter()
        .map(|&d| {
            lengths
                .iter()
                .map(|&l| {
                    let cell: Vec<_> = records
                        .iter()
                        .filter(|r| {
                            r.policy == policy && r.mode == mode && r.length == l && r.depth == d
                        })
                        .collect();
                    if cell.is_empty() {
                        f64::NAN
                    } else {
                        cell.iter().filter(|r| r.correct).count() as f64 / cell.len() as f64
                    }
                })
                .collect()
        })
        .collect()
}
