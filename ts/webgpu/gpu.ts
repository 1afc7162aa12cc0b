/**
 * The WebGPU device of one webgpu backend: buffers (with this adapter's limits checked before
 * they are made, so an oversized tensor is an error naming the op), uploads, read-backs,
 * compute pipelines (compiled once per shader per device) and dispatches. WebGPU types are not
 * in TypeScript's DOM library; the few this file uses are declared loosely here.
 */

// biome-ignore-all lint/suspicious/noExplicitAny: WebGPU types are not in TypeScript's DOM library (no @webgpu/types dependency); GPU objects stay untyped here
export type GPUDevice = any;
export type GPUBuffer = any;
export type GPUAdapter = any;

const STORAGE = 0x80;
const COPY_SRC = 0x04;
const INDIRECT = 0x100;
const COPY_DST = 0x08;
const MAP_READ = 0x01;
const MAP_MODE_READ = 0x1;

/**
 * A pass of its own for every dispatch (off: an op's dispatches share one compute pass). On for
 * bench/webgpu-profile.mjs, which times each pass with timestamp queries to name each shader's
 * time; a pass costs Dawn more than a dispatch inside one (Dawn over SwiftShader: 8 dispatches
 * in 8 passes 118 us of JS and encoding, in one pass 57 us).
 */
export const passes: { perDispatch: boolean; lists: ListDispatch } = { perDispatch: false, lists: 'auto' };

/**
 * How the list passes (the soft float64 passes, route's exact pass over listed rows: shaders
 * that stride over a list the pass before wrote) are dispatched: `indirect`, from the workgroup
 * counts the pass before wrote (no workgroups where the list is empty); `direct`, on
 * min(LIST_GROUPS = 256, what the whole list could need) workgroups; `auto` (the default): indirect on a
 * software adapter, direct on a GPU. Measured (bench/dawn.mjs direct2 / indirect2): through
 * Dawn on the H200 an indirect dispatch costs 0.53-0.62 ms of wall clock against 0.07-0.11 for
 * a direct one (route 1.47 -> 0.87 ms a call); on SwiftShader 0.04 ms more, while a direct
 * dispatch runs the float64 code once a workgroup whatever the list holds (it runs every
 * branch: route 1.9 -> 9.8 ms at T=16).
 */
export type ListDispatch = 'auto' | 'direct' | 'indirect';

/** The most workgroups of a list pass dispatched directly. */
export const LIST_GROUPS = 256;

/**
 * Whether `describeAdapter`'s description is of a software adapter: SwiftShader (Chromium's),
 * Mesa's llvmpipe / lavapipe, Windows' WARP (Microsoft Basic Render Driver), or one the browser
 * calls a fallback adapter.
 */
export function softwareAdapter(description: string): boolean {
  return /swiftshader|llvmpipe|lavapipe|microsoft basic render|fallback adapter/i.test(description);
}

/** A step of an op's command buffer: a compute dispatch, or a copy (which ends the pass before it). */
type Step = { pipeline: any; group: any; label: string; dispatch: (pass: any) => void } | { src: GPUBuffer; dst: GPUBuffer; size: number };

/**
 * The size of the buffer made for `size` bytes: multiples of 256 up to 64 KiB, then the next
 * of 8 steps per power of two (at most 12.5% more), so that tensors of nearby sizes share
 * cached buffers.
 */
export function sizeClass(size: number): number {
  if (size <= 65536) return Math.max(256, Math.ceil(size / 256) * 256);
  const step = 2 ** (Math.floor(Math.log2(size)) - 3);
  return Math.ceil(size / step) * step;
}

/** `navigator.gpu`, where there is one. */
export function navigatorGpu(): any {
  return (globalThis as { navigator?: { gpu?: unknown } }).navigator?.gpu;
}

/** The adapter's description for backendInfo(): vendor, architecture, device, description. */
export function describeAdapter(adapter: GPUAdapter): string {
  const info = adapter?.info ?? {};
  const parts = [info.vendor, info.architecture, info.device, info.description].filter((s: unknown) => typeof s === 'string' && s.length > 0);
  const fallback = adapter?.isFallbackAdapter ? ' (fallback adapter)' : '';
  return (parts.length ? `WebGPU adapter ${parts.join(' / ')}` : 'WebGPU adapter (no adapter info)') + fallback;
}

/** An error of the device itself (lost, over a limit, out of memory), named after the op. */
export class GpuError extends Error {
  constructor(op: string, message: string) {
    super(`${op}: ${message}`);
    this.name = 'Error';
  }
}

export class Gpu {
  /** Why the device was lost (a string), once it was. */
  lost: string | undefined;
  readonly maxBinding: number;
  readonly maxBuffer: number;
  readonly maxGroups: number;
  /** A software adapter (`softwareAdapter`): the list passes are dispatched indirectly there. */
  readonly software: boolean;
  private readonly pipelines = new Map<string, any>();
  /** Bytes held by live buffers of tensors (not counting the per-op scratch). */
  liveBytes = 0;
  /** Copies to and from the device, and the host's waits for it (read-backs and synchronize()). */
  readonly transfers = { toDeviceCalls: 0, toDeviceBytes: 0, toHostCalls: 0, toHostBytes: 0, synchronizations: 0 };
  /** Bytes of the buffers kept for reuse (see `acquire`). */
  cachedBytes = 0;
  /** The most bytes kept for reuse. */
  cacheLimit = 1 << 30;
  private readonly cache = new Map<number, GPUBuffer[]>();
  private readonly paramBuffers = new Map<string, GPUBuffer>();
  private readonly staging = new Map<number, GPUBuffer[]>();
  private readonly groups = new Map<string, any>();
  private readonly ids = new WeakMap<object, number>();
  private nextId = 1;
  /** The op's queued work, encoded and submitted by `flush`: the clears first, then the steps in order. */
  private readonly clears: GPUBuffer[] = [];
  private readonly steps: Step[] = [];
  private readonly deferred: GPUBuffer[] = [];
  /** The op being queued (`scoped`): its name, and whether its error scopes are pushed (`risky`). */
  private call: { op: string; scoped: boolean } | undefined;
  /** The first WebGPU error that no error scope caught, reported by the next op (`alive`). */
  private uncaptured: string | undefined;

  constructor(
    readonly device: GPUDevice,
    readonly adapterName: string,
  ) {
    this.maxBinding = Number(device.limits.maxStorageBufferBindingSize);
    this.maxBuffer = Number(device.limits.maxBufferSize);
    this.maxGroups = Number(device.limits.maxComputeWorkgroupsPerDimension);
    this.software = softwareAdapter(adapterName);
    device.lost.then((info: { reason?: string; message?: string }) => {
      this.lost = `${info.reason ?? 'unknown'}${info.message ? `: ${info.message}` : ''}`;
    });
    device.addEventListener?.('uncapturederror', (e: { error?: { message?: string }; preventDefault?: () => void }) => {
      e.preventDefault?.();
      this.uncaptured ??= e.error?.message ?? 'an error without a message';
    });
  }

  /**
   * Throws if the device was lost (a lost device does nothing, and its buffers are gone), or if
   * WebGPU rejected work that no error scope watched (an op that made nothing new: `risky`): its
   * message names the op by its command buffer's label. Dawn in Node raises such an error in the
   * submit itself (so the op that queued the work reports it as it ends), Chromium later (the next
   * call reports it).
   */
  alive(op: string): void {
    if (this.lost !== undefined) {
      throw new GpuError(op, `the WebGPU device was lost (${this.lost}); its tensors are gone: create a new backend with createBackend({ prefer: 'webgpu' })`);
    }
    const rejected = this.uncaptured;
    if (rejected !== undefined) {
      this.uncaptured = undefined;
      throw new GpuError(op, `WebGPU rejected queued work (${rejected}; the command buffer's label is the op that queued it); this is a bug in moe-dispatch`);
    }
  }

  /**
   * Before a WebGPU call that can fail for want of memory or be rejected by validation (making a
   * buffer, a pipeline or a bind group; a large write): pushes the op's error scopes, once. An op
   * that makes nothing new (its pipelines, bind groups and buffers all kept from earlier calls,
   * where they were made under scopes) pushes none, and its promise settles without waiting for
   * Dawn's events (popErrorScope is ~10 us a call on Dawn, and its promise a round of the event
   * loop); what WebGPU rejects there (only a bug could) is reported by the next call (`alive`).
   */
  private risky(): void {
    const call = this.call;
    if (call === undefined || call.scoped) return;
    this.device.pushErrorScope('out-of-memory');
    this.device.pushErrorScope('validation');
    call.scoped = true;
  }

  /**
   * A storage buffer of at least `bytes` (whole words, at least one), zeroed as a new WebGPU
   * buffer is: a cached one is cleared by the op's queued work before anything uses it.
   */
  buffer(op: string, bytes: number, what: string): GPUBuffer {
    return this.acquire(op, bytes, what, true);
  }

  /**
   * A buffer for `bytes` that the op's own shaders write whole (every word of its `bytes`, as
   * gather and merge do): not cleared, so that what lies past those words is unspecified, as past
   * an `upload()`'s. A clear is a fill of the whole buffer on the GPU, outside any pass (a 64 MB
   * permute output's is ~0.02 ms on an H200, and ms on SwiftShader).
   */
  overwritten(op: string, bytes: number, what: string): GPUBuffer {
    return this.acquire(op, bytes, what, false);
  }

  /** A buffer holding `bytes` (padded to whole words; what lies past them is unspecified). */
  upload(op: string, bytes: Uint8Array, what: string): GPUBuffer {
    const buf = this.acquire(op, bytes.byteLength, what, false);
    if (bytes.byteLength > 0) {
      // Dawn stages a write in memory of its own: a large one can run out
      if (bytes.byteLength >= 65536) this.risky();
      this.transfers.toDeviceCalls++;
      this.transfers.toDeviceBytes += bytes.byteLength;
      if (bytes.byteLength % 4 === 0) this.device.queue.writeBuffer(buf, 0, bytes.buffer, bytes.byteOffset, bytes.byteLength);
      else {
        const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
        padded.set(bytes);
        this.device.queue.writeBuffer(buf, 0, padded.buffer, 0, padded.byteLength);
      }
    }
    return buf;
  }

  /**
   * A buffer from the cache (the size class of `bytes`) or a new one. Creating a WebGPU buffer
   * costs more than many ops take (Dawn on an H200: ~0.3 ms for a large one), so the buffers of
   * disposed tensors and of each op's scratch are kept for reuse, up to `cacheLimit` bytes.
   */
  private acquire(op: string, bytes: number, what: string, zero: boolean): GPUBuffer {
    this.alive(op);
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    const limit = Math.min(this.maxBinding, this.maxBuffer);
    if (size > limit) {
      throw new GpuError(
        op,
        `${what} needs a ${size}-byte buffer, over this WebGPU adapter's limit of ${limit} bytes (maxStorageBufferBindingSize ${this.maxBinding}, maxBufferSize ${this.maxBuffer}): use smaller tensors, or the wasm backend`,
      );
    }
    const cls = sizeClass(size);
    const bucket = cls <= limit ? cls : size;
    const cached = this.cache.get(bucket)?.pop();
    if (cached) {
      this.cachedBytes -= bucket;
      if (zero) this.clears.push(cached);
      return cached;
    }
    this.risky();
    return this.device.createBuffer({ size: bucket, usage: STORAGE | COPY_SRC | COPY_DST | INDIRECT });
  }

  /**
   * Gives a buffer back (a disposed tensor's, an op's scratch): kept for reuse once the work
   * queued so far is submitted (so a later upload into it cannot overtake a read of it), or
   * destroyed when the cache is full.
   */
  release(buf: GPUBuffer): void {
    if (this.lost !== undefined) return;
    if (this.pending()) this.deferred.push(buf);
    else this.keep(buf);
  }

  private keep(buf: GPUBuffer): void {
    const size = Number(buf.size);
    if (this.cachedBytes + size > this.cacheLimit) {
      buf.destroy();
      return;
    }
    const list = this.cache.get(size);
    if (list) list.push(buf);
    else this.cache.set(size, [buf]);
    this.cachedBytes += size;
  }

  /** Destroys the cached buffers (the memory of disposed tensors goes back to the device). */
  releaseCached(): void {
    this.forgetBindings();
    for (const list of this.staging.values()) for (const b of list) b.destroy();
    this.staging.clear();
    for (const list of this.cache.values()) for (const b of list) b.destroy();
    this.cache.clear();
    this.cachedBytes = 0;
  }

  /** Whether work is queued and not yet submitted. */
  private pending(): boolean {
    return this.steps.length > 0 || this.clears.length > 0;
  }

  /**
   * Submits the op's queued work (if any) in one command buffer; buffers given back meanwhile join
   * the cache. The clears of reused buffers come first: a buffer taken from the cache while work is
   * queued was given back before that work began (`release` holds back the ones given back while
   * work is queued), so nothing queued before its clear reads or writes it. The dispatches then
   * share compute passes (`passes.perDispatch`), a copy ending the pass before it.
   */
  flush(): void {
    if (!this.pending()) return;
    // labelled by the op (WebGPU's error messages name it)
    const enc = this.device.createCommandEncoder({ label: this.call?.op ?? 'moe-dispatch' });
    for (const b of this.clears) enc.clearBuffer(b);
    let pass: any;
    for (const step of this.steps) {
      if ('src' in step) {
        pass?.end();
        pass = undefined;
        enc.copyBufferToBuffer(step.src, 0, step.dst, 0, step.size);
        continue;
      }
      if (pass === undefined || passes.perDispatch) {
        pass?.end();
        pass = enc.beginComputePass(passes.perDispatch ? { label: step.label } : undefined);
      }
      pass.setPipeline(step.pipeline);
      pass.setBindGroup(0, step.group);
      step.dispatch(pass);
    }
    pass?.end();
    this.clears.length = 0;
    this.steps.length = 0;
    this.device.queue.submit([enc.finish()]);
    for (const b of this.deferred.splice(0)) this.keep(b);
  }

  /** Drops the op's queued work unsubmitted (the op failed). */
  private discard(): void {
    this.clears.length = 0;
    this.steps.length = 0;
    for (const b of this.deferred.splice(0)) this.keep(b);
  }

  /** A small parameter / index buffer. */
  words(op: string, values: ArrayLike<number>, what = 'parameters'): GPUBuffer {
    const u = Uint32Array.from(values, (v) => v >>> 0);
    return this.upload(op, new Uint8Array(u.buffer), what);
  }

  /** Copies `bytes` bytes of `buf` to the host (waits for the queued work that writes it). */
  async read(op: string, buf: GPUBuffer, bytes: number): Promise<Uint8Array> {
    this.alive(op);
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    this.transfers.toHostCalls++;
    this.transfers.toHostBytes += bytes;
    this.transfers.synchronizations++;
    // staging buffers of small reads (route's and topk's flags, counts) are kept, a few per size
    const reuse = size <= 65536;
    let staging = reuse ? this.staging.get(size)?.pop() : undefined;
    if (staging === undefined) {
      this.risky();
      staging = this.device.createBuffer({ size, usage: MAP_READ | COPY_DST });
    }
    let ok = false;
    try {
      this.steps.push({ src: buf, dst: staging, size });
      this.flush();
      try {
        await staging.mapAsync(MAP_MODE_READ);
      } catch (e) {
        this.alive(op);
        throw new GpuError(op, `reading a WebGPU buffer back failed: ${(e as Error).message}`);
      }
      const out = new Uint8Array(bytes);
      out.set(new Uint8Array(staging.getMappedRange(0, size)).subarray(0, bytes));
      staging.unmap();
      ok = true;
      return out;
    } finally {
      const kept = this.staging.get(size) ?? [];
      if (ok && reuse && kept.length < 4) {
        kept.push(staging);
        this.staging.set(size, kept);
      } else staging.destroy();
    }
  }

  private pipeline(key: string, code: string): any {
    let p = this.pipelines.get(key);
    if (!p) {
      this.risky();
      const module = this.device.createShaderModule({ code, label: key });
      p = this.device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'main' }, label: key });
      this.pipelines.set(key, p);
    }
    return p;
  }

  /**
   * Queues one dispatch of `threads` invocations of shader `key` with `params` at binding 0 and
   * `buffers` at bindings 1... (`size` a workgroup: the shader's @workgroup_size, 64 unless it
   * says otherwise; rows of up to maxComputeWorkgroupsPerDimension workgroups). `label` names the dispatch (the
   * shader's key unless the caller names a step of it): its pass's label where each dispatch has a
   * pass of its own (`passes.perDispatch`; bench/webgpu-profile.mjs reads it).
   */
  dispatch(op: string, key: string, code: string, params: ArrayLike<number>, buffers: GPUBuffer[], threads: number, size = 64, label = key): void {
    if (threads === 0) return;
    const groups = Math.ceil(threads / size);
    const x = Math.min(groups, this.maxGroups);
    const y = Math.ceil(groups / x);
    if (y > this.maxGroups) throw new GpuError(op, `${threads} threads are over this WebGPU adapter's dispatch limit`);
    this.pass(op, key, code, params, buffers, label, (pass) => pass.dispatchWorkgroups(x, y));
  }

  /**
   * Queues one dispatch of shader `key` whose workgroup counts the GPU wrote: the three u32 at
   * `offset` in `indirect` (which the shader may also read, at a binding of `buffers`); or
   * (`passes.lists`) a direct dispatch of enough workgroups of 64 for `most` invocations, the
   * most the list could need, at most LIST_GROUPS of them (the list shaders stride over their
   * lists, so either covers the list).
   */
  dispatchIndirect(op: string, key: string, code: string, params: ArrayLike<number>, buffers: GPUBuffer[], indirect: GPUBuffer, most: number, label = key, offset = 0): void {
    const directly = passes.lists === 'direct' || (passes.lists === 'auto' && !this.software);
    const groups = Math.max(1, Math.min(Math.ceil(most / 64), LIST_GROUPS, this.maxGroups));
    this.pass(op, key, code, params, buffers, label, (pass) => (directly ? pass.dispatchWorkgroups(groups) : pass.dispatchWorkgroupsIndirect(indirect, offset)));
  }

  /** One dispatch of the op's command buffer: shader `key`, `params` at binding 0 and `buffers` after it, its dispatch by `dispatch`. */
  private pass(op: string, key: string, code: string, params: ArrayLike<number>, buffers: GPUBuffer[], label: string, dispatch: (pass: any) => void): void {
    this.alive(op);
    const pipeline = this.pipeline(key, code);
    const group = this.bindGroup(key, pipeline, [this.paramsBuffer(op, params), ...buffers]);
    this.steps.push({ pipeline, group, label, dispatch });
  }

  /**
   * The parameter buffer holding `params`: one per distinct parameter list, written once and
   * kept (an op called again with the same shapes writes no parameters), up to 1024 lists.
   */
  private paramsBuffer(op: string, params: ArrayLike<number>): GPUBuffer {
    const key = Array.prototype.join.call(params, ',');
    let p = this.paramBuffers.get(key);
    if (p === undefined) {
      if (this.paramBuffers.size >= 1024) this.forgetBindings();
      p = this.words(op, params);
      this.paramBuffers.set(key, p);
    }
    return p;
  }

  /**
   * The bind group of `buffers` for shader `key`, kept for the same buffers in the same places
   * (buffers are reused from the cache, so an op called again often binds the same ones), up to
   * 4096 groups.
   */
  private bindGroup(key: string, pipeline: any, buffers: GPUBuffer[]): any {
    const id = `${key}|${buffers.map((b) => this.idOf(b)).join(',')}`;
    let group = this.groups.get(id);
    if (group === undefined) {
      if (this.groups.size >= 4096) this.groups.clear();
      this.risky();
      const entries = buffers.map((buffer, binding) => ({ binding, resource: { buffer } }));
      group = this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
      this.groups.set(id, group);
    }
    return group;
  }

  private idOf(b: GPUBuffer): number {
    let id = this.ids.get(b);
    if (id === undefined) {
      id = this.nextId++;
      this.ids.set(b, id);
    }
    return id;
  }

  /** Drops the kept bind groups and parameter buffers (these go back to the cache). */
  private forgetBindings(): void {
    this.groups.clear();
    for (const b of this.paramBuffers.values()) this.release(b);
    this.paramBuffers.clear();
  }

  /**
   * Runs `f` as the op `op`: its work queued in one command buffer and submitted at the end
   * (dropped if `f` throws), inside validation and out-of-memory error scopes from its first call
   * that can fail (`risky`); a WebGPU error raised there becomes an Error naming the op, and the
   * scratch buffers it lists go back to the cache.
   */
  async scoped<T>(op: string, f: (scratch: GPUBuffer[]) => Promise<T>): Promise<T> {
    this.alive(op);
    const call = { op, scoped: false };
    this.call = call;
    const scratch: GPUBuffer[] = [];
    let result: T | undefined;
    let thrown: unknown;
    try {
      result = await f(scratch);
      this.flush();
    } catch (e) {
      thrown = e;
      this.discard();
    }
    if (this.call === call) this.call = undefined;
    // popped in order, awaited together (one wait for Dawn's events, not two)
    const [validation, oom] = call.scoped ? await Promise.all([this.device.popErrorScope(), this.device.popErrorScope()]) : [null, null];
    for (const b of scratch) this.release(b);
    if (thrown !== undefined) throw thrown;
    this.alive(op);
    if (oom) throw new GpuError(op, `the WebGPU device is out of memory (${oom.message}): dispose() tensors you no longer need, or use smaller ones`);
    if (validation) throw new GpuError(op, `WebGPU rejected the op's work (${validation.message}); this is a bug in moe-dispatch`);
    return result as T;
  }
}
