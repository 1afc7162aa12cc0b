// Golden tensors (`{ dtype: 'f32' | 'bf16' | ..., shape, data }`, as the reference generator writes
// them) to library tensors: one copy for the vitest suites (test/golden-loader.ts) and the GPU suite
// (test/gpu/common.mjs). Plain JavaScript with no imports, so the GPU machine (no node_modules) runs
// it as it is; the bit conversions come from the library the caller loaded.

/** Golden dtype names to the library's. */
export const DTYPE_OF = Object.freeze({ f32: 'float32', bf16: 'bfloat16', f16: 'float16', i64: 'int64', i32: 'int32', bool: 'bool' });

/**
 * The library tensor of a golden tensor; `as` overrides the dtype (int64 indices as int32).
 * `bits` gives the 16-bit encoders: `{ toBFloat16Bits, toFloat16Bits }` (the library's).
 */
export function goldenTensor(g, bits, as = DTYPE_OF[g.dtype]) {
  const shape = [...g.shape];
  switch (as) {
    case 'float32':
      return { dtype: as, shape, data: Float32Array.from(g.data) };
    case 'bfloat16':
      return { dtype: as, shape, data: Uint16Array.from(g.data, bits.toBFloat16Bits) };
    case 'float16':
      return { dtype: as, shape, data: Uint16Array.from(g.data, bits.toFloat16Bits) };
    case 'int32':
      return { dtype: as, shape, data: Int32Array.from(g.data) };
    case 'int64':
      return { dtype: as, shape, data: BigInt64Array.from(g.data, (v) => BigInt(v)) };
    case 'bool':
      return { dtype: as, shape, data: Uint8Array.from(g.data, (v) => (v ? 1 : 0)) };
    default:
      throw new TypeError(`golden tensor: unknown dtype ${as}`);
  }
}

/** The bytes of a tensor's data (a view, no copy). */
export function bytesOf(t) {
  return new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

/** max |a - b| / max(max |b|, 1e-30) over two equally long arrays of numbers. */
export function maxRelErr(a, b) {
  if (a.length !== b.length) throw new RangeError(`maxRelErr: ${a.length} against ${b.length} values`);
  let d = 0;
  let s = 1e-30;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    s = Math.max(s, Math.abs(b[i]));
  }
  return d / s;
}
