/**
 * Checkpoints (safetensors) on every available backend:
 *
 * - round trip: Hugging Face per-expert tensors -> stacked (stackExperts) -> safetensors ->
 *   per-rank load (loadExperts) for EP sizes 1, 2, 3, 4 with E = 8 and 60 equals slicing the
 *   full stacked tensor, bit for bit, and reads only the header and the rank's bytes;
 * - every key scheme (stacked, hf, mixtral, gpt_oss, llama4, hf_fused, granite): unstack ->
 *   save -> load (detected, or asked for) gives the stacked weights back, and the written
 *   tensors match each scheme's definition (checked here against the hf tensors);
 * - sharded checkpoints in memory ({ index, shards }, the index as object, text or bytes) and,
 *   on the native backends in Node, on disk (a directory, an index .json, a .safetensors file):
 *   per-rank loads across shard boundaries, bytesRead exactly the opened files' headers plus
 *   the wanted bytes, only the needed shards required, checkpointInfo, int64 tensors;
 * - errors: missing keys listed (nearest names; the keys under a prefix and the schemes looked
 *   for), wrong shapes naming the tensor, an absent shard naming itself and the tensor.
 *
 * Browser-safe: node:fs is imported only when running in Node (file paths are skipped elsewhere).
 */
import { afterAll, describe, expect, it } from 'vitest';

import { tensor, type ActivationKind, type Backend, type CheckpointSource, type ExpertsFormat, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { bitsOf, escapeRegExp, expectThrows, rng } from './util.js';

registerBackendReport();

const PREFIX = 'model.layers.3.mlp.experts';

/** node:fs and friends in Node; null in a browser (path sources are then skipped). */
interface NodeFs {
  mkdtempSync(p: string): string;
  rmSync(p: string, o: { recursive: boolean; force: boolean }): void;
  writeFileSync(p: string, d: Uint8Array | string): void;
  mkdirSync(p: string, o: { recursive: boolean }): void;
  tmpdir(): string;
  join(...p: string[]): string;
}
const IN_NODE = typeof process !== 'undefined' && typeof process.versions?.node === 'string' && typeof window === 'undefined';
const fsMods = IN_NODE ? ['node:fs', 'node:os', 'node:path'] : [];
const [fsMod, osMod, pathMod] = (await Promise.all(fsMods.map((m) => import(/* @vite-ignore */ m)))) as [Record<string, never>, Record<string, never>, Record<string, never>];
const nodeFs: NodeFs | null = IN_NODE ? { ...fsMod, tmpdir: (osMod as unknown as { tmpdir(): string }).tmpdir, join: (pathMod as unknown as { join(...p: string[]): string }).join } : null;
const dir = nodeFs ? nodeFs.mkdtempSync(nodeFs.join(nodeFs.tmpdir(), 'moe-ckpt-')) : '';
afterAll(() => nodeFs?.rmSync(dir, { recursive: true, force: true }));

interface Hf {
  tensors: Record<string, Tensor>;
  gate: Float32Array[];
  up: Float32Array[];
  down: Float32Array[];
}

/** Random Hugging Face experts: gate/up [inter, dim], down [dim, inter] per expert. */
function hfExperts(e: number, dim: number, inter: number, kind: ActivationKind, seed: number, dtype: 'float32' | 'bfloat16' = 'float32', prefix = PREFIX): Hf {
  const rand = rng(seed);
  const mk = (n: number) => Float32Array.from({ length: n }, () => Math.fround(rand() * 2 - 1));
  const hf: Hf = { tensors: {}, gate: [], up: [], down: [] };
  const t = (shape: number[], v: Float32Array) => (dtype === 'float32' ? tensor('float32', shape, v) : tensor('bfloat16', shape, Array.from(v)));
  for (let i = 0; i < e; i++) {
    const [g, u, d] = [mk(inter * dim), mk(inter * dim), mk(dim * inter)];
    if (kind !== 'relu2') hf.tensors[`${prefix}.${i}.gate_proj.weight`] = t([inter, dim], g);
    hf.tensors[`${prefix}.${i}.up_proj.weight`] = t([inter, dim], u);
    hf.tensors[`${prefix}.${i}.down_proj.weight`] = t([dim, inter], d);
    hf.gate.push(g);
    hf.up.push(u);
    hf.down.push(d);
  }
  return hf;
}

/** The stacked layout, built here from its definition. */
function stackedByHand(hf: Hf, dim: number, inter: number, kind: ActivationKind): { w1: Float32Array; w2: Float32Array } {
  const e = hf.up.length;
  const w = kind === 'relu2' ? inter : 2 * inter;
  const w1 = new Float32Array(e * dim * w);
  const w2 = new Float32Array(e * inter * dim);
  for (let i = 0; i < e; i++) {
    for (let d = 0; d < dim; d++) {
      for (let j = 0; j < inter; j++) {
        const base = (i * dim + d) * w;
        if (kind === 'relu2') w1[base + j] = hf.up[i][j * dim + d];
        else if (kind === 'quick_geglu') {
          w1[base + 2 * j] = hf.gate[i][j * dim + d];
          w1[base + 2 * j + 1] = hf.up[i][j * dim + d];
        } else {
          w1[base + j] = hf.gate[i][j * dim + d];
          w1[base + inter + j] = hf.up[i][j * dim + d];
        }
        w2[(i * inter + j) * dim + d] = hf.down[i][d * inter + j];
      }
    }
  }
  return { w1, w2 };
}

const up = (x: { gateAndUpProjs?: Tensor; upProjs?: Tensor }) => (x.gateAndUpProjs ?? x.upProjs)!;
const headerBytes = (bytes: Uint8Array) => 8 + Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
const f32 = (t: Tensor) => t.data as Float32Array;
const nbytes = (t: Tensor) => t.data.byteLength;

/** A sharded checkpoint built from tensors and a file for each name. */
function shard(moe: Backend, tensors: Record<string, Tensor>, fileOf: (name: string) => string) {
  const groups: Record<string, Record<string, Tensor>> = {};
  const weightMap: Record<string, string> = {};
  for (const [n, t] of Object.entries(tensors)) {
    const f = fileOf(n);
    groups[f] ??= {};
    groups[f][n] = t;
    weightMap[n] = f;
  }
  const shards: Record<string, Uint8Array> = {};
  for (const [f, g] of Object.entries(groups)) shards[f] = moe.saveSafetensors(g, { metadata: { format: 'pt' } });
  const total = Object.values(tensors).reduce((s, t) => s + nbytes(t), 0);
  return { index: { metadata: { total_size: total }, weight_map: weightMap }, shards, weightMap };
}

describe.each(backendRows)('checkpoints on %s', (name, moe: Backend) => {
  it.each([
    [8, 'swiglu'],
    [60, 'swiglu'],
    [8, 'quick_geglu'],
    [8, 'relu2'],
  ] as [number, ActivationKind][])('E = %i (%s): HF -> stacked -> safetensors -> per-rank load equals slicing, EP sizes 1-4', (e, kind) => {
    const [dim, inter] = [5, 3];
    const w = kind === 'relu2' ? inter : 2 * inter;
    const hf = hfExperts(e, dim, inter, kind, e * 7 + kind.length);
    const stacked = moe.stackExperts(hf.tensors, { prefix: PREFIX, numExperts: e, activation: kind });
    const want = stackedByHand(hf, dim, inter, kind);
    expect([...up(stacked).shape]).toEqual([e, dim, w]);
    expect(Array.from(f32(up(stacked)))).toEqual(Array.from(want.w1));
    expect(Array.from(f32(stacked.downProjs))).toEqual(Array.from(want.w2));
    expect(stacked.format).toBe('hf');

    // Back to HF keys: the same tensors, bit for bit.
    const back = moe.unstackExperts(stacked, { prefix: PREFIX, activation: kind });
    expect(Object.keys(back).sort()).toEqual(Object.keys(hf.tensors).sort());
    for (const [k, t] of Object.entries(hf.tensors)) expect(bitsOf(back[k]), k).toEqual(bitsOf(t));

    const stackedFile = moe.saveSafetensors({ [`${PREFIX}.gate_and_up_projs`]: up(stacked), [`${PREFIX}.down_projs`]: stacked.downProjs }, { metadata: { format: 'pt' } });
    const hfFile = moe.saveSafetensors(hf.tensors);
    const full = moe.loadSafetensors(stackedFile);
    expect(full.metadata).toEqual({ format: 'pt' });
    expect(full.bytesRead).toBe(stackedFile.length);
    expect(bitsOf(full.tensors[`${PREFIX}.gate_and_up_projs`])).toEqual(bitsOf(up(stacked)));
    const path = nodeFs ? nodeFs.join(dir, `${name}-${e}-${kind}.safetensors`) : '';
    nodeFs?.writeFileSync(path, stackedFile);

    for (const epSize of [1, 2, 3, 4]) {
      for (let epRank = 0; epRank < epSize; epRank++) {
        const { start, end } = moe.expertRangeForRank(e, epSize, epRank);
        const slice1 = want.w1.subarray(start * dim * w, end * dim * w);
        const slice2 = want.w2.subarray(start * inter * dim, end * inter * dim);
        const sources: [string, string | Uint8Array][] = [
          ['stacked bytes', stackedFile],
          ['hf bytes', hfFile],
        ];
        if (name !== 'wasm' && nodeFs) sources.push(['stacked file', path]);
        for (const [what, src] of sources) {
          const got = moe.loadExperts(src, { prefix: PREFIX, numExperts: e, epSize, epRank, activation: kind });
          const tag = `${what} ep ${epRank}/${epSize}`;
          expect([got.start, got.end], tag).toEqual([start, end]);
          expect([...up(got).shape], tag).toEqual([end - start, dim, w]);
          expect(Array.from(f32(up(got))), tag).toEqual(Array.from(slice1));
          expect(Array.from(f32(got.downProjs)), tag).toEqual(Array.from(slice2));
          // Only the header and this rank's experts were read.
          const header = headerBytes(what === 'hf bytes' ? hfFile : stackedFile);
          expect(got.bytesRead, tag).toBe(header + (end - start) * (dim * w + inter * dim) * 4);
        }
      }
    }
  });

  it('bfloat16 experts load bit-exactly, and stacked biases come along', () => {
    const [e, dim, inter] = [6, 4, 2];
    const hf = hfExperts(e, dim, inter, 'swiglu', 5, 'bfloat16');
    const s = moe.stackExperts(hf.tensors, { prefix: PREFIX, numExperts: e, activation: 'swiglu' });
    expect(s.gateAndUpProjs!.dtype).toBe('bfloat16');
    const b1 = tensor(
      'float32',
      [e, 2 * inter],
      Float32Array.from({ length: e * 2 * inter }, (_, i) => i),
    );
    const b2 = tensor(
      'float32',
      [e, dim],
      Float32Array.from({ length: e * dim }, (_, i) => -i),
    );
    const file = moe.saveSafetensors({
      [`${PREFIX}.gate_and_up_projs`]: s.gateAndUpProjs!,
      [`${PREFIX}.down_projs`]: s.downProjs,
      [`${PREFIX}.gate_up_proj_bias`]: b1,
      [`${PREFIX}.down_proj_bias`]: b2,
    });
    const got = moe.loadExperts(file, { prefix: PREFIX, numExperts: e, epSize: 4, epRank: 1, activation: 'swiglu' });
    expect([got.start, got.end]).toEqual([2, 4]);
    expect(Array.from(got.gateAndUpProjs!.data as Uint16Array)).toEqual(Array.from((s.gateAndUpProjs!.data as Uint16Array).subarray(2 * dim * 2 * inter, 4 * dim * 2 * inter)));
    expect(Array.from(got.biases!.gateUpProjBias!.data as Float32Array)).toEqual(Array.from(b1.data.subarray(2 * 2 * inter, 4 * 2 * inter)));
    expect(Array.from(got.biases!.downProjBias!.data as Float32Array)).toEqual(Array.from(b2.data.subarray(2 * dim, 4 * dim)));
    // HF biases through unstack / stack.
    const hfb = moe.unstackExperts(s, { prefix: PREFIX, activation: 'swiglu', biases: { gateUpProjBias: b1, downProjBias: b2 } });
    expect([...hfb[`${PREFIX}.3.gate_proj.bias`].shape]).toEqual([inter]);
    const again = moe.stackExperts(hfb, { prefix: PREFIX, numExperts: e, activation: 'swiglu' });
    expect(bitsOf(again.biases!.gateUpProjBias!)).toEqual(bitsOf(b1));
    expect(bitsOf(again.biases!.downProjBias!)).toEqual(bitsOf(b2));
  });

  const SCHEMES: ExpertsFormat[] = ['stacked', 'hf', 'mixtral', 'gpt_oss', 'llama4', 'hf_fused', 'granite'];
  const FUSED_GATE_UP = new Set<ExpertsFormat>(['gpt_oss', 'llama4', 'hf_fused', 'granite']);

  it.each(['swiglu', 'quick_geglu', 'relu2'] as ActivationKind[])('every key scheme (%s): unstack -> save -> load round-trips, per rank, reading only the rank bytes', (kind) => {
    const [e, dim, inter] = [6, 4, 3];
    const w = kind === 'relu2' ? inter : 2 * inter;
    const rand = rng(kind.length * 31);
    const r = (n: number) => Float32Array.from({ length: n }, () => Math.fround(rand() * 2 - 1));
    const weights = { [kind === 'relu2' ? 'upProjs' : 'gateAndUpProjs']: tensor('float32', [e, dim, w], r(e * dim * w)), downProjs: tensor('float32', [e, inter, dim], r(e * inter * dim)) };
    const biases = { gateUpProjBias: tensor('float32', [e, w], r(e * w)), downProjBias: tensor('float32', [e, dim], r(e * dim)) };
    for (const format of SCHEMES) {
      const withBias = format !== 'granite';
      const opts = { prefix: PREFIX, activation: kind, format, ...(withBias ? { biases } : {}) };
      if (kind === 'relu2' && FUSED_GATE_UP.has(format)) {
        expectThrows(() => moe.unstackExperts(weights, opts), RangeError, /^unstackExperts: format: activation 'relu2' has no gate projection/);
        continue;
      }
      const keys = moe.unstackExperts(weights, opts);
      // Llama 4's keys without biases look like GPT-OSS's: its format is stated.
      const asked = format === 'llama4' ? { format } : {};
      const stacked = moe.stackExperts(keys, { prefix: PREFIX, numExperts: e, activation: kind, ...asked });
      expect(stacked.format, format).toBe(format);
      expect(bitsOf(up(stacked)), format).toEqual(bitsOf(up(weights)));
      expect(bitsOf(stacked.downProjs), format).toEqual(bitsOf(weights.downProjs));
      if (withBias) expect(bitsOf(stacked.biases!.gateUpProjBias!), format).toEqual(bitsOf(biases.gateUpProjBias));
      const file = moe.saveSafetensors(keys);
      for (const [epSize, epRank] of [
        [1, 0],
        [2, 1],
        [4, 2],
      ]) {
        const got = moe.loadExperts(file, { prefix: PREFIX, numExperts: e, epSize, epRank, activation: kind, ...asked });
        const { start, end } = got;
        const tag = `${format} ${epRank}/${epSize}`;
        expect(got.format, tag).toBe(format);
        expect(bitsOf(up(got)), tag).toEqual(bitsOf(up(weights)).slice(start * dim * w, end * dim * w));
        expect(bitsOf(got.downProjs), tag).toEqual(bitsOf(weights.downProjs).slice(start * inter * dim, end * inter * dim));
        if (withBias) expect(bitsOf(got.biases!.downProjBias!), tag).toEqual(bitsOf(biases.downProjBias).slice(start * dim, end * dim));
        const biasBytes = withBias ? (end - start) * (w + dim) * 4 : 0;
        expect(got.bytesRead, tag).toBe(headerBytes(file) + (end - start) * (dim * w + inter * dim) * 4 + biasBytes);
      }
    }
  });

  it("each scheme's tensors match its definition (Linear weights [out, in]; gate/up halves or interleaved)", () => {
    const [e, dim, inter] = [3, 4, 2];
    const hf = hfExperts(e, dim, inter, 'swiglu', 17);
    const g = (i: number, j: number, d: number) => hf.gate[i][j * dim + d];
    const u = (i: number, j: number, d: number) => hf.up[i][j * dim + d];
    const dn = (i: number, d: number, j: number) => hf.down[i][d * inter + j];
    /** A [e, a, b] array filled by f(i, x, y). */
    const build = (a: number, b: number, f: (i: number, x: number, y: number) => number) => {
      const out: number[] = [];
      for (let i = 0; i < e; i++) for (let x = 0; x < a; x++) for (let y = 0; y < b; y++) out.push(f(i, x, y));
      return out;
    };
    for (const kind of ['swiglu', 'quick_geglu'] as ActivationKind[]) {
      const s = moe.stackExperts(hf.tensors, { prefix: PREFIX, numExperts: e, activation: kind });
      const write = (format: ExpertsFormat) => moe.unstackExperts(s, { prefix: PREFIX, activation: kind, format });
      const mx = write('mixtral');
      for (let i = 0; i < e; i++) {
        for (const [m, h] of [
          ['w1', 'gate_proj'],
          ['w3', 'up_proj'],
          ['w2', 'down_proj'],
        ]) {
          expect(bitsOf(mx[`${PREFIX}.${i}.${m}.weight`]), `${kind} mixtral ${i} ${m}`).toEqual(bitsOf(hf.tensors[`${PREFIX}.${i}.${h}.weight`]));
        }
      }
      const down = build(inter, dim, (i, j, d) => dn(i, d, j));
      const downT = build(dim, inter, (i, d, j) => dn(i, d, j));
      const gptOss = write('gpt_oss');
      expect([...gptOss[`${PREFIX}.gate_up_proj`].shape]).toEqual([e, dim, 2 * inter]);
      expect(Array.from(f32(gptOss[`${PREFIX}.gate_up_proj`])), `${kind} gpt_oss`).toEqual(build(dim, 2 * inter, (i, d, c) => (c % 2 === 0 ? g(i, c / 2, d) : u(i, (c - 1) / 2, d))));
      expect(Array.from(f32(gptOss[`${PREFIX}.down_proj`]))).toEqual(down);
      const llama4 = write('llama4');
      expect(Array.from(f32(llama4[`${PREFIX}.gate_up_proj`])), `${kind} llama4`).toEqual(build(dim, 2 * inter, (i, d, c) => (c < inter ? g(i, c, d) : u(i, c - inter, d))));
      expect(Array.from(f32(llama4[`${PREFIX}.down_proj`]))).toEqual(down);
      const fusedRows = build(2 * inter, dim, (i, r, d) => (r < inter ? g(i, r, d) : u(i, r - inter, d)));
      const v5 = write('hf_fused');
      expect([...v5[`${PREFIX}.gate_up_proj`].shape]).toEqual([e, 2 * inter, dim]);
      expect(Array.from(f32(v5[`${PREFIX}.gate_up_proj`])), `${kind} hf_fused`).toEqual(fusedRows);
      expect([...v5[`${PREFIX}.down_proj`].shape]).toEqual([e, dim, inter]);
      expect(Array.from(f32(v5[`${PREFIX}.down_proj`]))).toEqual(downT);
      const granite = write('granite');
      expect(Array.from(f32(granite[`${PREFIX}.input_linear.weight`])), `${kind} granite`).toEqual(fusedRows);
      expect(Array.from(f32(granite[`${PREFIX}.output_linear.weight`]))).toEqual(downT);
      // And back: each loads to the same stacked weights.
      for (const [format, keys] of [
        ['mixtral', mx],
        ['gpt_oss', gptOss],
        ['hf_fused', v5],
        ['granite', granite],
      ] as [ExpertsFormat, Record<string, Tensor>][]) {
        const again = moe.loadExperts(moe.saveSafetensors(keys), { prefix: PREFIX, numExperts: e, activation: kind, ...(format === 'gpt_oss' ? { format } : {}) });
        expect(again.format).toBe(format);
        expect(bitsOf(again.gateAndUpProjs!), `${kind} ${format}`).toEqual(bitsOf(s.gateAndUpProjs!));
      }
    }
  });

  it('errors name the key', () => {
    const [e, dim, inter] = [8, 4, 2];
    const hf = hfExperts(e, dim, inter, 'swiglu', 11);
    const load =
      (tensors: Record<string, Tensor>, numExperts = e) =>
      () =>
        moe.loadExperts(moe.saveSafetensors(tensors), { prefix: PREFIX, numExperts, epSize: 2, epRank: 1, activation: 'swiglu' });
    const k = (i: number, rest: string) => escapeRegExp(`${PREFIX}.${i}.${rest}`);
    const missing = { ...hf.tensors };
    delete missing[`${PREFIX}.5.up_proj.weight`];
    expectThrows(load(missing), RangeError, new RegExp(`^loadExperts: ${k(5, 'up_proj.weight')}: missing from the checkpoint`));
    expectThrows(load(hf.tensors, 7), RangeError, new RegExp(`^loadExperts: ${escapeRegExp(PREFIX)}\\.7\\.\\w+_proj\\.weight: expert 7 is outside \\[0, numExperts = 7\\)`));
    expectThrows(load(hf.tensors, 9), RangeError, new RegExp(`^loadExperts: ${k(8, 'gate_proj.weight')}: missing from the checkpoint`));
    const wrong = { ...hf.tensors, [`${PREFIX}.2.down_proj.weight`]: tensor('float32', [dim, inter + 1]) };
    expectThrows(load(wrong), RangeError, new RegExp(`^loadExperts: ${k(2, 'down_proj.weight')}: expected shape \\[4, 2\\] \\(\\[dim, inter\\]\\), got \\[4, 3\\]`));
    const mixed = { ...hf.tensors, [`${PREFIX}.4.up_proj.weight`]: tensor('bfloat16', [inter, dim]) };
    expectThrows(load(mixed), TypeError, new RegExp(`^loadExperts: ${k(4, 'up_proj.weight')}\\.dtype: expected float32 like the other expert weights`));
    const stacked = { [`${PREFIX}.gate_and_up_projs`]: tensor('float32', [6, dim, 2 * inter]), [`${PREFIX}.down_projs`]: tensor('float32', [6, inter, dim]) };
    expectThrows(load(stacked), RangeError, new RegExp(`^loadExperts: ${escapeRegExp(PREFIX)}\\.gate_and_up_projs: holds 6 experts`));
    // Fused schemes: a wrong down projection names it, with the expected and the given shape.
    const gptOss = {
      [`${PREFIX}.gate_up_proj`]: tensor('float32', [e, dim, 2 * inter]),
      [`${PREFIX}.gate_up_proj_bias`]: tensor('float32', [e, 2 * inter]),
      [`${PREFIX}.down_proj`]: tensor('float32', [e, inter, dim]),
      [`${PREFIX}.down_proj_bias`]: tensor('float32', [e, dim + 1]),
    };
    expectThrows(load(gptOss), RangeError, new RegExp(`^loadExperts: ${escapeRegExp(PREFIX)}\\.down_proj_bias: expected shape \\[8, 4\\] \\(\\[numExperts, dim\\]\\), got \\[8, 5\\]`));
    // Nothing under the prefix: the keys under its parent, and every scheme looked for.
    const other = {
      'model.layers.3.mlp.gate.weight': tensor('float32', [e, dim]),
      'model.layers.3.mlp.experts_x.0.w9': tensor('float32', [1]),
      'model.layers.3.mlp.experts_x.1.w9': tensor('float32', [1]),
    };
    const err = expectThrows(
      load(other),
      RangeError,
      new RegExp(`^loadExperts: ${escapeRegExp(PREFIX)}: no expert weights found in a known key scheme \\(looked for stacked: '${escapeRegExp(PREFIX)}\\.gate_and_up_projs'`),
    );
    expect(err.message).toContain("hf: 'model.layers.3.mlp.experts.{i}.gate_proj.weight'");
    expect(err.message).toContain("mixtral: 'model.layers.3.mlp.experts.{i}.w1.weight' (gate)");
    expect(err.message).toContain("gpt_oss: 'model.layers.3.mlp.experts.gate_up_proj' [E, dim, 2 * inter] (gate, up interleaved)");
    expect(err.message).toContain(
      "The checkpoint's keys (none under 'model.layers.3.mlp.experts.'; under its parent 'model.layers.3.mlp.'): 'model.layers.3.mlp.experts_x.{i}.w9' (2 keys), 'model.layers.3.mlp.gate.weight'",
    );
    // A scheme asked for and absent: what is there, and that scheme.
    const asked = expectThrows(
      () => moe.loadExperts(moe.saveSafetensors(hf.tensors), { prefix: PREFIX, numExperts: e, activation: 'swiglu', format: 'mixtral' }),
      RangeError,
      new RegExp(`^loadExperts: ${escapeRegExp(PREFIX)}: no expert weights found in the 'mixtral' key scheme`),
    );
    expect(asked.message).toContain(`The checkpoint's keys under '${PREFIX}.': '${PREFIX}.{i}.down_proj.weight' (8 keys), '${PREFIX}.{i}.gate_proj.weight' (8 keys)`);
    expectThrows(
      () => moe.loadExperts(moe.saveSafetensors(hf.tensors), { prefix: PREFIX, numExperts: e, activation: 'swiglu', format: 'deepseek' as ExpertsFormat }),
      RangeError,
      /^loadExperts: format: expected one of 'stacked', 'hf', 'mixtral', 'gpt_oss', 'llama4', 'hf_fused', 'granite', got 'deepseek'/,
    );
    expectThrows(() => moe.loadExperts(new Uint8Array(5), { prefix: PREFIX, numExperts: 8, activation: 'swiglu' }), RangeError, /^loadExperts: checkpoint: not a safetensors file/);
    // A missing name lists the checkpoint's nearest names (the longest common prefix), not just the first few.
    const near = expectThrows(
      () => moe.loadSafetensors(moe.saveSafetensors(hf.tensors), { names: [`${PREFIX}.5.gate_proj.bias`] }),
      RangeError,
      new RegExp(`^loadSafetensors: ${k(5, 'gate_proj.bias')}: no such tensor in the checkpoint \\(24 tensors; the nearest: '${k(5, 'gate_proj.weight')}'\\)$`),
    );
    void near;
    const many = expectThrows(
      () => moe.loadSafetensors(moe.saveSafetensors(hf.tensors), { names: [`${PREFIX}.9.up_proj.weight`] }),
      RangeError,
      /^loadSafetensors: .*: no such tensor in the checkpoint \(24 tensors; the nearest: /,
    );
    expect(many.message).toContain(`'${PREFIX}.0.down_proj.weight', `);
    expect(many.message).toContain('... (24 in all)');
    expectThrows(
      () => moe.saveSafetensors({ a: tensor('float32', [2], [1, 2]), b: { dtype: 'float32', shape: [3], data: new Float32Array(2) } as Tensor }),
      RangeError,
      /^saveSafetensors: b\.data: shape \[3\] needs 3 elements/,
    );
    expectThrows(() => moe.loadSafetensors({ index: {}, shards: {} }), RangeError, /^loadSafetensors: index: not a safetensors index: no 'weight_map'/);
    expectThrows(() => moe.loadSafetensors({ index: 'nope', shards: {} }), RangeError, /^loadSafetensors: index: not a safetensors index \(model\.safetensors\.index\.json\)/);
    expectThrows(
      () => moe.loadSafetensors({ index: { weight_map: {} }, shards: { a: [1] } } as unknown as CheckpointSource),
      TypeError,
      /^loadSafetensors: source\.shards\['a'\]: expected a Uint8Array/,
    );
    expectThrows(
      () => moe.loadSafetensors({ index: { weight_map: {} }, shard: {} } as unknown as CheckpointSource),
      TypeError,
      /^loadSafetensors: source\.shard: not a key of a sharded checkpoint source/,
    );
    expectThrows(() => moe.checkpointInfo(42 as unknown as CheckpointSource), TypeError, /^checkpointInfo: source: expected a path, a Uint8Array \(one \.safetensors file\) or \{ index, shards \}/);
  });

  it('int64 tensors load as BigInt64Array; unloadable dtypes are listed by checkpointInfo', () => {
    const ids = tensor('int64', [3], BigInt64Array.from([7n, -1n, 1n << 40n]));
    const file = moe.saveSafetensors({ ids, w: tensor('float32', [2], [1, 2]) });
    const got = moe.loadSafetensors(file, { names: ['ids'] });
    expect(got.tensors.ids.dtype).toBe('int64');
    expect(got.tensors.ids.data).toBeInstanceOf(BigInt64Array);
    expect(Array.from(got.tensors.ids.data as BigInt64Array)).toEqual([7n, -1n, 1n << 40n]);
    expect(got.bytesRead).toBe(headerBytes(file) + 24);
    // A header with an F8_E4M3 tensor (as DeepSeek-V3's): listed, the others load, it does not.
    const json = new TextEncoder().encode(JSON.stringify({ q: { dtype: 'F8_E4M3', shape: [2], data_offsets: [0, 2] }, s: { dtype: 'F32', shape: [1], data_offsets: [2, 6] } }));
    const f8 = new Uint8Array(8 + json.length + 6);
    new DataView(f8.buffer).setBigUint64(0, BigInt(json.length), true);
    f8.set(json, 8);
    f8.set([1, 2, 0, 0, 128, 63], 8 + json.length);
    const info = moe.checkpointInfo(f8);
    expect(info.tensors).toEqual([
      { name: 'q', dtype: 'F8_E4M3', shape: [2], file: '' },
      { name: 's', dtype: 'float32', shape: [1], file: '' },
    ]);
    expect(info.bytesRead).toBe(8 + json.length);
    expect(Array.from(f32(moe.loadSafetensors(f8, { names: ['s'] }).tensors.s))).toEqual([1]);
    expectThrows(() => moe.loadSafetensors(f8, { names: ['q'] }), TypeError, /^loadSafetensors: q\.dtype: expected F32, BF16, F16, I32, I64 or BOOL, got F8_E4M3/);
  });

  it('sharded checkpoints in memory: per-rank loads across shard boundaries read the needed shards only, exactly their headers and the wanted bytes', () => {
    // Three layers; layer 1's experts 0-4 in shard 2, 5-7 in shard 3 (expert 4's down too); router and ids in shard 1.
    const [e, dim, inter] = [8, 6, 4];
    const layers = [0, 1, 2].map((l) => hfExperts(e, dim, inter, 'swiglu', 100 + l, 'bfloat16', `model.layers.${l}.mlp.experts`));
    const tensors: Record<string, Tensor> = {};
    for (let l = 0; l < 3; l++) {
      Object.assign(tensors, layers[l].tensors);
      tensors[`model.layers.${l}.mlp.gate.weight`] = tensor(
        'float32',
        [e, dim],
        Float32Array.from({ length: e * dim }, (_, i) => i + l),
      );
    }
    tensors['model.embed_ids'] = tensor('int64', [2], BigInt64Array.from([3n, 4n]));
    const fileOf = (n: string): string => {
      const m = /^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)/.exec(n);
      if (!m) return 'model-00001-of-00004.safetensors';
      const [l, i] = [Number(m[1]), Number(m[2])];
      if (l === 0) return 'model-00002-of-00004.safetensors';
      if (l === 2) return 'model-00004-of-00004.safetensors';
      return i < 4 || (i === 4 && m[3] !== 'down_proj') ? 'model-00002-of-00004.safetensors' : 'model-00003-of-00004.safetensors';
    };
    const { index, shards, weightMap } = shard(moe, tensors, fileOf);
    const prefix = 'model.layers.1.mlp.experts';
    const full = moe.stackExperts(layers[1].tensors, { prefix, numExperts: e, activation: 'swiglu' });
    const indexForms: [string, unknown][] = [
      ['object', index],
      ['text', JSON.stringify(index)],
      ['bytes', new TextEncoder().encode(JSON.stringify(index))],
    ];
    for (const [form, idx] of indexForms) {
      for (const [epSize, epRank] of [
        [1, 0],
        [2, 0],
        [2, 1],
        [4, 1],
        [4, 2],
        [8, 4],
      ]) {
        const { start, end } = moe.expertRangeForRank(e, epSize, epRank);
        const keys = Object.keys(layers[1].tensors).filter((n) => {
          const i = Number(n.split('.')[5]);
          return i >= start && i < end;
        });
        const needed = [...new Set(keys.map((n) => weightMap[n]))].sort();
        // Only the needed shards are given.
        const given = Object.fromEntries(needed.map((f) => [f, shards[f]]));
        const got = moe.loadExperts({ index: idx as never, shards: given }, { prefix, numExperts: e, epSize, epRank, activation: 'swiglu' });
        const tag = `${form} ${epRank}/${epSize} (shards ${needed.join(', ')})`;
        const w1 = full.gateAndUpProjs!.data as Uint16Array;
        expect(Array.from(got.gateAndUpProjs!.data as Uint16Array), tag).toEqual(Array.from(w1.subarray(start * dim * 2 * inter, end * dim * 2 * inter)));
        expect(Array.from(got.downProjs.data as Uint16Array), tag).toEqual(Array.from((full.downProjs.data as Uint16Array).subarray(start * inter * dim, end * inter * dim)));
        const wanted = keys.reduce((s, n) => s + nbytes(tensors[n]), 0);
        expect(got.bytesRead, tag).toBe(needed.reduce((s, f) => s + headerBytes(shards[f]), 0) + wanted);
        // A needed shard that is absent: a RangeError naming it and a tensor it holds.
        if (needed.length === 2) {
          const without = { [needed[0]]: shards[needed[0]] };
          expectThrows(
            () => moe.loadExperts({ index: idx as never, shards: without }, { prefix, numExperts: e, epSize, epRank, activation: 'swiglu' }),
            RangeError,
            new RegExp(`^loadExperts: ${escapeRegExp(needed[1])}: this shard holds '${escapeRegExp(prefix)}\\.\\d\\.\\w+_proj\\.weight', which this call needs, and is not among the given shards`),
          );
        }
      }
    }
    // The router tensors (shard 1) and an int64 tensor: only shard 1's header and their bytes.
    const names = ['model.layers.1.mlp.gate.weight', 'model.embed_ids'];
    const router = moe.loadSafetensors({ index, shards: { 'model-00001-of-00004.safetensors': shards['model-00001-of-00004.safetensors'] } }, { names });
    expect(Object.keys(router.tensors)).toEqual(names);
    expect(bitsOf(router.tensors[names[0]])).toEqual(bitsOf(tensors[names[0]]));
    expect(Array.from(router.tensors['model.embed_ids'].data as BigInt64Array)).toEqual([3n, 4n]);
    expect(router.bytesRead).toBe(headerBytes(shards['model-00001-of-00004.safetensors']) + e * dim * 4 + 16);
    expect(router.metadata).toEqual({ format: 'pt', total_size: String(Object.values(tensors).reduce((s, t) => s + nbytes(t), 0)) });
    // checkpointInfo: every shard's header, nothing else.
    const info = moe.checkpointInfo({ index, shards });
    expect(info.tensors.length).toBe(Object.keys(tensors).length);
    expect(info.bytesRead).toBe(Object.values(shards).reduce((s, b) => s + headerBytes(b), 0));
    const t = info.tensors.find((x) => x.name === `${prefix}.4.down_proj.weight`)!;
    expect(t).toEqual({ name: `${prefix}.4.down_proj.weight`, dtype: 'bfloat16', shape: [dim, inter], file: 'model-00003-of-00004.safetensors' });
    // A tensor the index lists but its shard lacks.
    const lying = { ...index, weight_map: { ...index.weight_map, 'model.layers.1.mlp.gate.bias': 'model-00001-of-00004.safetensors' } };
    expectThrows(
      () => moe.loadSafetensors({ index: lying, shards }, { names: ['model.layers.1.mlp.gate.bias'] }),
      RangeError,
      /^loadSafetensors: model\.layers\.1\.mlp\.gate\.bias: the index puts it in 'model-00001-of-00004\.safetensors', whose header does not have it \(\d+ tensors; the nearest: 'model\.layers\.1\.mlp\.gate\.weight'\)/,
    );
    // A name the index lacks: the nearest names of the whole checkpoint.
    expectThrows(
      () => moe.loadSafetensors({ index, shards }, { names: ['model.layers.1.mlp.router.weight'] }),
      RangeError,
      /^loadSafetensors: model\.layers\.1\.mlp\.router\.weight: no such tensor in the checkpoint \(\d+ tensors; the nearest: /,
    );
  });

  it.skipIf(name === 'wasm' || !nodeFs)('paths (Node, native backends): a directory, an index .json, a .safetensors file; shards opened lazily', () => {
    const fs = nodeFs!;
    const [e, dim, inter] = [8, 4, 2];
    const hf = hfExperts(e, dim, inter, 'quick_geglu', 23, 'float32', 'model.layers.0.mlp.experts');
    const tensors: Record<string, Tensor> = { ...hf.tensors, 'model.layers.0.mlp.gate.weight': tensor('float32', [e, dim]) };
    const fileOf = (n: string) => {
      const m = /experts\.(\d+)\./.exec(n);
      return !m ? 'model-00001-of-00003.safetensors' : Number(m[1]) < 5 ? 'model-00002-of-00003.safetensors' : 'model-00003-of-00003.safetensors';
    };
    const { index, shards } = shard(moe, tensors, fileOf);
    const root = fs.join(dir, `${name}-sharded`);
    fs.mkdirSync(root, { recursive: true });
    for (const [f, b] of Object.entries(shards)) fs.writeFileSync(fs.join(root, f), b);
    fs.writeFileSync(fs.join(root, 'model.safetensors.index.json'), JSON.stringify(index));
    const full = moe.stackExperts(hf.tensors, { prefix: 'model.layers.0.mlp.experts', numExperts: e, activation: 'quick_geglu' });
    for (const src of [root, fs.join(root, 'model.safetensors.index.json')]) {
      // Rank 3 of 4: experts 6, 7, all in shard 3: only its header and those experts are read.
      const got = moe.loadExperts(src, { prefix: 'model.layers.0.mlp.experts', numExperts: e, epSize: 4, epRank: 3, activation: 'quick_geglu' });
      expect(bitsOf(got.gateAndUpProjs!)).toEqual(bitsOf(full.gateAndUpProjs!).slice(6 * dim * 2 * inter));
      expect(got.bytesRead).toBe(headerBytes(shards['model-00003-of-00003.safetensors']) + 2 * 3 * dim * inter * 4);
      // Rank 1 of 2: experts 4-7 across shards 2 and 3.
      const across = moe.loadExperts(src, { prefix: 'model.layers.0.mlp.experts', numExperts: e, epSize: 2, epRank: 1, activation: 'quick_geglu' });
      expect(bitsOf(across.downProjs)).toEqual(bitsOf(full.downProjs).slice(4 * inter * dim));
      expect(across.bytesRead).toBe(headerBytes(shards['model-00002-of-00003.safetensors']) + headerBytes(shards['model-00003-of-00003.safetensors']) + 4 * 3 * dim * inter * 4);
      const router = moe.loadSafetensors(src, { names: ['model.layers.0.mlp.gate.weight'] });
      expect(router.bytesRead).toBe(headerBytes(shards['model-00001-of-00003.safetensors']) + e * dim * 4);
      expect(moe.checkpointInfo(src).tensors.find((t) => t.name === 'model.layers.0.mlp.gate.weight')!.file).toBe('model-00001-of-00003.safetensors');
    }
    // A directory holding model.safetensors, and the file itself.
    const one = fs.join(dir, `${name}-single`);
    fs.mkdirSync(one, { recursive: true });
    const bytes = moe.saveSafetensors(tensors);
    fs.writeFileSync(fs.join(one, 'model.safetensors'), bytes);
    for (const src of [one, fs.join(one, 'model.safetensors')]) {
      const got = moe.loadExperts(src, { prefix: 'model.layers.0.mlp.experts', numExperts: e, epSize: 4, epRank: 3, activation: 'quick_geglu' });
      expect(got.bytesRead).toBe(headerBytes(bytes) + 2 * 3 * dim * inter * 4);
      expect(moe.checkpointInfo(src).tensors[0].file).toBe('model.safetensors');
    }
    // A missing shard file names itself and the tensor that needs it.
    const broken = fs.join(dir, `${name}-broken`);
    fs.mkdirSync(broken, { recursive: true });
    fs.writeFileSync(fs.join(broken, 'model.safetensors.index.json'), JSON.stringify(index));
    fs.writeFileSync(fs.join(broken, 'model-00002-of-00003.safetensors'), shards['model-00002-of-00003.safetensors']);
    expectThrows(
      () => moe.loadExperts(broken, { prefix: 'model.layers.0.mlp.experts', numExperts: e, epSize: 4, epRank: 3, activation: 'quick_geglu' }),
      RangeError,
      /^loadExperts: model-00003-of-00003\.safetensors: the shard holding 'model\.layers\.0\.mlp\.experts\.6\.\w+_proj\.weight': cannot open '/,
    );
    expect(moe.loadExperts(broken, { prefix: 'model.layers.0.mlp.experts', numExperts: e, epSize: 4, epRank: 0, activation: 'quick_geglu' }).end).toBe(2);
    expectThrows(
      () => moe.checkpointInfo(dir),
      RangeError,
      /^checkpointInfo: path: '.*' is a directory without model\.safetensors\.index\.json or model\.safetensors \(its \.safetensors and \.json files: '/,
    );
  });
});

describe('cpu and wasm write the same bytes', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  it.skipIf(!cpu || !wasm)('saveSafetensors and the wasm refusal of paths', () => {
    const hf = hfExperts(4, 3, 2, 'quick_geglu', 2);
    expect(Array.from(cpu!.saveSafetensors(hf.tensors))).toEqual(Array.from(wasm!.saveSafetensors(hf.tensors)));
    for (const format of ['mixtral', 'gpt_oss', 'hf_fused'] as ExpertsFormat[]) {
      const s = cpu!.stackExperts(hf.tensors, { prefix: PREFIX, numExperts: 4, activation: 'quick_geglu' });
      const a = cpu!.saveSafetensors(cpu!.unstackExperts(s, { prefix: PREFIX, activation: 'quick_geglu', format }));
      const b = wasm!.saveSafetensors(wasm!.unstackExperts(s, { prefix: PREFIX, activation: 'quick_geglu', format }));
      expect(Array.from(a), format).toEqual(Array.from(b));
    }
    expectThrows(
      () => wasm!.loadExperts('/nonexistent', { prefix: PREFIX, numExperts: 4, activation: 'quick_geglu' }),
      TypeError,
      /^loadExperts: source: expected the checkpoint's bytes \(a Uint8Array\) or \{ index, shards \} with the shard files' bytes: the wasm backend cannot open files \(in Node, read them with fs\.readFileSync, or use the native backend/,
    );
    expectThrows(
      () => cpu!.loadExperts('/nonexistent/x.safetensors', { prefix: PREFIX, numExperts: 4, activation: 'quick_geglu' }),
      RangeError,
      /^loadExperts: path: cannot open '\/nonexistent\/x\.safetensors'/,
    );
  });
});
