/**
 * The routing demo (demo/index.html, `npm run demo:web`) in headless Chromium, driven by
 * playwright-core: the page must load the wasm backend from the browser entry with no bundler,
 * and what it draws must be the library's answer. The same routing is computed here in Node
 * (on the native backend when it runs, else wasm) and compared with the numbers the page drew
 * (data attributes of the SVG). A screenshot is kept in test-artifacts/demo.png.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { CHROMIUM, launchOptions } from '../scripts/chromium.mjs';
import { serve } from '../scripts/static-server.mjs';
import { createBackend, tensor, type Backend, type ScoreFunction } from '../ts/index.js';
import { rng } from '../ts/random.js';
import { cpuBackends } from './backends.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const ARTIFACTS = `${ROOT}test-artifacts`;
const built = existsSync(`${ROOT}dist/browser.js`) && existsSync(`${ROOT}pkg/wasm/moe_wasm_bg.wasm`);

interface Options {
  scoreFunction: ScoreFunction;
  topk: number;
  numGroups: number;
  topkGroups: number;
  normTopkProb: boolean;
  capacityFactor: number | null;
  dropPolicy: 'probs' | 'position';
}

/** Logits as the page takes them (3 decimals), with a few popular experts so that capacity drops tokens. */
function logitsText(T: number, E: number, seed: number): { text: string; values: number[] } {
  const random = rng(seed);
  const popularity = Array.from({ length: E }, (_, e) => (e % 5 === 1 ? 2.5 : 0));
  const values: number[] = [];
  const lines: string[] = [];
  for (let t = 0; t < T; t++) {
    const row = Array.from({ length: E }, (_, e) => (random() * 4 - 2 + popularity[e]).toFixed(3));
    lines.push(row.join(', '));
    values.push(...row.map(Number));
  }
  return { text: lines.join('\n'), values };
}

/** The routing the page should draw, computed here with the library. */
function expected(moe: Backend, T: number, E: number, values: number[], o: Options) {
  const logits = tensor('float32', [T, E], Float32Array.from(values));
  const routeOptions: Parameters<Backend['route']>[1] = { topk: o.topk, scoreFunction: o.scoreFunction };
  if (o.numGroups > 1) Object.assign(routeOptions, { numGroups: o.numGroups, topkGroups: o.topkGroups });
  if (o.normTopkProb) routeOptions.normTopkProb = true;
  const r = moe.route(logits, routeOptions);
  const { routingMap, probs } = moe.indicesToMultihot(r.indices, r.weights, E);
  const routed = Array.from(moe.tokensPerExpert(routingMap).data);
  let map = routingMap;
  let kprobs = probs;
  let capacity: number | null = null;
  if (o.capacityFactor !== null) {
    capacity = moe.getCapacity(T * o.topk, E, o.capacityFactor);
    const d = moe.dropTokens(probs, routingMap, { topk: o.topk, capacityFactor: o.capacityFactor, dropPolicy: o.dropPolicy });
    map = d.routingMap;
    kprobs = d.probs;
  }
  const kept = Array.from(moe.tokensPerExpert(map).data);
  const tokens = tensor(
    'float32',
    [T, 1],
    Float32Array.from({ length: T }, (_, t) => t),
  );
  const p = moe.permute(tokens, map, { probs: kprobs });
  return { routed, kept, capacity, sortedIndices: Array.from(p.sortedIndices.data), permutedCounts: Array.from(p.tokensPerExpert.data), routedCells: routingMap.data.reduce((a, v) => a + v, 0) };
}

/** What the page drew. */
async function drawn(page: Page) {
  return page.evaluate(() => {
    const num = (el: Element, k: string) => Number(el.getAttribute(k));
    const loads = [...document.querySelectorAll('#loads .expert-load')];
    const slots = [...document.querySelectorAll('#permuted .slot')];
    const cap = document.querySelector('#capacity-line');
    return {
      state: document.body.dataset.state,
      status: document.getElementById('status')!.textContent ?? '',
      experts: loads.map((g) => num(g, 'data-expert')),
      routed: loads.map((g) => num(g, 'data-routed')),
      kept: loads.map((g) => num(g, 'data-kept')),
      dropped: loads.map((g) => num(g, 'data-dropped')),
      keptLabels: loads.map((g) => Number(g.querySelector('text.count')?.textContent)),
      droppedBars: loads.filter((g) => g.querySelector('rect.dropped')).map((g) => num(g, 'data-expert')),
      capacity: cap ? num(cap, 'data-capacity') : null,
      slotTokens: slots.map((s) => num(s, 'data-token')),
      slotExperts: slots.map((s) => num(s, 'data-expert')),
      slotLabels: slots.map((s) => Number(s.querySelector('text')?.textContent)),
      routedCells: document.querySelectorAll('#heatmap rect.routed').length,
      routedCellsPerExpert: [...document.querySelectorAll('#heatmap rect.routed')].reduce<Record<number, number>>((acc, r) => {
        const e = num(r, 'data-expert');
        acc[e] = (acc[e] ?? 0) + 1;
        return acc;
      }, {}),
      droppedMarks: document.querySelectorAll('#heatmap .dropped-mark').length,
      heatmapCells: document.querySelectorAll('#heatmap rect:not(.routed)').length,
    };
  });
}

async function setOptions(page: Page, text: string, o: Options) {
  await page.fill('#logits', text);
  await page.selectOption('#score-function', o.scoreFunction);
  await page.fill('#topk', String(o.topk));
  await page.fill('#num-groups', String(o.numGroups));
  await page.fill('#topk-groups', String(o.topkGroups));
  await page.setChecked('#norm-topk', o.normTopkProb);
  await page.setChecked('#use-capacity', o.capacityFactor !== null);
  if (o.capacityFactor !== null) await page.fill('#capacity-factor', String(o.capacityFactor));
  await page.selectOption('#drop-policy', o.dropPolicy);
  await page.evaluate(() => (document.body.dataset.state = 'stale'));
  await page.click('#route');
  await page.waitForFunction(() => document.body.dataset.state === 'ready' || document.body.dataset.state === 'error');
}

describe.skipIf(!built)('demo page in headless Chromium', () => {
  let server: { url: string; close(): Promise<void> };
  let browser: Browser;
  let page: Page;
  const requests: string[] = [];
  const failures: string[] = [];
  const pageErrors: string[] = [];
  // An independent computation: the native backend when it runs here (the page runs wasm).
  let moe: Backend;

  beforeAll(async () => {
    moe = cpuBackends.find((b) => b.name === 'cpu') ?? (await createBackend({ prefer: 'wasm' }));
    server = await serve();
    browser = await chromium.launch(launchOptions);
    page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    page.on('request', (r) => requests.push(new URL(r.url()).pathname));
    page.on('response', (r) => r.status() >= 400 && failures.push(`${r.status()} ${r.url()}`));
    page.on('pageerror', (e) => pageErrors.push(e.message));
    await page.goto(`${server.url}demo/`);
    await page.waitForFunction(() => document.body.dataset.state === 'ready' || document.body.dataset.state === 'error');
  });

  afterAll(async () => {
    await browser?.close();
    await server?.close();
  });

  it(`loads the wasm backend through dist/browser.js with no bundler (Chromium: ${CHROMIUM})`, async () => {
    const d = await drawn(page);
    expect(pageErrors).toEqual([]);
    expect(failures).toEqual([]);
    expect(d.state, d.status).toBe('ready');
    expect(await page.textContent('#backend')).toContain('wasm');
    expect(requests).toContain('/dist/browser.js');
    expect(requests).toContain('/pkg/wasm/moe_wasm_bg.wasm');
    // The default page routes its generated logits: something is drawn.
    expect(d.experts.length).toBeGreaterThan(0);
    expect(d.slotTokens.length).toBeGreaterThan(0);
  });

  const T = 48;
  const E = 16;
  const cases: [string, Options][] = [
    ['sigmoid, top-3, 4 groups keep 2, capacity 1.0 by position', { scoreFunction: 'sigmoid', topk: 3, numGroups: 4, topkGroups: 2, normTopkProb: true, capacityFactor: 1.0, dropPolicy: 'position' }],
    ['softmax, top-2, capacity 0.75 by probs', { scoreFunction: 'softmax', topk: 2, numGroups: 1, topkGroups: 1, normTopkProb: false, capacityFactor: 0.75, dropPolicy: 'probs' }],
    ['softmax, top-4, no capacity', { scoreFunction: 'softmax', topk: 4, numGroups: 1, topkGroups: 1, normTopkProb: false, capacityFactor: null, dropPolicy: 'probs' }],
  ];

  it.each(cases)('draws the library routing: %s', async (_title, o) => {
    const { text, values } = logitsText(T, E, 0xde70 + o.topk);
    await setOptions(page, text, o);
    const d = await drawn(page);
    const want = expected(moe, T, E, values, o);
    expect(d.state, d.status).toBe('ready');

    // Per-expert counts drawn = the library's tokensPerExpert, before and after dropping.
    expect(d.experts).toEqual(Array.from({ length: E }, (_, e) => e));
    expect(d.routed, 'routed per expert').toEqual(want.routed);
    expect(d.kept, 'kept per expert (tokensPerExpert after dropTokens)').toEqual(want.kept);
    expect(d.keptLabels, 'the count printed under each bar').toEqual(want.kept);
    expect(d.dropped).toEqual(want.routed.map((r, e) => r - want.kept[e]));
    expect(
      d.routed.reduce((a, b) => a + b, 0),
      'every token routed k times',
    ).toBe(T * o.topk);
    expect(d.capacity, 'capacity line').toBe(want.capacity);
    if (want.capacity !== null) {
      for (const k of d.kept) expect(k).toBeLessThanOrEqual(want.capacity);
      expect(d.droppedBars.length, 'this case overflows some expert').toBeGreaterThan(0);
    } else {
      expect(d.droppedBars).toEqual([]);
    }
    expect(d.droppedBars).toEqual(d.experts.filter((e) => d.dropped[e] > 0));

    // Heat map: T x E cells, the routed ones outlined, the dropped ones crossed.
    expect(d.heatmapCells).toBe(T * E);
    expect(d.routedCells).toBe(want.routedCells);
    expect(Array.from({ length: E }, (_, e) => d.routedCellsPerExpert[e] ?? 0)).toEqual(want.routed);
    expect(d.droppedMarks).toBe(d.dropped.reduce((a, b) => a + b, 0));

    // Permuted order: the library's sortedIndices, expert-major.
    expect(d.slotTokens, 'permuted order').toEqual(want.sortedIndices);
    expect(d.slotLabels).toEqual(want.sortedIndices);
    expect(d.slotExperts).toEqual(want.permutedCounts.flatMap((n, e) => Array(n).fill(e)));
    expect(d.status).toContain(`${T} tokens × ${E} experts`);
  });

  it('reports bad input in the page instead of drawing', async () => {
    await setOptions(page, '1 2 3\n4 5', cases[0][1]);
    const d = await drawn(page);
    expect(d.state).toBe('error');
    expect(d.status).toMatch(/line 2: 2 numbers, but line 1 has 3/);
    await setOptions(page, logitsText(8, 4, 1).text, { ...cases[2][1], topk: 5 });
    const e = await drawn(page);
    expect(e.state).toBe('error');
    expect(e.status).toMatch(/RangeError: route: .*topk/);
  });

  it('takes a screenshot (test-artifacts/demo.png)', async () => {
    const { text } = logitsText(T, E, 0xde70 + 3);
    await setOptions(page, text, cases[0][1]);
    mkdirSync(ARTIFACTS, { recursive: true });
    const png = await page.screenshot({ path: `${ARTIFACTS}/demo.png`, fullPage: true });
    expect(png.subarray(1, 4).toString()).toBe('PNG');
    expect(png.length).toBeGreaterThan(20_000);
  });
});

if (!built) it.skip('demo page: dist/browser.js or pkg/wasm/ is not built (run npm run build)', () => {});
