// The GPU suite, the experts' default path (`auto`: MOE_DISPATCH_EXPERTS_GEMM unset,
// crates/moe-cuda/src/experts_grouped.rs ExpertsGemm::Grouped): on a Hopper GPU, at any number of
// experts (64 down to 2), with the counts permute made, the forward and the backward run on our
// grouped GEMM, which reads the counts on the GPU (no wait for the GPU in either); elsewhere
// both run on cuBLAS (the forward reads the counts once, the backward takes the forward's).
// Each result must agree with the cpu backend and with the cuBLAS path (the counts uploaded:
// the GPU does not know their sum) to the experts' tolerance. Then the
// layer's suite on the default path. The environment is read once per process: node --test runs
// each file in its own.
//
// Plain JavaScript on node:test; skips with the reason where CUDA is unavailable.
delete process.env.MOE_DISPATCH_EXPERTS_GEMM;

const assert = (await import('node:assert/strict')).default;
const { describe, test } = await import('node:test');
const { assertClose, assertExpertsAgree, cuda, cudaOnly, rng, skip, skipGrouped, uniformBF16: bf16, uniformF32: f32 } = await import('./common.mjs');
if (skip) console.log(`# ${skip}`);

describe('the experts on the default (auto) path', { skip: cudaOnly }, () => {
  for (const { kind, T, dim, inter, E, k } of [
    { kind: 'swiglu', T: 700, dim: 128, inter: 96, E: 64, k: 6 },
    { kind: 'relu2', T: 333, dim: 64, inter: 72, E: 32, k: 2 },
    { kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2 },
    { kind: 'swiglu', T: 129, dim: 32, inter: 40, E: 2, k: 1 },
  ]) {
    const grouped = !skipGrouped;
    test(`${kind} T=${T} dim=${dim} inter=${inter} E=${E} k=${k}: forward and backward on ${grouped ? 'our grouped GEMM' : 'cuBLAS'}`, () => {
      const random = rng(T + dim + E);
      const gated = kind !== 'relu2';
      const width = gated ? 2 * inter : inter;
      const x = bf16([T, dim], random);
      const w1 = bf16([E, dim, width], random, 1 / Math.sqrt(dim));
      const w2 = bf16([E, inter, dim], random, 1 / Math.sqrt(inter));
      const routed = cuda.route(cuda.upload(f32([T, E], random, 3)), { topk: k });
      const mh = cuda.indicesToMultihot(routed.indices, routed.weights, E);
      const perm = cuda.permute(cuda.upload(x), mh.routingMap, { probs: mh.probs, numOutTokens: T * k });
      const wkey = gated ? 'gateAndUpProjs' : 'upProjs';
      const weights = { [wkey]: cuda.upload(w1), downProjs: cuda.upload(w2) };
      const options = { activation: kind, permutedProbs: perm.permutedProbs };
      const grad = cuda.upload(bf16([T * k, dim], random, 0.1));
      cuda.synchronize();
      const sync0 = cuda.transfers().synchronizations;
      const { result, timeline } = cuda.timeline(() => {
        const fwd = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
        const forwardWaits = cuda.transfers().synchronizations - sync0;
        const bwd = cuda.expertsBackward(grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved });
        return { fwd, bwd, forwardWaits };
      });
      const { fwd, bwd, forwardWaits } = result;
      const names = timeline.spans.map((s) => s.name);
      const ours = names.filter((n) => n.startsWith('grouped_gemm_'));
      const theirs = names.filter((n) => n.startsWith("cublas: experts' GEMMs"));
      if (grouped) {
        assert.equal(forwardWaits, 0, 'the forward reads nothing back');
        assert.equal(fwd.saved.counts, undefined, 'no host counts were read in the forward');
        assert.deepEqual(timeline.waits, [], 'neither waits for the GPU');
        assert.equal(ours.length, 6, `the forward's two GEMMs and the backward's four are ours: ${names.join(', ')}`);
        assert.equal(theirs.length, 0, `no cuBLAS GEMM: ${names.join(', ')}`);
      } else {
        assert.equal(forwardWaits, 1, 'the forward on cuBLAS reads the counts');
        assert.equal(timeline.waits.length, 1, "the backward takes the forward's counts");
        assert.equal(ours.length, 0, `no grouped GEMM: ${names.join(', ')}`);
        assert.ok(theirs.length >= 4, `the GEMMs are cuBLAS's: ${names.join(', ')}`);
      }
      assertExpertsAgree({ fwd, bwd, perm, weights, hostWeights: { [wkey]: w1, downProjs: w2 }, grad, kind });
      // a second backward with the same inputs: the same bits, and no wait either way
      const sync1 = cuda.transfers().synchronizations;
      const again = cuda.expertsBackward(grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved });
      assert.equal(cuda.transfers().synchronizations - sync1, 0, grouped ? 'the counts are read on the GPU' : 'the saved counts serve');
      assertClose(again.gradTokens, bwd.gradTokens, 0, 'the same gradTokens again');
    });
  }
});

await import('./layer-train.test.mjs');
