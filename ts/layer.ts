/**
 * MoELayer: a complete Mixture-of-Experts block of one rank, forward and backward, composed
 * from Backend ops only (so it runs on every backend), able to express the MoE blocks of the
 * Hugging Face families (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS; see hf.ts):
 *
 *   logits = x @ routerWeight (+ routerBias)        matmul (float32, or rounded to the dtype)
 *   { weights, indices, scores } = route(logits)    route (any score function, expert bias, groups)
 *   permuted = permute(x, multihot(indices))       indicesToMultihot + permute (N k slots)
 *   y_slots = expertsForward(permuted, ...)         grouped experts, weighted by the slot probs
 *   output = unpermute(y) (+ shared expert(x) * sigmoid(x @ sharedExpertGate))
 *   auxLoss (Megatron's Switch loss or transformers' convention), zLoss
 *
 * `backward(gradOutput)` runs the chain back: the experts, the dispatch, `routeBackward` for
 * the router (every score function), the aux losses' gradients, the shared expert and its gate.
 * Weights and activations are float32, bfloat16 or float16 (`dtype`); every matmul and
 * activation accumulates in float32 and rounds once, as the reference kernels do.
 *
 * On the cuda backend `upload()` moves the parameters to the GPU: the same forward and backward
 * then run on device tensors (the element steps between the ops through `LayerMath`: numeric.ts
 * on the host, the cuda backend's kernels on the GPU, the same bits), and an `AdamW` over
 * `parameters()` trains the layer there.
 */
import type { Backend } from './backend.js';
import { TokenDispatcher } from './dispatcher.js';
import { add3, castTo, columnSums, fromValues, gatherPicks, logitsEpilogue, placeRows, reshape, rows, sharedGateBackward, sharedGateForward, toF32, valuesF32 } from './numeric.js';
import type { CudaBackend, DeviceRouteOptions } from './backends/cuda.js';
import type { DeviceExpertWeights, ExpertsSaved } from './backends/cuda-experts.js';
import { isDeviceTensor, type AnyTensor, type DeviceTensor } from './device.js';
import { checked, checkGroup, combine, combineBackward, dispatch, dispatchBackward, releaseDispatch, uploadOf, type DispatchHandle, type ExpertParallelGroup } from './ep.js';
import type { ActivationKind } from './ops/activations.js';
import type { ExpertBiases, ExpertWeights } from './ops/experts.js';
import type { RouteOptions, ScoreFunction } from './ops/routing.js';
import { checkTensor, tensor, type Tensor, type TokenDType } from './tensor.js';
import { checkOptions } from './wire.js';
import { fromPretrained, genericKeys, LayerClass, loadWithKeys, savePretrained, type ExpertKeyFormat, type FromPretrainedOptions, type PretrainedSource, type SavePretrainedOptions } from './hf.js';

/**
 * The parameters of a layer, in the stacked layout of the grouped experts, all in the layer's
 * dtype except `expertBias` (float32).
 */
export interface MoEWeights<D extends TokenDType = TokenDType> {
  /** `[dim, numExperts]` in the router's dtype: logits = x @ routerWeight (transformers' router Linear transposed). */
  routerWeight: Tensor<TokenDType>;
  /** `[numExperts]` in the router's dtype, added to the logits (GPT-OSS's router bias). */
  routerBias?: Tensor<TokenDType>;
  /** `[numExperts]` float32: the score-correction bias, used for selection only and not trained (DeepSeek-V3's `e_score_correction_bias`). */
  expertBias?: Tensor<'float32'>;
  /** `[E, dim, 2 * inter]` (gated activations). */
  gateAndUpProjs?: Tensor<D>;
  /** `[E, dim, inter]` (relu2). */
  upProjs?: Tensor<D>;
  /** `[E, inter, dim]`. */
  downProjs: Tensor<D>;
  /** `[E, width]`, when the layer has expert biases. */
  gateUpProjBias?: Tensor<D>;
  /** `[E, dim]`, when the layer has expert biases. */
  downProjBias?: Tensor<D>;
  /** `[1, dim, 2 * sharedInter]`: the shared expert's gate | up halves (swiglu). */
  sharedGateAndUpProjs?: Tensor<D>;
  /** `[1, sharedInter, dim]`. */
  sharedDownProjs?: Tensor<D>;
  /** `[dim, 1]`: the shared expert's sigmoid gate (Qwen2-MoE's `shared_expert_gate`). */
  sharedExpertGate?: Tensor<D>;
}

export interface SharedExpertOptions {
  /** Intermediate size of the shared MLP (DeepSeek-V3: `n_shared_experts * moe_intermediate_size`). */
  inter: number;
  /** Scale the shared output by `sigmoid(x @ sharedExpertGate)` (Qwen2-MoE). Default false. */
  gate?: boolean;
}

export interface MoELayerOptions {
  dim: number;
  /** The routed experts' intermediate size. */
  inter: number;
  /** Experts in the whole model (the router's width). */
  numExperts: number;
  topk: number;
  activation: ActivationKind;
  /** quick_geglu / swiglu_oai: slope inside the sigmoid (default 1.702). */
  alpha?: number;
  /** quick_geglu / swiglu_oai / swiglu_clamped: the clamp bound (default 7). */
  limit?: number;
  /** quick_geglu / swiglu_oai: added to the clamped up value (default 1). */
  linearOffset?: number;
  /** Weights and activations: float32 (default), bfloat16 or float16. */
  dtype?: TokenDType;
  /**
   * The router's dtype (default: `dtype`): its weight and bias are stored in it, and the logits
   * (computed in float32 from the widened input and weight) are rounded to it, as a transformers
   * router Linear of that dtype does. DeepSeek-V3 keeps its router in float32 in a bf16 model.
   */
  routerDtype?: TokenDType;
  /** Default `'softmax'`; every score function of `route`. */
  scoreFunction?: ScoreFunction;
  /** softmax: take the top-k of the softmax over all experts (default: softmax over the k picked logits). */
  softmaxBeforeTopk?: boolean;
  normTopkProb?: boolean;
  /** Factor on the routing weights (DeepSeek-V3's `routed_scaling_factor`). Default 1. */
  routeScale?: number;
  /** Expert groups for group-limited routing (DeepSeek-V3's `n_group`). Default 1. */
  numGroups?: number;
  /** Groups each token keeps (`topk_group`). */
  topkGroups?: number;
  /** A score-correction bias `expertBias [E]` for selection (initialised to 0). Default false. */
  expertBias?: boolean;
  /** A trained router bias `routerBias [E]` added to the logits. Default false. */
  routerBias?: boolean;
  /** Expert biases `gateUpProjBias`, `downProjBias` (default false). */
  bias?: boolean;
  /** A shared expert that every token goes through (Qwen2-MoE, DeepSeek-V3). */
  sharedExpert?: SharedExpertOptions;
  /** Load-balancing loss coefficient (default 0: not computed). */
  auxLossCoeff?: number;
  /**
   * `'megatron'` (default): Megatron-Core's Switch loss `E * coeff / (k * T^2) * sum_e P_e * c_e`
   * with `P` the route's scores. `'hf'`: transformers' `load_balancing_loss_func` times
   * `router_aux_loss_coef` = `coeff * E / T^2 * sum_e c_e * P_e` with `P` the softmax of the
   * logits over all experts, i.e. the Megatron loss with coefficient `k * coeff` on softmax probs.
   */
  auxLossConvention?: 'megatron' | 'hf';
  /** Router z-loss coefficient (default 0: not computed). */
  zLossCoeff?: number;
  /**
   * Expert parallelism: this rank holds experts `expertRangeForRank(numExperts, epSize, epRank)`
   * (the weights' first dimension is that range). Its forward returns its experts' part of the
   * output (and the shared expert's on rank 0): the sum over ranks is the whole layer's output,
   * and the same holds for every gradient. Default 1 / 0.
   */
  epSize?: number;
  epRank?: number;
  /** Initial parameters; random (normal, std `initStd`, seeded by `seed`; biases 0) when absent. */
  weights?: MoEWeights;
  initStd?: number;
  seed?: number;
}

export interface MoEForward<D extends TokenDType = TokenDType> {
  /** Shaped like the input (`[T, dim]` or `[B, T, dim]`), in the layer's dtype. */
  output: Tensor<D>;
  /** `[N, topk]` int32 (N = all tokens, batch flattened): the experts each token picked, best first. */
  indices: Tensor<'int32'>;
  /** `[N, topk]` float32: their routing weights. */
  weights: Tensor<'float32'>;
  /** `[N, numExperts]` float32: the router logits (router bias included). */
  logits: Tensor<'float32'>;
  /** `[N, numExperts]` float32: the route's scores. */
  scores: Tensor<'float32'>;
  /** The load-balancing loss times its coefficient (0 without one). */
  auxLoss: number;
  /** The z-loss times its coefficient (0 without one). */
  zLoss: number;
  /** `[numExperts]`: tokens each expert received (all experts, on every rank). */
  tokensPerExpert: Int32Array;
}

export interface MoEGrads {
  /** Shaped like the input: through the experts, the router and the shared expert. */
  gradInput: Tensor;
  /** Shaped and typed like the weights the layer trains (`expertBias` is not trained). */
  grads: MoEWeights;
}

/** How a layer was made by `fromPretrained`: enough to write it back in its family's keys. */
export interface PretrainedInfo {
  /** The config's `model_type`. */
  modelType: string;
  /** The decoder layer index. */
  layer: number;
  /** Bytes read from the checkpoint to build the layer (headers included). */
  bytesRead?: number;
}

interface Saved {
  shape: readonly number[];
  x: Tensor<TokenDType>;
  logits: Tensor<'float32'>;
  indices: Tensor<'int32'>;
  /** How the tokens went to the experts: in this process (`forward`), or across a group (`forwardParallel`). */
  dispatch: LocalDispatch | GroupDispatch;
  /** The shared expert's output, and its gate logits (rounded to the dtype) when it is gated. */
  shared?: { out: AnyTensor; gateLogits?: AnyTensor };
  /** The aux loss's gradient: of the scores (Megatron) or of the logits (transformers). */
  auxGrad?: { gradScores?: AnyTensor; gradLogits?: AnyTensor };
  zGrad?: AnyTensor;
}

/** `forward`'s dispatch: the plan, the permuted tokens, the experts' output (every slot). */
interface LocalDispatch {
  kind: 'local';
  routingMap: Tensor<'bool'>;
  sortedIndices: Tensor<'int32'>;
  permutedTokens: Tensor<TokenDType>;
  tokensPerExpert: Tensor<'int32'>;
  permutedProbs: Tensor<'float32'>;
  /** On the GPU: what expertsForward kept for its backward. */
  expertsSaved?: ExpertsSaved;
  /**
   * On the GPU, where the experts gather their rows on load (`CudaBackend.expertsGatherOnLoad`):
   * permute made the plan only (`permutedTokens` has no columns) and the experts read the input's
   * rows through `sortedIndices`, forward and backward.
   */
  gathered?: boolean;
  /** Rows of this rank's experts in the permuted order. */
  localRows: [number, number];
}

/** `forwardParallel`'s dispatch: the group, dispatch's handle, what this rank's experts received. */
interface GroupDispatch {
  kind: 'group';
  group: ExpertParallelGroup;
  handle: DispatchHandle;
  permutedTokens: Tensor<TokenDType>;
  tokensPerExpert: Tensor<'int32'>;
  permutedProbs: Tensor<'float32'>;
  /** On the GPU: what expertsForward kept for its backward. */
  expertsSaved?: ExpertsSaved;
}

/** A forward's router part. */
interface Routing {
  m: LayerMath;
  temps: AnyTensor[];
  logits: Tensor<'float32'>;
  routed: ReturnType<Backend['route']>;
  /** On the GPU: route's check of the values, read at the forward's end (`lazyCheck`). */
  check?: () => void;
}

/** The aux and z losses of a forward: the values (lazy on the GPU) and the gradients backward adds. */
interface Losses {
  /** (`dispose`: a lazy loss's words freed unread: `freeLosses`) */
  aux: { readonly loss: number; dispose?: () => void };
  z: { readonly loss: number; dispose?: () => void };
  auxGrad: Saved['auxGrad'];
  zGrad: AnyTensor | undefined;
}

/** A forward's losses freed (their gradients on the GPU, the lazy values' words unread): a forward that fails after computing them. */
function freeLosses(l: Losses): void {
  for (const t of [l.auxGrad?.gradScores, l.auxGrad?.gradLogits, l.zGrad]) if (t && isDeviceTensor(t)) t.dispose();
  l.aux.dispose?.();
  l.z.dispose?.();
}

/** A forward's dispatch part: the routed experts' output `[N, dim]` and what backward needs (the counts per expert are route's). */
interface Dispatched {
  output: AnyTensor;
  saved: LocalDispatch | GroupDispatch;
  /** Whether this rank adds the shared expert (with epSize and forward: rank 0 only). */
  withShared: boolean;
}

/** A backward's start. */
interface Backward {
  s: Saved;
  g2: Tensor<TokenDType>;
  m: LayerMath;
  temps: AnyTensor[];
}

/** The dispatch's backward: the tokens' gradient through the experts, the routing weights' `[N, k]`, the experts' gradients. */
interface DispatchedGrads {
  gradTokens: AnyTensor;
  gradWeights: AnyTensor;
  experts: ReturnType<Backend['expertsBackward']>;
}

/** MoELayer's forward on device tensors (after `upload()`). */
export interface DeviceMoEForward<D extends TokenDType = TokenDType> {
  /** `[N, dim]` in the layer's dtype. */
  output: DeviceTensor<D>;
  indices: DeviceTensor<'int32'>;
  weights: DeviceTensor<'float32'>;
  logits: DeviceTensor<'float32'>;
  scores: DeviceTensor<'float32'>;
  /**
   * The loss values, computed on the GPU and read from it when first read (a synchronisation
   * then, none if nothing reads them): a step that never reads them never waits for them.
   */
  readonly auxLoss: number;
  readonly zLoss: number;
  /** `[numExperts]` int32 on the GPU. */
  tokensPerExpert: DeviceTensor<'int32'>;
}

/** MoELayer's backward on device tensors. */
export interface DeviceMoEGrads {
  gradInput: DeviceTensor;
  grads: Record<string, DeviceTensor>;
}

/**
 * The element steps the layer composes around the ops, on its tensors' side: ts/numeric.ts on
 * the host, the cuda backend's kernels on the GPU (the same bits). Steps that make a tensor
 * the layer only needs for a while push it on `temps`; `free` disposes those on the GPU.
 */
interface LayerMath {
  toF32(t: AnyTensor, temps: AnyTensor[]): AnyTensor;
  /** `t` converted to `dtype`; `t` itself (a temporary of the caller's) goes on `temps` when a copy is made. */
  cast(t: AnyTensor, dtype: TokenDType, temps: AnyTensor[]): AnyTensor;
  logitsEpilogue(raw: AnyTensor, bias: AnyTensor | undefined, roundTo: TokenDType): AnyTensor;
  add3(a: AnyTensor, b: AnyTensor, c: AnyTensor | undefined, dtype: TokenDType, temps: AnyTensor[]): AnyTensor;
  columnSums(g: AnyTensor, dtype: TokenDType): AnyTensor;
  gatherPicks(dense: AnyTensor, indices: AnyTensor, temps: AnyTensor[]): AnyTensor;
  sharedGateForward(raw: AnyTensor, out: AnyTensor): { gateLogits: AnyTensor; contribution: AnyTensor };
  sharedGateBackward(g: AnyTensor, out: AnyTensor, gateLogits: AnyTensor): { gradOut: AnyTensor; gradGateLogits: AnyTensor };
  free(temps: AnyTensor[]): void;
}

const HOST_MATH: LayerMath = {
  toF32: (t) => toF32(t as Tensor<TokenDType>),
  cast: (t, dtype) => castTo(t as Tensor<TokenDType>, dtype),
  logitsEpilogue: (raw, bias, roundTo) => logitsEpilogue(raw as Tensor<'float32'>, bias as Tensor<TokenDType> | undefined, roundTo),
  add3: (a, b, c, dtype) => add3(a as Tensor<TokenDType>, b as Tensor<TokenDType>, c as Tensor<TokenDType> | undefined, dtype),
  columnSums: (g, dtype) => fromValues(dtype, [g.shape[1]], columnSums(g as Tensor<'float32'>)),
  gatherPicks: (dense, indices) => gatherPicks(dense as Tensor<'float32'>, indices as Tensor<'int32'>),
  sharedGateForward: (raw, out) => sharedGateForward(raw as Tensor<'float32'>, out as Tensor<TokenDType>),
  sharedGateBackward: (g, out, gl) => sharedGateBackward(g as Tensor<TokenDType>, out as Tensor<TokenDType>, gl as Tensor<'float32'>),
  free: () => {},
};

function deviceMath(cuda: CudaBackend): LayerMath {
  const d = (t: AnyTensor) => t as DeviceTensor<TokenDType>;
  const kept = <T extends AnyTensor>(t: T, temps: AnyTensor[]) => {
    temps.push(t);
    return t;
  };
  return {
    toF32: (t, temps) => (t.dtype === 'float32' ? t : kept(cuda.cast(d(t), 'float32'), temps)),
    cast: (t, dtype, temps) => {
      if (t.dtype === dtype) return t;
      temps.push(t);
      return cuda.cast(d(t), dtype);
    },
    logitsEpilogue: (raw, bias, roundTo) => cuda.logitsEpilogue(raw as DeviceTensor<'float32'>, bias && d(bias), roundTo),
    add3: (a, b, c, dtype) => cuda.add3(d(a), d(b), c && d(c), dtype),
    columnSums: (g, dtype) => cuda.columnSums(g as DeviceTensor<'float32'>, dtype),
    gatherPicks: (dense, indices, temps) => kept(cuda.gatherPicks(dense as DeviceTensor<'float32'>, indices as DeviceTensor<'int32'>), temps),
    sharedGateForward: (raw, out) => cuda.sharedGateForward(raw as DeviceTensor<'float32'>, d(out)),
    sharedGateBackward: (g, out, gl) => cuda.sharedGateBackward(d(g), d(out), gl as DeviceTensor<'float32'>),
    free: (temps) => {
      for (const t of new Set(temps)) if (t && isDeviceTensor(t)) t.dispose();
      temps.length = 0;
    },
  };
}

/** A seeded normal generator (mulberry32 + Box-Muller), so layers are reproducible. */
export function normalRng(seed: number): () => number {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(uniform() + 1e-300)) * Math.cos(2 * Math.PI * uniform());
}

function positiveInt(value: unknown, arg: string, min = 1): number {
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  if (!Number.isSafeInteger(value) || value < min) throw new RangeError(`${arg}: expected an integer >= ${min}, got ${value}`);
  return value;
}

function finiteNumber(value: unknown, arg: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  if (!Number.isFinite(value)) throw new RangeError(`${arg}: expected a finite number, got ${value}`);
  return value;
}

function oneOf<T extends string>(value: unknown, arg: string, allowed: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (typeof value !== 'string' || !allowed.includes(value as T)) throw new TypeError(`${arg}: expected ${allowed.map((a) => `'${a}'`).join(', ')}, got ${JSON.stringify(value)}`);
  return value as T;
}

function boolOption(value: unknown, arg: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== 'boolean') throw new TypeError(`${arg}: expected a boolean, got ${typeof value}`);
  return value;
}

const SCORE_FUNCTIONS: readonly ScoreFunction[] = ['softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'];
const ACTIVATIONS: readonly ActivationKind[] = ['swiglu', 'quick_geglu', 'swiglu_oai', 'swiglu_clamped', 'relu2'];
const DTYPES: readonly TokenDType[] = ['float32', 'bfloat16', 'float16'];
const OPTION_KEYS: readonly (keyof MoELayerOptions)[] = [
  'dim',
  'inter',
  'numExperts',
  'topk',
  'activation',
  'alpha',
  'limit',
  'linearOffset',
  'dtype',
  'routerDtype',
  'scoreFunction',
  'softmaxBeforeTopk',
  'normTopkProb',
  'routeScale',
  'numGroups',
  'topkGroups',
  'expertBias',
  'routerBias',
  'bias',
  'sharedExpert',
  'auxLossCoeff',
  'auxLossConvention',
  'zLossCoeff',
  'epSize',
  'epRank',
  'weights',
  'initStd',
  'seed',
];

/** The weights a layer stacks by expert (each rank of an expert-parallel group holds its own share; the others every rank copies). */
export const EXPERT_STACKED: readonly (keyof MoEWeights)[] = ['gateAndUpProjs', 'upProjs', 'downProjs', 'gateUpProjBias', 'downProjBias'];

/**
 * The data-parallel half of an expert-parallel training step: every rank of `group` calls it
 * (concurrently) with its `backwardParallel` gradients, and gets the gradients of the weights
 * each rank holds a copy of (the router, its bias, the shared expert; every weight but the
 * experts') summed over the ranks, so that the copies stay equal after the optimizer's step;
 * the experts' gradients are returned as they are (each rank's own experts). The sums run in
 * rank order in float32 (16-bit values widened, the sum rounded once to the dtype): the same
 * bits on every rank, and from run to run. Host tensors; or device tensors (a layer on the GPU)
 * with `backend`, the cuda backend: those gradients are read back, summed on the host and
 * uploaded (the returned ones are new device tensors; the given ones are left to the caller).
 */
export async function reduceReplicatedGrads(group: ExpertParallelGroup, grads: Partial<MoEWeights>, backend?: Backend): Promise<Partial<MoEWeights>> {
  checked('reduceReplicatedGrads', () => checkGroup(group));
  const out: Partial<MoEWeights> = { ...grads };
  const keys = (Object.keys(grads) as (keyof MoEWeights)[]).filter((k) => grads[k] !== undefined && !EXPERT_STACKED.includes(k)).sort();
  const onGpu = keys.some((k) => isDeviceTensor(grads[k]));
  const upload = onGpu ? checked('reduceReplicatedGrads', () => uploadOf(backend)) : undefined;
  // every argument checked before the first exchange
  for (const key of keys) {
    const g = grads[key] as unknown;
    const which = (dev: boolean) => (dev ? 'device' : 'host');
    if (onGpu !== isDeviceTensor(g)) throw new TypeError(`reduceReplicatedGrads: grads.${key}: expected a ${which(onGpu)} tensor (as the other gradients), got a ${which(!onGpu)} tensor`);
    if (isDeviceTensor(g) && g.disposed) throw new TypeError(`reduceReplicatedGrads: grads.${key}: expected a device tensor that is not disposed, got one whose dispose() was called`);
    if (!onGpu) checked('reduceReplicatedGrads', () => checkTensor(g, `grads.${key}`));
  }
  for (const key of keys) {
    const g = grads[key] as unknown;
    const t = (isDeviceTensor(g) ? g.download() : g) as Tensor<TokenDType>;
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    const recv = await group.allToAllV(
      Array.from({ length: group.size }, () => bytes),
      Array.from({ length: group.size }, () => bytes.byteLength),
      `reduceReplicatedGrads ${key}`,
    );
    const sum = new Float32Array(t.data.length);
    for (const part of recv) {
      const values = valuesF32({ ...t, data: new (t.data.constructor as Float32ArrayConstructor)(part.slice().buffer) } as Tensor<TokenDType>);
      for (let i = 0; i < sum.length; i++) sum[i] += values[i];
    }
    const reduced = fromValues(t.dtype, t.shape, sum);
    out[key] = (upload ? upload(reduced) : reduced) as never;
  }
  return out;
}

export class MoELayer {
  readonly dim: number;
  readonly inter: number;
  readonly numExperts: number;
  readonly topk: number;
  readonly activation: ActivationKind;
  readonly alpha?: number;
  readonly limit?: number;
  readonly linearOffset?: number;
  readonly dtype: TokenDType;
  readonly routerDtype: TokenDType;
  readonly scoreFunction: ScoreFunction;
  readonly softmaxBeforeTopk: boolean;
  readonly normTopkProb: boolean;
  readonly routeScale: number;
  readonly numGroups: number;
  readonly topkGroups?: number;
  readonly sharedExpert?: Readonly<SharedExpertOptions>;
  readonly auxLossCoeff: number;
  readonly auxLossConvention: 'megatron' | 'hf';
  readonly zLossCoeff: number;
  readonly epSize: number;
  readonly epRank: number;
  /** The global experts `[start, end)` this rank holds. */
  readonly expertRange: { start: number; end: number };
  /** The parameters; an optimizer updates their data in place. */
  readonly weights: MoEWeights;
  /** A TokenDispatcher of the layer's shape (the layer itself calls the ops directly). */
  readonly dispatcher: TokenDispatcher;
  /** Set by `fromPretrained`: the family and layer the weights came from (`savePretrained` writes them back there). */
  pretrained?: PretrainedInfo;
  #saved?: Saved;
  #disposed = false;
  /** The gathering forward's permute input: `[N, 0]` rows of the layer's dtype on the GPU (made once per N). */
  #noColumns?: DeviceTensor<TokenDType>;

  constructor(
    readonly backend: Backend,
    options: MoELayerOptions,
  ) {
    const o = checkOptions<MoELayerOptions>(options, 'MoELayer', OPTION_KEYS);
    this.dim = positiveInt(o.dim, 'dim');
    this.inter = positiveInt(o.inter, 'inter');
    this.numExperts = positiveInt(o.numExperts, 'numExperts');
    this.topk = positiveInt(o.topk, 'topk');
    if (this.topk > this.numExperts) throw new RangeError(`topk: ${this.topk} exceeds numExperts = ${this.numExperts}`);
    if (o.activation === undefined) throw new TypeError(`activation: expected one of ${ACTIVATIONS.join(', ')} (required), got undefined`);
    this.activation = oneOf(o.activation, 'activation', ACTIVATIONS, 'swiglu');
    if (o.alpha !== undefined) this.alpha = finiteNumber(o.alpha, 'alpha', 0);
    if (o.limit !== undefined) this.limit = finiteNumber(o.limit, 'limit', 0);
    if (o.linearOffset !== undefined) this.linearOffset = finiteNumber(o.linearOffset, 'linearOffset', 0);
    this.dtype = oneOf(o.dtype, 'dtype', DTYPES, 'float32');
    this.routerDtype = oneOf(o.routerDtype, 'routerDtype', DTYPES, this.dtype);
    this.scoreFunction = oneOf(o.scoreFunction, 'scoreFunction', SCORE_FUNCTIONS, 'softmax');
    this.softmaxBeforeTopk = boolOption(o.softmaxBeforeTopk, 'softmaxBeforeTopk');
    this.normTopkProb = boolOption(o.normTopkProb, 'normTopkProb');
    this.routeScale = finiteNumber(o.routeScale, 'routeScale', 1);
    this.numGroups = o.numGroups === undefined ? 1 : positiveInt(o.numGroups, 'numGroups');
    if (o.topkGroups !== undefined) this.topkGroups = positiveInt(o.topkGroups, 'topkGroups');
    if (o.sharedExpert !== undefined) {
      const s = checkOptions<SharedExpertOptions>(o.sharedExpert, 'sharedExpert', ['inter', 'gate']);
      this.sharedExpert = Object.freeze({ inter: positiveInt(s.inter, 'sharedExpert.inter'), gate: boolOption(s.gate, 'sharedExpert.gate') });
    }
    this.auxLossCoeff = finiteNumber(o.auxLossCoeff, 'auxLossCoeff', 0);
    if (this.auxLossCoeff < 0) throw new RangeError(`auxLossCoeff: expected a number >= 0, got ${this.auxLossCoeff}`);
    this.auxLossConvention = oneOf(o.auxLossConvention, 'auxLossConvention', ['megatron', 'hf'] as const, 'megatron');
    this.zLossCoeff = finiteNumber(o.zLossCoeff, 'zLossCoeff', 0);
    if (this.zLossCoeff < 0) throw new RangeError(`zLossCoeff: expected a number >= 0, got ${this.zLossCoeff}`);
    this.epSize = o.epSize === undefined ? 1 : positiveInt(o.epSize, 'epSize');
    this.epRank = o.epRank === undefined ? 0 : positiveInt(o.epRank, 'epRank', 0);
    this.expertRange = this.epSize === 1 ? { start: 0, end: this.numExperts } : backend.expertRangeForRank(this.numExperts, this.epSize, this.epRank);
    this.dispatcher = new TokenDispatcher(backend, { numExperts: this.numExperts, topk: this.topk });

    const shapes = this.#shapes(o);
    if (o.weights) {
      const w = checkOptions<MoEWeights>(o.weights, 'weights', Object.keys(shapes) as (keyof MoEWeights)[]) as Record<string, unknown>;
      const out: Record<string, Tensor> = {};
      for (const [k, shape] of Object.entries(shapes)) {
        const want = this.#dtypeOf(k);
        if (w[k] === undefined) throw new TypeError(`weights.${k}: expected a ${want} Tensor [${shape.join(', ')}] (the layer's options call for it), got undefined`);
        const t = checkTensor(w[k], `weights.${k}`);
        if (t.dtype !== want)
          throw new TypeError(`weights.${k}.dtype: expected ${want}${k === 'expertBias' ? '' : k.startsWith('router') ? " (the router's dtype)" : " (the layer's dtype)"}, got ${t.dtype}`);
        if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
          throw new RangeError(`weights.${k}.shape: expected [${shape.join(', ')}], got [${t.shape.join(', ')}]`);
        }
        out[k] = t;
      }
      this.weights = out as unknown as MoEWeights;
    } else {
      const normal = normalRng(o.seed ?? 1);
      const std = finiteNumber(o.initStd, 'initStd', 0.02);
      const w: Record<string, Tensor> = {};
      for (const [k, shape] of Object.entries(shapes)) {
        const n = shape.reduce((a, b) => a * b, 1);
        const zero = k.endsWith('Bias');
        w[k] = fromValues(
          this.#dtypeOf(k),
          shape,
          Float64Array.from({ length: n }, () => (zero ? 0 : normal() * std)),
        );
      }
      this.weights = w as unknown as MoEWeights;
    }
  }

  /** The dtype of parameter `k`. */
  #dtypeOf(k: string): TokenDType {
    return k === 'expertBias' ? 'float32' : k.startsWith('router') ? this.routerDtype : this.dtype;
  }

  /** The parameter shapes these options call for. */
  #shapes(o: Partial<MoELayerOptions>): Record<string, number[]> {
    const [D, E, I] = [this.dim, this.numExperts, this.inter];
    const L = this.expertRange.end - this.expertRange.start;
    const width = this.activation === 'relu2' ? I : 2 * I;
    const shapes: Record<string, number[]> = { routerWeight: [D, E] };
    if (boolOption(o.routerBias, 'routerBias')) shapes.routerBias = [E];
    if (boolOption(o.expertBias, 'expertBias')) shapes.expertBias = [E];
    shapes[this.activation === 'relu2' ? 'upProjs' : 'gateAndUpProjs'] = [L, D, width];
    shapes.downProjs = [L, I, D];
    if (boolOption(o.bias, 'bias')) {
      shapes.gateUpProjBias = [L, width];
      shapes.downProjBias = [L, D];
    }
    if (this.sharedExpert) {
      const S = this.sharedExpert.inter;
      shapes.sharedGateAndUpProjs = [1, D, 2 * S];
      shapes.sharedDownProjs = [1, S, D];
      if (this.sharedExpert.gate) shapes.sharedExpertGate = [D, 1];
    }
    return shapes;
  }

  /** The options that rebuild this layer (weights aside). */
  get options(): Omit<MoELayerOptions, 'weights' | 'initStd' | 'seed'> {
    const w = this.weights;
    const o: Omit<MoELayerOptions, 'weights' | 'initStd' | 'seed'> = {
      dim: this.dim,
      inter: this.inter,
      numExperts: this.numExperts,
      topk: this.topk,
      activation: this.activation,
      dtype: this.dtype,
      routerDtype: this.routerDtype,
      scoreFunction: this.scoreFunction,
      softmaxBeforeTopk: this.softmaxBeforeTopk,
      normTopkProb: this.normTopkProb,
      routeScale: this.routeScale,
      numGroups: this.numGroups,
      expertBias: w.expertBias !== undefined,
      routerBias: w.routerBias !== undefined,
      bias: w.gateUpProjBias !== undefined,
      auxLossCoeff: this.auxLossCoeff,
      auxLossConvention: this.auxLossConvention,
      zLossCoeff: this.zLossCoeff,
      epSize: this.epSize,
      epRank: this.epRank,
    };
    if (this.alpha !== undefined) o.alpha = this.alpha;
    if (this.limit !== undefined) o.limit = this.limit;
    if (this.linearOffset !== undefined) o.linearOffset = this.linearOffset;
    if (this.topkGroups !== undefined) o.topkGroups = this.topkGroups;
    if (this.sharedExpert) o.sharedExpert = { ...this.sharedExpert };
    return o;
  }

  /** The routed experts' weights in the form `expertsForward` takes. */
  get expertWeights(): ExpertWeights {
    const w = this.weights;
    return w.upProjs ? { upProjs: w.upProjs, downProjs: w.downProjs } : { gateAndUpProjs: w.gateAndUpProjs, downProjs: w.downProjs };
  }

  /** The routed experts' biases, when the layer has them. */
  get expertBiases(): ExpertBiases | undefined {
    const w = this.weights;
    return w.gateUpProjBias ? { gateUpProjBias: w.gateUpProjBias, downProjBias: w.downProjBias } : undefined;
  }

  #activationOptions() {
    const o: { activation: ActivationKind; alpha?: number; limit?: number; linearOffset?: number } = { activation: this.activation };
    if (this.alpha !== undefined) o.alpha = this.alpha;
    if (this.limit !== undefined) o.limit = this.limit;
    if (this.linearOffset !== undefined) o.linearOffset = this.linearOffset;
    return o;
  }

  /** The options `route` and `routeBackward` take. */
  get routeOptions(): RouteOptions {
    const o: RouteOptions = { topk: this.topk, scoreFunction: this.scoreFunction, normTopkProb: this.normTopkProb, routeScale: this.routeScale };
    if (this.softmaxBeforeTopk) o.softmaxBeforeTopk = true;
    if (this.weights.expertBias) o.expertBias = this.weights.expertBias;
    if (this.numGroups > 1) {
      o.numGroups = this.numGroups;
      if (this.topkGroups !== undefined) o.topkGroups = this.topkGroups;
    }
    return o;
  }

  /** The input as `[N, dim]` rows of the layer's dtype. */
  #rows(x: unknown, arg: string): Tensor<TokenDType> {
    const t = checkTensor(x, arg);
    if (t.dtype !== this.dtype) throw new TypeError(`${arg}.dtype: expected ${this.dtype} (the layer's dtype), got ${t.dtype}`);
    const s = t.shape;
    if ((s.length !== 2 && s.length !== 3) || s[s.length - 1] !== this.dim) {
      throw new RangeError(`${arg}.shape: expected [numTokens, ${this.dim}] or [batch, seqLen, ${this.dim}], got [${s.join(', ')}]`);
    }
    return reshape(t as Tensor<TokenDType>, [s.length === 3 ? s[0] * s[1] : s[0], this.dim]);
  }

  /** Whether the parameters live on the GPU (after `upload()`). */
  get onDevice(): boolean {
    return isDeviceTensor(this.weights.downProjs);
  }

  /**
   * Moves the parameters to the GPU (the cuda backend): from then on forward and backward take
   * and return device tensors, and nothing of a step crosses to the host but the per-expert
   * token counts (the expert GEMMs are sized on the host: E int32 a step), route's and
   * routeBackward's error words, and the aux and z losses' values. An optimizer made over
   * `parameters()` afterwards updates them on the GPU. With expert parallelism (epSize > 1) the
   * layer on the GPU runs through `forwardParallel` / `backwardParallel` (a group that moves
   * device memory). Returns the layer.
   */
  upload(): this {
    this.#alive('upload');
    if (this.backend.name !== 'cuda' || typeof (this.backend as Partial<CudaBackend>).upload !== 'function') {
      throw new TypeError(`upload: the layer's backend is '${this.backend.name}': device tensors need the cuda backend`);
    }
    const cuda = this.backend as unknown as CudaBackend;
    const w = this.weights as unknown as Record<string, AnyTensor>;
    for (const [k, t] of Object.entries(w)) if (t !== undefined && !isDeviceTensor(t)) w[k] = cuda.upload(t);
    this.#free();
    return this;
  }

  /** Copies the parameters back to host tensors and frees their GPU memory. Returns the layer. */
  download(): this {
    this.#alive('download');
    const w = this.weights as unknown as Record<string, AnyTensor>;
    for (const [k, t] of Object.entries(w)) {
      if (t !== undefined && isDeviceTensor(t)) {
        w[k] = t.download();
        t.dispose();
      }
    }
    this.#free();
    this.#freeNoColumns();
    return this;
  }

  /**
   * Frees the layer's GPU memory now: its parameters and what the last forward kept (no copy back:
   * `download()` keeps the parameters). The layer cannot be used afterwards. Idempotent; on the
   * host it only drops the saved activations.
   */
  dispose(): void {
    this.#free();
    this.#disposed = true;
    this.#freeNoColumns();
    for (const t of Object.values(this.weights)) if (t !== undefined && isDeviceTensor(t)) t.dispose();
  }

  #alive(op: string): void {
    if (this.#disposed) throw new TypeError(`${op}: the layer was disposed`);
  }

  /** The trained parameters by name (every weight but `expertBias`), for an optimizer: `new AdamW(moe, layer.parameters(), ...)`. */
  parameters(): Record<string, Tensor<TokenDType> | DeviceTensor<TokenDType>> {
    this.#alive('parameters');
    const out: Record<string, Tensor<TokenDType> | DeviceTensor<TokenDType>> = {};
    for (const [k, t] of Object.entries(this.weights)) if (t !== undefined && k !== 'expertBias') out[k] = t as Tensor<TokenDType>;
    return out;
  }

  /** The element steps on this layer's tensors: ts/numeric.ts on the host, the cuda backend's kernels (same bits) on the GPU. */
  get #math(): LayerMath {
    return this.onDevice ? deviceMath(this.backend as CudaBackend) : HOST_MATH;
  }

  /** Router logits, float32: computed in float32 from the widened operands, rounded to the router's dtype. */
  #logits(x: AnyTensor, m: LayerMath, temps: AnyTensor[]): Tensor<'float32'> {
    const w = this.weights;
    let raw: AnyTensor;
    if (this.onDevice && x.dtype === w.routerWeight.dtype) {
      // one GEMM of the 16-bit operands with a float32 result (the same products and float32 sums as the widened GEMM, no copies)
      raw = (this.backend as CudaBackend).matmulToFloat32(x as DeviceTensor<TokenDType>, w.routerWeight as unknown as DeviceTensor<TokenDType>);
    } else {
      raw = this.backend.matmul(m.toF32(x, temps) as Tensor<'float32'>, m.toF32(w.routerWeight, temps) as Tensor<'float32'>);
    }
    temps.push(raw);
    return m.logitsEpilogue(raw, w.routerBias, this.routerDtype) as Tensor<'float32'>;
  }

  /** Rows of this rank's experts in the expert-major permuted order. */
  #localRows(tokensPerExpert: Tensor<'int32'>): [number, number] {
    const c = tokensPerExpert.data;
    let start = 0;
    for (let e = 0; e < this.expertRange.start; e++) start += c[e];
    let end = start;
    for (let e = this.expertRange.start; e < this.expertRange.end; e++) end += c[e];
    return [start, end];
  }

  #localCounts(tokensPerExpert: Tensor<'int32'>): Tensor<'int32'> {
    const { start, end } = this.expertRange;
    return { dtype: 'int32', shape: [end - start], data: tokensPerExpert.data.slice(start, end) };
  }

  /** The input as `[N, dim]` rows: host tensors of any batch shape, device tensors `[N, dim]`. */
  #input(x: unknown): AnyTensor {
    this.#alive('forward');
    if (!this.onDevice) {
      if (isDeviceTensor(x)) throw new TypeError("x: expected a host Tensor (the layer's parameters are on the host; call upload() to train on the GPU), got a device tensor");
      return this.#rows(x, 'x');
    }
    if (!isDeviceTensor(x)) throw new TypeError("x: expected a device tensor (the layer's parameters are on the GPU), got a host tensor: upload it with the cuda backend's upload()");
    if (x.dtype !== this.dtype) throw new TypeError(`x.dtype: expected ${this.dtype} (the layer's dtype), got ${x.dtype}`);
    if (x.shape.length !== 2 || x.shape[1] !== this.dim) throw new RangeError(`x.shape: expected [numTokens, ${this.dim}] (device tensors: flatten the batch first), got [${x.shape.join(', ')}]`);
    return x;
  }

  /**
   * The forward pass. Host tensors in, host tensors out; after `upload()`, device tensors in
   * and out (`auxLoss` and `zLoss` are read from the GPU when read, `tokensPerExpert` a device
   * tensor). The results stay valid after `backward`; the layer keeps what backward needs
   * until the next forward (on the GPU: until backward, which frees it at once).
   */
  forward(x: Tensor): MoEForward;
  forward(x: DeviceTensor): DeviceMoEForward;
  forward(x: Tensor | DeviceTensor): MoEForward | DeviceMoEForward {
    if (this.onDevice && this.epSize !== 1) {
      throw new TypeError(`forward: a layer on the GPU with epSize = ${this.epSize} runs through forwardParallel (one rank's share of every token, on the host only: download() the layer)`);
    }
    const input = this.#input(x);
    this.#free();
    const r = this.#route(input);
    let d: Dispatched;
    try {
      d = this.#dispatchLocal(input, r);
    } catch (e) {
      r.check?.(); // route's error first, where the logits were not finite
      throw e;
    }
    const losses = this.#losses(r);
    return this.#checked(losses, r, this.#finishForward(x, input, r, d, losses));
  }

  /**
   * The forward's result once route's check of the values passed (on the GPU it is read here, at
   * the end, so that nothing between route and the experts' GEMMs waits for the GPU); where it
   * fails, everything the forward made is freed and route's error thrown.
   */
  #checked<F extends MoEForward | DeviceMoEForward>(losses: Losses, r: Routing, f: F): F {
    try {
      r.check?.();
    } catch (e) {
      this.#free();
      for (const t of [f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert]) if (isDeviceTensor(t)) t.dispose();
      freeLosses(losses);
      throw e;
    }
    return f;
  }

  /**
   * The forward pass of one rank of an expert-parallel group (`group.size === epSize`,
   * `group.rank === epRank`; this layer holds rank `epRank`'s experts): this rank's own tokens
   * are routed here, sent to the ranks holding their experts and their outputs brought back
   * (ts/ep.ts `dispatch` / `combine`); the shared expert and the aux losses are this rank's
   * tokens'. Every rank of the group calls it concurrently; then `backwardParallel`. Host
   * tensors on any backend; after `upload()`, device tensors with a group that moves device
   * memory (`createExpertParallelGroup` over NCCL, or `createInProcessGroup(n, { device })`):
   * the tokens, the experts' rows and their gradients stay on the GPU. The output equals the
   * one-rank layer's on the same tokens to the merge order ts/ep.ts documents.
   */
  async forwardParallel(group: ExpertParallelGroup, x: Tensor): Promise<MoEForward>;
  async forwardParallel(group: ExpertParallelGroup, x: DeviceTensor): Promise<DeviceMoEForward>;
  async forwardParallel(group: ExpertParallelGroup, x: Tensor | DeviceTensor): Promise<MoEForward | DeviceMoEForward> {
    this.#checkGroup(group, 'forwardParallel');
    const input = this.#input(x);
    if (this.onDevice && typeof group.allToAllVDevice !== 'function') {
      throw new TypeError(
        'forwardParallel: group: expected a group that moves device memory (createExpertParallelGroup, or createInProcessGroup(n, { device })) for a layer on the GPU, got one that moves host bytes',
      );
    }
    this.#free();
    const r = this.#route(input);
    let d: Dispatched;
    try {
      d = await this.#dispatchGroup(group, input as Tensor<TokenDType>, r);
    } catch (e) {
      r.check?.(); // route's error first, where the logits were not finite
      throw e;
    }
    const losses = this.#losses(r);
    return this.#checked(losses, r, this.#finishForward(x, input, r, d, losses));
  }

  #checkGroup(group: ExpertParallelGroup, op: string): void {
    checked(op, () => {
      const g = checkGroup(group);
      if (g.size !== this.epSize || g.rank !== this.epRank) {
        throw new RangeError(`group: expected rank ${this.epRank} of ${this.epSize} (the layer's epRank of epSize), got rank ${g.rank} of ${g.size}`);
      }
    });
  }

  /** The router: logits and route's picks, and the temporaries to free at the end of the forward. */
  #route(input: AnyTensor): Routing {
    const m = this.#math;
    const temps: AnyTensor[] = [];
    const logits = this.#logits(input, m, temps);
    // on the GPU route's check of the values is read at the forward's end (`#checked`)
    let routed: ReturnType<Backend['route']>;
    let check: (() => void) | undefined;
    if (this.onDevice) {
      const r = (this.backend as CudaBackend).route(logits as unknown as DeviceTensor<'float32'>, { ...this.routeOptions, lazyCheck: true } as DeviceRouteOptions);
      check = r.check;
      routed = r as unknown as ReturnType<Backend['route']>;
    } else {
      routed = this.backend.route(logits, this.routeOptions);
    }
    return { m, temps, logits, routed, check };
  }

  /**
   * The aux and z losses of the routing (see `Losses`). The forward computes them after the
   * dispatch and the experts: they need only the routing (every token keeps its k picks, so
   * route's counts are the dispatch's), and on the GPU the step's start is where the GPU waits
   * for the host, so the host queues the first expert GEMM before the losses' calls (their
   * kernels then run after the experts', while the host is ahead).
   */
  #losses({ logits, routed }: Routing): Losses {
    // the loss values stay where they are computed until read (on the GPU: `lazyLoss`, read by a getter)
    const lazy = this.onDevice ? { lazyLoss: true } : {};
    const out: Losses = { aux: { loss: 0 }, z: { loss: 0 }, auxGrad: undefined, zGrad: undefined };
    if (this.auxLossCoeff > 0) {
      const a = this.#auxLoss(logits, routed.scores, routed.tokensPerExpert, lazy);
      out.aux = a;
      out.auxGrad = a.gradScores ? { gradScores: a.gradScores } : { gradLogits: a.gradLogits! };
    }
    if (this.zLossCoeff > 0) {
      const r = this.backend.zLoss(logits, { coeff: this.zLossCoeff, ...lazy });
      out.z = r;
      out.zGrad = r.gradLogits;
    }
    return out;
  }

  /** Whether this forward's experts gather their rows on load (on the GPU, one rank, where the backend says they do for this layer's dtype and no expert biases). */
  #gathersOnLoad(): boolean {
    if (!this.onDevice || this.epSize !== 1 || this.dtype !== 'bfloat16' || this.expertBiases !== undefined) return false;
    return (this.backend as CudaBackend).expertsGatherOnLoad();
  }

  /** `[n, 0]` rows of the layer's dtype on the GPU: permute's input when it is to make the plan only. */
  #noColumnsOf(n: number): DeviceTensor<TokenDType> {
    if (this.#noColumns?.shape[0] !== n) {
      this.#freeNoColumns();
      this.#noColumns = (this.backend as CudaBackend).upload(tensor(this.dtype, [n, 0]));
    }
    return this.#noColumns;
  }

  #freeNoColumns(): void {
    this.#noColumns?.dispose();
    this.#noColumns = undefined;
  }

  /** Dispatch, experts, combine on this process's tokens (every expert here, or with epSize this rank's share of every token's). */
  #dispatchLocal(input: AnyTensor, { temps, routed }: Routing): Dispatched {
    const moe = this.backend;
    const N = input.shape[0];
    const { routingMap, probs } = moe.indicesToMultihot(routed.indices, routed.weights, this.numExperts);
    temps.push(probs);
    // where the experts gather their rows on load, permute makes the plan only (rows of no columns)
    const gathered = this.#gathersOnLoad();
    // every token has its k picks: N k slots (given, so the GPU's plan needs no read-back)
    const perm = moe.permute((gathered ? this.#noColumnsOf(N) : input) as Tensor<TokenDType>, routingMap, { probs, numOutTokens: N * this.topk });
    const local = this.epSize === 1;
    const [r0, r1] = local ? [0, perm.permutedTokens.shape[0]] : this.#localRows(perm.tokensPerExpert);
    const options = { ...this.#activationOptions(), permutedProbs: local ? perm.permutedProbs! : rows(perm.permutedProbs!, r0, r1), biases: this.expertBiases };
    let y: AnyTensor;
    let expertsSaved: ExpertsSaved | undefined;
    if (this.onDevice) {
      const r = (moe as CudaBackend).expertsForward(gathered ? (input as AnyTensor<TokenDType>) : perm.permutedTokens, perm.tokensPerExpert, this.expertWeights as DeviceExpertWeights, {
        ...options,
        saveForBackward: true,
        ...(gathered ? { gatherIndices: perm.sortedIndices } : {}),
      }) as {
        output: DeviceTensor;
        saved?: ExpertsSaved;
      };
      y = r.output;
      expertsSaved = r.saved;
    } else {
      const yLocal = moe.expertsForward(
        local ? perm.permutedTokens : rows(perm.permutedTokens, r0, r1),
        local ? perm.tokensPerExpert : this.#localCounts(perm.tokensPerExpert),
        this.expertWeights,
        options,
      );
      y = local ? yLocal : placeRows(yLocal, r0, perm.permutedTokens.shape[0]);
    }
    const output: AnyTensor = moe.unpermute(y as Tensor<TokenDType>, perm.sortedIndices, [N, this.dim]);
    // the experts' output is not kept for the backward (see #dispatchBackwardLocal): freed with the forward's temporaries
    temps.push(y);
    const saved: LocalDispatch = {
      kind: 'local',
      routingMap,
      sortedIndices: perm.sortedIndices,
      permutedTokens: perm.permutedTokens,
      tokensPerExpert: perm.tokensPerExpert,
      permutedProbs: perm.permutedProbs!,
      expertsSaved,
      localRows: [r0, r1],
      gathered,
    };
    // with epSize, each rank's output is its experts' share: the shared expert is added once, on rank 0
    return { output, saved, withShared: this.epRank === 0 };
  }

  /** Dispatch, experts, combine across the ranks of `group` (ts/ep.ts). */
  async #dispatchGroup(group: ExpertParallelGroup, input: Tensor<TokenDType>, { routed, temps }: Routing): Promise<Dispatched> {
    const moe = this.backend;
    const d = await dispatch(group, moe, input, { indices: routed.indices, weights: routed.weights }, { numExperts: this.numExperts });
    const options = { ...this.#activationOptions(), permutedProbs: d.permutedProbs, biases: this.expertBiases };
    let y: AnyTensor;
    let expertsSaved: ExpertsSaved | undefined;
    if (this.onDevice) {
      const r = (moe as CudaBackend).expertsForward(d.permutedTokens, d.tokensPerExpert, this.expertWeights as DeviceExpertWeights, { ...options, saveForBackward: true }) as {
        output: DeviceTensor;
        saved?: ExpertsSaved;
      };
      [y, expertsSaved] = [r.output, r.saved];
    } else {
      y = moe.expertsForward(d.permutedTokens, d.tokensPerExpert, this.expertWeights, options);
    }
    // the experts weighted their outputs by the probs: combine sums them as they are (and keeps nothing of them for its backward)
    const output = await combine(group, moe, y as Tensor<TokenDType>, d.handle, { weighted: false });
    temps.push(y);
    const saved: GroupDispatch = {
      kind: 'group',
      group,
      handle: d.handle,
      permutedTokens: d.permutedTokens,
      tokensPerExpert: d.tokensPerExpert,
      permutedProbs: d.permutedProbs,
      expertsSaved,
    };
    return { output, saved, withShared: true };
  }

  /** The shared expert, what backward keeps (the losses with it), and the result. */
  #finishForward(x: Tensor | DeviceTensor, input: AnyTensor, { m, temps, logits, routed }: Routing, d: Dispatched, losses: Losses): MoEForward | DeviceMoEForward {
    let output = d.output;
    let shared: Saved['shared'];
    if (this.sharedExpert && d.withShared) {
      const sh = this.#sharedForward(input, m, temps);
      shared = { out: sh.out, gateLogits: sh.gateLogits };
      temps.push(output);
      output = m.add3(output, sh.contribution, undefined, this.dtype, temps);
    }
    const { aux, z, auxGrad, zGrad } = losses;
    this.#saved = { shape: [...x.shape], x: input as Tensor<TokenDType>, logits, indices: routed.indices, dispatch: d.saved, shared, auxGrad, zGrad };
    m.free(temps);
    if (this.onDevice) {
      const r = { output, indices: routed.indices, weights: routed.weights, logits, scores: routed.scores, tokensPerExpert: routed.tokensPerExpert };
      return Object.defineProperties(r, {
        auxLoss: { enumerable: true, get: () => aux.loss },
        zLoss: { enumerable: true, get: () => z.loss },
      }) as unknown as DeviceMoEForward;
    }
    return {
      output: reshape(output as Tensor<TokenDType>, x.shape),
      indices: routed.indices,
      weights: routed.weights,
      logits,
      scores: routed.scores,
      auxLoss: aux.loss,
      zLoss: z.loss,
      tokensPerExpert: Int32Array.from(routed.tokensPerExpert.data),
    };
  }

  /** Frees what the last forward kept for backward (device tensors at once). */
  #free(): void {
    const s = this.#saved;
    this.#saved = undefined;
    if (!s) return;
    const d = s.dispatch;
    const own = [
      ...(d.kind === 'local' ? [d.routingMap, d.sortedIndices] : []),
      d.permutedTokens,
      d.tokensPerExpert,
      d.permutedProbs,
      d.expertsSaved?.upProjection,
      d.expertsSaved?.activation,
      s.auxGrad?.gradScores,
      s.auxGrad?.gradLogits,
      s.zGrad,
      s.shared?.out,
      s.shared?.gateLogits,
    ];
    for (const t of own) if (t && isDeviceTensor(t)) t.dispose();
    if (d.kind === 'group') releaseDispatch(d.handle);
  }

  /** Both aux-loss conventions: the loss and the gradient backward adds (of the scores: Megatron; of the logits: transformers). */
  #auxLoss(
    logits: Tensor<'float32'>,
    scores: Tensor<'float32'>,
    tpe: Tensor<'int32'>,
    lazy: { lazyLoss?: boolean },
  ): { readonly loss: number; dispose?: () => void; gradScores?: Tensor<'float32'>; gradLogits?: Tensor<'float32'> } {
    const moe = this.backend;
    // `loss` is read through the op's result (a getter on the GPU with lazyLoss)
    if (this.auxLossConvention === 'hf') {
      const r = moe.switchLoadBalancingLossFromLogits(logits, tpe, { topk: this.topk, coeff: this.topk * this.auxLossCoeff, ...lazy });
      return {
        get loss() {
          return r.loss;
        },
        dispose: () => (r as { dispose?: () => void }).dispose?.(),
        gradLogits: r.gradLogits,
      };
    }
    const r = moe.switchLoadBalancingLoss(scores, tpe, { topk: this.topk, coeff: this.auxLossCoeff, ...lazy });
    return {
      get loss() {
        return r.loss;
      },
      dispose: () => (r as { dispose?: () => void }).dispose?.(),
      gradScores: r.gradProbs,
    };
  }

  /** The backward pass of the last forward: host tensors after a host forward, device tensors after a device one. */
  backward(gradOutput: Tensor): MoEGrads;
  backward(gradOutput: DeviceTensor): DeviceMoEGrads;
  backward(gradOutput: Tensor | DeviceTensor): MoEGrads | DeviceMoEGrads {
    const b = this.#beginBackward(gradOutput, 'backward');
    if (b.s.dispatch.kind !== 'local') throw new TypeError('backward: the last forward was forwardParallel: call backwardParallel with its group');
    return this.#finishBackward(b, this.#dispatchBackwardLocal(b, b.s.dispatch));
  }

  /**
   * The backward pass of `forwardParallel` (every rank of the group, concurrently): the
   * gradients of this rank's tokens, of its experts (from every rank's tokens routed to them),
   * and of its router and shared expert from its own tokens (a data-parallel trainer sums
   * those over the ranks).
   */
  async backwardParallel(group: ExpertParallelGroup, gradOutput: Tensor): Promise<MoEGrads>;
  async backwardParallel(group: ExpertParallelGroup, gradOutput: DeviceTensor): Promise<DeviceMoEGrads>;
  async backwardParallel(group: ExpertParallelGroup, gradOutput: Tensor | DeviceTensor): Promise<MoEGrads | DeviceMoEGrads> {
    this.#checkGroup(group, 'backwardParallel');
    const b = this.#beginBackward(gradOutput, 'backwardParallel');
    const d = b.s.dispatch;
    if (d.kind !== 'group') throw new TypeError('backwardParallel: the last forward was forward: call backward');
    if (d.group !== group) throw new TypeError('backwardParallel: group: expected the group of the last forwardParallel');
    return this.#finishBackward(b, await this.#dispatchBackwardGroup(b, d));
  }

  #beginBackward(gradOutput: Tensor | DeviceTensor, op: string): Backward {
    this.#alive(op);
    const s = this.#saved;
    if (!s) throw new Error(`${op}: call forward first`);
    const dev = this.onDevice;
    if (dev !== isDeviceTensor(gradOutput)) throw new TypeError(`gradOutput: expected a ${dev ? 'device' : 'host'} tensor (as the forward's input), got a ${dev ? 'host' : 'device'} tensor`);
    const g = dev ? (gradOutput as DeviceTensor) : checkTensor(gradOutput, 'gradOutput');
    if (g.dtype !== this.dtype) throw new TypeError(`gradOutput.dtype: expected ${this.dtype} (the layer's dtype), got ${g.dtype}`);
    if (g.shape.length !== s.shape.length || g.shape.some((d, i) => d !== s.shape[i])) {
      throw new RangeError(`gradOutput.shape: expected [${s.shape.join(', ')}] (the forward's output), got [${g.shape.join(', ')}]`);
    }
    const N = s.x.shape[0];
    const g2 = (dev ? g : reshape(g as Tensor<TokenDType>, [N, this.dim])) as Tensor<TokenDType>;
    return { s, g2, m: this.#math, temps: [] };
  }

  /** The experts and the dispatch, backward, on this process's tokens: the tokens' gradient through the dispatch, the routing weights'. */
  #dispatchBackwardLocal({ s, g2, m, temps }: Backward, d: LocalDispatch): DispatchedGrads {
    const moe = this.backend;
    const dev = this.onDevice;
    const N = s.x.shape[0];
    const local = this.epSize === 1;
    const [r0, r1] = d.localRows;
    const slots = d.permutedTokens.shape[0];
    // the combine was an unweighted unpermute (the experts weighted their rows): the gradient of
    // the experts' output is a gather of g2 by sortedIndices. On the GPU the experts' backward
    // gathers it itself (gradGatherIndices) and frees that [slots, dim] copy once its last
    // reader is queued; elsewhere unpermuteBackward makes it (of its permutedTokens argument
    // that reads the shape and dtype only, which the permuted tokens share with the experts'
    // output, so the forward need not keep that output).
    const options = { ...this.#activationOptions(), permutedProbs: local ? d.permutedProbs : rows(d.permutedProbs, r0, r1), biases: this.expertBiases };
    let eg: ReturnType<Backend['expertsBackward']>;
    if (dev) {
      eg = (moe as CudaBackend).expertsBackward(g2, d.gathered ? (s.x as AnyTensor<TokenDType>) : d.permutedTokens, d.tokensPerExpert, this.expertWeights as DeviceExpertWeights, {
        ...options,
        gradGatherIndices: d.sortedIndices,
        // h and a are the backward's alone: given to it, each freed after its last reader
        ...(d.expertsSaved ? { saved: d.expertsSaved, freeSaved: true } : {}),
        // and so are the permuted tokens (the tokens' gradient is written over them once dW1 has
        // read them); gathering on load, the experts read the input, which the router's backward reads after
        ...(d.gathered ? { gatherIndices: d.sortedIndices } : { freeTokens: true }),
      }) as unknown as ReturnType<Backend['expertsBackward']>;
    } else {
      const gradY = moe.unpermuteBackward(g2, d.permutedTokens as Tensor<TokenDType>, d.sortedIndices).gradPermuted;
      temps.push(gradY);
      eg = moe.expertsBackward(
        local ? gradY : rows(gradY, r0, r1),
        local ? d.permutedTokens : rows(d.permutedTokens, r0, r1),
        local ? d.tokensPerExpert : this.#localCounts(d.tokensPerExpert),
        this.expertWeights,
        options,
      );
    }
    const gradTokens = local ? eg.gradTokens : placeRows(eg.gradTokens, r0, slots);
    const gradProbs = local ? eg.gradProbs! : placeRows(eg.gradProbs!, r0, slots);
    temps.push(eg.gradTokens, eg.gradProbs!);
    const back = moe.permuteBackward(gradTokens, d.sortedIndices, N, { gradPermutedProbs: gradProbs, routingMap: d.routingMap });
    temps.push(back.gradProbs!);
    return { gradTokens: back.gradTokens, gradWeights: m.gatherPicks(back.gradProbs!, s.indices, temps), experts: eg };
  }

  /** The experts and the dispatch, backward, across the ranks of the group. */
  async #dispatchBackwardGroup({ g2, temps }: Backward, d: GroupDispatch): Promise<DispatchedGrads> {
    const moe = this.backend;
    const cg = await combineBackward(d.group, moe, g2, d.handle);
    const options = { ...this.#activationOptions(), permutedProbs: d.permutedProbs, biases: this.expertBiases };
    let eg: ReturnType<Backend['expertsBackward']>;
    if (this.onDevice) {
      eg = (moe as CudaBackend).expertsBackward(cg.gradExpertOutputs, d.permutedTokens, d.tokensPerExpert, this.expertWeights as DeviceExpertWeights, {
        ...options,
        // h and a, and the received tokens (the tokens' gradient is written over them), are the backward's alone
        ...(d.expertsSaved ? { saved: d.expertsSaved, freeSaved: true } : {}),
        freeTokens: true,
      }) as unknown as ReturnType<Backend['expertsBackward']>;
      temps.push(cg.gradExpertOutputs);
    } else {
      eg = moe.expertsBackward(cg.gradExpertOutputs, d.permutedTokens, d.tokensPerExpert, this.expertWeights, options);
    }
    temps.push(eg.gradTokens, eg.gradProbs!);
    const db = await dispatchBackward(d.group, moe, eg.gradTokens, d.handle, { gradPermutedProbs: eg.gradProbs });
    temps.push(db.gradWeights);
    return { gradTokens: db.gradTokens, gradWeights: db.gradWeights, experts: eg };
  }

  /**
   * `a @ b` in float32 from the widened operands, one of them a float32 gradient (the router's and the shared gate's backward): on the GPU
   * with a bfloat16 operand one tensor-core GEMM with the same exact products (the cuda backend's `matmulMixed`), else the float32 GEMM.
   */
  #widenedMatmul(a: AnyTensor, b: AnyTensor, options: { transA?: boolean; transB?: boolean }, m: LayerMath, temps: AnyTensor[]): Tensor<'float32'> {
    const mixed = this.onDevice && a.dtype !== b.dtype && [a.dtype, b.dtype].every((d) => d === 'float32' || d === 'bfloat16');
    if (mixed) return (this.backend as CudaBackend).matmulMixed(a as DeviceTensor<'float32' | 'bfloat16'>, b as DeviceTensor<'float32' | 'bfloat16'>, options) as unknown as Tensor<'float32'>;
    return this.backend.matmul(m.toF32(a, temps) as Tensor<'float32'>, m.toF32(b, temps) as Tensor<'float32'>, options);
  }

  /**
   * The input's gradient: `dtype(f32((experts' + router's) + shared expert's))` (add3), the router's
   * part `gradLogits @ routerWeight^T` in float32. On the GPU, without a shared expert, one GEMM
   * whose epilogue adds the experts' part (`matmulMixed`'s addend: the same arithmetic, no float32
   * product written and read back).
   */
  #inputGrad(gradTokens: AnyTensor, gradLogits: AnyTensor, sharedGradX: AnyTensor | undefined, m: LayerMath, temps: AnyTensor[]): AnyTensor {
    const w = this.weights;
    if (this.onDevice && sharedGradX === undefined && gradLogits.dtype === 'float32' && w.routerWeight.dtype === 'bfloat16') {
      const cuda = this.backend as CudaBackend;
      return cuda.matmulMixed(gradLogits as DeviceTensor<'float32'>, w.routerWeight as unknown as DeviceTensor<'bfloat16'>, {
        transB: true,
        addend: gradTokens as DeviceTensor<TokenDType>,
      });
    }
    const viaRouter = this.#widenedMatmul(gradLogits, w.routerWeight, { transB: true }, m, temps);
    temps.push(viaRouter);
    return m.add3(gradTokens, viaRouter, sharedGradX, this.dtype, []);
  }

  /** The router (the routing weights' gradient and the aux losses'), the shared expert, the input's gradient and the parameters'. */
  #finishBackward({ s, g2, m, temps }: Backward, e: DispatchedGrads): MoEGrads | DeviceMoEGrads {
    const moe = this.backend;
    const dev = this.onDevice;
    const rb = moe.routeBackward(e.gradWeights as Tensor<'float32'>, s.logits, s.indices, {
      ...this.routeOptions,
      ...(s.auxGrad?.gradScores ? { gradScores: s.auxGrad.gradScores as Tensor<'float32'> } : {}),
    });
    const extra = [s.auxGrad?.gradLogits, s.zGrad].filter((t): t is AnyTensor => t !== undefined);
    let gradLogits = rb.gradLogits as AnyTensor;
    if (extra.length) {
      temps.push(gradLogits);
      gradLogits = m.add3(gradLogits, extra[0], extra[1], 'float32', temps);
    }
    temps.push(gradLogits);
    const w = this.weights;
    const gw = this.#widenedMatmul(s.x, gradLogits, { transA: true }, m, temps);
    const grads: Partial<MoEWeights> = { routerWeight: m.cast(gw, this.routerDtype, temps) as Tensor<TokenDType> };
    if (w.routerBias) grads.routerBias = m.columnSums(gradLogits, this.routerDtype) as Tensor<TokenDType>;
    temps.push(e.gradTokens);

    // The shared expert and its gate.
    let sharedGradX: AnyTensor | undefined;
    if (s.shared) {
      const sg = this.#sharedBackward(s.x, g2, s.shared, m, temps);
      sharedGradX = sg.gradX;
      Object.assign(grads, sg.grads);
    }
    const gradX = this.#inputGrad(e.gradTokens, gradLogits, sharedGradX, m, temps);

    const eg = e.experts;
    grads.downProjs = eg.gradDownProjs;
    if (eg.gradUpProjs) grads.upProjs = eg.gradUpProjs;
    if (eg.gradGateAndUpProjs) grads.gateAndUpProjs = eg.gradGateAndUpProjs;
    if (eg.gradBiases?.gateUpProjBias) grads.gateUpProjBias = eg.gradBiases.gateUpProjBias;
    if (eg.gradBiases?.downProjBias) grads.downProjBias = eg.gradBiases.downProjBias;
    m.free(temps);
    // on the GPU the activations go at once (a second backward needs a new forward); host ones stay until the next forward
    if (dev) this.#free();
    if (dev) return { gradInput: gradX, grads } as unknown as DeviceMoEGrads;
    return { gradInput: reshape(gradX as Tensor<TokenDType>, s.shape), grads: grads as MoEWeights };
  }

  /**
   * The shared expert: `out = MLP(x)` in the dtype; with a gate, `contribution = sigmoid(x @ g) * out`
   * (the gate rounded to the dtype, the product rounded once: numeric.ts `sharedGateForward`), else `out`.
   */
  #sharedForward(x: AnyTensor, m: LayerMath, temps: AnyTensor[]): { out: AnyTensor; gateLogits?: AnyTensor; contribution: AnyTensor } {
    const w = this.weights;
    const N = x.shape[0];
    const counts: Tensor<'int32'> = { dtype: 'int32', shape: [1], data: Int32Array.of(N) };
    const y = this.backend.expertsForward(x as Tensor<TokenDType>, counts, { gateAndUpProjs: w.sharedGateAndUpProjs!, downProjs: w.sharedDownProjs! }, { activation: 'swiglu' }) as AnyTensor;
    if (!w.sharedExpertGate) return { out: y, contribution: y };
    const raw = this.backend.matmul(m.toF32(x, temps) as Tensor<'float32'>, m.toF32(w.sharedExpertGate, temps) as Tensor<'float32'>);
    temps.push(raw);
    const { gateLogits, contribution } = m.sharedGateForward(raw, y);
    temps.push(contribution);
    return { out: y, gateLogits, contribution };
  }

  /** The shared expert's backward: its weights' gradients and its part of the input gradient (float32 with a gate, else the dtype's). */
  #sharedBackward(x: AnyTensor, g: AnyTensor, saved: NonNullable<Saved['shared']>, m: LayerMath, temps: AnyTensor[]): { gradX: AnyTensor; grads: Partial<MoEWeights> } {
    const moe = this.backend;
    const w = this.weights;
    const N = x.shape[0];
    const grads: Partial<MoEWeights> = {};
    let gradOut = g;
    let viaGate: AnyTensor | undefined;
    if (saved.gateLogits && w.sharedExpertGate) {
      // d out = g * gate; d gateLogit = sum_d g * out * gate * (1 - gate)
      const sg = m.sharedGateBackward(g, saved.out, saved.gateLogits);
      temps.push(sg.gradOut, sg.gradGateLogits);
      gradOut = sg.gradOut;
      const dgl = sg.gradGateLogits as Tensor<'float32'>;
      grads.sharedExpertGate = m.cast(this.#widenedMatmul(x, dgl, { transA: true }, m, temps), this.dtype, temps) as Tensor<TokenDType>;
      viaGate = this.#widenedMatmul(dgl, w.sharedExpertGate, { transB: true }, m, temps);
      temps.push(viaGate);
    }
    const counts: Tensor<'int32'> = { dtype: 'int32', shape: [1], data: Int32Array.of(N) };
    const eg = moe.expertsBackward(
      gradOut as Tensor<TokenDType>,
      x as Tensor<TokenDType>,
      counts,
      { gateAndUpProjs: w.sharedGateAndUpProjs!, downProjs: w.sharedDownProjs! },
      { activation: 'swiglu' },
    );
    grads.sharedGateAndUpProjs = eg.gradGateAndUpProjs;
    grads.sharedDownProjs = eg.gradDownProjs;
    temps.push(eg.gradTokens);
    if (!viaGate) return { gradX: eg.gradTokens, grads };
    const gradX = m.add3(eg.gradTokens, viaGate, undefined, 'float32', temps);
    temps.push(gradX);
    return { gradX, grads };
  }

  /**
   * The layer as a safetensors checkpoint under `prefix`: the router (`{prefix}.gate.weight`,
   * `[numExperts, dim]` as a transformers Linear; `.gate.bias`, `.gate.e_score_correction_bias`),
   * the routed experts (`{prefix}.experts...` in `format`: per-expert `'hf'` keys (default),
   * `'mixtral'` w1/w3/w2, `'gpt_oss'` fused, or our `'stacked'` tensors), and the shared expert
   * (`{prefix}.shared_expert.{gate,up,down}_proj.weight`, `{prefix}.shared_expert_gate.weight`).
   * `savePretrained` writes a family's own keys instead.
   */
  save(prefix = 'mlp', options: { format?: ExpertKeyFormat } = {}): Uint8Array {
    const o = checkOptions<{ format?: string }>(options, 'save', ['format']);
    const format = oneOf(o.format, 'options.format', ['hf', 'mixtral', 'gpt_oss', 'llama4', 'hf_fused', 'granite', 'stacked'] as const, 'hf');
    return savePretrained(this.#onHost(), { keys: genericKeys(prefix, format) });
  }

  /** Writes the layer in its Hugging Face family's own keys (see hf.ts), so transformers reloads it. */
  savePretrained(options: SavePretrainedOptions = {}): Uint8Array {
    return savePretrained(this.#onHost(), options);
  }

  /** This layer, or (parameters on the GPU) a host copy of it for writing a checkpoint. */
  #onHost(): MoELayer {
    if (!this.onDevice) return this;
    const weights = Object.fromEntries(Object.entries(this.weights).map(([k, t]) => [k, isDeviceTensor(t) ? t.download() : t])) as unknown as MoEWeights;
    const copy = new MoELayer(this.backend, { ...this.options, weights });
    if (this.pretrained) copy.pretrained = { ...this.pretrained };
    return copy;
  }

  /** A layer with the weights of a checkpoint written by `save` (the same options otherwise); the experts' layout is detected unless `format` is given. */
  static load(backend: Backend, source: PretrainedSource, options: Omit<MoELayerOptions, 'weights'>, prefix = 'mlp', format?: ExpertKeyFormat): MoELayer {
    return loadWithKeys(backend, source, options, genericKeys(prefix, format));
  }

  /**
   * One decoder layer's MoE block of a Hugging Face model: its `config.json` (object or path) and
   * checkpoint (a path in Node, or bytes: a `.safetensors` file, or `{ index, shards }`). Only that
   * layer's tensors (and, with `epSize`, this rank's experts) are read. See hf.ts for the families.
   */
  static fromPretrained(backend: Backend, options: FromPretrainedOptions): Promise<MoELayer> {
    return fromPretrained(backend, options);
  }
}

LayerClass.ctor = MoELayer;
