/**
 * Reading a GPU timeline (ts/timeline.ts) on made-up timelines whose sums are known: the busy time
 * is the union of the spans (overlaps counted once), the gaps are the rest of the wall, the part of
 * a gap before the next span was queued is the host's, the GEMMs are told from the rest by name.
 * The recorder itself runs in the GPU suite (test/gpu/timeline.test.mjs).
 */
import { describe, expect, it } from 'vitest';
import type { CudaTimeline } from '../ts/backends/cuda.js';
import { isGemmSpan, summarizeTimeline } from '../ts/index.js';

const span = (name: string, startMs: number, endMs: number, queuedMs = 0) => ({ name, startMs, endMs, queuedMs });

describe('summarizeTimeline', () => {
  it('sums a timeline with gaps, an overlap and a wait for the host', () => {
    const t: CudaTimeline = {
      spans: [
        span('route_kernel_r2', 1, 2),
        // queued at 2.5, after route ended at 2: 0.5 of the 1.0 gap is the host's
        span('grouped_gemm_nn_n256_bf16_bulk', 3, 7, 2.5),
        // inside the GEMM's span (a side stream's wait): counted once in busy time
        span('waiting for the weight gradients beside', 6, 7.5, 0.1),
        // queued long before: its 0.5 gap is the GPU's own
        span('cublas: gemm [8, 4] x [4, 2]', 8, 9, 0.2),
        span('route_kernel_r2', 9, 9.25, 0.3),
      ],
      waits: [],
    };
    const s = summarizeTimeline(t);
    expect(s.wallMs).toBe(8.25);
    expect(s.busyMs).toBe(1 + 4.5 + 1 + 0.25);
    expect(s.gapMs).toBeCloseTo(8.25 - 6.75, 12);
    expect(s.hostBoundMs).toBe(0.5);
    expect(s.gemmMs).toBe(4 + 1);
    expect(s.otherMs).toBe(1 + 1.5 + 0.25);
    expect(s.byName.map((e) => [e.name, e.count, e.ms])).toEqual([
      ['grouped_gemm_nn_n256_bf16_bulk', 1, 4],
      ['waiting for the weight gradients beside', 1, 1.5],
      ['route_kernel_r2', 2, 1.25],
      ['cublas: gemm [8, 4] x [4, 2]', 1, 1],
    ]);
  });

  it("a gap is the host's only up to the next start, and spans are taken in start order", () => {
    // queued after it started (the host's clock trails the GPU's by the first synchronize): the whole gap
    const s = summarizeTimeline({ spans: [span('b', 5, 6, 9), span('a', 0, 1)], waits: [] });
    expect(s.wallMs).toBe(6);
    expect(s.busyMs).toBe(2);
    expect(s.hostBoundMs).toBe(4);
  });

  it('an empty timeline sums to zeros', () => {
    const s = summarizeTimeline({ spans: [], waits: [] });
    expect([s.wallMs, s.busyMs, s.gapMs, s.hostBoundMs, s.gemmMs, s.otherMs, s.byName.length]).toEqual([0, 0, 0, 0, 0, 0, 0]);
  });

  it('names the GEMMs: our grouped GEMM and cuBLAS', () => {
    expect(isGemmSpan('grouped_gemm_wgrad_bf16_bulk')).toBe(true);
    expect(isGemmSpan("cublas: experts' GEMMs, A^T (n 2048, k 768)")).toBe(true);
    expect(isGemmSpan('act_fwdv_fast_bf16_bf16')).toBe(false);
    expect(isGemmSpan('memset the counters')).toBe(false);
  });

  it('refuses what is not a timeline, naming the argument and the span', () => {
    expect(() => summarizeTimeline(undefined as unknown as CudaTimeline)).toThrow(/timeline: expected what CudaBackend.timeline returned/);
    expect(() => summarizeTimeline({ spans: [span('k', 2, 1)], waits: [] })).toThrow(RangeError);
    expect(() => summarizeTimeline({ spans: [span('ok', 0, 1), span('k', 0, Number.NaN)], waits: [] })).toThrow(/timeline.spans\[1\] \(k\): expected startMs <= endMs/);
  });
});
