#!/usr/bin/env node
/**
 * Where a webgpu op's time goes (issue 21): the GPU time of every shader dispatch, from WebGPU
 * timestamp queries, next to the op's wall time, for a device pipeline route -> indicesToMultihot
 * -> permute -> unpermute and the two backward passes, in Node through Dawn. The backend is not
 * changed: this script asks the adapter for `timestamp-query`, and wraps `beginComputePass` so
 * that each pass writes its start and end; a pass is named by its label (ts/webgpu/gpu.ts labels
 * it with the shader's key, or a step of it: `route phase 1`). Dawn's timestamp quantization is
 * off (bench/dawn.mjs's DAWN_FLAGS), else every time would be a multiple of 0.0655 ms.
 *
 *   node bench/webgpu-profile.mjs --webgpu DIR [--dist dist] [--out FILE] [--iters N]
 *     [--tokens T --hidden H --experts E --topk K]
 *
 * gpu-run.sh remote with WEBGPU=1 runs it on the GPU machine. Where Dawn finds no adapter, or
 * the adapter has no timestamp queries, it says so and exits 2. Locally Dawn runs over Chromium's
 * SwiftShader Vulkan (DEVELOPERS.md): a software GPU, so the times mean nothing there.
 */
import { writeFileSync } from 'node:fs';

import { DAWN_FLAGS, dawnArgs, distUrl, installDawn } from './dawn.mjs';

const { args, shape } = dawnArgs(20);
await installDawn(args, 'webgpu-profile');

// the backend's device gets timestamp queries; every compute pass records its start and end
const QUERIES = 4096; // the most a query set may hold
let device;
let querySet;
const passes = []; // the shader of each recorded pass, in order
const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (desc = {}) {
  if (!this.features.has('timestamp-query')) {
    console.error('webgpu-profile: this adapter has no timestamp-query feature');
    process.exit(2);
  }
  device = await requestDevice.call(this, { ...desc, requiredFeatures: [...(desc.requiredFeatures ?? []), 'timestamp-query'] });
  querySet = device.createQuerySet({ type: 'timestamp', count: QUERIES });
  return device;
};
const beginComputePass = GPUCommandEncoder.prototype.beginComputePass;
GPUCommandEncoder.prototype.beginComputePass = function (desc = {}) {
  if (!querySet || passes.length * 2 + 2 > QUERIES) return beginComputePass.call(this, desc);
  const i = passes.length;
  passes.push(desc.label || '?');
  return beginComputePass.call(this, { ...desc, timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 } });
};

/** The recorded passes' GPU times (ms), by shader, and forgets them. */
async function drain() {
  const n = passes.length;
  if (n === 0) return {};
  const bytes = 16 * n;
  const resolved = device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const staging = device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = device.createCommandEncoder();
  enc.resolveQuerySet(querySet, 0, 2 * n, resolved, 0);
  enc.copyBufferToBuffer(resolved, 0, staging, 0, bytes);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const t = new BigUint64Array(staging.getMappedRange().slice(0));
  staging.unmap();
  resolved.destroy();
  staging.destroy();
  const by = {};
  for (let i = 0; i < n; i++) by[passes[i]] = (by[passes[i]] ?? 0) + Number(t[2 * i + 1] - t[2 * i]) / 1e6;
  passes.length = 0;
  return by;
}

const dist = distUrl(args);
const api = await import(new URL('index.js', dist).href);
const random = await import(new URL('random.js', dist).href);
const moe = await api.createBackend({ prefer: 'webgpu' });
if (moe.name !== 'webgpu') {
  console.error(`webgpu-profile: no webgpu backend here: ${(await api.backendInfo()).find((i) => i.name === 'webgpu')?.reason}`);
  process.exit(2);
}
console.log(`webgpu: ${moe.adapter}`);
const { T, H, E, k, iters } = shape;
const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype: 'float32' }, random.rng(7));
const g = random.rng(3);
const logits = moe.upload(
  api.tensor(
    'float32',
    [T, E],
    Float32Array.from({ length: T * E }, () => g() * 6 - 3),
  ),
);
const x = moe.upload(r.tokens);
const ro = await moe.gpu.route(logits, { topk: k });
const mh = await moe.gpu.indicesToMultihot(ro.indices, ro.weights, E);
const p = await moe.gpu.permute(x, mh.routingMap, { probs: mh.probs });
const free = (o) => {
  if (typeof o.dispose === 'function') o.dispose();
  else for (const t of Object.values(o)) t.dispose();
};
const ops = {
  route: () => moe.gpu.route(logits, { topk: k }),
  indicesToMultihot: () => moe.gpu.indicesToMultihot(ro.indices, ro.weights, E),
  permute: () => moe.gpu.permute(x, mh.routingMap, { probs: mh.probs }),
  unpermute: () => moe.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs }),
  permuteBackward: () => moe.gpu.permuteBackward(p.permutedTokens, p.sortedIndices, T),
  unpermuteBackward: () => moe.gpu.unpermuteBackward(x, p.permutedTokens, p.sortedIndices, { probs: p.permutedProbs }),
};
const rows = [];
for (const [op, call] of Object.entries(ops)) {
  for (let i = 0; i < 3; i++) free(await call());
  await moe.synchronize();
  await drain();
  const walls = [];
  const gpu = {};
  for (let i = 0; i < iters; i++) {
    const t0 = performance.now();
    free(await call());
    await moe.synchronize();
    walls.push(performance.now() - t0);
    for (const [shader, ms] of Object.entries(await drain())) {
      gpu[shader] ??= [];
      gpu[shader].push(ms);
    }
  }
  const median = (a) => [...a].sort((u, v) => u - v)[Math.floor(a.length / 2)];
  const byShader = Object.fromEntries(Object.entries(gpu).map(([s, a]) => [s, median(a)]));
  const gpuMs = Object.values(byShader).reduce((a, b) => a + b, 0);
  const wallMs = median(walls);
  rows.push({ op, wallMs, gpuMs, byShader });
  const parts = Object.entries(byShader)
    .sort((a, b) => b[1] - a[1])
    .map(([s, ms]) => `${s} ${ms.toFixed(3)}`)
    .join(', ');
  console.log(`${op.padEnd(18)} wall ${wallMs.toFixed(3)} ms, GPU ${gpuMs.toFixed(3)} ms (${parts})`);
}
const result = {
  kind: 'webgpu-profile',
  adapter: moe.adapter,
  dawnFlags: DAWN_FLAGS,
  shape,
  note: 'wallMs: median call to a synchronize; gpuMs: the sum of the medians of its compute passes (timestamp queries), by shader key',
  rows,
};
if (args.out) writeFileSync(args.out, `${JSON.stringify(result, null, 1)}\n`);
process.exit(0);
