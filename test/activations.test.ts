/**
 * Expert activations (activation / activationBackward), on every available backend:
 *
 * - golden: every case of `swiglu.json` (Megatron-Core swiglu, weighted_swiglu, swiglu_back,
 *   weighted_swiglu_back) and `expert_activation.json` (quick_geglu, swiglu_oai, swiglu_clamped,
 *   relu2 forwards), float32 within 1e-5 relative;
 * - gradients: every kind, with and without probs, against central finite differences of a
 *   float64 forward written here (independent of the library), clamps cutting included;
 * - 16-bit inputs: the result is the float32 result rounded once;
 * - cpu and wasm agree bit for bit on random inputs (fast-check, fixed seed);
 * - errors: class and message (`<op>: <argument>`) for every invalid option.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { tensor, type ActivationKind, type ActivationOptions, type Backend, type Tensor, type TokenDType } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { input, loadGolden, output, toTensor, type GoldenCase, type GoldenTensor } from './golden-loader.js';
import {
  bf16Bits,
  bf16Value,
  decode,
  encode,
  expectF32Close,
  expectHalfWithinUlps,
  expectMeta,
  expectSameBits,
  f16Bits,
  mismatches,
  type FloatDType,
  rng,
  activationUnit64,
  ACTIVATION_DEFAULTS,
  sigmoid64,
  type ActivationOpts,
  itThrowsEach,
  type OpErrorCase,
} from './util.js';

const SEED = Number(process.env.MOE_FC_SEED ?? 0xac71_2025);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 60);

const KINDS: readonly ActivationKind[] = ['swiglu', 'quick_geglu', 'swiglu_oai', 'swiglu_clamped', 'relu2'];
const GATED: Record<ActivationKind, boolean> = { swiglu: true, quick_geglu: true, swiglu_oai: true, swiglu_clamped: true, relu2: false };
const DTYPES: readonly FloatDType[] = ['float32', 'bfloat16', 'float16'];

const f32 = (shape: number[], values: ArrayLike<number>) => tensor('float32', shape, Float32Array.from(values));

registerBackendReport();

// ---------------------------------------------------------------------------------------
// The float64 reference, written from the formulas (not from the library).

/** Indices of the gate and up values of output column j in a row of width `width`. */
function columns(kind: ActivationKind, width: number, j: number): [number, number] {
  if (kind === 'quick_geglu') return [2 * j, 2 * j + 1];
  if (!GATED[kind]) return [j, -1];
  return [j, width / 2 + j];
}

/** forward(x [N, W], probs [N] | null) -> [N, I], all in float64. */
function forward64(kind: ActivationKind, x: ArrayLike<number>, N: number, W: number, probs: ArrayLike<number> | null, o: ActivationOpts): number[] {
  const I = GATED[kind] ? W / 2 : W;
  const out: number[] = [];
  for (let r = 0; r < N; r++) {
    for (let j = 0; j < I; j++) {
      const [gi, ui] = columns(kind, W, j);
      const a = activationUnit64(kind, x[r * W + gi], ui < 0 ? 0 : x[r * W + ui], o);
      out.push(probs ? a * probs[r] : a);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Golden cases.

function goldenCases(op: string): { cases: GoldenCase[]; error?: string } {
  const g = loadGolden(op);
  return { cases: g.file?.cases ?? [], error: g.error };
}

const swigluGolden = goldenCases('swiglu');
const expertGolden = goldenCases('expert_activation');

/** Columns [from, to) of a [N, W] golden tensor, as a float32 tensor. */
function columnsOf(g: GoldenTensor, from: number, to: number): Tensor<'float32'> {
  const [N, W] = g.shape;
  const data: number[] = [];
  for (let r = 0; r < N; r++) data.push(...g.data.slice(r * W + from, r * W + to));
  return f32([N, to - from], data);
}

describe('golden files', () => {
  it('swiglu.json and expert_activation.json are present and hold cases', () => {
    expect(swigluGolden.error, 'swiglu.json').toBeUndefined();
    expect(expertGolden.error, 'expert_activation.json').toBeUndefined();
    expect(swigluGolden.cases.length).toBeGreaterThanOrEqual(5);
    expect(expertGolden.cases.length).toBeGreaterThanOrEqual(5);
    // Some case reaches past the limit, so the clamps are exercised by the golden comparison.
    expect(expertGolden.cases.some((c) => input(c, 'x').data.some((v) => Math.abs(v) > (c.params.limit as number)))).toBe(true);
  });
});

const REL = 1e-5;

describe.each(backendRows)('golden swiglu on %s', (_name, b) => {
  for (const c of swigluGolden.cases) {
    it(c.name, () => {
      const y = toTensor(input(c, 'y')) as Tensor<'float32'>;
      const w = toTensor(input(c, 'weights')) as Tensor<'float32'>;
      const grad = toTensor(input(c, 'grad')) as Tensor<'float32'>;
      const [N] = y.shape;
      const wFlat = f32([N], w.data);

      const plain = output(c, 'swiglu');
      expectF32Close(b.activation(y, { kind: 'swiglu' }), plain.shape, plain.data, REL, 'swiglu');
      const weighted = output(c, 'weighted_swiglu');
      expectF32Close(b.activation(y, { kind: 'swiglu', probs: w }), weighted.shape, weighted.data, REL, 'weighted_swiglu ([N, 1] probs)');
      expectF32Close(b.activation(y, { kind: 'swiglu', probs: wFlat }), weighted.shape, weighted.data, REL, 'weighted_swiglu ([N] probs)');

      const back = b.activationBackward(grad, y, { kind: 'swiglu' });
      const wantBack = output(c, 'swiglu_back');
      expectF32Close(back.gradInput, wantBack.shape, wantBack.data, REL, 'swiglu_back');
      expect('gradProbs' in back, 'no gradProbs without probs').toBe(false);

      const wantIn = output(c, 'weighted_swiglu_back_input');
      const wantW = output(c, 'weighted_swiglu_back_weights');
      const wb = b.activationBackward(grad, y, { kind: 'swiglu', probs: w });
      expectF32Close(wb.gradInput, wantIn.shape, wantIn.data, REL, 'weighted_swiglu_back input');
      expect(wb.gradProbs, 'gradProbs').toBeDefined();
      expectF32Close(wb.gradProbs!, wantW.shape, wantW.data, REL, 'weighted_swiglu_back weights');
      const wbFlat = b.activationBackward(grad, y, { kind: 'swiglu', probs: wFlat });
      expectF32Close(wbFlat.gradProbs!, [N], wantW.data, REL, 'weighted_swiglu_back weights ([N] probs)');
      expectSameBits(wbFlat.gradInput, wb.gradInput, 'gradInput with [N] and [N, 1] probs');
    });
  }
});

describe.each(backendRows)('golden expert_activation on %s', (_name, b) => {
  for (const c of expertGolden.cases) {
    it(c.name, () => {
      const x = input(c, 'x');
      const [N, W] = x.shape;
      const xt = toTensor(x) as Tensor<'float32'>;
      const probs = toTensor(input(c, 'probs')) as Tensor<'float32'>;
      const { alpha, limit, linear_offset: linearOffset } = c.params as { alpha: number; limit: number; linear_offset: number };
      const check = (got: Tensor, key: string) => {
        const want = output(c, key);
        expectF32Close(got, want.shape, want.data, REL, key);
      };
      check(b.activation(xt, { kind: 'quick_geglu', probs, alpha, limit, linearOffset }), 'quick_geglu_interleaved');
      check(b.activation(xt, { kind: 'swiglu_oai', probs, alpha, limit, linearOffset }), 'swiglu_oai_concat');
      check(b.activation(xt, { kind: 'swiglu_clamped', probs, limit }), 'swiglu_clamped_concat');
      // The note: relu2 reads x[:, :H] with H = W / 2.
      check(b.activation(columnsOf(x, 0, W / 2), { kind: 'relu2', probs }), 'relu2');
      expect(N).toBeGreaterThan(0);

      // The case uses the default options, so leaving them out gives the same bits.
      expect({ alpha, limit, linearOffset }).toEqual({ alpha: 1.702, limit: 7, linearOffset: 1 });
      expectSameBits(b.activation(xt, { kind: 'quick_geglu', probs }), b.activation(xt, { kind: 'quick_geglu', probs, alpha, limit, linearOffset }), 'quick_geglu defaults');
      expectSameBits(b.activation(xt, { kind: 'swiglu_oai', probs }), b.activation(xt, { kind: 'swiglu_oai', probs, alpha, limit, linearOffset }), 'swiglu_oai defaults');
      expectSameBits(b.activation(xt, { kind: 'swiglu_clamped', probs }), b.activation(xt, { kind: 'swiglu_clamped', probs, limit }), 'swiglu_clamped defaults');
    });
  }
});

// ---------------------------------------------------------------------------------------
// Gradients against central finite differences of the float64 forward.

interface GradCase {
  title: string;
  kind: ActivationKind;
  opts: Partial<ActivationOpts>;
  /** Inputs are drawn from [-spread, spread]. */
  spread: number;
}

const GRAD_CASES: GradCase[] = [
  { title: 'swiglu', kind: 'swiglu', opts: {}, spread: 4 },
  { title: 'quick_geglu defaults', kind: 'quick_geglu', opts: {}, spread: 10 },
  { title: 'quick_geglu alpha 0.8, limit 2.5, linearOffset -0.5', kind: 'quick_geglu', opts: { alpha: 0.8, limit: 2.5, linearOffset: -0.5 }, spread: 4 },
  { title: 'swiglu_oai defaults', kind: 'swiglu_oai', opts: {}, spread: 10 },
  { title: 'swiglu_oai alpha 2.5, limit 1.5, linearOffset 0.25', kind: 'swiglu_oai', opts: { alpha: 2.5, limit: 1.5, linearOffset: 0.25 }, spread: 3 },
  { title: 'swiglu_clamped defaults', kind: 'swiglu_clamped', opts: {}, spread: 10 },
  { title: 'swiglu_clamped limit 2', kind: 'swiglu_clamped', opts: { limit: 2 }, spread: 4 },
  { title: 'relu2', kind: 'relu2', opts: {}, spread: 3 },
];

type ProbsMode = 'none' | '[N]' | '[N, 1]';
const PROBS_MODES: readonly ProbsMode[] = ['none', '[N]', '[N, 1]'];

/** Random float32 inputs that keep a finite-difference step away from the kinks (clamp bounds, 0 for relu2). */
function gradInputs(gc: GradCase, seed: number) {
  const rand = rng(seed);
  const o: ActivationOpts = { ...ACTIVATION_DEFAULTS, ...gc.opts };
  const N = 3;
  const I = 4;
  const W = GATED[gc.kind] ? 2 * I : I;
  const kinks = gc.kind === 'relu2' ? [0] : gc.kind === 'swiglu' ? [] : [o.limit, -o.limit];
  const x: number[] = [];
  while (x.length < N * W) {
    const v = Math.fround((2 * rand() - 1) * gc.spread);
    if (kinks.every((k) => Math.abs(v - k) > 0.05)) x.push(v);
  }
  const grad = Array.from({ length: N * I }, () => Math.fround(2 * rand() - 1));
  const probs = Array.from({ length: N }, () => Math.fround(2 * rand() - 0.5));
  return { o, N, I, W, x, grad, probs };
}

describe.each(backendRows)('gradients vs finite differences on %s', (_name, b) => {
  for (const gc of GRAD_CASES) {
    for (const mode of PROBS_MODES) {
      it(`${gc.title}, probs ${mode}`, () => {
        for (const seed of [1, 2, 3]) {
          const { o, N, I, W, x, grad, probs } = gradInputs(gc, seed * 7919 + gc.title.length);
          const p = mode === 'none' ? null : probs;
          const loss = (xs: number[], ps: number[] | null) => forward64(gc.kind, xs, N, W, ps, o).reduce((s, v, i) => s + v * grad[i], 0);
          const h = 1e-6;
          const fdX = x.map((_, i) => {
            const xp = [...x];
            const xm = [...x];
            xp[i] += h;
            xm[i] -= h;
            return (loss(xp, p) - loss(xm, p)) / (2 * h);
          });
          const options: ActivationOptions = { kind: gc.kind, ...gc.opts };
          if (mode !== 'none') options.probs = f32(mode === '[N]' ? [N] : [N, 1], probs);
          const out = b.activationBackward(f32([N, I], grad), f32([N, W], x), options);
          expectMeta(out.gradInput, 'float32', [N, W], 'gradInput');
          const scale = Math.max(1e-3, ...fdX.map(Math.abs));
          const ok = (g: number, w: number) => Math.abs(g - w) <= 2e-5 * Math.abs(w) + 2e-6 * scale;
          expect(mismatches(out.gradInput.data as Float32Array, fdX, ok), `gradInput, seed ${seed}`).toEqual([]);
          if (p) {
            const fdP = probs.map((_, r) => {
              const pp = [...probs];
              const pm = [...probs];
              pp[r] += h;
              pm[r] -= h;
              return (loss(x, pp) - loss(x, pm)) / (2 * h);
            });
            expect(out.gradProbs, 'gradProbs').toBeDefined();
            expectMeta(out.gradProbs!, 'float32', mode === '[N]' ? [N] : [N, 1], 'gradProbs');
            const pscale = Math.max(1e-3, ...fdP.map(Math.abs));
            const okP = (g: number, w: number) => Math.abs(g - w) <= 2e-5 * Math.abs(w) + 2e-6 * pscale;
            expect(mismatches(out.gradProbs!.data as Float32Array, fdP, okP), `gradProbs, seed ${seed}`).toEqual([]);
          } else {
            expect('gradProbs' in out, 'no gradProbs without probs').toBe(false);
          }
          // The data cross the clamps (or relu2's 0), so the zero-gradient side is covered too.
          if (gc.kind !== 'swiglu') expect(fdX.some((v) => v === 0)).toBe(true);
        }
      });
    }
  }

  it('the forward matches the float64 reference (1e-5 relative) for every kind', () => {
    for (const gc of GRAD_CASES) {
      const { o, N, I, W, x, probs } = gradInputs(gc, 99);
      const want = forward64(gc.kind, x, N, W, probs, o);
      expectF32Close(b.activation(f32([N, W], x), { kind: gc.kind, ...gc.opts, probs: f32([N], probs) }), [N, I], want, 1e-5, gc.title);
    }
  });

  it('clamp boundaries: the gradient passes at exactly +-limit and stops just beyond', () => {
    const limit = 2;
    const beyond = Math.fround(2 * (1 + 2 ** -20));
    // One row, inter 3: (gate, up) = (limit, limit), (limit, -limit), (beyond, -beyond).
    const gates = [limit, limit, beyond];
    const ups = [limit, -limit, -beyond];
    const o: ActivationOpts = { ...ACTIVATION_DEFAULTS, limit };
    for (const kind of ['quick_geglu', 'swiglu_oai', 'swiglu_clamped'] as const) {
      const x = kind === 'quick_geglu' ? gates.flatMap((g, j) => [g, ups[j]]) : [...gates, ...ups];
      const out = b.activationBackward(f32([1, 3], [1, 1, 1]), f32([1, 6], x), { kind, limit }).gradInput.data as Float32Array;
      const at = (j: number): [number, number] => {
        const [gi, ui] = columns(kind, 6, j);
        return [out[gi], out[ui]];
      };
      // The one-sided derivative from inside the range (a left difference at +limit, right at -limit).
      const h = 1e-7;
      const dGate = (g: number, u: number) => (activationUnit64(kind, g, u, o) - activationUnit64(kind, g - h, u, o)) / h;
      const dUp = (g: number, u: number, dir: number) => (activationUnit64(kind, g, u, o) - activationUnit64(kind, g, u - dir * h, o)) / (dir * h);
      for (const j of [0, 1]) {
        const [dg, du] = at(j);
        expect(Math.abs(dg - dGate(gates[j], ups[j])), `${kind} d gate at gate = limit (column ${j})`).toBeLessThan(1e-4);
        expect(Math.abs(du - dUp(gates[j], ups[j], Math.sign(ups[j]))), `${kind} d up at up = ${ups[j]} (column ${j})`).toBeLessThan(1e-4);
        expect(dg, 'nonzero').not.toBe(0);
        expect(du, 'nonzero').not.toBe(0);
      }
      expect(at(2), `${kind} beyond the limit`).toEqual([0, 0]);
    }
    // relu2 at 0 and just above.
    const r = b.activationBackward(f32([1, 2], [1, 1]), f32([1, 2], [0, 2 ** -20]), { kind: 'relu2' }).gradInput.data;
    expect(Array.from(r)).toEqual([0, 2 * 2 ** -20]);
  });
});

// ---------------------------------------------------------------------------------------
// 16-bit inputs: compute in float32, round once.

const roundTo = (dtype: FloatDType, v: number) => (dtype === 'bfloat16' ? bf16Bits(v) : f16Bits(v));

describe.each(backendRows)('16-bit inputs on %s', (_name, b) => {
  for (const dtype of ['bfloat16', 'float16'] as const) {
    for (const kind of KINDS) {
      it(`${kind} ${dtype}: the float32 result on the same values, rounded once`, () => {
        const rand = rng(kind.length * 31 + dtype.length);
        const N = 4;
        const I = 5;
        const W = GATED[kind] ? 2 * I : I;
        const xStored = Array.from({ length: N * W }, () => encode(dtype, (2 * rand() - 1) * 9));
        const gStored = Array.from({ length: N * I }, () => encode(dtype, 2 * rand() - 1));
        const xv = xStored.map((s) => decode(dtype, s));
        const gv = gStored.map((s) => decode(dtype, s));
        const probs = f32(
          [N, 1],
          Array.from({ length: N }, () => rand()),
        );
        const x16 = tensor(dtype, [N, W], Uint16Array.from(xStored));
        const g16 = tensor(dtype, [N, I], Uint16Array.from(gStored));

        const fwd16 = b.activation(x16, { kind, probs });
        const fwd32 = b.activation(f32([N, W], xv), { kind, probs });
        expectMeta(fwd16, dtype, [N, I], 'forward');
        expect(
          mismatches(
            fwd16.data as Uint16Array,
            Array.from(fwd32.data as Float32Array, (v) => roundTo(dtype, v)),
            (g, w) => g === w,
          ),
          'forward bits',
        ).toEqual([]);
        // And the float32 path is right (against float64, within 1 ulp of the 16-bit format).
        const ref = forward64(kind, xv, N, W, Array.from(probs.data), ACTIVATION_DEFAULTS);
        expectHalfWithinUlps(
          fwd16,
          dtype,
          [N, I],
          ref.map((v) => roundTo(dtype, v)),
          1,
          'forward vs float64',
        );

        const back16 = b.activationBackward(g16, x16, { kind, probs });
        const back32 = b.activationBackward(f32([N, I], gv), f32([N, W], xv), { kind, probs });
        expectMeta(back16.gradInput, dtype, [N, W], 'gradInput');
        expect(
          mismatches(
            back16.gradInput.data as Uint16Array,
            Array.from(back32.gradInput.data as Float32Array, (v) => roundTo(dtype, v)),
            (g, w) => g === w,
          ),
          'gradInput bits',
        ).toEqual([]);
        expectSameBits(back16.gradProbs!, back32.gradProbs!, 'gradProbs (float32 from the same values)');
      });
    }
  }
});

// ---------------------------------------------------------------------------------------
// cpu and wasm agree bit for bit.

describe('cpu and wasm agree bit for bit', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  if (!cpu || !wasm) {
    it.skip(`needs both cpu and wasm; missing: ${[!cpu && 'cpu', !wasm && 'wasm'].filter(Boolean).join(', ')}`, () => {});
    return;
  }
  const problem = fc
    .record({
      kind: fc.constantFrom(...KINDS),
      dtype: fc.constantFrom(...DTYPES),
      N: fc.integer({ min: 0, max: 6 }),
      I: fc.integer({ min: 0, max: 9 }),
      probs: fc.constantFrom<ProbsMode>(...PROBS_MODES),
      alpha: fc.option(fc.double({ min: -3, max: 3, noNaN: true }), { nil: undefined }),
      limit: fc.option(fc.double({ min: 0.25, max: 12, noNaN: true }), { nil: undefined }),
      linearOffset: fc.option(fc.double({ min: -2, max: 2, noNaN: true }), { nil: undefined }),
    })
    .chain((s) => {
      const W = GATED[s.kind] ? 2 * s.I : s.I;
      const value = fc.float({ min: -20, max: 20, noNaN: true });
      return fc.record({
        s: fc.constant(s),
        x: fc.array(value, { minLength: s.N * W, maxLength: s.N * W }),
        grad: fc.array(fc.float({ min: -4, max: 4, noNaN: true }), { minLength: s.N * s.I, maxLength: s.N * s.I }),
        probs: fc.array(fc.float({ min: -2, max: 2, noNaN: true }), { minLength: s.N, maxLength: s.N }),
      });
    });

  it('activation and activationBackward, every kind, dtype and option', () => {
    fc.assert(
      fc.property(problem, ({ s, x, grad, probs }) => {
        const W = GATED[s.kind] ? 2 * s.I : s.I;
        const make = (shape: number[], values: number[]) =>
          s.dtype === 'float32'
            ? f32(shape, values)
            : tensor(
                s.dtype as TokenDType,
                shape,
                Uint16Array.from(values, (v) => encode(s.dtype, v)),
              );
        const options: ActivationOptions = { kind: s.kind };
        if (s.probs !== 'none') options.probs = f32(s.probs === '[N]' ? [s.N] : [s.N, 1], probs);
        if (s.kind === 'quick_geglu' || s.kind === 'swiglu_oai') Object.assign(options, { alpha: s.alpha, linearOffset: s.linearOffset });
        if (s.kind !== 'swiglu' && s.kind !== 'relu2') options.limit = s.limit;
        const xt = make([s.N, W], x);
        const gt = make([s.N, s.I], grad);
        expectSameBits(wasm.activation(xt, options), cpu.activation(xt, options), 'activation');
        const a = wasm.activationBackward(gt, xt, options);
        const c = cpu.activationBackward(gt, xt, options);
        expectSameBits(a.gradInput, c.gradInput, 'gradInput');
        expect('gradProbs' in a).toBe('gradProbs' in c);
        if (c.gradProbs) expectSameBits(a.gradProbs!, c.gradProbs, 'gradProbs');
      }),
      { seed: SEED, numRuns: RUNS },
    );
  });

  it('a large input (the native row loop on several threads) gives the same bits as wasm', () => {
    const rand = rng(4242);
    const N = 2048;
    const I = 160; // 2048 * 320 * 4 bytes in, enough for the threaded path
    for (const kind of ['swiglu', 'quick_geglu'] as const) {
      const x = f32(
        [N, 2 * I],
        Array.from({ length: N * 2 * I }, () => (2 * rand() - 1) * 10),
      );
      const g = f32(
        [N, I],
        Array.from({ length: N * I }, () => 2 * rand() - 1),
      );
      const probs = f32(
        [N],
        Array.from({ length: N }, () => rand()),
      );
      expectSameBits(wasm.activation(x, { kind, probs }), cpu.activation(x, { kind, probs }), `${kind} forward`);
      const a = wasm.activationBackward(g, x, { kind, probs });
      const c = cpu.activationBackward(g, x, { kind, probs });
      expectSameBits(a.gradInput, c.gradInput, `${kind} gradInput`);
      expectSameBits(a.gradProbs!, c.gradProbs!, `${kind} gradProbs`);
    }
  });
});

// ---------------------------------------------------------------------------------------
// Errors.

const X = f32([2, 4], [1, -2, 3, 0.5, -1, 2, 8, -9]);
const G = f32([2, 2], [1, -1, 0.5, 2]);
const P = f32([2, 1], [0.5, 0.25]);

type ErrCase = OpErrorCase<'activation' | 'activationBackward'>;

const fwd =
  (options: unknown, x: unknown = X) =>
  (b: Backend) =>
    b.activation(x as never, options as never);
const bwd =
  (options: unknown, grad: unknown = G, x: unknown = X) =>
  (b: Backend) =>
    b.activationBackward(grad as never, x as never, options as never);

const ERRORS: ErrCase[] = [
  // kind
  { title: 'no options (kind is required)', op: 'activation', arg: 'kind', cls: TypeError, detail: /'swiglu'.*got undefined/, call: fwd(undefined) },
  { title: 'options without kind', op: 'activation', arg: 'kind', cls: TypeError, call: fwd({ probs: P }) },
  { title: 'backward without kind', op: 'activationBackward', arg: 'kind', cls: TypeError, call: bwd({}) },
  { title: "kind 'gelu'", op: 'activation', arg: 'kind', cls: RangeError, detail: /'gelu'/, call: fwd({ kind: 'gelu' }) },
  { title: "kind 'SwiGLU' (names are exact)", op: 'activationBackward', arg: 'kind', cls: RangeError, call: bwd({ kind: 'SwiGLU' }) },
  { title: 'kind a number', op: 'activation', arg: ['options.kind', 'kind'], cls: TypeError, call: fwd({ kind: 3 }) },
  // unknown / misplaced options
  { title: 'an unknown option', op: 'activation', arg: 'options.limits', cls: TypeError, detail: /not an option of activation/, call: fwd({ kind: 'quick_geglu', limits: 3 }) },
  { title: 'options an array', op: 'activation', arg: 'options', cls: TypeError, call: fwd([]) },
  { title: 'alpha with swiglu', op: 'activation', arg: 'alpha', cls: TypeError, detail: /kind 'swiglu'.*got 1\.5/, call: fwd({ kind: 'swiglu', alpha: 1.5 }) },
  { title: 'limit with relu2', op: 'activationBackward', arg: 'limit', cls: TypeError, call: bwd({ kind: 'relu2', limit: 3 }, f32([2, 4], [1, 1, 1, 1, 1, 1, 1, 1])) },
  { title: 'linearOffset with swiglu_clamped', op: 'activation', arg: 'linearOffset', cls: TypeError, call: fwd({ kind: 'swiglu_clamped', linearOffset: 0 }) },
  { title: 'alpha with swiglu_clamped', op: 'activation', arg: 'alpha', cls: TypeError, call: fwd({ kind: 'swiglu_clamped', alpha: 1 }) },
  // option values
  { title: 'limit 0', op: 'activation', arg: 'limit', cls: RangeError, detail: /positive/, call: fwd({ kind: 'quick_geglu', limit: 0 }) },
  { title: 'limit -7', op: 'activationBackward', arg: 'limit', cls: RangeError, call: bwd({ kind: 'swiglu_clamped', limit: -7 }) },
  { title: 'limit NaN', op: 'activation', arg: 'limit', cls: RangeError, call: fwd({ kind: 'swiglu_oai', limit: NaN }) },
  { title: 'limit Infinity', op: 'activation', arg: 'limit', cls: RangeError, detail: /finite/, call: fwd({ kind: 'swiglu_oai', limit: Infinity }) },
  { title: 'alpha beyond the float32 range', op: 'activation', arg: 'alpha', cls: RangeError, detail: /float32/, call: fwd({ kind: 'quick_geglu', alpha: 1e39 }) },
  { title: 'linearOffset NaN', op: 'activationBackward', arg: 'linearOffset', cls: RangeError, call: bwd({ kind: 'quick_geglu', linearOffset: NaN }) },
  { title: 'alpha a string', op: 'activation', arg: 'options.alpha', cls: TypeError, call: fwd({ kind: 'quick_geglu', alpha: '1.7' }) },
  { title: 'limit a string', op: 'activationBackward', arg: 'options.limit', cls: TypeError, call: bwd({ kind: 'quick_geglu', limit: '7' }) },
  // x
  { title: 'x of odd width for swiglu', op: 'activation', arg: 'x.shape', cls: RangeError, detail: /even/, call: fwd({ kind: 'swiglu' }, f32([2, 3], [1, 2, 3, 4, 5, 6])) },
  { title: 'x of odd width for quick_geglu', op: 'activationBackward', arg: 'x.shape', cls: RangeError, detail: /interleaved/, call: bwd({ kind: 'quick_geglu' }, G, f32([2, 3], [1, 2, 3, 4, 5, 6])) },
  { title: 'x of rank 1', op: 'activation', arg: 'x.shape', cls: TypeError, detail: /2-d/, call: fwd({ kind: 'relu2' }, f32([4], [1, 2, 3, 4])) },
  { title: 'x as int32', op: 'activation', arg: 'x.dtype', cls: TypeError, detail: /int32/, call: fwd({ kind: 'swiglu' }, tensor('int32', [2, 4])) },
  { title: 'x not a tensor', op: 'activation', arg: 'x', cls: TypeError, call: fwd({ kind: 'swiglu' }, new Float32Array(8)) },
  // probs
  { title: 'probs as bfloat16', op: 'activation', arg: 'probs.dtype', cls: TypeError, detail: /bfloat16/, call: fwd({ kind: 'swiglu', probs: tensor('bfloat16', [2, 1]) }) },
  { title: 'probs with a row too many', op: 'activation', arg: 'probs.shape', cls: RangeError, call: fwd({ kind: 'swiglu', probs: f32([3], [1, 1, 1]) }) },
  { title: 'probs [N, 2]', op: 'activationBackward', arg: 'probs.shape', cls: RangeError, call: bwd({ kind: 'swiglu', probs: f32([2, 2], [1, 1, 1, 1]) }) },
  { title: 'probs of rank 3', op: 'activation', arg: 'probs.shape', cls: TypeError, call: fwd({ kind: 'swiglu', probs: f32([2, 1, 1], [1, 1]) }) },
  // grad
  { title: 'grad of the wrong width', op: 'activationBackward', arg: 'grad.shape', cls: RangeError, detail: /\[2, 2\]/, call: bwd({ kind: 'swiglu' }, f32([2, 4], [1, 1, 1, 1, 1, 1, 1, 1])) },
  { title: 'grad of rank 1', op: 'activationBackward', arg: 'grad.shape', cls: TypeError, call: bwd({ kind: 'swiglu' }, f32([4], [1, 1, 1, 1])) },
  {
    title: 'grad of another dtype than x',
    op: 'activationBackward',
    arg: 'grad.dtype',
    cls: TypeError,
    detail: /float32 \(the dtype of x\).*bfloat16/,
    call: bwd({ kind: 'swiglu' }, tensor('bfloat16', [2, 2])),
  },
  { title: 'grad not a tensor', op: 'activationBackward', arg: 'grad', cls: TypeError, call: bwd({ kind: 'swiglu' }, null) },
];

describe.each(backendRows)('errors on %s', (_name, b) => {
  itThrowsEach(ERRORS, b, () => {
    // Still working, with a known answer: relu2 of [[3, -1]] * 0.5.
    expect(Array.from(b.activation(f32([1, 2], [3, -1]), { kind: 'relu2', probs: f32([1], [0.5]) }).data)).toEqual([4.5, 0]);
  });
});

// Keep the float64 helpers honest: the reference's sigmoid and bf16 rounding on known values.
describe('test helpers', () => {
  it('unit64 on hand-computed values', () => {
    expect(activationUnit64('swiglu', 0, 5, ACTIVATION_DEFAULTS)).toBe(0);
    expect(activationUnit64('relu2', -3, 0, ACTIVATION_DEFAULTS)).toBe(0);
    expect(activationUnit64('relu2', 3, 0, ACTIVATION_DEFAULTS)).toBe(9);
    expect(activationUnit64('swiglu_clamped', 100, 100, ACTIVATION_DEFAULTS)).toBeCloseTo(7 * sigmoid64(7) * 7, 12);
    expect(activationUnit64('quick_geglu', 100, -100, ACTIVATION_DEFAULTS)).toBeCloseTo(7 * sigmoid64(Math.fround(1.702) * 7) * (-7 + 1), 12);
    expect(bf16Value(bf16Bits(1 + 2 ** -9))).toBe(1);
  });
});
