/**
 * The host's time a call at the N-API boundary (issue 19: the step's start waits for the host),
 * three ways at the fine-grained layer's shape (T = 8192, dim 2048, E = 64, k = 6, bf16): the
 * addon's function called directly (the argument object built once), the same with the argument
 * object built each call as the facade builds it, and the cuda backend's method (the facade:
 * checks, handles, wrapping the results). `moe-cuda-bench host` times the same device entries
 * from Rust; the three columns here less that one say what N-API and the facade add.
 *
 *   node bench/napi-costs.mjs [--calls N] [--dist DIR] [--out FILE]
 *
 * Each row: N calls to warm up, a synchronize, N calls clocked with nothing waited for between
 * them (their results kept until after the synchronize, then disposed), the mean in
 * microseconds; the GC's time over the clocked calls (PerformanceObserver 'gc' entries) beside it.
 */
import { writeFileSync } from 'node:fs';
import { PerformanceObserver } from 'node:perf_hooks';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const dist = resolve(arg('dist', new URL('../dist/', import.meta.url).pathname));
const calls = Number(arg('calls', '200'));
if (!(Number.isInteger(calls) && calls > 0)) throw new RangeError(`--calls: expected a count (1 or more), got ${arg('calls')}`);
const { backendInfo, createBackend, uniformTensor, tensor } = await import(pathToFileURL(resolve(dist, 'index.js')).href);
const { loadNative } = await import(pathToFileURL(resolve(dist, 'backends/native.js')).href);
const { nativeHandle } = await import(pathToFileURL(resolve(dist, 'device.js')).href);

const moe = await createBackend({ prefer: 'cuda' });
if (moe.name !== 'cuda') {
  console.log('napi-costs: no cuda backend here');
  process.exit(2);
}
const addon = loadNative().binding;
const [T, dim, E, k] = [8192, 2048, 64, 6];
const x = moe.upload(uniformTensor('bfloat16', [T, dim], 1, 1));
const w = moe.upload(uniformTensor('bfloat16', [dim, E], 2, 1 / Math.sqrt(dim)));
const logits = moe.matmulToFloat32(x, w);
const routed = moe.route(logits, { topk: k });
const { routingMap, probs } = moe.indicesToMultihot(routed.indices, routed.weights, E);
const noColumns = moe.upload(tensor('bfloat16', [T, 0]));
const h = nativeHandle;

let gcMs = 0;
const obs = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) gcMs += e.duration;
});
obs.observe({ entryTypes: ['gc'] });
/** Disposes whatever a call returned: a device tensor, a native handle, or an object of them. */
function release(r) {
  if (r === null || typeof r !== 'object') return;
  if (typeof r.dispose === 'function') return r.dispose();
  if (typeof r.flagged === 'function') return r.flagged();
  for (const v of Object.values(r)) release(v);
}
const rows = [];
async function row(what, f) {
  const keep = [];
  for (let i = 0; i < calls; i++) keep.push(f());
  moe.synchronize();
  keep.forEach(release);
  keep.length = 0;
  await new Promise((r) => setImmediate(r));
  const gc0 = gcMs;
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) keep.push(f());
  const us = ((performance.now() - t0) * 1000) / calls;
  moe.synchronize();
  await new Promise((r) => setImmediate(r)); // (the observer's entries arrive asynchronously)
  const gcUs = ((gcMs - gc0) * 1000) / calls;
  keep.forEach(release);
  rows.push({ what, usPerCall: Number(us.toFixed(2)), gcUsPerCall: Number(gcUs.toFixed(2)) });
  console.log(`  ${what.padEnd(72)} ${us.toFixed(1).padStart(7)} us  (GC ${gcUs.toFixed(1)} us)`);
}

console.log(`host time a call (mean of ${calls} after ${calls}; no waits between them), fine-grained shape:`);
await row('addon: cudaExpertsGatherOnLoad() (a call that does nothing on the GPU)', () => addon.cudaExpertsGatherOnLoad());
const rawMatmul = [h(x), h(w), false, false];
await row('addon: cudaMatmulF32Out(a, b) [8192, 2048] x [2048, 64]', () => addon.cudaMatmulF32Out(...rawMatmul));
await row('facade: matmulToFloat32(x, w)', () => moe.matmulToFloat32(x, w));
const rawRoute = { logits: h(logits), topk: k, lazyCheck: true };
await row('addon: cudaRouteDevice({ logits, topk, lazyCheck }) (one object)', () => addon.cudaRouteDevice(rawRoute));
await row('addon: cudaRouteDevice, every route key (undefined ones too), built each call', () =>
  addon.cudaRouteDevice({
    logits: h(logits),
    topk: k,
    scoreFunction: undefined,
    softmaxBeforeTopk: undefined,
    expertBias: undefined,
    numGroups: undefined,
    topkGroups: undefined,
    normTopkProb: undefined,
    routeScale: undefined,
    tokenMask: undefined,
    lazyCheck: true,
  }),
);
await row('facade: route(logits, { topk, lazyCheck: true })', () => moe.route(logits, { topk: k, lazyCheck: true }));
const rawMultihot = { indices: h(routed.indices), probs: h(routed.weights), numExperts: E };
await row('addon: cudaIndicesToMultihotDevice', () => addon.cudaIndicesToMultihotDevice(rawMultihot));
await row('facade: indicesToMultihot', () => moe.indicesToMultihot(routed.indices, routed.weights, E));
const rawPlan = { tokens: h(noColumns), routingMap: h(routingMap), probs: h(probs), numOutTokens: T * k };
await row('addon: cudaPermuteDevice, plan only ([T, 0] rows)', () => addon.cudaPermuteDevice(rawPlan));
await row('facade: permute, plan only', () => moe.permute(noColumns, routingMap, { probs, numOutTokens: T * k }));
await row('facade: permute with probs (plan, scatter)', () => moe.permute(x, routingMap, { probs, numOutTokens: T * k }));
obs.disconnect();
const out = arg('out');
if (out) writeFileSync(out, JSON.stringify({ calls, device: (await backendInfo()).find((i) => i.name === 'cuda')?.device ?? null, rows }));
for (const t of [x, w, logits, routingMap, probs, noColumns, ...Object.values(routed)]) t.dispose?.();
