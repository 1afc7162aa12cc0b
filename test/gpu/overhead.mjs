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
// Device tensors: the same tiny problem with inputs and outputs on the GPU. Launches are
// asynchronous, so a call's time is its host-side cost (argument checks, N-API, launch); ops
// that must read a value back (permute without dropAndPad: the slot count; route: its error
// word) synchronise once. 'synchronize' alone is the floor of a round trip.
const deviceRows = [];
{
  const cudaB = backends.cuda;
  const p = { numTokens: 4, numExperts: 4, topk: 2, hidden: 8, dtype: 'float32' };
  const r = randomRouting(p, rng(7), 0);
  const m = backends.cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
  const tokens = cudaB.upload(r.tokens);
  const map = cudaB.upload(m.routingMap);
  const probs = cudaB.upload(m.probs);
  const logits = cudaB.upload(lib.tensor('float32', [4, 4], Float32Array.from([0.1, 0.4, -1, 2, 0.3, 0.2, 0.1, 0, 1, 2, 3, 4, -4, -3, -2, -1])));
  const perm = cudaB.permute(tokens, map, { probs });
  const iters = 5000;
  const disposeOut = (o) => {
    if (lib.isDeviceTensor(o)) o.dispose();
    else for (const v of Object.values(o)) if (lib.isDeviceTensor(v)) v.dispose();
  };
  const cases = {
    'synchronize (round trip floor)': () => cudaB.synchronize(),
    'unpermute+probs (plan carried, async)': () => disposeOut(cudaB.unpermute(perm.permutedTokens, perm.sortedIndices, [4, 8], { probs: perm.permutedProbs })),
    'unpermute+probs + synchronize': () => {
      disposeOut(cudaB.unpermute(perm.permutedTokens, perm.sortedIndices, [4, 8], { probs: perm.permutedProbs }));
      cudaB.synchronize();
    },
    'permute+probs dropAndPad (plan on GPU, async)': () => disposeOut(cudaB.permute(tokens, map, { probs, dropAndPad: true, numOutTokens: 8 })),
    'permute+probs (plan on GPU, 1 sync)': () => disposeOut(cudaB.permute(tokens, map, { probs })),
    'route sigmoid k=2 (1 sync)': () => disposeOut(cudaB.route(logits, { topk: 2, scoreFunction: 'sigmoid' })),
    'topk k=2 (1 sync)': () => disposeOut(cudaB.topk(logits, 2)),
  };
  for (const [name, f] of Object.entries(cases)) deviceRows.push({ op: name, ...time(iters, f) });
  // The JS call against the same op called from Rust in this process (the addon's
  // cudaTimeRustUnpermute: no N-API, no facade), interleaved in blocks of calls, each block
  // starting on an idle GPU: what a JS call costs above the bare Rust call, without and with a
  // synchronize after each call.
  const { loadNative } = await import(pathToFileURL(resolve(distDir, 'backends/native.js')).href);
  const { nativeHandle } = await import(pathToFileURL(resolve(distDir, 'device.js')).href);
  const addon = loadNative().binding;
  if (typeof addon.cudaTimeRustUnpermute === 'function') {
    const [hTok, hIdx, hProbs] = [perm.permutedTokens, perm.sortedIndices, perm.permutedProbs].map(nativeHandle);
    const samples = { js: { false: [], true: [] }, rust: { false: [], true: [] } };
    for (let round = 0; round < 24; round++) {
      for (const sync of [false, true]) {
        cudaB.synchronize();
        for (let i = 0; i < 200; i++) {
          const t0 = process.hrtime.bigint();
          disposeOut(cudaB.unpermute(perm.permutedTokens, perm.sortedIndices, [4, 8], { probs: perm.permutedProbs }));
          if (sync) cudaB.synchronize();
          samples.js[sync].push(Number(process.hrtime.bigint() - t0) / 1e3);
        }
        cudaB.synchronize();
        samples.rust[sync].push(...addon.cudaTimeRustUnpermute({ permutedTokens: hTok, sortedIndices: hIdx, restoreShape: [4, 8], probs: hProbs, iters: 200, sync }));
      }
    }
    for (const sync of [false, true]) {
      const js = { medianUs: median(samples.js[sync]), minUs: Math.min(...samples.js[sync]) };
      const rust = { medianUs: median(samples.rust[sync]), minUs: Math.min(...samples.rust[sync]) };
      const how = sync ? '+ synchronize' : 'async';
      deviceRows.push({ op: `unpermute+probs ${how}: JS call (interleaved)`, ...js });
      deviceRows.push({ op: `unpermute+probs ${how}: the same op from Rust, in process`, ...rust });
      deviceRows.push({ op: `unpermute+probs ${how}: JS above Rust (difference of medians)`, medianUs: js.medianUs - rust.medianUs, minUs: js.minUs - rust.minUs });
    }
  }
  cudaB.synchronize();
  for (const r of deviceRows) console.log(`tiny  device ${r.op.padEnd(60)} ${r.medianUs.toFixed(1).padStart(8)} us (min ${r.minUs.toFixed(1)})`);
}

const out = { device: info.device, node: process.version, rows, deviceRows };
const i = process.argv.indexOf('--out');
if (i > 0) writeFileSync(process.argv[i + 1], JSON.stringify(out, null, 1));
for (const r of rows)
  console.log(`${r.shape.padEnd(5)} ${r.backend.padEnd(5)} permute ${r.permute.medianUs.toFixed(1).padStart(9)} us  unpermute ${r.unpermute.medianUs.toFixed(1).padStart(9)} us  (${r.dims})`);
