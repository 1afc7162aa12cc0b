// kernels/common.cuh: what every kernel file shares. compile.rs prepends it to each file of
// kernels/ before NVRTC compiles it (NVRTC gets no include path: built-in types and intrinsics
// only), and it is part of every disk-cache key.
//
// * the integer typedefs;
// * the element types F32, BF16 and F16 (`S` the storage type, `to_f32` / `from_f32` rounding
//   exactly as moe_core::tensor::Float does);
// * raw words of 2, 4, 8 or 16 bytes (`Word<BYTES>::T`: rows move as raw bits);
// * `expert_of`: the expert that owns slot (or row) s, from the expert offsets;
// * `block_exclusive_scan`: an integer prefix sum over a block's threads;
// * moe_core::detmath (det_exp, det_ln, det_ln_1p) line for line: + - * / floor and bit
//   operations only, so with --fmad=false the GPU gets the core's bits.

// Programmatic dependent launch (Hopper and later; crates/moe-cuda/src/device.rs `launch_params`):
// the host may launch a kernel before the one before it on the stream has finished, so that its
// blocks are scheduled while that one's last blocks run. Every kernel's body starts with
// MOE_PDL_ENTRY() (a host test checks it: compile.rs `every_kernel_enters_through_pdl`): it waits
// until the kernel before has finished and its memory is visible (griddepcontrol.wait; at once
// where the launch was an ordinary one), then lets the next kernel launch (its blocks in turn
// wait at their own entry). Waiting first, in every block, before any memory access, keeps the
// stream's order as it was: no kernel reads or writes before its predecessor is done, and each
// predecessor finished only after its own predecessor did. Nothing before sm_90.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define MOE_PDL_ENTRY() \
    do {                \
    } while (0)
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------
// Element conversions, written out so that they agree with the core bit for bit.

struct F32 {
    typedef float S;
    static __device__ __forceinline__ float to_f32(float v) { return v; }
    static __device__ __forceinline__ float from_f32(float v) { return v; }
};

struct BF16 {
    typedef u16 S;
    static __device__ __forceinline__ float to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
    // Round to nearest, ties to even; a NaN stays a quiet NaN with the top payload bits
    // (moe_core::tensor::Float for bf16).
    static __device__ __forceinline__ u16 from_f32(float v) {
        u32 b = __float_as_uint(v);
        u32 rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        u32 quiet_nan = (b >> 16) | 0x40u;
        return (u16)(v != v ? quiet_nan : rounded);
    }
};

struct F16 {
    typedef u16 S;
    static __device__ __forceinline__ float to_f32(u16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    // Round to nearest even (cvt.rn); NaN as the half crate makes it (sign, quiet bit, the
    // top 10 payload bits), so that even NaN outputs match the CPU core.
    static __device__ __forceinline__ u16 from_f32(float v) {
        u32 x = __float_as_uint(v);
        if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x007fffffu) != 0u) {
            return (u16)(((x & 0x80000000u) >> 16) | 0x7c00u | 0x0200u | ((x & 0x007fffffu) >> 13));
        }
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
    }
};

// ---------------------------------------------------------------------------------------
// Raw words of 2, 4, 8 or 16 bytes: the unit of every row copy.
template <int BYTES> struct Word;
template <> struct Word<2> { typedef u16 T; };
template <> struct Word<4> { typedef u32 T; };
template <> struct Word<8> { typedef uint2 T; };
template <> struct Word<16> { typedef uint4 T; };

// The expert of slot (or expert-major row) s: the last e with offsets[e] <= s (offsets[0] = 0;
// experts with no slots have equal neighbouring offsets and are skipped by the search).
static __device__ __forceinline__ int expert_of(const int* __restrict__ offsets, int num_experts, long long s) {
    int lo = 0, hi = num_experts - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if ((long long)__ldg(offsets + mid) <= s) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// ---------------------------------------------------------------------------------------
// Exclusive scan of `v` over the block (blockDim.x a multiple of 32, at most 1024); `*total`
// gets the block's sum. Every thread of the block must call it.
static __device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        warp_sums[lane] = w;  // inclusive
    }
    __syncthreads();
    const int incl = x + (warp > 0 ? warp_sums[warp - 1] : 0);
    *total = warp_sums[(blockDim.x >> 5) - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return incl - v;
}

// ---------------------------------------------------------------------------------------
// moe_core::detmath, line for line.

#define LN2_HI __longlong_as_double(0x3fe62e42fee00000LL)
#define LN2_LO __longlong_as_double(0x3dea39ef35793c76LL)
#define LOG2_E __longlong_as_double(0x3ff71547652b82feLL)
#define SQRT_2 __longlong_as_double(0x3ff6a09e667f3bcdLL)

static __device__ __forceinline__ double pow2(i64 e) { return __longlong_as_double((e + 1023) << 52); }

static __device__ double det_scale(double x, i64 k) {
    if (k > 1023) return x * pow2(1023) * pow2(min(k - 1023, (i64)1023));
    if (k < -1022) return x * pow2(-1022) * pow2(max(k + 1022, (i64)-1022));
    return x * pow2(k);
}

static __device__ double det_exp(double x) {
    if (x != x) return x;
    if (x > 709.782712893384) return __longlong_as_double(0x7ff0000000000000LL);
    if (x < -745.2) return 0.0;
    const double k = floor(x * LOG2_E + 0.5);
    const double r = (x - k * LN2_HI) - k * LN2_LO;
    const double c[15] = {1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0, 1.0 / 40320.0,
                          1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0, 1.0 / 6227020800.0,
                          1.0 / 87178291200.0};
    double p = c[14];
#pragma unroll
    for (int i = 13; i >= 0; i--) p = p * r + c[i];
    return det_scale(p, (i64)k);
}

static __device__ double det_ln(double x) {
    if (x != x || x < 0.0) return __longlong_as_double(0x7ff8000000000000LL);
    if (x == 0.0) return __longlong_as_double(0xfff0000000000000LL);
    if (x == __longlong_as_double(0x7ff0000000000000LL)) return x;
    i64 e = 0;
    if (x < 2.2250738585072014e-308) {
        x *= 18014398509481984.0;
        e -= 54;
    }
    const u64 bits = (u64)__double_as_longlong(x);
    e += (i64)((bits >> 52) & 0x7ff) - 1023;
    double m = __longlong_as_double((i64)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL));
    if (m > SQRT_2) {
        m *= 0.5;
        e += 1;
    }
    const double f = m - 1.0;
    const double s = f / (2.0 + f);
    const double z = s * s;
    double poly = 1.0 / 23.0;
    for (int d = 10; d >= 1; d--) poly = poly * z + 1.0 / (double)(2 * d + 1);
    const double ln_m = 2.0 * s + 2.0 * s * z * poly;
    const double ef = (double)e;
    return ef * LN2_HI + (ef * LN2_LO + ln_m);
}

static __device__ double det_ln_1p(double y) {
    const double u = 1.0 + y;
    return u == 1.0 ? y : det_ln(u) * (y / (u - 1.0));
}

// ---- The experts' activations (kernels/activations.cu; the grouped GEMM's fused epilogue in
// kernels/grouped_gemm.cu applies the same code, for the same bits) ----

// Activation kinds: the order of moe_core::activations::ActivationKind::ALL.
#define ACT_SWIGLU 0
#define ACT_QUICK_GEGLU 1
#define ACT_SWIGLU_OAI 2
#define ACT_SWIGLU_CLAMPED 3
#define ACT_RELU2 4

struct ActOpts {
    int kind;
    bool fast;
    float alpha;
    float limit;
    float linear_offset;
};

static __device__ __forceinline__ float act_expf(float x, bool fast) { return fast ? expf(x) : (float)det_exp((double)x); }

static __device__ __forceinline__ float act_sigmoid(float v, bool fast) { return 1.0f / (1.0f + act_expf(-v, fast)); }

static __device__ __forceinline__ float act_silu(float v, bool fast) { return v / (1.0f + act_expf(-v, fast)); }

// min(v, limit), NaN stays NaN.
static __device__ __forceinline__ float clamp_max(float v, float limit) { return v > limit ? limit : v; }

// clamp(v, -limit, limit), NaN stays NaN.
static __device__ __forceinline__ float clamp_sym(float v, float limit) {
    if (v > limit) return limit;
    if (v < -limit) return -limit;
    return v;
}

// The unweighted activation of one output column (moe_core's `unit`).
static __device__ __forceinline__ float act_unit(const ActOpts& o, float gate, float up) {
    switch (o.kind) {
        case ACT_SWIGLU:
            return act_silu(gate, o.fast) * up;
        case ACT_QUICK_GEGLU:
        case ACT_SWIGLU_OAI: {
            const float g = clamp_max(gate, o.limit);
            const float u = clamp_sym(up, o.limit);
            return g * act_sigmoid(o.alpha * g, o.fast) * (u + o.linear_offset);
        }
        case ACT_SWIGLU_CLAMPED:
            return act_silu(clamp_max(gate, o.limit), o.fast) * clamp_sym(up, o.limit);
        default: {
            const float r = gate <= 0.0f ? 0.0f : gate;
            return r * r;
        }
    }
}

// Gradients of gw * unit(gate, up) (moe_core's `unit_grad`).
static __device__ __forceinline__ void act_unit_grad(const ActOpts& o, float gate, float up, float gw, float& d_gate, float& d_up) {
    switch (o.kind) {
        case ACT_SWIGLU: {
            const float d = 1.0f + act_expf(-gate, o.fast);
            const float s = 1.0f / d;
            d_gate = gw * s * (1.0f + gate * (1.0f - s)) * up;
            d_up = gw * (gate / d);
            return;
        }
        case ACT_QUICK_GEGLU:
        case ACT_SWIGLU_OAI: {
            const float g = clamp_max(gate, o.limit);
            const float u = clamp_sym(up, o.limit);
            const float z = o.alpha * g;
            const float s = act_sigmoid(z, o.fast);
            d_gate = gate <= o.limit ? gw * s * (1.0f + z * (1.0f - s)) * (u + o.linear_offset) : 0.0f;
            d_up = (up >= -o.limit && up <= o.limit) ? gw * (g * s) : 0.0f;
            return;
        }
        case ACT_SWIGLU_CLAMPED: {
            const float g = clamp_max(gate, o.limit);
            const float u = clamp_sym(up, o.limit);
            const float d = 1.0f + act_expf(-g, o.fast);
            const float s = 1.0f / d;
            d_gate = gate <= o.limit ? gw * s * (1.0f + g * (1.0f - s)) * u : 0.0f;
            d_up = (up >= -o.limit && up <= o.limit) ? gw * (g / d) : 0.0f;
            return;
        }
        default:
            d_gate = gate > 0.0f ? gw * 2.0f * gate : 0.0f;
            d_up = 0.0f;
            return;
    }
}

// `fast` is a constant in each kernel, so the branch on it folds away after inlining.
static __device__ __forceinline__ ActOpts act_opts(int kind, double alpha, double limit, double linear_offset, bool fast) {
    // The options are float32 values passed as doubles: the conversions back are exact.
    ActOpts o;
    o.kind = kind;
    o.fast = fast;
    o.alpha = (float)alpha;
    o.limit = (float)limit;
    o.linear_offset = (float)linear_offset;
    return o;
}
