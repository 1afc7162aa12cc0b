/**
 * Expert parallelism with the in-process group (ts/ep.ts), on every backend: N ranks in this
 * process dispatch their tokens, run their experts, combine, and run both backward passes. The
 * reference is the one-rank path over all ranks' tokens at once (TokenDispatcher's permute ->
 * the same expert computation -> unpermute, and their backward passes): each expert's block
 * holds the same rows in the same order (source rank, then token), so dispatch, combineBackward
 * and the routing weights' gradients must equal it bit for bit; combine's output and the
 * tokens' gradients must equal, bit for bit, a plain-JS model of the documented merge order
 * (per rank in expert order, then over ranks in rank order, float32 sums rounded to the dtype),
 * and the one-rank result to the rounding that order allows (bit for bit with one rank).
 */
import { describe, expect, it } from 'vitest';

import {
  combine,
  combineBackward,
  createInProcessGroup,
  dispatch,
  dispatchBackward,
  ExpertParallelTimeoutError,
  releaseDispatch,
  TokenDispatcher,
  type Backend,
  type DispatchHandle,
  type ExpertParallelGroup,
  type Tensor,
} from '../ts/index.js';
import { backendRows, registerBackendReport } from './backends.js';
import { bf16Bits, bf16Value, bitsOf, expectSameBits, mismatches, rng } from './util.js';

registerBackendReport();

type Dt = 'float32' | 'bfloat16';

const encode = (dtype: Dt, x: number): number => (dtype === 'float32' ? Math.fround(x) : bf16Bits(x));
const decode = (dtype: Dt, stored: number): number => (dtype === 'float32' ? stored : bf16Value(stored));
/** A value rounded to the dtype, as a number. */
const roundTo = (dtype: Dt, x: number): number => decode(dtype, encode(dtype, x));

function floatTensor(dtype: Dt, shape: number[], values: ArrayLike<number>): Tensor<Dt> {
  const data = dtype === 'float32' ? Float32Array.from(values) : Uint16Array.from(values, (v) => bf16Bits(v));
  return { dtype, shape, data } as Tensor<Dt>;
}

const values = (t: Tensor): number[] => Array.from(t.data as ArrayLike<number>, (v) => decode(t.dtype as Dt, v));

function rowsOf<T extends Tensor>(t: T, start: number, end: number): T {
  const w = t.shape.length > 1 ? t.shape[1] : 1;
  const shape = t.shape.length > 1 ? [end - start, w] : [end - start];
  return { dtype: t.dtype, shape, data: t.data.slice(start * w, end * w) } as unknown as T;
}

function concatRows<T extends Tensor>(parts: T[], width: number): T {
  const n = parts.reduce((a, p) => a + p.shape[0], 0);
  const data = new (parts[0].data.constructor as new (n: number) => T['data'])(n * width);
  let off = 0;
  for (const p of parts) {
    (data as Float32Array).set(p.data as Float32Array, off);
    off += p.data.length;
  }
  return { dtype: parts[0].dtype, shape: width === 1 && parts[0].shape.length === 1 ? [n] : [n, width], data } as unknown as T;
}

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface Case {
  title: string;
  N: number;
  E: number;
  k: number;
  H: number;
  /** Tokens per rank. */
  T: number[];
  dtype: Dt;
  /** Route every pick to rank 0's experts (the other ranks receive nothing). */
  concentrate?: boolean;
  int64?: boolean;
  /** The data has tokens whose EP merge differs from the one-rank merge (so the model check means something). */
  differs?: boolean;
}

interface RankInput {
  x: Tensor<Dt>;
  indices: Tensor<'int32' | 'int64'>;
  weights: Tensor<'float32'>;
  /** `[T * k]` global expert of each pick, -1 masked. */
  picks: number[];
}

function ranges(b: Backend, E: number, N: number) {
  return Array.from({ length: N }, (_, j) => b.expertRangeForRank(E, N, j));
}

/** Random tokens and top-k picks per rank: some tokens routed to no expert, some picks masked. */
function makeInputs(c: Case, b: Backend, seed: number): RankInput[] {
  const random = rng(seed);
  const r0 = ranges(b, c.E, c.N)[0];
  return c.T.map((T) => {
    const x = floatTensor(
      c.dtype,
      [T, c.H],
      Array.from({ length: T * c.H }, () => Math.fround(random() * 4 - 2)),
    );
    const picks: number[] = [];
    const weights: number[] = [];
    for (let t = 0; t < T; t++) {
      const pool = c.concentrate ? Array.from({ length: r0.end - r0.start }, (_, i) => r0.start + i) : Array.from({ length: c.E }, (_, e) => e);
      for (let i = pool.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [pool[i], pool[j]] = [pool[j], pool[i]];
      }
      const none = random() < 0.12;
      for (let p = 0; p < c.k; p++) {
        const masked = none || random() < 0.08;
        picks.push(masked ? -1 : pool[p]);
        weights.push(masked ? 0 : Math.fround(random() * 0.9 + 0.05));
      }
    }
    const indices = c.int64 ? { dtype: 'int64' as const, shape: [T, c.k], data: BigInt64Array.from(picks, BigInt) } : { dtype: 'int32' as const, shape: [T, c.k], data: Int32Array.from(picks) };
    return { x, indices, weights: { dtype: 'float32', shape: [T, c.k], data: Float32Array.from(weights) }, picks };
  });
}

/** The per-expert computation both paths run: element-wise, a different affine map per expert, in float32 rounded to the dtype. */
function experts(tokens: Tensor<Dt>, counts: ArrayLike<number>, firstExpert: number): Tensor<Dt> {
  const H = tokens.shape[1];
  const v = values(tokens);
  const out = new Array<number>(v.length);
  let row = 0;
  for (let l = 0; l < counts.length; l++) {
    const e = firstExpert + l;
    for (let n = 0; n < counts[l]; n++, row++) {
      for (let h = 0; h < H; h++) {
        const a = 0.5 + ((e * 7 + h * 3) % 11) / 8;
        const bias = (((e + h) % 5) - 2) / 16;
        out[row * H + h] = Math.fround(Math.fround(v[row * H + h] * a) + bias);
      }
    }
  }
  return floatTensor(tokens.dtype, [...tokens.shape], out);
}

/**
 * The merge of each token's slots as the EP path documents it: per rank (consecutive slots of
 * one rank's experts) a float32 sum from +0 of `y * p` (or `y`), rounded to the dtype; then the
 * float32 sum of those rows over the ranks, rounded once. `rankOf` = () => 0 is the one-rank merge.
 */
function mergeModel(dtype: Dt, numTokens: number, H: number, slotToken: ArrayLike<number>, slotRank: (i: number) => number, y: number[], probs: ArrayLike<number> | null): number[] {
  const slots: number[][] = Array.from({ length: numTokens }, () => []);
  for (let i = 0; i < slotToken.length; i++) slots[slotToken[i]].push(i);
  const out = new Array<number>(numTokens * H);
  for (let t = 0; t < numTokens; t++) {
    for (let h = 0; h < H; h++) {
      let total = 0;
      let acc = 0;
      let rank = -1;
      for (const i of slots[t]) {
        const r = slotRank(i);
        if (r !== rank) {
          if (rank >= 0) total = Math.fround(total + roundTo(dtype, acc));
          acc = 0;
          rank = r;
        }
        acc = Math.fround(acc + (probs ? Math.fround(y[i * H + h] * probs[i]) : y[i * H + h]));
      }
      if (rank >= 0) total = Math.fround(total + roundTo(dtype, acc));
      out[t * H + h] = encode(dtype, total);
    }
  }
  return out;
}

/** Stored elements (bits for bf16, values for f32) against a model's, as float32/bf16 bits. */
function expectModelBits(got: Tensor, want: number[], what: string): void {
  const wantBits = got.dtype === 'float32' ? bitsOf({ dtype: 'float32', shape: [want.length], data: Float32Array.from(want) }) : want;
  expect(
    mismatches(
      bitsOf(got),
      wantBits,
      (g, w) => g === w,
      (v) => `0x${v.toString(16)}`,
    ),
    `${what}: bits differ from the merge-order model`,
  ).toEqual([]);
}

/** |ep - single| within what a different association of the merge allows (bound per element from the magnitudes summed). */
function expectWithinMerge(got: Tensor, single: Tensor, magnitude: number[], k: number, what: string): void {
  const u = got.dtype === 'float32' ? 2 ** -24 : 2 ** -8;
  const g = values(got);
  const s = values(single);
  const slack = magnitude.map((m) => (got.dtype === 'float32' ? 2 * k * u * m : 4 * u * m) + 1e-30);
  const bad = g.flatMap((v, i) => (Math.abs(v - s[i]) <= slack[i] ? [] : [`[${i}] ${v} vs ${s[i]} (slack ${slack[i]})`]));
  expect(bad.slice(0, 6), `${what}: beyond the merge-order rounding (${bad.length} elements)`).toEqual([]);
}

interface RankRun {
  handle: DispatchHandle;
  permutedTokens: Tensor<Dt>;
  permutedProbs: Tensor<'float32'>;
  tokensPerExpert: Tensor<'int32'>;
  y: Tensor<Dt>;
  output: Tensor<Dt>;
  gradExpertOutputs: Tensor<Dt>;
  gradPermutedProbs: Tensor<'float32'>;
  gradTokens: Tensor<Dt>;
  gradWeights: Tensor<'float32'>;
}

/**
 * Every rank's forward and backward, concurrently: dispatch -> experts -> combine ->
 * combineBackward -> (the experts as identity) dispatchBackward with combine's prob gradients.
 * `delays[r]` postpones rank r's start (the ranks then arrive in another order).
 */
async function runRanks(b: Backend, c: Case, inputs: RankInput[], gradOutputs: Tensor<Dt>[], delays?: number[], wrap?: (g: ExpertParallelGroup) => ExpertParallelGroup): Promise<RankRun[]> {
  const groups = createInProcessGroup(c.N, { timeoutMs: 20_000 });
  return Promise.all(
    groups.map(async (group0, r) => {
      const group = wrap ? wrap(group0) : group0;
      if (delays) await delay(delays[r]);
      const { x, indices, weights } = inputs[r];
      const d = await dispatch(group, b, x, { indices, weights }, { numExperts: c.E });
      const y = experts(d.permutedTokens, d.tokensPerExpert.data, d.handle.expertRange.start);
      const output = await combine(group, b, y, d.handle);
      if (delays) await delay(delays[c.N - 1 - r]);
      const cb = await combineBackward(group, b, gradOutputs[r], d.handle);
      const db = await dispatchBackward(group, b, cb.gradExpertOutputs, d.handle, { gradPermutedProbs: cb.gradPermutedProbs });
      return { handle: d.handle, permutedTokens: d.permutedTokens, permutedProbs: d.permutedProbs, tokensPerExpert: d.tokensPerExpert, y, output, ...cb, ...db } as RankRun;
    }),
  );
}

const CASES: Case[] = [
  { title: 'one rank (bit for bit the one-rank path)', N: 1, E: 4, k: 2, H: 7, T: [13], dtype: 'float32' },
  { title: '2 ranks, E=8, k=2', N: 2, E: 8, k: 2, H: 7, T: [11, 9], dtype: 'float32' },
  { title: '4 ranks, E=8 (divisible), k=3, hidden 37', N: 4, E: 8, k: 3, H: 37, T: [10, 7, 12, 5], dtype: 'float32', differs: true },
  { title: '4 ranks, E=16, k=4', N: 4, E: 16, k: 4, H: 8, T: [12, 12, 12, 12], dtype: 'float32', differs: true },
  { title: '4 ranks, E=6 (not divisible: 2, 2, 1, 1), k=2, int64 indices', N: 4, E: 6, k: 2, H: 6, T: [9, 9, 4, 8], dtype: 'float32', int64: true },
  { title: '4 ranks, E=3 (rank 3 holds no expert), k=2', N: 4, E: 3, k: 2, H: 5, T: [6, 5, 7, 3], dtype: 'float32' },
  { title: '2 ranks, k=1', N: 2, E: 5, k: 1, H: 9, T: [12, 10], dtype: 'float32' },
  { title: '2 ranks, a rank with no tokens', N: 2, E: 4, k: 2, H: 4, T: [9, 0], dtype: 'float32' },
  { title: '4 ranks, every pick on rank 0 (ranks 1-3 receive nothing)', N: 4, E: 8, k: 2, H: 6, T: [5, 6, 4, 7], dtype: 'float32', concentrate: true },
  { title: 'bfloat16, one rank', N: 1, E: 5, k: 3, H: 5, T: [11], dtype: 'bfloat16' },
  { title: 'bfloat16, 2 ranks, k=1, hidden 5 (odd rows of bytes)', N: 2, E: 5, k: 1, H: 5, T: [10, 8], dtype: 'bfloat16' },
  { title: 'bfloat16, 2 ranks, k=2', N: 2, E: 6, k: 2, H: 12, T: [9, 11], dtype: 'bfloat16', differs: true },
  { title: 'bfloat16, 4 ranks, E=6, k=3, hidden 40', N: 4, E: 6, k: 3, H: 40, T: [8, 6, 9, 7], dtype: 'bfloat16', differs: true },
];

describe.each(backendRows)('expert parallelism on %s', (_name, b) => {
  it.each(CASES)('$title: dispatch, combine and their backward equal the one-rank path', async (c) => {
    const seed = c.N * 1000 + c.E * 10 + c.k + c.H * 7 + (c.dtype === 'bfloat16' ? 5 : 0);
    const inputs = makeInputs(c, b, seed);
    const random = rng(seed + 1);
    const gradOutputs = c.T.map((T) =>
      floatTensor(
        c.dtype,
        [T, c.H],
        Array.from({ length: T * c.H }, () => Math.fround(random() * 2 - 1)),
      ),
    );
    const rs = ranges(b, c.E, c.N);
    const runs = await runRanks(b, c, inputs, gradOutputs);

    // The one-rank path over every rank's tokens (rank 0's first).
    const base = c.T.map((_, r) => c.T.slice(0, r).reduce((a, t) => a + t, 0));
    const total = c.T.reduce((a, t) => a + t, 0);
    const xAll = concatRows(
      inputs.map((i) => i.x),
      c.H,
    );
    const iAll = { dtype: 'int32' as const, shape: [total, c.k], data: Int32Array.from(inputs.flatMap((i) => i.picks)) };
    const wAll = concatRows(
      inputs.map((i) => i.weights),
      c.k,
    );
    const one = new TokenDispatcher(b, { numExperts: c.E, topk: c.k });
    const ref = one.tokenPermutation(xAll, { indices: iAll, weights: wAll });
    // the one-rank permutation's sortedIndices (TokenDispatcher keeps them to itself): permute's plan of the same map
    const sortedT = b.permutePlan(b.indicesToMultihot(iAll, wAll, c.E).routingMap).sortedIndices;
    const refSorted = sortedT.data;
    const yRef = experts(ref.permutedTokens as Tensor<Dt>, ref.tokensPerExpert.data, 0);
    const refOut = b.unpermute(yRef, sortedT, [total, c.H], { probs: ref.permutedProbs });
    const gAll = concatRows(gradOutputs, c.H);
    const refUb = b.unpermuteBackward(gAll, yRef, sortedT, { probs: ref.permutedProbs });
    const refBack = one.tokenPermutationBackward(refUb.gradPermuted, refUb.gradProbs);
    const offsets = [0];
    for (const n of ref.tokensPerExpert.data) offsets.push(offsets.at(-1)! + n);
    const ownerOf = (e: number) => rs.findIndex((r) => e >= r.start && e < r.end);
    const slotRanks = new Array<number>(refSorted.length);
    for (let e = 0; e < c.E; e++) slotRanks.fill(ownerOf(e), offsets[e], offsets[e + 1]);
    const slotRank = (i: number) => slotRanks[i];

    runs.forEach((run, j) => {
      const { start, end } = rs[j];
      const [s0, s1] = [offsets[start], offsets[end]];
      const tag = `rank ${j}`;
      // dispatch: this rank's experts' blocks of the one-rank permutation, bit for bit.
      expect(run.handle.expertRange).toEqual(rs[j]);
      expect(Array.from(run.tokensPerExpert.data), `${tag} tokensPerExpert`).toEqual(Array.from(ref.tokensPerExpert.data.slice(start, end)));
      expectSameBits(run.permutedTokens, rowsOf(ref.permutedTokens as Tensor<Dt>, s0, s1), `${tag} permutedTokens`);
      expectSameBits(run.permutedProbs, rowsOf(ref.permutedProbs, s0, s1), `${tag} permutedProbs`);
      // each token once to each rank holding one of its experts
      const wantSend = rs.map((rr) =>
        c.T[j] === 0 ? 0 : Array.from({ length: c.T[j] }, (_, t) => inputs[j].picks.slice(t * c.k, (t + 1) * c.k).some((e) => e >= rr.start && e < rr.end)).filter(Boolean).length,
      );
      expect(run.handle.sendCounts, `${tag} sendCounts`).toEqual(wantSend);
      expect(run.handle.recvCounts, `${tag} recvCounts`).toEqual(runs.map((o) => o.handle.sendCounts[j]));
      // combineBackward: the one-rank unpermuteBackward's slots, bit for bit.
      expectSameBits(run.gradExpertOutputs, rowsOf(refUb.gradPermuted as Tensor<Dt>, s0, s1), `${tag} gradExpertOutputs`);
      expectSameBits(run.gradPermutedProbs, rowsOf(refUb.gradProbs!, s0, s1), `${tag} gradPermutedProbs`);
    });

    const yVals = values(yRef);
    const gVals = values(refUb.gradPermuted as Tensor<Dt>);
    // The model of the merge with one rank is the library's own one-rank merge (so the model's arithmetic is the core's).
    expectModelBits(
      refOut,
      mergeModel(c.dtype, total, c.H, refSorted, () => 0, yVals, ref.permutedProbs.data),
      'one-rank unpermute',
    );
    expectModelBits(
      refBack.gradHidden,
      mergeModel(c.dtype, total, c.H, refSorted, () => 0, gVals, null),
      'one-rank permuteBackward',
    );
    const epOut = mergeModel(c.dtype, total, c.H, refSorted, slotRank, yVals, ref.permutedProbs.data);
    const epGrad = mergeModel(c.dtype, total, c.H, refSorted, slotRank, gVals, null);
    const oneOut = mergeModel(c.dtype, total, c.H, refSorted, () => 0, yVals, ref.permutedProbs.data);
    const differing = epOut.filter((v, i) => v !== oneOut[i]).length;
    if (c.differs) expect(differing, 'elements where the EP merge order changes the bits').toBeGreaterThan(0);
    if (c.N === 1 || (c.k <= 2 && c.dtype === 'float32')) expect(differing).toBe(0);
    const magOut = new Array<number>(total * c.H).fill(0);
    const magGrad = new Array<number>(total * c.H).fill(0);
    for (let i = 0; i < refSorted.length; i++) {
      for (let h = 0; h < c.H; h++) {
        magOut[refSorted[i] * c.H + h] += Math.abs(yVals[i * c.H + h] * ref.permutedProbs.data[i]);
        magGrad[refSorted[i] * c.H + h] += Math.abs(gVals[i * c.H + h]);
      }
    }
    runs.forEach((run, r) => {
      const [t0, t1] = [base[r], base[r] + c.T[r]];
      const tag = `rank ${r}`;
      expectModelBits(run.output, epOut.slice(t0 * c.H, t1 * c.H), `${tag} combine output`);
      expectModelBits(run.gradTokens, epGrad.slice(t0 * c.H, t1 * c.H), `${tag} gradTokens`);
      if (c.N === 1) {
        expectSameBits(run.output, refOut, `${tag} combine output against one rank`);
        expectSameBits(run.gradTokens, refBack.gradHidden, `${tag} gradTokens against one rank`);
      } else {
        expectWithinMerge(run.output, rowsOf(refOut, t0, t1), magOut.slice(t0 * c.H, t1 * c.H), c.k, `${tag} combine output`);
        expectWithinMerge(run.gradTokens, rowsOf(refBack.gradHidden, t0, t1), magGrad.slice(t0 * c.H, t1 * c.H), c.k, `${tag} gradTokens`);
      }
      expectSameBits(run.gradWeights, rowsOf(refBack.gradWeights!, t0, t1), `${tag} gradWeights`);
      // tokens routed to no expert: zero output and zero gradient
      for (let t = 0; t < c.T[r]; t++) {
        if (inputs[r].picks.slice(t * c.k, (t + 1) * c.k).every((e) => e < 0)) {
          expect(values(rowsOf(run.output, t, t + 1)).every((v) => v === 0)).toBe(true);
          expect(values(rowsOf(run.gradTokens, t, t + 1)).every((v) => v === 0)).toBe(true);
        }
      }
    });
    if (c.concentrate) for (let j = 1; j < c.N; j++) expect(runs[j].handle.numSlots).toBe(0);

    // Bit-identical from run to run, whatever order the ranks arrive in.
    const again = await runRanks(
      b,
      c,
      inputs,
      gradOutputs,
      Array.from({ length: c.N }, (_, r) => (c.N - r) * 3),
    );
    again.forEach((run, r) => {
      for (const key of ['permutedTokens', 'permutedProbs', 'output', 'gradExpertOutputs', 'gradPermutedProbs', 'gradTokens', 'gradWeights'] as const) {
        expectSameBits(run[key], runs[r][key], `rank ${r} ${key}, second run`);
      }
    });
  });

  it('sends each token once to each rank that needs it, not once per expert', async () => {
    const c: Case = { title: '', N: 2, E: 8, k: 4, H: 6, T: [16, 12], dtype: 'float32' };
    const inputs = makeInputs(c, b, 77);
    const rs = ranges(b, c.E, c.N);
    const sent: number[][][] = [[], []];
    const wrap = (g: ExpertParallelGroup): ExpertParallelGroup => ({
      rank: g.rank,
      size: g.size,
      allGather: (v, label) => g.allGather(v, label),
      allToAllV: (send, recvBytes, label) => {
        sent[g.rank].push(send.map((s) => s.byteLength));
        return g.allToAllV(send, recvBytes, label);
      },
    });
    const grads = c.T.map((T) => floatTensor('float32', [T, c.H], new Array(T * c.H).fill(1)));
    await runRanks(b, c, inputs, grads, undefined, wrap);
    let sharing = 0;
    for (let r = 0; r < c.N; r++) {
      const perRank = rs.map(() => 0);
      const perExpert = rs.map(() => 0);
      for (let t = 0; t < c.T[r]; t++) {
        const picks = inputs[r].picks.slice(t * c.k, (t + 1) * c.k).filter((e) => e >= 0);
        rs.forEach((rr, j) => {
          const here = picks.filter((e) => e >= rr.start && e < rr.end).length;
          perRank[j] += here > 0 ? 1 : 0;
          perExpert[j] += here;
          if (here > 1) sharing++;
        });
      }
      // dispatch's exchange: a row (H float32) and its k picks (int32 + float32) per token and rank
      expect(sent[r][0], `rank ${r} dispatch bytes`).toEqual(perRank.map((n) => n * (c.H * 4 + 8 * c.k)));
      // combine sends one row per received token back; combineBackward one row per sent token
      expect(sent[r][2], `rank ${r} combineBackward bytes`).toEqual(perRank.map((n) => n * c.H * 4));
      expect(perRank.reduce((a, n) => a + n, 0)).toBeLessThan(perExpert.reduce((a, n) => a + n, 0));
    }
    expect(sharing, 'the problem has tokens with several experts on one rank').toBeGreaterThan(0);
  });

  it('runs real experts (expertsForward weighted by the probs, combine unweighted) as the one-rank layer chain does, backward included', async () => {
    const [N, E, k, D, I] = [2, 6, 2, 16, 12];
    const c: Case = { title: '', N, E, k, H: D, T: [14, 11], dtype: 'float32' };
    const inputs = makeInputs(c, b, 5);
    const random = rng(9);
    const w = (shape: number[]) =>
      floatTensor(
        'float32',
        shape,
        Array.from({ length: shape.reduce((a, s) => a * s, 1) }, () => Math.fround((random() * 2 - 1) * 0.3)),
      );
    const gateUp = w([E, D, 2 * I]);
    const down = w([E, I, D]);
    const slice = (t: Tensor<Dt>, e0: number, e1: number) => {
      const per = t.data.length / E;
      return { dtype: t.dtype, shape: [e1 - e0, ...t.shape.slice(1)], data: t.data.slice(e0 * per, e1 * per) } as Tensor<Dt>;
    };
    const gradOut = c.T.map((T) =>
      floatTensor(
        'float32',
        [T, D],
        Array.from({ length: T * D }, () => Math.fround(random() - 0.5)),
      ),
    );
    const exact = b.name === 'cpu' || b.name === 'wasm';
    const groups = createInProcessGroup(N);
    const runs = await Promise.all(
      groups.map(async (g, r) => {
        const { x, indices, weights } = inputs[r];
        const d = await dispatch(g, b, x, { indices, weights }, { numExperts: E });
        const { start, end } = d.handle.expertRange;
        const ew = { gateAndUpProjs: slice(gateUp, start, end), downProjs: slice(down, start, end) };
        const opts = { activation: 'swiglu' as const, permutedProbs: d.permutedProbs };
        const y = b.expertsForward(d.permutedTokens, d.tokensPerExpert, ew, opts);
        const output = await combine(g, b, y, d.handle, { weighted: false });
        const cb = await combineBackward(g, b, gradOut[r], d.handle);
        expect(cb.gradPermutedProbs).toBeUndefined();
        const eb = b.expertsBackward(cb.gradExpertOutputs, d.permutedTokens, d.tokensPerExpert, ew, opts);
        const db = await dispatchBackward(g, b, eb.gradTokens, d.handle, { gradPermutedProbs: eb.gradProbs });
        return { d, y, output, eb, db };
      }),
    );
    // The one-rank chain over both ranks' tokens.
    const xAll = concatRows(
      inputs.map((i) => i.x),
      D,
    );
    const total = c.T[0] + c.T[1];
    const iAll = { dtype: 'int32' as const, shape: [total, k], data: Int32Array.from(inputs.flatMap((i) => i.picks)) };
    const wAll = concatRows(
      inputs.map((i) => i.weights),
      k,
    );
    const one = new TokenDispatcher(b, { numExperts: E, topk: k });
    const p = one.tokenPermutation(xAll, { indices: iAll, weights: wAll });
    const opts = { activation: 'swiglu' as const, permutedProbs: p.permutedProbs };
    const yAll = b.expertsForward(p.permutedTokens, p.tokensPerExpert, { gateAndUpProjs: gateUp, downProjs: down }, opts);
    const outAll = one.tokenUnpermutation(yAll);
    const gAll = one.tokenUnpermutationBackward(concatRows(gradOut, D));
    const ebAll = b.expertsBackward(gAll, p.permutedTokens, p.tokensPerExpert, { gateAndUpProjs: gateUp, downProjs: down }, opts);
    const back = one.tokenPermutationBackward(ebAll.gradTokens, ebAll.gradProbs);
    const offsets = [0];
    for (const n of p.tokensPerExpert.data) offsets.push(offsets.at(-1)! + n);
    runs.forEach(({ d, y, output, eb, db }, r) => {
      const { start, end } = d.handle.expertRange;
      const [s0, s1] = [offsets[start], offsets[end]];
      const t0 = r === 0 ? 0 : c.T[0];
      const close = (got: Tensor, want: Tensor, what: string, tol: number) => {
        const bad = mismatches(got.data as Float32Array, want.data as Float32Array, (a, z) => Math.abs(a - z) <= tol * (1 + Math.abs(z)));
        expect(bad, what).toEqual([]);
      };
      const same = (got: Tensor, want: Tensor, what: string) => (exact ? expectSameBits(got, want, what) : close(got, want, what, 1e-5));
      same(y, rowsOf(yAll, s0, s1), `rank ${r} expert outputs`);
      same(eb.gradTokens, rowsOf(ebAll.gradTokens, s0, s1), `rank ${r} expert token gradients`);
      same(eb.gradDownProjs, slice(ebAll.gradDownProjs as Tensor<Dt>, start, end), `rank ${r} down-projection gradients`);
      same(eb.gradGateAndUpProjs!, slice(ebAll.gradGateAndUpProjs as Tensor<Dt>, start, end), `rank ${r} gate/up-projection gradients`);
      same(db.gradWeights, rowsOf(back.gradWeights!, t0, t0 + c.T[r]), `rank ${r} routing weights' gradient`);
      close(output, rowsOf(outAll, t0, t0 + c.T[r]), `rank ${r} output`, 1e-6);
      close(db.gradTokens, rowsOf(back.gradHidden, t0, t0 + c.T[r]), `rank ${r} token gradients`, 1e-6);
    });
  });

  describe('errors', () => {
    const x = floatTensor('float32', [2, 3], [1, 2, 3, 4, 5, 6]);
    const indices = { dtype: 'int32' as const, shape: [2, 2], data: Int32Array.from([0, 1, 2, -1]) };
    const weights = { dtype: 'float32' as const, shape: [2, 2], data: Float32Array.from([0.5, 0.5, 1, 0]) };
    const routing = { indices, weights };

    it('createInProcessGroup refuses bad sizes and options, naming them', () => {
      expect(() => createInProcessGroup(0)).toThrow(RangeError);
      expect(() => createInProcessGroup(0)).toThrow(/^size: expected an integer >= 1, got 0/);
      expect(() => createInProcessGroup(2.5)).toThrow(/^size: expected an integer >= 1, got 2.5/);
      expect(() => createInProcessGroup('2' as never)).toThrow(TypeError);
      expect(() => createInProcessGroup('2' as never)).toThrow(/^size: expected a number, got string/);
      expect(() => createInProcessGroup(2, { timeout: 5 } as never)).toThrow(/^options.timeout: not an option of createInProcessGroup/);
      expect(() => createInProcessGroup(2, { timeoutMs: -1 })).toThrow(RangeError);
      expect(() => createInProcessGroup(2, { timeoutMs: 'soon' as never })).toThrow(/^options.timeoutMs: expected a number, got string/);
      expect(() => createInProcessGroup(2, { device: {} as never })).toThrow(TypeError);
      expect(() => createInProcessGroup(2, { device: { upload: 'no' } as never })).toThrow(/^options.device: expected a cuda backend \(its upload\(\)\), got object/);
      // only a group given a cuda backend moves device tensors
      expect(createInProcessGroup(2)[0].allToAllVDevice).toBeUndefined();
      expect(createInProcessGroup(3).map((g) => [g.rank, g.size])).toEqual([
        [0, 3],
        [1, 3],
        [2, 3],
      ]);
    });

    it('dispatch refuses bad arguments with TypeError/RangeError naming them', async () => {
      const [g] = createInProcessGroup(1);
      const cases: [unknown[], ErrorConstructor, RegExp][] = [
        [[g, b, 'x', routing, { numExperts: 4 }], TypeError, /^dispatch: tokens: expected a Tensor/],
        [[g, b, floatTensor('float32', [6], [1, 2, 3, 4, 5, 6]), routing, { numExperts: 4 }], RangeError, /^dispatch: tokens.shape: expected \[numTokens, hidden\], got \[6\]/],
        [[g, b, x, { indices }, { numExperts: 4 }], TypeError, /^dispatch: routing: expected \{ indices, weights \}/],
        [[g, b, x, { indices: { ...indices, shape: [1, 4] }, weights }, { numExperts: 4 }], RangeError, /^dispatch: routing.indices.shape: expected \[2, k\]/],
        [[g, b, x, { indices, weights: { ...weights, shape: [4, 1] } }, { numExperts: 4 }], RangeError, /^dispatch: routing.weights.shape: expected \[2, 2\]/],
        [[g, b, x, routing, {}], TypeError, /^dispatch: options.numExperts: expected a number \(required\)/],
        [[g, b, x, routing, { numExperts: 0 }], RangeError, /^dispatch: options.numExperts: expected an integer >= 1, got 0/],
        [[g, b, x, routing, { numExperts: 4, topk: 2 }], TypeError, /^dispatch: options.topk: not an option of dispatch/],
        [[g, b, x, routing, { numExperts: 2 }], RangeError, /^dispatch: routing.indices: element \[1\]\[0\] = 2 is outside \[0, numExperts = 2\)/],
        [[g, b, x, { indices: { ...indices, data: Int32Array.from([1, 1, 0, 2]) }, weights }, { numExperts: 4 }], RangeError, /^dispatch: routing.indices: row 0 lists expert 1 more than once/],
        // int64 picks: one past int32 is named by its exact value, one of -2 as it is
        [
          [g, b, x, { indices: { dtype: 'int64', shape: [2, 2], data: BigInt64Array.from([0n, 1n, 9007199254740993n, 2n]) }, weights }, { numExperts: 4 }],
          RangeError,
          /^dispatch: routing.indices: element \[1\]\[0\] = 9007199254740993 is outside \[0, numExperts = 4\)/,
        ],
        [
          [g, b, x, { indices: { dtype: 'int64', shape: [2, 2], data: BigInt64Array.from([0n, -2n, 3n, 2n]) }, weights }, { numExperts: 4 }],
          RangeError,
          /^dispatch: routing.indices: element \[0\]\[1\] = -2 is outside/,
        ],
        [
          [g, b, x, { indices: { dtype: 'int64', shape: [2, 2], data: BigInt64Array.from([3n, 3n, 0n, 2n]) }, weights }, { numExperts: 4 }],
          RangeError,
          /^dispatch: routing.indices: row 0 lists expert 3 more than once/,
        ],
        [[{ rank: 0 }, b, x, routing, { numExperts: 4 }], TypeError, /^dispatch: group: expected an ExpertParallelGroup/],
        [[g, {}, x, routing, { numExperts: 4 }], TypeError, /^dispatch: backend: expected a Backend/],
      ];
      for (const [args, cls, message] of cases) {
        const err = await (dispatch as (...a: unknown[]) => Promise<unknown>)(...args).then(
          () => undefined,
          (e: Error) => e,
        );
        expect(err, String(message)).toBeInstanceOf(Error);
        expect(err!.constructor, `${message}: ${err!.message}`).toBe(cls);
        expect(err!.message).toMatch(message);
      }
    });

    it('combine and the backward passes refuse bad handles, shapes, dtypes and order', async () => {
      const [g] = createInProcessGroup(1);
      const [other] = createInProcessGroup(1);
      const d = await dispatch(g, b, x, routing, { numExperts: 4 });
      const y = d.permutedTokens;
      expect(d.handle.numSlots).toBe(3);
      await expect(combine(g, b, y, {} as never)).rejects.toThrow(/^combine: handle: expected the handle dispatch returned/);
      await expect(combine(other, b, y, d.handle)).rejects.toThrow(RangeError);
      await expect(combine(other, b, y, d.handle)).rejects.toThrow(/^combine: handle: made by the dispatch of rank 0 of another group handle/);
      await expect(combine(g, b, rowsOf(y, 0, 2), d.handle)).rejects.toThrow(/^combine: expertOutputs.shape: expected \[3, 3\]/);
      await expect(combine(g, b, floatTensor('bfloat16', [3, 3], new Array(9).fill(1)), d.handle)).rejects.toThrow(TypeError);
      await expect(combine(g, b, y, d.handle, { weighted: 'yes' } as never)).rejects.toThrow(/^combine: options.weighted: expected a boolean/);
      await expect(combineBackward(g, b, x, d.handle)).rejects.toThrow(/^combineBackward: call combine with this handle first/);
      await expect(dispatchBackward(g, b, y, d.handle, { gradPermutedProbs: { dtype: 'float32', shape: [2], data: new Float32Array(2) } })).rejects.toThrow(
        /^dispatchBackward: options.gradPermutedProbs.shape: expected \[3\]/,
      );
      await expect(dispatchBackward(g, b, x, d.handle)).rejects.toThrow(/^dispatchBackward: gradPermuted.shape: expected \[3, 3\]/);
      const out = await combine(g, b, y, d.handle);
      await expect(combineBackward(g, b, rowsOf(out, 0, 1), d.handle)).rejects.toThrow(/^combineBackward: gradOutput.shape: expected \[2, 3\]/);
      // released: the handle is refused by every call after (twice is a no-op); only a handle is taken
      expect((await combineBackward(g, b, out, d.handle)).gradExpertOutputs.shape).toEqual([3, 3]);
      releaseDispatch(d.handle);
      releaseDispatch(d.handle);
      for (const call of [() => combine(g, b, y, d.handle), () => combineBackward(g, b, out, d.handle), () => dispatchBackward(g, b, y, d.handle)]) {
        await expect(call()).rejects.toThrow(/: handle: expected a handle not yet released, got one passed to releaseDispatch$/);
      }
      expect(() => releaseDispatch({} as never)).toThrow(/^releaseDispatch: handle: expected the handle dispatch returned/);
    });

    it("allToAllVDevice's countsAgreed option is checked, naming it", async () => {
      // (a group given a stand-in device: the option is checked before the tensor)
      const [g] = createInProcessGroup(1, { device: { upload: (t: Tensor) => t } as never });
      await expect(g.allToAllVDevice!(undefined as never, [0], [0], 'probe', { countsAgreed: 1 } as never)).rejects.toThrow(/^probe: allToAllVDevice: options\.countsAgreed: expected a boolean/);
      await expect(g.allToAllVDevice!(undefined as never, [0], [0], 'probe', { agreed: true } as never)).rejects.toThrow(/^probe: allToAllVDevice: options\.agreed: not an option/);
      await expect(g.allToAllVDevice!(undefined as never, [0], [0], 'probe', { countsAgreed: true })).rejects.toThrow(/^probe: allToAllVDevice: send: expected a/);
    });

    it('ranks that disagree on numExperts, hidden or dtype all reject, naming what differs', async () => {
      const groups = createInProcessGroup(2);
      const results = await Promise.allSettled([dispatch(groups[0], b, x, routing, { numExperts: 4 }), dispatch(groups[1], b, x, routing, { numExperts: 5 })]);
      for (const r of results) {
        expect(r.status).toBe('rejected');
        const e = (r as PromiseRejectedResult).reason as Error;
        expect(e).toBeInstanceOf(RangeError);
        expect(e.message).toMatch(/^dispatch: the ranks disagree on numExperts: rank 0 has 4, rank 1 has 5/);
      }
      const g2 = createInProcessGroup(2);
      const bf = floatTensor('bfloat16', [2, 3], [1, 2, 3, 4, 5, 6]);
      const r2 = await Promise.allSettled([dispatch(g2[0], b, x, routing, { numExperts: 4 }), dispatch(g2[1], b, bf, routing, { numExperts: 4 })]);
      for (const r of r2) expect(((r as PromiseRejectedResult).reason as Error).message).toMatch(/disagree on tokens.dtype: rank 0 has float32, rank 1 has bfloat16/);
    });

    it('a rank that never joins makes the others reject after timeoutMs, naming it; the group is then aborted', async () => {
      const groups = createInProcessGroup(3, { timeoutMs: 60 });
      const t0 = Date.now();
      const pending = [dispatch(groups[0], b, x, routing, { numExperts: 4 }), dispatch(groups[2], b, x, routing, { numExperts: 4 })];
      for (const p of pending) {
        const e = await p.then(
          () => undefined,
          (err: Error) => err,
        );
        expect(e).toBeInstanceOf(ExpertParallelTimeoutError);
        expect(e!.message).toMatch(/^dispatch: rank 1 of 3 did not join collective #0 \(allGather\) within 60 ms/);
        expect((e as ExpertParallelTimeoutError).missingRanks).toEqual([1]);
      }
      expect(Date.now() - t0).toBeGreaterThanOrEqual(55);
      await expect(dispatch(groups[1], b, x, routing, { numExperts: 4 })).rejects.toThrow(/^dispatch: rank 1: the expert-parallel group was aborted \(dispatch: rank 1 of 3 did not join/);
    });

    it('a rank whose arguments are refused fails at once; the others time out naming it', async () => {
      const groups = createInProcessGroup(2, { timeoutMs: 40 });
      const [a, z] = await Promise.allSettled([dispatch(groups[0], b, x, routing, { numExperts: 4 }), dispatch(groups[1], b, x, routing, {} as never)]);
      expect(((z as PromiseRejectedResult).reason as Error).message).toMatch(/^dispatch: options.numExperts/);
      const e = (a as PromiseRejectedResult).reason as ExpertParallelTimeoutError;
      expect(e).toBeInstanceOf(ExpertParallelTimeoutError);
      expect(e.missingRanks).toEqual([1]);
    });

    it('the in-process transport checks its calls: the same collective on every rank, matching byte counts, well-formed arguments', async () => {
      const g = createInProcessGroup(2);
      const mixed = await Promise.allSettled([g[0].allGather(Int32Array.of(1), 'combine'), g[1].allToAllV([new Uint8Array(1), new Uint8Array(1)], [1, 1], 'dispatch')]);
      for (const r of mixed) expect(((r as PromiseRejectedResult).reason as Error).message).toMatch(/collective #0: rank 0 called combine \(allGather\), rank 1 called dispatch \(allToAllV\)/);
      const h = createInProcessGroup(2);
      const sizes = await Promise.allSettled([h[0].allToAllV([new Uint8Array(2), new Uint8Array(3)], [2, 4]), h[1].allToAllV([new Uint8Array(4), new Uint8Array(1)], [2, 1])]);
      for (const r of sizes) {
        const e = (r as PromiseRejectedResult).reason as Error;
        expect(e).toBeInstanceOf(RangeError);
        expect(e.message).toMatch(/^allToAllV: rank 1 expects 2 bytes from rank 0, which sends 3$/);
      }
      const [one] = createInProcessGroup(1);
      await expect(one.allToAllV([], [])).rejects.toThrow(RangeError);
      await expect(one.allToAllV([new Uint8Array(1)], [])).rejects.toThrow(/recvBytes: expected one count per rank \(1\), got 0/);
      await expect(one.allToAllV([[1] as never], [1])).rejects.toThrow(/send\[0\]: expected a Uint8Array, got an Array/);
      await expect(one.allGather([1] as never)).rejects.toThrow(TypeError);
      // and a working exchange: each rank gets what the others addressed to it, as copies
      const k = createInProcessGroup(2);
      const mine = Uint8Array.of(7);
      const [r0, r1] = await Promise.all([k[0].allToAllV([Uint8Array.of(1), Uint8Array.of(2, 3)], [1, 1]), k[1].allToAllV([mine, Uint8Array.of(9)], [2, 1])]);
      expect(r0.map((u) => [...u])).toEqual([[1], [7]]);
      expect(r1.map((u) => [...u])).toEqual([[2, 3], [9]]);
      mine[0] = 0;
      expect(r0[1][0]).toBe(7);
    });
  });
});
