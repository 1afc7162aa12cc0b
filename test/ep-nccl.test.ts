/**
 * The NCCL expert-parallel group's parts that need no GPU (node project only): the options'
 * checks, and the rendezvous (ts/rendezvous.ts) that carries rank 0's id to the other ranks and
 * says which ranks have arrived, over a file and over loopback TCP, with several ranks in this
 * process. NCCL itself (the communicator, the collectives, dispatch/combine over it, the init
 * timeout) is tested on the GPU machine by test/gpu/ep-nccl.test.mjs; here, where NCCL or CUDA
 * is missing, one test checks that createExpertParallelGroup says why, and the GPU tests are
 * listed as skipped with that reason.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { backendInfo, createExpertParallelGroup, ExpertParallelTimeoutError, ncclInfo } from '../ts/index.js';
import { freePort, parseRendezvous, rendezvous, type Rendezvous, type RendezvousAddress } from '../ts/rendezvous.js';

const dir = mkdtempSync(join(tmpdir(), 'moe-ep-nccl-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let serial = 0;
const freshPath = () => join(dir, `id-${++serial}`);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('createExpertParallelGroup: options', () => {
  const cases: [string, unknown, ErrorConstructor, string][] = [
    ['no options', undefined, TypeError, 'createExpertParallelGroup: options: expected { rank, size, rendezvous, timeoutMs? }, got undefined'],
    ['an array', [], TypeError, 'options: expected { rank, size, rendezvous, timeoutMs? }, got an Array'],
    ['no size', { rank: 0, rendezvous: '/tmp/x' }, TypeError, 'options.size: expected a number (required), got undefined'],
    ['no rank', { size: 2, rendezvous: '/tmp/x' }, TypeError, 'options.rank: expected a number (required), got undefined'],
    ['size 0', { rank: 0, size: 0, rendezvous: '/tmp/x' }, RangeError, 'options.size: expected an integer >= 1, got 0'],
    ['size as a string', { rank: 0, size: '2', rendezvous: '/tmp/x' }, TypeError, 'options.size: expected a number, got string'],
    ['rank = size', { rank: 2, size: 2, rendezvous: '/tmp/x' }, RangeError, 'options.rank: expected 0 <= rank < size = 2, got 2'],
    ['a fractional rank', { rank: 0.5, size: 2, rendezvous: '/tmp/x' }, RangeError, 'options.rank: expected an integer >= 0, got 0.5'],
    ['a negative rank', { rank: -1, size: 2, rendezvous: '/tmp/x' }, RangeError, 'options.rank: expected an integer >= 0, got -1'],
    ['no rendezvous', { rank: 0, size: 1 }, TypeError, "options.rendezvous: expected a file path or 'tcp://127.0.0.1:PORT' (required), got undefined"],
    ['a numeric rendezvous', { rank: 0, size: 1, rendezvous: 29500 }, TypeError, "options.rendezvous: expected a file path or 'tcp://127.0.0.1:PORT', got number"],
    ['an empty rendezvous', { rank: 0, size: 1, rendezvous: '' }, RangeError, 'options.rendezvous: expected a file path'],
    ['a remote host', { rank: 0, size: 1, rendezvous: 'tcp://10.1.2.3:29500' }, RangeError, 'options.rendezvous: the host must be a loopback address (127.0.0.1, localhost, [::1])'],
    ['port 0', { rank: 0, size: 1, rendezvous: 'tcp://127.0.0.1:0' }, RangeError, 'options.rendezvous: the port must be 1..65535, got 0'],
    ['port 70000', { rank: 0, size: 1, rendezvous: 'tcp://127.0.0.1:70000' }, RangeError, 'the port must be 1..65535, got 70000'],
    ['no port', { rank: 0, size: 1, rendezvous: 'tcp://127.0.0.1' }, RangeError, "options.rendezvous: expected 'tcp://HOST:PORT'"],
    ['another scheme', { rank: 0, size: 1, rendezvous: 'http://127.0.0.1:80' }, RangeError, "options.rendezvous: expected 'tcp://HOST:PORT'"],
    ['timeoutMs 0', { rank: 0, size: 1, rendezvous: '/tmp/x', timeoutMs: 0 }, RangeError, 'options.timeoutMs: expected a number of milliseconds > 0 and <= 2^31 - 1, got 0'],
    ['timeoutMs Infinity', { rank: 0, size: 1, rendezvous: '/tmp/x', timeoutMs: Infinity }, RangeError, 'got Infinity'],
    ['timeoutMs as a string', { rank: 0, size: 1, rendezvous: '/tmp/x', timeoutMs: '5' }, TypeError, 'options.timeoutMs: expected a number, got string'],
    ['an unknown option', { rank: 0, size: 1, rendezvous: '/tmp/x', device: 1 }, TypeError, 'options.device: not an option of createExpertParallelGroup (known: rank, size, rendezvous, timeoutMs)'],
  ];
  it.each(cases)('%s: rejects with the class and the argument named (before NCCL is looked for)', async (_title, options, cls, message) => {
    const outcome = await createExpertParallelGroup(options as never).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(outcome).toBeInstanceOf(cls);
    expect((outcome as Error).message.startsWith('createExpertParallelGroup: ')).toBe(true);
    expect((outcome as Error).message).toContain(message);
  });

  it('reads the two kinds of rendezvous', () => {
    expect(parseRendezvous('/tmp/run/id')).toEqual({ kind: 'file', path: '/tmp/run/id' });
    expect(parseRendezvous('relative/id')).toEqual({ kind: 'file', path: 'relative/id' });
    expect(parseRendezvous('tcp://127.0.0.1:29500')).toEqual({ kind: 'tcp', host: '127.0.0.1', port: 29500 });
    expect(parseRendezvous('TCP://localhost:1')).toEqual({ kind: 'tcp', host: 'localhost', port: 1 });
    expect(parseRendezvous('tcp://[::1]:65535')).toEqual({ kind: 'tcp', host: '::1', port: 65535 });
    expect(() => parseRendezvous('tcp://127.0.0.1:12ab')).toThrow(RangeError);
    expect(() => parseRendezvous('a\0b')).toThrow(/NUL/);
  });
});

/** `size` ranks meeting at `address` concurrently (rank r after delays[r] ms); rank 0's id is random. */
async function meet(address: RendezvousAddress, size: number, timeoutMs: number, delays: number[] = []): Promise<{ rvs: Rendezvous[]; id: Uint8Array }> {
  const id = Uint8Array.from(randomBytes(128));
  const deadline = Date.now() + timeoutMs;
  const rvs = await Promise.all(
    Array.from({ length: size }, async (_, r) => {
      await sleep(delays[r] ?? 0);
      return rendezvous(address, r, size, () => id, deadline);
    }),
  );
  return { rvs, id };
}

describe('rendezvous over a file', () => {
  it('every rank gets rank 0 id, whichever starts first; rank 0 cleans up when it closes', async () => {
    const path = freshPath();
    // rank 2 first, rank 0 last: the others poll until the file appears
    const { rvs, id } = await meet({ kind: 'file', path }, 3, 5000, [120, 60, 0]);
    for (const rv of rvs) expect(Buffer.from(rv.id).equals(Buffer.from(id))).toBe(true);
    for (const rv of rvs) expect(rv.missing()).toEqual([]);
    expect(existsSync(path)).toBe(true);
    expect(readFileSync(`${path}.rank2`, 'utf8').trim()).toBe(Buffer.from(id).toString('hex'));
    await Promise.all(rvs.map((rv) => rv.close()));
    expect([path, `${path}.rank1`, `${path}.rank2`].filter(existsSync)).toEqual([]);
  });

  it('names the ranks that have not arrived yet (an earlier run markers do not count)', async () => {
    const path = freshPath();
    writeFileSync(`${path}.rank2`, `${'ab'.repeat(128)}\n`); // a stale marker of another id
    const deadline = Date.now() + 5000;
    const id = Uint8Array.from(randomBytes(128));
    const r0 = await rendezvous({ kind: 'file', path }, 0, 4, () => id, deadline);
    expect(r0.missing()).toEqual([1, 2, 3]);
    const r2 = await rendezvous({ kind: 'file', path }, 2, 4, () => new Uint8Array(128), deadline);
    expect(Buffer.from(r2.id).equals(Buffer.from(id))).toBe(true);
    expect(r0.missing()).toEqual([1, 3]);
    expect(r2.missing()).toEqual([1, 3]);
    await r0.close();
    await r2.close();
  });

  it('a rank whose rank 0 never writes the id rejects at the deadline, naming rank 0', async () => {
    const path = freshPath();
    const start = Date.now();
    const e = await rendezvous({ kind: 'file', path }, 1, 2, () => new Uint8Array(128), start + 300).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(ExpertParallelTimeoutError);
    expect((e as ExpertParallelTimeoutError).missingRanks).toEqual([0]);
    expect((e as Error).message).toMatch(new RegExp(`rank 1 of 2: rank 0 did not write the group's id to ${path} within \\d+ ms`));
    expect(Date.now() - start).toBeGreaterThanOrEqual(290);
    expect(Date.now() - start).toBeLessThan(3000);
  });

  it('a rank given another size than rank 0 is a RangeError', async () => {
    const path = freshPath();
    const r0 = await rendezvous({ kind: 'file', path }, 0, 2, () => new Uint8Array(128).fill(7), Date.now() + 2000);
    await expect(rendezvous({ kind: 'file', path }, 1, 3, () => new Uint8Array(128), Date.now() + 2000)).rejects.toThrow(RangeError);
    await expect(rendezvous({ kind: 'file', path }, 1, 3, () => new Uint8Array(128), Date.now() + 2000)).rejects.toThrow('rank 0 made a group of 2 ranks at');
    await r0.close();
  });

  it('a file that is not an id file is an error, not a wait', async () => {
    const path = freshPath();
    writeFileSync(path, 'hello\n');
    await expect(rendezvous({ kind: 'file', path }, 1, 2, () => new Uint8Array(128), Date.now() + 2000)).rejects.toThrow(`${path} is not a group id file written by rank 0`);
  });
});

describe('rendezvous over loopback TCP', () => {
  it('every rank gets rank 0 id (ranks that start first retry), and learns who is present', async () => {
    const port = await freePort();
    const address = { kind: 'tcp' as const, host: '127.0.0.1', port };
    const deadline = Date.now() + 5000;
    const id = Uint8Array.from(randomBytes(128));
    // rank 1 first: its connection is refused until rank 0 listens
    const p1 = rendezvous(address, 1, 3, () => new Uint8Array(128), deadline);
    await sleep(120);
    const r0 = await rendezvous(address, 0, 3, () => id, deadline);
    const r1 = await p1;
    expect(Buffer.from(r1.id).equals(Buffer.from(id))).toBe(true);
    expect(r0.missing()).toEqual([2]);
    await sleep(50); // rank 0's 'joined' line reaches rank 1
    expect(r1.missing()).toEqual([2]);
    const r2 = await rendezvous(address, 2, 3, () => new Uint8Array(128), deadline);
    expect(Buffer.from(r2.id).equals(Buffer.from(id))).toBe(true);
    await sleep(50);
    expect([r0.missing(), r1.missing(), r2.missing()]).toEqual([[], [], []]);
    // a rank whose connection closes (its process died) is missing again
    await r2.close();
    await sleep(50);
    expect(r0.missing()).toEqual([2]);
    expect(r1.missing()).toEqual([2]);
    await r1.close();
    await r0.close();
  });

  it('a rank whose rank 0 never listens rejects at the deadline, naming rank 0', async () => {
    const port = await freePort();
    const start = Date.now();
    const e = await rendezvous({ kind: 'tcp', host: '127.0.0.1', port }, 1, 2, () => new Uint8Array(128), start + 300).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(ExpertParallelTimeoutError);
    expect((e as ExpertParallelTimeoutError).missingRanks).toEqual([0]);
    expect((e as Error).message).toContain(`rank 1 of 2: rank 0 did not serve the group's id at tcp://127.0.0.1:${port} within`);
    expect(Date.now() - start).toBeLessThan(3000);
  });

  it('refuses another size (RangeError) and a rank that already joined', async () => {
    const port = await freePort();
    const address = { kind: 'tcp' as const, host: '127.0.0.1', port };
    const deadline = Date.now() + 3000;
    const r0 = await rendezvous(address, 0, 2, () => new Uint8Array(128).fill(1), deadline);
    await expect(rendezvous(address, 1, 4, () => new Uint8Array(128), deadline)).rejects.toThrow(RangeError);
    const r1 = await rendezvous(address, 1, 2, () => new Uint8Array(128), deadline);
    await expect(rendezvous(address, 1, 2, () => new Uint8Array(128), deadline)).rejects.toThrow('rank 1 already joined the group at');
    await r1.close();
    await r0.close();
  });

  it('rank 0 says when it cannot listen', async () => {
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const { port } = blocker.address() as { port: number };
    await expect(rendezvous({ kind: 'tcp', host: '127.0.0.1', port }, 0, 2, () => new Uint8Array(128), Date.now() + 1000)).rejects.toThrow(
      `rank 0 cannot listen on tcp://127.0.0.1:${port}: listen EADDRINUSE`,
    );
    await new Promise<void>((resolve) => blocker.close(() => resolve()));
  });
});

const info = ncclInfo();
const cuda = (await backendInfo()).find((i) => i.name === 'cuda');

describe('NCCL here', () => {
  it('ncclInfo() says whether libnccl.so.2 loads, with a version or a reason', () => {
    if (info.available) expect(info.version).toMatch(/^2\.\d+\.\d+$/);
    else expect(info.reason).toMatch(/libnccl\.so\.2|native addon/);
    expect(process.env.NCCL_NVLS_ENABLE).toBe('0');
  });
  it.skipIf(info.available && cuda?.available)('without NCCL (or CUDA), createExpertParallelGroup rejects saying why, and leaves no rendezvous file', async () => {
    const path = freshPath();
    const e = await createExpertParallelGroup({ rank: 0, size: 1, rendezvous: path, timeoutMs: 2000 }).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(Error);
    expect((e as Error).message).toMatch(/^createExpertParallelGroup: .*(NCCL is unavailable|CUDA is unavailable)/);
    expect(existsSync(path)).toBe(false);
  });
  // The communicator, the collectives, dispatch/combine over NCCL and the init timeout run on a GPU machine (test/gpu/ep-nccl.test.mjs).
  it.skip(`NCCL group tests (test/gpu/ep-nccl.test.mjs, on the GPU machine): ${info.available ? `CUDA: ${cuda?.reason ?? 'available'}` : info.reason}`, () => {});
});
