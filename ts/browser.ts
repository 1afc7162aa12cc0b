/**
 * moe-dispatch for browsers: the same API as the Node entry (`index.ts`), on the WebAssembly
 * backend. Plain ES modules with no `node:` import, static or dynamic (Node-only file access is
 * behind platform.ts), so a page can import it as it is:
 *
 *   import { createBackend, tensor } from 'moe-dispatch';          // a bundler picks this file by the `browser` condition
 *   import { createBackend } from './node_modules/moe-dispatch/dist/browser.js';   // or with no bundler at all
 *   const moe = await createBackend({ prefer: 'wasm' });          // fetches and compiles pkg/wasm/moe_wasm_bg.wasm
 *
 * Vite and webpack emit the `.wasm` by themselves; with esbuild pass its URL as
 * `createBackend({ wasm })` (README, "In the browser"; test/bundlers.test.ts checks all three).
 *
 * `backendInfo()` lists 'cuda' and 'cpu' as unavailable here, with the reason. Node-only exports of
 * the Node entry are left out: `trainMoE` and `progressLine` (they write files) and
 * `isCudaBackend` (no cuda backend here); test/entries.test.ts keeps the two lists in step.
 */
import type { BackendName } from './backend.js';
import { loadWasm } from './backends/wasm.js';
import { loadWebGpu } from './backends/webgpu.js';
import { makeEntry, type CreateBackendOptions, type LoadResult } from './entry.js';

export * from './tensor.js';
export type { Backend, BackendInfo, BackendName, MultihotToIndicesOptions, PermuteBackwardOptions, PermuteOptions, PermuteResult, UnpermuteOptions } from './backend.js';
export type { ActivationGrads, ActivationKind, ActivationOptions } from './ops/activations.js';
export type { RouteOptions, RouteResult, ScoreFunction, SwitchLoadBalancingLossOptions, ZLossOptions } from './ops/routing.js';
export type {
  CheckpointInfo,
  CheckpointSource,
  CheckpointTensorInfo,
  ExpertBiases,
  ExpertCheckpointOptions,
  ExpertsFormat,
  ExpertsForwardOptions,
  ExpertsGrads,
  ExpertsOptions,
  ExpertWeights,
  LoadedExperts,
  LoadedSafetensors,
  LoadExpertsOptions,
  LoadSafetensorsOptions,
  MatmulOptions,
  SafetensorsIndex,
  SaveSafetensorsOptions,
  ShardedCheckpoint,
  UnstackExpertsOptions,
} from './ops/experts.js';
export type {
  DropPolicy,
  DropTokensOptions,
  DropTokensResult,
  ExpertRange,
  ExpertTensor,
  GroupedMmSortOptions,
  GroupedMmSortResult,
  MeshAxis,
  PlacedMesh,
  Placement,
  SortChunksGrads,
  SortChunksResult,
} from './ops/layout.js';
export type { BackendInfoOptions, CreateBackendOptions, Prefer } from './entry.js';
export type { WasmSource } from './backends/wasm.js';
export { isDeviceTensor, type DeviceTensor } from './device.js';
export { isWebGpuBackend, isWebGpuTensor, WEBGPU_OPS, type OnGpu, type OnHost, type WebGpuBackend, type WebGpuOps, type WebGpuTensor } from './backends/webgpu.js';
export type { AnyTensor, CudaBackend, DevicePermuteOptions, DevicePermuteResult, DeviceRouteBackwardOptions, DeviceRouteOptions, DeviceRouteResult, DeviceUnpermuteOptions } from './backends/cuda.js';

/** Why the Node-only backends cannot run in this entry. */
export const BROWSER_UNAVAILABLE: Readonly<Record<Exclude<BackendName, 'wasm' | 'webgpu'>, string>> = {
  cpu: 'the native backend is a Node.js N-API addon; this is the browser entry of moe-dispatch (wasm only)',
  cuda: 'the cuda backend runs through the Node.js N-API addon; this is the browser entry of moe-dispatch (wasm only)',
};

function load(name: BackendName, options: CreateBackendOptions): LoadResult | Promise<LoadResult> {
  if (name === 'webgpu') return loadWebGpu(options.wasm);
  return name === 'wasm' ? loadWasm(options.wasm) : { reason: BROWSER_UNAVAILABLE[name] };
}

/** `backendInfo()`: which backends can run here and, for the others, why not. `createBackend(options?)`: one of them. */
export const { backendInfo, createBackend } = makeEntry(load);
export { MoELayer, normalRng, type MoEForward, type MoEGrads, type MoELayerOptions, type MoEWeights, type PretrainedInfo, type SharedExpertOptions } from './layer.js';
export { AdamW, type AdamWOptions, type OptimizerStatus } from './optim.js';
export { mseLoss, TRAIN_SHAPES, uniformTensor } from './training.js';
export { SUPPORTED_MODEL_TYPES, type ExpertKeyFormat, type FromPretrainedOptions, type KeyScheme, type PretrainedSource, type SavePretrainedOptions } from './hf.js';
export { TokenDispatcher, type TokenDispatcherOptions, type TokenPermutation, type TopKRouting } from './dispatcher.js';
