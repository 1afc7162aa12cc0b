/**
 * Errors, on every available backend: one test per error class and argument, asserting the JS
 * class (TypeError for the wrong kind of value, RangeError for a wrong value), that an op's
 * message starts with `<op>: <argument>` (so it names what to fix), and that the backend still
 * gives right answers afterwards.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import { backendInfo, createBackend, tensor, type Backend } from '../ts/index.js';
import { backendRows, registerBackendReport } from './backends.js';
import { escapeRegExp, expectThrows, itThrowsEach, type OpErrorCase } from './util.js';

// A small, valid problem: 3 tokens, hidden 2, 2 experts.
// Expert 0 gets tokens 0 and 2, expert 1 gets tokens 1 and 2.
const f32 = (shape: number[], values: number[]) => tensor('float32', shape, Float32Array.from(values));
const tokens = f32([3, 2], [1, 2, 3, 4, 5, 6]);
const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 1]));
const probs = f32([3, 2], [0.5, 0, 0, 0.25, 2, 4]);
const sorted = tensor('int32', [4], Int32Array.from([0, 2, 1, 2]));
const permuted = f32([4, 2], [1, 2, 5, 6, 3, 4, 5, 6]);
const indices = tensor('int32', [1, 2], Int32Array.from([0, 1]));
const topProbs = f32([1, 2], [0.75, 0.25]);

/** A valid round trip with known answers: the backend is still usable. */
function expectStillWorks(b: Backend): void {
  const out = b.permute(tokens, map, { probs });
  expect(Array.from(out.sortedIndices.data)).toEqual([0, 2, 1, 2]);
  expect(Array.from(out.tokensPerExpert.data)).toEqual([2, 2]);
  expect(Array.from(out.permutedTokens.data)).toEqual([1, 2, 5, 6, 3, 4, 5, 6]);
  expect(Array.from(out.permutedProbs!.data)).toEqual([0.5, 2, 0.25, 4]);
  const merged = b.unpermute(out.permutedTokens, out.sortedIndices, [3, 2], { probs, routingMap: map });
  // token 0: 0.5*[1,2]; token 1: 0.25*[3,4]; token 2: 2*[5,6] + 4*[5,6]
  expect(Array.from(merged.data)).toEqual([0.5, 1, 0.75, 1, 30, 36]);
  const m = b.indicesToMultihot(indices, topProbs, 3);
  expect(Array.from(m.routingMap.data)).toEqual([1, 1, 0]);
}

type Case = OpErrorCase<'permute' | 'unpermute' | 'indicesToMultihot' | 'multihotToIndices'>;

// Deliberately wrong calls: `as never` where the types would (rightly) refuse them.
const CASES: Case[] = [
  // ---- wrong dtype: TypeError
  { title: 'tokens as int32', op: 'permute', arg: 'tokens.dtype', cls: TypeError, detail: /int32/, call: (b) => b.permute(tensor('int32', [3, 2]) as never, map) },
  { title: 'probs as bfloat16', op: 'permute', arg: 'probs.dtype', cls: TypeError, detail: /bfloat16/, call: (b) => b.permute(tokens, map, { probs: tensor('bfloat16', [3, 2]) as never }) },
  { title: 'routingMap as float32', op: 'permute', arg: 'routingMap.dtype', cls: TypeError, call: (b) => b.permute(tokens, f32([3, 2], [1, 0, 0, 1, 1, 1]) as never) },
  { title: 'indices as float32', op: 'indicesToMultihot', arg: 'indices.dtype', cls: TypeError, call: (b) => b.indicesToMultihot(f32([1, 2], [0, 1]) as never, topProbs, 3) },
  { title: 'indicesToMultihot probs as bfloat16', op: 'indicesToMultihot', arg: 'probs.dtype', cls: TypeError, call: (b) => b.indicesToMultihot(indices, tensor('bfloat16', [1, 2]) as never, 3) },
  { title: 'sortedIndices as float32', op: 'unpermute', arg: 'sortedIndices.dtype', cls: TypeError, call: (b) => b.unpermute(permuted, f32([4], [0, 2, 1, 2]) as never, [3, 2]) },
  { title: 'unpermute probs as float16', op: 'unpermute', arg: 'probs.dtype', cls: TypeError, call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs: tensor('float16', [4]) as never }) },

  // ---- wrong rank: TypeError
  { title: 'tokens of rank 1', op: 'permute', arg: 'tokens.shape', cls: TypeError, detail: /2-d/, call: (b) => b.permute(f32([6], [1, 2, 3, 4, 5, 6]), map) },

  // ---- wrong shape: RangeError
  { title: 'routingMap rows != tokens rows', op: 'permute', arg: 'routingMap.shape', cls: RangeError, detail: /\[3, 2\].*\[2, 2\]/, call: (b) => b.permute(tokens, tensor('bool', [2, 2])) },
  {
    title: 'permute probs shape != routingMap shape',
    op: 'permute',
    arg: 'probs.shape',
    cls: RangeError,
    detail: /\[3, 3\]/,
    call: (b) => b.permute(tokens, map, { probs: f32([3, 3], Array(9).fill(0)) }),
  },
  { title: 'indicesToMultihot probs shape != indices shape', op: 'indicesToMultihot', arg: 'probs.shape', cls: RangeError, call: (b) => b.indicesToMultihot(indices, f32([1, 3], [1, 1, 1]), 3) },
  {
    title: 'multihotToIndices probs shape != routingMap shape',
    op: 'multihotToIndices',
    arg: 'probs.shape',
    cls: RangeError,
    call: (b) => b.multihotToIndices(map, { probs: f32([3, 1], [1, 1, 1]) }),
  },
  { title: 'restoreShape hidden != permutedTokens hidden', op: 'unpermute', arg: 'restoreShape', cls: RangeError, detail: /hidden size 5/, call: (b) => b.unpermute(permuted, sorted, [3, 5]) },
  {
    title: 'sortedIndices length != permutedTokens rows',
    op: 'unpermute',
    arg: 'sortedIndices.shape',
    cls: RangeError,
    call: (b) => b.unpermute(permuted, tensor('int32', [3], Int32Array.from([0, 1, 2])), [3, 2]),
  },
  { title: 'per-slot probs length != permutedTokens rows', op: 'unpermute', arg: 'probs.shape', cls: RangeError, call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs: f32([3], [1, 1, 1]) }) },
  {
    title: 'dense probs rows != restoreShape rows',
    op: 'unpermute',
    arg: 'probs.shape',
    cls: RangeError,
    call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs: f32([2, 2], [1, 1, 1, 1]), routingMap: map }),
  },

  // ---- data length not matching the shape (hand-built tensors): RangeError
  {
    title: 'tokens.data shorter than its shape',
    op: 'permute',
    arg: 'tokens.data',
    cls: RangeError,
    detail: /6.*5/,
    call: (b) => b.permute({ dtype: 'float32', shape: [3, 2], data: new Float32Array(5) }, map),
  },
  { title: 'routingMap.data longer than its shape', op: 'permute', arg: 'routingMap.data', cls: RangeError, call: (b) => b.permute(tokens, { dtype: 'bool', shape: [3, 2], data: new Uint8Array(7) }) },
  {
    title: 'sortedIndices.data (int64) shorter than its shape',
    op: 'unpermute',
    arg: 'sortedIndices.data',
    cls: RangeError,
    call: (b) => b.unpermute(permuted, { dtype: 'int64', shape: [4], data: new BigInt64Array(3) }, [3, 2]),
  },
  {
    title: 'data of the wrong TypedArray for its dtype',
    op: 'permute',
    arg: 'routingMap.data',
    cls: TypeError,
    detail: /Uint8Array/,
    call: (b) => b.permute(tokens, { dtype: 'bool', shape: [3, 2], data: new Int32Array(6) } as never),
  },

  // ---- indices out of range: RangeError
  {
    title: 'an index equal to numExperts',
    op: 'indicesToMultihot',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[0\]\[1\] = 3/,
    call: (b) => b.indicesToMultihot(tensor('int32', [1, 2], Int32Array.from([0, 3])), topProbs, 3),
  },
  {
    title: 'an index of -2 (only -1 means masked)',
    op: 'indicesToMultihot',
    arg: 'indices',
    cls: RangeError,
    detail: /indices\[0\]\[0\] = -2/,
    call: (b) => b.indicesToMultihot(tensor('int32', [1, 2], Int32Array.from([-2, 0])), topProbs, 3),
  },
  {
    title: 'an int64 index beyond int32',
    op: 'indicesToMultihot',
    arg: 'indices',
    cls: RangeError,
    detail: /4294967296/,
    call: (b) => b.indicesToMultihot(tensor('int64', [1, 2], BigInt64Array.from([0n, 2n ** 32n])), topProbs, 3),
  },
  {
    title: 'a sortedIndices entry equal to numTokens',
    op: 'unpermute',
    arg: 'sortedIndices',
    cls: RangeError,
    detail: /sortedIndices\[1\] = 3/,
    call: (b) => b.unpermute(permuted, tensor('int32', [4], Int32Array.from([0, 3, 1, 2])), [3, 2]),
  },
  {
    title: 'a negative sortedIndices entry',
    op: 'unpermute',
    arg: 'sortedIndices',
    cls: RangeError,
    detail: /-1/,
    call: (b) => b.unpermute(permuted, tensor('int32', [4], Int32Array.from([0, 2, -1, 2])), [3, 2]),
  },
  {
    title: 'an int64 sortedIndices entry beyond int32',
    op: 'unpermute',
    arg: 'sortedIndices',
    cls: RangeError,
    call: (b) => b.unpermute(permuted, tensor('int64', [4], BigInt64Array.from([0n, 2n ** 33n + 1n, 1n, 2n])), [3, 2]),
  },

  // ---- duplicate expert in a row: RangeError
  {
    title: 'an expert listed twice in one row',
    op: 'indicesToMultihot',
    arg: 'indices',
    cls: RangeError,
    detail: /row 0 lists expert 1 more than once/,
    call: (b) => b.indicesToMultihot(tensor('int32', [1, 2], Int32Array.from([1, 1])), topProbs, 3),
  },

  // ---- non-integer or negative sizes: RangeError naming the argument
  { title: 'numExperts 2.5', op: 'indicesToMultihot', arg: 'numExperts', cls: RangeError, detail: /2\.5/, call: (b) => b.indicesToMultihot(indices, topProbs, 2.5) },
  { title: 'numExperts NaN', op: 'indicesToMultihot', arg: 'numExperts', cls: RangeError, call: (b) => b.indicesToMultihot(indices, topProbs, NaN) },
  { title: 'numOutTokens 2.5', op: 'permute', arg: 'numOutTokens', cls: RangeError, detail: /2\.5/, call: (b) => b.permute(tokens, map, { numOutTokens: 2.5, dropAndPad: true }) },
  { title: 'topk -1', op: 'multihotToIndices', arg: 'topk', cls: RangeError, detail: /-1/, call: (b) => b.multihotToIndices(map, { topk: -1 }) },
  { title: 'restoreShape [2.5, 2]', op: 'unpermute', arg: 'restoreShape[0]', cls: RangeError, detail: /2\.5/, call: (b) => b.unpermute(permuted, sorted, [2.5, 2]) },
  { title: 'restoreShape [3, -2]', op: 'unpermute', arg: 'restoreShape[1]', cls: RangeError, call: (b) => b.unpermute(permuted, sorted, [3, -2]) },
  {
    title: 'a tensor shape of 1.5 (hand-built)',
    op: 'permute',
    arg: 'tokens.shape[0]',
    cls: RangeError,
    call: (b) => b.permute({ dtype: 'float32', shape: [1.5, 2], data: new Float32Array(3) }, map),
  },

  // ---- capacities: RangeError
  {
    title: 'numOutTokens not a multiple of numExperts with dropAndPad',
    op: 'permute',
    arg: 'numOutTokens',
    cls: RangeError,
    detail: /3 is not a multiple of numExperts = 2/,
    call: (b) => b.permute(tokens, map, { numOutTokens: 3, dropAndPad: true }),
  },
  {
    title: 'capacity larger than numTokens',
    op: 'permute',
    arg: 'numOutTokens',
    cls: RangeError,
    detail: /capacity .* = 4 exceeds numTokens = 3/,
    call: (b) => b.permute(tokens, map, { numOutTokens: 8, dropAndPad: true }),
  },
  {
    title: 'numOutTokens != routed count without dropAndPad',
    op: 'permute',
    arg: 'numOutTokens',
    cls: RangeError,
    detail: /5 differs from the 4 entries/,
    call: (b) => b.permute(tokens, map, { numOutTokens: 5 }),
  },
  {
    title: 'unpermute dropAndPad with rows not a multiple of numExperts',
    op: 'unpermute',
    arg: ['permutedTokens.shape[0]', 'sortedIndices.shape[0]'],
    cls: RangeError,
    detail: /\b3\b.*numExperts = 2/,
    call: (b) => b.unpermute(f32([3, 2], [1, 2, 3, 4, 5, 6]), tensor('int32', [3], Int32Array.from([0, 1, 2])), [3, 2], { probs, routingMap: map, dropAndPad: true }),
  },
  {
    title: 'multihotToIndices topk below a row count',
    op: 'multihotToIndices',
    arg: 'topk',
    cls: RangeError,
    detail: /row 2 of routingMap selects 2 experts, more than topk = 1/,
    call: (b) => b.multihotToIndices(map, { topk: 1 }),
  },

  // ---- a routing map that did not make this permutation: RangeError
  {
    title: 'dense probs with a routingMap selecting a different count',
    op: 'unpermute',
    arg: 'routingMap',
    cls: RangeError,
    detail: /selects 3 entries but .*\b4 (rows|slots)\b/,
    call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs, routingMap: tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 0])) }),
  },
  {
    title: 'dense probs with sortedIndices the routingMap does not route',
    op: 'unpermute',
    arg: 'sortedIndices',
    cls: RangeError,
    detail: /slot 1 holds token 1/,
    call: (b) => b.unpermute(permuted, tensor('int32', [4], Int32Array.from([0, 1, 1, 2])), [3, 2], { probs, routingMap: map }),
  },

  // ---- missing or bad options: TypeError
  { title: 'dropAndPad without numOutTokens', op: 'permute', arg: 'numOutTokens', cls: TypeError, detail: /dropAndPad/, call: (b) => b.permute(tokens, map, { dropAndPad: true }) },
  { title: 'dense probs without routingMap', op: 'unpermute', arg: 'routingMap', cls: TypeError, call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs }) },
  {
    title: 'an unknown permute option',
    op: 'permute',
    arg: 'options.numOutToken',
    cls: TypeError,
    detail: /not an option of permute/,
    call: (b) => b.permute(tokens, map, { numOutToken: 4 } as never),
  },
  { title: 'an unknown unpermute option', op: 'unpermute', arg: 'options.routing_map', cls: TypeError, call: (b) => b.unpermute(permuted, sorted, [3, 2], { probs, routing_map: map } as never) },
  { title: 'an unknown multihotToIndices option', op: 'multihotToIndices', arg: 'options.k', cls: TypeError, call: (b) => b.multihotToIndices(map, { k: 2 } as never) },
  { title: 'dropAndPad not a boolean', op: 'permute', arg: 'dropAndPad', cls: TypeError, call: (b) => b.permute(tokens, map, { dropAndPad: 'yes', numOutTokens: 4 } as never) },
  { title: 'numOutTokens a string', op: 'permute', arg: 'numOutTokens', cls: TypeError, call: (b) => b.permute(tokens, map, { numOutTokens: '4' } as never) },
  { title: 'topk a string', op: 'multihotToIndices', arg: 'topk', cls: TypeError, call: (b) => b.multihotToIndices(map, { topk: '2' } as never) },
  { title: 'numExperts a string', op: 'indicesToMultihot', arg: 'numExperts', cls: TypeError, call: (b) => b.indicesToMultihot(indices, topProbs, '3' as never) },
  { title: 'options an array', op: 'permute', arg: 'options', cls: TypeError, call: (b) => b.permute(tokens, map, [] as never) },
  { title: 'restoreShape not an array', op: 'unpermute', arg: 'restoreShape', cls: TypeError, call: (b) => b.unpermute(permuted, sorted, 3 as never) },
  { title: 'restoreShape of three sizes', op: 'unpermute', arg: 'restoreShape', cls: TypeError, detail: /3 numbers/, call: (b) => b.unpermute(permuted, sorted, [3, 2, 1] as never) },

  // ---- not a tensor: TypeError
  { title: 'tokens a plain number', op: 'permute', arg: 'tokens', cls: TypeError, detail: /Tensor/, call: (b) => b.permute(3 as never, map) },
  { title: 'tokens a Float32Array', op: 'permute', arg: 'tokens', cls: TypeError, detail: /Float32Array/, call: (b) => b.permute(new Float32Array(6) as never, map) },
  { title: 'routingMap null', op: 'permute', arg: 'routingMap', cls: TypeError, call: (b) => b.permute(tokens, null as never) },
  { title: 'permutedTokens a plain array', op: 'unpermute', arg: ['permutedTokens', 'permutedTokens.dtype'], cls: TypeError, call: (b) => b.unpermute([1, 2] as never, sorted, [3, 2]) },
  {
    title: 'a tensor with an unknown dtype',
    op: 'permute',
    arg: 'tokens.dtype',
    cls: TypeError,
    detail: /float64/,
    call: (b) => b.permute({ dtype: 'float64', shape: [3, 2], data: new Float64Array(6) } as never, map),
  },
];

registerBackendReport();

describe.each(backendRows)('errors on %s', (_name, backend) => {
  itThrowsEach(CASES, backend, () => expectStillWorks(backend));

  it('a whole series of errors leaves the backend working and deterministic', () => {
    const before = backend.permute(tokens, map, { probs, dropAndPad: true, numOutTokens: 6 });
    for (const c of CASES) expect(() => c.call(backend)).toThrow();
    const after = backend.permute(tokens, map, { probs, dropAndPad: true, numOutTokens: 6 });
    expect(after).toEqual(before);
    // capacity 3: expert 0 = tokens 0, 2 then unselected 1; expert 1 = tokens 1, 2 then unselected 0
    expect(Array.from(after.sortedIndices.data)).toEqual([0, 2, 1, 1, 2, 0]);
    expectStillWorks(backend);
  });

  it('inputs are not modified by a failing call', () => {
    const t = f32([3, 2], [1, 2, 3, 4, 5, 6]);
    const m = tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 1]));
    expect(() => backend.permute(t, m, { numOutTokens: 3, dropAndPad: true })).toThrow(RangeError);
    expect(Array.from(t.data)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(m.data)).toEqual([1, 0, 0, 1, 1, 1]);
  });
});

describe('tensor() errors', () => {
  it('shape [1.5] -> RangeError naming shape[0]', () => {
    expectThrows(() => tensor('float32', [1.5]), RangeError, /^shape\[0\]: .*1\.5/);
  });
  it('shape [-1] -> RangeError naming shape[0]', () => {
    expectThrows(() => tensor('float32', [-1]), RangeError, /^shape\[0\]: /);
  });
  it('a Float32Array for a bfloat16 tensor -> TypeError asking for a Uint16Array', () => {
    expectThrows(() => tensor('bfloat16', [2], new Float32Array(2) as never), TypeError, /^data: a bfloat16 tensor needs a Uint16Array.*got Float32Array/);
  });
  it('data of the wrong length -> RangeError naming data', () => {
    expectThrows(() => tensor('float32', [2], [1, 2, 3]), RangeError, /data: .*needs 2 elements, got 3/);
  });
  it('an unknown dtype -> TypeError naming dtype', () => {
    expectThrows(() => tensor('float64' as never, [2]), TypeError, /^dtype: .*float64/);
  });
  it('a non-number in a plain data array -> TypeError naming the element', () => {
    expectThrows(() => tensor('float32', [2], [1, 'x' as never]), TypeError, /^data\[1\]: /);
  });
});

describe('createBackend() errors', () => {
  it("prefer 'gpu' -> rejects with a TypeError naming options.prefer", async () => {
    const err = await createBackend({ prefer: 'gpu' as never }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(TypeError);
    expect((err as Error).message).toMatch(/^options\.prefer: .*"gpu"/);
  });

  it('options not an object -> rejects with a TypeError', async () => {
    await expect(createBackend(5 as never)).rejects.toThrow(TypeError);
  });

  it("prefer 'cuda' where CUDA is unavailable -> rejects with an Error that says why", async (ctx) => {
    const cuda = (await backendInfo()).find((i) => i.name === 'cuda');
    if (cuda?.available) ctx.skip(); // nothing to refuse where CUDA runs
    const err = await createBackend({ prefer: 'cuda' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err, 'createBackend rejects').toBeInstanceOf(Error);
    expect((err as Error).constructor).toBe(Error);
    expect((err as Error).message).toContain(`cuda: ${cuda?.reason}`);
    expect(cuda?.reason, 'backendInfo gives a reason').toMatch(/\w/);
  });
});

// ---------------------------------------------------------------------------------------
// Sizes too large to allocate: a RangeError, never a process abort or a wasm trap.
//
// A native allocation failure aborts the whole Node process, which would take the test
// worker down with it, so each call runs in a child Node process through the built package
// entry point (dist/, compiled from ts/), reporting what it threw.

const DIST = new URL('../dist/index.js', import.meta.url);

interface ChildResult {
  status: number | null;
  signal: string | null;
  outcome?: { threw?: { cls: string; message: string }; returned?: boolean };
  stderr: string;
}

function inChild(backend: string, call: string): ChildResult {
  const script = `
    import { createBackend, tensor } from ${JSON.stringify(DIST.href)};
    const b = await createBackend({ prefer: ${JSON.stringify(backend)} });
    let outcome;
    try { ${call}; outcome = { returned: true }; }
    catch (e) { outcome = { threw: { cls: e.constructor.name, message: e.message } }; }
    process.stdout.write(JSON.stringify(outcome));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, RUST_BACKTRACE: '0' } });
  let outcome: ChildResult['outcome'];
  try {
    outcome = JSON.parse(r.stdout);
  } catch {
    outcome = undefined;
  }
  return { status: r.status, signal: r.signal, outcome, stderr: (r.stderr ?? '').split('\n').slice(0, 2).join(' | ') };
}

const HUGE: { title: string; op: string; arg: string; call: string }[] = [
  { title: 'numExperts = 2**40 for one token', op: 'indicesToMultihot', arg: 'numExperts', call: `b.indicesToMultihot(tensor('int32', [1, 1], [0]), tensor('float32', [1, 1], [1]), 2 ** 40)` },
  { title: 'topk = 2**40 for one token', op: 'multihotToIndices', arg: 'topk', call: `b.multihotToIndices(tensor('bool', [1, 1], [1]), { topk: 2 ** 40 })` },
];

describe.each(backendRows)('oversized sizes on %s', (name) => {
  for (const h of HUGE) {
    it(`${h.op}: ${h.title} -> RangeError naming ${h.arg}, and the process survives`, (ctx) => {
      if (!existsSync(fileURLToPath(DIST))) ctx.skip(); // reported below: dist/ is needed for the child
      const r = inChild(name, h.call);
      expect({ status: r.status, signal: r.signal, stderr: r.stderr }, 'the child process exits normally').toEqual({ status: 0, signal: null, stderr: '' });
      expect(r.outcome?.threw?.cls, `threw: ${JSON.stringify(r.outcome)}`).toBe('RangeError');
      expect(r.outcome?.threw?.message).toMatch(new RegExp(`^${escapeRegExp(h.op)}: ${escapeRegExp(h.arg)}: `));
    });
  }
});

it('dist/ (the package entry point) is built, for the child-process tests', () => {
  expect(existsSync(fileURLToPath(DIST)), `${fileURLToPath(DIST)} exists`).toBe(true);
});

describe('oversized outputs on a fresh wasm backend (wasm32 cannot hold them)', () => {
  const wasmAvailable = backendRows.some(([n]) => n === 'wasm');
  const cases: [string, string, (b: Backend) => unknown][] = [
    ['indicesToMultihot', 'numExperts', (b) => b.indicesToMultihot(tensor('int32', [1, 1], [0]), tensor('float32', [1, 1], [1]), 2 ** 31)],
    ['multihotToIndices', 'topk', (b) => b.multihotToIndices(tensor('bool', [1, 1], [1]), { topk: 2 ** 31 })],
  ];
  for (const [op, arg, call] of cases) {
    it.skipIf(!wasmAvailable)(`${op}: ${arg} = 2**31 -> RangeError naming ${arg} (not a trap), and the backend keeps working`, async () => {
      const b = await createBackend({ prefer: 'wasm' }); // a fresh instance: a trap retires it
      expectThrows(() => call(b), RangeError, new RegExp(`^${escapeRegExp(op)}: ${escapeRegExp(arg)}: `));
      expectStillWorks(b);
    });
  }
});
