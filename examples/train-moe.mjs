#!/usr/bin/env node
// Trains a small Mixture-of-Experts layer from Node on the best available backend
// (cuda, then the native CPU addon, then wasm), written out step by step with the public API:
// a student MoELayer learns to imitate a fixed random teacher layer (MSE + load-balancing
// loss) with Adam, a progress bar shows the loss and the tokens each expert gets, and the
// trained layer is saved as a safetensors checkpoint (Hugging Face expert keys), loaded back
// and checked to give identical outputs. `moe-dispatch train` runs the same recipe
// (ts/train.ts). Build first: `npm run build`.
//
//   node examples/train-moe.mjs [--backend auto|cuda|cpu|wasm] [--steps 100] [--json]
import { readFileSync, writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { createBackend, MoELayer, normalRng, progressLine } from '../dist/index.js';

const { values: args } = parseArgs({ options: { backend: { type: 'string', default: 'auto' }, steps: { type: 'string', default: '100' }, json: { type: 'boolean' } } });
const steps = Number(args.steps);
const moe = await createBackend({ prefer: args.backend });
const config = { dim: 16, inter: 32, numExperts: 8, topk: 2, activation: 'swiglu', scoreFunction: 'softmax', auxLossCoeff: 0.01, bias: true };
const f32 = (shape, data) => ({ dtype: 'float32', shape, data });
const mse = (a, b) => a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0) / a.length;

// The task: inputs are standard normal, targets come from a fixed random teacher.
const teacher = new MoELayer(moe, { ...config, seed: 1007, initStd: 0.5, auxLossCoeff: 0 });
const [batch, dim] = [128, config.dim];
const normal = normalRng(7);
const x = f32([4 * batch, dim], Float32Array.from({ length: 4 * batch * dim }, () => normal()));
const y = teacher.forward(x).output.data;

// The student and a plain Adam over its parameters (updated in place).
const student = new MoELayer(moe, { ...config, seed: 7, initStd: 0.1 });
const state = {};
const adam = (t, lr = 0.02, b1 = 0.9, b2 = 0.999) => (name, p, g) => {
  const s = (state[name] ??= { m: new Float32Array(p.length), v: new Float32Array(p.length) });
  for (let i = 0; i < p.length; i++) {
    s.m[i] = b1 * s.m[i] + (1 - b1) * g[i];
    s.v[i] = b2 * s.v[i] + (1 - b2) * g[i] * g[i];
    p[i] -= (lr * s.m[i]) / (1 - b1 ** t) / (Math.sqrt(s.v[i] / (1 - b2 ** t)) + 1e-8);
  }
};

const initialLoss = mse(student.forward(x).output.data, y);
process.stderr.write(`training on ${moe.name} (${moe.threads} threads): ${steps} steps\n`);
for (let step = 1; step <= steps; step++) {
  const rows = [((step - 1) % 4) * batch * dim, (((step - 1) % 4) + 1) * batch * dim];
  const xb = f32([batch, dim], x.data.subarray(...rows));
  const yb = y.subarray(...rows);
  const out = student.forward(xb);
  const gradOut = Float32Array.from(out.output.data, (v, i) => (2 * (v - yb[i])) / yb.length);
  const { grads } = student.backward(f32([batch, dim], gradOut));
  const update = adam(step);
  for (const [name, p] of Object.entries(student.weights)) update(name, p.data, grads[name].data);
  const line = progressLine({ step, steps, loss: mse(out.output.data, yb), auxLoss: out.auxLoss, load: Array.from(out.tokensPerExpert) });
  process.stderr.write(process.stderr.isTTY ? `\r${line}${step === steps ? '\n' : ''}` : step % Math.max(1, steps / 10) === 0 ? `${line}\n` : '');
}
const trained = student.forward(x);
const finalLoss = mse(trained.output.data, y);

// Checkpoint round trip: safetensors with Hugging Face expert keys.
const path = join(mkdtempSync(join(tmpdir(), 'moe-example-')), 'moe-layer.safetensors');
writeFileSync(path, student.save('model.layers.0.mlp'));
const { bias, ...options } = config;
const reloaded = MoELayer.load(moe, moe.name === 'wasm' ? new Uint8Array(readFileSync(path)) : path, options, 'model.layers.0.mlp');
const again = reloaded.forward(x).output.data;
const reloadIdentical = again.every((v, i) => Object.is(v, trained.output.data[i]));

const result = { backend: moe.name, steps, initialLoss, finalLoss, finalLoad: Array.from(trained.tokensPerExpert), checkpoint: path, reloadIdentical };
if (args.json) console.log(JSON.stringify(result));
else console.log(`loss ${initialLoss.toFixed(4)} -> ${finalLoss.toFixed(4)}; per-expert load ${result.finalLoad.join(' ')}; checkpoint ${path} reloads ${reloadIdentical ? 'identically' : 'DIFFERENTLY'}`);
process.exit(finalLoss < 0.5 * initialLoss && reloadIdentical ? 0 : 1);
