/**
 * The cuda backend's training ops on the GPU: `routeBackward` on device tensors (its kernel in
 * kernels/routing.cu), and what a device-resident trainer needs beside the ops: the optimizer
 * (AdamW with clipping, state on the GPU: ts/optim.ts drives it), dtype conversions, zeros, and
 * the element steps MoELayer composes (ts/numeric.ts's, bit for bit: the router logits'
 * epilogue, three-way sums, column sums, the picks' gradient). Conversions only here: the work
 * is crates/moe-cuda/src/train.rs.
 */
import type { Transfers } from '../device.js';
import { type DeviceTensor, type NativeCudaTensor, wrapDevice } from '../device.js';
import type { OptimizerStatus } from '../optim.js';
import type { RouteOptions } from '../ops/routing.js';
import type { DType, Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkNumber, checkOptions } from '../wire.js';
import { type Addon, anyDevice, type GpuFamily, optionValue } from './cuda-common.js';

type H = NativeCudaTensor;

/** One parameter of an AdamW step on the GPU. */
export interface DeviceAdamWParam {
  /** How errors name it, e.g. "grads.routerWeight". */
  name: string;
  master: DeviceTensor<'float32'>;
  expAvg: DeviceTensor<'float32'>;
  expAvgSq: DeviceTensor<'float32'>;
  grad: DeviceTensor<TokenDType>;
  /** The 16-bit parameter rewritten from the new master. */
  low?: DeviceTensor<TokenDType>;
  decay: boolean;
}

export interface DeviceAdamWStep {
  params: DeviceAdamWParam[];
  state: DeviceTensor<'float32'>;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  maxGradNorm?: number;
}

/** The cuda backend's training methods (device tensors in and out). */
export interface CudaTrainOps {
  /** A fresh optimizer state on the GPU (step 0). */
  optimizerState(): DeviceTensor<'float32'>;
  /** Waits for the GPU and reads an optimizer state. */
  readOptimizerState(state: DeviceTensor<'float32'>): OptimizerStatus;
  /** Queues one AdamW step over the parameters (ts/optim.ts says what it computes); does not wait. */
  adamwStep(step: DeviceAdamWStep): void;
  /** A copy converted to `dtype`: exact from 16-bit to float32, rounded once the other way. */
  cast<D extends TokenDType>(tensor: DeviceTensor<TokenDType>, dtype: D): DeviceTensor<D>;
  /** `a @ b` of 16-bit (or float32) operands of one dtype with a float32 result: one GEMM accumulating in float32, the output not rounded to the operands' dtype. */
  matmulToFloat32(a: DeviceTensor<TokenDType>, b: DeviceTensor<TokenDType>, options?: { transA?: boolean; transB?: boolean }): DeviceTensor<'float32'>;
  /**
   * `a @ b` of one float32 and one bfloat16 operand with a float32 result: the widened float32 GEMM's products, exactly, summed in
   * float32 on the tensor cores (the float32 operand as three bfloat16 parts that add up to it; the router's backward in a bfloat16 layer).
   */
  matmulMixed(a: DeviceTensor<'float32' | 'bfloat16'>, b: DeviceTensor<'float32' | 'bfloat16'>, options?: { transA?: boolean; transB?: boolean }): DeviceTensor<'float32'>;
  /**
   * `matmulMixed` with `options.addend` (`[m, n]`) added: `addend.dtype(f32(addend + a @ b))`, `add3(addend, a @ b)`'s
   * arithmetic on the float32 product (the layer's input gradient: the experts' part plus the router's). Where the
   * product is one GEMM, cuBLASLt adds the addend in its epilogue (no float32 product written and read back).
   */
  matmulMixed<D extends TokenDType>(
    a: DeviceTensor<'float32' | 'bfloat16'>,
    b: DeviceTensor<'float32' | 'bfloat16'>,
    options: { transA?: boolean; transB?: boolean; addend: DeviceTensor<D> },
  ): DeviceTensor<D>;
  /** The shared expert's sigmoid gate (MoELayer): from the gate GEMM's float32 result `[N, 1]` and the shared MLP's output, the gate logits `[N]` (rounded to out's dtype) and the gated contribution; ts/numeric.ts `sharedGateForward` on the host. */
  sharedGateForward<D extends TokenDType>(raw: DeviceTensor<'float32'>, out: DeviceTensor<D>): { gateLogits: DeviceTensor<'float32'>; contribution: DeviceTensor<D> };
  /** Its backward: the MLP output's gradient and the gate logits' `[N, 1]` (ts/numeric.ts `sharedGateBackward`). */
  sharedGateBackward<D extends TokenDType>(g: DeviceTensor<D>, out: DeviceTensor<D>, gateLogits: DeviceTensor<'float32'>): { gradOut: DeviceTensor<D>; gradGateLogits: DeviceTensor<'float32'> };
  /** Float32 zeros. */
  zeros(shape: readonly number[]): DeviceTensor<'float32'>;
  /** Router logits from the float32 GEMM result: `f32(raw + bias[j])`, rounded to `roundTo` and widened back. */
  logitsEpilogue(raw: DeviceTensor<'float32'>, bias: DeviceTensor<TokenDType> | undefined, roundTo: TokenDType): DeviceTensor<'float32'>;
  /** `dtype(f32((a + b) + c))` element by element in float64 (`c` optional). */
  add3<D extends TokenDType>(a: DeviceTensor<TokenDType>, b: DeviceTensor<TokenDType>, c: DeviceTensor<TokenDType> | undefined, dtype: D): DeviceTensor<D>;
  /** Column sums of a float32 `[N, E]` tensor in float64 (rows in order), rounded to `dtype`. */
  columnSums<D extends TokenDType>(g: DeviceTensor<'float32'>, dtype: D): DeviceTensor<D>;
  /** `out[t, j] = dense[t, indices[t, j]]` (0 for -1). */
  gatherPicks(dense: DeviceTensor<'float32'>, indices: DeviceTensor<'int32'>): DeviceTensor<'float32'>;
  /**
   * Expert parallelism's send plan (ts/ep.ts dispatch on device tensors): from the picks `indices [T, k]` (global expert ids,
   * -1 masked) and `owner` (the rank of each expert), the `[T, numRanks]` map of the ranks each token goes to (each once), the
   * tokens and picks each rank gets, and whether a pick is outside `[0, owner.length)` and not -1 or a row lists an expert twice
   * (`badPicks`: the rest then means nothing). One synchronisation (the counts).
   */
  epSendPlan(indices: DeviceTensor<'int32'>, owner: Int32Array, numRanks: number): { sendMap: DeviceTensor<'bool'>; sendCounts: number[]; pickCounts: number[]; badPicks: boolean };
  /**
   * What travels with each sent row: for the slots of `sorted` (permute's sortedIndices of epSendPlan's map, made on the GPU) and
   * each pick of the slot's token, the pick as the receiving rank's local expert id (-1 where it lives elsewhere or is masked) and
   * its weight (0 elsewhere), `[S, k]` each.
   */
  epRankExtras(sorted: DeviceTensor<'int32'>, indices: DeviceTensor<'int32'>, weights: DeviceTensor<'float32'>, owner: Int32Array): { local: DeviceTensor<'int32'>; weights: DeviceTensor<'float32'> };
  /** The mean squared error of `y` against `target` (the loss is read from the GPU) and its gradient `2 (y - t) / n` in `y`'s dtype (ts/train.ts's `mseLoss`, the same bits). */
  mseLoss<D extends TokenDType>(y: DeviceTensor<D>, target: DeviceTensor<D>): { loss: number; grad: DeviceTensor<D> };
  /** Every copy between host and device memory so far (tensor data and small words alike): what a training step moves shows in the difference. */
  transfers(): Transfers;
  /** The most device memory this process's tensors held at once since the last reset; `{ reset: true }` starts a new peak. */
  peakMemory(options?: { reset?: boolean }): number;
}

interface TrainAddon {
  cudaRouteBackwardDevice(args: Record<string, unknown>): H;
  cudaOptimizerState(): H;
  cudaReadOptimizerState(state: H): OptimizerStatus;
  cudaAdamwStep(args: Record<string, unknown>): void;
  cudaCast(t: H, dtype: string): H;
  cudaZeros(shape: number[]): H;
  cudaSharedGateForward(raw: H, out: H): { gateLogits: H; contribution: H };
  cudaSharedGateBackward(g: H, out: H, gateLogits: H): { gradOut: H; gradGateLogits: H };
  cudaMatmulF32Out(a: H, b: H, transA?: boolean, transB?: boolean): H;
  cudaMatmulMixed(a: H, b: H, transA?: boolean, transB?: boolean, addend?: H): H;
  cudaLogitsEpilogue(raw: H, bias: H | undefined | null, roundTo: string): H;
  cudaAdd3(a: H, b: H, c: H | undefined | null, dtype: string): H;
  cudaColumnSums(g: H, dtype: string): H;
  cudaGatherPicks(dense: H, indices: H): H;
  cudaMseLoss(y: H, target: H): { loss: number; grad: H };
  cudaEpSendPlan(indices: H, owner: Int32Array, numRanks: number): { sendMap: H; sendCounts: number[]; pickCounts: number[]; badPicks: boolean };
  cudaEpRankExtras(sorted: H, indices: H, weights: H, owner: Int32Array): { local: H; weights: H };
  cudaTransfers(): Transfers;
  cudaPeakMemory(reset?: boolean): number;
}

const TOKENS = ['float32', 'bfloat16', 'float16'] as const;
const ROUTE_KEYS = ['topk', 'scoreFunction', 'softmaxBeforeTopk', 'expertBias', 'numGroups', 'topkGroups', 'normTopkProb', 'routeScale', 'tokenMask', 'gradScores'] as const;

/** A disposed device tensor is the first thing to say (before the other arguments' checks). */
function live(...ts: unknown[]): void {
  for (const t of ts) if (anyDevice(t) && (t as DeviceTensor).disposed) throw new TypeError('expected a device tensor that is not disposed, got one whose dispose() was called');
}

function dtypeArg(dtype: unknown, arg: string): TokenDType {
  if (!TOKENS.includes(dtype as TokenDType)) throw new TypeError(`${arg}: expected 'float32', 'bfloat16' or 'float16', got ${JSON.stringify(dtype)}`);
  return dtype as TokenDType;
}

/** The EP send side's `owner` (the rank of each expert), or a TypeError naming it. */
function ownerArg(owner: unknown): Int32Array {
  if (!(owner instanceof Int32Array)) throw new TypeError(`owner: expected an Int32Array (the rank of each expert), got ${Object.prototype.toString.call(owner)}`);
  return owner;
}

export const trainGpu: GpuFamily = {
  ops: ['routeBackward'],
  present: (addon: Addon) => typeof addon.cudaRouteBackwardDevice === 'function' && typeof addon.cudaAdamwStep === 'function',
  methods({ base, addon, call }) {
    const gpu = addon as unknown as TrainAddon;
    const ops: CudaTrainOps & { routeBackward: (...a: never[]) => unknown } = {
      routeBackward(gradWeights: unknown, logits: unknown, indices: unknown, options: unknown) {
        const extra = ['expertBias', 'tokenMask', 'gradScores'].map((k) => optionValue(options, k));
        if (!anyDevice(gradWeights, logits, indices, ...extra)) {
          return base.routeBackward(gradWeights as Tensor<'float32'>, logits as Tensor<TokenDType>, indices as Tensor<'int32'>, options as RouteOptions);
        }
        return call('routeBackward', (h) => {
          // the tensors first: a disposed one is the first thing to say
          const tensors = { gradWeights: h.of(gradWeights, 'gradWeights', ['float32']), logits: h.of(logits, 'logits', TOKENS), indices: h.of(indices, 'indices', ['int32']) };
          const o = checkOptions<RouteOptions & { gradScores?: unknown }>(options, 'routeBackward', ROUTE_KEYS);
          if (o.scoreFunction !== undefined && typeof o.scoreFunction !== 'string') throw new TypeError(`options.scoreFunction: expected a string, got ${typeof o.scoreFunction}`);
          const topk = checkNumber(o.topk, 'options.topk');
          if (topk === undefined) throw new TypeError('options.topk: expected a number (required), got undefined');
          const g = gpu.cudaRouteBackwardDevice({
            ...tensors,
            gradScores: h.opt(o.gradScores, 'gradScores', ['float32']),
            expertBias: h.opt(o.expertBias, 'expertBias', ['float32']),
            tokenMask: h.opt(o.tokenMask, 'tokenMask', ['bool']),
            topk,
            scoreFunction: o.scoreFunction,
            softmaxBeforeTopk: checkBool(o.softmaxBeforeTopk, 'options.softmaxBeforeTopk'),
            numGroups: checkNumber(o.numGroups, 'options.numGroups'),
            topkGroups: checkNumber(o.topkGroups, 'options.topkGroups'),
            normTopkProb: checkBool(o.normTopkProb, 'options.normTopkProb'),
            routeScale: checkNumber(o.routeScale, 'options.routeScale'),
          });
          return { gradLogits: wrapDevice(g) };
        });
      },
      optimizerState() {
        return call('optimizerState', () => wrapDevice<'float32'>(gpu.cudaOptimizerState()));
      },
      readOptimizerState(state) {
        return call('readOptimizerState', (h) => gpu.cudaReadOptimizerState(h.of(state, 'state', ['float32'])));
      },
      adamwStep(step) {
        call('adamwStep', (h) => {
          if (typeof step !== 'object' || step === null)
            throw new TypeError(`step: expected { params, state, lr, beta1, beta2, eps, weightDecay, maxGradNorm? }, got ${step === null ? 'null' : typeof step}`);
          if (!Array.isArray(step.params)) throw new TypeError(`step.params: expected an array of parameters, got ${typeof step.params}`);
          const dev = (t: unknown, arg: string, dtypes: readonly DType[]) => {
            if (!anyDevice(t)) throw new TypeError(`${arg}: expected a device tensor, got ${typeof t === 'object' && t !== null ? 'a host tensor' : typeof t}`);
            return h.of(t, arg, dtypes);
          };
          const params = step.params.map((p, i) => {
            if (typeof p !== 'object' || p === null) throw new TypeError(`step.params[${i}]: expected { name, master, expAvg, expAvgSq, grad, low?, decay }, got ${p === null ? 'null' : typeof p}`);
            const name = typeof p.name === 'string' ? p.name : `step.params[${i}]`;
            return {
              name,
              master: dev(p.master, `${name} (master)`, ['float32']),
              expAvg: dev(p.expAvg, `${name} (expAvg)`, ['float32']),
              expAvgSq: dev(p.expAvgSq, `${name} (expAvgSq)`, ['float32']),
              grad: dev(p.grad, name, TOKENS),
              low: p.low === undefined ? undefined : dev(p.low, `${name} (parameter)`, TOKENS),
              decay: checkBool(p.decay, `${name}.decay`) ?? false,
            };
          });
          const num = (v: unknown, arg: string) => {
            const x = checkNumber(v, arg);
            if (x === undefined) throw new TypeError(`${arg}: expected a number, got undefined`);
            return x;
          };
          gpu.cudaAdamwStep({
            params,
            state: dev(step.state, 'step.state', ['float32']),
            lr: num(step.lr, 'step.lr'),
            beta1: num(step.beta1, 'step.beta1'),
            beta2: num(step.beta2, 'step.beta2'),
            eps: num(step.eps, 'step.eps'),
            weightDecay: num(step.weightDecay, 'step.weightDecay'),
            maxGradNorm: checkNumber(step.maxGradNorm, 'step.maxGradNorm'),
          });
        });
      },
      cast(tensor, dtype) {
        return call('cast', (h) => {
          live(tensor);
          return wrapDevice(gpu.cudaCast(h.of(tensor, 'tensor', TOKENS), dtypeArg(dtype, 'dtype')));
        });
      },
      matmulToFloat32(a, b, options) {
        return call('matmulToFloat32', (h) => {
          live(a, b);
          const o = checkOptions<{ transA?: boolean; transB?: boolean }>(options, 'matmulToFloat32', ['transA', 'transB']);
          return wrapDevice<'float32'>(gpu.cudaMatmulF32Out(h.of(a, 'a', TOKENS), h.of(b, 'b', TOKENS), checkBool(o.transA, 'options.transA'), checkBool(o.transB, 'options.transB')));
        });
      },
      matmulMixed(a: DeviceTensor<'float32' | 'bfloat16'>, b: DeviceTensor<'float32' | 'bfloat16'>, options?: { transA?: boolean; transB?: boolean; addend?: DeviceTensor }) {
        return call('matmulMixed', (h) => {
          live(a, b);
          const o = checkOptions<{ transA?: boolean; transB?: boolean; addend?: DeviceTensor }>(options, 'matmulMixed', ['transA', 'transB', 'addend']);
          const kinds = ['float32', 'bfloat16'] as const;
          const addend = o.addend === undefined ? undefined : h.of(o.addend, 'options.addend', TOKENS);
          // (the overloads' result: float32, or the addend's dtype)
          return wrapDevice(
            gpu.cudaMatmulMixed(h.of(a, 'a', kinds), h.of(b, 'b', kinds), checkBool(o.transA, 'options.transA'), checkBool(o.transB, 'options.transB'), addend),
          ) as DeviceTensor<'float32'>;
        });
      },
      sharedGateForward(raw, out) {
        return call('sharedGateForward', (h) => {
          live(raw, out);
          const r = gpu.cudaSharedGateForward(h.of(raw, 'raw', ['float32']), h.of(out, 'out', TOKENS));
          return { gateLogits: wrapDevice(r.gateLogits), contribution: wrapDevice(r.contribution) };
        });
      },
      sharedGateBackward(g, out, gateLogits) {
        return call('sharedGateBackward', (h) => {
          live(g, out, gateLogits);
          const r = gpu.cudaSharedGateBackward(h.of(g, 'g', TOKENS), h.of(out, 'out', TOKENS), h.of(gateLogits, 'gateLogits', ['float32']));
          return { gradOut: wrapDevice(r.gradOut), gradGateLogits: wrapDevice(r.gradGateLogits) };
        });
      },
      zeros(shape) {
        return call('zeros', () => {
          if (!Array.isArray(shape)) throw new TypeError(`shape: expected an array of sizes, got ${typeof shape}`);
          return wrapDevice<'float32'>(gpu.cudaZeros([...shape]));
        });
      },
      logitsEpilogue(raw, bias, roundTo) {
        return call('logitsEpilogue', (h) => {
          live(raw, bias);
          return wrapDevice<'float32'>(gpu.cudaLogitsEpilogue(h.of(raw, 'raw', ['float32']), h.opt(bias, 'bias', TOKENS), dtypeArg(roundTo, 'roundTo')));
        });
      },
      add3(a, b, c, dtype) {
        return call('add3', (h) => {
          live(a, b, c);
          return wrapDevice(gpu.cudaAdd3(h.of(a, 'a', TOKENS), h.of(b, 'b', TOKENS), h.opt(c, 'c', TOKENS), dtypeArg(dtype, 'dtype')));
        });
      },
      columnSums(g, dtype) {
        return call('columnSums', (h) => {
          live(g);
          return wrapDevice(gpu.cudaColumnSums(h.of(g, 'g', ['float32']), dtypeArg(dtype, 'dtype')));
        });
      },
      mseLoss(y, target) {
        return call('mseLoss', (h) => {
          const r = gpu.cudaMseLoss(h.of(y, 'y', TOKENS), h.of(target, 'target', TOKENS));
          return { loss: r.loss, grad: wrapDevice(r.grad) };
        });
      },
      transfers() {
        return gpu.cudaTransfers();
      },
      peakMemory(options) {
        const o = checkOptions<{ reset?: boolean }>(options, 'peakMemory', ['reset']);
        return gpu.cudaPeakMemory(checkBool(o.reset, 'options.reset'));
      },
      epSendPlan(indices, owner, numRanks) {
        return call('epSendPlan', (h) => {
          const r = gpu.cudaEpSendPlan(h.of(indices, 'indices', ['int32']), ownerArg(owner), checkNumber(numRanks, 'numRanks') ?? NaN);
          return { sendMap: wrapDevice<'bool'>(r.sendMap), sendCounts: r.sendCounts, pickCounts: r.pickCounts, badPicks: r.badPicks };
        });
      },
      epRankExtras(sorted, indices, weights, owner) {
        return call('epRankExtras', (h) => {
          const r = gpu.cudaEpRankExtras(h.of(sorted, 'sorted', ['int32']), h.of(indices, 'indices', ['int32']), h.of(weights, 'weights', ['float32']), ownerArg(owner));
          return { local: wrapDevice<'int32'>(r.local), weights: wrapDevice<'float32'>(r.weights) };
        });
      },
      gatherPicks(dense, indices) {
        return call('gatherPicks', (h) => wrapDevice<'float32'>(gpu.cudaGatherPicks(h.of(dense, 'dense', ['float32']), h.of(indices, 'indices', ['int32']))));
      },
    };
    return ops as unknown as Record<string, (...args: never[]) => unknown>;
  },
};
