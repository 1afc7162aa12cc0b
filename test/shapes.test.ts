/**
 * The benchmarks' shapes have one home, bench/shapes.json, read by moe-cuda-bench (compiled in),
 * the PyTorch peers (bench/shapes.py) and the JS benches (bench/shapes.mjs); the library's
 * `TRAIN_SHAPES` (what `trainMoE` and `moe-dispatch train --shape` take) must name the same layer
 * shapes with the same sizes. Also: the file's entries are well formed (moe-cuda-bench stops on a
 * bad one), the Python reader gives the same shapes, and a wrong shape name is refused with the
 * list of the right ones.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import { createBackend, TRAIN_SHAPES, trainMoE } from '../ts/index.js';

interface LayerShape {
  name: string;
  tokens: number;
  dim: number;
  inter: number;
  experts: number;
  topk: number;
  byDefault: boolean;
  why: string;
}
interface DispatchShape {
  name: string;
  tokens: number;
  hidden: number;
  experts: number;
  topk: number;
}
const SHAPES_JSON = fileURLToPath(new URL('../bench/shapes.json', import.meta.url));
const file = JSON.parse(readFileSync(SHAPES_JSON, 'utf8')) as { layer: LayerShape[]; dispatch: DispatchShape[] };
const CLI = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
const python = spawnSync('python3', ['--version'], { encoding: 'utf8' }).status === 0;

const whole = (v: unknown) => Number.isSafeInteger(v) && (v as number) > 0;

describe('bench/shapes.json', () => {
  it('TRAIN_SHAPES holds its layer shapes, in its order, with its sizes', () => {
    expect(Object.keys(TRAIN_SHAPES)).toEqual(file.layer.map((s) => s.name));
    for (const s of file.layer) {
      const t = TRAIN_SHAPES[s.name as keyof typeof TRAIN_SHAPES];
      expect({ name: s.name, tokens: t.batch, dim: t.layer.dim, inter: t.layer.inter, experts: t.layer.numExperts, topk: t.layer.topk }).toEqual({
        name: s.name,
        tokens: s.tokens,
        dim: s.dim,
        inter: s.inter,
        experts: s.experts,
        topk: s.topk,
      });
    }
  });

  it('its entries are well formed: unique names, whole sizes, top-k within the experts, a default set, a reason each', () => {
    for (const list of [file.layer, file.dispatch]) {
      expect(new Set(list.map((s) => s.name)).size).toBe(list.length);
      for (const s of list) {
        const sizes = 'dim' in s ? [s.tokens, s.dim, s.inter, s.experts, s.topk] : [s.tokens, s.hidden, s.experts, s.topk];
        expect(sizes.every(whole), `${s.name}: ${sizes.join(', ')}`).toBe(true);
        expect(s.topk).toBeLessThanOrEqual(s.experts);
      }
    }
    expect(file.layer.every((s) => typeof s.byDefault === 'boolean' && s.why.length > 0)).toBe(true);
    // issue 19's two shapes are the defaults (the benchmarks' headline numbers)
    expect(file.layer.filter((s) => s.byDefault).map((s) => s.name)).toEqual(['fine-grained', 'mixtral']);
  });

  it.skipIf(!python)('bench/shapes.py reads the same shapes (python3 not found: skipped)', () => {
    const code = 'import json, sys; sys.path.insert(0, "bench"); import shapes; print(json.dumps([shapes.LAYER, shapes.DISPATCH, shapes.DEFAULT_LAYER]))';
    const r = spawnSync('python3', ['-c', code], { encoding: 'utf8', cwd: fileURLToPath(new URL('..', import.meta.url)) });
    expect(r.stderr).toBe('');
    const [layer, dispatch, defaults] = JSON.parse(r.stdout) as [Record<string, number[]>, Record<string, number[]>, string];
    expect(layer).toEqual(Object.fromEntries(file.layer.map((s) => [s.name, [s.tokens, s.dim, s.inter, s.experts, s.topk]])));
    expect(dispatch).toEqual(Object.fromEntries(file.dispatch.map((s) => [s.name, [s.tokens, s.hidden, s.experts, s.topk]])));
    expect(defaults).toBe('fine-grained,mixtral');
    const bad = spawnSync('python3', ['-c', 'import sys; sys.path.insert(0, "bench"); import shapes; shapes.layer_names("mixtral,nope")'], {
      encoding: 'utf8',
      cwd: fileURLToPath(new URL('..', import.meta.url)),
    });
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toContain("--shapes: unknown shape 'nope'; expected a comma list of fine-grained, mixtral, deepseek-v3-ep8");
  });
});

describe('a shape name that is not one of them', () => {
  it('trainMoE throws a TypeError listing every shape', async () => {
    const cpu = await createBackend({ prefer: 'cpu' });
    expect(() => trainMoE(cpu, { shape: 'deepseek-v3' as never, steps: 1 })).toThrow(new TypeError(`shape: expected one of 'tiny', 'fine-grained', 'mixtral', 'deepseek-v3-ep8', got "deepseek-v3"`));
  });

  it.skipIf(!existsSync(CLI))('moe-dispatch train --shape exits 2 naming them (dist/ not built: skipped)', () => {
    const r = spawnSync(process.execPath, [CLI, 'train', '--shape', 'deepseek-v3', '--steps', '1'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("--shape: expected one of tiny, fine-grained, mixtral, deepseek-v3-ep8, got 'deepseek-v3'");
  });
});
