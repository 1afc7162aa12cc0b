// Routing on the GPU: the fused `route` kernel (scores, expert bias, group-limited top-k,
// weights, normTopkProb, routeScale, token mask) and `topk`.
//
// Same semantics as moe_core::routing (docs/semantics.md), and the same bits: scores are
// computed in f64 with the core's own exp and ln (crates/moe-core/src/detmath.rs, ported below:
// + - * / floor and bit operations only; compiled with --fmad=false, so no contraction), rounded
// once to f32; every f64 sum runs in the core's order (one lane, ascending); selection keys are
// f32 as in the core. The top-k order is the core's: descending key, ties to the lower id,
// -0 equal to +0.
//
// One warp per token; the token's row lives in shared memory (dynamic, per warp:
// 8E bytes of f64 scratch, 4E keys, 4E scores, 4G group keys, 4k + 4G picks).

// u8, i64, u64 and detmath (det_exp, det_ln, det_ln_1p) come from kernels/common.cuh.

#define FULL 0xffffffffu

// ---------------------------------------------------------------------------------------
// Score functions in f64 on the core's exp and ln.

static __device__ double sigmoid64(double x) { return 1.0 / (1.0 + det_exp(-x)); }

static __device__ double softplus64(double x) {
    if (x > 20.0) return x;
    return fmax(x, 0.0) + det_ln_1p(det_exp(-fabs(x)));
}

// ---------------------------------------------------------------------------------------
// Selection

// Keys as the core's top_k compares them: NaN ranks below everything, -0 equals +0.
static __device__ __forceinline__ float canon(float v) {
    if (v != v) return -__int_as_float(0x7f800000);
    return v == 0.0f ? 0.0f : v;
}

// The k largest of keys[0..n) (canonical, never NaN), best first, ties to the lower index, into
// out[0..k). Picked keys become NaN. Every lane of the warp calls it.
static __device__ void warp_topk(float* keys, int n, int k, int* out, int lane) {
    for (int j = 0; j < k; j++) {
        float bv = -__int_as_float(0x7f800000);
        int be = 0x7fffffff;
        for (int e = lane; e < n; e += 32) {
            const float v = keys[e];
            if (v != v) continue;
            if (v > bv || (v == bv && e < be)) {
                bv = v;
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL, bv, o);
            const int oe = __shfl_xor_sync(FULL, be, o);
            if (ov > bv || (ov == bv && oe < be)) {
                bv = ov;
                be = oe;
            }
        }
        if (lane == 0) {
            out[j] = be;
            keys[be] = __int_as_float(0x7fc00000);
        }
        __syncwarp();
    }
}

// Register top-k (E <= 32 * PER): lane l holds the keys of experts l, l + 32, ... A key and its
// id pack into one u64 that orders as the core's top_k does (greater key first, then lower id),
// so each round is one warp max of u64s.
static __device__ __forceinline__ unsigned long long pack_key(float v, int e) {
    const unsigned b = __float_as_uint(v);  // canonical: no NaN, no -0
    const unsigned k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)k << 32) | (unsigned long long)(0xffffffffu - (unsigned)e);
}

static __device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long y = __shfl_xor_sync(FULL, x, o);
        x = y > x ? y : x;
    }
    return x;
}

static __device__ __forceinline__ int unpack_id(unsigned long long c) { return (int)(0xffffffffu - (unsigned)(c & 0xffffffffu)); }

// The k best of the keys (lane-strided registers), into out[0..k) (lane 0 writes).
template <int PER>
static __device__ __forceinline__ void reg_topk(const float (&key)[PER], int E, int k, int lane, int* out) {
    unsigned taken = 0u;
    for (int j = 0; j < k; j++) {
        unsigned long long best = 0ull;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int e = lane + 32 * i;
            if (e < E && !((taken >> i) & 1u)) {
                const unsigned long long c = pack_key(key[i], e);
                best = c > best ? c : best;
            }
        }
        best = warp_max_u64(best);
        const int e = unpack_id(best);
        if ((e & 31) == lane) taken |= 1u << (e >> 5);
        if (lane == 0) out[j] = e;
    }
    __syncwarp();
}

// The f64 sum of f32 values v[0..n), equal to the core's sequential sum (ascending, from 0).
// When the values' exponents show that every partial sum is exact in f64 (all are multiples of
// the smallest ulp and below 2^(top + 1) * n, which fits in 53 bits), the order cannot matter,
// and the warp sums in parallel; otherwise lane 0 sums in order. Every lane gets the result.
static __device__ double sum_f32_in_f64(const float* v, int n, int lane) {
    int top = -1000, low = 1000;
    for (int e = lane; e < n; e += 32) {
        const unsigned b = __float_as_uint(v[e]) & 0x7fffffffu;
        if (b == 0u) continue;
        const int be = (int)(b >> 23);
        top = max(top, be == 0 ? -127 : be - 127);
        low = min(low, be == 0 ? -149 : be - 150);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        top = max(top, __shfl_xor_sync(FULL, top, o));
        low = min(low, __shfl_xor_sync(FULL, low, o));
    }
    const int log2n = 32 - __clz(max(n, 1));
    double s = 0.0;
    if (top == -1000 || top + 1 + log2n - low <= 53) {
        for (int e = lane; e < n; e += 32) s += (double)v[e];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
        return s;
    }
    if (lane == 0) {
#pragma unroll 8
        for (int e = 0; e < n; e++) s += (double)v[e];
    }
    return __shfl_sync(FULL, s, 0);
}

// Score functions, as moe_core::routing::ScoreFunction (the order of ScoreFunction::ALL).
#define SF_SOFTMAX 0
#define SF_SIGMOID 1
#define SF_SOFTMAX_WITH_BIAS 2
#define SF_SIGMOID_WITH_BIAS 3
#define SF_SQRT_SOFTPLUS 4

// Bytes of shared memory one warp of route_kernel needs (the host computes the same).
// One token's weights from its k picks (lane 0 only): a softmax over the picked logits when
// the softmax comes after the top-k, else the unbiased scores; then the optional top-k
// normalisation and routeScale, all in f64 and in the CPU core's order, so the bits match it.
static __device__ void write_weights(const float* row, const float* sc, const int* picked, int k, int sf, int softmax_before_topk,
                                     int normalise, double route_scale, double* tmp, float* weights, int* indices) {
    if (sf == SF_SOFTMAX && !softmax_before_topk) {
        const double m = (double)row[picked[0]];
        double sum = 0.0;
        for (int j = 0; j < k; j++) {
            tmp[j] = det_exp((double)row[picked[j]] - m);
            sum += tmp[j];
        }
        for (int j = 0; j < k; j++) tmp[j] = (double)(float)(tmp[j] / sum);
    } else {
        for (int j = 0; j < k; j++) tmp[j] = (double)sc[picked[j]];
    }
    const bool norm = normalise != 0;
    double denom = 1.0;
    if (norm) {
        double s = 0.0;
        for (int j = 0; j < k; j++) s += tmp[j];
        denom = s + 1e-20;
    }
    for (int j = 0; j < k; j++) {
        const double wv = norm ? tmp[j] / denom : tmp[j];
        weights[j] = (float)(wv * route_scale);
        indices[j] = picked[j];
    }
}

static __device__ __forceinline__ int route_stride(int E, int G, int k) { return ((8 * E + 4 * E + 4 * E + 4 * G + 4 * k + 4 * G) + 15) & ~15; }

// err[0]: smallest flat index of a non-finite logit; err[1]: of a non-finite bias (u64 max: none).
extern "C" __global__ void route_kernel(
    const float* __restrict__ logits, const float* __restrict__ bias, const u8* __restrict__ mask,
    int T, int E, int k, int sf, int softmax_before_topk, int groups, int topk_groups, int top2, int normalise,
    double route_scale, float* __restrict__ weights, int* __restrict__ indices, float* __restrict__ scores,
    u64* __restrict__ err) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    const int G = groups;
    char* base = reinterpret_cast<char*>(smem) + (i64)w * route_stride(E, G, k);
    double* tmp = reinterpret_cast<double*>(base);
    float* keys = reinterpret_cast<float*>(tmp + E);
    float* sc = keys + E;
    float* gk = sc + E;
    int* picked = reinterpret_cast<int*>(gk + G);
    int* gpicked = picked + k;
    const float* row = logits + (i64)t * E;

    for (int e = lane; e < E; e += 32) {
        const float x = row[e];
        if (!isfinite(x)) atomicMin(err, (u64)t * (u64)E + (u64)e);
    }
    if (t == 0 && bias != 0) {
        for (int e = lane; e < E; e += 32)
            if (!isfinite(bias[e])) atomicMin(err + 1, (u64)e);
    }

    // 1. Unbiased scores.
    if (sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS) {
        float m = -__int_as_float(0x7f800000);
        for (int e = lane; e < E; e += 32) m = fmaxf(m, row[e]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
        for (int e = lane; e < E; e += 32) tmp[e] = det_exp((double)row[e] - (double)m);
        __syncwarp();
        double sum = 0.0;
        if (lane == 0) {
#pragma unroll 8
            for (int e = 0; e < E; e++) sum += tmp[e];
        }
        sum = __shfl_sync(FULL, sum, 0);
        for (int e = lane; e < E; e += 32) sc[e] = (float)(tmp[e] / sum);
    } else if (sf == SF_SIGMOID || sf == SF_SIGMOID_WITH_BIAS) {
        for (int e = lane; e < E; e += 32) sc[e] = (float)sigmoid64((double)row[e]);
    } else {
        for (int e = lane; e < E; e += 32) sc[e] = (float)sqrt(softplus64((double)row[e]));
    }
    __syncwarp();

    // 2. Selection and weights.
    const bool masked = mask != 0 && mask[t] == 0;
    if (masked) {
        for (int j = lane; j < k; j += 32) {
            indices[(i64)t * k + j] = -1;
            weights[(i64)t * k + j] = 0.0f;
        }
    } else {
        for (int e = lane; e < E; e += 32) {
            float key;
            if (sf == SF_SOFTMAX && !softmax_before_topk) key = row[e];
            else if (bias != 0) key = __fadd_rn(sc[e], bias[e]);
            else key = sc[e];
            keys[e] = canon(key);
        }
        __syncwarp();
        if (G > 1) {
            const int size = E / G;
            for (int g = lane; g < G; g += 32) {
                const float* grp = keys + g * size;
                float first = -__int_as_float(0x7f800000), second = first;
                if (top2) {
                    for (int i = 0; i < size; i++) {
                        const float v = grp[i];
                        if (v > first) {
                            second = first;
                            first = v;
                        } else if (v > second) {
                            second = v;
                        }
                    }
                    gk[g] = canon(__fadd_rn(first, second));
                } else {
                    for (int i = 0; i < size; i++) first = fmaxf(first, grp[i]);
                    gk[g] = canon(first);
                }
            }
            __syncwarp();
            warp_topk(gk, G, topk_groups, gpicked, lane);
            const float dropped = sf == SF_SIGMOID_WITH_BIAS ? -__int_as_float(0x7f800000) : 0.0f;
            for (int e = lane; e < E; e += 32) {
                const float g = gk[e / size];
                if (g == g) keys[e] = dropped;  // a group that was not picked
            }
            __syncwarp();
        }
        warp_topk(keys, E, k, picked, lane);
        if (lane == 0) write_weights(row, sc, picked, k, sf, softmax_before_topk, normalise, route_scale, tmp, weights + (i64)t * k, indices + (i64)t * k);
        __syncwarp();
    }

    // 3. Scores, normalised per row when the weights are.
    float* out = scores + (i64)t * E;
    if (normalise) {
        const double denom = sum_f32_in_f64(sc, E, lane) + 1e-20;
        for (int e = lane; e < E; e += 32) out[e] = (float)((double)sc[e] / denom);
    } else {
        for (int e = lane; e < E; e += 32) out[e] = sc[e];
    }
}

// topk: the k largest of each row of values [T, E], one warp per row (shared: 4E + 4k bytes a
// warp). err[0]: smallest flat index of a NaN.
extern "C" __global__ void topk_kernel(const float* __restrict__ values, int T, int E, int k, float* __restrict__ out_values,
                                       int* __restrict__ out_indices, u64* __restrict__ err) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    float* keys = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (i64)w * (((4 * E + 4 * k) + 15) & ~15));
    int* picked = reinterpret_cast<int*>(keys + E);
    const float* row = values + (i64)t * E;
    for (int e = lane; e < E; e += 32) {
        const float v = row[e];
        if (v != v) atomicMin(err, (u64)t * (u64)E + (u64)e);
        keys[e] = canon(v);
    }
    __syncwarp();
    warp_topk(keys, E, k, picked, lane);
    for (int j = lane; j < k; j += 32) {
        out_values[(i64)t * k + j] = row[picked[j]];
        out_indices[(i64)t * k + j] = picked[j];
    }
}

// tokensPerExpert from indices [n] (-1: none): a shared-memory histogram per block (4E bytes of
// dynamic shared memory), added to out (zeroed by the host). Integer sums: deterministic.
extern "C" __global__ void count_experts(const int* __restrict__ idx, long long n, int E, int* __restrict__ out) {
    extern __shared__ double smem[];
    int* hist = reinterpret_cast<int*>(smem);
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const int e = idx[i];
        if (e >= 0) atomicAdd(hist + e, 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (hist[e] != 0) atomicAdd(out + e, hist[e]);
}

// ---------------------------------------------------------------------------------------
// Register variants for E <= 32 * PER (PER = 1, 2, 4, 8, 16) and G <= 32: the same results as
// route_kernel / topk_kernel; keys and group scores stay in registers (the selection is the
// costly part of routing: one warp max of packed u64s per pick).

template <int PER>
__device__ __forceinline__ void route_reg_impl(
    const float* __restrict__ logits, const float* __restrict__ bias, const u8* __restrict__ mask,
    int T, int E, int k, int sf, int softmax_before_topk, int groups, int topk_groups, int top2, int normalise,
    double route_scale, float* __restrict__ weights, int* __restrict__ indices, float* __restrict__ scores,
    u64* __restrict__ err) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    const int G = groups;
    char* base = reinterpret_cast<char*>(smem) + (i64)w * route_stride(E, G, k);
    double* tmp = reinterpret_cast<double*>(base);
    float* keys_unused = reinterpret_cast<float*>(tmp + E);
    float* sc = keys_unused + E;
    float* gk_unused = sc + E;
    int* picked = reinterpret_cast<int*>(gk_unused + G);
    const float* row = logits + (i64)t * E;

    float x[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int e = lane + 32 * i;
        x[i] = e < E ? row[e] : 0.0f;
        if (e < E && !isfinite(x[i])) atomicMin(err, (u64)t * (u64)E + (u64)e);
    }
    if (t == 0 && bias != 0) {
        for (int e = lane; e < E; e += 32)
            if (!isfinite(bias[e])) atomicMin(err + 1, (u64)e);
    }

    // 1. Unbiased scores (into sc, shared).
    if (sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS) {
        float m = -__int_as_float(0x7f800000);
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) m = fmaxf(m, x[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) tmp[lane + 32 * i] = det_exp((double)x[i] - (double)m);
        __syncwarp();
        double sum = 0.0;
        if (lane == 0) {
#pragma unroll 8
            for (int e = 0; e < E; e++) sum += tmp[e];
        }
        sum = __shfl_sync(FULL, sum, 0);
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) sc[lane + 32 * i] = (float)(tmp[lane + 32 * i] / sum);
    } else if (sf == SF_SIGMOID || sf == SF_SIGMOID_WITH_BIAS) {
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) sc[lane + 32 * i] = (float)sigmoid64((double)x[i]);
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) sc[lane + 32 * i] = (float)sqrt(softplus64((double)x[i]));
    }
    __syncwarp();

    // 2. Selection and weights.
    const bool masked = mask != 0 && mask[t] == 0;
    if (masked) {
        for (int j = lane; j < k; j += 32) {
            indices[(i64)t * k + j] = -1;
            weights[(i64)t * k + j] = 0.0f;
        }
    } else {
        float key[PER];
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int e = lane + 32 * i;
            float v = 0.0f;
            if (e < E) {
                if (sf == SF_SOFTMAX && !softmax_before_topk) v = x[i];
                else if (bias != 0) v = __fadd_rn(sc[e], bias[e]);
                else v = sc[e];
            }
            key[i] = canon(v);
        }
        if (G > 1) {
            const int size = E / G;
            float mine = 0.0f;
            for (int g = 0; g < G; g++) {
                float f = -__int_as_float(0x7f800000), s2 = f;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    const int e = lane + 32 * i;
                    if (e < E && e / size == g) {
                        const float v = key[i];
                        if (v > f) {
                            s2 = f;
                            f = v;
                        } else if (v > s2) {
                            s2 = v;
                        }
                    }
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float of = __shfl_xor_sync(FULL, f, o);
                    const float os = __shfl_xor_sync(FULL, s2, o);
                    const float nf = fmaxf(f, of);
                    s2 = fmaxf(fminf(f, of), fmaxf(s2, os));
                    f = nf;
                }
                const float gv = canon(top2 ? __fadd_rn(f, s2) : f);
                if (lane == g) mine = gv;
            }
            unsigned kept = 0u;
            unsigned long long gkey = lane < G ? pack_key(mine, lane) : 0ull;
            for (int j = 0; j < topk_groups; j++) {
                const unsigned long long best = warp_max_u64(gkey);
                const int g = unpack_id(best);
                kept |= 1u << g;
                if (lane == g) gkey = 0ull;
            }
            const float dropped = sf == SF_SIGMOID_WITH_BIAS ? -__int_as_float(0x7f800000) : 0.0f;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int e = lane + 32 * i;
                if (e < E && !((kept >> (e / size)) & 1u)) key[i] = dropped;
            }
        }
        reg_topk<PER>(key, E, k, lane, picked);
        if (lane == 0) write_weights(row, sc, picked, k, sf, softmax_before_topk, normalise, route_scale, tmp, weights + (i64)t * k, indices + (i64)t * k);
        __syncwarp();
    }

    // 3. Scores, normalised per row when the weights are.
    float* out = scores + (i64)t * E;
    if (normalise) {
        const double denom = sum_f32_in_f64(sc, E, lane) + 1e-20;
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) out[lane + 32 * i] = (float)((double)sc[lane + 32 * i] / denom);
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) out[lane + 32 * i] = sc[lane + 32 * i];
    }
}

template <int PER>
__device__ __forceinline__ void topk_reg_impl(const float* __restrict__ values, int T, int E, int k, float* __restrict__ out_values,
                                              int* __restrict__ out_indices, u64* __restrict__ err) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    int* picked = reinterpret_cast<int*>(reinterpret_cast<char*>(smem) + (i64)w * (((4 * E + 4 * k) + 15) & ~15));
    const float* row = values + (i64)t * E;
    float key[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int e = lane + 32 * i;
        const float v = e < E ? row[e] : 0.0f;
        if (e < E && v != v) atomicMin(err, (u64)t * (u64)E + (u64)e);
        key[i] = canon(v);
    }
    reg_topk<PER>(key, E, k, lane, picked);
    for (int j = lane; j < k; j += 32) {
        out_values[(i64)t * k + j] = row[picked[j]];
        out_indices[(i64)t * k + j] = picked[j];
    }
}

#define ROUTE_REG_KERNELS(PER)                                                                               \
    extern "C" __global__ void route_kernel_r##PER(                                                          \
        const float* logits, const float* bias, const u8* mask, int T, int E, int k, int sf,                 \
        int softmax_before_topk, int groups, int topk_groups, int top2, int normalise, double route_scale,   \
        float* weights, int* indices, float* scores, u64* err) {                                             \
        route_reg_impl<PER>(logits, bias, mask, T, E, k, sf, softmax_before_topk, groups, topk_groups, top2,  \
                            normalise, route_scale, weights, indices, scores, err);                          \
    }                                                                                                        \
    extern "C" __global__ void topk_kernel_r##PER(const float* values, int T, int E, int k, float* out_values, \
                                                   int* out_indices, u64* err) {                             \
        topk_reg_impl<PER>(values, T, E, k, out_values, out_indices, err);                                   \
    }

ROUTE_REG_KERNELS(1)
ROUTE_REG_KERNELS(2)
ROUTE_REG_KERNELS(4)
ROUTE_REG_KERNELS(8)
ROUTE_REG_KERNELS(16)
