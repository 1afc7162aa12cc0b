#!/usr/bin/env node
/**
 * moe-dispatch command line:
 *   info   which backends run here, and why the others do not
 *   check  random routing problems through every available backend; reports agreement
 *   bench  permute/unpermute throughput on the CPU backends next to a plain memcpy
 *   route  route router logits from a .npy or safetensors file, write indices / weights / counts
 *   train  train a small MoE layer on a synthetic task, save and reload its checkpoint
 *
 * Exit codes: 0 success, 1 failure (a check failed, a file could not be read), 2 usage.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';

import { backendInfo, createBackend, tensor, type Backend, type BackendName, type Tensor, type TokenDType } from './index.js';
import { randomRouting, rng, type Problem } from './random.js';
import { progressLine, TRAIN_SHAPE_NAMES, trainMoE, type TrainShape } from './train.js';

const HELP: Record<string, string> = {
  main: `moe-dispatch <command> [options]

Commands:
  info    list the backends and whether each can run here (and why not)
  check   run random routing problems through every available backend and compare them
  bench   time permute/unpermute on the CPU backends against a plain memcpy
  route   route router logits from a .npy or safetensors file and write the routing
  train   train a small MoE layer on a synthetic task (loss, per-expert load, checkpoint)

Run 'moe-dispatch <command> --help' for the options of a command.
Exit codes: 0 success, 1 failure, 2 usage error. --json prints one JSON object on stdout.`,
  info: `moe-dispatch info [--json]

Lists the backends (cuda, cpu, wasm), whether each is available here, its threads,
and for an unavailable one the reason. Exit code 0.`,
  check: `moe-dispatch check [--cases N] [--seed S] [--json]

Draws N random routing problems (default 200; shapes include 0 tokens, 1 expert,
masked slots, k = E, drop-and-pad capacities) and runs indicesToMultihot, permute,
unpermute and multihotToIndices on every available backend. Checks each output's
structure and that all backends agree bit for bit. Exit code 1 on any disagreement.`,
  bench: `moe-dispatch bench [--tokens T | --sizes T1,T2,...] [--hidden H] [--experts E] [--topk K] [--iters N] [--out FILE] [--json]

Times permute (with probs) and unpermute (merging with probs) for float32 and bfloat16
tokens on each available CPU backend, at T=4096, H=1024, E=64, k=4 by default, next to
a memcpy of the same bytes, allocating and into reused outputs (options.out). GB/s counts bytes read plus bytes written. --sizes sweeps
several token counts. Shows a progress bar on stderr. Writes the results as JSON to FILE
(default bench/results/<date>-cpu.json) and, next to it (same name, .svg), a chart of
bandwidth against size, one line per backend, op and dtype.`,
  route: `moe-dispatch route <logits.npy | file.safetensors> --topk K [--tensor NAME]
       [--score-function softmax|sigmoid|softmax_with_bias|sigmoid_with_bias|sqrtsoftplus]
       [--softmax-before-topk] [--num-groups G] [--topk-groups G] [--norm-topk-prob]
       [--route-scale X] [--backend auto|cuda|cpu|wasm] [--out FILE] [--json]

Reads router logits [numTokens, numExperts] float32 from a .npy file (little-endian '<f4',
C order, 2-D) or from a safetensors file (the tensor --tensor NAME, or its only F32
tensor), routes them (the library's route op) and writes the routing:
  --out FILE.json         { shape, indices, weights, tokensPerExpert } as JSON arrays
  --out FILE.safetensors  tensors indices (I32), weights (F32), tokensPerExpert (I32)
  --out FILE.npy          three files: FILE.indices.npy, FILE.weights.npy, FILE.tokensPerExpert.npy
Without --out it prints a summary (tokens per expert); with --json the summary is JSON.
Exit code 1 when the file cannot be read or the routing fails, 2 for bad options.`,
  train: `moe-dispatch train [--backend auto|cuda|cpu|wasm] [--shape tiny|fine-grained|mixtral|deepseek-v3-ep8] [--steps N] [--batch T] [--lr X] [--seed S] [--out FILE] [--json]

Trains an MoE layer to reproduce a fixed random teacher layer of the same shape (mean
squared error plus the load-balancing loss 0.01), with AdamW, on the best available backend
(or --backend). Shapes: tiny (dim 16, inter 32, 8 experts, top-2, float32, lr 0.02; the
default on the CPU backends), fine-grained (8192 tokens a step, dim 2048, inter 1408, 64
experts, top-6; the default on cuda), mixtral (8192 tokens, dim 4096, inter 14336, 8
experts, top-2) and deepseek-v3-ep8 (8192 tokens, dim 7168, inter 2048, 32 experts, top-8:
one eight-way expert-parallel rank's share of DeepSeek-V3's experts), all bfloat16 with
float32 master weights, lr 1e-3, gradients clipped to norm 1. On cuda the layers, the data and the optimizer live on the GPU. Shows a progress bar
with the loss and the tokens per expert (on stderr), then tokens/s and the peak device
memory. Then saves a safetensors checkpoint (Hugging Face expert keys; FILE or a temporary
file), reloads it and checks that the reloaded layer gives identical outputs. With --json the
last line of stdout is a JSON object (initialLoss, finalLoss, tokensPerSecond, peakBytes,
reloadIdentical, checkpoint, seconds, ...). Exit code 1 when the loss did not fall (tiny: did
not halve), a step was skipped, or the reloaded layer differs.`,
};

type Args = Record<string, string | boolean | string[] | undefined> & { _?: string[] };

/** Commands that take positional arguments (files). */
const POSITIONAL = new Set(['route']);

function parse(command: string, argv: string[], options: Record<string, { type: 'string' | 'boolean' }>): Args {
  try {
    const { values, positionals } = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean' }, json: { type: 'boolean' } }, strict: true, allowPositionals: POSITIONAL.has(command) });
    return { ...(values as Args), _: positionals };
  } catch (e) {
    fail(`${(e as Error).message}\n\n${HELP[command]}`, 2);
  }
}

function fail(message: string, code: number): never {
  process.stderr.write(`moe-dispatch: ${message}\n`);
  process.exit(code);
}

function intOption(args: Args, name: string, fallback: number): number {
  const raw = args[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 0) fail(`--${name}: expected a non-negative integer, got '${raw}'`, 2);
  return n;
}

async function info(args: Args): Promise<number> {
  const infos = await backendInfo();
  if (args.json) {
    console.log(JSON.stringify(infos));
    return 0;
  }
  for (const b of infos) {
    const gpu = b.device ? `; ${b.device}; on the GPU: ${b.gpuOps?.join(', ')}, the other ops on the CPU core; kernels: ${b.kernels}` : '';
    const state = b.available ? `available (${b.threads} thread${b.threads === 1 ? '' : 's'}${gpu})` : `unavailable: ${b.reason}`;
    console.log(`${b.name.padEnd(5)} ${state}`);
  }
  return 0;
}

async function availableBackends(names: readonly BackendName[]): Promise<Backend[]> {
  const out: Backend[] = [];
  for (const info of await backendInfo()) {
    if (info.available && names.includes(info.name)) out.push(await createBackend({ prefer: info.name }));
  }
  return out;
}

function sameTensor(a: Tensor | undefined, b: Tensor | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  if (a.dtype !== b.dtype || a.shape.join() !== b.shape.join()) return false;
  const x = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
  const y = new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

/** Structural checks that need no second backend: expert-major order and consistent counts. */
function structureProblems(routingMap: Tensor<'bool'>, sorted: Int32Array, perExpert: Int32Array, capacity?: number): string | undefined {
  const [T, E] = routingMap.shape;
  let slot = 0;
  for (let e = 0; e < E; e++) {
    let routed = 0;
    for (let t = 0; t < T; t++) routed += routingMap.data[t * E + e];
    const want = capacity ?? routed;
    if (perExpert[e] !== want) return `tokensPerExpert[${e}] = ${perExpert[e]}, expected ${want}`;
    for (let i = 1; i < want && capacity === undefined; i++) {
      if (sorted[slot + i] <= sorted[slot + i - 1]) return `expert ${e}: token ids not ascending`;
    }
    slot += want;
  }
  return slot === sorted.length ? undefined : `${sorted.length} slots, expected ${slot}`;
}

async function check(args: Args): Promise<number> {
  const cases = intOption(args, 'cases', 200);
  const seed = intOption(args, 'seed', 1);
  const backends = await availableBackends(['cuda', 'cpu', 'wasm']);
  if (backends.length === 0) fail('no backend is available (run moe-dispatch info)', 1);
  const random = rng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)];
  const ops = ['indicesToMultihot', 'permute', 'unpermute', 'multihotToIndices'] as const;
  const agree: Record<string, number> = Object.fromEntries(ops.map((o) => [o, 0]));
  const failures: string[] = [];
  for (let c = 0; c < cases; c++) {
    const numExperts = pick([1, 2, 3, 8, 16, 32]);
    const p: Problem = {
      numTokens: pick([0, 1, 7, 64, 200]),
      numExperts,
      topk: 1 + Math.floor(random() * Math.min(numExperts, 8)),
      hidden: pick([1, 3, 16, 64]),
      dtype: pick<TokenDType>(['float32', 'bfloat16', 'float16']),
    };
    const r = randomRouting(p, random, pick([0, 0, 0.2, 1]));
    const dropAndPad = p.numTokens > 0 && random() < 0.3;
    const capacity = dropAndPad ? 1 + Math.floor(random() * p.numTokens) : undefined;
    const label = `case ${c} (T=${p.numTokens} E=${p.numExperts} k=${p.topk} H=${p.hidden} ${p.dtype}${dropAndPad ? ` capacity=${capacity}` : ''})`;
    const results = backends.map((b) => {
      const multihot = b.indicesToMultihot(r.indices, r.weights, p.numExperts);
      const options = dropAndPad ? { probs: multihot.probs, dropAndPad, numOutTokens: capacity! * p.numExperts } : { probs: multihot.probs };
      const permuted = b.permute(r.tokens, multihot.routingMap, options);
      const merged = b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [p.numTokens, p.hidden], {
        probs: multihot.probs,
        routingMap: multihot.routingMap,
        dropAndPad,
      });
      const topk = b.multihotToIndices(multihot.routingMap, { probs: multihot.probs, topk: p.topk });
      return { multihot, permuted, merged, topk };
    });
    const first = results[0];
    const problem = structureProblems(first.multihot.routingMap, first.permuted.sortedIndices.data, first.permuted.tokensPerExpert.data, capacity);
    if (problem) failures.push(`${label}: ${backends[0].name} permute: ${problem}`);
    const fields = {
      indicesToMultihot: (x: typeof first) => [x.multihot.routingMap, x.multihot.probs],
      permute: (x: typeof first) => [x.permuted.permutedTokens, x.permuted.permutedProbs, x.permuted.sortedIndices, x.permuted.tokensPerExpert],
      unpermute: (x: typeof first) => [x.merged],
      multihotToIndices: (x: typeof first) => [x.topk.indices, x.topk.probs],
    };
    for (const op of ops) {
      const ref = fields[op](first);
      const bad = results.findIndex((x) => !fields[op](x).every((t, i) => sameTensor(t, ref[i])));
      if (bad === -1) agree[op]++;
      else failures.push(`${label}: ${op} differs between ${backends[0].name} and ${backends[bad].name}`);
    }
  }
  const names = backends.map((b) => b.name).join(', ');
  if (args.json) {
    console.log(JSON.stringify({ cases, seed, backends: backends.map((b) => b.name), agree, failures }));
  } else {
    console.log(`check: ${cases} random cases (seed ${seed}) on ${names}`);
    if (backends.length === 1) console.log(`  only one backend is available: outputs are checked for structure, not compared`);
    for (const op of ops) console.log(`  ${op.padEnd(18)} ${agree[op]}/${cases} ${backends.length > 1 ? 'identical across backends' : 'ran'}`);
    for (const f of failures.slice(0, 20)) console.log(`  FAIL ${f}`);
    console.log(failures.length === 0 ? `all ${cases} cases agree` : `${failures.length} failures`);
  }
  return failures.length === 0 ? 0 : 1;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function timeIt(iters: number, f: () => unknown): number {
  f();
  f();
  const times: number[] = [];
  for (let i = 0; i < iters; i++) {
    const t0 = process.hrtime.bigint();
    f();
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  return median(times);
}

interface BenchRow {
  backend: string;
  op: string;
  dtype: TokenDType;
  /** Token count T of the problem. */
  tokens: number;
  seconds: number;
  bytes: number;
  gbPerSecond: number;
  /** Bandwidth relative to a memcpy into a reused buffer. */
  vsMemcpy: number;
  /** Bandwidth relative to a memcpy into a freshly allocated buffer (what each op returns). */
  vsFreshMemcpy: number;
}

/** `[#####.....] 3/12 what`: a progress bar on stderr, redrawn in place on a terminal. */
function progress(total: number): (what: string) => void {
  let done = 0;
  const tty = process.stderr.isTTY === true;
  return (what) => {
    done++;
    const width = 24;
    const filled = Math.round((done / total) * width);
    const line = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${String(done).padStart(String(total).length)}/${total} ${what}`;
    process.stderr.write(tty ? `\r\x1b[K${line}${done === total ? '\n' : ''}` : `${line}\n`);
  };
}

function sizesOption(args: Args): number[] {
  if (args.sizes === undefined) return [intOption(args, 'tokens', 4096)];
  if (args.tokens !== undefined) fail('--tokens and --sizes: give one of them', 2);
  const sizes = String(args.sizes)
    .split(',')
    .map((x) => Number(x.trim()));
  if (sizes.length === 0 || sizes.some((n) => !Number.isSafeInteger(n) || n < 1)) fail(`--sizes: expected a comma-separated list of positive integers, got '${args.sizes}'`, 2);
  return sizes;
}

async function bench(args: Args): Promise<number> {
  const sizes = sizesOption(args);
  const H = intOption(args, 'hidden', 1024);
  const E = intOption(args, 'experts', 64);
  const k = intOption(args, 'topk', 4);
  const iters = Math.max(1, intOption(args, 'iters', 10));
  if (E < 1 || k < 1 || k > E) fail(`--experts / --topk: expected 1 <= topk <= experts, got topk ${k}, experts ${E}`, 2);
  const backends = await availableBackends(['cpu', 'wasm']);
  if (backends.length === 0) fail('no CPU backend is available (run moe-dispatch info)', 1);
  const rows: BenchRow[] = [];
  const dtypes = ['float32', 'bfloat16'] as const;
  const step = progress(sizes.length * dtypes.length * (1 + backends.length));
  for (const T of sizes) {
    for (const dtype of dtypes) {
      const r = randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype }, rng(7));
      const ref = backends[0];
      const { routingMap, probs } = ref.indicesToMultihot(r.indices, r.weights, E);
      const N = ref.permute(r.tokens, routingMap).sortedIndices.shape[0];
      const elem = dtype === 'float32' ? 4 : 2;
      const permuteBytes = 2 * N * H * elem;
      const unpermuteBytes = (N + T) * H * elem;
      const src = new Uint8Array(N * H * elem).fill(1);
      const dst = new Uint8Array(N * H * elem);
      const memcpySeconds = timeIt(iters, () => dst.set(src));
      const memcpyGBs = (2 * src.length) / memcpySeconds / 1e9;
      // Every op returns a freshly allocated output, so also time a copy into a fresh buffer:
      // on machines where first-touch page faults are slow this is the fair baseline.
      const freshSeconds = timeIt(iters, () => new Uint8Array(src.length).set(src));
      const freshGBs = (2 * src.length) / freshSeconds / 1e9;
      rows.push({ backend: '-', op: 'memcpy', dtype, tokens: T, seconds: memcpySeconds, bytes: 2 * src.length, gbPerSecond: memcpyGBs, vsMemcpy: 1, vsFreshMemcpy: memcpyGBs / freshGBs });
      rows.push({ backend: '-', op: 'alloc+memcpy', dtype, tokens: T, seconds: freshSeconds, bytes: 2 * src.length, gbPerSecond: freshGBs, vsMemcpy: freshGBs / memcpyGBs, vsFreshMemcpy: 1 });
      step(`T=${T} ${dtype} memcpy`);
      for (const b of backends) {
        const permuted = b.permute(r.tokens, routingMap, { probs });
        const add = (op: string, bytes: number, seconds: number) => {
          const gbPerSecond = bytes / seconds / 1e9;
          rows.push({ backend: b.name, op, dtype, tokens: T, seconds, bytes, gbPerSecond, vsMemcpy: gbPerSecond / memcpyGBs, vsFreshMemcpy: gbPerSecond / freshGBs });
        };
        add(
          'permute+probs',
          permuteBytes,
          timeIt(iters, () => b.permute(r.tokens, routingMap, { probs })),
        );
        add(
          'unpermute+probs',
          unpermuteBytes,
          timeIt(iters, () => b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [T, H], { probs: permuted.permutedProbs })),
        );
        // The same ops into caller-owned outputs reused across calls (options.out): no fresh
        // pages to fault in; the native binding writes straight into them, wasm copies out once.
        const out = { permutedTokens: tensor(dtype, [N, H]), permutedProbs: tensor('float32', [N]) };
        add(
          'permute+probs (out)',
          permuteBytes,
          timeIt(iters, () => b.permute(r.tokens, routingMap, { probs, out })),
        );
        const merged = tensor(dtype, [T, H]);
        add(
          'unpermute+probs (out)',
          unpermuteBytes,
          timeIt(iters, () => b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [T, H], { probs: permuted.permutedProbs, out: merged })),
        );
        step(`T=${T} ${dtype} ${b.name}`);
      }
    }
  }
  const result = {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, model: cpus()[0]?.model ?? 'unknown', node: process.version, platform: `${process.platform}-${process.arch}` },
    shape: { tokens: sizes.length === 1 ? sizes[0] : sizes, hidden: H, experts: E, topk: k },
    iterations: iters,
    threads: Object.fromEntries(backends.map((b) => [b.name, b.threads])),
    rows,
  };
  const out = (args.out as string | undefined) ?? `bench/results/${result.date.slice(0, 10)}-cpu.json`;
  const svgPath = `${out.replace(/\.json$/i, '')}.svg`;
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
  writeFileSync(svgPath, bandwidthChart(rows, `permute / unpermute bandwidth, H=${H} E=${E} k=${k}, median of ${iters}`));
  if (args.json) {
    console.log(JSON.stringify({ ...result, out, chart: svgPath }));
    return 0;
  }
  console.log(`bench: T=${sizes.join(',')} H=${H} E=${E} k=${k}, median of ${iters} runs, ${result.machine.cpus} CPUs (${result.machine.model})`);
  console.log(markdownTable(rows, sizes.length > 1));
  console.log(`written to ${out} and ${svgPath}`);
  return 0;
}

const esc = (x: string) => x.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/**
 * An SVG line chart of GB/s (y) against the token count T (x, log scale), one line per
 * backend, op and dtype (each point's tooltip gives the bytes moved). Plain SVG 1.1, no scripts or external resources.
 */
export function bandwidthChart(rows: BenchRow[], title: string): string {
  const W = 760;
  const Hh = 420;
  const m = { left: 64, right: 250, top: 40, bottom: 52 };
  const series = new Map<string, BenchRow[]>();
  for (const r of rows) {
    const key = `${r.backend === '-' ? '' : `${r.backend} `}${r.op} ${r.dtype}`;
    series.set(key, [...(series.get(key) ?? []), r]);
  }
  const xs = rows.map((r) => r.tokens);
  const lx0 = Math.log10(Math.min(...xs));
  let lx1 = Math.log10(Math.max(...xs));
  if (lx1 - lx0 < 0.2) lx1 = lx0 + 0.2; // one size: a narrow band around it
  const ymax = Math.max(1e-9, ...rows.map((r) => r.gbPerSecond)) * 1.1;
  const px = (b: number) => m.left + ((Math.log10(b) - lx0) / (lx1 - lx0 || 1)) * (W - m.left - m.right) * 0.9 + (W - m.left - m.right) * 0.05;
  const py = (g: number) => Hh - m.bottom - (g / ymax) * (Hh - m.top - m.bottom);
  const colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf', '#393b79', '#ad494a'];
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${Hh}" viewBox="0 0 ${W} ${Hh}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${Hh}" fill="white"/>`,
    `<text x="${m.left}" y="22" font-size="14">${esc(title)}</text>`,
    `<line x1="${m.left}" y1="${Hh - m.bottom}" x2="${W - m.right}" y2="${Hh - m.bottom}" stroke="black"/>`,
    `<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${Hh - m.bottom}" stroke="black"/>`,
    `<text x="${(m.left + W - m.right) / 2}" y="${Hh - 12}" text-anchor="middle">tokens T (log scale; bytes moved grow with T)</text>`,
    `<text transform="translate(16 ${(m.top + Hh - m.bottom) / 2}) rotate(-90)" text-anchor="middle">GB/s</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const g = (ymax / 5) * i;
    out.push(
      `<line x1="${m.left - 4}" y1="${py(g).toFixed(1)}" x2="${W - m.right}" y2="${py(g).toFixed(1)}" stroke="#ddd"/>`,
      `<text x="${m.left - 8}" y="${(py(g) + 4).toFixed(1)}" text-anchor="end">${g.toFixed(1)}</text>`,
    );
  }
  for (const b of [...new Set(xs)].sort((a, c) => a - c)) {
    out.push(`<text x="${px(b).toFixed(1)}" y="${Hh - m.bottom + 16}" text-anchor="middle">${b}</text>`);
  }
  [...series.entries()].forEach(([name, rs], i) => {
    const c = colors[i % colors.length];
    const sorted = [...rs].sort((a, b) => a.tokens - b.tokens);
    const pts = sorted.map((r) => `${px(r.tokens).toFixed(1)},${py(r.gbPerSecond).toFixed(1)}`);
    const dash = rs[0].backend === '-' ? ' stroke-dasharray="5 4"' : '';
    out.push(`<polyline fill="none" stroke="${c}" stroke-width="2"${dash} points="${pts.join(' ')}"><title>${esc(name)}</title></polyline>`);
    pts.forEach((p, j) => {
      const r = sorted[j];
      out.push(
        `<circle cx="${p.split(',')[0]}" cy="${p.split(',')[1]}" r="3" fill="${c}"><title>${esc(`${name}, T=${r.tokens}: ${r.gbPerSecond.toFixed(2)} GB/s, ${(r.bytes / 2 ** 20).toFixed(1)} MiB moved`)}</title></circle>`,
      );
    });
    const ly = m.top + 8 + i * 18;
    out.push(
      `<line x1="${W - m.right + 16}" y1="${ly}" x2="${W - m.right + 40}" y2="${ly}" stroke="${c}" stroke-width="2"${dash}/>`,
      `<text x="${W - m.right + 46}" y="${ly + 4}">${esc(name)}</text>`,
    );
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

export function markdownTable(rows: BenchRow[], withTokens = false): string {
  const lines = withTokens
    ? ['| T | backend | op | dtype | time (ms) | GB/s | vs memcpy | vs alloc+memcpy |', '|---:|---|---|---|---:|---:|---:|---:|']
    : ['| backend | op | dtype | time (ms) | GB/s | vs memcpy | vs alloc+memcpy |', '|---|---|---|---:|---:|---:|---:|'];
  const pct = (x: number) => `${(x * 100).toFixed(0)}%`;
  for (const r of rows) {
    lines.push(
      `| ${withTokens ? `${r.tokens} | ` : ''}${r.backend} | ${r.op} | ${r.dtype} | ${(r.seconds * 1e3).toFixed(2)} | ${r.gbPerSecond.toFixed(2)} | ${pct(r.vsMemcpy)} | ${pct(r.vsFreshMemcpy)} |`,
    );
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------
// route: logits from .npy / safetensors, routing out as .json / .safetensors / .npy

/** A 2-D float32 array read from a .npy file. */
export function parseNpy(bytes: Uint8Array, what: string): { shape: number[]; data: Float32Array } {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || !magic.every((b, i) => bytes[i] === b)) throw new Error(`${what}: not a .npy file (no \\x93NUMPY magic)`);
  const major = bytes[6];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLen: number;
  let at: number;
  if (major === 1) [headerLen, at] = [dv.getUint16(8, true), 10];
  else if (major === 2 || major === 3) {
    if (bytes.length < 12) throw new Error(`${what}: truncated .npy header`);
    [headerLen, at] = [dv.getUint32(8, true), 12];
  } else throw new Error(`${what}: .npy format version ${major}.${bytes[7]} is not supported (1.0, 2.0, 3.0 are)`);
  if (at + headerLen > bytes.length) throw new Error(`${what}: the .npy header (${headerLen} bytes) runs past the end of the file`);
  const header = new TextDecoder(major === 3 ? 'utf-8' : 'latin1').decode(bytes.subarray(at, at + headerLen));
  const field = (key: string, pattern: string) => new RegExp(`['"]${key}['"]\\s*:\\s*${pattern}`).exec(header)?.[1];
  const descr = field('descr', `['"]([^'"]*)['"]`);
  const fortran = field('fortran_order', '(True|False)');
  const shapeText = field('shape', '\\(([^)]*)\\)');
  if (descr === undefined || fortran === undefined || shapeText === undefined) throw new Error(`${what}: the .npy header is not a dict with descr, fortran_order and shape: ${header.trim()}`);
  if (descr !== '<f4') throw new Error(`${what}: dtype '${descr}' is not supported: the logits must be little-endian float32 ('<f4'; numpy: x.astype('<f4'))`);
  if (fortran !== 'False') throw new Error(`${what}: fortran_order is True: save a C-ordered array (numpy: np.ascontiguousarray(x))`);
  const shape = shapeText
    .split(',')
    .map((x) => x.trim())
    .filter((x) => x !== '')
    .map(Number);
  if (shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new Error(`${what}: bad shape (${shapeText})`);
  if (shape.length !== 2) throw new Error(`${what}: logits must be 2-D [numTokens, numExperts], got shape (${shape.join(', ')})`);
  const start = at + headerLen;
  const n = shape[0] * shape[1];
  if (bytes.length - start !== n * 4) throw new Error(`${what}: shape (${shape.join(', ')}) needs ${n * 4} data bytes, the file has ${bytes.length - start}`);
  const data = new Float32Array(n);
  new Uint8Array(data.buffer).set(bytes.subarray(start));
  return { shape, data };
}

/** A .npy (format 1.0) file of an int32 or float32 array. */
export function npyBytes(t: Tensor): Uint8Array {
  const descr = t.dtype === 'float32' ? '<f4' : t.dtype === 'int32' ? '<i4' : undefined;
  if (!descr) throw new Error(`npy: ${t.dtype} is not written`);
  const shape = t.shape.length === 1 ? `(${t.shape[0]},)` : `(${t.shape.join(', ')})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shape}, }`;
  header += `${' '.repeat((64 - ((10 + header.length + 1) % 64)) % 64)}\n`;
  const out = new Uint8Array(10 + header.length + t.data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), 10 + header.length);
  return out;
}

const SCORE_FUNCTIONS = ['softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias', 'sqrtsoftplus'];

function optionalInt(args: Args, name: string): number | undefined {
  return args[name] === undefined ? undefined : intOption(args, name, 0);
}

async function route(args: Args): Promise<number> {
  const files = args._ ?? [];
  if (files.length !== 1) fail(`route: expected one input file (.npy or .safetensors), got ${files.length}\n\n${HELP.route}`, 2);
  const input = files[0];
  if (args.topk === undefined) fail(`route: --topk is required\n\n${HELP.route}`, 2);
  const topk = intOption(args, 'topk', 0);
  const scoreFunction = (args['score-function'] as string | undefined) ?? 'softmax';
  if (!SCORE_FUNCTIONS.includes(scoreFunction)) fail(`--score-function: expected one of ${SCORE_FUNCTIONS.join(', ')}, got '${scoreFunction}'`, 2);
  const routeScale = args['route-scale'] === undefined ? undefined : Number(args['route-scale']);
  if (routeScale !== undefined && !Number.isFinite(routeScale)) fail(`--route-scale: expected a finite number, got '${args['route-scale']}'`, 2);
  const prefer = (args.backend as string | undefined) ?? 'auto';
  if (!['auto', 'cuda', 'cpu', 'wasm'].includes(prefer)) fail(`--backend: expected auto, cuda, cpu or wasm, got '${prefer}'`, 2);
  const out = args.out as string | undefined;
  if (out !== undefined && !/\.(json|npy|safetensors)$/i.test(out)) fail(`--out: expected a .json, .npy or .safetensors file name, got '${out}'`, 2);
  if (!existsSync(input)) fail(`route: ${input}: no such file`, 1);
  const backend = await createBackend({ prefer: prefer as BackendName | 'auto' });

  let logits: Tensor<'float32'>;
  try {
    if (/\.npy$/i.test(input)) {
      const { shape, data } = parseNpy(new Uint8Array(readFileSync(input)), input);
      logits = { dtype: 'float32', shape, data };
    } else {
      const { tensors } = backend.loadSafetensors(new Uint8Array(readFileSync(input)));
      const name = args.tensor as string | undefined;
      const f32Names = Object.keys(tensors).filter((n) => tensors[n].dtype === 'float32');
      const pick = name ?? (f32Names.length === 1 ? f32Names[0] : undefined);
      if (pick === undefined) throw new Error(`${input}: give --tensor NAME (float32 tensors here: ${f32Names.join(', ') || 'none'})`);
      const t = tensors[pick];
      if (!t) throw new Error(`${input}: no tensor '${pick}' (tensors: ${Object.keys(tensors).join(', ')})`);
      if (t.dtype !== 'float32' || t.shape.length !== 2) throw new Error(`${input}: tensor '${pick}' is ${t.dtype} [${t.shape.join(', ')}], expected float32 [numTokens, numExperts]`);
      logits = t as Tensor<'float32'>;
    }
  } catch (e) {
    fail((e as Error).message, 1);
  }
  let routed: ReturnType<typeof backend.route>;
  try {
    routed = backend.route(logits, {
      topk,
      scoreFunction: scoreFunction as never,
      softmaxBeforeTopk: args['softmax-before-topk'] === true ? true : undefined,
      numGroups: optionalInt(args, 'num-groups'),
      topkGroups: optionalInt(args, 'topk-groups'),
      normTopkProb: args['norm-topk-prob'] === true ? true : undefined,
      routeScale,
    });
  } catch (e) {
    fail((e as Error).message, 1);
  }
  const [T, E] = logits.shape;
  const written: string[] = [];
  if (out !== undefined) {
    mkdirSync(dirname(out) || '.', { recursive: true });
    if (/\.json$/i.test(out)) {
      writeFileSync(
        out,
        `${JSON.stringify({
          shape: [T, topk],
          numExperts: E,
          indices: Array.from(routed.indices.data),
          weights: Array.from(routed.weights.data),
          tokensPerExpert: Array.from(routed.tokensPerExpert.data),
        })}\n`,
      );
      written.push(out);
    } else if (/\.safetensors$/i.test(out)) {
      writeFileSync(out, backend.saveSafetensors({ indices: routed.indices, weights: routed.weights, tokensPerExpert: routed.tokensPerExpert }));
      written.push(out);
    } else {
      const stem = out.replace(/\.npy$/i, '');
      for (const [key, t] of [
        ['indices', routed.indices],
        ['weights', routed.weights],
        ['tokensPerExpert', routed.tokensPerExpert],
      ] as const) {
        writeFileSync(`${stem}.${key}.npy`, npyBytes(t));
        written.push(`${stem}.${key}.npy`);
      }
    }
  }
  const summary = { input, backend: backend.name, numTokens: T, numExperts: E, topk, scoreFunction, tokensPerExpert: Array.from(routed.tokensPerExpert.data), written };
  if (args.json) console.log(JSON.stringify(summary));
  else {
    console.log(`route: ${T} tokens x ${E} experts, top-${topk} ${scoreFunction}, on ${backend.name}`);
    console.log(`tokens per expert: ${summary.tokensPerExpert.join(' ')}`);
    for (const w of written) console.log(`written ${w}`);
  }
  return 0;
}

async function train(args: Args): Promise<number> {
  const prefer = (args.backend as string | undefined) ?? 'auto';
  if (!['auto', 'cuda', 'cpu', 'wasm'].includes(prefer)) fail(`--backend: expected auto, cuda, cpu or wasm, got '${prefer}'`, 2);
  const shape = args.shape as string | undefined;
  if (shape !== undefined && !(TRAIN_SHAPE_NAMES as readonly string[]).includes(shape)) fail(`--shape: expected one of ${TRAIN_SHAPE_NAMES.join(', ')}, got '${shape}'`, 2);
  const backend = await createBackend({ prefer: prefer as BackendName | 'auto' });
  const steps = intOption(args, 'steps', 100);
  const lr = args.lr === undefined ? undefined : Number(args.lr);
  if (lr !== undefined && !(lr > 0)) fail(`--lr: expected a positive number, got '${args.lr}'`, 2);
  const batch = args.batch === undefined ? undefined : intOption(args, 'batch', 0);
  const tty = process.stderr.isTTY === true;
  const every = Math.max(1, Math.round(steps / 10));
  process.stderr.write(`train: backend ${backend.name} (${backend.threads} threads), ${steps} steps${shape ? `, shape ${shape}` : ''}\n`);
  const result = trainMoE(backend, {
    steps,
    lr,
    shape: shape as TrainShape | undefined,
    batch,
    seed: intOption(args, 'seed', 7),
    checkpoint: args.out as string | undefined,
    onStep: (s) => {
      if (tty) process.stderr.write(`\r${progressLine(s)}${s.step === s.steps ? '\n' : ''}`);
      else if (s.step % every === 0 || s.step === s.steps) process.stderr.write(`${progressLine(s)}\n`);
    },
  });
  // the tiny task must halve its loss; a real shape in a few steps must lower it
  const ok = result.finalLoss < (result.shape === 'tiny' ? 0.5 : 1) * result.initialLoss && result.reloadIdentical && result.skippedSteps === 0;
  if (args.json) {
    console.log(JSON.stringify(result));
  } else {
    console.log(
      `loss ${result.initialLoss.toPrecision(5)} -> ${result.finalLoss.toPrecision(5)} (${((result.finalLoss / result.initialLoss) * 100).toFixed(1)}% of the start) in ${result.seconds.toFixed(2)} s`,
    );
    console.log(
      `${result.shape} on ${result.device === 'gpu' ? 'the GPU' : 'the host'}: ${result.tokensPerStep} tokens a step, ${Math.round(result.tokensPerSecond)} tokens/s (${result.stepsPerSecond.toFixed(2)} steps/s)${result.peakBytes === undefined ? '' : `, peak device memory ${(result.peakBytes / 2 ** 30).toFixed(2)} GiB`}${result.skippedSteps ? `, ${result.skippedSteps} steps skipped (non-finite gradients)` : ''}`,
    );
    console.log(`per-expert load after training: ${result.finalLoad.join(' ')}`);
    console.log(`checkpoint ${result.checkpoint} (${result.checkpointBytes} bytes): reloaded layer ${result.reloadIdentical ? 'gives identical outputs' : 'DIFFERS'}`);
  }
  return ok ? 0 : 1;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    console.log(HELP.main);
    return command === undefined ? 2 : 0;
  }
  const commands: Record<string, [(a: Args) => Promise<number>, Record<string, { type: 'string' | 'boolean' }>]> = {
    info: [info, {}],
    check: [check, { cases: { type: 'string' }, seed: { type: 'string' } }],
    bench: [
      bench,
      { tokens: { type: 'string' }, sizes: { type: 'string' }, hidden: { type: 'string' }, experts: { type: 'string' }, topk: { type: 'string' }, iters: { type: 'string' }, out: { type: 'string' } },
    ],
    route: [
      route,
      {
        topk: { type: 'string' },
        tensor: { type: 'string' },
        'score-function': { type: 'string' },
        'softmax-before-topk': { type: 'boolean' },
        'num-groups': { type: 'string' },
        'topk-groups': { type: 'string' },
        'norm-topk-prob': { type: 'boolean' },
        'route-scale': { type: 'string' },
        backend: { type: 'string' },
        out: { type: 'string' },
      },
    ],
    train: [
      train,
      { backend: { type: 'string' }, shape: { type: 'string' }, batch: { type: 'string' }, steps: { type: 'string' }, lr: { type: 'string' }, seed: { type: 'string' }, out: { type: 'string' } },
    ],
  };
  const entry = commands[command];
  if (!entry) fail(`unknown command '${command}'\n\n${HELP.main}`, 2);
  const args = parse(command, rest, entry[1]);
  if (args.help) {
    console.log(HELP[command]);
    return 0;
  }
  return entry[0](args);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => fail((e as Error).stack ?? String(e), 1),
);
