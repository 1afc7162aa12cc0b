/**
 * Software float64 for WGSL (which has no f64 type): IEEE binary64 add, subtract, multiply,
 * divide (round to nearest even, subnormals, signed zeros, infinities; NaN inputs give a quiet
 * NaN), floor, comparisons, and exact conversions from / correctly rounded conversions to
 * float32, on `vec2<u32>(low word, high word)` of the bits. On top of them the core's own
 * `exp` (crates/moe-core/src/detmath.rs), operation for operation, so that route's float64 steps
 * give the core's bits. `test/webgpu.test.ts` checks every operation against JavaScript's
 * numbers (IEEE float64) on random and edge-case bits.
 */

/** The bits of a float64 as a WGSL `vec2<u32>(lo, hi)` literal. */
export function f64Literal(x: number): string {
  const u = new Uint32Array(new Float64Array([x]).buffer);
  return `vec2<u32>(0x${u[0].toString(16)}u, 0x${u[1].toString(16)}u)`;
}

let fact = 1;
const INV_FACTORIAL = Array.from({ length: 15 }, (_, n) => {
  if (n > 0) fact *= n;
  return 1 / fact; // each n! < 2^53 is exact: one rounding, as the core's constants
});

/** 64-bit unsigned integers as `vec2<u32>(low word, high word)`: add, subtract, compare, shifts, the 64-bit product of two u32. */
export const U64 = /* wgsl */ `
fn u_add(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> { let lo = a.x + b.x; return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x)); }
fn u_sub(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> { return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x)); }
fn u_lt(a: vec2<u32>, b: vec2<u32>) -> bool { return a.y < b.y || (a.y == b.y && a.x < b.x); }
fn u_zero(a: vec2<u32>) -> bool { return a.x == 0u && a.y == 0u; }
fn u_shl(a: vec2<u32>, n: u32) -> vec2<u32> {
  if (n == 0u) { return a; }
  if (n >= 64u) { return vec2<u32>(0u, 0u); }
  if (n >= 32u) { return vec2<u32>(0u, a.x << (n - 32u)); }
  return vec2<u32>(a.x << n, (a.y << n) | (a.x >> (32u - n)));
}
fn u_shr(a: vec2<u32>, n: u32) -> vec2<u32> {
  if (n == 0u) { return a; }
  if (n >= 64u) { return vec2<u32>(0u, 0u); }
  if (n >= 32u) { return vec2<u32>(a.y >> (n - 32u), 0u); }
  return vec2<u32>((a.x >> n) | (a.y << (32u - n)), a.y >> n);
}
/** Shift right, OR-ing whatever is shifted out into bit 0 (the sticky bit). */
fn u_shr_jam(a: vec2<u32>, n: u32) -> vec2<u32> {
  if (n == 0u) { return a; }
  if (n >= 64u) { return vec2<u32>(select(0u, 1u, !u_zero(a)), 0u); }
  let r = u_shr(a, n);
  let back = u_shl(r, n);
  return vec2<u32>(r.x | select(0u, 1u, back.x != a.x || back.y != a.y), r.y);
}
fn u_clz(a: vec2<u32>) -> u32 { if (a.y != 0u) { return countLeadingZeros(a.y); } return 32u + countLeadingZeros(a.x); }
/** The 64-bit product of two u32. */
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
  let al = a & 0xffffu; let ah = a >> 16u; let bl = b & 0xffffu; let bh = b >> 16u;
  let ll = al * bl; let lh = al * bh; let hl = ah * bl; let hh = ah * bh;
  let lo1 = ll + (lh << 16u); let c1 = select(0u, 1u, lo1 < ll);
  let lo2 = lo1 + (hl << 16u); let c2 = select(0u, 1u, lo2 < lo1);
  return vec2<u32>(lo2, hh + (lh >> 16u) + (hl >> 16u) + c1 + c2);
}

`;

export const F64 = /* wgsl */ `${U64}
const F64_QNAN = vec2<u32>(0u, 0x7ff80000u);
const F64_ONE = vec2<u32>(0u, 0x3ff00000u);
fn f_bexp(a: vec2<u32>) -> u32 { return (a.y >> 20u) & 0x7ffu; }
fn f_sig(a: vec2<u32>) -> vec2<u32> { var hi = a.y & 0xfffffu; if (f_bexp(a) != 0u) { hi = hi | 0x100000u; } return vec2<u32>(a.x, hi); }
fn f_isnan(a: vec2<u32>) -> bool { return f_bexp(a) == 0x7ffu && ((a.y & 0xfffffu) != 0u || a.x != 0u); }
fn f_isinf(a: vec2<u32>) -> bool { return f_bexp(a) == 0x7ffu && (a.y & 0xfffffu) == 0u && a.x == 0u; }
fn f_iszero(a: vec2<u32>) -> bool { return (a.y & 0x7fffffffu) == 0u && a.x == 0u; }
fn f_neg(a: vec2<u32>) -> vec2<u32> { return vec2<u32>(a.x, a.y ^ 0x80000000u); }

/** A sign, a biased exponent and a significand not yet rounded (see f_round_pack). */
struct Unrounded { s: u32, be: i32, m: vec2<u32> }

/** u with m's leading one moved to bit 62 (m not zero; a bit shifted out is kept as sticky). */
fn f_normalize(u: Unrounded) -> Unrounded {
  let lz = u_clz(u.m);
  if (lz == 0u) { return Unrounded(u.s, u.be + 1, u_shr_jam(u.m, 1u)); }
  if (lz > 1u) { return Unrounded(u.s, u.be - i32(lz - 1u), u_shl(u.m, lz - 1u)); }
  return u;
}

/**
 * Rounds and packs sign | value m * 2^(be - 1085) (be: the biased exponent the value has when
 * m's leading one is at bit 62; bit 0 may carry a sticky bit) to the nearest float64, ties to
 * even, with overflow to infinity and gradual underflow.
 */
fn f_round_pack(sign: u32, be_in: i32, m_in: vec2<u32>) -> vec2<u32> {
  if (u_zero(m_in)) { return vec2<u32>(0u, sign); }
  let n = f_normalize(Unrounded(sign, be_in, m_in));
  var m = n.m;
  var be = n.be;
  if (be >= 0x7ff) { return vec2<u32>(0u, sign | 0x7ff00000u); }
  if (be <= 0) { m = u_shr_jam(m, u32(min(1 - be, 64))); be = 1; }
  return f_round_normal(sign, be, m);
}

/**
 * The sum of two finite non-zero float64s before rounding: the larger's sign and exponent, the
 * aligned significands (9 bits up, the smaller's shifted-out bits kept as sticky) added or
 * subtracted; m is zero where they cancel exactly.
 */
fn f_add_unrounded(a: vec2<u32>, b: vec2<u32>) -> Unrounded {
  let sa = a.y & 0x80000000u;
  let sb = b.y & 0x80000000u;
  var ea = i32(max(f_bexp(a), 1u));
  var eb = i32(max(f_bexp(b), 1u));
  var ma = u_shl(f_sig(a), 9u);
  var mb = u_shl(f_sig(b), 9u);
  var s = sa;
  if (eb > ea || (eb == ea && u_lt(ma, mb))) {
    let e0 = ea; ea = eb; eb = e0;
    let m0 = ma; ma = mb; mb = m0;
    s = sb;
  }
  mb = u_shr_jam(mb, u32(ea - eb));
  return Unrounded(s, ea + 1, select(u_sub(ma, mb), u_add(ma, mb), sa == sb));
}

fn f_add(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  if (f_isnan(a) || f_isnan(b)) { return F64_QNAN; }
  let sa = a.y & 0x80000000u;
  let sb = b.y & 0x80000000u;
  if (f_isinf(a)) { if (f_isinf(b) && sa != sb) { return F64_QNAN; } return a; }
  if (f_isinf(b)) { return b; }
  if (f_iszero(a)) { if (f_iszero(b)) { return vec2<u32>(0u, sa & sb); } return b; }
  if (f_iszero(b)) { return a; }
  let u = f_add_unrounded(a, b);
  // an exact cancellation is +0
  if (u_zero(u.m)) { return vec2<u32>(0u, 0u); }
  return f_round_pack(u.s, u.be, u.m);
}
fn f_sub(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> { return f_add(a, f_neg(b)); }

/**
 * The product of two significands with their leading ones at bit 52: its bits 42..105 (the 128-bit
 * product has its leading one at bit 104 or 105, so these at bit 62 or 63), the 42 below OR-ed
 * into bit 0 (the sticky bit).
 */
fn sig_product(A: vec2<u32>, B: vec2<u32>) -> vec2<u32> {
  let ll = mul_wide(A.x, B.x); let lh = mul_wide(A.x, B.y); let hl = mul_wide(A.y, B.x); let hh = mul_wide(A.y, B.y);
  let t1 = ll.y + lh.x; var c1 = select(0u, 1u, t1 < ll.y);
  let p1 = t1 + hl.x; c1 = c1 + select(0u, 1u, p1 < t1);
  let u1 = hh.x + lh.y; var c2 = select(0u, 1u, u1 < hh.x);
  let u2 = u1 + hl.y; c2 = c2 + select(0u, 1u, u2 < u1);
  let p2 = u2 + c1; c2 = c2 + select(0u, 1u, p2 < u2);
  let p3 = hh.y + c2;
  return vec2<u32>((p1 >> 10u) | (p2 << 22u) | select(0u, 1u, (p1 & 0x3ffu) != 0u || ll.x != 0u), (p2 >> 10u) | (p3 << 22u));
}

fn f_mul(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  if (f_isnan(a) || f_isnan(b)) { return F64_QNAN; }
  let s = (a.y ^ b.y) & 0x80000000u;
  if (f_isinf(a) || f_isinf(b)) { if (f_iszero(a) || f_iszero(b)) { return F64_QNAN; } return vec2<u32>(0u, s | 0x7ff00000u); }
  if (f_iszero(a) || f_iszero(b)) { return vec2<u32>(0u, s); }
  // significands with their leading one at bit 52 (subnormals shifted up, their exponents down)
  var A = f_sig(a);
  var B = f_sig(b);
  let la = u_clz(A) - 11u;
  let lb = u_clz(B) - 11u;
  A = u_shl(A, la);
  B = u_shl(B, lb);
  let ea = i32(max(f_bexp(a), 1u)) - i32(la);
  let eb = i32(max(f_bexp(b), 1u)) - i32(lb);
  return f_round_pack(s, ea + eb - 1023, sig_product(A, B));
}

fn f_div(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  if (f_isnan(a) || f_isnan(b)) { return F64_QNAN; }
  let s = (a.y ^ b.y) & 0x80000000u;
  if (f_isinf(a)) { if (f_isinf(b)) { return F64_QNAN; } return vec2<u32>(0u, s | 0x7ff00000u); }
  if (f_isinf(b)) { return vec2<u32>(0u, s); }
  if (f_iszero(b)) { if (f_iszero(a)) { return F64_QNAN; } return vec2<u32>(0u, s | 0x7ff00000u); }
  if (f_iszero(a)) { return vec2<u32>(0u, s); }
  var ea = i32(max(f_bexp(a), 1u));
  var eb = i32(max(f_bexp(b), 1u));
  var A = f_sig(a);
  var B = f_sig(b);
  let la = u_clz(A) - 11u; A = u_shl(A, la); ea = ea - i32(la);
  let lb = u_clz(B) - 11u; B = u_shl(B, lb); eb = eb - i32(lb);
  var rem = A;
  var q = vec2<u32>(0u, 0u);
  for (var i = 0u; i < 64u; i = i + 1u) {
    q = u_shl(q, 1u);
    if (!u_lt(rem, B)) { rem = u_sub(rem, B); q.x = q.x | 1u; }
    rem = u_shl(rem, 1u);
  }
  if (!u_zero(rem)) { q.x = q.x | 1u; }
  return f_round_pack(s, ea - eb + 1022, q);
}

fn f_floor(a: vec2<u32>) -> vec2<u32> {
  let e = i32(f_bexp(a));
  if (e >= 1075) { return a; }
  let neg = (a.y & 0x80000000u) != 0u;
  if (e < 1023) {
    if (f_iszero(a)) { return a; }
    if (neg) { return vec2<u32>(0u, 0xbff00000u); }
    return vec2<u32>(0u, 0u);
  }
  let mask = u_sub(u_shl(vec2<u32>(1u, 0u), u32(1075 - e)), vec2<u32>(1u, 0u));
  if ((a.x & mask.x) == 0u && (a.y & mask.y) == 0u) { return a; }
  let t = vec2<u32>(a.x & ~mask.x, a.y & ~mask.y);
  if (neg) { return f_sub(t, F64_ONE); }
  return t;
}

/** An integer-valued float64 of magnitude below 2^31 as an i32. */
fn f_to_i32(a: vec2<u32>) -> i32 {
  if (f_iszero(a)) { return 0; }
  let v = i32(u_shr(f_sig(a), u32(1075 - i32(f_bexp(a)))).x);
  return select(v, -v, (a.y & 0x80000000u) != 0u);
}

/** Total order of non-NaN float64s (-0 before +0). */
fn f_key(a: vec2<u32>) -> vec2<u32> { if ((a.y & 0x80000000u) != 0u) { return ~a; } return vec2<u32>(a.x, a.y | 0x80000000u); }
fn f_lt(a: vec2<u32>, b: vec2<u32>) -> bool { return u_lt(f_key(a), f_key(b)); }

/** float32 bits to float64, exactly. */
fn f_from_f32(b: u32) -> vec2<u32> {
  let s = b & 0x80000000u;
  let e = (b >> 23u) & 0xffu;
  var m = b & 0x7fffffu;
  if (e == 0xffu) { return vec2<u32>(m << 29u, s | 0x7ff00000u | (m >> 3u)); }
  var e64 = e + 896u;
  if (e == 0u) {
    if (m == 0u) { return vec2<u32>(0u, s); }
    let lz = countLeadingZeros(m) - 8u;
    m = (m << lz) & 0x7fffffu;
    e64 = 897u - lz;
  }
  return vec2<u32>(m << 29u, s | (e64 << 20u) | (m >> 3u));
}

/** float64 to the nearest float32's bits (ties to even; overflow to infinity; float32 subnormals). */
fn f_to_f32(a: vec2<u32>) -> u32 {
  let s = a.y & 0x80000000u;
  let e = i32(f_bexp(a));
  if (e == 0x7ff) { if (f_isnan(a)) { return s | 0x7fc00000u | ((a.y & 0xfffffu) << 3u) | (a.x >> 29u); } return s | 0x7f800000u; }
  if (f_iszero(a)) { return s; }
  var m = u_shl(f_sig(a), 10u);
  var e32 = max(e, 1) - 1023 + 127;
  if (e32 >= 0xff) { return s | 0x7f800000u; }
  if (e32 <= 0) { m = u_shr_jam(m, u32(min(1 - e32, 64))); e32 = 1; }
  let q = u_shr(m, 39u).x;
  let rlo = m.x;
  let rhi = m.y & 0x7fu;
  var qq = q;
  let above = rhi > 0x40u || (rhi == 0x40u && rlo != 0u);
  let tie = rhi == 0x40u && rlo == 0u;
  if (above || (tie && (q & 1u) == 1u)) { qq = q + 1u; }
  return s | ((u32(e32 - 1) << 23u) + qq);
}

/** The correctly rounded square root (digit by digit on the significand). */
fn f_sqrt(a: vec2<u32>) -> vec2<u32> {
  if (f_isnan(a)) { return F64_QNAN; }
  if (f_iszero(a)) { return a; }
  if ((a.y & 0x80000000u) != 0u) { return F64_QNAN; }
  if (f_isinf(a)) { return a; }
  var e = i32(max(f_bexp(a), 1u));
  var M = f_sig(a);
  let l = u_clz(M) - 11u;
  M = u_shl(M, l);
  e = e - i32(l) - 1023;
  if ((e & 1) != 0) { M = u_shl(M, 1u); e = e - 1; }
  // X = M << 56 in four limbs; root = floor(sqrt(X)) has 55 bits
  let lo = u_shl(M, 24u);
  let hi = u_shr(M, 40u);
  var X = array<u32, 4>(0u, lo.x, lo.y, hi.x);
  var rem = vec2<u32>(0u, 0u);
  var root = vec2<u32>(0u, 0u);
  for (var i = 55; i >= 0; i = i - 1) {
    let bit = u32(2 * i);
    let two = (X[bit / 32u] >> (bit % 32u)) & 3u;
    rem = u_shl(rem, 2u);
    rem.x = rem.x | two;
    let trial = u_shl(root, 2u);
    let t1 = vec2<u32>(trial.x | 1u, trial.y);
    root = u_shl(root, 1u);
    if (!u_lt(rem, t1)) { rem = u_sub(rem, t1); root.x = root.x | 1u; }
  }
  var m = u_shl(root, 8u);
  if (!u_zero(rem)) { m.x = m.x | 1u; }
  return f_round_pack(0u, e / 2 + 1023, m);
}

fn f_pow2(e: i32) -> vec2<u32> { return vec2<u32>(0u, u32(e + 1023) << 20u); }
fn f_scale(x: vec2<u32>, k: i32) -> vec2<u32> {
  // (x * a) * b, b = 1 (exact) in the common case: one pair of multiplications in the code
  var a = f_pow2(k);
  var b = F64_ONE;
  if (k > 1023) { a = f_pow2(1023); b = f_pow2(min(k - 1023, 1023)); }
  if (k < -1022) { a = f_pow2(-1022); b = f_pow2(max(k + 1022, -1022)); }
  // x * a * 1 is x * a, every bit (finite x here): the second multiplication only where b is not 1
  if (k >= -1022 && k <= 1023) { return f_mul(x, a); }
  return f_mul(f_mul(x, a), b);
}

const LN2_HI = vec2<u32>(0xfee00000u, 0x3fe62e42u);
const LN2_LO = vec2<u32>(0x35793c76u, 0x3dea39efu);
const LOG2_E = ${f64Literal(Math.LOG2E)};
const EXP_OVER = ${f64Literal(709.782712893384)};
const EXP_UNDER = ${f64Literal(-745.2)};
const F64_HALF = ${f64Literal(0.5)};
/**
 * f_mul and f_add for operands and results that are normal numbers (no zero, subnormal, infinity
 * or NaN in or out): the same rounding, without the special cases (the Horner steps of f_exp).
 */
fn f_mul_normal(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  let m = sig_product(vec2<u32>(a.x, (a.y & 0xfffffu) | 0x100000u), vec2<u32>(b.x, (b.y & 0xfffffu) | 0x100000u));
  let n = f_normalize(Unrounded((a.y ^ b.y) & 0x80000000u, i32(f_bexp(a)) + i32(f_bexp(b)) - 1023, m));
  return f_round_normal(n.s, n.be, n.m);
}
fn f_add_normal(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  let n = f_normalize(f_add_unrounded(a, b));
  return f_round_normal(n.s, n.be, n.m);
}
/**
 * f_round_pack's last step: m (its leading one at bit 62; a subnormal's lower, with be = 1) rounded
 * to nearest even at bit 10 and packed with the biased exponent be - 1 (a carry out of the
 * significand moves it up one); by itself, for an m and be of a normal result.
 */
fn f_round_normal(sign: u32, be: i32, m: vec2<u32>) -> vec2<u32> {
  let r = m.x & 0x3ffu;
  var q = u_shr(m, 10u);
  if (r > 0x200u || (r == 0x200u && (q.x & 1u) == 1u)) { q = u_add(q, vec2<u32>(1u, 0u)); }
  let res = u_add(q, vec2<u32>(0u, u32(be - 1) << 20u));
  return vec2<u32>(res.x, res.y | sign);
}

/** The core's exp (detmath.rs), operation for operation. */
fn f_exp(x: vec2<u32>) -> vec2<u32> {
  if (f_isnan(x)) { return x; }
  if (f_lt(EXP_OVER, x)) { return vec2<u32>(0u, 0x7ff00000u); }
  if (f_lt(x, EXP_UNDER)) { return vec2<u32>(0u, 0u); }
  let k = f_floor(f_add(f_mul(x, LOG2_E), F64_HALF));
  let r = f_sub(f_sub(x, f_mul(k, LN2_HI)), f_mul(k, LN2_LO));
  var inv = array<vec2<u32>, 15>(${INV_FACTORIAL.map(f64Literal).join(', ')});
  var p = inv[14];
  // |r| <= 0.35 and p in [2^-37, 1.5]: with |r| >= 2^-900 every product and sum is a normal
  // number, and the steps without special cases give the same bits
  if (f_bexp(r) >= 123u) {
    for (var i = 13; i >= 0; i = i - 1) { p = f_add_normal(f_mul_normal(p, r), inv[i]); }
  } else {
    for (var i = 13; i >= 0; i = i - 1) { p = f_add(f_mul(p, r), inv[i]); }
  }
  return f_scale(p, f_to_i32(k));
}
`;

/**
 * F64_DOT's unpacked float64 sum (after F64): `Acc`, `dot_term(a, b)` (the exact product of two
 * finite float32s), `acc_of(x)` (a normal float64 or zero), `dot_add` (rounded as f_add),
 * `acc_bits` (the float64 bits of a finite sum that stayed normal).
 */
export const F64_ACC = /* wgsl */ `
/** (-1)^s * m * 2^e, m's bit 52 set; m == 0: a zero of sign s. */
struct Acc { s: u32, e: i32, m: vec2<u32> }
/** a << n, 0 <= n < 64, without branches. */
fn dot_shl(a: vec2<u32>, n: u32) -> vec2<u32> {
  let lo = vec2<u32>(a.x << n, (a.y << n) | select(a.x >> (32u - n), 0u, n == 0u));
  return select(lo, vec2<u32>(0u, a.x << (n - 32u)), n >= 32u);
}
/** a >> n with what is shifted out OR-ed into bit 0 (u_shr_jam), without branches. */
fn dot_shr_jam(a: vec2<u32>, n: u32) -> vec2<u32> {
  let m = n & 31u;
  let hi_in = select(a.y << (32u - m), 0u, m == 0u);
  // n < 32: lo = (a.x >> n) | (a.y << (32 - n)), lost = a.x << (32 - n); 32 <= n < 64: lo = a.y >> (n - 32), lost = a.x | a.y << (64 - n)
  let small = vec2<u32>((a.x >> m) | hi_in, a.y >> m);
  let lost_small = select(a.x << (32u - m), 0u, m == 0u);
  let big = vec2<u32>(a.y >> m, 0u);
  let lost_big = a.x | hi_in;
  var r = select(small, big, n >= 32u);
  var lost = select(lost_small, lost_big, n >= 32u);
  if (n >= 64u) { r = vec2<u32>(0u, 0u); lost = a.x | a.y; }
  return vec2<u32>(r.x | select(0u, 1u, lost != 0u), r.y);
}
/** The exact product of two finite float32s (bits). */
fn dot_term(a: u32, b: u32) -> Acc {
  let ea = (a >> 23u) & 0xffu;
  let eb = (b >> 23u) & 0xffu;
  // significands with bit 23 set (a subnormal's shifted up; zero stays zero)
  let na = select(countLeadingZeros(a & 0x7fffffu) - 8u, 0u, ea != 0u);
  let nb = select(countLeadingZeros(b & 0x7fffffu) - 8u, 0u, eb != 0u);
  let ma = select((a & 0x7fffffu) << na, (a & 0x7fffffu) | 0x800000u, ea != 0u);
  let mb = select((b & 0x7fffffu) << nb, (b & 0x7fffffu) | 0x800000u, eb != 0u);
  // the product's leading one at bit 46 or 47, moved to bit 52
  let p = mul_wide(ma, mb);
  let sh = select(6u, 5u, p.y >= 0x8000u);
  return Acc((a ^ b) & 0x80000000u, i32(max(ea, 1u) + max(eb, 1u)) - i32(na + nb + sh) - 300, vec2<u32>(p.x << sh, (p.y << sh) | (p.x >> (32u - sh))));
}
/** a + b rounded to float64 (nearest, ties to even): f_add's steps on unpacked operands. */
fn dot_add(a: Acc, b: Acc) -> Acc {
  if (u_zero(b.m)) { if (u_zero(a.m)) { return Acc(a.s & b.s, 0, a.m); } return a; }
  if (u_zero(a.m)) { return b; }
  let swap = b.e > a.e || (b.e == a.e && u_lt(a.m, b.m));
  let xs = select(a.s, b.s, swap);
  let xe = select(a.e, b.e, swap);
  let X = dot_shl(select(a.m, b.m, swap), 9u);
  let Y = dot_shr_jam(dot_shl(select(b.m, a.m, swap), 9u), u32(abs(a.e - b.e)));
  let S = select(u_add(X, Y), u_sub(X, Y), a.s != b.s);
  if (u_zero(S)) { return Acc(0u, 0, S); }
  // S < 2^63: its leading one to bit 62, then 10 bits rounded off
  let lz = u_clz(S);
  let M = dot_shl(S, lz - 1u);
  let r = M.x & 0x3ffu;
  let q = vec2<u32>((M.x >> 10u) | (M.y << 22u), M.y >> 10u);
  let up = select(0u, 1u, r > 0x200u || (r == 0x200u && (q.x & 1u) == 1u));
  let qx = q.x + up;
  let qy = q.y + select(0u, 1u, qx < up);
  if (qy >= 0x200000u) { return Acc(xs, xe + 3 - i32(lz), vec2<u32>(0u, 0x100000u)); }
  return Acc(xs, xe + 2 - i32(lz), vec2<u32>(qx, qy));
}
/** A normal float64 or a zero (bits), unpacked (a subnormal would need its leading one moved up: not handled). */
fn acc_of(x: vec2<u32>) -> Acc {
  let be = f_bexp(x);
  if (be == 0u) { return Acc(x.y & 0x80000000u, 0, vec2<u32>(0u, 0u)); }
  return Acc(x.y & 0x80000000u, i32(be) - 1075, vec2<u32>(x.x, (x.y & 0xfffffu) | 0x100000u));
}
fn acc_bits(acc: Acc) -> vec2<u32> {
  if (u_zero(acc.m)) { return vec2<u32>(0u, acc.s); }
  return vec2<u32>(acc.m.x, acc.s | (u32(acc.e + 1075) << 20u) | (acc.m.y & 0xfffffu));
}
`;

/**
 * Sums of float32 products in float64 as the core computes them (`a as f64 * b as f64`, summed in
 * order from -0 by Rust's f64 `sum()`): `fn dot_row(ia, ib, h) -> vec2<u32>`, the float64 bits of
 * the sum over c < h of `dot_a(ia + c) * dot_b(ib + c)`, which the including shader defines (the
 * float32 bits of its operands). Fast: the product of two finite float32s is exact in float64 (48
 * significant bits), so a term is its integer significand (one `mul_wide`) and exponent, with
 * nothing to round; the partial sum stays unpacked (`Acc`: sign, exponent, 53-bit significand)
 * between additions, and each addition aligns, adds and rounds to nearest even once, as `f_add`
 * (same guard bits, same sticky bit: the same bits). Finite products lie in [2^-298, 2^256] and
 * their partial sums are multiples of 2^-298 below 2^266 for any practical length, so no float64
 * subnormal, overflow, infinity or NaN can occur and none is handled: a row holding an infinity
 * or a NaN is summed again by `f_mul` / `f_add`.
 */
export const F64_DOT = /* wgsl */ `${F64_ACC}
fn dot_row(ia: u32, ib: u32, h: u32) -> vec2<u32> {
  var acc = Acc(0x80000000u, 0, vec2<u32>(0u, 0u));
  var finite = true;
  for (var c = 0u; c < h; c = c + 1u) {
    let a = dot_a(ia + c);
    let b = dot_b(ib + c);
    if ((a & 0x7f800000u) == 0x7f800000u || (b & 0x7f800000u) == 0x7f800000u) { finite = false; break; }
    acc = dot_add(acc, dot_term(a, b));
  }
  if (finite) { return acc_bits(acc); }
  var sum = vec2<u32>(0u, 0x80000000u);
  for (var c = 0u; c < h; c = c + 1u) { sum = f_add(sum, f_mul(f_from_f32(dot_a(ia + c)), f_from_f32(dot_b(ib + c)))); }
  return sum;
}
`;

/** The bindings of the test harnesses over float32 bits: P, inputs a and b, 64-bit results out. */
const CHECK_IO = `@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec2<u32>>;`;

/** A test harness of `F64_DOT`: `out[i]` = the float64 bits of row i's dot (float32 bits `a`, `b` `[rows, h]`). P = [rows, h]. */
export const F64_DOT_CHECK = `
${CHECK_IO}
${F64}
${F64_DOT}
fn dot_a(i: u32) -> u32 { return a[i]; }
fn dot_b(i: u32) -> u32 { return b[i]; }
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= P[0]) { return; }
  out[i] = dot_row(i * P[1], i * P[1], P[1]);
}
`;

/** A test harness of `F64_ACC`'s sum: `out[i]` = the float64 bits of row i of `a [rows, h]` (normal float64s or zeros) summed from +0 with `acc_of` and `dot_add`. P = [rows, h]. */
export const F64_SUM_CHECK = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec2<u32>>;
${F64}
${F64_ACC}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= P[0]) { return; }
  var acc = Acc(0u, 0, vec2<u32>(0u, 0u));
  for (var c = 0u; c < P[1]; c = c + 1u) { acc = dot_add(acc, acc_of(a[i * P[1] + c])); }
  out[i] = acc_bits(acc);
}
`;

/** A test harness: `out[i] = op(a[i], b[i])` for op P[1] (0 add, 1 sub, 2 mul, 3 div, 4 floor, 5 to f32, 6 from f32, 7 exp, 8 sqrt). P = [n, op]. */
export const F64_CHECK = `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> b: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec2<u32>>;
${F64}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= P[0]) { return; }
  let x = a[i]; let y = b[i];
  var r = vec2<u32>(0u, 0u);
  switch (P[1]) {
    case 0u: { r = f_add(x, y); }
    case 1u: { r = f_sub(x, y); }
    case 2u: { r = f_mul(x, y); }
    case 3u: { r = f_div(x, y); }
    case 4u: { r = f_floor(x); }
    case 5u: { r = vec2<u32>(f_to_f32(x), 0u); }
    case 6u: { r = f_from_f32(x.x); }
    case 8u: { r = f_sqrt(x); }
    default: { r = f_exp(x); }
  }
  out[i] = r;
}
`;

/**
 * 2^(j/64) for j = 0..63, rounded to 64-bit fixed point with 63 fraction bits (the table of
 * F32_FAST's exp). `test/webgpu.test.ts` recomputes it with BigInt.
 */
export const EXP_TABLE = [
  0x8000000000000000n,
  0x8164d1f3bc030773n,
  0x82cd8698ac2ba1d7n,
  0x843a28c3acde4046n,
  0x85aac367cc487b15n,
  0x871f61969e8d1010n,
  0x88980e8092da8527n,
  0x8a14d575496efd9an,
  0x8b95c1e3ea8bd6e7n,
  0x8d1adf5b7e5ba9e6n,
  0x8ea4398b45cd53c0n,
  0x9031dc431466b1dcn,
  0x91c3d373ab11c336n,
  0x935a2b2f13e6e92cn,
  0x94f4efa8fef70961n,
  0x96942d3720185a00n,
  0x9837f0518db8a96fn,
  0x99e0459320b7fa65n,
  0x9b8d39b9d54e5539n,
  0x9d3ed9a72cffb751n,
  0x9ef5326091a111aen,
  0xa0b0510fb9714fc2n,
  0xa27043030c496819n,
  0xa43515ae09e6809en,
  0xa5fed6a9b15138ean,
  0xa7cd93b4e965356an,
  0xa9a15ab4ea7c0ef8n,
  0xab7a39b5a93ed337n,
  0xad583eea42a14ac6n,
  0xaf3b78ad690a4375n,
  0xb123f581d2ac2590n,
  0xb311c412a9112489n,
  0xb504f333f9de6484n,
  0xb6fd91e328d17791n,
  0xb8fbaf4762fb9ee9n,
  0xbaff5ab2133e45fbn,
  0xbd08a39f580c36bfn,
  0xbf1799b67a731083n,
  0xc12c4cca66709456n,
  0xc346ccda24976407n,
  0xc5672a115506daddn,
  0xc78d74c8abb9b15dn,
  0xc9b9bd866e2f27a3n,
  0xcbec14fef2727c5dn,
  0xce248c151f8480e4n,
  0xd06333daef2b2595n,
  0xd2a81d91f12ae45an,
  0xd4f35aabcfedfa1fn,
  0xd744fccad69d6af4n,
  0xd99d15c278afd7b6n,
  0xdbfbb797daf23755n,
  0xde60f4825e0e9124n,
  0xe0ccdeec2a94e111n,
  0xe33f8972be8a5a51n,
  0xe5b906e77c8348a8n,
  0xe8396a503c4bdc68n,
  0xeac0c6e7dd24392fn,
  0xed4f301ed9942b84n,
  0xefe4b99bdcdaf5cbn,
  0xf281773c59ffb13an,
  0xf5257d152486cc2cn,
  0xf7d0df730ad13bb9n,
  0xfa83b2db722a033an,
  0xfd3e0c0cf486c175n,
];
/** ln 2 / 64 in 64-bit fixed point with 64 fraction bits, rounded (F32_FAST's exp reduction). */
export const EXP_LN2_64 = 0x2c5c85fdf473de7n;

const u64Literal = (v: bigint) => `vec2<u32>(0x${(v & 0xffffffffn).toString(16)}u, 0x${(v >> 32n).toString(16)}u)`;

/**
 * The core's float32 `expf` (detmath's float64 exp, rounded once) and the correctly rounded
 * float32 division, fast, in integer arithmetic (needs U64): `fn expf_fast(x: f32) -> vec2<u32>`
 * and `fn fdiv_fast(a: f32, b: f32) -> vec2<u32>` give (the result's bits, 0), or (0, 1) where
 * they cannot decide; F32_SOFT's `expf_slow` / `fdiv_slow` (software float64) decide those.
 *
 * expf_fast, for -87 <= x <= 88 (normal results): x = k ln2/64 + r, |r| <= ln2/128; e^x =
 * 2^(k/64) e^r, with r (exact x minus k times ln2/64 rounded to 2^-64: error <= |k| 2^-65 <=
 * 2^-52) in 64-bit fixed point, e^r - 1 = r + r^2/2 + r^3/6 in fixed point and r^4/24 + r^5/120
 * in float32 (their error below 2^-55; the terms left out below 2^-54), 2^(j/64) from a table
 * rounded to 2^-64: relative error below 2^-51 in all (2^-51.4 the largest of 7 million
 * arguments measured against the core's exp), the core's own below 2^-51 too. The value is
 * rounded to float32 unless it lies within 2^-45 (relative) of a rounding boundary, where the two
 * could round apart: those (about one argument in a million) and the arguments outside the range
 * are not decided. |x| < 2^-26 gives 1 (e^x and the core's are within 2^-25.9 of 1, the
 * boundaries 2^-25 and 2^-24 away).
 *
 * fdiv_fast: normal operands and a normal quotient by long division of the 24-bit significands
 * (25 quotient bits and a sticky bit, rounded to nearest even): the correctly rounded quotient,
 * which is also what f_div's float64 quotient rounded to float32 gives (53 >= 2 * 24 + 2 bits).
 */
export const F32_FAST = /* wgsl */ `
var<private> EXP_T: array<vec2<u32>, 64> = array<vec2<u32>, 64>(${EXP_TABLE.map(u64Literal).join(', ')});
const EXP_C = ${u64Literal(EXP_LN2_64)};
/** The high 64 bits of the 128-bit product a b. */
fn mul_hi64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
  let ll = mul_wide(a.x, b.x); let lh = mul_wide(a.x, b.y); let hl = mul_wide(a.y, b.x); let hh = mul_wide(a.y, b.y);
  // bits 32..63: ll.y + lh.x + hl.x (the carries go up)
  let t1 = ll.y + lh.x; var c = select(0u, 1u, t1 < ll.y);
  let t2 = t1 + hl.x; c = c + select(0u, 1u, t2 < t1);
  return u_add(u_add(hh, vec2<u32>(lh.y, 0u)), u_add(vec2<u32>(hl.y, 0u), vec2<u32>(c, 0u)));
}
/** floor(a / 3), 16 bits at a time. */
fn div3_64(a: vec2<u32>) -> vec2<u32> {
  let v0 = a.y >> 16u; let d0 = v0 / 3u;
  let v1 = ((v0 - 3u * d0) << 16u) | (a.y & 0xffffu); let d1 = v1 / 3u;
  let v2 = ((v1 - 3u * d1) << 16u) | (a.x >> 16u); let d2 = v2 / 3u;
  let v3 = ((v2 - 3u * d2) << 16u) | (a.x & 0xffffu); let d3 = v3 / 3u;
  return vec2<u32>((d2 << 16u) | d3, (d0 << 16u) | d1);
}
/**
 * The float32 with bits b times 2^64, modulo 2^64 (two's complement), truncated toward zero
 * below 2^-64: a value's fraction in 64-bit fixed point (its integer part drops out, which the
 * exp reductions below allow: only the remainder r, below 1/2 in magnitude, is kept).
 */
fn fix64(b: u32) -> vec2<u32> {
  let be = i32((b >> 23u) & 0xffu);
  var mant = b & 0x7fffffu;
  if (be != 0) { mant = mant | 0x800000u; }
  let sh = max(be, 1) - 86;
  var X = u_shr(vec2<u32>(mant, 0u), u32(max(-sh, 0)));
  if (sh > 0) { X = u_shl(vec2<u32>(mant, 0u), u32(sh)); }
  if ((b >> 31u) == 1u) { X = u_sub(vec2<u32>(0u, 0u), X); }
  return X;
}
/**
 * 2^(j/64) e^r for j = k & 63 and r = R 2^-64 (R: X - k ln2/64 in 64-bit fixed point, modulo
 * 2^64, |r| <= ln2/128 + 2^-13: k rounded from a float32 estimate of the argument, within 0.008
 * of a step of the nearest for |x| <= 700): Y with 63 fraction bits, in [0.99, 2) (its leading
 * one at bit 63 or 62); the exp is Y 2^(k >> 6) 2^-63. e^r - 1 = r + r^2/2 + r^3/6 in fixed point and
 * r^4/24 + r^5/120 in float32 (their error below 2^-55; the terms left out below 2^-54), 2^(j/64)
 * from a table rounded to 2^-64: relative error below 2^-51 (the reduction's own error, |k|
 * times the rounding of ln2/64, is the caller's).
 */
fn exp_reduced(R: vec2<u32>, k: i32) -> vec2<u32> {
  let neg = (R.y >> 31u) == 1u;
  var aR = R;
  if (neg) { aR = u_sub(vec2<u32>(0u, 0u), R); }
  // fixed point, 64 fraction bits: r^2/2, |r|^3/6; float32: r^4/24, |r|^5/120
  let R2 = u_shr(mul_hi64(aR, aR), 1u);
  let R3 = div3_64(mul_hi64(R2, aR));
  let rf = f32(aR.y) * 2.3283064365386963e-10 + f32(aR.x) * 5.421010862427522e-20;
  let r2 = rf * rf;
  let QE = u32(r2 * (r2 * 0.041666666666666664) * 18446744073709551616.0);
  let QO = u32(r2 * (r2 * (rf * 0.008333333333333333)) * 18446744073709551616.0);
  // |e^r - 1| and its sign
  var A = u_add(u_add(u_add(aR, R2), R3), vec2<u32>(QE + QO, 0u));
  if (neg) { A = u_sub(u_add(u_add(aR, R3), vec2<u32>(QO, 0u)), u_add(R2, vec2<u32>(QE, 0u))); }
  let T = EXP_T[u32(k & 63)];
  if (neg) { return u_sub(T, mul_hi64(T, A)); }
  return u_add(T, mul_hi64(T, A));
}
/** X - k ln2/64 modulo 2^64 (X: a value in fix64's form): exp_reduced's R. */
fn exp_reduce(X: vec2<u32>, k: i32) -> vec2<u32> {
  let ak = u32(abs(k));
  let kc_lo = mul_wide(ak, EXP_C.x);
  let KC = vec2<u32>(kc_lo.x, kc_lo.y + ak * EXP_C.y);
  if (k < 0) { return u_add(X, KC); }
  return u_sub(X, KC);
}
/**
 * The value Y 2^(e - 63) (Y not zero, its leading one at bit 62 or above) rounded to float32
 * (nearest, ties to even): (its bits, 0) where that is a normal float32 and Y lies more than
 * 2^(lead - mu) from the rounding boundary (a relative margin of 2^-mu to 2^-(mu + 1)); (0, 1)
 * where it cannot decide.
 */
fn round_fixed(Y: vec2<u32>, e: i32, mu: u32) -> vec2<u32> {
  let lead = 63u - u_clz(Y);
  let D = lead - 23u;
  let rem = vec2<u32>(Y.x, Y.y & ((1u << (D - 32u)) - 1u));
  let half = vec2<u32>(0u, 1u << (D - 33u));
  var dist = u_sub(half, rem);
  if (!u_lt(rem, half)) { dist = u_sub(rem, half); }
  if (dist.y == 0u && dist.x <= (1u << (lead - mu))) { return vec2<u32>(0u, 1u); }
  var q = u_shr(Y, D).x;
  if (u_lt(half, rem)) { q = q + 1u; }
  var be = i32(lead) - 63 + e + 127;
  if (q == 0x1000000u) { q = 0x800000u; be = be + 1; }
  if (be < 1 || be > 254) { return vec2<u32>(0u, 1u); }
  return vec2<u32>((u32(be) << 23u) | (q & 0x7fffffu), 0u);
}
/** floor((2^127 - 1) / s) for s in [2^63, 2^64): 1 / s with 64 fraction bits, by long division. */
fn recip64(s: vec2<u32>) -> vec2<u32> {
  // the dividend's bits above the quotient's (2^63 - 1), then its 64 lower bits (all ones)
  var rem = vec2<u32>(0xffffffffu, 0x7fffffffu);
  var q = vec2<u32>(0u, 0u);
  for (var i = 0u; i < 64u; i = i + 1u) {
    let top = (rem.y >> 31u) == 1u;
    rem = vec2<u32>((rem.x << 1u) | 1u, (rem.y << 1u) | (rem.x >> 31u));
    q = vec2<u32>(q.x << 1u, (q.y << 1u) | (q.x >> 31u));
    // (a remainder that overflowed 64 bits is above s; the difference, below s, is right modulo 2^64)
    if (top || !u_lt(rem, s)) {
      rem = u_sub(rem, s);
      q.x = q.x | 1u;
    }
  }
  return q;
}
/** The float64 bits of Y 2^(e - 63) (Y's leading one at bit 62 or 63; a normal result), rounded to nearest (ties away). */
fn fixed_to_f64(Y: vec2<u32>, e: i32) -> vec2<u32> {
  let lead = 63u - u_clz(Y);
  let D = lead - 52u;
  var m = u_shr(Y, D);
  if ((Y.x & (1u << (D - 1u))) != 0u) { m = u_add(m, vec2<u32>(1u, 0u)); }
  var be = i32(lead) - 63 + e + 1023;
  if (m.y >= 0x200000u) {
    m = u_shr(m, 1u);
    be = be + 1;
  }
  return vec2<u32>(m.x, (u32(be) << 20u) | (m.y & 0xfffffu));
}
/**
 * e^(a - b) for float32s a, b (bits) whose difference d is in [-700, 104] and exact in float64
 * (route's softmax argument x - max, and -x), as float64 bits: a - b reduced in fixed point from
 * their bits (fix64: exact to 2^-64), k from d in float32 (only the remainder's size depends on
 * it); relative error below 2^-48.4 (exp_reduced's 2^-51, the reduction's |k| 2^-65 <= 2^-49 for
 * |k| < 2^16, the rounding to float64's 2^-53).
 */
fn exp_diff(a: u32, b: u32) -> vec2<u32> {
  let k = i32(round((bitcast<f32>(a) - bitcast<f32>(b)) * 92.33248261689366));
  return fixed_to_f64(exp_reduced(exp_reduce(u_sub(fix64(a), fix64(b)), k), k), k >> 6u);
}
/** (the float32 bits of e^x, 0) where the fast path decides; (0, 1) where it cannot. */
fn expf_fast(x: f32) -> vec2<u32> {
  if (!(x >= -87.0 && x <= 88.0)) { return vec2<u32>(0u, 1u); }
  let b = bitcast<u32>(x);
  if (((b >> 23u) & 0xffu) < 127u - 26u) { return vec2<u32>(0x3f800000u, 0u); }
  // x 2^64 modulo 2^64 (exact: x's lowest bit is at 2^-49 or above), minus k ln2/64 (the true
  // remainder is below 2^58 in magnitude)
  let k = i32(round(x * 92.33248261689366));
  return round_fixed(exp_reduced(exp_reduce(fix64(b), k), k), k >> 6u, 45u);
}
/** (the float32 bits of a / b, 0) for normal operands and quotient; (0, 1) for others. */
fn fdiv_fast(a: f32, b: f32) -> vec2<u32> {
  let ab = bitcast<u32>(a); let bb = bitcast<u32>(b);
  let ea = i32((ab >> 23u) & 0xffu); let eb = i32((bb >> 23u) & 0xffu);
  if (ea == 0 || ea == 255 || eb == 0 || eb == 255) { return vec2<u32>(0u, 1u); }
  var ma = (ab & 0x7fffffu) | 0x800000u;
  let mb = (bb & 0x7fffffu) | 0x800000u;
  var e = ea - eb + 127;
  if (ma < mb) { ma = ma << 1u; e = e - 1; }
  // 25 quotient bits of ma / mb in [1, 2), the remainder's sticky bit
  var q = 0u; var rem = ma;
  for (var i = 0u; i < 25u; i = i + 1u) {
    q = q << 1u;
    if (rem >= mb) { rem = rem - mb; q = q | 1u; }
    rem = rem << 1u;
  }
  var m = q >> 1u;
  if ((q & 1u) == 1u && (rem != 0u || (m & 1u) == 1u)) { m = m + 1u; }
  if (m == 0x1000000u) { m = 0x800000u; e = e + 1; }
  if (e < 1 || e > 254) { return vec2<u32>(0u, 1u); }
  return vec2<u32>(((ab ^ bb) & 0x80000000u) | (u32(e) << 23u) | (m & 0x7fffffu), 0u);
}
`;

/**
 * `expf` and `fdiv` of a shader's fast pass (after U64 and F32_FAST): the fast results, with the
 * invocation's `SLOW` set where one was not decided (the shader then lists its item for a second
 * pass, built with F32_SOFT). Two passes, not a branch to the software float64: a compiler that
 * runs both sides of a branch under a mask (SwiftShader runs every block, and every loop body
 * once, whatever the mask) would pay for it on every element.
 */
export const F32_FLAGGED = /* wgsl */ `
var<private> SLOW: bool;
fn expf(x: f32) -> f32 { let r = expf_fast(x); if (r.y == 1u) { SLOW = true; } return bitcast<f32>(r.x); }
fn fdiv(a: f32, b: f32) -> f32 { let r = fdiv_fast(a, b); if (r.y == 1u) { SLOW = true; } return bitcast<f32>(r.x); }
`;

/** `expf` / `fdiv` in software float64 (after F64), rounded once: every argument (`expf_slow`, `fdiv_slow` too). */
export const F32_SOFT = /* wgsl */ `
fn expf_slow(v: f32) -> f32 { return bitcast<f32>(f_to_f32(f_exp(f_from_f32(bitcast<u32>(v))))); }
fn fdiv_slow(a: f32, b: f32) -> f32 { return bitcast<f32>(f_to_f32(f_div(f_from_f32(bitcast<u32>(a)), f_from_f32(bitcast<u32>(b))))); }
fn expf(v: f32) -> f32 { return expf_slow(v); }
fn fdiv(a: f32, b: f32) -> f32 { return fdiv_slow(a, b); }
`;

/**
 * Checks of the fixed-point helpers route's fast pass uses: P = [n, op]; op 0: out[i] =
 * exp_diff(a[i], b[i]) (float64 bits), 1: recip64(a[2i], a[2i + 1]) (`test/common/webgpu-cases.mjs`
 * compares them with the core's exp and with BigInt).
 */
export const FIXED_CHECK = `
${CHECK_IO}
${U64}
${F32_FAST}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= P[0]) { return; }
  if (P[1] == 0u) { out[i] = exp_diff(a[i], b[i]); } else { out[i] = recip64(vec2<u32>(a[2u * i], a[2u * i + 1u])); }
}
`;

/**
 * Checks of F32_FAST (float32 bits in and out): P = [n, op]; op 0: out = expf_fast(a), 1:
 * fdiv_fast(a, b) (out[2i] the bits, out[2i + 1] 1 where undecided), 2: expf_slow(a), 3: fdiv_slow(a, b).
 */
export const F32_FAST_CHECK = `
${CHECK_IO}
${F64}
${F32_FAST}
${F32_SOFT}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 64u;
  if (i >= P[0]) { return; }
  let x = bitcast<f32>(a[i]); let y = bitcast<f32>(b[i]);
  var r = vec2<u32>(0u, 0u);
  switch (P[1]) {
    case 0u: { r = expf_fast(x); }
    case 1u: { r = fdiv_fast(x, y); }
    case 2u: { r = vec2<u32>(bitcast<u32>(expf_slow(x)), 0u); }
    default: { r = vec2<u32>(bitcast<u32>(fdiv_slow(x, y)), 0u); }
  }
  out[i] = r;
}
`;
