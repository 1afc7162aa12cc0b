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
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { MoELayer, tensor, toNumbers, trainMoE, type ActivationKind, type MoELayerOptions, type MoEWeights, type Tensor } from '../ts/index.js';
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

type Params = Record<'x' | 'wr' | 'w1' | 'w2' | 'b1' | 'b2' | 'br' | 'eb' | 's1' | 's2' | 'sg', Float64Array>;

const softplus = (v: number) => (v > 20 ? v : Math.log1p(Math.exp(v)));

/** The indices of the k largest keys, largest first, ties to the lower index. */
const topIdx = (key: number[], k: number) => [...key.keys()].sort((a, b) => key[b] - key[a] || a - b).slice(0, k);

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
      let s = c.routerBias ? p.br[e] : 0;
      for (let d = 0; d < D; d++) s += p.x[t * D + d] * p.wr[d * E + e];
      return s;
    });
    logitsAll.push(l);
    const m = Math.max(...l);
    const soft = l.map((v) => Math.exp(v - m));
    const z = soft.reduce((a, b) => a + b, 0);
    const sm = soft.map((v) => v / z);
    const sf = c.scoreFunction ?? 'softmax';
    const scores = sf.startsWith('sigmoid') ? l.map(sigmoid) : sf === 'sqrtsoftplus' ? l.map((v) => Math.sqrt(softplus(v))) : sm;
    const plainSoftmax = sf === 'softmax' && !c.softmaxBeforeTopk;
    let key = sf === 'softmax' ? (c.softmaxBeforeTopk ? scores : l) : scores.map((v, e) => v + (c.expertBias ? p.eb[e] : 0));
    const G = c.numGroups ?? 1;
    if (G > 1) {
      const size = E / G;
      const top2 = sf !== 'sigmoid' || c.expertBias;
      const gs = Array.from({ length: G }, (_, g) => {
        const grp = key.slice(g * size, (g + 1) * size).sort((a, b) => b - a);
        return top2 ? grp[0] + grp[1] : grp[0];
      });
      const kept = new Set(topIdx(gs, c.topkGroups ?? G));
      key = key.map((v, e) => (kept.has(Math.floor(e / size)) ? v : sf === 'sigmoid_with_bias' ? -Infinity : 0));
    }
    const picks = topIdx(key, k);
    let w: number[];
    if (!plainSoftmax) w = picks.map((e) => scores[e]);
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
    probsAll.push(sf === 'softmax' ? sm : probsRow);
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
  if (c.sharedExpert) {
    const S = c.sharedExpert.inter;
    for (let t = 0; t < T; t++) {
      const h = Array.from({ length: 2 * S }, (_, q) => {
        let s = 0;
        for (let d = 0; d < D; d++) s += p.x[t * D + d] * p.s1[d * 2 * S + q];
        return s;
      });
      let gate = 1;
      if (c.sharedExpert.gate) {
        let s = 0;
        for (let d = 0; d < D; d++) s += p.x[t * D + d] * p.sg[d];
        gate = sigmoid(s);
      }
      for (let d = 0; d < D; d++) {
        let s = 0;
        for (let q = 0; q < S; q++) s += h[q] * sigmoid(h[q]) * h[S + q] * p.s2[q * D + d];
        out[t * D + d] += gate * s;
      }
    }
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
  const S = c.sharedExpert?.inter ?? 1;
  return {
    x: v(c.T * D, 1),
    wr: v(D * E, 1),
    w1: v(E * D * W, 0.7),
    w2: v(E * I * D, 0.7),
    b1: v(E * W, 0.3),
    b2: v(E * D, 0.3),
    br: v(E, 0.5),
    eb: v(E, 0.3),
    s1: v(D * 2 * S, 0.7),
    s2: v(S * D, 0.7),
    sg: v(D, 1),
  };
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
  if (c.routerBias) w.routerBias = t([E], p.br);
  if (c.expertBias) w.expertBias = t([E], p.eb);
  if (c.sharedExpert) {
    const S = c.sharedExpert.inter;
    w.sharedGateAndUpProjs = t([1, D, 2 * S], p.s1);
    w.sharedDownProjs = t([1, S, D], p.s2);
    if (c.sharedExpert.gate) w.sharedExpertGate = t([D, 1], p.sg);
  }
  return w;
}

const CONFIGS: [string, Config][] = [
  ['softmax, swiglu, biases, aux + z-loss', { T: 7, dim: 4, inter: 3, numExperts: 4, topk: 2, activation: 'swiglu', bias: true, auxLossCoeff: 0.1, zLossCoeff: 0.01 }],
  [
    'softmax before top-k, quick_geglu, scaled',
    { T: 6, dim: 3, inter: 2, numExperts: 5, topk: 3, activation: 'quick_geglu', softmaxBeforeTopk: true, routeScale: 1.5, bias: true, auxLossCoeff: 0.05 },
  ],
  ['sigmoid normalised, relu2, aux', { T: 6, dim: 4, inter: 3, numExperts: 4, topk: 2, activation: 'relu2', scoreFunction: 'sigmoid', normTopkProb: true, bias: true, auxLossCoeff: 0.1 }],
  [
    'DeepSeek-V3-like: sigmoid_with_bias, expert bias, groups, normalised, scaled, gated shared expert, aux',
    {
      T: 7,
      dim: 4,
      inter: 3,
      numExperts: 8,
      topk: 2,
      activation: 'swiglu',
      scoreFunction: 'sigmoid_with_bias',
      expertBias: true,
      numGroups: 4,
      topkGroups: 2,
      normTopkProb: true,
      routeScale: 2.5,
      sharedExpert: { inter: 2, gate: true },
      auxLossCoeff: 0.1,
    },
  ],
  [
    'sigmoid with bias and groups masked by 0, shared expert',
    { T: 6, dim: 3, inter: 2, numExperts: 6, topk: 2, activation: 'swiglu', scoreFunction: 'sigmoid', expertBias: true, numGroups: 3, topkGroups: 2, sharedExpert: { inter: 3 } },
  ],
  ['GPT-OSS-like: router bias, quick_geglu, biases', { T: 6, dim: 4, inter: 2, numExperts: 4, topk: 2, activation: 'quick_geglu', routerBias: true, bias: true, zLossCoeff: 0.01 }],
  ['sqrtsoftplus, normalised, aux', { T: 6, dim: 3, inter: 2, numExperts: 5, topk: 2, activation: 'swiglu', scoreFunction: 'sqrtsoftplus', normTopkProb: true, auxLossCoeff: 0.05 }],
  [
    'softmax_with_bias, groups',
    { T: 6, dim: 3, inter: 2, numExperts: 6, topk: 2, activation: 'swiglu', scoreFunction: 'softmax_with_bias', expertBias: true, numGroups: 3, topkGroups: 1, bias: true },
  ],
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
    if (c.bias) {
      expect(mismatches(grads.gateUpProjBias!.data, fd('b1'), ok), 'gateUpProjBias').toEqual([]);
      expect(mismatches(grads.downProjBias!.data, fd('b2'), ok), 'downProjBias').toEqual([]);
    } else expect(grads.gateUpProjBias).toBeUndefined();
    if (c.routerBias) expect(mismatches(grads.routerBias!.data, fd('br'), ok), 'routerBias').toEqual([]);
    expect(grads.expertBias, 'the score-correction bias is not trained').toBeUndefined();
    if (c.sharedExpert) {
      expect(mismatches(grads.sharedGateAndUpProjs!.data, fd('s1'), ok), 'sharedGateAndUpProjs').toEqual([]);
      expect(mismatches(grads.sharedDownProjs!.data, fd('s2'), ok), 'sharedDownProjs').toEqual([]);
      if (c.sharedExpert.gate) expect(mismatches(grads.sharedExpertGate!.data, fd('sg'), ok), 'sharedExpertGate').toEqual([]);
    }
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

  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  it.skipIf(!cpu || !wasm)('the same training (layer, AdamW, loss) on cpu and wasm gives the same weights, bit for bit', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-train-same-'));
    try {
      const run = (b: NonNullable<typeof cpu>, name: string) => trainMoE(b, { steps: 12, checkpoint: join(dir, `${name}.safetensors`) });
      const a = run(cpu!, 'cpu');
      const b = run(wasm!, 'wasm');
      expect(b.finalLoss).toBe(a.finalLoss);
      expect(b.finalLoss).toBeLessThan(b.initialLoss);
      expect(Buffer.compare(readFileSync(a.checkpoint), readFileSync(b.checkpoint))).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.each(backendRows)('MoELayer lifetime on %s', (_name, moe) => {
  it('dispose() ends the layer: every use after it is a TypeError naming the op', () => {
    const layer = new MoELayer(moe, { dim: 8, inter: 4, numExperts: 4, topk: 2, activation: 'swiglu', seed: 3 });
    const x = tensor(
      'float32',
      [5, 8],
      Array.from({ length: 40 }, (_, i) => Math.sin(i)),
    );
    const out = layer.forward(x);
    expect(out.output.shape).toEqual([5, 8]);
    layer.dispose();
    layer.dispose();
    expect(() => layer.forward(x)).toThrow(TypeError);
    expect(() => layer.forward(x)).toThrow(/forward: the layer was disposed/);
    expect(() => layer.backward(out.output)).toThrow(/backward: the layer was disposed/);
    expect(() => layer.parameters()).toThrow(/parameters: the layer was disposed/);
    expect(() => layer.upload()).toThrow(/upload: the layer was disposed/);
  });

  it('parameters() names every trained weight (not expertBias) and upload() needs the cuda backend', () => {
    const layer = new MoELayer(moe, { dim: 8, inter: 4, numExperts: 4, topk: 2, activation: 'swiglu', scoreFunction: 'sigmoid_with_bias', expertBias: true, routerBias: true, bias: true, seed: 3 });
    expect(Object.keys(layer.parameters()).sort()).toEqual(['downProjBias', 'downProjs', 'gateAndUpProjs', 'gateUpProjBias', 'routerBias', 'routerWeight']);
    for (const [k, t] of Object.entries(layer.parameters())) expect(t, k).toBe((layer.weights as unknown as Record<string, unknown>)[k]);
    if (moe.name !== 'cuda') expect(() => layer.upload()).toThrow(/upload: the layer's backend is '(cpu|wasm)': device tensors need the cuda backend/);
  });
});

describe.each(backendRows)('MoELayer options on %s', (_name, moe) => {
  const c: Config = {
    T: 12,
    dim: 8,
    inter: 4,
    numExperts: 8,
    topk: 2,
    activation: 'swiglu',
    scoreFunction: 'sigmoid_with_bias',
    expertBias: true,
    numGroups: 4,
    topkGroups: 2,
    normTopkProb: true,
    sharedExpert: { inter: 4, gate: true },
    routerBias: true,
    bias: true,
  };
  const p = params(c, 77);
  const x = tensor('float32', [c.T, c.dim], Float32Array.from(p.x));
  const g = tensor('float32', [c.T, c.dim], Float32Array.from(params(c, 78).x));

  it('[B, T, H] input gives [B, T, H] outputs and the same numbers as [B*T, H]', () => {
    const layer = new MoELayer(moe, { ...layerOptions(c), weights: weightsOf(c, p) });
    const flat = layer.forward(x);
    const gFlat = layer.backward(g);
    const x3 = tensor('float32', [3, 4, c.dim], x.data as Float32Array);
    const three = layer.forward(x3);
    expect(three.output.shape).toEqual([3, 4, c.dim]);
    expect(three.indices.shape).toEqual([12, 2]);
    expect(bitsOf(three.output)).toEqual(bitsOf(flat.output));
    const g3 = layer.backward(tensor('float32', [3, 4, c.dim], g.data as Float32Array));
    expect(g3.gradInput.shape).toEqual([3, 4, c.dim]);
    expect(bitsOf(g3.gradInput)).toEqual(bitsOf(gFlat.gradInput));
    expect(() => layer.backward(g)).toThrow(/gradOutput.shape: expected \[3, 4, 8\]/);
  });

  it('bfloat16 and float16 layers: outputs and gradients in the dtype, near the float32 layer', () => {
    const f32 = new MoELayer(moe, { ...layerOptions(c), weights: weightsOf(c, p) });
    const want = toNumbers(f32.forward(x).output);
    const wantG = toNumbers(f32.backward(g).gradInput);
    for (const dtype of ['bfloat16', 'float16'] as const) {
      const cast = (t: Tensor) => (t.dtype === 'float32' ? tensor(dtype, t.shape, Array.from(t.data as Float32Array)) : t);
      const w = Object.fromEntries(Object.entries(weightsOf(c, p)).map(([k, t]) => [k, k === 'expertBias' ? t : cast(t as Tensor)])) as unknown as MoEWeights;
      const layer = new MoELayer(moe, { ...layerOptions(c), dtype, weights: w });
      const f = layer.forward(cast(x));
      expect(f.output.dtype).toBe(dtype);
      const b = layer.backward(cast(g));
      expect(b.gradInput.dtype).toBe(dtype);
      for (const t of Object.values(b.grads)) expect((t as Tensor).dtype).toBe(dtype);
      const scale = Math.max(...want.map(Math.abs));
      const err = Math.max(...toNumbers(f.output).map((v, i) => Math.abs(v - want[i])));
      expect(err / scale, dtype).toBeLessThan(dtype === 'bfloat16' ? 0.05 : 0.01);
      const gs = Math.max(...wantG.map(Math.abs));
      expect(Math.max(...toNumbers(b.gradInput).map((v, i) => Math.abs(v - wantG[i]))) / gs, dtype).toBeLessThan(dtype === 'bfloat16' ? 0.05 : 0.01);
      expect(() => layer.forward(x)).toThrow(/x.dtype: expected .* \(the layer's dtype\), got float32/);
    }
  });

  it('expert-parallel ranks: outputs and every gradient sum to the whole layer', () => {
    const whole = new MoELayer(moe, { ...layerOptions(c), weights: weightsOf(c, p) });
    const wf = whole.forward(x);
    const wb = whole.backward(g);
    const w = weightsOf(c, p);
    const sumOut = new Float64Array(wf.output.data.length);
    const sumGrad = new Float64Array(wb.gradInput.data.length);
    const sumRouter = new Float64Array(wb.grads.routerWeight.data.length);
    const expertGrads: number[] = [];
    for (const epRank of [0, 1, 2, 3]) {
      const r = moe.expertRangeForRank(c.numExperts, 4, epRank);
      const slice = (t: Tensor) => {
        const per = t.shape.slice(1).reduce((a, b) => a * b, 1);
        return tensor('float32', [r.end - r.start, ...t.shape.slice(1)], (t.data as Float32Array).slice(r.start * per, r.end * per));
      };
      const local: MoEWeights = { ...w, gateAndUpProjs: slice(w.gateAndUpProjs!), downProjs: slice(w.downProjs), gateUpProjBias: slice(w.gateUpProjBias!), downProjBias: slice(w.downProjBias!) };
      const rank = new MoELayer(moe, { ...layerOptions(c), epSize: 4, epRank, weights: local });
      toNumbers(rank.forward(x).output).forEach((v, i) => {
        sumOut[i] += v;
      });
      const rb = rank.backward(g);
      toNumbers(rb.gradInput).forEach((v, i) => {
        sumGrad[i] += v;
      });
      toNumbers(rb.grads.routerWeight).forEach((v, i) => {
        sumRouter[i] += v;
      });
      expertGrads.push(...toNumbers(rb.grads.downProjs));
      if (epRank > 0) expect(rb.grads.sharedDownProjs, 'the shared expert lives on rank 0').toBeUndefined();
    }
    const close = (a: ArrayLike<number>, b: ArrayLike<number>) => mismatches(a, Array.from(b), (u, v) => Math.abs(u - v) <= 1e-5 * Math.max(1, Math.abs(v)));
    expect(close(sumOut, toNumbers(wf.output)), 'output').toEqual([]);
    expect(close(sumGrad, toNumbers(wb.gradInput)), 'gradInput').toEqual([]);
    expect(close(sumRouter, toNumbers(wb.grads.routerWeight)), 'routerWeight').toEqual([]);
    expect(close(expertGrads, toNumbers(wb.grads.downProjs)), 'downProjs (each rank its own experts)').toEqual([]);
  });

  it('bad options: typed errors naming the option', () => {
    const base = layerOptions(c);
    expect(() => new MoELayer(moe, { ...base, dtype: 'int32' as never })).toThrow(/dtype: expected 'float32', 'bfloat16', 'float16'/);
    expect(() => new MoELayer(moe, { ...base, scoreFunction: 'tanh' as never })).toThrow(TypeError);
    expect(() => new MoELayer(moe, { ...base, sharedExpert: { inter: 0 } })).toThrow(/sharedExpert.inter: expected an integer >= 1/);
    expect(() => new MoELayer(moe, { ...base, sharedExpert: { inter: 2, gated: true } as never })).toThrow(/gated: not an option of sharedExpert/);
    expect(() => new MoELayer(moe, { ...base, auxLossConvention: 'deepspeed' as never })).toThrow(/auxLossConvention/);
    expect(() => new MoELayer(moe, { ...base, epSize: 2, epRank: 2 })).toThrow(RangeError);
    expect(() => new MoELayer(moe, { ...base, weights: { ...weightsOf(c, p), routerBias: undefined } })).toThrow(/weights.routerBias: expected a float32 Tensor \[8\]/);
    expect(() => new MoELayer(moe, { ...base, weights: { ...weightsOf(c, p), extra: x } as never })).toThrow(/extra: not an option of weights/);
    const layer = new MoELayer(moe, { ...base, seed: 1 });
    expect(() => layer.forward(tensor('float32', [4, 7], new Float32Array(28)))).toThrow(/x.shape: expected \[numTokens, 8\] or \[batch, seqLen, 8\]/);
  });
});
