/**
 * Element-wise helpers on host tensors of the token dtypes: exact widening to float32 /
 * float64, rounding back (nearest, ties to even, as the core rounds), and the few element-wise
 * steps a layer composes around the Backend ops.
 */
import { fromBFloat16Bits, fromFloat16Bits, toBFloat16Bits, toFloat16Bits, type Tensor, type TokenDType } from './tensor.js';

/** The values of a float tensor as a Float32Array (exact for the 16-bit dtypes; the same array for float32). */
export function valuesF32(t: Tensor<TokenDType>): Float32Array {
  switch (t.dtype) {
    case 'float32':
      return t.data as Float32Array;
    case 'bfloat16': {
      // bf16 bits are the high half of the float32 bits.
      const bits = new Uint32Array(t.data.length);
      const src = t.data as Uint16Array;
      for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
      return new Float32Array(bits.buffer);
    }
    case 'float16':
      return Float32Array.from(t.data as Uint16Array, fromFloat16Bits);
  }
}

/** `t` as a float32 tensor (exact; `t` itself when it is one). */
export function toF32(t: Tensor<TokenDType>): Tensor<'float32'> {
  return t.dtype === 'float32' ? (t as Tensor<'float32'>) : { dtype: 'float32', shape: [...t.shape], data: valuesF32(t) };
}

/** Values rounded once to `dtype` (from float64 or float32 numbers). */
export function fromValues<D extends TokenDType>(dtype: D, shape: readonly number[], values: ArrayLike<number>): Tensor<D> {
  const n = values.length;
  let data: Float32Array | Uint16Array;
  if (dtype === 'float32') data = Float32Array.from(values);
  else {
    const round = dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits;
    data = new Uint16Array(n);
    for (let i = 0; i < n; i++) data[i] = round(values[i]);
  }
  return { dtype, shape: [...shape], data } as unknown as Tensor<D>;
}

/** `t` converted to `dtype` (exact when widening, rounded once when narrowing); `t` itself when it has that dtype. */
export function castTo<D extends TokenDType>(t: Tensor<TokenDType>, dtype: D): Tensor<D> {
  if (t.dtype === dtype) return t as Tensor<D>;
  return fromValues(dtype, t.shape, valuesF32(t));
}

/** The value of one element of a float tensor. */
export function valueAt(t: Tensor<TokenDType>, i: number): number {
  switch (t.dtype) {
    case 'float32':
      return (t.data as Float32Array)[i];
    case 'bfloat16':
      return fromBFloat16Bits((t.data as Uint16Array)[i]);
    case 'float16':
      return fromFloat16Bits((t.data as Uint16Array)[i]);
  }
}

/** The same data seen with another shape (no copy). */
export function reshape<T extends Tensor>(t: T, shape: readonly number[]): T {
  return { dtype: t.dtype, shape: [...shape], data: t.data } as unknown as T;
}

/** Rows `[start, end)` of a 2-d or higher tensor (a copy). */
export function rows<D extends TokenDType | 'float32'>(t: Tensor<D>, start: number, end: number): Tensor<D> {
  const width = t.shape.slice(1).reduce((a, b) => a * b, 1);
  const data = (t.data as Float32Array | Uint16Array).slice(start * width, end * width);
  return { dtype: t.dtype, shape: [end - start, ...t.shape.slice(1)], data } as unknown as Tensor<D>;
}

/** A tensor of `totalRows` rows, zero but for `part` placed at row `start` (part's dtype). */
export function placeRows<D extends TokenDType | 'float32'>(part: Tensor<D>, start: number, totalRows: number): Tensor<D> {
  const width = part.shape.slice(1).reduce((a, b) => a * b, 1);
  const src = part.data as Float32Array | Uint16Array;
  const data = new (src.constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(totalRows * width);
  data.set(src, start * width);
  return { dtype: part.dtype, shape: [totalRows, ...part.shape.slice(1)], data } as unknown as Tensor<D>;
}

/** Column sums of a 2-d float32 tensor, in float64. */
export function columnSums(t: Tensor<'float32'>): Float64Array {
  const [r, c] = t.shape;
  const out = new Float64Array(c);
  const d = t.data;
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j] += d[i * c + j];
  return out;
}

/** A bit-exact transpose of a 2-d tensor of any 2- or 4-byte dtype. */
export function transpose2d<T extends Tensor<TokenDType>>(t: T): T {
  const [r, c] = t.shape;
  const src = t.data as Float32Array | Uint16Array;
  const out = new (src.constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = src[i * c + j];
  return { dtype: t.dtype, shape: [c, r], data: out } as unknown as T;
}

/**
 * The router's logits from the float32 GEMM result `raw [N, E]`: `f32(raw + bias[j])` (bias
 * optional), then rounded to `roundTo` and widened back (a 16-bit router's logits). The GPU's
 * `logitsEpilogue` computes the same bits.
 */
export function logitsEpilogue(raw: Tensor<'float32'>, bias: Tensor<TokenDType> | undefined, roundTo: TokenDType): Tensor<'float32'> {
  let values: Float32Array = raw.data;
  if (bias) {
    const E = raw.shape[1];
    const b = valuesF32(bias);
    values = Float32Array.from(values, (v, i) => v + b[i % E]);
  }
  if (roundTo !== 'float32') values = valuesF32(fromValues(roundTo, raw.shape, values));
  return { dtype: 'float32', shape: [...raw.shape], data: values };
}

/** `dtype(f32((a + b) + c))` element by element in float64 (`c` optional); the GPU's `add3` computes the same bits. */
export function add3<D extends TokenDType>(a: Tensor<TokenDType>, b: Tensor<TokenDType>, c: Tensor<TokenDType> | undefined, dtype: D): Tensor<D> {
  const [av, bv] = [valuesF32(a), valuesF32(b)];
  const cv = c && valuesF32(c);
  return fromValues(dtype, a.shape, cv ? Float64Array.from(av, (v, i) => v + bv[i] + cv[i]) : Float64Array.from(av, (v, i) => v + bv[i]));
}

/** `out [T, k] = dense[t, indices[t, j]]` (0 for -1): route's weights' gradient from the dense one. */
export function gatherPicks(dense: Tensor<'float32'>, indices: Tensor<'int32'>): Tensor<'float32'> {
  const [T, k] = indices.shape;
  const E = dense.shape[1];
  const d = dense.data;
  return { dtype: 'float32', shape: [T, k], data: Float32Array.from(indices.data, (e, i) => (e < 0 ? 0 : d[Math.floor(i / k) * E + e])) };
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/**
 * The shared expert's sigmoid gate (Qwen2-MoE): from the gate GEMM's float32 result `raw [N, 1]`
 * and the shared MLP's output `out [N, dim]`: the gate logits rounded to out's dtype (float32
 * `[N]`, kept for the backward), and `contribution = dtype(f32(out * dtype(sigmoid(gl))))`. The
 * GPU's `sharedGateForward` computes the sigmoid with its own exp (an ulp or so from Math.exp).
 */
export function sharedGateForward<D extends TokenDType>(raw: Tensor<'float32'>, out: Tensor<D>): { gateLogits: Tensor<'float32'>; contribution: Tensor<D> } {
  const [N, D] = out.shape;
  const gl = valuesF32(fromValues(out.dtype, [N], raw.data));
  const gateD = valuesF32(fromValues(out.dtype, [N], Float64Array.from(gl, sigmoid)));
  const o = valuesF32(out);
  return {
    gateLogits: { dtype: 'float32', shape: [N], data: gl },
    contribution: fromValues(
      out.dtype,
      [N, D],
      Float32Array.from(o, (v, i) => v * gateD[Math.floor(i / D)]),
    ),
  };
}

/** The gate's backward: `gradOut = dtype(f32(g * gate))`, `dgl = f32((sum_d g out) gate (1 - gate))` `[N, 1]`, the sums in float64 in order. */
export function sharedGateBackward<D extends TokenDType>(g: Tensor<D>, out: Tensor<D>, gateLogits: Tensor<'float32'>): { gradOut: Tensor<D>; gradGateLogits: Tensor<'float32'> } {
  const [N, D] = out.shape;
  const gate = Float64Array.from(gateLogits.data, sigmoid);
  const gv = valuesF32(g);
  const ov = valuesF32(out);
  const dgl = new Float64Array(N);
  for (let t = 0; t < N; t++) {
    let acc = 0;
    for (let d = 0; d < D; d++) acc += gv[t * D + d] * ov[t * D + d];
    dgl[t] = acc * gate[t] * (1 - gate[t]);
  }
  return {
    gradOut: fromValues(
      out.dtype,
      [N, D],
      Float64Array.from(gv, (v, i) => v * gate[Math.floor(i / D)]),
    ),
    gradGateLogits: { dtype: 'float32', shape: [N, 1], data: Float32Array.from(dgl) },
  };
}
