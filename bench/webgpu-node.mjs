#!/usr/bin/env node
/**
 * The webgpu backend in Node through Dawn (the `webgpu` npm package, issue 21's optional path),
 * next to the cuda backend on the same GPU: permute, unpermute and route as bench/webgpu.mjs
 * times them in a page (bench/webgpu-bench.mjs: each WebGPU result also compared with wasm bit
 * for bit), then the same ops on the cuda backend's device tensors, and the ratio of the two
 * bandwidths, and Dawn's fixed cost of a call (`baseline`: bench/dawn.mjs dawnFixedCosts). Buffers stay within the default WebGPU limits (Dawn crashed with raised limits and
 * 256 MB buffers on the GPU machine: the default shape's largest buffer is 32 MB).
 *
 * Where Dawn finds no adapter (the CPU machines' lavapipe lacks a feature Dawn needs) it says so
 * and exits 2. On the GPU machine `gpu-run.sh` (WEBGPU=1) carries the package's Linux build and
 * Debian's Vulkan loader (`libvulkan1`). Needs a build (npm run build).
 *
 *   node bench/webgpu-node.mjs [--webgpu DIR] [--iters N] [--out FILE] [--tokens T --hidden H --experts E --topk K] [--lists auto|indirect|direct]
 */
import { writeFileSync } from 'node:fs';

import { applyLists, dawnArgs, dawnFixedCosts, distUrl, fixedCostsLine, installDawn } from './dawn.mjs';
import { timeQueued, timeSync } from './timing.mjs';
import { benchWebGpu } from './webgpu-bench.mjs';

const { args, shape } = dawnArgs(30);

const write = (result) => {
  const text = JSON.stringify(result, null, 1);
  if (args.out) writeFileSync(args.out, `${text}\n`);
  return result;
};

await installDawn(args, 'webgpu-node');

const dist = distUrl(args);
const api = await import(new URL('index.js', dist).href);
const random = await import(new URL('random.js', dist).href);
const lists = await applyLists(args);
const info = await api.backendInfo();
const webgpu = info.find((i) => i.name === 'webgpu');
if (!webgpu?.available) {
  console.error(`webgpu-node: no WebGPU adapter through Dawn here: ${webgpu?.reason ?? 'backendInfo() does not list webgpu'}`);
  write({ kind: 'webgpu-node', available: false, reason: webgpu?.reason ?? null });
  process.exit(2);
}
console.log(`webgpu: ${webgpu.device}`);
const { rows, experts, adapter } = await benchWebGpu(api, random, shape);

// Dawn's fixed cost of a call (a bare synchronize, a tiny op, ...), recorded with every run
const small = await api.createBackend({ prefer: 'webgpu' });
const baseline = await dawnFixedCosts(random, small);
small.destroy();
console.log(fixedCostsLine(baseline));

// the cuda backend on the same GPU, device tensors, each op timed to a synchronize
const cudaInfo = info.find((i) => i.name === 'cuda');
if (cudaInfo?.available) {
  const cuda = await api.createBackend({ prefer: 'cuda' });
  const { T, H, E, k, iters } = shape;
  const free = (out) => {
    for (const t of Object.values(out)) if (t && typeof t.dispose === 'function') t.dispose();
    if (typeof out.dispose === 'function') out.dispose();
  };
  const time = (f) =>
    timeSync(iters, () => {
      const out = f();
      cuda.synchronize();
      free(out);
    });
  // the same calls queued back to back, one synchronize at the end (as the webgpu rows' queuedSeconds)
  const queued = async (bytes, f) => {
    const seconds = await timeQueued(
      iters,
      async () => free(f()),
      async () => cuda.synchronize(),
    );
    return { queuedSeconds: seconds, queuedGbPerSecond: bytes / seconds / 1e9 };
  };
  for (const dtype of ['float32', 'bfloat16']) {
    const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, random.rng(7));
    const elem = dtype === 'float32' ? 4 : 2;
    const x = cuda.upload(r.tokens);
    const mh = cuda.indicesToMultihot(cuda.upload(r.indices), cuda.upload(r.weights), E);
    const p = cuda.permute(x, mh.routingMap, { probs: mh.probs });
    const N = p.sortedIndices.shape[0];
    const add = async (op, routing, bytes, f) => {
      const seconds = time(f);
      rows.push({ backend: 'cuda', op, dtype, routing, seconds, bytes, gbPerSecond: bytes / seconds / 1e9, ...(await queued(bytes, f)) });
    };
    // device routing: the map and probs from the cuda backend's indicesToMultihot (checked by what it knows); host: host tensors, as the webgpu rows'
    const { routingMap, probs } = cuda.indicesToMultihot(r.indices, r.weights, E);
    const hp = cuda.permute(r.tokens, routingMap, { probs });
    await add('permute+probs', 'device', 2 * N * H * elem, () => cuda.permute(x, mh.routingMap, { probs: mh.probs }));
    await add('permute+probs', 'host', 2 * N * H * elem, () => cuda.permute(x, routingMap, { probs }));
    const pt = cuda.upload(hp.permutedTokens);
    await add('unpermute+probs', 'device', (N + T) * H * elem, () => cuda.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs }));
    await add('unpermute+probs', 'host', (N + T) * H * elem, () => cuda.unpermute(pt, hp.sortedIndices, [T, H], { probs: hp.permutedProbs }));
  }
  const rand = random.rng(11);
  const logits = cuda.upload(
    api.tensor(
      'float32',
      [shape.T, shape.E],
      Float32Array.from({ length: shape.T * shape.E }, () => rand() * 6 - 3),
    ),
  );
  const bytes = shape.T * shape.E * 4;
  const route = () => cuda.route(logits, { topk: shape.k });
  const seconds = time(route);
  rows.push({ backend: 'cuda', op: 'route softmax top-k', dtype: 'float32', routing: 'device', seconds, bytes, gbPerSecond: bytes / seconds / 1e9, ...(await queued(bytes, route)) });
  // the grouped experts of benchExperts' shape on cuda's device tensors (its GEMMs: cuBLAS)
  const rand2 = random.rng(13);
  for (const w of experts.filter((r) => r.backend === 'webgpu')) {
    const { rows: N, dim, inter, experts: E2, dtype } = w;
    const t = (shape2, s) => {
      const v = Float32Array.from({ length: shape2.reduce((a, b) => a * b, 1) }, () => (rand2() * 8 - 4) * s);
      return cuda.upload(dtype === 'float32' ? api.tensor('float32', shape2, v) : api.tensor('bfloat16', shape2, Uint16Array.from(v, api.toBFloat16Bits)));
    };
    const counts = new Int32Array(E2);
    for (let i = 0; i < N; i++) counts[i % E2]++;
    const tpe = cuda.upload(api.tensor('int32', [E2], counts));
    const x = t([N, dim], 1);
    const ws = { gateAndUpProjs: t([E2, dim, 2 * inter], 0.5 / Math.sqrt(dim)), downProjs: t([E2, inter, dim], 0.5 / Math.sqrt(inter)) };
    const o = {
      activation: 'swiglu',
      permutedProbs: cuda.upload(
        api.tensor(
          'float32',
          [N],
          Float32Array.from({ length: N }, () => rand2()),
        ),
      ),
    };
    const call = w.op === 'expertsForward' ? () => cuda.expertsForward(x, tpe, ws, o) : () => cuda.expertsBackward(x, x, tpe, ws, o);
    try {
      const sec = time(call);
      experts.push({ ...w, backend: 'cuda', seconds: sec, gflopPerSecond: w.flops / sec / 1e9, sameBitsAsWasm: undefined });
    } catch (e) {
      // (not yet run on a GPU: a failure is recorded, not fatal to the rest of the report)
      console.error(`cuda ${w.op} ${dtype}: ${e.message}`);
      experts.push({ ...w, backend: 'cuda', seconds: null, gflopPerSecond: null, sameBitsAsWasm: undefined, error: e.message });
    }
  }
}
for (const w of experts.filter((r) => r.backend === 'webgpu')) {
  const c = experts.find((r) => r.backend === 'cuda' && r.op === w.op && r.dtype === w.dtype && r.gflopPerSecond !== null);
  const pct2 = c ? ` (${((100 * w.gflopPerSecond) / c.gflopPerSecond).toFixed(0)}% of cuda's ${c.gflopPerSecond.toFixed(1)})` : '';
  console.log(
    `${w.op.padEnd(20)} ${w.dtype.padEnd(9)} ${w.rows} x ${w.dim} x ${w.inter}, E=${w.experts}: webgpu ${w.gflopPerSecond.toFixed(1)} GFLOP/s${pct2}; same bits as wasm: ${w.sameBitsAsWasm}`,
  );
}

// webgpu's bandwidth as a share of cuda's, per op and dtype
const ratios = rows
  .filter((r) => r.backend === 'webgpu')
  .map((w) => {
    const c = rows.find((r) => r.backend === 'cuda' && r.op === w.op && r.dtype === w.dtype && r.routing === w.routing);
    return {
      op: w.op,
      dtype: w.dtype,
      routing: w.routing,
      webgpuGbPerSecond: w.gbPerSecond,
      cudaGbPerSecond: c?.gbPerSecond ?? null,
      ratioToCuda: c ? w.gbPerSecond / c.gbPerSecond : null,
      queuedWebgpuGbPerSecond: w.queuedGbPerSecond,
      queuedCudaGbPerSecond: c?.queuedGbPerSecond ?? null,
      queuedRatioToCuda: c ? w.queuedGbPerSecond / c.queuedGbPerSecond : null,
      sameBitsAsWasm: w.sameBitsAsWasm,
    };
  });
const pct = (x) => (x === null ? '-' : `${(100 * x).toFixed(0)}%`);
for (const r of ratios) {
  console.log(
    `${r.op.padEnd(20)} ${r.dtype.padEnd(9)} ${r.routing.padEnd(6)} webgpu ${r.webgpuGbPerSecond.toFixed(1)} GB/s, cuda ${r.cudaGbPerSecond?.toFixed(1) ?? '-'} GB/s (${pct(r.ratioToCuda)}); queued ${r.queuedWebgpuGbPerSecond.toFixed(1)} vs ${r.queuedCudaGbPerSecond?.toFixed(1) ?? '-'} GB/s (${pct(r.queuedRatioToCuda)}); same bits as wasm: ${r.sameBitsAsWasm}`,
  );
}
write({ kind: 'webgpu-node', available: true, adapter, device: webgpu.device, cuda: cudaInfo?.device ?? null, lists, shape, baseline, rows, ratios, experts });
if (ratios.some((r) => r.sameBitsAsWasm === false) || experts.some((r) => r.sameBitsAsWasm === false)) process.exitCode = 1;
