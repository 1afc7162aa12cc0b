/** Seeded random routing problems, shared by the CLI's `check` and `bench`. */
import { tensor, toBFloat16Bits, toFloat16Bits, type Tensor, type TokenDType } from './tensor.js';

/** mulberry32: small, fast, and the same sequence on every platform. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Problem {
  numTokens: number;
  numExperts: number;
  topk: number;
  hidden: number;
  dtype: TokenDType;
}

export interface Routing {
  tokens: Tensor<TokenDType>;
  /** `[T, k]` int32, each row `k` distinct experts (or -1 where masked). */
  indices: Tensor<'int32'>;
  /** `[T, k]` float32 weights of the selected experts. */
  weights: Tensor<'float32'>;
}

/**
 * Draws tokens and a top-k routing. `maskRate` is the chance that a slot is masked (-1).
 * Token values are in [-2, 2), rounded to the dtype.
 */
export function randomRouting(p: Problem, random: () => number, maskRate = 0): Routing {
  const { numTokens: T, numExperts: E, topk: k, hidden: H } = p;
  const values = new Float32Array(T * H);
  for (let i = 0; i < values.length; i++) values[i] = random() * 4 - 2;
  const tokens = p.dtype === 'float32' ? tensor('float32', [T, H], values) : tensor(p.dtype, [T, H], Uint16Array.from(values, p.dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits));
  const indices = new Int32Array(T * k);
  const weights = new Float32Array(T * k);
  const experts = Array.from({ length: E }, (_, e) => e);
  for (let t = 0; t < T; t++) {
    // partial Fisher-Yates: the first k entries become k distinct experts
    for (let j = 0; j < k; j++) {
      const r = j + Math.floor(random() * (E - j));
      [experts[j], experts[r]] = [experts[r], experts[j]];
      const masked = random() < maskRate;
      indices[t * k + j] = masked ? -1 : experts[j];
      weights[t * k + j] = masked ? 0 : random();
    }
  }
  return { tokens, indices: tensor('int32', [T, k], indices), weights: tensor('float32', [T, k], weights) };
}
