// Generated from crates/moe-bind/src/ops.rs by `bash scripts/check-generated.sh --write`; do not edit.
// scripts/check-generated.sh (run by npm test) fails when this file is stale.
import type { Tensor } from '../tensor.js';
import type { WireMeta, WireTensor } from '../wire.js';

/** A checkpoint: exactly one of a path (native binding only), one file's bytes, or an index's json bytes with its shard files' bytes. */
export interface CheckpointSource { path?: string; bytes?: Uint8Array; index?: Uint8Array; shards?: Record<string, Uint8Array> }

export interface Multihot { routingMap: Tensor; probs: Tensor }

export interface Indices { indices: Tensor; probs: Tensor }

/** permutedTokens / permutedProbs are left out when written into the given output. */
export interface Permuted { permutedTokens?: Tensor; permutedProbs?: Tensor; sortedIndices: Tensor; tokensPerExpert: Tensor }

export interface Plan { sortedIndices: Tensor; tokensPerExpert: Tensor }

/** gradTokens is left out when written into the given output. */
export interface PermuteGrads { gradTokens?: Tensor; gradProbs?: Tensor }

export interface UnpermuteGrads { gradPermuted: Tensor; gradProbs?: Tensor }

export interface Routed { weights: Tensor; indices: Tensor; scores: Tensor; tokensPerExpert: Tensor }

export interface RouteGrads { gradLogits: Tensor }

export interface TopK { values: Tensor; indices: Tensor }

export interface ProbsLoss { loss: number; gradProbs: Tensor }

export interface LogitsLoss { loss: number; gradLogits: Tensor }

export interface InputGrads { gradInput: Tensor; gradProbs?: Tensor }

export interface ExpertsGrads { gradTokens: Tensor; gradGateAndUpProjs: Tensor; gradDownProjs: Tensor; gradGateUpProjBias?: Tensor; gradDownProjBias?: Tensor; gradProbs?: Tensor }

export interface Dropped { routingMap: Tensor; probs: Tensor; capacity: number }

export interface SortedChunks { output: Tensor; probs?: Tensor }

export interface GroupedSort { sortedTokenIds: Tensor; sortedSlotIds: Tensor; sortedWeights: Tensor; tokensPerExpert: Tensor; offsets: Tensor }

export interface ExpertRange { start: number; end: number }

export interface ExpertTensor { expertId: number; tensor: Tensor }

export interface Placed { axisNames: string[]; axisSizes: number[]; placements: string[] }

/** int64 tensors as their little-endian bytes (the facade makes a BigInt64Array). */
export interface NamedTensors { tensors: Record<string, Tensor>; metadata: Record<string, string>; bytesRead: number }

export interface TensorInfo { name: string; dtype: string; shape: number[]; file: string }

export interface CheckpointInfo { tensors: TensorInfo[]; metadata: Record<string, string>; bytesRead: number }

export interface LoadedExperts { gateAndUpProjs: Tensor; downProjs: Tensor; gateUpProjBias?: Tensor; downProjBias?: Tensor; start: number; end: number; format: string; bytesRead: number }

export interface IndicesToMultihotArgs { indices: WireTensor; probs: WireTensor; numExperts: number }

export interface CheckIndicesToMultihotArgs { indices: WireMeta; probs: WireMeta; numExperts: number }

export interface MultihotToIndicesArgs { routingMap: WireTensor; probs?: WireTensor; topk?: number }

export interface PermuteArgs { tokens: WireTensor; routingMap: WireTensor; probs?: WireTensor; numOutTokens?: number; dropAndPad?: boolean; outPermutedTokens?: WireTensor; outPermutedProbs?: WireTensor }

export interface PermutePlanArgs { routingMap: WireTensor; numOutTokens?: number; dropAndPad?: boolean }

export interface CheckPermuteArgs { tokens: WireMeta; routingMap: WireMeta; probs?: WireMeta; numOutTokens?: number; dropAndPad?: boolean; numSlots?: number }

export interface CheckUnpermuteArgs { restoreShape: number[]; permutedTokens: WireMeta; sortedIndices: WireMeta; probs?: WireMeta; routingMap?: WireMeta; dropAndPad?: boolean }

export interface UnpermuteArgs { restoreShape: number[]; permutedTokens: WireTensor; sortedIndices: WireTensor; probs?: WireTensor; routingMap?: WireTensor; dropAndPad?: boolean; out?: WireTensor }

export interface CheckPermuteBackwardArgs { gradPermuted: WireMeta; sortedIndices: WireMeta; numTokens: number; gradPermutedProbs?: WireMeta; routingMap?: WireMeta; dropAndPad?: boolean }

export interface PermuteBackwardArgs { gradPermuted: WireTensor; sortedIndices: WireTensor; numTokens: number; gradPermutedProbs?: WireTensor; routingMap?: WireTensor; dropAndPad?: boolean; outGradTokens?: WireTensor }

export interface CheckUnpermuteBackwardArgs { gradOutput: WireMeta; permutedTokens: WireMeta; sortedIndices: WireMeta; probs?: WireMeta; routingMap?: WireMeta; dropAndPad?: boolean }

export interface UnpermuteBackwardArgs { gradOutput: WireTensor; permutedTokens: WireTensor; sortedIndices: WireTensor; probs?: WireTensor; routingMap?: WireTensor; dropAndPad?: boolean }

export interface RouteArgs { topk: number; scoreFunction?: string; softmaxBeforeTopk?: boolean; numGroups?: number; topkGroups?: number; normTopkProb?: boolean; routeScale?: number; logits: WireTensor; expertBias?: WireTensor; tokenMask?: WireTensor }

export interface RouteBackwardArgs { topk: number; scoreFunction?: string; softmaxBeforeTopk?: boolean; numGroups?: number; topkGroups?: number; normTopkProb?: boolean; routeScale?: number; gradWeights: WireTensor; logits: WireTensor; indices: WireTensor; gradScores?: WireTensor; expertBias?: WireTensor; tokenMask?: WireTensor }

export interface TopkArgs { values: WireTensor; k: number }

export interface SwitchLoadBalancingLossArgs { topk: number; coeff?: number; numTokens?: number; probs: WireTensor; tokensPerExpert: WireTensor; tokenMask?: WireTensor }

export interface SwitchLoadBalancingLossFromLogitsArgs { topk: number; coeff?: number; numTokens?: number; logits: WireTensor; tokensPerExpert: WireTensor; tokenMask?: WireTensor }

export interface ZLossArgs { logits: WireTensor; coeff?: number; tokenMask?: WireTensor }

export interface ActivationArgs { kind?: string; alpha?: number; limit?: number; linearOffset?: number; x: WireTensor; probs?: WireTensor }

export interface ActivationBackwardArgs { kind?: string; alpha?: number; limit?: number; linearOffset?: number; grad: WireTensor; x: WireTensor; probs?: WireTensor }

export interface MatmulArgs { a: WireTensor; b: WireTensor; transA?: boolean; transB?: boolean }

export interface CheckMatmulArgs { a: WireMeta; b: WireMeta; transA?: boolean; transB?: boolean }

export interface CheckExpertsArgs { kind?: string; alpha?: number; limit?: number; linearOffset?: number; permutedTokens: WireMeta; tokensPerExpert: WireMeta; gateAndUpProjs?: WireMeta; upProjs?: WireMeta; downProjs: WireMeta; permutedProbs?: WireMeta; gateUpProjBias?: WireMeta; downProjBias?: WireMeta; gradOutput?: WireMeta }

export interface ExpertsForwardArgs { kind?: string; alpha?: number; limit?: number; linearOffset?: number; permutedTokens: WireTensor; tokensPerExpert: WireTensor; gateAndUpProjs?: WireTensor; upProjs?: WireTensor; downProjs: WireTensor; permutedProbs?: WireTensor; gateUpProjBias?: WireTensor; downProjBias?: WireTensor; out?: WireTensor }

export interface ExpertsBackwardArgs { kind?: string; alpha?: number; limit?: number; linearOffset?: number; gradOutput: WireTensor; permutedTokens: WireTensor; tokensPerExpert: WireTensor; gateAndUpProjs?: WireTensor; upProjs?: WireTensor; downProjs: WireTensor; permutedProbs?: WireTensor; gateUpProjBias?: WireTensor; downProjBias?: WireTensor }

export interface GetCapacityArgs { numTokens: number; numExperts: number; capacityFactor: number; minCapacity?: number }

export interface DropTokensArgs { topk: number; capacityFactor: number; dropPolicy?: string; padToCapacity?: boolean; probs: WireTensor; routingMap: WireTensor }

export interface PadRoutingMapArgs { padMultiple: number; routingMap: WireTensor }

export interface TokensPerExpertArgs { routingMap: WireTensor }

export interface SortChunksByIndexArgs { input: WireTensor; splitSizes: WireTensor; sortedIdxs: WireTensor; probs?: WireTensor }

export interface SortChunksByIndexBackwardArgs { gradOutput: WireTensor; splitSizes: WireTensor; sortedIdxs: WireTensor; gradProbs?: WireTensor }

export interface GroupedMmSortArgs { indices: WireTensor; weights: WireTensor; tokenMask?: WireTensor; numLocalExperts: number; expertsStartIdx?: number }

export interface ExpertRangeForRankArgs { numExperts: number; epSize: number; epRank: number }

export interface ShouldLoadExpertArgs { expertId: number; numExperts: number; epSize: number; epRank: number }

export interface SplitExpertWeightsArgs { numExperts: number; epSize: number; epRank: number; stacked: WireTensor }

export interface ValidateExpertShardingArgs { shape: number[]; numExperts: number; epSize: number; epRank: number; name?: string; placement?: string }

export interface ExpertPlacementsArgs { axisNames: string[]; axisSizes: number[] }

export interface SplitPlacementsArgs { axisNames: string[]; axisSizes: number[]; placements: string[] }

export interface SafetensorsSaveArgs { tensors: Record<string, WireTensor>; metadata?: Record<string, string> }

export interface SafetensorsLoadArgs { names?: string[]; source: CheckpointSource }

export interface CheckpointInfoArgs { source: CheckpointSource }

export interface LoadExpertsArgs { prefix: string; kind?: string; format?: string; numExperts: number; epSize: number; epRank: number; source: CheckpointSource }

export interface StackExpertsArgs { tensors: Record<string, WireTensor>; prefix: string; numExperts: number; kind?: string; format?: string }

export interface UnstackExpertsArgs { prefix: string; gateAndUpProjs: WireTensor; downProjs: WireTensor; gateUpProjBias?: WireTensor; downProjBias?: WireTensor; kind?: string; format?: string; firstExpert?: number }

/** The functions both CPU bindings (moe-node, moe-wasm) export. */
export interface Binding {
  /** Worker threads the backend uses for large inputs (wasm: 1). */
  numThreads(): number;
  indicesToMultihot(args: IndicesToMultihotArgs): Multihot;
  /**
   * indicesToMultihot's checks on dtypes and shapes (the indices' values are the op's own
   * checks: call this only for indices known to be in range and distinct in each row).
   * The number of tokens.
   */
  checkIndicesToMultihot(args: CheckIndicesToMultihotArgs): number;
  multihotToIndices(args: MultihotToIndicesArgs): Indices;
  /** outPermutedTokens / outPermutedProbs: caller-owned outputs, written instead of allocated. */
  permute(args: PermuteArgs): Permuted;
  /** permute's plan alone (its sortedIndices and tokensPerExpert), without moving a token. */
  permutePlan(args: PermutePlanArgs): Plan;
  /**
   * Every check of permute without moving a token: tokens and probs by dtype and shape,
   * the routing map's values when its data is given; without its data, `numSlots` (the
   * map's count, which the caller knows) is checked against numOutTokens. The number of
   * output rows.
   */
  checkPermute(args: CheckPermuteArgs): number;
  /**
   * Every check of unpermute on dtypes and shapes, and on sortedIndices' and the routing
   * map's values when their data is given (then the slot weights' checks are the op's
   * own: give routingMap's data, or run the op). The number of slots.
   */
  checkUnpermute(args: CheckUnpermuteArgs): number;
  /** out: a caller-owned output, written instead of allocated (then the result is null). */
  unpermute(args: UnpermuteArgs): Tensor | null;
  /**
   * Every check of permuteBackward on dtypes and shapes, and on sortedIndices' and the
   * routing map's values when their data is given, but a plain routing map's routes (with
   * gradPermutedProbs and without dropAndPad: the op's own). The number of slots.
   */
  checkPermuteBackward(args: CheckPermuteBackwardArgs): number;
  /** outGradTokens: a caller-owned output for gradTokens, written instead of allocated. */
  permuteBackward(args: PermuteBackwardArgs): PermuteGrads;
  /**
   * Every check of unpermuteBackward on dtypes and shapes, and on sortedIndices' and the
   * routing map's values when their data is given, but a plain routing map's routes (with
   * [numTokens, numExperts] probs and without dropAndPad: the op's own). The number of slots.
   */
  checkUnpermuteBackward(args: CheckUnpermuteBackwardArgs): number;
  unpermuteBackward(args: UnpermuteBackwardArgs): UnpermuteGrads;
  route(args: RouteArgs): Routed;
  /** The gradient of route's weights (and, with gradScores, its scores) with respect to its logits, at route's picks `indices`. */
  routeBackward(args: RouteBackwardArgs): RouteGrads;
  topk(args: TopkArgs): TopK;
  switchLoadBalancingLoss(args: SwitchLoadBalancingLossArgs): ProbsLoss;
  switchLoadBalancingLossFromLogits(args: SwitchLoadBalancingLossFromLogitsArgs): LogitsLoss;
  zLoss(args: ZLossArgs): LogitsLoss;
  activation(args: ActivationArgs): Tensor;
  activationBackward(args: ActivationBackwardArgs): InputGrads;
  matmul(args: MatmulArgs): Tensor;
  /** matmul's checks on dtypes and shapes: M, the rows of the result. */
  checkMatmul(args: CheckMatmulArgs): number;
  /**
   * Every check of expertsForward (with gradOutput: of expertsBackward) on dtypes and shapes,
   * and on tokensPerExpert's values when its data is given: numSlots.
   */
  checkExperts(args: CheckExpertsArgs): number;
  /** out: a caller-owned output `[numSlots, dim]` of the tokens' dtype, written instead of allocated (then the result is null). */
  expertsForward(args: ExpertsForwardArgs): Tensor | null;
  expertsBackward(args: ExpertsBackwardArgs): ExpertsGrads;
  getCapacity(args: GetCapacityArgs): number;
  dropTokens(args: DropTokensArgs): Dropped;
  padRoutingMap(args: PadRoutingMapArgs): Tensor;
  tokensPerExpert(args: TokensPerExpertArgs): Tensor;
  sortChunksByIndex(args: SortChunksByIndexArgs): SortedChunks;
  sortChunksByIndexBackward(args: SortChunksByIndexBackwardArgs): InputGrads;
  groupedMmSort(args: GroupedMmSortArgs): GroupedSort;
  expertRangeForRank(args: ExpertRangeForRankArgs): ExpertRange;
  shouldLoadExpert(args: ShouldLoadExpertArgs): boolean;
  splitExpertWeights(args: SplitExpertWeightsArgs): ExpertTensor[];
  /** The experts a tensor of `shape` held by rank `epRank` covers; errors name it by `name` (default 'tensor'). */
  validateExpertSharding(args: ValidateExpertShardingArgs): ExpertRange;
  expertPlacements(args: ExpertPlacementsArgs): Placed;
  splitPlacements(args: SplitPlacementsArgs): Placed | null;
  safetensorsSave(args: SafetensorsSaveArgs): Uint8Array;
  /** All tensors of a checkpoint, or the named ones; a path only in the native binding. */
  safetensorsLoad(args: SafetensorsLoadArgs): NamedTensors;
  checkpointInfo(args: CheckpointInfoArgs): CheckpointInfo;
  /** One expert-parallel rank's experts, stacked, from a checkpoint in any key scheme. */
  loadExperts(args: LoadExpertsArgs): LoadedExperts;
  stackExperts(args: StackExpertsArgs): LoadedExperts;
  unstackExperts(args: UnstackExpertsArgs): Record<string, Tensor>;
}
