#!/usr/bin/env node
// Trains a Mixture-of-Experts layer from Node on the best available backend (cuda, then the
// native CPU addon, then wasm), written out step by step with the public API: a student
// MoELayer learns to imitate a fixed random teacher layer (mean squared error + the
// load-balancing loss) with AdamW. On cuda the layers are uploaded to the GPU (`upload()`):
// the data, the parameters, the gradients and the optimizer state stay there, and a step reads
// back only the numbers it prints. A progress bar shows the loss and the tokens each expert
// gets; the trained layer is saved as a safetensors checkpoint (Hugging Face expert keys),
// loaded back and checked to give identical outputs. `moe-dispatch train` runs the same recipe
// (ts/train.ts). Build first: `npm run build`.
//
//   node examples/train-moe.mjs [--backend auto|cuda|cpu|wasm] [--shape tiny|fine-grained|mixtral] [--steps 100] [--json]
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { AdamW, createBackend, isCudaBackend, MoELayer, mseLoss, progressLine, TRAIN_SHAPES, uniformTensor, writeLargeFile } from '../dist/index.js';

const { values: args } = parseArgs({ options: { backend: { type: 'string', default: 'auto' }, shape: { type: 'string' }, steps: { type: 'string', default: '100' }, json: { type: 'boolean' } } });
const steps = Number(args.steps);
const moe = await createBackend({ prefer: args.backend });
const gpu = isCudaBackend(moe);
const shape = args.shape ?? (gpu ? 'fine-grained' : 'tiny');
const tiny = shape === 'tiny';
const config = tiny ? { dim: 16, inter: 32, numExperts: 8, topk: 2, activation: 'swiglu', auxLossCoeff: 0.01, bias: true } : TRAIN_SHAPES[shape].layer;
const batch = tiny ? 128 : TRAIN_SHAPES[shape].batch;
const dtype = config.dtype ?? 'float32';
const onDevice = (t) => (gpu ? moe.upload(t) : t);
const free = (...ts) => {
  for (const t of ts) t?.dispose?.();
};

// The task: inputs uniform in [-1, 1], targets from a fixed random teacher.
const weights = (seed, gain) => ({
  routerWeight: uniformTensor(dtype, [config.dim, config.numExperts], seed, gain / Math.sqrt(config.dim)),
  [config.activation === 'relu2' ? 'upProjs' : 'gateAndUpProjs']: uniformTensor(dtype, [config.numExperts, config.dim, 2 * config.inter], seed + 1, gain / Math.sqrt(config.dim)),
  downProjs: uniformTensor(dtype, [config.numExperts, config.inter, config.dim], seed + 2, gain / Math.sqrt(config.inter)),
  ...(config.bias
    ? { gateUpProjBias: uniformTensor(dtype, [config.numExperts, 2 * config.inter], seed + 3, 0), downProjBias: uniformTensor(dtype, [config.numExperts, config.dim], seed + 4, 0) }
    : {}),
});
const teacher = new MoELayer(moe, { ...config, auxLossCoeff: 0, weights: weights(1007, 2) });
const student = new MoELayer(moe, { ...config, weights: weights(7, 1) });
if (gpu) for (const l of [teacher, student]) l.upload();
const xs = [0, 1].map((b) => onDevice(uniformTensor(dtype, [batch, config.dim], 31 + b, 1)));
const ys = xs.map((x) => teacher.forward(x).output);
teacher.dispose(); // its work is done: on the GPU its weights and activations are freed at once

const evaluate = () => {
  let sum = 0;
  for (let b = 0; b < xs.length; b++) {
    const out = student.forward(xs[b]);
    const { loss, grad } = mseLoss(moe, out.output, ys[b]);
    sum += loss;
    free(out.output, grad);
  }
  return sum / xs.length;
};

// AdamW over the student's parameters: float32 masters for 16-bit weights, updated in place.
const opt = new AdamW(moe, student.parameters(), { lr: tiny ? 0.02 : 1e-3, weightDecay: 0, maxGradNorm: tiny ? undefined : 1 });
const initialLoss = evaluate();
process.stderr.write(`training ${shape} on ${moe.name}${gpu ? ' (the GPU)' : ''}: ${steps} steps of ${batch} tokens\n`);
const t0 = performance.now();
for (let step = 1; step <= steps; step++) {
  const i = (step - 1) % xs.length;
  const out = student.forward(xs[i]);
  const { loss, grad } = mseLoss(moe, out.output, ys[i]);
  const { grads, gradInput } = student.backward(grad);
  opt.step(grads);
  const load = Array.from(gpu ? out.tokensPerExpert.download().data : out.tokensPerExpert);
  const line = progressLine({ step, steps, loss, auxLoss: out.auxLoss, load });
  process.stderr.write(process.stderr.isTTY ? `\r${line}${step === steps ? '\n' : ''}` : step % Math.max(1, Math.round(steps / 10)) === 0 ? `${line}\n` : '');
  free(out.output, out.indices, out.weights, out.logits, out.scores, out.tokensPerExpert, grad, gradInput, ...Object.values(gpu ? grads : {}));
}
if (gpu) moe.synchronize();
const tokensPerSecond = (steps * batch) / ((performance.now() - t0) / 1000);
const finalLoss = evaluate();

// Checkpoint round trip: safetensors with Hugging Face expert keys (an uploaded layer writes a host copy).
const host = (t) => (gpu ? t.download() : t);
const trained = host(student.forward(xs[0]).output);
const path = join(mkdtempSync(join(tmpdir(), 'moe-example-')), 'moe-layer.safetensors');
writeLargeFile(path, student.save('model.layers.0.mlp')); // (writeFileSync stops at 2 GiB)
const { weights: _w, ...options } = config;
const reloaded = MoELayer.load(moe, moe.name === 'wasm' ? new Uint8Array(readFileSync(path)) : path, options, 'model.layers.0.mlp');
if (gpu) reloaded.upload();
const again = host(reloaded.forward(xs[0]).output);
const bytes = (t) => new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
const reloadIdentical = bytes(again).every((v, i) => v === bytes(trained)[i]);

const result = { backend: moe.name, shape, steps, initialLoss, finalLoss, tokensPerSecond, peakBytes: gpu ? moe.peakMemory() : undefined, checkpoint: path, reloadIdentical };
if (args.json) console.log(JSON.stringify(result));
else
  console.log(
    `loss ${initialLoss.toPrecision(4)} -> ${finalLoss.toPrecision(4)}; ${Math.round(tokensPerSecond)} tokens/s; checkpoint ${path} reloads ${reloadIdentical ? 'identically' : 'DIFFERENTLY'}`,
  );
process.exit(finalLoss < (tiny ? 0.5 : 1) * initialLoss && reloadIdentical ? 0 : 1);
