//! [`ApiError`]: an HTTP status with OpenAI's error body,
//! `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients show the message and
//! retry what is retryable (429). User input never yields a 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use layerkv_model::ModelError;
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `rate_limit_error`,
    /// `server_error`.
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is malformed or asks for something this server cannot do.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// 400 naming the field at fault.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 404: an unknown route or model.
    pub fn not_found(message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "not_found_error",
            param: None,
            code,
        }
    }

    /// 429: the waiting queue is full; retry later.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    /// 503: the server is shutting down or its engine stopped.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 500: the engine failed (never the request's fault).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// What a refused submission means for the client: a bad request (400) unless the queue is
/// full (429); an engine failure is a 500.
impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        use layerkv::Error as Core;
        match &e {
            ModelError::Request(m) => {
                let mut err = Self::bad_request(m.clone());
                if m.contains("context") {
                    err.code = Some("context_length_exceeded");
                }
                err
            }
            ModelError::Core(Core::QueueFull { .. }) => Self::overloaded(e.to_string()),
            ModelError::Core(Core::RequestTooLarge { .. }) => Self {
                code: Some("kv_budget_exceeded"),
                ..Self::bad_request(format!(
                    "{e}: the server's KV budget cannot hold this request under its policy; \
                     ask for fewer tokens"
                ))
            },
            ModelError::Core(Core::EmptyPrompt(_) | Core::ZeroMaxTokens(_)) => {
                Self::bad_request(e.to_string())
            }
            ModelError::NoChatTemplate(_) | ModelError::Template { .. } => {
                Self::bad_request(e.to_string())
            }
            _ => Self::internal(e.to_string()),
        }
    }
}
