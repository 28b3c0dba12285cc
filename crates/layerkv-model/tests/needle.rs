//! The two query modes of [`layerkv_model::needle::run_sample`] on a tiny random llama: what the
//! cache holds when the question arrives.
//!
//! Query-aware puts the question in the context's own prompt: nothing is held before it, and
//! the one prefill carries context and question together. Query-agnostic prefills (and, under
//! a window, compresses) the context first: when the question arrives the cache already holds
//! the context (identity: all of it; `stream:4:60`: at most the 64 tokens of its window), and
//! the question's turn appends only the question.
//!
//! Shown to fail: reading `held_tokens` after the question's completion instead of before it
//! (identity's held count then differed from the tokens seen before the question).

use std::path::Path;

use candle_core::{DType, Device};
use layerkv::Policy;
use layerkv_model::needle::{run_sample, Generator, QueryMode, Task};
use layerkv_model::{Session, SessionOptions};
use layerkv_testkit::{scratch, TinyModel};

/// Raises the tiny model's context to 2048 tokens: its byte-level tokenizer spends a token per
/// byte, and the preamble, a multi-query question and the template alone take ~400.
fn long_context(dir: &Path) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["max_position_embeddings"] = 2048.into();
    std::fs::write(&path, c.to_string()).unwrap();
}

fn haystack() -> String {
    (0..300)
        .map(|i| format!("Line {i} of the filler text says nothing at all. "))
        .collect()
}

fn session(dir: &Path, spec: &str) -> Session {
    let policy = Policy::from_spec(spec, 4).unwrap();
    let options = SessionOptions {
        max_context: 2048,
        ..SessionOptions::default()
    };
    Session::load(dir, DType::F32, &Device::Cpu, policy, options).unwrap()
}

#[test]
fn needle_modes_differ_in_what_the_cache_holds_when_the_question_arrives() {
    let dir = TinyModel::llama(5).write(&scratch("needle-modes"));
    long_context(&dir);
    let mut identity = session(&dir, "identity");
    let mut stream = session(&dir, "identity+stream:4:60");
    let g = Generator::new(&haystack(), identity.tokenizer()).unwrap();
    for task in [Task::Passkey, Task::MultiQuery] {
        let sample = g.sample(task, 160, 0.5, 0, 11).unwrap();
        let context = sample.num_context_tokens;
        for s in [&mut identity, &mut stream] {
            let aware = run_sample(s, &sample, QueryMode::QueryAware).unwrap();
            assert_eq!(aware.mode, QueryMode::QueryAware);
            assert_eq!(aware.turns.len(), 1);
            let t = &aware.turns[0];
            assert_eq!((t.held_tokens, t.seen_tokens), (0, 0), "{task} aware");
            assert!(
                t.new_tokens > context,
                "{task} aware: context + question in one prompt"
            );
            assert!((0.0..=1.0).contains(&aware.recall()));

            let agnostic = run_sample(s, &sample, QueryMode::QueryAgnostic).unwrap();
            assert_eq!(agnostic.turns.len(), sample.turns.len());
            let first = &agnostic.turns[0];
            assert!(
                first.seen_tokens > context,
                "{task}: the context came first"
            );
            assert!(
                first.new_tokens < sample.turns[0].question.len() + 32,
                "{task} agnostic: the question's turn appends only the question ({} tokens)",
                first.new_tokens
            );
            if s.policy_name() == "identity" {
                assert_eq!(
                    first.held_tokens, first.seen_tokens,
                    "{task}: identity keeps all"
                );
            } else {
                assert!(
                    first.held_tokens > 0 && first.held_tokens <= 64,
                    "{task}: the window holds {} of {} tokens",
                    first.held_tokens,
                    first.seen_tokens
                );
            }
            // Later questions arrive on the same sequence, after the earlier turns.
            for w in agnostic.turns.windows(2) {
                assert!(w[1].seen_tokens > w[0].seen_tokens);
            }
            // The sequence was freed: the next run starts empty.
            assert!(!s
                .engine()
                .cache()
                .contains(layerkv_model::needle::SAMPLE_SEQ));
        }
    }
    // The reply length the session had is back.
    assert_eq!(
        identity.stop_criteria().max_new_tokens,
        session(&dir, "identity").stop_criteria().max_new_tokens
    );
}

/// Calibration's retrieval probes ([`EngineCalibrator::with_retrieval`]) ask each sample
/// through a session of the candidate map, query-aware. Probe 0 expects a word the identity
/// session really answers and probe 1 a word it never says, so the identity answers must be
/// exactly `[true, false]` (shown failing with the probes asked query-agnostic: probe 0's
/// answer changed and it read `[false, false]`); a calibration with the probes reports them
/// and keeps probe 0 in every map it accepts.
#[test]
fn calibration_probes_ask_the_samples_under_the_candidate_map() {
    use std::sync::Arc;

    use layerkv::calibrate::{
        calibrate, Acceptance, CalibrationConfig, CalibrationModel, PairOrder, ShareTarget,
    };
    use layerkv::LayerMap;
    use layerkv_model::calibrate::{text_samples, EngineCalibrator, RetrievalProbes};
    use layerkv_model::engine::EngineConfig;
    use layerkv_model::Model;

    let dir = TinyModel::llama(7).write(&scratch("needle-probes"));
    long_context(&dir);
    let options = SessionOptions {
        max_context: 2048,
        ..SessionOptions::default()
    };
    let mut identity = session(&dir, "identity");
    let g = Generator::new(&haystack(), identity.tokenizer()).unwrap();
    let mut samples = vec![
        g.sample(Task::Passkey, 160, 0.2, 0, 3).unwrap(),
        g.sample(Task::Passkey, 160, 0.8, 0, 4).unwrap(),
    ];
    // What identity answers to probe 0, query-aware: its first word becomes the expected value.
    let said = run_sample(&mut identity, &samples[0], QueryMode::QueryAware).unwrap();
    let answer = &said.turns[0].answer;
    let word = answer
        .split(|c: char| !c.is_alphanumeric())
        .find(|w| !w.is_empty())
        .unwrap_or_else(|| panic!("no word in identity's answer {answer:?}"))
        .to_string();
    samples[0].question.answers = vec![word.clone()];
    samples[0].turns[0].answers = vec![word];
    samples[1].question.answers = vec!["zzqqxxneverzz".into()];
    samples[1].turns[0].answers = vec!["zzqqxxneverzz".into()];

    let model = Arc::new(Model::load(&dir, DType::F32, &Device::Cpu).unwrap());
    let probes = RetrievalProbes {
        model_dir: dir.clone(),
        samples,
        options,
    };
    let mut cal = EngineCalibrator::new(model, EngineConfig::default()).with_retrieval(probes);
    let got = cal.retrieval(&LayerMap::identity(4).unwrap()).unwrap();
    assert_eq!(got, Some(vec![true, false]));

    let tokenizer = identity.tokenizer().clone();
    let text: String = (0..8)
        .map(|i| format!("Paragraph {i} says {} things.\n\n", "many ".repeat(30)))
        .collect();
    let cal_samples = text_samples(&tokenizer, &text, 4, 32).unwrap();
    let config = CalibrationConfig {
        target: ShareTarget::Layers(2),
        order: PairOrder::Similar,
        acceptance: Acceptance::Cosine { threshold: -2.0 },
        max_candidates: Some(6),
    };
    let result = calibrate(&mut cal, &cal_samples, &config, &mut |_| {}).unwrap();
    assert_eq!(result.num_probes, 2);
    assert_eq!(result.reference_retrieval, Some(1));
    assert!(result.final_retrieval.is_some_and(|r| r >= 1));
    for c in &result.candidates {
        // The lenient rule accepts every candidate, so every one was probed.
        let r = c.retrieval.expect("probed");
        assert_eq!(c.lost_retrieval, r == 0, "{c:?}");
        assert_eq!(c.accepted, r >= 1, "{c:?}");
    }
}
