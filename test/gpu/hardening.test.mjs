// The GPU suite, hardening: every op of the cuda backend given a disposed device tensor throws a
// TypeError that says so (never a crash), and every GPU op's output, hashed, is the same over 100
// runs on device tensors. Plain node:test, no node_modules.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';

import { bytesOf, cpu, cuda, cudaInfo, cudaOnly, host, lib, randomRouting, rng, tensor } from './common.mjs';

/** Ops that take no tensor (numbers, shapes, meshes, file sources, a function to record). */
const NO_TENSOR = new Set([
  'expertsGatherOnLoad',
  'timeline',
  'getCapacity',
  'expertRangeForRank',
  'shouldLoadExpert',
  'expertPlacements',
  'splitPlacements',
  'loadSafetensors',
  'checkpointInfo',
  'loadExperts',
  'numThreads',
  'releaseCachedMemory',
  'optimizerState',
  'zeros',
  'transfers',
  'peakMemory',
]);

describe('disposed device tensors: a TypeError from every op', () => {
  test('every op', { skip: cudaOnly }, () => {
    const ops = Object.keys(cuda).filter((k) => typeof cuda[k] === 'function' && !['upload', 'synchronize', 'memory'].includes(k) && !NO_TENSOR.has(k));
    for (const op of ['permute', 'route', 'activation', 'dropTokens', 'expertsForward', 'saveSafetensors', 'splitExpertWeights']) assert.ok(ops.includes(op), `${op} in ${ops.join(', ')}`);
    let tried = 0;
    for (const op of ops) {
      const dead = cuda.upload(tensor('float32', [4, 4]));
      dead.dispose();
      // the disposed tensor in every tensor position, with the options most ops need
      const record = { a: dead };
      const w = { gateAndUpProjs: dead, downProjs: dead };
      const argLists = [
        [dead],
        [dead, dead],
        [dead, dead, dead],
        [dead, 2],
        [dead, { topk: 2 }],
        [dead, { kind: 'swiglu' }],
        [dead, dead, { kind: 'swiglu' }],
        [dead, dead, { topk: 2, capacityFactor: 1 }],
        [dead, dead, { numLocalExperts: 4 }],
        [dead, dead, [4, 4]],
        [dead, dead, 4],
        [dead, 4, 2, 0],
        [dead, dead, w, { activation: 'swiglu' }],
        [dead, dead, dead, w, { activation: 'swiglu' }],
        [record, { prefix: '', numExperts: 4 }],
        [w, { prefix: '' }],
        [{ params: [{ name: 'w', master: dead, expAvg: dead, expAvgSq: dead, grad: dead, decay: true }], state: dead, lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0 }],
      ];
      let sawDisposed = false;
      for (const args of argLists) {
        tried++;
        try {
          cuda[op](...args);
        } catch (e) {
          assert.ok(e instanceof TypeError || e instanceof RangeError, `${op}: ${e?.constructor?.name}: ${e?.message}`);
          assert.ok(e.message.startsWith(`${op}:`), `${op}: the error names the op: ${e.message}`);
          if (/dispose/.test(e.message)) sawDisposed = true;
        }
      }
      assert.ok(sawDisposed, `${op}: no call said the tensor was disposed`);
    }
    console.log(`# disposed tensors: ${tried} calls over ${ops.length} ops, every one a typed error`);
  });
});

function sha(value) {
  const h = createHash('sha256');
  const walk = (v) => {
    if (v === null || v === undefined) return;
    if (lib.isDeviceTensor(v) || (typeof v === 'object' && 'dtype' in v && 'data' in v)) {
      const t = host(v);
      h.update(`${t.dtype}[${t.shape}]`);
      h.update(bytesOf(t));
      return;
    }
    if (typeof v === 'number') return h.update(String(Object.is(v, -0) ? '-0' : v));
    for (const k of Object.keys(v).sort()) {
      h.update(k);
      walk(v[k]);
    }
  };
  walk(value);
  return h.digest('hex');
}

describe('determinism: every GPU op, 100 runs on device tensors, one hash', () => {
  test('hashes constant over 100 runs', { skip: cudaOnly }, () => {
    const r = rng(77);
    const p = { numTokens: 512, numExperts: 16, topk: 4, hidden: 256, dtype: 'bfloat16' };
    const routing = randomRouting(p, r, 0.05);
    const up = (t) => cuda.upload(t);
    const m = cpu.indicesToMultihot(routing.indices, routing.weights, 16);
    const [tokens, map, probs, idx, w] = [up(routing.tokens), up(m.routingMap), up(m.probs), up(tensor('int32', [512, 4], Int32Array.from(routing.indices.data))), up(routing.weights)];
    const logits = up(
      tensor(
        'float32',
        [512, 16],
        Float32Array.from({ length: 512 * 16 }, () => r() * 6 - 3),
      ),
    );
    const perm = cuda.permute(tokens, map, { probs });
    const counts = cuda.tokensPerExpert(map);
    const x = up(tensor('bfloat16', [2048, 64], perm.permutedTokens.download().data.slice(0, 2048 * 64)));
    const weights = {
      gateAndUpProjs: up(
        tensor(
          'bfloat16',
          [16, 256, 64],
          Uint16Array.from({ length: 16 * 256 * 64 }, () => lib.toBFloat16Bits((r() - 0.5) / 16)),
        ),
      ),
      downProjs: up(
        tensor(
          'bfloat16',
          [16, 32, 256],
          Uint16Array.from({ length: 16 * 32 * 256 }, () => lib.toBFloat16Bits((r() - 0.5) / 6)),
        ),
      ),
    };
    const ops = {
      permute: () => cuda.permute(tokens, map, { probs }),
      unpermute: () => cuda.unpermute(perm.permutedTokens, perm.sortedIndices, [512, 256], { probs: perm.permutedProbs }),
      permuteBackward: () => cuda.permuteBackward(perm.permutedTokens, perm.sortedIndices, 512, { gradPermutedProbs: perm.permutedProbs, routingMap: map }),
      unpermuteBackward: () => cuda.unpermuteBackward(tokens, perm.permutedTokens, perm.sortedIndices, { probs: perm.permutedProbs }),
      route: () => cuda.route(logits, { topk: 4, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 2, normTopkProb: true }),
      topk: () => cuda.topk(logits, 4),
      activation: () =>
        cuda.activation(x, {
          kind: 'swiglu',
          probs: up(
            tensor(
              'float32',
              [2048],
              Float32Array.from({ length: 2048 }, (_, i) => (i % 7) / 7),
            ),
          ),
        }),
      activationBackward: () => cuda.activationBackward(up(tensor('bfloat16', [2048, 32], x.download().data.slice(0, 2048 * 32))), x, { kind: 'quick_geglu' }),
      switchLoadBalancingLoss: () => cuda.switchLoadBalancingLoss(probs, counts, { topk: 4 }),
      zLoss: () => cuda.zLoss(logits, { coeff: 1e-3 }),
      indicesToMultihot: () => cuda.indicesToMultihot(idx, w, 16),
      multihotToIndices: () => cuda.multihotToIndices(map, { probs }),
      dropTokens: () => cuda.dropTokens(probs, map, { topk: 4, capacityFactor: 1 }),
      groupedMmSort: () => cuda.groupedMmSort(idx, w, { numLocalExperts: 8, expertsStartIdx: 4 }),
      expertsForward: () => cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { activation: 'swiglu', permutedProbs: perm.permutedProbs }),
      expertsBackward: () => cuda.expertsBackward(perm.permutedTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { activation: 'swiglu', permutedProbs: perm.permutedProbs }),
      matmul: () =>
        cuda.matmul(
          x,
          weights.downProjs.download().data.length
            ? up(
                tensor(
                  'bfloat16',
                  [64, 48],
                  Uint16Array.from({ length: 64 * 48 }, (_, i) => lib.toBFloat16Bits(((i % 13) - 6) / 8)),
                ),
              )
            : x,
        ),
    };
    const gpuOps = new Set(cudaInfo.gpuOps);
    for (const [name, f] of Object.entries(ops)) {
      assert.ok(gpuOps.has(name), `${name} runs on the GPU`);
      const first = sha(f());
      for (let i = 1; i < 100; i++) assert.equal(sha(f()), first, `${name}: run ${i} differs from run 0`);
    }
    console.log(`# determinism: ${Object.keys(ops).length} GPU ops x 100 runs, one hash each`);
  });
});
