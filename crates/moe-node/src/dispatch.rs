//! Routing maps, permute and unpermute.

use moe_core::error::{opt_size_arg, size_arg};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

#[napi(object)]
pub struct MultihotOut {
    pub routing_map: WireTensorOut,
    pub probs: WireTensorOut,
}

#[napi]
pub fn indices_to_multihot(indices: WireTensor, probs: WireTensor, num_experts: f64) -> napi::Result<MultihotOut, String> {
    guard(|| {
        let num_experts = size_arg("numExperts", num_experts)?;
        let out = moe_core::routing_map::indices_to_multihot(&view("indices", &indices)?, &view("probs", &probs)?, num_experts)?;
        Ok(MultihotOut { routing_map: to_wire(out.routing_map), probs: to_wire(out.probs) })
    })
}

#[napi(object)]
pub struct TopKOut {
    pub indices: WireTensorOut,
    pub probs: WireTensorOut,
}

#[napi]
pub fn multihot_to_indices(routing_map: WireTensor, probs: Option<WireTensor>, topk: Option<f64>) -> napi::Result<TopKOut, String> {
    guard(|| {
        let topk = opt_size_arg("topk", topk)?;
        let out = moe_core::routing_map::multihot_to_indices(&view("routingMap", &routing_map)?, opt_view("probs", &probs)?.as_ref(), topk)?;
        Ok(TopKOut { indices: to_wire(out.indices), probs: to_wire(out.probs) })
    })
}

#[napi(object)]
pub struct PermuteOut {
    pub permuted_tokens: WireTensorOut,
    pub permuted_probs: Option<WireTensorOut>,
    pub sorted_indices: WireTensorOut,
    pub tokens_per_expert: WireTensorOut,
}

impl From<moe_core::permute::Permuted> for PermuteOut {
    fn from(out: moe_core::permute::Permuted) -> PermuteOut {
        PermuteOut {
            permuted_tokens: to_wire(out.permuted_tokens),
            permuted_probs: out.permuted_probs.map(to_wire),
            sorted_indices: to_wire(out.sorted_indices),
            tokens_per_expert: to_wire(out.tokens_per_expert),
        }
    }
}

#[napi]
pub fn permute(
    tokens: WireTensor,
    routing_map: WireTensor,
    probs: Option<WireTensor>,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> napi::Result<PermuteOut, String> {
    guard(|| {
        let options = PermuteOptions {
            num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?,
            drop_and_pad: drop_and_pad.unwrap_or(false),
        };
        let out = moe_core::permute::permute(
            &view("tokens", &tokens)?,
            &view("routingMap", &routing_map)?,
            opt_view("probs", &probs)?.as_ref(),
            options,
        )?;
        Ok(out.into())
    })
}

#[napi]
pub fn unpermute(
    permuted_tokens: WireTensor,
    sorted_indices: WireTensor,
    restore_shape: Vec<f64>,
    probs: Option<WireTensor>,
    routing_map: Option<WireTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<WireTensorOut, String> {
    guard(|| {
        let restore = moe_core::permute::restore_shape_arg(&restore_shape)?;
        let out = moe_core::permute::unpermute(
            &view("permutedTokens", &permuted_tokens)?,
            &view("sortedIndices", &sorted_indices)?,
            restore,
            opt_view("probs", &probs)?.as_ref(),
            opt_view("routingMap", &routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(to_wire(out))
    })
}

#[napi(object)]
pub struct PermuteGradsOut {
    pub grad_tokens: WireTensorOut,
    pub grad_probs: Option<WireTensorOut>,
}

#[napi]
pub fn permute_backward(
    grad_permuted: WireTensor,
    sorted_indices: WireTensor,
    num_tokens: f64,
    grad_permuted_probs: Option<WireTensor>,
    routing_map: Option<WireTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<PermuteGradsOut, String> {
    guard(|| {
        let out = moe_core::permute::permute_backward(
            &view("gradPermuted", &grad_permuted)?,
            &view("sortedIndices", &sorted_indices)?,
            size_arg("numTokens", num_tokens)?,
            opt_view("gradPermutedProbs", &grad_permuted_probs)?.as_ref(),
            opt_view("routingMap", &routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(PermuteGradsOut { grad_tokens: to_wire(out.grad_tokens), grad_probs: out.grad_probs.map(to_wire) })
    })
}

#[napi(object)]
pub struct UnpermuteGradsOut {
    pub grad_permuted: WireTensorOut,
    pub grad_probs: Option<WireTensorOut>,
}

#[napi]
pub fn unpermute_backward(
    grad_output: WireTensor,
    permuted_tokens: WireTensor,
    sorted_indices: WireTensor,
    probs: Option<WireTensor>,
    routing_map: Option<WireTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<UnpermuteGradsOut, String> {
    guard(|| {
        let out = moe_core::permute::unpermute_backward(
            &view("gradOutput", &grad_output)?,
            &view("permutedTokens", &permuted_tokens)?,
            &view("sortedIndices", &sorted_indices)?,
            opt_view("probs", &probs)?.as_ref(),
            opt_view("routingMap", &routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(UnpermuteGradsOut { grad_permuted: to_wire(out.grad_permuted), grad_probs: out.grad_probs.map(to_wire) })
    })
}
