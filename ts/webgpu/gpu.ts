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
const COPY_DST = 0x08;
const MAP_READ = 0x01;
const MAP_MODE_READ = 0x1;

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
  private readonly pipelines = new Map<string, any>();
  /** Bytes held by live buffers of tensors (not counting the per-op scratch). */
  liveBytes = 0;

  constructor(
    readonly device: GPUDevice,
    readonly adapterName: string,
  ) {
    this.maxBinding = Number(device.limits.maxStorageBufferBindingSize);
    this.maxBuffer = Number(device.limits.maxBufferSize);
    this.maxGroups = Number(device.limits.maxComputeWorkgroupsPerDimension);
    device.lost.then((info: { reason?: string; message?: string }) => {
      this.lost = `${info.reason ?? 'unknown'}${info.message ? `: ${info.message}` : ''}`;
    });
  }

  /** Throws if the device was lost: a lost device does nothing, and its buffers are gone. */
  alive(op: string): void {
    if (this.lost !== undefined) {
      throw new GpuError(op, `the WebGPU device was lost (${this.lost}); its tensors are gone: create a new backend with createBackend({ prefer: 'webgpu' })`);
    }
  }

  /** A storage buffer of at least `bytes` (rounded up to whole words, at least one). */
  buffer(op: string, bytes: number, what: string): GPUBuffer {
    this.alive(op);
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    const limit = Math.min(this.maxBinding, this.maxBuffer);
    if (size > limit) {
      throw new GpuError(
        op,
        `${what} needs a ${size}-byte buffer, over this WebGPU adapter's limit of ${limit} bytes (maxStorageBufferBindingSize ${this.maxBinding}, maxBufferSize ${this.maxBuffer}): use smaller tensors, or the wasm backend`,
      );
    }
    return this.device.createBuffer({ size, usage: STORAGE | COPY_SRC | COPY_DST });
  }

  /** A buffer holding `bytes` (padded to whole words). */
  upload(op: string, bytes: Uint8Array, what: string): GPUBuffer {
    const buf = this.buffer(op, bytes.byteLength, what);
    if (bytes.byteLength > 0) {
      if (bytes.byteLength % 4 === 0) this.device.queue.writeBuffer(buf, 0, bytes.buffer, bytes.byteOffset, bytes.byteLength);
      else {
        const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
        padded.set(bytes);
        this.device.queue.writeBuffer(buf, 0, padded.buffer, 0, padded.byteLength);
      }
    }
    return buf;
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
    const staging = this.device.createBuffer({ size, usage: MAP_READ | COPY_DST });
    try {
      const enc = this.device.createCommandEncoder();
      enc.copyBufferToBuffer(buf, 0, staging, 0, size);
      this.device.queue.submit([enc.finish()]);
      try {
        await staging.mapAsync(MAP_MODE_READ);
      } catch (e) {
        this.alive(op);
        throw new GpuError(op, `reading a WebGPU buffer back failed: ${(e as Error).message}`);
      }
      const out = new Uint8Array(bytes);
      out.set(new Uint8Array(staging.getMappedRange(0, size)).subarray(0, bytes));
      staging.unmap();
      return out;
    } finally {
      staging.destroy();
    }
  }

  private pipeline(key: string, code: string): any {
    let p = this.pipelines.get(key);
    if (!p) {
      const module = this.device.createShaderModule({ code, label: key });
      p = this.device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'main' }, label: key });
      this.pipelines.set(key, p);
    }
    return p;
  }

  /**
   * Queues one dispatch of `threads` invocations of shader `key` with `params` at binding 0 and
   * `buffers` at bindings 1... (64 a workgroup, rows of up to maxComputeWorkgroupsPerDimension).
   */
  dispatch(op: string, key: string, code: string, params: ArrayLike<number>, buffers: GPUBuffer[], threads: number, scratch: GPUBuffer[]): void {
    if (threads === 0) return;
    this.alive(op);
    const pipeline = this.pipeline(key, code);
    const p = this.words(op, params);
    scratch.push(p);
    const entries = [p, ...buffers].map((buffer, binding) => ({ binding, resource: { buffer } }));
    const group = this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
    const groups = Math.ceil(threads / 64);
    const x = Math.min(groups, this.maxGroups);
    const y = Math.ceil(groups / x);
    if (y > this.maxGroups) throw new GpuError(op, `${threads} threads are over this WebGPU adapter's dispatch limit`);
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(x, y);
    pass.end();
    this.device.queue.submit([enc.finish()]);
  }

  /**
   * Runs `f` inside validation and out-of-memory error scopes; a WebGPU error raised meanwhile
   * becomes an Error naming the op (after `f`'s work was queued), and the scratch buffers it
   * lists are destroyed.
   */
  async scoped<T>(op: string, f: (scratch: GPUBuffer[]) => Promise<T>): Promise<T> {
    this.alive(op);
    this.device.pushErrorScope('out-of-memory');
    this.device.pushErrorScope('validation');
    const scratch: GPUBuffer[] = [];
    let result: T | undefined;
    let thrown: unknown;
    try {
      result = await f(scratch);
    } catch (e) {
      thrown = e;
    }
    const validation = await this.device.popErrorScope();
    const oom = await this.device.popErrorScope();
    for (const b of scratch) b.destroy();
    if (thrown !== undefined) throw thrown;
    this.alive(op);
    if (oom) throw new GpuError(op, `the WebGPU device is out of memory (${oom.message}): dispose() tensors you no longer need, or use smaller ones`);
    if (validation) throw new GpuError(op, `WebGPU rejected the op's work (${validation.message}); this is a bug in moe-dispatch`);
    return result as T;
  }
}
