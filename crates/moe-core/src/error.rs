//! One error type for the whole core. Each variant maps to one JavaScript error class,
//! and every message names the argument it is about, what was expected and what was given.

/// The JavaScript error class an [`Error`] becomes at a binding boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wrong kind of value: dtype, rank, a missing companion argument.
    TypeError,
    /// Right kind, wrong value: sizes, indices out of range, non-integers.
    RangeError,
    /// A broken invariant inside the library (a bug, reported rather than aborting).
    Error,
}

impl ErrorKind {
    pub fn js_name(self) -> &'static str {
        match self {
            ErrorKind::TypeError => "TypeError",
            ErrorKind::RangeError => "RangeError",
            ErrorKind::Error => "Error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{arg}: expected {expected}, got {got}")]
    Type { arg: String, expected: String, got: String },
    #[error("{arg}: {message}")]
    Range { arg: String, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn type_error(arg: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Type { arg: arg.into(), expected: expected.into(), got: got.into() }
    }

    pub fn range(arg: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Range { arg: arg.into(), message: message.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Type { .. } => ErrorKind::TypeError,
            Error::Range { .. } => ErrorKind::RangeError,
            Error::Internal(_) => ErrorKind::Error,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Reads a JavaScript number that must be a non-negative integer (a size, a count).
/// Bindings pass sizes as `f64` so that `2.5`, `NaN` or `-1` are reported, not truncated.
pub fn size_arg(arg: &str, value: f64) -> Result<usize> {
    const MAX_SAFE: f64 = 9_007_199_254_740_991.0;
    if !value.is_finite() || value.fract() != 0.0 {
        return Err(Error::range(arg, format!("expected a non-negative integer, got {value}")));
    }
    if value < 0.0 {
        return Err(Error::range(arg, format!("expected a non-negative integer, got {value}")));
    }
    if value > MAX_SAFE || value > usize::MAX as f64 {
        return Err(Error::range(arg, format!("{value} is too large")));
    }
    Ok(value as usize)
}

/// [`size_arg`] for optional options: `None` stays `None`.
pub fn opt_size_arg(arg: &str, value: Option<f64>) -> Result<Option<usize>> {
    value.map(|v| size_arg(arg, v)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_arg_rejects_fractions_negatives_and_nan() {
        assert_eq!(size_arg("n", 3.0), Ok(3));
        for bad in [2.5, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let err = size_arg("numOutTokens", bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::RangeError);
            assert!(err.to_string().starts_with("numOutTokens:"), "{err}");
        }
    }
}
