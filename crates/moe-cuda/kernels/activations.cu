// Expert activations (forward, backward, the probs gradient) and the aux router losses
// (Switch load-balancing loss on probs or on logits, z-loss) on the GPU.
//
// Same semantics and the same bits as moe_core::activations and moe_core::aux_loss:
//
// * activations: float32 arithmetic written operation by operation in the core's order (no
//   contraction: NVRTC runs with --fmad=false, IEEE division with --prec-div=true), `expf(x)`
//   as the core's `detmath::exp(x as f64) as f32` (det_exp from common.cuh), each result rounded
//   once to the output dtype with the core's conversions. Every float literal is an f32 one
//   (`1.0f`): a double literal would promote the arithmetic to f64. The probs gradient of a row is
//   summed by one thread, in column order, in f64 from 0.0, as the core does.
// * losses: per-row work (the finiteness check, max, sum of exp, the row's value) by one thread per
//   row in column order; the total by one thread in token order (f64, from the start value the core
//   uses: 0.0 for the Switch loss on probs, -0.0 for Rust's `Iterator::sum` of the others), then the
//   gradient per element in f64, rounded once to f32. Invalid values (a non-finite input, a mask
//   byte above 1, a negative count) set a flag word that the host reads back with the loss; the
//   host then runs the core, which reports the error.
//
// Kernel names are plain `extern "C" __global__ void NAME(` lines, so that kernel_names()
// (crates/moe-cuda/src/device.rs) lists every one.

// Activation kinds, ActOpts and the per-column activation (act_unit): kernels/common.cuh (the
// grouped GEMM's fused epilogue applies the same code).

// The act_*_fast_* kernels compute exp in float32 (CUDA's expf, within 2 ulp) instead of the
// core's f64 exp. The grouped experts use them: their results agree with the CPU to a tolerance
// anyway (cuBLAS sums in another order), and they carry no f64 code (fewer registers, more
// warps: these passes are memory-bound). The activation ops never use them.

// Where the gate and up values of output column j sit in an input row: halves (gate at j, up at
// inter + j), interleaved pairs (2j, 2j + 1), or single (relu2: j; up unused, 0).
template <typename T>
static __device__ __forceinline__ void act_pair(int kind, const typename T::S* row, i64 inter, i64 j, float& gate, float& up) {
    if (kind == ACT_QUICK_GEGLU) {
        gate = T::to_f32(row[2 * j]);
        up = T::to_f32(row[2 * j + 1]);
    } else if (kind == ACT_RELU2) {
        gate = T::to_f32(row[j]);
        up = 0.0f;
    } else {
        gate = T::to_f32(row[j]);
        up = T::to_f32(row[inter + j]);
    }
}

// Forward: blockIdx.y (grid-stride) walks groups of ACT_ROWS rows; blockIdx.x and the threads
// the output columns of a row (one column a thread: coalesced), with no 64-bit division per
// element. Each thread first loads its column of all ACT_ROWS rows, then computes and stores
// them: the group's loads are in flight together. One row at a time (a load, its math, a store,
// the next row) kept too few bytes in flight: ncu on an H200 (fine-grained experts, 49152 x
// 1408) showed it at 14% of DRAM throughput, 19 cycles between a warp's instructions; with 4
// rows it takes 0.41 instead of 0.51 ms (Mixtral-like: 1.39 instead of 1.62).
#define ACT_ROWS 4
#define ACT_GROUPS(...)                                                                                         \
    for (i64 r0 = (i64)blockIdx.y * ACT_ROWS; r0 < rows; r0 += (i64)gridDim.y * ACT_ROWS) {                   \
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < inter; j += (i64)gridDim.x * blockDim.x) { \
            __VA_ARGS__                                                                                          \
        }                                                                                                       \
    }

// Backward: blockIdx.y (grid-stride) walks the rows, one at a time; blockIdx.x and the threads
// the output columns of a row (ACT_ILP columns a thread, strided by the block: coalesced).
// Measured on an H100 (mixtral experts shape): 4 columns a thread made the backward pass twice
// as slow (registers), and on an H200 the forward's 4 rows a thread made it slower too (0.88
// against 0.77 ms fine-grained, 2.95 against 2.45 Mixtral-like), so one it is.
#define ACT_ILP 1
#define ACT_ROWS_COLS(...)                                                                                      \
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {                                                       \
        for (i64 j0 = (i64)blockIdx.x * blockDim.x * ACT_ILP + threadIdx.x; j0 < inter;                        \
             j0 += (i64)gridDim.x * blockDim.x * ACT_ILP) {                                                    \
            _Pragma("unroll") for (int u = 0; u < ACT_ILP; u++) {                                              \
                const i64 j = j0 + (i64)u * blockDim.x;                                                        \
                if (j < inter) {                                                                               \
                    __VA_ARGS__                                                                                \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

// out[r, j] = TO(unit * prob[r]).
template <typename TI, typename TO>
static __device__ __forceinline__ void act_fwd(const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o, typename TO::S* out) {
    ACT_GROUPS({
        float gate[ACT_ROWS], up[ACT_ROWS], p[ACT_ROWS];
#pragma unroll
        for (int u = 0; u < ACT_ROWS; u++) {
            gate[u] = 0.0f;
            up[u] = 0.0f;
            p[u] = 1.0f;
            if (r0 + u < rows) {
                act_pair<TI>(o.kind, x + (r0 + u) * width, inter, j, gate[u], up[u]);
                if (probs) p[u] = probs[r0 + u];
            }
        }
#pragma unroll
        for (int u = 0; u < ACT_ROWS; u++) {
            if (r0 + u < rows) {
                const float a = act_unit(o, gate[u], up[u]);
                out[(r0 + u) * inter + j] = TO::from_f32(probs ? a * p[u] : a);
            }
        }
    })
}

// The gate and up gradients of output column (r, j).
template <typename TI, typename TO>
static __device__ __forceinline__ void act_bwd(const typename TI::S* grad, const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o,
                               typename TO::S* grad_in) {
    ACT_ROWS_COLS({
        float gate, up;
        act_pair<TI>(o.kind, x + r * width, inter, j, gate, up);
        const float gj = TI::to_f32(grad[r * inter + j]);
        const float gw = probs ? gj * probs[r] : gj;
        float d_gate, d_up;
        act_unit_grad(o, gate, up, gw, d_gate, d_up);
        typename TO::S* row = grad_in + r * width;
        if (o.kind == ACT_QUICK_GEGLU) {
            row[2 * j] = TO::from_f32(d_gate);
            row[2 * j + 1] = TO::from_f32(d_up);
        } else if (o.kind == ACT_RELU2) {
            row[j] = TO::from_f32(d_gate);
        } else {
            row[j] = TO::from_f32(d_gate);
            row[inter + j] = TO::from_f32(d_up);
        }
    })
}

// The vectorised forward and backward (act_fwdv_*, act_bwdv_*): V = 16 / sizeof(input element)
// consecutive output columns a thread (8 for bf16 / f16, 4 for f32), each of its input runs one
// 16-byte load and its output runs one store of V elements, over a flat index of (row, column
// group) pairs (u32: rows * inter / V + the grid < 2^31, checked on the host, as are inter % V ==
// 0 and 16-byte aligned buffers; otherwise the launcher takes the kernels above). The same
// per-element arithmetic as act_fwd / act_bwd, so the same bits. The one-column kernels keep few
// bytes in flight: 2-byte loads, a few per thread (H200, fine-grained experts: the forward at
// 0.41 ms, the backward at 0.77 ms, for 0.42 and 0.69 GB: a fifth of memory speed).
// N elements of S as one word (Word: common.cuh) of N * sizeof(S) bytes.
template <typename S, int N>
union Pack {
    typename Word<N * sizeof(S)>::T word;
    S v[N];
};

// N elements of T at p (aligned to their size) as f32.
template <typename T, int N>
static __device__ __forceinline__ void load_f32(const typename T::S* p, float* f) {
    Pack<typename T::S, N> pk;
    pk.word = *(const typename Word<N * sizeof(typename T::S)>::T*)p;
#pragma unroll
    for (int u = 0; u < N; u++) f[u] = T::to_f32(pk.v[u]);
}

// N f32 values to T at p (aligned to their size), each rounded once.
template <typename T, int N>
static __device__ __forceinline__ void store_f32(typename T::S* p, const float* f) {
    Pack<typename T::S, N> pk;
#pragma unroll
    for (int u = 0; u < N; u++) pk.v[u] = T::from_f32(f[u]);
    *(typename Word<N * sizeof(typename T::S)>::T*)p = pk.word;
}

// The gate and up values of output columns j .. j + V of an input row (act_pair's layouts).
template <typename T, int V>
static __device__ __forceinline__ void act_pairs(int kind, const typename T::S* row, i64 inter, i64 j, float* gate, float* up) {
    if (kind == ACT_QUICK_GEGLU) {
        float both[2 * V];
        load_f32<T, V>(row + 2 * j, both);
        load_f32<T, V>(row + 2 * j + V, both + V);
#pragma unroll
        for (int u = 0; u < V; u++) {
            gate[u] = both[2 * u];
            up[u] = both[2 * u + 1];
        }
    } else if (kind == ACT_RELU2) {
        load_f32<T, V>(row + j, gate);
#pragma unroll
        for (int u = 0; u < V; u++) up[u] = 0.0f;
    } else {
        load_f32<T, V>(row + j, gate);
        load_f32<T, V>(row + inter + j, up);
    }
}

// The gate and up gradients of output columns j .. j + V into a gradient row (act_pairs' layouts;
// relu2 has no up half).
template <typename T, int V>
static __device__ __forceinline__ void store_pairs(int kind, typename T::S* row, i64 inter, i64 j, const float* d_gate, const float* d_up) {
    if (kind == ACT_QUICK_GEGLU) {
        float both[2 * V];
#pragma unroll
        for (int u = 0; u < V; u++) {
            both[2 * u] = d_gate[u];
            both[2 * u + 1] = d_up[u];
        }
        store_f32<T, V>(row + 2 * j, both);
        store_f32<T, V>(row + 2 * j + V, both + V);
    } else if (kind == ACT_RELU2) {
        store_f32<T, V>(row + j, d_gate);
    } else {
        store_f32<T, V>(row + j, d_gate);
        store_f32<T, V>(row + inter + j, d_up);
    }
}

// The flat (row, column group) loop of the vectorised kernels: r and j (the first of V columns).
#define ACT_VEC_ITEMS(V, ...)                                                                        \
    {                                                                                                \
        const u32 groups = (u32)(inter / (V));                                                       \
        const u32 total = (u32)rows * groups;                                                        \
        for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) { \
            const u32 rg = i / groups;                                                               \
            const i64 r = rg;                                                                        \
            const i64 j = (i64)(i - rg * groups) * (V);                                              \
            __VA_ARGS__                                                                              \
        }                                                                                            \
    }

template <typename TI, typename TO>
static __device__ __forceinline__ void act_fwd_vec(const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o, typename TO::S* out) {
    constexpr int V = 16 / sizeof(typename TI::S);
    ACT_VEC_ITEMS(V, {
        float gate[V], up[V], a[V];
        act_pairs<TI, V>(o.kind, x + r * width, inter, j, gate, up);
        const float p = probs ? probs[r] : 1.0f;
_Pragma("unroll")
        for (int u = 0; u < V; u++) {
            const float v = act_unit(o, gate[u], up[u]);
            a[u] = probs ? v * p : v;
        }
        store_f32<TO, V>(out + r * inter + j, a);
    })
}

template <typename TI, typename TO>
static __device__ __forceinline__ void act_bwd_vec(const typename TI::S* grad, const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o,
                                                   typename TO::S* grad_in) {
    constexpr int V = 16 / sizeof(typename TI::S);
    ACT_VEC_ITEMS(V, {
        float gate[V], up[V], g[V], d_gate[V], d_up[V];
        act_pairs<TI, V>(o.kind, x + r * width, inter, j, gate, up);
        load_f32<TI, V>(grad + r * inter + j, g);
        const float p = probs ? probs[r] : 1.0f;
_Pragma("unroll")
        for (int u = 0; u < V; u++) act_unit_grad(o, gate[u], up[u], probs ? g[u] * p : g[u], d_gate[u], d_up[u]);
        store_pairs<TO, V>(o.kind, grad_in + r * width, inter, j, d_gate, d_up);
    })
}

// act_unit and act_unit_grad of one element at once, with the same operations (the same bits):
// for swiglu the exp, 1 + exp and gate / (1 + exp) are computed once for both.
static __device__ __forceinline__ float act_unit_and_grad(const ActOpts& o, float gate, float up, float gw, float& d_gate, float& d_up) {
    if (o.kind == ACT_SWIGLU) {
        const float d = 1.0f + act_expf(-gate, o.fast);
        const float s = 1.0f / d;
        const float silu = gate / d;  // act_silu(gate)
        d_gate = gw * s * (1.0f + gate * (1.0f - s)) * up;
        d_up = gw * silu;
        return silu * up;
    }
    act_unit_grad(o, gate, up, gw, d_gate, d_up);
    return act_unit(o, gate, up);
}

// Column group gi (V columns) of row r of the one-pass backward: its gate and up gradients
// stored, and `sum` plus their f64(unit * grad) products in column order returned.
template <typename TI, typename TO>
static __device__ __forceinline__ double act_gp_group(const typename TI::S* grad, const typename TI::S* x, i64 r, i64 width, i64 inter, int gi, float p, const ActOpts& o,
                                                      typename TO::S* grad_in, double sum) {
    constexpr int V = 16 / sizeof(typename TI::S);
    const i64 j = (i64)gi * V;
    float gate[V], up[V], g[V], d_gate[V], d_up[V];
    act_pairs<TI, V>(o.kind, x + r * width, inter, j, gate, up);
    load_f32<TI, V>(grad + r * inter + j, g);
#pragma unroll
    for (int u = 0; u < V; u++) sum += (double)(act_unit_and_grad(o, gate[u], up[u], g[u] * p, d_gate[u], d_up[u]) * g[u]);
    store_pairs<TO, V>(o.kind, grad_in + r * width, inter, j, d_gate, d_up);
    return sum;
}

// The vectorised backward with the probs gradient in the same pass (act_bwdgv_fast_*: the grouped
// experts only, which compare to a tolerance): a block per row (grid stride), V columns a thread
// as in act_bwd_vec, and the row's sum of f64(unit * grad) (the products of act_grad_probs) added
// up in a fixed tree: each thread its columns in order, then the warps (shuffles), then thread 0
// the warps' sums in order. Deterministic, but not the core's column order: the f64 sums may
// differ in their last bits, the f32 results almost never. It reads h and the gradient once
// where the separate kernels read them twice.
template <typename TI, typename TO>
static __device__ __forceinline__ void act_bwd_gp_vec(const typename TI::S* grad, const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o,
                                                      typename TO::S* grad_in, float* grad_probs) {
    constexpr int V = 16 / sizeof(typename TI::S);
    __shared__ double warp_sums[32];
    const int groups = (int)(inter / V);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float p = probs[r];
        double sum = 0.0;
        for (int gi = threadIdx.x; gi < groups; gi += blockDim.x) sum = act_gp_group<TI, TO>(grad, x, r, width, inter, gi, p, o, grad_in, sum);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
        if (lane == 0) warp_sums[warp] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0.0;
            for (int w = 0; w < warps; w++) total += warp_sums[w];
            grad_probs[r] = (float)total;
        }
        __syncthreads();
    }
}

// act_bwd_gp_vec with a warp a row (act_bwdgw_fast_bf16_bf16; activations.rs takes it for rows
// of at most GP_WARP_MAX_INTER columns): no block barrier a row. The warp replays the block's tree exactly: the block's
// size is `groups` rounded up to a warp, at most 256 (activations.rs launches act_bwd_gp_vec so);
// lane l of virtual warp w sums the columns thread 32 w + l would, in the same order, the warp's
// shuffles add them as that warp's would, and lane 0 adds the virtual warps' sums in order from
// 0.0: the same bits as the block kernel.
template <typename TI, typename TO>
static __device__ __forceinline__ void act_bwd_gp_warp(const typename TI::S* grad, const typename TI::S* x, i64 rows, i64 width, i64 inter, const float* probs, const ActOpts o,
                                                       typename TO::S* grad_in, float* grad_probs) {
    constexpr int V = 16 / sizeof(typename TI::S);
    const int groups = (int)(inter / V);
    const int block = min((groups + 31) / 32 * 32, 256);
    const int lane = threadIdx.x & 31;
    const i64 first = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5, step = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = first; r < rows; r += step) {
        const float p = probs[r];
        double total = 0.0;
        for (int w = 0; w < block / 32; w++) {
            double sum = 0.0;
            for (int gi = 32 * w + lane; gi < groups; gi += block) sum = act_gp_group<TI, TO>(grad, x, r, width, inter, gi, p, o, grad_in, sum);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
            total += sum;
        }
        if (lane == 0) grad_probs[r] = (float)total;
    }
}

// The probs gradient: per row, sum_j f64(unit * grad[j]) in column order from 0.0. A block owns
// 32 rows and walks them in tiles of GP_COLS columns, double-buffered in shared memory: while its
// GP_PRODUCERS producer warps compute tile t's 32 x GP_COLS products (coalesced loads, lane l on
// columns l, l + 32, ...: 48 loads in flight per lane, then 16 products), warp 0 adds tile t - 1's,
// lane r row r's in column order to its f64 sum (the core's order); one barrier per tile. The
// 32 x 32 tiles it replaces, loaded by 8 warps and summed by one while the others waited at two
// barriers a tile, ran at a third of memory speed (H200: 0.54 ms for 49152 x 1408); warps that
// each owned 32 rows were slower still (too few warps to keep memory busy).
#define GP_ROWS 32
#define GP_COLS 128
#define GP_PRODUCERS 8
template <typename T>
static __device__ __forceinline__ void act_grad_probs(const typename T::S* grad, const typename T::S* x, i64 rows, i64 width, i64 inter, const ActOpts o, float* grad_probs) {
    __shared__ float tiles[2][GP_ROWS][GP_COLS + 1];
    const int lane = threadIdx.x, w = threadIdx.y;
    const i64 ntiles = (inter + GP_COLS - 1) / GP_COLS;
    for (i64 r0 = (i64)blockIdx.x * GP_ROWS; r0 < rows; r0 += (i64)gridDim.x * GP_ROWS) {
        const int nr = (int)min((i64)GP_ROWS, rows - r0);
        double sum = 0.0;
        for (i64 t = 0; t <= ntiles; t++) {
            if (w > 0 && t < ntiles) {
                float (*buf)[GP_COLS + 1] = tiles[t & 1];
                const i64 c0 = t * GP_COLS;
                // the loads of all 16 products first (a global load may not move past a
                // shared store the compiler cannot tell apart from it), then the math and stores
                float gate[GP_ROWS / GP_PRODUCERS][GP_COLS / 32], up[GP_ROWS / GP_PRODUCERS][GP_COLS / 32], g[GP_ROWS / GP_PRODUCERS][GP_COLS / 32];
#pragma unroll
                for (int q = 0; q < GP_ROWS / GP_PRODUCERS; q++) {
                    const int i = w - 1 + q * GP_PRODUCERS;
                    const i64 r = r0 + i;
#pragma unroll
                    for (int h = 0; h < GP_COLS / 32; h++) {
                        const i64 j = c0 + h * 32 + lane;
                        gate[q][h] = 0.0f;
                        up[q][h] = 0.0f;
                        g[q][h] = 0.0f;
                        if (i < nr && j < inter) {
                            act_pair<T>(o.kind, x + r * width, inter, j, gate[q][h], up[q][h]);
                            g[q][h] = T::to_f32(grad[r * inter + j]);
                        }
                    }
                }
#pragma unroll
                for (int q = 0; q < GP_ROWS / GP_PRODUCERS; q++) {
                    const int i = w - 1 + q * GP_PRODUCERS;
#pragma unroll
                    for (int h = 0; h < GP_COLS / 32; h++) {
                        const i64 j = c0 + h * 32 + lane;
                        buf[i][h * 32 + lane] = (i < nr && j < inter) ? act_unit(o, gate[q][h], up[q][h]) * g[q][h] : 0.0f;
                    }
                }
            }
            if (w == 0 && t > 0 && lane < nr) {
                const float (*buf)[GP_COLS + 1] = tiles[(t - 1) & 1];
                const int n = (int)min((i64)GP_COLS, inter - (t - 1) * GP_COLS);
                for (int c = 0; c < n; c++) sum += (double)buf[lane][c];
            }
            __syncthreads();
        }
        if (w == 0 && lane < nr) grad_probs[r0 + lane] = (float)sum;
    }
}

#define ACT_FWD_PARAMS \
    const void *x, i64 rows, i64 width, i64 inter, const float *probs, int kind, double alpha, double limit, double linear_offset, void *out
#define ACT_FWD_BODY(TI, TO, FAST) \
    act_fwd<TI, TO>((const TI::S*)x, rows, width, inter, probs, act_opts(kind, alpha, limit, linear_offset, FAST), (TO::S*)out)

extern "C" __global__ void act_fwd_f32_f32(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, F32, false); }
extern "C" __global__ void act_fwd_bf16_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(BF16, BF16, false); }
extern "C" __global__ void act_fwd_f16_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F16, F16, false); }
extern "C" __global__ void act_fwd_f32_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, BF16, false); }
extern "C" __global__ void act_fwd_f32_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, F16, false); }
extern "C" __global__ void act_fwd_fast_f32_f32(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, F32, true); }
extern "C" __global__ void act_fwd_fast_bf16_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(BF16, BF16, true); }
extern "C" __global__ void act_fwd_fast_f16_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F16, F16, true); }
extern "C" __global__ void act_fwd_fast_f32_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, BF16, true); }
extern "C" __global__ void act_fwd_fast_f32_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWD_BODY(F32, F16, true); }

// The experts' fast bf16 passes (act_fwdv_fast_bf16_bf16, act_bwdv_fast_bf16_bf16,
// act_bwdgv_fast_bf16_bf16) can run one loop per activation kind: in each, `ko.kind` is a
// compile-time constant, so act_pairs, act_unit and act_unit_grad fold their switches over the
// kinds and the loop is straight-line code (the generic loop branches over the kinds per
// element). The same operations, so the same bits. A kind with the ACT_GENERIC flag runs the
// generic loop with the kind as a run-time value, as before the split: the host passes it with
// MOE_DISPATCH_ACT_BY_KIND=off (for comparisons). The other vectorised kernels only clear the
// flag (each split kernel's six loops cost compile time and machine code: splitting all 30
// doubled this file's NVRTC time, 12 -> 24 s).
#define ACT_GENERIC 16
template <int KIND>
static __device__ __forceinline__ ActOpts act_kind(ActOpts o) {
    o.kind = KIND;
    return o;
}
static __device__ __forceinline__ ActOpts act_generic(ActOpts o) {
    o.kind &= ~ACT_GENERIC;
    return o;
}
#define ACT_KIND_CASE(K, o, ko, ...)             \
    case K: {                                    \
        const ActOpts ko = act_kind<K>(o);       \
        __VA_ARGS__;                             \
        break;                                   \
    }
#define ACT_BY_KIND(o, ko, ...)                                  \
    switch ((o).kind) {                                          \
        ACT_KIND_CASE(ACT_SWIGLU, o, ko, __VA_ARGS__)            \
        ACT_KIND_CASE(ACT_QUICK_GEGLU, o, ko, __VA_ARGS__)       \
        ACT_KIND_CASE(ACT_SWIGLU_OAI, o, ko, __VA_ARGS__)        \
        ACT_KIND_CASE(ACT_SWIGLU_CLAMPED, o, ko, __VA_ARGS__)    \
        ACT_KIND_CASE(ACT_RELU2, o, ko, __VA_ARGS__)             \
        default: {                                               \
            const ActOpts ko = act_generic(o);                   \
            __VA_ARGS__;                                         \
        }                                                        \
    }
// The kernels without the split take the generic loop, the flag cleared.
#define ACT_GENERIC_ONLY(o, ko, ...)       \
    {                                      \
        const ActOpts ko = act_generic(o); \
        __VA_ARGS__;                       \
    }

#define ACT_FWDV_BODY(TI, TO, FAST, MODE)                                                                                 \
    {                                                                                                               \
        const ActOpts o = act_opts(kind, alpha, limit, linear_offset, FAST);                                        \
        MODE(o, ko, act_fwd_vec<TI, TO>((const TI::S*)x, rows, width, inter, probs, ko, (TO::S*)out))        \
    }

extern "C" __global__ void act_fwdv_f32_f32(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, F32, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_bf16_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(BF16, BF16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_f16_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F16, F16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_f32_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, BF16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_f32_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, F16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_fast_f32_f32(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, F32, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_fast_bf16_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(BF16, BF16, true, ACT_BY_KIND); }
extern "C" __global__ void act_fwdv_fast_f16_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F16, F16, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_fast_f32_bf16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, BF16, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_fwdv_fast_f32_f16(ACT_FWD_PARAMS) { MOE_PDL_ENTRY(); ACT_FWDV_BODY(F32, F16, true, ACT_GENERIC_ONLY); }

#define ACT_BWD_PARAMS \
    const void *grad, const void *x, i64 rows, i64 width, i64 inter, const float *probs, int kind, double alpha, double limit, double linear_offset, void *grad_in
#define ACT_BWD_BODY(TI, TO, FAST) \
    act_bwd<TI, TO>((const TI::S*)grad, (const TI::S*)x, rows, width, inter, probs, act_opts(kind, alpha, limit, linear_offset, FAST), (TO::S*)grad_in)

extern "C" __global__ void act_bwd_f32_f32(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, F32, false); }
extern "C" __global__ void act_bwd_bf16_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(BF16, BF16, false); }
extern "C" __global__ void act_bwd_f16_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F16, F16, false); }
extern "C" __global__ void act_bwd_f32_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, BF16, false); }
extern "C" __global__ void act_bwd_f32_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, F16, false); }
extern "C" __global__ void act_bwd_fast_f32_f32(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, F32, true); }
extern "C" __global__ void act_bwd_fast_bf16_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(BF16, BF16, true); }
extern "C" __global__ void act_bwd_fast_f16_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F16, F16, true); }
extern "C" __global__ void act_bwd_fast_f32_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, BF16, true); }
extern "C" __global__ void act_bwd_fast_f32_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWD_BODY(F32, F16, true); }

#define ACT_BWDV_BODY(TI, TO, FAST, MODE)                                                                                          \
    {                                                                                                                        \
        const ActOpts o = act_opts(kind, alpha, limit, linear_offset, FAST);                                                 \
        MODE(o, ko, act_bwd_vec<TI, TO>((const TI::S*)grad, (const TI::S*)x, rows, width, inter, probs, ko, (TO::S*)grad_in)) \
    }

extern "C" __global__ void act_bwdv_f32_f32(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, F32, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_bf16_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(BF16, BF16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_f16_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F16, F16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_f32_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, BF16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_f32_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, F16, false, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_fast_f32_f32(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, F32, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_fast_bf16_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(BF16, BF16, true, ACT_BY_KIND); }
extern "C" __global__ void act_bwdv_fast_f16_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F16, F16, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_fast_f32_bf16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, BF16, true, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdv_fast_f32_f16(ACT_BWD_PARAMS) { MOE_PDL_ENTRY(); ACT_BWDV_BODY(F32, F16, true, ACT_GENERIC_ONLY); }

// The one-pass backward's bodies: FN is act_bwd_gp_vec (a block a row) or act_bwd_gp_warp.
#define ACT_BWDG_BODY(FN, TI, TO, MODE)                                                                                          \
    {                                                                                                                      \
        const ActOpts o = act_opts(kind, alpha, limit, linear_offset, true);                                               \
        MODE(o, ko, FN<TI, TO>((const TI::S*)grad, (const TI::S*)x, rows, width, inter, probs, ko, (TO::S*)grad_in, grad_probs)) \
    }
#define ACT_BWDGV_BODY(TI, TO, MODE) ACT_BWDG_BODY(act_bwd_gp_vec, TI, TO, MODE)

extern "C" __global__ void act_bwdgv_fast_f32_f32(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDGV_BODY(F32, F32, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdgv_fast_bf16_bf16(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDGV_BODY(BF16, BF16, ACT_BY_KIND); }
extern "C" __global__ void act_bwdgv_fast_f16_f16(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDGV_BODY(F16, F16, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdgv_fast_f32_bf16(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDGV_BODY(F32, BF16, ACT_GENERIC_ONLY); }
extern "C" __global__ void act_bwdgv_fast_f32_f16(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDGV_BODY(F32, F16, ACT_GENERIC_ONLY); }

extern "C" __global__ void act_bwdgw_fast_bf16_bf16(ACT_BWD_PARAMS, float *grad_probs) { MOE_PDL_ENTRY(); ACT_BWDG_BODY(act_bwd_gp_warp, BF16, BF16, ACT_BY_KIND); }

#define ACT_GPROBS_PARAMS \
    const void *grad, const void *x, i64 rows, i64 width, i64 inter, int kind, double alpha, double limit, double linear_offset, float *grad_probs
#define ACT_GPROBS_BODY(T, FAST) \
    act_grad_probs<T>((const T::S*)grad, (const T::S*)x, rows, width, inter, act_opts(kind, alpha, limit, linear_offset, FAST), grad_probs)

extern "C" __global__ void act_grad_probs_f32(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(F32, false); }
extern "C" __global__ void act_grad_probs_bf16(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(BF16, false); }
extern "C" __global__ void act_grad_probs_f16(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(F16, false); }
extern "C" __global__ void act_grad_probs_fast_f32(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(F32, true); }
extern "C" __global__ void act_grad_probs_fast_bf16(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(BF16, true); }
extern "C" __global__ void act_grad_probs_fast_f16(ACT_GPROBS_PARAMS) { MOE_PDL_ENTRY(); ACT_GPROBS_BODY(F16, true); }

// ---------------------------------------------------------------------------------------
// Aux losses (moe_core::aux_loss).
//
// `result` (4 u64 words, set by the host to 0 before the first kernel): [0] the loss (f64 bits),
// [1] the scalar the gradient needs (the Switch factor, or z-loss's N, as f64 bits), [2] flags:
// bit 0 a non-finite input value, bit 1 a mask byte above 1, bit 2 a negative count.

#define LOSS_BAD_VALUE 1ull
#define LOSS_BAD_MASK 2ull
#define LOSS_BAD_COUNT 4ull

#define LOSS_SWITCH 0
#define LOSS_Z 1

static __device__ __forceinline__ bool loss_valid(const u8* mask, i64 t) { return mask == 0 || mask[t] != 0; }

static __device__ __forceinline__ bool finite_f32(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

// The totals below run in one block of LOSS_TOTAL_THREADS threads (the launch in activations.rs).
#define LOSS_TOTAL_THREADS 256
#define LOSS_TOTAL_CHUNK 4096  // (a multiple of LOSS_TOTAL_BLOCK; at most LOSS_TOTAL_THREADS blocks)

// The block's count of the valid rows, and its check of the mask bytes (the core's `row_mask`)
// and of the counts (none negative): integer reductions, any order gives the same result.
static __device__ u64 loss_check_block(const u8* mask, i64 rows, const int* counts, i64 cols, unsigned long long* flags) {
    __shared__ unsigned long long s_valid, s_flags;
    if (threadIdx.x == 0) {
        s_valid = 0;
        s_flags = 0;
    }
    __syncthreads();
    u64 n = 0;
    unsigned long long f = 0;
    for (i64 t = threadIdx.x; t < rows; t += blockDim.x) {
        if (mask == 0) {
            n++;
        } else {
            n += mask[t] != 0;
            if (mask[t] > 1) f |= LOSS_BAD_MASK;
        }
    }
    if (counts != 0)
        for (i64 e = threadIdx.x; e < cols; e += blockDim.x)
            if (counts[e] < 0) f |= LOSS_BAD_COUNT;
    // one shared atomic a warp, not one a thread on the same word
    for (int o = 16; o > 0; o >>= 1) {
        n += __shfl_xor_sync(0xffffffffu, n, o);
        f |= __shfl_xor_sync(0xffffffffu, f, o);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(&s_valid, (unsigned long long)n);
        if (f) atomicOr(&s_flags, f);
    }
    __syncthreads();
    *flags |= s_flags;
    return s_valid;
}

// The loss's total as the core adds it (moe-core `aux_loss::blocked_total`): value(t) for the
// rows in blocks of LOSS_TOTAL_BLOCK consecutive rows (the core's TOTAL_BLOCK), each block's sum
// from `init` in row order, the blocks' sums added to `init` in block order, each addition
// rounded in f64. A row that value() leaves out gives -0.0 (x + -0.0 == x for every x, the sign
// of a zero included). The block stages a chunk of rows in shared memory; thread b adds block b
// of it, then thread 0 adds the chunk's block sums to the total. (Before the blocks, one chain of
// 8192 dependent additions in token order: 0.058-0.068 ms of a fine-grained step on an H100.)
#define LOSS_TOTAL_BLOCK 64
// A chunk's row i sits at chunk[(i / LOSS_TOTAL_BLOCK) * LOSS_TOTAL_PITCH + i % LOSS_TOTAL_BLOCK]:
// a block's rows in a run, the runs one double apart, so that the threads adding the blocks read
// different banks (with a pitch of 64 every thread of a warp read the same bank).
#define LOSS_TOTAL_PITCH (LOSS_TOTAL_BLOCK + 1)
template <class Value>
static __device__ double loss_ordered_total(i64 rows, double init, Value value) {
    __shared__ double chunk[(LOSS_TOTAL_CHUNK / LOSS_TOTAL_BLOCK) * LOSS_TOTAL_PITCH];
    __shared__ double sums[LOSS_TOTAL_CHUNK / LOSS_TOTAL_BLOCK];
    double total = init;
    for (i64 c0 = 0; c0 < rows; c0 += LOSS_TOTAL_CHUNK) {
        const int n = (int)min((i64)LOSS_TOTAL_CHUNK, rows - c0);
#pragma unroll 8
        for (int i = threadIdx.x; i < n; i += LOSS_TOTAL_THREADS) chunk[(i / LOSS_TOTAL_BLOCK) * LOSS_TOTAL_PITCH + i % LOSS_TOTAL_BLOCK] = value(c0 + i);
        __syncthreads();
        const int blocks = (n + LOSS_TOTAL_BLOCK - 1) / LOSS_TOTAL_BLOCK;
        if ((int)threadIdx.x < blocks) {
            const double* run = chunk + threadIdx.x * LOSS_TOTAL_PITCH;
            const int len = min(LOSS_TOTAL_BLOCK, n - (int)threadIdx.x * LOSS_TOTAL_BLOCK);
            double sum = init;
            if (len == LOSS_TOTAL_BLOCK) {
#pragma unroll 16
                for (int i = 0; i < LOSS_TOTAL_BLOCK; i++) sum = __dadd_rn(sum, run[i]);
            } else {
                for (int i = 0; i < len; i++) sum = __dadd_rn(sum, run[i]);
            }
            sums[threadIdx.x] = sum;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
#pragma unroll 8
            for (int b = 0; b < blocks; b++) total = __dadd_rn(total, sums[b]);
        }
        __syncthreads();
    }
    return total;
}

// The Switch factor `E * coeff / (k * N * N)` (the core's `switch_factor`); num_tokens < 0: none.
static __device__ double loss_switch_factor(i64 cols, double coeff, double topk, double num_tokens, u64 valid_rows) {
    const double n = num_tokens >= 0.0 ? num_tokens : (double)(valid_rows > 0 ? valid_rows : 1);
    return (double)cols * coeff / (topk * n * n);
}

// The loss kernels' rows go one a warp: the lanes load a row's columns side by side (lane e % 32
// holds column e) and form their terms, and every lane adds the row's terms in column order (the
// same values in the same order: each lane holds the same sum), taking each from its lane by a
// shuffle. (One thread a row left 256 warps for 8192 rows, each loading its row alone: 0.017 ms
// for the Switch loss's rows at T = 8192, E = 64 on an H100, ncu.)
#define LOSS_WARP_ROWS(t, rows)                                                                              \
    for (i64 t = (((i64)blockIdx.x * blockDim.x) >> 5) + (threadIdx.x >> 5), step_ = ((i64)gridDim.x * blockDim.x) >> 5; \
         t < rows; t += step_)

// `sum` plus the 32 lanes' `term`s of the columns e0 .. e0 + n - 1 in column order (every lane).
static __device__ __forceinline__ double loss_add_in_order(double sum, double term, int n) {
    for (int j = 0; j < n; j++) sum += __shfl_sync(0xffffffffu, term, j);
    return sum;
}

// Switch loss on probs, per row: the finiteness check of the whole row, and for valid rows
// sum_e probs[t, e] * counts[e] in column order (Rust's sum: from -0.0).
extern "C" __global__ void loss_switch_rows(const float* probs, const int* counts, const u8* mask, i64 rows, i64 cols, double* partial, unsigned long long* result) { MOE_PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    LOSS_WARP_ROWS(t, rows) {
        const float* row = probs + t * cols;
        bool bad = false;
        double s = -0.0;
        for (i64 e0 = 0; e0 < cols; e0 += 32) {
            const i64 e = e0 + lane;
            double term = 0.0;
            if (e < cols) {
                const float v = row[e];
                bad |= !finite_f32(v);
                term = (double)v * (double)counts[e];
            }
            s = loss_add_in_order(s, term, (int)min((i64)32, cols - e0));
        }
        if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(&result[2], LOSS_BAD_VALUE);
        if (lane == 0) partial[t] = s;
    }
}

// Switch loss on probs, the total (one block): total over valid rows in token order from 0.0,
// the factor, the loss.
extern "C" __global__ void __launch_bounds__(LOSS_TOTAL_THREADS) loss_switch_total(const double* partial, const int* counts, const u8* mask, i64 rows, i64 cols, double topk, double coeff, double num_tokens, unsigned long long* result) { MOE_PDL_ENTRY();
    unsigned long long flags = 0;
    const u64 valid_rows = loss_check_block(mask, rows, counts, cols, &flags);
    const double factor = loss_switch_factor(cols, coeff, topk, num_tokens, valid_rows);
    const double total = loss_ordered_total(rows, 0.0, [&](i64 t) { return loss_valid(mask, t) ? partial[t] : -0.0; });
    if (threadIdx.x != 0) return;
    result[0] = (unsigned long long)__double_as_longlong(total * factor);
    result[1] = (unsigned long long)__double_as_longlong(factor);
    if (flags) atomicOr(&result[2], flags);
}

// Switch loss on probs, the gradient: counts[e] * factor rounded to f32 in valid rows, 0 elsewhere
// (a warp a row, the lanes along its columns).
extern "C" __global__ void loss_switch_grad(const int* counts, const u8* mask, i64 rows, i64 cols, const unsigned long long* result, float* grad) { MOE_PDL_ENTRY();
    const double factor = __longlong_as_double((long long)result[1]);
    const int lane = threadIdx.x & 31;
    LOSS_WARP_ROWS(t, rows) {
        const bool valid = loss_valid(mask, t);
        for (i64 e = lane; e < cols; e += 32) grad[t * cols + e] = valid ? (float)((double)counts[e] * factor) : 0.0f;
    }
}

// Losses on logits, per row: the finiteness check of the whole row, and for valid rows the
// softmax statistics (the core's `row_stats`): stats[3t] = max, [3t + 1] = sum of exp(x - max)
// (from 0.0), [3t + 2] = the row's value: weighted / sum for the Switch loss (weighted = sum of
// exp(x - max) * counts[e], from 0.0), max + ln(sum) (the logsumexp) for the z-loss.
extern "C" __global__ void loss_logits_rows(const float* logits, const int* counts, const u8* mask, i64 rows, i64 cols, int mode, double* stats, unsigned long long* result) { MOE_PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    LOSS_WARP_ROWS(t, rows) {
        const float* row = logits + t * cols;
        bool bad = false;
        float m = -__int_as_float(0x7f800000);
        for (i64 e = lane; e < cols; e += 32) {
            const float v = row[e];
            bad |= !finite_f32(v);
            m = fmaxf(m, v);  // finite values (else the row is skipped): any order
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        bad = __any_sync(0xffffffffu, bad);
        if (bad && lane == 0) atomicOr(&result[2], LOSS_BAD_VALUE);
        if (bad || !loss_valid(mask, t)) continue;
        const double max = (double)m;
        double sum = 0.0, weighted = 0.0;
        for (i64 e0 = 0; e0 < cols; e0 += 32) {
            const i64 e = e0 + lane;
            const double p = e < cols ? det_exp((double)row[e] - max) : 0.0;
            const int n = (int)min((i64)32, cols - e0);
            sum = loss_add_in_order(sum, p, n);
            if (mode == LOSS_SWITCH) weighted = loss_add_in_order(weighted, e < cols ? p * (double)counts[e] : 0.0, n);
        }
        if (lane != 0) continue;
        stats[3 * t] = max;
        stats[3 * t + 1] = sum;
        stats[3 * t + 2] = mode == LOSS_SWITCH ? weighted / sum : max + det_ln(sum);
    }
}

// Losses on logits, the total (one block), in token order from -0.0 (Rust's sum):
// Switch: total = sum of weighted / sum, loss = total * factor, result[1] = factor;
// z: total = sum of lse^2, loss = coeff * total / N, result[1] = N.
extern "C" __global__ void __launch_bounds__(LOSS_TOTAL_THREADS) loss_logits_total(const double* stats, const int* counts, const u8* mask, i64 rows, i64 cols, int mode, double topk, double coeff, double num_tokens, unsigned long long* result) { MOE_PDL_ENTRY();
    unsigned long long flags = 0;
    const u64 valid_rows = loss_check_block(mask, rows, mode == LOSS_SWITCH ? counts : 0, cols, &flags);
    // A row with a non-finite value has no stats: the host runs the core, which reports it.
    const bool bad_values = (result[2] & LOSS_BAD_VALUE) != 0;
    const double total = bad_values ? -0.0 : loss_ordered_total(rows, -0.0, [&](i64 t) {
        if (!loss_valid(mask, t)) return -0.0;
        const double v = stats[3 * t + 2];
        return mode == LOSS_SWITCH ? v : __dmul_rn(v, v);
    });
    if (threadIdx.x != 0) return;
    double loss, scalar;
    if (mode == LOSS_SWITCH) {
        scalar = loss_switch_factor(cols, coeff, topk, num_tokens, valid_rows);
        loss = total * scalar;
    } else {
        scalar = (double)(valid_rows > 0 ? valid_rows : 1);
        loss = coeff * total / scalar;
    }
    result[0] = (unsigned long long)__double_as_longlong(loss);
    result[1] = (unsigned long long)__double_as_longlong(scalar);
    if (flags) atomicOr(&result[2], flags);
}

// Losses on logits, the gradient per element (0 in masked rows):
// Switch: p * (counts[e] * factor - value * factor) with p = exp(x - max) / sum;
// z: (2 * coeff / N * lse / sum) * exp(x - max).
extern "C" __global__ void loss_logits_grad(const float* logits, const int* counts, const u8* mask, i64 rows, i64 cols, int mode, double coeff, const double* stats,
                                            const unsigned long long* result, float* grad) { MOE_PDL_ENTRY();
    const double scalar = __longlong_as_double((long long)result[1]);
    const bool bad_values = (result[2] & LOSS_BAD_VALUE) != 0;
    const int lane = threadIdx.x & 31;
    // a warp a row, the lanes along its columns
    LOSS_WARP_ROWS(t, rows) {
        float* out = grad + t * cols;
        if (bad_values || !loss_valid(mask, t)) {
            for (i64 e = lane; e < cols; e += 32) out[e] = 0.0f;
            continue;
        }
        const double max = stats[3 * t];
        const double sum = stats[3 * t + 1];
        const double value = stats[3 * t + 2];
        for (i64 e = lane; e < cols; e += 32) {
            const double ex = det_exp((double)logits[t * cols + e] - max);
            if (mode == LOSS_SWITCH) {
                const double mean_g = value * scalar;
                const double p = ex / sum;
                out[e] = (float)(p * ((double)counts[e] * scalar - mean_g));
            } else {
                const double scale = 2.0 * coeff / scalar * value / sum;
                out[e] = (float)(scale * ex);
            }
        }
    }
}
