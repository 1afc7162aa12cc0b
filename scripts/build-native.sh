#!/usr/bin/env bash
# Builds the N-API addon (crates/moe-node, napi-rs) in release mode and installs it as
# native/moe-dispatch.<platform>.node, the name ts/backends/native.ts looks for.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p moe-node
case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
case "$(uname -s)" in
  Linux) platform="linux-$arch-$(ldd --version 2>&1 | grep -qi musl && echo musl || echo gnu)"; lib=libmoe_node.so ;;
  Darwin) platform="darwin-$arch"; lib=libmoe_node.dylib ;;
  *) echo "build-native: unsupported platform $(uname -s)" >&2; exit 1 ;;
esac
mkdir -p native
# Copy to a temporary name and rename, so a running process never sees a half-written addon.
cp "target/release/$lib" "native/.moe-dispatch.$platform.node.tmp"
mv "native/.moe-dispatch.$platform.node.tmp" "native/moe-dispatch.$platform.node"
echo "native/moe-dispatch.$platform.node"
