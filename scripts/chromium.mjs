/**
 * How every browser test and benchmark here starts Chromium: Debian's package (installed by
 * scripts/setup.sh; test tools never download a browser), headless, with the flags this
 * machine's closed network needs. Playwright gives each launch a fresh --user-data-dir.
 * `MOE_CHROMIUM` points at another Chromium binary.
 */
export const CHROMIUM = process.env.MOE_CHROMIUM ?? '/usr/bin/chromium';

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--enable-unsafe-webgpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Options for playwright-core's `chromium.launch()`. */
export const launchOptions = { executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS };

/**
 * Runs a benchmark page of bench/ (`bench/browser.html`, `bench/webgpu.html`; see bench/page.mjs)
 * in headless Chromium, served from the repository root with `params` as its query, and returns
 * what the page leaves in `window.benchResult` (an error there is thrown).
 */
export async function runBenchPage(path, params) {
  const { chromium } = await import('playwright-core');
  const { serve } = await import('./static-server.mjs');
  const server = await serve();
  const browser = await chromium.launch(launchOptions);
  try {
    const page = await browser.newPage();
    const q = new URLSearchParams(Object.entries(params).map(([k, v]) => [k, String(v)]));
    await page.goto(`${server.url}${path}?${q}`);
    await page.waitForFunction(() => window.benchResult !== undefined, null, { timeout: 600_000 });
    const res = await page.evaluate(() => window.benchResult);
    if (res.error) throw new Error(`in Chromium: ${res.error}`);
    return res;
  } finally {
    await browser.close();
    await server.close();
  }
}
