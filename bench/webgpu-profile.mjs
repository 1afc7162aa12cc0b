#!/usr/bin/env node
/**
 * Where a webgpu op's time goes (issue 21): the GPU time of every shader dispatch, from WebGPU
 * timestamp queries, next to the op's wall time, for a device pipeline route -> indicesToMultihot
 * -> permute -> unpermute and the two backward passes, and the grouped experts forward and
 * backward (2048 rows, dim 256, inter 256, E = 8: each GEMM launch, each activation pass), route
 * as DeepSeek-V3 sets it (sigmoid with a bias, groups, normalised, scaled), routeBackward at both
 * routes' picks, zLoss and the load-balancing loss from the logits, in Node through Dawn. The backend is not
 * changed: this script asks the adapter for `timestamp-query`, and wraps `beginComputePass` so
 * that each pass writes its start and end; a pass is named by its label (ts/webgpu/gpu.ts labels
 * it with the shader's key, or a step of it: `route phase 1`). Dawn's timestamp quantization is
 * off (bench/dawn.mjs's DAWN_FLAGS), else every time would be a multiple of 0.0655 ms.
 *
 * Each op's wall time is split at its last queue.submit and at its promise (toSubmitMs, toResolveMs,
 * toSyncMs), and timed again without timestamp writes (plainWallMs, interleaved): what the
 * profiling adds. `baseline` (bench/dawn.mjs dawnFixedCosts): a bare synchronize, an empty submit's
 * round trip, the error scopes, a 4-byte read, a tiny op: Dawn's fixed cost of a call.
 *
 *   node bench/webgpu-profile.mjs --webgpu DIR [--dist dist] [--out FILE] [--iters N]
 *     [--ops route,permute,...] [--lists auto|indirect|direct] (how the list passes are dispatched; auto: direct on a GPU)
 *     [--tokens T --hidden H --experts E --topk K]
 *
 * gpu-run.sh remote with WEBGPU=1 runs it on the GPU machine. Where Dawn finds no adapter, or
 * the adapter has no timestamp queries, it says so and exits 2. Locally Dawn runs over Chromium's
 * SwiftShader Vulkan (DEVELOPERS.md): a software GPU, so the times mean nothing there.
 */
import { writeFileSync } from 'node:fs';

import { applyLists, DAWN_FLAGS, dawnArgs, dawnFixedCosts, distUrl, fixedCostsLine, installDawn } from './dawn.mjs';

const { args, shape } = dawnArgs(20);
await installDawn(args, 'webgpu-profile');

// the backend's device gets timestamp queries; every compute pass records its start and end
const QUERIES = 4096; // the most a query set may hold
let device;
let querySet;
let recording = true; // off: the passes run without timestamp writes (the plain wall times, the baseline)
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
  if (!recording || !querySet || passes.length * 2 + 2 > QUERIES) return beginComputePass.call(this, desc);
  const i = passes.length;
  passes.push(desc.label || '?');
  return beginComputePass.call(this, { ...desc, timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 } });
};

// when the last submit was made (a call's CPU time up to its work's submit)
let lastSubmit = 0;
const submit = GPUQueue.prototype.submit;
GPUQueue.prototype.submit = function (...a) {
  const r = submit.apply(this, a);
  lastSubmit = performance.now();
  return r;
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
// a pass per dispatch while recording (each pass's timestamps name one shader); the plain calls
// share passes as the backend does
const gpuPasses = (await import(new URL('webgpu/gpu.js', dist).href)).passes;
const record = (on) => {
  recording = on;
  if (gpuPasses) gpuPasses.perDispatch = on;
};
const random = await import(new URL('random.js', dist).href);
const lists = await applyLists(args);
const moe = await api.createBackend({ prefer: 'webgpu' });
if (moe.name !== 'webgpu') {
  console.error(`webgpu-profile: no webgpu backend here: ${(await api.backendInfo()).find((i) => i.name === 'webgpu')?.reason}`);
  process.exit(2);
}
console.log(`webgpu: ${moe.adapter}`);
const { T, H, E, k, iters } = shape;
record(false);
const baseline = await dawnFixedCosts(random, moe);
record(true);
console.log(fixedCostsLine(baseline));
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
const ex = (() => {
  const [N, dim, inter, EE] = [2048, 256, 256, 8];
  const values = (n, sc) => Float32Array.from({ length: n }, () => (g() * 8 - 4) * sc);
  return {
    x: moe.upload(api.tensor('float32', [N, dim], values(N * dim, 1))),
    tpe: moe.upload(api.tensor('int32', [EE], new Int32Array(EE).fill(N / EE))),
    w: {
      gateAndUpProjs: moe.upload(api.tensor('float32', [EE, dim, 2 * inter], values(EE * dim * 2 * inter, 0.5 / Math.sqrt(dim)))),
      downProjs: moe.upload(api.tensor('float32', [EE, inter, dim], values(EE * inter * dim, 0.5 / Math.sqrt(inter)))),
    },
    o: { activation: 'swiglu', permutedProbs: moe.upload(api.tensor('float32', [N], values(N, 0.125))) },
  };
})();
// route as DeepSeek-V3 configures it (sigmoid with a bias, groups, normalised, scaled), its backward, the losses on the logits
const groups = E % 8 === 0 ? 8 : 1;
const deepSeek = {
  topk: k,
  scoreFunction: 'sigmoid_with_bias',
  expertBias: api.tensor(
    'float32',
    [E],
    Float32Array.from({ length: E }, () => g() - 0.5),
  ),
  numGroups: groups,
  topkGroups: Math.max(1, groups / 2),
  normTopkProb: true,
  routeScale: 2.5,
};
const rd = await moe.gpu.route(logits, deepSeek);
const gw = moe.upload(
  api.tensor(
    'float32',
    [T, k],
    Float32Array.from({ length: T * k }, () => g() - 0.5),
  ),
);
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
  // the grouped experts of bench/webgpu-bench.mjs benchExperts' shape (2048 rows, dim 256, inter 256, E = 8)
  expertsForward: () => moe.gpu.expertsForward(ex.x, ex.tpe, ex.w, ex.o),
  expertsBackward: () => moe.gpu.expertsBackward(ex.x, ex.x, ex.tpe, ex.w, ex.o),
  routeDeepSeek: () => moe.gpu.route(logits, deepSeek),
  routeBackward: () => moe.gpu.routeBackward(gw, logits, ro.indices, { topk: k }),
  routeBackwardDeepSeek: () => moe.gpu.routeBackward(gw, logits, rd.indices, deepSeek),
  zLoss: async () => (await moe.gpu.zLoss(logits, { coeff: 1e-3 })).gradLogits,
  switchFromLogits: async () => (await moe.gpu.switchLoadBalancingLossFromLogits(logits, ro.tokensPerExpert, { topk: k })).gradLogits,
};
const rows = [];
const median = (a) => [...a].sort((u, v) => u - v)[Math.floor(a.length / 2)];
const only = args.ops?.split(',');
for (const name of only ?? []) if (!(name in ops)) throw new RangeError(`--ops: expected names of ${Object.keys(ops).join(', ')}, got ${name}`);
for (const [op, call] of Object.entries(ops)) {
  if (only && !only.includes(op)) continue;
  for (let i = 0; i < 3; i++) free(await call());
  await moe.synchronize();
  await drain();
  const walls = [];
  const plain = []; // the same call with no timestamp writes: what the profiling itself adds
  const parts = { toSubmit: [], toResolve: [], toSync: [], plainToSubmit: [] };
  const gpu = {};
  for (let i = 0; i < iters; i++) {
    record(false);
    lastSubmit = 0;
    let t0 = performance.now();
    free(await call());
    if (lastSubmit >= t0) parts.plainToSubmit.push(lastSubmit - t0);
    await moe.synchronize();
    plain.push(performance.now() - t0);
    record(true);
    lastSubmit = 0;
    t0 = performance.now();
    const out = await call();
    const t1 = performance.now();
    free(out);
    await moe.synchronize();
    const t2 = performance.now();
    walls.push(t2 - t0);
    if (lastSubmit >= t0) {
      parts.toSubmit.push(lastSubmit - t0);
      parts.toResolve.push(t1 - lastSubmit);
    }
    parts.toSync.push(t2 - t1);
    for (const [shader, ms] of Object.entries(await drain())) {
      gpu[shader] ??= [];
      gpu[shader].push(ms);
    }
  }
  const byShader = Object.fromEntries(Object.entries(gpu).map(([s, a]) => [s, median(a)]));
  const gpuMs = Object.values(byShader).reduce((a, b) => a + b, 0);
  const wallMs = median(walls);
  const plainWallMs = median(plain);
  const split = Object.fromEntries(Object.entries(parts).map(([s, a]) => [`${s}Ms`, a.length ? median(a) : null]));
  rows.push({ op, wallMs, plainWallMs, ...split, gpuMs, byShader });
  const shaders = Object.entries(byShader)
    .sort((a, b) => b[1] - a[1])
    .map(([s, ms]) => `${s} ${ms.toFixed(3)}`)
    .join(', ');
  const f = (v) => (v === null ? '-' : v.toFixed(3));
  console.log(
    `${op.padEnd(18)} wall ${wallMs.toFixed(3)} ms (without timestamps ${plainWallMs.toFixed(3)}, to its submit ${f(split.plainToSubmitMs)}; to the submit ${f(split.toSubmitMs)}, then to the op's promise ${f(split.toResolveMs)}, then to the synchronize ${f(split.toSyncMs)}), GPU ${gpuMs.toFixed(3)} ms (${shaders})`,
  );
}
const result = {
  kind: 'webgpu-profile',
  adapter: moe.adapter,
  dawnFlags: DAWN_FLAGS,
  lists,
  shape,
  note: "wallMs: median call to a synchronize; plainWallMs: the same without timestamp writes (interleaved); toSubmitMs: the call's start to its last queue.submit (JS, checks, encoding, the submit), toResolveMs: that submit to the op's promise (the error scopes' round), toSyncMs: the promise to the synchronize's end; plainToSubmitMs: toSubmitMs of the plain calls (an op's dispatches in one compute pass, as the backend queues them; the timed calls give each dispatch a pass of its own to time it); gpuMs: the sum of the medians of its compute passes (timestamp queries), by shader key (clears and copies between passes not counted)",
  baseline,
  rows,
};
if (args.out) writeFileSync(args.out, `${JSON.stringify(result, null, 1)}\n`);
process.exit(0);
