/**
 * The 'cuda' backend as CI sees it. Where CUDA is unavailable (CI, the build machines): it is
 * reported with a reason that says why, `auto` does not pick it, and the GPU tests are skipped
 * with that reason in their titles. Where it runs: a quick equivalence check against 'cpu'.
 * The full GPU suite is test/gpu/cuda.test.mjs, run on the GPU machine by scripts/gpu-run.sh.
 */
import { describe, expect, it } from 'vitest';

import { backendInfo, createBackend, type Backend } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { bitsOf } from './util.js';

const info = (await backendInfo()).find((i) => i.name === 'cuda');
const available = info?.available === true;
const why = available ? '' : ` (skipped: CUDA unavailable: ${info?.reason})`;

describe('cuda backend', () => {
  it('backendInfo lists cuda, with a reason when it is unavailable', () => {
    expect(info, 'backendInfo() lists cuda').toBeDefined();
    if (!available) expect(info?.reason, 'a reason').toMatch(/\w{3,}/);
    else expect(info?.gpuOps).toEqual(['permute', 'unpermute']);
  });

  it.skipIf(available)('without CUDA, auto picks another backend and prefer cuda says why', async () => {
    expect((await createBackend()).name).not.toBe('cuda');
    await expect(createBackend({ prefer: 'cuda' })).rejects.toThrow(`cuda: ${info?.reason}`);
  });

  it.skipIf(!available)(`permute and unpermute match the cpu backend bit for bit${why}`, async () => {
    const cuda: Backend = await createBackend({ prefer: 'cuda' });
    const cpu: Backend = await createBackend({ prefer: 'cpu' });
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      const p = { numTokens: 257, numExperts: 16, topk: 4, hidden: 72, dtype };
      const r = randomRouting(p, rng(3), 0.1);
      const m = cpu.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const a = cuda.permute(r.tokens, m.routingMap, { probs: m.probs });
      const b = cpu.permute(r.tokens, m.routingMap, { probs: m.probs });
      expect(bitsOf(a.permutedTokens)).toEqual(bitsOf(b.permutedTokens));
      expect(bitsOf(a.permutedProbs!)).toEqual(bitsOf(b.permutedProbs!));
      const o = { probs: m.probs, routingMap: m.routingMap };
      expect(bitsOf(cuda.unpermute(a.permutedTokens, a.sortedIndices, [p.numTokens, p.hidden], o))).toEqual(bitsOf(cpu.unpermute(b.permutedTokens, b.sortedIndices, [p.numTokens, p.hidden], o)));
    }
  });
});
