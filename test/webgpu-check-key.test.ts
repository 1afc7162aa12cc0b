/**
 * The webgpu backend remembers the core checks that passed by an exact key of their arguments
 * (ts/backends/webgpu.ts `checkKey`): two argument objects may share a key only where the check
 * cannot tell them apart, and anything holding data (typed arrays, class instances) has none.
 */
import { describe, expect, it } from 'vitest';

import { checkKey } from '../ts/backends/webgpu.js';

describe('webgpu checkKey', () => {
  it('gives different keys to arguments a check can tell apart', () => {
    const cases: unknown[] = [
      undefined,
      null,
      0,
      -0,
      Number.NaN,
      Number.POSITIVE_INFINITY,
      true,
      false,
      'u',
      'n',
      't',
      '',
      '1,2',
      [1, 2],
      [[1], 2],
      [1, [2]],
      [undefined],
      [null],
      [],
      {},
      { a: undefined },
      { a: null },
      { a: 0 },
      { a: -0 },
      { a: '0' },
      { a: [0] },
      { a: { b: 1 } },
      { 'a:b': 1 },
      { a: 'b:1' },
      { 'a,b': 1 },
      { a: 1, b: 2 },
      { 'a:1,b': 2 },
      { b: 2, a: 1 },
      { a: '1,b:2' },
      { 'a"': 1 },
      { 'a b': 1 },
      { tokens: { dtype: 'float32', shape: [4, 8] }, probs: undefined },
      { tokens: { dtype: 'float32', shape: [4, 8] } },
      { tokens: { dtype: 'bfloat16', shape: [4, 8] } },
      { tokens: { dtype: 'float32', shape: [8, 4] } },
    ];
    const keys = cases.map((c) => checkKey(c));
    for (const [i, k] of keys.entries()) expect(k, `case ${i}`).toBeTypeOf('string');
    expect(new Set(keys).size).toBe(cases.length);
  });

  it('gives equal arguments equal keys, and none to data', () => {
    const a = () => ({ restoreShape: [4, 8], permutedTokens: { dtype: 'float32', shape: [8, 8] }, dropAndPad: false, probs: undefined });
    expect(checkKey(a())).toBe(checkKey(a()));
    expect(checkKey({ x: [1, { y: 'z' }] })).toBe(checkKey({ x: [1, { y: 'z' }] }));
    class Box {
      v = 1;
    }
    for (const v of [new Uint8Array(2), { data: new Float32Array(1) }, [1, new Int32Array(1)], new Box(), { b: new Box() }, () => 0, 1n, Symbol('s')]) {
      expect(checkKey(v)).toBeUndefined();
    }
  });
});
