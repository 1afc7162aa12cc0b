/**
 * Hugging Face models: each supported family's `config.json` turned into MoELayer options,
 * and its checkpoint keys (read by `MoELayer.fromPretrained`, written by `savePretrained`).
 *
 * | model_type    | router                                   | experts (keys)                      | shared expert                |
 * |---------------|------------------------------------------|-------------------------------------|------------------------------|
 * | `mixtral`     | softmax, top-k, renormalised             | `block_sparse_moe.experts.{i}.w1/w3/w2` | -                        |
 * | `qwen2_moe`   | softmax, top-k (renormalised by option)  | `mlp.experts.{i}.{gate,up,down}_proj` | `mlp.shared_expert` + sigmoid `shared_expert_gate` |
 * | `qwen3_moe`   | as qwen2_moe                             | as qwen2_moe                        | -                            |
 * | `olmoe`       | as qwen2_moe                             | as qwen2_moe                        | -                            |
 * | `deepseek_v3` | sigmoid + `e_score_correction_bias`, groups, normalised, scaled; float32 | as qwen2_moe | `mlp.shared_experts` |
 * | `gpt_oss`     | Linear with bias, top-k on logits, softmax over the k | fused `mlp.experts.gate_up_proj` (+bias), `down_proj` (+bias); clamped swiglu | - |
 *
 * The routing of each family in our terms is in `FAMILIES` below and in docs/semantics.md.
 */
import type { Backend } from './backend.js';
import type { CheckpointSource, ExpertsFormat } from './ops/experts.js';
import type { MoELayer, MoELayerOptions, MoEWeights } from './layer.js';
import { castTo, toF32, transpose2d } from './numeric.js';
import { nodeFiles } from './platform.js';
import type { Tensor, TokenDType } from './tensor.js';
import { checkOptions } from './wire.js';

/** A checkpoint: a path (Node: a `.safetensors` file, an index json, or a directory), one file's bytes, or a sharded checkpoint's index and shards in memory. */
export type PretrainedSource = CheckpointSource;

/** The layout the routed experts are stored in (`loadExperts`' `format`). */
export type ExpertKeyFormat = ExpertsFormat;

/** Where a layer's tensors live in a checkpoint. */
export interface KeyScheme {
  /** `[numExperts, dim]`: the router Linear's weight. */
  router: string;
  /** `[numExperts]`: the router Linear's bias. */
  routerBias: string;
  /** `[numExperts]`: the score-correction bias. */
  expertBias: string;
  /** The routed experts' prefix, and their layout (absent: detected when reading, `'hf'` when writing). */
  experts: string;
  expertsFormat?: ExpertKeyFormat;
  /** The shared expert's prefix (`{shared}.gate_proj.weight` ...). */
  shared: string;
  /** `[1, dim]`: the shared expert's gate Linear. */
  sharedGate: string;
}

export interface FromPretrainedOptions {
  /** The model's `config.json`: the parsed object, or (Node) a path to it or to its directory. */
  config: Record<string, unknown> | string;
  /** The checkpoint; default (Node, with `config` a path): the config's directory. */
  checkpoint?: PretrainedSource;
  /** The decoder layer whose MoE block to build (0-based). */
  layer: number;
  /** Expert parallelism: load only rank `epRank`'s experts of `epSize` (default 1 / 0). */
  epSize?: number;
  epRank?: number;
  /** Weights and activations in this dtype (default: the checkpoint's). */
  dtype?: TokenDType;
  /** Load-balancing loss coefficient; default the config's `router_aux_loss_coef` when its `output_router_logits` is true, else 0 (transformers adds the loss only then). The convention defaults to `'hf'`. */
  auxLossCoeff?: number;
  auxLossConvention?: 'megatron' | 'hf';
  zLossCoeff?: number;
}

export interface SavePretrainedOptions {
  /** The family (default: the one the layer was loaded from). */
  modelType?: string;
  /** The decoder layer index to write the keys of (default: the one it was loaded from). */
  layer?: number;
  /** Explicit keys instead of a family's. */
  keys?: KeyScheme;
}

type Config = Record<string, unknown>;
type LayerOptions = Omit<MoELayerOptions, 'weights' | 'initStd' | 'seed' | 'epSize' | 'epRank' | 'dtype'>;

/** The router's dtype of a layer loaded in `dtype`. */
const routerDtypeOf = (o: LayerOptions, dtype: TokenDType): TokenDType => o.routerDtype ?? dtype;

interface Family {
  /** Whether decoder layer `l` has an MoE block; else why not. */
  moeLayer(c: Config, l: number): true | string;
  keys(l: number): KeyScheme;
  options(c: Config): LayerOptions;
}

// ---------------------------------------------------------------------------------------
// Reading config fields.

function field(c: Config, key: string): unknown {
  return c[key];
}

function int(c: Config, key: string, fallback?: number): number {
  const v = field(c, key) ?? fallback;
  if (v === undefined || v === null) throw new RangeError(`config.${key}: missing (expected an integer)`);
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new RangeError(`config.${key}: expected a non-negative integer, got ${JSON.stringify(v)}`);
  return v;
}

function num(c: Config, key: string, fallback?: number): number {
  const v = field(c, key) ?? fallback;
  if (v === undefined || v === null) throw new RangeError(`config.${key}: missing (expected a number)`);
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new RangeError(`config.${key}: expected a finite number, got ${JSON.stringify(v)}`);
  return v;
}

/** The routed expert count, whichever spelling the config uses (transformers 5 writes `num_local_experts` where the Hub's files say `num_experts`). */
function expertCount(c: Config): number {
  for (const key of ['num_experts', 'num_local_experts', 'n_routed_experts']) if (field(c, key) !== undefined && field(c, key) !== null) return int(c, key);
  throw new RangeError('config.num_experts: missing (expected the routed expert count as num_experts, num_local_experts or n_routed_experts)');
}

function bool(c: Config, key: string, fallback: boolean): boolean {
  const v = field(c, key) ?? fallback;
  if (typeof v !== 'boolean') throw new RangeError(`config.${key}: expected true or false, got ${JSON.stringify(v)}`);
  return v;
}

function expectValue(c: Config, key: string, allowed: readonly unknown[], fallback: unknown): void {
  const v = field(c, key) ?? fallback;
  if (!allowed.includes(v)) throw new RangeError(`config.${key}: ${JSON.stringify(v)} is not supported (supported: ${allowed.map((a) => JSON.stringify(a)).join(', ')})`);
}

/** The experts' activation: every supported family but GPT-OSS uses SiLU-gated experts. */
function siluExperts(c: Config): { activation: 'swiglu' } {
  expectValue(c, 'hidden_act', ['silu', 'swish'], 'silu');
  return { activation: 'swiglu' };
}

/**
 * Softmax routing as transformers' Mixtral/Qwen/OLMoE blocks do it: softmax over all experts,
 * top-k, renormalised when `norm` (k = 1 included). Renormalised, that is the softmax over the k
 * picked logits (our `'softmax'`); not renormalised, the softmax values at the picks.
 */
function softmaxRouting(norm: boolean): Pick<LayerOptions, 'scoreFunction' | 'softmaxBeforeTopk'> {
  return norm ? { scoreFunction: 'softmax' } : { scoreFunction: 'softmax', softmaxBeforeTopk: true };
}

/**
 * transformers adds the load-balancing loss only with `output_router_logits` (training); then it
 * is `router_aux_loss_coef` times its own function, our `'hf'` convention.
 */
function auxFromConfig(c: Config): Pick<LayerOptions, 'auxLossCoeff' | 'auxLossConvention'> {
  const coef = field(c, 'router_aux_loss_coef');
  const on = field(c, 'output_router_logits') === true && typeof coef === 'number' && Number.isFinite(coef) && coef >= 0;
  return on ? { auxLossCoeff: coef as number, auxLossConvention: 'hf' } : { auxLossConvention: 'hf' };
}

function standardKeys(block: string, format: ExpertKeyFormat | undefined, shared: string, router = 'gate'): KeyScheme {
  return {
    router: `${block}.${router}.weight`,
    routerBias: `${block}.${router}.bias`,
    expertBias: `${block}.${router}.e_score_correction_bias`,
    experts: `${block}.experts`,
    expertsFormat: format,
    shared: `${block}.${shared}`,
    sharedGate: `${block}.shared_expert_gate.weight`,
  };
}

/** Keys under one prefix, for `MoELayer.save` / `MoELayer.load`. */
export function genericKeys(prefix: string, format?: ExpertKeyFormat): KeyScheme {
  if (typeof prefix !== 'string') throw new TypeError(`prefix: expected a string, got ${typeof prefix}`);
  return standardKeys(prefix, format, 'shared_expert', format === 'gpt_oss' ? 'router' : 'gate');
}

/** Qwen2-MoE / Qwen3-MoE: which layers are sparse. */
function qwenSparse(c: Config, l: number): true | string {
  const only = field(c, 'mlp_only_layers') ?? [];
  if (Array.isArray(only) && only.includes(l)) return `layer ${l} is listed in config.mlp_only_layers (a dense MLP)`;
  const step = int(c, 'decoder_sparse_step', 1);
  if (expertCount(c) === 0) return 'config.num_experts is 0 (no MoE layers)';
  if (step < 1 || (l + 1) % step !== 0) return `layer ${l} is dense: config.decoder_sparse_step = ${step} makes layers l with (l + 1) % ${step} == 0 sparse`;
  return true;
}

/**
 * The softmax families (Mixtral, Qwen2/Qwen3-MoE, OLMoE): SiLU-gated experts of `interKey`,
 * softmax routing renormalised when `norm` says so, the aux loss from the config.
 */
function softmaxFamily(c: Config, interKey: string, norm: boolean): LayerOptions {
  return {
    dim: int(c, 'hidden_size'),
    inter: int(c, interKey),
    numExperts: expertCount(c),
    topk: int(c, 'num_experts_per_tok'),
    ...siluExperts(c),
    ...softmaxRouting(norm),
    ...auxFromConfig(c),
  };
}

const mlpKeys = (l: number) => standardKeys(`model.layers.${l}.mlp`, 'hf', 'shared_expert');

const FAMILIES: Record<string, Family> = {
  mixtral: {
    moeLayer: () => true,
    keys: (l) => standardKeys(`model.layers.${l}.block_sparse_moe`, 'mixtral', 'shared_expert'),
    options: (c) => softmaxFamily(c, 'intermediate_size', true),
  },
  qwen2_moe: {
    moeLayer: qwenSparse,
    keys: mlpKeys,
    options: (c) => {
      const shared = int(c, 'shared_expert_intermediate_size', 0);
      const o = softmaxFamily(c, 'moe_intermediate_size', bool(c, 'norm_topk_prob', false));
      return shared > 0 ? { ...o, sharedExpert: { inter: shared, gate: true } } : o;
    },
  },
  qwen3_moe: {
    moeLayer: qwenSparse,
    keys: mlpKeys,
    options: (c) => softmaxFamily(c, 'moe_intermediate_size', bool(c, 'norm_topk_prob', false)),
  },
  olmoe: {
    moeLayer: () => true,
    keys: mlpKeys,
    options: (c) => softmaxFamily(c, 'intermediate_size', bool(c, 'norm_topk_prob', false)),
  },
  deepseek_v3: {
    moeLayer: (c, l) => {
      const first = int(c, 'first_k_dense_replace', 0);
      if (l < first) return `layer ${l} is dense: config.first_k_dense_replace = ${first}`;
      const freq = int(c, 'moe_layer_freq', 1);
      if (freq < 1 || l % freq !== 0) return `layer ${l} is dense: config.moe_layer_freq = ${freq}`;
      return true;
    },
    keys: (l) => standardKeys(`model.layers.${l}.mlp`, 'hf', 'shared_experts'),
    options: (c) => {
      expectValue(c, 'scoring_func', ['sigmoid'], 'sigmoid');
      expectValue(c, 'topk_method', ['noaux_tc'], 'noaux_tc');
      const inter = int(c, 'moe_intermediate_size');
      const shared = int(c, 'n_shared_experts', 0);
      return {
        dim: int(c, 'hidden_size'),
        inter,
        numExperts: expertCount(c),
        topk: int(c, 'num_experts_per_tok'),
        ...siluExperts(c),
        // transformers (5.x DeepseekV3TopkRouter) masks the experts of dropped groups with -inf
        // before the top-k: our 'sigmoid_with_bias' (NeMo's 'sigmoid' multiplies them by 0).
        scoreFunction: 'sigmoid_with_bias',
        expertBias: true,
        numGroups: int(c, 'n_group', 1),
        topkGroups: int(c, 'topk_group', int(c, 'n_group', 1)),
        normTopkProb: bool(c, 'norm_topk_prob', true),
        routeScale: num(c, 'routed_scaling_factor', 1),
        // the router Linear and the bias stay float32 in a bf16 model (_keep_in_fp32_modules_strict)
        routerDtype: 'float32',
        ...(shared > 0 ? { sharedExpert: { inter: inter * shared } } : {}),
      };
    },
  },
  gpt_oss: {
    moeLayer: () => true,
    keys: (l) => standardKeys(`model.layers.${l}.mlp`, 'gpt_oss', 'shared_expert', 'router'),
    options: (c) => ({
      dim: int(c, 'hidden_size'),
      inter: int(c, 'intermediate_size'),
      numExperts: expertCount(c),
      topk: int(c, 'num_experts_per_tok', field(c, 'experts_per_token') as number | undefined),
      // (up + 1) * gate * sigmoid(1.702 * gate), gate <= limit, |up| <= limit, interleaved pairs
      activation: 'quick_geglu',
      alpha: 1.702,
      limit: num(c, 'swiglu_limit', 7),
      linearOffset: 1,
      scoreFunction: 'softmax',
      routerBias: true,
      bias: true,
      ...auxFromConfig(c),
    }),
  },
};

/** The `model_type`s `fromPretrained` supports. */
export const SUPPORTED_MODEL_TYPES: readonly string[] = Object.keys(FAMILIES);

function familyOf(modelType: unknown): Family {
  if (typeof modelType !== 'string') throw new TypeError(`config.model_type: expected a string, got ${JSON.stringify(modelType)}`);
  const f = FAMILIES[modelType];
  if (!f) throw new RangeError(`config.model_type: '${modelType}' is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`);
  return f;
}

// ---------------------------------------------------------------------------------------
// Reading and writing the tensors.

async function readConfig(config: unknown): Promise<{ config: Config; dir?: string }> {
  if (typeof config === 'object' && config !== null && !Array.isArray(config) && !ArrayBuffer.isView(config)) return { config: config as Config };
  if (typeof config !== 'string') throw new TypeError(`config: expected the parsed config.json object or a path to it, got ${config === null ? 'null' : typeof config}`);
  // Node's fs comes from the Node entry (platform.ts): no node: import the browser entry could reach.
  const files = nodeFiles();
  if (!files) throw new TypeError('config: a path needs Node.js (in a browser, pass the parsed config.json object)');
  let file = config;
  try {
    if (await files.isDirectory(config)) file = files.join(config, 'config.json');
  } catch (e) {
    throw new RangeError(`config: cannot read '${config}': ${(e as Error).message}`);
  }
  let text: string;
  try {
    text = await files.readText(file);
  } catch (e) {
    throw new RangeError(`config: cannot read '${file}': ${(e as Error).message}`);
  }
  try {
    return { config: JSON.parse(text) as Config, dir: files.dirname(file) };
  } catch (e) {
    throw new RangeError(`config: '${file}' is not JSON: ${(e as Error).message}`);
  }
}

function shapeStr(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

function expectShape(t: Tensor, key: string, want: readonly number[], what: string): void {
  if (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i])) {
    throw new RangeError(`${key}: expected shape ${shapeStr(want)} (${what}), got ${shapeStr(t.shape)}`);
  }
}

function asToken(t: Tensor, key: string): Tensor<TokenDType> {
  if (t.dtype !== 'float32' && t.dtype !== 'bfloat16' && t.dtype !== 'float16') throw new TypeError(`${key}.dtype: expected F32, BF16 or F16, got ${t.dtype}`);
  return t as Tensor<TokenDType>;
}

/** What a layer of these options reads from a checkpoint. */
interface Wanted {
  options: LayerOptions;
  keys: KeyScheme;
  epSize: number;
  epRank: number;
  dtype?: TokenDType;
}

/**
 * Reads the tensors of one layer through the backend's checkpoint ops: the experts (only this
 * rank's, in their family's layout) and the named router / shared tensors. Every tensor is
 * checked before the layer is built; nothing is half-made.
 */
function readWeights(backend: Backend, source: PretrainedSource, w: Wanted): { weights: MoEWeights; dtype: TokenDType; bytesRead: number } {
  const o = w.options;
  const { dim: D, numExperts: E } = o;
  const k = w.keys;
  const experts = backend.loadExperts(source, {
    prefix: k.experts,
    numExperts: E,
    activation: o.activation,
    epSize: w.epSize,
    epRank: w.epRank,
    ...(k.expertsFormat ? { format: k.expertsFormat } : {}),
  });

  const up = (experts.gateAndUpProjs ?? experts.upProjs)!;
  const L = experts.end - experts.start;
  const width = o.activation === 'relu2' ? o.inter : 2 * o.inter;
  expectShape(up, `${k.experts} (up projections)`, [L, D, width], `${L} experts, dim ${D}, ${o.activation === 'relu2' ? 'inter' : '2 * inter'} = ${width} from the config`);
  expectShape(experts.downProjs, `${k.experts} (down projections)`, [L, o.inter, D], `${L} experts, inter ${o.inter}, dim ${D} from the config`);
  if (o.bias && !experts.biases?.gateUpProjBias) throw new RangeError(`${k.experts}: the layer has expert biases, the checkpoint has none under this prefix`);
  const dtype = w.dtype ?? asToken(up, k.experts).dtype;

  const names = [k.router];
  if (o.routerBias) names.push(k.routerBias);
  if (o.expertBias) names.push(k.expertBias);
  const shared = o.sharedExpert;
  const sharedNames = shared ? ['gate_proj', 'up_proj', 'down_proj'].map((p) => `${k.shared}.${p}.weight`) : [];
  names.push(...sharedNames);
  if (shared?.gate) names.push(k.sharedGate);
  const loaded = backend.loadSafetensors(source, { names });
  const t = (name: string) => asToken(loaded.tensors[name], name);

  const router = t(k.router);
  expectShape(router, k.router, [E, D], 'the router Linear: [numExperts, dim]');
  const rd = routerDtypeOf(o, dtype);
  const weights: Record<string, Tensor> = { routerWeight: castTo(transpose2d(router), rd) };
  if (o.routerBias) {
    const b = t(k.routerBias);
    expectShape(b, k.routerBias, [E], 'the router bias: [numExperts]');
    weights.routerBias = castTo(b, rd);
  }
  if (o.expertBias) {
    const b = t(k.expertBias);
    expectShape(b, k.expertBias, [E], 'the score-correction bias: [numExperts]');
    weights.expertBias = toF32(b);
  }
  weights[o.activation === 'relu2' ? 'upProjs' : 'gateAndUpProjs'] = castTo(asToken(up, k.experts), dtype);
  weights.downProjs = castTo(asToken(experts.downProjs, k.experts), dtype);
  if (o.bias) {
    weights.gateUpProjBias = castTo(asToken(experts.biases!.gateUpProjBias!, k.experts), dtype);
    weights.downProjBias = castTo(asToken(experts.biases!.downProjBias!, k.experts), dtype);
  }
  if (shared) {
    const [gp, upp, dp] = sharedNames.map(t);
    expectShape(gp, sharedNames[0], [shared.inter, D], 'the shared expert: [sharedInter, dim]');
    expectShape(upp, sharedNames[1], [shared.inter, D], 'the shared expert: [sharedInter, dim]');
    expectShape(dp, sharedNames[2], [D, shared.inter], 'the shared expert: [dim, sharedInter]');
    const stacked = backend.stackExperts({ 's.0.gate_proj.weight': gp, 's.0.up_proj.weight': upp, 's.0.down_proj.weight': dp }, { prefix: 's', numExperts: 1, activation: 'swiglu' });
    weights.sharedGateAndUpProjs = castTo(asToken(stacked.gateAndUpProjs!, k.shared), dtype);
    weights.sharedDownProjs = castTo(asToken(stacked.downProjs, k.shared), dtype);
    if (shared.gate) {
      const g = t(k.sharedGate);
      expectShape(g, k.sharedGate, [1, D], 'the shared expert gate Linear: [1, dim]');
      weights.sharedExpertGate = castTo(transpose2d(g), dtype);
    }
  }
  return { weights: weights as unknown as MoEWeights, dtype, bytesRead: experts.bytesRead + (loaded.bytesRead ?? 0) };
}

/** `MoELayer.load`: a layer of the given options from keys under one prefix. */
export function loadWithKeys(backend: Backend, source: PretrainedSource, options: Omit<MoELayerOptions, 'weights'>, keys: KeyScheme): MoELayer {
  const { epSize, epRank, dtype, ...rest } = options;
  const r = readWeights(backend, source, { options: rest as LayerOptions, keys, epSize: epSize ?? 1, epRank: epRank ?? 0, dtype });
  return new LayerClass.ctor!(backend, { ...options, dtype: r.dtype, weights: r.weights });
}

/** Set by layer.ts (the two modules import each other; the class is only needed at call time). */
export const LayerClass: { ctor?: new (backend: Backend, options: MoELayerOptions) => MoELayer } = {};

export async function fromPretrained(backend: Backend, options: FromPretrainedOptions): Promise<MoELayer> {
  const o = checkOptions<FromPretrainedOptions>(options, 'fromPretrained', ['config', 'checkpoint', 'layer', 'epSize', 'epRank', 'dtype', 'auxLossCoeff', 'auxLossConvention', 'zLossCoeff']);
  if (o.config === undefined) throw new TypeError('config: expected the parsed config.json object or a path to it (required), got undefined');
  const { config, dir } = await readConfig(o.config);
  const family = familyOf(config.model_type);
  if (typeof o.layer !== 'number') throw new TypeError(`layer: expected the decoder layer index (a number), got ${typeof o.layer}`);
  const layers = int(config, 'num_hidden_layers');
  if (!Number.isSafeInteger(o.layer) || o.layer < 0 || o.layer >= layers)
    throw new RangeError(`layer: expected an integer from 0 to ${layers - 1} (config.num_hidden_layers = ${layers}), got ${o.layer}`);
  const moe = family.moeLayer(config, o.layer);
  if (moe !== true) throw new RangeError(`layer: ${moe}; it has no MoE block`);
  const source = o.checkpoint ?? dir;
  if (source === undefined) throw new TypeError('checkpoint: expected a path, the bytes of a .safetensors file or { index, shards } (required when config is an object)');
  const layerOptions = family.options(config);
  if (o.auxLossCoeff !== undefined) layerOptions.auxLossCoeff = o.auxLossCoeff;
  if (o.auxLossConvention !== undefined) layerOptions.auxLossConvention = o.auxLossConvention;
  if (o.zLossCoeff !== undefined) layerOptions.zLossCoeff = o.zLossCoeff;
  const keys = family.keys(o.layer);
  const r = readWeights(backend, source, { options: layerOptions, keys, epSize: o.epSize ?? 1, epRank: o.epRank ?? 0, dtype: o.dtype });
  const layer = new LayerClass.ctor!(backend, { ...layerOptions, epSize: o.epSize, epRank: o.epRank, dtype: r.dtype, weights: r.weights });
  layer.pretrained = { modelType: config.model_type as string, layer: o.layer, bytesRead: r.bytesRead };
  return layer;
}

/** The layer's tensors under `keys` (or its family's), as safetensors bytes. */
export function savePretrained(layer: MoELayer, options: SavePretrainedOptions = {}): Uint8Array {
  const o = checkOptions<SavePretrainedOptions>(options, 'savePretrained', ['modelType', 'layer', 'keys']);
  let keys = o.keys;
  if (!keys) {
    const modelType = o.modelType ?? layer.pretrained?.modelType;
    const index = o.layer ?? layer.pretrained?.layer;
    if (modelType === undefined || index === undefined) throw new TypeError('savePretrained: options.modelType and options.layer are required for a layer not made by fromPretrained');
    keys = familyOf(modelType).keys(index);
  }
  const moe = layer.backend;
  const w = layer.weights;
  const tensors: Record<string, Tensor> = { [keys.router]: transpose2d(w.routerWeight) };
  if (w.routerBias) tensors[keys.routerBias] = w.routerBias;
  if (w.expertBias) tensors[keys.expertBias] = w.expertBias;
  const biases = layer.expertBiases;
  if (keys.expertsFormat === 'stacked') {
    tensors[`${keys.experts}.gate_and_up_projs`] = (w.gateAndUpProjs ?? w.upProjs)!;
    tensors[`${keys.experts}.down_projs`] = w.downProjs;
    if (w.gateUpProjBias) tensors[`${keys.experts}.gate_up_proj_bias`] = w.gateUpProjBias;
    if (w.downProjBias) tensors[`${keys.experts}.down_proj_bias`] = w.downProjBias;
  } else {
    Object.assign(
      tensors,
      moe.unstackExperts(layer.expertWeights, { prefix: keys.experts, activation: layer.activation, biases, firstExpert: layer.expertRange.start, format: keys.expertsFormat ?? 'hf' }),
    );
  }
  if (w.sharedGateAndUpProjs && w.sharedDownProjs) {
    const one = moe.unstackExperts({ gateAndUpProjs: w.sharedGateAndUpProjs, downProjs: w.sharedDownProjs }, { prefix: 's', activation: 'swiglu' });
    for (const p of ['gate_proj', 'up_proj', 'down_proj']) tensors[`${keys.shared}.${p}.weight`] = one[`s.0.${p}.weight`];
    if (w.sharedExpertGate) tensors[keys.sharedGate] = transpose2d(w.sharedExpertGate);
  }
  return moe.saveSafetensors(tensors, { metadata: { format: 'pt' } });
}
