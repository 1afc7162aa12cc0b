/**
 * Determinism: every op's output, hashed (SHA-256 over dtypes, shapes, raw bytes and numbers)
 * over 100 runs of the same input, is one hash, on every CPU backend. Two sizes: the small
 * template call of every Backend method (test/boundary-cases.mjs, so a new op is covered
 * automatically), and large inputs (above the 1 MiB threshold at which the native backend
 * splits work across threads) for the ops with parallel loops.
 */
import { createHash, type Hash } from 'node:crypto';

import { describe, expect, it } from 'vitest';

import { tensor, type Backend, type Tensor } from '../ts/index.js';
import { cpuBackends, registerBackendReport } from './backends.js';
// @ts-expect-error: plain JavaScript shared with the boundary fuzz child, no declarations
import { TEMPLATES } from './boundary-cases.mjs';
import { rng } from './util.js';

const RUNS = 100;

function feed(h: Hash, v: unknown): void {
  if (v === null || v === undefined) h.update(`<${String(v)}>`);
  else if (typeof v === 'number')
    h.update(`n${Object.is(v, -0) ? '-0' : String(v)}`); // String keeps every double exactly (NaN too)
  else if (typeof v === 'string' || typeof v === 'boolean') h.update(`${typeof v}:${JSON.stringify(v)}`);
  else if (ArrayBuffer.isView(v)) h.update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
  else if (Array.isArray(v)) {
    h.update(`[${v.length}`);
    for (const x of v) feed(h, x);
    h.update(']');
  } else if (typeof v === 'object') {
    for (const k of Object.keys(v as object).sort()) {
      h.update(`{${k}:`);
      feed(h, (v as Record<string, unknown>)[k]);
    }
  } else throw new Error(`cannot hash a ${typeof v}`);
}

const hashOf = (v: unknown): string => {
  const h = createHash('sha256');
  feed(h, v);
  return h.digest('hex');
};

/** Total bytes of tensor data in a result (to check that large cases are large). */
function dataBytes(v: unknown): number {
  if (ArrayBuffer.isView(v)) return v.byteLength;
  if (typeof v !== 'object' || v === null) return 0;
  return Object.values(v).reduce((s: number, x) => s + dataBytes(x), 0);
}

// ---- large inputs
const T = 1024;
const E = 16;
const K = 4;
const H = 128;
const r = rng(99);
const f32 = (shape: number[], scale = 1) =>
  tensor(
    'float32',
    shape,
    Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => (r() * 2 - 1) * scale),
  );
const logits = f32([T, E], 3);
const tokens = f32([T, H]);
const bf16Tokens = tensor(
  'bfloat16',
  [T, H],
  Uint16Array.from(tokens.data, (x) => (new Uint32Array(Float32Array.of(x).buffer)[0] >>> 16) & 0xffff),
);
// routeBackward above the parallel threshold (its loop touches about 16 bytes a logit)
const bigLogits = f32([16 * T, E], 3);
const bigGradWeights = f32([16 * T, K]);

interface LargeCase {
  op: string;
  run: (b: Backend) => unknown;
}

function largeCases(b: Backend): LargeCase[] {
  // Inputs derived once per backend (the routing itself is checked below as a case too).
  const routed = b.route(logits, { topk: K, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 2, normTopkProb: true });
  const { routingMap, probs } = b.indicesToMultihot(routed.indices, routed.weights, E);
  const perm = b.permute(tokens, routingMap, { probs });
  const N = perm.sortedIndices.shape[0];
  const x = f32([N, 2 * 64]);
  const weights = { gateAndUpProjs: f32([E, H, 2 * 64], 0.05), downProjs: f32([E, 64, H], 0.05) };
  const eopts = { activation: 'swiglu' as const, permutedProbs: perm.permutedProbs };
  const gradY = f32([N, H]);
  const gradH = f32([N, 64]);
  const b2 = f32([H, 128]);
  const splitSizes = tensor('int32', [E], perm.tokensPerExpert.data);
  const gradWeights = f32([T, K]);
  const bigIndices = b.route(bigLogits, { topk: K }).indices;
  const order = tensor(
    'int32',
    [E],
    Int32Array.from({ length: E }, (_, i) => (i * 5) % E),
  );
  return [
    { op: 'route (sigmoid, groups, normTopkProb)', run: (b) => b.route(logits, { topk: K, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 2, normTopkProb: true }) },
    { op: 'route (softmax)', run: (b) => b.route(logits, { topk: K }) },
    {
      op: 'routeBackward (sigmoid, groups, normTopkProb, gradScores)',
      run: (b) => b.routeBackward(gradWeights, logits, routed.indices, { topk: K, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 2, normTopkProb: true, gradScores: logits }),
    },
    { op: 'routeBackward (softmax, 16k tokens)', run: (b) => b.routeBackward(bigGradWeights, bigLogits, bigIndices, { topk: K }) },
    { op: 'topk', run: (b) => b.topk(probs, K) },
    { op: 'indicesToMultihot', run: (b) => b.indicesToMultihot(routed.indices, routed.weights, E) },
    { op: 'permute float32', run: (b) => b.permute(tokens, routingMap, { probs }) },
    { op: 'permute bfloat16 dropAndPad', run: (b) => b.permute(bf16Tokens, routingMap, { probs, dropAndPad: true, numOutTokens: E * 200 }) },
    { op: 'unpermute (per-slot probs)', run: (b) => b.unpermute(perm.permutedTokens, perm.sortedIndices, [T, H], { probs: perm.permutedProbs }) },
    { op: 'unpermute (dense probs)', run: (b) => b.unpermute(perm.permutedTokens, perm.sortedIndices, [T, H], { probs, routingMap }) },
    { op: 'permuteBackward', run: (b) => b.permuteBackward(perm.permutedTokens, perm.sortedIndices, T, { gradPermutedProbs: perm.permutedProbs, routingMap }) },
    { op: 'unpermuteBackward', run: (b) => b.unpermuteBackward(tokens, perm.permutedTokens, perm.sortedIndices, { probs: perm.permutedProbs }) },
    { op: 'activation swiglu', run: (b) => b.activation(x, { kind: 'swiglu', probs: perm.permutedProbs }) },
    { op: 'activationBackward quick_geglu', run: (b) => b.activationBackward(gradH, x, { kind: 'quick_geglu', probs: perm.permutedProbs }) },
    { op: 'matmul', run: (b) => b.matmul(tokens, b2) },
    { op: 'expertsForward', run: (b) => b.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, eopts) },
    { op: 'expertsBackward', run: (b) => b.expertsBackward(gradY, perm.permutedTokens, perm.tokensPerExpert, weights, eopts) },
    { op: 'dropTokens', run: (b) => b.dropTokens(probs, routingMap, { topk: K, capacityFactor: 1, dropPolicy: 'probs' }) },
    { op: 'sortChunksByIndex', run: (b) => b.sortChunksByIndex(perm.permutedTokens, splitSizes, order, perm.permutedProbs) },
    { op: 'switchLoadBalancingLossFromLogits', run: (b) => b.switchLoadBalancingLossFromLogits(logits, routed.tokensPerExpert, { topk: K, coeff: 0.01 }) },
    { op: 'zLoss', run: (b) => b.zLoss(logits, { coeff: 1e-3 }) },
    { op: 'groupedMmSort', run: (b) => b.groupedMmSort(routed.indices, routed.weights, { numLocalExperts: 8, expertsStartIdx: 4 }) },
  ].map((c) => ({ ...c, run: () => c.run(b) }));
}

registerBackendReport();

function expectConstant(run: () => unknown, what: string): unknown {
  const first = run();
  const want = hashOf(first);
  const hashes = new Set([want]);
  for (let i = 1; i < RUNS; i++) hashes.add(hashOf(run()));
  expect([...hashes], `${what}: ${hashes.size} distinct hashes over ${RUNS} runs`).toEqual([want]);
  return first;
}

describe.each(cpuBackends.map((b) => [b.name, b] as const))('determinism on %s', (name, backend) => {
  it(`every method's template call hashes the same over ${RUNS} runs`, () => {
    const methods = Object.keys(backend).filter((k) => typeof (backend as unknown as Record<string, unknown>)[k] === 'function');
    expect(
      methods.filter((m) => !(m in TEMPLATES)),
      'methods without a template',
    ).toEqual([]);
    for (const m of methods) {
      const f = (backend as unknown as Record<string, (...a: unknown[]) => unknown>)[m];
      expectConstant(() => f(...(TEMPLATES as Record<string, () => unknown[]>)[m]()), m);
    }
  });

  it(`large inputs (multi-threaded on the native backend: ${backend.threads} threads) hash the same over ${RUNS} runs`, () => {
    const cases = largeCases(backend);
    for (const c of cases) {
      const first = expectConstant(c.run, c.op);
      expect(dataBytes(first), `${c.op}: output bytes`).toBeGreaterThan(0);
    }
    // the big ops really are above the native backend's 1 MiB parallel threshold
    expect(dataBytes(cases.find((c) => c.op === 'permute float32')!.run())).toBeGreaterThan(1 << 20);
    if (name === 'cpu') expect(backend.threads).toBeGreaterThanOrEqual(1);
  });
});

it('the hash sees a one-bit change (so a constant hash means identical outputs)', () => {
  const a: Tensor = tensor('float32', [2], [1, 2]);
  const b: Tensor = tensor('float32', [2], Float32Array.from([1, 2]));
  expect(hashOf(a)).toBe(hashOf(b));
  new Uint32Array(b.data.buffer)[1] ^= 1;
  expect(hashOf(a)).not.toBe(hashOf(b));
  expect(hashOf({ loss: 0 })).not.toBe(hashOf({ loss: -0 }));
});
