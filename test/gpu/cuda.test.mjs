// The GPU suite: the 'cuda' backend against the 'cpu' backend (the CPU core, the reference),
// bit for bit, on the golden cases and on random problems; plus errors and determinism.
//
// Plain JavaScript on node:test, no node_modules: it runs on the GPU machine, which has no
// Node.js of its own (scripts/gpu-run.sh brings one). It imports the built facade, dist/,
// from next to this folder's parent (MOE_DISPATCH_DIST overrides), and reads the golden files
// from MOE_GOLDEN_DIR (default: ../fixtures/golden, the vendored copy). Where CUDA is unavailable every test
// is skipped, and the skip names the reason.
//
//   node --test test/gpu/            (or: bash scripts/gpu-run.sh pack, then the printed command on the GPU machine)
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  assertSameBits,
  assertSameResult,
  cpu,
  cuda,
  cudaInfo,
  cudaOnly,
  lib,
  loadGolden,
  outcome,
  randomRouting,
  rng,
  skip,
  tensor,
  toTensor,
  randomProblems,
  permuteProblem,
  finiteRows,
} from './common.mjs';

if (cudaInfo?.available) console.log(`# cuda: ${cudaInfo.device}; kernels: ${cudaInfo.kernels}; GPU ops: ${cudaInfo.gpuOps?.join(', ')}`);
else if (skip) console.log(`# ${skip}`);

// ---------------------------------------------------------------------------------------
// Golden cases

const goldenPermute = loadGolden('permute');
const goldenUnpermute = loadGolden('unpermute');

describe('golden permute: cuda == cpu == reference', () => {
  test('golden file loads', { skip }, () => assert.ok(goldenPermute.file, goldenPermute.error));
  for (const c of goldenPermute.file?.cases ?? []) {
    test(c.name, { skip }, () => {
      const tokens = toTensor(c.inputs.tokens);
      const routingMap = toTensor(c.inputs.routing_map);
      const options = { probs: toTensor(c.inputs.probs) };
      if (c.params.drop_and_pad) Object.assign(options, { dropAndPad: true, numOutTokens: c.params.num_out_tokens });
      const got = cuda.permute(tokens, routingMap, options);
      assertSameResult(got, cpu.permute(tokens, routingMap, options), c.name);
      assertSameBits(got.permutedTokens, toTensor(c.outputs.permuted_tokens), `${c.name} vs reference: permutedTokens`);
      assertSameBits(got.permutedProbs, toTensor(c.outputs.permuted_probs), `${c.name} vs reference: permutedProbs`);
      assertSameBits(got.sortedIndices, toTensor(c.outputs.sorted_indices, 'int32'), `${c.name} vs reference: sortedIndices`);
    });
  }
});

describe('golden unpermute: cuda == cpu', () => {
  test('golden file loads', { skip }, () => assert.ok(goldenUnpermute.file, goldenUnpermute.error));
  for (const c of goldenUnpermute.file?.cases ?? []) {
    for (const variant of ['dense probs', 'no probs', 'int32 indices']) {
      test(`${c.name} (${variant})`, { skip }, () => {
        const permuted = toTensor(c.inputs.permuted_tokens);
        const sorted = toTensor(c.inputs.sorted_indices, variant === 'int32 indices' ? 'int32' : 'int64');
        const shape = [c.inputs.probs.shape[0], permuted.shape[1]];
        const options = variant === 'no probs' ? {} : { probs: toTensor(c.inputs.probs), routingMap: toTensor(c.inputs.routing_map) };
        assertSameBits(cuda.unpermute(permuted, sorted, shape, options), cpu.unpermute(permuted, sorted, shape, options), c.name);
      });
    }
  }
});

// ---------------------------------------------------------------------------------------
// Random problems

const SHAPES = randomProblems({
  count: 240,
  seed: 20251123,
  experts: [1, 2, 3, 8, 16, 64],
  tokens: [0, 1, 2, 7, 64, 200, 1000],
  hidden: [0, 1, 2, 3, 4, 5, 8, 12, 16, 24, 64, 100, 256, 1000, 1024, 4097],
  dropAndPadRate: 0.3,
  flag: { name: 'int64', rate: 0.3, text: 'int64' },
});

/** Token values: random, with some NaNs (various payloads), infinities, -0 and subnormals. */
function specialTokens(tokens, random) {
  const d = tokens.data;
  const specials = d instanceof Float32Array ? [NaN, -0, Infinity, -Infinity, 1e-42, -3e-40] : [0x7fc1, 0xffa0, 0x8000, 0x7c00, 0x0001, 0x7f81];
  const u32 = d instanceof Float32Array ? new Uint32Array(d.buffer, d.byteOffset, d.length) : undefined;
  for (let i = 0; i < d.length; i++) {
    if (random() < 0.02) {
      if (u32 && random() < 0.5)
        u32[i] = 0x7f800001 + Math.floor(random() * 0x3fffff); // NaN payloads
      else d[i] = specials[Math.floor(random() * specials.length)];
    }
  }
  return tokens;
}

describe('random problems: cuda == cpu, bit for bit', () => {
  for (const p of SHAPES) {
    test(p.label, { skip }, () => {
      const { random, r, multihot, options, dropAndPad } = permuteProblem(p);
      const tokens = specialTokens(r.tokens, random);
      const perm = cuda.permute(tokens, multihot.routingMap, options);
      const want = cpu.permute(tokens, multihot.routingMap, options);
      assertSameResult(perm, want, 'permute');
      // unpermute the CPU's permuted rows (finite values only: NaN payloads after arithmetic
      // are not part of the contract), with per-slot probs, dense probs, and none
      const finite = finiteRows(p, want.sortedIndices.shape[0]);
      const sorted = p.int64
        ? tensor(
            'int64',
            want.sortedIndices.shape,
            BigInt64Array.from(want.sortedIndices.data, (v) => BigInt(v)),
          )
        : want.sortedIndices;
      const shape = [p.numTokens, p.hidden];
      const variants = [{ dropAndPad }, { probs: multihot.probs, routingMap: multihot.routingMap, dropAndPad }];
      if (want.permutedProbs) variants.push({ probs: want.permutedProbs });
      for (const o of variants) {
        assertSameBits(cuda.unpermute(finite, sorted, shape, o), cpu.unpermute(finite, sorted, shape, o), `unpermute ${o.probs ? (o.routingMap ? 'dense probs' : 'slot probs') : 'no probs'}`);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------
// Larger problems, determinism

describe('larger problems', () => {
  for (const p of [
    { numTokens: 4096, numExperts: 64, topk: 8, hidden: 2048, dtype: 'bfloat16' },
    { numTokens: 2048, numExperts: 8, topk: 2, hidden: 4096, dtype: 'float32' },
    { numTokens: 3000, numExperts: 16, topk: 4, hidden: 1000, dtype: 'float16' },
  ]) {
    test(`${p.numTokens}x${p.hidden} ${p.dtype} E=${p.numExperts} k=${p.topk}: cuda == cpu, and unpermute is identical run after run`, { skip }, () => {
      const r = randomRouting(p, rng(p.numTokens + p.hidden), 0.05);
      const multihot = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const perm = cuda.permute(r.tokens, multihot.routingMap, { probs: multihot.probs });
      assertSameResult(perm, cpu.permute(r.tokens, multihot.routingMap, { probs: multihot.probs }), 'permute');
      const o = { probs: perm.permutedProbs };
      const first = cuda.unpermute(perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], o);
      assertSameBits(first, cpu.unpermute(perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], o), 'unpermute vs cpu');
      for (let i = 0; i < 3; i++) assertSameBits(cuda.unpermute(perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], o), first, `unpermute run ${i + 2}`);
    });
  }
});

// ---------------------------------------------------------------------------------------
// Errors: the same class and message as the CPU backend

describe('errors: cuda == cpu', () => {
  const t = tensor('float32', [3, 2], new Float32Array(6));
  const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 0]));
  const cases = {
    'numOutTokens differs from the routed count': (b) => b.permute(t, map, { numOutTokens: 5 }),
    'capacity not whole': (b) => b.permute(t, map, { numOutTokens: 3, dropAndPad: true }),
    'capacity above numTokens': (b) => b.permute(t, map, { numOutTokens: 8, dropAndPad: true }),
    'routing map of the wrong shape': (b) => b.permute(t, tensor('bool', [2, 2], new Uint8Array(4))),
    'probs of the wrong shape': (b) => b.permute(t, map, { probs: tensor('float32', [3, 3], new Float32Array(9)) }),
    'int tokens': (b) => b.permute(tensor('int32', [3, 2], new Int32Array(6)), map),
    'sortedIndices out of range': (b) => b.unpermute(tensor('float32', [2, 2], new Float32Array(4)), tensor('int32', [2], Int32Array.from([0, 3])), [3, 2]),
    'restoreShape hidden differs': (b) => b.unpermute(tensor('float32', [2, 2], new Float32Array(4)), tensor('int32', [2], Int32Array.from([0, 1])), [3, 5]),
    'dense probs without routingMap': (b) =>
      b.unpermute(tensor('float32', [2, 2], new Float32Array(4)), tensor('int32', [2], Int32Array.from([0, 1])), [3, 2], { probs: tensor('float32', [3, 2], new Float32Array(6)) }),
    'sortedIndices not routed there': (b) =>
      b.unpermute(tensor('float32', [3, 2], new Float32Array(6)), tensor('int32', [3], Int32Array.from([1, 0, 2])), [3, 2], { probs: tensor('float32', [3, 2], new Float32Array(6)), routingMap: map }),
  };
  for (const [name, f] of Object.entries(cases)) {
    test(name, { skip }, () => {
      const a = outcome(() => f(cuda));
      const b = outcome(() => f(cpu));
      assert.ok(a.error && b.error, `both throw (cuda: ${a.error?.message ?? 'returned'}; cpu: ${b.error?.message ?? 'returned'})`);
      assert.equal(a.error.constructor.name, b.error.constructor.name, 'error class');
      assert.equal(a.error.message, b.error.message, 'message');
    });
  }
  test('createBackend auto picks cuda', { skip: cudaOnly }, async () => {
    assert.equal((await lib.createBackend()).name, 'cuda');
  });
  test('backendInfo lists the GPU ops', { skip: cudaOnly }, () => {
    const ops = cudaInfo.gpuOps;
    for (const op of ['permute', 'unpermute', 'route', 'topk', 'permuteBackward', 'unpermuteBackward', 'activation', 'activationBackward', 'zLoss', 'expertsForward', 'expertsBackward', 'matmul']) {
      assert.ok(ops.includes(op), `gpuOps lists ${op}: ${ops.join(', ')}`);
    }
    assert.equal(new Set(ops).size, ops.length, 'no op twice');
    for (const op of ops) assert.equal(typeof cuda[op], 'function', `${op} is an op of the cuda backend`);
    assert.match(cudaInfo.device, /\w/);
  });
});

describe('permute / unpermute with caller-owned outputs on host tensors', () => {
  // the addon's cudaPermute / cudaUnpermute take the CPU argument objects: with outputs given they
  // run the CPU op, which writes them (the positional adapter before them dropped the outputs)
  test('written into out: the same objects, the bits of cpu', { skip: cudaOnly }, () => {
    for (const dtype of ['float32', 'bfloat16']) {
      const p = { numTokens: 33, numExperts: 8, topk: 2, hidden: 12, dtype };
      const r = randomRouting(p, rng(7), 0.1);
      const m = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const want = cpu.permute(r.tokens, m.routingMap, { probs: m.probs });
      const n = want.sortedIndices.shape[0];
      const out = { permutedTokens: tensor(dtype, [n, p.hidden]), permutedProbs: tensor('float32', [n]) };
      const got = cuda.permute(r.tokens, m.routingMap, { probs: m.probs, out });
      assert.equal(got.permutedTokens, out.permutedTokens, `${dtype}: permutedTokens is out.permutedTokens`);
      assertSameBits(out.permutedTokens, want.permutedTokens, `${dtype}: permute into out`);
      assertSameBits(out.permutedProbs, want.permutedProbs, `${dtype}: permute probs into out`);
      const restored = tensor(dtype, [p.numTokens, p.hidden]);
      const o = { probs: m.probs, routingMap: m.routingMap };
      assert.equal(cuda.unpermute(want.permutedTokens, want.sortedIndices, [p.numTokens, p.hidden], { ...o, out: restored }), restored, `${dtype}: unpermute returns out`);
      assertSameBits(restored, cpu.unpermute(want.permutedTokens, want.sortedIndices, [p.numTokens, p.hidden], o), `${dtype}: unpermute into out`);
    }
  });
});
