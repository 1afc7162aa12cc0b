/**
 * Expert parallelism: the experts of a layer spread over the ranks of a group (rank `j` holds
 * `expertRangeForRank(numExperts, size, j)`), each rank's tokens moved to the ranks that hold
 * their experts and the experts' outputs moved back.
 *
 *   dispatch(group, moe, tokens, { indices, weights }, { numExperts })
 *     -> { permutedTokens, permutedProbs, tokensPerExpert, handle }   this rank's experts' tokens, expert-major
 *   combine(group, moe, expertOutputs, handle) -> output [T, H]      merged in the original token order
 *   combineBackward / dispatchBackward: the same exchanges in reverse, for the gradients.
 *
 * Everything here is the layout (built from Backend ops: permute by destination rank, permute
 * by local expert, unpermute, permuteBackward, unpermuteBackward), shared by every group; a
 * group only moves bytes: an all-gather of small int32 arrays (the counts) and an
 * all-to-all-v of byte buffers ({@link ExpertParallelGroup}). `createInProcessGroup(n)` gives
 * `n` ranks in one process (CI, the browser); `createExpertParallelGroup` (ts/ep-nccl.ts, Node)
 * N processes over NCCL.
 *
 * The exchanges, per call:
 * - dispatch: all-gather of `[numExperts, k, hidden, dtype, where the tokens live, tokens for
 *   rank 0..N-1, picks for rank 0..N-1]`, then one all-to-all-v: each token goes once to each
 *   rank that holds at least one of its experts (its row, then its k picks as that rank's local
 *   expert ids, -1 for the others, and their weights; with the send side on the GPU, three
 *   device all-to-alls: rows, picks, weights). The receiver permutes what it got (in source-rank order, tokens ascending) by
 *   local expert, so each expert's block holds its tokens ordered by (source rank, token).
 * - combine: each rank merges the outputs of a received token's local experts (weighted by
 *   the probs, in expert order: `unpermute`) into one row, sends it back; the source sums the
 *   rows of a token in rank order (`unpermute` of the rows grouped by rank).
 * - combineBackward: the output gradient of each token goes to the ranks that had it; the
 *   slots' gradients are `unpermuteBackward`'s (the same bits as on one rank; unweighted, a
 *   copy of each received row to its slots: the receive side's permute again).
 * - dispatchBackward: each rank sums a received token's slot gradients (`permuteBackward`),
 *   sends the row back with the picks' prob gradients; the source sums the rows in rank order.
 *
 * Merge order (what differs from one rank): combine's output row of token t is
 * `round(sum_j round(sum_{e in rank j's experts, ascending} y_e * p_e))`, the sums in float32
 * from +0 in the order shown and `round` to the tokens' dtype; on one rank it is
 * `round(sum_e y_e * p_e)` over all its experts ascending. The two agree bit for bit when a
 * token's experts all live on one rank (always with one rank), and in float32 when it has at
 * most two (a + b either way); otherwise the float32 sums are associated differently (float32
 * rounding of the per-rank partial sums) and 16-bit dtypes also round each rank's partial once. dispatchBackward's token gradients are merged the same
 * way; dispatch, combineBackward and the weights' gradients equal the one-rank path bit for bit.
 * The order is fixed (ranks ascending, whatever order they arrive in), so results are
 * bit-identical from run to run.
 */
import type { Backend } from './backend.js';
import type { TopKRouting } from './dispatcher.js';
import type { ExpertRange } from './ops/layout.js';
import type { CudaTrainOps } from './backends/cuda-train.js';
import { type AnyTensor, type DeviceTensor, isDeviceTensor } from './device.js';
import { checkTensor, type IndexDType, type Tensor, type TokenDType } from './tensor.js';
import { checkBool, checkOptions, TOKENS } from './wire.js';

/**
 * One rank's handle on a group of `size` ranks: what `dispatch`, `combine` and their backward
 * passes need from a transport. Every rank must make the same collective calls in the same
 * order (as with NCCL); calls are asynchronous and resolve when every rank has made its part.
 */
export interface ExpertParallelGroup {
  /** This rank, `0 <= rank < size`. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly size: number;
  /**
   * All-gather: every rank gives an Int32Array of the same length; each gets all of them,
   * indexed by rank. `label` (what the call is for: `'dispatch'`, ...) is for error messages.
   */
  allGather(values: Int32Array, label?: string): Promise<Int32Array[]>;
  /**
   * All-to-all-v of bytes: `send[j]` goes to rank `j` (`send[rank]` to this rank itself);
   * `recvBytes[s]` is the byte length this rank expects from rank `s` (known from an earlier
   * all-gather, as a transport with posted receives needs). Resolves to `recv[s]`, what rank
   * `s` sent here.
   */
  allToAllV(send: readonly Uint8Array[], recvBytes: readonly number[], label?: string): Promise<Uint8Array[]>;
  /**
   * Optional (the NCCL group has it): all-to-all-v of device rows, GPU to GPU. `send` is a
   * `[rows, hidden]` device tensor whose first `sendRows[0]` rows go to rank 0, the next
   * `sendRows[1]` to rank 1, ...; resolves to a new `[sum recvRows, hidden]` device tensor of
   * what ranks 0, 1, ... sent here. `send` must stay undisposed until it settles. With it,
   * dispatch, combine and their backward passes take the cuda backend's device tensors and
   * move their rows without host copies.
   */
  allToAllVDevice?<D extends RowDType>(send: DeviceTensor<D>, sendRows: readonly number[], recvRows: readonly number[], label?: string, options?: AllToAllVDeviceOptions): Promise<DeviceTensor<D>>;
}

/** allToAllVDevice's options. */
export interface AllToAllVDeviceOptions {
  /**
   * Every rank's row counts came from one earlier all-gather (dispatch's header: the layout's
   * own exchanges), so they match by construction: a transport may skip checking them against
   * each other's (the NCCL group then waits for the GPU once an exchange instead of twice; this
   * rank's rows to itself are still checked). Default false.
   */
  countsAgreed?: boolean;
}

/** allToAllVDevice's `options.countsAgreed` (false when absent), or a TypeError naming it (`where`: `label: allToAllVDevice`). */
export function countsAgreedArg(options: unknown, where: string): boolean {
  return checked(where, () => checkBool(checkOptions<AllToAllVDeviceOptions>(options as AllToAllVDeviceOptions, where, ['countsAgreed']).countsAgreed, 'options.countsAgreed') ?? false);
}

/** The dtypes of the rows a group moves: the tokens', and the int32 / float32 picks and weights that travel with them. */
export type RowDType = TokenDType | 'int32';
const ROW_DTYPES: readonly RowDType[] = [...TOKENS, 'int32'];

/** A collective that did not complete because ranks never joined it; the group is aborted. */
export class ExpertParallelTimeoutError extends Error {
  /** The ranks that never made the call. */
  readonly missingRanks: readonly number[];
  constructor(message: string, missingRanks: readonly number[]) {
    super(message);
    this.name = 'ExpertParallelTimeoutError';
    this.missingRanks = [...missingRanks];
  }
}

/**
 * allToAllVDevice's arguments (for a group's implementation): `send` a live `[rows, hidden]`
 * device tensor, `sendRows` / `recvRows` one count per rank (`size`), `sendRows` adding up to
 * `rows`; its dtype and shape, or a TypeError / RangeError starting with `op`.
 */
export function checkDeviceRows(op: string, size: number, send: unknown, sendRows: unknown, recvRows: unknown): { dtype: RowDType; shape: readonly number[] } {
  if (!isDeviceTensor(send)) throw new TypeError(`${op}: send: expected a device tensor [rows, hidden] (a cuda backend's), got ${describe(send)}`);
  const meta = deviceMeta(send, `${op}: send`, ROW_DTYPES);
  if (meta.shape.length !== 2) throw new RangeError(`${op}: send.shape: expected [rows, hidden], got [${meta.shape.join(', ')}]`);
  for (const [name, rows] of [
    ['sendRows', sendRows],
    ['recvRows', recvRows],
  ] as const) {
    if (!Array.isArray(rows)) throw new TypeError(`${op}: ${name}: expected an array of ${size} row counts, got ${describe(rows)}`);
    if (rows.length !== size) throw new RangeError(`${op}: ${name}: expected one count per rank (${size}), got ${rows.length}`);
    rows.forEach((r, j) => {
      sizeArg(r, `${op}: ${name}[${j}]`, 0);
    });
  }
  const sum = (sendRows as number[]).reduce((a, b) => a + b, 0);
  if (sum !== meta.shape[0]) throw new RangeError(`${op}: sendRows: they add up to ${sum} rows, send has ${meta.shape[0]}`);
  return meta;
}

/** What an in-process group needs to move device tensors: the cuda backend (its `upload`). */
export interface DeviceUpload {
  upload<D extends RowDType>(tensor: Tensor<D>): DeviceTensor<D>;
}

export interface InProcessGroupOptions {
  /**
   * How long a collective waits for the ranks that have not made their call yet, from the
   * first rank's call (default 30000 ms). Then every waiting rank's call rejects with an
   * {@link ExpertParallelTimeoutError} naming the missing ranks, and the group is aborted: every
   * later call rejects too.
   */
  timeoutMs?: number;
  /**
   * A cuda backend: the group then also moves device tensors (`allToAllVDevice`, through the
   * host: each rank's rows downloaded, exchanged, uploaded), so dispatch, combine and their
   * backward passes take device tensors with in-process ranks: the device path with several
   * ranks on one GPU, as a test (NCCL needs a GPU per rank).
   */
  device?: DeviceUpload;
}

// ---------------------------------------------------------------------------------------
// The in-process group: N ranks in one process exchanging buffers.

type Collective = 'allGather' | 'allToAllV' | 'allToAllVDevice';

interface Arrival {
  op: Collective;
  label: string;
  /** allGather: the values; allToAllV: the send buffers. */
  payload: Int32Array | readonly Uint8Array[];
  recvBytes?: readonly number[];
  resolve: (value: Int32Array[] | Uint8Array[]) => void;
  reject: (error: Error) => void;
}

interface Slot {
  arrivals: (Arrival | undefined)[];
  count: number;
  timer?: ReturnType<typeof setTimeout>;
}

/** The rendezvous of an in-process group: the k-th collective call of every rank meets in slot k. */
class Hub {
  readonly #slots = new Map<number, Slot>();
  readonly #next: number[];
  #aborted?: Error;

  constructor(
    readonly size: number,
    readonly timeoutMs: number,
  ) {
    this.#next = new Array(size).fill(0);
  }

  arrive(rank: number, arrival: Arrival): void {
    if (this.#aborted) {
      arrival.reject(new Error(`${arrival.label}: rank ${rank}: the expert-parallel group was aborted (${this.#aborted.message})`));
      return;
    }
    const seq = this.#next[rank]++;
    let slot = this.#slots.get(seq);
    if (!slot) {
      slot = { arrivals: new Array(this.size).fill(undefined), count: 0 };
      this.#slots.set(seq, slot);
    }
    slot.arrivals[rank] = arrival;
    slot.count++;
    if (slot.count === this.size) {
      if (slot.timer !== undefined) clearTimeout(slot.timer);
      this.#slots.delete(seq);
      this.#complete(seq, slot.arrivals as Arrival[]);
    } else if (slot.timer === undefined) {
      slot.timer = setTimeout(() => this.#timeout(seq), this.timeoutMs);
    }
  }

  #timeout(seq: number): void {
    const slot = this.#slots.get(seq);
    if (!slot) return;
    const missing = slot.arrivals.flatMap((a, r) => (a ? [] : [r]));
    const first = slot.arrivals.find((a) => a)!;
    const who = missing.length === 1 ? `rank ${missing[0]}` : `ranks ${missing.join(', ')}`;
    this.#abort(new ExpertParallelTimeoutError(`${first.label}: ${who} of ${this.size} did not join collective #${seq} (${first.op}) within ${this.timeoutMs} ms; the group is aborted`, missing));
  }

  /** Rejects every waiting call with `error`, and every later one. */
  #abort(error: Error): void {
    this.#aborted = error;
    for (const slot of this.#slots.values()) {
      if (slot.timer !== undefined) clearTimeout(slot.timer);
      for (const a of slot.arrivals) a?.reject(error);
    }
    this.#slots.clear();
  }

  #fail(arrivals: Arrival[], error: Error): void {
    this.#abort(error);
    for (const a of arrivals) a.reject(error);
  }

  #complete(seq: number, arrivals: Arrival[]): void {
    const a0 = arrivals[0];
    const odd = arrivals.findIndex((a) => a.op !== a0.op || a.label !== a0.label);
    if (odd >= 0) {
      const a = arrivals[odd];
      this.#fail(
        arrivals,
        new Error(`${a0.label}: collective #${seq}: rank 0 called ${a0.label} (${a0.op}), rank ${odd} called ${a.label} (${a.op}); every rank must make the same calls in the same order`),
      );
      return;
    }
    if (a0.op === 'allGather') {
      const values = arrivals.map((a) => a.payload as Int32Array);
      const bad = values.findIndex((v) => v.length !== values[0].length);
      if (bad >= 0) {
        this.#fail(arrivals, new RangeError(`${at(a0.label, 'allGather')}: rank ${bad} gives ${values[bad].length} values, rank 0 gives ${values[0].length}`));
        return;
      }
      for (const a of arrivals) a.resolve(values.map((v) => v.slice()));
      return;
    }
    const sends = arrivals.map((a) => a.payload as readonly Uint8Array[]);
    for (let r = 0; r < this.size; r++) {
      const want = arrivals[r].recvBytes!;
      for (let s = 0; s < this.size; s++) {
        if (sends[s][r].byteLength !== want[s]) {
          this.#fail(arrivals, new RangeError(`${at(a0.label, 'allToAllV')}: rank ${r} expects ${want[s]} bytes from rank ${s}, which sends ${sends[s][r].byteLength}`));
          return;
        }
      }
    }
    arrivals.forEach((a, r) => {
      a.resolve(sends.map((send) => send[r].slice()));
    });
  }
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an Array';
  if (ArrayBuffer.isView(value)) return value.constructor.name;
  return typeof value;
}

function sizeArg(value: unknown, arg: string, min: number): number {
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${describe(value)}`);
  if (!Number.isSafeInteger(value) || value < min) throw new RangeError(`${arg}: expected an integer >= ${min}, got ${value}`);
  return value;
}

/** `label: op` for messages (just `op` when the caller gave no label). */
function at(label: string, op: Collective): string {
  return label === op ? op : `${label}: ${op}`;
}

function labelArg(label: unknown, op: Collective): string {
  if (label === undefined) return op;
  if (typeof label !== 'string') throw new TypeError(`${op}: label: expected a string, got ${describe(label)}`);
  return label;
}

/** One rank of an in-process group. */
class InProcessRank implements ExpertParallelGroup {
  readonly #hub: Hub;
  allToAllVDevice?: ExpertParallelGroup['allToAllVDevice'];
  constructor(
    hub: Hub,
    readonly rank: number,
    device?: DeviceUpload,
  ) {
    this.#hub = hub;
    // (countsAgreed: checked, and no difference here: the hub matches every rank's counts anyway)
    if (device) {
      this.allToAllVDevice = async (send, sendRows, recvRows, label, options) => {
        countsAgreedArg(options, at(labelArg(label, 'allToAllVDevice'), 'allToAllVDevice'));
        return this.#allToAllVDevice(device, send, sendRows, recvRows, label);
      };
    }
  }

  /** allToAllVDevice through the host: `send` downloaded, its rows exchanged as bytes, what arrives uploaded. */
  async #allToAllVDevice<D extends RowDType>(device: DeviceUpload, send: DeviceTensor<D>, sendRows: readonly number[], recvRows: readonly number[], label?: string): Promise<DeviceTensor<D>> {
    const l = labelArg(label, 'allToAllVDevice');
    const meta = checkDeviceRows(at(l, 'allToAllVDevice'), this.#hub.size, send, sendRows, recvRows);
    const hidden = meta.shape[1];
    const rowBytes = hidden * ELEMENT_BYTES[meta.dtype];
    const host = send.download() as Tensor<D>;
    const recv = await this.allToAllV(
      splitRows(bytesOf(host.data), sendRows, rowBytes),
      recvRows.map((r) => r * rowBytes),
      l,
    );
    const rows = recvRows.reduce((a, b) => a + b, 0);
    return device.upload(rowsOf(meta.dtype as D, rows, hidden, gatherParts(recv, recvRows, rowBytes, []).rows));
  }

  get size(): number {
    return this.#hub.size;
  }

  allGather(values: Int32Array, label?: string): Promise<Int32Array[]> {
    return new Promise((resolve, reject) => {
      const l = labelArg(label, 'allGather');
      if (!(values instanceof Int32Array)) throw new TypeError(`${at(l, 'allGather')}: values: expected an Int32Array, got ${describe(values)}`);
      this.#hub.arrive(this.rank, { op: 'allGather', label: l, payload: values.slice(), resolve: resolve as (v: unknown) => void, reject });
    });
  }

  allToAllV(send: readonly Uint8Array[], recvBytes: readonly number[], label?: string): Promise<Uint8Array[]> {
    return new Promise((resolve, reject) => {
      const l = labelArg(label, 'allToAllV');
      const n = this.#hub.size;
      if (!Array.isArray(send)) throw new TypeError(`${at(l, 'allToAllV')}: send: expected an array of ${n} Uint8Arrays, got ${describe(send)}`);
      if (send.length !== n) throw new RangeError(`${at(l, 'allToAllV')}: send: expected one buffer per rank (${n}), got ${send.length}`);
      send.forEach((b, j) => {
        if (!(b instanceof Uint8Array)) throw new TypeError(`${at(l, 'allToAllV')}: send[${j}]: expected a Uint8Array, got ${describe(b)}`);
      });
      if (!Array.isArray(recvBytes)) throw new TypeError(`${at(l, 'allToAllV')}: recvBytes: expected an array of ${n} byte counts, got ${describe(recvBytes)}`);
      if (recvBytes.length !== n) throw new RangeError(`${at(l, 'allToAllV')}: recvBytes: expected one count per rank (${n}), got ${recvBytes.length}`);
      recvBytes.forEach((b, s) => {
        sizeArg(b, `${at(l, 'allToAllV')}: recvBytes[${s}]`, 0);
      });
      this.#hub.arrive(this.rank, { op: 'allToAllV', label: l, payload: [...send], recvBytes: [...recvBytes], resolve: resolve as (v: unknown) => void, reject });
    });
  }
}

/**
 * `size` ranks of one group in this process: `groups[r]` is rank `r`'s handle. Each rank's
 * collective calls meet the other ranks' calls of the same number (the k-th call of every
 * rank forms collective #k) and resolve together, with copies of the buffers. Run the ranks
 * concurrently (`Promise.all(groups.map((g) => dispatch(g, ...)))`): a rank whose call never
 * comes makes the others reject after `timeoutMs`, naming it.
 */
export function createInProcessGroup(size: number, options?: InProcessGroupOptions): ExpertParallelGroup[] {
  const n = sizeArg(size, 'size', 1);
  const o = checkOptions<InProcessGroupOptions>(options, 'createInProcessGroup', ['timeoutMs', 'device']);
  if (o.device !== undefined && (typeof o.device !== 'object' || o.device === null || typeof o.device.upload !== 'function')) {
    throw new TypeError(`options.device: expected a cuda backend (its upload()), got ${describe(o.device)}`);
  }
  let timeoutMs = 30_000;
  if (o.timeoutMs !== undefined) {
    if (typeof o.timeoutMs !== 'number') throw new TypeError(`options.timeoutMs: expected a number, got ${describe(o.timeoutMs)}`);
    if (!Number.isFinite(o.timeoutMs) || o.timeoutMs <= 0 || o.timeoutMs > 2 ** 31 - 1) {
      throw new RangeError(`options.timeoutMs: expected a number of milliseconds > 0 and <= 2^31 - 1, got ${o.timeoutMs}`);
    }
    timeoutMs = o.timeoutMs;
  }
  const hub = new Hub(n, timeoutMs);
  return Array.from({ length: n }, (_, r) => new InProcessRank(hub, r, o.device));
}

// ---------------------------------------------------------------------------------------
// dispatch / combine and their backward passes: the layout, shared by every group.

export interface DispatchOptions {
  /** Experts in the whole model (required): rank `j` holds `expertRangeForRank(numExperts, size, j)`. */
  numExperts: number;
}

export interface CombineOptions {
  /**
   * Weight each slot's output by its prob before merging (default true). Pass false when the
   * experts already did (expertsForward with `permutedProbs`, as MoELayer runs them): the
   * outputs are then summed as they are, and combineBackward returns no prob gradient.
   */
  weighted?: boolean;
}

export interface DispatchBackwardOptions {
  /** `[numSlots]` float32: the gradient of dispatch's `permutedProbs` (from expertsBackward, combineBackward, or their sum). */
  gradPermutedProbs?: Tensor<'float32'>;
}

/**
 * What dispatch returns to the rank for its combine and the backward passes. Its fields say
 * what was exchanged; the rest of what it keeps is internal.
 */
export interface DispatchHandle {
  readonly rank: number;
  readonly size: number;
  readonly numExperts: number;
  /** Picks per token (columns of the routing). */
  readonly topk: number;
  /** This rank's tokens (rows of `tokens`). */
  readonly numTokens: number;
  readonly hidden: number;
  readonly dtype: TokenDType;
  /** The experts this rank holds. */
  readonly expertRange: ExpertRange;
  /** Tokens this rank sent to each rank (each token once per rank holding one of its experts). */
  readonly sendCounts: readonly number[];
  /** Tokens this rank received from each rank. */
  readonly recvCounts: readonly number[];
  /** Rows of `permutedTokens`: the received tokens' picks of this rank's experts. */
  readonly numSlots: number;
}

export interface DispatchResult<D extends TokenDType = TokenDType> {
  /** `[numSlots, hidden]`: the received tokens by local expert (expert-major; within an expert by source rank, then token). */
  permutedTokens: Tensor<D>;
  /** `[numSlots]` float32: each slot's routing weight. */
  permutedProbs: Tensor<'float32'>;
  /** `[numLocalExperts]` int32: slots per local expert. */
  tokensPerExpert: Tensor<'int32'>;
  handle: DispatchHandle;
}

/** dispatch's result on device tokens (a group with `allToAllVDevice`, the cuda backend): device tensors. */
export interface DeviceDispatchResult<D extends TokenDType = TokenDType> {
  permutedTokens: DeviceTensor<D>;
  permutedProbs: DeviceTensor<'float32'>;
  tokensPerExpert: DeviceTensor<'int32'>;
  handle: DispatchHandle;
}

/** combineBackward's result on device tensors. */
export interface DeviceCombineGrads<D extends TokenDType = TokenDType> {
  gradExpertOutputs: DeviceTensor<D>;
  gradPermutedProbs?: DeviceTensor<'float32'>;
}

/** dispatchBackward's result on device tensors. */
export interface DeviceDispatchGrads<D extends TokenDType = TokenDType> {
  gradTokens: DeviceTensor<D>;
  gradWeights: DeviceTensor<'float32'>;
}

export interface CombineGrads<D extends TokenDType = TokenDType> {
  /** `[numSlots, hidden]`: the gradient of combine's `expertOutputs`. */
  gradExpertOutputs: Tensor<D>;
  /** `[numSlots]` float32: the gradient of dispatch's `permutedProbs` through combine's weighting (weighted combines only). */
  gradPermutedProbs?: Tensor<'float32'>;
}

export interface DispatchGrads<D extends TokenDType = TokenDType> {
  /** `[numTokens, hidden]`: the gradient of dispatch's `tokens`, summed over the ranks that received each token, in rank order. */
  gradTokens: Tensor<D>;
  /**
   * `[numTokens, k]` float32: the gradient of `routing.weights`: each pick gets the prob
   * gradient its expert's rank passed for that slot (0 for masked picks, and where that rank
   * passed no `gradPermutedProbs`).
   */
  gradWeights: Tensor<'float32'>;
}

interface State {
  readonly group: ExpertParallelGroup;
  readonly handle: DispatchHandle;
  /** The rank holding each expert. */
  readonly owner: Int32Array;
  /** `[numTokens, size]`: which ranks each token went to (`numSent` slots), and the send permutation's slots (tokens grouped by rank). */
  readonly sendMap: AnyTensor<'bool'>;
  readonly numSent: number;
  readonly sendSorted: AnyTensor<'int32'>;
  /** Whether the rows move as device tensors (allToAllVDevice): every tensor argument is then a device tensor. */
  readonly device: boolean;
  /** Host tensors: `[numTokens * k]`, the global expert of each pick (-1 masked), and sendSorted's values. */
  readonly hostSend?: { picks: Int32Array; sorted: Int32Array };
  /** `[numReceived, k]`: the local expert of each received token's picks (-1: not here), where the rows are. */
  readonly recvLocal: AnyTensor<'int32'>;
  readonly numReceived: number;
  readonly recvMap: AnyTensor<'bool'>;
  readonly recvSorted: AnyTensor<'int32'>;
  readonly permutedProbs: AnyTensor<'float32'>;
  combined?: { expertOutputs?: AnyTensor<TokenDType>; weighted: boolean };
  /** Whether `releaseDispatch` freed what the handle kept. */
  released?: boolean;
}

const STATES = new WeakMap<DispatchHandle, State>();
/** The layout's own device exchanges: their counts are every rank's, from dispatch's all-gathered header. */
const AGREED: AllToAllVDeviceOptions = Object.freeze({ countsAgreed: true });
const DTYPE_CODE: Record<TokenDType, number> = { float32: 0, bfloat16: 1, float16: 2 };
const ELEMENT_BYTES: Record<RowDType, number> = { float32: 4, bfloat16: 2, float16: 2, int32: 4 };
/** The all-gathered header before the counts: numExperts, k, hidden, dtype, where the tokens live (0 host, 1 device). */
const HEADER = ['numExperts', 'topk (routing.indices.shape[1])', 'hidden (tokens.shape[1])', 'tokens.dtype', 'where the tokens live (0: host, 1: device)'] as const;

/** Runs argument checks, prefixing their TypeError/RangeError with the op. */
export function checked<T>(op: string, f: () => T): T {
  try {
    return f();
  } catch (e) {
    if ((e instanceof TypeError || e instanceof RangeError) && !e.message.startsWith(`${op}:`)) throw new (e.constructor as ErrorConstructor)(`${op}: ${e.message}`);
    throw e;
  }
}

/** `group` as an ExpertParallelGroup (its methods, 0 <= rank < size), or a TypeError/RangeError naming it. */
export function checkGroup(group: unknown): ExpertParallelGroup {
  const g = group as Partial<ExpertParallelGroup> | null;
  if (typeof g !== 'object' || g === null || typeof g.allGather !== 'function' || typeof g.allToAllV !== 'function') {
    throw new TypeError(`group: expected an ExpertParallelGroup { rank, size, allGather, allToAllV }, got ${describe(group)}`);
  }
  const size = sizeArg(g.size, 'group.size', 1);
  const rank = sizeArg(g.rank, 'group.rank', 0);
  if (rank >= size) throw new RangeError(`group.rank: expected 0 <= rank < size = ${size}, got ${rank}`);
  return g as ExpertParallelGroup;
}

function checkBackend(backend: unknown): Backend {
  const b = backend as Partial<Backend> | null;
  if (typeof b !== 'object' || b === null || typeof b.permute !== 'function' || typeof b.unpermute !== 'function') {
    throw new TypeError(`backend: expected a Backend (createBackend()), got ${describe(backend)}`);
  }
  return b as Backend;
}

function stateOf(group: ExpertParallelGroup, handle: unknown): State {
  const s = typeof handle === 'object' && handle !== null ? STATES.get(handle as DispatchHandle) : undefined;
  if (!s) throw new TypeError(`handle: expected the handle dispatch returned, got ${describe(handle)}`);
  if (s.group !== group) throw new RangeError(`handle: made by the dispatch of rank ${s.handle.rank} of another group handle, not of this group's rank ${group.rank}`);
  if (s.released) throw new TypeError('handle: expected a handle not yet released, got one passed to releaseDispatch');
  return s;
}

/**
 * Frees what dispatch kept for combine and the backward passes (on the device: the send and
 * receive maps and orders, the probs) at once, instead of when the handle is garbage-collected;
 * the handle can't be used after. Tensors dispatch returned are the caller's and stay (device
 * permutedProbs is one of them: disposing it is the caller's part). Releasing twice is a no-op.
 */
export function releaseDispatch(handle: DispatchHandle): void {
  const s = typeof handle === 'object' && handle !== null ? STATES.get(handle) : undefined;
  if (!s) throw new TypeError(`releaseDispatch: handle: expected the handle dispatch returned, got ${describe(handle)}`);
  if (s.released) return;
  s.released = true;
  s.combined = undefined;
  release(s.sendMap, s.sendSorted, s.recvMap, s.recvSorted, s.recvLocal);
}

/** A `[rows, hidden]` tensor of the handle's dtype, on the device exactly when the dispatch's tokens were (`device`). */
function checkRows<D extends TokenDType>(value: unknown, arg: string, dtype: TokenDType, rows: number, hidden: number, what: string, device = false): Tensor<D> {
  if (device !== isDeviceTensor(value)) {
    throw new TypeError(
      device
        ? `${arg}: expected a device tensor (dispatch's tokens were on the device), got ${isTensorLike(value) ? 'a host tensor' : describe(value)}`
        : `${arg}: expected a host tensor (dispatch's tokens were on the host), got a device tensor`,
    );
  }
  const t: { dtype: string; shape: readonly number[] } = device ? deviceMeta(value as DeviceTensor, arg) : checkTensor(value, arg, TOKENS);
  if (t.dtype !== dtype) throw new TypeError(`${arg}.dtype: expected ${dtype} (the dtype of the dispatched tokens), got ${t.dtype}`);
  if (t.shape.length !== 2 || t.shape[0] !== rows || t.shape[1] !== hidden) {
    throw new RangeError(`${arg}.shape: expected [${rows}, ${hidden}] (${what}), got [${t.shape.join(', ')}]`);
  }
  return (device ? value : t) as Tensor<D>;
}

function isTensorLike(value: unknown): boolean {
  return typeof value === 'object' && value !== null && 'data' in value && 'shape' in value;
}

/** A device tensor's dtype (one of `dtypes`) and shape (a disposed one is a TypeError naming `arg`). */
function deviceMeta<T extends string = TokenDType>(t: DeviceTensor, arg: string, dtypes: readonly string[] = TOKENS): { dtype: T; shape: readonly number[] } {
  if (t.disposed) throw new TypeError(`${arg}: expected a device tensor that is not disposed, got one whose dispose() was called`);
  if (!dtypes.includes(t.dtype)) throw new TypeError(`${arg}.dtype: expected ${dtypes.length === 1 ? dtypes[0] : `one of ${dtypes.join(', ')}`}, got ${t.dtype}`);
  return { dtype: t.dtype as T, shape: t.shape };
}

/**
 * Frees the device tensors among `ts` now (host tensors and undefined are left alone): the
 * device path's temporaries (send and receive rows), so that a step's device memory goes back
 * to the pool at once instead of when the garbage collector finds them.
 */
function release(...ts: unknown[]): void {
  for (const t of ts) if (isDeviceTensor(t)) t.dispose();
}

/** The cuda backend's `upload` (device tensors' backend), or a TypeError naming `backend`. */
export function uploadOf(moe: unknown): <T extends Tensor>(t: T) => T {
  const up = typeof moe === 'object' && moe !== null ? (moe as Partial<DeviceUpload>).upload : undefined;
  if (typeof up !== 'function') throw new TypeError(`backend: expected the cuda backend (device tensors need its upload()), got ${describe(moe)}`);
  return ((t: Tensor) => up.call(moe, t as Tensor<TokenDType>)) as unknown as <T extends Tensor>(t: T) => T;
}

/** The cuda backend's ops of a device dispatchBackward, or a TypeError naming `backend`. */
function deviceBackwardOps(moe: Backend): Pick<CudaTrainOps, 'gatherPicks' | 'zeros'> {
  const o = moe as unknown as Partial<CudaTrainOps>;
  if (typeof o.gatherPicks !== 'function' || typeof o.zeros !== 'function')
    throw new TypeError(`backend: expected the cuda backend (device tensors need its gatherPicks()), got the ${moe.name} backend`);
  return o as CudaTrainOps;
}

/** A host tensor, downloading a device one (the routing's picks and weights, the probs' gradient: small). */
function onHost<T>(value: T): T {
  return (isDeviceTensor(value) ? value.download() : value) as T;
}

function bytesOf(data: ArrayBufferView): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function rowsOf<D extends RowDType>(dtype: D, rows: number, hidden: number, bytes: Uint8Array): Tensor<D> {
  const n = rows * hidden;
  const data =
    dtype === 'float32'
      ? new Float32Array(bytes.buffer, bytes.byteOffset, n)
      : dtype === 'int32'
        ? new Int32Array(bytes.buffer, bytes.byteOffset, n)
        : new Uint16Array(bytes.buffer, bytes.byteOffset, n);
  return { dtype, shape: [rows, hidden], data } as unknown as Tensor<D>;
}

/** Splits rows `[sum counts, rowBytes]` into one buffer per rank (views, not copies). */
function splitRows(bytes: Uint8Array, counts: readonly number[], rowBytes: number): Uint8Array[] {
  let off = 0;
  return counts.map((n) => {
    const part = bytes.subarray(off * rowBytes, (off + n) * rowBytes);
    off += n;
    return part;
  });
}

/** One exchange of the transport, with the received lengths checked (a transport's bug is not a layout bug). */
async function exchange(group: ExpertParallelGroup, send: Uint8Array[], recvBytes: number[], label: string): Promise<Uint8Array[]> {
  const recv = await group.allToAllV(send, recvBytes, label);
  if (!Array.isArray(recv) || recv.length !== group.size || recv.some((b, s) => !(b instanceof Uint8Array) || b.byteLength !== recvBytes[s])) {
    throw new Error(`${label}: the group's allToAllV returned ${describe(recv)} instead of ${group.size} Uint8Arrays of [${recvBytes.join(', ')}] bytes`);
  }
  return recv;
}

/** Concatenates per-rank messages whose first part is `counts[s]` rows of `rowBytes`, then `counts[s] * extra` bytes: the rows, and each extra part. */
function gatherParts(recv: Uint8Array[], counts: readonly number[], rowBytes: number, extras: readonly number[]): { rows: Uint8Array; extras: Uint8Array[] } {
  const total = counts.reduce((a, c) => a + c, 0);
  const rows = new Uint8Array(total * rowBytes);
  const out = extras.map((e) => new Uint8Array(total * e));
  let off = 0;
  recv.forEach((msg, s) => {
    const n = counts[s];
    rows.set(msg.subarray(0, n * rowBytes), off * rowBytes);
    let at = n * rowBytes;
    extras.forEach((e, i) => {
      out[i].set(msg.subarray(at, at + n * e), off * e);
      at += n * e;
    });
    off += n;
  });
  return { rows, extras: out };
}

function picksOf(indices: Tensor<IndexDType>, numExperts: number): Int32Array {
  const [T, k] = indices.shape;
  const data = indices.data;
  return data instanceof Int32Array ? checkedPicks(data.slice(), T, k, numExperts) : checkedPicks(int64Picks(data as BigInt64Array), T, k, numExperts, data as BigInt64Array);
}

/** int64 picks as int32 (a value outside int32 becomes one outside the experts, named by checkedPicks). */
function int64Picks(data: BigInt64Array): Int32Array {
  const picks = new Int32Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    picks[i] = v >= -2147483648n && v <= 2147483647n ? Number(v) : -2;
  }
  return picks;
}

/** Checks every pick of `picks [T, k]` (in [0, numExperts) or -1, a masked pick; no expert twice in a row); returns them. */
function checkedPicks(picks: Int32Array, T: number, k: number, numExperts: number, original?: ArrayLike<number | bigint>): Int32Array {
  const seen = new Int32Array(numExperts).fill(-1);
  for (let t = 0; t < T; t++) {
    for (let c = 0; c < k; c++) {
      const v = picks[t * k + c];
      if (v === -1) continue;
      if (v < 0 || v >= numExperts) {
        throw new RangeError(`routing.indices: element [${t}][${c}] = ${original ? original[t * k + c] : v} is outside [0, numExperts = ${numExperts}) (and not -1, a masked pick)`);
      }
      if (seen[v] === t) throw new RangeError(`routing.indices: row ${t} lists expert ${v} more than once`);
      seen[v] = t;
    }
  }
  return picks;
}

// The hot loops of dispatch and its backward over every pick (T k of them), each in a small
// function of typed arrays that V8 optimises on its own (in dispatch's async body the send side's
// loops took 4.3 ms a call at issue 20's routing on a 2-core host; here 2.0).

/** dispatch's send side: the [T, N] rank map (token t goes to rank j), the tokens and picks each rank gets, the picks; on the host its order too (rank by rank, tokens ascending: permute's sortedIndices), on the GPU the device picks and weights. */
interface SendSide {
  sendMap: AnyTensor<'bool'>;
  sendCounts: number[];
  pickCounts: number[];
  /** `[T * k]`: the global expert of each pick (-1 masked), on the host (the host's send side: host tokens, or MOE_DISPATCH_EP_SEND=host). */
  picks?: Int32Array;
  sorted?: Int32Array;
  indices?: DeviceTensor<'int32'>;
  weights?: DeviceTensor<'float32'>;
  /** What the send side uploaded (freed once the extras are made). */
  temps: DeviceTensor[];
}

/** The send side on the host. */
function sendPlan(picks: Int32Array, owner: Int32Array, T: number, k: number, N: number): SendSide {
  const map = new Uint8Array(T * N);
  const pickCounts = new Array<number>(N).fill(0);
  for (let t = 0; t < T; t++) {
    for (let c = 0; c < k; c++) {
      const e = picks[t * k + c];
      if (e >= 0) {
        map[t * N + owner[e]] = 1;
        pickCounts[owner[e]]++;
      }
    }
  }
  const counts = new Int32Array(N);
  for (let t = 0; t < T; t++) for (let j = 0; j < N; j++) counts[j] += map[t * N + j];
  const at = new Int32Array(N);
  for (let j = 1; j < N; j++) at[j] = at[j - 1] + counts[j - 1];
  const sorted = new Int32Array(at[N - 1] + counts[N - 1]); // (N >= 1: a group has a rank)
  for (let t = 0; t < T; t++) for (let j = 0; j < N; j++) if (map[t * N + j]) sorted[at[j]++] = t;
  return { sendMap: { dtype: 'bool', shape: [T, N], data: map }, sendCounts: Array.from(counts), pickCounts, picks, sorted, temps: [] };
}

/**
 * The cuda backend's send-side kernels, where `moe` has them (the default for device tokens;
 * `MOE_DISPATCH_EP_SEND=host` keeps the host's bookkeeping, for A/B runs: the same bits).
 */
function gpuSendOps(moe: Backend): Pick<CudaTrainOps, 'epSendPlan' | 'epRankExtras'> | undefined {
  if ((typeof process !== 'undefined' ? process.env?.MOE_DISPATCH_EP_SEND : undefined) === 'host') return undefined;
  const o = moe as unknown as Partial<CudaTrainOps>;
  return typeof o.epSendPlan === 'function' && typeof o.epRankExtras === 'function' ? (o as CudaTrainOps) : undefined;
}

/**
 * The send side on the GPU: the map and the counts from the device picks (`epSendPlan`: one
 * read-back of `2N + 1` words, the counts the exchange's sizes need); host picks (checked
 * already) and weights go up first. A bad device pick is named from the indices on the host.
 */
function sendOnGpu(
  ops: Pick<CudaTrainOps, 'epSendPlan'>,
  moe: Backend,
  indices: AnyTensor<IndexDType>,
  weights: AnyTensor<'float32'>,
  hostPicks: Int32Array | undefined,
  T: number,
  k: number,
  E: number,
  owner: Int32Array,
  N: number,
): SendSide {
  const up = uploadOf(moe);
  const temps: DeviceTensor[] = [];
  const onDevice = <X extends AnyTensor>(t: X, made: () => Tensor): DeviceTensor => {
    if (isDeviceTensor(t)) return t;
    const d = up(made()) as unknown as DeviceTensor;
    temps.push(d);
    return d;
  };
  const idx = onDevice(indices, () => ({ dtype: 'int32', shape: [T, k], data: hostPicks! })) as DeviceTensor<'int32'>;
  const w = onDevice(weights, () => weights as Tensor<'float32'>) as DeviceTensor<'float32'>;
  const sp = ops.epSendPlan(idx, owner, N);
  if (sp.badPicks) {
    release(sp.sendMap, ...temps);
    checked('dispatch', () => picksOf(onHost(indices) as Tensor<IndexDType>, E));
    throw new Error('dispatch: the GPU flagged a pick that the host check accepts (a bug in moe-dispatch)');
  }
  return { sendMap: sp.sendMap, sendCounts: sp.sendCounts, pickCounts: sp.pickCounts, indices: idx, weights: w, temps };
}

/** The per-row extras for rank `rank` (its tokens `tokens`): their picks as its local expert ids (-1 elsewhere) and their weights (0 elsewhere). */
function rankExtras(tokens: Int32Array, picks: Int32Array, weights: Float32Array, owner: Int32Array, rank: number, start: number, k: number): { local: Int32Array; w: Float32Array } {
  const n = tokens.length;
  const local = new Int32Array(n * k).fill(-1);
  const w = new Float32Array(n * k);
  for (let i = 0; i < n; i++) {
    const t = tokens[i];
    for (let c = 0; c < k; c++) {
      const e = picks[t * k + c];
      if (e >= 0 && owner[e] === rank) {
        local[i * k + c] = e - start;
        w[i * k + c] = weights[t * k + c];
      }
    }
  }
  return { local, w };
}

/** Each received pick's prob gradient from permuteBackward's dense [R, L] gradient (0 for a pick of another rank). */
function pickGradients(recvPicks: Int32Array, dense: Float32Array, k: number, L: number): Float32Array {
  const out = new Float32Array(recvPicks.length);
  for (let r = 0; r < recvPicks.length / k; r++) {
    for (let c = 0; c < k; c++) {
      const l = recvPicks[r * k + c];
      if (l >= 0) out[r * k + c] = dense[r * L + l];
    }
  }
  return out;
}

/** The prob gradients `back` of rank `rank`'s picks, for its tokens `tokens` in slot order, into the tokens' rows of `gradWeights`. */
function scatterPickGradients(tokens: Int32Array, back: Float32Array, picks: Int32Array, owner: Int32Array, rank: number, k: number, gradWeights: Float32Array): void {
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    for (let c = 0; c < k; c++) {
      const e = picks[t * k + c];
      if (e >= 0 && owner[e] === rank) gradWeights[t * k + c] = back[i * k + c];
    }
  }
}

/**
 * Sends `rows [sum sendCounts, hidden]` to the ranks (its first `sendCounts[0]` rows to rank 0,
 * the next `sendCounts[1]` to rank 1, ...), each rank's rows followed by that rank's `extraSend`
 * parts (host bytes, `extras[i]` bytes a row); returns the rows received (rank order) and each
 * extra part, concatenated over the ranks. Host rows travel in one message per rank with their
 * extras; device rows (a device tensor) through the group's `allToAllVDevice`, GPU to GPU, and
 * their extras, if any, in a host exchange of their own.
 */
async function exchangeRows<D extends TokenDType>(
  g: ExpertParallelGroup,
  rows: AnyTensor<D>,
  dtype: D,
  hidden: number,
  sendCounts: readonly number[],
  recvCounts: readonly number[],
  extras: readonly number[],
  extraSend: readonly (readonly Uint8Array[])[],
  label: string,
): Promise<{ rows: AnyTensor<D>; extras: Uint8Array[] }> {
  const rowBytes = hidden * ELEMENT_BYTES[dtype];
  const extraRow = extras.reduce((a, b) => a + b, 0);
  const received = recvCounts.reduce((a, c) => a + c, 0);
  const withExtras = (j: number, n: number, head: Uint8Array | undefined, headBytes: number): Uint8Array => {
    const msg = new Uint8Array(n * (headBytes + extraRow));
    if (head) msg.set(head);
    let at = n * headBytes;
    for (const part of extraSend[j] ?? []) {
      msg.set(part, at);
      at += part.byteLength;
    }
    return msg;
  };
  if (isDeviceTensor(rows)) {
    const got = await g.allToAllVDevice!(rows, sendCounts, recvCounts, label, AGREED);
    if (!isDeviceTensor(got) || got.dtype !== dtype || got.shape.length !== 2 || got.shape[0] !== received || got.shape[1] !== hidden) {
      throw new Error(
        `${label}: the group's allToAllVDevice returned ${isDeviceTensor(got) ? `a ${got.dtype} [${got.shape.join(', ')}] tensor` : describe(got)} instead of ${dtype} [${received}, ${hidden}]`,
      );
    }
    if (extras.length === 0) return { rows: got, extras: [] };
    const send = sendCounts.map((n, j) => withExtras(j, n, undefined, 0));
    const recv = await exchange(
      g,
      send,
      recvCounts.map((n) => n * extraRow),
      label,
    );
    return { rows: got, extras: gatherParts(recv, recvCounts, 0, extras).extras };
  }
  const bytes = bytesOf((rows as Tensor<D>).data);
  const parts = splitRows(bytes, sendCounts, rowBytes);
  const send = extras.length === 0 ? parts : sendCounts.map((n, j) => withExtras(j, n, parts[j], rowBytes));
  const recv = await exchange(
    g,
    send,
    recvCounts.map((n) => n * (rowBytes + extraRow)),
    label,
  );
  const got = gatherParts(recv, recvCounts, rowBytes, extras);
  return { rows: rowsOf(dtype, received, hidden, got.rows), extras: got.extras };
}

/**
 * Sends this rank's `tokens [T, H]` to the ranks holding their experts and returns what this
 * rank received, grouped by its local experts. `routing` is the top-k picks (TokenDispatcher's
 * `{ indices, weights }`): `indices [T, k]` int32/int64 global expert ids (-1 = masked: not
 * dispatched), `weights [T, k]` float32. Every rank of the group must call it (concurrently, with
 * the same numExperts, k, hidden and dtype); a token whose experts live on several ranks goes to
 * each of them once, and a token with no pick goes nowhere.
 *
 * Device tokens (the cuda backend's, with a group that has `allToAllVDevice`: the NCCL group) stay
 * on the GPU: the rows are permuted, exchanged and permuted again there, and the results are
 * device tensors. The send side is made on the GPU too (the destination map, the counts, the
 * picks and weights that travel with each row: host picks and weights are checked and uploaded
 * first): only the counts (`2 size + 1` numbers, the exchange's sizes) are read back
 * (`MOE_DISPATCH_EP_SEND=host`: the picks and weights read back and the send side made on the
 * host, the same bits). Every rank must then pass device tokens.
 */
export async function dispatch<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  tokens: DeviceTensor<D>,
  routing: TopKRouting | { indices: AnyTensor<IndexDType>; weights: AnyTensor<'float32'> },
  options: DispatchOptions,
): Promise<DeviceDispatchResult<D>>;
export async function dispatch<D extends TokenDType>(group: ExpertParallelGroup, backend: Backend, tokens: Tensor<D>, routing: TopKRouting, options: DispatchOptions): Promise<DispatchResult<D>>;
export async function dispatch<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  tokens: AnyTensor<D>,
  routing: TopKRouting | { indices: AnyTensor<IndexDType>; weights: AnyTensor<'float32'> },
  options: DispatchOptions,
): Promise<DispatchResult<D> | DeviceDispatchResult<D>> {
  const op = 'dispatch';
  const a = checked(op, () => {
    const g = checkGroup(group);
    const moe = checkBackend(backend);
    const device = isDeviceTensor(tokens);
    if (device && typeof g.allToAllVDevice !== 'function') {
      throw new TypeError('tokens: a device tensor needs a group that moves device memory (createExpertParallelGroup, over NCCL); this group moves host bytes: pass host tensors (download())');
    }
    const x = device ? deviceMeta(tokens as DeviceTensor, 'tokens') : checkTensor(tokens, 'tokens', TOKENS);
    if (x.shape.length !== 2) throw new RangeError(`tokens.shape: expected [numTokens, hidden], got [${x.shape.join(', ')}]`);
    if (typeof routing !== 'object' || routing === null || !('indices' in routing) || !('weights' in routing)) {
      throw new TypeError(`routing: expected { indices, weights } (top-k picks [numTokens, k]), got ${describe(routing)}`);
    }
    // device tokens on the cuda backend: the send side runs on the GPU (sendOnGpu), so device
    // picks and weights stay there; elsewhere they are read on the host
    const ops = device ? gpuSendOps(moe) : undefined;
    const keep = <T>(v: T): T => (ops && isDeviceTensor(v) ? v : onHost(v));
    const indices = keep(routing.indices);
    const weights = keep(routing.weights);
    const im = isDeviceTensor(indices) ? deviceMeta(indices, 'routing.indices', ['int32']) : checkTensor(indices, 'routing.indices', ['int32', 'int64'] as const);
    const wm = isDeviceTensor(weights) ? deviceMeta(weights, 'routing.weights', ['float32']) : checkTensor(weights, 'routing.weights', ['float32'] as const);
    if (im.shape.length !== 2 || im.shape[0] !== x.shape[0]) {
      throw new RangeError(`routing.indices.shape: expected [${x.shape[0]}, k] ([numTokens of tokens, k]), got [${im.shape.join(', ')}]`);
    }
    if (wm.shape.length !== 2 || wm.shape[0] !== im.shape[0] || wm.shape[1] !== im.shape[1]) {
      throw new RangeError(`routing.weights.shape: expected [${im.shape.join(', ')}] (the shape of routing.indices), got [${wm.shape.join(', ')}]`);
    }
    const o = checkOptions<DispatchOptions>(options, op, ['numExperts']);
    if (o.numExperts === undefined) throw new TypeError('options.numExperts: expected a number (required), got undefined');
    const numExperts = sizeArg(o.numExperts, 'options.numExperts', 1);
    // host picks are checked here; device ones by the GPU's send plan
    const picks = isDeviceTensor(indices) ? undefined : picksOf(indices as Tensor<IndexDType>, numExperts);
    return { g, moe, ops, device, dtype: x.dtype as D, shape: x.shape, k: im.shape[1], indices, weights, numExperts, picks };
  });
  const { g, moe, ops, device, dtype, numExperts: E, k } = a;
  const [T, H] = a.shape;
  const N = g.size;
  const ranges = Array.from({ length: N }, (_, j) => moe.expertRangeForRank(E, N, j));
  const owner = new Int32Array(E);
  ranges.forEach(({ start, end }, j) => {
    owner.fill(j, start, end);
  });

  // The tokens grouped by destination rank, each once per rank: a permute by a [T, N] map. Its
  // counts and order (rank by rank, tokens ascending: permute's sortedIndices) are known before
  // it runs, so nothing of the permute is read back (device tokens: its kernels are only queued).
  const send = ops ? sendOnGpu(ops, moe, a.indices as AnyTensor<IndexDType>, a.weights as AnyTensor<'float32'>, a.picks, T, k, E, owner, N) : sendPlan(a.picks!, owner, T, k, N);
  const { sendMap, sendCounts, pickCounts, picks } = send;
  const numSent = sendCounts.reduce((s, c) => s + c, 0);
  const byRank = moe.permute(tokens as Tensor<D>, sendMap as Tensor<'bool'>, { numOutTokens: numSent });

  // Every rank's header and counts: what each rank receives, and a check that the ranks agree.
  const header = Int32Array.from([E, k, H, DTYPE_CODE[dtype], device ? 1 : 0, ...sendCounts, ...pickCounts]);
  const all = await g.allGather(header, op);
  if (!Array.isArray(all) || all.length !== N || all.some((h) => !(h instanceof Int32Array) || h.length !== HEADER.length + 2 * N)) {
    throw new Error(`${op}: the group's allGather returned ${describe(all)} instead of ${N} Int32Arrays of ${HEADER.length + 2 * N} values`);
  }
  for (let f = 0; f < HEADER.length; f++) {
    const odd = all.findIndex((h) => h[f] !== all[0][f]);
    if (odd >= 0) {
      const show = (v: number) => (f === 3 ? (Object.keys(DTYPE_CODE).find((d) => DTYPE_CODE[d as TokenDType] === v) ?? String(v)) : String(v));
      throw new RangeError(`${op}: the ranks disagree on ${HEADER[f]}: rank 0 has ${show(all[0][f])}, rank ${odd} has ${show(all[odd][f])}`);
    }
  }
  const recvCounts = all.map((h) => h[HEADER.length + g.rank]);
  // (every received pick a slot of the permute below: their count, as for the send side)
  const picked = all.reduce((s, h) => s + h[HEADER.length + N + g.rank], 0);
  const R = recvCounts.reduce((s, c) => s + c, 0);
  const range = ranges[g.rank];
  const L = range.end - range.start;

  // After each rank's rows: their picks as that rank's local expert ids (int32, -1 elsewhere) and
  // the weights (float32). On the GPU: made there and moved as rows of their own; else with the
  // rows' bytes. The [R, L] map and probs of what arrived are made where the rows are.
  let rows: AnyTensor<D>;
  let recvMap: AnyTensor<'bool'>;
  let probs: AnyTensor<'float32'>;
  let recvLocal: AnyTensor<'int32'>;
  if (ops) {
    const ex = ops.epRankExtras(byRank.sortedIndices as unknown as DeviceTensor<'int32'>, send.indices!, send.weights!, owner);
    const move = <X extends RowDType>(t: DeviceTensor<X>) => g.allToAllVDevice!(t, sendCounts, recvCounts, op, AGREED);
    rows = await move(byRank.permutedTokens as unknown as DeviceTensor<D>);
    recvLocal = await move(ex.local);
    const recvWeights = await move(ex.weights);
    release(ex.local, ex.weights, ...send.temps);
    const mh = moe.indicesToMultihot(recvLocal as unknown as Tensor<'int32'>, recvWeights as unknown as Tensor<'float32'>, L);
    release(recvWeights);
    [recvMap, probs] = [mh.routingMap, mh.probs];
  } else {
    const extraSend: Uint8Array[][] = [];
    const w = a.weights as Tensor<'float32'>;
    for (let j = 0, off = 0; j < N; off += sendCounts[j++]) {
      const { local, w: lw } = rankExtras(send.sorted!.subarray(off, off + sendCounts[j]), picks!, w.data, owner, j, ranges[j].start, k);
      extraSend.push([bytesOf(local), bytesOf(lw)]);
    }
    const got = await exchangeRows(g, byRank.permutedTokens as AnyTensor<D>, dtype, H, sendCounts, recvCounts, [4 * k, 4 * k], extraSend, op);
    rows = got.rows;
    const local = new Int32Array(got.extras[0].buffer);
    const picksT: Tensor<'int32'> = { dtype: 'int32', shape: [R, k], data: local };
    const weightsT: Tensor<'float32'> = { dtype: 'float32', shape: [R, k], data: new Float32Array(got.extras[1].buffer) };
    // (device tokens: the [R, k] picks and weights go up, and the [R, L] map and probs are made on
    // the GPU: O(R k) bytes over the bus instead of O(R L), and no host pass over the map)
    // (the picks stay where the rows are: dispatchBackward reads them there)
    const [picksIn, weightsIn] = device ? [uploadOf(moe)(picksT), uploadOf(moe)(weightsT)] : [picksT, weightsT];
    const mh = moe.indicesToMultihot(picksIn, weightsIn, L);
    release(weightsIn);
    [recvMap, probs, recvLocal] = [mh.routingMap, mh.probs, picksIn];
  }
  release(byRank.permutedTokens, byRank.tokensPerExpert);

  // What arrived, in source-rank order, permuted by local expert.
  const perm = moe.permute(rows as Tensor<D>, recvMap as Tensor<'bool'>, { probs: probs as Tensor<'float32'>, numOutTokens: picked });
  release(rows, probs);
  const permutedProbs = perm.permutedProbs!;
  const handle: DispatchHandle = Object.freeze({
    rank: g.rank,
    size: N,
    numExperts: E,
    topk: k,
    numTokens: T,
    hidden: H,
    dtype,
    expertRange: Object.freeze({ ...range }),
    sendCounts: Object.freeze(sendCounts),
    recvCounts: Object.freeze(recvCounts),
    numSlots: perm.permutedTokens.shape[0],
  });
  STATES.set(handle, {
    group: g,
    handle,
    owner,
    sendMap: sendMap as AnyTensor<'bool'>,
    numSent,
    sendSorted: byRank.sortedIndices,
    device,
    hostSend: device ? undefined : { picks: picks!, sorted: send.sorted! },
    recvLocal,
    numReceived: R,
    recvMap,
    recvSorted: perm.sortedIndices,
    // (a device tensor is never written in place; a host one is copied: the caller may)
    permutedProbs: isDeviceTensor(permutedProbs) ? permutedProbs : { dtype: 'float32', shape: [...permutedProbs.shape], data: permutedProbs.data.slice() },
  });
  return { permutedTokens: perm.permutedTokens, permutedProbs, tokensPerExpert: perm.tokensPerExpert, handle } as DispatchResult<D> | DeviceDispatchResult<D>;
}

/**
 * Sends `expertOutputs [numSlots, hidden]` (the rows of dispatch's `permutedTokens`, after the
 * experts; the dispatched dtype) back to the tokens' ranks and merges them: each token's row is
 * the sum of its experts' outputs weighted by their probs (`weighted: false`: as they are), in
 * the token order of dispatch's `tokens`. Tokens no expert picked get zeros. The merge order is
 * fixed (see the module's header): bit-identical from run to run. A device dispatch takes and
 * returns device tensors.
 */
export async function combine<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  expertOutputs: DeviceTensor<D>,
  handle: DispatchHandle,
  options?: CombineOptions,
): Promise<DeviceTensor<D>>;
export async function combine<D extends TokenDType>(group: ExpertParallelGroup, backend: Backend, expertOutputs: Tensor<D>, handle: DispatchHandle, options?: CombineOptions): Promise<Tensor<D>>;
export async function combine<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  expertOutputs: AnyTensor<D>,
  handle: DispatchHandle,
  options?: CombineOptions,
): Promise<AnyTensor<D>> {
  const op = 'combine';
  const { s, moe, y, weighted } = checked(op, () => {
    const g = checkGroup(group);
    const moe = checkBackend(backend);
    const s = stateOf(g, handle);
    const h = s.handle;
    const y = checkRows<D>(expertOutputs, 'expertOutputs', h.dtype, h.numSlots, h.hidden, "dispatch's permutedTokens", s.device);
    const o = checkOptions<CombineOptions>(options, op, ['weighted']);
    return { s, moe, y, weighted: checkBool(o.weighted, 'options.weighted') ?? true };
  });
  const h = s.handle;
  // One row per received token: its local experts' outputs merged in expert order.
  const partial = moe.unpermute(y, s.recvSorted as Tensor<'int32'>, [s.numReceived, h.hidden], weighted ? { probs: s.permutedProbs as Tensor<'float32'> } : undefined);
  const back = await exchangeRows(s.group, partial as AnyTensor<D>, h.dtype as D, h.hidden, h.recvCounts, h.sendCounts, [], [], op);
  release(partial);
  // The rows come back grouped by rank as the send permutation sent them: its unpermute sums each token's rows in rank order.
  const out = moe.unpermute(back.rows as Tensor<D>, s.sendSorted as Tensor<'int32'>, [h.numTokens, h.hidden]) as Tensor<D>;
  release(back.rows);
  // (unweighted, the backward needs only the rows' order: the outputs are not kept)
  s.combined = { expertOutputs: weighted ? y : undefined, weighted };
  return out;
}

/**
 * Backward of combine: `gradOutput [numTokens, hidden]` (the gradient of combine's output) to
 * the gradient of its `expertOutputs` on the ranks that computed them, and (weighted combines)
 * of dispatch's `permutedProbs`. Each slot's gradients equal the one-rank `unpermuteBackward`'s
 * bit for bit. A device dispatch takes and returns device tensors.
 */
export async function combineBackward<D extends TokenDType>(group: ExpertParallelGroup, backend: Backend, gradOutput: DeviceTensor<D>, handle: DispatchHandle): Promise<DeviceCombineGrads<D>>;
export async function combineBackward<D extends TokenDType>(group: ExpertParallelGroup, backend: Backend, gradOutput: Tensor<D>, handle: DispatchHandle): Promise<CombineGrads<D>>;
export async function combineBackward<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  gradOutput: AnyTensor<D>,
  handle: DispatchHandle,
): Promise<CombineGrads<D> | DeviceCombineGrads<D>> {
  const op = 'combineBackward';
  const { s, moe, grad, combined } = checked(op, () => {
    const g = checkGroup(group);
    const moe = checkBackend(backend);
    const s = stateOf(g, handle);
    const h = s.handle;
    const grad = checkRows<D>(gradOutput, 'gradOutput', h.dtype, h.numTokens, h.hidden, "combine's output", s.device);
    if (!s.combined) throw new Error(`${op}: call combine with this handle first`);
    return { s, moe, grad, combined: s.combined };
  });
  const h = s.handle;
  // Each token's gradient goes where the token went (the same send permutation).
  const byRank = moe.permute(grad, s.sendMap as Tensor<'bool'>, { numOutTokens: s.numSent });
  const got = await exchangeRows(s.group, byRank.permutedTokens as AnyTensor<D>, h.dtype as D, h.hidden, h.sendCounts, h.recvCounts, [], [], op);
  release(byRank.permutedTokens, byRank.sortedIndices, byRank.tokensPerExpert);
  if (!combined.weighted) {
    // each slot's gradient is its received token's row: the receive side's permute again (a copy; expertOutputs not needed)
    const p = moe.permute(got.rows as Tensor<D>, s.recvMap as Tensor<'bool'>, { numOutTokens: h.numSlots });
    release(got.rows, p.sortedIndices, p.tokensPerExpert);
    return { gradExpertOutputs: p.permutedTokens as Tensor<D> };
  }
  const ub = moe.unpermuteBackward(got.rows as Tensor<D>, combined.expertOutputs as Tensor<D>, s.recvSorted as Tensor<'int32'>, { probs: s.permutedProbs as Tensor<'float32'> });
  release(got.rows);
  return { gradExpertOutputs: ub.gradPermuted as Tensor<D>, gradPermutedProbs: ub.gradProbs! };
}

/**
 * Backward of dispatch: `gradPermuted [numSlots, hidden]` (the gradient of dispatch's
 * `permutedTokens` on this rank) and optionally the gradient of its `permutedProbs`, to the
 * gradients of the tokens and routing weights on the ranks they came from. A token's gradient
 * is the sum over its slots, per rank in expert order, then over the ranks in rank order. A
 * device dispatch takes a device `gradPermuted` and returns device tensors: the picks' prob
 * gradients travel back as device rows beside the token gradients, and no pick comes to the host.
 */
export async function dispatchBackward<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  gradPermuted: DeviceTensor<D>,
  handle: DispatchHandle,
  options?: { gradPermutedProbs?: AnyTensor<'float32'> },
): Promise<DeviceDispatchGrads<D>>;
export async function dispatchBackward<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  gradPermuted: Tensor<D>,
  handle: DispatchHandle,
  options?: DispatchBackwardOptions,
): Promise<DispatchGrads<D>>;
export async function dispatchBackward<D extends TokenDType>(
  group: ExpertParallelGroup,
  backend: Backend,
  gradPermuted: AnyTensor<D>,
  handle: DispatchHandle,
  options?: { gradPermutedProbs?: AnyTensor<'float32'> },
): Promise<DispatchGrads<D> | DeviceDispatchGrads<D>> {
  const op = 'dispatchBackward';
  const { s, moe, grad, gradProbs, deviceOps } = checked(op, () => {
    const g = checkGroup(group);
    const moe = checkBackend(backend);
    const s = stateOf(g, handle);
    const h = s.handle;
    const grad = checkRows<D>(gradPermuted, 'gradPermuted', h.dtype, h.numSlots, h.hidden, "dispatch's permutedTokens", s.device);
    const o = checkOptions<DispatchBackwardOptions>(options as DispatchBackwardOptions, op, ['gradPermutedProbs']);
    let gradProbs: AnyTensor<'float32'> | undefined;
    if (o.gradPermutedProbs !== undefined) {
      const meta = isDeviceTensor(o.gradPermutedProbs)
        ? deviceMeta(o.gradPermutedProbs, 'options.gradPermutedProbs', ['float32'])
        : checkTensor(o.gradPermutedProbs, 'options.gradPermutedProbs', ['float32'] as const);
      if (meta.shape.length !== 1 || meta.shape[0] !== h.numSlots) {
        throw new RangeError(`options.gradPermutedProbs.shape: expected [${h.numSlots}] (dispatch's permutedProbs), got [${meta.shape.join(', ')}]`);
      }
      gradProbs = o.gradPermutedProbs;
    }
    // (a device dispatch's backward runs on the cuda backend's own ops: checked before any work)
    return { s, moe, grad, gradProbs, deviceOps: s.device ? deviceBackwardOps(moe) : undefined };
  });
  const h = s.handle;
  const { topk: k, hidden: H } = h;
  const L = h.expertRange.end - h.expertRange.start;
  // Each received token's gradient: its local slots summed in expert order; its picks' prob gradients.
  const pb = moe.permuteBackward(
    grad,
    s.recvSorted as Tensor<'int32'>,
    s.numReceived,
    gradProbs ? { gradPermutedProbs: gradProbs as Tensor<'float32'>, routingMap: s.recvMap as Tensor<'bool'> } : undefined,
  );
  if (deviceOps) return dispatchBackwardDevice(s, moe, deviceOps, pb.gradTokens as unknown as DeviceTensor<D>, pb.gradProbs as unknown as DeviceTensor<'float32'> | undefined);
  const { picks, sorted } = s.hostSend!;
  const pickGrads = pb.gradProbs ? pickGradients((s.recvLocal as Tensor<'int32'>).data, (pb.gradProbs as Tensor<'float32'>).data, k, L) : new Float32Array(s.numReceived * k);
  const pickBytes = bytesOf(pickGrads);
  let off = 0;
  const extraSend = h.recvCounts.map((n) => {
    const part = [pickBytes.subarray(off * 4 * k, (off + n) * 4 * k)];
    off += n;
    return part;
  });
  const got = await exchangeRows(s.group, pb.gradTokens as Tensor<D>, h.dtype as D, H, h.recvCounts, h.sendCounts, [4 * k], extraSend, op);
  // The rows are the send permutation's slots: its backward sums each token's rows in rank order.
  const gradTokens = moe.permuteBackward(got.rows as Tensor<D>, s.sendSorted as Tensor<'int32'>, h.numTokens).gradTokens as Tensor<D>;
  const back = new Float32Array(got.extras[0].buffer, got.extras[0].byteOffset, got.extras[0].byteLength / 4);
  const gradWeights = new Float32Array(h.numTokens * k);
  for (let j = 0, off = 0; j < h.sendCounts.length; off += h.sendCounts[j++]) {
    scatterPickGradients(sorted.subarray(off, off + h.sendCounts[j]), back.subarray(off * k), picks, s.owner, j, k, gradWeights);
  }
  return { gradTokens, gradWeights: { dtype: 'float32', shape: [h.numTokens, k], data: gradWeights } };
}

/**
 * dispatchBackward on device tensors, all on the GPU: each received token's picks' prob
 * gradients (`gatherPicks` of the dense `[numReceived, L]` gradient at its local picks, 0
 * elsewhere) travel back as device rows beside the token gradients, and the source sums each
 * token's rows in rank order (permuteBackward by the send permutation), the `[numTokens, k]`
 * float32 pick gradients too: only the rank owning a pick's expert sent a value for it (the
 * others 0), so each is its owner's value (a float32 sum of it and zeros).
 */
async function dispatchBackwardDevice<D extends TokenDType>(
  s: State,
  moe: Backend,
  ops: Pick<CudaTrainOps, 'gatherPicks' | 'zeros'>,
  gradRows: DeviceTensor<D>,
  gradProbs: DeviceTensor<'float32'> | undefined,
): Promise<DeviceDispatchGrads<D>> {
  const op = 'dispatchBackward';
  const h = s.handle;
  const move = <X extends RowDType>(t: DeviceTensor<X>) => s.group.allToAllVDevice!(t, h.recvCounts, h.sendCounts, op, AGREED);
  const sendSorted = s.sendSorted as Tensor<'int32'>;
  const rows = await move(gradRows);
  release(gradRows);
  const gradTokens = moe.permuteBackward(rows as unknown as Tensor<D>, sendSorted, h.numTokens).gradTokens as unknown as DeviceTensor<D>;
  release(rows);
  if (!gradProbs) return { gradTokens, gradWeights: ops.zeros([h.numTokens, h.topk]) };
  const picked = ops.gatherPicks(gradProbs, s.recvLocal as DeviceTensor<'int32'>);
  release(gradProbs);
  const back = await move(picked);
  release(picked);
  const gradWeights = moe.permuteBackward(back as unknown as Tensor<'float32'>, sendSorted, h.numTokens).gradTokens as unknown as DeviceTensor<'float32'>;
  release(back);
  return { gradTokens, gradWeights };
}
