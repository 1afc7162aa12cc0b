//! Layout ops on device tensors (crates/moe-cuda/src/layout.rs): indicesToMultihot,
//! multihotToIndices, tokensPerExpert, padRoutingMap, dropTokens, sortChunksByIndex (and its
//! backward) and groupedMmSort, with the argument objects of the CPU ops (the op table's fields
//! and groups, read in its order) and device tensors.

use moe_bind::ops::DropArgs;
use moe_bind::Size;
use moe_cuda::layout::{self as gpu, DeviceSortedChunks};

use napi::bindgen_prelude::Int32Array;

use crate::cuda::{run, CudaTensor, Device, DeviceOut};

/// A chunk sort's result under its op's keys.
fn chunks(out: DeviceSortedChunks, [output, probs]: [&'static str; 2]) -> DeviceOut {
    DeviceOut::default().with(output, out.output).with(probs, out.probs)
}

cuda_fns! {
    /// `indicesToMultihot` on device tensors.
    cudaIndicesToMultihotDevice(indices: Device, probs: Device, numExperts: Size) -> DeviceOut |dev| {
        let out = gpu::indices_to_multihot_device(dev, &indices, &probs, numExperts)?;
        Ok(device_out!(routingMap: out.routing_map, probs: out.probs))
    }
    /// `multihotToIndices` on device tensors.
    cudaMultihotToIndicesDevice(routingMap: Device, probs: Option<Device>, topk: Option<Size>) -> DeviceOut |dev| {
        let out = gpu::multihot_to_indices_device(dev, &routingMap, probs.as_deref(), topk)?;
        Ok(device_out!(indices: out.indices, probs: out.probs))
    }
    /// `tokensPerExpert` on device tensors.
    cudaTokensPerExpertDevice(routingMap: Device) -> CudaTensor |dev| {
        Ok(CudaTensor::wrap(gpu::tokens_per_expert_device(dev, &routingMap)?))
    }
    /// `padRoutingMap` on device tensors.
    cudaPadRoutingMapDevice(padMultiple: Size, routingMap: Device) -> CudaTensor |dev| {
        Ok(CudaTensor::wrap(gpu::pad_routing_map_device(dev, &routingMap, padMultiple)?))
    }
    /// `dropTokens` on device tensors.
    cudaDropTokensDevice(options: DropArgs, probs: Device, routingMap: Device) -> DeviceOut |dev| {
        let out = gpu::drop_tokens_device(dev, &probs, &routingMap, options)?;
        Ok(device_out!(routingMap: out.routing_map, probs: out.probs, capacity: out.capacity))
    }
    /// `sortChunksByIndex` on device tensors.
    cudaSortChunksByIndexDevice(input: Device, splitSizes: Device, sortedIdxs: Device, probs: Option<Device>) -> DeviceOut |dev| {
        let out = gpu::sort_chunks_by_index_device(dev, &input, &splitSizes, &sortedIdxs, probs.as_deref())?;
        Ok(chunks(out, ["output", "probs"]))
    }
    /// `sortChunksByIndexBackward` on device tensors.
    cudaSortChunksByIndexBackwardDevice(gradOutput: Device, splitSizes: Device, sortedIdxs: Device, gradProbs: Option<Device>) -> DeviceOut |dev| {
        let out = gpu::sort_chunks_by_index_backward_device(dev, &gradOutput, &splitSizes, &sortedIdxs, gradProbs.as_deref())?;
        Ok(chunks(out, ["gradInput", "gradProbs"]))
    }
    /// `groupedMmSort` on device tensors.
    cudaGroupedMmSortDevice(indices: Device, weights: Device, tokenMask: Option<Device>, numLocalExperts: Size, expertsStartIdx: Option<Size>) -> DeviceOut |dev| {
        let out = gpu::grouped_mm_sort_device(dev, &indices, &weights, tokenMask.as_deref(), numLocalExperts, expertsStartIdx.unwrap_or(0))?;
        Ok(device_out!(
            sortedTokenIds: out.sorted_token_ids, sortedSlotIds: out.sorted_slot_ids, sortedWeights: out.sorted_weights,
            tokensPerExpert: out.tokens_per_expert, offsets: out.offsets,
        ))
    }
}

/// What `cudaEpSendPlan` returns (moe_cuda::layout::ep_send_plan_device).
#[napi_derive::napi(object, object_from_js = false)]
pub struct EpSendPlanOut {
    pub send_map: CudaTensor,
    pub send_counts: Vec<i32>,
    pub pick_counts: Vec<i32>,
    pub bad_picks: bool,
}

/// Expert parallelism's send plan on the GPU (ts/ep.ts dispatch): the `[T, N]` map of the ranks
/// each token goes to and each rank's token and pick counts (one synchronisation).
#[napi_derive::napi]
pub fn cuda_ep_send_plan(indices: &CudaTensor, owner: Int32Array, num_ranks: f64) -> napi::Result<EpSendPlanOut, String> {
    run(|dev| {
        let n = moe_core::error::size_arg("numRanks", num_ranks)?;
        let plan = gpu::ep_send_plan_device(dev, indices.get("indices")?, &owner, n)?;
        Ok(EpSendPlanOut {
            send_map: CudaTensor::wrap(plan.send_map),
            send_counts: plan.send_counts,
            pick_counts: plan.pick_counts,
            bad_picks: plan.bad_picks,
        })
    })
}

/// What `cudaEpRankExtras` returns.
#[napi_derive::napi(object, object_from_js = false)]
pub struct EpRankExtrasOut {
    pub local: CudaTensor,
    pub weights: CudaTensor,
}

/// The picks and weights that travel with each sent row (moe_cuda::layout::ep_rank_extras_device).
#[napi_derive::napi]
pub fn cuda_ep_rank_extras(
    sorted: &CudaTensor,
    indices: &CudaTensor,
    weights: &CudaTensor,
    owner: Int32Array,
) -> napi::Result<EpRankExtrasOut, String> {
    run(|dev| {
        let (local, w) = gpu::ep_rank_extras_device(dev, sorted.get("sorted")?, indices.get("indices")?, weights.get("weights")?, &owner)?;
        Ok(EpRankExtrasOut { local: CudaTensor::wrap(local), weights: CudaTensor::wrap(w) })
    })
}
