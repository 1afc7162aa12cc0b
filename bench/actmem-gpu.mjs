/**
 * The MoE layer's forward + backward and its activation memory on the GPU (issue 19), ours:
 * `MoELayer` uploaded to the cuda backend at the training shapes (`TRAIN_SHAPES`: bf16 weights,
 * swiglu, softmax top-k router, Switch aux loss 0.01), `forward(x)` then `backward(g)` with the
 * output's gradient g given; no optimizer. The experts' GEMMs take the default path (`auto`: our
 * grouped GEMM on a Hopper GPU at any number of experts, cuBLAS before Hopper; `grouped` is the
 * same path, labelled so for the A/B variants), or cuBLAS when the process runs with
 * `MOE_DISPATCH_EXPERTS_GEMM=cublas` (read once a process: run it once per path). Its PyTorch peer is bench/actmem-gpu.py; `gpu-run.sh remote` with ACTMEM=1 runs
 * both, interleaved, into one actmem.json.
 *
 *   node bench/actmem-gpu.mjs [--iters N] [--warmup N] [--shapes NAMES] [--out FILE]   (bench/shapes.json's layer shapes; its byDefault ones: fine-grained,mixtral)
 *                             [--dist DIR] [--stand-in cpu] [--timeline N] [--cpu-profile FILE]
 *                             [--host-costs N] [--label NAME]
 *
 * Per shape:
 * - layerMs: the median over `iters` of one forward + backward, wall clock from a synchronised
 *   GPU to the synchronize after the backward (after `warmup` of them); the forward's and
 *   backward's results are disposed after the clock stops.
 * - activationBytes: the cuda backend's `memory().liveBytes` (every device buffer this process
 *   holds: tensors and scratch, exact byte counts) just after `forward` returns minus just before
 *   it: what the forward leaves alive = its outputs (output, indices, weights, logits, scores,
 *   tokensPerExpert: `outputBytes`) + what the layer keeps for the backward (`savedBytes`: the
 *   routing map, sortedIndices, the permuted tokens, the counts, the permuted probs, the experts'
 *   output, their up-projection and activation, the aux loss's gradient and its lazy value).
 *   The input x and the weights exist before and are not counted.
 * - hostMs: the median of the same clock stopped when backward returns, before the synchronize:
 *   the host's time to queue the step (with its own waits); near layerMs, the host holds the GPU up.
 * - peakBytes: `peakMemory()` over the forward + backward from a reset just before it (every
 *   buffer of the process, weights and input included); peakAboveStartBytes = peak minus the
 *   bytes held at the reset. gradBytes: the backward's results (gradInput + the weights' gradients).
 * - timeline (`--timeline N`, default $ACTMEM_TIMELINE or 0; the GPU only): N more forward +
 *   backward steps, each recorded with the cuda backend's `timeline` (every kernel, cuBLAS call,
 *   memset and copy between two timing events, and the host's waits); the step with the median
 *   wall clock is summarised (`summarizeTimeline`: busy, gaps, the gaps' part waiting for the
 *   host, GEMMs and the rest, each kernel name's time) and its spans kept (`timelineSpans`).
 * - `--cpu-profile FILE` (one shape): the host's timed steps alone (not the warm-up, whose first
 *   calls open cuBLAS and load kernels) recorded by V8's sampling profiler (every 50 us, through
 *   node:inspector) into FILE, a .cpuprofile for bench/cpuprof-summary.py.
 * - hostCosts (`--host-costs N`): the layer is built over the backend behind a Proxy
 *   that clocks each backend method the layer calls (wall time from the call to its return: JS
 *   checks, the addon, the driver; a nested call counts in its caller too), and N more steps are
 *   clocked so, after the timed ones (which run without it: the proxy is off until then): per
 *   method and phase (forward / backward), calls a step and microseconds a call, the whole phase's
 *   host time a step beside them (and the garbage collector's share), sorted by time a step. Where the GPU waits for the host (the
 *   step's start) these say which calls to make cheaper.
 * `--stand-in cpu` runs the same steps on the cpu backend at a tiny shape (no memory figures):
 * a check of this script where there is no GPU.
 */
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { PerformanceObserver } from 'node:perf_hooks';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

import { DEFAULT_LAYER, shapeNames } from './shapes.mjs';

const args = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const dist = resolve(arg('dist', new URL('../dist/', import.meta.url).pathname));
const { MoELayer, TRAIN_SHAPES, backendInfo, createBackend, summarizeTimeline, uniformTensor } = await import(pathToFileURL(resolve(dist, 'index.js')).href);
const iters = Number(arg('iters', '20'));
const warmup = Number(arg('warmup', '3'));
const standIn = arg('stand-in');
const timelineSteps = Number(arg('timeline', process.env.ACTMEM_TIMELINE ?? '0'));
if (!(Number.isInteger(timelineSteps) && timelineSteps >= 0)) throw new RangeError(`--timeline: expected a count of steps (0 or more), got ${arg('timeline')}`);
if (standIn !== undefined && standIn !== 'cpu') throw new RangeError('--stand-in: only cpu');
const SHAPES = {
  ...TRAIN_SHAPES,
  // the stand-in's shape (the cpu backend: seconds, not minutes)
  tiny: { batch: 96, layer: { dim: 64, inter: 48, numExperts: 8, topk: 2, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
};
const names = shapeNames(arg('shapes', standIn ? 'tiny' : DEFAULT_LAYER), SHAPES);
const cpuProfile = arg('cpu-profile');
const hostCostSteps = Number(arg('host-costs', '0'));
if (!(Number.isInteger(hostCostSteps) && hostCostSteps >= 0)) throw new RangeError(`--host-costs: expected a count of steps (0 or more), got ${arg('host-costs')}`);
if (cpuProfile !== undefined && names.length !== 1) throw new RangeError(`--cpu-profile: profiles one shape's steps; got --shapes ${names.join(',')}`);

/** V8's sampling profiler on this thread (node:inspector; its calls answer synchronously): start(), then stop() gives the profile. */
function profiler() {
  const session = new Session();
  session.connect();
  const post = (method, params) => {
    let out;
    let error;
    session.post(method, params, (e, r) => {
      error = e;
      out = r;
    });
    if (error) throw error;
    return out;
  };
  return {
    start() {
      post('Profiler.enable');
      post('Profiler.setSamplingInterval', { interval: 50 });
      post('Profiler.start');
    },
    stop() {
      const { profile } = post('Profiler.stop');
      session.disconnect();
      return profile;
    },
  };
}
// the settings other than the path (MOE_DISPATCH_EXPERTS_GEMM) this process runs with: every other
// MOE_DISPATCH_* variable but the locations, as `-name-value` (MOE_DISPATCH_GG_EPILOGUE=ring-half: `-gg-epilogue-ring-half`),
// so that an A/B's rows are told apart
const env = process.env;
const NOT_SETTINGS = ['EXPERTS_GEMM', 'CACHE_DIR', 'CUBIN_OUT', 'NATIVE', 'CUDA', 'CUDA_DEVICE', 'NCCL'].map((k) => `MOE_DISPATCH_${k}`);
const settings = Object.keys(env)
  .filter((k) => k.startsWith('MOE_DISPATCH_') && !NOT_SETTINGS.includes(k))
  .sort()
  .map((k) => `-${k.slice('MOE_DISPATCH_'.length).toLowerCase().replaceAll('_', '-')}-${env[k].replaceAll(',', '-')}`)
  .join('');
// the path's label: `auto` (the default: our grouped GEMM on a Hopper GPU), `cublas`, `grouped` (the same
// path as `auto`, the label of gpu-run.sh's ACTMEM_AB variants)
const path = ['grouped', 'cublas'].includes(env.MOE_DISPATCH_EXPERTS_GEMM) ? env.MOE_DISPATCH_EXPERTS_GEMM : 'auto';
// --label NAME: appended to the row's name (another revision's TypeScript: gpu-run.sh's AB_REV)
const label = arg('label');
const gemm = `${standIn ? standIn : `${path}${settings}`}${label ? `-${label}` : ''}`;

const moe = await createBackend({ prefer: standIn ?? 'cuda' });
if (moe.name !== (standIn ?? 'cuda')) {
  throw new Error(`actmem-gpu: no cuda backend here (got ${moe.name}): ${(await backendInfo()).find((i) => i.name === 'cuda')?.reason}`);
}
const gpu = !standIn;
const sync = () => gpu && moe.synchronize();
const live = () => (gpu ? moe.memory().liveBytes : null);
/**
 * `backend` behind a Proxy whose methods add their wall time to `costs` while `costs.on`
 * (`costs.phase` names the part of the step): key `phase method`, `{ calls, ms }`.
 */
function clocked(backend, costs) {
  const wrapped = new Map();
  return new Proxy(backend, {
    get(target, key) {
      const v = Reflect.get(target, key, target);
      if (typeof v !== 'function') return v;
      let w = wrapped.get(key);
      if (!w) {
        w = (...a) => {
          if (!costs.on) return v.apply(target, a);
          const t0 = performance.now();
          try {
            return v.apply(target, a);
          } finally {
            const name = `${costs.phase} ${String(key)}`;
            costs.by[name] ??= { calls: 0, ms: 0 };
            const c = costs.by[name];
            c.calls++;
            c.ms += performance.now() - t0;
          }
        };
        wrapped.set(key, w);
      }
      return w;
    },
  });
}
const bytesOf = (ts) => (gpu ? ts.reduce((a, t) => a + t.byteLength, 0) : null);
const SIZE = { bfloat16: 2, float16: 2, float32: 4, int32: 4, bool: 1 };

const rows = [];
for (const name of names) {
  const { batch: T, layer: options } = SHAPES[name];
  const { dim, inter, numExperts: E, topk: k } = options;
  const N = T * k;
  if (gpu) moe.releaseCachedMemory();
  const weights = {
    routerWeight: uniformTensor('bfloat16', [dim, E], 1, 1 / Math.sqrt(dim)),
    gateAndUpProjs: uniformTensor('bfloat16', [E, dim, 2 * inter], 2, 1 / Math.sqrt(dim)),
    downProjs: uniformTensor('bfloat16', [E, inter, dim], 3, 1 / Math.sqrt(inter)),
  };
  const costs = { on: false, phase: '', by: {} };
  let layer = new MoELayer(hostCostSteps > 0 ? clocked(moe, costs) : moe, { ...options, weights });
  if (gpu) layer = layer.upload();
  const x0 = uniformTensor('bfloat16', [T, dim], 4, 1);
  const g0 = uniformTensor('bfloat16', [T, dim], 5, 1 / Math.sqrt(T * dim));
  const x = gpu ? moe.upload(x0) : x0;
  const g = gpu ? moe.upload(g0) : g0;
  const outputsOf = (f) => [f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert];
  const resultsOf = (b) => [b.gradInput, ...Object.values(b.grads)];
  const dispose = (ts) => {
    if (gpu) for (const t of ts) t.dispose();
  };
  let aux = Number.NaN;
  const fwdBwd = () => {
    const f = layer.forward(x);
    const b = layer.backward(g);
    return { f, b };
  };
  for (let i = 0; i < warmup; i++) {
    const { f, b } = fwdBwd();
    dispose([...outputsOf(f), ...resultsOf(b)]);
  }
  sync();
  const s0 = gpu ? moe.transfers().synchronizations : 0;
  const times = [];
  const hostTimes = [];
  const prof = cpuProfile === undefined ? undefined : profiler();
  prof?.start();
  for (let i = 0; i < iters; i++) {
    sync();
    const a = performance.now();
    const { f, b } = fwdBwd();
    hostTimes.push(performance.now() - a);
    sync();
    times.push(performance.now() - a);
    dispose([...outputsOf(f), ...resultsOf(b)]);
  }
  if (prof) writeFileSync(cpuProfile, JSON.stringify(prof.stop()));
  // the host's waits a forward + backward, less the timing's own two synchronize calls
  const syncs = gpu ? (moe.transfers().synchronizations - s0) / iters - 2 : null;
  // the memory, three times (the same numbers each time: a difference is reported)
  const mem = [];
  for (let i = 0; i < 3; i++) {
    sync();
    const before = live();
    if (gpu) moe.peakMemory({ reset: true });
    const f = layer.forward(x);
    const after = live();
    const outputBytes = bytesOf(outputsOf(f));
    const b = layer.backward(g);
    sync();
    const peak = gpu ? moe.peakMemory() : null;
    const gradBytes = bytesOf(resultsOf(b));
    const afterBackward = live();
    aux = f.auxLoss;
    dispose([...outputsOf(f), ...resultsOf(b)]);
    sync();
    mem.push({ before, after, outputBytes, peak, gradBytes, afterBackward, afterDispose: live() });
  }
  // the timeline of `timelineSteps` more steps; the median one by its wall clock is kept
  let timeline = null;
  let timelineSpans = null;
  if (gpu && timelineSteps > 0) {
    const recorded = [];
    for (let i = 0; i < timelineSteps; i++) {
      const { result, timeline: t } = moe.timeline(fwdBwd);
      dispose([...outputsOf(result.f), ...resultsOf(result.b)]);
      recorded.push({ t, sum: summarizeTimeline(t) });
    }
    recorded.sort((a, b) => a.sum.wallMs - b.sum.wallMs);
    const mid = recorded[Math.floor(recorded.length / 2)];
    const top = mid.sum.byName.slice(0, 30).map((e) => ({ ...e, ms: Number(e.ms.toFixed(4)) }));
    timeline = { ...mid.sum, byName: top, spans: mid.t.spans.length, waits: mid.t.waits, wallsMs: recorded.map((r) => Number(r.sum.wallMs.toFixed(4))) };
    timelineSpans = mid.t.spans.map((x) => [x.name, Number(x.startMs.toFixed(4)), Number(x.endMs.toFixed(4)), Number(x.queuedMs.toFixed(4))]);
    const f3 = (v) => v.toFixed(3);
    console.log(
      `${name.padStart(13)} timeline (${gemm}, median of ${timelineSteps}): GPU wall ${f3(timeline.wallMs)} ms, busy ${f3(timeline.busyMs)}, gaps ${f3(timeline.gapMs)} (waiting for the host ${f3(timeline.hostBoundMs)}), GEMMs ${f3(timeline.gemmMs)}, the rest ${f3(timeline.otherMs)}, ${timeline.spans} spans, ${timeline.waits.length} waits; longest: ${top
        .slice(0, 12)
        .map((e) => `${e.name} ${f3(e.ms)}${e.count > 1 ? ` (${e.count})` : ''}`)
        .join(', ')}`,
    );
  }
  // the host's time a backend method (--host-costs): N more steps through the clocking proxy
  let hostCosts = null;
  if (hostCostSteps > 0) {
    const phaseMs = { forward: 0, backward: 0 };
    // the garbage collector's time over these steps (its entries arrive asynchronously: read after a turn)
    let gcMs = 0;
    const gcObserver = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) gcMs += e.duration;
    });
    gcObserver.observe({ entryTypes: ['gc'] });
    for (let i = 0; i < hostCostSteps; i++) {
      sync();
      costs.on = true;
      costs.phase = 'forward';
      let t0 = performance.now();
      const f = layer.forward(x);
      phaseMs.forward += performance.now() - t0;
      costs.phase = 'backward';
      t0 = performance.now();
      const b = layer.backward(g);
      phaseMs.backward += performance.now() - t0;
      costs.on = false;
      sync();
      dispose([...outputsOf(f), ...resultsOf(b)]);
    }
    await new Promise((r) => setImmediate(r));
    gcObserver.disconnect();
    const us = (v) => Number(((v * 1000) / hostCostSteps).toFixed(1));
    const methods = Object.entries(costs.by)
      .map(([key, c]) => ({ phase: key.split(' ')[0], method: key.split(' ')[1], callsPerStep: c.calls / hostCostSteps, usPerCall: Number(((c.ms * 1000) / c.calls).toFixed(1)), usPerStep: us(c.ms) }))
      .sort((a, b) => b.usPerStep - a.usPerStep);
    hostCosts = { steps: hostCostSteps, forwardUs: us(phaseMs.forward), backwardUs: us(phaseMs.backward), gcUs: us(gcMs), methods };
    console.log(
      `${name.padStart(13)} host costs (${gemm}, ${hostCostSteps} steps): forward ${hostCosts.forwardUs} us, backward ${hostCosts.backwardUs} us a step (the GC ${hostCosts.gcUs} us of them); by method (us a step, calls, us a call):`,
    );
    for (const r of methods) console.log(`  ${r.phase.padEnd(8)} ${r.method.padEnd(36)} ${String(r.usPerStep).padStart(8)} ${String(r.callsPerStep).padStart(4)} x ${r.usPerCall}`);
  }
  const m = mem[mem.length - 1];
  const activationBytes = gpu ? m.after - m.before : null;
  // what the layer keeps for the backward, by its shapes (layer.ts #dispatchLocal / #finishForward;
  // expertsForward's saved h and a): the measured savedBytes less these is `savedUnaccountedBytes`.
  // Where the experts gather their rows on load the permuted copy is not made (its [N, 0] stand-in
  // holds a 1-byte buffer).
  const gathers = gpu && moe.expertsGatherOnLoad();
  const expectedSaved = {
    routingMap: T * E * SIZE.bool,
    sortedIndices: N * SIZE.int32,
    permutedTokens: gathers ? 1 : N * dim * SIZE.bfloat16,
    tokensPerExpert: E * SIZE.int32,
    permutedProbs: N * SIZE.float32,
    upProjection: N * 2 * inter * SIZE.bfloat16,
    activation: N * inter * SIZE.bfloat16,
    auxGradScores: T * E * SIZE.float32,
  };
  const expectedSum = Object.values(expectedSaved).reduce((a, b) => a + b, 0);
  times.sort((a, b) => a - b);
  hostTimes.sort((a, b) => a - b);
  const ms = times[Math.floor(times.length / 2)];
  const hostMs = hostTimes[Math.floor(hostTimes.length / 2)];
  const row = {
    shape: name,
    dims: `T=${T} dim=${dim} inter=${inter} E=${E} k=${k} bf16 weights`,
    gemm,
    layerMs: ms,
    layerMsMin: times[0],
    hostMs,
    layerMsMax: times[times.length - 1],
    iters,
    synchronizationsPerFwdBwd: syncs,
    activationBytes,
    outputBytes: m.outputBytes,
    savedBytes: gpu ? activationBytes - m.outputBytes : null,
    expectedSaved,
    savedUnaccountedBytes: gpu ? activationBytes - m.outputBytes - expectedSum : null,
    gathersOnLoad: gathers,
    permutedCopyBytes: N * dim * SIZE.bfloat16,
    baselineBytes: m.before,
    peakBytes: m.peak,
    peakAboveStartBytes: gpu ? m.peak - m.before : null,
    gradBytes: m.gradBytes,
    memoryRepeatsAgree: gpu && mem.every((r) => r.after - r.before === activationBytes && r.peak - r.before === m.peak - m.before),
    leakBytes: gpu ? m.afterDispose - m.before : null,
    memoryRepeats: mem,
    auxLoss: aux,
    timeline,
    timelineSpans,
    hostCosts,
  };
  rows.push(row);
  const gib = (b) => (b === null ? 'n/a' : `${(b / 2 ** 30).toFixed(3)} GiB`);
  console.log(
    `${name.padStart(13)} ours (${gemm}): forward + backward ${ms.toFixed(3)} ms (min ${times[0].toFixed(3)}, ${syncs ?? 'n/a'} waits, the host done queueing at ${hostMs.toFixed(3)}); activations ${gib(activationBytes)} (outputs ${gib(row.outputBytes)}, saved ${gib(row.savedBytes)}, unaccounted ${row.savedUnaccountedBytes ?? 'n/a'} B; the permuted copy ${gib(row.permutedCopyBytes)}${gathers ? ', not made: gathered on load' : ''}); peak ${gib(row.peakBytes)} (${gib(row.peakAboveStartBytes)} above the start); repeats agree ${row.memoryRepeatsAgree}, leak ${row.leakBytes ?? 'n/a'} B; aux ${aux}`,
  );
  layer.dispose();
  dispose([x, g]);
}
const out = arg('out');
if (out) writeFileSync(out, JSON.stringify({ who: 'ours', gemm, device: (await backendInfo()).find((i) => i.name === (standIn ?? 'cuda'))?.device ?? null, rows }));
