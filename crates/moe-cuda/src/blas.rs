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
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "libcublas.so.13 not found (the expert GEMMs need cuBLAS: install the CUDA 13 cuBLAS library or add its folder to LD_LIBRARY_PATH)".into(),
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| CudaBlas::new(dev.stream().clone()))) {
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
    if a.dtype != b.dtype {
        return Err(Error::Cuda(format!("GEMM operands of two dtypes ({} and {}): a bug in moe-dispatch", a.dtype.name(), b.dtype.name())));
    }
    let handle = *dev.blas()?.handle();
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
