/**
 * matmul, expertsForward and expertsBackward of the webgpu backend: the core's arithmetic
 * (crates/moe-core/src/experts.rs) step for step on the GPU, bit for bit with wasm. Each GEMM is
 * one grouped launch (ts/webgpu/gemm.ts: every expert's tiles, the core's k-blocks); the
 * intermediates (h = x W1 + b1, the weighted activation, their gradients) stay float32 on the
 * GPU, as the core keeps them in f32, and each result is rounded once to its dtype.
 *
 * The checks are the core's (`checkMatmul`, `checkExperts` on dtypes and shapes, and on the
 * counts' values): device counts that this backend's permute or route made for these rows are
 * vouched for by their facts and never read back (the GEMMs' group tables are written on the GPU
 * from their scan); any other counts are read back (E integers) and the host writes the tables.
 * Anything the checks refuse, and a caller-owned `out`, goes down the host path (undefined
 * here), where the core gives its own error.
 */
import type { Binding } from '../generated/binding.js';
import { expertArgs, expertsGrads } from '../ops/experts.js';
import type { DType, TokenDType } from '../tensor.js';
import { ACTIVATION_GRAD_PROBS_OF_UNITS, activationBackwardPairs, activationCode, activationForward, activationParams } from '../webgpu/activations.js';
import { columnSums, expertsGradProbs, GEMM_GROUPS, type GemmGroup, gemm, gemmTable, narrow, TILE } from '../webgpu/gemm.js';
import type { GPUBuffer } from '../webgpu/gpu.js';
import type { Kind } from '../webgpu/shaders.js';
import { checkBool, INDICES, type TensorArgs, TOKENS, wire, type WireMeta } from '../wire.js';
import type { OpCall } from './webgpu.js';
import { factsOf, type GpuTensor, isWebGpuTensor } from './webgpu-tensor.js';

type Checks = Pick<Binding, 'checkMatmul' | 'checkExperts'>;

/** A tensor's dtype and shape as the core's check functions take them. */
function metaArgs(c: OpCall): TensorArgs<WireMeta> {
  const of = (v: unknown, arg: string, dtypes: readonly DType[]): WireMeta => {
    const m = c.meta(v, arg, dtypes);
    return { dtype: m.dtype, shape: [...m.shape] };
  };
  return { of, opt: (v, arg, dtypes) => (v === undefined || v === null ? undefined : of(v, arg, dtypes)) };
}

/** Touches the buffer of every device tensor among `named` (a disposed or foreign one is a device error naming the op). */
function touch(c: OpCall, named: Record<string, unknown>): void {
  for (const [arg, v] of Object.entries(named)) if (isWebGpuTensor(v)) v.bufferFor(c.gpu, arg);
}

/** A grouped GEMM's table `G` on the GPU, its group count and the workgroups to launch (at least its tiles). */
interface Table {
  buf: GPUBuffer;
  groups: number;
  launch: number;
}

/** A table written on the host from known groups. */
function hostTable(c: OpCall, groups: GemmGroup[], n: number): Table {
  const { table, tiles } = gemmTable(groups, n);
  return { buf: c.words(table, 'the GEMM groups'), groups: groups.length, launch: tiles };
}

/** A grouped GEMM into the float32 words `out` (gemm.ts). */
function runGemm(
  c: OpCall,
  a: { buf: GPUBuffer; kind: Kind; rs: number; cs: number },
  b: { buf: GPUBuffer; kind: Kind; rs: number; cs: number },
  n: number,
  table: Table,
  out: GPUBuffer,
  label: string,
  bias?: { buf: GPUBuffer; kind: Kind; probs?: GPUBuffer },
): void {
  if (table.launch === 0) return;
  const kbias = bias?.kind ?? 'float32';
  const key = `gemm_${a.kind}_${b.kind}_${kbias}`;
  const epilogue = bias === undefined ? 0 : bias.probs === undefined ? 1 : 2;
  const params = [n, a.rs, a.cs, b.rs, b.cs, 0, epilogue, table.groups];
  const buffers = [a.buf, b.buf, table.buf, out, bias?.buf ?? c.tmp(4, 'bias'), bias?.probs ?? c.tmp(4, 'probs')];
  c.gpu.dispatch(c.op, key, gemm(a.kind, b.kind, kbias), params, buffers, table.launch * 256, 256, label);
}

/** Where a result's float32 values go: its own output tensor (float32: the GEMM writes it), or float32 scratch that `finish` rounds into one. */
interface Target {
  dtype: TokenDType;
  shape: readonly number[];
  what: string;
  direct?: GpuTensor;
  buf: GPUBuffer;
}

function target(c: OpCall, dtype: DType, shape: readonly number[], what: string): Target {
  const elements = shape.reduce((x, y) => x * y, 1);
  if (dtype === 'float32') {
    const direct = c.out('float32', shape, what, true);
    return { dtype, shape, what, direct, buf: direct.bufferFor(c.gpu, what) };
  }
  return { dtype: dtype as TokenDType, shape, what, buf: c.tmp(4 * elements, what) };
}

/** A target's result: the float32 output itself, or the values rounded once into a new output of the dtype. */
function finish(c: OpCall, t: Target): GpuTensor {
  if (t.direct) return t.direct;
  const out = c.out(t.dtype, t.shape, t.what, true);
  const elements = t.shape.reduce((x, y) => x * y, 1);
  const words = Math.ceil(elements / 2);
  c.run(`narrow_${t.dtype}`, narrow(t.dtype), [elements, words], [t.buf, out.bufferFor(c.gpu, t.what)], words);
  return out;
}

export async function matmulOp(c: OpCall, checks: Checks, a: unknown, b: unknown, options: unknown): Promise<unknown | undefined> {
  touch(c, { a, b });
  const o = options ?? {};
  if (typeof o !== 'object' || Object.getPrototypeOf(o) !== Object.prototype || Object.keys(o).some((k) => k !== 'transA' && k !== 'transB')) return undefined;
  const { transA: ta, transB: tb } = o as { transA?: unknown; transB?: unknown };
  const M = metaArgs(c);
  const r = c.validate(() => {
    const args = { a: M.of(a, 'a', TOKENS), b: M.of(b, 'b', TOKENS), transA: checkBool(ta, 'options.transA'), transB: checkBool(tb, 'options.transB') };
    checks.checkMatmul(args);
    return args;
  });
  if (typeof r === 'symbol') return undefined;
  const transA = r.transA === true;
  const transB = r.transB === true;
  const [a0, a1] = r.a.shape;
  const [b0, b1] = r.b.shape;
  const [m, k] = transA ? [a1, a0] : [a0, a1];
  const n = transB ? b0 : b1;
  const dtype = r.a.dtype as TokenDType;
  const t = target(c, dtype, [m, n], 'output');
  runGemm(
    c,
    { buf: c.buf(a, 'a'), kind: dtype, rs: transA ? 1 : k, cs: transA ? m : 1 },
    { buf: c.buf(b, 'b'), kind: r.b.dtype as Kind, rs: transB ? 1 : n, cs: transB ? k : 1 },
    n,
    hostTable(c, [{ m, k, aOff: 0, bOff: 0, cOff: 0 }], n),
    t.buf,
    'matmul',
  );
  return finish(c, t);
}

/** The checked sizes, buffers and options of a grouped-experts call. */
interface Experts {
  n: number;
  dim: number;
  experts: number;
  width: number;
  inter: number;
  /** The experts' row offsets [E + 1] on the host (counts read back or given), or undefined: only on the GPU. */
  offsets?: number[];
  /** The same offsets in a GPU buffer (uploaded, or scanned from device counts). */
  offsetsBuf: GPUBuffer;
  x: { buf: GPUBuffer; kind: Kind };
  w1: { buf: GPUBuffer; kind: Kind; shape: number[] };
  w2: { buf: GPUBuffer; kind: Kind; shape: number[] };
  b1?: { buf: GPUBuffer; kind: Kind; shape: number[] };
  b2?: { buf: GPUBuffer; kind: Kind; shape: number[] };
  probs?: { buf: GPUBuffer; shape: number[] };
  g?: { buf: GPUBuffer; kind: Kind };
  /** The activation shaders' P[4..10]. */
  act: number[];
  upProjs: boolean;
}

const FORWARD_KEYS = ['activation', 'permutedProbs', 'biases', 'alpha', 'limit', 'linearOffset'];

async function setup(c: OpCall, checks: Checks, op: string, gradOutput: unknown, tokens: unknown, counts: unknown, weights: unknown, options: unknown): Promise<Experts | undefined> {
  const o = (options ?? {}) as Record<string, unknown>;
  if (typeof o !== 'object' || Object.getPrototypeOf(o) !== Object.prototype || Object.keys(o).some((k) => !FORWARD_KEYS.includes(k))) return undefined;
  const w = (typeof weights === 'object' && weights !== null ? weights : {}) as Record<string, unknown>;
  const bs = (typeof o.biases === 'object' && o.biases !== null ? o.biases : {}) as Record<string, unknown>;
  touch(c, {
    gradOutput,
    permutedTokens: tokens,
    tokensPerExpert: counts,
    'weights.gateAndUpProjs': w.gateAndUpProjs,
    'weights.upProjs': w.upProjs,
    'weights.downProjs': w.downProjs,
    permutedProbs: o.permutedProbs,
    'biases.gateUpProjBias': bs.gateUpProjBias,
    'biases.downProjBias': bs.downProjBias,
  });
  const M = metaArgs(c);
  const args = c.validate(() => ({
    ...expertArgs(M, tokens, counts, weights, options, op),
    ...(gradOutput === undefined ? {} : { gradOutput: M.of(gradOutput, 'gradOutput', TOKENS) }),
  }));
  if (typeof args === 'symbol') return undefined;
  // The counts' values are the core's to check: device counts that an op of this backend made
  // for these rows (permute's, route's: non-negative, adding up to `total`) are vouched for by
  // their facts and stay on the GPU (the tile tables are written there); any others are read back.
  const rows = (args as { permutedTokens: WireMeta }).permutedTokens.shape[0];
  const total = factsOf(counts).total;
  const vouched = isWebGpuTensor(counts) && counts.dtype === 'int32' && total !== undefined && total === rows;
  const host = vouched ? undefined : await c.host(counts, 'tokensPerExpert', INDICES);
  const n = c.validate(() => checks.checkExperts(host ? { ...args, tokensPerExpert: wire(host, 'tokensPerExpert') } : args));
  const code = activationCode((args as { kind?: unknown }).kind);
  if (typeof n === 'symbol' || code === undefined) return undefined;
  const a = args as unknown as Record<string, WireMeta | undefined> & { gateAndUpProjs?: WireMeta; upProjs?: WireMeta };
  const upProjs = a.upProjs !== undefined;
  const w1m = (a.gateAndUpProjs ?? a.upProjs)!;
  const [experts, dim, width] = w1m.shape;
  const inter = code[1] === 2 ? width : width / 2;
  let offsets: number[] | undefined;
  let offsetsBuf: GPUBuffer;
  if (host) {
    offsets = [0];
    for (const v of Array.from(host.data as ArrayLike<number | bigint>, Number)) offsets.push(offsets[offsets.length - 1] + v);
    offsetsBuf = c.words(offsets, 'the expert offsets');
  } else {
    offsetsBuf = c.scan(c.buf(counts, 'tokensPerExpert'), experts, 'the expert offsets');
  }
  const bufOf = (v: unknown, arg: string, m: WireMeta) => ({ buf: c.buf(v, arg), kind: m.dtype as Kind, shape: [...m.shape] });
  const pm = a.permutedProbs;
  return {
    n,
    dim,
    experts,
    width,
    inter,
    offsets,
    offsetsBuf,
    x: bufOf(tokens, 'permutedTokens', a.permutedTokens!),
    w1: bufOf(upProjs ? w.upProjs : w.gateAndUpProjs, upProjs ? 'weights.upProjs' : 'weights.gateAndUpProjs', w1m),
    w2: bufOf(w.downProjs, 'weights.downProjs', a.downProjs!),
    b1: a.gateUpProjBias && bufOf(bs.gateUpProjBias, 'biases.gateUpProjBias', a.gateUpProjBias),
    b2: a.downProjBias && bufOf(bs.downProjBias, 'biases.downProjBias', a.downProjBias),
    probs: pm && { buf: c.buf(o.permutedProbs, 'permutedProbs'), shape: [...pm.shape] },
    g: a.gradOutput && bufOf(gradOutput, 'gradOutput', a.gradOutput),
    act: activationParams(code, args as { alpha?: unknown; limit?: unknown; linearOffset?: unknown }, pm !== undefined),
    upProjs,
  };
}

/**
 * Each expert's rows as a GEMM group (M = its rows, K = `k`): A's rows at `aRow` elements a row,
 * B the expert's `bPer` elements, C's rows at `cRow`, the bias's `biasPer` elements an expert.
 */
function rowsTable(c: OpCall, d: Experts, n: number, k: number, aRow: number, bPer: number, cRow: number, biasPer = 0): Table {
  if (d.offsets) {
    const o = d.offsets;
    return hostTable(
      c,
      o.slice(0, -1).map((off, e) => ({ m: o[e + 1] - off, k, aOff: off * aRow, bOff: e * bPer, cOff: off * cRow, biasOff: e * biasPer, probOff: off })),
      n,
    );
  }
  // at most ceil(rows / 64) + E row tiles, each N / 64 wide
  return deviceTable(c, d, n, 0, k, aRow, bPer, cRow, biasPer, (Math.ceil(d.n / TILE) + d.experts) * Math.ceil(n / TILE));
}

/** Each expert's weight gradient as a GEMM group (M = `m`, K = its rows): A's and B's rows at `aRow` / `bRow`, C the expert's `cPer` elements. */
function weightsTable(c: OpCall, d: Experts, n: number, m: number, aRow: number, bRow: number, cPer: number): Table {
  if (d.offsets) {
    const o = d.offsets;
    return hostTable(
      c,
      o.slice(0, -1).map((off, e) => ({ m, k: o[e + 1] - off, aOff: off * aRow, bOff: off * bRow, cOff: e * cPer })),
      n,
    );
  }
  return deviceTable(c, d, n, 1, m, aRow, bRow, cPer, 0, d.experts * Math.ceil(m / TILE) * Math.ceil(n / TILE));
}

/** A table written on the GPU from the device offsets (GEMM_GROUPS), launched over `bound` workgroups. */
function deviceTable(c: OpCall, d: Experts, n: number, mode: number, fixed: number, aRow: number, bX: number, cX: number, biasPer: number, bound: number): Table {
  const buf = c.tmp(4 * 8 * (d.experts + 1), 'the GEMM groups');
  c.run('gemm_groups', GEMM_GROUPS, [d.experts, n, mode, fixed, aRow, bX, cX, biasPer], [d.offsetsBuf, buf], 1);
  return { buf, groups: d.experts, launch: bound };
}

/**
 * h = x W1 + b1 and the weighted activation a (float32 scratch), as the core's up_projection and
 * activate; with `keepUnits`, also each element's unit value before the probs (the backward's
 * probs gradient sums them, instead of computing them again).
 */
function upAndActivate(c: OpCall, d: Experts, keepUnits = false): { h: GPUBuffer; a: GPUBuffer; units?: GPUBuffer } {
  const h = c.tmp(4 * d.n * d.width, 'the up projection');
  runGemm(c, { ...d.x, rs: d.dim, cs: 1 }, { ...d.w1, rs: d.width, cs: 1 }, d.width, rowsTable(c, d, d.width, d.dim, d.dim, d.dim * d.width, d.width, d.width), h, 'experts x W1', d.b1);
  const a = c.tmp(4 * d.n * d.inter, 'the activation');
  const probs = d.probs?.buf ?? c.tmp(4, 'probs');
  const params = [d.n * d.inter, d.inter, d.width, d.n * d.inter, ...d.act];
  if (!keepUnits) {
    c.runItems('act_fwd_float32', (pass) => activationForward('float32', false, pass), params, [h, probs, a], d.n * d.inter);
    return { h, a };
  }
  const units = c.tmp(4 * d.n * d.inter, 'the activation units');
  c.runItems('act_fwd_units_float32', (pass) => activationForward('float32', true, pass), params, [h, probs, a, units], d.n * d.inter);
  return { h, a, units };
}

export async function expertsForwardOp(c: OpCall, checks: Checks, tokens: unknown, counts: unknown, weights: unknown, options: unknown): Promise<unknown | undefined> {
  const o = options as { out?: unknown } | undefined;
  if (o !== undefined && o !== null && typeof o === 'object' && o.out !== undefined) return undefined; // a caller-owned output: the host op
  const d = await setup(c, checks, 'expertsForward', undefined, tokens, counts, weights, options);
  if (d === undefined) return undefined;
  const { a } = upAndActivate(c, d);
  const dtype = d.x.kind;
  const t = target(c, dtype, [d.n, d.dim], 'output');
  const bias = d.b2 && { buf: d.b2.buf, kind: d.b2.kind, probs: d.probs?.buf };
  runGemm(
    c,
    { buf: a, kind: 'float32', rs: d.inter, cs: 1 },
    { ...d.w2, rs: d.dim, cs: 1 },
    d.dim,
    rowsTable(c, d, d.dim, d.inter, d.inter, d.inter * d.dim, d.dim, d.dim),
    t.buf,
    'experts a W2',
    bias,
  );
  return finish(c, t);
}

export async function expertsBackwardOp(c: OpCall, checks: Checks, gradOutput: unknown, tokens: unknown, counts: unknown, weights: unknown, options: unknown): Promise<unknown | undefined> {
  const d = await setup(c, checks, 'expertsBackward', gradOutput, tokens, counts, weights, options);
  if (d === undefined) return undefined;
  const { n, dim, width, inter, experts } = d;
  const g = d.g!;
  const { h, a, units } = upAndActivate(c, d, d.probs !== undefined);
  const gOffsets = d.offsetsBuf;
  // down projection: dW2 = a^T g, da = g W2^T
  const dw2 = target(c, d.w2.kind, d.w2.shape, 'gradDownProjs');
  runGemm(c, { buf: a, kind: 'float32', rs: 1, cs: inter }, { ...g, rs: dim, cs: 1 }, dim, weightsTable(c, d, dim, inter, inter, dim, inter * dim), dw2.buf, 'experts a^T g');
  const da = c.tmp(4 * n * inter, 'the activation gradient');
  runGemm(c, { ...g, rs: dim, cs: 1 }, { ...d.w2, rs: 1, cs: dim }, inter, rowsTable(c, d, inter, dim, dim, inter * dim, inter), da, 'experts g W2^T');
  const result: Record<string, GpuTensor | undefined> = {};
  if (d.b2) {
    const db2 = target(c, d.b2.kind, d.b2.shape, 'gradDownProjBias');
    c.run(`colsum_${g.kind}`, columnSums(g.kind), [dim, experts, d.probs ? 1 : 0, 0], [g.buf, gOffsets, d.probs?.buf ?? c.tmp(4, 'probs'), db2.buf], dim * experts);
    result.gradDownProjBias = finish(c, db2);
  }
  // through the weighted activation
  const dh = c.tmp(4 * n * width, 'the up projection gradient');
  const probs = d.probs?.buf ?? c.tmp(4, 'probs');
  c.runItems('act_bwd_pairs', activationBackwardPairs, [n * width, inter, width, n * width, ...d.act], [h, da, probs, dh], n * inter);
  if (d.probs) {
    const gp = c.tmp(4 * n, 'the activation probs gradient');
    c.run('act_gp_units', ACTIVATION_GRAD_PROBS_OF_UNITS, [n, inter], [units!, da, gp], n);
    const gradProbs = c.out('float32', d.probs.shape, 'gradProbs', true);
    const bias = d.b2 ?? { buf: c.tmp(4, 'bias'), kind: 'float32' as Kind };
    c.run(`experts_gp_${g.kind}_${bias.kind}`, expertsGradProbs(g.kind, bias.kind), [n, dim, experts, d.b2 ? 1 : 0], [g.buf, bias.buf, gp, gOffsets, gradProbs.bufferFor(c.gpu, 'gradProbs')], n);
    result.gradProbs = gradProbs;
  }
  // up projection: dW1 = x^T dh, db1 = the column sums of dh, dx = dh W1^T
  const dw1 = target(c, d.w1.kind, d.w1.shape, 'gradGateAndUpProjs');
  runGemm(c, { ...d.x, rs: 1, cs: dim }, { buf: dh, kind: 'float32', rs: width, cs: 1 }, width, weightsTable(c, d, width, dim, dim, width, dim * width), dw1.buf, 'experts x^T dh');
  if (d.b1) {
    const db1 = target(c, d.b1.kind, d.b1.shape, 'gradGateUpProjBias');
    c.run('colsum_float32', columnSums('float32'), [width, experts, 0, 0], [dh, gOffsets, probs, db1.buf], width * experts);
    result.gradGateUpProjBias = finish(c, db1);
  }
  const dx = target(c, d.x.kind, [n, dim], 'gradTokens');
  runGemm(c, { buf: dh, kind: 'float32', rs: width, cs: 1 }, { ...d.w1, rs: 1, cs: width }, dim, rowsTable(c, d, dim, width, width, dim * width, dim), dx.buf, 'experts dh W1^T');
  return expertsGrads(
    {
      gradTokens: finish(c, dx),
      gradGateAndUpProjs: finish(c, dw1),
      gradDownProjs: finish(c, dw2),
      gradGateUpProjBias: result.gradGateUpProjBias,
      gradDownProjBias: result.gradDownProjBias,
      gradProbs: result.gradProbs,
    },
    d.upProjs,
  );
}
