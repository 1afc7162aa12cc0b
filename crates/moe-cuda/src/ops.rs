//! permute and unpermute on the GPU. The core validates the arguments and builds the plan (so
//! errors are the CPU backends' errors, word for word); the rows move on the GPU.
//!
//! For now tensors come from and go back to the host: upload, one kernel, download. The
//! launchers (`launch_*`) work on device buffers, so device-resident tensors can use them as is.

use moe_core::permute::{permute_inputs, unpermute_inputs, DispatchPlan, PermuteOptions, Permuted, UnpermuteOptions};
use moe_core::tensor::{DType, Tensor, TensorRef};

use crate::device::{Arg, Buffer, Device};
use crate::error::{Error, Result};

/// The per-token slot lists the unpermute kernels read: the core's own [`token_slots`].
pub use moe_core::permute::{token_slots as token_csr, TokenSlots as TokenCsr};

/// `[E + 1]` slot offsets of the experts (`offsets[e]..offsets[e + 1]` are expert e's slots).
pub fn expert_offsets(plan: &DispatchPlan) -> Vec<i32> {
    let mut offsets = Vec::with_capacity(plan.num_experts + 1);
    let mut acc = 0i32;
    offsets.push(0);
    for &c in &plan.tokens_per_expert {
        acc += c as i32;
        offsets.push(acc);
    }
    offsets
}

/// A plan on the GPU: the token CSR and the expert offsets.
pub struct DevicePlan {
    pub num_tokens: usize,
    pub num_slots: usize,
    pub num_experts: usize,
    pub row_ptr: Buffer,
    pub slots: Buffer,
    pub expert_offsets: Buffer,
}

impl DevicePlan {
    pub fn upload(dev: &Device, plan: &DispatchPlan) -> Result<DevicePlan> {
        let csr = token_csr(&plan.sorted_indices, plan.num_tokens)?;
        Ok(DevicePlan {
            num_tokens: plan.num_tokens,
            num_slots: plan.num_slots(),
            num_experts: plan.num_experts,
            row_ptr: dev.upload("the plan (row offsets)", &csr.start)?,
            slots: dev.upload("the plan (slots)", &csr.slots)?,
            expert_offsets: dev.upload("the plan (expert offsets)", &expert_offsets(plan))?,
        })
    }
}

/// Words that `permute_*` kernels move per thread (PERMUTE_UNROLL in kernels/permute.cu).
pub(crate) const PERMUTE_UNROLL: usize = 4;
const MAX_THREADS: usize = 256;

/// Threads per block and column blocks for `items` work items per row, at most 256 threads
/// a block, a multiple of 32, and blocks as even as possible.
pub(crate) fn row_launch(items: usize) -> Result<(u32, u32)> {
    let col_blocks = items.div_ceil(MAX_THREADS).max(1);
    let threads = items.div_ceil(col_blocks).div_ceil(32).max(1) * 32;
    if col_blocks > 65_535 {
        return Err(Error::Cuda(format!("rows of {items} words are too long for one launch")));
    }
    Ok((threads as u32, col_blocks as u32))
}

/// The widest word (16, 8, 4 or 2 bytes) that divides a row of `row_bytes`.
pub fn word_bytes(row_bytes: usize) -> usize {
    [16, 8, 4, 2].into_iter().find(|w| row_bytes % w == 0).unwrap_or(2)
}

/// How permute moves rows: token-major (read each token once, write it to its slots: the
/// default) or slot-major (read the token of each slot; kept for comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermuteKernel {
    Scatter,
    Gather,
}

/// Permutes `tokens` (`[T, row_bytes]` raw bytes) into `out` (`[N, row_bytes]`), and with
/// `dense_probs` (`[T, E]` f32) fills `out_probs` (`[N]` f32).
#[allow(clippy::too_many_arguments)]
pub fn launch_permute(
    dev: &Device,
    kernel: PermuteKernel,
    tokens: &Buffer,
    row_bytes: usize,
    plan: &DevicePlan,
    sorted_indices: Option<&Buffer>,
    dense_probs: Option<&Buffer>,
    out: &Buffer,
    out_probs: Option<&Buffer>,
) -> Result<()> {
    if plan.num_slots == 0 {
        return Ok(());
    }
    if row_bytes == 0 && dense_probs.is_none() {
        return Ok(());
    }
    let w = word_bytes(row_bytes);
    let words = (row_bytes / w) as i64;
    let (threads, col_blocks) = row_launch((words as usize).div_ceil(PERMUTE_UNROLL))?;
    let s = dev.stream();
    let probs_ptr = dense_probs.map_or(0, |b| b.ptr(s));
    let out_probs_ptr = match (dense_probs, out_probs) {
        (Some(_), Some(b)) => b.ptr(s),
        (Some(_), None) => return Err(Error::Cuda("permute: probs without an output buffer (a bug in moe-dispatch)".into())),
        _ => 0,
    };
    let e = plan.num_experts as i32;
    match kernel {
        PermuteKernel::Scatter => dev.launch(
            &format!("permute_scatter_w{w}"),
            (plan.num_tokens as u32, col_blocks),
            threads,
            &[
                Arg::U64(tokens.ptr(s)),
                Arg::U64(out.ptr(s)),
                Arg::I64(words),
                Arg::U64(plan.row_ptr.ptr(s)),
                Arg::U64(plan.slots.ptr(s)),
                Arg::U64(probs_ptr),
                Arg::U64(out_probs_ptr),
                Arg::U64(plan.expert_offsets.ptr(s)),
                Arg::I32(e),
            ],
        ),
        PermuteKernel::Gather => {
            let sorted = sorted_indices.ok_or_else(|| Error::Cuda("the gather kernel needs sortedIndices on the GPU".into()))?;
            dev.launch(
                &format!("permute_gather_w{w}"),
                (plan.num_slots as u32, col_blocks),
                threads,
                &[
                    Arg::U64(tokens.ptr(s)),
                    Arg::U64(out.ptr(s)),
                    Arg::I64(words),
                    Arg::U64(sorted.ptr(s)),
                    Arg::U64(probs_ptr),
                    Arg::U64(out_probs_ptr),
                    Arg::U64(plan.expert_offsets.ptr(s)),
                    Arg::I32(e),
                ],
            )
        }
    }
}

/// Elements per thread of the unpermute kernel: the widest of 16/8/4/2-byte words whose
/// element count divides `hidden`.
pub fn unpermute_vec(dtype: DType, hidden: usize) -> usize {
    let per16 = 16 / dtype.size();
    [per16, per16 / 2, per16 / 4, per16 / 8].into_iter().filter(|&v| v >= 1).find(|v| hidden % v == 0).unwrap_or(1)
}

fn dtype_tag(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(Error::Cuda(format!("unpermute has no kernel for {} (a bug in moe-dispatch)", other.name()))),
    }
}

/// Merges `permuted` (`[N, hidden]` of `dtype`) into `out` (`[T, hidden]`) along the token CSR,
/// weighting slot i by `weights[i]` (f32 `[N]`) when given.
#[allow(clippy::too_many_arguments)]
pub fn launch_unpermute(
    dev: &Device,
    dtype: DType,
    permuted: &Buffer,
    hidden: usize,
    num_tokens: usize,
    row_ptr: &Buffer,
    slots: &Buffer,
    weights: Option<&Buffer>,
    out: &Buffer,
) -> Result<()> {
    if num_tokens == 0 || hidden == 0 {
        return Ok(());
    }
    let vec = unpermute_vec(dtype, hidden);
    let (threads, col_blocks) = row_launch(hidden / vec)?;
    let s = dev.stream();
    dev.launch(
        &format!("unpermute_{}_v{vec}", dtype_tag(dtype)?),
        (num_tokens as u32, col_blocks),
        threads,
        &[
            Arg::U64(permuted.ptr(s)),
            Arg::U64(out.ptr(s)),
            Arg::I64(hidden as i64),
            Arg::U64(row_ptr.ptr(s)),
            Arg::U64(slots.ptr(s)),
            Arg::U64(weights.map_or(0, |b| b.ptr(s))),
        ],
    )
}

/// A token tensor's output from its bytes on the GPU.
fn download_tokens(dev: &Device, what: &str, dtype: DType, shape: Vec<usize>, buf: &Buffer) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    Ok(match dtype {
        DType::F32 => Tensor::f32(shape, dev.download_new(what, buf, numel)?),
        DType::BF16 | DType::F16 => Tensor::u16(dtype, shape, dev.download_new(what, buf, numel)?),
        other => return Err(Error::Cuda(format!("{what}: unexpected dtype {} (a bug in moe-dispatch)", other.name()))),
    })
}

/// [`moe_core::permute::permute`] on the GPU: same arguments, same errors, same bits.
pub fn permute(dev: &Device, tokens: &TensorRef, routing_map: &TensorRef, probs: Option<&TensorRef>, options: PermuteOptions) -> Result<Permuted> {
    let (plan, hidden, dense) = permute_inputs(tokens, routing_map, probs, options)?;
    let n = plan.num_slots();
    let row_bytes = hidden * tokens.dtype.size();
    let d_plan = DevicePlan::upload(dev, &plan)?;
    let d_tokens = dev.upload("tokens", tokens.bytes())?;
    let d_dense = dense.as_deref().map(|d| dev.upload("probs", d)).transpose()?;
    let d_out = dev.alloc("permutedTokens", n * row_bytes)?;
    let d_out_probs = d_dense.as_ref().map(|_| dev.alloc("permutedProbs", n * 4)).transpose()?;
    launch_permute(dev, PermuteKernel::Scatter, &d_tokens, row_bytes, &d_plan, None, d_dense.as_ref(), &d_out, d_out_probs.as_ref())?;
    let permuted_tokens = download_tokens(dev, "permutedTokens", tokens.dtype, vec![n, hidden], &d_out)?;
    let permuted_probs = match &d_out_probs {
        Some(b) => Some(Tensor::f32(vec![n], dev.download_new("permutedProbs", b, n)?)),
        None => None,
    };
    Ok(Permuted {
        permuted_tokens,
        permuted_probs,
        sorted_indices: Tensor::i32(vec![n], plan.sorted_indices.clone()),
        tokens_per_expert: Tensor::i32(vec![plan.num_experts], plan.tokens_per_expert.iter().map(|&c| c as i32).collect()),
    })
}

/// [`moe_core::permute::unpermute`] on the GPU: same arguments, same errors, same bits.
pub fn unpermute(
    dev: &Device,
    permuted: &TensorRef,
    sorted_indices: &TensorRef,
    restore_shape: [usize; 2],
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<Tensor> {
    let (idx, weights) = unpermute_inputs(permuted, sorted_indices, restore_shape, probs, routing_map, options)?;
    let [num_tokens, hidden] = restore_shape;
    let csr = token_csr(&idx, num_tokens)?;
    let d_row_ptr = dev.upload("the plan (row offsets)", &csr.start)?;
    let d_slots = dev.upload("the plan (slots)", &csr.slots)?;
    let d_weights = weights.as_deref().map(|w| dev.upload("probs", w)).transpose()?;
    let d_permuted = dev.upload("permutedTokens", permuted.bytes())?;
    let d_out = dev.alloc("the output", num_tokens * hidden * permuted.dtype.size())?;
    launch_unpermute(dev, permuted.dtype, &d_permuted, hidden, num_tokens, &d_row_ptr, &d_slots, d_weights.as_ref(), &d_out)?;
    download_tokens(dev, "the output", permuted.dtype, vec![num_tokens, hidden], &d_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_lists_each_tokens_slots_in_ascending_order() {
        let csr = token_csr(&[0i32, 2, 0, 1, 2], 4).unwrap();
        assert_eq!(csr.start, vec![0, 2, 3, 5, 5]);
        assert_eq!(csr.slots, vec![0, 2, 3, 1, 4]);
    }

    /// moe-core's `permute_inputs` / `unpermute_inputs` copy the checks of `permute` /
    /// `unpermute`: the CUDA backend's errors must stay the CPU's, word for word.
    #[test]
    fn validation_matches_the_core_ops() {
        use moe_core::permute::{permute as cpu_permute, unpermute as cpu_unpermute};
        let tokens = vec![0f32; 6];
        let tok = TensorRef::of("tokens", vec![3, 2], &tokens).unwrap();
        let map = [1u8, 0, 0, 1, 1, 0];
        let map_ref = TensorRef::new("routingMap", DType::Bool, vec![3, 2], &map).unwrap();
        let bad_map = TensorRef::new("routingMap", DType::Bool, vec![2, 2], &map[..4]).unwrap();
        let probs9 = vec![0f32; 9];
        let p9 = TensorRef::of("probs", vec![3, 3], &probs9).unwrap();
        let opts = |n: Option<usize>, d: bool| PermuteOptions { num_out_tokens: n, drop_and_pad: d };
        for (m, p, o) in [(&map_ref, None, opts(Some(5), false)), (&map_ref, None, opts(Some(3), true)), (&map_ref, None, opts(Some(8), true)), (&bad_map, None, opts(None, false)), (&map_ref, Some(&p9), opts(None, false))] {
            let want = cpu_permute(&tok, m, p, o).unwrap_err();
            assert_eq!(permute_inputs(&tok, m, p, o).unwrap_err(), want);
        }
        let idx_bad = [0i32, 3];
        let idx = [1i32, 0, 2];
        let perm = TensorRef::of("permutedTokens", vec![2, 2], &tokens[..4]).unwrap();
        let perm3 = TensorRef::of("permutedTokens", vec![3, 2], &tokens).unwrap();
        let si_bad = TensorRef::of("sortedIndices", vec![2], &idx_bad[..]).unwrap();
        let si = TensorRef::of("sortedIndices", vec![3], &idx[..]).unwrap();
        let dense = vec![0f32; 6];
        let d = TensorRef::of("probs", vec![3, 2], &dense).unwrap();
        let u = UnpermuteOptions::default();
        let cases: Vec<(&TensorRef, &TensorRef, [usize; 2], Option<&TensorRef>, Option<&TensorRef>)> =
            vec![(&perm, &si_bad, [3, 2], None, None), (&perm, &si_bad, [3, 5], None, None), (&perm3, &si, [3, 2], Some(&d), None), (&perm3, &si, [3, 2], Some(&d), Some(&map_ref))];
        for (x, s, r, p, m) in cases {
            let want = cpu_unpermute(x, s, r, p, m, u).unwrap_err();
            assert_eq!(unpermute_inputs(x, s, r, p, m, u).unwrap_err(), want);
        }
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(row_launch(1).unwrap(), (32, 1));
        assert_eq!(row_launch(224).unwrap(), (224, 1));
        assert_eq!(row_launch(896).unwrap(), (224, 4));
        assert_eq!(row_launch(257).unwrap(), (160, 2));
        assert_eq!(word_bytes(7168 * 2), 16);
        assert_eq!(word_bytes(3 * 2), 2);
        assert_eq!(word_bytes(3 * 4), 4);
        assert_eq!(unpermute_vec(DType::BF16, 7168), 8);
        assert_eq!(unpermute_vec(DType::F32, 6), 2);
        assert_eq!(unpermute_vec(DType::F16, 3), 1);
    }
}
