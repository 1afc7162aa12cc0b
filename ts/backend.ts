/**
 * The Backend interface every implementation provides, and the adapter that turns a
 * compiled binding (N-API or wasm: both export the same positional functions) into one.
 * Argument checking that is about JavaScript values happens here; everything about the
 * semantics (shapes that must agree, index ranges, capacities) is checked once, in the
 * Rust core, and reported through the binding as a typed error.
 */
import { checkTensor, type DType, type IndexDType, type Tensor, type TokenDType } from './tensor.js';

export type BackendName = 'cpu' | 'wasm' | 'cuda';

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

export interface Backend {
  readonly name: BackendName;
  /** Worker threads used for large inputs. */
  readonly threads: number;
  /** `indices [T, k]` (-1 = masked) and `probs [T, k]` to `routingMap [T, E]` and dense `probs [T, E]`. */
  indicesToMultihot(indices: Tensor<IndexDType>, probs: Tensor<'float32'>, numExperts: number): { routingMap: Tensor<'bool'>; probs: Tensor<'float32'> };
  /** The inverse: each token's experts in ascending id, padded with -1 (prob 0). */
  multihotToIndices(routingMap: Tensor<'bool'>, options?: MultihotToIndicesOptions): { indices: Tensor<'int32'>; probs: Tensor<'float32'> };
  /** Gathers `tokens [T, H]` into expert-major order. */
  permute<D extends TokenDType>(tokens: Tensor<D>, routingMap: Tensor<'bool'>, options?: PermuteOptions): PermuteResult<D>;
  /** Merges `permutedTokens` back to `restoreShape = [numTokens, hidden]`, weighted by probs. */
  unpermute<D extends TokenDType>(permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, restoreShape: readonly [number, number], options?: UnpermuteOptions): Tensor<D>;
}

/** What `backendInfo()` reports for each backend. */
export interface BackendInfo {
  name: BackendName;
  available: boolean;
  /** Why it is unavailable (absent when available). */
  reason?: string;
  threads?: number;
}

/** A tensor as the bindings take it: the bytes of its data. */
export interface WireTensor {
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

/** The positional functions both compiled bindings export. */
export interface Binding {
  indicesToMultihot(indices: WireTensor, probs: WireTensor, numExperts: number): { routingMap: Tensor; probs: Tensor };
  multihotToIndices(routingMap: WireTensor, probs: WireTensor | undefined, topk: number | undefined): { indices: Tensor; probs: Tensor };
  permute(tokens: WireTensor, routingMap: WireTensor, probs: WireTensor | undefined, numOutTokens: number | undefined, dropAndPad: boolean | undefined): PermuteResult;
  unpermute(permuted: WireTensor, sortedIndices: WireTensor, restoreShape: number[], probs: WireTensor | undefined, routingMap: WireTensor | undefined, dropAndPad: boolean | undefined): Tensor;
  numThreads(): number;
}

const TOKENS: readonly TokenDType[] = ['float32', 'bfloat16', 'float16'];
const INDICES: readonly IndexDType[] = ['int32', 'int64'];

function wire(value: unknown, arg: string, dtypes?: readonly DType[]): WireTensor {
  const t = checkTensor(value, arg, dtypes);
  const d = t.data;
  return { dtype: t.dtype, shape: [...t.shape], data: new Uint8Array(d.buffer, d.byteOffset, d.byteLength) };
}

function optWire(value: unknown, arg: string, dtypes?: readonly DType[]): WireTensor | undefined {
  return value === undefined || value === null ? undefined : wire(value, arg, dtypes);
}

/** Rejects option objects that are not objects or carry keys this op does not know (typos). */
function checkOptions<T extends object>(options: unknown, op: string, known: readonly (keyof T & string)[]): Partial<T> {
  if (options === undefined || options === null) return {};
  if (typeof options !== 'object' || Array.isArray(options)) {
    throw new TypeError(`options: expected an object, got ${typeof options}`);
  }
  for (const key of Object.keys(options)) {
    if (!known.includes(key as keyof T & string)) {
      throw new TypeError(`options.${key}: not an option of ${op} (known: ${known.join(', ')})`);
    }
  }
  return options as Partial<T>;
}

function checkBool(value: unknown, arg: string): boolean | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'boolean') throw new TypeError(`${arg}: expected a boolean, got ${typeof value}`);
  return value;
}

function checkNumber(value: unknown, arg: string): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  return value;
}

const ERROR_CLASSES: Record<string, ErrorConstructor> = { TypeError, RangeError, Error };

/**
 * Rethrows an error from a binding as the JS class the core chose, prefixed with the op.
 * N-API errors carry the class in `code`; wasm throws real TypeError/RangeError objects.
 */
function rethrow(op: string, e: unknown, onTrap: () => void): never {
  if (typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError) {
    onTrap();
    throw new Error(`${op}: the wasm module trapped (${e.message}); this is a bug in moe-dispatch, the module was reloaded`);
  }
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    const cls = typeof code === 'string' && code in ERROR_CLASSES ? ERROR_CLASSES[code] : e instanceof TypeError ? TypeError : e instanceof RangeError ? RangeError : undefined;
    if (cls) throw new cls(`${op}: ${e.message}`);
  }
  throw e;
}

/** Calls the binding, turning validation failures here and errors there into typed errors named after `op`. */
function guarded<T>(op: string, onTrap: () => void, f: () => T): T {
  try {
    return f();
  } catch (e) {
    rethrow(op, e, onTrap);
  }
}

/**
 * Wraps a compiled binding as a Backend. `getBinding` is called on every op so a wasm
 * module that trapped can be replaced (`reload`) without the caller noticing.
 */
export function bindingBackend(name: BackendName, getBinding: () => Binding, reload: () => void = () => {}): Backend {
  const call = <T>(op: string, f: (b: Binding) => T): T => guarded(op, reload, () => f(getBinding()));
  return {
    name,
    get threads() {
      return getBinding().numThreads();
    },
    indicesToMultihot(indices, probs, numExperts) {
      return call('indicesToMultihot', (b) =>
        b.indicesToMultihot(wire(indices, 'indices', INDICES), wire(probs, 'probs', ['float32']), checkNumber(numExperts, 'numExperts') ?? NaN),
      ) as ReturnType<Backend['indicesToMultihot']>;
    },
    multihotToIndices(routingMap, options) {
      return call('multihotToIndices', (b) => {
        const o = checkOptions<MultihotToIndicesOptions>(options, 'multihotToIndices', ['probs', 'topk']);
        return b.multihotToIndices(wire(routingMap, 'routingMap', ['bool']), optWire(o.probs, 'probs', ['float32']), checkNumber(o.topk, 'options.topk'));
      }) as ReturnType<Backend['multihotToIndices']>;
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
