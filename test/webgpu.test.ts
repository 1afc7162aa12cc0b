/**
 * The webgpu backend against wasm, in the same page: the cases of test/common/webgpu-cases.mjs
 * (every op of `WEBGPU_OPS` and a few that run on wasm inside, on seeded random problems in each
 * token dtype, host and webgpu tensors as inputs, bit for bit; errors; device errors; a lost
 * device). The same cases run in Node through Dawn on the GPU machine
 * (test/gpu/webgpu-dawn.test.mjs).
 *
 * Runs in the chromium project (headless Chromium with --enable-unsafe-webgpu: a SwiftShader
 * adapter, scripts/chromium.mjs). In Node there is no WebGPU: one skipped test with the reason.
 */
import { describe, expect, it } from 'vitest';

import * as api from '../ts/index.js';
import * as random from '../ts/random.js';
import { openWebGpu, webgpuCases, type Check } from './common/webgpu-cases.mjs';

const inBrowser = typeof (globalThis as { window?: unknown }).window !== 'undefined';
const { info, moe, why, wasm } = await openWebGpu(api);

const check: Check = {
  equal: (actual, expected, message) => expect(actual, message).toBe(expected),
  deepEqual: (actual, expected, message) => expect(actual, message).toEqual(expected),
  ok: (value, message) => expect(value, message).toBeTruthy(),
  match: (text, pattern, message) => expect(text, message).toMatch(pattern),
  fail: (message) => expect.fail(message),
};

if (moe === undefined)
  describe('webgpu backend (unavailable here)', () => {
    it.skip(`backend 'webgpu' is unavailable: ${why}`, () => {});
    if (inBrowser)
      it("CI's Chromium has a WebGPU adapter (--enable-unsafe-webgpu in scripts/chromium.mjs)", () => {
        expect.fail(`no webgpu backend in this browser: ${why}`);
      });
  });

if (moe !== undefined) {
  const { cases } = webgpuCases({
    api,
    random,
    f64: async () => ({ ...(await import('../ts/webgpu/gpu.js')), ...(await import('../ts/webgpu/f64.js')), ...(await import('../ts/webgpu/shaders.js')) }),
    moe,
    wasm,
    info: info!,
    autoPick: 'webgpu',
    check,
  });
  describe('webgpu backend against wasm, bit for bit', { timeout: 180_000 }, () => {
    for (const c of cases) it(c.name, c.run);
  });
}
