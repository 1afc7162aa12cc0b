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
      ops: { type: 'string' },
      lists: { type: 'string', default: 'auto' },
    },
  });
  if (!['auto', 'indirect', 'direct'].includes(args.lists)) throw new RangeError(`--lists: expected 'auto', 'indirect' or 'direct', got '${args.lists}'`);
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

/** The device Dawn made last (installDawn wraps `requestDevice`): the backend's, for `dawnFixedCosts`' raw steps. */
let lastDevice;

/** Loads the webgpu package (`--webgpu DIR`, else the installed one) and installs its globals (with DAWN_FLAGS); exits 2 where it does not load. */
export async function installDawn(args, script) {
  const dawn = await import(args.webgpu ? pathToFileURL(resolve(args.webgpu, 'index.js')).href : 'webgpu').catch((e) => {
    console.error(`${script}: the webgpu package does not load (${e.message}); pass --webgpu DIR (gpu-run.sh WEBGPU=1 carries it)`);
    process.exit(2);
  });
  Object.assign(globalThis, dawn.globals);
  globalThis.navigator = { ...(globalThis.navigator ?? {}), gpu: dawn.create(DAWN_FLAGS) };
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (...a) {
    lastDevice = await requestDevice.apply(this, a);
    return lastDevice;
  };
  return dawn;
}

/**
 * Dawn's fixed cost of a call (issue 21), on the webgpu backend `moe` (made last, after
 * installDawn): medians (ms) of `rounds` interleaved rounds of
 * - `tick`: a setImmediate round (dawn.node resolves every promise from one: it polls Dawn's
 *   events with setImmediate while a promise is pending),
 * - `synchronize`: a bare `moe.synchronize()`, nothing queued,
 * - `emptySubmit`: an empty command buffer submitted and `onSubmittedWorkDone()` (a round trip
 *   to the GPU's queue),
 * - `errorScopes`: the two error scopes every op pushes and pops (their promises' round),
 * - `read4`: a 4-byte copy and `mapAsync` (a flag read: route's, topk's),
 * - `tinyCall`: a device-input unpermute at T=4 H=8 (facts: nothing read back), the op's promise
 *   (JS, the core's dtype/shape check, 5 passes, the submit, the error scopes),
 * - `tinyToSync`: the same call to a synchronize,
 * - `direct2` / `indirect2`: a shader writing 3 words, dispatched twice in one pass (the second
 *   time on another buffer), directly or the second time indirectly from the words the first
 *   wrote (as the backend's list passes are), submitted, to `onSubmittedWorkDone()`: their
 *   difference is what an indirect dispatch costs on this adapter,
 * and `tinyQueued`: 20 such calls back to back and one synchronize, per call. What a call costs
 * whatever its size: at T=4096 H=1024 the H200 runs unpermute's shaders in ~0.07 ms.
 */
export async function dawnFixedCosts(random, moe, rounds = 200) {
  const dev = lastDevice;
  const [T, H, E, k] = [4, 8, 8, 2];
  const r = random.randomRouting({ numTokens: T, numExperts: E, topk: k, hidden: H, dtype: 'float32' }, random.rng(5));
  const inputs = [moe.upload(r.tokens), moe.upload(r.indices), moe.upload(r.weights)];
  const mh = await moe.gpu.indicesToMultihot(inputs[1], inputs[2], E);
  const p = await moe.gpu.permute(inputs[0], mh.routingMap, { probs: mh.probs });
  const unpermute = () => moe.gpu.unpermute(p.permutedTokens, p.sortedIndices, [T, H], { probs: p.permutedProbs });
  const src = dev.createBuffer({ size: 4, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
  // a shader writing workgroup counts (1, 1, 1) into its buffer; args (read indirectly) and other
  const writer = dev.createComputePipeline({
    layout: 'auto',
    compute: {
      module: dev.createShaderModule({
        code: '@group(0) @binding(0) var<storage, read_write> a: array<u32>;\n@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) { if (g.x < 3u) { a[g.x] = 1u; } }',
      }),
      entryPoint: 'main',
    },
  });
  const args = dev.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.INDIRECT });
  const other = dev.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE });
  const groupOf = (buffer) => dev.createBindGroup({ layout: writer.getBindGroupLayout(0), entries: [{ binding: 0, resource: { buffer } }] });
  const [argsGroup, otherGroup] = [groupOf(args), groupOf(other)];
  const twice = (indirect) => {
    const enc = dev.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(writer);
    pass.setBindGroup(0, argsGroup);
    pass.dispatchWorkgroups(1);
    pass.setBindGroup(0, otherGroup);
    if (indirect) pass.dispatchWorkgroupsIndirect(args, 0);
    else pass.dispatchWorkgroups(1);
    pass.end();
    dev.queue.submit([enc.finish()]);
    return dev.queue.onSubmittedWorkDone();
  };
  const staging = dev.createBuffer({ size: 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const steps = {
    tick: () => new Promise((res) => setImmediate(res)),
    synchronize: () => moe.synchronize(),
    emptySubmit: () => {
      dev.queue.submit([dev.createCommandEncoder().finish()]);
      return dev.queue.onSubmittedWorkDone();
    },
    errorScopes: () => {
      dev.pushErrorScope('out-of-memory');
      dev.pushErrorScope('validation');
      return Promise.all([dev.popErrorScope(), dev.popErrorScope()]);
    },
    read4: async () => {
      const enc = dev.createCommandEncoder();
      enc.copyBufferToBuffer(src, 0, staging, 0, 4);
      dev.queue.submit([enc.finish()]);
      await staging.mapAsync(GPUMapMode.READ);
      staging.unmap();
    },
    tinyCall: async () => (await unpermute()).dispose(),
    tinyToSync: async () => {
      const o = await unpermute();
      await moe.synchronize();
      o.dispose();
    },
    direct2: () => twice(false),
    indirect2: () => twice(true),
  };
  const times = Object.fromEntries(Object.keys(steps).map((s) => [s, []]));
  for (let i = 0; i < rounds + 10; i++) {
    for (const [s, f] of Object.entries(steps)) {
      await moe.synchronize();
      const t0 = performance.now();
      await f();
      if (i >= 10) times[s].push(performance.now() - t0);
    }
  }
  const median = (a) => [...a].sort((u, v) => u - v)[Math.floor(a.length / 2)];
  const ms = Object.fromEntries(Object.entries(times).map(([s, a]) => [s, median(a)]));
  const queued = [];
  for (let i = 0; i < 20; i++) {
    const t0 = performance.now();
    for (let j = 0; j < 20; j++) (await unpermute()).dispose();
    await moe.synchronize();
    queued.push((performance.now() - t0) / 20);
  }
  ms.tinyQueued = median(queued);
  for (const t of [...inputs, mh.routingMap, mh.probs, p.permutedTokens, p.permutedProbs, p.sortedIndices, p.tokensPerExpert]) t?.dispose();
  for (const b of [src, staging, args, other]) b.destroy();
  return { what: "Dawn's fixed cost of a call (bench/dawn.mjs dawnFixedCosts): medians in ms; tiny*: a device-input unpermute at T=4 H=8", rounds, ms };
}

/** One line of `dawnFixedCosts`' result. */
export function fixedCostsLine(b) {
  return `Dawn's fixed costs (ms): ${Object.entries(b.ms)
    .map(([s, v]) => `${s} ${v.toFixed(4)}`)
    .join(', ')}`;
}

/** dist/ as a URL to import its modules from. */
export function distUrl(args) {
  return pathToFileURL(`${resolve(args.dist)}/`).href;
}

/**
 * `--lists auto|direct|indirect`: how the list passes (the soft float64 passes, route's exact
 * pass) are dispatched (`passes.lists` of dist's webgpu/gpu.js: auto, its default, is direct on
 * a GPU and indirect on a software adapter; a build without the setting takes only auto).
 * Returns the setting.
 */
export async function applyLists(args) {
  const passes = (await import(new URL('webgpu/gpu.js', distUrl(args)).href)).passes;
  if (passes && 'lists' in passes) passes.lists = args.lists;
  else if (args.lists !== 'auto') throw new Error(`--lists ${args.lists}: ${args.dist} has no passes.lists`);
  return args.lists;
}
