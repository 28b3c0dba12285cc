//! The one error type of the core crate.
//!
//! Every caller mistake (a malformed layer map, an impossible budget, an unknown sequence, an
//! exhausted pool) is a variant that names what is wrong and where. A call that returns an
//! error leaves every table, refcount and statistic as it was before the call.

use crate::ids::{RequestId, SeqId};

/// Errors returned by the layerkv core.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A layer map or a per-layer list has the wrong number of entries.
    #[error("layer map: expected {expected} layers, got {actual} ({what})")]
    WrongLayerCount {
        /// What was being checked (e.g. "kv_source", "sliding_window", "model").
        what: &'static str,
        /// The number of layers expected.
        expected: usize,
        /// The number of entries found.
        actual: usize,
    },
    /// A layer reads the KV of a layer that does not exist.
    #[error("layer map: layer {layer} reads layer {source_layer}, but the model has {num_layers} layers")]
    SourceOutOfRange {
        /// The reading layer.
        layer: usize,
        /// The out-of-range source.
        source_layer: usize,
        /// Number of layers of the map.
        num_layers: usize,
    },
    /// Following `kv_source` from a layer never reaches a layer that owns its KV.
    #[error("layer map: layer {layer} is on a sharing cycle (no layer on it owns KV)")]
    Cycle {
        /// A layer on the cycle.
        layer: usize,
    },
    /// A layer reads KV from a higher layer where the consumer cannot execute upward sharing.
    #[error("layer map: layer {layer} reads the upper layer {source_layer}; {context} only allows sources below the layer")]
    UpwardReference {
        /// The reading layer.
        layer: usize,
        /// The higher layer it reads.
        source_layer: usize,
        /// Who rejected it (a format or an engine capability).
        context: &'static str,
    },
    /// A layer map is structurally wrong in another way (empty map, bad preset argument).
    #[error("layer map: {reason}")]
    InvalidMap {
        /// What rule was broken.
        reason: String,
    },
    /// A text form of a layer map (layer_types string, KVSharer map, preset name) failed to parse.
    #[error("cannot parse {format} at {position}: {reason}")]
    Parse {
        /// The format being parsed.
        format: &'static str,
        /// Where in the input (entry index or key).
        position: String,
        /// What is wrong.
        reason: String,
    },
    /// A retention rule is impossible (zero budget, window smaller than sinks, bad ratio).
    #[error("retention {retention}: {reason}")]
    InvalidRetention {
        /// The retention, as written by the user.
        retention: String,
        /// What rule was broken.
        reason: String,
    },
    /// A policy refers to a KV group that the layer map does not have.
    #[error("policy: layer {layer} does not own KV, so it has no group to configure")]
    NotAnOwner {
        /// The layer named in the policy.
        layer: usize,
    },
    /// A policy file could not be read or written.
    #[error("policy file: {0}")]
    PolicyFile(String),
    /// The pool does not hold enough free pages for the whole request; nothing was allocated.
    #[error("block pool exhausted: {requested} pages needed, {available} available")]
    PoolExhausted {
        /// Pages the operation needed.
        requested: usize,
        /// Pages that were free or reclaimable.
        available: usize,
    },
    /// A page id is outside the pool.
    #[error("page {page} is out of range (pool has {num_pages} pages)")]
    PageOutOfRange {
        /// The offending page id.
        page: u32,
        /// Pool size.
        num_pages: usize,
    },
    /// A page was released more often than it was held (a double free).
    #[error("page {page} released with refcount 0 (double free)")]
    RefCountUnderflow {
        /// The page.
        page: u32,
    },
    /// A page that no table holds was treated as held (retained or looked up as in use).
    #[error("page {page} is not in use (refcount 0)")]
    PageNotInUse {
        /// The page.
        page: u32,
    },
    /// The sequence id is not registered in the cache (never added, or already freed).
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    /// A sequence id that is already registered was added again.
    #[error("sequence {0} already exists")]
    SequenceExists(SeqId),
    /// A KV group index is outside the policy's groups.
    #[error("unknown KV group {group} (policy has {num_groups} groups)")]
    UnknownGroup {
        /// The group index.
        group: usize,
        /// Number of groups.
        num_groups: usize,
    },
    /// A configuration value of the cache is impossible.
    #[error("cache config: {0}")]
    InvalidConfig(String),
    /// Scores given to a retention do not match the group's slots.
    #[error("scores for group {group}: expected {expected} entries (one per slot), got {actual}")]
    ScoreLength {
        /// The group.
        group: usize,
        /// Slots of the group's table.
        expected: usize,
        /// Entries given.
        actual: usize,
    },
    /// KVSharer calibration got impossible input (samples, target, rule) or a model returned
    /// something malformed (wrong sizes, NaN/inf); the text names the sample or layer.
    #[error("calibration: {what}")]
    Calibration {
        /// What is wrong, and where.
        what: String,
    },
    /// A scheduler configuration value is impossible (zero sizes, a prefill chunk that can never
    /// fit the token budget, a scheduler used with another cache than its own).
    #[error("scheduler config: {0}")]
    InvalidSchedulerConfig(String),
    /// A request was submitted with an empty prompt.
    #[error("request {0}: the prompt is empty")]
    EmptyPrompt(RequestId),
    /// A request was submitted with `max_tokens == 0`.
    #[error("request {0}: max_tokens must be at least 1")]
    ZeroMaxTokens(RequestId),
    /// A request id that the scheduler still holds (waiting or running) was submitted again.
    #[error("request {0} already exists")]
    RequestExists(RequestId),
    /// The request id is not held by the scheduler (never added, finished or cancelled).
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// The waiting queue is at its cap: the request was not queued; try again later (a server
    /// answers 429 or 503).
    #[error("waiting queue full ({max_waiting} requests)")]
    QueueFull {
        /// The queue's cap ([`crate::SchedulerConfig::max_waiting`]).
        max_waiting: usize,
    },
    /// The request's minimum need, its planned peak pages under the policy, exceeds the whole
    /// pool: it could never run (a server answers 400).
    #[error("request {request} needs {pages_needed} pages at its peak, the pool has {num_pages}")]
    RequestTooLarge {
        /// The request.
        request: RequestId,
        /// Its planned peak pages (prompt + max_tokens, phase-aware, under the policy).
        pages_needed: usize,
        /// Pages in the whole pool.
        num_pages: usize,
    },
    /// [`crate::Scheduler::update`] got an output that is not the last scheduled one, or
    /// sampled tokens that do not match the output's sampling requests.
    #[error("scheduler update: {0}")]
    UpdateMismatch(String),
}

/// Result alias of the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
