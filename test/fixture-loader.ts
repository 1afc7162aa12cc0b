/**
 * Reading files under `test/fixtures/` as bytes, in Node (the file system) and in the browser
 * (the vitest browser project has no file system: the `readFixture` command of vitest.config.ts
 * reads the file on the Node side and hands it over as base64).
 */
const IN_NODE = typeof process !== 'undefined' && !!process.versions?.node;

/** The bytes of `test/fixtures/<path>`, or undefined when it does not exist. */
export async function fixtureBytes(path: string): Promise<Uint8Array | undefined> {
  if (IN_NODE) {
    const { existsSync, readFileSync } = await import('node:fs');
    const { fileURLToPath } = await import('node:url');
    const file = fileURLToPath(new URL(`./fixtures/${path}`, import.meta.url));
    return existsSync(file) ? new Uint8Array(readFileSync(file)) : undefined;
  }
  const { commands } = await import('vitest/browser');
  const b64 = await (commands as unknown as { readFixture(path: string): Promise<string | null> }).readFixture(path);
  if (b64 === null) return undefined;
  const bin = atob(b64);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** The absolute path of `test/fixtures/<path>` (Node only), for the backends that read files themselves. */
export async function fixturePath(path: string): Promise<string | undefined> {
  if (!IN_NODE) return undefined;
  const { fileURLToPath } = await import('node:url');
  return fileURLToPath(new URL(`./fixtures/${path}`, import.meta.url));
}

export async function fixtureJson<T>(path: string): Promise<T | undefined> {
  const bytes = await fixtureBytes(path);
  return bytes === undefined ? undefined : (JSON.parse(new TextDecoder().decode(bytes)) as T);
}
