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

extern "C" __global__ void plan_chunk_count(const u8* __restrict__ map, int T, int E, int* __restrict__ chunk_counts) {
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

// One warp per expert: chunk_counts[c, e] becomes the tokens of e in chunks before c;
// counts_out[e] the selected tokens of e, tokens_per_expert[e] its slots.
extern "C" __global__ void plan_chunk_scan(int* __restrict__ chunk_counts, int num_chunks, int E, int capacity, int drop_and_pad,
                                           int* __restrict__ counts_out, int* __restrict__ tokens_per_expert) {
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (e >= E) return;
    int carry = 0;
#pragma unroll 4
    for (int c0 = 0; c0 < num_chunks; c0 += 32) {
        const int c = c0 + lane;
        const int v = c < num_chunks ? chunk_counts[(i64)c * E + e] : 0;
        int x = v;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (c < num_chunks) chunk_counts[(i64)c * E + e] = carry + x - v;
        carry += __shfl_sync(0xffffffffu, x, 31);
    }
    if (lane == 0) {
        counts_out[e] = carry;
        tokens_per_expert[e] = drop_and_pad ? capacity : carry;
    }
}

// One block of 1024 threads: expert_offsets = the exclusive prefix of tokens_per_expert.
extern "C" __global__ void __launch_bounds__(1024) plan_expert_offsets(const int* __restrict__ tokens_per_expert, int E, int* __restrict__ expert_offsets) {
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
// tokens; dynamic shared memory: PLAN_CHUNK * W words of routing bits (W = ceil(E / 32)).
// With a wrong expected count N (the host then reports the mismatch) nothing is written out of
// bounds: row_ptr is clamped to N, and a slot at or past N is listed as -1 (permute skips it).
extern "C" __global__ void __launch_bounds__(256) plan_rows(
    const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base, const int* __restrict__ expert_offsets, int N,
    int* __restrict__ sorted_indices, int* __restrict__ row_ptr, int* __restrict__ slots) {
    extern __shared__ u32 bits[];
    __shared__ int row_start[PLAN_CHUNK];
    __shared__ int part[8];
    const int chunk = blockIdx.x;
    const int t0 = chunk * PLAN_CHUNK;
    const int n = min(T - t0, PLAN_CHUNK);
    const int W = (E + 31) >> 5;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // the chunk's routing bits: one warp per token, 32 experts a ballot
#pragma unroll 8
    for (int i = warp; i < n; i += 8) {
        const u8* row = map + (i64)(t0 + i) * E;
        for (int w = 0; w < W; w++) {
            const int e = (w << 5) + lane;
            const unsigned b = __ballot_sync(0xffffffffu, e < E && __ldg(row + e) != 0);
            if (lane == 0) bits[i * W + w] = b;
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

extern "C" __global__ void plan_fill(
    const u8* __restrict__ map, int T, int E, const int* __restrict__ chunk_base, const int* __restrict__ counts,
    const int* __restrict__ expert_offsets, int capacity, int drop_and_pad, int N,
    int* __restrict__ sorted_indices, int* __restrict__ slot_of, int* __restrict__ row_counts) {
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
extern "C" __global__ void __launch_bounds__(1024) scan_exclusive(const int* __restrict__ in, int n, int* __restrict__ out) {
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
extern "C" __global__ void plan_row_fill(const int* __restrict__ slot_of, int T, int E, const int* __restrict__ row_ptr, int* __restrict__ slots) {
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
                                             const int* __restrict__ expert_offsets, int E, int N, float* __restrict__ out) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= N) return;
    out[s] = __ldg(dense + (i64)__ldg(sorted_indices + s) * E + expert_of(expert_offsets, E, s));
}
