//! A timeline of the work queued on the device's stream, without a profiler: while one records
//! ([`crate::Device::timeline_start`]), every kernel launch, cuBLAS call, memset and copy on the
//! device's stream is put between two timing events, and every wait of the host is noted on the
//! host's clock. [`crate::Device::timeline_stop`] synchronises and returns each span's start and
//! end on the GPU and the moment the host queued it, all in ms from the start. Unlike ncu, which
//! runs each kernel alone on a resting GPU, this sees the kernels at the clocks, gaps and overlaps
//! of a real step: where a step's time goes between the kernels' own work, the launch gaps and the
//! host.
//!
//! What it costs: two events a span (about a microsecond of the GPU's front end each, and a few of
//! the host's), so gaps read a little longer than without it; compare a step's wall clock with and
//! without. Work on other streams (the weight gradients beside the device's stream) is not seen
//! alone: the device stream's wait for it is a span of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use crate::error::{Error, Result};

/// One span of a recorded timeline (ms from the timeline's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The kernel's name (`cublas ...`, `memset ...`, `copy ...` for the others).
    pub name: String,
    /// When the GPU reached the span's start and end (its events on the device's stream).
    pub start_ms: f64,
    pub end_ms: f64,
    /// When the host queued it (the host's clock, from the moment the timeline's first event had
    /// run on the GPU: a span whose `start_ms` is just after its `queued_ms` waited for the host).
    pub queued_ms: f64,
}

/// A wait of the host for the GPU (a synchronize), on the host's clock (ms from the start).
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub what: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// What [`crate::Device::timeline_stop`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    pub spans: Vec<Span>,
    pub waits: Vec<Wait>,
}

struct Recorded {
    name: String,
    start: CudaEvent,
    end: CudaEvent,
    queued: Instant,
}

struct Recording {
    origin: CudaEvent,
    host0: Instant,
    spans: Vec<Recorded>,
    waits: Vec<(String, Instant, Instant)>,
    /// Inside a span (a span's own launches are not spans of their own).
    depth: usize,
}

/// The device's recorder: off (one atomic load a launch) until started.
#[derive(Default)]
pub(crate) struct Recorder {
    on: AtomicBool,
    state: Mutex<Option<Recording>>,
}

fn timing_event(stream: &CudaStream) -> Result<CudaEvent> {
    stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::driver("recording a timeline event", e))
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording on `stream` (synchronised first, so the start is the GPU at rest).
    pub(crate) fn start(&self, stream: &CudaStream) -> Result<()> {
        let mut state = self.lock();
        if state.is_some() {
            return Err(Error::Cuda("timeline: one is already recording (stop it first)".into()));
        }
        stream.synchronize().map_err(|e| Error::driver("timeline: waiting for the GPU", e))?;
        let origin = timing_event(stream)?;
        origin.synchronize().map_err(|e| Error::driver("timeline: waiting for its first event", e))?;
        *state = Some(Recording { origin, host0: Instant::now(), spans: Vec::new(), waits: Vec::new(), depth: 0 });
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops recording and reads the events (synchronises `stream` first). Without a recording,
    /// an empty timeline.
    pub(crate) fn stop(&self, stream: &CudaStream) -> Result<Timeline> {
        self.on.store(false, Ordering::Release);
        let Some(rec) = self.lock().take() else { return Ok(Timeline::default()) };
        stream.synchronize().map_err(|e| Error::driver("timeline: waiting for the GPU", e))?;
        let at = |e: &CudaEvent| -> Result<f64> {
            rec.origin.elapsed_ms(e).map(f64::from).map_err(|err| Error::driver("timeline: reading an event", err))
        };
        let host = |t: Instant| t.saturating_duration_since(rec.host0).as_secs_f64() * 1e3;
        let spans = rec
            .spans
            .iter()
            .map(|s| Ok(Span { name: s.name.clone(), start_ms: at(&s.start)?, end_ms: at(&s.end)?, queued_ms: host(s.queued) }))
            .collect::<Result<Vec<_>>>()?;
        let waits = rec.waits.into_iter().map(|(what, a, b)| Wait { what, start_ms: host(a), end_ms: host(b) }).collect();
        Ok(Timeline { spans, waits })
    }

    /// Runs `f` (which queues work on `stream`) as one span named `name()` when recording and
    /// not already inside a span; else just runs it.
    pub(crate) fn span<T>(&self, stream: &CudaStream, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !self.on.load(Ordering::Acquire) {
            return f();
        }
        {
            let mut state = self.lock();
            match state.as_mut() {
                Some(rec) if rec.depth == 0 => rec.depth = 1,
                _ => {
                    drop(state);
                    return f();
                }
            }
        }
        let queued = Instant::now();
        let recorded = timing_event(stream).and_then(|start| {
            let out = f();
            let end = timing_event(stream)?;
            Ok((start, end, out))
        });
        let mut state = self.lock();
        let Some(rec) = state.as_mut() else {
            return recorded.and_then(|(_, _, out)| out);
        };
        rec.depth = 0;
        let (start, end, out) = recorded?;
        rec.spans.push(Recorded { name: name(), start, end, queued });
        out
    }

    /// Notes a wait of the host that began at `start` and ends now.
    pub(crate) fn waited(&self, what: &str, start: Instant) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(rec) = self.lock().as_mut() {
            rec.waits.push((what.to_string(), start, Instant::now()));
        }
    }
}
