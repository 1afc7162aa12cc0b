/**
 * Grouped experts (forward and backward), matmul, and expert checkpoints in safetensors:
 * the interface, and its adapter over a binding. All the arithmetic and every format check
 * is the Rust core's (the adapter's own: copying out the rows `gatherIndices` names).
 */
import { checkTensor, type DType, type Tensor, type TokenDType } from '../tensor.js';
import type { Binding, CheckpointSource as SourceWire, LoadedExperts as LoadedWire } from '../generated/binding.js';
import { checkBool, checkDisjoint, checkNumber, checkOptions, INDICES, optWire, TOKENS, WIRE, wire, type Call, type TensorArgs, type WireTensor } from '../wire.js';
import type { ActivationKind } from './activations.js';

/**
 * Stacked expert weights of one rank. Gated activations take `gateAndUpProjs [E, dim, 2 * inter]`
 * (gate | up halves; interleaved gate, up pairs for quick_geglu); relu2 takes `upProjs [E, dim, inter]`.
 */
export interface ExpertWeights<D extends TokenDType = TokenDType> {
  gateAndUpProjs?: Tensor<D>;
  upProjs?: Tensor<D>;
  /** `[E, inter, dim]`. */
  downProjs: Tensor<D>;
}

export interface ExpertBiases {
  /** `[E, 2 * inter]` (`[E, inter]` for relu2). */
  gateUpProjBias?: Tensor<TokenDType>;
  /** `[E, dim]`, scaled by the slot's prob like the rest of the expert's output. */
  downProjBias?: Tensor<TokenDType>;
}

export interface ExpertsOptions {
  /** The activation between the projections (required); see `activation`. */
  activation: ActivationKind;
  /** `[N]` or `[N, 1]` float32: each slot's routing prob; the expert's output is scaled by it. */
  permutedProbs?: Tensor<'float32'>;
  biases?: ExpertBiases;
  alpha?: number;
  limit?: number;
  linearOffset?: number;
  /**
   * The experts' rows gathered from the tokens (int32 `[N]`, e.g. permute's `sortedIndices`):
   * `permutedTokens` is then the tokens in their own order, `[numTokens, hidden]`, and row r of the
   * experts' input is `permutedTokens[gatherIndices[r]]`; `tokensPerExpert`, `permutedProbs`, the
   * output and the backward's `gradTokens` are of the N rows. The same bits as the call on the
   * gathered rows (permute's `permutedTokens` for its `sortedIndices`). An index outside
   * `[0, numTokens)` is a RangeError naming it. The host backends copy the rows out; the cuda
   * backend's grouped GEMM can read them through the indices (no copy: `CudaBackend.expertsGatherOnLoad`).
   */
  gatherIndices?: Tensor<'int32'>;
}

/** expertsBackward's options: {@link ExpertsOptions} and where the output's gradient comes from. */
export interface ExpertsBackwardOptions extends ExpertsOptions {
  /**
   * `gradOutput` as the gradient of the tokens in their own order (`[numTokens, dim]`) and the
   * rows to take from it (int32 `[N]`): row r of the experts' output gradient is
   * `gradOutput[gradGatherIndices[r]]`. That is the backward of an unweighted `unpermute` (the
   * experts weighted their rows by `permutedProbs`): pass its `sortedIndices`, and no
   * `unpermuteBackward` is needed. The same bits as the call on the gathered rows; an index
   * outside `[0, numTokens)` is a RangeError naming it. The cuda backend gathers the rows
   * itself and, on its grouped GEMM, frees that copy as soon as `dW2` and the activation's
   * gradient have read it, so the rows' gradient (`[N, dim]`) never lives beside the
   * gradients made after it (the caller holds `[numTokens, dim]` only).
   */
  gradGatherIndices?: Tensor<'int32'>;
}

/** expertsForward's options: {@link ExpertsOptions} and a caller-owned output. */
export interface ExpertsForwardOptions<D extends TokenDType = TokenDType> extends ExpertsOptions {
  /**
   * A caller-owned `[N, dim]` tensor of permutedTokens' dtype, written instead of allocated and
   * returned (the same object), with the allocating call's bits. Checked (dtype: TypeError; shape,
   * or memory shared with an input: RangeError, naming `out`) before anything is written. The
   * cuda backend takes it with host tensors (the CPU op); with device tensors it is a TypeError.
   */
  out?: Tensor<D>;
}

export interface ExpertsGrads<D extends TokenDType = TokenDType> {
  /** `[N, dim]`, the dtype of the tokens. */
  gradTokens: Tensor<D>;
  /** Like `gateAndUpProjs` (gated activations). */
  gradGateAndUpProjs?: Tensor<TokenDType>;
  /** Like `upProjs` (relu2). */
  gradUpProjs?: Tensor<TokenDType>;
  /** Like `downProjs`. */
  gradDownProjs: Tensor<TokenDType>;
  /** The gradients of the biases that were given. */
  gradBiases?: ExpertBiases;
  /** Like `permutedProbs`, when given. */
  gradProbs?: Tensor<'float32'>;
}

export interface MatmulOptions {
  /** `a` is stored `[K, M]`. */
  transA?: boolean;
  /** `b` is stored `[N, K]`. */
  transB?: boolean;
}

export interface SaveSafetensorsOptions {
  /** `__metadata__` strings (e.g. `{ format: 'pt' }`). */
  metadata?: Record<string, string>;
}

/** `model.safetensors.index.json`: which shard file holds each tensor. */
export interface SafetensorsIndex {
  metadata?: Record<string, unknown>;
  weight_map: Record<string, string>;
}

/** A sharded checkpoint in memory. */
export interface ShardedCheckpoint {
  /** The index: the parsed `model.safetensors.index.json`, its text, or its bytes. */
  index: SafetensorsIndex | string | Uint8Array;
  /**
   * Shard files' bytes by the file name the index gives them. Only the shards a call reads must be
   * there: a needed shard that is absent is a RangeError naming it and the tensor that needs it.
   */
  shards: Record<string, Uint8Array>;
}

/**
 * Where a checkpoint is read from: one `.safetensors` file's bytes; a sharded checkpoint in memory;
 * or (native and cuda backends) a path to a `.safetensors` file, to a `model.safetensors.index.json`,
 * or to a directory holding `model.safetensors.index.json` or `model.safetensors`. Files and shards
 * are read lazily: a shard is opened only when a wanted tensor lives there.
 */
export type CheckpointSource = string | Uint8Array | ShardedCheckpoint;

/**
 * The key schemes of expert weights (docs/semantics.md): `stacked` (ours), `hf` (per-expert
 * `gate_proj` / `up_proj` / `down_proj`), `mixtral` (per-expert `w1` / `w3` / `w2`), `gpt_oss`
 * (fused `gate_up_proj [E, dim, 2 * inter]` interleaved, with biases), `llama4` (the same keys,
 * gate | up halves), `hf_fused` (transformers 5: `gate_up_proj [E, 2 * inter, dim]`,
 * `down_proj [E, dim, inter]`), `granite` (`input_linear` / `output_linear`).
 */
export type ExpertsFormat = 'stacked' | 'hf' | 'mixtral' | 'gpt_oss' | 'llama4' | 'hf_fused' | 'granite';

export interface LoadSafetensorsOptions {
  /** The tensors to read (default: all). A name the checkpoint lacks is a RangeError listing the nearest names it has. */
  names?: string[];
}

export interface LoadedSafetensors {
  /** By name: the requested order, or file by file in offset order. int64 tensors hold a BigInt64Array. */
  tensors: Record<string, Tensor>;
  /** The `__metadata__` of the files read (and a sharded index's `metadata`, as strings). */
  metadata: Record<string, string>;
  /** Bytes read: each opened file's 8-byte length and header, and the tensors' bytes. */
  bytesRead: number;
}

export interface CheckpointTensorInfo {
  name: string;
  /** A Tensor dtype, or the safetensors name of one moe-dispatch does not load (`'F8_E4M3'`, `'U8'`, ...). */
  dtype: string;
  shape: number[];
  /** The file that holds it (a shard's name; `''` for a single file given as bytes). */
  file: string;
}

export interface CheckpointInfo {
  /** Every tensor, file by file in offset order. */
  tensors: CheckpointTensorInfo[];
  metadata: Record<string, string>;
  /** The headers' bytes (every file is opened; no tensor data is read). */
  bytesRead: number;
}

export interface ExpertCheckpointOptions {
  /** The experts module's key, e.g. `'model.layers.0.mlp.experts'` (`''` for none). */
  prefix: string;
  /** Experts in the whole model (required): the checkpoint must hold exactly these. */
  numExperts: number;
  /** The activation decides the layout: relu2 has no gate, quick_geglu interleaves. */
  activation: ActivationKind;
  /** The key scheme to read (default: detected from the keys and shapes). */
  format?: ExpertsFormat;
}

export interface LoadExpertsOptions extends ExpertCheckpointOptions {
  /** Expert-parallel ranks (default 1) and this rank (default 0): loads `expertRangeForRank`'s experts. */
  epSize?: number;
  epRank?: number;
}

export interface LoadedExperts extends ExpertWeights {
  biases?: ExpertBiases;
  /** The global experts `[start, end)` loaded. */
  start: number;
  end: number;
  /** The key scheme found (or asked for). */
  format: ExpertsFormat;
  /** Bytes read from the source: the opened files' headers and the rank's bytes (0 for `stackExperts`). */
  bytesRead: number;
}

export interface UnstackExpertsOptions {
  prefix: string;
  activation: ActivationKind;
  biases?: ExpertBiases;
  /** Global id of the first stacked expert (a rank's `start`), for per-expert keys. Default 0. */
  firstExpert?: number;
  /** The key scheme to write (default `'hf'`). Fused schemes hold the given experts as one tensor each. */
  format?: ExpertsFormat;
}

export interface ExpertsOps {
  /** `a @ b` (`[M, K] @ [K, N]`, either transposed by option) in float32, rounded once to the dtype of `a`. */
  matmul<D extends TokenDType>(a: Tensor<D>, b: Tensor<TokenDType>, options?: MatmulOptions): Tensor<D>;
  /**
   * Every local expert's MLP on its contiguous block of `permutedTokens [N, dim]`
   * (`tokensPerExpert [E]` rows each): `(act(x W1 + b1) * p) W2 + b2 * p`. Experts without tokens are fine.
   * With `options.out` the result is written into that tensor and returned (see {@link ExpertsForwardOptions}).
   */
  expertsForward<D extends TokenDType>(permutedTokens: Tensor<D>, tokensPerExpert: Tensor<'int32' | 'int64'>, weights: ExpertWeights, options: ExpertsForwardOptions<D>): Tensor<D>;
  /** Backward of `expertsForward`: the gradients of the tokens, the weights, the given biases and probs. */
  expertsBackward<D extends TokenDType>(
    gradOutput: Tensor<D>,
    permutedTokens: Tensor<D>,
    tokensPerExpert: Tensor<'int32' | 'int64'>,
    weights: ExpertWeights,
    options: ExpertsBackwardOptions,
  ): ExpertsGrads<D>;
  /** A safetensors file's bytes (the safetensors crate's writer). */
  saveSafetensors(tensors: Record<string, Tensor>, options?: SaveSafetensorsOptions): Uint8Array;
  /** All tensors of a checkpoint, or the named ones (a path: native and cuda backends only); only their bytes are read. */
  loadSafetensors(source: CheckpointSource, options?: LoadSafetensorsOptions): LoadedSafetensors;
  /** Every tensor's name, dtype, shape and file, from the headers alone. */
  checkpointInfo(source: CheckpointSource): CheckpointInfo;
  /**
   * One expert-parallel rank's experts, stacked, from a checkpoint in any key scheme (`format`):
   * every expert's keys and the opened files' entries are checked first, then only the rank's bytes are read.
   */
  loadExperts(source: CheckpointSource, options: LoadExpertsOptions): LoadedExperts;
  /** Expert tensors in memory, in any key scheme (`format`, or detected), to stacked weights. */
  stackExperts(tensors: Record<string, Tensor>, options: ExpertCheckpointOptions): LoadedExperts;
  /** Stacked weights to the tensors of a key scheme (default `'hf'`: per-expert Linear weights `[out, in]`). */
  unstackExperts(weights: ExpertWeights, options: UnstackExpertsOptions): Record<string, Tensor>;
}

/** This family's functions of the bindings (generated from the Rust op table). */
export type ExpertsBinding = Pick<
  Binding,
  'matmul' | 'expertsForward' | 'expertsBackward' | 'safetensorsSave' | 'safetensorsLoad' | 'checkpointInfo' | 'loadExperts' | 'stackExperts' | 'unstackExperts'
>;

const EXPERTS_KNOWN: readonly (keyof ExpertsOptions)[] = ['activation', 'permutedProbs', 'biases', 'alpha', 'limit', 'linearOffset', 'gatherIndices'];
const FORWARD_KNOWN: readonly (keyof ExpertsForwardOptions)[] = [...EXPERTS_KNOWN, 'out'];
const BACKWARD_KNOWN: readonly (keyof ExpertsBackwardOptions)[] = [...EXPERTS_KNOWN, 'gradGatherIndices'];

/** A gather's argument names: the tensor in its own order, the indices option, what the tensor holds. */
type GatherNames = readonly [tensor: string, indices: string, holds: string];
const TOKENS_GATHER: GatherNames = ['permutedTokens', 'gatherIndices', 'the tokens in their own order'];
const GRAD_GATHER: GatherNames = ['gradOutput', 'gradGatherIndices', "the tokens' gradient in their own order"];

/**
 * The rows of `tokens` (`[T, hidden]`, host) that `gatherIndices` (int32 `[N]`) names, in its
 * order: the experts' input where the backend does not gather on load (ExpertsOptions.gatherIndices),
 * or under `names` another gather's (ExpertsBackwardOptions.gradGatherIndices).
 */
export function gatheredRows(tokens: unknown, gatherIndices: unknown, names: GatherNames = TOKENS_GATHER): Tensor<TokenDType> {
  const [tensorName, indicesName, holds] = names;
  const x = checkTensor(tokens, tensorName, TOKENS);
  const idx = checkTensor(gatherIndices, `options.${indicesName}`, ['int32']);
  if (x.shape.length !== 2) {
    throw new RangeError(`${tensorName}.shape: with ${indicesName}, expected ${holds}, [numTokens, hidden], got [${x.shape.join(', ')}]`);
  }
  if (idx.shape.length !== 1) throw new RangeError(`options.${indicesName}.shape: expected [numRows], got [${idx.shape.join(', ')}]`);
  const [t, h] = x.shape;
  const n = idx.shape[0];
  const src = x.data as Float32Array | Uint16Array;
  const out = new (src.constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(n * h);
  for (let r = 0; r < n; r++) {
    const v = idx.data[r];
    if (v < 0 || v >= t) throw new RangeError(`${indicesName}: element ${r} = ${v} is outside [0, ${t}) (a row of ${tensorName}, ${holds})`);
    out.set(src.subarray(v * h, (v + 1) * h), r * h);
  }
  return { dtype: x.dtype, shape: [n, h], data: out } as Tensor<TokenDType>;
}

/** `permutedTokens` as the experts read it: the tokens as given, or the rows `options.gatherIndices` names (a host copy). */
function expertRows(permutedTokens: unknown, options: unknown): unknown {
  const g = typeof options === 'object' && options !== null ? (options as ExpertsOptions).gatherIndices : undefined;
  return g === undefined ? permutedTokens : gatheredRows(permutedTokens, g);
}

/** `gradOutput` as the backward reads it: as given, or the rows `options.gradGatherIndices` names (a host copy). */
function gradRows(gradOutput: unknown, options: unknown): unknown {
  const g = typeof options === 'object' && options !== null ? (options as ExpertsBackwardOptions).gradGatherIndices : undefined;
  return g === undefined ? gradOutput : gatheredRows(gradOutput, g, GRAD_GATHER);
}

function kindOf(value: unknown, arg: string): ActivationKind | undefined {
  if (value !== undefined && typeof value !== 'string') throw new TypeError(`${arg}: expected a string, got ${typeof value}`);
  return value as ActivationKind | undefined;
}

/** The up-projection weight and the name it goes by (gateAndUpProjs, or upProjs for relu2). */
function upWeight<T>(t: TensorArgs<T>, weights: unknown, kind: string | undefined): [T, string] {
  if (typeof weights !== 'object' || weights === null) throw new TypeError(`weights: expected { gateAndUpProjs | upProjs, downProjs }, got ${weights === null ? 'null' : typeof weights}`);
  // Other keys are allowed, so a `loadExperts` / `stackExperts` result can be passed as it is.
  const w = weights as ExpertWeights;
  const name = kind === 'relu2' ? 'upProjs' : 'gateAndUpProjs';
  const other = kind === 'relu2' ? 'gateAndUpProjs' : 'upProjs';
  if (w[other] !== undefined) throw new TypeError(`weights.${other}: not used by activation '${kind}' (it takes weights.${name})`);
  if (w[name] === undefined) throw new TypeError(`weights.${name}: expected a Tensor (activation '${kind}'), got undefined`);
  return [t.of(w[name], `weights.${name}`, TOKENS), name];
}

/**
 * A grouped-experts call's arguments as the bindings take them (the up projection under its own
 * name; `t`: how the tensors go in, `counts`: the dtypes tokensPerExpert may have there; `known`:
 * the options the op takes).
 */
export function expertArgs<T>(
  t: TensorArgs<T>,
  permutedTokens: unknown,
  tokensPerExpert: unknown,
  weights: unknown,
  options: unknown,
  op: string,
  known: readonly string[] = EXPERTS_KNOWN,
  counts: readonly DType[] = INDICES,
) {
  const o = checkOptions<ExpertsForwardOptions>(options, op, known as (keyof ExpertsForwardOptions)[]);
  const kind = kindOf(o.activation, 'options.activation');
  const [w1, w1Name] = upWeight(t, weights, kind);
  const b = o.biases === undefined ? {} : checkOptions<ExpertBiases>(o.biases, 'biases', ['gateUpProjBias', 'downProjBias']);
  return {
    permutedTokens: t.of(permutedTokens, 'permutedTokens', TOKENS),
    tokensPerExpert: t.of(tokensPerExpert, 'tokensPerExpert', counts),
    [w1Name]: w1,
    downProjs: t.of((weights as ExpertWeights).downProjs, 'weights.downProjs', TOKENS),
    kind,
    permutedProbs: t.opt(o.permutedProbs, 'permutedProbs', ['float32']),
    gateUpProjBias: t.opt(b.gateUpProjBias, 'biases.gateUpProjBias', TOKENS),
    downProjBias: t.opt(b.downProjBias, 'biases.downProjBias', TOKENS),
    alpha: checkNumber(o.alpha, 'options.alpha'),
    limit: checkNumber(o.limit, 'options.limit'),
    linearOffset: checkNumber(o.linearOffset, 'options.linearOffset'),
  } as { permutedTokens: T; tokensPerExpert: T; gateAndUpProjs?: T; upProjs?: T; downProjs: T };
}

/** expertsBackward's result as a binding returns it (`T`: how it holds a tensor; napi-rs gives null for an absent one). */
export interface ExpertsGradsOut<T> {
  gradTokens: T;
  gradGateAndUpProjs: T;
  gradDownProjs: T;
  gradGateUpProjBias?: T | null;
  gradDownProjBias?: T | null;
  gradProbs?: T | null;
}

/** expertsBackward's result: the up projection's gradient under its weight's name, the biases' under gradBiases, absent ones left out. */
export function expertsGrads<T>(out: ExpertsGradsOut<T>, upProjs: boolean) {
  const grads: { gradTokens: T; gradGateAndUpProjs?: T; gradUpProjs?: T; gradDownProjs: T; gradBiases?: { gateUpProjBias?: T; downProjBias?: T }; gradProbs?: T } = {
    gradTokens: out.gradTokens,
    gradDownProjs: out.gradDownProjs,
  };
  if (upProjs) grads.gradUpProjs = out.gradGateAndUpProjs;
  else grads.gradGateAndUpProjs = out.gradGateAndUpProjs;
  const gb: { gateUpProjBias?: T; downProjBias?: T } = {};
  if (present(out.gradGateUpProjBias)) gb.gateUpProjBias = out.gradGateUpProjBias as T;
  if (present(out.gradDownProjBias)) gb.downProjBias = out.gradDownProjBias as T;
  if (Object.keys(gb).length) grads.gradBiases = gb;
  if (present(out.gradProbs)) grads.gradProbs = out.gradProbs as T;
  return grads;
}

const present = <T>(v: T | null | undefined): T | undefined => (v === null ? undefined : v);

function named(tensors: unknown, arg: string): Record<string, WireTensor> {
  if (typeof tensors !== 'object' || tensors === null || Array.isArray(tensors))
    throw new TypeError(`${arg}: expected an object of named tensors, got ${Array.isArray(tensors) ? 'an Array' : typeof tensors}`);
  return Object.fromEntries(Object.keys(tensors).map((n) => [n, wire((tensors as Record<string, unknown>)[n], n)]));
}

const describeValue = (v: unknown): string => (v === null ? 'null' : Array.isArray(v) ? 'an Array' : ArrayBuffer.isView(v) ? v.constructor.name : typeof v);
const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v);

/** The index as json bytes: the parsed object, its text, or its bytes (the core parses and checks it). */
function indexBytes(value: unknown): Uint8Array {
  if (value instanceof Uint8Array) return value;
  if (typeof value === 'string') return new TextEncoder().encode(value);
  if (isPlainObject(value)) return new TextEncoder().encode(JSON.stringify(value));
  throw new TypeError(`source.index: expected the parsed model.safetensors.index.json, its text or its bytes, got ${describeValue(value)}`);
}

/** A checkpoint source as the bindings take it. */
function source(value: unknown): SourceWire {
  if (typeof value === 'string') return { path: value };
  if (value instanceof Uint8Array) return { bytes: value };
  if (isPlainObject(value)) {
    const extra = Object.keys(value).find((k) => k !== 'index' && k !== 'shards');
    if (extra !== undefined) throw new TypeError(`source.${extra}: not a key of a sharded checkpoint source { index, shards }`);
    const index = indexBytes(value.index);
    const shards = value.shards;
    if (!isPlainObject(shards)) throw new TypeError(`source.shards: expected an object of shard files' bytes by file name, got ${describeValue(shards)}`);
    for (const [n, b] of Object.entries(shards)) {
      if (!(b instanceof Uint8Array)) throw new TypeError(`source.shards['${n}']: expected a Uint8Array (the shard file's bytes), got ${describeValue(b)}`);
    }
    return { index, shards: shards as Record<string, Uint8Array> };
  }
  throw new TypeError(`source: expected a path, a Uint8Array (one .safetensors file) or { index, shards } (a sharded checkpoint), got ${describeValue(value)}`);
}

/** int64 tensors come from the bindings as little-endian bytes. */
function fromWire(t: Tensor): Tensor {
  if (t.dtype !== 'int64' || !(t.data instanceof Uint8Array)) return t;
  const bytes = new Uint8Array(t.data.byteLength);
  bytes.set(t.data as Uint8Array);
  return { dtype: 'int64', shape: t.shape, data: new BigInt64Array(bytes.buffer) };
}

function formatOf(value: unknown): string | undefined {
  if (value !== undefined && typeof value !== 'string')
    throw new TypeError(`options.format: expected a string (one of 'stacked', 'hf', 'mixtral', 'gpt_oss', 'llama4', 'hf_fused', 'granite'), got ${typeof value}`);
  return value;
}

function size(value: unknown, arg: string, fallback?: number): number {
  if (value === undefined && fallback !== undefined) return fallback;
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  return value;
}

function loaded(out: LoadedWire, kind: string | undefined): LoadedExperts {
  const up = kind === 'relu2' ? { upProjs: out.gateAndUpProjs } : { gateAndUpProjs: out.gateAndUpProjs };
  const biases: ExpertBiases = {};
  if (present(out.gateUpProjBias)) biases.gateUpProjBias = out.gateUpProjBias as Tensor<TokenDType>;
  if (present(out.downProjBias)) biases.downProjBias = out.downProjBias as Tensor<TokenDType>;
  return {
    ...up,
    downProjs: out.downProjs as Tensor<TokenDType>,
    ...(Object.keys(biases).length ? { biases } : {}),
    start: out.start,
    end: out.end,
    format: out.format as ExpertsFormat,
    bytesRead: out.bytesRead,
  } as LoadedExperts;
}

function record(tensors: Record<string, Tensor>): Record<string, Tensor> {
  const r: Record<string, Tensor> = {};
  for (const n of Object.keys(tensors)) r[n] = fromWire(tensors[n]);
  return r;
}

const CKPT_KNOWN: readonly (keyof LoadExpertsOptions)[] = ['prefix', 'numExperts', 'activation', 'format', 'epSize', 'epRank'];

function prefixOf(value: unknown): string {
  if (typeof value !== 'string') throw new TypeError(`options.prefix: expected a string, got ${typeof value}`);
  return value;
}

export function expertsOps(call: Call<ExpertsBinding>): ExpertsOps {
  return {
    matmul(a, b, options) {
      return call('matmul', (bd) => {
        const o = checkOptions<MatmulOptions>(options, 'matmul', ['transA', 'transB']);
        return bd.matmul({ a: wire(a, 'a', TOKENS), b: wire(b, 'b', TOKENS), transA: checkBool(o.transA, 'options.transA'), transB: checkBool(o.transB, 'options.transB') });
      }) as Tensor<never>;
    },
    expertsForward(permutedTokens, tokensPerExpert, weights, options) {
      return call('expertsForward', (b) => {
        const args = expertArgs(WIRE, expertRows(permutedTokens, options), tokensPerExpert, weights, options, 'expertsForward', FORWARD_KNOWN);
        const o = (options ?? {}) as ExpertsForwardOptions; // an object: checked by expertArgs
        const out = optWire(o.out, 'out', TOKENS);
        const w = weights as ExpertWeights;
        const inputs = {
          permutedTokens,
          tokensPerExpert,
          'weights.gateAndUpProjs': w.gateAndUpProjs,
          'weights.upProjs': w.upProjs,
          'weights.downProjs': w.downProjs,
          permutedProbs: o.permutedProbs,
          'biases.gateUpProjBias': o.biases?.gateUpProjBias,
          'biases.downProjBias': o.biases?.downProjBias,
        };
        checkDisjoint({ out: o.out }, inputs);
        const y = b.expertsForward({ ...args, out });
        return o.out ?? y;
      }) as Tensor<never>;
    },
    expertsBackward(gradOutput, permutedTokens, tokensPerExpert, weights, options) {
      return call('expertsBackward', (b) => {
        const args = expertArgs(WIRE, expertRows(permutedTokens, options), tokensPerExpert, weights, options, 'expertsBackward', BACKWARD_KNOWN);
        return expertsGrads(b.expertsBackward({ gradOutput: wire(gradRows(gradOutput, options), 'gradOutput', TOKENS), ...args }), args.upProjs !== undefined);
      }) as ExpertsGrads<never>;
    },
    saveSafetensors(tensors, options) {
      return call('saveSafetensors', (b) => {
        const o = checkOptions<SaveSafetensorsOptions>(options, 'saveSafetensors', ['metadata']);
        const wires = named(tensors, 'tensors');
        const meta = o.metadata ?? {};
        if (typeof meta !== 'object' || meta === null) throw new TypeError(`options.metadata: expected an object of strings, got ${typeof meta}`);
        for (const k of Object.keys(meta)) if (typeof meta[k] !== 'string') throw new TypeError(`options.metadata.${k}: expected a string, got ${typeof meta[k]}`);
        return b.safetensorsSave({ tensors: wires, metadata: meta });
      });
    },
    loadSafetensors(src, options) {
      return call('loadSafetensors', (b) => {
        const o = checkOptions<LoadSafetensorsOptions>(options, 'loadSafetensors', ['names']);
        if (o.names !== undefined && (!Array.isArray(o.names) || o.names.some((n) => typeof n !== 'string'))) throw new TypeError('options.names: expected an array of strings');
        const out = b.safetensorsLoad({ source: source(src), names: o.names });
        return { tensors: record(out.tensors), metadata: out.metadata, bytesRead: out.bytesRead };
      });
    },
    checkpointInfo(src) {
      return call('checkpointInfo', (b) => {
        const out = b.checkpointInfo({ source: source(src) });
        return { tensors: out.tensors.map(({ name, dtype, shape, file }) => ({ name, dtype, shape, file })), metadata: out.metadata, bytesRead: out.bytesRead };
      });
    },
    loadExperts(src, options) {
      return call('loadExperts', (b) => {
        const o = checkOptions<LoadExpertsOptions>(options, 'loadExperts', CKPT_KNOWN);
        const kind = kindOf(o.activation, 'options.activation');
        const format = formatOf(o.format);
        const out = b.loadExperts({
          source: source(src),
          prefix: prefixOf(o.prefix),
          numExperts: size(o.numExperts, 'options.numExperts'),
          epSize: size(o.epSize, 'options.epSize', 1),
          epRank: size(o.epRank, 'options.epRank', 0),
          kind,
          format,
        });
        return loaded(out, kind);
      });
    },
    stackExperts(tensors, options) {
      return call('stackExperts', (b) => {
        const o = checkOptions<ExpertCheckpointOptions>(options, 'stackExperts', ['prefix', 'numExperts', 'activation', 'format']);
        const kind = kindOf(o.activation, 'options.activation');
        const format = formatOf(o.format);
        const wires = named(tensors, 'tensors');
        return loaded(b.stackExperts({ tensors: wires, prefix: prefixOf(o.prefix), numExperts: size(o.numExperts, 'options.numExperts'), kind, format }), kind);
      });
    },
    unstackExperts(weights, options) {
      return call('unstackExperts', (b) => {
        const o = checkOptions<UnstackExpertsOptions>(options, 'unstackExperts', ['prefix', 'activation', 'biases', 'firstExpert', 'format']);
        const kind = kindOf(o.activation, 'options.activation');
        const [w1] = upWeight(WIRE, weights, kind);
        const bias = o.biases === undefined ? {} : checkOptions<ExpertBiases>(o.biases, 'biases', ['gateUpProjBias', 'downProjBias']);
        const out = b.unstackExperts({
          prefix: prefixOf(o.prefix),
          gateAndUpProjs: w1,
          downProjs: wire((weights as ExpertWeights).downProjs, 'weights.downProjs', TOKENS),
          gateUpProjBias: optWire(bias.gateUpProjBias, 'biases.gateUpProjBias', TOKENS),
          downProjBias: optWire(bias.downProjBias, 'biases.downProjBias', TOKENS),
          kind,
          firstExpert: o.firstExpert === undefined ? undefined : size(o.firstExpert, 'options.firstExpert'),
          format: formatOf(o.format),
        });
        return record(out);
      });
    },
  };
}
