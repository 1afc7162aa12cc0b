/**
 * moe-dispatch: Mixture-of-Experts token routing and dispatch for JavaScript, on a Rust core.
 *
 *   const moe = await createBackend();            // the fastest backend available here
 *   const { permutedTokens, sortedIndices } = moe.permute(tokens, routingMap, { probs });
 */
import type { BackendName } from './backend.js';
import { loadCuda, type CudaLoaded } from './backends/cuda.js';
import { loadNative } from './backends/native.js';
import { loadWasm } from './backends/wasm.js';
import { loadWebGpu } from './backends/webgpu.js';
import { makeEntry, type CreateBackendOptions } from './entry.js';
import './node-files.js'; // Node's fs for the wasm loader and fromPretrained (platform.ts)

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
export {
  isCudaBackend,
  type AnyTensor,
  type CudaBackend,
  type CudaMemory,
  type DevicePermuteBackwardOptions,
  type DevicePermuteOptions,
  type DevicePermuteResult,
  type DeviceRouteBackwardOptions,
  type DeviceRouteOptions,
  type DeviceRouteResult,
  type DeviceUnpermuteOptions,
} from './backends/cuda.js';

async function load(name: BackendName, options: CreateBackendOptions): Promise<CudaLoaded> {
  switch (name) {
    case 'cpu':
      return loadNative();
    case 'wasm':
      return loadWasm(options.wasm);
    case 'cuda':
      return loadCuda();
    case 'webgpu':
      return loadWebGpu(options.wasm);
  }
}

/** `backendInfo()`: which backends can run here and, for the others, why not. `createBackend(options?)`: one of them. */
export const { backendInfo, createBackend } = makeEntry(load);
export { MoELayer, normalRng, type MoEForward, type MoEGrads, type MoELayerOptions, type MoEWeights, type PretrainedInfo, type SharedExpertOptions } from './layer.js';
export { AdamW, type AdamWOptions, type OptimizerStatus } from './optim.js';
export { SUPPORTED_MODEL_TYPES, type ExpertKeyFormat, type FromPretrainedOptions, type KeyScheme, type PretrainedSource, type SavePretrainedOptions } from './hf.js';
export { progressLine, trainMoE, writeLargeFile, type TrainOptions, type TrainResult, type TrainShape, type TrainStep } from './train.js';
export { mseLoss, TRAIN_SHAPES, uniformTensor } from './training.js';
export { createAsyncBackend, type AsyncBackend, type AsyncOps, type CreateAsyncBackendOptions } from './async.js';
export { TokenDispatcher, type TokenDispatcherOptions, type TokenPermutation, type TopKRouting } from './dispatcher.js';
