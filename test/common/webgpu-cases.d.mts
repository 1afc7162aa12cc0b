import type { Backend, BackendInfo, BackendName, WebGpuBackend } from '../../ts/index.js';

type Api = typeof import('../../ts/index.js');
type Random = typeof import('../../ts/random.js');

export declare const PROBLEMS: readonly { numTokens: number; numExperts: number; topk: number; hidden: number }[];
export declare const DTYPES: readonly ('float32' | 'bfloat16' | 'float16')[];

/** The assertions the cases make, each with a message last (`equal` is Object.is; `deepEqual` as vitest's toEqual). */
export interface Check {
  equal(actual: unknown, expected: unknown, message: string): void;
  deepEqual(actual: unknown, expected: unknown, message: string): void;
  ok(value: unknown, message: string): void;
  match(text: string, pattern: RegExp, message: string): void;
  fail(message: string): never;
}

export declare function openWebGpu(api: Api): Promise<{ info: BackendInfo | undefined; moe: WebGpuBackend | undefined; why: string; wasm: Backend }>;

export interface WebGpuCaseContext {
  api: Api;
  random: Pick<Random, 'rng' | 'randomRouting'>;
  /** The exports of webgpu/gpu.js, webgpu/f64.js and webgpu/shaders.js (the software float64 and scan cases drive shaders directly). */
  f64: () => Promise<{ Gpu: unknown; F64_CHECK: string; SCAN: string }>;
  moe: WebGpuBackend;
  wasm: Backend;
  info: BackendInfo;
  /** The backend `createBackend()` (auto) must give here. */
  autoPick: BackendName;
  check: Check;
}

export interface WebGpuCase {
  name: string;
  run: () => void | Promise<void>;
}

/** The cases in order (the last checks the counts); `compared`: tensors compared bit for bit, per op. */
export declare function webgpuCases(ctx: WebGpuCaseContext): { cases: WebGpuCase[]; compared: Record<string, number> };
