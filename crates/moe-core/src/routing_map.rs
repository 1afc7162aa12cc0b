//! Conversions between top-k routing (`indices [T, k]`, `probs [T, k]`) and the dense
//! multihot routing map (`routingMap [T, E]` bool, `probs [T, E]` f32).

use crate::alloc::try_vec;
use crate::error::{Error, Result};
use crate::tensor::{DType, Meta, Tensor, TensorRef};

/// Output of [`indices_to_multihot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Multihot {
    pub routing_map: Tensor,
    pub probs: Tensor,
}

/// [`indices_to_multihot`]'s checks but the indices' values (the range, an expert listed twice:
/// checked as the map is filled): `(numTokens, topk)`.
pub fn check_indices_to_multihot(indices: Meta, probs: Meta, num_experts: usize) -> Result<(usize, usize)> {
    let dims = indices.expect_rank(2, "[numTokens, topk]")?;
    let (num_tokens, topk) = (dims[0], dims[1]);
    indices.expect_dtype(DType::INDICES)?;
    probs.expect_dtype(&[DType::F32])?;
    probs.expect_shape(&[num_tokens, topk], "(the shape of indices)")?;
    if num_tokens.checked_mul(num_experts).is_none() {
        return Err(Error::range("numExperts", format!("{num_tokens} x {num_experts} overflows")));
    }
    Ok((num_tokens, topk))
}

/// `routingMap[t, indices[t, j]] = true` and `probs[t, indices[t, j]] = probs[t, j]` for
/// every `j` whose index is not `-1` (a masked slot). An expert listed twice in one row is
/// an error: the reference's scatter would keep an unspecified one of the two probs.
pub fn indices_to_multihot(indices: &TensorRef, probs: &TensorRef, num_experts: usize) -> Result<Multihot> {
    let (num_tokens, topk) = check_indices_to_multihot(indices.meta(), probs.meta(), num_experts)?;
    let idx = indices.indices()?;
    let p = probs.typed::<f32>()?;
    let cells = num_tokens * num_experts;
    let mut map = try_vec(0u8, cells, "numExperts")?;
    let mut dense = try_vec(0f32, cells, "numExperts")?;
    for t in 0..num_tokens {
        for j in 0..topk {
            let e = idx[t * topk + j];
            if e == -1 {
                continue;
            }
            if e < 0 || e as u64 >= num_experts as u64 {
                return Err(Error::range(
                    "indices",
                    format!("indices[{t}][{j}] = {e} is outside [0, numExperts = {num_experts}) and is not -1 (masked)"),
                ));
            }
            let cell = t * num_experts + e as usize;
            if map[cell] != 0 {
                return Err(Error::range("indices", format!("row {t} lists expert {e} more than once")));
            }
            map[cell] = 1;
            dense[cell] = p[t * topk + j];
        }
    }
    Ok(Multihot { routing_map: Tensor::bool(vec![num_tokens, num_experts], map), probs: Tensor::f32(vec![num_tokens, num_experts], dense) })
}

/// Output of [`multihot_to_indices`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// `[T, k]` int32: each token's experts in ascending id, then `-1` for unused slots.
    pub indices: Tensor,
    /// `[T, k]` f32: the dense prob of each listed expert, 0 for unused slots.
    pub probs: Tensor,
}

/// [`multihot_to_indices`]'s checks of its tensors (the routing map's 0/1 values on the host);
/// the rows' counts against `topk` and the output's size are checked by the op: `(numTokens, numExperts)`.
pub fn check_multihot_to_indices(routing_map: Meta, probs: Option<Meta>) -> Result<(usize, usize)> {
    let (num_tokens, num_experts) = crate::capacity::check_map(routing_map)?;
    if let Some(p) = probs {
        p.expect_dtype(&[DType::F32])?;
        p.expect_shape(&[num_tokens, num_experts], "(the shape of routingMap)")?;
    }
    Ok((num_tokens, num_experts))
}

/// The inverse of [`indices_to_multihot`], in a canonical order: each row lists its experts in
/// ascending id. `topk` defaults to the largest row count; a row with more experts than
/// `topk` is an error. Without `probs` the output probs are 1 for every listed expert.
pub fn multihot_to_indices(routing_map: &TensorRef, probs: Option<&TensorRef>, topk: Option<usize>) -> Result<TopK> {
    let (num_tokens, num_experts) = check_multihot_to_indices(routing_map.meta(), probs.map(|p| p.meta()))?;
    let map = routing_map.bytes();
    let dense = probs.map(|p| p.typed::<f32>()).transpose()?;
    let row_counts: Vec<usize> = map.chunks(num_experts.max(1)).map(|r| r.iter().filter(|&&b| b != 0).count()).collect();
    let widest = row_counts.iter().copied().max().unwrap_or(0);
    let k = topk.unwrap_or(widest);
    if let Some((t, &c)) = row_counts.iter().enumerate().find(|(_, &c)| c > k) {
        return Err(Error::range("topk", format!("row {t} of routingMap selects {c} experts, more than topk = {k}")));
    }
    if i32::try_from(num_experts).is_err() {
        return Err(Error::range("routingMap.shape", format!("numExperts = {num_experts} does not fit in int32")));
    }
    let cells = num_tokens.checked_mul(k).ok_or_else(|| Error::range("topk", format!("{num_tokens} x {k} overflows")))?;
    let mut indices = try_vec(-1i32, cells, "topk")?;
    let mut out_probs = try_vec(0f32, cells, "topk")?;
    for t in 0..num_tokens {
        let mut j = 0;
        for e in 0..num_experts {
            let cell = t * num_experts + e;
            if map[cell] != 0 {
                indices[t * k + j] = e as i32;
                out_probs[t * k + j] = dense.as_ref().map_or(1.0, |d| d[cell]);
                j += 1;
            }
        }
    }
    Ok(TopK { indices: Tensor::i32(vec![num_tokens, k], indices), probs: Tensor::f32(vec![num_tokens, k], out_probs) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    #[test]
    fn round_trip_with_masked_slots() {
        let idx: Vec<i64> = vec![2, 0, -1, 1, 3, -1];
        let p: Vec<f32> = vec![0.7, 0.3, 0.9, 0.5, 0.25, 0.1];
        let indices = TensorRef::of("indices", vec![3, 2], &idx).unwrap();
        let probs = TensorRef::of("probs", vec![3, 2], &p).unwrap();
        let m = indices_to_multihot(&indices, &probs, 4).unwrap();
        assert_eq!(m.routing_map.data, Data::Bool(vec![1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1]));
        assert_eq!(m.probs.data, Data::F32(vec![0.3, 0.0, 0.7, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]));

        let (Data::Bool(map), Data::F32(dense)) = (&m.routing_map.data, &m.probs.data) else { unreachable!() };
        let map_ref = TensorRef::new("routingMap", DType::Bool, vec![3, 4], map).unwrap();
        let dense_ref = TensorRef::of("probs", vec![3, 4], dense).unwrap();
        let back = multihot_to_indices(&map_ref, Some(&dense_ref), None).unwrap();
        assert_eq!(back.indices.data, Data::I32(vec![0, 2, 1, -1, 3, -1]));
        assert_eq!(back.probs.data, Data::F32(vec![0.3, 0.7, 0.5, 0.0, 0.25, 0.0]));
    }

    #[test]
    fn rejects_out_of_range_and_duplicate_experts() {
        let p = vec![1f32; 2];
        let probs = TensorRef::of("probs", vec![1, 2], &p).unwrap();
        for (row, msg) in [([0i32, 4], "indices[0][1] = 4"), ([-2, 0], "indices[0][0] = -2"), ([1, 1], "lists expert 1 more than once")] {
            let indices = TensorRef::of("indices", vec![1, 2], &row).unwrap();
            let err = indices_to_multihot(&indices, &probs, 4).unwrap_err();
            assert!(err.to_string().contains(msg), "{err}");
        }
    }
}
