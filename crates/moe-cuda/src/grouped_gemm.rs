//! Our own grouped GEMM of the experts on Hopper (sm_90): `kernels/grouped_gemm.cu`, one
//! persistent launch over every expert's tiles, wgmma on shared-memory operands loaded by TMA,
//! with the per-expert row counts read on the device (`tokensPerExpert` as the dispatch leaves
//! it: no count comes back to the host before the GEMM is queued).
//!
//! `out [M, N] = x [M, K] @ B[e]` for the rows of each expert e (expert-major rows, `counts[e]`
//! of them in expert order), bf16 inputs, float32 accumulation, bf16 or f32 output. B is the
//! experts' weight tensor in one of two layouts ([`WeightLayout`]): `[E, K, N]` (the forward
//! GEMMs `x @ W1[e]`, `a @ W2[e]`) or `[E, N, K]` used transposed (the input gradients
//! `dy @ W2[e]^T`, `dh @ W1[e]^T`). [`launch_wgrad`]: the weight gradients `x_e^T @ dy_e`, every
//! expert's reduction over its rows in one launch.
//!
//! The kernel file is compiled twice: for the device's own architecture with every other file
//! (`compile::ALL`, where its kernels are stubs), and here, at the first call, for `sm_90a`
//! (wgmma, TMA and `setmaxnreg` need the architecture-specific target), cached on disk like
//! every kernel. Other GPUs get [`Error::Unavailable`]. The experts' default wherever it
//! applies (`crate::experts_grouped`: `MOE_DISPATCH_EXPERTS_GEMM=auto`), with [`experts_tile`]'s
//! epilogue; checked against cuBLAS and a host reference and timed by `moe-cuda-bench ggemm`.
//!
//! Rows past the sum of the counts are not written; counts that add up to more than M are cut
//! at M (rows past M are never written). Deterministic: each output element is one thread's
//! sum over K in a fixed order; no atomics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaFunction, CudaModule, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use moe_core::tensor::DType;

use crate::compile::{self, KernelSource};
use crate::device::{Buffer, Device, Params};
use crate::error::{Error, Result};
use crate::switch::Switch;
use crate::tensor::DeviceTensor;

/// The layout of the experts' weights B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[E, K, N]` row-major: `out = x @ W[e]` (W1 `[E, dim, 2 inter]`, W2 `[E, inter, dim]`).
    KN,
    /// `[E, N, K]` row-major, used transposed: `out = x @ W[e]^T` (the input gradients).
    NK,
}

/// Which kernel: the columns of an output tile (the wgmma's N) and the epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileN {
    /// 128 columns, 6 stages, accumulators stored straight to global memory.
    N128,
    /// 256 columns, 4 stages, accumulators stored straight to global memory.
    N256,
    /// 256 columns, 3 stages; the accumulators go to a shared-memory buffer and from there to
    /// global memory by bulk copies (one per row) that run while the next tile's k-steps do
    /// (bf16 output only).
    N256Bulk,
    /// 256 columns, 4 stages; the epilogue as [`TileN::N256Bulk`]'s, staged in two stages of
    /// the ring that the producer leaves to it after each tile's k-steps instead of a buffer of
    /// its own (bf16 output only).
    N256Ring,
    /// [`TileN::N256Ring`], and a tile of at most 64 rows (an expert's last) multiplied as two
    /// 64 x 128 halves, one a consumer warpgroup, instead of 128 x 256 with half the rows
    /// thrown away.
    N256RingHalf,
    /// [`TileN::N256Bulk`] in clusters of 2 CTAs: a cluster takes two row tiles of one column
    /// (or an expert's padding tile) at a time, each CTA loads half of their common B tile and
    /// multicasts it to both, so a CTA reads 32 KiB of each 48 KiB stage from L2 instead of 48.
    /// The token-side GEMMs only; the weight gradients run [`TileN::N256Bulk`]'s kernel.
    N256Mc,
    /// [`TileN::N256Mc`] with 4 stages and the accumulators stored from the registers (no staging
    /// buffer): a deeper ring for the cluster's lock step.
    N256Mc4,
    /// [`TileN::N256Mc`] with [`TileN::N256Ring`]'s epilogue: 4 stages, the rows staged in two
    /// stages of the ring and bulk-copied out (both CTAs skip the same stages: their tiles have
    /// the same k-steps). Its weight gradients run [`TileN::N256Bulk`]'s kernel.
    N256McRing,
    /// [`TileN::N256Bulk`] with the staged rows stored by TMA tensor stores (a staging buffer of
    /// 64 KiB in the 128-byte swizzle, four 64 x 64 boxes a consumer warpgroup, through a tensor
    /// map over the output): 8 TMA instructions a tile instead of 128 row copies. A warpgroup
    /// whose rows end inside its 64 (an expert's last tile) writes its staged rows itself, a warp
    /// a row, 16 bytes a lane (the whole box would overwrite the next expert's rows). Token side
    /// and weight gradients (bf16 output).
    N256Tma,
}

impl TileN {
    /// Every kernel choice, with its short name (`moe-cuda-bench ggemm --tile`,
    /// `MOE_DISPATCH_GG_EPILOGUE`).
    pub const ALL: [(TileN, &'static str); 9] = [
        (TileN::N128, "128"),
        (TileN::N256, "256"),
        (TileN::N256Bulk, "bulk"),
        (TileN::N256Ring, "ring"),
        (TileN::N256RingHalf, "ring-half"),
        (TileN::N256Mc, "mc"),
        (TileN::N256Mc4, "mc4"),
        (TileN::N256McRing, "mcring"),
        (TileN::N256Tma, "tma-store"),
    ];

    /// The tile of a short name of [`TileN::ALL`].
    pub fn from_short(name: &str) -> Option<TileN> {
        TileN::ALL.iter().find(|(_, n)| *n == name).map(|(t, _)| *t)
    }

    pub fn columns(self) -> usize {
        match self {
            TileN::N128 => 128,
            _ => 256,
        }
    }

    fn stages(self) -> usize {
        match self {
            TileN::N128 => 6,
            TileN::N256 | TileN::N256Ring | TileN::N256RingHalf | TileN::N256Mc4 | TileN::N256McRing => 4,
            TileN::N256Bulk | TileN::N256Mc | TileN::N256Tma => 3,
        }
    }

    /// Bytes of the epilogue's staging buffer (kernels/grouped_gemm.cu's C_BYTES).
    fn staging(self) -> usize {
        match self {
            TileN::N256Bulk | TileN::N256Mc => 2 * 64 * 528,
            TileN::N256Tma => 2 * 32768,
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TileN::N128 => "128x128",
            TileN::N256 => "128x256",
            TileN::N256Bulk => "128x256 bulk-store",
            TileN::N256Ring => "128x256 ring-store",
            TileN::N256RingHalf => "128x256 ring-store, half tails",
            TileN::N256Mc => "128x256 bulk-store, 2-CTA multicast",
            TileN::N256Mc4 => "128x256, 4 stages, 2-CTA multicast",
            TileN::N256McRing => "128x256 ring-store, 2-CTA multicast",
            TileN::N256Tma => "128x256 TMA-store",
        }
    }

    /// CTAs a cluster of the kernel (its `__cluster_dims__`).
    fn cluster(self) -> usize {
        match self {
            TileN::N256Mc | TileN::N256Mc4 | TileN::N256McRing => 2,
            _ => 1,
        }
    }
}

/// Rows of an output tile and the K step (kernels/grouped_gemm.cu's GG_BM, GG_BK).
pub const TILE_M: usize = 128;
pub const TILE_K: usize = 64;
const THREADS: u32 = 384;

/// The kernel file (in `compile::ALL` too).
pub const SOURCE: KernelSource = compile::GROUPED_GEMM;

/// A CUtensorMap as the kernel takes it (a 128-byte `__grid_constant__` parameter).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes, passed by value as the kernel's GgTensorMap parameter.
unsafe impl DeviceRepr for TensorMap {}

struct Kernels {
    _module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
    /// The cluster kernels' co-resident clusters by (kernel, dynamic shared memory).
    clusters: Mutex<HashMap<(String, usize), usize>>,
}

/// The sm_90a module per context (by the context's address), loaded at first use.
static LOADED: Mutex<Vec<(usize, Arc<Kernels>)>> = Mutex::new(Vec::new());

/// The NVRTC target of the kernels on `dev`, or why it has none.
pub fn arch(dev: &Device) -> Result<&'static str> {
    let cc = dev.info().compute_capability;
    if cc == "9.0" {
        Ok("sm_90a")
    } else {
        Err(Error::Unavailable(format!("the grouped GEMM kernel needs a Hopper GPU (compute capability 9.0); this one is {cc}")))
    }
}

fn kernels(dev: &Device) -> Result<Arc<Kernels>> {
    let key = Arc::as_ptr(dev.context()) as usize;
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(c, _)| *c == key) {
        return Ok(k.clone());
    }
    let arch = arch(dev)?;
    let (cubin, _origin) = compile::cubin(&SOURCE, arch)?;
    let module = match dev.context().load_module(Ptx::from_binary(cubin)) {
        Ok(m) => m,
        Err(_) => {
            let (cubin, _) = compile::fresh_cubin(&SOURCE, arch)?;
            dev.context()
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| Error::driver(format!("loading kernels/{} for {arch}", SOURCE.file), e))?
        }
    };
    let optin = dev
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| Error::driver("reading the shared memory limit", e))?;
    let mut functions = HashMap::new();
    for name in crate::device::kernel_names(SOURCE.source) {
        let f = module.load_function(&name).map_err(|e| Error::driver(format!("finding kernel {name} in kernels/{}", SOURCE.file), e))?;
        // the opt-in limit counts static shared memory too
        let fixed = f
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map_err(|e| Error::driver(format!("reading the static shared memory of {name}"), e))?;
        let dynamic = optin - fixed;
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic)
            .map_err(|e| Error::driver(format!("allowing {dynamic} bytes of dynamic shared memory to {name}"), e))?;
        functions.insert(name, f);
    }
    let k = Arc::new(Kernels { _module: module, functions, clusters: Mutex::new(HashMap::new()) });
    loaded.push((key, k.clone()));
    Ok(k)
}

/// Column tiles per raster group (kernels/grouped_gemm.cu's `group_n`): within an expert, the
/// row tiles of `group_n` column tiles run before the next group's. By default 2 for the
/// token-side GEMMs and 4 for the weight gradients (`weight_gradient`): an H100 timing every
/// kernel with groups 1, 2, 4 and 8 in interleaved rounds (2026-12-06) had the Mixtral-like
/// token-side GEMMs 3-8% faster at 1 or 2 than at 8 (the old default), the fine-grained 2-6%, and
/// the Mixtral-like `a^T dy` weight gradient 5% slower at 2 and 28% slower at 1 than at 4 or 8;
/// these defaults make the six GEMMs together 4.1% (Mixtral-like) and 3.3% (fine-grained) faster
/// than 8 (docs/gpu-report.md, twenty-third session). `MOE_DISPATCH_GG_GROUP` or [`set_group_n`] sets
/// both (for measurements: the order of the tiles, not their sums, so the same bits).
pub fn group_n(weight_gradient: bool) -> i32 {
    static GROUP: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    match GROUP_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        g if g >= 1 => g,
        _ => GROUP
            .get_or_init(|| std::env::var("MOE_DISPATCH_GG_GROUP").ok().and_then(|v| v.parse::<i32>().ok()).filter(|&g| g >= 1))
            .unwrap_or(if weight_gradient { 4 } else { 2 }),
    }
}

static GROUP_OVERRIDE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Overrides [`group_n`]: `Some(g)` (g >= 1) column tiles a group for every kernel, `None` the defaults.
pub fn set_group_n(group: Option<i32>) {
    GROUP_OVERRIDE.store(group.filter(|&g| g >= 1).unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The launches' `flags` (kernels/grouped_gemm.cu; the kernels each applies to say so, the
/// others ignore it), each on by default and turned off for measurements (the stored bits are the
/// same either way):
/// - `GG_IDLE_TAILS` (1): in a tile of at most 64 rows the second consumer warpgroup, whose rows
///   all lie past the expert's end, issues no wgmma; `MOE_DISPATCH_GG_IDLE_TAILS=off` (or
///   [`set_idle_tails`]`(Some(false))`) has it multiply the rows it does not store, as before;
/// - `GG_NARROW` (2): a column tile whose output ends within its first 128 columns multiplies
///   those only (m64n128k16) instead of 256; `MOE_DISPATCH_GG_NARROW=off` (or
///   [`set_narrow`]`(Some(false))`) multiplies all 256, as before.
pub fn launch_flags() -> i32 {
    (if IDLE_TAILS.on() { GG_IDLE_TAILS } else { 0 }) | (if NARROW.on() { GG_NARROW } else { 0 })
}

/// The flags' bits, as kernels/grouped_gemm.cu defines them.
const GG_IDLE_TAILS: i32 = 1;
const GG_NARROW: i32 = 2;

static IDLE_TAILS: Switch = Switch::new("MOE_DISPATCH_GG_IDLE_TAILS");
static NARROW: Switch = Switch::new("MOE_DISPATCH_GG_NARROW");

/// Overrides [`launch_flags`]' idle tails: `Some(true)` on, `Some(false)` off, `None` the
/// default (on).
pub fn set_idle_tails(idle: Option<bool>) {
    IDLE_TAILS.set(idle);
}

/// Overrides [`launch_flags`]' narrow column tiles: `Some(true)` on, `Some(false)` off, `None`
/// the default (on).
pub fn set_narrow(narrow: Option<bool>) {
    NARROW.set(narrow);
}

/// The 256-column bf16 kernel the experts use: [`TileN::N256Tma`] by default (TMA tensor stores:
/// 2-13% faster than [`TileN::N256Bulk`]'s row copies on an H100, docs/gpu-report.md
/// "Twenty-seventh session"); `MOE_DISPATCH_GG_EPILOGUE` names another by its short name of
/// [`TileN::ALL`] (`bulk`, `256`, `ring`, `ring-half`, `mc`, `mc4`, `mcring`: for measurements;
/// any other value is the default, with a warning on stderr naming the values it takes).
pub fn experts_tile() -> TileN {
    static TILE: std::sync::OnceLock<TileN> = std::sync::OnceLock::new();
    *TILE.get_or_init(|| {
        let Ok(v) = std::env::var("MOE_DISPATCH_GG_EPILOGUE") else { return TileN::N256Tma };
        let usable = |t: &TileN| t.columns() == 256;
        TileN::from_short(&v).filter(usable).unwrap_or_else(|| {
            let names: Vec<_> = TileN::ALL.iter().filter(|(t, _)| usable(t)).map(|(_, n)| *n).collect();
            eprintln!("moe-dispatch: MOE_DISPATCH_GG_EPILOGUE={v:?}: expected one of {}; using tma-store", names.join(", "));
            TileN::N256Tma
        })
    })
}

/// Bytes of dynamic shared memory of a launch (kernels/grouped_gemm.cu's layout: alignment
/// slack, the stages, the barriers, the per-expert tile and row offsets).
pub fn shared_bytes(tile: TileN, experts: usize) -> usize {
    let stage = (TILE_M + tile.columns()) * TILE_K * 2;
    1024 + tile.stages() * stage + tile.staging() + 16 * tile.stages() + 8 * (experts + 1)
}

/// A 2-D or 3-D tiled tensor map of bf16 with the 128-byte swizzle (`dims` and `box_dims`
/// innermost first; `strides`: bytes of each dimension but the first).
fn tensor_map(what: &str, ptr: u64, dims: &[u64], strides: &[u64], box_dims: &[u32]) -> Result<TensorMap> {
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let elem = vec![1u32; dims.len()];
    // SAFETY: the arrays hold `dims.len()` (strides: one fewer) entries, as the call reads them.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            dims.len() as u32,
            ptr as *mut _,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dims.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Cuda(format!(
            "cuTensorMapEncodeTiled for {what} (dims {dims:?}, strides {strides:?}, box {box_dims:?}) failed: {r:?}"
        )));
    }
    // SAFETY: encoded above; CUtensorMap is 16 u64 words.
    let words: [u64; 16] = unsafe { std::mem::transmute_copy(&map.assume_init()) };
    Ok(TensorMap(words))
}

/// The token-side kernel of `layout`, `tile` and `out_dtype` in kernels/grouped_gemm.cu, if any.
fn kernel_name(layout: WeightLayout, tile: TileN, out_dtype: DType) -> Option<&'static str> {
    Some(match (layout, tile, out_dtype) {
        (WeightLayout::KN, TileN::N128, DType::BF16) => "grouped_gemm_nn_n128_bf16",
        (WeightLayout::KN, TileN::N256, DType::BF16) => "grouped_gemm_nn_n256_bf16",
        (WeightLayout::NK, TileN::N128, DType::BF16) => "grouped_gemm_nt_n128_bf16",
        (WeightLayout::NK, TileN::N256, DType::BF16) => "grouped_gemm_nt_n256_bf16",
        (WeightLayout::KN, TileN::N256, DType::F32) => "grouped_gemm_nn_n256_f32",
        (WeightLayout::NK, TileN::N256, DType::F32) => "grouped_gemm_nt_n256_f32",
        (WeightLayout::KN, TileN::N256Bulk, DType::BF16) => "grouped_gemm_nn_n256_bf16_bulk",
        (WeightLayout::NK, TileN::N256Bulk, DType::BF16) => "grouped_gemm_nt_n256_bf16_bulk",
        (WeightLayout::KN, TileN::N256Ring, DType::BF16) => "grouped_gemm_nn_n256_bf16_ring",
        (WeightLayout::NK, TileN::N256Ring, DType::BF16) => "grouped_gemm_nt_n256_bf16_ring",
        (WeightLayout::KN, TileN::N256RingHalf, DType::BF16) => "grouped_gemm_nn_n256_bf16_ring_half",
        (WeightLayout::NK, TileN::N256RingHalf, DType::BF16) => "grouped_gemm_nt_n256_bf16_ring_half",
        (WeightLayout::KN, TileN::N256Mc, DType::BF16) => "grouped_gemm_nn_n256_bf16_mc",
        (WeightLayout::NK, TileN::N256Mc, DType::BF16) => "grouped_gemm_nt_n256_bf16_mc",
        (WeightLayout::KN, TileN::N256Mc4, DType::BF16) => "grouped_gemm_nn_n256_bf16_mc4",
        (WeightLayout::NK, TileN::N256Mc4, DType::BF16) => "grouped_gemm_nt_n256_bf16_mc4",
        (WeightLayout::KN, TileN::N256McRing, DType::BF16) => "grouped_gemm_nn_n256_bf16_mcring",
        (WeightLayout::NK, TileN::N256McRing, DType::BF16) => "grouped_gemm_nt_n256_bf16_mcring",
        (WeightLayout::KN, TileN::N256Tma, DType::BF16) => "grouped_gemm_nn_n256_bf16_tma",
        (WeightLayout::NK, TileN::N256Tma, DType::BF16) => "grouped_gemm_nt_n256_bf16_tma",
        _ => return None,
    })
}

/// One grouped GEMM on raw device addresses (see the module's doc): `x [m, k]` bf16, `w` bf16
/// `[experts, k, n]` ([`WeightLayout::KN`]) or `[experts, n, k]` ([`WeightLayout::NK`]),
/// `counts [experts]` int32 on the device, `out [m, n]` of `out_dtype` (bf16, or f32 with
/// [`TileN::N256`]). `k` and `n` must be multiples of 8 (the TMA's 16-byte strides),
/// the addresses 16-byte aligned. Queued on the device's stream; nothing is read back.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &Device,
    x: u64,
    w: u64,
    layout: WeightLayout,
    counts: u64,
    out: u64,
    out_dtype: DType,
    experts: usize,
    m: usize,
    n: usize,
    k: usize,
    tile: TileN,
) -> Result<()> {
    if m == 0 || n == 0 || experts == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::Cuda("grouped GEMM with k = 0: nothing to multiply (a bug in the caller)".into()));
    }
    let sizes = checked_sizes("grouped GEMM", "k", x | w | out, experts, m, n, k)?;
    let name = kernel_name(layout, tile, out_dtype)
        .ok_or_else(|| Error::Cuda(format!("grouped GEMM: no kernel for {layout:?}, {tile:?}, {} output", out_dtype.name())))?;
    // persistent: one block per SM, or fewer when there are fewer tiles than that at most (the
    // cluster kernel's padding: one tile an expert)
    let max_tiles = (m / TILE_M + experts).saturating_mul(n.div_ceil(tile.columns())) + if tile.cluster() > 1 { experts } else { 0 };
    // (the TMA-store kernels: out as [1, m, n])
    let extra = match tile {
        TileN::N256Tma => Extra::Out(out_map(out, 1, m, n)?),
        _ => Extra::None,
    };
    run_kernel(dev, "grouped GEMM", name, tile, max_tiles, out, counts, sizes, extra, || {
        let (m64, n64, k64, e64) = (m as u64, n as u64, k as u64, experts as u64);
        // A: [m, k], box 64 (k) x 128 (rows)
        let map_a = tensor_map("the tokens", x, &[k64, m64], &[k64 * 2], &[TILE_K as u32, TILE_M as u32])?;
        let map_b = match layout {
            // [E, k, n]: boxes of 64 (n) x 64 (k), BN / 64 of them a step
            WeightLayout::KN => tensor_map("the weights", w, &[n64, k64, e64], &[n64 * 2, n64 * k64 * 2], &[64, TILE_K as u32, 1])?,
            // [E, n, k]: one box of 64 (k) x BN (n) a step; the cluster kernel loads halves of 128
            WeightLayout::NK => {
                let box_n = if tile.cluster() > 1 { 128 } else { tile.columns() as u32 };
                tensor_map("the weights", w, &[k64, n64, e64], &[k64 * 2, n64 * k64 * 2], &[TILE_K as u32, box_n, 1])?
            }
        };
        Ok((map_a, map_b))
    })
}

/// The `_act` kernel's parameters after GG_ARGS: the activation's output, the probs (0: none),
/// the options as the activation kernels take them.
struct ActArgs {
    a: u64,
    probs: u64,
    kind: i32,
    alpha: f64,
    limit: f64,
    offset: f64,
}

/// The `_gather` kernel's parameters after GG_ARGS: the rows' source `x [x_rows, k]` and the
/// source row of each expert-major row.
struct GatherArgs {
    x: u64,
    rows_of: u64,
    x_rows: i32,
}

/// A kernel's parameters after GG_ARGS, if any.
enum Extra<'a> {
    None,
    Act(&'a ActArgs),
    Gather(&'a GatherArgs),
    /// The TMA-store kernels' `map_out` ([`out_map`]).
    Out(TensorMap),
    /// The gathering TMA-store kernels': `map_out`, then the gather's arguments.
    GatherOut(&'a GatherArgs, TensorMap),
}

/// The TMA-store kernels' map over a bf16 output `[planes, rows, cols]` (the token side: one plane
/// of `[m, n]`; the weight gradients: an expert's `[ko, n]` a plane), boxes of 64 x 64 x 1 in the
/// 128-byte swizzle, as the kernels stage them.
fn out_map(out: u64, planes: usize, rows: usize, cols: usize) -> Result<TensorMap> {
    let (p, r, c) = (planes as u64, rows as u64, cols as u64);
    tensor_map("the output", out, &[c, r, p], &[c * 2, r * c * 2], &[64, 64, 1])
}

/// Whether [`launch_act`] takes activation `kind`: the kinds with `[gate | up]` halves (swiglu,
/// swiglu_oai, swiglu_clamped), whose gate and up columns its tiles load side by side.
pub fn fuses_activation(kind: moe_core::activations::ActivationKind) -> bool {
    kind.has_halves()
}

/// The first expert GEMM with the activation fused into its epilogue: `h [m, 2 inter] = x W1`
/// (bf16, as [`launch`] stores it with [`WeightLayout::KN`]: `x [m, k]`, `w [experts, k, 2 inter]`)
/// and `a [m, inter] = act(gate, up) * probs[row]` (bf16; `probs` [m] f32 on the device, or 0 for
/// none), with the same bits as [`launch`] followed by the activation kernel in
/// [`crate::activations::ExpMath::Fast`]. The kinds of [`fuses_activation`] only; `k` and
/// `inter` multiples of 8. Queued on the device's stream. The consumers stage h in shared memory
/// and copy it out as the bulk kernel does, and compute a tile's `a` from its staged rows while
/// the next tile's wgmmas run.
#[allow(clippy::too_many_arguments)]
pub fn launch_act(
    dev: &Device,
    x: u64,
    w: u64,
    counts: u64,
    h: u64,
    a: u64,
    probs: u64,
    options: &moe_core::activations::ActivationOptions,
    experts: usize,
    m: usize,
    inter: usize,
    k: usize,
) -> Result<()> {
    if !fuses_activation(options.kind) {
        return Err(Error::Cuda(format!(
            "grouped GEMM with the activation: {} is not a [gate | up] kind (swiglu, swiglu_oai, swiglu_clamped)",
            options.kind.name()
        )));
    }
    if m == 0 || inter == 0 || experts == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::Cuda("grouped GEMM with k = 0: nothing to multiply (a bug in the caller)".into()));
    }
    if probs % 4 != 0 {
        return Err(Error::Cuda("grouped GEMM with the activation: probs must be 4-byte aligned".into()));
    }
    let sizes = checked_sizes("grouped GEMM with the activation", "k", x | w | h | a, experts, m, inter, k)?;
    // (the bulk kernel's stages and staging buffer)
    let tile = TileN::N256Bulk;
    let name = "grouped_gemm_nn_n256_bf16_act";
    // (tiles of 128 output columns: 128 gate and 128 up columns of h)
    let max_tiles = (m / TILE_M + experts).saturating_mul(inter.div_ceil(128));
    let act = ActArgs {
        a,
        probs,
        kind: crate::activations::kind_code(options.kind),
        alpha: options.alpha as f64,
        limit: options.limit as f64,
        offset: options.linear_offset as f64,
    };
    run_kernel(dev, "grouped GEMM with the activation", name, tile, max_tiles, h, counts, sizes, Extra::Act(&act), || {
        let (m64, n64, k64, e64) = (m as u64, 2 * inter as u64, k as u64, experts as u64);
        let map_a = tensor_map("the tokens", x, &[k64, m64], &[k64 * 2], &[TILE_K as u32, TILE_M as u32])?;
        // [E, k, 2 inter]: boxes of 64 (n) x 64 (k), gate and up columns
        let map_b = tensor_map("the weights", w, &[n64, k64, e64], &[n64 * 2, n64 * k64 * 2], &[64, TILE_K as u32, 1])?;
        Ok((map_a, map_b))
    })
}

/// The first expert GEMM gathering its rows on load: `out [m, n] = x[rows_of[r]] @ w[e]` for the
/// expert-major rows r (expert e's `counts[e]` rows after the rows of experts 0 .. e-1), bf16,
/// `w [experts, k, n]` ([`WeightLayout::KN`]); `x [x_rows, k]` the tokens in their own order and
/// `rows_of [m]` int32 the token of each row (permute's sortedIndices), so the permuted copy of
/// x is never made. The same bits as [`launch`] on the gathered rows with `tile` (the same
/// tiles, k-steps and epilogue; only the A operand's loads differ): [`TileN::N256Bulk`] or
/// [`TileN::N256Tma`] ([`gather_tile`] picks one for any tile). An index outside `[0, x_rows)`
/// reads a row of zeros. `k` and `n` multiples of 8; queued on the device's stream.
#[allow(clippy::too_many_arguments)]
pub fn launch_gather(
    dev: &Device,
    x: u64,
    x_rows: usize,
    rows_of: u64,
    w: u64,
    counts: u64,
    out: u64,
    experts: usize,
    m: usize,
    n: usize,
    k: usize,
    tile: TileN,
) -> Result<()> {
    const WHAT: &str = "grouped GEMM gathering its rows";
    if m == 0 || n == 0 || experts == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::Cuda(format!("{WHAT}: k = 0: nothing to multiply (a bug in the caller)")));
    }
    let gather = gather_args(WHAT, x, x_rows, rows_of, k)?;
    let sizes = checked_sizes(WHAT, "k", x | w | out, experts, m, n, k)?;
    let (name, extra) = match tile {
        TileN::N256Bulk => ("grouped_gemm_nn_n256_bf16_gather", Extra::Gather(&gather)),
        TileN::N256Tma => ("grouped_gemm_nn_n256_bf16_gather_tma", Extra::GatherOut(&gather, out_map(out, 1, m, n)?)),
        other => return Err(Error::Cuda(format!("{WHAT}: no gathering kernel for {other:?} (bulk or tma-store)"))),
    };
    let max_tiles = (m / TILE_M + experts).saturating_mul(n.div_ceil(tile.columns()));
    run_kernel(dev, WHAT, name, tile, max_tiles, out, counts, sizes, extra, || {
        let (n64, k64, e64) = (n as u64, k as u64, experts as u64);
        // (A's map is not read by the kernel: one over x, valid as any)
        let map_a = tensor_map("the tokens", x, &[k64, x_rows.max(1) as u64], &[k64 * 2], &[TILE_K as u32, TILE_M as u32])?;
        let map_b = tensor_map("the weights", w, &[n64, k64, e64], &[n64 * 2, n64 * k64 * 2], &[64, TILE_K as u32, 1])?;
        Ok((map_a, map_b))
    })
}

/// The weight gradients, grouped: `dw [experts, ko, n] = x[rows of e]^T @ dy[rows of e]` for
/// every expert (`x [m, ko]`, `dy [m, n]` bf16, expert-major rows, `counts [experts]` int32 on
/// the device), reduced over each expert's rows in a fixed order (no atomics, no split);
/// `dw` of `out_dtype` (bf16 or f32), every element written (zeros for an expert with no rows).
/// Tiles of 128 x 256 (`tile`: [`TileN::N256`], or [`TileN::N256Bulk`] / [`TileN::N256Ring`]
/// with bf16 output); `ko`
/// and `n` multiples of 8.
#[allow(clippy::too_many_arguments)]
pub fn launch_wgrad(
    dev: &Device,
    x: u64,
    dy: u64,
    counts: u64,
    dw: u64,
    out_dtype: DType,
    experts: usize,
    m: usize,
    ko: usize,
    n: usize,
    tile: TileN,
) -> Result<()> {
    if ko == 0 || n == 0 || experts == 0 {
        return Ok(());
    }
    if m == 0 {
        return dev_zero(dev, dw, experts * ko * n * out_dtype.size());
    }
    let sizes = checked_sizes("grouped weight gradient", "ko", x | dy | dw, experts, m, n, ko)?;
    // (no cluster kernel for the weight gradients yet: the bulk one)
    let tile = match tile {
        TileN::N256Mc => TileN::N256Bulk,
        TileN::N256Mc4 => TileN::N256,
        // (the ring-store weight gradients ran 7-8 points slower than the bulk ones at the
        // Mixtral-like shape on an H100: 78.9 / 82.7% against 86.2 / 87.5%)
        TileN::N256McRing => TileN::N256Bulk,
        t => t,
    };
    let name = match (out_dtype, tile) {
        (DType::F32, TileN::N256) => "grouped_gemm_wgrad_f32",
        (DType::BF16, TileN::N256) => "grouped_gemm_wgrad_bf16",
        (DType::BF16, TileN::N256Bulk) => "grouped_gemm_wgrad_bf16_bulk",
        // (the weight gradients' tiles are over the weights, whole whatever the counts)
        (DType::BF16, TileN::N256Ring | TileN::N256RingHalf) => "grouped_gemm_wgrad_bf16_ring",
        (DType::BF16, TileN::N256Tma) => "grouped_gemm_wgrad_bf16_tma",
        (other, _) => return Err(Error::Cuda(format!("grouped weight gradient: no kernel for {tile:?} with {} output", other.name()))),
    };
    let tiles = experts.saturating_mul(ko.div_ceil(TILE_M)).saturating_mul(n.div_ceil(256));
    // (the TMA-store kernel: dw as [experts, ko, n])
    let extra = match tile {
        TileN::N256Tma => Extra::Out(out_map(dw, experts, ko, n)?),
        _ => Extra::None,
    };
    // (the kernel's k is ko, its n is n)
    run_kernel(dev, "grouped weight gradient", name, tile, tiles, dw, counts, sizes, extra, || {
        let (m64, n64, k64) = (m as u64, n as u64, ko as u64);
        // x^T and dy: boxes of 64 columns x 64 rows
        let map_a = tensor_map("the weight gradient's x", x, &[k64, m64], &[k64 * 2], &[64, TILE_K as u32])?;
        let map_b = tensor_map("the weight gradient's dy", dy, &[n64, m64], &[n64 * 2], &[64, TILE_K as u32])?;
        Ok((map_a, map_b))
    })
}

/// The sizes of a launch as the kernels take them (GG_ARGS's num_experts, m_total, n, k).
#[derive(Clone, Copy)]
struct Sizes {
    experts: i32,
    m: i32,
    n: i32,
    k: i32,
}

/// What [`launch`] and [`launch_wgrad`] require of their sizes and addresses: `k` (called
/// `k_name` in the errors) and `n` multiples of 8 (the TMA's 16-byte strides), the operands'
/// addresses (`addresses`: or-ed together) 16-byte aligned, every size an int32. `what` starts
/// the errors.
fn checked_sizes(what: &str, k_name: &str, addresses: u64, experts: usize, m: usize, n: usize, k: usize) -> Result<Sizes> {
    if k % 8 != 0 || n % 8 != 0 {
        return Err(Error::Cuda(format!("{what}: {k_name} = {k} and n = {n} must be multiples of 8 (TMA strides)")));
    }
    if addresses % 16 != 0 {
        return Err(Error::Cuda(format!("{what}: operands must be 16-byte aligned")));
    }
    let int = |name: &str, v: usize| i32::try_from(v).map_err(|_| Error::Cuda(format!("{what}: {name} = {v} exceeds int32")));
    Ok(Sizes { m: int("m", m)?, n: int("n", n)?, k: int(k_name, k)?, experts: int("experts", experts)? })
}

/// Queues kernel `name` on the device's stream: its dynamic shared memory for `tile` and
/// `sizes.experts` checked against what the kernel may have, then the tensor maps of its two
/// operands (`maps`), on one block per SM or `tiles` blocks when there are fewer tiles.
#[allow(clippy::too_many_arguments)]
fn run_kernel(
    dev: &Device,
    what: &str,
    name: &str,
    tile: TileN,
    tiles: usize,
    out: u64,
    counts: u64,
    sizes: Sizes,
    extra: Extra,
    maps: impl FnOnce() -> Result<(TensorMap, TensorMap)>,
) -> Result<()> {
    let kernels = kernels(dev)?;
    let f = kernels.functions.get(name).ok_or_else(|| Error::Cuda(format!("kernel {name} is not in kernels/grouped_gemm.cu")))?;
    let experts = sizes.experts as usize;
    let smem = shared_bytes(tile, experts);
    let limit = f
        .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        .map_err(|e| Error::driver("reading the shared memory limit", e))? as usize;
    if smem > limit {
        return Err(Error::Cuda(format!("{what}: {experts} experts need {smem} bytes of shared memory, the kernel may have {limit}")));
    }
    let (map_a, map_b) = maps()?;
    let grid = if tile.cluster() > 1 {
        // whole clusters, no more than can run at once (the persistent blocks wait on each other)
        let size = tile.cluster();
        let most = max_clusters(&kernels, dev, name, f, smem, size)?;
        (dev.sm_count() / size).min(most).min(tiles.div_ceil(size)).max(1) * size
    } else {
        dev.sm_count().min(tiles).max(1)
    } as u32;
    // (the weight gradients' kernels are the `grouped_gemm_wgrad_*` ones)
    let group = group_n(name.starts_with("grouped_gemm_wgrad_"));
    let Sizes { experts: ei, m: mi, n: ni, k: ki } = sizes;
    let mut b = Params::default();
    let flags = launch_flags();
    b.push(&map_a).push(&map_b).push(&out).push(&counts).push(&ei).push(&mi).push(&ni).push(&ki).push(&group).push(&flags);
    match extra {
        Extra::None => {}
        Extra::Act(a) => {
            b.push(&a.a).push(&a.probs).push(&a.kind).push(&a.alpha).push(&a.limit).push(&a.offset);
        }
        Extra::Gather(g) => {
            b.push(&g.x).push(&g.rows_of).push(&g.x_rows);
        }
        Extra::Out(map) => {
            b.push(&map);
        }
        Extra::GatherOut(g, map) => {
            b.push(&map).push(&g.x).push(&g.rows_of).push(&g.x_rows);
        }
    }
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 };
    // (the arguments match the kernel's parameters (GG_ARGS, `flags` last; the weight gradients' k is ko; the
    // `_act`, `_gather` and `_tma` kernels' after them) in order and type). Never a programmatic
    // dependent launch: with it these kernels ran slower on an H100, even with events between
    // the kernels (Mixtral-like weight gradients 10.13 against 9.49 ms; docs/gpu-report.md,
    // twenty-fifth session); the kernels after them still may be.
    dev.launch_params(name, f, cfg, &mut b, false)
}

/// [`launch_wgrad`] gathering x's rows on load: `dw [experts, ko, n] = x[rows_of[rows of e]]^T @
/// dy[rows of e]` (bf16 output), `x [x_rows, ko]` the tokens in their own order, `rows_of [m]`
/// int32 the token of each expert-major row (as [`launch_gather`] takes them); the same bits as
/// [`launch_wgrad`] with `tile` ([`TileN::N256Bulk`] or [`TileN::N256Tma`]) on the gathered
/// rows. An index outside
/// `[0, x_rows)` reads a row of zeros.
#[allow(clippy::too_many_arguments)]
pub fn launch_wgrad_gather(
    dev: &Device,
    x: u64,
    x_rows: usize,
    rows_of: u64,
    dy: u64,
    counts: u64,
    dw: u64,
    experts: usize,
    m: usize,
    ko: usize,
    n: usize,
    tile: TileN,
) -> Result<()> {
    const WHAT: &str = "grouped weight gradient gathering its rows";
    if ko == 0 || n == 0 || experts == 0 {
        return Ok(());
    }
    if m == 0 {
        return dev_zero(dev, dw, experts * ko * n * 2);
    }
    let gather = gather_args(WHAT, x, x_rows, rows_of, ko)?;
    let sizes = checked_sizes(WHAT, "ko", x | dy | dw, experts, m, n, ko)?;
    let (name, extra) = match tile {
        TileN::N256Bulk => ("grouped_gemm_wgrad_bf16_gather", Extra::Gather(&gather)),
        TileN::N256Tma => ("grouped_gemm_wgrad_bf16_gather_tma", Extra::GatherOut(&gather, out_map(dw, experts, ko, n)?)),
        other => return Err(Error::Cuda(format!("{WHAT}: no gathering kernel for {other:?} (bulk or tma-store)"))),
    };
    let tiles = experts.saturating_mul(ko.div_ceil(TILE_M)).saturating_mul(n.div_ceil(256));
    run_kernel(dev, WHAT, name, tile, tiles, dw, counts, sizes, extra, || {
        let (m64, n64, k64) = (m as u64, n as u64, ko as u64);
        // (A's map is not read by the kernel: one over x, valid as any)
        let map_a = tensor_map("the weight gradient's x", x, &[k64, x_rows.max(1) as u64], &[k64 * 2], &[64, TILE_K as u32])?;
        let map_b = tensor_map("the weight gradient's dy", dy, &[n64, m64], &[n64 * 2], &[64, TILE_K as u32])?;
        Ok((map_a, map_b))
    })
}

/// The gathering kernel for the experts' `tile` ([`experts_tile`]): the TMA-store one with
/// [`TileN::N256Tma`], the bulk one with any other (the gathering kernels have those two
/// epilogues).
pub fn gather_tile(tile: TileN) -> TileN {
    if tile == TileN::N256Tma {
        TileN::N256Tma
    } else {
        TileN::N256Bulk
    }
}

/// The `_gather` kernels' arguments after checking them: `rows_of` 4-byte aligned, x under the
/// kernels' 64 GiB (they address it in 16-byte pieces with 32-bit offsets), `x_rows` an int32.
fn gather_args(what: &str, x: u64, x_rows: usize, rows_of: u64, k: usize) -> Result<GatherArgs> {
    if rows_of % 4 != 0 {
        return Err(Error::Cuda(format!("{what}: the row indices must be 4-byte aligned")));
    }
    if (x_rows as u128) * (k as u128) * 2 >= 1u128 << 36 {
        return Err(Error::Cuda(format!("{what}: x [{x_rows}, {k}] is 64 GiB or more (the kernel's limit)")));
    }
    let x_rows = i32::try_from(x_rows).map_err(|_| Error::Cuda(format!("{what}: x_rows = {x_rows} exceeds int32")))?;
    Ok(GatherArgs { x, rows_of, x_rows })
}

/// The cluster kernel of `tile` (bf16 output, [`WeightLayout::KN`]): how many of its clusters
/// run at once with `experts` experts' shared memory (None: `tile` has no clusters). For the
/// benchmark's report: a grid of fewer blocks than SMs would explain a slow cluster kernel.
pub fn co_resident_clusters(dev: &Device, tile: TileN, experts: usize) -> Result<Option<usize>> {
    if tile.cluster() < 2 {
        return Ok(None);
    }
    let kernels = kernels(dev)?;
    let name = kernel_name(WeightLayout::KN, tile, DType::BF16).ok_or_else(|| Error::Cuda(format!("no bf16 kernel for {tile:?}")))?;
    let f = kernels.functions.get(name).ok_or_else(|| Error::Cuda(format!("kernel {name} is not in kernels/grouped_gemm.cu")))?;
    max_clusters(&kernels, dev, name, f, shared_bytes(tile, experts), tile.cluster()).map(Some)
}

/// How many clusters of `size` CTAs of kernel `f` (with `smem` bytes of dynamic shared memory)
/// the device runs at once (cuOccupancyMaxActiveClusters), remembered per kernel and size.
fn max_clusters(kernels: &Kernels, dev: &Device, name: &str, f: &CudaFunction, smem: usize, size: usize) -> Result<usize> {
    let mut known = kernels.clusters.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&c) = known.get(&(name.to_string(), smem)) {
        return Ok(c);
    }
    let config = sys::CUlaunchConfig {
        gridDimX: (dev.sm_count() / size * size).max(size) as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: dev.stream().cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut clusters: std::ffi::c_int = 0;
    // SAFETY: `f` is a loaded function of this context; the config's attribute list is empty
    // (the kernel's cluster shape is compiled in).
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config) };
    if r != sys::CUresult::CUDA_SUCCESS || clusters < 1 {
        return Err(Error::Cuda(format!(
            "{name}: no cluster of {size} blocks with {smem} bytes of shared memory fits the device ({r:?}, {clusters})"
        )));
    }
    known.insert((name.to_string(), smem), clusters as usize);
    Ok(clusters as usize)
}

fn dev_zero(dev: &Device, ptr: u64, bytes: usize) -> Result<()> {
    if bytes > 0 {
        // SAFETY: the caller's buffer holds `bytes` bytes at `ptr`.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, dev.stream().cu_stream()) }
            .map_err(|e| Error::driver("zeroing the weight gradients", e))?;
    }
    Ok(())
}

/// [`launch`] on device tensors: `x [M, K]` bf16, `w` bf16 in `layout`, `counts [E]` int32
/// (tokensPerExpert, on the device), a new `out [M, N]` of `out_dtype`. Rows past the sum of
/// the counts are zeros.
pub fn grouped_gemm_device(
    dev: &Device,
    x: &DeviceTensor,
    w: &DeviceTensor,
    layout: WeightLayout,
    counts: &DeviceTensor,
    out_dtype: DType,
    tile: TileN,
) -> Result<DeviceTensor> {
    let bad = |what: String| Err(Error::Cuda(format!("grouped GEMM: {what}")));
    if x.dtype != DType::BF16 || w.dtype != DType::BF16 {
        return bad(format!("x and w must be bfloat16 (got {} and {})", x.dtype.name(), w.dtype.name()));
    }
    if counts.dtype != DType::I32 || counts.shape.len() != 1 {
        return bad("counts must be a 1-D int32 tensor".into());
    }
    if x.shape.len() != 2 || w.shape.len() != 3 {
        return bad(format!("x must be [M, K] and w [E, ., .] (got {:?} and {:?})", x.shape, w.shape));
    }
    let (m, k) = (x.shape[0], x.shape[1]);
    let experts = counts.shape[0];
    let (we, wk, wn) = match layout {
        WeightLayout::KN => (w.shape[0], w.shape[1], w.shape[2]),
        WeightLayout::NK => (w.shape[0], w.shape[2], w.shape[1]),
    };
    if we != experts || wk != k {
        return bad(format!("x {:?}, w {:?} ({layout:?}) and counts [{experts}] do not fit", x.shape, w.shape));
    }
    let out = DeviceTensor::alloc(dev, "the grouped GEMM's output", out_dtype, vec![m, wn])?;
    dev.memset_zero("the grouped GEMM's output", &out.buf, out.bytes())?;
    if k == 0 {
        return Ok(out);
    }
    let s = dev.stream();
    launch(dev, x.buf.ptr(s), w.buf.ptr(s), layout, counts.buf.ptr(s), out.buf.ptr(s), out_dtype, experts, m, wn, k, tile)?;
    Ok(out)
}

/// The address of a buffer (for [`launch`]).
pub fn address(dev: &Device, buf: &Buffer) -> u64 {
    buf.device_ptr(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel `kernel_name` names is declared in kernels/grouped_gemm.cu, and the 256-column
    /// bf16 tiles have one for both layouts.
    #[test]
    fn kernel_names_exist() {
        let declared = crate::device::kernel_names(SOURCE.source);
        let mut found = 0;
        for layout in [WeightLayout::KN, WeightLayout::NK] {
            for (tile, _) in TileN::ALL {
                for dtype in [DType::BF16, DType::F32] {
                    if let Some(name) = kernel_name(layout, tile, dtype) {
                        assert!(declared.iter().any(|d| d == name), "{name} ({layout:?}, {tile:?}, {dtype:?}) is not in {declared:?}");
                        found += 1;
                    }
                }
                assert!(kernel_name(layout, tile, DType::BF16).is_some(), "{layout:?} {tile:?} has no bf16 kernel");
            }
        }
        assert_eq!(found, 20);
        // the fused kernels and the weight gradients' TMA-store kernel, launched by name
        for name in [
            "grouped_gemm_nn_n256_bf16_act",
            "grouped_gemm_nn_n256_bf16_gather",
            "grouped_gemm_wgrad_bf16_gather",
            "grouped_gemm_wgrad_bf16_tma",
        ] {
            assert!(declared.iter().any(|d| d == name), "{name} is not in {declared:?}");
        }
        // the short names are distinct and name their own tiles
        for (tile, short) in TileN::ALL {
            assert_eq!(TileN::from_short(short), Some(tile), "{short}");
        }
        assert_eq!(TileN::from_short("nope"), None);
    }

    /// The raster group's override wins over the default and gives it back; a group below 1 is
    /// no override. (The one test that sets it: tests of one binary share the process.)
    #[test]
    fn raster_group_override() {
        let (token, weight) = (group_n(false), group_n(true));
        assert!(token >= 1 && weight >= 1);
        set_group_n(Some(4));
        assert_eq!((group_n(false), group_n(true)), (4, 4));
        set_group_n(Some(0));
        assert_eq!((group_n(false), group_n(true)), (token, weight));
        set_group_n(Some(16));
        set_group_n(None);
        assert_eq!((group_n(false), group_n(true)), (token, weight));
    }

    /// The idle tails' and narrow tiles' overrides set their own bit of the launches' flags both
    /// ways, leave the other's alone, and give the defaults (both on) back. (The one test that
    /// sets them.)
    #[test]
    fn launch_flag_overrides() {
        let defaults = ["MOE_DISPATCH_GG_IDLE_TAILS", "MOE_DISPATCH_GG_NARROW"].iter().all(|v| std::env::var_os(v).is_none());
        if defaults {
            assert_eq!(launch_flags(), 3);
        }
        set_idle_tails(Some(false));
        set_narrow(Some(true));
        assert_eq!(launch_flags(), 2);
        set_narrow(Some(false));
        assert_eq!(launch_flags(), 0);
        set_idle_tails(Some(true));
        assert_eq!(launch_flags(), 1);
        set_narrow(Some(true));
        assert_eq!(launch_flags(), 3);
        set_idle_tails(None);
        set_narrow(None);
        assert_eq!(launch_flags(), 3);
    }
}
