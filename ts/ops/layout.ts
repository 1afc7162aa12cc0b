/**
 * Capacity, padding, chunk sort, grouped-GEMM preparation and expert sharding: the
 * interface, and its adapter over a binding. All the arithmetic is the Rust core's.
 */
import { checkTensor, type DType, type IndexDType, type Tensor, type TokenDType } from '../tensor.js';
import type { Binding, Placed } from '../generated/binding.js';
import { checkBool, checkNumber, checkOptions, INDICES, optString, optWire, requiredNumber, TOKENS, wire, WIRE, type AnyTensors, type Call, type TensorArgs } from '../wire.js';

/** How `dropTokens` chooses the tokens an over-full expert keeps. */
export type DropPolicy = 'probs' | 'position';

export interface DropTokensOptions {
  /** Experts per token (required); the capacity is computed for `numTokens * topk` entries. */
  topk: number;
  /** Capacity factor (required): finite, >= 0. */
  capacityFactor: number;
  /**
   * `'probs'` (default): keep the `capacity` tokens with the highest prob, ties to the lower
   * token id. `'position'`: keep the first `capacity` routed tokens by token id.
   */
  dropPolicy?: DropPolicy;
  /** The output map is the capacity mask itself, so unselected tokens pad every expert to `capacity`. */
  padToCapacity?: boolean;
}

export interface DropTokensResult {
  /** `[T, E]`: the routing map after dropping (and padding). */
  routingMap: Tensor<'bool'>;
  /** `[T, E]`: `probs * routingMap`. */
  probs: Tensor<'float32'>;
  /** `getCapacity(T * topk, E, capacityFactor)`. */
  capacity: number;
}

export interface SortChunksResult<D extends TokenDType = TokenDType> {
  /** `[N, H]`: the chunks in the order `sortedIdxs` (a bit-exact copy). */
  output: Tensor<D>;
  /** `[N]`, when probs were given: they move with their rows. */
  probs?: Tensor<'float32'>;
}

export interface SortChunksGrads<D extends TokenDType = TokenDType> {
  /** `[N, H]`: the gradient of the input (chunks back in their original order). */
  gradInput: Tensor<D>;
  /** `[N]`, when `gradProbs` was given. */
  gradProbs?: Tensor<'float32'>;
}

export interface GroupedMmSortOptions {
  /** `[T]`: tokens to compute; a false token counts as -1 in every slot. Default: all. */
  tokenMask?: Tensor<'bool'>;
  /** Experts on this rank (required). */
  numLocalExperts: number;
  /** Global id of this rank's first expert. Default 0. */
  expertsStartIdx?: number;
}

export interface GroupedMmSortResult {
  /** `[S]`: the token of each selected slot, grouped by local expert (stable within an expert). */
  sortedTokenIds: Tensor<'int32'>;
  /** `[S]`: the flat slot id `t * k + j` of each selected slot. */
  sortedSlotIds: Tensor<'int32'>;
  /** `[S]`: `weights[t, j]` of each selected slot, as float32. */
  sortedWeights: Tensor<'float32'>;
  /** `[numLocalExperts]`: slots per local expert. */
  tokensPerExpert: Tensor<'int32'>;
  /** `[numLocalExperts]`: inclusive cumulative sum of `tokensPerExpert` (the `offs` of a grouped GEMM). */
  offsets: Tensor<'int32'>;
}

/** Experts `[start, end)`. */
export interface ExpertRange {
  start: number;
  end: number;
}

export interface ExpertTensor<D extends DType = DType> {
  /** Global expert id. */
  expertId: number;
  /** The expert's slice, without the expert dimension. */
  tensor: Tensor<D>;
}

/** A named device-mesh axis (e.g. `'ep'`, `'ep_shard'`, `'ep_replicate'`) and its size. */
export interface MeshAxis {
  name: string;
  size: number;
}

/** A tensor's placement on one mesh axis: sharded along a dimension, or replicated. */
export type Placement = 'replicate' | `shard(${number})`;

/** A mesh with one placement per axis. */
export interface PlacedMesh {
  mesh: MeshAxis[];
  placements: Placement[];
}

export interface LayoutOps {
  /** `max(ceil(numTokens / numExperts * capacityFactor), minCapacity)`, in the reference's float64 steps. */
  getCapacity(numTokens: number, numExperts: number, capacityFactor: number, minCapacity?: number): number;
  /** Megatron-Core token dropping: every expert keeps at most `capacity` tokens. */
  dropTokens(probs: Tensor<'float32'>, routingMap: Tensor<'bool'>, options: DropTokensOptions): DropTokensResult;
  /** Routes, per expert, the lowest-id unselected tokens until its count is a multiple of `padMultiple`. */
  padRoutingMap(routingMap: Tensor<'bool'>, padMultiple: number): Tensor<'bool'>;
  /** Column sums of a routing map `[T, E]`: `[E]`. */
  tokensPerExpert(routingMap: Tensor<'bool'>): Tensor<'int32'>;
  /**
   * Splits `input [N, H]` into consecutive chunks of `splitSizes` rows and outputs them in the
   * order `sortedIdxs` (a permutation of the chunk ids); `probs [N]` move with their rows.
   */
  sortChunksByIndex<D extends TokenDType>(input: Tensor<D>, splitSizes: Tensor<IndexDType>, sortedIdxs: Tensor<IndexDType>, probs?: Tensor<'float32'>): SortChunksResult<D>;
  /** Backward of `sortChunksByIndex` (same `splitSizes` and `sortedIdxs`): the inverse copy. */
  sortChunksByIndexBackward<D extends TokenDType>(gradOutput: Tensor<D>, splitSizes: Tensor<IndexDType>, sortedIdxs: Tensor<IndexDType>, gradProbs?: Tensor<'float32'>): SortChunksGrads<D>;
  /**
   * The routing slots of `indices [T, k]` (-1 = masked) whose expert is local
   * (`[expertsStartIdx, expertsStartIdx + numLocalExperts)`), stably grouped by expert.
   */
  groupedMmSort(indices: Tensor<IndexDType>, weights: Tensor<TokenDType>, options: GroupedMmSortOptions): GroupedMmSortResult;
  /** The experts rank `epRank` of `epSize` owns (the first `numExperts % epSize` ranks own one more). */
  expertRangeForRank(numExperts: number, epSize: number, epRank: number): ExpertRange;
  /** Whether rank `epRank` owns expert `expertId`. */
  shouldLoadExpert(expertId: number, numExperts: number, epSize: number, epRank: number): boolean;
  /** This rank's stacked experts `[end - start, ...]` as per-expert tensors with their global ids (bit-exact). */
  splitExpertWeights<D extends DType>(stacked: Tensor<D>, numExperts: number, epSize: number, epRank: number): ExpertTensor<D>[];
  /**
   * Checks the expert dimension of a tensor held by rank `epRank` and returns the experts it
   * holds: `[start, end)` of the rank when dim 0 is the rank's count (sharded), `[0,
   * numExperts)` when it is `numExperts` (replicated). With `placement` (the tensor's last
   * placement) only the matching count passes, and only `shard(0)` and `replicate` are valid.
   * Errors name the tensor by `name` (default `'tensor'`).
   */
  validateExpertSharding(tensorOrShape: Tensor | readonly number[], numExperts: number, epSize: number, epRank: number, name?: string, placement?: Placement): ExpertRange;
  /** Placements of an expert tensor `[E, ...]` on an expert mesh (axes `ep`, `ep_shard`, `ep_replicate`). */
  expertPlacements(mesh: readonly MeshAxis[]): PlacedMesh;
  /** Placements of the per-expert tensors after `splitExpertWeights`; `null` where they are plain local tensors. */
  splitPlacements(mesh: readonly MeshAxis[], placements: readonly Placement[]): PlacedMesh | null;
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type LayoutBinding = Pick<
  Binding,
  | 'getCapacity'
  | 'dropTokens'
  | 'padRoutingMap'
  | 'tokensPerExpert'
  | 'sortChunksByIndex'
  | 'sortChunksByIndexBackward'
  | 'groupedMmSort'
  | 'expertRangeForRank'
  | 'shouldLoadExpert'
  | 'splitExpertWeights'
  | 'validateExpertSharding'
  | 'expertPlacements'
  | 'splitPlacements'
>;

/** napi-rs gives `null` for an absent optional field, wasm `undefined`: both become a missing key. */
function dropAbsent<T extends object>(out: T, key: keyof T): T {
  if (out[key] === undefined || out[key] === null) delete out[key];
  return out;
}

function meshWire(mesh: unknown): { axisNames: string[]; axisSizes: number[] } {
  if (!Array.isArray(mesh)) throw new TypeError(`mesh: expected an array of { name, size }, got ${typeof mesh}`);
  const names: string[] = [];
  const sizes: number[] = [];
  mesh.forEach((axis: unknown, i) => {
    if (typeof axis !== 'object' || axis === null) throw new TypeError(`mesh[${i}]: expected { name, size }, got ${axis === null ? 'null' : typeof axis}`);
    const { name, size } = axis as Partial<MeshAxis>;
    if (typeof name !== 'string') throw new TypeError(`mesh[${i}].name: expected a string, got ${typeof name}`);
    names.push(name);
    sizes.push(requiredNumber(size, `mesh[${i}].size`));
  });
  return { axisNames: names, axisSizes: sizes };
}

function placementsWire(placements: unknown): string[] {
  if (!Array.isArray(placements)) throw new TypeError(`placements: expected an array of 'replicate' / 'shard(<dim>)', got ${typeof placements}`);
  return placements.map((p: unknown, i) => {
    if (typeof p !== 'string') throw new TypeError(`placements[${i}]: expected a string, got ${typeof p}`);
    return p;
  });
}

function placed(p: Placed): PlacedMesh {
  return { mesh: p.axisNames.map((name, i) => ({ name, size: p.axisSizes[i] })), placements: [...p.placements] as Placement[] };
}

function shapeOf(value: unknown, name: string | undefined): number[] {
  if (Array.isArray(value)) {
    return value.map((d: unknown, i) => requiredNumber(d, `${name ?? 'tensor'}.shape[${i}]`));
  }
  return [...checkTensor(value, name ?? 'tensor').shape];
}

/** dropTokens' options as the bindings take them. */
export function dropArgs(o: Partial<DropTokensOptions>) {
  return {
    topk: requiredNumber(o.topk, 'options.topk'),
    capacityFactor: requiredNumber(o.capacityFactor, 'options.capacityFactor'),
    dropPolicy: optString(o.dropPolicy, 'options.dropPolicy'),
    padToCapacity: checkBool(o.padToCapacity, 'options.padToCapacity'),
  };
}

/** groupedMmSort's options as the bindings take them (`t`: how tokenMask goes in). */
export function groupedArgs<T>(o: Partial<AnyTensors<GroupedMmSortOptions, 'tokenMask'>>, t: TensorArgs<T>) {
  return {
    tokenMask: t.opt(o.tokenMask, 'tokenMask', ['bool']),
    numLocalExperts: requiredNumber(o.numLocalExperts, 'options.numLocalExperts'),
    expertsStartIdx: checkNumber(o.expertsStartIdx, 'options.expertsStartIdx'),
  };
}

export function layoutOps(call: Call<LayoutBinding>): LayoutOps {
  return {
    getCapacity(numTokens, numExperts, capacityFactor, minCapacity) {
      return call('getCapacity', (b) =>
        b.getCapacity({
          numTokens: requiredNumber(numTokens, 'numTokens'),
          numExperts: requiredNumber(numExperts, 'numExperts'),
          capacityFactor: requiredNumber(capacityFactor, 'capacityFactor'),
          minCapacity: checkNumber(minCapacity, 'minCapacity'),
        }),
      );
    },
    dropTokens(probs, routingMap, options) {
      return call('dropTokens', (b) => {
        const o = checkOptions<DropTokensOptions>(options, 'dropTokens', ['topk', 'capacityFactor', 'dropPolicy', 'padToCapacity']);
        return b.dropTokens({
          probs: wire(probs, 'probs', ['float32']),
          routingMap: wire(routingMap, 'routingMap', ['bool']),
          ...dropArgs(o),
        });
      }) as DropTokensResult;
    },
    padRoutingMap(routingMap, padMultiple) {
      return call('padRoutingMap', (b) => b.padRoutingMap({ routingMap: wire(routingMap, 'routingMap', ['bool']), padMultiple: requiredNumber(padMultiple, 'padMultiple') })) as Tensor<'bool'>;
    },
    tokensPerExpert(routingMap) {
      return call('tokensPerExpert', (b) => b.tokensPerExpert({ routingMap: wire(routingMap, 'routingMap', ['bool']) })) as Tensor<'int32'>;
    },
    sortChunksByIndex(input, splitSizes, sortedIdxs, probs) {
      return call('sortChunksByIndex', (b) =>
        dropAbsent(
          b.sortChunksByIndex({
            input: wire(input, 'input', TOKENS),
            splitSizes: wire(splitSizes, 'splitSizes', INDICES),
            sortedIdxs: wire(sortedIdxs, 'sortedIdxs', INDICES),
            probs: optWire(probs, 'probs', ['float32']),
          }),
          'probs',
        ),
      ) as SortChunksResult<never>;
    },
    sortChunksByIndexBackward(gradOutput, splitSizes, sortedIdxs, gradProbs) {
      return call('sortChunksByIndexBackward', (b) =>
        dropAbsent(
          b.sortChunksByIndexBackward({
            gradOutput: wire(gradOutput, 'gradOutput', TOKENS),
            splitSizes: wire(splitSizes, 'splitSizes', INDICES),
            sortedIdxs: wire(sortedIdxs, 'sortedIdxs', INDICES),
            gradProbs: optWire(gradProbs, 'gradProbs', ['float32']),
          }),
          'gradProbs',
        ),
      ) as SortChunksGrads<never>;
    },
    groupedMmSort(indices, weights, options) {
      return call('groupedMmSort', (b) => {
        const o = checkOptions<GroupedMmSortOptions>(options, 'groupedMmSort', ['tokenMask', 'numLocalExperts', 'expertsStartIdx']);
        return b.groupedMmSort({
          indices: wire(indices, 'indices', INDICES),
          weights: wire(weights, 'weights', TOKENS),
          ...groupedArgs(o, WIRE),
        });
      }) as GroupedMmSortResult;
    },
    expertRangeForRank(numExperts, epSize, epRank) {
      return call('expertRangeForRank', (b) => {
        const { start, end } = b.expertRangeForRank({ numExperts: requiredNumber(numExperts, 'numExperts'), epSize: requiredNumber(epSize, 'epSize'), epRank: requiredNumber(epRank, 'epRank') });
        return { start, end };
      });
    },
    shouldLoadExpert(expertId, numExperts, epSize, epRank) {
      return call('shouldLoadExpert', (b) =>
        b.shouldLoadExpert({
          expertId: requiredNumber(expertId, 'expertId'),
          numExperts: requiredNumber(numExperts, 'numExperts'),
          epSize: requiredNumber(epSize, 'epSize'),
          epRank: requiredNumber(epRank, 'epRank'),
        }),
      );
    },
    splitExpertWeights(stacked, numExperts, epSize, epRank) {
      return call('splitExpertWeights', (b) =>
        b
          .splitExpertWeights({
            stacked: wire(stacked, 'stacked'),
            numExperts: requiredNumber(numExperts, 'numExperts'),
            epSize: requiredNumber(epSize, 'epSize'),
            epRank: requiredNumber(epRank, 'epRank'),
          })
          .map(({ expertId, tensor }) => ({ expertId, tensor })),
      ) as ExpertTensor<never>[];
    },
    validateExpertSharding(tensorOrShape, numExperts, epSize, epRank, name, placement) {
      return call('validateExpertSharding', (b) => {
        const n = optString(name, 'name');
        const { start, end } = b.validateExpertSharding({
          shape: shapeOf(tensorOrShape, n),
          numExperts: requiredNumber(numExperts, 'numExperts'),
          epSize: requiredNumber(epSize, 'epSize'),
          epRank: requiredNumber(epRank, 'epRank'),
          name: n,
          placement: optString(placement, 'placement'),
        });
        return { start, end };
      });
    },
    expertPlacements(mesh) {
      return call('expertPlacements', (b) => placed(b.expertPlacements(meshWire(mesh))));
    },
    splitPlacements(mesh, placements) {
      return call('splitPlacements', (b) => {
        const out = b.splitPlacements({ ...meshWire(mesh), placements: placementsWire(placements) });
        return out === null || out === undefined ? null : placed(out);
      });
    },
  };
}
