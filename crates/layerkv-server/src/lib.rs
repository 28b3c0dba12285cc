//! # layerkv-server
//!
//! Serves a model under a layerkv policy over an OpenAI-compatible HTTP API, with continuous
//! batching: the memory a policy saves becomes requests served at once.
//!
//! - [`engine`]: one engine thread owns a [`layerkv_model::batch::Batcher`] (the scheduler
//!   admits by the policy's planned pages, mixes chunked prefill with decode, preempts by
//!   recompute) and steps it; handlers talk to it over channels.
//! - [`routes`]: `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent
//!   events or not), `GET /v1/models`, `GET /health`, `GET /metrics`.
//! - [`openai`]: request checking, field by field; [`error`]: OpenAI's error body with the
//!   right status (400 bad input, 404 unknown model or route, 429 queue full, never a 500 for
//!   user input).
//! - [`metrics`]: Prometheus text: queues, preemptions, pages, KV bytes against identity's,
//!   tokens, latency histograms.
//! - [`bench`]: the load benchmark client (`layerkv bench-serve`), which speaks to any
//!   OpenAI-compatible server.
//!
//! ```no_run
//! # async fn f(batcher: layerkv_model::batch::Batcher) -> std::io::Result<()> {
//! use layerkv_server::{serve, shutdown_signal, EngineHandle};
//!
//! let (engine, thread) = EngineHandle::spawn(batcher, "smollm2".into(), 256);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(listener, engine, shutdown_signal()).await?;
//! thread.join(); // in-flight requests were answered; the engine thread has exited
//! # Ok(()) }
//! ```

pub mod bench;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod routes;

use std::future::Future;

pub use engine::{EngineHandle, EngineThread, ModelInfo};
pub use error::ApiError;

/// Serves `engine` on `listener` until `shutdown` resolves; then stops accepting connections
/// and waits for the requests in flight to be answered (streams included).
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: EngineHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes::router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
