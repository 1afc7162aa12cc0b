/**
 * The cuda backend's grouped experts and matmul on the GPU (cuBLAS GEMMs, one per expert and
 * operand; crates/moe-cuda/src/experts.rs). Host tensors only: the CPU core's result (as every
 * backend). Any device tensor among the arguments: the GPU path, device tensors out.
 */
import type { AnyTensor, DeviceTensor, NativeCudaTensor } from '../device.js';
import { isDeviceTensor, wrapDevice } from '../device.js';
import type { ExpertsForwardArgs } from '../generated/binding.js';
import {
  expertArgs,
  expertsGrads,
  type ExpertsBackwardOptions,
  type ExpertsForwardOptions,
  type ExpertsGradsOut,
  type ExpertsOps,
  type ExpertsOptions,
  type ExpertWeights,
  type MatmulOptions,
} from '../ops/experts.js';
import type { Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkOptions, TOKENS } from '../wire.js';
import { anyDevice, noDeviceOut, optionValue, wrapResult, type Addon, type DeviceFn, type GpuFamily, type Handles, type OnDevice } from './cuda-common.js';

/** Expert weights with device tensors allowed. */
export interface DeviceExpertWeights<D extends TokenDType = TokenDType> {
  gateAndUpProjs?: AnyTensor<D>;
  upProjs?: AnyTensor<D>;
  downProjs: AnyTensor<D>;
}

export interface DeviceExpertsOptions extends Omit<ExpertsOptions, 'permutedProbs' | 'biases' | 'gatherIndices'> {
  permutedProbs?: AnyTensor<'float32'>;
  biases?: { gateUpProjBias?: AnyTensor<TokenDType>; downProjBias?: AnyTensor<TokenDType> };
  /**
   * ExpertsOptions.gatherIndices, on the GPU: on our Hopper grouped GEMM with
   * `MOE_DISPATCH_GG_FUSE=gather` the GEMMs read the rows through the indices, so the permuted
   * copy of the tokens is never made; elsewhere the rows are copied out first (the same results).
   * Indices that permute made for these tokens are taken as they are; others are read back and
   * checked (a RangeError names the first outside `[0, numTokens)`).
   */
  gatherIndices?: AnyTensor<'int32'>;
}

/**
 * What `expertsForward(..., { saveForBackward: true })` keeps for `expertsBackward(..., { saved })`:
 * the up-projection `h` (`[N, width]`) and the weighted activation `a` (`[N, inter]`), on the GPU.
 * With them the backward pass does not recompute `h = x W1` (a third of its GEMM work). Dispose
 * them after the backward pass (or leave them to the garbage collector). `counts`: the rows of
 * each expert as the forward read them from `tokensPerExpert` (a host copy: the forward's one
 * synchronisation); the backward pass takes them instead of reading `tokensPerExpert` again, so
 * pass the same `tokensPerExpert` (without `counts` it is read).
 */
export interface ExpertsSaved {
  upProjection: DeviceTensor;
  activation: DeviceTensor;
  counts?: Int32Array;
}

/** expertsForward's options on the cuda backend. */
export interface DeviceExpertsForwardOptions extends DeviceExpertsOptions {
  /**
   * Keep `h` and `a` for the backward pass (device tensors; the result is `{ output, saved }`).
   * `saved` is absent where the call runs on the CPU core (tokens and weights of two dtypes).
   */
  saveForBackward?: boolean;
}

/** expertsBackward's options on the cuda backend. */
export interface DeviceExpertsBackwardOptions extends DeviceExpertsOptions {
  /** What the forward pass kept (`saveForBackward`): the backward pass takes h and a from it. */
  saved?: ExpertsSaved;
  /**
   * ExpertsBackwardOptions.gradGatherIndices, on the GPU: the call gathers the rows' gradient
   * from `gradOutput` (the tokens' gradient in their own order) itself; on our grouped GEMM that
   * copy is freed once `dW2` and the activation's gradient are queued (elsewhere when the call
   * returns). Indices are taken or checked as `gatherIndices` are.
   */
  gradGatherIndices?: AnyTensor<'int32'>;
  /**
   * Give `saved`'s tensors to the call (with `saved`): on our grouped GEMM it frees the activation
   * once `dW2` has read it and the up-projection once the activation's backward has, instead of
   * their living through the call beside the gradients made after them; elsewhere they are freed
   * when it returns. Either way `saved.upProjection` and `saved.activation` are disposed once the
   * call returns. A call that fails its checks leaves them as they were; one that fails later
   * (out of memory, say) leaves them disposed.
   */
  freeSaved?: boolean;
  /**
   * Give `permutedTokens` to the call (a device tensor; not with `gatherIndices`, whose tokens
   * are the caller's in their own order): on our grouped GEMM the tokens' gradient is written over
   * them once `dW1`, their last reader, is queued (the result's `gradTokens` takes their memory, so
   * the `[N, dim]` rows and their gradient never take memory side by side); elsewhere they are
   * freed when the call returns. Either way `permutedTokens` is disposed once the call returns. A
   * call that fails leaves them as they were.
   */
  freeTokens?: boolean;
}

export interface DeviceExpertsGrads<D extends TokenDType = TokenDType> {
  gradTokens: DeviceTensor<D>;
  gradGateAndUpProjs?: DeviceTensor<TokenDType>;
  gradUpProjs?: DeviceTensor<TokenDType>;
  gradDownProjs: DeviceTensor<TokenDType>;
  gradBiases?: { gateUpProjBias?: DeviceTensor<TokenDType>; downProjBias?: DeviceTensor<TokenDType> };
  gradProbs?: DeviceTensor<'float32'>;
}

/** The experts methods of the cuda backend that take device tensors. */
export interface CudaExpertsOps {
  /** Host tensors: the CPU op (`options.out` allowed). Any device tensor: the GPU, which allocates its output (`out` is a TypeError). */
  expertsForward<D extends TokenDType>(permutedTokens: Tensor<D>, tokensPerExpert: Tensor<'int32' | 'int64'>, weights: ExpertWeights, options: ExpertsForwardOptions<D>): Tensor<D>;
  expertsForward<D extends TokenDType>(
    permutedTokens: AnyTensor<D>,
    tokensPerExpert: AnyTensor<'int32'>,
    weights: DeviceExpertWeights,
    options: DeviceExpertsForwardOptions & { saveForBackward: true },
  ): { output: DeviceTensor<D>; saved?: ExpertsSaved };
  expertsForward<D extends TokenDType>(permutedTokens: AnyTensor<D>, tokensPerExpert: AnyTensor<'int32'>, weights: DeviceExpertWeights, options: DeviceExpertsOptions): DeviceTensor<D>;
  /** Host tensors: the CPU op (ExpertsOps' signature). Any device tensor: the GPU. */
  expertsBackward: ExpertsOps['expertsBackward'] &
    (<D extends TokenDType>(
      gradOutput: AnyTensor<D>,
      permutedTokens: AnyTensor<D>,
      tokensPerExpert: AnyTensor<'int32'>,
      weights: DeviceExpertWeights,
      options: DeviceExpertsBackwardOptions,
    ) => DeviceExpertsGrads<D>);
  matmul<D extends TokenDType>(a: Tensor<D>, b: Tensor<TokenDType>, options?: MatmulOptions): Tensor<D>;
  matmul<D extends TokenDType>(a: AnyTensor<D>, b: AnyTensor<TokenDType>, options?: MatmulOptions): DeviceTensor<D>;
}

type H = NativeCudaTensor;

/** The addon functions this family calls (crates/moe-node/src/cuda_experts.rs): the CPU ops' argument objects on device tensors, and what the GPU adds. */
interface ExpertsAddon {
  cudaExpertsForwardDevice(args: OnDevice<Omit<ExpertsForwardArgs, 'out'>> & { saveForBackward?: boolean; gatherIndices?: H }): {
    output: H;
    upProjection?: H;
    activation?: H;
    counts?: number[];
  };
  cudaExpertsBackwardDevice: DeviceFn<'expertsBackward', { saved?: SavedArg; gatherIndices?: H; gradGatherIndices?: H; freeTokens?: boolean }>;
  cudaMatmulDevice: DeviceFn<'matmul'>;
}

const KNOWN: readonly (keyof DeviceExpertsOptions)[] = ['activation', 'permutedProbs', 'biases', 'alpha', 'limit', 'linearOffset', 'gatherIndices'];
const FORWARD_KNOWN = [...KNOWN, 'saveForBackward'];
const BACKWARD_KNOWN = [...KNOWN, 'saved', 'gradGatherIndices', 'freeSaved', 'freeTokens'];

/** The device functions' argument object: ops/experts.ts's own builder over device handles (tokensPerExpert int32: the GPU keeps no int64). */
function deviceArgs(h: Handles, permutedTokens: unknown, tokensPerExpert: unknown, weights: unknown, options: unknown, op: 'expertsForward' | 'expertsBackward') {
  return expertArgs(h, permutedTokens, tokensPerExpert, weights, options, op, op === 'expertsForward' ? FORWARD_KNOWN : BACKWARD_KNOWN, ['int32']);
}

function deviceOptions(options: unknown): unknown[] {
  if (typeof options !== 'object' || options === null) return [];
  const o = options as DeviceExpertsForwardOptions & DeviceExpertsBackwardOptions;
  // saveForBackward, saved and gatherIndices exist on the GPU only: they take the device path
  return [
    o.permutedProbs,
    o.biases?.gateUpProjBias,
    o.biases?.downProjBias,
    o.saved?.upProjection,
    o.saved?.activation,
    o.saveForBackward ? (o.saved ?? DEVICE_PATH) : undefined,
    o.gatherIndices === undefined ? undefined : DEVICE_PATH,
    // (host indices with host tensors: the host op gathers them)
    o.gradGatherIndices,
    // (refused there with host tokens, naming the option)
    o.freeTokens ? DEVICE_PATH : undefined,
  ];
}

/** A marker that sends a call down the device path (see deviceOptions). */
const DEVICE_PATH = Symbol('device path');

function anyDeviceOr(...values: unknown[]): boolean {
  return values.includes(DEVICE_PATH) || anyDevice(...values);
}

type SavedArg = { upProjection: H; activation: H; counts?: number[]; free?: boolean };

function savedArg(h: Handles, options: unknown): { saved?: SavedArg } {
  const o = typeof options === 'object' && options !== null ? (options as DeviceExpertsBackwardOptions) : undefined;
  const saved = o?.saved;
  const free = checkBool(o?.freeSaved, 'options.freeSaved');
  if (free && (saved === undefined || saved === null)) throw new TypeError('options.freeSaved: gives the call options.saved to free, but no options.saved was given');
  if (saved === undefined || saved === null) return {};
  if (typeof saved !== 'object') throw new TypeError(`options.saved: expected { upProjection, activation, counts? } (from expertsForward with saveForBackward), got ${typeof saved}`);
  const arg: SavedArg = { upProjection: h.of(saved.upProjection, 'saved.upProjection', TOKENS), activation: h.of(saved.activation, 'saved.activation', TOKENS) };
  if (saved.counts !== undefined) {
    if (!(saved.counts instanceof Int32Array)) throw new TypeError(`options.saved.counts: expected an Int32Array (expertsForward's saved.counts), got ${Object.prototype.toString.call(saved.counts)}`);
    arg.counts = Array.from(saved.counts);
  }
  if (free) arg.free = true;
  return { saved: arg };
}

/** expertsBackward's `freeTokens`: the device function's flag (permutedTokens a device tensor, no gatherIndices), or a TypeError naming it. */
function givenTokens(permutedTokens: unknown, options: unknown): { freeTokens?: true } {
  if (!checkBool(optionValue(options, 'freeTokens'), 'options.freeTokens')) return {};
  if (!isDeviceTensor(permutedTokens)) throw new TypeError('options.freeTokens: gives the call permutedTokens to free, which must be a device tensor (got a host tensor)');
  if (optionValue(options, 'gatherIndices') !== undefined) {
    throw new TypeError("options.freeTokens: not with options.gatherIndices (permutedTokens are then the tokens in their own order, the caller's)");
  }
  return { freeTokens: true };
}

/** The device functions' `gatherIndices` or `gradGatherIndices` (int32 on the device; a host tensor is uploaded). */
function gatherArg<K extends 'gatherIndices' | 'gradGatherIndices'>(h: Handles, options: unknown, key: K = 'gatherIndices' as K): { [k in K]?: H } {
  const g = h.opt(optionValue(options, key), `options.${key}`, ['int32']);
  return (g === undefined ? {} : { [key]: g }) as { [k in K]?: H };
}

function weightValues(weights: unknown): unknown[] {
  if (typeof weights !== 'object' || weights === null) return [];
  const w = weights as DeviceExpertWeights;
  return [w.gateAndUpProjs, w.upProjs, w.downProjs];
}

export const expertsGpu: GpuFamily = {
  ops: ['expertsForward', 'expertsBackward', 'matmul'],
  present: (addon: Addon) => typeof addon.cudaExpertsForwardDevice === 'function' && typeof addon.cudaMatmulDevice === 'function',
  methods({ base, addon, call }) {
    const gpu = addon as unknown as ExpertsAddon;
    return {
      expertsForward(permutedTokens: unknown, tokensPerExpert: unknown, weights: unknown, options: unknown) {
        // a device tensor as out takes the device path too, to be refused there
        if (!anyDeviceOr(permutedTokens, tokensPerExpert, ...weightValues(weights), ...deviceOptions(options), optionValue(options, 'out'))) {
          return base.expertsForward(permutedTokens as Tensor<TokenDType>, tokensPerExpert as Tensor<'int32'>, weights as ExpertWeights, options as ExpertsForwardOptions);
        }
        noDeviceOut('expertsForward', options);
        return call('expertsForward', (h) => {
          const save = checkBool((options as DeviceExpertsForwardOptions | undefined)?.saveForBackward, 'options.saveForBackward');
          const out = gpu.cudaExpertsForwardDevice({ ...deviceArgs(h, permutedTokens, tokensPerExpert, weights, options, 'expertsForward'), saveForBackward: save, ...gatherArg(h, options) });
          const output = wrapDevice(out.output);
          if (!save) return output;
          // inputs that run on the CPU core instead (mixed dtypes) keep nothing: the backward recomputes
          if (!out.upProjection || !out.activation) return { output };
          const saved: ExpertsSaved = { upProjection: wrapDevice(out.upProjection), activation: wrapDevice(out.activation) };
          if (out.counts) saved.counts = Int32Array.from(out.counts);
          return { output, saved };
        });
      },
      expertsBackward(gradOutput: unknown, permutedTokens: unknown, tokensPerExpert: unknown, weights: unknown, options: unknown) {
        if (!anyDeviceOr(gradOutput, permutedTokens, tokensPerExpert, ...weightValues(weights), ...deviceOptions(options))) {
          return base.expertsBackward(
            gradOutput as Tensor<TokenDType>,
            permutedTokens as Tensor<TokenDType>,
            tokensPerExpert as Tensor<'int32'>,
            weights as ExpertWeights,
            options as ExpertsBackwardOptions,
          );
        }
        return call('expertsBackward', (h) => {
          const given = givenTokens(permutedTokens, options);
          const gh = h.of(gradOutput, 'gradOutput', TOKENS);
          const args = deviceArgs(h, permutedTokens, tokensPerExpert, weights, options, 'expertsBackward');
          const saved = savedArg(h, options);
          const out = wrapResult(gpu.cudaExpertsBackwardDevice({ gradOutput: gh, ...args, ...saved, ...gatherArg(h, options), ...gatherArg(h, options, 'gradGatherIndices'), ...given }));
          if (saved.saved?.free) {
            // given to the call: what it did not free already is freed now
            const s = (options as DeviceExpertsBackwardOptions).saved!;
            s.upProjection.dispose();
            s.activation.dispose();
          }
          // (taken by the call: its handle reads as disposed already)
          if (given.freeTokens) (permutedTokens as DeviceTensor).dispose();
          return expertsGrads(out as unknown as ExpertsGradsOut<DeviceTensor>, args.upProjs !== undefined);
        });
      },
      matmul(a: unknown, b: unknown, options?: unknown) {
        if (!anyDevice(a, b)) return base.matmul(a as Tensor<TokenDType>, b as Tensor<TokenDType>, options as MatmulOptions);
        return call('matmul', (h) => {
          const o = checkOptions<MatmulOptions>(options, 'matmul', ['transA', 'transB']);
          return wrapDevice(gpu.cudaMatmulDevice({ a: h.of(a, 'a', TOKENS), b: h.of(b, 'b', TOKENS), transA: checkBool(o.transA, 'options.transA'), transB: checkBool(o.transB, 'options.transB') }));
        });
      },
    };
  },
};
