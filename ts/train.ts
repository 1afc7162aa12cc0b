/**
 * Trains an MoE layer on a synthetic task: a student `MoELayer` learns to reproduce the outputs
 * of a fixed random teacher layer of the same shape (mean squared error plus the load-balancing
 * loss), with `AdamW` (ts/optim.ts), on whichever backend it is given. On the cuda backend both
 * layers live on the GPU (`upload()`): forward, backward and the optimizer step run there, and a
 * step reads back only the numbers it reports (the loss, the aux loss, tokens per expert). Then
 * it saves the student as a safetensors checkpoint (Hugging Face expert keys), loads it back,
 * and checks that the reloaded layer gives the same outputs bit for bit.
 *
 * Shapes: `tiny` (dim 16, 8 experts, float32; the default on the CPU backends), and the real
 * ones (training.ts's `TRAIN_SHAPES`) `fine-grained` (8192 tokens a step, dim 2048, inter 1408,
 * 64 experts, top-6), `mixtral` (8192 tokens, dim 4096, inter 14336, 8 experts, top-2) and
 * `deepseek-v3-ep8` (8192 tokens, dim 7168, inter 2048, 32 experts, top-8: one expert-parallel
 * rank's share of DeepSeek-V3), bfloat16 with float32 masters (`fine-grained` is the default on cuda).
 *
 * Used by `moe-dispatch train` and `examples/train-moe.mjs`.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { Backend } from './backend.js';
import { isCudaBackend } from './backends/cuda.js';
import { type AnyTensor, type DeviceTensor, isDeviceTensor } from './device.js';
import { MoELayer, normalRng, type MoELayerOptions, type MoEWeights } from './layer.js';
import { AdamW } from './optim.js';
import { mseLoss, type RealShape, TRAIN_SHAPES, uniformTensor } from './training.js';
import type { Tensor, TokenDType } from './tensor.js';

export type TrainShape = 'tiny' | RealShape;

/** Every shape `trainMoE` takes, by name. */
export const TRAIN_SHAPE_NAMES: readonly TrainShape[] = ['tiny', ...(Object.keys(TRAIN_SHAPES) as RealShape[])];

export interface TrainOptions {
  steps?: number;
  /** `tiny` (default on CPU backends), `fine-grained` (default on cuda), `mixtral` or `deepseek-v3-ep8`. */
  shape?: TrainShape;
  /** Tokens per step (default: the shape's: 128 tiny, 8192 otherwise), out of a fixed data set of `batches` batches. */
  batch?: number;
  /** Batches in the data set (default 4 tiny, 2 otherwise). */
  batches?: number;
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
  shape: TrainShape;
  /** Where the layers trained: 'gpu' (device tensors) or 'host'. */
  device: 'gpu' | 'host';
  steps: number;
  tokensPerStep: number;
  /** Mean squared error against the teacher on the whole data set, before and after. */
  initialLoss: number;
  finalLoss: number;
  /** Tokens per expert on the first batch after training. */
  finalLoad: number[];
  checkpoint: string;
  checkpointBytes: number;
  reloadIdentical: boolean;
  /** Seconds of the training loop (the steps), and the whole run. */
  trainSeconds: number;
  seconds: number;
  stepsPerSecond: number;
  tokensPerSecond: number;
  /** GPU runs: the most device memory this process's tensors held during the steps. */
  peakBytes?: number;
  /** Steps the optimizer skipped for a non-finite gradient. */
  skippedSteps: number;
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

type AnyToken = AnyTensor<TokenDType>;

/** Random weights of a real shape (router, gate|up, down), fast. */
function shapeWeights(o: MoELayerOptions, seed: number, gain: number): MoEWeights {
  const dt = o.dtype ?? 'float32';
  return {
    routerWeight: uniformTensor(o.routerDtype ?? dt, [o.dim, o.numExperts], seed, gain / Math.sqrt(o.dim)),
    gateAndUpProjs: uniformTensor(dt, [o.numExperts, o.dim, 2 * o.inter], seed + 1, gain / Math.sqrt(o.dim)),
    downProjs: uniformTensor(dt, [o.numExperts, o.inter, o.dim], seed + 2, gain / Math.sqrt(o.inter)),
  };
}

function dispose(...ts: unknown[]): void {
  for (const t of ts) if (isDeviceTensor(t)) t.dispose();
}

export function trainMoE(backend: Backend, options: TrainOptions = {}): TrainResult {
  const gpu = isCudaBackend(backend);
  const shape: TrainShape = options.shape ?? (gpu ? 'fine-grained' : 'tiny');
  const tiny = shape === 'tiny';
  if (!TRAIN_SHAPE_NAMES.includes(shape)) throw new TypeError(`shape: expected one of ${TRAIN_SHAPE_NAMES.map((n) => `'${n}'`).join(', ')}, got ${JSON.stringify(shape)}`);
  const steps = options.steps ?? 100;
  const batch = options.batch ?? (tiny ? 128 : TRAIN_SHAPES[shape].batch);
  const batches = options.batches ?? (tiny ? 4 : 2);
  const layerOptions: MoELayerOptions = { ...(tiny ? DEFAULT_LAYER : TRAIN_SHAPES[shape].layer), ...options.layer };
  const { dim } = layerOptions;
  const dtype = layerOptions.dtype ?? 'float32';
  const seed = options.seed ?? 7;
  const started = performance.now();

  // The task: a fixed random teacher; inputs uniform in [-1, 1] (tiny: standard normal).
  const teacherOptions = { ...layerOptions, auxLossCoeff: 0, zLossCoeff: 0 };
  const teacher = tiny
    ? new MoELayer(backend, { ...teacherOptions, seed: seed + 1000, initStd: 0.5 })
    : new MoELayer(backend, { ...teacherOptions, weights: shapeWeights(layerOptions, seed + 1000, 2) });
  const student = tiny ? new MoELayer(backend, { ...layerOptions, seed, initStd: 0.1 }) : new MoELayer(backend, { ...layerOptions, weights: shapeWeights(layerOptions, seed, 1) });
  if (gpu) {
    teacher.upload();
    student.upload();
  }
  const onGpu = (t: Tensor<TokenDType>): AnyToken => (isCudaBackend(backend) ? backend.upload(t) : t);
  const xs: AnyToken[] = [];
  const ys: AnyToken[] = [];
  for (let b = 0; b < batches; b++) {
    const x = tiny ? normalInputs(batch, dim, seed * 31 + b) : uniformTensor(dtype, [batch, dim], seed * 31 + b, 1);
    xs.push(onGpu(x));
    const f = teacher.forward(xs[b] as Tensor);
    ys.push(f.output as AnyToken);
    dispose(f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert);
  }
  // the teacher's work is done: its parameters and saved activations go (on the GPU, at once)
  teacher.dispose();

  const evaluate = (): number => {
    let sum = 0;
    for (let b = 0; b < batches; b++) {
      const f = student.forward(xs[b] as Tensor);
      const { loss, grad } = mseLoss(backend, f.output as AnyToken, ys[b]);
      sum += loss;
      dispose(f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert, grad);
    }
    return sum / batches;
  };
  const initialLoss = evaluate();
  const opt = new AdamW(backend, student.parameters(), { lr: options.lr ?? (tiny ? 0.02 : 1e-3), weightDecay: 0, ...(tiny ? {} : { maxGradNorm: 1 }), onNonFinite: 'skip' });
  if (gpu) backend.peakMemory({ reset: true });
  const loopStart = performance.now();
  for (let step = 0; step < steps; step++) {
    const i = step % batches;
    const out = student.forward(xs[i] as Tensor);
    const { loss, grad } = mseLoss(backend, out.output as AnyToken, ys[i]);
    const back = student.backward(grad as Tensor);
    opt.step(back.grads as unknown as Record<string, AnyToken>);
    const tpe = out.tokensPerExpert as Int32Array | DeviceTensor<'int32'>;
    const load = isDeviceTensor(tpe) ? Array.from(tpe.download().data as Int32Array) : Array.from(tpe);
    options.onStep?.({ step: step + 1, steps, loss, auxLoss: out.auxLoss, load });
    dispose(out.output, out.indices, out.weights, out.logits, out.scores, out.tokensPerExpert, grad, back.gradInput, ...Object.values(back.grads));
  }
  if (gpu) backend.synchronize();
  const trainSeconds = (performance.now() - loopStart) / 1000;
  const peakBytes = gpu ? backend.peakMemory() : undefined;
  const finalLoss = evaluate();
  const trained = student.forward(xs[0] as Tensor);
  const trainedOut = hostOf(trained.output as AnyToken);
  const tpe = trained.tokensPerExpert as Int32Array | DeviceTensor<'int32'>;
  const finalLoad = Array.from(isDeviceTensor(tpe) ? tpe.download().data : tpe);
  dispose(trained.output, trained.indices, trained.weights, trained.logits, trained.scores, trained.tokensPerExpert);

  // Checkpoint: save, reload, compare.
  const path = options.checkpoint ?? join(mkdtempSync(join(tmpdir(), 'moe-train-')), 'moe-layer.safetensors');
  const bytes = student.save('model.layers.0.mlp');
  writeLargeFile(path, bytes);
  const { weights: _w, seed: _s, initStd: _i, ...reloadOptions } = layerOptions;
  // The native backend reads the file itself (seek + read); wasm gets the bytes.
  const source = backend.name === 'wasm' ? new Uint8Array(readFileSync(path)) : path;
  const reloaded = MoELayer.load(backend, source, reloadOptions, 'model.layers.0.mlp');
  if (gpu) reloaded.upload();
  const again = reloaded.forward(xs[0] as Tensor);
  const againOut = hostOf(again.output as AnyToken);
  dispose(again.output, again.indices, again.weights, again.logits, again.scores, again.tokensPerExpert);
  const a = new Uint8Array(trainedOut.data.buffer, trainedOut.data.byteOffset, trainedOut.data.byteLength);
  const b = new Uint8Array(againOut.data.buffer, againOut.data.byteOffset, againOut.data.byteLength);
  const reloadIdentical = a.length === b.length && a.every((v, i) => v === b[i]);
  const skippedSteps = opt.status().skipped;
  if (gpu) {
    opt.dispose();
    student.dispose();
    reloaded.dispose();
    dispose(...xs, ...ys);
  }
  const seconds = (performance.now() - started) / 1000;

  return {
    backend: backend.name,
    shape,
    device: gpu ? 'gpu' : 'host',
    steps,
    tokensPerStep: batch,
    initialLoss,
    finalLoss,
    finalLoad,
    checkpoint: path,
    checkpointBytes: bytes.length,
    reloadIdentical,
    trainSeconds,
    seconds,
    stepsPerSecond: steps / trainSeconds,
    tokensPerSecond: (steps * batch) / trainSeconds,
    peakBytes,
    skippedSteps,
  };
}

/**
 * Writes `bytes` to `path` in pieces of at most 1 GiB: Node's writeFileSync refuses a buffer over
 * 2 GiB (a Mixtral-sized layer's checkpoint is 2.8 GB).
 */
export function writeLargeFile(path: string, bytes: Uint8Array): void {
  const fd = openSync(path, 'w');
  try {
    for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at, Math.min(bytes.length - at, 1 << 30));
  } finally {
    closeSync(fd);
  }
}

function hostOf(t: AnyToken): Tensor<TokenDType> {
  return isDeviceTensor(t) ? t.download() : t;
}

/** Standard normal inputs (the tiny task's, as before). */
function normalInputs(n: number, dim: number, seed: number): Tensor<'float32'> {
  const normal = normalRng(seed);
  return { dtype: 'float32', shape: [n, dim], data: Float32Array.from({ length: n * dim }, () => normal()) };
}

/** A one-line progress bar: `[#####.....] 30/60 loss 0.1234 load ▃▅█▂▁▄▆▃`. */
export function progressLine(s: TrainStep, width = 24): string {
  const done = Math.round((s.step / s.steps) * width);
  const bars = '▁▂▃▄▅▆▇█';
  const max = Math.max(1, ...s.load);
  const load = s.load.map((c) => bars[Math.min(bars.length - 1, Math.floor((c / max) * (bars.length - 1)))]).join('');
  return `[${'#'.repeat(done)}${'.'.repeat(width - done)}] ${String(s.step).padStart(String(s.steps).length)}/${s.steps} loss ${s.loss.toFixed(5)} aux ${s.auxLoss.toFixed(4)} load ${load} (${s.load.join(' ')})`;
}
