//! Host tensors in and out: the cuda backend's path for plain `Tensor`s. Each op is a thin
//! upload -> its device entry ([`crate::device_ops`]) -> download, not a second implementation:
//! the checks, kernels and host fallbacks are the device entry's.
//!
//! The GPU keeps no int64 tensors: an int64 index tensor is narrowed to int32 for the upload
//! when every value fits (same values, same results); any other int64 argument (or an index
//! that does not fit) runs the core on the host, which returns its result or its error.

use moe_core::permute::{PermuteOptions, Permuted, UnpermuteOptions};
use moe_core::routing::{RouteOptions, Routed, TopK};
use moe_core::tensor::{DType, Tensor, TensorRef};

use crate::device::Device;
use crate::device_ops::{permute_device, route_device, topk_device, unpermute_device, DevicePermuted};
use crate::error::Result;
use crate::tensor::DeviceTensor;

fn any_int64(ts: &[Option<&TensorRef>]) -> bool {
    ts.iter().flatten().any(|t| t.dtype == DType::I64)
}

fn upload_opt(dev: &Device, t: Option<&TensorRef>) -> Result<Option<DeviceTensor>> {
    t.map(|t| DeviceTensor::upload(dev, t)).transpose()
}

/// An int64 index tensor's values as int32, when all of them fit.
fn narrow_indices(t: &TensorRef) -> Option<Vec<i32>> {
    let wide = t.indices().ok()?;
    wide.iter().map(|&v| i32::try_from(v).ok()).collect()
}

/// [`moe_core::permute::permute`] on the GPU for host tensors.
pub fn permute(
    dev: &Device,
    tokens: &TensorRef,
    routing_map: &TensorRef,
    probs: Option<&TensorRef>,
    options: PermuteOptions,
) -> Result<Permuted> {
    if any_int64(&[Some(tokens), Some(routing_map), probs]) {
        return Ok(moe_core::permute::permute(tokens, routing_map, probs, options)?);
    }
    let (t, m, p) = (DeviceTensor::upload(dev, tokens)?, DeviceTensor::upload(dev, routing_map)?, upload_opt(dev, probs)?);
    let DevicePermuted { permuted_tokens, permuted_probs, sorted_indices, tokens_per_expert } =
        permute_device(dev, &t, &m, p.as_ref(), options)?;
    Ok(Permuted {
        permuted_tokens: permuted_tokens.download(dev, "permutedTokens")?,
        permuted_probs: permuted_probs.map(|p| p.download(dev, "permutedProbs")).transpose()?,
        sorted_indices: sorted_indices.download(dev, "sortedIndices")?,
        tokens_per_expert: tokens_per_expert.download(dev, "tokensPerExpert")?,
    })
}

/// [`moe_core::permute::unpermute`] on the GPU for host tensors.
pub fn unpermute(
    dev: &Device,
    permuted: &TensorRef,
    sorted_indices: &TensorRef,
    restore_shape: [usize; 2],
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<Tensor> {
    let narrow = if sorted_indices.dtype == DType::I64 { narrow_indices(sorted_indices) } else { None };
    let narrow_ref = narrow.as_deref().map(|v| TensorRef::of("sortedIndices", sorted_indices.shape.clone(), v)).transpose()?;
    let sorted_indices_32 = narrow_ref.as_ref().unwrap_or(sorted_indices);
    if any_int64(&[Some(permuted), Some(sorted_indices_32), probs, routing_map]) {
        return Ok(moe_core::permute::unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, options)?);
    }
    let x = DeviceTensor::upload(dev, permuted)?;
    let s = DeviceTensor::upload(dev, sorted_indices_32)?;
    let (p, m) = (upload_opt(dev, probs)?, upload_opt(dev, routing_map)?);
    unpermute_device(dev, &x, &s, restore_shape, p.as_ref(), m.as_ref(), options)?.download(dev, "the output")
}

/// [`moe_core::routing::route`] on the GPU for host tensors.
pub fn route(
    dev: &Device,
    logits: &TensorRef,
    expert_bias: Option<&TensorRef>,
    token_mask: Option<&TensorRef>,
    options: RouteOptions,
) -> Result<Routed> {
    if any_int64(&[Some(logits), expert_bias, token_mask]) {
        return Ok(moe_core::routing::route(logits, expert_bias, token_mask, options)?);
    }
    // 16-bit logits: converted exactly to f32 here, so that the kernel (f32 only) routes them
    // (a 16-bit device tensor goes to route_device's host path).
    let wide = match logits.dtype {
        DType::BF16 | DType::F16 => Some(moe_core::routing::logits_f32(logits)?),
        _ => None,
    };
    let wide_ref = wide.as_deref().map(|w| TensorRef::of("logits", logits.shape.clone(), w)).transpose()?;
    let l = DeviceTensor::upload(dev, wide_ref.as_ref().unwrap_or(logits))?;
    let (b, m) = (upload_opt(dev, expert_bias)?, upload_opt(dev, token_mask)?);
    let out = route_device(dev, &l, b.as_ref(), m.as_ref(), options)?;
    Ok(Routed {
        weights: out.weights.download(dev, "weights")?,
        indices: out.indices.download(dev, "indices")?,
        scores: out.scores.download(dev, "scores")?,
        tokens_per_expert: out.tokens_per_expert.download(dev, "tokensPerExpert")?,
    })
}

/// [`moe_core::routing::topk`] on the GPU for host tensors.
pub fn topk(dev: &Device, values: &TensorRef, k: usize) -> Result<TopK> {
    if any_int64(&[Some(values)]) {
        return Ok(moe_core::routing::topk(values, k)?);
    }
    let v = DeviceTensor::upload(dev, values)?;
    let (ov, oi) = topk_device(dev, &v, k)?;
    Ok(TopK { values: ov.download(dev, "values")?, indices: oi.download(dev, "indices")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64_indices_narrow_when_they_fit() {
        let v = [3i64, 0, 7];
        assert_eq!(narrow_indices(&TensorRef::of("sortedIndices", vec![3], &v[..]).unwrap()), Some(vec![3, 0, 7]));
        let big = [1i64 << 40, 0];
        assert_eq!(narrow_indices(&TensorRef::of("sortedIndices", vec![2], &big[..]).unwrap()), None);
    }
}
