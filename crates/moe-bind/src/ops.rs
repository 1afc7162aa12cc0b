//! The op table: every CPU op's argument object, core call and result, once. `op_table!(m)`
//! hands the whole table to a macro `m`: here `define` (the generic functions and `decls()`),
//! in moe-node and moe-wasm the macro that exports each op under its name. An argument is
//! `name: Kind` (see lib.rs; `Option<Kind>` when it may be absent); an argument group (`group!`)
//! is several fields that become one core options struct. Adding an option is one field here
//! (and in its group's conversion); adding an op is one entry; then regenerate the declarations.

#![allow(non_snake_case)]

use std::borrow::Cow;

use moe_core::activations::{ActivationKind, ActivationOptions};
use moe_core::aux_loss::{SwitchLossOptions, DEFAULT_COEFF};
use moe_core::capacity::{DropOptions, DropPolicy};
use moe_core::checkpoint::ExpertFormat;
use moe_core::experts::ExpertsInputs;
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_core::routing::RouteOptions;
use moe_core::sharding::{mesh_arg, placements_arg, shape_arg, Placed as CorePlaced, Placement};
use moe_core::{aux_loss, capacity, checkpoint, chunks, experts, grouped, permute, routing, routing_map, sharding, Error, Result};

use crate::*;

group! {
    /// route's options (routeBackward takes the same).
    RouteArgs<'h> -> RouteOptions { topk: Num, scoreFunction: Option<Str>, softmaxBeforeTopk: Option<Bool>, numGroups: Option<Num>, topkGroups: Option<Num>, normTopkProb: Option<Bool>, routeScale: Option<Num> }
    => RouteOptions::from_args(topk, scoreFunction, softmaxBeforeTopk, numGroups, topkGroups, normTopkProb, routeScale)
}

group! {
    /// An activation and its constants (the activations and the grouped experts).
    ActArgs<'h> -> ActivationOptions { kind: Option<Str>, alpha: Option<Num>, limit: Option<Num>, linearOffset: Option<Num> }
    => ActivationOptions::from_args(kind, alpha, limit, linearOffset)
}

group! {
    /// The Switch losses' options.
    SwitchArgs<'h> -> SwitchLossOptions { topk: Num, coeff: Option<Num>, numTokens: Option<Num> } => SwitchLossOptions::from_args(topk, coeff, numTokens)
}

group! {
    /// A grouped-experts call's tensors (`T`: how they are held; the CUDA functions take device
    /// tensors); the up projection is `gateAndUpProjs`, or `upProjs` (relu2).
    ExpertsArgs<'h, T = Tensor> -> ExpertsInputs<<T as Kind<O>>::Core<'h>> {
        permutedTokens: T, tokensPerExpert: T, gateAndUpProjs: Option<T>, upProjs: Option<T>, downProjs: T,
        permutedProbs: Option<T>, gateUpProjBias: Option<T>, downProjBias: Option<T>,
    } => Ok(ExpertsInputs {
        tokens: permutedTokens,
        tokens_per_expert: tokensPerExpert,
        gate_and_up: gateAndUpProjs.or(upProjs).ok_or_else(|| Error::type_error("gateAndUpProjs", format!("{} (or upProjs)", T::ts()), "undefined"))?,
        down: downProjs,
        probs: permutedProbs,
        gate_up_bias: gateUpProjBias,
        down_bias: downProjBias,
    })
}

group! {
    /// dropTokens' options.
    DropArgs<'h> -> DropOptions { topk: Size, capacityFactor: Num, dropPolicy: Option<Str>, padToCapacity: Flag }
    => Ok(DropOptions { topk, capacity_factor: capacityFactor, drop_policy: DropPolicy::parse(dropPolicy)?, pad_to_capacity: padToCapacity })
}

group! {
    /// Expert parallelism: experts in the model, ranks, this rank.
    EpArgs<'h> -> (usize, usize, usize) { numExperts: Size, epSize: Size, epRank: Size } => Ok((numExperts, epSize, epRank))
}

group! {
    /// An expert checkpoint's activation (it decides the layout) and key scheme.
    KindFormat<'h> -> (ActivationKind, Option<ExpertFormat>) { kind: Option<Str>, format: Option<Str> } => Ok((ActivationKind::parse(kind)?, ExpertFormat::parse(format)?))
}

results! {
    Multihot { routingMap: Tensor, probs: Tensor }
    Indices { indices: Tensor, probs: Tensor }
    /// permutedTokens / permutedProbs are left out when written into the given output.
    Permuted { permutedTokens: Option<Tensor>, permutedProbs: Option<Tensor>, sortedIndices: Tensor, tokensPerExpert: Tensor }
    Plan { sortedIndices: Tensor, tokensPerExpert: Tensor }
    /// gradTokens is left out when written into the given output.
    PermuteGrads { gradTokens: Option<Tensor>, gradProbs: Option<Tensor> }
    UnpermuteGrads { gradPermuted: Tensor, gradProbs: Option<Tensor> }
    Routed { weights: Tensor, indices: Tensor, scores: Tensor, tokensPerExpert: Tensor }
    RouteGrads { gradLogits: Tensor }
    TopK { values: Tensor, indices: Tensor }
    ProbsLoss { loss: Num, gradProbs: Tensor }
    LogitsLoss { loss: Num, gradLogits: Tensor }
    InputGrads { gradInput: Tensor, gradProbs: Option<Tensor> }
    ExpertsGrads {
        gradTokens: Tensor, gradGateAndUpProjs: Tensor, gradDownProjs: Tensor,
        gradGateUpProjBias: Option<Tensor>, gradDownProjBias: Option<Tensor>, gradProbs: Option<Tensor>,
    }
    Dropped { routingMap: Tensor, probs: Tensor, capacity: Size }
    SortedChunks { output: Tensor, probs: Option<Tensor> }
    GroupedSort { sortedTokenIds: Tensor, sortedSlotIds: Tensor, sortedWeights: Tensor, tokensPerExpert: Tensor, offsets: Tensor }
    ExpertRange { start: Size, end: Size }
    ExpertTensor { expertId: Size, tensor: Tensor }
    Placed { axisNames: List<Str>, axisSizes: List<Size>, placements: List<Str> }
    /// int64 tensors as their little-endian bytes (the facade makes a BigInt64Array).
    NamedTensors { tensors: Record<LoadedTensor>, metadata: Record<Str>, bytesRead: Size }
    TensorInfo { name: Str, dtype: Str, shape: List<Size>, file: Str }
    CheckpointInfo { tensors: List<TensorInfo>, metadata: Record<Str>, bytesRead: Size }
    LoadedExperts {
        gateAndUpProjs: Tensor, downProjs: Tensor, gateUpProjBias: Option<Tensor>, downProjBias: Option<Tensor>,
        start: Size, end: Size, format: Str, bytesRead: Size,
    }
}

impl From<routing::Routed> for Routed {
    fn from(o: routing::Routed) -> Routed {
        Routed { weights: o.weights, indices: o.indices, scores: o.scores, tokensPerExpert: o.tokens_per_expert }
    }
}

impl From<routing::TopK> for TopK {
    fn from(o: routing::TopK) -> TopK {
        TopK { values: o.values, indices: o.indices }
    }
}

impl From<permute::Permuted> for Permuted {
    fn from(o: permute::Permuted) -> Permuted {
        Permuted {
            permutedTokens: Some(o.permuted_tokens),
            permutedProbs: o.permuted_probs,
            sortedIndices: o.sorted_indices,
            tokensPerExpert: o.tokens_per_expert,
        }
    }
}

fn range(r: sharding::ExpertRange) -> ExpertRange {
    ExpertRange { start: r.start, end: r.end }
}

fn placed(p: CorePlaced) -> Placed {
    Placed {
        axisNames: p.mesh.iter().map(|a| a.name.clone()).collect(),
        axisSizes: p.mesh.iter().map(|a| a.size).collect(),
        placements: p.placements.iter().map(|p| p.name()).collect(),
    }
}

fn loaded(l: checkpoint::LoadedExperts) -> LoadedExperts {
    LoadedExperts {
        gateAndUpProjs: l.gate_and_up,
        downProjs: l.down,
        gateUpProjBias: l.gate_up_bias,
        downProjBias: l.down_bias,
        start: l.range.start,
        end: l.range.end,
        format: l.format.name().into(),
        bytesRead: l.bytes_read as usize,
    }
}

/// The table itself, handed to `$m`.
#[macro_export]
macro_rules! op_table {
    ($m:ident) => {
        $m! {
            /// Worker threads the backend uses for large inputs (wasm: 1).
            numThreads() -> Size { Ok::<_, Error>(moe_core::num_threads()) }

            // Routing maps, permute and unpermute.
            indicesToMultihot(indices: Tensor, probs: Tensor, numExperts: Size) -> Multihot {
                routing_map::indices_to_multihot(&indices, &probs, numExperts).map(|o| Multihot { routingMap: o.routing_map, probs: o.probs })
            }
            /// indicesToMultihot's checks on dtypes and shapes (the indices' values are the op's own
            /// checks: call this only for indices known to be in range and distinct in each row).
            /// The number of tokens.
            checkIndicesToMultihot(indices: TensorMeta, probs: TensorMeta, numExperts: Size) -> Size {
                routing_map::check_indices_to_multihot(indices.meta(), probs.meta(), numExperts).map(|(tokens, _)| tokens)
            }
            multihotToIndices(routingMap: Tensor, probs: Option<Tensor>, topk: Option<Size>) -> Indices {
                routing_map::multihot_to_indices(&routingMap, probs.as_ref(), topk).map(|o| Indices { indices: o.indices, probs: o.probs })
            }
            /// outPermutedTokens / outPermutedProbs: caller-owned outputs, written instead of allocated.
            permute(tokens: Tensor, routingMap: Tensor, probs: Option<Tensor>, numOutTokens: Option<Size>, dropAndPad: Flag, outPermutedTokens: Option<Out>, outPermutedProbs: Option<Out>) -> Permuted {
                let options = PermuteOptions { num_out_tokens: numOutTokens, drop_and_pad: dropAndPad };
                let outs = [(outPermutedTokens.as_ref(), "out.permutedTokens"), (outPermutedProbs.as_ref(), "out.permutedProbs")];
                with_outs(&outs, |o| {
                    let [t, p] = o else { unreachable!() };
                    permute::permute_into(&tokens, &routingMap, probs.as_ref(), options, permute::PermuteOut { permuted_tokens: t.as_mut(), permuted_probs: p.as_mut() })
                }).map(|o| Permuted {
                    permutedTokens: o.permuted_tokens,
                    permutedProbs: o.permuted_probs,
                    sortedIndices: o.sorted_indices,
                    tokensPerExpert: o.tokens_per_expert,
                })
            }
            /// permute's plan alone (its sortedIndices and tokensPerExpert), without moving a token.
            permutePlan(routingMap: Tensor, numOutTokens: Option<Size>, dropAndPad: Flag) -> Plan {
                let options = PermuteOptions { num_out_tokens: numOutTokens, drop_and_pad: dropAndPad };
                let plan = permute::plan(&routingMap, routingMap.shape.first().copied().unwrap_or(0), options)?;
                let counts = plan.tokens_per_expert.iter().map(|&n| n as i32).collect::<Vec<_>>();
                let sorted = moe_core::Tensor::i32(vec![plan.num_slots()], plan.sorted_indices);
                Ok::<_, Error>(Plan { sortedIndices: sorted, tokensPerExpert: moe_core::Tensor::i32(vec![counts.len()], counts) })
            }
            /// Every check of permute without moving a token: tokens and probs by dtype and shape,
            /// the routing map's values when its data is given; without its data, `numSlots` (the
            /// map's count, which the caller knows) is checked against numOutTokens. The number of
            /// output rows.
            checkPermute(tokens: TensorMeta, routingMap: TensorMeta, probs: Option<TensorMeta>, numOutTokens: Option<Size>, dropAndPad: Flag, numSlots: Option<Size>) -> Size {
                let options = PermuteOptions { num_out_tokens: numOutTokens, drop_and_pad: dropAndPad };
                let c = permute::check_permute(tokens.meta(), routingMap.meta(), probs.as_ref().map(|p| p.meta()), options)?;
                match c.capacity {
                    Some(capacity) => Ok(capacity * c.num_experts),
                    None => {
                        let count = match (routingMap.meta().host_bytes(), numSlots) {
                            (Some(bytes), _) => moe_core::tensor::mask_ones(bytes),
                            (None, Some(n)) => n,
                            (None, None) => return Err(Error::type_error("numSlots", "a number (the routing map's count) when the map's data is not given", "undefined")),
                        };
                        permute::check_num_out_tokens(options, count).map(|()| count)
                    }
                }
            }
            /// Every check of unpermute on dtypes and shapes, and on sortedIndices' and the routing
            /// map's values when their data is given (then the slot weights' checks are the op's
            /// own: give routingMap's data, or run the op). The number of slots.
            checkUnpermute(restoreShape: Nums, permutedTokens: TensorMeta, sortedIndices: TensorMeta, probs: Option<TensorMeta>, routingMap: Option<TensorMeta>, dropAndPad: Flag) -> Size {
                let restore = permute::restore_shape_arg(restoreShape)?;
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                permute::check_unpermute(permutedTokens.meta(), sortedIndices.meta(), restore, probs.as_ref().map(|p| p.meta()), routingMap.as_ref().map(|m| m.meta()), options).map(|c| c.num_slots)
            }
            /// out: a caller-owned output, written instead of allocated (then the result is null).
            unpermute(restoreShape: Nums, permutedTokens: Tensor, sortedIndices: Tensor, probs: Option<Tensor>, routingMap: Option<Tensor>, dropAndPad: Flag, out: Option<Out>) -> Nullable<Tensor> {
                let restore = permute::restore_shape_arg(restoreShape)?;
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                alloc_or_into(
                    out.as_ref(),
                    || permute::unpermute(&permutedTokens, &sortedIndices, restore, probs.as_ref(), routingMap.as_ref(), options),
                    |out| permute::unpermute_into(&permutedTokens, &sortedIndices, restore, probs.as_ref(), routingMap.as_ref(), options, out),
                )
            }
            /// Every check of permuteBackward on dtypes and shapes, and on sortedIndices' and the
            /// routing map's values when their data is given, but a plain routing map's routes (with
            /// gradPermutedProbs and without dropAndPad: the op's own). The number of slots.
            checkPermuteBackward(gradPermuted: TensorMeta, sortedIndices: TensorMeta, numTokens: Size, gradPermutedProbs: Option<TensorMeta>, routingMap: Option<TensorMeta>, dropAndPad: Flag) -> Size {
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                permute::check_permute_backward(gradPermuted.meta(), sortedIndices.meta(), numTokens, gradPermutedProbs.as_ref().map(|g| g.meta()), routingMap.as_ref().map(|m| m.meta()), options).map(|c| c.num_slots)
            }
            /// outGradTokens: a caller-owned output for gradTokens, written instead of allocated.
            permuteBackward(gradPermuted: Tensor, sortedIndices: Tensor, numTokens: Size, gradPermutedProbs: Option<Tensor>, routingMap: Option<Tensor>, dropAndPad: Flag, outGradTokens: Option<Out>) -> PermuteGrads {
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                with_outs(&[(outGradTokens.as_ref(), "out.gradTokens")], |o| {
                    permute::permute_backward_into(&gradPermuted, &sortedIndices, numTokens, gradPermutedProbs.as_ref(), routingMap.as_ref(), options, o[0].as_mut())
                }).map(|(g, p)| PermuteGrads { gradTokens: g, gradProbs: p })
            }
            /// Every check of unpermuteBackward on dtypes and shapes, and on sortedIndices' and the
            /// routing map's values when their data is given, but a plain routing map's routes (with
            /// [numTokens, numExperts] probs and without dropAndPad: the op's own). The number of slots.
            checkUnpermuteBackward(gradOutput: TensorMeta, permutedTokens: TensorMeta, sortedIndices: TensorMeta, probs: Option<TensorMeta>, routingMap: Option<TensorMeta>, dropAndPad: Flag) -> Size {
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                permute::check_unpermute_backward(gradOutput.meta(), permutedTokens.meta(), sortedIndices.meta(), probs.as_ref().map(|p| p.meta()), routingMap.as_ref().map(|m| m.meta()), options).map(|c| c.num_slots)
            }
            unpermuteBackward(gradOutput: Tensor, permutedTokens: Tensor, sortedIndices: Tensor, probs: Option<Tensor>, routingMap: Option<Tensor>, dropAndPad: Flag) -> UnpermuteGrads {
                let options = UnpermuteOptions { drop_and_pad: dropAndPad };
                permute::unpermute_backward(&gradOutput, &permutedTokens, &sortedIndices, probs.as_ref(), routingMap.as_ref(), options)
                    .map(|o| UnpermuteGrads { gradPermuted: o.grad_permuted, gradProbs: o.grad_probs })
            }

            // Routing and the router losses.
            route(options: RouteArgs, logits: Tensor, expertBias: Option<Tensor>, tokenMask: Option<Tensor>) -> Routed {
                routing::route(&logits, expertBias.as_ref(), tokenMask.as_ref(), options).map(Routed::from)
            }
            /// The gradient of route's weights (and, with gradScores, its scores) with respect to its logits, at route's picks `indices`.
            routeBackward(options: RouteArgs, gradWeights: Tensor, logits: Tensor, indices: Tensor, gradScores: Option<Tensor>, expertBias: Option<Tensor>, tokenMask: Option<Tensor>) -> RouteGrads {
                routing::route_backward(&gradWeights, &logits, &indices, gradScores.as_ref(), expertBias.as_ref(), tokenMask.as_ref(), options).map(|g| RouteGrads { gradLogits: g })
            }
            topk(values: Tensor, k: Size) -> TopK {
                routing::topk(&values, k).map(TopK::from)
            }
            switchLoadBalancingLoss(options: SwitchArgs, probs: Tensor, tokensPerExpert: Tensor, tokenMask: Option<Tensor>) -> ProbsLoss {
                aux_loss::switch_load_balancing_loss(&probs, &tokensPerExpert, tokenMask.as_ref(), options).map(|o| ProbsLoss { loss: o.loss, gradProbs: o.grad })
            }
            switchLoadBalancingLossFromLogits(options: SwitchArgs, logits: Tensor, tokensPerExpert: Tensor, tokenMask: Option<Tensor>) -> LogitsLoss {
                aux_loss::switch_load_balancing_loss_from_logits(&logits, &tokensPerExpert, tokenMask.as_ref(), options).map(|o| LogitsLoss { loss: o.loss, gradLogits: o.grad })
            }
            zLoss(logits: Tensor, coeff: Option<Num>, tokenMask: Option<Tensor>) -> LogitsLoss {
                aux_loss::z_loss(&logits, tokenMask.as_ref(), coeff.unwrap_or(DEFAULT_COEFF)).map(|o| LogitsLoss { loss: o.loss, gradLogits: o.grad })
            }

            // Activations, matmul, grouped experts.
            activation(options: ActArgs, x: Tensor, probs: Option<Tensor>) -> Tensor {
                moe_core::activations::activation(&x, probs.as_ref(), &options)
            }
            activationBackward(options: ActArgs, grad: Tensor, x: Tensor, probs: Option<Tensor>) -> InputGrads {
                moe_core::activations::activation_backward(&grad, &x, probs.as_ref(), &options).map(|o| InputGrads { gradInput: o.grad_input, gradProbs: o.grad_probs })
            }
            matmul(a: Tensor, b: Tensor, transA: Flag, transB: Flag) -> Tensor {
                experts::matmul(&a, &b, transA, transB)
            }
            /// matmul's checks on dtypes and shapes: M, the rows of the result.
            checkMatmul(a: TensorMeta, b: TensorMeta, transA: Flag, transB: Flag) -> Size {
                experts::check_matmul(a.meta(), b.meta(), transA, transB).map(|(m, _, _)| m)
            }
            /// Every check of expertsForward (with gradOutput: of expertsBackward) on dtypes and shapes,
            /// and on tokensPerExpert's values when its data is given: numSlots.
            checkExperts(options: ActArgs, inputs: ExpertsArgs<TensorMeta>, gradOutput: Option<TensorMeta>) -> Size {
                let metas = inputs.map(|t| t.meta());
                match &gradOutput {
                    Some(g) => experts::check_experts_backward(g.meta(), &metas, &options),
                    None => experts::check_experts(&metas, &options),
                }
                .map(|c| c.n)
            }
            /// out: a caller-owned output `[numSlots, dim]` of the tokens' dtype, written instead of allocated (then the result is null).
            expertsForward(options: ActArgs, inputs: ExpertsArgs, out: Option<Out>) -> Nullable<Tensor> {
                alloc_or_into(out.as_ref(), || experts::experts_forward(&inputs, &options), |out| experts::experts_forward_into(&inputs, &options, out))
            }
            expertsBackward(options: ActArgs, gradOutput: Tensor, inputs: ExpertsArgs) -> ExpertsGrads {
                experts::experts_backward(&gradOutput, &inputs, &options).map(|o| ExpertsGrads {
                    gradTokens: o.grad_tokens,
                    gradGateAndUpProjs: o.grad_gate_and_up,
                    gradDownProjs: o.grad_down,
                    gradGateUpProjBias: o.grad_gate_up_bias,
                    gradDownProjBias: o.grad_down_bias,
                    gradProbs: o.grad_probs,
                })
            }

            // Capacity, padding, chunk sort, grouped-GEMM preparation, expert sharding.
            getCapacity(numTokens: Size, numExperts: Size, capacityFactor: Num, minCapacity: Option<Size>) -> Size {
                capacity::get_capacity(numTokens, numExperts, capacityFactor, minCapacity)
            }
            dropTokens(options: DropArgs, probs: Tensor, routingMap: Tensor) -> Dropped {
                capacity::drop_tokens(&probs, &routingMap, options).map(|o| Dropped { routingMap: o.routing_map, probs: o.probs, capacity: o.capacity })
            }
            padRoutingMap(padMultiple: Size, routingMap: Tensor) -> Tensor { capacity::pad_routing_map(&routingMap, padMultiple) }
            tokensPerExpert(routingMap: Tensor) -> Tensor { capacity::tokens_per_expert(&routingMap) }
            sortChunksByIndex(input: Tensor, splitSizes: Tensor, sortedIdxs: Tensor, probs: Option<Tensor>) -> SortedChunks {
                chunks::sort_chunks_by_index(&input, &splitSizes, &sortedIdxs, probs.as_ref()).map(|o| SortedChunks { output: o.output, probs: o.probs })
            }
            sortChunksByIndexBackward(gradOutput: Tensor, splitSizes: Tensor, sortedIdxs: Tensor, gradProbs: Option<Tensor>) -> InputGrads {
                chunks::sort_chunks_by_index_backward(&gradOutput, &splitSizes, &sortedIdxs, gradProbs.as_ref()).map(|o| InputGrads { gradInput: o.output, gradProbs: o.probs })
            }
            groupedMmSort(indices: Tensor, weights: Tensor, tokenMask: Option<Tensor>, numLocalExperts: Size, expertsStartIdx: Option<Size>) -> GroupedSort {
                grouped::grouped_mm_sort(&indices, &weights, tokenMask.as_ref(), numLocalExperts, expertsStartIdx.unwrap_or(0)).map(|o| GroupedSort {
                    sortedTokenIds: o.sorted_token_ids,
                    sortedSlotIds: o.sorted_slot_ids,
                    sortedWeights: o.sorted_weights,
                    tokensPerExpert: o.tokens_per_expert,
                    offsets: o.offsets,
                })
            }
            expertRangeForRank(ep: EpArgs) -> ExpertRange { sharding::expert_range_for_rank(ep.0, ep.1, ep.2).map(range) }
            shouldLoadExpert(expertId: Size, ep: EpArgs) -> Bool { sharding::should_load_expert(expertId, ep.0, ep.1, ep.2) }
            splitExpertWeights(ep: EpArgs, stacked: Tensor) -> List<ExpertTensor> {
                let parts = sharding::split_expert_weights(&stacked, ep.0, ep.1, ep.2)?;
                Ok::<_, Error>(parts.into_iter().map(|(id, t)| ExpertTensor { expertId: id, tensor: t }).collect())
            }
            /// The experts a tensor of `shape` held by rank `epRank` covers; errors name it by `name` (default 'tensor').
            validateExpertSharding(shape: Nums, ep: EpArgs, name: Option<Str>, placement: Option<Str>) -> ExpertRange {
                let name = name.unwrap_or("tensor");
                let shape = shape_arg(&format!("{name}.shape"), shape)?;
                let placement = placement.map(|p| Placement::parse("placement", p)).transpose()?;
                sharding::validate_expert_sharding(&shape, ep.0, ep.1, ep.2, name, placement).map(range)
            }
            expertPlacements(axisNames: Strs, axisSizes: Nums) -> Placed { sharding::expert_placements(&mesh_arg(axisNames, axisSizes)?).map(placed) }
            splitPlacements(axisNames: Strs, axisSizes: Nums, placements: Strs) -> Nullable<Placed> {
                let mesh = mesh_arg(axisNames, axisSizes)?;
                sharding::split_placements(&mesh, &placements_arg(placements)?).map(|p| p.map(placed))
            }

            // Checkpoints: safetensors (one file, or an index and its shards) and the expert key schemes.
            safetensorsSave(tensors: Record<Tensor>, metadata: Option<Record<Str>>) -> Bytes {
                let metadata: Vec<(String, String)> = metadata.unwrap_or_default().into_iter().map(|(k, v)| (k, v.to_string())).collect();
                checkpoint::save(&tensors, &metadata)
            }
            /// All tensors of a checkpoint, or the named ones; a path only in the native binding.
            safetensorsLoad(names: Option<Strs>, source: Source) -> NamedTensors {
                let mut ck = source;
                let tensors = ck.load(names)?;
                Ok::<_, Error>(NamedTensors { tensors, metadata: ck.metadata(), bytesRead: ck.bytes_read() as usize })
            }
            checkpointInfo(source: Source) -> CheckpointInfo {
                let mut ck = source;
                let tensors = ck.info()?.into_iter().map(|t| TensorInfo { name: t.name, dtype: t.dtype, shape: t.shape, file: t.file }).collect();
                Ok::<_, Error>(CheckpointInfo { tensors, metadata: ck.metadata(), bytesRead: ck.bytes_read() as usize })
            }
            /// One expert-parallel rank's experts, stacked, from a checkpoint in any key scheme.
            loadExperts(prefix: Str, kf: KindFormat, ep: EpArgs, source: Source) -> LoadedExperts {
                let mut ck = source;
                checkpoint::load_experts(&mut ck, prefix, ep.0, ep.1, ep.2, kf.0, kf.1).map(loaded)
            }
            stackExperts(tensors: Record<Tensor>, prefix: Str, numExperts: Size, kf: KindFormat) -> LoadedExperts {
                checkpoint::stack_experts(&tensors, prefix, numExperts, kf.0, kf.1).map(loaded)
            }
            unstackExperts(prefix: Str, gateAndUpProjs: Tensor, downProjs: Tensor, gateUpProjBias: Option<Tensor>, downProjBias: Option<Tensor>, kf: KindFormat, firstExpert: Option<Size>) -> Record<Tensor> {
                let format = kf.1.unwrap_or(ExpertFormat::Hf);
                let (b1, b2) = (gateUpProjBias.as_ref(), downProjBias.as_ref());
                checkpoint::unstack_experts(prefix, &gateAndUpProjs, &downProjs, b1, b2, kf.0, firstExpert.unwrap_or(0), format)
            }
        }
    };
}

op_table!(define);
