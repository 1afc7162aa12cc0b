/**
 * Runs only in the chromium project (vitest browser mode, headless Debian Chromium): the
 * browser entry (ts/browser.ts, which `../ts/index.js` resolves to there) in a real browser.
 */
import { describe, expect, it } from 'vitest';

import { backendInfo, createBackend, MoELayer, tensor } from '../ts/index.js';
import { backends, unavailable } from './backends.js';

describe('the browser entry in Chromium', () => {
  it('runs in a real browser, not in Node', () => {
    expect(typeof window).toBe('object');
    expect(typeof document.createElement).toBe('function');
    expect(navigator.userAgent).toMatch(/Chrome\/\d+/);
    // vitest puts a small `process` stand-in on the page; it is not Node's.
    expect((globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node).toBeUndefined();
  });

  it('backendInfo() lists wasm and webgpu (SwiftShader, --enable-unsafe-webgpu) as available and cpu, cuda as unavailable with the reason', async () => {
    const infos = await backendInfo();
    expect(infos.map((i) => i.name)).toEqual(['cuda', 'cpu', 'webgpu', 'wasm']);
    const by = Object.fromEntries(infos.map((i) => [i.name, i]));
    expect(by.wasm).toMatchObject({ available: true, threads: 1 });
    expect(by.webgpu).toMatchObject({ available: true, threads: 1 });
    expect(by.cpu.available).toBe(false);
    expect(by.cpu.reason).toMatch(/N-API addon; this is the browser entry/);
    expect(by.cuda.available).toBe(false);
    expect(by.cuda.reason).toMatch(/browser entry/);
  });

  it('the backends helper reports native as unavailable (a skipped test with the reason), and runs webgpu and wasm', () => {
    expect(backends.map((b) => b.name)).toEqual(['webgpu', 'wasm']);
    expect(unavailable.map((u) => u.name).sort()).toEqual(['cpu', 'cuda']);
    expect(unavailable.find((u) => u.name === 'cpu')!.reason).toMatch(/Node\.js N-API addon/);
  });

  it("createBackend() picks webgpu (an adapter is there), else wasm; { prefer: 'cpu' } is an error that says why", async () => {
    expect((await createBackend()).name).toBe('webgpu');
    expect((await createBackend({ prefer: 'wasm' })).name).toBe('wasm');
    await expect(createBackend({ prefer: 'cpu' })).rejects.toThrow(/no moe-dispatch backend is available \(cpu: the native backend is a Node\.js N-API addon/);
  });

  it('the module was fetched over HTTP and computes in the page', async () => {
    const moe = await createBackend({ prefer: 'wasm' });
    const wasm = performance.getEntriesByType('resource').filter((e) => e.name.includes('moe_wasm_bg.wasm'));
    expect(wasm.length, 'a fetch of moe_wasm_bg.wasm').toBeGreaterThan(0);
    const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 1, 1, 0, 1]));
    const tokens = tensor('float32', [3, 1], Float32Array.from([10, 20, 30]));
    const out = moe.permute(tokens, map);
    expect(Array.from(out.sortedIndices.data)).toEqual([0, 1, 1, 2]);
    expect(Array.from(out.permutedTokens.data as Float32Array)).toEqual([10, 20, 20, 30]);
    expect(Array.from(out.tokensPerExpert.data)).toEqual([2, 2]);
  });

  it('MoELayer.fromPretrained with a config path says that a path needs Node.js (no file system here)', async () => {
    const moe = await createBackend({ prefer: 'wasm' });
    await expect(MoELayer.fromPretrained(moe, { config: 'model/config.json', layer: 0 })).rejects.toThrow(
      new TypeError('config: a path needs Node.js (in a browser, pass the parsed config.json object)'),
    );
  });
});
