/**
 * Boundary fuzzing: malformed input thrown at every method of every CPU backend (the methods
 * are enumerated from the backend object, so a new op is fuzzed as soon as it has a template
 * in test/boundary-cases.mjs, and this suite fails until it has one).
 *
 * Each call must either return a well-formed result (every tensor's data agrees with its dtype
 * and shape) or throw a TypeError / RangeError (or an Error) whose message starts with the op,
 * and never a report of an internal bug, a wasm trap, a process abort or a hang. Afterwards
 * the backend must still give right answers.
 *
 * In this process: wrong dtypes, mismatched shapes, NaN / Inf, out-of-range and negative
 * indices, non-integer sizes, detached and SharedArrayBuffer-backed buffers, junk option types,
 * unknown option keys, null / undefined anywhere, corrupted safetensors bytes. Sizes near
 * 2^31, 2^32 and 2^53 run in a child process per backend (test/boundary-fuzz-child.mjs, on
 * dist/), since an unguarded allocation would abort the process. MOE_FC_SEED / MOE_FC_RUNS
 * change the seed and the runs per method.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { tensor, type Backend } from '../ts/index.js';
import { backendRows, cpuBackends, registerBackendReport } from './backends.js';
// @ts-expect-error: plain JavaScript shared with the child process, no declarations
import { describeArgs, errorProblem, fuzzedArgs, resultProblems, TEMPLATES } from './boundary-cases.mjs';

const SEED = Number(process.env.MOE_FC_SEED ?? 20261123);
const RUNS = Number(process.env.MOE_FC_RUNS ?? 300);
/** A single call slower than this counts as a hang. */
const SLOW_MS = 2000;

const methodsOf = (b: Backend): string[] => Object.keys(b).filter((k) => typeof (b as unknown as Record<string, unknown>)[k] === 'function');

/** A known-answer round trip: the backend still works. */
function expectStillWorks(b: Backend): void {
  const map = tensor('bool', [3, 2], Uint8Array.from([1, 0, 0, 1, 1, 1]));
  const out = b.permute(tensor('float32', [3, 2], [1, 2, 3, 4, 5, 6]), map);
  expect(Array.from(out.sortedIndices.data)).toEqual([0, 2, 1, 2]);
  expect(Array.from(out.permutedTokens.data)).toEqual([1, 2, 5, 6, 3, 4, 5, 6]);
  const r = b.route(tensor('float32', [1, 3], [0, 2, 1]), { topk: 2 });
  expect(Array.from(r.indices.data)).toEqual([1, 2]);
}

registerBackendReport();

// The CPU backends: a cuda backend adds device-tensor methods (upload, ...) that its own suite covers.
const cpuRows = cpuBackends.map((b) => [b.name, b] as const);

describe('boundary fuzz: every method has a generator', () => {
  it.each(cpuRows)('%s: every method of the backend has a template (a new op needs one in test/boundary-cases.mjs)', (_name, backend) => {
    const methods = methodsOf(backend);
    expect(methods.length, 'methods found on the backend').toBeGreaterThanOrEqual(34);
    expect(
      methods.filter((m) => !(m in TEMPLATES)),
      'methods without a template',
    ).toEqual([]);
  });

  it.each(cpuRows)('%s: every template is a valid call (so mutations start from something that works)', (_name, backend) => {
    for (const m of methodsOf(backend)) {
      const args = (TEMPLATES as Record<string, () => unknown[]>)[m]();
      let result: unknown;
      expect(() => (result = (backend as unknown as Record<string, (...a: unknown[]) => unknown>)[m](...args)), m).not.toThrow();
      expect(resultProblems(result), m).toEqual([]);
    }
  });
});

describe.each(cpuRows)('boundary fuzz on %s', (name, backend) => {
  it(`every method, ${RUNS} malformed calls each (seed ${SEED}): a typed error or a well-formed result, never a crash, a trap or a hang`, () => {
    const stats = { tried: 0, succeeded: 0, typeError: 0, rangeError: 0, error: 0 };
    const problems: string[] = [];
    const methods = methodsOf(backend);
    for (const method of methods) {
      const f = (backend as unknown as Record<string, (...a: unknown[]) => unknown>)[method];
      fc.assert(
        fc.property(fc.gen(), (g) => {
          const args: unknown[] = fuzzedArgs(method, g, false);
          stats.tried++;
          const t0 = performance.now();
          let result: unknown;
          let thrown: unknown;
          let threw = false;
          try {
            result = f(...args);
          } catch (e) {
            threw = true;
            thrown = e;
          }
          const ms = performance.now() - t0;
          const label = () => `${method}(${describeArgs(args)})`;
          if (ms > SLOW_MS) problems.push(`${label()}: took ${ms.toFixed(0)} ms`);
          if (threw) {
            const p = errorProblem(method, thrown);
            if (p) problems.push(`${label()}: ${p}`);
            else if (thrown instanceof TypeError) stats.typeError++;
            else if (thrown instanceof RangeError) stats.rangeError++;
            else stats.error++;
          } else {
            stats.succeeded++;
            const p = resultProblems(result) as string[];
            if (p.length) problems.push(`${label()}: returned garbage: ${p.join('; ')}`);
          }
        }),
        { seed: SEED, numRuns: RUNS },
      );
    }
    console.log(
      `boundary fuzz on ${name}: ${stats.tried} inputs tried over ${methods.length} methods: ${stats.succeeded} returned well-formed results, ` +
        `${stats.typeError} TypeError, ${stats.rangeError} RangeError, ${stats.error} Error; ${problems.length} problems`,
    );
    expect(problems.slice(0, 20), `${problems.length} problems`).toEqual([]);
    expect(stats.tried).toBe(RUNS * methods.length);
    // Both outcomes are exercised: the fuzz is not all-rejected nor all-accepted.
    expect(stats.succeeded).toBeGreaterThan(0);
    expect(stats.typeError).toBeGreaterThan(0);
    expect(stats.rangeError).toBeGreaterThan(0);
    expectStillWorks(backend);
  });
});

// ---------------------------------------------------------------------------------------
// Sizes near 2^31 and 2^53: in a child process per backend, so an abort fails a test
// instead of killing the worker. The native child runs under a 8 GiB address-space limit,
// so an output that is allocatable but enormous fails to allocate (a RangeError) instead of
// filling this machine's memory.

const DIST = fileURLToPath(new URL('../dist/index.js', import.meta.url));
const CHILD = fileURLToPath(new URL('./boundary-fuzz-child.mjs', import.meta.url));
const HUGE_RUNS = Number(process.env.MOE_FC_HUGE_RUNS ?? 100);

describe.each(backendRows.filter(([n]) => n === 'cpu' || n === 'wasm'))('boundary fuzz with sizes near 2^31 and 2^53 on %s (child process)', (name) => {
  it(`${HUGE_RUNS} calls per method: typed errors or well-formed results, and the process survives`, (ctx) => {
    if (!existsSync(DIST)) ctx.skip(); // errors.test.ts fails when dist/ is missing
    const limit = name === 'cpu' ? 'ulimit -v 8388608; ' : '';
    const r = spawnSync('bash', ['-c', `${limit}exec "$0" "$@"`, process.execPath, CHILD, name, String(SEED), String(HUGE_RUNS)], {
      encoding: 'utf8',
      timeout: 120_000,
      maxBuffer: 64 << 20,
      env: { ...process.env, RUST_BACKTRACE: '0' },
    });
    const lastCall = (r.stderr ?? '')
      .split('\n')
      .filter((l) => l.startsWith('CALL '))
      .pop();
    const tail = (r.stderr ?? '')
      .split('\n')
      .filter((l) => !l.startsWith('CALL '))
      .slice(0, 6)
      .join(' | ');
    expect({ status: r.status, signal: r.signal }, `the child exits normally; last call: ${lastCall}; stderr: ${tail}`).toEqual({ status: 0, signal: null });
    const stats = JSON.parse(r.stdout.trim().split('\n').pop()!) as { tried: number; succeeded: number; threw: number; problems: string[] };
    console.log(`boundary fuzz (huge sizes) on ${name}: ${stats.tried} inputs tried: ${stats.succeeded} well-formed results, ${stats.threw} typed errors; ${stats.problems.length} problems`);
    expect(stats.problems.slice(0, 20), `${stats.problems.length} problems`).toEqual([]);
    expect(stats.tried).toBeGreaterThan(30 * HUGE_RUNS);
  }, 150_000);
});
