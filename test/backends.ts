/**
 * The backends the suites run on, found at import time.
 *
 * Every backend `backendInfo()` reports is a candidate ('cpu' and 'wasm' even if it forgot
 * them), so a new backend (e.g. 'cuda') is tested as soon as it reports itself available,
 * without new test code. A candidate that cannot run here is never silently dropped:
 * `registerBackendReport()` turns it into a skipped test whose title carries the reason, and
 * a build with no CPU backend at all fails.
 */
import { it } from 'vitest';

import { backendInfo, createBackend, type Backend, type BackendName } from '../ts/index.js';

/** The CPU backends every build must provide at least one of. */
export const CPU_BACKENDS: readonly BackendName[] = ['cpu', 'wasm'];

export interface Unavailable {
  name: BackendName;
  reason: string;
}

const infos = await backendInfo();

/** Backends that load and run here, in `backendInfo()` order (cuda, cpu, wasm). */
export const backends: Backend[] = [];
/** Candidates that do not run here, with why. */
export const unavailable: Unavailable[] = [];

const candidates = [...new Set<BackendName>([...CPU_BACKENDS, ...infos.map((i) => i.name)])];
for (const name of candidates) {
  const info = infos.find((i) => i.name === name);
  if (!info) {
    unavailable.push({ name, reason: 'backendInfo() does not list it' });
    continue;
  }
  if (!info.available) {
    unavailable.push({ name, reason: info.reason ?? 'backendInfo() gives no reason' });
    continue;
  }
  try {
    const backend = await createBackend({ prefer: name });
    if (backend.name !== name) {
      unavailable.push({ name, reason: `createBackend({ prefer: '${name}' }) returned the '${backend.name}' backend` });
    } else {
      backends.push(backend);
    }
  } catch (e) {
    unavailable.push({ name, reason: `backendInfo() says available, but createBackend failed: ${(e as Error).message}` });
  }
}
// Keep backendInfo() order so test titles are stable.
backends.sort((a, b) => infos.findIndex((i) => i.name === a.name) - infos.findIndex((i) => i.name === b.name));

/** Available backends that are CPU backends. */
export const cpuBackends: Backend[] = backends.filter((b) => CPU_BACKENDS.includes(b.name));

/** The backend called `name`, if it runs here. */
export function backendNamed(name: BackendName): Backend | undefined {
  return backends.find((b) => b.name === name);
}

/** `[name, backend]` rows for `describe.each` / `it.each`. */
export const backendRows: [BackendName, Backend][] = backends.map((b) => [b.name, b]);

/**
 * Registers, in the calling test file, one skipped test per unavailable backend (the reason
 * in its title) and one test that fails when no CPU backend runs at all.
 */
export function registerBackendReport(): void {
  for (const u of unavailable) {
    it.skip(`backend '${u.name}' is unavailable: ${u.reason}`, () => {});
  }
  it(`at least one CPU backend runs (available: ${backends.map((b) => b.name).join(', ') || 'none'})`, () => {
    if (cpuBackends.length === 0) {
      throw new Error(`no CPU backend is available, the build is broken: ${unavailable.map((u) => `${u.name}: ${u.reason}`).join('; ')}`);
    }
  });
}
