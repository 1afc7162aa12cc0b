#!/usr/bin/env node
// Times the expert GEMMs on the CPU backends: a float32 matmul (M = K = N = 1024) and the
// grouped experts forward / backward (N = 2048 slots, dim 512, inter 1024, 8 experts of 256
// slots, swiglu, with probs; the forward also into a reused output, options.out), median of 5
// runs after a warm-up. GFLOP/s counts 2 flops per multiply-add: forward 2*N*dim*3*inter,
// backward 2*N*dim*8*inter (it recomputes the up-projection). Prints a table, writes
// bench/results/<date>-experts-cpu.json.
// Run after `npm run build`: node bench/experts-cpu.mjs [--out FILE]
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';

import { createBackend } from '../dist/index.js';

const { values: args } = parseArgs({ options: { out: { type: 'string' }, iters: { type: 'string', default: '5' } } });
const iters = Number(args.iters);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const time = (f) => {
  f();
  return median(
    Array.from({ length: iters }, () => {
      const t = performance.now();
      f();
      return (performance.now() - t) / 1e3;
    }),
  );
};
const fill = (n, seed) => Float32Array.from({ length: n }, (_, i) => (((i + seed) * 7919) % 1000) / 1000 - 0.5);
const t = (shape, data) => ({ dtype: 'float32', shape, data });

const [M, N, D, I, E] = [1024, 2048, 512, 1024, 8];
const a = t([M, M], fill(M * M, 1));
const x = t([N, D], fill(N * D, 2));
const tpe = { dtype: 'int32', shape: [E], data: new Int32Array(E).fill(N / E) };
const weights = { gateAndUpProjs: t([E, D, 2 * I], fill(E * D * 2 * I, 3)), downProjs: t([E, I, D], fill(E * I * D, 4)) };
const options = { activation: 'swiglu', permutedProbs: t([N], new Float32Array(N).fill(0.5)) };
const reused = t([N, D], new Float32Array(N * D));

const rows = [];
for (const name of ['cpu', 'wasm']) {
  let moe;
  try {
    moe = await createBackend({ prefer: name });
  } catch {
    continue;
  }
  const cases = [
    ['matmul 1024x1024x1024', 2 * M ** 3, () => moe.matmul(a, a)],
    [`expertsForward N=${N} dim=${D} inter=${I} E=${E}`, 2 * N * D * 3 * I, () => moe.expertsForward(x, tpe, weights, options)],
    [`expertsForward (out) N=${N} dim=${D} inter=${I} E=${E}`, 2 * N * D * 3 * I, () => moe.expertsForward(x, tpe, weights, { ...options, out: reused })],
    [`expertsBackward N=${N} dim=${D} inter=${I} E=${E}`, 2 * N * D * 8 * I, () => moe.expertsBackward(x, x, tpe, weights, options)],
  ];
  for (const [op, flops, f] of cases) {
    const seconds = time(f);
    rows.push({ backend: name, threads: moe.threads, op, seconds, gflops: flops / seconds / 1e9 });
  }
}
const result = { date: new Date().toISOString(), node: process.version, machine: { cpus: cpus().length, model: cpus()[0]?.model }, iters, rows };
console.log('| backend | threads | op | time (ms) | GFLOP/s |\n|---|---:|---|---:|---:|');
for (const r of rows) console.log(`| ${r.backend} | ${r.threads} | ${r.op} | ${(r.seconds * 1e3).toFixed(1)} | ${r.gflops.toFixed(1)} |`);
const out = args.out ?? `bench/results/${result.date.slice(0, 10)}-experts-cpu.json`;
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
console.log(`wrote ${out}`);
