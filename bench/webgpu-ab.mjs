#!/usr/bin/env node
/**
 * The webgpu A/B of `gpu-run.sh remote` with WEBGPU=1 WEBGPU_AB=REV, side by side: the Dawn
 * scripts ran on this tree (webgpu-node.json, webgpu-profile.json), on REV (the -ab files) and on
 * this tree again (the -2 files), in that order on one machine. Prints, for each row of
 * bench/webgpu-node.mjs (layout ops next to cuda, the experts) and each op of
 * bench/webgpu-profile.mjs (wall, the CPU time to its submit, the GPU time of each shader), REV's
 * value and this tree's two; writes them as JSON with --out.
 *
 *   node bench/webgpu-ab.mjs --dir OUT [--out FILE]
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({ options: { dir: { type: 'string' }, out: { type: 'string' } } });
if (!args.dir) throw new TypeError("--dir: expected the folder of the Dawn scripts' JSON (gpu-run.sh remote: $OUT)");

/** The JSON of `name` in the three runs: [REV's, this tree's first, this tree's second] (null where missing). */
function runs(name) {
  return ['-ab', '', '-2'].map((suffix) => {
    const file = join(args.dir, `${name}${suffix}.json`);
    return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) : null;
  });
}

const fmt = (v, digits = 3) => (typeof v === 'number' ? v.toFixed(digits) : '-');
const pct = (v) => (typeof v === 'number' ? `${(100 * v).toFixed(0)}%` : '-');
const result = { kind: 'webgpu-ab', dir: args.dir, order: ['REV (the -ab files)', 'this tree', 'this tree again'] };

const nodes = runs('webgpu-node');
if (nodes.some((n) => n?.available)) {
  const base = nodes.map((n) => n?.baseline?.ms ?? null);
  result.baseline = base;
  console.log('Dawn fixed costs (ms), REV | this tree | again:');
  for (const key of Object.keys(base.find((b) => b) ?? {})) console.log(`  ${key.padEnd(12)} ${base.map((b) => fmt(b?.[key], 4)).join(' | ')}`);
  const key = (r) => `${r.op} ${r.dtype} ${r.routing}`;
  const keys = [...new Set(nodes.flatMap((n) => (n?.ratios ?? []).map(key)))];
  result.rows = keys.map((k) => {
    const at = nodes.map((n) => n?.ratios?.find((r) => key(r) === k) ?? null);
    return {
      row: k,
      webgpuGbPerSecond: at.map((r) => r?.webgpuGbPerSecond ?? null),
      ratioToCuda: at.map((r) => r?.ratioToCuda ?? null),
      queuedRatioToCuda: at.map((r) => r?.queuedRatioToCuda ?? null),
      sameBitsAsWasm: at.map((r) => r?.sameBitsAsWasm ?? null),
    };
  });
  console.log('webgpu GB/s (of cuda; queued of cuda), REV | this tree | again:');
  for (const r of result.rows) {
    const cells = r.webgpuGbPerSecond.map((g, i) => `${fmt(g, 1)} (${pct(r.ratioToCuda[i])}; ${pct(r.queuedRatioToCuda[i])})`);
    console.log(`  ${r.row.padEnd(36)} ${cells.join(' | ')}${r.sameBitsAsWasm.every((s) => s !== false) ? '' : '  NOT THE SAME BITS AS WASM'}`);
  }
  const experts = [...new Set(nodes.flatMap((n) => (n?.experts ?? []).filter((e) => e.backend === 'webgpu').map((e) => `${e.op} ${e.dtype}`)))];
  result.experts = experts.map((k) => ({ row: k, seconds: nodes.map((n) => n?.experts?.find((e) => e.backend === 'webgpu' && `${e.op} ${e.dtype}` === k)?.seconds ?? null) }));
  for (const e of result.experts) console.log(`  ${e.row.padEnd(36)} ${e.seconds.map((s) => `${fmt(s === null ? null : s * 1e3)} ms`).join(' | ')}`);
}

const profiles = runs('webgpu-profile');
if (profiles.some((p) => p?.rows)) {
  const ops = [...new Set(profiles.flatMap((p) => (p?.rows ?? []).map((r) => r.op)))];
  result.profile = ops.map((op) => {
    const at = profiles.map((p) => p?.rows?.find((r) => r.op === op) ?? null);
    const shaders = [...new Set(at.flatMap((r) => Object.keys(r?.byShader ?? {})))];
    return {
      op,
      plainWallMs: at.map((r) => r?.plainWallMs ?? null),
      plainToSubmitMs: at.map((r) => r?.plainToSubmitMs ?? null),
      gpuMs: at.map((r) => r?.gpuMs ?? null),
      byShader: Object.fromEntries(shaders.map((s) => [s, at.map((r) => r?.byShader?.[s] ?? null)])),
    };
  });
  console.log('profile (ms), REV | this tree | again: wall without timestamps, to its submit, GPU; GPU by shader');
  for (const p of result.profile) {
    const row = (a) => a.map((v) => fmt(v)).join(' | ');
    console.log(`  ${p.op.padEnd(18)} wall ${row(p.plainWallMs)}; to submit ${row(p.plainToSubmitMs)}; GPU ${row(p.gpuMs)}`);
    for (const [s, a] of Object.entries(p.byShader)) console.log(`    ${s.padEnd(28)} ${row(a)}`);
  }
}

if (!result.rows && !result.profile) {
  console.error(`webgpu-ab: no webgpu-node*.json or webgpu-profile*.json with results in ${args.dir}`);
  process.exit(2);
}
if (args.out) writeFileSync(args.out, `${JSON.stringify(result, null, 1)}\n`);
