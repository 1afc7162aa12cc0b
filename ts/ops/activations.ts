/** Expert activations, forward and backward: the interface, and its adapter over a binding. */
import type { Tensor, TokenDType } from '../tensor.js';
import type { Binding } from '../generated/binding.js';
import { checkNumber, checkOptions, TOKENS, WIRE, wire, type Call, type TensorArgs } from '../wire.js';

/**
 * - `'swiglu'`: `x = [gate | up]` halves, `silu(gate) * up` (Megatron-Core).
 * - `'quick_geglu'`: interleaved `gate = x[:, 0::2]`, `up = x[:, 1::2]`;
 *   `g * sigmoid(alpha * g) * (u + linearOffset)` with `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`.
 * - `'swiglu_oai'`: the quick_geglu formula on `[gate | up]` halves.
 * - `'swiglu_clamped'`: halves, `silu(min(gate, limit)) * clamp(up, -limit, limit)`.
 * - `'relu2'`: `relu(x)^2`, not gated (`x` is `[N, I]`).
 */
export type ActivationKind = 'swiglu' | 'quick_geglu' | 'swiglu_oai' | 'swiglu_clamped' | 'relu2';

export interface ActivationOptions {
  /** Which activation (required). */
  kind: ActivationKind;
  /** Per-row routing probs `[N]` or `[N, 1]` float32: each output row is multiplied by its prob. */
  probs?: Tensor<'float32'>;
  /** quick_geglu / swiglu_oai: slope inside the sigmoid. Default 1.702. */
  alpha?: number;
  /** quick_geglu / swiglu_oai / swiglu_clamped: clamp bound, > 0. Default 7. */
  limit?: number;
  /** quick_geglu / swiglu_oai: added to the clamped up value. Default 1. */
  linearOffset?: number;
}

export interface ActivationGrads<D extends TokenDType = TokenDType> {
  /** Shaped and typed like `x`. */
  gradInput: Tensor<D>;
  /** Shaped like `probs` (float32), when probs were given: per row, `sum_j activation(x)[j] * grad[j]` (unweighted activation). */
  gradProbs?: Tensor<'float32'>;
}

export interface ActivationsOps {
  /**
   * Applies an expert activation: `x [N, 2 * I]` (`[N, I]` for relu2) to `[N, I]` in the dtype of
   * `x`, computed in float32 and rounded once; times `probs` per row when given.
   */
  activation<D extends TokenDType>(x: Tensor<D>, options: ActivationOptions): Tensor<D>;
  /**
   * Backward of `activation`: `grad [N, I]` (the dtype of `x`) to `gradInput` (like `x`, through
   * the activation of `grad * prob`) and, with probs, `gradProbs`. A clamp passes the gradient on
   * its closed range (`gate <= limit`, `-limit <= up <= limit`) and stops it outside.
   */
  activationBackward<D extends TokenDType>(grad: Tensor<D>, x: Tensor<D>, options: ActivationOptions): ActivationGrads<D>;
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type ActivationsBinding = Pick<Binding, 'activation' | 'activationBackward'>;

const KNOWN: readonly (keyof ActivationOptions)[] = ['kind', 'probs', 'alpha', 'limit', 'linearOffset'];

/** The options as the bindings take them (`t`: how `probs` goes in); the kind's name and the values are checked by the core. */
export function activationArgs<T>(options: unknown, op: string, t: TensorArgs<T>) {
  const o = checkOptions<ActivationOptions>(options, op, KNOWN);
  if (o.kind !== undefined && typeof o.kind !== 'string') throw new TypeError(`options.kind: expected a string, got ${typeof o.kind}`);
  return {
    kind: o.kind,
    probs: t.opt(o.probs, 'probs', ['float32']),
    alpha: checkNumber(o.alpha, 'options.alpha'),
    limit: checkNumber(o.limit, 'options.limit'),
    linearOffset: checkNumber(o.linearOffset, 'options.linearOffset'),
  };
}

export function activationsOps(call: Call<ActivationsBinding>): ActivationsOps {
  return {
    activation(x, options) {
      return call('activation', (b) => b.activation({ x: wire(x, 'x', TOKENS), ...activationArgs(options, 'activation', WIRE) })) as Tensor<never>;
    },
    activationBackward(grad, x, options) {
      return call('activationBackward', (b) => {
        const out = b.activationBackward({ grad: wire(grad, 'grad', TOKENS), x: wire(x, 'x', TOKENS), ...activationArgs(options, 'activationBackward', WIRE) });
        // napi-rs gives `null` for an absent optional field, wasm `undefined`: both become a missing key.
        if (out.gradProbs === undefined || out.gradProbs === null) delete out.gradProbs;
        return out;
      }) as ActivationGrads<never>;
    },
  };
}
