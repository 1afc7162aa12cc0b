//! The CUDA backend's training functions: routeBackward on device tensors, the optimizer state,
//! AdamW, and the conversions a trainer needs (float32 masters, zeros). Conversions only: the
//! work is `moe_cuda::train` and `moe_cuda::device_ops::route_backward_device`.

use moe_core::routing::RouteOptions;
use moe_core::tensor::DType;
use moe_cuda::train::{self, AdamWOptions, AdamWParam};
use moe_cuda::DeviceTensor;
use napi::bindgen_prelude::ClassInstance;
use napi_derive::napi;

use crate::cuda::{run, CudaTensor};

fn get<'a>(t: &'a ClassInstance<'_, CudaTensor>, arg: &str) -> moe_cuda::Result<&'a DeviceTensor> {
    t.get(arg)
}

fn opt<'a>(t: &'a Option<ClassInstance<'_, CudaTensor>>, arg: &str) -> moe_cuda::Result<Option<&'a DeviceTensor>> {
    t.as_ref().map(|t| t.get(arg)).transpose()
}

/// `cudaRouteBackwardDevice`'s argument object: routeBackward's tensors and route's options.
#[napi(object, object_to_js = false)]
pub struct RouteBackwardDeviceArgs<'a> {
    pub grad_weights: ClassInstance<'a, CudaTensor>,
    pub logits: ClassInstance<'a, CudaTensor>,
    pub indices: ClassInstance<'a, CudaTensor>,
    pub grad_scores: Option<ClassInstance<'a, CudaTensor>>,
    pub expert_bias: Option<ClassInstance<'a, CudaTensor>>,
    pub token_mask: Option<ClassInstance<'a, CudaTensor>>,
    pub topk: f64,
    pub score_function: Option<String>,
    pub softmax_before_topk: Option<bool>,
    pub num_groups: Option<f64>,
    pub topk_groups: Option<f64>,
    pub norm_topk_prob: Option<bool>,
    pub route_scale: Option<f64>,
}

/// routeBackward on device tensors (kernels/routing.cu): `gradLogits [T, E]` float32.
#[napi]
pub fn cuda_route_backward_device(args: RouteBackwardDeviceArgs) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let a = &args;
        let options = RouteOptions::from_args(
            a.topk,
            a.score_function.as_deref(),
            a.softmax_before_topk,
            a.num_groups,
            a.topk_groups,
            a.norm_topk_prob,
            a.route_scale,
        )?;
        let g = moe_cuda::device_ops::route_backward_device(
            dev,
            get(&a.grad_weights, "gradWeights")?,
            get(&a.logits, "logits")?,
            get(&a.indices, "indices")?,
            opt(&a.grad_scores, "gradScores")?,
            opt(&a.expert_bias, "expertBias")?,
            opt(&a.token_mask, "tokenMask")?,
            options,
        )?;
        Ok(CudaTensor::wrap(g))
    })
}

/// A fresh optimizer state on the GPU (float32 [32]: moe_cuda::train's words).
#[napi]
pub fn cuda_optimizer_state() -> napi::Result<CudaTensor, String> {
    run(|dev| Ok(CudaTensor::wrap(train::optimizer_state(dev)?)))
}

/// What `cudaReadOptimizerState` returns.
#[napi(object, object_from_js = false)]
pub struct OptimizerStateView {
    pub step: f64,
    pub skipped: f64,
    pub grad_norm: f64,
    pub applied: bool,
}

/// Waits for the GPU and reads an optimizer state.
#[napi]
pub fn cuda_read_optimizer_state(state: &CudaTensor) -> napi::Result<OptimizerStateView, String> {
    run(|dev| {
        let v = train::read_state(dev, state.get("state")?)?;
        Ok(OptimizerStateView { step: v.step, skipped: v.skipped, grad_norm: v.grad_norm, applied: v.applied })
    })
}

/// `tensor` converted to `dtype` (float32 <-> bfloat16 / float16; exact widening, rounded narrowing).
#[napi]
pub fn cuda_cast(tensor: &CudaTensor, dtype: String) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let d = DType::parse("cast", &dtype)?;
        Ok(CudaTensor::wrap(train::cast(dev, tensor.get("tensor")?, d)?))
    })
}

/// Float32 zeros of `shape`.
#[napi]
pub fn cuda_zeros(shape: Vec<f64>) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let dims = shape.iter().map(|&d| moe_core::error::size_arg("shape", d)).collect::<moe_core::Result<Vec<usize>>>()?;
        Ok(CudaTensor::wrap(train::zeros_f32(dev, "zeros", dims)?))
    })
}

/// One parameter of `cudaAdamwStep`.
#[napi(object, object_to_js = false)]
pub struct AdamWParamArg<'a> {
    /// How errors name it (e.g. "grads.routerWeight").
    pub name: String,
    pub master: ClassInstance<'a, CudaTensor>,
    pub exp_avg: ClassInstance<'a, CudaTensor>,
    pub exp_avg_sq: ClassInstance<'a, CudaTensor>,
    pub grad: ClassInstance<'a, CudaTensor>,
    pub low: Option<ClassInstance<'a, CudaTensor>>,
    pub decay: bool,
}

/// `cudaAdamwStep`'s argument object.
#[napi(object, object_to_js = false)]
pub struct AdamWStepArgs<'a> {
    pub params: Vec<AdamWParamArg<'a>>,
    pub state: ClassInstance<'a, CudaTensor>,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

/// Queues one AdamW step (moe_cuda::train::adamw_step); nothing waits for the GPU.
#[napi]
pub fn cuda_adamw_step(args: AdamWStepArgs) -> napi::Result<(), String> {
    run(|dev| {
        let params = args
            .params
            .iter()
            .map(|p| {
                Ok(AdamWParam {
                    name: &p.name,
                    master: get(&p.master, "master")?,
                    exp_avg: get(&p.exp_avg, "expAvg")?,
                    exp_avg_sq: get(&p.exp_avg_sq, "expAvgSq")?,
                    grad: get(&p.grad, &p.name)?,
                    low: opt(&p.low, "low")?,
                    decay: p.decay,
                })
            })
            .collect::<moe_cuda::Result<Vec<_>>>()?;
        let o = AdamWOptions {
            lr: args.lr,
            beta1: args.beta1,
            beta2: args.beta2,
            eps: args.eps,
            weight_decay: args.weight_decay,
            max_grad_norm: args.max_grad_norm,
        };
        train::adamw_step(dev, &params, get(&args.state, "state")?, &o)
    })
}

/// MoELayer's router logits from the float32 GEMM result (moe_cuda::train::logits_epilogue).
#[napi]
pub fn cuda_logits_epilogue(raw: &CudaTensor, bias: Option<&CudaTensor>, round_to: String) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let r = DType::parse("roundTo", &round_to)?;
        Ok(CudaTensor::wrap(train::logits_epilogue(dev, raw.get("raw")?, crate::cuda::opt_get(&bias, "bias")?, r)?))
    })
}

/// `dtype(f32((a + b) + c))` element by element in float64 (moe_cuda::train::add3).
#[napi]
pub fn cuda_add3(a: &CudaTensor, b: &CudaTensor, c: Option<&CudaTensor>, dtype: String) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let d = DType::parse("add", &dtype)?;
        Ok(CudaTensor::wrap(train::add3(dev, a.get("a")?, b.get("b")?, crate::cuda::opt_get(&c, "c")?, d)?))
    })
}

/// Column sums in float64, rounded to `dtype` (moe_cuda::train::column_sums).
#[napi]
pub fn cuda_column_sums(g: &CudaTensor, dtype: String) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let d = DType::parse("columnSums", &dtype)?;
        Ok(CudaTensor::wrap(train::column_sums(dev, g.get("g")?, d)?))
    })
}

/// `out [T, k] = dense[t, indices[t, j]]` (moe_cuda::train::gather_picks).
#[napi]
pub fn cuda_gather_picks(dense: &CudaTensor, indices: &CudaTensor) -> napi::Result<CudaTensor, String> {
    run(|dev| Ok(CudaTensor::wrap(train::gather_picks(dev, dense.get("dense")?, indices.get("indices")?)?)))
}

/// What `cudaTransfers` returns: the copies between host and device memory so far.
#[napi(object, object_from_js = false)]
pub struct Transfers {
    pub to_device_calls: f64,
    pub to_device_bytes: f64,
    pub to_host_calls: f64,
    pub to_host_bytes: f64,
    /// The host's waits for the GPU (read-backs and synchronize calls).
    pub synchronizations: f64,
}

/// Every copy between host and device memory this process made so far (moe_cuda::device::transfers).
#[napi]
pub fn cuda_transfers() -> Transfers {
    let [(dc, db), (hc, hb)] = moe_cuda::device::transfers();
    let synchronizations = moe_cuda::device::synchronizations() as f64;
    Transfers {
        to_device_calls: dc as f64,
        to_device_bytes: db as f64,
        to_host_calls: hc as f64,
        to_host_bytes: hb as f64,
        synchronizations,
    }
}

/// The most device memory this process's tensors held at once since the last reset; `reset`
/// starts a new peak at what is held now (as torch.cuda.max_memory_allocated / reset_peak_memory_stats).
#[napi]
pub fn cuda_peak_memory(reset: Option<bool>) -> f64 {
    let peak = moe_cuda::device::peak_memory() as f64;
    if reset == Some(true) {
        moe_cuda::device::reset_peak_memory();
    }
    peak
}

/// What `cudaMseLoss` returns.
#[napi(object, object_from_js = false)]
pub struct MseOut {
    pub loss: f64,
    pub grad: CudaTensor,
}

/// The mean squared error and its gradient (moe_cuda::train::mse_loss).
#[napi]
pub fn cuda_mse_loss(y: &CudaTensor, target: &CudaTensor) -> napi::Result<MseOut, String> {
    run(|dev| {
        let (loss, grad) = train::mse_loss(dev, y.get("y")?, target.get("target")?)?;
        Ok(MseOut { loss, grad: CudaTensor::wrap(grad) })
    })
}

/// `a @ b` with a float32 result (moe_cuda::train::matmul_f32_out).
#[napi]
pub fn cuda_matmul_f32_out(
    a: &CudaTensor,
    b: &CudaTensor,
    trans_a: Option<bool>,
    trans_b: Option<bool>,
) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        Ok(CudaTensor::wrap(train::matmul_f32_out(dev, a.get("a")?, b.get("b")?, trans_a.unwrap_or(false), trans_b.unwrap_or(false))?))
    })
}

/// `a @ b` of a float32 and a bfloat16 operand, float32 result (moe_cuda::train::matmul_mixed);
/// with `addend`, `addend.dtype(addend + a @ b)` (moe_cuda::train::matmul_mixed_plus).
#[napi]
pub fn cuda_matmul_mixed(
    a: &CudaTensor,
    b: &CudaTensor,
    trans_a: Option<bool>,
    trans_b: Option<bool>,
    addend: Option<&CudaTensor>,
) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let addend = addend.map(|c| c.get("addend")).transpose()?;
        Ok(CudaTensor::wrap(train::matmul_mixed_plus(
            dev,
            a.get("a")?,
            b.get("b")?,
            trans_a.unwrap_or(false),
            trans_b.unwrap_or(false),
            addend,
        )?))
    })
}

/// What `cudaSharedGateForward` returns.
#[napi(object, object_from_js = false)]
pub struct SharedGateOut {
    pub gate_logits: CudaTensor,
    pub contribution: CudaTensor,
}

/// The shared expert's sigmoid gate, forward (moe_cuda::train::shared_gate_forward).
#[napi]
pub fn cuda_shared_gate_forward(raw: &CudaTensor, out: &CudaTensor) -> napi::Result<SharedGateOut, String> {
    run(|dev| {
        let (gl, c) = train::shared_gate_forward(dev, raw.get("raw")?, out.get("out")?)?;
        Ok(SharedGateOut { gate_logits: CudaTensor::wrap(gl), contribution: CudaTensor::wrap(c) })
    })
}

/// What `cudaSharedGateBackward` returns.
#[napi(object, object_from_js = false)]
pub struct SharedGateGrads {
    pub grad_out: CudaTensor,
    pub grad_gate_logits: CudaTensor,
}

/// The gate's backward (moe_cuda::train::shared_gate_backward).
#[napi]
pub fn cuda_shared_gate_backward(g: &CudaTensor, out: &CudaTensor, gate_logits: &CudaTensor) -> napi::Result<SharedGateGrads, String> {
    run(|dev| {
        let (go, dgl) = train::shared_gate_backward(dev, g.get("g")?, out.get("out")?, gate_logits.get("gateLogits")?)?;
        Ok(SharedGateGrads { grad_out: CudaTensor::wrap(go), grad_gate_logits: CudaTensor::wrap(dgl) })
    })
}
