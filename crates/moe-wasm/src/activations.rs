//! Expert activations (swiglu, quick_geglu, swiglu_oai, swiglu_clamped, relu2), forward and backward.

use moe_core::activations::ActivationOptions;
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

#[wasm_bindgen]
pub fn activation(
    x: JsValue,
    kind: Option<String>,
    probs: JsValue,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> Result<JsValue, JsValue> {
    let x = Wire::read("x", &x)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let run = || {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        moe_core::activations::activation(&x.view()?, opt_view(&probs)?.as_ref(), &options)
    };
    run().map(tensor_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = activationBackward)]
#[allow(clippy::too_many_arguments)]
pub fn activation_backward(
    grad: JsValue,
    x: JsValue,
    kind: Option<String>,
    probs: JsValue,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> Result<JsValue, JsValue> {
    let grad = Wire::read("grad", &grad)?;
    let x = Wire::read("x", &x)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let run = || {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        moe_core::activations::activation_backward(&grad.view()?, &x.view()?, opt_view(&probs)?.as_ref(), &options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("gradInput", tensor_to_js(out.grad_input)),
        ("gradProbs", out.grad_probs.map_or(JsValue::UNDEFINED, tensor_to_js)),
    ]))
}
