/**
 * The cuda backend's expert activations (forward, backward) and aux router losses on the GPU
 * (crates/moe-cuda/kernels/activations.cu through crates/moe-node/src/cuda_activations.rs), bit for bit the CPU
 * core's. Host tensors only: the host op (`ctx.base`). Any device tensor among the tensor
 * arguments: host ones are uploaded for the call, and every tensor result is a device tensor (the
 * losses' `loss` is a number, read back from the GPU; with `lazyLoss`, read when it is first read).
 *
 * Arguments are checked by the host ops' own argument builders (activationArgs, switchArgs of
 * ts/ops/activations.ts, ts/ops/routing.ts), so in their order and with their messages; the core's checks run in the addon, which falls back to the core on the host
 * for arguments it rejects, so errors are the CPU backend's.
 */
import { wrapDevice, type AnyTensor, type DeviceTensor, type NativeCudaTensor } from '../device.js';
import { activationArgs, type ActivationGrads, type ActivationOptions } from '../ops/activations.js';
import { switchArgs, type SwitchLoadBalancingLossOptions, type ZLossOptions } from '../ops/routing.js';
import type { IndexDType, Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkNumber, checkOptions, TOKENS, wire } from '../wire.js';
import { anyDevice, hasFunctions, hostOf, hostOptions, int32Handle, optionValue, type DeviceFn, type GpuContext, type GpuFamily, type Handles } from './cuda-common.js';

/** A host or a device tensor of dtype D. */

/** activation's options with a device tensor allowed for `probs`. */
export interface DeviceActivationOptions extends Omit<ActivationOptions, 'probs'> {
  probs?: AnyTensor<'float32'>;
}

/** What the losses on device tensors add to their options. */
export interface LazyLossOption {
  /**
   * Leave the loss on the GPU: the call queues its kernels and returns at once (no
   * synchronisation); `loss` is read from the GPU when it is first read (a synchronisation then;
   * never, if nothing reads it). The input values (non-finite probs, negative counts, mask
   * bytes) are checked at that read: an invalid one makes reading `loss` throw the op's error,
   * and the gradient is then not to be used. Dtype and shape errors are thrown by the call, as
   * without it. The inputs must still be alive when `loss` is read and an input was invalid.
   */
  lazyLoss?: boolean;
}

/** The Switch losses' options with a device tensor allowed for `tokenMask`. */
export interface DeviceSwitchLoadBalancingLossOptions extends Omit<SwitchLoadBalancingLossOptions, 'tokenMask'>, LazyLossOption {
  tokenMask?: AnyTensor<'bool'>;
}

/** zLoss's options with a device tensor allowed for `tokenMask`. */
export interface DeviceZLossOptions extends Omit<ZLossOptions, 'tokenMask'>, LazyLossOption {
  tokenMask?: AnyTensor<'bool'>;
}

/** The activations methods of the cuda backend that take device tensors. */
export interface CudaActivationsOps {
  activation<D extends TokenDType>(x: Tensor<D>, options: ActivationOptions): Tensor<D>;
  activation<D extends TokenDType>(x: AnyTensor<D>, options: DeviceActivationOptions): DeviceTensor<D>;
  activationBackward<D extends TokenDType>(grad: Tensor<D>, x: Tensor<D>, options: ActivationOptions): ActivationGrads<D>;
  activationBackward<D extends TokenDType>(grad: AnyTensor<D>, x: AnyTensor<D>, options: DeviceActivationOptions): { gradInput: DeviceTensor<D>; gradProbs?: DeviceTensor<'float32'> };
  switchLoadBalancingLoss(probs: Tensor<'float32'>, tokensPerExpert: Tensor<IndexDType>, options: SwitchLoadBalancingLossOptions): { loss: number; gradProbs: Tensor<'float32'> };
  switchLoadBalancingLoss(probs: AnyTensor<'float32'>, tokensPerExpert: AnyTensor<IndexDType>, options: DeviceSwitchLoadBalancingLossOptions): { loss: number; gradProbs: DeviceTensor<'float32'> };
  switchLoadBalancingLossFromLogits(logits: Tensor<'float32'>, tokensPerExpert: Tensor<IndexDType>, options: SwitchLoadBalancingLossOptions): { loss: number; gradLogits: Tensor<'float32'> };
  switchLoadBalancingLossFromLogits(
    logits: AnyTensor<'float32'>,
    tokensPerExpert: AnyTensor<IndexDType>,
    options: DeviceSwitchLoadBalancingLossOptions,
  ): { loss: number; gradLogits: DeviceTensor<'float32'> };
  zLoss(logits: Tensor<'float32'>, options?: ZLossOptions): { loss: number; gradLogits: Tensor<'float32'> };
  zLoss(logits: AnyTensor<'float32'>, options?: DeviceZLossOptions): { loss: number; gradLogits: DeviceTensor<'float32'> };
}

type H = NativeCudaTensor;

/** A loss function's result: `loss`, or with lazyLoss `lossWords` (the result words on the GPU). */
type LossOut<K extends string> = { loss?: number; lossWords?: H } & Record<K, H>;

/** The addon functions this family calls (crates/moe-node/src/cuda_activations.rs): the CPU ops' argument objects on device tensors. */
interface ActivationsAddon {
  cudaActivationDevice: DeviceFn<'activation'>;
  cudaActivationBackwardDevice: DeviceFn<'activationBackward'>;
  cudaSwitchLoadBalancingLossDevice(args: object): LossOut<'gradProbs'>;
  cudaSwitchLoadBalancingLossFromLogitsDevice(args: object): LossOut<'gradLogits'>;
  cudaZLossDevice(args: object): LossOut<'gradLogits'>;
  cudaReadLoss(args: { words: H }): number | null;
}

const FUNCTIONS: readonly (keyof ActivationsAddon)[] = [
  'cudaActivationDevice',
  'cudaActivationBackwardDevice',
  'cudaSwitchLoadBalancingLossDevice',
  'cudaSwitchLoadBalancingLossFromLogitsDevice',
  'cudaZLossDevice',
  'cudaReadLoss',
];

/** `options` without lazyLoss (the host ops' own options), and lazyLoss checked. */
function splitLazy(options: unknown): [unknown, boolean] {
  if (typeof options !== 'object' || options === null || !('lazyLoss' in options)) return [options, false];
  const { lazyLoss, ...rest } = options as LazyLossOption;
  return [rest, checkBool(lazyLoss, 'options.lazyLoss') ?? false];
}

/** tokensPerExpert as a device handle (int32Handle: undefined when int64 counts do not fit in int32). */
function countsHandle(h: Handles, value: unknown): H | undefined {
  return int32Handle(h, value, 'tokensPerExpert');
}

export const activationsGpu: GpuFamily = {
  ops: ['activation', 'activationBackward', 'switchLoadBalancingLoss', 'switchLoadBalancingLossFromLogits', 'zLoss'],
  present: hasFunctions(FUNCTIONS),
  methods(ctx: GpuContext) {
    const a = ctx.addon as unknown as ActivationsAddon;
    const base = ctx.base;
    /**
     * A loss op's result: `loss` a number, or with lazyLoss a getter that reads the GPU's words
     * once; where a kernel flagged an input value, `eager` (the op without lazyLoss, whose host
     * path throws the core's error).
     */
    const lossResult = <K extends string>(op: string, out: LossOut<K>, key: K, eager: () => { loss: number }) => {
      const result = { [key]: wrapDevice(out[key]) } as Record<K, DeviceTensor> & { loss: number };
      const words = out.lossWords;
      if (words === undefined) {
        result.loss = out.loss as number;
        return result;
      }
      let value: number | undefined;
      Object.defineProperty(result, 'loss', {
        enumerable: true,
        get: () => {
          if (value === undefined) {
            const read = ctx.call(op, () => a.cudaReadLoss({ words }));
            value = read ?? eager().loss;
            // read once: its words are freed now (unread, the garbage collector frees them)
            words.dispose();
          }
          return value;
        },
      });
      // (not enumerable) frees the words unread, where the loss is not wanted after all (a forward that failed)
      Object.defineProperty(result, 'dispose', { value: () => value === undefined && words.dispose() });
      return result;
    };
    /** A Switch loss whose int64 counts do not fit in int32: the host op, its gradient uploaded. */
    const switchOnHost = <K extends 'gradProbs' | 'gradLogits'>(op: 'switchLoadBalancingLoss' | 'switchLoadBalancingLossFromLogits', key: K, x: unknown, counts: unknown, options: unknown) => {
      const f = base[op] as (x: Tensor<'float32'>, c: Tensor<IndexDType>, o: SwitchLoadBalancingLossOptions) => Record<K, Tensor> & { loss: number };
      const out = f(hostOf(x) as Tensor<'float32'>, counts as Tensor<IndexDType>, hostOptions(options, 'tokenMask') as SwitchLoadBalancingLossOptions);
      return ctx.call(op, () => ({ loss: out.loss, [key]: wrapDevice(ctx.addon.cudaUpload(wire(out[key], key))) }));
    };
    /** A Switch loss (of probs or of logits, `xName`) with a device tensor among its arguments: `device` on the GPU, or switchOnHost. */
    const switchLoss = <K extends 'gradProbs' | 'gradLogits'>(
      op: 'switchLoadBalancingLoss' | 'switchLoadBalancingLossFromLogits',
      xName: 'probs' | 'logits',
      key: K,
      device: (x: H, counts: H, options: ReturnType<typeof switchArgs<H>> & { lazyLoss: boolean }) => LossOut<K>,
      x: unknown,
      tokensPerExpert: unknown,
      allOptions: unknown,
    ): unknown => {
      const [options, lazy] = ctx.call(op, () => splitLazy(allOptions));
      if (!anyDevice(x, tokensPerExpert, optionValue(options, 'tokenMask'))) {
        const f = base[op] as (x: Tensor<'float32'>, c: Tensor<IndexDType>, o: SwitchLoadBalancingLossOptions) => unknown;
        return f.call(base, x as Tensor<'float32'>, tokensPerExpert as Tensor<IndexDType>, options as SwitchLoadBalancingLossOptions);
      }
      let onHost = false;
      const result: unknown = ctx.call(op, (h) => {
        const xh = h.of(x, xName, ['float32']);
        const ch = countsHandle(h, tokensPerExpert);
        if (ch === undefined) {
          onHost = true;
          return;
        }
        const out = device(xh, ch, { ...switchArgs(options, op, h), lazyLoss: lazy });
        return lossResult(op, out, key, () => switchLoss(op, xName, key, device, x, tokensPerExpert, options) as { loss: number });
      });
      return onHost ? switchOnHost(op, key, x, tokensPerExpert, options) : result;
    };
    const zLoss = (logits: unknown, allOptions?: unknown): unknown => {
      const [options, lazyLoss] = ctx.call('zLoss', () => splitLazy(allOptions));
      if (!anyDevice(logits, optionValue(options, 'tokenMask'))) return base.zLoss(logits as Tensor<'float32'>, options as ZLossOptions);
      return ctx.call('zLoss', (h) => {
        const lh = h.of(logits, 'logits', ['float32']);
        const o = checkOptions<DeviceZLossOptions>(options, 'zLoss', ['coeff', 'tokenMask']);
        const out = a.cudaZLossDevice({ logits: lh, coeff: checkNumber(o.coeff, 'options.coeff'), tokenMask: h.opt(o.tokenMask, 'tokenMask', ['bool']), lazyLoss });
        return lossResult('zLoss', out, 'gradLogits', () => zLoss(logits, options) as { loss: number });
      });
    };

    return {
      activation(x: unknown, options: unknown) {
        if (!anyDevice(x, optionValue(options, 'probs'))) return base.activation(x as Tensor<TokenDType>, options as ActivationOptions);
        return ctx.call('activation', (h) => {
          const xh = h.of(x, 'x', TOKENS);
          return wrapDevice(a.cudaActivationDevice({ x: xh, ...activationArgs(options, 'activation', h) }));
        });
      },
      activationBackward(grad: unknown, x: unknown, options: unknown) {
        if (!anyDevice(grad, x, optionValue(options, 'probs'))) return base.activationBackward(grad as Tensor<TokenDType>, x as Tensor<TokenDType>, options as ActivationOptions);
        return ctx.call('activationBackward', (h) => {
          const gh = h.of(grad, 'grad', TOKENS);
          const xh = h.of(x, 'x', TOKENS);
          const out = a.cudaActivationBackwardDevice({ grad: gh, x: xh, ...activationArgs(options, 'activationBackward', h) });
          const result: { gradInput: DeviceTensor; gradProbs?: DeviceTensor } = { gradInput: wrapDevice(out.gradInput) };
          if (out.gradProbs) result.gradProbs = wrapDevice(out.gradProbs);
          return result;
        });
      },
      switchLoadBalancingLoss(probs: unknown, tokensPerExpert: unknown, options: unknown) {
        return switchLoss('switchLoadBalancingLoss', 'probs', 'gradProbs', (x, c, o) => a.cudaSwitchLoadBalancingLossDevice({ probs: x, tokensPerExpert: c, ...o }), probs, tokensPerExpert, options);
      },
      switchLoadBalancingLossFromLogits(logits: unknown, tokensPerExpert: unknown, options: unknown) {
        return switchLoss(
          'switchLoadBalancingLossFromLogits',
          'logits',
          'gradLogits',
          (x, c, o) => a.cudaSwitchLoadBalancingLossFromLogitsDevice({ logits: x, tokensPerExpert: c, ...o }),
          logits,
          tokensPerExpert,
          options,
        );
      },
      zLoss,
    };
  },
};
