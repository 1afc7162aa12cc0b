/**
 * A tiny static file server for the demo page and the browser benchmark: serves `demo/`,
 * `dist/`, `pkg/` and `bench/` of the repo (nothing else) on 127.0.0.1, with the MIME types
 * browsers insist on (`application/wasm` for streaming compilation, `text/javascript` for
 * modules). No framework, no bundler: the page imports dist/browser.js as it is.
 */
import { createReadStream, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('..', import.meta.url));
const SERVED = ['demo', 'dist', 'pkg', 'bench'];
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.map': 'application/json; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
};

/** Starts the server; resolves to `{ url, close() }`. Port 0 picks a free one. */
export function serve({ port = 0, host = '127.0.0.1', root = ROOT } = {}) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname);
    if (path === '/' || path === '/demo') {
      res.writeHead(302, { location: '/demo/' }).end();
      return;
    }
    const rel = normalize(path).replace(/^[/\\]+/, '');
    const file = join(root, rel.endsWith('/') || rel === '' ? join(rel, 'index.html') : rel);
    const top = rel.split(/[/\\]/)[0];
    let ok = SERVED.includes(top) && file.startsWith(join(root, top) + sep);
    let size = 0;
    if (ok) {
      try {
        const st = statSync(file);
        ok = st.isFile();
        size = st.size;
      } catch {
        ok = false;
      }
    }
    if (!ok) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: ${path}\n`);
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'content-length': size, 'cache-control': 'no-store' });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      const { port: p } = server.address();
      resolve({ url: `http://${host}:${p}/`, close: () => new Promise((r) => server.close(() => r())) });
    });
  });
}
