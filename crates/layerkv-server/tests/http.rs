//! The server over real HTTP on 127.0.0.1 (port 0), serving a tiny random llama written by
//! the testkit and loaded by the loader users hit; replies are checked against direct
//! [`Session::complete`] runs (one sequence, `Engine::step`, no scheduler, no server).
//!
//! Shown to fail: not cancelling requests whose client left (the engine loop's `is_closed`
//! sweep and its cancel after a failed send disabled): the disconnect test then counted fewer
//! cancelled requests than clients that left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use futures_util::StreamExt;
use layerkv::{Policy, SchedulerConfig};
use layerkv_model::batch::Batcher;
use layerkv_model::chat::Message;
use layerkv_model::generate::{Sampler, Sampling, StopReason};
use layerkv_model::{Session, SessionOptions};
use layerkv_server::metrics::read_sample;
use layerkv_server::{serve, EngineHandle, EngineThread};
use layerkv_testkit::{scratch, TinyModel};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// The model, written once per test (tests run in parallel threads of one process).
fn model_dir(test: &str) -> PathBuf {
    TinyModel::llama(21).write(&scratch(&format!("server-{test}")))
}

fn session(dir: &Path, spec: &str, num_pages: Option<usize>) -> Session {
    let options = SessionOptions {
        max_context: 512,
        max_sequences: 8,
        num_pages,
        sampling: Some(Sampling::greedy()),
        ..SessionOptions::default()
    };
    let policy = Policy::from_spec(spec, 4).unwrap();
    Session::load(dir, DType::F32, &Device::Cpu, policy, options).unwrap()
}

/// A running server: its base URL, the switch that stops it, its task and engine thread.
struct Server {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: EngineThread,
}

impl Server {
    async fn start(
        dir: &Path,
        spec: &str,
        num_pages: Option<usize>,
        config: SchedulerConfig,
    ) -> Self {
        let batcher = Batcher::new(session(dir, spec, num_pages), config).unwrap();
        let (handle, engine) = EngineHandle::spawn(batcher, "tiny".into(), 32);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, handle, async {
            let _ = stopped.await;
        }));
        Self {
            base,
            stop: Some(stop),
            task,
            engine,
        }
    }

    /// Stops accepting, waits for in-flight requests and the engine thread.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
        tokio::task::spawn_blocking(move || self.engine.join())
            .await
            .unwrap();
    }

    async fn metrics(&self, client: &reqwest::Client) -> String {
        let r = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// Polls `/metrics` until no request is live and no page is used.
    async fn wait_idle(&self, client: &reqwest::Client) -> String {
        let t0 = Instant::now();
        loop {
            let page = self.metrics(client).await;
            let live = [
                "layerkv_requests_running",
                "layerkv_requests_waiting",
                "layerkv_requests_probing",
                "layerkv_kv_pages_used",
                "layerkv_kv_pages_planned",
            ]
            .iter()
            .map(|m| read_sample(&page, m).unwrap())
            .sum::<f64>();
            if live == 0.0 {
                return page;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "never idle:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a direct run of `prompt` gives: text and OpenAI finish reason.
fn direct(
    dir: &Path,
    spec: &str,
    prompt: &[u32],
    max_tokens: usize,
) -> (String, &'static str, usize) {
    let mut s = session(dir, spec, None);
    s.chat_template().unwrap();
    s.stop_criteria_mut().max_new_tokens = max_tokens;
    let mut sampler = Sampler::new(Sampling::greedy());
    let (c, _) = s
        .with_sequence(0, |s| s.complete(0, prompt, &mut sampler, |_| {}))
        .unwrap();
    let finish = match c.stop {
        StopReason::MaxTokens => "length",
        _ => "stop",
    };
    (c.text, finish, c.tokens.len())
}

fn prompt_text(i: usize) -> String {
    let words = [
        "paged", "cache", "layer", "token", "window", "sink", "heavy", "hitter",
    ];
    (0..10 + 9 * i)
        .map(|j| words[(i * 7 + j * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Reads a server-sent event stream to its end: the data lines, `[DONE]` included.
async fn read_stream(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_replies_streamed_and_not_equal_direct_runs() {
    let dir = model_dir("greedy");
    let client = reqwest::Client::new();
    // KVzip too: its prompts are probed between steps (the scheduler holds each prompt's last
    // token back), and its replies are still the direct runs'.
    for spec in ["identity", "identity+stream:4:44", "identity+kvzip:24:16"] {
        let config = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 300,
            ..SchedulerConfig::default()
        };
        let server = Server::start(&dir, spec, None, config).await;
        let tokenizer = session(&dir, spec, None).tokenizer().clone();
        // Plain completions, all at once so they share steps.
        let mut calls = Vec::new();
        for i in 0..6 {
            let (client, url) = (client.clone(), format!("{}/v1/completions", server.base));
            let body = json!({"model": "tiny", "prompt": prompt_text(i), "max_tokens": 24,
                              "temperature": 0, "stream": i % 2 == 1,
                              "stream_options": {"include_usage": true}});
            calls.push(tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.unwrap();
                if i % 2 == 1 {
                    let data = read_stream(r).await;
                    assert_eq!(data.last().unwrap(), "[DONE]");
                    let chunks: Vec<Value> = data[..data.len() - 1]
                        .iter()
                        .map(|d| serde_json::from_str(d).unwrap())
                        .collect();
                    let text: String = chunks
                        .iter()
                        .filter_map(|c| c["choices"][0]["text"].as_str())
                        .collect();
                    let finish = chunks
                        .iter()
                        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
                        .unwrap()
                        .to_string();
                    let usage = chunks.last().unwrap()["usage"].clone();
                    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
                    (text, finish, usage)
                } else {
                    assert_eq!(r.status(), 200);
                    let v: Value = r.json().await.unwrap();
                    assert_eq!(v["object"], "text_completion");
                    let c = &v["choices"][0];
                    (
                        c["text"].as_str().unwrap().to_string(),
                        c["finish_reason"].as_str().unwrap().to_string(),
                        v["usage"].clone(),
                    )
                }
            }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            let (text, finish, usage) = call.await.unwrap();
            let prompt = tokenizer.encode(&prompt_text(i)).unwrap();
            let (want, want_finish, n) = direct(&dir, spec, &prompt, 24);
            assert_eq!(
                (text.as_str(), finish.as_str()),
                (want.as_str(), want_finish),
                "{spec}: request {i}"
            );
            assert_eq!(usage["prompt_tokens"], prompt.len(), "{spec}: request {i}");
            assert_eq!(usage["completion_tokens"], n, "{spec}: request {i}");
        }
        // A chat completion, streamed and not, through the chat template.
        let messages = [Message::new("user", "Which tokens does a sink keep?")];
        let mut s = session(&dir, spec, None);
        let prompt = s.chat_prompt(&messages).unwrap();
        let (want, want_finish, _) = direct(&dir, spec, &prompt, 20);
        let url = format!("{}/v1/chat/completions", server.base);
        let body = json!({"messages": [{"role": "user", "content": "Which tokens does a sink keep?"}],
                          "max_tokens": 20, "temperature": 0});
        let (status, v) = post(&client, &url, body.clone()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
        assert_eq!(v["choices"][0]["finish_reason"], want_finish);
        let mut streamed = body;
        streamed["stream"] = true.into();
        let data = read_stream(client.post(&url).json(&streamed).send().await.unwrap()).await;
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want);
        // /v1/models and /health.
        let models: Value = client
            .get(format!("{}/v1/models", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], "tiny");
        assert_eq!(models["data"][0]["max_model_len"], 512);
        let health = client
            .get(format!("{}/health", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let page = server.wait_idle(&client).await;
        assert_eq!(
            read_sample(&page, "layerkv_requests_success_total"),
            Some(8.0)
        );
        assert!(read_sample(&page, "layerkv_time_to_first_token_seconds_count").unwrap() >= 8.0);
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_requests_with_disconnects_leave_no_pages() {
    let dir = model_dir("disconnects");
    let client = reqwest::Client::new();
    let config = SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 300,
        ..SchedulerConfig::default()
    };
    let server = Server::start(&dir, "identity+stream:4:44", None, config).await;
    let mut rng = layerkv::SplitMix64::new(64);
    let mut calls = Vec::new();
    let mut leaving = 0;
    for i in 0..64 {
        // A third of the clients leave after 0-2 chunks; their requests ask for 400 tokens, so
        // only a cancellation ends them before the others are done.
        let leave = (rng.below(3) == 0).then(|| rng.below(3));
        leaving += usize::from(leave.is_some());
        let body = json!({"prompt": prompt_text(i % 7), "max_tokens": if leave.is_some() { 400 } else { 6 },
                          "temperature": 0.7, "seed": i, "stream": true, "ignore_eos": leave.is_some()});
        let (client, url) = (client.clone(), format!("{}/v1/completions", server.base));
        calls.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut stream = r.bytes_stream();
            let mut body = String::new();
            if let Some(after) = leave {
                let mut seen = 0;
                while seen < after {
                    match stream.next().await {
                        Some(b) => seen += b.unwrap().len().min(1),
                        None => break,
                    }
                }
                return None; // drops the connection
            }
            while let Some(b) = stream.next().await {
                body.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
            }
            Some(body)
        }));
    }
    let mut answered = 0;
    for call in calls {
        if let Some(body) = call.await.unwrap() {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
            assert!(
                body.contains("\"finish_reason\":\"length\"")
                    || body.contains("\"finish_reason\":\"stop\"")
            );
            answered += 1;
        }
    }
    assert_eq!(answered + leaving, 64);
    assert!(leaving > 10, "{leaving}");
    let page = server.wait_idle(&client).await;
    let cancelled = read_sample(
        &page,
        "layerkv_requests_finished_total{reason=\"cancelled\"}",
    )
    .unwrap();
    assert_eq!(
        cancelled, leaving as f64,
        "every client that left was cancelled:\n{page}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_forces_preemption_gives_the_same_greedy_outputs() {
    let dir = model_dir("preemption");
    let client = reqwest::Client::new();
    // 96 pages; 8 requests of 20 to 68 pages each (4 groups), admission overcommitted 4x.
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 300,
        admission_pages: Some(384),
        ..SchedulerConfig::default()
    };
    let server = Server::start(&dir, "identity", Some(96), config).await;
    let tokenizer = session(&dir, "identity", None).tokenizer().clone();
    let mut calls = Vec::new();
    for i in 0..8 {
        let body = json!({"prompt": prompt_text(i % 4), "max_tokens": 40, "temperature": 0});
        let (client, url) = (client.clone(), format!("{}/v1/completions", server.base));
        calls.push(tokio::spawn(async move { post(&client, &url, body).await }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (status, v) = call.await.unwrap();
        assert_eq!(status, 200, "{v}");
        let prompt = tokenizer.encode(&prompt_text(i % 4)).unwrap();
        let (want, finish, _) = direct(&dir, "identity", &prompt, 40);
        assert_eq!(v["choices"][0]["text"], want.as_str(), "request {i}");
        assert_eq!(v["choices"][0]["finish_reason"], finish, "request {i}");
    }
    let page = server.wait_idle(&client).await;
    assert!(
        read_sample(&page, "layerkv_preemptions_total").unwrap() > 0.0,
        "{page}"
    );
    assert!(read_sample(&page, "layerkv_kv_pages_peak").unwrap() <= 96.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_never_a_500() {
    let dir = model_dir("bad-input");
    let client = reqwest::Client::new();
    let config = SchedulerConfig {
        max_num_seqs: 1,
        max_num_batched_tokens: 300,
        max_waiting: 1,
        ..SchedulerConfig::default()
    };
    // 120 pages: 480 tokens of identity's 4 groups, below the context of 512.
    let server = Server::start(&dir, "identity", Some(120), config).await;
    let url = format!("{}/v1/completions", server.base);
    let error = |v: &Value| {
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    };
    let r = client
        .post(&url)
        .body("{\"prompt\": \"a\",")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    error(&r.json().await.unwrap());
    for (body, status, code) in [
        (
            json!({"prompt": "x".repeat(600), "max_tokens": 4}),
            400,
            Some("context_length_exceeded"),
        ),
        (
            json!({"prompt": "hello", "max_tokens": 490}),
            400,
            Some("kv_budget_exceeded"),
        ),
        (json!({"prompt": "hello", "max_tokens": 0}), 400, None),
        (json!({"prompt": "", "max_tokens": 3}), 400, None),
        (
            json!({"prompt": "hello", "model": "gpt-4"}),
            404,
            Some("model_not_found"),
        ),
        (json!({"prompt": "hello", "temperature": "hot"}), 400, None),
    ] {
        let (s, v) = post(&client, &url, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        let e = error(&v);
        if let Some(code) = code {
            assert_eq!(e["code"], code, "{body}: {v}");
        }
    }
    let r = client
        .get(format!("{}/v1/nothing", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    error(&r.json().await.unwrap());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // A stop string that spans tokens (every character is a token here) cuts the text.
    let (_, v) = post(
        &client,
        &url,
        json!({"prompt": "stop here", "max_tokens": 24, "temperature": 0}),
    )
    .await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = full.char_indices().nth(6).map_or(0, |(i, _)| i);
    let stop: String = full[cut..].chars().take(3).collect();
    assert_eq!(stop.chars().count(), 3, "{full:?}");
    let (_, v) = post(
        &client,
        &url,
        json!({"prompt": "stop here", "max_tokens": 24, "temperature": 0, "stop": [stop.clone()]}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        &full[..full.find(&stop).unwrap()],
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Overload: one running (it streams 400 tokens), one waiting, the next is refused with 429.
    let long = json!({"prompt": "a", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let running = client.post(&url).json(&long).send().await.unwrap();
    let mut running = running.bytes_stream();
    running.next().await.unwrap().unwrap();
    let waiting = {
        let (client, url, long) = (client.clone(), url.clone(), long.clone());
        tokio::spawn(async move {
            client
                .post(&url)
                .json(&long)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    let t0 = Instant::now();
    while read_sample(&server.metrics(&client).await, "layerkv_requests_waiting") != Some(1.0) {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, v) = post(&client, &url, json!({"prompt": "b", "max_tokens": 2})).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(error(&v)["code"], "queue_full");
    drop(running); // the client leaves: its request is cancelled and the waiting one runs
    assert!(waiting.await.unwrap().contains("[DONE]"));
    let page = server.wait_idle(&client).await;
    assert_eq!(
        read_sample(&page, "layerkv_requests_error_total"),
        Some(8.0),
        "{page}"
    );
    server.shutdown().await;
}
