// The GPU suite, Hugging Face families: `MoELayer.fromPretrained` on the cuda backend (the checkpoint
// read from its path) against the cpu backend and against transformers' own block (the fixtures in
// test/fixtures/hf, written by scripts/hf_fixtures.py). The routing is identical; the output and every
// gradient agree to the GEMM tolerance (cuBLAS sums in another order than the CPU core; bf16 rounds
// the activation before the down-projection on the GPU, docs/semantics.md). Plain node:test, no
// node_modules; see cuda.test.mjs.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { cpu, cuda, cudaOnly, host, lib, maxRelErr } from './common.mjs';

const { MoELayer, toNumbers } = lib;
const dir = fileURLToPath(new URL('../fixtures/hf/', import.meta.url));
const FIXTURES = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'gpt_oss'].flatMap((f) => [`${f}-f32`, `${f}-bf16`]);

/** max |a - b| / max |b| of two tensors' values. */
const rel = (a, b) => maxRelErr(toNumbers(host(a)), toNumbers(host(b)));

async function run(moe, name) {
  const path = `${dir}${name}`;
  const meta = JSON.parse(readFileSync(`${path}/meta.json`, 'utf8'));
  const layer = await MoELayer.fromPretrained(moe, { config: `${path}/config.json`, checkpoint: `${path}/model.safetensors`, layer: meta.layer });
  const io = moe.loadSafetensors(`${path}/io.safetensors`).tensors;
  const fwd = layer.forward(io.x);
  const back = layer.backward(io.gradOutput);
  return { io, fwd, back };
}

describe('Hugging Face families on cuda against cpu and transformers', () => {
  for (const name of FIXTURES) {
    test(name, { skip: cudaOnly || (!existsSync(`${dir}${name}`) && `fixture ${name} missing`) }, async () => {
      const g = await run(cuda, name);
      const c = await run(cpu, name);
      assert.deepEqual(Array.from(host(g.fwd.indices).data), Array.from(c.fwd.indices.data), 'indices');
      const bf16 = name.endsWith('bf16');
      const tol = bf16 ? 3e-2 : 1e-5;
      assert.ok(rel(g.fwd.weights, c.fwd.weights) < (bf16 ? 1e-2 : 1e-6), 'weights');
      assert.ok(rel(g.fwd.output, c.fwd.output) < tol, `output: ${rel(g.fwd.output, c.fwd.output)}`);
      if (!bf16) assert.ok(rel(g.fwd.output, g.io.output) < 1e-5, `output vs transformers: ${rel(g.fwd.output, g.io.output)}`);
      assert.ok(rel(g.back.gradInput, c.back.gradInput) < tol, `gradInput: ${rel(g.back.gradInput, c.back.gradInput)}`);
      for (const [k, v] of Object.entries(c.back.grads)) {
        assert.ok(g.back.grads[k], `grad ${k} present`);
        assert.ok(rel(g.back.grads[k], v) < tol, `grad ${k}: ${rel(g.back.grads[k], v)}`);
      }
    });
  }
});
