/**
 * Malformed-input generation for the boundary fuzz suite (test/boundary-fuzz.test.ts) and its
 * child processes (test/boundary-fuzz-child.mjs), which is why it is plain JavaScript with no
 * import of the library: tensors are built by hand as `{ dtype, shape, data }`.
 *
 * Every Backend method has a template: a small, valid call (4 tokens, 4 experts, top-2,
 * hidden 3). A fuzzed call starts from a fresh template and applies 1 to 3 mutations drawn
 * with fast-check's `gen`: an argument replaced by junk, a tensor with the wrong dtype, shape,
 * data (NaN, Inf, out-of-range or negative indices), a detached or SharedArrayBuffer-backed
 * buffer, options with unknown keys or wrong types, truncated or corrupted safetensors bytes,
 * null / undefined anywhere. `huge: true` adds sizes near 2^31, 2^32 and 2^53 (run those in a
 * child process: an allocation the core did not guard would abort the process).
 */
import fc from 'fast-check';

export const DTYPES = ['float32', 'bfloat16', 'float16', 'int32', 'int64', 'bool'];
export const CTOR = { float32: Float32Array, bfloat16: Uint16Array, float16: Uint16Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array };

const numel = (shape) => shape.reduce((a, b) => a * b, 1);

/** A tensor built by hand; `values` are plain numbers (bits for 16-bit floats). */
export function T(dtype, shape, values) {
  const n = numel(shape);
  const C = CTOR[dtype];
  const data = new C(n);
  for (let i = 0; i < n; i++) {
    const v = typeof values === 'function' ? values(i) : values === undefined ? 0 : values[i];
    data[i] = dtype === 'int64' ? BigInt(v) : v;
  }
  return { dtype, shape: [...shape], data };
}

const f32 = (shape, f = (i) => ((i * 7) % 11) / 10 - 0.3) => T('float32', shape, f);

// The routing of the templates: token t picks experts t % 4 and (t + 1) % 4.
const MAP = [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1];
const IDX = [0, 1, 1, 2, 2, 3, 3, 0];
const SORTED = [0, 3, 0, 1, 1, 2, 2, 3];

function experts() {
  return {
    gateAndUpProjs: f32([4, 3, 4]),
    downProjs: f32([4, 2, 3]),
  };
}
function expertOptions() {
  return { activation: 'swiglu', permutedProbs: f32([8], () => 0.5), biases: { gateUpProjBias: f32([4, 4]), downProjBias: f32([4, 3]) } };
}

/** A safetensors file by hand: u64 LE header length, JSON header, data. */
export function safetensorsBytes(entries, metadata) {
  const header = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  const parts = [];
  for (const [name, t] of Object.entries(entries)) {
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    const st = { float32: 'F32', bfloat16: 'BF16', float16: 'F16', int32: 'I32', int64: 'I64', bool: 'BOOL' }[t.dtype];
    header[name] = { dtype: st, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    offset += bytes.length;
    parts.push(bytes);
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - (json.length % 8)) % 8;
  json = new TextEncoder().encode(JSON.stringify(header) + ' '.repeat(pad));
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Hugging Face per-expert tensors of the template experts (prefix 'experts', swiglu). */
function hfExperts() {
  const r = {};
  for (let e = 0; e < 4; e++) {
    r[`experts.${e}.gate_proj.weight`] = f32([2, 3]);
    r[`experts.${e}.up_proj.weight`] = f32([2, 3]);
    r[`experts.${e}.down_proj.weight`] = f32([3, 2]);
  }
  return r;
}

/** The template experts as a sharded checkpoint in memory: experts 0-1 in one shard, 2-3 and a router in the other. */
function shardedExperts() {
  const files = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'];
  const parts = [{}, { 'router.weight': f32([4, 3]) }];
  for (const [n, t] of Object.entries(hfExperts())) parts[Number(n.split('.')[1]) < 2 ? 0 : 1][n] = t;
  const weight_map = {};
  parts.forEach((p, i) => {
    for (const n of Object.keys(p)) weight_map[n] = files[i];
  });
  return { index: { metadata: { total_size: 0 }, weight_map }, shards: { [files[0]]: safetensorsBytes(parts[0]), [files[1]]: safetensorsBytes(parts[1], { format: 'pt' }) } };
}

/** The template experts under Mixtral's per-expert keys (w1 gate, w3 up, w2 down). */
function mixtralExperts() {
  const r = {};
  for (let e = 0; e < 4; e++) {
    r[`experts.${e}.w1.weight`] = f32([2, 3]);
    r[`experts.${e}.w3.weight`] = f32([2, 3]);
    r[`experts.${e}.w2.weight`] = f32([3, 2]);
  }
  return r;
}

/** One valid call per Backend method: `() => args`. A new method needs a line here (the suite fails until it has one). */
export const TEMPLATES = {
  indicesToMultihot: () => [T('int32', [4, 2], IDX), f32([4, 2]), 4],
  multihotToIndices: () => [T('bool', [4, 4], MAP), { probs: f32([4, 4]), topk: 2 }],
  permute: () => [f32([4, 3]), T('bool', [4, 4], MAP), { probs: f32([4, 4]), numOutTokens: 8, dropAndPad: true, out: { permutedTokens: f32([8, 3], () => 9), permutedProbs: f32([8], () => 9) } }],
  permutePlan: () => [T('bool', [4, 4], MAP), { numOutTokens: 8, dropAndPad: true }],
  unpermute: () => [f32([8, 3]), T('int32', [8], SORTED), [4, 3], { probs: f32([4, 4]), routingMap: T('bool', [4, 4], MAP), out: f32([4, 3], () => 9) }],
  permuteBackward: () => [f32([8, 3]), T('int32', [8], SORTED), 4, { gradPermutedProbs: f32([8]), routingMap: T('bool', [4, 4], MAP), out: { gradTokens: f32([4, 3], () => 9) } }],
  unpermuteBackward: () => [f32([4, 3]), f32([8, 3]), T('int32', [8], SORTED), { probs: f32([8]) }],
  getCapacity: () => [16, 4, 1.25, 1],
  dropTokens: () => [f32([4, 4]), T('bool', [4, 4], MAP), { topk: 2, capacityFactor: 1, dropPolicy: 'probs', padToCapacity: false }],
  padRoutingMap: () => [T('bool', [4, 4], MAP), 3],
  tokensPerExpert: () => [T('bool', [4, 4], MAP)],
  sortChunksByIndex: () => [f32([8, 3]), T('int32', [4], [2, 2, 3, 1]), T('int32', [4], [3, 1, 0, 2]), f32([8])],
  sortChunksByIndexBackward: () => [f32([8, 3]), T('int32', [4], [2, 2, 3, 1]), T('int32', [4], [3, 1, 0, 2]), f32([8])],
  groupedMmSort: () => [T('int32', [4, 2], IDX), f32([4, 2]), { numLocalExperts: 2, expertsStartIdx: 2, tokenMask: T('bool', [4], [1, 0, 1, 1]) }],
  expertRangeForRank: () => [8, 4, 1],
  shouldLoadExpert: () => [3, 8, 4, 1],
  splitExpertWeights: () => [f32([2, 3, 2]), 8, 4, 1],
  validateExpertSharding: () => [f32([2, 3, 2]), 8, 4, 1, 'w', 'shard(0)'],
  expertPlacements: () => [[{ name: 'ep', size: 4 }]],
  splitPlacements: () => [[{ name: 'ep', size: 4 }], ['shard(0)']],
  activation: () => [f32([4, 6]), { kind: 'swiglu', probs: f32([4]) }],
  activationBackward: () => [f32([4, 3]), f32([4, 6]), { kind: 'quick_geglu', probs: f32([4]), alpha: 1.702, limit: 7, linearOffset: 1 }],
  topk: () => [f32([4, 4]), 2],
  route: () => [f32([4, 4]), { topk: 2, scoreFunction: 'sigmoid', expertBias: f32([4]), numGroups: 2, topkGroups: 1, normTopkProb: true, routeScale: 2, tokenMask: T('bool', [4], [1, 1, 0, 1]) }],
  routeBackward: () => [
    f32([4, 2]),
    f32([4, 4]),
    T('int32', [4, 2], [3, 2, 3, 2, -1, -1, 3, 2]), // route's picks for its template
    { topk: 2, scoreFunction: 'sigmoid', expertBias: f32([4]), numGroups: 2, topkGroups: 1, normTopkProb: true, routeScale: 2, tokenMask: T('bool', [4], [1, 1, 0, 1]), gradScores: f32([4, 4]) },
  ],
  switchLoadBalancingLoss: () => [f32([4, 4]), T('int32', [4], [2, 2, 2, 2]), { topk: 2, coeff: 0.01, numTokens: 4, tokenMask: T('bool', [4], [1, 1, 1, 0]) }],
  switchLoadBalancingLossFromLogits: () => [f32([4, 4]), T('int64', [4], [2, 2, 2, 2]), { topk: 2, coeff: 0.01 }],
  zLoss: () => [f32([4, 4]), { coeff: 1e-3, tokenMask: T('bool', [4], [1, 0, 1, 1]) }],
  matmul: () => [f32([4, 3]), f32([3, 5]), { transA: false, transB: false }],
  expertsForward: () => [f32([8, 3]), T('int32', [4], [2, 2, 2, 2]), experts(), expertOptions()],
  expertsBackward: () => [f32([8, 3]), f32([8, 3]), T('int32', [4], [2, 2, 2, 2]), experts(), expertOptions()],
  saveSafetensors: () => [{ a: f32([2, 2]), b: T('bfloat16', [3], [0x3f80, 0x4000, 0x7fc0]) }, { metadata: { format: 'pt' } }],
  loadSafetensors: () => [safetensorsBytes({ a: f32([2, 2]), b: T('int64', [3], [1, 2, 3]) }, { format: 'pt' }), { names: ['a'] }],
  checkpointInfo: () => [shardedExperts()],
  loadExperts: () => [shardedExperts(), { prefix: 'experts', numExperts: 4, activation: 'swiglu', epSize: 2, epRank: 1, format: 'hf' }],
  stackExperts: () => [mixtralExperts(), { prefix: 'experts', numExperts: 4, activation: 'swiglu' }],
  unstackExperts: () => [experts(), { prefix: 'experts', activation: 'swiglu', biases: { gateUpProjBias: f32([4, 4]), downProjBias: f32([4, 3]) }, firstExpert: 4, format: 'gpt_oss' }],
};

// ------------------------------------------------------------------------------------------
// Junk

const SMALL_NUMBERS = [NaN, Infinity, -Infinity, -1, -0, 0, 0.5, 2.5, 1, 2, 3, 4, 5, 7, 8, 16, 1e-300, -(2 ** 31), -(2 ** 53), Number.MIN_VALUE, -1e308];
const HUGE_NUMBERS = [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 32, 2 ** 32 + 1, 2 ** 40, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e308, Number.MAX_VALUE];
const NON_NUMBERS = [null, undefined, '3', '', 'x', true, false, 3n, {}, [], [3], () => 3, Symbol('s')];
const STRINGS = [
  '',
  'x',
  'softmax',
  'sigmoid',
  'relu2',
  'swiglu',
  'quick_geglu',
  'probs',
  'position',
  'replicate',
  'shard(0)',
  'shard(1)',
  'shard(-1)',
  'shard(99999999999)',
  'ep',
  'experts',
  'experts.0',
  '__metadata__',
  '\u0000',
  'é'.repeat(3),
  'a'.repeat(300),
];
const FLOAT_SPECIALS = [NaN, Infinity, -Infinity, -0, 3.4e38, -3.4e38, 1e-45, 65504, 1e30];
const HALF_SPECIALS = [0x7fc0, 0x7f80, 0xff80, 0x7c00, 0xfc00, 0x7e00, 0xffff, 0x8000, 0x0001, 0x7bff];
const INT_SPECIALS = [-1, -2, 4, 5, 8, 2 ** 31 - 1, -(2 ** 31), 1000, 3];

const pick = (g, xs) => xs[g(fc.nat, { max: xs.length - 1 })];

function numbersFor(huge) {
  return huge ? [...SMALL_NUMBERS, ...HUGE_NUMBERS] : SMALL_NUMBERS;
}

export function isTensorLike(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && 'dtype' in v && 'shape' in v && 'data' in v;
}

/** Any junk value (not specific to the slot). */
function junk(g, huge) {
  switch (g(fc.nat, { max: 4 })) {
    case 0:
      return pick(g, NON_NUMBERS);
    case 1:
      return pick(g, numbersFor(huge));
    case 2:
      return pick(g, STRINGS);
    case 3:
      return randomTensor(g, huge);
    default:
      return pick(g, [new Float32Array(4), new Uint8Array(3), new ArrayBuffer(8), new DataView(new ArrayBuffer(4)), [1, 2], [[1, 2]], { dtype: 'float32' }, { shape: [1] }, Object.create(null)]);
  }
}

/** A random tensor of any dtype, small shape, random data. */
function randomTensor(g, huge) {
  const dtype = pick(g, DTYPES);
  const rank = g(fc.nat, { max: 3 });
  const shape = Array.from({ length: rank }, () => g(fc.nat, { max: 5 }));
  if (huge && rank > 0 && g(fc.boolean)) {
    shape[g(fc.nat, { max: rank - 1 })] = pick(g, HUGE_NUMBERS.filter(Number.isSafeInteger));
    if (numel(shape) > 64 || !Number.isSafeInteger(numel(shape))) shape[(shape.findIndex((d) => d <= 5) + rank) % rank] = 0;
    if (numel(shape) !== 0) shape.push(0);
  }
  const t = T(dtype, shape, (i) => (dtype === 'bool' ? i & 1 : dtype.startsWith('int') ? pick(g, INT_SPECIALS) : dtype === 'float32' ? pick(g, FLOAT_SPECIALS) : pick(g, HALF_SPECIALS)));
  return t;
}

function cloneData(data, C) {
  const out = new C(data.length);
  for (let i = 0; i < data.length; i++) out[i] = C === BigInt64Array ? BigInt(Math.trunc(Number(data[i])) | 0) : typeof data[i] === 'bigint' ? Number(data[i]) : data[i];
  return out;
}

/** The same tensor with something wrong about it. */
function mutateTensor(t, g, huge) {
  const { dtype, shape, data } = t;
  // An earlier mutation may have broken it already: start again from a random one.
  if (!(dtype in CTOR) || !(data instanceof CTOR[dtype]) || !Array.isArray(shape)) return g(fc.boolean) ? randomTensor(g, huge) : { dtype, shape, data };
  switch (g(fc.nat, { max: 12 })) {
    case 0: // another dtype, converted data (well-formed, wrong kind)
      {
        const d = pick(
          g,
          DTYPES.filter((x) => x !== dtype),
        );
        return { dtype: d, shape: [...shape], data: cloneData(data, CTOR[d]) };
      }
    case 1: // dtype label that does not match the data
      return { dtype: pick(g, [...DTYPES, 'float64', 'uint8', '', 'F32', 7, null]), shape, data };
    case 2: // reshaped: same data, other shape (mismatched shapes between arguments)
      {
        const n = data.length;
        const shapes = [[n], [1, n], [n, 1], [], [n, 1, 1], shape.length === 2 ? [shape[1], shape[0]] : [n]].filter((s) => numel(s) === n);
        return { dtype, shape: pick(g, shapes), data };
      }
    case 3: // a shape entry that is not a size
      {
        const s = [...shape];
        const bad = pick(g, [...numbersFor(huge), ...NON_NUMBERS]);
        if (s.length === 0) s.push(bad);
        else s[g(fc.nat, { max: s.length - 1 })] = bad;
        return { dtype, shape: s, data };
      }
    case 4: // NaN, Inf and friends in the data; out-of-range / negative indices
      {
        const d = cloneData(data, CTOR[dtype]);
        const count = 1 + g(fc.nat, { max: Math.max(0, d.length - 1) });
        for (let j = 0; j < count && d.length > 0; j++) {
          const i = g(fc.nat, { max: d.length - 1 });
          if (dtype === 'float32') d[i] = pick(g, FLOAT_SPECIALS);
          else if (dtype === 'bfloat16' || dtype === 'float16') d[i] = pick(g, HALF_SPECIALS);
          else if (dtype === 'int32') d[i] = pick(g, INT_SPECIALS);
          else if (dtype === 'int64') d[i] = pick(g, [-1n, 2n ** 32n, -(2n ** 63n), 2n ** 63n - 1n, 4n, 2n ** 31n]);
          else d[i] = pick(g, [2, 255, 0, 1]);
        }
        return { dtype, shape, data: d };
      }
    case 5: // detached buffer
      {
        const d = cloneData(data, CTOR[dtype]);
        structuredClone(d.buffer, { transfer: [d.buffer] });
        return { dtype, shape, data: d };
      }
    case 6: // SharedArrayBuffer-backed
      {
        const C = CTOR[dtype];
        const d = new C(new SharedArrayBuffer(Math.max(1, data.byteLength)), 0, data.length);
        d.set(data);
        return { dtype, shape, data: d };
      }
    case 7: // a view at an offset into a larger buffer (well-formed)
      {
        const C = CTOR[dtype];
        const buf = new ArrayBuffer(data.byteLength + 16 * C.BYTES_PER_ELEMENT);
        const d = new C(buf, 8 * C.BYTES_PER_ELEMENT, data.length);
        d.set(data);
        return { dtype, shape, data: d };
      }
    case 8: // wrong kind of data
      return {
        dtype,
        shape,
        data: pick(g, [
          new Float64Array(data.length),
          new Int16Array(data.length),
          Array.from({ length: data.length }, () => 1),
          new DataView(new ArrayBuffer(data.byteLength)),
          null,
          undefined,
          data.buffer,
        ]),
      };
    case 9: // data one element short or long
      {
        const C = CTOR[dtype];
        const n = Math.max(0, data.length + pick(g, [-1, 1, 7]));
        return { dtype, shape, data: new C(n) };
      }
    case 10: // a zero-size dimension, possibly next to a huge one (no elements either way)
      {
        const s = shape.length ? [...shape] : [1];
        const at = g(fc.nat, { max: s.length - 1 });
        s[at] = 0;
        if (huge && s.length > 1) s[(at + 1) % s.length] = pick(g, [2 ** 31, 2 ** 32 + 1, 2 ** 53 - 1, 2 ** 40]);
        return { dtype, shape: s, data: new CTOR[dtype](0) };
      }
    case 11: // missing or extra keys
      return pick(g, [
        { dtype, shape },
        { shape, data },
        { dtype, data },
        { dtype, shape, data, extra: 1 },
        { ...t, shape: null },
      ]);
    default:
      return randomTensor(g, huge);
  }
}

function mutateBytes(bytes, g, huge) {
  const b = new Uint8Array(bytes);
  const dv = new DataView(b.buffer);
  switch (g(fc.nat, { max: 5 })) {
    case 0: // flip bytes
      {
        const count = 1 + g(fc.nat, { max: 8 });
        for (let j = 0; j < count && b.length; j++) b[g(fc.nat, { max: b.length - 1 })] = g(fc.nat, { max: 255 });
        return b;
      }
    case 1: // truncated
      return b.subarray(0, g(fc.nat, { max: b.length }));
    case 2: // header length field
      {
        const lens = [0n, 1n, 7n, BigInt(b.length), BigInt(b.length - 8), BigInt(b.length + 1), 2n ** 64n - 1n, 2n ** 63n];
        if (huge) lens.push(2n ** 31n, 2n ** 32n, 2n ** 53n, 100_000_001n);
        if (b.length >= 8) dv.setBigUint64(0, pick(g, lens), true);
        return b;
      }
    case 3: // another header: random JSON, or entries with junk dtype / shape / offsets
      {
        let header;
        if (g(fc.boolean)) header = g(fc.json, { maxDepth: 3 });
        else {
          const entry = () => ({
            dtype: pick(g, ['F32', 'BF16', 'F16', 'I32', 'I64', 'BOOL', 'F64', 'U8', 'f32', '', 1]),
            shape: g(fc.array, fc.oneof(fc.nat({ max: 5 }), fc.constantFrom(-1, 2.5, 2 ** 53, 2 ** 64, 2 ** 31 + 7)), { maxLength: 3 }),
            data_offsets: g(fc.array, fc.oneof(fc.nat({ max: 64 }), fc.constantFrom(-1, 2 ** 53, 2 ** 64, 1.5)), { maxLength: 3 }),
          });
          header = { 'experts.0.gate_proj.weight': entry(), 'experts.0.up_proj.weight': entry(), a: entry(), __metadata__: g(fc.boolean) ? { format: 'pt' } : g(fc.json, { maxDepth: 1 }) };
          if (typeof header.__metadata__ !== 'object') header.__metadata__ = header.__metadata__ ?? null;
        }
        const json = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
        const out = new Uint8Array(8 + json.length + g(fc.nat, { max: 64 }));
        new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
        out.set(json, 8);
        return out;
      }
    case 4: // detached / shared
      {
        if (g(fc.boolean)) {
          structuredClone(b.buffer, { transfer: [b.buffer] });
          return b;
        }
        const s = new Uint8Array(new SharedArrayBuffer(Math.max(1, b.length)), 0, b.length);
        s.set(b);
        return s;
      }
    default:
      return pick(g, [new Uint8Array(0), new Uint8Array(8), new Uint8Array(7), '', '/nonexistent/file.safetensors', 'relative/missing.safetensors', new Uint16Array(8), b.buffer]);
  }
}

/** One value made wrong, knowing what it was. */
export function mutateValue(v, g, huge, depth = 0) {
  if (g(fc.nat, { max: 5 }) === 0) return junk(g, huge);
  if (v instanceof Uint8Array && !isTensorLike(v)) return mutateBytes(v, g, huge);
  if (isTensorLike(v)) return mutateTensor(v, g, huge);
  if (typeof v === 'number') return pick(g, [...numbersFor(huge), ...NON_NUMBERS.slice(0, 7)]);
  if (typeof v === 'string') return pick(g, [...STRINGS, null, undefined, 1]);
  if (Array.isArray(v)) {
    const a = [...v];
    switch (g(fc.nat, { max: 3 })) {
      case 0:
        return [];
      case 1:
        a.push(a.length ? mutateValue(a[0], g, huge, depth + 1) : junk(g, huge));
        return a;
      default:
        if (a.length === 0) return [junk(g, huge)];
        {
          const i = g(fc.nat, { max: a.length - 1 });
          a[i] = mutateValue(a[i], g, huge, depth + 1);
        }
        return a;
    }
  }
  if (typeof v === 'object' && v !== null) {
    const o = { ...v };
    const keys = Object.keys(o);
    switch (g(fc.nat, { max: 3 })) {
      case 0: // unknown key
        o[pick(g, ['unknownKey', 'numOutToken', 'top_k', 'Probs', '__proto__x', 'constructor'])] = pick(g, [1, true, null, 'x']);
        return o;
      case 1: // a key removed
        if (keys.length) delete o[pick(g, keys)];
        return o;
      default: // a key's value made wrong (options fields, weights, biases, named tensors)
        if (keys.length === 0) return junk(g, huge);
        {
          const k = pick(g, keys);
          o[k] = depth < 3 ? mutateValue(o[k], g, huge, depth + 1) : junk(g, huge);
        }
        return o;
    }
  }
  return junk(g, huge);
}

/** A fuzzed argument list for `method`: the template with 1 to 3 mutations, sometimes one argument short or one too many. */
export function fuzzedArgs(method, g, huge) {
  const args = TEMPLATES[method]();
  const n = 1 + g(fc.nat, { max: 2 });
  for (let j = 0; j < n; j++) {
    const i = g(fc.nat, { max: args.length - 1 });
    try {
      args[i] = mutateValue(args[i], g, huge);
    } catch {
      // an earlier mutation left something this one cannot work on (a detached buffer): plain junk instead
      args[i] = junk(g, huge);
    }
  }
  const arity = g(fc.nat, { max: 9 });
  if (arity === 0) args.length = Math.max(0, args.length - 1);
  else if (arity === 1) args.push(junk(g, huge));
  return args;
}

// ------------------------------------------------------------------------------------------
// Checking what came back

/** Problems with a result (empty when it is well-formed): every tensor's data agrees with its dtype and shape. */
export function resultProblems(value, path = 'result', out = [], seen = new Set()) {
  if (typeof value !== 'object' || value === null) {
    if (typeof value === 'function' || typeof value === 'symbol') out.push(`${path}: a ${typeof value}`);
    return out;
  }
  if (seen.has(value)) return out;
  seen.add(value);
  if (ArrayBuffer.isView(value) && !isTensorLike(value)) return out;
  if (isTensorLike(value)) {
    const { dtype, shape, data } = value;
    if (!DTYPES.includes(dtype)) out.push(`${path}.dtype: ${String(dtype)}`);
    else if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) out.push(`${path}.shape: ${String(shape)}`);
    else if (!(data instanceof CTOR[dtype])) out.push(`${path}.data: ${data?.constructor?.name} for ${dtype}`);
    else if (data.length !== numel(shape)) out.push(`${path}.data.length ${data.length} != ${numel(shape)} of shape [${shape}]`);
    else if (dtype === 'bool' && data.some((x) => x > 1)) out.push(`${path}: bool data not 0/1`);
    return out;
  }
  for (const [k, v] of Object.entries(value)) resultProblems(v, `${path}.${k}`, out, seen);
  return out;
}

/** Whether an error is one of the allowed outcomes: TypeError, RangeError, or an Error naming the op (not a bug report or a trap). */
export function errorProblem(method, e) {
  if (!(e instanceof Error)) return `threw a non-Error: ${String(e)}`;
  const cls = e.constructor;
  if (cls !== TypeError && cls !== RangeError && cls !== Error) return `threw a ${cls.name}: ${e.message}`;
  if (/internal error|a bug in moe-dispatch|trapped|unreachable|panicked|RuntimeError/i.test(e.message)) return `${cls.name} reporting a bug: ${e.message}`;
  if (cls === Error && !e.message.startsWith(`${method}:`)) return `an untyped Error not naming ${method}: ${e.message}`;
  if ((cls === TypeError || cls === RangeError) && !e.message.startsWith(`${method}:`)) return `${cls.name} not naming ${method}: ${e.message}`;
  return undefined;
}

/** Describes an argument list briefly (for failure messages): tensors as dtype[shape]. */
export function describeArgs(args) {
  const d = (v, depth = 0) => {
    if (isTensorLike(v)) {
      const buf = v.data?.buffer;
      const tag = buf instanceof SharedArrayBuffer ? ' shared' : buf && buf.byteLength === 0 && v.data.byteLength === 0 && buf.detached ? ' detached' : '';
      return `${d(v.dtype, 9)}[${Array.isArray(v.shape) ? v.shape.map((x) => d(x, 9)).join(',') : d(v.shape, 9)}]{${v.data?.constructor?.name}${v.data?.length !== undefined ? `(${v.data.length})` : ''}${tag}}`;
    }
    if (typeof v === 'bigint') return `${v}n`;
    if (typeof v === 'symbol' || typeof v === 'function') return typeof v;
    if (v instanceof Uint8Array) return `Uint8Array(${v.length})`;
    if (Array.isArray(v)) return depth > 2 ? '[...]' : `[${v.map((x) => d(x, depth + 1)).join(', ')}]`;
    if (typeof v === 'object' && v !== null)
      return depth > 2
        ? '{...}'
        : `{${Object.entries(v)
            .map(([k, x]) => `${k}: ${d(x, depth + 1)}`)
            .join(', ')}}`;
    return typeof v === 'number' && Object.is(v, -0) ? '-0' : String(v);
  };
  return args.map((a) => d(a)).join(', ');
}
