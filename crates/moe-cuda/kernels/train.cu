// The optimizer on the GPU (crates/moe-cuda/src/train.rs): AdamW with global gradient-norm
// clipping, the arithmetic and order of ts/optim.ts (the reference every backend runs), so the
// weights agree bit for bit with the cpu and wasm backends'.
//
// * sum_squares_<T>:   partials[c] = the sum of g^2 over chunk c (SQ_CHUNK = 65536 elements) of
//                      a gradient, in f64 (each square exact), in a fixed order: thread i sums,
//                      for j = 0 .. 31, the 8 consecutive elements from (j * 256 + i) * 8 of the
//                      chunk in turn (one 16-byte load for 16-bit gradients), then a halving tree
//                      over the 256 threads (sh[i] += sh[i + s], s = 128 .. 1).
// * adamw_finish:      one block of 1024 threads: the same two-level sum over every partial
//                      (thread i: partials i, i + 1024, ... in turn, then the halving tree),
//                      the norm, and the step's scalars in f64 (state, below); no host wait.
// * adamw_update_<G>_<L>: one element a thread: the f32 AdamW update of a float32 master
//                      weight with its two moments, from a gradient of G; with a low-precision
//                      copy of L, that copy rounded from the new master weight. `decay_on` 0:
//                      no weight decay for this tensor (decay 1).
//
// The state (8 f64 words, then 16 f32 words; train.rs writes the first at creation):
//   f64: [0] step, [1] beta1^step, [2] beta2^step, [3] skipped steps, [4] last gradient norm,
//        [5] whether the last step was applied (1/0)
//   f32: [0] clip factor, [1] decay (1 - lr wd), [2] beta1, [3] 1 - beta1, [4] beta2,
//        [5] 1 - beta2, [6] step size (lr / (1 - beta1^step)), [7] sqrt(1 - beta2^step), [8] eps,
//        [9] apply (1 or 0)

#define SQ_THREADS 256
#define SQ_VEC 8
#define SQ_ITERS 32
#define SQ_CHUNK (SQ_THREADS * SQ_VEC * SQ_ITERS)
#define FIN_THREADS 1024

// The fixed order of every chunk sum here: each of the block's LANES threads passes its own sum
// (its elements in turn), then a halving tree (sh[i] += sh[i + s], s = LANES / 2 .. 1); thread 0
// gets the total. ts/optim.ts's laneTreeSum is the host's copy of this order.
template <int LANES>
__device__ __forceinline__ double lane_tree_sum(double acc) {
    __shared__ double sh[LANES];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = LANES / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

// Thread i's part of chunk blockIdx.x: for j = 0 .. SQ_ITERS - 1, f of the SQ_VEC consecutive
// elements from base + (j * SQ_THREADS + i) * SQ_VEC in turn, those below n.
template <typename F>
__device__ __forceinline__ double chunk_lane_sum(long long n, F f) {
    const long long base = (long long)blockIdx.x * SQ_CHUNK;
    double acc = 0.0;
    for (int j = 0; j < SQ_ITERS; j++) {
        const long long i0 = base + ((long long)j * SQ_THREADS + threadIdx.x) * SQ_VEC;
        for (int q = 0; q < SQ_VEC; q++)
            if (i0 + q < n) acc += f(i0 + q);
    }
    return acc;
}

// Eight consecutive elements as float32, from one (16-bit) or two (float32) 16-byte loads.
template <typename T> struct Oct;
template <> struct Oct<F32> {
    static __device__ __forceinline__ void load(const float* p, float* x) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    }
};
template <typename H> struct OctHalf {
    static __device__ __forceinline__ void load(const u16* p, float* x) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; q++) x[2 * q] = H::to_f32((u16)(w[q] & 0xffffu)), x[2 * q + 1] = H::to_f32((u16)(w[q] >> 16));
    }
};
template <> struct Oct<BF16> : OctHalf<BF16> {};
template <> struct Oct<F16> : OctHalf<F16> {};

// chunk_lane_sum's order over g^2, eight elements a load where `vec` (g 16-byte aligned) and all
// eight are below n; the same sums either way (an absent element adds nothing).
template <typename T>
__device__ __forceinline__ void sum_squares_impl(const typename T::S* __restrict__ g, long long n, double* __restrict__ partials, int vec) {
    const long long base = (long long)blockIdx.x * SQ_CHUNK;
    double acc = 0.0;
#pragma unroll 4
    for (int j = 0; j < SQ_ITERS; j++) {
        const long long i0 = base + ((long long)j * SQ_THREADS + threadIdx.x) * SQ_VEC;
        float x[SQ_VEC];
        if (vec && i0 + SQ_VEC <= n) {
            Oct<T>::load(g + i0, x);
        } else {
#pragma unroll
            for (int q = 0; q < SQ_VEC; q++) x[q] = i0 + q < n ? T::to_f32(g[i0 + q]) : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < SQ_VEC; q++)
            if (i0 + q < n) acc += (double)x[q] * (double)x[q];
    }
    const double total = lane_tree_sum<SQ_THREADS>(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

#define SUM_SQUARES(T)                                                                                                       \
    extern "C" __global__ void sum_squares_##T(const T::S* g, long long n, double* partials, int vec) { MOE_PDL_ENTRY(); sum_squares_impl<T>(g, n, partials, vec); }
SUM_SQUARES(F32)
SUM_SQUARES(BF16)
SUM_SQUARES(F16)

// Thread i's part of the second level: partials i, i + 1024, ... in turn.
__device__ __forceinline__ double partials_lane_sum(const double* __restrict__ partials, long long n) {
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += FIN_THREADS) acc += partials[i];
    return acc;
}

extern "C" __global__ void adamw_finish(const double* __restrict__ partials, long long n, double* __restrict__ state, double lr,
                                        double beta1, double beta2, double eps, double weight_decay, double max_norm) { MOE_PDL_ENTRY();
    const double total = lane_tree_sum<FIN_THREADS>(partials_lane_sum(partials, n));
    if (threadIdx.x != 0) return;
    const double norm = sqrt(total);
    float* f = reinterpret_cast<float*>(state + 8);
    state[4] = norm;
    if (!isfinite(norm)) {
        state[3] += 1.0;
        state[5] = 0.0;
        f[9] = 0.0f;
        return;
    }
    const double step = state[0] + 1.0, b1p = state[1] * beta1, b2p = state[2] * beta2;
    state[0] = step;
    state[1] = b1p;
    state[2] = b2p;
    state[5] = 1.0;
    double clip = 1.0;
    if (max_norm >= 0.0) {
        const double c = max_norm / (norm + 1e-6);
        clip = c < 1.0 ? c : 1.0;
    }
    f[0] = (float)clip;
    f[1] = (float)(1.0 - lr * weight_decay);
    f[2] = (float)beta1;
    f[3] = (float)(1.0 - beta1);
    f[4] = (float)beta2;
    f[5] = (float)(1.0 - beta2);
    f[6] = (float)(lr / (1.0 - b1p));
    f[7] = (float)sqrt(1.0 - b2p);
    f[8] = (float)eps;
    f[9] = 1.0f;
}

// One element's update (the same arithmetic for the scalar and the vector loops).
struct AdamWScalars {
    float clip, decay, b1, omb1, b2, omb2, step_size, bc2, eps;
    __device__ __forceinline__ float update(float& p, float& m, float& v, float grad) const {
        const float g = grad * clip;
        m = b1 * m + omb1 * g;
        v = b2 * v + omb2 * (g * g);
        const float denom = sqrtf(v) / bc2 + eps;
        p = p * decay - step_size * (m / denom);
        return p;
    }
};

// Four consecutive elements of a 16-bit or float32 tensor as one load / store.
template <typename T> struct Quad;
template <> struct Quad<F32> {
    typedef float4 V;
    static __device__ __forceinline__ void get(const V& v, float* out) { out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w; }
    static __device__ __forceinline__ V make(const float* x) { return make_float4(x[0], x[1], x[2], x[3]); }
};
template <typename H> struct QuadHalf {
    typedef uint2 V;
    static __device__ __forceinline__ void get(const V& v, float* out) {
        out[0] = H::to_f32((u16)(v.x & 0xffffu)), out[1] = H::to_f32((u16)(v.x >> 16));
        out[2] = H::to_f32((u16)(v.y & 0xffffu)), out[3] = H::to_f32((u16)(v.y >> 16));
    }
    static __device__ __forceinline__ V make(const float* x) {
        return make_uint2((u32)H::from_f32(x[0]) | ((u32)H::from_f32(x[1]) << 16), (u32)H::from_f32(x[2]) | ((u32)H::from_f32(x[3]) << 16));
    }
};
template <> struct Quad<BF16> : QuadHalf<BF16> {};
template <> struct Quad<F16> : QuadHalf<F16> {};

// `vec4`: the host saw every pointer 16-byte aligned (8 for 16-bit) and n a multiple of 4; the
// elements then go four at a time (the same per-element arithmetic: the same bits).
template <typename G, typename L>
__device__ __forceinline__ void adamw_update_impl(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                                  const typename G::S* __restrict__ grad, typename L::S* __restrict__ low, long long n,
                                                  const double* __restrict__ state, int decay_on, int vec4) {
    const float* f = reinterpret_cast<const float*>(state + 8);
    if (f[9] == 0.0f) return;
    const AdamWScalars a{f[0], decay_on ? f[1] : 1.0f, f[2], f[3], f[4], f[5], f[6], f[7], f[8]};
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (vec4) {
        float4* p4 = reinterpret_cast<float4*>(p);
        float4* m4 = reinterpret_cast<float4*>(m);
        float4* v4 = reinterpret_cast<float4*>(v);
        const typename Quad<G>::V* g4 = reinterpret_cast<const typename Quad<G>::V*>(grad);
        typename Quad<L>::V* l4 = reinterpret_cast<typename Quad<L>::V*>(low);
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n / 4; i += stride) {
            float pp[4], mm[4], vv[4], gg[4];
            Quad<F32>::get(p4[i], pp);
            Quad<F32>::get(m4[i], mm);
            Quad<F32>::get(v4[i], vv);
            Quad<G>::get(g4[i], gg);
#pragma unroll
            for (int j = 0; j < 4; j++) a.update(pp[j], mm[j], vv[j], gg[j]);
            p4[i] = Quad<F32>::make(pp);
            m4[i] = Quad<F32>::make(mm);
            v4[i] = Quad<F32>::make(vv);
            if (low) l4[i] = Quad<L>::make(pp);
        }
        return;
    }
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        a.update(pi, mi, vi, G::to_f32(grad[i]));
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (low) low[i] = L::from_f32(pi);
    }
}

#define ADAMW_UPDATE(G, L)                                                                                                    \
    extern "C" __global__ void adamw_update_##G##_##L(float* p, float* m, float* v, const G::S* grad, L::S* low, long long n, \
                                                      const double* state, int decay_on, int vec4) { MOE_PDL_ENTRY();                          \
        adamw_update_impl<G, L>(p, m, v, grad, low, n, state, decay_on, vec4);                                                              \
    }
ADAMW_UPDATE(F32, F32)
ADAMW_UPDATE(BF16, F32)
ADAMW_UPDATE(F16, F32)
ADAMW_UPDATE(F32, BF16)
ADAMW_UPDATE(BF16, BF16)
ADAMW_UPDATE(F16, BF16)
ADAMW_UPDATE(F32, F16)
ADAMW_UPDATE(BF16, F16)
ADAMW_UPDATE(F16, F16)

// widen_<T>: out[i] = f32(x[i]) (exact): a master weight's start from a 16-bit weight.
template <typename T>
__device__ __forceinline__ void widen_impl(const typename T::S* __restrict__ x, float* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) out[i] = T::to_f32(x[i]);
}
extern "C" __global__ void widen_BF16(const u16* x, float* out, long long n) { MOE_PDL_ENTRY(); widen_impl<BF16>(x, out, n); }
extern "C" __global__ void widen_F16(const u16* x, float* out, long long n) { MOE_PDL_ENTRY(); widen_impl<F16>(x, out, n); }

// narrow_<T>: out[i] = T(x[i]) (rounded once, as the core rounds).
template <typename T>
__device__ __forceinline__ void narrow_impl(const float* __restrict__ x, typename T::S* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) out[i] = T::from_f32(x[i]);
}
extern "C" __global__ void narrow_BF16(const float* x, u16* out, long long n) { MOE_PDL_ENTRY(); narrow_impl<BF16>(x, out, n); }
extern "C" __global__ void narrow_F16(const float* x, u16* out, long long n) { MOE_PDL_ENTRY(); narrow_impl<F16>(x, out, n); }

// gather_picks: out[t, j] = dense[t, idx[t, j]] (0 where idx is -1): the gradient of route's
// weights [T, k] from the dense [T, E] one that permute's backward gives.
extern "C" __global__ void gather_picks(const float* __restrict__ dense, const int* __restrict__ idx, long long rows, int E, int k,
                                        float* __restrict__ out) { MOE_PDL_ENTRY();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * k) return;
    const int e = idx[i];
    out[i] = e < 0 ? 0.0f : dense[(i / k) * E + e];
}

// ---------------------------------------------------------------------------------------
// The element steps MoELayer composes around the ops (ts/numeric.ts on the host, the same bits):
//
// * logits_epilogue_<B>_<R>: out[i, j] = f32(raw[i, j] + f32(bias[j])) (bias of B, optional),
//                       then, for a 16-bit router dtype R, rounded to R and widened back.
// * add3_<A>_<B>_<C>_<O>: out[i] = O(f32((f64(a[i]) + f64(b[i])) + f64(c[i]))) (c optional).
// * column_sums_<O>:    out[j] = O(f32(sum over the rows i, in order, of f64(g[i, j]))) (g f32).

template <typename B, typename R>
__device__ __forceinline__ void logits_epilogue_impl(const float* __restrict__ raw, const typename B::S* __restrict__ bias, long long rows,
                                                     int cols, float* __restrict__ out) {
    const long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = raw[i];
        if (bias) v = v + B::to_f32(bias[i % cols]);
        out[i] = R::to_f32(R::from_f32(v));
    }
}
#define LOGITS_EPILOGUE(B, R)                                                                                                 \
    extern "C" __global__ void logits_epilogue_##B##_##R(const float* raw, const B::S* bias, long long rows, int cols, float* out) { MOE_PDL_ENTRY(); \
        logits_epilogue_impl<B, R>(raw, bias, rows, cols, out);                                                                 \
    }
LOGITS_EPILOGUE(F32, F32)
LOGITS_EPILOGUE(F32, BF16)
LOGITS_EPILOGUE(F32, F16)
LOGITS_EPILOGUE(BF16, F32)
LOGITS_EPILOGUE(BF16, BF16)
LOGITS_EPILOGUE(BF16, F16)
LOGITS_EPILOGUE(F16, F32)
LOGITS_EPILOGUE(F16, BF16)
LOGITS_EPILOGUE(F16, F16)

template <typename A, typename B, typename C, typename O>
__device__ __forceinline__ void add3_impl(const typename A::S* __restrict__ a, const typename B::S* __restrict__ b,
                                          const typename C::S* __restrict__ c, typename O::S* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double s = (double)A::to_f32(a[i]) + (double)B::to_f32(b[i]);
        if (c) s = s + (double)C::to_f32(c[i]);
        out[i] = O::from_f32((float)s);
    }
}
#define ADD3(A, B, C, O)                                                                                                           \
    extern "C" __global__ void add3_##A##_##B##_##C##_##O(const A::S* a, const B::S* b, const C::S* c, O::S* out, long long n) { MOE_PDL_ENTRY(); \
        add3_impl<A, B, C, O>(a, b, c, out, n);                                                                                    \
    }
// the layer's sums: the routed output and the shared expert's part (T + T -> T); the input
// gradient: the dispatch's, the router's and the shared expert's (T + F32 + F32 -> T); the
// logits' gradient and the aux losses' (F32 + F32 + F32 -> F32)
ADD3(F32, F32, F32, F32)
ADD3(BF16, BF16, BF16, BF16)
ADD3(BF16, F32, F32, BF16)
ADD3(F16, F16, F16, F16)
ADD3(F16, F32, F32, F16)

template <typename O>
__device__ __forceinline__ void column_sums_impl(const float* __restrict__ g, long long rows, int cols, typename O::S* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    double s = 0.0;
    for (long long i = 0; i < rows; i++) s += (double)g[i * cols + j];
    out[j] = O::from_f32((float)s);
}
extern "C" __global__ void column_sums_F32(const float* g, long long rows, int cols, float* out) { MOE_PDL_ENTRY(); column_sums_impl<F32>(g, rows, cols, out); }
extern "C" __global__ void column_sums_BF16(const float* g, long long rows, int cols, u16* out) { MOE_PDL_ENTRY(); column_sums_impl<BF16>(g, rows, cols, out); }
extern "C" __global__ void column_sums_F16(const float* g, long long rows, int cols, u16* out) { MOE_PDL_ENTRY(); column_sums_impl<F16>(g, rows, cols, out); }

// A float32 operand as three bfloat16 parts, for matmul_mixed (crates/moe-cuda/src/train.rs): a
// GEMM of a float32 and a bfloat16 operand on the tensor cores, with the widened GEMM's exact
// products. Each kernel moves the element (r, c) of a row-major rows x cols matrix; its three
// parts j = 0, 1, 2 go to out[r * rs + j * js + c] (rs, js: rows of 3 cols, parts cols apart, or
// parts rows * cols apart):
// * split3_bf16: hi = v's top 16 bits (truncated, so never rounded past the largest bfloat16),
//                mid = the top 16 bits of v - hi, lo = those of v - hi - mid. Each difference is
//                exact and at most 8 significant bits are left for lo, so hi + mid + lo = v
//                exactly (v normal, its low parts too). A non-finite v: hi = v (a NaN as the
//                quiet NaN 0x7fc0), mid = lo = 0.
// * repeat3_u16: the other operand, three times (its rows or columns): part j = x.
// * sum3_f32:    out[r, c] = (p0 + p1) + p2, the three parts' products added in that order.
static __device__ __forceinline__ u16 bf16_top(float v) { return (u16)(__float_as_uint(v) >> 16); }
static __device__ __forceinline__ float bf16_value(u16 h) { return __uint_as_float((u32)h << 16); }

// f(i, o) for each element i of a row-major rows x cols matrix, o = its place r * rs + c in the
// three-part layout (grid-stride).
template <typename F>
__device__ __forceinline__ void each_of_three(long long rows, long long cols, long long rs, F f) {
    const long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols;
        f(i, r * rs + (i - r * cols));
    }
}

extern "C" __global__ void split3_bf16(const float* __restrict__ x, long long rows, long long cols, long long rs, long long js,
                                       u16* __restrict__ out) { MOE_PDL_ENTRY();
    each_of_three(rows, cols, rs, [&](long long i, long long o) {
        const float v = x[i];
        u16 hi, mid = 0, lo = 0;
        if (isfinite(v)) {
            hi = bf16_top(v);
            const float r1 = __fsub_rn(v, bf16_value(hi));
            mid = bf16_top(r1);
            lo = bf16_top(__fsub_rn(r1, bf16_value(mid)));
        } else {
            hi = isnan(v) ? (u16)0x7fc0 : bf16_top(v);
        }
        out[o] = hi;
        out[o + js] = mid;
        out[o + 2 * js] = lo;
    });
}

extern "C" __global__ void repeat3_u16(const u16* __restrict__ x, long long rows, long long cols, long long rs, long long js,
                                       u16* __restrict__ out) { MOE_PDL_ENTRY();
    each_of_three(rows, cols, rs, [&](long long i, long long o) {
        const u16 v = x[i];
        out[o] = v;
        out[o + js] = v;
        out[o + 2 * js] = v;
    });
}

extern "C" __global__ void sum3_f32(const float* __restrict__ p, long long rows, long long cols, long long rs, long long js,
                                    float* __restrict__ out) { MOE_PDL_ENTRY();
    each_of_three(rows, cols, rs, [&](long long i, long long o) { out[i] = __fadd_rn(__fadd_rn(p[o], p[o + js]), p[o + 2 * js]); });
}

// mse_<T>: the mean squared error of y against a target (both T), for a trainer: d = f64(y) -
// f64(t) (exact); grad[i] = T(f32(2 d / n)); partials[c] = chunk c's sum of d^2 in f64, in
// sum_squares's order (chunk_lane_sum: thread i's runs of 8 elements, then the halving tree).
// mse_finish: the loss = (the partials' sum in adamw_finish's order) / n, into out[0].
template <typename T>
__device__ __forceinline__ void mse_impl(const typename T::S* __restrict__ y, const typename T::S* __restrict__ t, long long n,
                                         typename T::S* __restrict__ grad, double* __restrict__ partials) {
    const double acc = chunk_lane_sum(n, [&](long long i) {
        const double d = (double)T::to_f32(y[i]) - (double)T::to_f32(t[i]);
        grad[i] = T::from_f32((float)((2.0 * d) / (double)n));
        return d * d;
    });
    const double total = lane_tree_sum<SQ_THREADS>(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}
extern "C" __global__ void mse_F32(const float* y, const float* t, long long n, float* grad, double* partials) { MOE_PDL_ENTRY(); mse_impl<F32>(y, t, n, grad, partials); }
extern "C" __global__ void mse_BF16(const u16* y, const u16* t, long long n, u16* grad, double* partials) { MOE_PDL_ENTRY(); mse_impl<BF16>(y, t, n, grad, partials); }
extern "C" __global__ void mse_F16(const u16* y, const u16* t, long long n, u16* grad, double* partials) { MOE_PDL_ENTRY(); mse_impl<F16>(y, t, n, grad, partials); }

extern "C" __global__ void mse_finish(const double* __restrict__ partials, long long chunks, long long n, double* __restrict__ out) { MOE_PDL_ENTRY();
    const double total = lane_tree_sum<FIN_THREADS>(partials_lane_sum(partials, chunks));
    if (threadIdx.x == 0) out[0] = n > 0 ? total / (double)n : 0.0;
}

// The shared expert's sigmoid gate (Qwen2-MoE), MoELayer's steps on the GPU. gl = the gate logit
// rounded to T and widened (from the float32 GEMM result); gate = 1 / (1 + exp(-gl)) in f64 with
// the GPU's exp (the host uses JavaScript's Math.exp: the two agree to an ulp or so, so the gate's
// steps agree to the layer's tolerance, not bit for bit); gateT = the gate rounded to T.
// * shared_gate_fwd_<T>:  gl_out[t] = gl; contribution[t, d] = T(f32(f64(out[t, d]) * gateT))
// * shared_gate_bwd_<T>:  grad_out[t, d] = T(f32(f64(g[t, d]) * gate)); dgl[t] = f32((sum over d,
//                         in order, of f64(g) * f64(out)) * gate * (1 - gate))
template <typename T>
__device__ __forceinline__ double gate_of(float gl) { return 1.0 / (1.0 + exp(-(double)gl)); }

template <typename T>
__device__ __forceinline__ void shared_gate_fwd_impl(const float* __restrict__ raw, const typename T::S* __restrict__ out, long long rows, int dim,
                                                     float* __restrict__ gl_out, typename T::S* __restrict__ contribution) {
    const long long t = blockIdx.x;
    if (t >= rows) return;
    const float gl = T::to_f32(T::from_f32(raw[t]));
    const float gate = T::to_f32(T::from_f32((float)gate_of<T>(gl)));
    if (threadIdx.x == 0) gl_out[t] = gl;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const long long i = t * dim + d;
        contribution[i] = T::from_f32((float)((double)T::to_f32(out[i]) * (double)gate));
    }
}

template <typename T>
__device__ __forceinline__ void shared_gate_bwd_impl(const typename T::S* __restrict__ g, const typename T::S* __restrict__ out, const float* __restrict__ gl,
                                                     long long rows, int dim, typename T::S* __restrict__ grad_out, float* __restrict__ dgl) {
    const long long t = blockIdx.x;
    if (t >= rows) return;
    const double gate = gate_of<T>(gl[t]);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const long long i = t * dim + d;
        grad_out[i] = T::from_f32((float)((double)T::to_f32(g[i]) * gate));
    }
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (int d = 0; d < dim; d++) acc += (double)T::to_f32(g[t * dim + d]) * (double)T::to_f32(out[t * dim + d]);
        dgl[t] = (float)(acc * gate * (1.0 - gate));
    }
}

#define SHARED_GATE(T)                                                                                                                 \
    extern "C" __global__ void shared_gate_fwd_##T(const float* raw, const T::S* out, long long rows, int dim, float* gl_out,        \
                                                    T::S* contribution) { MOE_PDL_ENTRY();                                                             \
        shared_gate_fwd_impl<T>(raw, out, rows, dim, gl_out, contribution);                                                           \
    }                                                                                                                                  \
    extern "C" __global__ void shared_gate_bwd_##T(const T::S* g, const T::S* out, const float* gl, long long rows, int dim,          \
                                                    T::S* grad_out, float* dgl) { MOE_PDL_ENTRY();                                                     \
        shared_gate_bwd_impl<T>(g, out, gl, rows, dim, grad_out, dgl);                                                                \
    }
SHARED_GATE(F32)
SHARED_GATE(BF16)
SHARED_GATE(F16)
// the input gradient with the shared expert's (no gate): T + F32 + T -> T; the gated shared
// expert's input gradient: its MLP's (T) + the gate's (F32) -> F32
ADD3(BF16, F32, BF16, BF16)
ADD3(F16, F32, F16, F16)
ADD3(BF16, F32, F32, F32)
ADD3(F16, F32, F32, F32)
