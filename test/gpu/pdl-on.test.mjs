// The GPU suite's device-tensor and layer files with programmatic dependent launches on
// (MOE_DISPATCH_PDL=on: on a Hopper or later every kernel may be scheduled before the one before
// it has finished, and waits at its entry, MOE_PDL_ENTRY() in kernels/common.cuh), every result
// checked against the cpu backend as in the default suite, where they are off. The environment
// is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_PDL = 'on';
await import('./device.test.mjs');
await import('./layer-train.test.mjs');
