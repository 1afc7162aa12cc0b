/**
 * The webgpu backend's facts (ts/backends/webgpu-tensor.ts): a device pipeline route ->
 * indicesToMultihot -> permute -> unpermute on its own outputs checks them by what the ops that
 * made them know, without reading them back, gives wasm's bits, and still gives the core's
 * errors where a fact does not cover the call. Runs in the chromium project (SwiftShader).
 */
import { describe, expect, it } from 'vitest';

import { backendInfo, createBackend, isWebGpuBackend, tensor, type Tensor, type WebGpuBackend } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { bitsOf } from './util.js';

const info = (await backendInfo()).find((i) => i.name === 'webgpu');
const made = info?.available ? await createBackend({ prefer: 'webgpu' }) : undefined;
const moe = made && isWebGpuBackend(made) ? (made as WebGpuBackend) : undefined;
const wasm = await createBackend({ prefer: 'wasm' });

const same = (got: Tensor, want: Tensor, what: string) => {
  expect([...got.shape], what).toEqual([...want.shape]);
  expect(bitsOf(got), what).toEqual(bitsOf(want));
};

/** The error `f` throws (class and message), or 'ok'. */
async function outcome(f: () => unknown): Promise<string> {
  try {
    await f();
    return 'ok';
  } catch (e) {
    return `${(e as Error).constructor.name}: ${(e as Error).message}`;
  }
}

describe.skipIf(!moe)('webgpu facts: device pipelines check without reading back', { timeout: 120_000 }, () => {
  for (const masked of [false, true]) {
    it(`route -> indicesToMultihot -> permute -> unpermute and their backward on device tensors${masked ? ' (a token mask)' : ''}: wasm's bits, one read-back (route's check)`, async () => {
      const T = 37;
      const E = 8;
      const k = 3;
      const H = 16;
      const r = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype: 'bfloat16' }, rng(5));
      const g = rng(6);
      const logits = tensor(
        'float32',
        [T, E],
        Float32Array.from({ length: T * E }, () => g() * 4 - 2),
      );
      const tokenMask = masked
        ? tensor(
            'bool',
            [T],
            Uint8Array.from({ length: T }, (_, i) => (i % 5 === 2 ? 0 : 1)),
          )
        : undefined;
      const want = (() => {
        const ro = wasm.route(logits, { topk: k, tokenMask });
        const mh = wasm.indicesToMultihot(ro.indices, ro.weights, E);
        const p = wasm.permute(r.tokens, mh.routingMap, { probs: mh.probs });
        return { mh, p, y: wasm.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs! }) };
      })();
      const l = moe!.upload(logits);
      const x = moe!.upload(r.tokens);
      const before = moe!.transfers();
      const ro = await moe!.gpu.route(l, { topk: k, tokenMask });
      const mh = await moe!.gpu.indicesToMultihot(ro.indices, ro.weights, E);
      const p = await moe!.gpu.permute(x, mh.routingMap, { probs: mh.probs });
      const y = await moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs });
      const after = moe!.transfers();
      // route reads its 4-byte non-finite flag back; nothing else of the pipeline comes back
      expect(after.toHostCalls - before.toHostCalls).toBe(1);
      expect(after.toHostBytes - before.toHostBytes).toBe(4);
      same(await mh.routingMap.download(), want.mh.routingMap, 'routingMap');
      same(await p.permutedTokens.download(), want.p.permutedTokens, 'permutedTokens');
      same(await p.sortedIndices.download(), want.p.sortedIndices, 'sortedIndices');
      same(await p.permutedProbs!.download(), want.p.permutedProbs!, 'permutedProbs');
      same(await y.download(), want.y, 'unpermute');
      // the backward on the same outputs: nothing read back
      const gh = tensor(
        'bfloat16',
        [T, H],
        Uint16Array.from({ length: T * H }, (_, i) => 0x3f80 + (i % 61)),
      );
      const gp = wasm.permute(gh, want.mh.routingMap).permutedTokens;
      const wantUb = wasm.unpermuteBackward(gh, want.p.permutedTokens, want.p.sortedIndices, { probs: want.p.permutedProbs! });
      const wantPb = wasm.permuteBackward(gp, want.p.sortedIndices, T);
      const gd = moe!.upload(gh);
      const gpd = moe!.upload(gp);
      const mid = moe!.transfers();
      const ub = await moe!.gpu.unpermuteBackward(gd, p.permutedTokens, p.sortedIndices, { probs: p.permutedProbs });
      const pb = await moe!.gpu.permuteBackward(gpd, p.sortedIndices, T);
      expect(moe!.transfers().toHostCalls - mid.toHostCalls).toBe(0);
      same(await ub.gradPermuted.download(), wantUb.gradPermuted, 'unpermuteBackward.gradPermuted');
      same(await ub.gradProbs!.download(), wantUb.gradProbs!, 'unpermuteBackward.gradProbs');
      same(await pb.gradTokens.download(), wantPb.gradTokens, 'permuteBackward.gradTokens');
      for (const t of [l, x, y, gd, gpd, ...Object.values(ub), ...Object.values(pb), ...Object.values(ro), ...Object.values(mh), ...Object.values(p)]) (t as { dispose(): void }).dispose();
    });
  }

  it("where a fact does not cover the call, the core's error (as wasm's)", async () => {
    const T = 6;
    const E = 5;
    const logits = tensor(
      'float32',
      [T, E],
      Float32Array.from({ length: T * E }, (_, i) => Math.sin(i)),
    );
    const ro = await moe!.gpu.route(moe!.upload(logits), { topk: 2 });
    const host = wasm.route(logits, { topk: 2 });
    // fewer experts than route's picks may name
    expect(await outcome(() => moe!.gpu.indicesToMultihot(ro.indices, ro.weights, 3))).toBe(await outcome(() => wasm.indicesToMultihot(host.indices, host.weights, 3)));
    const mh = await moe!.gpu.indicesToMultihot(ro.indices, ro.weights, E);
    const hmh = wasm.indicesToMultihot(host.indices, host.weights, E);
    const x = tensor('float32', [T, 4], new Float32Array(T * 4).fill(1));
    // numOutTokens other than the map's count
    expect(await outcome(() => moe!.gpu.permute(moe!.upload(x), mh.routingMap, { numOutTokens: 7 }))).toBe(await outcome(() => wasm.permute(x, hmh.routingMap, { numOutTokens: 7 })));
    const p = await moe!.gpu.permute(moe!.upload(x), mh.routingMap, { probs: mh.probs });
    const hp = wasm.permute(x, hmh.routingMap, { probs: hmh.probs });
    // restoring fewer tokens than the slots name
    expect(await outcome(() => moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T - 2, 4]))).toBe(await outcome(() => wasm.unpermute(hp.permutedTokens, hp.sortedIndices, [T - 2, 4])));
    // a backward over fewer tokens than the slots name
    const gx = tensor('float32', [T - 2, 4], new Float32Array((T - 2) * 4).fill(0.5));
    expect(await outcome(() => moe!.gpu.unpermuteBackward(moe!.upload(gx), p.permutedTokens, p.sortedIndices))).toBe(
      await outcome(() => wasm.unpermuteBackward(gx, hp.permutedTokens, hp.sortedIndices)),
    );
    expect(await outcome(() => moe!.gpu.permuteBackward(p.permutedTokens, p.sortedIndices, T - 2))).toBe(await outcome(() => wasm.permuteBackward(hp.permutedTokens, hp.sortedIndices, T - 2)));
    // more tokens than the slots name: fine, as on wasm
    same(await (await moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T + 2, 4])).download(), wasm.unpermute(hp.permutedTokens, hp.sortedIndices, [T + 2, 4]), 'unpermute into more tokens');
  });

  it("a check that passed is remembered only for the same arguments: after a pass, a number or shape changed gets the core's error", async () => {
    const T = 6;
    const E = 5;
    const H = 4;
    const logits = tensor(
      'float32',
      [T, E],
      Float32Array.from({ length: T * E }, (_, i) => Math.cos(i)),
    );
    const ro = await moe!.gpu.route(moe!.upload(logits), { topk: 2 });
    const host = wasm.route(logits, { topk: 2 });
    const mh = await moe!.gpu.indicesToMultihot(ro.indices, ro.weights, E);
    const hmh = wasm.indicesToMultihot(host.indices, host.weights, E);
    const x = tensor(
      'float32',
      [T, H],
      Float32Array.from({ length: T * H }, (_, i) => i / 8),
    );
    const n = 2 * T;
    // the second round's passing calls are the remembered checks'
    for (let round = 0; round < 2; round++) {
      const p = await moe!.gpu.permute(moe!.upload(x), mh.routingMap, { probs: mh.probs, numOutTokens: n });
      const hp = wasm.permute(x, hmh.routingMap, { probs: hmh.probs, numOutTokens: n });
      same(await p.permutedTokens.download(), hp.permutedTokens, 'permute');
      const y = await moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs });
      same(await y.download(), wasm.unpermute(hp.permutedTokens, hp.sortedIndices, [T, H], { probs: hp.permutedProbs! }), 'unpermute');
      same(
        await (await moe!.gpu.permuteBackward(p.permutedTokens, p.sortedIndices, T)).gradTokens.download(),
        wasm.permuteBackward(hp.permutedTokens, hp.sortedIndices, T).gradTokens,
        'permuteBackward',
      );
      expect(await outcome(() => moe!.gpu.permute(moe!.upload(x), mh.routingMap, { probs: mh.probs, numOutTokens: n + 1 }))).toBe(
        await outcome(() => wasm.permute(x, hmh.routingMap, { probs: hmh.probs, numOutTokens: n + 1 })),
      );
      const longer = tensor('float32', [n + 1], new Float32Array(n + 1).fill(0.5));
      expect(await outcome(() => moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: moe!.upload(longer) }))).toBe(
        await outcome(() => wasm.unpermute(hp.permutedTokens, hp.sortedIndices, [T, H], { probs: longer })),
      );
      const fewer = tensor('float32', [n - 1, H], new Float32Array((n - 1) * H).fill(0.25));
      expect(await outcome(() => moe!.gpu.permuteBackward(moe!.upload(fewer), p.sortedIndices, T))).toBe(await outcome(() => wasm.permuteBackward(fewer, hp.sortedIndices, T)));
    }
  });

  it("route's option check is remembered only for the same options and bias: after a pass, another topk or bias gets the core's error", async () => {
    const T = 5;
    const E = 4;
    const logits = tensor(
      'float32',
      [T, E],
      Float32Array.from({ length: T * E }, (_, i) => Math.sin(i)),
    );
    const x = moe!.upload(logits);
    const bias = (v: number) => tensor('float32', [E], new Float32Array([0, 1, v, 0]));
    for (let round = 0; round < 2; round++) {
      // the second round's passing calls are the remembered checks'
      const o = { topk: 2, scoreFunction: 'sigmoid' as const, expertBias: bias(2) };
      const got = await moe!.gpu.route(x, o);
      same(await got.indices.download(), wasm.route(logits, o).indices, `route, round ${round}`);
      for (const bad of [{ topk: 5 }, { topk: 2, scoreFunction: 'sigmoid' as const, expertBias: bias(Number.NaN) }, { topk: 2, numGroups: 3 }]) {
        expect(await outcome(() => moe!.gpu.route(x, bad))).toBe(await outcome(() => wasm.route(logits, bad)));
      }
    }
  });

  it("the stand-in checks of activation, topk and the aux losses are remembered only for the same call: after passes, a changed option or count gets the core's error", async () => {
    const x = tensor(
      'float32',
      [3, 8],
      Float32Array.from({ length: 24 }, (_, i) => Math.sin(i)),
    );
    const counts = (v: number[]) => tensor('int32', [v.length], Int32Array.from(v));
    const ones = [1, 1, 1, 1, 1, 1, 1, 1];
    // [op, arguments]: the first of each op passes, the others differ from it in one option, count or shape
    const calls: [string, unknown[]][] = [
      ['activation', [x, { kind: 'swiglu' }]],
      ['activation', [x, { kind: 'swiglu', alpha: -1 }]],
      ['activation', [x, { kind: 'swiglu', limit: -1 }]],
      ['topk', [x, 2]],
      ['topk', [x, 9]],
      ['topk', [x, 0]],
      ['zLoss', [x, { coeff: 0.1 }]],
      ['zLoss', [x, { coeff: -1 }]],
      ['switchLoadBalancingLossFromLogits', [x, counts(ones), { topk: 2, coeff: 0.1 }]],
      ['switchLoadBalancingLossFromLogits', [x, counts(ones), { topk: 2, coeff: -1 }]],
      ['switchLoadBalancingLossFromLogits', [x, counts([1, 1, 1, 1, 1, 1, 1]), { topk: 2, coeff: 0.1 }]],
      ['switchLoadBalancingLossFromLogits', [x, counts([1, 1, 1, 1, 1, 1, 1, -1]), { topk: 2, coeff: 0.1 }]],
    ];
    const g = moe!.gpu as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
    const w = wasm as unknown as Record<string, (...a: unknown[]) => unknown>;
    let passes = 0;
    // the second round's passing calls are the remembered checks'
    for (let round = 0; round < 2; round++) {
      for (const [op, args] of calls) {
        const want = await outcome(() => w[op](...args));
        if (want === 'ok') passes++;
        expect(await outcome(() => g[op](moe!.upload(x), ...args.slice(1))), `${op}(${JSON.stringify(args[args.length - 1])}), round ${round}`).toBe(want);
      }
    }
    expect(passes).toBeGreaterThanOrEqual(8);
  });

  it("a plain routing map's routes are checked on permute's own sortedIndices (not on zeros standing in for them)", async () => {
    // map A permutes; map B has A's column counts but routes tokens 1 and 2 to the other expert.
    // Zeros in place of the slots' tokens would pass B: token 0 is routed to both experts.
    const T = 3;
    const E = 2;
    const a = tensor('bool', [T, E], Uint8Array.from([1, 1, 1, 0, 0, 1]));
    const bMap = tensor('bool', [T, E], Uint8Array.from([1, 1, 0, 1, 1, 0]));
    const x = tensor('float32', [T, 2], Float32Array.from([1, 2, 3, 4, 5, 6]));
    const probs = tensor('float32', [T, E], Float32Array.from([0.5, 0.5, 1, 0, 0, 1]));
    const gp = tensor('float32', [4], Float32Array.from([1, 2, 3, 4]));
    const hp = wasm.permute(x, a, { probs });
    const p = await moe!.gpu.permute(moe!.upload(x), moe!.upload(a), { probs: moe!.upload(probs) });
    const [db, dprobs, dx] = [moe!.upload(bMap), moe!.upload(probs), moe!.upload(x)];
    for (const [what, routingMap, hostMap] of [
      ['another map', db, bMap],
      ["permute's map", moe!.upload(a), a],
    ] as const) {
      const want = {
        permuteBackward: await outcome(() => wasm.permuteBackward(hp.permutedTokens, hp.sortedIndices, T, { gradPermutedProbs: gp, routingMap: hostMap })),
        unpermuteBackward: await outcome(() => wasm.unpermuteBackward(x, hp.permutedTokens, hp.sortedIndices, { probs, routingMap: hostMap })),
        unpermute: await outcome(() => wasm.unpermute(hp.permutedTokens, hp.sortedIndices, [T, 2], { probs, routingMap: hostMap })),
      };
      const got = {
        permuteBackward: await outcome(() => moe!.gpu.permuteBackward(p.permutedTokens, p.sortedIndices, T, { gradPermutedProbs: moe!.upload(gp), routingMap })),
        unpermuteBackward: await outcome(() => moe!.gpu.unpermuteBackward(dx, p.permutedTokens, p.sortedIndices, { probs: dprobs, routingMap })),
        unpermute: await outcome(() => moe!.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, 2], { probs: dprobs, routingMap })),
      };
      expect(got, what).toEqual(want);
      if (what === 'another map') expect(want.permuteBackward).toMatch(/does not route/);
      else expect(want).toEqual({ permuteBackward: 'ok', unpermuteBackward: 'ok', unpermute: 'ok' });
    }
  });
});
