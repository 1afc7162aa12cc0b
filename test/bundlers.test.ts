/**
 * `import { createBackend } from 'moe-dispatch'` in a web app, bundled by Vite, webpack and
 * esbuild (the versions pinned in package.json's devDependencies), each page run in headless
 * Chromium (scripts/chromium.mjs): the page permutes and unpermutes a small input on two wasm
 * backends and the numbers must be the library's (computed here in Node). Also Vite's dev
 * server, and the installed package in plain Node ESM (both entries).
 *
 * The package is what a user installs: `npm pack` of this checkout (dist/, pkg/wasm/, native/)
 * installed into a temporary app directory. The bundlers pick the browser entry by the
 * `browser` export condition; a build must finish with no warning and no error (a `node:`
 * import anywhere in the browser entry's graph is an error for esbuild and webpack, a warning
 * for Vite), and must emit the `.wasm` as an asset that the page then fetches.
 *
 * esbuild does not follow `new URL('...wasm', import.meta.url)` (evanw/esbuild#795): the app
 * imports `moe-dispatch/moe_wasm_bg.wasm` with `--loader:.wasm=file` and passes its URL as
 * `createBackend({ wasm })` (README, "In the browser"); the app without that builds too, and
 * its page says what to do.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { CHROMIUM, launchOptions } from '../scripts/chromium.mjs';
import { createBackend, tensor } from '../ts/index.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const built = ['dist/browser.js', 'pkg/wasm/moe_wasm_factory.js', 'pkg/wasm/moe_wasm_bg.wasm'].every((f) => existsSync(join(ROOT, f)));
const haveChromium = existsSync(CHROMIUM);

/** The bundlers, imported from this repo's devDependencies; a missing one is a skipped test naming why. */
async function tryImport<T>(name: string): Promise<{ mod?: T; reason?: string; version?: string }> {
  try {
    const mod = (await import(name)) as T;
    const version = JSON.parse(readFileSync(join(ROOT, 'node_modules', name, 'package.json'), 'utf8')).version as string;
    return { mod, version };
  } catch (e) {
    return { reason: `${name} is not installed (npm ci installs it from package-lock.json): ${(e as Error).message.split('\n')[0]}` };
  }
}
type Vite = typeof import('vite');
type Esbuild = typeof import('esbuild');
const vite = await tryImport<Vite>('vite');
const webpack = await tryImport<{ default: typeof import('webpack') }>('webpack');
const esbuild = await tryImport<Esbuild>('esbuild');

// The app: the same op on two backends (two wasm instances), the answer on `window.__result`.
const INPUT = {
  tokens: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], // [4, 3]
  map: [1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1], // [4, 3] bool
  probs: [0.5, 0, 0.5, 0, 0.25, 0.75, 0.125, 0.875, 0, 0, 0, 1],
};
const appSource = (createOptions: string, extraImport = '') => `import { backendInfo, createBackend, tensor } from 'moe-dispatch';
${extraImport}
const INPUT = ${JSON.stringify(INPUT)};
async function run() {
  const options = ${createOptions};
  const a = await createBackend(options);
  const b = await createBackend(options);
  const tokens = tensor('float32', [4, 3], Float32Array.from(INPUT.tokens));
  const map = tensor('bool', [4, 3], Uint8Array.from(INPUT.map));
  const probs = tensor('float32', [4, 3], Float32Array.from(INPUT.probs));
  const p = a.permute(tokens, map, { probs });
  const restored = b.unpermute(p.permutedTokens, p.sortedIndices, [4, 3], { probs: p.permutedProbs });
  const infos = await backendInfo(options);
  return {
    names: [a.name, b.name],
    wasmAvailable: infos.find((i) => i.name === 'wasm').available,
    permutedTokens: Array.from(p.permutedTokens.data),
    permutedProbs: Array.from(p.permutedProbs.data),
    sortedIndices: Array.from(p.sortedIndices.data),
    tokensPerExpert: Array.from(p.tokensPerExpert.data),
    restored: Array.from(restored.data),
  };
}
run().then((r) => { window.__result = r; }, (e) => { window.__result = { error: String((e && e.message) || e) }; });
`;
const html = (script: string, module: boolean) =>
  `<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head><body><script${module ? ' type="module"' : ''} src="${script}"></script></body></html>\n`;

/** What the library says, here in Node (the native backend when it runs, else wasm). */
async function expected() {
  const moe = await createBackend();
  const tokens = tensor('float32', [4, 3], Float32Array.from(INPUT.tokens));
  const map = tensor('bool', [4, 3], Uint8Array.from(INPUT.map));
  const probs = tensor('float32', [4, 3], Float32Array.from(INPUT.probs));
  const p = moe.permute(tokens, map, { probs });
  const restored = moe.unpermute(p.permutedTokens, p.sortedIndices, [4, 3], { probs: p.permutedProbs });
  return {
    // the pages run in Chromium with --enable-unsafe-webgpu (scripts/chromium.mjs): auto picks webgpu,
    // whose synchronous ops run on its wasm instance
    names: ['webgpu', 'webgpu'],
    wasmAvailable: true,
    permutedTokens: Array.from(p.permutedTokens.data as Float32Array),
    permutedProbs: Array.from(p.permutedProbs!.data),
    sortedIndices: Array.from(p.sortedIndices.data),
    tokensPerExpert: Array.from(p.tokensPerExpert.data),
    restored: Array.from(restored.data as Float32Array),
  };
}

const MIME: Record<string, string> = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.wasm': 'application/wasm', '.css': 'text/css' };

/** Serves `dir` on 127.0.0.1 (files only, no listing). */
async function serveDir(dir: string): Promise<{ url: string; server: Server }> {
  const server = createServer((req, res) => {
    const file = join(dir, decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname));
    if (!file.startsWith(dir) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': MIME[extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' }).end(readFileSync(file));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, server };
}

/** The files of a build output (relative paths). */
function listFiles(dir: string, prefix = ''): string[] {
  return readdirSync(join(dir, prefix), { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? listFiles(dir, join(prefix, e.name)) : [join(prefix, e.name)]));
}

describe.skipIf(!built || !haveChromium)(`bundlers: the browser entry from the packed package, in Chromium (${CHROMIUM})`, () => {
  let tmp: string;
  let app: string;
  let browser: Browser;
  let served: { url: string; server: Server };
  let want: Awaited<ReturnType<typeof expected>>;

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'moe-bundlers-'));
    app = join(tmp, 'app');
    mkdirSync(join(app, 'src'), { recursive: true });
    const tgz = execFileSync('npm', ['pack', '--silent', '--pack-destination', tmp], { cwd: ROOT, encoding: 'utf8' }).trim().split('\n').pop()!;
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'bundler-app', private: true, type: 'module' }));
    execFileSync('npm', ['install', '--offline', '--no-save', '--no-package-lock', '--ignore-scripts', '--no-audit', '--no-fund', '--silent', join(tmp, tgz)], { cwd: app });
    writeFileSync(join(app, 'src/main.js'), appSource('{}'));
    writeFileSync(
      join(app, 'src/main-esbuild.js'),
      appSource('{ wasm: new URL(wasmPath, import.meta.url) }', "import wasmPath from 'moe-dispatch/moe_wasm_bg.wasm'; // esbuild --loader:.wasm=file: the emitted file's path"),
    );
    writeFileSync(join(app, 'index.html'), html('./src/main.js', true));
    served = await serveDir(tmp);
    browser = await chromium.launch(launchOptions);
    want = await expected();
  });

  afterAll(async () => {
    await browser?.close();
    await new Promise((r) => (served ? served.server.close(r) : r(undefined)));
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  /** Opens `page` (a path under tmp) and returns window.__result, with the requests made and the failed ones. */
  async function runPage(path: string) {
    const page = await browser.newPage();
    const requests: string[] = [];
    const failures: string[] = [];
    const errors: string[] = [];
    page.on('request', (r) => requests.push(new URL(r.url()).pathname));
    page.on('response', (r) => r.status() >= 400 && failures.push(`${r.status()} ${new URL(r.url()).pathname}`));
    page.on('pageerror', (e) => errors.push(e.message));
    try {
      await page.goto(`${served.url}/${path}`);
      await page
        .waitForFunction(() => (window as { __result?: unknown }).__result, null, { timeout: 20_000 })
        .catch((e: Error) => {
          throw new Error(`${path}: no result (${e.message}); failed requests: ${failures.join(', ') || 'none'}; page errors: ${errors.join('; ') || 'none'}`);
        });
      const result = (await page.evaluate(() => (window as { __result?: unknown }).__result)) as Record<string, unknown>;
      return { result, requests, failures, errors };
    } finally {
      await page.close();
    }
  }

  /** Checks a build's output: a .wasm asset, no `node:` specifier left in its JavaScript. */
  function checkOutput(out: string): string {
    const files = listFiles(out);
    const wasm = files.filter((f) => f.endsWith('.wasm'));
    expect(wasm, `one .wasm emitted in ${files.join(', ')}`).toHaveLength(1);
    for (const f of files.filter((f) => f.endsWith('.js'))) expect(readFileSync(join(out, f), 'utf8'), f).not.toMatch(/["'`]node:[a-z]/);
    return wasm[0];
  }

  it('plain Node ESM: the installed package, its Node entry and its browser entry', () => {
    const script = `
      const results = {};
      // the browser entry first: nothing has registered Node's fs yet (platform.ts falls back to process.getBuiltinModule)
      for (const spec of ['moe-dispatch/browser', 'moe-dispatch']) {
        const { createBackend, tensor } = await import(spec);
        const moe = await createBackend({ prefer: 'wasm' });
        const p = moe.permute(tensor('float32', [4, 3], Float32Array.from(${JSON.stringify(INPUT.tokens)})), tensor('bool', [4, 3], Uint8Array.from(${JSON.stringify(INPUT.map)})));
        results[spec] = Array.from(p.permutedTokens.data);
      }
      console.log(JSON.stringify(results));`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: app, encoding: 'utf8' });
    const results = JSON.parse(out.trim().split('\n').pop()!);
    expect(results['moe-dispatch']).toEqual(want.permutedTokens);
    expect(results['moe-dispatch/browser']).toEqual(want.permutedTokens);
  });

  it.skipIf(!vite.mod)(`Vite ${vite.version ?? `(skipped: ${vite.reason})`}: builds with no warning, and the page computes`, async () => {
    const warnings: string[] = [];
    const logger = { ...vite.mod!.createLogger('warn'), warn: (m: string) => warnings.push(m), warnOnce: (m: string) => warnings.push(m) };
    // base './': the page is served from /out-vite/, not from the site's root
    await vite.mod!.build({ root: app, base: './', configFile: false, mode: 'production', logLevel: 'warn', customLogger: logger, build: { outDir: join(tmp, 'out-vite'), emptyOutDir: true } });
    expect(warnings).toEqual([]);
    const wasm = checkOutput(join(tmp, 'out-vite'));
    const { result, requests, failures, errors } = await runPage('out-vite/index.html');
    expect(errors).toEqual([]);
    expect(failures).toEqual([]);
    expect(result).toEqual(want);
    expect(requests).toContain(`/out-vite/${wasm}`);
  });

  it.skipIf(!webpack.mod)(`webpack ${webpack.version ?? `(skipped: ${webpack.reason})`}: builds with no warning, and the page computes`, async () => {
    const out = join(tmp, 'out-webpack');
    const stats = await new Promise<import('webpack').Stats>((resolve, reject) =>
      webpack.mod!.default(
        // production mode, target web; `performance: false` only turns off the size hints (the .wasm is 880 KiB)
        { mode: 'production', context: app, entry: './src/main.js', target: 'web', output: { path: out, clean: true }, performance: false },
        (e: Error | null, s?: import('webpack').Stats) => (e || !s ? reject(e ?? new Error('no stats')) : resolve(s)),
      ),
    );
    const info = stats.toJson({ all: false, errors: true, warnings: true });
    expect(info.errors?.map((e) => e.message) ?? []).toEqual([]);
    expect(info.warnings?.map((e) => e.message) ?? []).toEqual([]);
    writeFileSync(join(out, 'index.html'), html('main.js', false));
    const wasm = checkOutput(out);
    const { result, requests, failures, errors } = await runPage('out-webpack/index.html');
    expect(errors).toEqual([]);
    expect(failures).toEqual([]);
    expect(result).toEqual(want);
    expect(requests).toContain(`/out-webpack/${wasm}`);
  });

  it.skipIf(!vite.mod)(`Vite ${vite.version ?? `(skipped: ${vite.reason})`} dev server (dependency pre-bundling on): the page computes`, async () => {
    const server = await vite.mod!.createServer({ root: app, configFile: false, logLevel: 'silent', server: { port: 0, host: '127.0.0.1' } });
    try {
      await server.listen();
      const page = await browser.newPage();
      const failures: string[] = [];
      page.on('response', (r) => r.status() >= 400 && failures.push(`${r.status()} ${r.url()}`));
      try {
        await page.goto(server.resolvedUrls!.local[0]);
        await page.waitForFunction(() => (window as { __result?: unknown }).__result, null, { timeout: 20_000 });
        expect(failures).toEqual([]);
        expect(await page.evaluate(() => (window as { __result?: unknown }).__result)).toEqual(want);
      } finally {
        await page.close();
      }
    } finally {
      await server.close();
    }
  });

  const esbuildOptions = (entry: string, outdir: string): import('esbuild').BuildOptions & { metafile: true } => ({
    absWorkingDir: app,
    entryPoints: [entry],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    outdir,
    loader: { '.wasm': 'file' },
    logLevel: 'silent',
    metafile: true,
  });

  it.skipIf(!esbuild.mod)(`esbuild ${esbuild.version ?? `(skipped: ${esbuild.reason})`} (--loader:.wasm=file, createBackend({ wasm })): builds with no warning, and the page computes`, async () => {
    const out = join(tmp, 'out-esbuild');
    const r = await esbuild.mod!.build(esbuildOptions('src/main-esbuild.js', out));
    expect(r.errors).toEqual([]);
    expect(r.warnings).toEqual([]);
    expect(Object.keys(r.metafile.inputs).filter((f) => f.startsWith('node:'))).toEqual([]);
    writeFileSync(join(out, 'index.html'), html('main-esbuild.js', true));
    const wasm = checkOutput(out);
    const { result, requests, failures, errors } = await runPage('out-esbuild/index.html');
    expect(errors).toEqual([]);
    expect(failures).toEqual([]);
    expect(result).toEqual(want);
    expect(requests).toContain(`/out-esbuild/${wasm}`);
  });

  it.skipIf(!esbuild.mod)(`esbuild ${esbuild.version ?? `(skipped: ${esbuild.reason})`} without the wasm option: builds, and the page says to pass the module's URL`, async () => {
    const out = join(tmp, 'out-esbuild-plain');
    const r = await esbuild.mod!.build(esbuildOptions('src/main.js', out));
    expect(r.errors).toEqual([]);
    expect(r.warnings).toEqual([]);
    expect(listFiles(out).filter((f) => f.endsWith('.wasm'))).toEqual([]); // esbuild does not follow new URL(..., import.meta.url)
    writeFileSync(join(out, 'index.html'), html('main.js', true));
    const { result, errors } = await runPage('out-esbuild-plain/index.html');
    expect(errors).toEqual([]);
    expect(String(result.error)).toMatch(
      /wasm: the wasm module failed to load from .*moe_wasm_bg\.wasm: fetching .* failed: HTTP 404 \(if a bundler did not emit the file, as esbuild does not, import moe-dispatch\/moe_wasm_bg\.wasm as a file and pass its URL: createBackend\(\{ wasm \}\)\)/,
    );
  });
});

if (!built) it.skip('bundlers: dist/ or pkg/wasm/ is not built (run npm run build)', () => {});
if (!haveChromium) it.skip(`bundlers: no Chromium at ${CHROMIUM} (scripts/setup.sh installs Debian's; MOE_CHROMIUM points at another)`, () => {});
