/**
 * The WebGPU backend (browsers): WGSL compute shaders (ts/webgpu/shaders.ts) over GPU-resident
 * tensors (`upload()`, webgpu-tensor.ts).
 *
 * WebGPU reads a buffer back only asynchronously, so the backend has two faces:
 * - the `Backend` methods (synchronous, host tensors in and out, as on every backend) run on
 *   the backend's own wasm instance: the same bits as the wasm backend by construction;
 * - `moe.gpu.<op>(...)` (every op of `Backend`, async) takes host or webgpu tensors and returns
 *   webgpu tensors. The ops of `WEBGPU_OPS` run their arithmetic in shaders; any other op
 *   downloads its device inputs, runs on the wasm instance and uploads its results.
 *
 * Validation is the core's: a GPU op first calls the wasm op on the inputs' host data, with each
 * `[rows, hidden]` token tensor replaced by an empty `[rows, 0]` stand-in (no hidden-sized data
 * is read back or copied). If that throws, or the shapes are not the ones the shaders take, the
 * whole op runs on the wasm instance with every input downloaded, so an error is the core's
 * own TypeError/RangeError, message included. Errors of the device itself (lost, a buffer over
 * the adapter's limits, out of memory) are Errors naming the op.
 */
import type { Backend, BackendInfo, Binding } from '../backend.js';
import type { Transfers } from '../device.js';
import { checkTensor, isTensor, type DType, type Tensor, type TokenDType } from '../tensor.js';
import { Gpu, describeAdapter, navigatorGpu, type GPUBuffer } from '../webgpu/gpu.js';
import { activationBackward as actBackward, activationCode, activationForward as actForward, activationGradProbs as actGradProbs, activationParams, type Pass } from '../webgpu/activations.js';
import { AUX_LOSS, blockedTotal } from '../webgpu/aux-loss.js';
import { F64, F64_ACC, F64_DOT } from '../webgpu/f64.js';
import { COUNT_PICKS, ROUTE, ROUTE_BACKWARD, ROUTE_FAST, ROUTE_FAST_SIGMOID, routeMargins } from '../webgpu/route.js';
import * as S from '../webgpu/shaders.js';
import { checkBool, checkNumber, INDICES, TOKENS, wire, type WireMeta } from '../wire.js';
import { loadWasm, type WasmSource } from './wasm.js';
import { expertsBackwardOp, expertsForwardOp, matmulOp } from './webgpu-experts.js';
import { BYTES, derivedBuffers, factsOf, GpuTensor, isWebGpuTensor, keepDerived, setFacts, uploadTensor, type WebGpuTensor } from './webgpu-tensor.js';

export { isWebGpuTensor, type WebGpuTensor } from './webgpu-tensor.js';

/** The ops whose arithmetic runs in WGSL shaders (`moe.gpu.<op>`); the others run on wasm. */
export const WEBGPU_OPS = [
  'indicesToMultihot',
  'multihotToIndices',
  'tokensPerExpert',
  'permute',
  'unpermute',
  'permuteBackward',
  'unpermuteBackward',
  'sortChunksByIndex',
  'sortChunksByIndexBackward',
  'topk',
  'route',
  'activation',
  'activationBackward',
  'switchLoadBalancingLoss',
  'switchLoadBalancingLossFromLogits',
  'zLoss',
  'routeBackward',
  'matmul',
  'expertsForward',
  'expertsBackward',
] as const;

/** A host tensor's type with its tensors on the GPU. */
export type OnGpu<R> = R extends Tensor<infer D> ? WebGpuTensor<D> : R extends readonly (infer U)[] ? OnGpu<U>[] : R extends object ? { [K in keyof R]: OnGpu<R[K]> } : R;
/** The other way: what `toHost()` gives. */
export type OnHost<R> = R extends WebGpuTensor<infer D> ? Tensor<D> : R extends readonly (infer U)[] ? OnHost<U>[] : R extends object ? { [K in keyof R]: OnHost<R[K]> } : R;

type OpName = { [K in keyof Backend]: Backend[K] extends (...a: never[]) => unknown ? K : never }[keyof Backend];

/** `moe.gpu`: every op of Backend, async, on host or webgpu tensors, returning webgpu tensors. */
export type WebGpuOps = { [K in OpName]: (...args: unknown[]) => Promise<OnGpu<ReturnType<Backend[K]>>> };

export interface WebGpuBackend extends Omit<Backend, 'name'> {
  readonly name: 'webgpu';
  /** The adapter, as backendInfo() describes it. */
  readonly adapter: string;
  /** The async ops on the GPU. */
  readonly gpu: WebGpuOps;
  /** Copies a host tensor into a GPU buffer (int64 is refused: use int32). */
  upload<D extends DType>(tensor: Tensor<D>): WebGpuTensor<D>;
  /** Downloads every webgpu tensor in `value` (a tensor, or an op's result object / array). */
  toHost<R>(value: R): Promise<OnHost<R>>;
  /** Waits until the GPU has done all the work queued so far. */
  synchronize(): Promise<void>;
  /**
   * Bytes held by this backend's live webgpu tensors, and by the buffers it keeps for reuse
   * (those of disposed tensors and of ops' scratch, up to 1 GiB: making a WebGPU buffer costs
   * more than many ops take).
   */
  memory(): { liveBytes: number; cachedBytes: number };
  /** Destroys the buffers kept for reuse (as the cuda backend's releaseCachedMemory, torch.cuda.empty_cache). */
  releaseCachedMemory(): void;
  /**
   * Copies to and from the device so far (calls, bytes; parameter words included) and the
   * host's waits for it (each read-back waits, and synchronize()): as the cuda backend's. The ops
   * that follow this backend's own route / topk / indicesToMultihot / permute on their outputs
   * check them without reading them back.
   */
  transfers(): Transfers;
  /** Destroys the WebGPU device: its tensors are gone and every later GPU op says so. */
  destroy(): void;
}

/** Whether a backend is the webgpu backend (and so has `gpu` and `upload`). */
export function isWebGpuBackend(backend: unknown): backend is WebGpuBackend {
  return typeof backend === 'object' && backend !== null && (backend as { name?: unknown }).name === 'webgpu' && typeof (backend as Partial<WebGpuBackend>).upload === 'function';
}

// ---------------------------------------------------------------------------------------
// Loading

let adapterProbe: Promise<{ adapter?: unknown; reason?: string }> | undefined;

/** Whether this page has a WebGPU adapter (asked once). */
function probeAdapter(): Promise<{ adapter?: unknown; reason?: string }> {
  adapterProbe ??= (async () => {
    const gpu = navigatorGpu();
    if (!gpu) {
      const inNode = typeof process !== 'undefined' && typeof process.versions?.node === 'string' && typeof (globalThis as { window?: unknown }).window === 'undefined';
      return {
        reason: inNode
          ? 'WebGPU is a browser API: Node.js has no navigator.gpu (the webgpu backend runs in browsers)'
          : 'this page has no navigator.gpu (no WebGPU in this browser, or not a secure context)',
      };
    }
    try {
      const adapter = await gpu.requestAdapter();
      return adapter ? { adapter } : { reason: 'navigator.gpu.requestAdapter() found no adapter (Chromium without a GPU needs --enable-unsafe-webgpu for its SwiftShader adapter)' };
    } catch (e) {
      return { reason: `navigator.gpu.requestAdapter() failed: ${(e as Error).message}` };
    }
  })();
  return adapterProbe;
}

export type WebGpuLoaded = { binding: Binding; info: Partial<BackendInfo>; extend: (backend: Backend) => Backend; reason?: undefined } | { binding?: undefined; reason: string };

/**
 * The loader of `createBackend({ prefer: 'webgpu' })`: a fresh wasm instance (the host ops and
 * the validation) plus a fresh WebGPU device, so that a backend whose device was lost is
 * replaced by creating another.
 */
export async function loadWebGpu(wasm?: WasmSource): Promise<WebGpuLoaded> {
  const probe = await probeAdapter();
  if (!probe.adapter) return { reason: probe.reason! };
  const loaded = await loadWasm(wasm);
  if (!loaded.binding) return { reason: `the webgpu backend validates and runs its other ops on wasm, which does not load: ${loaded.reason}` };
  const adapterName = describeAdapter(probe.adapter);
  const info: Partial<BackendInfo> = { device: adapterName, gpuOps: [...WEBGPU_OPS] };
  let device: unknown;
  try {
    // a new adapter per device: an adapter gives one device
    const adapter = (await navigatorGpu().requestAdapter()) ?? probe.adapter;
    device = await (adapter as { requestDevice(d?: unknown): Promise<unknown> }).requestDevice();
  } catch (e) {
    return { reason: `requestDevice() failed: ${(e as Error).message}` };
  }
  const gpu = new Gpu(device, adapterName);
  const binding = loaded.binding;
  return { binding, info, extend: (base) => webgpuBackend(base, gpu, binding) as unknown as Backend };
}

// ---------------------------------------------------------------------------------------
// One GPU op call

const HOST = Symbol('host path');
type Host = typeof HOST;

const DEPTH = 3;

function containsGpu(value: unknown, depth = 0): boolean {
  if (isWebGpuTensor(value)) return true;
  if (depth >= DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value) || isTensor(value)) return false;
  return Object.values(value).some((v) => containsGpu(v, depth + 1));
}

async function toHostDeep(value: unknown, depth = 0): Promise<unknown> {
  if (isWebGpuTensor(value)) return value.download();
  if (depth >= DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value) || isTensor(value)) return value;
  if (Array.isArray(value)) return Promise.all(value.map((v) => toHostDeep(v, depth + 1)));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  const entries = await Promise.all(Object.entries(value).map(async ([k, v]) => [k, await toHostDeep(v, depth + 1)] as const));
  return Object.fromEntries(entries);
}

function toGpuDeep(gpu: Gpu, op: string, value: unknown, depth = 0): unknown {
  if (isTensor(value)) return value.dtype === 'int64' ? value : uploadTensor(gpu, op, value, 'result');
  if (depth >= DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) return value.map((v) => toGpuDeep(gpu, op, v, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toGpuDeep(gpu, op, v, depth + 1)]));
}

/**
 * An options object the shaders understand, or HOST: anything else (not an object, a key this
 * file does not know, such as a typo or an option added to the op later) goes down the host
 * path, where the op's adapter and the core say what is wrong or handle it.
 */
function parse<T>(options: unknown, known: readonly string[]): Partial<T> | Host {
  if (options === undefined || options === null) return {};
  if (typeof options !== 'object' || Array.isArray(options) || Object.getPrototypeOf(options) !== Object.prototype) return HOST;
  return Object.keys(options).every((k) => known.includes(k)) ? (options as Partial<T>) : HOST;
}

interface Meta {
  dtype: DType;
  shape: readonly number[];
}

/** What one GPU op works with: inputs as buffers or host copies, outputs, scratch. */
export class OpCall {
  readonly outputs: GpuTensor[] = [];
  /** Buffers computed from an input device tensor's values, kept with it once the op's work is submitted (`inverse`). */
  readonly derived: { tensor: GpuTensor; key: string; buffers: GPUBuffer[] }[] = [];
  constructor(
    readonly gpu: Gpu,
    readonly op: string,
    readonly scratch: GPUBuffer[],
    /** The backend's stand-in calls that passed (`validateProbe`), by op and exact key. */
    readonly probes: Set<string>,
  ) {}

  meta(value: unknown, arg: string, dtypes: readonly DType[]): Meta {
    if (isWebGpuTensor(value)) {
      value.bufferFor(this.gpu, arg);
      if (!dtypes.includes(value.dtype)) throw new TypeError(`${arg}.dtype: expected ${dtypes.join(' or ')}, got ${value.dtype}`);
      return value;
    }
    return checkTensor(value, arg, dtypes);
  }

  async host<D extends DType>(value: unknown, arg: string, dtypes: readonly D[]): Promise<Tensor<D>> {
    if (isWebGpuTensor(value)) {
      this.meta(value, arg, dtypes);
      return (await value.download()) as Tensor<D>;
    }
    return checkTensor(value, arg, dtypes);
  }

  async optHost<D extends DType>(value: unknown, arg: string, dtypes: readonly D[]): Promise<Tensor<D> | undefined> {
    return value === undefined || value === null ? undefined : this.host(value, arg, dtypes);
  }

  /**
   * For the core's checks, an input whose values they do not look at (float32 probs), or whose
   * values an op of this backend vouched for (`ok`, from its facts): a device tensor becomes
   * zeros of its dtype and shape instead of being read back; a host tensor is itself.
   */
  async checkable<D extends DType>(value: unknown, arg: string, dtypes: readonly D[], ok = true): Promise<Tensor<D>> {
    if (!isWebGpuTensor(value) || !ok) return this.host(value, arg, dtypes);
    return this.zeros(this.meta(value, arg, dtypes)) as Tensor<D>;
  }

  /** Zeros of a dtype and shape (a stand-in for values a check does not look at). */
  zeros(m: Meta): Tensor {
    const n = m.shape.reduce((a, b) => a * b, 1);
    const data = m.dtype === 'float32' ? new Float32Array(n) : m.dtype === 'int32' ? new Int32Array(n) : m.dtype === 'bool' ? new Uint8Array(n) : new Uint16Array(n);
    return { dtype: m.dtype, shape: [...m.shape], data } as unknown as Tensor;
  }

  /**
   * An input for the binding's check functions (`checkPermuteBackward`, ...): with `values`, a
   * host tensor (a device tensor read back), whose values the core checks; without, a device
   * tensor's dtype and shape (a host tensor is still itself: its data costs no transfer).
   */
  async checkArg(value: unknown, arg: string, dtypes: readonly DType[], values: boolean): Promise<Meta | Tensor> {
    return values ? this.host(value, arg, dtypes) : this.meta(value, arg, dtypes);
  }

  async optCheckable<D extends DType>(value: unknown, arg: string, dtypes: readonly D[]): Promise<Tensor<D> | undefined> {
    return value === undefined || value === null ? undefined : this.checkable(value, arg, dtypes);
  }

  /** The GPU buffer of an input (host tensors are uploaded for the call; int64 as int32). */
  buf(value: unknown, arg: string): GPUBuffer {
    if (isWebGpuTensor(value)) return value.bufferFor(this.gpu, arg);
    let t = value as Tensor;
    if (t.dtype === 'int64') t = { dtype: 'int32', shape: t.shape, data: Int32Array.from(t.data as BigInt64Array, (v) => Number(v)) };
    const d = t.data;
    const b = this.gpu.upload(this.op, new Uint8Array(d.buffer, d.byteOffset, d.byteLength), arg);
    this.scratch.push(b);
    return b;
  }

  /** A zeroed output; `whole`: one whose every word the op's shaders write (gather, merge), not cleared first. */
  out<D extends DType>(dtype: D, shape: readonly number[], what: string, whole = false): GpuTensor<D> {
    const n = shape.reduce((a, b) => a * b, 1);
    const bytes = n * BYTES[dtype];
    const t = new GpuTensor(this.gpu, whole ? this.gpu.overwritten(this.op, bytes, what) : this.gpu.buffer(this.op, bytes, what), dtype, shape);
    this.outputs.push(t);
    return t;
  }

  /** An output holding `values` (uploaded, not computed). */
  outWith<D extends DType>(dtype: D, shape: readonly number[], values: ArrayBufferView, what: string): GpuTensor<D> {
    const t = new GpuTensor(this.gpu, this.gpu.upload(this.op, new Uint8Array(values.buffer, values.byteOffset, values.byteLength), what), dtype, shape);
    this.outputs.push(t);
    return t;
  }

  /** Scratch for the op: zeroed, or (`whole`) one whose every word the op's shaders write, not cleared first. */
  tmp(bytes: number, what: string, whole = false): GPUBuffer {
    const b = whole ? this.gpu.overwritten(this.op, bytes, what) : this.gpu.buffer(this.op, bytes, what);
    this.scratch.push(b);
    return b;
  }

  words(values: ArrayLike<number>, what: string): GPUBuffer {
    const b = this.gpu.words(this.op, values, what);
    this.scratch.push(b);
    return b;
  }

  run(key: string, code: string, params: number[], buffers: GPUBuffer[], threads: number, label = key): void {
    this.gpu.dispatch(this.op, key, code, params, buffers, threads, 64, label);
  }

  /**
   * A shader of items (ts/webgpu/activations.ts `itemMain`) in its two passes: `fast(pass)` over
   * every item, then its software float64 twin over the items the fast pass could not decide,
   * dispatched from the list the fast pass wrote (no workgroups where it decided them all).
   * `threads`: the fast pass's invocations, where it does not run one an item.
   */
  runItems(key: string, shader: (pass: Pass) => string, params: number[], buffers: GPUBuffer[], items: number, label = key, threads = items): void {
    if (items === 0) return;
    const list = this.tmp(16 + 4 * items, 'the items to redo');
    this.run(key, shader('fast'), params, [...buffers, list], threads, label);
    this.gpu.dispatchIndirect(this.op, `${key}_soft`, shader('soft'), params, [...buffers, list], list, items, `${label} soft`);
  }

  /** Exclusive scan of `m` u32 values into `out`, or a new scratch `[m + 1]` buffer (one workgroup). */
  scan(values: GPUBuffer, m: number, what: string, out = this.tmp(4 * (m + 1), what, true)): GPUBuffer {
    this.gpu.dispatch(this.op, 'scan', S.SCAN, [m], [values, out], 256, 256);
    return out;
  }

  /**
   * The routing map `[t, e]` counted by chunks of tokens (`cnt [e * chunks]`, expert-major):
   * chunks of at least 16 tokens, as many as keep the count's scan near 16384 values.
   */
  chunkCounts(rm: GPUBuffer, t: number, e: number): { cnt: GPUBuffer; chunk: number; chunks: number } {
    const chunk = Math.max(16, Math.ceil((t * e) / 16384));
    const chunks = Math.ceil(t / chunk);
    const cnt = this.tmp(4 * chunks * e, 'the chunk counts', true);
    this.run('chunk_count', S.CHUNK_COUNT, [t, e, chunk, chunks], [rm, cnt], chunks * e);
    return { cnt, chunk, chunks };
  }

  /** The column counts of the routing map `[t, e]` into `out` (int32 `[e]`). */
  columnCounts(rm: GPUBuffer, t: number, e: number, out: GPUBuffer): void {
    const { cnt, chunks } = this.chunkCounts(rm, t, e);
    this.run('column_sum', S.COLUMN_SUM, [e, chunks], [cnt, out], e);
  }

  /** `[rows, 0]`: a token tensor's stand-in for validation (same dtype and rank-2 rows). */
  standIn(m: Meta): Tensor<TokenDType> {
    const data = m.dtype === 'float32' ? new Float32Array(0) : new Uint16Array(0);
    return { dtype: m.dtype, shape: [m.shape[0], 0], data } as Tensor<TokenDType>;
  }

  /**
   * `validate` for a call on stand-ins that `what` describes exactly (its checkKey: dtypes, shapes,
   * options, the few values the call reads): a pass is remembered for the backend, so the same
   * call again skips the wasm op (as rememberChecks does for the core's check functions); a
   * failure, or a `what` with anything else in it, always runs it.
   */
  validateProbe(what: unknown, f: () => unknown): Host | undefined {
    const key = checkKey(what);
    const k = key === undefined ? undefined : `${this.op}${key}`;
    if (k !== undefined && this.probes.has(k)) return undefined;
    if (this.validate(f) === HOST) return HOST;
    if (k !== undefined) {
      if (this.probes.size >= 1024) this.probes.clear();
      this.probes.add(k);
    }
    return undefined;
  }

  /** Runs the core's validation; a failure sends the op down the host path (the core's own error, on the real data). */
  validate<T>(f: () => T): T | Host {
    try {
      return f();
    } catch {
      return HOST;
    }
  }

  /**
   * The inverse of the slot -> token map `sortedIndices` (its buffer `sorted`, `n` slots, tokens
   * below `t`): `start [t + 1]` and `list [n]` (each token's slots, ascending). A device tensor's
   * is kept with it (derivedBuffers) once this op's work is submitted, and the next op on the
   * same tensor and sizes uses it: the layer's unpermute, permuteBackward and unpermuteBackward
   * on permute's sortedIndices compute it once.
   */
  inverse(sortedIndices: unknown, sorted: GPUBuffer, n: number, t: number): { start: GPUBuffer; list: GPUBuffer } {
    const key = `inverse n=${n} t=${t}`;
    const device = isWebGpuTensor(sortedIndices) ? sortedIndices : undefined;
    const known = device && (derivedBuffers(device, key) ?? this.derived.find((d) => d.tensor === device && d.key === key)?.buffers);
    if (known) return { start: known[0], list: known[1] };
    const what = 'the inverse map';
    const kept = (bytes: number) => (device ? this.gpu.buffer(this.op, bytes, what) : this.tmp(bytes, what));
    const cnt = this.tmp(4 * t, what);
    const cursor = this.tmp(4 * t, what);
    const list = kept(4 * n);
    this.run('inv_count', S.INVERSE_COUNT, [n], [sorted, cnt], n);
    const start = this.scan(cnt, t, what, kept(4 * (t + 1)));
    this.run('inv_fill', S.INVERSE_FILL, [n], [sorted, start, cursor, list], n);
    this.run('inv_sort', S.INVERSE_SORT, [t], [start, list], t);
    if (device) this.derived.push({ tensor: device, key, buffers: [start, list] });
    return { start, list };
  }

  /**
   * `out [t, h] = sum over each token's slots of x[slot] (* p[slot])`: the merge of unpermute and
   * permuteBackward. Writes every word of out (`c.out(..., true)`: no clear needed).
   */
  merge(kind: TokenDType, x: GPUBuffer, start: GPUBuffer, list: GPUBuffer, p: GPUBuffer | undefined, t: number, h: number, out: GPUBuffer): void {
    const per = kind === 'float32' ? 4 : 8;
    const pBuf = p ?? this.tmp(4, 'probs');
    if (h % per === 0) {
      const vecs = (t * h) / per;
      this.run(`merge_vec4_${kind}`, S.mergeVec4(kind), [h, vecs, p ? 1 : 0], [x, start, list, pBuf, out], vecs);
      return;
    }
    const words = tokenWords(kind, t * h);
    this.run(`merge_${kind}`, S.merge(kind), [t * h, h, words, p ? 1 : 0], [x, start, list, pBuf, out], words);
  }

  /** Row gather of a tensor of `dtype`: `rows [R]` of `x [*, h]` into a new `[R, h]` tensor. */
  gather<D extends DType>(x: GPUBuffer, dtype: D, rows: GPUBuffer, r: number, h: number, what: string): GpuTensor<D> {
    // every word of out is written (one thread a word, the last word's unused bits zero)
    const out = this.out(dtype, [r, h], what, true);
    const width = BYTES[dtype] as S.Width;
    if ((h * width) % 16 === 0) {
      const rowWords = (h * width) / 16;
      // 64 threads a workgroup, each 4 of the workgroup's 256 words
      this.run('gather_vec4', S.GATHER_VEC4, [rowWords, r * rowWords], [x, rows, out.bufferFor(this.gpu, what)], Math.ceil((r * rowWords) / 256) * 64);
      return out;
    }
    const words = Math.ceil((r * h * width) / 4);
    this.run(`gather${width}`, S.gatherRows(width), [r * h, h, words], [x, rows, out.bufferFor(this.gpu, what)], words);
    return out;
  }
}

/** A tensor's dtype and shape for the core's check functions (`WireMeta` without data). */
function shapeOf(m: Meta): WireMeta {
  return { dtype: m.dtype, shape: [...m.shape] };
}

/** What `OpCall.checkArg` gave, for the core's check functions: a host tensor's bytes, or a dtype and shape. */
function metaArg(m: Meta | Tensor): WireMeta {
  return 'data' in m && !isWebGpuTensor(m) ? wire(m, 'meta') : shapeOf(m);
}

/** The rank of an argument that has a shape (undefined otherwise: its checks come later, in the op's order). */
function rankOf(value: unknown): number | undefined {
  const shape = (value as { shape?: unknown } | null | undefined)?.shape;
  return Array.isArray(shape) ? shape.length : undefined;
}

function tokenWords(kind: TokenDType, elements: number): number {
  return kind === 'float32' ? elements : Math.ceil(elements / 2);
}

// ---------------------------------------------------------------------------------------
// The backend

/**
 * Wraps the wasm-instance backend `base` with the WebGPU device `gpu`; `binding` is that wasm
 * instance's binding (the core's check functions, which take dtypes and shapes without data).
 */
export function webgpuBackend(base: Backend, gpu: Gpu, binding: Binding): WebGpuBackend {
  const checks = rememberChecks(binding);
  const probes = new Set<string>();
  /** An op with no shader, or a GPU op sent down the host path: inputs downloaded, wasm, results uploaded. */
  async function viaHost(op: string, args: unknown[]): Promise<unknown> {
    gpu.alive(op);
    const hostArgs = (await toHostDeep(args)) as unknown[];
    const f = (base as unknown as Record<string, (...a: unknown[]) => unknown>)[op];
    const out = f(...hostArgs);
    return toGpuDeep(gpu, op, out);
  }

  /** Runs a GPU op: `f` returns its result, or HOST for the host path. */
  async function gpuOp(op: string, args: unknown[], f: (c: OpCall) => Promise<unknown | Host>): Promise<unknown> {
    let c: OpCall | undefined;
    const r = await gpu
      .scoped(op, async (scratch) => {
        c = new OpCall(gpu, op, scratch, probes);
        try {
          return await f(c);
        } catch (e) {
          for (const t of c.outputs) t.dispose();
          // this file's own argument checks, named after the op as the adapters name theirs
          if ((e instanceof TypeError || e instanceof RangeError) && !e.message.startsWith(`${op}: `)) throw new (e.constructor as ErrorConstructor)(`${op}: ${e.message}`);
          throw e;
        }
      })
      .catch((e) => {
        if (c) for (const t of c.outputs) t.dispose();
        // (an error in the op or a WebGPU error after it: what it derived is not kept)
        if (c) for (const d of c.derived.splice(0)) for (const b of d.buffers) gpu.release(b);
        throw e;
      });
    // the work is submitted and raised no WebGPU error: what it derived from its inputs is kept with them
    for (const d of c!.derived.splice(0)) if (!keepDerived(gpu, d.tensor, d.key, d.buffers)) for (const b of d.buffers) gpu.release(b);
    return r === HOST ? viaHost(op, args) : r;
  }

  const c0 = () => ({ gpu, base, gpuOp });
  const kernels: Record<string, (...args: unknown[]) => Promise<unknown>> = {
    tokensPerExpert: (routingMap) =>
      gpuOp('tokensPerExpert', [routingMap], async (c) => {
        const rm = await c.host(routingMap, 'routingMap', ['bool']);
        if (c.validate(() => base.tokensPerExpert(rm)) === HOST || rm.shape.length !== 2) return HOST;
        const [t, e] = rm.shape;
        const out = c.out('int32', [e], 'tokensPerExpert');
        c.columnCounts(c.buf(routingMap, 'routingMap'), t, e, out.bufferFor(gpu, 'out'));
        return out;
      }),

    indicesToMultihot: (indices, probs, numExperts) =>
      gpuOp('indicesToMultihot', [indices, probs, numExperts], async (c) => {
        // route's and topk's indices by their facts (distinct picks per row, or -1), any other read back
        const f = factsOf(indices);
        const picks = f.picks !== undefined && typeof numExperts === 'number' && numExperts >= f.experts! ? f.picks : undefined;
        let idx: Meta;
        if (picks !== undefined) {
          // route's or topk's picks: in range and distinct by their facts, so the core's checks of dtypes and shapes are all
          idx = c.meta(indices, 'indices', INDICES);
          const p = c.meta(probs, 'probs', ['float32']);
          if (c.validate(() => checks.checkIndicesToMultihot({ indices: shapeOf(idx), probs: shapeOf(p), numExperts: numExperts as number })) === HOST || idx.shape.length !== 2) return HOST;
        } else {
          const host = await c.host(indices, 'indices', INDICES);
          const p = await c.checkable(probs, 'probs', ['float32']);
          if (c.validate(() => base.indicesToMultihot(host, p, numExperts as number)) === HOST || host.shape.length !== 2) return HOST;
          idx = host;
        }
        const [t, k] = idx.shape;
        const e = numExperts as number;
        const rm = c.out('bool', [t, e], 'routingMap');
        // the core checked the indices: in range or -1, none twice in a row, so a one per index but -1
        let ones = picks ?? 0;
        if (picks === undefined) {
          const data = (idx as Tensor).data as ArrayLike<number | bigint>;
          for (let i = 0; i < data.length; i++) if (Number(data[i]) !== -1) ones++;
        }
        setFacts(rm, { ones });
        const dense = c.out('float32', [t, e], 'probs');
        const words = Math.ceil((t * e) / 4);
        c.run('i2m', S.INDICES_TO_MULTIHOT, [t, e, k, words], [c.buf(indices, 'indices'), c.buf(probs, 'probs'), rm.bufferFor(gpu, 'rm'), dense.bufferFor(gpu, 'probs')], words);
        return { routingMap: rm, probs: dense };
      }),

    multihotToIndices: (routingMap, options) =>
      gpuOp('multihotToIndices', [routingMap, options], async (c) => {
        const o = parse<{ probs?: unknown; topk?: number }>(options, ['probs', 'topk']);
        if (o === HOST) return HOST;
        const rm = await c.host(routingMap, 'routingMap', ['bool']);
        const p = await c.optHost(o.probs, 'probs', ['float32']);
        const v = c.validate(() => base.multihotToIndices(rm, { probs: p, topk: o.topk }));
        if (v === HOST || rm.shape.length !== 2) return HOST;
        const [t, e] = rm.shape;
        const k = v.indices.shape[1];
        const indices = c.out('int32', [t, k], 'indices');
        const probs = c.out('float32', [t, k], 'probs');
        const pin = o.probs === undefined ? c.tmp(4, 'probs') : c.buf(o.probs, 'probs');
        c.run('m2i', S.MULTIHOT_TO_INDICES, [t, e, k, o.probs === undefined ? 0 : 1], [c.buf(routingMap, 'routingMap'), pin, indices.bufferFor(gpu, 'i'), probs.bufferFor(gpu, 'p')], t);
        return { indices, probs };
      }),

    permute: (tokens, routingMap, options) =>
      gpuOp('permute', [tokens, routingMap, options], async (c) => {
        const o = parse<{ probs?: unknown; numOutTokens?: number; dropAndPad?: boolean }>(options, ['probs', 'numOutTokens', 'dropAndPad']);
        if (o === HOST) return HOST;
        const tm = c.meta(tokens, 'tokens', TOKENS);
        // the map's values are checked: a device map that an op of this backend made by its facts
        // (its ones counted), any other read back; probs only by dtype and shape
        const ones = factsOf(routingMap).ones;
        const rm = ones === undefined ? await c.host(routingMap, 'routingMap', ['bool']) : c.meta(routingMap, 'routingMap', ['bool']);
        const probs = o.probs === undefined ? undefined : c.meta(o.probs, 'probs', ['float32']);
        if (tm.shape.length !== 2 || rm.shape.length !== 2) return HOST;
        const n = c.validate(() =>
          checks.checkPermute({
            tokens: shapeOf(tm),
            routingMap: ones === undefined ? wire(rm, 'routingMap') : shapeOf(rm),
            probs: probs && shapeOf(probs),
            numOutTokens: checkNumber(o.numOutTokens, 'numOutTokens'),
            dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
            numSlots: ones,
          }),
        );
        if (n === HOST) return HOST;
        const [t, h] = tm.shape;
        const e = rm.shape[1];
        const dnp = o.dropAndPad === true;
        const cap = dnp && e > 0 ? n / e : 0;
        const rmBuf = c.buf(routingMap, 'routingMap');
        // written whole by plan_fill (chunk 0's threads write the counts, where there is a token;
        // every slot gets a token, plain or drop-and-pad): not cleared first
        const tpe = dnp ? c.outWith('int32', [e], new Int32Array(e).fill(cap), 'tokensPerExpert') : c.out('int32', [e], 'tokensPerExpert', t > 0);
        const sorted = c.out('int32', [n], 'sortedIndices', true);
        const pprobs = probs ? c.out('float32', [n], 'permutedProbs', true) : undefined;
        // stand-ins where there are no probs (plan_fill reads and writes them only with probs)
        const probsBuf = o.probs === undefined ? c.tmp(4, 'probs', true) : c.buf(o.probs, 'probs');
        const pprobsBuf = pprobs ? pprobs.bufferFor(gpu, 'pp') : c.tmp(4, 'permutedProbs', true);
        const { cnt, chunk, chunks } = c.chunkCounts(rmBuf, t, e);
        const off = c.scan(cnt, chunks * e, 'the plan');
        c.run('plan_fill', S.PLAN_FILL, [t, e, chunk, chunks, dnp ? 1 : 0, cap, probs ? 1 : 0], [rmBuf, off, probsBuf, sorted.bufferFor(gpu, 's'), pprobsBuf, tpe.bufferFor(gpu, 'tpe')], chunks * e);
        const permutedTokens = c.gather(c.buf(tokens, 'tokens'), tm.dtype, sorted.bufferFor(gpu, 's'), n, h, 'permutedTokens');
        const result: Record<string, GpuTensor> = { permutedTokens };
        if (pprobs) result.permutedProbs = pprobs;
        setFacts(sorted, { below: t });
        // the experts' row counts: non-negative, adding up to the slots (expertsForward keeps them on the GPU)
        setFacts(tpe, { total: n });
        result.sortedIndices = sorted;
        result.tokensPerExpert = tpe;
        return result;
      }),

    unpermute: (permutedTokens, sortedIndices, restoreShape, options) =>
      gpuOp('unpermute', [permutedTokens, sortedIndices, restoreShape, options], async (c) => {
        const o = parse<{ probs?: unknown; routingMap?: unknown; dropAndPad?: boolean }>(options, ['probs', 'routingMap', 'dropAndPad']);
        if (o === HOST) return HOST;
        const pm = c.meta(permutedTokens, 'permutedTokens', TOKENS);
        const rs = restoreShape as number[];
        if (!Array.isArray(rs) || rs.length !== 2 || pm.shape.length !== 2 || rs[1] !== pm.shape[1]) return HOST;
        // sortedIndices from this backend's permute: its values are token ids below its T
        const below = factsOf(sortedIndices).below;
        const vouched = below !== undefined && below <= rs[0];
        const dropAndPad = checkBool(o.dropAndPad, 'dropAndPad');
        let probs: Meta | undefined;
        let rm: Tensor<'bool'> | undefined;
        if (o.routingMap === undefined || o.routingMap === null) {
          // no routing map: the core's check function is all the op checks, on sortedIndices' values
          // unless this backend's permute vouches for them, probs by dtype and shape (not the op on
          // stand-ins: 0.38 -> ~0.05 ms of wasm for 16384 host indices on Dawn over SwiftShader)
          probs = o.probs === undefined || o.probs === null ? undefined : c.meta(o.probs, 'probs', ['float32']);
          const si = await c.checkArg(sortedIndices, 'sortedIndices', INDICES, !vouched);
          const checked = c.validate(() => checks.checkUnpermute({ restoreShape: rs, permutedTokens: shapeOf(pm), sortedIndices: metaArg(si), probs: probs && shapeOf(probs), dropAndPad }));
          if (checked === HOST) return HOST;
        } else {
          // the op itself on the inputs' values (zeros stand in for probs, and for vouched-for indices
          // but where [numTokens, numExperts] probs with a plain map make the op check each slot's route)
          const routes = rankOf(o.probs) === 2 && o.routingMap !== undefined && o.routingMap !== null && o.dropAndPad !== true;
          const si = await c.checkable(sortedIndices, 'sortedIndices', INDICES, vouched && !routes);
          probs = await c.optCheckable(o.probs, 'probs', ['float32']);
          rm = await c.optHost(o.routingMap, 'routingMap', ['bool']);
          if (c.validate(() => base.unpermute(c.standIn(pm), si, [rs[0], 0], { probs: probs as Tensor<'float32'> | undefined, routingMap: rm, dropAndPad })) === HOST) return HOST;
        }
        const [n, h] = pm.shape;
        const t = rs[0];
        const sorted = c.buf(sortedIndices, 'sortedIndices');
        const { start, list } = c.inverse(sortedIndices, sorted, n, t);
        const p = slotProbs(c, sorted, n, o.probs, probs, o.routingMap, rm, o.dropAndPad === true);
        const kind = pm.dtype as TokenDType;
        const out = c.out(kind, [t, h], 'output', true);
        c.merge(kind, c.buf(permutedTokens, 'permutedTokens'), start, list, p, t, h, out.bufferFor(gpu, 'o'));
        return out;
      }),

    permuteBackward: (gradPermuted, sortedIndices, numTokens, options) =>
      gpuOp('permuteBackward', [gradPermuted, sortedIndices, numTokens, options], async (c) => {
        const o = parse<{ gradPermutedProbs?: unknown; routingMap?: unknown; dropAndPad?: boolean }>(options, ['gradPermutedProbs', 'routingMap', 'dropAndPad']);
        if (o === HOST) return HOST;
        const gm = c.meta(gradPermuted, 'gradPermuted', TOKENS);
        // a plain routing map placing the probs gradient: each slot's route is the op's own check (its token's row of the map)
        const withProbs = o.gradPermutedProbs !== undefined && o.gradPermutedProbs !== null;
        const routes = withProbs && o.routingMap !== undefined && o.routingMap !== null && o.dropAndPad !== true;
        // permute's slot ids (below its T) are not read back to be checked, but for the routes
        const below = factsOf(sortedIndices).below;
        const si = await c.checkArg(sortedIndices, 'sortedIndices', INDICES, !(below !== undefined && typeof numTokens === 'number' && below <= numTokens) || routes);
        const gpp = withProbs ? c.meta(o.gradPermutedProbs, 'gradPermutedProbs', ['float32']) : undefined;
        // the map's values matter with the probs gradient: a device map an op of this backend made is 0/1 by its facts
        const rm =
          o.routingMap === undefined || o.routingMap === null ? undefined : await c.checkArg(o.routingMap, 'routingMap', ['bool'], routes || (withProbs && factsOf(o.routingMap).ones === undefined));
        if (gm.shape.length !== 2) return HOST;
        const args = { gradPermuted: shapeOf(gm), sortedIndices: metaArg(si), numTokens: numTokens as number, gradPermutedProbs: gpp && shapeOf(gpp), routingMap: rm && metaArg(rm) };
        if (c.validate(() => checks.checkPermuteBackward({ ...args, dropAndPad: checkBool(o.dropAndPad, 'dropAndPad') })) === HOST) return HOST;
        // the routes: the op itself on stand-ins for the float tensors
        if (
          routes &&
          c.validate(() =>
            base.permuteBackward(c.standIn(gm), si as Tensor<'int32'>, args.numTokens, { gradPermutedProbs: c.zeros(gpp!) as Tensor<'float32'>, routingMap: rm as Tensor<'bool'>, dropAndPad: false }),
          ) === HOST
        )
          return HOST;
        const [n, h] = gm.shape;
        const t = numTokens as number;
        const sorted = c.buf(sortedIndices, 'sortedIndices');
        const { start, list } = c.inverse(sortedIndices, sorted, n, t);
        const kind = gm.dtype as TokenDType;
        const gradTokens = c.out(kind, [t, h], 'gradTokens', true);
        c.merge(kind, c.buf(gradPermuted, 'gradPermuted'), start, list, undefined, t, h, gradTokens.bufferFor(gpu, 'g'));
        const result: Record<string, GpuTensor> = { gradTokens };
        if (gpp && rm) {
          const e = rm.shape[1];
          const dnp = o.dropAndPad === true;
          const rmBuf = c.buf(o.routingMap, 'routingMap');
          const counts = c.tmp(4 * e, 'counts');
          if (!dnp) c.columnCounts(rmBuf, rm.shape[0], e, counts);
          const gradProbs = c.out('float32', [t, e], 'gradProbs');
          c.run(
            'scatter_slots',
            S.SCATTER_SLOT_VALUES,
            [t, e, dnp ? 1 : 0, dnp && e > 0 ? n / e : 0],
            [start, list, counts, c.buf(o.gradPermutedProbs, 'gradPermutedProbs'), gradProbs.bufferFor(gpu, 'gp')],
            t,
          );
          result.gradProbs = gradProbs;
        }
        return result;
      }),

    unpermuteBackward: (gradOutput, permutedTokens, sortedIndices, options) =>
      gpuOp('unpermuteBackward', [gradOutput, permutedTokens, sortedIndices, options], async (c) => {
        const o = parse<{ probs?: unknown; routingMap?: unknown; dropAndPad?: boolean }>(options, ['probs', 'routingMap', 'dropAndPad']);
        if (o === HOST) return HOST;
        const gm = c.meta(gradOutput, 'gradOutput', TOKENS);
        const pm = c.meta(permutedTokens, 'permutedTokens', TOKENS);
        // [numTokens, numExperts] probs with a plain routing map: each slot's route is the op's own check
        const dense = rankOf(o.probs) === 2;
        const routes = dense && o.routingMap !== undefined && o.routingMap !== null && o.dropAndPad !== true;
        // permute's slot ids (below its T, the gradient's rows here) are not read back to be checked, but for the routes
        const below = factsOf(sortedIndices).below;
        const si = await c.checkArg(sortedIndices, 'sortedIndices', INDICES, !(below !== undefined && gm.shape.length === 2 && below <= gm.shape[0]) || routes);
        const probs = o.probs === undefined || o.probs === null ? undefined : c.meta(o.probs, 'probs', ['float32']);
        // the map's values matter with dense probs: a device map an op of this backend made is 0/1 by its facts
        const rmArg =
          o.routingMap === undefined || o.routingMap === null ? undefined : await c.checkArg(o.routingMap, 'routingMap', ['bool'], routes || (dense && factsOf(o.routingMap).ones === undefined));
        const rm = rmArg as Meta | undefined;
        if (gm.shape.length !== 2 || pm.shape.length !== 2 || gm.shape[1] !== pm.shape[1] || gm.dtype !== pm.dtype) return HOST;
        const args = { gradOutput: shapeOf(gm), permutedTokens: shapeOf(pm), sortedIndices: metaArg(si), probs: probs && shapeOf(probs), routingMap: rmArg && metaArg(rmArg) };
        if (c.validate(() => checks.checkUnpermuteBackward({ ...args, dropAndPad: checkBool(o.dropAndPad, 'dropAndPad') })) === HOST) return HOST;
        // the routes: the op itself on stand-ins for the float tensors
        if (
          routes &&
          c.validate(() =>
            base.unpermuteBackward(c.standIn(gm), c.standIn(pm), si as Tensor<'int32'>, { probs: c.zeros(probs!) as Tensor<'float32'>, routingMap: rmArg as Tensor<'bool'>, dropAndPad: false }),
          ) === HOST
        )
          return HOST;
        const dnp = o.dropAndPad === true;
        const [n, h] = pm.shape;
        const t = gm.shape[0];
        const sorted = c.buf(sortedIndices, 'sortedIndices');
        const g = c.buf(gradOutput, 'gradOutput');
        if (!probs) return { gradPermuted: c.gather(g, gm.dtype, sorted, n, h, 'gradPermuted') };
        // with probs: gradPermuted = g[token] * p (float32, rounded once); gradProbs = the slots'
        // dot products (software float64), per slot, or summed into (token, expert) as the core does
        const kind = gm.dtype as TokenDType;
        const p = slotProbs(c, sorted, n, o.probs, probs, o.routingMap, rm, dnp === true)!;
        const per = kind === 'float32' ? 4 : 8;
        const vec4 = h % per === 0;
        // every word written (the vec4 shader: every 16 bytes of whole rows)
        const gradPermuted = c.out(kind, [n, h], 'gradPermuted', vec4);
        const gpBuf = gradPermuted.bufferFor(gpu, 'gp');
        if (vec4) c.run(`scale_vec4_${kind}`, S.scaleVec4(kind), [h, (n * h) / per], [g, sorted, p, gpBuf], (n * h) / per);
        else {
          const words = tokenWords(kind, n * h);
          c.run(`scale_${kind}`, S.scaleRows(kind), [n * h, h, words], [g, sorted, p, gpBuf], words);
        }
        const dots = dense ? undefined : c.out('float32', [n], 'gradProbs');
        const dotBuf = dots ? dots.bufferFor(gpu, 'd') : c.tmp(4 * n, 'the slot dots');
        // the slot dots: up to 64 threads a slot (a power of two near h / 16) with integer sums
        // where they decide the float32, the rest in software float64 (shaders.ts slotDot)
        const tpr = 2 ** Math.min(6, Math.max(0, Math.floor(Math.log2(Math.max(h, 1) / 16))));
        const dotShader = (pass: Pass) => S.slotDot(kind, pass === 'fast' ? F64 + F64_ACC : F64 + F64_DOT, pass);
        const dotParams = [n, h, 61 - Math.ceil(Math.log2(Math.max(h, 1))), tpr];
        c.runItems(`slot_dot_${kind}`, dotShader, dotParams, [g, c.buf(permutedTokens, 'permutedTokens'), sorted, dotBuf], n, undefined, n * tpr);
        if (dots) return { gradPermuted, gradProbs: dots };
        const e = rm!.shape[1];
        const counts = c.tmp(4 * e, 'counts');
        if (dnp !== true) c.columnCounts(c.buf(o.routingMap, 'routingMap'), rm!.shape[0], e, counts);
        const { start, list } = c.inverse(sortedIndices, sorted, n, t);
        const gradProbs = c.out('float32', [t, e], 'gradProbs');
        c.run('scatter_slots', S.SCATTER_SLOT_VALUES, [t, e, dnp ? 1 : 0, dnp && e > 0 ? n / e : 0], [start, list, counts, dotBuf, gradProbs.bufferFor(gpu, 'gp')], t);
        return { gradPermuted, gradProbs };
      }),

    sortChunksByIndex: (input, splitSizes, sortedIdxs, probs) =>
      gpuOp('sortChunksByIndex', [input, splitSizes, sortedIdxs, probs], async (c) => {
        const im = c.meta(input, 'input', TOKENS);
        const sizes = await c.host(splitSizes, 'splitSizes', INDICES);
        const order = await c.host(sortedIdxs, 'sortedIdxs', INDICES);
        const p = await c.optHost(probs, 'probs', ['float32']);
        if (im.shape.length !== 2) return HOST;
        if (c.validate(() => base.sortChunksByIndex(c.standIn(im), sizes, order, p)) === HOST) return HOST;
        const rows = chunkRows(sizes, order);
        const rowBuf = c.words(rows, 'the row map');
        const [n, h] = im.shape;
        const output = c.gather(c.buf(input, 'input'), im.dtype, rowBuf, n, h, 'output');
        const result: Record<string, GpuTensor> = { output };
        if (p) result.probs = reshape(c.gather(c.buf(probs, 'probs'), 'float32', rowBuf, n, 1, 'probs'), [n]);
        return result;
      }),

    topk: (values, k) =>
      gpuOp('topk', [values, k], async (c) => {
        const vm = c.meta(values, 'values', ['float32']);
        if (vm.shape.length !== 2) return HOST;
        const [t, e] = vm.shape;
        // the core checks k and the shape on a one-row stand-in; NaN is flagged by the shader
        const probe = { dtype: 'float32', shape: [Math.min(t, 1), e], data: new Float32Array(Math.min(t, 1) * e) } as Tensor<'float32'>;
        if (c.validateProbe({ rows: probe.shape[0], e, k }, () => base.topk(probe, k as number)) === HOST) return HOST;
        const kk = k as number;
        const ov = c.out('float32', [t, kk], 'values');
        const oi = c.out('int32', [t, kk], 'indices');
        const flag = c.tmp(4, 'the NaN flag');
        c.run('topk', S.TOPK, [t, e, kk], [c.buf(values, 'values'), ov.bufferFor(gpu, 'v'), oi.bufferFor(gpu, 'i'), flag], t);
        if (t > 0 && new Uint32Array((await gpu.read('topk', flag, 4)).buffer)[0] !== 0) {
          ov.dispose();
          oi.dispose();
          return HOST;
        }
        setFacts(oi, { picks: t * kk, experts: e });
        return { values: ov, indices: oi };
      }),

    route: (logits, options) =>
      gpuOp('route', [logits, options], async (c) => {
        const o = parse<Record<string, unknown>>(options, ['topk', 'scoreFunction', 'softmaxBeforeTopk', 'expertBias', 'numGroups', 'topkGroups', 'normTopkProb', 'routeScale', 'tokenMask']);
        if (o === HOST) return HOST;
        const lm = c.meta(logits, 'logits', TOKENS);
        const sf = o.scoreFunction ?? 'softmax';
        const code = typeof sf === 'string' && Object.hasOwn(SCORE_FUNCTIONS, sf) ? SCORE_FUNCTIONS[sf] : undefined;
        // an unknown score function (or a shape the shader does not take): the host path, for the core's error
        if (lm.shape.length !== 2 || code === undefined) return HOST;
        const bias = await c.optHost(o.expertBias, 'expertBias', ['float32']);
        const mask = await c.optHost(o.tokenMask, 'tokenMask', ['bool']);
        const [t, e] = lm.shape;
        if (mask && (mask.shape.length !== 1 || mask.shape[0] !== t || (mask.data as Uint8Array).some((v) => v > 1))) return HOST;
        // the core checks the options on a one-row stand-in (its finiteness check is the shader's flag)
        const rows = Math.min(t, 1);
        const probe = { dtype: lm.dtype, shape: [rows, e], data: lm.dtype === 'float32' ? new Float32Array(rows * e) : new Uint16Array(rows * e) } as Tensor<TokenDType>;
        const maskProbe = mask ? ({ dtype: 'bool', shape: [rows], data: (mask.data as Uint8Array).slice(0, rows) } as Tensor<'bool'>) : undefined;
        // what the stand-in call sees: the options, the bias's bits and the mask row's values
        const seen = {
          dtype: lm.dtype,
          rows,
          e,
          options: { ...o, expertBias: bias && Array.from(new Uint32Array((bias.data as Float32Array).slice().buffer)), tokenMask: maskProbe && Array.from(maskProbe.data) },
        };
        if (c.validateProbe(seen, () => base.route(probe, { ...(o as object), expertBias: bias, tokenMask: maskProbe } as Parameters<Backend['route']>[1])) === HOST) return HOST;
        const k = o.topk as number;
        const groups = (o.numGroups as number | undefined) ?? 1;
        const keptGroups = (o.topkGroups as number | undefined) ?? groups;
        const top2 = sf !== 'sigmoid' || bias !== undefined;
        const normalise = o.normTopkProb === true && k > 1;
        const rs = new Uint32Array(new Float64Array([(o.routeScale as number | undefined) ?? 1]).buffer);
        // softmax and sigmoid: the fast pass, then the exact pass over the rows it listed; sqrtsoftplus
        // (and a routeScale that is not a normal float64) the exact pass
        const scale = Math.abs((o.routeScale as number | undefined) ?? 1);
        const margins = code === 4 || !(scale >= 2 ** -1022 && scale < Infinity) ? undefined : routeMargins(e, k);
        // exps [2e], keys [e], group keys [e], weights [2k], the row's max, softmax's sum and its reciprocal [2 + 2 + 2], the max's float32 bits (ts/webgpu/route.ts)
        const stride = 4 * e + 2 * k + 7;
        const biasBits = bias ? Array.from(new Uint32Array((bias.data as Float32Array).slice().buffer)) : [];
        const params = [
          t,
          e,
          k,
          code,
          o.softmaxBeforeTopk === true ? 1 : 0,
          bias ? 1 : 0,
          groups,
          keptGroups,
          top2 ? 1 : 0,
          normalise ? 1 : 0,
          mask ? 1 : 0,
          rs[0],
          rs[1],
          DTYPE_CODES[lm.dtype],
          stride,
          0,
          margins ? 1 : 0,
          margins?.[0] ?? 0,
          margins?.[1] ?? 0,
          ...biasBits,
        ];
        const scores = c.out('float32', [t, e], 'scores');
        const indices = c.out('int32', [t, k], 'indices');
        const weights = c.out('float32', [t, k], 'weights');
        const tpe = c.out('int32', [e], 'tokensPerExpert');
        const scratch = c.tmp(4 * stride * t, 'route scratch');
        // the non-finite flag, then the rows the fast pass leaves to the exact pass:
        // [flag, 0, 0, 0, workgroups x, y, z, n, workgroups x, y, z, 0, rows [t], marks [t]]
        const flag = c.tmp(margins ? 4 * (12 + 2 * t) : 4, 'the non-finite flag and the rows to redo');
        const maskBuf = o.tokenMask === undefined || o.tokenMask === null ? c.tmp(4, 'tokenMask') : c.buf(o.tokenMask, 'tokenMask');
        const bufs = [c.buf(logits, 'logits'), maskBuf, scores.bufferFor(gpu, 's'), indices.bufferFor(gpu, 'i'), weights.bufferFor(gpu, 'w'), scratch, flag];
        const softmax = code === 0 || code === 2;
        // the shader of a phase: the exact pass's, or the fast pass's (a shader a phase)
        const fast = softmax ? (['route_fast', ROUTE_FAST] as const) : (['route_fast_sigmoid', ROUTE_FAST_SIGMOID] as const);
        const run = (phase: number, threads: number, exact: boolean) =>
          exact
            ? c.run(`route_${phase}`, ROUTE[phase - 1], params, bufs, threads, `route phase ${phase}`)
            : c.run(`${fast[0]}_${phase}`, fast[1][phase], params, bufs, threads, `route phase ${phase}`);
        // the phases of the route shader: per token, per (token, expert), per token (softmax's sum), per (token, expert), per token.
        // Phase 0 sets the non-finite flag: it is submitted with the flag's read-back, and the
        // other phases after it, so the op learns the flag (and settles) while they run
        let flagRead: Promise<Uint8Array> | undefined;
        for (const [phase, threads] of routePhases(5, t, e)) {
          if (phase === 2 && !softmax) continue;
          // (phase 0 is always a fast shader's: the exact one only reads the flag's buffer)
          run(phase, threads, !margins && phase > 0);
          if (phase === 0 && t > 0) {
            flagRead = gpu.read('route', flag, 4);
            // (awaited below; a failure before that must not surface as an unhandled rejection)
            flagRead.catch(() => {});
          }
        }
        if (margins) {
          // the list's workgroup counts, then the listed rows again, exactly (no workgroups where there are none)
          run(5, 1, false);
          params[16] = 2;
          for (const phase of [1, 2, 3, 4]) {
            if (phase === 2 && !softmax) continue;
            gpu.dispatchIndirect('route', `route_${phase}`, ROUTE[phase - 1], params, bufs, flag, phase % 2 === 1 ? t * e : t, `route phase ${phase} exact`, phase % 2 === 1 ? 16 : 32);
          }
        }
        c.run('count_picks', COUNT_PICKS, [t * k, e], [indices.bufferFor(gpu, 'i'), tpe.bufferFor(gpu, 'c')], t * k);
        gpu.flush();
        if (flagRead && new Uint32Array((await flagRead).buffer)[0] !== 0) {
          for (const x of [scores, indices, weights, tpe]) x.dispose();
          return HOST;
        }
        // a masked token's picks are -1
        let kept = t;
        if (mask) for (const v of mask.data as Uint8Array) kept -= v === 0 ? 1 : 0;
        setFacts(indices, { picks: kept * k, experts: e });
        setFacts(tpe, { total: kept * k });
        return { weights, indices, scores, tokensPerExpert: tpe };
      }),

    routeBackward: (gradWeights, logits, indices, options) =>
      gpuOp('routeBackward', [gradWeights, logits, indices, options], async (c) => {
        const o = parse<Record<string, unknown>>(options, [
          'topk',
          'scoreFunction',
          'softmaxBeforeTopk',
          'expertBias',
          'numGroups',
          'topkGroups',
          'normTopkProb',
          'routeScale',
          'tokenMask',
          'gradScores',
        ]);
        if (o === HOST) return HOST;
        const lm = c.meta(logits, 'logits', TOKENS);
        const gwm = c.meta(gradWeights, 'gradWeights', ['float32']);
        const im = c.meta(indices, 'indices', INDICES);
        const withScores = o.gradScores !== undefined && o.gradScores !== null;
        const gsm = withScores ? c.meta(o.gradScores, 'gradScores', ['float32']) : undefined;
        const sf = o.scoreFunction ?? 'softmax';
        const code = typeof sf === 'string' && Object.hasOwn(SCORE_FUNCTIONS, sf) ? SCORE_FUNCTIONS[sf] : undefined;
        const k = o.topk;
        if (lm.shape.length !== 2 || code === undefined || typeof k !== 'number') return HOST;
        const [t, e] = lm.shape;
        const rowsOf = (m: Meta, w: number) => m.shape.length === 2 && m.shape[0] === t && m.shape[1] === w;
        if (!rowsOf(gwm, k) || !rowsOf(im, k) || (gsm && !rowsOf(gsm, e))) return HOST;
        // the picks' values: route's or topk's on this backend (in range, distinct, or a row of -1s
        // by their facts); any other indices go down the host path, where the core checks them
        const f = factsOf(indices);
        if (f.picks === undefined || f.experts !== e) return HOST;
        const bias = await c.optHost(o.expertBias, 'expertBias', ['float32']);
        const mask = await c.optHost(o.tokenMask, 'tokenMask', ['bool']);
        if (mask && (mask.shape.length !== 1 || mask.shape[0] !== t || (mask.data as Uint8Array).some((v) => v > 1))) return HOST;
        // the core's checks of the options, bias and mask on one-row stand-ins (a row of -1 picks;
        // the logits' finiteness is the shader's flag)
        const r1 = Math.min(t, 1);
        const zeros = (dtype: DType, w: number) => c.zeros({ dtype, shape: [r1, w] });
        const maskProbe = mask ? ({ dtype: 'bool', shape: [r1], data: (mask.data as Uint8Array).slice(0, r1) } as Tensor<'bool'>) : undefined;
        const seen = {
          dtype: lm.dtype,
          r1,
          e,
          gradScores: withScores,
          options: { ...o, gradScores: undefined, expertBias: bias && Array.from(new Uint32Array((bias.data as Float32Array).slice().buffer)), tokenMask: maskProbe && Array.from(maskProbe.data) },
        };
        const probeIndices = { dtype: 'int32', shape: [r1, k], data: new Int32Array(r1 * k).fill(-1) } as Tensor<'int32'>;
        const probeOptions = { ...(o as object), expertBias: bias, tokenMask: maskProbe, gradScores: withScores ? zeros('float32', e) : undefined } as Parameters<Backend['routeBackward']>[3];
        if (c.validateProbe(seen, () => base.routeBackward(zeros('float32', k) as Tensor<'float32'>, zeros(lm.dtype, e) as Tensor<TokenDType>, probeIndices, probeOptions)) === HOST) return HOST;
        const onLogits = code === 0 && o.softmaxBeforeTopk !== true;
        const rs = new Uint32Array(new Float64Array([(o.routeScale as number | undefined) ?? 1]).buffer);
        // s, gs, gx [2E each], u, gu [2k each], max, sum, dot [2 each] (ts/webgpu/route.ts)
        const stride = 6 * e + 4 * k + 6;
        const params = [t, e, k, code, onLogits ? 1 : 0, 0, 0, 0, 0, o.normTopkProb === true && k > 1 ? 1 : 0, mask ? 1 : 0, rs[0], rs[1], DTYPE_CODES[lm.dtype], stride, 0, withScores ? 1 : 0];
        // the gradient reaches the picks alone (softmax over the picks' logits without scores; sigmoid and
        // sqrtsoftplus without gradScores): phases 1 and 5 over the picks (ROUTE_BACKWARD[6, 7]), the rest of the output +0 as cleared
        const picksOnly = !withScores && (!onLogits ? code !== 0 && code !== 2 : true);
        const gradLogits = c.out('float32', [t, e], 'gradLogits', !picksOnly);
        // word 0: the non-finite flag (a new scratch buffer is zeroed)
        const scratch = c.tmp(4 * (stride * t + 1), 'routeBackward scratch');
        const maskBuf = mask ? c.buf(o.tokenMask, 'tokenMask') : c.tmp(4, 'tokenMask');
        const bufs = [
          c.buf(logits, 'logits'),
          maskBuf,
          c.buf(indices, 'indices'),
          c.buf(gradWeights, 'gradWeights'),
          withScores ? c.buf(o.gradScores, 'gradScores') : c.tmp(4, 'gradScores'),
          gradLogits.bufferFor(gpu, 'g'),
          scratch,
        ];
        const needScores = withScores || !onLogits;
        for (const [phase, threads] of routePhases(6, t, e)) {
          if ((phase === 1 || phase === 2 || phase === 3) && !needScores) continue;
          if ((phase === 2 || phase === 3) && code !== 0 && code !== 2) continue;
          const picks = picksOnly && (phase === 1 || phase === 5);
          const at = picks ? (phase === 1 ? 6 : 7) : phase;
          c.run(`route_backward_${at}`, ROUTE_BACKWARD[at], params, bufs, picks ? t * k : threads, `routeBackward phase ${phase}${picks ? ' (picks)' : ''}`);
        }
        // non-finite logits: the host path, for the core's RangeError
        if (t > 0 && new Uint32Array((await gpu.read('routeBackward', scratch, 4)).buffer)[0] !== 0) {
          gradLogits.dispose();
          return HOST;
        }
        return { gradLogits };
      }),

    activation: (x, options) =>
      gpuOp('activation', [x, options], async (c) => {
        const a = await activationSetup(c, base, x, undefined, options);
        if (a === HOST) return HOST;
        const out = c.out(a.kind, [a.rows, a.inter], 'output');
        const words = tokenWords(a.kind, a.rows * a.inter);
        c.runItems(`act_fwd_${a.kind}`, (pass) => actForward(a.kind, false, pass), [a.rows * a.inter, a.inter, a.width, words, ...a.params], [c.buf(x, 'x'), a.probs, out.bufferFor(gpu, 'o')], words);
        return out;
      }),

    activationBackward: (grad, x, options) =>
      gpuOp('activationBackward', [grad, x, options], async (c) => {
        const a = await activationSetup(c, base, x, grad, options);
        if (a === HOST) return HOST;
        const xBuf = c.buf(x, 'x');
        const gBuf = c.buf(grad, 'grad');
        const gradInput = c.out(a.kind, [a.rows, a.width], 'gradInput');
        const words = tokenWords(a.kind, a.rows * a.width);
        c.runItems(`act_bwd_${a.kind}`, (pass) => actBackward(a.kind, pass), [a.rows * a.width, a.inter, a.width, words, ...a.params], [xBuf, gBuf, a.probs, gradInput.bufferFor(gpu, 'gi')], words);
        const result: Record<string, GpuTensor> = { gradInput };
        if (a.probsShape) {
          const gradProbs = c.out('float32', a.probsShape, 'gradProbs');
          c.runItems(`act_gp_${a.kind}`, (pass) => actGradProbs(a.kind, pass), [a.rows, a.inter, a.width, 0, ...a.params], [xBuf, gBuf, gradProbs.bufferFor(gpu, 'gp')], a.rows);
          result.gradProbs = gradProbs;
        }
        return result;
      }),

    matmul: (a, b, options) => gpuOp('matmul', [a, b, options], async (c) => (await matmulOp(c, checks, a, b, options)) ?? HOST),
    expertsForward: (tokens, counts, weights, options) =>
      gpuOp('expertsForward', [tokens, counts, weights, options], async (c) => (await expertsForwardOp(c, checks, tokens, counts, weights, options)) ?? HOST),
    expertsBackward: (grad, tokens, counts, weights, options) =>
      gpuOp('expertsBackward', [grad, tokens, counts, weights, options], async (c) => (await expertsBackwardOp(c, checks, grad, tokens, counts, weights, options)) ?? HOST),

    switchLoadBalancingLoss: (probs, tokensPerExpert, options) => auxLoss(c0(), 'switchLoadBalancingLoss', 0, [probs, tokensPerExpert, options]),
    switchLoadBalancingLossFromLogits: (logits, tokensPerExpert, options) => auxLoss(c0(), 'switchLoadBalancingLossFromLogits', 1, [logits, tokensPerExpert, options]),
    zLoss: (logits, options) => auxLoss(c0(), 'zLoss', 2, [logits, undefined, options]),

    sortChunksByIndexBackward: (gradOutput, splitSizes, sortedIdxs, gradProbs) =>
      gpuOp('sortChunksByIndexBackward', [gradOutput, splitSizes, sortedIdxs, gradProbs], async (c) => {
        const gm = c.meta(gradOutput, 'gradOutput', TOKENS);
        const sizes = await c.host(splitSizes, 'splitSizes', INDICES);
        const order = await c.host(sortedIdxs, 'sortedIdxs', INDICES);
        const gp = await c.optHost(gradProbs, 'gradProbs', ['float32']);
        if (gm.shape.length !== 2) return HOST;
        if (c.validate(() => base.sortChunksByIndexBackward(c.standIn(gm), sizes, order, gp)) === HOST) return HOST;
        const fwd = chunkRows(sizes, order);
        const inv = new Int32Array(fwd.length);
        fwd.forEach((src, j) => {
          inv[src] = j;
        });
        const rowBuf = c.words(inv, 'the row map');
        const [n, h] = gm.shape;
        const gradInput = c.gather(c.buf(gradOutput, 'gradOutput'), gm.dtype, rowBuf, n, h, 'gradInput');
        const result: Record<string, GpuTensor> = { gradInput };
        if (gp) result.gradProbs = reshape(c.gather(c.buf(gradProbs, 'gradProbs'), 'float32', rowBuf, n, 1, 'gradProbs'), [n]);
        return result;
      }),
  };

  const ops: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
  const b = base as unknown as Record<string, unknown>;
  const wrapped: Record<string, unknown> = {};
  for (const [name, f] of Object.entries(b)) {
    if (typeof f !== 'function') continue;
    ops[name] = kernels[name] ?? ((...args: unknown[]) => viaHost(name, args));
    // the synchronous ops take host tensors only (WebGPU has no synchronous read-back)
    wrapped[name] = (...args: unknown[]) => {
      if (args.some((a) => containsGpu(a))) {
        throw new TypeError(`${name}: got a webgpu tensor; the synchronous ops take host tensors (WebGPU reads back only asynchronously): call await moe.gpu.${name}(...)`);
      }
      return (f as (...a: unknown[]) => unknown)(...args);
    };
  }
  const backend = {
    ...base,
    ...wrapped,
    name: 'webgpu' as const,
    get threads() {
      return base.threads;
    },
    adapter: gpu.adapterName,
    gpu: ops as unknown as WebGpuOps,
    upload<D extends DType>(tensor: Tensor<D>): WebGpuTensor<D> {
      return uploadTensor(gpu, 'upload', tensor, 'tensor');
    },
    toHost<R>(value: R): Promise<OnHost<R>> {
      return toHostDeep(value) as Promise<OnHost<R>>;
    },
    memory() {
      return { liveBytes: gpu.liveBytes, cachedBytes: gpu.cachedBytes };
    },
    releaseCachedMemory() {
      gpu.releaseCached();
    },
    transfers() {
      return { ...gpu.transfers };
    },
    async synchronize() {
      gpu.transfers.synchronizations++;
      gpu.alive('synchronize');
      await gpu.device.queue.onSubmittedWorkDone();
      gpu.alive('synchronize');
    },
    destroy() {
      gpu.device.destroy();
    },
  };
  return backend as unknown as WebGpuBackend;
}

const CHECKS = ['checkIndicesToMultihot', 'checkPermute', 'checkUnpermute', 'checkPermuteBackward', 'checkUnpermuteBackward', 'checkMatmul', 'checkExperts'] as const;
type Checks = Pick<Binding, (typeof CHECKS)[number]>;

/**
 * The core's check functions of `binding`, each outcome that passed remembered: the checks are
 * pure functions of their argument object, so one made only of dtypes, shapes, numbers and flags
 * (no tensor data) that passed once passes again with the same result, without the wasm call
 * (reading the object field by field through the binding: ~25 us of a ~0.2 ms device-input
 * call on Dawn over SwiftShader). Arguments with data and failures are never remembered: they
 * run the check (a failure then sends the op down the host path, the core's own error).
 */
function rememberChecks(binding: Binding): Checks {
  const passed = new Map<string, unknown>();
  const out: Record<string, (args: unknown) => unknown> = {};
  for (const name of CHECKS) {
    const f = (binding as unknown as Record<string, (args: unknown) => unknown>)[name];
    out[name] = (args: unknown) => {
      const key = checkKey(args);
      if (key === undefined) return f(args);
      const k = `${name}${key}`;
      if (passed.has(k)) return passed.get(k);
      const r = f(args);
      if (typeof r !== 'object' || r === null) {
        if (passed.size >= 1024) passed.clear();
        passed.set(k, r);
      }
      return r;
    };
  }
  return out as unknown as Checks;
}

/**
 * An exact key of a check's argument object (plain objects, arrays, numbers with -0 and NaN kept
 * apart, strings, flags, null, undefined), or undefined where it holds anything else (tensor data).
 */
export function checkKey(v: unknown): string | undefined {
  switch (typeof v) {
    case 'undefined':
      return 'u';
    case 'number':
      return Object.is(v, -0) ? '-0' : String(v);
    case 'boolean':
      return v ? 't' : 'f';
    case 'string':
      return JSON.stringify(v);
    case 'object':
      break;
    default:
      return undefined;
  }
  if (v === null) return 'n';
  // built by concatenation (a key a call: this runs on every op); identifier keys unquoted (they
  // hold no ':' or ','), any other key quoted
  let s: string;
  if (Array.isArray(v)) {
    s = '[';
    for (let i = 0; i < v.length; i++) {
      const p = checkKey(v[i]);
      if (p === undefined) return undefined;
      s += i === 0 ? p : `,${p}`;
    }
    return `${s}]`;
  }
  if (Object.getPrototypeOf(v) !== Object.prototype) return undefined;
  s = '{';
  for (const key in v) {
    if (!Object.hasOwn(v, key)) continue;
    const p = checkKey((v as Record<string, unknown>)[key]);
    if (p === undefined) return undefined;
    s += `${s.length > 1 ? ',' : ''}${IDENTIFIER.test(key) ? key : JSON.stringify(key)}:${p}`;
  }
  return `${s}}`;
}

const IDENTIFIER = /^[A-Za-z_$][\w$]*$/;

/**
 * The aux losses (mode 0: switchLoadBalancingLoss on probs, 1: from logits, 2: zLoss): rows on
 * the GPU, the per-row terms added on the host in the core's blocks of tokens (JavaScript numbers
 * are IEEE float64, as the core's sums), the loss scaled as the core scales it.
 */
function auxLoss(
  ctx: { gpu: Gpu; base: Backend; gpuOp(op: string, args: unknown[], f: (c: OpCall) => Promise<unknown>): Promise<unknown> },
  op: string,
  mode: number,
  args: unknown[],
): Promise<unknown> {
  const [x, tpeArg, options] = args;
  const { gpu, base } = ctx;
  const callArgs = mode === 2 ? [x, options] : args;
  return ctx.gpuOp(op, callArgs, async (c) => {
    const o = parse<Record<string, unknown>>(options, mode === 2 ? ['coeff', 'tokenMask'] : ['topk', 'coeff', 'numTokens', 'tokenMask']);
    if (o === HOST) return HOST;
    const xm = c.meta(x, mode === 0 ? 'probs' : 'logits', ['float32']);
    if (xm.shape.length !== 2) return HOST;
    const [t, e] = xm.shape;
    const tpe = mode === 2 ? undefined : await c.host(tpeArg, 'tokensPerExpert', INDICES);
    const mask = await c.optHost(o.tokenMask, 'tokenMask', ['bool']);
    if (mask && (mask.shape.length !== 1 || mask.shape[0] !== t || (mask.data as Uint8Array).some((v) => v > 1))) return HOST;
    const r1 = Math.min(t, 1);
    const probe = { dtype: 'float32', shape: [r1, e], data: new Float32Array(r1 * e) } as Tensor<'float32'>;
    const opts = { ...o, tokenMask: mask ? ({ dtype: 'bool', shape: [r1], data: (mask.data as Uint8Array).slice(0, r1) } as Tensor<'bool'>) : undefined };
    const b = base as unknown as Record<string, (...a: unknown[]) => unknown>;
    // what the stand-in call sees: the counts' values, the options, the mask row (int64 counts: checked every call)
    const probeCall = () => (mode === 2 ? b.zLoss(probe, opts) : b[op](probe, tpe, opts));
    const seen = {
      mode,
      r1,
      e,
      tpe: tpe && { shape: tpe.shape, data: Array.from(tpe.data as Int32Array) },
      options: { ...o, tokenMask: opts.tokenMask && Array.from(opts.tokenMask.data as Uint8Array) },
    };
    if ((tpe?.dtype === 'int64' ? c.validate(probeCall) : c.validateProbe(seen, probeCall)) === HOST) return HOST;
    // the core's factor E * coeff / (k * N^2) and 2 * coeff / N, in its order
    const valid = mask ? (mask.data as Uint8Array).reduce((a, v) => a + (v !== 0 ? 1 : 0), 0) : t;
    const coeff = (o.coeff as number | undefined) ?? 1;
    const n = mode === 2 ? Math.max(valid, 1) : ((o.numTokens as number | undefined) ?? Math.max(valid, 1));
    const factor = mode === 2 ? 0 : (e * coeff) / ((o.topk as number) * n * n);
    const twoCoeffN = (2 * coeff) / n;
    const bits = new Uint32Array(new Float64Array([factor, twoCoeffN]).buffer);
    const counts = new Float64Array(e);
    if (tpe) for (let i = 0; i < e; i++) counts[i] = Number((tpe.data as Int32Array | BigInt64Array)[i]);
    const grad = c.out('float32', [t, e], mode === 0 ? 'gradProbs' : 'gradLogits');
    // the non-finite flag (word 0) and the row terms (float64, from word 2): one read
    const out = c.tmp(8 + 8 * t, 'the non-finite flag and the row terms');
    const maskBuf = mask ? c.buf(o.tokenMask, 'tokenMask') : c.tmp(4, 'tokenMask');
    const params = [t, e, mode, mask ? 1 : 0, bits[0], bits[1], bits[2], bits[3]];
    const bufs = [c.buf(x, 'x'), maskBuf, c.words(new Uint32Array(counts.buffer), 'counts'), grad.bufferFor(gpu, 'g'), out, c.tmp(mode === 0 ? 4 : 4 * t * (2 * e + 6), 'the exps')];
    // phases: per token, per (token, expert), per token, per (token, expert) (mode 0: the first alone)
    for (const [phase, threads] of mode === 0 ? [[0, t]] : routePhases(4, t, e)) {
      c.run(`aux_loss_${phase}`, AUX_LOSS[phase], params, bufs, threads, `${op} phase ${phase}`);
    }
    const read = t > 0 ? await gpu.read(op, out, 8 + 8 * t) : new Uint8Array(8);
    if (new Uint32Array(read.buffer, 0, 1)[0] !== 0) {
      grad.dispose();
      return HOST;
    }
    const rows = new Float64Array(read.buffer, 8, t);
    const m = mask?.data as Uint8Array | undefined;
    // mode 0: from 0.0; modes 1, 2: from -0.0 (Rust's f64 sum())
    const total = blockedTotal(rows, m, mode === 0 ? 0 : -0);
    const loss = mode === 2 ? (coeff * total) / n : total * factor;
    return mode === 0 ? { loss, gradProbs: grad } : { loss, gradLogits: grad };
  });
}

interface ActivationSetup {
  kind: TokenDType;
  rows: number;
  width: number;
  inter: number;
  /** [kind, layout, alpha, limit, linearOffset (float32 bits), withProbs]. */
  params: number[];
  probs: GPUBuffer;
  probsShape?: number[];
}

/** The checks and parameters of activation / activationBackward (`grad` given: the backward). */
async function activationSetup(c: OpCall, base: Backend, x: unknown, grad: unknown, options: unknown): Promise<ActivationSetup | Host> {
  const o = parse<Record<string, unknown>>(options, ['kind', 'probs', 'alpha', 'limit', 'linearOffset']);
  if (o === HOST) return HOST;
  const xm = c.meta(x, 'x', TOKENS);
  const code = activationCode(o.kind);
  if (xm.shape.length !== 2 || code === undefined) return HOST;
  const [rows, width] = xm.shape;
  const inter = code[1] === 2 ? width : width / 2;
  const probs = await c.optHost(o.probs, 'probs', ['float32']);
  if (probs && !((probs.shape.length === 1 && probs.shape[0] === rows) || (probs.shape.length === 2 && probs.shape[0] === rows && probs.shape[1] === 1))) return HOST;
  const gm = grad === undefined ? undefined : c.meta(grad, 'grad', TOKENS);
  if (gm && (gm.dtype !== xm.dtype || gm.shape.length !== 2 || gm.shape[0] !== rows || gm.shape[1] !== inter)) return HOST;
  // the core checks the kind, the options and x's width on one-row stand-ins
  const r1 = Math.min(rows, 1);
  const zeros = (w: number) => ({ dtype: xm.dtype, shape: [r1, w], data: xm.dtype === 'float32' ? new Float32Array(r1 * w) : new Uint16Array(r1 * w) }) as Tensor<TokenDType>;
  const p1 = probs ? ({ dtype: 'float32', shape: probs.shape.length === 1 ? [r1] : [r1, 1], data: new Float32Array(r1) } as Tensor<'float32'>) : undefined;
  const opts = { ...(o as object), probs: p1 } as Parameters<Backend['activation']>[1];
  // what the stand-in call sees: zeros of x's and grad's widths, the options (probs: zeros of a shape)
  const seen = { backward: gm !== undefined, dtype: xm.dtype, r1, width, options: { ...o, probs: p1?.shape } };
  if (c.validateProbe(seen, () => (gm ? base.activationBackward(zeros(Number.isInteger(inter) ? inter : 0), zeros(width), opts) : base.activation(zeros(width), opts))) === HOST) return HOST;
  return {
    kind: xm.dtype as TokenDType,
    rows,
    width,
    inter,
    params: activationParams(code, o, probs !== undefined),
    probs: probs ? c.buf(o.probs, 'probs') : c.tmp(4, 'probs'),
    probsShape: probs ? [...probs.shape] : undefined,
  };
}

/** The phases of route's and routeBackward's shaders and their threads: even ones one a token, odd ones one a (token, expert). */
function routePhases(n: number, t: number, e: number): [phase: number, threads: number][] {
  return Array.from({ length: n }, (_, i) => [i, i % 2 === 1 ? t * e : t]);
}

const SCORE_FUNCTIONS: Record<string, number> = { softmax: 0, sigmoid: 1, softmax_with_bias: 2, sigmoid_with_bias: 3, sqrtsoftplus: 4 };
const DTYPE_CODES: Record<string, number> = { float32: 0, bfloat16: 1, float16: 2 };

/** Per-slot probabilities of unpermute as a buffer (undefined without probs). */
function slotProbs(c: OpCall, sorted: GPUBuffer, n: number, probsArg: unknown, probs: Meta | undefined, rmArg: unknown, rm: Meta | undefined, dnp: boolean): GPUBuffer | undefined {
  if (!probs) return undefined;
  if (probs.shape.length !== 2) return c.buf(probsArg, 'probs');
  const e = rm!.shape[1];
  const counts = c.tmp(4 * e, 'counts');
  const rmBuf = c.buf(rmArg, 'routingMap');
  if (!dnp) c.columnCounts(rmBuf, rm!.shape[0], e, counts);
  const p = c.tmp(4 * n, 'slot probs');
  c.run('slot_probs', S.SLOT_PROBS, [n, e, dnp ? 1 : 0, dnp && e > 0 ? n / e : 0], [sorted, counts, c.buf(probsArg, 'probs'), p], n);
  return p;
}

/** For sortChunksByIndex: the input row of each output row. */
function chunkRows(sizes: Tensor, order: Tensor): Int32Array {
  const sz = Array.from(sizes.data as ArrayLike<number | bigint>, Number);
  const starts: number[] = [];
  let s = 0;
  for (const v of sz) {
    starts.push(s);
    s += v;
  }
  const rows = new Int32Array(s);
  let j = 0;
  for (const c of Array.from(order.data as ArrayLike<number | bigint>, Number)) for (let r = 0; r < sz[c]; r++) rows[j++] = starts[c] + r;
  return rows;
}

/** The same buffer with another shape of the same size (the tensor object is re-made). */
function reshape<D extends DType>(t: GpuTensor<D>, shape: number[]): GpuTensor<D> {
  Object.defineProperty(t, 'shape', { value: Object.freeze([...shape]) });
  return t;
}
