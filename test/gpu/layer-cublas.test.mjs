// The layer's GPU suite (layer-train.test.mjs) with the experts on cuBLAS alone
// (MOE_DISPATCH_EXPERTS_GEMM=cublas): the default path (auto) runs the forward of layers with many
// experts on our grouped GEMM (experts-auto.test.mjs), so this keeps the cuBLAS forward of those
// layers checked too. The environment is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_EXPERTS_GEMM = 'cublas';
await import('./layer-train.test.mjs');
