// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// on the kernels in k-steps of 32 (MOE_DISPATCH_GG_EPILOGUE=bulk-k32: 6 stages of 24 KiB, the
// K-major operands' rows 64 bytes with the 64-byte swizzle; the weight gradients' k-steps 32
// token rows, so an expert's last k-step zeroes the next expert's rows at another boundary).
// The environment is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_GG_EPILOGUE = 'bulk-k32';
await import('./experts-ggemm.test.mjs');
