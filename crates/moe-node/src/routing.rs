//! Routing (top-k selection from router logits) and the auxiliary router losses.

use moe_core::aux_loss::{SwitchLossOptions, DEFAULT_COEFF};
use moe_core::routing::RouteOptions;
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi(object)]
pub struct RouteOut {
    pub weights: WireTensorOut,
    pub indices: WireTensorOut,
    pub scores: WireTensorOut,
    pub tokens_per_expert: WireTensorOut,
}

impl From<moe_core::routing::Routed> for RouteOut {
    fn from(out: moe_core::routing::Routed) -> RouteOut {
        RouteOut { weights: to_wire(out.weights), indices: to_wire(out.indices), scores: to_wire(out.scores), tokens_per_expert: to_wire(out.tokens_per_expert) }
    }
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn route(
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
    guard(|| {
        let options = RouteOptions::from_args(topk, score_function.as_deref(), softmax_before_topk, num_groups, topk_groups, norm_topk_prob, route_scale)?;
        let out = moe_core::routing::route(
            &view("logits", &logits)?,
            opt_view("expertBias", &expert_bias)?.as_ref(),
            opt_view("tokenMask", &token_mask)?.as_ref(),
            options,
        )?;
        Ok(out.into())
    })
}

#[napi(object)]
pub struct RouteBackwardOut {
    pub grad_logits: WireTensorOut,
}

/// The gradient of `route`'s weights (and scores) with respect to its logits, given its picks:
/// route's options, in route's order, after the three tensors; `gradScores` last.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    grad_weights: WireTensor,
    logits: WireTensor,
    indices: WireTensor,
    topk: f64,
    score_function: Option<String>,
    softmax_before_topk: Option<bool>,
    expert_bias: Option<WireTensor>,
    num_groups: Option<f64>,
    topk_groups: Option<f64>,
    norm_topk_prob: Option<bool>,
    route_scale: Option<f64>,
    token_mask: Option<WireTensor>,
    grad_scores: Option<WireTensor>,
) -> napi::Result<RouteBackwardOut, String> {
    guard(|| {
        let options = RouteOptions::from_args(topk, score_function.as_deref(), softmax_before_topk, num_groups, topk_groups, norm_topk_prob, route_scale)?;
        let grad = moe_core::routing::route_backward(
            &view("gradWeights", &grad_weights)?,
            &view("logits", &logits)?,
            &view("indices", &indices)?,
            opt_view("gradScores", &grad_scores)?.as_ref(),
            opt_view("expertBias", &expert_bias)?.as_ref(),
            opt_view("tokenMask", &token_mask)?.as_ref(),
            options,
        )?;
        Ok(RouteBackwardOut { grad_logits: to_wire(grad) })
    })
}

#[napi(object)]
pub struct ProbsLossOut {
    pub loss: f64,
    pub grad_probs: WireTensorOut,
}

#[napi]
pub fn switch_load_balancing_loss(
    probs: WireTensor,
    tokens_per_expert: WireTensor,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: Option<WireTensor>,
) -> napi::Result<ProbsLossOut, String> {
    guard(|| {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        let out = moe_core::aux_loss::switch_load_balancing_loss(
            &view("probs", &probs)?,
            &view("tokensPerExpert", &tokens_per_expert)?,
            opt_view("tokenMask", &token_mask)?.as_ref(),
            options,
        )?;
        Ok(ProbsLossOut { loss: out.loss, grad_probs: to_wire(out.grad) })
    })
}

#[napi(object)]
pub struct LogitsLossOut {
    pub loss: f64,
    pub grad_logits: WireTensorOut,
}

#[napi]
pub fn switch_load_balancing_loss_from_logits(
    logits: WireTensor,
    tokens_per_expert: WireTensor,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: Option<WireTensor>,
) -> napi::Result<LogitsLossOut, String> {
    guard(|| {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        let out = moe_core::aux_loss::switch_load_balancing_loss_from_logits(
            &view("logits", &logits)?,
            &view("tokensPerExpert", &tokens_per_expert)?,
            opt_view("tokenMask", &token_mask)?.as_ref(),
            options,
        )?;
        Ok(LogitsLossOut { loss: out.loss, grad_logits: to_wire(out.grad) })
    })
}

#[napi]
pub fn z_loss(logits: WireTensor, coeff: Option<f64>, token_mask: Option<WireTensor>) -> napi::Result<LogitsLossOut, String> {
    guard(|| {
        let out = moe_core::aux_loss::z_loss(&view("logits", &logits)?, opt_view("tokenMask", &token_mask)?.as_ref(), coeff.unwrap_or(DEFAULT_COEFF))?;
        Ok(LogitsLossOut { loss: out.loss, grad_logits: to_wire(out.grad) })
    })
}

#[napi(object)]
pub struct TopKValuesOut {
    pub values: WireTensorOut,
    pub indices: WireTensorOut,
}

impl From<moe_core::routing::TopK> for TopKValuesOut {
    fn from(out: moe_core::routing::TopK) -> TopKValuesOut {
        TopKValuesOut { values: to_wire(out.values), indices: to_wire(out.indices) }
    }
}

#[napi]
pub fn topk(values: WireTensor, k: f64) -> napi::Result<TopKValuesOut, String> {
    guard(|| {
        let out = moe_core::routing::topk(&view("values", &values)?, moe_core::error::size_arg("k", k)?)?;
        Ok(out.into())
    })
}
