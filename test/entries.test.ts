/**
 * The two package entries: the browser one (ts/browser.ts -> dist/browser.js) has the Node
 * entry's API, minus a short list of Node-only exports, and its module graph imports no
 * `node:` module (a page would fail to load it; checked statically on the built dist/ files).
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import * as browserEntry from '../ts/browser.js';
import * as nodeEntry from '../ts/index.js';

/** Exports of the Node entry that the browser entry leaves out, and why. */
const NODE_ONLY: Record<string, string> = {
  trainMoE: 'writes checkpoints with node:fs',
  progressLine: 'from ts/train.ts, which imports node:fs',
  createAsyncBackend: 'runs backends on node:worker_threads',
  isCudaBackend: 'lives in ts/backends/cuda.ts, which loads the N-API addon; there is no cuda backend in a browser',
};

const DIST = fileURLToPath(new URL('../dist/', import.meta.url));

/** Every module the file imports, statically (import ... from / export ... from / bare import), followed through relative paths. */
function staticGraph(entry: string): { files: string[]; bare: string[] } {
  const seen = new Set<string>();
  const bare = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(/^\s*(?:import|export)\s[^;]*?from\s*['"]([^'"]+)['"]|^\s*import\s*['"]([^'"]+)['"]/gm)) {
      const spec = m[1] ?? m[2];
      if (spec.startsWith('.')) visit(resolve(dirname(file), spec));
      else bare.add(spec);
    }
  };
  visit(entry);
  return { files: [...seen].map((f) => f.slice(DIST.length)), bare: [...bare] };
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

  it.skipIf(!existsSync(`${DIST}browser.js`))('dist/browser.js imports no node: module and no package, statically', () => {
    const { files, bare } = staticGraph(`${DIST}browser.js`);
    expect(files).toContain('backends/wasm.js');
    expect(files).not.toContain('backends/native.js');
    expect(bare).toEqual([]);
    // The graph check itself catches a node: import: the Node entry has them.
    expect(staticGraph(`${DIST}index.js`).bare).toContain('node:fs');
  });
});
