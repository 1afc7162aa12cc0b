/**
 * `createBackend` and `backendInfo`, built over a loader per backend. The Node entry
 * (`index.ts`) passes loaders for cuda, cpu (N-API) and wasm; the browser entry
 * (`browser.ts`) passes the wasm loader and reports the others unavailable, so the two
 * entries have the same API and the browser one never imports a `node:` module.
 */
import { bindingBackend, type Backend, type BackendInfo, type BackendName, type Binding } from './backend.js';
import type { WasmSource } from './backends/wasm.js';

export type Prefer = 'auto' | BackendName;

export interface CreateBackendOptions {
  /** 'auto' (default) takes the fastest available: cuda, then cpu (native), then webgpu (a browser with a WebGPU adapter), then wasm. */
  prefer?: Prefer;
  /**
   * Where the wasm backend gets `moe_wasm_bg.wasm`: a URL (or, in Node, a path), its bytes, or a
   * compiled `WebAssembly.Module`. Default: the file beside the package's glue, which Vite and
   * webpack emit by themselves; with esbuild, import `moe-dispatch/moe_wasm_bg.wasm` with the
   * file loader and pass `new URL(thatPath, import.meta.url)` (README, "In the browser").
   */
  wasm?: WasmSource;
}

/** What a loader gives: a binding (plus info for backendInfo) or why there is none. */
export type LoadResult =
  | { binding: Binding; reason?: undefined; info?: Partial<BackendInfo> /** Adds backend-specific ops (cuda: device tensors) to the adapter. */; extend?: (backend: Backend) => Backend }
  | { binding?: undefined; reason: string };

export const ORDER: readonly BackendName[] = ['cuda', 'cpu', 'webgpu', 'wasm'];

function wrap(name: BackendName, binding: Binding): Backend {
  if (name !== 'wasm' && name !== 'webgpu') return bindingBackend(name, () => binding);
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

/** The options of `backendInfo`. */
export type BackendInfoOptions = Pick<CreateBackendOptions, 'wasm'>;

function checkWasm(wasm: unknown): void {
  const isModule = typeof WebAssembly !== 'undefined' && wasm instanceof WebAssembly.Module;
  if (wasm === undefined || typeof wasm === 'string' || wasm instanceof URL || wasm instanceof ArrayBuffer || ArrayBuffer.isView(wasm) || isModule) return;
  throw new TypeError(`options.wasm: expected a URL, a path, the bytes of moe_wasm_bg.wasm or a WebAssembly.Module, got ${wasm === null ? 'null' : typeof wasm}`);
}

export interface Entry {
  backendInfo(options?: BackendInfoOptions): Promise<BackendInfo[]>;
  createBackend(options?: CreateBackendOptions): Promise<Backend>;
}

export function makeEntry(load: (name: BackendName, options: CreateBackendOptions) => LoadResult | Promise<LoadResult>): Entry {
  /** Which backends can run here and, for the others, why not (`options.wasm`: as for createBackend). */
  async function backendInfo(options: BackendInfoOptions = {}): Promise<BackendInfo[]> {
    if (typeof options !== 'object' || options === null) throw new TypeError(`options: expected an object, got ${typeof options}`);
    checkWasm(options.wasm);
    const infos: BackendInfo[] = [];
    for (const name of ORDER) {
      const loaded = await load(name, { wasm: options.wasm });
      infos.push(loaded.binding ? { name, available: true, threads: loaded.binding.numThreads(), ...loaded.info } : { name, available: false, reason: loaded.reason });
    }
    return infos;
  }

  /** Creates a backend. An explicitly preferred backend that cannot run here is an error that says why. */
  async function createBackend(options: CreateBackendOptions = {}): Promise<Backend> {
    if (typeof options !== 'object' || options === null) throw new TypeError(`options: expected an object, got ${typeof options}`);
    const prefer = options.prefer ?? 'auto';
    if (prefer !== 'auto' && !ORDER.includes(prefer)) {
      throw new TypeError(`options.prefer: expected 'auto', 'cuda', 'cpu', 'webgpu' or 'wasm', got ${JSON.stringify(prefer)}`);
    }
    checkWasm(options.wasm);
    const reasons: string[] = [];
    for (const name of prefer === 'auto' ? ORDER : [prefer]) {
      const loaded = await load(name, options);
      if (loaded.binding) {
        const backend = wrap(name, loaded.binding);
        return loaded.extend ? loaded.extend(backend) : backend;
      }
      reasons.push(`${name}: ${loaded.reason}`);
    }
    throw new Error(`no moe-dispatch backend is available (${reasons.join('; ')})`);
  }

  return { backendInfo, createBackend };
}
