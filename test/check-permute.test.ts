/**
 * The binding's `checkPermute` / `checkUnpermute` / `checkIndicesToMultihot` /
 * `checkPermuteBackward` / `checkUnpermuteBackward` (the core's checks of the op on dtypes and
 * shapes, and on values whose data is given), which the webgpu backend runs instead of the
 * whole op: for valid and invalid problems they accept exactly what the op accepts (permute:
 * and give the number of rows it makes; the backward passes: all but a plain routing map's
 * routes, which stay the op's own). Runs on the wasm binding (and the native one where it loads).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import type { Binding } from '../ts/backend.js';
import { loadWasm } from '../ts/backends/wasm.js';

const bindings: [string, Binding][] = [];
const w = await loadWasm();
if (w.binding) bindings.push(['wasm', w.binding]);
const inBrowser = typeof (globalThis as { window?: unknown }).window !== 'undefined';
if (!inBrowser) {
  const { loadNative } = await import('../ts/backends/native.js');
  const n = loadNative();
  if (n.binding) bindings.push(['native', n.binding]);
}

const u8 = (a: ArrayLike<number>) => Uint8Array.from(a);

describe.each(bindings)('checkPermute on the %s binding', (_name, b) => {
  /** What a call gives: its value, or (a string) its error's class and message. */
  const attempt = <T>(f: () => T): T | string => {
    try {
      return f();
    } catch (e) {
      return `${(e as Error).constructor.name}: ${(e as Error).message}`;
    }
  };
  /** 'ok', or the error's class and message. */
  const outcome = (f: () => unknown) =>
    attempt(() => {
      f();
      return 'ok';
    });
  /** A tensor's dtype and shape without its data (a device tensor's, as the checks take it). */
  const meta = (w: { dtype: string; shape: number[] }) => ({ dtype: w.dtype as 'int32', shape: w.shape });
  /**
   * A seeded fast-check property over `arb`: `run` calls `valid()` for each problem the op
   * accepts; both outcomes must be exercised (more than `min` and fewer than `max` of the
   * `numRuns` problems valid).
   */
  const property = <P>(arb: fc.Arbitrary<P>, run: (p: P, valid: () => void) => void, bounds: { numRuns: number; min: number; max: number }) => {
    let accepted = 0;
    fc.assert(
      fc.property(arb, (p) =>
        run(p, () => {
          accepted++;
        }),
      ),
      { seed: Number(process.env.MOE_FC_SEED ?? 0x5eed_2025), numRuns: bounds.numRuns },
    );
    expect(accepted).toBeGreaterThan(bounds.min);
    expect(accepted).toBeLessThan(bounds.max);
  };

  it('accepts what permute accepts and counts its rows (host map), on random problems valid and not', () => {
    property(
      fc.record({
        t: fc.integer({ min: 0, max: 6 }),
        e: fc.integer({ min: 0, max: 5 }),
        h: fc.integer({ min: 0, max: 3 }),
        cells: fc.array(fc.integer({ min: 0, max: 1 }), { minLength: 30, maxLength: 30 }),
        withProbs: fc.boolean(),
        dropAndPad: fc.boolean(),
        cap: fc.integer({ min: 0, max: 6 }),
        numOut: fc.constantFrom('absent', 'right', 'other'),
        other: fc.integer({ min: 0, max: 40 }),
        // most problems valid; one fault at a time otherwise
        fault: fc.constantFrom('none', 'none', 'none', 'none', 'mapRows', 'cell2', 'tokensDtype', 'probsShape', 'probsDtype', 'tokensRank'),
      }),
      (p, valid) => {
        const rows = p.fault === 'mapRows' ? p.t + 1 : p.t;
        const cells = p.cells.slice(0, rows * p.e);
        if (p.fault === 'cell2' && cells.length > 0) cells[cells.length - 1] = 2;
        const count = cells.filter((v) => v === 1).length;
        const map = { dtype: 'bool' as const, shape: [rows, p.e], data: u8(cells) };
        const tdtype = p.fault === 'tokensDtype' ? 'int32' : 'bfloat16';
        const tshape = p.fault === 'tokensRank' ? [p.t] : [p.t, p.h];
        const tokens = { dtype: tdtype as 'bfloat16', shape: tshape, data: new Uint8Array(tshape.reduce((x, y) => x * y, 1) * (tdtype === 'int32' ? 4 : 2)) };
        const pe = p.fault === 'probsShape' ? p.e + 1 : p.e;
        const probs =
          p.withProbs || p.fault.startsWith('probs') ? { dtype: (p.fault === 'probsDtype' ? 'int32' : 'float32') as 'float32', shape: [rows, pe], data: new Uint8Array(rows * pe * 4) } : undefined;
        const right = p.dropAndPad ? p.cap * p.e : count;
        const numOutTokens = p.numOut === 'absent' ? undefined : p.numOut === 'right' ? right : p.other;
        const want = attempt(() => b.permute({ tokens, routingMap: map, probs, numOutTokens, dropAndPad: p.dropAndPad }).sortedIndices.shape[0]);
        const got = attempt(() =>
          b.checkPermute({
            tokens: { dtype: tokens.dtype, shape: tokens.shape },
            routingMap: map,
            probs: probs && { dtype: probs.dtype, shape: probs.shape },
            numOutTokens,
            dropAndPad: p.dropAndPad,
          }),
        );
        // the same outcome; the error class may differ only when more than one check fails
        // (permute checks probs after the plan's size), so compare acceptance exactly
        expect(typeof got === 'number', JSON.stringify({ want, got })).toBe(typeof want === 'number');
        if (typeof want === 'number') {
          expect(got).toBe(want);
          valid();
        }
      },
      { numRuns: 400, min: 60, max: 340 },
    );
  });

  it("without the map's data: numSlots is its count, required, and checked against numOutTokens", () => {
    const tokens = { dtype: 'float32' as const, shape: [3, 2] };
    const routingMap = { dtype: 'bool' as const, shape: [3, 4] };
    expect(b.checkPermute({ tokens, routingMap, numSlots: 5 })).toBe(5);
    expect(b.checkPermute({ tokens, routingMap, numSlots: 5, numOutTokens: 5 })).toBe(5);
    expect(() => b.checkPermute({ tokens, routingMap, numSlots: 5, numOutTokens: 4 })).toThrow(/numOutTokens: 4 differs from the 5 entries/);
    expect(() => b.checkPermute({ tokens, routingMap })).toThrow(/numSlots/);
    expect(b.checkPermute({ tokens, routingMap, numOutTokens: 8, dropAndPad: true })).toBe(8);
    expect(() => b.checkPermute({ tokens, routingMap: { dtype: 'bool', shape: [2, 4] }, numSlots: 1 })).toThrow(/routingMap/);
    expect(() => b.checkPermute({ tokens, routingMap: { dtype: 'bool', shape: [3, 4], data: u8([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]) } })).toThrow(/expected 0 or 1/);
  });

  it("checkUnpermute accepts what unpermute accepts (no routing map), with the indices' data or without it when in range", () => {
    property(
      fc.record({
        n: fc.integer({ min: 0, max: 8 }),
        h: fc.integer({ min: 0, max: 3 }),
        t: fc.integer({ min: 0, max: 6 }),
        withProbs: fc.boolean(),
        dropAndPad: fc.boolean(),
        seed: fc.integer({ min: 0, max: 1000 }),
        fault: fc.constantFrom('none', 'none', 'none', 'indexRange', 'indexCount', 'hidden', 'tokensDtype', 'probsShape', 'probsDtype', 'indexDtype', 'denseProbs'),
      }),
      (p, valid) => {
        const t = Math.max(p.t, p.fault === 'indexRange' ? 0 : 1);
        const count = p.fault === 'indexCount' ? p.n + 1 : p.n;
        const ids = Array.from({ length: count }, (_, i) => (p.fault === 'indexRange' && i === 0 ? t : (p.seed + 7 * i) % t));
        const sortedIndices = { dtype: (p.fault === 'indexDtype' ? 'float32' : 'int32') as 'int32', shape: [count], data: new Uint8Array(Int32Array.from(ids).buffer) };
        const tdtype = p.fault === 'tokensDtype' ? 'int32' : 'float32';
        const permutedTokens = { dtype: tdtype as 'float32', shape: [p.n, p.h], data: new Uint8Array(p.n * p.h * 4) };
        const probsShape = p.fault === 'denseProbs' ? [t, 3] : p.fault === 'probsShape' ? [p.n + 1] : [p.n];
        const probs =
          p.withProbs || p.fault.startsWith('probs') || p.fault === 'denseProbs'
            ? { dtype: (p.fault === 'probsDtype' ? 'int32' : 'float32') as 'float32', shape: probsShape, data: new Uint8Array(probsShape.reduce((a, b) => a * b, 1) * 4) }
            : undefined;
        const restoreShape = [t, p.fault === 'hidden' ? p.h + 1 : p.h];
        let want = 'ok';
        try {
          b.unpermute({ restoreShape, permutedTokens, sortedIndices, probs, dropAndPad: p.dropAndPad });
        } catch (e) {
          want = (e as Error).constructor.name;
        }
        const args = { restoreShape, permutedTokens: meta(permutedTokens), probs: probs && meta(probs), dropAndPad: p.dropAndPad };
        const withData = outcome(() => b.checkUnpermute({ ...args, sortedIndices }));
        expect(withData === 'ok', JSON.stringify({ want, withData, p })).toBe(want === 'ok');
        if (want === 'ok') {
          valid();
          expect(b.checkUnpermute({ ...args, sortedIndices })).toBe(count);
          // without the indices' data (a device tensor whose values are known to be in range)
          expect(b.checkUnpermute({ ...args, sortedIndices: meta(sortedIndices) })).toBe(count);
        }
      },
      { numRuns: 400, min: 60, max: 340 },
    );
  });

  it('checkIndicesToMultihot accepts what indicesToMultihot accepts, for indices in range and distinct per row', () => {
    property(
      fc.record({
        t: fc.integer({ min: 0, max: 5 }),
        k: fc.integer({ min: 0, max: 4 }),
        e: fc.integer({ min: 0, max: 6 }),
        // (an allocation the op cannot make is the op's own error, not a check's)
        fault: fc.constantFrom('none', 'none', 'none', 'probsShape', 'probsDtype', 'indicesDtype', 'indicesRank'),
      }),
      (p, valid) => {
        const e = Math.max(p.e, p.k);
        // row t: experts t, t+1, ... (mod e), distinct; -1 in every third slot
        const ids = Array.from({ length: p.t * p.k }, (_, i) => (i % 3 === 2 ? -1 : (Math.floor(i / Math.max(p.k, 1)) + (i % Math.max(p.k, 1))) % Math.max(e, 1)));
        const ishape = p.fault === 'indicesRank' ? [p.t * p.k] : [p.t, p.k];
        const indices = { dtype: (p.fault === 'indicesDtype' ? 'float32' : 'int32') as 'int32', shape: ishape, data: new Uint8Array(Int32Array.from(ids).buffer) };
        const pshape = p.fault === 'probsShape' ? [p.t, p.k + 1] : [p.t, p.k];
        const probs = { dtype: (p.fault === 'probsDtype' ? 'int32' : 'float32') as 'float32', shape: pshape, data: new Uint8Array(pshape[0] * pshape[1] * 4) };
        const numExperts = e;
        const want = outcome(() => b.indicesToMultihot({ indices, probs, numExperts }));
        const got = outcome(() => b.checkIndicesToMultihot({ indices: meta(indices), probs: meta(probs), numExperts }));
        expect(got === 'ok', JSON.stringify({ want, got, p })).toBe(want === 'ok');
        if (want === 'ok') valid();
      },
      { numRuns: 300, min: 50, max: 280 },
    );
  });
  /**
   * A backward problem: a routing map, its plan's sortedIndices (or drop-and-pad's), and one
   * fault at a time (most problems valid).
   */
  const backwardProblem = fc.record({
    t: fc.integer({ min: 1, max: 6 }),
    e: fc.integer({ min: 1, max: 5 }),
    h: fc.integer({ min: 0, max: 3 }),
    cells: fc.array(fc.integer({ min: 0, max: 1 }), { minLength: 30, maxLength: 30 }),
    dropAndPad: fc.boolean(),
    cap: fc.integer({ min: 1, max: 3 }),
    probs: fc.constantFrom('none', 'slots', 'dense'),
    mapGiven: fc.boolean(),
    fault: fc.constantFrom(
      'none',
      'none',
      'none',
      'none',
      'indexRange',
      'indexCount',
      'route',
      'route',
      'mapCell2',
      'mapRows',
      'noMap',
      'gradDtype',
      'probsShape',
      'probsDtype',
      'hidden',
      'otherDtype',
      'fewerTokens',
    ),
  });
  type BackwardProblem = typeof backwardProblem extends fc.Arbitrary<infer P> ? P : never;
  const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  /** An error the check leaves to the op: a plain map's routes. */
  const ROUTES = /does not route|selects \d+ entries/;
  /** The problem's tensors (with data: wire tensors). */
  const backwardTensors = (p: BackwardProblem) => {
    const { t, e } = p;
    const cells = p.cells.slice(0, t * e);
    const map = { dtype: 'bool' as const, shape: [t, e], data: u8(cells) };
    const plan = b.permutePlan({ routingMap: map, numOutTokens: p.dropAndPad ? Math.min(p.cap, t) * e : undefined, dropAndPad: p.dropAndPad });
    const ids = Array.from(plan.sortedIndices.data as Int32Array);
    if (p.fault === 'indexRange' && ids.length > 0) ids[0] = t;
    if (p.fault === 'indexCount') ids.push(0);
    // another token in a slot (the map may not route it to the slot's expert)
    if (p.fault === 'route' && ids.length > 0) ids[ids.length - 1] = (ids[ids.length - 1] + 1) % t;
    const n = ids.length - (p.fault === 'indexCount' ? 1 : 0);
    const sortedIndices = { dtype: 'int32' as const, shape: [ids.length], data: bytes(Int32Array.from(ids)) };
    const mapCells = p.fault === 'mapRows' ? [...cells, ...new Array(e).fill(0)] : [...cells];
    if (p.fault === 'mapCell2' && mapCells.length > 0) mapCells[0] = 2;
    const routingMap =
      p.fault === 'noMap' || !(p.mapGiven || p.probs === 'dense' || p.fault.startsWith('map'))
        ? undefined
        : { dtype: 'bool' as const, shape: [p.fault === 'mapRows' ? t + 1 : t, e], data: u8(mapCells) };
    const tokens = (dtype: string, shape: number[]) => ({
      dtype: dtype as 'bfloat16',
      shape,
      data: new Uint8Array(shape.reduce((x, y) => x * y, 1) * (dtype === 'int32' || dtype === 'float32' ? 4 : 2)),
    });
    const f32 = (shape: number[], dtype = 'float32') => ({ dtype: dtype as 'float32', shape, data: new Uint8Array(shape.reduce((x, y) => x * y, 1) * 4) });
    return { n, map, sortedIndices, routingMap, tokens, f32 };
  };

  // One backward problem: the check accepts exactly when the op does, but for the one rule it
  // leaves to the op (whether a plain map routes each slot's token: `routes` says when that can
  // apply; `left` counts the problems where it did); where the op accepts, the check gives the
  // slot count with the indices' and map's data and without it (device tensors whose values are
  // known).
  type Shaped = { dtype: string; shape: number[] };
  const agree = (
    left: { routes: number },
    valid: () => void,
    p: unknown,
    want: string,
    routes: boolean,
    n: number,
    check: (sortedIndices: unknown, routingMap: unknown) => unknown,
    sortedIndices: Shaped,
    routingMap: Shaped | undefined,
  ) => {
    const got = outcome(() => check(sortedIndices, routingMap));
    if (routes && got === 'ok' && want !== 'ok') {
      expect(want, JSON.stringify(p)).toMatch(ROUTES);
      left.routes++;
    } else expect(got === 'ok', JSON.stringify({ want, got, p })).toBe(want === 'ok');
    if (want === 'ok') {
      valid();
      expect(check(sortedIndices, routingMap)).toBe(n);
      expect(check(meta(sortedIndices), routingMap && meta(routingMap))).toBe(n);
    }
  };
  // 400 backward problems, and the rule left to the op met at least once
  const backwardProperty = (run: (p: BackwardProblem, valid: () => void, left: { routes: number }) => void) => {
    const left = { routes: 0 };
    property(backwardProblem, (p, valid) => run(p, valid, left), { numRuns: 400, min: 60, max: 340 });
    expect(left.routes).toBeGreaterThan(0);
  };

  it('checkPermuteBackward accepts what permuteBackward accepts but the routes of a plain map, with the data or without it when the op accepts', () => {
    backwardProperty((p, valid, left) => {
      const { n, sortedIndices, routingMap, tokens, f32 } = backwardTensors(p);
      const gradPermuted = tokens(p.fault === 'gradDtype' ? 'int32' : 'bfloat16', [n, p.fault === 'hidden' ? p.h + 1 : p.h]);
      const gradPermutedProbs = p.probs === 'none' && !p.fault.startsWith('probs') ? undefined : f32([p.fault === 'probsShape' ? n + 1 : n], p.fault === 'probsDtype' ? 'int32' : 'float32');
      const numTokens = p.fault === 'fewerTokens' ? p.t - 1 : p.t;
      const want = outcome(() => b.permuteBackward({ gradPermuted, sortedIndices, numTokens, gradPermutedProbs, routingMap, dropAndPad: p.dropAndPad }));
      const args = { gradPermuted: meta(gradPermuted), numTokens, gradPermutedProbs: gradPermutedProbs && meta(gradPermutedProbs), dropAndPad: p.dropAndPad };
      const routes = gradPermutedProbs !== undefined && routingMap !== undefined && !p.dropAndPad;
      agree(left, valid, p, want, routes, n, (s, m) => b.checkPermuteBackward({ ...args, sortedIndices: s, routingMap: m } as never), sortedIndices, routingMap);
    });
  });

  it('checkUnpermuteBackward accepts what unpermuteBackward accepts but the routes of a plain map, with the data or without it when the op accepts', () => {
    backwardProperty((p, valid, left) => {
      const { n, sortedIndices, routingMap, tokens, f32 } = backwardTensors(p);
      const t = p.fault === 'fewerTokens' ? p.t - 1 : p.t;
      const gradOutput = tokens(p.fault === 'gradDtype' ? 'int32' : 'bfloat16', [t, p.h]);
      const permutedTokens = tokens(p.fault === 'otherDtype' ? 'float16' : 'bfloat16', [n, p.fault === 'hidden' ? p.h + 1 : p.h]);
      const pshape = p.probs === 'dense' ? [p.t, p.e] : [n];
      if (p.fault === 'probsShape') pshape[0]++;
      const probs = p.probs === 'none' && !p.fault.startsWith('probs') ? undefined : f32(pshape, p.fault === 'probsDtype' ? 'int32' : 'float32');
      const want = outcome(() => b.unpermuteBackward({ gradOutput, permutedTokens, sortedIndices, probs, routingMap, dropAndPad: p.dropAndPad }));
      const args = { gradOutput: meta(gradOutput), permutedTokens: meta(permutedTokens), probs: probs && meta(probs), dropAndPad: p.dropAndPad };
      const routes = probs?.shape.length === 2 && routingMap !== undefined && !p.dropAndPad;
      agree(left, valid, p, want, routes, n, (s, m) => b.checkUnpermuteBackward({ ...args, sortedIndices: s, routingMap: m } as never), sortedIndices, routingMap);
    });
  });
});
