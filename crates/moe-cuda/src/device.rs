//! The GPU: opening it (or saying why it cannot be opened), its kernels, and raw device
//! buffers. One stream per device; cudarc's per-buffer event tracking is off, since every
//! operation is ordered on that stream.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;

use crate::compile::{self, panic_message, KernelSource, Origin};
use crate::error::{Error, Result};

/// An opened GPU with its kernels loaded.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A second stream for small reads that must not wait for the whole main stream
    /// ([`Device::read_later`]).
    aux: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    driver_version: i32,
    total_memory: usize,
    functions: HashMap<String, CudaFunction>,
    kernels_origin: Origin,
    _modules: Vec<Arc<CudaModule>>,
    /// cuBLAS on this device's stream, opened at the first GEMM (see [`crate::blas`]).
    blas: OnceLock<Result<cudarc::cublas::CudaBlas>>,
    /// Streams with a cuBLAS handle each, sized for a share of the SMs, for many small GEMMs side
    /// by side (see [`crate::blas::SideBySide`]); opened at first use.
    side_blas: OnceLock<Result<crate::blas::SideBySide>>,
    /// cuBLASLt (a GEMM whose result adds another matrix: [`crate::blaslt::Lt::matmul_plus`]);
    /// opened at first use.
    lt: OnceLock<Result<crate::blaslt::Lt>>,
    /// Free slots of mapped page-locked host memory for [`Device::host_words`]: (host address,
    /// device address) of [`HOST_SLOT`] bytes each, carved from 4 KiB allocations never freed.
    host_slots: std::sync::Mutex<Vec<(usize, u64)>>,
    /// Zeroed device words for counters between a kernel's blocks ([`Device::zeroed_counters`]).
    counters: std::sync::Mutex<Option<Buffer>>,
    /// Streaming multiprocessors of the device.
    sms: usize,
    /// The timeline being recorded, if any ([`Device::timeline_start`]).
    timeline: crate::timeline::Recorder,
}

/// Bytes of one [`HostWords`] slot.
const HOST_SLOT: usize = 64;

/// A few 64-bit words of page-locked host memory mapped into the GPU's address space: a kernel
/// writes them (plain stores, e.g. an error flag) and the host reads them after a synchronize,
/// with no copy: a synchronize alone costs about 2 us on the H100 machines, a synchronize and a
/// copy of a few bytes to the host about 11 us. Back to the device's pool when dropped.
pub struct HostWords<'a> {
    dev: &'a Device,
    host: usize,
    device: u64,
}

impl HostWords<'_> {
    /// The address kernels write to.
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// Word `i` (call after a synchronize that follows the kernels writing it).
    pub fn read(&self, i: usize) -> u64 {
        assert!(i < HOST_SLOT / 8);
        unsafe { std::ptr::read_volatile((self.host as *const u64).add(i)) }
    }
}

impl Drop for HostWords<'_> {
    fn drop(&mut self) {
        self.dev.host_slots.lock().unwrap_or_else(|p| p.into_inner()).push((self.host, self.device));
    }
}

/// What [`Device::info`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// e.g. "9.0"
    pub compute_capability: String,
    /// NVRTC's target, e.g. "sm_90".
    pub arch: String,
    /// The driver's CUDA version, e.g. "13.0".
    pub driver_version: String,
    pub total_memory: usize,
    /// Where the kernels came from in this process (disk cache, or compiled, with the time).
    pub kernels: String,
    /// Whether kernels are queued as programmatic dependent launches ([`programmatic_launch`]).
    pub programmatic_launch: bool,
}

/// Word of [`Device::zeroed_counters`]: the plan kernels' ticket.
pub const COUNTER_PLAN_TICKET: usize = 0;

/// The kernel files every device loads at open.
const SOURCES: &[KernelSource] = compile::ALL;

/// Checks that the driver library can be opened, without opening anything else.
pub fn driver_present() -> Result<()> {
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Unavailable("libcuda.so.1 not found (no NVIDIA driver on this machine)".into()))
    }
}

impl Device {
    /// Opens GPU `ordinal` and loads (compiling at first use) its kernels. Every failure is an
    /// error that says why: no driver library, no device, NVRTC missing, a compile error.
    pub fn open(ordinal: usize) -> Result<Device> {
        driver_present()?;
        match catch_unwind(AssertUnwindSafe(|| Device::open_inner(ordinal))) {
            Ok(r) => r,
            Err(panic) => Err(Error::Unavailable(format!("the CUDA driver library failed: {}", panic_message(&panic)))),
        }
    }

    fn open_inner(ordinal: usize) -> Result<Device> {
        drv::init().map_err(|e| unavailable("cuInit failed", e))?;
        let count = drv::device::get_count().map_err(|e| unavailable("cuDeviceGetCount failed", e))?;
        if count <= 0 {
            return Err(Error::Unavailable("the NVIDIA driver sees no CUDA device".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Unavailable(format!("CUDA device {ordinal} does not exist (this machine has {count})")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("creating a context on CUDA device {ordinal}"), e))?;
        // One stream orders everything: no per-buffer events needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| Error::driver("creating a stream", e))?;
        let aux = ctx.new_stream().map_err(|e| Error::driver("creating a stream", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| unavailable("reading the SM count", e))?
            .max(1) as usize;
        let compute_capability = ctx.compute_capability().map_err(|e| Error::driver("reading the compute capability", e))?;
        let name = ctx.name().map_err(|e| Error::driver("reading the device name", e))?;
        let total_memory = ctx.total_mem().unwrap_or(0);
        let mut driver_version = 0i32;
        unsafe { sys::cuDriverGetVersion(&mut driver_version) };
        keep_pool_memory(&ctx);
        let arch = arch_of(compute_capability);
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        let mut kernels_origin = Origin::Disk;
        for src in SOURCES {
            let (module, origin) = load_module(&ctx, src, &arch)?;
            if let Origin::Compiled { .. } = origin {
                kernels_origin = origin;
            }
            for fname in kernel_names(src.source) {
                let f = module
                    .load_function(&fname)
                    .map_err(|e| Error::driver(format!("finding kernel {fname} in kernels/{}", src.file), e))?;
                functions.insert(fname, f);
            }
            modules.push(module);
        }
        Ok(Device {
            ctx,
            stream,
            aux,
            ordinal,
            name,
            compute_capability,
            driver_version,
            total_memory,
            functions,
            kernels_origin,
            _modules: modules,
            blas: OnceLock::new(),
            side_blas: OnceLock::new(),
            lt: OnceLock::new(),
            host_slots: std::sync::Mutex::new(Vec::new()),
            counters: std::sync::Mutex::new(None),
            sms,
            timeline: Default::default(),
        })
    }

    /// The process-wide device (`$MOE_DISPATCH_CUDA_DEVICE`, default 0), opened at first use.
    /// A failure is remembered: CUDA does not appear in a running process.
    pub fn global() -> Result<&'static Device> {
        static GLOBAL: OnceLock<Result<Device>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let ordinal = match std::env::var("MOE_DISPATCH_CUDA_DEVICE") {
                    Ok(v) if !v.is_empty() => match v.parse::<usize>() {
                        Ok(n) => n,
                        Err(_) => return Err(Error::Unavailable(format!("MOE_DISPATCH_CUDA_DEVICE={v:?} is not a device number"))),
                    },
                    _ => 0,
                };
                Device::open(ordinal)
            })
            .as_ref()
            .map_err(|e| e.clone())
    }

    pub fn info(&self) -> DeviceInfo {
        let (major, minor) = self.compute_capability;
        DeviceInfo {
            ordinal: self.ordinal,
            name: self.name.clone(),
            compute_capability: format!("{major}.{minor}"),
            arch: arch_of(self.compute_capability),
            driver_version: format!("{}.{}", self.driver_version / 1000, (self.driver_version % 1000) / 10),
            total_memory: self.total_memory,
            kernels: self.kernels_origin.to_string(),
            programmatic_launch: programmatic_launch(self),
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's cuBLAS handle, opened at first use; a failure to open is remembered.
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        self.blas.get_or_init(|| crate::blas::open(self)).as_ref().map_err(|e| e.clone())
    }

    /// The device's cuBLASLt handle (no workspace: it holds no device memory), opened at first
    /// use; a failure to open is remembered.
    pub fn lt(&self) -> Result<&crate::blaslt::Lt> {
        self.lt.get_or_init(crate::blaslt::Lt::open_bare).as_ref().map_err(|e| e.clone())
    }

    /// The side-by-side GEMM streams, opened at first use; a failure to open is remembered.
    pub(crate) fn side_blas(&self) -> Result<&crate::blas::SideBySide> {
        self.side_blas.get_or_init(|| crate::blas::SideBySide::open(self)).as_ref().map_err(|e| e.clone())
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Cuda(format!("kernel {name} is not in kernels/ (a bug in moe-dispatch)")))
    }

    /// Allocates `bytes` bytes (at least 1, so that empty tensors have an address). `what`
    /// names the tensor in an out-of-memory error.
    pub fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer> {
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(|e| Error::driver(format!("allocating {} for {what}", human_bytes(bytes)), e))?;
        let live = LIVE_BYTES.fetch_add(bytes.max(1), Ordering::Relaxed) + bytes.max(1);
        PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        LIVE_BUFFERS.fetch_add(1, Ordering::Relaxed);
        Ok(Buffer { slice, bytes, id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed) })
    }

    /// Free and total device memory, as the driver reports them (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().map_err(|e| Error::driver("binding the context", e))?;
        drv::mem_get_info().map_err(|e| Error::driver("reading the memory info", e))
    }

    /// A new buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, what: &str, data: &[T]) -> Result<Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf = self.alloc(what, bytes.len())?;
        count_transfer(&TO_DEVICE, bytes.len());
        if !bytes.is_empty() {
            self.span(
                || format!("copy to the GPU: {what}"),
                || {
                    unsafe { drv::memcpy_htod_async(buf.ptr(&self.stream), bytes, self.stream.cu_stream()) }
                        .map_err(|e| Error::driver(format!("copying {what} to the GPU"), e))
                },
            )?;
        }
        Ok(buf)
    }

    /// Copies a buffer into `out` (whose byte size must be the buffer's) and waits for it and
    /// for everything queued before it; a kernel that failed is reported here.
    pub fn download<T: bytemuck::Pod>(&self, what: &str, buf: &Buffer, out: &mut [T]) -> Result<()> {
        let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
        if dst.len() != buf.bytes {
            return Err(Error::Cuda(format!("copying {what} to the host: {} bytes into {} (a bug in moe-dispatch)", buf.bytes, dst.len())));
        }
        count_transfer(&TO_HOST, dst.len());
        if !dst.is_empty() {
            unsafe { drv::memcpy_dtoh_async(dst, buf.ptr(&self.stream), self.stream.cu_stream()) }
                .map_err(|e| Error::driver(format!("copying {what} to the host"), e))?;
        }
        self.synchronize(what)
    }

    /// Copies a buffer into a new vector of `len` elements (whose byte size must be the
    /// buffer's) and waits for it. The vector is not zeroed first and, when large, is backed by
    /// 2 MiB pages: a fresh 500 MB buffer otherwise costs more in page faults than in copying.
    pub fn download_new<T: bytemuck::Pod>(&self, what: &str, buf: &Buffer, len: usize) -> Result<Vec<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes != buf.bytes {
            return Err(Error::Cuda(format!("copying {what} to the host: {} bytes into {bytes} (a bug in moe-dispatch)", buf.bytes)));
        }
        let mut v: Vec<T> = Vec::new();
        v.try_reserve_exact(len).map_err(|_| {
            Error::Core(moe_core::Error::range(
                what.to_string(),
                format!("an output of {len} elements ({bytes} bytes) cannot be allocated"),
            ))
        })?;
        count_transfer(&TO_HOST, bytes);
        moe_core::alloc::advise_huge_pages(v.as_mut_ptr() as *mut u8, bytes);
        prefault(v.spare_capacity_mut());
        if bytes > 0 {
            // SAFETY: the copy writes exactly `bytes` bytes into the reserved storage.
            let r = unsafe { sys::cuMemcpyDtoHAsync_v2(v.as_mut_ptr() as *mut _, buf.ptr(&self.stream), bytes, self.stream.cu_stream()) };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(Error::driver(format!("copying {what} to the host"), drv::DriverError(r)));
            }
        }
        self.synchronize(what)?;
        // SAFETY: the synchronised copy initialised all `len` elements; T is Pod.
        unsafe { v.set_len(len) };
        Ok(v)
    }

    /// Waits for the stream; errors of earlier launches surface here.
    pub fn synchronize(&self, what: &str) -> Result<()> {
        self.host_wait(what, || self.stream.synchronize()).map_err(|e| Error::driver(format!("running the kernels for {what}"), e))
    }

    /// One wait of the host for the GPU (`wait`: a stream's or an event's synchronize): counted
    /// ([`synchronizations`]) and noted in the timeline being recorded, if any, as `what`.
    pub(crate) fn host_wait(
        &self,
        what: &str,
        wait: impl FnOnce() -> std::result::Result<(), drv::DriverError>,
    ) -> std::result::Result<(), drv::DriverError> {
        SYNCS.fetch_add(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        let r = wait();
        self.timeline.waited(what, start);
        r
    }

    /// Starts recording a timeline of the work queued on the device's stream (see
    /// [`crate::timeline`]); an error if one is recording already.
    pub fn timeline_start(&self) -> Result<()> {
        self.timeline.start(&self.stream)
    }

    /// Stops the timeline and returns it (waits for the GPU); empty where none was recording.
    pub fn timeline_stop(&self) -> Result<crate::timeline::Timeline> {
        self.timeline.stop(&self.stream)
    }

    /// Runs `f`, which queues work on the device's stream, as one span of the timeline when one
    /// is recording (the name is made only then).
    pub(crate) fn span<T>(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.timeline.span(&self.stream, name, f)
    }

    /// The device's memory pool: (bytes it holds from the driver, bytes of them in live
    /// buffers); the difference is memory freed by buffers and kept for the next ones.
    pub fn pool_memory(&self) -> Result<(u64, u64)> {
        let pool = self.default_pool("reading the pool's memory")?;
        let attr = |a: sys::CUmemPool_attribute, what: &str| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: both attributes are cuuint64_t values.
            let r = unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut _) };
            if r == sys::CUresult::CUDA_SUCCESS {
                Ok(v)
            } else {
                Err(Error::Cuda(format!("reading the pool's {what}: {r:?}")))
            }
        };
        Ok((
            attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, "reserved memory")?,
            attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "used memory")?,
        ))
    }

    fn default_pool(&self, what: &str) -> Result<sys::CUmemoryPool> {
        self.ctx.bind_to_thread().map_err(|e| Error::driver("binding the context", e))?;
        default_pool(&self.ctx).map_err(|r| Error::Cuda(format!("{what}: no default memory pool ({r:?})")))
    }

    /// Returns the memory that the device's pool keeps from freed buffers to the driver (after
    /// waiting for the stream), like PyTorch's `empty_cache`: the pool keeps freed memory for the
    /// next ops' buffers (`keep_pool_memory`).
    pub fn release_cached_memory(&self) -> Result<()> {
        self.synchronize("releasing cached memory")?;
        let pool = self.default_pool("releasing cached memory")?;
        // SAFETY: trimming frees only memory that no buffer uses.
        let r = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda(format!("releasing cached memory: cuMemPoolTrimTo failed ({r:?})")));
        }
        Ok(())
    }

    /// `N` host words (N <= 8) set to `value`, for kernels to write and the host to read after a
    /// synchronize ([`HostWords`]); None where the driver gives no mapped memory (the caller then
    /// uses a device buffer and [`Device::read_head`]). Only for results read after a synchronize
    /// of this device's stream, since the slot is reused once dropped.
    pub fn host_words<const N: usize>(&self, value: u64) -> Option<HostWords<'_>> {
        const { assert!(N <= HOST_SLOT / 8) };
        let mut pool = self.host_slots.lock().unwrap_or_else(|p| p.into_inner());
        if pool.is_empty() {
            self.ctx.bind_to_thread().ok()?;
            const CHUNK: usize = 4096;
            let host = unsafe { drv::malloc_host(CHUNK, sys::CU_MEMHOSTALLOC_DEVICEMAP) }.ok()? as usize;
            let mut device: sys::CUdeviceptr = 0;
            if unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut std::ffi::c_void, 0) }.result().is_err() {
                unsafe { drv::free_host(host as *mut std::ffi::c_void) }.ok();
                return None;
            }
            pool.extend((0..CHUNK / HOST_SLOT).map(|i| (host + i * HOST_SLOT, device + (i * HOST_SLOT) as u64)));
        }
        let (host, device) = pool.pop()?;
        drop(pool);
        for i in 0..N {
            unsafe { std::ptr::write_volatile((host as *mut u64).add(i), value) };
        }
        Some(HostWords { dev: self, host, device })
    }

    /// The device's streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// The device address of at least `words` u32 words that are zero between calls, for kernels
    /// whose blocks count together (a ticket that finds the last block, per-expert sums): every
    /// kernel that uses them sets them back to 0 before it ends. Grown (new zeroed memory, the old
    /// freed in stream order) when a call needs more. Only for kernels on this device's stream,
    /// which run one after another. Word [`COUNTER_PLAN_TICKET`] is the plan's ticket.
    pub fn zeroed_counters(&self, words: usize) -> Result<u64> {
        let mut slot = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = slot.as_ref().filter(|b| b.bytes >= words * 4) {
            return Ok(b.ptr(&self.stream));
        }
        let words = words.max(1024);
        let b = self.alloc("the counters", words * 4)?;
        self.memset_u32("the counters", &b, 0, words)?;
        let ptr = b.ptr(&self.stream);
        *slot = Some(b);
        Ok(ptr)
    }

    /// Fills `words` 32-bit words of `buf` with `value` (queued on the stream).
    pub fn memset_u32(&self, what: &str, buf: &Buffer, value: u32, words: usize) -> Result<()> {
        if words * 4 > buf.bytes {
            return Err(Error::Cuda(format!("memset of {words} words exceeds {what} (a bug in moe-dispatch)")));
        }
        if words == 0 {
            return Ok(());
        }
        self.span(
            || format!("memset {what}"),
            || {
                let r = unsafe { sys::cuMemsetD32Async(buf.ptr(&self.stream), value, words, self.stream.cu_stream()) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    return Err(Error::driver(format!("clearing {what}"), drv::DriverError(r)));
                }
                Ok(())
            },
        )
    }

    /// Marks the point of the stream after which element `index` (an i32) of `buf` may be read,
    /// without waiting: the caller queues more work, then [`PendingRead::finish`] waits only
    /// for the work queued before this call, and reads the value on the second stream (so the
    /// GPU keeps running what was queued after it).
    pub fn read_later(&self, what: &str, buf: &Buffer, index: usize) -> Result<PendingRead> {
        if (index + 1) * 4 > buf.bytes {
            return Err(Error::Cuda(format!("reading {what}: past the end (a bug in moe-dispatch)")));
        }
        let event = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| Error::driver(format!("marking {what}"), e))?;
        Ok(PendingRead { event, ptr: buf.ptr(&self.stream) + (index * 4) as u64, what: what.to_string() })
    }

    /// Sets the first `bytes` bytes of a buffer to 0 (stream-ordered).
    pub fn memset_zero(&self, what: &str, buf: &Buffer, bytes: usize) -> Result<()> {
        self.memset_zero_at(what, buf, 0, bytes)
    }

    /// Sets `bytes` bytes of a buffer from byte `offset` on to 0 (stream-ordered).
    pub fn memset_zero_at(&self, what: &str, buf: &Buffer, offset: usize, bytes: usize) -> Result<()> {
        if offset.checked_add(bytes).is_none_or(|end| end > buf.bytes) {
            return Err(Error::Cuda(format!("clearing {bytes} bytes at {offset} exceeds {what} (a bug in moe-dispatch)")));
        }
        if bytes == 0 {
            return Ok(());
        }
        self.span(
            || format!("memset {what}"),
            || {
                let r = unsafe { sys::cuMemsetD8Async(buf.ptr(&self.stream) + offset as u64, 0, bytes, self.stream.cu_stream()) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    return Err(Error::driver(format!("clearing {what}"), drv::DriverError(r)));
                }
                Ok(())
            },
        )
    }

    /// Reads the first `N` elements of a buffer (waits for the stream: a synchronisation).
    pub fn read_head<T: bytemuck::Pod + Default + Copy, const N: usize>(&self, what: &str, buf: &Buffer, first: usize) -> Result<[T; N]> {
        let mut out = [T::default(); N];
        let size = std::mem::size_of::<T>();
        if (first + N) * size > buf.bytes {
            return Err(Error::Cuda(format!("reading {what}: past the end (a bug in moe-dispatch)")));
        }
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        count_transfer(&TO_HOST, dst.len());
        unsafe { drv::memcpy_dtoh_async(dst, buf.ptr(&self.stream) + (first * size) as u64, self.stream.cu_stream()) }
            .map_err(|e| Error::driver(format!("reading {what}"), e))?;
        self.synchronize(what)?;
        Ok(out)
    }

    /// Device-to-device copy of `bytes` bytes (for the benchmark's baseline).
    pub fn copy(&self, dst: &Buffer, src: &Buffer, bytes: usize) -> Result<()> {
        if bytes > dst.bytes || bytes > src.bytes {
            return Err(Error::Cuda(format!("copy of {bytes} bytes exceeds a buffer (a bug in moe-dispatch)")));
        }
        self.span(
            || "copy (device to device)".into(),
            || {
                unsafe { drv::memcpy_dtod_async(dst.ptr(&self.stream), src.ptr(&self.stream), bytes, self.stream.cu_stream()) }
                    .map_err(|e| Error::driver("device-to-device copy", e))
            },
        )
    }

    /// Launches kernel `name` with raw 8-byte or 4-byte arguments.
    pub(crate) fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        self.launch_shared(name, grid, block, 0, args)
    }

    /// Launches kernel `name` with `shared` bytes of dynamic shared memory (at most 48 kB).
    pub(crate) fn launch_shared(&self, name: &str, grid: (u32, u32), block: u32, shared: u32, args: &[Arg]) -> Result<()> {
        self.launch_full(name, grid, (block, 1), shared, args)
    }

    /// A launch with a two-dimensional block.
    pub(crate) fn launch_block(&self, name: &str, grid: (u32, u32), block: (u32, u32), args: &[Arg]) -> Result<()> {
        self.launch_full(name, grid, block, 0, args)
    }

    fn launch_full(&self, name: &str, grid: (u32, u32), block: (u32, u32), shared: u32, args: &[Arg]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let f = self.function(name)?;
        let mut params = Params::default();
        for a in args {
            match a {
                Arg::U64(v) => params.push(v),
                Arg::I64(v) => params.push(v),
                Arg::I32(v) => params.push(v),
                Arg::F64(v) => params.push(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block.0, block.1, 1), shared_mem_bytes: shared };
        self.launch_params(name, f, cfg, &mut params, true)
    }

    /// Queues kernel `name` (`f`) on the device's stream with `params` (in the kernel's parameter
    /// order and types: the caller's promise), as one span of the timeline, and as a programmatic
    /// dependent launch where `pdl` and [`programmatic_launch`] are on: the kernel's blocks may be
    /// scheduled before the kernel before it has finished, and each waits at its entry
    /// (`MOE_PDL_ENTRY()` in kernels/common.cuh, the first statement of every kernel) until it has.
    pub(crate) fn launch_params(&self, name: &str, f: &CudaFunction, cfg: LaunchConfig, params: &mut Params, pdl: bool) -> Result<()> {
        let mut launch = || -> std::result::Result<(), drv::DriverError> {
            self.ctx.bind_to_thread()?;
            let mut pointers = params.pointers();
            // SAFETY: zeroed is a valid bit pattern for this C struct; id and value set below.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let pdl = pdl && programmatic_launch(self);
            let config = sys::CUlaunchConfig {
                gridDimX: cfg.grid_dim.0,
                gridDimY: cfg.grid_dim.1,
                gridDimZ: cfg.grid_dim.2,
                blockDimX: cfg.block_dim.0,
                blockDimY: cfg.block_dim.1,
                blockDimZ: cfg.block_dim.2,
                sharedMemBytes: cfg.shared_mem_bytes,
                hStream: self.stream.cu_stream(),
                attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
                numAttrs: u32::from(pdl),
            };
            // SAFETY: `pointers` point into `params`, alive for the call; the driver copies the
            // values before returning. The parameters' order and types are the caller's promise.
            unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), pointers.as_mut_ptr(), std::ptr::null_mut()) }.result()
        };
        self.span(
            || name.to_string(),
            || launch().map_err(|e| Error::driver(format!("launching {name} on grid {:?} x {:?}", cfg.grid_dim, cfg.block_dim), e)),
        )
    }
}

/// A kernel's parameters by value, in order: each one's bytes in storage of its own (8-byte
/// aligned), for [`Device::launch_params`].
#[derive(Default)]
pub(crate) struct Params {
    values: Vec<Vec<u64>>,
}

impl Params {
    /// Appends `v` (a kernel parameter type: its bytes are what the kernel reads).
    pub(crate) fn push<T: cudarc::driver::DeviceRepr>(&mut self, v: &T) -> &mut Self {
        let bytes = std::mem::size_of::<T>();
        let mut words = vec![0u64; bytes.div_ceil(8)];
        // SAFETY: `words` holds at least `bytes` bytes; T is plain data (DeviceRepr).
        unsafe { std::ptr::copy_nonoverlapping(v as *const T as *const u8, words.as_mut_ptr() as *mut u8, bytes) };
        self.values.push(words);
        self
    }

    fn pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.values.iter_mut().map(|w| w.as_mut_ptr() as *mut std::ffi::c_void).collect()
    }
}

static PDL: crate::switch::Switch = crate::switch::Switch::opt_in("MOE_DISPATCH_PDL");

/// Whether this device's kernels are launched as programmatic dependent launches
/// ([`Device::launch_params`]): on Hopper and later (compute capability 9.0+) with
/// `MOE_DISPATCH_PDL=on` or [`set_programmatic_launch`]`(Some(true))`; our grouped GEMM's kernels
/// never (they ran slower so). Off by default: on two H100s the layer on cuBLAS was within the
/// rounds' spread with it (-1.8% to +0.8%), on our grouped GEMM 1-4% slower (its GEMM kernels
/// launched so, before they were excluded), though the dispatch back to back gained 3%
/// (docs/gpu-report.md, twenty-fifth session).
pub fn programmatic_launch(dev: &Device) -> bool {
    dev.compute_capability.0 >= 9 && PDL.on()
}

/// Overrides [`programmatic_launch`]: `Some(true)` where the device supports it, `Some(false)` or
/// `None` (the default) never (the benchmark's A/B in one process).
pub fn set_programmatic_launch(mode: Option<bool>) {
    PDL.set(mode);
}

/// A value of a buffer to read once the work before [`Device::read_later`] has run. The buffer
/// must outlive it (the callers keep both in one function).
pub struct PendingRead {
    event: cudarc::driver::CudaEvent,
    ptr: u64,
    what: String,
}

impl PendingRead {
    /// Waits for the marked point of the stream, then reads the value (on the second stream).
    pub fn finish(self, dev: &Device) -> Result<i32> {
        dev.host_wait(&self.what, || self.event.synchronize()).map_err(|e| Error::driver(format!("waiting for {}", self.what), e))?;
        let mut out = [0i32; 1];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        count_transfer(&TO_HOST, dst.len());
        unsafe { drv::memcpy_dtoh_async(dst, self.ptr, dev.aux.cu_stream()) }
            .map_err(|e| Error::driver(format!("reading {}", self.what), e))?;
        dev.aux.synchronize().map_err(|e| Error::driver(format!("reading {}", self.what), e))?;
        Ok(out[0])
    }
}

/// A kernel argument (pointers travel as U64).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    U64(u64),
    I64(i64),
    I32(i32),
    F64(f64),
}

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_BUFFERS: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Copies between host and device memory so far: (calls, bytes) each way.
static TO_DEVICE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static TO_HOST: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// The host's waits for the GPU so far (a stream's synchronize, or an event's).
static SYNCS: AtomicUsize = AtomicUsize::new(0);

fn count_transfer(c: &[AtomicUsize; 2], bytes: usize) {
    c[0].fetch_add(1, Ordering::Relaxed);
    c[1].fetch_add(bytes, Ordering::Relaxed);
}

/// Every copy between host and device memory this process made so far: `[(calls, bytes) to the
/// device, (calls, bytes) to the host]` (tensor data and the small words alike: pointer arrays,
/// offsets, error words, counts). A training step's share shows what crosses.
pub fn transfers() -> [(usize, usize); 2] {
    let read = |c: &[AtomicUsize; 2]| (c[0].load(Ordering::Relaxed), c[1].load(Ordering::Relaxed));
    [read(&TO_DEVICE), read(&TO_HOST)]
}

/// How many times this process's host waited for the GPU so far (every read-back waits, and
/// `synchronize`): the synchronisations a training step costs.
pub fn synchronizations() -> usize {
    SYNCS.load(Ordering::Relaxed)
}

/// The most bytes this process's [`Buffer`]s held at once since the start or the last
/// [`reset_peak_memory`] (as `torch.cuda.max_memory_allocated`).
pub fn peak_memory() -> usize {
    PEAK_BYTES.load(Ordering::Relaxed)
}

/// Starts a new peak at the bytes held now (as `torch.cuda.reset_peak_memory_stats`).
pub fn reset_peak_memory() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Bytes and buffers of device memory that this process's [`Buffer`]s hold now (what a leak
/// would grow; the memory pool may keep more from the driver).
pub fn live_memory() -> (usize, usize) {
    (LIVE_BYTES.load(Ordering::Relaxed), LIVE_BUFFERS.load(Ordering::Relaxed))
}

/// Untyped device memory of a known byte size.
pub struct Buffer {
    slice: CudaSlice<u8>,
    bytes: usize,
    /// This allocation's number in the process (never reused, unlike addresses).
    id: u64,
}

/// The next [`Buffer`]'s id.
static NEXT_BUFFER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Drop for Buffer {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes.max(1), Ordering::Relaxed);
        LIVE_BUFFERS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// This allocation's number in the process: which buffer a fact about a tensor's values
    /// was established on (an address can be reused after a free; an id is not).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The device address, for raw driver calls.
    pub fn device_ptr(&self, dev: &Device) -> u64 {
        self.ptr(&dev.stream)
    }

    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.slice.device_ptr(stream);
        p
    }
}

/// Lets the device's default memory pool keep freed memory instead of returning it to the
/// driver at every synchronisation, so that an op's buffers are reused by the next op
/// (best effort: an error leaves the default behaviour).
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    if let Ok(pool) = default_pool(ctx) {
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the release threshold is a cuuint64_t value.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut _,
            )
        };
    }
}

/// The default memory pool of `ctx`'s device (the context bound to this thread).
fn default_pool(ctx: &Arc<CudaContext>) -> std::result::Result<sys::CUmemoryPool, sys::CUresult> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes the handle of the device's default pool.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r == sys::CUresult::CUDA_SUCCESS && !pool.is_null() {
        Ok(pool)
    } else {
        Err(r)
    }
}

/// Touches fresh host memory on all cores before the driver copies into it: the driver's
/// copy into pageable memory runs on one thread, and on the GPU machines a page fault costs
/// about 2 us, so a fresh 1.9 GB output took 0.95 s to download, against 0.18 s once touched.
pub fn prefault<T: Copy>(storage: &mut [std::mem::MaybeUninit<T>]) {
    use rayon::prelude::*;
    const CHUNK: usize = 2 << 20;
    let bytes = std::mem::size_of_val(storage);
    if bytes < 4 * CHUNK {
        return;
    }
    // SAFETY: viewing uninitialised storage as MaybeUninit<u8> is always valid.
    let raw = unsafe { std::slice::from_raw_parts_mut(storage.as_mut_ptr() as *mut std::mem::MaybeUninit<u8>, bytes) };
    raw.par_chunks_mut(CHUNK).for_each(|c| {
        for page in c.chunks_mut(4096) {
            page[0].write(0);
        }
    });
}

/// "sm_XY" for compute capability X.Y.
pub fn arch_of((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

fn unavailable(what: impl std::fmt::Display, e: drv::DriverError) -> Error {
    match Error::driver(what, e) {
        Error::Cuda(m) => Error::Unavailable(m),
        other => other,
    }
}

fn load_module(ctx: &Arc<CudaContext>, src: &KernelSource, arch: &str) -> Result<(Arc<CudaModule>, Origin)> {
    let (cubin, origin) = compile::cubin(src, arch)?;
    match ctx.load_module(Ptx::from_binary(cubin)) {
        Ok(m) => Ok((m, origin)),
        // A cached CUBIN the driver refuses (truncated, or from another toolchain): compile again.
        Err(_) if origin == Origin::Disk => {
            let (cubin, origin) = compile::fresh_cubin(src, arch)?;
            let m = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| Error::driver(format!("loading kernels/{} for {arch}", src.file), e))?;
            Ok((m, origin))
        }
        Err(e) => Err(Error::driver(format!("loading kernels/{} for {arch}", src.file), e)),
    }
}

/// The names of the `extern "C" __global__` kernels a source defines, macros expanded by
/// hand: every kernel here is declared as `... __global__ void __launch_bounds__(..) NAME(`
/// or via the PERMUTE_KERNELS / UNPERMUTE_KERNEL macros; we list what the module must hold.
pub fn kernel_names(source: &str) -> Vec<String> {
    // Macros whose bodies declare kernels: name -> (parameters, name patterns like `a_##P##_b`).
    let mut macros: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
    let mut names = Vec::new();
    let mut current: Option<String> = None;
    for raw in source.lines() {
        let line = raw.trim();
        if let Some(def) = line.strip_prefix("#define ") {
            if let Some((name, rest)) = def.split_once('(') {
                if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    let params = rest.split_once(')').map_or("", |(p, _)| p).split(',').map(|p| p.trim().to_string()).collect();
                    macros.insert(name.to_string(), (params, Vec::new()));
                    current = Some(name.to_string());
                }
            }
        }
        let declared = kernel_declared(line);
        match (&current, declared) {
            (Some(m), Some(pattern)) => macros.get_mut(m).map_or((), |(_, pats)| pats.push(pattern)),
            (None, Some(pattern)) if !pattern.contains("##") => names.push(pattern),
            (None, None) => {
                // an invocation: MACRO(args)
                if let Some((name, rest)) = line.split_once('(') {
                    if let Some((params, patterns)) = macros.get(name.trim()) {
                        let args: Vec<&str> = rest.rsplit_once(')').map_or("", |(a, _)| a).split(',').map(|a| a.trim()).collect();
                        for pattern in patterns {
                            let expanded: String = pattern
                                .split("##")
                                .map(|piece| params.iter().position(|p| p == piece).and_then(|i| args.get(i).copied()).unwrap_or(piece))
                                .collect();
                            names.push(expanded);
                        }
                    }
                }
            }
            _ => {}
        }
        if current.is_some() && !raw.trim_end().ends_with('\\') {
            current = None;
        }
    }
    names
}

/// The kernel name (a pattern with `##` inside macros) of a line `extern "C" __global__ void
/// [__launch_bounds__(..)] NAME(`.
fn kernel_declared(line: &str) -> Option<String> {
    let mut rest = line.strip_prefix("extern \"C\" __global__ void ")?.trim_start();
    // attributes before the name: `__launch_bounds__(..)`, `__cluster_dims__(..)`, or a macro
    // standing for one (a name in capitals followed by a space, like GG_CLUSTER2)
    loop {
        if let Some(r) = rest.strip_prefix("__launch_bounds__(").or_else(|| rest.strip_prefix("__cluster_dims__(")) {
            rest = r.split_once(')').map_or("", |(_, after)| after.trim_start());
            continue;
        }
        let word: &str = &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())];
        let upper = !word.is_empty() && word.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if upper && rest[word.len()..].starts_with(char::is_whitespace) {
            rest = rest[word.len()..].trim_start();
            continue;
        }
        break;
    }
    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#').collect();
    (!name.is_empty() && rest[name.len()..].trim_start().starts_with('(')).then_some(name)
}

pub fn human_bytes(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver (CI, the build machines) opening is an error that says why, not a crash.
    #[test]
    fn open_without_a_driver_says_why() {
        if driver_present().is_ok() {
            return;
        }
        match Device::open(0) {
            Err(Error::Unavailable(reason)) => assert!(reason.contains("libcuda.so.1 not found"), "{reason}"),
            Err(other) => panic!("expected Unavailable, got {other}"),
            Ok(_) => panic!("opened a device without a driver"),
        }
        assert!(crate::availability().unwrap_err().contains("libcuda.so.1"));
    }

    #[test]
    fn kernel_names_of_plain_declarations() {
        /// Every name of `want` is among the kernels of `source`.
        fn has_all(source: &str, want: &[&str]) {
            let names = kernel_names(source);
            for n in want {
                assert!(names.contains(&n.to_string()), "{n} not in {names:?}");
            }
        }
        has_all(
            compile::PLAN.source,
            &[
                "plan_chunk_count",
                "plan_chunk_scan",
                "plan_expert_offsets",
                "plan_rows",
                "plan_small_count_w1_c256",
                "plan_small_rows_w1_c256",
                "plan_fill",
                "scan_exclusive",
                "plan_row_fill",
                "gather_slot_probs",
                "permute_fused_w16",
                "permute_fused_w2",
            ],
        );
        has_all(compile::ROUTING.source, &["route_kernel", "topk_kernel", "route_kernel_r1", "route_kernel_r16", "topk_kernel_r8"]);
        assert!(!kernel_names(compile::PERMUTE.source).iter().any(|n| n.contains('#')));
        // attributes before the name: launch bounds, a cluster shape, a macro standing for one
        has_all(
            compile::GROUPED_GEMM.source,
            &[
                "grouped_gemm_nn_n256_bf16_bulk",
                "grouped_gemm_nn_n256_bf16_mc",
                "grouped_gemm_nt_n256_bf16_mc4",
                "grouped_gemm_nn_n256_bf16_act",
                "grouped_gemm_wgrad_bf16_ring",
            ],
        );
        let src = "extern \"C\" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1) k_one(int a) {}\n\
                   extern \"C\" __global__ void ATTR_X k_two(int a) {}\nextern \"C\" __global__ void lower k_three(int a) {}";
        assert_eq!(kernel_names(src), vec!["k_one".to_string(), "k_two".to_string()]);
    }

    #[test]
    fn kernel_names_expand_macros() {
        let names = kernel_names(compile::EXPERTS.source);
        for dt in ["f32", "bf16", "f16"] {
            for k in ["experts_add_bias_", "experts_epilogue_", "experts_colsum_", "experts_row_dot_", "convert_f32_to_"] {
                assert!(names.contains(&format!("{k}{dt}")), "{names:?}");
            }
        }
        assert!(names.contains(&"experts_add_probs_grad".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains('#')), "{names:?}");
        assert_eq!(names.len(), 16, "{names:?}");
    }

    #[test]
    fn kernel_names_cover_every_variant() {
        let names = kernel_names(compile::PERMUTE.source);
        for w in [16, 8, 4, 2] {
            assert!(names.contains(&format!("permute_scatter_w{w}")), "{names:?}");
            assert!(names.contains(&format!("permute_gather_w{w}")), "{names:?}");
        }
        for (dt, vecs) in [("f32", &[4, 2, 1][..]), ("bf16", &[8, 4, 2, 1][..]), ("f16", &[8, 4, 2, 1][..])] {
            for v in vecs {
                assert!(names.contains(&format!("unpermute_{dt}_v{v}")), "{names:?}");
            }
        }
    }
}
