/**
 * Device tensors: tensors that live in GPU memory (the cuda backend's). They carry their dtype
 * and shape; `download()` copies one to a host `Tensor`; `dispose()` frees its GPU memory at
 * once (a tensor that is garbage-collected is freed too, later). Any use after `dispose()` is a
 * TypeError naming the op and the argument.
 *
 *   const moe = await createBackend({ prefer: 'cuda' });
 *   const x = moe.upload(tokens);                         // DeviceTensor<'bfloat16'>
 *   const { permutedTokens, sortedIndices } = moe.permute(x, moe.upload(routingMap));
 *   const y = moe.unpermute(permutedTokens, sortedIndices, [T, H]);   // never leaves the GPU
 *   const host = y.download();                            // Tensor<'bfloat16'>
 *   x.dispose(); y.dispose();
 */
import type { DType, Tensor } from './tensor.js';

/** What every GPU-resident tensor has: this file's `DeviceTensor` (cuda) and `WebGpuTensor` (backends/webgpu-tensor.ts). */
export interface GpuResident<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  /** Whether `dispose()` was called. */
  readonly disposed: boolean;
  /** GPU memory held, in bytes (0 once disposed). */
  readonly byteLength: number;
  /** Frees the GPU memory now. Idempotent; later uses are errors. */
  dispose(): void;
}

export interface DeviceTensor<D extends DType = DType> extends GpuResident<D> {
  /** Where the data lives. */
  readonly device: 'cuda';
  /** Copies the tensor to a new host Tensor (waits for the kernels that write it). */
  download(): Tensor<D>;
}

/** A host or a device tensor of dtype D (what the cuda backend's ops and a layer on the GPU take). */
export type AnyTensor<D extends DType = DType> = Tensor<D> | DeviceTensor<D>;

/** What the native addon's `CudaTensor` class exposes. */
export interface NativeCudaTensor {
  readonly dtype: string;
  readonly shape: number[];
  readonly disposed: boolean;
  readonly byteLength: number;
  download(): Tensor;
  dispose(): void;
}

const handles = new WeakMap<object, NativeCudaTensor>();

const ERROR_CLASSES: Record<string, ErrorConstructor> = { TypeError, RangeError, Error };

/** Rethrows an addon error as the JS class its `code` names, prefixed with the op. */
export function rethrowNative(op: string, e: unknown): never {
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    const cls = typeof code === 'string' && code in ERROR_CLASSES ? ERROR_CLASSES[code] : e instanceof TypeError ? TypeError : e instanceof RangeError ? RangeError : undefined;
    if (cls) throw new cls(`${op}: ${e.message}`);
  }
  throw e;
}

class CudaDeviceTensor<D extends DType> implements DeviceTensor<D> {
  readonly device = 'cuda' as const;
  // dtype and shape are read from the addon at first use (fewer N-API calls per op)
  #dtype?: D;
  #shape?: readonly number[];

  constructor(handle: NativeCudaTensor) {
    handles.set(this, handle);
  }

  get dtype(): D {
    this.#dtype ??= handles.get(this)!.dtype as D;
    return this.#dtype;
  }

  get shape(): readonly number[] {
    this.#shape ??= Object.freeze([...handles.get(this)!.shape]);
    return this.#shape;
  }

  get disposed(): boolean {
    return handles.get(this)!.disposed;
  }

  get byteLength(): number {
    return handles.get(this)!.byteLength;
  }

  download(): Tensor<D> {
    try {
      const w = handles.get(this)!.download();
      return { dtype: w.dtype, shape: [...w.shape], data: w.data } as unknown as Tensor<D>;
    } catch (e) {
      rethrowNative('download', e);
    }
  }

  dispose(): void {
    handles.get(this)!.dispose();
  }

  get [Symbol.toStringTag](): string {
    return `DeviceTensor(${this.dtype} [${this.shape.join(', ')}]${this.disposed ? ', disposed' : ''})`;
  }
}

/** Wraps an addon `CudaTensor`. */
export function wrapDevice<D extends DType = DType>(handle: NativeCudaTensor): DeviceTensor<D> {
  return new CudaDeviceTensor<D>(handle);
}

/** Whether `value` is a device tensor (made by a cuda backend). */
export function isDeviceTensor(value: unknown): value is DeviceTensor {
  return typeof value === 'object' && value !== null && handles.has(value);
}

/** How deep into arguments (options objects, arrays, records) device tensors are looked for. */
export const ARGUMENT_DEPTH = 3;

/** Whether a device tensor sits in `value`: an argument, or an options object, array or record of them. */
export function containsDeviceTensor(value: unknown, depth = 0): boolean {
  if (isDeviceTensor(value)) return true;
  if (depth >= ARGUMENT_DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return false;
  return Object.values(value).some((v) => containsDeviceTensor(v, depth + 1));
}

/** The addon handle of a device tensor. */
export function nativeHandle(t: DeviceTensor): NativeCudaTensor {
  const h = handles.get(t);
  if (!h) throw new TypeError('not a device tensor of this library');
  return h;
}

/** A GPU backend's copies to and from the device so far, and the host's waits for it. */
export interface Transfers {
  toDeviceCalls: number;
  toDeviceBytes: number;
  toHostCalls: number;
  toHostBytes: number;
  /** The host's waits for the GPU so far (each read-back waits; `synchronize()` too). */
  synchronizations: number;
}
