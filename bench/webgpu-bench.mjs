/**
 * The timing loop of bench/webgpu.mjs, run in a page (bench/webgpu.html): permute, unpermute and
 * route on the webgpu backend next to wasm, same page, same problem (rng(7)). WebGPU rows: the
 * token tensors live on the GPU (uploaded once), the routing inputs (routing map, probs,
 * sortedIndices) are host tensors; a call is timed until its results are written (a 4-byte
 * `await moe.synchronize()`, the queue's onSubmittedWorkDone) and its outputs are disposed. Each row: the
 * median of `iters` runs after one warm-up, and whether the GPU's output bits equal wasm's. WebGPU
 * rows also time the op queued: `iters` calls back to back and one synchronize at the end
 * (`queuedSeconds`), the device's throughput where the latency of a wait is not paid per call.
 */
import { timeAsync as timeAsyncOf, timeQueued, timeSync as timeSyncOf } from './timing.mjs';

export async function benchWebGpu(api, random, { T = 4096, H = 1024, E = 64, k = 4, iters = 10 } = {}) {
  const moe = await api.createBackend({ prefer: 'webgpu' });
  const wasm = await api.createBackend({ prefer: 'wasm' });
  if (moe.name !== 'webgpu') throw new Error(`no webgpu backend here: got ${moe.name}`);
  const timeSync = (f) => timeSyncOf(iters, f);
  const timeAsync = (f) => timeAsyncOf(iters, f);
  const sameBits = (a, b) => {
    const x = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
    const y = new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength);
    return x.length === y.length && x.every((v, i) => v === y[i]);
  };
  const dispose = (o) => {
    for (const t of Object.values(o)) if (t && typeof t.dispose === 'function') t.dispose();
  };
  const rows = [];
  const sync = () => moe.synchronize();
  const queued = (bytes, seconds) => ({ queuedSeconds: seconds, queuedGbPerSecond: bytes / seconds / 1e9 });
  for (const dtype of ['float32', 'bfloat16']) {
    const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, random.rng(7));
    const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, E);
    const ref = wasm.permute(r.tokens, routingMap, { probs });
    const N = ref.sortedIndices.shape[0];
    const elem = dtype === 'float32' ? 4 : 2;
    const add = (backend, op, bytes, seconds, extra = {}) => rows.push({ backend, op, dtype, seconds, bytes, gbPerSecond: bytes / seconds / 1e9, ...extra });
    const x = moe.upload(r.tokens);
    const pt = moe.upload(ref.permutedTokens);

    // permute (+ probs)
    add(
      'wasm',
      'permute+probs',
      2 * N * H * elem,
      timeSync(() => wasm.permute(r.tokens, routingMap, { probs })),
    );
    const g = await moe.gpu.permute(x, routingMap, { probs });
    const okPermute =
      sameBits(await g.permutedTokens.download(), ref.permutedTokens) && sameBits(await g.sortedIndices.download(), ref.sortedIndices) && sameBits(await g.permutedProbs.download(), ref.permutedProbs);
    dispose(g);
    add(
      'webgpu',
      'permute+probs',
      2 * N * H * elem,
      await timeAsync(async () => {
        const o = await moe.gpu.permute(x, routingMap, { probs });
        await moe.synchronize();
        dispose(o);
      }),
      { sameBitsAsWasm: okPermute, ...queued(2 * N * H * elem, await timeQueued(iters, async () => dispose(await moe.gpu.permute(x, routingMap, { probs })), sync)) },
    );

    // unpermute (+ per-slot probs)
    const uo = { probs: ref.permutedProbs };
    const want = wasm.unpermute(ref.permutedTokens, ref.sortedIndices, [T, H], uo);
    add(
      'wasm',
      'unpermute+probs',
      (N + T) * H * elem,
      timeSync(() => wasm.unpermute(ref.permutedTokens, ref.sortedIndices, [T, H], uo)),
    );
    const u = await moe.gpu.unpermute(pt, ref.sortedIndices, [T, H], uo);
    const okUnpermute = sameBits(await u.download(), want);
    u.dispose();
    add(
      'webgpu',
      'unpermute+probs',
      (N + T) * H * elem,
      await timeAsync(async () => {
        const o = await moe.gpu.unpermute(pt, ref.sortedIndices, [T, H], uo);
        await moe.synchronize();
        o.dispose();
      }),
      { sameBitsAsWasm: okUnpermute, ...queued((N + T) * H * elem, await timeQueued(iters, async () => (await moe.gpu.unpermute(pt, ref.sortedIndices, [T, H], uo)).dispose(), sync)) },
    );
    x.dispose();
    pt.dispose();
  }

  // route: softmax top-k over [T, E] float32 logits
  const rand = random.rng(11);
  const logits = api.tensor(
    'float32',
    [T, E],
    Float32Array.from({ length: T * E }, () => rand() * 6 - 3),
  );
  const ro = { topk: k };
  const want = wasm.route(logits, ro);
  add2(
    'wasm',
    timeSync(() => wasm.route(logits, ro)),
  );
  const l = moe.upload(logits);
  const g = await moe.gpu.route(l, ro);
  const okRoute = sameBits(await g.weights.download(), want.weights) && sameBits(await g.indices.download(), want.indices);
  dispose(g);
  add2(
    'webgpu',
    await timeAsync(async () => {
      const o = await moe.gpu.route(l, ro);
      await moe.synchronize();
      dispose(o);
    }),
    { sameBitsAsWasm: okRoute, onGpu: api.WEBGPU_OPS.includes('route'), ...queued(T * E * 4, await timeQueued(iters, async () => dispose(await moe.gpu.route(l, ro)), sync)) },
  );
  l.dispose();
  function add2(backend, seconds, extra = {}) {
    rows.push({ backend, op: 'route softmax top-k', dtype: 'float32', seconds, bytes: T * E * 4, gbPerSecond: (T * E * 4) / seconds / 1e9, ...extra });
  }
  return { rows, adapter: moe.adapter };
}
