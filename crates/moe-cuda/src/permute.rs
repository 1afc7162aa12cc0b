//! The permute kernels' launchers (kernels/permute.cu) and the plan they read on the GPU
//! ([`DevicePlan`]). The ops that use them are in [`crate::device_ops`].

use moe_core::permute::DispatchPlan;
use moe_core::tensor::DType;

use crate::device::{Arg, Buffer, Device};
use crate::error::{Error, Result};
use crate::tensor::DeviceTensor;

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
    /// The routing map's buffer ([`Buffer::id`]) this plan was built from on the GPU, once
    /// permute checked the plan's size: its offsets are that map's column offsets.
    pub map: Option<u64>,
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
            map: None,
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

/// `out [n, row_bytes] = tokens[rows[i]]` for the `n` int32 `rows` of `tokens [num_tokens,
/// row_bytes]` (each a row of `tokens`: the caller checked them): unpermuteBackward without probs,
/// and the experts' rows copied out (crate::experts `gathered_rows`). Indices that carry the plan
/// permute made them with (its token CSR lists every slot once, drop-and-pad's filled slots too)
/// take permute's token-major kernel, each row of `tokens` read once and written to its slots:
/// 0.083-0.085 ms in the fine-grained layer's step on an H100 where the slot-major gather (the
/// other indices') took 0.118 (T=8192, k=6, dim 2048 bf16; docs/gpu-report.md, thirtieth session).
pub fn launch_rows_of(dev: &Device, tokens: &Buffer, row_bytes: usize, rows: &DeviceTensor, num_tokens: usize, out: &Buffer) -> Result<()> {
    let n = rows.numel();
    if let Some(plan) = rows.plan.as_ref().filter(|p| p.num_tokens == num_tokens && p.num_slots == n) {
        return launch_permute(dev, PermuteKernel::Scatter, tokens, row_bytes, plan, None, None, out, None);
    }
    if n == 0 || row_bytes == 0 {
        return Ok(());
    }
    let w = word_bytes(row_bytes);
    let words = (row_bytes / w) as i64;
    let (threads, col_blocks) = row_launch((words as usize).div_ceil(PERMUTE_UNROLL))?;
    let s = dev.stream();
    dev.launch(
        &format!("permute_gather_w{w}"),
        (n as u32, col_blocks),
        threads,
        &[
            Arg::U64(tokens.ptr(s)),
            Arg::U64(out.ptr(s)),
            Arg::I64(words),
            Arg::U64(rows.buf.ptr(s)),
            Arg::U64(0),
            Arg::U64(0),
            Arg::U64(0),
            Arg::I32(0),
        ],
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_lists_each_tokens_slots_in_ascending_order() {
        let csr = token_csr(&[0i32, 2, 0, 1, 2], 4).unwrap();
        assert_eq!(csr.start, vec![0, 2, 3, 5, 5]);
        assert_eq!(csr.slots, vec![0, 2, 3, 1, 4]);
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
