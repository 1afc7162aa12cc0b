/**
 * bench/shapes.json for the JS benches (see its "about"): the layer shapes run when no --shapes
 * is given, and a --shapes list checked against the shapes a bench knows (the library's
 * TRAIN_SHAPES, which test/shapes.test.ts keeps equal to the file's).
 */
import { readFileSync } from 'node:fs';

const file = JSON.parse(readFileSync(new URL('./shapes.json', import.meta.url), 'utf8'));

/** The byDefault layer shapes, as a --shapes list. */
export const DEFAULT_LAYER = file.layer
  .filter((s) => s.byDefault)
  .map((s) => s.name)
  .join(',');

/** The names of the --shapes list `list`, each a key of `known` (else a RangeError naming them). */
export function shapeNames(list, known) {
  const names = list.split(',');
  for (const n of names) {
    if (!Object.hasOwn(known, n)) throw new RangeError(`--shapes: unknown shape '${n}'; expected a comma list of ${Object.keys(known).join(', ')}`);
  }
  return names;
}
