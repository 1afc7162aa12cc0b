//! NCCL, for expert parallelism between processes (one GPU each): libnccl.so.2 opened at run time
//! (dlopen of the few functions used here: no link-time dependency, so the crate builds and its
//! tests run on machines with no CUDA and no NCCL), a communicator initialised NON-BLOCKING
//! (`ncclCommInitRankConfig` with `blocking = 0`, then `ncclCommGetAsyncError` polled until it
//! succeeds or a timeout passes, then `ncclCommAbort`), an all-gather and an all-to-all-v
//! (`ncclGroupStart` / `ncclSend` / `ncclRecv` per peer / `ncclGroupEnd`) on device buffers, and
//! host-buffer conveniences that upload, exchange and download.
//!
//! Every wait (initialisation, a collective's kernels, finalisation) polls with a deadline: a rank
//! that never joins or stops calling makes the others fail with [`NcclError::Timeout`] after
//! aborting the communicator, never hang. Every failure is an [`NcclError`] naming what failed;
//! nothing here panics on a missing library or a failed call.
//!
//! NVLink multicast (NVLS) stays off: `NCCL_NVLS_ENABLE=0` is set in the process environment
//! before NCCL is first called (it can take a shared host's GPUs out of service).
//!
//! The library is looked for at `$MOE_DISPATCH_NCCL` (the file or its folder), then by the dynamic
//! loader (`LD_LIBRARY_PATH`, ld.so.cache), then in the usual folders and in Python's
//! `nvidia/nccl/lib` (the `nvidia-nccl-cu13` wheel) under `/usr/local/lib/python3*` and
//! `/usr/lib/python3*`.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{result as drv, sys, CudaContext, CudaEvent, CudaStream};
use libloading::Library;
use moe_core::ErrorKind;

use crate::device::{Buffer, Device};

/// The library's file name (NCCL 2's soname).
pub const LIBRARY: &str = "libnccl.so.2";

// ---------------------------------------------------------------------------------------
// Errors

/// What went wrong with NCCL, by kind. `code()` is the `code` the N-API binding gives the
/// JavaScript error.
#[derive(Debug, Clone, PartialEq)]
pub enum NcclError {
    /// NCCL (or the GPU under it) cannot be used here: the reason (library missing, a symbol
    /// missing, CUDA unavailable).
    Unavailable(String),
    /// A bad argument (TypeError or RangeError), the message naming it.
    Argument(ErrorKind, String),
    /// An NCCL call failed: what was being done, the call, NCCL's result code and what NCCL says.
    Call { what: String, call: &'static str, result: i32, detail: String },
    /// A CUDA call around NCCL failed: what, and the driver's error.
    Cuda(String),
    /// `what` did not complete within `waited_ms` on `rank` of `size` (a rank never joined, died,
    /// or stopped making the same calls); the communicator was aborted.
    Timeout { what: String, rank: usize, size: usize, waited_ms: u64 },
    /// The communicator was aborted or destroyed before `what`: why.
    Aborted { what: String, cause: String },
}

impl NcclError {
    /// The JavaScript error `code`: "TypeError"/"RangeError" for arguments, else `Nccl*`.
    pub fn code(&self) -> &'static str {
        match self {
            NcclError::Unavailable(_) => "NcclUnavailable",
            NcclError::Argument(kind, _) => kind.js_name(),
            NcclError::Call { .. } | NcclError::Cuda(_) => "NcclError",
            NcclError::Timeout { .. } => "NcclTimeout",
            NcclError::Aborted { .. } => "NcclAborted",
        }
    }

    fn range(message: impl Into<String>) -> NcclError {
        NcclError::Argument(ErrorKind::RangeError, message.into())
    }

    fn cuda(what: impl std::fmt::Display, e: drv::DriverError) -> NcclError {
        match crate::Error::driver(what, e) {
            crate::Error::Cuda(m) => NcclError::Cuda(m),
            other => NcclError::Cuda(other.to_string()),
        }
    }
}

impl std::fmt::Display for NcclError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NcclError::Unavailable(reason) => write!(f, "NCCL is unavailable: {reason}"),
            NcclError::Argument(_, message) => write!(f, "{message}"),
            NcclError::Call { what, call, result, detail } => {
                write!(f, "{what}: {call} failed: {} ({result})", result_name(*result))?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
            NcclError::Cuda(message) => write!(f, "{message}"),
            NcclError::Timeout { what, rank, size, waited_ms } => write!(
                f,
                "{what}: rank {rank} of {size}: not complete after {waited_ms} ms (a rank did not join, died, or stopped making the same calls); the communicator was aborted"
            ),
            NcclError::Aborted { what, cause } => write!(f, "{what}: the communicator was aborted earlier ({cause})"),
        }
    }
}

impl std::error::Error for NcclError {}

pub type Result<T> = std::result::Result<T, NcclError>;

/// `ncclResult_t` values used here.
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

/// NCCL's name of a result code (`ncclResult_t`).
pub fn result_name(result: i32) -> &'static str {
    match result {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => "an unknown ncclResult_t",
    }
}

/// `NCCL_VERSION(x, y, z)` as a string: "2.27.3" (NCCL codes versions up to 2.8 as x*1000+y*100+z).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    }
}

// ---------------------------------------------------------------------------------------
// The library

/// `ncclUniqueId`: 128 opaque bytes rank 0 makes and every rank passes to the init.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// `ncclConfig_t` as NCCL 2.17 laid it out (`size`, `magic` and `version` let any later NCCL
/// read it: it copies `size` bytes over its defaults).
#[repr(C)]
struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: leave the field at NCCL's default.
const UNDEF_INT: c_int = c_int::MIN;

impl Config {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn non_blocking() -> Config {
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: 21700, // NCCL_VERSION(2, 17, 0): this struct's layout
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

type RawComm = *mut c_void;
/// `ncclDataType_t` values used here.
const NCCL_UINT8: c_int = 1;

struct Api {
    _lib: Library,
    version: i32,
    path: String,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank_config: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(RawComm) -> c_int,
    comm_finalize: unsafe extern "C" fn(RawComm) -> c_int,
    comm_destroy: unsafe extern "C" fn(RawComm) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, sys::CUstream) -> c_int,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, sys::CUstream) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, sys::CUstream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
}

// SAFETY: the function pointers and the library handle are immutable after loading.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// Folders searched after the loader's own search.
const DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/lib64", "/usr/local/nccl/lib", "/usr/local/lib", "/opt/nccl/lib"];

/// Where the library may be: `$MOE_DISPATCH_NCCL`, the loader's search (the bare name), the
/// usual folders, Python's nvidia wheels.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("MOE_DISPATCH_NCCL").filter(|p| !p.is_empty()).map(PathBuf::from) {
        out.push(if p.is_dir() { p.join(LIBRARY) } else { p });
    }
    out.push(PathBuf::from(LIBRARY));
    out.extend(DIRS.iter().map(|d| PathBuf::from(d).join(LIBRARY)));
    for root in ["/usr/local/lib", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(root) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pythons.sort();
        for py in pythons {
            for site in ["dist-packages", "site-packages"] {
                for sub in ["nvidia/nccl/lib", "nvidia/cu13/lib"] {
                    let p = py.join(site).join(sub).join(LIBRARY);
                    if p.exists() {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

fn load() -> std::result::Result<Api, String> {
    // NVLink multicast off in this process, before NCCL reads its environment (at its first call).
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    let mut tried = Vec::new();
    for path in candidates() {
        let bare = path.components().count() == 1;
        if !bare && !path.exists() {
            continue;
        }
        // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
        match unsafe { Library::new(&path) } {
            Ok(lib) => return symbols(lib, path.display().to_string()),
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!(
        "{LIBRARY} not found (install NCCL 2, e.g. the nvidia-nccl-cu13 wheel, and put its lib folder on LD_LIBRARY_PATH or set MOE_DISPATCH_NCCL to the library); tried {}",
        tried.join("; ")
    ))
}

fn symbols(lib: Library, path: String) -> std::result::Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the signature is NCCL 2's (nccl.h), with C enums as int.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{path} has no {}: {e} (not NCCL 2.18 or later?)", $name))?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym!("ncclGetVersion");
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { get_version(&mut version) };
    if r != NCCL_SUCCESS {
        return Err(format!("{path}: ncclGetVersion failed: {}", result_name(r)));
    }
    if version < 21800 {
        return Err(format!(
            "{path} is NCCL {}: 2.18 or later is needed (non-blocking communicators with ncclCommFinalize)",
            version_string(version)
        ));
    }
    Ok(Api {
        version,
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank_config: sym!("ncclCommInitRankConfig"),
        comm_get_async_error: sym!("ncclCommGetAsyncError"),
        comm_abort: sym!("ncclCommAbort"),
        comm_finalize: sym!("ncclCommFinalize"),
        comm_destroy: sym!("ncclCommDestroy"),
        all_gather: sym!("ncclAllGather"),
        send: sym!("ncclSend"),
        recv: sym!("ncclRecv"),
        group_start: sym!("ncclGroupStart"),
        group_end: sym!("ncclGroupEnd"),
        get_last_error: sym!("ncclGetLastError"),
        path,
        _lib: lib,
    })
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|reason| NcclError::Unavailable(reason.clone()))
}

/// What [`info`] reports about the library.
#[derive(Debug, Clone, PartialEq)]
pub struct NcclInfo {
    /// e.g. "2.27.3"
    pub version: String,
    /// The file opened (or the bare name, when the loader's search found it).
    pub path: String,
}

/// Opens NCCL (once per process) and says which; no GPU is touched.
pub fn info() -> Result<NcclInfo> {
    let a = api()?;
    Ok(NcclInfo { version: version_string(a.version), path: a.path.clone() })
}

/// A new unique id (`ncclGetUniqueId`): rank 0 makes it and hands it to the others. NCCL's
/// bootstrap root starts listening in this process at this call.
pub fn unique_id() -> Result<UniqueId> {
    let a = api()?;
    let mut id = UniqueId([0; 128]);
    // SAFETY: writes 128 bytes.
    let r = unsafe { (a.get_unique_id)(&mut id) };
    if r != NCCL_SUCCESS {
        return Err(call_error(a, std::ptr::null_mut(), "making the unique id", "ncclGetUniqueId", r));
    }
    Ok(id)
}

fn call_error(a: &Api, comm: RawComm, what: &str, call: &'static str, result: c_int) -> NcclError {
    let detail = if comm.is_null() {
        String::new()
    } else {
        // SAFETY: NCCL returns a static or comm-owned C string (or null).
        let p = unsafe { (a.get_last_error)(comm) };
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    NcclError::Call { what: what.to_string(), call, result, detail }
}

/// Checks `0 <= rank < size` and `size` within NCCL's int (RangeErrors naming them).
pub fn check_rank(rank: usize, size: usize) -> Result<()> {
    if size == 0 || size > i32::MAX as usize {
        return Err(NcclError::range(format!("size: expected an integer >= 1 and <= 2^31 - 1, got {size}")));
    }
    if rank >= size {
        return Err(NcclError::range(format!("rank: expected 0 <= rank < size = {size}, got {rank}")));
    }
    Ok(())
}

/// After the all-gather of every rank's `[sends to 0..size, expects from 0..size]` byte counts
/// (`table[r]`), checks that each rank expects from each rank what that rank sends it. Every rank
/// sees the same table, so every rank reports the same first mismatch.
pub fn check_exchange(table: &[Vec<u64>], size: usize) -> Result<()> {
    for (r, row) in table.iter().enumerate() {
        if row.len() != 2 * size {
            return Err(NcclError::range(format!("allToAllV: rank {r} gave {} byte counts, expected {}", row.len(), 2 * size)));
        }
    }
    for (r, row) in table.iter().enumerate() {
        for (s, source) in table.iter().enumerate() {
            let (expects, sends) = (row[size + s], source[r]);
            if expects != sends {
                return Err(NcclError::range(format!("allToAllV: rank {r} expects {expects} bytes from rank {s}, which sends {sends}")));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The communicator

#[derive(Debug, Clone, PartialEq)]
enum State {
    Initializing,
    Ready,
    Aborted(String),
    Destroyed,
}

/// One rank's NCCL communicator on a device, with its own stream. Not for concurrent use (every
/// method takes `&mut self`); it can move between threads (the N-API binding's waits run on
/// libuv's worker threads). Dropping a live communicator aborts it (never waits on the peers).
pub struct Comm {
    api: &'static Api,
    raw: RawComm,
    rank: usize,
    size: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    state: State,
    cancel: Arc<AtomicBool>,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (`&mut self`).
unsafe impl Send for Comm {}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {}, {:?})", self.rank, self.size, self.state)
    }
}

/// The longest [`Comm::abort`] waits for `ncclCommAbort`.
pub const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Sleeps a little longer each time: a few hundred yields, then 20 us up to 1 ms.
struct Backoff(u32);

impl Backoff {
    fn pause(&mut self) {
        self.0 += 1;
        if self.0 < 200 {
            std::thread::yield_now();
        } else {
            let us = (20u64 << ((self.0 - 200) / 50).min(6)).min(1000);
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

impl Comm {
    /// Starts joining the group (`ncclCommInitRankConfig`, non-blocking: returns at once). Then
    /// [`Comm::poll_init`] until it is ready, or [`Comm::wait_init`].
    pub fn start(dev: &Device, id: &UniqueId, rank: usize, size: usize) -> Result<Comm> {
        check_rank(rank, size)?;
        let api = api()?;
        let ctx = dev.context().clone();
        ctx.bind_to_thread().map_err(|e| NcclError::cuda("binding the CUDA context", e))?;
        let stream = ctx.new_stream().map_err(|e| NcclError::cuda("creating the NCCL stream", e))?;
        let mut config = Config::non_blocking();
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: `raw` receives the communicator; the id is passed by value; `config` lives across the call.
        let r = unsafe { (api.comm_init_rank_config)(&mut raw, size as c_int, *id, rank as c_int, &mut config) };
        if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS {
            let e = call_error(api, raw, &format!("rank {rank} of {size}: joining the group"), "ncclCommInitRankConfig", r);
            if !raw.is_null() {
                // SAFETY: a communicator NCCL returned; not used again.
                unsafe { (api.comm_abort)(raw) };
            }
            return Err(e);
        }
        if raw.is_null() {
            return Err(NcclError::Call {
                what: format!("rank {rank} of {size}: joining the group"),
                call: "ncclCommInitRankConfig",
                result: r,
                detail: "returned no communicator".into(),
            });
        }
        Ok(Comm { api, raw, rank, size, ctx, stream, state: State::Initializing, cancel: Arc::new(AtomicBool::new(false)) })
    }

    /// `start` then `wait_init`.
    pub fn init(dev: &Device, id: &UniqueId, rank: usize, size: usize, timeout: Duration) -> Result<Comm> {
        let mut c = Comm::start(dev, id, rank, size)?;
        c.wait_init(timeout)?;
        Ok(c)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether initialisation finished; Ready and later states are not an error.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// The stream NCCL's kernels run on (the device-buffer exchanges order it after the device's
    /// stream and the device's stream after it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A flag that, once set (from any thread), makes the current or next wait abort the
    /// communicator and fail with [`NcclError::Aborted`].
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    fn usable(&self, what: &str) -> Result<()> {
        match &self.state {
            State::Ready | State::Initializing => Ok(()),
            State::Aborted(cause) => Err(NcclError::Aborted { what: what.into(), cause: cause.clone() }),
            State::Destroyed => Err(NcclError::Aborted { what: what.into(), cause: "destroyed".into() }),
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| NcclError::cuda("binding the CUDA context", e))
    }

    /// Aborts the communicator (`ncclCommAbort`): pending and later operations fail. Idempotent.
    /// The abort runs on a thread of its own and is waited for at most [`ABORT_WAIT`]: should
    /// NCCL's abort itself hang (a peer's socket), this returns anyway and the thread is left
    /// to finish (the communicator is never used again).
    pub fn abort(&mut self, cause: &str) {
        if matches!(self.state, State::Initializing | State::Ready) {
            self.state = State::Aborted(cause.to_string());
            let (api, raw, ctx) = (self.api, self.raw as usize, self.ctx.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
                let _ = ctx.bind_to_thread();
                // SAFETY: a live communicator, not used again after this.
                let rc = unsafe { (api.comm_abort)(raw as RawComm) };
                let _ = tx.send(rc);
            });
            if spawned.is_ok() {
                let _ = rx.recv_timeout(ABORT_WAIT);
            } else {
                let _ = self.bind();
                // SAFETY: as above, on this thread when no thread can be started.
                unsafe { (self.api.comm_abort)(self.raw) };
            }
        }
    }

    /// `ncclCommGetAsyncError`: Ok(true) when idle, Ok(false) while an operation is in
    /// progress; an error aborts the communicator.
    fn async_state(&mut self, what: &str) -> Result<bool> {
        let mut state: c_int = NCCL_SUCCESS;
        // SAFETY: a live communicator; writes one int.
        let r = unsafe { (self.api.comm_get_async_error)(self.raw, &mut state) };
        let (call, code) =
            if r != NCCL_SUCCESS { ("ncclCommGetAsyncError", r) } else { ("the communicator (ncclCommGetAsyncError)", state) };
        match code {
            NCCL_SUCCESS => Ok(true),
            NCCL_IN_PROGRESS => Ok(false),
            _ => {
                let e = call_error(self.api, self.raw, what, call, code);
                self.abort(&e.to_string());
                Err(e)
            }
        }
    }

    /// Fails (and aborts) when the deadline passed or the cancel flag is set.
    fn check_deadline(&mut self, what: &str, start: Instant, deadline: Instant) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            self.abort("cancelled");
            return Err(NcclError::Aborted { what: what.into(), cause: "cancelled".into() });
        }
        if Instant::now() >= deadline {
            let e =
                NcclError::Timeout { what: what.into(), rank: self.rank, size: self.size, waited_ms: start.elapsed().as_millis() as u64 };
            self.abort(&e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Polls `ncclCommGetAsyncError` until the last call's work is queued (non-blocking calls
    /// return ncclInProgress first).
    fn wait_idle(&mut self, what: &str, start: Instant, deadline: Instant) -> Result<()> {
        let mut b = Backoff(0);
        while !self.async_state(what)? {
            self.check_deadline(what, start, deadline)?;
            b.pause();
        }
        Ok(())
    }

    /// One poll of the initialisation: Ok(true) once the communicator is ready.
    pub fn poll_init(&mut self) -> Result<bool> {
        let what = format!("rank {} of {}: joining the group", self.rank, self.size);
        self.usable(&what)?;
        if self.state == State::Ready {
            return Ok(true);
        }
        self.bind()?;
        if self.async_state(&what)? {
            self.state = State::Ready;
            return Ok(true);
        }
        Ok(false)
    }

    /// Waits until every rank joined, or `timeout` passed (then aborts: [`NcclError::Timeout`]).
    pub fn wait_init(&mut self, timeout: Duration) -> Result<()> {
        let what = format!("joining the group of {} ranks (ncclCommInitRankConfig)", self.size);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut b = Backoff(0);
        while !self.poll_init()? {
            self.check_deadline(&what, start, deadline)?;
            b.pause();
        }
        Ok(())
    }

    fn ready(&mut self, what: &str) -> Result<()> {
        self.usable(what)?;
        if self.state != State::Ready {
            return Err(NcclError::Argument(
                ErrorKind::Error,
                format!("{what}: the communicator is not initialised yet (wait_init first)"),
            ));
        }
        self.bind()
    }

    /// Records an event after the queued work and polls it (and NCCL's async error) until done or
    /// the deadline. On success the device's stream is made to wait for it.
    fn wait_done(&mut self, dev: &Device, what: &str, start: Instant, deadline: Instant) -> Result<()> {
        let event: CudaEvent = self.stream.record_event(None).map_err(|e| NcclError::cuda(format!("{what}: recording an event"), e))?;
        let mut b = Backoff(0);
        loop {
            // SAFETY: a live event.
            match unsafe { drv::event::query(event.cu_event()) } {
                Ok(()) => break,
                Err(drv::DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => {
                    let err = NcclError::cuda(format!("{what}: running NCCL's kernels"), e);
                    self.abort(&err.to_string());
                    return Err(err);
                }
            }
            self.async_state(what)?;
            self.check_deadline(what, start, deadline)?;
            b.pause();
        }
        self.async_state(what)?;
        dev.stream().wait(&event).map_err(|e| NcclError::cuda(format!("{what}: ordering the device's stream after NCCL"), e))
    }

    /// All-gather on device buffers: `send` holds `bytes` bytes, `recv` gets every rank's in rank
    /// order (`size * bytes`). Waits until done, at most `timeout`.
    pub fn all_gather_device(&mut self, dev: &Device, send: &Buffer, recv: &Buffer, bytes: usize, timeout: Duration) -> Result<()> {
        let what = "allGather";
        self.ready(what)?;
        if send.bytes() < bytes || recv.bytes() < bytes * self.size {
            return Err(NcclError::range(format!(
                "{what}: buffers of {} and {} bytes for {bytes} bytes from each of {} ranks",
                send.bytes(),
                recv.bytes(),
                self.size
            )));
        }
        let start = Instant::now();
        let deadline = start + timeout;
        self.stream.join(dev.stream()).map_err(|e| NcclError::cuda(format!("{what}: ordering NCCL after the device's stream"), e))?;
        let (s, r) = (send.device_ptr(dev), recv.device_ptr(dev));
        // SAFETY: device buffers of the sizes checked above, alive until the wait ends.
        let rc =
            unsafe { (self.api.all_gather)(s as *const c_void, r as *mut c_void, bytes, NCCL_UINT8, self.raw, self.stream.cu_stream()) };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let e = call_error(self.api, self.raw, what, "ncclAllGather", rc);
            self.abort(&e.to_string());
            return Err(e);
        }
        self.wait_idle(what, start, deadline)?;
        self.wait_done(dev, what, start, deadline)
    }

    /// All-to-all-v on device buffers: `send_bytes[j]` bytes of `send` (consecutive, rank order)
    /// go to rank `j`, `recv_bytes[s]` bytes from rank `s` land in `recv` (consecutive, rank
    /// order), by ncclSend/ncclRecv per peer in one group (zero-byte pairs are skipped; every
    /// rank must expect what its peers send). Waits until done, at most `timeout`.
    pub fn all_to_all_v_device(
        &mut self,
        dev: &Device,
        send: &Buffer,
        send_bytes: &[usize],
        recv: &Buffer,
        recv_bytes: &[usize],
        timeout: Duration,
    ) -> Result<()> {
        let (sp, rp) = (send.device_ptr(dev), recv.device_ptr(dev));
        // SAFETY: both addresses are the starts of live buffers of the lengths given.
        unsafe { self.all_to_all_v_raw(dev, (sp, send.bytes()), send_bytes, (rp, recv.bytes()), recv_bytes, timeout) }
    }

    /// [`Comm::all_to_all_v_device`] on raw device memory: `send` and `recv` are (address, bytes).
    ///
    /// # Safety
    /// Both ranges must be device memory of this process's context that stays allocated (and,
    /// for `recv`, unread and unwritten by anything else) until this returns; after a timeout or
    /// an abort NCCL may still touch them, so they must then be leaked.
    pub unsafe fn all_to_all_v_raw(
        &mut self,
        dev: &Device,
        send: (u64, usize),
        send_bytes: &[usize],
        recv: (u64, usize),
        recv_bytes: &[usize],
        timeout: Duration,
    ) -> Result<()> {
        let what = "allToAllV";
        self.ready(what)?;
        let n = self.size;
        if send_bytes.len() != n || recv_bytes.len() != n {
            return Err(NcclError::range(format!(
                "{what}: {} send and {} receive counts for {n} ranks",
                send_bytes.len(),
                recv_bytes.len()
            )));
        }
        let (st, rt) = (send_bytes.iter().sum::<usize>(), recv_bytes.iter().sum::<usize>());
        if send.1 < st || recv.1 < rt {
            return Err(NcclError::range(format!("{what}: buffers of {} and {} bytes for {st} bytes out and {rt} in", send.1, recv.1)));
        }
        let start = Instant::now();
        let deadline = start + timeout;
        self.stream.join(dev.stream()).map_err(|e| NcclError::cuda(format!("{what}: ordering NCCL after the device's stream"), e))?;
        let (sp, rp) = (send.0, recv.0);
        let cu = self.stream.cu_stream();
        // SAFETY: group calls on a live communicator; every pointer is inside a buffer checked
        // above, alive until the wait ends (or leaked by the caller on a timeout).
        let failed = unsafe {
            let mut failed: Option<(&'static str, c_int)> = None;
            let rc = (self.api.group_start)();
            if rc != NCCL_SUCCESS {
                failed = Some(("ncclGroupStart", rc));
            } else {
                let (mut so, mut ro) = (0usize, 0usize);
                for peer in 0..n {
                    if failed.is_none() && send_bytes[peer] > 0 {
                        let rc =
                            (self.api.send)((sp + so as u64) as *const c_void, send_bytes[peer], NCCL_UINT8, peer as c_int, self.raw, cu);
                        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                            failed = Some(("ncclSend", rc));
                        }
                    }
                    if failed.is_none() && recv_bytes[peer] > 0 {
                        let rc =
                            (self.api.recv)((rp + ro as u64) as *mut c_void, recv_bytes[peer], NCCL_UINT8, peer as c_int, self.raw, cu);
                        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                            failed = Some(("ncclRecv", rc));
                        }
                    }
                    so += send_bytes[peer];
                    ro += recv_bytes[peer];
                }
                let rc = (self.api.group_end)();
                if failed.is_none() && rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                    failed = Some(("ncclGroupEnd", rc));
                }
            }
            failed
        };
        if let Some((call, rc)) = failed {
            let e = call_error(self.api, self.raw, what, call, rc);
            self.abort(&e.to_string());
            return Err(e);
        }
        self.wait_idle(what, start, deadline)?;
        self.wait_done(dev, what, start, deadline)
    }

    /// All-gather of host bytes (each rank the same length): every rank's, in rank order.
    pub fn all_gather_bytes(&mut self, dev: &Device, values: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.ready("allGather")?;
        let send = upload(dev, "allGather's values", values)?;
        let recv = alloc(dev, "allGather's result", values.len() * self.size)?;
        match self.all_gather_device(dev, &send, &recv, values.len(), timeout) {
            Ok(()) => download(dev, "allGather's result", &recv),
            Err(e) => Err(leak_on_abort(e, [send, recv])),
        }
    }

    /// All-gather of host int32 arrays: first their lengths (every rank must give the same one;
    /// each rank reports a difference as the same RangeError), then the values. `out[r]` is rank r's.
    pub fn all_gather_i32(&mut self, dev: &Device, values: &[i32], timeout: Duration) -> Result<Vec<Vec<i32>>> {
        let start = Instant::now();
        let lens = self.all_gather_bytes(dev, &(values.len() as u64).to_le_bytes(), timeout)?;
        let lens: Vec<u64> = lens.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        if let Some(odd) = lens.iter().position(|&l| l != lens[0]) {
            return Err(NcclError::range(format!("allGather: rank {odd} gives {} values, rank 0 gives {}", lens[odd], lens[0])));
        }
        let rest = timeout.saturating_sub(start.elapsed());
        let all = self.all_gather_bytes(dev, bytemuck::cast_slice(values), rest)?;
        let all: Vec<i32> = all.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
        let n = values.len();
        Ok((0..self.size).map(|r| all[r * n..(r + 1) * n].to_vec()).collect())
    }

    /// All-to-all-v of host bytes: `send[j]` to rank j; returns what each rank `s` sent here,
    /// which must be `recv_bytes[s]` long. The byte counts are all-gathered and checked first
    /// (every rank reports a mismatch as the same RangeError instead of hanging).
    pub fn all_to_all_v_host(&mut self, dev: &Device, send: &[&[u8]], recv_bytes: &[usize], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let what = "allToAllV";
        self.ready(what)?;
        let n = self.size;
        if send.len() != n {
            return Err(NcclError::range(format!("{what}: send: expected one buffer per rank ({n}), got {}", send.len())));
        }
        if recv_bytes.len() != n {
            return Err(NcclError::range(format!("{what}: recvBytes: expected one count per rank ({n}), got {}", recv_bytes.len())));
        }
        let start = Instant::now();
        let send_bytes: Vec<usize> = send.iter().map(|b| b.len()).collect();
        self.agree_on_counts(dev, &send_bytes, recv_bytes, timeout)?;
        let flat: Vec<u8> = send.concat();
        let sbuf = upload(dev, "allToAllV's send buffer", &flat)?;
        let rbuf = alloc(dev, "allToAllV's receive buffer", recv_bytes.iter().sum())?;
        let rest = timeout.saturating_sub(start.elapsed());
        match self.all_to_all_v_device(dev, &sbuf, &send_bytes, &rbuf, recv_bytes, rest) {
            Ok(()) => {
                let all = download(dev, "allToAllV's result", &rbuf)?;
                let mut off = 0;
                Ok(recv_bytes
                    .iter()
                    .map(|&b| {
                        let part = all[off..off + b].to_vec();
                        off += b;
                        part
                    })
                    .collect())
            }
            Err(e) => Err(leak_on_abort(e, [sbuf, rbuf])),
        }
    }

    /// Every rank's byte counts of one all-to-all-v (`send_bytes` to each rank, `recv_bytes` from
    /// each), all-gathered and checked against each other ([`check_exchange`]): a mismatch is the
    /// same RangeError on every rank instead of a hang.
    fn agree_on_counts(&mut self, dev: &Device, send_bytes: &[usize], recv_bytes: &[usize], timeout: Duration) -> Result<()> {
        let n = self.size;
        if send_bytes.len() != n || recv_bytes.len() != n {
            return Err(NcclError::range(format!(
                "allToAllV: {} send and {} receive counts for {n} ranks",
                send_bytes.len(),
                recv_bytes.len()
            )));
        }
        let counts: Vec<u64> = send_bytes.iter().chain(recv_bytes.iter()).map(|&b| b as u64).collect();
        let table = self.all_gather_bytes(dev, bytemuck::cast_slice(&counts), timeout)?;
        let table: Vec<Vec<u64>> = table
            .chunks_exact(16 * n)
            .map(|row| row.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            .collect();
        check_exchange(&table, n)
    }

    /// All-to-all-v of rows already on the device: `send_bytes[j]` bytes from `send` (consecutive,
    /// rank order; the range (address, bytes) of a live device tensor) go to rank `j`; returns a
    /// new buffer holding what each rank `s` sent here (`recv_bytes[s]` bytes, rank order). The
    /// byte counts are all-gathered and checked first, as [`Comm::all_to_all_v_host`] does, unless
    /// `agreed` (every rank's counts came from one earlier all-gather, so they match by
    /// construction: only this rank's own entry is checked, and the exchange costs one wait for
    /// the GPU instead of two). On a timeout or abort the receive buffer is leaked (NCCL may still
    /// write it).
    ///
    /// # Safety
    /// `send` must stay allocated and unwritten until this returns (after a timeout or abort,
    /// for as long as the process lives).
    pub unsafe fn all_to_all_v_rows(
        &mut self,
        dev: &Device,
        send: (u64, usize),
        send_bytes: &[usize],
        recv_bytes: &[usize],
        agreed: bool,
        timeout: Duration,
    ) -> Result<Buffer> {
        self.ready("allToAllV")?;
        let start = Instant::now();
        if !agreed {
            self.agree_on_counts(dev, send_bytes, recv_bytes, timeout)?;
        } else if let (Some(&out), Some(&back)) = (send_bytes.get(self.rank), recv_bytes.get(self.rank)) {
            if out != back {
                return Err(NcclError::range(format!(
                    "allToAllV: rank {r} expects {back} bytes from rank {r}, which sends {out}",
                    r = self.rank
                )));
            }
        }
        let total: usize = recv_bytes.iter().sum();
        let rbuf = alloc(dev, "allToAllV's receive buffer", total)?;
        let rest = timeout.saturating_sub(start.elapsed());
        let rp = rbuf.device_ptr(dev);
        match self.all_to_all_v_raw(dev, send, send_bytes, (rp, total), recv_bytes, rest) {
            Ok(()) => Ok(rbuf),
            Err(e) => Err(leak_on_abort(e, [rbuf])),
        }
    }

    /// Finalises and destroys the communicator (`ncclCommFinalize`, polled until done or
    /// `timeout`, then `ncclCommDestroy`); on a timeout or failure it aborts instead. A
    /// communicator that was aborted is just released.
    pub fn destroy(&mut self, timeout: Duration) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            self.abort("cancelled");
        }
        match self.state {
            State::Aborted(_) => {
                self.state = State::Destroyed;
                return Ok(());
            }
            State::Destroyed => return Ok(()),
            State::Initializing => {
                self.abort("destroyed before it was initialised");
                self.state = State::Destroyed;
                return Ok(());
            }
            State::Ready => {}
        }
        let what = "destroying the communicator";
        self.bind()?;
        let start = Instant::now();
        let deadline = start + timeout;
        // SAFETY: a live communicator.
        let rc = unsafe { (self.api.comm_finalize)(self.raw) };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let e = call_error(self.api, self.raw, what, "ncclCommFinalize", rc);
            self.abort(&e.to_string());
            return Err(e);
        }
        self.wait_idle(what, start, deadline)?;
        // SAFETY: finalised; not used again.
        let rc = unsafe { (self.api.comm_destroy)(self.raw) };
        self.state = State::Destroyed;
        if rc != NCCL_SUCCESS {
            return Err(NcclError::Call { what: what.into(), call: "ncclCommDestroy", result: rc, detail: String::new() });
        }
        Ok(())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.abort("dropped");
    }
}

/// After an abort, NCCL's kernels may still touch the buffers: they are never freed.
fn leak_on_abort<const N: usize>(e: NcclError, bufs: [Buffer; N]) -> NcclError {
    if matches!(e, NcclError::Timeout { .. } | NcclError::Aborted { .. } | NcclError::Call { .. } | NcclError::Cuda(_)) {
        std::mem::forget(bufs);
    }
    e
}

fn upload(dev: &Device, what: &str, bytes: &[u8]) -> Result<Buffer> {
    dev.upload(what, bytes).map_err(|e| NcclError::Cuda(e.to_string()))
}

fn alloc(dev: &Device, what: &str, bytes: usize) -> Result<Buffer> {
    dev.alloc(what, bytes).map_err(|e| NcclError::Cuda(e.to_string()))
}

fn download(dev: &Device, what: &str, buf: &Buffer) -> Result<Vec<u8>> {
    dev.download_new::<u8>(what, buf, buf.bytes()).map_err(|e| NcclError::Cuda(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_nccl_2_17_layout() {
        // size_t size; unsigned magic, version; int blocking, cgaClusterSize, minCTAs, maxCTAs; const char* netName; int splitShare
        assert_eq!(std::mem::offset_of!(Config, magic), 8);
        assert_eq!(std::mem::offset_of!(Config, blocking), 16);
        assert_eq!(std::mem::offset_of!(Config, max_ctas), 28);
        assert_eq!(std::mem::offset_of!(Config, net_name), 32);
        assert_eq!(std::mem::offset_of!(Config, split_share), 40);
        let c = Config::non_blocking();
        assert_eq!(c.size, 48);
        assert_eq!((c.blocking, c.magic, c.version), (0, 0xcafe_beef, 21700));
        assert_eq!(std::mem::size_of::<UniqueId>(), 128);
    }

    #[test]
    fn versions_and_result_names() {
        assert_eq!(version_string(22703), "2.27.3");
        assert_eq!(version_string(21805), "2.18.5");
        assert_eq!(version_string(2804), "2.8.4");
        assert_eq!(result_name(7), "ncclInProgress");
        assert_eq!(result_name(6), "ncclRemoteError");
        assert_eq!(result_name(99), "an unknown ncclResult_t");
    }

    #[test]
    fn rank_checks_name_the_argument() {
        assert!(check_rank(0, 1).is_ok());
        assert!(check_rank(3, 4).is_ok());
        let e = check_rank(2, 2).unwrap_err();
        assert_eq!(e.code(), "RangeError");
        assert_eq!(e.to_string(), "rank: expected 0 <= rank < size = 2, got 2");
        assert_eq!(check_rank(0, 0).unwrap_err().to_string(), "size: expected an integer >= 1 and <= 2^31 - 1, got 0");
    }

    #[test]
    fn exchange_table_mismatches_are_named() {
        // rank r's row: [sends to 0, sends to 1, expects from 0, expects from 1]
        let ok = vec![vec![3, 5, 3, 7], vec![7, 2, 5, 2]];
        assert!(check_exchange(&ok, 2).is_ok());
        let bad = vec![vec![3, 5, 3, 7], vec![7, 2, 4, 2]];
        let e = check_exchange(&bad, 2).unwrap_err();
        assert_eq!(e.to_string(), "allToAllV: rank 1 expects 4 bytes from rank 0, which sends 5");
        assert_eq!(e.code(), "RangeError");
        assert!(check_exchange(&[vec![1, 1]], 2).is_err());
    }

    #[test]
    fn errors_say_what_failed() {
        let t = NcclError::Timeout { what: "allToAllV".into(), rank: 0, size: 2, waited_ms: 1500 };
        assert_eq!(t.code(), "NcclTimeout");
        assert!(t.to_string().starts_with("allToAllV: rank 0 of 2: not complete after 1500 ms"), "{t}");
        let c = NcclError::Call { what: "joining".into(), call: "ncclCommInitRankConfig", result: 2, detail: "socket".into() };
        assert_eq!(c.to_string(), "joining: ncclCommInitRankConfig failed: ncclSystemError (2): socket");
        assert_eq!(c.code(), "NcclError");
        assert_eq!(NcclError::Unavailable("x".into()).code(), "NcclUnavailable");
    }

    #[test]
    fn the_library_loads_or_says_why() {
        // Either NCCL is here (then its version is 2.18 or later) or the reason names the library
        // and how to point at it; never a panic.
        match info() {
            Ok(i) => assert!(i.version.starts_with("2."), "{i:?}"),
            Err(NcclError::Unavailable(reason)) => {
                assert!(reason.contains(LIBRARY) && reason.contains("MOE_DISPATCH_NCCL"), "{reason}");
            }
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
        assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"), "NVLink multicast must be off once NCCL was looked for");
    }
}
