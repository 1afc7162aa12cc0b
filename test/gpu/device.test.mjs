// The GPU suite, part 2: device tensors (upload, download, dispose), the ops on device tensors
// (permute with the plan built on the GPU, unpermute, route, topk) and the GPU route/topk for
// host tensors, each checked against the 'cpu' backend. Copies and merges must match bit for
// bit; route's weights and scores within 1e-6 relative (the kernels use the core's own exp/ln,
// so they are expected to match bit for bit too: the count is printed).
//
// Plain JavaScript on node:test, like cuda.test.mjs; skips with the reason where CUDA is
// unavailable.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import {
  assertSameBits,
  assertSameResult,
  cpu,
  cudaInfo,
  host,
  lib,
  loadGolden,
  randomRouting,
  rng,
  tensor,
  toTensor,
  randomProblems,
  assertSameError,
  sameErrorsAsCpu,
  permuteProblem,
  finiteRows,
} from './common.mjs';

const skip = cudaInfo?.available ? false : `CUDA unavailable: ${cudaInfo?.reason ?? 'backendInfo() does not list cuda'}`;
const cuda = skip ? undefined : await lib.createBackend({ prefer: 'cuda' });
if (skip) console.log(`# ${skip}`);

// ---------------------------------------------------------------------------------------
// Comparisons

const routeStats = { tensors: 0, bitExact: 0 };
after(() => {
  if (routeStats.tensors) console.log(`# route/topk float outputs bit-identical to the CPU: ${routeStats.bitExact} / ${routeStats.tensors}`);
});

/** Floats within 1e-6 relative (counted as bit-exact when they are). */
function assertClose(got, want, what) {
  got = host(got);
  assert.equal(got.dtype, want.dtype, `${what}: dtype`);
  assert.deepEqual([...got.shape], [...want.shape], `${what}: shape`);
  let exact = true;
  for (let i = 0; i < want.data.length; i++) {
    const a = got.data[i];
    const b = want.data[i];
    if (Object.is(a, b)) continue;
    exact = false;
    assert.ok(Math.abs(a - b) <= 1e-6 * Math.max(Math.abs(b), 1e-30), `${what}: element ${i}: cuda ${a} vs cpu ${b}`);
  }
  routeStats.tensors++;
  if (exact) routeStats.bitExact++;
}

function assertSameRoute(got, want, what) {
  assertSameBits(got.indices, want.indices, `${what}.indices`);
  assertSameBits(got.tokensPerExpert, want.tokensPerExpert, `${what}.tokensPerExpert`);
  assertClose(got.weights, want.weights, `${what}.weights`);
  assertClose(got.scores, want.scores, `${what}.scores`);
}

/** Device copies of the tensors of an object (others kept as they are). */
function up(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj)) out[k] = v && typeof v === 'object' && 'data' in v ? cuda.upload(v) : v;
  return out;
}

function disposeAll(...xs) {
  for (const x of xs) {
    if (!x) continue;
    if (lib.isDeviceTensor(x)) x.dispose();
    else if (typeof x === 'object') for (const v of Object.values(x)) if (lib.isDeviceTensor(v)) v.dispose();
  }
}

// ---------------------------------------------------------------------------------------
// Device tensors

describe('programmatic dependent launch', () => {
  // opt-in (MOE_DISPATCH_PDL=on: pdl-on.test.mjs runs this file and the layer's suite so, every
  // result checked against the cpu backend); the GPU must be a Hopper or later
  const pdl = /programmatic dependent launch/.test(cudaInfo?.device ?? '');
  const capability = Number(/compute capability (\d+)\./.exec(cudaInfo?.device ?? '')?.[1] ?? 0);
  test('is on exactly where the GPU has it and MOE_DISPATCH_PDL asks for it', { skip }, () => {
    const on = ['on', '1'].includes(process.env.MOE_DISPATCH_PDL ?? '');
    assert.equal(pdl, capability >= 9 && on, `${cudaInfo.device} (MOE_DISPATCH_PDL=${process.env.MOE_DISPATCH_PDL ?? ''})`);
  });
});

describe('device tensors', () => {
  test('upload then download is bit-exact for every dtype, with dtype and shape', { skip }, () => {
    const random = rng(5);
    const u32 = new Uint32Array(64).map(() => (random() * 2 ** 32) >>> 0);
    const cases = [
      tensor('float32', [4, 16], new Float32Array(u32.buffer.slice(0))), // NaN payloads, infinities, subnormals included
      tensor('bfloat16', [8, 16], new Uint16Array(u32.buffer.slice(0))),
      tensor('float16', [2, 64], new Uint16Array(u32.buffer.slice(0))),
      tensor('int32', [64], new Int32Array(u32.buffer.slice(0))),
      tensor(
        'bool',
        [3, 5],
        Uint8Array.from({ length: 15 }, () => (random() < 0.5 ? 1 : 0)),
      ),
      tensor('float32', [0, 7]),
      tensor('bfloat16', []),
    ];
    for (const t of cases) {
      const d = cuda.upload(t);
      assert.equal(d.device, 'cuda');
      assert.equal(d.dtype, t.dtype);
      assert.deepEqual([...d.shape], [...t.shape]);
      assert.equal(d.byteLength, t.data.byteLength);
      assert.equal(d.disposed, false);
      assertSameBits(d.download(), t, `${t.dtype} [${t.shape}]`);
      d.dispose();
    }
  });

  test('int64 is refused on upload (TypeError naming the dtype)', { skip }, () => {
    assert.throws(
      () => cuda.upload(tensor('int64', [2], BigInt64Array.from([1n, 2n]))),
      (e) => e instanceof TypeError && /^upload: tensor\.dtype: .*int64/.test(e.message),
    );
  });

  test('dispose frees, is idempotent, and later uses are TypeErrors naming the op and argument', { skip }, () => {
    const t = cuda.upload(tensor('float32', [3, 2], new Float32Array(6)));
    const map = cuda.upload(tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 0])));
    t.dispose();
    t.dispose();
    assert.equal(t.disposed, true);
    assert.equal(t.byteLength, 0);
    assert.throws(
      () => t.download(),
      (e) => e instanceof TypeError && /^download: tensor: expected a device tensor that is not disposed/.test(e.message),
    );
    assert.throws(
      () => cuda.permute(t, map),
      (e) => e instanceof TypeError && /^permute: tokens: expected a device tensor that is not disposed/.test(e.message),
    );
    map.dispose();
  });

  test('a wrong dtype of a device tensor is a TypeError like the host one', { skip }, () => {
    const t = tensor('int32', [3, 2], new Int32Array(6));
    const map = tensor('bool', [3, 2], new Uint8Array(6));
    const d = up({ t, map });
    assertSameError(
      () => cuda.permute(d.t, d.map),
      () => cpu.permute(t, map),
    );
    disposeAll(d);
  });

  test("releaseCachedMemory returns the pool's memory of disposed tensors to the driver; tensors work after it", { skip }, () => {
    const bytes = 256 << 20;
    // freeBytes is the whole device's: the suite's other files run in other processes at the
    // same time and allocate too, so a round whose free memory did not grow by the released
    // bytes is tried again (three rounds; the pool's own cachedBytes must drop every time)
    const rounds = [];
    for (let round = 0; round < 3; round++) {
      const big = cuda.upload(tensor('float32', [bytes / 4], new Float32Array(bytes / 4)));
      big.dispose();
      cuda.synchronize();
      const before = cuda.memory();
      assert.ok(before.cachedBytes >= bytes, `cachedBytes ${before.cachedBytes} after disposing ${bytes} bytes`);
      cuda.releaseCachedMemory();
      const after = cuda.memory();
      assert.ok(after.cachedBytes <= before.cachedBytes - bytes, `cachedBytes ${before.cachedBytes} -> ${after.cachedBytes}`);
      rounds.push(`${before.freeBytes} -> ${after.freeBytes}`);
      if (after.freeBytes >= before.freeBytes + bytes) break;
    }
    const grew = rounds.some((r) => {
      const [a, b] = r.split(' -> ').map(Number);
      return b >= a + bytes;
    });
    assert.ok(grew, `freeBytes did not grow by ${bytes} in any round: ${rounds.join(', ')}`);
    const t = cuda.upload(tensor('float32', [3], Float32Array.from([1, 2, 3])));
    assert.deepEqual([...t.download().data], [1, 2, 3]);
    t.dispose();
  });

  test('many tensors are released by the garbage collector without dispose()', { skip }, async () => {
    for (let i = 0; i < 200; i++) cuda.upload(tensor('float32', [1024, 1024])); // 4 MB each, 800 MB in all
    if (globalThis.gc) globalThis.gc();
    const t = cuda.upload(tensor('float32', [4]));
    assert.equal(t.download().data.length, 4);
    t.dispose();
  });
});

// ---------------------------------------------------------------------------------------
// permute / unpermute on device tensors

const goldenPermute = loadGolden('permute');
describe('golden permute on device tensors (plan on the GPU) == cpu', () => {
  test('golden file loads', { skip }, () => assert.ok(goldenPermute.file, goldenPermute.error));
  for (const c of goldenPermute.file?.cases ?? []) {
    test(c.name, { skip }, () => {
      const tokens = toTensor(c.inputs.tokens);
      const routingMap = toTensor(c.inputs.routing_map);
      const probs = toTensor(c.inputs.probs);
      const options = { probs };
      if (c.params.drop_and_pad) Object.assign(options, { dropAndPad: true, numOutTokens: c.params.num_out_tokens });
      const d = up({ tokens, routingMap, probs });
      const got = cuda.permute(d.tokens, d.routingMap, { ...options, probs: d.probs });
      const want = cpu.permute(tokens, routingMap, options);
      assertSameResult(got, want, c.name);
      assertSameBits(got.permutedTokens, toTensor(c.outputs.permuted_tokens), `${c.name} vs reference: permutedTokens`);
      // and back: unpermute with the plan carried by sortedIndices
      const shape = [tokens.shape[0], tokens.shape[1]];
      const back = cuda.unpermute(got.permutedTokens, got.sortedIndices, shape, { probs: got.permutedProbs });
      assertSameBits(back, cpu.unpermute(want.permutedTokens, want.sortedIndices, shape, { probs: want.permutedProbs }), `${c.name} unpermute`);
      disposeAll(d, got, back);
    });
  }
});

const SHAPES = randomProblems({
  count: 160,
  seed: 20261123,
  experts: [1, 2, 3, 8, 16, 64, 300],
  tokens: [0, 1, 2, 7, 63, 64, 65, 200, 1000],
  hidden: [0, 1, 3, 8, 24, 100, 256, 1024, 4097],
  dropAndPadRate: 0.35,
  flag: { name: 'mixed', rate: 0.25, text: 'mixed host/device' },
});

describe('random problems on device tensors == cpu, bit for bit', () => {
  for (const p of SHAPES) {
    test(p.label, { skip }, () => {
      const { r, multihot, options, dropAndPad } = permuteProblem(p);
      const d = up({ tokens: r.tokens, map: multihot.routingMap, probs: multihot.probs });
      const dOptions = { ...options, ...(p.withProbs ? { probs: p.mixed ? multihot.probs : d.probs } : {}) };
      const perm = cuda.permute(d.tokens, p.mixed ? multihot.routingMap : d.map, dOptions);
      const want = cpu.permute(r.tokens, multihot.routingMap, options);
      assertSameResult(perm, want, 'permute');
      const shape = [p.numTokens, p.hidden];
      const finite = finiteRows(p, want.sortedIndices.shape[0]);
      const dFinite = cuda.upload(finite);
      // with the plan carried by sortedIndices
      const variants = [[{ dropAndPad }, { dropAndPad }]];
      if (want.permutedProbs) variants.push([{ probs: perm.permutedProbs }, { probs: want.permutedProbs }]);
      for (const [od, oc] of variants) {
        assertSameBits(cuda.unpermute(dFinite, perm.sortedIndices, shape, od), cpu.unpermute(finite, want.sortedIndices, shape, oc), `unpermute (plan) ${od.probs ? 'slot probs' : 'no probs'}`);
      }
      // sortedIndices uploaded (no plan: the token CSR is built from them), and dense probs
      const sortedUp = cuda.upload(want.sortedIndices);
      assertSameBits(cuda.unpermute(dFinite, sortedUp, shape, {}), cpu.unpermute(finite, want.sortedIndices, shape, {}), 'unpermute (uploaded sortedIndices)');
      const dense = { probs: multihot.probs, routingMap: multihot.routingMap, dropAndPad };
      assertSameBits(cuda.unpermute(dFinite, sortedUp, shape, up(dense)), cpu.unpermute(finite, want.sortedIndices, shape, dense), 'unpermute (dense probs)');
      // backward passes: gradTokens (GPU, with the carried plan and with uploaded sortedIndices),
      // gradPermuted and the prob gradients, all on the GPU, compared too
      const T = p.numTokens;
      for (const [name, si] of [
        ['plan', perm.sortedIndices],
        ['uploaded', sortedUp],
      ]) {
        const gb = cuda.permuteBackward(dFinite, si, T);
        assertSameResult(gb, cpu.permuteBackward(finite, want.sortedIndices, T), `permuteBackward (${name})`);
        disposeAll(gb);
      }
      if (want.permutedProbs) {
        const gpp = want.permutedProbs;
        const o = { gradPermutedProbs: gpp, routingMap: multihot.routingMap, dropAndPad };
        const gb = cuda.permuteBackward(dFinite, perm.sortedIndices, T, up(o));
        assertSameResult(gb, cpu.permuteBackward(finite, want.sortedIndices, T, o), 'permuteBackward with gradPermutedProbs');
        disposeAll(gb);
      }
      const gradOut = randomRouting({ ...p }, rng(p.seed * 57), 0).tokens;
      const dGradOut = cuda.upload(gradOut);
      const ub = cuda.unpermuteBackward(dGradOut, dFinite, perm.sortedIndices);
      assertSameResult(ub, cpu.unpermuteBackward(gradOut, finite, want.sortedIndices), 'unpermuteBackward');
      if (want.permutedProbs) {
        const ubp = cuda.unpermuteBackward(dGradOut, dFinite, perm.sortedIndices, { probs: perm.permutedProbs });
        assertSameResult(ubp, cpu.unpermuteBackward(gradOut, finite, want.sortedIndices, { probs: want.permutedProbs }), 'unpermuteBackward with probs');
        disposeAll(ubp);
      }
      disposeAll(d, perm, dFinite, sortedUp, dGradOut, ub);
    });
  }
});

describe('larger problems on device tensors: == cpu, deterministic', () => {
  for (const p of [
    { numTokens: 4096, numExperts: 256, topk: 8, hidden: 1024, dtype: 'bfloat16' },
    { numTokens: 3000, numExperts: 8, topk: 2, hidden: 2048, dtype: 'float32' },
  ]) {
    test(`${p.numTokens}x${p.hidden} ${p.dtype} E=${p.numExperts} k=${p.topk}`, { skip }, () => {
      const r = randomRouting(p, rng(p.numTokens + p.hidden), 0.05);
      const multihot = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const d = up({ tokens: r.tokens, map: multihot.routingMap, probs: multihot.probs });
      const perm = cuda.permute(d.tokens, d.map, { probs: d.probs });
      const want = cpu.permute(r.tokens, multihot.routingMap, { probs: multihot.probs });
      assertSameResult(perm, want, 'permute');
      const shape = [p.numTokens, p.hidden];
      const first = cuda.unpermute(perm.permutedTokens, perm.sortedIndices, shape, { probs: perm.permutedProbs });
      const firstHost = first.download();
      assertSameBits(firstHost, cpu.unpermute(want.permutedTokens, want.sortedIndices, shape, { probs: want.permutedProbs }), 'unpermute');
      for (let i = 0; i < 3; i++) {
        const again = cuda.permute(d.tokens, d.map, { probs: d.probs });
        assertSameResult(again, want, `permute run ${i + 2}`);
        const u = cuda.unpermute(again.permutedTokens, again.sortedIndices, shape, { probs: again.permutedProbs });
        assertSameBits(u, firstHost, `unpermute run ${i + 2}`);
        disposeAll(again, u);
      }
      disposeAll(d, perm, first);
    });
  }
});

// permute with numOutTokens given: the plan built for that many slots, its kernels queued before
// the true count is read. With MOE_DISPATCH_FUSED_PERMUTE=on (permute-fused.test.mjs runs this
// file so), 1, 2, 4, 8, 16 or 32 experts and a map of at most 256 KiB, the plan and the copy run
// as one kernel (permute_fused_w* in kernels/plan.cu, each block counting the whole map); other
// sizes take the plan kernels, then the permute kernel.
// Sizes chosen to give one block and many (32 to 256 tokens a block), a last block cut short,
// T * E not a multiple of 16 (the map's tail bytes), rows of every word width, empty rows
// (hidden 0), E = 32 (half rows a load), E = 3 and maps past 256 KiB (not fused).
const FUSED_SHAPES = randomProblems({
  count: 90,
  seed: 20261205,
  experts: [1, 2, 4, 8, 8, 16, 32, 32, 3],
  tokens: [1, 5, 31, 33, 64, 257, 1000, 4099, 8191, 9000, 40000],
  hidden: [0, 1, 3, 4, 8, 24, 100, 2048, 4097],
  dropAndPadRate: 0,
  flag: { name: 'wrongCount', rate: 0.2, text: 'wrong numOutTokens' },
});

describe('permute with numOutTokens on device tensors == cpu', () => {
  for (const p of FUSED_SHAPES) {
    if (p.numTokens * p.hidden > 4e6) continue; // keep the suite's host side quick
    test(p.label, { skip }, () => {
      const { r, multihot, options } = permuteProblem(p);
      const want = cpu.permute(r.tokens, multihot.routingMap, options);
      const count = want.sortedIndices.shape[0];
      const d = up({ tokens: r.tokens, map: multihot.routingMap, probs: multihot.probs });
      const dOptions = { ...(p.withProbs ? { probs: d.probs } : {}) };
      if (p.wrongCount) {
        // fewer and more than the routed count: the cpu's error, nothing written out of bounds
        for (const numOutTokens of [Math.max(0, count - 1), count + 1]) {
          if (numOutTokens === count) continue;
          assertSameError(
            () => cuda.permute(d.tokens, d.map, { ...dOptions, numOutTokens }),
            () => cpu.permute(r.tokens, multihot.routingMap, { ...options, numOutTokens }),
            `numOutTokens ${numOutTokens} of ${count}`,
          );
        }
      }
      const perm = cuda.permute(d.tokens, d.map, { ...dOptions, numOutTokens: count });
      assertSameResult(perm, want, 'permute');
      const again = cuda.permute(d.tokens, d.map, { ...dOptions, numOutTokens: count });
      assertSameResult(again, want, 'permute, run twice');
      // the plan it carries: unpermute (the token CSR) and permuteBackward (the slot order)
      const shape = [p.numTokens, p.hidden];
      const finite = finiteRows(p, count);
      const dFinite = cuda.upload(finite);
      const uo = want.permutedProbs ? [{ probs: perm.permutedProbs }, { probs: want.permutedProbs }] : [{}, {}];
      assertSameBits(cuda.unpermute(dFinite, perm.sortedIndices, shape, uo[0]), cpu.unpermute(finite, want.sortedIndices, shape, uo[1]), 'unpermute (plan)');
      assertSameResult(cuda.permuteBackward(dFinite, perm.sortedIndices, p.numTokens), cpu.permuteBackward(finite, want.sortedIndices, p.numTokens), 'permuteBackward (plan)');
      disposeAll(d, perm, again, { dFinite });
    });
  }
});

describe('errors with device tensors: cuda == cpu', () => {
  const t = tensor('float32', [3, 2], new Float32Array(6));
  const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 0]));
  const cases = {
    'numOutTokens differs from the routed count': (b, u) => b.permute(u(t), u(map), { numOutTokens: 5 }),
    'capacity not whole': (b, u) => b.permute(u(t), u(map), { numOutTokens: 3, dropAndPad: true }),
    'capacity above numTokens': (b, u) => b.permute(u(t), u(map), { numOutTokens: 8, dropAndPad: true }),
    'dropAndPad without numOutTokens': (b, u) => b.permute(u(t), u(map), { dropAndPad: true }),
    'routing map of the wrong shape': (b, u) => b.permute(u(t), u(tensor('bool', [2, 2], new Uint8Array(4)))),
    'probs of the wrong shape': (b, u) => b.permute(u(t), u(map), { probs: u(tensor('float32', [3, 3], new Float32Array(9))) }),
    'sortedIndices out of range': (b, u) => b.unpermute(u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 3]))), [3, 2]),
    'restoreShape hidden differs': (b, u) => b.unpermute(u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 1]))), [3, 5]),
    'slot probs of the wrong length': (b, u) =>
      b.unpermute(u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 1]))), [3, 2], { probs: u(tensor('float32', [3], new Float32Array(3))) }),
    'route: non-finite logit': (b, u) => b.route(u(tensor('float32', [2, 4], Float32Array.from([0, 1, 2, 3, 4, NaN, 6, 7]))), { topk: 2 }),
    'route: non-finite bias': (b, u) =>
      b.route(u(tensor('float32', [2, 4], new Float32Array(8))), { topk: 2, scoreFunction: 'sigmoid', expertBias: u(tensor('float32', [4], Float32Array.from([0, Infinity, 0, 0]))) }),
    'route: topk too large': (b, u) => b.route(u(tensor('float32', [2, 4], new Float32Array(8))), { topk: 5 }),
    'route: groups do not divide': (b, u) => b.route(u(tensor('float32', [2, 6], new Float32Array(12))), { topk: 2, scoreFunction: 'sigmoid', numGroups: 4 }),
    'route: bias with softmax': (b, u) => b.route(u(tensor('float32', [2, 4], new Float32Array(8))), { topk: 2, expertBias: u(tensor('float32', [4], new Float32Array(4))) }),
    'route: mask of the wrong length': (b, u) => b.route(u(tensor('float32', [2, 4], new Float32Array(8))), { topk: 2, tokenMask: u(tensor('bool', [3], new Uint8Array(3))) }),
    'permuteBackward: sortedIndices out of range': (b, u) => b.permuteBackward(u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 3]))), 3),
    'permuteBackward: gradPermutedProbs without routingMap': (b, u) =>
      b.permuteBackward(u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 1]))), 3, { gradPermutedProbs: u(tensor('float32', [2], new Float32Array(2))) }),
    'unpermuteBackward: dtypes differ': (b, u) =>
      b.unpermuteBackward(u(tensor('float32', [3, 2], new Float32Array(6))), u(tensor('bfloat16', [2, 2], new Uint16Array(4))), u(tensor('int32', [2], Int32Array.from([0, 1])))),
    'unpermuteBackward: sortedIndices out of range': (b, u) =>
      b.unpermuteBackward(u(tensor('float32', [3, 2], new Float32Array(6))), u(tensor('float32', [2, 2], new Float32Array(4))), u(tensor('int32', [2], Int32Array.from([0, 5])))),
    'topk: NaN': (b, u) => b.topk(u(tensor('float32', [2, 3], Float32Array.from([1, 2, 3, 4, NaN, 6]))), 2),
    'topk: k = 0': (b, u) => b.topk(u(tensor('float32', [2, 3], new Float32Array(6))), 0),
  };
  sameErrorsAsCpu(cases, { backend: cuda, upload: (x) => cuda.upload(x), skip });
});

// ---------------------------------------------------------------------------------------
// route and topk

const goldenRoute = loadGolden('route');
describe('golden route: cuda (host and device tensors) == cpu', () => {
  test('golden file loads', { skip }, () => assert.ok(goldenRoute.file, goldenRoute.error));
  for (const c of goldenRoute.file?.cases ?? []) {
    test(c.name, { skip }, () => {
      const logits = toTensor(c.inputs.logits, 'float32');
      const p = c.params;
      const options = { topk: p.topk, scoreFunction: p.score_func, numGroups: p.n_groups, topkGroups: p.topk_groups, routeScale: p.route_scale, normTopkProb: p.norm_topk_prob };
      if (p.score_func === 'softmax') options.softmaxBeforeTopk = p.softmax_before_topk;
      else if (c.inputs.expert_bias) options.expertBias = toTensor(c.inputs.expert_bias, 'float32');
      if (p.score_func === 'softmax' || p.score_func === 'sqrtsoftplus') {
        delete options.numGroups;
        delete options.topkGroups;
      }
      const want = cpu.route(logits, options);
      assertSameRoute(cuda.route(logits, options), want, 'host');
      const d = up({ logits, bias: options.expertBias });
      const got = cuda.route(d.logits, { ...options, ...(d.bias ? { expertBias: d.bias } : {}) });
      assertSameRoute(got, want, 'device');
      disposeAll(d, got);
    });
  }
});

/** route on device tensors: the logits, bias and mask uploaded (d), the options naming them (dOptions), the result (got). */
function routeOnDevice(logits, options) {
  const d = up({ logits, expertBias: options.expertBias, tokenMask: options.tokenMask });
  const dOptions = { ...options };
  if (d.expertBias) dOptions.expertBias = d.expertBias;
  if (d.tokenMask) dOptions.tokenMask = d.tokenMask;
  return { d, dOptions, got: cuda.route(d.logits, dOptions) };
}

const ROUTES = [];
{
  const random = rng(777);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  const fns = ['softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'];
  for (let i = 0; i < 150; i++) {
    const sf = fns[i % fns.length];
    const E = pick([1, 2, 4, 8, 16, 64, 256, 512, 1024]);
    const grouped = sf !== 'softmax' && sf !== 'sqrtsoftplus' && random() < 0.7;
    const divisors = [1, 2, 4, 8, 16, 32, 64].filter((g) => E % g === 0 && E / g >= 2);
    const G = grouped && divisors.length ? pick(divisors) : 1;
    const kg = G > 1 ? 1 + Math.floor(random() * G) : undefined;
    const maxK = G > 1 ? kg * (E / G) : E;
    ROUTES.push({
      T: pick([0, 1, 7, 64, 300]),
      E,
      sf,
      // k past 32 now and then: route's shared-memory kernel, and topk's picks past lane 31
      k: 1 + Math.floor(random() * Math.min(maxK, random() < 0.15 ? 40 : 12)),
      G,
      kg,
      bias: sf !== 'softmax' && random() < 0.6,
      mask: random() < 0.3,
      norm: random() < 0.5,
      scale: pick([1, 1, 2.5, -0.5]),
      sbt: sf === 'softmax' && random() < 0.5,
      ties: random() < 0.2,
      scaleLogits: pick([1, 8, 40]),
      seed: i + 1,
    });
  }
}

describe('random route problems: cuda == cpu (host and device tensors)', () => {
  for (const r of ROUTES) {
    const name = `T=${r.T} E=${r.E} ${r.sf} k=${r.k}${r.G > 1 ? ` groups ${r.kg}/${r.G}` : ''}${r.bias ? ' bias' : ''}${r.mask ? ' mask' : ''}${r.norm ? ' norm' : ''} scale=${r.scale}${r.sbt ? ' softmaxBeforeTopk' : ''}${r.ties ? ' ties' : ''} #${r.seed}`;
    test(name, { skip }, () => {
      const random = rng(r.seed * 101);
      // ties: logits from a few values, so that keys tie exactly
      const logits = tensor(
        'float32',
        [r.T, r.E],
        Float32Array.from({ length: r.T * r.E }, () => (r.ties ? Math.floor(random() * 4) - 2 : (random() * 2 - 1) * r.scaleLogits)),
      );
      const options = { topk: r.k, scoreFunction: r.sf, normTopkProb: r.norm, routeScale: r.scale };
      if (r.sbt) options.softmaxBeforeTopk = true;
      if (r.G > 1) Object.assign(options, { numGroups: r.G, topkGroups: r.kg });
      if (r.bias)
        options.expertBias = tensor(
          'float32',
          [r.E],
          Float32Array.from({ length: r.E }, () => (r.ties ? 0 : random() * 0.2 - 0.1)),
        );
      if (r.mask)
        options.tokenMask = tensor(
          'bool',
          [r.T],
          Uint8Array.from({ length: r.T }, () => (random() < 0.7 ? 1 : 0)),
        );
      const want = cpu.route(logits, options);
      assertSameRoute(cuda.route(logits, options), want, 'host');
      const { d, dOptions, got } = routeOnDevice(logits, options);
      assertSameRoute(got, want, 'device');
      const again = cuda.route(d.logits, dOptions);
      assertSameResult({ w: again.weights, i: again.indices, s: again.scores }, { w: got.weights.download(), i: got.indices.download(), s: got.scores.download() }, 'second run');
      // topk of the scores
      const k = Math.min(r.E, r.k);
      if (r.T > 0) {
        const tk = cpu.topk(want.scores, k);
        const dt = cuda.topk(got.scores, k);
        assertSameBits(dt.indices, tk.indices, 'topk indices');
        assertSameBits(dt.values, tk.values, 'topk values');
        assertSameResult(cuda.topk(want.scores, k), tk, 'topk (host)');
        disposeAll(dt);
      }
      disposeAll(d, got, again);
    });
  }
});

describe('DeepSeek-V3 routing shape on device tensors', () => {
  test('T=16384 E=256 k=8, sigmoid with bias, 8 groups keep 4, norm, scale 2.5: == cpu', { skip }, () => {
    const random = rng(3);
    const T = 16384;
    const E = 256;
    const logits = tensor(
      'float32',
      [T, E],
      Float32Array.from({ length: T * E }, () => random() * 8 - 4),
    );
    const expertBias = tensor(
      'float32',
      [E],
      Float32Array.from({ length: E }, () => random() * 0.1),
    );
    const options = { topk: 8, scoreFunction: 'sigmoid', expertBias, numGroups: 8, topkGroups: 4, normTopkProb: true, routeScale: 2.5 };
    const want = cpu.route(logits, options);
    const d = up({ logits, expertBias });
    const got = cuda.route(d.logits, { ...options, expertBias: d.expertBias });
    assertSameRoute(got, want, 'device');
    disposeAll(d, got);
  });
});

// More tokens than the persistent route kernels' warps (at most 8 blocks of 4 warps an SM): each
// warp routes several tokens, prefetching the next one's logits while it routes the current one.
describe('route on more tokens than the grid has warps: cuda == cpu', () => {
  const cases = [
    { sf: 'softmax', E: 64, k: 6, sbt: false },
    { sf: 'softmax', E: 128, k: 8, sbt: true, mask: true },
    { sf: 'sigmoid_with_bias', E: 256, k: 8, G: 8, kg: 4, bias: true, norm: true, mask: true },
    { sf: 'sqrtsoftplus', E: 96, k: 4, norm: true },
    { sf: 'softmax_with_bias', E: 512, k: 8, bias: true },
  ];
  for (const [i, c] of cases.entries()) {
    test(`T=9001 E=${c.E} ${c.sf} k=${c.k}${c.G ? ` groups ${c.kg}/${c.G}` : ''}${c.mask ? ' mask' : ''}`, { skip }, () => {
      const random = rng(900 + i);
      const T = 9001;
      const logits = tensor(
        'float32',
        [T, c.E],
        Float32Array.from({ length: T * c.E }, () => random() * 8 - 4),
      );
      const options = { topk: c.k, scoreFunction: c.sf, normTopkProb: !!c.norm, routeScale: 1.5 };
      if (c.sbt) options.softmaxBeforeTopk = true;
      if (c.G) Object.assign(options, { numGroups: c.G, topkGroups: c.kg });
      if (c.bias)
        options.expertBias = tensor(
          'float32',
          [c.E],
          Float32Array.from({ length: c.E }, () => random() * 0.2 - 0.1),
        );
      if (c.mask)
        options.tokenMask = tensor(
          'bool',
          [T],
          Uint8Array.from({ length: T }, () => (random() < 0.8 ? 1 : 0)),
        );
      const want = cpu.route(logits, options);
      const { d, got } = routeOnDevice(logits, options);
      assertSameRoute(got, want, 'device');
      disposeAll(d, got);
    });
  }
});
