/**
 * Grouped experts (forward and backward), matmul, and expert checkpoints in safetensors:
 * the interface, and its adapter over a binding. All the arithmetic and every format check
 * is the Rust core's.
 */
import type { Tensor, TokenDType } from '../tensor.js';
import { checkBool, checkNumber, checkOptions, INDICES, optWire, TOKENS, wire, type Call, type WireTensor } from '../wire.js';
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

export interface LoadedSafetensors {
  /** By name, in file order. */
  tensors: Record<string, Tensor>;
  metadata: Record<string, string>;
}

export interface ExpertCheckpointOptions {
  /** The experts module's key, e.g. `'model.layers.0.mlp.experts'` (`''` for none). */
  prefix: string;
  /** Experts in the whole model (required): the checkpoint must hold exactly these. */
  numExperts: number;
  /** The activation decides the layout: relu2 has no gate, quick_geglu interleaves. */
  activation: ActivationKind;
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
  /** The checkpoint's layout: stacked tensors or Hugging Face per-expert keys. */
  format: 'stacked' | 'hf';
  /** Bytes read from the source, header included (0 for `stackExperts`). */
  bytesRead: number;
}

export interface UnstackExpertsOptions {
  prefix: string;
  activation: ActivationKind;
  biases?: ExpertBiases;
  /** Global id of the first stacked expert (a rank's `start`). Default 0. */
  firstExpert?: number;
}

export interface ExpertsOps {
  /** `a @ b` (`[M, K] @ [K, N]`, either transposed by option) in float32, rounded once to the dtype of `a`. */
  matmul<D extends TokenDType>(a: Tensor<D>, b: Tensor<TokenDType>, options?: MatmulOptions): Tensor<D>;
  /**
   * Every local expert's MLP on its contiguous block of `permutedTokens [N, dim]`
   * (`tokensPerExpert [E]` rows each): `(act(x W1 + b1) * p) W2 + b2 * p`. Experts without tokens are fine.
   */
  expertsForward<D extends TokenDType>(permutedTokens: Tensor<D>, tokensPerExpert: Tensor<'int32' | 'int64'>, weights: ExpertWeights, options: ExpertsOptions): Tensor<D>;
  /** Backward of `expertsForward`: the gradients of the tokens, the weights, the given biases and probs. */
  expertsBackward<D extends TokenDType>(gradOutput: Tensor<D>, permutedTokens: Tensor<D>, tokensPerExpert: Tensor<'int32' | 'int64'>, weights: ExpertWeights, options: ExpertsOptions): ExpertsGrads<D>;
  /** A safetensors file's bytes (the safetensors crate's writer). */
  saveSafetensors(tensors: Record<string, Tensor>, options?: SaveSafetensorsOptions): Uint8Array;
  /** Reads a safetensors file (a path: native backend only) or buffer, all tensors or the named ones. */
  loadSafetensors(source: string | Uint8Array, options?: { names?: string[] }): LoadedSafetensors;
  /**
   * One expert-parallel rank's experts, stacked, from a checkpoint with stacked keys or Hugging Face
   * per-expert keys: the header is checked for every expert, and only the rank's bytes are read.
   */
  loadExperts(source: string | Uint8Array, options: LoadExpertsOptions): LoadedExperts;
  /** Hugging Face per-expert tensors (`{prefix}.{i}.gate_proj.weight` ...) to stacked weights. */
  stackExperts(tensors: Record<string, Tensor>, options: ExpertCheckpointOptions): LoadedExperts;
  /** Stacked weights to Hugging Face per-expert tensors (Linear weights `[out, in]`). */
  unstackExperts(weights: ExpertWeights, options: UnstackExpertsOptions): Record<string, Tensor>;
}

interface LoadedWire {
  gateAndUpProjs: Tensor;
  downProjs: Tensor;
  gateUpProjBias?: Tensor | null;
  downProjBias?: Tensor | null;
  start: number;
  end: number;
  format: string;
  bytesRead: number;
}

interface NamedWire {
  names: string[];
  tensors: Tensor[];
  metadataKeys: string[];
  metadataValues: string[];
}

/** The positional arguments the grouped-experts functions of a binding take (`T`: its tensor handle). */
export type ExpertsPositional<T> = [
  permutedTokens: T,
  tokensPerExpert: T,
  gateAndUpProjs: T,
  gateAndUpName: string,
  downProjs: T,
  kind: string | undefined,
  permutedProbs: T | undefined,
  gateUpProjBias: T | undefined,
  downProjBias: T | undefined,
  alpha: number | undefined,
  limit: number | undefined,
  linearOffset: number | undefined,
];

/** The positional functions both bindings export for this family. */
export interface ExpertsBinding {
  matmul(a: WireTensor, b: WireTensor, transA: boolean | undefined, transB: boolean | undefined): Tensor;
  expertsForward(...args: ExpertsPositional<WireTensor>): Tensor;
  expertsBackward(
    ...args: [gradOutput: WireTensor, ...ExpertsPositional<WireTensor>]
  ): { gradTokens: Tensor; gradGateAndUpProjs: Tensor; gradDownProjs: Tensor; gradGateUpProjBias?: Tensor | null; gradDownProjBias?: Tensor | null; gradProbs?: Tensor | null };
  safetensorsSave(names: string[], tensors: WireTensor[], metadataKeys: string[] | undefined, metadataValues: string[] | undefined): Uint8Array;
  safetensorsLoad(path: string | undefined, bytes: Uint8Array | undefined, names: string[] | undefined): NamedWire;
  loadExperts(path: string | undefined, bytes: Uint8Array | undefined, prefix: string, numExperts: number, epSize: number, epRank: number, kind: string | undefined): LoadedWire;
  stackExperts(names: string[], tensors: WireTensor[], prefix: string, numExperts: number, kind: string | undefined): LoadedWire;
  unstackExperts(prefix: string, gateAndUpProjs: WireTensor, downProjs: WireTensor, gateUpProjBias: WireTensor | undefined, downProjBias: WireTensor | undefined, kind: string | undefined, firstExpert: number | undefined): NamedWire;
}

const EXPERTS_KNOWN: readonly (keyof ExpertsOptions)[] = ['activation', 'permutedProbs', 'biases', 'alpha', 'limit', 'linearOffset'];

function kindOf(value: unknown, arg: string): ActivationKind | undefined {
  if (value !== undefined && typeof value !== 'string') throw new TypeError(`${arg}: expected a string, got ${typeof value}`);
  return value as ActivationKind | undefined;
}

/** The up-projection weight and the name it goes by (gateAndUpProjs, or upProjs for relu2). */
function upWeight(weights: unknown, kind: string | undefined): [WireTensor, string] {
  if (typeof weights !== 'object' || weights === null) throw new TypeError(`weights: expected { gateAndUpProjs | upProjs, downProjs }, got ${weights === null ? 'null' : typeof weights}`);
  // Other keys are allowed, so a `loadExperts` / `stackExperts` result can be passed as it is.
  const w = weights as ExpertWeights;
  const name = kind === 'relu2' ? 'upProjs' : 'gateAndUpProjs';
  const other = kind === 'relu2' ? 'gateAndUpProjs' : 'upProjs';
  if (w[other] !== undefined) throw new TypeError(`weights.${other}: not used by activation '${kind}' (it takes weights.${name})`);
  if (w[name] === undefined) throw new TypeError(`weights.${name}: expected a Tensor (activation '${kind}'), got undefined`);
  return [wire(w[name], `weights.${name}`, TOKENS), name];
}

function expertArgs(permutedTokens: unknown, tokensPerExpert: unknown, weights: unknown, options: unknown, op: string) {
  const o = checkOptions<ExpertsOptions>(options, op, EXPERTS_KNOWN);
  const kind = kindOf(o.activation, 'options.activation');
  const [w1, w1Name] = upWeight(weights, kind);
  const b = o.biases === undefined ? {} : checkOptions<ExpertBiases>(o.biases, 'biases', ['gateUpProjBias', 'downProjBias']);
  return [
    wire(permutedTokens, 'permutedTokens', TOKENS),
    wire(tokensPerExpert, 'tokensPerExpert', INDICES),
    w1,
    w1Name,
    wire((weights as ExpertWeights).downProjs, 'weights.downProjs', TOKENS),
    kind,
    optWire(o.permutedProbs, 'permutedProbs', ['float32']),
    optWire(b.gateUpProjBias, 'biases.gateUpProjBias', TOKENS),
    optWire(b.downProjBias, 'biases.downProjBias', TOKENS),
    checkNumber(o.alpha, 'options.alpha'),
    checkNumber(o.limit, 'options.limit'),
    checkNumber(o.linearOffset, 'options.linearOffset'),
  ] as const;
}

const present = <T>(v: T | null | undefined): T | undefined => (v === null ? undefined : v);

function named(tensors: unknown, arg: string): [string[], WireTensor[]] {
  if (typeof tensors !== 'object' || tensors === null || Array.isArray(tensors)) throw new TypeError(`${arg}: expected an object of named tensors, got ${Array.isArray(tensors) ? 'an Array' : typeof tensors}`);
  const names = Object.keys(tensors);
  return [names, names.map((n) => wire((tensors as Record<string, unknown>)[n], n))];
}

function source(value: unknown): [string | undefined, Uint8Array | undefined] {
  if (typeof value === 'string') return [value, undefined];
  if (value instanceof Uint8Array) return [undefined, value];
  throw new TypeError(`source: expected a file path or a Uint8Array, got ${value === null ? 'null' : typeof value}`);
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
    format: out.format as 'stacked' | 'hf',
    bytesRead: out.bytesRead,
  } as LoadedExperts;
}

function record(out: NamedWire): Record<string, Tensor> {
  const r: Record<string, Tensor> = {};
  out.names.forEach((n, i) => (r[n] = out.tensors[i]));
  return r;
}

const CKPT_KNOWN: readonly (keyof LoadExpertsOptions)[] = ['prefix', 'numExperts', 'activation', 'epSize', 'epRank'];

function prefixOf(value: unknown): string {
  if (typeof value !== 'string') throw new TypeError(`options.prefix: expected a string, got ${typeof value}`);
  return value;
}

export function expertsOps(call: Call<ExpertsBinding>): ExpertsOps {
  return {
    matmul(a, b, options) {
      return call('matmul', (bd) => {
        const o = checkOptions<MatmulOptions>(options, 'matmul', ['transA', 'transB']);
        return bd.matmul(wire(a, 'a', TOKENS), wire(b, 'b', TOKENS), checkBool(o.transA, 'options.transA'), checkBool(o.transB, 'options.transB'));
      }) as Tensor<never>;
    },
    expertsForward(permutedTokens, tokensPerExpert, weights, options) {
      return call('expertsForward', (b) => b.expertsForward(...expertArgs(permutedTokens, tokensPerExpert, weights, options, 'expertsForward'))) as Tensor<never>;
    },
    expertsBackward(gradOutput, permutedTokens, tokensPerExpert, weights, options) {
      return call('expertsBackward', (b) => {
        const args = expertArgs(permutedTokens, tokensPerExpert, weights, options, 'expertsBackward');
        const out = b.expertsBackward(wire(gradOutput, 'gradOutput', TOKENS), ...args);
        const grads: ExpertsGrads = { gradTokens: out.gradTokens as Tensor<TokenDType>, gradDownProjs: out.gradDownProjs as Tensor<TokenDType> };
        if (args[3] === 'upProjs') grads.gradUpProjs = out.gradGateAndUpProjs as Tensor<TokenDType>;
        else grads.gradGateAndUpProjs = out.gradGateAndUpProjs as Tensor<TokenDType>;
        const gb: ExpertBiases = {};
        if (present(out.gradGateUpProjBias)) gb.gateUpProjBias = out.gradGateUpProjBias as Tensor<TokenDType>;
        if (present(out.gradDownProjBias)) gb.downProjBias = out.gradDownProjBias as Tensor<TokenDType>;
        if (Object.keys(gb).length) grads.gradBiases = gb;
        if (present(out.gradProbs)) grads.gradProbs = out.gradProbs as Tensor<'float32'>;
        return grads;
      }) as ExpertsGrads<never>;
    },
    saveSafetensors(tensors, options) {
      return call('saveSafetensors', (b) => {
        const o = checkOptions<SaveSafetensorsOptions>(options, 'saveSafetensors', ['metadata']);
        const [names, wires] = named(tensors, 'tensors');
        const meta = o.metadata ?? {};
        if (typeof meta !== 'object' || meta === null) throw new TypeError(`options.metadata: expected an object of strings, got ${typeof meta}`);
        const keys = Object.keys(meta);
        for (const k of keys) if (typeof meta[k] !== 'string') throw new TypeError(`options.metadata.${k}: expected a string, got ${typeof meta[k]}`);
        return b.safetensorsSave(names, wires, keys, keys.map((k) => meta[k]));
      });
    },
    loadSafetensors(src, options) {
      return call('loadSafetensors', (b) => {
        const o = checkOptions<{ names?: string[] }>(options, 'loadSafetensors', ['names']);
        if (o.names !== undefined && (!Array.isArray(o.names) || o.names.some((n) => typeof n !== 'string'))) throw new TypeError('options.names: expected an array of strings');
        const out = b.safetensorsLoad(...source(src), o.names);
        const metadata: Record<string, string> = {};
        out.metadataKeys.forEach((k, i) => (metadata[k] = out.metadataValues[i]));
        return { tensors: record(out), metadata };
      });
    },
    loadExperts(src, options) {
      return call('loadExperts', (b) => {
        const o = checkOptions<LoadExpertsOptions>(options, 'loadExperts', CKPT_KNOWN);
        const kind = kindOf(o.activation, 'options.activation');
        const out = b.loadExperts(...source(src), prefixOf(o.prefix), size(o.numExperts, 'options.numExperts'), size(o.epSize, 'options.epSize', 1), size(o.epRank, 'options.epRank', 0), kind);
        return loaded(out, kind);
      });
    },
    stackExperts(tensors, options) {
      return call('stackExperts', (b) => {
        const o = checkOptions<ExpertCheckpointOptions>(options, 'stackExperts', ['prefix', 'numExperts', 'activation']);
        const kind = kindOf(o.activation, 'options.activation');
        const [names, wires] = named(tensors, 'tensors');
        return loaded(b.stackExperts(names, wires, prefixOf(o.prefix), size(o.numExperts, 'options.numExperts'), kind), kind);
      });
    },
    unstackExperts(weights, options) {
      return call('unstackExperts', (b) => {
        const o = checkOptions<UnstackExpertsOptions>(options, 'unstackExperts', ['prefix', 'activation', 'biases', 'firstExpert']);
        const kind = kindOf(o.activation, 'options.activation');
        const [w1] = upWeight(weights, kind);
        const bias = o.biases === undefined ? {} : checkOptions<ExpertBiases>(o.biases, 'biases', ['gateUpProjBias', 'downProjBias']);
        const out = b.unstackExperts(
          prefixOf(o.prefix),
          w1,
          wire((weights as ExpertWeights).downProjs, 'weights.downProjs', TOKENS),
          optWire(bias.gateUpProjBias, 'biases.gateUpProjBias', TOKENS),
          optWire(bias.downProjBias, 'biases.downProjBias', TOKENS),
          kind,
          o.firstExpert === undefined ? undefined : size(o.firstExpert, 'options.firstExpert'),
        );
        return record(out);
      });
    },
  };
}
