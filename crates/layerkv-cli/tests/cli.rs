//! The `layerkv` binary as a user runs it, on tiny models written to a scratch directory:
//! - user errors (a missing model file, an unknown architecture in config.json or GGUF, an
//!   unknown GGUF pre-tokenizer, `--device cuda` on a CPU build, a model without a chat
//!   template, a corrupt weights file, bad usage) exit non-zero with exactly one line on
//!   stderr naming the problem, with `RUST_BACKTRACE=1` (logs are turned down to warnings so
//!   stderr holds only what the user must read);
//! - `chat` answers two piped turns, the second appended to the KV the first left (the
//!   "after N held" figure), stops at the end-of-turn token the template closes turns with,
//!   and exits 0 on end of input; `generate --chat` and plain `generate` stream to stdout;
//!   nothing carries ANSI escapes when stdout and stderr are pipes.
//!
//! The tiny llama's weights make its replies deterministic under any policy: layer outputs are
//! small next to the embedding, the embedding puts every token in one of three classes and the
//! LM head maps the classes to a chain: anything -> `h` -> `i` -> `<|im_end|>`. So every reply
//! is "hi" and ends at the end of turn, while attention, the KV cache and the policy still run.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use layerkv_testkit::byte_chars;

const HIDDEN: usize = 32;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 48;
/// 256 byte tokens, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
const VOCAB: usize = 259;
const ENDOFTEXT: usize = 256;
const IM_END: usize = 258;

const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("layerkv-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn special_tokens() -> [&'static str; 3] {
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
}

/// Writes the tiny chat model directory (see the module doc) with `template` (None: none).
fn tiny_model(dir: &Path, template: Option<&str>) {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": VOCAB,
        "tie_word_embeddings": false, "bos_token_id": 257,
        // Not <|im_end|>: chat must find the end of turn in the template.
        "eos_token_id": ENDOFTEXT
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c, i.into());
    }
    let added: Vec<_> = special_tokens()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vocab.insert(t.to_string(), (256 + i).into());
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let mut tc = serde_json::json!({
        "add_bos_token": false, "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"
    });
    if let Some(t) = template {
        tc["chat_template"] = t.into();
    }
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    candle_core::safetensors::save(&weights(), dir.join("model.safetensors")).unwrap();
}

/// Seeded small random layers around the class chain of the module doc.
fn weights() -> HashMap<String, Tensor> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (h, i) = (usize::from(b'h'), usize::from(b'i'));
    let class = |t: usize| match t {
        _ if t == h => 0,
        _ if t == i => 1,
        _ => 2,
    };
    let mut embed = vec![0f32; VOCAB * HIDDEN];
    for t in 0..VOCAB {
        embed[t * HIDDEN + class(t)] = 1.0;
    }
    let mut head = vec![0f32; VOCAB * HIDDEN];
    // class 2 -> 'h', class 0 ('h') -> 'i', class 1 ('i') -> <|im_end|>.
    for (next, from) in [(h, 2), (i, 0), (IM_END, 1)] {
        head[next * HIDDEN + from] = 1.0;
    }
    let mut t = HashMap::new();
    let dev = &Device::Cpu;
    t.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::from_vec(embed, (VOCAB, HIDDEN), dev).unwrap(),
    );
    t.insert(
        "lm_head.weight".to_string(),
        Tensor::from_vec(head, (VOCAB, HIDDEN), dev).unwrap(),
    );
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(HIDDEN, candle_core::DType::F32, dev).unwrap(),
    );
    let d = HIDDEN / HEADS;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [HEADS * d, HIDDEN]),
            ("self_attn.k_proj", [KV_HEADS * d, HIDDEN]),
            ("self_attn.v_proj", [KV_HEADS * d, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HEADS * d]),
            ("mlp.gate_proj", [FFN, HIDDEN]),
            ("mlp.up_proj", [FFN, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, FFN]),
        ] {
            // q/k full size so attention scores vary; outputs small next to the embedding.
            let scale = if name.contains("q_proj") || name.contains("k_proj") {
                0.5
            } else {
                0.02
            };
            t.insert(format!("{p}.{name}.weight"), rand(&shape, scale));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{norm}.weight"),
                Tensor::ones(HIDDEN, candle_core::DType::F32, dev).unwrap(),
            );
        }
    }
    t
}

/// A GGUF holding only metadata (the converter refuses architecture and tokenizer before it
/// reads any tensor).
fn tiny_gguf(path: &Path, arch: &str, pre: &str) {
    let mut tokens: Vec<Value> = byte_chars().into_iter().map(Value::String).collect();
    tokens.extend(
        special_tokens()
            .iter()
            .map(|t| Value::String(t.to_string())),
    );
    let meta = [
        ("general.architecture", Value::String(arch.into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
    ];
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

/// Runs `layerkv ARGS` with `stdin` piped in; GGUF conversions go to `home`.
fn layerkv(home: &Path, args: &[&str], stdin: &str, log: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_layerkv"))
        .args(args)
        .env("LAYERKV_HOME", home)
        .env("RUST_LOG", log)
        // Backtraces on: errors must still be one short line (candle attaches them).
        .env("RUST_BACKTRACE", "1")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    for s in [&out.stdout, &out.stderr] {
        assert!(
            !s.contains(&0x1b),
            "ANSI escape in output: {}",
            String::from_utf8_lossy(s)
        );
    }
    out
}

/// Asserts a failed run whose stderr is exactly one `error:` line containing every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(!out.status.success(), "succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from {stderr:?}");
    }
    lines[0].to_string()
}

#[test]
fn user_errors_are_one_line_naming_the_problem() {
    let dir = scratch("errors");
    let home = dir.join("home");
    let run = |args: &[&str]| layerkv(&home, args, "", "warn");

    let missing = dir.join("absent.gguf");
    let out = run(&[
        "generate",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, &["missing file", "absent.gguf"]);
    assert_eq!(out.status.code(), Some(1));

    let gpt2 = dir.join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257}"#,
    )
    .unwrap();
    let out = run(&["chat", "--model", gpt2.to_str().unwrap()]);
    assert_one_line_error(
        &out,
        &[
            "unknown architecture \"gpt2\"",
            "llama, mistral, qwen2",
            "gpt2",
        ],
    );
    // `architectures` alone names the architecture too.
    std::fs::write(
        gpt2.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"]}"#,
    )
    .unwrap();
    let out = run(&[
        "generate",
        "--model",
        gpt2.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_one_line_error(&out, &["\"GPT2LMHeadModel\""]);

    let gguf = dir.join("falcon.gguf");
    tiny_gguf(&gguf, "falcon", "default");
    let out = run(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_one_line_error(
        &out,
        &["falcon.gguf", "\"falcon\"", "llama, mistral, qwen2"],
    );

    let gguf = dir.join("mystery.gguf");
    tiny_gguf(&gguf, "llama", "mystery");
    let out = run(&["chat", "--model", gguf.to_str().unwrap()]);
    assert_one_line_error(
        &out,
        &[
            "mystery.gguf",
            "tokenizer.ggml.pre = \"mystery\"",
            "llama-bpe",
        ],
    );

    let model = dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model, None);
    let m = model.to_str().unwrap();
    #[cfg(not(feature = "cuda"))]
    for device in ["cuda", "cuda:1"] {
        let out = run(&[
            "generate", "--model", m, "--prompt", "x", "--device", device,
        ]);
        assert_one_line_error(
            &out,
            &[
                &format!("--device {device}"),
                "built without CUDA",
                "--features cuda",
            ],
        );
    }
    let out = run(&["generate", "--model", m, "--prompt", "x", "--device", "tpu"]);
    assert_one_line_error(&out, &["--device \"tpu\"", "cpu, cuda, cuda:N"]);
    let out = run(&["chat", "--model", m]);
    assert_one_line_error(&out, &["has no chat template", "tiny"]);
    let out = run(&["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"]);
    assert_one_line_error(&out, &["--top-p 1.5"]);
    let out = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--kv-dtype",
        "f64",
    ]);
    assert_one_line_error(&out, &["--kv-dtype \"f64\"", "auto, f32, f16, bf16"]);
    let out = run(&[
        "generate", "--model", m, "--prompt", "x", "--batch", "2", "--stop", "y",
    ]);
    assert_one_line_error(&out, &["--stop applies to one reply", "--batch 2"]);
    let out = run(&["generate", "--model", m, "--prompt", "x", "--batch", "0"]);
    assert_one_line_error(&out, &["--batch", "0"]);
    let out = run(&[
        "generate", "--model", m, "--prompt", "x", "--policy", "bogus:3",
    ]);
    assert_one_line_error(&out, &["bogus"]);
    // An empty prompt, and one past the model's 512-token context under a policy that keeps
    // every token (a policy that evicts streams past it). Shown failing: without the session's
    // room check the long prompt runs to completion and exits 0.
    let out = run(&["generate", "--model", m, "--prompt", ""]);
    assert_one_line_error(&out, &["the prompt is empty"]);
    let long = "y".repeat(600);
    let out = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        &long,
        "--max-tokens",
        "2",
    ]);
    assert_one_line_error(&out, &["600 tokens exceed the model's context of 512"]);
    let out = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        &long,
        "--max-tokens",
        "2",
        "--policy",
        "identity+stream:4:60",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    tiny_model(&broken, Some(CHATML));
    std::fs::write(
        broken.join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}garbage",
    )
    .unwrap();
    let out = run(&["chat", "--model", broken.to_str().unwrap()]);
    let line = assert_one_line_error(
        &out,
        &["model.safetensors", "not a readable safetensors file"],
    );
    assert!(line.len() < 400 && !line.contains("backtrace.rs"), "{line}");
    // Bad usage: clap's first line, status 2.
    let out = run(&["generate", "--model", m, "--prompt", "x", "--bogus"]);
    assert_one_line_error(&out, &["--bogus", "--help"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_answers_piped_turns_on_one_sequence_and_exits_on_eof() {
    let dir = scratch("chat");
    let model = dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model, Some(CHATML));
    let m = model.to_str().unwrap();
    for policy in ["identity", "cla:2+stream:4:12", "identity+h2o:8:8"] {
        let out = layerkv(
            &dir,
            &[
                "chat",
                "--model",
                m,
                "--policy",
                policy,
                "--max-tokens",
                "8",
            ],
            "Hello there\n\nHow are you?\n",
            "info",
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{policy}: {stderr}");
        assert_eq!(
            stdout, "> Hello there\nhi\n> How are you?\nhi\n",
            "{policy}: {stderr}"
        );
        // Turn 1: `<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n`, one token
        // per byte, 30 tokens; the reply `h i` (+ the end token, never appended) holds 32.
        assert!(
            stderr
                .contains("[turn 1: 30 new prompt tokens after 0 held, 3 generated (end of turn)"),
            "{policy}: {stderr}"
        );
        // Turn 2 appends only `<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n...`.
        assert!(
            stderr
                .contains("[turn 2: 33 new prompt tokens after 32 held, 3 generated (end of turn)"),
            "{policy}: {stderr}"
        );
        assert!(
            stderr.contains("chat: 2 turns, 6 tokens generated"),
            "{policy}: {stderr}"
        );
        assert!(
            stderr.contains("held for 67 tokens (identity: "),
            "{policy}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("under {policy}")),
            "{policy}: {stderr}"
        );
    }
    // /reset starts over: the next turn holds nothing before it.
    let out = layerkv(
        &dir,
        &["chat", "--model", m],
        "Hello there\n/reset\nHello there\n/exit\nignored\n",
        "warn",
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("30 new prompt tokens after 0 held").count(),
        2,
        "{stderr}"
    );
    assert!(stderr.contains("chat: 2 turns"), "{stderr}");
    // A reply cut by --max-tokens: the next turn re-prefills the whole conversation.
    let out = layerkv(
        &dir,
        &["chat", "--model", m, "--max-tokens", "1"],
        "Hello there\nAgain\n",
        "warn",
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, "> Hello there\nh\n> Again\nh\n", "{stderr}");
    assert!(
        stderr.contains("[turn 2: 57 new prompt tokens after 0 held, 1 generated (--max-tokens)"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_streams_plain_and_chat_prompts() {
    let dir = scratch("generate");
    let model = dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model, Some(CHATML));
    let m = model.to_str().unwrap();
    let out = layerkv(
        &dir,
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "Hello there",
            "--chat",
        ],
        "",
        "warn",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "hi\n");
    // Without --chat the prompt is continued as text: <|im_end|> is no stop token for plain
    // text, the chain repeats until --max-tokens (the special token is not shown). A stop
    // string cuts it.
    let out = layerkv(
        &dir,
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "Hello there",
            "--max-tokens",
            "6",
            "--temperature",
            "0.5",
            "--top-k",
            "1",
        ],
        "",
        "info",
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Hello therehihi\n");
    assert!(stderr.contains("--chat"), "the template hint: {stderr}");
    assert!(stderr.contains("11 prompt tokens, 6 generated"), "{stderr}");
    let out = layerkv(
        &dir,
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "Hello there",
            "--stop",
            "ih",
        ],
        "",
        "warn",
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "Hello thereh\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
