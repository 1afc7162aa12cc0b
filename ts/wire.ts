/**
 * Checking JavaScript values on their way into a binding: tensors become wire tensors (the
 * bytes of their data), option objects are checked for unknown keys and option types.
 * Semantic checks (shapes that must agree, ranges) are the core's, not these.
 */
import { checkTensor, type DType, type IndexDType, type Tensor, type TokenDType } from './tensor.js';

/** A tensor as the bindings take it: the bytes of its data. */
export interface WireTensor {
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

/** A tensor's dtype and shape, with its bytes when they are on the host (the core's check functions take it). */
export interface WireMeta {
  dtype: DType;
  shape: number[];
  data?: Uint8Array;
}

/** Runs `f` on the binding, turning any error into a typed error that names `op`. */
export type Call<B> = <T>(op: string, f: (binding: B) => T) => T;

export const TOKENS: readonly TokenDType[] = ['float32', 'bfloat16', 'float16'];
export const INDICES: readonly IndexDType[] = ['int32', 'int64'];

export function wire(value: unknown, arg: string, dtypes?: readonly DType[]): WireTensor {
  const t = checkTensor(value, arg, dtypes);
  const d = t.data;
  return { dtype: t.dtype, shape: [...t.shape], data: new Uint8Array(d.buffer, d.byteOffset, d.byteLength) };
}

/**
 * How an adapter passes tensor arguments to a binding: their bytes (`WIRE`), or on the cuda
 * backend device handles (`Handles`). The adapters' argument builders take one, so the cuda
 * backend builds the same argument objects with the same checks in the same order.
 */
export interface TensorArgs<T> {
  of(value: unknown, arg: string, dtypes: readonly DType[]): T;
  opt(value: unknown, arg: string, dtypes: readonly DType[]): T | undefined;
}

/** Options `T` whose tensor fields `K` may hold any value (a `TensorArgs` checks them: host or device tensors). */
export type AnyTensors<T, K extends keyof T> = Omit<T, K> & { [P in K]?: unknown };

export function optWire(value: unknown, arg: string, dtypes?: readonly DType[]): WireTensor | undefined {
  return value === undefined || value === null ? undefined : wire(value, arg, dtypes);
}

/**
 * A RangeError when an output shares memory with an input or another output (checked here, on
 * the JS side, for both bindings: the wasm binding only sees copies of the inputs). Both are
 * tensors (or absent) by the name errors give them, outputs in the order they are checked.
 */
export function checkDisjoint(outputs: Record<string, unknown>, inputs: Record<string, unknown>): void {
  const view = (t: unknown) => (t as Tensor | undefined)?.data;
  const outs = Object.entries(outputs);
  outs.forEach(([name, o], i) => {
    const a = view(o);
    if (!a || a.byteLength === 0) return;
    for (const [other, t] of [...Object.entries(inputs), ...outs.slice(0, i)]) {
      const b = view(t);
      if (!b || b.byteLength === 0 || a.buffer !== b.buffer) continue;
      if (a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength) {
        throw new RangeError(`${name}: its memory overlaps ${other}'s; an output must not share memory with an input or another output`);
      }
    }
  });
}

/** Tensors as the CPU bindings take them: wire tensors. */
export const WIRE: TensorArgs<WireTensor> = { of: wire, opt: optWire };

/** Rejects option objects that are not objects or carry keys this op does not know (typos). */
export function checkOptions<T extends object>(options: unknown, op: string, known: readonly (keyof T & string)[]): Partial<T> {
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

export function checkBool(value: unknown, arg: string): boolean | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'boolean') throw new TypeError(`${arg}: expected a boolean, got ${typeof value}`);
  return value;
}

export function checkNumber(value: unknown, arg: string): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  return value;
}

/** A number the op cannot do without: absent is a TypeError too (its value is checked by the core). */
export function requiredNumber(value: unknown, arg: string): number {
  const n = checkNumber(value, arg);
  if (n === undefined) throw new TypeError(`${arg}: expected a number (required), got undefined`);
  return n;
}

export function optString(value: unknown, arg: string): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string') throw new TypeError(`${arg}: expected a string, got ${typeof value}`);
  return value;
}
