/**
 * Expert checkpoints (safetensors) on every available backend:
 *
 * - round trip: Hugging Face per-expert tensors -> stacked (stackExperts) -> safetensors ->
 *   per-rank load (loadExperts) for EP sizes 1, 2, 3, 4 with E = 8 and 60 equals slicing the
 *   full stacked tensor, bit for bit, and reads only the header and the rank's bytes;
 *   the same from a Hugging Face per-expert file, and from a file path on the native backend;
 * - the layouts: stacked[e, d, j] = gate_proj_e[j, d] (Linear weights are [out, in]),
 *   interleaved for quick_geglu, up only for relu2; unstackExperts inverts stackExperts;
 * - errors name the key: a missing expert, an extra expert, a wrong shape, a wrong count.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { tensor, type ActivationKind, type Backend, type Tensor } from '../ts/index.js';
import { backendNamed, backendRows, registerBackendReport } from './backends.js';
import { bitsOf, escapeRegExp, expectThrows, rng } from './util.js';

registerBackendReport();

const PREFIX = 'model.layers.3.mlp.experts';
const dir = mkdtempSync(join(tmpdir(), 'moe-ckpt-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Hf {
  tensors: Record<string, Tensor>;
  gate: Float32Array[];
  up: Float32Array[];
  down: Float32Array[];
}

/** Random Hugging Face experts: gate/up [inter, dim], down [dim, inter] per expert. */
function hfExperts(e: number, dim: number, inter: number, kind: ActivationKind, seed: number, dtype: 'float32' | 'bfloat16' = 'float32'): Hf {
  const rand = rng(seed);
  const mk = (n: number) => Float32Array.from({ length: n }, () => Math.fround(rand() * 2 - 1));
  const hf: Hf = { tensors: {}, gate: [], up: [], down: [] };
  const t = (shape: number[], v: Float32Array) => (dtype === 'float32' ? tensor('float32', shape, v) : tensor('bfloat16', shape, Array.from(v)));
  for (let i = 0; i < e; i++) {
    const [g, u, d] = [mk(inter * dim), mk(inter * dim), mk(dim * inter)];
    if (kind !== 'relu2') hf.tensors[`${PREFIX}.${i}.gate_proj.weight`] = t([inter, dim], g);
    hf.tensors[`${PREFIX}.${i}.up_proj.weight`] = t([inter, dim], u);
    hf.tensors[`${PREFIX}.${i}.down_proj.weight`] = t([dim, inter], d);
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
    expect(Array.from(up(stacked).data as Float32Array)).toEqual(Array.from(want.w1));
    expect(Array.from(stacked.downProjs.data as Float32Array)).toEqual(Array.from(want.w2));
    expect(stacked.format).toBe('hf');

    // Back to HF keys: the same tensors, bit for bit.
    const back = moe.unstackExperts(stacked, { prefix: PREFIX, activation: kind });
    expect(Object.keys(back).sort()).toEqual(Object.keys(hf.tensors).sort());
    for (const [k, t] of Object.entries(hf.tensors)) expect(bitsOf(back[k]), k).toEqual(bitsOf(t));

    const stackedFile = moe.saveSafetensors({ [`${PREFIX}.gate_and_up_projs`]: up(stacked), [`${PREFIX}.down_projs`]: stacked.downProjs }, { metadata: { format: 'pt' } });
    const hfFile = moe.saveSafetensors(hf.tensors);
    const full = moe.loadSafetensors(stackedFile);
    expect(full.metadata).toEqual({ format: 'pt' });
    expect(bitsOf(full.tensors[`${PREFIX}.gate_and_up_projs`])).toEqual(bitsOf(up(stacked)));
    const path = join(dir, `${name}-${e}-${kind}.safetensors`);
    writeFileSync(path, stackedFile);

    for (const epSize of [1, 2, 3, 4]) {
      for (let epRank = 0; epRank < epSize; epRank++) {
        const { start, end } = moe.expertRangeForRank(e, epSize, epRank);
        const slice1 = want.w1.subarray(start * dim * w, end * dim * w);
        const slice2 = want.w2.subarray(start * inter * dim, end * inter * dim);
        const sources: [string, string | Uint8Array][] = [
          ['stacked bytes', stackedFile],
          ['hf bytes', hfFile],
        ];
        if (name !== 'wasm') sources.push(['stacked file', path]);
        for (const [what, src] of sources) {
          const got = moe.loadExperts(src, { prefix: PREFIX, numExperts: e, epSize, epRank, activation: kind });
          const tag = `${what} ep ${epRank}/${epSize}`;
          expect([got.start, got.end], tag).toEqual([start, end]);
          expect([...up(got).shape], tag).toEqual([end - start, dim, w]);
          expect(Array.from(up(got).data as Float32Array), tag).toEqual(Array.from(slice1));
          expect(Array.from(got.downProjs.data as Float32Array), tag).toEqual(Array.from(slice2));
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
    const b1 = tensor('float32', [e, 2 * inter], Float32Array.from({ length: e * 2 * inter }, (_, i) => i));
    const b2 = tensor('float32', [e, dim], Float32Array.from({ length: e * dim }, (_, i) => -i));
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

  it('errors name the key', () => {
    const [e, dim, inter] = [8, 4, 2];
    const hf = hfExperts(e, dim, inter, 'swiglu', 11);
    const load = (tensors: Record<string, Tensor>, numExperts = e) => () => moe.loadExperts(moe.saveSafetensors(tensors), { prefix: PREFIX, numExperts, epSize: 2, epRank: 1, activation: 'swiglu' });
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
    expectThrows(load({ other: tensor('float32', [1]) }), RangeError, /^loadExperts: model\.layers\.3\.mlp\.experts: the checkpoint has neither/);
    expectThrows(() => moe.loadExperts(new Uint8Array(5), { prefix: PREFIX, numExperts: 8, activation: 'swiglu' }), RangeError, /^loadExperts: checkpoint: not a safetensors file/);
    expectThrows(() => moe.loadSafetensors(moe.saveSafetensors(hf.tensors), { names: ['nope'] }), RangeError, /^loadSafetensors: nope: no such tensor/);
    expectThrows(() => moe.saveSafetensors({ a: tensor('float32', [2], [1, 2]), b: { dtype: 'float32', shape: [3], data: new Float32Array(2) } as Tensor }), RangeError, /^saveSafetensors: b\.data: shape \[3\] needs 3 elements/);
  });
});

describe('cpu and wasm write the same bytes', () => {
  const cpu = backendNamed('cpu');
  const wasm = backendNamed('wasm');
  it.skipIf(!cpu || !wasm)('saveSafetensors and the wasm refusal of paths', () => {
    const hf = hfExperts(4, 3, 2, 'quick_geglu', 2);
    expect(Array.from(cpu!.saveSafetensors(hf.tensors))).toEqual(Array.from(wasm!.saveSafetensors(hf.tensors)));
    expectThrows(() => wasm!.loadExperts('/nonexistent', { prefix: PREFIX, numExperts: 4, activation: 'quick_geglu' }), TypeError, /^loadExperts: source: expected the checkpoint's bytes \(the wasm backend cannot open files/);
    expectThrows(() => cpu!.loadExperts('/nonexistent/x.safetensors', { prefix: PREFIX, numExperts: 4, activation: 'quick_geglu' }), RangeError, /^loadExperts: path: cannot open '\/nonexistent\/x\.safetensors'/);
  });
});
