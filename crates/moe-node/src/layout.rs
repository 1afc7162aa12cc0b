//! Capacity, padding, chunk sort, grouped-GEMM preparation and expert sharding.

use moe_core::capacity::{DropOptions, DropPolicy};
use moe_core::error::{opt_size_arg, size_arg};
use moe_core::sharding::{mesh_arg, shape_arg, MeshAxis, Placed, Placement};
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi]
pub fn get_capacity(num_tokens: f64, num_experts: f64, capacity_factor: f64, min_capacity: Option<f64>) -> napi::Result<f64, String> {
    guard(|| {
        let capacity = moe_core::capacity::get_capacity(
            size_arg("numTokens", num_tokens)?,
            size_arg("numExperts", num_experts)?,
            capacity_factor,
            opt_size_arg("minCapacity", min_capacity)?,
        )?;
        Ok(capacity as f64)
    })
}

#[napi(object)]
pub struct DroppedOut {
    pub routing_map: WireTensorOut,
    pub probs: WireTensorOut,
    pub capacity: f64,
}

#[napi]
pub fn drop_tokens(
    probs: WireTensor,
    routing_map: WireTensor,
    topk: f64,
    capacity_factor: f64,
    drop_policy: Option<String>,
    pad_to_capacity: Option<bool>,
) -> napi::Result<DroppedOut, String> {
    guard(|| {
        let options = DropOptions {
            topk: size_arg("topk", topk)?,
            capacity_factor,
            drop_policy: DropPolicy::parse(drop_policy.as_deref())?,
            pad_to_capacity: pad_to_capacity.unwrap_or(false),
        };
        let out = moe_core::capacity::drop_tokens(&view("probs", &probs)?, &view("routingMap", &routing_map)?, options)?;
        Ok(DroppedOut { routing_map: to_wire(out.routing_map), probs: to_wire(out.probs), capacity: out.capacity as f64 })
    })
}

#[napi]
pub fn pad_routing_map(routing_map: WireTensor, pad_multiple: f64) -> napi::Result<WireTensorOut, String> {
    guard(|| {
        let pad_multiple = size_arg("padMultiple", pad_multiple)?;
        Ok(to_wire(moe_core::capacity::pad_routing_map(&view("routingMap", &routing_map)?, pad_multiple)?))
    })
}

#[napi]
pub fn tokens_per_expert(routing_map: WireTensor) -> napi::Result<WireTensorOut, String> {
    guard(|| Ok(to_wire(moe_core::capacity::tokens_per_expert(&view("routingMap", &routing_map)?)?)))
}

#[napi(object)]
pub struct SortedChunksOut {
    pub output: WireTensorOut,
    pub probs: Option<WireTensorOut>,
}

#[napi]
pub fn sort_chunks_by_index(
    input: WireTensor,
    split_sizes: WireTensor,
    sorted_idxs: WireTensor,
    probs: Option<WireTensor>,
) -> napi::Result<SortedChunksOut, String> {
    guard(|| {
        let out = moe_core::chunks::sort_chunks_by_index(
            &view("input", &input)?,
            &view("splitSizes", &split_sizes)?,
            &view("sortedIdxs", &sorted_idxs)?,
            opt_view("probs", &probs)?.as_ref(),
        )?;
        Ok(SortedChunksOut { output: to_wire(out.output), probs: out.probs.map(to_wire) })
    })
}

#[napi(object)]
pub struct ChunkGradsOut {
    pub grad_input: WireTensorOut,
    pub grad_probs: Option<WireTensorOut>,
}

#[napi]
pub fn sort_chunks_by_index_backward(
    grad_output: WireTensor,
    split_sizes: WireTensor,
    sorted_idxs: WireTensor,
    grad_probs: Option<WireTensor>,
) -> napi::Result<ChunkGradsOut, String> {
    guard(|| {
        let out = moe_core::chunks::sort_chunks_by_index_backward(
            &view("gradOutput", &grad_output)?,
            &view("splitSizes", &split_sizes)?,
            &view("sortedIdxs", &sorted_idxs)?,
            opt_view("gradProbs", &grad_probs)?.as_ref(),
        )?;
        Ok(ChunkGradsOut { grad_input: to_wire(out.output), grad_probs: out.probs.map(to_wire) })
    })
}

#[napi(object)]
pub struct GroupedSortOut {
    pub sorted_token_ids: WireTensorOut,
    pub sorted_slot_ids: WireTensorOut,
    pub sorted_weights: WireTensorOut,
    pub tokens_per_expert: WireTensorOut,
    pub offsets: WireTensorOut,
}

#[napi]
pub fn grouped_mm_sort(
    indices: WireTensor,
    weights: WireTensor,
    token_mask: Option<WireTensor>,
    num_local_experts: f64,
    experts_start_idx: Option<f64>,
) -> napi::Result<GroupedSortOut, String> {
    guard(|| {
        let out = moe_core::grouped::grouped_mm_sort(
            &view("indices", &indices)?,
            &view("weights", &weights)?,
            opt_view("tokenMask", &token_mask)?.as_ref(),
            size_arg("numLocalExperts", num_local_experts)?,
            opt_size_arg("expertsStartIdx", experts_start_idx)?.unwrap_or(0),
        )?;
        Ok(GroupedSortOut {
            sorted_token_ids: to_wire(out.sorted_token_ids),
            sorted_slot_ids: to_wire(out.sorted_slot_ids),
            sorted_weights: to_wire(out.sorted_weights),
            tokens_per_expert: to_wire(out.tokens_per_expert),
            offsets: to_wire(out.offsets),
        })
    })
}

#[napi(object)]
pub struct ExpertRangeOut {
    pub start: f64,
    pub end: f64,
}

fn ep_args(num_experts: f64, ep_size: f64, ep_rank: f64) -> moe_core::Result<(usize, usize, usize)> {
    Ok((size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?))
}

#[napi]
pub fn expert_range_for_rank(num_experts: f64, ep_size: f64, ep_rank: f64) -> napi::Result<ExpertRangeOut, String> {
    guard(|| {
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        let range = moe_core::sharding::expert_range_for_rank(e, w, r)?;
        Ok(ExpertRangeOut { start: range.start as f64, end: range.end as f64 })
    })
}

#[napi]
pub fn should_load_expert(expert_id: f64, num_experts: f64, ep_size: f64, ep_rank: f64) -> napi::Result<bool, String> {
    guard(|| {
        let expert_id = size_arg("expertId", expert_id)?;
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        moe_core::sharding::should_load_expert(expert_id, e, w, r)
    })
}

#[napi(object)]
pub struct ExpertTensorOut {
    pub expert_id: f64,
    pub tensor: WireTensorOut,
}

#[napi]
pub fn split_expert_weights(stacked: WireTensor, num_experts: f64, ep_size: f64, ep_rank: f64) -> napi::Result<Vec<ExpertTensorOut>, String> {
    guard(|| {
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        let parts = moe_core::sharding::split_expert_weights(&view("stacked", &stacked)?, e, w, r)?;
        Ok(parts.into_iter().map(|(id, t)| ExpertTensorOut { expert_id: id as f64, tensor: to_wire(t) }).collect())
    })
}

#[napi]
pub fn validate_expert_sharding(
    shape: Vec<f64>,
    num_experts: f64,
    ep_size: f64,
    ep_rank: f64,
    name: Option<String>,
    placement: Option<String>,
) -> napi::Result<ExpertRangeOut, String> {
    guard(|| {
        let name = name.unwrap_or_else(|| "tensor".into());
        let shape = shape_arg(&format!("{name}.shape"), &shape)?;
        let (e, w, r) = ep_args(num_experts, ep_size, ep_rank)?;
        let placement = placement.map(|p| Placement::parse("placement", &p)).transpose()?;
        let range = moe_core::sharding::validate_expert_sharding(&shape, e, w, r, &name, placement)?;
        Ok(ExpertRangeOut { start: range.start as f64, end: range.end as f64 })
    })
}

#[napi(object)]
pub struct PlacedOut {
    pub axis_names: Vec<String>,
    pub axis_sizes: Vec<f64>,
    pub placements: Vec<String>,
}

fn placed_out(p: Placed) -> PlacedOut {
    PlacedOut {
        axis_names: p.mesh.iter().map(|a: &MeshAxis| a.name.clone()).collect(),
        axis_sizes: p.mesh.iter().map(|a| a.size as f64).collect(),
        placements: p.placements.iter().map(|p| p.name()).collect(),
    }
}

#[napi]
pub fn expert_placements(axis_names: Vec<String>, axis_sizes: Vec<f64>) -> napi::Result<PlacedOut, String> {
    guard(|| Ok(placed_out(moe_core::sharding::expert_placements(&mesh_arg(&axis_names, &axis_sizes)?)?)))
}

#[napi]
pub fn split_placements(axis_names: Vec<String>, axis_sizes: Vec<f64>, placements: Vec<String>) -> napi::Result<Option<PlacedOut>, String> {
    guard(|| {
        let mesh = mesh_arg(&axis_names, &axis_sizes)?;
        let placements = moe_core::sharding::placements_arg(&placements)?;
        Ok(moe_core::sharding::split_placements(&mesh, &placements)?.map(placed_out))
    })
}
