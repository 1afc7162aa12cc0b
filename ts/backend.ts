/**
 * The Backend interface every implementation provides, and the adapter that turns a
 * compiled binding (N-API or wasm: both export the same functions, each taking one argument
 * object; their types are generated from the Rust op table) into one.
 * Each op family lives in `ops/<family>.ts` with its interface and adapter; a Backend is
 * their union. Argument checking that is about JavaScript values happens in the adapters;
 * everything about the semantics is checked once, in the Rust core, and reported through
 * the binding as a typed error.
 */
import type { Binding } from './generated/binding.js';
import { activationsOps, type ActivationsOps } from './ops/activations.js';
import { dispatchOps, type DispatchOps } from './ops/dispatch.js';
import { expertsOps, type ExpertsOps } from './ops/experts.js';
import { layoutOps, type LayoutOps } from './ops/layout.js';
import { routingOps, type RoutingOps } from './ops/routing.js';
import type { Call } from './wire.js';

export type { MultihotToIndicesOptions, PermuteBackwardOptions, PermuteOptions, PermuteResult, UnpermuteOptions } from './ops/dispatch.js';

export type BackendName = 'cpu' | 'wasm' | 'cuda' | 'webgpu';

export interface Backend extends DispatchOps, ActivationsOps, LayoutOps, RoutingOps, ExpertsOps {
  readonly name: BackendName;
  /** Worker threads used for large inputs. */
  readonly threads: number;
}

/** What `backendInfo()` reports for each backend. */
export interface BackendInfo {
  name: BackendName;
  available: boolean;
  /** Why it is unavailable (absent when available). */
  reason?: string;
  threads?: number;
  /** cuda: the GPU, its compute capability and the driver's CUDA version; webgpu: the adapter. */
  device?: string;
  /** cuda, webgpu: the ops that run on the GPU; every other op of the backend runs on the CPU core (webgpu: on wasm). */
  gpuOps?: string[];
  /** cuda: where this process got its kernels ("disk cache", or "compiled by NVRTC in ... s"). */
  kernels?: string;
}

/** Everything a compiled binding exports (ts/generated/binding.ts). */
export type { Binding };

const ERROR_CLASSES: Record<string, ErrorConstructor> = { TypeError, RangeError, Error };

/**
 * Rethrows an error from a binding as the JS class the core chose, prefixed with the op.
 * N-API errors carry the class in `code`; wasm throws real TypeError/RangeError objects.
 */
function rethrow(op: string, e: unknown, onTrap: () => void): never {
  if (typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError) {
    onTrap();
    throw new Error(`${op}: the wasm module trapped (${e.message}); this is a bug in moe-dispatch. This backend instance is retired: create a new one with createBackend()`);
  }
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    const cls = typeof code === 'string' && code in ERROR_CLASSES ? ERROR_CLASSES[code] : e instanceof TypeError ? TypeError : e instanceof RangeError ? RangeError : undefined;
    if (cls) throw new cls(`${op}: ${e.message}`);
  }
  throw e;
}

/** Calls the binding, turning validation failures here and errors there into typed errors named after `op`. */
function guarded<T>(op: string, onTrap: () => void, f: () => T): T {
  try {
    return f();
  } catch (e) {
    rethrow(op, e, onTrap);
  }
}

/**
 * Wraps a compiled binding as a Backend. `getBinding` is called on every op so that a
 * retired wasm instance is noticed; `onTrap` is told when an instance trapped.
 */
export function bindingBackend(name: BackendName, getBinding: () => Binding, onTrap: () => void = () => {}): Backend {
  const call: Call<Binding> = (op, f) => guarded(op, onTrap, () => f(getBinding()));
  return {
    name,
    get threads() {
      return getBinding().numThreads();
    },
    ...dispatchOps(call),
    ...layoutOps(call),
    ...activationsOps(call),
    ...routingOps(call),
    ...expertsOps(call),
  };
}
