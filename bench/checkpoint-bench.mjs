#!/usr/bin/env node
/**
 * `node bench/checkpoint-bench.mjs`: loading one layer of a multi-GB sharded checkpoint reads only
 * the bytes it needs. Writes a synthetic DeepSeek-like bf16 checkpoint to a temporary directory
 * (streamed shard by shard, never held in memory): the embedding, then per layer the router
 * (`mlp.gate.weight` [E, dim], `mlp.gate.e_score_correction_bias` [E] f32), the shared experts,
 * and E per-expert Hugging Face keys (`mlp.experts.{i}.gate_proj/up_proj/down_proj.weight`),
 * packed into shards of at most --shard-mb MB in that order (as save_pretrained packs them), so
 * a layer's experts straddle two shards. Then it times, through the native backend with the
 * directory path (shards opened lazily):
 *
 * - one layer's experts (`loadExperts`, all E),
 * - the same layer for expert-parallel rank 3 of 8,
 * - the layer's router tensors (`loadSafetensors` with their names),
 * - every header (`checkpointInfo`),
 *
 * each once with the files dropped from the page cache (`dd iflag=nocache count=0`, per file:
 * the disk is read) and then warm (best of 3), and checks that bytesRead is exactly the opened
 * shards' headers plus the wanted tensors' bytes. The same loads run on the wasm backend from
 * `{ index, shards }` in memory, with only the needed shards read into memory (not timed).
 * Prints a table and writes bench/results/<YYYY-MM-DD>-checkpoint.json. The temporary files are
 * deleted at the end (and on Ctrl-C). Needs a build (npm run build).
 *
 *   node bench/checkpoint-bench.mjs [--layers 4] [--experts 64] [--dim 2048] [--inter 1408]
 *        [--shard-mb 700] [--layer 1] [--dir /tmp] [--out FILE] [--no-wasm]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, freemem, platform, release, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    layers: { type: 'string' },
    experts: { type: 'string' },
    dim: { type: 'string' },
    inter: { type: 'string' },
    'shared-inter': { type: 'string' },
    vocab: { type: 'string' },
    'shard-mb': { type: 'string' },
    layer: { type: 'string' },
    dir: { type: 'string' },
    out: { type: 'string' },
    'no-wasm': { type: 'boolean' },
  },
});
const cfg = {
  layers: Number(args.layers ?? 4),
  experts: Number(args.experts ?? 64),
  dim: Number(args.dim ?? 2048),
  inter: Number(args.inter ?? 1408),
  sharedInter: Number(args['shared-inter'] ?? 2816),
  vocab: Number(args.vocab ?? 102400),
  shardBytes: Number(args['shard-mb'] ?? 700) * 1e6,
  layer: Number(args.layer ?? 1),
  epSize: 8,
  epRank: 3,
};
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const api = await import('../dist/index.js');

// ---------------------------------------------------------------------------------------
// The checkpoint: tensors in save_pretrained's order, packed into shards.

const BF16 = { st: 'BF16', size: 2 };
const F32 = { st: 'F32', size: 4 };
const tensors = [];
const add = (name, shape, dt = BF16) => tensors.push({ name, shape, dt, bytes: shape.reduce((a, b) => a * b, 1) * dt.size });
add('model.embed_tokens.weight', [cfg.vocab, cfg.dim]);
for (let l = 0; l < cfg.layers; l++) {
  const p = `model.layers.${l}`;
  add(`${p}.input_layernorm.weight`, [cfg.dim]);
  add(`${p}.post_attention_layernorm.weight`, [cfg.dim]);
  add(`${p}.mlp.gate.weight`, [cfg.experts, cfg.dim]);
  add(`${p}.mlp.gate.e_score_correction_bias`, [cfg.experts], F32);
  for (const w of ['gate_proj', 'up_proj']) add(`${p}.mlp.shared_experts.${w}.weight`, [cfg.sharedInter, cfg.dim]);
  add(`${p}.mlp.shared_experts.down_proj.weight`, [cfg.dim, cfg.sharedInter]);
  for (let e = 0; e < cfg.experts; e++) {
    add(`${p}.mlp.experts.${e}.gate_proj.weight`, [cfg.inter, cfg.dim]);
    add(`${p}.mlp.experts.${e}.up_proj.weight`, [cfg.inter, cfg.dim]);
    add(`${p}.mlp.experts.${e}.down_proj.weight`, [cfg.dim, cfg.inter]);
  }
}
add('model.norm.weight', [cfg.dim]);
add('lm_head.weight', [cfg.vocab, cfg.dim]);
const shardsOf = [];
for (const t of tensors) {
  const last = shardsOf[shardsOf.length - 1];
  if (!last || (last.bytes + t.bytes > cfg.shardBytes && last.tensors.length)) shardsOf.push({ tensors: [t], bytes: t.bytes });
  else {
    last.tensors.push(t);
    last.bytes += t.bytes;
  }
}
const n = shardsOf.length;
shardsOf.forEach((s, i) => {
  s.name = `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
  for (const t of s.tensors) t.file = s.name;
});
const byName = new Map(tensors.map((t) => [t.name, t]));

/** A pool of random bf16 bits; tensor data is a window of it (element i of a tensor is pool[(start + i) % len]). */
const POOL = 1 << 22;
const pool = new Uint16Array(POOL);
let seed = 0x9e3779b9;
for (let i = 0; i < POOL; i++) {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  pool[i] = (seed >>> 0) & 0xff7f; // bf16 bits, both signs; exponent never all ones: finite
}
const poolBytes = new Uint8Array(pool.buffer);
const startOf = (name) => {
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619) >>> 0;
  return h % POOL;
};
/** Element i of a bf16 tensor. */
const elem = (name, i) => pool[(startOf(name) + i) % POOL];

function writeShard(path, shard) {
  const header = { __metadata__: { format: 'pt' } };
  let off = 0;
  for (const t of shard.tensors) {
    header[t.name] = { dtype: t.dt.st, shape: t.shape, data_offsets: [off, off + t.bytes] };
    off += t.bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const jsonBytes = new TextEncoder().encode(json);
  const fd = openSync(path, 'w');
  try {
    const len = new Uint8Array(8);
    new DataView(len.buffer).setBigUint64(0, BigInt(jsonBytes.length), true);
    writeSync(fd, len);
    writeSync(fd, jsonBytes);
    const CHUNK = 8 << 20;
    for (const t of shard.tensors) {
      // The pool from the tensor's start, wrapped: written in chunks of at most 8 MiB.
      let at = startOf(t.name) * 2;
      let left = t.bytes;
      while (left > 0) {
        const k = Math.min(left, CHUNK, poolBytes.length - at);
        writeSync(fd, poolBytes, at, k);
        left -= k;
        at = (at + k) % poolBytes.length;
      }
    }
  } finally {
    closeSync(fd);
  }
  return 8 + jsonBytes.length;
}

// ---------------------------------------------------------------------------------------

const base = mkdtempSync(join(args.dir ?? tmpdir(), 'moe-ckpt-bench-'));
let cleaned = false;
const cleanup = () => {
  if (!cleaned) {
    cleaned = true;
    rmSync(base, { recursive: true, force: true });
  }
};
process.on('SIGINT', () => {
  cleanup();
  process.exit(130);
});
process.on('exit', cleanup);

const fmtMB = (b) => `${(b / 1e6).toFixed(b < 1e6 ? 3 : 1)} MB`;
const dropCache = (file) => spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']).status === 0;

try {
  const t0 = performance.now();
  const headerLen = {};
  for (const s of shardsOf) headerLen[s.name] = writeShard(join(base, s.name), s);
  const total = tensors.reduce((a, t) => a + t.bytes, 0);
  const weightMap = Object.fromEntries(tensors.map((t) => [t.name, t.file]));
  writeFileSync(join(base, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2));
  const writeMs = performance.now() - t0;
  const fileBytes = shardsOf.reduce((a, s) => a + statSync(join(base, s.name)).size, 0);
  console.log(`wrote ${n} shards, ${fmtMB(fileBytes)} (${tensors.length} tensors) to ${base} in ${(writeMs / 1000).toFixed(1)} s`);

  const prefix = `model.layers.${cfg.layer}.mlp.experts`;
  const layerFiles = [...new Set(tensors.filter((t) => t.name.startsWith(`${prefix}.`)).map((t) => t.file))];
  console.log(`layer ${cfg.layer}'s experts live in ${layerFiles.join(' and ')}`);

  /** What a load must read: the headers of the files holding `names`, and their bytes (`rows`: a row range of each). */
  const expected = (names) => {
    const files = new Set(names.map((nm) => byName.get(nm).file));
    return [...files].reduce((a, f) => a + headerLen[f], 0) + names.reduce((a, nm) => a + byName.get(nm).bytes, 0);
  };
  const expertNames = (start, end) => {
    const out = [];
    for (let e = start; e < end; e++) for (const w of ['gate_proj', 'up_proj', 'down_proj']) out.push(`${prefix}.${e}.${w}.weight`);
    return out;
  };
  const range = { start: (cfg.experts / cfg.epSize) * cfg.epRank, end: (cfg.experts / cfg.epSize) * (cfg.epRank + 1) };
  const routerNames = [`model.layers.${cfg.layer}.mlp.gate.weight`, `model.layers.${cfg.layer}.mlp.gate.e_score_correction_bias`];
  const cases = [
    {
      what: `loadExperts: layer ${cfg.layer}, all ${cfg.experts} experts`,
      names: expertNames(0, cfg.experts),
      run: (moe, src) => moe.loadExperts(src, { prefix, numExperts: cfg.experts, activation: 'swiglu' }),
    },
    {
      what: `loadExperts: layer ${cfg.layer}, epSize ${cfg.epSize}, rank ${cfg.epRank} (experts ${range.start}-${range.end - 1})`,
      names: expertNames(range.start, range.end),
      run: (moe, src) => moe.loadExperts(src, { prefix, numExperts: cfg.experts, activation: 'swiglu', epSize: cfg.epSize, epRank: cfg.epRank }),
    },
    { what: `loadSafetensors: layer ${cfg.layer}'s router (gate.weight, e_score_correction_bias)`, names: routerNames, run: (moe, src) => moe.loadSafetensors(src, { names: routerNames }) },
    { what: 'checkpointInfo: every header', names: [], all: true, run: (moe, src) => moe.checkpointInfo(src) },
  ];
  // The whole layer through MoELayer.fromPretrained (config.json written beside the shards): the
  // experts plus the router and shared expert, each of its two reads counting the headers it opens.
  const sharedNames = ['gate_proj', 'up_proj', 'down_proj'].map((w) => `model.layers.${cfg.layer}.mlp.shared_experts.${w}.weight`);
  const config = {
    model_type: 'deepseek_v3',
    hidden_size: cfg.dim,
    moe_intermediate_size: cfg.inter,
    n_routed_experts: cfg.experts,
    n_shared_experts: cfg.sharedInter / cfg.inter,
    num_hidden_layers: cfg.layers,
    first_k_dense_replace: 0,
    n_group: 8,
    topk_group: 4,
    num_experts_per_tok: 6,
    norm_topk_prob: true,
    routed_scaling_factor: 2.5,
    hidden_act: 'silu',
  };
  writeFileSync(join(base, 'config.json'), JSON.stringify(config, null, 2));
  const layerRead = async (moe, src, ep) => {
    const layer = await api.MoELayer.fromPretrained(moe, { config, checkpoint: src, layer: cfg.layer, ...ep });
    return { bytesRead: layer.pretrained.bytesRead };
  };
  cases.push(
    {
      what: `MoELayer.fromPretrained: layer ${cfg.layer} (router, shared expert, all experts)`,
      names: [...expertNames(0, cfg.experts), ...routerNames, ...sharedNames],
      expect: () => expected(expertNames(0, cfg.experts)) + expected([...routerNames, ...sharedNames]),
      run: (moe, src) => layerRead(moe, src, {}),
    },
    {
      what: `MoELayer.fromPretrained: layer ${cfg.layer}, epSize ${cfg.epSize}, rank ${cfg.epRank}`,
      names: [...expertNames(range.start, range.end), ...routerNames, ...sharedNames],
      expect: () => expected(expertNames(range.start, range.end)) + expected([...routerNames, ...sharedNames]),
      run: (moe, src) => layerRead(moe, src, { epSize: cfg.epSize, epRank: cfg.epRank }),
    },
  );

  /** Spot checks: stacked[e, d, j] = gate_proj_e[j, d], stacked[e, d, inter + j] = up_proj_e[j, d], down[e, j, d] = down_proj_e[d, j]. */
  const check = (out, c) => {
    if (!out.gateAndUpProjs) return;
    const { dim, inter } = cfg;
    const w1 = out.gateAndUpProjs.data;
    const w2 = out.downProjs.data;
    for (const [l, d, j] of [
      [0, 0, 0],
      [out.end - out.start - 1, dim - 1, inter - 1],
      [Math.floor((out.end - out.start) / 2), 777 % dim, 333 % inter],
    ]) {
      const e = out.start + l;
      const g = elem(`${prefix}.${e}.gate_proj.weight`, j * dim + d);
      const u = elem(`${prefix}.${e}.up_proj.weight`, j * dim + d);
      const dn = elem(`${prefix}.${e}.down_proj.weight`, d * inter + j);
      const got = [w1[(l * dim + d) * 2 * inter + j], w1[(l * dim + d) * 2 * inter + inter + j], w2[(l * inter + j) * dim + d]];
      if (got.join() !== [g, u, dn].join()) throw new Error(`${c.what}: expert ${e} [${d}, ${j}]: got ${got}, expected ${[g, u, dn]}`);
    }
  };

  const rows = [];
  const cpu = await api.createBackend({ prefer: 'cpu' });
  const files = [...shardsOf.map((s) => join(base, s.name)), join(base, 'model.safetensors.index.json')];
  for (const c of cases) {
    const want = c.all ? shardsOf.reduce((a, s) => a + headerLen[s.name], 0) : c.expect ? c.expect() : expected(c.names);
    const dropped = files.every(dropCache);
    let t = performance.now();
    let out = await c.run(cpu, base);
    const coldMs = performance.now() - t;
    check(out, c);
    if (out.bytesRead !== want) throw new Error(`${c.what}: bytesRead ${out.bytesRead}, expected ${want}`);
    const warm = [];
    for (let i = 0; i < 3; i++) {
      out = null;
      t = performance.now();
      out = await c.run(cpu, base);
      warm.push(performance.now() - t);
    }
    rows.push({
      backend: 'cpu (path)',
      what: c.what,
      bytesRead: out.bytesRead,
      expectedBytes: want,
      fractionOfCheckpoint: out.bytesRead / fileBytes,
      coldMs: dropped ? coldMs : null,
      warmMs: Math.min(...warm),
    });
    out = null;
  }

  if (!args['no-wasm']) {
    const wasm = await api.createBackend({ prefer: 'wasm' });
    const index = JSON.parse(readFileSync(join(base, 'model.safetensors.index.json'), 'utf8'));
    for (const c of cases.filter((x) => !x.all)) {
      const needed = [...new Set(c.names.map((nm) => byName.get(nm).file))];
      const shards = Object.fromEntries(needed.map((f) => [f, readFileSync(join(base, f))]));
      const src = { index, shards };
      const want = c.expect ? c.expect() : expected(c.names);
      let out = await c.run(wasm, src);
      check(out, c);
      if (out.bytesRead !== want) throw new Error(`wasm ${c.what}: bytesRead ${out.bytesRead}, expected ${want}`);
      const warm = [];
      for (let i = 0; i < 3; i++) {
        out = null;
        const t = performance.now();
        out = await c.run(wasm, src);
        warm.push(performance.now() - t);
      }
      rows.push({
        backend: `wasm ({ index, shards }: ${needed.length} of ${n} shards in memory)`,
        what: c.what,
        bytesRead: out.bytesRead,
        expectedBytes: want,
        fractionOfCheckpoint: out.bytesRead / fileBytes,
        coldMs: null,
        warmMs: Math.min(...warm),
      });
      out = null;
    }
  }

  // ---- report
  const pad = (s, w) => String(s).padEnd(w);
  console.log(`\ncheckpoint: ${fmtMB(fileBytes)} in ${n} shards (${cfg.layers} layers, ${cfg.experts} experts of dim ${cfg.dim}, inter ${cfg.inter}, bf16)\n`);
  console.log(`| ${pad('backend', 50)} | ${pad('load', 72)} | ${pad('bytes read', 12)} | of checkpoint | cold ms | warm ms |`);
  console.log(`|${'-'.repeat(52)}|${'-'.repeat(74)}|${'-'.repeat(14)}|---------------|---------|---------|`);
  for (const r of rows) {
    console.log(
      `| ${pad(r.backend, 50)} | ${pad(r.what, 72)} | ${pad(fmtMB(r.bytesRead), 12)} | ${pad(`${(100 * r.fractionOfCheckpoint).toFixed(4)} %`, 13)} | ${pad(r.coldMs === null ? '-' : r.coldMs.toFixed(0), 7)} | ${pad(r.warmMs.toFixed(r.warmMs < 10 ? 2 : 0), 7)} |`,
    );
  }
  let commit = 'unknown';
  try {
    commit = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no', '--', 'crates', 'ts', 'bench/checkpoint-bench.mjs'], { cwd: ROOT, encoding: 'utf8' }).trim();
    if (dirty) commit += ' (with uncommitted changes)';
  } catch {}
  const date = new Date().toISOString().slice(0, 10);
  const outFile = args.out ?? join(ROOT, 'bench/results', `${date}-checkpoint.json`);
  mkdirSync(dirname(outFile), { recursive: true });
  const result = {
    bench: 'checkpoint',
    date: new Date().toISOString(),
    commit,
    machine: { cpu: cpus()[0]?.model, cores: cpus().length, memoryBytes: totalmem(), freeMemoryBytes: freemem(), platform: `${platform()} ${release()}`, node: process.version },
    checkpoint: {
      files: n,
      bytes: fileBytes,
      tensors: tensors.length,
      layers: cfg.layers,
      experts: cfg.experts,
      dim: cfg.dim,
      inter: cfg.inter,
      sharedInter: cfg.sharedInter,
      dtype: 'bfloat16',
      shardBytesMax: cfg.shardBytes,
      layerExpertFiles: layerFiles,
      writeMs: Math.round(writeMs),
    },
    notes:
      "A shared 2-vCPU build machine (other builds ran beside it: expect +-30%). cold: the checkpoint files dropped from the page cache first (dd iflag=nocache count=0 per file), one run; warm: best of 3 right after. wasm: the needed shards read into memory beforehand (not timed). bytesRead is checked to equal the opened shards' headers plus the wanted tensors' bytes.",
    rows,
  };
  writeFileSync(outFile, `${JSON.stringify(result, null, 2)}\n`);
  console.log(`\nwrote ${outFile}`);
} finally {
  cleanup();
}
