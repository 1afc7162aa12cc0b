/**
 * MoELayer: a complete Mixture-of-Experts layer of one rank, forward and backward, composed
 * from Backend ops only (so it runs on every backend):
 *
 *   logits = x @ routerWeight                      matmul
 *   { weights, indices, scores } = route(logits)   route (softmax or sigmoid scores, top-k)
 *   permuted = dispatcher.tokenPermutation(x)      TokenDispatcher (indicesToMultihot + permute)
 *   y_slots = expertsForward(permuted, ...)        grouped experts, weighted by the slot probs
 *   output = dispatcher.tokenUnpermutation(y)      unpermute
 *   auxLoss = switch load balancing (coeff) ; zLoss (coeff)
 *
 * `backward(gradOutput)` runs the chain back and returns the gradient of the input and of
 * every parameter, router weight included: the routing weights' gradient is chained through
 * top-k normalisation and the score function here (in double precision, per token), and the
 * aux losses' gradients (when their coefficients are set) are added to the logits' gradient.
 */
import type { Backend } from './backend.js';
import { TokenDispatcher } from './dispatcher.js';
import type { ActivationKind } from './ops/activations.js';
import type { ExpertBiases, ExpertWeights } from './ops/experts.js';
import { checkTensor, type Tensor } from './tensor.js';
import { checkOptions } from './wire.js';

/** The parameters of a layer, all float32. */
export interface MoEWeights {
  /** `[dim, numExperts]`: logits = x @ routerWeight. */
  routerWeight: Tensor<'float32'>;
  /** `[E, dim, 2 * inter]` (gated activations). */
  gateAndUpProjs?: Tensor<'float32'>;
  /** `[E, dim, inter]` (relu2). */
  upProjs?: Tensor<'float32'>;
  /** `[E, inter, dim]`. */
  downProjs: Tensor<'float32'>;
  /** `[E, width]`, when the layer has biases. */
  gateUpProjBias?: Tensor<'float32'>;
  /** `[E, dim]`, when the layer has biases. */
  downProjBias?: Tensor<'float32'>;
}

export interface MoELayerOptions {
  dim: number;
  inter: number;
  numExperts: number;
  topk: number;
  activation: ActivationKind;
  /** `'softmax'` (default) or `'sigmoid'`. */
  scoreFunction?: 'softmax' | 'sigmoid';
  /** softmax: take the top-k of the softmax over all experts (default: softmax over the k picked logits). */
  softmaxBeforeTopk?: boolean;
  normTopkProb?: boolean;
  routeScale?: number;
  /** Switch load-balancing loss coefficient (default 0: not computed). */
  auxLossCoeff?: number;
  /** Router z-loss coefficient (default 0: not computed). */
  zLossCoeff?: number;
  /** Expert biases (default false). */
  bias?: boolean;
  /** Initial parameters; random (normal, std `initStd`, seeded by `seed`) when absent. */
  weights?: MoEWeights;
  initStd?: number;
  seed?: number;
}

export interface MoEForward {
  /** `[T, dim]`. */
  output: Tensor<'float32'>;
  /** The Switch load-balancing loss times its coefficient (0 without one). */
  auxLoss: number;
  /** The z-loss times its coefficient (0 without one). */
  zLoss: number;
  /** `[numExperts]`: tokens each expert received. */
  tokensPerExpert: Int32Array;
}

export interface MoEGrads {
  /** `[T, dim]`: through the experts and through the router. */
  gradInput: Tensor<'float32'>;
  /** Shaped like the weights (only the ones the layer has). */
  grads: MoEWeights;
}

interface Saved {
  x: Tensor<'float32'>;
  logits: Tensor<'float32'>;
  indices: Int32Array;
  permutedTokens: Tensor<'float32'>;
  tokensPerExpert: Tensor<'int32'>;
  permutedProbs: Tensor<'float32'>;
  scores: Tensor<'float32'>;
}

/** A seeded normal generator (mulberry32 + Box-Muller), so layers are reproducible. */
export function normalRng(seed: number): () => number {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(uniform() + 1e-300)) * Math.cos(2 * Math.PI * uniform());
}

function positiveInt(value: unknown, arg: string): number {
  if (typeof value !== 'number') throw new TypeError(`${arg}: expected a number, got ${typeof value}`);
  if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`${arg}: expected an integer >= 1, got ${value}`);
  return value;
}

const f32 = (shape: number[], data: Float32Array): Tensor<'float32'> => ({ dtype: 'float32', shape, data });

export class MoELayer {
  readonly dim: number;
  readonly inter: number;
  readonly numExperts: number;
  readonly topk: number;
  readonly activation: ActivationKind;
  readonly scoreFunction: 'softmax' | 'sigmoid';
  readonly softmaxBeforeTopk: boolean;
  readonly normTopkProb: boolean;
  readonly routeScale: number;
  readonly auxLossCoeff: number;
  readonly zLossCoeff: number;
  /** The parameters; an optimizer updates their data in place. */
  readonly weights: MoEWeights;
  readonly dispatcher: TokenDispatcher;
  #saved?: Saved;

  constructor(
    readonly backend: Backend,
    options: MoELayerOptions,
  ) {
    const o = checkOptions<MoELayerOptions>(options, 'MoELayer', [
      'dim', 'inter', 'numExperts', 'topk', 'activation', 'scoreFunction', 'softmaxBeforeTopk', 'normTopkProb', 'routeScale', 'auxLossCoeff', 'zLossCoeff', 'bias', 'weights', 'initStd', 'seed',
    ]);
    this.dim = positiveInt(o.dim, 'dim');
    this.inter = positiveInt(o.inter, 'inter');
    this.numExperts = positiveInt(o.numExperts, 'numExperts');
    this.topk = positiveInt(o.topk, 'topk');
    if (typeof o.activation !== 'string') throw new TypeError(`activation: expected a string, got ${typeof o.activation}`);
    this.activation = o.activation;
    this.scoreFunction = o.scoreFunction ?? 'softmax';
    if (this.scoreFunction !== 'softmax' && this.scoreFunction !== 'sigmoid') throw new TypeError(`scoreFunction: expected 'softmax' or 'sigmoid' (the ones MoELayer differentiates), got ${JSON.stringify(this.scoreFunction)}`);
    this.softmaxBeforeTopk = o.softmaxBeforeTopk ?? false;
    this.normTopkProb = o.normTopkProb ?? false;
    this.routeScale = o.routeScale ?? 1;
    this.auxLossCoeff = o.auxLossCoeff ?? 0;
    this.zLossCoeff = o.zLossCoeff ?? 0;
    this.dispatcher = new TokenDispatcher(backend, { numExperts: this.numExperts, topk: this.topk });
    const width = this.activation === 'relu2' ? this.inter : 2 * this.inter;
    const [D, E, I] = [this.dim, this.numExperts, this.inter];
    const shapes: Record<string, number[]> = {
      routerWeight: [D, E],
      [this.activation === 'relu2' ? 'upProjs' : 'gateAndUpProjs']: [E, D, width],
      downProjs: [E, I, D],
    };
    const withBias = o.bias ?? (o.weights?.gateUpProjBias !== undefined);
    if (withBias) {
      shapes.gateUpProjBias = [E, width];
      shapes.downProjBias = [E, D];
    }
    if (o.weights) {
      const w = o.weights as unknown as Record<string, unknown>;
      for (const [k, shape] of Object.entries(shapes)) {
        const t = checkTensor(w[k], `weights.${k}`, ['float32'] as const);
        if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
          throw new RangeError(`weights.${k}.shape: expected [${shape.join(', ')}], got [${t.shape.join(', ')}]`);
        }
      }
      this.weights = Object.fromEntries(Object.keys(shapes).map((k) => [k, w[k]])) as unknown as MoEWeights;
    } else {
      const normal = normalRng(o.seed ?? 1);
      const std = o.initStd ?? 0.02;
      const make = (shape: number[], scale: number) => f32(shape, Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => normal() * scale));
      const w: Record<string, Tensor<'float32'>> = {};
      for (const [k, shape] of Object.entries(shapes)) w[k] = make(shape, k.endsWith('Bias') ? 0 : std);
      this.weights = w as unknown as MoEWeights;
    }
  }

  /** The expert weights in the form `expertsForward` takes. */
  get expertWeights(): ExpertWeights<'float32'> {
    const w = this.weights;
    return w.upProjs ? { upProjs: w.upProjs, downProjs: w.downProjs } : { gateAndUpProjs: w.gateAndUpProjs, downProjs: w.downProjs };
  }

  get #biases(): ExpertBiases | undefined {
    const w = this.weights;
    return w.gateUpProjBias ? { gateUpProjBias: w.gateUpProjBias, downProjBias: w.downProjBias } : undefined;
  }

  forward(x: Tensor<'float32'>): MoEForward {
    const input = checkTensor(x, 'x', ['float32'] as const);
    if (input.shape.length !== 2 || input.shape[1] !== this.dim) throw new RangeError(`x.shape: expected [numTokens, ${this.dim}], got [${input.shape.join(', ')}]`);
    const moe = this.backend;
    const logits = moe.matmul(input, this.weights.routerWeight);
    const routed = moe.route(logits, {
      topk: this.topk,
      scoreFunction: this.scoreFunction,
      ...(this.scoreFunction === 'softmax' && this.softmaxBeforeTopk ? { softmaxBeforeTopk: true } : {}),
      normTopkProb: this.normTopkProb,
      routeScale: this.routeScale,
    });
    const perm = this.dispatcher.tokenPermutation(input, { indices: routed.indices, weights: routed.weights });
    const y = moe.expertsForward(perm.permutedTokens, perm.tokensPerExpert, this.expertWeights, { activation: this.activation, permutedProbs: perm.permutedProbs, biases: this.#biases });
    const output = this.dispatcher.tokenUnpermutation(y);
    let auxLoss = 0;
    let zLoss = 0;
    if (this.auxLossCoeff > 0) auxLoss = this.#auxLoss(logits, routed.scores, perm.tokensPerExpert).loss;
    if (this.zLossCoeff > 0) zLoss = moe.zLoss(logits, { coeff: this.zLossCoeff }).loss;
    this.#saved = {
      x: input,
      logits,
      indices: routed.indices.data,
      permutedTokens: perm.permutedTokens,
      tokensPerExpert: perm.tokensPerExpert,
      permutedProbs: perm.permutedProbs,
      scores: routed.scores,
    };
    return { output, auxLoss, zLoss, tokensPerExpert: Int32Array.from(perm.tokensPerExpert.data) };
  }

  /** The aux loss and its gradient with respect to the logits. */
  #auxLoss(logits: Tensor<'float32'>, scores: Tensor<'float32'>, tpe: Tensor<'int32'>): { loss: number; gradLogits: Float64Array } {
    const moe = this.backend;
    const o = { topk: this.topk, coeff: this.auxLossCoeff };
    if (this.scoreFunction === 'softmax') {
      const r = moe.switchLoadBalancingLossFromLogits(logits, tpe, o);
      return { loss: r.loss, gradLogits: Float64Array.from(r.gradLogits.data) };
    }
    // sigmoid scores (row-normalised with normTopkProb and k > 1): chain d loss / d scores back.
    const r = moe.switchLoadBalancingLoss(scores, tpe, o);
    const [T, E] = [logits.shape[0], this.numExperts];
    const g = new Float64Array(T * E);
    for (let t = 0; t < T; t++) {
      const s = Array.from({ length: E }, (_, e) => 1 / (1 + Math.exp(-logits.data[t * E + e])));
      const gs = Array.from({ length: E }, (_, e) => r.gradProbs.data[t * E + e]);
      let ds = gs;
      if (this.normTopkProb && this.topk > 1) {
        const z = s.reduce((a, b) => a + b, 0) + 1e-20;
        const dot = gs.reduce((a, v, e) => a + v * s[e], 0);
        ds = gs.map((v) => v / z - dot / (z * z));
      }
      for (let e = 0; e < E; e++) g[t * E + e] = ds[e] * s[e] * (1 - s[e]);
    }
    return { loss: r.loss, gradLogits: g };
  }

  /** d weights[t, j] / d logits, applied to `gradWeights [T, k]`, in double precision. */
  #routerGrad(logits: Float32Array, indices: Int32Array, gradWeights: Float32Array, out: Float64Array): void {
    const [E, k] = [this.numExperts, this.topk];
    const T = indices.length / k;
    for (let t = 0; t < T; t++) {
      const l = logits.subarray(t * E, (t + 1) * E);
      const picks = Array.from(indices.subarray(t * k, (t + 1) * k));
      // Unnormalised weights u_j of the picks.
      let u: number[];
      let full: number[] | undefined;
      if (this.scoreFunction === 'sigmoid') u = picks.map((e) => 1 / (1 + Math.exp(-l[e])));
      else if (this.softmaxBeforeTopk) {
        const m = Math.max(...l);
        const ex = Array.from(l, (v) => Math.exp(v - m));
        const z = ex.reduce((a, b) => a + b, 0);
        full = ex.map((v) => v / z);
        u = picks.map((e) => full![e]);
      } else {
        const m = Math.max(...picks.map((e) => l[e]));
        const ex = picks.map((e) => Math.exp(l[e] - m));
        const z = ex.reduce((a, b) => a + b, 0);
        u = ex.map((v) => v / z);
      }
      // weights = routeScale * normalise(u).
      let du = picks.map((_, j) => gradWeights[t * k + j] * this.routeScale);
      if (this.normTopkProb && k > 1) {
        const z = u.reduce((a, b) => a + b, 0) + 1e-20;
        const dot = du.reduce((a, v, j) => a + v * u[j], 0);
        du = du.map((v) => v / z - dot / (z * z));
      }
      const row = out.subarray(t * E, (t + 1) * E);
      if (this.scoreFunction === 'sigmoid') picks.forEach((e, j) => (row[e] += du[j] * u[j] * (1 - u[j])));
      else if (full) {
        // softmax over all experts: g scattered to the picks, then through the softmax.
        const g = new Float64Array(E);
        picks.forEach((e, j) => (g[e] += du[j]));
        const dot = g.reduce((a, v, e) => a + v * full![e], 0);
        for (let e = 0; e < E; e++) row[e] += full[e] * (g[e] - dot);
      } else {
        const dot = du.reduce((a, v, j) => a + v * u[j], 0);
        picks.forEach((e, j) => (row[e] += u[j] * (du[j] - dot)));
      }
    }
  }

  backward(gradOutput: Tensor<'float32'>): MoEGrads {
    const s = this.#saved;
    if (!s) throw new Error('backward: call forward first');
    const g = checkTensor(gradOutput, 'gradOutput', ['float32'] as const);
    const moe = this.backend;
    const gradY = this.dispatcher.tokenUnpermutationBackward(g);
    const eg = moe.expertsBackward(gradY, s.permutedTokens, s.tokensPerExpert, this.expertWeights, { activation: this.activation, permutedProbs: s.permutedProbs, biases: this.#biases });
    const back = this.dispatcher.tokenPermutationBackward(eg.gradTokens, eg.gradProbs);
    const [T, E] = [s.x.shape[0], this.numExperts];
    const dlogits = new Float64Array(T * E);
    this.#routerGrad(s.logits.data, s.indices, back.gradWeights!.data, dlogits);
    if (this.auxLossCoeff > 0) this.#auxLoss(s.logits, s.scores, s.tokensPerExpert).gradLogits.forEach((v, i) => (dlogits[i] += v));
    if (this.zLossCoeff > 0) moe.zLoss(s.logits, { coeff: this.zLossCoeff }).gradLogits.data.forEach((v, i) => (dlogits[i] += v));
    const gl = f32([T, E], Float32Array.from(dlogits));
    const gradRouter = moe.matmul(s.x, gl, { transA: true });
    const viaRouter = moe.matmul(gl, this.weights.routerWeight, { transB: true });
    const gradInput = f32([T, this.dim], Float32Array.from(back.gradHidden.data, (v, i) => v + viaRouter.data[i]));
    const grads: MoEWeights = { routerWeight: gradRouter, downProjs: eg.gradDownProjs as Tensor<'float32'> };
    if (eg.gradUpProjs) grads.upProjs = eg.gradUpProjs as Tensor<'float32'>;
    if (eg.gradGateAndUpProjs) grads.gateAndUpProjs = eg.gradGateAndUpProjs as Tensor<'float32'>;
    if (eg.gradBiases?.gateUpProjBias) grads.gateUpProjBias = eg.gradBiases.gateUpProjBias as Tensor<'float32'>;
    if (eg.gradBiases?.downProjBias) grads.downProjBias = eg.gradBiases.downProjBias as Tensor<'float32'>;
    return { gradInput, grads };
  }

  /**
   * The layer as a safetensors checkpoint: the router weight (`{prefix}.gate.weight`,
   * `[numExperts, dim]` as Hugging Face's router Linear) and the experts in Hugging Face
   * per-expert keys (`{prefix}.experts.{i}.gate_proj.weight` ...) or stacked keys.
   */
  save(prefix = 'mlp', options: { format?: 'hf' | 'stacked' } = {}): Uint8Array {
    const moe = this.backend;
    const w = this.weights;
    const router = transpose(w.routerWeight); // [E, dim], as Hugging Face's router Linear
    const experts = `${prefix}.experts`;
    let tensors: Record<string, Tensor>;
    if ((options.format ?? 'hf') === 'hf') {
      tensors = moe.unstackExperts(this.expertWeights, { prefix: experts, activation: this.activation, biases: this.#biases });
    } else {
      tensors = { [`${experts}.gate_and_up_projs`]: (w.gateAndUpProjs ?? w.upProjs)!, [`${experts}.down_projs`]: w.downProjs };
      if (w.gateUpProjBias) tensors[`${experts}.gate_up_proj_bias`] = w.gateUpProjBias;
      if (w.downProjBias) tensors[`${experts}.down_proj_bias`] = w.downProjBias;
    }
    tensors[`${prefix}.gate.weight`] = router;
    return moe.saveSafetensors(tensors, { metadata: { format: 'pt', activation: this.activation } });
  }

  /** A layer with the weights of a checkpoint written by `save` (same options otherwise). */
  static load(backend: Backend, source: string | Uint8Array, options: Omit<MoELayerOptions, 'weights'>, prefix = 'mlp'): MoELayer {
    const experts = backend.loadExperts(source, { prefix: `${prefix}.experts`, numExperts: options.numExperts, activation: options.activation });
    const router = backend.loadSafetensors(source, { names: [`${prefix}.gate.weight`] }).tensors[`${prefix}.gate.weight`] as Tensor<'float32'>;
    const routerWeight = transpose(checkTensor(router, `${prefix}.gate.weight`, ['float32'] as const)); // back to [dim, E]
    const weights: MoEWeights = { routerWeight, downProjs: experts.downProjs as Tensor<'float32'> };
    if (experts.upProjs) weights.upProjs = experts.upProjs as Tensor<'float32'>;
    if (experts.gateAndUpProjs) weights.gateAndUpProjs = experts.gateAndUpProjs as Tensor<'float32'>;
    if (experts.biases?.gateUpProjBias) weights.gateUpProjBias = experts.biases.gateUpProjBias as Tensor<'float32'>;
    if (experts.biases?.downProjBias) weights.downProjBias = experts.biases.downProjBias as Tensor<'float32'>;
    return new MoELayer(backend, { ...options, weights, bias: weights.gateUpProjBias !== undefined });
  }
}

/** A bit-exact transpose of a 2-d float32 tensor. */
function transpose(t: Tensor<'float32'>): Tensor<'float32'> {
  const [r, c] = t.shape;
  const out = new Float32Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = t.data[i * c + j];
  return f32([c, r], out);
}
