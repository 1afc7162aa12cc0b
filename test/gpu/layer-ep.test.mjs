// The GPU suite, MoELayer expert-parallel on device tensors (issue 20): N = 1, 2, 4 ranks in one
// process on one GPU (createInProcessGroup(n, { device: cuda }): the ranks' rows move GPU to GPU
// through its allToAllVDevice, as over NCCL), each rank a layer uploaded with its share of the
// experts. Checked: forwardParallel / backwardParallel on device tensors against the same ranks
// on host tensors (the cpu core's arithmetic) and against the one-rank device layer on each
// rank's tokens (one rank: the same bits; more: to the merge order's rounding); the experts'
// gradients against the one-rank device layer on every rank's tokens at once; run to run the
// same bits; every buffer a step made is freed (dispatch's handle released with the layer's
// saved state); two training steps with reduceReplicatedGrads(group, grads, cuda) and AdamW keep
// the replicated weights the same bits on every rank; the errors.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { cpu, cuda, cudaOnly, lib, maxRelErr, randomTensor, skip } from './common.mjs';

if (skip) console.log(`# ${skip}`);

const { MoELayer, AdamW, EXPERT_STACKED, createInProcessGroup, reduceReplicatedGrads } = lib;

const TOL = { float32: 1e-4, bfloat16: 3e-2 };

const KINDS = [
  { name: 'bf16 swiglu, softmax top-2, aux loss', o: { dim: 64, inter: 32, numExperts: 8, topk: 2, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
  {
    name: 'float32, sigmoid top-3, shared expert, z-loss',
    o: { dim: 64, inter: 32, numExperts: 8, topk: 3, activation: 'swiglu', dtype: 'float32', scoreFunction: 'sigmoid', normTopkProb: true, sharedExpert: { inter: 32 }, zLossCoeff: 1e-3 },
  },
];

function values(t) {
  return lib.toNumbers(lib.isDeviceTensor(t) ? t.download() : t);
}

function bits(t) {
  const h = lib.isDeviceTensor(t) ? t.download() : t;
  return Array.from(new Uint8Array(h.data.buffer, h.data.byteOffset, h.data.byteLength));
}

/** max |a - b| / max |b| over the tensor: a scale-aware error (the GEMMs differ in rounding). */
const relErr = (a, b) => maxRelErr(values(a), values(b));

/** Host weights of experts `start..end` (stacked ones sliced), copies of the rest. */
function sliceExperts(w, start, end) {
  const out = {};
  for (const [key, t] of Object.entries(w)) {
    if (!t) continue;
    const h = lib.isDeviceTensor(t) ? t.download() : t;
    if (!EXPERT_STACKED.includes(key)) {
      out[key] = { ...h, data: h.data.slice() };
      continue;
    }
    const per = h.shape.slice(1).reduce((a, b) => a * b, 1);
    out[key] = lib.tensor(h.dtype, [end - start, ...h.shape.slice(1)], h.data.slice(start * per, end * per));
  }
  return out;
}

function concat(ts) {
  const hs = ts.map((t) => (lib.isDeviceTensor(t) ? t.download() : t));
  const data = new hs[0].data.constructor(hs.reduce((a, t) => a + t.data.length, 0));
  let at = 0;
  for (const t of hs) {
    data.set(t.data, at);
    at += t.data.length;
  }
  return lib.tensor(hs[0].dtype, [hs.reduce((a, t) => a + t.shape[0], 0), ...hs[0].shape.slice(1)], data);
}

/** N rank layers over `whole`'s weights, on `moe` (uploaded where `device`). */
function rankLayers(moe, whole, options, N, device) {
  return Array.from({ length: N }, (_, r) => {
    const range = moe.expertRangeForRank(options.numExperts, N, r);
    const l = new MoELayer(moe, { ...options, epSize: N, epRank: r, weights: sliceExperts(whole.weights, range.start, range.end) });
    return device ? l.upload() : l;
  });
}

/** One forwardParallel + backwardParallel on every rank, concurrently. */
async function step(layers, groups, xs, gs) {
  const fs = await Promise.all(layers.map((l, r) => l.forwardParallel(groups[r], xs[r])));
  const bs = await Promise.all(layers.map((l, r) => l.backwardParallel(groups[r], gs[r])));
  return { fs, bs };
}

function disposeAll(...results) {
  for (const r of results) {
    for (const t of Object.values(r)) {
      if (lib.isDeviceTensor(t)) t.dispose();
      else if (t && typeof t === 'object' && !('data' in t)) disposeAll(t);
    }
  }
}

describe('MoELayer.forwardParallel / backwardParallel on device tensors (in-process ranks on one GPU)', { skip: cudaOnly }, () => {
  for (const kind of KINDS) {
    for (const N of [1, 2, 4]) {
      test(`${kind.name}, ${N} rank${N > 1 ? 's' : ''}`, async () => {
        const o = { ...kind.o, seed: 11, initStd: 0.3 };
        const tol = TOL[o.dtype];
        const whole = new MoELayer(cpu, o);
        const xs = Array.from({ length: N }, (_, r) => randomTensor(o.dtype, [40 + 8 * r, o.dim], 100 + r, 1));
        const gs = xs.map((x, r) => randomTensor(o.dtype, x.shape, 200 + r, 0.1));
        const dxs = xs.map((x) => cuda.upload(x));
        const dgs = gs.map((g) => cuda.upload(g));
        const devLayers = rankLayers(cuda, whole, o, N, true);
        const devGroups = createInProcessGroup(N, { device: cuda, timeoutMs: 60_000 });
        const dev = await step(devLayers, devGroups, dxs, dgs);
        assert.ok(lib.isDeviceTensor(dev.fs[0].output) && lib.isDeviceTensor(dev.bs[0].gradInput), 'device tensors out');
        const again = await step(devLayers, devGroups, dxs, dgs);
        // the same ranks on host tensors (the cuda backend's host path: the cpu core's arithmetic)
        const hostLayers = rankLayers(cuda, whole, o, N, false);
        const host = await step(hostLayers, createInProcessGroup(N, { timeoutMs: 60_000 }), xs, gs);
        // the one-rank device layer on each rank's tokens
        const one = new MoELayer(cuda, { ...o, weights: sliceExperts(whole.weights, 0, o.numExperts) }).upload();
        for (let r = 0; r < N; r++) {
          const f = dev.fs[r];
          const b = dev.bs[r];
          for (const [key, t] of [...Object.entries(f).filter(([, t]) => lib.isDeviceTensor(t)), ['gradInput', b.gradInput], ...Object.entries(b.grads)]) {
            const t2 = key in again.fs[r] ? again.fs[r][key] : key === 'gradInput' ? again.bs[r].gradInput : again.bs[r].grads[key];
            assert.deepEqual(bits(t2), bits(t), `rank ${r}, run to run: ${key}`);
          }
          assert.deepEqual(values(f.indices), values(host.fs[r].indices), `rank ${r}: picks, device vs host`);
          assert.ok(relErr(f.output, host.fs[r].output) <= tol, `rank ${r}: output, device vs host (${relErr(f.output, host.fs[r].output)})`);
          assert.ok(relErr(b.gradInput, host.bs[r].gradInput) <= tol, `rank ${r}: gradInput, device vs host (${relErr(b.gradInput, host.bs[r].gradInput)})`);
          assert.deepEqual(Object.keys(b.grads).sort(), Object.keys(host.bs[r].grads).sort());
          for (const k of Object.keys(b.grads)) assert.ok(relErr(b.grads[k], host.bs[r].grads[k]) <= tol, `rank ${r}: grads.${k}, device vs host (${relErr(b.grads[k], host.bs[r].grads[k])})`);
          // against one rank holding every expert, on this rank's tokens
          const wf = one.forward(dxs[r]);
          const wb = one.backward(dgs[r]);
          assert.deepEqual(values(f.indices), values(wf.indices), `rank ${r}: picks, vs one rank`);
          assert.ok(Math.abs(f.auxLoss - wf.auxLoss) <= 1e-6 * Math.max(1, Math.abs(wf.auxLoss)), `rank ${r}: aux loss ${f.auxLoss} vs ${wf.auxLoss}`);
          assert.ok(Math.abs(f.zLoss - wf.zLoss) <= 1e-6 * Math.max(1e-3, Math.abs(wf.zLoss)), `rank ${r}: z-loss ${f.zLoss} vs ${wf.zLoss}`);
          const replicated = Object.keys(wb.grads).filter((k) => !EXPERT_STACKED.includes(k));
          if (N === 1) {
            // one rank: the same computation, the same bits
            assert.deepEqual(bits(f.output), bits(wf.output), 'one rank: output = the one-rank layer');
            assert.deepEqual(bits(b.gradInput), bits(wb.gradInput), 'one rank: gradInput = the one-rank layer');
            for (const k of Object.keys(wb.grads)) assert.deepEqual(bits(b.grads[k]), bits(wb.grads[k]), `one rank: grads.${k} = the one-rank layer`);
          } else {
            assert.ok(relErr(f.output, wf.output) <= tol, `rank ${r}: output vs one rank (${relErr(f.output, wf.output)})`);
            assert.ok(relErr(b.gradInput, wb.gradInput) <= tol, `rank ${r}: gradInput vs one rank (${relErr(b.gradInput, wb.gradInput)})`);
            for (const k of replicated) assert.ok(relErr(b.grads[k], wb.grads[k]) <= tol, `rank ${r}: grads.${k} vs one rank (${relErr(b.grads[k], wb.grads[k])})`);
          }
          disposeAll(wf, wb);
        }
        // the experts' gradients: the one-rank layer on every rank's tokens at once, sliced to each rank's experts
        const allX = cuda.upload(concat(xs));
        const allG = cuda.upload(concat(gs));
        const af = one.forward(allX);
        const ab = one.backward(allG);
        for (let r = 0; r < N; r++) {
          const range = cuda.expertRangeForRank(o.numExperts, N, r);
          const want = sliceExperts(ab.grads, range.start, range.end);
          for (const k of EXPERT_STACKED) {
            if (!want[k]) continue;
            assert.ok(relErr(dev.bs[r].grads[k], want[k]) <= tol, `rank ${r}: grads.${k} vs one rank on all tokens (${relErr(dev.bs[r].grads[k], want[k])})`);
          }
        }
        disposeAll(af, ab);
        for (const t of [allX, allG]) t.dispose();
        one.dispose();
        // a step frees every buffer it made once its results are (nothing stays behind in dispatch's
        // handles; disposeAll reads the lazy losses, which frees their words), and the layers theirs
        // (measured after two steps: the first use of a kernel may make scratch that stays)
        for (const r of [...dev.fs, ...dev.bs, ...again.fs, ...again.bs]) disposeAll(r);
        const before = cuda.memory();
        const third = await step(devLayers, devGroups, dxs, dgs);
        for (const r of [...third.fs, ...third.bs]) disposeAll(r);
        const after = cuda.memory();
        assert.deepEqual([after.liveBuffers, after.liveBytes], [before.liveBuffers, before.liveBytes], 'a step leaves no buffer behind');
        const weightBuffers = devLayers.reduce((n, l) => n + Object.values(l.weights).filter((t) => lib.isDeviceTensor(t)).length, 0);
        for (const l of devLayers) l.dispose();
        assert.equal(cuda.memory().liveBuffers, before.liveBuffers - weightBuffers, "the layers' dispose frees their weights and what the last step kept");
        for (const t of [...dxs, ...dgs]) t.dispose();
      });
    }
  }

  test('training: 2 ranks, two steps (reduceReplicatedGrads with the cuda backend, AdamW each) = the same ranks on host tensors; replicated weights the same bits on every rank', async () => {
    const o = { dim: 64, inter: 32, numExperts: 8, topk: 2, activation: 'swiglu', dtype: 'float32', sharedExpert: { inter: 32 }, seed: 5, initStd: 0.3 };
    const N = 2;
    const whole = new MoELayer(cpu, o);
    const devLayers = rankLayers(cuda, whole, o, N, true);
    const hostLayers = rankLayers(cpu, whole, o, N, false);
    const devGroups = createInProcessGroup(N, { device: cuda, timeoutMs: 60_000 });
    const hostGroups = createInProcessGroup(N, { timeoutMs: 60_000 });
    const adam = { lr: 1e-3, weightDecay: 0.01 };
    const devOpts = devLayers.map((l) => new AdamW(cuda, l.parameters(), adam));
    const hostOpts = hostLayers.map((l) => new AdamW(cpu, l.parameters(), adam));
    for (let s = 0; s < 2; s++) {
      const xs = Array.from({ length: N }, (_, r) => randomTensor('float32', [33 + 5 * r, o.dim], 10 * s + r, 1));
      const gs = xs.map((x, r) => randomTensor('float32', x.shape, 500 + 10 * s + r, 0.1));
      const dxs = xs.map((x) => cuda.upload(x));
      const dgs = gs.map((g) => cuda.upload(g));
      const dev = await step(devLayers, devGroups, dxs, dgs);
      const reduced = await Promise.all(dev.bs.map((b, r) => reduceReplicatedGrads(devGroups[r], b.grads, cuda)));
      for (const [k, t] of Object.entries(reduced[0])) assert.ok(lib.isDeviceTensor(t), `reduced grads.${k} is a device tensor`);
      for (let r = 0; r < N; r++) devOpts[r].step(reduced[r]);
      const host = await step(hostLayers, hostGroups, xs, gs);
      const hostReduced = await Promise.all(host.bs.map((b, r) => reduceReplicatedGrads(hostGroups[r], b.grads)));
      // the sum is the host's, bit for bit, given the same per-rank gradients
      const viaHost = await Promise.all(dev.bs.map((b, r) => reduceReplicatedGrads(hostGroups[r], Object.fromEntries(Object.entries(b.grads).map(([k, t]) => [k, t.download()])))));
      for (const k of Object.keys(viaHost[0])) assert.deepEqual(bits(reduced[0][k]), bits(viaHost[0][k]), `step ${s}: reduced grads.${k} = the host's sum of the same gradients`);
      for (let r = 0; r < N; r++) hostOpts[r].step(hostReduced[r]);
      for (const r of [...dev.fs, ...dev.bs, ...reduced]) disposeAll(r);
      for (const t of [...dxs, ...dgs]) t.dispose();
    }
    for (let r = 0; r < N; r++) {
      for (const [k, t] of Object.entries(devLayers[r].weights)) {
        if (!t) continue;
        // (Adam moves each weight by about lr a step, either way where a gradient is near 0: the GEMMs' rounding can flip it)
        const [a, b] = [values(t), values(hostLayers[r].weights[k])];
        const worst = Math.max(...a.map((v, i) => Math.abs(v - b[i])));
        assert.ok(worst <= 2 * 2.5 * adam.lr + 1e-4 * Math.max(...b.map(Math.abs)), `rank ${r}: weights.${k} after two steps, device vs host: off by ${worst}`);
        if (!EXPERT_STACKED.includes(k)) assert.deepEqual(bits(t), bits(devLayers[0].weights[k]), `rank ${r}: weights.${k} = rank 0's, bit for bit`);
      }
    }
    for (const opt of devOpts) opt.dispose();
    for (const l of devLayers) l.dispose();
  });

  test('errors: a layer on the GPU with a group that moves host bytes; device gradients without the backend; a mix', async () => {
    const o = { dim: 16, inter: 8, numExperts: 4, topk: 2, activation: 'swiglu', dtype: 'float32', seed: 3 };
    const whole = new MoELayer(cpu, o);
    const [l0] = rankLayers(cuda, whole, o, 2, true);
    const [hostGroup] = createInProcessGroup(2, { timeoutMs: 5_000 });
    const x = cuda.upload(randomTensor('float32', [5, 16], 1, 1));
    await assert.rejects(l0.forwardParallel(hostGroup, x), (e) => e instanceof TypeError && /forwardParallel: group: expected a group that moves device memory/.test(e.message));
    assert.throws(
      () => l0.forward(x),
      (e) => e instanceof TypeError && /forward: a layer on the GPU with epSize = 2 runs through forwardParallel/.test(e.message),
    );
    const [g1] = createInProcessGroup(1, { device: cuda, timeoutMs: 5_000 });
    const grad = cuda.upload(randomTensor('float32', [4, 16], 2, 1));
    await assert.rejects(reduceReplicatedGrads(g1, { routerWeight: grad }), (e) => e instanceof TypeError && /reduceReplicatedGrads: backend: expected the cuda backend/.test(e.message));
    await assert.rejects(
      reduceReplicatedGrads(g1, { routerWeight: grad, routerBias: randomTensor('float32', [4], 3, 1) }, cuda),
      (e) => e instanceof TypeError && /grads\.routerBias: expected a device tensor \(as the other gradients\), got a host tensor/.test(e.message),
    );
    for (const t of [x, grad]) t.dispose();
    l0.dispose();
  });
});

test('examples/train-ep.mjs --device: two in-process ranks on the GPU train (the loss falls, the router and shared expert copies the same bits)', { skip: cudaOnly }, () => {
  const script = fileURLToPath(new URL('../../examples/train-ep.mjs', import.meta.url));
  if (!existsSync(script)) return assert.fail(`${script} is missing (gpu-run.sh pack copies it into the bundle)`);
  const r = spawnSync(process.execPath, [script, '--ranks', '2', '--device', '--steps', '20', '--json'], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stderr.slice(-2000));
  const out = JSON.parse(r.stdout.trim().split('\n').at(-1));
  assert.equal(out.backend, 'cuda');
  assert.equal(out.tensors, 'device');
  assert.equal(out.replicasIdentical, true);
  assert.ok(out.finalLoss < out.initialLoss / 2, `loss ${out.initialLoss} -> ${out.finalLoss}`);
});

test('the suite ran where CUDA is available', () => {
  assert.ok(skip || cuda);
});
