/**
 * Reading a GPU timeline (`CudaBackend.timeline`): how much of a step the GPU was busy, how much
 * it sat between kernels, how much of that it waited for the host, and which kernels took the time.
 */
import type { CudaTimeline } from './backends/cuda.js';

/** One kernel name's share of a timeline. */
export interface TimelineEntry {
  name: string;
  count: number;
  /** The sum of its spans' durations. */
  ms: number;
}

export interface TimelineSummary {
  /** From the first span's start to the last span's end. */
  wallMs: number;
  /** The time at least one span ran (their union). */
  busyMs: number;
  /** wallMs - busyMs: the GPU between spans (launch gaps, waits for the host, the timing events' own cost). */
  gapMs: number;
  /** The part of gapMs in which the next span had not been queued yet: the GPU waited for the host. */
  hostBoundMs: number;
  /** The spans of the GEMMs (our grouped GEMM's kernels, cuBLAS calls) and the rest, summed. */
  gemmMs: number;
  otherMs: number;
  /** Every name's count and time, the longest first. */
  byName: TimelineEntry[];
}

/** Whether a span is an expert or router GEMM: our grouped GEMM's kernels and every cuBLAS call. */
export function isGemmSpan(name: string): boolean {
  return name.startsWith('grouped_gemm') || name.startsWith('cublas');
}

/** Sums a timeline up (see `TimelineSummary`). An empty timeline sums to zeros. */
export function summarizeTimeline(timeline: CudaTimeline): TimelineSummary {
  if (timeline === null || typeof timeline !== 'object' || !Array.isArray(timeline.spans)) {
    throw new TypeError('summarizeTimeline: timeline: expected what CudaBackend.timeline returned ({ spans, waits })');
  }
  const spans = timeline.spans;
  const byName = new Map<string, TimelineEntry>();
  let gemmMs = 0;
  let otherMs = 0;
  for (const [i, s] of spans.entries()) {
    if (!(Number.isFinite(s.startMs) && Number.isFinite(s.endMs) && s.endMs >= s.startMs)) {
      throw new RangeError(`summarizeTimeline: timeline.spans[${i}] (${s.name}): expected startMs <= endMs, got ${s.startMs} and ${s.endMs}`);
    }
    const ms = s.endMs - s.startMs;
    const e = byName.get(s.name) ?? { name: s.name, count: 0, ms: 0 };
    e.count++;
    e.ms += ms;
    byName.set(s.name, e);
    if (isGemmSpan(s.name)) gemmMs += ms;
    else otherMs += ms;
  }
  // the union of the spans in start order, and for each gap the wait for the host
  const order = [...spans].sort((a, b) => a.startMs - b.startMs);
  let busyMs = 0;
  let hostBoundMs = 0;
  let end = -Infinity;
  for (const s of order) {
    if (s.startMs > end) {
      if (end > -Infinity) hostBoundMs += Math.min(s.startMs, Math.max(end, s.queuedMs)) - end;
      busyMs += s.endMs - s.startMs;
      end = s.endMs;
    } else if (s.endMs > end) {
      busyMs += s.endMs - end;
      end = s.endMs;
    }
  }
  const wallMs = order.length === 0 ? 0 : end - order[0].startMs;
  return {
    wallMs,
    busyMs,
    gapMs: wallMs - busyMs,
    hostBoundMs,
    gemmMs,
    otherMs,
    byName: [...byName.values()].sort((a, b) => b.ms - a.ms),
  };
}
