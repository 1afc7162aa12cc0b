/**
 * createAsyncBackend: many calls in flight at once, on worker threads, give exactly the
 * synchronous backend's results (bit for bit), whatever order they finish in; errors keep their
 * class and message; closing rejects what is pending.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createAsyncBackend, createBackend, tensor, type AsyncBackend, type Backend, type Tensor } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { backendNamed, CPU_BACKENDS } from './backends.js';
import { bitsOf } from './util.js';

type Call = [op: string, args: unknown[]];

/** A mix of ops on random problems of several sizes (some large enough to use the core's threads). */
function calls(seed: number, sync: Backend): Call[] {
  const out: Call[] = [];
  const r = rng(seed);
  for (let i = 0; i < 24; i++) {
    const p = { numTokens: [3, 64, 700][i % 3], numExperts: [4, 16][i % 2], topk: 2, hidden: [8, 96][(i >> 1) % 2], dtype: (['float32', 'bfloat16', 'float16'] as const)[i % 3] };
    const routing = randomRouting(p, r, 0.1);
    const m = sync.indicesToMultihot(routing.indices, routing.weights, p.numExperts);
    const perm = sync.permute(routing.tokens, m.routingMap, { probs: m.probs });
    const logits = tensor(
      'float32',
      [p.numTokens, p.numExperts],
      Float32Array.from({ length: p.numTokens * p.numExperts }, () => r() * 6 - 3),
    );
    out.push(['permute', [routing.tokens, m.routingMap, { probs: m.probs }]]);
    out.push(['unpermute', [perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], { probs: perm.permutedProbs }]]);
    out.push(['route', [logits, { topk: 2, scoreFunction: i % 2 ? 'sigmoid' : 'softmax' }]]);
    out.push(['activation', [tensor(p.dtype, [p.numTokens, p.hidden], perm.permutedTokens.data.slice(0, p.numTokens * p.hidden) as never), { kind: 'swiglu' }]]);
    out.push(['dropTokens', [m.probs, m.routingMap, { topk: 2, capacityFactor: 1 }]]);
  }
  return out;
}

/** Every tensor of a result as bits, everything else as is. */
function canonical(value: unknown): unknown {
  if (typeof value !== 'object' || value === null) return value;
  if ('dtype' in value && 'data' in value) return { dtype: (value as Tensor).dtype, shape: [...(value as Tensor).shape], bits: bitsOf(value as Tensor) };
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, canonical(v)]));
}

describe.each(CPU_BACKENDS.filter((n) => backendNamed(n)))('%s: async calls == sequential calls', (name) => {
  let moe: AsyncBackend;
  let sync: Backend;
  beforeAll(async () => {
    sync = await createBackend({ prefer: name });
    moe = await createAsyncBackend({ prefer: name, threads: 3 });
  });
  afterAll(async () => {
    await moe?.close();
  });

  it('reports its backend and threads', () => {
    expect(moe.name).toBe(name);
    expect(moe.threads).toBe(3);
  });

  it('120 calls in flight at once give the synchronous results, bit for bit', async () => {
    const list = calls(11, sync);
    const want = list.map(([op, args]) => canonical((sync as unknown as Record<string, (...a: unknown[]) => unknown>)[op](...args)));
    const promises = list.map(([op, args]) => (moe as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>)[op](...args));
    expect(moe.pending).toBeGreaterThan(0);
    const got = await Promise.all(promises);
    expect(got.map(canonical)).toEqual(want);
    expect(moe.pending).toBe(0);
  });

  it('errors keep their class and message, and do not disturb the other calls', async () => {
    const good = moe.topk(tensor('float32', [2, 3], [1, 3, 2, 0, -1, 5]), 2);
    await expect(moe.topk(tensor('float32', [2, 3]), 4)).rejects.toThrow(RangeError);
    await expect(moe.permute(tensor('float32', [2, 2]), tensor('float32', [2, 2]))).rejects.toThrow(new TypeError('permute: routingMap.dtype: expected bool, got float32'));
    await expect((moe as unknown as Record<string, () => Promise<unknown>>).noSuchOp()).rejects.toThrow(TypeError);
    expect(canonical(await good)).toEqual(canonical(sync.topk(tensor('float32', [2, 3], [1, 3, 2, 0, -1, 5]), 2)));
  });

  it('arguments that cannot be sent to a worker are a TypeError', async () => {
    await expect(moe.topk(tensor('float32', [1, 2]), (() => 1) as never)).rejects.toThrow(/cannot be sent to a worker/);
  });
});

describe('createAsyncBackend options and close()', () => {
  it('rejects bad options', async () => {
    await expect(createAsyncBackend({ threads: 0 })).rejects.toThrow(RangeError);
    await expect(createAsyncBackend(null as never)).rejects.toThrow(TypeError);
    await expect(createAsyncBackend({ prefer: 'tpu' as never, threads: 1 })).rejects.toThrow(/prefer/);
  });

  it('close() rejects pending calls and later calls', async () => {
    const moe = await createAsyncBackend({ prefer: 'wasm', threads: 1 });
    const big = randomRouting({ numTokens: 2048, numExperts: 8, topk: 2, hidden: 256, dtype: 'float32' }, rng(5), 0);
    const pending = moe.indicesToMultihot(big.indices, big.weights, 8);
    const rejected = expect(pending).rejects.toThrow(/closed/);
    await moe.close();
    await rejected;
    await expect(moe.topk(tensor('float32', [1, 2]), 1)).rejects.toThrow(/closed/);
  });
});
