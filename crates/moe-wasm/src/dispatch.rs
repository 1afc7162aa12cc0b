//! Routing maps, permute and unpermute.

use moe_core::error::{opt_size_arg, size_arg};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

#[wasm_bindgen(js_name = indicesToMultihot)]
pub fn indices_to_multihot(indices: JsValue, probs: JsValue, num_experts: f64) -> Result<JsValue, JsValue> {
    let (indices, probs) = (Wire::read("indices", &indices)?, Wire::read("probs", &probs)?);
    let run = || {
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::routing_map::indices_to_multihot(&indices.view()?, &probs.view()?, num_experts)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("routingMap", tensor_to_js(out.routing_map)), ("probs", tensor_to_js(out.probs))]))
}

#[wasm_bindgen(js_name = multihotToIndices)]
pub fn multihot_to_indices(routing_map: JsValue, probs: JsValue, topk: Option<f64>) -> Result<JsValue, JsValue> {
    let (routing_map, probs) = (Wire::read("routingMap", &routing_map)?, Wire::read_opt("probs", &probs)?);
    let run = || {
        let topk = opt_size_arg("topk", topk)?;
        moe_core::routing_map::multihot_to_indices(&routing_map.view()?, opt_view(&probs)?.as_ref(), topk)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("indices", tensor_to_js(out.indices)), ("probs", tensor_to_js(out.probs))]))
}

#[wasm_bindgen]
pub fn permute(
    tokens: JsValue,
    routing_map: JsValue,
    probs: JsValue,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let tokens = Wire::read("tokens", &tokens)?;
    let routing_map = Wire::read("routingMap", &routing_map)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let run = || {
        let options = PermuteOptions {
            num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?,
            drop_and_pad: drop_and_pad.unwrap_or(false),
        };
        moe_core::permute::permute(&tokens.view()?, &routing_map.view()?, opt_view(&probs)?.as_ref(), options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("permutedTokens", tensor_to_js(out.permuted_tokens)),
        ("permutedProbs", out.permuted_probs.map_or(JsValue::UNDEFINED, tensor_to_js)),
        ("sortedIndices", tensor_to_js(out.sorted_indices)),
        ("tokensPerExpert", tensor_to_js(out.tokens_per_expert)),
    ]))
}

#[wasm_bindgen]
pub fn unpermute(
    permuted_tokens: JsValue,
    sorted_indices: JsValue,
    restore_shape: Vec<f64>,
    probs: JsValue,
    routing_map: JsValue,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let permuted_tokens = Wire::read("permutedTokens", &permuted_tokens)?;
    let sorted_indices = Wire::read("sortedIndices", &sorted_indices)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let routing_map = Wire::read_opt("routingMap", &routing_map)?;
    let run = || {
        moe_core::permute::unpermute(
            &permuted_tokens.view()?,
            &sorted_indices.view()?,
            moe_core::permute::restore_shape_arg(&restore_shape)?,
            opt_view(&probs)?.as_ref(),
            opt_view(&routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )
    };
    run().map(tensor_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = permuteBackward)]
pub fn permute_backward(
    grad_permuted: JsValue,
    sorted_indices: JsValue,
    num_tokens: f64,
    grad_permuted_probs: JsValue,
    routing_map: JsValue,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let grad_permuted = Wire::read("gradPermuted", &grad_permuted)?;
    let sorted_indices = Wire::read("sortedIndices", &sorted_indices)?;
    let grad_permuted_probs = Wire::read_opt("gradPermutedProbs", &grad_permuted_probs)?;
    let routing_map = Wire::read_opt("routingMap", &routing_map)?;
    let run = || {
        moe_core::permute::permute_backward(
            &grad_permuted.view()?,
            &sorted_indices.view()?,
            size_arg("numTokens", num_tokens)?,
            opt_view(&grad_permuted_probs)?.as_ref(),
            opt_view(&routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("gradTokens", tensor_to_js(out.grad_tokens)),
        ("gradProbs", out.grad_probs.map_or(JsValue::UNDEFINED, tensor_to_js)),
    ]))
}

#[wasm_bindgen(js_name = unpermuteBackward)]
pub fn unpermute_backward(
    grad_output: JsValue,
    permuted_tokens: JsValue,
    sorted_indices: JsValue,
    probs: JsValue,
    routing_map: JsValue,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let grad_output = Wire::read("gradOutput", &grad_output)?;
    let permuted_tokens = Wire::read("permutedTokens", &permuted_tokens)?;
    let sorted_indices = Wire::read("sortedIndices", &sorted_indices)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let routing_map = Wire::read_opt("routingMap", &routing_map)?;
    let run = || {
        moe_core::permute::unpermute_backward(
            &grad_output.view()?,
            &permuted_tokens.view()?,
            &sorted_indices.view()?,
            opt_view(&probs)?.as_ref(),
            opt_view(&routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("gradPermuted", tensor_to_js(out.grad_permuted)),
        ("gradProbs", out.grad_probs.map_or(JsValue::UNDEFINED, tensor_to_js)),
    ]))
}
