/**
 * Asynchronous backends: every op returns a Promise, and calls run in parallel on worker threads,
 * each with its own backend of the same kind, so the event loop stays free while the Rust core
 * (or the GPU) works, and independent calls overlap. Results are the synchronous backend's, bit
 * for bit (each call runs the same code on a copy of its arguments; the GPU suite and
 * test/async.test.ts check it against sequential calls).
 *
 *   const moe = await createAsyncBackend({ prefer: 'cpu', threads: 4 });
 *   const [a, b] = await Promise.all([moe.permute(t1, m1), moe.permute(t2, m2)]);
 *   await moe.close();
 *
 * Arguments are copied to the worker (structured clone); results are moved back. Device tensors
 * live in the thread that made them, so they cannot be passed here: with the cuda backend, the
 * synchronous ops on device tensors already return before their kernels finish. Node.js only.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

import type { Backend, BackendName } from './backend.js';
import { containsDeviceTensor } from './device.js';
import type { Prefer } from './entry.js';

/** Each op of `Backend`, returning a Promise of its result. */
export type AsyncOps = {
  [K in keyof Backend as Backend[K] extends (...args: never[]) => unknown ? K : never]: Backend[K] extends (...args: infer A) => infer R ? (...args: A) => Promise<R> : never;
};

export interface AsyncBackend extends AsyncOps {
  readonly name: BackendName;
  /** Worker threads. */
  readonly threads: number;
  /** Calls queued or running. */
  readonly pending: number;
  /** Stops the workers; calls still pending are rejected. */
  close(): Promise<void>;
}

export interface CreateAsyncBackendOptions {
  /** As `createBackend`'s (default 'auto'). */
  prefer?: Prefer;
  /** Worker threads (default: min(4, available parallelism)). */
  threads?: number;
}

interface Pending {
  resolve(v: unknown): void;
  reject(e: Error): void;
  worker: number;
}

const ERRORS: Record<string, ErrorConstructor> = { TypeError, RangeError, Error };

function workerUrl(): URL {
  const here = new URL('./async-worker.js', import.meta.url);
  if (existsSync(fileURLToPath(here))) return here;
  // running from the TypeScript sources (tests): the built worker in dist/
  return new URL('../dist/async-worker.js', import.meta.url);
}

/** Creates an asynchronous backend (see the module comment). */
export async function createAsyncBackend(options: CreateAsyncBackendOptions = {}): Promise<AsyncBackend> {
  if (typeof options !== 'object' || options === null) throw new TypeError(`options: expected an object, got ${options === null ? 'null' : typeof options}`);
  const threads = options.threads ?? Math.min(4, availableParallelism());
  if (!Number.isSafeInteger(threads) || threads < 1 || threads > 256) throw new RangeError(`options.threads: expected an integer from 1 to 256, got ${String(options.threads)}`);
  const url = workerUrl();
  const workers = Array.from({ length: threads }, () => new Worker(url, { workerData: { prefer: options.prefer ?? 'auto' } }));
  let name: BackendName;
  try {
    const names = await Promise.all(
      workers.map(
        (w) =>
          new Promise<BackendName>((resolve, reject) => {
            w.once('message', (m: { ready: boolean; name?: BackendName; error?: string }) => (m.ready ? resolve(m.name!) : reject(new Error(m.error))));
            w.once('error', reject);
          }),
      ),
    );
    name = names[0];
  } catch (e) {
    await Promise.all(workers.map((w) => w.terminate()));
    throw e;
  }
  const pending = new Map<number, Pending>();
  const load = new Array<number>(threads).fill(0);
  let nextId = 0;
  let closed = false;
  const settle = (id: number) => {
    const p = pending.get(id);
    if (!p) return undefined;
    pending.delete(id);
    if (--load[p.worker] === 0) workers[p.worker].unref();
    return p;
  };
  workers.forEach((w) => {
    w.unref();
    w.on('message', (m: { id: number; result?: unknown; error?: { name: string; message: string } }) => {
      const p = settle(m.id);
      if (!p) return;
      if (m.error) p.reject(new (ERRORS[m.error.name] ?? Error)(m.error.message));
      else p.resolve(m.result);
    });
    w.on('error', (e) => {
      for (const [id, p] of pending) if (workers[p.worker] === w) settle(id)?.reject(e);
    });
  });
  function call(op: string, args: unknown[]): Promise<unknown> {
    if (closed) return Promise.reject(new Error(`${op}: this async backend was closed`));
    if (args.some((a) => containsDeviceTensor(a))) {
      return Promise.reject(new TypeError(`${op}: device tensors cannot go to the async backend's workers (use the cuda backend's own ops: they return before their kernels finish)`));
    }
    const last = args[args.length - 1];
    if (typeof last === 'object' && last !== null && !ArrayBuffer.isView(last) && (last as { out?: unknown }).out !== undefined) {
      return Promise.reject(new TypeError(`${op}: options.out: the async backend's workers get copies of their arguments, so they cannot write into caller-owned outputs (use a synchronous backend)`));
    }
    let worker = 0;
    for (let i = 1; i < threads; i++) if (load[i] < load[worker]) worker = i;
    const id = nextId++;
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject, worker });
      if (load[worker]++ === 0) workers[worker].ref();
      try {
        workers[worker].postMessage({ id, op, args });
      } catch (e) {
        settle(id);
        // an argument that cannot be cloned (a function, a class instance with private state)
        reject(new TypeError(`${op}: the arguments cannot be sent to a worker: ${(e as Error).message}`));
      }
    });
  }
  const target = {
    name,
    threads,
    get pending() {
      return pending.size;
    },
    async close() {
      closed = true;
      for (const id of [...pending.keys()]) settle(id)?.reject(new Error('the async backend was closed before this call finished'));
      await Promise.all(workers.map((w) => w.terminate()));
    },
  };
  return new Proxy(target, {
    get(t, key, receiver) {
      if (typeof key !== 'string' || key in t) return Reflect.get(t, key, receiver);
      if (key === 'then') return undefined; // not a thenable
      return (...args: unknown[]) => call(key, args);
    },
  }) as unknown as AsyncBackend;
}
