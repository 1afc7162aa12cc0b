//! The CUDA backend's functions: `cudaInfo()`, and `cudaPermute` / `cudaUnpermute` with the
//! positional arguments of `permute` / `unpermute` (dispatch.rs). Tensors are host tensors for
//! now: uploaded, one kernel, downloaded. Argument errors are the core's (same class, same
//! message as the CPU backend); CUDA failures (out of memory, launch failures, NVRTC errors)
//! are `Error`s, which the facade prefixes with the op's name.

use moe_core::error::opt_size_arg;
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_cuda::Device;
use napi_derive::napi;

use crate::dispatch::PermuteOut;
use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

/// What `cudaInfo()` returns: whether the CUDA backend runs here, and why not.
#[napi(object)]
pub struct CudaInfo {
    pub available: bool,
    /// Why CUDA is unavailable (absent when available), e.g. "libcuda.so.1 not found ...".
    pub reason: Option<String>,
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub device: Option<String>,
    /// e.g. "9.0"
    pub compute_capability: Option<String>,
    /// The driver's CUDA version, e.g. "13.0".
    pub driver_version: Option<String>,
    /// Device memory in bytes.
    pub total_memory: Option<f64>,
    /// Where this process got its kernels: "disk cache", or "compiled by NVRTC in 1.20 s".
    pub kernels: Option<String>,
}

/// Opens the GPU at the first call (compiling the kernels if the disk cache has none); later
/// calls answer from memory.
#[napi]
pub fn cuda_info() -> CudaInfo {
    match guard(|| Ok(moe_cuda::availability())) {
        Ok(Ok(i)) => CudaInfo {
            available: true,
            reason: None,
            device: Some(i.name),
            compute_capability: Some(i.compute_capability),
            driver_version: Some(i.driver_version),
            total_memory: Some(i.total_memory as f64),
            kernels: Some(i.kernels),
        },
        Ok(Err(reason)) => unavailable(reason),
        Err(e) => unavailable(e.reason.clone()),
    }
}

fn unavailable(reason: String) -> CudaInfo {
    CudaInfo { available: false, reason: Some(reason), device: None, compute_capability: None, driver_version: None, total_memory: None, kernels: None }
}

/// Runs a CUDA op: core errors keep their class, CUDA errors become `Error`s, panics are
/// caught by `guard`.
fn run<T>(f: impl FnOnce(&Device) -> moe_cuda::Result<T>) -> napi::Result<T, String> {
    let out = guard(|| Ok(Device::global().and_then(f)))?;
    out.map_err(|e| napi::Error::new(e.kind().js_name().to_string(), e.to_string()))
}

/// `permute` on the GPU (same positional arguments as `permute`).
#[napi]
pub fn cuda_permute(
    tokens: WireTensor,
    routing_map: WireTensor,
    probs: Option<WireTensor>,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> napi::Result<PermuteOut, String> {
    run(|dev| {
        let options = PermuteOptions { num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?, drop_and_pad: drop_and_pad.unwrap_or(false) };
        let out = moe_cuda::ops::permute(dev, &view("tokens", &tokens)?, &view("routingMap", &routing_map)?, opt_view("probs", &probs)?.as_ref(), options)?;
        Ok(PermuteOut {
            permuted_tokens: to_wire(out.permuted_tokens),
            permuted_probs: out.permuted_probs.map(to_wire),
            sorted_indices: to_wire(out.sorted_indices),
            tokens_per_expert: to_wire(out.tokens_per_expert),
        })
    })
}

/// `unpermute` on the GPU (same positional arguments as `unpermute`).
#[napi]
pub fn cuda_unpermute(
    permuted_tokens: WireTensor,
    sorted_indices: WireTensor,
    restore_shape: Vec<f64>,
    probs: Option<WireTensor>,
    routing_map: Option<WireTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<WireTensorOut, String> {
    run(|dev| {
        let restore = moe_core::permute::restore_shape_arg(&restore_shape)?;
        let out = moe_cuda::ops::unpermute(
            dev,
            &view("permutedTokens", &permuted_tokens)?,
            &view("sortedIndices", &sorted_indices)?,
            restore,
            opt_view("probs", &probs)?.as_ref(),
            opt_view("routingMap", &routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(to_wire(out))
    })
}
