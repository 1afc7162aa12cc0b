// What both GPU suite files share: loading the built facade and the golden files, and the
// bit-for-bit comparisons. Plain JavaScript, no node_modules (see cuda.test.mjs). It holds no
// tests itself.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { bytesOf, DTYPE_OF, goldenTensor, maxRelErr } from '../common/golden.mjs';

const distDir = process.env.MOE_DISPATCH_DIST ? resolve(process.env.MOE_DISPATCH_DIST) : fileURLToPath(new URL('../../dist/', import.meta.url));
export const goldenDir = process.env.MOE_GOLDEN_DIR ? resolve(process.env.MOE_GOLDEN_DIR) : fileURLToPath(new URL('../fixtures/golden/', import.meta.url));
/** A module of the built library under test. */
export const distModule = (name) => import(pathToFileURL(resolve(distDir, name)).href);
export const lib = await distModule('index.js');
export const { randomRouting, rng } = await distModule('random.js');
export const { tensor, toBFloat16Bits, toFloat16Bits } = lib;
export const infos = await lib.backendInfo();
export const cudaInfo = infos.find((i) => i.name === 'cuda');
/** Whether the GPU is a Hopper (compute capability 9.0: the grouped GEMM's wgmma and TMA). */
export const hopper = /compute capability 9\.0\b/.test(cudaInfo?.device ?? '');
export const cpu = await lib.createBackend({ prefer: 'cpu' });

// ---------------------------------------------------------------------------------------
// Comparisons

export { bytesOf, maxRelErr };

export function host(t) {
  return t && lib.isDeviceTensor(t) ? t.download() : t;
}

/**
 * `got` as a host tensor, after checking that it is present exactly when `want` is, with `want`'s
 * dtype and shape; undefined when both are absent.
 */
export function sameLayout(got, want, what) {
  if (want === undefined || want === null) {
    assert.ok(got === undefined || got === null, `${what}: expected absent, got a tensor`);
    return undefined;
  }
  got = host(got);
  assert.ok(got, `${what}: missing`);
  assert.equal(got.dtype, want.dtype, `${what}: dtype`);
  assert.deepEqual([...got.shape], [...want.shape], `${what}: shape`);
  return got;
}

export function assertSameBits(got, want, what) {
  got = sameLayout(got, want, what);
  if (!got) return;
  const a = bytesOf(got);
  const b = bytesOf(want);
  assert.equal(a.length, b.length, `${what}: byte length`);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) {
      const w = got.data.BYTES_PER_ELEMENT;
      const e = Math.floor(i / w);
      assert.fail(`${what}: element ${e} differs: cuda ${got.data[e]} vs cpu ${want.data[e]} (${a.length / w} elements)`);
    }
  }
}

export function assertSameResult(got, want, what) {
  for (const key of new Set([...Object.keys(want), ...Object.keys(got)])) assertSameBits(got[key], want[key], `${what}.${key}`);
}

/** Both throw, with the same class and message; or both return. */
export function outcome(f) {
  try {
    return { value: f() };
  } catch (e) {
    return { error: e };
  }
}

/** `fa` (the backend under test) and `fb` (cpu) both throw, with the same class and message. */
export function assertSameError(fa, fb, what = '') {
  const a = outcome(fa);
  const b = outcome(fb);
  assert.ok(a.error && b.error, `${what} both throw (cuda: ${a.error?.message ?? 'returned'}; cpu: ${b.error?.message ?? 'returned'})`);
  assert.equal(a.error.constructor.name, b.error.constructor.name, `${what} error class (cuda: ${a.error.message})`);
  assert.equal(a.error.message, b.error.message, `${what} message`);
}

// ---------------------------------------------------------------------------------------
// Random permute/unpermute problems

/**
 * `count` random problems from `seed`: sizes picked from `experts`, `tokens` and `hidden`, a
 * dtype, a mask rate, dropAndPad with probability `dropAndPadRate`, probs with 0.8, and one more
 * boolean field `flag.name` with probability `flag.rate`. Each gets a `label`.
 */
export function randomProblems({ count, seed, experts, tokens, hidden, dropAndPadRate, flag }) {
  const random = rng(seed);
  const pick = (xs) => xs[Math.floor(random() * xs.length)];
  const problems = [];
  for (let i = 0; i < count; i++) {
    const numExperts = pick(experts);
    const p = {
      numTokens: pick(tokens),
      numExperts,
      topk: 1 + Math.floor(random() * Math.min(numExperts, 8)),
      hidden: pick(hidden),
      dtype: pick(['float32', 'bfloat16', 'float16']),
      maskRate: pick([0, 0, 0.2, 1]),
      seed: i + 1,
      dropAndPad: random() < dropAndPadRate,
      withProbs: random() < 0.8,
      [flag.name]: random() < flag.rate,
    };
    p.label = `T=${p.numTokens} E=${p.numExperts} k=${p.topk} H=${p.hidden} ${p.dtype} mask=${p.maskRate}${p.dropAndPad ? ' dropAndPad' : ''}${p.withProbs ? ' probs' : ''}${p[flag.name] ? ` ${flag.text}` : ''} #${p.seed}`;
    problems.push(p);
  }
  return problems;
}

/**
 * A problem of randomProblems() set up for permute: its routing (from rng(p.seed * 7919)), the
 * cpu's multihot map and probs, a random capacity when `p.dropAndPad`, and permute's options;
 * `random` is that generator, to draw more from.
 */
export function permuteProblem(p) {
  const random = rng(p.seed * 7919);
  const r = randomRouting(p, random, p.maskRate);
  const multihot = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
  const capacity = p.dropAndPad && p.numTokens > 0 ? 1 + Math.floor(random() * p.numTokens) : undefined;
  const options = {};
  if (p.withProbs) options.probs = multihot.probs;
  if (capacity !== undefined) Object.assign(options, { dropAndPad: true, numOutTokens: capacity * p.numExperts });
  return { random, r, multihot, options, dropAndPad: capacity !== undefined };
}

/** `rows` finite token rows of problem `p`'s dtype and hidden size (rng(p.seed * 31)), to unpermute. */
export function finiteRows(p, rows) {
  return randomRouting({ ...p, numTokens: rows }, rng(p.seed * 31), 0).tokens;
}

// ---------------------------------------------------------------------------------------
// Golden cases

export function loadGolden(op) {
  const path = resolve(goldenDir, `${op}.json`);
  if (!existsSync(path)) return { error: `${path} is missing (set MOE_GOLDEN_DIR)` };
  return { file: JSON.parse(readFileSync(path, 'utf8')) };
}

export { DTYPE_OF };
export function toTensor(g, as = DTYPE_OF[g.dtype]) {
  return goldenTensor(g, lib, as);
}

// ---------------------------------------------------------------------------------------
// The backend under test

// MOE_GPU_SUITE_STANDIN=wasm runs a suite with another backend in cuda's place (to check the
// suite itself on a machine with no GPU); the tests that need device tensors still skip.
export const standIn = process.env.MOE_GPU_SUITE_STANDIN;
/** false, or why the suite cannot run. */
export const skip = cudaInfo?.available || standIn ? false : `CUDA unavailable: ${cudaInfo?.reason ?? 'backendInfo() does not list cuda'}`;
/** false, or why the device-tensor tests cannot run. */
export const cudaOnly = standIn ? `stand-in run (${standIn} in cuda's place)` : skip;
/** The grouped GEMM's tests' skip reason (node:test `skip`): no cuda backend, or not a Hopper GPU. */
export const skipGrouped = cudaOnly || (hopper ? false : `the grouped GEMM needs a Hopper GPU (sm_90), this is ${cudaInfo?.device}`);

/** float32 values uniform in [-scale, scale) from `random` (rng). */
/** A tensor of `dtype` with values uniform in [-scale, scale) from seed `seed` (rounded to the dtype). */
export function randomTensor(dtype, shape, seed, scale) {
  const r = rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  return tensor(
    dtype,
    shape,
    Array.from({ length: n }, () => (r() * 2 - 1) * scale),
  );
}

export function uniformF32(shape, random, scale = 1) {
  const n = shape.reduce((a, b) => a * b, 1);
  return tensor(
    'float32',
    shape,
    Float32Array.from({ length: n }, () => (random() * 2 - 1) * scale),
  );
}

/** uniformF32's values rounded to bfloat16. */
export function uniformBF16(shape, random, scale = 1) {
  return tensor('bfloat16', shape, Uint16Array.from(uniformF32(shape, random, scale).data, toBFloat16Bits));
}

/** A float tensor's values (host or device; bfloat16 and float16 widened) as float64. */
export function floatValues(t) {
  t = host(t);
  if (t.dtype === 'bfloat16') return Float64Array.from(t.data, lib.fromBFloat16Bits);
  if (t.dtype === 'float16') return Float64Array.from(t.data, lib.fromFloat16Bits);
  return Float64Array.from(t.data);
}

/** max |got - want| <= tol * max(1, max |want|), and the same dtype and shape (`got` and `want` host or device). */
export function assertClose(got, want, tol, what) {
  got = host(got);
  want = host(want);
  assert.equal(got.dtype, want.dtype, `${what}: dtype`);
  assert.deepEqual([...got.shape], [...want.shape], `${what}: shape`);
  const a = floatValues(got);
  const b = floatValues(want);
  let scale = 1;
  for (const v of b) scale = Math.max(scale, Math.abs(v));
  let worst = 0;
  let at = -1;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  assert.ok(worst <= tol * scale, `${what}: element ${at} differs by ${worst} (got ${a[at]}, want ${b[at]}; allowed ${tol * scale})`);
}

/**
 * The grouped experts' forward and backward on device tensors (`fwd`, `bwd`: permute's rows and
 * counts, `perm`) against the same calls with the counts uploaded (the GPU does not know their
 * sum: the cuBLAS path) and against the cpu backend (`hostWeights`: the weights as host tensors),
 * every output and gradient to `tol`. Returns the cuBLAS path's results.
 */
export function assertExpertsAgree({ fwd, bwd, perm, weights, hostWeights, grad, kind, tol = 3e-2 }) {
  const counts = perm.tokensPerExpert.download();
  const uploaded = cuda.upload(counts);
  const options = { activation: kind, permutedProbs: perm.permutedProbs };
  const fwdB = cuda.expertsForward(perm.permutedTokens, uploaded, weights, options);
  const bwdB = cuda.expertsBackward(grad, perm.permutedTokens, uploaded, weights, options);
  const hx = perm.permutedTokens.download();
  const ho = { activation: kind, permutedProbs: perm.permutedProbs.download() };
  const want = cpu.expertsForward(hx, counts, hostWeights, ho);
  const wantB = cpu.expertsBackward(grad.download(), hx, counts, hostWeights, ho);
  assertClose(fwd.output, want, tol, 'output vs cpu');
  assertClose(fwd.output, fwdB, tol, 'output vs cuBLAS');
  const gradKey = 'gradGateAndUpProjs' in wantB ? 'gradGateAndUpProjs' : 'gradUpProjs';
  for (const key of ['gradTokens', gradKey, 'gradDownProjs', 'gradProbs']) {
    assertClose(bwd[key], wantB[key], tol, `${key} vs cpu`);
    assertClose(bwd[key], bwdB[key], tol, `${key} vs cuBLAS`);
  }
  return { fwdB, bwdB };
}

/** The backend under test (cuda, or the stand-in); undefined when skipped. */
export const cuda = skip ? undefined : await lib.createBackend({ prefer: standIn ?? 'cuda' });

/**
 * A routed experts problem on the GPU: the tokens in their own order (`x [T, dim]`), permute's
 * outputs on them (with the permuted copy), the weights, the gradient of the experts' rows
 * (`grad [T k, dim]`) and of the tokens in their own order (`gradTokens [T, dim]`), the options.
 * `empty`: the last expert gets no tokens.
 */
export function routedExperts({ kind, T, dim, inter, E, k, empty }) {
  const random = rng(7 * T + dim + E);
  const width = kind === 'swiglu' ? 2 * inter : inter;
  const logits = uniformF32([T, E], random, 3);
  if (empty) for (let t = 0; t < T; t++) logits.data[t * E + E - 1] = -100;
  const routed = cuda.route(cuda.upload(logits), { topk: k });
  const mh = cuda.indicesToMultihot(routed.indices, routed.weights, E);
  const x = cuda.upload(uniformBF16([T, dim], random));
  const perm = cuda.permute(x, mh.routingMap, { probs: mh.probs, numOutTokens: T * k });
  const wkey = kind === 'swiglu' ? 'gateAndUpProjs' : 'upProjs';
  const weights = {
    [wkey]: cuda.upload(uniformBF16([E, dim, width], random, 1 / Math.sqrt(dim))),
    downProjs: cuda.upload(uniformBF16([E, inter, dim], random, 1 / Math.sqrt(inter))),
  };
  const grad = cuda.upload(uniformBF16([T * k, dim], random, 0.1));
  const gradTokens = cuda.upload(uniformBF16([T, dim], random, 0.1));
  return { x, perm, weights, grad, gradTokens, options: { activation: kind, permutedProbs: perm.permutedProbs }, gradKey: kind === 'swiglu' ? 'gradGateAndUpProjs' : 'gradUpProjs' };
}

// ---------------------------------------------------------------------------------------
// Device copies and their disposal (host tensors in stand-in runs)

/** A device copy (the stand-in keeps host tensors). */
export function up(x) {
  if (x === undefined || standIn) return x;
  return cuda.upload(x);
}

/** Device copies of the tensors of an options object. */
export function upAll(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj)) out[k] = v && typeof v === 'object' && 'data' in v && 'dtype' in v ? up(v) : v;
  return out;
}

/** Disposes the device tensors among `xs` (and those of result objects). */
export function free(...xs) {
  for (const x of xs) {
    if (!x || typeof x !== 'object') continue;
    if (lib.isDeviceTensor(x)) x.dispose();
    else if (!('data' in x)) for (const v of Object.values(x)) if (lib.isDeviceTensor(v)) v.dispose();
  }
}

/**
 * A test per error case `{ name: (backend, u) => call }`: on `backend` the call throws what it
 * throws on cpu, with device tensors (`u` = `upload`; the copies disposed after) and with host ones.
 */
export function sameErrorsAsCpu(cases, { backend = cuda, upload = up, skip: skipped = skip } = {}) {
  for (const [name, f] of Object.entries(cases)) {
    test(name, { skip: skipped }, () => {
      const made = [];
      const u = (x) => {
        const d = upload(x);
        if (lib.isDeviceTensor(d)) made.push(d);
        return d;
      };
      assertSameError(
        () => f(backend, u),
        () => f(cpu, (x) => x),
        'device tensors:',
      );
      assertSameError(
        () => f(backend, (x) => x),
        () => f(cpu, (x) => x),
        'host tensors:',
      );
      free(...made);
    });
  }
}
