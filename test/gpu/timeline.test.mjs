// The GPU suite, the timeline (`CudaBackend.timeline`, crates/moe-cuda/src/timeline.rs): a layer's
// forward + backward recorded on the GPU. Its spans are the work of one stream, so each starts
// after the one queued before it ends; the GEMMs and the permute are among them; the host's waits
// are the synchronisations the step made (the transfer counters' count); the results are the bits
// of the same step without a timeline; a run that throws stops the recording; nothing is recorded
// outside a timeline; one cannot nest.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertSameBits, cuda, cudaOnly, host, lib, randomTensor, skip } from './common.mjs';

if (skip) console.log(`# ${skip}`);

const { MoELayer, summarizeTimeline, isGemmSpan } = lib;

describe('timeline: a layer step on the GPU', { skip: cudaOnly }, () => {
  const options = { dim: 256, inter: 128, numExperts: 16, topk: 4, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01, seed: 5 };

  test('spans in queue order, the GEMMs and the permute among them, the waits the step made, the same bits as without', () => {
    const layer = new MoELayer(cuda, options).upload();
    const x = cuda.upload(randomTensor('bfloat16', [1024, 256], 1, 1));
    const g = cuda.upload(randomTensor('bfloat16', [1024, 256], 2, 0.01));
    const step = () => {
      const f = layer.forward(x);
      const b = layer.backward(g);
      return { output: host(f.output), gradInput: host(b.gradInput), gradDown: host(b.grads.downProjs) };
    };
    const plain = step();
    cuda.synchronize();
    const t0 = cuda.transfers();
    const { result, timeline } = cuda.timeline(step);
    const t1 = cuda.transfers();
    for (const k of Object.keys(plain)) assertSameBits(result[k], plain[k], `${k} with the timeline`);

    const { spans, waits } = timeline;
    assert.ok(spans.length >= 10, `a forward + backward queues more than ${spans.length} spans`);
    let before = 0;
    for (const [i, s] of spans.entries()) {
      assert.equal(typeof s.name, 'string');
      assert.ok(s.name.length > 0, `span ${i} has a name`);
      assert.ok(s.startMs >= 0 && s.endMs >= s.startMs && s.queuedMs >= 0, `span ${i} (${s.name}): start ${s.startMs}, end ${s.endMs}, queued ${s.queuedMs}`);
      // one stream: a span starts once the one queued before it has ended (events' resolution ~0.5 us)
      assert.ok(s.startMs >= before - 1e-3, `span ${i} (${s.name}) starts at ${s.startMs}, before span ${i - 1} ended (${before})`);
      before = s.endMs;
    }
    const names = spans.map((s) => s.name);
    assert.ok(names.some(isGemmSpan), `a GEMM among ${[...new Set(names)].join(', ')}`);
    assert.ok(
      names.some((n) => /permute/.test(n)),
      `a permute kernel among ${[...new Set(names)].join(', ')}`,
    );
    // every wait of the host is one the transfer counters saw (the step downloads three tensors)
    assert.equal(waits.length, t1.synchronizations - t0.synchronizations, 'the waits are the synchronisations');
    for (const w of waits) assert.ok(w.endMs >= w.startMs && w.startMs >= 0, `wait ${w.what}: ${w.startMs} .. ${w.endMs}`);

    const sum = summarizeTimeline(timeline);
    assert.ok(sum.busyMs > 0 && sum.busyMs <= sum.wallMs + 1e-9, `busy ${sum.busyMs} within the wall ${sum.wallMs}`);
    assert.ok(Math.abs(sum.gemmMs + sum.otherMs - spans.reduce((a, s) => a + (s.endMs - s.startMs), 0)) < 1e-9);
    assert.ok(sum.gemmMs > 0);
    assert.equal(
      sum.byName.reduce((a, e) => a + e.count, 0),
      spans.length,
    );
    layer.dispose();
    x.dispose();
    g.dispose();
  });

  test('a run that throws stops the recording; nothing is recorded outside; no nesting; run must be a function', () => {
    const a = cuda.upload(randomTensor('float32', [64, 32], 3, 1));
    assert.throws(
      () =>
        cuda.timeline(() => {
          cuda.cast(a, 'bfloat16').dispose();
          throw new Error('stop here');
        }),
      /stop here/,
    );
    // recording stopped: this cast is outside any timeline, and the next one records only its own
    cuda.cast(a, 'bfloat16').dispose();
    const empty = cuda.timeline(() => 7);
    assert.equal(empty.result, 7);
    assert.equal(empty.timeline.spans.length, 0, `spans outside the run: ${empty.timeline.spans.map((s) => s.name).join(', ')}`);
    const one = cuda.timeline(() => cuda.cast(a, 'bfloat16'));
    assert.equal(one.timeline.spans.length, 1, `one cast, one span: ${one.timeline.spans.map((s) => s.name).join(', ')}`);
    one.result.dispose();
    let inner;
    const outer = cuda.timeline(() => {
      try {
        cuda.timeline(() => 1);
      } catch (e) {
        inner = e;
      }
      return 2;
    });
    assert.equal(outer.result, 2);
    assert.match(String(inner?.message), /already recording/);
    assert.throws(() => cuda.timeline('not a function'), { name: 'TypeError', message: /run: expected a function/ });
    a.dispose();
  });
});
