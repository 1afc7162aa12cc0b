//! moe-cuda: the CUDA backend of moe-dispatch.
//!
//! cudarc opens libcuda.so.1 and libnvrtc.so.13 at run time (`dynamic-loading`), so this
//! crate builds with no CUDA installed; where there is no driver, [`Device::open`] returns
//! [`Error::Unavailable`] with the reason instead of crashing. Kernels are CUDA C in this
//! crate's `kernels/*.cu` (see [`compile`]).
//!
//! One GPU entry per op, on device tensors ([`device_ops`], and the families [`activations`],
//! [`layout`], [`experts`]); host tensors are upload -> that entry -> download ([`host`]).
//! Arguments are checked by moe-core's check function of the op, which returns the sizes the
//! kernels take; where a check fails or a kernel flags an invalid value, the entry runs the core
//! on the host, so errors read exactly as on the CPU backends. Results match the core bit for bit.

pub mod activations;
pub mod blas;
pub mod blaslt;
pub mod compile;
pub mod device;
pub mod device_ops;
pub mod error;
pub mod experts;
pub mod experts_grouped;
pub mod grouped_gemm;
pub mod host;
pub mod layout;
pub mod nccl;
pub mod permute;
mod switch;
pub mod tensor;
pub mod timeline;
pub mod train;

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
