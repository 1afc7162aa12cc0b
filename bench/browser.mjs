#!/usr/bin/env node
/**
 * `npm run bench:browser`: permute/unpermute throughput of the wasm backend in headless Chromium
 * next to the same in Node (wasm), and the native backend (all threads, and one thread), at
 * T=4096, H=1024, E=64, k=4, float32 and bfloat16. Writes bench/results/<date>-browser.json
 * and prints a markdown table. Needs a build (npm run build) and Debian's chromium.
 *
 *   node bench/browser.mjs [--iters N] [--rounds R] [--out FILE] [--tokens T --hidden H --experts E --topk K]
 *
 * The machine is shared (2 cores), so the four configurations run in R rounds (default 3),
 * one after another within each round; each row reports the best round's median, and the JSON
 * keeps every round's median.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { CHROMIUM, runBenchPage } from '../scripts/chromium.mjs';
import { benchPermute } from './permute-bench.mjs';

const { values: args } = parseArgs({
  options: {
    iters: { type: 'string' },
    rounds: { type: 'string' },
    out: { type: 'string' },
    tokens: { type: 'string' },
    hidden: { type: 'string' },
    experts: { type: 'string' },
    topk: { type: 'string' },
    'node-only': { type: 'string' },
  },
});
const shape = { T: Number(args.tokens ?? 4096), H: Number(args.hidden ?? 1024), E: Number(args.experts ?? 64), k: Number(args.topk ?? 4), iters: Number(args.iters ?? 10) };

const api = await import('../dist/index.js');
const random = await import('../dist/random.js');

// Child mode: one backend in this process (used for the single-threaded native run).
if (args['node-only']) {
  const rows = await benchPermute(api, random, { ...shape, prefer: args['node-only'], label: process.env.BENCH_LABEL ?? args['node-only'] });
  process.stdout.write(JSON.stringify(rows));
  process.exit(0);
}

const log = (s) => process.stderr.write(`${s}\n`);
const rounds = Math.max(1, Number(args.rounds ?? 3));
const all = [];
let userAgent;
const info = await api.backendInfo();
const cpuInfo = info.find((i) => i.name === 'cpu');

async function chromiumRun() {
  const res = await runBenchPage('bench/browser.html', shape);
  userAgent = res.userAgent;
  return res.rows;
}

function singleThreadRun() {
  const child = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--node-only', 'cpu', ...process.argv.slice(2)], {
    env: { ...process.env, RAYON_NUM_THREADS: '1', BENCH_LABEL: 'cpu (1 thread)' },
    encoding: 'utf8',
    maxBuffer: 1 << 24,
  });
  if (child.status !== 0) throw new Error(`single-threaded native run failed: ${child.stderr}`);
  return JSON.parse(child.stdout);
}

for (let round = 0; round < rounds; round++) {
  const add = (rows) => all.push(...rows.map((r) => ({ ...r, round })));
  add(await chromiumRun());
  add(await benchPermute(api, random, { ...shape, prefer: 'wasm', label: 'wasm (node)' }));
  if (cpuInfo?.available) {
    add(await benchPermute(api, random, { ...shape, prefer: 'cpu', label: `cpu (${cpuInfo.threads} threads)` }));
    add(singleThreadRun());
  }
  log(`round ${round + 1}/${rounds} done`);
}

// Per (backend, op, dtype): the best round's median.
const rows = [];
for (const r of all.filter((x) => x.round === 0)) {
  const same = all.filter((x) => x.backend === r.backend && x.op === r.op && x.dtype === r.dtype);
  const best = same.reduce((a, b) => (b.seconds < a.seconds ? b : a));
  const { round: _round, ...row } = best;
  rows.push(r.op.startsWith('checksum') ? { ...row, checksums: same.map((x) => x.checksum) } : { ...row, gbPerSecond: row.bytes / row.seconds / 1e9, roundSeconds: same.map((x) => x.seconds) });
}

const timed = rows.filter((r) => !r.op.startsWith('checksum'));
const checks = all.filter((r) => r.op.startsWith('checksum'));
// Every backend must have computed the same unpermute, bit for bit.
for (const dtype of ['float32', 'bfloat16']) {
  const sums = new Set(checks.filter((c) => c.dtype === dtype).map((c) => c.checksum));
  if (sums.size !== 1) throw new Error(`${dtype}: the backends' unpermute outputs differ (checksums ${[...sums].join(', ')})`);
}
const single = (op, dtype) => timed.find((r) => r.backend === 'cpu (1 thread)' && r.op === op && r.dtype === dtype);
for (const r of timed) {
  const s = single(r.op, r.dtype);
  if (s) r.vsNative1Thread = r.seconds / s.seconds;
}

const date = new Date().toISOString();
const result = {
  date,
  machine: { cpus: cpus().length, model: cpus()[0]?.model ?? 'unknown', node: process.version, chromium: userAgent, chromiumPath: CHROMIUM, platform: `${process.platform}-${process.arch}` },
  shape: { tokens: shape.T, hidden: shape.H, experts: shape.E, topk: shape.k },
  iterations: shape.iters,
  rounds,
  note: 'per row the best of `rounds` rounds (roundSeconds has them all), each the median of `iterations` runs after one warm-up; GB/s counts bytes read plus written; every op returns freshly allocated outputs; vsNative1Thread = time / time of the native backend with RAYON_NUM_THREADS=1 (lower is better)',
  rows: timed,
  checksums: rows.filter((r) => r.op.startsWith('checksum')).map(({ backend, dtype, checksums }) => ({ backend, dtype, checksums })),
};
const out = args.out ?? `bench/results/${date.slice(0, 10)}-browser.json`;
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);

const lines = ['| backend | op | dtype | time (ms) | GB/s | time vs native 1 thread |', '|---|---|---|---:|---:|---:|'];
for (const r of timed)
  lines.push(`| ${r.backend} | ${r.op} | ${r.dtype} | ${(r.seconds * 1e3).toFixed(2)} | ${r.gbPerSecond.toFixed(2)} | ${r.vsNative1Thread ? `${r.vsNative1Thread.toFixed(2)}x` : '-'} |`);
console.log(`permute/unpermute, T=${shape.T} H=${shape.H} E=${shape.E} k=${shape.k}, best of ${rounds} rounds of a median of ${shape.iters}; ${result.machine.cpus} CPUs (${result.machine.model})`);
console.log(lines.join('\n'));
console.log(`written to ${out}`);
