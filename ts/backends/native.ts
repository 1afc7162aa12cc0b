/** Loads the N-API addon (the multi-threaded CPU backend) built into `native/`. */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import type { Binding } from '../backend.js';

/** The platform part of the addon's file name, as napi-rs names it. */
export function nativeTriple(): string {
  const { platform, arch } = process;
  if (platform === 'linux') {
    const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
    return `linux-${arch}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`;
  }
  if (platform === 'win32') return `win32-${arch}-msvc`;
  return `${platform}-${arch}`;
}

/** Where the addon is looked for; `MOE_DISPATCH_NATIVE` overrides it. */
export function nativeAddonPath(): string {
  return process.env.MOE_DISPATCH_NATIVE ?? fileURLToPath(new URL(`../../native/moe-dispatch.${nativeTriple()}.node`, import.meta.url));
}

export type Loaded = { binding: Binding; reason?: undefined } | { binding?: undefined; reason: string };

let cached: Loaded | undefined;

export function loadNative(): Loaded {
  if (cached) return cached;
  if (typeof process === 'undefined' || !process.versions?.node) {
    cached = { reason: 'the native backend needs Node.js' };
    return cached;
  }
  const path = nativeAddonPath();
  if (!existsSync(path)) {
    cached = { reason: `the native addon is not built: ${path} is missing (run npm run build)` };
    return cached;
  }
  try {
    const binding = createRequire(import.meta.url)(path) as Binding;
    cached = { binding };
    return cached;
  } catch (e) {
    cached = { reason: `the native addon at ${path} failed to load: ${(e as Error).message}` };
    return cached;
  }
}
