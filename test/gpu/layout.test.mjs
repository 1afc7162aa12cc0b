// The GPU suite, part 3: the layout ops on device tensors (crates/moe-cuda/kernels/layout.cu) and the probs
// gradients of permuteBackward / unpermuteBackward, each checked against the 'cpu' backend bit
// for bit: indicesToMultihot, multihotToIndices, tokensPerExpert, padRoutingMap, dropTokens
// (every policy, ties, NaN, padToCapacity), sortChunksByIndex and its backward, groupedMmSort;
// plus errors (same class and message as the CPU backend) with device and host tensors.
//
// Plain JavaScript on node:test, like cuda.test.mjs; skips with the reason where CUDA is
// unavailable. MOE_GPU_SUITE_STANDIN=wasm runs it with wasm in cuda's place and host tensors in
// place of device tensors (to check the suite itself on a machine with no GPU); the tests that
// need device tensors skip then.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertSameBits, assertSameResult, cpu, cuda, cudaInfo, cudaOnly, free, lib, randomRouting, rng, skip, standIn, tensor, up, upAll, sameErrorsAsCpu } from './common.mjs';
if (skip) console.log(`# ${skip}`);
else if (standIn) console.log(`# stand-in run: ${standIn} in cuda's place, host tensors in place of device tensors`);

// ---------------------------------------------------------------------------------------
// Helpers

/** Every tensor of a result is a device tensor (not checked in stand-in runs). */
function assertAllDevice(result, what) {
  if (standIn) return;
  const values = lib.isDeviceTensor(result) ? [result] : Object.values(result).filter((v) => v && typeof v === 'object');
  for (const v of values) assert.ok(lib.isDeviceTensor(v), `${what}: a result is not a device tensor`);
}

function assertSameDrop(got, want, what) {
  assert.equal(got.capacity, want.capacity, `${what}: capacity`);
  assertSameBits(got.routingMap, want.routingMap, `${what}: routingMap`);
  assertSameBits(got.probs, want.probs, `${what}: probs`);
}

function randomMap(T, E, density, random) {
  const d = new Uint8Array(T * E);
  for (let i = 0; i < d.length; i++) d[i] = random() < density ? 1 : 0;
  return tensor('bool', [T, E], d);
}

/** Probs [T, E] with many ties (a small pool of values, -0 and +0 among them) and some specials. */
function tiedProbs(T, E, random, specials) {
  const pool = [0, -0, 0.25, 0.5, 0.5, 1, -1, 0.125];
  const d = new Float32Array(T * E);
  const u32 = new Uint32Array(d.buffer);
  for (let i = 0; i < d.length; i++) {
    const r = random();
    if (specials && r < 0.03) d[i] = [NaN, Infinity, -Infinity][Math.floor(random() * 3)];
    else if (specials && r < 0.05)
      u32[i] = 0x7f800001 + Math.floor(random() * 0x3fffff) + (random() < 0.5 ? 0x80000000 : 0); // NaN payloads, both signs
    else if (r < 0.6) d[i] = pool[Math.floor(random() * pool.length)];
    else d[i] = random();
  }
  return tensor('float32', [T, E], d);
}

function int64Of(t) {
  return tensor(
    'int64',
    t.shape,
    BigInt64Array.from(t.data, (v) => BigInt(v)),
  );
}

function randomTokens(n, hidden, dtype, random) {
  return randomRouting({ numTokens: n, numExperts: 1, topk: 1, hidden, dtype }, random, 0).tokens;
}

// ---------------------------------------------------------------------------------------
// indicesToMultihot, multihotToIndices, tokensPerExpert, padRoutingMap

const ROUTINGS = [];
{
  const random = rng(424242);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 60; i++) {
    const numExperts = pick([1, 2, 3, 8, 33, 64, 300]);
    const topk = random() < 0.2 ? numExperts : 1 + Math.floor(random() * Math.min(numExperts, 8));
    ROUTINGS.push({ numTokens: pick([0, 1, 2, 7, 64, 65, 200, 1000]), numExperts, topk, hidden: 0, dtype: 'float32', maskRate: pick([0, 0.2, 1]), seed: i + 1 });
  }
  ROUTINGS.push({ numTokens: 5000, numExperts: 256, topk: 8, hidden: 0, dtype: 'float32', maskRate: 0.05, seed: 999 });
}

describe('indicesToMultihot / multihotToIndices / tokensPerExpert / padRoutingMap: cuda == cpu', () => {
  for (const p of ROUTINGS) {
    test(`T=${p.numTokens} E=${p.numExperts} k=${p.topk} mask=${p.maskRate} #${p.seed}`, { skip }, () => {
      const r = randomRouting(p, rng(p.seed * 7919), p.maskRate);
      const E = p.numExperts;
      const want = cpu.indicesToMultihot(r.indices, r.weights, E);
      const d = upAll({ indices: r.indices, weights: r.weights });
      const got = cuda.indicesToMultihot(d.indices, d.weights, E);
      assertAllDevice(got, 'indicesToMultihot');
      assertSameResult(got, want, 'indicesToMultihot');
      // host int64 indices with device probs
      assertSameResult(cuda.indicesToMultihot(int64Of(r.indices), d.weights, E), want, 'indicesToMultihot (int64 host indices)');

      const dMap = up(want.routingMap);
      const dDense = up(want.probs);
      for (const o of [{}, { probs: want.probs }, { topk: p.topk }, { probs: want.probs, topk: p.topk + 2 }]) {
        const od = o.probs ? { ...o, probs: dDense } : o;
        const m = cuda.multihotToIndices(dMap, od);
        assertAllDevice(m, 'multihotToIndices');
        assertSameResult(m, cpu.multihotToIndices(want.routingMap, o), `multihotToIndices ${JSON.stringify(Object.keys(o))} topk=${o.topk}`);
        free(m);
      }
      const tpe = cuda.tokensPerExpert(dMap);
      assertAllDevice(tpe, 'tokensPerExpert');
      assertSameBits(tpe, cpu.tokensPerExpert(want.routingMap), 'tokensPerExpert');
      for (const m of [1, 2, 3, 4, 8, 16, 64, 1000]) {
        const padded = cuda.padRoutingMap(dMap, m);
        assertAllDevice(padded, 'padRoutingMap');
        assertSameBits(padded, cpu.padRoutingMap(want.routingMap, m), `padRoutingMap(${m})`);
        free(padded);
      }
      free(d, got, dMap, dDense, tpe);
    });
  }
  test('dense random maps (rows wider than topk): multihotToIndices, tokensPerExpert, padRoutingMap', { skip }, () => {
    const random = rng(77);
    for (const [T, E, density] of [
      [0, 5, 0.5],
      [1, 1, 1],
      [130, 1, 0.5],
      [129, 40, 0.3],
      [700, 70, 0.9],
      [3, 1000, 0.01],
    ]) {
      const map = randomMap(T, E, density, random);
      const probs = tiedProbs(T, E, random, false);
      const dMap = up(map);
      assertSameResult(cuda.multihotToIndices(dMap, { probs: up(probs) }), cpu.multihotToIndices(map, { probs }), `multihotToIndices ${T}x${E}`);
      assertSameBits(cuda.tokensPerExpert(dMap), cpu.tokensPerExpert(map), `tokensPerExpert ${T}x${E}`);
      for (const m of [1, 3, 7, 64]) assertSameBits(cuda.padRoutingMap(dMap, m), cpu.padRoutingMap(map, m), `padRoutingMap ${T}x${E} (${m})`);
    }
  });
});

// ---------------------------------------------------------------------------------------
// dropTokens

const DROPS = [];
{
  const random = rng(31337);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 80; i++) {
    DROPS.push({
      T: pick([0, 1, 2, 5, 64, 100, 1025, 3000]),
      E: pick([1, 2, 3, 8, 64]),
      density: pick([0.1, 0.5, 1]),
      topk: pick([1, 2, 4]),
      capacityFactor: pick([0, 0.1, 0.3, 0.5, 1, 1.25, 2, 100]),
      dropPolicy: pick(['probs', 'position', undefined]),
      padToCapacity: pick([true, false, undefined]),
      specials: random() < 0.4,
      seed: i + 1,
    });
  }
  DROPS.push({ T: 16384, E: 64, density: 0.125, topk: 8, capacityFactor: 1, dropPolicy: 'probs', padToCapacity: false, specials: true, seed: 1001 });
  DROPS.push({ T: 16384, E: 8, density: 0.25, topk: 2, capacityFactor: 1.25, dropPolicy: 'position', padToCapacity: true, specials: false, seed: 1002 });
}

describe('dropTokens: cuda == cpu (ties, NaN, every policy, padToCapacity)', () => {
  for (const p of DROPS) {
    const name = `T=${p.T} E=${p.E} density=${p.density} topk=${p.topk} factor=${p.capacityFactor} ${p.dropPolicy ?? '(default policy)'} pad=${p.padToCapacity}${p.specials ? ' specials' : ''} #${p.seed}`;
    test(name, { skip }, () => {
      const random = rng(p.seed * 104729);
      const map = randomMap(p.T, p.E, p.density, random);
      const probs = tiedProbs(p.T, p.E, random, p.specials);
      const options = { topk: p.topk, capacityFactor: p.capacityFactor };
      if (p.dropPolicy !== undefined) options.dropPolicy = p.dropPolicy;
      if (p.padToCapacity !== undefined) options.padToCapacity = p.padToCapacity;
      const want = cpu.dropTokens(probs, map, options);
      const d = upAll({ probs, map });
      const got = cuda.dropTokens(d.probs, d.map, options);
      assertAllDevice({ routingMap: got.routingMap, probs: got.probs }, 'dropTokens');
      assertSameDrop(got, want, 'dropTokens');
      // mixed: host probs, device map
      const mixed = cuda.dropTokens(probs, d.map, options);
      assertAllDevice({ routingMap: mixed.routingMap, probs: mixed.probs }, 'dropTokens (mixed)');
      assertSameDrop(mixed, want, 'dropTokens (mixed)');
      free(d, got, mixed);
    });
  }
  test('all-equal probs: ties go to the lower token id; all-NaN; capacity 1', { skip }, () => {
    for (const value of [0.5, 0, -0, NaN, Infinity]) {
      for (const [T, E] of [
        [2048, 3],
        [5, 1],
      ]) {
        const probs = tensor('float32', [T, E], new Float32Array(T * E).fill(value));
        const map = randomMap(T, E, 0.5, rng(T + E));
        for (const capacityFactor of [0.001, 0.5, 0.9]) {
          for (const padToCapacity of [false, true]) {
            const o = { topk: 1, capacityFactor, padToCapacity };
            assertSameDrop(cuda.dropTokens(up(probs), up(map), o), cpu.dropTokens(probs, map, o), `value ${value} ${T}x${E} factor ${capacityFactor} pad ${padToCapacity}`);
          }
        }
      }
    }
  });
});

// ---------------------------------------------------------------------------------------
// sortChunksByIndex and its backward

function randomChunks(n, c, random) {
  if (c === 0) return { sizes: tensor('int32', [0], new Int32Array(0)), order: tensor('int32', [0], new Int32Array(0)) };
  // c sizes adding up to n (some zero)
  const cuts = Array.from({ length: c - 1 }, () => Math.floor(random() * (n + 1))).sort((a, b) => a - b);
  const sizes = [];
  let prev = 0;
  for (const x of [...cuts, n]) {
    sizes.push(x - prev);
    prev = x;
  }
  const order = Array.from({ length: c }, (_, i) => i);
  for (let i = c - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return { sizes: tensor('int32', [c], Int32Array.from(sizes)), order: tensor('int32', [c], Int32Array.from(order)) };
}

describe('sortChunksByIndex / sortChunksByIndexBackward: cuda == cpu', () => {
  const random = rng(2718);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 40; i++) {
    const n = pick([0, 1, 5, 64, 300, 2049]);
    const c = n === 0 ? pick([0, 1, 3]) : pick([1, 2, 3, 8, 32]);
    const hidden = pick([0, 1, 2, 3, 4, 8, 12, 100, 1024, 4097]);
    const dtype = pick(['float32', 'bfloat16', 'float16']);
    const withProbs = random() < 0.6;
    const int64 = random() < 0.2;
    const seed = i + 1;
    test(`N=${n} chunks=${c} H=${hidden} ${dtype}${withProbs ? ' probs' : ''}${int64 ? ' int64 host indices' : ''} #${seed}`, { skip }, () => {
      const r = rng(seed * 65537);
      const x = randomTokens(n, hidden, dtype, r);
      // raw bits: NaN payloads and -0 must survive the copy
      const bits = new Uint8Array(x.data.buffer, x.data.byteOffset, x.data.byteLength);
      for (let b = 0; b < bits.length; b++) if (r() < 0.01) bits[b] = 0xff;
      const probs = withProbs
        ? tensor(
            'float32',
            [n],
            Float32Array.from({ length: n }, () => r()),
          )
        : undefined;
      const { sizes, order } = randomChunks(n, c, r);
      const hs = int64 ? int64Of(sizes) : sizes;
      const ho = int64 ? int64Of(order) : order;
      const want = cpu.sortChunksByIndex(x, hs, ho, probs);
      const dx = up(x);
      const ds = int64 ? hs : up(sizes);
      const dord = int64 ? ho : up(order);
      const got = cuda.sortChunksByIndex(dx, ds, dord, up(probs));
      assertAllDevice(got, 'sortChunksByIndex');
      assertSameResult(got, want, 'sortChunksByIndex');
      const wantBack = cpu.sortChunksByIndexBackward(want.output, hs, ho, want.probs);
      const gotBack = cuda.sortChunksByIndexBackward(up(want.output), ds, dord, up(want.probs));
      assertAllDevice(gotBack, 'sortChunksByIndexBackward');
      assertSameResult(gotBack, wantBack, 'sortChunksByIndexBackward');
      assertSameBits(gotBack.gradInput, x, 'backward restores the input');
      free(dx, got, gotBack);
    });
  }
});

// ---------------------------------------------------------------------------------------
// groupedMmSort

describe('groupedMmSort: cuda == cpu', () => {
  const random = rng(1618);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 40; i++) {
    const numExperts = pick([1, 2, 8, 64]);
    const p = {
      numTokens: pick([0, 1, 7, 100, 3000]),
      numExperts,
      topk: 1 + Math.floor(random() * Math.min(numExperts, 8)),
      hidden: 0,
      dtype: pick(['float32', 'bfloat16', 'float16']),
    };
    const maskRate = pick([0, 0.2]);
    const withMask = random() < 0.5;
    const numLocalExperts = pick([0, 1, 2, numExperts, numExperts + 3]);
    const expertsStartIdx = pick([undefined, 0, 1, Math.floor(numExperts / 2), numExperts + 1]);
    const int64 = random() < 0.2;
    const seed = i + 1;
    test(`T=${p.numTokens} E=${numExperts} k=${p.topk} ${p.dtype} local=[${expertsStartIdx ?? 0}, +${numLocalExperts})${withMask ? ' tokenMask' : ''}${int64 ? ' int64' : ''} #${seed}`, {
      skip,
    }, () => {
      const r = rng(seed * 7);
      const routing = randomRouting(p, r, maskRate);
      const w = routing.weights.data;
      const weights = p.dtype === 'float32' ? routing.weights : tensor(p.dtype, routing.weights.shape, Uint16Array.from(w, p.dtype === 'bfloat16' ? lib.toBFloat16Bits : lib.toFloat16Bits));
      const tokenMask = withMask ? randomMap(p.numTokens, 1, 0.7, r) : undefined;
      const mask = tokenMask ? tensor('bool', [p.numTokens], tokenMask.data) : undefined;
      const options = { numLocalExperts };
      if (expertsStartIdx !== undefined) options.expertsStartIdx = expertsStartIdx;
      if (mask) options.tokenMask = mask;
      const indices = int64 ? int64Of(routing.indices) : routing.indices;
      const want = cpu.groupedMmSort(indices, weights, options);
      const got = cuda.groupedMmSort(int64 ? indices : up(indices), up(weights), upAll(options));
      assertAllDevice(got, 'groupedMmSort');
      assertSameResult(got, want, 'groupedMmSort');
      free(got);
    });
  }
});

// ---------------------------------------------------------------------------------------
// permuteBackward / unpermuteBackward: the probs gradients

const GRADS = [];
{
  const random = rng(8128);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  for (let i = 0; i < 50; i++) {
    const numExperts = pick([1, 2, 3, 8, 64]);
    GRADS.push({
      numTokens: pick([0, 1, 2, 7, 64, 500]),
      numExperts,
      topk: random() < 0.2 ? numExperts : 1 + Math.floor(random() * Math.min(numExperts, 8)),
      hidden: pick([0, 1, 3, 4, 8, 33, 100, 1024]),
      dtype: pick(['float32', 'bfloat16', 'float16']),
      maskRate: pick([0, 0.2]),
      dropAndPad: random() < 0.4,
      seed: i + 1,
    });
  }
}

describe('permuteBackward / unpermuteBackward probs gradients: cuda == cpu', () => {
  for (const p of GRADS) {
    test(`T=${p.numTokens} E=${p.numExperts} k=${p.topk} H=${p.hidden} ${p.dtype}${p.dropAndPad ? ' dropAndPad' : ''} #${p.seed}`, { skip }, () => {
      const random = rng(p.seed * 3571);
      const r = randomRouting(p, random, p.maskRate);
      const multihot = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const capacity = p.dropAndPad && p.numTokens > 0 ? 1 + Math.floor(random() * p.numTokens) : undefined;
      const dropAndPad = capacity !== undefined;
      const options = { probs: multihot.probs };
      if (dropAndPad) Object.assign(options, { dropAndPad: true, numOutTokens: capacity * p.numExperts });
      const want = cpu.permute(r.tokens, multihot.routingMap, options);
      const n = want.sortedIndices.shape[0];
      const T = p.numTokens;
      const d = upAll({ tokens: r.tokens, map: multihot.routingMap, probs: multihot.probs });
      const perm = cuda.permute(d.tokens, d.map, { ...options, probs: d.probs });
      const sortedUp = up(want.sortedIndices);
      const gradPermuted = randomTokens(n, p.hidden, p.dtype, rng(p.seed * 13));
      const gpp = tensor(
        'float32',
        [n],
        Float32Array.from({ length: n }, () => random() * 2 - 1),
      );
      const dGrad = up(gradPermuted);
      // permuteBackward with gradPermutedProbs, with the plan carried by sortedIndices and uploaded
      const ob = { gradPermutedProbs: gpp, routingMap: multihot.routingMap, dropAndPad };
      const wantPB = cpu.permuteBackward(gradPermuted, want.sortedIndices, T, ob);
      for (const [name, si] of [
        ['plan', perm.sortedIndices],
        ['uploaded', sortedUp],
      ]) {
        const gb = cuda.permuteBackward(dGrad, si, T, upAll(ob));
        assertAllDevice(gb, 'permuteBackward');
        assertSameResult(gb, wantPB, `permuteBackward with gradPermutedProbs (${name})`);
        free(gb);
      }
      // unpermuteBackward with per-slot probs and with dense probs (+ routingMap)
      const gradOut = randomTokens(T, p.hidden, p.dtype, rng(p.seed * 17));
      const permuted = randomTokens(n, p.hidden, p.dtype, rng(p.seed * 19));
      const dGradOut = up(gradOut);
      const dPermuted = up(permuted);
      const variants = [
        ['slot probs', { probs: want.permutedProbs }],
        ['dense probs', { probs: multihot.probs, routingMap: multihot.routingMap, dropAndPad }],
        ['no probs (routingMap ignored)', { routingMap: multihot.routingMap, dropAndPad }],
      ];
      for (const [name, o] of variants) {
        const wantUB = cpu.unpermuteBackward(gradOut, permuted, want.sortedIndices, o);
        for (const [siName, si] of [
          ['plan', perm.sortedIndices],
          ['uploaded', sortedUp],
        ]) {
          const ub = cuda.unpermuteBackward(dGradOut, dPermuted, si, upAll(o));
          assertAllDevice(ub, 'unpermuteBackward');
          assertSameResult(ub, wantUB, `unpermuteBackward ${name} (${siName})`);
          free(ub);
        }
      }
      free(d, perm, sortedUp, dGrad, dGradOut, dPermuted);
    });
  }
  test('repeated (token, expert) slots sum in slot order; -0 gradients', { skip }, () => {
    // 3 tokens, 2 experts; map routes tokens 0, 1 to expert 0 and token 2 to expert 1. Slots
    // [0, 0 | 2]: token 0 holds both slots of expert 0 (allowed: each is routed there).
    const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 1, 0, 0, 1]));
    const sorted = tensor('int32', [3], Int32Array.from([0, 0, 2]));
    const g = tensor('float32', [3, 2], Float32Array.from([1, 2, 3, 4, 5, 6]));
    for (const gp of [Float32Array.from([1e8, 1, -1e8]), Float32Array.from([-0, -0, -0]), Float32Array.from([0.1, 0.2, 0.3])]) {
      const o = { gradPermutedProbs: tensor('float32', [3], gp), routingMap: map };
      assertSameResult(cuda.permuteBackward(up(g), up(sorted), 3, upAll(o)), cpu.permuteBackward(g, sorted, 3, o), `permuteBackward ${gp}`);
      const dense = { probs: tensor('float32', [3, 2], Float32Array.from([0.5, 0, 0.25, 0, 0, 2])), routingMap: map };
      const gradOut = tensor('float32', [3, 2], Float32Array.from([gp[0], -0, 1e30, 1e-30, -3, 7]));
      assertSameResult(cuda.unpermuteBackward(up(gradOut), up(g), up(sorted), upAll(dense)), cpu.unpermuteBackward(gradOut, g, sorted, dense), `unpermuteBackward ${gp}`);
    }
  });
  test('results are deterministic run after run (large problem)', { skip: cudaOnly }, () => {
    const p = { numTokens: 4096, numExperts: 64, topk: 8, hidden: 1024, dtype: 'bfloat16' };
    const r = randomRouting(p, rng(5), 0.05);
    const multihot = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
    const want = cpu.permute(r.tokens, multihot.routingMap, { probs: multihot.probs });
    const n = want.sortedIndices.shape[0];
    const gradOut = randomTokens(p.numTokens, p.hidden, p.dtype, rng(6));
    const o = { probs: multihot.probs, routingMap: multihot.routingMap };
    const wantUB = cpu.unpermuteBackward(gradOut, want.permutedTokens, want.sortedIndices, o);
    const d = upAll({ gradOut, permuted: want.permutedTokens, sorted: want.sortedIndices, ...o });
    for (let i = 0; i < 3; i++) {
      const ub = cuda.unpermuteBackward(d.gradOut, d.permuted, d.sorted, { probs: d.probs, routingMap: d.routingMap });
      assertSameResult(ub, wantUB, `unpermuteBackward run ${i + 1}`);
      free(ub);
    }
    const gpp = tensor(
      'float32',
      [n],
      Float32Array.from({ length: n }, (_, i) => Math.sin(i)),
    );
    const ob = { gradPermutedProbs: gpp, routingMap: multihot.routingMap };
    const wantPB = cpu.permuteBackward(want.permutedTokens, want.sortedIndices, p.numTokens, ob);
    for (let i = 0; i < 3; i++) {
      const pb = cuda.permuteBackward(d.permuted, d.sorted, p.numTokens, upAll(ob));
      assertSameResult(pb, wantPB, `permuteBackward run ${i + 1}`);
      free(pb);
    }
    free(d);
  });
});

// ---------------------------------------------------------------------------------------
// Errors: the same class and message as the CPU backend, with device and with host tensors

describe('errors: cuda == cpu', () => {
  const f32 = (shape, values) => tensor('float32', shape, values ? Float32Array.from(values) : undefined);
  const i32 = (shape, values) => tensor('int32', shape, Int32Array.from(values));
  const bool = (shape, values) => tensor('bool', shape, Uint8Array.from(values));
  const map = bool([3, 2], [1, 0, 0, 1, 1, 0]);
  const cases = {
    'indicesToMultihot: index out of range': (b, u) => b.indicesToMultihot(u(i32([2, 2], [0, 4, 1, -1])), u(f32([2, 2])), 4),
    'indicesToMultihot: index -2': (b, u) => b.indicesToMultihot(u(i32([2, 2], [0, 1, -2, 1])), u(f32([2, 2])), 4),
    'indicesToMultihot: expert twice': (b, u) => b.indicesToMultihot(u(i32([2, 2], [0, 1, 3, 3])), u(f32([2, 2])), 4),
    'indicesToMultihot: probs of another shape': (b, u) => b.indicesToMultihot(u(i32([2, 2], [0, 1, 2, 3])), u(f32([2, 3])), 4),
    'indicesToMultihot: numExperts negative': (b, u) => b.indicesToMultihot(u(i32([2, 2], [0, 1, 2, 3])), u(f32([2, 2])), -1),
    'indicesToMultihot: float indices': (b, u) => b.indicesToMultihot(u(f32([2, 2])), u(f32([2, 2])), 4),
    'multihotToIndices: topk too small': (b, u) => b.multihotToIndices(u(map), { topk: 0 }),
    'multihotToIndices: probs of another shape': (b, u) => b.multihotToIndices(u(map), { probs: u(f32([2, 3])) }),
    'multihotToIndices: rank-1 map': (b, u) => b.multihotToIndices(u(bool([3], [1, 0, 1]))),
    'tokensPerExpert: float map': (b, u) => b.tokensPerExpert(u(f32([3, 2]))),
    'tokensPerExpert: rank-3 map': (b, u) => b.tokensPerExpert(u(bool([1, 1, 2], [1, 0]))),
    'padRoutingMap: padMultiple 0': (b, u) => b.padRoutingMap(u(map), 0),
    'padRoutingMap: padMultiple 1.5': (b, u) => b.padRoutingMap(u(map), 1.5),
    'dropTokens: negative capacityFactor': (b, u) => b.dropTokens(u(f32([3, 2])), u(map), { topk: 1, capacityFactor: -1 }),
    'dropTokens: NaN capacityFactor': (b, u) => b.dropTokens(u(f32([3, 2])), u(map), { topk: 1, capacityFactor: NaN }),
    'dropTokens: unknown policy': (b, u) => b.dropTokens(u(f32([3, 2])), u(map), { topk: 1, capacityFactor: 1, dropPolicy: 'random' }),
    'dropTokens: no experts': (b, u) => b.dropTokens(u(f32([3, 0])), u(bool([3, 0], [])), { topk: 1, capacityFactor: 1 }),
    'dropTokens: probs of another shape': (b, u) => b.dropTokens(u(f32([2, 3])), u(map), { topk: 1, capacityFactor: 1 }),
    'dropTokens: topk missing': (b, u) => b.dropTokens(u(f32([3, 2])), u(map), { capacityFactor: 1 }),
    'dropTokens: capacity beyond 2^53': (b, u) => b.dropTokens(u(f32([3, 2])), u(map), { topk: 1, capacityFactor: 1e300 }),
    'sortChunksByIndex: sizes do not add up': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [1, 2])), u(i32([2], [0, 1]))),
    'sortChunksByIndex: negative size': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [5, -1])), u(i32([2], [0, 1]))),
    'sortChunksByIndex: chunk twice': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [2, 2])), u(i32([2], [1, 1]))),
    'sortChunksByIndex: index out of range': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [2, 2])), u(i32([2], [0, 2]))),
    'sortChunksByIndex: sortedIdxs of another length': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [2, 2])), u(i32([1], [0]))),
    'sortChunksByIndex: probs of another length': (b, u) => b.sortChunksByIndex(u(f32([4, 1])), u(i32([2], [2, 2])), u(i32([2], [1, 0])), u(f32([3]))),
    'sortChunksByIndexBackward: sizes do not add up': (b, u) => b.sortChunksByIndexBackward(u(f32([4, 1])), u(i32([2], [3, 2])), u(i32([2], [0, 1]))),
    'groupedMmSort: index -2': (b, u) => b.groupedMmSort(u(i32([1, 2], [0, -2])), u(f32([1, 2])), { numLocalExperts: 2 }),
    'groupedMmSort: weights of another shape': (b, u) => b.groupedMmSort(u(i32([1, 2], [0, 1])), u(f32([2, 1])), { numLocalExperts: 2 }),
    'groupedMmSort: tokenMask of another shape': (b, u) => b.groupedMmSort(u(i32([1, 2], [0, 1])), u(f32([1, 2])), { numLocalExperts: 2, tokenMask: u(bool([1, 1], [1])) }),
    'groupedMmSort: numLocalExperts missing': (b, u) => b.groupedMmSort(u(i32([1, 2], [0, 1])), u(f32([1, 2])), {}),
    'permuteBackward: slot not routed to its expert': (b, u) => b.permuteBackward(u(f32([3, 2])), u(i32([3], [1, 0, 2])), 3, { gradPermutedProbs: u(f32([3])), routingMap: u(map) }),
    'permuteBackward: map selects another count': (b, u) => b.permuteBackward(u(f32([2, 2])), u(i32([2], [0, 2])), 3, { gradPermutedProbs: u(f32([2])), routingMap: u(map) }),
    'permuteBackward: dropAndPad slots not in equal blocks': (b, u) =>
      b.permuteBackward(u(f32([3, 2])), u(i32([3], [0, 2, 1])), 3, { gradPermutedProbs: u(f32([3])), routingMap: u(map), dropAndPad: true }),
    'permuteBackward: gradPermutedProbs of another length': (b, u) => b.permuteBackward(u(f32([3, 2])), u(i32([3], [0, 2, 1])), 3, { gradPermutedProbs: u(f32([2])), routingMap: u(map) }),
    'permuteBackward: routingMap of another shape': (b, u) =>
      b.permuteBackward(u(f32([3, 2])), u(i32([3], [0, 2, 1])), 3, { gradPermutedProbs: u(f32([3])), routingMap: u(bool([2, 2], [1, 0, 0, 1])) }),
    'unpermuteBackward: dense probs without routingMap': (b, u) => b.unpermuteBackward(u(f32([3, 2])), u(f32([3, 2])), u(i32([3], [0, 2, 1])), { probs: u(f32([3, 2])) }),
    'unpermuteBackward: dense probs, slot not routed': (b, u) => b.unpermuteBackward(u(f32([3, 2])), u(f32([3, 2])), u(i32([3], [1, 0, 2])), { probs: u(f32([3, 2])), routingMap: u(map) }),
    'unpermuteBackward: slot probs of another length': (b, u) => b.unpermuteBackward(u(f32([3, 2])), u(f32([3, 2])), u(i32([3], [0, 2, 1])), { probs: u(f32([2])) }),
    'unpermuteBackward: dense probs, sortedIndices out of range': (b, u) => b.unpermuteBackward(u(f32([3, 2])), u(f32([3, 2])), u(i32([3], [0, 2, 3])), { probs: u(f32([3, 2])), routingMap: u(map) }),
    'unpermuteBackward: dense probs, dropAndPad blocks uneven': (b, u) =>
      b.unpermuteBackward(u(f32([3, 2])), u(f32([3, 2])), u(i32([3], [0, 2, 1])), { probs: u(f32([3, 2])), routingMap: u(map), dropAndPad: true }),
  };
  sameErrorsAsCpu(cases);
  test('backendInfo lists the layout ops among the GPU ops', { skip: cudaOnly }, () => {
    for (const op of ['indicesToMultihot', 'multihotToIndices', 'tokensPerExpert', 'padRoutingMap', 'dropTokens', 'sortChunksByIndex', 'sortChunksByIndexBackward', 'groupedMmSort']) {
      assert.ok(cudaInfo.gpuOps.includes(op), `${op} in ${cudaInfo.gpuOps}`);
    }
  });
});
