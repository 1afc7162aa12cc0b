/**
 * What the Dawn scripts (bench/webgpu-node.mjs, bench/webgpu-profile.mjs) share: their command
 * line (the webgpu package folder, dist/, the output file, the iterations and the problem's
 * shape, checked) and Dawn's WebGPU installed as the page's (`navigator.gpu` and the `GPU*`
 * globals) before dist/ is imported.
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

/** The command line: `{ args, shape: { T, H, E, k, iters } }`. */
export function dawnArgs(iters) {
  const { values: args } = parseArgs({
    options: {
      webgpu: { type: 'string' },
      dist: { type: 'string', default: 'dist' },
      iters: { type: 'string', default: String(iters) },
      out: { type: 'string' },
      tokens: { type: 'string', default: '4096' },
      hidden: { type: 'string', default: '1024' },
      experts: { type: 'string', default: '64' },
      topk: { type: 'string', default: '4' },
    },
  });
  const shape = { T: Number(args.tokens), H: Number(args.hidden), E: Number(args.experts), k: Number(args.topk), iters: Number(args.iters) };
  for (const [key, v] of Object.entries(shape)) if (!Number.isInteger(v) || v < 1) throw new RangeError(`--${key}: expected an integer >= 1, got ${v}`);
  return { args, shape };
}

/**
 * Dawn's instance flags. `timestamp_quantization` (on by default: a timer-precision mitigation)
 * rounds every timestamp down to a multiple of 65536 ns, so each pass's time read as a multiple of
 * 0.0655 ms on the H200 (0 for the short ones); with it off webgpu-profile.mjs sees each pass's own
 * time (checked on Dawn over SwiftShader: 0.049, 0.051 ms, where it read 0.066 before).
 */
export const DAWN_FLAGS = ['disable-dawn-features=timestamp_quantization'];

/** Loads the webgpu package (`--webgpu DIR`, else the installed one) and installs its globals (with DAWN_FLAGS); exits 2 where it does not load. */
export async function installDawn(args, script) {
  const dawn = await import(args.webgpu ? pathToFileURL(resolve(args.webgpu, 'index.js')).href : 'webgpu').catch((e) => {
    console.error(`${script}: the webgpu package does not load (${e.message}); pass --webgpu DIR (gpu-run.sh WEBGPU=1 carries it)`);
    process.exit(2);
  });
  Object.assign(globalThis, dawn.globals);
  globalThis.navigator = { ...(globalThis.navigator ?? {}), gpu: dawn.create(DAWN_FLAGS) };
  return dawn;
}

/** dist/ as a URL to import its modules from. */
export function distUrl(args) {
  return pathToFileURL(`${resolve(args.dist)}/`).href;
}
