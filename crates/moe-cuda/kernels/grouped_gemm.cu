// The grouped GEMM of the experts on Hopper (sm_90a): one persistent launch over every
// expert's tiles, the per-expert row counts read from device memory (no host read).
//
//   out[rows of e, :] = x[rows of e, :] @ B[e]          for e = 0 .. E-1
//
// x [M, K] row-major bf16 (the permuted tokens, expert-major: expert e owns the rows after the
// rows of experts 0 .. e-1, `counts[e]` of them); B[e] bf16, one of
//   * `nn`: W [E, K, N] row-major (the layout of W1 [E, dim, 2*inter] and W2 [E, inter, dim]:
//     the forward GEMMs x @ W1[e], a @ W2[e]);
//   * `nt`: W [E, N, K] row-major, used transposed (the input gradients dh @ W2[e]^T,
//     dY @ W1[e]^T: W2 [E, inter, dim] with K = dim, N = inter);
// out [M, N] row-major, bf16 (rounded once, to nearest even) or f32. float32 accumulation.
//
// Tiles of 128 rows x BN columns (BN = 128 or 256), K in steps of 64. A block is three
// warpgroups: warpgroup 0 is the producer (one thread issues the TMA loads of each k-step's
// A tile [128 x 64] and B tile [64 x BN] into a ring of shared-memory stages, with an
// mbarrier pair per stage: `full` (the TMA's transaction bytes) and `empty` (released by each
// consumer warp once its wgmma has read the stage)); warpgroups 1 and 2 each multiply 64 of
// the 128 rows with `wgmma.mma_async.m64nBNk16` (both operands from shared memory, 128-byte
// swizzle as the TMA writes them) and store their accumulators. Rows of a tile past the
// expert's end (they belong to the next expert, or lie past M: the TMA fills zeros there) are
// computed and not stored. The blocks are persistent (one per SM): block b takes tiles b,
// b + grid, ...; tile t is found from per-expert tile offsets that every block computes from
// `counts` at its start (integer prefix sums in shared memory). Within an expert, tiles run
// in groups of `group_n` column tiles (a launch argument: grouped_gemm.rs `group_n`), all row tiles of a group before the next group, so that
// the blocks working at one time share the expert's B columns in L2.
//
// Deterministic: every output element is written once by one thread, its sum over K in one
// fixed order (k-steps in order, wgmma's own fixed reduction inside a step); no atomics.
//
// The wgmma / TMA / setmaxnreg code needs sm_90a (NVRTC --gpu-architecture=sm_90a); the file is
// also compiled for the device's plain architecture with every other kernel file
// (compile::ALL), where the kernels are stubs that trap: crates/moe-cuda/src/grouped_gemm.rs
// loads this file's sm_90a build for the launches.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GG_WGMMA 1
#endif

// A CUtensorMap (cuTensorMapEncodeTiled's 128 bytes), passed by value as a __grid_constant__
// kernel parameter.
struct __align__(64) GgTensorMap {
    u64 words[16];
};

#define GG_BM 128
#define GG_BK 64
#define GG_THREADS 384

// The epilogues that store through shared memory. EPI_REG: straight from the registers;
// EPI_STAGED: through a staging buffer of its own (2 x 64 rows of GG_C_ROW bytes after the
// stages; 3 stages then fit); EPI_RING: through two stages of the ring that the producer skips
// after each tile's k-steps (4 stages and no staging buffer: the stages' look-ahead is longer
// while the k-steps run, two stages shorter in the epilogue). Outside GG_WGMMA too: the kernels'
// instantiations below name them on every architecture.
#define GG_EPI_REG 0
#define GG_EPI_STAGED 1
#define GG_EPI_RING 2
// EPI_TMA: a staging buffer of its own (2 x 32 KiB: each consumer warpgroup's 64 rows as four
// 64 x 64 boxes of 128-byte rows in the 128-byte swizzle) stored by four TMA tensor stores a
// warpgroup (`map_out`, GgOut) instead of 64 bulk row copies: 8 TMA instructions a tile where the
// row copies take 128, so the TMA unit is back sooner to the next tile's loads. A warpgroup whose
// 64 rows run past the expert's end (a tensor store writes whole boxes, clipped only at the
// tensor's bounds) stores from the registers instead. The experts' default (grouped_gemm.rs
// experts_tile): 2-13% faster than EPI_STAGED on an H100, the weight gradients most.
#define GG_EPI_TMA 3

// The launch's `flags`. GG_IDLE_TAILS: in a tile of at most 64 rows (an expert's last) the second
// consumer warpgroup, whose 64 rows are all past the expert's end, issues no wgmma and stores
// nothing (without it, it multiplies rows that are not stored, and the tensor cores are shared
// by both warpgroups' k-steps); the stored rows' bits are the same either way. Token-side
// kernels without HALF, MC, ACT or EPI_RING (whose epilogues both warpgroups take part in).
#define GG_IDLE_TAILS 1
// GG_NARROW: a column tile whose output ends within its first 128 columns (n0 + 128 >= n: the
// last column tile where n is not a multiple of 256, e.g. 1408 = 5.5 x 256) multiplies those 128
// columns only (wgmma m64n128k16, its own k-loop copy chosen per tile) instead of 256, half of them
// past the output; the stored bits are the same either way. The 256-column kernels without HALF
// (whose <= 64-row tails are m64n128 already) or ACT (whose tile is 128 gate + 128 up columns).
#define GG_NARROW 2

// The first GEMM's fused activation (`_act` kernels): `out` holds h = x W1 [m, 2 inter] as the
// plain kernel stores it, and a [m, inter] = act(gate, up) * probs[row] is stored at `a`, from
// h's bf16 values with kernels/common.cuh's act_unit (the activation kernel's code: the same bits
// as h through act_fwd_fast). `[gate | up]` halves only (swiglu, swiglu_oai, swiglu_clamped);
// probs may be null (no weighting). Each consumer warpgroup stages its h rows in shared memory as
// the bulk epilogue does, and computes a from them during the next tile's k-steps, a column pair a
// thread between issuing a k-step's wgmmas and waiting for the previous ones (gg_act_pair), so the
// activation's arithmetic runs while the tensor cores work.
struct GgAct {
    u16* a;
    const float* probs;
    ActOpts o;
};

// The first GEMM gathering its rows on load (`_gather` kernels): row r of the expert-major A is
// row `rows_of[r]` of `x` [x_rows, k] (the tokens in their own order: permute's sortedIndices),
// so the permuted copy of the tokens is never made. An index outside [0, x_rows) reads zeros.
// The producer warpgroup's 128 threads copy A's rows with cp.async (16 bytes a thread, 8 threads
// a 128-byte row segment, the 128-byte swizzle by hand, as the TMA would write them); its first
// thread still loads B by TMA. A stage's `full` barrier then takes 129 arrivals: the TMA's
// expect_tx and each copying thread's cp.async.mbarrier.arrive, which the hardware makes once
// the thread's copies have landed (the consumers read the stage after their wait on `full`, as
// for the TMA's bytes).
struct GgGather {
    const u16* x;
    const int* rows_of;
    int x_rows;
};

// EPI_TMA's output: a 3-D tensor map over it ({columns, rows, z}, boxes 64 x 64 x 1, the 128-byte
// swizzle), the z of this launch's tiles' outputs (the weight gradients: the expert), and whether
// the map's bounds end every tile's rows (the weight gradients' [E, KO, N]: rows past KO are
// clipped) or rows past an expert's end belong to the next expert (the token side's [1, M, N]).
struct GgOut {
    const GgTensorMap* map;
    int z;
    bool rows_clipped;
};

#ifdef GG_WGMMA

static __device__ __forceinline__ u32 gg_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// The epilogues' conversion of two accumulators to bf16 (lo in the low half). `Exact`:
// BF16::from_f32 (common.cuh: round to nearest even; a NaN keeps its top payload bits, quieted),
// about eight integer instructions a value. `Fast`: one hardware conversion a pair, the same bits
// for every number (round to nearest even, overflow to infinity, subnormals kept), but a NaN comes
// out as the canonical one: it notes in `nan` that a NaN was met, and the caller then converts
// its values again the exact way. An epilogue converts 128 values a thread while the tensor cores
// wait for it.
struct GgExact {
    __device__ __forceinline__ u32 operator()(float lo, float hi) const { return (u32)BF16::from_f32(lo) | ((u32)BF16::from_f32(hi) << 16); }
};
struct GgFast {
    bool nan = false;
    __device__ __forceinline__ u32 operator()(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        nan |= (lo != lo) | (hi != hi);
        return r;
    }
};

static __device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

static __device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

static __device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `parity` of the barrier has completed.
static __device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}

static __device__ __forceinline__ void tma_load_2d(u32 dst, const GgTensorMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

static __device__ __forceinline__ void tma_load_3d(u32 dst, const GgTensorMap* map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// 16 bytes global -> shared, or (src_bytes 0) 16 zero bytes.
static __device__ __forceinline__ void cp_async_16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
static __device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// An arrival on `bar` once every cp.async this thread issued before has landed (counted as one of
// the barrier's expected arrivals: .noinc).
static __device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

static __device__ __forceinline__ void tma_prefetch(const GgTensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"((u64)map) : "memory");
}

// The 2-CTA cluster kernels (`_mc`): this CTA's rank in its cluster, the cluster's index and
// how many clusters the grid has, a barrier over every thread of the cluster, an arrival on the
// barrier at the same shared-memory offset in CTA `rank` of the cluster (the default .release.cta
// semantics, as a consumer's release of a stage needs: the stage's reads are complete; the first
// run had .release.cluster), and a TMA load written
// to the same offset in every CTA of `mask` (each one's barrier at `bar`'s offset gets the bytes).
static __device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
static __device__ __forceinline__ int cluster_index() {
    u32 r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return (int)r;
}
static __device__ __forceinline__ int cluster_count() {
    u32 r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return (int)r;
}
static __device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}
static __device__ __forceinline__ void mbar_arrive_remote(u32 bar, u32 rank) {
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.shared::cluster.b64 _, [ra];\n}" ::"r"(bar),
                 "r"(rank)
                 : "memory");
}
static __device__ __forceinline__ void tma_load_3d_mc(u32 dst, const GgTensorMap* map, int c0, int c1, int c2, u32 bar, u16 mask) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4}], [%5], %6;" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "h"(mask)
        : "memory");
}

// The epilogue's row copies shared -> global by the TMA engine (bulk copies, no tensor map).
static __device__ __forceinline__ void bulk_store(u64 dst, u32 src, u32 bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// A box from shared memory to the tensor of `map` at {c0, c1, c2} (a bulk group of this thread's).
static __device__ __forceinline__ void tma_store_3d(const GgTensorMap* map, u32 src, int c0, int c1, int c2) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"((u64)map), "r"(c0), "r"(c1), "r"(c2),
                 "r"(src)
                 : "memory");
}
// This thread's bulk copies have read their shared-memory sources.
static __device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
static __device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Generic-proxy shared-memory writes made visible to the async proxy (the bulk copies).
static __device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
static __device__ __forceinline__ void bar_warpgroup(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }

static __device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
static __device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets (PTX ISA, "Matrix Descriptor Format").
static __device__ __forceinline__ u64 gg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) | ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// The operands of a wgmma's accumulators: d[i] .. d[i + 7] and d[i] .. d[i + 63], read and
// written ("+f"); GG_D0_63: the names of the first 64 (%0 .. %63) in the instruction.
#define GG_D8(i) \
    "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define GG_D64(i) GG_D8(i), GG_D8((i) + 8), GG_D8((i) + 16), GG_D8((i) + 24), GG_D8((i) + 32), GG_D8((i) + 40), GG_D8((i) + 48), GG_D8((i) + 56)
#define GG_D0_63 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// D[64 x 128] (+)= A[64 x 16] B[16 x 128]: A, B in shared memory (descriptors), D in 64 f32 registers
template <int TRANS_A, int TRANS_B>
static __device__ __forceinline__ void wgmma_m64n128k16(float* d, u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" GG_D0_63
        "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : GG_D64(0)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// D[64 x 256] (+)= A[64 x 16] B[16 x 256]: A, B in shared memory (descriptors), D in 128 f32 registers
template <int TRANS_A, int TRANS_B>
static __device__ __forceinline__ void wgmma_m64n256k16(float* d, u64 desc_a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" GG_D0_63 ","
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, %131, %132;\n}\n"
        : GG_D64(0), GG_D64(64)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
}

// Where tile t of the launch is: its expert, first row, rows to store and first column.
struct GgTile {
    int e, row0, rows, n0;
};

// The expert of tile t: the last e with tile_start[e] <= t (experts without tiles share the next
// one's start and are passed over).
static __device__ __forceinline__ int gg_expert_of(const int* tile_start, int num_experts, int t) {
    int lo = 0, hi = num_experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_start[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

template <int BN>
static __device__ __forceinline__ GgTile gg_tile(const int* tile_start, const int* row_start, int num_experts, int n_tiles, int m_total,
                                                 int t, int group_n) {
    const int lo = gg_expert_of(tile_start, num_experts, t);
    const int u = t - tile_start[lo];
    const int m_tiles = (tile_start[lo + 1] - tile_start[lo]) / n_tiles;
    const int g = u / (m_tiles * group_n);
    const int u_in = u - g * m_tiles * group_n;
    const int gs = min(group_n, n_tiles - g * group_n);
    GgTile r;
    r.e = lo;
    r.row0 = row_start[lo] + (u_in / gs) * GG_BM;
    r.n0 = (g * group_n + u_in % gs) * BN;
    r.rows = min(min(GG_BM, row_start[lo + 1] - r.row0), m_total - r.row0);
    return r;
}

// The cluster kernels' tile t: each expert's tiles (m_tiles x n_tiles, rounded up to an even
// count: `tile_start` counts them so) in groups of `group_n` column tiles as in gg_tile, but
// within a group row tiles 2j and 2j + 1 of a column come one after the other (a pair of tiles
// t = 2q, 2q + 1 then needs the same B tile, which the two CTAs of a cluster load half each
// and multicast); the rows of a last odd row tile follow one column after another. The padding
// tile (an odd count's last) has n0 = -1.
template <int BN>
static __device__ __forceinline__ GgTile gg_tile_mc(const int* tile_start, const int* row_start, int num_experts, int n_tiles, int m_total,
                                                    int t, int group_n) {
    const int lo = gg_expert_of(tile_start, num_experts, t);
    const int u = t - tile_start[lo];
    const int m_tiles = (row_start[lo + 1] - row_start[lo] + GG_BM - 1) / GG_BM;
    GgTile r;
    r.e = lo;
    if (u >= m_tiles * n_tiles) {
        r.row0 = row_start[lo];
        r.rows = 0;
        r.n0 = -1;
        return r;
    }
    const int g = u / (m_tiles * group_n);
    const int u_in = u - g * m_tiles * group_n;
    const int gs = min(group_n, n_tiles - g * group_n);
    const int paired_rows = m_tiles & ~1;
    int m, nn;
    if (u_in < paired_rows * gs) {
        const int j = u_in / (2 * gs), rem = u_in - j * 2 * gs;
        m = 2 * j + (rem & 1);
        nn = rem >> 1;
    } else {
        m = paired_rows;
        nn = u_in - paired_rows * gs;
    }
    r.row0 = row_start[lo] + m * GG_BM;
    r.n0 = (g * group_n + nn) * BN;
    r.rows = min(min(GG_BM, row_start[lo + 1] - r.row0), m_total - r.row0);
    return r;
}

// Row stride of the epilogue's staging rows (EPI_STAGED, EPI_RING): a row of 256 bf16 plus 16 bytes, so that
// the accumulator layout's stores (8 rows x 4 words a warp) fall in 32 distinct banks.
#define GG_C_ROW 528


// Consumer warpgroup c's part of a 128 x 256 tile as bf16 into `c_smem` (64 rows of GG_C_ROW
// bytes), then one bulk copy per row below `rows` (warp 0 issues them, commits and goes on: the
// copies run while the next tile's k-steps do). Its part: rows 64c .. 64c + 63; or, `half` (a
// tile of at most 64 rows: the warpgroups split the columns), rows 0 .. 63 and columns
// 128c .. 128c + 127 (acc[0 .. 63]). `dst` is the tile's first element, `n` the output's row
// length, `n_left` the output's columns from the tile's first.
// (the bf16 values alone: gg_stage_write)
template <class Convert>
static __device__ __forceinline__ void gg_stage_values(const float* acc, u32 c_smem, int warp, int lane, bool half, Convert& convert) {
    const int r_loc = warp * 16 + (lane >> 2);
    const int jn = half ? 16 : 32;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        if (j < jn) {
            const u32 col = 8 * j + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 v = convert(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                asm volatile("st.shared.u32 [%0], %1;" ::"r"(c_smem + (r_loc + 8 * h) * GG_C_ROW + col * 2), "r"(v) : "memory");
            }
        }
    }
}

static __device__ __forceinline__ void gg_stage_write(const float* acc, u32 c_smem, int warp, int lane, bool half) {
    GgFast fast;
    gg_stage_values(acc, c_smem, warp, lane, half, fast);
    if (fast.nan) {
        // (a NaN among this thread's values: all of them again, the exact way)
        GgExact exact;
        gg_stage_values(acc, c_smem, warp, lane, half, exact);
    }
}

// EPI_TMA's staging: consumer warpgroup's 64 x 256 bf16 values as four 64 x 64 boxes of 8 KiB,
// row r's 16-byte piece p at r * 128 + 16 (p ^ r % 8) (the TMA's 128-byte swizzle; the 8 rows of
// a warp's store then fall in distinct banks).
template <class Convert>
static __device__ __forceinline__ void gg_stage_swizzled(const float* acc, u32 c_smem, int warp, int lane, Convert& convert) {
    const int r0 = warp * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const u32 piece = (u32)((j & 7) ^ (r0 & 7));
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u32 at = c_smem + (u32)(j >> 3) * 8192u + (u32)(r0 + 8 * h) * 128u + (piece << 4) + 4u * (u32)(lane & 3);
            asm volatile("st.shared.u32 [%0], %1;" ::"r"(at), "r"(convert(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1])) : "memory");
        }
    }
}

static __device__ __forceinline__ void gg_stage_rows(const float* acc, u32 c_smem, int c, int warp, int lane, int rows, u64 dst, int n,
                                                     int n_left, bool half) {
    gg_stage_write(acc, c_smem, warp, lane, half);
    fence_async_shared();
    bar_warpgroup(1 + c);
    if (warp == 0) {
        const int row0 = half ? 0 : 64 * c, col0 = half ? 128 * c : 0;
        const int cols = min(half ? 128 : 256, n_left - col0);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = lane + 32 * i;
            if (row0 + r < rows && cols > 0)
                bulk_store(dst + ((u64)(row0 + r) * (u64)n + (u64)col0) * 2, c_smem + r * GG_C_ROW, (u32)cols * 2);
        }
        bulk_commit();
    }
}

// The block's dynamic shared memory: the stages on a 1024-byte boundary (the 128-byte
// swizzle's period), the epilogue's staging buffers (C_BYTES), then the barriers (full[STAGES],
// empty[STAGES]) and the per-expert offsets (at `bars + 2 * STAGES`).
struct GgShared {
    u32 base;  // the first stage's shared address
    u64* bars;
    u32 full0, empty0;  // the shared addresses of full[0] and empty[0]
    u32 peer;  // the cluster kernels: the other CTA's rank (its consumers release our stages too); else ~0
};

template <int STAGES, u32 STAGE_BYTES, u32 C_BYTES>
static __device__ __forceinline__ GgShared gg_shared_layout() {
    extern __shared__ __align__(1024) u8 gg_shared[];
    const u32 raw = gg_smem(gg_shared);
    GgShared sh;
    sh.base = (raw + 1023u) & ~1023u;
    sh.bars = (u64*)(gg_shared + (sh.base - raw) + STAGES * STAGE_BYTES + C_BYTES);
    sh.full0 = gg_smem(sh.bars);
    sh.empty0 = sh.full0 + 8 * STAGES;
    sh.peer = ~0u;
    return sh;
}

// One thread: the stages' barriers initialised and made visible. `empty` takes one arrival per
// consumer warp: 8, or 16 in a 2-CTA cluster (the stage is written by both CTAs' loads); `full`
// one (the TMA's expect_tx), or `full_arrivals` (the gather kernels: 129).
template <int STAGES>
static __device__ __forceinline__ void gg_init_barriers(const GgShared& sh, u32 consumer_warps = 8, u32 full_arrivals = 1) {
    for (int s = 0; s < STAGES; s++) {
        mbar_init(sh.full0 + 8 * s, full_arrivals);
        mbar_init(sh.empty0 + 8 * s, consumer_warps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// A position in the ring of stages: the stage and the parity of its current phase.
template <int STAGES>
struct GgRing {
    int stage = 0;
    u32 phase = 0;
    __device__ __forceinline__ void advance() {
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// The producer's k-steps of one tile: for each, waits until the ring's stage is free, arms its
// `full` barrier for the stage's bytes and calls `load(kb, full, a_dst, b_dst)` to issue the
// TMA loads of k-step kb into the stage's A and B parts.
template <int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class Load>
static __device__ __forceinline__ void gg_produce(const GgShared& sh, GgRing<STAGES>& ring, int num_kb, Load load) {
    for (int kb = 0; kb < num_kb; kb++) {
        const u32 full = sh.full0 + 8 * ring.stage;
        mbar_wait(sh.empty0 + 8 * ring.stage, ring.phase ^ 1);
        mbar_expect_tx(full, STAGE_BYTES);
        const u32 a_dst = sh.base + ring.stage * STAGE_BYTES, b_dst = a_dst + A_BYTES;
        load(kb, full, a_dst, b_dst);
        ring.advance();
    }
}

// EPI_RING, the producer after a tile's k-steps: the next two stages go to the consumers'
// epilogue once they are free (an arrival without bytes completes their `full` phase).
template <int STAGES>
static __device__ __forceinline__ void gg_skip_for_epilogue(const GgShared& sh, GgRing<STAGES>& ring) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mbar_wait(sh.empty0 + 8 * ring.stage, ring.phase ^ 1);
        mbar_arrive(sh.full0 + 8 * ring.stage);
        ring.advance();
    }
}

// One tile's k-steps in the gather kernels, by every thread of the producer warpgroup (`ptid`
// 0 .. 127): thread ptid copies the 16 bytes at column 8 (ptid % 8) of a k-step's 64 columns of
// tile rows ptid / 8 + 16 i (i < 8; so a warp's copy instruction reads four whole 128-byte row
// segments) from x's row rows_of[row0 + r] to where the TMA's 128-byte swizzle would put them
// (the 16-byte piece c of row r at r * 128 + 16 (c ^ r % 8)); rows past the tile's `rows`, an
// index outside x and columns past k are zeros. Thread 0 also arms the stage's `full` barrier
// for B's bytes and calls `load_b(kb, full, b_dst)` to issue B's TMA loads. Each thread's
// copies arrive on the stage's `full` barrier when they land (cp.async.mbarrier.arrive), so the
// producer never waits for them: it runs ahead of the consumers as far as the stages allow, as
// the TMA's producer does.
template <int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class LoadB>
static __device__ __forceinline__ void gg_produce_gather(const GgShared& sh, GgRing<STAGES>& ring, const GgGather& g, const GgTile& tl,
                                                         int k, int num_kb, int ptid, LoadB load_b) {
    const int chunk = ptid & 7, r0 = ptid >> 3;
    const u32 swizzled = (u32)((chunk ^ (r0 & 7)) << 4);
    // each row's start in x in 16-byte pieces (x < 64 GiB: grouped_gemm.rs checks), or ~0: zeros
    u32 src[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int r = r0 + 16 * i;
        const int s = r < tl.rows ? __ldg(g.rows_of + tl.row0 + r) : -1;
        src[i] = (unsigned)s < (unsigned)g.x_rows ? (u32)s * (u32)(k >> 3) : ~0u;
    }
    const uint4* x = (const uint4*)g.x;
    for (int kb = 0; kb < num_kb; kb++) {
        const u32 full = sh.full0 + 8 * ring.stage;
        mbar_wait(sh.empty0 + 8 * ring.stage, ring.phase ^ 1);
        const u32 a_dst = sh.base + ring.stage * STAGE_BYTES;
        if (ptid == 0) {
            mbar_expect_tx(full, STAGE_BYTES - A_BYTES);
            load_b(kb, full, a_dst + A_BYTES);
        }
        const u32 piece = (u32)(kb * (GG_BK / 8) + chunk);
        const bool in_k = 8 * (int)piece < k;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const bool ok = in_k && src[i] != ~0u;
            cp_async_16(a_dst + (u32)(r0 + 16 * i) * 128u + swizzled, x + (ok ? src[i] + piece : 0u), ok ? 16u : 0u);
        }
        cp_async_arrive(full);
        ring.advance();
    }
}

// A consumer warp: which warpgroup and lane it is, and (EPI_RING, warp 0 of a warpgroup) the
// stage its last epilogue's bulk copies read from, -1 if none: it goes back to the producer
// once the copies have read it, after the next tile's first wgmmas are issued.
struct GgWarp {
    int c, warp, lane;
    int pending = -1;
};

// A consumer warp gives stage `prev` (if any) back to the producer, and in a cluster to the
// other CTA's producer too (whose multicast loads write our stage; our own arrival first).
static __device__ __forceinline__ void gg_release(const GgShared& sh, int prev, int lane) {
    if (prev >= 0) {
        __syncwarp();
        if (lane == 0) {
            mbar_arrive(sh.empty0 + 8 * prev);
            if (sh.peer != ~0u) mbar_arrive_remote(sh.empty0 + 8 * prev, sh.peer);
        }
    }
}

// The stage of the warp's last bulk copies (if any) back to the producer once they have read it.
static __device__ __forceinline__ void gg_release_pending(const GgShared& sh, GgWarp& w) {
    if (w.pending >= 0) {
        bulk_wait_read();
        gg_release(sh, w.pending, w.lane);
        w.pending = -1;
    }
}

// Consumer warpgroup w.c's k-steps of one tile: for each, waits for the ring's stage to be full
// and calls `mma(kb, a_addr, b_addr)` (the warpgroup's A part: 64 rows, 8 KiB; B) to issue its
// wgmmas, then `beside(kb)` (work of the warpgroup's own while they run: none by default);
// once the next k-step's group is issued, the previous stage goes back to the producer.
// On return every wgmma has completed and every stage is released (the pending one too).
struct GgNothing {
    __device__ __forceinline__ void operator()(int) const {}
};

// One k-step of a consumer warpgroup: `mma(kb, a_addr, b_addr)` issues its wgmmas, then
// `beside(kb)`; `prev` is the stage given back once this k-step's group is issued.
template <int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class Mma, class Beside>
static __device__ __forceinline__ void gg_consume_step(const GgShared& sh, GgRing<STAGES>& ring, int kb, int& prev, GgWarp& w, Mma mma,
                                                       Beside beside) {
    mbar_wait(sh.full0 + 8 * ring.stage, ring.phase);
    const u32 a_addr = sh.base + ring.stage * STAGE_BYTES + w.c * (64 * 128);
    const u32 b_addr = sh.base + ring.stage * STAGE_BYTES + A_BYTES;
    mma(kb, a_addr, b_addr);
    wgmma_commit();
    if (kb == 0) gg_release_pending(sh, w);
    beside(kb);
    // the previous k-step's group is done: its stage goes back to the producer
    wgmma_wait<1>();
    gg_release(sh, prev, w.lane);
    prev = ring.stage;
    ring.advance();
}

template <int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class Mma, class Beside = GgNothing>
static __device__ __forceinline__ void gg_consume(const GgShared& sh, GgRing<STAGES>& ring, int num_kb, GgWarp& w, Mma mma,
                                                  Beside beside = GgNothing()) {
    int prev = -1;
    for (int kb = 0; kb < num_kb; kb++) gg_consume_step<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, kb, prev, w, mma, beside);
    wgmma_wait<0>();
    gg_release(sh, prev, w.lane);
    gg_release_pending(sh, w);
}

// A consumer warpgroup with no rows in a tile (GG_IDLE_TAILS): each k-step's stage given back
// once it is full (not before: an early arrival would count towards the stage's next use), no
// wgmma; the other warpgroup's k-steps then have the tensor cores to themselves.
template <int STAGES>
static __device__ __forceinline__ void gg_pass(const GgShared& sh, GgRing<STAGES>& ring, int num_kb, GgWarp& w) {
    for (int kb = 0; kb < num_kb; kb++) {
        mbar_wait(sh.full0 + 8 * ring.stage, ring.phase);
        gg_release(sh, ring.stage, w.lane);
        ring.advance();
    }
    gg_release_pending(sh, w);
}

// gg_consume whose last k-step's wgmmas `last(kb, a_addr, b_addr)` issues (num_kb >= 1): the loop
// runs the others (`mma`), the last is peeled after it, so that a caller choosing between
// versions with different `last`s branches outside the loop, where each path has a fixed count of
// wgmmas (a count chosen inside the loop, by a variable-length loop or predicated wgmmas, gets
// every wgmma of the kernel serialised: C7520).
template <int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class Mma, class Last>
static __device__ __forceinline__ void gg_consume_peeled(const GgShared& sh, GgRing<STAGES>& ring, int num_kb, GgWarp& w, Mma mma,
                                                         Last last) {
    int prev = -1;
    for (int kb = 0; kb + 1 < num_kb; kb++) gg_consume_step<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, kb, prev, w, mma, GgNothing());
    gg_consume_step<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb - 1, prev, w, last, GgNothing());
    wgmma_wait<0>();
    gg_release(sh, prev, w.lane);
    gg_release_pending(sh, w);
}

// EPI_REG's stores: consumer warpgroup w.c's accumulators straight from the registers (as
// gg_epilogue describes), bf16 values converted by `convert` (GgFast, GgExact).
template <int BN, bool OUT_F32, class Convert>
static __device__ __forceinline__ void gg_store_values(const float* acc, void* out, long long plane, int row0, int rows, int n0, int n,
                                                       const GgWarp& w, Convert& convert) {
    const int r_base = w.c * 64 + w.warp * 16 + (w.lane >> 2);
    const int col_base = n0 + 2 * (w.lane & 3);
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
        const int col = col_base + 8 * j;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = r_base + 8 * h;
            if (col < n && r < rows) {
                const long long o = plane + (long long)(row0 + r) * n + col;
                const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
                if constexpr (OUT_F32) {
                    *(float2*)((float*)out + o) = make_float2(v0, v1);
                } else {
                    *(u32*)((u16*)out + o) = convert(v0, v1);
                }
            }
        }
    }
}

// The epilogue of consumer warpgroup w.c: its 64 x BN accumulators stored as rows row0 + 64c ..
// row0 + 64c + 63 (those below `rows`, counted from row0), columns n0 .. n0 + BN - 1 (those
// below n) of the [., n] row-major output that starts `plane` elements into `out`: straight from
// the registers (EPI_REG), or through shared memory and bulk copies (gg_stage_rows): the
// staging buffer after the stages (EPI_STAGED, `staged`: the first warpgroup's), or the two
// stages that follow the tile's k-steps in the ring (EPI_RING: one a warpgroup; the other goes
// back to the producer at once, this one when the copies have read it).
// The accumulator layout of m64nNk16: acc[4j + 2h + {0,1}] is row 16 warp + lane / 4 + 8h,
// columns 8j + 2 (lane % 4) + {0, 1}.
// EPI_TMA: `to` (GgOut) the output's tensor map.
template <int BN, bool OUT_F32, int EPI, int STAGES, u32 STAGE_BYTES>
static __device__ __forceinline__ void gg_epilogue(const float* acc, void* out, long long plane, int row0, int rows, int n0, int n,
                                                   const GgShared& sh, GgRing<STAGES>& ring, GgWarp& w, bool half = false,
                                                   const GgOut* to = nullptr) {
    const int c = w.c, warp = w.warp, lane = w.lane;
    const u64 dst = (u64)out + ((u64)plane + (u64)row0 * (u64)n + (u64)n0) * 2;
    if constexpr (EPI == GG_EPI_TMA) {
        // (the branches are the warpgroup's: its rows, or the launch's map)
        if (rows <= 64 * c) return;  // none of the tile's rows are this warpgroup's (a weight gradient's last row tile, a tail)
        const u32 c_smem = sh.base + STAGES * STAGE_BYTES + c * 32768u;
        if (warp == 0) bulk_wait_read();  // the previous tile's stores have read the buffer
        bar_warpgroup(1 + c);
        GgFast fast;
        gg_stage_swizzled(acc, c_smem, warp, lane, fast);
        if (fast.nan) {
            GgExact exact;
            gg_stage_swizzled(acc, c_smem, warp, lane, exact);
        }
        if (to->rows_clipped || rows >= 64 * c + 64) {
            fence_async_shared();
            bar_warpgroup(1 + c);
            if (warp == 0 && lane == 0) {
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    if (n0 + 64 * b < n) tma_store_3d(to->map, c_smem + b * 8192u, n0 + 64 * b, row0 + 64 * c, to->z);
                }
                bulk_commit();
            }
            return;
        }
        // the rows end inside this warpgroup's 64 (an expert's last tile; the rows after belong to
        // the next expert, which a tensor store of the whole box would overwrite): a warp writes a
        // staged row at a time, 16 bytes a lane (512 contiguous bytes), read out of the swizzle.
        // The register stores this replaces wrote 4 bytes a lane, 8 rows a warp instruction.
        bar_warpgroup(1 + c);
        const int mine = rows - 64 * c;
        const int tid = 32 * warp + lane;
        for (int i = tid; i < mine * 32; i += 128) {
            const int r = i >> 5, chunk = i & 31;  // 16-byte piece `chunk` (8 columns) of row r
            if (n0 + 8 * chunk >= n) continue;
            const u32 at = c_smem + (u32)(chunk >> 3) * 8192u + (u32)r * 128u + ((u32)((chunk & 7) ^ (r & 7)) << 4);
            uint4 v;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(at));
            *(uint4*)(dst + ((u64)(64 * c + r) * (u64)n + (u64)(8 * chunk)) * 2) = v;
        }
        return;
    }
    if constexpr (EPI == GG_EPI_STAGED) {
        const u32 c_smem = sh.base + STAGES * STAGE_BYTES + c * (64 * GG_C_ROW);
        if (warp == 0) bulk_wait_read();  // the previous tile's copies have read the buffer
        bar_warpgroup(1 + c);
        gg_stage_rows(acc, c_smem, c, warp, lane, rows, dst, n, n - n0, false);
        return;
    }
    if constexpr (EPI == GG_EPI_RING) {
        // waiting for the producer's arrivals also orders this warp's releases after every
        // warp's release of the stages' previous use
        int mine = -1, other = -1;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mbar_wait(sh.full0 + 8 * ring.stage, ring.phase);
            if (i == c) mine = ring.stage; else other = ring.stage;
            ring.advance();
        }
        gg_release(sh, other, lane);
        gg_stage_rows(acc, sh.base + mine * STAGE_BYTES, c, warp, lane, rows, dst, n, n - n0, half);
        if (warp == 0) w.pending = mine;
        else gg_release(sh, mine, lane);
        return;
    }
    GgFast fast;
    gg_store_values<BN, OUT_F32>(acc, out, plane, row0, rows, n0, n, w, fast);
    if (!OUT_F32 && fast.nan) {
        // (a NaN among this thread's values: all of them again, the exact way)
        GgExact exact;
        gg_store_values<BN, OUT_F32>(acc, out, plane, row0, rows, n0, n, w, exact);
    }
}

// The fused activation's epilogue of consumer warpgroup w.c (GgAct): its accumulators are the
// gate columns n0 .. n0 + 127 and the up columns inter + n0 .. of its 64 rows (tile columns 0 ..
// 127 and 128 .. 255), staged as bf16 in its buffer after the stages once its previous copies
// have read the buffer and every thread has done with the previous tile's rows there (the
// barrier); then h's two halves of each row copied out (warp 0, bulk copies). `n` is inter.
static __device__ __forceinline__ void gg_epilogue_act(const float* acc, u16* h, u32 c_smem, int row0, int rows, int n0, int n, const GgWarp& w) {
    if (w.warp == 0) bulk_wait_read();
    bar_warpgroup(1 + w.c);
    gg_stage_write(acc, c_smem, w.warp, w.lane, false);
    fence_async_shared();
    bar_warpgroup(1 + w.c);
    if (w.warp == 0) {
        const int cols = min(128, n - n0);
        const u64 dst = (u64)h + ((u64)row0 * (u64)(2 * n) + (u64)n0) * 2;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = w.lane + 32 * i;
            if (64 * w.c + r < rows && cols > 0) {
                const u64 row = dst + (u64)(64 * w.c + r) * (u64)(4 * n);
                bulk_store(row, c_smem + r * GG_C_ROW, (u32)cols * 2);
                bulk_store(row + (u64)n * 2, c_smem + r * GG_C_ROW + 256, (u32)cols * 2);
            }
        }
        bulk_commit();
    }
}

// A consumer warpgroup's staged tile whose `a` is still to compute: its rows row0 .. row0 +
// rows - 1 (rows <= 0: none), output columns n0 .. (gg_act_pair).
struct GgActTile {
    int row0, rows, n0;
};

// Item j (0 .. 31) of the activation of warpgroup-staged tile `t`: thread `tid` (0 .. 127) takes
// column pair p = tid + 128 j, row p / 64, columns 2 (p % 64) and + 1 of the tile's 128, from the
// staged bf16 gate (columns 0 .. 127 of the staged row) and up (128 .. 255) values; a = act(gate,
// up) * probs[row] (act_unit, as the activation kernel) stored as a bf16 pair (a warp's 32 pairs are
// one row's 128 contiguous bytes).
static __device__ __forceinline__ void gg_act_pair(const GgAct& act, u32 c_smem, const GgActTile& t, int n, int j, int tid) {
    const int p = tid + 128 * j, r = p >> 6, col = 2 * (p & 63);
    if (r >= t.rows || col >= n - t.n0) return;
    u32 g, u;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(g) : "r"(c_smem + r * GG_C_ROW + col * 2));
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(u) : "r"(c_smem + r * GG_C_ROW + 256 + col * 2));
    const long long row = (long long)(t.row0 + r);
    const float a0 = act_unit(act.o, BF16::to_f32((u16)(g & 0xffffu)), BF16::to_f32((u16)(u & 0xffffu)));
    const float a1 = act_unit(act.o, BF16::to_f32((u16)(g >> 16)), BF16::to_f32((u16)(u >> 16)));
    u16 b0, b1;
    if (act.probs != nullptr) {
        const float pr = __ldg(act.probs + row);
        b0 = BF16::from_f32(a0 * pr);
        b1 = BF16::from_f32(a1 * pr);
    } else {
        b0 = BF16::from_f32(a0);
        b1 = BF16::from_f32(a1);
    }
    *(u32*)(act.a + row * n + t.n0 + col) = (u32)b0 | ((u32)b1 << 16);
}

// One k-step of a warpgroup's wgmmas: D[64 x N] (+)= A[64 x 64] B[64 x N], A K-major at a_addr
// (its 64 rows of 128 bytes), B at b_addr: K-major rows of 64 k values (128 bytes), 8-row groups
// 1024 bytes apart; or N-major rows of 64 n values, one 8 KiB box per 64 columns (LBO), 8-row (k)
// groups 1024 bytes apart (SBO), a k-step of 16 rows = 2048 bytes. The first k-step overwrites D.
template <int N, bool B_KMAJOR>
static __device__ __forceinline__ void gg_mma_step(float* acc, int kb, u32 a_addr, u32 b_addr) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < GG_BK / 16; ks++) {
        const u64 da = gg_desc(a_addr + ks * 32, 16, 1024);
        const u64 db = B_KMAJOR ? gg_desc(b_addr + ks * 32, 16, 1024) : gg_desc(b_addr + ks * 2048, 8192, 1024);
        const int accumulate = (kb > 0 || ks > 0) ? 1 : 0;
        if constexpr (N == 256) wgmma_m64n256k16<0, B_KMAJOR ? 0 : 1>(acc, da, db, accumulate);
        else wgmma_m64n128k16<0, B_KMAJOR ? 0 : 1>(acc, da, db, accumulate);
    }
}

// HALF (EPI_RING only): a tile of at most 64 rows (an expert's last) is multiplied as two
// 64 x 128 halves, one a warpgroup (wgmma m64n128k16), instead of 128 x 256 with the second
// warpgroup's rows thrown away.
// MC (a launch in clusters of 2 CTAs, BN = 256): the cluster takes pairs of tiles (gg_tile_mc's
// order), one a CTA; where the two need the same B tile (rows 2j and 2j + 1 of a column of one
// expert, or the padding tile), each CTA's producer loads half of it and multicasts it to both,
// so each loads 32 KiB of a 48 KiB stage from L2 instead of 48; else each loads its own. The
// two CTAs go through the same stages in step: every stage is released by the consumers of both
// (16 arrivals), and neither CTA exits before the other is done with its shared memory.
template <int BN, bool B_KMAJOR, bool OUT_F32, int STAGES, int EPI, bool HALF = false, bool MC = false, bool ACT = false,
          bool GATHER = false>
static __device__ __forceinline__ void gg_body(const GgTensorMap* map_a, const GgTensorMap* map_b, void* out, const int* counts,
                                               int num_experts, int m_total, int n, int k, int group_n, int flags, const GgAct* act = nullptr,
                                               const GgGather* gather = nullptr, const GgOut* to = nullptr) {
    constexpr u32 A_BYTES = GG_BM * GG_BK * 2;
    constexpr u32 B_BYTES = BN * GG_BK * 2;
    constexpr u32 STAGE_BYTES = A_BYTES + B_BYTES;
    // EPI_STAGED: each consumer warpgroup's 64 x BN output rows staged after the stages
    constexpr u32 C_BYTES = EPI == GG_EPI_STAGED ? 2 * 64 * GG_C_ROW : EPI == GG_EPI_TMA ? 2 * 32768 : 0;
    static_assert(EPI == GG_EPI_REG || (BN == 256 && !OUT_F32), "the bulk epilogues are for 256-column bf16 tiles");
    static_assert(EPI != GG_EPI_TMA || (!HALF && !MC && !ACT), "the TMA-store epilogue: the plain and gathering kernels");
    static_assert(!MC || (BN == 256 && !HALF), "the cluster kernels have 256-column tiles");
    static_assert(!ACT || (BN == 256 && !B_KMAJOR && !OUT_F32 && EPI == GG_EPI_STAGED && !HALF && !MC),
                  "the fused activation: x W1, 128 x 256 tiles, the staged epilogue");
    static_assert(!ACT || GG_BM * BN / 2 / 2 == 32 * 256, "the fused activation: 32 column pairs a consumer thread a tile");
    static_assert(!GATHER || (BN == 256 && !B_KMAJOR && !OUT_F32 && (EPI == GG_EPI_STAGED || EPI == GG_EPI_TMA) && !HALF && !MC && !ACT),
                  "the gather on load: x W1, 128 x 256 tiles, the staged or TMA-store epilogue");
    // (ACT: a tile's 256 accumulator columns are 128 gate and 128 up columns; `n` is inter, the
    // output's columns, and tiles step over it 128 at a time)
    constexpr int TN = ACT ? BN / 2 : BN;
    // (GG_IDLE_TAILS: the kernels whose warpgroups' epilogues are their own)
    constexpr bool IDLE_TAILS = !HALF && !MC && !ACT && EPI != GG_EPI_RING;
    // (GG_NARROW: the 256-column kernels whose tiles' columns are the output's)
    constexpr bool NARROW = BN == 256 && !HALF && !ACT;
    GgShared sh = gg_shared_layout<STAGES, STAGE_BYTES, C_BYTES>();
    const u32 rank = MC ? cluster_rank() : 0;
    if constexpr (MC) sh.peer = rank ^ 1u;
    int* tile_start = (int*)(sh.bars + 2 * STAGES);
    int* row_start = tile_start + num_experts + 1;
    const int n_tiles = (n + TN - 1) / TN;

    // counts -> row offsets and tile offsets (exclusive prefix sums, in chunks of the block)
    int rows_carry = 0, tiles_carry = 0;
    for (int c0 = 0; c0 < num_experts; c0 += GG_THREADS) {
        const int e = c0 + (int)threadIdx.x;
        const int cnt = e < num_experts ? max(__ldg(counts + e), 0) : 0;
        int tiles = (cnt + GG_BM - 1) / GG_BM * n_tiles;
        if constexpr (MC) tiles = (tiles + 1) & ~1;  // (gg_tile_mc: pairs never straddle experts)
        int rows_total, tiles_total;
        const int r = block_exclusive_scan(cnt, &rows_total);
        const int t = block_exclusive_scan(tiles, &tiles_total);
        if (e < num_experts) {
            row_start[e] = rows_carry + r;
            tile_start[e] = tiles_carry + t;
        }
        rows_carry += rows_total;
        tiles_carry += tiles_total;
    }
    if (threadIdx.x == 0) {
        row_start[num_experts] = rows_carry;
        tile_start[num_experts] = tiles_carry;
        gg_init_barriers<STAGES>(sh, MC ? 16 : 8, GATHER ? 129 : 1);
    }
    __syncthreads();
    // (the cluster kernels: the other CTA's barriers are initialised before any arrival or load)
    if constexpr (MC) cluster_sync();

    const int num_kb = (k + GG_BK - 1) / GG_BK;
    const int total = tile_start[num_experts];
    // the block's work items: its tiles, or (MC) its cluster's pairs of tiles, of which it takes
    // tile 2q + rank; `paired`: both need the same B tile
    const int first = MC ? cluster_index() : (int)blockIdx.x, step = MC ? cluster_count() : (int)gridDim.x;
    const int items = MC ? total / 2 : total;
    auto tile_of = [&](int q, bool* paired) {
        if constexpr (MC) {
            GgTile t0 = gg_tile_mc<BN>(tile_start, row_start, num_experts, n_tiles, m_total, 2 * q, group_n);
            GgTile t1 = gg_tile_mc<BN>(tile_start, row_start, num_experts, n_tiles, m_total, 2 * q + 1, group_n);
            if (t1.n0 < 0) {
                // the padding tile: tile 2q's rows again, nothing stored
                t1 = t0;
                t1.rows = 0;
            }
            *paired = t0.e == t1.e && t0.n0 == t1.n0;
            return rank ? t1 : t0;
        } else {
            *paired = false;
            return gg_tile<TN>(tile_start, row_start, num_experts, n_tiles, m_total, q, group_n);
        }
    };
    const int wg = (int)threadIdx.x / 128;
    if (wg == 0) {
        // the producer: one thread issues every TMA load (GATHER: every thread of the warpgroup
        // copies A's rows, the first also loads B)
        if constexpr (BN == 256) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        // B's k-step kb of tile tl into b_dst, by TMA
        auto load_b = [&](const GgTile& tl, bool paired, int kb, u32 full, u32 b_dst) {
            if constexpr (MC) {
                // B in halves of 128 columns (MC's `nt` map: boxes of 64 k x 128 n)
                const u16 both = 3;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (paired && h != (int)rank) continue;  // the other CTA loads this half
                    const u32 dst = b_dst + h * 16384;
                    if constexpr (B_KMAJOR) {
                        if (paired) tma_load_3d_mc(dst, map_b, kb * GG_BK, tl.n0 + 128 * h, tl.e, full, both);
                        else tma_load_3d(dst, map_b, kb * GG_BK, tl.n0 + 128 * h, tl.e, full);
                    } else {
#pragma unroll
                        for (int j = 0; j < 2; j++) {
                            const int n0 = tl.n0 + 128 * h + 64 * j;
                            if (paired) tma_load_3d_mc(dst + j * 8192, map_b, n0, kb * GG_BK, tl.e, full, both);
                            else tma_load_3d(dst + j * 8192, map_b, n0, kb * GG_BK, tl.e, full);
                        }
                    }
                }
            } else if constexpr (B_KMAJOR) {
                tma_load_3d(b_dst, map_b, kb * GG_BK, tl.n0, tl.e, full);
            } else {
#pragma unroll
                for (int j = 0; j < BN / 64; j++) {
                    // (ACT: the gate columns n0 .., then the up columns inter + n0 ..)
                    const int col = ACT ? (j < BN / 128 ? tl.n0 + 64 * j : n + tl.n0 + 64 * (j - BN / 128)) : tl.n0 + 64 * j;
                    tma_load_3d(b_dst + j * 8192, map_b, col, kb * GG_BK, tl.e, full);
                }
            }
        };
        if constexpr (GATHER) {
            // every producer thread copies A's rows; the first also loads B
            const int ptid = (int)threadIdx.x;
            if (ptid == 0) tma_prefetch(map_b);
            GgRing<STAGES> ring;
            for (int q = first; q < items; q += step) {
                bool paired;
                const GgTile tl = tile_of(q, &paired);
                gg_produce_gather<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, *gather, tl, k, num_kb, ptid,
                                                                [&](int kb, u32 full, u32 b_dst) { load_b(tl, paired, kb, full, b_dst); });
            }
            cp_async_wait_all();
        } else if (threadIdx.x == 0) {
            tma_prefetch(map_a);
            tma_prefetch(map_b);
            GgRing<STAGES> ring;
            for (int q = first; q < items; q += step) {
                bool paired;
                const GgTile tl = tile_of(q, &paired);
                gg_produce<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, [&](int kb, u32 full, u32 a_dst, u32 b_dst) {
                    tma_load_2d(a_dst, map_a, kb * GG_BK, tl.row0, full);
                    load_b(tl, paired, kb, full, b_dst);
                });
                if constexpr (EPI == GG_EPI_RING) gg_skip_for_epilogue<STAGES>(sh, ring);
            }
        }
    } else {
        // the consumers: warpgroup c multiplies rows 64c .. 64c + 63 of each tile
        if constexpr (BN == 256) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int c = wg - 1;
        const int tid = (int)threadIdx.x - 128 * wg;
        GgWarp w{c, tid >> 5, tid & 31};
        float acc[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; i++) acc[i] = 0.0f;
        GgRing<STAGES> ring;
        // (ACT: this warpgroup's staged tile whose `a` is computed during the next tile's k-steps)
        const u32 c_smem = sh.base + STAGES * STAGE_BYTES + c * (64 * GG_C_ROW);
        GgActTile pend{0, 0, 0};
        for (int q = first; q < items; q += step) {
            bool paired;
            const GgTile tl = tile_of(q, &paired);
            // (two separate k-loops: a wgmma under a branch inside one loop gets serialised, C7520)
            const bool half = HALF && tl.rows <= 64;
            const bool narrow = NARROW && (flags & GG_NARROW) && tl.n0 + 128 >= n;
            if (IDLE_TAILS && c == 1 && tl.rows <= 64 && (flags & GG_IDLE_TAILS)) {
                // none of the tile's rows are this warpgroup's: its stages pass by unread, nothing stored
                gg_pass<STAGES>(sh, ring, num_kb, w);
                continue;
            }
            if (half) {
                // both warpgroups: the first 64 rows of A; B's columns 128c .. 128c + 127 (16 KiB
                // on: 128 K-major rows, or two 64-column boxes)
                gg_consume<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, [&](int kb, u32 a_addr, u32 b_addr) {
                    gg_mma_step<128, B_KMAJOR>(acc, kb, a_addr - c * (64 * 128), b_addr + c * 16384);
                });
            } else if (narrow) {
                // the output's last columns, at most 128 of them: m64n128k16 on B's first 128
                // columns (its first 128 K-major rows, or its first two 64-column boxes); the
                // accumulators of the columns past the output zeroed (not stored, but stale NaNs
                // there would send the epilogue's conversion down its exact path)
                gg_consume<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w,
                                                         [&](int kb, u32 a_addr, u32 b_addr) { gg_mma_step<128, B_KMAJOR>(acc, kb, a_addr, b_addr); });
                if constexpr (NARROW) {
#pragma unroll
                    for (int i = BN / 4; i < BN / 2; i++) acc[i] = 0.0f;
                }
            } else if constexpr (ACT) {
                // (the previous tile's activation, a column pair a thread a k-step, while the wgmmas run)
                gg_consume<STAGES, A_BYTES, STAGE_BYTES>(
                    sh, ring, num_kb, w, [&](int kb, u32 a_addr, u32 b_addr) { gg_mma_step<BN, B_KMAJOR>(acc, kb, a_addr, b_addr); },
                    [&](int kb) {
                        if (kb < 32) gg_act_pair(*act, c_smem, pend, n, kb, tid);
                    });
            } else {
                gg_consume<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w,
                                                         [&](int kb, u32 a_addr, u32 b_addr) { gg_mma_step<BN, B_KMAJOR>(acc, kb, a_addr, b_addr); });
            }
            if constexpr (ACT) {
                // (what the k-steps left of the previous tile's activation, before its rows are overwritten)
                for (int j = num_kb; j < 32; j++) gg_act_pair(*act, c_smem, pend, n, j, tid);
                gg_epilogue_act(acc, (u16*)out, c_smem, tl.row0, tl.rows, tl.n0, n, w);
                pend = GgActTile{tl.row0 + 64 * c, min(64, tl.rows - 64 * c), tl.n0};
            } else {
                gg_epilogue<BN, OUT_F32, EPI, STAGES, STAGE_BYTES>(acc, out, 0, tl.row0, tl.rows, tl.n0, n, sh, ring, w, half, to);
            }
        }
        // (ACT: the last tile's activation)
        if constexpr (ACT) {
            for (int j = 0; j < 32; j++) gg_act_pair(*act, c_smem, pend, n, j, tid);
        }
        if constexpr (EPI != GG_EPI_REG) {
            if (w.warp == 0) bulk_wait_all();
        }
    }
    // (every thread: the other CTA's loads into this one's stages and its consumers' arrivals on
    // this one's barriers are over before either exits)
    if constexpr (MC) cluster_sync();
}


// G 16-row groups (k16 steps) of a weight-gradient k-step: M-major A and N-major B, a group 16
// rows (2048 bytes) of each box.
template <int G>
static __device__ __forceinline__ void gg_wgrad_mma(float* acc, u32 a_addr, u32 b_addr) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < G; ks++) {
        const u64 da = gg_desc(a_addr + ks * 2048, 8192, 1024);
        const u64 db = gg_desc(b_addr + ks * 2048, 8192, 1024);
        wgmma_m64n256k16<1, 1>(acc, da, db, 1);
    }
}

// A weight-gradient tile's k-steps whose last holds G 16-row groups of the expert's rows: `whole`
// issues the full k-steps, the last zeroes the rows past the expert's end within its G groups
// (`zero_tail(a, b, 16 G)`) and multiplies those groups only. One instance a count, chosen per
// tile outside the loop (gg_consume_peeled).
template <int G, int STAGES, u32 A_BYTES, u32 STAGE_BYTES, class Whole, class ZeroTail>
static __device__ __forceinline__ void gg_wgrad_consume(const GgShared& sh, GgRing<STAGES>& ring, int num_kb, GgWarp& w, Whole whole,
                                                        ZeroTail zero_tail, float* acc) {
    gg_consume_peeled<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, whole, [&](int, u32 a, u32 b) {
        zero_tail(a, b, 16 * G);
        gg_wgrad_mma<G>(acc, a, b);
    });
}

// The weight gradients: dw[e] [KO, N] = x[rows of e]^T @ dy[rows of e] for every expert (x [M, KO],
// dy [M, N], expert-major rows as above), reduced over each expert's rows in k-steps of 64 rows.
// Tiles of 128 (KO) x 256 (N) per expert, E x ceil(KO / 128) x ceil(N / 256) of them whatever
// the counts (an expert with no rows gets zeros). Both operands are MN-major in shared memory
// (A = x^T: 64 KO values a row of 128 bytes, one 8 KiB box per consumer warpgroup; B = dy as
// in `nn`). The last k-step of an expert loads rows of the next expert: it multiplies only its
// 16-row groups that hold the expert's rows (gg_consume_peeled), and before that the consumers
// zero the next expert's rows within them in shared memory (a row is one 128-byte line of each
// box: the swizzle moves 16-byte pieces within a line only), then fence the writes to the async
// proxy that wgmma reads through.
// Tile t of the weight gradients: expert-major; within an expert, groups of `group_n` column
// tiles, every row (KO) tile of a group before the next group (blocks at work share dy's columns).
static __device__ __forceinline__ void gg_wgrad_tile(int t, int m_tiles, int n_tiles, int group_n, int* e, int* m0, int* n0) {
    *e = t / (m_tiles * n_tiles);
    const int u = t - *e * m_tiles * n_tiles;
    const int g = u / (m_tiles * group_n);
    const int u_in = u - g * m_tiles * group_n;
    const int gs = min(group_n, n_tiles - g * group_n);
    *m0 = (u_in / gs) * GG_BM;
    *n0 = (g * group_n + u_in % gs) * 256;
}

// GATHER (GgGather): x's rows are gathered on load as in the token-side `_gather` kernel: row r of
// the expert-major rows is x's row rows_of[r], so dW1 = x^T dh needs no permuted copy of the tokens.
// The producer warpgroup's thread ptid copies, each k-step, the 16-byte pieces ptid % 8 of both A
// boxes (x's columns m0 .. m0 + 127) of rows ptid / 8 + 16 q (q < 4), rows past the expert's end
// and columns past ko as zeros; each k-step's indices are loaded two k-steps ahead.
template <bool OUT_F32, int EPI, bool GATHER = false>
static __device__ __forceinline__ void gg_wgrad_body(const GgTensorMap* map_a, const GgTensorMap* map_b, void* out, const int* counts,
                                                     int num_experts, int m_total, int ko, int n, int group_n, int /* flags */,
                                                     const GgGather* gather = nullptr, const GgOut* to = nullptr) {
    constexpr int BN = 256, STAGES = EPI == GG_EPI_STAGED || EPI == GG_EPI_TMA ? 3 : 4;
    constexpr u32 C_BYTES = EPI == GG_EPI_STAGED ? 2 * 64 * GG_C_ROW : EPI == GG_EPI_TMA ? 2 * 32768 : 0;
    static_assert(EPI == GG_EPI_REG || !OUT_F32, "the bulk epilogues are for bf16 output");
    constexpr u32 A_BYTES = GG_BM * GG_BK * 2;
    constexpr u32 B_BYTES = BN * GG_BK * 2;
    constexpr u32 STAGE_BYTES = A_BYTES + B_BYTES;
    const GgShared sh = gg_shared_layout<STAGES, STAGE_BYTES, C_BYTES>();
    int* row_start = (int*)(sh.bars + 2 * STAGES);
    int rows_carry = 0;
    for (int c0 = 0; c0 < num_experts; c0 += GG_THREADS) {
        const int e = c0 + (int)threadIdx.x;
        const int cnt = e < num_experts ? max(__ldg(counts + e), 0) : 0;
        int rows_total;
        const int r = block_exclusive_scan(cnt, &rows_total);
        if (e < num_experts) row_start[e] = min(rows_carry + r, m_total);
        rows_carry += rows_total;
    }
    if (threadIdx.x == 0) {
        row_start[num_experts] = min(rows_carry, m_total);
        gg_init_barriers<STAGES>(sh, 8, GATHER ? 129 : 1);
    }
    __syncthreads();
    const int m_tiles = (ko + GG_BM - 1) / GG_BM, n_tiles = (n + BN - 1) / BN;
    const int total = num_experts * m_tiles * n_tiles;
    const int wg = (int)threadIdx.x / 128;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if constexpr (GATHER) {
            const int ptid = (int)threadIdx.x;
            const int chunk = ptid & 7, j0 = ptid >> 3;
            const u32 swizzled = (u32)((chunk ^ (j0 & 7)) << 4);
            const uint4* x = (const uint4*)gather->x;
            const u32 row_pieces = (u32)(ko >> 3);
            if (ptid == 0) tma_prefetch(map_b);
            GgRing<STAGES> ring;
            for (int t = blockIdx.x; t < total; t += gridDim.x) {
                int e, m0, n0;
                gg_wgrad_tile(t, m_tiles, n_tiles, group_n, &e, &m0, &n0);
                const int r0 = row_start[e], r1 = row_start[e + 1], num_kb = (r1 - r0 + GG_BK - 1) / GG_BK;
                // the x row (in 16-byte pieces) of rows r0 + 64 kb + j0 + 16 q, or ~0: zeros; for
                // this k-step (src), the next (next) and the one after (far: loaded two k-steps
                // ahead, so that the loads' latency is not in the copies' way)
                u32 src[4], next[4], far[4];
                auto rows_at = [&](int kb, u32* dst) {
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        const int r = r0 + kb * GG_BK + j0 + 16 * q;
                        const int v = r < r1 ? __ldg(gather->rows_of + r) : -1;
                        dst[q] = (unsigned)v < (unsigned)gather->x_rows ? (u32)v * row_pieces : ~0u;
                    }
                };
                rows_at(0, src);
                rows_at(1, next);
                for (int kb = 0; kb < num_kb; kb++) {
                    const u32 full = sh.full0 + 8 * ring.stage;
                    mbar_wait(sh.empty0 + 8 * ring.stage, ring.phase ^ 1);
                    const u32 a_dst = sh.base + ring.stage * STAGE_BYTES, b_dst = a_dst + A_BYTES;
                    if (ptid == 0) {
                        mbar_expect_tx(full, B_BYTES);
#pragma unroll
                        for (int j = 0; j < BN / 64; j++) tma_load_2d(b_dst + j * 8192, map_b, n0 + 64 * j, r0 + kb * GG_BK, full);
                    }
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        const int q = i & 3, box = i >> 2;
                        const u32 piece = (u32)(m0 / 8 + 8 * box + chunk);
                        const bool ok = src[q] != ~0u && 8 * (int)piece < ko;
                        cp_async_16(a_dst + box * 8192 + (u32)(j0 + 16 * q) * 128u + swizzled, x + (ok ? src[q] + piece : 0u), ok ? 16u : 0u);
                    }
                    cp_async_arrive(full);
                    ring.advance();
                    rows_at(kb + 2, far);
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        src[q] = next[q];
                        next[q] = far[q];
                    }
                }
            }
            cp_async_wait_all();
        } else if (threadIdx.x == 0) {
            tma_prefetch(map_a);
            tma_prefetch(map_b);
            GgRing<STAGES> ring;
            for (int t = blockIdx.x; t < total; t += gridDim.x) {
                int e, m0, n0;
                gg_wgrad_tile(t, m_tiles, n_tiles, group_n, &e, &m0, &n0);
                const int r0 = row_start[e], num_kb = (row_start[e + 1] - r0 + GG_BK - 1) / GG_BK;
                gg_produce<STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, [&](int kb, u32 full, u32 a_dst, u32 b_dst) {
                    tma_load_2d(a_dst, map_a, m0, r0 + kb * GG_BK, full);
                    tma_load_2d(a_dst + 8192, map_a, m0 + 64, r0 + kb * GG_BK, full);
#pragma unroll
                    for (int j = 0; j < BN / 64; j++) tma_load_2d(b_dst + j * 8192, map_b, n0 + 64 * j, r0 + kb * GG_BK, full);
                });
                if constexpr (EPI == GG_EPI_RING) gg_skip_for_epilogue<STAGES>(sh, ring);
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int c = wg - 1;
        const int tid = (int)threadIdx.x - 128 * wg;
        GgWarp w{c, tid >> 5, tid & 31};
        float acc[BN / 2];
        GgRing<STAGES> ring;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            int e, m0, n0;
            gg_wgrad_tile(t, m_tiles, n_tiles, group_n, &e, &m0, &n0);
            const int r0 = row_start[e], rows = row_start[e + 1] - r0;
            const int num_kb = (rows + GG_BK - 1) / GG_BK;
#pragma unroll
            for (int i = 0; i < BN / 2; i++) acc[i] = 0.0f;
            // the k-steps: the last one's 16-row groups that hold the expert's rows only, each
            // count its own path (gg_consume_peeled); its rows past the expert's end zeroed
            const int last_rows = rows - (num_kb - 1) * GG_BK;  // 1 .. 64 (num_kb >= 1)
            auto whole = [&](int, u32 a_addr, u32 b_addr) { gg_wgrad_mma<GG_BK / 16>(acc, a_addr, b_addr); };
            auto zero_tail = [&](u32 a_addr, u32 b_addr, int upto) {
                if (last_rows < upto) {
                    // zero rows last_rows .. upto - 1 of this warpgroup's A box and of B boxes c and c + 2
                    const int lines = (upto - last_rows) * 8;  // 16-byte pieces a box
                    for (int i = tid; i < 3 * lines; i += 128) {
                        const int box = i / lines, piece = i % lines;
                        const u32 at = (box == 0 ? a_addr : b_addr + (c + 2 * (box - 1)) * 8192) + (last_rows * 128 + piece * 16);
                        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(at), "r"(0) : "memory");
                    }
                    fence_async_shared();
                    asm volatile("bar.sync 3, 256;" ::: "memory");  // both consumer warpgroups (B is shared)
                }
            };
            if (num_kb == 0) {
                gg_release_pending(sh, w);  // (an expert without rows: zeros, no k-step; as gg_consume would)
            } else {
                switch ((last_rows + 15) / 16) {
                    case 1: gg_wgrad_consume<1, STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, whole, zero_tail, acc); break;
                    case 2: gg_wgrad_consume<2, STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, whole, zero_tail, acc); break;
                    case 3: gg_wgrad_consume<3, STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, whole, zero_tail, acc); break;
                    default: gg_wgrad_consume<4, STAGES, A_BYTES, STAGE_BYTES>(sh, ring, num_kb, w, whole, zero_tail, acc); break;
                }
            }
            if constexpr (EPI == GG_EPI_TMA) {
                // (the expert's plane of dw; rows past ko clipped at the map's bounds)
                const GgOut here{to->map, e, true};
                gg_epilogue<BN, OUT_F32, EPI, STAGES, STAGE_BYTES>(acc, out, (long long)e * ko * n, m0, ko - m0, n0, n, sh, ring, w, false,
                                                                   &here);
            } else {
                gg_epilogue<BN, OUT_F32, EPI, STAGES, STAGE_BYTES>(acc, out, (long long)e * ko * n, m0, ko - m0, n0, n, sh, ring, w);
            }
        }
        if constexpr (EPI != GG_EPI_REG) {
            if (w.warp == 0) bulk_wait_all();
        }
    }
}

#else  // not sm_90a: the kernels exist (compile::ALL loads every file) and trap if launched

template <bool OUT_F32, int EPI, bool GATHER = false>
static __device__ __forceinline__ void gg_wgrad_body(const GgTensorMap*, const GgTensorMap*, void*, const int*, int, int, int, int, int, int,
                                                     const GgGather* = nullptr, const GgOut* = nullptr) {
    __trap();
}

template <int BN, bool B_KMAJOR, bool OUT_F32, int STAGES, int EPI, bool HALF = false, bool MC = false, bool ACT = false,
          bool GATHER = false>
static __device__ __forceinline__ void gg_body(const GgTensorMap*, const GgTensorMap*, void*, const int*, int, int, int, int, int, int,
                                               const GgAct* = nullptr, const GgGather* = nullptr, const GgOut* = nullptr) {
    __trap();
}

#endif

// Stages of the shared-memory ring: 4 of 48 KiB with BN = 256, 6 of 32 KiB with BN = 128, 3 of
// 48 KiB with BN = 256 and the staged bulk epilogue (its 66 KiB staging buffer), 4 with the
// bulk epilogue through the ring; grouped_gemm.rs computes the same shared-memory sizes.
#define GG_ARGS                                                                                                                   \
    const __grid_constant__ GgTensorMap map_a, const __grid_constant__ GgTensorMap map_b, void* out, const int* counts, int num_experts, \
        int m_total, int n, int k, int group_n, int flags
#define GG_PASS &map_a, &map_b, out, counts, num_experts, m_total, n, k, group_n, flags

extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n128_bf16(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<128, false, false, 6, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, false, false, 4, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n128_bf16(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<128, true, false, 6, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, true, false, 4, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_f32(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, false, true, 4, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_f32(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, true, true, 4, GG_EPI_REG>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_bulk(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, false, false, 3, GG_EPI_STAGED>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_bulk(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, true, false, 3, GG_EPI_STAGED>(GG_PASS); }
// (EPI_TMA: `map_out` over out as [1, m, n], boxes 64 x 64 x 1, the 128-byte swizzle)
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_tma(GG_ARGS, const __grid_constant__ GgTensorMap map_out) { MOE_PDL_ENTRY();
    const GgOut to{&map_out, 0, false};
    gg_body<256, false, false, 3, GG_EPI_TMA>(GG_PASS, nullptr, nullptr, &to);
}
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_tma(GG_ARGS, const __grid_constant__ GgTensorMap map_out) { MOE_PDL_ENTRY();
    const GgOut to{&map_out, 0, false};
    gg_body<256, true, false, 3, GG_EPI_TMA>(GG_PASS, nullptr, nullptr, &to);
}
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_ring(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, false, false, 4, GG_EPI_RING>(GG_PASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_ring(GG_ARGS) { MOE_PDL_ENTRY(); gg_body<256, true, false, 4, GG_EPI_RING>(GG_PASS); }
// In clusters of 2 CTAs (a compile-time cluster shape: the grid is a multiple of 2); plain
// declarations where the architecture has no clusters (before sm_90).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define GG_CLUSTER2 __cluster_dims__(2, 1, 1)
#else
#define GG_CLUSTER2
#endif
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_mc(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, false, false, 3, GG_EPI_STAGED, false, true>(GG_PASS);
}
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_mc(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, true, false, 3, GG_EPI_STAGED, false, true>(GG_PASS);
}
// (4 stages, the accumulators stored from the registers: a deeper ring for the lock step's
// cross-CTA releases)
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_mc4(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, false, false, 4, GG_EPI_REG, false, true>(GG_PASS);
}
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_mc4(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, true, false, 4, GG_EPI_REG, false, true>(GG_PASS);
}
// (the ring-store epilogue: 4 stages, two of them the epilogue's after each tile's k-steps; the
// two CTAs skip the same stages, their tiles having the same k-steps)
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_mcring(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, false, false, 4, GG_EPI_RING, false, true>(GG_PASS);
}
extern "C" __global__ void GG_CLUSTER2 __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_mcring(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, true, false, 4, GG_EPI_RING, false, true>(GG_PASS);
}
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_ring_half(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, false, false, 4, GG_EPI_RING, true>(GG_PASS);
}
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nt_n256_bf16_ring_half(GG_ARGS) { MOE_PDL_ENTRY();
    gg_body<256, true, false, 4, GG_EPI_RING, true>(GG_PASS);
}

// The first GEMM with the activation fused (GgAct): out = h [m, 2 n] (n = inter), a [m, n]; the
// options as the activation kernels take them (float32 values passed as doubles).
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_act(GG_ARGS, u16* act_out, const float* probs, int kind,
                                                                                   double alpha, double limit, double linear_offset) { MOE_PDL_ENTRY();
    const GgAct act{act_out, probs, act_opts(kind, alpha, limit, linear_offset, true)};
    gg_body<256, false, false, 3, GG_EPI_STAGED, false, false, true>(GG_PASS, &act);
}

// The first GEMM gathering its rows on load (GgGather): out [m, n] = x[rows_of[r]] @ W[e] for the
// expert-major rows r; map_a is unused (any map), x [x_rows, k].
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_gather(GG_ARGS, const u16* x, const int* rows_of, int x_rows) { MOE_PDL_ENTRY();
    const GgGather gather{x, rows_of, x_rows};
    gg_body<256, false, false, 3, GG_EPI_STAGED, false, false, false, true>(GG_PASS, nullptr, &gather);
}
// ... with the TMA-store epilogue (`map_out` over out as [1, m, n], as the `_tma` kernels')
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_nn_n256_bf16_gather_tma(GG_ARGS, const __grid_constant__ GgTensorMap map_out, const u16* x,
                                                                                          const int* rows_of, int x_rows) { MOE_PDL_ENTRY();
    const GgGather gather{x, rows_of, x_rows};
    const GgOut to{&map_out, 0, false};
    gg_body<256, false, false, 3, GG_EPI_TMA, false, false, false, true>(GG_PASS, nullptr, &gather, &to);
}

// dw [E, KO, N] = x^T dy per expert: map_a over x [M, KO], map_b over dy [M, N]; the launch's k is
// KO (x's columns), n is N (dy's columns)
#define GG_WPASS &map_a, &map_b, out, counts, num_experts, m_total, k, n, group_n, flags
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_f32(GG_ARGS) { MOE_PDL_ENTRY(); gg_wgrad_body<true, GG_EPI_REG>(GG_WPASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16(GG_ARGS) { MOE_PDL_ENTRY(); gg_wgrad_body<false, GG_EPI_REG>(GG_WPASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16_bulk(GG_ARGS) { MOE_PDL_ENTRY(); gg_wgrad_body<false, GG_EPI_STAGED>(GG_WPASS); }
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16_ring(GG_ARGS) { MOE_PDL_ENTRY(); gg_wgrad_body<false, GG_EPI_RING>(GG_WPASS); }
// (EPI_TMA: `map_out` over dw [E, ko, n], boxes 64 x 64 x 1, the 128-byte swizzle)
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16_tma(GG_ARGS, const __grid_constant__ GgTensorMap map_out) { MOE_PDL_ENTRY();
    const GgOut to{&map_out, 0, true};
    gg_wgrad_body<false, GG_EPI_TMA>(GG_WPASS, nullptr, &to);
}
// dW1 = x^T dh gathering x's rows on load (GgGather; map_a unused)
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16_gather(GG_ARGS, const u16* x, const int* rows_of, int x_rows) { MOE_PDL_ENTRY();
    const GgGather gather{x, rows_of, x_rows};
    gg_wgrad_body<false, GG_EPI_STAGED, true>(GG_WPASS, &gather);
}
// ... with the TMA-store epilogue (`map_out` over dw [E, ko, n])
extern "C" __global__ void __launch_bounds__(384, 1) grouped_gemm_wgrad_bf16_gather_tma(GG_ARGS, const __grid_constant__ GgTensorMap map_out, const u16* x,
                                                                                        const int* rows_of, int x_rows) { MOE_PDL_ENTRY();
    const GgGather gather{x, rows_of, x_rows};
    const GgOut to{&map_out, 0, true};
    gg_wgrad_body<false, GG_EPI_TMA, true>(GG_WPASS, &gather, &to);
}
