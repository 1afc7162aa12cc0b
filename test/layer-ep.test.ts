/**
 * MoELayer across an expert-parallel group (forwardParallel / backwardParallel over ts/ep.ts), on
 * every backend with the in-process group: N ranks, each holding its share of the experts and
 * its own tokens. The reference is one layer with every expert: on each rank's tokens alone for
 * the output, the input's gradient, the router's and the shared expert's gradients and the
 * losses (a rank's tokens see the same computation, merged in ts/ep.ts's order), and on all
 * ranks' tokens at once for the experts' gradients (an expert's rows are the same rows in the
 * same order: source rank, then token).
 */
import { describe, expect, it } from 'vitest';

import {
  AdamW,
  createInProcessGroup,
  EXPERT_STACKED,
  ExpertParallelTimeoutError,
  MoELayer,
  reduceReplicatedGrads,
  tensor,
  toNumbers,
  type MoEForward,
  type MoEGrads,
  type MoELayerOptions,
  type MoEWeights,
  type Tensor,
} from '../ts/index.js';
import { backendRows, registerBackendReport } from './backends.js';
import { bf16Bits, mismatches, rng } from './util.js';

registerBackendReport();

/** The weights stacked by expert (the rest is every rank's). */
const EXPERT_KEYS = EXPERT_STACKED;

/** Rank `start..end`'s weights: its experts', and copies of the rest (each rank owns its copy, as on its own GPU). */
function sliceExperts(w: MoEWeights, start: number, end: number): MoEWeights {
  const out: Record<string, unknown> = {};
  for (const [key, t] of Object.entries(w)) if (t) out[key] = { ...t, data: (t as Tensor).data.slice() };
  for (const key of EXPERT_KEYS) {
    const t = w[key] as Tensor | undefined;
    if (!t) continue;
    const per = t.shape.slice(1).reduce((a, b) => a * b, 1);
    const data = (t.data as Float32Array | Uint16Array).slice(start * per, end * per);
    out[key] = tensor(t.dtype as 'float32', [end - start, ...t.shape.slice(1)], data as Float32Array);
  }
  return out as unknown as MoEWeights;
}

function concat(ts: Tensor[]): Tensor {
  const rowsOf = (t: Tensor) => t.shape[0];
  const data = new (ts[0].data.constructor as Float32ArrayConstructor)(ts.reduce((a, t) => a + t.data.length, 0));
  // (Float32Array or Uint16Array alike)
  let at = 0;
  for (const t of ts) {
    data.set(t.data as Float32Array, at);
    at += t.data.length;
  }
  return tensor(ts[0].dtype as 'float32', [ts.reduce((a, t) => a + rowsOf(t), 0), ...ts[0].shape.slice(1)], data);
}

function values(dtype: string, shape: number[], seed: number, scale: number): Tensor {
  const r = rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  const f = Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale);
  return dtype === 'float32'
    ? tensor('float32', shape, f)
    : tensor(
        'bfloat16',
        shape,
        Uint16Array.from(f, (v) => bf16Bits(v)),
      );
}

const CASES: { name: string; options: MoELayerOptions; ranks: number[]; tol: number }[] = [
  { name: 'swiglu, k=2, float32', options: { dim: 16, inter: 8, numExperts: 8, topk: 2, activation: 'swiglu' }, ranks: [1, 2, 4], tol: 1e-6 },
  {
    name: 'k=3, shared expert, aux and z losses, biases, sigmoid router',
    options: {
      dim: 16,
      inter: 8,
      numExperts: 6,
      topk: 3,
      activation: 'swiglu',
      scoreFunction: 'sigmoid',
      normTopkProb: true,
      sharedExpert: { inter: 8 },
      bias: true,
      auxLossCoeff: 0.01,
      zLossCoeff: 1e-3,
    },
    ranks: [2, 3],
    tol: 1e-5,
  },
  { name: 'bfloat16, relu2, k=1', options: { dim: 16, inter: 8, numExperts: 4, topk: 1, activation: 'relu2', dtype: 'bfloat16' }, ranks: [2, 4], tol: 1e-2 },
];

function close(got: ArrayLike<number>, want: ArrayLike<number>, tol: number): number[] {
  let scale = 1;
  for (let i = 0; i < want.length; i++) scale = Math.max(scale, Math.abs(want[i]));
  return mismatches(Array.from(got), Array.from(want), (a, b) => Math.abs(a - b) <= tol * scale);
}

describe.each(backendRows)('MoELayer.forwardParallel / backwardParallel on %s', (_name, moe) => {
  for (const c of CASES) {
    for (const N of c.ranks) {
      it(`${c.name}, ${N} ranks`, async () => {
        const whole = new MoELayer(moe!, { ...c.options, seed: 11, initStd: 0.3 });
        const dtype = whole.dtype;
        const xs = Array.from({ length: N }, (_, r) => values(dtype, [9 + 4 * r, c.options.dim], 100 + r, 1));
        const gs = xs.map((x, r) => values(dtype, x.shape, 200 + r, 0.1));
        const groups = createInProcessGroup(N, { timeoutMs: 20_000 });
        const layers = groups.map((g) => {
          const range = moe!.expertRangeForRank(c.options.numExperts, N, g.rank);
          return new MoELayer(moe!, { ...c.options, dtype, epSize: N, epRank: g.rank, weights: sliceExperts(whole.weights, range.start, range.end) });
        });
        const fs: MoEForward[] = await Promise.all(layers.map((l, r) => l.forwardParallel(groups[r], xs[r] as never)));
        const bs: MoEGrads[] = await Promise.all(layers.map((l, r) => l.backwardParallel(groups[r], gs[r] as never)));
        // each rank's tokens: the one-rank layer on them alone
        for (let r = 0; r < N; r++) {
          const wf = whole.forward(xs[r] as never);
          const wb = whole.backward(gs[r] as never);
          expect(close(toNumbers(fs[r].output), toNumbers(wf.output), c.tol), `rank ${r}: output`).toEqual([]);
          expect(close(toNumbers(bs[r].gradInput), toNumbers(wb.gradInput), c.tol), `rank ${r}: gradInput`).toEqual([]);
          expect(fs[r].auxLoss, `rank ${r}: aux loss`).toBe(wf.auxLoss);
          expect(fs[r].zLoss, `rank ${r}: z-loss`).toBe(wf.zLoss);
          expect(Array.from(fs[r].indices.data), `rank ${r}: picks`).toEqual(Array.from(wf.indices.data));
          for (const key of ['routerWeight', 'sharedGateAndUpProjs', 'sharedDownProjs'] as const) {
            if (!wb.grads[key]) continue;
            expect(close(toNumbers(bs[r].grads[key]!), toNumbers(wb.grads[key]!), c.tol), `rank ${r}: grads.${key}`).toEqual([]);
          }
        }
        // the experts' gradients: the one-rank layer on every rank's tokens at once, sliced to each rank's experts
        whole.forward(concat(xs) as never);
        const all = whole.backward(concat(gs) as never);
        for (let r = 0; r < N; r++) {
          const range = moe!.expertRangeForRank(c.options.numExperts, N, r);
          const want = sliceExperts(all.grads, range.start, range.end);
          for (const key of EXPERT_KEYS) {
            if (!want[key]) continue;
            expect(close(toNumbers(bs[r].grads[key]!), toNumbers(want[key]!), c.tol), `rank ${r}: grads.${key}`).toEqual([]);
          }
        }
      });
    }
  }

  it('training: 3 ranks (forwardParallel, backwardParallel, reduceReplicatedGrads, AdamW each) = one layer on every token', async () => {
    const options: MoELayerOptions = { dim: 16, inter: 8, numExperts: 6, topk: 2, activation: 'swiglu', sharedExpert: { inter: 8 } };
    const N = 3;
    const whole = new MoELayer(moe!, { ...options, seed: 5, initStd: 0.3 });
    const groups = createInProcessGroup(N, { timeoutMs: 20_000 });
    const layers = groups.map((g) => {
      const range = moe!.expertRangeForRank(options.numExperts, N, g.rank);
      return new MoELayer(moe!, { ...options, epSize: N, epRank: g.rank, weights: sliceExperts(whole.weights, range.start, range.end) });
    });
    const adam = { lr: 1e-2, weightDecay: 0.01 };
    const opts = layers.map((l) => new AdamW(moe!, l.parameters(), adam));
    const wholeOpt = new AdamW(moe!, whole.parameters(), adam);
    for (let step = 0; step < 3; step++) {
      const xs = Array.from({ length: N }, (_, r) => values('float32', [7 + 3 * r, 16], 10 * step + r, 1));
      const gs = xs.map((x, r) => values('float32', x.shape, 500 + 10 * step + r, 0.1));
      await Promise.all(layers.map((l, r) => l.forwardParallel(groups[r], xs[r] as never)));
      const bs = await Promise.all(layers.map((l, r) => l.backwardParallel(groups[r], gs[r] as never)));
      const reduced = await Promise.all(bs.map((b, r) => reduceReplicatedGrads(groups[r], b.grads)));
      reduced.forEach((g, r) => {
        opts[r].step(g as never);
      });
      whole.forward(concat(xs) as never);
      wholeOpt.step(whole.backward(concat(gs) as never).grads as never);
    }
    for (let r = 0; r < N; r++) {
      const range = moe!.expertRangeForRank(options.numExperts, N, r);
      const want = sliceExperts(whole.weights, range.start, range.end);
      for (const [key, t] of Object.entries(layers[r].weights)) {
        if (!t) continue;
        expect(close(toNumbers(t as Tensor), toNumbers(want[key as keyof MoEWeights] as Tensor), 1e-5), `rank ${r}: weights.${key} after 3 steps`).toEqual([]);
      }
      // the copies of the router and the shared expert stay the same bits on every rank
      for (const key of ['routerWeight', 'sharedGateAndUpProjs', 'sharedDownProjs'] as const) {
        expect(Array.from(layers[r].weights[key]!.data), `rank ${r}: weights.${key} = rank 0's`).toEqual(Array.from(layers[0].weights[key]!.data));
      }
    }
  });

  it("a rank that stops after the forward makes the others' backwardParallel reject, naming it", async () => {
    const options: MoELayerOptions = { dim: 8, inter: 4, numExperts: 4, topk: 2, activation: 'swiglu' };
    const whole = new MoELayer(moe!, { ...options, seed: 4 });
    const groups = createInProcessGroup(2, { timeoutMs: 100 });
    const layers = groups.map((g) => new MoELayer(moe!, { ...options, epSize: 2, epRank: g.rank, weights: sliceExperts(whole.weights, 2 * g.rank, 2 * g.rank + 2) }));
    const xs = [0, 1].map((r) => values('float32', [6, 8], 40 + r, 1));
    await Promise.all(layers.map((l, r) => l.forwardParallel(groups[r], xs[r] as never)));
    // rank 1 "dies": it never calls backwardParallel
    const err = await layers[0].backwardParallel(groups[0], values('float32', [6, 8], 50, 0.1) as never).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ExpertParallelTimeoutError);
    expect((err as ExpertParallelTimeoutError).missingRanks).toEqual([1]);
    expect(String(err)).toMatch(/rank 1/);
  });

  it('errors: the wrong group, the wrong backward, a layer of another rank count', async () => {
    const options: MoELayerOptions = { dim: 8, inter: 4, numExperts: 4, topk: 2, activation: 'swiglu', seed: 3 };
    const groups = createInProcessGroup(2, { timeoutMs: 5_000 });
    const layer = new MoELayer(moe!, { ...options, epSize: 2, epRank: 0, weights: sliceExperts(new MoELayer(moe!, options).weights, 0, 2) });
    const x = values('float32', [5, 8], 1, 1);
    await expect(layer.forwardParallel(groups[1], x as never)).rejects.toThrow(/forwardParallel: group: expected rank 0 of 2 \(the layer's epRank of epSize\), got rank 1 of 2/);
    await expect(layer.forwardParallel({} as never, x as never)).rejects.toThrow(TypeError);
    const other = new MoELayer(moe!, options);
    await expect(other.forwardParallel(groups[0], x as never)).rejects.toThrow(/expected rank 0 of 1/);
    other.forward(x as never);
    await expect(other.backwardParallel(createInProcessGroup(1)[0], x as never)).rejects.toThrow(/backwardParallel: the last forward was forward: call backward/);
    const single = createInProcessGroup(1)[0];
    await other.forwardParallel(single, x as never);
    expect(() => other.backward(x as never)).toThrow(/backward: the last forward was forwardParallel/);
    await expect(other.backwardParallel(createInProcessGroup(1)[0], x as never)).rejects.toThrow(/group: expected the group of the last forwardParallel/);
  });
});
