/**
 * One worker of `createAsyncBackend` (ts/async.ts): creates its backend, then runs the calls the
 * main thread posts, one at a time, and posts back each result (its buffers transferred) or
 * error (class and message).
 */
import { parentPort, workerData } from 'node:worker_threads';

import type { Backend } from './backend.js';
import { createBackend } from './index.js';

interface Call {
  id: number;
  op: string;
  args: unknown[];
}

/** The ArrayBuffers of a result's TypedArrays, to transfer instead of copy (each once). */
function buffers(value: unknown, out: Set<ArrayBuffer>, depth = 0): Set<ArrayBuffer> {
  if (ArrayBuffer.isView(value)) {
    if (value.buffer instanceof ArrayBuffer && value.byteOffset === 0 && value.byteLength === value.buffer.byteLength) out.add(value.buffer);
  } else if (typeof value === 'object' && value !== null && depth < 4) {
    for (const v of Object.values(value)) buffers(v, out, depth + 1);
  }
  return out;
}

const port = parentPort;
if (!port) throw new Error('async-worker.js runs as a worker of createAsyncBackend');

let backend: Backend;
try {
  backend = await createBackend({ prefer: (workerData as { prefer?: never }).prefer });
  port.postMessage({ ready: true, name: backend.name });
} catch (e) {
  port.postMessage({ ready: false, error: (e as Error).message });
  process.exit(0);
}

port.on('message', (call: Call) => {
  try {
    const f = (backend as unknown as Record<string, unknown>)[call.op];
    if (typeof f !== 'function') throw new TypeError(`${call.op}: not an op of the ${backend.name} backend`);
    const result = (f as (...a: unknown[]) => unknown).apply(backend, call.args);
    port.postMessage({ id: call.id, result }, [...buffers(result, new Set())]);
  } catch (e) {
    const err = e as Error;
    port.postMessage({ id: call.id, error: { name: err instanceof TypeError ? 'TypeError' : err instanceof RangeError ? 'RangeError' : 'Error', message: err.message } });
  }
});
