//! cuBLASLt, for choosing among GEMM algorithms: [`Lt::candidates`] lists what cuBLASLt's
//! heuristic offers for a product (best first, with each one's tile, split-K, stages and
//! cluster), and [`Lt::run`] runs a product with a chosen one. libcublasLt.so.13 is loaded at
//! first use (dlopen), like cuBLAS.
//!
//! Products are row-major as in [`crate::blas::gemm`] (`C [m, n] = op(A) [m, k] @ op(B) [k, n]`,
//! f32 accumulation), mapped to cuBLASLt's column-major view by swapping the operands.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::sys as lt;
use moe_core::tensor::DType;

use crate::blas::Problem;
use crate::compile::panic_message;
use crate::device::{Buffer, Device};
use crate::error::{Error, Result};

/// Workspace offered to cuBLASLt's algorithms (split-K and stream-K partial sums).
const WORKSPACE: usize = 32 << 20;

/// A cuBLASLt handle and its workspace on a device's stream.
pub struct Lt {
    handle: lt::cublasLtHandle_t,
    /// [`WORKSPACE`] bytes ([`Lt::open`]), or none ([`Lt::open_bare`]: algorithms that need none).
    workspace: Option<Buffer>,
    /// [`Lt::matmul_plus`]'s descriptors and algorithm by product shape and dtypes, made once
    /// (`None`: cuBLASLt offers no algorithm for them).
    plans: Mutex<HashMap<PlanKey, Option<Arc<Plan>>>>,
}

/// A product's shape and dtypes: `(m, n, k, A, B, C)`.
type PlanKey = (usize, usize, usize, (DType, bool), (DType, bool), DType);

/// The descriptors of one product and the heuristic's first algorithm for them.
struct Plan {
    d: Descs,
    algo: Candidate,
}

// The descriptors are read-only after creation and used with the device's order.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

// The handle is used from one thread at a time (callers hold the device's order).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

/// One algorithm cuBLASLt offers for a product, and what it is.
#[derive(Clone, Copy)]
pub struct Candidate {
    pub algo: lt::cublasLtMatmulAlgo_t,
    pub workspace: usize,
    pub waves: f32,
    pub tile: i32,
    pub split_k: i32,
    pub reduction: i32,
    pub stages: i32,
    pub cluster: i32,
}

impl Candidate {
    /// e.g. "tile 24 splitK 1 red 0 stages 19 cluster 2 waves 1.33"
    pub fn describe(&self) -> String {
        format!(
            "tile {} splitK {} red {} stages {} cluster {} waves {:.2}",
            self.tile, self.split_k, self.reduction, self.stages, self.cluster, self.waves
        )
    }
}

fn data_type(d: DType) -> Result<lt::cudaDataType> {
    Ok(match d {
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
        other => return Err(Error::Cuda(format!("no cuBLASLt GEMM for {} (a bug in moe-dispatch)", other.name()))),
    })
}

fn check(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what} failed: {s:?}")))
    }
}

/// The descriptors of one product shape (freed on drop).
struct Descs {
    op: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
}

impl Drop for Descs {
    fn drop(&mut self) {
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.a);
            lt::cublasLtMatrixLayoutDestroy(self.b);
            lt::cublasLtMatrixLayoutDestroy(self.c);
            lt::cublasLtMatmulDescDestroy(self.op);
        }
    }
}

fn layout(d: DType, rows: usize, cols: usize, ld: usize) -> Result<lt::cublasLtMatrixLayout_t> {
    let mut l = std::ptr::null_mut();
    check("cublasLtMatrixLayoutCreate", unsafe {
        lt::cublasLtMatrixLayoutCreate(&mut l, data_type(d)?, rows as u64, cols as u64, ld as i64)
    })?;
    Ok(l)
}

/// Row-major `C [m, n] = op(A) [m, k] @ op(B) [k, n]` as cuBLASLt's column-major
/// `C^T [n, m] = op(B)^T op(A)^T`: its first operand is B, its second A.
fn descs(m: usize, n: usize, k: usize, a: (DType, bool), b: (DType, bool), c: DType) -> Result<Descs> {
    let mut op = std::ptr::null_mut();
    check("cublasLtMatmulDescCreate", unsafe {
        lt::cublasLtMatmulDescCreate(&mut op, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType::CUDA_R_32F)
    })?;
    // cublasOperation_t (cuBLAS's): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, as an int32 attribute
    let trans = |t: bool| -> i32 {
        if t {
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32
        } else {
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32
        }
    };
    let (ta, tb) = (trans(b.1), trans(a.1));
    unsafe {
        check(
            "setting TRANSA",
            lt::cublasLtMatmulDescSetAttribute(
                op,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const _,
                std::mem::size_of_val(&ta),
            ),
        )?;
        check(
            "setting TRANSB",
            lt::cublasLtMatmulDescSetAttribute(
                op,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const _ as *const _,
                std::mem::size_of_val(&tb),
            ),
        )?;
    }
    // stored shapes, column-major: B row-major [k, n] is [n, k] (ld n), or [k, n] (ld k) when
    // transposed (stored [n, k] row-major); A likewise
    let la = if b.1 { layout(b.0, k, n, k)? } else { layout(b.0, n, k, n)? };
    let lb = if a.1 { layout(a.0, m, k, m)? } else { layout(a.0, k, m, k)? };
    let lc = layout(c, n, m, n)?;
    Ok(Descs { op, a: la, b: lb, c: lc })
}

fn config_attr(algo: &lt::cublasLtMatmulAlgo_t, attr: lt::cublasLtMatmulAlgoConfigAttributes_t) -> i32 {
    let mut v: u32 = 0;
    let mut written = 0usize;
    let s = unsafe { lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &mut v as *mut u32 as *mut _, 4, &mut written) };
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        v as i32
    } else {
        -1
    }
}

impl Lt {
    /// Opens cuBLASLt with a workspace of [`WORKSPACE`] bytes (the benchmarks' choice among
    /// algorithms; errors say why: library missing, handle creation failed).
    pub fn open(dev: &Device) -> Result<Lt> {
        let mut lt = Lt::open_bare()?;
        lt.workspace = Some(dev.alloc("the cuBLASLt workspace", WORKSPACE)?);
        Ok(lt)
    }

    /// Opens cuBLASLt with no workspace: its heuristic offers the algorithms that need none (no
    /// split-K partial sums), and the handle holds no device memory ([`Device::lt`]).
    pub fn open_bare() -> Result<Lt> {
        if !unsafe { lt::is_culib_present() } {
            return Err(Error::Unavailable("libcublasLt.so.13 not found".into()));
        }
        let handle = match catch_unwind(AssertUnwindSafe(|| {
            let mut h = std::ptr::null_mut();
            check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut h) }).map(|_| h)
        })) {
            Ok(r) => r?,
            Err(panic) => return Err(Error::Unavailable(format!("libcublasLt failed to load: {}", panic_message(&panic)))),
        };
        Ok(Lt { handle, workspace: None, plans: Mutex::new(HashMap::new()) })
    }

    /// The workspace's bytes and address (0 and null without one).
    fn workspace(&self, dev: &Device) -> (usize, u64) {
        self.workspace.as_ref().map_or((0, 0), |w| (WORKSPACE, w.device_ptr(dev)))
    }

    /// Up to `count` algorithms for the product, cuBLASLt's heuristic's order (best first).
    #[allow(clippy::too_many_arguments)]
    pub fn candidates(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: (DType, bool),
        b: (DType, bool),
        c: DType,
        count: usize,
    ) -> Result<Vec<Candidate>> {
        self.candidates_for(&descs(m, n, k, a, b, c)?, count)
    }

    fn candidates_for(&self, d: &Descs, count: usize) -> Result<Vec<Candidate>> {
        let mut pref = std::ptr::null_mut();
        check("cublasLtMatmulPreferenceCreate", unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) })?;
        let ws = self.workspace.as_ref().map_or(0, |_| WORKSPACE as u64);
        let mut results = vec![unsafe { std::mem::zeroed::<lt::cublasLtMatmulHeuristicResult_t>() }; count.max(1)];
        let mut returned = 0i32;
        let status = unsafe {
            check(
                "setting the workspace preference",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    8,
                ),
            )
            .and_then(|_| {
                check(
                    "cublasLtMatmulAlgoGetHeuristic",
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        d.op,
                        d.a,
                        d.b,
                        d.c,
                        d.c,
                        pref,
                        results.len() as i32,
                        results.as_mut_ptr(),
                        &mut returned,
                    ),
                )
            })
        };
        unsafe { lt::cublasLtMatmulPreferenceDestroy(pref) };
        status?;
        use lt::cublasLtMatmulAlgoConfigAttributes_t as A;
        Ok(results[..returned.max(0) as usize]
            .iter()
            .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| Candidate {
                algo: r.algo,
                workspace: r.workspaceSize,
                waves: r.wavesCount,
                tile: config_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_TILE_ID),
                split_k: config_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                reduction: config_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                stages: config_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
                cluster: config_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
            })
            .collect())
    }

    /// Host cost measurement: `count` calls of one product (the descriptors made once) with `algo`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_repeated(
        &self,
        dev: &Device,
        q: &Problem,
        a: (DType, bool),
        b: (DType, bool),
        c: DType,
        algo: &Candidate,
        count: usize,
    ) -> Result<()> {
        let d = descs(q.m, q.n, q.k, a, b, c)?;
        (0..count).try_for_each(|_| self.matmul(dev, &d, q, algo))
    }

    /// Runs each problem with `algo` on the device's stream.
    pub fn run(&self, dev: &Device, problems: &[Problem], a: (DType, bool), b: (DType, bool), c: DType, algo: &Candidate) -> Result<()> {
        problems.iter().filter(|q| q.m > 0 && q.n > 0).try_for_each(|q| self.matmul(dev, &descs(q.m, q.n, q.k, a, b, c)?, q, algo))
    }

    /// `D = addend + op(A) op(B)` for `q` (`q.c` is D, a new buffer; `addend` another [m, n]
    /// matrix of C's dtype): cuBLASLt's epilogue adds the float32 accumulator and the addend
    /// widened in float32 (beta 1) and rounds the sum once to C's dtype. The heuristic's first
    /// algorithm for the shape, and its descriptors, are made at the first call and kept.
    /// `Ok(false)`, nothing queued, where cuBLASLt offers no algorithm for these dtypes.
    pub fn matmul_plus(&self, dev: &Device, q: &Problem, addend: u64, a: (DType, bool), b: (DType, bool), c: DType) -> Result<bool> {
        if q.m == 0 || q.n == 0 {
            return Ok(true);
        }
        let key = (q.m, q.n, q.k, a, b, c);
        let known = self.plans.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        let plan = match known {
            Some(p) => p,
            None => {
                let d = descs(q.m, q.n, q.k, a, b, c)?;
                // (a heuristic that fails or offers nothing: no algorithm for these dtypes)
                let p = self.candidates_for(&d, 1).ok().and_then(|c| c.first().copied()).map(|algo| Arc::new(Plan { d, algo }));
                self.plans.lock().unwrap_or_else(|p| p.into_inner()).insert(key, p.clone());
                p
            }
        };
        let Some(plan) = plan else { return Ok(false) };
        self.matmul_with(dev, &plan.d, q, addend, 1.0, &plan.algo)?;
        Ok(true)
    }

    /// One `cublasLtMatmul` of `q` (C overwritten) described by `d`, on the device's stream.
    fn matmul(&self, dev: &Device, d: &Descs, q: &Problem, algo: &Candidate) -> Result<()> {
        self.matmul_with(dev, d, q, q.c, 0.0, algo)
    }

    /// One `cublasLtMatmul`: `q.c = beta * addend + op(A) op(B)` (addend of C's layout; with
    /// beta 0 it is not read).
    fn matmul_with(&self, dev: &Device, d: &Descs, q: &Problem, addend: u64, beta: f32, algo: &Candidate) -> Result<()> {
        let alpha = 1.0f32;
        let (ws_bytes, ws_ptr) = self.workspace(dev);
        check("cublasLtMatmul", unsafe {
            lt::cublasLtMatmul(
                self.handle,
                d.op,
                &alpha as *const f32 as *const _,
                q.b as *const _,
                d.a,
                q.a as *const _,
                d.b,
                &beta as *const f32 as *const _,
                addend as *const _,
                d.c,
                q.c as *mut _,
                d.c,
                &algo.algo,
                ws_ptr as *mut _,
                ws_bytes,
                dev.stream().cu_stream() as lt::cudaStream_t,
            )
        })
    }
}
