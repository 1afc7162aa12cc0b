//! permute / unpermute: moving tokens into expert-major order and merging them back.
//!
//! A [`DispatchPlan`] says, for every slot of the permuted layout, which token fills it and
//! which expert it belongs to. [`permute`] gathers rows along the plan (a pure copy, so it is
//! bit-exact in every dtype); [`unpermute`] scatters them back, weighting each slot by its
//! prob and summing in f32 in slot order, then rounding once to the token dtype.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::alloc::{try_filled_vec, try_vec, write_slice};
use crate::error::{size_arg, Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Float, Meta, Tensor, TensorMut, TensorRef};

/// Where every slot of the permuted layout comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    pub num_tokens: usize,
    pub num_experts: usize,
    /// Token id of each slot; experts in turn, tokens ascending within an expert.
    pub sorted_indices: Vec<i32>,
    /// Number of slots of each expert (with drop-and-pad: the capacity, for every expert).
    pub tokens_per_expert: Vec<usize>,
}

impl DispatchPlan {
    /// Plain mode: every true entry of the routing map gets one slot.
    /// A RangeError when the per-expert counts cannot be allocated (a `[0, numExperts]` map
    /// with a huge numExperts holds no elements but asks for that many counts).
    pub fn from_routing_map(map: &[u8], num_tokens: usize, num_experts: usize) -> Result<DispatchPlan> {
        let mut tokens_per_expert = try_vec(0usize, num_experts, "routingMap.shape[1]")?;
        for row in map.chunks_exact(num_experts.max(1)) {
            for (count, &b) in tokens_per_expert.iter_mut().zip(row) {
                *count += (b != 0) as usize;
            }
        }
        let mut cursor = exclusive_cumsum(&tokens_per_expert);
        let mut sorted_indices = vec![0i32; tokens_per_expert.iter().sum()];
        for (t, row) in map.chunks_exact(num_experts.max(1)).enumerate() {
            for (e, &b) in row.iter().enumerate() {
                if b != 0 {
                    sorted_indices[cursor[e]] = t as i32;
                    cursor[e] += 1;
                }
            }
        }
        Ok(DispatchPlan { num_tokens, num_experts, sorted_indices, tokens_per_expert })
    }

    /// Drop-and-pad mode: every expert gets exactly `capacity` slots, filled with the tokens
    /// it selected (ascending id) and then, if it is under-full, with the lowest ids it did
    /// not select. Selected tokens beyond the capacity are dropped.
    pub fn with_capacity(map: &[u8], num_tokens: usize, num_experts: usize, capacity: usize) -> Result<DispatchPlan> {
        let mut sorted_indices = try_vec(0i32, num_experts * capacity, "numOutTokens")?;
        let mut filled = try_vec(0usize, num_experts, "routingMap.shape[1]")?;
        let tokens_per_expert = try_vec(capacity, num_experts, "routingMap.shape[1]")?;
        for (t, row) in map.chunks_exact(num_experts.max(1)).enumerate() {
            for (e, &b) in row.iter().enumerate() {
                if b != 0 && filled[e] < capacity {
                    sorted_indices[e * capacity + filled[e]] = t as i32;
                    filled[e] += 1;
                }
            }
        }
        for e in 0..num_experts {
            let mut t = 0;
            while filled[e] < capacity {
                if map[t * num_experts + e] == 0 {
                    sorted_indices[e * capacity + filled[e]] = t as i32;
                    filled[e] += 1;
                }
                t += 1;
            }
        }
        Ok(DispatchPlan { num_tokens, num_experts, sorted_indices, tokens_per_expert })
    }

    pub fn num_slots(&self) -> usize {
        self.sorted_indices.len()
    }

    /// The expert that slot `i` belongs to, for every slot.
    pub fn slot_experts(&self) -> Vec<usize> {
        let mut experts = Vec::with_capacity(self.num_slots());
        for (e, &n) in self.tokens_per_expert.iter().enumerate() {
            experts.extend(std::iter::repeat_n(e, n));
        }
        experts
    }
}

fn exclusive_cumsum(counts: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    counts
        .iter()
        .map(|&c| {
            let start = acc;
            acc += c;
            start
        })
        .collect()
}

/// Options of [`permute`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PermuteOptions {
    /// Number of output rows. With `drop_and_pad` it sets the capacity (`num_out_tokens /
    /// num_experts`, which must divide evenly); without, it must equal the routing map's count.
    pub num_out_tokens: Option<usize>,
    pub drop_and_pad: bool,
}

/// Output of [`permute`].
#[derive(Debug, Clone, PartialEq)]
pub struct Permuted {
    /// `[N, H]`, same dtype as the tokens.
    pub permuted_tokens: Tensor,
    /// `[N]` f32, present when probs were given: `probs[token of slot, expert of slot]`.
    pub permuted_probs: Option<Tensor>,
    /// `[N]` int32: the token id of each slot.
    pub sorted_indices: Tensor,
    /// `[E]` int32: slots per expert.
    pub tokens_per_expert: Tensor,
}

fn check_num_tokens(num_tokens: usize) -> Result<()> {
    if i32::try_from(num_tokens).is_err() {
        return Err(Error::range("tokens.shape[0]", format!("{num_tokens} tokens do not fit in int32 indices")));
    }
    Ok(())
}

/// The routing map's and the options' checks of [`plan`] (the map's values too, on the host):
/// the number of experts and, with dropAndPad, the capacity.
fn check_plan(routing_map: Meta, num_tokens: usize, options: PermuteOptions) -> Result<(usize, Option<usize>)> {
    let dims = routing_map.expect_rank(2, "[numTokens, numExperts]")?;
    let num_experts = dims[1];
    routing_map.expect_shape(&[num_tokens, num_experts], "([numTokens of tokens, numExperts])")?;
    routing_map.check_mask()?;
    check_num_tokens(num_tokens)?;
    if !options.drop_and_pad {
        return Ok((num_experts, None));
    }
    let Some(n_out) = options.num_out_tokens else {
        return Err(Error::type_error("numOutTokens", "a number (it sets the capacity) when dropAndPad is true", "undefined"));
    };
    if num_experts == 0 {
        return Err(Error::range("routingMap.shape[1]", "dropAndPad needs at least one expert"));
    }
    if n_out % num_experts != 0 {
        return Err(Error::range(
            "numOutTokens",
            format!("{n_out} is not a multiple of numExperts = {num_experts}, so it does not give a whole capacity"),
        ));
    }
    let capacity = n_out / num_experts;
    if capacity > num_tokens {
        return Err(Error::range(
            "numOutTokens",
            format!("capacity {n_out} / {num_experts} = {capacity} exceeds numTokens = {num_tokens}"),
        ));
    }
    Ok((num_experts, Some(capacity)))
}

/// permute's check of a plain plan's size: numOutTokens, when given, must be the number of
/// entries the routing map selects (`num_slots`). A backend that builds the plan elsewhere calls
/// it once it knows the count.
pub fn check_num_out_tokens(options: PermuteOptions, num_slots: usize) -> Result<()> {
    match options.num_out_tokens {
        Some(n_out) if !options.drop_and_pad && n_out != num_slots => Err(Error::range(
            "numOutTokens",
            format!("{n_out} differs from the {num_slots} entries the routing map selects (set dropAndPad to use a capacity)"),
        )),
        _ => Ok(()),
    }
}

/// Builds the plan for a routing map and options, validating both.
pub fn plan(routing_map: &TensorRef, num_tokens: usize, options: PermuteOptions) -> Result<DispatchPlan> {
    let (num_experts, capacity) = check_plan(routing_map.meta(), num_tokens, options)?;
    build_plan(routing_map.bytes(), num_tokens, num_experts, capacity, options)
}

fn build_plan(map: &[u8], num_tokens: usize, num_experts: usize, capacity: Option<usize>, options: PermuteOptions) -> Result<DispatchPlan> {
    match capacity {
        Some(capacity) => DispatchPlan::with_capacity(map, num_tokens, num_experts, capacity),
        None => {
            let plan = DispatchPlan::from_routing_map(map, num_tokens, num_experts)?;
            check_num_out_tokens(options, plan.num_slots())?;
            Ok(plan)
        }
    }
}

/// permute's arguments once checked: what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermuteCheck {
    pub num_tokens: usize,
    pub hidden: usize,
    pub num_experts: usize,
    /// dropAndPad: every expert's slots. None: one slot per selected entry (a count only the
    /// plan knows, checked by [`check_num_out_tokens`]).
    pub capacity: Option<usize>,
}

/// permute's checks of tokens, the routing map and the options (the CPU op then builds the plan,
/// checks its size, and checks probs: [`check_permute_probs`]).
pub fn check_permute_plan(tokens: Meta, routing_map: Meta, options: PermuteOptions) -> Result<PermuteCheck> {
    let dims = tokens.expect_rank(2, "[numTokens, hidden]")?;
    let (num_tokens, hidden) = (dims[0], dims[1]);
    tokens.expect_dtype(DType::TOKENS)?;
    let (num_experts, capacity) = check_plan(routing_map, num_tokens, options)?;
    Ok(PermuteCheck { num_tokens, hidden, num_experts, capacity })
}

/// permute's checks of probs (`[numTokens, numExperts]` float32).
pub fn check_permute_probs(probs: Meta, c: &PermuteCheck) -> Result<()> {
    probs.expect_dtype(&[DType::F32])?;
    probs.expect_shape(&[c.num_tokens, c.num_experts], "([numTokens, numExperts], the shape of routingMap)")
}

/// Every check of [`permute`] but a plain plan's size ([`check_num_out_tokens`], once the count
/// is known). For an input that fails more than one check the CPU op may report a later one
/// first (it checks probs after the plan's size): a backend that wants its exact error runs the op.
pub fn check_permute(tokens: Meta, routing_map: Meta, probs: Option<Meta>, options: PermuteOptions) -> Result<PermuteCheck> {
    let c = check_permute_plan(tokens, routing_map, options)?;
    if let Some(p) = probs {
        check_permute_probs(p, &c)?;
    }
    Ok(c)
}

/// Gathers `tokens [T, H]` into expert-major order along the routing map.
pub fn permute(tokens: &TensorRef, routing_map: &TensorRef, probs: Option<&TensorRef>, options: PermuteOptions) -> Result<Permuted> {
    let (plan, hidden, dense) = permute_inputs(tokens, routing_map, probs, options)?;
    apply_plan(tokens, hidden, &plan, dense.as_deref())
}

/// Caller-owned outputs of [`permute_into`] (each optional: the ones absent are allocated).
#[derive(Debug, Default)]
pub struct PermuteOut<'o, 'a> {
    /// `out.permutedTokens`: `[numSlots, hidden]` of the tokens' dtype.
    pub permuted_tokens: Option<&'o mut TensorMut<'a>>,
    /// `out.permutedProbs`: `[numSlots]` float32 (only with probs).
    pub permuted_probs: Option<&'o mut TensorMut<'a>>,
}

/// Output of [`permute_into`]: [`Permuted`], without the tensors written into the caller's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct PermutedInto {
    /// None when written into `out.permutedTokens`.
    pub permuted_tokens: Option<Tensor>,
    /// None when written into `out.permutedProbs`, or without probs.
    pub permuted_probs: Option<Tensor>,
    pub sorted_indices: Tensor,
    pub tokens_per_expert: Tensor,
}

/// Checks that a caller-owned output shares no memory with the op's inputs.
pub fn check_out_disjoint(out: &TensorMut, inputs: &[Option<&TensorRef>]) -> Result<()> {
    inputs.iter().flatten().try_for_each(|t| out.expect_disjoint(t.bytes(), t.name))
}

/// [`permute`] writing into caller-owned outputs: every check of permute, then the outputs'
/// dtype and shape (what permute would allocate) and that they share no memory with an input or
/// with each other, all before a byte is written.
pub fn permute_into(
    tokens: &TensorRef,
    routing_map: &TensorRef,
    probs: Option<&TensorRef>,
    options: PermuteOptions,
    out: PermuteOut,
) -> Result<PermutedInto> {
    let (plan, hidden, dense) = permute_inputs(tokens, routing_map, probs, options)?;
    let n = plan.num_slots();
    let PermuteOut { permuted_tokens: out_tokens, permuted_probs: out_probs } = out;
    if let Some(o) = out_tokens.as_deref() {
        o.expect(tokens.dtype, &[n, hidden], "(permutedTokens: [numSlots, hidden] of the dtype of tokens)")?;
        check_out_disjoint(o, &[Some(tokens), Some(routing_map), probs])?;
    }
    if let Some(o) = out_probs.as_deref() {
        if probs.is_none() {
            return Err(Error::type_error(
                o.name,
                "no tensor without probs (permutedProbs is returned only when probs is given)",
                "a tensor",
            ));
        }
        o.expect(DType::F32, &[n], "(permutedProbs: [numSlots] float32)")?;
        check_out_disjoint(o, &[Some(tokens), Some(routing_map), probs])?;
        if let Some(t) = out_tokens.as_deref() {
            o.expect_disjoint(t.bytes(), t.name)?;
        }
    }
    let permuted_tokens = match out_tokens {
        Some(o) => {
            gather_into(tokens, hidden, &plan.sorted_indices, o);
            None
        }
        None => Some(gather_tensor(tokens, hidden, &plan.sorted_indices)?),
    };
    let permuted_probs = match (dense.as_deref(), out_probs) {
        (Some(dense), Some(o)) => {
            o.fill::<f32>(|dst| slot_probs_into(dst, dense, &plan));
            None
        }
        (Some(dense), None) => {
            Some(Tensor::f32(vec![n], crate::alloc::try_filled_vec(n, "permutedProbs", |dst| slot_probs_into(dst, dense, &plan))?))
        }
        (None, _) => None,
    };
    Ok(PermutedInto {
        permuted_tokens,
        permuted_probs,
        sorted_indices: Tensor::i32(vec![n], plan.sorted_indices.clone()),
        tokens_per_expert: Tensor::i32(vec![plan.num_experts], plan.tokens_per_expert.iter().map(|&c| c as i32).collect()),
    })
}

fn slot_probs_into(dst: &mut [std::mem::MaybeUninit<f32>], dense: &[f32], plan: &DispatchPlan) {
    let mut i = 0;
    for (e, &count) in plan.tokens_per_expert.iter().enumerate() {
        for _ in 0..count {
            dst[i].write(dense[plan.sorted_indices[i] as usize * plan.num_experts + e]);
            i += 1;
        }
    }
}

fn gather_tensor(tokens: &TensorRef, hidden: usize, sorted: &[i32]) -> Result<Tensor> {
    let shape = vec![sorted.len(), hidden];
    Ok(match tokens.dtype.size() {
        4 => Tensor::f32(shape, gather_rows(&tokens.raw::<f32>(), hidden, sorted)?),
        2 => Tensor::u16(tokens.dtype, shape, gather_rows(&tokens.raw::<u16>(), hidden, sorted)?),
        _ => unreachable!("token dtypes are 2 or 4 bytes wide"),
    })
}

fn gather_into(tokens: &TensorRef, hidden: usize, sorted: &[i32], out: &mut TensorMut) {
    match tokens.dtype.size() {
        4 => out.fill::<f32>(|dst| gather_rows_into(dst, &tokens.raw::<f32>(), hidden, sorted)),
        2 => out.fill::<u16>(|dst| gather_rows_into(dst, &tokens.raw::<u16>(), hidden, sorted)),
        _ => unreachable!("token dtypes are 2 or 4 bytes wide"),
    }
}

/// Gathers rows along an existing plan (the plan's token count must match `tokens`).
pub fn apply_plan(tokens: &TensorRef, hidden: usize, plan: &DispatchPlan, dense_probs: Option<&[f32]>) -> Result<Permuted> {
    let n = plan.num_slots();
    let shape = vec![n, hidden];
    // A permutation is a copy: rows move as raw bits, so every dtype is exact.
    let permuted_tokens = match tokens.dtype.size() {
        4 => Tensor::f32(shape, gather_rows(&tokens.raw::<f32>(), hidden, &plan.sorted_indices)?),
        2 => Tensor::u16(tokens.dtype, shape, gather_rows(&tokens.raw::<u16>(), hidden, &plan.sorted_indices)?),
        _ => unreachable!("token dtypes are 2 or 4 bytes wide"),
    };
    let permuted_probs = dense_probs.map(|dense| {
        let e_of = plan.slot_experts();
        let p = (0..n).map(|i| dense[plan.sorted_indices[i] as usize * plan.num_experts + e_of[i]]).collect();
        Tensor::f32(vec![n], p)
    });
    Ok(Permuted {
        permuted_tokens,
        permuted_probs,
        sorted_indices: Tensor::i32(vec![n], plan.sorted_indices.clone()),
        tokens_per_expert: Tensor::i32(vec![plan.num_experts], plan.tokens_per_expert.iter().map(|&c| c as i32).collect()),
    })
}

fn gather_rows<T: Copy + Send + Sync>(src: &[T], hidden: usize, sorted: &[i32]) -> Result<Vec<T>> {
    try_filled_vec(sorted.len() * hidden, "permutedTokens", |out| gather_rows_into(out, src, hidden, sorted))
}

fn gather_rows_into<T: Copy + Send + Sync>(out: &mut [std::mem::MaybeUninit<T>], src: &[T], hidden: usize, sorted: &[i32]) {
    let work = 2 * sorted.len() * hidden * std::mem::size_of::<T>();
    for_each_row(
        out,
        hidden,
        work,
        || (),
        |_, i, row| {
            let t = sorted[i] as usize;
            write_slice(row, &src[t * hidden..(t + 1) * hidden]);
        },
    )
}

/// Reads unpermute's `restoreShape` argument: `[numTokens, hidden]`.
pub fn restore_shape_arg(shape: &[f64]) -> Result<[usize; 2]> {
    match shape {
        [t, h] => Ok([size_arg("restoreShape[0]", *t)?, size_arg("restoreShape[1]", *h)?]),
        _ => Err(Error::type_error("restoreShape", "[numTokens, hidden]", format!("{} numbers", shape.len()))),
    }
}

/// Options of [`unpermute`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpermuteOptions {
    /// The permuted layout has `numExperts` blocks of equal capacity (see [`PermuteOptions`]).
    pub drop_and_pad: bool,
}

/// Merges `permuted [N, H]` back into `[numTokens, H]`:
/// `out[t] = sum over slots i with sortedIndices[i] == t of permuted[i] * p_i`.
///
/// `p_i` comes from `probs`, which is either per slot (`[N]`, as permute's `permutedProbs`) or
/// dense (`[numTokens, numExperts]`, then `routingMap` is required and `p_i =
/// probs[sortedIndices[i], expert of slot i]`, exactly as permute picks them). Without probs
/// every `p_i` is 1.
pub fn unpermute(
    permuted: &TensorRef,
    sorted_indices: &TensorRef,
    restore_shape: [usize; 2],
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<Tensor> {
    let (idx, weights) = unpermute_inputs(permuted, sorted_indices, restore_shape, probs, routing_map, options)?;
    merge_dtype(permuted, &idx, restore_shape[0], restore_shape[1], weights.as_deref())
}

/// [`unpermute`] writing into a caller-owned `out` (`[numTokens, hidden]` of permutedTokens'
/// dtype, sharing no memory with an input), checked with every other argument before a byte is written.
pub fn unpermute_into(
    permuted: &TensorRef,
    sorted_indices: &TensorRef,
    restore_shape: [usize; 2],
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
    out: &mut TensorMut,
) -> Result<()> {
    let (idx, weights) = unpermute_inputs(permuted, sorted_indices, restore_shape, probs, routing_map, options)?;
    out.expect(permuted.dtype, &restore_shape, "(restoreShape, of the dtype of permutedTokens)")?;
    check_out_disjoint(out, &[Some(permuted), Some(sorted_indices), probs, routing_map])?;
    merge_into(permuted, &idx, restore_shape[0], restore_shape[1], weights.as_deref(), out)
}

fn merge_into(
    permuted: &TensorRef,
    idx: &[i64],
    num_tokens: usize,
    hidden: usize,
    weights: Option<&[f32]>,
    out: &mut TensorMut,
) -> Result<()> {
    match permuted.dtype {
        DType::F32 => merge_rows::<f32>(permuted, idx, num_tokens, hidden, weights, Some(out)).map(drop),
        DType::BF16 => merge_rows::<bf16>(permuted, idx, num_tokens, hidden, weights, Some(out)).map(drop),
        DType::F16 => merge_rows::<f16>(permuted, idx, num_tokens, hidden, weights, Some(out)).map(drop),
        other => Err(Error::type_error(format!("{}.dtype", permuted.name), "float32, bfloat16 or float16", other.name())),
    }
}

fn merge_dtype(permuted: &TensorRef, idx: &[i64], num_tokens: usize, hidden: usize, weights: Option<&[f32]>) -> Result<Tensor> {
    match permuted.dtype {
        DType::F32 => merge::<f32>(permuted, idx, num_tokens, hidden, weights),
        DType::BF16 => merge::<bf16>(permuted, idx, num_tokens, hidden, weights),
        DType::F16 => merge::<f16>(permuted, idx, num_tokens, hidden, weights),
        other => Err(Error::type_error(format!("{}.dtype", permuted.name), "float32, bfloat16 or float16", other.name())),
    }
}

/// How unpermute and unpermuteBackward weight the slots, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotProbsLayout {
    /// No probs: every weight is 1.
    None,
    /// `[numSlots]`: one prob per slot.
    PerSlot,
    /// `[numTokens, numExperts]` with the routing map: each slot's prob at (its token, its expert).
    Dense { num_experts: usize },
}

/// The probs' and the routing map's checks of unpermute and unpermuteBackward (the map's
/// values on the host; a plain map's routes, which need the slots' tokens, are checked when
/// the weights are gathered).
fn check_slot_probs(
    probs: Option<Meta>,
    routing_map: Option<Meta>,
    n: usize,
    num_tokens: usize,
    options: UnpermuteOptions,
) -> Result<SlotProbsLayout> {
    let Some(probs) = probs else { return Ok(SlotProbsLayout::None) };
    probs.expect_dtype(&[DType::F32])?;
    if probs.shape.len() == 1 {
        probs.expect_shape(&[n], "([numSlots]: one prob per row of permutedTokens)")?;
        return Ok(SlotProbsLayout::PerSlot);
    }
    let dims = probs.expect_rank(2, "[numSlots] or [numTokens, numExperts]")?;
    let num_experts = dims[1];
    probs.expect_shape(&[num_tokens, num_experts], "([numTokens of restoreShape, numExperts])")?;
    let Some(routing_map) = routing_map else {
        return Err(Error::type_error(
            "routingMap",
            "the routing map that made the permutation, when probs is [numTokens, numExperts]",
            "undefined",
        ));
    };
    routing_map.expect_shape(&[num_tokens, num_experts], "(the shape of probs)")?;
    check_slot_map(routing_map, n, num_tokens, options.drop_and_pad)?;
    Ok(SlotProbsLayout::Dense { num_experts })
}

/// Each slot's weight, for probs that passed [`check_slot_probs`].
fn slot_weights<'a>(
    idx: &[i64],
    num_tokens: usize,
    probs: Option<&TensorRef<'a>>,
    routing_map: Option<&TensorRef<'a>>,
    layout: SlotProbsLayout,
    options: UnpermuteOptions,
) -> Result<Option<Cow<'a, [f32]>>> {
    let n = idx.len();
    match (layout, probs, routing_map) {
        (SlotProbsLayout::None, ..) => Ok(None),
        (SlotProbsLayout::PerSlot, Some(probs), _) => Ok(Some(probs.typed::<f32>()?)),
        (SlotProbsLayout::Dense { num_experts }, Some(probs), Some(routing_map)) => {
            let (_, slot_expert) = slot_experts_of(idx, routing_map, num_tokens, options.drop_and_pad, true)?;
            let dense = probs.typed::<f32>()?;
            Ok(Some(Cow::Owned((0..n).map(|i| dense[idx[i] as usize * num_experts + slot_expert[i]]).collect())))
        }
        _ => Err(Error::Internal("slot weights without the probs that were checked".into())),
    }
}

/// Each token's slots, in ascending slot order: token `t`'s slots are
/// `slots[start[t]..start[t + 1]]`. int32 throughout, the layout the CUDA kernels read too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSlots {
    /// `[numTokens + 1]` offsets into `slots`.
    pub start: Vec<i32>,
    /// `[numSlots]` slot ids grouped by token.
    pub slots: Vec<i32>,
}

/// Groups the slots by the token they hold (a stable counting sort of `token_of_slot`), for
/// merges that sum each token's slots in slot order. Tokens must be in `0..num_tokens`.
pub fn token_slots<I: Copy + Into<i64>>(token_of_slot: &[I], num_tokens: usize) -> Result<TokenSlots> {
    let n = token_of_slot.len();
    if i32::try_from(n).is_err() || i32::try_from(num_tokens).is_err() {
        return Err(Error::range("sortedIndices", format!("{n} slots of {num_tokens} tokens do not fit in int32 offsets")));
    }
    let mut start = try_vec(0i32, num_tokens + 1, "restoreShape[0]")?;
    for &t in token_of_slot {
        start[t.into() as usize + 1] += 1;
    }
    for t in 0..num_tokens {
        start[t + 1] += start[t];
    }
    let mut cursor = start[..num_tokens].to_vec();
    let mut slots = try_vec(0i32, n, "sortedIndices")?;
    for (i, &t) in token_of_slot.iter().enumerate() {
        let c = &mut cursor[t.into() as usize];
        slots[*c as usize] = i as i32;
        *c += 1;
    }
    Ok(TokenSlots { start, slots })
}

fn merge<T: Float>(permuted: &TensorRef, idx: &[i64], num_tokens: usize, hidden: usize, weights: Option<&[f32]>) -> Result<Tensor> {
    merge_rows::<T>(permuted, idx, num_tokens, hidden, weights, None).map(|t| t.expect("allocated without an out"))
}

/// The merge, into `out` (then `Ok(None)`) or a fresh tensor.
fn merge_rows<T: Float>(
    permuted: &TensorRef,
    idx: &[i64],
    num_tokens: usize,
    hidden: usize,
    weights: Option<&[f32]>,
    out: Option<&mut TensorMut>,
) -> Result<Option<Tensor>> {
    let src = permuted.typed::<T>()?;
    // Slots of each token in ascending slot order, so the f32 sums run in the same order as
    // the reference's scatter_add.
    let csr = token_slots(idx, num_tokens)?;
    let (start, slots) = (&csr.start, &csr.slots);
    let work = (idx.len() + num_tokens) * hidden * std::mem::size_of::<T>();
    let wide = wide_merge_rows();
    let fill = |out: &mut [std::mem::MaybeUninit<T>]| {
        for_each_row(
            out,
            hidden,
            work,
            || (),
            |_, t, row| merge_token(&src, hidden, &slots[start[t] as usize..start[t + 1] as usize], weights, row, wide),
        )
    };
    match out {
        Some(out) => {
            out.fill::<T>(fill);
            Ok(None)
        }
        None => Ok(Some(Tensor::from_elements(vec![num_tokens, hidden], try_filled_vec(num_tokens * hidden, "restoreShape", fill)?))),
    }
}

/// Whether [`merge_token`] may take its AVX2 path (checked once per call, not per row).
fn wide_merge_rows() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One token's merged row: `row[h] = round(sum over its slots i, in ascending order, of
/// src[i, h] * w[i])`, in f32 from 0.0 (without weights, of `src[i, h]`), rounded once to `T`.
/// Every path computes exactly these operations (a multiply, then an add: no fused
/// multiply-add), so the bits do not depend on the path taken or on the machine.
fn merge_token<T: Float>(
    src: &[T],
    hidden: usize,
    slots: &[i32],
    weights: Option<&[f32]>,
    row: &mut [std::mem::MaybeUninit<T>],
    wide: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is true only when the CPU has AVX2 (`wide_merge_rows`).
        return unsafe { merge_token_avx2(src, hidden, slots, weights, row) };
    }
    let _ = wide;
    merge_token_blocked::<T, 16>(src, hidden, slots, weights, row)
}

/// [`merge_token_blocked`] compiled for AVX2 (8 lanes: 32 sums in four registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn merge_token_avx2<T: Float>(
    src: &[T],
    hidden: usize,
    slots: &[i32],
    weights: Option<&[f32]>,
    row: &mut [std::mem::MaybeUninit<T>],
) {
    merge_token_blocked::<T, 32>(src, hidden, slots, weights, row)
}

/// The merge of one token `B` columns at a time: the `B` sums stay in registers while the
/// token's slot rows are read side by side (instead of a row-long f32 accumulator in memory
/// read and written once per slot), and each column block is rounded and written once. 16-bit
/// rows convert with bit shifts ([`Float`] for bf16), so the loops vectorise.
#[inline(always)]
fn merge_token_blocked<T: Float, const B: usize>(
    src: &[T],
    hidden: usize,
    slots: &[i32],
    weights: Option<&[f32]>,
    row: &mut [std::mem::MaybeUninit<T>],
) {
    let blocked = hidden - hidden % B;
    for c in (0..blocked).step_by(B) {
        let mut acc = [0f32; B];
        for &i in slots {
            let i = i as usize;
            let x: &[T; B] = src[i * hidden + c..i * hidden + c + B].try_into().expect("B elements");
            match weights {
                Some(w) => {
                    let p = w[i];
                    for (a, &v) in acc.iter_mut().zip(x) {
                        *a += v.to_f32() * p;
                    }
                }
                None => {
                    for (a, &v) in acc.iter_mut().zip(x) {
                        *a += v.to_f32();
                    }
                }
            }
        }
        for (o, &a) in row[c..c + B].iter_mut().zip(&acc) {
            o.write(T::from_f32(a));
        }
    }
    for (h, o) in row.iter_mut().enumerate().skip(blocked) {
        let mut a = 0f32;
        for &i in slots {
            let v = src[i as usize * hidden + h].to_f32();
            a += match weights {
                Some(w) => v * w[i as usize],
                None => v,
            };
        }
        o.write(T::from_f32(a));
    }
}

/// Output of [`permute_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct PermuteGrads {
    /// `[T, H]`: each token's gradient is the sum of its slots' gradients (f32 sum, rounded once).
    pub grad_tokens: Tensor,
    /// `[T, E]` f32, when a gradient of `permutedProbs` was given: slot `i`'s gradient lands at
    /// `(sortedIndices[i], expert of slot i)`; entries no slot read are 0.
    pub grad_probs: Option<Tensor>,
}

/// The routing map's checks of [`slot_experts_of`] that need no slot's token (the map's values
/// on the host): the number of experts.
fn check_slot_map(routing_map: Meta, n: usize, num_tokens: usize, drop_and_pad: bool) -> Result<usize> {
    let dims = routing_map.expect_rank(2, "[numTokens, numExperts]")?;
    let num_experts = dims[1];
    routing_map.expect_shape(&[num_tokens, num_experts], "([numTokens, numExperts])")?;
    routing_map.check_mask()?;
    if drop_and_pad && (num_experts == 0 || n % num_experts != 0) {
        return Err(Error::range(
            "sortedIndices.shape[0]",
            format!("{n} slots are not numExperts = {num_experts} blocks of equal capacity"),
        ));
    }
    Ok(num_experts)
}

/// The expert of every slot: `floor(i / C)` in drop-and-pad mode, from the routing map's
/// column counts in plain mode (checked against `sorted` when `check_routed`).
fn slot_experts_of(
    idx: &[i64],
    routing_map: &TensorRef,
    num_tokens: usize,
    drop_and_pad: bool,
    check_routed: bool,
) -> Result<(usize, Vec<usize>)> {
    let n = idx.len();
    let num_experts = check_slot_map(routing_map.meta(), n, num_tokens, drop_and_pad)?;
    let map = routing_map.bytes();
    if drop_and_pad {
        let capacity = n / num_experts;
        return Ok((num_experts, (0..n).map(|i| i / capacity).collect()));
    }
    let plan = DispatchPlan::from_routing_map(map, num_tokens, num_experts)?;
    if plan.num_slots() != n {
        return Err(Error::range(
            "routingMap",
            format!("selects {} entries but there are {n} slots (was dropAndPad used to permute?)", plan.num_slots()),
        ));
    }
    let experts = plan.slot_experts();
    if check_routed {
        if let Some(i) = (0..n).find(|&i| map[idx[i] as usize * num_experts + experts[i]] == 0) {
            return Err(Error::range(
                "sortedIndices",
                format!("slot {i} holds token {} which routingMap does not route to expert {}", idx[i], experts[i]),
            ));
        }
    }
    Ok((num_experts, experts))
}

/// sortedIndices: `[numSlots]` int32 or int64, and (on the host) every token id in range.
fn check_indices(sorted_indices: Meta, n: usize, num_tokens: usize) -> Result<()> {
    sorted_indices.expect_rank(1, "[numSlots]")?;
    sorted_indices.expect_shape(&[n], "([numSlots], one token id per slot)")?;
    if let Some((i, t)) = sorted_indices.first_outside(num_tokens)? {
        return Err(Error::range("sortedIndices", format!("sortedIndices[{i}] = {t} is outside [0, numTokens = {num_tokens})")));
    }
    Ok(())
}

/// permuteBackward's arguments once checked: what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermuteBackwardCheck {
    pub num_slots: usize,
    pub hidden: usize,
    pub num_tokens: usize,
    /// With gradPermutedProbs: the routing map's number of experts (the width of gradProbs).
    pub num_experts: Option<usize>,
}

/// Every check of [`permute_backward`] but a plain routing map's routes (which need the slots'
/// tokens). The CPU op runs them all before its merge.
pub fn check_permute_backward(
    grad_permuted: Meta,
    sorted_indices: Meta,
    num_tokens: usize,
    grad_permuted_probs: Option<Meta>,
    routing_map: Option<Meta>,
    options: UnpermuteOptions,
) -> Result<PermuteBackwardCheck> {
    let dims = grad_permuted.expect_rank(2, "[numSlots, hidden]")?;
    let (n, hidden) = (dims[0], dims[1]);
    grad_permuted.expect_dtype(DType::TOKENS)?;
    check_num_tokens(num_tokens)?;
    check_indices(sorted_indices, n, num_tokens)?;
    let num_experts = match grad_permuted_probs {
        None => None,
        Some(gp) => {
            gp.expect_dtype(&[DType::F32])?;
            gp.expect_shape(&[n], "([numSlots], the gradient of permutedProbs)")?;
            let Some(routing_map) = routing_map else {
                return Err(Error::type_error(
                    "routingMap",
                    "the routing map of the permutation, to place the probs gradient",
                    "undefined",
                ));
            };
            Some(check_slot_map(routing_map, n, num_tokens, options.drop_and_pad)?)
        }
    };
    Ok(PermuteBackwardCheck { num_slots: n, hidden, num_tokens, num_experts })
}

/// Backward of [`permute`]: `gradPermuted [N, H]` (and optionally the gradient of
/// `permutedProbs`, `[N]`) to the gradients of `tokens` and of the dense `probs`.
/// The probs gradient needs the routing map (to know each slot's expert).
pub fn permute_backward(
    grad_permuted: &TensorRef,
    sorted_indices: &TensorRef,
    num_tokens: usize,
    grad_permuted_probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<PermuteGrads> {
    let g = permute_backward_into(grad_permuted, sorted_indices, num_tokens, grad_permuted_probs, routing_map, options, None)?;
    Ok(PermuteGrads { grad_tokens: g.0.expect("allocated without an out"), grad_probs: g.1 })
}

/// [`permute_backward`] writing gradTokens into a caller-owned `out` (`[numTokens, hidden]` of
/// gradPermuted's dtype, sharing no memory with an input), checked with every other argument
/// before a byte is written. Returns (gradTokens when allocated, gradProbs).
pub fn permute_backward_into(
    grad_permuted: &TensorRef,
    sorted_indices: &TensorRef,
    num_tokens: usize,
    grad_permuted_probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
    out: Option<&mut TensorMut>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let c = check_permute_backward(
        grad_permuted.meta(),
        sorted_indices.meta(),
        num_tokens,
        grad_permuted_probs.map(|g| g.meta()),
        routing_map.map(|m| m.meta()),
        options,
    )?;
    let (n, hidden) = (c.num_slots, c.hidden);
    let idx = sorted_indices.indices()?;
    if out.is_none() {
        let grad_tokens = merge_dtype(grad_permuted, &idx, num_tokens, hidden, None)?;
        return Ok((Some(grad_tokens), permute_backward_probs(&idx, n, num_tokens, grad_permuted_probs, routing_map, options)?));
    }
    let out = out.unwrap();
    out.expect(grad_permuted.dtype, &[num_tokens, hidden], "([numTokens, hidden] of the dtype of gradPermuted)")?;
    check_out_disjoint(out, &[Some(grad_permuted), Some(sorted_indices), grad_permuted_probs, routing_map])?;
    // gradProbs first: its checks (every slot routed) must pass before out is written.
    let grad_probs = permute_backward_probs(&idx, n, num_tokens, grad_permuted_probs, routing_map, options)?;
    merge_into(grad_permuted, &idx, num_tokens, hidden, None, out)?;
    Ok((None, grad_probs))
}

fn permute_backward_probs(
    idx: &[i64],
    n: usize,
    num_tokens: usize,
    grad_permuted_probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<Option<Tensor>> {
    Ok(match (grad_permuted_probs, routing_map) {
        (Some(gp), Some(routing_map)) => {
            let (num_experts, experts) = slot_experts_of(idx, routing_map, num_tokens, options.drop_and_pad, true)?;
            let g = gp.typed::<f32>()?;
            let mut dense = try_vec(0f32, num_tokens * num_experts, "routingMap")?;
            for i in 0..n {
                dense[idx[i] as usize * num_experts + experts[i]] += g[i];
            }
            Some(Tensor::f32(vec![num_tokens, num_experts], dense))
        }
        _ => None,
    })
}

/// Output of [`unpermute_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct UnpermuteGrads {
    /// `[N, H]`: `gradOutput[sortedIndices[i]] * p_i`, rounded to the token dtype.
    pub grad_permuted: Tensor,
    /// Present when probs were given, shaped like them (`[N]` or `[T, E]`):
    /// `dp_i = sum_h gradOutput[sortedIndices[i], h] * permuted[i, h]` (accumulated in f64).
    pub grad_probs: Option<Tensor>,
}

/// unpermuteBackward's arguments once checked: what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpermuteBackwardCheck {
    pub num_tokens: usize,
    pub num_slots: usize,
    pub hidden: usize,
    pub dtype: DType,
    pub probs: SlotProbsLayout,
}

/// Every check of [`unpermute_backward`] but a plain routing map's routes (which need the slots'
/// tokens), in the op's order.
pub fn check_unpermute_backward(
    grad_output: Meta,
    permuted: Meta,
    sorted_indices: Meta,
    probs: Option<Meta>,
    routing_map: Option<Meta>,
    options: UnpermuteOptions,
) -> Result<UnpermuteBackwardCheck> {
    let dims = grad_output.expect_rank(2, "[numTokens, hidden]")?;
    let (num_tokens, hidden) = (dims[0], dims[1]);
    let dtype = grad_output.expect_dtype(DType::TOKENS)?;
    permuted.expect_rank(2, "[numSlots, hidden]")?;
    let n = permuted.shape[0];
    permuted.expect_shape(&[n, hidden], "([numSlots, hidden of gradOutput])")?;
    if permuted.dtype != dtype {
        return Err(Error::type_error(
            "permutedTokens.dtype",
            format!("{} (the dtype of gradOutput)", dtype.name()),
            permuted.dtype.name(),
        ));
    }
    check_num_tokens(num_tokens)?;
    check_indices(sorted_indices, n, num_tokens)?;
    let probs = check_slot_probs(probs, routing_map, n, num_tokens, options)?;
    Ok(UnpermuteBackwardCheck { num_tokens, num_slots: n, hidden, dtype, probs })
}

/// Backward of [`unpermute`]: the gradient of its output `[T, H]` to the gradients of
/// `permutedTokens` and of the probs (in the layout they were given in).
pub fn unpermute_backward(
    grad_output: &TensorRef,
    permuted: &TensorRef,
    sorted_indices: &TensorRef,
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<UnpermuteGrads> {
    let c = check_unpermute_backward(
        grad_output.meta(),
        permuted.meta(),
        sorted_indices.meta(),
        probs.map(|p| p.meta()),
        routing_map.map(|m| m.meta()),
        options,
    )?;
    let (num_tokens, hidden, dtype) = (c.num_tokens, c.hidden, c.dtype);
    let idx = sorted_indices.indices()?;
    let weights = slot_weights(&idx, num_tokens, probs, routing_map, c.probs, options)?;
    Ok(match dtype {
        DType::F32 => unmerge::<f32>(grad_output, permuted, &idx, hidden, weights.as_deref(), probs, routing_map, options)?,
        DType::BF16 => unmerge::<bf16>(grad_output, permuted, &idx, hidden, weights.as_deref(), probs, routing_map, options)?,
        DType::F16 => unmerge::<f16>(grad_output, permuted, &idx, hidden, weights.as_deref(), probs, routing_map, options)?,
        _ => unreachable!("dtype checked above"),
    })
}

#[allow(clippy::too_many_arguments)]
fn unmerge<T: Float>(
    grad_output: &TensorRef,
    permuted: &TensorRef,
    idx: &[i64],
    hidden: usize,
    weights: Option<&[f32]>,
    probs: Option<&TensorRef>,
    routing_map: Option<&TensorRef>,
    options: UnpermuteOptions,
) -> Result<UnpermuteGrads> {
    let g = grad_output.typed::<T>()?;
    let n = idx.len();
    let work = 2 * n * hidden * std::mem::size_of::<T>();
    let grad_permuted = try_filled_vec(n * hidden, "gradPermuted", |out| {
        for_each_row(
            out,
            hidden,
            work,
            || (),
            |_, i, row| {
                let t = idx[i] as usize;
                let src = &g[t * hidden..(t + 1) * hidden];
                match weights {
                    Some(w) => {
                        for (o, &v) in row.iter_mut().zip(src) {
                            o.write(T::from_f32(v.to_f32() * w[i]));
                        }
                    }
                    None => write_slice(row, src),
                }
            },
        )
    })?;
    let grad_probs = match (weights, probs) {
        (Some(_), Some(p)) => {
            let x = permuted.typed::<T>()?;
            let dot = |i: usize| -> f32 {
                let t = idx[i] as usize;
                let gr = &g[t * hidden..(t + 1) * hidden];
                let xr = &x[i * hidden..(i + 1) * hidden];
                gr.iter().zip(xr).map(|(&a, &b)| a.to_f32() as f64 * b.to_f32() as f64).sum::<f64>() as f32
            };
            if p.shape.len() == 1 {
                Some(Tensor::f32(vec![n], (0..n).map(dot).collect()))
            } else {
                let num_tokens = grad_output.shape[0];
                let routing_map =
                    routing_map.ok_or_else(|| Error::Internal("dense probs without routing map passed slot_weights".into()))?;
                let (num_experts, experts) = slot_experts_of(idx, routing_map, num_tokens, options.drop_and_pad, false)?;
                let mut dense = vec![0f32; num_tokens * num_experts];
                for i in 0..n {
                    dense[idx[i] as usize * num_experts + experts[i]] += dot(i);
                }
                Some(Tensor::f32(vec![num_tokens, num_experts], dense))
            }
        }
        _ => None,
    };
    Ok(UnpermuteGrads { grad_permuted: Tensor::from_elements(vec![n, hidden], grad_permuted), grad_probs })
}

/// Probs as checked input: borrowed when the caller's buffer could be used as is; `None`: no probs.
pub type SlotProbs<'a> = Option<Cow<'a, [f32]>>;

/// Everything [`permute`] checks, without the gather: the plan, the hidden size and the dense
/// probs.
pub fn permute_inputs<'a>(
    tokens: &TensorRef,
    routing_map: &TensorRef,
    probs: Option<&TensorRef<'a>>,
    options: PermuteOptions,
) -> Result<(DispatchPlan, usize, SlotProbs<'a>)> {
    let c = check_permute_plan(tokens.meta(), routing_map.meta(), options)?;
    let plan = build_plan(routing_map.bytes(), c.num_tokens, c.num_experts, c.capacity, options)?;
    let dense = match probs {
        Some(p) => {
            check_permute_probs(p.meta(), &c)?;
            Some(p.typed::<f32>()?)
        }
        None => None,
    };
    Ok((plan, c.hidden, dense))
}

/// unpermute's arguments once checked: what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpermuteCheck {
    pub num_tokens: usize,
    pub hidden: usize,
    pub num_slots: usize,
    pub probs: SlotProbsLayout,
}

/// Every check of [`unpermute`] but a plain routing map's routes (which need the slots' tokens),
/// in the op's order.
pub fn check_unpermute(
    permuted: Meta,
    sorted_indices: Meta,
    restore_shape: [usize; 2],
    probs: Option<Meta>,
    routing_map: Option<Meta>,
    options: UnpermuteOptions,
) -> Result<UnpermuteCheck> {
    let dims = permuted.expect_rank(2, "[numSlots, hidden]")?;
    let (n, hidden) = (dims[0], dims[1]);
    let [num_tokens, out_hidden] = restore_shape;
    permuted.expect_dtype(DType::TOKENS)?;
    if out_hidden != hidden {
        return Err(Error::range("restoreShape", format!("hidden size {out_hidden} differs from permutedTokens' {hidden}")));
    }
    check_num_tokens(num_tokens)?;
    check_indices(sorted_indices, n, num_tokens)?;
    let probs = check_slot_probs(probs, routing_map, n, num_tokens, options)?;
    Ok(UnpermuteCheck { num_tokens, hidden, num_slots: n, probs })
}

/// Everything [`unpermute`] checks, without the merge: the token id of every slot (checked to
/// be in range) and each slot's weight (`None`: weight 1).
pub fn unpermute_inputs<'a>(
    permuted: &TensorRef,
    sorted_indices: &TensorRef<'a>,
    restore_shape: [usize; 2],
    probs: Option<&TensorRef<'a>>,
    routing_map: Option<&TensorRef<'a>>,
    options: UnpermuteOptions,
) -> Result<(Cow<'a, [i64]>, SlotProbs<'a>)> {
    let c = check_unpermute(
        permuted.meta(),
        sorted_indices.meta(),
        restore_shape,
        probs.map(|p| p.meta()),
        routing_map.map(|m| m.meta()),
        options,
    )?;
    let idx = sorted_indices.indices()?;
    let weights = slot_weights(&idx, c.num_tokens, probs, routing_map, c.probs, options)?;
    Ok((idx, weights))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    fn map_ref(map: &[u8], t: usize, e: usize) -> TensorRef<'_> {
        TensorRef::new("routingMap", DType::Bool, vec![t, e], map).unwrap()
    }

    #[test]
    fn plain_plan_is_expert_major_and_ascending() {
        // 3 tokens, 3 experts; expert 1 gets nothing.
        let map = [1, 0, 1, 0, 0, 1, 1, 0, 0];
        let plan = DispatchPlan::from_routing_map(&map, 3, 3).unwrap();
        assert_eq!(plan.sorted_indices, vec![0, 2, 0, 1]);
        assert_eq!(plan.tokens_per_expert, vec![2, 0, 2]);
        assert_eq!(plan.slot_experts(), vec![0, 0, 2, 2]);
    }

    #[test]
    fn capacity_plan_drops_and_pads_with_lowest_unselected() {
        // expert 0 selected by tokens 0,1,2 (capacity 2 drops token 2); expert 1 by token 2 only.
        let map = [1, 0, 1, 0, 1, 1];
        let plan = DispatchPlan::with_capacity(&map, 3, 2, 2).unwrap();
        assert_eq!(plan.sorted_indices, vec![0, 1, 2, 0]);
    }

    #[test]
    fn permute_then_unpermute_weights_each_slot() {
        let tokens: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let map = [1u8, 1, 0, 1, 1, 0];
        let probs: Vec<f32> = vec![0.5, 0.25, 0.0, 1.0, 2.0, 0.0];
        let tok = TensorRef::of("tokens", vec![3, 2], &tokens).unwrap();
        let pr = TensorRef::of("probs", vec![3, 2], &probs).unwrap();
        let out = permute(&tok, &map_ref(&map, 3, 2), Some(&pr), PermuteOptions::default()).unwrap();
        assert_eq!(out.sorted_indices.data, Data::I32(vec![0, 2, 0, 1]));
        assert_eq!(out.permuted_probs.as_ref().unwrap().data, Data::F32(vec![0.5, 2.0, 0.25, 1.0]));
        let Data::F32(rows) = &out.permuted_tokens.data else { unreachable!() };
        assert_eq!(rows, &vec![1.0, 2.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);

        let Data::I32(sorted) = &out.sorted_indices.data else { unreachable!() };
        let perm = TensorRef::of("permutedTokens", vec![4, 2], rows).unwrap();
        let si = TensorRef::of("sortedIndices", vec![4], sorted).unwrap();
        let merged = unpermute(&perm, &si, [3, 2], Some(&pr), Some(&map_ref(&map, 3, 2)), UnpermuteOptions::default()).unwrap();
        // token 0: 0.5*[1,2] + 0.25*[1,2]; token 1: 1.0*[3,4]; token 2: 2.0*[5,6]
        assert_eq!(merged.data, Data::F32(vec![0.75, 1.5, 3.0, 4.0, 10.0, 12.0]));
    }

    #[test]
    fn into_writes_what_the_allocating_call_returns_and_checks_first() {
        let tokens: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let map = [1u8, 1, 0, 1, 1, 0];
        let probs: Vec<f32> = vec![0.5, 0.25, 0.0, 1.0, 2.0, 0.0];
        let tok = TensorRef::of("tokens", vec![3, 2], &tokens).unwrap();
        let pr = TensorRef::of("probs", vec![3, 2], &probs).unwrap();
        let want = permute(&tok, &map_ref(&map, 3, 2), Some(&pr), PermuteOptions::default()).unwrap();
        let (mut rows, mut ps) = (vec![9f32; 8], vec![9f32; 4]);
        let mut ot = TensorMut::of("out.permutedTokens", vec![4, 2], &mut rows).unwrap();
        let mut op = TensorMut::of("out.permutedProbs", vec![4], &mut ps).unwrap();
        let got = permute_into(
            &tok,
            &map_ref(&map, 3, 2),
            Some(&pr),
            PermuteOptions::default(),
            PermuteOut { permuted_tokens: Some(&mut ot), permuted_probs: Some(&mut op) },
        )
        .unwrap();
        assert!(got.permuted_tokens.is_none() && got.permuted_probs.is_none());
        assert_eq!(got.sorted_indices, want.sorted_indices);
        assert_eq!(Data::F32(rows.clone()), want.permuted_tokens.data);
        assert_eq!(Data::F32(ps), want.permuted_probs.unwrap().data);

        // A wrong shape is reported and nothing is written.
        let mut small = vec![7f32; 6];
        let mut o = TensorMut::of("out", vec![2, 3], &mut small).unwrap();
        let perm = TensorRef::of("permutedTokens", vec![4, 2], &rows).unwrap();
        let si_data = [0i32, 2, 0, 1];
        let si = TensorRef::of("sortedIndices", vec![4], &si_data).unwrap();
        let e = unpermute_into(&perm, &si, [3, 2], None, None, UnpermuteOptions::default(), &mut o);
        assert!(e.is_err_and(|e| e.to_string().contains("out.shape")));
        assert_eq!(small, vec![7f32; 6]);
        let mut o = TensorMut::of("out", vec![3, 2], &mut small).unwrap();
        unpermute_into(&perm, &si, [3, 2], None, None, UnpermuteOptions::default(), &mut o).unwrap();
        let want = unpermute(&perm, &si, [3, 2], None, None, UnpermuteOptions::default()).unwrap();
        assert_eq!(Data::F32(small), want.data);
    }

    /// The merge's every path (blocked, with a tail; AVX2 where the CPU has it) gives the bits
    /// of the plain per-element loop: f32 sums from 0.0 in slot order, rounded once.
    #[test]
    fn merge_paths_match_the_plain_loop_bit_for_bit() {
        fn check<T: Float + std::fmt::Debug>(bits: impl Fn(u32) -> T) {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let specials = [0x8000_0000u32, 0x7f80_0000, 0xff80_0000, 0x7fc0_0001, 0x0000_0001, 0x3f80_8000, 0x7f7f_ffff];
            for hidden in [1usize, 7, 16, 31, 32, 33, 70] {
                let num_slots = 11;
                let src: Vec<T> = (0..num_slots * hidden)
                    .map(|i| {
                        bits(if i % 13 == 5 {
                            specials[i % specials.len()]
                        } else {
                            (0x3c00_0000 + (next() as u32 & 0x07ff_ffff)) ^ (next() as u32 & 0x8000_0000)
                        })
                    })
                    .collect();
                let w: Vec<f32> = (0..num_slots).map(|i| if i == 3 { -0.0 } else { (next() % 1000) as f32 / 333.0 - 1.0 }).collect();
                // token 2 gets no slot; token 0 gets five.
                let slots_of: [&[i32]; 4] = [&[0, 2, 5, 8, 10], &[1, 4], &[], &[3, 6, 7, 9]];
                for weights in [None, Some(&w[..])] {
                    for (t, slots) in slots_of.iter().enumerate() {
                        let want: Vec<T> = (0..hidden)
                            .map(|h| {
                                let mut a = 0f32;
                                for &i in slots.iter() {
                                    let v = src[i as usize * hidden + h].to_f32();
                                    a += match weights {
                                        Some(w) => v * w[i as usize],
                                        None => v,
                                    };
                                }
                                T::from_f32(a)
                            })
                            .collect();
                        for wide in [false, wide_merge_rows()] {
                            let mut row = vec![std::mem::MaybeUninit::<T>::uninit(); hidden];
                            merge_token(&src, hidden, slots, weights, &mut row, wide);
                            let got: Vec<T> = row.iter().map(|x| unsafe { x.assume_init() }).collect();
                            assert_eq!(
                                bytemuck::cast_slice::<T, u8>(&got),
                                bytemuck::cast_slice::<T, u8>(&want),
                                "hidden {hidden} token {t} wide {wide} {weights:?}"
                            );
                        }
                    }
                }
            }
        }
        check::<f32>(f32::from_bits);
        check::<bf16>(|b| bf16::from_bits((b >> 16) as u16));
        check::<f16>(|b| f16::from_f32(f32::from_bits(b)));
    }

    #[test]
    fn errors_name_the_argument() {
        let tokens = vec![0f32; 6];
        let tok = TensorRef::of("tokens", vec![3, 2], &tokens).unwrap();
        let map = [1u8, 0, 0, 1, 1, 0];
        let err = permute(&tok, &map_ref(&map, 3, 2), None, PermuteOptions { num_out_tokens: Some(3), drop_and_pad: true }).unwrap_err();
        assert!(err.to_string().starts_with("numOutTokens: 3 is not a multiple of numExperts = 2"), "{err}");
        let err = permute(&tok, &map_ref(&map, 3, 2), None, PermuteOptions { num_out_tokens: Some(8), drop_and_pad: true }).unwrap_err();
        assert!(err.to_string().contains("exceeds numTokens = 3"), "{err}");
        let idx = [0i32, 3];
        let perm = TensorRef::of("permutedTokens", vec![2, 2], &tokens[..4]).unwrap();
        let si = TensorRef::of("sortedIndices", vec![2], &idx[..]).unwrap();
        let err = unpermute(&perm, &si, [3, 2], None, None, UnpermuteOptions::default()).unwrap_err();
        assert!(err.to_string().starts_with("sortedIndices: sortedIndices[1] = 3 is outside"), "{err}");
    }
}
