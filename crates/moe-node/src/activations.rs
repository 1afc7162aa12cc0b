//! Expert activations (swiglu, quick_geglu, swiglu_oai, swiglu_clamped, relu2), forward and backward.

use moe_core::activations::ActivationOptions;
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi]
pub fn activation(
    x: WireTensor,
    kind: Option<String>,
    probs: Option<WireTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<WireTensorOut, String> {
    guard(|| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let out = moe_core::activations::activation(&view("x", &x)?, opt_view("probs", &probs)?.as_ref(), &options)?;
        Ok(to_wire(out))
    })
}

#[napi(object)]
pub struct ActivationGradsOut {
    pub grad_input: WireTensorOut,
    pub grad_probs: Option<WireTensorOut>,
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn activation_backward(
    grad: WireTensor,
    x: WireTensor,
    kind: Option<String>,
    probs: Option<WireTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<ActivationGradsOut, String> {
    guard(|| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let out = moe_core::activations::activation_backward(&view("grad", &grad)?, &view("x", &x)?, opt_view("probs", &probs)?.as_ref(), &options)?;
        Ok(ActivationGradsOut { grad_input: to_wire(out.grad_input), grad_probs: out.grad_probs.map(to_wire) })
    })
}
