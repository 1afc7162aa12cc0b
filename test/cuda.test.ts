/**
 * The 'cuda' backend as CI sees it. Where CUDA is unavailable (CI, the build machines): it is
 * reported with a reason that says why, `auto` does not pick it, and the GPU tests are skipped
 * with that reason in their titles. Where it runs: a quick equivalence check against 'cpu'.
 * The full GPU suite is test/gpu/cuda.test.mjs, run on the GPU machine by scripts/gpu-run.sh.
 */
import { describe, expect, it } from 'vitest';

import { loadNative } from '../ts/backends/native.js';
import { backendInfo, createBackend, type Backend } from '../ts/index.js';
import { randomRouting, rng } from '../ts/random.js';
import { wire } from '../ts/wire.js';
import { tensor } from '../ts/tensor.js';
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

  // The addon's cuda functions take the CPU ops' argument objects and read them (the op table's
  // kinds and groups) before they open the GPU (crates/moe-node/src/cuda*.rs): so here, without
  // one, an argument they cannot read gives the CPU op's error (class and words), and readable
  // ones say that CUDA is unavailable (the core's checks of shapes and values come after).
  it.skipIf(available)("without CUDA, the addon's cuda functions read the CPU ops' argument objects and report their errors", () => {
    const addon = loadNative().binding as unknown as Record<string, (args: unknown) => unknown>;
    const failure = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        return { code: (e as { code?: string }).code, message: (e as Error).message };
      }
      throw new Error('expected an error');
    };
    const x = wire(tensor('float32', [2, 4], new Float32Array(8)), 'x');
    const map = wire(tensor('bool', [2, 3], new Uint8Array([1, 0, 1, 0, 1, 0])), 'routingMap');
    const bad: [string, string, Record<string, unknown>][] = [
      ['cudaPermute', 'permute', { tokens: x, routingMap: map, numOutTokens: 2.5 }],
      ['cudaPermute', 'permute', { tokens: x, routingMap: { ...map, dtype: 'int8' } }],
      ['cudaUnpermute', 'unpermute', { restoreShape: 'x', permutedTokens: x, sortedIndices: map }],
      ['cudaRoute', 'route', { logits: x, topk: 1.5 }],
      ['cudaRoute', 'route', { logits: x, topk: 1, scoreFunction: 'tanh' }],
      ['cudaTopk', 'topk', { values: x, k: -1 }],
    ];
    for (const [gpu, cpu, args] of bad)
      expect(
        failure(() => addon[gpu](args)),
        `${gpu} ${JSON.stringify(Object.keys(args))}`,
      ).toEqual(failure(() => addon[cpu](args)));
    // the device functions read the same groups (options first, as the CPU ops), then device tensors (a host one is refused)
    expect(failure(() => addon.cudaActivationDevice({ kind: 5, x }))).toEqual(failure(() => addon.activation({ kind: 5, x })));
    expect(failure(() => addon.cudaDropTokensDevice({ topk: 1, capacityFactor: 1, dropPolicy: 5, probs: x, routingMap: map }))).toEqual(
      failure(() => addon.dropTokens({ topk: 1, capacityFactor: 1, dropPolicy: 5, probs: x, routingMap: map })),
    );
    expect(failure(() => addon.cudaActivationDevice({ kind: 'swiglu', x }))).toEqual({ code: 'TypeError', message: 'x: expected a device tensor (upload()), got another kind of value' });
    expect(failure(() => addon.cudaExpertsForwardDevice({ kind: 'swiglu' }))).toEqual({ code: 'TypeError', message: 'permutedTokens: expected NativeCudaTensor (required), got undefined' });
    // right arguments: the GPU is opened, and is not there
    expect(failure(() => addon.cudaTopk({ values: x, k: 1 }))).toMatchObject({ code: 'Error', message: expect.stringMatching(/^CUDA is unavailable: /) });
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
