//! Grouped-GEMM preparation (NeMo Automodel `experts._permute_tokens_for_grouped_mm`): the
//! routing slots a rank's local experts must compute, grouped by expert, with the counts and
//! offsets a grouped matrix multiply takes.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::alloc::{try_vec, try_with_capacity};
use crate::error::{Error, Result};
use crate::tensor::{DType, Float, Meta, Tensor, TensorRef};

/// Output of [`grouped_mm_sort`]. `S` is the number of slots routed to a local expert.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedSort {
    /// `[S]` int32: the token of each slot.
    pub sorted_token_ids: Tensor,
    /// `[S]` int32: the flat slot id `t * k + j` of each slot.
    pub sorted_slot_ids: Tensor,
    /// `[S]` f32: `weights[t, j]` of each slot.
    pub sorted_weights: Tensor,
    /// `[numLocalExperts]` int32: slots per local expert.
    pub tokens_per_expert: Tensor,
    /// `[numLocalExperts]` int32: inclusive cumulative sum of `tokens_per_expert`
    /// (the end of each expert's group, the `offs` of `torch._grouped_mm`).
    pub offsets: Tensor,
}

fn weights_f32<'a>(weights: &TensorRef<'a>) -> Result<Cow<'a, [f32]>> {
    // bf16 and f16 widen to f32 exactly (the reference's `weights.float()`).
    Ok(match weights.dtype {
        DType::BF16 => Cow::Owned(weights.typed::<bf16>()?.iter().map(|&w| Float::to_f32(w)).collect()),
        DType::F16 => Cow::Owned(weights.typed::<f16>()?.iter().map(|&w| Float::to_f32(w)).collect()),
        _ => weights.typed::<f32>()?,
    })
}

/// Slots `(t, j)` in flat order `t * k + j` whose expert `indices[t, j]` lies in the local
/// window `[expertsStartIdx, expertsStartIdx + numLocalExperts)` and whose token is not
/// masked out by `tokenMask` (a masked token counts as `-1` in every slot), stably sorted by
/// local expert id `indices[t, j] - expertsStartIdx`.
///
/// `-1` marks a masked slot; any other negative index is an error (the reference would
/// silently skip it). Indices at or past the window belong to other ranks and are skipped.
pub fn grouped_mm_sort(
    indices: &TensorRef,
    weights: &TensorRef,
    token_mask: Option<&TensorRef>,
    num_local_experts: usize,
    experts_start_idx: usize,
) -> Result<GroupedSort> {
    let GroupedCheck { num_tokens, topk, start, end } =
        check_grouped_mm_sort(indices.meta(), weights.meta(), token_mask.map(|m| m.meta()), num_local_experts, experts_start_idx)?;
    let mask = token_mask.map(|m| m.bytes());
    let num_slots = num_tokens * topk;
    let idx = indices.indices()?;
    let w = weights_f32(weights)?;

    // Local expert of every slot (None: not computed here), counted per expert.
    let mut local = vec![None; num_slots];
    let mut counts = try_vec(0usize, num_local_experts, "numLocalExperts")?;
    for t in 0..num_tokens {
        let live = mask.is_none_or(|m| m[t] != 0);
        for j in 0..topk {
            let s = t * topk + j;
            let e = idx[s];
            if e < -1 {
                return Err(Error::range("indices", format!("indices[{t}][{j}] = {e} is negative and is not -1 (masked)")));
            }
            if live && e >= start && e < end {
                let l = (e - start) as usize;
                local[s] = Some(l);
                counts[l] += 1;
            }
        }
    }
    // Stable counting sort by local expert.
    let mut cursor = try_with_capacity(num_local_experts, "numLocalExperts")?;
    let mut offsets = try_with_capacity(num_local_experts, "numLocalExperts")?;
    let mut per_expert = try_with_capacity(num_local_experts, "numLocalExperts")?;
    per_expert.extend(counts.iter().map(|&c| c as i32));
    let mut acc = 0usize;
    for &c in &counts {
        cursor.push(acc);
        acc += c;
        offsets.push(acc as i32);
    }
    let total = acc;
    let mut token_ids = vec![0i32; total];
    let mut slot_ids = vec![0i32; total];
    let mut sorted_w = vec![0f32; total];
    for (s, l) in local.iter().enumerate() {
        if let Some(l) = *l {
            let at = cursor[l];
            cursor[l] += 1;
            token_ids[at] = (s / topk.max(1)) as i32;
            slot_ids[at] = s as i32;
            sorted_w[at] = w[s];
        }
    }
    Ok(GroupedSort {
        sorted_token_ids: Tensor::i32(vec![total], token_ids),
        sorted_slot_ids: Tensor::i32(vec![total], slot_ids),
        sorted_weights: Tensor::f32(vec![total], sorted_w),
        tokens_per_expert: Tensor::i32(vec![num_local_experts], per_expert),
        offsets: Tensor::i32(vec![num_local_experts], offsets),
    })
}

/// [`grouped_mm_sort`]'s arguments once checked: the indices' shape and the local window
/// `[start, end)` of expert ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedCheck {
    pub num_tokens: usize,
    pub topk: usize,
    pub start: i64,
    pub end: i64,
}

/// Every check of [`grouped_mm_sort`] but the indices' values (-1 or not negative: checked by
/// the op), in its order (the mask's 0/1 values on the host).
pub fn check_grouped_mm_sort(
    indices: Meta,
    weights: Meta,
    token_mask: Option<Meta>,
    num_local_experts: usize,
    experts_start_idx: usize,
) -> Result<GroupedCheck> {
    let dims = indices.expect_rank(2, "[numTokens, topk]")?;
    let (num_tokens, topk) = (dims[0], dims[1]);
    indices.expect_dtype(DType::INDICES)?;
    weights.expect_dtype(DType::TOKENS)?;
    weights.expect_shape(&[num_tokens, topk], "(the shape of indices)")?;
    if let Some(m) = token_mask {
        m.expect_shape(&[num_tokens], "([numTokens], one per row of indices)")?;
        m.check_mask()?;
    }
    if num_tokens.checked_mul(topk).is_none_or(|n| i32::try_from(n).is_err()) {
        return Err(Error::range("indices.shape", format!("{num_tokens} * {topk} slots do not fit in int32 slot ids")));
    }
    let start =
        i64::try_from(experts_start_idx).map_err(|_| Error::range("expertsStartIdx", format!("{experts_start_idx} is too large")))?;
    let end = i64::try_from(num_local_experts).ok().and_then(|n| start.checked_add(n)).ok_or_else(|| {
        Error::range(
            "numLocalExperts",
            format!("expertsStartIdx + numLocalExperts = {experts_start_idx} + {num_local_experts} is too large"),
        )
    })?;
    Ok(GroupedCheck { num_tokens, topk, start, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    #[test]
    fn sorts_local_slots_stably_by_expert() {
        // 4 tokens, top-2; token 2 masked. Window [1, 3).
        let idx: Vec<i64> = vec![1, 0, 2, 1, 1, 2, 3, -1];
        let w: Vec<f32> = vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
        let mask = [1u8, 1, 0, 1];
        let ir = TensorRef::of("indices", vec![4, 2], &idx).unwrap();
        let wr = TensorRef::of("weights", vec![4, 2], &w).unwrap();
        let mr = TensorRef::new("tokenMask", DType::Bool, vec![4], &mask).unwrap();
        let out = grouped_mm_sort(&ir, &wr, Some(&mr), 2, 1).unwrap();
        // expert 1 (local 0): slots 0, 3; expert 2 (local 1): slot 2
        assert_eq!(out.sorted_token_ids.data, Data::I32(vec![0, 1, 1]));
        assert_eq!(out.sorted_slot_ids.data, Data::I32(vec![0, 3, 2]));
        assert_eq!(out.sorted_weights.data, Data::F32(vec![0.1, 0.4, 0.3]));
        assert_eq!(out.tokens_per_expert.data, Data::I32(vec![2, 1]));
        assert_eq!(out.offsets.data, Data::I32(vec![2, 3]));

        let all = grouped_mm_sort(&ir, &wr, None, 4, 0).unwrap();
        assert_eq!(all.sorted_slot_ids.data, Data::I32(vec![1, 0, 3, 4, 2, 5, 6]));
        assert_eq!(all.offsets.data, Data::I32(vec![1, 4, 6, 7]));
    }

    #[test]
    fn bf16_weights_widen_exactly_and_errors_name_arguments() {
        let idx = [0i32, 1];
        let w = [bf16::from_f32(0.5), bf16::from_f32(-3.0)];
        let ir = TensorRef::of("indices", vec![1, 2], &idx[..]).unwrap();
        let wr = TensorRef::of("weights", vec![1, 2], &w[..]).unwrap();
        let out = grouped_mm_sort(&ir, &wr, None, 2, 0).unwrap();
        assert_eq!(out.sorted_weights.data, Data::F32(vec![0.5, -3.0]));

        let bad = [0i32, -2];
        let br = TensorRef::of("indices", vec![1, 2], &bad[..]).unwrap();
        let err = grouped_mm_sort(&br, &wr, None, 2, 0).unwrap_err();
        assert!(err.to_string().starts_with("indices: indices[0][1] = -2"), "{err}");
        let wr2 = TensorRef::of("weights", vec![2, 1], &w[..]).unwrap();
        let err = grouped_mm_sort(&ir, &wr2, None, 2, 0).unwrap_err();
        assert!(err.to_string().starts_with("weights.shape:"), "{err}");
        let m = [1u8];
        let mr = TensorRef::new("tokenMask", DType::Bool, vec![1, 1], &m).unwrap();
        let err = grouped_mm_sort(&ir, &wr, Some(&mr), 2, 0).unwrap_err();
        assert!(err.to_string().starts_with("tokenMask.shape:"), "{err}");
    }
}
