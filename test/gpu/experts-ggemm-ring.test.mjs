// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the ring-store kernels with half tails (MOE_DISPATCH_GG_EPILOGUE=ring-half: 4 stages, the
// epilogue staged in the ring's stages, an expert's last tile of <= 64 rows as two 64 x 128
// halves), the small experts' many short tails among them. The environment is read once per
// process: node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'ring-half';
await import('./experts-ggemm.test.mjs');
