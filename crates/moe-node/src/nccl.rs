//! NCCL for expert parallelism between processes (`moe_cuda::nccl`), for `ts/ep-nccl.ts`:
//! `ncclInfo()` (does libnccl.so.2 load here, which version), `ncclUniqueId()` (rank 0's id, 128
//! bytes), `ncclCommStart(id, rank, size)` (starts joining, non-blocking: returns an `NcclComm` at
//! once) and the communicator's methods, whose waits run on libuv's worker threads so that the
//! event loop stays free (rank 0's rendezvous server keeps answering while it waits):
//! `waitReady(timeoutMs)`, `allGather(values, timeoutMs)`, `allToAllV(send, sendBytes,
//! recvBytes, timeoutMs)`, `allToAllVDevice(send, sendRows, recvRows, countsAgreed, timeoutMs)` (device
//! tensors, no host copies), `destroy(timeoutMs)`, and `abort()`. Only conversions here.
//!
//! Errors carry `code`: "TypeError"/"RangeError" (arguments), "NcclUnavailable", "NcclError",
//! "NcclTimeout" (not complete within the timeout: the communicator was aborted), "NcclAborted".

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_core::ErrorKind;
use moe_cuda::nccl::{self, Comm, NcclError, UniqueId};
use moe_cuda::tensor::DeviceTensor;
use moe_cuda::Device as Gpu;
use napi::bindgen_prelude::{AsyncTask, Buffer, Int32Array, JsObjectValue, JsValue, ToNapiValue, TypeName, Undefined};
use napi::{Env, Status, Task};
use napi_derive::napi;

use crate::cuda::CudaTensor;

/// What `ncclInfo()` returns: whether libnccl.so.2 loads here (no GPU is opened).
#[napi(object)]
pub struct NcclInfo {
    pub available: bool,
    /// Why not (absent when available).
    pub reason: Option<String>,
    /// e.g. "2.27.3"
    pub version: Option<String>,
    /// The library opened.
    pub path: Option<String>,
}

#[napi]
pub fn nccl_info() -> NcclInfo {
    match catch_unwind(nccl::info) {
        Ok(Ok(i)) => NcclInfo { available: true, reason: None, version: Some(i.version), path: Some(i.path) },
        Ok(Err(e)) => NcclInfo { available: false, reason: Some(e.to_string()), version: None, path: None },
        Err(_) => {
            NcclInfo { available: false, reason: Some("loading NCCL panicked (a bug in moe-dispatch)".into()), version: None, path: None }
        }
    }
}

fn sync_error(e: NcclError) -> napi::Error<String> {
    napi::Error::new(e.code().to_string(), e.to_string())
}

/// Runs `f`, catching panics; errors keep their code.
fn guarded<T>(f: impl FnOnce() -> nccl::Result<T>) -> napi::Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(sync_error),
        Err(_) => Err(napi::Error::new("Error".to_string(), "internal error in NCCL's binding (a bug in moe-dispatch)")),
    }
}

/// A new NCCL unique id (rank 0 makes it; 128 bytes).
#[napi]
pub fn nccl_unique_id() -> napi::Result<Buffer, String> {
    guarded(|| nccl::unique_id().map(|id| Buffer::from(id.0.to_vec())))
}

fn count(value: f64, arg: &str, min: f64) -> nccl::Result<usize> {
    if !value.is_finite() || value.fract() != 0.0 || value < min || value > 9_007_199_254_740_991.0 {
        return Err(NcclError::Argument(ErrorKind::RangeError, format!("{arg}: expected an integer >= {min}, got {value}")));
    }
    Ok(value as usize)
}

fn timeout(ms: f64) -> nccl::Result<Duration> {
    if !ms.is_finite() || ms <= 0.0 || ms > 2_147_483_647.0 {
        return Err(NcclError::Argument(
            ErrorKind::RangeError,
            format!("timeoutMs: expected a number of milliseconds > 0 and <= 2^31 - 1, got {ms}"),
        ));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// One rank's communicator. Its methods queue one operation at a time (the facade chains them).
#[napi]
pub struct NcclComm {
    comm: Arc<Mutex<Comm>>,
    cancel: Arc<AtomicBool>,
    rank: u32,
    size: u32,
}

/// Starts joining the group of `size` ranks as `rank` with rank 0's `id` (non-blocking), on the
/// process's GPU (`MOE_DISPATCH_CUDA_DEVICE`, default 0, of those `CUDA_VISIBLE_DEVICES` shows).
#[napi]
pub fn nccl_comm_start(id: &[u8], rank: f64, size: f64) -> napi::Result<NcclComm, String> {
    guarded(|| {
        let size = count(size, "size", 1.0)?;
        let rank = count(rank, "rank", 0.0)?;
        nccl::check_rank(rank, size)?;
        let id: [u8; 128] = id.try_into().map_err(|_| {
            NcclError::Argument(ErrorKind::RangeError, format!("id: expected the 128 bytes of an NCCL unique id, got {}", id.len()))
        })?;
        nccl::info()?;
        let dev = Gpu::global().map_err(|e| NcclError::Unavailable(e.to_string()))?;
        let comm = Comm::start(dev, &UniqueId(id), rank, size)?;
        let cancel = comm.cancel_flag();
        Ok(NcclComm { comm: Arc::new(Mutex::new(comm)), cancel, rank: rank as u32, size: size as u32 })
    })
}

/// What a [`CommTask`] runs on the communicator, on a worker thread.
type Job<T> = Box<dyn FnOnce(&mut Comm, &'static Gpu) -> nccl::Result<T> + Send>;

/// A wait on a worker thread: runs `job` on the communicator, then converts its result.
pub struct CommTask<T: Send + 'static, J> {
    comm: Arc<Mutex<Comm>>,
    job: Option<Job<T>>,
    to_js: fn(T) -> J,
}

impl<T: Send + 'static, J: ToNapiValue + TypeName> Task for CommTask<T, J> {
    type Output = nccl::Result<T>;
    type JsValue = J;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let Some(job) = self.job.take() else {
            return Ok(Err(NcclError::Cuda("a task ran twice (a bug in moe-dispatch)".into())));
        };
        let comm = self.comm.clone();
        let out = catch_unwind(AssertUnwindSafe(move || {
            let dev = Gpu::global().map_err(|e| NcclError::Unavailable(e.to_string()))?;
            let mut c = comm.lock().unwrap_or_else(|p| p.into_inner());
            job(&mut c, dev)
        }));
        Ok(out.unwrap_or_else(|_| Err(NcclError::Cuda("internal error in an NCCL wait (a bug in moe-dispatch)".into()))))
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> napi::Result<J> {
        match output {
            Ok(v) => Ok((self.to_js)(v)),
            Err(e) => Err(js_error(&env, &e)),
        }
    }
}

/// A JS Error with `code` set to the error's kind.
fn js_error(env: &Env, e: &NcclError) -> napi::Error {
    match env.create_error(napi::Error::new(Status::GenericFailure, e.to_string())) {
        Ok(mut obj) => match obj.set_named_property("code", e.code()) {
            Ok(()) => napi::Error::from(obj.to_unknown()),
            Err(err) => err,
        },
        Err(err) => err,
    }
}

impl NcclComm {
    fn task<T: Send + 'static, J: ToNapiValue + TypeName>(
        &self,
        job: impl FnOnce(&mut Comm, &'static Gpu) -> nccl::Result<T> + Send + 'static,
        to_js: fn(T) -> J,
    ) -> AsyncTask<CommTask<T, J>> {
        AsyncTask::new(CommTask { comm: self.comm.clone(), job: Some(Box::new(job)), to_js })
    }
}

fn undefined(_: ()) -> Undefined {}

#[napi]
impl NcclComm {
    #[napi(getter)]
    pub fn rank(&self) -> u32 {
        self.rank
    }

    #[napi(getter)]
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Resolves once every rank joined; rejects with code NcclTimeout after `timeoutMs` (the
    /// communicator is then aborted).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn wait_ready(&self, timeout_ms: f64) -> napi::Result<AsyncTask<CommTask<(), Undefined>>, String> {
        let t = guarded(|| timeout(timeout_ms))?;
        Ok(self.task(move |c, _| c.wait_init(t), undefined))
    }

    /// All-gather of an Int32Array (every rank the same length): every rank's values, rank after rank.
    #[napi(ts_return_type = "Promise<Int32Array>")]
    pub fn all_gather(&self, values: &[i32], timeout_ms: f64) -> napi::Result<AsyncTask<CommTask<Vec<i32>, Int32Array>>, String> {
        let t = guarded(|| timeout(timeout_ms))?;
        let values = values.to_vec();
        Ok(self.task(move |c, dev| c.all_gather_i32(dev, &values, t).map(|rows| rows.concat()), Int32Array::new))
    }

    /// All-to-all-v: `send` holds the bytes for rank 0, 1, ... (`sendBytes[j]` each); resolves to
    /// what ranks 0, 1, ... sent here (`recvBytes[s]` each), one buffer.
    #[napi(ts_return_type = "Promise<Buffer>")]
    pub fn all_to_all_v(
        &self,
        send: &[u8],
        send_bytes: Vec<f64>,
        recv_bytes: Vec<f64>,
        timeout_ms: f64,
    ) -> napi::Result<AsyncTask<CommTask<Vec<u8>, Buffer>>, String> {
        let (t, sizes, recv) = guarded(|| {
            let t = timeout(timeout_ms)?;
            let sizes =
                send_bytes.iter().enumerate().map(|(j, &b)| count(b, &format!("sendBytes[{j}]"), 0.0)).collect::<nccl::Result<Vec<_>>>()?;
            let recv =
                recv_bytes.iter().enumerate().map(|(s, &b)| count(b, &format!("recvBytes[{s}]"), 0.0)).collect::<nccl::Result<Vec<_>>>()?;
            if sizes.iter().sum::<usize>() != send.len() {
                return Err(NcclError::Argument(
                    ErrorKind::RangeError,
                    format!("sendBytes: they add up to {} bytes, send holds {}", sizes.iter().sum::<usize>(), send.len()),
                ));
            }
            Ok((t, sizes, recv))
        })?;
        let send = send.to_vec();
        Ok(self.task(
            move |c, dev| {
                let mut parts = Vec::with_capacity(sizes.len());
                let mut off = 0;
                for &b in &sizes {
                    parts.push(&send[off..off + b]);
                    off += b;
                }
                c.all_to_all_v_host(dev, &parts, &recv, t).map(|r| r.concat())
            },
            <Buffer as From<Vec<u8>>>::from,
        ))
    }

    /// All-to-all-v of device rows: `send` is a `[rows, hidden]` device tensor whose first
    /// `sendRows[0]` rows go to rank 0, the next `sendRows[1]` to rank 1, ...; resolves to a new
    /// `[sum recvRows, hidden]` device tensor of `send`'s dtype holding what ranks 0, 1, ... sent
    /// here (`recvRows[s]` rows each), over NCCL on the device (nothing crosses to the host). The
    /// row counts are all-gathered and checked first, unless `countsAgreed` (they came from one
    /// earlier all-gather: only this rank's own entry is checked). `send` must not be disposed
    /// before the promise settles.
    #[napi(ts_return_type = "Promise<NativeCudaTensor>")]
    pub fn all_to_all_v_device(
        &self,
        send: &CudaTensor,
        send_rows: Vec<f64>,
        recv_rows: Vec<f64>,
        counts_agreed: bool,
        timeout_ms: f64,
    ) -> napi::Result<AsyncTask<CommTask<DeviceTensor, CudaTensor>>, String> {
        let (t, dtype, hidden, range, sizes, recv) = guarded(|| {
            let t = timeout(timeout_ms)?;
            let x = send.get("send").map_err(|e| NcclError::Argument(ErrorKind::TypeError, e.to_string()))?;
            if x.shape.len() != 2 {
                return Err(NcclError::Argument(ErrorKind::RangeError, format!("send.shape: expected [rows, hidden], got {:?}", x.shape)));
            }
            let (rows, hidden) = (x.shape[0], x.shape[1]);
            let row_bytes = hidden * x.dtype.size();
            let rows_of = |v: &[f64], arg: &str| {
                v.iter().enumerate().map(|(j, &r)| count(r, &format!("{arg}[{j}]"), 0.0)).collect::<nccl::Result<Vec<_>>>()
            };
            let (sent, wanted) = (rows_of(&send_rows, "sendRows")?, rows_of(&recv_rows, "recvRows")?);
            if sent.iter().sum::<usize>() != rows {
                return Err(NcclError::Argument(
                    ErrorKind::RangeError,
                    format!("sendRows: they add up to {} rows, send has {rows}", sent.iter().sum::<usize>()),
                ));
            }
            let dev = Gpu::global().map_err(|e| NcclError::Unavailable(e.to_string()))?;
            let range = (x.buf.device_ptr(dev), x.buf.bytes());
            let sizes: Vec<usize> = sent.iter().map(|&r| r * row_bytes).collect();
            let recv: Vec<usize> = wanted.iter().map(|&r| r * row_bytes).collect();
            Ok((t, x.dtype, hidden, range, sizes, recv))
        })?;
        Ok(self.task(
            move |c, dev| {
                let total: usize = recv.iter().sum();
                // SAFETY: `range` is `send`'s live buffer, which the caller keeps until the promise settles.
                let buf = unsafe { c.all_to_all_v_rows(dev, range, &sizes, &recv, counts_agreed, t)? };
                let rows = if hidden == 0 { 0 } else { total / (hidden * dtype.size()) };
                Ok(DeviceTensor { dtype, shape: vec![rows, hidden], buf, plan: None, facts: Default::default() })
            },
            CudaTensor::wrap,
        ))
    }

    /// Finalises and destroys the communicator (an aborted one is just released).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn destroy(&self, timeout_ms: f64) -> napi::Result<AsyncTask<CommTask<(), Undefined>>, String> {
        let t = guarded(|| timeout(timeout_ms))?;
        Ok(self.task(move |c, _| c.destroy(t), undefined))
    }

    /// Aborts the communicator now, or, while a wait runs, makes that wait abort it (within a
    /// millisecond or so) and reject with code NcclAborted.
    #[napi]
    pub fn abort(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Ok(mut c) = self.comm.try_lock() {
            c.abort("aborted by the caller");
        }
    }
}
