/**
 * The cuda backend's layout ops on the GPU (crates/moe-cuda/kernels/layout.cu through
 * crates/moe-node/src/cuda_layout.rs), bit for bit the CPU core's: indicesToMultihot,
 * multihotToIndices, tokensPerExpert, padRoutingMap, dropTokens, sortChunksByIndex (and its
 * backward) and groupedMmSort. Host tensors only: the host op (`ctx.base`). Any device tensor
 * among the tensor arguments: host ones are uploaded for the call, and every tensor result is a
 * device tensor.
 *
 * Arguments are checked in the host ops' order and with their messages (ts/ops/dispatch.ts,
 * ts/ops/layout.ts); the core's checks run in the addon, which falls back to the core on the host
 * for arguments it rejects, so errors are the CPU backend's. The GPU keeps no int64: a host int64
 * index tensor whose values all fit in int32 is converted (same values, so the same results and
 * errors); when one does not, the op runs on the host (device tensors downloaded, results uploaded).
 */
import { wrapDevice, type AnyTensor, type DeviceTensor, type NativeCudaTensor } from '../device.js';
import type { MultihotToIndicesOptions } from '../ops/dispatch.js';
import {
  dropArgs,
  groupedArgs,
  type DropTokensOptions,
  type DropTokensResult,
  type GroupedMmSortOptions,
  type GroupedMmSortResult,
  type SortChunksGrads,
  type SortChunksResult,
} from '../ops/layout.js';
import { isTensor, type IndexDType, type Tensor, type TokenDType } from '../tensor.js';
import { checkNumber, checkOptions, requiredNumber, TOKENS, wire } from '../wire.js';
import { anyDevice, hasFunctions, hostOf, hostOptions, int32Handle, optionValue, wrapResult, type DeviceFn, type GpuContext, type GpuFamily, type Handles } from './cuda-common.js';

/** A host or a device tensor of dtype D. */

/** multihotToIndices' options with a device tensor allowed for `probs`. */
export interface DeviceMultihotToIndicesOptions extends Omit<MultihotToIndicesOptions, 'probs'> {
  probs?: AnyTensor<'float32'>;
}

/** groupedMmSort's options with a device tensor allowed for `tokenMask`. */
export interface DeviceGroupedMmSortOptions extends Omit<GroupedMmSortOptions, 'tokenMask'> {
  tokenMask?: AnyTensor<'bool'>;
}

/** dropTokens' result on the GPU. */
export interface DeviceDropTokensResult {
  routingMap: DeviceTensor<'bool'>;
  probs: DeviceTensor<'float32'>;
  capacity: number;
}

/** groupedMmSort's result on the GPU. */
export interface DeviceGroupedMmSortResult {
  sortedTokenIds: DeviceTensor<'int32'>;
  sortedSlotIds: DeviceTensor<'int32'>;
  sortedWeights: DeviceTensor<'float32'>;
  tokensPerExpert: DeviceTensor<'int32'>;
  offsets: DeviceTensor<'int32'>;
}

/** The layout methods of the cuda backend that take device tensors. */
export interface CudaLayoutOps {
  indicesToMultihot(indices: Tensor<IndexDType>, probs: Tensor<'float32'>, numExperts: number): { routingMap: Tensor<'bool'>; probs: Tensor<'float32'> };
  indicesToMultihot(indices: AnyTensor<IndexDType>, probs: AnyTensor<'float32'>, numExperts: number): { routingMap: DeviceTensor<'bool'>; probs: DeviceTensor<'float32'> };
  multihotToIndices(routingMap: Tensor<'bool'>, options?: MultihotToIndicesOptions): { indices: Tensor<'int32'>; probs: Tensor<'float32'> };
  multihotToIndices(routingMap: AnyTensor<'bool'>, options?: DeviceMultihotToIndicesOptions): { indices: DeviceTensor<'int32'>; probs: DeviceTensor<'float32'> };
  tokensPerExpert(routingMap: Tensor<'bool'>): Tensor<'int32'>;
  tokensPerExpert(routingMap: AnyTensor<'bool'>): DeviceTensor<'int32'>;
  padRoutingMap(routingMap: Tensor<'bool'>, padMultiple: number): Tensor<'bool'>;
  padRoutingMap(routingMap: AnyTensor<'bool'>, padMultiple: number): DeviceTensor<'bool'>;
  dropTokens(probs: Tensor<'float32'>, routingMap: Tensor<'bool'>, options: DropTokensOptions): DropTokensResult;
  dropTokens(probs: AnyTensor<'float32'>, routingMap: AnyTensor<'bool'>, options: DropTokensOptions): DeviceDropTokensResult;
  sortChunksByIndex<D extends TokenDType>(input: Tensor<D>, splitSizes: Tensor<IndexDType>, sortedIdxs: Tensor<IndexDType>, probs?: Tensor<'float32'>): SortChunksResult<D>;
  sortChunksByIndex<D extends TokenDType>(
    input: AnyTensor<D>,
    splitSizes: AnyTensor<IndexDType>,
    sortedIdxs: AnyTensor<IndexDType>,
    probs?: AnyTensor<'float32'>,
  ): { output: DeviceTensor<D>; probs?: DeviceTensor<'float32'> };
  sortChunksByIndexBackward<D extends TokenDType>(gradOutput: Tensor<D>, splitSizes: Tensor<IndexDType>, sortedIdxs: Tensor<IndexDType>, gradProbs?: Tensor<'float32'>): SortChunksGrads<D>;
  sortChunksByIndexBackward<D extends TokenDType>(
    gradOutput: AnyTensor<D>,
    splitSizes: AnyTensor<IndexDType>,
    sortedIdxs: AnyTensor<IndexDType>,
    gradProbs?: AnyTensor<'float32'>,
  ): { gradInput: DeviceTensor<D>; gradProbs?: DeviceTensor<'float32'> };
  groupedMmSort(indices: Tensor<IndexDType>, weights: Tensor<TokenDType>, options: GroupedMmSortOptions): GroupedMmSortResult;
  groupedMmSort(indices: AnyTensor<IndexDType>, weights: AnyTensor<TokenDType>, options: DeviceGroupedMmSortOptions): DeviceGroupedMmSortResult;
}

type H = NativeCudaTensor;

/** The addon functions this family calls (crates/moe-node/src/cuda_layout.rs): the CPU ops' argument objects on device tensors. */
interface LayoutAddon {
  cudaIndicesToMultihotDevice: DeviceFn<'indicesToMultihot'>;
  cudaMultihotToIndicesDevice: DeviceFn<'multihotToIndices'>;
  cudaTokensPerExpertDevice: DeviceFn<'tokensPerExpert'>;
  cudaPadRoutingMapDevice: DeviceFn<'padRoutingMap'>;
  cudaDropTokensDevice: DeviceFn<'dropTokens'>;
  cudaSortChunksByIndexDevice: DeviceFn<'sortChunksByIndex'>;
  cudaSortChunksByIndexBackwardDevice: DeviceFn<'sortChunksByIndexBackward'>;
  cudaGroupedMmSortDevice: DeviceFn<'groupedMmSort'>;
}

/** The chunk sorts' device functions, whose argument keys `sortChunks` names. */
type ChunksFn = (args: Record<string, H | undefined>) => object;

const FUNCTIONS: readonly (keyof LayoutAddon)[] = [
  'cudaIndicesToMultihotDevice',
  'cudaMultihotToIndicesDevice',
  'cudaTokensPerExpertDevice',
  'cudaPadRoutingMapDevice',
  'cudaDropTokensDevice',
  'cudaSortChunksByIndexDevice',
  'cudaSortChunksByIndexBackwardDevice',
  'cudaGroupedMmSortDevice',
];

/** Thrown inside a call to run the op on the host instead (an int64 index beyond int32). */
const ON_HOST = Symbol('on host');

/**
 * An index tensor as a device handle: device tensors as they are; host ones checked as the host
 * op checks them, int64 converted to int32 when every value fits (else ON_HOST is thrown).
 */
function indexHandle(h: Handles, value: unknown, arg: string): H {
  const handle = int32Handle(h, value, arg);
  if (handle === undefined) throw ON_HOST;
  return handle;
}

export const layoutGpu: GpuFamily = {
  ops: ['indicesToMultihot', 'multihotToIndices', 'tokensPerExpert', 'padRoutingMap', 'dropTokens', 'sortChunksByIndex', 'sortChunksByIndexBackward', 'groupedMmSort'],
  present: hasFunctions(FUNCTIONS),
  methods(ctx: GpuContext) {
    const a = ctx.addon as unknown as LayoutAddon;
    const base = ctx.base;
    /** The GPU call, or (ON_HOST) the host op with its tensor results uploaded. */
    const run = <T>(op: string, gpu: (h: Handles) => T, host: () => object): T => {
      try {
        return ctx.call(op, gpu); // ON_HOST is not an Error: callWith rethrows it as it is
      } catch (e) {
        if (e !== ON_HOST) throw e;
      }
      const out = host() as Record<string, unknown>;
      return ctx.call(op, () => {
        const result: Record<string, unknown> = {};
        for (const [k, v] of Object.entries(out)) result[k] = isTensor(v) ? wrapDevice(ctx.addon.cudaUpload(wire(v, k))) : v;
        return result as T;
      });
    };
    /**
     * sortChunksByIndex and its backward (the same chunk moves): `x` (argument `xName`) and the
     * optional per-row `p` (`pName`) through `device`, the op's function on device tensors.
     */
    const sortChunks = (
      op: 'sortChunksByIndex' | 'sortChunksByIndexBackward',
      [xName, pName]: readonly [string, string],
      device: ChunksFn,
      x: unknown,
      splitSizes: unknown,
      sortedIdxs: unknown,
      p: unknown,
    ) => {
      const host = (xv: unknown, sv: unknown, ov: unknown, pv: unknown) =>
        (base[op] as (x: Tensor<TokenDType>, s: Tensor<IndexDType>, o: Tensor<IndexDType>, p?: Tensor<'float32'>) => object).call(
          base,
          xv as Tensor<TokenDType>,
          sv as Tensor<IndexDType>,
          ov as Tensor<IndexDType>,
          pv as Tensor<'float32'> | undefined,
        );
      if (!anyDevice(x, splitSizes, sortedIdxs, p)) return host(x, splitSizes, sortedIdxs, p);
      return run(
        op,
        (h) => {
          const xh = h.of(x, xName, TOKENS);
          const sh = indexHandle(h, splitSizes, 'splitSizes');
          const oh = indexHandle(h, sortedIdxs, 'sortedIdxs');
          return wrapResult(device({ [xName]: xh, splitSizes: sh, sortedIdxs: oh, [pName]: h.opt(p, pName, ['float32']) }));
        },
        () => host(hostOf(x), hostOf(splitSizes), hostOf(sortedIdxs), hostOf(p)),
      );
    };
    return {
      indicesToMultihot(indices: unknown, probs: unknown, numExperts: number) {
        if (!anyDevice(indices, probs)) return base.indicesToMultihot(indices as Tensor<IndexDType>, probs as Tensor<'float32'>, numExperts);
        return run(
          'indicesToMultihot',
          (h) => {
            const ih = indexHandle(h, indices, 'indices');
            return wrapResult(a.cudaIndicesToMultihotDevice({ indices: ih, probs: h.of(probs, 'probs', ['float32']), numExperts: checkNumber(numExperts, 'numExperts') ?? NaN }));
          },
          () => base.indicesToMultihot(hostOf(indices) as Tensor<IndexDType>, hostOf(probs) as Tensor<'float32'>, numExperts),
        );
      },
      multihotToIndices(routingMap: unknown, options?: unknown) {
        if (!anyDevice(routingMap, optionValue(options, 'probs'))) return base.multihotToIndices(routingMap as Tensor<'bool'>, options as MultihotToIndicesOptions);
        return ctx.call('multihotToIndices', (h) => {
          const o = checkOptions<DeviceMultihotToIndicesOptions>(options, 'multihotToIndices', ['probs', 'topk']);
          return wrapResult(a.cudaMultihotToIndicesDevice({ routingMap: h.of(routingMap, 'routingMap', ['bool']), probs: h.opt(o.probs, 'probs', ['float32']), topk: checkNumber(o.topk, 'topk') }));
        });
      },
      tokensPerExpert(routingMap: unknown) {
        if (!anyDevice(routingMap)) return base.tokensPerExpert(routingMap as Tensor<'bool'>);
        return ctx.call('tokensPerExpert', (h) => wrapDevice(a.cudaTokensPerExpertDevice({ routingMap: h.of(routingMap, 'routingMap', ['bool']) })));
      },
      padRoutingMap(routingMap: unknown, padMultiple: number) {
        if (!anyDevice(routingMap)) return base.padRoutingMap(routingMap as Tensor<'bool'>, padMultiple);
        return ctx.call('padRoutingMap', (h) =>
          wrapDevice(a.cudaPadRoutingMapDevice({ routingMap: h.of(routingMap, 'routingMap', ['bool']), padMultiple: requiredNumber(padMultiple, 'padMultiple') })),
        );
      },
      dropTokens(probs: unknown, routingMap: unknown, options: unknown) {
        if (!anyDevice(probs, routingMap)) return base.dropTokens(probs as Tensor<'float32'>, routingMap as Tensor<'bool'>, options as DropTokensOptions);
        return ctx.call('dropTokens', (h) => {
          const o = checkOptions<DropTokensOptions>(options, 'dropTokens', ['topk', 'capacityFactor', 'dropPolicy', 'padToCapacity']);
          return wrapResult(a.cudaDropTokensDevice({ probs: h.of(probs, 'probs', ['float32']), routingMap: h.of(routingMap, 'routingMap', ['bool']), ...dropArgs(o) }));
        });
      },
      sortChunksByIndex(input: unknown, splitSizes: unknown, sortedIdxs: unknown, probs?: unknown) {
        return sortChunks('sortChunksByIndex', ['input', 'probs'], a.cudaSortChunksByIndexDevice as ChunksFn, input, splitSizes, sortedIdxs, probs);
      },
      sortChunksByIndexBackward(gradOutput: unknown, splitSizes: unknown, sortedIdxs: unknown, gradProbs?: unknown) {
        return sortChunks('sortChunksByIndexBackward', ['gradOutput', 'gradProbs'], a.cudaSortChunksByIndexBackwardDevice as ChunksFn, gradOutput, splitSizes, sortedIdxs, gradProbs);
      },
      groupedMmSort(indices: unknown, weights: unknown, options: unknown) {
        if (!anyDevice(indices, weights, optionValue(options, 'tokenMask'))) return base.groupedMmSort(indices as Tensor<IndexDType>, weights as Tensor<TokenDType>, options as GroupedMmSortOptions);
        return run(
          'groupedMmSort',
          (h) => {
            const o = checkOptions<DeviceGroupedMmSortOptions>(options, 'groupedMmSort', ['tokenMask', 'numLocalExperts', 'expertsStartIdx']);
            return wrapResult(a.cudaGroupedMmSortDevice({ indices: indexHandle(h, indices, 'indices'), weights: h.of(weights, 'weights', TOKENS), ...groupedArgs(o, h) }));
          },
          () => base.groupedMmSort(hostOf(indices) as Tensor<IndexDType>, hostOf(weights) as Tensor<TokenDType>, hostOptions(options, 'tokenMask') as GroupedMmSortOptions),
        );
      },
    };
  },
};
