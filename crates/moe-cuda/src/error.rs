//! Errors of the CUDA backend: the core's own errors (bad arguments, reported exactly as the
//! CPU backends report them), CUDA being unavailable here, and failing CUDA calls.

use cudarc::driver::DriverError;
use cudarc::nvrtc::result::NvrtcError;
use moe_core::ErrorKind;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument the core rejected: same class and message as on the CPU backends.
    Core(moe_core::Error),
    /// CUDA cannot run here: no driver library, no device, no NVRTC. The reason.
    Unavailable(String),
    /// A CUDA call failed: out of memory, a launch failure, a compile error. What was being done, and the error.
    Cuda(String),
}

impl Error {
    /// The JavaScript class this error becomes (the core's choice for `Core`, else `Error`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(e) => e.kind(),
            Error::Unavailable(_) | Error::Cuda(_) => ErrorKind::Error,
        }
    }

    /// A failed driver call: `what` was being done.
    pub fn driver(what: impl std::fmt::Display, e: DriverError) -> Error {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if text.is_empty() {
            Error::Cuda(format!("{what}: {name}"))
        } else {
            Error::Cuda(format!("{what}: {text} ({name})"))
        }
    }

    pub fn nvrtc(what: impl std::fmt::Display, e: NvrtcError) -> Error {
        Error::Cuda(format!("{what}: NVRTC error {:?}", e.0))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Core(e) => write!(f, "{e}"),
            Error::Unavailable(reason) => write!(f, "CUDA is unavailable: {reason}"),
            Error::Cuda(message) => write!(f, "CUDA: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<moe_core::Error> for Error {
    fn from(e: moe_core::Error) -> Self {
        Error::Core(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
