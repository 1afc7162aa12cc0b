/**
 * The aux losses on the GPU (crates/moe-core/src/aux_loss.rs step for step): each row's
 * statistics in software float64 (f64.ts: the core's exp, and its ln ported here) and its
 * gradient row; the per-row terms come back to the host, which adds them in JavaScript (IEEE
 * float64) in the core's order (`blockedTotal`) and scales the loss.
 *
 * P = [T, E, mode (0 switch on probs, 1 switch from logits, 2 z-loss), hasMask, factor lo, hi,
 *      2 * coeff / n lo, hi].
 */
import { F64, f64Literal } from './f64.js';
import { phaseMain } from './shaders.js';

/** Tokens a block of a loss's total: the core's `aux_loss::TOTAL_BLOCK`. */
export const TOTAL_BLOCK = 64;

/**
 * A loss's total as the core adds it (`aux_loss::blocked_total`): the unmasked rows' terms in
 * token order within blocks of TOTAL_BLOCK tokens, each block's sum and the total from `init`
 * (+0 for the Switch loss on probs, -0 for the others), the blocks' sums in block order.
 */
export function blockedTotal(terms: Float64Array, mask: Uint8Array | undefined, init: number): number {
  let total = init;
  for (let b0 = 0; b0 < terms.length; b0 += TOTAL_BLOCK) {
    let block = init;
    const b1 = Math.min(b0 + TOTAL_BLOCK, terms.length);
    for (let t = b0; t < b1; t++) if (mask?.[t] !== 0) block += terms[t];
    total += block;
  }
  return total;
}

const POLY = Array.from({ length: 10 }, (_, i) => f64Literal(1 / (2 * (10 - i) + 1)));

export const LN = `
const F64_TWO = ${f64Literal(2)};
const SQRT2 = ${f64Literal(Math.SQRT2)};
const MIN_NORMAL = ${f64Literal(2 ** -1022)};
const TWO54 = ${f64Literal(2 ** 54)};
/** The core's ln (detmath.rs), operation for operation. */
fn f_ln(x: vec2<u32>) -> vec2<u32> {
  if (f_isnan(x) || ((x.y & 0x80000000u) != 0u && !f_iszero(x))) { return F64_QNAN; }
  if (f_iszero(x)) { return vec2<u32>(0u, 0xfff00000u); }
  if (f_isinf(x)) { return x; }
  var xx = x;
  var e = 0;
  if (f_lt(xx, MIN_NORMAL)) { xx = f_mul(xx, TWO54); e = -54; }
  e = e + i32(f_bexp(xx)) - 1023;
  var m = vec2<u32>(xx.x, (xx.y & 0xfffffu) | 0x3ff00000u);
  if (f_lt(SQRT2, m)) { m = f_mul(m, F64_HALF); e = e + 1; }
  let f = f_sub(m, F64_ONE);
  let s = f_div(f, f_add(F64_TWO, f));
  let z = f_mul(s, s);
  var poly = ${f64Literal(1 / 23)};
  var c = array<vec2<u32>, 10>(${POLY.join(', ')});
  for (var i = 0; i < 10; i = i + 1) { poly = f_add(f_mul(poly, z), c[i]); }
  let two_s = f_mul(F64_TWO, s);
  let ln_m = f_add(two_s, f_mul(f_mul(two_s, z), poly));
  let ef = f_from_f32(bitcast<u32>(f32(e)));
  return f_add(f_mul(ef, LN2_HI), f_add(f_mul(ef, LN2_LO), ln_m));
}
`;

/**
 * Phases (one dispatch each, a shader each: AUX_LOSS[phase]), so that each exp is computed once and the exps run on every
 * (token, expert) at once: 0 per token: the non-finite flag, a masked row's zeros, mode 0 whole
 * (no exps), the row's maximum; 1 per (token, expert): the exp; 2 per token: the row's sums in
 * expert order and its term; 3 per (token, expert): the gradient. Each value goes through the
 * same operations in the same order as in one thread per token (the core's), so the bits are the
 * same. `out`: word 0 the non-finite flag, then the row terms (float64, from word 2): one read.
 * Scratch row (modes 1, 2): exps [2E], max, sum, q * factor or z-loss's scale [2 each].
 */
const AUX_LOSS_COMMON = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> maskw: array<u32>;
@group(0) @binding(3) var<storage, read> counts: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> grad: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read_write> scratch: array<u32>;
${F64}
${LN}
fn key(b: u32) -> u32 {
  if ((b & 0x7fffffffu) == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn masked(t: u32) -> bool { return P[3] == 1u && ((maskw[t >> 2u] >> ((t & 3u) * 8u)) & 0xffu) == 0u; }
fn ld64(i: u32) -> vec2<u32> { return vec2<u32>(scratch[i], scratch[i + 1u]); }
fn st64(i: u32, v: vec2<u32>) { scratch[i] = v.x; scratch[i + 1u] = v.y; }
fn row_value(t: u32, v: vec2<u32>) { atomicStore(&out[2u + 2u * t], v.x); atomicStore(&out[3u + 2u * t], v.y); }
/** Where row t's scratch starts, and its max, sum and q (or scale) after the exps. */
fn at(t: u32) -> u32 { return t * (2u * P[1] + 6u); }
fn misc(t: u32) -> u32 { return at(t) + 2u * P[1]; }

fn phase0(t: u32) {
  let E = P[1]; let mode = P[2]; let row = t * E;
  for (var e = 0u; e < E; e = e + 1u) { if ((x[row + e] & 0x7f800000u) == 0x7f800000u) { atomicStore(&out[0], 1u); } }
  if (masked(t)) {
    for (var e = 0u; e < E; e = e + 1u) { grad[row + e] = 0u; }
    row_value(t, vec2<u32>(0u, 0u));
    return;
  }
  let factor = vec2<u32>(P[4], P[5]);
  if (mode == 0u) {
    var s = vec2<u32>(0u, 0x80000000u);
    for (var e = 0u; e < E; e = e + 1u) {
      s = f_add(s, f_mul(f_from_f32(x[row + e]), counts[e]));
      grad[row + e] = f_to_f32(f_mul(counts[e], factor));
    }
    row_value(t, s);
    return;
  }
  var mx = 0xff800000u;
  for (var e = 0u; e < E; e = e + 1u) { if (key(x[row + e]) > key(mx)) { mx = x[row + e]; } }
  st64(misc(t), f_from_f32(mx));
}

fn phase1(t: u32, e: u32) { st64(at(t) + 2u * e, f_exp(f_sub(f_from_f32(x[t * P[1] + e]), ld64(misc(t))))); }

fn phase2(t: u32) {
  let mode = P[2];
  var sum = vec2<u32>(0u, 0u);
  var weighted = vec2<u32>(0u, 0u);
  for (var e = 0u; e < P[1]; e = e + 1u) {
    let ex = ld64(at(t) + 2u * e);
    sum = f_add(sum, ex);
    if (mode == 1u) { weighted = f_add(weighted, f_mul(ex, counts[e])); }
  }
  st64(misc(t) + 2u, sum);
  if (mode == 1u) {
    let q = f_div(weighted, sum);
    row_value(t, q);
    st64(misc(t) + 4u, f_mul(q, vec2<u32>(P[4], P[5])));
  } else {
    let lse = f_add(ld64(misc(t)), f_ln(sum));
    row_value(t, f_mul(lse, lse));
    st64(misc(t) + 4u, f_div(f_mul(vec2<u32>(P[6], P[7]), lse), sum));
  }
}

fn phase3(t: u32, e: u32) {
  let ex = ld64(at(t) + 2u * e);
  let v = ld64(misc(t) + 4u);
  if (P[2] == 1u) {
    grad[t * P[1] + e] = f_to_f32(f_mul(f_div(ex, ld64(misc(t) + 2u)), f_sub(f_mul(counts[e], vec2<u32>(P[4], P[5])), v)));
  } else {
    grad[t * P[1] + e] = f_to_f32(f_mul(v, ex));
  }
}

`;

/** The four phases' shaders (AUX_LOSS_COMMON). */
export const AUX_LOSS = ['phase0(t);', 'if (!masked(t)) { phase1(t, e); }', 'if (!masked(t)) { phase2(t); }', 'if (!masked(t)) { phase3(t, e); }'].map(
  (call, phase) => AUX_LOSS_COMMON + phaseMain(['x', 'maskw', 'counts', 'grad', 'out', 'scratch'], phase % 2 === 1 ? 'cells' : 'tokens', call),
);
