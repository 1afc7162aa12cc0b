/**
 * The wasm loader (ts/backends/wasm.ts over pkg/wasm/moe_wasm_factory.js): every backend gets
 * its own instance of the module (its own memory and glue state), so an instance that trapped
 * is retired alone; and `createBackend({ wasm })` / `backendInfo({ wasm })` take the module
 * from elsewhere (what an esbuild app does). Runs in both projects (Node, and Chromium through
 * the browser entry's modules).
 */
import { describe, expect, it } from 'vitest';

import type { Binding } from '../ts/backend.js';
import { loadWasm } from '../ts/backends/wasm.js';
import { makeEntry, type LoadResult } from '../ts/entry.js';
import { tensor } from '../ts/index.js';

const IN_NODE = typeof process !== 'undefined' && typeof process.versions?.node === 'string' && typeof window === 'undefined';
const WASM_URL = new URL('../pkg/wasm/moe_wasm_bg.wasm', import.meta.url);

const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 1, 1, 0, 1]));
const tokens = tensor('float32', [3, 1], Float32Array.from([10, 20, 30]));
const permuted = (b: { permute: (t: typeof tokens, m: typeof map) => { permutedTokens: { data: unknown } } }) => Array.from(b.permute(tokens, map).permutedTokens.data as Float32Array);

/** An entry over the wasm loader that also keeps each binding it handed out (to reach its memory). */
function recordingEntry() {
  const bindings: (Binding & { memory: WebAssembly.Memory })[] = [];
  const entry = makeEntry(async (name, options): Promise<LoadResult> => {
    if (name !== 'wasm') return { reason: 'wasm only here' };
    const loaded = await loadWasm(options.wasm);
    if (loaded.binding) bindings.push(loaded.binding as Binding & { memory: WebAssembly.Memory });
    return loaded;
  });
  return { ...entry, bindings };
}

/** The module's bytes: from disk in Node, over HTTP in the page. */
async function wasmBytes(): Promise<ArrayBuffer> {
  if (IN_NODE) {
    const { readFile } = await import('node:fs/promises');
    const b = await readFile(WASM_URL);
    return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
  }
  return (await fetch(WASM_URL)).arrayBuffer();
}

describe('wasm instances', () => {
  it.runIf(IN_NODE)('pkg/wasm/moe_wasm_factory.js was made from the current glue (else: node scripts/wasm-factory.mjs)', async () => {
    const { readFile } = await import('node:fs/promises');
    const { createHash } = await import('node:crypto');
    const glue = await readFile(new URL('../pkg/wasm/moe_wasm.js', import.meta.url));
    const factory = await readFile(new URL('../pkg/wasm/moe_wasm_factory.js', import.meta.url), 'utf8');
    expect(factory.match(/glue sha256: ([0-9a-f]{64})/)?.[1], 'the factory is stale: run node scripts/wasm-factory.mjs (build-wasm.sh does)').toBe(createHash('sha256').update(glue).digest('hex'));
  });

  it('each backend has its own instance (its own memory)', async () => {
    const { createBackend, bindings } = recordingEntry();
    const a = await createBackend({ prefer: 'wasm' });
    const b = await createBackend({ prefer: 'wasm' });
    expect(bindings).toHaveLength(2);
    expect(bindings[0].memory).toBeInstanceOf(WebAssembly.Memory);
    expect(bindings[0].memory).not.toBe(bindings[1].memory);
    expect(bindings[0]).not.toBe(bindings[1]);
    expect(permuted(a)).toEqual([10, 20, 20, 30]);
    expect(permuted(b)).toEqual([10, 20, 20, 30]);
  });

  it('an instance that trapped is retired alone: the others, older and newer, keep computing', async () => {
    const { createBackend, bindings } = recordingEntry();
    const a = await createBackend({ prefer: 'wasm' });
    const b = await createBackend({ prefer: 'wasm' });
    // Wreck a's memory (its allocator's state with it): its next call traps.
    new Uint8Array(bindings[0].memory.buffer).fill(0xff);
    expect(() => a.permute(tokens, map)).toThrow(/^permute: the wasm module trapped \(.+\); this is a bug in moe-dispatch\. This backend instance is retired/);
    expect(() => a.permute(tokens, map)).toThrow(/this wasm backend hit an internal error earlier; create a new backend/);
    expect(permuted(b)).toEqual([10, 20, 20, 30]);
    expect(permuted(await createBackend({ prefer: 'wasm' }))).toEqual([10, 20, 20, 30]);
  });

  it('options.wasm: the bytes, a compiled module, or a URL', async () => {
    const { createBackend, backendInfo } = recordingEntry();
    const bytes = await wasmBytes();
    expect(permuted(await createBackend({ wasm: bytes }))).toEqual([10, 20, 20, 30]);
    expect(permuted(await createBackend({ wasm: new Uint8Array(bytes) }))).toEqual([10, 20, 20, 30]);
    expect(permuted(await createBackend({ wasm: await WebAssembly.compile(bytes) }))).toEqual([10, 20, 20, 30]);
    expect(permuted(await createBackend({ wasm: WASM_URL }))).toEqual([10, 20, 20, 30]);
    expect(permuted(await createBackend({ wasm: WASM_URL.href }))).toEqual([10, 20, 20, 30]);
    expect((await backendInfo({ wasm: bytes })).find((i) => i.name === 'wasm')).toMatchObject({ available: true });
  });

  it.runIf(IN_NODE)('options.wasm in Node: a file path', async () => {
    const { fileURLToPath } = await import('node:url');
    const { createBackend } = recordingEntry();
    expect(permuted(await createBackend({ wasm: fileURLToPath(WASM_URL) }))).toEqual([10, 20, 20, 30]);
  });

  it('options.wasm: a wrong kind is a TypeError; a source that does not load says why', async () => {
    const { createBackend, backendInfo } = recordingEntry();
    await expect(createBackend({ wasm: 42 as never })).rejects.toThrow(new TypeError('options.wasm: expected a URL, a path, the bytes of moe_wasm_bg.wasm or a WebAssembly.Module, got number'));
    await expect(backendInfo({ wasm: null as never })).rejects.toThrow(TypeError);
    await expect(createBackend({ wasm: new Uint8Array([0, 97, 115, 109]) })).rejects.toThrow(/wasm: the wasm module failed to load from options\.wasm: /);
    const missing = new URL('../pkg/wasm/missing.wasm', import.meta.url);
    const info = (await backendInfo({ wasm: missing })).find((i) => i.name === 'wasm');
    expect(info).toMatchObject({ available: false });
    expect(info?.reason).toMatch(/the wasm module failed to load from options\.wasm: /);
  });
});
