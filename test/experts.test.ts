/**
 * Grouped experts (expertsForward / expertsBackward) and matmul, on every available backend:
 *
 * - forward matches a float64 reference written here, for every activation kind, with probs
 *   and both biases, with experts that get no tokens;
 * - every gradient (tokens, both weights, both biases, probs) matches central finite
 *   differences of that float64 forward;
 * - 16-bit inputs: the result is the float32 pipeline's result rounded once;
 * - cpu and wasm agree bit for bit (f32 and bf16, shapes past one GEMM k-block);
 * - errors name the argument.
 */
import { describe, expect, it } from 'vitest';

import { tensor, type ActivationKind, type Backend, type ExpertWeights, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { activationUnit64, bf16Bits, bitsOf, expectThrows, mismatches, rng } from './util.js';

registerBackendReport();

const KINDS: readonly ActivationKind[] = ['swiglu', 'quick_geglu', 'swiglu_oai', 'swiglu_clamped', 'relu2'];

const f32 = (shape: number[], values: ArrayLike<number>) => tensor('float32', shape, Float32Array.from(values));
const i32 = (values: number[]) => tensor('int32', [values.length], Int32Array.from(values));

// ---------------------------------------------------------------------------------------
// The float64 reference, from the formulas.

interface Problem {
  kind: ActivationKind;
  dim: number;
  inter: number;
  counts: number[];
  x: Float64Array;
  w1: Float64Array;
  w2: Float64Array;
  p?: Float64Array;
  b1?: Float64Array;
  b2?: Float64Array;
}

const width = (pr: Problem) => (pr.kind === 'relu2' ? pr.inter : 2 * pr.inter);

/** out[r, :] = (act(x_r W1[e] + b1[e]) * p_r) W2[e] + b2[e] * p_r. */
function reference(pr: Problem): Float64Array {
  const { dim, inter, counts, x, w1, w2, p, b1, b2, kind } = pr;
  const w = width(pr);
  const n = counts.reduce((a, b) => a + b, 0);
  const out = new Float64Array(n * dim);
  let r = 0;
  counts.forEach((c, e) => {
    for (let i = 0; i < c; i++, r++) {
      const h = new Float64Array(w);
      for (let j = 0; j < w; j++) {
        let s = b1 ? b1[e * w + j] : 0;
        for (let k = 0; k < dim; k++) s += x[r * dim + k] * w1[(e * dim + k) * w + j];
        h[j] = s;
      }
      const pw = p ? p[r] : 1;
      const a = new Float64Array(inter);
      for (let j = 0; j < inter; j++) {
        const [gate, up] = kind === 'relu2' ? [h[j], 0] : kind === 'quick_geglu' ? [h[2 * j], h[2 * j + 1]] : [h[j], h[inter + j]];
        a[j] = activationUnit64(kind, gate, up) * pw;
      }
      for (let k = 0; k < dim; k++) {
        let s = b2 ? b2[e * dim + k] * pw : 0;
        for (let j = 0; j < inter; j++) s += a[j] * w2[(e * inter + j) * dim + k];
        out[r * dim + k] = s;
      }
    }
  });
  return out;
}

function problem(kind: ActivationKind, seed: number, counts: number[], dim: number, inter: number, extras = true): Problem {
  const rand = rng(seed);
  const v = (n: number, s: number) => Float64Array.from({ length: n }, () => Math.fround((rand() * 2 - 1) * s));
  const e = counts.length;
  const n = counts.reduce((a, b) => a + b, 0);
  const w = kind === 'relu2' ? inter : 2 * inter;
  return {
    kind,
    dim,
    inter,
    counts,
    x: v(n * dim, 1),
    w1: v(e * dim * w, 0.6),
    w2: v(e * inter * dim, 0.6),
    p: extras ? v(n, 1) : undefined,
    b1: extras ? v(e * w, 0.3) : undefined,
    b2: extras ? v(e * dim, 0.3) : undefined,
  };
}

function weightsOf(pr: Problem): ExpertWeights {
  const e = pr.counts.length;
  const w1 = f32([e, pr.dim, width(pr)], pr.w1);
  return { ...(pr.kind === 'relu2' ? { upProjs: w1 } : { gateAndUpProjs: w1 }), downProjs: f32([e, pr.inter, pr.dim], pr.w2) };
}

function optionsOf(pr: Problem) {
  const e = pr.counts.length;
  return {
    activation: pr.kind,
    ...(pr.p ? { permutedProbs: f32([pr.p.length], pr.p) } : {}),
    ...(pr.b1 && pr.b2 ? { biases: { gateUpProjBias: f32([e, width(pr)], pr.b1), downProjBias: f32([e, pr.dim], pr.b2) } } : {}),
  };
}

function run(moe: Backend, pr: Problem): Tensor {
  const n = pr.counts.reduce((a, b) => a + b, 0);
  return moe.expertsForward(f32([n, pr.dim], pr.x), i32(pr.counts), weightsOf(pr), optionsOf(pr));
}

/** The first few positions where two tensors' bits differ (empty when they are the same): fast to fail on big tensors. */
function bitDiffs(a: Tensor, b: Tensor): string[] {
  return mismatches(bitsOf(a), bitsOf(b), (x, y) => x === y);
}

const close = (rel: number, abs: number) => (g: number, w: number) => Math.abs(g - w) <= rel * Math.abs(w) + abs;

describe.each(backendRows)('experts on %s', (_name, moe) => {
  it.each(KINDS)('forward (%s) matches the float64 reference, with probs, biases and empty experts', (kind) => {
    for (const [counts, extras] of [
      [[3, 0, 5, 1], true],
      [[0, 4, 0], false],
      [[7], true],
    ] as [number[], boolean][]) {
      const pr = problem(kind, 17 + counts.length, counts, 6, 5, extras);
      const out = run(moe, pr);
      expect(out.dtype).toBe('float32');
      expect([...out.shape]).toEqual([counts.reduce((a, b) => a + b, 0), 6]);
      expect(mismatches(out.data as Float32Array, reference(pr), close(2e-5, 2e-6))).toEqual([]);
    }
  });

  it.each(KINDS)('every gradient (%s) matches central finite differences of the float64 forward', (kind) => {
    const pr = problem(kind, 99, [2, 0, 3], 4, 3);
    const n = 5;
    const rand = rng(5);
    const g = Float64Array.from({ length: n * pr.dim }, () => Math.fround(rand() * 2 - 1));
    const loss = (q: Problem) => reference(q).reduce((s, v, i) => s + v * g[i], 0);
    const grads = moe.expertsBackward(f32([n, pr.dim], g), f32([n, pr.dim], pr.x), i32(pr.counts), weightsOf(pr), optionsOf(pr));
    const fd = (field: 'x' | 'w1' | 'w2' | 'p' | 'b1' | 'b2') => {
      const base = pr[field]!;
      return Float64Array.from(base, (_, i) => {
        const h = 1e-5;
        const plus = { ...pr, [field]: Float64Array.from(base, (v, j) => (j === i ? v + h : v)) };
        const minus = { ...pr, [field]: Float64Array.from(base, (v, j) => (j === i ? v - h : v)) };
        return (loss(plus) - loss(minus)) / (2 * h);
      });
    };
    const ok = close(2e-3, 2e-4);
    expect(mismatches(grads.gradTokens.data as Float32Array, fd('x'), ok), 'gradTokens').toEqual([]);
    const gw1 = kind === 'relu2' ? grads.gradUpProjs : grads.gradGateAndUpProjs;
    expect(gw1, 'gradient of the up-projection').toBeDefined();
    expect(mismatches(gw1!.data as Float32Array, fd('w1'), ok), 'gradGateAndUpProjs').toEqual([]);
    expect(mismatches(grads.gradDownProjs.data as Float32Array, fd('w2'), ok), 'gradDownProjs').toEqual([]);
    expect(mismatches(grads.gradBiases!.gateUpProjBias!.data as Float32Array, fd('b1'), ok), 'gateUpProjBias').toEqual([]);
    expect(mismatches(grads.gradBiases!.downProjBias!.data as Float32Array, fd('b2'), ok), 'downProjBias').toEqual([]);
    expect(mismatches(grads.gradProbs!.data as Float32Array, fd('p'), ok), 'gradProbs').toEqual([]);
    // The expert without tokens gets exact zeros.
    const w = width(pr);
    expect(Array.from((gw1!.data as Float32Array).slice(pr.dim * w, 2 * pr.dim * w)).every((v) => v === 0)).toBe(true);
  });

  it('bfloat16 inputs: the float32 pipeline rounded once', () => {
    const pr = problem('swiglu', 3, [4, 2], 8, 6);
    const toBf = (a: Float64Array) =>
      Float64Array.from(a, (v) => {
        const b = tensor('bfloat16', [1], [v]);
        return new Float32Array(new Uint32Array([(b.data[0] as number) << 16]).buffer)[0];
      });
    const q: Problem = { ...pr, x: toBf(pr.x), w1: toBf(pr.w1), w2: toBf(pr.w2) };
    const want = run(moe, q); // float32 inputs holding the bf16 values
    const bf = (shape: number[], a: Float64Array) => tensor('bfloat16', shape, Array.from(a));
    const e = 2;
    const out = moe.expertsForward(bf([6, 8], q.x), i32(q.counts), { gateAndUpProjs: bf([e, 8, 12], q.w1), downProjs: bf([e, 6, 8], q.w2) }, optionsOf(q));
    expect(out.dtype).toBe('bfloat16');
    expect(Array.from(out.data as Uint16Array)).toEqual(Array.from(want.data as Float32Array, bf16Bits));
  });

  it('gatherIndices: the rows of the tokens in their own order, the same bits as on the gathered copy; bad indices name it', () => {
    const pr = problem('swiglu', 41, [3, 0, 2], 6, 5, true);
    const T = 4;
    const rand = rng(3);
    const xs = Float32Array.from({ length: T * pr.dim }, () => Math.fround(rand() * 2 - 1));
    const idx = [2, 0, 3, 3, 1]; // rows repeat, as a token's k picks do
    const gathered = f32(
      [idx.length, pr.dim],
      idx.flatMap((t) => Array.from(xs.subarray(t * pr.dim, (t + 1) * pr.dim))),
    );
    const x = f32([T, pr.dim], xs);
    const o = { ...optionsOf(pr), gatherIndices: i32(idx) };
    expect(bitsOf(moe.expertsForward(x, i32(pr.counts), weightsOf(pr), o))).toEqual(bitsOf(moe.expertsForward(gathered, i32(pr.counts), weightsOf(pr), optionsOf(pr))));
    const g = f32(
      [idx.length, pr.dim],
      Array.from({ length: idx.length * pr.dim }, () => rand() - 0.5),
    );
    const got = moe.expertsBackward(g, x, i32(pr.counts), weightsOf(pr), o);
    const want = moe.expertsBackward(g, gathered, i32(pr.counts), weightsOf(pr), optionsOf(pr));
    expect([...got.gradTokens.shape]).toEqual([idx.length, pr.dim]);
    for (const key of ['gradTokens', 'gradGateAndUpProjs', 'gradDownProjs', 'gradProbs'] as const) expect(bitsOf(got[key]!), key).toEqual(bitsOf(want[key]!));
    expect(bitsOf(got.gradBiases!.gateUpProjBias!)).toEqual(bitsOf(want.gradBiases!.gateUpProjBias!));
    expectThrows(
      () => moe.expertsForward(x, i32(pr.counts), weightsOf(pr), { ...o, gatherIndices: i32([2, 4, 0, 0, 1]) }),
      RangeError,
      /^expertsForward: gatherIndices: element 1 = 4 is outside \[0, 4\)/,
    );
    expectThrows(() => moe.expertsBackward(g, x, i32(pr.counts), weightsOf(pr), { ...o, gatherIndices: i32([2, 0, -1, 0, 1]) }), RangeError, /^expertsBackward: gatherIndices: element 2 = -1/);
    expectThrows(() => moe.expertsForward(x, i32(pr.counts), weightsOf(pr), { ...o, gatherIndices: f32([5], [0, 0, 0, 0, 0]) as never }), TypeError, /^expertsForward: options\.gatherIndices\.dtype/);
    expectThrows(() => moe.expertsForward(x, i32(pr.counts), weightsOf(pr), { ...o, gatherIndices: tensor('int32', [5, 1]) }), RangeError, /^expertsForward: options\.gatherIndices\.shape/);
    // the gathered rows must still be the counts' N: one index short is the core's shape error
    expectThrows(() => moe.expertsForward(x, i32(pr.counts), weightsOf(pr), { ...o, gatherIndices: i32([2, 0, 3, 3]) }), RangeError, /^expertsForward: /);
  });

  it("gradGatherIndices: the output's gradient gathered from the tokens' (an unweighted unpermute's backward), the same bits as on the gathered rows; bad indices name it", () => {
    const pr = problem('swiglu', 43, [3, 0, 2], 6, 5, true);
    const T = 4;
    const rand = rng(5);
    const idx = [2, 0, 3, 3, 1];
    const gt = Float32Array.from({ length: T * pr.dim }, () => Math.fround(rand() - 0.5));
    const gTokens = f32([T, pr.dim], gt);
    const gRows = f32(
      [idx.length, pr.dim],
      idx.flatMap((t) => Array.from(gt.subarray(t * pr.dim, (t + 1) * pr.dim))),
    );
    const x = f32([idx.length, pr.dim], pr.x);
    const want = moe.expertsBackward(gRows, x, i32(pr.counts), weightsOf(pr), optionsOf(pr));
    const got = moe.expertsBackward(gTokens, x, i32(pr.counts), weightsOf(pr), { ...optionsOf(pr), gradGatherIndices: i32(idx) });
    for (const key of ['gradTokens', 'gradGateAndUpProjs', 'gradDownProjs', 'gradProbs'] as const) expect(bitsOf(got[key]!), key).toEqual(bitsOf(want[key]!));
    expect(bitsOf(got.gradBiases!.downProjBias!)).toEqual(bitsOf(want.gradBiases!.downProjBias!));
    // with gatherIndices too: both gathers, the same bits as on both gathered copies
    const xs = f32([T, pr.dim], pr.x.slice(0, T * pr.dim));
    const xRows = f32(
      [idx.length, pr.dim],
      idx.flatMap((t) => Array.from(pr.x.slice(t * pr.dim, (t + 1) * pr.dim))),
    );
    const both = moe.expertsBackward(gTokens, xs, i32(pr.counts), weightsOf(pr), { ...optionsOf(pr), gatherIndices: i32(idx), gradGatherIndices: i32(idx) });
    const wantBoth = moe.expertsBackward(gRows, xRows, i32(pr.counts), weightsOf(pr), optionsOf(pr));
    for (const key of ['gradTokens', 'gradGateAndUpProjs', 'gradDownProjs', 'gradProbs'] as const) expect(bitsOf(both[key]!), `${key} (both gathers)`).toEqual(bitsOf(wantBoth[key]!));
    const o = optionsOf(pr);
    expectThrows(
      () => moe.expertsBackward(gTokens, x, i32(pr.counts), weightsOf(pr), { ...o, gradGatherIndices: i32([2, 0, 4, 3, 1]) }),
      RangeError,
      /^expertsBackward: gradGatherIndices: element 2 = 4 is outside \[0, 4\) \(a row of gradOutput/,
    );
    expectThrows(
      () => moe.expertsBackward(gTokens, x, i32(pr.counts), weightsOf(pr), { ...o, gradGatherIndices: f32([5], [0, 0, 0, 0, 0]) as never }),
      TypeError,
      /^expertsBackward: options\.gradGatherIndices\.dtype/,
    );
    expectThrows(
      () => moe.expertsBackward(f32([T * pr.dim], gt), x, i32(pr.counts), weightsOf(pr), { ...o, gradGatherIndices: i32(idx) }),
      RangeError,
      /^expertsBackward: gradOutput\.shape: with gradGatherIndices, expected the tokens' gradient in their own order/,
    );
    // one index short: the gathered gradient is not the rows' N (the core's shape error)
    expectThrows(() => moe.expertsBackward(gTokens, x, i32(pr.counts), weightsOf(pr), { ...o, gradGatherIndices: i32([2, 0, 3, 3]) }), RangeError, /^expertsBackward: /);
    // a forward has no output gradient: the option is unknown there
    expectThrows(() => moe.expertsForward(x, i32(pr.counts), weightsOf(pr), { ...o, gradGatherIndices: i32(idx) } as never), TypeError, /gradGatherIndices/);
  });

  it('matmul: plain and transposed views, against float64', () => {
    const rand = rng(8);
    const [m, k, n] = [9, 300, 7];
    const a = Float32Array.from({ length: m * k }, () => rand() - 0.5);
    const b = Float32Array.from({ length: k * n }, () => rand() - 0.5);
    const want = Float64Array.from({ length: m * n }, (_, i) => {
      let s = 0;
      for (let j = 0; j < k; j++) s += a[Math.floor(i / n) * k + j] * b[j * n + (i % n)];
      return s;
    });
    const out = moe.matmul(f32([m, k], a), f32([k, n], b));
    expect(mismatches(out.data as Float32Array, want, close(1e-5, 1e-5))).toEqual([]);
    const at = Float32Array.from({ length: k * m }, (_, i) => a[(i % m) * k + Math.floor(i / m)]);
    const bt = Float32Array.from({ length: n * k }, (_, i) => b[(i % k) * n + Math.floor(i / k)]);
    expect(bitsOf(moe.matmul(f32([k, m], at), f32([n, k], bt), { transA: true, transB: true }))).toEqual(bitsOf(out));
  });

  it('errors name the argument', () => {
    const pr = problem('swiglu', 1, [2, 1], 4, 3);
    const x = f32([3, 4], pr.x);
    expectThrows(() => moe.expertsForward(x, i32([2, 2]), weightsOf(pr), { activation: 'swiglu' }), RangeError, /^expertsForward: tokensPerExpert: the counts add up to more than 3/);
    expectThrows(() => moe.expertsForward(x, i32([2, 1, 0]), weightsOf(pr), { activation: 'swiglu' }), RangeError, /^expertsForward: tokensPerExpert\.shape: expected \[2\]/);
    expectThrows(() => moe.expertsForward(x, i32([2, 1]), weightsOf(pr), { activation: 'relu2' }), TypeError, /^expertsForward: weights\.gateAndUpProjs: not used by activation 'relu2'/);
    expectThrows(
      () => moe.expertsForward(x, i32([2, 1]), { gateAndUpProjs: f32([2, 4, 6], pr.w1), downProjs: f32([2, 4, 3], pr.w2) }, { activation: 'swiglu' }),
      RangeError,
      /^expertsForward: downProjs\.shape: expected \[2, 3, 4\]/,
    );
    expectThrows(() => moe.expertsForward(x, i32([2, 1]), weightsOf(pr), { activation: 'gelu' as ActivationKind }), RangeError, /^expertsForward: kind: expected one of/);
    expectThrows(() => moe.expertsForward(x, i32([2, 1]), weightsOf(pr), { activation: 'swiglu', permutedProbs: f32([2], [1, 1]) }), RangeError, /^expertsForward: permutedProbs\.shape/);
    expectThrows(
      () => moe.expertsBackward(tensor('bfloat16', [3, 4]), x, i32([2, 1]), weightsOf(pr), { activation: 'swiglu' }),
      TypeError,
      /^expertsBackward: gradOutput\.dtype: expected float32 \(the dtype of permutedTokens\)/,
    );
    expectThrows(() => moe.matmul(f32([2, 3], [1, 2, 3, 4, 5, 6]), f32([2, 3], [1, 2, 3, 4, 5, 6])), RangeError, /^matmul: b\.shape: the inner dimensions differ/);
  });
});

describe('cpu and wasm agree bit for bit', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  it.skipIf(!cpu || !wasm)('expertsForward / expertsBackward / matmul, float32 and bfloat16, k past one GEMM block', () => {
    for (const kind of KINDS) {
      for (const dtype of ['float32', 'bfloat16'] as const) {
        const pr = problem(kind, 1234, [37, 0, 300, 11], 264, 40);
        const n = 348;
        const rand = rng(77);
        const cast = (shape: number[], a: ArrayLike<number>) => (dtype === 'float32' ? f32(shape, a) : tensor('bfloat16', shape, Array.from(a)));
        const e = pr.counts.length;
        const w1 = cast([e, pr.dim, width(pr)], pr.w1);
        const weights: ExpertWeights = { ...(kind === 'relu2' ? { upProjs: w1 } : { gateAndUpProjs: w1 }), downProjs: cast([e, pr.inter, pr.dim], pr.w2) };
        const x = cast([n, pr.dim], pr.x);
        const g = cast(
          [n, pr.dim],
          Array.from({ length: n * pr.dim }, () => rand() - 0.5),
        );
        const o = optionsOf(pr);
        const a = cpu!.expertsForward(x, i32(pr.counts), weights, o);
        const b = wasm!.expertsForward(x, i32(pr.counts), weights, o);
        expect(bitDiffs(a, b), `${kind} ${dtype} forward`).toEqual([]);
        const ga = cpu!.expertsBackward(g, x, i32(pr.counts), weights, o);
        const gb = wasm!.expertsBackward(g, x, i32(pr.counts), weights, o);
        for (const key of ['gradTokens', 'gradGateAndUpProjs', 'gradUpProjs', 'gradDownProjs', 'gradProbs'] as const) {
          if (ga[key] || gb[key]) expect(bitDiffs(ga[key]!, gb[key]!), `${kind} ${dtype} ${key}`).toEqual([]);
        }
        expect(bitDiffs(ga.gradBiases!.gateUpProjBias!, gb.gradBiases!.gateUpProjBias!)).toEqual([]);
        expect(bitDiffs(ga.gradBiases!.downProjBias!, gb.gradBiases!.downProjBias!)).toEqual([]);
      }
    }
    const rand = rng(3);
    const a = f32(
      [513, 300],
      Array.from({ length: 513 * 300 }, () => rand() - 0.5),
    );
    const b = f32(
      [300, 129],
      Array.from({ length: 300 * 129 }, () => rand() - 0.5),
    );
    expect(bitDiffs(cpu!.matmul(a, b), wasm!.matmul(a, b))).toEqual([]);
    expect(bitDiffs(cpu!.matmul(a, a, { transB: true }), wasm!.matmul(a, a, { transB: true }))).toEqual([]);
  });
});
