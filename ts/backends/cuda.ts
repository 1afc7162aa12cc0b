/**
 * The CUDA backend: the native addon's GPU functions (`cudaInfo`, `cuda*Device`, from
 * crates/moe-node/src/cuda*.rs over crates/moe-cuda).
 *
 * Every op takes host tensors or device tensors (`upload()`). With host tensors only, an op
 * returns host results: the GPU ops of `CUDA_GPU_OPS` upload, run and download; the others run on
 * the CPU core of the same addon. With any device tensor, the result is device tensors: the ops
 * of `CUDA_GPU_OPS` and of the families in `GPU_FAMILIES` (cuda-activations.ts, cuda-layout.ts,
 * cuda-experts.ts, cuda-train.ts) run on the GPU; any other op downloads its inputs, runs on the CPU core and
 * uploads its results. `backendInfo().gpuOps` lists the ops that run on the GPU.
 *
 * Available only where the addon's `cudaInfo()` opens a GPU and loads the kernels; otherwise
 * the reason it gives ("libcuda.so.1 not found ...", "the NVIDIA driver sees no CUDA device",
 * an NVRTC error). `MOE_DISPATCH_CUDA=0` turns the backend off.
 */
import type { Backend, BackendInfo, Binding, PermuteBackwardOptions, PermuteOptions, UnpermuteOptions } from '../backend.js';
import type { UnpermuteArgs } from '../generated/binding.js';
import { ARGUMENT_DEPTH, containsDeviceTensor, isDeviceTensor, rethrowNative, wrapDevice, type AnyTensor, type DeviceTensor, type NativeCudaTensor } from '../device.js';
import { isTensor } from '../tensor.js';
import { activationsGpu, type CudaActivationsOps } from './cuda-activations.js';
import { anyDevice, callWith, noDeviceOut, optionValue, wrapResult, type Addon, type DeviceFn, type GpuContext, type GpuFamily, type Handles, type OnDevice } from './cuda-common.js';
import { expertsGpu, type CudaExpertsOps } from './cuda-experts.js';
import { trainGpu, type CudaTrainOps } from './cuda-train.js';
import { layoutGpu, type CudaLayoutOps } from './cuda-layout.js';
import { ROUTE_KEYS, routeArgs, type RouteOptions } from '../ops/routing.js';
import type { DType, IndexDType, Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkNumber, checkOptions, TOKENS, wire } from '../wire.js';
import { loadNative, type Loaded } from './native.js';

/**
 * The GPU ops of this file (the other families add theirs). permuteBackward and
 * unpermuteBackward run on the GPU for device tensors (host tensors: on the CPU core).
 */
export const CUDA_GPU_OPS = ['permute', 'unpermute', 'route', 'topk', 'permuteBackward', 'unpermuteBackward'] as const;

/** The other families of GPU ops (each in its own file), merged over the CPU ops. */
export const GPU_FAMILIES: readonly GpuFamily[] = [activationsGpu, layoutGpu, expertsGpu, trainGpu];

/** Every op that runs on the GPU with this addon. */
export function gpuOps(addon: object): string[] {
  return [...CUDA_GPU_OPS, ...GPU_FAMILIES.filter((f) => f.present(addon as Addon)).flatMap((f) => f.ops)];
}

/** What the addon's `cudaInfo()` returns (napi-rs gives `null` for absent fields). */
export interface CudaInfo {
  available: boolean;
  reason?: string | null;
  device?: string | null;
  computeCapability?: string | null;
  driverVersion?: string | null;
  totalMemory?: number | null;
  kernels?: string | null;
  /** Whether kernels are queued as programmatic dependent launches (Hopper and later, with `MOE_DISPATCH_PDL=on`). */
  programmaticLaunch?: boolean | null;
}

/** The addon's GPU exports (crates/moe-node/src/cuda.rs): the ops' argument objects, as the CPU bindings take them. */
export interface CudaExports {
  cudaInfo(): CudaInfo;
  // Host tensors: the CPU binding's functions (the same argument objects and results), on the GPU.
  cudaPermute: Binding['permute'];
  cudaUnpermute: Binding['unpermute'];
  cudaRoute: Binding['route'];
  cudaTopk: Binding['topk'];
  cudaUpload(tensor: ReturnType<typeof wire>): NativeCudaTensor;
  cudaSynchronize(): void;
  cudaExpertsGatherOnLoad(): boolean;
  cudaMemory(): CudaMemory;
  cudaReleaseCachedMemory(): void;
  cudaTimelineStart(): void;
  cudaTimelineStop(): CudaTimeline;
  // Device tensors: the same argument objects with device handles (caller-owned outputs are the host path's).
  cudaPermuteDevice: DeviceFn<'permute'>;
  cudaUnpermuteDevice: (args: OnDevice<UnpermuteArgs>) => NativeCudaTensor;
  cudaRouteDevice: (args: Parameters<DeviceFn<'route', { lazyCheck: boolean }>>[0]) => ReturnType<DeviceFn<'route'>> & { check?: NativeRouteCheck };
  cudaTopkDevice: DeviceFn<'topk'>;
  cudaPermuteBackwardDevice: DeviceFn<'permuteBackward'>;
  cudaUnpermuteBackwardDevice: DeviceFn<'unpermuteBackward'>;
}

/** Device memory: bytes and buffers this process holds now (device tensors and scratch), and the driver's free and total bytes. */
export interface CudaMemory {
  liveBytes: number;
  liveBuffers: number;
  /** Memory of freed tensors that the GPU's memory pool keeps for the next ones (`releaseCachedMemory()` returns it). */
  cachedBytes: number;
  freeBytes: number;
  totalBytes: number;
}

/** One piece of work queued on the GPU's stream, in ms from the timeline's start (`CudaBackend.timeline`). */
export interface CudaTimelineSpan {
  /** The kernel's name; `cublas: ...`, `memset ...`, `copy ...` for the other work. */
  name: string;
  /** When the GPU reached its start and its end. */
  startMs: number;
  endMs: number;
  /** When the host queued it (the host's clock from the timeline's start): a span starting just after it was queued waited for the host. */
  queuedMs: number;
}

/** What `CudaBackend.timeline` recorded: the spans in the order queued, and the host's waits for the GPU (the host's clock). */
export interface CudaTimeline {
  spans: CudaTimelineSpan[];
  waits: { what: string; startMs: number; endMs: number }[];
}

/** A loaded backend plus what `backendInfo()` adds for it. */
export type CudaLoaded = Loaded & { info?: Partial<BackendInfo>; extend?: (backend: Backend) => Backend };

let cached: CudaLoaded | undefined;

export function loadCuda(): CudaLoaded {
  cached ??= probe();
  return cached;
}

/** The cuda backend of this process's addon, or why there is none. */
function probe(): CudaLoaded {
  const off = typeof process !== 'undefined' ? process.env?.MOE_DISPATCH_CUDA : undefined;
  if (off === '0' || off === 'off') return { reason: `turned off by MOE_DISPATCH_CUDA=${off}` };
  const native = loadNative();
  if (!native.binding) return { reason: `the CUDA backend is part of the native addon, which does not load: ${native.reason}` };
  const addon = native.binding as Binding & Partial<CudaExports>;
  if (typeof addon.cudaInfo !== 'function' || typeof addon.cudaPermute !== 'function' || typeof addon.cudaPermuteDevice !== 'function' || typeof addon.cudaRoute !== 'function') {
    return { reason: 'the native addon was built without the CUDA backend (rebuild it: npm run build:native)' };
  }
  let info: CudaInfo;
  try {
    info = addon.cudaInfo();
  } catch (e) {
    return { reason: `cudaInfo() failed: ${(e as Error).message}` };
  }
  if (!info.available) return { reason: info.reason || 'cudaInfo() reports CUDA unavailable and gives no reason' };
  const gpu = addon as Binding & CudaExports;
  // the ops whose host calls run on the GPU take the CPU ops' argument objects as they are
  const binding: Binding = { ...addon, permute: gpu.cudaPermute, unpermute: gpu.cudaUnpermute, route: gpu.cudaRoute, topk: gpu.cudaTopk };
  const device = [
    info.device,
    info.computeCapability && `compute capability ${info.computeCapability}`,
    info.driverVersion && `driver CUDA ${info.driverVersion}`,
    info.programmaticLaunch && 'programmatic dependent launch',
  ]
    .filter(Boolean)
    .join(', ');
  const extend = (backend: Backend) => cudaBackend(backend, gpu) as unknown as Backend;
  return { binding, extend, info: { device, gpuOps: gpuOps(addon), kernels: info.kernels ?? undefined } };
}

// ---------------------------------------------------------------------------------------
// Device tensors

export type { AnyTensor };

/** permute's options with device tensors allowed. */
export interface DevicePermuteOptions extends Omit<PermuteOptions, 'probs'> {
  probs?: AnyTensor<'float32'>;
}

/** permute's result on the GPU. `sortedIndices` carries the plan that unpermute reuses. */
export interface DevicePermuteResult<D extends TokenDType = TokenDType> {
  permutedTokens: DeviceTensor<D>;
  permutedProbs?: DeviceTensor<'float32'>;
  sortedIndices: DeviceTensor<'int32'>;
  tokensPerExpert: DeviceTensor<'int32'>;
}

/** unpermute's options with device tensors allowed. */
export interface DeviceUnpermuteOptions extends Omit<UnpermuteOptions, 'probs' | 'routingMap'> {
  probs?: AnyTensor<'float32'>;
  routingMap?: AnyTensor<'bool'>;
}

/** route's options with device tensors allowed. */
export interface DeviceRouteOptions extends Omit<RouteOptions, 'expertBias' | 'tokenMask'> {
  expertBias?: AnyTensor<'float32'>;
  tokenMask?: AnyTensor<'bool'>;
  /**
   * Device logits only: return without waiting for the route kernel's check of the values (a
   * non-finite logit or bias), which the result's `check()` reads later. The kernel picks k
   * distinct experts a row whatever the values, so work queued on the results before `check()`
   * is safe, but the results are to be trusted only once `check()` has returned. route otherwise
   * waits for the GPU once, right after its kernel; the layer's forward checks at its end.
   */
  lazyCheck?: boolean;
}

/** routeBackward's options with device tensors allowed. */
export interface DeviceRouteBackwardOptions extends DeviceRouteOptions {
  gradScores?: AnyTensor<'float32'>;
}

export interface DeviceRouteResult {
  weights: DeviceTensor<'float32'>;
  indices: DeviceTensor<'int32'>;
  scores: DeviceTensor<'float32'>;
  tokensPerExpert: DeviceTensor<'int32'>;
  /**
   * With `lazyCheck`: waits for the route kernel (not the work queued after it) and throws the
   * error route without lazyCheck throws for these arguments (the core's, naming the first
   * non-finite logit or bias), if any. Idempotent: later calls return (or throw) the same.
   */
  check?: () => void;
}

/**
 * The cuda backend: a Backend whose GPU ops (`CUDA_GPU_OPS`) also take device tensors. With
 * host tensors only, an op uploads them and downloads its results (host in, host out); with at
 * least one device tensor among its tensor arguments, the host ones are uploaded (and freed
 * after the call) and every result is a device tensor.
 */
/** permuteBackward's options with device tensors allowed. */
export interface DevicePermuteBackwardOptions extends Omit<PermuteBackwardOptions, 'gradPermutedProbs' | 'routingMap'> {
  gradPermutedProbs?: AnyTensor<'float32'>;
  routingMap?: AnyTensor<'bool'>;
}

export interface CudaBackend
  extends Omit<
      Backend,
      'name' | 'permute' | 'unpermute' | 'route' | 'routeBackward' | 'topk' | 'permuteBackward' | 'unpermuteBackward' | keyof CudaActivationsOps | keyof CudaLayoutOps | keyof CudaExpertsOps
    >,
    CudaActivationsOps,
    CudaLayoutOps,
    CudaExpertsOps,
    CudaTrainOps {
  readonly name: 'cuda';
  /** Copies a host tensor to the GPU (int64 is not kept on the GPU: use int32). */
  upload<D extends DType>(tensor: Tensor<D>): DeviceTensor<D>;
  /** Waits until every queued kernel has finished. */
  synchronize(): void;
  /**
   * Whether `expertsForward` / `expertsBackward` with `gatherIndices` read the experts' rows
   * through the indices on this GPU (our Hopper grouped GEMM, the default unless
   * `MOE_DISPATCH_EXPERTS_GEMM=cublas`, and `MOE_DISPATCH_GG_FUSE=gather`; bfloat16 tokens and weights, no expert biases), so that the
   * forward makes and keeps no permuted copy of the tokens (the backward's dW1 copies its rows out
   * while it runs, or gathers too with `gather,gather-wgrad`). `MoELayer` asks it to leave
   * that copy out.
   */
  expertsGatherOnLoad(): boolean;
  /** Device memory held by this process's tensors, the pool's cached memory, and the GPU's free and total memory. */
  memory(): CudaMemory;
  /**
   * Waits for the GPU, then returns the memory that freed tensors left in the memory pool to the
   * driver (as PyTorch's `torch.cuda.empty_cache()`). The pool keeps it so that the next ops'
   * tensors reuse it; on an H200 the fine-grained experts' GEMMs ran at 62-67% of the bf16 rate
   * in a process whose pool still held a Mixtral-sized layer's memory, 72-82% once it was
   * released (docs/gpu-report.md): call it when the shapes a process runs change.
   */
  releaseCachedMemory(): void;
  /**
   * Runs `run` (synchronous: a forward, a backward, a training step) and records a timeline of
   * the work it queues on the GPU: every kernel, cuBLAS call, memset and copy between two timing
   * events, with when the host queued it, and every wait of the host. Waits for the GPU before and
   * after. Where a step's time goes in a real run (ncu times each kernel alone on a resting GPU);
   * the events add about a microsecond a span. Work on the side streams (the weight gradients
   * beside the token-side GEMMs) shows as the main stream's wait for it. Not nestable.
   */
  timeline<T>(run: () => T): { result: T; timeline: CudaTimeline };
  permute<D extends TokenDType>(tokens: Tensor<D>, routingMap: Tensor<'bool'>, options?: PermuteOptions): ReturnType<Backend['permute']> & { permutedTokens: Tensor<D> };
  permute<D extends TokenDType>(tokens: AnyTensor<D>, routingMap: AnyTensor<'bool'>, options?: DevicePermuteOptions): DevicePermuteResult<D>;
  unpermute<D extends TokenDType>(permutedTokens: Tensor<D>, sortedIndices: Tensor<IndexDType>, restoreShape: readonly [number, number], options?: UnpermuteOptions): Tensor<D>;
  unpermute<D extends TokenDType>(permutedTokens: AnyTensor<D>, sortedIndices: AnyTensor<'int32'>, restoreShape: readonly [number, number], options?: DeviceUnpermuteOptions): DeviceTensor<D>;
  route(logits: Tensor<TokenDType>, options: RouteOptions): ReturnType<Backend['route']>;
  route(logits: AnyTensor<TokenDType>, options: DeviceRouteOptions): DeviceRouteResult;
  /** With device tensors: one kernel (kernels/routing.cu), the CPU core's bits. */
  routeBackward(
    gradWeights: Tensor<'float32'>,
    logits: Tensor<TokenDType>,
    indices: Tensor<IndexDType>,
    options: RouteOptions & { gradScores?: Tensor<'float32'> },
  ): ReturnType<Backend['routeBackward']>;
  routeBackward(gradWeights: AnyTensor<'float32'>, logits: AnyTensor<TokenDType>, indices: AnyTensor<'int32'>, options: DeviceRouteBackwardOptions): { gradLogits: DeviceTensor<'float32'> };
  topk(values: Tensor<'float32'>, k: number): ReturnType<Backend['topk']>;
  topk(values: AnyTensor<'float32'>, k: number): { values: DeviceTensor<'float32'>; indices: DeviceTensor<'int32'> };
  permuteBackward<D extends TokenDType>(
    gradPermuted: Tensor<D>,
    sortedIndices: Tensor<IndexDType>,
    numTokens: number,
    options?: PermuteBackwardOptions,
  ): ReturnType<Backend['permuteBackward']> & { gradTokens: Tensor<D> };
  permuteBackward<D extends TokenDType>(
    gradPermuted: AnyTensor<D>,
    sortedIndices: AnyTensor<'int32'>,
    numTokens: number,
    options?: DevicePermuteBackwardOptions,
  ): { gradTokens: DeviceTensor<D>; gradProbs?: DeviceTensor<'float32'> };
  unpermuteBackward<D extends TokenDType>(
    gradOutput: Tensor<D>,
    permutedTokens: Tensor<D>,
    sortedIndices: Tensor<IndexDType>,
    options?: UnpermuteOptions,
  ): ReturnType<Backend['unpermuteBackward']> & { gradPermuted: Tensor<D> };
  unpermuteBackward<D extends TokenDType>(
    gradOutput: AnyTensor<D>,
    permutedTokens: AnyTensor<D>,
    sortedIndices: AnyTensor<'int32'>,
    options?: DeviceUnpermuteOptions,
  ): { gradPermuted: DeviceTensor<D>; gradProbs?: DeviceTensor<'float32'> };
}

/** Wraps the cuda backend's host-tensor ops (`base`) with the device-tensor paths of `addon`. */
export function cudaBackend(base: Backend, addon: CudaExports): CudaBackend {
  const call = <T>(op: string, f: (h: Handles) => T): T => callWith(addon as unknown as Addon, op, f);
  const backend = {
    ...base,
    name: 'cuda' as const,
    upload<D extends DType>(tensor: Tensor<D>): DeviceTensor<D> {
      try {
        return wrapDevice<D>(addon.cudaUpload(wire(tensor, 'tensor')));
      } catch (e) {
        rethrowNative('upload', e);
      }
    },
    synchronize(): void {
      try {
        addon.cudaSynchronize();
      } catch (e) {
        rethrowNative('synchronize', e);
      }
    },
    expertsGatherOnLoad(): boolean {
      try {
        return addon.cudaExpertsGatherOnLoad();
      } catch (e) {
        rethrowNative('expertsGatherOnLoad', e);
      }
    },
    memory(): CudaMemory {
      try {
        return addon.cudaMemory();
      } catch (e) {
        rethrowNative('memory', e);
      }
    },
    releaseCachedMemory(): void {
      try {
        addon.cudaReleaseCachedMemory();
      } catch (e) {
        rethrowNative('releaseCachedMemory', e);
      }
    },
    timeline<T>(run: () => T): { result: T; timeline: CudaTimeline } {
      if (typeof run !== 'function') throw new TypeError(`timeline: run: expected a function, got ${typeof run}`);
      try {
        addon.cudaTimelineStart();
      } catch (e) {
        rethrowNative('timeline', e);
      }
      let result: T;
      try {
        result = run();
      } catch (e) {
        try {
          addon.cudaTimelineStop();
        } catch {
          // the run's own error is the one to report
        }
        throw e;
      }
      const timeline = (() => {
        try {
          return addon.cudaTimelineStop();
        } catch (e) {
          rethrowNative('timeline', e);
        }
      })();
      if (typeof (result as { then?: unknown } | null)?.then === 'function') {
        throw new TypeError('timeline: run returned a promise: it must queue its work synchronously (what ran after its first await was not recorded)');
      }
      return { result, timeline };
    },
    permute(tokens: unknown, routingMap: unknown, options?: unknown) {
      if (!anyDevice(tokens, routingMap, optionValue(options, 'probs'))) return base.permute(tokens as Tensor<TokenDType>, routingMap as Tensor<'bool'>, options as PermuteOptions);
      noDeviceOut('permute', options);
      return call('permute', (h) => {
        const o = checkOptions<DevicePermuteOptions>(options, 'permute', ['probs', 'numOutTokens', 'dropAndPad']);
        return wrapResult(
          addon.cudaPermuteDevice({
            tokens: h.of(tokens, 'tokens', TOKENS),
            routingMap: h.of(routingMap, 'routingMap', ['bool']),
            probs: h.opt(o.probs, 'probs', ['float32']),
            numOutTokens: checkNumber(o.numOutTokens, 'numOutTokens'),
            dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          }),
        );
      });
    },
    unpermute(permutedTokens: unknown, sortedIndices: unknown, restoreShape: readonly [number, number], options?: unknown) {
      if (!anyDevice(permutedTokens, sortedIndices, optionValue(options, 'probs'), optionValue(options, 'routingMap'))) {
        return base.unpermute(permutedTokens as Tensor<TokenDType>, sortedIndices as Tensor<IndexDType>, restoreShape, options as UnpermuteOptions);
      }
      noDeviceOut('unpermute', options);
      return call('unpermute', (h) => {
        const o = checkOptions<DeviceUnpermuteOptions>(options, 'unpermute', ['probs', 'routingMap', 'dropAndPad']);
        if (!Array.isArray(restoreShape) || restoreShape.some((d) => typeof d !== 'number')) {
          throw new TypeError(`restoreShape: expected [numTokens, hidden], got ${JSON.stringify(restoreShape)}`);
        }
        return wrapDevice(
          addon.cudaUnpermuteDevice({
            permutedTokens: h.of(permutedTokens, 'permutedTokens', TOKENS),
            sortedIndices: h.of(sortedIndices, 'sortedIndices', ['int32']),
            restoreShape: [...restoreShape],
            probs: h.opt(o.probs, 'probs', ['float32']),
            routingMap: h.opt(o.routingMap, 'routingMap', ['bool']),
            dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          }),
        );
      });
    },
    route(logits: unknown, options: unknown) {
      if (!anyDevice(logits, optionValue(options, 'expertBias'), optionValue(options, 'tokenMask'))) return base.route(logits as Tensor<TokenDType>, options as RouteOptions);
      const run = (lazy: boolean | undefined) =>
        call('route', (h) => {
          const o = checkOptions<DeviceRouteOptions>(options, 'route', [...ROUTE_KEYS, 'lazyCheck']);
          const lazyCheck = lazy ?? checkBool(o.lazyCheck, 'lazyCheck') ?? false;
          const { check, ...out } = addon.cudaRouteDevice({ logits: h.of(logits, 'logits', TOKENS), ...routeArgs(o, h), lazyCheck });
          const result = wrapResult(out);
          if (lazyCheck) result.check = lazyRouteCheck(check, () => run(false));
          return result;
        });
      return run(undefined);
    },
    permuteBackward(gradPermuted: unknown, sortedIndices: unknown, numTokens: number, options?: unknown) {
      if (!anyDevice(gradPermuted, sortedIndices, optionValue(options, 'gradPermutedProbs'), optionValue(options, 'routingMap'))) {
        return base.permuteBackward(gradPermuted as Tensor<TokenDType>, sortedIndices as Tensor<IndexDType>, numTokens, options as PermuteBackwardOptions);
      }
      noDeviceOut('permuteBackward', options);
      return call('permuteBackward', (h) => {
        const o = checkOptions<DevicePermuteBackwardOptions>(options, 'permuteBackward', ['gradPermutedProbs', 'routingMap', 'dropAndPad']);
        return wrapResult(
          addon.cudaPermuteBackwardDevice({
            gradPermuted: h.of(gradPermuted, 'gradPermuted', TOKENS),
            sortedIndices: h.of(sortedIndices, 'sortedIndices', ['int32']),
            numTokens: checkNumber(numTokens, 'numTokens') ?? NaN,
            gradPermutedProbs: h.opt(o.gradPermutedProbs, 'gradPermutedProbs', ['float32']),
            routingMap: h.opt(o.routingMap, 'routingMap', ['bool']),
            dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          }),
        );
      });
    },
    unpermuteBackward(gradOutput: unknown, permutedTokens: unknown, sortedIndices: unknown, options?: unknown) {
      if (!anyDevice(gradOutput, permutedTokens, sortedIndices, optionValue(options, 'probs'), optionValue(options, 'routingMap'))) {
        return base.unpermuteBackward(gradOutput as Tensor<TokenDType>, permutedTokens as Tensor<TokenDType>, sortedIndices as Tensor<IndexDType>, options as UnpermuteOptions);
      }
      return call('unpermuteBackward', (h) => {
        const o = checkOptions<DeviceUnpermuteOptions>(options, 'unpermuteBackward', ['probs', 'routingMap', 'dropAndPad']);
        return wrapResult(
          addon.cudaUnpermuteBackwardDevice({
            gradOutput: h.of(gradOutput, 'gradOutput', TOKENS),
            permutedTokens: h.of(permutedTokens, 'permutedTokens', TOKENS),
            sortedIndices: h.of(sortedIndices, 'sortedIndices', ['int32']),
            probs: h.opt(o.probs, 'probs', ['float32']),
            routingMap: h.opt(o.routingMap, 'routingMap', ['bool']),
            dropAndPad: checkBool(o.dropAndPad, 'dropAndPad'),
          }),
        );
      });
    },
    topk(values: unknown, k: number) {
      if (!anyDevice(values)) return base.topk(values as Tensor<'float32'>, k);
      return call('topk', (h) => wrapResult(addon.cudaTopkDevice({ values: h.of(values, 'values', ['float32']), k: checkNumber(k, 'k') ?? NaN })));
    },
  };
  const gpu = new Set<string>(CUDA_GPU_OPS);
  const ctx: GpuContext = { base, addon: addon as unknown as Addon, call };
  for (const family of GPU_FAMILIES) {
    if (!family.present(ctx.addon)) continue;
    Object.assign(backend, family.methods(ctx));
    for (const op of family.ops) gpu.add(op);
  }
  // Every other op takes device tensors too: they are downloaded, the op runs on the CPU core,
  // and its tensor results are uploaded (backendInfo().gpuOps lists the ops that run on the GPU).
  const b = backend as unknown as Record<string, unknown>;
  for (const [name, f] of Object.entries(base)) {
    if (typeof f !== 'function' || gpu.has(name)) continue;
    b[name] = (...args: unknown[]) => (args.some((a) => containsDeviceTensor(a)) ? viaHost(name, f as (...a: unknown[]) => unknown, args, addon) : (f as (...a: unknown[]) => unknown)(...args));
  }
  return backend as unknown as CudaBackend;
}

/** `value` with its device tensors replaced by host copies. */
function toHost(value: unknown, depth = 0): unknown {
  if (isDeviceTensor(value)) return value.download();
  if (depth >= ARGUMENT_DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value) || isTensor(value)) return value;
  if (Array.isArray(value)) return value.map((v) => toHost(v, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toHost(v, depth + 1)]));
}

/** `value` with its host tensors uploaded (int64 ones stay on the host: the GPU keeps no int64). */
function toDevice(value: unknown, addon: CudaExports, depth = 0): unknown {
  if (isTensor(value)) return value.dtype === 'int64' ? value : wrapDevice(addon.cudaUpload(wire(value, 'result')));
  if (depth >= ARGUMENT_DEPTH || typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) return value.map((v) => toDevice(v, addon, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toDevice(v, addon, depth + 1)]));
}

/** An op without GPU kernels, called with device tensors: on the CPU core, results uploaded. */
function viaHost(op: string, f: (...args: unknown[]) => unknown, args: unknown[], addon: CudaExports): unknown {
  let hostArgs: unknown[];
  try {
    hostArgs = args.map((a) => toHost(a));
  } catch (e) {
    rethrowNative(op, e);
  }
  const out = f(...hostArgs);
  try {
    return toDevice(out, addon);
  } catch (e) {
    rethrowNative(op, e);
  }
}

/** Whether a backend is the cuda backend (and so takes device tensors). */
export function isCudaBackend(backend: Backend | CudaBackend): backend is CudaBackend {
  return backend.name === 'cuda' && typeof (backend as Partial<CudaBackend>).upload === 'function';
}

/** The addon's `CudaRouteCheck` (crates/moe-node/src/cuda.rs): route's check of the values, read once. */
interface NativeRouteCheck {
  flagged(): boolean;
}

/**
 * A lazy route's `check()`: reads the kernel's check once (`native`; absent where route checked
 * already, on the GPU or the host); where a value was flagged, `eager()` (route without
 * lazyCheck on the same arguments) throws the core's error, which every later call throws again.
 */
function lazyRouteCheck(native: NativeRouteCheck | undefined, eager: () => unknown): () => void {
  let error: unknown;
  let pending = native;
  return () => {
    if (pending !== undefined) {
      const check = pending;
      pending = undefined;
      let flagged: boolean;
      try {
        flagged = check.flagged();
      } catch (e) {
        rethrowNative('route', e);
      }
      if (flagged) {
        try {
          const r = eager() as Record<string, { dispose(): void }>;
          // (the GPU flagged a value the core accepted: a bug; say so rather than go on with the lazy results)
          for (const t of Object.values(r)) t.dispose();
          error = new Error('route: the GPU flagged a value of the arguments that the core accepts (a bug in moe-dispatch)');
        } catch (e) {
          error = e;
        }
      }
    }
    if (error !== undefined) throw error;
  };
}
