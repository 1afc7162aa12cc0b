/** Routing maps, permute and unpermute: the interface, and its adapter over a binding. */
import type { IndexDType, Tensor, TokenDType } from '../tensor.js';
import type { Binding } from '../generated/binding.js';
import { checkBool, checkNumber, checkOptions, INDICES, optWire, TOKENS, wire, type Call } from '../wire.js';

export interface PermuteOptions {
  /** Dense probs `[numTokens, numExperts]` float32; each slot's prob is returned as `permutedProbs`. */
  probs?: Tensor<'float32'>;
  /** Output rows. With `dropAndPad` it sets the capacity `numOutTokens / numExperts`. */
  numOutTokens?: number;
  /** Give every expert exactly `capacity` slots: drop overflow, pad with unselected tokens. */
  dropAndPad?: boolean;
}

export interface PermuteResult<D extends TokenDType = TokenDType> {
  /** `[numSlots, hidden]`: experts in turn, tokens ascending within an expert. */
  permutedTokens: Tensor<D>;
  /** `[numSlots]` float32, when `probs` was given. */
  permutedProbs?: Tensor<'float32'>;
  /** `[numSlots]` int32: the token each slot came from. */
  sortedIndices: Tensor<'int32'>;
  /** `[numExperts]` int32: slots per expert. */
  tokensPerExpert: Tensor<'int32'>;
}

export interface UnpermuteOptions {
  /** Per-slot probs `[numSlots]`, or dense `[numTokens, numExperts]` (then `routingMap` is needed). */
  probs?: Tensor<'float32'>;
  /** The routing map that produced the permutation (needed with dense probs). */
  routingMap?: Tensor<'bool'>;
  /** The permutation was made with `dropAndPad` (equal-capacity expert blocks). */
  dropAndPad?: boolean;
}

export interface MultihotToIndicesOptions {
  /** Dense probs `[numTokens, numExperts]`; without them every listed expert gets prob 1. */
  probs?: Tensor<'float32'>;
  /** Columns of the output; defaults to the largest number of experts any token selects. */
  topk?: number;
}

export interface PermuteBackwardOptions {
  /** Gradient of `permutedProbs` `[numSlots]`; its dense `[numTokens, numExperts]` form is returned as `gradProbs`. */
  gradPermutedProbs?: Tensor<'float32'>;
  /** The routing map of the permutation (needed with `gradPermutedProbs`). */
  routingMap?: Tensor<'bool'>;
  /** The permutation was made with `dropAndPad`. */
  dropAndPad?: boolean;
}

export interface DispatchOps {
  /** `indices [T, k]` (-1 = masked) and `probs [T, k]` to `routingMap [T, E]` and dense `probs [T, E]`. */
  indicesToMultihot(indices: Tensor<IndexDType>, probs: Tensor<'float32'>, numExperts: number): { routingMap: Tensor<'bool'>; probs: Tensor<'float32'> };
  /** The inverse: each token's experts in ascending id, padded with -1 (prob 0). */
  multihotToIndices(routingMap: Tensor<'bool'>, options?: MultihotToIndicesOptions): { indices: Tensor<'int32'>; probs: Tensor<'float32'> };
  /** Gathers `tokens [T, H]` into expert-major order. */
  permute<D extends TokenDType>(tokens: Tensor<D>, routingMap: Tensor<'bool'>, options?: PermuteOptions): PermuteResult<D>;
  /**
   * permute's plan alone: the `sortedIndices` and `tokensPerExpert` permute would return for this
   * routing map and options (the same checks and errors), without moving a token; e.g. the
   * counts an expert-parallel exchange needs before the tokens are there.
   */
  permutePlan(routingMap: Tensor<'bool'>, options?: Omit<PermuteOptions, 'probs'>): { sortedIndices: Tensor<'int32'>; tokensPerExpert: Tensor<'int32'> };
  /** Merges `permutedTokens` back to `restoreShape = [numTokens, hidden]`, weighted by probs. */
  unpermute<D extends TokenDType>(permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, restoreShape: readonly [number, number], options?: UnpermuteOptions): Tensor<D>;
  /**
   * Backward of permute: `gradTokens [T, H]` sums each token's slot gradients; with
   * `gradPermutedProbs`, `gradProbs [T, E]` puts each slot's prob gradient at (token, expert).
   */
  permuteBackward<D extends TokenDType>(gradPermuted: Tensor<D>, sortedIndices: Tensor<IndexDType>, numTokens: number, options?: PermuteBackwardOptions): { gradTokens: Tensor<D>; gradProbs?: Tensor<'float32'> };
  /**
   * Backward of unpermute: `gradPermuted[i] = gradOutput[sortedIndices[i]] * p_i`; with probs,
   * `gradProbs` (shaped like the probs given) holds `dot(gradOutput[token], permutedTokens[i])`.
   */
  unpermuteBackward<D extends TokenDType>(gradOutput: Tensor<D>, permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, options?: UnpermuteOptions): { gradPermuted: Tensor<D>; gradProbs?: Tensor<'float32'> };
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type DispatchBinding = Pick<Binding, 'indicesToMultihot' | 'multihotToIndices' | 'permute' | 'permutePlan' | 'unpermute' | 'permuteBackward' | 'unpermuteBackward'>;

/** napi-rs gives `null` for an absent optional field, wasm `undefined`: both become a missing key. */
function dropAbsent<T extends object>(out: T, key: keyof T): T {
  if (out[key] === undefined || out[key] === null) delete out[key];
  return out;
}

export function dispatchOps(call: Call<DispatchBinding>): DispatchOps {
  return {
    indicesToMultihot(indices, probs, numExperts) {
      return call('indicesToMultihot', (b) =>
        b.indicesToMultihot({ indices: wire(indices, 'indices', INDICES), probs: wire(probs, 'probs', ['float32']), numExperts: checkNumber(numExperts, 'numExperts') ?? NaN }),
      ) as ReturnType<DispatchOps['indicesToMultihot']>;
    },
    multihotToIndices(routingMap, options) {
      return call('multihotToIndices', (b) => {
        const o = checkOptions<MultihotToIndicesOptions>(options, 'multihotToIndices', ['probs', 'topk']);
        return b.multihotToIndices({ routingMap: wire(routingMap, 'routingMap', ['bool']), probs: optWire(o.probs, 'probs', ['float32']), topk: checkNumber(o.topk, 'topk') });
      }) as ReturnType<DispatchOps['multihotToIndices']>;
    },
    permute(tokens, routingMap, options) {
      return call('permute', (b) => {
        const o = checkOptions<PermuteOptions>(options, 'permute', ['probs', 'numOutTokens', 'dropAndPad']);
        const out = b.permute({
          tokens: wire(tokens, 'tokens', TOKENS),
          routingMap: wire(routingMap, 'routingMap', ['bool']),
          probs: optWire(o.probs, 'probs', ['float32']),
          numOutTokens: checkNumber(o.numOutTokens, 'numOutTokens'),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
        });
        return dropAbsent(out, 'permutedProbs');
      }) as PermuteResult<never>;
    },
    permutePlan(routingMap, options) {
      return call('permutePlan', (b) => {
        const o = checkOptions<PermuteOptions>(options, 'permutePlan', ['numOutTokens', 'dropAndPad']);
        return b.permutePlan({ routingMap: wire(routingMap, 'routingMap', ['bool']), numOutTokens: checkNumber(o.numOutTokens, 'numOutTokens'), dropAndPad: checkBool(o.dropAndPad, 'dropAndPad') });
      }) as { sortedIndices: Tensor<'int32'>; tokensPerExpert: Tensor<'int32'> };
    },
    unpermute(permutedTokens, sortedIndices, restoreShape, options) {
      return call('unpermute', (b) => {
        const o = checkOptions<UnpermuteOptions>(options, 'unpermute', ['probs', 'routingMap', 'dropAndPad']);
        if (!Array.isArray(restoreShape) || restoreShape.some((d) => typeof d !== 'number')) {
          throw new TypeError(`restoreShape: expected [numTokens, hidden], got ${JSON.stringify(restoreShape)}`);
        }
        return b.unpermute({
          permutedTokens: wire(permutedTokens, 'permutedTokens', TOKENS),
          sortedIndices: wire(sortedIndices, 'sortedIndices', INDICES),
          restoreShape: [...restoreShape],
          probs: optWire(o.probs, 'probs', ['float32']),
          routingMap: optWire(o.routingMap, 'routingMap', ['bool']),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
        });
      }) as Tensor<never>;
    },
    permuteBackward(gradPermuted, sortedIndices, numTokens, options) {
      return call('permuteBackward', (b) => {
        const o = checkOptions<PermuteBackwardOptions>(options, 'permuteBackward', ['gradPermutedProbs', 'routingMap', 'dropAndPad']);
        const out = b.permuteBackward({
          gradPermuted: wire(gradPermuted, 'gradPermuted', TOKENS),
          sortedIndices: wire(sortedIndices, 'sortedIndices', INDICES),
          numTokens: checkNumber(numTokens, 'numTokens') ?? NaN,
          gradPermutedProbs: optWire(o.gradPermutedProbs, 'gradPermutedProbs', ['float32']),
          routingMap: optWire(o.routingMap, 'routingMap', ['bool']),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
        });
        return dropAbsent(out, 'gradProbs');
      }) as { gradTokens: Tensor<never>; gradProbs?: Tensor<'float32'> };
    },
    unpermuteBackward(gradOutput, permutedTokens, sortedIndices, options) {
      return call('unpermuteBackward', (b) => {
        const o = checkOptions<UnpermuteOptions>(options, 'unpermuteBackward', ['probs', 'routingMap', 'dropAndPad']);
        const out = b.unpermuteBackward({
          gradOutput: wire(gradOutput, 'gradOutput', TOKENS),
          permutedTokens: wire(permutedTokens, 'permutedTokens', TOKENS),
          sortedIndices: wire(sortedIndices, 'sortedIndices', INDICES),
          probs: optWire(o.probs, 'probs', ['float32']),
          routingMap: optWire(o.routingMap, 'routingMap', ['bool']),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
        });
        return dropAbsent(out, 'gradProbs');
      }) as { gradPermuted: Tensor<never>; gradProbs?: Tensor<'float32'> };
    },
  };
}
