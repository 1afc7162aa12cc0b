/**
 * The API both package entries export: `index.ts` (Node) and `browser.ts` (browsers) each add
 * their own `backendInfo`/`createBackend` (over the backends they can load) and the few exports
 * only one of them has (test/entries.test.ts keeps the two lists in step).
 */
export * from './tensor.js';
export { isGemmSpan, summarizeTimeline, type TimelineEntry, type TimelineSummary } from './timeline.js';
export type { Backend, BackendInfo, BackendName, MultihotToIndicesOptions, PermuteBackwardOptions, PermuteOptions, PermuteResult, UnpermuteOptions } from './backend.js';
export type { ActivationGrads, ActivationKind, ActivationOptions } from './ops/activations.js';
export type { RouteOptions, RouteResult, ScoreFunction, SwitchLoadBalancingLossOptions, ZLossOptions } from './ops/routing.js';
export type {
  CheckpointInfo,
  CheckpointSource,
  CheckpointTensorInfo,
  ExpertBiases,
  ExpertCheckpointOptions,
  ExpertsBackwardOptions,
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
export {
  EXPERT_STACKED,
  MoELayer,
  normalRng,
  reduceReplicatedGrads,
  type MoEForward,
  type MoEGrads,
  type MoELayerOptions,
  type MoEWeights,
  type PretrainedInfo,
  type SharedExpertOptions,
} from './layer.js';
export { AdamW, type AdamWOptions, type OptimizerStatus } from './optim.js';
export { mseLoss, type RealShape, TRAIN_SHAPES, uniformTensor } from './training.js';
export { SUPPORTED_MODEL_TYPES, type ExpertKeyFormat, type FromPretrainedOptions, type KeyScheme, type PretrainedSource, type SavePretrainedOptions } from './hf.js';
export { TokenDispatcher, type TokenDispatcherOptions, type TokenPermutation, type TopKRouting } from './dispatcher.js';
export {
  combine,
  combineBackward,
  createInProcessGroup,
  dispatch,
  dispatchBackward,
  ExpertParallelTimeoutError,
  releaseDispatch,
  type CombineGrads,
  type CombineOptions,
  type DeviceCombineGrads,
  type DeviceDispatchGrads,
  type DeviceDispatchResult,
  type DeviceUpload,
  type DispatchBackwardOptions,
  type DispatchGrads,
  type DispatchHandle,
  type DispatchOptions,
  type DispatchResult,
  type ExpertParallelGroup,
  type InProcessGroupOptions,
} from './ep.js';
