#!/usr/bin/env node
/**
 * `node bench/webgpu.mjs`: permute / unpermute / route and the grouped experts on the webgpu backend next to wasm, in
 * the same headless Chromium page (bench/webgpu.html, bench/webgpu-bench.mjs). On these machines
 * Chromium's WebGPU adapter is SwiftShader, a software (CPU) implementation of the GPU: the
 * numbers say what the shaders cost on 2 CPU cores, not what a real GPU does. Writes
 * bench/results/<date>-webgpu.json and prints a markdown table. Needs a build (npm run build).
 *
 *   node bench/webgpu.mjs [--iters N] [--out FILE] [--tokens T --hidden H --experts E --topk K] [--part all|layout|experts]
 *
 * `--part experts`: only the grouped experts (expertsForward / expertsBackward, 2048 rows, dim 256,
 * inter 256, E = 8; bench/webgpu-bench.mjs benchExperts), next to wasm.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';

import { CHROMIUM, launchOptions, runBenchPage } from '../scripts/chromium.mjs';

const { values: args } = parseArgs({
  options: {
    iters: { type: 'string' },
    out: { type: 'string' },
    tokens: { type: 'string' },
    hidden: { type: 'string' },
    experts: { type: 'string' },
    topk: { type: 'string' },
    part: { type: 'string' },
  },
});
const part = args.part ?? 'all';
if (!['all', 'layout', 'experts'].includes(part)) throw new TypeError(`--part: expected all, layout or experts, got ${part}`);
const shape = { T: Number(args.tokens ?? 4096), H: Number(args.hidden ?? 1024), E: Number(args.experts ?? 64), k: Number(args.topk ?? 4), iters: Number(args.iters ?? 10), part };

const res = await runBenchPage('bench/webgpu.html', shape);

const date = new Date().toISOString().slice(0, 10);
const out = args.out ?? `bench/results/${date}-webgpu.json`;
const result = {
  date,
  shape,
  machine: { cpu: cpus()[0]?.model, cores: cpus().length },
  chromium: { binary: CHROMIUM, flags: launchOptions.args, userAgent: res.userAgent },
  adapter: res.adapter,
  note: "SwiftShader is a software WebGPU adapter (the GPU emulated on the CPU): these times are not a real GPU's. WebGPU rows: tokens on the GPU, routing inputs on the host, each call timed until its results are written.",
  rows: res.rows,
  experts: res.experts,
};
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
console.log(`| op | dtype | backend | ms | GB/s | same bits as wasm |\n|---|---|---|---|---|---|`);
for (const r of res.rows)
  console.log(`| ${r.op} | ${r.dtype} | ${r.backend}${r.onGpu === false ? ' (on wasm inside)' : ''} | ${(r.seconds * 1e3).toFixed(2)} | ${r.gbPerSecond.toFixed(2)} | ${r.sameBitsAsWasm ?? ''} |`);
console.log(`\n| op | dtype | backend | rows x dim x inter, E | ms | GFLOP/s | same bits as wasm |\n|---|---|---|---|---|---|---|`);
for (const r of res.experts)
  console.log(
    `| ${r.op} | ${r.dtype} | ${r.backend} | ${r.rows} x ${r.dim} x ${r.inter}, ${r.experts} | ${(r.seconds * 1e3).toFixed(2)} | ${r.gflopPerSecond.toFixed(2)} | ${r.sameBitsAsWasm ?? ''} |`,
  );
console.log(`\n${res.adapter}; written to ${out}`);
