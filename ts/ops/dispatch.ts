/** Routing maps, permute and unpermute: the interface, and its adapter over a binding. */
import type { IndexDType, Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkNumber, checkOptions, INDICES, optWire, TOKENS, wire, type Call, type WireTensor } from '../wire.js';

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

export interface DispatchOps {
  /** `indices [T, k]` (-1 = masked) and `probs [T, k]` to `routingMap [T, E]` and dense `probs [T, E]`. */
  indicesToMultihot(indices: Tensor<IndexDType>, probs: Tensor<'float32'>, numExperts: number): { routingMap: Tensor<'bool'>; probs: Tensor<'float32'> };
  /** The inverse: each token's experts in ascending id, padded with -1 (prob 0). */
  multihotToIndices(routingMap: Tensor<'bool'>, options?: MultihotToIndicesOptions): { indices: Tensor<'int32'>; probs: Tensor<'float32'> };
  /** Gathers `tokens [T, H]` into expert-major order. */
  permute<D extends TokenDType>(tokens: Tensor<D>, routingMap: Tensor<'bool'>, options?: PermuteOptions): PermuteResult<D>;
  /** Merges `permutedTokens` back to `restoreShape = [numTokens, hidden]`, weighted by probs. */
  unpermute<D extends TokenDType>(permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, restoreShape: readonly [number, number], options?: UnpermuteOptions): Tensor<D>;
}

/** The positional functions both bindings export for this family. */
export interface DispatchBinding {
  indicesToMultihot(indices: WireTensor, probs: WireTensor, numExperts: number): { routingMap: Tensor; probs: Tensor };
  multihotToIndices(routingMap: WireTensor, probs: WireTensor | undefined, topk: number | undefined): { indices: Tensor; probs: Tensor };
  permute(tokens: WireTensor, routingMap: WireTensor, probs: WireTensor | undefined, numOutTokens: number | undefined, dropAndPad: boolean | undefined): PermuteResult;
  unpermute(permuted: WireTensor, sortedIndices: WireTensor, restoreShape: number[], probs: WireTensor | undefined, routingMap: WireTensor | undefined, dropAndPad: boolean | undefined): Tensor;
}

export function dispatchOps(call: Call<DispatchBinding>): DispatchOps {
  return {
    indicesToMultihot(indices, probs, numExperts) {
      return call('indicesToMultihot', (b) =>
        b.indicesToMultihot(wire(indices, 'indices', INDICES), wire(probs, 'probs', ['float32']), checkNumber(numExperts, 'numExperts') ?? NaN),
      ) as ReturnType<DispatchOps['indicesToMultihot']>;
    },
    multihotToIndices(routingMap, options) {
      return call('multihotToIndices', (b) => {
        const o = checkOptions<MultihotToIndicesOptions>(options, 'multihotToIndices', ['probs', 'topk']);
        return b.multihotToIndices(wire(routingMap, 'routingMap', ['bool']), optWire(o.probs, 'probs', ['float32']), checkNumber(o.topk, 'options.topk'));
      }) as ReturnType<DispatchOps['multihotToIndices']>;
    },
    permute(tokens, routingMap, options) {
      return call('permute', (b) => {
        const o = checkOptions<PermuteOptions>(options, 'permute', ['probs', 'numOutTokens', 'dropAndPad']);
        const out = b.permute(
          wire(tokens, 'tokens', TOKENS),
          wire(routingMap, 'routingMap', ['bool']),
          optWire(o.probs, 'probs', ['float32']),
          checkNumber(o.numOutTokens, 'options.numOutTokens'),
          checkBool(o.dropAndPad, 'options.dropAndPad'),
        );
        if (out.permutedProbs === undefined || out.permutedProbs === null) delete out.permutedProbs;
        return out;
      }) as PermuteResult<never>;
    },
    unpermute(permutedTokens, sortedIndices, restoreShape, options) {
      return call('unpermute', (b) => {
        const o = checkOptions<UnpermuteOptions>(options, 'unpermute', ['probs', 'routingMap', 'dropAndPad']);
        if (!Array.isArray(restoreShape) || restoreShape.some((d) => typeof d !== 'number')) {
          throw new TypeError(`restoreShape: expected [numTokens, hidden], got ${JSON.stringify(restoreShape)}`);
        }
        return b.unpermute(
          wire(permutedTokens, 'permutedTokens', TOKENS),
          wire(sortedIndices, 'sortedIndices', INDICES),
          [...restoreShape],
          optWire(o.probs, 'probs', ['float32']),
          optWire(o.routingMap, 'routingMap', ['bool']),
          checkBool(o.dropAndPad, 'options.dropAndPad'),
        );
      }) as Tensor<never>;
    },
  };
}
