#!/usr/bin/env node
/**
 * moe-dispatch command line:
 *   info   which backends run here, and why the others do not
 *   check  random routing problems through every available backend; reports agreement
 *   bench  permute/unpermute throughput on the CPU backends next to a plain memcpy
 *   train  train a small MoE layer on a synthetic task, save and reload its checkpoint
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';

import { backendInfo, createBackend, type Backend, type BackendName, type Tensor, type TokenDType } from './index.js';
import { randomRouting, rng, type Problem } from './random.js';
import { progressLine, trainMoE } from './train.js';

const HELP: Record<string, string> = {
  main: `moe-dispatch <command> [options]

Commands:
  info    list the backends and whether each can run here (and why not)
  check   run random routing problems through every available backend and compare them
  bench   time permute/unpermute on the CPU backends against a plain memcpy
  train   train a small MoE layer on a synthetic task (loss, per-expert load, checkpoint)

Run 'moe-dispatch <command> --help' for the options of a command.`,
  info: `moe-dispatch info [--json]

Lists the backends (cuda, cpu, wasm), whether each is available here, its threads,
and for an unavailable one the reason. Exit code 0.`,
  check: `moe-dispatch check [--cases N] [--seed S] [--json]

Draws N random routing problems (default 200; shapes include 0 tokens, 1 expert,
masked slots, k = E, drop-and-pad capacities) and runs indicesToMultihot, permute,
unpermute and multihotToIndices on every available backend. Checks each output's
structure and that all backends agree bit for bit. Exit code 1 on any disagreement.`,
  bench: `moe-dispatch bench [--tokens T] [--hidden H] [--experts E] [--topk K] [--iters N] [--out FILE] [--json]

Times permute (with probs) and unpermute (merging with probs) for float32 and bfloat16
tokens on each available CPU backend, at T=4096, H=1024, E=64, k=4 by default, next to
a memcpy of the same bytes. GB/s counts bytes read plus bytes written. Writes the
results as JSON to FILE (default bench/results/<date>-cpu.json).`,
  train: `moe-dispatch train [--backend auto|cuda|cpu|wasm] [--steps N] [--lr X] [--seed S] [--out FILE] [--json]

Trains a small MoE layer (dim 16, inter 32, 8 experts, top-2, swiglu, softmax router,
load-balancing loss 0.01) to reproduce a fixed random teacher layer, with Adam (default
100 steps, lr 0.02), on the best available backend (or --backend). Shows a progress bar
with the loss and the tokens per expert (on stderr). Then saves a safetensors checkpoint
(Hugging Face expert keys; FILE or a temporary file), reloads it and checks that the
reloaded layer gives identical outputs. With --json the last line of stdout is a JSON
object with initialLoss, finalLoss, finalLoad, reloadIdentical, checkpoint, seconds.
Exit code 1 when the loss did not halve or the reloaded layer differs.`,
};

type Args = Record<string, string | boolean | undefined>;

function parse(command: string, argv: string[], options: Record<string, { type: 'string' | 'boolean' }>): Args {
  try {
    return parseArgs({ args: argv, options: { ...options, help: { type: 'boolean' }, json: { type: 'boolean' } }, strict: true }).values as Args;
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
  seconds: number;
  bytes: number;
  gbPerSecond: number;
  /** Bandwidth relative to a memcpy into a reused buffer. */
  vsMemcpy: number;
  /** Bandwidth relative to a memcpy into a freshly allocated buffer (what each op returns). */
  vsFreshMemcpy: number;
}

async function bench(args: Args): Promise<number> {
  const T = intOption(args, 'tokens', 4096);
  const H = intOption(args, 'hidden', 1024);
  const E = intOption(args, 'experts', 64);
  const k = intOption(args, 'topk', 4);
  const iters = Math.max(1, intOption(args, 'iters', 10));
  const backends = await availableBackends(['cpu', 'wasm']);
  if (backends.length === 0) fail('no CPU backend is available (run moe-dispatch info)', 1);
  const rows: BenchRow[] = [];
  for (const dtype of ['float32', 'bfloat16'] as const) {
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
        rows.push({ backend: '-', op: 'memcpy', dtype, seconds: memcpySeconds, bytes: 2 * src.length, gbPerSecond: memcpyGBs, vsMemcpy: 1, vsFreshMemcpy: memcpyGBs / freshGBs });
    rows.push({ backend: '-', op: 'alloc+memcpy', dtype, seconds: freshSeconds, bytes: 2 * src.length, gbPerSecond: freshGBs, vsMemcpy: freshGBs / memcpyGBs, vsFreshMemcpy: 1 });
    for (const b of backends) {
      const permuted = b.permute(r.tokens, routingMap, { probs });
      const add = (op: string, bytes: number, seconds: number) => {
        const gbPerSecond = bytes / seconds / 1e9;
        rows.push({ backend: b.name, op, dtype, seconds, bytes, gbPerSecond, vsMemcpy: gbPerSecond / memcpyGBs, vsFreshMemcpy: gbPerSecond / freshGBs });
      };
      add('permute+probs', permuteBytes, timeIt(iters, () => b.permute(r.tokens, routingMap, { probs })));
      add(
        'unpermute+probs',
        unpermuteBytes,
        timeIt(iters, () => b.unpermute(permuted.permutedTokens, permuted.sortedIndices, [T, H], { probs: permuted.permutedProbs })),
      );
      if (!args.json) process.stderr.write(`  ${b.name} ${dtype} done\n`);
    }
  }
  const result = {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, model: cpus()[0]?.model ?? 'unknown', node: process.version, platform: `${process.platform}-${process.arch}` },
    shape: { tokens: T, hidden: H, experts: E, topk: k },
    iterations: iters,
    threads: Object.fromEntries(backends.map((b) => [b.name, b.threads])),
    rows,
  };
  const out = (args.out as string | undefined) ?? `bench/results/${result.date.slice(0, 10)}-cpu.json`;
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  if (args.json) {
    console.log(JSON.stringify(result));
    return 0;
  }
  console.log(`bench: T=${T} H=${H} E=${E} k=${k}, median of ${iters} runs, ${result.machine.cpus} CPUs (${result.machine.model})`);
  console.log(markdownTable(rows));
  console.log(`written to ${out}`);
  return 0;
}

export function markdownTable(rows: BenchRow[]): string {
  const lines = ['| backend | op | dtype | time (ms) | GB/s | vs memcpy | vs alloc+memcpy |', '|---|---|---|---:|---:|---:|---:|'];
  const pct = (x: number) => `${(x * 100).toFixed(0)}%`;
  for (const r of rows) {
    lines.push(`| ${r.backend} | ${r.op} | ${r.dtype} | ${(r.seconds * 1e3).toFixed(2)} | ${r.gbPerSecond.toFixed(2)} | ${pct(r.vsMemcpy)} | ${pct(r.vsFreshMemcpy)} |`);
  }
  return lines.join('\n');
}

async function train(args: Args): Promise<number> {
  const prefer = (args.backend as string | undefined) ?? 'auto';
  if (!['auto', 'cuda', 'cpu', 'wasm'].includes(prefer)) fail(`--backend: expected auto, cuda, cpu or wasm, got '${prefer}'`, 2);
  const backend = await createBackend({ prefer: prefer as BackendName | 'auto' });
  const steps = intOption(args, 'steps', 100);
  const lr = args.lr === undefined ? undefined : Number(args.lr);
  if (lr !== undefined && !(lr > 0)) fail(`--lr: expected a positive number, got '${args.lr}'`, 2);
  const tty = process.stderr.isTTY === true;
  const every = Math.max(1, Math.round(steps / 10));
  process.stderr.write(`train: backend ${backend.name} (${backend.threads} threads), ${steps} steps\n`);
  const result = trainMoE(backend, {
    steps,
    lr,
    seed: intOption(args, 'seed', 7),
    checkpoint: args.out as string | undefined,
    onStep: (s) => {
      if (tty) process.stderr.write(`\r${progressLine(s)}${s.step === s.steps ? '\n' : ''}`);
      else if (s.step % every === 0 || s.step === s.steps) process.stderr.write(`${progressLine(s)}\n`);
    },
  });
  const ok = result.finalLoss < 0.5 * result.initialLoss && result.reloadIdentical;
  if (args.json) {
    console.log(JSON.stringify(result));
  } else {
    console.log(`loss ${result.initialLoss.toFixed(5)} -> ${result.finalLoss.toFixed(5)} (${((result.finalLoss / result.initialLoss) * 100).toFixed(1)}% of the start) in ${result.seconds.toFixed(2)} s`);
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
      { tokens: { type: 'string' }, hidden: { type: 'string' }, experts: { type: 'string' }, topk: { type: 'string' }, iters: { type: 'string' }, out: { type: 'string' } },
    ],
    train: [train, { backend: { type: 'string' }, steps: { type: 'string' }, lr: { type: 'string' }, seed: { type: 'string' }, out: { type: 'string' } }],
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
