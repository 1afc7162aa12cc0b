#!/usr/bin/env bash
# The main job from a fresh clone: set up, build, then show the backends and cross-check them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
node dist/cli.js info
node dist/cli.js check
