/**
 * The timing of the page benchmarks (bench/permute-bench.mjs, bench/webgpu-bench.mjs), plain ES
 * modules that run in Node and in a page: one warm-up call, then the median of `iters` calls, in
 * seconds.
 */
const now = typeof performance !== 'undefined' ? () => performance.now() : () => Date.now();
const medianSeconds = (ms) => ms.sort((x, y) => x - y)[Math.floor(ms.length / 2)] / 1e3;

/** The median time of `f()`. */
export function timeSync(iters, f) {
  f();
  const times = [];
  for (let i = 0; i < iters; i++) {
    const t0 = now();
    f();
    times.push(now() - t0);
  }
  return medianSeconds(times);
}

/** The median time of `await f()`. */
export async function timeAsync(iters, f) {
  await f();
  const times = [];
  for (let i = 0; i < iters; i++) {
    const t0 = now();
    await f();
    times.push(now() - t0);
  }
  return medianSeconds(times);
}
