// The GPU suite, concurrency: createAsyncBackend({ prefer: 'cuda' }) runs host-tensor calls on
// worker threads that share the process's GPU; 96 calls in flight at once must give exactly the
// synchronous cuda backend's results (bit for bit). Plain node:test, no node_modules.
import { after, before, describe, test } from 'node:test';

import { assertSameResult, cuda, lib, randomRouting, rng, skip, standIn, tensor } from './common.mjs';

describe('async cuda backend: concurrent calls == sequential calls', () => {
  let moe;
  before(async () => {
    if (!skip) moe = await lib.createAsyncBackend({ prefer: standIn ?? 'cuda', threads: 4 });
  });
  after(async () => moe?.close());

  test('96 calls in flight', { skip }, async () => {
    const r = rng(21);
    const list = [];
    for (let i = 0; i < 16; i++) {
      const p = { numTokens: [5, 300, 2048][i % 3], numExperts: [8, 64][i % 2], topk: 4, hidden: [16, 512][(i >> 1) % 2], dtype: ['float32', 'bfloat16'][i % 2] };
      const routing = randomRouting(p, r, 0.1);
      const m = cuda.indicesToMultihot(routing.indices, routing.weights, p.numExperts);
      const perm = cuda.permute(routing.tokens, m.routingMap, { probs: m.probs });
      const logits = tensor(
        'float32',
        [p.numTokens, p.numExperts],
        Float32Array.from({ length: p.numTokens * p.numExperts }, () => r() * 6 - 3),
      );
      list.push(['permute', [routing.tokens, m.routingMap, { probs: m.probs }]]);
      list.push(['unpermute', [perm.permutedTokens, perm.sortedIndices, [p.numTokens, p.hidden], { probs: perm.permutedProbs }]]);
      list.push(['route', [logits, { topk: 4, scoreFunction: 'sigmoid', numGroups: 4, topkGroups: 2 }]]);
      list.push(['topk', [logits, 3]]);
      list.push(['permuteBackward', [perm.permutedTokens, perm.sortedIndices, p.numTokens]]);
      list.push(['activation', [tensor(p.dtype, [p.numTokens, p.hidden], perm.permutedTokens.data.slice(0, p.numTokens * p.hidden)), { kind: 'swiglu' }]]);
    }
    const want = list.map(([op, args]) => cuda[op](...args));
    const got = await Promise.all(list.map(([op, args]) => moe[op](...args)));
    got.forEach((g, i) => {
      assertSameResult(g.dtype ? { out: g } : g, want[i].dtype ? { out: want[i] } : want[i], `${list[i][0]} #${i}`);
    });
  });
});
