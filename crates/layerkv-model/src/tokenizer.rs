//! Tokenizers: loading a model directory's `tokenizer.json` (checked against the config's
//! vocabulary) and building one from GGUF metadata (byte-level BPE token and merge lists).
//!
//! The GGUF pre-tokenizer `smollm` splits every digit into its own piece before the GPT-2
//! byte-level regex, as SmolLM2's original `tokenizer.json` does (Digits(individual) +
//! ByteLevel(add_prefix_space=false)); plain ByteLevel would give other ids for numbers.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// Loads `dir/tokenizer.json` and checks it against `dir/config.json`'s vocabulary.
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::MissingFile(path));
    }
    let inner = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    let t = Tokenizer { inner };
    let cfg = ModelConfig::load(dir)?;
    if t.vocab_size() > cfg.vocab_size {
        return Err(ModelError::VocabMismatch {
            tokenizer: t.vocab_size(),
            config: cfg.vocab_size,
        });
    }
    Ok(t)
}

impl Tokenizer {
    /// Parses tokenizer.json text.
    pub fn from_json(text: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_str(text)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if known.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Token metadata of a GGUF file, as its `tokenizer.ggml.*` keys hold it.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges` ("a b" pairs).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` (3 = control).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre` (e.g. "smollm", "gpt2", "llama-bpe").
    pub pre: String,
}

/// Builds `tokenizer.json` text for a byte-level BPE vocabulary from GGUF metadata.
pub fn tokenizer_json_from_gguf(v: &GgufVocab) -> Result<String> {
    if v.tokens.is_empty() {
        return Err(ModelError::Tokenizer(
            "the GGUF has no tokenizer.ggml.tokens".into(),
        ));
    }
    let mut vocab = Map::new();
    for (i, t) in v.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<Value> = v
        .token_types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == 3)
        .map(|(i, _)| {
            json!({"id": i, "content": v.tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match v.pre.as_str() {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "" => byte_level.clone(),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "GGUF pre-tokenizer {other:?} is not supported (smollm, gpt2)"
            )))
        }
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": v.merges}
    });
    let text = serde_json::to_string(&tok).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    // Parse once so a bad vocabulary fails here, not at first use.
    Tokenizer::from_json(&text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny real byte-level vocabulary: every byte-level symbol of "ab 12" plus merges.
    fn tiny() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        for c in ['a', 'b', 'Ġ', '1', '2', '3'] {
            tokens.push(c.to_string());
        }
        tokens.extend(["ab".into(), "Ġa".into(), "12".into()]);
        GgufVocab {
            token_types: (0..tokens.len())
                .map(|i| if i == 0 { 3 } else { 1 })
                .collect(),
            tokens,
            merges: vec!["a b".into(), "Ġ a".into(), "1 2".into()],
            pre: "smollm".into(),
        }
    }

    #[test]
    fn smollm_pretokenizer_splits_digits() {
        let t = Tokenizer::from_json(&tokenizer_json_from_gguf(&tiny()).unwrap()).unwrap();
        // "a b" outranks "Ġ a", so " ab" is Ġ + ab; "12" would merge, but digits are split first.
        assert_eq!(t.encode("ab ab12").unwrap(), vec![7, 3, 7, 4, 5]);
        assert_eq!(t.decode(&t.encode("ab ab12").unwrap()).unwrap(), "ab ab12");
        let mut plain = tiny();
        plain.pre = "gpt2".into();
        let p = Tokenizer::from_json(&tokenizer_json_from_gguf(&plain).unwrap()).unwrap();
        assert_eq!(p.encode("ab12").unwrap(), vec![7, 9]);
        assert_eq!(t.token_id("<|endoftext|>"), Some(0));
    }

    #[test]
    fn unknown_pretokenizer_is_an_error() {
        let mut v = tiny();
        v.pre = "mystery".into();
        assert!(tokenizer_json_from_gguf(&v).is_err());
        assert!(tokenizer_json_from_gguf(&GgufVocab::default()).is_err());
    }
}
