// permute / unpermute on the GPU: the kernels behind moe-cuda's permute and unpermute.
//
// Compiled at run time by NVRTC (no headers but kernels/common.cuh: only built-in types and intrinsics), for the
// device's own architecture, with --fmad=false. Semantics: docs/semantics.md; the CPU core
// (crates/moe-core/src/permute.rs) is the reference, and these kernels match it bit for bit:
//
// * permute is a copy. Rows move as raw bits in 16-, 8-, 4- or 2-byte words (the widest that
//   divides the row), so every dtype is exact, NaN payloads included.
// * unpermute sums each token's slots in ascending slot order, in f32, from +0.0: each
//   product x * p is rounded to f32 (__fmul_rn), each addition too (__fadd_rn), and the sum
//   is rounded once to the token dtype (bf16: round to nearest even, as the core does).
//   No atomics: one thread owns each output element, so the result is the same on every run.
//
// Both kernels walk the plan token by token, through its CSR form: the slots of token t are
// slots[rowPtr[t] .. rowPtr[t+1]), in ascending slot order. So permute reads each token row
// once and writes it to all of its slots (bytes moved: T*H read + N*H written, as a copy of
// the output would), and unpermute reads the k slot rows of a token and writes its row once.
//
// Launch shape (host side, crates/moe-cuda/src/ops.rs): grid.x = tokens, grid.y = column
// blocks, blockDim.x = threads covering one column block of a row.

// Element types (F32, BF16, F16) and u16/u32 come from kernels/common.cuh, prepended by
// compile.rs.

// Raw words (Word<BYTES>) and expert_of come from kernels/common.cuh.

// Read-only, non-coherent loads (the inputs are never written by the same kernel).
static __device__ __forceinline__ u16 load_ro(const u16* p) { return __ldg(p); }
static __device__ __forceinline__ u32 load_ro(const u32* p) { return __ldg(p); }
static __device__ __forceinline__ uint2 load_ro(const uint2* p) { return __ldg(p); }
static __device__ __forceinline__ uint4 load_ro(const uint4* p) { return __ldg(p); }

// ---------------------------------------------------------------------------------------
// permute


// Each thread moves UNROLL words of one token row (strided by blockDim.x) to all of its slots.
// permutedProbs[s] = denseProbs[t, expert of s], written by the column block 0 of token t.
template <typename W, int UNROLL>
__device__ __forceinline__ void permute_scatter_impl(
    const W* __restrict__ tokens, W* __restrict__ out, long long words_per_row,
    const int* __restrict__ row_ptr, const int* __restrict__ slots,
    const float* __restrict__ dense_probs, float* __restrict__ out_probs,
    const int* __restrict__ expert_offsets, int num_experts) {
    const int t = blockIdx.x;
    const int beg = __ldg(row_ptr + t), end = __ldg(row_ptr + t + 1);
    if (beg == end) return;
    const long long col0 = (long long)blockIdx.y * blockDim.x * UNROLL + threadIdx.x;
    const W* src = tokens + (long long)t * words_per_row;
    W v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        long long c = col0 + (long long)u * blockDim.x;
        if (c < words_per_row) v[u] = load_ro(src + c);
    }
    for (int j = beg; j < end; j++) {
        const int slot = __ldg(slots + j);
        if (slot < 0) continue;  // only in a plan built for a wrong expected count (reported)
        W* dst = out + (long long)slot * words_per_row;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            long long c = col0 + (long long)u * blockDim.x;
            if (c < words_per_row) dst[c] = v[u];
        }
    }
    if (dense_probs != 0 && blockIdx.y == 0) {
        for (int j = beg + threadIdx.x; j < end; j += blockDim.x) {
            int s = __ldg(slots + j);
            if (s < 0) continue;
            out_probs[s] = __ldg(dense_probs + (long long)t * num_experts + expert_of(expert_offsets, num_experts, s));
        }
    }
}

// Slot-major gather (out[i] = tokens[sortedIndices[i]]): reads each token row k times. Kept
// for the benchmark's comparison with the token-major scatter above.
template <typename W, int UNROLL>
__device__ __forceinline__ void permute_gather_impl(
    const W* __restrict__ tokens, W* __restrict__ out, long long words_per_row,
    const int* __restrict__ sorted_indices, const float* __restrict__ dense_probs, float* __restrict__ out_probs,
    const int* __restrict__ expert_offsets, int num_experts) {
    const int s = blockIdx.x;
    const int t = __ldg(sorted_indices + s);
    const long long col0 = (long long)blockIdx.y * blockDim.x * UNROLL + threadIdx.x;
    const W* src = tokens + (long long)t * words_per_row;
    W* dst = out + (long long)s * words_per_row;
    W v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        long long c = col0 + (long long)u * blockDim.x;
        if (c < words_per_row) v[u] = load_ro(src + c);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        long long c = col0 + (long long)u * blockDim.x;
        if (c < words_per_row) dst[c] = v[u];
    }
    if (dense_probs != 0 && blockIdx.y == 0 && threadIdx.x == 0) {
        out_probs[s] = __ldg(dense_probs + (long long)t * num_experts + expert_of(expert_offsets, num_experts, s));
    }
}

#define PERMUTE_UNROLL 4

#define PERMUTE_KERNELS(BYTES)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) permute_scatter_w##BYTES(                        \
        const Word<BYTES>::T* tokens, Word<BYTES>::T* out, long long words_per_row,                    \
        const int* row_ptr, const int* slots, const float* dense_probs, float* out_probs,              \
        const int* expert_offsets, int num_experts) { MOE_PDL_ENTRY();                                                  \
        permute_scatter_impl<Word<BYTES>::T, PERMUTE_UNROLL>(tokens, out, words_per_row, row_ptr,      \
            slots, dense_probs, out_probs, expert_offsets, num_experts);                               \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) permute_gather_w##BYTES(                         \
        const Word<BYTES>::T* tokens, Word<BYTES>::T* out, long long words_per_row,                    \
        const int* sorted_indices, const float* dense_probs, float* out_probs,                         \
        const int* expert_offsets, int num_experts) { MOE_PDL_ENTRY();                                                  \
        permute_gather_impl<Word<BYTES>::T, PERMUTE_UNROLL>(tokens, out, words_per_row,                \
            sorted_indices, dense_probs, out_probs, expert_offsets, num_experts);                      \
    }

PERMUTE_KERNELS(16)
PERMUTE_KERNELS(8)
PERMUTE_KERNELS(4)
PERMUTE_KERNELS(2)

// ---------------------------------------------------------------------------------------
// unpermute

// VEC consecutive elements of one row, moved as one word.
template <typename E, int VEC> union Pack {
    typename Word<VEC * sizeof(typename E::S)>::T word;
    typename E::S v[VEC];
};

// Thread (t, chunk) owns out[t, chunk*VEC .. chunk*VEC+VEC): it reads those columns of each
// of t's slot rows, GROUP slots at a time (their loads are issued together, then summed in
// slot order), and writes the rounded sums once.
template <typename E, int VEC, int GROUP>
__device__ __forceinline__ void unpermute_impl(
    const typename E::S* __restrict__ permuted, typename E::S* __restrict__ out, long long hidden,
    const int* __restrict__ row_ptr, const int* __restrict__ slots, const float* __restrict__ weights) {
    typedef Pack<E, VEC> P;
    typedef typename Word<VEC * sizeof(typename E::S)>::T W;
    const int t = blockIdx.x;
    const long long chunk = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    const long long chunks = hidden / VEC;
    if (chunk >= chunks) return;
    const int beg = __ldg(row_ptr + t), end = __ldg(row_ptr + t + 1);
    const W* src = reinterpret_cast<const W*>(permuted) + chunk;
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; v++) acc[v] = 0.0f;
    for (int j0 = beg; j0 < end; j0 += GROUP) {
        P x[GROUP];
        float p[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            if (j0 + g < end) {
                int s = __ldg(slots + j0 + g);
                x[g].word = load_ro(src + (long long)s * chunks);
                p[g] = weights != 0 ? __ldg(weights + s) : 1.0f;
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            if (j0 + g < end) {
                if (weights != 0) {
#pragma unroll
                    for (int v = 0; v < VEC; v++) acc[v] = __fadd_rn(acc[v], __fmul_rn(E::to_f32(x[g].v[v]), p[g]));
                } else {
#pragma unroll
                    for (int v = 0; v < VEC; v++) acc[v] = __fadd_rn(acc[v], E::to_f32(x[g].v[v]));
                }
            }
        }
    }
    P y;
#pragma unroll
    for (int v = 0; v < VEC; v++) y.v[v] = E::from_f32(acc[v]);
    reinterpret_cast<W*>(out)[(long long)t * chunks + chunk] = y.word;
}

#define UNPERMUTE_GROUP 4

#define UNPERMUTE_KERNEL(NAME, E, VEC)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) unpermute_##NAME##_v##VEC(                       \
        const E::S* permuted, E::S* out, long long hidden, const int* row_ptr, const int* slots,        \
        const float* weights) { MOE_PDL_ENTRY();                                                                        \
        unpermute_impl<E, VEC, UNPERMUTE_GROUP>(permuted, out, hidden, row_ptr, slots, weights);       \
    }

UNPERMUTE_KERNEL(f32, F32, 4)
UNPERMUTE_KERNEL(f32, F32, 2)
UNPERMUTE_KERNEL(f32, F32, 1)
UNPERMUTE_KERNEL(bf16, BF16, 8)
UNPERMUTE_KERNEL(bf16, BF16, 4)
UNPERMUTE_KERNEL(bf16, BF16, 2)
UNPERMUTE_KERNEL(bf16, BF16, 1)
UNPERMUTE_KERNEL(f16, F16, 8)
UNPERMUTE_KERNEL(f16, F16, 4)
UNPERMUTE_KERNEL(f16, F16, 2)
UNPERMUTE_KERNEL(f16, F16, 1)
