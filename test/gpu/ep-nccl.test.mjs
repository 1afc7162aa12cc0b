// The GPU suite, expert parallelism over NCCL (issue 20), what one GPU can check: libnccl.so.2
// loads; a group of one initialises (file and loopback-TCP rendezvous) and its collectives move
// the bytes; dispatch -> experts -> combine and both backward passes through a one-rank NCCL
// group equal, bit for bit, the same calls through an in-process group and the single-GPU path
// (permute -> expertsForward -> unpermute and their backward passes); the launcher
// (scripts/ep-launch.mjs) with one rank passes its equivalence check; a group of two whose
// rank 1 never joins rejects on rank 0 within timeoutMs (+ slack) naming rank 1; bad arguments;
// device tensors through the group's allToAllVDevice (rows GPU to GPU) == the host tensors' path;
// dispatch's send side on the GPU (epSendPlan, epRankExtras) == the host's bookkeeping.
// Where CUDA or NCCL is unavailable every test skips with the reason (also in stand-in runs:
// NCCL needs the cuda backend's GPU). Plain node:test, no node_modules; see cuda.test.mjs.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { assertSameBits, cuda, cudaOnly, distModule, host, lib, randomRouting, rng, skip, standIn, tensor } from './common.mjs';

const { freePort } = await distModule('rendezvous.js');

const nccl = lib.ncclInfo();
/** false, or why the NCCL tests cannot run here. */
const ncclSkip = skip || (standIn ? `stand-in run (${standIn} in cuda's place): NCCL needs the cuda backend's GPU` : false) || (nccl.available ? false : `NCCL unavailable: ${nccl.reason}`);

const dir = mkdtempSync(join(tmpdir(), 'moe-ep-nccl-gpu-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let serial = 0;
const freshPath = () => join(dir, `id-${++serial}`);

describe('NCCL: the library and a group of one', () => {
  // on a machine with CUDA, NCCL must load (this one fails where it does not; the others skip with the reason)
  test(`libnccl.so.2 loads (${nccl.available ? `NCCL ${nccl.version} at ${nccl.path}` : 'unavailable'})`, { skip: skip || (standIn ? `stand-in run (${standIn} in cuda's place)` : false) }, () => {
    assert.ok(nccl.available, `ncclInfo(): ${nccl.reason}`);
    assert.match(nccl.version, /^2\.\d+\.\d+$/);
    assert.equal(process.env.NCCL_NVLS_ENABLE, '0', 'NVLink multicast must be off');
  });

  for (const kind of ['file', 'tcp']) {
    test(`a group of one initialises (${kind} rendezvous), and its collectives move the bytes`, { skip: ncclSkip }, async () => {
      const rendezvous = kind === 'file' ? freshPath() : `tcp://127.0.0.1:${await freePort()}`;
      const group = await lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous, timeoutMs: 30_000 });
      assert.equal(group.rank, 0);
      assert.equal(group.size, 1);
      assert.equal(group.transport, 'nccl');
      assert.equal(group.ncclVersion, nccl.version);
      if (kind === 'file') assert.equal(existsSync(rendezvous), false, 'rank 0 removes the id file once the group is up');
      const values = Int32Array.from({ length: 37 }, (_, i) => i * 7919 - 100_000);
      const gathered = await group.allGather(values, 'test');
      assert.equal(gathered.length, 1);
      assert.deepEqual([...gathered[0]], [...values]);
      assert.deepEqual(await group.allGather(new Int32Array(0)), [new Int32Array(0)]);
      const bytes = Uint8Array.from({ length: 1001 }, (_, i) => (i * 31) & 255);
      const [back] = await group.allToAllV([bytes], [bytes.length], 'test');
      assert.deepEqual([...back], [...bytes]);
      const [none] = await group.allToAllV([new Uint8Array(0)], [0]);
      assert.equal(none.byteLength, 0);
      // a wrong expectation is a RangeError on every rank, and the group stays usable
      await assert.rejects(group.allToAllV([bytes], [1000], 'probe'), (e) => e instanceof RangeError && e.message === 'probe: allToAllV: rank 0 expects 1000 bytes from rank 0, which sends 1001');
      assert.deepEqual([...(await group.allGather(Int32Array.of(5)))[0]], [5]);
      await group.destroy();
      await assert.rejects(group.allGather(Int32Array.of(1)), /the expert-parallel group was destroyed/);
    });
  }

  test('bad arguments: TypeError / RangeError naming them', { skip: ncclSkip }, async () => {
    await assert.rejects(
      lib.createExpertParallelGroup({ rank: 1, size: 1, rendezvous: freshPath() }),
      (e) => e instanceof RangeError && e.message === 'createExpertParallelGroup: options.rank: expected 0 <= rank < size = 1, got 1',
    );
    await assert.rejects(lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: 7 }), TypeError);
    await assert.rejects(lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: freshPath(), timeoutMs: -1 }), /options.timeoutMs/);
    const group = await lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: freshPath(), timeoutMs: 30_000 });
    await assert.rejects(group.allGather([1, 2]), (e) => e instanceof TypeError && e.message === 'allGather: values: expected an Int32Array, got an Array');
    await assert.rejects(group.allToAllV([new Uint8Array(1), new Uint8Array(1)], [1]), (e) => e instanceof RangeError && /send: expected one buffer per rank \(1\), got 2/.test(e.message));
    await assert.rejects(group.allToAllV([new Uint8Array(1)], [1.5]), (e) => e instanceof RangeError && /recvBytes\[0\]/.test(e.message));
    await assert.rejects(group.allToAllV(['x'], [1], 'lbl'), (e) => e instanceof TypeError && e.message === 'lbl: allToAllV: send[0]: expected a Uint8Array, got string');
    // the group still works after argument errors
    assert.deepEqual([...(await group.allGather(Int32Array.of(3)))[0]], [3]);
    await group.destroy();
  });
});

/** A routing problem and swiglu experts' weights (T=300, E=8, k=3, H=64, inter 32), host tensors. */
function problemOf(dtype, seed) {
  const [T, E, k, H, I] = [300, 8, 3, 64, 32];
  const problem = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, rng(seed), 0.1);
  return {
    T,
    E,
    k,
    H,
    x: problem.tokens,
    routing: { indices: problem.indices, weights: problem.weights },
    weights: { gateAndUpProjs: lib.uniformTensor(dtype, [E, H, 2 * I], 7, 0.125), downProjs: lib.uniformTensor(dtype, [E, I, H], 8, 0.2) },
    grad: lib.uniformTensor(dtype, [T, H], 9, 1),
  };
}

/** One rank's dispatch -> experts -> combine -> combineBackward -> dispatchBackward on `group`. */
async function epRun(group, moe, p) {
  const d = await lib.dispatch(group, moe, p.x, p.routing, { numExperts: p.E });
  const y = moe.expertsForward(d.permutedTokens, d.tokensPerExpert, p.weights, { activation: 'swiglu' });
  const output = await lib.combine(group, moe, y, d.handle);
  const cb = await lib.combineBackward(group, moe, p.grad, d.handle);
  const db = await lib.dispatchBackward(group, moe, cb.gradExpertOutputs, d.handle, { gradPermutedProbs: cb.gradPermutedProbs });
  return { permutedTokens: d.permutedTokens, permutedProbs: d.permutedProbs, tokensPerExpert: d.tokensPerExpert, y, output, ...cb, ...db };
}

/** The single-GPU path: permute -> the same experts -> unpermute, and their backward passes. */
function singleRun(moe, p) {
  const mh = moe.indicesToMultihot(p.routing.indices, p.routing.weights, p.E);
  const perm = moe.permute(p.x, mh.routingMap, { probs: mh.probs });
  const y = moe.expertsForward(perm.permutedTokens, perm.tokensPerExpert, p.weights, { activation: 'swiglu' });
  const output = moe.unpermute(y, perm.sortedIndices, [p.T, p.H], { probs: perm.permutedProbs });
  const ub = moe.unpermuteBackward(p.grad, y, perm.sortedIndices, { probs: perm.permutedProbs });
  const pb = moe.permuteBackward(ub.gradPermuted, perm.sortedIndices, p.T, { gradPermutedProbs: ub.gradProbs, routingMap: mh.routingMap });
  // the dense [T, E] prob gradient at each pick
  const gw = new Float32Array(p.T * p.k);
  const idx = host(p.routing.indices).data;
  const dense = host(pb.gradProbs).data;
  for (let i = 0; i < p.T * p.k; i++) if (idx[i] >= 0) gw[i] = dense[Math.floor(i / p.k) * p.E + idx[i]];
  return {
    permutedTokens: perm.permutedTokens,
    permutedProbs: perm.permutedProbs,
    tokensPerExpert: perm.tokensPerExpert,
    y,
    output,
    gradExpertOutputs: ub.gradPermuted,
    gradPermutedProbs: ub.gradProbs,
    gradTokens: pb.gradTokens,
    gradWeights: tensor('float32', [p.T, p.k], gw),
  };
}

describe('NCCL: dispatch/combine with one rank', () => {
  for (const dtype of ['float32', 'bfloat16']) {
    test(`${dtype}: through a one-rank NCCL group == an in-process group == the single-GPU path, bit for bit (forward and backward)`, { skip: ncclSkip }, async () => {
      const p = problemOf(dtype, dtype === 'float32' ? 101 : 202);
      const { T, H } = p;
      const group = await lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: freshPath(), timeoutMs: 30_000 });
      const viaNccl = await epRun(group, cuda, p);
      const viaNcclAgain = await epRun(group, cuda, p);
      await group.destroy();
      const [inProcess] = lib.createInProcessGroup(1);
      const viaHub = await epRun(inProcess, cuda, p);
      const single = singleRun(cuda, p);
      for (const [key, want] of Object.entries(viaHub)) {
        assertSameBits(viaNccl[key], want, `NCCL vs in-process: ${key}`);
        assertSameBits(viaNcclAgain[key], viaNccl[key], `NCCL run to run: ${key}`);
      }
      for (const [key, want] of Object.entries(single)) assertSameBits(viaNccl[key], want, `NCCL vs the single-GPU path: ${key}`);
      // the comparisons mean something: the output is not all zeros
      assert.ok(bitsDiffer(viaNccl.output, tensor(dtype, [T, H])), 'output is not zero');
    });
  }

  for (const dtype of ['float32', 'bfloat16']) {
    // (against the single-GPU path on device tensors: the experts on device tensors take the fast
    // exp (ExpMath::Fast), those on host tensors the core's bits, so the two differ in the last bit;
    // the layout (permutedTokens, permutedProbs, tokensPerExpert) equals the host tensors' as well)
    test(`${dtype}, device tensors: the rows GPU to GPU (allToAllVDevice) == the single-GPU path on device tensors, bit for bit`, { skip: ncclSkip }, async () => {
      const p = problemOf(dtype, dtype === 'float32' ? 303 : 404);
      const { T, E, H } = p;
      const up = (t) => cuda.upload(t);
      // every tensor on the device (the routing too: dispatch reads the picks back)
      const pd = {
        ...p,
        x: up(p.x),
        routing: { indices: up(p.routing.indices), weights: up(p.routing.weights) },
        weights: { gateAndUpProjs: up(p.weights.gateAndUpProjs), downProjs: up(p.weights.downProjs) },
        grad: up(p.grad),
      };
      const group = await lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: freshPath(), timeoutMs: 30_000 });
      const onHost = await epRun(group, cuda, p);
      const onDevice = await epRun(group, cuda, pd);
      const again = await epRun(group, cuda, pd);
      const single = singleRun(cuda, pd);
      for (const key of ['permutedTokens', 'permutedProbs', 'tokensPerExpert', 'output', 'gradExpertOutputs', 'gradPermutedProbs', 'gradTokens', 'gradWeights']) {
        assert.ok(lib.isDeviceTensor(onDevice[key]), `${key} stays on the device`);
      }
      for (const [key, want] of Object.entries(single)) {
        assertSameBits(onDevice[key], host(want), `device tensors vs the single-GPU path on device tensors: ${key}`);
        assertSameBits(again[key], host(onDevice[key]), `device tensors, run to run: ${key}`);
      }
      for (const key of ['permutedTokens', 'permutedProbs', 'tokensPerExpert']) assertSameBits(onDevice[key], onHost[key], `device vs host tensors: ${key}`);
      assert.ok(bitsDiffer(onDevice.output.download(), tensor(dtype, [T, H])), 'output is not zero');

      // the exchange itself: rows back to this rank, the same bits; a wrong count is a RangeError and the group stays usable
      const rows = up(lib.uniformTensor(dtype, [5, H], 11, 1));
      const back = await group.allToAllVDevice(rows, [5], [5], 'probe');
      assert.ok(lib.isDeviceTensor(back));
      assertSameBits(back, rows.download(), 'allToAllVDevice to itself');
      await assert.rejects(group.allToAllVDevice(rows, [5], [4], 'probe'), (e) => e instanceof RangeError && /rank 0 expects \d+ bytes from rank 0, which sends \d+/.test(e.message));
      await assert.rejects(group.allToAllVDevice(rows, [4], [4]), (e) => e instanceof RangeError && /sendRows: they add up to 4 rows, send has 5/.test(e.message));
      await assert.rejects(group.allToAllVDevice(p.x, [T], [T]), (e) => e instanceof TypeError && /send: expected a device tensor/.test(e.message));
      // countsAgreed (the layout's own exchanges: no all-gather of the counts first): the same bits; this rank's own count still checked; the option checked
      assertSameBits(await group.allToAllVDevice(rows, [5], [5], 'probe', { countsAgreed: true }), rows.download(), 'allToAllVDevice to itself, countsAgreed');
      await assert.rejects(
        group.allToAllVDevice(rows, [5], [4], 'probe', { countsAgreed: true }),
        (e) => e instanceof RangeError && /rank 0 expects \d+ bytes from rank 0, which sends \d+/.test(e.message),
      );
      await assert.rejects(group.allToAllVDevice(rows, [5], [5], 'probe', { countsAgreed: 1 }), (e) => e instanceof TypeError && /probe: allToAllVDevice: options\.countsAgreed/.test(e.message));
      await assert.rejects(group.allToAllVDevice(rows, [5], [5], 'probe', { agreed: true }), (e) => e instanceof TypeError && /agreed/.test(e.message));
      // a handle from a device dispatch wants device tensors after it
      const d = await lib.dispatch(group, cuda, pd.x, pd.routing, { numExperts: E });
      await assert.rejects(
        lib.combine(group, cuda, d.permutedTokens.download(), d.handle),
        (e) => e instanceof TypeError && /combine: expertOutputs: expected a device tensor \(dispatch's tokens were on the device\), got a host tensor/.test(e.message),
      );
      await group.destroy();
      // device tokens need a group that moves device memory
      const [inProcess] = lib.createInProcessGroup(1);
      await assert.rejects(
        lib.dispatch(inProcess, cuda, pd.x, pd.routing, { numExperts: E }),
        (e) => e instanceof TypeError && /dispatch: tokens: a device tensor needs a group that moves device memory/.test(e.message),
      );
    });
  }

  test('the launcher with one rank (file and tcp rendezvous): equivalent to the single-GPU layer, bit for bit, run to run', { skip: ncclSkip }, () => {
    const script = fileURLToPath(new URL('../../scripts/ep-launch.mjs', import.meta.url));
    assert.ok(existsSync(script), `${script} is missing (gpu-run.sh pack copies it into the bundle)`);
    // (the file rendezvous with host tensors; tcp with device tensors and the bandwidth benchmark's steps)
    for (const kind of ['file', 'tcp']) {
      const out = join(dir, `launch-${kind}.json`);
      // (tcp: also three expert-parallel training steps of the layer on device tensors)
      const extra = kind === 'tcp' ? ['--bench', '3', '--train', '3'] : [];
      const run = spawnSync(
        process.execPath,
        [script, '--ranks', '1', '--rendezvous', kind, '--tokens', '256', '--hidden', '128', '--inter', '64', '--experts', '8', '--topk', '2', '--timeout-ms', '60000', '--out', out, ...extra],
        {
          encoding: 'utf8',
          timeout: 120_000,
          env: { ...process.env, CUDA_VISIBLE_DEVICES: process.env.CUDA_VISIBLE_DEVICES?.split(',')[0] ?? '0' },
        },
      );
      assert.equal(run.status, 0, `launcher (${kind}) exited with ${run.status ?? run.signal}: ${run.stderr.slice(-2000)}\n${run.stdout.slice(-2000)}`);
      const report = JSON.parse(readFileSync(out, 'utf8'));
      assert.equal(report.ranks, 1);
      assert.equal(report.results[0].error, undefined);
      assert.equal(report.equivalent, true);
      assert.equal(report.bitIdentical, true);
      assert.equal(report.deterministic, true);
      assert.equal(report.nccl.available, true);
      assert.equal(report.shapes.tensors, kind === 'tcp' ? 'device' : 'host');
      if (kind === 'tcp') {
        const [b] = report.bench;
        assert.equal(b.sentRows, report.results[0].times[0].sentTokens[0]);
        for (const v of [b.dispatchMs, b.combineMs, b.ncclAllToAllMs.dispatch, b.ncclAllToAllMs.combine, b.ratioToNcclAllToAll.dispatch, b.ratioToNcclAllToAll.combine]) {
          assert.ok(Number.isFinite(v) && v > 0, `bench: ${JSON.stringify(b)}`);
        }
        // one rank trains exactly as the one layer with every expert (the same computation on the GPU)
        assert.deepEqual(report.train, { steps: 3, equivalent: true, replicatedIdentical: true });
        assert.equal(report.results[0].train.maxAbsDiff, 0, JSON.stringify(report.results[0].train));
      }
    }
  });
});

function bitsDiffer(a, b) {
  const x = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
  const y = new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength);
  return x.some((v, i) => v !== y[i]);
}

describe('device tensors with several in-process ranks on one GPU (createInProcessGroup with device: cuda)', () => {
  // NCCL needs a GPU per rank; an in-process group moves device rows through the host, so the
  // device path's layout with 2 and 4 ranks runs here: each rank's permutedTokens, permutedProbs
  // and tokensPerExpert equal the host tensors' bit for bit; the combined output equals the
  // single-GPU path on device tensors within one merge's rounding (bit for bit with one rank);
  // every gradient run to run the same bits.
  for (const ranks of [1, 2, 4]) {
    test(`bfloat16, ${ranks} rank(s)`, { skip: cudaOnly }, async () => {
      const p = problemOf('bfloat16', 500 + ranks);
      const { T, E, k, H } = p;
      const per = T / 4;
      const rowsOf = (t, r) => lib.tensor(t.dtype, [per, ...t.shape.slice(1)], t.data.slice(r * per * (t.data.length / t.shape[0]), (r + 1) * per * (t.data.length / t.shape[0])));
      const local = (r) => {
        const { start, end } = cuda.expertRangeForRank(E, ranks, r);
        const w = (t) => lib.tensor(t.dtype, [end - start, ...t.shape.slice(1)], t.data.slice(start * (t.data.length / E), end * (t.data.length / E)));
        return { gateAndUpProjs: w(p.weights.gateAndUpProjs), downProjs: w(p.weights.downProjs) };
      };
      const share = (r, onDevice) => {
        const u = (t) => (onDevice ? cuda.upload(t) : t);
        const w = local(r);
        return {
          x: u(rowsOf(p.x, r)),
          routing: { indices: u(rowsOf(p.routing.indices, r)), weights: u(rowsOf(p.routing.weights, r)) },
          weights: { gateAndUpProjs: u(w.gateAndUpProjs), downProjs: u(w.downProjs) },
          grad: u(rowsOf(p.grad, r)),
        };
      };
      // (the first `ranks` quarters of the problem's tokens, one quarter a rank)
      const runAll = async (onDevice) => {
        const groups = lib.createInProcessGroup(ranks, onDevice ? { device: cuda, timeoutMs: 60_000 } : { timeoutMs: 60_000 });
        return Promise.all(groups.map((g, r) => epRun(g, cuda, { ...share(r, onDevice), E })));
      };
      const dev = await runAll(true);
      const again = await runAll(true);
      const hostRuns = await runAll(false);
      // the send side on the host's bookkeeping (MOE_DISPATCH_EP_SEND=host) instead of the GPU (the default): every result the same bits
      const hostSend = await withHostSend(() => runAll(true));
      for (let r = 0; r < ranks; r++) {
        for (const key of ['permutedTokens', 'permutedProbs', 'tokensPerExpert']) assertSameBits(dev[r][key], hostRuns[r][key], `rank ${r}: device vs host tensors: ${key}`);
        for (const [key, v] of Object.entries(dev[r])) assertSameBits(again[r][key], host(v), `rank ${r}, run to run: ${key}`);
        for (const [key, v] of Object.entries(dev[r])) assertSameBits(hostSend[r][key], host(v), `rank ${r}, the host's send side vs the GPU's: ${key}`);
      }
      // the single-GPU path on device tensors over the same tokens and all experts
      const all = (t) => lib.tensor(t.dtype, [ranks * per, ...t.shape.slice(1)], t.data.slice(0, ranks * per * (t.data.length / t.shape[0])));
      const single = singleRun(cuda, {
        T: ranks * per,
        E,
        k,
        H,
        x: cuda.upload(all(p.x)),
        routing: { indices: cuda.upload(all(p.routing.indices)), weights: cuda.upload(all(p.routing.weights)) },
        weights: { gateAndUpProjs: cuda.upload(p.weights.gateAndUpProjs), downProjs: cuda.upload(p.weights.downProjs) },
        grad: cuda.upload(all(p.grad)),
      });
      const want = host(single.output);
      const bf = (b) => new Float32Array(new Uint32Array([b << 16]).buffer)[0];
      let worst = 0;
      for (let r = 0; r < ranks; r++) {
        const got = host(dev[r].output);
        if (ranks === 1) assertSameBits(got, want, 'one rank: the single-GPU path, bit for bit');
        for (let t = 0; t < per; t++) {
          let rowMax = 0;
          for (let h = 0; h < H; h++) rowMax = Math.max(rowMax, Math.abs(bf(want.data[(r * per + t) * H + h])));
          for (let h = 0; h < H; h++) {
            const d = Math.abs(bf(got.data[t * H + h]) - bf(want.data[(r * per + t) * H + h]));
            worst = Math.max(worst, rowMax > 0 ? d / (2 ** -7 * ranks * rowMax) : d > 0 ? Infinity : 0);
          }
        }
      }
      assert.ok(worst <= 1, `combined output within one merge's rounding of the single-GPU path: worst ${worst}`);
      assert.ok(bitsDiffer(want, lib.tensor('bfloat16', [ranks * per, H])), 'output is not zero');
    });
  }
});

describe('NCCL: a rank that never joins', () => {
  for (const kind of ['file', 'tcp']) {
    test(`a group of two whose rank 1 never joins (${kind}): rank 0 rejects within timeoutMs (+ slack) naming rank 1`, { skip: ncclSkip }, async () => {
      const rendezvous = kind === 'file' ? freshPath() : `tcp://127.0.0.1:${await freePort()}`;
      const timeoutMs = 2000;
      const start = Date.now();
      const e = await lib.createExpertParallelGroup({ rank: 0, size: 2, rendezvous, timeoutMs }).then(
        (g) => {
          g.abort();
          return undefined;
        },
        (err) => err,
      );
      const waited = Date.now() - start;
      assert.ok(e instanceof lib.ExpertParallelTimeoutError, `expected an ExpertParallelTimeoutError, got ${e?.constructor?.name}: ${e?.message}`);
      assert.deepEqual([...e.missingRanks], [1]);
      assert.match(e.message, /^createExpertParallelGroup: rank 0 of 2: rank 1 did not join the group at .* within \d+ ms; the communicator is aborted$/);
      assert.ok(waited >= timeoutMs - 50, `rejected after ${waited} ms, before the timeout`);
      assert.ok(waited < timeoutMs + 8000, `rejected after ${waited} ms (timeout ${timeoutMs} ms)`);
      if (kind === 'file') assert.equal(existsSync(rendezvous), false, 'rank 0 removes its id file');
    });
  }

  test('after an aborted group, this process can still make a working group', { skip: ncclSkip }, async () => {
    const group = await lib.createExpertParallelGroup({ rank: 0, size: 1, rendezvous: freshPath(), timeoutMs: 30_000 });
    assert.deepEqual([...(await group.allGather(Int32Array.of(42)))[0]], [42]);
    group.abort();
    await assert.rejects(group.allGather(Int32Array.of(1)), /aborted/);
    await group.destroy();
  });
});

/** `f` with dispatch's send side on the host's bookkeeping (`MOE_DISPATCH_EP_SEND=host`; the GPU's is the default). */
async function withHostSend(f) {
  process.env.MOE_DISPATCH_EP_SEND = 'host';
  try {
    return await f();
  } finally {
    delete process.env.MOE_DISPATCH_EP_SEND;
  }
}

describe("dispatch's send side on the GPU (epSendPlan, epRankExtras) = the host's bookkeeping", () => {
  /** The host's send side: the rank map, counts, order (rank by rank, tokens ascending) and each slot's picks as local ids and weights. */
  function hostSend(picks, weights, owner, T, k, N) {
    const local = new Int32Array(owner.length);
    const seen = new Int32Array(N);
    owner.forEach((r, e) => {
      local[e] = seen[r]++;
    });
    const map = new Uint8Array(T * N);
    const pickCounts = new Array(N).fill(0);
    for (let i = 0; i < T * k; i++) {
      if (picks[i] < 0) continue;
      map[Math.floor(i / k) * N + owner[picks[i]]] = 1;
      pickCounts[owner[picks[i]]]++;
    }
    const sorted = [];
    const sendCounts = [];
    const locals = [];
    const ws = [];
    for (let j = 0; j < N; j++) {
      let n = 0;
      for (let t = 0; t < T; t++) {
        if (!map[t * N + j]) continue;
        sorted.push(t);
        n++;
        for (let c = 0; c < k; c++) {
          const e = picks[t * k + c];
          const here = e >= 0 && owner[e] === j;
          locals.push(here ? local[e] : -1);
          ws.push(here ? weights[t * k + c] : 0);
        }
      }
      sendCounts.push(n);
    }
    return { map, sendCounts, pickCounts, sorted: Int32Array.from(sorted), local: Int32Array.from(locals), w: Float32Array.from(ws) };
  }

  const ownerOf = (E, N) => {
    const owner = new Int32Array(E);
    for (let j = 0; j < N; j++) {
      const { start, end } = cuda.expertRangeForRank(E, N, j);
      owner.fill(j, start, end);
    }
    return owner;
  };

  // (5 ranks of 4 experts: a rank with none; 64 experts, k = 8 over 4 ranks: tokens on several ranks)
  for (const [N, E, k] of [
    [1, 8, 3],
    [3, 8, 3],
    [5, 4, 2],
    [4, 64, 8],
  ]) {
    test(`${N} rank(s), ${E} experts, k = ${k}, masked picks: the same map, counts, order, picks and weights`, { skip: cudaOnly }, () => {
      const T = 257;
      const p = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: 8, dtype: 'bfloat16' }, rng(100 * N + E), 0.15);
      const owner = ownerOf(E, N);
      const want = hostSend(p.indices.data, p.weights.data, owner, T, k, N);
      const idx = cuda.upload(p.indices);
      const plan = cuda.epSendPlan(idx, owner, N);
      assert.equal(plan.badPicks, false);
      assert.deepEqual(plan.sendCounts, want.sendCounts, 'tokens a rank');
      assert.deepEqual(plan.pickCounts, want.pickCounts, 'picks a rank');
      assertSameBits(plan.sendMap, tensor('bool', [T, N], want.map), 'the send map');
      const sent = want.sendCounts.reduce((a, b) => a + b, 0);
      const x = cuda.upload(p.tokens);
      const sync0 = cuda.transfers().synchronizations;
      const perm = cuda.permute(x, plan.sendMap, { numOutTokens: sent });
      assert.equal(cuda.transfers().synchronizations, sync0, "the map's true entries are known (the plan's counts): permute reads nothing back");
      assertSameBits(perm.sortedIndices, tensor('int32', [sent], want.sorted), "the send permutation's order");
      const ex = cuda.epRankExtras(perm.sortedIndices, idx, cuda.upload(p.weights), owner);
      assertSameBits(ex.local, tensor('int32', [sent, k], want.local), 'the picks as local experts');
      assertSameBits(ex.weights, tensor('float32', [sent, k], want.w), 'their weights');
    });
  }

  test('bad picks: flagged on the GPU, and dispatch on device tensors names them as the host check does', { skip: cudaOnly }, async () => {
    const [T, E, k] = [40, 8, 3];
    const p = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: 16, dtype: 'bfloat16' }, rng(77), 0);
    const owner = ownerOf(E, 2);
    const cases = [
      [(d) => (d[3 * k + 1] = 8), /dispatch: routing\.indices: element \[3\]\[1\] = 8 is outside \[0, numExperts = 8\)/],
      [(d) => (d[5 * k + 2] = -2), /dispatch: routing\.indices: element \[5\]\[2\] = -2 is outside/],
      [(d) => (d[6 * k + 1] = d[6 * k]), /dispatch: routing\.indices: row 6 lists expert \d more than once/],
    ];
    for (const [spoil, message] of cases) {
      const data = Int32Array.from(p.indices.data);
      spoil(data);
      const idx = cuda.upload(tensor('int32', [T, k], data));
      assert.equal(cuda.epSendPlan(idx, owner, 2).badPicks, true, `${message}: flagged`);
      const [g] = lib.createInProcessGroup(1, { device: cuda, timeoutMs: 10_000 });
      // the same error on either send side
      const spoiled = () => lib.dispatch(g, cuda, cuda.upload(p.tokens), { indices: idx, weights: cuda.upload(p.weights) }, { numExperts: E });
      await assert.rejects(spoiled(), (e) => e instanceof RangeError && message.test(e.message));
      await withHostSend(() => assert.rejects(spoiled(), (e) => e instanceof RangeError && message.test(e.message)));
    }
  });

  test('bad arguments: errors naming them', { skip: cudaOnly }, () => {
    const p = randomRouting({ numTokens: 20, numExperts: 4, topk: 2, hidden: 8, dtype: 'bfloat16' }, rng(5), 0);
    const idx = cuda.upload(p.indices);
    assert.throws(
      () => cuda.epSendPlan(idx, Int32Array.from([0, 1, 2, 1]), 2),
      (e) => e instanceof RangeError && /owner: element 2 = 2 is outside \[0, numRanks = 2\)/.test(e.message),
    );
    assert.throws(
      () => cuda.epSendPlan(idx, Int32Array.from([0, 0, 0, 0]), 0),
      (e) => e instanceof RangeError && /numRanks/.test(e.message),
    );
    assert.throws(
      () => cuda.epSendPlan(idx, [0, 0, 1, 1], 2),
      (e) => e instanceof TypeError && /owner: expected an Int32Array/.test(e.message),
    );
    assert.throws(
      () => cuda.epSendPlan(cuda.upload(p.weights), Int32Array.from([0, 0, 1, 1]), 2),
      (e) => e instanceof TypeError && /indices/.test(e.message),
    );
    // sorted must be permute's own sortedIndices of these tokens (its plan vouches for every slot's token)
    const owner = Int32Array.from([0, 0, 1, 1]);
    const plan = cuda.epSendPlan(idx, owner, 2);
    const perm = cuda.permute(cuda.upload(p.tokens), plan.sendMap, { numOutTokens: plan.sendCounts[0] + plan.sendCounts[1] });
    const copy = cuda.upload(perm.sortedIndices.download());
    assert.throws(
      () => cuda.epRankExtras(copy, idx, cuda.upload(p.weights), owner),
      (e) => e instanceof TypeError && /sorted/.test(e.message),
    );
    assert.throws(
      () => cuda.epRankExtras(perm.sortedIndices, idx, cuda.upload(tensor('float32', [20, 3])), owner),
      (e) => e instanceof RangeError && /weights\.shape/.test(e.message),
    );
  });
});
