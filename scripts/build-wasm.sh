#!/usr/bin/env bash
# Builds crates/moe-wasm into pkg/wasm with wasm-pack (ES module for browsers and Node), then
# pkg/wasm/moe_wasm_factory.js (scripts/wasm-factory.mjs: the glue as a per-instance factory).
# The wasm32 std comes from Debian's rust-web-src, compiled with -Zbuild-std by Debian's
# cargo/rustc (RUSTC_BOOTSTRAP unlocks -Z on a stable compiler); wasm-ld-19 links.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:$HOME/.cargo/bin:$PATH"   # Debian's cargo first, wasm-bindgen from ~/.cargo/bin
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19
export CARGO_TARGET_DIR="$PWD/target/wasm"       # kept apart from the rustup toolchain's builds
export RUSTFLAGS="-C target-feature=+simd128"
wasm-pack build crates/moe-wasm --release --mode force --target web --out-dir ../../pkg/wasm --out-name moe_wasm --no-pack \
  -- -Zbuild-std=std,panic_abort
rm -f pkg/wasm/.gitignore
# The glue keeps one instance in module state; the facade wants one per backend (a trapped
# instance is retired alone): moe_wasm_factory.js is the same glue as `instantiate(module)`.
node scripts/wasm-factory.mjs
