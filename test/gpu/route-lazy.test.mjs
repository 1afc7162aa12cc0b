// The GPU suite, route's lazy check (issue 19): `route(logits, { lazyCheck: true })` on device
// logits returns without waiting for the GPU, its results the same bits as route's; `check()`
// waits once (for the route kernel only) and throws route's own error where a logit or the bias
// is not finite, and again on later calls. The layer's forward reads the check at its end (after
// every kernel of the forward is queued), and one whose router logits are not finite throws the
// cpu layer's error and leaves no GPU memory behind.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { assertSameBits, cpu, cuda, cudaOnly, lib, outcome, randomTensor, skip } from './common.mjs';

if (skip) console.log(`# ${skip}`);

const { MoELayer } = lib;

const waits = () => cuda.transfers().synchronizations;

/** float32 logits [T, E] with values in [-2, 2), and `special` written at the given [row, col]s. */
function logits(T, E, seed, special = []) {
  const t = randomTensor('float32', [T, E], seed, 2);
  for (const [r, c, v] of special) t.data[r * E + c] = v;
  return t;
}

const OPTIONS = [
  { name: 'softmax, top-4', o: { topk: 4 } },
  { name: 'softmax before top-k, normalised', o: { topk: 6, softmaxBeforeTopk: true, normTopkProb: true } },
  { name: 'sigmoid with bias, groups', o: { topk: 8, scoreFunction: 'sigmoid_with_bias', numGroups: 8, topkGroups: 4, normTopkProb: true, routeScale: 2.5 }, bias: true },
];

describe('route with lazyCheck', { skip: cudaOnly }, () => {
  for (const { name, o, bias } of OPTIONS) {
    test(`${name}: the same bits as route, no wait until check(), then one`, () => {
      const E = 64;
      const x = cuda.upload(logits(1000, E, 3));
      const b = bias ? cuda.upload(randomTensor('float32', [E], 4, 0.1)) : undefined;
      const opts = bias ? { ...o, expertBias: b } : o;
      const want = cuda.route(x, opts);
      const w0 = waits();
      const got = cuda.route(x, { ...opts, lazyCheck: true });
      assert.equal(waits(), w0, 'route with lazyCheck waited for the GPU');
      assert.equal(typeof got.check, 'function');
      got.check();
      assert.equal(waits(), w0 + 1, 'check() waits once');
      got.check();
      assert.equal(waits(), w0 + 1, 'a second check() reads nothing again');
      for (const k of ['weights', 'indices', 'scores', 'tokensPerExpert']) assertSameBits(got[k].download(), want[k].download(), `${name}: ${k}`);
      // and the cpu's
      const host = cpu.route(x.download(), bias ? { ...o, expertBias: b.download() } : o);
      for (const k of ['weights', 'indices', 'scores']) assertSameBits(got[k].download(), host[k], `${name}: ${k} against the cpu`);
      for (const r of [want, got]) for (const k of ['weights', 'indices', 'scores', 'tokensPerExpert']) r[k].dispose();
      x.dispose();
      b?.dispose();
    });
  }

  test("a non-finite logit: check() throws route's error, every time", () => {
    for (const v of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      const h = logits(300, 64, 5, [
        [17, 9, v],
        [200, 3, 1 / 0],
      ]);
      const x = cuda.upload(h);
      const got = cuda.route(x, { topk: 6, lazyCheck: true });
      const eager = outcome(() => cuda.route(x, { topk: 6 }));
      const onCpu = outcome(() => cpu.route(h, { topk: 6 }));
      assert.ok(eager.error instanceof RangeError, `route throws a RangeError for ${v}`);
      assert.equal(onCpu.error?.message, eager.error.message, 'the cpu and the GPU name the same value');
      for (let i = 0; i < 2; i++) {
        const e = outcome(() => got.check());
        assert.ok(e.error, `check() #${i + 1} throws for ${v}`);
        assert.equal(e.error.constructor, RangeError);
        assert.equal(e.error.message, eager.error.message);
      }
      // the picks made before the check are k distinct experts in range a row, whatever the values
      const idx = got.indices.download().data;
      for (let r = 0; r < 300; r++) {
        const row = Array.from(idx.subarray(r * 6, r * 6 + 6));
        assert.ok(row.every((e) => e >= 0 && e < 64) && new Set(row).size === 6, `row ${r}: ${row}`);
      }
      const counts = got.tokensPerExpert.download().data;
      assert.equal(
        counts.reduce((a, c) => a + c, 0),
        300 * 6,
      );
      for (const k of ['weights', 'indices', 'scores', 'tokensPerExpert']) got[k].dispose();
      x.dispose();
    }
  });

  test("a non-finite expert bias: check() throws route's error", () => {
    const x = cuda.upload(logits(128, 32, 6));
    const hb = randomTensor('float32', [32], 7, 0.1);
    hb.data[30] = Number.NaN;
    const b = cuda.upload(hb);
    const o = { topk: 4, scoreFunction: 'sigmoid_with_bias', expertBias: b };
    const got = cuda.route(x, { ...o, lazyCheck: true });
    const eager = outcome(() => cuda.route(x, o));
    assert.ok(eager.error instanceof RangeError);
    assert.throws(
      () => got.check(),
      (e) => e.constructor === RangeError && e.message === eager.error.message,
    );
    for (const k of ['weights', 'indices', 'scores', 'tokensPerExpert']) got[k].dispose();
    x.dispose();
    b.dispose();
  });

  test('more experts than the register kernels take: route checks at once, check() reads nothing', () => {
    const x = cuda.upload(logits(64, 1024, 8));
    const w0 = waits();
    const got = cuda.route(x, { topk: 4, lazyCheck: true });
    assert.ok(waits() > w0, 'route waited (its kernel for 1024 experts is checked at once)');
    const w1 = waits();
    got.check();
    assert.equal(waits(), w1);
    for (const k of ['weights', 'indices', 'scores', 'tokensPerExpert']) got[k].dispose();
    x.dispose();
  });

  test('lazyCheck must be a boolean; with host logits it is not an option (the cpu op runs)', () => {
    const x = cuda.upload(logits(8, 16, 9));
    assert.throws(
      () => cuda.route(x, { topk: 2, lazyCheck: 1 }),
      (e) => e instanceof TypeError && /lazyCheck/.test(e.message),
    );
    x.dispose();
    const h = logits(8, 16, 9);
    assert.throws(
      () => cuda.route(h, { topk: 2, lazyCheck: true }),
      (e) => e instanceof TypeError && /lazyCheck: not an option of route/.test(e.message),
    );
  });
});

describe("the layer's forward reads route's check at its end", { skip: cudaOnly }, () => {
  const options = { dim: 64, inter: 48, numExperts: 16, topk: 4, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01, seed: 3 };

  test("finite inputs: route's check read after the whole forward is queued; non-finite router logits: the cpu layer's error, no memory left", () => {
    const host = new MoELayer(cpu, options);
    const dev = new MoELayer(cuda, { ...options, weights: host.weights }).upload();
    const x = randomTensor('bfloat16', [256, 64], 5, 1);
    const dx = cuda.upload(x);
    // route's check is the forward's last wait, after every kernel of the forward was queued
    const { result: f, timeline } = cuda.timeline(() => dev.forward(dx));
    const checks = timeline.waits.filter((w) => w.what === "route's checks");
    assert.equal(checks.length, 1, `one wait for route's checks (waits: ${timeline.waits.map((w) => w.what).join(', ')})`);
    const lastQueued = Math.max(...timeline.spans.map((s) => s.queuedMs));
    assert.ok(checks[0].startMs >= lastQueued, `route's check read at ${checks[0].startMs} ms, before the last kernel was queued (${lastQueued} ms)`);
    const out = f.output.download();
    // (the backward frees what the forward kept: the memory below is the layer's weights and the inputs)
    const b = dev.backward(dx);
    for (const t of [b.gradInput, ...Object.values(b.grads)]) t.dispose();
    for (const k of ['output', 'indices', 'weights', 'logits', 'scores', 'tokensPerExpert']) f[k].dispose();

    // a NaN in token 37's row makes its router logits NaN
    const bad = { ...x, data: x.data.slice() };
    bad.data[37 * 64 + 5] = 0x7fc0;
    const dbad = cuda.upload(bad);
    cuda.synchronize();
    const live = cuda.memory().liveBytes;
    const got = outcome(() => dev.forward(dbad));
    const want = outcome(() => host.forward(bad));
    assert.ok(got.error && want.error, `both throw (GPU: ${got.error?.message}; cpu: ${want.error?.message})`);
    assert.equal(got.error.constructor, want.error.constructor);
    assert.equal(got.error.message, want.error.message);
    assert.equal(cuda.memory().liveBytes, live, 'the failed forward left GPU memory behind');
    assert.throws(() => dev.backward(dx), /forward/, 'no backward after a failed forward');

    // and the layer goes on: the same output as before
    const again = dev.forward(dx);
    assertSameBits(again.output.download(), out, 'a forward after the failed one');
    for (const k of ['output', 'indices', 'weights', 'logits', 'scores', 'tokensPerExpert']) again[k].dispose();
    dev.dispose();
    dx.dispose();
    dbad.dispose();
  });
});
