//! Grouped experts (forward and backward) and the plain matmul.

use moe_core::activations::ActivationOptions;
use moe_core::experts::ExpertsInputs;
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi]
pub fn matmul(a: WireTensor, b: WireTensor, trans_a: Option<bool>, trans_b: Option<bool>) -> napi::Result<WireTensorOut, String> {
    guard(|| Ok(to_wire(moe_core::experts::matmul(&view("a", &a)?, &view("b", &b)?, trans_a.unwrap_or(false), trans_b.unwrap_or(false))?)))
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
        let (x, c, w1, w2) = (
            view("permutedTokens", &permuted_tokens)?,
            view("tokensPerExpert", &tokens_per_expert)?,
            view(if gate_and_up_name == "upProjs" { "upProjs" } else { "gateAndUpProjs" }, &gate_and_up_projs)?,
            view("downProjs", &down_projs)?,
        );
        let (p, b1, b2) = (opt_view("permutedProbs", &permuted_probs)?, opt_view("gateUpProjBias", &gate_up_proj_bias)?, opt_view("downProjBias", &down_proj_bias)?);
        let inputs = ExpertsInputs { tokens: &x, tokens_per_expert: &c, gate_and_up: &w1, down: &w2, probs: p.as_ref(), gate_up_bias: b1.as_ref(), down_bias: b2.as_ref() };
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
        let (g, x, c, w1, w2) = (
            view("gradOutput", &grad_output)?,
            view("permutedTokens", &permuted_tokens)?,
            view("tokensPerExpert", &tokens_per_expert)?,
            view(if gate_and_up_name == "upProjs" { "upProjs" } else { "gateAndUpProjs" }, &gate_and_up_projs)?,
            view("downProjs", &down_projs)?,
        );
        let (p, b1, b2) = (opt_view("permutedProbs", &permuted_probs)?, opt_view("gateUpProjBias", &gate_up_proj_bias)?, opt_view("downProjBias", &down_proj_bias)?);
        let inputs = ExpertsInputs { tokens: &x, tokens_per_expert: &c, gate_and_up: &w1, down: &w2, probs: p.as_ref(), gate_up_bias: b1.as_ref(), down_bias: b2.as_ref() };
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
