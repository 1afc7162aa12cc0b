/**
 * The file access that only Node.js has, behind a hook, so that no module the browser entry
 * reaches imports a `node:` module (statically or dynamically: a bundler follows both, and
 * esbuild fails on `node:fs/promises` for a browser build).
 *
 * The Node entry registers Node's `fs`/`path` (`node-files.ts`, imported by `index.ts`). The
 * wasm loader reads `pkg/wasm/moe_wasm_bg.wasm` from disk through it, and `fromPretrained`
 * reads a config by path. Where nobody registered them (the browser entry under Node, e.g. a
 * test runner with a DOM environment), `process.getBuiltinModule` (Node >= 20.16) gives the
 * same modules without an import a bundler could see; in a browser there is neither, and the
 * callers say so.
 */

/** What the library needs from a file system. */
export interface NodeFiles {
  /** The bytes of a file, by path or `file:` URL. */
  readFile(file: string | URL): Promise<Uint8Array>;
  /** A file as UTF-8 text. */
  readText(file: string): Promise<string>;
  isDirectory(path: string): Promise<boolean>;
  join(dir: string, name: string): string;
  dirname(path: string): string;
}

let registered: NodeFiles | undefined;

/** Called by the Node entry (`node-files.ts`). */
export function setNodeFiles(files: NodeFiles): void {
  registered = files;
}

interface FsPromises {
  readFile(file: string | URL, encoding?: 'utf8'): Promise<Uint8Array | string>;
  stat(path: string): Promise<{ isDirectory(): boolean }>;
}
interface Path {
  join(...parts: string[]): string;
  dirname(path: string): string;
}

/** The registered file access, else Node's own through `process.getBuiltinModule`, else undefined (a browser). */
export function nodeFiles(): NodeFiles | undefined {
  if (registered) return registered;
  const proc = (globalThis as { process?: { versions?: { node?: string }; getBuiltinModule?: (id: string) => unknown } }).process;
  if (typeof proc?.versions?.node !== 'string' || typeof proc.getBuiltinModule !== 'function') return undefined;
  const fs = proc.getBuiltinModule('fs/promises') as FsPromises | undefined;
  const path = proc.getBuiltinModule('path') as Path | undefined;
  if (!fs || !path) return undefined;
  registered = {
    readFile: async (file) => (await fs.readFile(file)) as Uint8Array,
    readText: async (file) => (await fs.readFile(file, 'utf8')) as string,
    isDirectory: async (p) => (await fs.stat(p)).isDirectory(),
    join: (dir, name) => path.join(dir, name),
    dirname: (p) => path.dirname(p),
  };
  return registered;
}
