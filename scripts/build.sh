#!/usr/bin/env bash
# Builds the three artefacts: the N-API addon (native/), the wasm package (pkg/wasm/), the TypeScript (dist/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
say() { printf '\033[1m[build]\033[0m %s\n' "$*"; }
say "native addon (release)"; npm run --silent build:native
say "wasm package";           bash scripts/build-wasm.sh
say "TypeScript";             npm run --silent build:ts
