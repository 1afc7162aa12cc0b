// The webgpu backend against wasm, bit for bit: the cases, once, for every place the webgpu
// backend runs. test/webgpu.test.ts runs them under vitest (the chromium project: SwiftShader),
// test/gpu/webgpu-dawn.test.mjs under node:test in Node through Dawn (the `webgpu` npm package:
// the GPU machine's GPU). Plain JavaScript with no imports, so the GPU machine (no node_modules)
// runs it as it is: the library comes from the caller (`api`: the module the suite imported,
// `ts/index.js` or `dist/index.js`; `random`: its random.js), and so do the assertions (`check`).
//
// Every op of `WEBGPU_OPS` (and a few that run on wasm inside) on seeded random problems in each
// token dtype, with host and with webgpu tensors as inputs; results are compared bit for bit.
// Errors: the same class and message as wasm; device errors (a disposed tensor, a buffer over the
// adapter's limit, a lost device) name the op; the backend can be recreated.

/** The random problems of the layout cases (each in every dtype of DTYPES). */

/** The core's exp (crates/moe-core/src/detmath.rs) in JavaScript's float64, operation for operation. */
const word = (hi, lo) => new Float64Array(new Uint32Array([lo, hi]).buffer)[0];
const LN2_HI = word(0x3fe62e42, 0xfee00000);
const LN2_LO = word(0x3dea39ef, 0x35793c76);
const INV_FACTORIAL = [1];
for (let i = 1, fact = 1; i <= 14; i++) {
  fact *= i;
  INV_FACTORIAL.push(1 / fact);
}
const scale2 = (x, k) => (k > 1023 ? x * 2 ** 1023 * 2 ** Math.min(k - 1023, 1023) : k < -1022 ? x * 2 ** -1022 * 2 ** Math.max(k + 1022, -1022) : x * 2 ** k);
function coreExpOf(x) {
  if (Number.isNaN(x)) return x;
  if (x > 709.782712893384) return Infinity;
  if (x < -745.2) return 0;
  const k = Math.floor(x * Math.LOG2E + 0.5);
  const r = x - k * LN2_HI - k * LN2_LO;
  let p = INV_FACTORIAL[14];
  for (let i = 13; i >= 0; i--) p = p * r + INV_FACTORIAL[i];
  return scale2(p, k);
}

export const PROBLEMS = [
  { numTokens: 1, numExperts: 1, topk: 1, hidden: 1 },
  { numTokens: 7, numExperts: 4, topk: 2, hidden: 3 },
  { numTokens: 33, numExperts: 8, topk: 2, hidden: 5 },
  { numTokens: 64, numExperts: 16, topk: 4, hidden: 16 },
  { numTokens: 129, numExperts: 6, topk: 3, hidden: 7 },
  { numTokens: 300, numExperts: 64, topk: 8, hidden: 33 },
  { numTokens: 5, numExperts: 3, topk: 2, hidden: 0 },
];
export const DTYPES = ['float32', 'bfloat16', 'float16'];
/** Every activation kind with options that change its arithmetic (the activations' and the experts' cases). */
const ACTIVATION_KINDS = [
  ['swiglu', {}],
  ['quick_geglu', { alpha: 1.5, limit: 2.5 }],
  ['swiglu_oai', {}],
  ['swiglu_clamped', { limit: 1.25 }],
  ['relu2', {}],
];

/**
 * The webgpu backend of `api` (undefined, with `why`, when there is none), its backendInfo()
 * entry, and a wasm backend to compare it with.
 */
export async function openWebGpu(api) {
  const info = (await api.backendInfo()).find((i) => i.name === 'webgpu');
  let moe;
  let why = info ? (info.reason ?? 'backendInfo() gives no reason') : 'backendInfo() does not list webgpu';
  if (info?.available) {
    try {
      const b = await api.createBackend({ prefer: 'webgpu' });
      if (api.isWebGpuBackend(b)) moe = b;
      else why = `createBackend({ prefer: 'webgpu' }) returned '${b.name}'`;
    } catch (e) {
      why = `createBackend failed: ${e.message}`;
    }
  }
  const wasm = await api.createBackend({ prefer: 'wasm' });
  return { info, moe, why, wasm };
}

/** The raw bits of every element: uint32 for float32, uint16 for bfloat16/float16, values otherwise (as test/util.ts's bitsOf). */
function bitsOf(t) {
  switch (t.dtype) {
    case 'float32':
      return Array.from(new Uint32Array(t.data.buffer, t.data.byteOffset, t.data.length));
    case 'int64':
      return Array.from(t.data, Number);
    default:
      return Array.from(t.data);
  }
}

/** The error a call throws (or rejects with). */
async function errorOf(f) {
  try {
    await f();
  } catch (e) {
    return e;
  }
  throw new Error('expected an error');
}

/**
 * The cases, in order (the last checks the counts the others leave in `compared`), each
 * `{ name, run }` with `run` async. `ctx`:
 * - `api`, `random` (`{ rng, randomRouting }`), `f64` (async: the exports of webgpu/gpu.js,
 *   webgpu/f64.js and webgpu/shaders.js: the software float64 and scan cases drive shaders directly);
 * - `moe`, `wasm`, `info`: what openWebGpu() gave (moe defined);
 * - `autoPick`: the name `createBackend()` (auto) must give here;
 * - `check`: `{ equal (Object.is), deepEqual, ok, match, fail }`, each with a message last.
 * `compared`: tensors compared bit for bit, per op.
 */
export function webgpuCases(ctx) {
  const { api, moe, wasm, info, autoPick, check } = ctx;
  const { tensor, toBFloat16Bits, toFloat16Bits, WEBGPU_OPS } = api;
  const { rng, randomRouting } = ctx.random;
  const compared = {};
  const cases = [];
  const add = (name, run) => cases.push({ name, run });

  /** Every tensor of `got` (device, downloaded) equals `want`'s bit for bit, with the same keys. */
  async function same(op, got, want, what) {
    const host = await moe.toHost(got);
    const walk = (g, w, path) => {
      if (typeof w !== 'object' || w === null) {
        check.equal(g, w, path);
        return;
      }
      if ('dtype' in w) {
        check.ok(g !== undefined, `${path}: missing`);
        check.equal(g.dtype, w.dtype, `${path}.dtype`);
        check.deepEqual([...g.shape], [...w.shape], `${path}.shape`);
        const gb = bitsOf(g);
        const wb = bitsOf(w);
        const bad = gb.findIndex((b, i) => b !== wb[i]);
        check.equal(bad, -1, `${path}: first differing element ${bad} (got ${gb[bad]}, want ${wb[bad]})`);
        compared[op] = (compared[op] ?? 0) + 1;
        return;
      }
      check.deepEqual(Object.keys(g).sort(), Object.keys(w).sort(), `${path}: keys`);
      for (const k of Object.keys(w)) walk(g[k], w[k], `${path}.${k}`);
    };
    walk(host, want, `${op} ${what}`);
  }

  /** Values uniform in [-4 s, 4 s) of a dtype and shape. */
  function randomScaled(dtype, shape, s, random) {
    const v = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => (random() * 8 - 4) * s);
    if (dtype === 'float32') return tensor('float32', shape, v);
    return tensor(dtype, shape, Uint16Array.from(v, dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits));
  }

  function randomTokens(dtype, rows, h, random) {
    const v = Float32Array.from({ length: rows * h }, () => random() * 8 - 4);
    if (dtype === 'float32') return tensor('float32', [rows, h], v);
    return tensor(dtype, [rows, h], Uint16Array.from(v, dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits));
  }

  add(`backendInfo() lists webgpu with its adapter and GPU ops; auto picks ${autoPick} here`, async () => {
    check.equal(info.available, true, 'info.available');
    check.deepEqual(info.gpuOps, [...WEBGPU_OPS], 'info.gpuOps');
    check.match(info.device, /WebGPU adapter/, 'info.device');
    check.equal((await api.createBackend()).name, autoPick, 'createBackend() (auto)');
  });

  for (const dtype of DTYPES) {
    for (const [pi, p] of PROBLEMS.entries()) {
      add(`${dtype} T=${p.numTokens} E=${p.numExperts} k=${p.topk} H=${p.hidden}: every layout op`, async () => {
        const m = moe;
        const random = rng(1000 * pi + DTYPES.indexOf(dtype) + 1);
        const { numTokens: T, numExperts: E, topk: k, hidden: H } = p;
        const r = randomRouting({ ...p, dtype }, random, 0.15);
        const tokens = randomTokens(dtype, T, H, random);
        // half the cases with device inputs, half with host inputs
        const dev = pi % 2 === 0;
        const up = (t) => (dev ? m.upload(t) : t);

        // indicesToMultihot / multihotToIndices / tokensPerExpert
        const i2m = wasm.indicesToMultihot(r.indices, r.weights, E);
        await same('indicesToMultihot', await m.gpu.indicesToMultihot(up(r.indices), up(r.weights), E), i2m, 'int32');
        const idx64 = tensor(
          'int64',
          [T, k],
          BigInt64Array.from(r.indices.data, (v) => BigInt(v)),
        );
        await same('indicesToMultihot', await m.gpu.indicesToMultihot(idx64, r.weights, E), wasm.indicesToMultihot(idx64, r.weights, E), 'int64');
        const { routingMap, probs } = i2m;
        await same('multihotToIndices', await m.gpu.multihotToIndices(up(routingMap), { probs: up(probs) }), wasm.multihotToIndices(routingMap, { probs }), 'probs');
        await same('multihotToIndices', await m.gpu.multihotToIndices(up(routingMap), { topk: k + 1 }), wasm.multihotToIndices(routingMap, { topk: k + 1 }), 'topk');
        await same('tokensPerExpert', await m.gpu.tokensPerExpert(up(routingMap)), wasm.tokensPerExpert(routingMap), '');

        // permute / unpermute, plain
        const want = wasm.permute(tokens, routingMap, { probs });
        const got = await m.gpu.permute(up(tokens), up(routingMap), { probs: up(probs) });
        await same('permute', got, want, 'plain');
        const n = want.sortedIndices.shape[0];
        await same('permute', await m.gpu.permute(up(tokens), routingMap, { numOutTokens: n }), wasm.permute(tokens, routingMap, { numOutTokens: n }), 'numOutTokens');
        const permuted = randomTokens(dtype, n, H, random);
        await same('unpermute', await m.gpu.unpermute(up(permuted), got.sortedIndices, [T, H]), wasm.unpermute(permuted, want.sortedIndices, [T, H]), 'no probs');
        await same(
          'unpermute',
          await m.gpu.unpermute(up(permuted), got.sortedIndices, [T, H], { probs: got.permutedProbs }),
          wasm.unpermute(permuted, want.sortedIndices, [T, H], { probs: want.permutedProbs }),
          'slot probs',
        );
        // host sortedIndices and probs: checked by the core's check function on their values
        await same(
          'unpermute',
          await m.gpu.unpermute(up(permuted), want.sortedIndices, [T, H], { probs: want.permutedProbs }),
          wasm.unpermute(permuted, want.sortedIndices, [T, H], { probs: want.permutedProbs }),
          'host sortedIndices',
        );
        await same(
          'unpermute',
          await m.gpu.unpermute(permuted, up(want.sortedIndices), [T, H], { probs: up(probs), routingMap: up(routingMap) }),
          wasm.unpermute(permuted, want.sortedIndices, [T, H], { probs, routingMap }),
          'dense probs',
        );
        const gpp = tensor(
          'float32',
          [n],
          Float32Array.from({ length: n }, () => random() - 0.5),
        );
        await same(
          'permuteBackward',
          await m.gpu.permuteBackward(up(permuted), got.sortedIndices, T, { gradPermutedProbs: up(gpp), routingMap: up(routingMap) }),
          wasm.permuteBackward(permuted, want.sortedIndices, T, { gradPermutedProbs: gpp, routingMap }),
          'plain',
        );
        const gradOut = randomTokens(dtype, T, H, random);
        await same('unpermuteBackward', await m.gpu.unpermuteBackward(up(gradOut), up(permuted), got.sortedIndices), wasm.unpermuteBackward(gradOut, permuted, want.sortedIndices), 'no probs');
        await same(
          'unpermuteBackward',
          await m.gpu.unpermuteBackward(up(gradOut), up(permuted), got.sortedIndices, { probs: got.permutedProbs }),
          wasm.unpermuteBackward(gradOut, permuted, want.sortedIndices, { probs: want.permutedProbs }),
          'slot probs',
        );
        await same(
          'unpermuteBackward',
          await m.gpu.unpermuteBackward(up(gradOut), up(permuted), got.sortedIndices, { probs: up(probs), routingMap }),
          wasm.unpermuteBackward(gradOut, permuted, want.sortedIndices, { probs, routingMap }),
          'dense probs',
        );

        // drop-and-pad: capacity below, at and above the mean load
        for (const cap of [Math.max(1, Math.floor((T * k) / E / 2)), Math.min(T, Math.ceil((T * k) / E)), T]) {
          const o = { probs, numOutTokens: cap * E, dropAndPad: true };
          const w = wasm.permute(tokens, routingMap, o);
          const g = await m.gpu.permute(up(tokens), up(routingMap), { ...o, probs: up(probs) });
          await same('permute', g, w, `dropAndPad C=${cap}`);
          const pt = randomTokens(dtype, cap * E, H, random);
          const uo = { probs, routingMap, dropAndPad: true };
          await same('unpermute', await m.gpu.unpermute(up(pt), g.sortedIndices, [T, H], uo), wasm.unpermute(pt, w.sortedIndices, [T, H], uo), `dropAndPad C=${cap}`);
          await same(
            'unpermute',
            await m.gpu.unpermute(up(pt), g.sortedIndices, [T, H], { probs: g.permutedProbs, dropAndPad: true }),
            wasm.unpermute(pt, w.sortedIndices, [T, H], { probs: w.permutedProbs, dropAndPad: true }),
            `dropAndPad slot probs C=${cap}`,
          );
          const gp = tensor(
            'float32',
            [cap * E],
            Float32Array.from({ length: cap * E }, () => random() - 0.5),
          );
          const bo = { gradPermutedProbs: gp, routingMap, dropAndPad: true };
          await same('permuteBackward', await m.gpu.permuteBackward(up(pt), g.sortedIndices, T, bo), wasm.permuteBackward(pt, w.sortedIndices, T, bo), `dropAndPad C=${cap}`);
          const go = randomTokens(dtype, T, H, random);
          await same('unpermuteBackward', await m.gpu.unpermuteBackward(up(go), up(pt), g.sortedIndices, uo), wasm.unpermuteBackward(go, pt, w.sortedIndices, uo), `dense probs, dropAndPad C=${cap}`);
        }

        // sortChunksByIndex and its backward: random splits of the rows, random order
        const chunks = 1 + Math.floor(random() * 6);
        const sizes = new Int32Array(chunks);
        for (let i = 0; i < T; i++) sizes[Math.floor(random() * chunks)]++;
        const order = Int32Array.from({ length: chunks }, (_, i) => i);
        for (let i = chunks - 1; i > 0; i--) {
          const j = Math.floor(random() * (i + 1));
          [order[i], order[j]] = [order[j], order[i]];
        }
        const split = tensor('int32', [chunks], sizes);
        const idxs = tensor('int32', [chunks], order);
        const rowProbs = tensor(
          'float32',
          [T],
          Float32Array.from({ length: T }, () => random()),
        );
        await same('sortChunksByIndex', await m.gpu.sortChunksByIndex(up(tokens), up(split), idxs, up(rowProbs)), wasm.sortChunksByIndex(tokens, split, idxs, rowProbs), '');
        const vals = tensor(
          'float32',
          [T, E],
          Float32Array.from({ length: T * E }, () => (random() < 0.2 ? [0, -0, 0.5, -0.5][Math.floor(random() * 4)] : random() * 4 - 2)),
        );
        for (const kk of [1, Math.min(k, E), E]) await same('topk', await m.gpu.topk(up(vals), kk), wasm.topk(vals, kk), `k=${kk}`);
        // route: every score function on the GPU but sqrtsoftplus (host path), groups, bias, mask
        if (E >= 1) {
          const logits = randomTokens(dtype, T, E, random);
          const bias = tensor(
            'float32',
            [E],
            Float32Array.from({ length: E }, () => (random() - 0.5) * 0.2),
          );
          const mask = tensor(
            'bool',
            [T],
            Uint8Array.from({ length: T }, () => (random() < 0.8 ? 1 : 0)),
          );
          const G = [4, 2].find((g) => E % g === 0 && E / g >= 2);
          const groups = G ? { numGroups: G, topkGroups: Math.min(G, Math.ceil(k / (E / G)) + 1) } : {};
          const routes = [
            ['softmax', { topk: k }],
            // every expert picked: the shader keeps up to 16 picks in the thread's own arrays, more in the buffers
            ['softmax, every expert', { topk: E }],
            ['softmax before topk, normalised', { topk: k, softmaxBeforeTopk: true, normTopkProb: true }],
            ['sigmoid, normalised, scaled', { topk: k, scoreFunction: 'sigmoid', normTopkProb: true, routeScale: 2.5 }],
            ['sigmoid groups', { topk: k, scoreFunction: 'sigmoid', ...groups }],
            ['sigmoid_with_bias groups', { topk: k, scoreFunction: 'sigmoid_with_bias', expertBias: bias, ...groups, normTopkProb: true }],
            ['softmax_with_bias groups, mask', { topk: k, scoreFunction: 'softmax_with_bias', expertBias: bias, ...groups, tokenMask: mask }],
            ['sqrtsoftplus', { topk: k, scoreFunction: 'sqrtsoftplus', tokenMask: mask }],
            ['sqrtsoftplus with bias, normalised', { topk: k, scoreFunction: 'sqrtsoftplus', expertBias: bias, normTopkProb: true }],
          ];
          for (const [what, o] of routes) {
            const dev = Object.fromEntries(Object.entries(o).map(([key, v]) => [key, v && typeof v === 'object' ? up(v) : v]));
            await same('route', await m.gpu.route(up(logits), dev), wasm.route(logits, o), what);
          }
          // the aux losses (float32 logits / probs), with and without a mask, coeff, numTokens
          const l32 = randomTokens('float32', T, E, random);
          const rr = wasm.route(l32, { topk: k });
          for (const lo of [{ topk: k }, { topk: k, coeff: 0.01, tokenMask: mask }, { topk: k, numTokens: T + 3, coeff: 0.5 }]) {
            const lod = { ...lo, ...('tokenMask' in lo ? { tokenMask: up(lo.tokenMask) } : {}) };
            await same(
              'switchLoadBalancingLoss',
              await m.gpu.switchLoadBalancingLoss(up(rr.scores), up(rr.tokensPerExpert), lod),
              wasm.switchLoadBalancingLoss(rr.scores, rr.tokensPerExpert, lo),
              JSON.stringify(Object.keys(lo)),
            );
            await same(
              'switchLoadBalancingLossFromLogits',
              await m.gpu.switchLoadBalancingLossFromLogits(up(l32), rr.tokensPerExpert, lod),
              wasm.switchLoadBalancingLossFromLogits(l32, rr.tokensPerExpert, lo),
              JSON.stringify(Object.keys(lo)),
            );
          }
          for (const zo of [{}, { coeff: 0.001, tokenMask: mask }]) {
            const zod = 'tokenMask' in zo ? { ...zo, tokenMask: up(zo.tokenMask) } : zo;
            await same('zLoss', await m.gpu.zLoss(up(l32), zod), wasm.zLoss(l32, zo), JSON.stringify(Object.keys(zo)));
          }
        }
        // activations, forward and backward, every kind, with and without probs
        for (const [kind, extra] of ACTIVATION_KINDS) {
          const I = Math.max(1, H);
          const xw = kind === 'relu2' ? I : 2 * I;
          const xa = randomTokens(dtype, T, xw, random);
          const ga = randomTokens(dtype, T, I, random);
          const rp = tensor(
            'float32',
            pi % 3 === 0 ? [T, 1] : [T],
            Float32Array.from({ length: T }, () => random()),
          );
          for (const o of [
            { kind, ...extra },
            { kind, ...extra, probs: rp },
          ]) {
            const od = 'probs' in o ? { ...o, probs: up(o.probs) } : o;
            await same('activation', await m.gpu.activation(up(xa), od), wasm.activation(xa, o), kind);
            await same('activationBackward', await m.gpu.activationBackward(up(ga), up(xa), od), wasm.activationBackward(ga, xa, o), kind);
          }
        }
        await same('sortChunksByIndexBackward', await m.gpu.sortChunksByIndexBackward(up(gradOut), split, up(idxs), rowProbs), wasm.sortChunksByIndexBackward(gradOut, split, idxs, rowProbs), '');
      });
    }
  }

  add(
    "software float64 (route's arithmetic on the GPU) equals JavaScript's numbers bit for bit: add, sub, mul, div, floor, float32 conversions, sums of float32 products, the core's exp",
    async () => {
      const { Gpu, F64_CHECK, F64_DOT_CHECK, F64_SUM_CHECK } = await ctx.f64();
      const gpu = new Gpu(await (await globalThis.navigator.gpu.requestAdapter()).requestDevice(), 'test');
      const random = rng(5);
      const n = 8192;
      const a = new Float64Array(n);
      const b = new Float64Array(n);
      const bits = new Uint32Array(2);
      const asF64 = new Float64Array(bits.buffer);
      const draw = () => {
        const kind = Math.floor(random() * 8);
        if (kind === 0) {
          bits[0] = Math.floor(random() * 2 ** 32);
          bits[1] = Math.floor(random() * 2 ** 32);
          return asF64[0];
        }
        if (kind === 1) {
          bits[0] = Math.floor(random() * 2 ** 32);
          bits[1] = Math.floor(random() * 2 ** 20) | (random() < 0.5 ? 0x80000000 : 0);
          return asF64[0]; // subnormal
        }
        if (kind === 2) return [0, -0, Infinity, -Infinity, 1, -1, 0.5, 2 ** -1022, 2 ** 1023, Number.MAX_VALUE, 5e-324][Math.floor(random() * 11)];
        if (kind === 3) return (random() - 0.5) * 2 ** Math.floor(random() * 80 - 40);
        if (kind === 4) return Math.floor(random() * 200 - 100) + (random() < 0.5 ? 0 : 0.5);
        if (kind === 5) return Math.fround((random() - 0.5) * 2 ** Math.floor(random() * 300 - 150));
        return (random() * 2 - 1) * 2 ** Math.floor(random() * 2100 - 1075);
      };
      for (let i = 0; i < n; i++) {
        a[i] = draw();
        b[i] = random() < 0.3 ? a[i] * (1 + (random() - 0.5) * 2 ** -40) : draw();
        if (random() < 0.1) {
          // (1 + x 2^-52) (1 + y 2^-52) with x y near 2^51: products that tie, or tie but for bits
          // far below (the sticky bit), at exponents up to the subnormal range
          const p = 1 + Math.floor(random() * 50);
          const x = 2 ** p + Math.floor(random() * 3);
          const y = 2 ** (51 - p) + Math.floor(random() * 3);
          a[i] = (1 + x * 2 ** -52) * 2 ** Math.floor(random() * 200 - 100);
          b[i] = (random() < 0.5 ? -1 : 1) * (1 + y * 2 ** -52) * 2 ** (random() < 0.2 ? -1000 - Math.floor(random() * 60) : Math.floor(random() * 200 - 100));
        }
      }
      const f32 = new Float32Array(1);
      const f32u = new Uint32Array(f32.buffer);
      const refs = [
        ['add', (x, y) => x + y],
        ['sub', (x, y) => x - y],
        ['mul', (x, y) => x * y],
        ['div', (x, y) => x / y],
        ['floor', (x) => Math.floor(x)],
        [
          'to f32',
          (x) => {
            f32[0] = x;
            return f32u[0];
          },
        ],
        [
          'from f32',
          (x) => {
            bits[0] = new Uint32Array(new Float64Array([x]).buffer)[0];
            f32u[0] = bits[0];
            return f32[0];
          },
        ],
      ];
      refs[8] = ['sqrt', (x) => Math.sqrt(x)];
      refs[7] = ['exp (below, on its own inputs)', () => NaN];
      const aBuf = gpu.upload('test', new Uint8Array(a.buffer), 'a');
      const bBuf = gpu.upload('test', new Uint8Array(b.buffer), 'b');
      for (const [op, [name, ref]] of refs.entries()) {
        if (op === 7) continue;
        const out = gpu.buffer('test', n * 8, 'out');
        gpu.dispatch('test', 'f64check', F64_CHECK, [n, op], [aBuf, bBuf, out], n);
        const got = new Uint32Array((await gpu.read('test', out, n * 8)).buffer);
        const bad = [];
        for (let i = 0; i < n && bad.length < 5; i++) {
          const want = ref(a[i], b[i]);
          if (name === 'to f32') {
            const ok = Number.isNaN(f32[0]) ? (got[2 * i] & 0x7fffffff) > 0x7f800000 : got[2 * i] === want;
            if (!ok) bad.push(`${name}(${a[i]}): got 0x${got[2 * i].toString(16)}, want 0x${want.toString(16)}`);
            continue;
          }
          bits[0] = got[2 * i];
          bits[1] = got[2 * i + 1];
          const g = asF64[0];
          const ok = Number.isNaN(want) ? Number.isNaN(g) : Object.is(g, want);
          if (!ok) bad.push(`${name}(${a[i]}, ${b[i]}): got ${g}, want ${want}`);
        }
        check.deepEqual(bad, [], name);
        compared[`float64 ${name}`] = n;
      }
      // the core's exp (detmath.rs) in JavaScript's float64, operation for operation, on arguments
      // across its range, near 0 (the Horner steps' fast path needs |r| >= 2^-900), near the
      // multiples of ln 2 / 2 where k changes, at the overflow and underflow bounds
      {
        const xs = new Float64Array(n);
        for (let i = 0; i < n; i++) {
          const kind = i % 6;
          if (kind === 0) xs[i] = random() * 1460 - 748;
          else if (kind === 1) xs[i] = (random() - 0.5) * 2 ** -Math.floor(random() * 1080);
          else if (kind === 2) xs[i] = (Math.floor(random() * 2000 - 1000) + 0.5) * Math.LN2 + (random() - 0.5) * 2 ** -Math.floor(random() * 50);
          else if (kind === 3)
            xs[i] = [0, -0, 709.782712893384, 709.7827128933841, -745.2, -745.1999999999999, 1, -1, 0.5, Infinity, -Infinity, Number.NaN, 5e-324, -5e-324][Math.floor(random() * 14)];
          else if (kind === 4) xs[i] = Math.fround(random() * 40 - 20) - Math.fround(random() * 20);
          else xs[i] = (random() - 0.5) * 2 ** Math.floor(random() * 12 - 4);
        }
        const xBuf = gpu.upload('test', new Uint8Array(xs.buffer), 'x');
        const out = gpu.buffer('test', n * 8, 'out');
        gpu.dispatch('test', 'f64check', F64_CHECK, [n, 7], [xBuf, xBuf, out], n);
        const got = new Float64Array((await gpu.read('test', out, n * 8)).buffer);
        const bad = [];
        for (let i = 0; i < n && bad.length < 5; i++) {
          const want = coreExpOf(xs[i]);
          if (!(Number.isNaN(want) ? Number.isNaN(got[i]) : Object.is(got[i], want))) bad.push(`exp(${xs[i]}): got ${got[i]}, want ${want}`);
        }
        check.deepEqual(bad, [], 'exp');
        compared['float64 exp'] = n;
      }
      // unpermuteBackward's dot (F64_DOT: exact float32 products added to an unpacked float64
      // sum) against JavaScript's sum of the same products, float64 bits, on rows made to round
      // often, to tie, and to tie but for bits below the guard bits (the sticky bit): small
      // integers at scattered exponents, half an ulp of the sum so far (with or without a far
      // lower bit), exact cancellations, all-zero rows of either sign, subnormals (rows of them),
      // random bits, and now and then an infinity or a NaN (the general path)
      const rows = 2048;
      const h = 24;
      const fa = new Float32Array(rows * h);
      const fb = new Float32Array(rows * h);
      const f32bits = new Float32Array(bits.buffer, 0, 1);
      const sign = () => (random() < 0.5 ? -1 : 1);
      const subnormal = () => sign() * Math.floor(random() * 2 ** 23) * 2 ** -149;
      const scattered = (span) => sign() * (1 + Math.floor(random() * 16)) * 2 ** Math.floor(random() * span - span / 2);
      const want = new Float64Array(rows);
      for (let r = 0; r < rows; r++) {
        const shape = r % 8;
        let sum = -0;
        for (let c = 0; c < h; c++) {
          let a;
          let b = 1;
          const kind = Math.floor(random() * 12);
          if (shape === 0 && kind < 6) {
            // half an ulp of the sum, alone (a tie) or with a bit 1..23 places lower (sticky), or
            // 2^20 ulps + half an ulp + a bit 11..21 places lower ((2^k + 1) (2^21 + 1) 2^-(k+1) ulps)
            const u = sum === 0 ? -60 : Math.floor(Math.log2(Math.abs(sum))) - 52;
            const j = 1 + Math.floor(random() * 23);
            const k = 10 + Math.floor(random() * 11);
            a = sign() * (kind < 2 ? 1 : kind < 4 ? 1 + 2 ** -j : 2 ** k + 1);
            b = kind < 4 ? 2 ** Math.max(-126, Math.min(127, u - 1)) : (2 ** 21 + 1) * 2 ** Math.max(-140, Math.min(100, u - k - 1));
          } else if (shape === 1 && c % 2 === 1) {
            // cancels the term before it exactly: the sum returns to what it was, or to +0
            a = -fa[r * h + c - 1];
            b = fb[r * h + c - 1];
          } else if (shape === 2) a = kind < 6 ? 0 : -0;
          else if (shape === 4 || shape === 5) a = subnormal();
          else if (kind === 0) a = [0, -0, 1, -1, 2 ** -149, -(2 ** -149), 2 ** -126, 3.4e38, -3.4e38][Math.floor(random() * 9)];
          else if (kind === 1) {
            bits[0] = Math.floor(random() * 2 ** 32);
            if ((bits[0] & 0x7f800000) === 0x7f800000) bits[0] ^= 0x40000000;
            a = f32bits[0];
          } else if (kind === 2) a = subnormal();
          else if (kind === 3 && r % 61 === 7) a = [Infinity, -Infinity, NaN][Math.floor(random() * 3)];
          else a = scattered(shape === 3 ? 120 : 64);
          // rows of shape 4: subnormal times subnormal; 5: subnormal times normal
          if (b === 1 && shape !== 1 && shape !== 2) b = shape === 4 || kind === 4 ? subnormal() : kind % 3 === 0 ? -1 : scattered(40);
          fa[r * h + c] = a;
          fb[r * h + c] = b;
          sum += fa[r * h + c] * fb[r * h + c];
        }
        want[r] = sum;
      }
      const dot = gpu.buffer('test', rows * 8, 'out');
      gpu.dispatch('test', 'f64dot', F64_DOT_CHECK, [rows, h], [gpu.upload('test', new Uint8Array(fa.buffer), 'a'), gpu.upload('test', new Uint8Array(fb.buffer), 'b'), dot], rows);
      const got = new Float64Array((await gpu.read('test', dot, rows * 8)).buffer);
      const badDots = [];
      for (let r = 0; r < rows && badDots.length < 5; r++) if (!(Number.isNaN(want[r]) ? Number.isNaN(got[r]) : Object.is(got[r], want[r]))) badDots.push(`row ${r}: got ${got[r]}, want ${want[r]}`);
      check.deepEqual(badDots, [], 'dot');
      compared['float64 dot'] = rows;
      // sums of float64s (normal, or zeros of either sign) from +0, as route's softmax sums its
      // exps: exps-like values, mixed signs and magnitudes, exact cancellations, sums that tie
      const sumRows = 512;
      const sh = 64;
      const terms = new Float64Array(sumRows * sh);
      const wantSum = new Float64Array(sumRows);
      for (let r = 0; r < sumRows; r++) {
        const kind = r % 4;
        for (let c = 0; c < sh; c++) {
          let v;
          if (kind === 0) v = Math.exp(-random() * 40);
          else if (kind === 1) v = (random() < 0.5 ? -1 : 1) * (1 + random()) * 2 ** Math.floor(random() * 600 - 300);
          else if (kind === 2) v = c % 2 === 1 ? -terms[r * sh + c - 1] : (random() - 0.5) * 2 ** Math.floor(random() * 40);
          else v = c === 0 ? 1 : (1 + Math.floor(random() * 4)) * 2 ** (-53 - Math.floor(random() * 3)); // each half an ulp of 1 or near it
          if (random() < 0.05) v = random() < 0.5 ? 0 : -0;
          terms[r * sh + c] = v;
        }
        let sum = 0;
        for (let c = 0; c < sh; c++) sum += terms[r * sh + c];
        wantSum[r] = sum;
      }
      const sums = gpu.buffer('test', sumRows * 8, 'out');
      gpu.dispatch('test', 'f64sum', F64_SUM_CHECK, [sumRows, sh], [gpu.upload('test', new Uint8Array(terms.buffer), 'a'), sums], sumRows);
      const gotSum = new Float64Array((await gpu.read('test', sums, sumRows * 8)).buffer);
      const badSums = [];
      for (let r = 0; r < sumRows && badSums.length < 5; r++) if (!Object.is(gotSum[r], wantSum[r])) badSums.push(`row ${r}: got ${gotSum[r]}, want ${wantSum[r]}`);
      check.deepEqual(badSums, [], 'sum');
      compared['float64 sum'] = sumRows;
      gpu.device.destroy();
    },
  );

  add("unpermuteBackward's slot dots where an integer sum cannot decide the float32: midpoints, zeros of either sign, infinities, overflow, underflow, cancellation", async () => {
    const m = moe;
    const H = 70; // more columns than the fast pass's 64 threads
    // [column, value] of each slot's token row (its gradient row is all ones but where set below)
    const rows = [
      [
        [0, 1],
        [1, 2 ** -24],
      ], // 1 + 2^-24: a float32 midpoint (ties to even: 1)
      [
        [0, 1],
        [1, 2 ** -24],
        [2, 2 ** -60],
      ], // above the midpoint by less than the integer sum's unit (2^-54)
      [
        [0, 1],
        [1, 2 ** -24],
        [2, 2 ** -54],
      ], // above it by one unit: the float64 sum rounds back to it (1)
      [
        [0, 1],
        [1, 2 ** -24],
        [2, 2 ** -54],
        [3, 2 ** -54],
      ], // twice: each addition rounds back
      [
        [0, 1],
        [1, 3 * 2 ** -25],
      ], // 1 + 1.5 2^-24: rounds up, decided
      [], // every product -0 (the row is -0, set below): the sum from -0 stays -0
      [], // products +0: -0 + +0 = +0
      [
        [0, 1],
        [3, 5],
      ], // an infinity in the gradient's row (set below)
      [[0, 2 ** 100]], // times 2^30: over float32's range
      [[0, 2 ** -100]], // times 2^-40: a float32 subnormal
      [
        [0, 1],
        [1, -1],
        [2, 2 ** -30],
      ], // cancellation: 2^-30 left
      [
        [5, 1],
        [69, 2 ** -24],
      ], // the midpoint's half ulp in another thread's column
      // 32 ones, then 32's float32 midpoint, then three terms each under half a float64 ulp at 32
      // (each rounds away): the exact sum lies 180 units of 2^-54 above the midpoint, the core's
      // float64 sum on it (ties to even: 32); only the sequential rounding's bound keeps it undecided
      [...Array.from({ length: 32 }, (_, c) => [c, 1]), [32, 2 ** -19], [33, 15 * 2 ** -52], [34, 15 * 2 ** -52], [35, 15 * 2 ** -52]],
    ];
    const random = rng(17);
    const n = rows.length + 30;
    for (const dtype of ['float32', 'bfloat16']) {
      const x = new Float32Array(n * H);
      const g = new Float32Array(n * H);
      for (let i = 0; i < n; i++) {
        for (let c = 0; c < H; c++) g[i * H + c] = i < rows.length ? 1 : random() * 4 - 2;
        if (i >= rows.length) for (let c = 0; c < H; c++) x[i * H + c] = (random() - 0.5) * 2 ** Math.floor(random() * 20 - 10);
        else for (const [c, v] of rows[i]) x[i * H + c] = v;
      }
      x.fill(-0, 5 * H, 6 * H);
      g[7 * H + 3] = Number.POSITIVE_INFINITY;
      g[8 * H] = 2 ** 30;
      g[9 * H] = 2 ** -40;
      const t = (values, shape) => (dtype === 'float32' ? tensor('float32', shape, values) : tensor('bfloat16', shape, Uint16Array.from(values, toBFloat16Bits)));
      const gradOut = t(g, [n, H]);
      const permuted = t(x, [n, H]);
      const sorted = tensor(
        'int32',
        [n],
        Int32Array.from({ length: n }, (_, i) => i),
      );
      const probs = tensor(
        'float32',
        [n],
        Float32Array.from({ length: n }, () => 0.5),
      );
      await same(
        'unpermuteBackward',
        await m.gpu.unpermuteBackward(m.upload(gradOut), m.upload(permuted), sorted, { probs: m.upload(probs) }),
        wasm.unpermuteBackward(gradOut, permuted, sorted, { probs }),
        `slot dots ${dtype}`,
      );
    }
  });

  add('the exclusive scan (SCAN: one workgroup, rounds of 2048 values, runs of 8 a thread) at every length around its split points', async () => {
    const { Gpu, SCAN } = await ctx.f64();
    const gpu = new Gpu(await (await globalThis.navigator.gpu.requestAdapter()).requestDevice(), 'test');
    const random = rng(91);
    // lengths around a thread's run of 8 values, the 256 threads' round of 2048, two rounds, the plan's 16384 counts and past them; counts up to 2^20
    for (const m of [0, 1, 2, 7, 8, 9, 255, 256, 257, 2047, 2048, 2049, 4095, 4096, 4097, 16383, 16384, 16385, 70001]) {
      const a = Uint32Array.from({ length: m }, (_, i) => (i % 7 === 3 ? 0 : Math.floor(random() * 2 ** (i % 3 === 0 ? 20 : 4))));
      const want = new Uint32Array(m + 1);
      for (let i = 0; i < m; i++) want[i + 1] = want[i] + a[i];
      const aBuf = gpu.upload('test', new Uint8Array(a.buffer), 'a');
      const out = gpu.buffer('test', 4 * (m + 1), 'out');
      gpu.dispatch('test', 'scan', SCAN, [m], [aBuf, out], 256, 256);
      const got = new Uint32Array((await gpu.read('test', out, 4 * (m + 1))).buffer);
      const bad = got.findIndex((v, i) => v !== want[i]);
      check.equal(bad, -1, `scan of ${m}: first wrong prefix ${bad} (got ${got[bad]}, want ${want[bad]})`);
      compared.scan = (compared.scan ?? 0) + 1;
    }
    gpu.device.destroy();
  });

  add('WebGPU errors: an op that made something new rejects with its own; one that made nothing has no error scopes, and it or the next call reports them, naming the op', async () => {
    const { Gpu, SCAN } = await ctx.f64();
    const gpu = new Gpu(await (await globalThis.navigator.gpu.requestAdapter()).requestDevice(), 'test');
    const a = gpu.upload('test', new Uint8Array(new Uint32Array([1, 2, 3]).buffer), 'a');
    const scan = (op, out) => gpu.scoped(op, async () => gpu.dispatch(op, 'scan', SCAN, [3], [a, out], 256, 256));
    const outcome = (p) =>
      p.then(
        () => 'ok',
        (e) => `${e.name}: ${e.message}`,
      );
    const out = gpu.buffer('test', 16, 'out');
    check.equal(await outcome(scan('first', out)), 'ok', 'first: makes its pipeline and bind group');
    check.deepEqual([...new Uint32Array((await gpu.read('test', out, 16)).buffer)], [0, 1, 3, 6], 'first: the scan');
    out.destroy();
    // the same pipeline and bind group: nothing new, so no scopes; WebGPU rejects the submit (a
    // destroyed buffer) without a scope to catch it: reported by the op itself as it ends (Dawn in
    // Node raises it in the submit) or by the next call (Chromium raises it later), naming the op
    const rejected = (op) =>
      new RegExp(`^Error: ${op}: WebGPU rejected queued work \\([\\s\\S]*"second"[\\s\\S]*; the command buffer's label is the op that queued it\\); this is a bug in moe-dispatch$`);
    const second = await outcome(scan('second', out));
    await gpu.device.queue.onSubmittedWorkDone();
    await new Promise((resolve) => setTimeout(resolve, 100));
    const third = await outcome(scan('third', out));
    if (second === 'ok') check.match(third, rejected('third'), 'the next call reports it');
    else check.match(second, rejected('second'), 'the op reports it as it ends');
    // nothing left to report (where third ran, it reported its own); a new buffer (a new bind
    // group: scopes), destroyed before the op, rejects that op itself
    const out2 = gpu.buffer('test', 64, 'out2');
    out2.destroy();
    check.match(await outcome(scan('fourth', out2)), /^Error: fourth: WebGPU rejected the op's work \([\s\S]*\); this is a bug in moe-dispatch$/, 'an op with scopes rejects');
    gpu.device.destroy();
  });

  add("the activations' float32 exp and division (F32_FAST: integer arithmetic, software float64 where it cannot decide) equal the core's bits", async () => {
    const { Gpu, F32_FAST_CHECK, EXP_TABLE, EXP_LN2_64 } = await ctx.f64();
    // the constants, recomputed: ln 2 / 64 and 2^(j/64) rounded to 64 and 63 fraction bits
    let ln2 = 0n;
    for (let k = 1n; k < 260n; k++) ln2 += (1n << 220n) / (k << k); // ln 2 = sum 1 / (k 2^k), 200 bits + 20 guard
    ln2 >>= 20n;
    check.equal(EXP_LN2_64, (ln2 + (1n << 141n)) >> 142n, 'ln 2 / 64');
    for (let j = 0; j < 64; j++) {
      const target = 1n << BigInt(4032 + j); // (2^(63 + j/64))^64
      let lo = 1n << 63n;
      let hi = 1n << 64n;
      while (hi - lo > 1n) {
        const mid = (lo + hi) >> 1n;
        if (mid ** 64n <= target) lo = mid;
        else hi = mid;
      }
      const rounded = (2n * lo + 1n) ** 64n <= target << 64n ? lo + 1n : lo;
      if (EXP_TABLE[j] !== rounded) check.fail(`2^(${j}/64): table 0x${EXP_TABLE[j].toString(16)}, want 0x${rounded.toString(16)}`);
    }
    const gpu = new Gpu(await (await globalThis.navigator.gpu.requestAdapter()).requestDevice(), 'test');
    const random = rng(11);
    const n = 65536;
    const a = new Float32Array(n);
    const b = new Float32Array(n);
    const au = new Uint32Array(a.buffer);
    const bu = new Uint32Array(b.buffer);
    // arguments whose e^x (the core's) lies within 2^-21 ulp of a float32 rounding boundary (found
    // by a search over 15 million float32s): the fast path must hand most of them to f_exp
    const HARD = [
      -2.980235080940474e-8, 5.96046660916727e-8, 0.000001251696744475339, 0.000002443787479933235, -0.00004366135544842109, -0.00046773761278018355, 0.004290482960641384, 0.0060516102239489555,
      -0.08195258677005768, 0.1124272421002388, -0.1578662395477295, 0.18089528381824493, -7.130420684814453,
    ];
    const EDGES = [
      0,
      -0,
      1,
      -1,
      -87,
      88,
      -87.00001,
      88.00001,
      88.72283,
      88.7229,
      -103.97,
      -104,
      -150,
      2 ** -26,
      -(2 ** -26),
      2 ** -27,
      2 ** -25,
      -(2 ** -25),
      2 ** -149,
      Infinity,
      -Infinity,
      Number.NaN,
    ];
    for (let i = 0; i < n; i++) {
      const kind = i % 8;
      if (i < HARD.length) a[i] = HARD[i];
      else if (i < HARD.length + EDGES.length) a[i] = EDGES[i - HARD.length];
      else if (kind === 0) a[i] = random() * 180 - 90;
      else if (kind === 1) a[i] = (random() - 0.5) * 2 ** -Math.floor(random() * 32);
      else if (kind === 2)
        a[i] = (Math.floor(random() * 16000 - 8000) + 0.5) * (Math.LN2 / 64) * (1 + (random() - 0.5) * 2 ** -20); // k changes
      else if (kind === 3) au[i] = Math.floor(random() * 2 ** 32);
      else a[i] = (random() - 0.5) * 24;
      // divisions: normal pairs near 1, random bits, quotients near overflow and underflow, zeros, infinities
      const dk = i % 6;
      if (dk === 0) b[i] = 1 + random() * 3;
      else if (dk === 1) bu[i] = Math.floor(random() * 2 ** 32);
      else if (dk === 2) b[i] = (random() < 0.5 ? 1 : -1) * 2 ** Math.floor(random() * 250 - 125) * (1 + random());
      else if (dk === 3) b[i] = [0, -0, Infinity, -Infinity, Number.NaN, 2 ** -149, 2 ** -126, 3.4e38][Math.floor(random() * 8)];
      else b[i] = random() * 8 - 4;
    }
    const aBuf = gpu.upload('test', new Uint8Array(a.buffer), 'a');
    const bBuf = gpu.upload('test', new Uint8Array(b.buffer), 'b');
    const f32 = new Float32Array(1);
    const f32u = new Uint32Array(f32.buffer);
    const fbits = (v) => {
      f32[0] = v;
      return f32u[0];
    };
    const nanBits = (u) => (u & 0x7fffffff) > 0x7f800000;
    const inRange = (x) => x >= -87 && x <= 88;
    // fast: decided bits equal the core's, and nearly every argument in its range decided;
    // soft: every argument
    for (const [op, name, ref, decides] of [
      [0, 'expf_fast', (x) => fbits(coreExpOf(x)), (x) => inRange(x)],
      [1, 'fdiv_fast', (x, y) => fbits(x / y), (x, y) => [x, y, x / y].every((v) => Math.abs(v) >= 2 ** -126 && Math.abs(v) < 2 ** 128)],
      [2, 'expf_slow', (x) => fbits(coreExpOf(x))],
      [3, 'fdiv_slow', (x, y) => fbits(x / y)],
    ]) {
      const out = gpu.buffer('test', n * 8, 'out');
      gpu.dispatch('test', 'f32fast', F32_FAST_CHECK, [n, op], [aBuf, bBuf, out], n);
      const got = new Uint32Array((await gpu.read('test', out, n * 8)).buffer);
      const bad = [];
      let undecided = 0;
      let decidable = 0;
      for (let i = 0; i < n && bad.length < 5; i++) {
        const want = ref(a[i], b[i]);
        const [bits, slow] = [got[2 * i], got[2 * i + 1]];
        if (decides?.(a[i], b[i])) decidable++;
        if (slow === 1) {
          undecided++;
          continue;
        }
        if (!(nanBits(want) ? nanBits(bits) : bits === want)) bad.push(`${name}(${a[i]}${op % 2 ? `, ${b[i]}` : ''}): got 0x${bits.toString(16)}, want 0x${want.toString(16)}`);
      }
      check.deepEqual(bad, [], name);
      if (decides) check.ok(undecided - (n - decidable) < decidable / 1000, `${name}: ${undecided} of ${n} undecided, ${n - decidable} of them outside its range`);
      else check.equal(undecided, 0, `${name} decides every argument`);
      compared[`float32 ${name}`] = n - undecided;
    }
    gpu.device.destroy();
  });

  add("route's fast pass helpers: exp_diff within 2^-47 + 2^-48.4 of the core's exp (its margins' premise), recip64 exact", async () => {
    const { Gpu, FIXED_CHECK } = await ctx.f64();
    const gpu = new Gpu(await (await globalThis.navigator.gpu.requestAdapter()).requestDevice(), 'test');
    const random = rng(19);
    const n = 32768;
    const a = new Float32Array(n);
    const b = new Float32Array(n);
    // (x, max) with x - max in [-700, 0] and exact in float64 (route's softmax arguments: maxima
    // of every magnitude, differences from 0 to 700, ties, tiny logits, zeros), and (0, x) with x
    // in [-37, 104] (sigmoid's e^-x)
    const EDGES = [
      [0, 0],
      [3, 3],
      [-0, 0],
      [0, -0],
      [-700, 0],
      [0, 700],
      [1e-30, 0],
      [0, 1e-30],
      [2 ** -149, 0],
      [0, -37],
      [0, 104],
      [0, 2 ** -60],
    ];
    const exact = (x, m) => {
      const ex = Math.max((new Uint32Array(new Float32Array([x]).buffer)[0] >>> 23) & 0xff, 1);
      const em = Math.max((new Uint32Array(new Float32Array([m]).buffer)[0] >>> 23) & 0xff, 1);
      return x === 0 || m === 0 || Math.abs(ex - em) <= 28;
    };
    for (let i = 0; i < n; i++) {
      if (i < EDGES.length) [a[i], b[i]] = EDGES[i];
      else if (i % 4 === 3) {
        a[i] = 0;
        b[i] = random() * 141 - 104;
      } else {
        const mx = (random() < 0.5 ? -1 : 1) * random() * 2 ** Math.floor(random() * 60 - 30);
        const d = i % 4 === 0 ? random() * 700 : i % 4 === 1 ? random() * 20 : random() * 2 ** -Math.floor(random() * 40);
        a[i] = mx - d;
        b[i] = mx;
        if (!(a[i] - b[i] >= -700 && a[i] - b[i] <= 0) || !exact(a[i], b[i])) [a[i], b[i]] = [0, 0];
      }
    }
    const out = gpu.buffer('test', 8 * n, 'out');
    gpu.dispatch('test', 'fixed', FIXED_CHECK, [n, 0], [gpu.upload('test', new Uint8Array(a.buffer), 'a'), gpu.upload('test', new Uint8Array(b.buffer), 'b'), out], n);
    const got = new Float64Array((await gpu.read('test', out, 8 * n)).buffer);
    let worst = 0;
    const bad = [];
    for (let i = 0; i < n; i++) {
      const want = coreExpOf(a[i] - b[i]);
      const err = Math.abs(got[i] - want) / want;
      worst = Math.max(worst, err);
      if (!(err <= 2 ** -47 + 2 ** -48.4) && bad.length < 5) bad.push(`e^(${a[i]} - ${b[i]}): ${got[i]}, the core's ${want}`);
      if (a[i] === b[i] && got[i] !== 1) bad.push(`e^(${a[i]} - ${b[i]}): ${got[i]}, not 1`);
    }
    check.deepEqual(bad, [], `exp_diff (largest relative difference 2^${Math.log2(worst).toFixed(2)})`);
    // recip64: floor((2^127 - 1) / s) for s in [2^63, 2^64)
    const S = [1n << 63n, (1n << 64n) - 1n, (1n << 63n) + 1n, 0xc000000000000000n];
    const words = new Uint32Array(2 * 4096);
    for (let i = 0; i < 4096; i++) {
      const s = i < S.length ? S[i] : (1n << 63n) | (BigInt(Math.floor(random() * 2 ** 31)) << 32n) | BigInt(Math.floor(random() * 2 ** 32));
      words[2 * i] = Number(s & 0xffffffffn);
      words[2 * i + 1] = Number(s >> 32n);
    }
    const rout = gpu.buffer('test', 8 * 4096, 'rout');
    gpu.dispatch('test', 'fixed', FIXED_CHECK, [4096, 1], [gpu.upload('test', new Uint8Array(words.buffer), 'a'), gpu.buffer('test', 4, 'b'), rout], 4096);
    const r = new Uint32Array((await gpu.read('test', rout, 8 * 4096)).buffer);
    for (let i = 0; i < 4096; i++) {
      const s = (BigInt(words[2 * i + 1]) << 32n) | BigInt(words[2 * i]);
      const q = (BigInt(r[2 * i + 1]) << 32n) | BigInt(r[2 * i]);
      if (q !== ((1n << 127n) - 1n) / s) check.fail(`recip64(0x${s.toString(16)}): 0x${q.toString(16)}`);
    }
    compared['route exp_diff'] = n;
    gpu.device.destroy();
  });

  add(
    "route's fast pass leaves what it cannot decide to the exact pass: values at float32 rounding boundaries, arguments the core rounds, tiny, subnormal and vanishing scores; every score function, against wasm",
    async () => {
      const m = moe;
      const E = 8;
      // logits d of softmax rows [0, d] (and sigmoid logits -d, x) whose scores lie 2^-46 to 2^-49
      // (relative) from a float32 rounding boundary (a search over 120 million float32s): the fast
      // pass must list their rows, and the exact pass redo them
      const SOFTMAX_HARD = [-14.30414867401123, -1.694751501083374, -3.8027923107147217, -3.0136024951934814, -1.4276520013809204, -11.226107597351074, -7.006398677825928, -2.1995151042938232];
      const SIGMOID_HARD = [
        12.93422794342041, 6.5670552253723145, -3.9563188552856445, 11.295580863952637, 9.432418823242188, -2.4310600757598877, -13.429439544677734, 11.57609748840332, -6.262207508087158,
        -10.262598037719727, 2.735440731048584, -3.5932509899139404, 9.702535629272461, -21.050569534301758,
      ];
      // the other exps of these rows are 0 or below 2^-1000 (no change to any sum): a score and a weight of each row are hard
      const rows = SOFTMAX_HARD.map((d) => [0, d, -1000, -720, -760, -2000, -900, -3000]);
      for (const x of [...SIGMOID_HARD, ...SOFTMAX_HARD.map((d) => -d)]) rows.push([x, 0, 1, -1, 2.5, -2.5, 4, -4]);
      rows.push(
        // arguments x - max that the core rounds (exponents more than 28 apart, neither zero)
        [2.5, 1e-12, -1e-15, 0, -0, 3e-9, -2.5, 1],
        [0, 1e-30, -1e-30, 2 ** -149, -(2 ** -140), 0, -0, 1e-38],
        // softmax scores below float32's normal range (logits 87 to 104 below the max), around 2^-150, vanishing
        [0, -88, -95, -103.5, -103.9, -104.1, -110, -150],
        [0, -699, -700.5, -701, -708, -709, -745, -746],
        // sigmoid's ends: 1 above 37, subnormal scores below -87, +0 below -104
        [36.9, 37, 37.1, 40, -87.5, -95, -104.5, -200],
      );
      const random = rng(23);
      while (rows.length < 64) rows.push(Array.from({ length: E }, () => (random() * 2 - 1) * 2 ** Math.floor(random() * 8)));
      const logits = tensor('float32', [rows.length, E], Float32Array.from(rows.flat()));
      const expertBias = tensor(
        'float32',
        [E],
        Float32Array.from({ length: E }, () => random() - 0.5),
      );
      const options = [
        { topk: 2 },
        { topk: 2, softmaxBeforeTopk: true },
        { topk: 3, normTopkProb: true, routeScale: 2.5 },
        { topk: 2, scoreFunction: 'sigmoid' },
        { topk: 3, scoreFunction: 'sigmoid', normTopkProb: true },
        { topk: 2, scoreFunction: 'softmax_with_bias', expertBias },
        { topk: 2, scoreFunction: 'sigmoid_with_bias', expertBias, numGroups: 4, topkGroups: 2, normTopkProb: true, routeScale: 2.5 },
        // routeScale's sign, zero, a subnormal (the exact pass alone) and one that overflows float32
        { topk: 3, scoreFunction: 'sigmoid', normTopkProb: true, routeScale: -2.5 },
        { topk: 2, routeScale: 0 },
        { topk: 2, normTopkProb: true, routeScale: 1e-310 },
        { topk: 2, routeScale: 1e300 },
      ];
      for (const o of options) await same('route', await m.gpu.route(m.upload(logits), o), wasm.route(logits, o), `${o.scoreFunction ?? 'softmax'} ${Object.keys(o).join(',')}`);
      // a wide row's margins (E = 300: its sum's rounding bound), logits of either scale
      const wide = tensor(
        'float32',
        [24, 300],
        Float32Array.from({ length: 7200 }, (_, i) => (random() * 2 - 1) * (i % 3 === 0 ? 40 : 4)),
      );
      for (const sf of ['softmax', 'sigmoid'])
        await same('route', await m.gpu.route(m.upload(wide), { topk: 6, scoreFunction: sf }), wasm.route(wide, { topk: 6, scoreFunction: sf }), `E = 300 ${sf}`);
    },
  );

  add("the list passes (software float64 where the fast pass cannot decide) dispatched directly and indirectly: the same bits, lists longer than the direct dispatch's 256 workgroups", async () => {
    const m = moe;
    const { passes, LIST_GROUPS } = await ctx.f64();
    const before = passes.lists;
    // 20,000 slots whose dot product 1 + 2^-24 is a float32 midpoint, 20,000 swiglu items whose
    // gate's exp is out of the fast pass's range, 4,096 x 8 route cells on rows at float32 rounding
    // boundaries: every one listed, more than 256 workgroups of 64 threads (the direct dispatch
    // strides over them); each one's value is the second pass's alone
    const n = 20000;
    const H = 4;
    // (longer than a direct list pass's threads, or the striding is not exercised)
    check.ok(n > LIST_GROUPS * 64, `${n} items over ${LIST_GROUPS} workgroups of 64`);
    const midpoints = tensor(
      'float32',
      [n, H],
      Float32Array.from({ length: n * H }, (_, i) => (i % H === 0 ? 1 : i % H === 1 ? 2 ** -24 : 0)),
    );
    const ones = tensor('float32', [n, H], new Float32Array(n * H).fill(1));
    const sorted = tensor(
      'int32',
      [n],
      Int32Array.from({ length: n }, (_, i) => i),
    );
    const probs = tensor('float32', [n], new Float32Array(n).fill(0.5));
    const gates = tensor(
      'float32',
      [n, 2],
      Float32Array.from({ length: 2 * n }, (_, i) => (i % 2 === 0 ? -100 - (i % 7) : 1 + (i % 5))),
    );
    const HARD = [-14.30414867401123, -1.694751501083374, -3.8027923107147217, -3.0136024951934814];
    const logits = tensor(
      'float32',
      [4096, 8],
      Float32Array.from({ length: 4096 * 8 }, (_, i) => (i % 8 === 0 ? 0 : i % 8 === 1 ? HARD[(i >> 3) % 4] : -1000 - (i % 8))),
    );
    try {
      for (const lists of ['direct', 'indirect']) {
        passes.lists = lists;
        await same(
          'unpermuteBackward',
          await m.gpu.unpermuteBackward(m.upload(ones), m.upload(midpoints), sorted, { probs: m.upload(probs) }),
          wasm.unpermuteBackward(ones, midpoints, sorted, { probs }),
          `${lists}: slot dots at a midpoint`,
        );
        await same('activation', await m.gpu.activation(m.upload(gates), { kind: 'swiglu' }), wasm.activation(gates, { kind: 'swiglu' }), `${lists}: swiglu out of the fast range`);
        await same('route', await m.gpu.route(m.upload(logits), { topk: 2 }), wasm.route(logits, { topk: 2 }), `${lists}: rows at rounding boundaries`);
      }
    } finally {
      passes.lists = before;
    }
  });

  add('ops without a shader run on wasm inside (dropTokens) with webgpu tensors; route and losses on wide logits', async () => {
    const m = moe;
    const random = rng(77);
    const logits = tensor(
      'float32',
      [40, 16],
      Float32Array.from({ length: 640 }, () => random() * 6 - 3),
    );
    const o = {
      topk: 4,
      scoreFunction: 'sigmoid',
      numGroups: 4,
      topkGroups: 2,
      expertBias: tensor(
        'float32',
        [16],
        Float32Array.from({ length: 16 }, () => random() - 0.5),
      ),
    };
    await same('route', await m.gpu.route(m.upload(logits), o), wasm.route(logits, o), '');
    await same('zLoss', await m.gpu.zLoss(m.upload(logits), { coeff: 0.01 }), wasm.zLoss(logits, { coeff: 0.01 }), '');
    // logits over [-60, 60]: sqrtsoftplus's x > 20 branch, exps far from 1
    const wide = tensor(
      'float32',
      [40, 16],
      Float32Array.from({ length: 640 }, () => random() * 120 - 60),
    );
    for (const sf of ['sqrtsoftplus', 'sigmoid', 'softmax'])
      await same('route', await m.gpu.route(m.upload(wide), { topk: 3, scoreFunction: sf }), wasm.route(wide, { topk: 3, scoreFunction: sf }), `wide ${sf}`);
    // logits over [-800, 800]: softmax's exps of zero (below ~-745), subnormal (rows with a logit
    // ~708-745 below the row's maximum: the sum of the exps' other path) and normal
    const wider = tensor(
      'float32',
      [40, 16],
      Float32Array.from({ length: 640 }, () => random() * 1600 - 800),
    );
    // every third row: its maximum 0, one logit at -720 ... -738 (a subnormal exp), the rest in [-30, 0]
    for (let t = 0; t < 40; t += 3) for (let e = 0; e < 16; e++) wider.data[t * 16 + e] = e === 0 ? 0 : e === 5 ? -720 - (t % 7) * 3 : -30 * random();
    for (const sf of ['softmax', 'softmax_with_bias'])
      await same('route', await m.gpu.route(m.upload(wider), { topk: 3, scoreFunction: sf, normTopkProb: true }), wasm.route(wider, { topk: 3, scoreFunction: sf, normTopkProb: true }), `wider ${sf}`);
    await same('zLoss', await m.gpu.zLoss(m.upload(wide)), wasm.zLoss(wide), 'wide');
    const r = wasm.route(logits, o);
    await same(
      'switchLoadBalancingLoss',
      await m.gpu.switchLoadBalancingLoss(m.upload(r.scores), m.upload(r.tokensPerExpert), { topk: 4 }),
      wasm.switchLoadBalancingLoss(r.scores, r.tokensPerExpert, { topk: 4 }),
      '',
    );
    const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, 16);
    const d = { topk: 4, capacityFactor: 1 };
    await same('dropTokens', await m.gpu.dropTokens(m.upload(probs), m.upload(routingMap), d), wasm.dropTokens(probs, routingMap, d), '');
  });

  // The GEMM ops: shapes that cross the core's 256-wide k-blocks (a k of 300), more than one
  // 64 x 64 tile each way, experts without tokens and one holding nearly all, transposes, mixed
  // dtypes (float32 weights with 16-bit tokens), probs as [N] and [N, 1], biases.
  add('matmul and the grouped experts, forward and backward, every activation kind, against wasm', async () => {
    const m = moe;
    const random = rng(2112);
    const up = (x) => (x && x.dtype !== undefined && x.dtype !== 'int64' ? m.upload(x) : x);
    for (const dtype of DTYPES) {
      for (const [M, K, N, transA, transB] of [
        [5, 7, 3, false, false],
        [70, 300, 65, false, false],
        [33, 260, 9, true, false],
        [9, 17, 130, false, true],
        [65, 2, 66, true, true],
        [4, 0, 3, false, false],
      ]) {
        const a = randomTokens(dtype, transA ? K : M, transA ? M : K, random);
        const b = randomTokens(M % 2 ? 'float32' : dtype, transB ? N : K, transB ? K : N, random);
        const o = { transA, transB };
        const what = `${dtype} [${M}, ${K}] x [${K}, ${N}] ${JSON.stringify(o)}`;
        const before = m.transfers().toHostBytes;
        const got = await m.gpu.matmul(up(a), M % 3 ? up(b) : b, o);
        check.equal(m.transfers().toHostBytes - before, 0, `matmul ${what}: bytes read back (the shader path reads none)`);
        await same('matmul', got, wasm.matmul(a, b, o), what);
      }
      const problems = [
        // [counts, dim, inter, weights' dtype]
        [[3, 0, 70, 1], 20, 9, dtype],
        [[2, 0, 5, 1], 300, 4, 'float32'],
        [[300, 0, 3], 6, 5, dtype],
        [[0, 40, 0], 8, 66, dtype],
        [[0, 0], 4, 3, dtype],
      ];
      for (const [pi, [counts, dim, inter, wdtype]] of problems.entries()) {
        const n = counts.reduce((x, y) => x + y, 0);
        const e = counts.length;
        for (const [kind, extra] of ACTIVATION_KINDS) {
          if (pi > 0 && kind !== 'swiglu' && kind !== 'relu2' && kind !== ['quick_geglu', 'swiglu_oai', 'swiglu_clamped'][pi % 3]) continue;
          const width = kind === 'relu2' ? inter : 2 * inter;
          // weights scaled by 1/sqrt of the sum's length, so that no intermediate is a float32
          // subnormal (a GPU may flush those to zero: SwiftShader does; docs/semantics.md)
          const x = randomTokens(dtype, n, dim, random);
          const W1 = randomScaled(wdtype, [e, dim, width], 0.5 / Math.sqrt(Math.max(1, dim)), random);
          const W2 = randomScaled(wdtype, [e, inter, dim], 0.5 / Math.sqrt(inter), random);
          const weights = kind === 'relu2' ? { upProjs: W1, downProjs: W2 } : { gateAndUpProjs: W1, downProjs: W2 };
          const weightsDev = kind === 'relu2' ? { upProjs: up(W1), downProjs: up(W2) } : { gateAndUpProjs: up(W1), downProjs: W2 };
          const b1 = randomTokens(dtype, e, width, random);
          const b2 = randomTokens(wdtype, e, dim, random);
          const probs = tensor(
            'float32',
            pi % 2 ? [n, 1] : [n],
            Float32Array.from({ length: n }, () => random()),
          );
          const tpe = pi === 2 ? tensor('int64', [e], BigInt64Array.from(counts, BigInt)) : tensor('int32', [e], Int32Array.from(counts));
          const g = randomTokens(dtype, n, dim, random);
          for (const o of [
            { activation: kind, ...extra },
            { activation: kind, ...extra, permutedProbs: probs },
            { activation: kind, ...extra, biases: { downProjBias: b2 } },
            { activation: kind, ...extra, permutedProbs: probs, biases: { gateUpProjBias: b1, downProjBias: b2 } },
          ]) {
            const od = { ...o };
            if (o.permutedProbs) od.permutedProbs = up(o.permutedProbs);
            if (o.biases) od.biases = { ...o.biases, downProjBias: up(o.biases.downProjBias) };
            const what = `${dtype} counts ${counts} dim ${dim} inter ${inter} ${wdtype} ${kind} ${Object.keys(o).join(',')}`;
            // the shader path reads back the counts alone (a device int32 tpe), nothing with a host one
            const counted = tpe.dtype === 'int32' ? 4 * e : 0;
            let before = m.transfers().toHostBytes;
            const y = await m.gpu.expertsForward(up(x), up(tpe), weightsDev, od);
            check.equal(m.transfers().toHostBytes - before, counted, `expertsForward ${what}: bytes read back`);
            await same('expertsForward', y, wasm.expertsForward(x, tpe, weights, o), what);
            before = m.transfers().toHostBytes;
            const grads = await m.gpu.expertsBackward(up(g), x, up(tpe), weightsDev, od);
            check.equal(m.transfers().toHostBytes - before, counted, `expertsBackward ${what}: bytes read back`);
            await same('expertsBackward', grads, wasm.expertsBackward(g, x, tpe, weights, o), what);
          }
        }
      }
    }
  });

  /** A routed swiglu experts problem on the host (wasm's routing and permute) and its weights, also uploaded. */
  function routedExperts(dtype, [T, E, k, dim, inter], random) {
    const r = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: dim, dtype }, random);
    const { routingMap, probs } = wasm.indicesToMultihot(r.indices, r.weights, E);
    const hp = wasm.permute(r.tokens, routingMap, { probs });
    const weights = { gateAndUpProjs: randomScaled(dtype, [E, dim, 2 * inter], 0.5 / Math.sqrt(dim), random), downProjs: randomScaled(dtype, [E, inter, dim], 0.5 / Math.sqrt(inter), random) };
    const dw = { gateAndUpProjs: moe.upload(weights.gateAndUpProjs), downProjs: moe.upload(weights.downProjs) };
    return { r, hp, n: hp.permutedTokens.shape[0], weights, dw };
  }

  // The experts in a device pipeline: permute's tokensPerExpert is vouched for by its facts, so the
  // GEMMs' tile tables are written on the GPU from it and nothing is read back.
  add("the grouped experts on permute's device counts: nothing read back, the same bits", async () => {
    const m = moe;
    const random = rng(777);
    for (const dtype of DTYPES) {
      // experts of ~100 rows (two row tiles), dim over one 64-wide column tile
      const [E, dim, inter] = [3, 70, 40];
      const { r, hp, n, weights, dw } = routedExperts(dtype, [150, E, 2, dim, inter], random);
      const dmh = await m.gpu.indicesToMultihot(m.upload(r.indices), m.upload(r.weights), E);
      const dp = await m.gpu.permute(m.upload(r.tokens), dmh.routingMap, { probs: dmh.probs });
      const biases = { gateUpProjBias: randomTokens(dtype, E, 2 * inter, random), downProjBias: randomTokens(dtype, E, dim, random) };
      const db = { gateUpProjBias: m.upload(biases.gateUpProjBias), downProjBias: m.upload(biases.downProjBias) };
      const g = randomTokens(dtype, n, dim, random);
      const o = { activation: 'swiglu', permutedProbs: hp.permutedProbs, biases };
      const od = { activation: 'swiglu', permutedProbs: dp.permutedProbs, biases: db };
      let before = m.transfers().toHostBytes;
      const y = await m.gpu.expertsForward(dp.permutedTokens, dp.tokensPerExpert, dw, od);
      check.equal(m.transfers().toHostBytes - before, 0, `expertsForward ${dtype}: bytes read back on permute's counts`);
      await same('expertsForward', y, wasm.expertsForward(hp.permutedTokens, hp.tokensPerExpert, weights, o), `${dtype} device counts`);
      before = m.transfers().toHostBytes;
      const grads = await m.gpu.expertsBackward(m.upload(g), dp.permutedTokens, dp.tokensPerExpert, dw, od);
      check.equal(m.transfers().toHostBytes - before, 0, `expertsBackward ${dtype}: bytes read back on permute's counts`);
      await same('expertsBackward', grads, wasm.expertsBackward(g, hp.permutedTokens, hp.tokensPerExpert, weights, o), `${dtype} device counts`);
      // counts that do not add up to the tokens' rows: not vouched for, read back, the core's error
      const bad = await errorOf(() =>
        m.gpu.expertsForward(dp.permutedTokens.shape[0] > 1 ? m.upload(hp.permutedTokens) : dp.permutedTokens, m.upload(tensor('int32', [E], new Int32Array(E).fill(1))), dw, od),
      );
      const want = await errorOf(() => wasm.expertsForward(hp.permutedTokens, tensor('int32', [E], new Int32Array(E).fill(1)), weights, o));
      check.equal(bad.message, want.message, `${dtype}: counts that do not add up`);
    }
  });

  // gatherIndices (the experts reading the tokens in their own order through permute's
  // sortedIndices): the webgpu backend takes the host path for it, whose adapter gathers the rows;
  // the same bits as the experts on permute's own rows, forward and backward.
  add("the grouped experts with gatherIndices: the same bits as on permute's rows", async () => {
    const m = moe;
    const random = rng(779);
    for (const dtype of DTYPES) {
      const dim = 24;
      const { r, hp, n, weights, dw } = routedExperts(dtype, [40, 3, 2, dim, 16], random);
      const o = { activation: 'swiglu', permutedProbs: hp.permutedProbs };
      const od = { activation: 'swiglu', permutedProbs: m.upload(hp.permutedProbs), gatherIndices: m.upload(hp.sortedIndices) };
      const x = m.upload(r.tokens);
      const y = await m.gpu.expertsForward(x, m.upload(hp.tokensPerExpert), dw, od);
      await same('expertsForward', y, wasm.expertsForward(hp.permutedTokens, hp.tokensPerExpert, weights, o), `${dtype} gatherIndices`);
      const g = randomTokens(dtype, n, dim, random);
      const grads = await m.gpu.expertsBackward(m.upload(g), x, m.upload(hp.tokensPerExpert), dw, od);
      await same('expertsBackward', grads, wasm.expertsBackward(g, hp.permutedTokens, hp.tokensPerExpert, weights, o), `${dtype} gatherIndices`);
      // and the wasm backend itself, on host tensors
      await same(
        'expertsForward',
        wasm.expertsForward(r.tokens, hp.tokensPerExpert, weights, { ...o, gatherIndices: hp.sortedIndices }),
        wasm.expertsForward(hp.permutedTokens, hp.tokensPerExpert, weights, o),
        `${dtype} wasm gatherIndices`,
      );
    }
  });

  // routeBackward at route's device picks (vouched for by their facts), every score function and
  // option that changes its arithmetic, with and without gradScores; host picks take the wasm path.
  add("routeBackward at route's picks, every score function, against wasm", async () => {
    const m = moe;
    const random = rng(4242);
    const T = 37;
    const E = 16;
    const bias = tensor(
      'float32',
      [E],
      Float32Array.from({ length: E }, () => random() - 0.5),
    );
    const mask = tensor(
      'bool',
      [T],
      Uint8Array.from({ length: T }, (_, i) => (i % 5 === 3 ? 0 : 1)),
    );
    for (const dtype of DTYPES) {
      const lf = Float32Array.from({ length: T * E }, () => random() * 8 - 4);
      // softplus's threshold (20) and a large negative logit in a few rows
      lf[3] = 25;
      lf[E + 5] = -30;
      lf[2 * E + 1] = 21;
      const logits = dtype === 'float32' ? tensor('float32', [T, E], lf) : tensor(dtype, [T, E], Uint16Array.from(lf, dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits));
      const dl = m.upload(logits);
      for (const o of [
        { topk: 4 },
        { topk: 4, softmaxBeforeTopk: true, normTopkProb: true },
        { topk: 4, scoreFunction: 'sigmoid', normTopkProb: true, routeScale: 2.5 },
        { topk: 4, scoreFunction: 'softmax_with_bias', expertBias: bias, tokenMask: mask },
        { topk: 4, scoreFunction: 'sigmoid_with_bias', expertBias: bias, numGroups: 4, topkGroups: 2, normTopkProb: true },
        { topk: 3, scoreFunction: 'sqrtsoftplus', normTopkProb: true, routeScale: 0.75 },
        { topk: 1, tokenMask: mask },
        { topk: 16, scoreFunction: 'sigmoid' },
        // sigmoid's masked rows and the experts no pick reaches (their scores are not computed)
        { topk: 2, scoreFunction: 'sigmoid_with_bias', expertBias: bias, tokenMask: mask, routeScale: 1.5 },
      ]) {
        const od = { ...o };
        if (o.tokenMask) od.tokenMask = m.upload(o.tokenMask);
        const r = await m.gpu.route(dl, od);
        const w = wasm.route(logits, o);
        const k = o.topk;
        const gw = tensor(
          'float32',
          [T, k],
          Float32Array.from({ length: T * k }, () => random() * 2 - 1),
        );
        const gsc = tensor(
          'float32',
          [T, E],
          Float32Array.from({ length: T * E }, () => random() * 2 - 1),
        );
        for (const withScores of [false, true]) {
          const bo = withScores ? { ...o, gradScores: gsc } : o;
          const bod = withScores ? { ...od, gradScores: m.upload(gsc) } : od;
          const what = `${dtype} ${JSON.stringify({ ...o, expertBias: o.expertBias ? 'bias' : undefined, tokenMask: o.tokenMask ? 'mask' : undefined })} gradScores ${withScores}`;
          const before = m.transfers().toHostBytes;
          const got = await m.gpu.routeBackward(m.upload(gw), dl, r.indices, bod);
          // the 4-byte non-finite flag, and the device token mask (checked by the core, as route reads it)
          check.equal(m.transfers().toHostBytes - before, 4 + (o.tokenMask ? T : 0), `routeBackward ${what}: bytes read back`);
          await same('routeBackward', got, wasm.routeBackward(gw, logits, w.indices, bo), what);
        }
        // host picks: the core checks them (the wasm path), the same bits
        await same('routeBackward', await m.gpu.routeBackward(gw, dl, w.indices, od), wasm.routeBackward(gw, logits, w.indices, o), `${dtype} host picks`);
      }
    }
  });

  add('errors: the same class and message as wasm (the core validates)', async () => {
    const m = moe;
    const t = tensor('float32', [3, 2], new Float32Array(6));
    const rm = tensor('bool', [3, 2], new Uint8Array([1, 0, 1, 1, 0, 1]));
    const errors = [
      ['permute: rows differ', () => m.gpu.permute(m.upload(tensor('float32', [4, 2], new Float32Array(8))), rm), () => wasm.permute(tensor('float32', [4, 2], new Float32Array(8)), rm)],
      [
        'permute: bool 2',
        () => m.gpu.permute(t, m.upload(tensor('bool', [3, 2], new Uint8Array([2, 0, 1, 1, 0, 1])))),
        () => wasm.permute(t, tensor('bool', [3, 2], new Uint8Array([2, 0, 1, 1, 0, 1]))),
      ],
      ['permute: numOutTokens', () => m.gpu.permute(m.upload(t), rm, { numOutTokens: 3 }), () => wasm.permute(t, rm, { numOutTokens: 3 })],
      ['permute: capacity', () => m.gpu.permute(m.upload(t), rm, { numOutTokens: 3, dropAndPad: true }), () => wasm.permute(t, rm, { numOutTokens: 3, dropAndPad: true })],
      ['permute: dtype', () => m.gpu.permute(m.upload(tensor('int32', [3, 2], new Int32Array(6))), rm), () => wasm.permute(tensor('int32', [3, 2], new Int32Array(6)), rm)],
      ['permute: unknown option', () => m.gpu.permute(t, rm, { prob: 1 }), () => wasm.permute(t, rm, { prob: 1 })],
      [
        'unpermute: index out of range',
        () => m.gpu.unpermute(m.upload(t), tensor('int32', [3], new Int32Array([0, 5, 1])), [3, 2]),
        () => wasm.unpermute(t, tensor('int32', [3], new Int32Array([0, 5, 1])), [3, 2]),
      ],
      [
        'unpermute: negative index',
        () => m.gpu.unpermute(m.upload(t), tensor('int32', [3], new Int32Array([0, -1, 1])), [3, 2], { probs: tensor('float32', [3], new Float32Array(3)) }),
        () => wasm.unpermute(t, tensor('int32', [3], new Int32Array([0, -1, 1])), [3, 2], { probs: tensor('float32', [3], new Float32Array(3)) }),
      ],
      [
        'unpermute: int64 index out of range',
        () => m.gpu.unpermute(m.upload(t), tensor('int64', [3], new BigInt64Array([0n, 3n, 1n])), [3, 2]),
        () => wasm.unpermute(t, tensor('int64', [3], new BigInt64Array([0n, 3n, 1n])), [3, 2]),
      ],
      [
        'unpermute: probs length',
        () => m.gpu.unpermute(m.upload(t), tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 2], { probs: m.upload(tensor('float32', [2], new Float32Array(2))) }),
        () => wasm.unpermute(t, tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 2], { probs: tensor('float32', [2], new Float32Array(2)) }),
      ],
      [
        'unpermute: hidden differs',
        () => m.gpu.unpermute(m.upload(t), tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 4]),
        () => wasm.unpermute(t, tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 4]),
      ],
      [
        'unpermute: dense probs without map',
        () => m.gpu.unpermute(t, tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 2], { probs: m.upload(tensor('float32', [3, 2], new Float32Array(6))) }),
        () => wasm.unpermute(t, tensor('int32', [3], new Int32Array([0, 1, 1])), [3, 2], { probs: tensor('float32', [3, 2], new Float32Array(6)) }),
      ],
      [
        'indicesToMultihot: duplicate',
        () => m.gpu.indicesToMultihot(m.upload(tensor('int32', [1, 2], new Int32Array([1, 1]))), tensor('float32', [1, 2], new Float32Array(2)), 3),
        () => wasm.indicesToMultihot(tensor('int32', [1, 2], new Int32Array([1, 1])), tensor('float32', [1, 2], new Float32Array(2)), 3),
      ],
      [
        'sortChunksByIndex: not a permutation',
        () => m.gpu.sortChunksByIndex(m.upload(t), tensor('int32', [2], new Int32Array([1, 2])), tensor('int32', [2], new Int32Array([0, 0]))),
        () => wasm.sortChunksByIndex(t, tensor('int32', [2], new Int32Array([1, 2])), tensor('int32', [2], new Int32Array([0, 0]))),
      ],
      ['route: topk', () => m.gpu.route(m.upload(t), { topk: 5 }), () => wasm.route(t, { topk: 5 })],
      [
        'route: non-finite logits',
        () => m.gpu.route(m.upload(tensor('float32', [2, 2], new Float32Array([1, Infinity, 0, 0]))), { topk: 1 }),
        () => wasm.route(tensor('float32', [2, 2], new Float32Array([1, Infinity, 0, 0])), { topk: 1 }),
      ],
      ['route: groups', () => m.gpu.route(m.upload(t), { topk: 1, scoreFunction: 'sigmoid', numGroups: 3 }), () => wasm.route(t, { topk: 1, scoreFunction: 'sigmoid', numGroups: 3 })],
      [
        'route: bias with softmax',
        () => m.gpu.route(t, { topk: 1, expertBias: m.upload(tensor('float32', [2], new Float32Array(2))) }),
        () => wasm.route(t, { topk: 1, expertBias: tensor('float32', [2], new Float32Array(2)) }),
      ],
      [
        'route: mask value',
        () => m.gpu.route(t, { topk: 1, tokenMask: tensor('bool', [3], new Uint8Array([1, 3, 0])) }),
        () => wasm.route(t, { topk: 1, tokenMask: tensor('bool', [3], new Uint8Array([1, 3, 0])) }),
      ],
      ['route: score function', () => m.gpu.route(t, { topk: 1, scoreFunction: 'toString' }), () => wasm.route(t, { topk: 1, scoreFunction: 'toString' })],
      [
        'activation: odd width',
        () => m.gpu.activation(m.upload(tensor('float32', [2, 3], new Float32Array(6))), { kind: 'swiglu' }),
        () => wasm.activation(tensor('float32', [2, 3], new Float32Array(6)), { kind: 'swiglu' }),
      ],
      ['activation: kind', () => m.gpu.activation(m.upload(t), { kind: 'gelu' }), () => wasm.activation(t, { kind: 'gelu' })],
      ['activation: alpha for swiglu', () => m.gpu.activation(m.upload(t), { kind: 'swiglu', alpha: 2 }), () => wasm.activation(t, { kind: 'swiglu', alpha: 2 })],
      ['activation: limit', () => m.gpu.activation(m.upload(t), { kind: 'swiglu_clamped', limit: -1 }), () => wasm.activation(t, { kind: 'swiglu_clamped', limit: -1 })],
      ['activationBackward: grad shape', () => m.gpu.activationBackward(m.upload(t), m.upload(t), { kind: 'swiglu' }), () => wasm.activationBackward(t, t, { kind: 'swiglu' })],
      ['zLoss: non-finite', () => m.gpu.zLoss(m.upload(tensor('float32', [1, 2], new Float32Array([NaN, 0])))), () => wasm.zLoss(tensor('float32', [1, 2], new Float32Array([NaN, 0])))],
      ['zLoss: coeff', () => m.gpu.zLoss(m.upload(t), { coeff: -1 }), () => wasm.zLoss(t, { coeff: -1 })],
      [
        'switchLoadBalancingLoss: counts shape',
        () => m.gpu.switchLoadBalancingLoss(m.upload(t), tensor('int32', [3], new Int32Array(3)), { topk: 1 }),
        () => wasm.switchLoadBalancingLoss(t, tensor('int32', [3], new Int32Array(3)), { topk: 1 }),
      ],
      [
        'switchLoadBalancingLoss: numTokens',
        () => m.gpu.switchLoadBalancingLoss(m.upload(t), tensor('int32', [2], new Int32Array(2)), { topk: 1, numTokens: 0 }),
        () => wasm.switchLoadBalancingLoss(t, tensor('int32', [2], new Int32Array(2)), { topk: 1, numTokens: 0 }),
      ],
      ['matmul: inner dimensions', () => m.gpu.matmul(m.upload(t), m.upload(t)), () => wasm.matmul(t, t)],
      ['matmul: dtype', () => m.gpu.matmul(m.upload(t), m.upload(tensor('int32', [2, 2], new Int32Array(4)))), () => wasm.matmul(t, tensor('int32', [2, 2], new Int32Array(4)))],
      ['matmul: transA', () => m.gpu.matmul(m.upload(t), t, { transA: 1 }), () => wasm.matmul(t, t, { transA: 1 })],
      ...[
        // [what, counts, weights' shapes ([up, down], the up key), options, gradOutput of another dtype]
        [
          'expertsForward: counts add up to more',
          [4],
          [
            [1, 2, 2],
            [1, 1, 2],
          ],
          { activation: 'swiglu' },
        ],
        [
          'expertsForward: negative count',
          [4, -1],
          [
            [2, 2, 2],
            [2, 1, 2],
          ],
          { activation: 'swiglu' },
        ],
        [
          'expertsForward: down shape',
          [3],
          [
            [1, 2, 2],
            [1, 2, 2],
          ],
          { activation: 'swiglu' },
        ],
        ['expertsForward: upProjs for swiglu', [3], [[1, 2, 2], [1, 1, 2], 'upProjs'], { activation: 'swiglu' }],
        [
          'expertsForward: probs shape',
          [3],
          [
            [1, 2, 2],
            [1, 1, 2],
          ],
          { activation: 'swiglu', permutedProbs: tensor('float32', [2], new Float32Array(2)) },
        ],
        [
          'expertsBackward: gradOutput dtype',
          [3],
          [
            [1, 2, 2],
            [1, 1, 2],
          ],
          { activation: 'swiglu' },
          tensor('bfloat16', [3, 2], new Uint16Array(6)),
        ],
        [
          'expertsBackward: alpha for swiglu',
          [3],
          [
            [1, 2, 2],
            [1, 1, 2],
          ],
          { activation: 'swiglu', alpha: 2 },
          t,
        ],
      ].map(([what, counts, [up, down, key = 'gateAndUpProjs'], o, grad]) => {
        const zeros = (shape) => tensor('float32', shape, new Float32Array(shape.reduce((a, b) => a * b, 1)));
        const w = { [key]: zeros(up), downProjs: zeros(down) };
        const c = tensor('int32', [counts.length], Int32Array.from(counts));
        // device inputs where they may be (the counts, the up weight, probs), host ones elsewhere
        const dw = { [key]: m.upload(w[key]), downProjs: w.downProjs };
        const od = o.permutedProbs ? { ...o, permutedProbs: m.upload(o.permutedProbs) } : o;
        return grad
          ? [what, () => m.gpu.expertsBackward(m.upload(grad), m.upload(t), c, dw, od), () => wasm.expertsBackward(grad, t, c, w, o)]
          : [what, () => m.gpu.expertsForward(m.upload(t), m.upload(c), dw, od), () => wasm.expertsForward(t, c, w, o)];
      }),
      [
        'routeBackward: non-finite logits',
        async () =>
          m.gpu.routeBackward(
            m.upload(tensor('float32', [3, 1], new Float32Array(3))),
            m.upload(tensor('float32', [3, 2], new Float32Array([1, Infinity, 0, 0, 1, 1]))),
            (await m.gpu.route(m.upload(t), { topk: 1 })).indices,
            { topk: 1 },
          ),
        () =>
          wasm.routeBackward(tensor('float32', [3, 1], new Float32Array(3)), tensor('float32', [3, 2], new Float32Array([1, Infinity, 0, 0, 1, 1])), wasm.route(t, { topk: 1 }).indices, { topk: 1 }),
      ],
      [
        'routeBackward: gradWeights shape',
        async () => m.gpu.routeBackward(m.upload(tensor('float32', [3, 2], new Float32Array(6))), m.upload(t), (await m.gpu.route(m.upload(t), { topk: 1 })).indices, { topk: 1 }),
        () => wasm.routeBackward(tensor('float32', [3, 2], new Float32Array(6)), t, wasm.route(t, { topk: 1 }).indices, { topk: 1 }),
      ],
      [
        'routeBackward: duplicate picks',
        () =>
          m.gpu.routeBackward(tensor('float32', [1, 2], new Float32Array(2)), m.upload(tensor('float32', [1, 2], new Float32Array(2))), tensor('int32', [1, 2], new Int32Array([1, 1])), { topk: 2 }),
        () => wasm.routeBackward(tensor('float32', [1, 2], new Float32Array(2)), tensor('float32', [1, 2], new Float32Array(2)), tensor('int32', [1, 2], new Int32Array([1, 1])), { topk: 2 }),
      ],
      [
        'routeBackward: groups',
        async () => m.gpu.routeBackward(m.upload(tensor('float32', [3, 1], new Float32Array(3))), m.upload(t), (await m.gpu.route(m.upload(t), { topk: 1 })).indices, { topk: 1, numGroups: 3 }),
        () => wasm.routeBackward(tensor('float32', [3, 1], new Float32Array(3)), t, wasm.route(t, { topk: 1 }).indices, { topk: 1, numGroups: 3 }),
      ],
      ['topk: k', () => m.gpu.topk(m.upload(t), 3), () => wasm.topk(t, 3)],
      ['topk: NaN', () => m.gpu.topk(m.upload(tensor('float32', [2, 2], new Float32Array([1, 2, NaN, 0]))), 1), () => wasm.topk(tensor('float32', [2, 2], new Float32Array([1, 2, NaN, 0])), 1)],
      ['topk: rank', () => m.gpu.topk(m.upload(tensor('float32', [4], new Float32Array(4))), 1), () => wasm.topk(tensor('float32', [4], new Float32Array(4)), 1)],
    ];
    for (const [what, g, w] of errors) {
      const ge = await errorOf(g);
      const we = await errorOf(w);
      check.equal(ge.constructor, we.constructor, `${what}: error class (webgpu: ${ge.constructor.name}: ${ge.message}; wasm: ${we.constructor.name})`);
      check.ok([TypeError, RangeError].includes(we.constructor), `${what}: wasm's error is a TypeError or RangeError (${we.constructor.name}: ${we.message})`);
      check.equal(ge.message, we.message, what);
    }
  });

  add('device errors name the op: a disposed tensor, a sync op given a webgpu tensor, a buffer over the limit', async () => {
    const m = moe;
    const x = m.upload(tensor('float32', [2, 2], new Float32Array(4)));
    x.dispose();
    check.equal(x.disposed, true, 'x.disposed');
    const rm = tensor('bool', [2, 1], new Uint8Array([1, 1]));
    const e1 = await errorOf(() => m.gpu.permute(x, rm));
    check.ok(e1 instanceof TypeError, `a disposed tensor: a TypeError (got ${e1.constructor.name}: ${e1.message})`);
    check.match(e1.message, /^permute: tokens: expected a device tensor that is not disposed/, 'a disposed tensor');
    const y = m.upload(tensor('float32', [2, 2], new Float32Array(4)));
    const e2 = await errorOf(() => m.permute(y, rm));
    check.ok(e2 instanceof TypeError, `a sync op given a webgpu tensor: a TypeError (got ${e2.constructor.name}: ${e2.message})`);
    check.match(e2.message, /^permute: got a webgpu tensor; .*await moe\.gpu\.permute/, 'a sync op given a webgpu tensor');
    // 4 tokens of 2^20 float32 each, 64 experts, capacity 4: permutedTokens would be 1 GiB
    const big = m.upload(tensor('float32', [4, 1 << 20], new Float32Array(4 << 20)));
    const all = tensor('bool', [4, 64], new Uint8Array(256).fill(1));
    const e3 = await errorOf(() => m.gpu.permute(big, all, { numOutTokens: 256, dropAndPad: true }));
    check.ok(e3 instanceof Error && !(e3 instanceof TypeError) && !(e3 instanceof RangeError), `a buffer over the limit: a plain Error (got ${e3?.constructor?.name}: ${e3?.message})`);
    check.match(e3.message, /^permute: permutedTokens needs a 1073741824-byte buffer, over this WebGPU adapter's limit/, 'a buffer over the limit');
    big.dispose();
    y.dispose();
  });

  add('a lost device: every op says so, naming it; a new backend works', async () => {
    const b = await api.createBackend({ prefer: 'webgpu' });
    const t = tensor('float32', [2, 2], new Float32Array([1, 2, 3, 4]));
    const rm = tensor('bool', [2, 1], new Uint8Array([1, 1]));
    const x = b.upload(t);
    b.destroy();
    for (let i = 0; i < 50 && !/lost/.test((await errorOf(() => b.gpu.tokensPerExpert(rm)).catch((e) => e)).message); i++) await new Promise((r) => setTimeout(r, 20));
    const e = await errorOf(() => b.gpu.permute(x, rm));
    check.match(e.message, /^permute: the WebGPU device was lost \(destroyed/, 'permute after destroy()');
    check.match((await errorOf(() => x.download())).message, /^download: the WebGPU device was lost/, 'download after destroy()');
    // the host ops still run (on wasm), and a new backend has a new device
    check.deepEqual(b.permute(t, rm).sortedIndices.data, new Int32Array([0, 1]), 'a host permute after destroy()');
    const c = await api.createBackend({ prefer: 'webgpu' });
    await same('permute', await c.gpu.permute(c.upload(t), rm), wasm.permute(t, rm), 'after a lost device');
  });

  add('prints the comparison counts', () => {
    const total = Object.values(compared).reduce((a, b) => a + b, 0);
    console.log(`webgpu vs wasm: ${total} tensors bit for bit: ${JSON.stringify(compared)}`);
    for (const op of WEBGPU_OPS) check.ok(compared[op] > 0, `${op}: ${compared[op] ?? 0} tensors compared`);
  });

  return { cases, compared };
}
