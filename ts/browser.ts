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

export * from './exports.js';

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
