// The GPU suite, the experts on our own grouped GEMM wherever it applies
// (MOE_DISPATCH_EXPERTS_GEMM=grouped, which is also the default, unset or `auto`:
// experts-auto.test.mjs):
// crates/moe-cuda/src/experts_grouped.rs, Hopper only. The path is taken where the GPU knows the
// counts' sum (permute's tokensPerExpert), so the tests dispatch on the GPU first; the same call
// with an uploaded copy of the counts takes the cuBLAS path. Both must agree with the cpu backend
// to the experts' tolerance (and with each other), the grouped one without waiting for the GPU.
// Then the layer suite again on this path (its bf16 layers take it).
// (a file that imports this one may have named the path `auto`, the same one; anything else,
// cublas from the caller's environment say, is overridden)
if (process.env.MOE_DISPATCH_EXPERTS_GEMM !== 'auto') process.env.MOE_DISPATCH_EXPERTS_GEMM = 'grouped';

const assert = (await import('node:assert/strict')).default;
const { describe, test } = await import('node:test');
const { assertExpertsAgree, cpu, cuda, floatValues: values, host, rng, skipGrouped, uniformBF16: bf16, uniformF32: f32 } = await import('./common.mjs');

function sameBits(a, b) {
  const x = host(a).data;
  const y = host(b).data;
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

describe('experts on the grouped GEMM (permute on the GPU first)', () => {
  // every activation kind; an empty expert; one expert holding every token (the others empty);
  // row counts off the 128-row tile
  for (const { kind, T, dim, inter, E, k, empty = false, all = false } of [
    { kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 2 },
    { kind: 'swiglu', T: 257, dim: 128, inter: 136, E: 12, k: 3, empty: true },
    { kind: 'relu2', T: 190, dim: 72, inter: 64, E: 5, k: 1, empty: true },
    { kind: 'quick_geglu', T: 211, dim: 64, inter: 40, E: 6, k: 2 },
    { kind: 'swiglu_oai', T: 160, dim: 96, inter: 56, E: 4, k: 2 },
    { kind: 'swiglu_clamped', T: 129, dim: 64, inter: 72, E: 7, k: 3, empty: true },
    { kind: 'swiglu', T: 300, dim: 64, inter: 48, E: 8, k: 1, all: true },
  ]) {
    const what = empty ? ', an expert with no tokens' : all ? ', one expert holding every token' : '';
    test(`${kind} T=${T} dim=${dim} inter=${inter} E=${E} k=${k}${what}`, { skip: skipGrouped }, () => {
      const random = rng(T + dim + E);
      const gated = kind !== 'relu2';
      const width = gated ? 2 * inter : inter;
      const logits = f32([T, E], random, 3);
      if (empty) for (let t = 0; t < T; t++) logits.data[t * E + E - 1] = -100;
      if (all) for (let t = 0; t < T; t++) logits.data[t * E] = 100;
      const x = bf16([T, dim], random);
      const w1 = bf16([E, dim, width], random, 1 / Math.sqrt(dim));
      const w2 = bf16([E, inter, dim], random, 1 / Math.sqrt(inter));
      const L = cuda.upload(logits);
      const routed = cuda.route(L, { topk: k });
      const mh = cuda.indicesToMultihot(routed.indices, routed.weights, E);
      const perm = cuda.permute(cuda.upload(x), mh.routingMap, { probs: mh.probs, numOutTokens: T * k });
      const counts = perm.tokensPerExpert.download();
      if (empty) assert.equal(counts.data[E - 1], 0, 'the last expert gets no token');
      if (all) assert.deepEqual(Array.from(counts.data), [T, ...new Array(E - 1).fill(0)], 'expert 0 gets every token');
      const wkey = gated ? 'gateAndUpProjs' : 'upProjs';
      const weights = { [wkey]: cuda.upload(w1), downProjs: cuda.upload(w2) };
      const options = { activation: kind, permutedProbs: perm.permutedProbs };
      const sync0 = cuda.transfers().synchronizations;
      const fwd = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saveForBackward: true });
      const grad = cuda.upload(bf16([T * k, dim], random, 0.1));
      const bwd = cuda.expertsBackward(grad, perm.permutedTokens, perm.tokensPerExpert, weights, { ...options, saved: fwd.saved });
      assert.equal(cuda.transfers().synchronizations, sync0, 'the grouped path reads nothing back (no counts)');
      assert.equal(fwd.saved.counts, undefined, 'no host counts were read');
      // the cuBLAS path (the counts uploaded: the GPU does not know their sum) and the cpu backend
      const { fwdB, bwdB } = assertExpertsAgree({ fwd, bwd, perm, weights, hostWeights: { [wkey]: w1, downProjs: w2 }, grad, kind });
      const gradKey = gated ? 'gradGateAndUpProjs' : 'gradUpProjs';
      if (empty || all) {
        // the experts without rows: the last one, or every one but expert 0
        const dw = values(bwd.gradDownProjs);
        const per = inter * dim;
        assert.ok(
          dw.slice((all ? 1 : E - 1) * per).every((v) => v === 0),
          "the empty experts' weight gradients are zeros",
        );
        if (all)
          assert.ok(
            dw.slice(0, per).some((v) => v !== 0),
            "expert 0's weight gradient is not zeros",
          );
      }
      console.log(
        `# ${kind} T=${T}: bit-identical to cuBLAS: output ${sameBits(fwd.output, fwdB)}, ${['gradTokens', gradKey, 'gradDownProjs'].map((key) => `${key} ${sameBits(bwd[key], bwdB[key])}`).join(', ')}`,
      );
      const again = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, options);
      assert.ok(sameBits(again, fwd.output), 'the same bits run to run');
    });
  }
});

// The GEMMs' epilogues round to bf16 in hardware, and a thread that meets a NaN converts all of
// its values again the exact way (kernels/grouped_gemm.cu GgFast / GgExact): a NaN in a token
// makes its rows NaN, and the finite rows that share the NaN rows' threads and tiles stay right.
describe('the grouped GEMM with a NaN among the tokens', () => {
  test('swiglu T=300 dim=64 inter=48 E=8 k=2: NaN where cpu has NaN, the rest as cpu', { skip: skipGrouped }, () => {
    const [T, dim, inter, E, k] = [300, 64, 48, 8, 2];
    const random = rng(4242);
    const logits = f32([T, E], random, 3);
    const x = bf16([T, dim], random);
    x.data[3 * dim] = 0x7fc0; // token 3: a NaN
    const w1 = bf16([E, dim, 2 * inter], random, 1 / Math.sqrt(dim));
    const w2 = bf16([E, inter, dim], random, 1 / Math.sqrt(inter));
    const routed = cuda.route(cuda.upload(logits), { topk: k });
    const mh = cuda.indicesToMultihot(routed.indices, routed.weights, E);
    const perm = cuda.permute(cuda.upload(x), mh.routingMap, { probs: mh.probs, numOutTokens: T * k });
    const weights = { gateAndUpProjs: cuda.upload(w1), downProjs: cuda.upload(w2) };
    const sync0 = cuda.transfers().synchronizations;
    const out = cuda.expertsForward(perm.permutedTokens, perm.tokensPerExpert, weights, { activation: 'swiglu', permutedProbs: perm.permutedProbs });
    assert.equal(cuda.transfers().synchronizations, sync0, 'the grouped path: no counts read back');
    const got = values(out);
    const want = values(
      cpu.expertsForward(
        perm.permutedTokens.download(),
        perm.tokensPerExpert.download(),
        { gateAndUpProjs: w1, downProjs: w2 },
        { activation: 'swiglu', permutedProbs: perm.permutedProbs.download() },
      ),
    );
    const nan = want.reduce((n, v) => n + (Number.isNaN(v) ? 1 : 0), 0);
    assert.equal(nan, k * dim, "token 3's k rows are NaN on cpu");
    let scale = 1;
    for (const v of want) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
    for (let i = 0; i < want.length; i++) {
      if (Number.isNaN(want[i])) assert.ok(Number.isNaN(got[i]), `element ${i}: NaN on cpu, ${got[i]} here`);
      else assert.ok(Math.abs(got[i] - want[i]) <= 3e-2 * scale, `element ${i}: ${got[i]} here, ${want[i]} on cpu`);
    }
  });
});

await import('./layer-train.test.mjs');
