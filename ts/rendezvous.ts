/**
 * The rendezvous of an NCCL expert-parallel group (Node only): how rank 0's NCCL unique id
 * reaches the other ranks, and which ranks have arrived (what names the ranks that did not join
 * when the group's initialisation times out). No NCCL here: the id is opaque bytes.
 *
 * - A file path: rank 0 writes the id to a temporary file beside it and renames it into place
 *   (atomic: a reader sees all of it or nothing); the others poll for it until the deadline,
 *   then each leaves a marker `<path>.rank<r>` (holding the id, so an earlier run's markers do
 *   not count). Rank 0 removes the file and the markers when it closes the rendezvous (its init
 *   completed or failed). Use a fresh path per run: a rank started before rank 0 could read an
 *   id a crashed run left there.
 * - `tcp://HOST:PORT` (a loopback host): rank 0 listens there and serves the id to each rank
 *   that connects and says `join <rank> <size>`; the others connect, retrying until the
 *   deadline, and keep the connection open until the group is up: rank 0 sends every
 *   connection the ranks present (`joined 0,2,3`) whenever that changes, and a closed
 *   connection is a rank gone.
 */
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';

import { ExpertParallelTimeoutError } from './ep.js';

export type RendezvousAddress = { kind: 'file'; path: string } | { kind: 'tcp'; host: string; port: number };

const LOOPBACK = new Set(['127.0.0.1', 'localhost', '::1', '[::1]']);
const FILE_MAGIC = 'moe-dispatch-nccl-id 1';
/** How often a waiting rank looks again (file rendezvous, refused connections). */
const POLL_MS = 20;

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an Array';
  return typeof value;
}

/** Reads `rendezvous`: a file path, or `tcp://HOST:PORT` with a loopback host. TypeError/RangeError naming `arg`. */
export function parseRendezvous(value: unknown, arg = 'rendezvous'): RendezvousAddress {
  if (typeof value !== 'string') throw new TypeError(`${arg}: expected a file path or 'tcp://127.0.0.1:PORT', got ${describe(value)}`);
  if (value.length === 0) throw new RangeError(`${arg}: expected a file path or 'tcp://127.0.0.1:PORT', got an empty string`);
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) {
    if (value.includes('\0')) throw new RangeError(`${arg}: a file path cannot hold a NUL character`);
    return { kind: 'file', path: value };
  }
  const m = /^tcp:\/\/(\[[^\]]*\]|[^:/]+):([0-9]+)$/i.exec(value);
  if (!m) throw new RangeError(`${arg}: expected 'tcp://HOST:PORT' (e.g. tcp://127.0.0.1:29500) or a file path, got '${value}'`);
  const host = m[1];
  if (!LOOPBACK.has(host.toLowerCase())) {
    throw new RangeError(
      `${arg}: the host must be a loopback address (127.0.0.1, localhost, [::1]): the ranks of a group run on one machine, and the id must not be served to other machines; got '${host}'`,
    );
  }
  const port = Number(m[2]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`${arg}: the port must be 1..65535, got ${m[2]}`);
  return { kind: 'tcp', host: host.startsWith('[') ? host.slice(1, -1) : host, port };
}

/** One rank's side of a rendezvous that delivered the id. */
export interface Rendezvous {
  /** The group's id (rank 0's `makeId()`). */
  readonly id: Uint8Array;
  /** The ranks that have not arrived (or have left), as far as this rank knows; never this rank. */
  missing(): number[];
  /** Done (the group is up, or failed): rank 0 removes the file / closes the server; the others close their connection. */
  close(): Promise<void>;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const who = (ranks: readonly number[]) => (ranks.length === 1 ? `rank ${ranks[0]}` : `ranks ${ranks.join(', ')}`);
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
const others = (size: number, present: ReadonlySet<number>) => Array.from({ length: size }, (_, r) => r).filter((r) => !present.has(r));

/**
 * Meets the other ranks at `address`: rank 0 publishes `makeId()`, the others wait for it until
 * `deadline` (a `Date.now()` time), then reject with an {@link ExpertParallelTimeoutError} naming
 * rank 0. `op` prefixes messages.
 */
export async function rendezvous(address: RendezvousAddress, rank: number, size: number, makeId: () => Uint8Array, deadline: number, op = 'createExpertParallelGroup'): Promise<Rendezvous> {
  return address.kind === 'file' ? fileRendezvous(address.path, rank, size, makeId, deadline, op) : tcpRendezvous(address, rank, size, makeId, deadline, op);
}

// ---------------------------------------------------------------------------------------
// A file

function parseIdFile(text: string): { size: number; id: Uint8Array } | undefined {
  const lines = text.split('\n');
  const size = /^size ([0-9]+)$/.exec(lines[1] ?? '');
  const id = /^id ([0-9a-f]+)$/.exec(lines[2] ?? '');
  if (lines[0] !== FILE_MAGIC || !size || !id || id[1].length % 2) return undefined;
  return { size: Number(size[1]), id: Uint8Array.from(Buffer.from(id[1], 'hex')) };
}

function writeAtomically(path: string, text: string): void {
  const tmp = `${path}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  writeFileSync(tmp, text);
  try {
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
}

async function fileRendezvous(path: string, rank: number, size: number, makeId: () => Uint8Array, deadline: number, op: string): Promise<Rendezvous> {
  const marker = (r: number) => `${path}.rank${r}`;
  let id: Uint8Array;
  if (rank === 0) {
    id = makeId();
    rmSync(path, { force: true });
    try {
      writeAtomically(path, `${FILE_MAGIC}\nsize ${size}\nid ${hex(id)}\n`);
    } catch (e) {
      throw new Error(`${op}: rendezvous: rank 0 cannot write the group's id to ${path}: ${(e as Error).message}`);
    }
  } else {
    const start = Date.now();
    for (;;) {
      let text: string | undefined;
      try {
        text = readFileSync(path, 'utf8');
      } catch {
        text = undefined; // not there yet
      }
      const got = text === undefined ? undefined : parseIdFile(text);
      if (text !== undefined && !got) throw new Error(`${op}: rendezvous: ${path} is not a group id file written by rank 0`);
      if (got) {
        if (got.size !== size) throw new RangeError(`${op}: rendezvous: rank 0 made a group of ${got.size} ranks at ${path}, rank ${rank} was given size ${size}`);
        id = got.id;
        break;
      }
      if (Date.now() >= deadline) {
        throw new ExpertParallelTimeoutError(`${op}: rank ${rank} of ${size}: rank 0 did not write the group's id to ${path} within ${Date.now() - start} ms`, [0]);
      }
      await sleep(Math.min(POLL_MS, Math.max(1, deadline - Date.now())));
    }
    try {
      writeAtomically(marker(rank), `${hex(id)}\n`);
    } catch (e) {
      throw new Error(`${op}: rendezvous: rank ${rank} cannot write its marker ${marker(rank)}: ${(e as Error).message}`);
    }
  }
  const mine = hex(id);
  const arrived = (r: number) => {
    if (r === 0) return true;
    try {
      return readFileSync(marker(r), 'utf8').trim() === mine;
    } catch {
      return false;
    }
  };
  return {
    id,
    missing: () => Array.from({ length: size }, (_, r) => r).filter((r) => r !== rank && !arrived(r)),
    close: async () => {
      if (rank !== 0) return;
      // only this run's files: another run may have taken the path since
      if (existsSync(path) && parseIdFile(readFileSync(path, 'utf8'))?.id.every((b, i) => b === id[i])) rmSync(path, { force: true });
      for (let r = 1; r < size; r++) if (arrived(r)) rmSync(marker(r), { force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------
// Loopback TCP

/** Splits a socket's data into lines. */
function onLines(socket: Socket, f: (line: string) => void): void {
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    for (let i = buffered.indexOf('\n'); i >= 0; i = buffered.indexOf('\n')) {
      const line = buffered.slice(0, i);
      buffered = buffered.slice(i + 1);
      f(line);
    }
    if (buffered.length > 4096) socket.destroy();
  });
}

async function tcpRendezvous(address: { host: string; port: number }, rank: number, size: number, makeId: () => Uint8Array, deadline: number, op: string): Promise<Rendezvous> {
  const url = `tcp://${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
  return rank === 0 ? serve(address, url, size, makeId(), op) : join(address, url, rank, size, deadline, op);
}

async function serve(address: { host: string; port: number }, url: string, size: number, id: Uint8Array, op: string): Promise<Rendezvous> {
  const present = new Map<number, Socket>();
  const sockets = new Set<Socket>();
  const announce = () => {
    const line = `joined ${[0, ...present.keys()].sort((a, b) => a - b).join(',')}\n`;
    for (const [, s] of present) s.write(line);
  };
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => {
      sockets.delete(socket);
      for (const [r, s] of present) {
        if (s === socket) {
          present.delete(r);
          announce();
        }
      }
    });
    onLines(socket, (line) => {
      const m = /^join ([0-9]+) ([0-9]+)$/.exec(line);
      if (!m) {
        socket.end(`error rank 0 expected 'join <rank> <size>', got '${line.slice(0, 80)}'\n`);
        return;
      }
      const [r, n] = [Number(m[1]), Number(m[2])];
      let error: string | undefined;
      if (n !== size) error = `rank 0 made a group of ${size} ranks at ${url}, rank ${r} was given size ${n}`;
      else if (r < 1 || r >= size) error = `rank ${r} is not a rank of a group of ${size} (1..${size - 1} join rank 0)`;
      else if (present.has(r)) error = `rank ${r} already joined the group at ${url}`;
      if (error) {
        socket.end(`error ${error}\n`);
        return;
      }
      present.set(r, socket);
      socket.write(`id ${hex(id)}\n`);
      announce();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`${op}: rendezvous: rank 0 cannot listen on ${url}: ${(e as Error).message}`)));
    server.listen(address.port, address.host, () => resolve());
  });
  server.on('error', () => {});
  return {
    id,
    missing: () => others(size, new Set([0, ...present.keys()])),
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

async function join(address: { host: string; port: number }, url: string, rank: number, size: number, deadline: number, op: string): Promise<Rendezvous> {
  const start = Date.now();
  for (;;) {
    const outcome = await new Promise<{ socket: Socket; id: Uint8Array; present: { set: Set<number> } } | { retry: string } | { error: Error }>((resolve) => {
      const socket = createConnection({ host: address.host, port: address.port });
      const present = { set: new Set<number>([0]) };
      let id: Uint8Array | undefined;
      let settled = false;
      const settle = (v: Parameters<typeof resolve>[0]) => {
        if (!settled) {
          settled = true;
          resolve(v);
        }
      };
      const timer = setTimeout(
        () => {
          socket.destroy();
          settle({ retry: 'no answer' });
        },
        Math.max(1, deadline - Date.now()),
      );
      socket.on('error', (e) => {
        clearTimeout(timer);
        settle({ retry: (e as NodeJS.ErrnoException).code ?? e.message });
      });
      socket.on('close', () => {
        clearTimeout(timer);
        settle({ retry: 'closed by rank 0' });
      });
      socket.on('connect', () => socket.write(`join ${rank} ${size}\n`));
      onLines(socket, (line) => {
        if (line.startsWith('error ')) {
          clearTimeout(timer);
          socket.destroy();
          const message = `${op}: rendezvous: ${line.slice(6)}`;
          settle({ error: /size|not a rank/.test(line) ? new RangeError(message) : new Error(message) });
        } else if (line.startsWith('id ') && !id) {
          clearTimeout(timer);
          id = Uint8Array.from(Buffer.from(line.slice(3), 'hex'));
          settle({ socket, id, present });
        } else if (line.startsWith('joined ')) {
          present.set = new Set(line.slice(7).split(',').map(Number));
        }
      });
    });
    if ('error' in outcome) throw outcome.error;
    if ('socket' in outcome) {
      const { socket, id, present } = outcome;
      return {
        id,
        // rank 0's last word (it closes the connections once its own init ended)
        missing: () => others(size, present.set).filter((r) => r !== rank),
        close: async () => {
          socket.destroy();
        },
      };
    }
    if (Date.now() >= deadline) {
      throw new ExpertParallelTimeoutError(`${op}: rank ${rank} of ${size}: rank 0 did not serve the group's id at ${url} within ${Date.now() - start} ms (last: ${outcome.retry})`, [0]);
    }
    await sleep(Math.min(50, Math.max(1, deadline - Date.now())));
  }
}

/** `rank 1` / `ranks 1, 3`. */
/** A TCP port free on `host` now (the system picks it), for a `tcp://HOST:PORT` rendezvous of ranks started together. */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  const server = createServer();
  await new Promise<void>((ok, fail) => {
    server.once('error', fail);
    server.listen(0, host, ok);
  });
  const { port } = server.address() as { port: number };
  await new Promise((ok) => server.close(ok));
  return port;
}

export function rankList(ranks: readonly number[]): string {
  return who(ranks);
}
