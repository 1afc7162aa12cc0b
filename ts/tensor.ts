/**
 * Tensors as moe-dispatch sees them: a dtype, a row-major shape and a flat TypedArray.
 * bfloat16 and float16 hold their raw bits in a Uint16Array; bool is a Uint8Array of 0/1.
 */

export type DType = 'float32' | 'bfloat16' | 'float16' | 'int32' | 'int64' | 'bool';
/** Dtypes that tokens (hidden states) may have. */
export type TokenDType = 'float32' | 'bfloat16' | 'float16';
/** Dtypes accepted for expert indices. */
export type IndexDType = 'int32' | 'int64';

export interface DataOf {
  float32: Float32Array;
  bfloat16: Uint16Array;
  float16: Uint16Array;
  int32: Int32Array;
  int64: BigInt64Array;
  bool: Uint8Array;
}

export interface Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: DataOf[D];
}

export const DTYPES: readonly DType[] = ['float32', 'bfloat16', 'float16', 'int32', 'int64', 'bool'];

const ARRAY_OF: Record<DType, { name: string; ctor: new (n: number) => DataOf[DType] }> = {
  float32: { name: 'Float32Array', ctor: Float32Array },
  bfloat16: { name: 'Uint16Array', ctor: Uint16Array },
  float16: { name: 'Uint16Array', ctor: Uint16Array },
  int32: { name: 'Int32Array', ctor: Int32Array },
  int64: { name: 'BigInt64Array', ctor: BigInt64Array },
  bool: { name: 'Uint8Array', ctor: Uint8Array },
};

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (ArrayBuffer.isView(value)) return value.constructor.name;
  if (Array.isArray(value)) return 'an Array';
  return typeof value === 'object' ? 'an object' : `${typeof value} ${String(value)}`;
}

/** Checks a shape: an array of non-negative safe integers. Returns the element count. */
export function checkShape(shape: unknown, arg: string): number {
  if (!Array.isArray(shape)) throw new TypeError(`${arg}: expected an array of sizes, got ${describe(shape)}`);
  let n = 1;
  shape.forEach((d, i) => {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
      throw new RangeError(`${arg}[${i}]: expected a non-negative integer, got ${String(d)}`);
    }
    n *= d;
  });
  if (!Number.isSafeInteger(n)) throw new RangeError(`${arg}: [${shape.join(', ')}] has too many elements`);
  return n;
}

/** Whether `value` looks like a host Tensor: a known dtype, a shape array and a TypedArray. */
export function isTensor(value: unknown): value is Tensor {
  if (typeof value !== 'object' || value === null) return false;
  const t = value as Partial<Tensor>;
  return typeof t.dtype === 'string' && DTYPES.includes(t.dtype) && Array.isArray(t.shape) && ArrayBuffer.isView(t.data);
}

/** Validates that `value` is a well-formed Tensor (of one of `dtypes`, if given). */
export function checkTensor<D extends DType>(value: unknown, arg: string, dtypes?: readonly D[]): Tensor<D> {
  if (typeof value !== 'object' || value === null || ArrayBuffer.isView(value) || Array.isArray(value)) {
    throw new TypeError(`${arg}: expected a Tensor { dtype, shape, data }, got ${describe(value)}`);
  }
  const t = value as Tensor;
  if (!('dtype' in t) || !('shape' in t) || !('data' in t)) {
    throw new TypeError(`${arg}: expected a Tensor { dtype, shape, data }, got an object with keys ${JSON.stringify(Object.keys(t))}`);
  }
  if (!DTYPES.includes(t.dtype)) {
    throw new TypeError(`${arg}.dtype: expected one of ${DTYPES.join(', ')}, got ${describe(t.dtype)}`);
  }
  if (dtypes && !dtypes.includes(t.dtype as D)) {
    throw new TypeError(`${arg}.dtype: expected ${dtypes.join(' or ')}, got ${t.dtype}`);
  }
  const n = checkShape(t.shape, `${arg}.shape`);
  const want = ARRAY_OF[t.dtype];
  if (!(t.data instanceof want.ctor)) {
    throw new TypeError(`${arg}.data: a ${t.dtype} tensor needs a ${want.name}, got ${describe(t.data)}`);
  }
  if (t.data.length !== n) {
    throw new RangeError(`${arg}.data: shape [${t.shape.join(', ')}] needs ${n} elements, got ${t.data.length}`);
  }
  return t as Tensor<D>;
}

/**
 * Makes a tensor. `data` may be the matching TypedArray (used as is, not copied), a plain
 * array of numbers (converted; for bfloat16/float16 the numbers are values, rounded to
 * nearest even), or omitted (zeros).
 */
export function tensor<D extends DType>(dtype: D, shape: readonly number[], data?: DataOf[D] | ArrayLike<number | bigint>): Tensor<D> {
  if (!DTYPES.includes(dtype)) throw new TypeError(`dtype: expected one of ${DTYPES.join(', ')}, got ${describe(dtype)}`);
  const n = checkShape(shape, 'shape');
  let typed: DataOf[D];
  if (data === undefined) {
    typed = new ARRAY_OF[dtype].ctor(n) as DataOf[D];
  } else if (ArrayBuffer.isView(data)) {
    typed = data as DataOf[D];
  } else if (Array.isArray(data)) {
    typed = fromNumbers(dtype, data) as DataOf[D];
  } else {
    throw new TypeError(`data: expected a TypedArray or an array of numbers, got ${describe(data)}`);
  }
  const want = ARRAY_OF[dtype];
  if (!(typed instanceof want.ctor)) {
    throw new TypeError(`data: a ${dtype} tensor needs a ${want.name} (or an array of numbers), got ${describe(typed)}`);
  }
  if (typed.length !== n) throw new RangeError(`data: shape [${shape.join(', ')}] needs ${n} elements, got ${typed.length}`);
  return { dtype, shape: [...shape], data: typed };
}

function fromNumbers(dtype: DType, values: readonly (number | bigint)[]): DataOf[DType] {
  const nums = () =>
    values.map((v, i) => {
      if (typeof v !== 'number') throw new TypeError(`data[${i}]: expected a number, got ${describe(v)}`);
      return v;
    });
  switch (dtype) {
    case 'float32':
      return Float32Array.from(nums());
    case 'bfloat16':
      return Uint16Array.from(nums(), toBFloat16Bits);
    case 'float16':
      return Uint16Array.from(nums(), toFloat16Bits);
    case 'int32':
      return Int32Array.from(nums());
    case 'bool':
      return Uint8Array.from(nums(), (v) => (v ? 1 : 0));
    case 'int64':
      return BigInt64Array.from(values, (v) => BigInt(v));
  }
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** Rounds a number to bfloat16 (nearest, ties to even) and returns its bits. */
export function toBFloat16Bits(value: number): number {
  f32[0] = value;
  const bits = u32[0];
  if (Number.isNaN(value)) return ((bits >>> 16) | 0x40) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** The value of bfloat16 bits. */
export function fromBFloat16Bits(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

/** Rounds a number to IEEE float16 (nearest, ties to even) and returns its bits. */
export function toFloat16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = m & ((1 << shift) - 1);
    let h = m >>> shift;
    if (rest > half || (rest === half && h & 1)) h += 1;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h += 1;
  return sign | h;
}

/** The value of float16 bits. */
export function fromFloat16Bits(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** The elements of a tensor as numbers (16-bit floats decoded, int64 converted). */
export function toNumbers(t: Tensor): number[] {
  switch (t.dtype) {
    case 'bfloat16':
      return Array.from(t.data as Uint16Array, fromBFloat16Bits);
    case 'float16':
      return Array.from(t.data as Uint16Array, fromFloat16Bits);
    case 'int64':
      return Array.from(t.data as BigInt64Array, Number);
    default:
      return Array.from(t.data as ArrayLike<number>);
  }
}
