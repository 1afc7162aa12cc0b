/**
 * Caller-owned outputs (`out`) of permute, unpermute, permuteBackward and expertsForward, on
 * every available backend: the result is the given object, its bits are the allocating call's,
 * one buffer is reused across calls with different routings, and a wrong dtype (TypeError), shape
 * or memory shared with an input (RangeError) is reported before a byte of `out` is written.
 * No Node APIs: it runs in the chromium project too (wasm).
 */
import { describe, expect, it } from 'vitest';

import { tensor, toBFloat16Bits, toFloat16Bits, type Backend, type ExpertWeights, type Tensor, type TokenDType } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { backendRows, registerBackendReport } from './backends.js';
import { expectSameBits, expectThrows } from './util.js';

registerBackendReport();

const cpuRows = backendRows.filter(([name]) => name === 'cpu' || name === 'wasm');

/** A problem: tokens [T, H], its routing map and dense probs, from a seed. */
function problem(b: Backend, seed: number, dtype: TokenDType = 'float32', T = 24, H = 5, E = 6, k = 2) {
  const r = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, rng(seed), 0.1);
  const { routingMap, probs } = b.indicesToMultihot(r.indices, r.weights, E);
  return { tokens: r.tokens as Tensor<TokenDType>, routingMap, probs, T, H, E };
}

/** A tensor full of a sentinel pattern, to see that every element was overwritten (or none). */
function filled<D extends TokenDType | 'float32'>(dtype: D, shape: number[]): Tensor<D> {
  const t = tensor(dtype, shape) as Tensor<D>;
  (t.data as Float32Array | Uint16Array).fill(0x7fc1);
  return t;
}

const snapshot = (t: Tensor) => new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength).slice();
const bytes = (t: Tensor) => new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);

describe.each(cpuRows)('out (%s)', (_name, b) => {
  it.each(['float32', 'bfloat16', 'float16'] as const)('permute writes into out.permutedTokens / out.permutedProbs: the same objects, the same bits (%s)', (dtype) => {
    const p = problem(b, 3, dtype);
    const want = b.permute(p.tokens, p.routingMap, { probs: p.probs });
    const N = want.sortedIndices.shape[0];
    const permutedTokens = filled(dtype, [N, p.H]);
    const permutedProbs = filled('float32', [N]);
    const got = b.permute(p.tokens, p.routingMap, { probs: p.probs, out: { permutedTokens, permutedProbs } });
    expect(got.permutedTokens).toBe(permutedTokens);
    expect(got.permutedProbs).toBe(permutedProbs);
    expectSameBits(got.permutedTokens, want.permutedTokens, 'permutedTokens');
    expectSameBits(got.permutedProbs!, want.permutedProbs!, 'permutedProbs');
    expectSameBits(got.sortedIndices, want.sortedIndices, 'sortedIndices');
    expectSameBits(got.tokensPerExpert, want.tokensPerExpert, 'tokensPerExpert');
    // One of the two outputs given: the other is allocated.
    const onlyTokens = b.permute(p.tokens, p.routingMap, { probs: p.probs, out: { permutedTokens: filled(dtype, [N, p.H]) } });
    expectSameBits(onlyTokens.permutedProbs!, want.permutedProbs!, 'permutedProbs (allocated)');
    expectSameBits(onlyTokens.permutedTokens, want.permutedTokens, 'permutedTokens (out only)');
  });

  it.each(['float32', 'bfloat16'] as const)('unpermute and permuteBackward write into out (%s)', (dtype) => {
    const p = problem(b, 5, dtype);
    const perm = b.permute(p.tokens, p.routingMap, { probs: p.probs });
    const want = b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { probs: perm.permutedProbs });
    const out = filled(dtype, [p.T, p.H]);
    const got = b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { probs: perm.permutedProbs, out });
    expect(got).toBe(out);
    expectSameBits(got, want, 'unpermute');
    // Dense probs with the routing map.
    const wantDense = b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { probs: p.probs, routingMap: p.routingMap });
    expectSameBits(b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { probs: p.probs, routingMap: p.routingMap, out }), wantDense, 'unpermute (dense probs)');

    const gp = tensor(
      'float32',
      [perm.sortedIndices.shape[0]],
      Float32Array.from({ length: perm.sortedIndices.shape[0] }, (_, i) => i / 7),
    );
    const wantGrad = b.permuteBackward(perm.permutedTokens, perm.sortedIndices, p.T, { gradPermutedProbs: gp, routingMap: p.routingMap });
    const gradTokens = filled(dtype, [p.T, p.H]);
    const grad = b.permuteBackward(perm.permutedTokens, perm.sortedIndices, p.T, { gradPermutedProbs: gp, routingMap: p.routingMap, out: { gradTokens } });
    expect(grad.gradTokens).toBe(gradTokens);
    expectSameBits(grad.gradTokens, wantGrad.gradTokens, 'gradTokens');
    expectSameBits(grad.gradProbs!, wantGrad.gradProbs!, 'gradProbs');
  });

  it('one buffer serves calls with different routings (and drop-and-pad)', () => {
    const T = 32;
    const H = 4;
    const E = 4;
    const cap = 6;
    const permutedTokens = filled('float32', [E * cap, H]);
    const merged = filled('float32', [T, H]);
    for (const seed of [1, 2, 3, 4]) {
      const p = problem(b, seed, 'float32', T, H, E, 2);
      const opts = { probs: p.probs, numOutTokens: E * cap, dropAndPad: true };
      const want = b.permute(p.tokens, p.routingMap, opts);
      const got = b.permute(p.tokens, p.routingMap, { ...opts, out: { permutedTokens } });
      expect(got.permutedTokens).toBe(permutedTokens);
      expectSameBits(got.permutedTokens, want.permutedTokens, `permutedTokens, seed ${seed}`);
      const u = { probs: p.probs, routingMap: p.routingMap, dropAndPad: true };
      const wantU = b.unpermute(want.permutedTokens, want.sortedIndices, [T, H], u);
      expectSameBits(b.unpermute(permutedTokens, got.sortedIndices, [T, H], { ...u, out: merged }), wantU, `unpermute, seed ${seed}`);
    }
    // Plain routings of different sizes: an out per size, each reused.
    const outs = new Map<number, Tensor<'float32'>>();
    for (const seed of [7, 8, 9, 7, 8, 9]) {
      const p = problem(b, seed, 'float32', T, H, E, 2);
      const want = b.permute(p.tokens, p.routingMap);
      const N = want.sortedIndices.shape[0];
      if (!outs.has(N)) outs.set(N, filled('float32', [N, H]));
      const got = b.permute(p.tokens, p.routingMap, { out: { permutedTokens: outs.get(N)! } });
      expect(got.permutedTokens).toBe(outs.get(N));
      expectSameBits(got.permutedTokens, want.permutedTokens, `plain, seed ${seed}`);
    }
  });

  it('errors name out and say expected vs got; nothing is written', () => {
    const p = problem(b, 11);
    const perm = b.permute(p.tokens, p.routingMap, { probs: p.probs });
    const N = perm.sortedIndices.shape[0];
    const check = (out: Tensor, f: () => unknown, cls: typeof TypeError | typeof RangeError, message: RegExp) => {
      const before = snapshot(out);
      expectThrows(f, cls, message);
      expect(bytes(out), 'out was written on error').toEqual(before);
    };
    // Wrong dtype: TypeError.
    const bf = filled('bfloat16', [N, p.H]);
    check(bf, () => b.permute(p.tokens, p.routingMap, { out: { permutedTokens: bf } }), TypeError, /^permute: out\.permutedTokens\.dtype: expected float32 .*got bfloat16/);
    const bfU = filled('bfloat16', [p.T, p.H]);
    check(bfU, () => b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { out: bfU as never }), TypeError, /^unpermute: out\.dtype: expected float32 .*got bfloat16/);
    // Wrong shape: RangeError.
    const short = filled('float32', [N - 1, p.H]);
    check(
      short,
      () => b.permute(p.tokens, p.routingMap, { out: { permutedTokens: short } }),
      RangeError,
      new RegExp(`^permute: out\\.permutedTokens\\.shape: expected \\[${N}, ${p.H}\\] .*got \\[${N - 1}, ${p.H}\\]`),
    );
    const pr = filled('float32', [N + 1]);
    check(
      pr,
      () => b.permute(p.tokens, p.routingMap, { probs: p.probs, out: { permutedProbs: pr } }),
      RangeError,
      new RegExp(`^permute: out\\.permutedProbs\\.shape: expected \\[${N}\\] .*got \\[${N + 1}\\]`),
    );
    const flat = filled('float32', [p.T * p.H]);
    check(
      flat,
      () => b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { out: flat }),
      RangeError,
      new RegExp(`^unpermute: out\\.shape: expected \\[${p.T}, ${p.H}\\] .*got \\[${p.T * p.H}\\]`),
    );
    const g = filled('float32', [p.T + 1, p.H]);
    check(g, () => b.permuteBackward(perm.permutedTokens, perm.sortedIndices, p.T, { out: { gradTokens: g } }), RangeError, /^permuteBackward: out\.gradTokens\.shape: expected/);
    // permutedProbs without probs: TypeError.
    const pp = filled('float32', [N]);
    check(pp, () => b.permute(p.tokens, p.routingMap, { out: { permutedProbs: pp } }), TypeError, /^permute: out\.permutedProbs: expected no tensor without probs/);
    // An invalid input is reported as before, and out stays as it was.
    const good = filled('float32', [N, p.H]);
    check(good, () => b.permute(p.tokens, p.routingMap, { numOutTokens: N + 1, out: { permutedTokens: good } }), RangeError, /^permute: numOutTokens:/);
    // Not an object of outputs / unknown output / not a tensor.
    expectThrows(() => b.permute(p.tokens, p.routingMap, { out: good as never }), TypeError, /^permute: options\.out: expected an object \{ permutedTokens, permutedProbs \}/);
    expectThrows(() => b.permute(p.tokens, p.routingMap, { out: { sortedIndices: good } as never }), TypeError, /^permute: options\.out\.sortedIndices: not an output of permute/);
    expectThrows(() => b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { out: new Float32Array(4) as never }), TypeError, /^unpermute: out: expected a Tensor/);
  });

  it('an out that shares memory with an input or the other output is a RangeError', () => {
    const p = problem(b, 13);
    const perm = b.permute(p.tokens, p.routingMap, { probs: p.probs });
    const N = perm.sortedIndices.shape[0];
    // Tokens and an output in one buffer, overlapping.
    const buf = new Float32Array(N * p.H + p.T * p.H);
    buf.set(p.tokens.data as Float32Array);
    const tokens = tensor('float32', [p.T, p.H], buf.subarray(0, p.T * p.H));
    const overlapping = tensor('float32', [N, p.H], buf.subarray(p.H, p.H + N * p.H));
    const before = snapshot(tokens);
    expectThrows(() => b.permute(tokens, p.routingMap, { out: { permutedTokens: overlapping } }), RangeError, /^permute: out\.permutedTokens: its memory overlaps tokens'/);
    expect(bytes(tokens)).toEqual(before);
    // The same buffer, disjoint ranges: allowed.
    const disjoint = tensor('float32', [N, p.H], buf.subarray(p.T * p.H));
    expectSameBits(b.permute(tokens, p.routingMap, { out: { permutedTokens: disjoint } }).permutedTokens, perm.permutedTokens, 'disjoint views of one buffer');
    // unpermute into its own input.
    const self = tensor('float32', [p.T, p.H], (perm.permutedTokens.data as Float32Array).subarray(0, p.T * p.H));
    if (N >= p.T) {
      expectThrows(() => b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.T, p.H], { out: self }), RangeError, /^unpermute: out: its memory overlaps permutedTokens'/);
    }
    // The two outputs of permute overlapping each other.
    const both = new Float32Array(N * p.H + N);
    const a = tensor('float32', [N, p.H], both.subarray(0, N * p.H));
    const c = tensor('float32', [N], both.subarray(N * p.H - 1, N * p.H - 1 + N));
    expectThrows(
      () => b.permute(p.tokens, p.routingMap, { probs: p.probs, out: { permutedTokens: a, permutedProbs: c } }),
      RangeError,
      /^permute: out\.permutedProbs: its memory overlaps out\.permutedTokens'/,
    );
  });
});

/** A grouped-experts problem (swiglu, probs and both biases) of `dtype`, from a seed. */
function expertsProblem(seed: number, dtype: TokenDType, counts = [3, 0, 4, 2], dim = 6, inter = 5) {
  const random = rng(seed);
  const values = (shape: number[], scale: number): Tensor<TokenDType> => {
    const v = Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => (random() * 2 - 1) * scale);
    if (dtype === 'bfloat16') return tensor(dtype, shape, Uint16Array.from(v, toBFloat16Bits));
    if (dtype === 'float16') return tensor(dtype, shape, Uint16Array.from(v, toFloat16Bits));
    return tensor('float32', shape, Float32Array.from(v));
  };
  const E = counts.length;
  const N = counts.reduce((a, b) => a + b, 0);
  const weights: ExpertWeights = { gateAndUpProjs: values([E, dim, 2 * inter], 0.5), downProjs: values([E, inter, dim], 0.5) };
  const options = {
    activation: 'swiglu' as const,
    permutedProbs: tensor(
      'float32',
      [N],
      Float32Array.from({ length: N }, () => random()),
    ),
    biases: { gateUpProjBias: values([E, 2 * inter], 0.3), downProjBias: values([E, dim], 0.3) },
  };
  return { x: values([N, dim], 1), counts: tensor('int32', [E], Int32Array.from(counts)), weights, options, N, dim };
}

describe.each(backendRows)('expertsForward out (%s)', (_name, b) => {
  it.each(['float32', 'bfloat16', 'float16'] as const)('writes into out and returns it, with the bits of the allocating call (%s)', (dtype) => {
    const p = expertsProblem(17, dtype);
    const want = b.expertsForward(p.x, p.counts, p.weights, p.options);
    const out = filled(dtype, [p.N, p.dim]);
    const got = b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out });
    expect(got).toBe(out);
    expectSameBits(got, want, 'expertsForward');
  });

  it('one out serves calls with other weights, probs and counts', () => {
    const out = filled('float32', [9, 6]);
    for (const [seed, counts] of [
      [1, [3, 0, 4, 2]],
      [2, [9, 0, 0, 0]],
      [3, [0, 0, 0, 9]],
      [1, [3, 0, 4, 2]],
    ] as const) {
      const p = expertsProblem(seed, 'float32', [...counts]);
      const want = b.expertsForward(p.x, p.counts, p.weights, p.options);
      expectSameBits(b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out }), want, `seed ${seed}, counts ${counts}`);
    }
  });

  it('errors name out and say expected vs got; nothing is written', () => {
    const p = expertsProblem(19, 'float32');
    const check = (out: Tensor, f: () => unknown, cls: typeof TypeError | typeof RangeError, message: RegExp) => {
      const before = snapshot(out);
      expectThrows(f, cls, message);
      expect(bytes(out), 'out was written on error').toEqual(before);
    };
    const bf = filled('bfloat16', [p.N, p.dim]);
    check(bf, () => b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out: bf as never }), TypeError, /^expertsForward: out\.dtype: expected float32 .*got bfloat16/);
    const wide = filled('float32', [p.N, p.dim + 1]);
    check(
      wide,
      () => b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out: wide }),
      RangeError,
      new RegExp(`^expertsForward: out\\.shape: expected \\[${p.N}, ${p.dim}\\] .*got \\[${p.N}, ${p.dim + 1}\\]`),
    );
    // An invalid input is reported as before, and out stays as it was.
    const good = filled('float32', [p.N, p.dim]);
    const badCounts = tensor('int32', [4], Int32Array.from([3, 0, 4, 1]));
    check(good, () => b.expertsForward(p.x, badCounts, p.weights, { ...p.options, out: good }), RangeError, /^expertsForward: tokensPerExpert: the counts add up to 8/);
    expectThrows(() => b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out: new Float32Array(4) as never }), TypeError, /^expertsForward: out: expected a Tensor/);
    expectThrows(() => b.expertsBackward(good, p.x, p.counts, p.weights, { ...p.options, out: good } as never), TypeError, /^expertsBackward: options\.out: not an option of expertsBackward/);
  });

  it('an out that shares memory with an input is a RangeError', () => {
    const p = expertsProblem(23, 'float32');
    const n = p.N * p.dim;
    // The tokens and the output in one buffer, overlapping by one element; then disjoint.
    const buf = new Float32Array(2 * n);
    buf.set(p.x.data as Float32Array);
    const x = tensor('float32', [p.N, p.dim], buf.subarray(0, n));
    const overlapping = tensor('float32', [p.N, p.dim], buf.subarray(n - 1, 2 * n - 1));
    const before = snapshot(x);
    expectThrows(() => b.expertsForward(x, p.counts, p.weights, { ...p.options, out: overlapping }), RangeError, /^expertsForward: out: its memory overlaps permutedTokens'/);
    expect(bytes(x)).toEqual(before);
    const disjoint = tensor('float32', [p.N, p.dim], buf.subarray(n));
    expectSameBits(b.expertsForward(x, p.counts, p.weights, { ...p.options, out: disjoint }), b.expertsForward(p.x, p.counts, p.weights, p.options), 'disjoint views of one buffer');
    // Over a weight and a bias.
    const down = p.weights.downProjs.data as Float32Array;
    if (down.length >= n) {
      const overDown = tensor('float32', [p.N, p.dim], down.subarray(0, n));
      expectThrows(() => b.expertsForward(p.x, p.counts, p.weights, { ...p.options, out: overDown }), RangeError, /^expertsForward: out: its memory overlaps weights\.downProjs'/);
    }
    const bias = new Float32Array(n + 4 * p.dim);
    const downProjBias = tensor('float32', [4, p.dim], bias.subarray(n));
    const beforeBias = tensor('float32', [p.N, p.dim], bias.subarray(4 * p.dim, 4 * p.dim + n));
    expectThrows(
      () => b.expertsForward(p.x, p.counts, p.weights, { ...p.options, biases: { ...p.options.biases, downProjBias }, out: beforeBias }),
      RangeError,
      /^expertsForward: out: its memory overlaps biases\.downProjBias'/,
    );
  });
});
