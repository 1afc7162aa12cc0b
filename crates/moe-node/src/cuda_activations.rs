//! Expert activations and the aux router losses on device tensors (crates/moe-cuda/src/activations.rs),
//! with the positional arguments of the host bindings (activations.rs, routing.rs). Options are
//! read first, by the core's own functions, then the tensors: the same error order as the host
//! bindings.

use moe_core::activations::ActivationOptions;
use moe_core::aux_loss::{SwitchLossOptions, DEFAULT_COEFF};
use moe_cuda::activations as gpu;
use napi_derive::napi;

use crate::cuda::{opt_get, run, CudaTensor};

/// `activation` on device tensors (same positional arguments as `activation`).
#[napi]
pub fn cuda_activation_device(
    x: &CudaTensor,
    kind: Option<String>,
    probs: Option<&CudaTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let out = gpu::activation_device(dev, x.get("x")?, opt_get(&probs, "probs")?, &options)?;
        Ok(CudaTensor::wrap(out))
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceActivationGradsOut {
    pub grad_input: CudaTensor,
    pub grad_probs: Option<CudaTensor>,
}

/// `activationBackward` on device tensors (same positional arguments as `activationBackward`).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn cuda_activation_backward_device(
    grad: &CudaTensor,
    x: &CudaTensor,
    kind: Option<String>,
    probs: Option<&CudaTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<DeviceActivationGradsOut, String> {
    run(|dev| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let (g, p) = gpu::activation_backward_device(dev, grad.get("grad")?, x.get("x")?, opt_get(&probs, "probs")?, &options)?;
        Ok(DeviceActivationGradsOut { grad_input: CudaTensor::wrap(g), grad_probs: p.map(CudaTensor::wrap) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceProbsLossOut {
    pub loss: f64,
    pub grad_probs: CudaTensor,
}

/// `switchLoadBalancingLoss` on device tensors (same positional arguments): the loss is read
/// back, the gradient stays on the GPU.
#[napi]
pub fn cuda_switch_load_balancing_loss_device(
    probs: &CudaTensor,
    tokens_per_expert: &CudaTensor,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: Option<&CudaTensor>,
) -> napi::Result<DeviceProbsLossOut, String> {
    run(|dev| {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        let (loss, grad) = gpu::switch_load_balancing_loss_device(
            dev,
            probs.get("probs")?,
            tokens_per_expert.get("tokensPerExpert")?,
            opt_get(&token_mask, "tokenMask")?,
            options,
        )?;
        Ok(DeviceProbsLossOut { loss, grad_probs: CudaTensor::wrap(grad) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceLogitsLossOut {
    pub loss: f64,
    pub grad_logits: CudaTensor,
}

/// `switchLoadBalancingLossFromLogits` on device tensors (same positional arguments).
#[napi]
pub fn cuda_switch_load_balancing_loss_from_logits_device(
    logits: &CudaTensor,
    tokens_per_expert: &CudaTensor,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: Option<&CudaTensor>,
) -> napi::Result<DeviceLogitsLossOut, String> {
    run(|dev| {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        let (loss, grad) = gpu::switch_load_balancing_loss_from_logits_device(
            dev,
            logits.get("logits")?,
            tokens_per_expert.get("tokensPerExpert")?,
            opt_get(&token_mask, "tokenMask")?,
            options,
        )?;
        Ok(DeviceLogitsLossOut { loss, grad_logits: CudaTensor::wrap(grad) })
    })
}

/// `zLoss` on device tensors (same positional arguments as `zLoss`).
#[napi]
pub fn cuda_z_loss_device(
    logits: &CudaTensor,
    coeff: Option<f64>,
    token_mask: Option<&CudaTensor>,
) -> napi::Result<DeviceLogitsLossOut, String> {
    run(|dev| {
        let (loss, grad) =
            gpu::z_loss_device(dev, logits.get("logits")?, opt_get(&token_mask, "tokenMask")?, coeff.unwrap_or(DEFAULT_COEFF))?;
        Ok(DeviceLogitsLossOut { loss, grad_logits: CudaTensor::wrap(grad) })
    })
}
