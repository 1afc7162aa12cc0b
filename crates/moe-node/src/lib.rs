//! N-API binding of moe-core. Each exported function converts its wire tensors into
//! `TensorRef`s, calls exactly one core function, and converts the result back; one file
//! per op family, mirroring the core's modules. Errors leave with `code` set to the
//! JavaScript class they should become ("TypeError", "RangeError" or "Error"); the
//! TypeScript facade rethrows them as such.

mod activations;
mod checkpoint;
mod cuda;
mod cuda_activations;
mod cuda_experts;
mod cuda_layout;
mod dispatch;
mod experts;
mod layout;
mod routing;
mod wire;

use napi_derive::napi;

/// Worker threads the native backend uses for large inputs.
#[napi]
pub fn num_threads() -> u32 {
    moe_core::num_threads() as u32
}
