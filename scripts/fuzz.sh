#!/usr/bin/env bash
# Coverage-guided fuzzing of the Rust core (fuzz/, cargo-fuzz + libFuzzer + AddressSanitizer):
# routing plans + permute/unpermute, route with arbitrary options, safetensors parsing,
# grouped-mm sort. Each target runs for MOE_FUZZ_SECONDS (default 15) seconds; a panic, a
# failed assertion, a sanitizer report or an allocation beyond 4 GiB fails the script and leaves
# the input in fuzz/artifacts/<target>/ (replay: cargo fuzz run <target> <file>).
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer); the stable rustup toolchain accepts
# them with RUSTC_BOOTSTRAP=1. Installs cargo-fuzz from crates.io if it is missing (about a
# minute on 2 cores); the first build of the targets takes about a minute too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

seconds="${MOE_FUZZ_SECONDS:-15}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
say "building ${#targets[@]} targets"
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  if cargo fuzz run -O "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -malloc_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    say "$t: ${runs:-?} inputs in ${seconds}s, no failure"
    rm -f "$log"
  else
    say "$t FAILED:"
    grep -v '^#' "$log" | tail -40
    rm -f "$log"
    exit 1
  fi
done
