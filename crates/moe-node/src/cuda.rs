//! The CUDA backend's functions: `cudaInfo()`, the device tensor class (`CudaTensor`, the
//! `Device` argument kind, `DeviceOut` results), and one function per GPU op and tensor kind,
//! each taking the op's argument object (`cuda_fns!`: the op table's kinds and groups, so the
//! same fields, read and reported as the CPU op reads them): `cudaPermute` (host tensors:
//! `moe_cuda::host`, an upload around the device entry) and `cudaPermuteDevice` (device tensors:
//! `moe_cuda::device_ops`). Only conversions here. Argument errors are the core's (same class,
//! same message as the CPU backend); CUDA failures (out of memory, launch failures, NVRTC
//! errors) are `Error`s, which the facade prefixes with the op's name.

use moe_bind::ops::{Permuted, RouteArgs, Routed, TopK};
use moe_bind::{ArgTs, Flag, Kind, Nums, Out, Ret, Size, Tensor};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_cuda::device_ops::{self, DevicePermuted};
use moe_cuda::tensor::DeviceArg;
use moe_cuda::{Device as Gpu, DeviceTensor};
use napi::bindgen_prelude::{ClassInstance, Env, Object, ToNapiValue};
use napi::sys;
use napi_derive::napi;

use crate::wire::{guard, to_wire, view, Args, Js, WireTensor, WireTensorOut};

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
    /// Whether kernels are queued as programmatic dependent launches (Hopper and later, with
    /// `MOE_DISPATCH_PDL=on`): each may be scheduled before the one before it has finished.
    pub programmatic_launch: Option<bool>,
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
            programmatic_launch: Some(i.programmatic_launch),
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
        programmatic_launch: None,
    }
}

/// Runs a CUDA op on the process's GPU (`guarded`).
pub(crate) fn run<T>(f: impl FnOnce(&Gpu) -> moe_cuda::Result<T>) -> napi::Result<T, String> {
    guarded(|| Gpu::global().and_then(f))
}

/// Runs `f`: core errors keep their class, CUDA errors become `Error`s, panics are caught by `guard`.
pub(crate) fn guarded<T>(f: impl FnOnce() -> moe_cuda::Result<T>) -> napi::Result<T, String> {
    let out = guard(|| Ok(f()))?;
    out.map_err(|e| napi::Error::new(e.kind().js_name().to_string(), e.to_string()))
}

// ---------------------------------------------------------------------------------------
// Device tensors

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
        Ok(self.live(arg)?)
    }

    fn live(&self, arg: &str) -> moe_core::Result<&DeviceTensor> {
        self.inner.as_ref().ok_or_else(|| disposed(arg))
    }

    /// The tensor, taken out of the handle (which then reads as disposed) for a call that frees it
    /// as it goes; an error naming the argument when it was disposed.
    pub(crate) fn take(&mut self, arg: &str) -> moe_core::Result<DeviceTensor> {
        self.inner.take().ok_or_else(|| disposed(arg))
    }

    /// A tensor [`CudaTensor::take`] took, put back (the call left it).
    pub(crate) fn restore(&mut self, t: DeviceTensor) {
        self.inner = Some(t);
    }
}

fn disposed(arg: &str) -> moe_core::Error {
    moe_core::Error::type_error(arg, "a device tensor that is not disposed", "one whose dispose() was called")
}

impl CudaTensor {}

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

/// route's check of the values, read after the route kernel has run (`cudaRouteDevice` with
/// `lazyCheck`): `flagged()` waits for that kernel only, once.
#[napi]
pub struct CudaRouteCheck {
    inner: Option<device_ops::PendingRouteCheck<'static>>,
}

#[napi]
impl CudaRouteCheck {
    /// Whether the route kernel found a non-finite logit or bias (route without lazyCheck then
    /// throws the core's error). Read once: later calls are a TypeError.
    #[napi]
    pub fn flagged(&mut self) -> napi::Result<bool, String> {
        let check = self.inner.take();
        guarded(|| {
            let c = check.ok_or_else(|| moe_core::Error::type_error("check", "a route check not read yet", "one read already"))?;
            c.flagged(Gpu::global()?)
        })
    }
}

/// Copies a host tensor to the GPU. `name` names it in errors.
#[napi]
pub fn cuda_upload(tensor: WireTensor) -> napi::Result<CudaTensor, String> {
    run(|dev| Ok(CudaTensor::wrap(DeviceTensor::upload(dev, &view("tensor", &tensor)?)?)))
}

/// Whether the experts gather their rows on load (`moe_cuda::experts_grouped::gathers_on_load`).
#[napi]
pub fn cuda_experts_gather_on_load() -> napi::Result<bool, String> {
    run(|dev| Ok(moe_cuda::experts_grouped::gathers_on_load(dev)))
}

/// Waits for every queued kernel.
#[napi]
pub fn cuda_synchronize() -> napi::Result<(), String> {
    run(|dev| dev.synchronize("cudaSynchronize"))
}

/// A device tensor argument: the addon's `CudaTensor` (a disposed one is a TypeError naming the
/// argument), handed to the device entries as a `DeviceArg` (the tensor and its name).
pub struct Device;

impl ArgTs for Device {
    fn ts() -> String {
        "NativeCudaTensor".into()
    }
}

impl<'e> Kind<Args<'e>> for Device {
    type Held = ClassInstance<'e, CudaTensor>;
    type Core<'h>
        = DeviceArg<'h>
    where
        Args<'e>: 'h;
    fn read(o: &Args<'e>, key: &str) -> moe_core::Result<Option<Self::Held>> {
        o.get(key, "a device tensor (upload())")
    }
    fn core<'h>(held: &'h Self::Held, key: &'static str) -> moe_core::Result<DeviceArg<'h>>
    where
        Args<'e>: 'h,
    {
        Ok(DeviceArg { name: key, tensor: held.live(key)? })
    }
}

/// A device op's result object (`device_out!`): the keys of the op table's result (`Multihot`,
/// `ExpertsGrads`, ...), device tensors as `CudaTensor`s, numbers as numbers; an absent optional
/// tensor is left out.
#[derive(Default)]
pub struct DeviceOut(Vec<(&'static str, Field)>);

pub enum Field {
    Tensor(DeviceTensor),
    Num(f64),
    /// A host array (read back by the op, e.g. the per-expert counts), as an array of numbers.
    Ints(Vec<i32>),
    /// route's check of the values, to read later (`lazyCheck`).
    Check(device_ops::PendingRouteCheck<'static>),
}

/// A value of a device result object: a device tensor, an optional one, or a number.
pub trait IntoField {
    fn into_field(self) -> Option<Field>;
}

impl IntoField for DeviceTensor {
    fn into_field(self) -> Option<Field> {
        Some(Field::Tensor(self))
    }
}

impl IntoField for Option<DeviceTensor> {
    fn into_field(self) -> Option<Field> {
        self.map(Field::Tensor)
    }
}

impl IntoField for f64 {
    fn into_field(self) -> Option<Field> {
        Some(Field::Num(self))
    }
}

impl IntoField for Option<Vec<i32>> {
    fn into_field(self) -> Option<Field> {
        self.map(Field::Ints)
    }
}

impl IntoField for Option<device_ops::PendingRouteCheck<'static>> {
    fn into_field(self) -> Option<Field> {
        self.map(Field::Check)
    }
}

impl IntoField for usize {
    fn into_field(self) -> Option<Field> {
        Some(Field::Num(self as f64))
    }
}

impl DeviceOut {
    pub fn with(mut self, key: &'static str, v: impl IntoField) -> DeviceOut {
        self.0.extend(v.into_field().map(|f| (key, f)));
        self
    }
}

impl ToNapiValue for DeviceOut {
    unsafe fn to_napi_value(env: sys::napi_env, val: DeviceOut) -> napi::Result<sys::napi_value> {
        let mut o = Object::new(&Env::from(env))?;
        for (k, f) in val.0 {
            match f {
                Field::Tensor(t) => o.set(k, CudaTensor::wrap(t))?,
                Field::Num(n) => o.set(k, n)?,
                Field::Ints(v) => o.set(k, v)?,
                Field::Check(c) => o.set(k, CudaRouteCheck { inner: Some(c) })?,
            }
        }
        Object::to_napi_value(env, o)
    }
}

cuda_fns! {
    /// `permute` on the GPU for host tensors (permute's argument object). With caller-owned
    /// outputs it is the CPU op, which writes them (the same bits).
    cudaPermute(tokens: Tensor, routingMap: Tensor, probs: Option<Tensor>, numOutTokens: Option<Size>, dropAndPad: Flag, outPermutedTokens: Option<Out>, outPermutedProbs: Option<Out>) -> Js |dev, o| {
        if outPermutedTokens.is_some() || outPermutedProbs.is_some() {
            return Ok(Js(moe_bind::ops::permute(o)?));
        }
        let options = PermuteOptions { num_out_tokens: numOutTokens, drop_and_pad: dropAndPad };
        let out = moe_cuda::host::permute(dev, &tokens, &routingMap, probs.as_ref(), options)?;
        Ok(Js(Permuted::into_js(out.into())))
    }
    /// `unpermute` on the GPU for host tensors (unpermute's argument object). With a caller-owned
    /// output it is the CPU op, which writes it.
    cudaUnpermute(restoreShape: Nums, permutedTokens: Tensor, sortedIndices: Tensor, probs: Option<Tensor>, routingMap: Option<Tensor>, dropAndPad: Flag, out: Option<Out>) -> Js |dev, o| {
        if out.is_some() {
            return Ok(Js(moe_bind::ops::unpermute(o)?));
        }
        let restore = moe_core::permute::restore_shape_arg(restoreShape)?;
        let options = UnpermuteOptions { drop_and_pad: dropAndPad };
        let out = moe_cuda::host::unpermute(dev, &permutedTokens, &sortedIndices, restore, probs.as_ref(), routingMap.as_ref(), options)?;
        Ok(Js(Tensor::into_js(out)))
    }
    /// `route` on the GPU for host tensors (route's argument object).
    cudaRoute(options: RouteArgs, logits: Tensor, expertBias: Option<Tensor>, tokenMask: Option<Tensor>) -> Js |dev| {
        let out = moe_cuda::host::route(dev, &logits, expertBias.as_ref(), tokenMask.as_ref(), options)?;
        Ok(Js(Routed::into_js(out.into())))
    }
    /// `topk` on the GPU for host tensors.
    cudaTopk(values: Tensor, k: Size) -> Js |dev| {
        Ok(Js(TopK::into_js(moe_cuda::host::topk(dev, &values, k)?.into())))
    }
    /// `permute` on device tensors (the plan is built on the GPU).
    cudaPermuteDevice(tokens: Device, routingMap: Device, probs: Option<Device>, numOutTokens: Option<Size>, dropAndPad: Flag) -> DeviceOut |dev| {
        let options = PermuteOptions { num_out_tokens: numOutTokens, drop_and_pad: dropAndPad };
        let o: DevicePermuted = device_ops::permute_device(dev, &tokens, &routingMap, probs.as_deref(), options)?;
        Ok(device_out!(permutedTokens: o.permuted_tokens, permutedProbs: o.permuted_probs, sortedIndices: o.sorted_indices, tokensPerExpert: o.tokens_per_expert))
    }
    /// `unpermute` on device tensors.
    cudaUnpermuteDevice(restoreShape: Nums, permutedTokens: Device, sortedIndices: Device, probs: Option<Device>, routingMap: Option<Device>, dropAndPad: Flag) -> CudaTensor |dev| {
        let restore = moe_core::permute::restore_shape_arg(restoreShape)?;
        let options = UnpermuteOptions { drop_and_pad: dropAndPad };
        let out = device_ops::unpermute_device(dev, &permutedTokens, &sortedIndices, restore, probs.as_deref(), routingMap.as_deref(), options)?;
        Ok(CudaTensor::wrap(out))
    }
    /// `route` on device tensors (one fused kernel). With `lazyCheck`, the kernel's check of the
    /// values is not waited for: `check` (a `CudaRouteCheck`) reads it later, where the kernel ran.
    cudaRouteDevice(options: RouteArgs, logits: Device, expertBias: Option<Device>, tokenMask: Option<Device>, lazyCheck: Flag) -> DeviceOut |dev| {
        let (out, check) = if lazyCheck {
            device_ops::route_device_lazy(dev, &logits, expertBias.as_deref(), tokenMask.as_deref(), options)?
        } else {
            (device_ops::route_device(dev, &logits, expertBias.as_deref(), tokenMask.as_deref(), options)?, None)
        };
        Ok(device_out!(weights: out.weights, indices: out.indices, scores: out.scores, tokensPerExpert: out.tokens_per_expert, check: check))
    }
    /// `topk` on device tensors.
    cudaTopkDevice(values: Device, k: Size) -> DeviceOut |dev| {
        let (v, i) = device_ops::topk_device(dev, &values, k)?;
        Ok(device_out!(values: v, indices: i))
    }
    /// `permuteBackward` on device tensors (gradTokens and the probs gradient on the GPU).
    cudaPermuteBackwardDevice(gradPermuted: Device, sortedIndices: Device, numTokens: Size, gradPermutedProbs: Option<Device>, routingMap: Option<Device>, dropAndPad: Flag) -> DeviceOut |dev| {
        let options = UnpermuteOptions { drop_and_pad: dropAndPad };
        let (g, p) = device_ops::permute_backward_device(dev, &gradPermuted, &sortedIndices, numTokens, gradPermutedProbs.as_deref(), routingMap.as_deref(), options)?;
        Ok(device_out!(gradTokens: g, gradProbs: p))
    }
    /// `unpermuteBackward` on device tensors (with or without probs, on the GPU).
    cudaUnpermuteBackwardDevice(gradOutput: Device, permutedTokens: Device, sortedIndices: Device, probs: Option<Device>, routingMap: Option<Device>, dropAndPad: Flag) -> DeviceOut |dev| {
        let options = UnpermuteOptions { drop_and_pad: dropAndPad };
        let (g, p) = device_ops::unpermute_backward_device(dev, &gradOutput, &permutedTokens, &sortedIndices, probs.as_deref(), routingMap.as_deref(), options)?;
        Ok(device_out!(gradPermuted: g, gradProbs: p))
    }
    /// For the overhead benchmark (test/gpu/overhead.mjs): `iters` calls of `unpermute` on device
    /// tensors made from Rust in this process (no N-API, no facade), each result freed, each call
    /// followed by a synchronize when `sync`; returns each call's wall time in microseconds, so that
    /// the JS call's cost above the bare Rust call is measured in one process.
    cudaTimeRustUnpermute(restoreShape: Nums, permutedTokens: Device, sortedIndices: Device, probs: Option<Device>, iters: Size, sync: Flag) -> Vec<f64> |dev| {
        let restore = moe_core::permute::restore_shape_arg(restoreShape)?;
        let mut times = Vec::new();
        for _ in 0..iters {
            let t0 = std::time::Instant::now();
            drop(device_ops::unpermute_device(dev, &permutedTokens, &sortedIndices, restore, probs.as_deref(), None, UnpermuteOptions::default())?);
            if sync {
                dev.synchronize("cudaTimeRustUnpermute")?;
            }
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(times)
    }
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

/// One span of a timeline (`moe_cuda::timeline::Span`): ms from the timeline's start.
#[napi(object)]
pub struct CudaTimelineSpan {
    pub name: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub queued_ms: f64,
}

/// A wait of the host for the GPU, on the host's clock (ms from the timeline's start).
#[napi(object)]
pub struct CudaTimelineWait {
    pub what: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// `cudaTimelineStop()`'s result.
#[napi(object)]
pub struct CudaTimeline {
    pub spans: Vec<CudaTimelineSpan>,
    pub waits: Vec<CudaTimelineWait>,
}

/// Starts recording a timeline of the work queued on the GPU (`moe_cuda::timeline`).
#[napi]
pub fn cuda_timeline_start() -> napi::Result<(), String> {
    run(|dev| dev.timeline_start())
}

/// Stops the timeline and returns it (waits for the GPU).
#[napi]
pub fn cuda_timeline_stop() -> napi::Result<CudaTimeline, String> {
    run(|dev| {
        let t = dev.timeline_stop()?;
        Ok(CudaTimeline {
            spans: t
                .spans
                .into_iter()
                .map(|s| CudaTimelineSpan { name: s.name, start_ms: s.start_ms, end_ms: s.end_ms, queued_ms: s.queued_ms })
                .collect(),
            waits: t.waits.into_iter().map(|w| CudaTimelineWait { what: w.what, start_ms: w.start_ms, end_ms: w.end_ms }).collect(),
        })
    })
}

/// Returns the memory pool's cached memory (freed buffers kept for the next ones) to the driver.
#[napi]
pub fn cuda_release_cached_memory() -> napi::Result<(), String> {
    run(|dev| dev.release_cached_memory())
}
