#!/usr/bin/env bash
# The test command from a fresh clone: set up, build, then the Rust unit tests and the JS suites.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo test -p moe-core --quiet
npx vitest run
