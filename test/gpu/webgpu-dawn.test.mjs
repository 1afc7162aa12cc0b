// The webgpu backend in Node through Dawn (the `webgpu` npm package) against wasm, bit for bit:
// the cases of test/common/webgpu-cases.mjs, the same ones test/webgpu.test.ts runs in Chromium,
// here on the GPU machine's GPU (Dawn finds it through Vulkan).
//
// MOE_WEBGPU_DAWN: the webgpu package's folder (its index.js, with dist/linux-x64/dawn.node);
// `gpu-run.sh remote` with WEBGPU=1 unpacks the one it carries and sets it. Dawn's globals
// (GPUBufferUsage, ...) and navigator.gpu are installed before the built facade (dist/, as
// common.mjs finds it: MOE_DISPATCH_DIST overrides) is imported. Without MOE_WEBGPU_DAWN, or where
// Dawn finds no adapter (the CPU machines: Debian's lavapipe lacks a feature Dawn needs), the
// tests are one skipped test naming the reason; a MOE_WEBGPU_DAWN that does not load fails.
//
//   MOE_WEBGPU_DAWN=.gpu-bundle/webgpu/package node --test test/gpu/webgpu-dawn.test.mjs
import assert from 'node:assert/strict';
import { resolve } from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { inspect } from 'node:util';

import { openWebGpu, webgpuCases } from '../common/webgpu-cases.mjs';

const dawnDir = process.env.MOE_WEBGPU_DAWN;
/** false, or why the tests cannot run. */
let skip = dawnDir ? false : 'MOE_WEBGPU_DAWN is not set (the webgpu package folder with index.js; gpu-run.sh remote sets it with WEBGPU=1)';
let loadError;
let dawn;
if (dawnDir) {
  try {
    dawn = await import(pathToFileURL(resolve(dawnDir, 'index.js')).href);
    Object.assign(globalThis, dawn.globals);
    globalThis.navigator = { ...(globalThis.navigator ?? {}), gpu: dawn.create([]) };
  } catch (e) {
    loadError = `MOE_WEBGPU_DAWN=${dawnDir}: Dawn does not load: ${e.message}`;
  }
}

let opened;
let api;
let random;
let distDir;
if (dawn && !loadError) {
  distDir = process.env.MOE_DISPATCH_DIST ? resolve(process.env.MOE_DISPATCH_DIST) : fileURLToPath(new URL('../../dist/', import.meta.url));
  api = await import(pathToFileURL(resolve(distDir, 'index.js')).href);
  random = await import(pathToFileURL(resolve(distDir, 'random.js')).href);
  opened = await openWebGpu(api);
  if (!opened.moe) skip = `Dawn (MOE_WEBGPU_DAWN=${dawnDir}) gives no webgpu backend: ${opened.why}`;
}

/** node:assert behind the cases' assertions; the values go into the message only on failure. */
const show = (v) => inspect(v, { depth: 3, maxArrayLength: 20 });
const check = {
  equal: (actual, expected, message) => {
    if (!Object.is(actual, expected)) assert.fail(`${message}: got ${show(actual)}, want ${show(expected)}`);
  },
  deepEqual: (actual, expected, message) => assert.deepEqual(actual, expected, message),
  ok: (value, message) => assert.ok(value, message),
  match: (text, pattern, message) => assert.match(text, pattern, message),
  fail: (message) => assert.fail(message),
};

if (loadError) {
  test('Dawn loads from MOE_WEBGPU_DAWN', () => assert.fail(loadError));
} else if (skip) {
  console.log(`webgpu through Dawn skipped: ${skip}`);
  test('webgpu through Dawn against wasm', { skip }, () => {});
} else {
  const { info, moe, wasm } = opened;
  console.log(`webgpu through Dawn: ${info.device}`);
  const infos = await api.backendInfo();
  const { cases } = webgpuCases({
    api,
    random,
    f64: async () => ({
      ...(await import(pathToFileURL(resolve(distDir, 'webgpu/gpu.js')).href)),
      ...(await import(pathToFileURL(resolve(distDir, 'webgpu/f64.js')).href)),
      ...(await import(pathToFileURL(resolve(distDir, 'webgpu/shaders.js')).href)),
    }),
    moe,
    wasm,
    info,
    // Node's order: cuda, then cpu, then webgpu (backendInfo() lists them in that order)
    autoPick: infos.find((i) => i.available).name,
    check,
  });
  describe('webgpu (Dawn) against wasm, bit for bit', () => {
    for (const c of cases) test(c.name, { timeout: 180_000 }, c.run);
  });
}
