//! Chat templates: a model's own Jinja template (`chat_template` of `tokenizer_config.json`, a
//! converted GGUF's `tokenizer.chat_template`, or `chat_template.jinja`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, Python string and dict methods (`strip`, `startswith`,
//! `items`, ...), `raise_exception(msg)` and `strftime_now(fmt)`, with `messages`,
//! `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...) in the
//! context.
//!
//! [`ChatTemplate::end_of_turn`] finds the token a template closes an assistant turn with
//! (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) by rendering a reply and reading what follows it,
//! so generation can stop there without a per-model table.
//!
//! Rendering is one pass over the template per call: O(template + conversation).

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;

use crate::error::{io, ModelError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special tokens a template may refer to (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token`); absent ones render as empty strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: String,
    /// `eos_token`.
    pub eos: String,
    /// `unk_token`.
    pub unk: String,
    /// `pad_token`.
    pub pad: String,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
    source: PathBuf,
}

const NAME: &str = "chat_template";

fn template_error(source: &Path, e: JinjaError) -> ModelError {
    ModelError::Template {
        path: source.to_path_buf(),
        what: e.to_string(),
    }
}

/// A special token of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model directory `dir`: `chat_template` of `tokenizer_config.json`
    /// (a string, or a list of named templates of which `default` is taken), else
    /// `chat_template.jinja`. A model without one is [`ModelError::NoChatTemplate`].
    pub fn load(dir: &Path) -> Result<Self> {
        let tc_path = dir.join("tokenizer_config.json");
        let mut special = SpecialTokens::default();
        let mut source = None;
        if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path).map_err(io(&tc_path))?;
            let tc: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Json {
                    path: tc_path.clone(),
                    what: e.to_string(),
                })?;
            special = SpecialTokens {
                bos: token_text(tc.get("bos_token")),
                eos: token_text(tc.get("eos_token")),
                unk: token_text(tc.get("unk_token")),
                pad: token_text(tc.get("pad_token")),
            };
            source = match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
        }
        let (text, from) = match source {
            Some(s) => (s, tc_path),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if !jinja.exists() {
                    return Err(ModelError::NoChatTemplate(dir.to_path_buf()));
                }
                (std::fs::read_to_string(&jinja).map_err(io(&jinja))?, jinja)
            }
        };
        Self::with_source(text, special, from)
    }

    /// Compiles template `source` (Jinja) with `special` tokens.
    pub fn new(source: impl Into<String>, special: SpecialTokens) -> Result<Self> {
        Self::with_source(source.into(), special, PathBuf::from("chat template"))
    }

    fn with_source(text: String, special: SpecialTokens, from: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_error(&from, e))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            strftime(&fmt, secs)
        });
        env.add_template_owned(NAME, text)
            .map_err(|e| template_error(&from, e))?;
        Ok(Self {
            env,
            special,
            source: from,
        })
    }

    /// The special tokens the template sees.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages`; with `add_generation_prompt`, the text that opens the assistant's
    /// reply is appended (what a prompt for the next reply needs).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.source, e))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.special.bos.as_str(),
            eos_token => self.special.eos.as_str(),
            unk_token => self.special.unk.as_str(),
            pad_token => self.special.pad.as_str(),
        };
        tmpl.render(ctx)
            .map_err(|e| template_error(&self.source, e))
    }

    /// The text the template closes an assistant turn with, up to the first whitespace
    /// (`<|im_end|>` for ChatML, `<|eot_id|>` for llama 3, `</s>` for llama 2 and mistral), or
    /// `None` if it writes nothing after a reply (or cannot render one).
    pub fn end_of_turn(&self) -> Option<String> {
        const REPLY: &str = "\u{1}layerkv-reply\u{1}";
        let text = self
            .render(
                &[Message::new("user", "hi"), Message::new("assistant", REPLY)],
                false,
            )
            .ok()?;
        let after = &text[text.find(REPLY)? + REPLY.len()..];
        let marker = after.split_whitespace().next()?;
        Some(marker.to_string())
    }
}

/// `strftime` for the fields chat templates use (`%Y %y %m %d %e %H %M %S %j %b %B %a %A %p
/// %I %%`), UTC, of `unix_secs`.
pub fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (ChatML with a default system message), as its
    /// tokenizer_config.json holds it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 2 chat's template: system folded into the first user turn, alternation enforced
    /// with `raise_exception`, Python's `strip()`, BOS/EOS around each exchange.
    const LLAMA2: &str = r#"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"#;

    /// Llama 3 instruct's template: `| trim` binds before `+`, BOS on the first message only.
    const LLAMA3: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"#;

    fn two_turns() -> Vec<Message> {
        vec![
            Message::new("user", "What is a KV cache?"),
            Message::new("assistant", "Stored keys and values."),
            Message::new("user", "Say it in one sentence."),
        ]
    }

    fn special(bos: &str, eos: &str) -> SpecialTokens {
        SpecialTokens {
            bos: bos.into(),
            eos: eos.into(),
            ..SpecialTokens::default()
        }
    }

    #[test]
    fn chatml_two_turns_render_by_the_template_rules() {
        let t = ChatTemplate::new(SMOLLM2, special("<|im_start|>", "<|im_end|>")).unwrap();
        // By the template: a default system turn, then each message as
        // `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, then the assistant opening.
        let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                    <|im_start|>user\nWhat is a KV cache?<|im_end|>\n\
                    <|im_start|>assistant\nStored keys and values.<|im_end|>\n\
                    <|im_start|>user\nSay it in one sentence.<|im_end|>\n\
                    <|im_start|>assistant\n";
        assert_eq!(t.render(&two_turns(), true).unwrap(), want);
        // Without the generation prompt the assistant opening is absent; a system message
        // replaces the default one.
        let mut m = vec![Message::new("system", "Be brief.")];
        m.extend(two_turns());
        let got = t.render(&m, false).unwrap();
        assert!(got.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"));
        assert!(got.ends_with("one sentence.<|im_end|>\n"), "{got:?}");
        assert_eq!(t.end_of_turn().as_deref(), Some("<|im_end|>"));
        // Each turn's rendering extends the previous one plus the reply: what chat appends.
        let first = t.render(&two_turns()[..1], true).unwrap();
        let with_reply = format!("{first}Stored keys and values.");
        assert!(want.starts_with(&with_reply));
    }

    #[test]
    fn llama_templates_render_by_their_rules() {
        let t = ChatTemplate::new(LLAMA2, special("<s>", "</s>")).unwrap();
        let mut m = vec![Message::new("system", "Be brief.")];
        m.extend(two_turns());
        let want = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a KV cache? [/INST] \
                    Stored keys and values. </s><s>[INST] Say it in one sentence. [/INST]";
        assert_eq!(t.render(&m, true).unwrap(), want);
        assert_eq!(t.end_of_turn().as_deref(), Some("</s>"));
        let e = t
            .render(&[Message::new("assistant", "first")], true)
            .unwrap_err();
        assert!(e.to_string().contains("must alternate"), "{e}");

        let t = ChatTemplate::new(LLAMA3, special("<|begin_of_text|>", "<|eot_id|>")).unwrap();
        let mut m = two_turns();
        m[0].content = "  What is a KV cache?\n".into();
        let want = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is a KV cache?<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\nStored keys and values.<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nSay it in one sentence.<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_eq!(t.render(&m, true).unwrap(), want);
        assert_eq!(t.end_of_turn().as_deref(), Some("<|eot_id|>"));
    }

    #[test]
    fn block_whitespace_is_trimmed_as_transformers_does() {
        // transformers renders with trim_blocks and lstrip_blocks: a block tag's own line
        // leaves nothing behind.
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m.role == 'user' %}\nQ: {{ m.content }}\n    {% else %}\nA: {{ m.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:{% endif %}",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(
            t.render(&two_turns(), true).unwrap(),
            "Q: What is a KV cache?\nA: Stored keys and values.\nQ: Say it in one sentence.\nA:"
        );
    }

    #[test]
    fn templates_load_from_a_model_directory_or_say_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("layerkv-chat-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = ChatTemplate::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::NoChatTemplate(_)), "{e}");
        assert!(e.to_string().contains("without --chat"), "{e}");
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "tools"},
                              {"name": "default", "template": LLAMA2}]
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::load(&dir).unwrap();
        assert_eq!(t.special_tokens(), &special("<s>", "</s>"));
        assert_eq!(
            t.render(&[Message::new("user", "hi")], true).unwrap(),
            "<s>[INST] hi [/INST]"
        );
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("chat_template.jinja"),
            "{{ messages[0].content | upper }}",
        )
        .unwrap();
        let t = ChatTemplate::load(&dir).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "hi")], false).unwrap(),
            "HI"
        );
        std::fs::write(dir.join("chat_template.jinja"), "{% for %}").unwrap();
        let e = ChatTemplate::load(&dir).unwrap_err();
        assert!(e.to_string().contains("chat_template.jinja"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strftime_formats_a_known_instant() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %j %I%p %%", t),
            "29 Feb 2024, Thursday 060 01PM %"
        );
        assert_eq!(strftime("%a %e %B %y", 0), "Thu  1 January 70");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
        let e = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
    }
}
