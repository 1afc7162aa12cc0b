// The gathering experts' suite (experts-ggemm-gather.test.mjs, with the experts and layer suites
// it runs again) with the weight gradient gathering on load too (MOE_DISPATCH_GG_FUSE=
// gather,gather-wgrad: grouped_gemm_wgrad_bf16_gather_tma for dW1 = x^T dh instead of the rows
// copied out for the plain kernel). The environment is read once per process: node --test runs
// each file in its own.
process.env.MOE_DISPATCH_GG_FUSE = 'gather,gather-wgrad';
await import('./experts-ggemm-gather.test.mjs');
