// The round trip into transformers, run by hand with scripts/hf_fixtures.py --verify-roundtrip:
// for every fixture in test/fixtures/hf, load the layer with MoELayer.fromPretrained, take one
// SGD step with its own gradients (so the weights written are not the ones read), write the layer
// with savePretrained (the family's own keys) and our forward output of the new weights. The
// Python side merges the keys into the fixture's checkpoint, loads it with from_pretrained (no
// missing/unexpected/newly initialised weights allowed) and compares transformers' block output.
//
//   npm run build && node scripts/hf-roundtrip.mjs /tmp/rt [--backend cpu]
//   /tmp/hfvenv/bin/python scripts/hf_fixtures.py --out test/fixtures/hf --verify-roundtrip /tmp/rt
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { createBackend, MoELayer } from '../dist/index.js';
import { fromValues, valuesF32 } from '../dist/numeric.js';

const out = process.argv[2];
if (!out) {
  console.error('usage: node scripts/hf-roundtrip.mjs OUT_DIR [--backend cpu|wasm|cuda]');
  process.exit(2);
}
const b = process.argv.indexOf('--backend');
const moe = await createBackend({ prefer: b > 0 ? process.argv[b + 1] : 'cpu' });
const root = fileURLToPath(new URL('../test/fixtures/hf/', import.meta.url));
const LR = 0.05;

for (const name of readdirSync(root).sort()) {
  if (!/-(f32|bf16)$/.test(name)) continue;
  const dir = join(root, name);
  const meta = JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8'));
  const bytes = new Uint8Array(readFileSync(join(dir, 'model.safetensors')));
  const layer = await MoELayer.fromPretrained(moe, { config: JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')), checkpoint: bytes, layer: meta.layer });
  const io = moe.loadSafetensors(new Uint8Array(readFileSync(join(dir, 'io.safetensors'))), { names: ['x', 'gradOutput'] }).tensors;
  layer.forward(io.x);
  const { grads } = layer.backward(io.gradOutput);
  // one SGD step, rounded once to each weight's dtype
  for (const [key, g] of Object.entries(grads)) {
    const w = layer.weights[key];
    const gv = valuesF32(g);
    const stepped = fromValues(
      w.dtype,
      w.shape,
      Float64Array.from(valuesF32(w), (v, i) => v - LR * gv[i]),
    );
    w.data.set(stepped.data);
  }
  const { output } = layer.forward(io.x);
  const target = join(out, name);
  mkdirSync(target, { recursive: true });
  writeFileSync(join(target, 'layer.safetensors'), layer.savePretrained());
  writeFileSync(join(target, 'expected.safetensors'), moe.saveSafetensors({ x: io.x, output }));
  console.log(`${name}: wrote ${target} (${moe.name})`);
}
