// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the TMA-store kernels (MOE_DISPATCH_GG_EPILOGUE=tma-store: each consumer warpgroup's rows
// staged as four 64 x 64 boxes in the 128-byte swizzle and stored by TMA tensor stores through a
// map over the output; a warpgroup whose rows run past its expert's end stores from the
// registers). The environment is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'tma-store';
await import('./experts-ggemm.test.mjs');
