//! Small device buffers copied to the host ahead of need: [`Device::read_ahead`] queues the copy
//! of a buffer (into page-locked host memory) and marks the stream; [`Device::take_read_ahead`]
//! later hands the values over, waiting only for that mark (long passed when the host queued
//! much work in between), instead of a read that waits for everything queued so far.
//!
//! The experts' counts are the use: the forward on our grouped GEMM reads them on the GPU, the
//! backward on cuBLAS needs them on the host to size its GEMMs (crate::experts_grouped, the
//! `auto` path). Keyed by [`Buffer::id`], which is never reused; the ops never write a device
//! tensor in place, so a copy made once stays the buffer's value. At most [`ENTRIES`] wait at a
//! time (a forward whose backward never comes drops out as newer ones arrive).
//!
//! [`Buffer::id`]: crate::device::Buffer::id

use std::collections::VecDeque;
use std::sync::Mutex;

use cudarc::driver::{result as drv, sys, CudaEvent};

use crate::device::{count_transfer_to_host, Buffer, Device};
use crate::error::{Error, Result};

/// Bytes of one page-locked block: up to 4096 int32 counts.
pub const BLOCK: usize = 16 * 1024;
/// Read-aheads kept at most.
pub const ENTRIES: usize = 8;

struct Entry {
    id: u64,
    bytes: usize,
    /// A [`BLOCK`] of page-locked host memory (its address).
    host: usize,
    /// Marks the copy's end on the device's stream.
    event: CudaEvent,
}

/// The device's read-aheads and its spare page-locked blocks (never freed: a few, reused), each
/// with the event of the copy that last wrote it while that copy may still be running.
#[derive(Default)]
pub(crate) struct ReadAheads {
    entries: Mutex<VecDeque<Entry>>,
    spare: Mutex<Vec<(usize, Option<CudaEvent>)>>,
}

impl ReadAheads {
    /// A block no copy still writes (none is waited for: one whose copy runs stays aside), else
    /// a new one.
    fn block(&self, dev: &Device) -> Option<usize> {
        {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = spare.iter().position(|(_, copy)| copy.as_ref().is_none_or(CudaEvent::is_complete)) {
                return Some(spare.swap_remove(i).0);
            }
        }
        dev.bind().ok()?;
        // SAFETY: a plain page-locked allocation of BLOCK bytes, kept for the process.
        unsafe { drv::malloc_host(BLOCK, 0) }.ok().map(|p| p as usize)
    }

    /// Puts an entry's block aside for reuse (`done`: its copy is known to be over).
    fn retire(&self, e: Entry, done: bool) {
        let copy = (!done).then_some(e.event);
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).push((e.host, copy));
    }
}

impl Device {
    /// Queues a copy of `buf` (at most [`BLOCK`] bytes; larger ones are not read ahead: false)
    /// to the host after the work queued so far, for [`Device::take_read_ahead`]. Nothing waits.
    pub fn read_ahead(&self, what: &str, buf: &Buffer) -> Result<bool> {
        let bytes = buf.bytes();
        if bytes == 0 || bytes > BLOCK {
            return Ok(false);
        }
        let ra = self.read_aheads();
        if ra.entries.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|e| e.id == buf.id()) {
            return Ok(true);
        }
        let Some(host) = ra.block(self) else { return Ok(false) };
        let stream = self.stream();
        count_transfer_to_host(bytes);
        let copied = self.span(
            || format!("copy to the host, ahead: {what}"),
            || {
                // SAFETY: `host` holds BLOCK >= bytes page-locked bytes, reused only once this copy's
                // event has completed.
                let r = unsafe { sys::cuMemcpyDtoHAsync_v2(host as *mut _, buf.ptr(stream), bytes, stream.cu_stream()) };
                r.result().map_err(|e| Error::driver(format!("copying {what} to the host"), e))
            },
        );
        if let Err(e) = copied {
            // (a copy that failed to queue never writes the block)
            ra.spare.lock().unwrap_or_else(|p| p.into_inner()).push((host, None));
            return Err(e);
        }
        let event = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| Error::driver(format!("marking {what}"), e))?;
        let old = {
            let mut entries = ra.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.push_back(Entry { id: buf.id(), bytes, host, event });
            if entries.len() > ENTRIES {
                entries.pop_front()
            } else {
                None
            }
        };
        if let Some(e) = old {
            ra.retire(e, false);
        }
        Ok(true)
    }

    /// The values of `buf` as [`Device::read_ahead`] copied them (`len` elements of T), waiting
    /// for that copy only (one of the host's waits, [`crate::device::synchronizations`]); None
    /// where the buffer was not read ahead (or its copy had another size). The read-ahead is used up.
    pub fn take_read_ahead<T: bytemuck::Pod>(&self, what: &str, buf: &Buffer, len: usize) -> Result<Option<Vec<T>>> {
        let ra = self.read_aheads();
        let entry = {
            let mut entries = ra.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.iter().position(|e| e.id == buf.id()) {
                Some(i) => entries.remove(i),
                None => None,
            }
        };
        let Some(e) = entry else { return Ok(None) };
        if e.bytes != len * std::mem::size_of::<T>() {
            ra.retire(e, false);
            return Ok(None);
        }
        let label = format!("{what} (read ahead)");
        self.host_wait(&label, || e.event.synchronize()).map_err(|err| Error::driver(format!("waiting for {label}"), err))?;
        let mut out: Vec<T> = vec![T::zeroed(); len];
        // SAFETY: the copy into `host` is over (its event); `bytes` bytes were written there.
        unsafe { std::ptr::copy_nonoverlapping(e.host as *const u8, out.as_mut_ptr() as *mut u8, e.bytes) };
        ra.retire(e, true);
        Ok(Some(out))
    }
}
