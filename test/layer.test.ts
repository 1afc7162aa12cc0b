/**
 * MoELayer (route -> permute -> experts -> unpermute, aux losses), on every available backend:
 *
 * - forward (output, aux loss, z-loss) matches a float64 reference of the whole layer
 *   written here;
 * - the input gradient and every parameter gradient (router weight included) match central
 *   finite differences of that reference, for softmax (top-k on logits, or softmax before
 *   top-k) and sigmoid (normalised) routers, gated and relu2 experts, with biases;
 * - a checkpoint written by `save` and read by `MoELayer.load` gives identical outputs;
 * - cpu and wasm agree bit for bit;
 * - the training CLI (`moe-dispatch train --steps 60 --json`) more than halves the loss.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { MoELayer, tensor, type ActivationKind, type MoELayerOptions, type MoEWeights, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { bitsOf, mismatches, rng } from './util.js';

registerBackendReport();

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

function unit(kind: ActivationKind, gate: number, up: number): number {
  const g = Math.min(gate, 7);
  const u = Math.max(-7, Math.min(7, up));
  switch (kind) {
    case 'swiglu':
      return gate * sigmoid(gate) * up;
    case 'quick_geglu':
    case 'swiglu_oai':
      return g * sigmoid(Math.fround(1.702) * g) * (u + 1);
    case 'swiglu_clamped':
      return g * sigmoid(g) * u;
    case 'relu2':
      return gate > 0 ? gate * gate : 0;
  }
}

type Params = Record<'x' | 'wr' | 'w1' | 'w2' | 'b1' | 'b2', Float64Array>;

interface Config extends Omit<MoELayerOptions, 'weights'> {
  T: number;
}

/** The whole layer in float64: { loss = sum(out * G) + aux + z, out, aux, z }. */
function reference(c: Config, p: Params, G?: Float64Array) {
  const { T, dim: D, inter: I, numExperts: E, topk: k, activation: kind } = c;
  const W = kind === 'relu2' ? I : 2 * I;
  const out = new Float64Array(T * D);
  const counts = new Array(E).fill(0);
  const probsAll: number[][] = [];
  const logitsAll: number[][] = [];
  for (let t = 0; t < T; t++) {
    const l = Array.from({ length: E }, (_, e) => {
      let s = 0;
      for (let d = 0; d < D; d++) s += p.x[t * D + d] * p.wr[d * E + e];
      return s;
    });
    logitsAll.push(l);
    const m = Math.max(...l);
    const soft = l.map((v) => Math.exp(v - m));
    const z = soft.reduce((a, b) => a + b, 0);
    const sm = soft.map((v) => v / z);
    const scores = c.scoreFunction === 'sigmoid' ? l.map(sigmoid) : sm;
    const key = c.scoreFunction === 'sigmoid' || c.softmaxBeforeTopk ? scores : l;
    const picks = [...key.keys()].sort((a, b) => key[b] - key[a] || a - b).slice(0, k);
    let w: number[];
    if (c.scoreFunction === 'sigmoid' || c.softmaxBeforeTopk) w = picks.map((e) => scores[e]);
    else {
      const mm = Math.max(...picks.map((e) => l[e]));
      const ex = picks.map((e) => Math.exp(l[e] - mm));
      const zz = ex.reduce((a, b) => a + b, 0);
      w = ex.map((v) => v / zz);
    }
    let probsRow = scores;
    if (c.normTopkProb && k > 1) {
      const zw = w.reduce((a, b) => a + b, 0) + 1e-20;
      w = w.map((v) => v / zw);
      const zs = scores.reduce((a, b) => a + b, 0) + 1e-20;
      probsRow = scores.map((v) => v / zs);
    }
    probsAll.push(c.scoreFunction === 'sigmoid' ? probsRow : sm);
    w = w.map((v) => v * (c.routeScale ?? 1));
    picks.forEach((e, j) => {
      counts[e]++;
      const h = Array.from({ length: W }, (_, q) => {
        let s = c.bias ? p.b1[e * W + q] : 0;
        for (let d = 0; d < D; d++) s += p.x[t * D + d] * p.w1[(e * D + d) * W + q];
        return s;
      });
      const a = Array.from({ length: I }, (_, q) => {
        const [g, u] = kind === 'relu2' ? [h[q], 0] : kind === 'quick_geglu' ? [h[2 * q], h[2 * q + 1]] : [h[q], h[I + q]];
        return unit(kind, g, u);
      });
      for (let d = 0; d < D; d++) {
        let s = c.bias ? p.b2[e * D + d] : 0;
        for (let q = 0; q < I; q++) s += a[q] * p.w2[(e * I + q) * D + d];
        out[t * D + d] += w[j] * s;
      }
    });
  }
  let aux = 0;
  if (c.auxLossCoeff) {
    for (let e = 0; e < E; e++) aux += probsAll.reduce((s, row) => s + row[e], 0) * counts[e];
    aux *= (E * c.auxLossCoeff) / (k * T * T);
  }
  let zl = 0;
  if (c.zLossCoeff) {
    for (const l of logitsAll) {
      const m = Math.max(...l);
      const lse = m + Math.log(l.reduce((s, v) => s + Math.exp(v - m), 0));
      zl += lse * lse;
    }
    zl *= c.zLossCoeff / T;
  }
  const loss = (G ? out.reduce((s, v, i) => s + v * G[i], 0) : 0) + aux + zl;
  return { out, aux, zl, loss, counts };
}

function params(c: Config, seed: number): Params {
  const rand = rng(seed);
  const W = c.activation === 'relu2' ? c.inter : 2 * c.inter;
  const v = (n: number, s: number) => Float64Array.from({ length: n }, () => Math.fround((rand() * 2 - 1) * s));
  const [D, E, I] = [c.dim, c.numExperts, c.inter];
  return { x: v(c.T * D, 1), wr: v(D * E, 1), w1: v(E * D * W, 0.7), w2: v(E * I * D, 0.7), b1: v(E * W, 0.3), b2: v(E * D, 0.3) };
}

function weightsOf(c: Config, p: Params): MoEWeights {
  const W = c.activation === 'relu2' ? c.inter : 2 * c.inter;
  const [D, E, I] = [c.dim, c.numExperts, c.inter];
  const t = (shape: number[], a: Float64Array) => tensor('float32', shape, Float32Array.from(a));
  const w: MoEWeights = { routerWeight: t([D, E], p.wr), downProjs: t([E, I, D], p.w2) };
  if (c.activation === 'relu2') w.upProjs = t([E, D, W], p.w1);
  else w.gateAndUpProjs = t([E, D, W], p.w1);
  if (c.bias) {
    w.gateUpProjBias = t([E, W], p.b1);
    w.downProjBias = t([E, D], p.b2);
  }
  return w;
}

const CONFIGS: [string, Config][] = [
  ['softmax, swiglu, biases, aux + z-loss', { T: 7, dim: 4, inter: 3, numExperts: 4, topk: 2, activation: 'swiglu', bias: true, auxLossCoeff: 0.1, zLossCoeff: 0.01 }],
  ['softmax before top-k, quick_geglu, scaled', { T: 6, dim: 3, inter: 2, numExperts: 5, topk: 3, activation: 'quick_geglu', softmaxBeforeTopk: true, routeScale: 1.5, bias: true, auxLossCoeff: 0.05 }],
  ['sigmoid normalised, relu2, aux', { T: 6, dim: 4, inter: 3, numExperts: 4, topk: 2, activation: 'relu2', scoreFunction: 'sigmoid', normTopkProb: true, bias: true, auxLossCoeff: 0.1 }],
];

const layerOptions = (c: Config): MoELayerOptions => {
  const { T: _t, ...rest } = c;
  return rest;
};

describe.each(backendRows)('MoELayer on %s', (_name, moe) => {
  it.each(CONFIGS)('%s: forward and every gradient against the float64 reference', (_label, c) => {
    const p = params(c, 31);
    const layer = new MoELayer(moe, { ...layerOptions(c), weights: weightsOf(c, p) });
    const x = tensor('float32', [c.T, c.dim], Float32Array.from(p.x));
    const fwd = layer.forward(x);
    const rand = rng(4);
    const G = Float64Array.from({ length: c.T * c.dim }, () => Math.fround(rand() * 2 - 1));
    const ref = reference(c, p, G);
    const close = (rel: number, abs: number) => (g: number, w: number) => Math.abs(g - w) <= rel * Math.abs(w) + abs;
    expect(mismatches(fwd.output.data, ref.out, close(1e-5, 1e-6)), 'output').toEqual([]);
    expect(fwd.auxLoss).toBeCloseTo(ref.aux, 6);
    expect(fwd.zLoss).toBeCloseTo(ref.zl, 6);
    expect(Array.from(fwd.tokensPerExpert)).toEqual(ref.counts);

    const { gradInput, grads } = layer.backward(tensor('float32', [c.T, c.dim], Float32Array.from(G)));
    const fd = (field: keyof Params) =>
      Float64Array.from(p[field], (_, i) => {
        const h = 1e-6;
        const at = (d: number) => reference(c, { ...p, [field]: Float64Array.from(p[field], (v, j) => (j === i ? v + d : v)) }, G).loss;
        return (at(h) - at(-h)) / (2 * h);
      });
    const ok = close(2e-3, 2e-4);
    expect(mismatches(gradInput.data, fd('x'), ok), 'gradInput').toEqual([]);
    expect(mismatches(grads.routerWeight.data, fd('wr'), ok), 'routerWeight').toEqual([]);
    expect(mismatches((grads.gateAndUpProjs ?? grads.upProjs)!.data, fd('w1'), ok), 'gateAndUpProjs').toEqual([]);
    expect(mismatches(grads.downProjs.data, fd('w2'), ok), 'downProjs').toEqual([]);
    expect(mismatches(grads.gateUpProjBias!.data, fd('b1'), ok), 'gateUpProjBias').toEqual([]);
    expect(mismatches(grads.downProjBias!.data, fd('b2'), ok), 'downProjBias').toEqual([]);
  });

  it('save -> load gives identical outputs (HF and stacked keys)', () => {
    const c = CONFIGS[0][1];
    const layer = new MoELayer(moe, { ...layerOptions(c), seed: 3, initStd: 0.3 });
    const x = tensor('float32', [c.T, c.dim], Float32Array.from(params(c, 2).x));
    const want = layer.forward(x).output;
    for (const format of ['hf', 'stacked'] as const) {
      const bytes = layer.save('model.layers.0.mlp', { format });
      const again = MoELayer.load(moe, bytes, layerOptions(c), 'model.layers.0.mlp');
      expect(bitsOf(again.forward(x).output), format).toEqual(bitsOf(want));
    }
  });
});

describe('cpu and wasm agree bit for bit on the layer', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  it.skipIf(!cpu || !wasm)('forward and backward', () => {
    const c: Config = { T: 64, dim: 32, inter: 24, numExperts: 8, topk: 2, activation: 'swiglu', bias: true, auxLossCoeff: 0.01, zLossCoeff: 0.001 };
    const p = params(c, 9);
    const x = tensor('float32', [c.T, c.dim], Float32Array.from(p.x));
    const g = tensor('float32', [c.T, c.dim], Float32Array.from(params(c, 10).x));
    const run = (b: typeof cpu) => {
      const layer = new MoELayer(b!, { ...layerOptions(c), weights: weightsOf(c, p) });
      const f = layer.forward(x);
      return { f, b: layer.backward(g) };
    };
    const [a, b] = [run(cpu), run(wasm)];
    const same = (x: Tensor, y: Tensor) => mismatches(bitsOf(x), bitsOf(y), (u, v) => u === v);
    expect(same(a.f.output, b.f.output)).toEqual([]);
    expect(a.f.auxLoss).toBe(b.f.auxLoss);
    expect(same(a.b.gradInput, b.b.gradInput)).toEqual([]);
    for (const k of Object.keys(a.b.grads) as (keyof MoEWeights)[]) expect(same(a.b.grads[k] as Tensor, b.b.grads[k] as Tensor), k).toEqual([]);
  });
});

describe('training from the command line', () => {
  const cli = new URL('../dist/cli.js', import.meta.url).pathname;
  for (const [name, backend] of backendRows) {
    if (name !== 'cpu' && name !== 'wasm') continue;
    it.skipIf(!existsSync(cli))(`moe-dispatch train --backend ${name} --steps 60 --json more than halves the loss`, () => {
      const dir = mkdtempSync(join(tmpdir(), 'moe-train-test-'));
      let out: string;
      try {
        out = execFileSync(process.execPath, [cli, 'train', '--backend', backend.name, '--steps', '60', '--json', '--out', join(dir, 'layer.safetensors')], { encoding: 'utf8', timeout: 120_000 });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
      const last = JSON.parse(out.trim().split('\n').at(-1)!);
      expect(last.backend).toBe(name);
      expect(last.finalLoss).toBeLessThan(0.5 * last.initialLoss);
      expect(last.reloadIdentical).toBe(true);
    });
  }
});
