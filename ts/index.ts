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

export * from './exports.js';
export { isCudaBackend, type CudaMemory, type CudaTimeline, type CudaTimelineSpan, type DevicePermuteBackwardOptions } from './backends/cuda.js';

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
export { progressLine, trainMoE, writeLargeFile, type TrainOptions, type TrainResult, type TrainShape, type TrainStep } from './train.js';
export { createAsyncBackend, type AsyncBackend, type AsyncOps, type CreateAsyncBackendOptions } from './async.js';
export { createExpertParallelGroup, ncclInfo, type ExpertParallelGroupOptions, type NcclExpertParallelGroup, type NcclInfo } from './ep-nccl.js';
