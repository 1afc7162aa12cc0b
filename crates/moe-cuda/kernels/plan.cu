// The dispatch plan on the GPU: routing map [T, E] (bool bytes) -> tokensPerExpert, expert
// offsets, sortedIndices (experts in turn, tokens ascending within an expert) and the token CSR
// (each token's slots in ascending slot order) that the permute/unpermute kernels walk.
//
// Same plan as moe_core::permute::DispatchPlan::{from_routing_map, with_capacity}, bit for bit,
// and deterministic: integer counts and prefix sums only, each output written by one thread.
//
// The map is read in chunks of PLAN_CHUNK tokens; thread (chunk, e) owns column e of its chunk,
// so consecutive threads read consecutive bytes of a row.
//   1. plan_chunk_count: selected tokens of column e in each chunk.
//   2. plan_chunk_scan (one warp per expert): exclusive prefix over chunks (chunk bases, in
//      place), the selected tokens of each expert and its slots (its count, or the capacity
//      with drop-and-pad); plan_expert_offsets (one block): the exclusive prefix over experts
//      (expert offsets, offsets[E] = number of slots).
//   Plain plans (no capacity), one kernel:
//   3. plan_rows (one block per chunk): the chunk's routing bits in shared memory; each token's
//      row_ptr (the chunk's base is the sum of its chunk bases over the experts, then a prefix
//      over the chunk's tokens); then per expert, its selected tokens in order: slot offsets[e] +
//      rank, written to sortedIndices and to the token's CSR row at the expert's position in it.
//   Drop-and-pad plans:
//   3. plan_fill: walks its chunk's tokens in order; selected token t of expert e gets slot
//      offsets[e] + rank (ranks past the capacity are dropped); with drop-and-pad the unselected
//      tokens with the lowest ids fill what is left of the capacity. Writes sortedIndices, the
//      slot of every (t, e) in slot_of [T, E] (-1: none) and counts each token's slots.
//   4. scan_exclusive (one block): row_ptr from the per-token counts.
//   5. plan_row_fill: one warp per token lists its slots in ascending expert (= slot) order.


#define PLAN_CHUNK 64

extern "C" __global__ void plan_chunk_count(const u8* __restrict__ map, int T, int E, int* __restrict__ chunk_counts) { MOE_PDL_ENTRY();
    const int chunk = blockIdx.x;
    const int e = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const int t0 = chunk * PLAN_CHUNK;
    const int t1 = min(T, t0 + PLAN_CHUNK);
    int c = 0;
    // unrolled so that the chunk's loads are in flight together (a loop of dependent-looking
    // loads waits for each: ~6 us at T=16384, E=8)
#pragma unroll 16
    for (int t = t0; t < t1; t++) c += __ldg(map + (i64)t * E + e) != 0;
    chunk_counts[(i64)chunk * E + e] = c;
}

// plan_chunk_count for maps whose rows are whole 16-byte vectors (E % 16 == 0, E / 16 dividing
// 256, the map 16-byte aligned): one block of 256 threads per chunk, E / 16 threads a row, each
// loading 16 routing bytes at once (a byte a thread took 28 us for DeepSeek-V3's 4 MB map under
// ncu); per-thread counts of its 16 experts, summed over the block's row groups in shared memory
// (dynamic: 256 / (E / 16) * E ints = 16 KiB).
extern "C" __global__ void __launch_bounds__(256) plan_chunk_count_v(const u8* __restrict__ map, int T, int E, int* __restrict__ chunk_counts) { MOE_PDL_ENTRY();
    extern __shared__ int part[];
    const int lanes = E >> 4;
    const int groups = blockDim.x / lanes;
    const int col = threadIdx.x % lanes, g = threadIdx.x / lanes;
    const int t0 = blockIdx.x * PLAN_CHUNK;
    const int t1 = min(T, t0 + PLAN_CHUNK);
    int c[16];
#pragma unroll
    for (int j = 0; j < 16; j++) c[j] = 0;
#pragma unroll 4
    for (int t = t0 + g; t < t1; t += groups) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(map + (i64)t * E) + col);
        const u32 parts[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int p = 0; p < 4; p++)
#pragma unroll
            for (int b = 0; b < 4; b++) c[4 * p + b] += ((parts[p] >> (8 * b)) & 0xffu) != 0;
    }
#pragma unroll
    for (int j = 0; j < 16; j++) part[g * E + col * 16 + j] = c[j];
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int sum = 0;
        for (int r = 0; r < groups; r++) sum += part[r * E + e];
        chunk_counts[(i64)blockIdx.x * E + e] = sum;
    }
}

// One warp: column e of chunk_counts [chunks, E] becomes its exclusive prefix over the chunks, in
// place; returns the column's total. L2: load through L2 (__ldcg), for counts written by other
// blocks of the same kernel (plan_small_count's last block); else cached loads (plan_chunk_scan:
// the warps of a block share sectors).
template <bool L2>
static __device__ __forceinline__ int warp_chunk_prefix(int* __restrict__ chunk_counts, int chunks, int E, int e, int lane) {
    int carry = 0;
#pragma unroll 4
    for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int c = c0 + lane;
        const int v = c < chunks ? (L2 ? __ldcg(chunk_counts + (i64)c * E + e) : chunk_counts[(i64)c * E + e]) : 0;
        int x = v;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (c < chunks) chunk_counts[(i64)c * E + e] = carry + x - v;
        carry += __shfl_sync(0xffffffffu, x, 31);
    }
    return carry;
}

// One warp per expert: chunk_counts[c, e] becomes the tokens of e in chunks before c;
// counts_out[e] the selected tokens of e, tokens_per_expert[e] its slots.
extern "C" __global__ void plan_chunk_scan(int* __restrict__ chunk_counts, int num_chunks, int E, int capacity, int drop_and_pad,
                                           int* __restrict__ counts_out, int* __restrict__ tokens_per_expert) { MOE_PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (e >= E) return;
    const int carry = warp_chunk_prefix<false>(chunk_counts, num_chunks, E, e, lane);
    if (lane == 0) {
        counts_out[e] = carry;
        tokens_per_expert[e] = drop_and_pad ? capacity : carry;
    }
}

// One block of 1024 threads: expert_offsets = the exclusive prefix of tokens_per_expert.
extern "C" __global__ void __launch_bounds__(1024) plan_expert_offsets(const int* __restrict__ tokens_per_expert, int E, int* __restrict__ expert_offsets) { MOE_PDL_ENTRY();
    int carry = 0;
    for (int base = 0; base < E; base += blockDim.x) {
        const int e = base + threadIdx.x;
        int total;
        const int excl = block_exclusive_scan(e < E ? tokens_per_expert[e] : 0, &total);
        if (e < E) expert_offsets[e] = carry + excl;
        carry += total;
    }
    if (threadIdx.x == 0) expert_offsets[E] = carry;
}

// A plain plan's sortedIndices and token CSR, one block (256 threads) per chunk of PLAN_CHUNK
// tokens; dynamic shared memory: PLAN_CHUNK * W words of routing bits (W = ceil(E / 32)). vec:
// the map's rows are whole 16-byte vectors with E / 16 dividing 32 (E = 16, 32, ..., 512, the map
// 16-byte aligned), loaded 16 bytes a lane.
// With a wrong expected count N (the host then reports the mismatch) nothing is written out of
// bounds: row_ptr is clamped to N, and a slot at or past N is listed as -1 (permute skips it).
extern "C" __global__ void __launch_bounds__(256) plan_rows(
    const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base, const int* __restrict__ expert_offsets, int N,
    int* __restrict__ sorted_indices, int* __restrict__ row_ptr, int* __restrict__ slots, int vec) { MOE_PDL_ENTRY();
    extern __shared__ u32 bits[];
    __shared__ int row_start[PLAN_CHUNK];
    __shared__ int part[8];
    const int chunk = blockIdx.x;
    const int t0 = chunk * PLAN_CHUNK;
    const int n = min(T - t0, PLAN_CHUNK);
    const int W = (E + 31) >> 5;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // the chunk's routing bits
    if (vec) {
        // rows of 16-byte vectors (E = 16 * L, L dividing 32): L lanes a row, 32 / L rows a load;
        // each lane's 16 bytes become 16 bits, two lanes make a word (E = 16: one)
        const int L = E >> 4;
        const int per = 32 / L;
        const int sub = lane / L, col = lane % L;
#pragma unroll 4
        for (int i0 = warp * per; i0 < n; i0 += 8 * per) {
            const int i = i0 + sub;
            u32 m = 0;
            if (i < n) {
                const uint4 q = __ldg(reinterpret_cast<const uint4*>(map + (i64)(t0 + i) * E) + col);
                const u32 parts[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (int p = 0; p < 4; p++)
#pragma unroll
                    for (int b = 0; b < 4; b++)
                        if ((parts[p] >> (8 * b)) & 0xffu) m |= 1u << (4 * p + b);
            }
            const u32 hi = __shfl_down_sync(0xffffffffu, m, 1);
            if (i < n && (col & 1) == 0) bits[i * W + (col >> 1)] = L > 1 ? (m | (hi << 16)) : m;
        }
    } else {
        // one warp per token, 32 experts a ballot
#pragma unroll 8
        for (int i = warp; i < n; i += 8) {
            const u8* row = map + (i64)(t0 + i) * E;
            for (int w = 0; w < W; w++) {
                const int e = (w << 5) + lane;
                const unsigned b = __ballot_sync(0xffffffffu, e < E && __ldg(row + e) != 0);
                if (lane == 0) bits[i * W + w] = b;
            }
        }
    }
    // the chunk's first CSR position: its tokens' slots before it, over every expert
    int base = 0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) base += chunk_base[(i64)chunk * E + e];
    for (int o = 16; o > 0; o >>= 1) base += __shfl_xor_sync(0xffffffffu, base, o);
    if (lane == 0) part[warp] = base;
    __syncthreads();
    // each token's slot count, and their exclusive prefix over the chunk
    int pos = 0;
    for (int v = 0; v < 8; v++) pos += part[v];
    int c = 0;
    if ((int)threadIdx.x < n)
        for (int w = 0; w < W; w++) c += __popc(bits[threadIdx.x * W + w]);
    int total;
    const int excl = block_exclusive_scan(c, &total);
    if ((int)threadIdx.x < n) {
        row_start[threadIdx.x] = pos + excl;
        row_ptr[t0 + threadIdx.x] = min(pos + excl, N);
    }
    if (t0 + n == T && threadIdx.x == 0) row_ptr[T] = min(pos + total, N);
    __syncthreads();
    // each expert's selected tokens of the chunk, in token order
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const int w = e >> 5;
        const u32 below = (1u << (e & 31)) - 1u;
        int s = expert_offsets[e] + chunk_base[(i64)chunk * E + e];
        for (int i = 0; i < n; i++) {
            const u32 word = bits[i * W + w];
            if ((word >> (e & 31)) & 1u) {
                int rank = __popc(word & below);
                for (int v = 0; v < w; v++) rank += __popc(bits[i * W + v]);
                const int pos = row_start[i] + rank;
                if (s < N) sorted_indices[s] = t0 + i;
                if (pos < N) slots[pos] = s < N ? s : -1;
                s++;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Plain plans with at most 32 experts (W = 1; see PLAN_SMALL_KERNELS): two kernels instead of four. A token's routing row
// fits W 32-bit words (E <= 32 W), so a block of SMALL_CHUNK threads handles SMALL_CHUNK tokens,
// a thread each, and an expert's tokens in a warp come from one ballot.
//   1. plan_small_count_w<W>: each block's per-expert counts (chunk_counts [chunks, E]); the
//      last block to finish (a ticket, reset to 0 for the next call) turns them into chunk
//      bases in place and writes tokensPerExpert and the expert offsets.
//   2. plan_small_rows_w<W>: each token's row_ptr and its slots; each expert's tokens in token
//      order.
// Same outputs as the four-kernel path, bit for bit (integer counts and prefix sums only).

#define SMALL_MAX_E 256

// Token t's routing row as bits (bit e of word e / 32: expert e selected), E <= 32 W; zero for
// t >= T.
template <int W>
static __device__ __forceinline__ void small_row_bits(const u8* __restrict__ map, int T, int E, int t, u32 (&bits)[W]) {
#pragma unroll
    for (int w = 0; w < W; w++) bits[w] = 0;
    if (t >= T) return;
    const u8* row = map + (i64)t * E;
    if ((E & 15) == 0) {
        // 16 bytes a load (the row starts on a 16-byte boundary)
        const uint4* v4 = reinterpret_cast<const uint4*>(row);
#pragma unroll
        for (int i = 0; i < 2 * W; i++) {
            if (16 * i >= E) break;
            const uint4 q = __ldg(v4 + i);
            const u32 parts[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int p = 0; p < 4; p++)
#pragma unroll
                for (int b = 0; b < 4; b++)
                    if ((parts[p] >> (8 * b)) & 0xffu) bits[i >> 1] |= 1u << (16 * (i & 1) + 4 * p + b);
        }
    } else if ((E & 3) == 0) {
        const u32* v = reinterpret_cast<const u32*>(row);
#pragma unroll
        for (int i = 0; i < 8 * W; i++) {
            if (4 * i >= E) break;
            const u32 x = __ldg(v + i);
#pragma unroll
            for (int b = 0; b < 4; b++)
                if ((x >> (8 * b)) & 0xffu) bits[i >> 3] |= 1u << (4 * (i & 7) + b);
        }
    } else {
        for (int e = 0; e < E; e++)
            if (__ldg(row + e) != 0) bits[e >> 5] |= 1u << (e & 31);
    }
}

// counts[warp][e]: the tokens of e in each warp of the block (E <= 32 W).
template <int W>
static __device__ __forceinline__ void small_warp_counts(const u32 (&bits)[W], int E, int (*counts)[SMALL_MAX_E]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int w = 0; w < W; w++) {
        for (int b = 0; b < 32 && 32 * w + b < E; b++) {
            const unsigned m = __ballot_sync(0xffffffffu, (bits[w] >> b) & 1u);
            if (lane == 0) counts[warp][32 * w + b] = __popc(m);
        }
    }
}

// One block of SMALL_CHUNK threads per chunk. ticket: a zeroed word the last block resets.
template <int W, int SMALL_CHUNK>
static __device__ __forceinline__ void plan_small_count_impl(const u8* __restrict__ map, int T, int E, int* __restrict__ chunk_counts,
                                                             unsigned* __restrict__ ticket, int* __restrict__ tokens_per_expert,
                                                             int* __restrict__ expert_offsets) {
    static_assert(32 * W <= SMALL_CHUNK, "a thread per expert in the last block's scan");
    __shared__ int warp_counts[SMALL_CHUNK / 32][SMALL_MAX_E];
    __shared__ int totals[SMALL_MAX_E];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 bits[W];
    small_row_bits<W>(map, T, E, blockIdx.x * SMALL_CHUNK + threadIdx.x, bits);
    small_warp_counts<W>(bits, E, warp_counts);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += SMALL_CHUNK) {
        int c = 0;
#pragma unroll
        for (int w = 0; w < SMALL_CHUNK / 32; w++) c += warp_counts[w][e];
        chunk_counts[(i64)blockIdx.x * E + e] = c;
    }
    // the last block to get here sees every block's counts (this block's writes are ordered
    // before the ticket by the barrier and thread 0's fence)
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int chunks = gridDim.x;
    // a warp per expert: exclusive prefix over chunks
    for (int e = warp; e < E; e += SMALL_CHUNK / 32) {
        const int carry = warp_chunk_prefix<true>(chunk_counts, chunks, E, e, lane);
        if (lane == 0) totals[e] = carry;
    }
    __syncthreads();
    const int v = (int)threadIdx.x < E ? totals[threadIdx.x] : 0;
    int total;
    const int excl = block_exclusive_scan(v, &total);
    if ((int)threadIdx.x < E) {
        tokens_per_expert[threadIdx.x] = v;
        expert_offsets[threadIdx.x] = excl;
    }
    if (threadIdx.x == 0) {
        expert_offsets[E] = total;
        *ticket = 0u;
    }
}

// One block of SMALL_CHUNK threads per chunk, a thread per token. chunk_base: plan_small_count's
// chunk bases. With a wrong expected count N nothing is written out of bounds (as plan_rows).
template <int W, int SMALL_CHUNK>
static __device__ __forceinline__ void plan_small_rows_impl(const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base,
                                                            const int* __restrict__ expert_offsets, int N, int* __restrict__ sorted_indices,
                                                            int* __restrict__ row_ptr, int* __restrict__ slots) {
    __shared__ int warp_counts[SMALL_CHUNK / 32][SMALL_MAX_E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.x;
    const int t = chunk * SMALL_CHUNK + threadIdx.x;
    u32 bits[W];
    small_row_bits<W>(map, T, E, t, bits);
    small_warp_counts<W>(bits, E, warp_counts);
    __syncthreads();
    // warp_counts[w][e] becomes the first slot of e's tokens in warp w: the expert's offset, its
    // tokens in earlier chunks, then in earlier warps; base: the chunk's first CSR position (its
    // tokens' slots before it, over every expert)
    int base = 0;
    for (int e = threadIdx.x; e < E; e += SMALL_CHUNK) {
        const int before = chunk_base[(i64)chunk * E + e];
        base += before;
        int s = expert_offsets[e] + before;
#pragma unroll
        for (int w = 0; w < SMALL_CHUNK / 32; w++) {
            const int c = warp_counts[w][e];
            warp_counts[w][e] = s;
            s += c;
        }
    }
    int count = 0;
#pragma unroll
    for (int w = 0; w < W; w++) count += __popc(bits[w]);
    // the chunk's base is the sum of the per-expert ones (a block reduction, through the scan)
    int chunk_pos, total;
    block_exclusive_scan(base, &chunk_pos);
    const int pos = chunk_pos + block_exclusive_scan(count, &total);
    if (t == T - 1) row_ptr[T] = min(chunk_pos + total, N);
    if (t < T) row_ptr[t] = min(pos, N);
    // each selected (t, e): slot = the first slot of e's tokens in this warp + those of lower lanes
    const u32 below_lane = (1u << lane) - 1u;
    int j = 0;
#pragma unroll
    for (int w = 0; w < W; w++) {
        for (int b = 0; b < 32 && 32 * w + b < E; b++) {
            const unsigned m = __ballot_sync(0xffffffffu, (bits[w] >> b) & 1u);
            if ((bits[w] >> b) & 1u) {
                const int s = warp_counts[warp][32 * w + b] + __popc(m & below_lane);
                if (s < N) sorted_indices[s] = t;
                if (pos + j < N) slots[pos + j] = s < N ? s : -1;
                j++;
            }
        }
    }
}

#define PLAN_SMALL_KERNELS(W, C)                                                                               \
    extern "C" __global__ void __launch_bounds__(C) plan_small_count_w##W##_c##C(                             \
        const u8* map, int T, int E, int* chunk_counts, unsigned* ticket, int* tokens_per_expert, int* expert_offsets) { MOE_PDL_ENTRY(); \
        plan_small_count_impl<W, C>(map, T, E, chunk_counts, ticket, tokens_per_expert, expert_offsets);      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(C) plan_small_rows_w##W##_c##C(                              \
        const u8* map, int T, int E, const int* chunk_base, const int* expert_offsets, int N, int* sorted_indices, \
        int* row_ptr, int* slots) { MOE_PDL_ENTRY();                                                                            \
        plan_small_rows_impl<W, C>(map, T, E, chunk_base, expert_offsets, N, sorted_indices, row_ptr, slots); \
    }

// E <= 32 only: with E = 256 (W = 8) the two kernels took 0.103 ms against the four-kernel
// path's 0.073 on an H100 (the per-thread row loads and 256 ballots a warp). C: tokens (threads)
// a block (128 measured the same as 256 at the Mixtral-like shape: 0.160-0.171 against
// 0.160-0.166 ms end to end).
PLAN_SMALL_KERNELS(1, 256)

extern "C" __global__ void plan_fill(
    const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base, const int* __restrict__ counts,
    const int* __restrict__ expert_offsets, int capacity, int drop_and_pad, int N,
    int* __restrict__ sorted_indices, int* __restrict__ slot_of, int* __restrict__ row_counts) { MOE_PDL_ENTRY();
    const int chunk = blockIdx.x;
    const int e = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const int t0 = chunk * PLAN_CHUNK;
    const int t1 = min(T, t0 + PLAN_CHUNK);
    int r = chunk_base[(i64)chunk * E + e];  // selected tokens of e before t0
    int u = t0 - r;                           // unselected tokens of e before t0
    const int off = expert_offsets[e];
    const int filled = drop_and_pad ? min(counts[e], capacity) : 0;
    const int pad = drop_and_pad ? capacity - filled : 0;
    for (int t = t0; t < t1; t++) {
        int s = -1;
        if (__ldg(map + (i64)t * E + e) != 0) {
            if (!drop_and_pad || r < capacity) s = off + r;
            r++;
        } else {
            if (u < pad) s = off + filled + u;
            u++;
        }
        // slots past the N allocated ones exist only when the caller's expected count was
        // wrong (the host then reports the mismatch): drop them, so nothing is written out of bounds
        if (s >= N) s = -1;
        if (s >= 0) {
            sorted_indices[s] = t;
            atomicAdd(row_counts + t, 1);  // integer: the same count whatever the order
        }
        slot_of[(i64)t * E + e] = s;
    }
}

// One block of 1024 threads: out[i] = sum of in[0..i) for i in 0..=n.
extern "C" __global__ void __launch_bounds__(1024) scan_exclusive(const int* __restrict__ in, int n, int* __restrict__ out) { MOE_PDL_ENTRY();
    int carry = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        int total;
        const int excl = block_exclusive_scan(i < n ? in[i] : 0, &total);
        if (i < n) out[i] = carry + excl;
        carry += total;
    }
    if (threadIdx.x == 0) out[n] = carry;
}

// One warp per token (blockDim 128 = 4 tokens a block).
extern "C" __global__ void plan_row_fill(const int* __restrict__ slot_of, int T, int E, const int* __restrict__ row_ptr, int* __restrict__ slots) { MOE_PDL_ENTRY();
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T) return;
    int pos = row_ptr[t];
    for (int e0 = 0; e0 < E; e0 += 32) {
        const int e = e0 + lane;
        const int s = e < E ? slot_of[(i64)t * E + e] : -1;
        const unsigned m = __ballot_sync(0xffffffffu, s >= 0);
        if (s >= 0) slots[pos + __popc(m & ((1u << lane) - 1u))] = s;
        pos += __popc(m);
    }
}

// weights[s] = dense[sorted[s], expert of s] (the expert from the offsets), one thread a slot.
extern "C" __global__ void gather_slot_probs(const float* __restrict__ dense, const int* __restrict__ sorted_indices,
                                             const int* __restrict__ expert_offsets, int E, int N, float* __restrict__ out) { MOE_PDL_ENTRY();
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= N) return;
    out[s] = __ldg(dense + (i64)__ldg(sorted_indices + s) * E + expert_of(expert_offsets, E, s));
}

// ---------------------------------------------------------------------------------------
// permute with its plan, one kernel (plain plans, E in {1, 2, 4, 8, 16, 32}, numOutTokens
// given, a small routing map: see permute_fused in crates/moe-cuda/src/device_ops.rs). The
// plan kernels above and the permute kernel after them cost two launches and their gaps
// (~0.027 ms at the Mixtral-like shape, a fifth of the copy); here each block
//   1. counts the whole map: per expert, the tokens before its chunk and all of them. Every
//      block reads the same T * E bytes (from L2: 128 KiB at T = 16384, E = 8), which needs
//      no grid-wide barrier (and no co-residency); 16 routing bytes a load, summed as bytes
//      (each byte lane of a u32 a counter, emptied every 255 loads);
//   2. builds its chunk's part of the plan as plan_small_rows does: a thread per token, the
//      expert's tokens in a warp from one ballot; writes sortedIndices, row_ptr, slots and the
//      permuted probs; block 0 writes tokensPerExpert and the expert offsets;
//   3. copies its tokens' rows to their slots, FUSED_UNROLL words a thread in flight.
// Same outputs as plan_small_* + permute_scatter, bit for bit (integer counts and prefix sums
// only, each output written by one thread). With a wrong expected count N nothing is written
// out of bounds (as plan_rows; the host reports the mismatch).

#define FUSED_THREADS 512
#define FUSED_WARPS (FUSED_THREADS / 32)
#define FUSED_UNROLL 8
#define FUSED_MAX_CHUNK 256
#define FUSED_MAX_LOCAL_SLOTS 4096

// Each byte of x: 1 where it is nonzero, else 0 (the OR of its bits, folded into bit 0).
static __device__ __forceinline__ u32 nonzero_bytes(u32 x) {
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    return x & 0x01010101u;
}

template <typename W>
static __device__ __forceinline__ void permute_fused_impl(const u8* __restrict__ map, int T, int E, int chunk, const W* __restrict__ tokens,
                                                          W* __restrict__ out, int words_per_row, const float* __restrict__ dense_probs,
                                                          float* __restrict__ out_probs, int N, int* __restrict__ sorted_indices,
                                                          int* __restrict__ row_ptr, int* __restrict__ slots, int* __restrict__ tokens_per_expert,
                                                          int* __restrict__ expert_offsets) {
    // per warp: the counts of its byte lanes (E = 32: lane 16 p + j of the vectors of parity p)
    __shared__ int red[FUSED_WARPS][2][32];
    __shared__ int tail[2][32];
    __shared__ int before_e[32], first_e[32];
    __shared__ int warp_first[FUSED_WARPS][32];
    __shared__ int row_start[FUSED_MAX_CHUNK + 1];
    __shared__ int local_slots[FUSED_MAX_LOCAL_SLOTS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t0 = blockIdx.x * chunk;
    const int n = min(T - t0, chunk);
    if (tid < 64) tail[tid >> 5][lane] = 0;

    // 1. the whole map's counts: vectors before q0 hold the tokens before this chunk
    //    (t0 * E is a multiple of 16: chunk is)
    const i64 q_all = ((i64)T * E) >> 4;
    const i64 q0 = ((i64)t0 * E) >> 4;
    const uint4* m4 = reinterpret_cast<const uint4*>(map);
    int cb[16], cr[16];
#pragma unroll
    for (int j = 0; j < 16; j++) cb[j] = cr[j] = 0;
    for (i64 base = 0; base < q_all; base += (i64)255 * FUSED_THREADS) {
        const i64 end = min(q_all, base + (i64)255 * FUSED_THREADS);
        u32 ab[4] = {0u, 0u, 0u, 0u}, ar[4] = {0u, 0u, 0u, 0u};
#pragma unroll 4
        for (i64 q = base + tid; q < end; q += FUSED_THREADS) {
            const uint4 v = __ldg(m4 + q);
            const u32 sel = q < q0 ? 0xffffffffu : 0u;
            const u32 w[4] = {nonzero_bytes(v.x), nonzero_bytes(v.y), nonzero_bytes(v.z), nonzero_bytes(v.w)};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                ab[i] += w[i] & sel;
                ar[i] += w[i] & ~sel;
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int b = 0; b < 4; b++) {
                cb[4 * i + b] += (ab[i] >> (8 * b)) & 0xffu;
                cr[4 * i + b] += (ar[i] >> (8 * b)) & 0xffu;
            }
    }
    // a thread's vectors all have its parity (the stride is even): E = 32 keeps the two apart
    const int stop = E == 32 ? 2 : 1;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        for (int o = 16; o >= stop; o >>= 1) {
            cb[j] += __shfl_xor_sync(0xffffffffu, cb[j], o);
            cr[j] += __shfl_xor_sync(0xffffffffu, cr[j], o);
        }
    }
    if (lane < stop) {
#pragma unroll
        for (int j = 0; j < 16; j++) {
            red[warp][0][16 * lane + j] = cb[j];
            red[warp][1][16 * lane + j] = cr[j];
        }
    }
    __syncthreads();
    // the map's last bytes when T * E is not a multiple of 16
    {
        const i64 b = 16 * q_all + tid;
        if (tid < 16 && b < (i64)T * E && __ldg(map + b) != 0) atomicAdd(&tail[b / E < t0 ? 0 : 1][(int)(b % E)], 1);
    }
    __syncthreads();
    if (warp == 0) {
        const int e = lane;
        int b = 0, r = 0;
        if (e < E) {
            for (int w = 0; w < FUSED_WARPS; w++) {
                if (E == 32) {
                    b += red[w][0][e];
                    r += red[w][1][e];
                } else {
                    for (int j = e; j < 16; j += E) {
                        b += red[w][0][j];
                        r += red[w][1][j];
                    }
                }
            }
            b += tail[0][e];
            r += tail[1][e];
        }
        const int total = b + r;
        // exclusive prefix of the totals over the experts
        int x = total;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        const int offset = x - total;
        if (e < E) {
            before_e[e] = b;
            first_e[e] = offset + b;
            if (blockIdx.x == 0) {
                tokens_per_expert[e] = total;
                expert_offsets[e] = offset;
            }
        }
        if (blockIdx.x == 0 && e == E - 1) expert_offsets[E] = x;
    }

    // 2. the chunk's plan: a thread per token
    u32 bits[1] = {0u};
    if (tid < n) small_row_bits<1>(map, T, E, t0 + tid, bits);
    for (int e = 0; e < E; e++) {
        const unsigned m = __ballot_sync(0xffffffffu, (bits[0] >> e) & 1u);
        if (lane == 0) warp_first[warp][e] = __popc(m);
    }
    __syncthreads();
    int chunk_pos = 0;  // the slots of the tokens before this chunk
    for (int e = 0; e < E; e++) chunk_pos += before_e[e];
    if (tid < E) {
        int s = first_e[tid];
        for (int w = 0; w < FUSED_WARPS; w++) {
            const int c = warp_first[w][tid];
            warp_first[w][tid] = s;
            s += c;
        }
    }
    int total;
    const int excl = block_exclusive_scan(__popc(bits[0]), &total);  // its barriers order warp_first
    const int pos = chunk_pos + excl;
    if (tid < n) {
        row_start[tid] = excl;
        row_ptr[t0 + tid] = min(pos, N);
    }
    if (tid == 0) {
        row_start[n] = total;
        if (t0 + n == T) row_ptr[T] = min(chunk_pos + total, N);
    }
    const u32 below_lane = (1u << lane) - 1u;
    int j = 0;
    for (int e = 0; e < E; e++) {
        const unsigned m = __ballot_sync(0xffffffffu, (bits[0] >> e) & 1u);
        if ((bits[0] >> e) & 1u) {
            const int s = warp_first[warp][e] + __popc(m & below_lane);
            const int t = t0 + tid;
            if (s < N) {
                sorted_indices[s] = t;
                if (dense_probs != 0) out_probs[s] = __ldg(dense_probs + (i64)t * E + e);
            }
            if (pos + j < N) slots[pos + j] = s < N ? s : -1;
            local_slots[excl + j] = s < N ? s : -1;
            j++;
        }
    }
    __syncthreads();

    // 3. the rows: item i * R + c is word c of the chunk's token i
    const int R = words_per_row;
    const int items = n * R;
    for (int base = 0; base < items; base += FUSED_THREADS * FUSED_UNROLL) {
        W v[FUSED_UNROLL];
        int tok[FUSED_UNROLL], col[FUSED_UNROLL];
#pragma unroll
        for (int u = 0; u < FUSED_UNROLL; u++) {
            const int it = base + u * FUSED_THREADS + tid;
            tok[u] = it < items ? it / R : -1;
            col[u] = it - tok[u] * R;
            if (tok[u] >= 0) v[u] = __ldg(tokens + (i64)(t0 + tok[u]) * R + col[u]);
        }
#pragma unroll
        for (int u = 0; u < FUSED_UNROLL; u++) {
            if (tok[u] < 0) continue;
            const int end = row_start[tok[u] + 1];
            for (int p = row_start[tok[u]]; p < end; p++) {
                const int s = local_slots[p];
                if (s >= 0) out[(i64)s * R + col[u]] = v[u];
            }
        }
    }
}

#define PERMUTE_FUSED_KERNEL(BYTES)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FUSED_THREADS, 2) permute_fused_w##BYTES(                                 \
        const u8* map, int T, int E, int chunk, const Word<BYTES>::T* tokens, Word<BYTES>::T* out, int words_per_row,      \
        const float* dense_probs, float* out_probs, int N, int* sorted_indices, int* row_ptr, int* slots,                  \
        int* tokens_per_expert, int* expert_offsets) { MOE_PDL_ENTRY();                                                                     \
        permute_fused_impl<Word<BYTES>::T>(map, T, E, chunk, tokens, out, words_per_row, dense_probs, out_probs, N,        \
                                           sorted_indices, row_ptr, slots, tokens_per_expert, expert_offsets);             \
    }

PERMUTE_FUSED_KERNEL(16)
PERMUTE_FUSED_KERNEL(8)
PERMUTE_FUSED_KERNEL(4)
PERMUTE_FUSED_KERNEL(2)
