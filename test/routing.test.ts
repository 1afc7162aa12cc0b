/**
 * Routing and auxiliary losses, on every available backend:
 *
 * - golden: every case of `route.json` and `aux_loss.json` (PyTorch running the reference code);
 * - a small float64 reference of `route` and of the losses written here, independent of the
 *   library, checked on hand-made and random problems (fast-check, fixed seed);
 * - gradients against central finite differences of the float64 losses;
 * - our top-k order (descending selection score, ties to the lower expert id);
 * - native ('cpu') and 'wasm' bit for bit on random inputs;
 * - errors: class and `<op>: <option>` message for each invalid option.
 *
 * Reproduce or explore: MOE_FC_SEED=<n> MOE_FC_RUNS=<n> npx vitest run test/routing.test.ts
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { tensor, type RouteOptions, type RouteResult, type ScoreFunction, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { input, loadGolden, output, toTensor, type GoldenCase } from './golden-loader.js';
import { bitsOf, expectF32Close, expectMeta, expectSameBits, expectValues, mismatches, itThrowsEach, type OpErrorCase } from './util.js';

const SEED = Number(process.env.MOE_FC_SEED ?? 0x7a11_0c8e);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 150);
/** Fixed seed; no shrinking after a failure (shrinking 35-float arrays can run for minutes): the seed and path reproduce it. */
const FC: fc.Parameters<unknown> = { seed: SEED, numRuns: RUNS, endOnFailure: true };

const f = Math.fround;
const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const f32 = (shape: number[], values: number[]) => tensor('float32', shape, Float32Array.from(values));
const bools = (values: (boolean | number)[]) =>
  tensor(
    'bool',
    [values.length],
    Uint8Array.from(values, (v) => (v ? 1 : 0)),
  );

// ---------------------------------------------------------------------------------------
// A float64 reference of route, following docs/semantics.md: scores in float64 rounded once
// to float32; selection keys in float32; top-k by descending key (-0 == +0), ties to the lower id.

interface RefOptions {
  topk: number;
  scoreFunction: ScoreFunction;
  softmaxBeforeTopk: boolean;
  bias: number[] | null;
  numGroups: number;
  topkGroups: number;
  norm: boolean;
  scale: number;
  mask: boolean[] | null;
}

interface RefRoute {
  /** Per token: the picked experts in our order, -1 for masked tokens. */
  indices: number[][];
  weights: number[][];
  scores: number[];
  /** Per token: the selection key of every expert (after group masking). */
  keys: number[][];
}

function softmax64(row: readonly number[]): number[] {
  const m = Math.max(...row);
  const e = row.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** The k best of `keys`: descending, ties to the lower index. */
function refTopK(keys: readonly number[], k: number): number[] {
  return range(keys.length)
    .sort((a, b) => (keys[b] === keys[a] ? a - b : keys[b] > keys[a] ? 1 : -1))
    .slice(0, k);
}

function refRoute(logits: readonly number[], T: number, E: number, o: RefOptions): RefRoute {
  const out: RefRoute = { indices: [], weights: [], scores: [], keys: [] };
  const k = o.topk;
  for (let t = 0; t < T; t++) {
    const x = logits.slice(t * E, (t + 1) * E);
    let s: number[];
    switch (o.scoreFunction) {
      case 'softmax':
      case 'softmax_with_bias':
        s = softmax64(x).map(f);
        break;
      case 'sigmoid':
      case 'sigmoid_with_bias':
        s = x.map((v) => f(1 / (1 + Math.exp(-v))));
        break;
      case 'sqrtsoftplus':
        s = x.map((v) => f(Math.sqrt(v > 20 ? v : Math.log1p(Math.exp(v)))));
        break;
    }
    const onLogits = o.scoreFunction === 'softmax' && !o.softmaxBeforeTopk;
    const keys = onLogits ? [...x] : o.bias ? s.map((v, e) => f(v + o.bias![e])) : [...s];
    if (o.numGroups > 1) {
      const size = E / o.numGroups;
      const top2 = !(o.scoreFunction === 'sigmoid' && !o.bias);
      const groupKeys = range(o.numGroups).map((g) => {
        const members = keys.slice(g * size, (g + 1) * size).sort((a, b) => b - a);
        return top2 ? f(members[0] + members[1]) : members[0];
      });
      const kept = new Set(refTopK(groupKeys, o.topkGroups));
      const masked = o.scoreFunction === 'sigmoid_with_bias' ? -Infinity : 0;
      for (let e = 0; e < E; e++) if (!kept.has(Math.floor(e / size))) keys[e] = masked;
    }
    out.keys.push(keys);
    const picks = refTopK(keys, k);
    let w = onLogits ? softmax64(picks.map((e) => x[e])).map(f) : picks.map((e) => s[e]);
    const normalise = o.norm && k > 1;
    if (normalise) {
      const denom = w.reduce((a, b) => a + b, 0) + 1e-20;
      w = w.map((v) => v / denom);
      const sDenom = s.reduce((a, b) => a + b, 0) + 1e-20;
      s = s.map((v) => f(v / sDenom));
    }
    out.scores.push(...s);
    if (o.mask && !o.mask[t]) {
      out.indices.push(Array(k).fill(-1));
      out.weights.push(Array(k).fill(0));
    } else {
      out.indices.push(picks);
      out.weights.push(w.map((v) => f(v * o.scale)));
    }
  }
  return out;
}

function refOptions(o: RouteOptions): RefOptions {
  return {
    topk: o.topk,
    scoreFunction: o.scoreFunction ?? 'softmax',
    softmaxBeforeTopk: o.softmaxBeforeTopk ?? false,
    bias: o.expertBias ? Array.from(o.expertBias.data) : null,
    numGroups: o.numGroups ?? 1,
    topkGroups: o.topkGroups ?? o.numGroups ?? 1,
    norm: o.normTopkProb ?? false,
    scale: o.routeScale ?? 1,
    mask: o.tokenMask ? Array.from(o.tokenMask.data, (v) => v !== 0) : null,
  };
}

/** Asserts a route result against the float64 reference: indices (in our order) exact, floats within `rel`. */
function expectMatchesReference(out: RouteResult, logits: readonly number[], T: number, E: number, options: RouteOptions, rel = 1e-6): void {
  const ref = refRoute(logits, T, E, refOptions(options));
  const k = options.topk;
  expectValues(out.indices, 'int32', [T, k], ref.indices.flat(), 'indices (our order)');
  expectF32Close(out.weights, [T, k], ref.weights.flat(), rel, 'weights');
  expectF32Close(out.scores, [T, E], ref.scores, rel, 'scores');
  const counts = range(E).map((e) => ref.indices.flat().filter((v) => v === e).length);
  expectValues(out.tokensPerExpert, 'int32', [E], counts, 'tokensPerExpert');
}

// ---------------------------------------------------------------------------------------
// float64 references of the losses.

function validRows(T: number, mask: readonly boolean[] | null): number[] {
  return range(T).filter((t) => !mask || mask[t]);
}

function switchLoss64(probs: readonly number[], T: number, E: number, counts: readonly number[], k: number, coeff: number, mask: boolean[] | null = null, numTokens?: number): number {
  const rows = validRows(T, mask);
  const n = numTokens ?? Math.max(rows.length, 1);
  let total = 0;
  for (const t of rows) for (let e = 0; e < E; e++) total += probs[t * E + e] * counts[e];
  return (total * E * coeff) / (k * n * n);
}

function switchFromLogits64(logits: readonly number[], T: number, E: number, counts: readonly number[], k: number, coeff: number, mask: boolean[] | null = null, numTokens?: number): number {
  const probs = range(T).flatMap((t) => softmax64(logits.slice(t * E, (t + 1) * E)));
  return switchLoss64(probs, T, E, counts, k, coeff, mask, numTokens);
}

function zLoss64(logits: readonly number[], T: number, E: number, coeff: number, mask: boolean[] | null = null): number {
  const rows = validRows(T, mask);
  let total = 0;
  for (const t of rows) {
    const row = logits.slice(t * E, (t + 1) * E);
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((a, v) => a + Math.exp(v - m), 0));
    total += lse * lse;
  }
  return (coeff * total) / Math.max(rows.length, 1);
}

/** Central differences of `fn` at `x`, in float64. */
function finiteDifferences(fn: (x: number[]) => number, x: readonly number[], h = 1e-5): number[] {
  return x.map((_, i) => {
    const up = [...x];
    const down = [...x];
    up[i] += h;
    down[i] -= h;
    return (fn(up) - fn(down)) / (2 * h);
  });
}

function expectGradClose(got: Tensor, shape: number[], fd: readonly number[], what: string): void {
  expectMeta(got, 'float32', shape, what);
  const scale = Math.max(...fd.map(Math.abs), 1e-12);
  const ok = (g: number, w: number) => Math.abs(g - w) <= 1e-3 * Math.abs(w) + 1e-5 * scale;
  expect(mismatches(got.data as Float32Array, fd, ok), `${what} vs finite differences`).toEqual([]);
}

/** A small deterministic generator for hand-rolled random inputs (xorshift32). */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

// ---------------------------------------------------------------------------------------

const routeGolden = loadGolden('route');
const auxGolden = loadGolden('aux_loss');
const routeCases = routeGolden.file?.cases ?? [];
const auxCases = auxGolden.file?.cases ?? [];

function goldenRouteOptions(c: GoldenCase): RouteOptions {
  const p = c.params as Record<string, number | string | boolean>;
  const bias = c.inputs.expert_bias;
  const options: RouteOptions = {
    topk: p.topk as number,
    scoreFunction: p.score_func as ScoreFunction,
    numGroups: p.n_groups as number,
    topkGroups: p.topk_groups as number,
    normTopkProb: p.norm_topk_prob as boolean,
    routeScale: p.route_scale as number,
  };
  if (p.score_func === 'softmax') options.softmaxBeforeTopk = p.softmax_before_topk as boolean;
  if (bias) options.expertBias = toTensor(bias) as Tensor<'float32'>;
  return options;
}

registerBackendReport();

describe('golden files', () => {
  it('route.json and aux_loss.json are present and hold cases', () => {
    if (routeGolden.error) throw new Error(routeGolden.error);
    if (auxGolden.error) throw new Error(auxGolden.error);
    expect(routeGolden.file!.op).toBe('route');
    expect(auxGolden.file!.op).toBe('aux_loss');
    expect(routeCases.length).toBeGreaterThanOrEqual(29);
    expect(auxCases.length).toBeGreaterThanOrEqual(5);
  });

  it('the float64 reference of this file reproduces route.json (so it can judge tie rows)', () => {
    let tieRows = 0;
    for (const c of routeCases) {
      const logits = input(c, 'logits');
      const [T, E] = logits.shape;
      const ref = refRoute(logits.data, T, E, refOptions(goldenRouteOptions(c)));
      const want = output(c, 'indices_sorted_by_expert').data;
      const k = c.params.topk as number;
      for (let t = 0; t < T; t++) {
        const mine = [...ref.indices[t]].sort((a, b) => a - b);
        if (mine.join() !== want.slice(t * k, (t + 1) * k).join()) tieRows++;
      }
    }
    // Only rows the reference decided by an exact tie (checked in the golden tests) may differ.
    expect(tieRows).toBeLessThanOrEqual(12);
  });
});

describe.each(backendRows)('golden route on %s', (_name, backend) => {
  it.each(routeCases.map((c) => [c.name, c] as const))('%s', (_case, c) => {
    const logits = input(c, 'logits');
    const [T, E] = logits.shape;
    const options = goldenRouteOptions(c);
    const k = options.topk;
    const out = backend.route(toTensor(logits) as Tensor<'float32'>, options);
    expectMeta(out.indices, 'int32', [T, k], 'indices');
    expectMeta(out.weights, 'float32', [T, k], 'weights');
    expectF32Close(out.scores, [T, E], output(c, 'scores').data, 1e-5, 'scores');

    const wantIdx = output(c, 'indices_sorted_by_expert').data;
    const wantW = output(c, 'weights_sorted_by_expert').data;
    const ref = refRoute(logits.data, T, E, refOptions(options));
    const idx = out.indices.data as Int32Array;
    const w = out.weights.data as Float32Array;
    for (let t = 0; t < T; t++) {
      const pairs = range(k)
        .map((j) => [idx[t * k + j], w[t * k + j]] as const)
        .sort((a, b) => a[0] - b[0]);
      const gotSet = pairs.map((p) => p[0]);
      const wantSet = Array.from(wantIdx.slice(t * k, (t + 1) * k));
      if (gotSet.join() === wantSet.join()) {
        const gotW = pairs.map((p) => p[1]);
        const want = Array.from(wantW.slice(t * k, (t + 1) * k));
        expect(
          mismatches(gotW, want, (g, v) => Math.abs(g - v) <= 1e-5 * Math.abs(v) + 1e-12),
          `token ${t}: weights`,
        ).toEqual([]);
        continue;
      }
      // The reference broke an exact tie at the k-th key its own way (torch.topk's order among
      // equal values is unspecified); we take the lower ids. Both sets must be top-k sets of the
      // same keys, differing only in experts whose key equals the k-th key.
      const keys = ref.keys[t];
      const kth = Math.min(...gotSet.map((e) => keys[e]));
      const strictlyBetter = range(E).filter((e) => keys[e] > kth);
      for (const e of strictlyBetter) {
        expect(gotSet, `token ${t}: expert ${e} beats the k-th key ${kth}`).toContain(e);
        expect(wantSet, `token ${t}: golden keeps expert ${e}`).toContain(e);
      }
      for (const e of [...gotSet, ...wantSet]) expect(keys[e], `token ${t}: expert ${e} is in a tie or better`).toBeGreaterThanOrEqual(kth);
      const tied = range(E).filter((e) => keys[e] === kth);
      expect(tied.length, `token ${t}: a real tie`).toBeGreaterThan(k - strictlyBetter.length);
      expect(
        gotSet.filter((e) => keys[e] === kth),
        `token ${t}: ties go to the lower ids`,
      ).toEqual(tied.slice(0, k - strictlyBetter.length));
      // Our weights are the reference's formula at our picks.
      expect(
        mismatches(
          range(k).map((j) => w[t * k + j]),
          ref.weights[t],
          (g, v) => Math.abs(g - v) <= 1e-6 * Math.abs(v) + 1e-12,
        ),
        `token ${t}: weights of a tie row`,
      ).toEqual([]);
    }
    // Our order: the picks by descending key, ties to the lower id, exactly as the reference of this file.
    expectValues(out.indices, 'int32', [T, k], ref.indices.flat(), 'indices in our order');
    const counts = range(E).map((e) => Array.from(idx).filter((v) => v === e).length);
    expectValues(out.tokensPerExpert, 'int32', [E], counts, 'tokensPerExpert');
  });
});

describe.each(backendRows)('golden aux losses on %s', (_name, backend) => {
  it.each(auxCases.map((c) => [c.name, c] as const))('%s', (_case, c) => {
    const probs = toTensor(input(c, 'probs')) as Tensor<'float32'>;
    const logits = toTensor(input(c, 'logits')) as Tensor<'float32'>;
    const [T, E] = probs.shape;
    const topk = c.params.topk as number;
    const coeff = c.params.aux_loss_coeff as number;
    const zCoeff = c.params.z_loss_coeff as number;
    const counts = input(c, 'tokens_per_expert');
    const wantSwitch = output(c, 'switch_load_balancing_loss').data[0];
    const wantZ = output(c, 'z_loss').data[0];
    const close = (got: number, want: number) => Math.abs(got - want) <= 1e-5 * Math.abs(want);

    for (const dtype of ['int64', 'int32'] as const) {
      const tpe = toTensor(counts, dtype) as Tensor<'int32' | 'int64'>;
      const sw = backend.switchLoadBalancingLoss(probs, tpe, { topk, coeff });
      expect(close(sw.loss, wantSwitch), `switch loss ${sw.loss} vs ${wantSwitch} (${dtype} counts)`).toBe(true);
      // d loss / d probs[t, e] = E * coeff / (k * T^2) * tokensPerExpert[e]
      const g = range(T * E).map((i) => (E * coeff * counts.data[i % E]) / (topk * T * T));
      expectF32Close(sw.gradProbs, [T, E], g, 1e-6, 'gradProbs');
      const fromLogits = backend.switchLoadBalancingLossFromLogits(logits, tpe, { topk, coeff });
      expect(close(fromLogits.loss, wantSwitch), `switch loss from logits ${fromLogits.loss} vs ${wantSwitch}`).toBe(true);
    }
    const z = backend.zLoss(logits, { coeff: zCoeff });
    expect(close(z.loss, wantZ), `z-loss ${z.loss} vs ${wantZ}`).toBe(true);
    expect(typeof z.loss).toBe('number');
  });
});

describe.each(backendRows)('route semantics on %s', (_name, backend) => {
  it('orders picks by descending selection score, ties to the lower expert id', () => {
    // Row 0: distinct; row 1: a three-way tie at 0.5 (experts 1, 2, 3) after expert 0.
    const logits = [0.1, 2, -1, 1, 3, 0.5, 0.5, 0.5];
    const out = backend.route(f32([2, 4], logits), { topk: 3 });
    expectValues(out.indices, 'int32', [2, 3], [1, 3, 0, 0, 1, 2], 'indices');
    const sel = backend.route(f32([2, 4], logits), { topk: 3, scoreFunction: 'sigmoid' });
    expectValues(sel.indices, 'int32', [2, 3], [1, 3, 0, 0, 1, 2], 'sigmoid indices');
    const w = Array.from(sel.weights.data);
    expect(w[0]).toBeGreaterThan(w[1]);
    expect(w[4]).toBe(w[5]);
  });

  it('softmax on logits: weights are a softmax over the picked logits; scores the full softmax', () => {
    const logits = [1, 3, 2, -1];
    const out = backend.route(f32([1, 4], logits), { topk: 2 });
    const pick = softmax64([3, 2]);
    expectF32Close(out.weights, [1, 2], pick, 1e-6, 'weights');
    expectF32Close(out.scores, [1, 4], softmax64(logits), 1e-6, 'scores');
    const before = backend.route(f32([1, 4], logits), { topk: 2, softmaxBeforeTopk: true });
    expectF32Close(
      before.weights,
      [1, 2],
      softmax64(logits).filter((_, e) => e === 1 || e === 2),
      1e-6,
      'softmaxBeforeTopk weights',
    );
  });

  it('normTopkProb normalises weights and scores only when topk > 1; routeScale multiplies the weights', () => {
    const logits = [0, 1, -1, 2];
    const sig = logits.map((v) => 1 / (1 + Math.exp(-v)));
    const k1 = backend.route(f32([1, 4], logits), { topk: 1, scoreFunction: 'sigmoid', normTopkProb: true, routeScale: 2.5 });
    expectF32Close(k1.weights, [1, 1], [f(sig[3]) * 2.5], 1e-6, 'k=1 weight');
    expectF32Close(k1.scores, [1, 4], sig, 1e-6, 'k=1 scores');
    const k2 = backend.route(f32([1, 4], logits), { topk: 2, scoreFunction: 'sigmoid', normTopkProb: true, routeScale: 2.5 });
    const wsum = sig[3] + sig[1];
    expectF32Close(k2.weights, [1, 2], [(sig[3] / wsum) * 2.5, (sig[1] / wsum) * 2.5], 1e-6, 'k=2 weights');
    const ssum = sig.reduce((a, b) => a + b);
    expectF32Close(
      k2.scores,
      [1, 4],
      sig.map((v) => v / ssum),
      1e-6,
      'k=2 scores',
    );
  });

  it('expertBias steers selection but not the weights', () => {
    const logits = [2, 1, 0, -1];
    const bias = f32([4], [0, 0, 0, 10]);
    for (const scoreFunction of ['sigmoid', 'sigmoid_with_bias', 'softmax_with_bias', 'sqrtsoftplus'] as const) {
      const out = backend.route(f32([1, 4], logits), { topk: 1, scoreFunction, expertBias: bias });
      expectValues(out.indices, 'int32', [1, 1], [3], `${scoreFunction} indices`);
      expectF32Close(out.weights, [1, 1], [out.scores.data[3]], 0, `${scoreFunction} weight = unbiased score`);
    }
  });

  it('groups: dropped groups score 0 (sigmoid, softmax_with_bias) or -inf (sigmoid_with_bias)', () => {
    // Group 0 wins; the bias makes expert 1's key negative, so a dropped expert (key 0) beats it
    // unless dropped groups are -inf.
    const logits = f32([1, 4], [3, 0, -3, -3]);
    const expertBias = f32([4], [5, -0.9, 0, 0]);
    const base = { topk: 2, numGroups: 2, topkGroups: 1, expertBias };
    expectValues(backend.route(logits, { ...base, scoreFunction: 'sigmoid' }).indices, 'int32', [1, 2], [0, 2], 'sigmoid');
    expectValues(backend.route(logits, { ...base, scoreFunction: 'softmax_with_bias' }).indices, 'int32', [1, 2], [0, 2], 'softmax_with_bias');
    expectValues(backend.route(logits, { ...base, scoreFunction: 'sigmoid_with_bias' }).indices, 'int32', [1, 2], [0, 1], 'sigmoid_with_bias');
    // Without a bias, 'sigmoid' scores groups by their max: group 0 = {0.9, 0.01} beats group 1 =
    // {0.5, 0.5}; a top-2 sum (always, for 'sigmoid_with_bias') keeps group 1 instead.
    const split = f32([1, 4], [2.2, -4.6, 0, 0]);
    const noBias = backend.route(split, { topk: 1, numGroups: 2, topkGroups: 1, scoreFunction: 'sigmoid' });
    expectValues(noBias.indices, 'int32', [1, 1], [0], 'sigmoid max group score');
    const top2 = backend.route(split, { topk: 1, numGroups: 2, topkGroups: 1, scoreFunction: 'sigmoid_with_bias' });
    expectValues(top2.indices, 'int32', [1, 1], [2], 'sigmoid_with_bias top-2 group score');
  });

  it('tokenMask: masked tokens get -1 and weight 0, are not counted, and keep their scores', () => {
    const logits = f32([3, 4], [1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1, 0]);
    const all = backend.route(logits, { topk: 2 });
    const masked = backend.route(logits, { topk: 2, tokenMask: bools([1, 0, 1]) });
    expectValues(masked.indices, 'int32', [3, 2], [3, 2, -1, -1, 2, 0], 'indices');
    const w = Array.from(all.weights.data);
    expectF32Close(masked.weights, [3, 2], [w[0], w[1], 0, 0, w[4], w[5]], 0, 'weights');
    expectSameBits(masked.scores, all.scores, 'scores');
    expectValues(masked.tokensPerExpert, 'int32', [4], [1, 0, 2, 1], 'tokensPerExpert');
  });

  it('handles no tokens and topk = numExperts', () => {
    const empty = backend.route(f32([0, 3], []), { topk: 2 });
    expectMeta(empty.indices, 'int32', [0, 2], 'indices');
    expectValues(empty.tokensPerExpert, 'int32', [3], [0, 0, 0], 'tokensPerExpert');
    const full = backend.route(f32([1, 3], [0, 2, 1]), { topk: 3, scoreFunction: 'sqrtsoftplus' });
    expectValues(full.indices, 'int32', [1, 3], [1, 2, 0], 'indices');
  });

  it('large topk (the partial-selection path) agrees with the reference', () => {
    const r = rng(7);
    const E = 48;
    const logits = range(2 * E).map(() => Math.round(r() * 16) / 4 - 2);
    for (const topk of [17, 30, 36]) {
      const options: RouteOptions = { topk, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 3 };
      expectMatchesReference(backend.route(f32([2, E], logits), options), logits.map(f), 2, E, options);
    }
  });

  it('group-limited routing with every group count that divides E (E = 24), every topkGroups', () => {
    const r = rng(24);
    const E = 24;
    const T = 5;
    // Continuous logits: no ties, so the reference's order is the only valid answer.
    const logits = range(T * E).map(() => f(r() * 6 - 3));
    const bias = f32(
      [E],
      range(E).map(() => f(r() * 0.5 - 0.25)),
    );
    let checked = 0;
    for (const numGroups of range(E + 1).filter((g) => g > 0 && E % g === 0)) {
      const size = E / numGroups;
      for (let topkGroups = 1; topkGroups <= numGroups; topkGroups++) {
        for (const scoreFunction of ['sigmoid', 'sigmoid_with_bias', 'softmax_with_bias'] as const) {
          // The top-2 group score needs groups of two or more experts.
          if (numGroups > 1 && size < 2 && scoreFunction !== 'sigmoid') continue;
          const topk = Math.min(4, topkGroups * size);
          const options: RouteOptions = { topk, scoreFunction, numGroups, topkGroups, ...(scoreFunction === 'sigmoid' ? {} : { expertBias: bias }) };
          expectMatchesReference(backend.route(f32([T, E], logits), options), logits, T, E, options);
          checked++;
        }
      }
    }
    expect(checked).toBeGreaterThan(100);
  });

  it('random problems match the float64 reference (fast-check)', () => {
    fc.assert(
      fc.property(routeProblem(), (p) => {
        const out = backend.route(f32([p.T, p.E], p.logits), p.options);
        expectMatchesReference(out, p.logits, p.T, p.E, p.options);
      }),
      FC,
    );
  });
});

// ---------------------------------------------------------------------------------------
// Random routing problems: logits on a coarse grid (so exact ties are common and other keys
// are far apart), every score function with the options it accepts.

interface RouteProblem {
  T: number;
  E: number;
  logits: number[];
  options: RouteOptions;
}

function routeProblem(): fc.Arbitrary<RouteProblem> {
  const grid = fc.integer({ min: -16, max: 16 }).map((v) => v / 4);
  return fc
    .record({
      T: fc.integer({ min: 0, max: 6 }),
      groupSize: fc.integer({ min: 1, max: 5 }),
      numGroups: fc.integer({ min: 1, max: 4 }),
      scoreFunction: fc.constantFrom<ScoreFunction>('softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'),
      flags: fc.record({ before: fc.boolean(), bias: fc.boolean(), norm: fc.boolean(), mask: fc.boolean(), groups: fc.boolean() }),
      seed: fc.integer(),
      scale: fc.constantFrom(1, 2.5, -0.5),
    })
    .chain((r) => {
      const sf = r.scoreFunction;
      const groupsAllowed = sf !== 'softmax' && sf !== 'sqrtsoftplus';
      const hasBias = sf !== 'softmax' && r.flags.bias;
      const top2 = !(sf === 'sigmoid' && !hasBias);
      const numGroups = groupsAllowed && r.flags.groups && !(top2 && r.groupSize < 2) ? r.numGroups : 1;
      const E = numGroups * (numGroups > 1 ? r.groupSize : r.groupSize + r.numGroups);
      return fc
        .record({
          topkGroups: fc.integer({ min: 1, max: numGroups }),
          logits: fc.array(grid, { minLength: r.T * E, maxLength: r.T * E }),
          bias: fc.array(
            fc.integer({ min: -4, max: 4 }).map((v) => v / 8),
            { minLength: E, maxLength: E },
          ),
          mask: fc.array(fc.boolean(), { minLength: r.T, maxLength: r.T }),
          kFrac: fc.double({ min: 0, max: 1, noNaN: true }),
        })
        .map((s) => {
          const size = E / numGroups;
          const maxK = numGroups > 1 ? s.topkGroups * size : E;
          const options: RouteOptions = { topk: 1 + Math.min(maxK - 1, Math.floor(s.kFrac * maxK)), scoreFunction: sf };
          if (sf === 'softmax') options.softmaxBeforeTopk = r.flags.before;
          if (hasBias) options.expertBias = f32([E], s.bias);
          if (numGroups > 1) Object.assign(options, { numGroups, topkGroups: s.topkGroups });
          if (r.flags.norm) options.normTopkProb = true;
          if (r.scale !== 1) options.routeScale = r.scale;
          if (r.flags.mask) options.tokenMask = bools(s.mask);
          return { T: r.T, E, logits: s.logits, options };
        });
    });
}

// ---------------------------------------------------------------------------------------

describe.each(backendRows)('aux-loss gradients on %s (finite differences in float64)', (_name, backend) => {
  const cases = [
    { T: 3, E: 4, k: 2, coeff: 0.5, mask: null, numTokens: undefined },
    { T: 5, E: 6, k: 3, coeff: 0.01, mask: [true, false, true, true, false], numTokens: undefined },
    { T: 4, E: 3, k: 1, coeff: 2, mask: null, numTokens: 10 },
  ];
  it.each(cases.map((c, i) => [i, c] as const))('case %i', (_i, c) => {
    const r = rng(101 + c.T * 7 + c.E);
    const logits = range(c.T * c.E).map(() => f(r() * 6 - 3));
    const counts = range(c.E).map(() => Math.floor(r() * 2 * c.T));
    const tpe = tensor('int32', [c.E], Int32Array.from(counts));
    const shape = [c.T, c.E];
    const mask = c.mask;
    const options = { topk: c.k, coeff: c.coeff, ...(mask ? { tokenMask: bools(mask) } : {}), ...(c.numTokens ? { numTokens: c.numTokens } : {}) };

    // Switch loss on probs.
    const probs = range(c.T)
      .flatMap((t) => softmax64(logits.slice(t * c.E, (t + 1) * c.E)))
      .map(f);
    const sw = backend.switchLoadBalancingLoss(f32(shape, probs), tpe, options);
    const swFn = (p: number[]) => switchLoss64(p, c.T, c.E, counts, c.k, c.coeff, mask, c.numTokens);
    expect(Math.abs(sw.loss - swFn(probs)), 'switch loss').toBeLessThanOrEqual(1e-9 * Math.abs(swFn(probs)));
    expectGradClose(sw.gradProbs, shape, finiteDifferences(swFn, probs), 'gradProbs');

    // Switch loss through the softmax.
    const sl = backend.switchLoadBalancingLossFromLogits(f32(shape, logits), tpe, options);
    const slFn = (x: number[]) => switchFromLogits64(x, c.T, c.E, counts, c.k, c.coeff, mask, c.numTokens);
    expect(Math.abs(sl.loss - slFn(logits)), 'switch loss from logits').toBeLessThanOrEqual(1e-9 * Math.abs(slFn(logits)));
    expectGradClose(sl.gradLogits, shape, finiteDifferences(slFn, logits), 'gradLogits (switch)');

    // z-loss.
    const z = backend.zLoss(f32(shape, logits), { coeff: c.coeff, ...(mask ? { tokenMask: bools(mask) } : {}) });
    const zFn = (x: number[]) => zLoss64(x, c.T, c.E, c.coeff, mask);
    expect(Math.abs(z.loss - zFn(logits)), 'z-loss').toBeLessThanOrEqual(1e-9 * zFn(logits));
    expectGradClose(z.gradLogits, shape, finiteDifferences(zFn, logits), 'gradLogits (z)');
    // Masked rows: exactly zero gradients.
    if (mask) {
      for (const t of range(c.T).filter((t) => !mask[t])) {
        expect(
          Array.from(z.gradLogits.data.slice(t * c.E, (t + 1) * c.E)).every((v) => v === 0),
          `z grad row ${t}`,
        ).toBe(true);
        expect(
          Array.from(sl.gradLogits.data.slice(t * c.E, (t + 1) * c.E)).every((v) => v === 0),
          `switch grad row ${t}`,
        ).toBe(true);
      }
    }
  });

  it('coeff defaults to 1 and scales loss and gradient linearly', () => {
    const logits = f32([2, 3], [0.5, -1, 2, 0, 1, -0.5]);
    const one = backend.zLoss(logits);
    const tenth = backend.zLoss(logits, { coeff: 0.1 });
    expect(Math.abs(tenth.loss - one.loss * 0.1)).toBeLessThanOrEqual(1e-15 * one.loss);
    expectF32Close(
      tenth.gradLogits,
      [2, 3],
      Array.from(one.gradLogits.data, (v) => v * 0.1),
      1e-6,
      'gradLogits',
    );
    expect(one.loss).toBeCloseTo(zLoss64(Array.from(logits.data), 2, 3, 1), 12);
  });
});

// ---------------------------------------------------------------------------------------

const cpu = backendNamed('cpu');
const wasm = backendNamed('wasm');

describe('native and wasm agree bit for bit', () => {
  it.skipIf(!cpu || !wasm)('route on random problems', () => {
    fc.assert(
      fc.property(routeProblem(), fc.array(fc.float({ noNaN: true, noDefaultInfinity: true, min: -30, max: 30 }), { minLength: 64, maxLength: 64 }), (p, noise) => {
        // Fine-grained logits too, not only the grid.
        const logits = p.logits.map((v, i) => f(v + noise[i % 64] / 64));
        const a = cpu!.route(f32([p.T, p.E], logits), p.options);
        const b = wasm!.route(f32([p.T, p.E], logits), p.options);
        for (const key of ['weights', 'indices', 'scores', 'tokensPerExpert'] as const) expect(bitsOf(a[key]), key).toEqual(bitsOf(b[key]));
      }),
      FC,
    );
  });

  it.skipIf(!cpu || !wasm)('losses and gradients on random problems', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 5 }),
        fc.integer({ min: 1, max: 7 }),
        fc.integer({ min: 1, max: 4 }),
        fc.array(fc.float({ noNaN: true, noDefaultInfinity: true, min: -60, max: 60 }), { minLength: 35, maxLength: 35 }),
        fc.array(fc.boolean(), { minLength: 5, maxLength: 5 }),
        fc.double({ min: 0, max: 3, noNaN: true }),
        (T, E, k, values, maskBits, coeff) => {
          const logits = f32([T, E], values.slice(0, T * E));
          const probs = f32(
            [T, E],
            values.slice(0, T * E).map((v) => Math.abs(v) / 60),
          );
          const tpe = tensor(
            'int64',
            [E],
            BigInt64Array.from(range(E), (e) => BigInt(Math.floor(Math.abs(values[e]) * T))),
          );
          const options = { topk: k, coeff, tokenMask: bools(maskBits.slice(0, T)) };
          const pairs = [
            [cpu!.switchLoadBalancingLoss(probs, tpe, options), wasm!.switchLoadBalancingLoss(probs, tpe, options)],
            [cpu!.switchLoadBalancingLossFromLogits(logits, tpe, options), wasm!.switchLoadBalancingLossFromLogits(logits, tpe, options)],
            [cpu!.zLoss(logits, { coeff }), wasm!.zLoss(logits, { coeff })],
          ] as const;
          for (const [a, b] of pairs) {
            expect(Object.is(a.loss, b.loss), `loss ${a.loss} vs ${b.loss}`).toBe(true);
            const ga = 'gradProbs' in a ? a.gradProbs : a.gradLogits;
            const gb = 'gradProbs' in b ? b.gradProbs : b.gradLogits;
            expect(bitsOf(ga)).toEqual(bitsOf(gb));
          }
        },
      ),
      FC,
    );
  });

  it.skipIf(!cpu || !wasm)('route on a problem large enough for the native backend to use threads', () => {
    const r = rng(3);
    const T = 4096;
    const E = 64;
    const logits = f32(
      [T, E],
      range(T * E).map(() => r() * 8 - 4),
    );
    const options: RouteOptions = {
      topk: 6,
      scoreFunction: 'sigmoid',
      expertBias: f32(
        [E],
        range(E).map(() => r() - 0.5),
      ),
      numGroups: 8,
      topkGroups: 3,
      normTopkProb: true,
    };
    const a = cpu!.route(logits, options);
    const b = wasm!.route(logits, options);
    for (const key of ['weights', 'indices', 'scores', 'tokensPerExpert'] as const) expect(bitsOf(a[key]), key).toEqual(bitsOf(b[key]));
    const z = [cpu!.zLoss(logits, { coeff: 0.001 }), wasm!.zLoss(logits, { coeff: 0.001 })];
    expect(z[0].loss).toBe(z[1].loss);
    expect(bitsOf(z[0].gradLogits)).toEqual(bitsOf(z[1].gradLogits));
  });
});

// ---------------------------------------------------------------------------------------

type ErrorCase = OpErrorCase<'route' | 'switchLoadBalancingLoss' | 'switchLoadBalancingLossFromLogits' | 'zLoss'> & { arg: string };

const L = f32([2, 4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]);
const TPE = tensor('int32', [4], Int32Array.from([1, 1, 2, 0]));

const ERRORS: ErrorCase[] = [
  { title: 'topk missing', op: 'route', arg: 'options.topk', cls: TypeError, detail: /required/, call: (b) => b.route(L, {} as never) },
  { title: 'options missing', op: 'route', arg: 'options.topk', cls: TypeError, call: (b) => b.route(L, undefined as never) },
  { title: 'topk > numExperts', op: 'route', arg: 'topk', cls: RangeError, detail: /1 to numExperts = 4, got 5/, call: (b) => b.route(L, { topk: 5 }) },
  { title: 'topk 0', op: 'route', arg: 'topk', cls: RangeError, call: (b) => b.route(L, { topk: 0 }) },
  { title: 'topk 1.5', op: 'route', arg: 'topk', cls: RangeError, detail: /1\.5/, call: (b) => b.route(L, { topk: 1.5 }) },
  { title: 'topk a string', op: 'route', arg: 'options.topk', cls: TypeError, call: (b) => b.route(L, { topk: '2' as never }) },
  {
    title: 'unknown scoreFunction',
    op: 'route',
    arg: 'scoreFunction',
    cls: TypeError,
    detail: /'softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias' or 'sqrtsoftplus', got 'relu'/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'relu' as never }),
  },
  { title: 'scoreFunction not a string', op: 'route', arg: 'options.scoreFunction', cls: TypeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 3 as never }) },
  {
    title: 'numGroups not dividing numExperts',
    op: 'route',
    arg: 'numGroups',
    cls: RangeError,
    detail: /numExperts = 4 is not a multiple of numGroups = 3/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', numGroups: 3 }),
  },
  { title: 'numGroups 0', op: 'route', arg: 'numGroups', cls: RangeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', numGroups: 0 }) },
  {
    title: 'groups of one expert with a top-2 group score',
    op: 'route',
    arg: 'numGroups',
    cls: RangeError,
    detail: /two best/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid_with_bias', numGroups: 4 }),
  },
  { title: 'numGroups with softmax', op: 'route', arg: 'numGroups', cls: TypeError, detail: /'softmax'/, call: (b) => b.route(L, { topk: 1, numGroups: 2 }) },
  { title: 'numGroups with sqrtsoftplus', op: 'route', arg: 'numGroups', cls: TypeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 'sqrtsoftplus', numGroups: 2 }) },
  {
    title: 'topkGroups > numGroups',
    op: 'route',
    arg: 'topkGroups',
    cls: RangeError,
    detail: /1 to numGroups = 2, got 3/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', numGroups: 2, topkGroups: 3 }),
  },
  { title: 'topkGroups 0', op: 'route', arg: 'topkGroups', cls: RangeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', numGroups: 2, topkGroups: 0 }) },
  {
    title: 'topk beyond the kept groups',
    op: 'route',
    arg: 'topk',
    cls: RangeError,
    detail: /3 exceeds the 2 experts/,
    call: (b) => b.route(L, { topk: 3, scoreFunction: 'sigmoid', numGroups: 2, topkGroups: 1 }),
  },
  {
    title: 'expertBias of the wrong length',
    op: 'route',
    arg: 'expertBias.shape',
    cls: RangeError,
    detail: /\[4\]/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', expertBias: f32([3], [0, 0, 0]) }),
  },
  { title: 'expertBias as int32', op: 'route', arg: 'expertBias.dtype', cls: TypeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', expertBias: tensor('int32', [4]) as never }) },
  {
    title: 'expertBias with NaN',
    op: 'route',
    arg: 'expertBias',
    cls: RangeError,
    detail: /expertBias\[2\] = NaN/,
    call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', expertBias: f32([4], [0, 0, NaN, 0]) }),
  },
  { title: 'expertBias with softmax', op: 'route', arg: 'expertBias', cls: TypeError, detail: /softmax_with_bias/, call: (b) => b.route(L, { topk: 1, expertBias: f32([4], [0, 0, 0, 0]) }) },
  { title: 'softmaxBeforeTopk with sigmoid', op: 'route', arg: 'softmaxBeforeTopk', cls: TypeError, call: (b) => b.route(L, { topk: 1, scoreFunction: 'sigmoid', softmaxBeforeTopk: true }) },
  { title: 'softmaxBeforeTopk not a boolean', op: 'route', arg: 'options.softmaxBeforeTopk', cls: TypeError, call: (b) => b.route(L, { topk: 1, softmaxBeforeTopk: 1 as never }) },
  { title: 'routeScale NaN', op: 'route', arg: 'routeScale', cls: RangeError, detail: /finite/, call: (b) => b.route(L, { topk: 1, routeScale: NaN }) },
  { title: 'routeScale Infinity', op: 'route', arg: 'routeScale', cls: RangeError, call: (b) => b.route(L, { topk: 1, routeScale: Infinity }) },
  { title: 'routeScale a string', op: 'route', arg: 'options.routeScale', cls: TypeError, call: (b) => b.route(L, { topk: 1, routeScale: '2' as never }) },
  { title: 'normTopkProb not a boolean', op: 'route', arg: 'options.normTopkProb', cls: TypeError, call: (b) => b.route(L, { topk: 1, normTopkProb: 'yes' as never }) },
  { title: 'tokenMask of the wrong length', op: 'route', arg: 'tokenMask.shape', cls: RangeError, call: (b) => b.route(L, { topk: 1, tokenMask: bools([1, 1, 1]) }) },
  { title: 'tokenMask as float32', op: 'route', arg: 'tokenMask.dtype', cls: TypeError, call: (b) => b.route(L, { topk: 1, tokenMask: f32([2], [1, 1]) as never }) },
  { title: 'logits with Infinity', op: 'route', arg: 'logits', cls: RangeError, detail: /logits\[1\]\[2\] = inf/, call: (b) => b.route(f32([2, 4], [0, 0, 0, 0, 0, 0, Infinity, 0]), { topk: 1 }) },
  { title: 'logits of rank 1', op: 'route', arg: 'logits.shape', cls: TypeError, call: (b) => b.route(f32([4], [0, 0, 0, 0]), { topk: 1 }) },
  { title: 'logits as int32', op: 'route', arg: 'logits.dtype', cls: TypeError, call: (b) => b.route(tensor('int32', [2, 4]) as never, { topk: 1 }) },
  {
    title: 'an unknown route option',
    op: 'route',
    arg: 'options.numExpertGroups',
    cls: TypeError,
    detail: /not an option of route/,
    call: (b) => b.route(L, { topk: 1, numExpertGroups: 2 } as never),
  },

  { title: 'topk missing', op: 'switchLoadBalancingLoss', arg: 'options.topk', cls: TypeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, {} as never) },
  { title: 'topk 0', op: 'switchLoadBalancingLoss', arg: 'topk', cls: RangeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 0 }) },
  { title: 'coeff negative', op: 'switchLoadBalancingLoss', arg: 'coeff', cls: RangeError, detail: />= 0, got -1/, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, coeff: -1 }) },
  { title: 'coeff NaN', op: 'switchLoadBalancingLoss', arg: 'coeff', cls: RangeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, coeff: NaN }) },
  { title: 'coeff a string', op: 'switchLoadBalancingLoss', arg: 'options.coeff', cls: TypeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, coeff: '1' as never }) },
  { title: 'numTokens 0', op: 'switchLoadBalancingLoss', arg: 'numTokens', cls: RangeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, numTokens: 0 }) },
  { title: 'numTokens 2.5', op: 'switchLoadBalancingLoss', arg: 'numTokens', cls: RangeError, detail: /2\.5/, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, numTokens: 2.5 }) },
  {
    title: 'tokensPerExpert of the wrong length',
    op: 'switchLoadBalancingLoss',
    arg: 'tokensPerExpert.shape',
    cls: RangeError,
    call: (b) => b.switchLoadBalancingLoss(L, tensor('int32', [3]), { topk: 1 }),
  },
  {
    title: 'tokensPerExpert as float32',
    op: 'switchLoadBalancingLoss',
    arg: 'tokensPerExpert.dtype',
    cls: TypeError,
    call: (b) => b.switchLoadBalancingLoss(L, f32([4], [1, 1, 1, 1]) as never, { topk: 1 }),
  },
  {
    title: 'a negative token count',
    op: 'switchLoadBalancingLoss',
    arg: 'tokensPerExpert',
    cls: RangeError,
    detail: /tokensPerExpert\[1\] = -3/,
    call: (b) => b.switchLoadBalancingLoss(L, tensor('int64', [4], BigInt64Array.from([1n, -3n, 0n, 0n])), { topk: 1 }),
  },
  { title: 'probs with NaN', op: 'switchLoadBalancingLoss', arg: 'probs', cls: RangeError, call: (b) => b.switchLoadBalancingLoss(f32([1, 4], [0, NaN, 0, 0]), TPE, { topk: 1 }) },
  {
    title: 'tokenMask of the wrong length',
    op: 'switchLoadBalancingLoss',
    arg: 'tokenMask.shape',
    cls: RangeError,
    call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, tokenMask: bools([1]) }),
  },
  { title: 'an unknown option', op: 'switchLoadBalancingLoss', arg: 'options.auxLossCoeff', cls: TypeError, call: (b) => b.switchLoadBalancingLoss(L, TPE, { topk: 1, auxLossCoeff: 1 } as never) },
  { title: 'topk 1.5', op: 'switchLoadBalancingLossFromLogits', arg: 'topk', cls: RangeError, call: (b) => b.switchLoadBalancingLossFromLogits(L, TPE, { topk: 1.5 }) },
  { title: 'coeff Infinity', op: 'switchLoadBalancingLossFromLogits', arg: 'coeff', cls: RangeError, call: (b) => b.switchLoadBalancingLossFromLogits(L, TPE, { topk: 1, coeff: Infinity }) },
  {
    title: 'logits with -Infinity',
    op: 'switchLoadBalancingLossFromLogits',
    arg: 'logits',
    cls: RangeError,
    call: (b) => b.switchLoadBalancingLossFromLogits(f32([1, 4], [0, -Infinity, 0, 0]), TPE, { topk: 1 }),
  },
  {
    title: 'zero experts',
    op: 'switchLoadBalancingLossFromLogits',
    arg: 'logits.shape[1]',
    cls: RangeError,
    call: (b) => b.switchLoadBalancingLossFromLogits(f32([2, 0], []), tensor('int32', [0]), { topk: 1 }),
  },
  { title: 'coeff negative', op: 'zLoss', arg: 'coeff', cls: RangeError, call: (b) => b.zLoss(L, { coeff: -0.001 }) },
  { title: 'logits with NaN', op: 'zLoss', arg: 'logits', cls: RangeError, detail: /logits\[0\]\[3\] = NaN/, call: (b) => b.zLoss(f32([1, 4], [0, 0, 0, NaN])) },
  { title: 'tokenMask as int32', op: 'zLoss', arg: 'tokenMask.dtype', cls: TypeError, call: (b) => b.zLoss(L, { tokenMask: tensor('int32', [2]) as never }) },
  { title: 'topk is not an option of zLoss', op: 'zLoss', arg: 'options.topk', cls: TypeError, call: (b) => b.zLoss(L, { topk: 2 } as never) },
];

describe.each(backendRows)('errors on %s', (_name, backend) => {
  itThrowsEach(ERRORS, backend);

  it('the backend still routes correctly after every error', () => {
    for (const c of ERRORS) expect(() => c.call(backend)).toThrow();
    const out = backend.route(L, { topk: 2 });
    expectValues(out.indices, 'int32', [2, 2], [3, 2, 3, 2], 'indices');
  });
});
