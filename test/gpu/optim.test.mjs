// The GPU suite, training ops: AdamW on device tensors (kernels/train.cu) against AdamW on host
// tensors (ts/optim.ts on the cpu backend), bit for bit: the parameters (float32, bfloat16,
// float16), the float32 masters, the status (step count, gradient norm); clipping, decay on and
// off, sizes that take the four-element loop and sizes that do not; non-finite gradients (nothing
// written; 'error' throws the host's message, 'skip' counts); dispose frees the optimizer's GPU
// memory. And the layer's element steps (cast, logitsEpilogue, add3, columnSums, gatherPicks)
// against their host definitions in ts/numeric.ts; matmulMixed against the widened GEMM in float64.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable (these need
// device tensors: no stand-in run).
import assert from 'node:assert/strict';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, test } from 'node:test';

import { assertSameBits, cpu, cuda, cudaOnly, host, lib, rng, skip, tensor } from './common.mjs';

if (skip) console.log(`# ${skip}`);

const distDir = resolve(new URL('../../dist/', import.meta.url).pathname);
const { AdamW } = await import(pathToFileURL(resolve(process.env.MOE_DISPATCH_DIST ?? distDir, 'optim.js')).href);
const numeric = await import(pathToFileURL(resolve(process.env.MOE_DISPATCH_DIST ?? distDir, 'numeric.js')).href);

const values = (random, n, scale = 1) => Array.from({ length: n }, () => Math.fround((random() * 2 - 1) * scale));

function pair(dtype, shape, vals) {
  const h = tensor(dtype, shape, vals);
  return { host: h, dev: cuda.upload(tensor(dtype, shape, vals)) };
}

const CASES = [
  { name: 'float32, clipping, decay', dtype: 'float32', shapes: { w: [33, 64], b: [64], x: [3, 5, 7] }, options: { lr: 3e-3, weightDecay: 0.1, maxGradNorm: 0.5 } },
  { name: 'bfloat16, no clipping', dtype: 'bfloat16', shapes: { w: [64, 96], b: [96] }, options: { lr: 1e-2, beta1: 0.8, beta2: 0.95, eps: 1e-6 } },
  { name: 'float16, clipping, decayBiases', dtype: 'float16', shapes: { w: [17, 9], b: [9], big: [512, 1024] }, options: { lr: 1e-3, maxGradNorm: 2, decayBiases: true } },
  {
    name: 'bfloat16, large (several norm chunks, four-element loop)',
    dtype: 'bfloat16',
    shapes: { gateAndUpProjs: [8, 256, 1024], downProjs: [8, 512, 256] },
    options: { lr: 1e-4, weightDecay: 0.01, maxGradNorm: 1 },
  },
];

describe('AdamW: cuda (device tensors) = cpu (host tensors), bit for bit', { skip: cudaOnly }, () => {
  for (const c of CASES) {
    test(c.name, () => {
      const random = rng(c.name.length * 7919);
      const params = Object.fromEntries(
        Object.entries(c.shapes).map(([k, s]) => [
          k,
          pair(
            c.dtype,
            s,
            values(
              random,
              s.reduce((a, b) => a * b, 1),
            ),
          ),
        ]),
      );
      const host = new AdamW(cpu, Object.fromEntries(Object.entries(params).map(([k, p]) => [k, p.host])), c.options);
      const dev = new AdamW(cuda, Object.fromEntries(Object.entries(params).map(([k, p]) => [k, p.dev])), c.options);
      for (let step = 0; step < 3; step++) {
        // gradients in the parameter's dtype, and float32 for one of them
        const grads = Object.fromEntries(
          Object.entries(c.shapes).map(([k, s], i) => [
            k,
            pair(
              i === 0 ? 'float32' : c.dtype,
              s,
              values(
                random,
                s.reduce((a, b) => a * b, 1),
                0.5 + step,
              ),
            ),
          ]),
        );
        host.step(Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, g.host])));
        dev.step(Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, g.dev])));
        for (const g of Object.values(grads)) g.dev.dispose();
      }
      assert.deepEqual(dev.status(), host.status());
      for (const [k, p] of Object.entries(params)) {
        assertSameBits(p.dev, p.host, `params.${k}`);
        assertSameBits(dev.masters[k], host.masters[k], `masters.${k}`);
      }
      dev.dispose();
      for (const p of Object.values(params)) p.dev.dispose();
    });
  }

  test("a non-finite gradient writes nothing; 'error' throws the host's error, 'skip' counts", () => {
    for (const onNonFinite of ['error', 'skip']) {
      const random = rng(17);
      const w = pair('bfloat16', [16, 12], values(random, 192));
      const before = w.dev.download();
      const host = new AdamW(cpu, { w: w.host }, { lr: 1e-2, onNonFinite });
      const dev = new AdamW(cuda, { w: w.dev }, { lr: 1e-2, onNonFinite });
      const g = values(random, 192);
      g[77] = Number.POSITIVE_INFINITY;
      const grads = pair('float32', [16, 12], g);
      let he;
      let de;
      try {
        host.step({ w: grads.host });
      } catch (e) {
        he = e;
      }
      try {
        dev.step({ w: grads.dev });
      } catch (e) {
        de = e;
      }
      assert.equal(de?.constructor.name, he?.constructor.name, onNonFinite);
      assert.equal(de?.message, he?.message, onNonFinite);
      if (onNonFinite === 'error') assert.ok(de instanceof RangeError);
      assertSameBits(w.dev, before, `${onNonFinite}: the weights are unchanged`);
      assert.deepEqual(dev.status(), host.status());
      assert.equal(dev.status().skipped, 1);
      dev.dispose();
      w.dev.dispose();
      grads.dev.dispose();
    }
  });

  test("dispose frees the optimizer's GPU memory (masters, moments, state)", () => {
    const w = cuda.upload(tensor('bfloat16', [256, 256], values(rng(3), 65536)));
    const before = cuda.memory().liveBytes;
    const opt = new AdamW(cuda, { w }, { lr: 1e-3 });
    // master (4 B), two moments (4 B each) an element, and the state
    assert.ok(cuda.memory().liveBytes - before >= 65536 * 12, 'the optimizer holds its tensors');
    opt.dispose();
    assert.equal(cuda.memory().liveBytes, before);
    w.dispose();
  });
});

describe('the layer element steps on the GPU = ts/numeric.ts', { skip: cudaOnly }, () => {
  const random = rng(99);
  const T = 300;
  const E = 48;
  test('cast: exact widening, rounding narrowing', () => {
    for (const [from, to] of [
      ['bfloat16', 'float32'],
      ['float16', 'float32'],
      ['float32', 'bfloat16'],
      ['float32', 'float16'],
    ]) {
      const x = tensor(from, [T, E], values(random, T * E, 70000));
      const got = cuda.cast(cuda.upload(x), to);
      assertSameBits(got, numeric.castTo(x, to), `${from} -> ${to}`);
    }
  });
  test('logitsEpilogue: bias, rounding to the router dtype', () => {
    for (const roundTo of ['float32', 'bfloat16', 'float16']) {
      for (const biasDtype of [undefined, 'float32', 'bfloat16']) {
        const raw = tensor('float32', [T, E], values(random, T * E, 8));
        const bias = biasDtype && tensor(biasDtype, [E], values(random, E));
        const got = cuda.logitsEpilogue(cuda.upload(raw), bias && cuda.upload(bias), roundTo);
        // MoELayer's #logits on the host
        let v = raw.data;
        if (bias) {
          const b = numeric.valuesF32(bias);
          v = Float32Array.from(v, (x, i) => x + b[i % E]);
        }
        if (roundTo !== 'float32') v = numeric.valuesF32(numeric.fromValues(roundTo, [T, E], v));
        assertSameBits(got, { dtype: 'float32', shape: [T, E], data: v }, `roundTo ${roundTo}, bias ${biasDtype}`);
      }
    }
  });
  test('add3 and columnSums', () => {
    for (const dtype of ['float32', 'bfloat16', 'float16']) {
      const a = tensor(dtype, [T, E], values(random, T * E, 4));
      const b = tensor('float32', [T, E], values(random, T * E, 1e-3));
      const c = tensor('float32', [T, E], values(random, T * E, 1e5));
      const want3 = numeric.fromValues(
        dtype,
        [T, E],
        Float64Array.from(numeric.valuesF32(a), (v, i) => v + b.data[i] + c.data[i]),
      );
      assertSameBits(cuda.add3(cuda.upload(a), cuda.upload(b), cuda.upload(c), dtype), want3, `add3 ${dtype}`);
      const a2 = tensor(dtype, [T, E], values(random, T * E, 4));
      const want2 = numeric.fromValues(
        dtype,
        [T, E],
        Float64Array.from(numeric.valuesF32(a), (v, i) => v + numeric.valuesF32(a2)[i]),
      );
      assertSameBits(cuda.add3(cuda.upload(a), cuda.upload(a2), undefined, dtype), want2, `add ${dtype}`);
      assertSameBits(cuda.columnSums(cuda.upload(c), dtype), numeric.fromValues(dtype, [E], numeric.columnSums(c)), `columnSums ${dtype}`);
    }
  });
  test('mseLoss: the loss and its gradient', () => {
    for (const dtype of ['float32', 'bfloat16']) {
      const y = tensor(dtype, [T, 257], values(random, T * 257, 3));
      const t = tensor(dtype, [T, 257], values(random, T * 257, 3));
      const want = lib.mseLoss(cpu, y, t);
      const got = lib.mseLoss(cuda, cuda.upload(y), cuda.upload(t));
      assert.equal(got.loss, want.loss, `${dtype}: the loss, bit for bit`);
      assertSameBits(got.grad, want.grad, `${dtype}: the gradient`);
    }
  });
  test('gatherPicks', () => {
    const k = 4;
    const dense = tensor('float32', [T, E], values(random, T * E));
    const idx = Int32Array.from({ length: T * k }, (_, i) => (i % 37 === 5 ? -1 : Math.floor(random() * E)));
    const indices = tensor('int32', [T, k], idx);
    const want = tensor(
      'float32',
      [T, k],
      Float32Array.from(idx, (e, i) => (e < 0 ? 0 : dense.data[Math.floor(i / k) * E + e])),
    );
    assertSameBits(cuda.gatherPicks(cuda.upload(dense), cuda.upload(indices)), want, 'gatherPicks');
  });
  test('matmulMixed: the widened GEMM within float32 summation error, every layout, both splits; non-finite values as the widened GEMM', () => {
    // a float32 operand with full 24-bit significands (the low parts matter) and a bfloat16 one
    const full = (n) => Float32Array.from({ length: n }, (_, i) => Math.fround((random() * 2 - 1) * 2 ** ((i % 7) - 3) * (1 + 2 ** -20)));
    const at = (t, trans, r, c) => (trans ? t.data[c * t.shape[1] + r] : t.data[r * t.shape[1] + c]);
    const F = 300;
    // [f is A, m, k, n]: the other operand larger than the result (split along M or N), or not (along K)
    const shapes = [
      [true, 5, F, 40],
      [true, F, 5, 40],
      [false, 40, F, 5],
      [false, 40, 5, F],
    ];
    for (const [fIsA, M, K, N] of shapes) {
      for (const transA of [false, true]) {
        for (const transB of [false, true]) {
          const aShape = transA ? [K, M] : [M, K];
          const bShape = transB ? [N, K] : [K, N];
          const make = (isF, shape) => {
            const n = shape[0] * shape[1];
            return isF ? tensor('float32', shape, full(n)) : numeric.fromValues('bfloat16', shape, values(random, n, 2));
          };
          const a = make(fIsA, aShape);
          const b = make(!fIsA, bShape);
          // one non-finite float32 value: its row (A) or column (B) of the result is inf or NaN as in the widened GEMM
          const f = fIsA ? a : b;
          f.data[7] = Number.POSITIVE_INFINITY;
          f.data[11] = Number.NaN;
          const av = numeric.valuesF32(a);
          const bv = numeric.valuesF32(b);
          const A = { data: av, shape: aShape };
          const B = { data: bv, shape: bShape };
          const got = host(cuda.matmulMixed(cuda.upload(a), cuda.upload(b), { transA, transB }));
          assert.deepEqual(got.shape, [M, N]);
          const what = `f ${fIsA ? 'A' : 'B'} [${M}, ${K}, ${N}] transA ${transA} transB ${transB}`;
          let worst = 0;
          for (let i = 0; i < M; i++) {
            for (let j = 0; j < N; j++) {
              let sum = 0;
              let mag = 0;
              for (let q = 0; q < K; q++) {
                const p = at(A, transA, i, q) * at(B, transB, q, j);
                sum += p;
                mag += Math.abs(p);
              }
              const g = got.data[i * N + j];
              if (!Number.isFinite(sum)) {
                assert.ok(Object.is(g, Math.fround(sum)), `${what}: [${i}, ${j}] = ${g}, the widened GEMM's ${sum}`);
                continue;
              }
              const err = Math.abs(g - sum) / (mag || 1);
              worst = Math.max(worst, err);
            }
          }
          // float32 sums of exact products: a few units of 2^-24 of the magnitudes' sum (the hi part alone is off by ~2^-8)
          assert.ok(worst <= 2 ** -18, `${what}: relative error ${worst}`);
          // Exactness (what the bound above cannot see: a lost low part is ~2^-16 of a value): a bfloat16 operand with one
          // power of two a dot product, zeros elsewhere, makes each result one product, exact in float32, so the three
          // parts must give the float32 operand's values scaled, bit for bit.
          const fx = tensor('float32', fIsA ? aShape : bShape, full(K * (fIsA ? M : N)));
          const pick = (i) => (i * 7) % K;
          const scale = (i) => 2 ** ((i % 5) - 2);
          // the other operand's logical [r, q] entry: row (A) or column (B) r has scale(r) at q = pick(r)
          const sel = (r, q) => (q === pick(r) ? scale(r) : 0);
          const oShape = fIsA ? bShape : aShape;
          const oTrans = fIsA ? transB : transA;
          const oVals = new Float32Array(oShape[0] * oShape[1]);
          for (let i = 0; i < oShape[0]; i++) {
            for (let j = 0; j < oShape[1]; j++) {
              // stored [i, j]: B [K, N] (or [N, K] transposed), A [M, K] (or [K, M])
              const [r, q] = fIsA ? (oTrans ? [i, j] : [j, i]) : oTrans ? [j, i] : [i, j];
              oVals[i * oShape[1] + j] = sel(r, q);
            }
          }
          const o = numeric.fromValues('bfloat16', oShape, oVals);
          const exact = host(cuda.matmulMixed(cuda.upload(fIsA ? fx : o), cuda.upload(fIsA ? o : fx), { transA, transB }));
          const F = { data: fx.data, shape: fx.shape };
          const wantExact = new Float32Array(M * N);
          for (let i = 0; i < M; i++) {
            for (let j = 0; j < N; j++) {
              wantExact[i * N + j] = fIsA ? at(F, transA, i, pick(j)) * scale(j) : scale(i) * at(F, transB, pick(i), j);
            }
          }
          assertSameBits(exact, tensor('float32', [M, N], wantExact), `${what}: one exact product a result`);
        }
      }
    }
    const f32 = cuda.upload(tensor('float32', [2, 3], [1, 2, 3, 4, 5, 6]));
    assert.throws(() => cuda.matmulMixed(f32, cuda.upload(tensor('float32', [3, 2], [1, 2, 3, 4, 5, 6]))), /matmulMixed: b\.dtype: expected bfloat16/);
    assert.throws(() => cuda.matmulMixed(f32, cuda.upload(numeric.fromValues('bfloat16', [2, 2], [1, 2, 3, 4]))), /matmulMixed: b\.shape: .*inner dimensions differ/);
    assert.throws(() => cuda.matmulMixed(f32, cuda.upload(numeric.fromValues('float16', [3, 2], [1, 2, 3, 4, 5, 6]))), /matmulMixed: b\.dtype: expected float32 or bfloat16, got float16/);
    // an empty K: zeros
    const z = host(cuda.matmulMixed(cuda.upload(tensor('float32', [2, 0], [])), cuda.upload(numeric.fromValues('bfloat16', [0, 3], []))));
    assert.deepEqual(Array.from(z.data), [0, 0, 0, 0, 0, 0]);
  });
  test("matmulMixed with an addend: add3(addend, the product)'s bits where the product is exact, both splits, every addend dtype; run to run the same bits; its errors", () => {
    // the other operand one power of two a dot product (zeros elsewhere): every result is one
    // product, exact in float32, so any GEMM gives it and the addition's rounding is what is tested
    const full = (n) => Float32Array.from({ length: n }, (_, i) => Math.fround((random() * 2 - 1) * 2 ** ((i % 9) - 4) * (1 + 2 ** -20)));
    const F = 300;
    // [f is A, m, k, n]: split along K (one GEMM: cuBLASLt adds the addend) or along M / N (add3 after the parts' sum)
    for (const [fIsA, M, K, N] of [
      [false, 40, 5, F],
      [true, F, 5, 40],
      [true, 5, F, 40],
      [false, 40, F, 5],
    ]) {
      for (const transB of [false, true]) {
        const fShape = fIsA ? [M, K] : transB ? [N, K] : [K, N];
        const oShape = fIsA ? (transB ? [N, K] : [K, N]) : [M, K];
        const fx = tensor('float32', fShape, full(fShape[0] * fShape[1]));
        // the other operand's logical row (A) / column (B) r holds 2^((r % 5) - 2) at q = (7 r) % K
        const oVals = new Float32Array(oShape[0] * oShape[1]);
        const want = new Float32Array(M * N);
        for (let i = 0; i < M; i++) {
          for (let j = 0; j < N; j++) {
            const r = fIsA ? j : i;
            const q = (r * 7) % K;
            const s = 2 ** ((r % 5) - 2);
            // f's logical [i, q] (A) or [q, j] (B), times s
            want[i * N + j] = fIsA ? fx.data[i * K + q] * s : s * (transB ? fx.data[j * K + q] : fx.data[q * N + j]);
          }
        }
        for (let r = 0; r < (fIsA ? N : M); r++) {
          const q = (r * 7) % K;
          const s = 2 ** ((r % 5) - 2);
          // A [M, K] stored row-major; B [K, N], or [N, K] transposed
          const at = fIsA ? (transB ? r * K + q : q * N + r) : r * K + q;
          oVals[at] = s;
        }
        const o = numeric.fromValues('bfloat16', oShape, oVals);
        const [a, b] = fIsA ? [fx, o] : [o, fx];
        const product = tensor('float32', [M, N], want);
        for (const dtype of ['bfloat16', 'float16', 'float32']) {
          const addend = numeric.fromValues(dtype, [M, N], values(random, M * N, 4));
          const what = `f ${fIsA ? 'A' : 'B'} [${M}, ${K}, ${N}] transB ${transB} addend ${dtype}`;
          const [da, db, dc] = [cuda.upload(a), cuda.upload(b), cuda.upload(addend)];
          const got = cuda.matmulMixed(da, db, { transB, addend: dc });
          assert.equal(got.dtype, dtype, `${what}: the addend's dtype`);
          assertSameBits(host(got), numeric.add3(addend, product, undefined, dtype), what);
          assertSameBits(host(cuda.matmulMixed(da, db, { transB, addend: dc })), host(got), `${what}: run to run`);
          for (const t of [da, db, dc, got]) t.dispose();
        }
      }
    }
    // a general product (the layer's: float32 [T, E] times a bfloat16 [E, dim] transposed, split along K): against
    // add3(addend, the float32 product) the two GEMMs' sums may differ in float32's last bits, so the bfloat16
    // results are the same or neighbours (one unit in the last place, 2^-7 of the value at most)
    const gl = cuda.upload(tensor('float32', [256, 24], full(256 * 24)));
    const wr = cuda.upload(numeric.fromValues('bfloat16', [96, 24], values(random, 96 * 24, 2)));
    const c = cuda.upload(numeric.fromValues('bfloat16', [256, 96], values(random, 256 * 96, 1)));
    const fused = numeric.valuesF32(host(cuda.matmulMixed(gl, wr, { transB: true, addend: c })));
    const separate = numeric.valuesF32(host(cuda.add3(c, cuda.matmulMixed(gl, wr, { transB: true }), undefined, 'bfloat16')));
    let same = 0;
    for (let i = 0; i < fused.length; i++) {
      const bound = 2 ** -7 * Math.max(Math.abs(fused[i]), Math.abs(separate[i])) + 2 ** -12;
      assert.ok(Math.abs(fused[i] - separate[i]) <= bound, `[${i}]: ${fused[i]} against add3's ${separate[i]}`);
      if (Object.is(fused[i], separate[i])) same++;
    }
    assert.ok(same > fused.length / 2, `most results the same bits (${same} of ${fused.length})`);
    // errors: the addend's shape and dtype are named
    const f32 = cuda.upload(tensor('float32', [2, 3], [1, 2, 3, 4, 5, 6]));
    const w = cuda.upload(numeric.fromValues('bfloat16', [3, 4], values(random, 12)));
    assert.throws(
      () => cuda.matmulMixed(f32, w, { addend: cuda.upload(numeric.fromValues('bfloat16', [4, 2], values(random, 8))) }),
      /matmulMixed: addend\.shape: expected \[2, 4\] \(the product's\), got \[4, 2\]/,
    );
    assert.throws(() => cuda.matmulMixed(f32, w, { addend: cuda.upload(tensor('int32', [2, 4], new Int32Array(8))) }), /matmulMixed: options\.addend\.dtype: expected/);
    assert.throws(() => cuda.matmulMixed(f32, w, { addend: 3 }), TypeError);
    // an empty K with an addend: the addend's values (add3 of zeros)
    const c2 = numeric.fromValues('bfloat16', [2, 3], [1.5, -2, 0.25, 3, -0, 7]);
    const k0 = host(cuda.matmulMixed(cuda.upload(tensor('float32', [2, 0], [])), cuda.upload(numeric.fromValues('bfloat16', [0, 3], [])), { addend: cuda.upload(c2) }));
    assertSameBits(k0, numeric.add3(c2, tensor('float32', [2, 3], new Float32Array(6)), undefined, 'bfloat16'), 'an empty K');
  });
  test('argument errors name the argument', () => {
    assert.throws(() => cuda.cast(cuda.upload(tensor('float32', [2], [1, 2])), 'int32'), /cast: dtype: expected 'float32', 'bfloat16' or 'float16', got "int32"/);
    assert.throws(() => cuda.add3(cuda.upload(tensor('float32', [2], [1, 2])), cuda.upload(tensor('float32', [3], [1, 2, 3])), undefined, 'float32'), /add3: b\.shape: expected \[2\], got \[3\]/);
    assert.ok(lib.isDeviceTensor(cuda.zeros([2, 3])));
  });
});

test('the suite ran where CUDA is available', () => {
  assert.ok(skip || cuda);
});
