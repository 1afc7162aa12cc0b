// The experts gathering their rows on load (MOE_DISPATCH_GG_FUSE=gather on our grouped GEMM:
// grouped_gemm_nn_n256_bf16_gather_tma for x W1; dW1 = x^T dh on the rows copied out for it, or
// with `gather,gather-wgrad` (experts-ggemm-gather-wgrad.test.mjs) grouped_gemm_wgrad_bf16_gather_tma),
// through `gatherIndices`: the tokens in their own order and permute's sortedIndices in place of
// the permuted copy. The same bits as the grouped path on the permuted copy, forward and
// backward; indices that permute did not make are checked (one read-back); without a Hopper GPU
// or with counts the GPU does not know the rows are copied out first (the same results). Then
// the grouped-GEMM experts suite and the layer suite, whose bf16 layers now leave the permuted
// copy unmade. The environment is read once per process: node --test runs each file in its own.
// (`auto`, the default's name: our grouped GEMM, which takes the fusion with no more said; read
// once, at the first experts call, after every import: experts-ggemm.test.mjs keeps it)
process.env.MOE_DISPATCH_EXPERTS_GEMM = 'auto';
// (a file that imports this one may have named more fusions, gather among them)
if (!(process.env.MOE_DISPATCH_GG_FUSE ?? '').split(',').includes('gather')) process.env.MOE_DISPATCH_GG_FUSE = 'gather';

const assert = (await import('node:assert/strict')).default;
const { describe, test } = await import('node:test');
const { cuda, host, routedExperts: problem, skipGrouped, tensor } = await import('./common.mjs');

/** Where two tensors' bits first differ, or -1. */
function firstDiff(a, b) {
  const x = host(a).data;
  const y = host(b).data;
  assert.equal(x.length, y.length, 'lengths');
  return x.findIndex((v, i) => v !== y[i]);
}

function assertSameBits(a, b, what) {
  const i = firstDiff(a, b);
  assert.equal(i, -1, `${what}: differs first at element ${i}`);
}

const GRADS = (p) => ['gradTokens', p.gradKey, 'gradDownProjs', 'gradProbs'];

describe('experts gathering their rows on load (gatherIndices)', () => {
  test('the backend says the experts gather on load here', { skip: skipGrouped }, () => {
    assert.equal(cuda.expertsGatherOnLoad(), true);
  });

  for (const c of [
    { kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2, empty: false },
    { kind: 'swiglu', T: 257, dim: 136, inter: 72, E: 12, k: 3, empty: true },
    { kind: 'relu2', T: 190, dim: 72, inter: 64, E: 5, k: 1, empty: true },
  ]) {
    test(`${c.kind} T=${c.T} dim=${c.dim} inter=${c.inter} E=${c.E} k=${c.k}: the same bits as the grouped path on the permuted copy, no read-back`, { skip: skipGrouped }, () => {
      const p = problem(c);
      const { perm, weights, options } = p;
      const want = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
      const wantB = cuda.expertsBackward(p.grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: want.saved });
      const sync0 = cuda.transfers().synchronizations;
      const got = cuda.expertsForward(p.x, perm.tokensPerExpert, weights, { ...options, saveForBackward: true, gatherIndices: perm.sortedIndices });
      const gotB = cuda.expertsBackward(p.grad, p.x, perm.tokensPerExpert, weights, { ...options, saved: got.saved, gatherIndices: perm.sortedIndices });
      assert.equal(cuda.transfers().synchronizations, sync0, "permute's sortedIndices are taken as they are: nothing read back");
      assertSameBits(got.output, want.output, 'output');
      assertSameBits(got.saved.upProjection, want.saved.upProjection, 'saved.upProjection');
      for (const key of GRADS(p)) assertSameBits(gotB[key], wantB[key], key);
      // the backward recomputing h (no saved) gathers too
      const again = cuda.expertsBackward(p.grad, p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: perm.sortedIndices });
      for (const key of GRADS(p)) assertSameBits(again[key], wantB[key], `${key} (recomputed h)`);
    });
  }

  test('indices that permute did not make: read back once, checked, the same bits; bad ones are errors naming gatherIndices', { skip: skipGrouped }, () => {
    const p = problem({ kind: 'swiglu', T: 200, dim: 64, inter: 32, E: 6, k: 2, empty: false });
    const { perm, weights, options } = p;
    const want = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, options);
    const idx = perm.sortedIndices.download();
    const copy = cuda.upload(idx);
    const sync0 = cuda.transfers().synchronizations;
    const got = cuda.expertsForward(p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: copy });
    assert.equal(cuda.transfers().synchronizations, sync0 + 1, 'the indices read back once to be checked');
    assertSameBits(got, want, 'output');
    // a host tensor of indices is uploaded (and checked)
    assertSameBits(cuda.expertsForward(p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: idx }), want, 'output (host indices)');
    const bad = Int32Array.from(idx.data);
    bad[5] = 200;
    assert.throws(
      () => cuda.expertsForward(p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: cuda.upload(tensor('int32', [bad.length], bad)) }),
      (e) => e instanceof RangeError && /gatherIndices/.test(e.message) && /element 5 = 200/.test(e.message),
    );
    bad[5] = -1;
    assert.throws(
      () => cuda.expertsBackward(p.grad, p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: cuda.upload(tensor('int32', [bad.length], bad)) }),
      (e) => e instanceof RangeError && /gatherIndices/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsForward(p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: cuda.upload(tensor('float32', [idx.data.length])) }),
      (e) => e instanceof TypeError && /gatherIndices/.test(e.message),
    );
    // a bad index where the rows would be copied out (cuBLAS path: counts the GPU does not know) is caught too
    assert.throws(
      () => cuda.expertsForward(p.x, cuda.upload(perm.tokensPerExpert.download()), weights, { ...options, gatherIndices: cuda.upload(tensor('int32', [bad.length], bad)) }),
      (e) => e instanceof RangeError && /gatherIndices/.test(e.message),
    );
  });

  test('where the GEMMs cannot gather (counts the GPU does not know: cuBLAS), the rows are copied out: the same bits as that path on the permuted copy', { skip: skipGrouped }, () => {
    const p = problem({ kind: 'swiglu', T: 150, dim: 64, inter: 40, E: 4, k: 2, empty: false });
    const { perm, weights, options } = p;
    const counts = cuda.upload(perm.tokensPerExpert.download());
    const want = cuda.expertsForward(perm.permutedTokens, counts, weights, options);
    const wantB = cuda.expertsBackward(p.grad, perm.permutedTokens, counts, weights, options);
    assertSameBits(cuda.expertsForward(p.x, counts, weights, { ...options, gatherIndices: perm.sortedIndices }), want, 'output');
    const gotB = cuda.expertsBackward(p.grad, p.x, counts, weights, { ...options, gatherIndices: perm.sortedIndices });
    for (const key of GRADS(p)) assertSameBits(gotB[key], wantB[key], key);
  });
});

await import('./experts-ggemm.test.mjs');
