// The device-tensor suite (device.test.mjs) again with permute's one-kernel path on
// (MOE_DISPATCH_FUSED_PERMUTE=on: the plan and the copy in permute_fused_w*, for numOutTokens with
// 1, 2, 4, 8, 16 or 32 experts and a map of at most 256 KiB; off by default, measured slower).
// Its "permute with numOutTokens" cases then run that kernel. The environment is read once per
// process: node --test runs each file in its own.
process.env.MOE_DISPATCH_FUSED_PERMUTE = 'on';
await import('./device.test.mjs');
