//! Errors of the kernels: every bad argument names what and where; nothing panics on bad input.

/// Kernel errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A tensor has the wrong shape.
    #[error("{what}: expected shape {expected}, got {actual:?}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// Unsupported dtype or a dtype mismatch.
    #[error("{what}: unsupported dtype {dtype:?} (f32, f16, bf16)")]
    DType {
        /// Which argument.
        what: &'static str,
        /// The dtype found.
        dtype: candle_core::DType,
    },
    /// A page id is outside the store.
    #[error("{what}: page {page} is out of range (store has {num_pages} pages)")]
    Page {
        /// Where the page id came from.
        what: String,
        /// The page id.
        page: u32,
        /// Store size.
        num_pages: usize,
    },
    /// Any other inconsistent argument.
    #[error("{0}")]
    Invalid(String),
    /// An error from the cache (a table the step names is gone, an unknown group).
    #[error(transparent)]
    Cache(#[from] layerkv::Error),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the kernels.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
