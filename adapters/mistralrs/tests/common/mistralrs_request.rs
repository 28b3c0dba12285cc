//! Requests to mistral.rs itself, shared by the oracle test, the `versus` example and the
//! upstream patch check (which copies this file beside its `main.rs`).

// Each includer uses part of it.
#![allow(dead_code)]

use mistralrs::{Constraint, NormalRequest, Request, RequestMessage, Response, SamplingParams};

/// A greedy request for the token ids `ids` (used as given, no BOS) of at most `max_len` new
/// tokens; `raw` asks for the prompt's raw logits instead of a completion.
pub fn greedy_request(
    ids: &[u32],
    raw: bool,
    max_len: usize,
    id: usize,
) -> (Request, tokio::sync::mpsc::Receiver<Response>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(max_len);
    let req = Request::Normal(Box::new(NormalRequest {
        messages: RequestMessage::CompletionTokens(ids.to_vec()),
        sampling_params: sampling,
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        id,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: None,
        return_raw_logits: raw,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    }));
    (req, rx)
}

/// What an unexpected response says (mistral.rs's `Response` is not `Debug`).
pub fn describe(r: Option<&Response>) -> String {
    match r {
        None => "no response (channel closed)".into(),
        Some(Response::InternalError(e) | Response::ValidationError(e)) => e.to_string(),
        Some(Response::ModelError(e, _) | Response::CompletionModelError(e, _)) => e.clone(),
        Some(_) => "another kind of response".into(),
    }
}
