//! Errors raised by the kernels. The bindings map them onto Python exceptions.

use std::fmt;

/// A kernel failure that the caller can act on.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// An argument has the wrong shape, size or value (maps to `ValueError`).
    InvalidArgument { arg: &'static str, msg: String },
    /// The caller asked the computation to stop (maps to `KeyboardInterrupt`).
    Interrupted,
    /// A numerical failure, such as a covariance that is not positive definite.
    Numerical(String),
}

impl KernelError {
    pub fn invalid(arg: &'static str, msg: impl Into<String>) -> Self {
        KernelError::InvalidArgument {
            arg,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::InvalidArgument { arg, msg } => write!(f, "{arg}: {msg}"),
            KernelError::Interrupted => write!(f, "interrupted"),
            KernelError::Numerical(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for KernelError {}

pub type KernelResult<T> = Result<T, KernelError>;
