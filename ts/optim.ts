/**
 * AdamW (Loshchilov & Hutter) with global gradient-norm clipping, for the parameters of a layer
 * on any backend, the same bits on every backend:
 *
 *   const opt = new AdamW(moe, layer.parameters(), { lr: 1e-3, weightDecay: 0.01, maxGradNorm: 1 });
 *   const { grads } = layer.backward(gradOutput);
 *   opt.step(grads);                 // updates the layer's weights in place
 *   opt.status();                    // { step, skipped, gradNorm, applied } (on cuda: waits for the GPU)
 *
 * Mixed precision as training uses it: a parameter of a 16-bit dtype gets a float32 master
 * copy, which the update works on; the parameter itself is then the master rounded to its dtype
 * (nearest, ties to even). The two moments are float32. A float32 parameter is its own master.
 *
 * One step, exactly (every backend: this file on the host; kernels/train.cu on the GPU):
 * 1. The gradient norm `sqrt(sum g^2)` over every gradient, the squares exact in float64, summed
 *    in a fixed order: each gradient in chunks of 2048 elements, a chunk's 256 lanes each summing
 *    elements i, i + 256, ... in turn, then a halving tree over the lanes; the chunks' sums (all
 *    gradients, in order) the same way over 1024 lanes.
 * 2. A non-finite norm: nothing is updated and the step count stays (`onNonFinite: 'error'`
 *    throws a RangeError after that; `'skip'` counts it in `status().skipped`).
 * 3. Otherwise, in float64: step += 1, beta1^step, beta2^step; clip = min(1, maxGradNorm /
 *    (norm + 1e-6)) (1 without maxGradNorm); then rounded to float32: clip, decay = 1 - lr *
 *    weightDecay, the betas, 1 - the betas, stepSize = lr / (1 - beta1^step), sqrt(1 - beta2^step),
 *    eps.
 * 4. Each element, float32 arithmetic (no fused multiply-add):
 *    g = grad * clip; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) (g g);
 *    p = p decay - stepSize (m / (sqrt(v) / sqrt(1 - beta2^step) + eps)).
 *    Weight decay applies to tensors of two or more dimensions (not to biases) unless
 *    `decayBiases` is set.
 */
import type { Backend } from './backend.js';
import type { CudaTrainOps } from './backends/cuda-train.js';
import { type AnyTensor, isDeviceTensor, type DeviceTensor } from './device.js';
import { toBFloat16Bits, toFloat16Bits, type Tensor, type TokenDType } from './tensor.js';
import { valuesF32 } from './numeric.js';
import { checkOptions } from './wire.js';

export interface AdamWOptions {
  /** Learning rate (step() may override it per step, for a schedule). */
  lr: number;
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.999. */
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay (default 0.01, as torch.optim.AdamW). */
  weightDecay?: number;
  /** Clip the gradients to this global norm (default: no clipping). */
  maxGradNorm?: number;
  /**
   * A step whose gradient norm is not finite: `'error'` (default) throws, `'skip'` skips it (and
   * counts it in `status().skipped`). Neither writes the weights. On the GPU `'error'` reads the
   * step's outcome back after each step (a synchronisation); `'skip'` never waits.
   */
  onNonFinite?: 'error' | 'skip';
  /** Decay every parameter, biases (1-d tensors) too. Default false. */
  decayBiases?: boolean;
}

/** What the optimizer has done (read from the GPU on the cuda backend). */
export interface OptimizerStatus {
  /** Steps applied. */
  step: number;
  /** Steps skipped for a non-finite gradient norm. */
  skipped: number;
  /** The last step's gradient norm, before clipping (NaN or Infinity when it was skipped). */
  gradNorm: number;
  /** Whether the last step was applied. */
  applied: boolean;
}

type AnyToken = AnyTensor<TokenDType>;

const SQ_LANES = 256;
const SQ_VEC = 8;
const SQ_ITERS = 32;
const SQ_CHUNK = SQ_LANES * SQ_VEC * SQ_ITERS;
const FIN_LANES = 1024;

/** A float64 sum in the GPU's fixed order: lane t's own sum `at(t)` for each of `lanes` lanes, then a halving tree (sh[t] += sh[t + s], s = lanes / 2 .. 1). */
function laneTreeSum(lanes: number, at: (lane: number) => number, sh: Float64Array): number {
  for (let t = 0; t < lanes; t++) sh[t] = at(t);
  for (let s = lanes >> 1; s > 0; s >>= 1) for (let t = 0; t < s; t++) sh[t] += sh[t + s];
  return sh[0];
}

/**
 * Step 1 on the host: the chunk sums of one gradient's squares, appended to `out`, in the GPU's
 * order (kernels/train.cu, chunk_lane_sum): chunks of SQ_CHUNK elements; lane t sums, for
 * j = 0 .. SQ_ITERS - 1, the SQ_VEC consecutive elements from (j * SQ_LANES + t) * SQ_VEC in turn.
 */
export function chunkSquareSums(g: ArrayLike<number>, out: number[]): void {
  const n = g.length;
  const sh = new Float64Array(SQ_LANES);
  for (let base = 0; base < n; base += SQ_CHUNK) {
    const sum = laneTreeSum(
      SQ_LANES,
      (t) => {
        let acc = 0;
        for (let j = 0; j < SQ_ITERS; j++) {
          const i0 = base + (j * SQ_LANES + t) * SQ_VEC;
          const end = Math.min(i0 + SQ_VEC, n);
          for (let i = i0; i < end; i++) acc += g[i] * g[i];
        }
        return acc;
      },
      sh,
    );
    out.push(sum);
  }
}

/** Step 1's second level: the sum of the chunk sums. */
export function sumOfChunks(p: readonly number[]): number {
  return laneTreeSum(
    FIN_LANES,
    (t) => {
      let acc = 0;
      for (let i = t; i < p.length; i += FIN_LANES) acc += p[i];
      return acc;
    },
    new Float64Array(FIN_LANES),
  );
}

interface HostSlot {
  name: string;
  param: Tensor<TokenDType>;
  master: Float32Array;
  m: Float32Array;
  v: Float32Array;
  decay: boolean;
}

interface DeviceSlot {
  name: string;
  param: DeviceTensor<TokenDType>;
  master: DeviceTensor<'float32'>;
  m: DeviceTensor<'float32'>;
  v: DeviceTensor<'float32'>;
  decay: boolean;
}

const f32 = Math.fround;

function num(v: unknown, name: string, dflt: number | undefined, check: (x: number) => boolean, what: string): number {
  if (v === undefined) {
    if (dflt === undefined) throw new TypeError(`${name}: expected ${what}, got undefined`);
    return dflt;
  }
  if (typeof v !== 'number' || !Number.isFinite(v) || !check(v)) throw new RangeError(`${name}: expected ${what}, got ${String(v)}`);
  return v;
}

export class AdamW {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly maxGradNorm?: number;
  readonly onNonFinite: 'error' | 'skip';
  readonly #host?: HostSlot[];
  readonly #device?: { ops: CudaTrainOps; slots: DeviceSlot[]; state: DeviceTensor<'float32'> };
  // host state (the same words the GPU keeps)
  #step = 0;
  #b1p = 1;
  #b2p = 1;
  #skipped = 0;
  #gradNorm = 0;
  #applied = false;
  #disposed = false;

  constructor(backend: Backend, params: Record<string, AnyToken>, options: AdamWOptions) {
    const o = checkOptions<AdamWOptions>(options, 'options', ['lr', 'beta1', 'beta2', 'eps', 'weightDecay', 'maxGradNorm', 'onNonFinite', 'decayBiases']);
    this.lr = num(o.lr, 'options.lr', undefined, (x) => x >= 0, 'a finite number >= 0');
    this.beta1 = num(o.beta1, 'options.beta1', 0.9, (x) => x >= 0 && x < 1, 'a number in [0, 1)');
    this.beta2 = num(o.beta2, 'options.beta2', 0.999, (x) => x >= 0 && x < 1, 'a number in [0, 1)');
    this.eps = num(o.eps, 'options.eps', 1e-8, (x) => x > 0, 'a finite number > 0');
    this.weightDecay = num(o.weightDecay, 'options.weightDecay', 0.01, (x) => x >= 0, 'a finite number >= 0');
    if (o.maxGradNorm !== undefined) this.maxGradNorm = num(o.maxGradNorm, 'options.maxGradNorm', undefined, (x) => x > 0, 'a finite number > 0');
    if (o.onNonFinite !== undefined && o.onNonFinite !== 'error' && o.onNonFinite !== 'skip') {
      throw new TypeError(`options.onNonFinite: expected 'error' or 'skip', got ${JSON.stringify(o.onNonFinite)}`);
    }
    this.onNonFinite = o.onNonFinite ?? 'error';
    if (o.decayBiases !== undefined && typeof o.decayBiases !== 'boolean') throw new TypeError(`options.decayBiases: expected a boolean, got ${typeof o.decayBiases}`);
    const decayAll = o.decayBiases === true;

    if (typeof params !== 'object' || params === null) throw new TypeError(`params: expected an object of named tensors, got ${params === null ? 'null' : typeof params}`);
    const entries = Object.entries(params);
    if (entries.length === 0) throw new RangeError('params: expected at least one tensor, got none');
    const onDevice = entries.map(([, t]) => isDeviceTensor(t));
    if (onDevice.some((d) => d !== onDevice[0])) throw new TypeError('params: expected all host tensors or all device tensors, got a mix');
    for (const [name, t] of entries) {
      if (!['float32', 'bfloat16', 'float16'].includes((t as AnyToken)?.dtype))
        throw new TypeError(`params.${name}: expected a float32, bfloat16 or float16 tensor, got ${(t as AnyToken)?.dtype ?? typeof t}`);
    }
    const decayOf = (t: { shape: readonly number[] }) => decayAll || t.shape.length >= 2;
    if (onDevice[0]) {
      const ops = backend as unknown as Partial<CudaTrainOps>;
      if (backend.name !== 'cuda' || typeof ops.adamwStep !== 'function') throw new TypeError(`params: device tensors need the cuda backend, got the ${backend.name} backend`);
      const gpu = ops as CudaTrainOps;
      const slots = entries.map(([name, t]) => {
        const d = t as DeviceTensor<TokenDType>;
        return { name, param: d, master: d.dtype === 'float32' ? (d as DeviceTensor<'float32'>) : gpu.cast(d, 'float32'), m: gpu.zeros(d.shape), v: gpu.zeros(d.shape), decay: decayOf(d) };
      });
      this.#device = { ops: gpu, slots, state: gpu.optimizerState() };
    } else {
      this.#host = entries.map(([name, t]) => {
        const h = t as Tensor<TokenDType>;
        const n = h.data.length;
        return { name, param: h, master: h.dtype === 'float32' ? (h.data as Float32Array) : Float32Array.from(valuesF32(h)), m: new Float32Array(n), v: new Float32Array(n), decay: decayOf(h) };
      });
    }
  }

  /** Updates the parameters from `grads` (one per parameter, same names and shapes, any float dtype). */
  step(grads: Record<string, AnyToken>, options: { lr?: number } = {}): void {
    if (this.#disposed) throw new TypeError('step: the optimizer was disposed');
    const lr = num(checkOptions<{ lr?: number }>(options, 'options', ['lr']).lr, 'options.lr', this.lr, (x) => x >= 0, 'a finite number >= 0');
    if (typeof grads !== 'object' || grads === null) throw new TypeError(`grads: expected an object of named tensors, got ${grads === null ? 'null' : typeof grads}`);
    const slots = this.#host ?? this.#device!.slots;
    const known = new Set(slots.map((s) => s.name));
    for (const k of Object.keys(grads)) if (!known.has(k)) throw new TypeError(`grads.${k}: not a parameter of this optimizer (it has ${[...known].join(', ')})`);
    const gs = slots.map((s) => {
      const g = grads[s.name];
      if (g === undefined) throw new TypeError(`grads.${s.name}: expected a gradient tensor, got undefined`);
      if (isDeviceTensor(g) !== !!this.#device)
        throw new TypeError(`grads.${s.name}: expected a ${this.#device ? 'device' : 'host'} tensor (as the parameters), got a ${this.#device ? 'host' : 'device'} tensor`);
      if (!['float32', 'bfloat16', 'float16'].includes(g.dtype)) throw new TypeError(`grads.${s.name}.dtype: expected float32, bfloat16 or float16, got ${g.dtype}`);
      if (g.shape.length !== s.param.shape.length || g.shape.some((d, i) => d !== s.param.shape[i])) {
        throw new RangeError(`grads.${s.name}.shape: expected [${s.param.shape.join(', ')}] (the parameter's), got [${g.shape.join(', ')}]`);
      }
      return g;
    });
    if (this.#device) {
      const { ops, state } = this.#device;
      ops.adamwStep({
        params: this.#device.slots.map((s, i) => ({
          name: `grads.${s.name}`,
          master: s.master,
          expAvg: s.m,
          expAvgSq: s.v,
          grad: gs[i] as DeviceTensor<TokenDType>,
          low: (s.master as DeviceTensor) === s.param ? undefined : s.param,
          decay: s.decay,
        })),
        state,
        lr,
        beta1: this.beta1,
        beta2: this.beta2,
        eps: this.eps,
        weightDecay: this.weightDecay,
        ...(this.maxGradNorm !== undefined ? { maxGradNorm: this.maxGradNorm } : {}),
      });
      if (this.onNonFinite === 'error') this.#throwIfSkipped(this.status());
      return;
    }
    this.#hostStep(
      gs.map((g) => valuesF32(g as Tensor<TokenDType>)),
      lr,
    );
    if (this.onNonFinite === 'error') this.#throwIfSkipped(this.status());
  }

  #throwIfSkipped(s: OptimizerStatus): void {
    if (!s.applied) throw new RangeError(`step: the gradient norm is ${s.gradNorm} (a gradient holds a non-finite value); no weight was changed (onNonFinite: 'skip' skips such steps)`);
  }

  #hostStep(grads: Float32Array[], lr: number): void {
    const partials: number[] = [];
    for (const g of grads) chunkSquareSums(g, partials);
    const norm = Math.sqrt(sumOfChunks(partials));
    this.#gradNorm = norm;
    if (!Number.isFinite(norm)) {
      this.#skipped++;
      this.#applied = false;
      return;
    }
    this.#step++;
    this.#b1p *= this.beta1;
    this.#b2p *= this.beta2;
    this.#applied = true;
    let clip = 1;
    if (this.maxGradNorm !== undefined) {
      const c = this.maxGradNorm / (norm + 1e-6);
      clip = Math.min(c, 1);
    }
    const [c, dec, b1, omb1, b2, omb2, stepSize, bc2, eps] = [
      clip,
      1 - lr * this.weightDecay,
      this.beta1,
      1 - this.beta1,
      this.beta2,
      1 - this.beta2,
      lr / (1 - this.#b1p),
      Math.sqrt(1 - this.#b2p),
      this.eps,
    ].map(f32);
    this.#host!.forEach((s, k) => {
      const g = grads[k];
      const { master: p, m, v } = s;
      const decay = s.decay ? dec : 1;
      for (let i = 0; i < p.length; i++) {
        const gi = f32(g[i] * c);
        const mi = f32(f32(b1 * m[i]) + f32(omb1 * gi));
        const vi = f32(f32(b2 * v[i]) + f32(omb2 * f32(gi * gi)));
        const denom = f32(f32(f32(Math.sqrt(vi)) / bc2) + eps);
        p[i] = f32(f32(p[i] * decay) - f32(stepSize * f32(mi / denom)));
        m[i] = mi;
        v[i] = vi;
      }
      if (s.param.dtype !== 'float32') {
        const round = s.param.dtype === 'bfloat16' ? toBFloat16Bits : toFloat16Bits;
        const out = s.param.data as Uint16Array;
        for (let i = 0; i < p.length; i++) out[i] = round(p[i]);
      }
    });
  }

  /** What the optimizer has done so far (on the cuda backend this waits for the GPU). */
  status(): OptimizerStatus {
    if (this.#device) return this.#device.ops.readOptimizerState(this.#device.state);
    return { step: this.#step, skipped: this.#skipped, gradNorm: this.#gradNorm, applied: this.#applied };
  }

  /** The float32 master weights (the parameters themselves for float32 ones). */
  get masters(): Record<string, Tensor<'float32'> | DeviceTensor<'float32'>> {
    const out: Record<string, Tensor<'float32'> | DeviceTensor<'float32'>> = {};
    if (this.#device) for (const s of this.#device.slots) out[s.name] = s.master;
    else for (const s of this.#host!) out[s.name] = { dtype: 'float32', shape: [...s.param.shape], data: s.master };
    return out;
  }

  /** Frees the GPU memory of the masters, moments and state (not the parameters). Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.#device) {
      for (const s of this.#device.slots) {
        if ((s.master as DeviceTensor) !== s.param) s.master.dispose();
        s.m.dispose();
        s.v.dispose();
      }
      this.#device.state.dispose();
    }
  }
}
