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
