// The GPU suite, routeBackward and route on 16-bit logits: the 'cuda' backend against the 'cpu'
// backend, bit for bit. routeBackward on device tensors runs its kernel (kernels/routing.cu; 16-bit
// logits, k > 32 and invalid values take the host path), with host tensors the CPU core; the
// bits must be the CPU's with host tensors, device tensors and a mix of both; indices may come
// from route on the GPU (device int32). route takes bfloat16 / float16 logits (host: converted to float32 before the kernel;
// device: the host path) and must give the CPU's results for their float32 conversion. Errors:
// same class and message as the CPU backend.
//
// Plain JavaScript on node:test, like cuda.test.mjs; skips with the reason where CUDA is
// unavailable. MOE_GPU_SUITE_STANDIN=wasm runs it with wasm in cuda's place and host tensors in
// place of device tensors (to check the suite itself on a machine with no GPU); the tests that
// need device tensors skip then.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertSameBits, assertSameError, cpu, cuda, cudaInfo, cudaOnly, free, lib, outcome, rng, skip, standIn, tensor, up, upAll, sameErrorsAsCpu } from './common.mjs';

if (skip) console.log(`# ${skip}`);
else if (standIn) console.log(`# stand-in run: ${standIn} in cuda's place, host tensors in place of device tensors`);

// ---------------------------------------------------------------------------------------
// Helpers

function assertDevice(t, what) {
  if (!standIn) assert.ok(lib.isDeviceTensor(t), `${what}: not a device tensor`);
}

const f32 = (shape, values) => tensor('float32', shape, Float32Array.from(values));
const uniform = (random, n, lo, hi) => Array.from({ length: n }, () => Math.fround(lo + (hi - lo) * random()));

// ---------------------------------------------------------------------------------------
// Random problems

const FNS = ['softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'];
const PROBLEMS = [];
{
  const random = rng(2718);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 60; i++) {
    const sf = FNS[i % FNS.length];
    const E = pick([2, 4, 8, 16, 40, 64, 100, 256]);
    const T = pick([0, 1, 7, 64, 300, 2048]);
    const groupable = sf !== 'softmax' && sf !== 'sqrtsoftplus';
    const divisors = [2, 4, 8].filter((g) => E % g === 0 && E / g >= 2);
    const G = groupable && divisors.length && random() < 0.6 ? pick(divisors) : 1;
    const kg = G > 1 ? 1 + Math.floor(random() * G) : undefined;
    const maxK = G > 1 ? kg * (E / G) : E;
    const options = { topk: 1 + Math.floor(random() * Math.min(maxK, 8)), scoreFunction: sf, normTopkProb: random() < 0.5, routeScale: pick([1, 2.5, -0.5]) };
    if (sf === 'softmax' && random() < 0.5) options.softmaxBeforeTopk = true;
    if (G > 1) Object.assign(options, { numGroups: G, topkGroups: kg });
    if (sf !== 'softmax' && random() < 0.5) options.expertBias = f32([E], uniform(random, E, -0.1, 0.1));
    if (random() < 0.3)
      options.tokenMask = tensor(
        'bool',
        [T],
        Uint8Array.from({ length: T }, () => (random() < 0.7 ? 1 : 0)),
      );
    const spread = pick([1, 8, 40]);
    PROBLEMS.push({
      T,
      E,
      options,
      logits: f32([T, E], uniform(random, T * E, -spread, spread)),
      gradWeights: f32([T, options.topk], uniform(random, T * options.topk, -1, 1)),
      gradScores: random() < 0.5 ? f32([T, E], uniform(random, T * E, -1, 1)) : undefined,
      dtype: pick(['float32', 'float32', 'bfloat16', 'float16']),
      seed: i + 1,
    });
  }
  // many experts (E = 1100: a row is 35 warp steps), with and without gradScores, and softmax on
  // the picked logits without them (no scores at all)
  for (const [i, [sf, withScores, extra]] of [
    ['softmax', true, { normTopkProb: true }],
    ['sigmoid', false, { normTopkProb: true, routeScale: 2.5 }],
    ['softmax', false, {}],
    ['softmax', true, { softmaxBeforeTopk: true }],
  ].entries()) {
    const E = 1100,
      T = 37;
    const options = { topk: 6, scoreFunction: sf, ...extra };
    PROBLEMS.push({
      T,
      E,
      options,
      logits: f32([T, E], uniform(random, T * E, -8, 8)),
      gradWeights: f32([T, 6], uniform(random, T * 6, -1, 1)),
      gradScores: withScores ? f32([T, E], uniform(random, T * E, -1, 1)) : undefined,
      dtype: 'float32',
      seed: 61 + i,
    });
  }
}

function label(p) {
  const o = p.options;
  return `T=${p.T} E=${p.E} k=${o.topk} ${o.scoreFunction}${o.numGroups ? ` groups ${o.topkGroups}/${o.numGroups}` : ''}${o.expertBias ? ' bias' : ''}${o.tokenMask ? ' mask' : ''}${o.normTopkProb ? ' norm' : ''} scale=${o.routeScale}${o.softmaxBeforeTopk ? ' softmaxBeforeTopk' : ''}${p.gradScores ? ' gradScores' : ''} ${p.dtype} #${p.seed}`;
}

/** The logits in `dtype`, and their float32 conversion (what the CPU reference routes). */
function logitsIn(p) {
  if (p.dtype === 'float32') return { logits: p.logits, wide: p.logits };
  const bits = p.dtype === 'bfloat16' ? lib.toBFloat16Bits : lib.toFloat16Bits;
  const value = p.dtype === 'bfloat16' ? lib.fromBFloat16Bits : lib.fromFloat16Bits;
  const stored = Uint16Array.from(p.logits.data, bits);
  return { logits: tensor(p.dtype, [p.T, p.E], stored), wide: f32([p.T, p.E], Array.from(stored, value)) };
}

describe('routeBackward: cuda == cpu (host tensors, device tensors, a mix)', () => {
  for (const p of PROBLEMS) {
    test(label(p), { skip }, () => {
      const { logits, wide } = logitsIn(p);
      const options = { ...p.options, ...(p.gradScores ? { gradScores: p.gradScores } : {}) };
      const routed = cpu.route(wide, p.options);
      const want = cpu.routeBackward(p.gradWeights, wide, routed.indices, options).gradLogits;

      // host tensors in, host tensors out
      const host = cuda.routeBackward(p.gradWeights, logits, routed.indices, options).gradLogits;
      assert.ok(!lib.isDeviceTensor(host), 'host in: a host tensor out');
      assertSameBits(host, want, 'host');

      // device tensors: the indices of route on the GPU (from the 16-bit logits), every tensor uploaded
      const dLogits = up(logits);
      const dRouteOptions = upAll(p.options);
      const dRouted = cuda.route(dLogits, dRouteOptions);
      assertSameBits(dRouted.indices, routed.indices, 'route on the GPU: indices');
      assertSameBits(dRouted.weights, routed.weights, 'route on the GPU: weights');
      const dOptions = upAll(options);
      const dGrad = up(p.gradWeights);
      const dev = cuda.routeBackward(dGrad, dLogits, dRouted.indices, dOptions).gradLogits;
      assertDevice(dev, 'device');
      assertSameBits(dev, want, 'device');

      // a mix: device logits only
      const mixed = cuda.routeBackward(p.gradWeights, dLogits, routed.indices, options).gradLogits;
      assertDevice(mixed, 'mixed');
      assertSameBits(mixed, want, 'mixed (device logits)');
      free(dLogits, dRouteOptions, dRouted, dOptions, dGrad, dev, mixed);
    });
  }
});

describe('route on 16-bit logits: cuda == cpu on their float32 conversion', () => {
  for (const p of PROBLEMS.filter((q) => q.dtype !== 'float32').slice(0, 20)) {
    test(label(p), { skip }, () => {
      const { logits, wide } = logitsIn(p);
      const want = cpu.route(wide, p.options);
      const host = cuda.route(logits, p.options);
      for (const key of ['weights', 'indices', 'scores', 'tokensPerExpert']) assertSameBits(host[key], want[key], `host ${key}`);
      const d = up(logits);
      const dOptions = upAll(p.options);
      const dev = cuda.route(d, dOptions);
      for (const key of ['weights', 'indices', 'scores', 'tokensPerExpert']) {
        assertDevice(dev[key], `device ${key}`);
        assertSameBits(dev[key], want[key], `device ${key}`);
      }
      free(d, dOptions, dev);
    });
  }
});

// ---------------------------------------------------------------------------------------
// Errors, and where the op runs

describe('routeBackward errors: same class and message as cpu (host and device tensors)', () => {
  const L = f32([2, 4], [0.1, 0.2, 0.3, 0.4, 0.8, 0.7, 0.6, 0.5]);
  const GW = f32([2, 2], [1, 0.5, -1, 2]);
  const IDX = tensor('int32', [2, 2], Int32Array.from([3, 2, 0, 1]));
  const cases = {
    'a repeated pick': (b, u) => b.routeBackward(u(GW), u(L), u(tensor('int32', [2, 2], Int32Array.from([3, 2, 0, 0]))), { topk: 2 }),
    'an index past numExperts': (b, u) => b.routeBackward(u(GW), u(L), u(tensor('int32', [2, 2], Int32Array.from([3, 2, 4, 1]))), { topk: 2 }),
    '-1 among picks': (b, u) => b.routeBackward(u(GW), u(L), u(tensor('int32', [2, 2], Int32Array.from([3, -1, 0, 1]))), { topk: 2 }),
    'indices of the wrong shape': (b, u) => b.routeBackward(u(GW), u(L), u(tensor('int32', [2, 1], Int32Array.from([3, 0]))), { topk: 2 }),
    'gradWeights of the wrong shape': (b, u) => b.routeBackward(u(f32([2, 1], [1, 1])), u(L), u(IDX), { topk: 2 }),
    'gradScores of the wrong shape': (b, u) => b.routeBackward(u(GW), u(L), u(IDX), { topk: 2, gradScores: u(f32([2, 2], [0, 0, 0, 0])) }),
    'gradWeights as bfloat16': (b, u) => b.routeBackward(u(tensor('bfloat16', [2, 2])), u(L), u(IDX), { topk: 2 }),
    'non-finite logits': (b, u) => b.routeBackward(u(GW), u(f32([2, 4], [0, 0, 0, 0, 0, NaN, 0, 0])), u(IDX), { topk: 2 }),
    "route's option check: numGroups with softmax": (b, u) => b.routeBackward(u(GW), u(L), u(IDX), { topk: 2, numGroups: 2 }),
    "route's option check: expertBias of the wrong length": (b, u) => b.routeBackward(u(GW), u(L), u(IDX), { topk: 2, scoreFunction: 'sigmoid', expertBias: u(f32([3], [0, 0, 0])) }),
    'tokenMask of the wrong length': (b, u) => b.routeBackward(u(GW), u(L), u(IDX), { topk: 2, tokenMask: u(tensor('bool', [3], Uint8Array.from([1, 1, 1]))) }),
    'an unknown option': (b, u) => b.routeBackward(u(GW), u(L), u(IDX), { topk: 2, gradWeight: 1 }),
  };
  sameErrorsAsCpu(cases);
});

describe('where routeBackward runs', () => {
  test('a method of the cuda backend, among backendInfo().gpuOps (its kernel)', { skip: cudaOnly }, () => {
    assert.equal(typeof cuda.routeBackward, 'function');
    assert.ok(cudaInfo.gpuOps.includes('routeBackward'), `gpuOps: ${cudaInfo.gpuOps.join(', ')}`);
    assert.ok(cudaInfo.gpuOps.includes('route'));
  });

  test('device memory: the call leaves no device tensor behind but its result', { skip: cudaOnly }, () => {
    const L = up(f32([64, 16], uniform(rng(5), 64 * 16, -3, 3)));
    const routed = cuda.route(L, { topk: 4, scoreFunction: 'sigmoid', normTopkProb: true });
    const gw = up(f32([64, 4], uniform(rng(6), 256, -1, 1)));
    cuda.synchronize();
    const before = cuda.memory().liveBuffers;
    const { gradLogits } = cuda.routeBackward(gw, L, routed.indices, { topk: 4, scoreFunction: 'sigmoid', normTopkProb: true });
    assert.equal(cuda.memory().liveBuffers, before + 1, 'one new buffer: gradLogits');
    free(L, routed, gw, gradLogits);
  });

  test("route's own outputs skip the later ops' value checks (no waits); other tensors are still checked", { skip: cudaOnly }, () => {
    const [T, E, k, H] = [96, 16, 4, 32];
    const options = { topk: k, scoreFunction: 'softmax' };
    const logitsHost = f32([T, E], uniform(rng(7), T * E, -3, 3));
    const x = tensor('float32', [T, H], Float32Array.from(uniform(rng(8), T * H, -1, 1)));
    const L = up(logitsHost);
    const X = up(x);
    const routed = cuda.route(L, options);
    const sync0 = cuda.transfers().synchronizations;
    const mh = cuda.indicesToMultihot(routed.indices, routed.weights, E);
    const perm = cuda.permute(X, mh.routingMap, { probs: mh.probs, numOutTokens: T * k });
    const gp = up(f32([T * k], uniform(rng(9), T * k, -1, 1)));
    const gx = up(tensor('float32', [T * k, H], Float32Array.from(uniform(rng(10), T * k * H, -1, 1))));
    const back = cuda.permuteBackward(gx, perm.sortedIndices, T, { gradPermutedProbs: gp, routingMap: mh.routingMap });
    const gw = up(f32([T, k], uniform(rng(11), T * k, -1, 1)));
    const rb = cuda.routeBackward(gw, L, routed.indices, options);
    assert.equal(cuda.transfers().synchronizations, sync0, "indicesToMultihot, permute, permuteBackward and routeBackward on route's outputs wait for nothing");
    // the same bits as the cpu backend on the same values
    const hIdx = routed.indices.download();
    const hmh = cpu.indicesToMultihot(hIdx, routed.weights.download(), E);
    assertSameBits(mh.routingMap, hmh.routingMap, 'routingMap');
    const hperm = cpu.permute(x, hmh.routingMap, { probs: hmh.probs, numOutTokens: T * k });
    assertSameBits(perm.permutedTokens, hperm.permutedTokens, 'permutedTokens');
    const hback = cpu.permuteBackward(gx.download(), hperm.sortedIndices, T, { gradPermutedProbs: gp.download(), routingMap: hmh.routingMap });
    assertSameBits(back.gradTokens, hback.gradTokens, 'permuteBackward gradTokens');
    assertSameBits(back.gradProbs, hback.gradProbs, 'permuteBackward gradProbs');
    assertSameBits(rb.gradLogits, cpu.routeBackward(gw.download(), logitsHost, hIdx, options).gradLogits, 'routeBackward');
    // a copy of route's indices (uploaded) is checked as any tensor: invalid values still raise the core's error
    const bad = hIdx.data.slice();
    bad[0] = E + 3;
    const badIdx = up(tensor('int32', [T, k], bad));
    assertSameError(
      () => cuda.indicesToMultihot(badIdx, routed.weights, E),
      () => cpu.indicesToMultihot(tensor('int32', [T, k], bad), routed.weights.download(), E),
      'indicesToMultihot, uploaded indices',
    );
    // route's indices with other logits (NaN): routeBackward checks them (the logits are not the ones route checked)
    const nanLogits = logitsHost.data.slice();
    nanLogits[5] = NaN;
    const L2 = up(f32([T, E], nanLogits));
    assertSameError(
      () => cuda.routeBackward(gw, L2, routed.indices, options),
      () => cpu.routeBackward(gw.download(), f32([T, E], nanLogits), hIdx, options),
      'routeBackward, other logits',
    );
    // permuteBackward with another map of the same size as the plan's (row t picks t, t + 1, ... mod E): checked (the cpu backend's answer)
    const other = cpu.indicesToMultihot(
      tensor(
        'int32',
        [T, k],
        Int32Array.from(hIdx.data, (_, i) => (Math.floor(i / k) + (i % k)) % E),
      ),
      routed.weights.download(),
      E,
    );
    const otherMap = up(other.routingMap);
    const mine = outcome(() => cuda.permuteBackward(gx, perm.sortedIndices, T, { gradPermutedProbs: gp, routingMap: otherMap }));
    const theirs = outcome(() => cpu.permuteBackward(gx.download(), hperm.sortedIndices, T, { gradPermutedProbs: gp.download(), routingMap: other.routingMap }));
    if (theirs.error)
      assertSameError(
        () => {
          if (mine.error) throw mine.error;
        },
        () => {
          throw theirs.error;
        },
        'permuteBackward, another map',
      );
    else for (const key of ['gradTokens', 'gradProbs']) assertSameBits(mine.value?.[key], theirs.value[key], `permuteBackward, another map: ${key}`);
    free(L, X, routed, mh, perm, gp, gx, back, gw, rb, badIdx, L2, otherMap);
  });
});
