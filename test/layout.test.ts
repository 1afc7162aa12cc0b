/**
 * Capacity, padding, chunk sort, grouped-GEMM preparation and expert sharding, on every
 * available backend:
 *
 * - golden: every case of capacity.json, pad_routing_map.json, sort_chunks_by_idxs.json,
 *   grouped_mm_sort.json and expert_range.json (PyTorch running the reference code);
 * - gradients: the chunk-sort backward is the exact adjoint of the forward copy;
 * - properties: random inputs against small pure-JS references written here from the spec
 *   (independent of the library), and the native and wasm backends against each other bit
 *   for bit;
 * - errors: every invalid option gives the right class and a message `<op>: <argument>...`.
 *
 * Reproduce or explore: MOE_FC_SEED=<n> MOE_FC_RUNS=<n> npx vitest run test/layout.test.ts
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { tensor, type Backend, type DType, type Tensor, type TokenDType } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { expectExact, input, loadGolden, output, toTensor, type GoldenCase, type GoldenFile } from './golden-loader.js';
import { bitsOf, decode, expectSameBits, expectValues, f32FromBits, itThrowsEach, type OpErrorCase } from './util.js';

const SEED = Number(process.env.MOE_FC_SEED ?? 0x1a_7007);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 60);
const params = <T>(examples: T[] = []): fc.Parameters<T> => ({ seed: SEED, numRuns: RUNS, examples });

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const i32 = (values: number[]) => tensor('int32', [values.length], Int32Array.from(values));
const i64 = (values: number[]) =>
  tensor(
    'int64',
    [values.length],
    BigInt64Array.from(values, (v) => BigInt(v)),
  );
const boolT = (shape: number[], values: ArrayLike<number>) => tensor('bool', shape, Uint8Array.from(values as number[]));
const f32T = (shape: number[], values: ArrayLike<number>) => tensor('float32', shape, Float32Array.from(values as number[]));

registerBackendReport();

// ---------------------------------------------------------------------------------------
// Golden vectors.

function golden(op: string): GoldenFile {
  const { file, error } = loadGolden(op);
  if (!file) throw new Error(error);
  return file;
}

const GOLDEN = Object.fromEntries(
  ['capacity', 'pad_routing_map', 'sort_chunks_by_idxs', 'grouped_mm_sort', 'expert_range'].map((op) => {
    const g = loadGolden(op);
    return [op, g];
  }),
) as Record<string, { file?: GoldenFile; error?: string }>;

const casesOf = (op: string): GoldenCase[] => GOLDEN[op].file?.cases ?? [];

interface CapacityRow {
  num_tokens: number;
  num_experts: number;
  capacity_factor: number;
  min_capacity: number | null;
  capacity: number;
}

const capacityRows = (): CapacityRow[] => (casesOf('capacity')[0]?.outputs as unknown as { table?: CapacityRow[] } | undefined)?.table ?? [];
const rangeRows = (): number[][] => {
  const out = casesOf('expert_range')[0]?.outputs as unknown as { columns?: string[]; rows?: number[][] } | undefined;
  expect(out?.columns).toEqual(['n_experts', 'ep_size', 'ep_rank', 'start', 'end']);
  return out?.rows ?? [];
};

describe('golden files load', () => {
  for (const op of Object.keys(GOLDEN)) {
    it(`${op}.json has cases`, () => {
      expect(GOLDEN[op].error, `${op}.json`).toBeUndefined();
      expect(golden(op).cases.length).toBeGreaterThan(0);
    });
  }
  it('the tables hold rows', () => {
    expect(capacityRows().length).toBeGreaterThanOrEqual(5);
    expect(rangeRows().length).toBeGreaterThanOrEqual(800);
  });
});

describe.each(backendRows)('golden on %s', (_name, backend) => {
  it('getCapacity: every row of capacity.json', () => {
    const rows = capacityRows();
    expect(rows.length).toBeGreaterThan(0);
    for (const r of rows) {
      const got = backend.getCapacity(r.num_tokens, r.num_experts, r.capacity_factor, r.min_capacity ?? undefined);
      expect(got, JSON.stringify(r)).toBe(r.capacity);
    }
  });

  it('expertRangeForRank, shouldLoadExpert, validateExpertSharding, splitExpertWeights: every row of expert_range.json', () => {
    const rows = rangeRows();
    expect(rows.length).toBeGreaterThan(0);
    for (const [n, w, r, start, end] of rows) {
      const what = `n_experts=${n} ep_size=${w} ep_rank=${r}`;
      expect(backend.expertRangeForRank(n, w, r), what).toEqual({ start, end });
      const owned = range(n).filter((id) => backend.shouldLoadExpert(id, n, w, r));
      expect(owned, what).toEqual(range(end - start).map((i) => start + i));
      expect(backend.validateExpertSharding([end - start, 2], n, w, r, 'w', 'shard(0)'), what).toEqual({ start, end });
      const stacked = tensor(
        'int32',
        [end - start, 2],
        Int32Array.from(range(2 * (end - start)), (v) => v + 100 * start),
      );
      const parts = backend.splitExpertWeights(stacked, n, w, r);
      expect(
        parts.map((p) => p.expertId),
        what,
      ).toEqual(range(end - start).map((i) => start + i));
      parts.forEach((p, i) => {
        expectValues(p.tensor, 'int32', [2], [2 * i + 100 * start, 2 * i + 1 + 100 * start], `${what} expert ${p.expertId}`);
      });
    }
  });

  it('padRoutingMap: every case of pad_routing_map.json', () => {
    const cases = casesOf('pad_routing_map');
    expect(cases.length).toBeGreaterThan(0);
    for (const c of cases) {
      const got = backend.padRoutingMap(toTensor(input(c, 'routing_map')) as Tensor<'bool'>, c.params.pad_multiple as number);
      expectExact(got, output(c, 'routing_map'), `${c.name} routingMap`);
    }
  });

  for (const idx of ['int64', 'int32'] as const) {
    it(`sortChunksByIndex (${idx} sizes): every case of sort_chunks_by_idxs.json, bit-exact, and its backward restores the input`, () => {
      const cases = casesOf('sort_chunks_by_idxs');
      expect(cases.length).toBeGreaterThan(0);
      for (const c of cases) {
        const x = toTensor(input(c, 'input')) as Tensor<'float32'>;
        const sizes = toTensor(input(c, 'split_sizes'), idx) as Tensor<'int32' | 'int64'>;
        const order = toTensor(input(c, 'sorted_idxs'), idx) as Tensor<'int32' | 'int64'>;
        const probs = toTensor(input(c, 'probs')) as Tensor<'float32'>;
        const out = backend.sortChunksByIndex(x, sizes, order, probs);
        expectExact(out.output, output(c, 'output'), `${c.name} output`);
        expectExact(out.probs!, output(c, 'probs'), `${c.name} probs`);
        const back = backend.sortChunksByIndexBackward(out.output, sizes, order, out.probs);
        expectSameBits(back.gradInput, x, `${c.name} backward`);
        expectSameBits(back.gradProbs!, probs, `${c.name} backward probs`);
        expect(backend.sortChunksByIndex(x, sizes, order)).not.toHaveProperty('probs');
      }
    });

    it(`groupedMmSort (${idx} indices): every case of grouped_mm_sort.json`, () => {
      const cases = casesOf('grouped_mm_sort');
      expect(cases.length).toBeGreaterThan(0);
      for (const c of cases) {
        const out = backend.groupedMmSort(toTensor(input(c, 'indices'), idx) as Tensor<'int32'>, toTensor(input(c, 'weights')) as Tensor<'float32'>, {
          tokenMask: toTensor(input(c, 'token_mask')) as Tensor<'bool'>,
          numLocalExperts: c.params.n_local_experts as number,
          expertsStartIdx: c.params.experts_start_idx as number,
        });
        expectExact(out.sortedTokenIds, output(c, 'sorted_token_ids'), `${c.name} sortedTokenIds`, 'int32');
        expectExact(out.sortedSlotIds, output(c, 'sorted_slot_ids'), `${c.name} sortedSlotIds`, 'int32');
        expectExact(out.sortedWeights, output(c, 'sorted_weights'), `${c.name} sortedWeights`);
        expectExact(out.tokensPerExpert, output(c, 'tokens_per_expert'), `${c.name} tokensPerExpert`, 'int32');
        expectExact(out.offsets, output(c, 'offs'), `${c.name} offsets`, 'int32');
      }
    });
  }
});

// ---------------------------------------------------------------------------------------
// Pure-JS references, from the spec.

function refCapacity(n: number, e: number, f: number, min?: number): number {
  const c = Math.ceil((n / e) * f);
  return min === undefined ? c : Math.max(c, min);
}

/** `x * 0` in float32 (IEEE): signed zero, NaN for infinities, a NaN stays NaN. */
const timesZero = (x: number) => (Number.isNaN(x) ? x : Number.isFinite(x) ? (x < 0 || Object.is(x, -0) ? -0 : 0) : NaN);

function refDrop(T: number, E: number, probs: Float32Array, map: Uint8Array, topk: number, f: number, policy: 'probs' | 'position', pad: boolean) {
  const capacity = refCapacity(T * topk, E, f);
  const mask = new Uint8Array(T * E);
  for (let e = 0; e < E; e++) {
    let order = range(T);
    if (policy === 'position') {
      order = [...order.filter((t) => map[t * E + e]), ...order.filter((t) => !map[t * E + e])];
    } else {
      order.sort((a, b) => {
        const x = probs[a * E + e];
        const y = probs[b * E + e];
        if (Number.isNaN(x) !== Number.isNaN(y)) return Number.isNaN(x) ? -1 : 1;
        return x > y ? -1 : x < y ? 1 : a - b;
      });
    }
    for (const t of order.slice(0, capacity)) mask[t * E + e] = 1;
  }
  const outMap = pad ? mask : mask.map((m, i) => (m && map[i] ? 1 : 0));
  const outProbs = Float32Array.from(probs, (p, i) => (outMap[i] ? p : timesZero(p)));
  return { capacity, routingMap: outMap, probs: outProbs };
}

function refPad(T: number, E: number, map: Uint8Array, m: number): Uint8Array {
  const out = Uint8Array.from(map, (b) => (b ? 1 : 0));
  for (let e = 0; e < E; e++) {
    let count = 0;
    for (let t = 0; t < T; t++) count += out[t * E + e];
    let need = (m - (count % m)) % m;
    for (let t = 0; t < T && need > 0; t++) {
      if (!out[t * E + e]) {
        out[t * E + e] = 1;
        need--;
      }
    }
  }
  return out;
}

/** Row gather of raw elements: output rows = chunks in `order`. */
function refChunkRows(sizes: number[], order: number[]): number[] {
  const starts = sizes.map((_, i) => sizes.slice(0, i).reduce((a, b) => a + b, 0));
  return order.flatMap((c) => range(sizes[c]).map((r) => starts[c] + r));
}

function refGrouped(T: number, k: number, idx: number[], w: Float32Array, mask: number[] | undefined, n: number, start: number) {
  const slots: { t: number; s: number; e: number }[] = [];
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      const e = mask && !mask[t] ? -1 : idx[t * k + j];
      if (e >= start && e < start + n) slots.push({ t, s: t * k + j, e: e - start });
    }
  }
  const sorted = [...slots].sort((a, b) => a.e - b.e || a.s - b.s); // stable by construction
  const counts = range(n).map((e) => slots.filter((x) => x.e === e).length);
  let acc = 0;
  return {
    tokenIds: sorted.map((x) => x.t),
    slotIds: sorted.map((x) => x.s),
    weights: Float32Array.from(sorted, (x) => w[x.s]),
    counts,
    offsets: counts.map((c) => (acc += c)),
  };
}

function refRange(E: number, W: number, r: number): { start: number; end: number } {
  const base = Math.floor(E / W);
  const rem = E % W;
  const start = r < rem ? r * (base + 1) : rem * (base + 1) + (r - rem) * base;
  return { start, end: start + (r < rem ? base + 1 : base) };
}

// ---------------------------------------------------------------------------------------
// Random problems.

/** A value from a small set (ties, signed zeros, NaN) or any float32. */
const probArb = fc.oneof(fc.constantFrom(0, -0, 0.25, 0.5, 1, -0.5, NaN, Infinity), fc.float({ noNaN: true, noDefaultInfinity: true }));

interface Routing {
  T: number;
  E: number;
  map: Uint8Array;
  probs: Float32Array;
}

/** Mostly ties: few distinct values, so equal probs straddle the capacity boundary. */
const tieArb = fc.constantFrom(0, -0, 0.5, 0.5, 1);

const routingArb: fc.Arbitrary<Routing> = fc.record({ T: fc.integer({ min: 0, max: 24 }), E: fc.integer({ min: 1, max: 8 }), ties: fc.boolean() }).chain(({ T, E, ties }) =>
  fc.record({
    T: fc.constant(T),
    E: fc.constant(E),
    map: fc.uint8Array({ min: 0, max: 1, minLength: T * E, maxLength: T * E }),
    probs: fc.array(ties ? tieArb : probArb, { minLength: T * E, maxLength: T * E }).map((v) => Float32Array.from(v)),
  }),
);

const TOKEN_DTYPES: readonly TokenDType[] = ['float32', 'bfloat16', 'float16'];

/** A tensor of `dtype` holding arbitrary bit patterns (NaN payloads, infinities, subnormals). */
function bitsTensor(dtype: DType, shape: number[], bits: number[]): Tensor {
  switch (dtype) {
    case 'float32':
      return tensor('float32', shape, new Float32Array(Uint32Array.from(bits).buffer));
    case 'bfloat16':
    case 'float16':
      return tensor(
        dtype,
        shape,
        Uint16Array.from(bits, (b) => b & 0xffff),
      );
    case 'int32':
      return tensor(
        'int32',
        shape,
        Int32Array.from(bits, (b) => b | 0),
      );
    case 'bool':
      return tensor(
        'bool',
        shape,
        Uint8Array.from(bits, (b) => b & 1),
      );
    case 'int64':
      return tensor(
        'int64',
        shape,
        BigInt64Array.from(bits, (b) => BigInt(b)),
      );
  }
}

const bitsArb = (n: number) => fc.array(fc.integer({ min: 0, max: 0xffffffff }), { minLength: n, maxLength: n });

/** Both CPU backends, when both run: their results must agree bit for bit. */
function expectBackendsAgree<T>(f: (b: Backend) => T, what: string): void {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  if (!cpu || !wasm) return;
  const a = f(cpu);
  const b = f(wasm);
  expect(deepBits(a), `${what}: cpu and wasm differ`).toEqual(deepBits(b));
}

/** A structure with every tensor replaced by its dtype, shape and raw bits. */
function deepBits(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(deepBits);
  if (v && typeof v === 'object') {
    if ('dtype' in v && 'data' in v && ArrayBuffer.isView((v as Tensor).data)) {
      const t = v as Tensor;
      return { dtype: t.dtype, shape: [...t.shape], bits: bitsOf(t) };
    }
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, deepBits(x)]));
  }
  return v;
}

describe('cpu and wasm both run (for the agreement checks)', () => {
  it('or the agreement checks below compare nothing', (ctx) => {
    if (!backendNamed('cpu') || !backendNamed('wasm')) ctx.skip();
    expect(backendNamed('cpu')!.getCapacity(10, 3, 1.5)).toBe(backendNamed('wasm')!.getCapacity(10, 3, 1.5));
  });
});

describe.each(backendRows)('properties on %s', (_name, backend) => {
  it('getCapacity matches max(ceil(n / e * f), min) in float64', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 1 << 20 }),
        fc.integer({ min: 1, max: 512 }),
        fc.oneof(fc.constantFrom(0, 0.5, 1, 1.1, 1.25, 1.5, 2, 3), fc.double({ min: 0, max: 8, noNaN: true })),
        fc.option(fc.integer({ min: 0, max: 4096 }), { nil: undefined }),
        (n, e, f, min) => {
          expect(backend.getCapacity(n, e, f, min)).toBe(refCapacity(n, e, f, min));
        },
      ),
      params(),
    );
  });

  it('dropTokens matches the reference order (probs: highest first, NaN first, ties to lower id; position: routed first)', () => {
    fc.assert(
      fc.property(
        routingArb,
        fc.integer({ min: 0, max: 4 }),
        fc.constantFrom(0, 0.1, 0.3, 0.5, 0.5, 1, 1.25, 2, 8),
        fc.constantFrom('probs' as const, 'position' as const),
        fc.boolean(),
        ({ T, E, map, probs }, topk, f, policy, pad) => {
          const want = refDrop(T, E, probs, map, topk, f, policy, pad);
          const run = (b: Backend) => b.dropTokens(f32T([T, E], probs), boolT([T, E], map), { topk, capacityFactor: f, dropPolicy: policy, padToCapacity: pad });
          const got = run(backend);
          expect(got.capacity).toBe(want.capacity);
          expectValues(got.routingMap, 'bool', [T, E], want.routingMap, 'routingMap');
          expectSameBits(got.probs, f32T([T, E], want.probs), 'probs');
          expectBackendsAgree(run, 'dropTokens');
        },
      ),
      params(),
    );
  });

  it('dropTokens: equal probs keep the lower token ids; position keeps the first routed, pads with the first unrouted', () => {
    // 5 tokens, 1 expert, top-1, factor 0.5: capacity ceil(2.5) = 3.
    const p = f32T([5, 1], [0.5, 0.75, 0.5, 0.5, 0.5]);
    const m = boolT([5, 1], [1, 0, 1, 1, 1]);
    const byProbs = backend.dropTokens(p, m, { topk: 1, capacityFactor: 0.5 });
    expect(byProbs.capacity).toBe(3);
    // ranked: token 1 (0.75, unrouted), then the 0.5 ties by id: 0, 2 -> mask {0, 1, 2}
    expect(Array.from(byProbs.routingMap.data)).toEqual([1, 0, 1, 0, 0]);
    expect(Array.from(backend.dropTokens(p, m, { topk: 1, capacityFactor: 0.5, padToCapacity: true }).routingMap.data)).toEqual([1, 1, 1, 0, 0]);
    const byPos = backend.dropTokens(p, m, { topk: 1, capacityFactor: 0.5, dropPolicy: 'position' });
    expect(Array.from(byPos.routingMap.data)).toEqual([1, 0, 1, 1, 0]);
    expect(Array.from(byPos.probs.data)).toEqual([0.5, 0, 0.5, 0.5, 0]);
    const padded = backend.dropTokens(p, boolT([5, 1], [0, 1, 0, 0, 0]), { topk: 1, capacityFactor: 0.5, dropPolicy: 'position', padToCapacity: true });
    expect(Array.from(padded.routingMap.data)).toEqual([1, 1, 1, 0, 0]);
  });

  it('padRoutingMap pads each expert with its lowest unselected tokens; tokensPerExpert counts columns', () => {
    fc.assert(
      fc.property(routingArb, fc.integer({ min: 1, max: 6 }), ({ T, E, map }, m) => {
        const padded = backend.padRoutingMap(boolT([T, E], map), m);
        const want = refPad(T, E, map, m);
        expectValues(padded, 'bool', [T, E], want, 'padded');
        const counts = range(E).map((e) => range(T).reduce((a, t) => a + want[t * E + e], 0));
        expectValues(backend.tokensPerExpert(padded), 'int32', [E], counts, 'tokensPerExpert');
        // Every column is a multiple of m unless the expert ran out of tokens.
        for (const c of counts) expect(c % m === 0 || c === T).toBe(true);
        expectBackendsAgree((b) => b.padRoutingMap(boolT([T, E], map), m), 'padRoutingMap');
      }),
      params(),
    );
  });

  const chunkArb = fc
    .record({
      sizes: fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 7 }),
      H: fc.integer({ min: 0, max: 5 }),
      dtype: fc.constantFrom(...TOKEN_DTYPES),
      idx: fc.constantFrom('int32' as const, 'int64' as const),
      withProbs: fc.boolean(),
    })
    .chain((s) => {
      const N = s.sizes.reduce((a, b) => a + b, 0);
      return fc.record({
        s: fc.constant(s),
        order: fc.shuffledSubarray(range(s.sizes.length), { minLength: s.sizes.length, maxLength: s.sizes.length }),
        bits: bitsArb(N * s.H),
        probs: fc.array(fc.float({ noNaN: true }), { minLength: N, maxLength: N }),
      });
    });

  it('sortChunksByIndex is a bit-exact chunk gather in every dtype; its backward inverts it', () => {
    fc.assert(
      fc.property(chunkArb, ({ s, order, bits, probs }) => {
        const N = s.sizes.reduce((a, b) => a + b, 0);
        const x = bitsTensor(s.dtype, [N, s.H], bits) as Tensor<TokenDType>;
        const ints = s.idx === 'int32' ? i32 : i64;
        const p = s.withProbs ? f32T([N], probs) : undefined;
        const out = backend.sortChunksByIndex(x, ints(s.sizes), ints(order), p);
        const rows = refChunkRows(s.sizes, order);
        const xb = bitsOf(x);
        expectValues(
          out.output,
          s.dtype,
          [N, s.H],
          rows.flatMap((r) => xb.slice(r * s.H, (r + 1) * s.H)),
          'output bits',
        );
        if (p)
          expectSameBits(
            out.probs!,
            f32T(
              [N],
              rows.map((r) => probs[r]),
            ),
            'probs',
          );
        else expect(out).not.toHaveProperty('probs');
        const back = backend.sortChunksByIndexBackward(out.output, ints(s.sizes), ints(order), out.probs);
        expectSameBits(back.gradInput, x, 'backward(forward(x))');
        if (p) expectSameBits(back.gradProbs!, p, 'backward probs');
        expectBackendsAgree((b) => b.sortChunksByIndex(x, ints(s.sizes), ints(order), p), 'sortChunksByIndex');
      }),
      params(),
    );
  });

  it('sortChunksByIndexBackward is the exact adjoint: <sort(x), y> = <x, backward(y)>', () => {
    fc.assert(
      fc.property(chunkArb, fc.integer(), ({ s, order }, salt) => {
        const N = s.sizes.reduce((a, b) => a + b, 0);
        // Small integers: every dot product below is exact in float64.
        const x = range(N * s.H).map((i) => ((i * 7 + salt) % 9) - 4);
        const y = range(N * s.H).map((i) => ((i * 5 + salt * 3) % 11) - 5);
        const px = range(N).map((i) => ((i * 3 + salt) % 7) - 3);
        const py = range(N).map((i) => ((i * 2 + salt) % 5) - 2);
        const ints = s.idx === 'int32' ? i32 : i64;
        const fwd = backend.sortChunksByIndex(f32T([N, s.H], x), ints(s.sizes), ints(order), f32T([N], px));
        const bwd = backend.sortChunksByIndexBackward(f32T([N, s.H], y), ints(s.sizes), ints(order), f32T([N], py));
        const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => Array.from(a).reduce((acc, v, i) => acc + v * b[i], 0);
        expect(dot(fwd.output.data as Float32Array, y)).toBe(dot(x, bwd.gradInput.data as Float32Array));
        expect(dot(fwd.probs!.data as Float32Array, py)).toBe(dot(px, bwd.gradProbs!.data as Float32Array));
        // And the gradient lands where the spec says: chunk order[j] of gradInput is chunk j of y.
        const rows = refChunkRows(s.sizes, order);
        const want = new Array<number>(N * s.H);
        rows.forEach((r, i) => {
          for (let h = 0; h < s.H; h++) want[r * s.H + h] = y[i * s.H + h];
        });
        expectSameBits(bwd.gradInput, f32T([N, s.H], want), 'gradInput placement');
      }),
      params(),
    );
  });

  it('groupedMmSort matches a filter-and-stable-sort reference', () => {
    fc.assert(
      fc.property(
        fc.record({ T: fc.integer({ min: 0, max: 20 }), k: fc.integer({ min: 0, max: 4 }), E: fc.integer({ min: 1, max: 10 }) }).chain((s) =>
          fc.record({
            s: fc.constant(s),
            idx: fc.array(fc.integer({ min: -1, max: s.E + 1 }), { minLength: s.T * s.k, maxLength: s.T * s.k }),
            w: fc.array(fc.float({ noNaN: true }), { minLength: s.T * s.k, maxLength: s.T * s.k }),
            mask: fc.option(fc.array(fc.integer({ min: 0, max: 1 }), { minLength: s.T, maxLength: s.T }), { nil: undefined }),
            start: fc.integer({ min: 0, max: s.E }),
            n: fc.integer({ min: 0, max: s.E }),
            wdtype: fc.constantFrom(...TOKEN_DTYPES),
          }),
        ),
        ({ s, idx, w, mask, start, n, wdtype }) => {
          const weights = tensor(wdtype, [s.T, s.k], w);
          // The reference widens the weights to float32: decode what the tensor stores.
          const stored = Float32Array.from(bitsOf(weights), (v) => (wdtype === 'float32' ? f32FromBits(v) : decode(wdtype, v)));
          const want = refGrouped(s.T, s.k, idx, stored, mask, n, start);
          const run = (b: Backend) =>
            b.groupedMmSort(tensor('int32', [s.T, s.k], Int32Array.from(idx)), weights, {
              tokenMask: mask ? boolT([s.T], mask) : undefined,
              numLocalExperts: n,
              expertsStartIdx: start,
            });
          const got = run(backend);
          const S = want.tokenIds.length;
          expectValues(got.sortedTokenIds, 'int32', [S], want.tokenIds, 'sortedTokenIds');
          expectValues(got.sortedSlotIds, 'int32', [S], want.slotIds, 'sortedSlotIds');
          expectSameBits(got.sortedWeights, f32T([S], want.weights), 'sortedWeights');
          expectValues(got.tokensPerExpert, 'int32', [n], want.counts, 'tokensPerExpert');
          expectValues(got.offsets, 'int32', [n], want.offsets, 'offsets');
          expectBackendsAgree(run, 'groupedMmSort');
        },
      ),
      params(),
    );
  });

  it('expert ranges partition the experts in rank order; splitExpertWeights copies bits in every dtype', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 300 }),
        fc.integer({ min: 1, max: 70 }),
        fc.constantFrom<DType>('float32', 'bfloat16', 'float16', 'int32', 'bool'),
        fc.integer({ min: 0, max: 3 }),
        (E, W, dtype, inner) => {
          let next = 0;
          for (let r = 0; r < W; r++) {
            const got = backend.expertRangeForRank(E, W, r);
            expect(got).toEqual(refRange(E, W, r));
            expect(got.start).toBe(next);
            next = got.end;
          }
          expect(next).toBe(E);
          const rank = E % W; // the first rank with the smaller share (rank 0 when all are equal)
          const { start, end } = refRange(E, W, rank);
          const L = end - start;
          const bits = range(L * inner).map((i) => (i * 2654435761) >>> 0);
          const stacked = bitsTensor(dtype, [L, inner], bits);
          const parts = backend.splitExpertWeights(stacked, E, W, rank);
          expect(parts.map((p) => p.expertId)).toEqual(range(L).map((i) => start + i));
          const sb = bitsOf(stacked);
          parts.forEach((p, i) => {
            expectValues(p.tensor, dtype, [inner], sb.slice(i * inner, (i + 1) * inner), `expert ${p.expertId}`);
          });
          expectBackendsAgree((b) => b.splitExpertWeights(stacked, E, W, rank), 'splitExpertWeights');
        },
      ),
      params(),
    );
  });
});

describe.each(backendRows)('sharding descriptors on %s', (_name, backend) => {
  it('validateExpertSharding: sharded count, replicated count, and placements', () => {
    // 10 experts on 4 ranks: 3, 3, 2, 2.
    expect(backend.validateExpertSharding([2, 8, 4], 10, 4, 3)).toEqual({ start: 8, end: 10 });
    expect(backend.validateExpertSharding(tensor('float32', [10, 1]), 10, 4, 3, 'w')).toEqual({ start: 0, end: 10 });
    expect(backend.validateExpertSharding([10], 10, 4, 1, 'w', 'replicate')).toEqual({ start: 0, end: 10 });
    expect(backend.validateExpertSharding([3], 10, 4, 1, 'w', 'shard(0)')).toEqual({ start: 3, end: 6 });
    expect(() => backend.validateExpertSharding([3], 10, 4, 1, 'w', 'replicate')).toThrow(/^validateExpertSharding: w: .*replicated/);
  });

  it('expertPlacements follows the expert mesh; splitPlacements drops the ep axis', () => {
    expect(backend.expertPlacements([{ name: 'ep', size: 8 }])).toEqual({ mesh: [{ name: 'ep', size: 8 }], placements: ['shard(0)'] });
    expect(
      backend.expertPlacements([
        { name: 'ep_replicate', size: 2 },
        { name: 'ep_shard', size: 1 },
        { name: 'ep', size: 4 },
      ]),
    ).toEqual({
      mesh: [
        { name: 'ep_replicate', size: 2 },
        { name: 'ep_shard', size: 1 },
        { name: 'ep', size: 4 },
      ],
      placements: ['replicate', 'shard(1)', 'shard(0)'],
    });
    expect(
      backend.expertPlacements([
        { name: 'ep_shard', size: 1 },
        { name: 'ep', size: 4 },
        { name: 'ep_replicate', size: 1 },
      ]),
    ).toEqual({
      mesh: [{ name: 'ep', size: 4 }],
      placements: ['shard(0)'],
    });
    const placed = backend.expertPlacements([
      { name: 'ep', size: 4 },
      { name: 'ep_shard', size: 2 },
    ]);
    expect(backend.splitPlacements(placed.mesh, placed.placements)).toEqual({ mesh: [{ name: 'ep_shard', size: 2 }], placements: ['shard(0)'] });
    expect(
      backend.splitPlacements(
        [
          { name: 'dp', size: 2 },
          { name: 'ep', size: 4 },
        ],
        ['shard(0)', 'shard(0)'],
      ),
    ).toEqual({
      mesh: [{ name: 'dp', size: 2 }],
      placements: ['replicate'],
    });
    expect(
      backend.splitPlacements(
        [
          { name: 'ep', size: 4 },
          { name: 'ep_shard', size: 1 },
        ],
        ['shard(0)', 'shard(1)'],
      ),
    ).toBeNull();
    expect(backend.splitPlacements([{ name: 'dp', size: 4 }], ['shard(3)'])).toBeNull();
  });
});

// ---------------------------------------------------------------------------------------
// Errors.

const map = boolT([3, 2], [1, 0, 0, 1, 1, 1]);
const probs = f32T([3, 2], [0.5, 0, 0, 0.25, 2, 4]);
const rows = f32T([4, 2], [1, 2, 3, 4, 5, 6, 7, 8]);
const topIdx = tensor('int32', [2, 2], Int32Array.from([0, 1, 2, -1]));
const topW = f32T([2, 2], [0.5, 0.5, 1, 0]);

type Case = OpErrorCase & { arg: string };

const CASES: Case[] = [
  // getCapacity
  { title: 'negative capacityFactor', op: 'getCapacity', arg: 'capacityFactor', cls: RangeError, detail: /-1/, call: (b) => b.getCapacity(8, 2, -1) },
  { title: 'NaN capacityFactor', op: 'getCapacity', arg: 'capacityFactor', cls: RangeError, call: (b) => b.getCapacity(8, 2, NaN) },
  { title: 'infinite capacityFactor', op: 'getCapacity', arg: 'capacityFactor', cls: RangeError, call: (b) => b.getCapacity(8, 2, Infinity) },
  { title: 'capacityFactor a string', op: 'getCapacity', arg: 'capacityFactor', cls: TypeError, call: (b) => b.getCapacity(8, 2, '1' as never) },
  { title: 'numExperts 0', op: 'getCapacity', arg: 'numExperts', cls: RangeError, call: (b) => b.getCapacity(8, 0, 1) },
  { title: 'numTokens 2.5', op: 'getCapacity', arg: 'numTokens', cls: RangeError, detail: /2\.5/, call: (b) => b.getCapacity(2.5, 2, 1) },
  { title: 'minCapacity -1', op: 'getCapacity', arg: 'minCapacity', cls: RangeError, call: (b) => b.getCapacity(8, 2, 1, -1) },
  // dropTokens
  { title: 'negative capacityFactor', op: 'dropTokens', arg: 'capacityFactor', cls: RangeError, call: (b) => b.dropTokens(probs, map, { topk: 1, capacityFactor: -0.5 }) },
  { title: 'capacityFactor missing', op: 'dropTokens', arg: 'options.capacityFactor', cls: TypeError, call: (b) => b.dropTokens(probs, map, { topk: 1 } as never) },
  { title: 'topk missing', op: 'dropTokens', arg: 'options.topk', cls: TypeError, call: (b) => b.dropTokens(probs, map, { capacityFactor: 1 } as never) },
  { title: 'topk 1.5', op: 'dropTokens', arg: 'topk', cls: RangeError, call: (b) => b.dropTokens(probs, map, { topk: 1.5, capacityFactor: 1 }) },
  {
    title: 'an unknown dropPolicy',
    op: 'dropTokens',
    arg: 'dropPolicy',
    cls: TypeError,
    detail: /'probs' or 'position'.*'random'/,
    call: (b) => b.dropTokens(probs, map, { topk: 1, capacityFactor: 1, dropPolicy: 'random' as never }),
  },
  { title: 'dropPolicy a number', op: 'dropTokens', arg: 'options.dropPolicy', cls: TypeError, call: (b) => b.dropTokens(probs, map, { topk: 1, capacityFactor: 1, dropPolicy: 1 as never }) },
  {
    title: 'padToCapacity a string',
    op: 'dropTokens',
    arg: 'options.padToCapacity',
    cls: TypeError,
    call: (b) => b.dropTokens(probs, map, { topk: 1, capacityFactor: 1, padToCapacity: 'yes' as never }),
  },
  {
    title: 'an unknown option',
    op: 'dropTokens',
    arg: 'options.capacity',
    cls: TypeError,
    detail: /not an option of dropTokens/,
    call: (b) => b.dropTokens(probs, map, { topk: 1, capacityFactor: 1, capacity: 2 } as never),
  },
  { title: 'probs shape != routingMap shape', op: 'dropTokens', arg: 'probs.shape', cls: RangeError, call: (b) => b.dropTokens(f32T([2, 3], [0, 0, 0, 0, 0, 0]), map, { topk: 1, capacityFactor: 1 }) },
  { title: 'probs as bfloat16', op: 'dropTokens', arg: 'probs.dtype', cls: TypeError, call: (b) => b.dropTokens(tensor('bfloat16', [3, 2]) as never, map, { topk: 1, capacityFactor: 1 }) },
  {
    title: 'a routing map without experts',
    op: 'dropTokens',
    arg: 'routingMap.shape[1]',
    cls: RangeError,
    call: (b) => b.dropTokens(f32T([3, 0], []), boolT([3, 0], []), { topk: 1, capacityFactor: 1 }),
  },
  // padRoutingMap, tokensPerExpert
  { title: 'padMultiple 0', op: 'padRoutingMap', arg: 'padMultiple', cls: RangeError, call: (b) => b.padRoutingMap(map, 0) },
  { title: 'padMultiple 1.5', op: 'padRoutingMap', arg: 'padMultiple', cls: RangeError, call: (b) => b.padRoutingMap(map, 1.5) },
  { title: 'padMultiple missing', op: 'padRoutingMap', arg: 'padMultiple', cls: TypeError, call: (b) => (b.padRoutingMap as (routingMap: unknown) => unknown)(map) },
  { title: 'a float32 routing map', op: 'padRoutingMap', arg: 'routingMap.dtype', cls: TypeError, call: (b) => b.padRoutingMap(probs as never, 2) },
  { title: 'a 1-d routing map', op: 'tokensPerExpert', arg: 'routingMap.shape', cls: TypeError, detail: /2-d/, call: (b) => b.tokensPerExpert(boolT([3], [1, 0, 1])) },
  // sortChunksByIndex
  {
    title: 'sizes that do not add up to the rows',
    op: 'sortChunksByIndex',
    arg: 'splitSizes',
    cls: RangeError,
    detail: /add up to 3, but input has 4 rows/,
    call: (b) => b.sortChunksByIndex(rows, i32([1, 2]), i32([1, 0])),
  },
  { title: 'a negative size', op: 'sortChunksByIndex', arg: 'splitSizes', cls: RangeError, detail: /splitSizes\[0\] = -1/, call: (b) => b.sortChunksByIndex(rows, i64([-1, 5]), i64([1, 0])) },
  { title: 'a chunk listed twice', op: 'sortChunksByIndex', arg: 'sortedIdxs', cls: RangeError, detail: /permutation/, call: (b) => b.sortChunksByIndex(rows, i32([2, 2]), i32([0, 0])) },
  { title: 'a chunk id out of range', op: 'sortChunksByIndex', arg: 'sortedIdxs', cls: RangeError, detail: /sortedIdxs\[1\] = 2/, call: (b) => b.sortChunksByIndex(rows, i32([2, 2]), i32([0, 2])) },
  { title: 'sortedIdxs shorter than splitSizes', op: 'sortChunksByIndex', arg: 'sortedIdxs.shape', cls: RangeError, call: (b) => b.sortChunksByIndex(rows, i32([2, 2]), i32([0])) },
  { title: 'probs of the wrong length', op: 'sortChunksByIndex', arg: 'probs.shape', cls: RangeError, call: (b) => b.sortChunksByIndex(rows, i32([2, 2]), i32([1, 0]), f32T([3], [1, 2, 3])) },
  { title: 'float32 splitSizes', op: 'sortChunksByIndex', arg: 'splitSizes.dtype', cls: TypeError, call: (b) => b.sortChunksByIndex(rows, f32T([2], [2, 2]) as never, i32([1, 0])) },
  { title: 'int32 input', op: 'sortChunksByIndex', arg: 'input.dtype', cls: TypeError, call: (b) => b.sortChunksByIndex(tensor('int32', [4, 1]) as never, i32([2, 2]), i32([1, 0])) },
  {
    title: 'backward: sizes that do not add up',
    op: 'sortChunksByIndexBackward',
    arg: 'splitSizes',
    cls: RangeError,
    detail: /gradOutput has 4 rows/,
    call: (b) => b.sortChunksByIndexBackward(rows, i32([1, 1]), i32([1, 0])),
  },
  {
    title: 'backward: gradProbs of the wrong length',
    op: 'sortChunksByIndexBackward',
    arg: 'gradProbs.shape',
    cls: RangeError,
    call: (b) => b.sortChunksByIndexBackward(rows, i32([2, 2]), i32([1, 0]), f32T([5], [1, 2, 3, 4, 5])),
  },
  // groupedMmSort
  { title: 'numLocalExperts missing', op: 'groupedMmSort', arg: 'options.numLocalExperts', cls: TypeError, call: (b) => b.groupedMmSort(topIdx, topW, {} as never) },
  { title: 'numLocalExperts -1', op: 'groupedMmSort', arg: 'numLocalExperts', cls: RangeError, call: (b) => b.groupedMmSort(topIdx, topW, { numLocalExperts: -1 }) },
  { title: 'expertsStartIdx 1.5', op: 'groupedMmSort', arg: 'expertsStartIdx', cls: RangeError, call: (b) => b.groupedMmSort(topIdx, topW, { numLocalExperts: 2, expertsStartIdx: 1.5 }) },
  {
    title: 'an index of -2',
    op: 'groupedMmSort',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[1\]\[1\] = -2/,
    call: (b) => b.groupedMmSort(tensor('int32', [2, 2], Int32Array.from([0, 1, 2, -2])), topW, { numLocalExperts: 2 }),
  },
  { title: 'weights shape != indices shape', op: 'groupedMmSort', arg: 'weights.shape', cls: RangeError, call: (b) => b.groupedMmSort(topIdx, f32T([4], [1, 1, 1, 1]), { numLocalExperts: 2 }) },
  {
    title: 'tokenMask of the wrong length',
    op: 'groupedMmSort',
    arg: 'tokenMask.shape',
    cls: RangeError,
    call: (b) => b.groupedMmSort(topIdx, topW, { numLocalExperts: 2, tokenMask: boolT([3], [1, 1, 1]) }),
  },
  { title: 'an unknown option', op: 'groupedMmSort', arg: 'options.nLocalExperts', cls: TypeError, call: (b) => b.groupedMmSort(topIdx, topW, { numLocalExperts: 2, nLocalExperts: 2 } as never) },
  // expert sharding
  { title: 'epSize 0', op: 'expertRangeForRank', arg: 'epSize', cls: RangeError, call: (b) => b.expertRangeForRank(8, 0, 0) },
  { title: 'epRank == epSize', op: 'expertRangeForRank', arg: 'epRank', cls: RangeError, detail: /4 is outside \[0, epSize = 4\)/, call: (b) => b.expertRangeForRank(8, 4, 4) },
  { title: 'numExperts -1', op: 'expertRangeForRank', arg: 'numExperts', cls: RangeError, call: (b) => b.expertRangeForRank(-1, 4, 0) },
  { title: 'epRank a string', op: 'expertRangeForRank', arg: 'epRank', cls: TypeError, call: (b) => b.expertRangeForRank(8, 4, '1' as never) },
  { title: 'expertId == numExperts', op: 'shouldLoadExpert', arg: 'expertId', cls: RangeError, call: (b) => b.shouldLoadExpert(8, 8, 2, 0) },
  { title: 'epRank beyond epSize', op: 'shouldLoadExpert', arg: 'epRank', cls: RangeError, call: (b) => b.shouldLoadExpert(0, 8, 2, 5) },
  {
    title: 'a stacked tensor of the wrong expert count',
    op: 'splitExpertWeights',
    arg: 'stacked.shape[0]',
    cls: RangeError,
    detail: /expected 2 \(experts 2\.\.4/,
    call: (b) => b.splitExpertWeights(rows, 8, 4, 1),
  },
  { title: 'an int64 stacked tensor', op: 'splitExpertWeights', arg: 'stacked.dtype', cls: TypeError, call: (b) => b.splitExpertWeights(i64([1, 2]), 2, 1, 0) },
  { title: 'a 0-d stacked tensor', op: 'splitExpertWeights', arg: 'stacked.shape', cls: TypeError, call: (b) => b.splitExpertWeights(tensor('float32', []), 2, 1, 0) },
  {
    title: 'a wrong expert count (named tensor)',
    op: 'validateExpertSharding',
    arg: 'layers.3.mlp.experts.down_projs',
    cls: RangeError,
    detail: /has 4 experts in dim 0, expected 2/,
    call: (b) => b.validateExpertSharding([4, 8], 8, 4, 0, 'layers.3.mlp.experts.down_projs'),
  },
  { title: 'a wrong expert count (default name)', op: 'validateExpertSharding', arg: 'tensor', cls: RangeError, call: (b) => b.validateExpertSharding(tensor('float32', [3, 1]), 8, 4, 0) },
  {
    title: 'an unsupported placement',
    op: 'validateExpertSharding',
    arg: 'w',
    cls: RangeError,
    detail: /unsupported placement shard\(1\)/,
    call: (b) => b.validateExpertSharding([2], 8, 4, 0, 'w', 'shard(1)'),
  },
  { title: 'a placement that is not one', op: 'validateExpertSharding', arg: 'placement', cls: TypeError, call: (b) => b.validateExpertSharding([2], 8, 4, 0, 'w', 'sharded' as never) },
  { title: 'a shape of 2.5', op: 'validateExpertSharding', arg: 'w.shape[0]', cls: RangeError, call: (b) => b.validateExpertSharding([2.5], 8, 4, 0, 'w') },
  { title: 'a 0-d shape', op: 'validateExpertSharding', arg: 'w', cls: TypeError, call: (b) => b.validateExpertSharding([], 8, 4, 0, 'w') },
  { title: 'name a number', op: 'validateExpertSharding', arg: 'name', cls: TypeError, call: (b) => b.validateExpertSharding([2], 8, 4, 0, 5 as never) },
  { title: 'epSize 0', op: 'validateExpertSharding', arg: 'epSize', cls: RangeError, call: (b) => b.validateExpertSharding([2], 8, 0, 0, 'w') },
  {
    title: 'a non-expert axis',
    op: 'expertPlacements',
    arg: 'mesh[1].name',
    cls: RangeError,
    detail: /'tp'/,
    call: (b) =>
      b.expertPlacements([
        { name: 'ep', size: 2 },
        { name: 'tp', size: 2 },
      ]),
  },
  { title: 'an axis of size 0', op: 'expertPlacements', arg: 'mesh[0].size', cls: RangeError, call: (b) => b.expertPlacements([{ name: 'ep', size: 0 }]) },
  {
    title: 'an axis listed twice',
    op: 'expertPlacements',
    arg: 'mesh[1].name',
    cls: RangeError,
    call: (b) =>
      b.expertPlacements([
        { name: 'ep', size: 2 },
        { name: 'ep', size: 2 },
      ]),
  },
  { title: 'mesh not an array', op: 'expertPlacements', arg: 'mesh', cls: TypeError, call: (b) => b.expertPlacements({ ep: 2 } as never) },
  { title: 'placements of another length', op: 'splitPlacements', arg: 'placements', cls: RangeError, call: (b) => b.splitPlacements([{ name: 'ep', size: 2 }], []) },
  { title: 'an unknown placement', op: 'splitPlacements', arg: 'placements[0]', cls: TypeError, call: (b) => b.splitPlacements([{ name: 'ep', size: 2 }], ['partial' as never]) },
];

describe.each(backendRows)('errors on %s', (_name, backend) => {
  itThrowsEach(CASES, backend);

  it('the backend still gives right answers after every error', () => {
    for (const c of CASES) expect(() => c.call(backend)).toThrow();
    const out = backend.dropTokens(probs, map, { topk: 1, capacityFactor: 1 });
    // capacity ceil(3 * 1 / 2 * 1) = 2: expert 0 keeps tokens 0, 2; expert 1 keeps tokens 2 (4) and 1 (0.25).
    expect(out.capacity).toBe(2);
    expect(Array.from(out.routingMap.data)).toEqual([1, 0, 0, 1, 1, 1]);
    const sorted = backend.sortChunksByIndex(rows, i32([1, 3]), i32([1, 0]));
    expect(Array.from(sorted.output.data)).toEqual([3, 4, 5, 6, 7, 8, 1, 2]);
  });
});
