//! The grouped experts and matmul on device tensors (crates/moe-cuda/src/experts.rs): the
//! positional arguments of `expertsForward` / `expertsBackward` / `matmul` (experts.rs), with
//! `CudaTensor` handles for the tensors.

use moe_core::activations::ActivationOptions;
use moe_cuda::experts::{self, DeviceExpertsInputs, SavedRef};
use napi_derive::napi;

use crate::cuda::{opt_get, run, CudaTensor};

#[allow(clippy::too_many_arguments)]
fn inputs<'a>(
    x: &'a CudaTensor,
    c: &'a CudaTensor,
    w1: &'a CudaTensor,
    w1_name: &str,
    w2: &'a CudaTensor,
    p: &'a Option<&CudaTensor>,
    b1: &'a Option<&CudaTensor>,
    b2: &'a Option<&CudaTensor>,
) -> moe_cuda::Result<DeviceExpertsInputs<'a>> {
    let name = if w1_name == "upProjs" { "upProjs" } else { "gateAndUpProjs" };
    Ok(DeviceExpertsInputs {
        tokens: x.get("permutedTokens")?,
        tokens_per_expert: c.get("tokensPerExpert")?,
        gate_and_up: w1.get(name)?,
        gate_and_up_name: name,
        down: w2.get("downProjs")?,
        probs: opt_get(p, "permutedProbs")?,
        gate_up_bias: opt_get(b1, "gateUpProjBias")?,
        down_bias: opt_get(b2, "downProjBias")?,
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceExpertsForwardOut {
    pub output: CudaTensor,
    /// With saveForBackward: the up-projection and the weighted activation.
    pub up_projection: Option<CudaTensor>,
    pub activation: Option<CudaTensor>,
}

/// `expertsForward` on device tensors (cuBLAS GEMMs per expert).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn cuda_experts_forward_device(
    permuted_tokens: &CudaTensor,
    tokens_per_expert: &CudaTensor,
    gate_and_up_projs: &CudaTensor,
    gate_and_up_name: String,
    down_projs: &CudaTensor,
    kind: Option<String>,
    permuted_probs: Option<&CudaTensor>,
    gate_up_proj_bias: Option<&CudaTensor>,
    down_proj_bias: Option<&CudaTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
    save_for_backward: Option<bool>,
) -> napi::Result<DeviceExpertsForwardOut, String> {
    run(|dev| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let inp = inputs(
            permuted_tokens,
            tokens_per_expert,
            gate_and_up_projs,
            &gate_and_up_name,
            down_projs,
            &permuted_probs,
            &gate_up_proj_bias,
            &down_proj_bias,
        )?;
        let (out, saved) = experts::experts_forward_device_saving(dev, &inp, &options, save_for_backward.unwrap_or(false))?;
        let (up, act) = match saved {
            Some(s) => (Some(CudaTensor::wrap(s.up_projection)), Some(CudaTensor::wrap(s.activation))),
            None => (None, None),
        };
        Ok(DeviceExpertsForwardOut { output: CudaTensor::wrap(out), up_projection: up, activation: act })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceExpertsGradsOut {
    pub grad_tokens: CudaTensor,
    pub grad_gate_and_up_projs: CudaTensor,
    pub grad_down_projs: CudaTensor,
    pub grad_gate_up_proj_bias: Option<CudaTensor>,
    pub grad_down_proj_bias: Option<CudaTensor>,
    pub grad_probs: Option<CudaTensor>,
}

/// `expertsBackward` on device tensors.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn cuda_experts_backward_device(
    grad_output: &CudaTensor,
    permuted_tokens: &CudaTensor,
    tokens_per_expert: &CudaTensor,
    gate_and_up_projs: &CudaTensor,
    gate_and_up_name: String,
    down_projs: &CudaTensor,
    kind: Option<String>,
    permuted_probs: Option<&CudaTensor>,
    gate_up_proj_bias: Option<&CudaTensor>,
    down_proj_bias: Option<&CudaTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
    saved_up_projection: Option<&CudaTensor>,
    saved_activation: Option<&CudaTensor>,
) -> napi::Result<DeviceExpertsGradsOut, String> {
    run(|dev| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let inp = inputs(
            permuted_tokens,
            tokens_per_expert,
            gate_and_up_projs,
            &gate_and_up_name,
            down_projs,
            &permuted_probs,
            &gate_up_proj_bias,
            &down_proj_bias,
        )?;
        let saved = match (opt_get(&saved_up_projection, "saved.upProjection")?, opt_get(&saved_activation, "saved.activation")?) {
            (Some(up_projection), Some(activation)) => Some(SavedRef { up_projection, activation }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(moe_cuda::Error::Core(moe_core::Error::type_error(
                    "saved.activation",
                    "a device tensor (saved with saved.upProjection)",
                    "undefined",
                )))
            }
            (None, Some(_)) => {
                return Err(moe_cuda::Error::Core(moe_core::Error::type_error(
                    "saved.upProjection",
                    "a device tensor (saved with saved.activation)",
                    "undefined",
                )))
            }
        };
        let out = experts::experts_backward_device_saved(dev, grad_output.get("gradOutput")?, &inp, &options, saved)?;
        Ok(DeviceExpertsGradsOut {
            grad_tokens: CudaTensor::wrap(out.grad_tokens),
            grad_gate_and_up_projs: CudaTensor::wrap(out.grad_gate_and_up),
            grad_down_projs: CudaTensor::wrap(out.grad_down),
            grad_gate_up_proj_bias: out.grad_gate_up_bias.map(CudaTensor::wrap),
            grad_down_proj_bias: out.grad_down_bias.map(CudaTensor::wrap),
            grad_probs: out.grad_probs.map(CudaTensor::wrap),
        })
    })
}

/// `matmul` on device tensors (one cuBLAS GEMM).
#[napi]
pub fn cuda_matmul_device(
    a: &CudaTensor,
    b: &CudaTensor,
    trans_a: Option<bool>,
    trans_b: Option<bool>,
) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        Ok(CudaTensor::wrap(experts::matmul_device(dev, a.get("a")?, b.get("b")?, trans_a.unwrap_or(false), trans_b.unwrap_or(false))?))
    })
}
