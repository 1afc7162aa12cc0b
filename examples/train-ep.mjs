#!/usr/bin/env node
// Expert-parallel training of a Mixture-of-Experts layer, written out with the public API: N
// ranks, each holding 1/N of the experts and its own batch of tokens, train a student layer to
// imitate a fixed random teacher (mean squared error). Each step a rank routes its tokens,
// sends them to the ranks that hold their experts and gets their outputs back
// (`forwardParallel`), runs the backward pass the same way (`backwardParallel`), sums the
// gradients of the weights every rank holds a copy of over the ranks (`reduceReplicatedGrads`:
// the router), and takes its own AdamW step. Here the ranks live in this process
// (`createInProcessGroup`: on the CPU backends, or with `--device` on one GPU, each rank's layer
// uploaded and the rows moved as device tensors); between GPUs the same code takes an NCCL group
// (`createExpertParallelGroup`, one process per GPU: scripts/ep-launch.mjs --train). At the end
// the router copies must be the same bits on every rank. Build first: `npm run build`.
//
//   node examples/train-ep.mjs [--ranks 4] [--backend auto|cpu|wasm] [--device] [--steps 50] [--json]
import { parseArgs } from 'node:util';

import { AdamW, createBackend, createInProcessGroup, EXPERT_STACKED, MoELayer, mseLoss, reduceReplicatedGrads, tensor, uniformTensor } from '../dist/index.js';

const { values: args } = parseArgs({
  options: { ranks: { type: 'string', default: '4' }, backend: { type: 'string', default: 'auto' }, device: { type: 'boolean' }, steps: { type: 'string', default: '50' }, json: { type: 'boolean' } },
});
const ranks = Number(args.ranks);
const steps = Number(args.steps);
if (!Number.isInteger(ranks) || ranks < 1) throw new RangeError(`--ranks: expected an integer >= 1, got ${args.ranks}`);
if (!Number.isInteger(steps) || steps < 1) throw new RangeError(`--steps: expected an integer >= 1, got ${args.steps}`);
// host tensors on any backend; --device: the cuda backend's device tensors
const moe = await createBackend({ prefer: args.device ? 'cuda' : args.backend });
if (args.device && moe.name !== 'cuda') throw new TypeError(`--device: device tensors need the cuda backend, and this machine has none (got ${moe.name})`);
/** `t` where this run's tensors live. */
const here = (t) => (args.device ? moe.upload(t) : t);
const host = (t) => (args.device ? t.download() : t);

const config = { dim: 16, inter: 32, numExperts: 8, topk: 2, activation: 'swiglu', sharedExpert: { inter: 16 } };
const tokensPerRank = 96;
const teacher = new MoELayer(moe, { ...config, seed: 1, initStd: 0.2 });
const start = new MoELayer(moe, { ...config, seed: 2, initStd: 0.2 });

/** Rank r's weights: its share of the experts, its own copy of the rest. */
function share(weights, r) {
  const { start: e0, end: e1 } = moe.expertRangeForRank(config.numExperts, ranks, r);
  const out = {};
  for (const [key, t] of Object.entries(weights)) {
    if (!t) continue;
    const stacked = EXPERT_STACKED.includes(key);
    const per = stacked ? t.shape.slice(1).reduce((a, b) => a * b, 1) : 0;
    out[key] = stacked ? tensor(t.dtype, [e1 - e0, ...t.shape.slice(1)], t.data.slice(e0 * per, e1 * per)) : tensor(t.dtype, t.shape, t.data.slice());
  }
  return out;
}

const groups = createInProcessGroup(ranks, { timeoutMs: 60_000, ...(args.device ? { device: moe } : {}) });
const layers = groups.map((g) => {
  const l = new MoELayer(moe, { ...config, epSize: ranks, epRank: g.rank, weights: share(start.weights, g.rank) });
  return args.device ? l.upload() : l;
});
const optimizers = layers.map((l) => new AdamW(moe, l.parameters(), { lr: 1e-2, weightDecay: 0.01 }));

const losses = [];
const started = performance.now();
for (let step = 0; step < steps; step++) {
  // each rank its own batch, and the teacher's answer for it
  const xs = groups.map((g) => uniformTensor('float32', [tokensPerRank, config.dim], 1000 * step + g.rank + 1, 1));
  const targets = xs.map((x) => here(teacher.forward(x).output));
  const stepLosses = await Promise.all(
    groups.map(async (group, r) => {
      const f = await layers[r].forwardParallel(group, here(xs[r]));
      const { loss, grad } = mseLoss(moe, f.output, targets[r]);
      const { grads } = await layers[r].backwardParallel(group, grad);
      optimizers[r].step(await reduceReplicatedGrads(group, grads, moe));
      return loss;
    }),
  );
  const mean = stepLosses.reduce((a, b) => a + b, 0) / ranks;
  losses.push(mean);
  if (!args.json && (step % 10 === 0 || step === steps - 1)) console.log(`step ${String(step + 1).padStart(4)}  loss ${mean.toFixed(6)}  (ranks: ${stepLosses.map((l) => l.toFixed(4)).join(' ')})`);
}
const seconds = (performance.now() - started) / 1e3;

// the copies of the router and the shared expert: the same bits on every rank
const replicated = ['routerWeight', 'sharedGateAndUpProjs', 'sharedDownProjs'];
const copies = layers.map((l) => Object.fromEntries(replicated.map((key) => [key, host(l.weights[key]).data])));
const replicasIdentical = replicated.every((key) => copies.every((c) => c[key].every((v, i) => Object.is(v, copies[0][key][i]))));
const result = {
  backend: moe.name,
  tensors: args.device ? 'device' : 'host',
  ranks,
  steps,
  tokensPerStep: ranks * tokensPerRank,
  initialLoss: losses[0],
  finalLoss: losses.at(-1),
  replicasIdentical,
  tokensPerSecond: (steps * ranks * tokensPerRank) / seconds,
};
if (args.json) console.log(JSON.stringify(result));
else
  console.log(
    `${ranks} ranks on ${moe.name}: loss ${result.initialLoss.toFixed(5)} -> ${result.finalLoss.toFixed(5)} in ${steps} steps, ${Math.round(result.tokensPerSecond)} tokens/s; router and shared expert identical on every rank: ${replicasIdentical}`,
  );
if (!replicasIdentical) process.exitCode = 1;
