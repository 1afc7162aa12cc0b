// The GPU suite, checkpoints: the cuda backend serves the checkpoint ops through the CPU core
// (host ops inherited), so a sharded checkpoint in memory, checkpointInfo, the key-scheme option
// and per-rank loads give the CPU backend's results, bit for bit, and the same bytesRead; device
// tensors given to unstackExperts are downloaded (and its results uploaded). Plain node:test.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertSameBits, cpu, cuda, cudaOnly, host, skip, tensor } from './common.mjs';

/** A sharded checkpoint of 4 GPT-OSS-keyed experts' halves and 4 per-expert (Mixtral) experts, over two shards. */
function checkpoint(moe) {
  const [e, dim, inter] = [4, 8, 4];
  const w = (n, s) => Float32Array.from({ length: n }, (_, i) => Math.fround(Math.sin(i * 0.37 + s)));
  const weights = { gateAndUpProjs: tensor('float32', [e, dim, 2 * inter], w(e * dim * 2 * inter, 1)), downProjs: tensor('float32', [e, inter, dim], w(e * inter * dim, 2)) };
  const biases = { gateUpProjBias: tensor('float32', [e, 2 * inter], w(e * 2 * inter, 3)), downProjBias: tensor('float32', [e, dim], w(e * dim, 4)) };
  const gptOss = moe.unstackExperts(weights, { prefix: 'a.experts', activation: 'swiglu', biases, format: 'gpt_oss' });
  const mixtral = moe.unstackExperts(weights, { prefix: 'b.experts', activation: 'swiglu', format: 'mixtral' });
  const second = Object.fromEntries(Object.entries(mixtral).filter(([n]) => Number(n.split('.')[2]) >= 2));
  const first = { ...gptOss, ...Object.fromEntries(Object.entries(mixtral).filter(([n]) => Number(n.split('.')[2]) < 2)) };
  const files = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'];
  const weight_map = {};
  for (const n of Object.keys(first)) weight_map[n] = files[0];
  for (const n of Object.keys(second)) weight_map[n] = files[1];
  return { weights, source: { index: { weight_map }, shards: { [files[0]]: moe.saveSafetensors(first), [files[1]]: moe.saveSafetensors(second) } } };
}

describe('checkpoints through the cuda backend (host ops, the CPU core)', () => {
  test('checkpointInfo, key schemes and per-rank loads across shards: the cpu results and bytesRead', { skip }, () => {
    const { weights, source } = checkpoint(cpu);
    assert.deepEqual(cuda.checkpointInfo(source), cpu.checkpointInfo(source));
    for (const [prefix, format] of [
      ['a.experts', 'gpt_oss'],
      ['b.experts', undefined],
    ]) {
      for (const [epSize, epRank] of [
        [1, 0],
        [2, 1],
        [4, 1],
      ]) {
        const opts = { prefix, numExperts: 4, activation: 'swiglu', epSize, epRank, ...(format ? { format } : {}) };
        const got = cuda.loadExperts(source, opts);
        const want = cpu.loadExperts(source, opts);
        const tag = `${prefix} ${epRank}/${epSize}`;
        assert.equal(got.format, format ?? 'mixtral', tag);
        assert.equal(got.bytesRead, want.bytesRead, tag);
        assertSameBits(host(got.gateAndUpProjs), want.gateAndUpProjs, `${tag} gateAndUpProjs`);
        assertSameBits(host(got.downProjs), want.downProjs, `${tag} downProjs`);
        const rows = (t, n) => Array.from(t.data.subarray(got.start * n, got.end * n));
        assert.deepEqual(Array.from(host(got.gateAndUpProjs).data), rows(weights.gateAndUpProjs, 8 * 8), tag);
      }
    }
  });

  test('unstackExperts on device tensors: downloaded, the core keys, uploaded back', { skip: cudaOnly }, () => {
    const { weights } = checkpoint(cpu);
    const dev = cuda.unstackExperts({ gateAndUpProjs: cuda.upload(weights.gateAndUpProjs), downProjs: cuda.upload(weights.downProjs) }, { prefix: 'x', activation: 'swiglu', format: 'hf_fused' });
    const want = cpu.unstackExperts(weights, { prefix: 'x', activation: 'swiglu', format: 'hf_fused' });
    assert.deepEqual(Object.keys(dev).sort(), Object.keys(want).sort());
    for (const k of Object.keys(want)) assertSameBits(host(dev[k]), want[k], k);
  });
});
