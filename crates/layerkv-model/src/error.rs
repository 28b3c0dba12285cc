//! Errors of the model runner: each says what failed and where (file, tensor, command).

use std::path::PathBuf;

/// Model-runner errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A required file is missing.
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    /// `model_type` is not one the runner implements.
    #[error("unknown architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnknownArchitecture(String),
    /// A config value is missing or impossible.
    #[error("config: {0}")]
    Config(String),
    /// A tensor the architecture needs is absent from the weights.
    #[error("tensor {name} is missing from {source_file}")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// Where the weights came from.
        source_file: PathBuf,
    },
    /// A tensor has the wrong shape for the config.
    #[error("tensor {name}: expected shape {expected:?}, found {actual:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// A weights or GGUF file is truncated or malformed.
    #[error("{path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file uses a feature the runner does not implement (architecture, tokenizer, tensor
    /// type, RoPE scaling).
    #[error("{path}: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported, and what is.
        what: String,
    },
    /// The tokenizer has more tokens than the embedding has rows.
    #[error("tokenizer has {tokenizer} tokens but the model's vocab_size is {config}")]
    VocabMismatch {
        /// Tokens in tokenizer.json.
        tokenizer: usize,
        /// `vocab_size` of config.json.
        config: usize,
    },
    /// The model has no chat template (a base model, or one converted without it).
    #[error(
        "{0} has no chat template (no `chat_template` in tokenizer_config.json, no \
         chat_template.jinja): pass a plain prompt without --chat, or add a template there"
    )]
    NoChatTemplate(PathBuf),
    /// The chat template does not compile or fails to render (`raise_exception`).
    #[error("chat template of {path}: {what}")]
    Template {
        /// Where the template came from.
        path: PathBuf,
        /// The template engine's message.
        what: String,
    },
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An external command (pip, apt-get, dpkg-deb) failed.
    #[error("command `{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its standard error (tail).
        stderr: String,
    },
    /// I/O error with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// JSON error with the file involved.
    #[error("{path}: {what}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        what: String,
    },
    /// A request the session cannot run: an empty prompt, a prompt over the model's context,
    /// or a sequence larger than the KV pool holds under the policy. The text says which and
    /// by how much.
    #[error("{0}")]
    Request(String),
    /// A failure injected on purpose ([`crate::engine::Engine::inject_fault`]).
    #[error("injected fault at {0:?}")]
    Fault(crate::engine::FailStage),
    /// Error from the KV core (policy, cache).
    #[error(transparent)]
    Core(#[from] layerkv::Error),
    /// Error from the kernels.
    #[error(transparent)]
    Kernel(layerkv_kernels::KernelError),
    /// Error from candle.
    #[error("candle: {0}")]
    Candle(String),
}

/// Result alias of the model runner.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(candle_message(&e))
    }
}

impl From<layerkv_kernels::KernelError> for ModelError {
    fn from(e: layerkv_kernels::KernelError) -> Self {
        match e {
            layerkv_kernels::KernelError::Candle(c) => ModelError::Candle(candle_message(&c)),
            other => ModelError::Kernel(other),
        }
    }
}

/// A candle error's message on one line, without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set (a user reads the message; a backtrace belongs in a debugger).
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string().replace('\n', "; "),
    }
}

/// Attaches a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
