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
