/**
 * Loading the golden files (`test/fixtures/golden/<op>.json`, produced by PyTorch running the
 * reference code) and comparing results with them. Shared by every golden suite.
 */

import { toBFloat16Bits, type DType, type Tensor } from '../ts/index.js';
import { DTYPE_OF as SHARED_DTYPE_OF, goldenTensor } from './common/golden.mjs';
import { bitsOf, expectF32Close, expectHalfWithinUlps, expectSameBits, expectValues, f16Bits } from './util.js';

/**
 * Where the golden files are read from, and the reader. In Node: the file system
 * (`MOE_GOLDEN_DIR`, else the vendored copy in `test/fixtures/golden/`). In the browser (the vitest
 * browser project) there is no file system: the `goldenFiles` command of vitest.config.ts
 * reads the same directory on the Node side and hands the texts over, all at once, here.
 */
const IN_NODE = typeof process !== 'undefined' && !!process.versions?.node;

interface GoldenSource {
  dir: string;
  /** The file's text, or why it cannot be had. */
  read(op: string): { text?: string; path: string; error?: string };
}

async function nodeSource(): Promise<GoldenSource> {
  const { existsSync, readFileSync } = await import('node:fs');
  const { resolve } = await import('node:path');
  const { fileURLToPath } = await import('node:url');
  const dir = process.env.MOE_GOLDEN_DIR ? resolve(process.env.MOE_GOLDEN_DIR) : fileURLToPath(new URL('./fixtures/golden/', import.meta.url));
  return {
    dir,
    read(op) {
      const path = resolve(dir, `${op}.json`);
      if (!existsSync(path)) return { path, error: `${path} is missing (set MOE_GOLDEN_DIR to the golden directory)` };
      return { path, text: readFileSync(path, 'utf8') };
    },
  };
}

async function browserSource(): Promise<GoldenSource> {
  const { commands } = await import('vitest/browser');
  const { dir, files } = await (commands as unknown as { goldenFiles(): Promise<{ dir: string; files: Record<string, string> }> }).goldenFiles();
  return {
    dir,
    read(op) {
      const path = `${dir}/${op}.json`;
      const text = files[op];
      return text === undefined ? { path, error: `${path} is missing (set MOE_GOLDEN_DIR to the golden directory)` } : { path, text };
    },
  };
}

const source = IN_NODE ? await nodeSource() : await browserSource();
export const GOLDEN_DIR = source.dir;

export interface GoldenTensor {
  dtype: 'f32' | 'bf16' | 'f16' | 'i64' | 'i32' | 'bool';
  shape: number[];
  data: number[];
}
export interface GoldenCase {
  name: string;
  params: Record<string, unknown>;
  inputs: Record<string, GoldenTensor | null>;
  outputs: Record<string, GoldenTensor | null>;
  note?: string | null;
}
export interface GoldenFile {
  op: string;
  meta: Record<string, unknown>;
  cases: GoldenCase[];
}

export function loadGolden(op: string): { file?: GoldenFile; error?: string } {
  const { path, text, error } = source.read(op);
  if (error !== undefined) return { error };
  try {
    return { file: JSON.parse(text!) as GoldenFile };
  } catch (e) {
    return { error: `${path} does not parse: ${(e as Error).message}` };
  }
}

// ---------------------------------------------------------------------------------------
// Golden tensors to library tensors.

export const DTYPE_OF: Record<GoldenTensor['dtype'], DType> = SHARED_DTYPE_OF;

/** The library tensor for a golden tensor; `as` overrides the dtype (int64 indices as int32). */
export function toTensor(g: GoldenTensor, as: DType = DTYPE_OF[g.dtype]): Tensor {
  return goldenTensor(g, { toBFloat16Bits, toFloat16Bits: f16Bits }, as);
}

export function input(c: GoldenCase, key: string): GoldenTensor {
  const t = c.inputs[key];
  if (!t) throw new Error(`golden case ${c.name}: input ${key} is absent`);
  return t;
}

export function output(c: GoldenCase, key: string): GoldenTensor {
  const t = c.outputs[key];
  if (!t) throw new Error(`golden case ${c.name}: output ${key} is absent`);
  return t;
}

/** Asserts that a result equals a golden tensor exactly (bits for floats, values otherwise). */
export function expectExact(got: Tensor, want: GoldenTensor, what: string, as: DType = DTYPE_OF[want.dtype]): void {
  if (as === 'float32' || as === 'bfloat16' || as === 'float16') {
    expectSameBits(got, toTensor(want, as), what);
  } else {
    expectValues(got, as, want.shape, want.data, what);
  }
}

/** Asserts an unpermute result against the golden one: f32 1e-6 relative, 16-bit floats 1 ulp. */
export function expectMerged(got: Tensor, want: GoldenTensor, what: string): void {
  const dtype = DTYPE_OF[want.dtype];
  if (dtype === 'float32') expectF32Close(got, want.shape, want.data, 1e-6, what);
  else if (dtype === 'bfloat16' || dtype === 'float16') expectHalfWithinUlps(got, dtype, want.shape, bitsOf(toTensor(want)), 1, what);
  else throw new Error(`${what}: unexpected golden dtype ${want.dtype}`);
}
