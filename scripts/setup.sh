#!/usr/bin/env bash
# Installs what building moe-dispatch needs, skipping whatever is already present:
#  - Debian's wasm32 standard library route (rustc-web, cargo-web, rust-web-src, lld-19);
#    the rustup toolchain here has no wasm32 std and `rustup target add` cannot download one.
#  - wasm-bindgen-cli at exactly the version crates/moe-wasm pins, and wasm-pack (crates.io).
#  - Debian's chromium, for the browser test project and the demo test (test tools never download a browser).
#  - the npm dev dependencies (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_pkgs=(rustc-web cargo-web rust-web-src lld-19 chromium)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "Debian wasm toolchain and chromium present"
fi

export PATH="$HOME/.cargo/bin:$PATH"
want_wb=$(sed -n 's/^wasm-bindgen = "=\(.*\)"/\1/p' crates/moe-wasm/Cargo.toml)
have_wb=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have_wb" != "$want_wb" ]; then
  say "installing wasm-bindgen-cli $want_wb (found: ${have_wb:-none})"
  # The registry mirror lacks one crate version of the upstream lock file, so resolve anew if --locked fails.
  cargo install wasm-bindgen-cli --version "=$want_wb" --locked --quiet 2>/dev/null ||
    cargo install wasm-bindgen-cli --version "=$want_wb" --quiet
else
  say "wasm-bindgen-cli $want_wb present"
fi
if ! command -v wasm-pack >/dev/null 2>&1; then
  say "installing wasm-pack"
  cargo install wasm-pack --locked --quiet
else
  say "wasm-pack present"
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error
else
  say "npm dependencies present"
fi
