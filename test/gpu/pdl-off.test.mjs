// The GPU suite's core files with programmatic dependent launches off (MOE_DISPATCH_PDL=off:
// every kernel queued as an ordinary launch, after the one before has finished), so that both
// ways of launching are checked against the cpu backend: the default suite runs with them on
// (Hopper and later). The environment is read once per process: node --test runs each file in its own.
process.env.MOE_DISPATCH_PDL = 'off';
await import('./device.test.mjs');
await import('./layer-train.test.mjs');
