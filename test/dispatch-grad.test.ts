/**
 * Gradients of permute and unpermute: `permuteBackward` and `unpermuteBackward` on every
 * available backend, against central finite differences of a float64 forward written here
 * (independent of the library), for the gradients of the tokens / permuted tokens and of the
 * probs (per slot, and dense with the routing map), in plain and drop-and-pad modes. The loss is
 * `sum(g * forward(...))` for random `g`. Then cpu and wasm agree bit for bit on bfloat16 inputs.
 *
 * The reference forward (semantics.md): permute's slot i holds token `sortedIndices[i]` of expert
 * `e_i` (experts in turn; plain: the routed tokens ascending; drop-and-pad: the first C of
 * "routed ascending, then unrouted ascending"), with prob `probs[token, e_i]`; unpermute sums
 * `permuted[i] * p_i` into row `sortedIndices[i]`.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { tensor, type Backend, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { bf16Bits, expectMeta, expectSameBits, expectValues, mismatches, rng } from './util.js';

const SEED = Number(process.env.MOE_FC_SEED ?? 0xd15_9a7c);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 80);

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const f32 = (shape: number[], values: ArrayLike<number>) => tensor('float32', shape, Float32Array.from(values));
const boolMap = (T: number, E: number, map: number[]) => tensor('bool', [T, E], Uint8Array.from(map));

registerBackendReport();

// ---------------------------------------------------------------------------------------
// The float64 reference.

interface Plan {
  /** Token of each slot. */
  sorted: number[];
  /** Expert of each slot. */
  experts: number[];
}

/** Plain (capacity undefined) or drop-and-pad (capacity C) slot order. */
function plan64(map: number[], T: number, E: number, capacity?: number): Plan {
  const sorted: number[] = [];
  const experts: number[] = [];
  for (let e = 0; e < E; e++) {
    const routed = range(T).filter((t) => map[t * E + e]);
    const list = capacity === undefined ? routed : [...routed, ...range(T).filter((t) => !map[t * E + e])].slice(0, capacity);
    for (const t of list) {
      sorted.push(t);
      experts.push(e);
    }
  }
  return { sorted, experts };
}

/** permute: [N, H] rows and [N] probs. */
function permute64(tokens: number[], H: number, plan: Plan, dense: number[], E: number): { rows: number[]; probs: number[] } {
  const rows = plan.sorted.flatMap((t) => tokens.slice(t * H, (t + 1) * H));
  const probs = plan.sorted.map((t, i) => dense[t * E + plan.experts[i]]);
  return { rows, probs };
}

/** unpermute: out[t] = sum over slots of token t of permuted[i] * p[i]. */
function unpermute64(permuted: number[], H: number, sorted: number[], T: number, p: number[] | null): number[] {
  const out = new Array<number>(T * H).fill(0);
  sorted.forEach((t, i) => {
    for (let h = 0; h < H; h++) out[t * H + h] += permuted[i * H + h] * (p ? p[i] : 1);
  });
  return out;
}

const dot = (a: number[], b: number[]) => a.reduce((s, v, i) => s + v * b[i], 0);

/** Central differences of `loss` with respect to every element of `at`. */
function fdGrad(at: number[], loss: (v: number[]) => number, h = 1e-3): number[] {
  return at.map((_, i) => {
    const plus = [...at];
    const minus = [...at];
    plus[i] += h;
    minus[i] -= h;
    return (loss(plus) - loss(minus)) / (2 * h);
  });
}

/** float32 results against float64 finite differences: 2e-6 relative plus 1e-6 of the largest. */
function expectGrad(got: Tensor, shape: number[], want: number[], what: string): void {
  expectMeta(got, 'float32', shape, what);
  const scale = Math.max(1e-3, ...want.map(Math.abs));
  const ok = (g: number, w: number) => Math.abs(g - w) <= 2e-6 * Math.abs(w) + 1e-6 * scale;
  expect(mismatches(got.data as Float32Array, want, ok), what).toEqual([]);
}

// ---------------------------------------------------------------------------------------
// Problems.

interface Problem {
  T: number;
  E: number;
  H: number;
  /** T*E 0/1: token 0 selects nothing, the last expert is selected by nobody. */
  map: number[];
  tokens: number[];
  /** Dense probs [T, E], nonzero everywhere (also where unrouted: drop-and-pad reads them). */
  dense: number[];
  capacity?: number;
}

interface Mode {
  title: string;
  capacity?: number;
}

const T = 7;
const E = 4;
const H = 3;
// Plain; capacity 2 (over-full experts drop tokens); capacity 5 (under-full experts are padded).
const MODES: Mode[] = [{ title: 'plain' }, { title: 'dropAndPad, capacity 2', capacity: 2 }, { title: 'dropAndPad, capacity 5', capacity: 5 }];

function problem(seed: number, mode: Mode): Problem {
  const rand = rng(seed);
  const value = () => Math.fround((2 * rand() - 1) * 3);
  const map = range(T * E).map((i) => {
    const [t, e] = [Math.floor(i / E), i % E];
    return t === 0 || e === E - 1 ? 0 : rand() < 0.55 ? 1 : 0;
  });
  return { T, E, H, map, tokens: range(T * H).map(value), dense: range(T * E).map(value), capacity: mode.capacity };
}

/** A seed's problem, with the reference's plan, its slot count N and the bool routing map. */
function planned(seed: number, mode: Mode) {
  const p = problem(seed, mode);
  const plan = plan64(p.map, p.T, p.E, p.capacity);
  return { p, plan, N: plan.sorted.length, map: boolMap(p.T, p.E, p.map), dropAndPad: p.capacity !== undefined };
}

function permuteOptions(p: Problem) {
  return p.capacity === undefined ? {} : { dropAndPad: true, numOutTokens: p.capacity * p.E };
}

const SEEDS = [11, 12, 13];

// ---------------------------------------------------------------------------------------
// permuteBackward.

describe.each(backendRows)('permuteBackward vs finite differences on %s', (_name, b) => {
  for (const mode of MODES) {
    it(mode.title, () => {
      for (const seed of SEEDS) {
        const { p, plan, N, map, dropAndPad } = planned(seed, mode);

        // The library's forward is the one the reference describes (so its sortedIndices are the plan's).
        const fwd = b.permute(f32([p.T, p.H], p.tokens), map, { probs: f32([p.T, p.E], p.dense), ...permuteOptions(p) });
        const ref = permute64(p.tokens, p.H, plan, p.dense, p.E);
        expectValues(fwd.sortedIndices, 'int32', [N], plan.sorted, 'sortedIndices');
        expect(Array.from(fwd.permutedTokens.data), 'permutedTokens').toEqual(ref.rows);
        expect(Array.from(fwd.permutedProbs!.data), 'permutedProbs').toEqual(ref.probs);

        const rand = rng(seed * 31);
        const g = range(N * p.H).map(() => Math.fround(2 * rand() - 1));
        const gp = range(N).map(() => Math.fround(2 * rand() - 1));
        const loss = (tokens: number[], dense: number[]) => {
          const out = permute64(tokens, p.H, plan, dense, p.E);
          return dot(g, out.rows) + dot(gp, out.probs);
        };
        const wantTokens = fdGrad(p.tokens, (v) => loss(v, p.dense));
        const wantProbs = fdGrad(p.dense, (v) => loss(p.tokens, v));

        const grads = b.permuteBackward(f32([N, p.H], g), fwd.sortedIndices, p.T, { gradPermutedProbs: f32([N], gp), routingMap: map, dropAndPad });
        expectGrad(grads.gradTokens, [p.T, p.H], wantTokens, `gradTokens (seed ${seed})`);
        expect(grads.gradProbs, 'gradProbs').toBeDefined();
        expectGrad(grads.gradProbs!, [p.T, p.E], wantProbs, `gradProbs (seed ${seed})`);
        // Token 0 is routed nowhere: in plain mode nothing reads it.
        if (!dropAndPad) expect(wantTokens.slice(0, p.H)).toEqual([0, 0, 0]);
        // With drop-and-pad some slot reads an unrouted (padding) prob: its gradient is there too.
        if (mode.capacity === 5)
          expect(
            range(p.T * p.E).some((i) => !p.map[i] && wantProbs[i] !== 0),
            'a padded slot',
          ).toBe(true);
        if (mode.capacity === 2)
          expect(
            range(p.T * p.E).some((i) => p.map[i] && wantProbs[i] === 0),
            'a dropped token',
          ).toBe(true);

        // Without the probs gradient: the same tokens gradient and no gradProbs.
        const only = b.permuteBackward(f32([N, p.H], g), fwd.sortedIndices, p.T, dropAndPad ? { dropAndPad } : {});
        expectSameBits(only.gradTokens, grads.gradTokens, 'gradTokens without gradPermutedProbs');
        expect('gradProbs' in only).toBe(false);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------
// unpermuteBackward.

type ProbsKind = 'none' | 'per slot' | 'dense + routingMap';
const PROBS: readonly ProbsKind[] = ['none', 'per slot', 'dense + routingMap'];

describe.each(backendRows)('unpermuteBackward vs finite differences on %s', (_name, b) => {
  for (const mode of MODES) {
    for (const probsKind of PROBS) {
      it(`${mode.title}, probs ${probsKind}`, () => {
        for (const seed of SEEDS) {
          const { p, plan, N, map, dropAndPad } = planned(seed, mode);
          const rand = rng(seed * 57);
          const permuted = range(N * p.H).map(() => Math.fround((2 * rand() - 1) * 2));
          const perSlot = range(N).map(() => Math.fround(2 * rand() - 1));
          const g = range(p.T * p.H).map(() => Math.fround(2 * rand() - 1));
          const sorted = tensor('int32', [N], Int32Array.from(plan.sorted));

          // Slot weights from the probs in the form given.
          const weights = (probs: number[]): number[] | null => (probsKind === 'none' ? null : probsKind === 'per slot' ? probs : plan.sorted.map((t, i) => probs[t * p.E + plan.experts[i]]));
          const probs = probsKind === 'per slot' ? perSlot : p.dense;
          const probsShape = probsKind === 'per slot' ? [N] : [p.T, p.E];
          const options: Parameters<Backend['unpermute']>[3] = dropAndPad ? { dropAndPad } : {};
          if (probsKind !== 'none') options.probs = f32(probsShape, probs);
          if (probsKind === 'dense + routingMap') options.routingMap = map;

          // The library's forward agrees with the reference forward.
          const merged = b.unpermute(f32([N, p.H], permuted), sorted, [p.T, p.H], options);
          expectGrad(merged, [p.T, p.H], unpermute64(permuted, p.H, plan.sorted, p.T, weights(probs)), 'unpermute forward');

          const loss = (perm: number[], pr: number[]) => dot(g, unpermute64(perm, p.H, plan.sorted, p.T, weights(pr)));
          const wantPermuted = fdGrad(permuted, (v) => loss(v, probs));
          const grads = b.unpermuteBackward(f32([p.T, p.H], g), f32([N, p.H], permuted), sorted, options);
          expectGrad(grads.gradPermuted, [N, p.H], wantPermuted, `gradPermuted (seed ${seed})`);
          if (probsKind === 'none') {
            expect('gradProbs' in grads).toBe(false);
          } else {
            const wantProbs = fdGrad(probs, (v) => loss(permuted, v));
            expect(grads.gradProbs, 'gradProbs').toBeDefined();
            expectGrad(grads.gradProbs!, probsShape, wantProbs, `gradProbs (seed ${seed})`);
            if (probsKind === 'dense + routingMap' && mode.capacity === 5) {
              expect(
                range(p.T * p.E).some((i) => !p.map[i] && wantProbs[i] !== 0),
                'a padded slot',
              ).toBe(true);
            }
          }
        }
      });
    }
  }
});

// ---------------------------------------------------------------------------------------
// bfloat16: cpu and wasm agree bit for bit.

describe('cpu and wasm agree bit for bit on bfloat16', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  if (!cpu || !wasm) {
    it.skip(`needs both cpu and wasm; missing: ${[!cpu && 'cpu', !wasm && 'wasm'].filter(Boolean).join(', ')}`, () => {});
    return;
  }
  const bf16 = fc.float({ min: -1e4, max: 1e4, noNaN: true }).map(bf16Bits);
  const arb = fc
    .record({
      T: fc.integer({ min: 1, max: 12 }),
      E: fc.integer({ min: 1, max: 6 }),
      H: fc.integer({ min: 1, max: 9 }),
      capacity: fc.option(fc.nat(), { nil: undefined }),
      probsKind: fc.constantFrom(...PROBS),
    })
    .chain((s) =>
      fc.record({
        s: fc.constant(s),
        map: fc.array(fc.integer({ min: 0, max: 1 }), { minLength: s.T * s.E, maxLength: s.T * s.E }),
        dense: fc.array(fc.float({ min: -2, max: 2, noNaN: true }), { minLength: s.T * s.E, maxLength: s.T * s.E }),
        gSlots: fc.array(bf16, { minLength: s.T * s.E * s.H, maxLength: s.T * s.E * s.H }),
        gTokens: fc.array(bf16, { minLength: s.T * s.H, maxLength: s.T * s.H }),
        gProbs: fc.array(fc.float({ min: -2, max: 2, noNaN: true }), { minLength: s.T * s.E, maxLength: s.T * s.E }),
      }),
    );

  it('permuteBackward and unpermuteBackward, plain and dropAndPad, every probs form', () => {
    fc.assert(
      fc.property(arb, ({ s, map, dense, gSlots, gTokens, gProbs }) => {
        const capacity = s.capacity === undefined ? undefined : s.capacity % (s.T + 1);
        const plan = plan64(map, s.T, s.E, capacity);
        const N = plan.sorted.length;
        const dropAndPad = capacity !== undefined;
        const m = boolMap(s.T, s.E, map);
        const sorted = tensor('int32', [N], Int32Array.from(plan.sorted));
        const gradPermuted = tensor('bfloat16', [N, s.H], Uint16Array.from(gSlots.slice(0, N * s.H)));
        const gradOutput = tensor('bfloat16', [s.T, s.H], Uint16Array.from(gTokens));
        const run = (b: Backend) => {
          const pb = b.permuteBackward(gradPermuted, sorted, s.T, { gradPermutedProbs: f32([N], gProbs.slice(0, N)), routingMap: m, dropAndPad });
          const options: Parameters<Backend['unpermuteBackward']>[3] = { dropAndPad };
          if (s.probsKind === 'per slot') options.probs = f32([N], gProbs.slice(0, N));
          if (s.probsKind === 'dense + routingMap') Object.assign(options, { probs: f32([s.T, s.E], dense), routingMap: m });
          // The permuted tokens of unpermute: the slot gradients reused as bf16 rows.
          const ub = b.unpermuteBackward(gradOutput, gradPermuted, sorted, options);
          return { pb, ub };
        };
        const c = run(cpu);
        const w = run(wasm);
        expectSameBits(w.pb.gradTokens, c.pb.gradTokens, 'permuteBackward gradTokens');
        expectSameBits(w.pb.gradProbs!, c.pb.gradProbs!, 'permuteBackward gradProbs');
        expectSameBits(w.ub.gradPermuted, c.ub.gradPermuted, 'unpermuteBackward gradPermuted');
        expect('gradProbs' in w.ub).toBe('gradProbs' in c.ub);
        if (c.ub.gradProbs) expectSameBits(w.ub.gradProbs!, c.ub.gradProbs, 'unpermuteBackward gradProbs');
      }),
      { seed: SEED, numRuns: RUNS },
    );
  });
});
