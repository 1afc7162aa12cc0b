#!/usr/bin/env bash
# The test command from a fresh clone: set up, build, check ts/generated/binding.ts against the
# op table (scripts/check-generated.sh), then the Rust unit tests (the core's, and
# the CUDA crate's host-side ones: kernel names, launch shapes, plans; its GPU tests skip without
# a GPU), a bounded fuzzing run of the core (scripts/fuzz.sh: 15 s per target) and the JS suites.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/lint.sh
# the committed TypeScript declarations of the bindings match the op table
bash scripts/check-generated.sh
cargo test -p moe-core --quiet
# release, as build.sh built the addon (and with it this crate)
cargo test -p moe-cuda --release --quiet
bash scripts/fuzz.sh
npx vitest run
