// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the bulk-store kernels (MOE_DISPATCH_GG_EPILOGUE=bulk: each consumer warpgroup's rows
// staged in a padded buffer and written by 64 row copies, cp.async.bulk; the default until the
// TMA tensor stores, `tma-store`, measured faster). The environment is read once per process:
// node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'bulk';
await import('./experts-ggemm.test.mjs');
