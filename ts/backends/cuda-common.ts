/**
 * What the cuda backend's op families share: device handles for one call (host tensors uploaded
 * and freed afterwards), the test for "any device tensor among the arguments", and the shape of a
 * family of GPU ops (`GpuFamily`), which `cudaBackend` (cuda.ts) merges over the CPU ops.
 */
import type { Backend } from '../backend.js';
import { isDeviceTensor, nativeHandle, rethrowNative, wrapDevice, type NativeCudaTensor } from '../device.js';
import type { Binding } from '../generated/binding.js';
import { tensor, type DType, type IndexDType, type Tensor } from '../tensor.js';
import { INDICES, wire, type TensorArgs, type WireTensor } from '../wire.js';

/** The addon's functions, by name (each family declares the ones it calls). */
export type Addon = Record<string, (...args: never[]) => unknown> & {
  cudaUpload(tensor: ReturnType<typeof wire>): NativeCudaTensor;
};

/** A field of a binding's argument object or result with a device handle where the CPU op takes or returns a tensor. */
type OnDeviceValue<V> = V extends WireTensor | Tensor ? NativeCudaTensor : V;

/** A binding's argument object or result (ts/generated/binding.ts) with device handles for its tensors. */
export type OnDevice<T> = { [K in keyof T]: OnDeviceValue<T[K]> };

/**
 * The addon's function of the op `K` on device tensors (`cuda<Op>Device`, crates/moe-node/src/cuda*.rs):
 * the CPU op's argument object and result as the op table generates them, with device handles for
 * the tensors (the same fields, read by the same kinds; `Extra`: fields only the GPU takes).
 */
export type DeviceFn<K extends keyof Binding, Extra = unknown> = (
  args: OnDevice<Parameters<Binding[K]>[0]> & Extra,
) => ReturnType<Binding[K]> extends Tensor ? NativeCudaTensor : OnDevice<ReturnType<Binding[K]>>;

/** Device handles for one call: device tensors as they are, host tensors uploaded (and freed after the call); the adapters' argument builders take it (`TensorArgs`). */
export class Handles implements TensorArgs<NativeCudaTensor> {
  private temps: NativeCudaTensor[] = [];
  constructor(private readonly addon: Pick<Addon, 'cudaUpload'>) {}

  of(value: unknown, arg: string, dtypes: readonly DType[]): NativeCudaTensor {
    if (isDeviceTensor(value)) {
      if (!dtypes.includes(value.dtype)) {
        // a disposed tensor is the first thing to say (checked only here: no cost when the dtype fits)
        if (value.disposed) throw new TypeError(`${arg}: expected a device tensor that is not disposed, got one whose dispose() was called`);
        throw new TypeError(`${arg}.dtype: expected ${dtypes.join(' or ')}, got ${value.dtype}`);
      }
      return nativeHandle(value);
    }
    const h = this.addon.cudaUpload(wire(value, arg, dtypes));
    this.temps.push(h);
    return h;
  }

  opt(value: unknown, arg: string, dtypes: readonly DType[]): NativeCudaTensor | undefined {
    return value === undefined || value === null ? undefined : this.of(value, arg, dtypes);
  }

  dispose(): void {
    for (const h of this.temps) h.dispose();
    this.temps = [];
  }
}

export function anyDevice(...values: unknown[]): boolean {
  return values.some(isDeviceTensor);
}

export function optionValue(options: unknown, key: string): unknown {
  return typeof options === 'object' && options !== null ? (options as Record<string, unknown>)[key] : undefined;
}

/** A device function's result object with its handles wrapped as device tensors (other values as they are, absent keys absent). */
export function wrapResult(out: object): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(out)
      .filter(([, v]) => v !== undefined && v !== null)
      .map(([k, v]) => [k, typeof v === 'number' ? v : wrapDevice(v as NativeCudaTensor)]),
  );
}

/** Device tensors downloaded (for the host op); anything else as it is. */
export function hostOf<T>(value: T): T {
  return (isDeviceTensor(value) ? value.download() : value) as T;
}

/** `options` with its `key` downloaded when that is a device tensor (for the host op). */
export function hostOptions(options: unknown, key: string): unknown {
  if (typeof options !== 'object' || options === null || !isDeviceTensor(optionValue(options, key))) return options;
  return { ...(options as Record<string, unknown>), [key]: hostOf(optionValue(options, key)) };
}

/**
 * An index tensor as a device handle. The GPU keeps no int64: device tensors as they are; host
 * ones checked as the host op checks them, an int64 one converted to int32 when every value fits
 * (same values, so the same results and errors); undefined when one does not (the caller then
 * runs the host op).
 */
export function int32Handle(h: Handles, value: unknown, arg: string): NativeCudaTensor | undefined {
  if (isDeviceTensor(value)) return h.of(value, arg, INDICES);
  wire(value, arg, INDICES); // the host op's checks, in its order
  const t = value as Tensor<IndexDType>;
  if (t.dtype !== 'int64') return h.of(t, arg, INDICES);
  const data = t.data as BigInt64Array;
  const out = new Int32Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (v < -2147483648n || v > 2147483647n) return undefined;
    out[i] = Number(v);
  }
  return h.of(tensor('int32', t.shape, out), arg, INDICES);
}

/**
 * The device paths allocate their outputs: a caller-owned `out` is taken on the host path only
 * (host tensors go through the native CPU op), and with device tensors it is this TypeError.
 */
export function noDeviceOut(op: string, options: unknown): void {
  if (optionValue(options, 'out') !== undefined) {
    throw new TypeError(`${op}: options.out: the cuda backend writes caller-owned outputs only on its host path (host tensors); on device tensors it allocates its outputs`);
  }
}

/** Runs `f` with fresh handles; addon errors become typed JS errors prefixed with `op`. */
export function callWith<T>(addon: Pick<Addon, 'cudaUpload'>, op: string, f: (h: Handles) => T): T {
  const h = new Handles(addon);
  try {
    return f(h);
  } catch (e) {
    rethrowNative(op, e);
  } finally {
    h.dispose();
  }
}

/** What a family of GPU ops gets to build its methods with. */
export interface GpuContext {
  /** The cuda backend's host ops (the CPU core through the native addon). */
  base: Backend;
  /** The native addon (its `cuda*Device` functions). */
  addon: Addon;
  /** `callWith(addon, op, f)`. */
  call<T>(op: string, f: (h: Handles) => T): T;
}

/** A family's `present`: whether the addon has every one of these functions. */
export function hasFunctions(names: readonly string[]): (addon: Addon) => boolean {
  return (addon) => names.every((f) => typeof (addon as Record<string, unknown>)[f] === 'function');
}

/**
 * A family of ops that run on the GPU. Each method takes host or device tensors: with host
 * tensors only it may run the host op (`ctx.base`); with any device tensor it runs on the GPU
 * and returns device tensors.
 */
export interface GpuFamily {
  /** The Backend methods this family runs on the GPU. */
  ops: readonly string[];
  /** Whether the addon has this family's functions (older builds do not). */
  present(addon: Addon): boolean;
  methods(ctx: GpuContext): Record<string, (...args: never[]) => unknown>;
}
