#!/usr/bin/env node
/**
 * Soak test for leaks (not part of the timed suites): on each CPU backend, 100k small ops
 * (a mix of every op family, including calls that throw) and 1k large ones (permute and
 * unpermute of 4096 x 512 float32 tokens), printing the process RSS and, for wasm, the size
 * of the instance's linear memory at intervals. After a warm-up (the first 10% of each
 * phase) both must stay flat: RSS within --rss-slack MiB (default 48) of its post-warm-up
 * value, wasm memory not growing at all. Exit code 1 if either grows.
 *
 *   node --expose-gc scripts/soak.mjs [--small N] [--large N] [--backends cpu,wasm] [--json]
 *
 * Uses the built package (dist/, native/, pkg/wasm/). The wasm backend is instantiated here
 * through the same adapter as createBackend's (dist/backend.js) so that its memory can be read.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { bindingBackend } from '../dist/backend.js';
import { createBackend, tensor } from '../dist/index.js';

const { values: opts } = parseArgs({
  options: { small: { type: 'string' }, large: { type: 'string' }, backends: { type: 'string' }, 'rss-slack': { type: 'string' }, json: { type: 'boolean' } },
});
const SMALL = Number(opts.small ?? 100_000);
const LARGE = Number(opts.large ?? 1_000);
const NAMES = (opts.backends ?? 'cpu,wasm').split(',');
const RSS_SLACK = Number(opts['rss-slack'] ?? 48) * 2 ** 20;
const SAMPLES = 10;
const gc = globalThis.gc ?? (() => {});
if (!globalThis.gc) console.error('soak: run with node --expose-gc for steadier RSS readings');

async function wasmBackend() {
  const module = await WebAssembly.compile(readFileSync(new URL('../pkg/wasm/moe_wasm_bg.wasm', import.meta.url)));
  const glue = await import(new URL('../pkg/wasm/moe_wasm.js?soak', import.meta.url).href);
  const exports = glue.initSync({ module });
  return { backend: bindingBackend('wasm', () => glue), memory: () => exports.memory.buffer.byteLength };
}

// ---- inputs
const rand = (() => {
  let a = 12345;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
})();
const f32 = (shape) =>
  tensor(
    'float32',
    shape,
    Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rand() * 2 - 1),
  );

function smallOps(b) {
  const logits = f32([8, 4]);
  const routed = b.route(logits, { topk: 2 });
  const { routingMap, probs } = b.indicesToMultihot(routed.indices, routed.weights, 4);
  const tokens = f32([8, 16]);
  const perm = b.permute(tokens, routingMap, { probs });
  const x = f32([perm.sortedIndices.shape[0], 8]);
  const w = { gateAndUpProjs: f32([4, 16, 8]), downProjs: f32([4, 4, 16]) };
  return [
    () => b.route(logits, { topk: 2, scoreFunction: 'sigmoid', normTopkProb: true }),
    () => b.indicesToMultihot(routed.indices, routed.weights, 4),
    () => b.multihotToIndices(routingMap, { probs }),
    () => b.permute(tokens, routingMap, { probs, dropAndPad: true, numOutTokens: 16 }),
    () => b.unpermute(perm.permutedTokens, perm.sortedIndices, [8, 16], { probs: perm.permutedProbs }),
    () => b.permuteBackward(perm.permutedTokens, perm.sortedIndices, 8),
    () => b.activation(x, { kind: 'swiglu' }),
    () => b.expertsForward(perm.permutedTokens, perm.tokensPerExpert, w, { activation: 'swiglu' }),
    () => b.zLoss(logits),
    () => b.loadSafetensors(b.saveSafetensors({ a: tokens })),
    () => {
      try {
        b.permute(tokens, routingMap, { numOutTokens: 3, dropAndPad: true }); // a RangeError from the core
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
      }
    },
  ];
}

function largeOps(b) {
  const T = 4096;
  const H = 512;
  const routed = b.route(f32([T, 16]), { topk: 2 });
  const { routingMap, probs } = b.indicesToMultihot(routed.indices, routed.weights, 16);
  const tokens = f32([T, H]);
  const perm = b.permute(tokens, routingMap, { probs });
  return [() => b.permute(tokens, routingMap, { probs }), () => b.unpermute(perm.permutedTokens, perm.sortedIndices, [T, H], { probs: perm.permutedProbs })];
}

async function settle() {
  for (let j = 0; j < 3; j++) {
    gc();
    await new Promise((r) => setImmediate(r));
  }
}

const MiB = (n) => (n / 2 ** 20).toFixed(1);

async function phase(name, backend, memory, ops, count) {
  const samples = [];
  const every = Math.max(1, Math.floor(count / SAMPLES));
  const t0 = performance.now();
  for (let i = 1; i <= count; i++) {
    ops[i % ops.length]();
    if (i % every === 0 || i === count) {
      // The addon's output buffers are freed by finalizers that run after a GC, from the
      // event loop: let it turn (as any real program does between batches), then read.
      await settle();
      const s = { calls: i, rss: process.memoryUsage().rss, wasm: memory?.(), seconds: (performance.now() - t0) / 1e3 };
      samples.push(s);
      if (!opts.json)
        console.log(
          `  ${backend.name} ${name} ${String(i).padStart(7)} calls  rss ${MiB(s.rss).padStart(7)} MiB${s.wasm === undefined ? '' : `  wasm memory ${MiB(s.wasm).padStart(7)} MiB`}  ${s.seconds.toFixed(1)} s`,
        );
    }
  }
  const warm = samples[0];
  const last = samples[samples.length - 1];
  const maxRss = Math.max(...samples.slice(1).map((s) => s.rss));
  const problems = [];
  if (maxRss - warm.rss > RSS_SLACK) problems.push(`${backend.name} ${name}: RSS grew ${MiB(maxRss - warm.rss)} MiB after warm-up (limit ${MiB(RSS_SLACK)})`);
  if (memory && last.wasm > warm.wasm) problems.push(`${backend.name} ${name}: wasm memory grew from ${MiB(warm.wasm)} to ${MiB(last.wasm)} MiB after warm-up`);
  return {
    backend: backend.name,
    phase: name,
    calls: count,
    rssAfterWarmupMiB: +MiB(warm.rss),
    rssEndMiB: +MiB(last.rss),
    rssMaxMiB: +MiB(maxRss),
    wasmAfterWarmupMiB: memory ? +MiB(warm.wasm) : undefined,
    wasmEndMiB: memory ? +MiB(last.wasm) : undefined,
    seconds: +last.seconds.toFixed(1),
    problems,
  };
}

const results = [];
for (const name of NAMES) {
  const { backend, memory } = name === 'wasm' ? await wasmBackend() : { backend: await createBackend({ prefer: name }), memory: undefined };
  if (!opts.json) console.log(`soak on ${name} (${backend.threads} threads): ${SMALL} small ops, ${LARGE} large ops`);
  results.push(await phase('small', backend, memory, smallOps(backend), SMALL));
  results.push(await phase('large', backend, memory, largeOps(backend), LARGE));
}
const problems = results.flatMap((r) => r.problems);
if (opts.json) console.log(JSON.stringify({ small: SMALL, large: LARGE, results }));
else {
  for (const r of results)
    console.log(
      `${r.backend} ${r.phase}: rss ${r.rssAfterWarmupMiB} -> ${r.rssEndMiB} MiB (max ${r.rssMaxMiB})${r.wasmEndMiB === undefined ? '' : `, wasm memory ${r.wasmAfterWarmupMiB} -> ${r.wasmEndMiB} MiB`}, ${r.seconds} s`,
    );
  console.log(problems.length ? `FAIL\n${problems.join('\n')}` : 'flat: no growth after warm-up');
}
process.exit(problems.length ? 1 : 0);
