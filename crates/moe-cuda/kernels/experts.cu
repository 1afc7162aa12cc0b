// The grouped experts' element kernels: what cuBLAS does not do around the expert GEMMs
// (crates/moe-cuda/src/experts.rs). Rows are the permuted slots, expert-major: expert e owns
// rows offsets[e] .. offsets[e + 1]. No atomics anywhere: every output element has one owner,
// and sums run in a fixed order, so results are the same run after run.
//
// * experts_add_bias_<T>:   h[r, j] += b[e(r), j]                          (h f32, b of T)
// * experts_epilogue_<T>:   y[r, j] = T(yf[r, j] + b[e(r), j] * p[r])      (p optional)
// * experts_colsum_<T>:     out[e, j] = sum over the rows r of e of x[r, j] * p[r], in row
//                           order, in f32                                   (x of T, out f32)
// * experts_row_dot_<T>:    out[r] = f32(sum_j f64(g[r, j] * b[e(r), j]))   (the core's order)
// * experts_add_probs_grad: dp[r] = f32(f64(dp[r]) + f64(gp[r]))
// * convert_f32_to_<T>:     rounds f32 values once to T
//
// Launch shapes: (rows, column blocks) grids with 256 threads for the row kernels; colsum uses
// (experts, column blocks).


template <typename T>
__device__ __forceinline__ void add_bias_impl(float* __restrict__ h, long long width, const typename T::S* __restrict__ bias,
                                              const int* __restrict__ offsets, int num_experts) {
    const long long r = blockIdx.x;
    const int e = expert_of(offsets, num_experts, r);
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < width; j += (long long)gridDim.y * blockDim.x) {
        h[r * width + j] = __fadd_rn(h[r * width + j], T::to_f32(bias[(long long)e * width + j]));
    }
}

template <typename T>
__device__ __forceinline__ void epilogue_impl(const float* __restrict__ yf, typename T::S* __restrict__ y, long long width,
                                              const typename T::S* __restrict__ bias, const float* __restrict__ probs,
                                              const int* __restrict__ offsets, int num_experts) {
    const long long r = blockIdx.x;
    const int e = bias ? expert_of(offsets, num_experts, r) : 0;
    const float p = probs ? probs[r] : 1.0f;
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < width; j += (long long)gridDim.y * blockDim.x) {
        float v = yf[r * width + j];
        if (bias) {
            const float b = T::to_f32(bias[(long long)e * width + j]);
            v = __fadd_rn(v, probs ? __fmul_rn(b, p) : b);
        }
        y[r * width + j] = T::from_f32(v);
    }
}

template <typename T>
__device__ __forceinline__ void colsum_impl(const typename T::S* __restrict__ x, long long width, const float* __restrict__ probs,
                                            const int* __restrict__ offsets, float* __restrict__ out) {
    const int e = blockIdx.x;
    const long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= width) return;
    float acc = 0.0f;
    for (long long r = offsets[e]; r < offsets[e + 1]; r++) {
        const float v = T::to_f32(x[r * width + j]);
        acc = __fadd_rn(acc, probs ? __fmul_rn(v, probs[r]) : v);
    }
    out[(long long)e * width + j] = acc;
}

template <typename T>
__device__ __forceinline__ void row_dot_impl(const typename T::S* __restrict__ g, long long rows, long long width,
                                             const typename T::S* __restrict__ bias, const int* __restrict__ offsets, int num_experts,
                                             float* __restrict__ out) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const int e = expert_of(offsets, num_experts, r);
    double acc = 0.0;
    for (long long j = 0; j < width; j++) {
        acc += (double)__fmul_rn(T::to_f32(g[r * width + j]), T::to_f32(bias[(long long)e * width + j]));
    }
    out[r] = (float)acc;
}

template <typename T>
__device__ __forceinline__ void convert_impl(const float* __restrict__ in, typename T::S* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = T::from_f32(in[i]);
    }
}

#define EXPERTS_KERNELS(NAME, T)                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) experts_add_bias_##NAME(float* h, long long width, const T::S* bias,   \
                                                                              const int* offsets, int num_experts) { MOE_PDL_ENTRY();        \
        add_bias_impl<T>(h, width, bias, offsets, num_experts);                                                              \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) experts_epilogue_##NAME(const float* yf, T::S* y, long long width,     \
                                                                              const T::S* bias, const float* probs,          \
                                                                              const int* offsets, int num_experts) { MOE_PDL_ENTRY();        \
        epilogue_impl<T>(yf, y, width, bias, probs, offsets, num_experts);                                                   \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) experts_colsum_##NAME(const T::S* x, long long width, const float* probs, \
                                                                            const int* offsets, float* out) { MOE_PDL_ENTRY();               \
        colsum_impl<T>(x, width, probs, offsets, out);                                                                       \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) experts_row_dot_##NAME(const T::S* g, long long rows, long long width,  \
                                                                             const T::S* bias, const int* offsets,           \
                                                                             int num_experts, float* out) { MOE_PDL_ENTRY();                 \
        row_dot_impl<T>(g, rows, width, bias, offsets, num_experts, out);                                                    \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) convert_f32_to_##NAME(const float* in, T::S* out, long long n) { MOE_PDL_ENTRY();       \
        convert_impl<T>(in, out, n);                                                                                         \
    }

EXPERTS_KERNELS(f32, F32)
EXPERTS_KERNELS(bf16, BF16)
EXPERTS_KERNELS(f16, F16)

extern "C" __global__ void experts_add_probs_grad(float* __restrict__ dp, const float* __restrict__ gp, long long rows) { MOE_PDL_ENTRY();
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) dp[r] = (float)((double)dp[r] + (double)gp[r]);
}
