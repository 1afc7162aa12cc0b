/**
 * Trains a small MoE layer on a synthetic task: a student `MoELayer` learns to reproduce the
 * outputs of a fixed random teacher layer of the same shape (mean squared error plus the
 * load-balancing loss), with Adam written here, on whichever backend it is given. Then it
 * saves the student as a safetensors checkpoint (Hugging Face expert keys), loads it back,
 * and checks that the reloaded layer gives the same outputs bit for bit.
 *
 * Used by `moe-dispatch train` and `examples/train-moe.mjs`.
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { Backend } from './backend.js';
import { MoELayer, normalRng, type MoELayerOptions, type MoEWeights } from './layer.js';
import type { Tensor } from './tensor.js';

export interface TrainOptions {
  steps?: number;
  /** Tokens per step (default 128) out of a fixed data set of 4x as many. */
  batch?: number;
  lr?: number;
  seed?: number;
  /** Where to write the checkpoint (default: a fresh temporary directory). */
  checkpoint?: string;
  /** Called after every step (for a progress display). */
  onStep?: (s: TrainStep) => void;
  layer?: Partial<MoELayerOptions>;
}

export interface TrainStep {
  step: number;
  steps: number;
  loss: number;
  auxLoss: number;
  /** Tokens per expert in this step's batch. */
  load: number[];
}

export interface TrainResult {
  backend: string;
  steps: number;
  /** Mean squared error against the teacher on the whole data set, before and after. */
  initialLoss: number;
  finalLoss: number;
  /** Tokens per expert on the whole data set after training. */
  finalLoad: number[];
  checkpoint: string;
  checkpointBytes: number;
  reloadIdentical: boolean;
  seconds: number;
  stepsPerSecond: number;
}

export const DEFAULT_LAYER: MoELayerOptions = {
  dim: 16,
  inter: 32,
  numExperts: 8,
  topk: 2,
  activation: 'swiglu',
  scoreFunction: 'softmax',
  auxLossCoeff: 0.01,
  bias: true,
};

const f32 = (shape: number[], data: Float32Array): Tensor<'float32'> => ({ dtype: 'float32', shape, data });

function mse(a: Float32Array, b: Float32Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i] - b[i]) ** 2;
  return s / a.length;
}

/** Adam (Kingma & Ba), updating each parameter's data in place. */
class Adam {
  #m = new Map<string, Float32Array>();
  #v = new Map<string, Float32Array>();
  #t = 0;
  constructor(
    readonly lr: number,
    readonly beta1 = 0.9,
    readonly beta2 = 0.999,
    readonly eps = 1e-8,
  ) {}

  step(params: MoEWeights, grads: MoEWeights): void {
    this.#t++;
    const c1 = 1 - this.beta1 ** this.#t;
    const c2 = 1 - this.beta2 ** this.#t;
    for (const [name, p] of Object.entries(params) as [string, Tensor<'float32'> | undefined][]) {
      const g = (grads as unknown as Record<string, Tensor<'float32'> | undefined>)[name];
      if (!p || !g) continue;
      const m = this.#m.get(name) ?? new Float32Array(p.data.length);
      const v = this.#v.get(name) ?? new Float32Array(p.data.length);
      this.#m.set(name, m);
      this.#v.set(name, v);
      for (let i = 0; i < p.data.length; i++) {
        m[i] = this.beta1 * m[i] + (1 - this.beta1) * g.data[i];
        v[i] = this.beta2 * v[i] + (1 - this.beta2) * g.data[i] * g.data[i];
        p.data[i] -= (this.lr * (m[i] / c1)) / (Math.sqrt(v[i] / c2) + this.eps);
      }
    }
  }
}

export function trainMoE(backend: Backend, options: TrainOptions = {}): TrainResult {
  const steps = options.steps ?? 100;
  const batch = options.batch ?? 128;
  const layerOptions: MoELayerOptions = { ...DEFAULT_LAYER, ...options.layer };
  const { dim } = layerOptions;
  const seed = options.seed ?? 7;
  const started = performance.now();

  // The task: a fixed random teacher; inputs are standard normal.
  const teacher = new MoELayer(backend, { ...layerOptions, seed: seed + 1000, initStd: 0.5, auxLossCoeff: 0, zLossCoeff: 0 });
  const normal = normalRng(seed);
  const n = 4 * batch;
  const x = f32([n, dim], Float32Array.from({ length: n * dim }, () => normal()));
  const y = teacher.forward(x).output.data as Float32Array;
  const slice = (t: Float32Array, i: number) => t.subarray(i * batch * dim, (i + 1) * batch * dim);

  const student = new MoELayer(backend, { ...layerOptions, seed, initStd: 0.1 });
  const adam = new Adam(options.lr ?? 0.02);
  const initialLoss = mse(student.forward(x).output.data as Float32Array, y);
  for (let step = 0; step < steps; step++) {
    const i = step % 4;
    const xb = f32([batch, dim], slice(x.data, i));
    const yb = slice(y, i);
    const out = student.forward(xb);
    const o = out.output.data as Float32Array;
    const loss = mse(o, yb);
    // d mse / d output.
    const g = Float32Array.from(o, (v, j) => (2 * (v - yb[j])) / yb.length);
    const { grads } = student.backward(f32([batch, dim], g));
    adam.step(student.weights, grads);
    options.onStep?.({ step: step + 1, steps, loss, auxLoss: out.auxLoss, load: Array.from(out.tokensPerExpert) });
  }
  const trained = student.forward(x);
  const trainedOut = trained.output.data as Float32Array;
  const finalLoss = mse(trainedOut, y);
  const seconds = (performance.now() - started) / 1000;

  // Checkpoint: save, reload, compare.
  const path = options.checkpoint ?? join(mkdtempSync(join(tmpdir(), 'moe-train-')), 'moe-layer.safetensors');
  const bytes = student.save('model.layers.0.mlp');
  writeFileSync(path, bytes);
  const { weights: _w, seed: _s, initStd: _i, ...reloadOptions } = layerOptions;
  // The native backend reads the file itself (seek + read); wasm gets the bytes.
  const source = backend.name === 'wasm' ? new Uint8Array(readFileSync(path)) : path;
  const reloaded = MoELayer.load(backend, source, reloadOptions, 'model.layers.0.mlp');
  const again = reloaded.forward(x).output.data;
  const a = new Uint32Array(trained.output.data.buffer, trained.output.data.byteOffset, trained.output.data.length);
  const b = new Uint32Array(again.buffer, again.byteOffset, again.length);
  const reloadIdentical = a.length === b.length && a.every((v, i) => v === b[i]);

  return {
    backend: backend.name,
    steps,
    initialLoss,
    finalLoss,
    finalLoad: Array.from(trained.tokensPerExpert),
    checkpoint: path,
    checkpointBytes: bytes.length,
    reloadIdentical,
    seconds,
    stepsPerSecond: steps / seconds,
  };
}

/** A one-line progress bar: `[#####.....] 30/60 loss 0.1234 load ▃▅█▂▁▄▆▃`. */
export function progressLine(s: TrainStep, width = 24): string {
  const done = Math.round((s.step / s.steps) * width);
  const bars = '▁▂▃▄▅▆▇█';
  const max = Math.max(1, ...s.load);
  const load = s.load.map((c) => bars[Math.min(bars.length - 1, Math.floor((c / max) * (bars.length - 1)))]).join('');
  return `[${'#'.repeat(done)}${'.'.repeat(width - done)}] ${String(s.step).padStart(String(s.steps).length)}/${s.steps} loss ${s.loss.toFixed(5)} aux ${s.auxLoss.toFixed(4)} load ${load} (${s.load.join(' ')})`;
}
