/**
 * The aux losses on the GPU (crates/moe-core/src/aux_loss.rs step for step): one thread per
 * token computes its row's statistics in software float64 (f64.ts: the core's exp, and its ln
 * ported here) and writes its gradient row; the per-row terms come back to the host, which adds
 * them in token order in JavaScript (IEEE float64, the core's order) and scales the loss.
 *
 * P = [T, E, mode (0 switch on probs, 1 switch from logits, 2 z-loss), hasMask, factor lo, hi,
 *      2 * coeff / n lo, hi].
 */
import { F64, f64Literal } from './f64.js';

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

export const AUX_LOSS = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> maskw: array<u32>;
@group(0) @binding(3) var<storage, read> counts: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> grad: array<u32>;
@group(0) @binding(5) var<storage, read_write> rowvals: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read_write> flag: array<atomic<u32>>;
${F64}
${LN}
fn key(b: u32) -> u32 {
  if ((b & 0x7fffffffu) == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn body(t: u32) {
  let E = P[1]; let mode = P[2]; let row = t * E;
  for (var e = 0u; e < E; e = e + 1u) { if ((x[row + e] & 0x7f800000u) == 0x7f800000u) { atomicStore(&flag[0], 1u); } }
  if (P[3] == 1u && ((maskw[t >> 2u] >> ((t & 3u) * 8u)) & 0xffu) == 0u) {
    for (var e = 0u; e < E; e = e + 1u) { grad[row + e] = 0u; }
    rowvals[t] = vec2<u32>(0u, 0u);
    return;
  }
  let factor = vec2<u32>(P[4], P[5]);
  if (mode == 0u) {
    var s = vec2<u32>(0u, 0x80000000u);
    for (var e = 0u; e < E; e = e + 1u) {
      s = f_add(s, f_mul(f_from_f32(x[row + e]), counts[e]));
      grad[row + e] = f_to_f32(f_mul(counts[e], factor));
    }
    rowvals[t] = s;
    return;
  }
  var mx = 0xff800000u;
  for (var e = 0u; e < E; e = e + 1u) { if (key(x[row + e]) > key(mx)) { mx = x[row + e]; } }
  let m = f_from_f32(mx);
  var sum = vec2<u32>(0u, 0u);
  var weighted = vec2<u32>(0u, 0u);
  for (var step = 0u; step < 2u; step = step + 1u) {
    // step 0: the row's sums; step 1: its gradient (the same exps)
    var q = vec2<u32>(0u, 0u);
    var scale = vec2<u32>(0u, 0u);
    if (step == 1u) {
      if (mode == 1u) {
        q = f_div(weighted, sum);
        rowvals[t] = q;
        q = f_mul(q, factor);
      } else {
        let lse = f_add(m, f_ln(sum));
        rowvals[t] = f_mul(lse, lse);
        scale = f_div(f_mul(vec2<u32>(P[6], P[7]), lse), sum);
      }
    }
    for (var e = 0u; e < E; e = e + 1u) {
      let ex = f_exp(f_sub(f_from_f32(x[row + e]), m));
      if (step == 0u) {
        sum = f_add(sum, ex);
        if (mode == 1u) { weighted = f_add(weighted, f_mul(ex, counts[e])); }
      } else if (mode == 1u) {
        grad[row + e] = f_to_f32(f_mul(f_div(ex, sum), f_sub(f_mul(counts[e], factor), q)));
      } else {
        grad[row + e] = f_to_f32(f_mul(scale, ex));
      }
    }
  }
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 64u;
  if (t >= P[0]) { return; }
  body(t);
}
`;
