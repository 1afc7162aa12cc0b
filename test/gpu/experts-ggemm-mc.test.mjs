// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the 2-CTA cluster kernels (MOE_DISPATCH_GG_EPILOGUE=mc: each pair of row tiles of one
// column shares its B tile, half loaded by each CTA and multicast to both; an expert's odd tile
// count padded with a tile that stores nothing), the small experts' odd tile counts among them.
// The environment is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'mc';
await import('./experts-ggemm.test.mjs');
