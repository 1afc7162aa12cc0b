/**
 * The routing demo: everything runs here, in the page, on moe-dispatch's webgpu backend where the
 * page has a WebGPU adapter (its shader ops through `moe.gpu`), else on the WebAssembly backend,
 * imported from the package's browser entry as plain ES modules (no bundler). With webgpu, the
 * "compute on wasm" toggle switches to wasm, and every webgpu result is compared with wasm's.
 *
 * Pipeline: route(logits) -> indicesToMultihot -> tokensPerExpert (routed load)
 *   -> dropTokens (capacity, optional) -> tokensPerExpert (kept load) -> permute.
 * What is drawn carries its numbers in data attributes (data-expert, data-routed, data-kept,
 * data-dropped, data-capacity, data-slot/data-token), which test/demo.test.ts reads.
 */
import { createBackend, tensor } from '../dist/browser.js';
import { rng } from '../dist/random.js';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

function el(name, attrs = {}, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  parent?.appendChild(node);
  return node;
}

// ---------------------------------------------------------------------------------------
// Logits: generated (seeded) or pasted.

function gaussian(rand) {
  return Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
}

/** T lines of E logits (3 decimals): noise plus a per-expert popularity scaled by `skew`. */
export function generateLogits(T, E, seed, skew) {
  const rand = rng(seed);
  const popularity = Array.from({ length: E }, () => gaussian(rand));
  const lines = [];
  for (let t = 0; t < T; t++) lines.push(Array.from({ length: E }, (_, e) => (gaussian(rand) + skew * popularity[e]).toFixed(3)).join(' '));
  return lines.join('\n');
}

/** Rows of numbers from text: one token per line, numbers split by spaces, commas or semicolons; brackets ignored. */
export function parseLogits(text) {
  const rows = text
    .split('\n')
    .map((line) => line.replace(/[[\]]/g, ' ').trim())
    .filter((line) => line.length > 0)
    .map((line, i) =>
      line
        .split(/[\s,;]+/)
        .filter(Boolean)
        .map((s) => {
          const v = Number(s);
          if (!Number.isFinite(v)) throw new RangeError(`logits line ${i + 1}: ${JSON.stringify(s)} is not a finite number`);
          return v;
        }),
    );
  if (rows.length === 0) throw new RangeError('logits: no rows (paste one line of numbers per token, or generate)');
  const E = rows[0].length;
  const bad = rows.findIndex((r) => r.length !== E);
  if (bad >= 0) throw new RangeError(`logits line ${bad + 1}: ${rows[bad].length} numbers, but line 1 has ${E}`);
  return rows;
}

// ---------------------------------------------------------------------------------------
// The routing, with the library.

function readOptions() {
  const int = (id) => Number($(id).value);
  return {
    scoreFunction: $('score-function').value,
    topk: int('topk'),
    numGroups: int('num-groups'),
    topkGroups: int('topk-groups'),
    normTopkProb: $('norm-topk').checked,
    capacityFactor: $('use-capacity').checked ? Number($('capacity-factor').value) : null,
    dropPolicy: $('drop-policy').value,
  };
}

export function computeRouting(moe, rows, o) {
  const T = rows.length;
  const E = rows[0].length;
  const logits = tensor('float32', [T, E], Float32Array.from(rows.flat()));
  const routeOptions = { topk: o.topk, scoreFunction: o.scoreFunction };
  if (o.numGroups > 1) Object.assign(routeOptions, { numGroups: o.numGroups, topkGroups: o.topkGroups });
  if (o.normTopkProb) routeOptions.normTopkProb = true;
  const routed = moe.route(logits, routeOptions);
  const { routingMap, probs } = moe.indicesToMultihot(routed.indices, routed.weights, E);
  const routedPerExpert = moe.tokensPerExpert(routingMap).data;
  let kept = { routingMap, probs };
  let capacity = null;
  if (o.capacityFactor !== null) {
    const dropped = moe.dropTokens(probs, routingMap, { topk: o.topk, capacityFactor: o.capacityFactor, dropPolicy: o.dropPolicy });
    capacity = dropped.capacity;
    const again = moe.getCapacity(T * o.topk, E, o.capacityFactor);
    if (again !== capacity) throw new Error(`getCapacity gave ${again}, dropTokens ${capacity}`);
    kept = dropped;
  }
  const keptPerExpert = moe.tokensPerExpert(kept.routingMap).data;
  // One hidden unit holding the token id, so the permuted rows say which token sits in each slot.
  const tokens = tensor(
    'float32',
    [T, 1],
    Float32Array.from({ length: T }, (_, t) => t),
  );
  const permuted = moe.permute(tokens, kept.routingMap, { probs: kept.probs });
  return { T, E, scores: routed.scores.data, routingMap: routingMap.data, keptMap: kept.routingMap.data, routedPerExpert, keptPerExpert, capacity, permuted };
}

/** The same pipeline on a webgpu backend: `moe.gpu` ops (async, webgpu tensors), results downloaded. */
export async function computeRoutingGpu(moe, rows, o) {
  const T = rows.length;
  const E = rows[0].length;
  const g = moe.gpu;
  const logits = tensor('float32', [T, E], Float32Array.from(rows.flat()));
  const routeOptions = { topk: o.topk, scoreFunction: o.scoreFunction };
  if (o.numGroups > 1) Object.assign(routeOptions, { numGroups: o.numGroups, topkGroups: o.topkGroups });
  if (o.normTopkProb) routeOptions.normTopkProb = true;
  const routed = await g.route(logits, routeOptions);
  const multi = await g.indicesToMultihot(routed.indices, routed.weights, E);
  const routedCounts = await g.tokensPerExpert(multi.routingMap);
  let kept = multi;
  let capacity = null;
  if (o.capacityFactor !== null) {
    kept = await g.dropTokens(multi.probs, multi.routingMap, { topk: o.topk, capacityFactor: o.capacityFactor, dropPolicy: o.dropPolicy });
    capacity = kept.capacity;
    const again = moe.getCapacity(T * o.topk, E, o.capacityFactor);
    if (again !== capacity) throw new Error(`getCapacity gave ${again}, dropTokens ${capacity}`);
  }
  const keptCounts = await g.tokensPerExpert(kept.routingMap);
  const tokens = tensor(
    'float32',
    [T, 1],
    Float32Array.from({ length: T }, (_, t) => t),
  );
  const permutedGpu = await g.permute(tokens, kept.routingMap, { probs: kept.probs });
  const host = await moe.toHost({ scores: routed.scores, routingMap: multi.routingMap, keptMap: kept.routingMap, routedCounts, keptCounts, permuted: permutedGpu });
  for (const t of [...Object.values(routed), ...Object.values(multi), kept.routingMap, kept.probs, routedCounts, keptCounts, ...Object.values(permutedGpu)])
    if (t && typeof t.dispose === 'function') t.dispose();
  return {
    T,
    E,
    scores: host.scores.data,
    routingMap: host.routingMap.data,
    keptMap: host.keptMap.data,
    routedPerExpert: host.routedCounts.data,
    keptPerExpert: host.keptCounts.data,
    capacity,
    permuted: host.permuted,
  };
}

/** Whether two results of the pipeline hold the same bits. */
function sameBits(a, b) {
  const bytes = (v) => new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  const eq = (x, y) => x.byteLength === y.byteLength && bytes(x).every((v, i) => v === bytes(y)[i]);
  const p = (r) => [r.permuted.permutedTokens.data, r.permuted.permutedProbs.data, r.permuted.sortedIndices.data, r.permuted.tokensPerExpert.data];
  return (
    [a.scores, a.routingMap, a.keptMap, a.routedPerExpert, a.keptPerExpert, ...p(a)].every((x, i) => eq(x, [b.scores, b.routingMap, b.keptMap, b.routedPerExpert, b.keptPerExpert, ...p(b)][i])) &&
    a.capacity === b.capacity
  );
}

// ---------------------------------------------------------------------------------------
// Drawing (SVG).

/** Expert hues from orange round to violet, leaving out the reds that mark dropped tokens. */
const expertColor = (e, E) => `hsl(${Math.round(35 + (e * 270) / Math.max(1, E))}, 62%, 48%)`;
const heat = (v) => {
  const x = Math.max(0, Math.min(1, v));
  return `rgb(${Math.round(247 - 214 * x)}, ${Math.round(251 - 160 * x)}, ${Math.round(255 - 86 * x)})`;
};

function drawHeatmap(r) {
  const { T, E, scores, routingMap, keptMap } = r;
  const cw = Math.max(8, Math.min(28, Math.floor(980 / E)));
  const ch = Math.max(4, Math.min(14, Math.floor(420 / T)));
  const left = 34;
  const top = 16;
  const svg = el('svg', { width: left + E * cw + 4, height: top + T * ch + 4, id: 'heatmap-svg', 'data-tokens': T, 'data-experts': E });
  let max = 0;
  for (const v of scores) max = Math.max(max, v);
  for (let e = 0; e < E; e++) if (E <= 32 || e % 4 === 0) el('text', { x: left + e * cw + cw / 2, y: 11, 'text-anchor': 'middle' }, svg).textContent = `e${e}`;
  for (let t = 0; t < T; t++) {
    if (ch >= 10 || t % Math.ceil(10 / ch) === 0) el('text', { x: left - 4, y: top + t * ch + ch - 2, 'text-anchor': 'end' }, svg).textContent = `t${t}`;
    for (let e = 0; e < E; e++) {
      const i = t * E + e;
      const x = left + e * cw;
      const y = top + t * ch;
      const cell = el('rect', { x, y, width: cw, height: ch, fill: heat(max > 0 ? scores[i] / max : 0) }, svg);
      const title = el('title', {}, cell);
      title.textContent = `token ${t}, expert ${e}: score ${scores[i].toPrecision(4)}${routingMap[i] ? (keptMap[i] ? ' (routed)' : ' (routed, dropped)') : ''}`;
      if (routingMap[i]) {
        el(
          'rect',
          {
            x: x + 0.75,
            y: y + 0.75,
            width: cw - 1.5,
            height: ch - 1.5,
            fill: 'none',
            stroke: '#1d232b',
            'stroke-width': 1.5,
            class: 'routed',
            'data-token': t,
            'data-expert': e,
            'data-kept': keptMap[i] ? 1 : 0,
          },
          svg,
        );
        if (!keptMap[i]) {
          el('path', { d: `M${x + 2} ${y + 2}L${x + cw - 2} ${y + ch - 2}M${x + cw - 2} ${y + 2}L${x + 2} ${y + ch - 2}`, stroke: '#d1495b', 'stroke-width': 2, class: 'dropped-mark' }, svg);
        }
      }
    }
  }
  $('heatmap').replaceChildren(svg);
}

function drawLoads(r) {
  const { E, routedPerExpert, keptPerExpert, capacity } = r;
  const bw = Math.max(10, Math.min(44, Math.floor(980 / E)));
  const left = 30;
  const top = 10;
  const h = 160;
  const maxLoad = Math.max(1, capacity ?? 0, ...routedPerExpert);
  const scale = h / maxLoad;
  const svg = el('svg', { width: left + E * bw + 70, height: top + h + 34, id: 'loads-svg' });
  const pattern = el('pattern', { id: 'dropped-hatch', width: 6, height: 6, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' }, el('defs', {}, svg));
  el('rect', { width: 6, height: 6, fill: '#f4c7cd' }, pattern);
  el('line', { x1: 0, y1: 0, x2: 0, y2: 6, stroke: '#d1495b', 'stroke-width': 3 }, pattern);
  for (const v of [0, maxLoad]) {
    el('text', { x: left - 4, y: top + h - v * scale + 3, 'text-anchor': 'end' }, svg).textContent = String(v);
  }
  el('line', { x1: left, x2: left + E * bw, y1: top + h, y2: top + h, stroke: '#8c959f' }, svg);
  for (let e = 0; e < E; e++) {
    const routed = routedPerExpert[e];
    const kept = keptPerExpert[e];
    const dropped = routed - Math.min(routed, kept);
    const g = el('g', { class: 'expert-load', 'data-expert': e, 'data-routed': routed, 'data-kept': kept, 'data-dropped': dropped }, svg);
    const x = left + e * bw + 2;
    const w = bw - 4;
    el('rect', { x, y: top + h - kept * scale, width: w, height: kept * scale, fill: expertColor(e, E), class: 'kept' }, g);
    if (dropped > 0) el('rect', { x, y: top + h - (kept + dropped) * scale, width: w, height: dropped * scale, fill: 'url(#dropped-hatch)', stroke: '#d1495b', class: 'dropped' }, g);
    const label = el('text', { x: x + w / 2, y: top + h + 12, 'text-anchor': 'middle', class: 'count' }, g);
    label.textContent = String(kept);
    if (E <= 32 || e % 4 === 0) el('text', { x: x + w / 2, y: top + h + 26, 'text-anchor': 'middle' }, g).textContent = `e${e}`;
    el('title', {}, g).textContent = `expert ${e}: ${routed} routed, ${kept} kept, ${dropped} dropped`;
  }
  if (capacity !== null) {
    const y = top + h - capacity * scale;
    el('line', { x1: left, x2: left + E * bw, y1: y, y2: y, stroke: '#1d232b', 'stroke-dasharray': '5 3', 'stroke-width': 1.5, id: 'capacity-line', 'data-capacity': capacity }, svg);
    el('text', { x: left + E * bw + 4, y: y + 3 }, svg).textContent = `capacity ${capacity}`;
  }
  $('loads').replaceChildren(svg);
}

function drawPermuted(r) {
  const { E, permuted } = r;
  const sorted = permuted.sortedIndices.data;
  const counts = permuted.tokensPerExpert.data;
  const N = sorted.length;
  const cw = 22;
  const ch = 18;
  const perRow = Math.max(1, Math.floor(1000 / cw));
  const rows = Math.max(1, Math.ceil(N / perRow));
  const svg = el('svg', { width: Math.min(N, perRow) * cw + 4, height: rows * (ch + 6) + 4, id: 'permuted-svg', 'data-slots': N });
  let slot = 0;
  for (let e = 0; e < E; e++) {
    for (let j = 0; j < counts[e]; j++, slot++) {
      const x = 2 + (slot % perRow) * cw;
      const y = 2 + Math.floor(slot / perRow) * (ch + 6);
      const g = el('g', { class: 'slot', 'data-slot': slot, 'data-token': sorted[slot], 'data-expert': e }, svg);
      el('rect', { x, y, width: cw - 1, height: ch, fill: expertColor(e, E), stroke: j === 0 ? '#1d232b' : 'none' }, g);
      const text = el('text', { x: x + cw / 2, y: y + 12.5, 'text-anchor': 'middle', fill: '#fff', style: 'fill:#fff' }, g);
      text.textContent = String(sorted[slot]);
      el('title', {}, g).textContent = `slot ${slot}: token ${sorted[slot]} to expert ${e}`;
    }
  }
  $('permuted').replaceChildren(svg);
}

// ---------------------------------------------------------------------------------------

let moe;
let wasm;
let runs = 0;

async function run() {
  const status = $('status');
  const id = ++runs;
  document.body.dataset.state = 'busy';
  try {
    const rows = parseLogits($('logits').value);
    const o = readOptions();
    const onGpu = moe.name === 'webgpu' && !$('use-wasm').checked;
    const t0 = performance.now();
    const r = onGpu ? await computeRoutingGpu(moe, rows, o) : computeRouting(wasm, rows, o);
    const ms = performance.now() - t0;
    const check = onGpu ? (sameBits(r, computeRouting(wasm, rows, o)) ? ' wasm gives the same bits.' : ' wasm gives DIFFERENT bits.') : '';
    if (id !== runs) return; // a newer run started meanwhile
    drawHeatmap(r);
    drawLoads(r);
    drawPermuted(r);
    const routed = r.routedPerExpert.reduce((a, b) => a + b, 0);
    const kept = r.keptPerExpert.reduce((a, b) => a + b, 0);
    status.className = '';
    status.textContent = `${r.T} tokens × ${r.E} experts: ${routed} routed, ${kept} kept, ${routed - kept} dropped${r.capacity !== null ? `, capacity ${r.capacity} per expert` : ''}; ${r.permuted.sortedIndices.data.length} permuted slots. Computed on ${onGpu ? 'webgpu' : 'wasm'} in ${ms.toFixed(1)} ms.${check}`;
    document.body.dataset.state = 'ready';
  } catch (e) {
    if (id !== runs) return;
    status.className = 'error';
    status.textContent = `${e.name}: ${e.message}`;
    document.body.dataset.state = 'error';
  }
}

function generate() {
  $('logits').value = generateLogits(Number($('gen-tokens').value), Number($('gen-experts').value), Number($('gen-seed').value), Number($('gen-skew').value));
}

try {
  moe = await createBackend(); // webgpu where the page has an adapter, else wasm
  wasm = moe.name === 'wasm' ? moe : await createBackend({ prefer: 'wasm' });
  $('backend').textContent =
    moe.name === 'webgpu' ? `backend: webgpu, ${moe.adapter}; wasm beside it for comparison` : `backend: ${moe.name}, ${typeof WebAssembly !== 'undefined' ? 'WebAssembly' : '?'}`;
  $('use-wasm-label').hidden = moe.name !== 'webgpu';
  $('use-wasm').addEventListener('change', () => run());
} catch (e) {
  $('status').className = 'error';
  $('status').textContent = `the wasm backend failed to load: ${e.message}`;
  document.body.dataset.state = 'error';
  throw e;
}
$('generate').addEventListener('click', () => {
  generate();
  run();
});
$('controls').addEventListener('submit', (ev) => {
  ev.preventDefault();
  run();
});
generate();
run();
