/** Routing (router logits to top-k experts) and the auxiliary router losses: the interface, and its adapter over a binding. */
import type { IndexDType, Tensor, TokenDType } from '../tensor.js';
import type { Binding } from '../generated/binding.js';
import { checkBool, checkNumber, checkOptions, INDICES, optWire, requiredNumber, TOKENS, wire, WIRE, type AnyTensors, type Call, type TensorArgs } from '../wire.js';

/**
 * How router logits become scores (NeMo Automodel `Gate.score_func`):
 * - `'softmax'`: softmax; top-k on the logits (weights: a softmax over the k picked logits), or
 *   with `softmaxBeforeTopk` on the softmax (weights: the softmax at the picks). No bias, no groups.
 * - `'sigmoid'`: sigmoid; selection on `sigmoid + expertBias`; groups scored by their max
 *   (no bias) or the sum of their two best (bias); dropped groups' experts score 0.
 * - `'softmax_with_bias'`: softmax; selection on `softmax + expertBias`; groups by top-2 sum, dropped groups score 0.
 * - `'sigmoid_with_bias'`: sigmoid; selection on `sigmoid + expertBias`; groups by top-2 sum, dropped groups score -inf.
 * - `'sqrtsoftplus'`: `sqrt(softplus(x))`; selection on `score + expertBias`. No groups.
 */
export type ScoreFunction = 'softmax' | 'sigmoid' | 'softmax_with_bias' | 'sigmoid_with_bias' | 'sqrtsoftplus';

export interface RouteOptions {
  /** Experts per token, 1 to numExperts (required). */
  topk: number;
  /** Default `'softmax'`. */
  scoreFunction?: ScoreFunction;
  /** `'softmax'` only: select on the softmax instead of the logits (weights are then the softmax values). */
  softmaxBeforeTopk?: boolean;
  /** Score-correction bias `[numExperts]` float32, added to the scores for selection only (not with `'softmax'`). */
  expertBias?: Tensor<'float32'>;
  /** Expert groups for group-limited routing (default 1 = none); must divide numExperts. Not with `'softmax'`/`'sqrtsoftplus'`. */
  numGroups?: number;
  /** Groups each token keeps, 1 to numGroups (default numGroups). */
  topkGroups?: number;
  /** With topk > 1: weights /= (their sum + 1e-20), and each `scores` row /= (its sum + 1e-20). */
  normTopkProb?: boolean;
  /** Factor on the final weights (default 1); finite. */
  routeScale?: number;
  /** `[numTokens]` bool, true = a real token: masked tokens get indices -1 and weights 0 (their scores are still computed). */
  tokenMask?: Tensor<'bool'>;
}

export interface RouteResult {
  /** `[numTokens, topk]` float32: each pick's weight (0 for masked tokens). */
  weights: Tensor<'float32'>;
  /** `[numTokens, topk]` int32: the picked experts by descending selection score, ties to the lower id; -1 for masked tokens. */
  indices: Tensor<'int32'>;
  /** `[numTokens, numExperts]` float32: the unbiased scores (softmax, sigmoid or sqrt-softplus), normalised with `normTopkProb` and topk > 1. */
  scores: Tensor<'float32'>;
  /** `[numExperts]` int32: how many unmasked tokens picked each expert. */
  tokensPerExpert: Tensor<'int32'>;
}

export interface SwitchLoadBalancingLossOptions {
  /** The k of the routing that produced `tokensPerExpert` (required, >= 1). */
  topk: number;
  /** Loss coefficient (Megatron `moe_aux_loss_coeff`), finite and >= 0. Default 1. */
  coeff?: number;
  /** Token count N of the normalisation (Megatron `total_num_tokens`); default: the unmasked rows (at least 1). */
  numTokens?: number;
  /** `[numTokens]` bool, true = a real token: masked rows add nothing and get a zero gradient. */
  tokenMask?: Tensor<'bool'>;
}

export interface ZLossOptions {
  /** Loss coefficient (Megatron `moe_z_loss_coeff`), finite and >= 0. Default 1. */
  coeff?: number;
  /** `[numTokens]` bool, true = a real token: the mean runs over real tokens only. */
  tokenMask?: Tensor<'bool'>;
}

export interface RoutingOps {
  /**
   * Routes every token (NeMo Automodel `Gate._route_scores`): scores from `logits [numTokens, numExperts]`
   * float32, top-k selection (optionally biased and group-limited), weights normalised and scaled.
   * bfloat16 and float16 logits (a 16-bit model's router output) are converted exactly to float32
   * first: the result is that of their float32 conversion.
   */
  route(logits: Tensor<TokenDType>, options: RouteOptions): RouteResult;
  /**
   * The backward of `route`: `gradLogits [numTokens, numExperts]` float32, the gradient with respect
   * to `logits` of a loss whose gradient with respect to route's `weights` is `gradWeights
   * [numTokens, topk]` float32 (and, with `options.gradScores [numTokens, numExperts]` float32,
   * with respect to its `scores`). `indices` are route's picks for these logits and options
   * (int32 or int64; a row of -1 is a masked token); given them the selection is fixed, so the
   * gradient flows through the weights' values: the softmax over the picked logits or the score
   * function at the picks, `normTopkProb` and `routeScale`. Pass route's own options (the same
   * object): they are checked as route checks them. Masked tokens (`tokenMask` false, or indices
   * -1) get zero rows. Computed in float64 per token from the logits, rounded once to float32;
   * `logits` may be bfloat16/float16 as in route.
   */
  routeBackward(gradWeights: Tensor<'float32'>, logits: Tensor<TokenDType>, indices: Tensor<IndexDType>, options: RouteOptions & { gradScores?: Tensor<'float32'> }): { gradLogits: Tensor<'float32'> };
  /**
   * The `k` largest entries of each row of `values [T, E]` (e.g. router probs), largest first,
   * ties to the lower column: `values [T, k]` f32 and `indices [T, k]` int32.
   */
  topk(values: Tensor<'float32'>, k: number): { values: Tensor<'float32'>; indices: Tensor<'int32'> };
  /**
   * Switch load-balancing loss (Megatron-Core): `loss = E * coeff / (topk * N^2) * sum_e P_e * tokensPerExpert[e]`
   * with `P_e` the column sum of `probs [numTokens, numExperts]`; `gradProbs = d loss / d probs`
   * (`E * coeff / (topk * N^2) * tokensPerExpert[e]` in every unmasked row). The loss is a double.
   */
  switchLoadBalancingLoss(probs: Tensor<'float32'>, tokensPerExpert: Tensor<IndexDType>, options: SwitchLoadBalancingLossOptions): { loss: number; gradProbs: Tensor<'float32'> };
  /**
   * The Switch loss of `probs = softmax(logits)` (computed in double precision) and its gradient
   * with respect to the logits, chained through the softmax.
   */
  switchLoadBalancingLossFromLogits(logits: Tensor<'float32'>, tokensPerExpert: Tensor<IndexDType>, options: SwitchLoadBalancingLossOptions): { loss: number; gradLogits: Tensor<'float32'> };
  /**
   * ST-MoE z-loss: `coeff * mean_t logsumexp(logits_t)^2` and
   * `gradLogits = 2 * coeff / N * logsumexp(logits_t) * softmax(logits_t)`. The loss is a double.
   */
  zLoss(logits: Tensor<'float32'>, options?: ZLossOptions): { loss: number; gradLogits: Tensor<'float32'> };
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type RoutingBinding = Pick<Binding, 'route' | 'routeBackward' | 'topk' | 'switchLoadBalancingLoss' | 'switchLoadBalancingLossFromLogits' | 'zLoss'>;

export const ROUTE_KEYS = ['topk', 'scoreFunction', 'softmaxBeforeTopk', 'expertBias', 'numGroups', 'topkGroups', 'normTopkProb', 'routeScale', 'tokenMask'] as const;

/** route's options as the bindings take them (routeBackward takes the same; `t`: how expertBias and tokenMask go in). */
export function routeArgs<T>(o: Partial<AnyTensors<RouteOptions, 'expertBias' | 'tokenMask'>>, t: TensorArgs<T>) {
  if (o.scoreFunction !== undefined && typeof o.scoreFunction !== 'string') {
    throw new TypeError(`options.scoreFunction: expected a string, got ${typeof o.scoreFunction}`);
  }
  return {
    topk: requiredNumber(o.topk, 'options.topk'),
    scoreFunction: o.scoreFunction,
    softmaxBeforeTopk: checkBool(o.softmaxBeforeTopk, 'options.softmaxBeforeTopk'),
    expertBias: t.opt(o.expertBias, 'expertBias', ['float32']),
    numGroups: checkNumber(o.numGroups, 'options.numGroups'),
    topkGroups: checkNumber(o.topkGroups, 'options.topkGroups'),
    normTopkProb: checkBool(o.normTopkProb, 'options.normTopkProb'),
    routeScale: checkNumber(o.routeScale, 'options.routeScale'),
    tokenMask: t.opt(o.tokenMask, 'tokenMask', ['bool']),
  };
}

/** The Switch losses' options as the bindings take them (`t`: how tokenMask goes in). */
export function switchArgs<T>(options: unknown, op: string, t: TensorArgs<T>) {
  const o = checkOptions<SwitchLoadBalancingLossOptions>(options, op, ['topk', 'coeff', 'numTokens', 'tokenMask']);
  return {
    topk: requiredNumber(o.topk, 'options.topk'),
    coeff: checkNumber(o.coeff, 'options.coeff'),
    numTokens: checkNumber(o.numTokens, 'options.numTokens'),
    tokenMask: t.opt(o.tokenMask, 'tokenMask', ['bool']),
  };
}

export function routingOps(call: Call<RoutingBinding>): RoutingOps {
  return {
    topk(values, k) {
      return call('topk', (b) => b.topk({ values: wire(values, 'values', ['float32']), k: checkNumber(k, 'k') ?? NaN })) as ReturnType<RoutingOps['topk']>;
    },
    route(logits, options) {
      return call('route', (b) => {
        const o = checkOptions<RouteOptions>(options, 'route', ROUTE_KEYS);
        return b.route({ logits: wire(logits, 'logits', TOKENS), ...routeArgs(o, WIRE) });
      }) as RouteResult;
    },
    routeBackward(gradWeights, logits, indices, options) {
      return call('routeBackward', (b) => {
        const o = checkOptions<RouteOptions & { gradScores?: Tensor<'float32'> }>(options, 'routeBackward', [...ROUTE_KEYS, 'gradScores']);
        const g = wire(gradWeights, 'gradWeights', ['float32']);
        const l = wire(logits, 'logits', TOKENS);
        const i = wire(indices, 'indices', INDICES);
        return b.routeBackward({ gradWeights: g, logits: l, indices: i, ...routeArgs(o, WIRE), gradScores: optWire(o.gradScores, 'gradScores', ['float32']) });
      }) as { gradLogits: Tensor<'float32'> };
    },
    switchLoadBalancingLoss(probs, tokensPerExpert, options) {
      return call('switchLoadBalancingLoss', (b) =>
        b.switchLoadBalancingLoss({
          probs: wire(probs, 'probs', ['float32']),
          tokensPerExpert: wire(tokensPerExpert, 'tokensPerExpert', INDICES),
          ...switchArgs(options, 'switchLoadBalancingLoss', WIRE),
        }),
      ) as { loss: number; gradProbs: Tensor<'float32'> };
    },
    switchLoadBalancingLossFromLogits(logits, tokensPerExpert, options) {
      return call('switchLoadBalancingLossFromLogits', (b) =>
        b.switchLoadBalancingLossFromLogits({
          logits: wire(logits, 'logits', ['float32']),
          tokensPerExpert: wire(tokensPerExpert, 'tokensPerExpert', INDICES),
          ...switchArgs(options, 'switchLoadBalancingLossFromLogits', WIRE),
        }),
      ) as { loss: number; gradLogits: Tensor<'float32'> };
    },
    zLoss(logits, options) {
      return call('zLoss', (b) => {
        const o = checkOptions<ZLossOptions>(options, 'zLoss', ['coeff', 'tokenMask']);
        return b.zLoss({ logits: wire(logits, 'logits', ['float32']), coeff: checkNumber(o.coeff, 'options.coeff'), tokenMask: optWire(o.tokenMask, 'tokenMask', ['bool']) });
      }) as { loss: number; gradLogits: Tensor<'float32'> };
    },
  };
}
