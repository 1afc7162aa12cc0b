/**
 * route on the GPU: the core's `route_checked` (crates/moe-core/src/routing.rs) step for step,
 * in five phases (one thread per token, or per (token, expert) for the exps and scores), its
 * float64 steps in software float64 (f64.ts: the core's exp, and IEEE add / multiply / divide)
 * and its float32 steps (key = score + bias, group sums) in f32.
 * Every score function (sqrtsoftplus with the core's ln_1p and a correctly rounded sqrt); groups, bias, softmaxBeforeTopk, normTopkProb, routeScale, tokenMask.
 *
 * P = [T, E, k, scoreFunction (0 softmax, 1 sigmoid, 2 softmax_with_bias, 3 sigmoid_with_bias),
 *      softmaxBeforeTopk, hasBias, numGroups, topkGroups, top2GroupScore, normalise, hasMask,
 *      routeScale lo, routeScale hi, logits dtype (0 f32, 1 bf16, 2 f16), scratch stride, 0 (unused:
 *      a shader a phase), pass (0 exact, 1 fast, 2 exact over the fast pass's list), the fast pass's margins for the
 *      scores and the weights, expertBias bits [E]...].
 */
import { LN } from './aux-loss.js';
import { F32_FAST, F64, F64_ACC, f64Literal } from './f64.js';
import { CONVERT, phaseMain } from './shaders.js';

/**
 * What route and routeBackward share (the shader binds P, logits and scratch): the logits' bits
 * (P[13]: 0 f32, 1 bf16, 2 f16), the core's ln_1p, the top-k order on float32 bits, float64
 * loads and stores in the scratch.
 */
const ROUTE_HELPERS = `
${CONVERT}
${F64}
${LN}
const EPS20 = ${f64Literal(1e-20)};
const TWENTY = ${f64Literal(20)};
/** The core's ln_1p (detmath.rs). */
fn f_ln_1p(y: vec2<u32>) -> vec2<u32> {
  let u = f_add(F64_ONE, y);
  if (u.x == 0u && u.y == 0x3ff00000u) { return y; }
  return f_mul(f_ln(u), f_div(y, f_sub(u, F64_ONE)));
}
const NEG_INF = 0xff800000u;

fn logit_bits(i: u32) -> u32 {
  let d = P[13];
  if (d == 0u) { return logits[i]; }
  let h = (logits[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
  if (d == 1u) { return h << 16u; }
  return bitcast<u32>(f16_to_f32(h));
}
/** The top-k's order on float32 bits: -0 = +0, NaN lowest (the core's canon). */
fn key(b: u32) -> u32 {
  if ((b & 0x7fffffffu) > 0x7f800000u) { return 0x007fffffu; }
  if ((b & 0x7fffffffu) == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn f32add(a: u32, b: u32) -> u32 { return bitcast<u32>(bitcast<f32>(a) + bitcast<f32>(b)); }
fn ld64(i: u32) -> vec2<u32> { return vec2<u32>(scratch[i], scratch[i + 1u]); }
fn st64(i: u32, v: vec2<u32>) { scratch[i] = v.x; scratch[i + 1u] = v.y; }
`;

/** What each phase of route's two passes runs for its thread (phaseMain's `t`, `e`). */
const FAST_CALLS = ['phase0(t);', 'phase1_fast(t, e);', 'phase2_fast(t);', 'phase3_fast(t, e);', 'phase4(t);', 'if (t == 0u) { phase5(); }'];
const EXACT_CALLS = ['', 'phase1(t, e);', 'phase2(t);', 'phase3(t, e);', 'phase4(t);'];
const ROUTE_BINDINGS = ['logits', 'maskw', 'scores', 'indices', 'weights', 'scratch', 'flag'];

/**
 * The exact pass's entry for one phase: over every token (or cell), or (P[16] == 2) over the
 * rows the fast pass listed (their count at flag[7], the rows from flag[12]), striding over
 * them (dispatched from the list a thread a row or cell, or directly on fewer workgroups:
 * `passes.lists`).
 */
function exactMain(phase: number): string {
  const perCell = phase % 2 === 1;
  return /* wgsl */ `
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  ${ROUTE_BINDINGS.map((b) => `_ = &${b};`).join(' ')}
  let listed = P[16] == 2u;
  var n = P[0];
  if (listed) { n = flag[7]; }
${perCell ? '  let m = n * P[1];' : '  let m = n;'}
  for (var i = gid.x + gid.y * nwg.x * 64u; i < m; i += nwg.x * nwg.y * 64u) {
${
  perCell
    ? `    let li = i / P[1];
    let e = i - li * P[1];
    var t = li;
    if (listed) { t = flag[12u + li]; }`
    : `    var t = i;
    if (listed) { t = flag[12u + i]; }`
}
    ${EXACT_CALLS[phase]}
  }
}
`;
}

/**
 * route's shader in one of its two passes (P[16]: 0 every row exactly, 1 the fast pass, 2 the
 * rows the fast pass listed, exactly); phase 0 (the non-finite flag, the row's maximum) is the
 * fast shader's for both (the exact shader only reads the flag's buffer: its list):
 * - `exact`: the core's float64 steps in software float64, bit for bit (every score function);
 * - `fast` (softmax and sigmoid): the exps in 64-bit fixed point (F32_FAST's exp_reduced: the
 *   argument x - max (or -x) reduced exactly from the logits' float32 bits), softmax's sum of
 *   them as the exact pass sums, each quotient by a 64-bit reciprocal, rounded to float32 only
 *   where it lies farther from a rounding boundary than the two computations can differ by
 *   (`routeMargins`): then the core's float32 is the same. A row with a value it cannot decide
 *   (near a boundary, a quotient out of float32's normal range, an argument the core rounds) is
 *   listed (after the non-finite flag's word: [flag, 0, 0, 0, workgroups (x, y, z) per (row,
 *   expert), n, workgroups (x, y, z) per row, 0, rows [T], a mark per row [T]]) and the exact
 *   pass redoes the whole row, dispatched from that list.
 *
 * One shader a phase (`phase`: phaseMain, exactMain), the fast pass's phases 1 and 3 for softmax
 * or for sigmoid (`sigmoid`), not branches: SwiftShader runs both sides of a branch whatever its
 * lanes take.
 */
export function routeShader(pass: 'exact' | 'fast', sigmoid = false, phase = 1): string {
  const fast = pass === 'fast';
  const softmaxWeights = fast
    ? `      // the picks' exps (the scores' exps, as in the exact pass) over their sum
      var sum = vec2<u32>(0u, 0u);
      for (var j = 0u; j < k; j = j + 1u) { sum = f_add(sum, ld64(base + 2u * u32(indices[o + j]))); }
      let rc = fx_recip(fx_of(sum));
      for (var j = 0u; j < k; j = j + 1u) {
        let v = ld64(base + 2u * u32(indices[o + j]));
        var w = vec2<u32>(0u, 0u);
        if (!f_iszero(v)) {
          let r = fx_round(fx_mul(fx_of(v), rc), P[18]);
          if (r.y == 1u) { mark(t); return; }
          w = f_from_f32(r.x);
        }
        st64(wide + 2u * j, w);
      }`
    : `      // exp(logit - logit of the first pick): the first pick is the row's maximum (lowest id
      // among equals), the max the scores used, so these are the scores' exps
      var sum = vec2<u32>(0u, 0u);
      for (var j = 0u; j < k; j = j + 1u) {
        let w = ld64(base + 2u * u32(indices[o + j]));
        st64(wide + 2u * j, w);
        sum = f_add(sum, w);
      }
      for (var j = 0u; j < k; j = j + 1u) { st64(wide + 2u * j, f_from_f32(f_to_f32(f_div(ld64(wide + 2u * j), sum)))); }`;
  const skipMarked = fast ? '  if (marked(t)) { return; }\n' : '';
  const tail = fast ? FAST_TAIL : EXACT_TAIL;
  return `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read> maskw: array<u32>;
@group(0) @binding(3) var<storage, read_write> scores: array<u32>;
@group(0) @binding(4) var<storage, read_write> indices: array<i32>;
@group(0) @binding(5) var<storage, read_write> weights: array<u32>;
@group(0) @binding(6) var<storage, read_write> scratch: array<u32>;
@group(0) @binding(7) var<storage, ${fast ? 'read_write> flag: array<atomic<u32>>' : 'read> flag: array<u32>'};
${ROUTE_HELPERS}
${F64_ACC}
${fast ? F32_FAST : ''}
const BIAS = 19u;

// Phases (one dispatch each, a shader each: phaseMain, exactMain): 0 per token: the finiteness flag and the row's maximum; 1
// per (token, expert): the exp; 2 per token: softmax's sum of the exps, in expert order; 3 per
// (token, expert): the score; 4 per token: keys, groups, top-k, weights, normalisation (5, the
// fast pass: one thread, the list's workgroup counts). Each value goes through the same
// operations in the same order as in one thread per token, so the bits are the same.
// Scratch row: exps [2E words], keys [E], group keys [E], weights [2k], max [2], sum [2], the
// sum's reciprocal [2] (fast), the max's float32 bits [1].
fn is_softmax() -> bool { return P[3] == 0u || P[3] == 2u; }
fn at_max(t: u32) -> u32 { return t * P[14] + 4u * P[1] + 2u * P[2]; }

${fast ? PHASE0 + FAST_PHASES + (sigmoid ? PHASE1_SIGMOID + PHASE3_SIGMOID : PHASE1_SOFTMAX + PHASE3_SOFTMAX) : EXACT_PHASES}${phase4(softmaxWeights, skipMarked, tail)}
${fast ? phaseMain(ROUTE_BINDINGS, phase % 2 === 1 && phase < 5 ? 'cells' : 'tokens', FAST_CALLS[phase]) : exactMain(phase)}
`;
}

/** Phase 0 of both passes: the non-finite flag, the row's maximum (float64, and its float32 bits). */
const PHASE0 = /* wgsl */ `
fn phase0(t: u32) {
  let E = P[1];
  let row = t * E;
  for (var e = 0u; e < E; e = e + 1u) { if ((logit_bits(row + e) & 0x7f800000u) == 0x7f800000u) { atomicStore(&flag[0], 1u); } }
  var mx = NEG_INF;
  for (var e = 0u; e < E; e = e + 1u) { let b = logit_bits(row + e); if (key(b) > key(mx)) { mx = b; } }
  st64(at_max(t), f_from_f32(mx));
  scratch[at_max(t) + 6u] = mx;
}
`;

/** The exact pass's phases 1, 2 and 3 (routeShader). */
const EXACT_PHASES = /* wgsl */ `
// 1. unbiased scores: float64, rounded once to float32. softmax: exp(x - max) / sum (the exps
// are kept: the default softmax's weights reuse them); sigmoid: 1 / (1 + exp(-x)).
fn phase1(t: u32, e: u32) {
  let sf = P[3];
  let x = f_from_f32(logit_bits(t * P[1] + e));
  var arg = f_neg(x);
  if (is_softmax()) { arg = f_sub(x, ld64(at_max(t))); }
  if (sf == 4u) { arg = vec2<u32>(x.x, x.y | 0x80000000u); } // sqrtsoftplus: exp(-|x|)
  st64(t * P[14] + 2u * e, f_exp(arg));
}

// softmax's sum of the exps from +0, in expert order, each addition rounded as f_add: through
// F64_ACC's unpacked sum (no unpacking and packing at each step), where every exp is a normal
// number or zero (the sum of such stays normal: the row's maximum gives exp(0) = 1); a row with a
// subnormal exp (a logit more than ~708 below the row's maximum) adds with f_add
fn phase2(t: u32) {
  let base = t * P[14];
  var acc = Acc(0u, 0, vec2<u32>(0u, 0u));
  var plain = true;
  for (var e = 0u; e < P[1]; e = e + 1u) {
    let x = ld64(base + 2u * e);
    if (f_bexp(x) == 0x7ffu || (f_bexp(x) == 0u && !f_iszero(x))) { plain = false; break; }
    acc = dot_add(acc, acc_of(x));
  }
  var sum = acc_bits(acc);
  if (!plain) {
    sum = vec2<u32>(0u, 0u);
    for (var e = 0u; e < P[1]; e = e + 1u) { sum = f_add(sum, ld64(base + 2u * e)); }
  }
  st64(at_max(t) + 2u, sum);
}

fn phase3(t: u32, e: u32) {
  let sf = P[3];
  let row = t * P[1];
  var num = ld64(t * P[14] + 2u * e);
  if (sf == 4u) {
    // sqrt(softplus(x)); softplus is exactly x above 20 (torch's threshold)
    let x = f_from_f32(logit_bits(row + e));
    var sp = x;
    if (!f_lt(TWENTY, x)) {
      var pos = x;
      if (f_lt(x, vec2<u32>(0u, 0u))) { pos = vec2<u32>(0u, 0u); }
      sp = f_add(pos, f_ln_1p(num));
    }
    scores[row + e] = f_to_f32(f_sqrt(sp));
    return;
  }
  var den = vec2<u32>(0u, 0u);
  if (is_softmax()) { den = ld64(at_max(t) + 2u); } else { den = f_add(F64_ONE, num); num = F64_ONE; }
  scores[row + e] = f_to_f32(f_div(num, den));
}
`;

/** Phase 4 (per token: keys, groups, top-k, weights, normalisation), with softmax's weights over the picks as `softmaxWeights` computes them. */
function phase4(softmaxWeights: string, skipMarked: string, tail: string): string {
  return `
fn phase4(t: u32) {
${skipMarked}  let E = P[1]; let k = P[2]; let sf = P[3]; let G = P[6];
  let row = t * E;
  let base = t * P[14];
  let KEYS = base + 2u * E;
  let GKEYS = base + 3u * E;

  // 2. the keys of the selection
  for (var e = 0u; e < E; e = e + 1u) {
    var kb = scores[row + e];
    if (sf == 0u && P[4] == 0u) { kb = logit_bits(row + e); } else if (P[5] == 1u) { kb = f32add(scores[row + e], P[BIAS + e]); }
    scratch[KEYS + e] = kb;
  }
  if (G > 1u) {
    let size = E / G;
    for (var g = 0u; g < G; g = g + 1u) {
      var first = NEG_INF;
      var second = NEG_INF;
      for (var e = g * size; e < (g + 1u) * size; e = e + 1u) {
        let v = scratch[KEYS + e];
        if (key(v) > key(first)) { second = first; first = v; } else if (key(v) > key(second)) { second = v; }
      }
      var gk = first;
      if (P[8] == 1u) { gk = f32add(first, second); }
      scratch[GKEYS + g] = gk;
    }
    var masked = 0u;
    if (sf == 3u) { masked = NEG_INF; }
    for (var g = 0u; g < G; g = g + 1u) {
      let kg = key(scratch[GKEYS + g]);
      var rank = 0u;
      for (var h = 0u; h < G; h = h + 1u) {
        let kh = key(scratch[GKEYS + h]);
        if (kh > kg || (kh == kg && h < g)) { rank = rank + 1u; }
      }
      if (rank >= P[7]) { for (var e = g * size; e < (g + 1u) * size; e = e + 1u) { scratch[KEYS + e] = masked; } }
    }
  }

  // 3. top-k (ties to the lower expert), weights
  let o = t * k;
  let masked_token = P[10] == 1u && ((maskw[t >> 2u] >> ((t & 3u) * 8u)) & 0xffu) == 0u;
  if (masked_token) {
    for (var j = 0u; j < k; j = j + 1u) { indices[o + j] = -1; weights[o + j] = 0u; }
  } else {
    var n = 0u;
    if (k <= 16u) {
      // the picks and their keys in the thread's own arrays (not re-read from the buffers at
      // each comparison), written out once: the same insertion, the same picks
      var pk: array<u32, 16>;
      var pi: array<i32, 16>;
      for (var e = 0u; e < E; e = e + 1u) {
        let kb = key(scratch[KEYS + e]);
        if (n == k && kb <= pk[k - 1u]) { continue; }
        var j = n;
        if (n == k) { j = k - 1u; } else { n = n + 1u; }
        loop {
          if (j == 0u || pk[j - 1u] >= kb) { break; }
          pk[j] = pk[j - 1u];
          pi[j] = pi[j - 1u];
          j = j - 1u;
        }
        pk[j] = kb;
        pi[j] = i32(e);
      }
      for (var j = 0u; j < k; j = j + 1u) { indices[o + j] = pi[j]; }
    } else {
      for (var e = 0u; e < E; e = e + 1u) {
        let kb = key(scratch[KEYS + e]);
        if (n == k && kb <= key(scratch[KEYS + u32(indices[o + k - 1u])])) { continue; }
        var j = n;
        if (n == k) { j = k - 1u; } else { n = n + 1u; }
        loop {
          if (j == 0u || key(scratch[KEYS + u32(indices[o + j - 1u])]) >= kb) { break; }
          indices[o + j] = indices[o + j - 1u];
          j = j - 1u;
        }
        indices[o + j] = i32(e);
      }
    }
    let wide = base + 4u * E;
    if (sf == 0u && P[4] == 0u) {
${softmaxWeights}
    } else {
      for (var j = 0u; j < k; j = j + 1u) { st64(wide + 2u * j, f_from_f32(scores[row + u32(indices[o + j])])); }
    }
${tail}
}
`;
}

// 1. e^(x - max) (softmax) or e^-x (sigmoid) in fixed point (F32_FAST's exp_diff), stored as float64
const PHASE1_SOFTMAX = /* wgsl */ `
fn phase1_fast(t: u32, e: u32) {
  let xb = logit_bits(t * P[1] + e);
  let at = t * P[14] + 2u * e;
  let mb = scratch[at_max(t) + 6u];
  let d = bitcast<f32>(xb) - bitcast<f32>(mb);
  // below e^-700 the core's score is +0, and its exp changes no sum (the max's exp is 1)
  if (!(d >= -700.0)) {
    st64(at, vec2<u32>(0u, 0u));
    return;
  }
  // the core's argument x - max is exact in float64 unless the two are far apart in magnitude
  // (and neither is zero): such a row goes to the exact pass
  let ex = max(i32((xb >> 23u) & 0xffu), 1);
  let em = max(i32((mb >> 23u) & 0xffu), 1);
  if (abs(ex - em) > 28 && (xb & 0x7fffffffu) != 0u && (mb & 0x7fffffffu) != 0u) {
    mark(t);
    return;
  }
  st64(at, exp_diff(xb, mb));
}
`;
const PHASE1_SIGMOID = /* wgsl */ `
fn phase1_fast(t: u32, e: u32) {
  let xb = logit_bits(t * P[1] + e);
  let at = t * P[14] + 2u * e;
  let x = bitcast<f32>(xb);
  // above 37, e^-x < 2^-53: 1 + it rounds to 1, the score is 1 (stored: 0); below -104 the
  // score is below 2^-150, +0 (stored: infinity)
  if (x > 37.0) {
    st64(at, vec2<u32>(0u, 0u));
    return;
  }
  if (!(x >= -104.0)) {
    st64(at, vec2<u32>(0u, 0x7ff00000u));
    return;
  }
  st64(at, exp_diff(0u, xb));
}
`;

// 3. the score: exp / sum (softmax), 1 / (1 + exp) (sigmoid), rounded to float32 where decided;
// +0 where the exp stored says so (softmax: 0, below e^-700; sigmoid: infinity, below -104)
function phase3Fast(vanished: string, rounded: string): string {
  return /* wgsl */ `
fn phase3_fast(t: u32, e: u32) {
  if (marked(t)) { return; }
  let i = t * P[1] + e;
  let v = ld64(t * P[14] + 2u * e);
  if (${vanished}) {
    scores[i] = 0u;
    return;
  }
  score(t, i, ${rounded});
}
`;
}
const PHASE3_SOFTMAX = phase3Fast('f_iszero(v)', 'fx_round(fx_mul(fx_of(v), Fx(ld64(at_max(t) + 4u), 1022 - i32(f_bexp(ld64(at_max(t) + 2u))))), P[17])');
const PHASE3_SIGMOID = phase3Fast('f_isinf(v)', 'sigmoid_fast(v)');

/** Phase 4's weights (scaled, normalised) and normalised scores: the exact pass's software float64. */
const EXACT_TAIL = /* wgsl */ `
    let rs = vec2<u32>(P[11], P[12]);
    if (P[9] == 1u) {
      var s = vec2<u32>(0u, 0u);
      for (var j = 0u; j < k; j = j + 1u) { s = f_add(s, ld64(wide + 2u * j)); }
      let denom = f_add(s, EPS20);
      for (var j = 0u; j < k; j = j + 1u) { weights[o + j] = f_to_f32(f_mul(f_div(ld64(wide + 2u * j), denom), rs)); }
    } else {
      for (var j = 0u; j < k; j = j + 1u) { weights[o + j] = f_to_f32(f_mul(ld64(wide + 2u * j), rs)); }
    }
  }

  // 4. scores normalised per row when the weights are
  if (P[9] == 1u) {
    var s = vec2<u32>(0u, 0u);
    for (var e = 0u; e < E; e = e + 1u) { s = f_add(s, f_from_f32(scores[row + e])); }
    let d = f_add(s, EPS20);
    for (var e = 0u; e < E; e = e + 1u) { scores[row + e] = f_to_f32(f_div(f_from_f32(scores[row + e]), d)); }
  }`;

/** The same in the fast pass, decided in fixed point where two float64 roundings cannot change the float32. */
const FAST_TAIL = /* wgsl */ `
    // weights w (normalised: w / (sum + 1e-20)) times routeScale, each float32 decided past two
    // float64 roundings (the operands are exact: float32 scores or weights decided above)
    let rs = fx_of(vec2<u32>(P[11], P[12]));
    let neg = P[12] & 0x80000000u;
    var rd = Fx(vec2<u32>(0u, 0x80000000u), 0);
    if (P[9] == 1u) {
      var s = vec2<u32>(0u, 0u);
      for (var j = 0u; j < k; j = j + 1u) { s = f_add(s, ld64(wide + 2u * j)); }
      rd = fx_recip(fx_of(f_add(s, EPS20)));
    }
    for (var j = 0u; j < k; j = j + 1u) {
      let w = ld64(wide + 2u * j);
      var bits = neg;
      if (!f_iszero(w)) {
        let r = fx_round(fx_mul(fx_mul(fx_of(w), rd), rs), MU_EXACT);
        if (r.y == 1u) { mark(t); return; }
        bits = r.x | neg;
      }
      weights[o + j] = bits;
    }
  }

  // 4. scores normalised per row when the weights are: the sum as the exact pass adds it, each
  // quotient decided past the division's rounding
  if (P[9] == 1u) {
    var acc = Acc(0u, 0, vec2<u32>(0u, 0u));
    for (var e = 0u; e < E; e = e + 1u) { acc = dot_add(acc, acc_of(f_from_f32(scores[row + e]))); }
    let rd = fx_recip(fx_of(f_add(acc_bits(acc), EPS20)));
    for (var e = 0u; e < E; e = e + 1u) {
      let v = scores[row + e];
      if (v == 0u) { continue; }
      let r = fx_round(fx_mul(fx_of(f_from_f32(v)), rd), MU_EXACT);
      if (r.y == 1u) { mark(t); return; }
      scores[row + e] = r.x;
    }
  }`;

/** The fast pass's list, phases 2 and 5 and their helpers (routeShader; phases 1 and 3 by score function). */
const FAST_PHASES = /* wgsl */ `
/** Lists row t for the exact pass (once). */
fn mark(t: u32) {
  if (atomicOr(&flag[12u + P[0] + t], 1u) == 0u) {
    let at = atomicAdd(&flag[7], 1u);
    atomicStore(&flag[12u + at], t);
  }
}
fn marked(t: u32) -> bool { return atomicLoad(&flag[12u + P[0] + t]) != 0u; }
/** A positive value m 2^(e - 63), m's leading one at bit 63 (the fast pass's arithmetic). */
struct Fx { m: vec2<u32>, e: i32 }
/** A normal float64's magnitude. */
fn fx_of(a: vec2<u32>) -> Fx { return Fx(u_shl(f_sig(a), 11u), i32(f_bexp(a)) - 1023); }
/** a b, truncated (relative error below 2^-62). */
fn fx_mul(a: Fx, b: Fx) -> Fx {
  let p = mul_hi64(a.m, b.m);
  if ((p.y >> 31u) == 0u) { return Fx(u_shl(p, 1u), a.e + b.e); }
  return Fx(p, a.e + b.e + 1);
}
/** 1 / a, truncated (relative error below 2^-63). */
fn fx_recip(a: Fx) -> Fx { return Fx(recip64(a.m), -a.e - 1); }
/** a rounded to float32 where at least 2^-(mu + 1) of it from a rounding boundary (round_fixed). */
fn fx_round(a: Fx, mu: u32) -> vec2<u32> { return round_fixed(a.m, a.e, mu); }
/**
 * The margin where both operands are exact and the core rounds twice in float64 (2^-53 each)
 * before float32: with the truncations, below 2^-51.9 < 2^-(50 + 1).
 */
const MU_EXACT = 50u;
/** round_fixed's 1 / (1 + v) (sigmoid's score from v = e^-x), 1 + v rounded as the core rounds it. */
fn sigmoid_fast(v: vec2<u32>) -> vec2<u32> { return fx_round(fx_recip(fx_of(f_add(F64_ONE, v))), P[17]); }
/** Score i of row t: round_fixed's float32 (r.x), or the row listed where it could not decide (r.y == 1). */
fn score(t: u32, i: u32, r: vec2<u32>) {
  if (r.y == 1u) {
    mark(t);
    return;
  }
  scores[i] = r.x;
}

// softmax's sum as the exact pass adds it (every exp here is normal or zero), and its reciprocal
fn phase2_fast(t: u32) {
  if (marked(t)) { return; }
  let base = t * P[14];
  var acc = Acc(0u, 0, vec2<u32>(0u, 0u));
  for (var e = 0u; e < P[1]; e = e + 1u) { acc = dot_add(acc, acc_of(ld64(base + 2u * e))); }
  let sum = acc_bits(acc);
  st64(at_max(t) + 2u, sum);
  st64(at_max(t) + 4u, fx_recip(fx_of(sum)).m);
}

// the list's workgroup counts: per (row, expert) at words 4..6, per row at 8..10 (x <= 65535)
fn phase5() {
  let n = atomicLoad(&flag[7]);
  let w1 = (n * P[1] + 63u) / 64u;
  let w2 = (n + 63u) / 64u;
  atomicStore(&flag[4], min(w1, 65535u));
  atomicStore(&flag[5], (w1 + 65534u) / 65535u);
  atomicStore(&flag[6], 1u);
  atomicStore(&flag[8], min(w2, 65535u));
  atomicStore(&flag[9], (w2 + 65534u) / 65535u);
  atomicStore(&flag[10], 1u);
}
`;

/**
 * The fast pass's margins (P[17] for the scores, P[18] for softmax's weights over the picks):
 * mu such that a float32 is decided only where the value lies more than 2^(lead - mu) from a
 * rounding boundary (round_fixed; at least 2^-(mu + 1) of the value), which must exceed how far
 * the fast and the core's values can be apart. The two quotients differ
 * by at most 2 eta (each exp: the core's within 2^-47 of e^x, its Horner steps' rounding; the
 * fast one within 2^-48.4) + (2n - 1) 2^-53 (the n-term sums' roundings, the core's and this
 * pass's, and the core's division) + 2^-61 (the reciprocal and product's truncations); sigmoid:
 * eta + 3 2^-53 + 2^-61 (n = 2 covers it). Undefined where the margins get too wide for it.
 */
export function routeMargins(e: number, k: number): [number, number] | undefined {
  const eta = 2 ** -47 + 2 ** -48.4;
  // round_fixed's threshold is at least 2^-(mu + 1) of the value: 2^-(mu + 1) >= the bound
  const mu = (n: number) => Math.floor(-Math.log2(2 * eta + (2 * Math.max(n, 2) - 1) * 2 ** -53 + 2 ** -61)) - 1;
  const m: [number, number] = [mu(e), mu(k)];
  // (round_fixed takes 32 <= mu <= 62: below 32, millions of experts, the exact pass alone)
  return m.every((v) => v >= 32) ? m : undefined;
}

/**
 * routeBackward on the GPU: the core's `route_backward` row by row (routing.rs `BackwardRow`),
 * every step in software float64 as the core computes it, each sum from -0 (Rust's `sum()`) in
 * the core's order, the result rounded once to float32. Phases (a shader each): 0 per token: the
 * finiteness flag and the row's maximum; 1 per (token, expert): the unbiased scores' exps,
 * sigmoids or sqrt(softplus); 2 per token: softmax's sum; 3 per (token, expert): softmax's
 * division; 4 per token: the picks' weights and their gradient, the scores' gradient, softmax's
 * dot; 5 per (token, expert): through the score function, rounded into gradLogits (0 for a masked
 * token or a row of -1s).
 *
 * P = [T, E, k, scoreFunction, onLogits (softmax selecting on the logits), 0, 0, 0, 0,
 *      normalise, hasMask, routeScale lo, routeScale hi, logits dtype, scratch stride, 0 (unused),
 *      hasGradScores]. Scratch row: s [2E], gs [2E], gx [2E], u [2k], gu [2k], max, sum, dot
 * [2 each], after word 0: the non-finite flag (every thread that finds one writes 1).
 */
const ROUTE_BACKWARD_COMMON = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read> maskw: array<u32>;
@group(0) @binding(3) var<storage, read> indices: array<i32>;
@group(0) @binding(4) var<storage, read> gw: array<u32>;
@group(0) @binding(5) var<storage, read> gsc: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<u32>;
@group(0) @binding(7) var<storage, read_write> scratch: array<u32>;
${ROUTE_HELPERS}
const NEG_ZERO = vec2<u32>(0u, 0x80000000u);
const HALF = ${f64Literal(0.5)};
const TWO = ${f64Literal(2)};
fn is_softmax() -> bool { return P[3] == 0u || P[3] == 2u; }
fn need_scores() -> bool { return P[16] == 1u || P[4] == 0u; }
fn S(t: u32, e: u32) -> u32 { return 1u + t * P[14] + 2u * e; }
fn GS(t: u32, e: u32) -> u32 { return 1u + t * P[14] + 2u * (P[1] + e); }
fn GX(t: u32, e: u32) -> u32 { return 1u + t * P[14] + 2u * (2u * P[1] + e); }
fn U(t: u32, j: u32) -> u32 { return 1u + t * P[14] + 6u * P[1] + 2u * j; }
fn GU(t: u32, j: u32) -> u32 { return 1u + t * P[14] + 6u * P[1] + 2u * (P[2] + j); }
fn MISC(t: u32) -> u32 { return 1u + t * P[14] + 6u * P[1] + 4u * P[2]; }
fn x64(t: u32, e: u32) -> vec2<u32> { return f_from_f32(logit_bits(t * P[1] + e)); }
fn pick(t: u32, j: u32) -> u32 { return u32(indices[t * P[2] + j]); }
/** Whether token t gets a gradient: not masked, and its picks given (not a row of -1s). */
fn live(t: u32) -> bool {
  if (P[10] == 1u && ((maskw[t >> 2u] >> ((t & 3u) * 8u)) & 0xffu) == 0u) { return false; }
  for (var j = 0u; j < P[2]; j = j + 1u) { if (indices[t * P[2] + j] != -1) { return true; } }
  return false;
}

fn phase0(t: u32) {
  let E = P[1];
  var mx = NEG_INF;
  for (var e = 0u; e < E; e = e + 1u) {
    let b = logit_bits(t * E + e);
    if ((b & 0x7f800000u) == 0x7f800000u) { scratch[0] = 1u; }
    if (key(b) > key(mx)) { mx = b; }
  }
  st64(MISC(t), f_from_f32(mx));
}

// the unbiased scores in float64 (scores_f64): softmax's exps (divided in phase 3), sigmoid, sqrt(softplus)
fn phase1(t: u32, e: u32) {
  let sf = P[3];
  let x = x64(t, e);
  var arg = f_neg(x);
  if (is_softmax()) { arg = f_sub(x, ld64(MISC(t))); }
  if (sf == 4u) { arg = vec2<u32>(x.x, x.y | 0x80000000u); }
  let ex = f_exp(arg);
  if (is_softmax()) { st64(S(t, e), ex); return; }
  if (sf == 4u) {
    var sp = x;
    if (!f_lt(TWENTY, x)) {
      var pos = x;
      if (f_lt(x, vec2<u32>(0u, 0u))) { pos = vec2<u32>(0u, 0u); }
      sp = f_add(pos, f_ln_1p(ex));
    }
    st64(S(t, e), f_sqrt(sp));
    return;
  }
  st64(S(t, e), f_div(F64_ONE, f_add(F64_ONE, ex)));
}

fn phase2(t: u32) {
  var sum = NEG_ZERO;
  for (var e = 0u; e < P[1]; e = e + 1u) { sum = f_add(sum, ld64(S(t, e))); }
  st64(MISC(t) + 2u, sum);
}

fn phase3(t: u32, e: u32) { st64(S(t, e), f_div(ld64(S(t, e)), ld64(MISC(t) + 2u))); }

fn phase4(t: u32) {
  let E = P[1]; let k = P[2];
  if (!live(t)) { return; }
  for (var e = 0u; e < E; e = e + 1u) { st64(GX(t, e), vec2<u32>(0u, 0u)); st64(GS(t, e), vec2<u32>(0u, 0u)); }
  let on_logits = P[4] == 1u;
  let normalise = P[9] == 1u;
  // the picks' weights before normalisation: a softmax over the picked logits, or their scores
  if (on_logits) {
    var mx = NEG_INF;
    for (var j = 0u; j < k; j = j + 1u) { let b = logit_bits(t * E + pick(t, j)); if (key(b) > key(mx)) { mx = b; } }
    let m = f_from_f32(mx);
    var sum = NEG_ZERO;
    for (var j = 0u; j < k; j = j + 1u) { let u = f_exp(f_sub(x64(t, pick(t, j)), m)); st64(U(t, j), u); sum = f_add(sum, u); }
    for (var j = 0u; j < k; j = j + 1u) { st64(U(t, j), f_div(ld64(U(t, j)), sum)); }
  } else {
    for (var j = 0u; j < k; j = j + 1u) { st64(U(t, j), ld64(S(t, pick(t, j)))); }
  }
  let scale = vec2<u32>(P[11], P[12]);
  for (var j = 0u; j < k; j = j + 1u) { st64(GU(t, j), f_mul(f_from_f32(gw[t * k + j]), scale)); }
  if (normalise) {
    var su = NEG_ZERO;
    for (var j = 0u; j < k; j = j + 1u) { su = f_add(su, ld64(U(t, j))); }
    let denom = f_add(su, EPS20);
    var dot = NEG_ZERO;
    for (var j = 0u; j < k; j = j + 1u) { dot = f_add(dot, f_mul(ld64(GU(t, j)), f_div(ld64(U(t, j)), denom))); }
    for (var j = 0u; j < k; j = j + 1u) { st64(GU(t, j), f_div(f_sub(ld64(GU(t, j)), dot), denom)); }
  }
  if (on_logits) {
    var dot = NEG_ZERO;
    for (var j = 0u; j < k; j = j + 1u) { dot = f_add(dot, f_mul(ld64(GU(t, j)), ld64(U(t, j)))); }
    for (var j = 0u; j < k; j = j + 1u) {
      let e = pick(t, j);
      st64(GX(t, e), f_add(ld64(GX(t, e)), f_mul(ld64(U(t, j)), f_sub(ld64(GU(t, j)), dot))));
    }
  } else {
    for (var j = 0u; j < k; j = j + 1u) { let e = pick(t, j); st64(GS(t, e), f_add(ld64(GS(t, e)), ld64(GU(t, j)))); }
  }
  if (P[16] == 1u) {
    if (normalise) {
      var ss = NEG_ZERO;
      for (var e = 0u; e < E; e = e + 1u) { ss = f_add(ss, ld64(S(t, e))); }
      let denom = f_add(ss, EPS20);
      var dot = NEG_ZERO;
      for (var e = 0u; e < E; e = e + 1u) { dot = f_add(dot, f_mul(f_from_f32(gsc[t * E + e]), f_div(ld64(S(t, e)), denom))); }
      for (var e = 0u; e < E; e = e + 1u) { st64(GS(t, e), f_add(ld64(GS(t, e)), f_div(f_sub(f_from_f32(gsc[t * E + e]), dot), denom))); }
    } else {
      for (var e = 0u; e < E; e = e + 1u) { st64(GS(t, e), f_add(ld64(GS(t, e)), f_from_f32(gsc[t * E + e]))); }
    }
  }
  if (need_scores() && is_softmax()) {
    var dot = NEG_ZERO;
    for (var e = 0u; e < E; e = e + 1u) { dot = f_add(dot, f_mul(ld64(GS(t, e)), ld64(S(t, e)))); }
    st64(MISC(t) + 4u, dot);
  }
}

// through the score function, rounded once
fn phase5(t: u32, e: u32) {
  let i = t * P[1] + e;
  if (!live(t)) { out[i] = 0u; return; }
  var gx = ld64(GX(t, e));
  if (need_scores()) {
    let sf = P[3];
    let g = ld64(GS(t, e));
    let v = ld64(S(t, e));
    if (is_softmax()) {
      gx = f_add(gx, f_mul(v, f_sub(g, ld64(MISC(t) + 4u))));
    } else {
      let x = x64(t, e);
      // sigmoid: v * sigmoid(-x); sqrtsoftplus: sigmoid(x) / (2 v), 0.5 / v above 20, 0 where v is 0
      var arg = x;
      if (sf == 4u) { arg = f_neg(x); }
      let sg = f_div(F64_ONE, f_add(F64_ONE, f_exp(arg)));
      var d = vec2<u32>(0u, 0u);
      if (sf == 4u) {
        if (v.x != 0u || (v.y & 0x7fffffffu) != 0u) {
          var num = sg;
          var den = f_mul(TWO, v);
          if (f_lt(TWENTY, x)) { num = HALF; den = v; }
          d = f_div(num, den);
        }
      } else {
        d = f_mul(v, sg);
      }
      gx = f_add(gx, f_mul(g, d));
    }
  }
  out[i] = f_to_f32(gx);
}

`;

/** tokensPerExpert of route's picks: one thread per pick adds 1 to its expert's count (integer atomics: the counts do not depend on the order; -1 is not counted). P = [T * k, E]. */
export const COUNT_PICKS = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> indices: array<i32>;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<i32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= P[0]) { return; }
  let v = indices[i];
  if (v >= 0 && u32(v) < P[1]) { atomicAdd(&counts[u32(v)], 1); }
}
`;

/** route's exact shader, and the fast pass's a phase for softmax and for sigmoid (routeShader). */
export const ROUTE = [1, 2, 3, 4].map((phase) => routeShader('exact', false, phase));
export const ROUTE_FAST = [0, 1, 2, 3, 4, 5].map((phase) => routeShader('fast', false, phase));
export const ROUTE_FAST_SIGMOID = [0, 1, 2, 3, 4, 5].map((phase) => routeShader('fast', true, phase));

/**
 * routeBackward's shader of each phase (ROUTE_BACKWARD_COMMON and phaseMain), and (6, 7) phases 1
 * and 5 over the picks alone, where the gradient reaches only them: softmax selecting on the
 * logits without gradScores (gx is +0 off the picks), sigmoid and sqrtsoftplus without
 * gradScores (gs is +0 off the picks, times a finite non-negative derivative: +0); a cleared
 * output holds those +0s, and T k threads compute the rest instead of T E.
 */
const PICK = (call: string) => `let p = indices[t * P[2] + j]; if (p >= 0) { let e = u32(p); ${call} }`;
export const ROUTE_BACKWARD = (
  [
    ['tokens', 'phase0(t);'],
    ['cells', 'phase1(t, e);'],
    ['tokens', 'phase2(t);'],
    ['cells', 'phase3(t, e);'],
    ['tokens', 'phase4(t);'],
    ['cells', 'phase5(t, e);'],
    ['picks', PICK('phase1(t, e);')],
    ['picks', PICK('phase5(t, e);')],
  ] as const
).map(([over, call]) => ROUTE_BACKWARD_COMMON + phaseMain(['logits', 'maskw', 'indices', 'gw', 'gsc', 'out', 'scratch'], over, call));
