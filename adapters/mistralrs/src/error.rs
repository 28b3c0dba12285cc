//! [`AdapterError`]: what went wrong loading or running a model, and where.

use std::path::PathBuf;

/// Errors of the mistral.rs adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The model runner (config, tokenizer, engine, sampling) failed.
    #[error(transparent)]
    Model(layerkv_model::ModelError),
    /// A policy could not be built or read.
    #[error(transparent)]
    Policy(#[from] layerkv::Error),
    /// mistral.rs's loader could not read a weight of the model directory.
    #[error("{path}: {what}")]
    Load {
        /// The model directory.
        path: PathBuf,
        /// What failed (mistral.rs's message).
        what: String,
    },
    /// The checkpoint or setting is outside what the adapter runs.
    #[error("{path}: {what}")]
    Unsupported {
        /// The model directory.
        path: PathBuf,
        /// What is unsupported, with the way out.
        what: String,
    },
    /// A request the model cannot serve (an empty prompt, a conversation longer than the pool).
    #[error("{0}")]
    Request(String),
}

impl From<layerkv_model::ModelError> for AdapterError {
    fn from(e: layerkv_model::ModelError) -> Self {
        match e {
            layerkv_model::ModelError::Request(what) => Self::Request(what),
            layerkv_model::ModelError::Core(e) => Self::Policy(e),
            e => Self::Model(e),
        }
    }
}

impl From<candle_core::Error> for AdapterError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(layerkv_model::ModelError::from(e))
    }
}

/// The adapter's result type.
pub type Result<T> = std::result::Result<T, AdapterError>;
