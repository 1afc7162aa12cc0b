/**
 * bench/actmem-gpu.mjs, the layer benchmark the GPU runs use (gpu-run.sh ACTMEM, HOSTCOSTS), on
 * its cpu stand-in: it runs the layer's steps and writes its row, and `--host-costs` clocks every
 * backend method the layer calls, once a step each, in the phase that calls it, so that a change
 * to the layer or the script that breaks the clocking shows here rather than on a GPU machine.
 * Skipped, with the reason in the title, when dist/ is not built.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, describe, expect, it } from 'vitest';

const SCRIPT = fileURLToPath(new URL('../bench/actmem-gpu.mjs', import.meta.url));
const built = existsSync(fileURLToPath(new URL('../dist/index.js', import.meta.url)));
const dir = mkdtempSync(join(tmpdir(), 'moe-bench-layer-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface HostCostRow {
  phase: string;
  method: string;
  callsPerStep: number;
  usPerCall: number;
  usPerStep: number;
}

describe.skipIf(!built)(built ? 'bench/actmem-gpu.mjs --stand-in cpu' : 'bench/actmem-gpu.mjs (skipped: dist/ is not built)', () => {
  it('clocks each backend method the layer calls (--host-costs) and labels its row (--label)', () => {
    const out = join(dir, 'layer.json');
    const r = spawnSync(process.execPath, [SCRIPT, '--stand-in', 'cpu', '--iters', '2', '--warmup', '1', '--host-costs', '3', '--label', 'check', '--out', out], {
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const doc = JSON.parse(readFileSync(out, 'utf8'));
    expect(doc.gemm).toBe('cpu-check');
    const row = doc.rows[0];
    expect(row.shape).toBe('tiny');
    expect(row.layerMs).toBeGreaterThan(0);
    const costs = row.hostCosts;
    expect(costs.steps).toBe(3);
    const by = new Map((costs.methods as HostCostRow[]).map((m) => [`${m.phase} ${m.method}`, m]));
    // the layer's forward and backward, each op once a step (the stand-in's layer: softmax top-2, the Switch loss)
    for (const key of ['forward route', 'forward permute', 'forward expertsForward', 'forward unpermute', 'forward switchLoadBalancingLoss', 'backward expertsBackward', 'backward routeBackward']) {
      const m = by.get(key);
      expect(m, `${key} clocked`).toBeDefined();
      expect(m!.callsPerStep, key).toBe(1);
      expect(m!.usPerCall, key).toBeGreaterThan(0);
      expect(m!.usPerStep, key).toBeCloseTo(m!.usPerCall * m!.callsPerStep, 0);
    }
    // no method is clocked in a phase that does not call it, and the methods fit in their phase's time
    expect(by.has('backward route')).toBe(false);
    expect(by.has('forward expertsBackward')).toBe(false);
    for (const phase of ['forward', 'backward'] as const) {
      const sum = (costs.methods as HostCostRow[]).filter((m) => m.phase === phase).reduce((a, m) => a + m.usPerStep, 0);
      expect(sum, phase).toBeLessThanOrEqual(costs[`${phase}Us`] * 1.01 + 1);
    }
  });
});
