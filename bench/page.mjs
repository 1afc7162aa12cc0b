/**
 * The page side of the Chromium benchmarks (bench/browser.html, bench/webgpu.html): reads the
 * shape from the query (T, H, E, k, iters; `part` a string), runs `run(api, random, shape)` on dist/browser.js
 * and dist/random.js, and leaves the result (with the user agent) or the error in
 * `window.benchResult`, where `runBenchPage` (scripts/chromium.mjs) waits for it.
 */
import * as api from '../dist/browser.js';
import * as random from '../dist/random.js';

export async function runInPage(run) {
  const q = new URLSearchParams(location.search);
  const shape = Object.fromEntries(['T', 'H', 'E', 'k', 'iters'].filter((n) => q.has(n)).map((n) => [n, Number(q.get(n))]));
  if (q.has('part')) shape.part = q.get('part');
  const out = document.getElementById('out');
  try {
    const res = await run(api, random, shape);
    window.benchResult = { ...res, userAgent: navigator.userAgent };
    out.textContent = JSON.stringify(res, null, 2);
  } catch (e) {
    window.benchResult = { error: String(e?.stack || e) };
    out.textContent = window.benchResult.error;
  }
}
