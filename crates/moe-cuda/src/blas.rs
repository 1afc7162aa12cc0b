//! cuBLAS, for the expert GEMMs: one handle per device on the device's stream, opened at the
//! first GEMM (libcublas.so.13 is loaded then, with dlopen: a machine without it can still run
//! every other op, and the GEMM ops say why they cannot run).
//!
//! [`gemm`] multiplies row-major matrices (the layout of every tensor here): `C = op(A) @ op(B)`
//! with f32, bf16 or f16 inputs, f32 accumulation (`CUBLAS_COMPUTE_32F`: no TF32, no reduced
//! precision reductions) and an f32, bf16 or f16 output.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use moe_core::tensor::DType;

use crate::compile::panic_message;
use crate::device::Device;
use crate::error::{Error, Result};

/// Opens cuBLAS on `dev`'s stream. Errors say why (library missing, handle creation failed).
pub(crate) fn open(dev: &Device) -> Result<CudaBlas> {
    let stream = dev.stream();
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "libcublas.so.13 not found (the expert GEMMs need cuBLAS: install the CUDA 13 cuBLAS library or add its folder to LD_LIBRARY_PATH)".into(),
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| CudaBlas::new(stream.clone()))) {
        Ok(Ok(b)) => {
            // Pedantic: f32 GEMMs stay f32 (no TF32), and no reduced-precision split-K reductions.
            unsafe { blas_sys::cublasSetMathMode(*b.handle(), blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH) }
                .result()
                .map_err(|e| Error::Cuda(format!("cublasSetMathMode failed: {e}")))?;
            Ok(b)
        }
        Ok(Err(e)) => Err(Error::Cuda(format!("creating the cuBLAS handle failed: {e}"))),
        Err(panic) => Err(Error::Unavailable(format!("libcublas failed to load: {}", panic_message(&panic)))),
    }
}

fn data_type(dtype: DType) -> Result<blas_sys::cudaDataType_t> {
    Ok(match dtype {
        DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        other => return Err(Error::Cuda(format!("no GEMM for {} (a bug in moe-dispatch)", other.name()))),
    })
}

/// A row-major matrix operand on the GPU: the device address of its first element, its dtype,
/// and whether it is used transposed (`trans`: stored `[cols, rows]` of the product's view).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub trans: bool,
}

/// A row-major output `[m, n]`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub ptr: u64,
    pub dtype: DType,
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("GEMM {what} = {v} exceeds cuBLAS's int32 sizes")))
}

/// `C [m, n] = op(A) [m, k] @ op(B) [k, n] + beta * C`, all row-major and dense (leading
/// dimension = row width). `A` and `B` must share a dtype (cuBLAS's rule). Nothing runs when
/// `m` or `n` is 0; with `k` = 0 cuBLAS writes `beta * C`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(dev: &Device, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: Output, beta: f32) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    dev.span(|| format!("cublas: gemm [{m}, {k}] x [{k}, {n}]"), || gemm_with(dev.blas()?, m, n, k, a, b, c, beta))
}

/// [`gemm`] on a given handle (and so on its stream).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(blas: &CudaBlas, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: Output, beta: f32) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if a.dtype != b.dtype {
        return Err(Error::Cuda(format!("GEMM operands of two dtypes ({} and {}): a bug in moe-dispatch", a.dtype.name(), b.dtype.name())));
    }
    let handle = *blas.handle();
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands. A row-major [r, c]
    // matrix is a column-major [c, r] one with leading dimension c.
    let (mi, ni, ki) = (int("m", m)?, int("n", n)?, int("k", k)?);
    let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let lda = if a.trans { mi } else { ki };
    let ldb = if b.trans { ki } else { ni };
    let (alpha, beta) = (1.0f32, beta);
    unsafe {
        blas::gemm_ex(
            handle,
            op(b.trans),
            op(a.trans),
            ni,
            mi,
            ki,
            &alpha as *const f32 as *const _,
            b.ptr as *const _,
            data_type(b.dtype)?,
            ldb.max(1),
            a.ptr as *const _,
            data_type(a.dtype)?,
            lda.max(1),
            &beta as *const f32 as *const _,
            c.ptr as *mut _,
            data_type(c.dtype)?,
            ni,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Cuda(format!("cublasGemmEx ([{m}, {k}] @ [{k}, {n}], {} -> {}) failed: {e}", a.dtype.name(), c.dtype.name())))
}

/// One product of a grouped GEMM: `C [m, n] = op(A) [m, k] @ op(B) [k, n]` at these addresses.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

/// [`gemm_with`] for one [`Problem`] (`a`, `b`: dtype and transposed; C overwritten).
pub fn gemm_problem(blas: &CudaBlas, q: &Problem, a: (DType, bool), b: (DType, bool), c: DType) -> Result<()> {
    gemm_with(
        blas,
        q.m,
        q.n,
        q.k,
        Operand { ptr: q.a, dtype: a.0, trans: a.1 },
        Operand { ptr: q.b, dtype: b.0, trans: b.1 },
        Output { ptr: q.c, dtype: c },
        0.0,
    )
}

/// Many GEMMs of one dtype and transpose pattern (the experts' per-expert products) in one
/// cuBLAS call (`cublasGemmGroupedBatchedEx`, one group per problem), else — where this cuBLAS
/// does not offer it for these types — one `gemm` each. Problems with `m` or `n` = 0 are
/// skipped; `k` = 0 ones write zeros.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped(
    dev: &Device,
    problems: &[Problem],
    a_dtype: DType,
    trans_a: bool,
    b_dtype: DType,
    trans_b: bool,
    c_dtype: DType,
) -> Result<()> {
    let live: Vec<Problem> = problems.iter().copied().filter(|p| p.m > 0 && p.n > 0).collect();
    if live.is_empty() {
        return Ok(());
    }
    let one = |p: &Problem| {
        gemm(
            dev,
            p.m,
            p.n,
            p.k,
            Operand { ptr: p.a, dtype: a_dtype, trans: trans_a },
            Operand { ptr: p.b, dtype: b_dtype, trans: trans_b },
            Output { ptr: p.c, dtype: c_dtype },
            0.0,
        )
    };
    if live.len() == 1 || live.iter().any(|p| p.k == 0) || a_dtype != b_dtype {
        return live.iter().try_for_each(one);
    }
    let handle = *dev.blas()?.handle();
    let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let g = live.len();
    // column-major view, as in `gemm`: C^T = op(B)^T op(A)^T
    let mut ms = Vec::with_capacity(g);
    let mut ns = Vec::with_capacity(g);
    let mut ks = Vec::with_capacity(g);
    let mut ldas = Vec::with_capacity(g);
    let mut ldbs = Vec::with_capacity(g);
    let mut ldcs = Vec::with_capacity(g);
    for p in &live {
        let (mi, ni, ki) = (int("m", p.m)?, int("n", p.n)?, int("k", p.k)?);
        ms.push(ni);
        ns.push(mi);
        ks.push(ki);
        ldbs.push(if trans_a { mi } else { ki }); // A is cuBLAS's second operand
        ldas.push(if trans_b { ki } else { ni }); // B is its first
        ldcs.push(ni);
    }
    let ta = vec![op(trans_b); g];
    let tb = vec![op(trans_a); g];
    let alpha = vec![1.0f32; g];
    let beta = vec![0.0f32; g];
    let sizes = vec![1i32; g];
    let mut ptrs: Vec<u64> = Vec::with_capacity(3 * g);
    ptrs.extend(live.iter().map(|p| p.b));
    ptrs.extend(live.iter().map(|p| p.a));
    ptrs.extend(live.iter().map(|p| p.c));
    let d_ptrs = dev.upload("the grouped GEMM's pointers", &ptrs)?;
    let base = d_ptrs.device_ptr(dev);
    let status = unsafe {
        blas_sys::cublasGemmGroupedBatchedEx(
            handle,
            ta.as_ptr(),
            tb.as_ptr(),
            ms.as_ptr(),
            ns.as_ptr(),
            ks.as_ptr(),
            alpha.as_ptr() as *const _,
            base as *const *const _,
            data_type(b_dtype)?,
            ldas.as_ptr(),
            (base + 8 * g as u64) as *const *const _,
            data_type(a_dtype)?,
            ldbs.as_ptr(),
            beta.as_ptr() as *const _,
            (base + 16 * g as u64) as *const *mut _,
            data_type(c_dtype)?,
            ldcs.as_ptr(),
            g as i32,
            sizes.as_ptr(),
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    };
    match status {
        // (the pointer array is freed stream-ordered, after the GEMMs that read it)
        blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => live.iter().try_for_each(one),
        other => Err(Error::Cuda(format!(
            "cublasGemmGroupedBatchedEx ({g} problems, {} -> {}) failed: {other:?}",
            a_dtype.name(),
            c_dtype.name()
        ))),
    }
}

/// Streams for many small GEMMs at once: [`SideBySide::STREAMS`] streams, each with a cuBLAS
/// handle (pedantic math, as [`open`]) told by `cublasSetSmCountTarget` to size its kernels for
/// the SM count / STREAMS, so that GEMMs on different streams run together instead of each
/// taking the whole GPU for a fraction of a wave. The experts' default for many GEMMs
/// (`MOE_DISPATCH_GEMM_STREAMS=off` turns it off; see `experts::side_by_side` for the numbers);
/// with 8 experts of ~2048 rows it was slower (67-70% of the bf16 rate against 94-98%), hence
/// [`SideBySide::MIN_PROBLEMS`].
pub struct SideBySide {
    lanes: Vec<(std::sync::Arc<cudarc::driver::CudaStream>, CudaBlas)>,
    sms: i32,
    /// (streams in use, SM target of their handles) as last set
    shape: std::sync::Mutex<(usize, i32)>,
}

/// How many streams [`SideBySide::run`] uses (`MOE_DISPATCH_GEMM_STREAMS` = a number, or
/// [`set_side_streams`]); [`SideBySide::STREAMS`] by default.
static SIDE_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Whether the handles are told the SM count / streams (1, the default) or not (2).
static SIDE_TARGET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Overrides the side-by-side shape (for measurements): `streams` (1..=[`SideBySide::MAX_STREAMS`];
/// 0: the default) and whether each handle is told the SM count / streams.
pub fn set_side_streams(streams: usize, sm_target: bool) {
    SIDE_STREAMS.store(streams.min(SideBySide::MAX_STREAMS), std::sync::atomic::Ordering::Relaxed);
    SIDE_TARGET.store(if sm_target { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

fn side_streams() -> usize {
    match SIDE_STREAMS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let n = std::env::var("MOE_DISPATCH_GEMM_STREAMS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .map_or(SideBySide::STREAMS, |n| n.min(SideBySide::MAX_STREAMS));
            SIDE_STREAMS.store(n, std::sync::atomic::Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// The side streams' priority: by default the greatest the device offers, so that the GPU
/// starts the small weight-gradient GEMMs as they arrive and fills the rest of its SMs with the
/// big batched token-side ones queued before them on the device's stream (H200, fine-grained
/// backward GEMMs, two processes of three rounds: 79-84% of the bf16 rate against 74-79% at
/// normal priority and 71-74% a step at a time); `MOE_DISPATCH_GEMM_PRIORITY=normal` gives them
/// the default streams' priority.
fn side_priority() -> Result<Option<i32>> {
    if matches!(std::env::var("MOE_DISPATCH_GEMM_PRIORITY").as_deref(), Ok("normal")) {
        return Ok(None);
    }
    let (_, greatest) =
        cudarc::driver::result::stream::get_priority_range().map_err(|e| Error::driver("reading the stream priority range", e))?;
    Ok(Some(greatest))
}

impl SideBySide {
    pub const STREAMS: usize = 4;
    /// Streams opened (the most [`set_side_streams`] may ask for).
    pub const MAX_STREAMS: usize = 8;
    /// Fewer independent GEMMs than this run one after another on the device's stream.
    pub const MIN_PROBLEMS: usize = 16;

    pub(crate) fn open(dev: &Device) -> Result<SideBySide> {
        dev.blas()?; // the library loads (or says why not) as for one handle
        let sms = dev.sm_count() as i32;
        let priority = side_priority()?;
        let lanes = (0..Self::MAX_STREAMS)
            .map(|_| {
                let stream = match priority {
                    Some(p) => dev.context().new_stream_with_priority(p),
                    None => dev.context().new_stream(),
                }
                .map_err(|e| Error::driver("creating a GEMM stream", e))?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Cuda(format!("creating a cuBLAS handle failed: {e}")))?;
                unsafe {
                    blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH)
                        .result()
                        .map_err(|e| Error::Cuda(format!("cublasSetMathMode failed: {e}")))?;
                }
                Ok((stream, blas))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SideBySide { lanes, sms, shape: std::sync::Mutex::new((0, -1)) })
    }

    /// The lanes in use, their handles told the SM target the settings ask for.
    fn lanes_in_use(&self) -> Result<&[(std::sync::Arc<cudarc::driver::CudaStream>, CudaBlas)]> {
        let n = side_streams().clamp(1, self.lanes.len());
        let target = if SIDE_TARGET.load(std::sync::atomic::Ordering::Relaxed) == 2 { 0 } else { (self.sms / n as i32).max(1) };
        let mut shape = self.shape.lock().unwrap_or_else(|p| p.into_inner());
        if *shape != (n, target) {
            for (_, blas) in &self.lanes[..n] {
                unsafe { blas_sys::cublasSetSmCountTarget(*blas.handle(), target) }
                    .result()
                    .map_err(|e| Error::Cuda(format!("cublasSetSmCountTarget failed: {e}")))?;
            }
            *shape = (n, target);
        }
        Ok(&self.lanes[..n])
    }

    /// Runs `problems` (independent GEMMs) round-robin over the streams in use, after the work
    /// queued on the device's stream, which then waits for all of them. Problem i always runs on
    /// stream i % streams with the same handle: the same kernels, so the same bits, call after
    /// call (for one stream count).
    pub fn run(&self, dev: &Device, problems: &[Problem], a: (DType, bool), b: (DType, bool), c: DType) -> Result<()> {
        let mut queue = self.queue(dev)?;
        let now = mark(dev)?;
        queue.push(&now, problems, a, b, c)?;
        queue.join()
    }

    /// A [`SideQueue`] on the streams in use: GEMMs queued on it run beside the device's stream
    /// (each batch after a [`mark`] of it) until [`SideQueue::join`].
    pub fn queue<'a>(&'a self, dev: &'a Device) -> Result<SideQueue<'a>> {
        Ok(SideQueue { dev, lanes: self.lanes_in_use()?, joined: false })
    }
}

/// An event at the device stream's current position: what is queued there so far.
pub fn mark(dev: &Device) -> Result<cudarc::driver::CudaEvent> {
    dev.stream().record_event(None).map_err(|e| Error::driver("recording an event", e))
}

/// GEMMs running beside the device's stream on [`SideBySide`]'s streams, which the device's
/// stream waits for at [`SideQueue::join`] (or, should the caller return early with an error,
/// when the queue is dropped: nothing later on the device's stream, a free included, overtakes
/// them). The experts' backward queues its weight gradients here, after the token-side GEMMs
/// on the device's stream: the host queues the 2 x 64 small cuBLAS calls (~10 us each) while
/// the GPU runs the big batched ones, and each fills the other's gaps.
pub struct SideQueue<'a> {
    dev: &'a Device,
    lanes: &'a [(std::sync::Arc<cudarc::driver::CudaStream>, CudaBlas)],
    joined: bool,
}

impl SideQueue<'_> {
    /// Queues `problems` (independent GEMMs) after `after` (a [`mark`] of the device's stream),
    /// problem i on stream i % streams, as [`SideBySide::run`].
    pub fn push(
        &mut self,
        after: &cudarc::driver::CudaEvent,
        problems: &[Problem],
        a: (DType, bool),
        b: (DType, bool),
        c: DType,
    ) -> Result<()> {
        for (stream, _) in self.lanes {
            stream.wait(after).map_err(|e| Error::driver("ordering the GEMM streams", e))?;
        }
        problems.iter().enumerate().try_for_each(|(i, q)| gemm_problem(&self.lanes[i % self.lanes.len()].1, q, a, b, c))
    }

    /// The device's stream waits for everything queued here.
    pub fn join(mut self) -> Result<()> {
        self.joined = true;
        self.join_lanes()
    }

    fn join_lanes(&self) -> Result<()> {
        let main = self.dev.stream();
        let mut first = Ok(());
        // every lane, even after an error
        for (stream, _) in self.lanes {
            if let Err(e) = main.join(stream) {
                if first.is_ok() {
                    first = Err(Error::driver("joining the GEMM streams", e));
                }
            }
        }
        first
    }
}

impl Drop for SideQueue<'_> {
    fn drop(&mut self) {
        if !self.joined {
            let _ = self.join_lanes();
        }
    }
}

/// Many GEMMs `C_i [m_i, n] = A_i [m_i, k] @ op(B_i) [k, n]` (A not transposed, one `n` and `k`
/// for all: the experts' token-side products) cut into row blocks of `block` rows so that they
/// run as two batched cuBLAS calls (`cublasGemmBatchedEx`, every problem `[block, k] @ [k, n]`)
/// instead of one call each: with 64 experts of ~768 rows, one expert's product fills only half
/// of an H100's SMs for its short life, while the blocks of all of them fill it many times over.
///
/// An expert of `m >= block` rows gives its `m / block` whole blocks to the first call and, when
/// `block` does not divide `m`, its last `block` rows (rows `m - block .. m`, overlapping its last
/// whole block) to the second, which runs after the first and rewrites the overlap with the
/// same rows of the same product: every row is a dot product over the same `k` values whichever
/// block computes it, nothing is read or written outside the expert's rows, and the result is the
/// same call after call. Problems with fewer rows than `block` run one cuBLAS call each.
///
/// Returns false (nothing queued) where the problems do not fit this shape (A transposed, or
/// several `n` or `k`); the caller then runs them another way.
pub fn gemm_row_blocks(dev: &Device, problems: &[Problem], a: (DType, bool), b: (DType, bool), c: DType, block: usize) -> Result<bool> {
    let live: Vec<Problem> = problems.iter().copied().filter(|p| p.m > 0 && p.n > 0).collect();
    let Some(first) = live.first() else { return Ok(true) };
    let (n, k) = (first.n, first.k);
    if a.1 || a.0 != b.0 || block == 0 || k == 0 || live.iter().any(|p| p.n != n || p.k != k) {
        return Ok(false);
    }
    let (ea, ec) = (a.0.size() as u64, c.size() as u64);
    let row_a = k as u64 * ea;
    let row_c = n as u64 * ec;
    // (a, b, c) addresses of each block: the whole blocks, then the tails
    let mut whole: Vec<[u64; 3]> = Vec::new();
    let mut tails: Vec<[u64; 3]> = Vec::new();
    let mut small: Vec<Problem> = Vec::new();
    for p in &live {
        if p.m < block {
            small.push(*p);
            continue;
        }
        for j in 0..p.m / block {
            let r = (j * block) as u64;
            whole.push([p.a + r * row_a, p.b, p.c + r * row_c]);
        }
        if p.m % block != 0 {
            let r = (p.m - block) as u64;
            tails.push([p.a + r * row_a, p.b, p.c + r * row_c]);
        }
    }
    let blas = dev.blas()?;
    gemm_batched(dev, blas, &whole, block, n, k, a.0, b, c)?;
    gemm_batched(dev, blas, &tails, block, n, k, a.0, b, c)?;
    small.iter().try_for_each(|q| gemm_problem(blas, q, a, b, c))?;
    Ok(true)
}

/// One `cublasGemmBatchedEx` call: for each `[a, b, c]`, row-major `C [m, n] = A [m, k] @
/// op(B) [k, n]` (A not transposed).
#[allow(clippy::too_many_arguments)]
fn gemm_batched(
    dev: &Device,
    blas: &CudaBlas,
    items: &[[u64; 3]],
    m: usize,
    n: usize,
    k: usize,
    a_dtype: DType,
    b: (DType, bool),
    c_dtype: DType,
) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let g = items.len();
    let (mi, ni, ki, count) = (int("m", m)?, int("n", n)?, int("k", k)?, int("batch count", g)?);
    // column-major view, as in `gemm`: C^T = op(B)^T A^T; the pointer arrays B, A, C
    let mut ptrs: Vec<u64> = Vec::with_capacity(3 * g);
    ptrs.extend(items.iter().map(|x| x[1]));
    ptrs.extend(items.iter().map(|x| x[0]));
    ptrs.extend(items.iter().map(|x| x[2]));
    let d_ptrs = dev.upload("the batched GEMM's pointers", &ptrs)?;
    let base = d_ptrs.device_ptr(dev);
    let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let ldb = if b.1 { ki } else { ni };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let status = unsafe {
        blas_sys::cublasGemmBatchedEx(
            *blas.handle(),
            op(b.1),
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            &alpha as *const f32 as *const _,
            base as *const *const _,
            data_type(b.0)?,
            ldb,
            (base + 8 * g as u64) as *const *const _,
            data_type(a_dtype)?,
            ki,
            &beta as *const f32 as *const _,
            (base + 16 * g as u64) as *mut *mut _,
            data_type(c_dtype)?,
            ni,
            count,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    // (the pointer array is freed in stream order, after the GEMMs that read it)
    match status {
        blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(Error::Cuda(format!(
            "cublasGemmBatchedEx ({g} x [{m}, {k}] @ [{k}, {n}], {} -> {}) failed: {other:?}",
            a_dtype.name(),
            c_dtype.name()
        ))),
    }
}
