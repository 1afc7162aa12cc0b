//! Grouped experts (forward and backward) and the plain matmul.

use moe_core::activations::ActivationOptions;
use moe_core::experts::ExpertsInputs;
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

#[wasm_bindgen]
pub fn matmul(a: JsValue, b: JsValue, trans_a: Option<bool>, trans_b: Option<bool>) -> Result<JsValue, JsValue> {
    let a = Wire::read("a", &a)?;
    let b = Wire::read("b", &b)?;
    let run = || moe_core::experts::matmul(&a.view()?, &b.view()?, trans_a.unwrap_or(false), trans_b.unwrap_or(false));
    run().map(tensor_to_js).map_err(to_js_error)
}

/// The wire tensors of a grouped-experts call, read once.
struct Args {
    x: Wire,
    c: Wire,
    w1: Wire,
    w2: Wire,
    p: Option<Wire>,
    b1: Option<Wire>,
    b2: Option<Wire>,
}

#[allow(clippy::too_many_arguments)]
fn args(x: &JsValue, c: &JsValue, w1: &JsValue, w1_name: &str, w2: &JsValue, p: &JsValue, b1: &JsValue, b2: &JsValue) -> Result<Args, JsValue> {
    Ok(Args {
        x: Wire::read("permutedTokens", x)?,
        c: Wire::read("tokensPerExpert", c)?,
        w1: Wire::read(if w1_name == "upProjs" { "upProjs" } else { "gateAndUpProjs" }, w1)?,
        w2: Wire::read("downProjs", w2)?,
        p: Wire::read_opt("permutedProbs", p)?,
        b1: Wire::read_opt("gateUpProjBias", b1)?,
        b2: Wire::read_opt("downProjBias", b2)?,
    })
}

impl Args {
    fn inputs(&self) -> moe_core::Result<ExpertsInputs<'_>> {
        Ok(ExpertsInputs {
            tokens: self.x.view()?,
            tokens_per_expert: self.c.view()?,
            gate_and_up: self.w1.view()?,
            down: self.w2.view()?,
            probs: opt_view(&self.p)?,
            gate_up_bias: opt_view(&self.b1)?,
            down_bias: opt_view(&self.b2)?,
        })
    }
}

#[wasm_bindgen(js_name = expertsForward)]
#[allow(clippy::too_many_arguments)]
pub fn experts_forward(
    permuted_tokens: JsValue,
    tokens_per_expert: JsValue,
    gate_and_up_projs: JsValue,
    gate_and_up_name: String,
    down_projs: JsValue,
    kind: Option<String>,
    permuted_probs: JsValue,
    gate_up_proj_bias: JsValue,
    down_proj_bias: JsValue,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> Result<JsValue, JsValue> {
    let a = args(&permuted_tokens, &tokens_per_expert, &gate_and_up_projs, &gate_and_up_name, &down_projs, &permuted_probs, &gate_up_proj_bias, &down_proj_bias)?;
    let run = || {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let inputs = a.inputs()?;
        moe_core::experts::experts_forward(&inputs, &options)
    };
    run().map(tensor_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = expertsBackward)]
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    grad_output: JsValue,
    permuted_tokens: JsValue,
    tokens_per_expert: JsValue,
    gate_and_up_projs: JsValue,
    gate_and_up_name: String,
    down_projs: JsValue,
    kind: Option<String>,
    permuted_probs: JsValue,
    gate_up_proj_bias: JsValue,
    down_proj_bias: JsValue,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> Result<JsValue, JsValue> {
    let g = Wire::read("gradOutput", &grad_output)?;
    let a = args(&permuted_tokens, &tokens_per_expert, &gate_and_up_projs, &gate_and_up_name, &down_projs, &permuted_probs, &gate_up_proj_bias, &down_proj_bias)?;
    let run = || {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let inputs = a.inputs()?;
        moe_core::experts::experts_backward(&g.view()?, &inputs, &options)
    };
    let out = run().map_err(to_js_error)?;
    let opt = |t: Option<moe_core::Tensor>| t.map_or(JsValue::UNDEFINED, tensor_to_js);
    Ok(object(vec![
        ("gradTokens", tensor_to_js(out.grad_tokens)),
        ("gradGateAndUpProjs", tensor_to_js(out.grad_gate_and_up)),
        ("gradDownProjs", tensor_to_js(out.grad_down)),
        ("gradGateUpProjBias", opt(out.grad_gate_up_bias)),
        ("gradDownProjBias", opt(out.grad_down_bias)),
        ("gradProbs", opt(out.grad_probs)),
    ]))
}
