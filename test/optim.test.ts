/**
 * AdamW (ts/optim.ts), on every available backend:
 *
 * - against torch.optim.AdamW with clip_grad_norm_ (test/fixtures/optim/adamw.json, written by
 *   scripts/optim_fixture.py): float32 weights within float32 rounding of torch's float64 run,
 *   the gradient norms to float64 rounding, over several steps with decay, clipping, no decay
 *   for 1-d tensors;
 * - the gradient norm's fixed order against a plain float64 sum;
 * - mixed precision: a bfloat16 parameter is its float32 master rounded, and the master takes
 *   exactly the steps a float32 parameter starting from the same values takes;
 * - non-finite gradients: nothing is written, the step count stays; 'error' throws, 'skip' counts;
 * - argument errors name the argument.
 * (The cuda backend's device path is checked against this one bit for bit in test/gpu/optim.test.mjs.)
 */
import { readFileSync } from 'node:fs';

import { describe, expect, it } from 'vitest';

import { tensor, toNumbers, type Tensor, type TokenDType } from '../ts/index.js';
import { AdamW, chunkSquareSums, sumOfChunks, type AdamWOptions } from '../ts/optim.js';
import { mseLoss } from '../ts/training.js';
import { backendRows, registerBackendReport } from './backends.js';
import { bitsOf, expectThrows, rng } from './util.js';

registerBackendReport();

interface Case {
  name: string;
  options: AdamWOptions;
  shapes: Record<string, number[]>;
  init: Record<string, number[]>;
  grads: Record<string, number[]>[];
  torch: Record<'float64' | 'float32', { params: Record<string, number[]>; norms: number[] }>;
}

const fixture = JSON.parse(readFileSync(new URL('./fixtures/optim/adamw.json', import.meta.url), 'utf8')) as { cases: Case[] };

const f32Tensor = (shape: number[], values: number[]): Tensor<'float32'> => tensor('float32', shape, values) as Tensor<'float32'>;

function randomValues(n: number, seed: number, scale = 1): number[] {
  const r = rng(seed);
  return Array.from({ length: n }, () => Math.fround((r() * 2 - 1) * scale));
}

describe.each(backendRows)('AdamW on %s', (_name, moe) => {
  it.each(fixture.cases.map((c) => [c.name, c] as const))('matches torch.optim.AdamW + clip_grad_norm_ (%s)', (_n, c) => {
    const params = Object.fromEntries(Object.entries(c.shapes).map(([k, s]) => [k, f32Tensor(s, c.init[k])]));
    const opt = new AdamW(moe, params, c.options);
    const norms: number[] = [];
    for (const g of c.grads) {
      opt.step(Object.fromEntries(Object.entries(c.shapes).map(([k, s]) => [k, f32Tensor(s, g[k])])));
      norms.push(opt.status().gradNorm);
    }
    expect(opt.status()).toMatchObject({ step: c.grads.length, skipped: 0, applied: true });
    for (const [k, p] of Object.entries(params)) {
      const got = toNumbers(p);
      const want = c.torch.float64.params[k];
      const bad = got.map((v, i) => [i, v, want[i]] as const).filter(([, v, w]) => Math.abs(v - w) > 2e-6 * Math.max(1, Math.abs(w)));
      expect(bad, `${c.name}: ${k} (index, ours, torch float64)`).toEqual([]);
      // and torch's own float32 run is as close
      const t32 = c.torch.float32.params[k];
      expect(got.every((v, i) => Math.abs(v - t32[i]) <= 2e-6 * Math.max(1, Math.abs(t32[i])))).toBe(true);
    }
    if (c.options.maxGradNorm !== undefined) {
      c.torch.float64.norms.forEach((w, i) => {
        expect(Math.abs(norms[i] - w)).toBeLessThanOrEqual(1e-12 * w);
      });
    }
  });

  it('updates the weights in place and changes them (not a no-op)', () => {
    const w = f32Tensor([4, 3], randomValues(12, 1));
    const before = bitsOf(w);
    const opt = new AdamW(moe, { w }, { lr: 1e-2 });
    opt.step({ w: f32Tensor([4, 3], randomValues(12, 2)) });
    expect(bitsOf(w).filter((b, i) => b !== before[i]).length).toBe(12);
    expect(opt.masters.w.dtype).toBe('float32');
  });

  it('is deterministic: two optimizers given the same steps hold the same bits', () => {
    const run = () => {
      const w = f32Tensor([64, 40], randomValues(2560, 3));
      const b = f32Tensor([40], randomValues(40, 4));
      const opt = new AdamW(moe, { w, b }, { lr: 3e-3, maxGradNorm: 0.1, weightDecay: 0.05 });
      for (let s = 0; s < 3; s++) opt.step({ w: f32Tensor([64, 40], randomValues(2560, 10 + s)), b: f32Tensor([40], randomValues(40, 20 + s)) });
      return [...bitsOf(w), ...bitsOf(b)];
    };
    expect(run()).toEqual(run());
  });

  it.each(['bfloat16', 'float16'] as const)('a %s parameter is its float32 master rounded; the master steps as a float32 parameter would', (dtype) => {
    const shape = [8, 33];
    const low = tensor(dtype, shape, randomValues(264, 5)) as Tensor<TokenDType>;
    const ref = f32Tensor(shape, toNumbers(low));
    const o: AdamWOptions = { lr: 5e-3, weightDecay: 0.1, maxGradNorm: 0.7 };
    const optLow = new AdamW(moe, { p: low }, o);
    const optRef = new AdamW(moe, { p: ref }, o);
    for (let s = 0; s < 4; s++) {
      const g = randomValues(264, 30 + s, 2);
      optLow.step({ p: tensor(dtype, shape, g) as Tensor<TokenDType> });
      optRef.step({ p: f32Tensor(shape, toNumbers(tensor(dtype, shape, g))) });
    }
    expect(bitsOf(optLow.masters.p as Tensor)).toEqual(bitsOf(ref));
    expect(bitsOf(low)).toEqual(bitsOf(tensor(dtype, shape, toNumbers(ref))));
  });

  it("a non-finite gradient writes nothing: 'error' throws, 'skip' counts; the step count stays", () => {
    for (const mode of ['error', 'skip'] as const) {
      const init = randomValues(20, 6);
      const w = f32Tensor([4, 5], init);
      const opt = new AdamW(moe, { w }, { lr: 1e-2, onNonFinite: mode });
      const bad = randomValues(20, 7);
      bad[13] = Number.NaN;
      const before = bitsOf(w);
      if (mode === 'error') expectThrows(() => opt.step({ w: f32Tensor([4, 5], bad) }), RangeError, /step: the gradient norm is NaN .*no weight was changed/);
      else opt.step({ w: f32Tensor([4, 5], bad) });
      expect(bitsOf(w)).toEqual(before);
      expect(opt.status()).toMatchObject({ step: 0, skipped: 1, applied: false });
      // the next good step is the first step: what a fresh optimizer does with it
      const good = randomValues(20, 8);
      opt.step({ w: f32Tensor([4, 5], good) });
      const fresh = f32Tensor([4, 5], init);
      new AdamW(moe, { fresh }, { lr: 1e-2 }).step({ fresh: f32Tensor([4, 5], good) });
      expect(bitsOf(w)).toEqual(bitsOf(fresh));
      expect(opt.status()).toMatchObject({ step: 1, skipped: 1, applied: true });
    }
  });

  it('weight decay skips 1-d tensors unless decayBiases', () => {
    const zeros = (n: number) => new Array(n).fill(0);
    const b = f32Tensor([6], randomValues(6, 9));
    const before = toNumbers(b);
    // a zero gradient: only the decay moves a weight
    new AdamW(moe, { b }, { lr: 0.1, weightDecay: 0.5 }).step({ b: f32Tensor([6], zeros(6)) });
    expect(toNumbers(b)).toEqual(before);
    new AdamW(moe, { b }, { lr: 0.1, weightDecay: 0.5, decayBiases: true }).step({ b: f32Tensor([6], zeros(6)) });
    expect(toNumbers(b)).toEqual(before.map((v) => Math.fround(v * Math.fround(1 - 0.1 * 0.5))));
  });

  it('argument errors name the argument', () => {
    const w = f32Tensor([2, 2], [1, 2, 3, 4]);
    expectThrows(() => new AdamW(moe, { w }, {} as AdamWOptions), TypeError, /options\.lr: expected a finite number >= 0, got undefined/);
    expectThrows(() => new AdamW(moe, { w }, { lr: 1, beta1: 1 }), RangeError, /options\.beta1: expected a number in \[0, 1\), got 1/);
    expectThrows(() => new AdamW(moe, { w }, { lr: 1, maxGradNorm: 0 }), RangeError, /options\.maxGradNorm: expected a finite number > 0, got 0/);
    expectThrows(() => new AdamW(moe, { w }, { lr: 1, onNonFinite: 'ignore' as 'skip' }), TypeError, /options\.onNonFinite: expected 'error' or 'skip'/);
    expectThrows(() => new AdamW(moe, { w }, { lr: 1, lrr: 2 } as AdamWOptions), TypeError, /lrr/);
    expectThrows(() => new AdamW(moe, {}, { lr: 1 }), RangeError, /params: expected at least one tensor/);
    expectThrows(
      () => new AdamW(moe, { w: tensor('int32', [2], [1, 2]) as unknown as Tensor<'float32'> }, { lr: 1 }),
      TypeError,
      /params\.w: expected a float32, bfloat16 or float16 tensor, got int32/,
    );
    const opt = new AdamW(moe, { w }, { lr: 1 });
    expectThrows(() => opt.step({}), TypeError, /grads\.w: expected a gradient tensor, got undefined/);
    expectThrows(() => opt.step({ w: f32Tensor([4], [1, 2, 3, 4]) }), RangeError, /grads\.w\.shape: expected \[2, 2\] \(the parameter's\), got \[4\]/);
    expectThrows(() => opt.step({ w, v: w }), TypeError, /grads\.v: not a parameter of this optimizer \(it has w\)/);
    expectThrows(() => opt.step({ w }, { lr: -1 }), RangeError, /options\.lr: expected a finite number >= 0, got -1/);
    opt.dispose();
    expectThrows(() => opt.step({ w }), TypeError, /step: the optimizer was disposed/);
  });
});

describe('the gradient norm', () => {
  it('is the float64 sum of squares in its fixed order, close to a plain sum', () => {
    // chunks of 65536 elements (256 lanes x 32 runs of 8), as kernels/train.cu's sum_squares
    for (const n of [0, 1, 7, 8, 9, 2049, 65_535, 65_536, 65_537, 300_000]) {
      const g = Float32Array.from(randomValues(n, n + 1, 3));
      const parts: number[] = [];
      chunkSquareSums(g, parts);
      expect(parts.length).toBe(Math.ceil(n / 65_536));
      let plain = 0;
      for (const v of g) plain += v * v;
      const ours = sumOfChunks(parts);
      expect(Math.abs(ours - plain)).toBeLessThanOrEqual(1e-10 * plain);
    }
  });
});

describe.each(backendRows)('mseLoss on %s', (_name, moe) => {
  it.each(['float32', 'bfloat16'] as const)('%s: the mean of the squared differences, and 2 (y - t) / n rounded once', (dtype) => {
    const y = tensor(dtype, [37, 65], randomValues(37 * 65, 41, 3)) as Tensor<TokenDType>;
    const t = tensor(dtype, [37, 65], randomValues(37 * 65, 42, 3)) as Tensor<TokenDType>;
    const { loss, grad } = mseLoss(moe, y, t);
    const [a, b] = [toNumbers(y), toNumbers(t)];
    const want = a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0) / a.length;
    expect(Math.abs(loss - want)).toBeLessThanOrEqual(1e-12 * want);
    expect(bitsOf(grad as Tensor)).toEqual(
      bitsOf(
        tensor(
          dtype,
          [37, 65],
          a.map((v, i) => (2 * (v - b[i])) / a.length),
        ),
      ),
    );
  });
  it('names a bad argument', () => {
    const y = f32Tensor([2, 2], [1, 2, 3, 4]);
    expectThrows(() => mseLoss(moe, y, f32Tensor([4], [1, 2, 3, 4])), RangeError, /mseLoss: target\.shape: expected \[2, 2\] \(y's\), got \[4\]/);
    expectThrows(() => mseLoss(moe, y, tensor('bfloat16', [2, 2], [1, 2, 3, 4]) as Tensor<TokenDType>), TypeError, /mseLoss: target\.dtype: expected float32 \(y's\), got bfloat16/);
    expectThrows(() => mseLoss(moe, y, null as unknown as Tensor<TokenDType>), TypeError, /mseLoss: target: expected a float32, bfloat16 or float16 tensor, got null/);
  });
});
