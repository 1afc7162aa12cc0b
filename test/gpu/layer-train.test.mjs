// The GPU suite, training MoELayer on device tensors (issue 18): for each layer kind, a layer
// uploaded to the GPU against the same layer on the cpu backend: forward (output, routing,
// losses), backward (input gradient, every parameter gradient) and two AdamW steps agree to the
// GEMMs' tolerance (the expert and router GEMMs are cuBLAS on the GPU, matrixmultiply on the
// CPU; everything else is the same arithmetic); the routing picks are the same. A step moves no
// tensor data between host and device (the copies it makes are counted: counts, error words,
// the losses, GEMM pointer arrays, a few KB); two runs give the same bits; download() brings the
// trained weights back; disposing frees the GPU memory.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { cpu, cuda, cudaOnly, hopper, lib, maxRelErr, randomTensor, skip } from './common.mjs';

if (skip) console.log(`# ${skip}`);

const { MoELayer, AdamW } = lib;

const KINDS = [
  { name: 'mixtral-like (softmax top-k, swiglu), bf16, aux loss', o: { activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01 } },
  { name: 'float32 layer, softmax before top-k, normalised, z-loss', o: { activation: 'swiglu', dtype: 'float32', softmaxBeforeTopk: true, normTopkProb: true, zLossCoeff: 1e-3 } },
  {
    name: 'deepseek-like (sigmoid_with_bias, groups, float32 router, scale), bf16',
    o: { activation: 'swiglu', dtype: 'bfloat16', routerDtype: 'float32', scoreFunction: 'sigmoid_with_bias', expertBias: true, numGroups: 4, topkGroups: 2, normTopkProb: true, routeScale: 2.5 },
  },
  {
    name: 'gpt-oss-like (router bias, swiglu_oai, expert biases), bf16, hf aux loss',
    o: { activation: 'swiglu_oai', dtype: 'bfloat16', routerBias: true, bias: true, auxLossCoeff: 0.02, auxLossConvention: 'hf' },
  },
  { name: 'relu2 experts, sqrtsoftplus router, float16', o: { activation: 'relu2', dtype: 'float16', scoreFunction: 'sqrtsoftplus', normTopkProb: true } },
  { name: 'qwen2-moe-like (gated shared expert), bf16', o: { activation: 'swiglu', dtype: 'bfloat16', normTopkProb: false, sharedExpert: { inter: 96, gate: true }, auxLossCoeff: 0.001 } },
  {
    name: 'deepseek-like with a shared expert (no gate), float32',
    o: { activation: 'swiglu', dtype: 'float32', scoreFunction: 'sigmoid', normTopkProb: true, routeScale: 2.5, sharedExpert: { inter: 64 } },
  },
];

const SHAPE = { dim: 64, inter: 48, numExperts: 16, topk: 4 };
const T = 256;

function values(t) {
  const h = lib.isDeviceTensor(t) ? t.download() : t;
  return lib.toNumbers(h);
}

/** max |a - b| / max |b| over the tensor: a scale-aware error (the GEMMs differ in rounding). */
const relErr = (a, b) => maxRelErr(values(a), values(b));

const TOL = { float32: 1e-4, bfloat16: 3e-2, float16: 1e-2 };

describe('MoELayer on device tensors = the cpu layer (to the GEMMs tolerance)', { skip: cudaOnly }, () => {
  for (const kind of KINDS) {
    test(kind.name, () => {
      const options = { ...SHAPE, ...kind.o, seed: 11 };
      const host = new MoELayer(cpu, options);
      const hostWeights = Object.fromEntries(Object.entries(host.weights).map(([k, t]) => [k, { ...t, data: t.data.slice() }]));
      const dev = new MoELayer(cuda, { ...options, weights: hostWeights }).upload();
      assert.ok(dev.onDevice);
      const tol = TOL[kind.o.dtype];
      const x = randomTensor(kind.o.dtype, [T, SHAPE.dim], 5, 1);
      const dx = cuda.upload(x);
      const g = randomTensor(kind.o.dtype, [T, SHAPE.dim], 6, 0.1);
      const dg = cuda.upload(g);
      const lr = 1e-3;
      const hostOpt = new AdamW(cpu, host.parameters(), { lr, maxGradNorm: 1 });
      const devOpt = new AdamW(cuda, dev.parameters(), { lr, maxGradNorm: 1 });
      // one step compared (after it the weights differ by the GEMMs' rounding, amplified by Adam's
      // normalised update, so later routing may differ); a second device step must run
      for (let step = 0; step < 2; step++) {
        const df = dev.forward(dx);
        assert.ok(lib.isDeviceTensor(df.output), 'the output is a device tensor');
        const db = dev.backward(dg);
        if (step === 0) {
          const hf = host.forward(x);
          assert.deepEqual(values(df.indices), values(hf.indices), 'the picks');
          assert.deepEqual(values(df.tokensPerExpert), [...hf.tokensPerExpert], 'tokens per expert');
          assert.ok(relErr(df.output, hf.output) <= tol, `output (${relErr(df.output, hf.output)})`);
          const logitsTol = TOL[kind.o.routerDtype ?? kind.o.dtype];
          assert.ok(relErr(df.logits, hf.logits) <= (logitsTol === TOL.float32 ? 1e-5 : logitsTol), `logits (${relErr(df.logits, hf.logits)})`);
          assert.ok(Math.abs(df.auxLoss - hf.auxLoss) <= 1e-6 * Math.max(1, Math.abs(hf.auxLoss)), `aux loss ${df.auxLoss} vs ${hf.auxLoss}`);
          assert.ok(Math.abs(df.zLoss - hf.zLoss) <= 1e-5 * Math.max(1e-3, Math.abs(hf.zLoss)), `z-loss ${df.zLoss} vs ${hf.zLoss}`);
          const hb = host.backward(g);
          assert.ok(relErr(db.gradInput, hb.gradInput) <= tol, `gradInput (${relErr(db.gradInput, hb.gradInput)})`);
          assert.deepEqual(Object.keys(db.grads).sort(), Object.keys(hb.grads).sort());
          for (const k of Object.keys(hb.grads)) assert.ok(relErr(db.grads[k], hb.grads[k]) <= tol, `grads.${k} (${relErr(db.grads[k], hb.grads[k])})`);
          hostOpt.step(hb.grads);
          devOpt.step(db.grads);
          // Adam moves each weight by about lr at the first step, either way where the gradient is near 0
          for (const [k, w] of Object.entries(host.weights)) {
            const a = values(dev.weights[k]);
            const b = values(w);
            const scale = Math.max(...b.map(Math.abs));
            const worst = Math.max(...a.map((v, i) => Math.abs(v - b[i])));
            assert.ok(worst <= 2.5 * lr + tol * scale, `weights.${k} after the step: off by ${worst}`);
          }
        } else {
          devOpt.step(db.grads);
          assert.ok(values(df.output).every(Number.isFinite), 'a second step runs and stays finite');
        }
        for (const t of [df.output, df.indices, df.weights, df.logits, df.scores, df.tokensPerExpert, db.gradInput, ...Object.values(db.grads)]) t.dispose();
      }
      assert.equal(devOpt.status().step, 2);
      devOpt.dispose();
      dev.download();
      assert.ok(!dev.onDevice);
      for (const t of [dx, dg]) t.dispose();
    });
  }

  test('a training step moves no tensor data between host and device; two runs give the same bits; memory is freed', () => {
    const before = cuda.memory().liveBytes;
    const run = () => {
      const options = { dim: 512, inter: 256, numExperts: 32, topk: 4, activation: 'swiglu', dtype: 'bfloat16', auxLossCoeff: 0.01, zLossCoeff: 1e-3, seed: 3 };
      const layer = new MoELayer(cuda, options).upload();
      const opt = new AdamW(cuda, layer.parameters(), { lr: 1e-3, maxGradNorm: 1, onNonFinite: 'skip' });
      const x = cuda.upload(randomTensor('bfloat16', [2048, 512], 8, 1));
      const g = cuda.upload(randomTensor('bfloat16', [2048, 512], 9, 0.01));
      const forwards = [];
      const step = () => {
        const f = layer.forward(x);
        const b = layer.backward(g);
        opt.step(b.grads);
        for (const t of [f.output, f.indices, f.weights, f.logits, f.scores, f.tokensPerExpert, b.gradInput, ...Object.values(b.grads)]) t.dispose();
        forwards.push(f);
      };
      step();
      cuda.synchronize();
      const t0 = cuda.transfers();
      step();
      cuda.synchronize();
      const t1 = cuda.transfers();
      const moved = {
        toDeviceBytes: t1.toDeviceBytes - t0.toDeviceBytes,
        toHostBytes: t1.toHostBytes - t0.toHostBytes,
        toDeviceCalls: t1.toDeviceCalls - t0.toDeviceCalls,
        toHostCalls: t1.toHostCalls - t0.toHostCalls,
        // less the synchronize after the step
        synchronizations: t1.synchronizations - t0.synchronizations - 1,
      };
      console.log(`# one step (T=2048, dim 512, E=32, bf16): ${JSON.stringify(moved)}`);
      // an activation is 2 MB (2048 x 512 bf16): a step's copies are small words only
      assert.ok(moved.toDeviceBytes < 64 * 1024 && moved.toHostBytes < 64 * 1024, JSON.stringify(moved));
      // the host waits for the GPU once a step, for route's check of the logits' values, where
      // the experts run on our grouped GEMM, which reads the counts on the GPU (a Hopper GPU, the
      // default path or MOE_DISPATCH_EXPERTS_GEMM=grouped); twice on
      // cuBLAS, whose GEMMs are sized by the counts (the backward takes the forward's); the ops
      // on route's outputs skip their checks, the losses are not read (lazyLoss), the optimizer
      // ('skip') reads nothing
      const waits = hopper && process.env.MOE_DISPATCH_EXPERTS_GEMM !== 'cublas' ? 1 : 2;
      assert.equal(moved.synchronizations, waits, `synchronisations in a step: ${JSON.stringify(moved)}`);
      for (let i = 0; i < 3; i++) step();
      // the losses, read after the steps (each read frees its value's words on the GPU)
      for (const f of forwards) assert.ok(Number.isFinite(f.auxLoss) && Number.isFinite(f.zLoss) && f.auxLoss > 0, `losses ${f.auxLoss} ${f.zLoss}`);
      const bits = Object.fromEntries(Object.entries(layer.weights).map(([k, t]) => [k, Array.from(lib.isDeviceTensor(t) ? new Uint8Array(t.download().data.buffer) : [])]));
      opt.dispose();
      layer.dispose();
      x.dispose();
      g.dispose();
      return bits;
    };
    const a = run();
    const b = run();
    for (const k of Object.keys(a)) assert.deepEqual(a[k], b[k], `weights.${k}: two runs of five steps`);
    assert.equal(cuda.memory().liveBytes, before, 'everything the runs made on the GPU was freed');
  });
});

test('the suite ran where CUDA is available', () => {
  assert.ok(skip || cuda);
});
