// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the 2-CTA cluster kernels with the ring-store epilogue (MOE_DISPATCH_GG_EPILOGUE=mcring:
// 4 stages, two of them the epilogue's after each tile's k-steps in both CTAs of a cluster; the
// pairs of row tiles share their B tile by multicast). The environment is read once per
// process: node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'mcring';
await import('./experts-ggemm.test.mjs');
