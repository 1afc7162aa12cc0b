/**
 * routeBackward on every available backend:
 *
 * - the gradient against central finite differences of a float64 reimplementation of route's
 *   weights and scores written here (independent of the library), with the picks held fixed
 *   (taken from the backend's own route), for every score function (softmax with and without
 *   softmaxBeforeTopk, sigmoid, softmax_with_bias, sigmoid_with_bias, sqrtsoftplus) x
 *   normTopkProb x routeScale x with/without gradScores x topk, masks; and with groups + bias;
 * - masked tokens (tokenMask, or indices rows of -1) get zero rows;
 * - the available backends agree bit for bit;
 * - bfloat16 / float16 logits: route and routeBackward give exactly the results of the logits'
 *   float32 conversion (converted here, independently of the library);
 * - errors: TypeError / RangeError named `routeBackward: <argument>`; route's option checks with
 *   route's own messages.
 */
import { describe, expect, it } from 'vitest';

import { tensor, type Backend, type RouteOptions, type ScoreFunction, type Tensor } from '../ts/index.js';
import { backendRows, backends, registerBackendReport } from './backends.js';
import { bf16Bits, bf16Value, bitsOf, expectMeta, expectSameBits, expectThrows, f16Bits, f16Value, mismatches, rng, expectOpError, type OpErrorCase } from './util.js';

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const f32 = (shape: number[], values: ArrayLike<number>) => tensor('float32', shape, Float32Array.from(values));
const bools = (values: number[]) => tensor('bool', [values.length], Uint8Array.from(values));
const uniform = (random: () => number, n: number, lo: number, hi: number) => range(n).map(() => Math.fround(lo + (hi - lo) * random()));

type BackwardOptions = RouteOptions & { gradScores?: Tensor<'float32'> };

registerBackendReport();

// ---------------------------------------------------------------------------------------
// The float64 reference: route's weights at fixed picks, and its scores (docs/semantics.md).

const sigmoid64 = (v: number) => 1 / (1 + Math.exp(-v));

function softmax64(row: readonly number[]): number[] {
  const m = Math.max(...row);
  const e = row.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** One token's `sum_j gw_j * weights_j + sum_e gs_e * scores_e` as a function of its logits `x`. */
function loss64(x: readonly number[], picks: readonly number[], gw: readonly number[], gs: readonly number[] | null, o: RouteOptions): number {
  const sf = o.scoreFunction ?? 'softmax';
  let s: number[];
  switch (sf) {
    case 'softmax':
    case 'softmax_with_bias':
      s = softmax64(x);
      break;
    case 'sigmoid':
    case 'sigmoid_with_bias':
      s = x.map(sigmoid64);
      break;
    case 'sqrtsoftplus':
      s = x.map((v) => Math.sqrt(v > 20 ? v : Math.log1p(Math.exp(v))));
      break;
  }
  let w = sf === 'softmax' && !o.softmaxBeforeTopk ? softmax64(picks.map((e) => x[e])) : picks.map((e) => s[e]);
  let sc = s;
  if (o.normTopkProb && picks.length > 1) {
    const dw = w.reduce((a, b) => a + b, 0) + 1e-20;
    w = w.map((v) => v / dw);
    const ds = s.reduce((a, b) => a + b, 0) + 1e-20;
    sc = s.map((v) => v / ds);
  }
  const scale = o.routeScale ?? 1;
  let loss = w.reduce((acc, v, j) => acc + v * scale * gw[j], 0);
  if (gs) loss += sc.reduce((acc, v, e) => acc + v * gs[e], 0);
  return loss;
}

/**
 * Routes `logits [T, E]` on `backend`, draws random gradients, runs routeBackward, and checks
 * every unmasked row against central differences of loss64 and every masked row for zeros.
 */
function checkAgainstFiniteDifferences(backend: Backend, T: number, E: number, logits: number[], options: RouteOptions, withScores: boolean, seed: number, what: string): void {
  const random = rng(seed);
  const k = options.topk;
  const lt = f32([T, E], logits);
  const routed = backend.route(lt, options);
  const idx = Array.from(routed.indices.data);
  const gw = uniform(random, T * k, -1, 1);
  const gs = withScores ? uniform(random, T * E, -1, 1) : null;
  const bwd: BackwardOptions = { ...options, ...(gs ? { gradScores: f32([T, E], gs) } : {}) };
  const { gradLogits } = backend.routeBackward(f32([T, k], gw), lt, routed.indices, bwd);
  expectMeta(gradLogits, 'float32', [T, E], `${what}: gradLogits`);
  const got = gradLogits.data as Float32Array;
  const want: number[] = [];
  for (let t = 0; t < T; t++) {
    const picks = idx.slice(t * k, (t + 1) * k);
    if (picks[0] < 0) {
      want.push(...Array(E).fill(0));
      continue;
    }
    const x = logits.slice(t * E, (t + 1) * E);
    const g = gw.slice(t * k, (t + 1) * k);
    const s = gs ? gs.slice(t * E, (t + 1) * E) : null;
    for (let e = 0; e < E; e++) {
      const h = 1e-5 * Math.max(1, Math.abs(x[e]));
      const up = [...x];
      const down = [...x];
      up[e] += h;
      down[e] -= h;
      want.push((loss64(up, picks, g, s, options) - loss64(down, picks, g, s, options)) / (2 * h));
    }
  }
  for (let t = 0; t < T; t++) {
    const row = want.slice(t * E, (t + 1) * E);
    const scale = Math.max(...row.map(Math.abs));
    const ok = (a: number, b: number) => Math.abs(a - b) <= 2e-6 * Math.abs(b) + 1e-6 * scale + 1e-12;
    const masked = idx[t * k] < 0;
    expect(mismatches(got.subarray(t * E, (t + 1) * E), row, masked ? (a, b) => Object.is(a, b) : ok), `${what}: token ${t}${masked ? ' (masked: zeros)' : ''} vs finite differences`).toEqual([]);
  }
}

interface FunctionCase {
  name: string;
  scoreFunction: ScoreFunction;
  softmaxBeforeTopk?: boolean;
}

const FUNCTIONS: FunctionCase[] = [
  { name: 'softmax (top-k on logits)', scoreFunction: 'softmax' },
  { name: 'softmax with softmaxBeforeTopk', scoreFunction: 'softmax', softmaxBeforeTopk: true },
  { name: 'sigmoid', scoreFunction: 'sigmoid' },
  { name: 'softmax_with_bias', scoreFunction: 'softmax_with_bias' },
  { name: 'sigmoid_with_bias', scoreFunction: 'sigmoid_with_bias' },
  { name: 'sqrtsoftplus', scoreFunction: 'sqrtsoftplus' },
];

describe.each(backendRows)('routeBackward against finite differences on %s', (_name, backend) => {
  it.each(FUNCTIONS.map((f) => [f.name, f] as const))('%s: every normTopkProb x routeScale x gradScores x topk', (_n, f) => {
    const T = 6;
    const E = 8;
    let seed = 1;
    let checked = 0;
    for (const normTopkProb of [false, true]) {
      for (const routeScale of [1, 2.5, -0.75]) {
        for (const withScores of [false, true]) {
          for (const topk of [1, 3, 8]) {
            const random = rng(1000 * seed + 7);
            const logits = uniform(random, T * E, -4, 4);
            const options: RouteOptions = { topk, scoreFunction: f.scoreFunction, normTopkProb, routeScale };
            if (f.softmaxBeforeTopk) options.softmaxBeforeTopk = true;
            if (topk === 3) options.tokenMask = bools([1, 0, 1, 1, 0, 1]);
            checkAgainstFiniteDifferences(backend, T, E, logits, options, withScores, seed++, `${f.name} norm=${normTopkProb} scale=${routeScale} gradScores=${withScores} k=${topk}`);
            checked++;
          }
        }
      }
    }
    expect(checked).toBe(36);
  });

  const grouped: ScoreFunction[] = ['sigmoid', 'softmax_with_bias', 'sigmoid_with_bias'];
  it.each(grouped)('%s with groups (4, keep 2), expertBias and a mask: picks from route', (sf) => {
    const T = 8;
    const E = 16;
    let seed = 50;
    for (const normTopkProb of [false, true]) {
      for (const withScores of [false, true]) {
        const random = rng(seed * 31);
        const logits = uniform(random, T * E, -3, 3);
        const expertBias = f32([E], uniform(random, E, -0.5, 0.5));
        const options: RouteOptions = { topk: 4, scoreFunction: sf, numGroups: 4, topkGroups: 2, expertBias, normTopkProb, routeScale: 2.5, tokenMask: bools([1, 1, 0, 1, 1, 1, 0, 1]) };
        checkAgainstFiniteDifferences(backend, T, E, logits, options, withScores, seed++, `${sf} groups bias norm=${normTopkProb} gradScores=${withScores}`);
      }
    }
  });

  it('sqrtsoftplus with expertBias; sigmoid grouped by max (no bias)', () => {
    const random = rng(4242);
    const logits = uniform(random, 5 * 12, -5, 5);
    const expertBias = f32([12], uniform(random, 12, -1, 1));
    checkAgainstFiniteDifferences(backend, 5, 12, logits, { topk: 3, scoreFunction: 'sqrtsoftplus', expertBias, normTopkProb: true }, true, 3, 'sqrtsoftplus bias');
    checkAgainstFiniteDifferences(backend, 5, 12, logits, { topk: 2, scoreFunction: 'sigmoid', numGroups: 3, topkGroups: 1, routeScale: 1.5 }, true, 4, 'sigmoid groups by max');
  });

  it('masked tokens get zero rows: with tokenMask, and from indices rows of -1 alone', () => {
    const logits = f32([3, 4], [1, 2, 3, 4, 0.5, -0.5, 1.5, 2, 0, 0.1, 0.2, 0.3]);
    const options: RouteOptions = { topk: 2, scoreFunction: 'sigmoid', tokenMask: bools([1, 0, 1]) };
    const routed = backend.route(logits, options);
    expect(Array.from(routed.indices.data.subarray(2, 4))).toEqual([-1, -1]);
    const gw = f32([3, 2], [1, -1, 2, 3, 0.5, 0.25]);
    const gradScores = f32(
      [3, 4],
      range(12).map((i) => (i + 1) / 10),
    );
    const withMask = backend.routeBackward(gw, logits, routed.indices, { ...options, gradScores }).gradLogits;
    const { tokenMask: _unused, ...noMask } = options;
    const fromIndices = backend.routeBackward(gw, logits, routed.indices, { ...noMask, gradScores }).gradLogits;
    expectSameBits(fromIndices, withMask, 'gradLogits without the mask');
    expect(bitsOf(withMask).slice(4, 8)).toEqual([0, 0, 0, 0]);
    expect(Array.from(withMask.data.subarray(0, 4)).every((v) => v !== 0)).toBe(true);
  });

  it('no tokens; topk = numExperts; gradWeights of zeros give zeros', () => {
    const empty = backend.routeBackward(f32([0, 2], []), f32([0, 4], []), tensor('int32', [0, 2]), { topk: 2 });
    expectMeta(empty.gradLogits, 'float32', [0, 4], 'gradLogits');
    const logits = f32([2, 3], [0.5, -1, 2, 0, 1, -0.5]);
    const routed = backend.route(logits, { topk: 3, normTopkProb: true });
    const zeros = backend.routeBackward(f32([2, 3], [0, 0, 0, 0, 0, 0]), logits, routed.indices, { topk: 3, normTopkProb: true });
    expect(Array.from(zeros.gradLogits.data).every((v) => v === 0)).toBe(true);
    // softmax over all k picks, normalised: the weights sum to 1 whatever the logits, so a
    // uniform upstream gradient has a zero gradient
    const uniformGrad = backend.routeBackward(f32([2, 3], [1, 1, 1, 1, 1, 1]), logits, routed.indices, { topk: 3, normTopkProb: true });
    expect(Array.from(uniformGrad.gradLogits.data).every((v) => Math.abs(v) < 1e-7)).toBe(true);
  });

  it('int64 indices give the same bits as int32 ones', () => {
    const logits = f32([3, 5], uniform(rng(9), 15, -2, 2));
    const options: RouteOptions = { topk: 2, scoreFunction: 'softmax_with_bias', normTopkProb: true };
    const routed = backend.route(logits, options);
    const gw = f32([3, 2], uniform(rng(10), 6, -1, 1));
    const a = backend.routeBackward(gw, logits, routed.indices, options);
    const b = backend.routeBackward(
      gw,
      logits,
      tensor(
        'int64',
        [3, 2],
        BigInt64Array.from(routed.indices.data, (v) => BigInt(v)),
      ),
      options,
    );
    expectSameBits(b.gradLogits, a.gradLogits, 'gradLogits');
  });
});

// ---------------------------------------------------------------------------------------
// Random problems: bit-identical across backends; 16-bit logits.

interface Problem {
  label: string;
  T: number;
  E: number;
  logits: number[];
  options: RouteOptions;
  gw: number[];
  gs: number[] | null;
}

function problems(count: number, seed: number): Problem[] {
  const random = rng(seed);
  const pick = <X>(xs: readonly X[]): X => xs[Math.floor(random() * xs.length)];
  const fns: ScoreFunction[] = ['softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'];
  const out: Problem[] = [];
  for (let i = 0; i < count; i++) {
    const scoreFunction = fns[i % fns.length];
    const E = pick([2, 4, 8, 16, 32, 64]);
    const T = pick([1, 3, 17, 64]);
    const groupable = scoreFunction !== 'softmax' && scoreFunction !== 'sqrtsoftplus';
    const divisors = [2, 4, 8].filter((g) => E % g === 0 && E / g >= 2);
    const G = groupable && divisors.length && random() < 0.5 ? pick(divisors) : 1;
    const kg = G > 1 ? 1 + Math.floor(random() * G) : 1;
    const maxK = G > 1 ? kg * (E / G) : E;
    const k = 1 + Math.floor(random() * Math.min(maxK, 9));
    const options: RouteOptions = { topk: k, scoreFunction, normTopkProb: random() < 0.5, routeScale: pick([1, 2.5, -0.5]) };
    if (scoreFunction === 'softmax' && random() < 0.5) options.softmaxBeforeTopk = true;
    if (G > 1) Object.assign(options, { numGroups: G, topkGroups: kg });
    if (scoreFunction !== 'softmax' && random() < 0.5) options.expertBias = f32([E], uniform(random, E, -0.2, 0.2));
    if (random() < 0.3) options.tokenMask = bools(range(T).map(() => (random() < 0.7 ? 1 : 0)));
    const spread = pick([1, 6, 30]);
    const logits = uniform(random, T * E, -spread, spread);
    const gw = uniform(random, T * k, -1, 1);
    const gs = random() < 0.5 ? uniform(random, T * E, -1, 1) : null;
    const label = `T=${T} E=${E} k=${k} ${scoreFunction}${G > 1 ? ` groups ${kg}/${G}` : ''}${options.expertBias ? ' bias' : ''}${options.tokenMask ? ' mask' : ''}${options.normTopkProb ? ' norm' : ''} scale=${options.routeScale}${options.softmaxBeforeTopk ? ' softmaxBeforeTopk' : ''}${gs ? ' gradScores' : ''} #${i}`;
    out.push({ label, T, E, logits, options, gw, gs });
  }
  return out;
}

function runBackward(backend: Backend, p: Problem, logits: Tensor<'float32' | 'bfloat16' | 'float16'>, indices: Tensor<'int32'>): Tensor<'float32'> {
  const options: BackwardOptions = { ...p.options, ...(p.gs ? { gradScores: f32([p.T, p.E], p.gs) } : {}) };
  return backend.routeBackward(f32([p.T, p.options.topk], p.gw), logits, indices, options).gradLogits;
}

const RANDOM = problems(40, 0x5eed);

describe('backends agree bit for bit', () => {
  it.skipIf(backends.length < 2)(`routeBackward on ${RANDOM.length} random problems (${backends.map((b) => b.name).join(', ')})`, () => {
    const [first, ...others] = backends;
    for (const p of RANDOM) {
      const logits = f32([p.T, p.E], p.logits);
      const indices = first.route(logits, p.options).indices;
      const want = runBackward(first, p, logits, indices);
      for (const b of others) {
        expectSameBits(b.route(logits, p.options).indices, indices, `${p.label}: ${b.name} indices`);
        expectSameBits(runBackward(b, p, logits, indices), want, `${p.label}: ${b.name} gradLogits vs ${first.name}`);
      }
    }
  });
});

describe.each(backendRows)('16-bit logits on %s', (_name, backend) => {
  const formats = [
    { dtype: 'bfloat16' as const, bits: bf16Bits, value: bf16Value },
    { dtype: 'float16' as const, bits: f16Bits, value: f16Value },
  ];
  it.each(formats.map((f) => [f.dtype, f] as const))('%s logits: route and routeBackward give the results of their float32 conversion', (_d, f) => {
    for (const p of RANDOM.slice(0, 20)) {
      const stored = p.logits.map((v) => f.bits(v));
      const half = tensor(f.dtype, [p.T, p.E], Uint16Array.from(stored));
      const wide = f32([p.T, p.E], stored.map(f.value));
      const a = backend.route(half, p.options);
      const b = backend.route(wide, p.options);
      for (const key of ['weights', 'indices', 'scores', 'tokensPerExpert'] as const) expectSameBits(a[key], b[key], `${p.label}: route ${key}`);
      expectSameBits(runBackward(backend, p, half, b.indices), runBackward(backend, p, wide, b.indices), `${p.label}: gradLogits`);
    }
  });

  it('a 16-bit infinity or NaN in the logits is reported like a float32 one', () => {
    const inf = tensor('bfloat16', [1, 4], Uint16Array.from([0, 0x7f80, 0, 0]));
    expectThrows(() => backend.route(inf, { topk: 1 }), RangeError, /^route: logits: logits\[0\]\[1\] = inf/);
    const nan = tensor('float16', [1, 4], Uint16Array.from([0, 0, 0x7e00, 0]));
    expectThrows(() => backend.routeBackward(f32([1, 1], [1]), nan, tensor('int32', [1, 1], [0]), { topk: 1 }), RangeError, /^routeBackward: logits: logits\[0\]\[2\] = NaN/);
  });
});

// ---------------------------------------------------------------------------------------
// Errors

const L = f32([2, 4], [0.1, 0.2, 0.3, 0.4, 0.8, 0.7, 0.6, 0.5]);
const GW = f32([2, 2], [1, 0.5, -1, 2]);
const IDX = tensor('int32', [2, 2], Int32Array.from([3, 2, 0, 1]));

type ErrorCase = Omit<OpErrorCase, 'op'> & { arg: string };

const ERRORS: ErrorCase[] = [
  { title: 'gradWeights missing', arg: 'gradWeights', cls: TypeError, call: (b) => b.routeBackward(undefined as never, L, IDX, { topk: 2 }) },
  { title: 'gradWeights as bfloat16', arg: 'gradWeights.dtype', cls: TypeError, call: (b) => b.routeBackward(tensor('bfloat16', [2, 2]) as never, L, IDX, { topk: 2 }) },
  { title: 'gradWeights of rank 1', arg: 'gradWeights.shape', cls: TypeError, call: (b) => b.routeBackward(f32([4], [1, 1, 1, 1]), L, IDX, { topk: 2 }) },
  { title: 'gradWeights of the wrong shape', arg: 'gradWeights.shape', cls: RangeError, detail: /expected \[2, 2\]/, call: (b) => b.routeBackward(f32([2, 1], [1, 1]), L, IDX, { topk: 2 }) },
  { title: 'logits as int32', arg: 'logits.dtype', cls: TypeError, call: (b) => b.routeBackward(GW, tensor('int32', [2, 4]) as never, IDX, { topk: 2 }) },
  { title: 'logits with Infinity', arg: 'logits', cls: RangeError, detail: /logits\[1\]\[2\] = inf/, call: (b) => b.routeBackward(GW, f32([2, 4], [0, 0, 0, 0, 0, 0, Infinity, 0]), IDX, { topk: 2 }) },
  { title: 'indices as float32', arg: 'indices.dtype', cls: TypeError, call: (b) => b.routeBackward(GW, L, f32([2, 2], [3, 2, 0, 1]) as never, { topk: 2 }) },
  { title: 'indices of the wrong shape', arg: 'indices.shape', cls: RangeError, detail: /expected \[2, 2\]/, call: (b) => b.routeBackward(GW, L, tensor('int32', [2, 1], [3, 0]), { topk: 2 }) },
  { title: 'indices for another topk', arg: 'indices.shape', cls: RangeError, call: (b) => b.routeBackward(f32([2, 1], [1, 1]), L, tensor('int32', [2, 1], [3, 0]), { topk: 2 }) },
  {
    title: 'an index past numExperts',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[1\]\[0\] = 4 is out of range/,
    call: (b) => b.routeBackward(GW, L, tensor('int32', [2, 2], [3, 2, 4, 1]), { topk: 2 }),
  },
  { title: 'an index below -1', arg: 'indices', cls: RangeError, detail: /indices\[0\]\[0\] = -5/, call: (b) => b.routeBackward(GW, L, tensor('int32', [2, 2], [-5, 2, 0, 1]), { topk: 2 }) },
  {
    title: 'a repeated pick',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[1\]\[1\] = 0 repeats indices\[1\]\[0\]/,
    call: (b) => b.routeBackward(GW, L, tensor('int32', [2, 2], [3, 2, 0, 0]), { topk: 2 }),
  },
  {
    title: '-1 among picks',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[0\]\[1\] = -1 in a row of picks/,
    call: (b) => b.routeBackward(GW, L, tensor('int32', [2, 2], [3, -1, 0, 1]), { topk: 2 }),
  },
  {
    title: 'gradScores of the wrong shape',
    arg: 'gradScores.shape',
    cls: RangeError,
    detail: /expected \[2, 4\]/,
    call: (b) => b.routeBackward(GW, L, IDX, { topk: 2, gradScores: f32([2, 2], [0, 0, 0, 0]) }),
  },
  { title: 'gradScores as float16', arg: 'gradScores.dtype', cls: TypeError, call: (b) => b.routeBackward(GW, L, IDX, { topk: 2, gradScores: tensor('float16', [2, 4]) as never }) },
  { title: 'gradScores not a tensor', arg: 'gradScores', cls: TypeError, call: (b) => b.routeBackward(GW, L, IDX, { topk: 2, gradScores: [1, 2] as never }) },
  { title: 'topk missing', arg: 'options.topk', cls: TypeError, detail: /required/, call: (b) => b.routeBackward(GW, L, IDX, {} as never) },
  { title: 'options missing', arg: 'options.topk', cls: TypeError, call: (b) => b.routeBackward(GW, L, IDX, undefined as never) },
  { title: 'an unknown option', arg: 'options.gradWeights', cls: TypeError, detail: /not an option of routeBackward/, call: (b) => b.routeBackward(GW, L, IDX, { topk: 2, gradWeights: GW } as never) },
  { title: 'tokenMask of the wrong length', arg: 'tokenMask.shape', cls: RangeError, call: (b) => b.routeBackward(GW, L, IDX, { topk: 2, tokenMask: bools([1, 1, 1]) }) },
];

/** route's option errors: routeBackward must report each with route's own message. */
const ROUTE_OPTION_ERRORS: { title: string; options: RouteOptions }[] = [
  { title: 'topk > numExperts', options: { topk: 5 } },
  { title: 'topk 1.5', options: { topk: 1.5 } },
  { title: 'unknown scoreFunction', options: { topk: 2, scoreFunction: 'relu' as ScoreFunction } },
  { title: 'numGroups with softmax', options: { topk: 2, numGroups: 2 } },
  { title: 'numGroups not dividing numExperts', options: { topk: 2, scoreFunction: 'sigmoid', numGroups: 3 } },
  { title: 'topkGroups > numGroups', options: { topk: 2, scoreFunction: 'sigmoid', numGroups: 2, topkGroups: 3 } },
  { title: 'topk beyond the kept groups', options: { topk: 3, scoreFunction: 'sigmoid_with_bias', numGroups: 2, topkGroups: 1 } },
  { title: 'groups of one expert', options: { topk: 2, scoreFunction: 'softmax_with_bias', numGroups: 4 } },
  { title: 'routeScale NaN', options: { topk: 2, routeScale: NaN } },
  { title: 'softmaxBeforeTopk with sigmoid', options: { topk: 2, scoreFunction: 'sigmoid', softmaxBeforeTopk: true } },
  { title: 'expertBias with softmax', options: { topk: 2, expertBias: f32([4], [0, 0, 0, 0]) } },
  { title: 'expertBias of the wrong length', options: { topk: 2, scoreFunction: 'sigmoid', expertBias: f32([3], [0, 0, 0]) } },
  { title: 'expertBias with NaN', options: { topk: 2, scoreFunction: 'sigmoid', expertBias: f32([4], [0, NaN, 0, 0]) } },
  { title: 'expertBias as int32', options: { topk: 2, scoreFunction: 'sigmoid', expertBias: tensor('int32', [4]) as unknown as Tensor<'float32'> } },
];

describe.each(backendRows)('routeBackward errors on %s', (_name, backend) => {
  for (const c of ERRORS) {
    it(`${c.title} -> ${c.cls.name} naming ${c.arg}`, () => {
      expectOpError({ ...c, op: 'routeBackward' }, backend);
    });
  }

  it.each(ROUTE_OPTION_ERRORS.map((c) => [c.title, c] as const))("route's option check '%s' with route's own class and message", (_t, c) => {
    let routeError: Error | undefined;
    try {
      backend.route(L, c.options);
    } catch (e) {
      routeError = e as Error;
    }
    expect(routeError, 'route throws').toBeInstanceOf(Error);
    const k = Math.max(1, Math.floor(c.options.topk));
    const gw = f32(
      [2, k],
      range(2 * k).map(() => 1),
    );
    const idx = tensor('int32', [2, k], Int32Array.from(range(2 * k).map((i) => i % k)));
    const err = expectThrows(() => backend.routeBackward(gw, L, idx, c.options), routeError!.constructor as typeof TypeError, /^routeBackward: /);
    expect(err.message.replace(/^routeBackward: /, '')).toBe(routeError!.message.replace(/^route: /, ''));
  });

  it('the backend still works after every error', () => {
    for (const c of ERRORS) expect(() => c.call(backend)).toThrow();
    const { gradLogits } = backend.routeBackward(GW, L, IDX, { topk: 2 });
    expectMeta(gradLogits, 'float32', [2, 4], 'gradLogits');
    expect(Array.from(gradLogits.data).some((v) => v !== 0)).toBe(true);
  });
});
