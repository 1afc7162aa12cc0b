//! The GPU entry of each op of this file: device tensors in, device tensors out (host tensors
//! go through [`crate::host`]: upload, this entry, download).
//!
//! * `permute_device` builds the plan on the GPU (kernels/plan.cu) and permutes with it; its
//!   sortedIndices carry the plan, so `unpermute_device` on them needs no host round trip.
//! * `unpermute_device`, `permute_backward_device`, `unpermute_backward_device` (kernels/permute.cu,
//!   kernels/layout.cu for the probs).
//! * `route_device` and `topk_device` run kernels/routing.cu.
//!
//! Arguments are checked by the core's check function of the op (`moe_core::permute::check_permute`
//! ...) on their dtypes and shapes ([`DeviceTensor::meta`]), which returns the sizes the kernels
//! take. When it fails, or a kernel reports an invalid value (a non-finite logit, a NaN, an index
//! out of range), the op runs the core on the host instead (`*_host`: download, the CPU op,
//! upload), so the error has the CPU backends' class and message, also where an input fails
//! several checks. Known limits of the device path (documented in docs/gpu-report.md): bool
//! tensors on the GPU are not rechecked for 0/1 (nonzero is true); permute (without dropAndPad)
//! synchronises once to read the number of slots (4 bytes), route and topk once to read their
//! error word (16 bytes).

use std::sync::Arc;

use moe_core::permute::{
    check_permute, check_permute_backward, check_unpermute, check_unpermute_backward, PermuteOptions, SlotProbsLayout, UnpermuteOptions,
};
use moe_core::routing::{check_route, check_route_backward, check_topk, RouteCheck, RouteOptions, ScoreFunction};
use moe_core::tensor::DType;

use crate::device::{Arg, Buffer, Device, HostWords, PendingRead, COUNTER_PLAN_TICKET};
use crate::error::{Error, Result};
use crate::permute::{self as ops, DevicePlan, PermuteKernel};
use crate::switch::Switch;
use crate::tensor::{download_opt, on_host, opt_meta, opt_ref, tensor_ref, upload_owned_opt, DeviceTensor, Picks};

/// Tokens a chunk of the plan kernels (PLAN_CHUNK in kernels/plan.cu).
const PLAN_CHUNK: usize = 64;
/// Tokens a block of the small-E plan kernels (`_c256` in kernels/plan.cu).
const SMALL_CHUNK: usize = 256;
/// The most experts of the small-E plan kernels: one 32-bit word a token (plan_small_*_w1 in
/// kernels/plan.cu; the template takes more words, but with E = 256 its two kernels took 0.103
/// ms against the four kernels' 0.073 on an H100, so wider maps keep those).
const SMALL_PLAN_MAX_E: usize = 32;

/// The plan built on the GPU, with permute's sortedIndices and tokensPerExpert.
pub struct GpuPlan {
    pub plan: DevicePlan,
    pub sorted_indices: Buffer,
    pub tokens_per_expert: Buffer,
    /// With an expected size: the true number of slots, to check once the kernels are queued.
    pub pending: Option<PendingRead>,
}

fn i32_arg(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("{what} = {v} exceeds the int32 indices of the CUDA kernels")))
}

/// Builds the dispatch plan of `map` (`[T, E]` bool bytes on the GPU): plain (`capacity` None)
/// or drop-and-pad. Same plan as moe-core's, bit for bit (kernels/plan.cu).
///
/// A plain plan's size (the number of selected entries) is known on the GPU only: it is read
/// back, which waits for the first two plan kernels. With `expected` (the caller's numOutTokens)
/// nothing waits: the plan is built for `expected` slots, and `GpuPlan::pending` reads the true
/// count later (the caller queues its kernels first and then checks it: a mismatch is an error).
pub fn build_plan(dev: &Device, map: &Buffer, num_tokens: usize, num_experts: usize, capacity: Option<usize>) -> Result<GpuPlan> {
    build_plan_expecting(dev, map, num_tokens, num_experts, capacity, None)
}

/// [`build_plan`] with the plain plan's expected number of slots (see there).
pub fn build_plan_expecting(
    dev: &Device,
    map: &Buffer,
    num_tokens: usize,
    num_experts: usize,
    capacity: Option<usize>,
    expected: Option<usize>,
) -> Result<GpuPlan> {
    let (t, e) = (i32_arg("numTokens", num_tokens)?, i32_arg("numExperts", num_experts)?);
    i32_arg("numTokens * numExperts", num_tokens.saturating_mul(num_experts))?;
    if capacity.is_none() && (1..=SMALL_PLAN_MAX_E).contains(&num_experts) && num_tokens > 0 {
        return build_small_plan(dev, map, num_tokens, num_experts, expected);
    }
    let chunks = num_tokens.div_ceil(PLAN_CHUNK);
    let col_threads = (num_experts.min(256).div_ceil(32).max(1) * 32) as u32;
    let col_blocks = num_experts.div_ceil(col_threads as usize) as u32;
    let s = dev.stream();
    let chunk_counts = dev.alloc("the plan (chunk counts)", chunks * num_experts * 4)?;
    // 16 routing bytes a load where the rows are whole aligned 16-byte vectors
    let aligned = map.ptr(s) % 16 == 0 && num_experts % 16 == 0 && num_experts > 0;
    if aligned && 256 % (num_experts / 16) == 0 {
        dev.launch_shared(
            "plan_chunk_count_v",
            (chunks as u32, 1),
            256,
            16 * 1024,
            &[Arg::U64(map.ptr(s)), Arg::I32(t), Arg::I32(e), Arg::U64(chunk_counts.ptr(s))],
        )?;
    } else {
        dev.launch(
            "plan_chunk_count",
            (chunks as u32, col_blocks),
            col_threads,
            &[Arg::U64(map.ptr(s)), Arg::I32(t), Arg::I32(e), Arg::U64(chunk_counts.ptr(s))],
        )?;
    }
    let counts = dev.alloc("the plan (counts)", num_experts * 4)?;
    let tokens_per_expert = dev.alloc("tokensPerExpert", num_experts * 4)?;
    let expert_offsets = dev.alloc("the plan (expert offsets)", (num_experts + 1) * 4)?;
    let (cap, drop) = (i32_arg("capacity", capacity.unwrap_or(0))?, capacity.is_some() as i32);
    dev.launch(
        "plan_chunk_scan",
        (num_experts.div_ceil(8) as u32, 1),
        256,
        &[
            Arg::U64(chunk_counts.ptr(s)),
            Arg::I32(chunks as i32),
            Arg::I32(e),
            Arg::I32(cap),
            Arg::I32(drop),
            Arg::U64(counts.ptr(s)),
            Arg::U64(tokens_per_expert.ptr(s)),
        ],
    )?;
    dev.launch("plan_expert_offsets", (1, 1), 1024, &[Arg::U64(tokens_per_expert.ptr(s)), Arg::I32(e), Arg::U64(expert_offsets.ptr(s))])?;
    let (num_slots, pending) = match capacity {
        Some(c) => (num_experts * c, None),
        None => slot_count(dev, &expert_offsets, num_experts, expected)?,
    };
    i32_arg("numSlots", num_slots)?;
    let sorted_indices = dev.alloc("sortedIndices", num_slots * 4)?;
    let words = num_experts.div_ceil(32);
    if capacity.is_none() && words * PLAN_CHUNK * 4 <= 48 * 1024 {
        // a plain plan: one kernel for sortedIndices and the token CSR
        let row_ptr = dev.alloc("the plan (row offsets)", (num_tokens + 1) * 4)?;
        let slots = dev.alloc("the plan (slots)", num_slots * 4)?;
        if num_tokens == 0 {
            dev.memset_zero("the plan (row offsets)", &row_ptr, 4)?;
        }
        dev.launch_shared(
            "plan_rows",
            (chunks as u32, 1),
            256,
            (words * PLAN_CHUNK * 4) as u32,
            &[
                Arg::U64(map.ptr(s)),
                Arg::I32(t),
                Arg::I32(e),
                Arg::U64(chunk_counts.ptr(s)),
                Arg::U64(expert_offsets.ptr(s)),
                Arg::I32(num_slots as i32),
                Arg::U64(sorted_indices.ptr(s)),
                Arg::U64(row_ptr.ptr(s)),
                Arg::U64(slots.ptr(s)),
                Arg::I32((aligned && 32 % (num_experts / 16) == 0) as i32),
            ],
        )?;
        return Ok(GpuPlan {
            plan: DevicePlan { num_tokens, num_slots, num_experts, row_ptr, slots, expert_offsets, map: None },
            sorted_indices,
            tokens_per_expert,
            pending,
        });
    }
    // every (t, e) is written by plan_fill (-1: no slot)
    let slot_of = dev.alloc("the plan (slot of each token and expert)", num_tokens * num_experts * 4)?;
    let row_counts = dev.alloc("the plan (slots per token)", num_tokens * 4)?;
    dev.memset_u32("the plan (slots per token)", &row_counts, 0, num_tokens)?;
    dev.launch(
        "plan_fill",
        (chunks as u32, col_blocks),
        col_threads,
        &[
            Arg::U64(map.ptr(s)),
            Arg::I32(t),
            Arg::I32(e),
            Arg::U64(chunk_counts.ptr(s)),
            Arg::U64(counts.ptr(s)),
            Arg::U64(expert_offsets.ptr(s)),
            Arg::I32(cap),
            Arg::I32(drop),
            Arg::I32(num_slots as i32),
            Arg::U64(sorted_indices.ptr(s)),
            Arg::U64(slot_of.ptr(s)),
            Arg::U64(row_counts.ptr(s)),
        ],
    )?;
    let row_ptr = dev.alloc("the plan (row offsets)", (num_tokens + 1) * 4)?;
    dev.launch("scan_exclusive", (1, 1), 1024, &[Arg::U64(row_counts.ptr(s)), Arg::I32(t), Arg::U64(row_ptr.ptr(s))])?;
    let slots = dev.alloc("the plan (slots)", num_slots * 4)?;
    dev.launch(
        "plan_row_fill",
        (num_tokens.div_ceil(4) as u32, 1),
        128,
        &[Arg::U64(slot_of.ptr(s)), Arg::I32(t), Arg::I32(e), Arg::U64(row_ptr.ptr(s)), Arg::U64(slots.ptr(s))],
    )?;
    Ok(GpuPlan {
        plan: DevicePlan { num_tokens, num_slots, num_experts, row_ptr, slots, expert_offsets, map: None },
        sorted_indices,
        tokens_per_expert,
        pending,
    })
}

/// A plain plan's number of slots (expert_offsets[E]): the caller's expected count, taken on
/// trust with its check queued (the pending read), or read back now.
fn slot_count(dev: &Device, expert_offsets: &Buffer, num_experts: usize, expected: Option<usize>) -> Result<(usize, Option<PendingRead>)> {
    Ok(match expected {
        Some(n) => (n, Some(dev.read_later("the number of slots", expert_offsets, num_experts)?)),
        None => (dev.read_head::<i32, 1>("the number of slots", expert_offsets, num_experts)?[0] as usize, None),
    })
}

/// A plain plan with 1..=32 experts and some tokens: two kernels (plan_small_count_w1, whose
/// last block also scans, then plan_small_rows_w1), the same outputs as the general path.
fn build_small_plan(dev: &Device, map: &Buffer, num_tokens: usize, num_experts: usize, expected: Option<usize>) -> Result<GpuPlan> {
    let (t, e) = (num_tokens as i32, num_experts as i32);
    let chunk = SMALL_CHUNK;
    let chunks = num_tokens.div_ceil(chunk);
    let grid = u32::try_from(chunks).map_err(|_| Error::Cuda(format!("the plan: {num_tokens} tokens exceed one launch")))?;
    let w = num_experts.div_ceil(32);
    let s = dev.stream();
    let ticket = dev.zeroed_counters(COUNTER_PLAN_TICKET + 1)? + 4 * COUNTER_PLAN_TICKET as u64;
    let chunk_counts = dev.alloc("the plan (chunk counts)", chunks * num_experts * 4)?;
    let tokens_per_expert = dev.alloc("tokensPerExpert", num_experts * 4)?;
    let expert_offsets = dev.alloc("the plan (expert offsets)", (num_experts + 1) * 4)?;
    dev.launch(
        &format!("plan_small_count_w{w}_c{chunk}"),
        (grid, 1),
        chunk as u32,
        &[
            Arg::U64(map.ptr(s)),
            Arg::I32(t),
            Arg::I32(e),
            Arg::U64(chunk_counts.ptr(s)),
            Arg::U64(ticket),
            Arg::U64(tokens_per_expert.ptr(s)),
            Arg::U64(expert_offsets.ptr(s)),
        ],
    )?;
    let (num_slots, pending) = slot_count(dev, &expert_offsets, num_experts, expected)?;
    i32_arg("numSlots", num_slots)?;
    let sorted_indices = dev.alloc("sortedIndices", num_slots * 4)?;
    let row_ptr = dev.alloc("the plan (row offsets)", (num_tokens + 1) * 4)?;
    let slots = dev.alloc("the plan (slots)", num_slots * 4)?;
    dev.launch(
        &format!("plan_small_rows_w{w}_c{chunk}"),
        (grid, 1),
        chunk as u32,
        &[
            Arg::U64(map.ptr(s)),
            Arg::I32(t),
            Arg::I32(e),
            Arg::U64(chunk_counts.ptr(s)),
            Arg::U64(expert_offsets.ptr(s)),
            Arg::I32(num_slots as i32),
            Arg::U64(sorted_indices.ptr(s)),
            Arg::U64(row_ptr.ptr(s)),
            Arg::U64(slots.ptr(s)),
        ],
    )?;
    Ok(GpuPlan {
        plan: DevicePlan { num_tokens, num_slots, num_experts, row_ptr, slots, expert_offsets, map: None },
        sorted_indices,
        tokens_per_expert,
        pending,
    })
}

/// The most routing-map bytes (T * E) of the fused permute: every block of it reads the whole
/// map (128 KiB at the Mixtral-like shape's T = 16384, E = 8), so it pays only for small maps.
const FUSED_MAP_BYTES: usize = 256 * 1024;
/// Tokens a block of the fused permute at most (FUSED_MAX_CHUNK in kernels/plan.cu), and slots
/// of a block's tokens at most (FUSED_MAX_LOCAL_SLOTS).
const FUSED_MAX_CHUNK: usize = 256;
const FUSED_MAX_LOCAL_SLOTS: usize = 4096;

/// Whether permute runs as one kernel (`permute_fused_w*` in kernels/plan.cu: the plan and the
/// copy) where it applies ([`fused_permute_chunk`]): off by default, measured slower (H200, run
/// 13: 0.152 ms against 0.123 for the plan kernels and the permute kernel at the Mixtral-like
/// shape; docs/gpu-report.md); `MOE_DISPATCH_FUSED_PERMUTE=on` or
/// [`set_fused_permute`]`(Some(true))` turns it on (the benchmark times both).
static FUSED_PERMUTE: Switch = Switch::opt_in("MOE_DISPATCH_FUSED_PERMUTE");

/// Overrides whether permute runs as one kernel where it applies: `Some(true)` yes, `Some(false)`
/// or `None` (the default) no.
pub fn set_fused_permute(mode: Option<bool>) {
    FUSED_PERMUTE.set(mode);
}

/// The tokens a block of the fused permute takes, or None where it does not apply: a plain plan
/// of known size (`num_slots`, the caller's numOutTokens) with 1, 2, 4, 8, 16 or 32 experts (so
/// 16 routing bytes hold whole rows or half rows), a map of at most [`FUSED_MAP_BYTES`] on a
/// 16-byte boundary, a block's words within int32; or switched off. About two blocks an SM, 32 to
/// 256 tokens a block (a multiple of 32, so every block's first routing byte starts a 16-byte
/// vector), and at most FUSED_MAX_LOCAL_SLOTS slots a block.
fn fused_permute_chunk(
    dev: &Device,
    map: &Buffer,
    num_tokens: usize,
    num_experts: usize,
    num_slots: usize,
    row_bytes: usize,
) -> Option<usize> {
    let applies = [1, 2, 4, 8, 16, 32].contains(&num_experts)
        && num_tokens > 0
        && num_slots > 0
        && num_tokens * num_experts <= FUSED_MAP_BYTES
        && map.ptr(dev.stream()) % 16 == 0;
    if !(applies && FUSED_PERMUTE.on()) {
        return None;
    }
    let most = FUSED_MAX_CHUNK.min(FUSED_MAX_LOCAL_SLOTS / num_experts);
    let chunk = num_tokens.div_ceil(2 * dev.sm_count().max(1)).next_multiple_of(32).clamp(32, most);
    let words = row_bytes / ops::word_bytes(row_bytes);
    (chunk.checked_mul(words)? <= i32::MAX as usize).then_some(chunk)
}

/// A fused permute's sizes ([`fused_permute_chunk`] said it applies).
struct FusedPermute<'a> {
    map: &'a Buffer,
    num_tokens: usize,
    num_experts: usize,
    chunk: usize,
    num_slots: usize,
    row_bytes: usize,
}

/// Queues `permute_fused_w*`: the plan of `f.map` for `f.num_slots` slots (with the true count's
/// read queued after it, as [`build_plan_expecting`] does) and the permuted rows and probs.
fn launch_fused_permute(
    dev: &Device,
    f: FusedPermute,
    tokens: &Buffer,
    dense_probs: Option<&Buffer>,
    out: &Buffer,
    out_probs: Option<&Buffer>,
) -> Result<GpuPlan> {
    let s = dev.stream();
    let (t, e) = (f.num_tokens, f.num_experts);
    let sorted_indices = dev.alloc("sortedIndices", f.num_slots * 4)?;
    let row_ptr = dev.alloc("the plan (row offsets)", (t + 1) * 4)?;
    let slots = dev.alloc("the plan (slots)", f.num_slots * 4)?;
    let tokens_per_expert = dev.alloc("tokensPerExpert", e * 4)?;
    let expert_offsets = dev.alloc("the plan (expert offsets)", (e + 1) * 4)?;
    let w = ops::word_bytes(f.row_bytes);
    let grid = u32::try_from(t.div_ceil(f.chunk)).map_err(|_| Error::Cuda(format!("permute: {t} tokens exceed one launch")))?;
    dev.launch(
        &format!("permute_fused_w{w}"),
        (grid, 1),
        512,
        &[
            Arg::U64(f.map.ptr(s)),
            Arg::I32(t as i32),
            Arg::I32(e as i32),
            Arg::I32(f.chunk as i32),
            Arg::U64(tokens.ptr(s)),
            Arg::U64(out.ptr(s)),
            Arg::I32((f.row_bytes / w) as i32),
            Arg::U64(dense_probs.map_or(0, |b| b.ptr(s))),
            Arg::U64(out_probs.map_or(0, |b| b.ptr(s))),
            Arg::I32(f.num_slots as i32),
            Arg::U64(sorted_indices.ptr(s)),
            Arg::U64(row_ptr.ptr(s)),
            Arg::U64(slots.ptr(s)),
            Arg::U64(tokens_per_expert.ptr(s)),
            Arg::U64(expert_offsets.ptr(s)),
        ],
    )?;
    let (num_slots, pending) = slot_count(dev, &expert_offsets, e, Some(f.num_slots))?;
    Ok(GpuPlan {
        plan: DevicePlan { num_tokens: t, num_slots, num_experts: e, row_ptr, slots, expert_offsets, map: None },
        sorted_indices,
        tokens_per_expert,
        pending,
    })
}

/// What [`permute_device`] returns: device tensors.
pub struct DevicePermuted {
    pub permuted_tokens: DeviceTensor,
    pub permuted_probs: Option<DeviceTensor>,
    /// Carries the plan (for unpermute on the GPU).
    pub sorted_indices: DeviceTensor,
    pub tokens_per_expert: DeviceTensor,
}

/// permute on device tensors; the plan is built on the GPU.
pub fn permute_device(
    dev: &Device,
    tokens: &DeviceTensor,
    routing_map: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    options: PermuteOptions,
) -> Result<DevicePermuted> {
    let host = || permute_host(dev, tokens, routing_map, probs, options);
    let Ok(c) = check_permute(tokens.meta("tokens"), routing_map.meta("routingMap"), opt_meta(probs, "probs"), options) else {
        return host();
    };
    let (num_tokens, num_experts) = (c.num_tokens, c.num_experts);
    if num_experts == 0 {
        // no experts, no slots: the core's (empty) answer, with no plan kernels to launch
        return host();
    }
    let expected = if c.capacity.is_none() {
        options.num_out_tokens.filter(|&m| m <= num_tokens.saturating_mul(num_experts) && i32::try_from(m).is_ok())
    } else {
        None
    };
    let hidden = c.hidden;
    let row_bytes = hidden * tokens.dtype.size();
    let fused =
        expected.and_then(|n| fused_permute_chunk(dev, &routing_map.buf, num_tokens, num_experts, n, row_bytes).map(|chunk| (n, chunk)));
    let (mut gp, out, out_probs) = if let Some((n, chunk)) = fused {
        // the plan and the copy in one kernel
        let out = DeviceTensor::alloc(dev, "permutedTokens", tokens.dtype, vec![n, hidden])?;
        let out_probs = probs.map(|_| DeviceTensor::alloc(dev, "permutedProbs", DType::F32, vec![n])).transpose()?;
        let gp = launch_fused_permute(
            dev,
            FusedPermute { map: &routing_map.buf, num_tokens, num_experts, chunk, num_slots: n, row_bytes },
            &tokens.buf,
            probs.map(|p| &p.buf),
            &out.buf,
            out_probs.as_ref().map(|p| &p.buf),
        )?;
        (gp, out, out_probs)
    } else {
        let gp = build_plan_expecting(dev, &routing_map.buf, num_tokens, num_experts, c.capacity, expected)?;
        let n = gp.plan.num_slots;
        let out = DeviceTensor::alloc(dev, "permutedTokens", tokens.dtype, vec![n, hidden])?;
        let out_probs = probs.map(|_| DeviceTensor::alloc(dev, "permutedProbs", DType::F32, vec![n])).transpose()?;
        ops::launch_permute(
            dev,
            PermuteKernel::Scatter,
            &tokens.buf,
            row_bytes,
            &gp.plan,
            None,
            probs.map(|p| &p.buf),
            &out.buf,
            out_probs.as_ref().map(|p| &p.buf),
        )?;
        (gp, out, out_probs)
    };
    let n = gp.plan.num_slots;
    let count = match gp.pending.take() {
        // a map of known size (made from route's picks, every token's k): nothing to wait for
        Some(_) if routing_map.facts.true_entries == Some(n) => n,
        // numOutTokens was taken on trust to queue the kernels
        Some(pending) => pending.finish(dev)? as usize,
        None => n,
    };
    if c.capacity.is_none() && moe_core::permute::check_num_out_tokens(options, count).is_err() {
        return host();
    }
    let mut sorted = DeviceTensor::from_buffer(DType::I32, vec![n], gp.sorted_indices);
    // the counts add up to the slots (checked above), as the grouped experts need them to
    let mut counts = DeviceTensor::from_buffer(DType::I32, vec![num_experts], gp.tokens_per_expert);
    counts.facts.counts_total = Some(n);
    // the plan's offsets are this map's: the backward ops that take the map need not check it
    sorted.plan = Some(Arc::new(DevicePlan { map: Some(routing_map.buf.id()), ..gp.plan }));
    Ok(DevicePermuted { permuted_tokens: out, permuted_probs: out_probs, sorted_indices: sorted, tokens_per_expert: counts })
}

/// permute on the host for device inputs: download, the core (its checks, its error), upload.
fn permute_host(
    dev: &Device,
    tokens: &DeviceTensor,
    routing_map: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    options: PermuteOptions,
) -> Result<DevicePermuted> {
    let out = on_host(dev, [("tokens", tokens), ("routingMap", routing_map)], [("probs", probs)], |[t, m], [p]| {
        moe_core::permute::permute(&t, &m, p.as_ref(), options)
    })?;
    Ok(DevicePermuted {
        permuted_tokens: DeviceTensor::upload_owned(dev, "permutedTokens", &out.permuted_tokens)?,
        permuted_probs: upload_owned_opt(dev, "permutedProbs", out.permuted_probs.as_ref())?,
        sorted_indices: DeviceTensor::upload_owned(dev, "sortedIndices", &out.sorted_indices)?,
        tokens_per_expert: DeviceTensor::upload_owned(dev, "tokensPerExpert", &out.tokens_per_expert)?,
    })
}

/// unpermute on device tensors. With sortedIndices made by [`permute_device`] nothing leaves
/// the GPU; with other device sortedIndices, they (4 bytes a slot) are read back to build the
/// token CSR. Dense probs (`[T, E]` with the routing map) are picked per slot on the GPU
/// (kernels/layout.cu), the map's routes checked there.
pub fn unpermute_device(
    dev: &Device,
    permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    restore_shape: [usize; 2],
    probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<DeviceTensor> {
    let host = || unpermute_host(dev, permuted, sorted_indices, restore_shape, probs, routing_map, options);
    let checked = check_unpermute(
        permuted.meta("permutedTokens"),
        sorted_indices.meta("sortedIndices"),
        restore_shape,
        opt_meta(probs, "probs"),
        opt_meta(routing_map, "routingMap"),
        options,
    );
    let Ok(c) = checked else { return host() };
    let (num_tokens, hidden, n) = (c.num_tokens, c.hidden, c.num_slots);
    let dense_map = match (c.probs, routing_map) {
        (SlotProbsLayout::Dense { num_experts }, Some(m)) if num_experts > 0 && gpu_map_fits(m) => Some(m),
        (SlotProbsLayout::Dense { .. }, _) => return host(),
        _ => None,
    };
    let Some(csr) = csr_of(dev, sorted_indices, num_tokens)? else { return host() };
    // the weight of every slot: per-slot probs as they are, dense ones picked on the GPU
    let slot_probs = match (dense_map, probs) {
        (Some(map), Some(p)) => {
            let w = dev.alloc("the slot probs", n * 4)?;
            if slot_experts(dev, map, sorted_indices, n, num_tokens, options.drop_and_pad, Some((&p.buf, &w)))?.is_none() {
                return host();
            }
            Some(w)
        }
        _ => None,
    };
    let weights = slot_probs.as_ref().or(probs.map(|p| &p.buf));
    let out = DeviceTensor::alloc(dev, "the output", permuted.dtype, vec![num_tokens, hidden])?;
    let (row_ptr, slots) = csr_parts(&csr)?;
    ops::launch_unpermute(dev, permuted.dtype, &permuted.buf, hidden, num_tokens, row_ptr, slots, weights, &out.buf)?;
    Ok(out)
}

fn unpermute_host(
    dev: &Device,
    permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    restore_shape: [usize; 2],
    probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<DeviceTensor> {
    let required = [("permutedTokens", permuted), ("sortedIndices", sorted_indices)];
    let out = on_host(dev, required, [("probs", probs), ("routingMap", routing_map)], |[x, s], [p, m]| {
        moe_core::permute::unpermute(&x, &s, restore_shape, p.as_ref(), m.as_ref(), options)
    })?;
    DeviceTensor::upload_owned(dev, "the output", &out)
}

// ---------------------------------------------------------------------------------------
// Backward passes of permute and unpermute

/// A token CSR on the GPU: the plan a sortedIndices tensor carries, or (row_ptr, slots) built now.
type TokenCsrOnGpu = (Option<Arc<DevicePlan>>, Option<(Buffer, Buffer)>);

/// The token CSR of device sortedIndices for `num_tokens` tokens: the plan they carry, or one
/// built from them (read back: 4 bytes a slot). None when an index is out of range (the core
/// reports it).
fn csr_of(dev: &Device, sorted: &DeviceTensor, num_tokens: usize) -> Result<Option<TokenCsrOnGpu>> {
    let n = sorted.numel();
    if let Some(plan) = &sorted.plan {
        if plan.num_tokens == num_tokens && plan.num_slots == n {
            return Ok(Some((Some(plan.clone()), None)));
        }
    }
    let idx: Vec<i32> = dev.download_new("sortedIndices", &sorted.buf, n)?;
    if idx.iter().any(|&t| t < 0 || t as usize >= num_tokens) {
        return Ok(None);
    }
    let csr = ops::token_csr(&idx, num_tokens)?;
    Ok(Some((None, Some((dev.upload("the plan (row offsets)", &csr.start)?, dev.upload("the plan (slots)", &csr.slots)?)))))
}

/// (row_ptr, slots) of a token CSR.
fn csr_parts(csr: &TokenCsrOnGpu) -> Result<(&Buffer, &Buffer)> {
    match csr {
        (Some(p), _) => Ok((&p.row_ptr, &p.slots)),
        (None, Some((r, s))) => Ok((r, s)),
        _ => Err(Error::Cuda("no token CSR (a bug in moe-dispatch)".into())),
    }
}

/// How the expert of each slot is known: `i / capacity` (drop-and-pad), or the expert offsets
/// (`[E + 1]`) of the routing map's column counts (plain mode).
struct SlotExperts {
    num_experts: usize,
    capacity: usize,
    drop_and_pad: bool,
    offsets: Option<Buffer>,
}

/// Whether the GPU kernels take a routing map that passed the core's checks (its columns fit
/// one launch, its cells int32 offsets).
fn gpu_map_fits(map: &DeviceTensor) -> bool {
    crate::layout::columns_fit(map.shape[1]) && map.numel().checked_mul(4).is_some()
}

/// The expert of every slot, checked as the core's `slot_experts_of(.., check_routed = true)`
/// checks it: in plain mode the map must select exactly `n` entries and route each slot's token
/// to its expert. With `dense` (`[T, E]` f32) also fills `weights [n]` with each slot's prob.
/// None when a check fails (the core reports it). Reads 4 bytes, plus the error word in plain mode.
fn slot_experts(
    dev: &Device,
    map: &DeviceTensor,
    sorted: &DeviceTensor,
    n: usize,
    num_tokens: usize,
    drop_and_pad: bool,
    dense: Option<(&Buffer, &Buffer)>,
) -> Result<Option<SlotExperts>> {
    let e = map.shape[1];
    let s = dev.stream();
    // sortedIndices whose plan permute built from this very map: the plan's expert offsets are
    // the map's and every slot's expert is set in it, so nothing needs checking (or reading)
    let from_map = sorted
        .plan
        .as_ref()
        .filter(|p| !drop_and_pad && p.map == Some(map.buf.id()) && p.num_slots == n && p.num_tokens == num_tokens && p.num_experts == e);
    let (capacity, offsets) = if drop_and_pad {
        (n / e, None)
    } else if let Some(plan) = from_map {
        let offsets = dev.alloc("the offsets", (e + 1) * 4)?;
        dev.copy(&offsets, &plan.expert_offsets, (e + 1) * 4)?;
        (0, Some(offsets))
    } else {
        let (_, counts) = crate::layout::column_counts(dev, &map.buf, num_tokens, e)?;
        let offsets = crate::layout::exclusive_offsets(dev, &counts, e)?;
        if dev.read_head::<i32, 1>("the routed entries", &offsets, e)?[0] as usize != n {
            return Ok(None);
        }
        (0, Some(offsets))
    };
    // the kernel fills each slot's prob from `dense`, and checks the slots against the map
    let need_check = (!drop_and_pad && from_map.is_none()) || dense.is_some();
    if n > 0 && need_check {
        let err = crate::layout::error_word(dev)?;
        dev.launch(
            "slot_expert_check",
            (n.div_ceil(256) as u32, 1),
            256,
            &[
                Arg::U64(sorted.buf.ptr(s)),
                Arg::I32(n as i32),
                Arg::U64(offsets.as_ref().map_or(0, |o| o.ptr(s))),
                Arg::I32(e as i32),
                Arg::I32(capacity as i32),
                Arg::I32(drop_and_pad as i32),
                Arg::U64(map.buf.ptr(s)),
                Arg::U64(dense.map_or(0, |(d, _)| d.ptr(s))),
                Arg::U64(dense.map_or(0, |(_, w)| w.ptr(s))),
                Arg::U64(err.ptr(s)),
            ],
        )?;
        if !drop_and_pad && from_map.is_none() && crate::layout::error_set(dev, &err)? {
            return Ok(None);
        }
    }
    Ok(Some(SlotExperts { num_experts: e, capacity, drop_and_pad, offsets }))
}

/// `[T, E]` f32: each slot's `g[i]` added at (its token, its expert), each cell summing its
/// slots in ascending slot order from +0 (one thread per token row: no float atomics).
fn scatter_slot_grads(dev: &Device, csr: &TokenCsrOnGpu, num_tokens: usize, g: &Buffer, ex: &SlotExperts) -> Result<DeviceTensor> {
    let e = ex.num_experts;
    let dense = DeviceTensor::alloc(dev, "gradProbs", DType::F32, vec![num_tokens, e])?;
    dev.memset_u32("gradProbs", &dense.buf, 0, num_tokens * e)?;
    let (row_ptr, slots) = csr_parts(csr)?;
    let s = dev.stream();
    if e > 0 {
        dev.launch(
            "probs_grad_scatter",
            (num_tokens.div_ceil(128) as u32, 1),
            128,
            &[
                Arg::U64(row_ptr.ptr(s)),
                Arg::U64(slots.ptr(s)),
                Arg::I32(num_tokens as i32),
                Arg::U64(g.ptr(s)),
                Arg::I32(e as i32),
                Arg::I32(ex.capacity as i32),
                Arg::I32(ex.drop_and_pad as i32),
                Arg::U64(ex.offsets.as_ref().map_or(0, |o| o.ptr(s))),
                Arg::U64(dense.buf.ptr(s)),
            ],
        )?;
    }
    Ok(dense)
}

#[allow(clippy::too_many_arguments)]
fn permute_backward_host(
    dev: &Device,
    grad_permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    num_tokens: usize,
    grad_permuted_probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let required = [("gradPermuted", grad_permuted), ("sortedIndices", sorted_indices)];
    let out = on_host(dev, required, [("gradPermutedProbs", grad_permuted_probs), ("routingMap", routing_map)], |[g, s], [p, m]| {
        moe_core::permute::permute_backward(&g, &s, num_tokens, p.as_ref(), m.as_ref(), options)
    })?;
    Ok((DeviceTensor::upload_owned(dev, "gradTokens", &out.grad_tokens)?, upload_owned_opt(dev, "gradProbs", out.grad_probs.as_ref())?))
}

/// permuteBackward on device tensors: `gradTokens [T, H]` sums each token's slot gradients in
/// ascending slot order (the unpermute kernel without weights: the core's bits). With
/// `gradPermutedProbs`, `gradProbs [T, E]` is built on the GPU too (kernels/layout.cu): each
/// slot's gradient lands at (its token, its expert), summed in slot order. Errors (and shapes
/// the GPU path does not take) run the core on the host.
pub fn permute_backward_device(
    dev: &Device,
    grad_permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    num_tokens: usize,
    grad_permuted_probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let host = || permute_backward_host(dev, grad_permuted, sorted_indices, num_tokens, grad_permuted_probs, routing_map, options);
    let checked = check_permute_backward(
        grad_permuted.meta("gradPermuted"),
        sorted_indices.meta("sortedIndices"),
        num_tokens,
        opt_meta(grad_permuted_probs, "gradPermutedProbs"),
        opt_meta(routing_map, "routingMap"),
        options,
    );
    let Ok(c) = checked else { return host() };
    let n = c.num_slots;
    if i32::try_from(n).is_err() || (c.num_experts.is_some() && !routing_map.is_some_and(gpu_map_fits)) {
        return host();
    }
    let Some(csr) = csr_of(dev, sorted_indices, num_tokens)? else { return host() };
    // the probs gradient first: its checks may send the op to the host path
    let grad_probs = match (grad_permuted_probs, routing_map) {
        (Some(gp), Some(map)) => {
            let Some(ex) = slot_experts(dev, map, sorted_indices, n, num_tokens, options.drop_and_pad, None)? else { return host() };
            Some(scatter_slot_grads(dev, &csr, num_tokens, &gp.buf, &ex)?)
        }
        _ => None,
    };
    let hidden = c.hidden;
    let out = DeviceTensor::alloc(dev, "gradTokens", grad_permuted.dtype, vec![num_tokens, hidden])?;
    let (row_ptr, slots) = csr_parts(&csr)?;
    ops::launch_unpermute(dev, grad_permuted.dtype, &grad_permuted.buf, hidden, num_tokens, row_ptr, slots, None, &out.buf)?;
    Ok((out, grad_probs))
}

#[allow(clippy::too_many_arguments)]
fn unpermute_backward_host(
    dev: &Device,
    grad_output: &DeviceTensor,
    permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let required = [("gradOutput", grad_output), ("permutedTokens", permuted), ("sortedIndices", sorted_indices)];
    let out = on_host(dev, required, [("probs", probs), ("routingMap", routing_map)], |[g, x, s], [p, m]| {
        moe_core::permute::unpermute_backward(&g, &x, &s, p.as_ref(), m.as_ref(), options)
    })?;
    Ok((DeviceTensor::upload_owned(dev, "gradPermuted", &out.grad_permuted)?, upload_owned_opt(dev, "gradProbs", out.grad_probs.as_ref())?))
}

/// unpermuteBackward on device tensors. Without probs: `gradPermuted[i] = gradOutput[sortedIndices[i]]`
/// (a row gather, bit-exact). With probs (per slot `[N]`, or dense `[T, E]` with the routing
/// map), on the GPU too (kernels/layout.cu): `gradPermuted[i] = gradOutput[token] * p_i` rounded
/// once, and `gradProbs` the per-slot dot products (exact f64 products summed in hidden order
/// from -0.0, rounded to f32: the core's), scattered to `[T, E]` for dense probs. Errors (and
/// shapes the GPU path does not take) run the core on the host.
pub fn unpermute_backward_device(
    dev: &Device,
    grad_output: &DeviceTensor,
    permuted: &DeviceTensor,
    sorted_indices: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    routing_map: Option<&DeviceTensor>,
    options: UnpermuteOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let host = || unpermute_backward_host(dev, grad_output, permuted, sorted_indices, probs, routing_map, options);
    let checked = check_unpermute_backward(
        grad_output.meta("gradOutput"),
        permuted.meta("permutedTokens"),
        sorted_indices.meta("sortedIndices"),
        opt_meta(probs, "probs"),
        opt_meta(routing_map, "routingMap"),
        options,
    );
    let Ok(c) = checked else { return host() };
    let (num_tokens, n, hidden) = (c.num_tokens, c.num_slots, c.hidden);
    // Without probs the core ignores routingMap; per-slot probs ignore it too.
    let dense = matches!(c.probs, SlotProbsLayout::Dense { .. });
    if i32::try_from(n).is_err() || (dense && !routing_map.is_some_and(gpu_map_fits)) {
        return host();
    }
    // sortedIndices in range (and the token CSR, for dense probs)
    let csr = if dense {
        match csr_of(dev, sorted_indices, num_tokens)? {
            Some(c) => Some(c),
            None => return host(),
        }
    } else {
        let valid = match &sorted_indices.plan {
            Some(p) if p.num_tokens == num_tokens && p.num_slots == n => true,
            _ => {
                let idx: Vec<i32> = dev.download_new("sortedIndices", &sorted_indices.buf, n)?;
                idx.iter().all(|&t| t >= 0 && (t as usize) < num_tokens)
            }
        };
        if !valid {
            return host();
        }
        None
    };
    let s = dev.stream();
    // the weight of every slot, and the expert of every slot (dense probs)
    let (slot_probs, experts): (Option<Buffer>, Option<SlotExperts>) = match (probs, dense) {
        (Some(p), true) => {
            let map = routing_map
                .ok_or_else(|| Error::Cuda("unpermuteBackward: dense probs without a routing map (a bug in moe-dispatch)".into()))?;
            let w = dev.alloc("the slot probs", n * 4)?;
            let Some(ex) = slot_experts(dev, map, sorted_indices, n, num_tokens, options.drop_and_pad, Some((&p.buf, &w)))? else {
                return host();
            };
            (Some(w), Some(ex))
        }
        _ => (None, None),
    };
    let weights: Option<&Buffer> = match (&slot_probs, probs) {
        (Some(w), _) => Some(w),
        (None, Some(p)) => Some(&p.buf),
        (None, None) => None,
    };
    let out = DeviceTensor::alloc(dev, "gradPermuted", grad_output.dtype, vec![n, hidden])?;
    let row_bytes = hidden * grad_output.dtype.size();
    let tag = match grad_output.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    match weights {
        None => {
            ops::launch_rows_of(dev, &grad_output.buf, row_bytes, sorted_indices, num_tokens, &out.buf)?;
            return Ok((out, None));
        }
        Some(w) => {
            if n > 0 && hidden > 0 {
                let (threads, col_blocks) = ops::row_launch(hidden)?;
                dev.launch(
                    &format!("unpermute_bwd_scale_{tag}"),
                    (n as u32, col_blocks),
                    threads,
                    &[
                        Arg::U64(grad_output.buf.ptr(s)),
                        Arg::U64(sorted_indices.buf.ptr(s)),
                        Arg::U64(w.ptr(s)),
                        Arg::U64(out.buf.ptr(s)),
                        Arg::I64(hidden as i64),
                    ],
                )?;
            }
        }
    }
    // per-slot dot products
    let dots = dev.alloc("gradProbs", n * 4)?;
    dev.launch(
        &format!("slot_dot_{tag}"),
        (n.div_ceil(4) as u32, 1),
        128,
        &[
            Arg::U64(grad_output.buf.ptr(s)),
            Arg::U64(permuted.buf.ptr(s)),
            Arg::U64(sorted_indices.buf.ptr(s)),
            Arg::I32(n as i32),
            Arg::I64(hidden as i64),
            Arg::U64(dots.ptr(s)),
        ],
    )?;
    let grad_probs = match (experts, &csr) {
        (Some(ex), Some(csr)) => scatter_slot_grads(dev, csr, num_tokens, &dots, &ex)?,
        _ => DeviceTensor::from_buffer(DType::F32, vec![n], dots),
    };
    Ok((out, Some(grad_probs)))
}

// ---------------------------------------------------------------------------------------
// Routing

/// What [`route_device`] returns (the core's `Routed`, on the GPU).
pub struct DeviceRouted {
    pub weights: DeviceTensor,
    pub indices: DeviceTensor,
    pub scores: DeviceTensor,
    pub tokens_per_expert: DeviceTensor,
}

/// The two error words the route and topk kernels set to 0 on a non-finite input: mapped host
/// memory when the driver gives it (read after a synchronize, with no copy: about 9 us less a
/// call on an H100), else a device buffer that is read back.
pub enum ErrWords<'a> {
    Host(HostWords<'a>),
    Device(Buffer),
}

impl<'a> ErrWords<'a> {
    fn new(dev: &'a Device) -> Result<ErrWords<'a>> {
        if let Some(h) = dev.host_words::<2>(u64::MAX) {
            return Ok(ErrWords::Host(h));
        }
        let b = dev.alloc("the error words", 16)?;
        dev.memset_u32("the error words", &b, u32::MAX, 4)?;
        Ok(ErrWords::Device(b))
    }

    fn ptr(&self, s: &cudarc::driver::CudaStream) -> u64 {
        match self {
            ErrWords::Host(h) => h.device_ptr(),
            ErrWords::Device(b) => b.ptr(s),
        }
    }

    /// Waits for the kernels; whether a word was set.
    pub fn any_set(&self, dev: &Device, what: &str) -> Result<bool> {
        let [a, b] = match self {
            ErrWords::Host(h) => {
                dev.synchronize(what)?;
                [h.read(0), h.read(1)]
            }
            ErrWords::Device(buf) => dev.read_head::<u64, 2>(what, buf, 0)?,
        };
        Ok(a != u64::MAX || b != u64::MAX)
    }
}

/// Shared memory of one warp of route_kernel (route_stride in kernels/routing.cu).
pub fn route_stride(e: usize, g: usize, k: usize) -> usize {
    (16 * e + 8 * g + 4 * k).div_ceil(16) * 16
}

/// Shared memory a block may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// Warps per block for a per-warp shared need (at most 4; 0: does not fit).
pub fn warps_for(stride: usize) -> usize {
    (SHARED_LIMIT / stride.max(1)).min(4)
}

/// Whether route runs the register kernel (kernels/routing.cu: E <= 512, k <= 32, G <= 32).
fn register_route(e: usize, groups: usize, k: usize) -> bool {
    reg_per(e).is_some() && k <= 32 && groups <= 32
}

/// route's launch: (warps a block, shared bytes a warp); 0 warps when no kernel fits.
pub fn route_launch(e: usize, groups: usize, k: usize, sf: ScoreFunction) -> (usize, usize) {
    if register_route(e, groups, k) {
        // route_reg_stride in kernels/routing.cu: the scores, and the softmax's f64 exponentials;
        // then route_reg_loop's two prefetch buffers of E logits
        let softmax = matches!(sf, ScoreFunction::Softmax | ScoreFunction::SoftmaxWithBias);
        return (4, ((if softmax { 8 * e } else { 0 }) + 4 * e).div_ceil(16) * 16 + 8 * e);
    }
    let stride = route_stride(e, groups, k);
    (if 4 * e <= SHARED_LIMIT { warps_for(stride) } else { 0 }, stride)
}

/// Registers a lane holds in the register kernels (E <= 32 * PER), if E is small enough.
fn reg_per(e: usize) -> Option<usize> {
    [1usize, 2, 4, 8, 16].into_iter().find(|&p| e <= 32 * p)
}

fn score_code(sf: ScoreFunction) -> i32 {
    ScoreFunction::ALL.iter().position(|&f| f == sf).unwrap_or(0) as i32
}

/// How route runs on the GPU, where it can: the core's checks passed, float32 logits, at least
/// one token, and a kernel whose shared memory fits; (warps a block, shared bytes a warp).
fn route_on_gpu(
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
) -> Option<(RouteCheck, usize, usize)> {
    let checked = check_route(logits.meta("logits"), opt_meta(expert_bias, "expertBias"), opt_meta(token_mask, "tokenMask"), &options);
    // the kernels take float32 logits (16-bit device logits: the host path) and int32 sizes;
    // no tokens: the host path, which still checks the bias's values as the core does
    let c = checked.ok().filter(|c| logits.dtype == DType::F32 && c.num_tokens > 0 && i32::try_from(c.num_tokens).is_ok())?;
    let (warps, stride) = route_launch(c.num_experts, c.groups, options.topk, options.score_function);
    // too many experts for one warp's shared memory: the CPU core routes (explicitly)
    (warps > 0).then_some((c, warps, stride))
}

/// route on device tensors: one fused kernel (kernels/routing.cu). Results match the core's
/// bit for bit (same exp/ln, same summation order). Waits for the kernel to read its check of
/// the values (a non-finite logit or bias: the host path, which gives the core's error);
/// [`route_device_lazy`] leaves that read for later.
pub fn route_device(
    dev: &Device,
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
) -> Result<DeviceRouted> {
    let Some((c, warps, stride)) = route_on_gpu(logits, expert_bias, token_mask, options) else {
        return route_host_fallback(dev, logits, expert_bias, token_mask, options);
    };
    let (mut out, err) =
        launch_route(dev, logits, expert_bias, token_mask, options, (c.groups, c.topk_groups, c.top2_group_score), warps, stride)?;
    if err.any_set(dev, "route's checks")? {
        return route_host_fallback(dev, logits, expert_bias, token_mask, options);
    }
    mark_picks(&mut out, logits, token_mask, c.num_experts);
    Ok(out)
}

/// Notes on the indices that each row's picks are k distinct experts, from these logits (the
/// ops that take these indices with these logits need not check them again).
fn mark_picks(out: &mut DeviceRouted, logits: &DeviceTensor, token_mask: Option<&DeviceTensor>, experts: usize) {
    out.indices.facts.picks =
        Some(Picks { experts, logits: logits.buf.id(), mask: token_mask.map(|m| m.buf.id()), full: token_mask.is_none() });
}

/// Route's check of the values, read later ([`route_device_lazy`]): the kernel's error words
/// (mapped host memory) and an event after the kernel.
pub struct PendingRouteCheck<'d> {
    words: HostWords<'d>,
    done: cudarc::driver::CudaEvent,
}

impl PendingRouteCheck<'_> {
    /// Whether the route kernel found a non-finite logit or bias (route without `lazy` then
    /// gives the core's error). Waits for the route kernel only, not for the work queued after
    /// it (one host wait, counted).
    pub fn flagged(&self, dev: &Device) -> Result<bool> {
        dev.host_wait("route's checks", || self.done.synchronize()).map_err(|e| Error::driver("waiting for route's checks", e))?;
        Ok(self.words.read(0) != u64::MAX || self.words.read(1) != u64::MAX)
    }
}

/// route on device tensors without waiting for the kernel's check of the values: the results
/// and, where the kernel ran, its check to read later ([`PendingRouteCheck::flagged`]; `None`:
/// checked already, by [`route_device`] or on the host). Only the register kernels run lazily:
/// whatever the values (a NaN key orders below every number), they pick k distinct experts in
/// range a row and count them, so the work queued on the results before the check reads and
/// writes nothing out of bounds; the values are not to be trusted until the check says so. The
/// layer's forward reads the check at its end: no wait between route and the experts' GEMMs.
pub fn route_device_lazy<'d>(
    dev: &'d Device,
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
) -> Result<(DeviceRouted, Option<PendingRouteCheck<'d>>)> {
    // (`MOE_DISPATCH_ROUTE_CHECK=eager`: route_device's wait, for A/B measurements)
    static EAGER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let eager = *EAGER.get_or_init(|| matches!(std::env::var("MOE_DISPATCH_ROUTE_CHECK").as_deref(), Ok("eager")));
    let lazy = route_on_gpu(logits, expert_bias, token_mask, options)
        .filter(|(c, _, _)| !eager && register_route(c.num_experts, c.groups, options.topk));
    // (mapped host words only: a read-back copy would wait for the whole stream)
    let Some(((c, warps, stride), words)) = lazy.and_then(|l| Some((l, dev.host_words::<2>(u64::MAX)?))) else {
        return Ok((route_device(dev, logits, expert_bias, token_mask, options)?, None));
    };
    let err = ErrWords::Host(words);
    let mut out = launch_route_with(
        dev,
        logits,
        expert_bias,
        token_mask,
        options,
        (c.groups, c.topk_groups, c.top2_group_score),
        warps,
        stride,
        &err,
    )?;
    let done = crate::blas::mark(dev)?;
    let ErrWords::Host(words) = err else { unreachable!("made as host words above") };
    mark_picks(&mut out, logits, token_mask, c.num_experts);
    Ok((out, Some(PendingRouteCheck { words, done })))
}

/// The route kernels alone (no readback of the error word, which is returned): for the
/// benchmark, and for [`route_device`].
#[allow(clippy::too_many_arguments)]
pub fn launch_route<'d>(
    dev: &'d Device,
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
    shape: (usize, usize, bool),
    warps: usize,
    stride: usize,
) -> Result<(DeviceRouted, ErrWords<'d>)> {
    let err = ErrWords::new(dev)?;
    let out = launch_route_with(dev, logits, expert_bias, token_mask, options, shape, warps, stride, &err)?;
    Ok((out, err))
}

/// The route kernel, its error words given.
#[allow(clippy::too_many_arguments)]
fn launch_route_with(
    dev: &Device,
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
    (groups, topk_groups, top2): (usize, usize, bool),
    warps: usize,
    stride: usize,
    err: &ErrWords,
) -> Result<DeviceRouted> {
    let (t, e, k) = (logits.shape[0], logits.shape[1], options.topk);
    let weights = DeviceTensor::alloc(dev, "weights", DType::F32, vec![t, k])?;
    let indices = DeviceTensor::alloc(dev, "indices", DType::I32, vec![t, k])?;
    let scores = DeviceTensor::alloc(dev, "scores", DType::F32, vec![t, e])?;
    let tpe = DeviceTensor::alloc(dev, "tokensPerExpert", DType::I32, vec![e])?;
    let register = register_route(e, groups, k);
    // (counting through a last-block ticket instead, with no memset, made the op slower on the
    // same machine: 0.075-0.076 against 0.071 ms)
    dev.memset_u32("tokensPerExpert", &tpe.buf, 0, e)?;
    let s = dev.stream();
    let normalise = options.norm_topk_prob && k > 1;
    let (name, blocks) = match reg_per(e) {
        // persistent (route_reg_loop): at most the 8 blocks an SM that fit at once
        Some(per) if register => (format!("route_kernel_r{per}"), t.div_ceil(warps).min(8 * dev.sm_count())),
        _ => ("route_kernel".to_string(), t.div_ceil(warps)),
    };
    dev.launch_shared(
        &name,
        (blocks as u32, 1),
        (warps * 32) as u32,
        (warps * stride) as u32,
        &[
            Arg::U64(logits.buf.ptr(s)),
            Arg::U64(expert_bias.map_or(0, |b| b.buf.ptr(s))),
            Arg::U64(token_mask.map_or(0, |m| m.buf.ptr(s))),
            Arg::I32(t as i32),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::I32(score_code(options.score_function)),
            Arg::I32(options.softmax_before_topk as i32),
            Arg::I32(groups as i32),
            Arg::I32(topk_groups as i32),
            Arg::I32(top2 as i32),
            Arg::I32(normalise as i32),
            Arg::F64(options.route_scale),
            Arg::U64(weights.buf.ptr(s)),
            Arg::U64(indices.buf.ptr(s)),
            Arg::U64(scores.buf.ptr(s)),
            Arg::U64(err.ptr(s)),
            Arg::U64(tpe.buf.ptr(s)),
        ],
    )?;
    Ok(DeviceRouted { weights, indices, scores, tokens_per_expert: tpe })
}

fn route_host_fallback(
    dev: &Device,
    logits: &DeviceTensor,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
) -> Result<DeviceRouted> {
    let l = logits.download(dev, "logits")?;
    let b = download_opt(dev, "expertBias", expert_bias)?;
    let m = download_opt(dev, "tokenMask", token_mask)?;
    let b_ref = opt_ref("expertBias", &b)?;
    let m_ref = opt_ref("tokenMask", &m)?;
    let out = moe_core::routing::route(&tensor_ref("logits", &l)?, b_ref.as_ref(), m_ref.as_ref(), options)?;
    Ok(DeviceRouted {
        weights: DeviceTensor::upload_owned(dev, "weights", &out.weights)?,
        indices: DeviceTensor::upload_owned(dev, "indices", &out.indices)?,
        scores: DeviceTensor::upload_owned(dev, "scores", &out.scores)?,
        tokens_per_expert: DeviceTensor::upload_owned(dev, "tokensPerExpert", &out.tokens_per_expert)?,
    })
}

/// topk on device tensors: `values [T, E]` f32 -> `(values, indices) [T, k]`.
pub fn topk_device(dev: &Device, values: &DeviceTensor, k: usize) -> Result<(DeviceTensor, DeviceTensor)> {
    let ok = check_topk(values.meta("values"), k).is_ok_and(|(t, e)| i32::try_from(e).is_ok() && i32::try_from(t).is_ok());
    // the register kernels (E <= 512) need no shared memory; topk_kernel 4E + 4k bytes a warp
    let stride = if !ok || reg_per(values.shape[1]).is_some() { 0 } else { (4 * values.shape[1] + 4 * k).div_ceil(16) * 16 };
    let warps = warps_for(stride);
    if !ok || warps == 0 {
        return topk_host_fallback(dev, values, k);
    }
    let (out_v, out_i, err) = launch_topk(dev, values, k, warps, stride)?;
    if err.any_set(dev, "topk's checks")? {
        return topk_host_fallback(dev, values, k);
    }
    Ok((out_v, out_i))
}

/// The topk kernel alone (no readback of the error word, which is returned): for the benchmark,
/// and for [`topk_device`].
pub fn launch_topk<'d>(
    dev: &'d Device,
    values: &DeviceTensor,
    k: usize,
    warps: usize,
    stride: usize,
) -> Result<(DeviceTensor, DeviceTensor, ErrWords<'d>)> {
    let (t, e) = (values.shape[0], values.shape[1]);
    let out_v = DeviceTensor::alloc(dev, "values", DType::F32, vec![t, k])?;
    let out_i = DeviceTensor::alloc(dev, "indices", DType::I32, vec![t, k])?;
    let err = ErrWords::new(dev)?;
    let s = dev.stream();
    let name = reg_per(e).map_or_else(|| "topk_kernel".to_string(), |per| format!("topk_kernel_r{per}"));
    dev.launch_shared(
        &name,
        (t.div_ceil(warps) as u32, 1),
        (warps * 32) as u32,
        (warps * stride) as u32,
        &[
            Arg::U64(values.buf.ptr(s)),
            Arg::I32(t as i32),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::U64(out_v.buf.ptr(s)),
            Arg::U64(out_i.buf.ptr(s)),
            Arg::U64(err.ptr(s)),
        ],
    )?;
    Ok((out_v, out_i, err))
}

fn topk_host_fallback(dev: &Device, values: &DeviceTensor, k: usize) -> Result<(DeviceTensor, DeviceTensor)> {
    let v = values.download(dev, "values")?;
    let out = moe_core::routing::topk(&tensor_ref("values", &v)?, k)?;
    Ok((DeviceTensor::upload_owned(dev, "values", &out.values)?, DeviceTensor::upload_owned(dev, "indices", &out.indices)?))
}

/// The most picks a token of the routeBackward kernel (RB_MAX_K in kernels/routing.cu); more:
/// the host path.
const ROUTE_BACKWARD_MAX_K: usize = 32;

/// routeBackward on device tensors: `gradLogits [T, E]` f32 from route's picks, one thread a
/// token (kernels/routing.cu), the core's arithmetic and order, so the same bits. 16-bit or
/// int64 inputs, k above 32, an invalid value (a non-finite logit, a bad row of picks) or an
/// argument the core's checks reject: the host path (download, the core, upload), whose result
/// or error is the CPU backends'. Synchronises once to read the error word.
#[allow(clippy::too_many_arguments)]
pub fn route_backward_device(
    dev: &Device,
    grad_weights: &DeviceTensor,
    logits: &DeviceTensor,
    indices: &DeviceTensor,
    grad_scores: Option<&DeviceTensor>,
    expert_bias: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    options: RouteOptions,
) -> Result<DeviceTensor> {
    let args = RouteBackwardArgs { grad_weights, logits, indices, grad_scores, expert_bias, token_mask, options };
    let checked = check_route_backward(
        grad_weights.meta("gradWeights"),
        logits.meta("logits"),
        indices.meta("indices"),
        opt_meta(grad_scores, "gradScores"),
        opt_meta(expert_bias, "expertBias"),
        opt_meta(token_mask, "tokenMask"),
        &options,
    );
    let fits = |c: &RouteCheck| {
        logits.dtype == DType::F32
            && indices.dtype == DType::I32
            && c.num_tokens > 0
            && options.topk <= ROUTE_BACKWARD_MAX_K
            && i32::try_from(c.num_tokens.saturating_mul(c.num_experts)).is_ok()
    };
    let Some(c) = checked.ok().filter(fits) else {
        return route_backward_host(dev, &args);
    };
    let (t, e, k) = (c.num_tokens, c.num_experts, options.topk);
    let grad = DeviceTensor::alloc(dev, "gradLogits", DType::F32, vec![t, e])?;
    let on_logits = options.score_function == ScoreFunction::Softmax && !options.softmax_before_topk;
    let need_scores = grad_scores.is_some() || !on_logits;
    let scratch = dev.alloc("routeBackward's scores", if need_scores { 8 * t * e } else { 8 })?;
    let err = ErrWords::new(dev)?;
    let s = dev.stream();
    // a warp a token, RB_WARPS (4) warps a block
    const BLOCK: usize = 128;
    dev.launch(
        "route_backward_kernel",
        (t.div_ceil(BLOCK / 32) as u32, 1),
        BLOCK as u32,
        &[
            Arg::U64(logits.buf.ptr(s)),
            Arg::U64(indices.buf.ptr(s)),
            Arg::U64(grad_weights.buf.ptr(s)),
            Arg::U64(grad_scores.map_or(0, |g| g.buf.ptr(s))),
            Arg::U64(token_mask.map_or(0, |m| m.buf.ptr(s))),
            Arg::I32(t as i32),
            Arg::I32(e as i32),
            Arg::I32(k as i32),
            Arg::I32(score_code(options.score_function)),
            Arg::I32(on_logits as i32),
            Arg::I32((options.norm_topk_prob && k > 1) as i32),
            Arg::F64(options.route_scale),
            Arg::U64(scratch.ptr(s)),
            Arg::U64(grad.buf.ptr(s)),
            Arg::U64(err.ptr(s)),
        ],
    )?;
    // route's own indices of these logits (and mask) need no check: route checked the logits,
    // and made the picks
    let from_route =
        indices.facts.picks.is_some_and(|p| p.experts == e && p.logits == logits.buf.id() && p.mask == token_mask.map(|m| m.buf.id()));
    if !from_route && err.any_set(dev, "routeBackward's checks")? {
        return route_backward_host(dev, &args);
    }
    Ok(grad)
}

/// routeBackward's arguments, for its host path.
struct RouteBackwardArgs<'a> {
    grad_weights: &'a DeviceTensor,
    logits: &'a DeviceTensor,
    indices: &'a DeviceTensor,
    grad_scores: Option<&'a DeviceTensor>,
    expert_bias: Option<&'a DeviceTensor>,
    token_mask: Option<&'a DeviceTensor>,
    options: RouteOptions,
}

fn route_backward_host(dev: &Device, a: &RouteBackwardArgs) -> Result<DeviceTensor> {
    let gw = a.grad_weights.download(dev, "gradWeights")?;
    let l = a.logits.download(dev, "logits")?;
    let i = a.indices.download(dev, "indices")?;
    let gs = download_opt(dev, "gradScores", a.grad_scores)?;
    let b = download_opt(dev, "expertBias", a.expert_bias)?;
    let m = download_opt(dev, "tokenMask", a.token_mask)?;
    let out = moe_core::routing::route_backward(
        &tensor_ref("gradWeights", &gw)?,
        &tensor_ref("logits", &l)?,
        &tensor_ref("indices", &i)?,
        opt_ref("gradScores", &gs)?.as_ref(),
        opt_ref("expertBias", &b)?.as_ref(),
        opt_ref("tokenMask", &m)?.as_ref(),
        a.options,
    )?;
    DeviceTensor::upload_owned(dev, "gradLogits", &out)
}

#[cfg(test)]
mod tests {
    use moe_core::permute::{
        check_permute, check_permute_backward, check_unpermute, check_unpermute_backward, PermuteOptions, UnpermuteOptions,
    };
    use moe_core::routing::{check_route, check_topk, RouteOptions};
    use moe_core::tensor::{DType, Meta, TensorRef};

    /// A host tensor as a device entry sees it: dtype and shape only.
    fn m<'a>(t: &'a TensorRef) -> Meta<'a> {
        Meta::shape_only(t.name, t.dtype, &t.shape)
    }

    /// The device entries take their errors from the core's check functions on dtypes and
    /// shapes: for an input with one such fault they are the CPU op's, word for word.
    #[test]
    fn shape_checks_report_the_cpu_ops_errors() {
        let f = [0f32; 24];
        let tok = TensorRef::of("tokens", vec![3, 2], &f[..6]).unwrap();
        let tok1 = TensorRef::of("tokens", vec![6], &f[..6]).unwrap();
        let ints = [0i32; 6];
        let tok_i = TensorRef::of("tokens", vec![3, 2], &ints[..]).unwrap();
        let map = [1u8, 0, 0, 1, 1, 0];
        let map_ref = TensorRef::new("routingMap", DType::Bool, vec![3, 2], &map).unwrap();
        let bad_map = TensorRef::new("routingMap", DType::Bool, vec![2, 2], &map[..4]).unwrap();
        let p9 = TensorRef::of("probs", vec![3, 3], &f[..9]).unwrap();
        let opts = |n: Option<usize>, d: bool| PermuteOptions { num_out_tokens: n, drop_and_pad: d };
        let permute_cases = [
            (&tok1, &map_ref, None, opts(None, false)),
            (&tok_i, &map_ref, None, opts(None, false)),
            (&tok, &bad_map, None, opts(None, false)),
            (&tok, &map_ref, None, opts(None, true)),
            (&tok, &map_ref, None, opts(Some(3), true)),
            (&tok, &map_ref, None, opts(Some(8), true)),
            (&tok, &map_ref, Some(&p9), opts(None, false)),
        ];
        for (t, map, p, o) in permute_cases {
            let want = moe_core::permute::permute(t, map, p, o).unwrap_err();
            assert_eq!(check_permute(m(t), m(map), p.map(m), o).unwrap_err(), want);
        }
        let idx = [1i32, 0, 2];
        let perm2 = TensorRef::of("permutedTokens", vec![2, 2], &f[..4]).unwrap();
        let perm3 = TensorRef::of("permutedTokens", vec![3, 2], &f[..6]).unwrap();
        let si2 = TensorRef::of("sortedIndices", vec![2], &idx[..2]).unwrap();
        let si3 = TensorRef::of("sortedIndices", vec![3], &idx[..]).unwrap();
        let dense = TensorRef::of("probs", vec![3, 2], &f[..6]).unwrap();
        let slot_p = TensorRef::of("probs", vec![2], &f[..2]).unwrap();
        let u = UnpermuteOptions::default();
        type Case<'a> = (&'a TensorRef<'a>, &'a TensorRef<'a>, [usize; 2], Option<&'a TensorRef<'a>>, Option<&'a TensorRef<'a>>);
        let unpermute_cases: [Case; 5] = [
            (&perm2, &si3, [3, 2], None, None),
            (&perm3, &si3, [3, 5], None, None),
            (&perm3, &si3, [3, 2], Some(&dense), None),
            (&perm3, &si3, [3, 2], Some(&slot_p), None),
            (&perm3, &si3, [3, 2], Some(&dense), Some(&bad_map)),
        ];
        for (x, s, r, p, map) in unpermute_cases {
            let want = moe_core::permute::unpermute(x, s, r, p, map, u).unwrap_err();
            assert_eq!(check_unpermute(m(x), m(s), r, p.map(m), map.map(m), u).unwrap_err(), want);
        }
        let gp2 = TensorRef::of("gradPermutedProbs", vec![2], &f[..2]).unwrap();
        for (g, s, n, gp, map) in
            [(&perm3, &si2, 3, None, None), (&perm3, &si3, 3, Some(&gp2), Some(&map_ref)), (&perm2, &si2, 3, Some(&gp2), None)]
        {
            let want = moe_core::permute::permute_backward(g, s, n, gp, map, u).unwrap_err();
            assert_eq!(check_permute_backward(m(g), m(s), n, gp.map(m), map.map(m), u).unwrap_err(), want);
        }
        let go = TensorRef::of("gradOutput", vec![3, 2], &f[..6]).unwrap();
        let go_i = TensorRef::of("gradOutput", vec![3, 2], &ints[..]).unwrap();
        for (g, x, s, p) in [(&go_i, &perm3, &si3, None), (&go, &perm2, &si3, None), (&go, &perm3, &si3, Some(&slot_p))] {
            let want = moe_core::permute::unpermute_backward(g, x, s, p, None, u).unwrap_err();
            assert_eq!(check_unpermute_backward(m(g), m(x), m(s), p.map(m), None, u).unwrap_err(), want);
        }
        let logits = TensorRef::of("logits", vec![3, 4], &f[..12]).unwrap();
        let bias3 = TensorRef::of("expertBias", vec![3], &f[..3]).unwrap();
        let mask2 = TensorRef::new("tokenMask", DType::Bool, vec![2], &map[..2]).unwrap();
        let sig = RouteOptions { score_function: moe_core::routing::ScoreFunction::Sigmoid, ..RouteOptions::new(2) };
        for (b, mk, o) in [
            (None, None, RouteOptions::new(5)),
            (Some(&bias3), None, sig),
            (Some(&bias3), None, RouteOptions::new(2)),
            (None, Some(&mask2), RouteOptions::new(2)),
        ] {
            let want = moe_core::routing::route(&logits, b, mk, o).unwrap_err();
            assert_eq!(check_route(m(&logits), b.map(m), mk.map(m), &o).unwrap_err(), want);
        }
        for (v, k) in [(&logits, 0), (&logits, 5), (&tok_i, 1)] {
            let want = moe_core::routing::topk(v, k).unwrap_err();
            assert_eq!(check_topk(m(v), k).unwrap_err(), want);
        }
    }
}
