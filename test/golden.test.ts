/**
 * Equivalence with the reference implementation: every case of the golden files
 * (`shared/golden/<op>.json`, produced by PyTorch running the reference code) on every
 * available backend. The table below has one entry per op and variant; the backends come
 * from ./backends.ts, so a new backend or a new golden case adds tests without new code.
 *
 * Tolerances (spec): indices, maps, sortedIndices, counts: exact; permute: bit-exact; probs
 * picked by permute: exact; unpermute: float32 within 1e-6 relative, bfloat16 within 1 ulp.
 */
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import { toBFloat16Bits, type Backend, type DType, type Tensor } from '../ts/index.js';
import { backendRows, registerBackendReport } from './backends.js';
import { bf16Value, bitsOf, expectF32Bits, expectF32Close, expectHalfWithinUlps, expectSameBits, expectValues, f16Bits, f16Value } from './util.js';

const GOLDEN_DIR = process.env.MOE_GOLDEN_DIR ? resolve(process.env.MOE_GOLDEN_DIR) : fileURLToPath(new URL('../../shared/golden/', import.meta.url));

/** Cases each golden file held when this suite was written; fewer means a truncated file. */
const MIN_CASES = { indices_to_multihot: 5, permute: 20, unpermute: 10 } as const;
type Op = keyof typeof MIN_CASES;
const OPS = Object.keys(MIN_CASES) as Op[];

interface GoldenTensor {
  dtype: 'f32' | 'bf16' | 'f16' | 'i64' | 'i32' | 'bool';
  shape: number[];
  data: number[];
}
interface GoldenCase {
  name: string;
  params: Record<string, unknown>;
  inputs: Record<string, GoldenTensor | null>;
  outputs: Record<string, GoldenTensor | null>;
  note?: string | null;
}
interface GoldenFile {
  op: string;
  meta: Record<string, unknown>;
  cases: GoldenCase[];
}

function loadGolden(op: Op): { file?: GoldenFile; error?: string } {
  const path = resolve(GOLDEN_DIR, `${op}.json`);
  if (!existsSync(path)) return { error: `${path} is missing (set MOE_GOLDEN_DIR to the golden directory)` };
  try {
    return { file: JSON.parse(readFileSync(path, 'utf8')) as GoldenFile };
  } catch (e) {
    return { error: `${path} does not parse: ${(e as Error).message}` };
  }
}

const golden = Object.fromEntries(OPS.map((op) => [op, loadGolden(op)])) as Record<Op, { file?: GoldenFile; error?: string }>;
const casesOf = (op: Op): GoldenCase[] => golden[op].file?.cases ?? [];

// ---------------------------------------------------------------------------------------
// Golden tensors to library tensors.

const DTYPE_OF: Record<GoldenTensor['dtype'], DType> = { f32: 'float32', bf16: 'bfloat16', f16: 'float16', i64: 'int64', i32: 'int32', bool: 'bool' };

/** The library tensor for a golden tensor; `as` overrides the dtype (int64 indices as int32). */
function toTensor(g: GoldenTensor, as: DType = DTYPE_OF[g.dtype]): Tensor {
  const shape = [...g.shape];
  switch (as) {
    case 'float32':
      return { dtype: as, shape, data: Float32Array.from(g.data) };
    case 'bfloat16':
      return { dtype: as, shape, data: Uint16Array.from(g.data, toBFloat16Bits) };
    case 'float16':
      return { dtype: as, shape, data: Uint16Array.from(g.data, f16Bits) };
    case 'int32':
      return { dtype: as, shape, data: Int32Array.from(g.data) };
    case 'int64':
      return { dtype: as, shape, data: BigInt64Array.from(g.data, (v) => BigInt(v)) };
    case 'bool':
      return { dtype: as, shape, data: Uint8Array.from(g.data, (v) => (v ? 1 : 0)) };
  }
}

function input(c: GoldenCase, key: string): GoldenTensor {
  const t = c.inputs[key];
  if (!t) throw new Error(`golden case ${c.name}: input ${key} is absent`);
  return t;
}

function output(c: GoldenCase, key: string): GoldenTensor {
  const t = c.outputs[key];
  if (!t) throw new Error(`golden case ${c.name}: output ${key} is absent`);
  return t;
}

/** Asserts that a result equals a golden tensor exactly (bits for floats, values otherwise). */
function expectExact(got: Tensor, want: GoldenTensor, what: string, as: DType = DTYPE_OF[want.dtype]): void {
  if (as === 'float32' || as === 'bfloat16' || as === 'float16') {
    expectSameBits(got, toTensor(want, as), what);
  } else {
    expectValues(got, as, want.shape, want.data, what);
  }
}

/** Asserts an unpermute result against the golden one: f32 1e-6 relative, 16-bit floats 1 ulp. */
function expectMerged(got: Tensor, want: GoldenTensor, what: string): void {
  const dtype = DTYPE_OF[want.dtype];
  if (dtype === 'float32') expectF32Close(got, want.shape, want.data, 1e-6, what);
  else if (dtype === 'bfloat16' || dtype === 'float16') expectHalfWithinUlps(got, dtype, want.shape, bitsOf(toTensor(want)), 1, what);
  else throw new Error(`${what}: unexpected golden dtype ${want.dtype}`);
}

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
          if (t?.dtype === 'bf16') t.data.forEach((v, i) => bf16Value(toBFloat16Bits(v)) !== v && bad.push(`${op}/${c.name}/${key}[${i}] = ${v}`));
          if (t?.dtype === 'f16') t.data.forEach((v, i) => f16Value(f16Bits(v)) !== v && bad.push(`${op}/${c.name}/${key}[${i}] = ${v}`));
        }
      }
    }
    expect(bad.slice(0, 10)).toEqual([]);
  });
});

const rows = OPS.flatMap((op) => casesOf(op).flatMap((c) => VARIANTS[op].map((v) => ({ title: `${op} / ${c.name} / ${v.variant}`, c, run: v.run }))));

describe.each(backendRows)('golden equivalence on %s', (_name, backend) => {
  it.each(rows)('$title', ({ c, run }) => {
    run(backend, c);
    // Twice: a backend must keep no state between calls (a reused output buffer, a stale cache).
    run(backend, c);
  });
});

// One explicit int64-vs-int32 equality, bit for bit, beyond the tolerance checks above.
describe.each(backendRows)('unpermute index dtypes on %s', (_name, backend) => {
  it.each(casesOf('unpermute').map((c) => ({ name: c.name, c })))('$name: int32 and int64 sortedIndices give identical bits', ({ c }) => {
    const tokens = toTensor(input(c, 'permuted_tokens')) as Tensor<'float32'>;
    const restore = [output(c, 'tokens').shape[0], output(c, 'tokens').shape[1]] as const;
    const options = { probs: toTensor(input(c, 'probs')) as Tensor<'float32'>, routingMap: toTensor(input(c, 'routing_map')) as Tensor<'bool'> };
    const a = backend.unpermute(tokens, toTensor(input(c, 'sorted_indices'), 'int64') as Tensor<'int64'>, restore, options);
    const b = backend.unpermute(tokens, toTensor(input(c, 'sorted_indices'), 'int32') as Tensor<'int32'>, restore, options);
    expectSameBits(a, b, 'unpermute');
  });
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
