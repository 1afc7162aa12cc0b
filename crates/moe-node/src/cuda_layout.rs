//! Layout ops on device tensors (crates/moe-cuda/src/layout.rs): indicesToMultihot,
//! multihotToIndices, tokensPerExpert, padRoutingMap, dropTokens, sortChunksByIndex (and its
//! backward) and groupedMmSort, with the positional arguments of the host bindings
//! (dispatch.rs, layout.rs). Scalar options are read first, by the core's own functions, then
//! the tensors: the same error order as the host bindings.

use moe_core::capacity::{DropOptions, DropPolicy};
use moe_core::error::{opt_size_arg, size_arg};
use moe_cuda::layout as gpu;
use napi_derive::napi;

use crate::cuda::{opt_get, run, CudaTensor};

#[napi(object, object_from_js = false)]
pub struct DeviceMultihotOut {
    pub routing_map: CudaTensor,
    pub probs: CudaTensor,
}

/// `indicesToMultihot` on device tensors (same positional arguments as `indicesToMultihot`).
#[napi]
pub fn cuda_indices_to_multihot_device(
    indices: &CudaTensor,
    probs: &CudaTensor,
    num_experts: f64,
) -> napi::Result<DeviceMultihotOut, String> {
    run(|dev| {
        let num_experts = size_arg("numExperts", num_experts)?;
        let out = gpu::indices_to_multihot_device(dev, indices.get("indices")?, probs.get("probs")?, num_experts)?;
        Ok(DeviceMultihotOut { routing_map: CudaTensor::wrap(out.routing_map), probs: CudaTensor::wrap(out.probs) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceIndicesOut {
    pub indices: CudaTensor,
    pub probs: CudaTensor,
}

/// `multihotToIndices` on device tensors (same positional arguments as `multihotToIndices`).
#[napi]
pub fn cuda_multihot_to_indices_device(
    routing_map: &CudaTensor,
    probs: Option<&CudaTensor>,
    topk: Option<f64>,
) -> napi::Result<DeviceIndicesOut, String> {
    run(|dev| {
        let topk = opt_size_arg("topk", topk)?;
        let out = gpu::multihot_to_indices_device(dev, routing_map.get("routingMap")?, opt_get(&probs, "probs")?, topk)?;
        Ok(DeviceIndicesOut { indices: CudaTensor::wrap(out.indices), probs: CudaTensor::wrap(out.probs) })
    })
}

/// `tokensPerExpert` on device tensors.
#[napi]
pub fn cuda_tokens_per_expert_device(routing_map: &CudaTensor) -> napi::Result<CudaTensor, String> {
    run(|dev| Ok(CudaTensor::wrap(gpu::tokens_per_expert_device(dev, routing_map.get("routingMap")?)?)))
}

/// `padRoutingMap` on device tensors (same positional arguments as `padRoutingMap`).
#[napi]
pub fn cuda_pad_routing_map_device(routing_map: &CudaTensor, pad_multiple: f64) -> napi::Result<CudaTensor, String> {
    run(|dev| {
        let pad_multiple = size_arg("padMultiple", pad_multiple)?;
        Ok(CudaTensor::wrap(gpu::pad_routing_map_device(dev, routing_map.get("routingMap")?, pad_multiple)?))
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceDroppedOut {
    pub routing_map: CudaTensor,
    pub probs: CudaTensor,
    pub capacity: f64,
}

/// `dropTokens` on device tensors (same positional arguments as `dropTokens`).
#[napi]
pub fn cuda_drop_tokens_device(
    probs: &CudaTensor,
    routing_map: &CudaTensor,
    topk: f64,
    capacity_factor: f64,
    drop_policy: Option<String>,
    pad_to_capacity: Option<bool>,
) -> napi::Result<DeviceDroppedOut, String> {
    run(|dev| {
        let options = DropOptions {
            topk: size_arg("topk", topk)?,
            capacity_factor,
            drop_policy: DropPolicy::parse(drop_policy.as_deref())?,
            pad_to_capacity: pad_to_capacity.unwrap_or(false),
        };
        let out = gpu::drop_tokens_device(dev, probs.get("probs")?, routing_map.get("routingMap")?, options)?;
        Ok(DeviceDroppedOut {
            routing_map: CudaTensor::wrap(out.routing_map),
            probs: CudaTensor::wrap(out.probs),
            capacity: out.capacity as f64,
        })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceSortedChunksOut {
    pub output: CudaTensor,
    pub probs: Option<CudaTensor>,
}

/// `sortChunksByIndex` on device tensors (same positional arguments as `sortChunksByIndex`).
#[napi]
pub fn cuda_sort_chunks_by_index_device(
    input: &CudaTensor,
    split_sizes: &CudaTensor,
    sorted_idxs: &CudaTensor,
    probs: Option<&CudaTensor>,
) -> napi::Result<DeviceSortedChunksOut, String> {
    run(|dev| {
        let out = gpu::sort_chunks_by_index_device(
            dev,
            input.get("input")?,
            split_sizes.get("splitSizes")?,
            sorted_idxs.get("sortedIdxs")?,
            opt_get(&probs, "probs")?,
        )?;
        Ok(DeviceSortedChunksOut { output: CudaTensor::wrap(out.output), probs: out.probs.map(CudaTensor::wrap) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceChunkGradsOut {
    pub grad_input: CudaTensor,
    pub grad_probs: Option<CudaTensor>,
}

/// `sortChunksByIndexBackward` on device tensors (same positional arguments as `sortChunksByIndexBackward`).
#[napi]
pub fn cuda_sort_chunks_by_index_backward_device(
    grad_output: &CudaTensor,
    split_sizes: &CudaTensor,
    sorted_idxs: &CudaTensor,
    grad_probs: Option<&CudaTensor>,
) -> napi::Result<DeviceChunkGradsOut, String> {
    run(|dev| {
        let out = gpu::sort_chunks_by_index_backward_device(
            dev,
            grad_output.get("gradOutput")?,
            split_sizes.get("splitSizes")?,
            sorted_idxs.get("sortedIdxs")?,
            opt_get(&grad_probs, "gradProbs")?,
        )?;
        Ok(DeviceChunkGradsOut { grad_input: CudaTensor::wrap(out.output), grad_probs: out.probs.map(CudaTensor::wrap) })
    })
}

#[napi(object, object_from_js = false)]
pub struct DeviceGroupedSortOut {
    pub sorted_token_ids: CudaTensor,
    pub sorted_slot_ids: CudaTensor,
    pub sorted_weights: CudaTensor,
    pub tokens_per_expert: CudaTensor,
    pub offsets: CudaTensor,
}

/// `groupedMmSort` on device tensors (same positional arguments as `groupedMmSort`).
#[napi]
pub fn cuda_grouped_mm_sort_device(
    indices: &CudaTensor,
    weights: &CudaTensor,
    token_mask: Option<&CudaTensor>,
    num_local_experts: f64,
    experts_start_idx: Option<f64>,
) -> napi::Result<DeviceGroupedSortOut, String> {
    run(|dev| {
        // the host binding's order: tensors, then the sizes
        let (indices, weights, token_mask) = (indices.get("indices")?, weights.get("weights")?, opt_get(&token_mask, "tokenMask")?);
        let num_local_experts = size_arg("numLocalExperts", num_local_experts)?;
        let experts_start_idx = opt_size_arg("expertsStartIdx", experts_start_idx)?.unwrap_or(0);
        let out = gpu::grouped_mm_sort_device(dev, indices, weights, token_mask, num_local_experts, experts_start_idx)?;
        Ok(DeviceGroupedSortOut {
            sorted_token_ids: CudaTensor::wrap(out.sorted_token_ids),
            sorted_slot_ids: CudaTensor::wrap(out.sorted_slot_ids),
            sorted_weights: CudaTensor::wrap(out.sorted_weights),
            tokens_per_expert: CudaTensor::wrap(out.tokens_per_expert),
            offsets: CudaTensor::wrap(out.offsets),
        })
    })
}
