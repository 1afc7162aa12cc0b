#!/usr/bin/env bash
# ts/generated/binding.ts is generated from the op table (crates/moe-bind/src/ops.rs): the
# argument and result types of every function both CPU bindings export. This fails when the
# committed file is stale (npm test runs it); `--write` regenerates it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
mode=--check
if [ "${1:-}" = "--write" ]; then mode=--write; fi
cargo run --quiet -p moe-bind --bin moe-bind-dts -- "$mode" ts/generated/binding.ts
