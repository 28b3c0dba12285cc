//! Tokenizers: loading a model directory's `tokenizer.json` (checked against the config's
//! vocabulary, honouring `tokenizer_config.json`'s `add_bos_token`) and building one, plus its
//! `tokenizer_config.json`, from GGUF metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`,
//! token and merge lists) or SentencePiece BPE (`llama`, tokens and scores).
//!
//! GGUF pre-tokenizers of byte-level BPE (`tokenizer.ggml.pre`) and what they become:
//! - `smollm`: every digit (`\p{N}`) its own piece, then the GPT-2 byte-level regex, as
//!   SmolLM2's original `tokenizer.json` does (Digits(individual) + ByteLevel); plain ByteLevel
//!   would give other ids for numbers;
//! - `llama-bpe` (aliases `llama3`, `llama-v3`): the llama-3 split regex (numbers in groups of
//!   up to three digits), then byte-level without its own regex;
//! - `qwen2` (alias `deepseek-r1-qwen`): NFC, the qwen2 split regex (single digits), then
//!   byte-level without its own regex;
//! - `default`, `gpt2`, `gpt-2`: the GPT-2 byte-level regex.
//!
//! An absent `tokenizer.ggml.pre` (files written before llama.cpp recorded it) is treated as
//! `default`, as llama.cpp does, with a warning; any other value is an error, never a silent
//! fallback.
//!
//! SentencePiece BPE vocabularies (llama-2, mistral v0.x, TinyLlama) are laid out as Hugging
//! Face's `LlamaTokenizerFast` converts them: merges derived from the piece scores
//! ([`spm_merges`]), `▁` for spaces plus one prepended (unless `add_space_prefix` is false), byte
//! fallback to `<0xXX>` pieces. Known difference from llama.cpp: the space prefix is added to
//! every text fragment between special tokens, not only to the first. Other tokenizer models
//! (`bert`, `t5`, `rwkv`, ...) are errors that say so.
//!
//! Building is one pass over the token and merge lists plus one parse of the result.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::{io, ModelError, Result};

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_prefix: Option<u32>,
}

/// Loads `dir/tokenizer.json` and checks it against `dir/config.json`'s vocabulary.
///
/// When `dir/tokenizer_config.json` sets `add_bos_token: true`, [`Tokenizer::encode`] prepends
/// the id of its `bos_token` (an error if that token is missing from the vocabulary).
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::MissingFile(path));
    }
    let inner = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    let mut t = Tokenizer {
        inner,
        bos_prefix: None,
    };
    let cfg = ModelConfig::load(dir)?;
    if t.vocab_size() > cfg.vocab_size {
        return Err(ModelError::VocabMismatch {
            tokenizer: t.vocab_size(),
            config: cfg.vocab_size,
        });
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.exists() {
        let text = std::fs::read_to_string(&tc_path).map_err(io(&tc_path))?;
        let tc: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: tc_path.clone(),
            what: e.to_string(),
        })?;
        if tc.get("add_bos_token").and_then(Value::as_bool) == Some(true) {
            let bos = token_content(tc.get("bos_token")).ok_or_else(|| ModelError::Json {
                path: tc_path.clone(),
                what: "add_bos_token is true but bos_token is missing".into(),
            })?;
            let id = t.token_id(&bos).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "{}: bos_token {bos:?} is not in {}",
                    tc_path.display(),
                    path.display()
                ))
            })?;
            t.bos_prefix = Some(id);
        }
    }
    Ok(t)
}

/// A special token of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Parses tokenizer.json text (no BOS prefix; see [`Tokenizer::with_bos_prefix`]).
    pub fn from_json(text: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_str(text)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            bos_prefix: None,
        })
    }

    /// The same tokenizer with `bos` prepended by [`Tokenizer::encode`] (`None`: nothing).
    pub fn with_bos_prefix(mut self, bos: Option<u32>) -> Self {
        self.bos_prefix = bos;
        self
    }

    /// The id [`Tokenizer::encode`] prepends (`add_bos_token`), if any.
    pub fn bos_prefix(&self) -> Option<u32> {
        self.bos_prefix
    }

    /// Token ids of `text`: the BOS prefix (if the tokenizer config asks for one), then the
    /// text's tokens (no other special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos_prefix);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
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

/// Token metadata of a GGUF file, as its `tokenizer.ggml.*` keys (and `tokenizer.chat_template`)
/// hold it.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` ("gpt2" byte-level BPE or "llama" SentencePiece; empty = absent).
    pub model: String,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges` ("a b" pairs; byte-level BPE).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; absent = true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre` (e.g. "smollm", "llama-bpe", "qwen2", "default"; empty = absent).
    pub pre: String,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
}

/// llama.cpp token type of control tokens.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp token type of user-defined tokens.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The GPT-2 split regex (what ByteLevel's `use_regex` applies).
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The llama-3 split regex (`tokenizer.ggml.pre = llama-bpe`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The qwen2 split regex (`tokenizer.ggml.pre = qwen2`).
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer values [`tokenizer_json_from_gguf`] accepts (aliases included).
pub const SUPPORTED_PRE: &str =
    "smollm, llama-bpe (llama3, llama-v3), qwen2 (deepseek-r1-qwen), default (gpt2, gpt-2)";

/// The canonical name of a GGUF pre-tokenizer (`""` = absent = `default`), or an error naming it
/// and the supported ones.
pub fn canonical_pre(pre: &str) -> Result<&'static str> {
    Ok(match pre {
        "smollm" => "smollm",
        "llama-bpe" | "llama3" | "llama-v3" => "llama-bpe",
        "qwen2" | "deepseek-r1-qwen" => "qwen2",
        "default" | "gpt2" | "gpt-2" | "" => "default",
        other => {
            return Err(ModelError::Tokenizer(format!(
                "GGUF pre-tokenizer tokenizer.ggml.pre = {other:?} is not supported \
                 (supported: {SUPPORTED_PRE})"
            )))
        }
    })
}

/// Checks `tokenizer.ggml.model` is one that can be built: byte-level BPE (`gpt2`) or
/// SentencePiece BPE (`llama`), with an error that says what is not supported otherwise.
pub fn check_gguf_tokenizer_model(model: &str) -> Result<()> {
    match model {
        "gpt2" | "llama" => Ok(()),
        "" => Err(ModelError::Tokenizer(
            "the GGUF has no tokenizer.ggml.model: it carries no tokenizer to convert".into(),
        )),
        other => Err(ModelError::Tokenizer(format!(
            "tokenizer.ggml.model = {other:?} is not supported: only byte-level BPE (\"gpt2\") \
             and SentencePiece BPE (\"llama\") GGUF tokenizers can be converted"
        ))),
    }
}

/// Merges of a SentencePiece BPE vocabulary, as Hugging Face's `SentencePieceExtractor` derives
/// them: every split of a piece into two pieces of the vocabulary is a merge ranked by the
/// merged piece's score (higher first; ties by the ids of the two halves). O(total piece
/// length) lookups.
pub fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<String> {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize, String)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, format!("{l} {r}")))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local.into_iter().map(|(l, r, m)| (score, l, r, m)));
    }
    // Stable: equal scores keep the order above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, _, _, m)| m).collect()
}

/// `tokenizer.json` of a SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`), laid out
/// as Hugging Face's `LlamaTokenizerFast`: spaces become `▁` (and one is prepended unless
/// `add_space_prefix` is false), BPE over the merges of [`spm_merges`] with byte fallback to
/// `<0xXX>` tokens, unknown pieces fused into the unknown token.
fn spm_tokenizer_json(v: &GgufVocab, added: Vec<Value>) -> Result<String> {
    if v.scores.len() != v.tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "SentencePiece GGUF: {} tokenizer.ggml.scores for {} tokens",
            v.scores.len(),
            v.tokens.len()
        )));
    }
    let mut vocab = Map::new();
    for (i, t) in v.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let prefix = v.add_space_prefix.unwrap_or(true);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = v
        .unk_id
        .and_then(|i| v.tokens.get(i as usize))
        .map(|t| json!(t))
        .unwrap_or(Value::Null);
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab,
                  "merges": spm_merges(&v.tokens, &v.scores)}
    });
    let text = serde_json::to_string(&tok).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Tokenizer::from_json(&text)?;
    Ok(text)
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// Builds `tokenizer.json` text from GGUF metadata: byte-level BPE (`gpt2`, with the
/// pre-tokenizer of `pre`) or SentencePiece BPE (`llama`, `pre` ignored).
///
/// Control (3) and user-defined (4) tokens become special added tokens.
pub fn tokenizer_json_from_gguf(v: &GgufVocab) -> Result<String> {
    if !v.model.is_empty() {
        check_gguf_tokenizer_model(&v.model)?;
    }
    if v.tokens.is_empty() {
        return Err(ModelError::Tokenizer(
            "the GGUF has no tokenizer.ggml.tokens".into(),
        ));
    }
    let added: Vec<Value> = v
        .token_types
        .iter()
        .enumerate()
        .filter(|&(i, &ty)| {
            i < v.tokens.len() && (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        })
        .map(|(i, _)| {
            json!({"id": i, "content": v.tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    if v.model == "llama" {
        return spm_tokenizer_json(v, added);
    }
    let mut vocab = Map::new();
    for (i, t) in v.tokens.iter().enumerate() {
        // A duplicated string maps to its last id, as in llama.cpp's `token_to_id`.
        vocab.insert(t.clone(), json!(i));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let byte_level_no_regex = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let (normalizer, pre_tokenizer) = match canonical_pre(&v.pre)? {
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
        ),
        "llama-bpe" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level_no_regex]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level_no_regex]}),
        ),
        _ => {
            if v.pre.is_empty() {
                tracing::warn!(
                    "the GGUF has no tokenizer.ggml.pre: using the GPT-2 pre-tokenizer (llama.cpp's default)"
                );
            }
            (Value::Null, byte_level)
        }
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
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

/// Builds `tokenizer_config.json` from GGUF metadata: `add_bos_token`, `add_eos_token`, the
/// `bos/eos/unk/pad_token` strings and `chat_template` (keys whose metadata is absent are left
/// out). An id past the token list is an error.
pub fn tokenizer_config_from_gguf(v: &GgufVocab) -> Result<Value> {
    let mut c = Map::new();
    c.insert("add_bos_token".into(), json!(v.add_bos.unwrap_or(false)));
    c.insert("add_eos_token".into(), json!(v.add_eos.unwrap_or(false)));
    for (key, id) in [
        ("bos_token", v.bos_id),
        ("eos_token", v.eos_id),
        ("unk_token", v.unk_id),
        ("pad_token", v.pad_id),
    ] {
        let Some(id) = id else { continue };
        let token = v.tokens.get(id as usize).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "{key} id {id} is past the {} GGUF tokens",
                v.tokens.len()
            ))
        })?;
        c.insert(key.into(), json!(token));
    }
    if v.add_bos == Some(true) && v.bos_id.is_none() {
        return Err(ModelError::Tokenizer(
            "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is absent".into(),
        ));
    }
    if let Some(t) = &v.chat_template {
        c.insert("chat_template".into(), json!(t));
    }
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(Value::Object(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny real byte-level vocabulary: every byte-level symbol of "ab 123" plus merges.
    fn tiny() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        for c in ['a', 'b', 'Ġ', '1', '2', '3'] {
            tokens.push(c.to_string());
        }
        tokens.extend([
            "ab".into(),
            "Ġa".into(),
            "12".into(),
            "123".into(),
            "Ġ1".into(),
        ]);
        GgufVocab {
            model: "gpt2".into(),
            token_types: (0..tokens.len())
                .map(|i| if i == 0 { 3 } else { 1 })
                .collect(),
            tokens,
            merges: vec![
                "a b".into(),
                "Ġ a".into(),
                "1 2".into(),
                "12 3".into(),
                "Ġ 1".into(),
            ],
            pre: "smollm".into(),
            ..GgufVocab::default()
        }
    }

    fn build(pre: &str) -> Tokenizer {
        let mut v = tiny();
        v.pre = pre.into();
        Tokenizer::from_json(&tokenizer_json_from_gguf(&v).unwrap()).unwrap()
    }

    #[test]
    fn smollm_pretokenizer_splits_digits() {
        let t = build("smollm");
        // "a b" outranks "Ġ a", so " ab" is Ġ + ab; "12" would merge, but digits are split first.
        assert_eq!(t.encode("ab ab12").unwrap(), vec![7, 3, 7, 4, 5]);
        assert_eq!(t.decode(&t.encode("ab ab12").unwrap()).unwrap(), "ab ab12");
        let p = build("gpt2");
        assert_eq!(p.encode("ab12").unwrap(), vec![7, 9]);
        assert_eq!(t.token_id("<|endoftext|>"), Some(0));
    }

    #[test]
    fn pretokenizers_group_digits_their_own_way() {
        // GPT-2: a space joins the number after it and digit runs stay whole.
        assert_eq!(build("default").encode(" 1231").unwrap(), vec![3, 10, 4]);
        assert_eq!(build("default").encode(" 1").unwrap(), vec![11]);
        assert_eq!(build("default").encode("1212").unwrap(), vec![9, 9]);
        // llama-3: the space is its own piece, digits in groups of up to three: 121 | 2.
        assert_eq!(build("llama-bpe").encode(" 1").unwrap(), vec![3, 4]);
        assert_eq!(build("llama-bpe").encode("1212").unwrap(), vec![9, 4, 5]);
        // qwen2 and smollm: every digit alone.
        assert_eq!(build("qwen2").encode(" 1").unwrap(), vec![3, 4]);
        assert_eq!(build("qwen2").encode("1212").unwrap(), vec![4, 5, 4, 5]);
        assert_eq!(build("smollm").encode(" 1").unwrap(), vec![3, 4]);
        assert_eq!(build("smollm").encode("1231").unwrap(), vec![4, 5, 6, 4]);
        // Words: one leading space joins them in every variant.
        assert_eq!(build("llama-bpe").encode(" ab").unwrap(), vec![3, 7]);
        assert_eq!(build("qwen2").encode(" ab").unwrap(), vec![3, 7]);
    }

    #[test]
    fn control_and_user_defined_tokens_are_special() {
        let mut v = tiny();
        v.token_types[7] = TOKEN_TYPE_USER_DEFINED;
        let t = Tokenizer::from_json(&tokenizer_json_from_gguf(&v).unwrap()).unwrap();
        assert_eq!(t.encode("<|endoftext|>ab").unwrap(), vec![0, 7]);
        // Special tokens are skipped when decoding.
        assert_eq!(t.decode(&[0, 7, 1]).unwrap(), "a");
        assert_eq!(t.with_bos_prefix(Some(0)).encode("a").unwrap(), vec![0, 1]);
    }

    #[test]
    fn unknown_pretokenizer_and_models_are_errors() {
        let mut v = tiny();
        v.pre = "mystery".into();
        let e = tokenizer_json_from_gguf(&v).unwrap_err().to_string();
        assert!(e.contains("\"mystery\"") && e.contains("llama-bpe"), "{e}");
        assert!(tokenizer_json_from_gguf(&GgufVocab::default()).is_err());
        let mut t5 = tiny();
        t5.model = "t5".into();
        let e = tokenizer_json_from_gguf(&t5).unwrap_err().to_string();
        assert!(
            e.contains("\"t5\"") && e.contains("SentencePiece BPE"),
            "{e}"
        );
    }

    /// A tiny SentencePiece BPE vocabulary: pieces and scores (higher merges first).
    fn tiny_spm() -> GgufVocab {
        let pieces: &[(&str, f32, i32)] = &[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0xC3>", 0.0, 6),
            ("<0xA9>", 0.0, 6),
            ("\u{2581}", -1.0, 1),
            ("ll", -2.0, 1),
            ("he", -3.0, 1),
            ("\u{2581}he", -4.0, 1),
            ("llo", -5.0, 1),
            ("\u{2581}hello", -6.0, 1),
            ("\u{2581}w", -7.0, 1),
            ("or", -8.0, 1),
            ("\u{2581}wor", -9.0, 1),
            ("h", -10.0, 1),
            ("e", -10.0, 1),
            ("l", -10.0, 1),
            ("o", -10.0, 1),
            ("w", -10.0, 1),
            ("r", -10.0, 1),
            ("d", -10.0, 1),
        ];
        GgufVocab {
            model: "llama".into(),
            tokens: pieces.iter().map(|p| p.0.to_string()).collect(),
            scores: pieces.iter().map(|p| p.1).collect(),
            token_types: pieces.iter().map(|p| p.2).collect(),
            unk_id: Some(0),
            pre: "ignored-for-sentencepiece".into(),
            ..GgufVocab::default()
        }
    }

    #[test]
    fn sentencepiece_merges_follow_the_scores() {
        let v = tiny_spm();
        let m = spm_merges(&v.tokens, &v.scores);
        assert_eq!(
            m[..4],
            ["l l", "h e", "\u{2581} he", "ll o"].map(String::from)
        );
        assert!(m.contains(&"\u{2581}he llo".to_string()));
        assert!(m.contains(&"\u{2581}w or".to_string()));
        let t = Tokenizer::from_json(&tokenizer_json_from_gguf(&v).unwrap()).unwrap();
        // ▁hello▁world: ▁hello, then ▁w+or -> ▁wor, l, d (no "ld" piece).
        let ids = t.encode("hello world").unwrap();
        assert_eq!(ids, vec![10, 13, 16, 20]);
        assert_eq!(t.decode(&ids).unwrap(), "hello world");
        // é is not a piece: its UTF-8 bytes through byte fallback; x is unknown.
        assert_eq!(t.encode("hé").unwrap(), vec![5, 14, 3, 4]);
        assert_eq!(t.decode(&[5, 14, 3, 4]).unwrap(), "hé");
        assert_eq!(t.encode("x").unwrap(), vec![5, 0]);
        // Control pieces are special; without the space prefix no ▁ is prepended.
        assert_eq!(t.encode("<s>").unwrap(), vec![1]);
        let mut bare = tiny_spm();
        bare.add_space_prefix = Some(false);
        let b = Tokenizer::from_json(&tokenizer_json_from_gguf(&bare).unwrap()).unwrap();
        assert_eq!(b.encode("he").unwrap(), vec![7]);
        let mut short = tiny_spm();
        short.scores.pop();
        assert!(tokenizer_json_from_gguf(&short).is_err());
    }

    #[test]
    fn tokenizer_config_names_special_tokens() {
        let mut v = tiny();
        v.bos_id = Some(0);
        v.eos_id = Some(0);
        v.add_bos = Some(true);
        v.chat_template = Some("{{ messages }}".into());
        let c = tokenizer_config_from_gguf(&v).unwrap();
        assert_eq!(c["bos_token"], "<|endoftext|>");
        assert_eq!(c["add_bos_token"], true);
        assert_eq!(c["chat_template"], "{{ messages }}");
        v.eos_id = Some(99);
        assert!(tokenizer_config_from_gguf(&v).is_err());
    }
}
