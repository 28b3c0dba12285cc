//! The OpenAI request bodies this server reads, checked field by field into what the engine
//! runs ([`Job`]), and the response bodies it writes. Unknown fields are ignored (clients send
//! `user`, `logit_bias`, ...); fields whose meaning the server cannot honour (`n > 1`,
//! `logprobs`, `echo`, `best_of > 1`, tools) are refused with a 400 naming the field.

use layerkv_model::chat::Message;
use layerkv_model::generate::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: a string, a list of one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// `content` of a chat message: a string or a list of parts (only `text` parts).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    best_of: Option<i64>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    tools: Option<Value>,
    /// vLLM's extension: generate `max_tokens` tokens whatever the stop tokens (benchmarks).
    #[serde(default)]
    ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct CompletionBody {
    prompt: Option<PromptField>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Deserialize)]
struct ChatBody {
    messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    common: Common,
}

/// What the client asks the engine for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A plain prompt (tokenized with the model's BOS rule).
    Text(String),
    /// Prompt token ids as they are.
    Tokens(Vec<u32>),
    /// Messages rendered through the model's chat template.
    Chat(Vec<Message>),
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The `model` field, if given.
    pub model: Option<String>,
    /// The prompt.
    pub input: Input,
    /// `max_tokens` (`None`: the server's default).
    pub max_tokens: Option<usize>,
    /// Sampling settings, seeded.
    pub sampling: Sampling,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream the reply as server-sent events.
    pub stream: bool,
    /// In a stream, a last chunk with `usage`.
    pub include_usage: bool,
    /// Generate `max_tokens` tokens even past stop tokens.
    pub ignore_eos: bool,
}

/// Parses a `/v1/completions` body. `seed` is the seed used when the body gives none.
pub fn parse_completion(body: &[u8], seed: u64) -> Result<Job, ApiError> {
    let b: CompletionBody = parse_json(body)?;
    let input = match b.prompt {
        None => return Err(ApiError::bad_param("prompt", "`prompt` is required")),
        Some(PromptField::Text(t)) => Input::Text(t),
        Some(PromptField::Texts(mut t)) if t.len() == 1 => Input::Text(t.remove(0)),
        Some(PromptField::Texts(_)) => {
            return Err(ApiError::bad_param(
                "prompt",
                "a list of prompts is not supported: send one prompt per request",
            ))
        }
        Some(PromptField::Tokens(t)) => Input::Tokens(t),
    };
    job(b.common, input, seed)
}

/// Parses a `/v1/chat/completions` body. `seed` is the seed used when the body gives none.
pub fn parse_chat(body: &[u8], seed: u64) -> Result<Job, ApiError> {
    let b: ChatBody = parse_json(body)?;
    let Some(messages) = b.messages else {
        return Err(ApiError::bad_param("messages", "`messages` is required"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_param("messages", "`messages` is empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad_param(
                &format!("messages[{i}].role"),
                format!(
                    "role {:?} is not supported (system, developer, user, assistant)",
                    m.role
                ),
            ));
        }
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_param(
                                &format!("messages[{i}].content"),
                                format!("content part {kind:?} is not supported (text only)"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        out.push(Message::new(role, text));
    }
    job(b.common, Input::Chat(out), seed)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid request: {e}")))
}

fn job(c: Common, input: Input, seed: u64) -> Result<Job, ApiError> {
    let unsupported = |param: &str, what: &str| {
        Err(ApiError::bad_param(
            param,
            format!("{what} is not supported by this server"),
        ))
    };
    if c.n.is_some_and(|n| n != 1) {
        return unsupported("n", "`n` other than 1");
    }
    if c.best_of.is_some_and(|n| n != 1) {
        return unsupported("best_of", "`best_of` other than 1");
    }
    let wants_logprobs = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    };
    if wants_logprobs(&c.logprobs) || wants_logprobs(&c.top_logprobs) {
        return unsupported("logprobs", "`logprobs`");
    }
    if c.echo == Some(true) {
        return unsupported("echo", "`echo`");
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return unsupported("tools", "tool calling");
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(n) if n < 1 => {
            return Err(ApiError::bad_param(
                "max_tokens",
                format!("`max_tokens` must be at least 1, got {n}"),
            ))
        }
        Some(n) => Some(n as usize),
    };
    let range = |param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32| {
        let v = v.unwrap_or(default);
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::bad_param(
                param,
                format!("`{param}` must be in [{lo}, {hi}], got {v}"),
            ))
        }
    };
    let temperature = range("temperature", c.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", c.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::bad_param("top_p", "`top_p` must be above 0"));
    }
    let min_p = range("min_p", c.min_p, 0.0, 1.0, 0.0)?;
    let presence_penalty = range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = range("repetition_penalty", c.repetition_penalty, 0.01, 10.0, 1.0)?;
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad_param(
                "top_k",
                format!("`top_k` must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_param(
            "stop",
            "stop strings must not be empty",
        ));
    }
    let stream = c.stream.unwrap_or(false);
    Ok(Job {
        model: c.model,
        input,
        max_tokens,
        sampling: Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed: c.seed.map_or(seed, |s| s as u64),
            ..Sampling::greedy()
        },
        stop,
        stream,
        include_usage: stream && c.stream_options.is_some_and(|o| o.include_usage),
        ignore_eos: c.ignore_eos.unwrap_or(false),
    })
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked_and_defaults_are_openai_s() {
        let j = parse_completion(br#"{"prompt": "hi"}"#, 9).unwrap();
        assert_eq!(j.input, Input::Text("hi".into()));
        assert_eq!(
            (j.sampling.temperature, j.sampling.top_p, j.sampling.seed),
            (1.0, 1.0, 9)
        );
        assert_eq!(
            (j.max_tokens, j.stream, j.include_usage),
            (None, false, false)
        );
        let j = parse_chat(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "stop": "x", "top_k": -1, "seed": 3, "stream": true, "stream_options": {"include_usage": true}}"#,
            0,
        )
        .unwrap();
        assert_eq!(j.input, Input::Chat(vec![Message::new("user", "ab")]));
        assert_eq!(
            (j.stop, j.sampling.top_k, j.sampling.seed),
            (vec!["x".to_string()], 0, 3)
        );
        assert!(j.stream && j.include_usage);
        for (body, param) in [
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "temperature": 3}"#, "temperature"),
            (r#"{"prompt": "a", "n": 2}"#, "n"),
            (r#"{"prompt": "a", "logprobs": 2}"#, "logprobs"),
            (r#"{"prompt": "a", "top_k": -3}"#, "top_k"),
            (r#"{"prompt": "a", "stop": [""]}"#, "stop"),
            (r#"{"prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"max_tokens": 3}"#, "prompt"),
        ] {
            let e = parse_completion(body.as_bytes(), 0).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let e = parse_completion(br#"{"prompt": "a", "temperature": "hot"}"#, 0).unwrap_err();
        assert!(e.message.contains("not a valid request"), "{}", e.message);
        let e = parse_chat(br#"{"messages": [{"role": "tool", "content": "x"}]}"#, 0).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }
}
