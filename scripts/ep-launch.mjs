#!/usr/bin/env node
/**
 * Expert parallelism over NCCL, one process per GPU (issue 20): starts N Node processes (rank r
 * sees GPU r alone: CUDA_VISIBLE_DEVICES; NCCL_NVLS_ENABLE=0 in each), each joins the group
 * (`createExpertParallelGroup`), and runs dispatch -> its experts (expertsForward, swiglu, the
 * probs applied by the experts as MoELayer does) -> combine on its share of the tokens, then
 * checks the result against the single-GPU layer (the same tokens, routing and weights through
 * permute -> expertsForward -> unpermute on its own GPU; on device tensors with --device). Prints one JSON object (and writes it
 * with --out); exit code 0 when every rank is equivalent.
 *
 *   node scripts/ep-launch.mjs [--ranks N] [--tokens T] [--hidden H] [--inter I] [--experts E]
 *        [--topk k] [--dtype bfloat16|float32] [--rendezvous file|tcp] [--timeout-ms MS]
 *        [--repeat R] [--seed S] [--out FILE] [--dist DIR] [--stand-in cpu] [--device] [--bench ITERS] [--profile]
 *
 * N defaults to the GPUs nvidia-smi lists (1 if it cannot say). T is tokens per rank. With one
 * rank the result must equal the single-GPU layer bit for bit; with more, within the rounding of
 * one merge (ts/ep.ts: each rank's partial sum is rounded to the dtype once). Every repeat must
 * give the same bits (determinism). The dispatch/combine times are wall-clock, host tensors in
 * and out (upload, NCCL, download), unless `--device`: the tokens, routing and weights are then
 * device tensors and the rows move GPU to GPU (the group's allToAllVDevice). `--bench ITERS`
 * (implies --device) then times dispatch and combine alone, ITERS calls each after a warm-up, each
 * to a synchronize, against NCCL's own all-to-all of the same rows (allToAllVDevice with the same
 * counts), and reports each rank's bandwidth (bytes of the rows it sends a second) and the
 * ratio `ratioToNcclAllToAll` (NCCL's time over ours). Issue 20's shape: --tokens 8192 --hidden
 * 7168 --experts 256 --topk 8. `--profile` (with --bench): the JavaScript CPU profile of the timed
 * dispatch calls (node:inspector), its functions by self time in the report (`bench.profile`):
 * where a dispatch's wall clock goes that the GPU does not explain.
 * `--train STEPS`: after that, expert-parallel training: each rank builds an `MoELayer` holding its
 * share of the experts (`epSize`, `epRank`; bf16 or float32 swiglu, softmax top-k, aux loss 0.01),
 * and runs STEPS steps of forwardParallel -> backwardParallel -> reduceReplicatedGrads -> AdamW on
 * its own tokens (device tensors unless --stand-in), against one layer with every expert trained
 * on every rank's tokens in this process; reports (`train`) the losses, how far each weight is from
 * that layer's (`maxAbsDiff`, within Adam's `lr` a step where a gradient's sign flips under the
 * rounding of one merge), and a checksum of the replicated weights (router), which must be the same on
 * every rank.
 * `--stand-in cpu` (with --ranks 1) runs the same steps on the cpu backend with an in-process group
 * instead of CUDA and NCCL: a check of this script on a machine with no GPU.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const num = (name, dflt) => {
  const v = Number(arg(name, String(dflt)));
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`--${name}: expected a non-negative integer, got ${arg(name)}`);
  return v;
};
const PREFIX = 'EP-RESULT ';

if (args[0] === '--worker') await worker();
else await launch();

function gpuCount() {
  try {
    return (
      execFileSync('nvidia-smi', ['-L'], { encoding: 'utf8' })
        .split('\n')
        .filter((l) => l.startsWith('GPU ')).length || 1
    );
  } catch {
    return 1;
  }
}

/** A module of the built library (`--dist DIR`, MOE_DISPATCH_DIST, or ../dist). */
function distModule(name) {
  const dist = resolve(arg('dist', process.env.MOE_DISPATCH_DIST ?? fileURLToPath(new URL('../dist/', import.meta.url))));
  return import(pathToFileURL(resolve(dist, name)).href);
}

async function launch() {
  const ranks = num('ranks', gpuCount());
  if (ranks < 1) throw new RangeError('--ranks: at least 1');
  const kind = arg('rendezvous', 'file');
  if (kind !== 'file' && kind !== 'tcp') throw new RangeError(`--rendezvous: file or tcp, got ${kind}`);
  const timeoutMs = num('timeout-ms', 120_000);
  const dir = mkdtempSync(join(tmpdir(), 'moe-ep-'));
  const rendezvous = kind === 'file' ? join(dir, 'nccl-id') : `tcp://127.0.0.1:${await (await distModule('rendezvous.js')).freePort()}`;
  const visible = process.env.CUDA_VISIBLE_DEVICES?.split(',').filter((s) => s !== '');
  if (visible && visible.length < ranks) throw new RangeError(`--ranks ${ranks}: CUDA_VISIBLE_DEVICES lists ${visible.length} GPUs`);
  const passOn = args.filter((a, i) => !['--ranks', '--out', '--rendezvous', '--timeout-ms'].includes(a) && !['--ranks', '--out', '--rendezvous', '--timeout-ms'].includes(args[i - 1]));
  const started = performance.now();
  const children = Array.from({ length: ranks }, (_, r) => {
    const env = {
      ...process.env,
      CUDA_VISIBLE_DEVICES: visible ? visible[r] : String(r),
      MOE_DISPATCH_CUDA_DEVICE: '0',
      // NVLink multicast off in every process (it can take a shared host's GPUs out of service)
      NCCL_NVLS_ENABLE: '0',
      NVSHMEM_DISABLE_NVLS: '1',
      TORCH_SYMM_MEM_DISABLE_MULTICAST: '1',
    };
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--worker', String(r), String(ranks), rendezvous, String(timeoutMs), ...passOn], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const out = { rank: r, stdout: '', stderr: '', code: null, signal: null };
    child.stdout.setEncoding('utf8').on('data', (s) => {
      out.stdout += s;
    });
    child.stderr.setEncoding('utf8').on('data', (s) => {
      out.stderr += s;
      for (const line of s.split('\n')) if (line) process.stderr.write(`[rank ${r}] ${line}\n`);
    });
    out.done = new Promise((res) =>
      child.on('close', (code, signal) => {
        out.code = code;
        out.signal = signal;
        res();
      }),
    );
    out.child = child;
    return out;
  });
  // a worker stuck past its own timeouts is killed (they should never need it)
  const wall = setTimeout(
    () => {
      for (const c of children) c.child.kill('SIGKILL');
    },
    3 * timeoutMs + 60_000,
  );
  await Promise.all(children.map((c) => c.done));
  clearTimeout(wall);
  rmSync(dir, { recursive: true, force: true });
  const results = children.map((c) => {
    const line = c.stdout.split('\n').find((l) => l.startsWith(PREFIX));
    if (line) return JSON.parse(line.slice(PREFIX.length));
    return { rank: c.rank, error: `exited with ${c.signal ?? c.code} and no result: ${c.stderr.trim().split('\n').slice(-3).join(' | ')}` };
  });
  const trained = results.filter((r) => r.train);
  const train = trained.length
    ? {
        steps: trained[0].train.steps,
        equivalent: trained.length === results.length && trained.every((r) => r.train.equivalent),
        // the copies of the replicated weights: the same bits on every rank
        replicatedIdentical: trained.length === results.length && trained.every((r) => r.train.replicatedChecksum === trained[0].train.replicatedChecksum),
      }
    : undefined;
  const ok = results.every((r) => !r.error && r.equivalent && r.deterministic) && (!train || (train.equivalent && train.replicatedIdentical));
  let machine;
  try {
    machine = execFileSync('nvidia-smi', ['--query-gpu=name,driver_version', '--format=csv,noheader'], { encoding: 'utf8' }).trim().split('\n');
  } catch {
    machine = ['nvidia-smi unavailable'];
  }
  const report = {
    kind: 'ep-launch',
    date: new Date().toISOString(),
    machine,
    ranks,
    rendezvous: kind,
    shapes: results.find((r) => r.shapes)?.shapes,
    nccl: results.find((r) => r.nccl)?.nccl,
    equivalent: results.every((r) => !r.error && r.equivalent),
    bitIdentical: results.every((r) => !r.error && r.bitIdentical),
    deterministic: results.every((r) => !r.error && r.deterministic),
    train,
    bench: results.some((r) => r.bench) ? results.map((r) => ({ rank: r.rank, ...r.bench })) : undefined,
    wallMs: Math.round(performance.now() - started),
    results,
  };
  const text = JSON.stringify(report, null, 2);
  console.log(text);
  const outFile = arg('out');
  if (outFile) writeFileSync(outFile, `${text}\n`);
  process.exitCode = ok ? 0 : 1;
}

function rowsOf(t, start, end) {
  const w = t.shape.length > 1 ? t.shape.slice(1).reduce((a, b) => a * b, 1) : 1;
  return { dtype: t.dtype, shape: [end - start, ...t.shape.slice(1)], data: t.data.slice(start * w, end * w) };
}

function bitsEqual(a, b) {
  const x = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
  const y = new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

async function worker() {
  const [rank, size, rendezvous, timeoutMs] = [Number(args[1]), Number(args[2]), args[3], Number(args[4])];
  const result = { rank, size };
  try {
    const lib = await distModule('index.js');
    const { randomRouting, rng } = await distModule('random.js');
    const T = num('tokens', 512);
    const H = num('hidden', 256);
    const I = num('inter', 128);
    const E = num('experts', 16);
    const k = num('topk', 4);
    const dtype = arg('dtype', 'bfloat16');
    if (dtype !== 'bfloat16' && dtype !== 'float32') throw new RangeError(`--dtype: bfloat16 or float32, got ${dtype}`);
    const repeat = Math.max(1, num('repeat', 2));
    const benchIters = num('bench', 0);
    const onDevice = benchIters > 0 || args.includes('--device');
    const seed = num('seed', 20);
    result.shapes = { tokensPerRank: T, hidden: H, inter: I, experts: E, topk: k, dtype, activation: 'swiglu', tensors: onDevice ? 'device' : 'host' };
    result.nccl = lib.ncclInfo();
    // --stand-in cpu: the cpu backend and an in-process group of one (checks this script where there is no GPU; ranks 1 only)
    const standIn = arg('stand-in');
    if (standIn && (standIn !== 'cpu' || size !== 1)) throw new RangeError('--stand-in: only cpu, with --ranks 1');
    if (standIn && onDevice) throw new RangeError('--device / --bench: device tensors need the cuda backend (no --stand-in)');
    const moe = await lib.createBackend({ prefer: standIn ?? 'cuda' });
    if (moe.name !== (standIn ?? 'cuda')) throw new Error(`no cuda backend in this process (got ${moe.name}): ${(await lib.backendInfo()).find((i) => i.name === 'cuda')?.reason}`);

    // The whole problem, the same in every process: all ranks' tokens, their routing, every expert's weights.
    const all = randomRouting({ numTokens: T * size, numExperts: E, topk: k, hidden: H, dtype }, rng(seed), 0.05);
    const weights = {
      gateAndUpProjs: lib.uniformTensor(dtype, [E, H, 2 * I], seed + 1, 1 / Math.sqrt(H)),
      downProjs: lib.uniformTensor(dtype, [E, I, H], seed + 2, 1 / Math.sqrt(I)),
    };
    const range = moe.expertRangeForRank(E, size, rank);
    const local = {
      gateAndUpProjs: rowsOf(weights.gateAndUpProjs, range.start, range.end),
      downProjs: rowsOf(weights.downProjs, range.start, range.end),
    };
    const hostX = rowsOf(all.tokens, rank * T, (rank + 1) * T);
    const hostRouting = { indices: rowsOf(all.indices, rank * T, (rank + 1) * T), weights: rowsOf(all.weights, rank * T, (rank + 1) * T) };
    // --device: everything this rank gives dispatch and its experts on the GPU
    const up = (t) => (onDevice ? moe.upload(t) : t);
    const x = up(hostX);
    const routing = { indices: up(hostRouting.indices), weights: up(hostRouting.weights) };
    const localW = { gateAndUpProjs: up(local.gateAndUpProjs), downProjs: up(local.downProjs) };
    const sync = () => onDevice && moe.synchronize();
    const toHost = (t) => (onDevice ? t.download() : t);

    // The single-GPU layer over every token (this rank's GPU), then this rank's rows of it; with
    // --device on device tensors too (the experts on device tensors take the fast exp, on host
    // tensors the core's bits: the two differ in the last bit, so each path is checked against its own)
    const mh = moe.indicesToMultihot(up(all.indices), up(all.weights), E);
    const perm = moe.permute(up(all.tokens), mh.routingMap, { probs: mh.probs });
    const wAll = { gateAndUpProjs: up(weights.gateAndUpProjs), downProjs: up(weights.downProjs) };
    const yAll = moe.expertsForward(perm.permutedTokens, perm.tokensPerExpert, wAll, { activation: 'swiglu', permutedProbs: perm.permutedProbs });
    const merged = moe.unpermute(yAll, perm.sortedIndices, [T * size, H]);
    const single = rowsOf(toHost(merged), rank * T, (rank + 1) * T);

    const t0 = performance.now();
    const group = standIn ? Object.assign(lib.createInProcessGroup(1)[0], { destroy: async () => {} }) : await lib.createExpertParallelGroup({ rank, size, rendezvous, timeoutMs });
    result.joinMs = Math.round(performance.now() - t0);
    const outputs = [];
    const times = [];
    let last;
    for (let i = 0; i < repeat; i++) {
      sync();
      const a = performance.now();
      const d = await lib.dispatch(group, moe, x, routing, { numExperts: E });
      sync();
      const b = performance.now();
      const y = moe.expertsForward(d.permutedTokens, d.tokensPerExpert, localW, { activation: 'swiglu', permutedProbs: d.permutedProbs });
      sync();
      const c = performance.now();
      outputs.push(toHost(await lib.combine(group, moe, y, d.handle, { weighted: false })));
      const e = performance.now();
      times.push({ dispatchMs: b - a, expertsMs: c - b, combineMs: e - c, sentTokens: d.handle.sendCounts, receivedTokens: d.handle.recvCounts });
      last = { d, y };
    }
    if (benchIters > 0) result.bench = await bench(lib, moe, group, x, routing, E, last, benchIters, sync);
    const trainSteps = num('train', 0);
    if (trainSteps > 0) result.train = await train(lib, moe, group, { rank, size, T, H, I, E, k, dtype, seed, steps: trainSteps, onDevice: !standIn });
    await group.destroy();
    const out = outputs[0];
    result.deterministic = outputs.every((o) => bitsEqual(o, out));
    result.bitIdentical = bitsEqual(out, single);
    // Within one merge's rounding: per element, 2^-7 (bf16; 2^-22 float32) of the row's largest |value|, times the ranks merged.
    const u = dtype === 'float32' ? 2 ** -22 : 2 ** -7;
    const val = (t, i) => (t.dtype === 'float32' ? t.data[i] : bf16(t.data[i]));
    let maxAbsDiff = 0;
    let worst = 0;
    for (let t = 0; t < T; t++) {
      let rowMax = 0;
      for (let h = 0; h < H; h++) rowMax = Math.max(rowMax, Math.abs(val(single, t * H + h)));
      for (let h = 0; h < H; h++) {
        const diff = Math.abs(val(out, t * H + h) - val(single, t * H + h));
        maxAbsDiff = Math.max(maxAbsDiff, diff);
        worst = Math.max(worst, rowMax > 0 ? diff / (u * size * rowMax) : diff > 0 ? Infinity : 0);
      }
    }
    result.maxAbsDiff = maxAbsDiff;
    result.worstOverTolerance = worst;
    result.equivalent = size === 1 ? result.bitIdentical : worst <= 1;
    result.times = times;
  } catch (e) {
    result.error = `${e?.constructor?.name ?? 'Error'}: ${e?.message ?? e}`;
  }
  console.log(`${PREFIX}${JSON.stringify(result)}`);
  process.exit(0);
}

/**
 * `--bench`: dispatch and combine alone (device tensors), and NCCL's all-to-all of the same rows
 * (dispatch's counts out and back; combine's the other way), `iters` calls each after 2 warm-up
 * calls, each call to a synchronize; medians.
 */
async function bench(lib, moe, group, x, routing, E, last, iters, sync) {
  const { d, y } = last;
  const h = d.handle;
  const rowBytes = h.hidden * (h.dtype === 'float32' ? 4 : 2);
  const sent = h.sendCounts.reduce((a, b) => a + b, 0);
  const received = h.recvCounts.reduce((a, b) => a + b, 0);
  const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
  const time = async (f) => {
    const ms = [];
    for (let i = 0; i < iters + 2; i++) {
      sync();
      const a = performance.now();
      const r = await f();
      sync();
      if (i >= 2) ms.push(performance.now() - a);
      for (const t of Array.isArray(r) ? r : [r]) if (lib.isDeviceTensor(t)) t.dispose();
    }
    return median(ms);
  };
  const dispatchOnce = async () => {
    const r = await lib.dispatch(group, moe, x, routing, { numExperts: E });
    return [r.permutedTokens, r.permutedProbs, r.tokensPerExpert];
  };
  const dispatchMs = await time(dispatchOnce);
  const profile = args.includes('--profile') ? await profiled(() => time(dispatchOnce)) : undefined;
  const combineMs = await time(() => lib.combine(group, moe, y, h, { weighted: false }));
  // the same rows through NCCL alone: a tensor of what dispatch sends, exchanged with its counts, and back
  const rowsOut = moe.upload(lib.uniformTensor(h.dtype, [sent, h.hidden], 5, 1));
  const rowsBack = moe.upload(lib.uniformTensor(h.dtype, [received, h.hidden], 6, 1));
  const ncclDispatchMs = await time(() => group.allToAllVDevice(rowsOut, h.sendCounts, h.recvCounts, 'bench'));
  const ncclCombineMs = await time(() => group.allToAllVDevice(rowsBack, h.recvCounts, h.sendCounts, 'bench'));
  rowsOut.dispose();
  rowsBack.dispose();
  const gbps = (rows, ms) => (rows * rowBytes) / (ms * 1e6);
  return {
    iters,
    rowBytes,
    sentRows: sent,
    receivedRows: received,
    dispatchMs,
    combineMs,
    ncclAllToAllMs: { dispatch: ncclDispatchMs, combine: ncclCombineMs },
    gbPerSecond: { dispatch: gbps(sent, dispatchMs), combine: gbps(received, combineMs), ncclDispatch: gbps(sent, ncclDispatchMs), ncclCombine: gbps(received, ncclCombineMs) },
    ratioToNcclAllToAll: { dispatch: ncclDispatchMs / dispatchMs, combine: ncclCombineMs / combineMs },
    profile,
  };
}

/**
 * `--train STEPS`: expert-parallel training of an MoELayer (this rank's experts, its own tokens)
 * against one layer with every expert trained on every rank's tokens here (the same initial
 * weights and data in every process, from the seed).
 */
async function train(lib, moe, group, { rank, size, T, H, I, E, k, dtype, seed, steps, onDevice }) {
  const { MoELayer, AdamW, EXPERT_STACKED, reduceReplicatedGrads, uniformTensor } = lib;
  const options = { dim: H, inter: I, numExperts: E, topk: k, activation: 'swiglu', dtype, auxLossCoeff: 0.01, initStd: 0.05, seed: seed + 3 };
  const whole = new MoELayer(moe, options);
  const copyOf = (t) => ({ ...t, data: t.data.slice() });
  const range = moe.expertRangeForRank(E, size, rank);
  const share = Object.fromEntries(
    Object.entries(whole.weights)
      .filter(([, t]) => t)
      .map(([key, t]) => [key, EXPERT_STACKED.includes(key) ? rowsOf(t, range.start, range.end) : copyOf(t)]),
  );
  let mine = new MoELayer(moe, { ...options, epSize: size, epRank: rank, weights: share });
  let ref = new MoELayer(moe, {
    ...options,
    weights: Object.fromEntries(
      Object.entries(whole.weights)
        .filter(([, t]) => t)
        .map(([key, t]) => [key, copyOf(t)]),
    ),
  });
  if (onDevice) [mine, ref] = [mine.upload(), ref.upload()];
  const lr = 1e-3;
  const [opt, refOpt] = [new AdamW(moe, mine.parameters(), { lr }), new AdamW(moe, ref.parameters(), { lr })];
  const up = (t) => (onDevice ? moe.upload(t) : t);
  const free = (...ts) => {
    for (const t of ts) if (lib.isDeviceTensor(t)) t.dispose();
  };
  const losses = [];
  const started = performance.now();
  for (let s = 0; s < steps; s++) {
    const xAll = uniformTensor(dtype, [T * size, H], seed + 100 + s, 1);
    const gAll = uniformTensor(dtype, [T * size, H], seed + 200 + s, 1 / Math.sqrt(T * size * H));
    const [x, g] = [up(rowsOf(xAll, rank * T, (rank + 1) * T)), up(rowsOf(gAll, rank * T, (rank + 1) * T))];
    const f = await mine.forwardParallel(group, x);
    const b = await mine.backwardParallel(group, g);
    const reduced = await reduceReplicatedGrads(group, b.grads, moe);
    opt.step(reduced);
    losses.push(f.auxLoss);
    free(x, g, f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert, b.gradInput, ...Object.values(b.grads), ...Object.values(reduced));
    const [xa, ga] = [up(xAll), up(gAll)];
    const rf = ref.forward(xa);
    const rb = ref.backward(ga);
    refOpt.step(rb.grads);
    free(xa, ga, rf.output, rf.indices, rf.weights, rf.logits, rf.scores, rf.tokensPerExpert, rb.gradInput, ...Object.values(rb.grads));
  }
  const trainMs = performance.now() - started;
  // each weight against the one layer's (its rows of this rank's experts): Adam moves a weight by
  // about lr a step either way, so a gradient whose sign the merge's rounding flips can move it 2 lr
  const host = (t) => (lib.isDeviceTensor(t) ? t.download() : t);
  const val = (t, i) => (t.dtype === 'float32' ? t.data[i] : bf16(t.data[i]));
  let maxAbsDiff = 0;
  for (const [key, t] of Object.entries(mine.weights)) {
    if (!t) continue;
    const a = host(t);
    const w = host(ref.weights[key]);
    const want = EXPERT_STACKED.includes(key) ? rowsOf(w, range.start, range.end) : w;
    for (let i = 0; i < a.data.length; i++) maxAbsDiff = Math.max(maxAbsDiff, Math.abs(val(a, i) - val(want, i)));
  }
  const replicated = host(mine.weights.routerWeight);
  const bytes = new Uint8Array(replicated.data.buffer, replicated.data.byteOffset, replicated.data.byteLength);
  let checksum = 2166136261;
  for (const v of bytes) checksum = Math.imul(checksum ^ v, 16777619) >>> 0;
  opt.dispose?.();
  refOpt.dispose?.();
  mine.dispose();
  ref.dispose();
  return { steps, lr, auxLosses: losses, trainMs, maxAbsDiff, bound: 2 * steps * lr, equivalent: maxAbsDiff <= 2 * steps * lr, replicatedChecksum: checksum };
}

/**
 * Runs `f` under the V8 CPU profiler (node:inspector) and returns the profile's functions by self
 * time (the top 25: name, file:line, ms) and the total sampled time; `(idle)` is time waiting
 * (for the GPU, NCCL's worker threads, the event loop).
 */
async function profiled(f) {
  const { Session } = await import('node:inspector/promises');
  const session = new Session();
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.setSamplingInterval', { interval: 100 });
  await session.post('Profiler.start');
  let profile;
  try {
    await f();
  } finally {
    ({ profile } = await session.post('Profiler.stop'));
    session.disconnect();
  }
  const byNode = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map();
  profile.samples.forEach((id, i) => {
    const { functionName, url, lineNumber } = byNode.get(id).callFrame;
    const key = `${functionName || '(anonymous)'} ${url.split('/').slice(-2).join('/')}:${lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + (profile.timeDeltas[i] ?? 0) / 1000);
  });
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  const top = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25);
  return { sampledMs: total, top: top.map(([where, ms]) => ({ where, ms: Math.round(ms * 1000) / 1000 })) };
}

function bf16(bits) {
  const f = new Float32Array(new Uint32Array([bits << 16]).buffer);
  return f[0];
}
