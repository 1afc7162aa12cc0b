// The grouped-experts suite again with the per-expert GEMMs sent to cuBLAS as one grouped call
// (MOE_DISPATCH_GROUPED_GEMM=on: off by default, as it measured slower; this keeps it correct).
process.env.MOE_DISPATCH_GROUPED_GEMM = 'on';
await import('./experts.test.mjs');
