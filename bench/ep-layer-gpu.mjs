/**
 * The MoE layer's step on one GPU through expert parallelism's path (issue 20) against the
 * one-rank path, in one process: `MoELayer` uploaded at the training shapes (bench/shapes.json's
 * layer shapes; bf16 swiglu, softmax top-k, aux loss), `forward(x)` + `backward(g)` against
 * `forwardParallel(group, x)` + `backwardParallel(group, g)` with a group of one over NCCL (the
 * transport a multi-GPU run uses; with one rank it moves the rows GPU to itself). What the
 * expert-parallel path adds on one rank: the send and receive permutes, the exchanges and their
 * bookkeeping (the counts read back), combine's two unpermutes and the backward's mirror images.
 * Checks that both paths give the same bits (output, input gradient, every weight gradient).
 *
 *   node bench/ep-layer-gpu.mjs [--iters N] [--warmup N] [--shapes NAMES] [--out FILE] [--dist DIR]
 *
 * Per shape: localMs and epMs, each the median over `iters` of one forward + backward, wall clock
 * from a synchronised GPU to the synchronize after the backward (interleaved: local, then EP, each
 * iteration), and `epOverLocal`; `sameBits`; `local.moved` / `ep.moved`: one step's copies and
 * waits for the GPU (`transfers()` before and after it, less the synchronize after it).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

import { shapeNames } from './shapes.mjs';

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const dist = resolve(arg('dist', new URL('../dist/', import.meta.url).pathname));
const lib = await import(pathToFileURL(resolve(dist, 'index.js')).href);
const { MoELayer, TRAIN_SHAPES, createBackend, createExpertParallelGroup, uniformTensor } = lib;
const iters = Number(arg('iters', '10'));
const warmup = Number(arg('warmup', '2'));
const names = shapeNames(arg('shapes', 'fine-grained,deepseek-v3-ep8'), TRAIN_SHAPES);
process.env.NCCL_NVLS_ENABLE = '0';

const moe = await createBackend({ prefer: 'cuda' });
if (moe.name !== 'cuda') throw new Error(`ep-layer-gpu: no cuda backend here (got ${moe.name})`);
if (!lib.ncclInfo().available) throw new Error(`ep-layer-gpu: NCCL unavailable: ${lib.ncclInfo().reason}`);
const dir = mkdtempSync(join(tmpdir(), 'ep-layer-'));
const group = await createExpertParallelGroup({ rank: 0, size: 1, rendezvous: join(dir, 'id'), timeoutMs: 60_000 });

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const bits = (t) => {
  const h = t.download();
  return Buffer.from(h.data.buffer, h.data.byteOffset, h.data.byteLength);
};
const results = (f, b) => [f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert, b.gradInput, ...Object.values(b.grads)];

const rows = [];
for (const name of names) {
  const { batch: T, layer: options } = TRAIN_SHAPES[name];
  const { dim, inter, numExperts: E } = options;
  moe.releaseCachedMemory();
  const weights = {
    routerWeight: uniformTensor('bfloat16', [dim, E], 1, 1 / Math.sqrt(dim)),
    gateAndUpProjs: uniformTensor('bfloat16', [E, dim, 2 * inter], 2, 1 / Math.sqrt(dim)),
    downProjs: uniformTensor('bfloat16', [E, inter, dim], 3, 1 / Math.sqrt(inter)),
  };
  const layer = new MoELayer(moe, { ...options, weights }).upload();
  const x = moe.upload(uniformTensor('bfloat16', [T, dim], 4, 1));
  const g = moe.upload(uniformTensor('bfloat16', [T, dim], 5, 1 / Math.sqrt(T * dim)));
  const local = async () => {
    const f = layer.forward(x);
    return { f, b: layer.backward(g) };
  };
  const ep = async () => {
    const f = await layer.forwardParallel(group, x);
    return { f, b: await layer.backwardParallel(group, g) };
  };
  // the same bits either way
  const a = await local();
  const aBits = results(a.f, a.b).map(bits);
  const c = await ep();
  const cBits = results(c.f, c.b).map(bits);
  const sameBits = aBits.length === cBits.length && aBits.every((v, i) => v.equals(cBits[i]));
  for (const t of [...results(a.f, a.b), ...results(c.f, c.b)]) t.dispose();
  const paths = [
    ['local', local],
    ['ep', ep],
  ];
  /** One step from a synchronised GPU to the synchronize after it: its wall time and the transfers() counters around it. */
  const stepOf = async (run) => {
    moe.synchronize();
    const [t0, c0] = [performance.now(), moe.transfers()];
    const { f, b } = await run();
    moe.synchronize();
    const [ms, c1] = [performance.now() - t0, moe.transfers()];
    for (const t of results(f, b)) t.dispose();
    // (less the synchronize after the step)
    return { ms, moved: Object.fromEntries(Object.keys(c1).map((k) => [k, c1[k] - c0[k] - (k === 'synchronizations' ? 1 : 0)])) };
  };
  // one step's copies and waits, each path
  const moved = {};
  for (const [key, run] of paths) moved[key] = (await stepOf(run)).moved;
  const times = { local: [], ep: [] };
  for (let i = 0; i < warmup + iters; i++) {
    for (const [key, run] of paths) {
      const { ms } = await stepOf(run);
      if (i >= warmup) times[key].push(ms);
    }
  }
  const row = { shape: name, T, ...options, localMs: median(times.local), epMs: median(times.ep), sameBits, moved, localAll: times.local, epAll: times.ep };
  row.epOverLocal = row.epMs / row.localMs;
  console.log(
    `${name}: local ${row.localMs.toFixed(3)} ms, expert-parallel (one NCCL rank) ${row.epMs.toFixed(3)} ms (${row.epOverLocal.toFixed(3)}x), same bits: ${sameBits}; one step's copies and waits ${JSON.stringify(moved)}`,
  );
  rows.push(row);
  layer.dispose();
  x.dispose();
  g.dispose();
}
await group.destroy();
rmSync(dir, { recursive: true, force: true });
const out = arg('out');
const doc = {
  kind: 'ep-layer-gpu',
  date: new Date().toISOString(),
  device: (await lib.backendInfo()).find((i) => i.name === 'cuda')?.device,
  nccl: lib.ncclInfo().version,
  iters,
  warmup,
  shapes: rows,
};
if (out) writeFileSync(out, `${JSON.stringify(doc, null, 1)}\n`);
