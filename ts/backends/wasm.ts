/**
 * Loads the WebAssembly backend built by wasm-pack (`--target web`) into `pkg/wasm/`.
 * The same module works in Node (bytes read from disk) and in browsers (fetched).
 *
 * Bundlers see both files: the glue through a static import (of the per-instance factory that
 * scripts/wasm-factory.mjs makes of it), and the `.wasm` through
 * `new URL('<literal>', import.meta.url)`, which Vite and webpack 5 emit as an asset and
 * rewrite. esbuild leaves that URL alone (it resolves next to the bundle at run time): there the
 * app imports the file itself (`moe-dispatch/moe_wasm_bg.wasm` with `--loader:.wasm=file`) and
 * passes its URL as `createBackend({ wasm })`.
 */
import { instantiate } from '../../pkg/wasm/moe_wasm_factory.js';
import type { Binding } from '../backend.js';
import { nodeFiles } from '../platform.js';
import type { Loaded } from './native.js';

/** Where the compiled module comes from: a URL (or path, in Node), its bytes, or a compiled module. */
export type WasmSource = string | URL | ArrayBuffer | ArrayBufferView | WebAssembly.Module;

const WASM_URL = new URL('../../pkg/wasm/moe_wasm_bg.wasm', import.meta.url);

const byUrl = new Map<string, Promise<WebAssembly.Module>>();

/** `source` as a URL, or a file path (Node, a string that is not a URL and no page to resolve it against). */
function locate(source: string | URL): URL | string {
  if (source instanceof URL) return source;
  const base = (globalThis as { location?: { href?: string } }).location?.href;
  try {
    return new URL(source, base);
  } catch {
    return source;
  }
}

async function fetchModule(where: URL | string): Promise<WebAssembly.Module> {
  const files = nodeFiles();
  if (typeof where === 'string' || where.protocol === 'file:') {
    if (!files) throw new Error(`${String(where)} is a file, and there is no file system here`);
    return WebAssembly.compile((await files.readFile(where)) as BufferSource);
  }
  const response = await fetch(where);
  if (!response.ok) {
    throw new Error(
      `fetching ${where.href} failed: HTTP ${response.status}` +
        (where.href === WASM_URL.href ? ' (if a bundler did not emit the file, as esbuild does not, import moe-dispatch/moe_wasm_bg.wasm as a file and pass its URL: createBackend({ wasm }))' : ''),
    );
  }
  return WebAssembly.compile(await response.arrayBuffer());
}

function compile(source: WasmSource): Promise<WebAssembly.Module> {
  if (source instanceof WebAssembly.Module) return Promise.resolve(source);
  if (source instanceof ArrayBuffer || ArrayBuffer.isView(source)) return WebAssembly.compile(source as BufferSource);
  const where = locate(source);
  const key = String(where);
  let module = byUrl.get(key);
  if (!module) {
    module = fetchModule(where);
    byUrl.set(key, module);
    module.catch(() => byUrl.delete(key));
  }
  return module;
}

/**
 * Instantiates a fresh copy of the module (compiled once per source). Each call gets its own
 * memory and glue state, so an instance that trapped (a bug) can be thrown away without
 * affecting the others.
 */
export async function loadWasm(source: WasmSource = WASM_URL): Promise<Loaded> {
  try {
    // wasm-bindgen types each export's argument object as `any`; ts/generated/binding.ts has their types.
    const binding = instantiate(await compile(source)) as unknown as Binding;
    return { binding };
  } catch (e) {
    const from = source === WASM_URL ? WASM_URL.href : 'options.wasm';
    const hint = source === WASM_URL && WASM_URL.protocol === 'file:' ? ' (run npm run build)' : '';
    return { reason: `the wasm module failed to load from ${from}: ${(e as Error).message}${hint}` };
  }
}
