#!/usr/bin/env node
/**
 * Draws the README's GPU pictures from a committed GPU run (bench/results/<date>-gpu.json,
 * key `session2`): docs/images/gpu-dispatch.svg (permute / unpermute bandwidth against a device
 * copy and the reference's PyTorch path) and docs/images/gpu-layer.svg (the dispatch + experts
 * layer, forward + backward, against PyTorch). Plain SVG, no dependencies. `--layer FILE#KEY.PATH`
 * draws the layer from a later run instead: an actmem summary (bench/actmem-gpu.py --combine:
 * per shape, `dims` and a path of ours / `torch-bf16` with `layerMs`) at that key of that file;
 * `--ours PATH` names our path there (`ours-auto`, the default path, unless told: `ours-cublas`
 * for the runs before the default took our grouped GEMM).
 *
 *   node scripts/gpu-chart.mjs [bench/results/2026-11-23-gpu.json] [--layer FILE#KEY.PATH] [--ours PATH]
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values: opts, positionals } = parseArgs({ options: { layer: { type: 'string' }, ours: { type: 'string', default: 'ours-auto' } }, allowPositionals: true });
const file = positionals[0] ?? 'bench/results/2026-11-23-gpu.json';
const run = JSON.parse(readFileSync(file, 'utf8')).session2;
if (!run) throw new Error(`${file} has no session2 run`);

const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;');

/** Horizontal bars, grouped: groups = [{ title, bars: [{ label, value, text, color }] }]. */
function bars(title, unit, groups, max) {
  const rowH = 22;
  const left = 300;
  const width = 820;
  const scale = (v) => ((width - left - 190) * v) / max;
  let y = 40;
  const parts = [`<text x="12" y="24" font-size="15" font-weight="bold">${esc(title)}</text>`];
  for (const g of groups) {
    parts.push(`<text x="12" y="${y + 14}" font-size="13" font-weight="bold">${esc(g.title)}</text>`);
    y += 22;
    for (const b of g.bars) {
      parts.push(`<text x="${left - 8}" y="${y + 15}" font-size="12" text-anchor="end">${esc(b.label)}</text>`);
      parts.push(`<rect x="${left}" y="${y + 3}" width="${Math.max(1, scale(b.value)).toFixed(1)}" height="${rowH - 6}" fill="${b.color}"/>`);
      parts.push(`<text x="${left + scale(b.value) + 6}" y="${y + 15}" font-size="12">${esc(b.text)}</text>`);
      y += rowH;
    }
    y += 8;
  }
  parts.push(`<text x="12" y="${y + 14}" font-size="11" fill="#555">${esc(unit)}</text>`);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y + 24}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>${parts.join('')}</svg>\n`;
}

const OURS = '#2a7ab0';
const COPY = '#9aa5b1';
const REF = '#d98b3a';
const rows = run.kernels.rows;
const ref = run.reference.rows;
const ms = (shape, op) => rows.find((r) => r.shape === shape && r.op === op);
const refMs = (shape, op) => ref.find((r) => r.shape === shape && r.op === op);
const groups = [];
let max = 0;
for (const [shape, dims] of [
  ['deepseek', 'DeepSeek-V3: T=16384, H=7168, E=256, k=8, bf16'],
  ['mixtral', 'Mixtral-like: T=16384, H=4096, E=8, k=2, bf16'],
]) {
  const copy = ms(shape, 'copy (same bytes)');
  const list = [
    ['device copy of the same bytes', copy, COPY],
    ['permute + probs (GPU plan, numOutTokens)', ms(shape, 'device permute+probs (plan+kernel, numOutTokens given)'), OURS],
    ['unpermute + probs merge', ms(shape, 'device unpermute+probs (carried plan)'), OURS],
    ['PyTorch reference permute + probs', refMs(shape, 'reference permute+probs'), REF],
    ['PyTorch reference unpermute + probs', refMs(shape, 'reference unpermute+probs'), REF],
  ];
  groups.push({
    title: dims,
    bars: list.map(([label, r, color]) => {
      max = Math.max(max, r.gbPerSecond);
      return { label, value: r.gbPerSecond, color, text: `${Math.round(r.gbPerSecond)} GB/s  (${r.msMedian.toFixed(3)} ms)` };
    }),
  });
}
writeFileSync('docs/images/gpu-dispatch.svg', bars('Dispatch on an H100: effective bandwidth (bytes read + written)', `higher is better; ${run.machine}`, groups, max));

/** The layer's rows: session2's, or (`--layer`) an actmem summary's. */
function layerRows() {
  if (!opts.layer) {
    return run.experts.map((e) => ({
      shape: e.shape,
      dims: e.dims,
      ours: e.layerForwardBackwardMs,
      torch: e.torchLayerForwardBackwardMs,
      source: file,
      label: 'moe-dispatch (cuBLAS, saveForBackward)',
    }));
  }
  const [path, key] = opts.layer.split('#');
  let at = JSON.parse(readFileSync(path, 'utf8'));
  for (const part of (key ?? '').split('.').filter(Boolean)) {
    at = at?.[part];
    if (at === undefined) throw new RangeError(`--layer: ${path} has no ${key}`);
  }
  const label = { 'ours-auto': 'moe-dispatch (default path)', 'ours-cublas': 'moe-dispatch (experts on cuBLAS)' }[opts.ours] ?? `moe-dispatch (${opts.ours})`;
  return Object.entries(at)
    .filter(([, s]) => s && typeof s === 'object' && 'dims' in s)
    .map(([shape, s]) => {
      const ours = s[opts.ours]?.layerMs;
      const torch = s['torch-bf16']?.layerMs;
      if (typeof ours !== 'number' || typeof torch !== 'number') throw new RangeError(`--layer: ${key}.${shape} has no ${opts.ours} / torch-bf16 layerMs`);
      return { shape, dims: s.dims, ours, torch, source: `${path} ${key}`, label };
    });
}
const lrows = layerRows();
const layer = lrows.map((e) => ({
  title: `${e.shape}: ${e.dims}`,
  bars: [
    { label: e.label, value: e.ours, color: OURS, text: `${e.ours.toFixed(1)} ms` },
    { label: 'PyTorch (reference permute, _grouped_mm)', value: e.torch, color: REF, text: `${e.torch.toFixed(1)} ms  (${(e.torch / e.ours).toFixed(2)}x ours)` },
  ],
}));
const lmax = Math.max(...lrows.flatMap((e) => [e.ours, e.torch]));
writeFileSync('docs/images/gpu-layer.svg', bars('MoE layer (permute, experts, unpermute), forward + backward, on an H100', `lower is better; ${lrows[0].source}`, layer, lmax));
console.log('wrote docs/images/gpu-dispatch.svg and docs/images/gpu-layer.svg');
