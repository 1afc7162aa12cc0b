/**
 * The permute/unpermute timing loop of `moe-dispatch bench`, as a plain ES module that runs
 * unchanged in Node and in a browser page: `api` is the package entry (dist/index.js in Node,
 * dist/browser.js in a page) and `random` is dist/random.js. Same problem (rng(7)), same
 * byte counts (read + written) and the median of `iters` runs after one warm-up.
 */
import { timeSync } from './timing.mjs';

export async function benchPermute(api, random, { T = 4096, H = 1024, E = 64, k = 4, iters = 10, prefer = 'wasm', label = prefer } = {}) {
  const b = await api.createBackend({ prefer });
  const timeIt = (f) => timeSync(iters, f);
  const rows = [];
  for (const dtype of ['float32', 'bfloat16']) {
    const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, random.rng(7));
    const { routingMap, probs } = b.indicesToMultihot(r.indices, r.weights, E);
    const permuted = b.permute(r.tokens, routingMap, { probs });
    const N = permuted.sortedIndices.shape[0];
    const elem = dtype === 'float32' ? 4 : 2;
    const add = (op, bytes, seconds) => rows.push({ backend: label, op, dtype, seconds, bytes, gbPerSecond: bytes / seconds / 1e9 });
    add(
      'permute+probs',
      2 * N * H * elem,
      timeIt(() => b.permute(r.tokens, routingMap, { probs })),
    );
    add(
      'unpermute+probs',
      (N + T) * H * elem,
      timeIt(() => b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [T, H], { probs: permuted.permutedProbs })),
    );
    // A checksum of the outputs, so runs on different backends can be seen to agree.
    const out = b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [T, H], { probs: permuted.permutedProbs });
    let h = 0;
    const words = new Uint32Array(out.data.buffer, out.data.byteOffset, out.data.byteLength >> 2);
    for (let i = 0; i < words.length; i++) h = (Math.imul(h, 31) + words[i]) >>> 0;
    rows.push({ backend: label, op: 'checksum(unpermute)', dtype, seconds: 0, bytes: 0, gbPerSecond: 0, checksum: h, threads: b.threads });
  }
  return rows;
}
