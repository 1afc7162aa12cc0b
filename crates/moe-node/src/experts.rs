//! Grouped experts (forward and backward) and the plain matmul.

use moe_core::activations::ActivationOptions;
use moe_core::experts::ExpertsInputs;
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi]
pub fn matmul(a: WireTensor, b: WireTensor, trans_a: Option<bool>, trans_b: Option<bool>) -> napi::Result<WireTensorOut, String> {
    guard(|| Ok(to_wire(moe_core::experts::matmul(&view("a", &a)?, &view("b", &b)?, trans_a.unwrap_or(false), trans_b.unwrap_or(false))?)))
}

/// The views of a grouped-experts call: the same names in errors as every other backend.
#[allow(clippy::too_many_arguments)]
fn inputs<'a>(
    x: &'a WireTensor,
    c: &'a WireTensor,
    w1: &'a WireTensor,
    w1_name: &str,
    w2: &'a WireTensor,
    p: &'a Option<WireTensor>,
    b1: &'a Option<WireTensor>,
    b2: &'a Option<WireTensor>,
) -> moe_core::Result<ExpertsInputs<'a>> {
    Ok(ExpertsInputs {
        tokens: view("permutedTokens", x)?,
        tokens_per_expert: view("tokensPerExpert", c)?,
        gate_and_up: view(if w1_name == "upProjs" { "upProjs" } else { "gateAndUpProjs" }, w1)?,
        down: view("downProjs", w2)?,
        probs: opt_view("permutedProbs", p)?,
        gate_up_bias: opt_view("gateUpProjBias", b1)?,
        down_bias: opt_view("downProjBias", b2)?,
    })
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn experts_forward(
    permuted_tokens: WireTensor,
    tokens_per_expert: WireTensor,
    gate_and_up_projs: WireTensor,
    gate_and_up_name: String,
    down_projs: WireTensor,
    kind: Option<String>,
    permuted_probs: Option<WireTensor>,
    gate_up_proj_bias: Option<WireTensor>,
    down_proj_bias: Option<WireTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<WireTensorOut, String> {
    guard(|| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let inputs = inputs(&permuted_tokens, &tokens_per_expert, &gate_and_up_projs, &gate_and_up_name, &down_projs, &permuted_probs, &gate_up_proj_bias, &down_proj_bias)?;
        Ok(to_wire(moe_core::experts::experts_forward(&inputs, &options)?))
    })
}

#[napi(object)]
pub struct ExpertsGradsOut {
    pub grad_tokens: WireTensorOut,
    pub grad_gate_and_up_projs: WireTensorOut,
    pub grad_down_projs: WireTensorOut,
    pub grad_gate_up_proj_bias: Option<WireTensorOut>,
    pub grad_down_proj_bias: Option<WireTensorOut>,
    pub grad_probs: Option<WireTensorOut>,
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    grad_output: WireTensor,
    permuted_tokens: WireTensor,
    tokens_per_expert: WireTensor,
    gate_and_up_projs: WireTensor,
    gate_and_up_name: String,
    down_projs: WireTensor,
    kind: Option<String>,
    permuted_probs: Option<WireTensor>,
    gate_up_proj_bias: Option<WireTensor>,
    down_proj_bias: Option<WireTensor>,
    alpha: Option<f64>,
    limit: Option<f64>,
    linear_offset: Option<f64>,
) -> napi::Result<ExpertsGradsOut, String> {
    guard(|| {
        let options = ActivationOptions::from_args(kind.as_deref(), alpha, limit, linear_offset)?;
        let g = view("gradOutput", &grad_output)?;
        let inputs = inputs(&permuted_tokens, &tokens_per_expert, &gate_and_up_projs, &gate_and_up_name, &down_projs, &permuted_probs, &gate_up_proj_bias, &down_proj_bias)?;
        let out = moe_core::experts::experts_backward(&g, &inputs, &options)?;
        Ok(ExpertsGradsOut {
            grad_tokens: to_wire(out.grad_tokens),
            grad_gate_and_up_projs: to_wire(out.grad_gate_and_up),
            grad_down_projs: to_wire(out.grad_down),
            grad_gate_up_proj_bias: out.grad_gate_up_bias.map(to_wire),
            grad_down_proj_bias: out.grad_down_bias.map(to_wire),
            grad_probs: out.grad_probs.map(to_wire),
        })
    })
}
