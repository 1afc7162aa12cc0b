/**
 * WGSL compute shaders of the webgpu backend (ts/backends/webgpu.ts), as strings.
 *
 * Every buffer is an `array<u32>` holding the tensor's bytes as the host has them: float32 and
 * int32 one element a word, bfloat16/float16 two elements a word (raw bits, low half first, so no
 * `shader-f16` is needed), bool four elements a word. A thread writes whole output words, so no
 * two threads ever write the same word. Parameters come in a read-only `array<u32>` (binding 0).
 * No float atomics: the only atomics are integer counters, and every list they fill is sorted
 * before it is used, so each output is a function of the inputs alone (docs/semantics.md).
 */

/** Dtypes as the shaders see them: 4-byte, 2-byte (bf16 / f16 bits) or 1-byte (bool) elements. */
export type Width = 4 | 2 | 1;

export const HEADER = /* wgsl */ `
@group(0) @binding(0) var<storage, read> P: array<u32>;
fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 64u; }
`;

/** Thread index `i` (one per unit of work, `n` of them); returns early past the end. */
export const MAIN = (n: string) => /* wgsl */ `
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = flat(gid, nwg);
  if (i >= ${n}) { return; }
  body(i);
}
`;

/**
 * The entry point of one phase of a shader in phases (route, routeBackward, the aux losses):
 * `call` over tokens `t < P[0]`, over (token, expert) cells `t < P[0]`, `e < P[1]`, or over
 * (token, pick) pairs `t < P[0]`, `j < P[2]` (`over`), with every binding in `bindings` touched (a shader's layout keeps only what it
 * uses, and the phases share one bind group). A shader a phase, not one branching on the phase:
 * SwiftShader pays for every phase's code under such a branch at every dispatch, whatever the
 * lanes take (route's phase 1 at T=2048, E=64: 573 ms in one shader, 53 ms alone).
 */
export function phaseMain(bindings: readonly string[], over: 'tokens' | 'cells' | 'picks', call: string): string {
  return /* wgsl */ `
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  ${bindings.map((b) => `_ = &${b};`).join(' ')}
  let i = gid.x + gid.y * nwg.x * 64u;
${
  over === 'tokens'
    ? `  if (i >= P[0]) { return; }
  let t = i;`
    : `  if (i >= P[0] * P[${over === 'cells' ? 1 : 2}]) { return; }
  let t = i / P[${over === 'cells' ? 1 : 2}];
  let ${over === 'cells' ? 'e' : 'j'} = i - t * P[${over === 'cells' ? 1 : 2}];`
}
  ${call}
}
`;
}

/** Float conversions ported from the `half` crate (what the core's wasm build uses), on bits. */
export const CONVERT = /* wgsl */ `
fn bf16_to_f32(h: u32) -> f32 { return bitcast<f32>(h << 16u); }
fn f16_to_f32(h: u32) -> f32 {
  let s = (h & 0x8000u) << 16u;
  let e = (h >> 10u) & 0x1fu;
  let m = h & 0x3ffu;
  if (e == 0x1fu) { return bitcast<f32>(s | 0x7f800000u | (m << 13u)); }
  if (e == 0u) {
    if (m == 0u) { return bitcast<f32>(s); }
    var mm = m;
    var ee = 113u;
    loop { if ((mm & 0x400u) != 0u) { break; } mm = mm << 1u; ee = ee - 1u; }
    return bitcast<f32>(s | (ee << 23u) | ((mm & 0x3ffu) << 13u));
  }
  return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}
fn f32_to_bf16(v: f32) -> u32 {
  let x = bitcast<u32>(v);
  if ((x & 0x7fffffffu) > 0x7f800000u) { return ((x >> 16u) | 0x40u) & 0xffffu; }
  let r = 0x8000u;
  if ((x & r) != 0u && (x & (3u * r - 1u)) != 0u) { return ((x >> 16u) + 1u) & 0xffffu; }
  return x >> 16u;
}
fn f32_to_f16(v: f32) -> u32 {
  let x = bitcast<u32>(v);
  let sign = x & 0x80000000u;
  let ex = x & 0x7f800000u;
  let man = x & 0x007fffffu;
  if (ex == 0x7f800000u) {
    var nan_bit = 0u;
    if (man != 0u) { nan_bit = 0x200u; }
    return (sign >> 16u) | 0x7c00u | nan_bit | (man >> 13u);
  }
  let hs = sign >> 16u;
  let he = i32(ex >> 23u) - 127 + 15;
  if (he >= 0x1f) { return hs | 0x7c00u; }
  if (he <= 0) {
    if (14 - he > 24) { return hs; }
    let m = man | 0x00800000u;
    var hm = m >> u32(14 - he);
    let rb = 1u << u32(13 - he);
    if ((m & rb) != 0u && (m & (3u * rb - 1u)) != 0u) { hm = hm + 1u; }
    return hs | hm;
  }
  let hm = man >> 13u;
  let rb = 0x1000u;
  var out = hs | (u32(he) << 10u) | hm;
  if ((man & rb) != 0u && (man & (3u * rb - 1u)) != 0u) { out = out + 1u; }
  return out;
}
`;

/** Token dtype as the arithmetic shaders see it. */
export type Kind = 'float32' | 'bfloat16' | 'float16';

/** `ld_<name>(i) -> f32` and `bits_<name>(i) -> u32` for a token buffer of `kind`. */
export function loader(name: string, kind: Kind): string {
  if (kind === 'float32') return `fn bits_${name}(i: u32) -> u32 { return ${name}[i]; }\nfn ld_${name}(i: u32) -> f32 { return bitcast<f32>(${name}[i]); }\n`;
  const conv = kind === 'bfloat16' ? 'bf16_to_f32' : 'f16_to_f32';
  return `fn bits_${name}(i: u32) -> u32 { return (${name}[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu; }\nfn ld_${name}(i: u32) -> f32 { return ${conv}(bits_${name}(i)); }\n`;
}

/** `round_out(v) -> u32`: an f32 rounded to the output dtype's bits. */
export function rounder(kind: Kind): string {
  const body = kind === 'float32' ? 'return bitcast<u32>(v);' : kind === 'bfloat16' ? 'return f32_to_bf16(v);' : 'return f32_to_f16(v);';
  return `fn round_out(v: f32) -> u32 { ${body} }\n`;
}

/** Elements a u32 word holds. */
export function perWord(width: Width): number {
  return 4 / width;
}

/**
 * The loop of a thread that writes the output word `out[w]`: its `per` elements, the last word
 * cut at `count` elements. `element` is the WGSL of one element, given its index `e`; it sets
 * `let bits`, the element's bits in the output dtype.
 */
export function packWord(per: number, count: string, element: string): string {
  return `  var word = 0u;
  for (var k = 0u; k < ${per}u; k = k + 1u) {
    let e = w * ${per}u + k;
    if (e >= ${count}) { break; }
${element}
    word = word | (bits << (k * ${32 / per}u));
  }
  out[w] = word;
`;
}

/** `body(w)` and `main` of a shader that writes one output word a thread (`packWord`), with `h` the hidden size. P = [outElements, hidden, outWords, ...]. */
function wordBody(per: number, element: string): string {
  return `fn body(w: u32) {
  let n = P[0]; let h = P[1];
${packWord(per, 'n', element)}}
${MAIN('P[2]')}`;
}

/**
 * Row gather: `out[r, :] = x[rows[r], :]`, bit for bit (permute, sortChunksByIndex and its
 * backward, unpermuteBackward without probs). P = [outElements, hidden, outWords]. A thread
 * writes one output word.
 */
export function gatherRows(width: Width): string {
  const per = perWord(width);
  const bits = width === 4 ? 'x[j]' : width === 2 ? '(x[j >> 1u] >> ((j & 1u) * 16u)) & 0xffffu' : '(x[j >> 2u] >> ((j & 3u) * 8u)) & 0xffu';
  return `${HEADER}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> rows: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
${wordBody(
  per,
  `    let r = e / h;
    let j = u32(rows[r]) * h + (e - r * h);
    let bits = ${bits};`,
)}`;
}

/**
 * Row gather of whole 16-byte words (rows of `hidden * width` bytes, a multiple of 16), any
 * dtype: a workgroup copies 256 consecutive `vec4<u32>` of the output, each thread 4 of them 64
 * apart (each of its loads coalesced with its workgroup's), all 4 loaded before any is stored, so
 * that a thread has 64 bytes in flight (one word a thread: 0.088 ms for the 134 MB of a T=4096,
 * H=1024, k=4 float32 permute on an H200, 1.5 TB/s). P = [rowWords (hidden * width / 16),
 * outWords]; dispatched as ceil(outWords / 256) workgroups of 64 threads.
 */
export const GATHER_VEC4 = `${HEADER}
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> rows: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) l: u32) {
  let W = P[0]; let N = P[1];
  let first = (wg.x + wg.y * nwg.x) * 256u + l;
  var v: array<vec4<u32>, 4>;
  for (var j = 0u; j < 4u; j = j + 1u) {
    let q = first + 64u * j;
    if (q < N) { let r = q / W; v[j] = x[u32(rows[r]) * W + (q - r * W)]; }
  }
  for (var j = 0u; j < 4u; j = j + 1u) {
    let q = first + 64u * j;
    if (q < N) { out[q] = v[j]; }
  }
}
`;

/** `routed(t, e, E)`: whether the bool routing map `rm [T, E]` (4 cells a word) routes token t to expert e. */
const ROUTED = /* wgsl */ `fn routed(t: u32, e: u32, E: u32) -> bool { let j = t * E + e; return ((rm[j >> 2u] >> ((j & 3u) * 8u)) & 0xffu) != 0u; }
`;

/**
 * `expert_of(i)`: the expert of slot i, from the routing map's column counts `counts` (plain) or
 * `i / C` (drop-and-pad); P[1] = E, P[2] = dropAndPad, P[3] = C.
 */
const EXPERT_OF = /* wgsl */ `fn expert_of(i: u32) -> u32 {
  if (P[2] == 1u) { return i / P[3]; }
  var e = 0u;
  var end = 0u;
  loop { end = end + u32(counts[e]); if (i < end || e + 1u >= P[1]) { break; } e = e + 1u; }
  return e;
}
`;

/**
 * The routing map's counts by chunk: thread (b, e) counts the routed tokens of column e among
 * the chunk's tokens `[b C, (b + 1) C)`, into `cnt[e nChunks + b]` (expert-major, the order of
 * the plan: an exclusive scan of `cnt` gives every chunk's first slot). Neighbouring threads
 * read neighbouring cells of a token's row. P = [T, E, C, nChunks].
 */
export const CHUNK_COUNT = `${HEADER}
@group(0) @binding(1) var<storage, read> rm: array<u32>;
@group(0) @binding(2) var<storage, read_write> cnt: array<u32>;
${ROUTED}fn body(i: u32) {
  let T = P[0]; let E = P[1]; let C = P[2];
  let b = i / E; let e = i - b * E;
  let t1 = min(T, b * C + C);
  var c = 0u;
  for (var t = b * C; t < t1; t = t + 1u) { if (routed(t, e, E)) { c = c + 1u; } }
  cnt[e * P[3] + b] = c;
}
${MAIN('P[3] * P[1]')}`;

/** The column counts from the chunk counts: thread e adds its column's nChunks counts. P = [E, nChunks]. */
export const COLUMN_SUM = `${HEADER}
@group(0) @binding(1) var<storage, read> cnt: array<u32>;
@group(0) @binding(2) var<storage, read_write> counts: array<i32>;
fn body(e: u32) {
  var c = 0u;
  for (var b = 0u; b < P[1]; b = b + 1u) { c = c + cnt[e * P[1] + b]; }
  counts[e] = i32(c);
}
${MAIN('P[0]')}`;

/**
 * Exclusive scan of `a [M]` into `out [M + 1]` (`out[M]` the total), one workgroup of 256
 * threads, in rounds of 2048 values: the workgroup loads a round into workgroup memory (8 loads a
 * thread, neighbouring threads neighbouring values, all in flight at once), thread l sums its run
 * of 8 consecutive values there, the workgroup scans the 256 sums (Hillis-Steele: 8 steps), each
 * thread writes its run's prefixes back in place, and the round is stored as it was loaded, plus
 * the rounds before it. Integer sums, so the result does not depend on the order. Workgroup
 * memory is indexed `x + x / 32` (a run's 8 values, read by 32 threads at once, in distinct banks).
 * (The scan it replaces gave each thread one run of ceil(M / 256) values read and written one
 * after another: for the plan's 16384 counts, 64 dependent loads a thread, 0.042 ms on an H200.)
 * P = [M]. Dispatched as one workgroup.
 */
export const SCAN = `${HEADER}
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
var<workgroup> tile: array<u32, 2112>;
var<workgroup> part: array<u32, 256>;
fn at(x: u32) -> u32 { return x + (x >> 5u); }
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) l: u32) {
  let M = P[0];
  var carry = 0u;
  for (var base = 0u; base < M; base = base + 2048u) {
    for (var j = 0u; j < 8u; j = j + 1u) {
      let i = base + j * 256u + l;
      var v = 0u;
      if (i < M) { v = a[i]; }
      tile[at(j * 256u + l)] = v;
    }
    workgroupBarrier();
    var s = 0u;
    for (var j = 0u; j < 8u; j = j + 1u) { s = s + tile[at(8u * l + j)]; }
    part[l] = s;
    workgroupBarrier();
    for (var d = 1u; d < 256u; d = d << 1u) {
      var add = 0u;
      if (l >= d) { add = part[l - d]; }
      workgroupBarrier();
      part[l] = part[l] + add;
      workgroupBarrier();
    }
    var run = carry + part[l] - s;
    for (var j = 0u; j < 8u; j = j + 1u) {
      let x = at(8u * l + j);
      let v = tile[x];
      tile[x] = run;
      run = run + v;
    }
    carry = carry + part[255];
    workgroupBarrier();
    for (var j = 0u; j < 8u; j = j + 1u) {
      let i = base + j * 256u + l;
      if (i < M) { out[i] = tile[at(j * 256u + l)]; }
    }
    workgroupBarrier();
  }
  if (l == 0u) { out[M] = carry; }
}
`;

/**
 * The dispatch plan (permute), from the chunk counts' scan `off [E nChunks + 1]`: thread
 * (b, e) lists chunk b's tokens of expert e, ascending, from the chunk's first slot. Plain mode:
 * the routed tokens, at `off[e nChunks + b]`; chunk 0's thread writes the expert's count.
 * Drop-and-pad (P[4] = 1, capacity P[5]): the first C of "routed, then unrouted" tokens of each
 * expert (a chunk knows how many of each kind came before it). permutedProbs: the dense probs at
 * (token, expert) when P[6] = 1. P = [T, E, C, nChunks, dropAndPad, capacity, withProbs].
 */
export const PLAN_FILL = `${HEADER}
@group(0) @binding(1) var<storage, read> rm: array<u32>;
@group(0) @binding(2) var<storage, read> off: array<u32>;
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read_write> sorted: array<i32>;
@group(0) @binding(5) var<storage, read_write> pprobs: array<u32>;
@group(0) @binding(6) var<storage, read_write> tpe: array<i32>;
${ROUTED}fn put(pos: u32, t: u32, e: u32, E: u32) {
  sorted[pos] = i32(t);
  if (P[6] == 1u) { pprobs[pos] = bitcast<u32>(probs[t * E + e]); }
}
fn body(i: u32) {
  let T = P[0]; let E = P[1]; let C = P[2]; let nC = P[3];
  let b = i / E; let e = i - b * E;
  let t0 = b * C; let t1 = min(T, t0 + C);
  let first = off[e * nC];
  let mine = off[e * nC + b];
  let total = off[e * nC + nC] - first;
  if (P[4] == 1u) {
    let cap = P[5];
    var r = mine - first;
    var u = t0 - r;
    for (var t = t0; t < t1; t = t + 1u) {
      if (routed(t, e, E)) {
        if (r < cap) { put(e * cap + r, t, e, E); }
        r = r + 1u;
      } else {
        if (total + u < cap) { put(e * cap + total + u, t, e, E); }
        u = u + 1u;
      }
    }
    return;
  }
  if (b == 0u) { tpe[e] = i32(total); }
  var pos = mine;
  for (var t = t0; t < t1; t = t + 1u) { if (routed(t, e, E)) { put(pos, t, e, E); pos = pos + 1u; } }
}
${MAIN('P[3] * P[1]')}`;

/**
 * The inverse of a slot -> token map, step 1: how many slots point at each token (integer
 * atomics; the count does not depend on their order). P = [N].
 */
export const INVERSE_COUNT = `${HEADER}
@group(0) @binding(1) var<storage, read> sorted: array<i32>;
@group(0) @binding(2) var<storage, read_write> cnt: array<atomic<u32>>;
fn body(i: u32) { atomicAdd(&cnt[u32(sorted[i])], 1u); }
${MAIN('P[0]')}`;

/** Step 2 is SCAN (the counts into `start [T + 1]`). Step 3: each slot takes a place in its token's list (in any order; step 4 sorts). P = [N]. */
export const INVERSE_FILL = `${HEADER}
@group(0) @binding(1) var<storage, read> sorted: array<i32>;
@group(0) @binding(2) var<storage, read> start: array<u32>;
@group(0) @binding(3) var<storage, read_write> cursor: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> list: array<u32>;
fn body(i: u32) {
  let t = u32(sorted[i]);
  list[start[t] + atomicAdd(&cursor[t], 1u)] = i;
}
${MAIN('P[0]')}`;

/** Step 4: each token's slots in ascending order (insertion sort: a token has few slots). P = [T]. */
export const INVERSE_SORT = `${HEADER}
@group(0) @binding(1) var<storage, read> start: array<u32>;
@group(0) @binding(2) var<storage, read_write> list: array<u32>;
fn body(t: u32) {
  let a = start[t]; let b = start[t + 1u];
  for (var i = a + 1u; i < b; i = i + 1u) {
    let v = list[i];
    var j = i;
    loop { if (j <= a || list[j - 1u] <= v) { break; } list[j] = list[j - 1u]; j = j - 1u; }
    list[j] = v;
  }
}
${MAIN('P[0]')}`;

/**
 * The probability of each slot: per-slot probs as they are; dense `[T, E]` probs at (token,
 * expert of the slot), the expert from the routing map's column counts (plain) or `i / C`
 * (drop-and-pad). P = [N, E, dropAndPad, C].
 */
export const SLOT_PROBS = `${HEADER}
@group(0) @binding(1) var<storage, read> sorted: array<i32>;
@group(0) @binding(2) var<storage, read> counts: array<i32>;
@group(0) @binding(3) var<storage, read> dense: array<u32>;
@group(0) @binding(4) var<storage, read_write> p: array<u32>;
${EXPERT_OF}fn body(i: u32) {
  p[i] = dense[u32(sorted[i]) * P[1] + expert_of(i)];
}
${MAIN('P[0]')}`;

/**
 * The merge of unpermute and permuteBackward: `out[t, h] = sum over t's slots s, ascending, of
 * x[s, h] * p[s]` in float32 from +0, rounded once to the token dtype (P[3] = 0: no probs, the
 * products are the values). P = [outElements, hidden, outWords, withProbs]. One thread per word.
 */
export function merge(kind: Kind): string {
  const per = kind === 'float32' ? 1 : 2;
  return `${HEADER}${CONVERT}${loader('x', kind)}${rounder(kind)}
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> start: array<u32>;
@group(0) @binding(3) var<storage, read> list: array<u32>;
@group(0) @binding(4) var<storage, read> p: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
${wordBody(
  per,
  `    let t = e / h;
    let c = e - t * h;
    var acc = 0.0;
    for (var q = start[t]; q < start[t + 1u]; q = q + 1u) {
      let s = list[q];
      var v = ld_x(s * h + c);
      if (P[3] == 1u) { v = v * p[s]; }
      acc = acc + v;
    }
    let bits = round_out(acc);`,
)}`;
}

/**
 * `merge` over 16-byte words of rows whose width is a multiple of 16 bytes: a thread sums 4
 * float32 or 8 bfloat16/float16 columns of one token over its slots (the same arithmetic per
 * element as `merge`, so the same bits) and writes one `vec4<u32>`. P = [hidden, outVec4s,
 * withProbs].
 */
/** The WGSL that unpacks the 16-byte word `w` into `vals` (`per` float32 values), or packs `acc` into `o`, for `kind`. */
function vec4Words(kind: Kind, vals: string, acc: string): { per: number; unpack: string; pack: string } {
  if (kind === 'float32') {
    return {
      per: 4,
      unpack: `for (var j = 0u; j < 4u; j = j + 1u) { ${vals}[j] = bitcast<f32>(w[j]); }`,
      pack: `for (var j = 0u; j < 4u; j = j + 1u) { o[j] = bitcast<u32>(${acc}[j]); }`,
    };
  }
  const conv = kind === 'bfloat16' ? 'bf16_to_f32' : 'f16_to_f32';
  return {
    per: 8,
    unpack: `for (var j = 0u; j < 8u; j = j + 1u) { ${vals}[j] = ${conv}((w[j >> 1u] >> ((j & 1u) * 16u)) & 0xffffu); }`,
    pack: `for (var j = 0u; j < 4u; j = j + 1u) { o[j] = round_out(${acc}[2u * j]) | (round_out(${acc}[2u * j + 1u]) << 16u); }`,
  };
}

export function mergeVec4(kind: Kind): string {
  const { per, unpack, pack } = vec4Words(kind, 'vals', 'acc');
  return `${HEADER}${CONVERT}${rounder(kind)}
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> start: array<u32>;
@group(0) @binding(3) var<storage, read> list: array<u32>;
@group(0) @binding(4) var<storage, read> p: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<u32>>;
fn body(q: u32) {
  let rw = P[0] / ${per}u;
  let t = q / rw;
  let c = q - t * rw;
  var acc: array<f32, ${per}>;
  for (var j = 0u; j < ${per}u; j = j + 1u) { acc[j] = 0.0; }
  var vals: array<f32, ${per}>;
  for (var k = start[t]; k < start[t + 1u]; k = k + 1u) {
    let s = list[k];
    let w = x[s * rw + c];
    ${unpack}
    for (var j = 0u; j < ${per}u; j = j + 1u) {
      var v = vals[j];
      if (P[2] == 1u) { v = v * p[s]; }
      acc[j] = acc[j] + v;
    }
  }
  var o = vec4<u32>(0u);
  ${pack}
  out[q] = o;
}
${MAIN('P[1]')}`;
}

/**
 * `scaleRows` over 16-byte words of rows whose width is a multiple of 16 bytes: a thread scales 4
 * float32 or 8 bfloat16/float16 columns of one slot (the same arithmetic per element, so the same
 * bits) and writes one `vec4<u32>`. P = [hidden, outVec4s].
 */
export function scaleVec4(kind: Kind): string {
  const { per, unpack, pack } = vec4Words(kind, 'v', 'v');
  return `${HEADER}${CONVERT}${rounder(kind)}
@group(0) @binding(1) var<storage, read> g: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> sorted: array<i32>;
@group(0) @binding(3) var<storage, read> p: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<u32>>;
fn body(q: u32) {
  let rw = P[0] / ${per}u;
  let i = q / rw;
  let w = g[u32(sorted[i]) * rw + (q - i * rw)];
  var v: array<f32, ${per}>;
  ${unpack}
  for (var j = 0u; j < ${per}u; j = j + 1u) { v[j] = v[j] * p[i]; }
  var o = vec4<u32>(0u);
  ${pack}
  out[q] = o;
}
${MAIN('P[1]')}`;
}

/**
 * unpermuteBackward without probs is a gather; with per-slot probs: `out[i, h] = g[sorted[i], h]
 * * p[i]`, rounded to the token dtype. P = [outElements, hidden, outWords].
 */
export function scaleRows(kind: Kind): string {
  const per = kind === 'float32' ? 1 : 2;
  return `${HEADER}${CONVERT}${loader('g', kind)}${rounder(kind)}
@group(0) @binding(1) var<storage, read> g: array<u32>;
@group(0) @binding(2) var<storage, read> sorted: array<i32>;
@group(0) @binding(3) var<storage, read> p: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
${wordBody(
  per,
  `    let i = e / h;
    let bits = round_out(ld_g(u32(sorted[i]) * h + (e - i * h)) * p[i]);`,
)}`;
}

/**
 * permuteBackward's `gradProbs [T, E]`: one thread per token walks its slots in ascending order
 * and adds each slot's value at (token, expert of the slot), from +0 (the core's loop, per
 * token). P = [T, E, dropAndPad, C].
 */
export const SCATTER_SLOT_VALUES = `${HEADER}
@group(0) @binding(1) var<storage, read> start: array<u32>;
@group(0) @binding(2) var<storage, read> list: array<u32>;
@group(0) @binding(3) var<storage, read> counts: array<i32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> dense: array<f32>;
${EXPERT_OF}fn body(t: u32) {
  let E = P[1];
  for (var e = 0u; e < E; e = e + 1u) { dense[t * E + e] = 0.0; }
  for (var q = start[t]; q < start[t + 1u]; q = q + 1u) {
    let s = list[q];
    let j = t * E + expert_of(s);
    dense[j] = dense[j] + g[s];
  }
}
${MAIN('P[0]')}`;

/**
 * indicesToMultihot: one thread per word of the bool map (4 cells); each cell looks for its
 * expert among the token's k indices (the core rejects duplicates, so at most one matches).
 * P = [T, E, k, mapWords].
 */
export const INDICES_TO_MULTIHOT = `${HEADER}
@group(0) @binding(1) var<storage, read> idx: array<i32>;
@group(0) @binding(2) var<storage, read> pin: array<u32>;
@group(0) @binding(3) var<storage, read_write> rm: array<u32>;
@group(0) @binding(4) var<storage, read_write> pout: array<u32>;
fn body(w: u32) {
  let T = P[0]; let E = P[1]; let k = P[2];
  var word = 0u;
  for (var b = 0u; b < 4u; b = b + 1u) {
    let c = w * 4u + b;
    if (c >= T * E) { break; }
    let t = c / E; let e = c - t * E;
    var pv = 0u;
    for (var j = 0u; j < k; j = j + 1u) {
      if (idx[t * k + j] == i32(e)) { word = word | (1u << (b * 8u)); pv = pin[t * k + j]; }
    }
    pout[c] = pv;
  }
  rm[w] = word;
}
${MAIN('P[3]')}`;

/**
 * multihotToIndices: one thread per token lists its experts in ascending id, then -1 / prob 0.
 * P = [T, E, k, withProbs].
 */
export const MULTIHOT_TO_INDICES = `${HEADER}
@group(0) @binding(1) var<storage, read> rm: array<u32>;
@group(0) @binding(2) var<storage, read> pin: array<u32>;
@group(0) @binding(3) var<storage, read_write> idx: array<i32>;
@group(0) @binding(4) var<storage, read_write> pout: array<u32>;
fn body(t: u32) {
  let E = P[1]; let k = P[2];
  var j = 0u;
  for (var e = 0u; e < E && j < k; e = e + 1u) {
    let c = t * E + e;
    if (((rm[c >> 2u] >> ((c & 3u) * 8u)) & 0xffu) != 0u) {
      idx[t * k + j] = i32(e);
      if (P[3] == 1u) { pout[t * k + j] = pin[c]; } else { pout[t * k + j] = 0x3f800000u; }
      j = j + 1u;
    }
  }
  for (; j < k; j = j + 1u) { idx[t * k + j] = -1; pout[t * k + j] = 0u; }
}
${MAIN('P[0]')}`;

/**
 * topk: one thread per row keeps its k best columns, in order, in its output rows (insertion:
 * a new column goes before every kept one with a smaller key, so ties keep the lower column).
 * Keys are the float32 bits mapped to an unsigned order with -0 = +0 (integer compares: no
 * flushing of subnormals). A NaN sets `flag` (the core's RangeError, by the host path).
 * P = [T, E, k].
 */
export const TOPK = `${HEADER}
@group(0) @binding(1) var<storage, read> v: array<u32>;
@group(0) @binding(2) var<storage, read_write> ov: array<u32>;
@group(0) @binding(3) var<storage, read_write> oi: array<i32>;
@group(0) @binding(4) var<storage, read_write> flag: array<atomic<u32>>;
fn key(b: u32) -> u32 {
  if ((b & 0x7fffffffu) == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn body(t: u32) {
  let E = P[1]; let k = P[2];
  let o = t * k;
  var n = 0u;
  for (var e = 0u; e < E; e = e + 1u) {
    let b = v[t * E + e];
    if ((b & 0x7fffffffu) > 0x7f800000u) { atomicStore(&flag[0], 1u); }
    let kb = key(b);
    if (n == k && kb <= key(ov[o + k - 1u])) { continue; }
    var j = n;
    if (n == k) { j = k - 1u; } else { n = n + 1u; }
    loop {
      if (j == 0u || key(ov[o + j - 1u]) >= kb) { break; }
      ov[o + j] = ov[o + j - 1u];
      oi[o + j] = oi[o + j - 1u];
      j = j - 1u;
    }
    ov[o + j] = b;
    oi[o + j] = i32(e);
  }
}
${MAIN('P[0]')}`;

/**
 * unpermuteBackward's per-slot dot products `dot(g[sorted[i]], x[i])` as the core computes them:
 * float32 values widened, multiplied and summed in float64 from -0 in column order (Rust's f64
 * `sum()`), the sum rounded once to float32. In two passes (`pass`), as the activations' F32_FAST:
 *
 * - `fast`: up to 64 threads a slot. The products of two float32s are exact integers (48-bit
 *   significands) times powers of two; the threads bound the largest product's leading bit by 2^M
 *   (from the exponents) and add every product, truncated toward zero to a multiple of 2^(M - K), in 64-bit
 *   integers (K = 61 - ceil(log2 h): no overflow), with the sum of their magnitudes. The exact sum
 *   then lies within h units of the integer sum, and the core's sequentially rounded float64 sum
 *   within (h - 1) 2^-53 (1 + 2^-53)^h sum|t| < h 2^-52 sum|t| of the exact sum (recursive
 *   summation's bound; its partial sums are multiples of 2^-298 and never subnormal). Where that
 *   whole interval lies inside one float32 rounding cell (not touching a midpoint; a normal
 *   float32), every value in it, the core's sum too, rounds to the same float32, which the
 *   workgroup writes. Otherwise (a product of an infinity or NaN, an exact zero sum, a sum near a
 *   midpoint or out of the normal float32 range) the slot goes to a list.
 * - `soft`: dispatched from that list (its first three words), one thread a listed slot, F64_DOT's
 *   sequential float64 sum (`f64` is the software float64 library with it: `F64 + F64_DOT`).
 *
 * The list `L` (`[x, y, z, n, slots...]`) is zeroed before the fast pass. P = [N, hidden, K,
 * threads a slot (a power of two up to 64: about hidden / 16)]; the fast pass is dispatched as
 * N * threads-a-slot threads in workgroups of 64.
 * One thread a slot summing 1024 products one after another was latency-bound on the H200
 * (16384 threads at T=4096, k=4: 0.59 ms).
 */
export function slotDot(kind: Kind, f64: string, pass: 'fast' | 'soft'): string {
  const common = `${HEADER}${CONVERT}${f64}${loader('g', kind)}${loader('x', kind)}
@group(0) @binding(1) var<storage, read> g: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<u32>;
@group(0) @binding(3) var<storage, read> sorted: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
fn dot_a(i: u32) -> u32 { return bitcast<u32>(ld_g(i)); }
fn dot_b(i: u32) -> u32 { return bitcast<u32>(ld_x(i)); }
`;
  if (pass === 'soft')
    return `${common}@group(0) @binding(5) var<storage, read> L: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let h = P[1];
  let n = L[3];
  for (var j = gid.x; j < n; j += nwg.x * 64u) {
    let i = L[4u + j];
    out[i] = f_to_f32(dot_row(u32(sorted[i]) * h, i * h, h));
  }
}
`;
  return `${common}@group(0) @binding(5) var<storage, read_write> L: array<atomic<u32>>;
var<workgroup> w_top: array<i32, 64>;
var<workgroup> w_bad: array<u32, 64>;
var<workgroup> w_sum: array<vec4<u32>, 64>;
const NONE = -100000;
/** A finite float32's significand: value = sig * 2^ex. */
fn sig(a: u32) -> u32 { let f = a & 0x7fffffu; return select(f, f | 0x800000u, (a & 0x7f800000u) != 0u); }
fn ex(a: u32) -> i32 { return max(i32((a >> 23u) & 0xffu), 1) - 150; }
fn not_finite(a: u32) -> bool { return (a & 0x7f800000u) == 0x7f800000u; }
/** a >> n, truncated (0 from n = 64 on), without branches. */
fn shr_trunc(a: vec2<u32>, n: u32) -> vec2<u32> {
  let m = n & 31u;
  let hi_in = select(a.y << (32u - m), 0u, m == 0u);
  let r = select(vec2<u32>((a.x >> m) | hi_in, a.y >> m), vec2<u32>(a.y >> m, 0u), n >= 32u);
  return select(r, vec2<u32>(0u, 0u), n >= 64u);
}
/** Slot i to the soft pass's list. */
fn defer(i: u32) {
  let at = atomicAdd(&L[3], 1u);
  atomicStore(&L[4u + at], i);
  if (at % 64u == 0u) { atomicAdd(&L[0], 1u); }
}
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) l: u32) {
  let h = P[1];
  let K = i32(P[2]);
  let tpr = P[3];
  let first = (wg.x + wg.y * nwg.x) * (64u / tpr);
  if (first >= P[0]) { return; }
  if (first == 0u && l == 0u) { atomicStore(&L[1], 1u); atomicStore(&L[2], 1u); }
  let lane = l % tpr;
  let row0 = l - lane; // the slot's first thread in the workgroup
  let i = first + l / tpr;
  let live = i < P[0];
  var ia = 0u;
  var ib = 0u;
  if (live) { ia = u32(sorted[i]) * h; ib = i * h; }
  // 1. a bound of the largest product's leading bit (sig < 2^24 each: the product's below
  // 2^(ex a + ex b + 48)); whether any operand is an infinity or NaN
  var top = NONE;
  var bad = 0u;
  if (live) {
    for (var c = lane; c < h; c = c + tpr) {
      let a = dot_a(ia + c);
      let b = dot_b(ib + c);
      if (not_finite(a) || not_finite(b)) { bad = 1u; }
      if (sig(a) != 0u && sig(b) != 0u) { top = max(top, ex(a) + ex(b) + 47); }
    }
  }
  w_top[l] = top;
  w_bad[l] = bad;
  workgroupBarrier();
  var M = NONE;
  var any_bad = 0u;
  for (var j = row0; j < row0 + tpr; j = j + 1u) { M = max(M, w_top[j]); any_bad = any_bad | w_bad[j]; }
  // 2. the products in units of 2^(M - K), truncated toward zero, summed (two's complement), and
  // their magnitudes plus one (an upper bound of sum |t|)
  var S = vec2<u32>(0u, 0u);
  var A = vec2<u32>(0u, 0u);
  if (live && any_bad == 0u && M != NONE) {
    for (var c = lane; c < h; c = c + tpr) {
      let a = dot_a(ia + c);
      let b = dot_b(ib + c);
      let s = ex(a) + ex(b) - M + K;
      // s <= K - 47: the product (below 2^48) shifted stays below 2^(K + 1)
      let q = dot_shl(shr_trunc(mul_wide(sig(a), sig(b)), u32(max(-s, 0))), u32(max(s, 0)));
      S = select(u_add(S, q), u_sub(S, q), ((a ^ b) & 0x80000000u) != 0u);
      A = u_add(A, u_add(q, vec2<u32>(1u, 0u)));
    }
  }
  w_sum[l] = vec4<u32>(S, A);
  workgroupBarrier();
  if (!live || lane != 0u) { return; }
  if (any_bad != 0u || M == NONE) { defer(i); return; }
  S = vec2<u32>(0u, 0u);
  A = vec2<u32>(0u, 0u);
  for (var j = row0; j < row0 + tpr; j = j + 1u) { S = u_add(S, w_sum[j].xy); A = u_add(A, w_sum[j].zw); }
  // 3. the interval's half width: R = h (truncation) + h 2^-52 A (rounding), rounded up, in units
  let a30 = (A.x >> 30u) | (A.y << 2u);
  if (a30 == 0xffffffffu) { defer(i); return; }
  let R = u_add(u_shr(mul_wide(a30 + 1u, h), 22u), vec2<u32>(h + 2u, 0u));
  let neg = (S.y & 0x80000000u) != 0u;
  let mag = select(S, u_sub(vec2<u32>(0u, 0u), S), neg);
  if (!u_lt(R, mag)) { defer(i); return; }
  // 4. mag's float32 cell: its top 24 bits q, the rest rem; the whole of [mag - R, mag + R] must
  // round the same way (strictly inside, no midpoint)
  let lead = 63 - i32(u_clz(mag));
  if (lead < 25) { defer(i); return; }
  let sh = u32(lead - 23);
  let q = u_shr(mag, sh).x;
  let rem = u_sub(mag, u_shl(vec2<u32>(q, 0u), sh));
  let half = u_shl(vec2<u32>(1u, 0u), sh - 1u);
  let cell = u_shl(vec2<u32>(1u, 0u), sh);
  var r = q;
  if (u_lt(R, rem) && u_lt(u_add(rem, R), half)) {
    r = q;
  } else if (u_lt(u_add(half, R), rem) && u_lt(u_add(rem, R), cell)) {
    r = q + 1u;
  } else { defer(i); return; }
  // r 2^(sh + M - K): a normal float32 of exponent lead + M - K (r = 2^24 carries into it)
  let e = lead + M - K;
  if (e < -126 || e > 126) { defer(i); return; }
  out[i] = select(0u, 0x80000000u, neg) | ((u32(e + 127) << 23u) + (r - 0x800000u));
}
`;
}
