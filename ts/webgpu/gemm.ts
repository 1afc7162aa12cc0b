/**
 * The GEMMs of matmul and the grouped experts on the GPU, in the core's float32 arithmetic bit
 * for bit (crates/moe-core/src/experts.rs): the core multiplies through matrixmultiply's sgemm,
 * which sums a result element over `k` in blocks of 256 (`S_KC`): each block's products are
 * added, one after another, to a sum that starts at zero, and the block sums are added to the
 * element in block order; products are rounded before they are added (no FMA on any target).
 * The shader does exactly that: a thread's sixteen elements each keep a block sum (`c_ij`) and a
 * total (`t_ij`); a product goes through `exact` (an exclusive-or with a zero the compiler cannot
 * see, P[5]) so that no compiler fuses it into an fma, which WGSL allows and NVIDIA's Vulkan
 * driver does. (A GPU that flushes subnormal float32 values to zero differs where a product or a
 * sum is subnormal; SwiftShader and NVIDIA keep them.)
 *
 * Grouped: one launch runs every group's tiles (an expert's rows, or an expert's weight
 * gradient), each group with its own M, K and offsets, from a table `G` (written by the host
 * when the counts are known there, else by GEMM_GROUPS on the GPU): group g at `8 g`:
 * [M, K, aOff, bOff, cOff, biasOff, probOff, its first tile]; `G[8 groups + 7]` the tile count.
 * A workgroup finds its tile's group by binary search; its tiles run row-major over N. Element (m, k) of A is `a[aOff + m ars + k acs]` (a transpose is a stride
 * swap), (k, n) of B `b[bOff + k brs + n bcs]`; C is float32, row-major with N columns:
 * `c[cOff + m N + n]`. The epilogue (P[6]): 0 none, 1 `+ bias[biasOff + n]`, 2
 * `+ bias[biasOff + n] * probs[probOff + m]` (the product rounded first): the core's bias steps.
 *
 * P = [N, ars, acs, brs, bcs, 0 (exact's zero), epilogue, groups]. More workgroups than tiles may
 * run (the device table's bound): those past the count return.
 */
import { F64 } from './f64.js';
import { CONVERT, HEADER, type Kind, loader, MAIN, packWord, rounder } from './shaders.js';

/** Rows and columns of a workgroup's tile (16 x 16 threads, 4 x 4 elements each), and its k-step. */
export const TILE = 64;
const KT = 16;
/** The core's k-block (matrixmultiply's S_KC). */
export const KC = 256;

const FOUR = [0, 1, 2, 3];
/** A thread's 4 x 4 elements: rows tm + 16 i, columns tn + 16 j, each with its own block sum c_ij and total t_ij (written out: no private arrays indexed in loops). */
const ALL = FOUR.flatMap((i) => FOUR.map((j) => [i, j]));

export function gemm(ka: Kind, kb: Kind, kbias: Kind): string {
  return `
@group(0) @binding(0) var<storage, read> P: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read> G: array<u32>;
@group(0) @binding(4) var<storage, read_write> c: array<u32>;
@group(0) @binding(5) var<storage, read> bias: array<u32>;
@group(0) @binding(6) var<storage, read> probs: array<f32>;
${CONVERT}
${loader('a', ka)}${loader('b', kb)}${loader('bias', kbias)}
fn exact(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) ^ P[5]); }
var<workgroup> As: array<f32, ${KT * TILE}>;
var<workgroup> Bs: array<f32, ${KT * TILE}>;
/** [M, K, aOff, bOff, cOff, biasOff, probOff, valid]: the tile's group, read once. */
var<workgroup> info: array<u32, 8>;
var<workgroup> corner: vec2<u32>;
/** C[m, n] = v and the epilogue, where (m, n) lies inside the group's M rows and the N columns. */
fn store(inf: array<u32, 8>, m: u32, n: u32, sum: f32) {
  if (m >= inf[0] || n >= P[0]) { return; }
  var v = sum;
  if (P[6] == 1u) { v = v + ld_bias(inf[5] + n); }
  else if (P[6] == 2u) { v = v + exact(ld_bias(inf[5] + n) * probs[inf[6] + m]); }
  c[inf[4] + m * P[0] + n] = bitcast<u32>(v);
}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let t = wid.x + wid.y * nwg.x;
  if (li == 0u) {
    info[7] = 0u;
    let groups = P[7];
    if (t < G[8u * groups + 7u]) {
      // the tile's group: the last g whose first tile is at or before t (groups without tiles share the next one's)
      var lo = 0u; var hi = groups - 1u;
      loop { if (lo >= hi) { break; } let mid = (lo + hi + 1u) / 2u; if (G[8u * mid + 7u] <= t) { lo = mid; } else { hi = mid - 1u; } }
      for (var i = 0u; i < 7u; i = i + 1u) { info[i] = G[8u * lo + i]; }
      info[7] = 1u;
      let nt = (P[0] + ${TILE - 1}u) / ${TILE}u;
      let local = t - G[8u * lo + 7u];
      corner = vec2<u32>((local / nt) * ${TILE}u, (local % nt) * ${TILE}u);
    }
  }
  let inf = workgroupUniformLoad(&info);
  if (inf[7] == 0u) { return; }
  let m0n0 = workgroupUniformLoad(&corner);
  let M = inf[0]; let K = inf[1]; let N = P[0];
  let ars = P[1]; let acs = P[2]; let brs = P[3]; let bcs = P[4];
  let tm = li / 16u; let tn = li % 16u;
${ALL.map(([i, j]) => `  var c${i}${j} = 0.0; var t${i}${j} = 0.0;`).join('\n')}
  for (var k0 = 0u; k0 < K; k0 = k0 + ${KT}u) {
    for (var q = 0u; q < ${(KT * TILE) / 256}u; q = q + 1u) {
      let e = li + 256u * q;
      // A: 64 rows x ${KT} k (k fastest: a row's k run is contiguous without transA)
      let r = e / ${KT}u; let ka = e % ${KT}u;
      let m = m0n0.x + r; let k = k0 + ka;
      var av = 0.0;
      if (m < M && k < K) { av = ld_a(inf[2] + m * ars + k * acs); }
      As[ka * ${TILE}u + r] = av;
      // B: ${KT} k x 64 columns (columns fastest)
      let kb = e / ${TILE}u; let col = e % ${TILE}u;
      let n = m0n0.y + col; let k2 = k0 + kb;
      var bv = 0.0;
      if (n < N && k2 < K) { bv = ld_b(inf[3] + k2 * brs + n * bcs); }
      Bs[kb * ${TILE}u + col] = bv;
    }
    workgroupBarrier();
    let kn = min(${KT}u, K - k0);
    for (var kk = 0u; kk < kn; kk = kk + 1u) {
      let row = kk * ${TILE}u;
${FOUR.map((i) => `      let a${i} = As[row + tm + ${16 * i}u]; let b${i} = Bs[row + tn + ${16 * i}u];`).join('\n')}
${ALL.map(([i, j]) => `      c${i}${j} = c${i}${j} + exact(a${i} * b${j});`).join('\n')}
    }
    workgroupBarrier();
    // the end of a ${KC}-block of k (or of k): its sum goes into the total
    if (((k0 + ${KT}u) % ${KC}u) == 0u || k0 + ${KT}u >= K) {
${ALL.map(([i, j]) => `      t${i}${j} = t${i}${j} + c${i}${j}; c${i}${j} = 0.0;`).join('\n')}
    }
  }
${ALL.map(([i, j]) => `  store(inf, m0n0.x + tm + ${16 * i}u, m0n0.y + tn + ${16 * j}u, t${i}${j});`).join('\n')}
}
`;
}

/** One GEMM group: rows M, depth K, and its element offsets in A, B, C, the bias and the probs. */
export interface GemmGroup {
  m: number;
  k: number;
  aOff: number;
  bOff: number;
  cOff: number;
  biasOff?: number;
  probOff?: number;
}

/** The table `G` of a grouped GEMM with N columns, written on the host (the groups known), and its tile count. */
export function gemmTable(groups: readonly GemmGroup[], n: number): { table: Uint32Array; tiles: number } {
  const nt = Math.ceil(n / TILE);
  const table = new Uint32Array(8 * (groups.length + 1));
  let tiles = 0;
  groups.forEach((g, i) => {
    table.set([g.m, g.k, g.aOff, g.bOff, g.cOff, g.biasOff ?? 0, g.probOff ?? 0, tiles], 8 * i);
    tiles += Math.ceil(g.m / TILE) * nt;
  });
  table[8 * groups.length + 7] = tiles;
  return { table, tiles };
}

/**
 * The same table written on the GPU from the experts' row offsets (`offsets [E + 1]`, a scan of
 * device counts: nothing read back), one thread for every group (E is small). Each group's
 * entries are `rows`-mode (M = its rows: `aOff = off aRow`, `bOff = e bPer`, `cOff = off cRow`,
 * K fixed) or `weights`-mode (K = its rows: `aOff = off aRow`, `bOff = off bRow`,
 * `cOff = e cPer`, M fixed). P = [groups, N, mode (0 rows, 1 weights), fixed M or K, aRow,
 * bPer or bRow, cRow or cPer, biasPer].
 */
export const GEMM_GROUPS = `${HEADER}
@group(0) @binding(1) var<storage, read> offsets: array<u32>;
@group(0) @binding(2) var<storage, read_write> G: array<u32>;
fn body(i: u32) {
  let groups = P[0];
  let nt = (P[1] + ${TILE - 1}u) / ${TILE}u;
  var tiles = 0u;
  for (var e = 0u; e < groups; e = e + 1u) {
    let off = offsets[e];
    let rows = offsets[e + 1u] - off;
    var m = rows; var k = P[3]; var b = e * P[5]; var c = off * P[6];
    if (P[2] == 1u) { m = P[3]; k = rows; b = off * P[5]; c = e * P[6]; }
    G[8u * e] = m; G[8u * e + 1u] = k; G[8u * e + 2u] = off * P[4]; G[8u * e + 3u] = b;
    G[8u * e + 4u] = c; G[8u * e + 5u] = e * P[7]; G[8u * e + 6u] = off; G[8u * e + 7u] = tiles;
    tiles = tiles + ((m + ${TILE - 1}u) / ${TILE}u) * nt;
  }
  G[8u * groups + 7u] = tiles;
}
${MAIN('1u')}`;

/**
 * Column sums over each group's rows, in row order from zero (the core's bias gradients):
 * `out[g cols + j] = sum over rows r of group g of x[r cols + j] (* probs[r], rounded first)`.
 * G = the groups' row offsets [groups + 1]. P = [cols, groups, withProbs, 0 (exact's zero)].
 */
export function columnSums(kind: Kind): string {
  return `${HEADER}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> G: array<u32>;
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
${CONVERT}
${loader('x', kind)}
fn exact(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) ^ P[3]); }
fn body(i: u32) {
  let cols = P[0];
  let g = i / cols; let j = i - g * cols;
  var s = 0.0;
  for (var r = G[g]; r < G[g + 1u]; r = r + 1u) {
    var v = ld_x(r * cols + j);
    if (P[2] == 1u) { v = exact(v * probs[r]); }
    s = s + v;
  }
  out[i] = bitcast<u32>(s);
}
${MAIN('P[0] * P[1]')}`;
}

/**
 * The grouped experts' probs gradient of a row (one thread a row): the down bias's share, the sum
 * in float64 from -0 (Rust's float Sum) of the float32 products `g[r, d] * b2[e, d]`, rounded to
 * float32 (0 without a down bias), then `+ gp[r]` (the activation's share) in float64, rounded
 * again: the core's two steps. G = the experts' row offsets [experts + 1] (row r's expert is the
 * one whose rows hold it). P = [rows, dim, experts, withBias].
 */
export function expertsGradProbs(kg: Kind, kbias: Kind): string {
  return `${HEADER}
@group(0) @binding(1) var<storage, read> g: array<u32>;
@group(0) @binding(2) var<storage, read> bias: array<u32>;
@group(0) @binding(3) var<storage, read> gp: array<u32>;
@group(0) @binding(4) var<storage, read> G: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
${CONVERT}
${F64}
${loader('g', kg)}${loader('bias', kbias)}
fn body(r: u32) {
  let dim = P[1];
  var base = 0u;
  if (P[3] == 1u) {
    // the expert holding row r: the first e with G[e + 1] > r
    var lo = 0u; var hi = P[2] - 1u;
    loop { if (lo >= hi) { break; } let mid = (lo + hi) / 2u; if (G[mid + 1u] > r) { hi = mid; } else { lo = mid + 1u; } }
    var sum = vec2<u32>(0u, 0x80000000u);
    for (var d = 0u; d < dim; d = d + 1u) {
      sum = f_add(sum, f_from_f32(bitcast<u32>(ld_g(r * dim + d) * ld_bias(lo * dim + d))));
    }
    base = f_to_f32(sum);
  }
  out[r] = f_to_f32(f_add(f_from_f32(base), f_from_f32(gp[r])));
}
${MAIN('P[0]')}`;
}

/** float32 words rounded to `kind` (one thread an output word). P = [elements, words]. */
export function narrow(kind: Kind): string {
  const per = kind === 'float32' ? 1 : 2;
  return `${HEADER}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
${CONVERT}
${rounder(kind)}
fn body(w: u32) {
${packWord(per, 'P[0]', '    let bits = round_out(bitcast<f32>(x[e]));')}}
${MAIN('P[1]')}`;
}
