// Layout ops on the GPU: indices <-> multihot, capacity (column counts, padding, token
// dropping), chunk sort, grouped-GEMM sort, and the probs gradients of permute/unpermute
// backward. The CPU core is the reference (crates/moe-core/src/{routing_map,capacity,chunks,
// grouped,permute}.rs); every kernel here gives its bits:
//
// * copies move raw bits (u32 for f32 probs, 2- to 16-byte words for rows), so NaN payloads
//   survive;
// * counts, ranks and prefix sums are integers (integer atomics only: their result does not
//   depend on the order);
// * float sums run in the core's order, one thread per output (no float atomics): the probs
//   gradient of a (token, expert) cell sums its slots in ascending slot order in f32 from +0;
//   the per-slot dot product of unpermute backward sums its exact f64 products in ascending
//   hidden order from -0.0 (Rust's f64 Sum), then rounds once to f32.
//
// Every kernel is declared on one line as `extern "C" __global__ void NAME(` so that
// kernel_names() (crates/moe-cuda/src/device.rs) lists it.

#define LAYOUT_CHUNK 64
#define LAYOUT_UNROLL 4

// Raw words (Word<BYTES>) and expert_of come from kernels/common.cuh.

// block_exclusive_scan comes from kernels/common.cuh.


// ---------------------------------------------------------------------------------------
// indicesToMultihot / multihotToIndices (moe_core::routing_map)

// One block per token: clears its rows of map / dense, then writes each listed expert.
// err[0] = 1 when an index is neither -1 nor in [0, E), or a row lists an expert twice.
extern "C" __global__ void __launch_bounds__(256) multihot_from_indices(const int* __restrict__ idx, const u32* __restrict__ probs, int T, int K, int E, u8* __restrict__ map, u32* __restrict__ dense, u32* __restrict__ err) { MOE_PDL_ENTRY();
    const int t = blockIdx.x;
    if (t >= T) return;
    const i64 row = (i64)t * E;
    for (i64 e = threadIdx.x; e < E; e += blockDim.x) {
        map[row + e] = 0;
        dense[row + e] = 0u;
    }
    __syncthreads();
    const i64 irow = (i64)t * K;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
        const int e = __ldg(idx + irow + j);
        if (e == -1) continue;
        if (e < 0 || e >= E) {
            err[0] = 1u;
            continue;
        }
        for (int j2 = 0; j2 < j; j2++) {
            if (__ldg(idx + irow + j2) == e) err[0] = 1u;
        }
        map[row + e] = 1;
        dense[row + e] = __ldg(probs + irow + j);
    }
}

// One warp per token (blockDim 128): atomicMax of the row counts into max_out[0].
extern "C" __global__ void multihot_row_max(const u8* __restrict__ map, int T, int E, u32* __restrict__ max_out) { MOE_PDL_ENTRY();
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T) return;
    int c = 0;
    for (int e = lane; e < E; e += 32) c += __ldg(map + (i64)t * E + e) != 0;
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    if (lane == 0) atomicMax(max_out, (u32)c);
}

// One warp per token (blockDim 128): its experts in ascending id, then -1 (prob 0); the prob of
// a listed expert is dense[t, e] (1.0 without dense probs).
extern "C" __global__ void multihot_to_indices_fill(const u8* __restrict__ map, const u32* __restrict__ dense, int T, int E, int K, int* __restrict__ out_idx, u32* __restrict__ out_probs) { MOE_PDL_ENTRY();
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T) return;
    const i64 row = (i64)t * E;
    const i64 orow = (i64)t * K;
    int pos = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
        const int e = e0 + lane;
        const bool sel = e < E && __ldg(map + row + e) != 0;
        const unsigned m = __ballot_sync(0xffffffffu, sel);
        if (sel) {
            const int j = pos + __popc(m & ((1u << lane) - 1u));
            if (j < K) {
                out_idx[orow + j] = e;
                out_probs[orow + j] = dense != 0 ? __ldg(dense + row + e) : 0x3f800000u;
            }
        }
        pos += __popc(m);
    }
    for (int j = pos + lane; j < K; j += 32) {
        out_idx[orow + j] = -1;
        out_probs[orow + j] = 0u;
    }
}

// ---------------------------------------------------------------------------------------
// Column counts of a [T, C] map, by chunks of LAYOUT_CHUNK rows (tokensPerExpert,
// padRoutingMap, the slot experts of permute backward).

// Thread (chunk, c): selected rows of column c in the chunk.
extern "C" __global__ void layout_chunk_count(const u8* __restrict__ map, int T, int C, int* __restrict__ chunk_counts) { MOE_PDL_ENTRY();
    const int chunk = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int t0 = chunk * LAYOUT_CHUNK;
    const int t1 = min(T, t0 + LAYOUT_CHUNK);
    int n = 0;
    for (int t = t0; t < t1; t++) n += __ldg(map + (i64)t * C + c) != 0;
    chunk_counts[(i64)chunk * C + c] = n;
}

// Thread c: chunk_counts[., c] becomes its exclusive prefix over chunks; counts[c] the total.
extern "C" __global__ void layout_chunk_scan(int* __restrict__ chunk_counts, int num_chunks, int C, int* __restrict__ counts) { MOE_PDL_ENTRY();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int acc = 0;
    for (int k = 0; k < num_chunks; k++) {
        const int v = chunk_counts[(i64)k * C + c];
        chunk_counts[(i64)k * C + c] = acc;
        acc += v;
    }
    counts[c] = acc;
}

// One block of 1024 threads: out[i] = sum of in[0..i) for i in 0..=n.
extern "C" __global__ void __launch_bounds__(1024) layout_scan_exclusive(const int* __restrict__ in, int n, int* __restrict__ out) { MOE_PDL_ENTRY();
    int carry = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const int v = i < n ? in[i] : 0;
        int total;
        const int excl = block_exclusive_scan(v, &total);
        if (i < n) out[i] = carry + excl;
        carry += total;
    }
    if (threadIdx.x == 0) out[n] = carry;
}

// ---------------------------------------------------------------------------------------
// padRoutingMap (moe_core::capacity::pad_routing_map)

// Thread (chunk, e): copies its column of the chunk (as 0/1) and routes the unselected tokens
// whose rank among the unselected tokens of e is below need(e) = (m - c % m) % m.
extern "C" __global__ void pad_routing_fill(const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base, const int* __restrict__ counts, i64 pad_multiple, u8* __restrict__ out) { MOE_PDL_ENTRY();
    const int chunk = blockIdx.x;
    const int e = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const int t0 = chunk * LAYOUT_CHUNK;
    const int t1 = min(T, t0 + LAYOUT_CHUNK);
    const i64 c = counts[e];
    const i64 need = (pad_multiple - c % pad_multiple) % pad_multiple;
    i64 u = t0 - chunk_base[(i64)chunk * E + e];  // unselected tokens of e before t0
    for (int t = t0; t < t1; t++) {
        const i64 cell = (i64)t * E + e;
        if (__ldg(map + cell) != 0) {
            out[cell] = 1;
        } else {
            out[cell] = u < need ? 1 : 0;
            u++;
        }
    }
}

// ---------------------------------------------------------------------------------------
// dropTokens (moe_core::capacity::drop_tokens)

// A key whose ascending order is the core's by_prob_desc order of probs: NaN first (all NaNs
// equal), then descending value, -0 == +0. Equal keys fall back to the token id.
static __device__ __forceinline__ u32 drop_key(u32 b) {
    const u32 mag = b & 0x7fffffffu;
    if (mag > 0x7f800000u) return 0u;
    if (mag == 0u) b = 0u;
    const u32 ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // ascending value
    return ~ordered;                                                  // descending value, >= 0x007fffff
}

// One block per expert (blockDim 1024), 0 < capacity < T: mask[t, e] = 1 for the first
// `capacity` tokens of the order (drop_key(probs[t, e]), t). A radix select (4 passes of 8 bits,
// integer histograms) finds the key K of the capacity-th token; tokens with a smaller key are
// kept, and of those with key K the first `capacity - #smaller` by token id (a block scan).
extern "C" __global__ void __launch_bounds__(1024) drop_mask_probs(const u32* __restrict__ probs, int T, int E, int capacity, u8* __restrict__ mask) { MOE_PDL_ENTRY();
    __shared__ int hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_remaining;
    const int e = blockIdx.x;
    u32 prefix = 0u;
    int remaining = capacity;  // how many of the keys matching `prefix` are still to take
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        const u32 high = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int t = threadIdx.x; t < T; t += blockDim.x) {
            const u32 key = drop_key(__ldg(probs + (i64)t * E + e));
            if ((key & high) == (prefix & high)) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0;
            u32 digit = 255u;
            for (int d = 0; d < 256; d++) {
                if (cum + hist[d] >= remaining) {
                    digit = (u32)d;
                    break;
                }
                cum += hist[d];
            }
            s_prefix = prefix | (digit << shift);
            s_remaining = remaining - cum;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        __syncthreads();
    }
    int carry = 0;  // tokens with key == prefix before this round
    for (int base = 0; base < T; base += blockDim.x) {
        const int t = base + threadIdx.x;
        u32 key = 0xffffffffu;
        if (t < T) key = drop_key(__ldg(probs + (i64)t * E + e));
        const bool eq = t < T && key == prefix;
        int total;
        const int rank = carry + block_exclusive_scan(eq ? 1 : 0, &total);
        if (t < T) mask[(i64)t * E + e] = (key < prefix || (eq && rank < remaining)) ? 1 : 0;
        carry += total;
    }
}

// One block per expert (blockDim 1024), 0 < capacity < T: the first `capacity` tokens of the
// order "routed tokens ascending, then unrouted tokens ascending".
extern "C" __global__ void __launch_bounds__(1024) drop_mask_position(const u8* __restrict__ map, int T, int E, int capacity, u8* __restrict__ mask) { MOE_PDL_ENTRY();
    const int e = blockIdx.x;
    int routed = 0;
    for (int base = 0; base < T; base += blockDim.x) {
        const int t = base + threadIdx.x;
        const int f = t < T && __ldg(map + (i64)t * E + e) != 0 ? 1 : 0;
        int total;
        block_exclusive_scan(f, &total);
        routed += total;
    }
    int carry = 0;  // routed tokens before this round
    for (int base = 0; base < T; base += blockDim.x) {
        const int t = base + threadIdx.x;
        const int f = t < T && __ldg(map + (i64)t * E + e) != 0 ? 1 : 0;
        int total;
        const int before = carry + block_exclusive_scan(f, &total);  // routed tokens before t
        if (t < T) {
            const bool keep = f ? before < capacity : (i64)routed + (t - before) < (i64)capacity;
            mask[(i64)t * E + e] = keep ? 1 : 0;
        }
        carry += total;
    }
}

// x * 0 as the core's times_zero: a NaN stays itself, an infinity gives f32::NAN (0x7fc00000),
// anything else the zero of its sign.
static __device__ __forceinline__ u32 times_zero_bits(u32 b) {
    const u32 mag = b & 0x7fffffffu;
    if (mag > 0x7f800000u) return b;
    if (mag == 0x7f800000u) return 0x7fc00000u;
    return b & 0x80000000u;
}

// Elementwise: the capacity mask is `mask` (mode 2), all ones (mode 1) or all zeros (mode 0);
// the output map is the mask (pad) or map AND mask; the output probs are kept or times zero.
extern "C" __global__ void drop_apply(const u8* __restrict__ map, const u32* __restrict__ probs, const u8* __restrict__ mask, i64 n, int mode, int pad, u8* __restrict__ out_map, u32* __restrict__ out_probs) { MOE_PDL_ENTRY();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const bool m = mode == 2 ? __ldg(mask + i) != 0 : mode == 1;
        const bool keep = pad ? m : (m && __ldg(map + i) != 0);
        const u32 b = __ldg(probs + i);
        out_map[i] = keep ? 1 : 0;
        out_probs[i] = keep ? b : times_zero_bits(b);
    }
}

// ---------------------------------------------------------------------------------------
// sortChunksByIndex and its backward (moe_core::chunks): output row r lies in output chunk i
// (the last i with out_start[i] <= r) and comes from row src_start[i] + (r - out_start[i]).

static __device__ __forceinline__ int chunk_source_row(const int* __restrict__ out_start, const int* __restrict__ src_start, int C, int r) {
    int lo = 0, hi = C - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (__ldg(out_start + mid) <= r) lo = mid; else hi = mid - 1;
    }
    return __ldg(src_start + lo) + (r - __ldg(out_start + lo));
}

template <typename W>
__device__ __forceinline__ void chunk_copy_impl(const W* __restrict__ src, W* __restrict__ dst, i64 words_per_row, const int* __restrict__ out_start, const int* __restrict__ src_start, int C) {
    const int r = blockIdx.x;
    const int sr = chunk_source_row(out_start, src_start, C, r);
    const i64 col0 = (i64)blockIdx.y * blockDim.x * LAYOUT_UNROLL + threadIdx.x;
    const W* s = src + (i64)sr * words_per_row;
    W* d = dst + (i64)r * words_per_row;
    W v[LAYOUT_UNROLL];
#pragma unroll
    for (int u = 0; u < LAYOUT_UNROLL; u++) {
        const i64 c = col0 + (i64)u * blockDim.x;
        if (c < words_per_row) v[u] = s[c];
    }
#pragma unroll
    for (int u = 0; u < LAYOUT_UNROLL; u++) {
        const i64 c = col0 + (i64)u * blockDim.x;
        if (c < words_per_row) d[c] = v[u];
    }
}

extern "C" __global__ void __launch_bounds__(256) chunk_copy_w16(const uint4* src, uint4* dst, i64 words_per_row, const int* out_start, const int* src_start, int C) { MOE_PDL_ENTRY(); chunk_copy_impl<uint4>(src, dst, words_per_row, out_start, src_start, C); }
extern "C" __global__ void __launch_bounds__(256) chunk_copy_w8(const uint2* src, uint2* dst, i64 words_per_row, const int* out_start, const int* src_start, int C) { MOE_PDL_ENTRY(); chunk_copy_impl<uint2>(src, dst, words_per_row, out_start, src_start, C); }
extern "C" __global__ void __launch_bounds__(256) chunk_copy_w4(const u32* src, u32* dst, i64 words_per_row, const int* out_start, const int* src_start, int C) { MOE_PDL_ENTRY(); chunk_copy_impl<u32>(src, dst, words_per_row, out_start, src_start, C); }
extern "C" __global__ void __launch_bounds__(256) chunk_copy_w2(const u16* src, u16* dst, i64 words_per_row, const int* out_start, const int* src_start, int C) { MOE_PDL_ENTRY(); chunk_copy_impl<u16>(src, dst, words_per_row, out_start, src_start, C); }

// One thread per output row: the probs move with their rows (raw bits).
extern "C" __global__ void chunk_probs(const u32* __restrict__ src, u32* __restrict__ dst, int N, const int* __restrict__ out_start, const int* __restrict__ src_start, int C) { MOE_PDL_ENTRY();
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    dst[r] = __ldg(src + chunk_source_row(out_start, src_start, C, r));
}

// ---------------------------------------------------------------------------------------
// groupedMmSort (moe_core::grouped): a stable counting sort of the N = T * K slots by local
// expert, by chunks of `per_chunk` slots, one thread per chunk walking its slots in order.

// The local expert of slot s, or -1 (masked, or another rank's). err[0] = 1 on an index < -1.
static __device__ __forceinline__ int grouped_local(const int* __restrict__ idx, const u8* __restrict__ token_mask, int s, int K, i64 start, i64 end, u32* __restrict__ err) {
    const int e = __ldg(idx + s);
    if (e < -1) {
        err[0] = 1u;
        return -1;
    }
    const bool live = token_mask == 0 || __ldg(token_mask + s / K) != 0;
    if (live && (i64)e >= start && (i64)e < end) return (int)((i64)e - start);
    return -1;
}

// Thread c: slots of each local expert in chunk c (chunk_counts [chunks, L], zeroed before).
extern "C" __global__ void grouped_count(const int* __restrict__ idx, const u8* __restrict__ token_mask, int N, int K, i64 start, i64 end, int L, int per_chunk, int chunks, int* __restrict__ chunk_counts, u32* __restrict__ err) { MOE_PDL_ENTRY();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const int s0 = c * per_chunk;
    const int s1 = min(N, s0 + per_chunk);
    int* row = chunk_counts + (i64)c * L;
    for (int s = s0; s < s1; s++) {
        const int l = grouped_local(idx, token_mask, s, K, start, end, err);
        if (l >= 0) row[l]++;
    }
}

// Thread c: each local slot of chunk c goes to offs[l] + (its rank among the slots of l before
// it); chunk_base [chunks, L] holds each chunk's base ranks (exclusive prefix over chunks).
template <typename E>
__device__ __forceinline__ void grouped_fill_impl(const int* __restrict__ idx, const u8* __restrict__ token_mask, const typename E::S* __restrict__ weights, int N, int K, i64 start, i64 end, int L, int per_chunk, int chunks,
                                                  int* __restrict__ chunk_base, const int* __restrict__ offs, int* __restrict__ token_ids, int* __restrict__ slot_ids, float* __restrict__ sorted_weights, u32* __restrict__ err) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    const int s0 = c * per_chunk;
    const int s1 = min(N, s0 + per_chunk);
    int* row = chunk_base + (i64)c * L;
    for (int s = s0; s < s1; s++) {
        const int l = grouped_local(idx, token_mask, s, K, start, end, err);
        if (l < 0) continue;
        const int at = __ldg(offs + l) + row[l];
        row[l]++;
        token_ids[at] = s / K;
        slot_ids[at] = s;
        sorted_weights[at] = E::to_f32(weights[s]);
    }
}

#define GROUPED_FILL_ARGS const int* idx, const u8* token_mask, const E_S* weights, int N, int K, i64 start, i64 end, int L, int per_chunk, int chunks, int* chunk_base, const int* offs, int* token_ids, int* slot_ids, float* sorted_weights, u32* err
#define GROUPED_FILL_CALL idx, token_mask, weights, N, K, start, end, L, per_chunk, chunks, chunk_base, offs, token_ids, slot_ids, sorted_weights, err
#define E_S float
extern "C" __global__ void grouped_fill_f32(GROUPED_FILL_ARGS) { MOE_PDL_ENTRY(); grouped_fill_impl<F32>(GROUPED_FILL_CALL); }
#undef E_S
#define E_S u16
extern "C" __global__ void grouped_fill_bf16(GROUPED_FILL_ARGS) { MOE_PDL_ENTRY(); grouped_fill_impl<BF16>(GROUPED_FILL_CALL); }
extern "C" __global__ void grouped_fill_f16(GROUPED_FILL_ARGS) { MOE_PDL_ENTRY(); grouped_fill_impl<F16>(GROUPED_FILL_CALL); }
#undef E_S

// offsets[l] = offs[l + 1]: the inclusive cumulative sum (the end of each expert's group).
extern "C" __global__ void grouped_offsets(const int* __restrict__ offs, int L, int* __restrict__ out) { MOE_PDL_ENTRY();
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l < L) out[l] = __ldg(offs + l + 1);
}

// ---------------------------------------------------------------------------------------
// The probs gradients of permuteBackward and unpermuteBackward (moe_core::permute)

// The expert of slot i: i / capacity with drop-and-pad, else from the routing map's expert
// offsets. One thread per slot: err[0] = 1 when (plain mode) routingMap does not route the
// slot's token to its expert; with `dense` ([T, E] f32), weights[i] = dense[token, expert].
extern "C" __global__ void slot_expert_check(const int* __restrict__ sorted, int n, const int* __restrict__ offsets, int E, int capacity, int drop_and_pad, const u8* __restrict__ map, const u32* __restrict__ dense, u32* __restrict__ weights, u32* __restrict__ err) { MOE_PDL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = drop_and_pad ? i / capacity : expert_of(offsets, E, i);
    const i64 cell = (i64)__ldg(sorted + i) * E + e;
    if (!drop_and_pad && __ldg(map + cell) == 0) err[0] = 1u;
    if (dense != 0) weights[i] = __ldg(dense + cell);
}

// One thread per token t (which owns row t of `dense`, zeroed before): for each of its slots i
// in ascending slot order, dense[t, expert of i] += g[i] (f32, rounded at each step).
extern "C" __global__ void probs_grad_scatter(const int* __restrict__ row_ptr, const int* __restrict__ slots, int T, const float* __restrict__ g, int E, int capacity, int drop_and_pad, const int* __restrict__ offsets, float* __restrict__ dense) { MOE_PDL_ENTRY();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int beg = __ldg(row_ptr + t), end = __ldg(row_ptr + t + 1);
    float* row = dense + (i64)t * E;
    for (int j = beg; j < end; j++) {
        const int i = __ldg(slots + j);
        const int e = drop_and_pad ? i / capacity : expert_of(offsets, E, i);
        row[e] = __fadd_rn(row[e], __ldg(g + i));
    }
}

// gradPermuted[i, h] = from_f32(to_f32(gradOutput[sorted[i], h]) * w[i]): block row i, columns
// strided over grid.y x blockDim.
template <typename E>
__device__ __forceinline__ void unpermute_bwd_scale_impl(const typename E::S* __restrict__ g, const int* __restrict__ sorted, const float* __restrict__ w, typename E::S* __restrict__ out, i64 hidden) {
    const int i = blockIdx.x;
    const i64 t = __ldg(sorted + i);
    const float p = __ldg(w + i);
    for (i64 h = (i64)blockIdx.y * blockDim.x + threadIdx.x; h < hidden; h += (i64)gridDim.y * blockDim.x) {
        out[(i64)i * hidden + h] = E::from_f32(__fmul_rn(E::to_f32(g[t * hidden + h]), p));
    }
}

extern "C" __global__ void __launch_bounds__(256) unpermute_bwd_scale_f32(const float* g, const int* sorted, const float* w, float* out, i64 hidden) { MOE_PDL_ENTRY(); unpermute_bwd_scale_impl<F32>(g, sorted, w, out, hidden); }
extern "C" __global__ void __launch_bounds__(256) unpermute_bwd_scale_bf16(const u16* g, const int* sorted, const float* w, u16* out, i64 hidden) { MOE_PDL_ENTRY(); unpermute_bwd_scale_impl<BF16>(g, sorted, w, out, hidden); }
extern "C" __global__ void __launch_bounds__(256) unpermute_bwd_scale_f16(const u16* g, const int* sorted, const float* w, u16* out, i64 hidden) { MOE_PDL_ENTRY(); unpermute_bwd_scale_impl<F16>(g, sorted, w, out, hidden); }

// One warp per slot i (blockDim 128): out[i] = f32(sum over h, ascending, from -0.0, of the
// exact f64 products gradOutput[sorted[i], h] * permuted[i, h]). Lanes load 32 columns at a
// time (coalesced) and every lane adds the 32 products in column order (the same sums).
template <typename E>
__device__ __forceinline__ void slot_dot_impl(const typename E::S* __restrict__ g, const typename E::S* __restrict__ x, const int* __restrict__ sorted, int n, i64 hidden, float* __restrict__ out) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (i >= n) return;
    const i64 t = __ldg(sorted + i);
    const typename E::S* gr = g + t * hidden;
    const typename E::S* xr = x + (i64)i * hidden;
    double acc = -0.0;
    for (i64 h0 = 0; h0 < hidden; h0 += 32) {
        const i64 h = h0 + lane;
        double prod = 0.0;
        if (h < hidden) prod = __dmul_rn((double)E::to_f32(gr[h]), (double)E::to_f32(xr[h]));
        const int cnt = (int)min((i64)32, hidden - h0);
        for (int l = 0; l < cnt; l++) acc = __dadd_rn(acc, __shfl_sync(0xffffffffu, prod, l));
    }
    if (lane == 0) out[i] = __double2float_rn(acc);
}

extern "C" __global__ void slot_dot_f32(const float* g, const float* x, const int* sorted, int n, i64 hidden, float* out) { MOE_PDL_ENTRY(); slot_dot_impl<F32>(g, x, sorted, n, hidden, out); }
extern "C" __global__ void slot_dot_bf16(const u16* g, const u16* x, const int* sorted, int n, i64 hidden, float* out) { MOE_PDL_ENTRY(); slot_dot_impl<BF16>(g, x, sorted, n, hidden, out); }
extern "C" __global__ void slot_dot_f16(const u16* g, const u16* x, const int* sorted, int n, i64 hidden, float* out) { MOE_PDL_ENTRY(); slot_dot_impl<F16>(g, x, sorted, n, hidden, out); }

// ---------------------------------------------------------------------------------------
// Expert parallelism's send side (ts/ep.ts dispatch on device tensors; crates/moe-cuda/src/layout.rs
// ep_send_plan_device / ep_rank_extras_device).
//
// ep_send_plan: a thread a token t of idx [T, k] (global expert ids, -1 masked), owner [E] the
// rank of each expert: map [t, j] = 1 where one of t's picks lives on rank j (the row cleared
// first), counts[j] += the tokens sent to rank j (each once), counts[N + j] += the picks rank j
// receives, and counts[2N] = 1 where a pick is outside [0, E) and not -1, or a row lists an
// expert twice (the host then names it). Counts gather in shared memory (2N words) first:
// integer sums, the same whatever the order. counts [2N + 1] cleared by the caller.
extern "C" __global__ void __launch_bounds__(256) ep_send_plan(const int* __restrict__ idx, i64 T, int k, const int* __restrict__ owner, int E, int N,
                                                               u8* __restrict__ map, int* __restrict__ counts) { MOE_PDL_ENTRY();
    extern __shared__ int ep_counts[];
    for (int j = threadIdx.x; j < 2 * N; j += blockDim.x) ep_counts[j] = 0;
    __syncthreads();
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < T; t += (i64)gridDim.x * blockDim.x) {
        const int* row = idx + t * k;
        u8* m = map + t * N;
        for (int j = 0; j < N; j++) m[j] = 0;
        bool bad = false;
        for (int c = 0; c < k; c++) {
            const int e = row[c];
            if (e == -1) continue;
            if (e < 0 || e >= E) {
                bad = true;
                continue;
            }
            const int j = owner[e];
            bool first = true;  // the token's first pick on rank j
            for (int c2 = 0; c2 < c; c2++) {
                const int f = row[c2];
                if (f == e) bad = true;
                if (f >= 0 && f < E && owner[f] == j) first = false;
            }
            atomicAdd(&ep_counts[N + j], 1);
            if (first) {
                m[j] = 1;
                atomicAdd(&ep_counts[j], 1);
            }
        }
        if (bad) counts[2 * N] = 1;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < 2 * N; j += blockDim.x)
        if (ep_counts[j] != 0) atomicAdd(&counts[j], ep_counts[j]);
}

// ep_rank_extras: for each slot s of the send permutation (sorted [S]: tokens rank by rank,
// slot_start [N + 1] where each rank's slots start) and pick c, the pick as that rank's local
// expert id (local [s, c] = local_of[e], the expert's place among its rank's experts; -1 where the
// pick lives elsewhere or is masked) and its weight (0 elsewhere): what travels with the token's
// row (picks checked by ep_send_plan).
extern "C" __global__ void ep_rank_extras(const int* __restrict__ sorted, i64 S, const int* __restrict__ idx, const float* __restrict__ weights, int k,
                                          const int* __restrict__ owner, const int* __restrict__ local_of, const int* __restrict__ slot_start, int N,
                                          int* __restrict__ local, float* __restrict__ local_weights) { MOE_PDL_ENTRY();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < S * k; i += (i64)gridDim.x * blockDim.x) {
        const i64 s = i / k;
        const int c = (int)(i % k);
        // the slot's rank: the last j whose slots start at or before s (ranks with no slots skipped)
        int lo = 0, hi = N - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if ((i64)slot_start[mid] <= s) lo = mid;
            else hi = mid - 1;
        }
        const i64 t = sorted[s];
        const int e = idx[t * k + c];
        const bool here = e >= 0 && owner[e] == lo;
        local[i] = here ? local_of[e] : -1;
        local_weights[i] = here ? weights[t * k + c] : 0.0f;
    }
}
