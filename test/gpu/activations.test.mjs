// The GPU suite for the expert activations and the aux router losses: the 'cuda' backend on
// device tensors against the 'cpu' backend (the CPU core, the reference), bit for bit; plus
// errors (same class, same message).
//
// Plain JavaScript on node:test, no node_modules (see cuda.test.mjs). Where CUDA is unavailable
// every test is skipped, and the skip names the reason. MOE_GPU_SUITE_STANDIN=wasm runs the suite
// with the wasm backend in cuda's place and host tensors in place of device tensors (to check the
// suite itself on a machine with no GPU); the cuda-specific tests still skip.
//
//   node --test test/gpu/activations.test.mjs
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { cpu, cuda, cudaInfo, cudaOnly, lib, outcome, rng, sameLayout, skip, standIn, tensor } from './common.mjs';
if (cudaInfo?.available) console.log(`# cuda: ${cudaInfo.device}; kernels: ${cudaInfo.kernels}; GPU ops: ${cudaInfo.gpuOps?.join(', ')}`);
else if (skip) console.log(`# ${skip}`);

/** A tensor on the GPU (in a stand-in run: the host tensor itself). */
function dev(t) {
  if (t === undefined || standIn) return t;
  return cuda.upload(t);
}

/** Results of a device call are device tensors (not checked in a stand-in run). */
function assertDevice(t, what) {
  if (standIn || t === undefined) return;
  assert.ok(lib.isDeviceTensor(t), `${what}: expected a device tensor`);
}

function isNaNBits(dtype, data, i) {
  if (dtype === 'float32') return Number.isNaN(data[i]);
  const b = data[i];
  return dtype === 'bfloat16' ? (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0 : (b & 0x7c00) === 0x7c00 && (b & 0x3ff) !== 0;
}

/** Bit for bit, except that any NaN equals any NaN (NaN payloads after arithmetic are not part of the contract). */
function assertSameFloats(got, want, what) {
  got = sameLayout(got, want, what);
  if (!got) return;
  assert.equal(got.data.length, want.data.length, `${what}: length`);
  const bits = (d) => (d instanceof Float32Array ? new Uint32Array(d.buffer, d.byteOffset, d.length) : d);
  const a = bits(got.data);
  const b = bits(want.data);
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    if (isNaNBits(want.dtype, got.data, i) && isNaNBits(want.dtype, want.data, i)) continue;
    assert.fail(`${what}: element ${i} differs: cuda ${got.data[i]} (0x${a[i].toString(16)}) vs cpu ${want.data[i]} (0x${b[i].toString(16)}) (${a.length} elements)`);
  }
}

function assertSameLoss(got, want, what) {
  assert.ok(Object.is(got, want), `${what}: loss ${got} vs ${want}`);
}

/** Random values in [-lo, lo] with specials mixed in: NaN, infinities, -0, the clamp bounds, subnormals, large values. */
function values(n, random, { lo = 12, specials = true } = {}) {
  const SPECIAL = [NaN, Infinity, -Infinity, -0, 0, 7, -7, 3, -3, 1e-40, -2e-39, 100, -100, 88.8, -104];
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = specials && random() < 0.08 ? SPECIAL[Math.floor(random() * SPECIAL.length)] : (random() * 2 - 1) * lo;
  }
  return out;
}

function floatTensor(dtype, shape, data) {
  return dtype === 'float32' ? tensor('float32', shape, data) : tensor(dtype, shape, Array.from(data));
}

// ---------------------------------------------------------------------------------------
// Activations

const KINDS = ['swiglu', 'quick_geglu', 'swiglu_oai', 'swiglu_clamped', 'relu2'];
const DTYPES = ['float32', 'bfloat16', 'float16'];
const SHAPES = [
  { rows: 0, inter: 3 },
  { rows: 1, inter: 1 },
  { rows: 3, inter: 0 },
  { rows: 5, inter: 7 },
  { rows: 33, inter: 64 },
  { rows: 130, inter: 45 },
  // more rows than one block of the probs-gradient kernel (4 warps of 32 rows), a partial last
  // warp, and a partial last tile of 64 columns
  { rows: 300, inter: 130 },
  // the vectorised kernels (8 columns a thread for bf16/f16, 4 for f32): several column groups
  // a row, rows across blocks; and a width they take for f32 only (12 = 3 x 4, not a multiple of 8)
  { rows: 37, inter: 136 },
  { rows: 200, inter: 12 },
];

/** Option sets per kind: the defaults, and custom values for the options the kind takes. */
function optionSets(kind) {
  const sets = [{ kind }];
  if (kind === 'quick_geglu' || kind === 'swiglu_oai') sets.push({ kind, alpha: 1.5, limit: 3, linearOffset: 0.5 });
  if (kind === 'swiglu_clamped') sets.push({ kind, limit: 3 });
  return sets;
}

describe('activation and activationBackward: cuda (device tensors) == cpu, bit for bit', () => {
  let seed = 1;
  for (const kind of KINDS) {
    for (const dtype of DTYPES) {
      for (const { rows, inter } of SHAPES) {
        for (const probsShape of ['none', '[N]', '[N, 1]']) {
          const s = seed++;
          test(`${kind} ${dtype} rows=${rows} inter=${inter} probs ${probsShape}`, { skip }, () => {
            const random = rng(s * 7919);
            const width = kind === 'relu2' ? inter : 2 * inter;
            const x = floatTensor(dtype, [rows, width], values(rows * width, random));
            const grad = floatTensor(dtype, [rows, inter], values(rows * inter, random, { lo: 3 }));
            const probs = probsShape === 'none' ? undefined : tensor('float32', probsShape === '[N]' ? [rows] : [rows, 1], values(rows, random, { lo: 1.5, specials: random() < 0.5 }));
            for (const base of optionSets(kind)) {
              const what = JSON.stringify(base);
              const hostOptions = probs ? { ...base, probs } : base;
              const devOptions = probs ? { ...base, probs: dev(probs) } : base;
              const xd = dev(x);
              const gd = dev(grad);
              const want = cpu.activation(x, hostOptions);
              const got = cuda.activation(xd, devOptions);
              assertDevice(got, `${what} activation`);
              assertSameFloats(got, want, `${what} activation`);
              const wantB = cpu.activationBackward(grad, x, hostOptions);
              const gotB = cuda.activationBackward(gd, xd, devOptions);
              assertDevice(gotB.gradInput, `${what} gradInput`);
              assertDevice(gotB.gradProbs, `${what} gradProbs`);
              assertSameFloats(gotB.gradInput, wantB.gradInput, `${what} gradInput`);
              assertSameFloats(gotB.gradProbs, wantB.gradProbs, `${what} gradProbs`);
              assert.equal('gradProbs' in gotB, 'gradProbs' in wantB, `${what}: gradProbs present on both or neither`);
              // Mixed: x on the GPU, probs and grad on the host.
              if (probs) {
                assertSameFloats(cuda.activation(xd, hostOptions), want, `${what} activation (host probs)`);
                const mixed = cuda.activationBackward(grad, xd, hostOptions);
                assertSameFloats(mixed.gradInput, wantB.gradInput, `${what} gradInput (host grad, probs)`);
                assertSameFloats(mixed.gradProbs, wantB.gradProbs, `${what} gradProbs (host grad, probs)`);
              }
            }
          });
        }
      }
    }
  }

  test('host tensors only: host results', { skip }, () => {
    const x = tensor('float32', [2, 4], [1, -2, 3, 0.5, 8, -9, -1, 2]);
    const out = cuda.activation(x, { kind: 'swiglu' });
    assert.ok(!lib.isDeviceTensor(out), 'a host tensor');
    assertSameFloats(out, cpu.activation(x, { kind: 'swiglu' }), 'activation');
  });

  test('a larger problem, identical run after run', { skip }, () => {
    const random = rng(4242);
    const [rows, inter] = [2048, 768];
    for (const dtype of ['bfloat16', 'float32']) {
      const x = floatTensor(dtype, [rows, 2 * inter], values(rows * 2 * inter, random, { specials: false }));
      const grad = floatTensor(dtype, [rows, inter], values(rows * inter, random, { lo: 2, specials: false }));
      const probs = tensor('float32', [rows], values(rows, random, { lo: 1, specials: false }));
      const xd = dev(x);
      const o = { kind: 'swiglu', probs: dev(probs) };
      const want = cpu.activationBackward(grad, x, { kind: 'swiglu', probs });
      const first = cuda.activationBackward(dev(grad), xd, o);
      assertSameFloats(first.gradInput, want.gradInput, `${dtype} gradInput`);
      assertSameFloats(first.gradProbs, want.gradProbs, `${dtype} gradProbs`);
      assertSameFloats(cuda.activation(xd, o), cpu.activation(x, { kind: 'swiglu', probs }), `${dtype} activation`);
    }
  });
});

// ---------------------------------------------------------------------------------------
// Aux losses

const LOSS_SHAPES = [
  { rows: 0, cols: 4 },
  { rows: 1, cols: 1 },
  { rows: 5, cols: 3 },
  { rows: 64, cols: 8 },
  { rows: 300, cols: 64 },
  // a row a warp, its columns 32 at a time (kernels/activations.cu LOSS_WARP_ROWS): a partial
  // second and fourth group
  { rows: 40, cols: 33 },
  { rows: 17, cols: 100 },
  // the totals add blocks of 64 rows (the core's TOTAL_BLOCK), staged in chunks of 4096 rows in
  // shared memory (kernels/activations.cu loss_ordered_total): a block and one row, one whole
  // chunk, a chunk and one row, several with a partial last block
  { rows: 65, cols: 5 },
  { rows: 4096, cols: 4 },
  { rows: 4097, cols: 3 },
  { rows: 9000, cols: 6 },
];

function randomMask(kind, rows, random) {
  if (kind === 'none') return undefined;
  if (kind === 'all false') return tensor('bool', [rows], new Uint8Array(rows));
  return tensor(
    'bool',
    [rows],
    Uint8Array.from({ length: rows }, () => (random() < 0.7 ? 1 : 0)),
  );
}

function randomCounts(cols, random) {
  return tensor(
    'int32',
    [cols],
    Int32Array.from({ length: cols }, () => Math.floor(random() * 50)),
  );
}

/** Random router probs (positive rows) and logits (finite). */
function lossInputs(rows, cols, random) {
  const logits = new Float32Array(rows * cols);
  for (let i = 0; i < logits.length; i++) logits[i] = random() < 0.05 ? [0, -0, 30, -30][Math.floor(random() * 4)] : (random() * 2 - 1) * 8;
  const probs = new Float32Array(rows * cols);
  for (let i = 0; i < probs.length; i++) probs[i] = random() < 0.05 ? [0, -0, 1][Math.floor(random() * 3)] : random();
  return { logits: tensor('float32', [rows, cols], logits), probs: tensor('float32', [rows, cols], probs) };
}

describe('aux losses: cuda (device tensors) == cpu, loss and gradient bit for bit', () => {
  let seed = 1;
  for (const { rows, cols } of LOSS_SHAPES) {
    for (const maskKind of ['none', 'random', 'all false']) {
      for (const variant of [{}, { coeff: 0.01, topk: 2 }, { coeff: 0, topk: 1 }, { coeff: 1e-3, topk: 3, numTokens: 1000 }]) {
        const s = seed++;
        test(`T=${rows} E=${cols} mask ${maskKind} ${JSON.stringify(variant)}`, { skip }, () => {
          const random = rng(s * 131);
          const { logits, probs } = lossInputs(rows, cols, random);
          const counts = randomCounts(cols, random);
          const mask = randomMask(maskKind, rows, random);
          const switchHost = { topk: variant.topk ?? 1, ...variant };
          if (mask) switchHost.tokenMask = mask;
          const switchDev = { ...switchHost, tokenMask: dev(mask) };
          if (!mask) delete switchDev.tokenMask;
          const [pd, ld, cd] = [dev(probs), dev(logits), dev(counts)];

          const want = cpu.switchLoadBalancingLoss(probs, counts, switchHost);
          const got = cuda.switchLoadBalancingLoss(pd, cd, switchDev);
          assertSameLoss(got.loss, want.loss, 'switchLoadBalancingLoss');
          assertDevice(got.gradProbs, 'gradProbs');
          assertSameFloats(got.gradProbs, want.gradProbs, 'switchLoadBalancingLoss gradProbs');

          const wantL = cpu.switchLoadBalancingLossFromLogits(logits, counts, switchHost);
          const gotL = cuda.switchLoadBalancingLossFromLogits(ld, cd, switchDev);
          assertSameLoss(gotL.loss, wantL.loss, 'switchLoadBalancingLossFromLogits');
          assertDevice(gotL.gradLogits, 'gradLogits');
          assertSameFloats(gotL.gradLogits, wantL.gradLogits, 'switchLoadBalancingLossFromLogits gradLogits');

          const zHost = variant.coeff === undefined ? {} : { coeff: variant.coeff };
          if (mask) zHost.tokenMask = mask;
          const zDev = mask ? { ...zHost, tokenMask: dev(mask) } : zHost;
          const wantZ = cpu.zLoss(logits, zHost);
          const gotZ = cuda.zLoss(ld, zDev);
          assertSameLoss(gotZ.loss, wantZ.loss, 'zLoss');
          assertDevice(gotZ.gradLogits, 'zLoss gradLogits');
          assertSameFloats(gotZ.gradLogits, wantZ.gradLogits, 'zLoss gradLogits');

          // lazyLoss (the cuda backend): the same values, queued with no wait, read when `loss` is read
          if (!standIn) {
            const sync0 = cuda.transfers().synchronizations;
            const lazy = [
              cuda.switchLoadBalancingLoss(pd, cd, { ...switchDev, lazyLoss: true }),
              cuda.switchLoadBalancingLossFromLogits(ld, cd, { ...switchDev, lazyLoss: true }),
              cuda.zLoss(ld, { ...zDev, lazyLoss: true }),
            ];
            assert.equal(cuda.transfers().synchronizations, sync0, 'lazyLoss: the calls do not wait for the GPU');
            assertSameLoss(lazy[0].loss, want.loss, 'lazy switchLoadBalancingLoss');
            assertSameLoss(lazy[1].loss, wantL.loss, 'lazy switchLoadBalancingLossFromLogits');
            assertSameLoss(lazy[2].loss, wantZ.loss, 'lazy zLoss');
            assert.equal(cuda.transfers().synchronizations, sync0 + 3, 'each loss read once');
            assertSameLoss(lazy[0].loss, want.loss, 'lazy switchLoadBalancingLoss, read again');
            assert.equal(cuda.transfers().synchronizations, sync0 + 3, 'a second read waits for nothing');
            assertSameFloats(lazy[0].gradProbs, want.gradProbs, 'lazy gradProbs');
            assertSameFloats(lazy[1].gradLogits, wantL.gradLogits, 'lazy gradLogits');
            assertSameFloats(lazy[2].gradLogits, wantZ.gradLogits, 'lazy zLoss gradLogits');
          }

          // Mixed: logits on the GPU, counts (int32, then int64) and mask on the host.
          const mixed = cuda.switchLoadBalancingLossFromLogits(ld, counts, switchHost);
          assertSameLoss(mixed.loss, wantL.loss, 'from logits, host counts');
          assertSameFloats(mixed.gradLogits, wantL.gradLogits, 'from logits, host counts');
          const counts64 = tensor(
            'int64',
            [cols],
            BigInt64Array.from(counts.data, (v) => BigInt(v)),
          );
          const mixed64 = cuda.switchLoadBalancingLoss(pd, counts64, switchHost);
          assertSameLoss(mixed64.loss, want.loss, 'switch, host int64 counts');
          assertSameFloats(mixed64.gradProbs, want.gradProbs, 'switch, host int64 counts');
          assertDevice(mixed64.gradProbs, 'switch, host int64 counts');
        });
      }
    }
  }

  test('int64 counts beyond int32 (the host op, the gradient uploaded)', { skip }, () => {
    const { logits, probs } = lossInputs(6, 3, rng(77));
    const counts = tensor('int64', [3], BigInt64Array.from([1n, 1n << 40n, 5n]));
    for (const [op, x, key] of [
      ['switchLoadBalancingLoss', probs, 'gradProbs'],
      ['switchLoadBalancingLossFromLogits', logits, 'gradLogits'],
    ]) {
      const want = cpu[op](x, counts, { topk: 2 });
      const got = cuda[op](dev(x), counts, { topk: 2 });
      assertSameLoss(got.loss, want.loss, op);
      assertDevice(got[key], op);
      assertSameFloats(got[key], want[key], op);
    }
  });

  test('a larger problem, identical run after run', { skip }, () => {
    const random = rng(99);
    const [rows, cols] = [8192, 128];
    const { logits } = lossInputs(rows, cols, random);
    const counts = randomCounts(cols, random);
    const mask = randomMask('random', rows, random);
    const want = cpu.switchLoadBalancingLossFromLogits(logits, counts, { topk: 8, coeff: 1e-2, tokenMask: mask });
    const wantZ = cpu.zLoss(logits, { coeff: 1e-3, tokenMask: mask });
    const [ld, cd, md] = [dev(logits), dev(counts), dev(mask)];
    for (let i = 0; i < 3; i++) {
      const got = cuda.switchLoadBalancingLossFromLogits(ld, cd, { topk: 8, coeff: 1e-2, tokenMask: md });
      assertSameLoss(got.loss, want.loss, `run ${i + 1}`);
      assertSameFloats(got.gradLogits, want.gradLogits, `run ${i + 1}`);
      const z = cuda.zLoss(ld, { coeff: 1e-3, tokenMask: md });
      assertSameLoss(z.loss, wantZ.loss, `z run ${i + 1}`);
      assertSameFloats(z.gradLogits, wantZ.gradLogits, `z run ${i + 1}`);
    }
  });
});

// ---------------------------------------------------------------------------------------
// Errors: the same class and message as the CPU backend

describe('errors: cuda (device tensors) == cpu', () => {
  const f32 = (shape, data) => tensor('float32', shape, data ?? new Float32Array(shape.reduce((a, b) => a * b, 1)));
  const x = f32([3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  const x5 = f32([3, 5]);
  const g = f32([3, 2]);
  const logits = f32([2, 3], [0.5, -1, 2, 0.25, -0.5, 1.5]);
  const counts = tensor('int32', [3], [1, 2, 0]);
  const mask = tensor('bool', [2], [1, 0]);
  // Each case gets `d`: the device converter for cuda, the identity for cpu.
  const cases = {
    'activation: no kind': (b, d) => b.activation(d(x), {}),
    'activation: unknown kind': (b, d) => b.activation(d(x), { kind: 'gelu' }),
    'activation: kind not a string': (b, d) => b.activation(d(x), { kind: 3 }),
    'activation: alpha with swiglu': (b, d) => b.activation(d(x), { kind: 'swiglu', alpha: 1 }),
    'activation: limit 0': (b, d) => b.activation(d(x), { kind: 'quick_geglu', limit: 0 }),
    'activation: limit NaN': (b, d) => b.activation(d(x), { kind: 'swiglu_clamped', limit: NaN }),
    'activation: alpha beyond float32': (b, d) => b.activation(d(x), { kind: 'swiglu_oai', alpha: 1e39 }),
    'activation: unknown option': (b, d) => b.activation(d(x), { kind: 'swiglu', lmit: 3 }),
    'activation: odd width': (b, d) => b.activation(d(x5), { kind: 'swiglu' }),
    'activation: odd width interleaved': (b, d) => b.activation(d(x5), { kind: 'quick_geglu' }),
    'activation: 1-d x': (b, d) => b.activation(d(f32([4])), { kind: 'relu2' }),
    'activation: int32 x': (b, d) => b.activation(d(tensor('int32', [3, 4], new Int32Array(12))), { kind: 'relu2' }),
    'activation: probs of the wrong shape': (b, d) => b.activation(d(x), { kind: 'swiglu', probs: d(f32([2])) }),
    'activation: probs [N, 2]': (b, d) => b.activation(d(x), { kind: 'swiglu', probs: d(f32([3, 2])) }),
    'activation: probs 3-d': (b, d) => b.activation(d(x), { kind: 'swiglu', probs: d(f32([3, 1, 1])) }),
    'activation: bfloat16 probs': (b, d) => b.activation(d(x), { kind: 'swiglu', probs: d(tensor('bfloat16', [3], [1, 1, 1])) }),
    'activationBackward: grad of the wrong shape': (b, d) => b.activationBackward(d(f32([3, 4])), d(x), { kind: 'swiglu' }),
    'activationBackward: grad 1-d': (b, d) => b.activationBackward(d(f32([6])), d(x), { kind: 'swiglu' }),
    'activationBackward: grad dtype differs': (b, d) => b.activationBackward(d(tensor('bfloat16', [3, 2], new Uint16Array(6))), d(x), { kind: 'swiglu' }),
    'activationBackward: odd width': (b, d) => b.activationBackward(d(g), d(x5), { kind: 'swiglu_oai' }),
    'activationBackward: probs of the wrong shape': (b, d) => b.activationBackward(d(g), d(x), { kind: 'swiglu', probs: d(f32([4])) }),
    'activationBackward: bad limit': (b, d) => b.activationBackward(d(g), d(x), { kind: 'swiglu_clamped', limit: -1 }),
    'switch: NaN in probs': (b, d) => b.switchLoadBalancingLoss(d(f32([2, 3], [0.1, NaN, 0.2, 0.3, 0.4, 0.5])), d(counts), { topk: 1 }),
    'switch: Infinity in a masked row': (b, d) => b.switchLoadBalancingLoss(d(f32([2, 3], [0.1, 0.2, 0.2, 0.3, Infinity, 0.5])), d(counts), { topk: 1, tokenMask: d(mask) }),
    'switch: negative count': (b, d) => b.switchLoadBalancingLoss(d(logits), d(tensor('int32', [3], [1, -4, 0])), { topk: 1 }),
    'switch: counts of the wrong shape': (b, d) => b.switchLoadBalancingLoss(d(logits), d(tensor('int32', [4], [1, 1, 1, 1])), { topk: 1 }),
    'switch: float counts': (b, d) => b.switchLoadBalancingLoss(d(logits), d(f32([3])), { topk: 1 }),
    'switch: topk 0': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 0 }),
    'switch: topk missing': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), {}),
    'switch: topk 1.5': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1.5 }),
    'switch: coeff negative': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, coeff: -1 }),
    'switch: coeff Infinity': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, coeff: Infinity }),
    'switch: numTokens 0': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, numTokens: 0 }),
    'switch: numTokens -2': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, numTokens: -2 }),
    'switch: mask of the wrong shape': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, tokenMask: d(tensor('bool', [3], [1, 1, 1])) }),
    'switch: mask byte 2': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, tokenMask: d(tensor('bool', [2], Uint8Array.from([1, 2]))) }),
    'switch: 1-d probs': (b, d) => b.switchLoadBalancingLoss(d(f32([3])), d(counts), { topk: 1 }),
    'switch: no experts': (b, d) => b.switchLoadBalancingLoss(d(f32([2, 0])), d(tensor('int32', [0], [])), { topk: 1 }),
    'switch: unknown option': (b, d) => b.switchLoadBalancingLoss(d(logits), d(counts), { topk: 1, coef: 1 }),
    'from logits: -Infinity': (b, d) => b.switchLoadBalancingLossFromLogits(d(f32([2, 3], [0, 1, 2, -Infinity, 0, 0])), d(counts), { topk: 1 }),
    'from logits: negative count': (b, d) => b.switchLoadBalancingLossFromLogits(d(logits), d(tensor('int32', [3], [0, 0, -1])), { topk: 2 }),
    'from logits: mask byte 3': (b, d) => b.switchLoadBalancingLossFromLogits(d(logits), d(counts), { topk: 1, tokenMask: d(tensor('bool', [2], Uint8Array.from([3, 1]))) }),
    'from logits: coeff NaN': (b, d) => b.switchLoadBalancingLossFromLogits(d(logits), d(counts), { topk: 1, coeff: NaN }),
    'from logits: NaN and a bad count (the first error wins)': (b, d) => b.switchLoadBalancingLossFromLogits(d(f32([1, 3], [0, NaN, 0])), d(tensor('int32', [3], [0, -1, 0])), { topk: 1 }),
    'zLoss: NaN': (b, d) => b.zLoss(d(f32([2, 3], [0, 1, 2, 3, NaN, 0]))),
    'zLoss: coeff -0.5': (b, d) => b.zLoss(d(logits), { coeff: -0.5 }),
    'zLoss: coeff a string': (b, d) => b.zLoss(d(logits), { coeff: '1' }),
    'zLoss: mask of the wrong shape': (b, d) => b.zLoss(d(logits), { tokenMask: d(tensor('bool', [1], [1])) }),
    'zLoss: mask byte 2': (b, d) => b.zLoss(d(logits), { tokenMask: d(tensor('bool', [2], Uint8Array.from([0, 2]))) }),
    'zLoss: int32 mask': (b, d) => b.zLoss(d(logits), { tokenMask: d(tensor('int32', [2], [1, 1])) }),
    'zLoss: no experts': (b, d) => b.zLoss(d(f32([3, 0]))),
  };
  for (const [name, f] of Object.entries(cases)) {
    test(name, { skip }, () => {
      const a = outcome(() => f(cuda, dev));
      const b = outcome(() => f(cpu, (t) => t));
      assert.ok(a.error && b.error, `both throw (cuda: ${a.error?.message ?? 'returned'}; cpu: ${b.error?.message ?? 'returned'})`);
      assert.equal(a.error.constructor.name, b.error.constructor.name, 'error class');
      assert.equal(a.error.message, b.error.message, 'message');
    });
  }

  // lazyLoss: a dtype/shape/option error at the call, a value error when `loss` is read; the same error either way
  const lazyCases = Object.entries(cases).filter(([name]) => /^(switch|from logits|zLoss):/.test(name));
  for (const [name, f] of lazyCases) {
    test(`lazyLoss: ${name}`, { skip: cudaOnly }, () => {
      const withLazy = (b, d) => {
        const wrap =
          (method) =>
          (...args) => {
            const last = args.length - 1;
            const hasOptions = typeof args[last] === 'object' && args[last] !== null && !('dtype' in args[last]);
            const a2 = hasOptions ? [...args.slice(0, last), { ...args[last], lazyLoss: true }] : [...args, { lazyLoss: true }];
            return b[method](...a2).loss;
          };
        return f({ switchLoadBalancingLoss: wrap('switchLoadBalancingLoss'), switchLoadBalancingLossFromLogits: wrap('switchLoadBalancingLossFromLogits'), zLoss: wrap('zLoss') }, d);
      };
      const a = outcome(() => withLazy(cuda, dev));
      const b = outcome(() => f(cpu, (t) => t));
      assert.ok(a.error && b.error, `both throw (cuda, lazy: ${a.error?.message ?? 'returned'}; cpu: ${b.error?.message ?? 'returned'})`);
      assert.equal(a.error.constructor.name, b.error.constructor.name, 'error class');
      assert.equal(a.error.message, b.error.message, 'message');
    });
  }

  test('lazyLoss: a value error is raised when loss is read, not by the call', { skip: cudaOnly }, () => {
    const nan = dev(f32([2, 3], [0, 1, 2, 3, NaN, 0]));
    const r = cuda.zLoss(nan, { lazyLoss: true });
    assert.ok(lib.isDeviceTensor(r.gradLogits), 'the call returns its gradient');
    const want = outcome(() => cpu.zLoss(f32([2, 3], [0, 1, 2, 3, NaN, 0])));
    const got = outcome(() => r.loss);
    assert.equal(got.error?.message, want.error.message);
    assert.equal(outcome(() => cuda.zLoss(dev(logits), { lazyLoss: 'yes' })).error?.message, 'zLoss: options.lazyLoss: expected a boolean, got string');
  });

  test('backendInfo lists the activations and losses among the GPU ops', { skip: cudaOnly }, () => {
    for (const op of ['activation', 'activationBackward', 'switchLoadBalancingLoss', 'switchLoadBalancingLossFromLogits', 'zLoss']) {
      assert.ok(cudaInfo.gpuOps.includes(op), `${op} in ${cudaInfo.gpuOps.join(', ')}`);
    }
  });
});
