/**
 * Node's file access for the library (see `platform.ts`), registered on import. Imported by
 * the Node entry (`index.ts`) only: the browser entry never reaches this module.
 */
import { readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';

import { setNodeFiles } from './platform.js';

setNodeFiles({
  readFile: (file) => readFile(file),
  readText: (file) => readFile(file, 'utf8'),
  isDirectory: async (path) => (await stat(path)).isDirectory(),
  join: (dir, name) => join(dir, name),
  dirname: (path) => dirname(path),
});
