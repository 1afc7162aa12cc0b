/**
 * TokenDispatcher (one rank's dispatch chain) and the topk op it uses, on every backend,
 * against a pure-JS reference of the whole chain written here: top-k (descending, ties to the
 * lower expert), masking of zero-prob picks under a capacity factor, padding of each expert to
 * a multiple with the lowest unselected tokens, expert-major permutation.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { TokenDispatcher, tensor, type Backend, type Tensor } from '../ts/index.js';
import { backendRows, cpuBackends, registerBackendReport } from './backends.js';
import { bitsOf, rng } from './util.js';

registerBackendReport();

interface Ref {
  sorted: number[];
  expertOf: number[];
  tokensPerExpert: number[];
  probs: number[];
  selected: boolean[];
}

/** The chain in plain JS: the reference every backend's dispatcher is compared with. */
function referenceChain(probs: Float32Array, T: number, E: number, k: number, capacity: boolean, padMultiple: number): Ref {
  const map: boolean[] = new Array(T * E).fill(false);
  const dense = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    const order = Array.from({ length: E }, (_, e) => e).sort((a, b) => probs[t * E + b] - probs[t * E + a] || a - b);
    for (const e of order.slice(0, k)) {
      const p = probs[t * E + e];
      if (capacity && p === 0) continue;
      map[t * E + e] = true;
      dense[t * E + e] = p;
    }
  }
  const selected = [...map];
  if (padMultiple > 1) {
    for (let e = 0; e < E; e++) {
      let count = 0;
      for (let t = 0; t < T; t++) count += map[t * E + e] ? 1 : 0;
      let need = (padMultiple - (count % padMultiple)) % padMultiple;
      for (let t = 0; t < T && need > 0; t++) {
        if (!map[t * E + e]) {
          map[t * E + e] = true;
          need--;
        }
      }
    }
  }
  const sorted: number[] = [];
  const expertOf: number[] = [];
  const tokensPerExpert: number[] = [];
  const slotProbs: number[] = [];
  for (let e = 0; e < E; e++) {
    let c = 0;
    for (let t = 0; t < T; t++) {
      if (map[t * E + e]) {
        sorted.push(t);
        expertOf.push(e);
        slotProbs.push(dense[t * E + e]);
        c++;
      }
    }
    tokensPerExpert.push(c);
  }
  return { sorted, expertOf, tokensPerExpert, probs: slotProbs, selected };
}

/** Router-like probs: a softmax per row, with a few exact ties and zeros mixed in. */
function routerProbs(random: () => number, T: number, E: number, zeros: boolean): Float32Array {
  const p = new Float32Array(T * E);
  for (let t = 0; t < T; t++) {
    let sum = 0;
    for (let e = 0; e < E; e++) {
      const v = random() < 0.15 ? 1 : Math.exp(random() * 4);
      p[t * E + e] = v;
      sum += v;
    }
    for (let e = 0; e < E; e++) p[t * E + e] = zeros && random() < 0.3 ? 0 : p[t * E + e] / sum;
  }
  return p;
}

function hiddenOf(random: () => number, T: number, H: number): Tensor<'float32'> {
  return tensor(
    'float32',
    [T, H],
    Float32Array.from({ length: T * H }, () => Math.round(random() * 16 - 8)),
  );
}

describe.each(backendRows)('topk on %s', (_name, b) => {
  it('returns each row largest first, ties to the lower column', () => {
    const v = tensor('float32', [2, 4], [0.1, 0.5, 0.5, 0.3, -1, 2, -0, 0]);
    const out = b.topk(v, 3);
    expect(Array.from(out.indices.data)).toEqual([1, 2, 3, 1, 2, 3]);
    expect(Array.from(out.values.data)).toEqual([0.5, 0.5, Math.fround(0.3), 2, -0, 0]);
    expect(out.indices.shape).toEqual([2, 3]);
  });
  it('refuses k out of range and NaN with RangeErrors naming them', () => {
    const v = tensor('float32', [1, 3], [1, NaN, 0]);
    expect(() => b.topk(tensor('float32', [1, 3], [1, 2, 3]), 4)).toThrow(/^topk: k: expected 1 <= k <= numExperts = 3, got 4/);
    expect(() => b.topk(v, 1)).toThrow(RangeError);
    expect(() => b.topk(v, 1)).toThrow(/^topk: values: element \[0\]\[1\] is NaN/);
  });
});

describe.each(backendRows)('TokenDispatcher on %s', (_name, b) => {
  const cases = [
    { T: 17, E: 8, k: 2, H: 5, capacity: false, pad: 1 },
    { T: 33, E: 16, k: 4, H: 3, capacity: true, pad: 1 },
    { T: 20, E: 6, k: 3, H: 4, capacity: true, pad: 4 },
    { T: 9, E: 4, k: 4, H: 1, capacity: false, pad: 8 },
    { T: 0, E: 4, k: 2, H: 3, capacity: false, pad: 2 },
  ];
  it.each(cases)('matches the reference chain (T=$T E=$E k=$k capacity=$capacity padMultiple=$pad)', ({ T, E, k, H, capacity, pad }) => {
    const random = rng(T * 131 + E * 7 + k);
    const probs = routerProbs(random, T, E, capacity);
    const hidden = hiddenOf(random, T, H);
    const d = new TokenDispatcher(b, { numExperts: E, topk: k, capacityFactor: capacity ? 1.0 : undefined, padMultiple: pad });
    const out = d.tokenPermutation(hidden, tensor('float32', [T, E], probs));
    const ref = referenceChain(probs, T, E, k, capacity, pad);

    expect(Array.from(out.tokensPerExpert.data)).toEqual(ref.tokensPerExpert);
    expect(Array.from(out.permutedProbs.data)).toEqual(ref.probs);
    const want = ref.sorted.flatMap((t) => Array.from(hidden.data.subarray(t * H, (t + 1) * H)));
    expect(Array.from(out.permutedTokens.data)).toEqual(want);
    // Padding reaches the multiple unless the expert runs out of unselected tokens to pad with.
    if (pad > 1) for (const c of out.tokensPerExpert.data) expect(c % pad === 0 || c === T).toBe(true);

    // Unpermutation sums each token's slots: integer tokens make it exact.
    const slotsOf = new Array(T).fill(0);
    for (const t of ref.sorted) slotsOf[t]++;
    const back = d.tokenUnpermutation(out.permutedTokens);
    expect(back.shape).toEqual([T, H]);
    expect(Array.from(back.data)).toEqual(Array.from(hidden.data, (x, i) => x * slotsOf[Math.floor(i / H)] + 0));
  });

  it('takes precomputed { indices, weights } and returns the gradient of the weights', () => {
    const T = 6,
      E = 5,
      H = 2;
    const indices = tensor('int64', [T, 2], [0, 3, 1, 4, 2, 0, 3, 1, 4, 2, 0, 1]);
    const weights = tensor('float32', [T, 2], [0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1, 0.2, 0.8, 0.55, 0.45]);
    const hidden = hiddenOf(rng(3), T, H);
    const d = new TokenDispatcher(b, { numExperts: E, topk: 2 });
    const out = d.tokenPermutation(hidden, { indices, weights });
    const N = out.permutedTokens.shape[0];
    expect(N).toBe(12);
    // loss = sum_i gP[i] * permutedProbs[i]: d loss / d weights[t, j] is gP at the slot of (t, indices[t, j]).
    const gP = tensor(
      'float32',
      [N],
      Float32Array.from({ length: N }, (_, i) => i + 1),
    );
    const gradPermuted = tensor(
      'float32',
      [N, H],
      Float32Array.from({ length: N * H }, (_, i) => (i % 3) - 1),
    );
    const g = d.tokenPermutationBackward(gradPermuted, gP);
    const ref = referenceChainFromPicks(indices, T, E);
    const want = Array.from({ length: T * 2 }, (_, i) => {
      const t = Math.floor(i / 2);
      const e = Number(indices.data[i]);
      return gP.data[ref.findIndex((s) => s.t === t && s.e === e)];
    });
    expect(Array.from(g.gradWeights!.data)).toEqual(want);
    // gradHidden: each token sums the gradients of its slots.
    const gradHidden = new Array(T * H).fill(0);
    ref.forEach((s, i) => {
      for (let h = 0; h < H; h++) gradHidden[s.t * H + h] += gradPermuted.data[i * H + h];
    });
    expect(Array.from(g.gradHidden.data)).toEqual(gradHidden);
    // gradProbs is dense and zero off the picks.
    g.gradProbs!.data.forEach((v, i) => {
      const t = Math.floor(i / E);
      const picked = [0, 1].some((j) => Number(indices.data[t * 2 + j]) === i % E);
      if (!picked) expect(v).toBe(0);
    });
  });

  it('gives padding slots no probs gradient', () => {
    const T = 5,
      E = 3;
    const probs = tensor('float32', [T, E], [0.7, 0.2, 0.1, 0.1, 0.8, 0.1, 0.3, 0.3, 0.4, 0.6, 0.3, 0.1, 0.2, 0.2, 0.6]);
    const d = new TokenDispatcher(b, { numExperts: E, topk: 1, padMultiple: 4 });
    const out = d.tokenPermutation(hiddenOf(rng(5), T, 2), probs);
    const N = out.permutedTokens.shape[0];
    expect(N).toBe(12); // three experts, each padded to 4 slots
    const g = d.tokenPermutationBackward(tensor('float32', [N, 2]), tensor('float32', [N], new Float32Array(N).fill(1)));
    // Only the top-1 pick of each token carries gradient 1.
    const want = [1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1];
    expect(Array.from(g.gradProbs!.data)).toEqual(want);
  });

  it('backward of tokenUnpermutation gathers each slot its token gradient', () => {
    const T = 4,
      E = 4,
      H = 3;
    const probs = tensor('float32', [T, E], routerProbs(rng(9), T, E, false));
    const d = new TokenDispatcher(b, { numExperts: E, topk: 2 });
    const out = d.tokenPermutation(hiddenOf(rng(1), T, H), probs);
    d.tokenUnpermutation(out.permutedTokens);
    const gradOut = hiddenOf(rng(2), T, H);
    const g = d.tokenUnpermutationBackward(gradOut);
    const ref = referenceChain(probs.data, T, E, 2, false, 1);
    expect(Array.from(g.data)).toEqual(ref.sorted.flatMap((t) => Array.from(gradOut.data.subarray(t * H, (t + 1) * H))));
  });

  it('reports misuse with typed errors', () => {
    expect(() => new TokenDispatcher(b, { numExperts: 4, topk: 5 })).toThrow(RangeError);
    expect(() => new TokenDispatcher(b, { numExperts: 4, topk: 5 })).toThrow(/^topk: 5 exceeds numExperts = 4/);
    expect(() => new TokenDispatcher(b, { numExperts: 4, topk: 2, capacity: 1 } as never)).toThrow(TypeError);
    expect(() => new TokenDispatcher(b, { numExperts: 4, topk: 2, padMultiple: 0 })).toThrow(/^padMultiple: expected an integer >= 1, got 0/);
    expect(() => new TokenDispatcher(b, { numExperts: 4.5, topk: 2 })).toThrow(RangeError);
    const d = new TokenDispatcher(b, { numExperts: 4, topk: 2 });
    expect(() => d.tokenUnpermutation(tensor('float32', [1, 1]))).toThrow(/^tokenUnpermutation: call tokenPermutation first/);
    expect(() => d.tokenPermutation(tensor('float32', [3, 2]), tensor('float32', [3, 5]))).toThrow(/^tokenPermutation: routing.shape: expected \[3, 4\]/);
  });
});

function referenceChainFromPicks(indices: Tensor, T: number, E: number): { t: number; e: number }[] {
  const slots: { t: number; e: number }[] = [];
  const k = indices.shape[1];
  for (let e = 0; e < E; e++) {
    for (let t = 0; t < T; t++) {
      for (let j = 0; j < k; j++) if (Number(indices.data[t * k + j]) === e) slots.push({ t, e });
    }
  }
  return slots;
}

describe('TokenDispatcher: backends agree bit for bit', () => {
  const [first, ...rest] = cpuBackends;
  it.runIf(rest.length > 0)('on random bf16 problems', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 40 }),
        fc.integer({ min: 1, max: 12 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 5 }),
        fc.boolean(),
        fc.integer({ min: 0, max: 1 << 30 }),
        (T, E, kRaw, pad, capacity, seed) => {
          const k = Math.min(kRaw, E);
          const random = rng(seed);
          const probs = tensor('float32', [T, E], routerProbs(random, T, E, capacity));
          const hidden = tensor(
            'bfloat16',
            [T, 6],
            Uint16Array.from({ length: T * 6 }, () => Math.floor(random() * 0xffff) & 0x7f7f),
          );
          const run = (b: Backend) => {
            const d = new TokenDispatcher(b, { numExperts: E, topk: k, capacityFactor: capacity ? 1 : undefined, padMultiple: pad });
            const out = d.tokenPermutation(hidden, probs);
            return [out.permutedTokens, out.permutedProbs, out.tokensPerExpert, d.tokenUnpermutation(out.permutedTokens)].map(bitsOf);
          };
          const want = run(first);
          for (const b of rest) expect(run(b)).toEqual(want);
        },
      ),
      { seed: 20261123, numRuns: 60 },
    );
  });
});
