/**
 * Property tests: random shapes and data (fast-check, fixed seed), every available backend,
 * checked against a small pure-JS reference written here (independent of the library) and,
 * when both CPU backends run, against each other bit for bit.
 *
 * The reference follows the spec: permute is a stable expert-major gather (with dropAndPad:
 * per expert, selected tokens ascending then unselected ascending, first `capacity`);
 * unpermute sums `x * p` in float32 in ascending slot order per token and rounds once to the
 * token dtype. Doing the float32 steps with Math.fround (exact: double rounding is harmless
 * for one + or * of float32 values) lets every comparison be exact, in every dtype.
 *
 * Reproduce or explore: MOE_FC_SEED=<n> MOE_FC_RUNS=<n> npx vitest run test/properties.test.ts
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { toBFloat16Bits, toFloat16Bits, type Backend, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { bf16Bits, bitsOf, decode, encode, expectSameBits, expectValues, f16Bits, f32BitsOf, f32FromBits, type FloatDType } from './util.js';

const SEED = Number(process.env.MOE_FC_SEED ?? 0x5eed_2025);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 120);
const params = <T>(examples: T[] = []): fc.Parameters<T> => ({ seed: SEED, numRuns: RUNS, examples });

const DTYPES: readonly FloatDType[] = ['float32', 'bfloat16', 'float16'];
type TokenMode = 'ints' | 'floats' | 'bits';

// ---------------------------------------------------------------------------------------
// Problems: a top-k routing (indices [T, k] with -1 = masked, probs [T, k]) and tokens.

interface Problem {
  T: number;
  E: number;
  H: number;
  k: number;
  dtype: FloatDType;
  /** T*k expert ids, distinct per row, -1 = masked. */
  indices: number[];
  /** T*k float32 probs. */
  topProbs: number[];
  /** T*H stored token elements: float32 bits (uint32) or bfloat16/float16 bits. */
  tokens: number[];
  /** Values for the dense probs' unrouted cells (permute/unpermute inputs), or null for zeros. */
  noise: number[] | null;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/** A stored element of `dtype` holding (the rounding of) `v`; float32 as its uint32 bits. */
const store = (dtype: FloatDType, v: number) => (dtype === 'float32' ? f32BitsOf(v) : encode(dtype, v));
/** The value of a stored element. */
const load = (dtype: FloatDType, s: number) => (dtype === 'float32' ? f32FromBits(s) : decode(dtype, s));

const probArb = fc.float({ min: -2, max: 2, noNaN: true });

function tokenArb(dtype: FloatDType, mode: TokenMode): fc.Arbitrary<number> {
  switch (mode) {
    case 'ints': // exact in every dtype, even after summing a few of them
      return fc.integer({ min: -8, max: 8 }).map((v) => store(dtype, v));
    case 'floats': // finite, with subnormals and signed zeros; f32 sums cannot overflow
      return fc.float({ min: -1e4, max: 1e4, noNaN: true }).map((v) => store(dtype, v));
    case 'bits': // any pattern at all, NaN payloads and infinities included (permute must copy them)
      return fc.integer({ min: 0, max: dtype === 'float32' ? 0xffffffff : 0xffff });
  }
}

function problemArb(modes: readonly TokenMode[], maxT = 40): fc.Arbitrary<Problem> {
  return fc
    .record({
      T: fc.integer({ min: 0, max: maxT }),
      E: fc.integer({ min: 1, max: 12 }),
      H: fc.integer({ min: 1, max: 12 }),
      dtype: fc.constantFrom(...DTYPES),
      mask: fc.constantFrom('none', 'some', 'all'),
      mode: fc.constantFrom(...modes),
      noisy: fc.boolean(),
    })
    .chain((s) =>
      fc.integer({ min: 0, max: s.E }).chain((k) =>
        fc
          .record({
            rows: fc.array(fc.shuffledSubarray(range(s.E), { minLength: k, maxLength: k }), { minLength: s.T, maxLength: s.T }),
            masked: fc.array(fc.boolean(), { minLength: s.T * k, maxLength: s.T * k }),
            topProbs: fc.array(probArb, { minLength: s.T * k, maxLength: s.T * k }),
            tokens: fc.array(tokenArb(s.dtype, s.mode), { minLength: s.T * s.H, maxLength: s.T * s.H }),
            noise: fc.array(probArb, { minLength: s.T * s.E, maxLength: s.T * s.E }),
          })
          .map(
            (d): Problem => ({
              T: s.T,
              E: s.E,
              H: s.H,
              k,
              dtype: s.dtype,
              indices: d.rows.flat().map((e, i) => (s.mask === 'all' || (s.mask === 'some' && d.masked[i]) ? -1 : e)),
              topProbs: d.topProbs,
              tokens: d.tokens,
              noise: s.noisy ? d.noise : null,
            }),
          ),
      ),
    );
}

/** A deterministic problem for the edge examples (a tiny LCG for the data). */
function makeProblem(T: number, E: number, H: number, k: number, dtype: FloatDType, pick: (t: number, j: number) => number, mode: TokenMode = 'ints'): Problem {
  let state = 12345 + T * 7 + E * 131 + H * 17 + k;
  const rand = () => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return state / 2 ** 31;
  };
  const value = () => (mode === 'ints' ? Math.floor(rand() * 17) - 8 : (rand() - 0.5) * 200);
  return {
    T,
    E,
    H,
    k,
    dtype,
    indices: range(T * k).map((i) => pick(Math.floor(i / k), i % k)),
    topProbs: range(T * k).map(() => Math.fround(rand())),
    tokens: range(T * H).map(() => store(dtype, value())),
    noise: null,
  };
}

/** The edges every property also runs on, in every dtype. */
const EDGES: Problem[] = DTYPES.flatMap((dt) => [
  makeProblem(0, 3, 4, 2, dt, (_t, j) => j), // no tokens
  makeProblem(5, 1, 3, 1, dt, () => 0), // one expert
  makeProblem(6, 4, 2, 1, dt, () => 2), // experts 0, 1, 3 get no tokens
  makeProblem(6, 3, 5, 2, dt, () => -1), // every token masked
  makeProblem(5, 4, 3, 4, dt, (t, j) => (t + j) % 4), // k = E
  makeProblem(7, 3, 1, 2, dt, (t, j) => (t + 2 * j) % 3), // H = 1
  makeProblem(4, 5, 2, 3, dt, (t, j) => (t === 2 ? -1 : j === 1 && t % 2 ? -1 : (t + j) % 5)), // mixed masks
]);

/** Examples: each edge problem with each of the counts `counts(p)` (a capacity, a number of slots). */
const edgesWith = (counts: (p: Problem) => number[]): [Problem, number][] => EDGES.flatMap((p) => counts(p).map((c): [Problem, number] => [p, c]));

// ---------------------------------------------------------------------------------------
// The reference.

interface Routing {
  map: number[]; // T*E, 0/1
  dense: number[]; // T*E float32: the routed probs, 0 elsewhere
}

function refMultihot(p: Problem): Routing {
  const map = new Array<number>(p.T * p.E).fill(0);
  const dense = new Array<number>(p.T * p.E).fill(0);
  for (let t = 0; t < p.T; t++) {
    for (let j = 0; j < p.k; j++) {
      const e = p.indices[t * p.k + j];
      if (e === -1) continue;
      map[t * p.E + e] = 1;
      dense[t * p.E + e] = p.topProbs[t * p.k + j];
    }
  }
  return { map, dense };
}

/** The dense probs fed to permute/unpermute: routed probs, and noise (if any) in the other cells. */
function inputDense(p: Problem, r: Routing): number[] {
  return r.dense.map((v, i) => (r.map[i] || !p.noise ? v : p.noise[i]));
}

interface Plan {
  sorted: number[];
  expertOf: number[];
  perExpert: number[];
}

/** Column by column: expert e's tokens ascending; with a capacity, selected then unselected, cut. */
function refPlan(map: number[], T: number, E: number, capacity?: number): Plan {
  const plan: Plan = { sorted: [], expertOf: [], perExpert: [] };
  for (let e = 0; e < E; e++) {
    const selected = range(T).filter((t) => map[t * E + e]);
    const block = capacity === undefined ? selected : [...selected, ...range(T).filter((t) => !map[t * E + e])].slice(0, capacity);
    plan.sorted.push(...block);
    plan.expertOf.push(...block.map(() => e));
    plan.perExpert.push(block.length);
  }
  return plan;
}

function gatherRows(rows: number[], H: number, sorted: number[]): number[] {
  const out = new Array<number>(sorted.length * H);
  sorted.forEach((t, i) => {
    for (let h = 0; h < H; h++) out[i * H + h] = rows[t * H + h];
  });
  return out;
}

/** Stored output elements of unpermute: f32 sums in ascending slot order, one rounding at the end. */
function refUnpermute(dtype: FloatDType, slots: number[], sorted: number[], T: number, H: number, weights: number[] | null): number[] {
  const acc = new Array<number>(T * H).fill(0);
  sorted.forEach((t, i) => {
    for (let h = 0; h < H; h++) {
      const x = load(dtype, slots[i * H + h]);
      acc[t * H + h] = Math.fround(acc[t * H + h] + (weights ? Math.fround(x * weights[i]) : x));
    }
  });
  return acc.map((v) => store(dtype, v));
}

// ---------------------------------------------------------------------------------------
// Library tensors from problems.

function tokensTensor(dtype: FloatDType, shape: number[], stored: number[]): Tensor<FloatDType> {
  return dtype === 'float32' ? { dtype, shape, data: new Float32Array(Uint32Array.from(stored).buffer) } : { dtype, shape, data: Uint16Array.from(stored) };
}
const f32 = (shape: number[], values: number[]): Tensor<'float32'> => ({ dtype: 'float32', shape, data: Float32Array.from(values) });
const bool = (shape: number[], values: number[]): Tensor<'bool'> => ({ dtype: 'bool', shape, data: Uint8Array.from(values) });
const i32 = (shape: number[], values: number[]): Tensor<'int32'> => ({ dtype: 'int32', shape, data: Int32Array.from(values) });
const i64 = (shape: number[], values: number[]): Tensor<'int64'> => ({ dtype: 'int64', shape, data: BigInt64Array.from(values, (v) => BigInt(v)) });

const f32Stored = (values: number[]) => values.map(f32BitsOf);

function expectStored(got: Tensor, dtype: FloatDType, shape: number[], stored: number[], what: string): void {
  expectSameBits(got, tokensTensor(dtype, shape, stored), what);
}

// ---------------------------------------------------------------------------------------

registerBackendReport();

describe.each(backendRows)('properties on %s', (_name, b) => {
  it('(c) indicesToMultihot matches the reference; multihotToIndices recovers each row (sorted set) and its probs', () => {
    fc.assert(
      fc.property(problemArb(['ints']), fc.boolean(), (p, asInt64) => {
        const idx = asInt64 ? i64([p.T, p.k], p.indices) : i32([p.T, p.k], p.indices);
        const ref = refMultihot(p);
        const m = b.indicesToMultihot(idx, f32([p.T, p.k], p.topProbs), p.E);
        expectValues(m.routingMap, 'bool', [p.T, p.E], ref.map, 'routingMap');
        expectStored(m.probs, 'float32', [p.T, p.E], f32Stored(ref.dense), 'probs');

        // Each row's experts as a sorted set with their probs, padded with -1 / 0.
        const rows = range(p.T).map((t) =>
          range(p.k)
            .map((j) => ({ e: p.indices[t * p.k + j], prob: p.topProbs[t * p.k + j] }))
            .filter((x) => x.e !== -1)
            .sort((x, y) => x.e - y.e),
        );
        const widest = Math.max(0, ...rows.map((r) => r.length));
        const padded = (width: number, f: (x: { e: number; prob: number }) => number, pad: number) => rows.flatMap((r) => [...r.map(f), ...Array(width - r.length).fill(pad)]);

        const back = b.multihotToIndices(m.routingMap, { probs: m.probs });
        expectValues(
          back.indices,
          'int32',
          [p.T, widest],
          padded(widest, (x) => x.e, -1),
          'indices',
        );
        expectStored(back.probs, 'float32', [p.T, widest], f32Stored(padded(widest, (x) => x.prob, 0)), 'probs');

        const wide = b.multihotToIndices(m.routingMap, { probs: m.probs, topk: p.k });
        expectValues(
          wide.indices,
          'int32',
          [p.T, p.k],
          padded(p.k, (x) => x.e, -1),
          'indices (topk = k)',
        );
        expectStored(wide.probs, 'float32', [p.T, p.k], f32Stored(padded(p.k, (x) => x.prob, 0)), 'probs (topk = k)');

        const ones = b.multihotToIndices(m.routingMap);
        expectStored(ones.probs, 'float32', [p.T, widest], f32Stored(padded(widest, () => 1, 0)), 'probs without probs');
      }),
      params(EDGES.map((p) => [p, true] as [Problem, boolean])),
    );
  });

  it('(d) permute: expert-major, tokens ascending per expert, counts = column sums, probs picked per slot; equals the reference', () => {
    fc.assert(
      fc.property(problemArb(['ints', 'floats', 'bits']), (p) => {
        const r = refMultihot(p);
        const dense = inputDense(p, r);
        const tokens = tokensTensor(p.dtype, [p.T, p.H], p.tokens);
        const out = b.permute(tokens, bool([p.T, p.E], r.map), { probs: f32([p.T, p.E], dense) });

        // Direct structural checks.
        const colSums = range(p.E).map((e) => range(p.T).filter((t) => r.map[t * p.E + e]).length);
        expectValues(out.tokensPerExpert, 'int32', [p.E], colSums, 'tokensPerExpert');
        const n = colSums.reduce((a, c) => a + c, 0);
        const sorted = bitsOf(out.sortedIndices);
        expect(sorted.length, 'one slot per routed entry').toBe(n);
        let i = 0;
        for (let e = 0; e < p.E; e++) {
          const block = sorted.slice(i, i + colSums[e]);
          for (let s = 0; s < block.length; s++) {
            expect(r.map[block[s] * p.E + e], `slot ${i + s}: token ${block[s]} is routed to expert ${e}`).toBe(1);
            if (s > 0) expect(block[s], `slot ${i + s}: tokens ascend within expert ${e}`).toBeGreaterThan(block[s - 1]);
          }
          const probs = out.permutedProbs!.data;
          for (let s = 0; s < block.length; s++) {
            expect(f32BitsOf(probs[i + s]), `permutedProbs[${i + s}] == probs[${block[s]}, ${e}]`).toBe(f32BitsOf(dense[block[s] * p.E + e]));
          }
          i += colSums[e];
        }

        // Against the reference, bit for bit.
        const plan = refPlan(r.map, p.T, p.E);
        expectValues(out.sortedIndices, 'int32', [n], plan.sorted, 'sortedIndices');
        expectStored(out.permutedTokens, p.dtype, [n, p.H], gatherRows(p.tokens, p.H, plan.sorted), 'permutedTokens');
        expectStored(out.permutedProbs!, 'float32', [n], f32Stored(plan.sorted.map((t, s) => dense[t * p.E + plan.expertOf[s]])), 'permutedProbs');

        // Without probs: the same layout and no permutedProbs; numOutTokens equal to the count is accepted.
        const bare = b.permute(tokens, bool([p.T, p.E], r.map), { numOutTokens: n });
        expect('permutedProbs' in bare, 'no permutedProbs without probs').toBe(false);
        expectSameBits(bare.permutedTokens, out.permutedTokens, 'permutedTokens without probs');
        expectSameBits(bare.sortedIndices, out.sortedIndices, 'sortedIndices without probs');
      }),
      params(EDGES.map((p) => [p] as [Problem])),
    );
  });

  it("(d') permutePlan: permute's sortedIndices and tokensPerExpert (and with dropAndPad), without the tokens; permute's errors", () => {
    /** The result, or the error's class and message without the op's name. */
    const outcome = <T>(f: () => T): T | string => {
      try {
        return f();
      } catch (e) {
        return `${(e as Error).name}: ${(e as Error).message.replace(/^permute(Plan)?: /, '')}`;
      }
    };
    fc.assert(
      fc.property(problemArb(['ints']), fc.integer({ min: 0, max: 4 }), (p, capacity) => {
        const map = bool([p.T, p.E], refMultihot(p).map);
        const tokens = tokensTensor(p.dtype, [p.T, p.H], p.tokens);
        for (const options of [{}, { numOutTokens: capacity * p.E, dropAndPad: true }, { numOutTokens: capacity * p.E + 1, dropAndPad: true }]) {
          const plan = outcome(() => b.permutePlan(map, options));
          const out = outcome(() => b.permute(tokens, map, options));
          if (typeof out === 'string' || typeof plan === 'string') {
            expect(plan, JSON.stringify(options)).toBe(out);
          } else {
            expectSameBits(plan.sortedIndices, out.sortedIndices, 'sortedIndices');
            expectSameBits(plan.tokensPerExpert, out.tokensPerExpert, 'tokensPerExpert');
          }
        }
      }),
      params(EDGES.map((p) => [p, 1] as [Problem, number])),
    );
    expect(() => b.permutePlan(bool([2, 2], [1, 0, 0, 1]), { numOutTokens: 2.5, dropAndPad: true })).toThrow(new RangeError('permutePlan: numOutTokens: expected a non-negative integer, got 2.5'));
    expect(() => b.permutePlan(bool([2, 2], [1, 0, 0, 1]), { probs: undefined } as never)).toThrow(TypeError);
  });

  it('(e) permute with dropAndPad: exactly capacity slots per expert, selected tokens first (ascending), then unselected (ascending)', () => {
    fc.assert(
      fc.property(problemArb(['ints', 'floats', 'bits']), fc.nat(), (p, c) => {
        const capacity = c % (p.T + 1);
        const r = refMultihot(p);
        const dense = inputDense(p, r);
        const out = b.permute(tokensTensor(p.dtype, [p.T, p.H], p.tokens), bool([p.T, p.E], r.map), {
          probs: f32([p.T, p.E], dense),
          dropAndPad: true,
          numOutTokens: capacity * p.E,
        });
        const n = capacity * p.E;
        expectValues(out.tokensPerExpert, 'int32', [p.E], Array(p.E).fill(capacity), 'tokensPerExpert');

        // Direct check of each expert's block.
        const sorted = bitsOf(out.sortedIndices);
        expect(sorted.length).toBe(n);
        for (let e = 0; e < p.E; e++) {
          const block = sorted.slice(e * capacity, (e + 1) * capacity);
          const sel = block.filter((t) => r.map[t * p.E + e]);
          const selectedCount = range(p.T).filter((t) => r.map[t * p.E + e]).length;
          expect(sel.length, `expert ${e}: keeps min(capacity, selected)`).toBe(Math.min(capacity, selectedCount));
          expect(block.slice(0, sel.length), `expert ${e}: selected tokens first`).toEqual(sel);
          expect(sel, `expert ${e}: the lowest selected ids, ascending`).toEqual(
            range(p.T)
              .filter((t) => r.map[t * p.E + e])
              .slice(0, sel.length),
          );
          expect(block.slice(sel.length), `expert ${e}: then the lowest unselected ids, ascending`).toEqual(
            range(p.T)
              .filter((t) => !r.map[t * p.E + e])
              .slice(0, capacity - sel.length),
          );
        }

        const plan = refPlan(r.map, p.T, p.E, capacity);
        expectValues(out.sortedIndices, 'int32', [n], plan.sorted, 'sortedIndices');
        expectStored(out.permutedTokens, p.dtype, [n, p.H], gatherRows(p.tokens, p.H, plan.sorted), 'permutedTokens');
        expectStored(out.permutedProbs!, 'float32', [n], f32Stored(plan.sorted.map((t, s) => dense[t * p.E + plan.expertOf[s]])), 'permutedProbs (pads get the dense prob)');
      }),
      params(edgesWith((p) => [0, p.T, 1])),
    );
  });

  it('(b) permute then unpermute without probs gives k_t times each token, exactly (plain and dropAndPad)', () => {
    fc.assert(
      fc.property(problemArb(['ints']), fc.nat(), (p, c) => {
        const r = refMultihot(p);
        const tokens = tokensTensor(p.dtype, [p.T, p.H], p.tokens);
        const map = bool([p.T, p.E], r.map);
        const kt = range(p.T).map((t) => range(p.E).filter((e) => r.map[t * p.E + e]).length);
        const value = (t: number, h: number) => load(p.dtype, p.tokens[t * p.H + h]);
        /** The tokens, token t times[t], as stored. */
        const scaled = (times: number[]) => range(p.T * p.H).map((i) => store(p.dtype, times[Math.floor(i / p.H)] * value(Math.floor(i / p.H), i % p.H) + 0));

        const out = b.permute(tokens, map);
        const merged = b.unpermute(out.permutedTokens, out.sortedIndices, [p.T, p.H]);
        expectStored(merged, p.dtype, [p.T, p.H], scaled(kt), 'unpermute(permute(x))');

        // With dropAndPad a token comes back once per slot it fills (kept or pad).
        const capacity = c % (p.T + 1);
        const dp = b.permute(tokens, map, { dropAndPad: true, numOutTokens: capacity * p.E });
        const uses = range(p.T).map((t) => bitsOf(dp.sortedIndices).filter((s) => s === t).length);
        const mergedDp = b.unpermute(dp.permutedTokens, dp.sortedIndices, [p.T, p.H], { dropAndPad: true });
        expectStored(mergedDp, p.dtype, [p.T, p.H], scaled(uses), 'unpermute(permute(x, dropAndPad))');
      }),
      params(edgesWith((p) => [0, p.T])),
    );
  });

  it('unpermute equals the reference with per-slot probs, dense probs + routingMap, and no probs (plain and dropAndPad)', () => {
    fc.assert(
      fc.property(problemArb(['ints', 'floats']), fc.nat(), (p, c) => {
        const r = refMultihot(p);
        const dense = inputDense(p, r);
        const tokens = tokensTensor(p.dtype, [p.T, p.H], p.tokens);
        const map = bool([p.T, p.E], r.map);
        const probs = f32([p.T, p.E], dense);
        const shape = [p.T, p.H] as const;

        const plan = refPlan(r.map, p.T, p.E);
        const slots = gatherRows(p.tokens, p.H, plan.sorted);
        const w = plan.sorted.map((t, s) => dense[t * p.E + plan.expertOf[s]]);
        const out = b.permute(tokens, map, { probs });
        const want = refUnpermute(p.dtype, slots, plan.sorted, p.T, p.H, w);
        expectStored(b.unpermute(out.permutedTokens, out.sortedIndices, shape, { probs: out.permutedProbs }), p.dtype, [...shape], want, 'per-slot probs');
        expectStored(b.unpermute(out.permutedTokens, out.sortedIndices, shape, { probs, routingMap: map }), p.dtype, [...shape], want, 'dense probs + routingMap');
        expectStored(b.unpermute(out.permutedTokens, out.sortedIndices, shape), p.dtype, [...shape], refUnpermute(p.dtype, slots, plan.sorted, p.T, p.H, null), 'no probs');

        const capacity = c % (p.T + 1);
        const dpPlan = refPlan(r.map, p.T, p.E, capacity);
        const dpSlots = gatherRows(p.tokens, p.H, dpPlan.sorted);
        const dpW = dpPlan.sorted.map((t, s) => dense[t * p.E + dpPlan.expertOf[s]]);
        const dp = b.permute(tokens, map, { probs, dropAndPad: true, numOutTokens: capacity * p.E });
        const dpWant = refUnpermute(p.dtype, dpSlots, dpPlan.sorted, p.T, p.H, dpW);
        expectStored(b.unpermute(dp.permutedTokens, dp.sortedIndices, shape, { probs, routingMap: map, dropAndPad: true }), p.dtype, [...shape], dpWant, 'dropAndPad, dense probs + routingMap');
        expectStored(b.unpermute(dp.permutedTokens, dp.sortedIndices, shape, { probs: dp.permutedProbs, dropAndPad: true }), p.dtype, [...shape], dpWant, 'dropAndPad, per-slot probs');
      }),
      params(edgesWith((p) => [0, p.T, 2])),
    );
  });

  it('unpermute of arbitrary slots (repeats, any order, int32 or int64 indices) sums in ascending slot order', () => {
    const arb = fc
      .record({
        T: fc.integer({ min: 1, max: 24 }),
        N: fc.integer({ min: 0, max: 48 }),
        H: fc.integer({ min: 1, max: 12 }),
        dtype: fc.constantFrom(...DTYPES),
        withProbs: fc.boolean(),
        int64: fc.boolean(),
      })
      .chain((s) =>
        fc.record({
          s: fc.constant(s),
          sorted: fc.array(fc.integer({ min: 0, max: s.T - 1 }), { minLength: s.N, maxLength: s.N }),
          slots: fc.array(tokenArb(s.dtype, 'floats'), { minLength: s.N * s.H, maxLength: s.N * s.H }),
          probs: fc.array(probArb, { minLength: s.N, maxLength: s.N }),
        }),
      );
    fc.assert(
      fc.property(arb, ({ s, sorted, slots, probs }) => {
        const idx = s.int64 ? i64([s.N], sorted) : i32([s.N], sorted);
        const got = b.unpermute(tokensTensor(s.dtype, [s.N, s.H], slots), idx, [s.T, s.H], s.withProbs ? { probs: f32([s.N], probs) } : undefined);
        expectStored(got, s.dtype, [s.T, s.H], refUnpermute(s.dtype, slots, sorted, s.T, s.H, s.withProbs ? probs : null), 'unpermute');
      }),
      params(),
    );
  });

  it('a large input (the multi-threaded path of the native backend) matches the reference exactly', () => {
    const [T, E, H, k] = [4096, 8, 96, 2];
    for (const dtype of ['float32', 'bfloat16'] as const) {
      const p = makeProblem(T, E, H, k, dtype, (t, j) => (t * 5 + j * 3 + (t >> 4)) % E, 'floats');
      const r = refMultihot(p);
      const plan = refPlan(r.map, T, E);
      const out = b.permute(tokensTensor(dtype, [T, H], p.tokens), bool([T, E], r.map), { probs: f32([T, E], r.dense) });
      const slots = gatherRows(p.tokens, H, plan.sorted);
      expectStored(out.permutedTokens, dtype, [plan.sorted.length, H], slots, `${dtype} permutedTokens`);
      const merged = b.unpermute(out.permutedTokens, out.sortedIndices, [T, H], { probs: f32([T, E], r.dense), routingMap: bool([T, E], r.map) });
      const w = plan.sorted.map((t, s) => r.dense[t * E + plan.expertOf[s]]);
      expectStored(merged, dtype, [T, H], refUnpermute(dtype, slots, plan.sorted, T, H, w), `${dtype} unpermute`);
    }
  });
});

// ---------------------------------------------------------------------------------------
// (a) The CPU backends agree bit for bit on everything.

/** Every output of every op on one problem, as plain bit arrays (NaN-free inputs for the arithmetic). */
function everything(b: Backend, p: Problem, capacity: number, rawBits: number[]): Record<string, { dtype: string; shape: number[]; bits: number[] }> {
  const out: Record<string, { dtype: string; shape: number[]; bits: number[] }> = {};
  const put = (key: string, t: Tensor | undefined) => {
    if (t) out[key] = { dtype: t.dtype, shape: [...t.shape], bits: bitsOf(t) };
    else out[key] = { dtype: 'absent', shape: [], bits: [] };
  };
  const m = b.indicesToMultihot(i32([p.T, p.k], p.indices), f32([p.T, p.k], p.topProbs), p.E);
  put('multihot.routingMap', m.routingMap);
  put('multihot.probs', m.probs);
  const back = b.multihotToIndices(m.routingMap, { probs: m.probs });
  put('topk.indices', back.indices);
  put('topk.probs', back.probs);
  put('topk(k).indices', b.multihotToIndices(m.routingMap, { topk: p.k }).indices);

  const dense = f32([p.T, p.E], inputDense(p, refMultihot(p)));
  const tokens = tokensTensor(p.dtype, [p.T, p.H], p.tokens);
  const raw = tokensTensor(p.dtype, [p.T, p.H], rawBits);
  const shape = [p.T, p.H] as const;

  const perm = b.permute(tokens, m.routingMap, { probs: dense });
  for (const [k, v] of Object.entries(perm)) put(`permute.${k}`, v as Tensor);
  put('permute(raw bits).permutedTokens', b.permute(raw, m.routingMap).permutedTokens);
  put('unpermute(per-slot probs)', b.unpermute(perm.permutedTokens, perm.sortedIndices, shape, { probs: perm.permutedProbs }));
  put('unpermute(dense + routingMap)', b.unpermute(perm.permutedTokens, perm.sortedIndices, shape, { probs: dense, routingMap: m.routingMap }));
  put('unpermute(no probs)', b.unpermute(perm.permutedTokens, perm.sortedIndices, shape));

  const dp = b.permute(tokens, m.routingMap, { probs: dense, dropAndPad: true, numOutTokens: capacity * p.E });
  for (const [k, v] of Object.entries(dp)) put(`permute(dropAndPad).${k}`, v as Tensor);
  put('permute(dropAndPad, raw bits).permutedTokens', b.permute(raw, m.routingMap, { dropAndPad: true, numOutTokens: capacity * p.E }).permutedTokens);
  put('unpermute(dropAndPad, dense + routingMap)', b.unpermute(dp.permutedTokens, dp.sortedIndices, shape, { probs: dense, routingMap: m.routingMap, dropAndPad: true }));
  put('unpermute(dropAndPad, per-slot probs)', b.unpermute(dp.permutedTokens, dp.sortedIndices, shape, { probs: dp.permutedProbs, dropAndPad: true }));
  put('unpermute(dropAndPad, no probs)', b.unpermute(dp.permutedTokens, dp.sortedIndices, shape, { dropAndPad: true }));
  return out;
}

describe('(a) cpu and wasm agree bit for bit', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  if (!cpu || !wasm) {
    it.skip(`needs both cpu and wasm; missing: ${[!cpu && 'cpu', !wasm && 'wasm'].filter(Boolean).join(', ')}`, () => {});
    return;
  }
  it('on every op and option combination', () => {
    const arb = problemArb(['ints', 'floats']).chain((p) => fc.tuple(fc.constant(p), fc.nat(), fc.array(tokenArb(p.dtype, 'bits'), { minLength: p.T * p.H, maxLength: p.T * p.H })));
    fc.assert(
      fc.property(arb, ([p, c, raw]) => {
        const capacity = c % (p.T + 1);
        expect(everything(wasm, p, capacity, raw)).toEqual(everything(cpu, p, capacity, raw));
      }),
      params(EDGES.map((p) => [[p, p.T, p.tokens]] as [[Problem, number, number[]]])),
    );
  });
});

// ---------------------------------------------------------------------------------------
// The library's 16-bit conversions (used to build inputs everywhere) against the rounding here.

describe('tensor helpers', () => {
  it('toBFloat16Bits and toFloat16Bits round to nearest even like an independent implementation', () => {
    fc.assert(
      fc.property(fc.float({ noNaN: true }), (x) => {
        expect(toBFloat16Bits(x), `bf16(${x})`).toBe(bf16Bits(x));
        expect(toFloat16Bits(x), `f16(${x})`).toBe(f16Bits(x));
      }),
      { seed: SEED, numRuns: 2000, examples: [[0], [-0], [65504], [65519.99], [65520], [2 ** -24], [2 ** -25], [3 * 2 ** -26], [1 + 2 ** -8], [1 + 3 * 2 ** -8], [Infinity], [-Infinity]] },
    );
  });
});
