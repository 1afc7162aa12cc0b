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

/**
 * The time a call takes when calls are queued back to back: one warm-up call and `sync()`,
 * then `iters` calls (each awaited, not synchronized) and one `sync()`, the total over `iters`,
 * in seconds. For GPU backends whose calls return before the device is done.
 */
export async function timeQueued(iters, f, sync) {
  await f();
  await sync();
  const t0 = now();
  for (let i = 0; i < iters; i++) await f();
  await sync();
  return (now() - t0) / iters / 1e3;
}
