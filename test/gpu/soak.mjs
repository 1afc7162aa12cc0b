// Soak for device-memory leaks on the GPU machine (not a test of node:test: prints a table and
// JSON, exits 1 on a leak). 100k small and 1k large ops on device tensors through the cuda
// backend; one result in four is left to the garbage collector (the finalizer must free it), the
// others are disposed. Each phase first runs its loop once (the warm-up: the memory pool grows
// to what the loop needs, since it keeps freed memory for reuse), then again; after the second
// loop, once the garbage is collected, the bytes held by live device buffers must be back at
// their level after the warm-up, the driver's free memory must not have shrunk by more than a
// slack (a leak would take it all), and RSS must stay flat.
//
//   node --expose-gc test/gpu/soak.mjs [--small N] [--large N] [--out FILE]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { cuda, cudaInfo, lib, rng, skip, tensor } from './common.mjs';

const { values: opts } = parseArgs({ options: { small: { type: 'string' }, large: { type: 'string' }, out: { type: 'string' } } });
if (skip || !cudaInfo?.available) {
  console.log(JSON.stringify({ skipped: skip || 'CUDA unavailable' }));
  process.exit(0);
}
const SMALL = Number(opts.small ?? 100_000);
const LARGE = Number(opts.large ?? 1_000);
const gc = globalThis.gc ?? (() => {});
const rand = rng(99);
const f32 = (shape) =>
  tensor(
    'float32',
    shape,
    Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rand() * 2 - 1),
  );
const up = (t) => cuda.upload(t);

function release(out, i) {
  if (i % 4 === 3) return; // left to the garbage collector
  if (lib.isDeviceTensor(out)) out.dispose();
  else if (out && typeof out === 'object') for (const v of Object.values(out)) if (lib.isDeviceTensor(v)) v.dispose();
}

function ops(T, H, E) {
  const logits = up(f32([T, E]));
  const routed = cuda.route(logits, { topk: 2 });
  const { routingMap, probs } = cuda.indicesToMultihot(routed.indices, routed.weights, E);
  const tokens = up(f32([T, H]));
  const perm = cuda.permute(tokens, routingMap, { probs });
  const x = up(f32([T * 2, 2 * H]));
  const w = { gateAndUpProjs: up(f32([E, H, 2 * H])), downProjs: up(f32([E, H, H])) };
  return [
    () => cuda.route(logits, { topk: 2, scoreFunction: 'sigmoid', normTopkProb: true }),
    () => cuda.indicesToMultihot(routed.indices, routed.weights, E),
    () => cuda.permute(tokens, routingMap, { probs }),
    () => cuda.permute(tokens, routingMap, { probs, numOutTokens: 2 * T }),
    () => cuda.unpermute(perm.permutedTokens, perm.sortedIndices, [T, H], { probs: perm.permutedProbs }),
    () => cuda.permuteBackward(perm.permutedTokens, perm.sortedIndices, T),
    () => cuda.activation(x, { kind: 'swiglu' }),
    () => cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, w, { activation: 'swiglu', permutedProbs: perm.permutedProbs }),
    () => cuda.zLoss(logits),
    () => {
      try {
        cuda.permute(tokens, routingMap, { numOutTokens: 3 }); // the core's RangeError
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
      }
    },
  ];
}

async function settle() {
  for (let j = 0; j < 4; j++) {
    gc();
    await new Promise((r) => setImmediate(r));
  }
  cuda.synchronize();
}

const MiB = (n) => +(n / 2 ** 20).toFixed(1);
const results = [];
const problems = [];
for (const [phase, count, dims] of [
  ['small', SMALL, [8, 16, 4]],
  ['large', LARGE, [4096, 512, 16]],
]) {
  const list = ops(...dims);
  const every = phase === 'small' ? 5000 : 100;
  const loop = async (n) => {
    for (let i = 0; i < n; i++) {
      release(list[i % list.length](), i);
      if (i % every === every - 1) await settle();
    }
    await settle();
  };
  await loop(Math.min(count, 10 * every));
  const warm = { ...cuda.memory(), rss: process.memoryUsage().rss };
  const t0 = Date.now();
  await loop(count);
  const end = { ...cuda.memory(), rss: process.memoryUsage().rss };
  const row = {
    phase,
    calls: count,
    seconds: (Date.now() - t0) / 1e3,
    liveBytes: [warm.liveBytes, end.liveBytes],
    liveBuffers: [warm.liveBuffers, end.liveBuffers],
    freeMiB: [MiB(warm.freeBytes), MiB(end.freeBytes)],
    rssMiB: [MiB(warm.rss), MiB(end.rss)],
  };
  results.push(row);
  console.log(
    `${phase}: ${count} calls in ${row.seconds.toFixed(1)} s; live device bytes ${warm.liveBytes} -> ${end.liveBytes} (${warm.liveBuffers} -> ${end.liveBuffers} buffers); free ${row.freeMiB[0]} -> ${row.freeMiB[1]} MiB; rss ${row.rssMiB[0]} -> ${row.rssMiB[1]} MiB`,
  );
  if (end.liveBytes > warm.liveBytes) problems.push(`${phase}: live device bytes grew from ${warm.liveBytes} to ${end.liveBytes}`);
  if (warm.freeBytes - end.freeBytes > 64 * 2 ** 20) problems.push(`${phase}: free device memory shrank by ${MiB(warm.freeBytes - end.freeBytes)} MiB`);
  if (end.rss - warm.rss > 96 * 2 ** 20) problems.push(`${phase}: RSS grew by ${MiB(end.rss - warm.rss)} MiB`);
}
const out = { device: cudaInfo.device, results, problems };
if (opts.out) writeFileSync(opts.out, JSON.stringify(out, null, 1));
console.log(problems.length ? `LEAK: ${problems.join('; ')}` : 'no leak: live device memory, free memory and RSS flat');
process.exit(problems.length ? 1 : 0);
