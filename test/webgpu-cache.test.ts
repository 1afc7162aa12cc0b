/**
 * The webgpu backend's buffer cache (ts/webgpu/gpu.ts): buffers of disposed tensors and of ops'
 * scratch are reused, and a reused buffer behaves as a new one (zeroed where the op relies on
 * it, never showing an earlier op's data). Runs in the chromium project (SwiftShader); in Node
 * only the size classes are checked.
 */
import { describe, expect, it } from 'vitest';

import { backendInfo, createBackend, isWebGpuBackend, tensor, type Tensor } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { sizeClass, softwareAdapter } from '../ts/webgpu/gpu.js';
import { bitsOf } from './util.js';

describe('webgpu buffer size classes', () => {
  it('round up by at most 12.5% (256 bytes below 64 KiB), never down, and are stable', () => {
    for (const size of [4, 255, 256, 257, 65536, 65537, 100_000, 1 << 20, (1 << 20) + 4, 134_217_728, 134_217_732, 300_000_004]) {
      const c = sizeClass(size);
      expect(c).toBeGreaterThanOrEqual(size);
      expect(c % 4).toBe(0);
      expect(c <= 65536 ? c - size < 256 : c <= size * 1.125).toBe(true);
      expect(sizeClass(c)).toBe(c);
    }
    expect(sizeClass(1)).toBe(256);
    expect(sizeClass(1 << 20)).toBe(1 << 20);
    expect(sizeClass((1 << 20) + 4)).toBe((1 << 20) + (1 << 17));
  });
});

describe('webgpu list passes: software adapters (indirect dispatch) from GPUs (direct)', () => {
  it('tells them apart by the adapter description', () => {
    for (const d of [
      'WebGPU adapter google / swiftshader',
      'WebGPU adapter google / swiftshader / swiftshader-device-subzero- / SwiftShader driver 5.0.0',
      'WebGPU adapter mesa / llvmpipe (LLVM 19.1.7, 256 bits)',
      'WebGPU adapter microsoft / Microsoft Basic Render Driver',
      'WebGPU adapter (no adapter info) (fallback adapter)',
    ])
      expect(softwareAdapter(d), d).toBe(true);
    for (const d of ['WebGPU adapter nvidia / nvidia-h200 / NVIDIA: 580.159.04 580.159.4.0', 'WebGPU adapter apple / metal-3', 'WebGPU adapter (no adapter info)'])
      expect(softwareAdapter(d), d).toBe(false);
  });
});

const info = (await backendInfo()).find((i) => i.name === 'webgpu');
const moe = info?.available ? await createBackend({ prefer: 'webgpu' }) : undefined;
const wasm = await createBackend({ prefer: 'wasm' });

describe.skipIf(!moe || !isWebGpuBackend(moe))('webgpu buffer cache', { timeout: 120_000 }, () => {
  const gpu = moe as Extract<typeof moe, { upload: unknown }>;
  const same = (got: Tensor, want: Tensor, what: string) => {
    expect([...got.shape], what).toEqual([...want.shape]);
    expect(bitsOf(got), what).toEqual(bitsOf(want));
  };

  it('reused buffers give the same bits as wasm, op after op, and zeros where nothing is written', async () => {
    for (let round = 0; round < 4; round++) {
      for (const dtype of ['float32', 'bfloat16'] as const) {
        const r = randomRouting({ numTokens: 40 + round, numExperts: 6, topk: 2, hidden: 16, dtype }, rng(round));
        const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, 6);
        const want = wasm.permute(r.tokens, routingMap, { probs });
        const x = gpu.upload(r.tokens);
        const got = await gpu.gpu.permute(x, routingMap, { probs });
        const host = await gpu.toHost(got);
        same(host.permutedTokens, want.permutedTokens, 'permutedTokens');
        same(host.sortedIndices, want.sortedIndices, 'sortedIndices');
        same(host.tokensPerExpert, want.tokensPerExpert, 'tokensPerExpert');
        const back = await gpu.gpu.unpermute(got.permutedTokens, got.sortedIndices, [r.tokens.shape[0], 16], { probs: got.permutedProbs });
        same(await back.download(), wasm.unpermute(want.permutedTokens, want.sortedIndices, [r.tokens.shape[0], 16], { probs: want.permutedProbs! }), 'unpermute');
        for (const t of [x, back, ...Object.values(got)]) t.dispose();
        // no tokens: no shader writes the counts, which are zeros even in a reused buffer that held counts
        const empty = dtype === 'float32' ? new Float32Array(0) : new Uint16Array(0);
        const x0 = gpu.upload(tensor(dtype, [0, 16], empty as never));
        const none = await gpu.gpu.permute(x0, tensor('bool', [0, 6], new Uint8Array(0)));
        expect([...(await none.tokensPerExpert.download()).data]).toEqual([0, 0, 0, 0, 0, 0]);
        for (const t of [x0, ...Object.values(none)]) t.dispose();
      }
    }
    expect(gpu.memory().cachedBytes).toBeGreaterThan(0);
  });

  it("routeBackward over the picks alone: a reused output buffer's old values never show off the picks", async () => {
    const [T, E, k] = [29, 12, 3];
    const random = rng(5);
    const logits = tensor(
      'float32',
      [T, E],
      Float32Array.from({ length: T * E }, () => random() * 8 - 4),
    );
    const gw = tensor(
      'float32',
      [T, k],
      Float32Array.from({ length: T * k }, () => random() * 2 - 1),
    );
    for (const o of [{ topk: k }, { topk: k, scoreFunction: 'sigmoid', normTopkProb: true }]) {
      // buffers of the output's size, full of non-zero bits, back in the cache
      for (let i = 0; i < 3; i++) gpu.upload(tensor('float32', [T, E], new Float32Array(T * E).fill(7.5))).dispose();
      const dl = gpu.upload(logits);
      const r = await gpu.gpu.route(dl, o);
      const got = await gpu.gpu.routeBackward(gpu.upload(gw), dl, r.indices, o);
      same((await gpu.toHost(got)).gradLogits, wasm.routeBackward(gw, logits, wasm.route(logits, o).indices, o).gradLogits, `routeBackward ${o.scoreFunction ?? 'softmax'}`);
      for (const t of [dl, got.gradLogits, ...Object.values(r)]) t.dispose();
    }
  });

  it("keeps the inverse of a device sortedIndices with it: later ops on it agree with wasm, its bytes are live until the tensor's dispose()", async () => {
    const [T, E, k, H] = [37, 5, 2, 8];
    const r = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype: 'float32' }, rng(11));
    const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, E);
    const want = wasm.permute(r.tokens, routingMap, { probs });
    const got = await gpu.gpu.permute(gpu.upload(r.tokens), routingMap, { probs });
    const n = got.sortedIndices.shape[0];
    // the inverse for t tokens: start [t + 1] and list [n] int32, in the cache's size classes
    const inverseBytes = (t: number) => sizeClass(4 * (t + 1)) + sizeClass(4 * n);
    const live = () => gpu.memory().liveBytes;
    const grad = tensor(
      'float32',
      [n, H],
      Float32Array.from({ length: n * H }, (_, i) => ((i * 7919) % 23) - 11),
    );
    const before = live();
    const outs = [];
    for (let round = 0; round < 2; round++) {
      const back = await gpu.gpu.unpermute(got.permutedTokens, got.sortedIndices, [T, H], { probs: got.permutedProbs });
      same(await back.download(), wasm.unpermute(want.permutedTokens, want.sortedIndices, [T, H], { probs: want.permutedProbs! }), `unpermute, call ${round}`);
      outs.push(back);
      // the first call keeps the inverse for T tokens; the second uses it and keeps nothing more
      expect(live() - before, `live bytes after unpermute ${round}`).toBe((round + 1) * back.byteLength + inverseBytes(T));
    }
    // permuteBackward on the same tensor and T: the kept inverse; on T + 3 tokens: another one, kept beside it
    for (const t of [T, T + 3]) {
      const before2 = live();
      const g = await gpu.gpu.permuteBackward(grad, got.sortedIndices, t);
      same(await g.gradTokens.download(), wasm.permuteBackward(grad, want.sortedIndices, t).gradTokens, `permuteBackward, ${t} tokens`);
      expect(live() - before2, `live bytes after permuteBackward to ${t} tokens`).toBe(g.gradTokens.byteLength + (t === T ? 0 : inverseBytes(t)));
      outs.push(g.gradTokens);
    }
    // a host sortedIndices is uploaded for the call: nothing is kept
    const before3 = live();
    const h = await gpu.gpu.unpermute(got.permutedTokens, want.sortedIndices, [T, H]);
    same(await h.download(), wasm.unpermute(want.permutedTokens, want.sortedIndices, [T, H]), 'unpermute, host sortedIndices');
    expect(live() - before3).toBe(h.byteLength);
    for (const t of [h, ...outs]) t.dispose();
    // the tensor's dispose() gives back its bytes and both inverses
    const before4 = live();
    const sortedBytes = got.sortedIndices.byteLength;
    got.sortedIndices.dispose();
    expect(before4 - live()).toBe(sortedBytes + inverseBytes(T) + inverseBytes(T + 3));
    for (const t of Object.values(got)) t.dispose();
  });

  it('releaseCachedMemory() empties the cache; live tensors are untouched', async () => {
    const keep = gpu.upload(tensor('float32', [3], new Float32Array([1, 2, 3])));
    (await gpu.gpu.tokensPerExpert(tensor('bool', [2, 2], new Uint8Array([1, 0, 1, 1])))).dispose();
    expect(gpu.memory().cachedBytes).toBeGreaterThan(0);
    gpu.releaseCachedMemory();
    expect(gpu.memory().cachedBytes).toBe(0);
    expect([...(await keep.download()).data]).toEqual([1, 2, 3]);
    keep.dispose();
  });
});
