/**
 * Loads the WebAssembly backend built by wasm-pack (`--target web`) into `pkg/wasm/`.
 * The same module works in Node (bytes read from disk) and in browsers (fetched).
 */
import type { Binding } from '../backend.js';
import type { Loaded } from './native.js';

const GLUE = new URL('../../pkg/wasm/moe_wasm.js', import.meta.url);
const BYTES = new URL('../../pkg/wasm/moe_wasm_bg.wasm', import.meta.url);

interface Glue extends Binding {
  default(input?: { module_or_path: URL | BufferSource | WebAssembly.Module }): Promise<unknown>;
  initSync(input: { module: BufferSource | WebAssembly.Module }): unknown;
}

let compiled: Promise<WebAssembly.Module> | undefined;
let instances = 0;

async function compile(): Promise<WebAssembly.Module> {
  const isNode = typeof process !== 'undefined' && !!process.versions?.node;
  if (isNode) {
    const { readFile } = await import('node:fs/promises');
    return WebAssembly.compile(await readFile(BYTES));
  }
  const response = await fetch(BYTES);
  if (!response.ok) throw new Error(`fetching ${BYTES.href} failed: HTTP ${response.status}`);
  return WebAssembly.compile(await response.arrayBuffer());
}

/**
 * Instantiates a fresh copy of the module. Each call gets its own memory, so an instance
 * that trapped (a bug) can be thrown away without affecting the others.
 */
export async function loadWasm(): Promise<Loaded> {
  try {
    compiled ??= compile();
    const module = await compiled;
    // A distinct URL gives a distinct copy of the glue module and so a distinct instance.
    const glue = (await import(/* @vite-ignore */ `${GLUE.href}?instance=${instances++}`)) as Glue;
    glue.initSync({ module });
    return { binding: glue };
  } catch (e) {
    compiled = undefined;
    return { reason: `the wasm module failed to load from ${GLUE.href}: ${(e as Error).message} (run npm run build)` };
  }
}
