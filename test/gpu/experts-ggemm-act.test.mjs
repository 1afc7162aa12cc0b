// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// with the activation fused into the first GEMM's epilogue (MOE_DISPATCH_GG_FUSE=act: h and
// a = act(gate, up) * probs stored by grouped_gemm_nn_n256_bf16_act for the [gate | up] kinds;
// the other kinds keep the activation kernel). The same bits as the unfused path, so the same
// agreement with the cpu backend. The environment is read once per process: node --test runs
// each file in its own.
process.env.MOE_DISPATCH_GG_FUSE = 'act';
await import('./experts-ggemm.test.mjs');
