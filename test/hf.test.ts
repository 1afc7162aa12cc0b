/**
 * Real Hugging Face MoE families, on every backend: `MoELayer.fromPretrained` against
 * transformers' own MoE blocks, from the fixtures `scripts/hf_fixtures.py` wrote with
 * transformers 5.x (tiny random models saved by `save_pretrained`, in float32 and bfloat16; see
 * test/fixtures/hf/README.md):
 *
 * - one call builds each family's layer from its config.json and checkpoint;
 * - the picked experts are the same sets as transformers', the weights, output, input gradient
 *   and every parameter gradient agree within 1e-5 relative in float32; in bfloat16 they are
 *   as close to transformers' float32 result as transformers' own bfloat16 result is (x 2);
 * - the aux loss in transformers' convention equals transformers' `load_balancing_loss_func`;
 * - `savePretrained` writes exactly the checkpoint's keys and shapes for that layer, and the
 *   layer read back from them gives the same bits;
 * - a sharded checkpoint (index + shards) loads from a path and from memory, reading only the
 *   layer's bytes; expert-parallel ranks read their experts only and their outputs sum to the layer's;
 * - bad configs and checkpoints get errors that name what is wrong.
 */
import { describe, expect, it } from 'vitest';

import { MoELayer, SUPPORTED_MODEL_TYPES, toNumbers, type Backend, type MoEWeights, type PretrainedSource, type Tensor } from '../ts/index.js';
import { backends, registerBackendReport } from './backends.js';
import { bytesOf, maxRelErr } from './common/golden.mjs';
import { fixtureBytes, fixtureJson, fixturePath } from './fixture-loader.js';

registerBackendReport();

const FAMILIES = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'gpt_oss'] as const;
const DTYPES = ['f32', 'bf16'] as const;

interface Meta {
  model_type: string;
  layer: number;
  dtype: string;
  moeKeys: string[];
}

interface Fixture {
  name: string;
  config: Record<string, unknown>;
  meta: Meta;
  model: Uint8Array;
  io: Uint8Array;
  grads: Uint8Array;
  gradsF32?: Uint8Array;
}

async function loadFixture(name: string): Promise<Fixture | undefined> {
  const dir = `hf/${name}`;
  const config = await fixtureJson<Record<string, unknown>>(`${dir}/config.json`);
  const meta = await fixtureJson<Meta>(`${dir}/meta.json`);
  const model = await fixtureBytes(`${dir}/model.safetensors`);
  const io = await fixtureBytes(`${dir}/io.safetensors`);
  const grads = await fixtureBytes(`${dir}/grads.safetensors`);
  if (!config || !meta || !model || !io || !grads) return undefined;
  return { name, config, meta, model, io, grads, gradsF32: await fixtureBytes(`${dir}/gradsF32.safetensors`) };
}

const fixtures: Fixture[] = [];
for (const f of FAMILIES)
  for (const d of DTYPES) {
    const fx = await loadFixture(`${f}-${d}`);
    if (fx) fixtures.push(fx);
  }

it('the fixtures of every family and dtype are present', () => {
  expect(fixtures.map((f) => f.name).sort()).toEqual(FAMILIES.flatMap((f) => DTYPES.map((d) => `${f}-${d}`)).sort());
  expect([...SUPPORTED_MODEL_TYPES].sort()).toEqual([...FAMILIES].sort());
});

/** The values of a float tensor, as numbers. */
const values = (t: Tensor) => toNumbers(t);

function maxAbs(a: number[]): number {
  return a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
}

/** max |got - want| / max |want| (a relative error on the tensor's scale). */
function relErr(got: number[], want: number[]): number {
  expect(got.length).toBe(want.length);
  return maxRelErr(got, want);
}

function dist(a: number[], b: number[]): number {
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

function ioTensors(moe: Backend, bytes: Uint8Array): Record<string, Tensor> {
  return moe.loadSafetensors(bytes).tensors;
}

/** The expected gradients as a layer's weights: the grads file read as a checkpoint (the score-correction bias, a buffer, from the model). */
async function expectedGrads(moe: Backend, fx: Fixture, grads: Uint8Array): Promise<MoEWeights> {
  const names = Object.keys(moe.loadSafetensors(grads).tensors);
  const weightMap: Record<string, string> = {};
  for (const n of names) weightMap[n] = 'grads.safetensors';
  for (const n of fx.meta.moeKeys) if (!(n in weightMap)) weightMap[n] = 'model.safetensors';
  const source: PretrainedSource = { index: { metadata: {}, weight_map: weightMap }, shards: { 'grads.safetensors': grads, 'model.safetensors': fx.model } };
  const layer = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: source, layer: fx.meta.layer, dtype: 'float32' });
  return layer.weights;
}

/** Per token, the picked experts as a sorted list. */
function pickSets(indices: number[], k: number): number[][] {
  const out: number[][] = [];
  for (let t = 0; t < indices.length / k; t++) out.push(indices.slice(t * k, (t + 1) * k).sort((a, b) => a - b));
  return out;
}

/** The weights of each token keyed by expert, for comparing weights whatever the pick order. */
function weightByExpert(indices: number[], weights: number[], k: number): Map<string, number> {
  const m = new Map<string, number>();
  indices.forEach((e, i) => {
    m.set(`${Math.floor(i / k)}:${e}`, weights[i]);
  });
  return m;
}

const GRAD_NAMES = ['routerWeight', 'routerBias', 'gateAndUpProjs', 'downProjs', 'gateUpProjBias', 'downProjBias', 'sharedGateAndUpProjs', 'sharedDownProjs', 'sharedExpertGate'] as const;

for (const moe of backends) {
  describe(`Hugging Face families on ${moe.name}`, () => {
    for (const fx of fixtures) {
      const bf16 = fx.name.endsWith('bf16');
      it(`${fx.name}: fromPretrained matches transformers (routing, output, every gradient)`, async () => {
        const layer = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer });
        expect(layer.dtype).toBe(bf16 ? 'bfloat16' : 'float32');
        expect(layer.pretrained).toMatchObject({ modelType: fx.meta.model_type, layer: fx.meta.layer });
        const io = ioTensors(moe, fx.io);
        const x = io.x;
        const out = layer.forward(x);
        expect(out.output.shape).toEqual(x.shape);
        const k = layer.topk;
        // Routing: the same expert sets, the same weights.
        const hfIdx = toNumbers(io.indices);
        const ours = Array.from(out.indices.data);
        expect(pickSets(ours, k)).toEqual(pickSets(hfIdx, k));
        const hw = weightByExpert(hfIdx, values(io.weights), k);
        const ow = weightByExpert(ours, values(out.weights), k);
        for (const [key, w] of hw) expect(Math.abs(ow.get(key)! - w), `weight ${key}`).toBeLessThanOrEqual(bf16 ? 1e-2 * Math.abs(w) + 1e-3 : 1e-6 * Math.max(1, Math.abs(w)));
        expect(relErr(values(out.logits), values(io.routerLogits))).toBeLessThan(bf16 ? 1e-2 : 1e-6);

        const back = layer.backward(io.gradOutput);
        expect(back.gradInput.shape).toEqual(x.shape);
        if (!bf16) {
          expect(relErr(values(out.output), values(io.output)), 'output').toBeLessThan(1e-5);
          expect(relErr(values(back.gradInput), values(io.gradInput)), 'gradInput').toBeLessThan(1e-5);
        } else {
          // As close to transformers' float32 result as transformers' own bf16 result is.
          const ref = values(io.outputF32);
          const hfDist = dist(values(io.output), ref);
          expect(hfDist, 'transformers bf16 vs f32 (fixture sanity)').toBeGreaterThan(0);
          expect(dist(values(out.output), ref), `output (transformers' bf16 distance ${hfDist})`).toBeLessThanOrEqual(2 * hfDist);
          const gref = values(io.gradInputF32);
          const hfG = dist(values(io.gradInput), gref);
          expect(dist(values(back.gradInput), gref), `gradInput (transformers' bf16 distance ${hfG})`).toBeLessThanOrEqual(2 * hfG);
        }
        const want = await expectedGrads(moe, fx, fx.grads);
        const wantF32 = bf16 && fx.gradsF32 ? await expectedGrads(moe, fx, fx.gradsF32) : undefined;
        let compared = 0;
        for (const name of GRAD_NAMES) {
          const got = back.grads[name];
          const w = want[name];
          expect(got === undefined, `${name} present in ours and transformers'`).toBe(w === undefined);
          if (!got || !w) continue;
          compared++;
          expect(got.shape, name).toEqual(w.shape);
          if (!wantF32) expect(relErr(values(got), values(w)), `grad ${name}`).toBeLessThan(1e-5);
          else {
            const ref = values(wantF32[name]!);
            const hfD = dist(values(w), ref);
            expect(dist(values(got), ref), `grad ${name} (transformers' bf16 distance ${hfD})`).toBeLessThanOrEqual(2 * hfD + 1e-6 * maxAbs(ref));
          }
        }
        expect(compared).toBeGreaterThanOrEqual(3);
      });

      it(`${fx.name}: savePretrained writes the checkpoint's own keys and shapes, and reads back bit for bit`, async () => {
        const layer = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer });
        const bytes = layer.savePretrained();
        const saved = moe.loadSafetensors(bytes).tensors;
        const model = moe.loadSafetensors(fx.model, { names: fx.meta.moeKeys }).tensors;
        expect(Object.keys(saved).sort()).toEqual([...fx.meta.moeKeys].sort());
        for (const key of fx.meta.moeKeys) {
          expect(saved[key].shape, key).toEqual(model[key].shape);
          // unchanged weights: the same bits (up to the dtype the layer keeps them in)
          if (saved[key].dtype === model[key].dtype) expect(Array.from(saved[key].data as ArrayLike<number>), key).toEqual(Array.from(model[key].data as ArrayLike<number>));
        }
        const again = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: bytes, layer: fx.meta.layer });
        const x = ioTensors(moe, fx.io).x;
        expect(Array.from(again.forward(x).output.data as ArrayLike<number>)).toEqual(Array.from(layer.forward(x).output.data as ArrayLike<number>));
      });
    }

    for (const fx of fixtures.filter((f) => f.name.endsWith('-f32'))) {
      it(`${fx.name}: the aux loss in transformers' convention is load_balancing_loss_func's`, async () => {
        const io = ioTensors(moe, fx.io);
        if (!io.hfAuxLoss) return; // families without an aux loss in transformers (DeepSeek-V3)
        const layer = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer, auxLossCoeff: 1, auxLossConvention: 'hf' });
        const { auxLoss } = layer.forward(io.x);
        const want = values(io.hfAuxLoss)[0];
        expect(Math.abs(auxLoss - want) / want).toBeLessThan(1e-5);
      });

      it(`${fx.name}: expert-parallel ranks read only their experts, and their outputs sum to the layer's`, async () => {
        const io = ioTensors(moe, fx.io);
        const full = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer });
        const want = values(full.forward(io.x).output);
        const sum = new Float64Array(want.length);
        const bytes: number[] = [];
        for (const epRank of [0, 1]) {
          const rank = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer, epSize: 2, epRank });
          expect(rank.expertRange.end - rank.expertRange.start).toBe(full.numExperts / 2);
          bytes.push(rank.pretrained!.bytesRead!);
          values(rank.forward(io.x).output).forEach((v, i) => {
            sum[i] += v;
          });
        }
        expect(relErr(Array.from(sum), want)).toBeLessThan(1e-6);
        for (const b of bytes) expect(b).toBeLessThan(full.pretrained!.bytesRead!);
      });
    }

    it('a sharded checkpoint loads from its index (a path on native backends, in memory everywhere) and reads only the layer', async () => {
      const index = await fixtureJson<{ weight_map: Record<string, string> }>('hf/mixtral-f32-sharded/model.safetensors.index.json');
      const config = await fixtureJson<Record<string, unknown>>('hf/mixtral-f32-sharded/config.json');
      const single = fixtures.find((f) => f.name === 'mixtral-f32');
      expect(index && config && single).toBeTruthy();
      const files = [...new Set(Object.values(index!.weight_map))];
      expect(files.length).toBeGreaterThanOrEqual(3);
      const shards: Record<string, Uint8Array> = {};
      let total = 0;
      for (const f of files) {
        shards[f] = (await fixtureBytes(`hf/mixtral-f32-sharded/${f}`))!;
        total += shards[f].length;
      }
      const ref = await MoELayer.fromPretrained(moe, { config: single!.config, checkpoint: single!.model, layer: 1 });
      const x = ioTensors(moe, single!.io).x;
      const want = Array.from(ref.forward(x).output.data as Float32Array);
      const sources: PretrainedSource[] = [{ index: index!, shards }];
      const dir = await fixturePath('hf/mixtral-f32-sharded');
      if (dir && moe.name !== 'wasm') sources.push(dir, `${dir}/model.safetensors.index.json`);
      for (const source of sources) {
        const layer = await MoELayer.fromPretrained(moe, { config: config!, checkpoint: source, layer: 1 });
        expect(Array.from(layer.forward(x).output.data as Float32Array)).toEqual(want);
        expect(layer.pretrained!.bytesRead!).toBeLessThan(total / 2);
      }
    });

    it('bad configs and checkpoints: errors that name what is wrong, and no layer', async () => {
      const fx = fixtures.find((f) => f.name === 'qwen2_moe-f32')!;
      await expect(MoELayer.fromPretrained(moe, { config: { ...fx.config, model_type: 'llama' }, checkpoint: fx.model, layer: 1 })).rejects.toThrow(
        /model_type: 'llama' is not supported \(supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss\)/,
      );
      await expect(MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: 99 })).rejects.toThrow(RangeError);
      await expect(MoELayer.fromPretrained(moe, { config: { ...fx.config, hidden_size: 48 }, checkpoint: fx.model, layer: 1 })).rejects.toThrow(/expected shape/);
      const ds = fixtures.find((f) => f.name === 'deepseek_v3-f32')!;
      await expect(MoELayer.fromPretrained(moe, { config: ds.config, checkpoint: ds.model, layer: 0 })).rejects.toThrow(/first_k_dense_replace/);
      // a checkpoint without the layer's router: the error names the key and lists what is there
      const other = moe.loadSafetensors(fx.model).tensors;
      const router = fx.meta.moeKeys.find((k) => /\.(gate|router)\.weight$/.test(k))!;
      delete other[router];
      const broken = moe.saveSafetensors(other);
      await expect(MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: broken, layer: 1 })).rejects.toThrow(new RegExp(router.replace(/\./g, '\\.')));
      await expect(MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: 1, dtype: 'int32' as never })).rejects.toThrow(TypeError);
    });
  });
}

describe('Hugging Face families: cpu and wasm agree bit for bit', () => {
  const cpu = backends.find((b) => b.name === 'cpu');
  const wasm = backends.find((b) => b.name === 'wasm');
  for (const fx of fixtures) {
    it.skipIf(!cpu || !wasm)(`${fx.name}: forward and backward`, async () => {
      const run = async (moe: Backend) => {
        const layer = await MoELayer.fromPretrained(moe, { config: fx.config, checkpoint: fx.model, layer: fx.meta.layer });
        const io = ioTensors(moe, fx.io);
        const f = layer.forward(io.x);
        const b = layer.backward(io.gradOutput);
        const bits = (t: Tensor) => Array.from(bytesOf(t));
        return { out: bits(f.output), w: bits(f.weights), gi: bits(b.gradInput), grads: Object.fromEntries(Object.entries(b.grads).map(([k, v]) => [k, bits(v as Tensor)])) };
      };
      const a = await run(cpu!);
      const b = await run(wasm!);
      expect(a.out).toEqual(b.out);
      expect(a.w).toEqual(b.w);
      expect(a.gi).toEqual(b.gi);
      expect(Object.keys(a.grads).sort()).toEqual(Object.keys(b.grads).sort());
      for (const k of Object.keys(a.grads)) expect(a.grads[k], k).toEqual(b.grads[k]);
    });
  }
});
