/**
 * The CUDA backend: the native addon's GPU functions (`cudaInfo`, `cudaPermute`,
 * `cudaUnpermute`, from crates/moe-node/src/cuda.rs over crates/moe-cuda).
 *
 * It is the native binding with the ops listed in `CUDA_GPU_OPS` replaced by their GPU
 * versions; every other op of this backend runs on the CPU core through the same addon (same
 * results: the CPU core is the reference the kernels are checked against), and `backendInfo()`
 * says which ops run where. Tensors are host tensors: each GPU op uploads its inputs, runs one
 * kernel and downloads the outputs.
 *
 * Available only where the addon's `cudaInfo()` opens a GPU and loads the kernels; otherwise
 * the reason it gives ("libcuda.so.1 not found ...", "the NVIDIA driver sees no CUDA device",
 * an NVRTC error). `MOE_DISPATCH_CUDA=0` turns the backend off.
 */
import type { BackendInfo, Binding } from '../backend.js';
import { loadNative, type Loaded } from './native.js';

/** Ops the cuda backend runs on the GPU. The others run on the CPU core (the native addon). */
export const CUDA_GPU_OPS = ['permute', 'unpermute'] as const;

/** What the addon's `cudaInfo()` returns (napi-rs gives `null` for absent fields). */
export interface CudaInfo {
  available: boolean;
  reason?: string | null;
  device?: string | null;
  computeCapability?: string | null;
  driverVersion?: string | null;
  totalMemory?: number | null;
  kernels?: string | null;
}

/** The addon's GPU exports. */
export interface CudaExports {
  cudaInfo(): CudaInfo;
  cudaPermute: Binding['permute'];
  cudaUnpermute: Binding['unpermute'];
}

/** A loaded backend plus what `backendInfo()` adds for it. */
export type CudaLoaded = Loaded & { info?: Partial<BackendInfo> };

let cached: CudaLoaded | undefined;

export function loadCuda(): CudaLoaded {
  if (cached) return cached;
  const off = typeof process !== 'undefined' ? process.env?.MOE_DISPATCH_CUDA : undefined;
  if (off === '0' || off === 'off') return (cached = { reason: `turned off by MOE_DISPATCH_CUDA=${off}` });
  const native = loadNative();
  if (!native.binding) return (cached = { reason: `the CUDA backend is part of the native addon, which does not load: ${native.reason}` });
  const addon = native.binding as Binding & Partial<CudaExports>;
  if (typeof addon.cudaInfo !== 'function' || typeof addon.cudaPermute !== 'function' || typeof addon.cudaUnpermute !== 'function') {
    return (cached = { reason: 'the native addon was built without the CUDA backend (rebuild it: npm run build:native)' });
  }
  let info: CudaInfo;
  try {
    info = addon.cudaInfo();
  } catch (e) {
    return (cached = { reason: `cudaInfo() failed: ${(e as Error).message}` });
  }
  if (!info.available) return (cached = { reason: info.reason || 'cudaInfo() reports CUDA unavailable and gives no reason' });
  const binding: Binding = { ...addon, permute: addon.cudaPermute, unpermute: addon.cudaUnpermute };
  const device = [info.device, info.computeCapability && `compute capability ${info.computeCapability}`, info.driverVersion && `driver CUDA ${info.driverVersion}`]
    .filter(Boolean)
    .join(', ');
  return (cached = { binding, info: { device, gpuOps: [...CUDA_GPU_OPS], kernels: info.kernels ?? undefined } });
}
