/**
 * TokenDispatcher: one rank's dispatch chain, as NeMo Automodel's MoEFlexTokenDispatcher
 * runs it: top-k of the router probs -> indices (zero-prob picks masked when a capacity factor
 * is set) -> multihot routing map -> optional padding of each expert to a multiple -> permute
 * with probs. It keeps the plan so `tokenUnpermutation` can restore the original order, and
 * both steps have their backward. It is built from Backend ops only, so it runs on every
 * backend; the expert-parallel dispatcher will extend it across ranks.
 */
import type { Backend } from './backend.js';
import { checkTensor, type IndexDType, type Tensor, type TokenDType } from './tensor.js';
import { checkOptions } from './wire.js';

export interface TokenDispatcherOptions {
  /** Experts on this rank (all experts, on one rank). */
  numExperts: number;
  /** Experts per token. */
  topk: number;
  /**
   * Set when the router dropped tokens to a capacity: picks whose prob is exactly 0 are then
   * masked (index -1), as the reference does, so dropped tokens are not dispatched.
   */
  capacityFactor?: number;
  /** Pad every expert's token count up to a multiple of this (extra slots carry prob 0). */
  padMultiple?: number;
}

/** Routing as precomputed top-k picks instead of dense probs. */
export interface TopKRouting {
  indices: Tensor<IndexDType>;
  weights: Tensor<'float32'>;
}

export interface TokenPermutation<D extends TokenDType = TokenDType> {
  /** `[numSlots, hidden]`, expert-major. */
  permutedTokens: Tensor<D>;
  /** `[numExperts]` int32 slots per expert (padding included). */
  tokensPerExpert: Tensor<'int32'>;
  /** `[numSlots]` f32: the prob of each slot, for the experts to weight their outputs with. */
  permutedProbs: Tensor<'float32'>;
}

interface Plan {
  numTokens: number;
  hidden: number;
  dtype: TokenDType;
  routingMap: Tensor<'bool'>;
  sortedIndices: Tensor<'int32'>;
  /** Which (token, expert) entries the router selected (before padding). */
  selected: Uint8Array;
  /** The top-k picks, when routing was given as picks: to return the weights' gradient. */
  picks?: Int32Array;
  /** Columns of `picks`. */
  k: number;
}

function positiveInt(value: unknown, arg: string, min: number): number {
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  if (!Number.isSafeInteger(value) || value < min) throw new RangeError(`${arg}: expected an integer >= ${min}, got ${value}`);
  return value;
}

export class TokenDispatcher {
  readonly numExperts: number;
  readonly topk: number;
  readonly capacityFactor?: number;
  readonly padMultiple?: number;
  #plan?: Plan;
  #expertOutput?: Tensor;

  constructor(
    readonly backend: Backend,
    options: TokenDispatcherOptions,
  ) {
    const o = checkOptions<TokenDispatcherOptions>(options, 'TokenDispatcher', ['numExperts', 'topk', 'capacityFactor', 'padMultiple']);
    this.numExperts = positiveInt(o.numExperts, 'numExperts', 1);
    this.topk = positiveInt(o.topk, 'topk', 1);
    if (this.topk > this.numExperts) throw new RangeError(`topk: ${this.topk} exceeds numExperts = ${this.numExperts}`);
    if (o.capacityFactor !== undefined) {
      if (typeof o.capacityFactor !== 'number') throw new TypeError(`capacityFactor: expected a number, got ${typeof o.capacityFactor}`);
      if (!Number.isFinite(o.capacityFactor) || o.capacityFactor <= 0) throw new RangeError(`capacityFactor: expected a finite number > 0, got ${o.capacityFactor}`);
      this.capacityFactor = o.capacityFactor;
    }
    if (o.padMultiple !== undefined) this.padMultiple = positiveInt(o.padMultiple, 'padMultiple', 1);
  }

  /**
   * Permutes `hidden [T, H]` by expert. `routing` is either the router's dense probs
   * `[T, numExperts]` (the top-k is taken here) or precomputed `{ indices, weights }` `[T, k]`.
   */
  tokenPermutation<D extends TokenDType>(hidden: Tensor<D>, routing: Tensor<'float32'> | TopKRouting): TokenPermutation<D> {
    const h = checkTensor(hidden, 'hidden', ['float32', 'bfloat16', 'float16'] as const) as Tensor<D>;
    if (h.shape.length !== 2) throw new TypeError(`tokenPermutation: hidden.shape: expected [numTokens, hidden], got [${h.shape.join(', ')}]`);
    const [numTokens, width] = h.shape;
    let indices: Tensor<IndexDType>;
    let weights: Tensor<'float32'>;
    let picks: Int32Array | undefined;
    if (typeof routing === 'object' && routing !== null && 'indices' in routing) {
      indices = checkTensor(routing.indices, 'routing.indices', ['int32', 'int64'] as const);
      weights = checkTensor(routing.weights, 'routing.weights', ['float32'] as const);
    } else {
      const probs = checkTensor(routing, 'routing', ['float32'] as const);
      if (probs.shape.length !== 2 || probs.shape[0] !== numTokens || probs.shape[1] !== this.numExperts) {
        throw new RangeError(`tokenPermutation: routing.shape: expected [${numTokens}, ${this.numExperts}] ([numTokens, numExperts]), got [${probs.shape.join(', ')}]`);
      }
      const top = this.backend.topk(probs, this.topk);
      indices = top.indices;
      weights = top.values;
    }
    if (this.capacityFactor !== undefined) {
      // Dropped picks carry prob 0: mask them so they are not dispatched (reference behaviour).
      const idx = Int32Array.from(indices.data as ArrayLike<number | bigint>, Number);
      weights.data.forEach((w, i) => {
        if (w === 0) idx[i] = -1;
      });
      indices = { dtype: 'int32', shape: [...indices.shape], data: idx };
    }
    if ('indices' in (routing as object)) picks = Int32Array.from(indices.data as ArrayLike<number | bigint>, Number);
    const { routingMap: selectedMap, probs: dense } = this.backend.indicesToMultihot(indices, weights, this.numExperts);
    const routingMap = this.padMultiple !== undefined && this.padMultiple > 1 ? this.backend.padRoutingMap(selectedMap, this.padMultiple) : selectedMap;
    const out = this.backend.permute(h, routingMap, { probs: dense });
    this.#plan = { numTokens, hidden: width, dtype: h.dtype, routingMap, sortedIndices: out.sortedIndices, selected: selectedMap.data, picks, k: indices.shape[1] };
    this.#expertOutput = undefined;
    return { permutedTokens: out.permutedTokens, tokensPerExpert: out.tokensPerExpert, permutedProbs: out.permutedProbs! };
  }

  /** Restores `expertOutput [numSlots, H]` to the original token order: each token sums its slots. */
  tokenUnpermutation<D extends TokenDType>(expertOutput: Tensor<D>): Tensor<D> {
    const plan = this.#requirePlan('tokenUnpermutation');
    const out = this.backend.unpermute(expertOutput, plan.sortedIndices, [plan.numTokens, plan.hidden]);
    this.#expertOutput = expertOutput;
    return out;
  }

  /** Backward of tokenUnpermutation: the gradient of its output to that of `expertOutput`. */
  tokenUnpermutationBackward<D extends TokenDType>(gradOutput: Tensor<D>): Tensor<D> {
    const plan = this.#requirePlan('tokenUnpermutationBackward');
    if (!this.#expertOutput) throw new Error('tokenUnpermutationBackward: call tokenUnpermutation first');
    return this.backend.unpermuteBackward(gradOutput, this.#expertOutput as Tensor<D>, plan.sortedIndices).gradPermuted;
  }

  /**
   * Backward of tokenPermutation: `gradHidden [T, H]`, and with `gradPermutedProbs` the
   * gradient of the routing: `gradProbs [T, numExperts]` (nonzero only where the router
   * selected) and, when routing was given as picks, `gradWeights [T, k]`.
   */
  tokenPermutationBackward<D extends TokenDType>(
    gradPermuted: Tensor<D>,
    gradPermutedProbs?: Tensor<'float32'>,
  ): { gradHidden: Tensor<D>; gradProbs?: Tensor<'float32'>; gradWeights?: Tensor<'float32'> } {
    const plan = this.#requirePlan('tokenPermutationBackward');
    const g = this.backend.permuteBackward(gradPermuted, plan.sortedIndices, plan.numTokens, gradPermutedProbs ? { gradPermutedProbs, routingMap: plan.routingMap } : undefined);
    if (!g.gradProbs) return { gradHidden: g.gradTokens };
    // Padding slots were not chosen by the router: their prob is a constant 0, so no gradient.
    const dense = Float32Array.from(g.gradProbs.data, (v, i) => (plan.selected[i] ? v : 0));
    const gradProbs: Tensor<'float32'> = { dtype: 'float32', shape: [plan.numTokens, this.numExperts], data: dense };
    if (!plan.picks) return { gradHidden: g.gradTokens, gradProbs };
    const k = plan.k;
    const w = Float32Array.from(plan.picks, (e, i) => (e < 0 ? 0 : dense[Math.floor(i / k) * this.numExperts + e]));
    return { gradHidden: g.gradTokens, gradProbs, gradWeights: { dtype: 'float32', shape: [plan.numTokens, k], data: w } };
  }

  #requirePlan(op: string): Plan {
    if (!this.#plan) throw new Error(`${op}: call tokenPermutation first`);
    return this.#plan;
  }
}
