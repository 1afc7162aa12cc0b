import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { playwright } from '@vitest/browser-playwright';
import { defineConfig } from 'vitest/config';

import { CHROMIUM, CHROMIUM_ARGS } from './scripts/chromium.mjs';

const ROOT = fileURLToPath(new URL('.', import.meta.url));

/** The suites that also run in the browser, on the wasm backend through the browser entry (ts/browser.ts). */
const BROWSER_SUITES = [
  'test/browser-entry.test.ts',
  'test/golden.test.ts',
  'test/properties.test.ts',
  'test/routing.test.ts',
  'test/layout.test.ts',
  'test/activations.test.ts',
  'test/dispatch-grad.test.ts',
  'test/dispatcher.test.ts',
  'test/checkpoint.test.ts',
  'test/route-backward.test.ts',
  'test/hf.test.ts',
  'test/wasm-instances.test.ts',
  'test/webgpu.test.ts',
  'test/webgpu-cache.test.ts',
  'test/webgpu-facts.test.ts',
  'test/check-permute.test.ts',
  'test/out.test.ts',
  'test/ep.test.ts',
  'test/layer-ep.test.ts',
];

/**
 * The golden files are vendored in `test/fixtures/golden/` (or `MOE_GOLDEN_DIR`). The browser
 * has no file system, so test/golden-loader.ts asks for them through this command, which runs
 * in Node: every `<op>.json` of the directory as text.
 */
function goldenFiles(): { dir: string; files: Record<string, string> } {
  const dir = process.env.MOE_GOLDEN_DIR ? resolve(process.env.MOE_GOLDEN_DIR) : resolve(ROOT, 'test/fixtures/golden');
  const files: Record<string, string> = {};
  if (existsSync(dir)) for (const f of readdirSync(dir)) if (f.endsWith('.json')) files[f.slice(0, -5)] = readFileSync(resolve(dir, f), 'utf8');
  return { dir, files };
}

/** A file under test/fixtures/ as base64 (null when absent), for the suites that run in the browser (test/fixture-loader.ts). */
function readFixture(_ctx: unknown, path: string): string | null {
  const file = resolve(ROOT, 'test/fixtures', path);
  if (!file.startsWith(resolve(ROOT, 'test/fixtures')) || !existsSync(file)) return null;
  return readFileSync(file).toString('base64');
}

const shared = { testTimeout: 60_000, hookTimeout: 60_000 };

/** The suites read their fast-check seed and run count from the environment; the browser gets them here. */
const browserEnv = Object.fromEntries(['MOE_FC_SEED', 'MOE_FC_RUNS'].map((k) => [`process.env.${k}`, process.env[k] === undefined ? 'undefined' : JSON.stringify(process.env[k])]));

export default defineConfig({
  test: {
    projects: [
      {
        test: { name: 'node', include: ['test/**/*.test.ts'], exclude: ['test/browser-entry.test.ts'], environment: 'node', ...shared },
      },
      {
        // What a page gets: the tests' `../ts/index.js` is the browser entry, as the package's
        // `browser` export condition gives a bundler.
        define: browserEnv,
        resolve: { alias: [{ find: /^\.\.\/ts\/index\.js$/, replacement: resolve(ROOT, 'ts/browser.ts') }] },
        test: {
          name: 'chromium',
          include: BROWSER_SUITES,
          ...shared,
          browser: {
            enabled: true,
            headless: true,
            screenshotFailures: false,
            provider: playwright({ launchOptions: { executablePath: CHROMIUM, args: CHROMIUM_ARGS } }),
            instances: [{ browser: 'chromium' }],
            commands: { goldenFiles, readFixture },
          },
        },
      },
    ],
  },
});
