//! The engine thread: one OS thread owns the [`Batcher`] and steps it while requests are live;
//! request handlers talk to it over channels ([`EngineHandle`]). Prompts are tokenized (and
//! chat messages rendered) on the engine thread, so a refused request is answered before any
//! byte of a reply is sent.
//!
//! A request's events go to its handler over its own channel. When the handler is gone (the
//! client disconnected: axum drops the handler or the event stream), the channel closes and
//! the request is cancelled before the next step, freeing its pages.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::Duration;

use layerkv::RequestId;
use layerkv_model::batch::{BatchEvent, BatchRequest, BatchStats, Batcher};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::openai::{Input, Job};

/// What the engine thread is asked.
enum Command {
    Submit {
        job: Job,
        reply: oneshot::Sender<Result<Admitted, ApiError>>,
        events: mpsc::UnboundedSender<BatchEvent>,
    },
    Stats(oneshot::Sender<BatchStats>),
}

/// A request the engine queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its id (also its cache sequence).
    pub id: RequestId,
    /// Tokens of its prompt.
    pub prompt_tokens: usize,
    /// Tokens it may generate.
    pub max_tokens: usize,
}

/// Facts about the served model that handlers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The name clients pass as `model`.
    pub name: String,
    /// The policy spec.
    pub policy: String,
    /// The model's context in tokens.
    pub context: usize,
}

/// The handlers' side of the engine thread. Dropping every clone of it lets the thread finish
/// the live requests and exit; [`EngineHandle::join`] waits for that.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    info: std::sync::Arc<ModelInfo>,
}

/// The engine thread itself, to join at shutdown.
#[derive(Debug)]
pub struct EngineThread(JoinHandle<()>);

impl EngineThread {
    /// Waits until the engine thread has ended every live request and exited (after every
    /// [`EngineHandle`] was dropped).
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl EngineHandle {
    /// Starts the engine thread on `batcher`. `default_max_tokens` is a reply's length when a
    /// request gives none (capped to the model's context under a policy that never evicts).
    pub fn spawn(
        batcher: Batcher,
        name: String,
        default_max_tokens: usize,
    ) -> (Self, EngineThread) {
        let session = batcher.session();
        let info = ModelInfo {
            name,
            policy: session.policy_name().to_string(),
            context: session.model().config().max_position_embeddings,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("layerkv-engine".into())
            .spawn(move || run(batcher, rx, default_max_tokens))
            .expect("spawning the engine thread");
        (
            Self {
                tx,
                info: std::sync::Arc::new(info),
            },
            EngineThread(thread),
        )
    }

    /// The served model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Queues `job`; returns its admission and its event stream, or why it was refused.
    pub async fn submit(
        &self,
        job: Job,
    ) -> Result<(Admitted, mpsc::UnboundedReceiver<BatchEvent>), ApiError> {
        let (reply, answer) = oneshot::channel();
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Submit { job, reply, events })
            .map_err(|_| stopped())?;
        let admitted = answer.await.map_err(|_| stopped())??;
        Ok((admitted, rx))
    }

    /// The engine's counters and gauges.
    pub async fn stats(&self) -> Result<BatchStats, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Stats(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

fn stopped() -> ApiError {
    ApiError::unavailable("the engine has stopped")
}

/// The engine loop: take commands (blocking while idle), cancel requests whose client left,
/// step, hand out events. Ends when every handle is dropped and no request is live.
fn run(mut batcher: Batcher, mut rx: mpsc::UnboundedReceiver<Command>, default_max: usize) {
    let mut next_id: RequestId = 1;
    let mut clients: HashMap<RequestId, mpsc::UnboundedSender<BatchEvent>> = HashMap::new();
    let mut events = Vec::new();
    let mut open = true;
    loop {
        if open && !batcher.has_work() {
            match rx.blocking_recv() {
                Some(cmd) => handle(cmd, &mut batcher, &mut clients, &mut next_id, default_max),
                None => open = false,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(cmd) => handle(cmd, &mut batcher, &mut clients, &mut next_id, default_max),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        events.clear();
        let gone: Vec<RequestId> = clients
            .iter()
            .filter(|(_, c)| c.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            clients.remove(&id);
            if let Err(e) = batcher.cancel(id, &mut events) {
                tracing::error!("cancelling request {id}: {e}");
            }
        }
        if !batcher.has_work() {
            if !open {
                return;
            }
            continue;
        }
        match batcher.step(&mut events) {
            Ok(true) => {}
            // Everything scheduled was preempted: give the pool a moment (it cannot be empty
            // of our own pages, so this is another user of the cache, or nothing fits yet).
            Ok(false) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => tracing::error!("engine step failed: {e}"),
        }
        for e in events.drain(..) {
            let (id, last) = match &e {
                BatchEvent::Token { id, .. } => (*id, false),
                BatchEvent::Done { id, .. } | BatchEvent::Failed { id, .. } => (*id, true),
            };
            let delivered = clients.get(&id).is_some_and(|c| c.send(e).is_ok());
            if last {
                clients.remove(&id);
            } else if !delivered {
                clients.remove(&id);
                let mut cancelled = Vec::new();
                if let Err(err) = batcher.cancel(id, &mut cancelled) {
                    tracing::error!("cancelling request {id}: {err}");
                }
            }
        }
    }
}

fn handle(
    cmd: Command,
    batcher: &mut Batcher,
    clients: &mut HashMap<RequestId, mpsc::UnboundedSender<BatchEvent>>,
    next_id: &mut RequestId,
    default_max: usize,
) {
    match cmd {
        Command::Stats(reply) => {
            let _ = reply.send(batcher.stats());
        }
        Command::Submit { job, reply, events } => {
            let id = *next_id;
            *next_id += 1;
            let admitted = submit(batcher, id, job, default_max);
            if admitted.is_ok() {
                clients.insert(id, events);
            }
            let _ = reply.send(admitted);
        }
    }
}

fn submit(
    batcher: &mut Batcher,
    id: RequestId,
    job: Job,
    default_max: usize,
) -> Result<Admitted, ApiError> {
    let session = batcher.session_mut();
    let prompt = match job.input {
        Input::Text(text) => session.tokenizer().encode(&text)?,
        Input::Tokens(tokens) => tokens,
        Input::Chat(messages) => session.chat_prompt(&messages)?,
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_param("prompt", "the prompt is empty"));
    }
    let context = session.model().config().max_position_embeddings;
    let max_tokens = match job.max_tokens {
        Some(n) => n,
        None if !session.engine().evicts() && prompt.len() < context => {
            default_max.min(context - prompt.len())
        }
        None => default_max,
    };
    let prompt_tokens = prompt.len();
    batcher.add(
        id,
        BatchRequest {
            prompt,
            max_tokens,
            sampling: job.sampling,
            stop_strings: job.stop,
            ignore_eos: job.ignore_eos,
        },
    )?;
    Ok(Admitted {
        id,
        prompt_tokens,
        max_tokens,
    })
}
