//! Broken model files through the loading API every client uses ([`Session::load`], which
//! `generate`, `chat` and the server go through; [`Model::load`] under it):
//! - a `model.safetensors` cut short anywhere (inside the 8-byte length, inside the JSON header,
//!   right after the header, in the middle of the data, one byte before the end) is a
//!   [`ModelError::Corrupt`] naming the file, never a panic;
//! - a `tokenizer.json` with more tokens than the embedding has rows is refused with both
//!   sizes in the message, whether `config.json` agrees with the embedding
//!   (`tokenizer::load`'s check) or is itself off (the session's own check against the loaded
//!   model).
//!
//! Each test first loads the unbroken directory, so a failure means the breakage was noticed,
//! not that the tiny model never loaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use layerkv::Policy;
use layerkv_model::{Model, ModelError, Session, SessionOptions};
use layerkv_testkit::{scratch, TinyModel};

/// Token rows of the tiny model's embedding (256 bytes + 3 specials).
const ROWS: usize = 259;

fn options() -> SessionOptions {
    SessionOptions {
        max_context: 64,
        ..SessionOptions::default()
    }
}

fn load(dir: &Path) -> Result<Session, ModelError> {
    Session::load(
        dir,
        DType::F32,
        &Device::Cpu,
        Policy::identity(4).unwrap(),
        options(),
    )
}

/// `tokenizer.json` of `dir` with `extra` added tokens after the model's 259.
fn add_tokens(dir: &Path, extra: usize) {
    let path = dir.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = t["added_tokens"].as_array_mut().unwrap();
    for i in 0..extra {
        added.push(
            serde_json::json!({"id": ROWS + i, "content": format!("<extra_{i}>"),
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
            "special": true}),
        );
    }
    std::fs::write(&path, t.to_string()).unwrap();
}

/// A fresh unbroken tiny model directory (the model side of the session check).
fn dir_of_model(root: &Path) -> PathBuf {
    TinyModel::llama(12).write(&root.join("model-only"))
}

/// The error of a load that must fail (without printing the whole session when it did not).
fn refused(result: Result<Session, ModelError>, what: &str) -> ModelError {
    match result {
        Ok(_) => panic!("{what}"),
        Err(e) => e,
    }
}

fn set_vocab_size(dir: &Path, n: usize) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["vocab_size"] = n.into();
    std::fs::write(&path, c.to_string()).unwrap();
}

/// Shown to fail: with the file written back whole instead of cut, the first load succeeded
/// and the test panicked with "loaded a safetensors file cut to 364356 of 728712 bytes".
#[test]
fn a_truncated_safetensors_file_is_an_error_naming_it() {
    let root = scratch("model-files-truncated");
    let dir = TinyModel::llama(11).write(&root.join("tiny"));
    assert!(load(&dir).is_ok(), "the unbroken model must load");
    let file = dir.join("model.safetensors");
    let whole = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
    let cuts = [
        whole.len() / 2,
        whole.len() - 1,
        8 + header_len, // the header, no data
        8 + header_len / 2,
        8,
        4,
        0,
    ];
    for cut in cuts {
        std::fs::write(&file, &whole[..cut]).unwrap();
        let err = refused(
            load(&dir),
            &format!(
                "loaded a safetensors file cut to {cut} of {} bytes",
                whole.len()
            ),
        );
        let message = err.to_string();
        assert!(
            matches!(&err, ModelError::Corrupt { path, .. } if path == &file),
            "cut at {cut}: {err:?}"
        );
        assert!(
            message.contains("model.safetensors"),
            "cut at {cut}: {message}"
        );
        assert!(
            message.contains("truncated or corrupt"),
            "cut at {cut}: {message}"
        );
        // Model::load, the loader under the session, says the same.
        let err = Model::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Shown to fail: with 0 extra tokens (tokenizer and embedding agree) the first load succeeded
/// and the test panicked with "a 300-token tokenizer on 259 embedding rows loaded"; with no
/// tokens added to the second directory, `Session::new` succeeded and the test panicked with
/// "a 300-token tokenizer on a 259-row model made a session".
#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused_with_both_sizes() {
    let root = scratch("model-files-vocab");
    let extra = 41;
    let tokens = ROWS + extra;

    // config.json agrees with the embedding (259 rows); tokenizer.json has 300 tokens.
    let dir = TinyModel::llama(12).write(&root.join("tiny"));
    assert!(load(&dir).is_ok(), "the unbroken model must load");
    add_tokens(&dir, extra);
    let err = refused(
        load(&dir),
        "a 300-token tokenizer on 259 embedding rows loaded",
    );
    assert!(
        matches!(err, ModelError::VocabMismatch { tokenizer, config } if tokenizer == tokens && config == ROWS),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("tokenizer has {tokens} tokens"))
            && message.contains(&format!("vocab_size is {ROWS}")),
        "{message}"
    );

    // The session's own check: the model (259 rows) comes from one directory, the tokenizer
    // from another whose config.json claims a vocabulary large enough for its 300 tokens (so
    // `tokenizer::load` passes; `config: 259`, not 400, says the model's rows were compared).
    let model = Arc::new(Model::load(&dir_of_model(&root), DType::F32, &Device::Cpu).unwrap());
    let other = TinyModel::llama(12).write(&root.join("other"));
    add_tokens(&other, extra);
    set_vocab_size(&other, 400);
    let err = refused(
        Session::new(&other, model, Policy::identity(4).unwrap(), options()),
        "a 300-token tokenizer on a 259-row model made a session",
    );
    assert!(
        matches!(err, ModelError::VocabMismatch { tokenizer, config } if tokenizer == tokens && config == ROWS),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&tokens.to_string()) && message.contains(&ROWS.to_string()),
        "{message}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
