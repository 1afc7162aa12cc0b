/**
 * The part of the boundary fuzz that could abort a process: sizes near 2^31, 2^32 and 2^53
 * (arguments, shape entries next to a zero, safetensors header lengths). Run by
 * test/boundary-fuzz.test.ts in a child Node process per backend, on the built package
 * (dist/): `node test/boundary-fuzz-child.mjs <backend> <seed> <runsPerMethod>`.
 * Before each call it writes the call's description to stderr, so if the process dies the
 * parent can say which input killed it; at the end it prints one JSON line:
 * `{ tried, succeeded, threw, problems: [...] }`.
 */
import { writeSync } from 'node:fs';

import fc from 'fast-check';

import { createBackend } from '../dist/index.js';
import { describeArgs, errorProblem, fuzzedArgs, resultProblems, TEMPLATES } from './boundary-cases.mjs';

const [name, seedArg, runsArg] = process.argv.slice(2);
const backend = await createBackend({ prefer: name });
const methods = Object.keys(backend).filter((k) => typeof backend[k] === 'function');
const SLOW_MS = 2000;
function slow(label, t0) {
  const ms = performance.now() - t0;
  if (ms > SLOW_MS) stats.problems.push(`${label}: took ${ms.toFixed(0)} ms (limit ${SLOW_MS})`);
}
const stats = { tried: 0, succeeded: 0, threw: 0, problems: [] };
for (const method of methods) {
  if (!TEMPLATES[method]) {
    stats.problems.push(`${method}: no template`);
    continue;
  }
  fc.assert(
    fc.property(fc.gen(), (g) => {
      const args = fuzzedArgs(method, g, true);
      const label = `${method}(${describeArgs(args)})`;
      writeSync(2, `CALL ${label.slice(0, 2000)}\n`);
      stats.tried++;
      let result;
      const t0 = performance.now();
      try {
        result = backend[method](...args);
        slow(label, t0);
      } catch (e) {
        slow(label, t0);
        stats.threw++;
        const p = errorProblem(method, e);
        if (p) stats.problems.push(`${label}: ${p}`);
        return;
      }
      stats.succeeded++;
      const p = resultProblems(result);
      if (p.length) stats.problems.push(`${label}: returned garbage: ${p.join('; ')}`);
    }),
    { seed: Number(seedArg), numRuns: Number(runsArg) },
  );
}
writeSync(2, 'DONE\n');
process.stdout.write(`${JSON.stringify(stats)}\n`);
