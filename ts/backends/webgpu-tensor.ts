/**
 * The webgpu backend's device tensors: a GPUBuffer with a dtype and a shape. WebGPU reads a
 * buffer back only asynchronously, so `download()` returns a Promise (the cuda backend's is
 * synchronous). int64 is not kept on the GPU: upload int32 indices.
 */
import type { GpuResident } from '../device.js';
import type { DType, Tensor } from '../tensor.js';
import { checkTensor } from '../tensor.js';
import type { Gpu, GPUBuffer } from '../webgpu/gpu.js';

export interface WebGpuTensor<D extends DType = DType> extends GpuResident<D> {
  /** Where the data lives. */
  readonly device: 'webgpu';
  /** Copies the tensor to a new host Tensor, once the queued work that writes it is done. */
  download(): Promise<Tensor<D>>;
}

/** Bytes per element as the GPU holds them. */
export const BYTES: Record<DType, number> = { float32: 4, int32: 4, bfloat16: 2, float16: 2, bool: 1, int64: 8 };

const ARRAYS: Record<DType, (b: ArrayBuffer, n: number) => Tensor['data']> = {
  float32: (b, n) => new Float32Array(b, 0, n),
  int32: (b, n) => new Int32Array(b, 0, n),
  bfloat16: (b, n) => new Uint16Array(b, 0, n),
  float16: (b, n) => new Uint16Array(b, 0, n),
  bool: (b, n) => new Uint8Array(b, 0, n),
  int64: (b, n) => new BigInt64Array(b, 0, n),
};

const owners = new WeakMap<object, { gpu: Gpu; buffer: GPUBuffer | undefined }>();

/**
 * What an op of this backend knows of the values it wrote into a tensor, so that a later op
 * checks them without reading them back (the ops never write a tensor in place, and a
 * tensor's buffer is not writable from outside): `ones`, a bool map's number of ones (its
 * values all 0 or 1); `below`, an int32 tensor's values all in [0, below); `picks`, route's or
 * topk's `[T, k]` indices: each row's values distinct experts below `experts`, or -1, `picks` of
 * them not -1; `total`, an int32 count tensor's values all non-negative and adding up to `total`
 * (permute's and route's tokensPerExpert).
 */
export interface Facts {
  ones?: number;
  below?: number;
  picks?: number;
  experts?: number;
  total?: number;
}
const known = new WeakMap<object, Facts>();

/** The facts an op recorded for `value` (none for host tensors and uploads). */
export function factsOf(value: unknown): Facts {
  return (typeof value === 'object' && value !== null && known.get(value)) || {};
}

/** Records what the op that made `t` knows of its values. */
export function setFacts(t: GpuTensor, facts: Facts): void {
  known.set(t, facts);
}

/**
 * Buffers an op computed from a tensor's values and keeps with it for later ops (its values never
 * change): the inverse of permute's slot -> token map, which unpermute, permuteBackward and
 * unpermuteBackward need on the same sortedIndices. By key (what they are, and the sizes they
 * were computed for); counted in the backend's live bytes and released with the tensor.
 */
const derivedOf = new WeakMap<object, Map<string, GPUBuffer[]>>();

/** The buffers kept with `t` under `key`, if any. */
export function derivedBuffers(t: GpuTensor, key: string): GPUBuffer[] | undefined {
  return derivedOf.get(t)?.get(key);
}

/**
 * Keeps `buffers` with `t` under `key` (once their work is submitted); false, keeping nothing,
 * when `t` was disposed meanwhile or already keeps that key (the caller then releases them).
 */
export function keepDerived(gpu: Gpu, t: GpuTensor, key: string, buffers: GPUBuffer[]): boolean {
  if (t.disposed || derivedBuffers(t, key) !== undefined) return false;
  const m = derivedOf.get(t) ?? new Map<string, GPUBuffer[]>();
  derivedOf.set(t, m);
  m.set(key, buffers);
  for (const b of buffers) gpu.liveBytes += Number(b.size);
  return true;
}

export class GpuTensor<D extends DType = DType> implements WebGpuTensor<D> {
  readonly device = 'webgpu' as const;
  readonly shape: readonly number[];
  readonly elements: number;

  constructor(
    gpu: Gpu,
    buffer: GPUBuffer,
    readonly dtype: D,
    shape: readonly number[],
  ) {
    this.shape = Object.freeze([...shape]);
    this.elements = shape.reduce((a, b) => a * b, 1);
    owners.set(this, { gpu, buffer });
    gpu.liveBytes += this.byteLength;
  }

  get disposed(): boolean {
    return owners.get(this)!.buffer === undefined;
  }

  get byteLength(): number {
    return this.disposed ? 0 : this.elements * BYTES[this.dtype];
  }

  /** The buffer, for an op; a disposed tensor or one of another backend is a TypeError naming the argument. */
  bufferFor(gpu: Gpu, arg: string): GPUBuffer {
    const o = owners.get(this)!;
    if (!o.buffer) throw new TypeError(`${arg}: expected a device tensor that is not disposed, got one whose dispose() was called`);
    if (o.gpu !== gpu) throw new TypeError(`${arg}: a webgpu tensor of another backend (each backend has its own WebGPU device): download() it and pass the host tensor`);
    return o.buffer;
  }

  async download(): Promise<Tensor<D>> {
    const o = owners.get(this)!;
    if (!o.buffer) throw new TypeError('download: this webgpu tensor was disposed');
    const bytes = await o.gpu.read('download', o.buffer, this.byteLength);
    return { dtype: this.dtype, shape: [...this.shape], data: ARRAYS[this.dtype](bytes.buffer as ArrayBuffer, this.elements) } as unknown as Tensor<D>;
  }

  dispose(): void {
    const o = owners.get(this)!;
    if (!o.buffer) return;
    o.gpu.liveBytes -= this.byteLength;
    o.gpu.release(o.buffer);
    o.buffer = undefined;
    for (const list of derivedOf.get(this)?.values() ?? []) {
      for (const b of list) {
        o.gpu.liveBytes -= Number(b.size);
        o.gpu.release(b);
      }
    }
    derivedOf.delete(this);
  }

  get [Symbol.toStringTag](): string {
    return `WebGpuTensor(${this.dtype} [${this.shape.join(', ')}]${this.disposed ? ', disposed' : ''})`;
  }
}

/** Whether `value` is a webgpu device tensor. */
export function isWebGpuTensor(value: unknown): value is GpuTensor {
  return value instanceof GpuTensor;
}

/** Uploads a host tensor (int64 is refused: the GPU keeps no int64). */
export function uploadTensor<D extends DType>(gpu: Gpu, op: string, value: unknown, arg: string, dtypes?: readonly D[]): GpuTensor<D> {
  const t = checkTensor(value, arg, dtypes);
  if (t.dtype === 'int64') throw new TypeError(`${arg}: int64 is not kept on the GPU; upload int32 indices`);
  const d = t.data;
  const buf = gpu.upload(op, new Uint8Array(d.buffer, d.byteOffset, d.byteLength), arg);
  return new GpuTensor(gpu, buf, t.dtype, t.shape);
}
