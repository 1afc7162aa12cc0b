#!/usr/bin/env bash
# Compiles every kernels/*.cu with NVRTC here, without a GPU: CUDA 13's NVRTC comes from PyPI
# (nvidia-cuda-nvrtc 13.0, about 90 MB, kept in .cache/nvrtc), then `moe-cuda-bench compile ARCH`
# (default sm_90a and sm_90: the grouped GEMM's real kernels, and its stubs) with ptxas's report
# (MOE_DISPATCH_NVRTC_VERBOSE). Fails on a compile error, and on ptxas's C7520 ("wgmma.mma_async
# instructions are serialized"): a wgmma in a path the compiler cannot prove warpgroup-uniform
# runs one at a time, which cost our grouped GEMM 15-20% in one H200 run. A check before a device
# run, not a substitute for one.
#
#   bash scripts/check-kernels.sh [ARCH ...]  (default sm_90a sm_90) ptxas's report: .cache/nvrtc/ptxas-ARCH.log
# MOE_DISPATCH_CUBIN_OUT=DIR keeps the CUBINs (DIR/FILE.ARCH.cubin): scripts/cubin-diff.py compares two
# builds kernel by kernel (a refactor whose machine code is unchanged needs no device run).
set -euo pipefail
cd "$(dirname "$0")/.."
# sm_90a (the grouped GEMM's wgmma kernels) and sm_90 (what the backend's module load compiles
# every file for: there the grouped GEMM's kernels are trap stubs, and must still compile)
archs=("$@")
if [[ ${#archs[@]} -eq 0 ]]; then archs=(sm_90a sm_90); fi
dir=.cache/nvrtc
lib="$dir/nvidia/cu13/lib"
if [[ ! -f "$lib/libnvrtc.so.13" ]]; then
  mkdir -p "$dir"
  python3 -m pip download --quiet --no-deps -d "$dir" "nvidia-cuda-nvrtc==13.0.*"
  python3 -c 'import glob, sys, zipfile; zipfile.ZipFile(sorted(glob.glob(sys.argv[1] + "/*.whl"))[-1]).extractall(sys.argv[1])' "$dir"
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --quiet --release -p moe-cuda --bin moe-cuda-bench
rc=0
for arch in "${archs[@]}"; do
  log="$dir/ptxas-$arch.log"
  LD_LIBRARY_PATH="$PWD/$lib" MOE_DISPATCH_NVRTC_VERBOSE=1 ./target/release/moe-cuda-bench compile "$arch" 2> "$log" || rc=$?
  if grep -q C7520 "$log"; then
    grep C7520 "$log"
    echo "check-kernels: wgmma serialised (C7520) in the functions above; ptxas's report: $log"
    exit 1
  fi
  grep -E "spill stores" "$log" | grep -v " 0 bytes spill stores" || true
  if [[ $rc != 0 ]]; then
    grep -E "error" "$log" | head -20 || true
    echo "check-kernels: a compile failed for $arch (above); the report: $log"
    exit "$rc"
  fi
  echo "check-kernels: every file compiled for $arch; ptxas's report: $log"
done
