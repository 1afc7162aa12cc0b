/**
 * Helpers shared by the suites: raw-bit views of tensors, comparisons that report the first
 * few mismatches, and number formats rounded independently of the library (so a test never
 * checks the library's rounding against itself).
 */
import { expect, it } from 'vitest';

import type { ActivationKind, Backend, DType, Tensor } from '../ts/index.js';

/** The raw bits of every element: uint32 for float32, uint16 for bfloat16/float16, values otherwise. */
export function bitsOf(t: Tensor): number[] {
  switch (t.dtype) {
    case 'float32': {
      const d = t.data as Float32Array;
      return Array.from(new Uint32Array(d.buffer, d.byteOffset, d.length));
    }
    case 'int64':
      return Array.from(t.data as BigInt64Array, Number);
    default:
      return Array.from(t.data as ArrayLike<number>);
  }
}

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The uint32 bits of a number rounded to float32. */
export function f32BitsOf(value: number): number {
  scratchF32[0] = value;
  return scratchU32[0];
}

/** The float32 value of uint32 bits. */
export function f32FromBits(bits: number): number {
  scratchU32[0] = bits;
  return scratchF32[0];
}

/**
 * Indices (and detail) of elements where `ok` fails: the first `limit` as readable lines, then
 * a count, so a failure says where and by how much.
 */
export function mismatches(got: ArrayLike<number>, want: ArrayLike<number>, ok: (g: number, w: number) => boolean, show: (v: number) => string = String, limit = 6): string[] {
  const out: string[] = [];
  if (got.length !== want.length) return [`length ${got.length}, expected ${want.length}`];
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    if (!ok(got[i], want[i])) {
      if (n < limit) out.push(`[${i}] got ${show(got[i])}, expected ${show(want[i])}`);
      n++;
    }
  }
  if (n > limit) out.push(`... ${n - limit} more of ${want.length}`);
  return out;
}

/** Asserts dtype and shape of a result tensor, and that its data has the right TypedArray and length. */
export function expectMeta(t: Tensor, dtype: DType, shape: readonly number[], what: string): void {
  expect(t.dtype, `${what}.dtype`).toBe(dtype);
  expect([...t.shape], `${what}.shape`).toEqual([...shape]);
  const ctor = { float32: Float32Array, bfloat16: Uint16Array, float16: Uint16Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array }[dtype];
  expect(t.data, `${what}.data type`).toBeInstanceOf(ctor);
  expect(t.data.length, `${what}.data.length`).toBe(shape.reduce((a, b) => a * b, 1));
}

/** Asserts bit-for-bit equality of two tensors (dtype, shape and every element's bits). */
export function expectSameBits(got: Tensor, want: Tensor, what: string): void {
  expectMeta(got, want.dtype, want.shape, what);
  expect(
    mismatches(bitsOf(got), bitsOf(want), (g, w) => g === w, hexOrValue(want.dtype)),
    `${what}: bits differ`,
  ).toEqual([]);
}

function hexOrValue(dtype: DType): (v: number) => string {
  return dtype === 'float32' || dtype === 'bfloat16' || dtype === 'float16' ? (v) => `0x${v.toString(16)}` : String;
}

/** Asserts exact equality of an integer/bool tensor's values with plain numbers. */
export function expectValues(got: Tensor, dtype: DType, shape: readonly number[], want: ArrayLike<number>, what: string): void {
  expectMeta(got, dtype, shape, what);
  expect(
    mismatches(bitsOf(got), want, (g, w) => g === w),
    `${what}: values differ`,
  ).toEqual([]);
}

/** Asserts exact float32 equality with expected values (compared as float32 bits, so -0 != +0). */
export function expectF32Bits(got: Tensor, shape: readonly number[], want: ArrayLike<number>, what: string): void {
  expectMeta(got, 'float32', shape, what);
  const wantBits = Array.from(want, f32BitsOf);
  expect(
    mismatches(
      bitsOf(got),
      wantBits,
      (g, w) => g === w,
      (b) => `${f32FromBits(b)} (0x${b.toString(16)})`,
    ),
    `${what}: float32 bits differ`,
  ).toEqual([]);
}

/** |a - b| <= rel * |b| + 1e-12, element-wise, on float32 values. */
export function expectF32Close(got: Tensor, shape: readonly number[], want: ArrayLike<number>, rel: number, what: string): void {
  expectMeta(got, 'float32', shape, what);
  const ok = (g: number, w: number) => Math.abs(g - w) <= rel * Math.abs(w) + 1e-12;
  expect(mismatches(got.data as Float32Array, want, ok), `${what}: beyond ${rel} relative`).toEqual([]);
}

/** bf16/f16 bits as integers ordered like the values they encode (-0 and +0 both 0). */
export function orderedHalfBits(bits: number): number {
  return bits & 0x8000 ? -(bits & 0x7fff) : bits;
}

/** Half-precision bits within `ulps` units in the last place of the expected bits. */
export function expectHalfWithinUlps(got: Tensor, dtype: 'bfloat16' | 'float16', shape: readonly number[], wantBits: ArrayLike<number>, ulps: number, what: string): void {
  expectMeta(got, dtype, shape, what);
  const ok = (g: number, w: number) => Math.abs(orderedHalfBits(g) - orderedHalfBits(w)) <= ulps;
  expect(
    mismatches(got.data as Uint16Array, wantBits, ok, (b) => `0x${b.toString(16)}`),
    `${what}: beyond ${ulps} ulp`,
  ).toEqual([]);
}

// ---------------------------------------------------------------------------------------
// Number formats, written here independently of ts/tensor.ts.

/** Rounds x to the nearest integer, ties to even. */
function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const r = x - f;
  if (r > 0.5) return f + 1;
  if (r < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * Rounds a finite double (here always a float32 value) to a binary format with `mant`
 * fraction bits and exponents down to `emin` (subnormals below), ties to even. Exact: every
 * step scales by powers of two.
 */
function roundToFormat(x: number, mant: number, emin: number): number {
  if (x === 0 || !Number.isFinite(x)) return x;
  const a = Math.abs(x);
  let e = Math.floor(Math.log2(a));
  while (2 ** e > a) e--;
  while (2 ** (e + 1) <= a) e++;
  const q = Math.max(e, emin) - mant; // weight of the last kept bit
  const r = roundHalfEven(a / 2 ** q) * 2 ** q;
  return x < 0 ? -r : r;
}

/** bfloat16 bits of a float32 value, round to nearest even (no NaN input). */
export function bf16Bits(x: number): number {
  const r = roundToFormat(Math.fround(x), 7, -126);
  if (Math.abs(r) >= 2 ** 128) return x < 0 ? 0xff80 : 0x7f80;
  return f32BitsOf(r) >>> 16;
}

/** The value of bfloat16 bits. */
export function bf16Value(bits: number): number {
  return f32FromBits(((bits & 0xffff) << 16) >>> 0);
}

/** IEEE binary16 bits of a float32 value, round to nearest even (no NaN input). */
export function f16Bits(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const r = Math.abs(roundToFormat(Math.fround(x), 10, -14));
  if (r >= 65536) return sign | 0x7c00; // 65520 and up round to infinity
  if (r < 2 ** -14) return sign | (r / 2 ** -24); // subnormal (or zero)
  let e = Math.floor(Math.log2(r));
  while (2 ** e > r) e--;
  while (2 ** (e + 1) <= r) e++;
  return sign | ((e + 15) << 10) | (r / 2 ** (e - 10) - 1024);
}

/** The value of IEEE binary16 bits. */
export function f16Value(bits: number): number {
  const s = bits & 0x8000 ? -1 : 1;
  const e = (bits >>> 10) & 0x1f;
  const m = bits & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  return e === 0 ? s * m * 2 ** -24 : s * (1024 + m) * 2 ** (e - 25);
}

export type FloatDType = 'float32' | 'bfloat16' | 'float16';

/** Encodes a number in a token dtype (rounding), as the element a TypedArray stores. */
export function encode(dtype: FloatDType, x: number): number {
  return dtype === 'float32' ? Math.fround(x) : dtype === 'bfloat16' ? bf16Bits(x) : f16Bits(x);
}

/** Decodes a stored element of a token dtype to its value. */
export function decode(dtype: FloatDType, stored: number): number {
  return dtype === 'float32' ? stored : dtype === 'bfloat16' ? bf16Value(stored) : f16Value(stored);
}

export type ErrorClass = typeof TypeError | typeof RangeError | typeof Error;

/** Runs `fn`, which must throw exactly `cls` (not a subclass, not a plain Error) with a message matching `message`. */
export function expectThrows(fn: () => unknown, cls: ErrorClass, message: RegExp): Error {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown, 'it throws').toBeInstanceOf(Error);
  const err = thrown as Error;
  expect(err.constructor, `class of: ${err.message}`).toBe(cls);
  expect(err.message).toMatch(message);
  return err;
}

/** A string as a literal inside a RegExp. */
export const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A row of an op's error table. */
export interface OpErrorCase<Op extends string = string> {
  title: string;
  op: Op;
  /** The argument the message must name right after the op: `<op>: <arg>` (any of several where either is right). */
  arg: string | string[];
  cls: ErrorClass;
  /** More of the message that must appear (what was expected or given). */
  detail?: RegExp;
  call: (b: Backend) => unknown;
}

/** Runs a row against `backend`: exactly `cls`, the message starting with `<op>: <arg>` and matching `detail`. */
export function expectOpError(c: OpErrorCase, backend: Backend): Error {
  const args = typeof c.arg === 'string' ? [c.arg] : c.arg;
  const err = expectThrows(() => c.call(backend), c.cls, new RegExp(`^${escapeRegExp(c.op)}: (${args.map(escapeRegExp).join('|')})[:\\s]`));
  if (c.detail) expect(err.message).toMatch(c.detail);
  return err;
}

/** A test per row (`<op>: <title> -> <class> naming <arg>`): expectOpError, then `after` (the backend still works). */
export function itThrowsEach(cases: readonly OpErrorCase[], backend: Backend, after?: () => void): void {
  for (const c of cases) {
    const args = typeof c.arg === 'string' ? [c.arg] : c.arg;
    it(`${c.op}: ${c.title} -> ${c.cls.name} naming ${args.join(' or ')}`, () => {
      expectOpError(c, backend);
      after?.();
    });
  }
}

/** The seeded generator of the library's own tests and CLI (mulberry32). */
export { rng } from '../ts/random.js';

// ---------------------------------------------------------------------------------------
// The float64 reference of the expert activations, written from the formulas (not from the library).

export interface ActivationOpts {
  alpha: number;
  limit: number;
  linearOffset: number;
}
export const ACTIVATION_DEFAULTS: ActivationOpts = { alpha: 1.702, limit: 7, linearOffset: 1 };

export const sigmoid64 = (v: number): number => 1 / (1 + Math.exp(-v));

/** The unweighted activation of one column from its gate and up values (up unused by relu2). */
export function activationUnit64(kind: ActivationKind, gate: number, up: number, o: ActivationOpts = ACTIVATION_DEFAULTS): number {
  // The library computes in float32, so its options are float32 values.
  const alpha = Math.fround(o.alpha);
  const limit = Math.fround(o.limit);
  const offset = Math.fround(o.linearOffset);
  const g = Math.min(gate, limit);
  const u = Math.max(-limit, Math.min(limit, up));
  switch (kind) {
    case 'swiglu':
      return gate * sigmoid64(gate) * up;
    case 'quick_geglu':
    case 'swiglu_oai':
      return g * sigmoid64(alpha * g) * (u + offset);
    case 'swiglu_clamped':
      return g * sigmoid64(g) * u;
    case 'relu2':
      return Math.max(gate, 0) ** 2;
  }
}
