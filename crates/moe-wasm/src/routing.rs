//! Routing (top-k selection from router logits) and the auxiliary router losses.

use moe_core::aux_loss::{SwitchLossOptions, DEFAULT_COEFF};
use moe_core::routing::RouteOptions;
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

#[wasm_bindgen]
#[allow(clippy::too_many_arguments)]
pub fn route(
    logits: JsValue,
    topk: f64,
    score_function: Option<String>,
    softmax_before_topk: Option<bool>,
    expert_bias: JsValue,
    num_groups: Option<f64>,
    topk_groups: Option<f64>,
    norm_topk_prob: Option<bool>,
    route_scale: Option<f64>,
    token_mask: JsValue,
) -> Result<JsValue, JsValue> {
    let logits = Wire::read("logits", &logits)?;
    let expert_bias = Wire::read_opt("expertBias", &expert_bias)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let run = || {
        let options = RouteOptions::from_args(topk, score_function.as_deref(), softmax_before_topk, num_groups, topk_groups, norm_topk_prob, route_scale)?;
        moe_core::routing::route(&logits.view()?, opt_view(&expert_bias)?.as_ref(), opt_view(&token_mask)?.as_ref(), options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("weights", tensor_to_js(out.weights)),
        ("indices", tensor_to_js(out.indices)),
        ("scores", tensor_to_js(out.scores)),
        ("tokensPerExpert", tensor_to_js(out.tokens_per_expert)),
    ]))
}

/// The gradient of `route`'s weights (and scores) with respect to its logits, given its picks:
/// route's options, in route's order, after the three tensors; `gradScores` last.
#[wasm_bindgen(js_name = routeBackward)]
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    grad_weights: JsValue,
    logits: JsValue,
    indices: JsValue,
    topk: f64,
    score_function: Option<String>,
    softmax_before_topk: Option<bool>,
    expert_bias: JsValue,
    num_groups: Option<f64>,
    topk_groups: Option<f64>,
    norm_topk_prob: Option<bool>,
    route_scale: Option<f64>,
    token_mask: JsValue,
    grad_scores: JsValue,
) -> Result<JsValue, JsValue> {
    let grad_weights = Wire::read("gradWeights", &grad_weights)?;
    let logits = Wire::read("logits", &logits)?;
    let indices = Wire::read("indices", &indices)?;
    let expert_bias = Wire::read_opt("expertBias", &expert_bias)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let grad_scores = Wire::read_opt("gradScores", &grad_scores)?;
    let run = || {
        let options = RouteOptions::from_args(topk, score_function.as_deref(), softmax_before_topk, num_groups, topk_groups, norm_topk_prob, route_scale)?;
        moe_core::routing::route_backward(
            &grad_weights.view()?,
            &logits.view()?,
            &indices.view()?,
            opt_view(&grad_scores)?.as_ref(),
            opt_view(&expert_bias)?.as_ref(),
            opt_view(&token_mask)?.as_ref(),
            options,
        )
    };
    let grad = run().map_err(to_js_error)?;
    Ok(object(vec![("gradLogits", tensor_to_js(grad))]))
}

#[wasm_bindgen(js_name = switchLoadBalancingLoss)]
pub fn switch_load_balancing_loss(
    probs: JsValue,
    tokens_per_expert: JsValue,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: JsValue,
) -> Result<JsValue, JsValue> {
    let probs = Wire::read("probs", &probs)?;
    let tokens_per_expert = Wire::read("tokensPerExpert", &tokens_per_expert)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let run = || {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        moe_core::aux_loss::switch_load_balancing_loss(&probs.view()?, &tokens_per_expert.view()?, opt_view(&token_mask)?.as_ref(), options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("loss", JsValue::from_f64(out.loss)), ("gradProbs", tensor_to_js(out.grad))]))
}

#[wasm_bindgen(js_name = switchLoadBalancingLossFromLogits)]
pub fn switch_load_balancing_loss_from_logits(
    logits: JsValue,
    tokens_per_expert: JsValue,
    topk: f64,
    coeff: Option<f64>,
    num_tokens: Option<f64>,
    token_mask: JsValue,
) -> Result<JsValue, JsValue> {
    let logits = Wire::read("logits", &logits)?;
    let tokens_per_expert = Wire::read("tokensPerExpert", &tokens_per_expert)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let run = || {
        let options = SwitchLossOptions::from_args(topk, coeff, num_tokens)?;
        moe_core::aux_loss::switch_load_balancing_loss_from_logits(&logits.view()?, &tokens_per_expert.view()?, opt_view(&token_mask)?.as_ref(), options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("loss", JsValue::from_f64(out.loss)), ("gradLogits", tensor_to_js(out.grad))]))
}

#[wasm_bindgen(js_name = zLoss)]
pub fn z_loss(logits: JsValue, coeff: Option<f64>, token_mask: JsValue) -> Result<JsValue, JsValue> {
    let logits = Wire::read("logits", &logits)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let run = || moe_core::aux_loss::z_loss(&logits.view()?, opt_view(&token_mask)?.as_ref(), coeff.unwrap_or(DEFAULT_COEFF));
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("loss", JsValue::from_f64(out.loss)), ("gradLogits", tensor_to_js(out.grad))]))
}

#[wasm_bindgen]
pub fn topk(values: JsValue, k: f64) -> Result<JsValue, JsValue> {
    let values = Wire::read("values", &values)?;
    let run = || moe_core::routing::topk(&values.view()?, moe_core::error::size_arg("k", k)?);
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("values", tensor_to_js(out.values)), ("indices", tensor_to_js(out.indices))]))
}
