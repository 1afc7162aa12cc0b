//! moe-cuda: the CUDA backend of moe-dispatch.
//!
//! cudarc opens libcuda.so.1 and libnvrtc.so.13 at run time (`dynamic-loading`), so this
//! crate builds with no CUDA installed; where there is no driver, [`Device::open`] returns
//! [`Error::Unavailable`] with the reason instead of crashing. Kernels are CUDA C in
//! `kernels/*.cu` (see [`compile`]). Arguments are validated, and plans built, by moe-core, so
//! errors read exactly as on the CPU backends and results match the core bit for bit.

pub mod activations;
pub mod blas;
pub mod blaslt;
pub mod compile;
pub mod device;
pub mod device_ops;
pub mod error;
pub mod experts;
pub mod layout;
pub mod ops;
mod switch;
pub mod tensor;

pub use device::{Buffer, Device, DeviceInfo};
pub use error::{Error, Result};
pub use tensor::DeviceTensor;

/// Whether CUDA runs here (the process-wide device opens), and if not, why.
pub fn availability() -> std::result::Result<DeviceInfo, String> {
    match Device::global() {
        Ok(dev) => Ok(dev.info()),
        Err(Error::Unavailable(reason)) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}
