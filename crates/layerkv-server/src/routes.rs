//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as
//! server-sent events ending with `data: [DONE]`, or not), `GET /v1/models`, `GET /health`,
//! `GET /metrics`. Any other route is a 404, a known route with another method a 405, both
//! with OpenAI's error body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use layerkv::FinishReason;
use layerkv_model::batch::BatchEvent;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Admitted, EngineHandle};
use crate::error::ApiError;
use crate::metrics::{render, Latencies};
use crate::openai::{parse_chat, parse_completion, usage, Job};

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    engine: EngineHandle,
    latencies: Latencies,
    seeds: AtomicU64,
    started: u64,
}

/// The router over an engine thread.
pub fn router(engine: EngineHandle) -> Router {
    let now = unix_now();
    let state = Arc::new(AppState {
        engine,
        latencies: Latencies::default(),
        seeds: AtomicU64::new(now.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        started: now,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route", None) })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                ..ApiError::bad_request("method not allowed on this route")
            }
        })
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which endpoint a reply is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let seed = s.seeds.fetch_add(1, Ordering::Relaxed);
    run(s, parse_completion(&body, seed), Kind::Completion).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let seed = s.seeds.fetch_add(1, Ordering::Relaxed);
    run(s, parse_chat(&body, seed), Kind::Chat).await
}

async fn run(s: Arc<AppState>, job: Result<Job, ApiError>, kind: Kind) -> Response {
    let t0 = Instant::now();
    let admitted = async {
        let job = job?;
        let served = &s.engine.info().name;
        if let Some(model) = &job.model {
            if model != served {
                return Err(ApiError::not_found(
                    format!("model {model:?} does not exist; this server serves {served:?}"),
                    Some("model_not_found"),
                ));
            }
        }
        let (stream, include_usage) = (job.stream, job.include_usage);
        let (admitted, rx) = s.engine.submit(job).await?;
        Ok((admitted, rx, stream, include_usage))
    }
    .await;
    let (admitted, rx, stream, include_usage) = match admitted {
        Ok(a) => a,
        Err(e) => {
            s.latencies.error();
            return e.into_response();
        }
    };
    let reply = Reply {
        kind,
        id: match kind {
            Kind::Completion => format!("cmpl-{}", admitted.id),
            Kind::Chat => format!("chatcmpl-{}", admitted.id),
        },
        created: unix_now(),
        model: s.engine.info().name.clone(),
    };
    let timing = Timing::new(t0);
    if stream {
        let events = Streamed {
            s,
            rx,
            reply,
            admitted,
            timing,
            include_usage,
            queue: VecDeque::new(),
            started: false,
            done: false,
        };
        return Sse::new(events.into_stream())
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    whole(s, rx, reply, admitted, timing).await
}

/// A request's token times.
#[derive(Debug, Clone, Copy)]
struct Timing {
    t0: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Timing {
    fn new(t0: Instant) -> Self {
        Self {
            t0,
            first: None,
            last: None,
            tokens: 0,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.tokens += 1;
    }

    fn report(&self, latencies: &Latencies) {
        let ttft = self.first.map(|f| (f - self.t0).as_secs_f64());
        let tpot = match (self.first, self.last) {
            (Some(f), Some(l)) if self.tokens > 1 => {
                Some((l - f).as_secs_f64() / (self.tokens - 1) as f64)
            }
            _ => None,
        };
        latencies.finished(ttft, tpot, self.t0.elapsed().as_secs_f64());
    }
}

/// The fields every body of one reply repeats.
#[derive(Debug, Clone)]
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn body(&self, choice: Value, chunk: bool) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// A streamed piece of text (`finish` set on the last chunk).
    fn chunk(&self, text: &str, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat if finish.is_some() && text.is_empty() => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null,
                                 "finish_reason": finish}),
        };
        self.body(choice, true)
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// A non-streamed reply: the whole text once the request ends.
async fn whole(
    s: Arc<AppState>,
    mut rx: mpsc::UnboundedReceiver<BatchEvent>,
    reply: Reply,
    admitted: Admitted,
    mut timing: Timing,
) -> Response {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            BatchEvent::Token { text: t, .. } => {
                timing.token();
                text.push_str(&t);
            }
            BatchEvent::Done {
                reason,
                completion_tokens,
                ..
            } => {
                timing.report(&s.latencies);
                let finish = finish_reason(reason);
                let choice = match reply.kind {
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                                               "finish_reason": finish}),
                    Kind::Chat => json!({"index": 0,
                                         "message": {"role": "assistant", "content": text},
                                         "logprobs": null, "finish_reason": finish}),
                };
                let mut body = reply.body(choice, false);
                body["usage"] = usage(admitted.prompt_tokens, completion_tokens);
                return Json(body).into_response();
            }
            BatchEvent::Failed { message, .. } => {
                s.latencies.error();
                return ApiError::internal(message).into_response();
            }
        }
    }
    s.latencies.error();
    ApiError::unavailable("the engine stopped before the request ended").into_response()
}

/// A streamed reply's state.
struct Streamed {
    s: Arc<AppState>,
    rx: mpsc::UnboundedReceiver<BatchEvent>,
    reply: Reply,
    admitted: Admitted,
    timing: Timing,
    include_usage: bool,
    queue: VecDeque<Event>,
    started: bool,
    done: bool,
}

impl Streamed {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        stream::unfold(self, |mut st| async move {
            loop {
                if let Some(e) = st.queue.pop_front() {
                    return Some((Ok(e), st));
                }
                if st.done {
                    return None;
                }
                match st.rx.recv().await {
                    Some(e) => st.take(e),
                    None => {
                        st.s.latencies.error();
                        let e =
                            ApiError::unavailable("the engine stopped before the request ended");
                        st.push(e.body());
                        st.done = true;
                    }
                }
            }
        })
    }

    fn push(&mut self, v: Value) {
        self.queue.push_back(Event::default().data(v.to_string()));
    }

    /// The first chat chunk carries the role (OpenAI's order).
    fn start(&mut self) {
        if !self.started && self.reply.kind == Kind::Chat {
            let mut first = self.reply.chunk("", None);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            self.push(first);
        }
        self.started = true;
    }

    fn take(&mut self, e: BatchEvent) {
        match e {
            BatchEvent::Token { text, .. } => {
                self.timing.token();
                self.start();
                if !text.is_empty() {
                    let c = self.reply.chunk(&text, None);
                    self.push(c);
                }
            }
            BatchEvent::Done {
                reason,
                completion_tokens,
                ..
            } => {
                self.timing.report(&self.s.latencies);
                self.start();
                let last = self.reply.chunk("", Some(finish_reason(reason)));
                self.push(last);
                if self.include_usage {
                    let mut u = self.reply.body(Value::Null, true);
                    u["choices"] = json!([]);
                    u["usage"] = usage(self.admitted.prompt_tokens, completion_tokens);
                    self.push(u);
                }
                self.queue.push_back(Event::default().data("[DONE]"));
                self.done = true;
            }
            BatchEvent::Failed { message, .. } => {
                self.s.latencies.error();
                self.push(ApiError::internal(message).body());
                self.done = true;
            }
        }
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let info = s.engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": s.started,
            "owned_by": "layerkv",
            "max_model_len": info.context,
            "policy": info.policy,
        }],
    }))
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.engine.stats().await {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    match s.engine.stats().await {
        Ok(stats) => {
            let info = s.engine.info();
            let page = render(&stats, &s.latencies, &info.policy, &info.name);
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                page,
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}
