// The GPU suite, grouped experts and matmul: the cuda backend's cuBLAS path (device tensors)
// against the CPU core. The GEMMs sum in another order than the CPU's, and bf16/f16 round the
// activation to the token dtype before the down-projection (docs/semantics.md), so results
// agree to a tolerance scaled by the output's magnitude, not bit for bit; run after run the GPU
// gives the same bits. Errors are the core's (class and message). Plain node:test, no
// node_modules; see cuda.test.mjs.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertClose, assertSameBits, cpu, cuda, cudaOnly, host, lib, outcome, rng, tensor, toBFloat16Bits, toFloat16Bits } from './common.mjs';

function floatTensor(dtype, shape, r, scale = 1) {
  const n = shape.reduce((a, b) => a * b, 1);
  const v = Array.from({ length: n }, () => (r() * 2 - 1) * scale);
  if (dtype === 'bfloat16') return tensor(dtype, shape, Uint16Array.from(v, toBFloat16Bits));
  if (dtype === 'float16') return tensor(dtype, shape, Uint16Array.from(v, toFloat16Bits));
  return tensor(dtype, shape, Float32Array.from(v));
}

const TOL = { float32: 2e-5, bfloat16: 3e-2, float16: 5e-3 };

function problem({ dtype, counts, dim, inter, kind = 'swiglu', probs = true, biases = false, seed = 1 }) {
  const r = rng(seed);
  const E = counts.length;
  const N = counts.reduce((a, b) => a + b, 0);
  const width = kind === 'relu2' ? inter : 2 * inter;
  const weights = { downProjs: floatTensor(dtype, [E, inter, dim], r, 1 / Math.sqrt(inter)) };
  weights[kind === 'relu2' ? 'upProjs' : 'gateAndUpProjs'] = floatTensor(dtype, [E, dim, width], r, 1 / Math.sqrt(dim));
  const options = { activation: kind };
  if (probs)
    options.permutedProbs = tensor(
      'float32',
      [N],
      Float32Array.from({ length: N }, () => 0.1 + r()),
    );
  if (biases) options.biases = { gateUpProjBias: floatTensor(dtype, [E, width], r, 0.5), downProjBias: floatTensor(dtype, [E, dim], r, 0.5) };
  return {
    x: floatTensor(dtype, [N, dim], r),
    counts: tensor('int32', [E], Int32Array.from(counts)),
    weights,
    options,
    grad: floatTensor(dtype, [N, dim], r),
  };
}

/** The problem's tensors on the GPU. */
function onDevice(p) {
  const up = (t) => cuda.upload(t);
  const weights = Object.fromEntries(Object.entries(p.weights).map(([k, v]) => [k, up(v)]));
  const options = { ...p.options };
  if (options.permutedProbs) options.permutedProbs = up(options.permutedProbs);
  if (options.biases) options.biases = Object.fromEntries(Object.entries(options.biases).map(([k, v]) => [k, up(v)]));
  return { x: up(p.x), counts: up(p.counts), weights, options, grad: up(p.grad) };
}

const CASES = [];
for (const dtype of ['float32', 'bfloat16', 'float16']) {
  for (const kind of ['swiglu', 'quick_geglu', 'relu2']) {
    CASES.push({ dtype, kind, counts: [5, 0, 17, 3], dim: 24, inter: 40, probs: true, biases: kind !== 'relu2' });
    // inter 36: 16-bit dtypes take the one-column activation kernels (36 is not a multiple of
    // 8), float32 the vectorised ones (4 columns a thread); the others above take the vectorised
    // kernels and, with probs, the backward that adds up the probs gradient in the same pass
    CASES.push({ dtype, kind, counts: [6, 0, 11, 2], dim: 16, inter: 36, probs: true, biases: false });
  }
  CASES.push({ dtype, kind: 'swiglu', counts: [64, 31, 0, 97, 1, 12, 0, 40], dim: 64, inter: 96, probs: false, biases: false });
  CASES.push({ dtype, kind: 'swiglu_clamped', counts: [0, 0, 0], dim: 16, inter: 8, probs: true, biases: true });
  // 20 experts, 17 with tokens
  CASES.push({ dtype, kind: 'swiglu', counts: [3, 0, 9, 1, 14, 2, 0, 5, 8, 8, 1, 30, 0, 4, 6, 2, 7, 11, 3, 1], dim: 32, inter: 48, probs: true, biases: dtype !== 'float16' });
}

describe('grouped experts on the GPU: cuda == cpu within tolerance, the same bits run after run', () => {
  for (const c of CASES) {
    const label = `${c.dtype} ${c.kind} counts [${c.counts}] dim ${c.dim} inter ${c.inter}${c.probs ? ' probs' : ''}${c.biases ? ' biases' : ''}`;
    test(label, { skip: cudaOnly }, () => {
      const p = problem(c);
      const d = onDevice(p);
      const tol = TOL[c.dtype];
      const want = cpu.expertsForward(p.x, p.counts, p.weights, p.options);
      const got = cuda.expertsForward(d.x, d.counts, d.weights, d.options);
      assert.ok(lib.isDeviceTensor(got), 'device tensors in, a device tensor out');
      assertClose(got, want, tol, 'expertsForward');
      assertSameBits(cuda.expertsForward(d.x, d.counts, d.weights, d.options), host(got), 'expertsForward, second run');
      const wantB = cpu.expertsBackward(p.grad, p.x, p.counts, p.weights, p.options);
      const gotB = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, d.options);
      const keys = Object.keys(wantB).filter((k) => k !== 'gradBiases');
      assert.deepEqual(Object.keys(gotB).sort(), Object.keys(wantB).sort(), 'the same gradients');
      // the weight gradients sum over the rows of an expert: their scale grows with the count
      for (const k of keys) assertClose(gotB[k], wantB[k], tol * (k === 'gradTokens' ? 1 : 4), `expertsBackward.${k}`);
      for (const k of Object.keys(wantB.gradBiases ?? {})) assertClose(gotB.gradBiases[k], wantB.gradBiases[k], tol * 4, `expertsBackward.gradBiases.${k}`);
      const again = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, d.options);
      for (const k of keys) assertSameBits(again[k], host(gotB[k]), `expertsBackward.${k}, second run`);
    });
  }
});

describe('expertsForward with a caller-owned out on the cuda backend', () => {
  test('host tensors: written into out (the CPU op), the bits of cpu; device tensors or a device out: a TypeError', { skip: cudaOnly }, () => {
    for (const dtype of ['float32', 'bfloat16']) {
      const p = problem({ dtype, counts: [5, 0, 17, 3], dim: 24, inter: 40, biases: true });
      const want = cpu.expertsForward(p.x, p.counts, p.weights, p.options);
      const out = tensor(dtype, [...want.shape]);
      assert.equal(cuda.expertsForward(p.x, p.counts, p.weights, { ...p.options, out }), out, `${dtype}: the result is out`);
      assertSameBits(out, want, `${dtype}: expertsForward into out`);
      const d = onDevice(p);
      const refused = (e) => e instanceof TypeError && /^expertsForward: options\.out: the cuda backend writes caller-owned outputs only on its host path/.test(e.message);
      assert.throws(() => cuda.expertsForward(d.x, d.counts, d.weights, { ...d.options, out }), refused);
      assert.throws(() => cuda.expertsForward(p.x, p.counts, p.weights, { ...p.options, out: cuda.upload(out) }), refused);
    }
  });
});

describe('matmul on the GPU', () => {
  for (const dtype of ['float32', 'bfloat16']) {
    for (const [transA, transB] of [
      [false, false],
      [true, false],
      [false, true],
      [true, true],
    ]) {
      test(`${dtype} transA ${transA} transB ${transB}`, { skip: cudaOnly }, () => {
        const r = rng(9);
        const [M, K, N] = [37, 53, 29];
        const a = floatTensor(dtype, transA ? [K, M] : [M, K], r);
        const b = floatTensor(dtype, transB ? [N, K] : [K, N], r);
        const want = cpu.matmul(a, b, { transA, transB });
        assertClose(cuda.matmul(cuda.upload(a), cuda.upload(b), { transA, transB }), want, TOL[dtype], 'matmul');
      });
    }
  }
  test('K = 0 gives zeros', { skip: cudaOnly }, () => {
    const out = host(cuda.matmul(cuda.upload(tensor('float32', [3, 0])), cuda.upload(tensor('float32', [0, 2]))));
    assert.deepEqual([...out.shape], [3, 2]);
    assert.ok(out.data.every((v) => v === 0));
  });
});

describe("grouped experts on the GPU: errors are the core's", () => {
  const base = { dtype: 'float32', kind: 'swiglu', counts: [2, 3], dim: 8, inter: 4 };
  const cases = {
    'counts that do not add up': (p) => ({ ...p, counts: tensor('int32', [2], Int32Array.from([2, 2])) }),
    'a negative count': (p) => ({ ...p, counts: tensor('int32', [2], Int32Array.from([6, -1])) }),
    'a weight of the wrong dim': (p) => ({ ...p, weights: { ...p.weights, downProjs: tensor('float32', [2, 4, 7]) } }),
    'an odd gated width': (p) => ({ ...p, weights: { ...p.weights, gateAndUpProjs: tensor('float32', [2, 8, 7]) } }),
    'probs of the wrong length': (p) => ({ ...p, options: { ...p.options, permutedProbs: tensor('float32', [4]) } }),
    'mixed dtypes (host path on the GPU backend)': (p) => ({ ...p, x: tensor('bfloat16', [5, 8]) }),
  };
  for (const [name, mutate] of Object.entries(cases)) {
    test(name, { skip: cudaOnly }, () => {
      const p = mutate(problem(base));
      const want = outcome(() => cpu.expertsForward(p.x, p.counts, p.weights, p.options));
      const d = onDevice(p);
      const got = outcome(() => cuda.expertsForward(d.x, d.counts, d.weights, d.options));
      if (want.error) {
        assert.ok(got.error, `cuda returned where cpu threw ${want.error.message}`);
        assert.equal(got.error.constructor, want.error.constructor);
        assert.equal(got.error.message, want.error.message);
      } else {
        assert.ok(!got.error, `cuda threw ${got.error?.message}`);
        assertClose(got.value, want.value, TOL[host(want.value).dtype], name);
      }
    });
  }
});

describe('saveForBackward: the backward pass takes h and a from the forward pass', () => {
  for (const dtype of ['float32', 'bfloat16']) {
    for (const biases of [false, true]) {
      test(`${dtype}${biases ? ' with biases' : ''}: the same bits as recomputing them`, { skip: cudaOnly }, () => {
        const p = problem({ dtype, kind: 'swiglu', counts: [7, 0, 12, 3], dim: 24, inter: 40, probs: true, biases, seed: 5 });
        const d = onDevice(p);
        const plain = cuda.expertsForward(d.x, d.counts, d.weights, d.options);
        const { output, saved } = cuda.expertsForward(d.x, d.counts, d.weights, { ...d.options, saveForBackward: true });
        assertSameBits(output, host(plain), 'output with saveForBackward');
        assert.ok(lib.isDeviceTensor(saved.upProjection) && lib.isDeviceTensor(saved.activation));
        assert.deepEqual([...saved.activation.shape], [22, 40]);
        assert.deepEqual([...saved.counts], [7, 0, 12, 3], 'saved.counts: the counts the forward read');
        const want = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, d.options);
        const sync0 = cuda.transfers().synchronizations;
        const got = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved });
        assert.equal(cuda.transfers().synchronizations, sync0, 'with saved.counts the backward does not read tokensPerExpert');
        for (const k of Object.keys(want).filter((k) => k !== 'gradBiases')) assertSameBits(got[k], host(want[k]), `expertsBackward.${k} with saved`);
        for (const k of Object.keys(want.gradBiases ?? {})) assertSameBits(got.gradBiases[k], host(want.gradBiases[k]), `gradBiases.${k} with saved`);
      });
    }
  }
  test('saved tensors of the wrong shape are a TypeError naming them', { skip: cudaOnly }, () => {
    const p = problem({ dtype: 'float32', kind: 'swiglu', counts: [2, 3], dim: 8, inter: 4 });
    const d = onDevice(p);
    const { saved } = cuda.expertsForward(d.x, d.counts, d.weights, { ...d.options, saveForBackward: true });
    const wrong = { upProjection: saved.activation, activation: saved.activation };
    assert.throws(
      () => cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved: wrong }),
      (e) => e instanceof TypeError && /saved\.upProjection/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved: { upProjection: saved.upProjection } }),
      (e) => e instanceof TypeError && /saved\.activation/.test(e.message),
    );
    for (const counts of [[2, 3], new Int32Array([2, -3]), new Float32Array([2, 3])]) {
      const r = outcome(() => cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved: { ...saved, counts } }));
      assert.ok(r.error instanceof TypeError && /saved\.counts/.test(r.error.message), `saved.counts ${counts.constructor.name} [${[...counts]}]: ${r.error?.message ?? 'returned'}`);
    }
  });

  test('saved.counts that do not add up to the rows: the backward reads tokensPerExpert instead (the same result)', { skip: cudaOnly }, () => {
    const p = problem({ dtype: 'float32', kind: 'swiglu', counts: [2, 3], dim: 8, inter: 4, probs: true });
    const d = onDevice(p);
    const { saved } = cuda.expertsForward(d.x, d.counts, d.weights, { ...d.options, saveForBackward: true });
    const want = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved });
    for (const counts of [new Int32Array([1, 1, 1]), new Int32Array([1, 1])]) {
      const got = cuda.expertsBackward(d.grad, d.x, d.counts, d.weights, { ...d.options, saved: { ...saved, counts } });
      for (const k of ['gradTokens', 'gradDownProjs', 'gradProbs']) assertSameBits(got[k], host(want[k]), `${k} with saved.counts [${[...counts]}]`);
    }
  });
});
