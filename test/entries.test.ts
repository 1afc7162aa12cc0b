/**
 * The two package entries: the browser one (ts/browser.ts -> dist/browser.js) has the Node
 * entry's API, minus a short list of Node-only exports, and its module graph imports no
 * `node:` module, statically or dynamically (a page would fail to load it, and esbuild refuses
 * to bundle it for a browser; checked on the built dist/ files).
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import * as browserEntry from '../ts/browser.js';
import * as nodeEntry from '../ts/index.js';

/** Exports of the Node entry that the browser entry leaves out, and why. */
const NODE_ONLY: Record<string, string> = {
  trainMoE: 'writes checkpoints with node:fs',
  progressLine: 'from ts/train.ts, which imports node:fs',
  writeLargeFile: 'writes a file with node:fs (in pieces: writeFileSync stops at 2 GiB)',
  createAsyncBackend: 'runs backends on node:worker_threads',
  isCudaBackend: 'lives in ts/backends/cuda.ts, which loads the N-API addon; there is no cuda backend in a browser',
  createExpertParallelGroup: 'NCCL between processes (the N-API addon), with a rendezvous over node:fs or node:net',
  ncclInfo: 'asks the N-API addon whether libnccl.so.2 loads',
};

const DIST = fileURLToPath(new URL('../dist/', import.meta.url));

/**
 * Every module the file imports (import ... from / export ... from / bare import / import('literal')),
 * followed through relative paths; `computed`: the `import(...)` calls whose argument is not a
 * string literal (a bundler cannot follow them).
 */
function staticGraph(entry: string): { files: string[]; bare: string[]; computed: string[] } {
  const seen = new Set<string>();
  const bare = new Set<string>();
  const computed: string[] = [];
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = readFileSync(file, 'utf8');
    const code = text.replace(/\/\*[\s\S]*?\*\/|^\s*\/\/.*$/gm, ''); // comments mention imports
    for (const m of code.matchAll(/^\s*(?:import|export)\s[^;]*?from\s*['"]([^'"]+)['"]|^\s*import\s*['"]([^'"]+)['"]|\bimport\(\s*['"]([^'"]+)['"]\s*\)/gm)) {
      const spec = m[1] ?? m[2] ?? m[3];
      if (spec.startsWith('.')) visit(resolve(dirname(file), spec));
      else bare.add(spec);
    }
    for (const m of code.matchAll(/\bimport\((?!\s*['"][^'"]+['"]\s*\))[^)]*\)/g)) computed.push(`${relative(DIST, file)}: ${m[0]}`);
  };
  visit(entry);
  return { files: [...seen].map((f) => relative(DIST, f)), bare: [...bare], computed };
}

describe('package entries', () => {
  it('the browser entry exports the Node entry API, except the Node-only exports', () => {
    const missing = Object.keys(nodeEntry).filter((k) => !(k in browserEntry) && !(k in NODE_ONLY));
    expect(missing, 'exports of ts/index.ts missing from ts/browser.ts (add them, or list them in NODE_ONLY with why)').toEqual([]);
    const extra = Object.keys(browserEntry).filter((k) => !(k in nodeEntry) && k !== 'BROWSER_UNAVAILABLE');
    expect(extra).toEqual([]);
    for (const k of Object.keys(NODE_ONLY)) expect(k in nodeEntry, `${k} is still a Node entry export`).toBe(true);
  });

  it('the browser entry works in Node too, on wasm only, and says why not cpu', async () => {
    const infos = await browserEntry.backendInfo();
    expect(infos.find((i) => i.name === 'wasm')?.available).toBe(true);
    expect(infos.find((i) => i.name === 'cpu')).toMatchObject({ available: false, reason: browserEntry.BROWSER_UNAVAILABLE.cpu });
    expect((await browserEntry.createBackend()).name).toBe('wasm');
  });

  it.skipIf(!existsSync(`${DIST}browser.js`))('dist/browser.js imports no node: module and no package, statically or dynamically, and no computed path', () => {
    const { files, bare, computed } = staticGraph(`${DIST}browser.js`);
    expect(files).toContain('backends/wasm.js');
    expect(files).toContain('../pkg/wasm/moe_wasm_factory.js'); // the glue, reached by a static import
    expect(files).toContain('platform.js');
    expect(files).not.toContain('backends/native.js');
    expect(files).not.toContain('node-files.js');
    expect(bare).toEqual([]);
    expect(computed).toEqual([]);
    // The graph check itself catches a node: import: the Node entry has them (node-files.js registers fs for platform.js).
    const node = staticGraph(`${DIST}index.js`);
    expect(node.bare).toContain('node:fs');
    expect(node.bare).toContain('node:fs/promises');
    expect(node.files).toContain('node-files.js');
  });
});
