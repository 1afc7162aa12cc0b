/**
 * The training step driven from JavaScript on the GPU (issue 18): `MoELayer` uploaded to the
 * GPU, forward, backward and `AdamW` (float32 masters, clipping at 1, weight decay 0.01) on
 * device tensors, at the shapes of `moe-cuda-bench train` and bench/gpu_torch_train.py
 * (bf16, swiglu, softmax top-k router, Switch aux loss 0.01, the loss sum(out * g) with g given).
 *
 *   node bench/train-gpu.mjs [--iters N] [--shapes NAMES] [--out FILE] [--dist DIR]   (bench/shapes.json's layer shapes; its byDefault ones: fine-grained,mixtral)
 *
 * Times each step to a synchronisation (median and minimum, wall clock), the peak device memory
 * of the timed steps (the cuda backend's peakMemory: this process's tensors), and what a step
 * copies between host and device.
 */
import { writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

import { DEFAULT_LAYER, shapeNames } from './shapes.mjs';

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const dist = resolve(arg('dist', new URL('../dist/', import.meta.url).pathname));
const { AdamW, MoELayer, TRAIN_SHAPES, backendInfo, createBackend, uniformTensor } = await import(pathToFileURL(resolve(dist, 'index.js')).href);
const iters = Number(arg('iters', '10'));
const names = shapeNames(arg('shapes', DEFAULT_LAYER), TRAIN_SHAPES);

const cuda = await createBackend({ prefer: 'cuda' });
if (cuda.name !== 'cuda') throw new Error(`train-gpu: no cuda backend here (got ${cuda.name})`);

/** Uniform values in [-scale, scale], bf16 (the library's fast generator: a 1.4-billion-element layer takes seconds). */
const bf16Uniform = (shape, seed, scale) => uniformTensor('bfloat16', shape, seed, scale);

const rows = [];
for (const name of names) {
  // the library's training shapes (the train command's): the layer options and tokens a step
  const { batch: T, layer: options } = TRAIN_SHAPES[name];
  const { dim, inter, numExperts: E, topk: k } = options;
  cuda.releaseCachedMemory();
  const weights = {
    routerWeight: bf16Uniform([dim, E], 1, 1 / Math.sqrt(dim)),
    gateAndUpProjs: bf16Uniform([E, dim, 2 * inter], 2, 1 / Math.sqrt(dim)),
    downProjs: bf16Uniform([E, inter, dim], 3, 1 / Math.sqrt(inter)),
  };
  const layer = new MoELayer(cuda, { ...options, weights }).upload();
  delete weights.gateAndUpProjs;
  delete weights.downProjs;
  const opt = new AdamW(cuda, layer.parameters(), { lr: 1e-4, weightDecay: 0.01, maxGradNorm: 1, onNonFinite: 'skip' });
  const x = cuda.upload(bf16Uniform([T, dim], 4, 1));
  const g = cuda.upload(bf16Uniform([T, dim], 5, 1 / Math.sqrt(T * dim)));
  // the last forward's result: its aux loss is read once, after the timed steps (a step reads no number)
  let last;
  const step = () => {
    const f = layer.forward(x);
    last = f;
    const b = layer.backward(g);
    opt.step(b.grads);
    for (const t of [f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert, b.gradInput, ...Object.values(b.grads)]) t.dispose();
  };
  for (let i = 0; i < 3; i++) step();
  cuda.synchronize();
  cuda.peakMemory({ reset: true });
  const t0 = cuda.transfers();
  const times = [];
  for (let i = 0; i < iters; i++) {
    const a = performance.now();
    step();
    cuda.synchronize();
    times.push(performance.now() - a);
  }
  const t1 = cuda.transfers();
  const peak = cuda.peakMemory();
  // where a step's host time goes: each backend call's wall time (a call that waits for the GPU
  // includes the wait) over `iters` steps, by op
  const calls = {};
  const saved = {};
  for (const [name, f] of Object.entries(cuda)) {
    if (typeof f !== 'function') continue;
    saved[name] = f;
    cuda[name] = (...a) => {
      const t = performance.now();
      try {
        return f.apply(cuda, a);
      } finally {
        calls[name] ??= { n: 0, ms: 0 };
        const c = calls[name];
        c.n++;
        c.ms += performance.now() - t;
      }
    };
  }
  const p0 = performance.now();
  for (let i = 0; i < iters; i++) step();
  cuda.synchronize();
  const profiledMs = (performance.now() - p0) / iters;
  Object.assign(cuda, saved);
  const byOp = Object.entries(calls)
    .map(([op, c]) => ({ op, callsPerStep: c.n / iters, msPerStep: c.ms / iters }))
    .sort((a, b) => b.msPerStep - a.msPerStep);
  const inCalls = byOp.reduce((a, c) => a + c.msPerStep, 0);
  // back to back: the host queues the next step while the GPU runs (one synchronisation at the end)
  const b0 = performance.now();
  for (let i = 0; i < iters; i++) step();
  cuda.synchronize();
  const backToBack = (performance.now() - b0) / iters;
  times.sort((a, b) => a - b);
  const ms = times[Math.floor(times.length / 2)];
  const st = opt.status();
  const aux = last.auxLoss;
  const perStep = (k) => (t1[k] - t0[k]) / iters;
  const row = {
    shape: name,
    dims: `T=${T} dim=${dim} inter=${inter} E=${E} k=${k} bf16 (float32 masters)`,
    jsStepMs: ms,
    jsStepMsMin: times[0],
    jsStepMsBackToBack: backToBack,
    tokensPerSecond: T / (ms * 1e-3),
    peakBytes: peak,
    transfersPerStep: { toDeviceCalls: perStep('toDeviceCalls'), toDeviceBytes: perStep('toDeviceBytes'), toHostCalls: perStep('toHostCalls'), toHostBytes: perStep('toHostBytes') },
    // the host's waits for the GPU in a step, less the timing's own synchronize
    synchronizationsPerStep: perStep('synchronizations') - 1,
    gradNorm: st.gradNorm,
    stepsApplied: st.step,
    auxLoss: aux,
    profile: { stepMs: profiledMs, msInBackendCalls: inCalls, msOutsideCalls: profiledMs - inCalls, byOp },
  };
  rows.push(row);
  console.log(
    `${name.padStart(13)} JS-driven training step ${ms.toFixed(3)} ms (min ${times[0].toFixed(3)}, back to back ${backToBack.toFixed(3)}), ${Math.round(row.tokensPerSecond)} tokens/s, peak ${(peak / 2 ** 30).toFixed(2)} GiB; per step to device ${row.transfersPerStep.toDeviceCalls} copies / ${row.transfersPerStep.toDeviceBytes} B, to host ${row.transfersPerStep.toHostCalls} / ${row.transfersPerStep.toHostBytes} B, ${row.synchronizationsPerStep} synchronisations; grad norm ${st.gradNorm.toFixed(4)}, aux ${aux.toFixed(5)}`,
  );
  console.log(
    `${name.padStart(13)} profile: ${profiledMs.toFixed(3)} ms a step, ${inCalls.toFixed(3)} in backend calls: ${byOp
      .slice(0, 12)
      .map((c) => `${c.op} ${c.msPerStep.toFixed(3)} (${c.callsPerStep})`)
      .join(', ')}`,
  );
  opt.dispose();
  layer.dispose();
  x.dispose();
  g.dispose();
}
const out = arg('out');
if (out) writeFileSync(out, JSON.stringify({ device: (await backendInfo()).find((i) => i.name === 'cuda')?.device, iters, rows }));
