/**
 * activation / activationBackward on the GPU: the core's element formulas (activations.rs
 * `unit`, `unit_grad`) operation for operation in float32, with its `expf` (detmath's float64
 * exp rounded once) and its float32 divisions correctly rounded (WGSL's own float32 division may
 * be off by 2.5 ulp). Each shader runs in two passes (`itemMain`): a fast one with F32_FAST
 * (f64.ts: integer arithmetic that decides nearly every argument, about one exp in a million
 * not), which lists the items it could not decide, and a software float64 one (F32_SOFT) over
 * those, dispatched from the list (no workgroups when it is empty). One shader with a branch to
 * the software float64 costs it on every element where the compiler runs both sides of a branch
 * under a mask (SwiftShader), and on a GPU only the rare warp that takes it. gradProbs sums in
 * software float64, as the core.
 *
 * P = [elements, inter, width, words, kind (0 swiglu, 1 quick_geglu, 2 swiglu_oai,
 *      3 swiglu_clamped, 4 relu2), layout (0 halves, 1 interleaved, 2 single), alpha bits,
 *      limit bits, linearOffset bits, withProbs, 0].
 *
 * A product that an addition takes goes through `exact` (an exclusive-or with P[10], a zero the
 * compiler cannot see): WGSL lets a compiler fuse `a * b + c` into one fma, rounded once, and
 * NVIDIA's Vulkan driver does (Dawn on an H200: swiglu's input gradient 1-7 ulp off the core's),
 * where the core rounds the product first.
 */
import { F32_FAST, F32_FLAGGED, F32_SOFT, F64, F64_ACC } from './f64.js';
import { CONVERT, type Kind, loader, packWord, rounder } from './shaders.js';

/** The shaders' kind and layout codes of each activation (P[4], P[5]). */
const ACTIVATIONS: Record<string, [kind: number, layout: number]> = { swiglu: [0, 0], quick_geglu: [1, 1], swiglu_oai: [2, 0], swiglu_clamped: [3, 0], relu2: [4, 2] };

/** An activation's [kind, layout] codes (layout 2: no gate, width = inter), or undefined for a kind the shaders do not know. */
export function activationCode(kind: unknown): [kind: number, layout: number] | undefined {
  return typeof kind === 'string' && Object.hasOwn(ACTIVATIONS, kind) ? ACTIVATIONS[kind] : undefined;
}

/** P[4..10] of the activation shaders: the codes, alpha, limit, linearOffset (float32 bits, the core's defaults), withProbs, and `exact`'s zero. */
export function activationParams(code: [number, number], o: { alpha?: unknown; limit?: unknown; linearOffset?: unknown }, withProbs: boolean): number[] {
  const f32 = (v: unknown, d: number) => new Uint32Array(new Float32Array([typeof v === 'number' ? v : d]).buffer)[0];
  return [code[0], code[1], f32(o.alpha, 1.702), f32(o.limit, 7), f32(o.linearOffset, 1), withProbs ? 1 : 0, 0];
}

/**
 * How a shader computes expf and fdiv: `fast` (F32_FAST, the undecided items listed for a second
 * pass) or `soft` (software float64 for every argument: that second pass, over the listed items).
 */
export type Pass = 'fast' | 'soft';

function common(kind: Kind, names: string[], pass: Pass): string {
  return `
@group(0) @binding(0) var<storage, read> P: array<u32>;
${CONVERT}
${F64}
${names.map((n) => loader(n, kind)).join('')}${rounder(kind)}
${pass === 'fast' ? F32_FAST + F32_FLAGGED : F32_SOFT}
fn exact(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) ^ P[10]); }
fn clamp_max(v: f32, l: f32) -> f32 { if (v > l) { return l; } return v; }
fn clamp_sym(v: f32, l: f32) -> f32 { if (v > l) { return l; } if (v < -l) { return -l; } return v; }
// Each formula is written with one expf and as few divisions as possible in the code (the
// software float64 is long, and a shader compiles slower with every copy of it); the values and
// their order of operations are the core's.
/** The argument z of exp(-z) for this kind: gate (swiglu), alpha * min(gate, limit), min(gate, limit). */
fn exp_arg(gate: f32) -> f32 {
  let A = bitcast<f32>(P[6]); let L = bitcast<f32>(P[7]);
  if (P[4] == 0u) { return gate; }
  if (P[4] == 3u) { return clamp_max(gate, L); }
  return A * clamp_max(gate, L);
}
fn unit(gate: f32, up: f32) -> f32 {
  let L = bitcast<f32>(P[7]); let LO = bitcast<f32>(P[8]);
  if (P[4] == 4u) { var r = gate; if (gate <= 0.0) { r = 0.0; } return r * r; }
  let g = clamp_max(gate, L);
  let u = clamp_sym(up, L);
  // silu(v) = v / (1 + e^-v), sigmoid(z) = 1 / (1 + e^-z)
  var num = 1.0;
  if (P[4] == 0u) { num = gate; } else if (P[4] == 3u) { num = g; }
  let q = fdiv(num, 1.0 + expf(-exp_arg(gate)));
  if (P[4] == 0u) { return q * up; }
  if (P[4] == 3u) { return q * u; }
  return g * q * (u + LO);
}
/** (d gate, d up) of gw * unit(gate, up). */
fn unit_grad(gate: f32, up: f32, gw: f32) -> vec2<f32> {
  let L = bitcast<f32>(P[7]); let LO = bitcast<f32>(P[8]);
  if (P[4] == 4u) { var dg = 0.0; if (gate > 0.0) { dg = gw * 2.0 * gate; } return vec2<f32>(dg, 0.0); }
  let g = clamp_max(gate, L);
  let u = clamp_sym(up, L);
  let z = exp_arg(gate);
  let d = 1.0 + expf(-z);
  let s = fdiv(1.0, d);
  if (P[4] == 1u || P[4] == 2u) {
    var dg = 0.0;
    if (gate <= L) { dg = gw * s * (1.0 + exact(z * (1.0 - s))) * (u + LO); }
    var du = 0.0;
    if (up >= -L && up <= L) { du = gw * (g * s); }
    return vec2<f32>(dg, du);
  }
  // swiglu (z = gate, Megatron-Core's swiglu_back) and swiglu_clamped (z = g)
  let q = fdiv(z, d);
  if (P[4] == 0u) { return vec2<f32>(gw * s * (1.0 + exact(gate * (1.0 - s))) * up, gw * q); }
  var dg = 0.0;
  if (gate <= L) { dg = gw * s * (1.0 + exact(g * (1.0 - s))) * u; }
  var du = 0.0;
  if (up >= -L && up <= L) { du = gw * q; }
  return vec2<f32>(dg, du);
}
/** The (gate, up) pair of output column j of row r. */
fn pair(r: u32, j: u32) -> vec2<f32> {
  let I = P[1]; let W = P[2]; let b = r * W;
  if (P[5] == 0u) { return vec2<f32>(ld_x(b + j), ld_x(b + I + j)); }
  if (P[5] == 1u) { return vec2<f32>(ld_x(b + 2u * j), ld_x(b + 2u * j + 1u)); }
  return vec2<f32>(ld_x(b + j), 0.0);
}
fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 64u; }
`;
}

/**
 * The entry point of a shader whose work is `fn item(i: u32)` for i < `count`, with the list L
 * (`[x, y, z, n, items...]`, zeroed before the fast pass) at `binding`. The fast pass runs every
 * item and appends those whose expf or fdiv it could not decide to L, counting the workgroups of
 * 64 they need in L[0] (L[0..3] is the soft pass's indirect dispatch); the soft pass, dispatched
 * from L (or directly on at most 256 workgroups: `passes.lists`), runs the listed items again in software float64 (each item writes only its own
 * outputs, so the order of the list does not matter).
 */
function itemMain(pass: Pass, binding: number, count: string): string {
  // (the soft pass strides over the list: dispatched from L[0..3] a thread an item, or on fewer
  // workgroups directly: `passes.lists`)
  if (pass === 'soft')
    return `@group(0) @binding(${binding}) var<storage, read> L: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let n = L[3];
  for (var j = gid.x; j < n; j += nwg.x * 64u) { item(L[4u + j]); }
}
`;
  return `@group(0) @binding(${binding}) var<storage, read_write> L: array<atomic<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = flat(gid, nwg);
  if (i == 0u) { atomicStore(&L[1], 1u); atomicStore(&L[2], 1u); }
  if (i >= ${count}) { return; }
  SLOW = false;
  item(i);
  if (SLOW) {
    let at = atomicAdd(&L[3], 1u);
    atomicStore(&L[4u + at], i);
    if (at % 64u == 0u) { atomicAdd(&L[0], 1u); }
  }
}
`;
}

/** Forward: one item (thread) per output word. L at binding 4 (5 with the units). */
export function activationForward(kind: Kind, keepUnits = false, pass: Pass = 'fast'): string {
  const per = kind === 'float32' ? 1 : 2;
  if (keepUnits && per !== 1) throw new Error('activationForward: units are kept for float32 only');
  return `${common(kind, ['x'], pass)}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
${keepUnits ? '@group(0) @binding(4) var<storage, read_write> units: array<u32>;' : ''}
fn item(w: u32) {
  let I = P[1];
${packWord(
  per,
  'P[0]',
  `    let r = e / I;
    let gu = pair(r, e - r * I);
    var a = unit(gu.x, gu.y);${keepUnits ? '\n    units[e] = bitcast<u32>(a);' : ''}
    if (P[9] == 1u) { a = a * probs[r]; }
    let bits = round_out(a);`,
)}}
${itemMain(pass, keepUnits ? 5 : 4, 'P[3]')}`;
}

/**
 * Backward, gradInput over float32 (the experts' intermediates): one thread per (gate, up) pair
 * writing both gradients from one unit_grad (the per-word shader above computes it once for each
 * of the two): the same values, half the exps and divisions. P as activationBackward's.
 */
export function activationBackwardPairs(pass: Pass = 'fast'): string {
  return `${common('float32', ['x', 'g'], pass)}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> g: array<u32>;
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
fn item(i: u32) {
  let I = P[1]; let W = P[2];
  let r = i / I;
  let j = i - r * I;
  var gw = ld_g(r * I + j);
  if (P[9] == 1u) { gw = gw * probs[r]; }
  let gu = pair(r, j);
  let d = unit_grad(gu.x, gu.y, gw);
  let b = r * W;
  if (P[5] == 0u) { out[b + j] = bitcast<u32>(d.x); out[b + I + j] = bitcast<u32>(d.y); }
  else if (P[5] == 1u) { out[b + 2u * j] = bitcast<u32>(d.x); out[b + 2u * j + 1u] = bitcast<u32>(d.y); }
  else { out[b + j] = bitcast<u32>(d.x); }
}
${itemMain(pass, 5, 'P[0] / P[2] * P[1]')}`;
}

/**
 * activationGradProbs on the units the forward kept (`activationForward(kind, true)`): the same
 * float32 products `unit * grad` summed per row in float64 from +0 in column order (the core's
 * `sum += (unit * g) as f64`), without computing the units again (no exp, no division). Each
 * float32 term enters F64_ACC's unpacked sum exactly (as its product with 1), rounded to float64
 * at each addition as `f_add` would; a row holding an infinity or a NaN is summed again by
 * `f_add`. float32 units and grad. P = [rows, inter].
 */
export const ACTIVATION_GRAD_PROBS_OF_UNITS = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> units: array<u32>;
@group(0) @binding(2) var<storage, read> g: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
${F64}
${F64_ACC}
fn term(i: u32) -> u32 { return bitcast<u32>(bitcast<f32>(units[i]) * bitcast<f32>(g[i])); }
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = gid.x + gid.y * nwg.x * 64u;
  if (r >= P[0]) { return; }
  let I = P[1];
  var acc = Acc(0u, 0, vec2<u32>(0u, 0u));
  var finite = true;
  for (var j = 0u; j < I; j = j + 1u) {
    let t = term(r * I + j);
    if ((t & 0x7f800000u) == 0x7f800000u) { finite = false; break; }
    acc = dot_add(acc, dot_term(t, 0x3f800000u));
  }
  var sum = acc_bits(acc);
  if (!finite) {
    sum = vec2<u32>(0u, 0u);
    for (var j = 0u; j < I; j = j + 1u) { sum = f_add(sum, f_from_f32(term(r * I + j))); }
  }
  out[r] = f_to_f32(sum);
}
`;

/** Backward, gradInput: one item (thread) per word of `[rows, width]`. L at binding 5. */
export function activationBackward(kind: Kind, pass: Pass = 'fast'): string {
  const per = kind === 'float32' ? 1 : 2;
  return `${common(kind, ['x', 'g'], pass)}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> g: array<u32>;
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
fn item(w: u32) {
  let I = P[1]; let W = P[2];
${packWord(
  per,
  'P[0]',
  `    let r = e / W;
    let c = e - r * W;
    var j = c;
    var is_up = false;
    if (P[5] == 0u) { if (c >= I) { j = c - I; is_up = true; } }
    else if (P[5] == 1u) { j = c / 2u; is_up = (c & 1u) == 1u; }
    var gw = ld_g(r * I + j);
    if (P[9] == 1u) { gw = gw * probs[r]; }
    let gu = pair(r, j);
    let d = unit_grad(gu.x, gu.y, gw);
    var v = d.x;
    if (is_up) { v = d.y; }
    let bits = round_out(v);`,
)}}
${itemMain(pass, 5, 'P[3]')}`;
}

/** Backward, gradProbs: one item (thread) per row, sum over j of unit * grad in (software) float64. P[0] = rows. L at binding 4. */
export function activationGradProbs(kind: Kind, pass: Pass = 'fast'): string {
  return `${common(kind, ['x', 'g'], pass)}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> g: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
fn item(r: u32) {
  let I = P[1];
  var sum = vec2<u32>(0u, 0u);
  for (var j = 0u; j < I; j = j + 1u) {
    let gu = pair(r, j);
    sum = f_add(sum, f_from_f32(bitcast<u32>(unit(gu.x, gu.y) * ld_g(r * I + j))));
  }
  out[r] = f_to_f32(sum);
}
${itemMain(pass, 4, 'P[0]')}`;
}
