//! The CUDA backend's functions: `cudaInfo()`, the device tensor class, and one function per
//! GPU op and tensor kind with the op's positional arguments: `cudaPermute` (host tensors:
//! `moe_cuda::host`, an upload around the device entry) and `cudaPermuteDevice` (device tensors:
//! `moe_cuda::device_ops`). Only conversions here. Argument errors are the core's (same class,
//! same message as the CPU backend); CUDA failures (out of memory, launch failures, NVRTC
//! errors) are `Error`s, which the facade prefixes with the op's name.

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
    CudaInfo {
        available: false,
        reason: Some(reason),
        device: None,
        compute_capability: None,
        driver_version: None,
        total_memory: None,
        kernels: None,
    }
}

/// Runs a CUDA op: core errors keep their class, CUDA errors become `Error`s, panics are
/// caught by `guard`.
pub(crate) fn run<T>(f: impl FnOnce(&Device) -> moe_cuda::Result<T>) -> napi::Result<T, String> {
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
        let options =
            PermuteOptions { num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?, drop_and_pad: drop_and_pad.unwrap_or(false) };
        let out = moe_cuda::host::permute(
            dev,
            &view("tokens", &tokens)?,
            &view("routingMap", &routing_map)?,
            opt_view("probs", &probs)?.as_ref(),
            options,
        )?;
        Ok(out.into())
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
        let out = moe_cuda::host::unpermute(
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

// ---------------------------------------------------------------------------------------
// Device tensors

use moe_core::routing::RouteOptions;
use moe_cuda::device_ops::{self, DevicePermuted};
use moe_cuda::DeviceTensor;

use crate::routing::{RouteOut, TopKValuesOut};

/// A tensor in GPU memory (the facade wraps it as `DeviceTensor`). Its memory is freed by
/// `dispose()`, or when the object is garbage-collected; after `dispose()` every use is an
/// error that says so.
#[napi]
pub struct CudaTensor {
    inner: Option<DeviceTensor>,
    dtype: String,
    shape: Vec<f64>,
}

impl CudaTensor {
    pub(crate) fn wrap(t: DeviceTensor) -> CudaTensor {
        CudaTensor { dtype: t.dtype.name().to_string(), shape: t.shape.iter().map(|&d| d as f64).collect(), inner: Some(t) }
    }

    /// The tensor, or an error naming the argument when it was disposed.
    pub(crate) fn get(&self, arg: &str) -> moe_cuda::Result<&DeviceTensor> {
        self.inner.as_ref().ok_or_else(|| {
            moe_cuda::Error::Core(moe_core::Error::type_error(
                arg,
                "a device tensor that is not disposed",
                "one whose dispose() was called",
            ))
        })
    }
}

pub(crate) fn opt_get<'a>(t: &'a Option<&CudaTensor>, arg: &str) -> moe_cuda::Result<Option<&'a DeviceTensor>> {
    t.map(|t| t.get(arg)).transpose()
}

#[napi]
impl CudaTensor {
    #[napi(getter)]
    pub fn dtype(&self) -> String {
        self.dtype.clone()
    }

    #[napi(getter)]
    pub fn shape(&self) -> Vec<f64> {
        self.shape.clone()
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.is_none()
    }

    /// Bytes of GPU memory held (0 once disposed).
    #[napi(getter)]
    pub fn byte_length(&self) -> f64 {
        self.inner.as_ref().map_or(0.0, |t| t.bytes() as f64)
    }

    /// Copies the tensor to the host (waits for the kernels that write it).
    #[napi]
    pub fn download(&self) -> napi::Result<WireTensorOut, String> {
        run(|dev| Ok(to_wire(self.get("tensor")?.download(dev, "the device tensor")?)))
    }

    /// Frees the GPU memory now (idempotent).
    #[napi]
    pub fn dispose(&mut self) {
        self.inner = None;
    }
}

/// Copies a host tensor to the GPU. `name` names it in errors.
#[napi]
pub fn cuda_upload(tensor: WireTensor) -> napi::Result<CudaTensor, String> {
    run(|dev| Ok(CudaTensor::wrap(DeviceTensor::upload(dev, &view("tensor", &tensor)?)?)))
}

/// Waits for every queued kernel.
#[napi]
pub fn cuda_synchronize() -> napi::Result<(), String> {
    run(|dev| dev.synchronize("cudaSynchronize"))
}

#[napi(object, object_from_js = false)]
pub struct DevicePermuteOut {
    pub permuted_tokens: CudaTensor,
    pub permuted_probs: Option<CudaTensor>,
    pub sorted_indices: CudaTensor,
    pub tokens_per_expert: CudaTensor,
}

/// `permute` on device tensors (the plan is built on the GPU).
#[napi]
pub fn cuda_permute_device(
    tokens: &CudaTensor,
    routing_map: &CudaTensor,
    probs: Option<&CudaTensor>,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> napi::Result<DevicePermuteOut, String> {
    run(|dev| {
        let options =
            PermuteOptions { num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?, drop_and_pad: drop_and_pad.unwrap_or(false) };
        let DevicePermuted { permuted_tokens, permuted_probs, sorted_indices, tokens_per_expert } =
            device_ops::permute_device(dev, tokens.get("tokens")?, routing_map.get("routingMap")?, opt_get(&probs, "probs")?, options)?;
        Ok(DevicePermuteOut {
            permuted_tokens: CudaTensor::wrap(permuted_tokens),
            permuted_probs: permuted_probs.map(CudaTensor::wrap),
            sorted_indices: CudaTensor::wrap(sorted_indices),
            tokens_per_expert: CudaTensor::wrap(tokens_per_expert),
        })
    })
}

/// `unpermute` on device tensors.
#[napi]
pub fn cuda_unpermute_device(
    permuted_tokens: &CudaTensor,
    sorted_indices: &CudaTensor,
    restore_shape: Vec<f64>,
    probs: Option<&CudaTensor>,
    routing_map: Option<&CudaTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let restore = moe_core::permute::restore_shape_arg(&restore_shape)?;
        let out = device_ops::unpermute_device(
            dev,
            permuted_tokens.get("permutedTokens")?,
            sorted_indices.get("sortedIndices")?,
            restore,
            opt_get(&probs, "probs")?,
            opt_get(&routing_map, "routingMap")?,
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(CudaTensor::wrap(out))
    })
}

/// `route` on the GPU for host tensors (same positional arguments as `route`).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn cuda_route(
    logits: WireTensor,
    topk: f64,
    score_function: Option<String>,
    softmax_before_topk: Option<bool>,
    expert_bias: Option<WireTensor>,
    num_groups: Option<f64>,
    topk_groups: Option<f64>,
    norm_topk_prob: Option<bool>,
    route_scale: Option<f64>,
    token_mask: Option<WireTensor>,
) -> napi::Result<RouteOut, String> {
    run(|dev| {
        let options = RouteOptions::from_args(
            topk,
            score_function.as_deref(),
            softmax_before_topk,
            num_groups,
            topk_groups,
            norm_topk_prob,
            route_scale,
        )?;
        let out = moe_cuda::host::route(
            dev,
            &view("logits", &logits)?,
            opt_view("expertBias", &expert_bias)?.as_ref(),
            opt_view("tokenMask", &token_mask)?.as_ref(),
            options,
        )?;
        Ok(out.into())
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceRouteOut {
    pub weights: CudaTensor,
    pub indices: CudaTensor,
    pub scores: CudaTensor,
    pub tokens_per_expert: CudaTensor,
}

/// `route` on device tensors (one fused kernel).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn cuda_route_device(
    logits: &CudaTensor,
    topk: f64,
    score_function: Option<String>,
    softmax_before_topk: Option<bool>,
    expert_bias: Option<&CudaTensor>,
    num_groups: Option<f64>,
    topk_groups: Option<f64>,
    norm_topk_prob: Option<bool>,
    route_scale: Option<f64>,
    token_mask: Option<&CudaTensor>,
) -> napi::Result<DeviceRouteOut, String> {
    run(|dev| {
        let options = RouteOptions::from_args(
            topk,
            score_function.as_deref(),
            softmax_before_topk,
            num_groups,
            topk_groups,
            norm_topk_prob,
            route_scale,
        )?;
        let out = device_ops::route_device(
            dev,
            logits.get("logits")?,
            opt_get(&expert_bias, "expertBias")?,
            opt_get(&token_mask, "tokenMask")?,
            options,
        )?;
        Ok(DeviceRouteOut {
            weights: CudaTensor::wrap(out.weights),
            indices: CudaTensor::wrap(out.indices),
            scores: CudaTensor::wrap(out.scores),
            tokens_per_expert: CudaTensor::wrap(out.tokens_per_expert),
        })
    })
}

/// `topk` on the GPU for host tensors.
#[napi]
pub fn cuda_topk(values: WireTensor, k: f64) -> napi::Result<TopKValuesOut, String> {
    run(|dev| {
        let out = moe_cuda::host::topk(dev, &view("values", &values)?, moe_core::error::size_arg("k", k)?)?;
        Ok(out.into())
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceTopKOut {
    pub values: CudaTensor,
    pub indices: CudaTensor,
}

/// `topk` on device tensors.
#[napi]
pub fn cuda_topk_device(values: &CudaTensor, k: f64) -> napi::Result<DeviceTopKOut, String> {
    run(|dev| {
        let (v, i) = device_ops::topk_device(dev, values.get("values")?, moe_core::error::size_arg("k", k)?)?;
        Ok(DeviceTopKOut { values: CudaTensor::wrap(v), indices: CudaTensor::wrap(i) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DevicePermuteGradsOut {
    pub grad_tokens: CudaTensor,
    pub grad_probs: Option<CudaTensor>,
}

/// `permuteBackward` on device tensors (gradTokens and the probs gradient on the GPU).
#[napi]
pub fn cuda_permute_backward_device(
    grad_permuted: &CudaTensor,
    sorted_indices: &CudaTensor,
    num_tokens: f64,
    grad_permuted_probs: Option<&CudaTensor>,
    routing_map: Option<&CudaTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<DevicePermuteGradsOut, String> {
    run(|dev| {
        let num_tokens = moe_core::error::size_arg("numTokens", num_tokens)?;
        let (g, p) = device_ops::permute_backward_device(
            dev,
            grad_permuted.get("gradPermuted")?,
            sorted_indices.get("sortedIndices")?,
            num_tokens,
            opt_get(&grad_permuted_probs, "gradPermutedProbs")?,
            opt_get(&routing_map, "routingMap")?,
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(DevicePermuteGradsOut { grad_tokens: CudaTensor::wrap(g), grad_probs: p.map(CudaTensor::wrap) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceUnpermuteGradsOut {
    pub grad_permuted: CudaTensor,
    pub grad_probs: Option<CudaTensor>,
}

/// `unpermuteBackward` on device tensors (with or without probs, on the GPU).
#[napi]
pub fn cuda_unpermute_backward_device(
    grad_output: &CudaTensor,
    permuted_tokens: &CudaTensor,
    sorted_indices: &CudaTensor,
    probs: Option<&CudaTensor>,
    routing_map: Option<&CudaTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<DeviceUnpermuteGradsOut, String> {
    run(|dev| {
        let (g, p) = device_ops::unpermute_backward_device(
            dev,
            grad_output.get("gradOutput")?,
            permuted_tokens.get("permutedTokens")?,
            sorted_indices.get("sortedIndices")?,
            opt_get(&probs, "probs")?,
            opt_get(&routing_map, "routingMap")?,
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(DeviceUnpermuteGradsOut { grad_permuted: CudaTensor::wrap(g), grad_probs: p.map(CudaTensor::wrap) })
    })
}

/// Device memory: what this process's device tensors and scratch buffers hold now, and the
/// driver's free and total bytes.
#[napi(object)]
pub struct CudaMemory {
    pub live_bytes: f64,
    pub live_buffers: f64,
    /// Memory the pool keeps from freed buffers for the next ones (`cudaReleaseCachedMemory`).
    pub cached_bytes: f64,
    pub free_bytes: f64,
    pub total_bytes: f64,
}

/// `cudaMemory()`: for leak checks (the soak) and for users watching memory.
#[napi]
pub fn cuda_memory() -> napi::Result<CudaMemory, String> {
    run(|dev| {
        let (free, total) = dev.memory_info()?;
        let (live_bytes, live_buffers) = moe_cuda::device::live_memory();
        let (reserved, used) = dev.pool_memory()?;
        Ok(CudaMemory {
            live_bytes: live_bytes as f64,
            live_buffers: live_buffers as f64,
            cached_bytes: reserved.saturating_sub(used) as f64,
            free_bytes: free as f64,
            total_bytes: total as f64,
        })
    })
}

/// Returns the memory pool's cached memory (freed buffers kept for the next ones) to the driver.
#[napi]
pub fn cuda_release_cached_memory() -> napi::Result<(), String> {
    run(|dev| dev.release_cached_memory())
}

/// For the overhead benchmark (test/gpu/overhead.mjs): `iters` calls of `unpermute` on device
/// tensors made from Rust in this process (no N-API, no facade), each result freed, each call
/// followed by a synchronize when `sync`; returns each call's wall time in microseconds, so that
/// the JS call's cost above the bare Rust call is measured in one process.
#[napi]
pub fn cuda_time_rust_unpermute(
    permuted_tokens: &CudaTensor,
    sorted_indices: &CudaTensor,
    restore_shape: Vec<f64>,
    probs: Option<&CudaTensor>,
    iters: u32,
    sync: bool,
) -> napi::Result<Vec<f64>, String> {
    run(|dev| {
        let restore = moe_core::permute::restore_shape_arg(&restore_shape)?;
        let (tokens, sorted, probs) =
            (permuted_tokens.get("permutedTokens")?, sorted_indices.get("sortedIndices")?, opt_get(&probs, "probs")?);
        let mut times = Vec::with_capacity(iters as usize);
        for _ in 0..iters {
            let t0 = std::time::Instant::now();
            drop(device_ops::unpermute_device(dev, tokens, sorted, restore, probs, None, UnpermuteOptions::default())?);
            if sync {
                dev.synchronize("cudaTimeRustUnpermute")?;
            }
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(times)
    })
}
