#!/usr/bin/env bash
# The style gates `npm test` runs (and so CI): Biome (biome.json) over the TypeScript/JavaScript
# (format and lint, read-only, warnings fail too), rustfmt (rustfmt.toml) over every crate and the
# fuzz targets, and clippy with warnings as errors (the libraries and binaries of the workspace;
# the core, the binding table and the CUDA crate with their tests too; the N-API crate's test
# build is left out: its #[napi] functions are not registered there and read as dead code).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
npx --no-install biome ci --error-on-warnings .
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --release --quiet -- -D warnings
cargo clippy -p moe-core -p moe-bind -p moe-cuda --all-targets --release --quiet -- -D warnings
echo "lint: biome, rustfmt and clippy clean"
