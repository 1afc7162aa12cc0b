#!/usr/bin/env node
/**
 * `npm run demo:web`: serves the routing demo (demo/index.html) on localhost. It runs entirely
 * in the browser, on the wasm backend (dist/browser.js + pkg/wasm/). Build first (npm run build).
 * Port: first argument or $PORT, default 5180.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';

import { ROOT, serve } from './static-server.mjs';

for (const need of ['dist/browser.js', 'pkg/wasm/moe_wasm_bg.wasm']) {
  if (!existsSync(join(ROOT, need))) {
    console.error(`${need} is missing: run npm run build first`);
    process.exit(1);
  }
}
const port = Number(process.argv[2] ?? process.env.PORT ?? 5180);
const { url } = await serve({ port });
console.log(`moe-dispatch routing demo: ${url}demo/   (Ctrl-C to stop)`);
