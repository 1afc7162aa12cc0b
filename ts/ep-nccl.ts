/**
 * An expert-parallel group over NCCL (Node only): N processes, one GPU each, join a group and
 * exchange through NCCL (the native addon's `ncclCommStart` ... over crates/moe-cuda/src/nccl.rs:
 * libnccl.so.2 opened at run time). The result is an {@link ExpertParallelGroup}, so `dispatch`,
 * `combine` and their backward passes (ts/ep.ts) run on it unchanged.
 *
 *   const group = await createExpertParallelGroup({ rank, size, rendezvous: '/tmp/run-1/id', timeoutMs: 60_000 });
 *   const d = await dispatch(group, moe, tokens, routing, { numExperts });
 *   ...
 *   await group.destroy();
 *
 * `rendezvous` is a file path or `tcp://127.0.0.1:PORT` (ts/rendezvous.ts): rank 0 makes NCCL's
 * unique id and publishes it there. The communicator is initialised non-blocking and polled from
 * a worker thread: if a rank has not joined when `timeoutMs` passes, every waiting rank rejects
 * with an {@link ExpertParallelTimeoutError} naming the ranks that never reached the rendezvous,
 * and the communicator is aborted. Each collective has the same limit: a rank that dies or stops
 * calling makes the others reject (naming the ranks whose processes exited) instead of hanging.
 *
 * NCCL's NVLink multicast stays off: `NCCL_NVLS_ENABLE=0` is set in this process before NCCL
 * starts (the addon sets it too). The buffers go through the GPU: each collective uploads, runs
 * NCCL on the device and downloads (host tensors in, host tensors out, like the in-process group).
 */
import { hostname } from 'node:os';

import { type DeviceTensor, type NativeCudaTensor, nativeHandle, rethrowNative, wrapDevice } from './device.js';
import { type AllToAllVDeviceOptions, checkDeviceRows, countsAgreedArg, ExpertParallelTimeoutError, type ExpertParallelGroup, type RowDType } from './ep.js';
import { loadNative } from './backends/native.js';
import { parseRendezvous, rankList, rendezvous, type RendezvousAddress } from './rendezvous.js';

export interface ExpertParallelGroupOptions {
  /** This process's rank, `0 <= rank < size`. */
  rank: number;
  /** Processes in the group (one GPU each). */
  size: number;
  /**
   * Where the ranks meet: a file path (rank 0 writes NCCL's id there; use a fresh path per run)
   * or `tcp://127.0.0.1:PORT` (rank 0 listens there). Every rank gives the same one.
   */
  rendezvous: string;
  /**
   * How long joining the group, and then each collective, may take (default 60000 ms); after
   * that the call rejects with an {@link ExpertParallelTimeoutError} and the group is aborted.
   */
  timeoutMs?: number;
}

/** An {@link ExpertParallelGroup} whose transport is NCCL. */
export interface NcclExpertParallelGroup extends ExpertParallelGroup {
  readonly transport: 'nccl';
  /** NCCL's version, e.g. "2.27.3". */
  readonly ncclVersion: string;
  /** Finalises and frees the communicator (after the calls already made); an aborted group is just released. */
  destroy(): Promise<void>;
  /** Aborts the communicator now: calls in flight and later ones reject. */
  abort(): void;
}

/** What `ncclInfo()` says: whether libnccl.so.2 loads in this process (no GPU is opened). */
export interface NcclInfo {
  available: boolean;
  reason?: string;
  version?: string;
  path?: string;
}

interface NativeComm {
  readonly rank: number;
  readonly size: number;
  waitReady(timeoutMs: number): Promise<void>;
  allGather(values: Int32Array, timeoutMs: number): Promise<Int32Array>;
  allToAllV(send: Uint8Array, sendBytes: number[], recvBytes: number[], timeoutMs: number): Promise<Uint8Array>;
  allToAllVDevice(send: NativeCudaTensor, sendRows: number[], recvRows: number[], countsAgreed: boolean, timeoutMs: number): Promise<NativeCudaTensor>;
  destroy(timeoutMs: number): Promise<void>;
  abort(): void;
}

interface NcclAddon {
  ncclInfo(): { available: boolean; reason?: string | null; version?: string | null; path?: string | null };
  ncclUniqueId(): Uint8Array;
  ncclCommStart(id: Uint8Array, rank: number, size: number): NativeComm;
}

const OP = 'createExpertParallelGroup';
const DEFAULT_TIMEOUT_MS = 60_000;

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an Array';
  if (ArrayBuffer.isView(value)) return value.constructor.name;
  return typeof value;
}

function addon(): { addon?: NcclAddon; reason?: string } {
  const loaded = loadNative();
  if (!loaded.binding) return { reason: loaded.reason };
  const a = loaded.binding as unknown as Partial<NcclAddon>;
  if (typeof a.ncclInfo !== 'function' || typeof a.ncclCommStart !== 'function') return { reason: 'the native addon has no NCCL functions (an old build: run npm run build)' };
  return { addon: a as NcclAddon };
}

/** Whether NCCL (libnccl.so.2) loads here, its version and path, or why not. Opens no GPU. */
export function ncclInfo(): NcclInfo {
  process.env.NCCL_NVLS_ENABLE = '0';
  const a = addon();
  if (!a.addon) return { available: false, reason: a.reason };
  const i = a.addon.ncclInfo();
  return i.available ? { available: true, version: i.version ?? undefined, path: i.path ?? undefined } : { available: false, reason: i.reason ?? 'no reason given' };
}

interface Checked {
  rank: number;
  size: number;
  address: RendezvousAddress;
  timeoutMs: number;
}

function integer(value: unknown, arg: string, min: number): number {
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${describe(value)}`);
  if (!Number.isSafeInteger(value) || value < min) throw new RangeError(`${arg}: expected an integer >= ${min}, got ${value}`);
  return value;
}

/** The options checked (TypeError/RangeError naming them, prefixed with the op); no NCCL needed. */
export function checkGroupOptions(options: unknown): Checked {
  try {
    if (typeof options !== 'object' || options === null || Array.isArray(options)) throw new TypeError(`options: expected { rank, size, rendezvous, timeoutMs? }, got ${describe(options)}`);
    const known = ['rank', 'size', 'rendezvous', 'timeoutMs'];
    for (const key of Object.keys(options)) if (!known.includes(key)) throw new TypeError(`options.${key}: not an option of ${OP} (known: ${known.join(', ')})`);
    const o = options as Partial<ExpertParallelGroupOptions>;
    if (o.size === undefined) throw new TypeError('options.size: expected a number (required), got undefined');
    if (o.rank === undefined) throw new TypeError('options.rank: expected a number (required), got undefined');
    const size = integer(o.size, 'options.size', 1);
    if (size > 2 ** 31 - 1) throw new RangeError(`options.size: expected at most 2^31 - 1 ranks, got ${size}`);
    const rank = integer(o.rank, 'options.rank', 0);
    if (rank >= size) throw new RangeError(`options.rank: expected 0 <= rank < size = ${size}, got ${rank}`);
    if (o.rendezvous === undefined) throw new TypeError("options.rendezvous: expected a file path or 'tcp://127.0.0.1:PORT' (required), got undefined");
    const address = parseRendezvous(o.rendezvous, 'options.rendezvous');
    let timeoutMs = DEFAULT_TIMEOUT_MS;
    if (o.timeoutMs !== undefined) {
      if (typeof o.timeoutMs !== 'number') throw new TypeError(`options.timeoutMs: expected a number, got ${describe(o.timeoutMs)}`);
      if (!Number.isFinite(o.timeoutMs) || o.timeoutMs <= 0 || o.timeoutMs > 2 ** 31 - 1) {
        throw new RangeError(`options.timeoutMs: expected a number of milliseconds > 0 and <= 2^31 - 1, got ${o.timeoutMs}`);
      }
      timeoutMs = o.timeoutMs;
    }
    return { rank, size, address, timeoutMs };
  } catch (e) {
    if ((e instanceof TypeError || e instanceof RangeError) && !e.message.startsWith(`${OP}:`)) throw new (e.constructor as ErrorConstructor)(`${OP}: ${e.message}`);
    throw e;
  }
}

const codeOf = (e: unknown) => (e instanceof Error ? (e as { code?: unknown }).code : undefined);

/** A 31-bit hash of the host name: which ranks share this machine (their pids can be checked). */
function hostKey(): number {
  let h = 0x811c9dc5;
  for (const c of hostname()) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193);
  return h & 0x7fffffff;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return codeOf(e) === 'EPERM';
  }
}

/**
 * Joins the expert-parallel group `{ rank, size }` over NCCL on this process's GPU (device 0 of
 * those `CUDA_VISIBLE_DEVICES` shows, or `MOE_DISPATCH_CUDA_DEVICE`). Every rank calls it with the
 * same `size` and `rendezvous`. Resolves when all ranks joined; rejects with an
 * {@link ExpertParallelTimeoutError} naming the ranks that did not arrive within `timeoutMs`, an
 * `Error` saying why where NCCL or CUDA is unavailable, and TypeError/RangeError for bad options.
 */
export async function createExpertParallelGroup(options: ExpertParallelGroupOptions): Promise<NcclExpertParallelGroup> {
  const { rank, size, address, timeoutMs } = checkGroupOptions(options);
  process.env.NCCL_NVLS_ENABLE = '0';
  const a = addon();
  if (!a.addon) throw new Error(`${OP}: NCCL is unavailable: ${a.reason}`);
  const native = a.addon;
  const info = native.ncclInfo();
  if (!info.available) throw new Error(`${OP}: ${info.reason ?? 'NCCL is unavailable'}`);
  const start = Date.now();
  const deadline = start + timeoutMs;
  const where = address.kind === 'file' ? address.path : `tcp://${address.host}:${address.port}`;
  const rv = await rendezvous(
    address,
    rank,
    size,
    () => {
      try {
        return native.ncclUniqueId();
      } catch (e) {
        return rethrowNcclError(OP, e);
      }
    },
    deadline,
    OP,
  );
  let comm: NativeComm | undefined;
  try {
    try {
      comm = native.ncclCommStart(rv.id, rank, size);
      await comm.waitReady(Math.max(1, deadline - Date.now()));
    } catch (e) {
      if (codeOf(e) === 'NcclTimeout') {
        const missing = rv.missing();
        const waited = Date.now() - start;
        const message = missing.length
          ? `${OP}: rank ${rank} of ${size}: ${rankList(missing)} did not join the group at ${where} within ${waited} ms; the communicator is aborted`
          : `${OP}: rank ${rank} of ${size}: every rank reached the rendezvous at ${where}, but NCCL's initialisation did not complete within ${waited} ms; the communicator is aborted`;
        throw new ExpertParallelTimeoutError(message, missing);
      }
      rethrowNcclError(OP, e);
    }
  } finally {
    await rv.close();
  }
  const group = new NcclGroup(comm!, rank, size, timeoutMs, info.version ?? 'unknown');
  await group.meet();
  return group;
}

/** A native error as the class its code names (TypeError, RangeError), else an Error with the op in front and the code kept. */
function rethrowNcclError(op: string, e: unknown): never {
  const code = codeOf(e);
  if (code === 'TypeError' || code === 'RangeError') rethrowNative(op, e);
  if (e instanceof Error) {
    const err = new Error(e.message.startsWith(`${op}:`) ? e.message : `${op}: ${e.message}`);
    if (typeof code === 'string') (err as { code?: string }).code = code;
    throw err;
  }
  throw e;
}

/** `label: op` for messages (just `op` when the caller gave no label). */
const at = (label: string, op: string) => (label === op ? op : `${label}: ${op}`);

function labelArg(label: unknown, op: string): string {
  if (label === undefined) return op;
  if (typeof label !== 'string') throw new TypeError(`${op}: label: expected a string, got ${describe(label)}`);
  return label;
}

class NcclGroup implements NcclExpertParallelGroup {
  readonly transport = 'nccl' as const;
  readonly #comm: NativeComm;
  readonly #timeoutMs: number;
  /** The calls, one after another (NCCL takes them in order; so do the other ranks). */
  #queue: Promise<unknown> = Promise.resolve();
  #failed?: Error;
  #destroyed = false;
  /** Each rank's pid and host key (from the first all-gather), for naming ranks whose process exited. */
  #peers?: Int32Array[];

  constructor(
    comm: NativeComm,
    readonly rank: number,
    readonly size: number,
    timeoutMs: number,
    readonly ncclVersion: string,
  ) {
    this.#comm = comm;
    this.#timeoutMs = timeoutMs;
  }

  /** The first collective: every rank's pid and host (also checks that the exchange works). */
  async meet(): Promise<void> {
    this.#peers = await this.allGather(Int32Array.of(process.pid, hostKey()), OP);
  }

  /** The ranks whose process (on this machine) has exited. */
  #deadRanks(): number[] {
    const p = this.#peers;
    if (!p) return [];
    const me = hostKey();
    return Array.from({ length: this.size }, (_, r) => r).filter((r) => r !== this.rank && p[r][1] === me && !alive(p[r][0]));
  }

  #run<T>(label: string, op: string, f: () => Promise<T>): Promise<T> {
    const run = async (): Promise<T> => {
      if (this.#destroyed) throw new Error(`${at(label, op)}: rank ${this.rank}: the expert-parallel group was destroyed`);
      if (this.#failed) throw new Error(`${at(label, op)}: rank ${this.rank}: the expert-parallel group was aborted (${this.#failed.message})`);
      try {
        return await f();
      } catch (e) {
        const code = codeOf(e);
        // the native messages start with the collective's name
        const message = (e as Error).message?.startsWith(`${op}: `) ? (e as Error).message.slice(op.length + 2) : String((e as Error).message ?? e);
        if (code === 'TypeError') throw new TypeError(`${at(label, op)}: ${message}`);
        if (code === 'RangeError') throw new RangeError(`${at(label, op)}: ${message}`);
        let err: Error;
        if (code === 'NcclTimeout') {
          const dead = this.#deadRanks();
          const why = dead.length ? `${rankList(dead)} exited` : "every rank's process is alive (one stopped making the same calls in the same order?)";
          err = new ExpertParallelTimeoutError(`${at(label, op)}: rank ${this.rank} of ${this.size}: not complete within ${this.#timeoutMs} ms: ${why}; the group is aborted`, dead);
        } else {
          err = new Error(`${at(label, op)}: ${message}`);
          if (typeof code === 'string') (err as { code?: string }).code = code;
        }
        this.#failed ??= err;
        throw err;
      }
    };
    const p = this.#queue.then(run, run);
    this.#queue = p.catch(() => undefined);
    return p;
  }

  allGather(values: Int32Array, label?: string): Promise<Int32Array[]> {
    return new Promise<Int32Array[]>((resolve, reject) => {
      const l = labelArg(label, 'allGather');
      if (!(values instanceof Int32Array)) throw new TypeError(`${at(l, 'allGather')}: values: expected an Int32Array, got ${describe(values)}`);
      const copy = values.slice();
      this.#run(l, 'allGather', async () => {
        const flat = await this.#comm.allGather(copy, this.#timeoutMs);
        const n = copy.length;
        return Array.from({ length: this.size }, (_, r) => flat.slice(r * n, (r + 1) * n));
      }).then(resolve, reject);
    });
  }

  allToAllV(send: readonly Uint8Array[], recvBytes: readonly number[], label?: string): Promise<Uint8Array[]> {
    return new Promise<Uint8Array[]>((resolve, reject) => {
      const l = labelArg(label, 'allToAllV');
      const n = this.size;
      const op = at(l, 'allToAllV');
      if (!Array.isArray(send)) throw new TypeError(`${op}: send: expected an array of ${n} Uint8Arrays, got ${describe(send)}`);
      if (send.length !== n) throw new RangeError(`${op}: send: expected one buffer per rank (${n}), got ${send.length}`);
      send.forEach((b, j) => {
        if (!(b instanceof Uint8Array)) throw new TypeError(`${op}: send[${j}]: expected a Uint8Array, got ${describe(b)}`);
      });
      if (!Array.isArray(recvBytes)) throw new TypeError(`${op}: recvBytes: expected an array of ${n} byte counts, got ${describe(recvBytes)}`);
      if (recvBytes.length !== n) throw new RangeError(`${op}: recvBytes: expected one count per rank (${n}), got ${recvBytes.length}`);
      recvBytes.forEach((b, s) => {
        integer(b, `${op}: recvBytes[${s}]`, 0);
      });
      const sizes = send.map((b) => b.byteLength);
      const flat = new Uint8Array(sizes.reduce((a, b) => a + b, 0));
      let off = 0;
      for (const b of send) {
        flat.set(b, off);
        off += b.byteLength;
      }
      const want = [...recvBytes];
      this.#run(l, 'allToAllV', async () => {
        const got = await this.#comm.allToAllV(flat, sizes, want, this.#timeoutMs);
        let o = 0;
        return want.map((b) => {
          const part = new Uint8Array(got.buffer, got.byteOffset + o, b);
          o += b;
          return part;
        });
      }).then(resolve, reject);
    });
  }

  allToAllVDevice<D extends RowDType>(send: DeviceTensor<D>, sendRows: readonly number[], recvRows: readonly number[], label?: string, options?: AllToAllVDeviceOptions): Promise<DeviceTensor<D>> {
    return new Promise<DeviceTensor<D>>((resolve, reject) => {
      const l = labelArg(label, 'allToAllVDevice');
      checkDeviceRows(at(l, 'allToAllVDevice'), this.size, send, sendRows, recvRows);
      const agreed = countsAgreedArg(options, at(l, 'allToAllVDevice'));
      const handle = nativeHandle(send);
      const [sent, want] = [[...sendRows], [...recvRows]];
      this.#run(l, 'allToAllVDevice', async () => {
        // (send stays referenced here until NCCL has read it)
        const got = await this.#comm.allToAllVDevice(handle, sent, want, agreed, this.#timeoutMs);
        return wrapDevice<D>(got);
      }).then(resolve, reject);
    });
  }

  destroy(): Promise<void> {
    const run = async () => {
      if (this.#destroyed) return;
      this.#destroyed = true;
      try {
        await this.#comm.destroy(this.#timeoutMs);
      } catch (e) {
        rethrowNcclError('destroy', e);
      }
    };
    const p = this.#queue.then(run, run);
    this.#queue = p.catch(() => undefined);
    return p;
  }

  abort(): void {
    this.#failed ??= new Error('aborted by the caller');
    this.#comm.abort();
  }
}
