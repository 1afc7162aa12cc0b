// expertsBackward with gradGatherIndices on the GPU: gradOutput is the gradient of the tokens in
// their own order and the call gathers the experts' rows of it itself (the backward of the layer's
// unweighted unpermute), where the caller used to make that [N, dim] copy with unpermuteBackward
// and hold it through the call. The same bits as the call on that copy, on our grouped GEMM and
// on the cuBLAS path; permute's sortedIndices are taken without a read-back, others are checked;
// and on the grouped GEMM the copy is freed before the gradients made after dW2 and da, so the
// call's own peak is no higher than with the rows given (crates/moe-cuda/src/experts_grouped.rs
// backward_grouped). And `freeSaved`: the forward's saved h and a given to the backward, which on
// the grouped GEMM frees a after dW2 and h after the activation's backward (the call's own peak
// lower by their bytes), the same bits; both disposed when it returns, untouched when a check
// fails. The default experts path (unset MOE_DISPATCH_EXPERTS_GEMM: our grouped GEMM on a Hopper
// GPU). And `freeTokens`: the permuted tokens given to the backward, which on the grouped GEMM
// writes the tokens' gradient over them once dW1 has read them (the call's own peak lower by
// its bytes), the same bits; disposed when it returns, untouched when a check fails.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { cuda, cudaOnly, free, host, routedExperts, skipGrouped, tensor } from './common.mjs';

function assertSameBits(a, b, what) {
  const x = host(a).data;
  const y = host(b).data;
  assert.equal(x.length, y.length, `${what}: lengths`);
  const i = x.findIndex((v, j) => v !== y[j]);
  assert.equal(i, -1, `${what}: differs first at element ${i}`);
}

const GRADS = (p) => ['gradTokens', p.gradKey, 'gradDownProjs', 'gradProbs'];

/** The experts' rows of the tokens' gradient as the layer made them before: unpermuteBackward (no probs). */
const gradRows = (p) => cuda.unpermuteBackward(p.gradTokens, p.perm.permutedTokens, p.perm.sortedIndices).gradPermuted;

describe("the experts' backward gathering its output gradient (gradGatherIndices)", () => {
  for (const c of [
    { kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2, empty: false },
    { kind: 'relu2', T: 190, dim: 72, inter: 64, E: 5, k: 1, empty: true },
  ]) {
    test(`${c.kind} T=${c.T} dim=${c.dim} E=${c.E} k=${c.k}, grouped GEMM: the same bits as on unpermuteBackward's rows, nothing read back, the copy freed early`, { skip: skipGrouped }, () => {
      const p = routedExperts(c);
      const { perm, weights, options } = p;
      const fwd = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
      const rows = gradRows(p);
      let live = cuda.memory().liveBytes;
      cuda.peakMemory({ reset: true });
      const want = cuda.expertsBackward(rows, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved });
      const extraGiven = cuda.peakMemory() - live;
      const sync0 = cuda.transfers().synchronizations;
      live = cuda.memory().liveBytes;
      cuda.peakMemory({ reset: true });
      const got = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved, gradGatherIndices: perm.sortedIndices });
      const extraGathered = cuda.peakMemory() - live;
      assert.equal(cuda.transfers().synchronizations, sync0, "permute's sortedIndices are taken as they are: nothing read back");
      for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
      // the copy ([N, dim] bf16) is made inside the call: kept to the end it would raise the
      // call's peak by its size; freed after dW2 and da, the later gradients reuse its bytes
      const copy = rows.byteLength;
      assert.ok(extraGathered <= extraGiven, `the call's own peak: ${extraGathered} bytes gathering, ${extraGiven} with the rows given (the copy: ${copy})`);
      // recomputing h (no saved), and gathering the tokens too
      const again = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: perm.sortedIndices });
      for (const key of GRADS(p)) assertSameBits(again[key], want[key], `${key} (h recomputed)`);
      const both = cuda.expertsBackward(p.gradTokens, p.x, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved, gatherIndices: perm.sortedIndices, gradGatherIndices: perm.sortedIndices });
      for (const key of GRADS(p)) assertSameBits(both[key], want[key], `${key} (the tokens gathered too)`);
      free(fwd.output, fwd.saved, rows, want, got, again, both);
    });
  }

  test('the cuBLAS path (counts the GPU does not know): the same bits as on the rows', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 150, dim: 64, inter: 40, E: 4, k: 2, empty: true });
    const { perm, weights, options } = p;
    const counts = cuda.upload(perm.tokensPerExpert.download());
    const rows = gradRows(p);
    const want = cuda.expertsBackward(rows, perm.permutedTokens, counts, weights, options);
    const got = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, counts, weights, { ...options, gradGatherIndices: perm.sortedIndices });
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
    free(counts, rows, want, got);
  });

  test('indices permute did not make: read back, checked, the same bits; bad ones and a bad gradient are errors naming them', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 120, dim: 64, inter: 40, E: 4, k: 2, empty: false });
    const { perm, weights, options } = p;
    const rows = gradRows(p);
    const want = cuda.expertsBackward(rows, perm.permutedTokens, perm.tokensPerExpert, weights, options);
    const idx = perm.sortedIndices.download();
    const copy = cuda.upload(idx);
    const sync0 = cuda.transfers().synchronizations;
    const got = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: copy });
    assert.ok(cuda.transfers().synchronizations > sync0, 'indices of unknown origin are read back and checked');
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], `${key} (uploaded indices)`);
    const host = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: idx });
    for (const key of GRADS(p)) assertSameBits(host[key], want[key], `${key} (host indices)`);
    const bad = Int32Array.from(idx.data);
    bad[7] = 120;
    assert.throws(
      () => cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: cuda.upload(tensor('int32', [bad.length], bad)) }),
      (e) => e instanceof RangeError && /gradGatherIndices/.test(e.message) && /element 7 = 120 is outside \[0, 120\)/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: cuda.upload(tensor('float32', [bad.length])) }),
      (e) => e instanceof TypeError && /gradGatherIndices/.test(e.message),
    );
    // the rows' gradient given with gradGatherIndices: not the tokens' [numTokens, dim]
    const flat = cuda.upload(tensor('bfloat16', [120 * 64]));
    assert.throws(
      () => cuda.expertsBackward(flat, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: perm.sortedIndices }),
      (e) => e instanceof RangeError && /gradOutput/.test(e.message) && /gradGatherIndices/.test(e.message),
    );
    // a gradient of another width: the experts' shape check, naming gradOutput
    const narrow = cuda.upload(tensor('bfloat16', [120, 32]));
    assert.throws(
      () => cuda.expertsBackward(narrow, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: perm.sortedIndices }),
      (e) => (e instanceof RangeError || e instanceof TypeError) && /gradOutput/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, gradGatherIndices: perm.sortedIndices }),
      (e) => e instanceof TypeError && /gradGatherIndices/.test(e.message),
    );
    free(rows, want, copy, got, flat, narrow);
  });
});

describe("the experts' backward freeing the forward's saved tensors as it goes (freeSaved)", () => {
  test('grouped GEMM: the same bits, the call peaks lower by what it freed, saved disposed after; a failed check leaves saved as it was', { skip: skipGrouped }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2, empty: false });
    const { perm, weights, options } = p;
    const o = { ...options, gradGatherIndices: perm.sortedIndices };
    const lent = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
    let live = cuda.memory().liveBytes;
    cuda.peakMemory({ reset: true });
    const want = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...o, saved: lent.saved });
    const extraLent = cuda.peakMemory() - live;
    assert.equal(lent.saved.upProjection.disposed, false, 'lent: the caller keeps saved');
    const given = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
    const savedBytes = given.saved.upProjection.byteLength + given.saved.activation.byteLength;
    // a failed check first: nothing taken, nothing freed
    const narrow = cuda.upload(tensor('bfloat16', [300, 32]));
    assert.throws(
      () => cuda.expertsBackward(narrow, perm.permutedTokens, perm.tokensPerExpert, weights, { ...o, saved: given.saved, freeSaved: true }),
      (e) => /gradOutput/.test(e.message),
    );
    assert.equal(given.saved.upProjection.disposed || given.saved.activation.disposed, false, 'a failed check leaves saved as it was');
    live = cuda.memory().liveBytes;
    cuda.peakMemory({ reset: true });
    const got = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...o, saved: given.saved, freeSaved: true });
    const extraGiven = cuda.peakMemory() - live;
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
    assert.ok(given.saved.upProjection.disposed && given.saved.activation.disposed, 'given: disposed when the call returns');
    assert.ok(extraGiven <= extraLent - savedBytes, `the call's own peak: ${extraGiven} bytes given, ${extraLent} lent; a and h (${savedBytes} bytes) freed before dW1 and dx are made`);
    // a given saved is gone: a second call names it
    assert.throws(
      () => cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...o, saved: given.saved, freeSaved: true }),
      (e) => e instanceof TypeError && /saved\.upProjection/.test(e.message),
    );
    free(lent.output, lent.saved, given.output, narrow, want, got);
  });

  test('the cuBLAS path: the same bits, saved disposed when the call returns', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'relu2', T: 150, dim: 64, inter: 40, E: 4, k: 2, empty: true });
    const { perm, weights, options } = p;
    const counts = cuda.upload(perm.tokensPerExpert.download());
    const fwd = cuda.expertsForward(perm.permutedTokens, counts, weights, { ...options, saveForBackward: true });
    const want = cuda.expertsBackward(p.grad, perm.permutedTokens, counts, weights, { ...options, saved: fwd.saved });
    const got = cuda.expertsBackward(p.grad, perm.permutedTokens, counts, weights, { ...options, saved: fwd.saved, freeSaved: true });
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
    assert.ok(fwd.saved.upProjection.disposed && fwd.saved.activation.disposed, 'disposed when the call returns');
    free(counts, fwd.output, want, got);
  });

  test('freeSaved without saved, or not a boolean: TypeErrors naming it', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 64, dim: 64, inter: 40, E: 4, k: 2, empty: false });
    const { perm, weights, options } = p;
    assert.throws(
      () => cuda.expertsBackward(p.grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, freeSaved: true }),
      (e) => e instanceof TypeError && /options\.freeSaved/.test(e.message),
    );
    const fwd = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
    assert.throws(
      () => cuda.expertsBackward(p.grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved, freeSaved: 'yes' }),
      (e) => e instanceof TypeError && /options\.freeSaved/.test(e.message),
    );
    assert.equal(fwd.saved.upProjection.disposed, false);
    free(fwd.output, fwd.saved);
  });
});

describe("the experts' backward writing the tokens' gradient over the tokens it is given (freeTokens)", () => {
  /** A device copy of the permuted tokens, to give away (permute's own stay for the other calls). */
  const copyOf = (t) => cuda.upload(t.download());

  test('grouped GEMM: the same bits, the call peaks lower by the gradient, the tokens disposed after; a failed check leaves them as they were', { skip: skipGrouped }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2, empty: true });
    const { perm, weights, options } = p;
    const o = { ...options, gradGatherIndices: perm.sortedIndices };
    const fwd = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
    let live = cuda.memory().liveBytes;
    cuda.peakMemory({ reset: true });
    const want = cuda.expertsBackward(p.gradTokens, perm.permutedTokens, perm.tokensPerExpert, weights, { ...o, saved: fwd.saved });
    const extraLent = cuda.peakMemory() - live;
    const mine = copyOf(perm.permutedTokens);
    const bytes = mine.byteLength;
    // a failed check first: the tokens untouched
    const narrow = cuda.upload(tensor('bfloat16', [300, 32]));
    assert.throws(
      () => cuda.expertsBackward(narrow, mine, perm.tokensPerExpert, weights, { ...o, saved: fwd.saved, freeTokens: true }),
      (e) => /gradOutput/.test(e.message),
    );
    assert.equal(mine.disposed, false, 'a failed check leaves the tokens as they were');
    assertSameBits(mine, perm.permutedTokens, 'the tokens after a failed check');
    live = cuda.memory().liveBytes;
    cuda.peakMemory({ reset: true });
    const got = cuda.expertsBackward(p.gradTokens, mine, perm.tokensPerExpert, weights, { ...o, saved: fwd.saved, freeTokens: true });
    const extraGiven = cuda.peakMemory() - live;
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
    assert.ok(mine.disposed, 'given: disposed when the call returns');
    assert.equal(got.gradTokens.byteLength, bytes);
    // dx takes the tokens' bytes: the call makes no [N, dim] tensor of its own for it
    assert.ok(extraGiven <= extraLent - bytes, `the call's own peak: ${extraGiven} bytes given, ${extraLent} lent; the gradient (${bytes} bytes) written over the tokens`);
    // the tokens gone: a second call names them
    assert.throws(
      () => cuda.expertsBackward(p.gradTokens, mine, perm.tokensPerExpert, weights, { ...o, freeTokens: true }),
      (e) => e instanceof TypeError && /permutedTokens/.test(e.message),
    );
    // with saved given too (as the layer calls it), and with h recomputed
    const given = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
    const both = cuda.expertsBackward(p.gradTokens, copyOf(perm.permutedTokens), perm.tokensPerExpert, weights, { ...o, saved: given.saved, freeSaved: true, freeTokens: true });
    for (const key of GRADS(p)) assertSameBits(both[key], want[key], `${key} (saved given too)`);
    assert.ok(given.saved.upProjection.disposed && given.saved.activation.disposed);
    const again = cuda.expertsBackward(p.gradTokens, copyOf(perm.permutedTokens), perm.tokensPerExpert, weights, { ...o, freeTokens: true });
    for (const key of GRADS(p)) assertSameBits(again[key], want[key], `${key} (h recomputed)`);
    // the gradient is a tensor of its own now: later ops read it as any other
    const back = cuda.permuteBackward(got.gradTokens, perm.sortedIndices, 300);
    const ref = cuda.permuteBackward(want.gradTokens, perm.sortedIndices, 300);
    assertSameBits(back.gradTokens, ref.gradTokens, 'permuteBackward of the gradient written over the tokens');
    free(fwd.output, fwd.saved, given.output, narrow, want, got, both, again, back, ref);
  });

  test('the cuBLAS path: the same bits, the tokens disposed when the call returns', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'relu2', T: 150, dim: 64, inter: 40, E: 4, k: 2, empty: true });
    const { perm, weights, options } = p;
    const counts = cuda.upload(perm.tokensPerExpert.download());
    const want = cuda.expertsBackward(p.grad, perm.permutedTokens, counts, weights, options);
    const mine = copyOf(perm.permutedTokens);
    const got = cuda.expertsBackward(p.grad, mine, counts, weights, { ...options, freeTokens: true });
    for (const key of GRADS(p)) assertSameBits(got[key], want[key], key);
    assert.ok(mine.disposed, 'disposed when the call returns');
    free(counts, want, got);
  });

  test('freeTokens with host tokens, with gatherIndices, or not a boolean: TypeErrors naming it, the tokens kept', { skip: cudaOnly }, () => {
    const p = routedExperts({ kind: 'swiglu', T: 64, dim: 64, inter: 40, E: 4, k: 2, empty: false });
    const { perm, weights, options } = p;
    const hostTokens = perm.permutedTokens.download();
    assert.throws(
      () => cuda.expertsBackward(p.grad, hostTokens, perm.tokensPerExpert, weights, { ...options, freeTokens: true }),
      (e) => e instanceof TypeError && /options\.freeTokens/.test(e.message) && /device tensor/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsBackward(p.gradTokens, p.x, perm.tokensPerExpert, weights, { ...options, gatherIndices: perm.sortedIndices, gradGatherIndices: perm.sortedIndices, freeTokens: true }),
      (e) => e instanceof TypeError && /options\.freeTokens/.test(e.message) && /gatherIndices/.test(e.message),
    );
    assert.throws(
      () => cuda.expertsBackward(p.grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, freeTokens: 'yes' }),
      (e) => e instanceof TypeError && /options\.freeTokens/.test(e.message),
    );
    assert.equal(perm.permutedTokens.disposed || p.x.disposed, false, 'refused calls take nothing');
  });
});
