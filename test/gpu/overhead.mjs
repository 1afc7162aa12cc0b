// Per-call cost of the cuda backend from JavaScript, next to the cpu backend (not a test: prints
// JSON). Tiny ops show the fixed overhead of a call (argument checks, uploads, a launch, the
// download and its synchronisation); a mid-size op shows the host<->GPU transfers of the
// host-tensor path. Run where CUDA is available: node test/gpu/overhead.mjs [--out FILE]
import { writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const distDir = process.env.MOE_DISPATCH_DIST ? resolve(process.env.MOE_DISPATCH_DIST) : fileURLToPath(new URL('../../dist/', import.meta.url));
const lib = await import(pathToFileURL(resolve(distDir, 'index.js')).href);
const { randomRouting, rng } = await import(pathToFileURL(resolve(distDir, 'random.js')).href);

const infos = await lib.backendInfo();
const info = infos.find((i) => i.name === 'cuda');
if (!info?.available) {
  console.log(JSON.stringify({ skipped: `CUDA unavailable: ${info?.reason}` }));
  process.exit(0);
}
const backends = { cuda: await lib.createBackend({ prefer: 'cuda' }), cpu: await lib.createBackend({ prefer: 'cpu' }) };

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}
function time(iters, f) {
  for (let i = 0; i < Math.min(50, iters); i++) f();
  const ts = [];
  for (let i = 0; i < iters; i++) {
    const t0 = process.hrtime.bigint();
    f();
    ts.push(Number(process.hrtime.bigint() - t0) / 1e3);
  }
  return { medianUs: median(ts), minUs: Math.min(...ts) };
}

const rows = [];
for (const p of [
  { name: 'tiny', numTokens: 4, numExperts: 4, topk: 2, hidden: 8, dtype: 'float32', iters: 2000 },
  { name: 'mid', numTokens: 4096, numExperts: 256, topk: 8, hidden: 7168, dtype: 'bfloat16', iters: 10 },
]) {
  const r = randomRouting(p, rng(7), 0);
  const m = backends.cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
  for (const [name, b] of Object.entries(backends)) {
    const perm = b.permute(r.tokens, m.routingMap, { probs: m.probs });
    const permute = time(p.iters, () => b.permute(r.tokens, m.routingMap, { probs: m.probs }));
    const unpermute = time(p.iters, () => b.unpermute(perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], { probs: perm.permutedProbs }));
    rows.push({ shape: p.name, dims: `T=${p.numTokens} H=${p.hidden} E=${p.numExperts} k=${p.topk} ${p.dtype}`, backend: name, permute, unpermute });
  }
}
const out = { device: info.device, node: process.version, rows };
const i = process.argv.indexOf('--out');
if (i > 0) writeFileSync(process.argv[i + 1], JSON.stringify(out, null, 1));
for (const r of rows) console.log(`${r.shape.padEnd(5)} ${r.backend.padEnd(5)} permute ${r.permute.medianUs.toFixed(1).padStart(9)} us  unpermute ${r.unpermute.medianUs.toFixed(1).padStart(9)} us  (${r.dims})`);
