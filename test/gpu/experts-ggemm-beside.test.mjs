// The grouped-GEMM experts suite (experts-ggemm.test.mjs, with the layer suite it runs again)
// with the backward's dW2 GEMM beside the activation's backward (MOE_DISPATCH_GG_BESIDE=128: on
// a side stream over all SMs but 128, so over 4 blocks on a 132-SM H100 and many tiles a block
// at the suite's sizes; the activation's backward meanwhile on the device's stream, which waits
// for dW2 before dW1's GEMM). The environment is read once per process: node --test runs each
// file in its own.
process.env.MOE_DISPATCH_GG_BESIDE = '128';
await import('./experts-ggemm.test.mjs');
