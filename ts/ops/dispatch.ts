/** Routing maps, permute and unpermute: the interface, and its adapter over a binding. */
import type { IndexDType, Tensor, TokenDType } from '../tensor.js';
import type { Binding } from '../generated/binding.js';
import { checkBool, checkDisjoint, checkNumber, checkOptions, INDICES, optWire, TOKENS, wire, type Call } from '../wire.js';

export interface PermuteOptions {
  /** Dense probs `[numTokens, numExperts]` float32; each slot's prob is returned as `permutedProbs`. */
  probs?: Tensor<'float32'>;
  /** Output rows. With `dropAndPad` it sets the capacity `numOutTokens / numExperts`. */
  numOutTokens?: number;
  /** Give every expert exactly `capacity` slots: drop overflow, pad with unselected tokens. */
  dropAndPad?: boolean;
  /**
   * Caller-owned outputs, written instead of allocated and returned as the result's
   * `permutedTokens` / `permutedProbs` (the same objects): `permutedTokens` `[numSlots, hidden]`
   * of the tokens' dtype, `permutedProbs` `[numSlots]` float32 (only with `probs`). Checked
   * (dtype: TypeError, shape or memory shared with an input: RangeError) before anything is written.
   */
  out?: { permutedTokens?: Tensor; permutedProbs?: Tensor<'float32'> };
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

/** unpermute's options: {@link UnpermuteOptions} and a caller-owned output. */
export interface UnpermuteIntoOptions<D extends TokenDType = TokenDType> extends UnpermuteOptions {
  /**
   * A caller-owned `[numTokens, hidden]` tensor of permutedTokens' dtype, written instead of
   * allocated and returned (the same object); checked before anything is written.
   */
  out?: Tensor<D>;
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
  /** A caller-owned `gradTokens` (`[numTokens, hidden]` of gradPermuted's dtype), written instead of allocated and returned. */
  out?: { gradTokens?: Tensor };
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
  unpermute<D extends TokenDType>(permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, restoreShape: readonly [number, number], options?: UnpermuteIntoOptions<D>): Tensor<D>;
  /**
   * Backward of permute: `gradTokens [T, H]` sums each token's slot gradients; with
   * `gradPermutedProbs`, `gradProbs [T, E]` puts each slot's prob gradient at (token, expert).
   */
  permuteBackward<D extends TokenDType>(
    gradPermuted: Tensor<D>,
    sortedIndices: Tensor<IndexDType>,
    numTokens: number,
    options?: PermuteBackwardOptions,
  ): { gradTokens: Tensor<D>; gradProbs?: Tensor<'float32'> };
  /**
   * Backward of unpermute: `gradPermuted[i] = gradOutput[sortedIndices[i]] * p_i`; with probs,
   * `gradProbs` (shaped like the probs given) holds `dot(gradOutput[token], permutedTokens[i])`.
   */
  unpermuteBackward<D extends TokenDType>(
    gradOutput: Tensor<D>,
    permutedTokens: Tensor<D>,
    sortedIndices: Tensor<IndexDType>,
    options?: UnpermuteOptions,
  ): { gradPermuted: Tensor<D>; gradProbs?: Tensor<'float32'> };
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type DispatchBinding = Pick<Binding, 'indicesToMultihot' | 'multihotToIndices' | 'permute' | 'permutePlan' | 'unpermute' | 'permuteBackward' | 'unpermuteBackward'>;

/** The `out` option's object (known keys only). */
function outObject<T extends object>(out: unknown, op: string, known: readonly (keyof T & string)[]): Partial<T> {
  if (out === undefined) return {};
  if (typeof out !== 'object' || out === null || Array.isArray(out) || ArrayBuffer.isView(out) || 'dtype' in out) {
    throw new TypeError(
      `options.out: expected an object { ${known.join(', ')} } of output tensors, got ${out === null ? 'null' : Array.isArray(out) ? 'an Array' : typeof out === 'object' ? 'a tensor' : typeof out}`,
    );
  }
  for (const key of Object.keys(out)) {
    if (!known.includes(key as keyof T & string)) throw new TypeError(`options.out.${key}: not an output of ${op} (known: ${known.join(', ')})`);
  }
  return out as Partial<T>;
}

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
        const o = checkOptions<PermuteOptions>(options, 'permute', ['probs', 'numOutTokens', 'dropAndPad', 'out']);
        const given = outObject<NonNullable<PermuteOptions['out']>>(o.out, 'permute', ['permutedTokens', 'permutedProbs']);
        const args = {
          tokens: wire(tokens, 'tokens', TOKENS),
          routingMap: wire(routingMap, 'routingMap', ['bool']),
          probs: optWire(o.probs, 'probs', ['float32']),
          numOutTokens: checkNumber(o.numOutTokens, 'numOutTokens'),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          outPermutedTokens: optWire(given.permutedTokens, 'out.permutedTokens', TOKENS),
          outPermutedProbs: optWire(given.permutedProbs, 'out.permutedProbs', ['float32']),
        };
        checkDisjoint({ 'out.permutedTokens': given.permutedTokens, 'out.permutedProbs': given.permutedProbs }, { tokens, routingMap, probs: o.probs });
        const out = b.permute(args);
        if (given.permutedTokens) out.permutedTokens = given.permutedTokens;
        if (given.permutedProbs) out.permutedProbs = given.permutedProbs;
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
        const o = checkOptions<UnpermuteIntoOptions>(options, 'unpermute', ['probs', 'routingMap', 'dropAndPad', 'out']);
        if (!Array.isArray(restoreShape) || restoreShape.some((d) => typeof d !== 'number')) {
          throw new TypeError(`restoreShape: expected [numTokens, hidden], got ${JSON.stringify(restoreShape)}`);
        }
        const args = {
          permutedTokens: wire(permutedTokens, 'permutedTokens', TOKENS),
          sortedIndices: wire(sortedIndices, 'sortedIndices', INDICES),
          restoreShape: [...restoreShape],
          probs: optWire(o.probs, 'probs', ['float32']),
          routingMap: optWire(o.routingMap, 'routingMap', ['bool']),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          out: optWire(o.out, 'out', TOKENS),
        };
        checkDisjoint({ out: o.out }, { permutedTokens, sortedIndices, probs: o.probs, routingMap: o.routingMap });
        const out = b.unpermute(args);
        return o.out ?? out;
      }) as Tensor<never>;
    },
    permuteBackward(gradPermuted, sortedIndices, numTokens, options) {
      return call('permuteBackward', (b) => {
        const o = checkOptions<PermuteBackwardOptions>(options, 'permuteBackward', ['gradPermutedProbs', 'routingMap', 'dropAndPad', 'out']);
        const given = outObject<NonNullable<PermuteBackwardOptions['out']>>(o.out, 'permuteBackward', ['gradTokens']);
        const args = {
          gradPermuted: wire(gradPermuted, 'gradPermuted', TOKENS),
          sortedIndices: wire(sortedIndices, 'sortedIndices', INDICES),
          numTokens: checkNumber(numTokens, 'numTokens') ?? NaN,
          gradPermutedProbs: optWire(o.gradPermutedProbs, 'gradPermutedProbs', ['float32']),
          routingMap: optWire(o.routingMap, 'routingMap', ['bool']),
          dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          outGradTokens: optWire(given.gradTokens, 'out.gradTokens', TOKENS),
        };
        checkDisjoint({ 'out.gradTokens': given.gradTokens }, { gradPermuted, sortedIndices, gradPermutedProbs: o.gradPermutedProbs, routingMap: o.routingMap });
        const out = b.permuteBackward(args);
        if (given.gradTokens) out.gradTokens = given.gradTokens;
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
