/**
 * The command line (dist/cli.js, spawned as users run it): --help for every command, exit
 * codes (0 ok, 1 failure, 2 usage), --json output, bench's progress bar and SVG chart, and
 * `route` from .npy (hand-written here, independently of the CLI's writer) and safetensors
 * files to .npy / .json / .safetensors. Skipped, with the reason in the title, when dist/ is
 * not built.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, describe, expect, it } from 'vitest';

import { createBackend, tensor } from '../ts/index.js';

const CLI = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
const built = existsSync(CLI);
const dir = mkdtempSync(join(tmpdir(), 'moe-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A .npy file written by hand: magic, version, u16/u32 header length, dict, data. */
function npy(descr: string, shape: number[], data: ArrayBufferView, { fortran = false, version = 1 } = {}): Uint8Array {
  let header = `{'descr': '${descr}', 'fortran_order': ${fortran ? 'True' : 'False'}, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
  const pre = version === 1 ? 10 : 12;
  header += `${' '.repeat((64 - ((pre + header.length + 1) % 64)) % 64)}\n`;
  const out = new Uint8Array(pre + header.length + data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, version, 0]);
  if (version === 1) new DataView(out.buffer).setUint16(8, header.length, true);
  else new DataView(out.buffer).setUint32(8, header.length, true);
  out.set(new TextEncoder().encode(header), pre);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), pre + header.length);
  return out;
}

/** Reads a .npy written by the CLI: its header dict text and its data bytes. */
function readNpy(path: string): { header: string; data: Uint8Array } {
  const b = new Uint8Array(readFileSync(path));
  expect(Array.from(b.subarray(0, 6)), `${path}: magic`).toEqual([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]);
  const len = new DataView(b.buffer, b.byteOffset).getUint16(8, true);
  expect((10 + len) % 64, `${path}: header padded to 64 bytes`).toBe(0);
  return { header: new TextDecoder().decode(b.subarray(10, 10 + len)), data: b.slice(10 + len) };
}

// Three tokens, four experts, with clear top-2 picks.
const LOGITS = [0, 5, 1, 4, 9, 0, 0, 8, 1, 2, 3, 4];
const WANT_INDICES = [1, 3, 0, 3, 3, 2];
/** Softmax over the two picked logits (route's default 'softmax' weights), in float64. */
const WANT_WEIGHTS = [
  [5, 4],
  [9, 8],
  [4, 3],
].flatMap(([a, b]) => [1 / (1 + Math.exp(b - a)), 1 / (1 + Math.exp(a - b))]);

describe.skipIf(!built)('moe-dispatch CLI', () => {
  it.each(['info', 'check', 'bench', 'route', 'train'])('%s --help prints its usage and exits 0', (cmd) => {
    const r = cli(cmd, '--help');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^moe-dispatch ${cmd}\\b`));
    expect(r.stdout).toContain('--json');
  });

  it('exit codes: 2 for usage errors (no command, unknown command, unknown flag, bad value), 0 for --help', () => {
    expect(cli().status).toBe(2);
    expect(cli('--help').status).toBe(0);
    const unknown = cli('frobnicate');
    expect(unknown.status).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command 'frobnicate'/);
    expect(cli('info', '--bogus').status).toBe(2);
    expect(cli('check', '--cases', 'many').status).toBe(2);
    expect(cli('bench', '--sizes', '64,x').status).toBe(2);
    expect(cli('bench', '--sizes', '64', '--tokens', '64').status).toBe(2);
    expect(cli('route').status).toBe(2);
    expect(cli('route', 'x.npy', '--topk', '2', '--out', 'r.csv').status).toBe(2);
  });

  it('info --json lists cpu and wasm as available', () => {
    const r = cli('info', '--json');
    expect(r.status).toBe(0);
    const infos = JSON.parse(r.stdout) as { name: string; available: boolean }[];
    expect(infos.filter((i) => i.available).map((i) => i.name)).toEqual(expect.arrayContaining(['cpu', 'wasm']));
  });

  it('check --cases 5 --json: every case agrees, exit 0', () => {
    const r = cli('check', '--cases', '5', '--seed', '3', '--json');
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.failures).toEqual([]);
    expect(out.agree).toEqual({ indicesToMultihot: 5, permute: 5, unpermute: 5, multihotToIndices: 5 });
  });

  it('bench --sizes: a row per size, backend, op and dtype, a progress bar, and an SVG chart next to the JSON', () => {
    const out = join(dir, 'bench.json');
    const r = cli('bench', '--sizes', '64,256', '--hidden', '32', '--experts', '8', '--topk', '2', '--iters', '1', '--out', out, '--json');
    expect(r.status, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    const backends = Object.keys(result.threads);
    expect(backends).toEqual(expect.arrayContaining(['cpu', 'wasm']));
    // per size and dtype: memcpy, alloc+memcpy, and permute + unpermute per backend, allocating and into reused outputs
    expect(result.rows).toHaveLength(2 * 2 * (2 + 4 * backends.length));
    expect(result.rows.map((x: { op: string }) => x.op)).toContain('permute+probs (out)');
    expect([...new Set(result.rows.map((x: { tokens: number }) => x.tokens))]).toEqual([64, 256]);
    for (const row of result.rows) expect(row.gbPerSecond, JSON.stringify(row)).toBeGreaterThan(0);
    expect(JSON.parse(readFileSync(out, 'utf8')).rows).toHaveLength(result.rows.length);
    // progress: one step per size x dtype x (memcpy + each backend), the last one complete
    const steps = 2 * 2 * (1 + backends.length);
    expect(r.stderr).toContain(`[${'#'.repeat(24)}] ${steps}/${steps}`);
    const svg = readFileSync(join(dir, 'bench.svg'), 'utf8');
    expect(result.chart).toBe(join(dir, 'bench.svg'));
    expect(svg).toMatch(/^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    // one line per series (backend x op x dtype, plus the two memcpy baselines per dtype), each through both sizes
    const lines = [...svg.matchAll(/<polyline [^>]*points="([^"]*)"/g)];
    expect(lines).toHaveLength(2 * (2 + 4 * backends.length));
    for (const l of lines) expect(l[1].split(' ')).toHaveLength(2);
    expect(svg).toContain('cpu permute+probs float32');
    expect(svg.trim().endsWith('</svg>')).toBe(true);
  });

  describe('route', () => {
    const logitsNpy = join(dir, 'logits.npy');
    writeFileSync(logitsNpy, npy('<f4', [3, 4], Float32Array.from(LOGITS)));

    it('.npy in, three .npy files out: indices, weights, tokensPerExpert', () => {
      const r = cli('route', logitsNpy, '--topk', '2', '--out', join(dir, 'r.npy'), '--backend', 'cpu');
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/tokens per expert: 1 1 1 3/);
      const idx = readNpy(join(dir, 'r.indices.npy'));
      expect(idx.header).toMatch(/'descr': '<i4', 'fortran_order': False, 'shape': \(3, 2\)/);
      expect(Array.from(new Int32Array(idx.data.buffer))).toEqual(WANT_INDICES);
      const w = readNpy(join(dir, 'r.weights.npy'));
      expect(w.header).toMatch(/'descr': '<f4'.*'shape': \(3, 2\)/);
      const weights = Array.from(new Float32Array(w.data.buffer));
      weights.forEach((x, i) => {
        expect(x, `weight ${i}`).toBeCloseTo(WANT_WEIGHTS[i], 6);
      });
      const tpe = readNpy(join(dir, 'r.tokensPerExpert.npy'));
      expect(tpe.header).toMatch(/'shape': \(4,\)/);
      expect(Array.from(new Int32Array(tpe.data.buffer))).toEqual([1, 1, 1, 3]);
    });

    it('--json summary and a .json output; options reach route (sigmoid, routeScale)', () => {
      const out = join(dir, 'r.json');
      const r = cli('route', logitsNpy, '--topk', '2', '--score-function', 'sigmoid', '--route-scale', '2', '--out', out, '--json', '--backend', 'wasm');
      expect(r.status, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout);
      expect(summary).toMatchObject({ backend: 'wasm', numTokens: 3, numExperts: 4, topk: 2, scoreFunction: 'sigmoid', tokensPerExpert: [1, 1, 1, 3], written: [out] });
      const routing = JSON.parse(readFileSync(out, 'utf8'));
      expect(routing.indices).toEqual(WANT_INDICES);
      const sig = (x: number) => 1 / (1 + Math.exp(-x));
      const want = [5, 4, 9, 8, 4, 3].map((x) => 2 * sig(x));
      routing.weights.forEach((x: number, i: number) => {
        expect(x, `weight ${i}`).toBeCloseTo(want[i], 6);
      });
    });

    it('safetensors in (--tensor picks one of several), safetensors out', async () => {
      const b = await createBackend({ prefer: 'cpu' });
      const file = join(dir, 'router.safetensors');
      writeFileSync(file, b.saveSafetensors({ other: tensor('float32', [2, 2]), 'layers.0.router_logits': tensor('float32', [3, 4], LOGITS), ids: tensor('int32', [2]) }));
      const ambiguous = cli('route', file, '--topk', '2');
      expect(ambiguous.status).toBe(1);
      expect(ambiguous.stderr).toMatch(/--tensor NAME/);
      const out = join(dir, 'routing.safetensors');
      const r = cli('route', file, '--tensor', 'layers.0.router_logits', '--topk', '2', '--out', out);
      expect(r.status, r.stderr).toBe(0);
      const { tensors } = b.loadSafetensors(new Uint8Array(readFileSync(out)));
      expect(Array.from(tensors.indices.data)).toEqual(WANT_INDICES);
      expect(Array.from(tensors.tokensPerExpert.data)).toEqual([1, 1, 1, 3]);
      expect(tensors.weights.shape).toEqual([3, 2]);
    });

    it('npy format 2.0 headers are read too', () => {
      const v2 = join(dir, 'logits-v2.npy');
      writeFileSync(v2, npy('<f4', [3, 4], Float32Array.from(LOGITS), { version: 2 }));
      const r = cli('route', v2, '--topk', '2', '--json');
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout).tokensPerExpert).toEqual([1, 1, 1, 3]);
    });

    it.each([
      ['float64 data', npy('<f8', [3, 4], Float64Array.from(LOGITS)), /'<f8' is not supported/],
      ['big-endian float32', npy('>f4', [3, 4], Float32Array.from(LOGITS)), /'>f4' is not supported/],
      ['Fortran order', npy('<f4', [3, 4], Float32Array.from(LOGITS), { fortran: true }), /fortran_order is True/],
      ['a 1-D array', npy('<f4', [12], Float32Array.from(LOGITS)), /must be 2-D/],
      ['data shorter than the shape', npy('<f4', [4, 4], Float32Array.from(LOGITS)), /needs 64 data bytes, the file has 48/],
      ['not an npy file', new TextEncoder().encode('hello, world'), /not a \.npy file/],
    ])('%s -> exit 1 with a message saying what is wrong', (_title, bytes, message) => {
      const file = join(dir, 'bad.npy');
      writeFileSync(file, bytes);
      const r = cli('route', file, '--topk', '2');
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(message);
    });

    it('routing errors (topk beyond the experts) exit 1 naming the op; a missing file exits 1', () => {
      const r = cli('route', logitsNpy, '--topk', '5');
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/route: topk/);
      expect(cli('route', join(dir, 'missing.npy'), '--topk', '2').status).toBe(1);
    });
  });
});

it.skipIf(built)(`CLI tests skipped: ${CLI} is not built (run npm run build)`, () => {});

const EP_EXAMPLE = fileURLToPath(new URL('../examples/train-ep.mjs', import.meta.url));

describe.skipIf(!built)('examples/train-ep.mjs (expert-parallel training, in-process ranks)', () => {
  it('3 ranks on cpu: the loss falls, the router copies stay the same bits on every rank, and a second run gives the same numbers', () => {
    const run = () => {
      const r = spawnSync(process.execPath, [EP_EXAMPLE, '--ranks', '3', '--backend', 'cpu', '--steps', '25', '--json'], { encoding: 'utf8', timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
    };
    const a = run();
    expect(a).toMatchObject({ backend: 'cpu', ranks: 3, steps: 25, tokensPerStep: 288, replicasIdentical: true });
    expect(a.finalLoss).toBeLessThan(a.initialLoss / 2);
    const b = run();
    expect([b.initialLoss, b.finalLoss]).toEqual([a.initialLoss, a.finalLoss]);
  });

  it('bad arguments: a RangeError naming the option, exit 1', () => {
    const r = spawnSync(process.execPath, [EP_EXAMPLE, '--ranks', '0'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/RangeError: --ranks: expected an integer >= 1, got 0/);
  });
});

const EP_LAUNCH = fileURLToPath(new URL('../scripts/ep-launch.mjs', import.meta.url));

describe.skipIf(!built)('scripts/ep-launch.mjs --stand-in cpu (the launcher where there is no GPU)', () => {
  it('one rank: the dispatch chain equals the single layer bit for bit; --train keeps the layer equal to one trained on the same tokens', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-ep-launch-'));
    const out = join(dir, 'report.json');
    const r = spawnSync(
      process.execPath,
      [EP_LAUNCH, '--ranks', '1', '--stand-in', 'cpu', '--tokens', '48', '--hidden', '32', '--inter', '16', '--experts', '8', '--topk', '2', '--train', '3', '--out', out],
      { encoding: 'utf8', timeout: 120_000 },
    );
    expect(r.status, r.stderr + r.stdout.slice(-2000)).toBe(0);
    const report = JSON.parse(readFileSync(out, 'utf8'));
    rmSync(dir, { recursive: true, force: true });
    expect(report).toMatchObject({ ranks: 1, equivalent: true, bitIdentical: true, deterministic: true, train: { steps: 3, equivalent: true, replicatedIdentical: true } });
    const t = report.results[0].train;
    // one rank: the same computation as the one layer, so the same weights after the steps
    expect(t.maxAbsDiff).toBe(0);
    expect(t.auxLosses).toHaveLength(3);
    for (const loss of t.auxLosses) expect(loss).toBeGreaterThan(0);
  });
});
