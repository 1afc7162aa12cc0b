/**
 * What a training loop needs beside the layer and the optimizer, on every backend and in the
 * browser: the real training shapes, a mean squared error whose bits are the same on the host
 * and the GPU, and fast uniform random tensors (a real-sized layer's weights in seconds).
 */
import type { Backend } from './backend.js';
import type { CudaBackend } from './backends/cuda.js';
import { type AnyTensor, type DeviceTensor, isDeviceTensor } from './device.js';
import type { MoELayerOptions } from './layer.js';
import { fromValues, valuesF32 } from './numeric.js';
import { chunkSquareSums, sumOfChunks } from './optim.js';
import type { Tensor, TokenDType } from './tensor.js';

type AnyToken = AnyTensor<TokenDType>;

/** The real shapes' names (bench/shapes.json's layer shapes). */
export type RealShape = 'fine-grained' | 'mixtral' | 'deepseek-v3-ep8';

/**
 * The real shapes: tokens a step, and the layer. The same as bench/shapes.json's layer shapes,
 * which the benchmarks in every language read (test/shapes.test.ts keeps the two equal):
 * `fine-grained` (DeepSeek-MoE / Qwen-MoE-like experts), `mixtral` (Mixtral 8x7B's), and
 * `deepseek-v3-ep8`: DeepSeek-V3's experts (dim 7168, inter 2048) as one rank of eight-way expert
 * parallelism holds them, 32 of the 256 with the 8192 x 8 rows eight ranks of 8192 tokens send it,
 * routed here by the layer's softmax top-8 over the 32 (the parameters and GEMM work of `mixtral`,
 * eight times its rows).
 */
export const TRAIN_SHAPES: Record<RealShape, { batch: number; layer: MoELayerOptions }> = {
  'fine-grained': { batch: 8192, layer: { dim: 2048, inter: 1408, numExperts: 64, topk: 6, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
  mixtral: { batch: 8192, layer: { dim: 4096, inter: 14336, numExperts: 8, topk: 2, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
  'deepseek-v3-ep8': { batch: 8192, layer: { dim: 7168, inter: 2048, numExperts: 32, topk: 8, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
};

/**
 * The mean squared error of `y` against `target` and its gradient `dtype(f32(2 (y - t) / n))`;
 * the loss is `sum (y - t)^2 / n` in float64, summed in the optimizer's fixed order, so host and
 * GPU (the cuda backend's `mseLoss`) give the same bits.
 */
export function mseLoss(backend: Backend, y: AnyToken, target: AnyToken): { loss: number; grad: AnyToken } {
  for (const [t, arg] of [
    [y, 'y'],
    [target, 'target'],
  ] as const) {
    if (typeof t !== 'object' || t === null || !['float32', 'bfloat16', 'float16'].includes(t.dtype))
      throw new TypeError(`mseLoss: ${arg}: expected a float32, bfloat16 or float16 tensor, got ${t === null ? 'null' : typeof t === 'object' ? t.dtype : typeof t}`);
  }
  if (isDeviceTensor(y) !== isDeviceTensor(target)) throw new TypeError('mseLoss: target: expected a tensor on the same side as y (both host or both device tensors)');
  if (target.dtype !== y.dtype) throw new TypeError(`mseLoss: target.dtype: expected ${y.dtype} (y's), got ${target.dtype}`);
  if (target.shape.length !== y.shape.length || target.shape.some((d, i) => d !== y.shape[i]))
    throw new RangeError(`mseLoss: target.shape: expected [${y.shape.join(', ')}] (y's), got [${target.shape.join(', ')}]`);
  if (isDeviceTensor(y)) {
    if (backend.name !== 'cuda') throw new TypeError(`mseLoss: device tensors need the cuda backend, got the ${backend.name} backend`);
    return (backend as unknown as CudaBackend).mseLoss(y, target as DeviceTensor<TokenDType>);
  }
  const [a, b] = [valuesF32(y as Tensor<TokenDType>), valuesF32(target as Tensor<TokenDType>)];
  const n = a.length;
  // the differences are exact in float64; their squares summed in the optimizer's order
  const d = Float64Array.from(a, (v, i) => v - b[i]);
  const parts: number[] = [];
  chunkSquareSums(d, parts);
  return {
    loss: n > 0 ? sumOfChunks(parts) / n : 0,
    grad: fromValues(
      y.dtype,
      y.shape,
      Float64Array.from(d, (v) => (2 * v) / n),
    ),
  };
}

/** Uniform values in [-scale, scale] rounded to `dtype` (nearest, ties to even), fast (xorshift32; bfloat16 bits made inline): a real-sized layer's weights in seconds. */
export function uniformTensor<D extends TokenDType>(dtype: D, shape: readonly number[], seed: number, scale: number): Tensor<D> {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(dtype === 'bfloat16' ? 0 : n);
  const bits = new Uint16Array(dtype === 'bfloat16' ? n : 0);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    const v = (((s >>> 0) / 4294967296) * 2 - 1) * scale;
    if (dtype === 'bfloat16') {
      f[0] = v;
      const b = u[0];
      bits[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
    } else values[i] = v;
  }
  return (dtype === 'bfloat16' ? { dtype, shape: [...shape], data: bits } : fromValues(dtype, shape, values)) as Tensor<D>;
}
