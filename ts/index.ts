/**
 * moe-dispatch: Mixture-of-Experts token routing and dispatch for JavaScript, on a Rust core.
 *
 *   const moe = await createBackend();            // the fastest backend available here
 *   const { permutedTokens, sortedIndices } = moe.permute(tokens, routingMap, { probs });
 */
import { bindingBackend, type Backend, type BackendInfo, type BackendName, type Binding } from './backend.js';
import { loadCuda, type CudaLoaded } from './backends/cuda.js';
import { loadNative } from './backends/native.js';
import { loadWasm } from './backends/wasm.js';

export * from './tensor.js';
export type { Backend, BackendInfo, BackendName, MultihotToIndicesOptions, PermuteBackwardOptions, PermuteOptions, PermuteResult, UnpermuteOptions } from './backend.js';
export type { ActivationGrads, ActivationKind, ActivationOptions } from './ops/activations.js';
export type { RouteOptions, RouteResult, ScoreFunction, SwitchLoadBalancingLossOptions, ZLossOptions } from './ops/routing.js';
export type { DropPolicy, DropTokensOptions, DropTokensResult, ExpertRange, ExpertTensor, GroupedMmSortOptions, GroupedMmSortResult, MeshAxis, PlacedMesh, Placement, SortChunksGrads, SortChunksResult } from './ops/layout.js';

export type Prefer = 'auto' | BackendName;

export interface CreateBackendOptions {
  /** 'auto' (default) takes the fastest available: cuda, then cpu (native), then wasm. */
  prefer?: Prefer;
}

const ORDER: readonly BackendName[] = ['cuda', 'cpu', 'wasm'];

async function load(name: BackendName): Promise<CudaLoaded> {
  switch (name) {
    case 'cpu':
      return loadNative();
    case 'wasm':
      return loadWasm();
    case 'cuda':
      return loadCuda();
  }
}

function wrap(name: BackendName, binding: Binding): Backend {
  if (name !== 'wasm') return bindingBackend(name, () => binding);
  // A wasm instance that trapped is not trusted again: later calls report it.
  let current: Binding | undefined = binding;
  return bindingBackend(
    name,
    () => {
      if (!current) throw new Error('this wasm backend hit an internal error earlier; create a new backend');
      return current;
    },
    () => {
      current = undefined;
    },
  );
}

/** Which backends can run here and, for the others, why not. */
export async function backendInfo(): Promise<BackendInfo[]> {
  const infos: BackendInfo[] = [];
  for (const name of ORDER) {
    const loaded = await load(name);
    infos.push(loaded.binding ? { name, available: true, threads: loaded.binding.numThreads(), ...loaded.info } : { name, available: false, reason: loaded.reason });
  }
  return infos;
}

/** Creates a backend. An explicitly preferred backend that cannot run here is an error that says why. */
export async function createBackend(options: CreateBackendOptions = {}): Promise<Backend> {
  if (typeof options !== 'object' || options === null) throw new TypeError(`options: expected an object, got ${typeof options}`);
  const prefer = options.prefer ?? 'auto';
  if (prefer !== 'auto' && !ORDER.includes(prefer)) {
    throw new TypeError(`options.prefer: expected 'auto', 'cuda', 'cpu' or 'wasm', got ${JSON.stringify(prefer)}`);
  }
  const reasons: string[] = [];
  for (const name of prefer === 'auto' ? ORDER : [prefer]) {
    const loaded = await load(name);
    if (loaded.binding) return wrap(name, loaded.binding);
    reasons.push(`${name}: ${loaded.reason}`);
  }
  throw new Error(`no moe-dispatch backend is available (${reasons.join('; ')})`);
}
export { TokenDispatcher, type TokenDispatcherOptions, type TokenPermutation, type TopKRouting } from './dispatcher.js';
