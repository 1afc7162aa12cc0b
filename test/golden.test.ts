/**
 * Equivalence with the reference implementation: every case of the golden files
 * (`test/fixtures/golden/<op>.json`, produced by PyTorch running the reference code) on every
 * available backend. The table below has one entry per op and variant; the backends come
 * from ./backends.ts, so a new backend or a new golden case adds tests without new code.
 *
 * Tolerances (spec): indices, maps, sortedIndices, counts: exact; permute: bit-exact; probs
 * picked by permute: exact; unpermute: float32 within 1e-6 relative, bfloat16 within 1 ulp.
 */
import { describe, expect, it } from 'vitest';

import { toBFloat16Bits, type Backend, type Tensor } from '../ts/index.js';
import { backendRows, registerBackendReport } from './backends.js';
import { expectExact, expectMerged, input, loadGolden, output, toTensor, type GoldenCase, type GoldenFile, type GoldenTensor } from './golden-loader.js';
import { bf16Value, expectF32Bits, expectSameBits, expectValues, f16Bits, f16Value } from './util.js';

/** Cases each golden file held when this suite was written; fewer means a truncated file. */
const MIN_CASES = { indices_to_multihot: 5, permute: 20, unpermute: 10 } as const;
type Op = keyof typeof MIN_CASES;
const OPS = Object.keys(MIN_CASES) as Op[];

const golden = Object.fromEntries(OPS.map((op) => [op, loadGolden(op)])) as Record<Op, { file?: GoldenFile; error?: string }>;
const casesOf = (op: Op): GoldenCase[] => golden[op].file?.cases ?? [];

// ---------------------------------------------------------------------------------------
// The table: per op, the variants each golden case runs as.

interface Variant {
  variant: string;
  run: (b: Backend, c: GoldenCase) => void;
}

const VARIANTS: Record<Op, Variant[]> = {
  indices_to_multihot: (['int64', 'int32'] as const).map((idx) => ({
    variant: `${idx} indices`,
    run: (b, c) => {
      const numExperts = c.params.num_experts as number;
      const out = b.indicesToMultihot(toTensor(input(c, 'indices'), idx) as Tensor<typeof idx>, toTensor(input(c, 'probs')) as Tensor<'float32'>, numExperts);
      expectExact(out.routingMap, output(c, 'routing_map'), 'routingMap');
      expectExact(out.probs, output(c, 'probs'), 'probs');
    },
  })),

  permute: [true, false].map((withProbs) => ({
    variant: withProbs ? 'with probs' : 'without probs',
    run: (b, c) => {
      const map = input(c, 'routing_map');
      const [numTokens, numExperts] = map.shape;
      const dropAndPad = c.params.drop_and_pad === true;
      const options: Parameters<Backend['permute']>[2] = {};
      if (withProbs) options.probs = toTensor(input(c, 'probs')) as Tensor<'float32'>;
      if (dropAndPad) Object.assign(options, { dropAndPad: true, numOutTokens: c.params.num_out_tokens as number });
      const out = b.permute(toTensor(input(c, 'tokens')) as Tensor<'float32'>, toTensor(map) as Tensor<'bool'>, options);

      expectExact(out.permutedTokens, output(c, 'permuted_tokens'), 'permutedTokens');
      expectExact(out.sortedIndices, output(c, 'sorted_indices'), 'sortedIndices', 'int32');
      if (withProbs) {
        expect(out.permutedProbs, 'permutedProbs').toBeDefined();
        expectExact(out.permutedProbs!, output(c, 'permuted_probs'), 'permutedProbs');
      } else {
        expect('permutedProbs' in out, 'permutedProbs without probs').toBe(false);
      }
      // Not in the golden file, but implied by it: slots per expert.
      const perExpert = dropAndPad
        ? Array(numExperts).fill((c.params.num_out_tokens as number) / numExperts)
        : Array.from({ length: numExperts }, (_, e) => map.data.filter((v, i) => v && i % numExperts === e).length);
      expectValues(out.tokensPerExpert, 'int32', [numExperts], perExpert, 'tokensPerExpert');
      expect(numTokens, 'golden routing map rows').toBe(input(c, 'tokens').shape[0]);
    },
  })),

  unpermute: (['int64', 'int32'] as const).flatMap((idx) =>
    [true, false].map((withProbs) => ({
      variant: `${withProbs ? 'probs + routingMap' : 'no probs'}, ${idx} sortedIndices`,
      run: (b: Backend, c: GoldenCase) => {
        const want = output(c, withProbs ? 'tokens' : 'tokens_without_probs');
        const restoreShape = [want.shape[0], want.shape[1]] as const;
        const options: Parameters<Backend['unpermute']>[3] = {};
        if (withProbs) Object.assign(options, { probs: toTensor(input(c, 'probs')), routingMap: toTensor(input(c, 'routing_map')) });
        if (c.params.drop_and_pad === true) options.dropAndPad = true;
        const sorted = toTensor(input(c, 'sorted_indices'), idx) as Tensor<typeof idx>;
        const permuted = toTensor(input(c, 'permuted_tokens')) as Tensor<'float32'>;
        const out = Object.keys(options).length ? b.unpermute(permuted, sorted, restoreShape, options) : b.unpermute(permuted, sorted, restoreShape);
        expectMerged(out, want, withProbs ? 'tokens' : 'tokens_without_probs');
      },
    })),
  ),
};

// ---------------------------------------------------------------------------------------

registerBackendReport();

describe('golden files', () => {
  it.each(OPS)('%s.json is present, well formed and complete', (op) => {
    const { file, error } = golden[op];
    if (error) throw new Error(error);
    expect(file!.op).toBe(op);
    expect(file!.cases.length, `${op}: number of cases`).toBeGreaterThanOrEqual(MIN_CASES[op]);
    const names = file!.cases.map((c) => c.name);
    expect(new Set(names).size, `${op}: case names are unique`).toBe(names.length);
  });

  it('bfloat16 golden values are exactly representable (so toBFloat16Bits is lossless here)', () => {
    const bad: string[] = [];
    for (const op of OPS) {
      for (const c of casesOf(op)) {
        for (const [key, t] of [...Object.entries(c.inputs), ...Object.entries(c.outputs)]) {
          if (t?.dtype === 'bf16')
            t.data.forEach((v, i) => {
              if (bf16Value(toBFloat16Bits(v)) !== v) bad.push(`${op}/${c.name}/${key}[${i}] = ${v}`);
            });
          if (t?.dtype === 'f16')
            t.data.forEach((v, i) => {
              if (f16Value(f16Bits(v)) !== v) bad.push(`${op}/${c.name}/${key}[${i}] = ${v}`);
            });
        }
      }
    }
    expect(bad.slice(0, 10)).toEqual([]);
  });
});

const rows = OPS.flatMap((op) => casesOf(op).flatMap((c) => VARIANTS[op].map((v) => ({ title: `${op} / ${c.name} / ${v.variant}`, c, run: v.run }))));

describe.each(backendRows)('golden equivalence on %s', (_name, backend) => {
  for (const { title, c, run } of rows) {
    it(title, () => {
      run(backend, c);
      // Twice: a backend must keep no state between calls (a reused output buffer, a stale cache).
      run(backend, c);
    });
  }
});

// One explicit int64-vs-int32 equality, bit for bit, beyond the tolerance checks above.
describe.each(backendRows)('unpermute index dtypes on %s', (_name, backend) => {
  for (const c of casesOf('unpermute')) {
    it(`${c.name}: int32 and int64 sortedIndices give identical bits`, () => {
      const tokens = toTensor(input(c, 'permuted_tokens')) as Tensor<'float32'>;
      const restore = [output(c, 'tokens').shape[0], output(c, 'tokens').shape[1]] as const;
      const options = { probs: toTensor(input(c, 'probs')) as Tensor<'float32'>, routingMap: toTensor(input(c, 'routing_map')) as Tensor<'bool'> };
      const a = backend.unpermute(tokens, toTensor(input(c, 'sorted_indices'), 'int64') as Tensor<'int64'>, restore, options);
      const b = backend.unpermute(tokens, toTensor(input(c, 'sorted_indices'), 'int32') as Tensor<'int32'>, restore, options);
      expectSameBits(a, b, 'unpermute');
    });
  }
});

// Keep the f32 exactness of permutedProbs honest: the helper compares bits, so this must fail.
describe('comparison helpers catch wrong answers', () => {
  it('a one-ulp change in a float32 permuted prob is caught', () => {
    const want: GoldenTensor = { dtype: 'f32', shape: [1], data: [0.3125] };
    const got = toTensor({ ...want, data: [0.3125000298023224] });
    expect(() => expectExact(got, want, 'p')).toThrow();
    expect(() => expectF32Bits(toTensor(want), [1], [0.3125], 'p')).not.toThrow();
  });
  it('a two-ulp bfloat16 difference fails the 1-ulp tolerance, one ulp passes', () => {
    const want: GoldenTensor = { dtype: 'bf16', shape: [2], data: [1, -0] };
    const oneUlp = { dtype: 'bfloat16' as const, shape: [2], data: Uint16Array.from([0x3f81, 0x0001]) };
    const twoUlp = { dtype: 'bfloat16' as const, shape: [2], data: Uint16Array.from([0x3f82, 0x0000]) };
    expect(() => expectMerged(oneUlp, want, 'm')).not.toThrow();
    expect(() => expectMerged(twoUlp, want, 'm')).toThrow();
  });
});
