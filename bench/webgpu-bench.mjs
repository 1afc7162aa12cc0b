/**
 * The timing loop of bench/webgpu.mjs, run in a page (bench/webgpu.html): permute, unpermute and
 * route on the webgpu backend next to wasm, same page, same problem (rng(7)). WebGPU rows: the
 * token tensors live on the GPU (uploaded once), the routing inputs (routing map, probs,
 * sortedIndices) are host tensors; a call is timed until its results are written (a 4-byte
 * `await moe.synchronize()`, the queue's onSubmittedWorkDone) and its outputs are disposed. Each row: the
 * median of `iters` runs after one warm-up, and whether the GPU's output bits equal wasm's. WebGPU
 * rows come twice: `routing: 'host'` (routing map, probs and sortedIndices host tensors, uploaded
 * and checked by each call) and `routing: 'device'` (made on the GPU by this backend's
 * indicesToMultihot and permute: checked by their facts, not read back). They also time the op queued: `iters` calls back to back and one synchronize at the end
 * (`queuedSeconds`), the device's throughput where the latency of a wait is not paid per call.
 */
import { timeAsync as timeAsyncOf, timeQueued, timeSync as timeSyncOf } from './timing.mjs';

export async function benchWebGpu(api, random, { T = 4096, H = 1024, E = 64, k = 4, iters = 10, part = 'all', expertsShape = {} } = {}) {
  const moe = await api.createBackend({ prefer: 'webgpu' });
  const wasm = await api.createBackend({ prefer: 'wasm' });
  if (moe.name !== 'webgpu') throw new Error(`no webgpu backend here: got ${moe.name}`);
  // part: 'layout' (permute, unpermute, route), 'experts' (the grouped experts), or 'all'
  const experts = part === 'layout' ? [] : await benchExperts(api, random, moe, wasm, { ...expertsShape, iters });
  if (part === 'experts') return { rows: [], experts, adapter: moe.adapter };
  const timeSync = (f) => timeSyncOf(iters, f);
  const timeAsync = (f) => timeAsyncOf(iters, f);
  const sameBits = (a, b) => {
    const x = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
    const y = new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength);
    return x.length === y.length && x.every((v, i) => v === y[i]);
  };
  const dispose = (o) => {
    if (typeof o?.dispose === 'function') o.dispose();
    else for (const t of Object.values(o)) if (t && typeof t.dispose === 'function') t.dispose();
  };
  const rows = [];
  const sync = () => moe.synchronize();
  const queued = (bytes, seconds) => ({ queuedSeconds: seconds, queuedGbPerSecond: bytes / seconds / 1e9 });
  /** A webgpu row: `call()` checked once by `same(result)`, then timed to a synchronize and queued. */
  const gpuRow = async (op, dtype, routing, bytes, call, same) => {
    const first = await call();
    const ok = await same(first);
    dispose(first);
    const seconds = await timeAsync(async () => {
      const o = await call();
      await moe.synchronize();
      dispose(o);
    });
    const q = await timeQueued(iters, async () => dispose(await call()), sync);
    rows.push({ backend: 'webgpu', op, dtype, routing, seconds, bytes, gbPerSecond: bytes / seconds / 1e9, sameBitsAsWasm: ok, ...queued(bytes, q) });
  };
  for (const dtype of ['float32', 'bfloat16']) {
    const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, random.rng(7));
    const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, E);
    const ref = wasm.permute(r.tokens, routingMap, { probs });
    const N = ref.sortedIndices.shape[0];
    const elem = dtype === 'float32' ? 4 : 2;
    const add = (backend, op, bytes, seconds, extra = {}) => rows.push({ backend, op, dtype, seconds, bytes, gbPerSecond: bytes / seconds / 1e9, ...extra });
    const x = moe.upload(r.tokens);
    const pt = moe.upload(ref.permutedTokens);
    // the routing inputs on the GPU, made by this backend's ops (checked by their facts, not read back)
    const dmh = await moe.gpu.indicesToMultihot(moe.upload(r.indices), moe.upload(r.weights), E);
    const dp = await moe.gpu.permute(x, dmh.routingMap, { probs: dmh.probs });

    // permute (+ probs)
    const permuteBytes = 2 * N * H * elem;
    add(
      'wasm',
      'permute+probs',
      permuteBytes,
      timeSync(() => wasm.permute(r.tokens, routingMap, { probs })),
    );
    const samePermute = async (g) =>
      sameBits(await g.permutedTokens.download(), ref.permutedTokens) && sameBits(await g.sortedIndices.download(), ref.sortedIndices) && sameBits(await g.permutedProbs.download(), ref.permutedProbs);
    await gpuRow('permute+probs', dtype, 'host', permuteBytes, () => moe.gpu.permute(x, routingMap, { probs }), samePermute);
    await gpuRow('permute+probs', dtype, 'device', permuteBytes, () => moe.gpu.permute(x, dmh.routingMap, { probs: dmh.probs }), samePermute);

    // unpermute (+ per-slot probs)
    const unpermuteBytes = (N + T) * H * elem;
    const uo = { probs: ref.permutedProbs };
    const want = wasm.unpermute(ref.permutedTokens, ref.sortedIndices, [T, H], uo);
    add(
      'wasm',
      'unpermute+probs',
      unpermuteBytes,
      timeSync(() => wasm.unpermute(ref.permutedTokens, ref.sortedIndices, [T, H], uo)),
    );
    const sameUnpermute = async (u) => sameBits(await u.download(), want);
    await gpuRow('unpermute+probs', dtype, 'host', unpermuteBytes, () => moe.gpu.unpermute(pt, ref.sortedIndices, [T, H], uo), sameUnpermute);
    await gpuRow('unpermute+probs', dtype, 'device', unpermuteBytes, () => moe.gpu.unpermute(dp.permutedTokens, dp.sortedIndices, [T, H], { probs: dp.permutedProbs }), sameUnpermute);
    for (const o of [x, pt, dmh, dp]) dispose(o);
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
    rows.push({ backend, op: 'route softmax top-k', dtype: 'float32', routing: 'device', seconds, bytes: T * E * 4, gbPerSecond: (T * E * 4) / seconds / 1e9, ...extra });
  }
  return { rows, experts, adapter: moe.adapter };
}

/**
 * expertsForward and expertsBackward (swiglu, per-slot probs) on the webgpu backend next to wasm:
 * `rows` permuted tokens spread over `experts` experts (rng(13)), weights scaled by 1/sqrt of the
 * sum's length. WebGPU rows: every input on the GPU, timed to a synchronize; GFLOP/s counts the
 * GEMMs' multiply-adds (forward 2 N dim (2 inter) + 2 N inter dim, backward twice that plus the
 * recomputed forward's first GEMM).
 */
export async function benchExperts(api, random, moe, wasm, { rows: N = 2048, dim = 256, inter = 256, experts: E = 8, iters = 10 } = {}) {
  const rand = random.rng(13);
  const values = (n, s) => Float32Array.from({ length: n }, () => (rand() * 8 - 4) * s);
  const out = [];
  for (const dtype of ['float32', 'bfloat16']) {
    const t = (shape, s) => {
      const v = values(
        shape.reduce((a, b) => a * b, 1),
        s,
      );
      return dtype === 'float32' ? api.tensor('float32', shape, v) : api.tensor('bfloat16', shape, Uint16Array.from(v, api.toBFloat16Bits));
    };
    const counts = new Int32Array(E);
    for (let i = 0; i < N; i++) counts[Math.floor(rand() * E)]++;
    const tpe = api.tensor('int32', [E], counts);
    const x = t([N, dim], 1);
    const g = t([N, dim], 1);
    const w = { gateAndUpProjs: t([E, dim, 2 * inter], 0.5 / Math.sqrt(dim)), downProjs: t([E, inter, dim], 0.5 / Math.sqrt(inter)) };
    const probs = api.tensor(
      'float32',
      [N],
      Float32Array.from({ length: N }, () => rand()),
    );
    const o = { activation: 'swiglu', permutedProbs: probs };
    const dev = { x: moe.upload(x), g: moe.upload(g), tpe: moe.upload(tpe), w: { gateAndUpProjs: moe.upload(w.gateAndUpProjs), downProjs: moe.upload(w.downProjs) }, probs: moe.upload(probs) };
    const od = { activation: 'swiglu', permutedProbs: dev.probs };
    const fwdFlops = 2 * N * dim * 2 * inter + 2 * N * inter * dim;
    const bwdFlops = 2 * fwdFlops + 2 * N * dim * 2 * inter;
    const bits = (tt) => new Uint8Array(tt.data.buffer, tt.data.byteOffset, tt.data.byteLength);
    const same = (a, b) => {
      const x1 = bits(a);
      const y1 = bits(b);
      return x1.length === y1.length && x1.every((v, i) => v === y1[i]);
    };
    const free = (r) => {
      if (typeof r?.dispose === 'function') r.dispose();
      else for (const v of Object.values(r)) if (v && typeof v.dispose === 'function') v.dispose();
    };
    const row = (backend, op, flops, seconds, extra = {}) => out.push({ backend, op, dtype, rows: N, dim, inter, experts: E, seconds, flops, gflopPerSecond: flops / seconds / 1e9, ...extra });
    const wantY = wasm.expertsForward(x, tpe, w, o);
    const wantG = wasm.expertsBackward(g, x, tpe, w, o);
    row(
      'wasm',
      'expertsForward',
      fwdFlops,
      timeSyncOf(iters, () => wasm.expertsForward(x, tpe, w, o)),
    );
    row(
      'wasm',
      'expertsBackward',
      bwdFlops,
      timeSyncOf(iters, () => wasm.expertsBackward(g, x, tpe, w, o)),
    );
    const y = await moe.gpu.expertsForward(dev.x, dev.tpe, dev.w, od);
    const okY = same(await y.download(), wantY);
    free(y);
    const gg = await moe.toHost(await moe.gpu.expertsBackward(dev.g, dev.x, dev.tpe, dev.w, od));
    const okG = ['gradTokens', 'gradGateAndUpProjs', 'gradDownProjs', 'gradProbs'].every((k) => same(gg[k], wantG[k]));
    const timed = (call) =>
      timeAsyncOf(iters, async () => {
        const r = await call();
        await moe.synchronize();
        free(r);
      });
    row('webgpu', 'expertsForward', fwdFlops, await timed(() => moe.gpu.expertsForward(dev.x, dev.tpe, dev.w, od)), { sameBitsAsWasm: okY });
    row('webgpu', 'expertsBackward', bwdFlops, await timed(() => moe.gpu.expertsBackward(dev.g, dev.x, dev.tpe, dev.w, od)), { sameBitsAsWasm: okG });
    free(dev.w);
    for (const v of [dev.x, dev.g, dev.tpe, dev.probs]) v.dispose();
  }
  return out;
}
