//! Capacity, padding, chunk sort, grouped-GEMM preparation and expert sharding.

use js_sys::Array;
use moe_core::capacity::{DropOptions, DropPolicy};
use moe_core::error::{opt_size_arg, size_arg};
use moe_core::sharding::{mesh_arg, shape_arg, ExpertRange, Placed, Placement};
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

#[wasm_bindgen(js_name = getCapacity)]
pub fn get_capacity(num_tokens: f64, num_experts: f64, capacity_factor: f64, min_capacity: Option<f64>) -> Result<f64, JsValue> {
    let run = || {
        moe_core::capacity::get_capacity(
            size_arg("numTokens", num_tokens)?,
            size_arg("numExperts", num_experts)?,
            capacity_factor,
            opt_size_arg("minCapacity", min_capacity)?,
        )
    };
    run().map(|c| c as f64).map_err(to_js_error)
}

#[wasm_bindgen(js_name = dropTokens)]
pub fn drop_tokens(
    probs: JsValue,
    routing_map: JsValue,
    topk: f64,
    capacity_factor: f64,
    drop_policy: Option<String>,
    pad_to_capacity: Option<bool>,
) -> Result<JsValue, JsValue> {
    let (probs, routing_map) = (Wire::read("probs", &probs)?, Wire::read("routingMap", &routing_map)?);
    let run = || {
        let options = DropOptions {
            topk: size_arg("topk", topk)?,
            capacity_factor,
            drop_policy: DropPolicy::parse(drop_policy.as_deref())?,
            pad_to_capacity: pad_to_capacity.unwrap_or(false),
        };
        moe_core::capacity::drop_tokens(&probs.view()?, &routing_map.view()?, options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("routingMap", tensor_to_js(out.routing_map)),
        ("probs", tensor_to_js(out.probs)),
        ("capacity", JsValue::from_f64(out.capacity as f64)),
    ]))
}

#[wasm_bindgen(js_name = padRoutingMap)]
pub fn pad_routing_map(routing_map: JsValue, pad_multiple: f64) -> Result<JsValue, JsValue> {
    let routing_map = Wire::read("routingMap", &routing_map)?;
    let run = || moe_core::capacity::pad_routing_map(&routing_map.view()?, size_arg("padMultiple", pad_multiple)?);
    run().map(tensor_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = tokensPerExpert)]
pub fn tokens_per_expert(routing_map: JsValue) -> Result<JsValue, JsValue> {
    let routing_map = Wire::read("routingMap", &routing_map)?;
    let run = || moe_core::capacity::tokens_per_expert(&routing_map.view()?);
    run().map(tensor_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = sortChunksByIndex)]
pub fn sort_chunks_by_index(input: JsValue, split_sizes: JsValue, sorted_idxs: JsValue, probs: JsValue) -> Result<JsValue, JsValue> {
    let input = Wire::read("input", &input)?;
    let split_sizes = Wire::read("splitSizes", &split_sizes)?;
    let sorted_idxs = Wire::read("sortedIdxs", &sorted_idxs)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let run = || moe_core::chunks::sort_chunks_by_index(&input.view()?, &split_sizes.view()?, &sorted_idxs.view()?, opt_view(&probs)?.as_ref());
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("output", tensor_to_js(out.output)), ("probs", out.probs.map_or(JsValue::UNDEFINED, tensor_to_js))]))
}

#[wasm_bindgen(js_name = sortChunksByIndexBackward)]
pub fn sort_chunks_by_index_backward(grad_output: JsValue, split_sizes: JsValue, sorted_idxs: JsValue, grad_probs: JsValue) -> Result<JsValue, JsValue> {
    let grad_output = Wire::read("gradOutput", &grad_output)?;
    let split_sizes = Wire::read("splitSizes", &split_sizes)?;
    let sorted_idxs = Wire::read("sortedIdxs", &sorted_idxs)?;
    let grad_probs = Wire::read_opt("gradProbs", &grad_probs)?;
    let run = || {
        moe_core::chunks::sort_chunks_by_index_backward(&grad_output.view()?, &split_sizes.view()?, &sorted_idxs.view()?, opt_view(&grad_probs)?.as_ref())
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("gradInput", tensor_to_js(out.output)), ("gradProbs", out.probs.map_or(JsValue::UNDEFINED, tensor_to_js))]))
}

#[wasm_bindgen(js_name = groupedMmSort)]
pub fn grouped_mm_sort(
    indices: JsValue,
    weights: JsValue,
    token_mask: JsValue,
    num_local_experts: f64,
    experts_start_idx: Option<f64>,
) -> Result<JsValue, JsValue> {
    let indices = Wire::read("indices", &indices)?;
    let weights = Wire::read("weights", &weights)?;
    let token_mask = Wire::read_opt("tokenMask", &token_mask)?;
    let run = || {
        moe_core::grouped::grouped_mm_sort(
            &indices.view()?,
            &weights.view()?,
            opt_view(&token_mask)?.as_ref(),
            size_arg("numLocalExperts", num_local_experts)?,
            opt_size_arg("expertsStartIdx", experts_start_idx)?.unwrap_or(0),
        )
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("sortedTokenIds", tensor_to_js(out.sorted_token_ids)),
        ("sortedSlotIds", tensor_to_js(out.sorted_slot_ids)),
        ("sortedWeights", tensor_to_js(out.sorted_weights)),
        ("tokensPerExpert", tensor_to_js(out.tokens_per_expert)),
        ("offsets", tensor_to_js(out.offsets)),
    ]))
}

fn ep_args(num_experts: f64, ep_size: f64, ep_rank: f64) -> moe_core::Result<(usize, usize, usize)> {
    Ok((size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?))
}

fn range_to_js(range: ExpertRange) -> JsValue {
    object(vec![("start", JsValue::from_f64(range.start as f64)), ("end", JsValue::from_f64(range.end as f64))])
}

#[wasm_bindgen(js_name = expertRangeForRank)]
pub fn expert_range_for_rank(num_experts: f64, ep_size: f64, ep_rank: f64) -> Result<JsValue, JsValue> {
    let run = || {
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        moe_core::sharding::expert_range_for_rank(e, w, r)
    };
    run().map(range_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = shouldLoadExpert)]
pub fn should_load_expert(expert_id: f64, num_experts: f64, ep_size: f64, ep_rank: f64) -> Result<bool, JsValue> {
    let run = || {
        let expert_id = size_arg("expertId", expert_id)?;
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        moe_core::sharding::should_load_expert(expert_id, e, w, r)
    };
    run().map_err(to_js_error)
}

#[wasm_bindgen(js_name = splitExpertWeights)]
pub fn split_expert_weights(stacked: JsValue, num_experts: f64, ep_size: f64, ep_rank: f64) -> Result<JsValue, JsValue> {
    let stacked = Wire::read("stacked", &stacked)?;
    let run = || {
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        moe_core::sharding::split_expert_weights(&stacked.view()?, e, w, r)
    };
    let parts = run().map_err(to_js_error)?;
    let out: Array = parts
        .into_iter()
        .map(|(id, t)| object(vec![("expertId", JsValue::from_f64(id as f64)), ("tensor", tensor_to_js(t))]))
        .collect();
    Ok(out.into())
}

#[wasm_bindgen(js_name = validateExpertSharding)]
pub fn validate_expert_sharding(
    shape: Vec<f64>,
    num_experts: f64,
    ep_size: f64,
    ep_rank: f64,
    name: Option<String>,
    placement: Option<String>,
) -> Result<JsValue, JsValue> {
    let run = || {
        let name = name.unwrap_or_else(|| "tensor".into());
        let shape = shape_arg(&format!("{name}.shape"), &shape)?;
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        let placement = placement.map(|p| Placement::parse("placement", &p)).transpose()?;
        moe_core::sharding::validate_expert_sharding(&shape, e, w, r, &name, placement)
    };
    run().map(range_to_js).map_err(to_js_error)
}

fn strings(items: impl IntoIterator<Item = String>) -> JsValue {
    items.into_iter().map(|s| JsValue::from_str(&s)).collect::<Array>().into()
}

fn placed_to_js(p: Placed) -> JsValue {
    let sizes: Array = p.mesh.iter().map(|a| JsValue::from_f64(a.size as f64)).collect();
    object(vec![
        ("axisNames", strings(p.mesh.iter().map(|a| a.name.clone()))),
        ("axisSizes", sizes.into()),
        ("placements", strings(p.placements.iter().map(|p| p.name()))),
    ])
}

#[wasm_bindgen(js_name = expertPlacements)]
pub fn expert_placements(axis_names: Vec<String>, axis_sizes: Vec<f64>) -> Result<JsValue, JsValue> {
    let run = || moe_core::sharding::expert_placements(&mesh_arg(&axis_names, &axis_sizes)?);
    run().map(placed_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = splitPlacements)]
pub fn split_placements(axis_names: Vec<String>, axis_sizes: Vec<f64>, placements: Vec<String>) -> Result<JsValue, JsValue> {
    let run = || {
        let mesh = mesh_arg(&axis_names, &axis_sizes)?;
        moe_core::sharding::split_placements(&mesh, &moe_core::sharding::placements_arg(&placements)?)
    };
    run().map(|p| p.map_or(JsValue::NULL, placed_to_js)).map_err(to_js_error)
}
