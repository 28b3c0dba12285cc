//! Fault injection at every stage of a step ([`Engine::inject_fault`]): after the reserve,
//! after the copy-on-write page copies, after the sinks' in-place re-rotation, in a layer
//! (first and middle), before the retain, during the compaction moves (gathered, not yet
//! written), and in a later chunk of a chunked prompt. Each time, under every retention (and
//! on sharing maps), the cache (tables, scores, counters, pool), and the store's K/V rows of
//! every live slot must equal a snapshot taken before the step, bit for bit; then the same
//! step and a continuation must give the logits of a twin engine that never failed.
//!
//! The matrix is printed (`cargo test --test faults -- --nocapture`), and which cells are
//! reached is asserted, so a scenario that stops reaching a stage (no moves, no copies) fails
//! instead of passing vacuously.
//!
//! Shown failing: with `Execute::run` not calling `StepExecutor::abort`, the first
//! re-rotation cell (`stream`, fork) differs in a sink's stored key (`row (seq 0, group 0,
//! slot 0) differs`); with `retain_with` committing at once (plain `retain`), the first
//! `in-moves` cell differs in the pool (18 pages used before, 30 after); without the
//! fresh-sequence restore in `Engine::chunked`, the first chunk cell differs in the pool.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::{CacheSnapshot, Policy};
use layerkv_model::engine::{Engine, EngineConfig, FailStage, Fault, LogitsRows, PrefillMode};
use layerkv_model::{KvType, KvTypes, Model, ModelError};
use layerkv_testkit::{max_abs_diff, TinyModel};

const LAYERS: usize = 6;
const VOCAB: u32 = 64;
const PROMPT: [u32; 11] = [3, 17, 42, 5, 9, 60, 33, 8, 21, 14, 50];
const PROMPT2: [u32; 9] = [11, 2, 29, 40, 7, 55, 1, 36, 12];

const SPECS: [&str; 7] = [
    "identity",
    "identity+stream:2:5",
    "identity+h2o:3:2",
    "identity+snapkv:6:4",
    "identity+pyramid:6:4",
    "kvsharer:{\"2\":0,\"4\":1}+h2o:3:2",
    "cla:2+stream:2:5",
];

const STAGES: [FailStage; 7] = [
    FailStage::AfterReserve,
    FailStage::AfterCopies,
    FailStage::AfterRerotation,
    FailStage::Layer(0),
    FailStage::Layer(3),
    FailStage::BeforeRetain,
    FailStage::InMoves,
];

/// Where the faulted step sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// The prompt of a fresh sequence, one step (SnapKV and PyramidKV compress here).
    Prompt,
    /// Right after a fork: both sequences append into their shared tail page.
    Fork,
    /// Deep into two streams: a 5-token step beside a 1-token step.
    Stream,
    /// A fresh prompt split into 4-token chunks, failing in its second and third chunk.
    LaterChunk(usize),
}

impl Scenario {
    fn name(self) -> String {
        match self {
            Scenario::Prompt => "prompt".into(),
            Scenario::Fork => "fork".into(),
            Scenario::Stream => "stream".into(),
            Scenario::LaterChunk(c) => format!("chunk {c}"),
        }
    }

    fn chunk(self) -> usize {
        match self {
            Scenario::LaterChunk(_) => 4,
            _ => 256,
        }
    }

    /// Protocol step of the faulted call the fault fires in.
    fn protocol_step(self) -> usize {
        match self {
            Scenario::LaterChunk(c) => c,
            _ => 0,
        }
    }

    fn history(self, e: &mut Engine) {
        match self {
            Scenario::Prompt | Scenario::LaterChunk(_) => {
                e.add_sequence(1).unwrap();
                e.step(&[(1, &PROMPT2)], LogitsRows::Last).unwrap();
                e.add_sequence(0).unwrap();
            }
            Scenario::Fork => {
                e.add_sequence(0).unwrap();
                e.step(&[(0, &PROMPT)], LogitsRows::Last).unwrap();
                e.fork(0, 1).unwrap();
            }
            Scenario::Stream => {
                e.add_sequence(0).unwrap();
                e.add_sequence(1).unwrap();
                e.step(&[(0, &PROMPT)], LogitsRows::Last).unwrap();
                e.step(&[(1, &PROMPT2)], LogitsRows::Last).unwrap();
                for t in 0..7u32 {
                    let a = [(t * 7 + 2) % VOCAB];
                    let b = [(t * 5 + 9) % VOCAB];
                    e.step(&[(0, &a), (1, &b)], LogitsRows::Last).unwrap();
                }
            }
        }
    }

    fn faulted(self, e: &mut Engine) -> Result<candle_core::Tensor, ModelError> {
        match self {
            Scenario::Prompt | Scenario::LaterChunk(_) => e.step(&[(0, &PROMPT)], LogitsRows::All),
            Scenario::Fork => e.step(&[(0, &[4, 5, 6]), (1, &[7, 8, 9])], LogitsRows::All),
            Scenario::Stream => e.step(&[(0, &[1, 2, 3, 4, 5]), (1, &[6])], LogitsRows::All),
        }
    }
}

fn model() -> Arc<Model> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("layerkv-faults-{}", std::process::id()));
        TinyModel {
            layers: LAYERS,
            ..TinyModel::llama(31)
        }
        .write(&dir)
    });
    Arc::new(Model::load(dir, DType::F32, &Device::Cpu).unwrap())
}

/// [`model`] with heads one Q8_0/Q4_0 block wide (head_dim 32).
fn model_blocks() -> Arc<Model> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("layerkv-faults-blocks-{}", std::process::id()));
        TinyModel {
            layers: LAYERS,
            hidden: 128,
            ..TinyModel::llama(31)
        }
        .write(&dir)
    });
    Arc::new(Model::load(dir, DType::F32, &Device::Cpu).unwrap())
}

/// The KV page types of the engines [`engine`] builds on this thread.
fn pages() -> KvTypes {
    PAGES.with(|p| p.get())
}

thread_local! {
    static PAGES: std::cell::Cell<KvTypes> = const {
        std::cell::Cell::new(KvTypes { k: KvType::F32, v: KvType::F32, rotate: true })
    };
}

fn engine(model: &Arc<Model>, spec: &str, chunk: usize) -> Engine {
    let cfg = EngineConfig {
        block_size: 4,
        num_pages: 256,
        kv_dtype: pages(),
        prefill: PrefillMode::TokenByToken,
        prefill_chunk: chunk,
        ..EngineConfig::default()
    };
    Engine::new(
        model.clone(),
        Arc::new(Policy::from_spec(spec, LAYERS).unwrap()),
        cfg,
    )
    .unwrap()
}

/// The cache's bookkeeping and the bits of the K/V rows of every live slot, by sequence,
/// group and logical slot.
#[derive(Debug, PartialEq)]
struct Snapshot {
    cache: CacheSnapshot,
    rows: Vec<LiveRow>,
}

/// (sequence, group, logical slot, K bits, V bits) of one live slot.
type LiveRow = (u64, usize, usize, Vec<u32>, Vec<u32>);

fn snapshot(e: &Engine) -> Snapshot {
    let cache = e.cache().snapshot();
    let bs = e.cache().config().block_size;
    let mut rows = Vec::new();
    for (&seq, s) in &cache.sequences {
        for (g, t) in s.tables.iter().enumerate() {
            for slot in (0..t.num_slots()).filter(|&x| t.is_valid(x)) {
                let phys = [t.physical_slot(slot, bs).unwrap()];
                // Float rows, or the bytes of block rows (exact in f32).
                let bits = |x: candle_core::Tensor| {
                    x.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<u32>>()
                };
                let k = bits(e.store().read_keys(&phys).unwrap());
                let v = bits(e.store().read_values(&phys).unwrap());
                rows.push((seq, g, slot, k, v));
            }
        }
    }
    Snapshot { cache, rows }
}

/// What went differently between two snapshots (a readable failure instead of two dumps).
fn diff(a: &Snapshot, b: &Snapshot) -> String {
    if a.cache.pool != b.cache.pool {
        return format!("pool {:?} vs {:?}", a.cache.pool, b.cache.pool);
    }
    if a.cache.pinned != b.cache.pinned {
        return format!("pinned {:?} vs {:?}", a.cache.pinned, b.cache.pinned);
    }
    for (id, s) in &a.cache.sequences {
        let Some(t) = b.cache.sequences.get(id) else {
            return format!("sequence {id} is gone");
        };
        if s != t {
            return format!("sequence {id}: {s:?}\n  vs {t:?}");
        }
    }
    if a.rows.len() != b.rows.len() {
        return format!("{} live rows vs {}", a.rows.len(), b.rows.len());
    }
    for (x, y) in a.rows.iter().zip(&b.rows) {
        if x != y {
            return format!("row (seq {}, group {}, slot {}) differs", x.0, x.1, x.2);
        }
    }
    "equal".into()
}

/// Runs one cell: `Some(())` when the fault fired (and everything checked out), `None` when
/// the faulted step never reached the stage.
fn cell(model: &Arc<Model>, spec: &str, scenario: Scenario, stage: FailStage) -> Option<()> {
    let mut e = engine(model, spec, scenario.chunk());
    let mut twin = engine(model, spec, scenario.chunk());
    scenario.history(&mut e);
    scenario.history(&mut twin);
    let before = snapshot(&e);
    e.inject_fault(Fault {
        step: scenario.protocol_step(),
        stage,
    });
    let what = format!("{spec}, {}, {stage:?}", scenario.name());
    match scenario.faulted(&mut e) {
        Ok(_) => return None,
        Err(ModelError::Fault(s)) => assert_eq!(s, stage, "{what}"),
        Err(other) => panic!("{what}: {other}"),
    }
    e.cache().check_invariants().unwrap();
    let after = snapshot(&e);
    assert!(before == after, "{what}: {}", diff(&before, &after));
    // The same step without the fault, then single-token steps: as if it never failed.
    let a = scenario.faulted(&mut e).unwrap();
    let b = scenario.faulted(&mut twin).unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-6, "{what}: the retried step differs by {d}");
    let seqs: Vec<u64> = e.cache().snapshot().sequences.keys().copied().collect();
    for t in 0..4u32 {
        for &s in &seqs {
            let tok = [(t * 13 + s as u32 * 3 + 1) % VOCAB];
            let a = e.step(&[(s, &tok)], LogitsRows::Last).unwrap();
            let b = twin.step(&[(s, &tok)], LogitsRows::Last).unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(
                d <= 1e-6,
                "{what}: continuation step {t} seq {s} differs by {d}"
            );
        }
    }
    for &s in &seqs {
        e.free(s).unwrap();
    }
    assert_eq!(e.cache().pool_stats().num_used, 0, "{what}: pages leaked");
    Some(())
}

#[test]
fn a_failure_at_any_stage_of_a_step_changes_nothing() {
    let model = model();
    let scenarios = [
        Scenario::Prompt,
        Scenario::Fork,
        Scenario::Stream,
        Scenario::LaterChunk(1),
        Scenario::LaterChunk(2),
    ];
    let mut reached = Vec::new();
    for spec in SPECS {
        for scenario in scenarios {
            for stage in STAGES {
                if cell(&model, spec, scenario, stage).is_some() {
                    reached.push((spec, scenario, stage));
                }
            }
        }
    }
    // The matrix: stage x policy, the scenarios in which the fault fired (and the snapshot
    // and the continuation matched).
    println!("{:<18} {}", "stage", SPECS.join(" | "));
    for stage in STAGES {
        let cells: Vec<String> = SPECS
            .iter()
            .map(|spec| {
                let hit: Vec<String> = reached
                    .iter()
                    .filter(|(p, _, s)| p == spec && *s == stage)
                    .map(|(_, sc, _)| sc.name())
                    .collect();
                if hit.is_empty() {
                    "-".into()
                } else {
                    hit.join(",")
                }
            })
            .collect();
        println!("{:<18} {}", format!("{stage:?}"), cells.join(" | "));
    }
    let hit = |spec: &str, scenario: Scenario, stage: FailStage| {
        reached.contains(&(SPECS.iter().find(|s| **s == spec).unwrap(), scenario, stage))
    };
    for spec in SPECS {
        for scenario in scenarios {
            if spec == "identity" && matches!(scenario, Scenario::LaterChunk(_)) {
                continue; // Identity never splits a prompt: there is no later chunk.
            }
            for stage in [
                FailStage::AfterReserve,
                FailStage::Layer(0),
                FailStage::Layer(3),
                FailStage::BeforeRetain,
            ] {
                assert!(
                    hit(spec, scenario, stage),
                    "{spec} {scenario:?} {stage:?} not reached"
                );
            }
        }
        assert!(
            hit(spec, Scenario::Fork, FailStage::AfterCopies),
            "{spec}: no copies"
        );
    }
    for spec in SPECS.iter().filter(|s| s.contains("stream")) {
        assert!(
            hit(spec, Scenario::Stream, FailStage::AfterRerotation),
            "{spec}: no re-rotation"
        );
    }
    // Every policy but identity evicts.
    for spec in SPECS.iter().filter(|s| **s != "identity") {
        assert!(
            scenarios
                .iter()
                .any(|&sc| hit(spec, sc, FailStage::InMoves)),
            "{spec}: no compaction moves in any scenario"
        );
    }
}

/// KVzip: a failure in any protocol step of a prompt (the step before the probes, each probe,
/// the last token's step that compresses) leaves the cache and the live K/V rows as they were,
/// and the retried prompt matches an engine that never failed; per group, and with one budget
/// across every head of every layer (`+adakv:0.5:layers`).
#[test]
fn a_failure_in_a_kvzip_prompt_changes_nothing() {
    let model = model();
    for spec in ["identity+kvzip:6:4", "identity+kvzip:6:4+adakv:0.5:layers"] {
        kvzip_prompt_failures(&model, spec);
    }
}

fn kvzip_prompt_failures(model: &Arc<Model>, spec: &str) {
    let scenario = Scenario::Prompt;
    // An 11-token prompt: step 0 runs its first 10 tokens, steps 1-3 the probes (4, 4 and 2
    // tokens after their tails), step 4 its last token.
    let mut reached = Vec::new();
    for step in 0..6 {
        for stage in STAGES {
            let mut e = engine(model, spec, 256);
            let mut twin = engine(model, spec, 256);
            scenario.history(&mut e);
            scenario.history(&mut twin);
            let before = snapshot(&e);
            e.inject_fault(Fault { step, stage });
            let what = format!("{spec}, step {step}, {stage:?}");
            match scenario.faulted(&mut e) {
                Ok(_) => continue,
                Err(ModelError::Fault(s)) => assert_eq!(s, stage, "{what}"),
                Err(other) => panic!("{what}: {other}"),
            }
            e.cache().check_invariants().unwrap();
            let after = snapshot(&e);
            assert!(before == after, "{what}: {}", diff(&before, &after));
            let a = scenario.faulted(&mut e).unwrap();
            let b = scenario.faulted(&mut twin).unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(d <= 1e-6, "{what}: the retried prompt differs by {d}");
            let r = e.cache().read();
            let held: Vec<usize> = (0..e.cache().num_groups())
                .map(|g| r.table(0, g).unwrap().num_valid())
                .collect();
            drop(r);
            assert_eq!(
                held.iter().sum::<usize>(),
                6 * held.len(),
                "{what}: compressed to the budget: {held:?}"
            );
            reached.push((step, stage));
        }
    }
    for step in 1..4 {
        for stage in [
            FailStage::AfterReserve,
            FailStage::Layer(0),
            FailStage::Layer(3),
        ] {
            assert!(
                reached.contains(&(step, stage)),
                "probe step {step} {stage:?}"
            );
        }
    }
    assert!(
        reached.contains(&(4, FailStage::BeforeRetain)),
        "the compressing step: {reached:?}"
    );
    assert!(
        !reached.iter().any(|&(s, _)| s == 5),
        "a prompt of 11 tokens runs 5 protocol steps: {reached:?}"
    );
}

/// Quantized pages (Q8_0, and Q8_0 keys with Q4_0 values): a failure at any stage leaves the
/// stored blocks of every live slot byte for byte as they were (the rollback of re-rotated
/// sinks writes the saved blocks back; compaction moves gather before they write), and the
/// retry matches a twin that never failed.
#[test]
fn a_failure_on_quantized_pages_changes_nothing() {
    let model = model_blocks();
    let specs = [
        "identity+stream:2:5",
        "identity+snapkv:6:4",
        "cla:2+stream:2:5",
    ];
    let mixed = KvTypes::new(KvType::Q8_0, KvType::Q4_0);
    for kv in [KvTypes::both(KvType::Q8_0), mixed] {
        PAGES.with(|p| p.set(kv));
        let mut reached = Vec::new();
        for spec in specs {
            for scenario in [Scenario::Prompt, Scenario::Fork, Scenario::Stream] {
                for stage in STAGES {
                    if cell(&model, spec, scenario, stage).is_some() {
                        reached.push((spec, scenario, stage));
                    }
                }
            }
        }
        for spec in specs {
            let hit = |scenario, stage| reached.contains(&(spec, scenario, stage));
            assert!(
                hit(Scenario::Fork, FailStage::AfterCopies),
                "{kv} {spec}: no copies"
            );
            assert!(
                [Scenario::Prompt, Scenario::Fork, Scenario::Stream]
                    .iter()
                    .any(|&sc| hit(sc, FailStage::InMoves)),
                "{kv} {spec}: no compaction moves"
            );
            if spec.contains("stream") {
                assert!(
                    hit(Scenario::Stream, FailStage::AfterRerotation),
                    "{kv} {spec}: no re-rotation"
                );
            }
        }
    }
    PAGES.with(|p| p.set(KvTypes::both(KvType::F32)));
}
