import type { DType, Tensor } from '../../ts/index.js';
export declare const DTYPE_OF: Readonly<Record<'f32' | 'bf16' | 'f16' | 'i64' | 'i32' | 'bool', DType>>;
export declare function goldenTensor(g: { dtype: string; shape: number[]; data: number[] }, bits: { toBFloat16Bits(v: number): number; toFloat16Bits(v: number): number }, as?: DType): Tensor;
export declare function bytesOf(t: Tensor): Uint8Array;
export declare function maxRelErr(a: ArrayLike<number>, b: ArrayLike<number>): number;
