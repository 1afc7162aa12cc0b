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
// One warp per token. Up to 512 experts, k <= 32 and 32 groups (the models' shapes), the
// register kernels (route_kernel_r*, topk_kernel_r*) keep the token's logits, scores and keys in
// registers and select with warp reductions; beyond that, route_kernel / topk_kernel keep the
// row in shared memory (dynamic, per warp: 8E bytes of f64 scratch, 4E keys, 4E scores, 4G group
// keys, 4k + 4G picks).

// u8, i64, u64 and detmath (det_exp, det_ln, det_ln_1p) come from kernels/common.cuh.

#define FULL 0xffffffffu

// ---------------------------------------------------------------------------------------
// Score functions in f64 on the core's exp and ln.

static __device__ double sigmoid64(double x) { return 1.0 / (1.0 + det_exp(-x)); }

static __device__ double softplus64(double x) {
    if (x > 20.0) return x;
    return fmax(x, 0.0) + det_ln_1p(det_exp(-fabs(x)));
}

// Rounding to f32 without the core's slower f64 path when it cannot matter. An f64 value within
// 2^-49 (relative) of the core's rounds to the same f32 unless it lies within that distance of a
// rounding boundary of f32; `settled` says it does not (both ends of a 2^-40 bracket round alike,
// and rounding is monotonic), so the f32 is the core's. Otherwise the caller runs the core's path.
#define BRACKET 9.094947017729282e-13  // 2^-40
static __device__ __forceinline__ bool settled(double y, float* out) {
    const float lo = (float)(y * (1.0 - BRACKET)), hi = (float)(y * (1.0 + BRACKET));
    *out = lo;
    return lo == hi;
}

// exp(x) for |x| <= 700 within about 2^-46 (relative): x = k ln2 + r, |r| <= ln2 / 2, a degree-11
// Taylor polynomial of e^r (fma), times 2^k by the exponent bits. Accurate enough for `settled`.
// (The coefficients live in constant memory: as immediates they would be loaded into uniform
// registers before every use, two instructions each.)
static __constant__ double EXP_NEAR_C[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                                             1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
static __constant__ double EXP_NEAR_K[3] = {1.4426950408889634 /* log2(e) */, 6.93147180369123816490e-01 /* ln2, high part */,
                                            1.90821492927058770002e-10 /* ln2, low part */};

static __device__ __forceinline__ double exp_near(double x) {
    const double k = rint(x * EXP_NEAR_K[0]);
    const double r = fma(-k, EXP_NEAR_K[2], fma(-k, EXP_NEAR_K[1], x));
    double p = EXP_NEAR_C[0];
#pragma unroll
    for (int i = 1; i < 12; i++) p = fma(p, r, EXP_NEAR_C[i]);
    return __hiloint2double(__double2hiint(p) + ((int)k << 20), __double2loint(p));
}

// 1 / d for d >= 1 (finite): the hardware's approximation and two Newton steps (about 2^-50).
static __device__ __forceinline__ double rcp_near(double d) {
    double r;
    asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(d));
    r = fma(r, fma(-d, r, 1.0), r);
    return fma(r, fma(-d, r, 1.0), r);
}

// (float)sigmoid64(x): the sigmoid from exp_near and rcp_near is within about 2^-45 of the
// core's f64 value (det_exp: a few ulps), inside the bracket; about one value in 2^15, and
// |x| > 700, take the core's path.
static __device__ __forceinline__ float sigmoid_f32(double x) {
    float f;
    if (fabs(x) <= 700.0 && settled(rcp_near(1.0 + exp_near(-x)), &f)) return f;
    return (float)sigmoid64(x);
}

// (float)(v / d) with rinv = 1 / d: v * rinv is within 1.5 ulp of the quotient.
static __device__ __forceinline__ float div_f32(double v, double d, double rinv) {
    float f;
    if (settled(v * rinv, &f)) return f;
    return (float)(v / d);
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

// Register selection (E <= 32 * PER): lane l holds experts l, l + 32, ... A canonical key maps
// to a u32 that orders as the key does (`ord_key`); 0 is below every key and marks a taken or
// absent expert. One pick is a warp max of the lanes' best keys and a warp min of the expert
// ids that hold it (greater key first, then the lower id: the core's order): two redux.sync
// instructions on sm_80 and newer.
static __device__ __forceinline__ unsigned ord_key(float v) {
    const unsigned b = __float_as_uint(v);  // canonical: no NaN, no -0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static __device__ __forceinline__ float key_value(unsigned k) { return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

static __device__ __forceinline__ unsigned warp_max_u32(unsigned x) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(FULL, x);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(FULL, x, o));
    return x;
#endif
}

static __device__ __forceinline__ unsigned warp_min_u32(unsigned x) {
#if __CUDA_ARCH__ >= 800
    return __reduce_min_sync(FULL, x);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(FULL, x, o));
    return x;
#endif
}

// Picks keys one by one, best first (greater key, then lower expert id: the core's order). Each
// lane keeps its best and second best registers not yet taken (bit i of `taken`); a pick is a
// warp max of the lanes' best keys and a warp min of the ids that hold it; the winning lane
// promotes its second best, and only when it wins again rescans its registers (a divergent
// branch, one lane). Within a lane ascending i is ascending id, so strict > keeps the lower id.
// No register array is indexed at run time (that would put it in local memory).
template <int PER, bool VALUE>
struct Picker {
    unsigned b1, b2, taken;
    int i1, i2;
    float v1, v2;
    bool have2;

    __device__ __forceinline__ void scan(const unsigned (&key)[PER], const float (&v)[PER]) {
        b1 = b2 = 0u;
        i1 = i2 = 0;
        v1 = v2 = 0.0f;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            if ((taken >> i) & 1u) continue;
            if (key[i] > b1) {
                b2 = b1, i2 = i1, b1 = key[i], i1 = i;
                if (VALUE) v2 = v1, v1 = v[i];
            } else if (key[i] > b2) {
                b2 = key[i], i2 = i;
                if (VALUE) v2 = v[i];
            }
        }
        have2 = true;
    }

    __device__ __forceinline__ void start(const unsigned (&key)[PER], const float (&v)[PER]) {
        taken = 0u;
        scan(key, v);
    }

    // The next pick's expert id (every lane), its key `m` and, with VALUE, its value `val`.
    __device__ __forceinline__ int pick(const unsigned (&key)[PER], const float (&v)[PER], unsigned& m, float& val, int lane) {
        m = warp_max_u32(b1);
        const int id = (int)warp_min_u32(b1 == m ? (unsigned)(lane + 32 * i1) : 0xffffffffu);
        const int owner = id & 31;
        if (VALUE) val = __shfl_sync(FULL, v1, owner);
        if (lane == owner) {
            taken |= 1u << i1;
            if (have2) {
                b1 = b2, i1 = i2, v1 = v2;
                have2 = false;
            } else {
                scan(key, v);
            }
        }
        return id;
    }
};

// The kept groups (bit g) of a group top-k: lane g < G holds group g's key (`mine`; other lanes'
// values are ignored); ties to the lower group, as the core's top_k.
static __device__ __forceinline__ unsigned pick_groups(unsigned mine, int G, int topk_groups, int lane) {
    unsigned kept = 0u;
    unsigned gkey = lane < G ? mine : 0u;
    for (int j = 0; j < topk_groups; j++) {
        const unsigned best = warp_max_u32(gkey);
        const int g = __ffs(__ballot_sync(FULL, gkey == best)) - 1;
        kept |= 1u << g;
        if (lane == g) gkey = 0u;
    }
    return kept;
}

// A group's selection key (ord_key) from its largest key f and second largest s (ord_keys; 0:
// none): f, or canon(f + s) with top2, as the core's group scores.
static __device__ __forceinline__ unsigned group_key(unsigned f, unsigned s, int top2) {
    if (!top2) return f;
    return ord_key(canon(__fadd_rn(key_value(f), s == 0u ? -__int_as_float(0x7f800000) : key_value(s))));
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

// Bytes of shared memory one warp of the register kernels needs (the host computes the same):
// the scores (4E) and, for the softmax score functions, the f64 exponentials (8E, first).
static __device__ __forceinline__ int route_reg_stride(int E, bool softmax) { return ((softmax ? 8 * E : 0) + 4 * E + 15) & ~15; }

static __device__ __forceinline__ int route_stride(int E, int G, int k) { return ((8 * E + 4 * E + 4 * E + 4 * G + 4 * k + 4 * G) + 15) & ~15; }

// err (set to u64 max by the host; may be mapped host memory): err[0] becomes 0 when a logit is
// not finite, err[1] when a bias is not (the host then runs the core, which names the value).
extern "C" __global__ void route_kernel(
    const float* __restrict__ logits, const float* __restrict__ bias, const u8* __restrict__ mask,
    int T, int E, int k, int sf, int softmax_before_topk, int groups, int topk_groups, int top2, int normalise,
    double route_scale, float* __restrict__ weights, int* __restrict__ indices, float* __restrict__ scores,
    u64* __restrict__ err, int* __restrict__ tpe) { MOE_PDL_ENTRY();
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
        if (!isfinite(x)) err[0] = 0ull;
    }
    if (t == 0 && bias != 0) {
        for (int e = lane; e < E; e += 32)
            if (!isfinite(bias[e])) err[1] = 0ull;
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
        if (tpe != 0)
            for (int j = lane; j < k; j += 32) atomicAdd(tpe + picked[j], 1);  // integer counts: order-free
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
// warp). err[0] becomes 0 when a value is NaN (as route's).
extern "C" __global__ void topk_kernel(const float* __restrict__ values, int T, int E, int k, float* __restrict__ out_values,
                                       int* __restrict__ out_indices, u64* __restrict__ err) { MOE_PDL_ENTRY();
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    float* keys = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (i64)w * (((4 * E + 4 * k) + 15) & ~15));
    int* picked = reinterpret_cast<int*>(keys + E);
    const float* row = values + (i64)t * E;
    for (int e = lane; e < E; e += 32) {
        const float v = row[e];
        if (v != v) err[0] = 0ull;
        keys[e] = canon(v);
    }
    __syncwarp();
    warp_topk(keys, E, k, picked, lane);
    for (int j = lane; j < k; j += 32) {
        out_values[(i64)t * k + j] = row[picked[j]];
        out_indices[(i64)t * k + j] = picked[j];
    }
}

// ---------------------------------------------------------------------------------------
// Register variants for E <= 32 * PER (PER = 1, 2, 4, 8, 16), k <= 32 (route) and G <= 32: the
// same results as route_kernel / topk_kernel, with everything a token needs in registers.

// The f64 sum of the lanes' f32 registers (E values, expert order), equal to the core's
// sequential sum: in parallel when every partial sum is exact (see sum_f32_in_f64), else in
// expert order through shuffles (every lane gets the result).
template <int PER>
static __device__ double reg_sum_f32_in_f64(const float (&v)[PER], int E, int lane) {
    // the largest and the smallest non-zero magnitude's bits (they order as the magnitudes do)
    unsigned hi = 0u, lo = 0xffffffffu;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const unsigned b = __float_as_uint(v[i]) & 0x7fffffffu;
        if (lane + 32 * i >= E || b == 0u) continue;
        hi = max(hi, b);
        lo = min(lo, b);
    }
    hi = warp_max_u32(hi);
    lo = warp_min_u32(lo);
    int top = -1000, low = 1000;
    if (hi != 0u) {
        const int bh = (int)(hi >> 23), bl = (int)(lo >> 23);
        top = bh == 0 ? -127 : bh - 127;
        low = bl == 0 ? -149 : bl - 150;
    }
    const int log2n = 32 - __clz(max(E, 1));
    double s = 0.0;
    if (top == -1000 || top + 1 + log2n - low <= 53) {
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) s += (double)v[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
        return s;
    }
#pragma unroll
    for (int i = 0; i < PER; i++)
        for (int l = 0; l < 32 && 32 * i + l < E; l++) s += (double)__shfl_sync(FULL, v[i], l);
    return s;
}

// route of token t (one warp) for E <= 32 * PER, k <= 32 and at most 32 groups, its logits xs in
// shared memory (route_reg_loop copies them there): logits, scores and keys in registers,
// selection by warp reductions (pick_best), the k picks held by lanes 0..k so that the weights
// are computed side by side (sums still in pick order, as the core's). Dynamic shared memory a
// warp: the scores (E floats) and, for the softmax score functions, E doubles (their sum runs in
// the core's order on one lane); then route_reg_loop's two logit buffers.
template <int PER>
__device__ __forceinline__ void route_reg_impl(
    const float* __restrict__ xs, int t, const float* __restrict__ bias, const u8* __restrict__ mask,
    int E, int k, int sf, int softmax_before_topk, int groups, int topk_groups, int top2, int normalise,
    double route_scale, float* __restrict__ weights, int* __restrict__ indices, float* __restrict__ scores,
    u64* __restrict__ err, int* __restrict__ tpe) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int G = groups;

    // token t's logits, prefetched into shared memory (each lane reads the elements it copied)
    float x[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int e = lane + 32 * i;
        x[i] = e < E ? xs[e] : 0.0f;
        if (e < E && !isfinite(x[i])) err[0] = 0ull;
    }
    if (t == 0 && bias != 0) {
        for (int e = lane; e < E; e += 32)
            if (!isfinite(bias[e])) err[1] = 0ull;
    }

    // 1. Unbiased scores.
    float sc[PER];
    const bool softmax = sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS;
    char* base = reinterpret_cast<char*>(smem) + (i64)w * route_reg_stride(E, softmax);
    float* scs = reinterpret_cast<float*>(base + (softmax ? 8 * E : 0));
    if (softmax) {
        double* tmp = reinterpret_cast<double*>(base);
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
        for (int i = 0; i < PER; i++) sc[i] = lane + 32 * i < E ? (float)(tmp[lane + 32 * i] / sum) : 0.0f;
    } else if (sf == SF_SIGMOID || sf == SF_SIGMOID_WITH_BIAS) {
#pragma unroll
        for (int i = 0; i < PER; i++) sc[i] = lane + 32 * i < E ? sigmoid_f32((double)x[i]) : 0.0f;
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++) sc[i] = lane + 32 * i < E ? (float)sqrt(softplus64((double)x[i])) : 0.0f;
    }

#pragma unroll
    for (int i = 0; i < PER; i++)
        if (lane + 32 * i < E) scs[lane + 32 * i] = sc[i];  // for the picks' weights
    __syncwarp();

    // 2. Selection and weights.
    const bool masked = mask != 0 && mask[t] == 0;
    if (masked) {
        if (lane < k) {
            indices[(i64)t * k + lane] = -1;
            weights[(i64)t * k + lane] = 0.0f;
        }
    } else {
        unsigned key[PER];
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int e = lane + 32 * i;
            float v = 0.0f;
            if (e < E) {
                if (sf == SF_SOFTMAX && !softmax_before_topk) v = x[i];
                else if (bias != 0) v = __fadd_rn(sc[i], bias[e]);
                else v = sc[i];
            }
            key[i] = e < E ? ord_key(canon(v)) : 0u;
        }
        if (G > 1) {
            // group scores (the max, or the sum of the two largest), one per lane g < G
            const int size = E / G;
            const unsigned dropped = ord_key(sf == SF_SIGMOID_WITH_BIAS ? -__int_as_float(0x7f800000) : 0.0f);
            unsigned gf = 0u, gs = 0u;  // lane g < G: group g's largest and second largest keys
            if (size % 32 == 0) {
                // each register holds experts of one group on every lane (r registers a group): the
                // warp's top two of each register, merged over the group's registers (a
                // multiset's top two); groups advance with the registers, so no divisions
                const int r = size / 32;
                unsigned f = 0u, s2 = 0u;
                int g = 0, c = 0;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    if (32 * i >= E) break;
                    const unsigned F = warp_max_u32(key[i]);
                    unsigned S = 0u;
                    if (top2) {
                        const int holder = __ffs(__ballot_sync(FULL, key[i] == F)) - 1;
                        S = warp_max_u32(lane == holder ? 0u : key[i]);
                    }
                    if (c == 0) {
                        f = F;
                        s2 = S;
                    } else {
                        s2 = max(min(f, F), max(s2, S));
                        f = max(f, F);
                    }
                    if (++c == r) {
                        if (lane == g) gf = f, gs = s2;
                        g++;
                        c = 0;
                    }
                }
                const unsigned kept = pick_groups(group_key(gf, gs, top2), G, topk_groups, lane);
                g = 0;
                c = 0;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    if (32 * i >= E) break;
                    if (!((kept >> g) & 1u)) key[i] = dropped;
                    if (++c == r) {
                        g++;
                        c = 0;
                    }
                }
            } else {
                int gi[PER];
#pragma unroll
                for (int i = 0; i < PER; i++) gi[i] = (lane + 32 * i) / size;  // >= G past E
                for (int g = 0; g < G; g++) {
                    unsigned f = 0u, s2 = 0u;
#pragma unroll
                    for (int i = 0; i < PER; i++) {
                        if (gi[i] != g) continue;
                        const unsigned v = key[i];
                        if (v > f) {
                            s2 = f;
                            f = v;
                        } else if (v > s2) {
                            s2 = v;
                        }
                    }
                    const unsigned F = warp_max_u32(f);
                    unsigned S = 0u;
                    if (top2) {
                        // the second largest of the group's multiset: the largest once one copy of F is set aside
                        const int holder = __ffs(__ballot_sync(FULL, f == F)) - 1;
                        S = warp_max_u32(lane == holder ? s2 : f);
                    }
                    if (lane == g) gf = F, gs = S;
                }
                const unsigned kept = pick_groups(group_key(gf, gs, top2), G, topk_groups, lane);
#pragma unroll
                for (int i = 0; i < PER; i++)
                    if (lane + 32 * i < E && !((kept >> gi[i]) & 1u)) key[i] = dropped;
            }
        }
        // the k picks: lane j keeps pick j (its expert, score and, for weights from logits, its
        // logit: the key itself, canonical, which changes nothing below)
        const bool logit_weights = sf == SF_SOFTMAX && !softmax_before_topk;
        int pid = -1;
        float psc = 0.0f, px = 0.0f;
        Picker<PER, false> picker;
        picker.start(key, sc);
        for (int j = 0; j < k; j++) {
            unsigned m;
            float unused;
            const int id = picker.pick(key, sc, m, unused, lane);
            if (lane == j) {
                pid = id;
                px = key_value(m);
            }
        }
        if (lane < k) {
            psc = scs[pid];
            if (tpe != 0) atomicAdd(tpe + pid, 1);  // integer counts: the same whatever the order
        }
        // weights: the softmax over the picked logits when it comes after the top-k, else the
        // unbiased scores; then normTopkProb and routeScale (sums in pick order, as the core)
        double v;
        if (logit_weights) {
            const double m0 = (double)__shfl_sync(FULL, px, 0);
            const double ex = lane < k ? det_exp((double)px - m0) : 0.0;
            double sum = 0.0;
            for (int j = 0; j < k; j++) sum += __shfl_sync(FULL, ex, j);
            v = (double)(float)(ex / sum);
        } else {
            v = (double)psc;
        }
        double denom = 1.0;
        if (normalise) {
            double s = 0.0;
            for (int j = 0; j < k; j++) s += __shfl_sync(FULL, v, j);
            denom = s + 1e-20;
        }
        if (lane < k) {
            const double wv = normalise ? v / denom : v;
            weights[(i64)t * k + lane] = (float)(wv * route_scale);
            indices[(i64)t * k + lane] = pid;
        }
    }

    // 3. Scores, normalised per row when the weights are.
    float* out = scores + (i64)t * E;
    if (normalise) {
        const double denom = reg_sum_f32_in_f64<PER>(sc, E, lane) + 1e-20;
        const double rinv = 1.0 / denom;
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) out[lane + 32 * i] = div_f32((double)sc[i], denom, rinv);
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < E) out[lane + 32 * i] = sc[i];
    }
}

// topk for E <= 32 * PER (any k <= E): pick j is written by lane j % 32. No shared memory.
template <int PER>
__device__ __forceinline__ void topk_reg_impl(const float* __restrict__ values, int T, int E, int k, float* __restrict__ out_values,
                                              int* __restrict__ out_indices, u64* __restrict__ err) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + w;
    if (t >= T) return;
    const float* row = values + (i64)t * E;
    float x[PER];
    unsigned key[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int e = lane + 32 * i;
        x[i] = e < E ? row[e] : 0.0f;
        if (e < E && x[i] != x[i]) err[0] = 0ull;
        key[i] = e < E ? ord_key(canon(x[i])) : 0u;
    }
    Picker<PER, true> picker;
    picker.start(key, x);
    for (int j = 0; j < k; j++) {
        unsigned m;
        float v;
        const int id = picker.pick(key, x, m, v, lane);
        if (lane == (j & 31)) {
            out_values[(i64)t * k + j] = v;
            out_indices[(i64)t * k + j] = id;
        }
    }
}

// cp.async of one 4-byte word into shared memory (bypassing registers), and its group waits.
static __device__ __forceinline__ void cp_async4(void* smem_dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
static __device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// The register route kernels are persistent: each warp routes tokens t, t + step, ... (step =
// the grid's warps) and copies the next token's logits into shared memory (cp.async, two
// buffers a warp after the warps' score space) while it routes the current one: under ncu, 17%
// of the warps' stalls had been the wait for the row's loads.
template <int PER>
__device__ __forceinline__ void route_reg_loop(
    const float* __restrict__ logits, const float* __restrict__ bias, const u8* __restrict__ mask,
    int T, int E, int k, int sf, int softmax_before_topk, int groups, int topk_groups, int top2, int normalise,
    double route_scale, float* __restrict__ weights, int* __restrict__ indices, float* __restrict__ scores,
    u64* __restrict__ err, int* __restrict__ tpe) {
    extern __shared__ double smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool softmax = sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS;
    float* buf = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (i64)warps * route_reg_stride(E, softmax)) + (i64)w * 2 * E;
    const int step = gridDim.x * warps;
    int t = blockIdx.x * warps + w;
    auto fetch = [&](int tok, float* dst) {
        const float* row = logits + (i64)tok * E;
        for (int e = lane; e < E; e += 32) cp_async4(dst + e, row + e);
    };
    if (t < T) fetch(t, buf);
    cp_async_commit();
    int cur = 0;
    for (; t < T; t += step) {
        if (t + step < T) fetch(t + step, buf + (cur ^ 1) * E);
        cp_async_commit();
        cp_async_wait_one();  // token t's copies are done
        route_reg_impl<PER>(buf + cur * E, t, bias, mask, E, k, sf, softmax_before_topk, groups, topk_groups, top2, normalise,
                            route_scale, weights, indices, scores, err, tpe);
        __syncwarp();  // every lane is done with buffer cur before it is refilled
        cur ^= 1;
    }
}

#define ROUTE_REG_KERNELS(PER)                                                                               \
    /* 8 blocks of 128 an SM (64 registers): measured best on an H100 (12 or 16 blocks spill: slower) */   \
    extern "C" __global__ void __launch_bounds__(128, 8) route_kernel_r##PER(                                \
        const float* logits, const float* bias, const u8* mask, int T, int E, int k, int sf,                 \
        int softmax_before_topk, int groups, int topk_groups, int top2, int normalise, double route_scale,   \
        float* weights, int* indices, float* scores, u64* err, int* tpe) { MOE_PDL_ENTRY();                                   \
        route_reg_loop<PER>(logits, bias, mask, T, E, k, sf, softmax_before_topk, groups, topk_groups, top2,  \
                            normalise, route_scale, weights, indices, scores, err, tpe);                     \
    }                                                                                                        \
    extern "C" __global__ void topk_kernel_r##PER(const float* values, int T, int E, int k, float* out_values, \
                                                   int* out_indices, u64* err) { MOE_PDL_ENTRY();                             \
        topk_reg_impl<PER>(values, T, E, k, out_values, out_indices, err);                                   \
    }

ROUTE_REG_KERNELS(1)
ROUTE_REG_KERNELS(2)
ROUTE_REG_KERNELS(4)
ROUTE_REG_KERNELS(8)
ROUTE_REG_KERNELS(16)


// ---------------------------------------------------------------------------------------
// routeBackward: d loss / d logits given route's picks, moe_core::routing::route_backward's
// arithmetic and order exactly (f64, the core's exp; every sum in the core's order, from -0.0
// as Rust's f64 `sum()` starts; the accumulators it fills with 0.0 from +0.0), one warp a token:
// the lanes compute the per-expert terms (the exps, sigmoids, the outputs), expert e on lane
// e % 32, and every lane adds up the row's sums over the experts in expert order (the same
// values in the same order: each lane holds the same sum). The row's f64 scores sit in `sbuf`,
// token t's expert e at sbuf[t * E + e]; the k picks' weights in registers (k <= RB_MAX_K),
// computed by every lane alike. (One thread a token kept 4 warps an SM busy: 0.095 ms at
// T=8192, E=64 on an H200, ncu, at 6% occupancy.)
//
// err[0] (u64 max from the host) is lowered when a logit is not finite or a row of picks is
// invalid (out of range, -1 in a row of picks, a repeated expert): the host then runs the core,
// whose error names the value.

#define RB_MAX_K 32
#define RB_WARPS 4

struct RouteBackwardRow {
    const float* gsc;  // this row of gradScores, or null
    const int* picks;
    const double* gu;  // d loss / d u_j (after the normalisation)
    const double* s;   // this row's scores
    int k;
    bool on_logits, normalise;
    double dot_sc, denom_sc;  // gradScores' normalisation terms

    __device__ __forceinline__ double score(int e) const { return s[e]; }

    // d loss / d scores[e] (the core's `gs`): the picks' gu when the weights are the scores,
    // plus gradScores (through the scores' normalisation).
    __device__ __forceinline__ double grad_score(int e) const {
        double g = 0.0;
        if (!on_logits) {
            for (int j = 0; j < k; j++)
                if (picks[j] == e) {
                    g += gu[j];
                    break;
                }
        }
        if (gsc) g += normalise ? ((double)gsc[e] - dot_sc) / denom_sc : (double)gsc[e];
        return g;
    }
};

extern "C" __global__ void __launch_bounds__(32 * RB_WARPS) route_backward_kernel(const float* __restrict__ logits, const int* __restrict__ indices,
                                                 const float* __restrict__ grad_weights, const float* __restrict__ grad_scores,
                                                 const u8* __restrict__ mask, int T, int E, int k, int sf, int on_logits,
                                                 int normalise, double scale, double* __restrict__ sbuf, float* __restrict__ grad,
                                                 u64* __restrict__ err) { MOE_PDL_ENTRY();
    const int t = blockIdx.x * RB_WARPS + (int)(threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= T) return;  // the whole warp
    const float* x = logits + (i64)t * E;
    float* out = grad + (i64)t * E;
    const int* row = indices + (i64)t * k;
    bool bad = false, all_masked = true;
    for (int e = lane; e < E; e += 32) bad |= !isfinite(x[e]);
    bad = __any_sync(0xffffffffu, bad);
    for (int j = 0; j < k; j++) {
        const int v = row[j];
        bad |= v < -1 || v >= E;
        all_masked &= v == -1;
    }
    int picks[RB_MAX_K];
    const bool live = !bad && !(mask && mask[t] == 0) && !all_masked;
    if (live) {
        for (int j = 0; j < k; j++) {
            picks[j] = row[j];
            bad |= picks[j] == -1;
            for (int i = 0; i < j; i++) bad |= picks[i] == picks[j];
        }
    }
    if (bad) {
        if (lane == 0) atomicMin(err, (u64)t);
        return;
    }
    if (!live) {
        for (int e = lane; e < E; e += 32) out[e] = 0.0f;
        return;
    }

    const bool need_scores = grad_scores != nullptr || !on_logits;
    double* s = sbuf + (i64)t * E;
    if (need_scores) {
        if (sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS) {
            float mf = -__int_as_float(0x7f800000);
            for (int e = lane; e < E; e += 32) mf = fmaxf(mf, x[e]);  // finite values: any order
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mf = fmaxf(mf, __shfl_xor_sync(0xffffffffu, mf, off));
            const double m = (double)mf;
            for (int e = lane; e < E; e += 32) s[e] = det_exp((double)x[e] - m);
            __syncwarp();
            double sum = -0.0;
#pragma unroll 8
            for (int e = 0; e < E; e++) sum += s[e];
            __syncwarp();
            for (int e = lane; e < E; e += 32) s[e] /= sum;
        } else if (sf == SF_SIGMOID || sf == SF_SIGMOID_WITH_BIAS) {
            for (int e = lane; e < E; e += 32) s[e] = sigmoid64((double)x[e]);
        } else {
            for (int e = lane; e < E; e += 32) s[e] = sqrt(softplus64((double)x[e]));
        }
        __syncwarp();
    }

    // u_j: the picks' weights before normalisation and scale
    double u[RB_MAX_K], gu[RB_MAX_K];
    if (on_logits) {
        float mf = -__int_as_float(0x7f800000);
        for (int j = 0; j < k; j++) mf = fmaxf(mf, x[picks[j]]);
        const double m = (double)mf;
        double sum = -0.0;
        for (int j = 0; j < k; j++) {
            u[j] = det_exp((double)x[picks[j]] - m);
            sum += u[j];
        }
        for (int j = 0; j < k; j++) u[j] /= sum;
    } else {
        for (int j = 0; j < k; j++) u[j] = s[picks[j]];
    }
    const float* gw = grad_weights + (i64)t * k;
    for (int j = 0; j < k; j++) gu[j] = (double)gw[j] * scale;
    if (normalise) {
        double denom = -0.0;
        for (int j = 0; j < k; j++) denom += u[j];
        denom += 1e-20;
        double dot = -0.0;
        for (int j = 0; j < k; j++) dot += gu[j] * (u[j] / denom);
        for (int j = 0; j < k; j++) gu[j] = (gu[j] - dot) / denom;
    }
    // through the softmax over the picked logits: c_j goes to the logit of pick j
    double dot_l = -0.0;
    if (on_logits)
        for (int j = 0; j < k; j++) dot_l += gu[j] * u[j];

    RouteBackwardRow r{grad_scores ? grad_scores + (i64)t * E : nullptr, picks, gu, s, k, on_logits != 0, normalise != 0, 0.0, 1.0};
    if (r.gsc && r.normalise) {
        double denom = -0.0;
        for (int e = 0; e < E; e++) denom += r.score(e);
        denom += 1e-20;
        double dot = -0.0;
        for (int e = 0; e < E; e++) dot += (double)r.gsc[e] * (r.score(e) / denom);
        r.dot_sc = dot;
        r.denom_sc = denom;
    }
    double dot_s = -0.0;
    if (need_scores && (sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS))
        for (int e = 0; e < E; e++) dot_s += r.grad_score(e) * r.score(e);

    for (int e = lane; e < E; e += 32) {
        double g = 0.0;
        if (on_logits) {
            for (int j = 0; j < k; j++)
                if (picks[j] == e) {
                    g += u[j] * (gu[j] - dot_l);
                    break;
                }
        }
        if (need_scores) {
            const double gs = r.grad_score(e), v = r.score(e), xe = (double)x[e];
            if (sf == SF_SOFTMAX || sf == SF_SOFTMAX_WITH_BIAS) {
                g += v * (gs - dot_s);
            } else if (sf == SF_SIGMOID || sf == SF_SIGMOID_WITH_BIAS) {
                g += gs * (v * sigmoid64(-xe));
            } else {
                // d sqrt(softplus(x)) / dx (the core's sqrt_softplus_derivative)
                const double d = v == 0.0 ? 0.0 : xe > 20.0 ? 0.5 / v : sigmoid64(xe) / (2.0 * v);
                g += gs * d;
            }
        }
        out[e] = (float)g;
    }
}
