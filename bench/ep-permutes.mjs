// EP dispatch's two permutes alone on the cuda backend, at issue 20's shape (T = 8192 tokens of
// H = 7168 bf16, k = 8 of L = 256 local experts, one rank): the send side's permute of device
// tokens by a host [T, N] rank map, with and without numOutTokens (ts/ep.ts gives it since
// cbd2cfc), the same by an uploaded map, and the receive side's permute by a device [R, L] map
// from indicesToMultihot with probs. Each: 10 timed calls after 2 warm-ups, synchronized before
// and after each; median and minimum. The twenty-first session's run 1 read dispatch at 15.2 ms a
// call where an earlier commit read 5.57 ms: this times its parts.
//
//   node bench/ep-permutes.mjs [DIST]   (gpu-run.sh remote: EP_PERMUTES=1)
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
const dist = resolve(process.argv[2] ?? 'dist');
const lib = await import(pathToFileURL(resolve(dist, 'index.js')).href);
const moe = await lib.createBackend({ prefer: 'cuda' });
const T = 8192,
  H = 7168,
  N = 1;
const x = moe.upload(lib.uniformTensor('bfloat16', [T, H], 1, 1));
const map = { dtype: 'bool', shape: [T, N], data: new Uint8Array(T * N).fill(1) };
const sync = () => moe.synchronize?.();
const time = (label, f) => {
  const ms = [];
  for (let i = 0; i < 12; i++) {
    sync();
    const a = performance.now();
    const r = f();
    sync();
    if (i >= 2) ms.push(performance.now() - a);
    for (const t of Object.values(r)) if (lib.isDeviceTensor(t)) t.dispose();
  }
  ms.sort((a, b) => a - b);
  console.log(`${label}: median ${ms[5].toFixed(3)} ms, min ${ms[0].toFixed(3)}`);
};
time('permute, host [T,1] map', () => moe.permute(x, map));
time('permute, host [T,1] map, numOutTokens', () => moe.permute(x, map, { numOutTokens: T }));
const dmap = moe.upload(map);
time('permute, device [T,1] map', () => moe.permute(x, dmap));
time('permute, device [T,1] map, numOutTokens', () => moe.permute(x, dmap, { numOutTokens: T }));
const k = 8,
  L = 256;
const picks = new Int32Array(T * k);
for (let t = 0; t < T; t++) for (let c = 0; c < k; c++) picks[t * k + c] = (t * 7 + c * 31) % L;
const w = new Float32Array(T * k).fill(0.125);
const pT = moe.upload({ dtype: 'int32', shape: [T, k], data: picks });
const wT = moe.upload({ dtype: 'float32', shape: [T, k], data: w });
const { routingMap, probs } = moe.indicesToMultihot(pT, wT, L);
time('permute, device [R,L] map + probs', () => moe.permute(x, routingMap, { probs }));
time('permute, device [R,L] map + probs, numOutTokens', () => moe.permute(x, routingMap, { probs, numOutTokens: T * k }));
