#!/usr/bin/env bash
# The GPU suite and benchmark, for a machine with an NVIDIA GPU and no Node.js.
#
#   bash scripts/gpu-run.sh pack     here: build, then pack into .gpu-bundle/ (git-ignored) what
#                                    the GPU machine needs: node (xz), dist/, native/*.node,
#                                    pkg/, test/gpu/, the golden files, moe-cuda-bench, bench/*.py
#   bash scripts/gpu-run.sh remote   there, from the repo root (with .gpu-bundle/ beside it):
#                                    unpack node, run the GPU suite, `check`, the benchmarks;
#                                    logs and JSON go to $OUT (default .gpu-bundle/out)
#
# With the workplace's device tool: `run` with carry [".gpu-bundle"] and the command
# `bash scripts/gpu-run.sh remote`. Where CUDA is missing, the suite skips with the reason.
# Options of pack: --no-build (pack what is built). Of remote: SKIP_SUITE=1 (the GPU suite and
# `check`), SKIP_SOAK=1, SKIP_BENCH=1, SKIP_EXPERTS=1 (the experts part of the benchmark),
# SUITE_FILES="a b" (only test/gpu/a.test.mjs, b.test.mjs), SUITE_TIMEOUT=S (the suite's time limit, 420 s), SKIP_TORCH=1, SKIP_TRAIN=1 (the training-step benchmarks: Rust-driven and PyTorch's),
# TRAIN_AB="NAME=value ..." (the training steps again with those environment settings, each right after the default's; the training results
# go into one train.json), TRAIN_CLOCKS=1 (the clock, power and throttle reasons through the training processes: train.json "train-clocks"),
# WEBGPU_LISTS=1 (with WEBGPU: webgpu-node and webgpu-profile again with --lists indirect: auto dispatches them directly on a GPU),
# WEBGPU_SHAPE="--tokens 6144" (with WEBGPU: webgpu-node's and webgpu-profile's shape options, each of their runs; the
# default T=4096, H=1024, E=64, k=4; Dawn crashed with 256 MB buffers: keep the largest below 128 MB),
# GGEMM=1 (moe-cuda-bench ggemm: the grouped GEMM's checks and timings; GGEMM_ROWS="768 767": once for each row
# count an expert, --rows-per-expert, two interleaved rounds into ggemm-rows.json; GGEMM_GROUPS="4 8 16": once a raster group,
# a process each; GGEMM_ARGS="... --groups 4,8" times the raster groups interleaved in one process instead),
# CLOCKS=1 (the SM clock and power draw, nvidia-smi every 20 ms, during moe-cuda-bench ggemm's token-side GEMMs at
# CLOCKS_SHAPES (default mixtral), 50 iterations each; bench/clock-phases.py gives each GEMM's (cuBLAS's, then ours) into clocks.json),
# EP_PERMUTES=1 (bench/ep-permutes.mjs: EP dispatch's two permutes alone at issue 20's shape, with and without numOutTokens),
# ACT=1 (moe-cuda-bench act: the activation kernels' loops specialised to the kind against the generic loop and
# one column a thread, byte for byte, then the experts' bf16 passes timed both ways; ACT_ARGS: its options),
# ACTMEM_AB="NAME=value ..." (with ACTMEM: the grouped path again with those settings, each round; with
# MOE_DISPATCH_EXPERTS_GEMM=cublas among them, the cuBLAS path; several variants separated by ';'),
# ACTMEM=1 (issue 19: the layer's forward + backward time and activation memory, ours on cuBLAS and on our
# grouped GEMM, bench/actmem-gpu.mjs, and PyTorch's, bench/actmem-gpu.py, interleaved ACTMEM_ROUNDS times
# (default 2) into one actmem.json; ACTMEM_TIMELINE=N: each of our processes also records N steps with the
# cuda backend's timeline and keeps the median one: where the GPU's time goes between kernels, gaps and host;
# HOSTPROF=1: one process of bench/actmem-gpu.mjs (fine-grained, 40 steps), its timed steps under V8's profiler
# (`--cpu-profile`, every 50 us; not the warm-up, whose first calls open cuBLAS), summarised by bench/cpuprof-summary.py (self and inclusive time a function, over the steps: hostprof.json; the
# raw profile is not kept): where the host's ~20 us a launch go at the step's start, where the GPU waits for it;
# LAYER_SHAPES="fine-grained,deepseek-v3-ep8" (ACTMEM's and the training step's shapes, bench/shapes.json's layer shapes;
# default its byDefault ones, fine-grained and mixtral; GGEMM_ARGS and BENCH_ARGS take --shapes themselves),
# ACTMEM_CLOCKS=1: nvidia-smi every 50 ms through the rounds (clock, power, temperature, throttle reasons) and a
# stamp after each process: bench/clock-phases.py gives each process's clock and power-cap share, actmem-clocks.json),
# WEBGPU=1 (pack and remote: the webgpu backend in Node through Dawn: the GPU suite's webgpu-dawn.test.mjs
# against wasm, MOE_WEBGPU_DAWN set before the suite; then next to cuda, bench/webgpu-node.mjs, and each
# shader's GPU time, bench/webgpu-profile.mjs)
# AB_REV=REV (pack: REV's TypeScript built into dist-ab, as WEBGPU_AB below; remote with ACTMEM: each round also runs
# the grouped path on dist-ab, rows labelled grouped-rev-REV: a TypeScript change A/B'd in one run),
# HOSTCOSTS=N (bench/actmem-gpu.mjs --host-costs N, fine-grained, grouped path: the host's time a backend method a step,
# forward and backward, into hostcosts.json; on dist-ab too where AB_REV packed it; then `moe-cuda-bench host` (the
# device entries from Rust: hostcosts-rust.json) and bench/napi-costs.mjs (the addon's functions and the facade's: hostcosts-napi.json)),
# WEBGPU_AB=REV (with WEBGPU: pack builds REV's TypeScript into dist-ab (a git worktree; the wasm and
# native builds are this tree's), and remote runs webgpu-node.mjs and webgpu-profile.mjs on dist-ab
# and then on dist again: webgpu-node-ab.json, webgpu-profile-ab.json, webgpu-node-2.json,
# webgpu-profile-2.json, interleaved on one machine; bench/webgpu-ab.mjs prints them side by side into webgpu-ab.json)
# NCU=1 (issue 19: Nsight Compute's view: the grouped GEMM kernels at the fine-grained and Mixtral-like shapes
# (duration, SM / tensor-pipe / DRAM / L2 throughput), and every kernel of one layer forward + backward
# (bench/actmem-gpu.mjs on cuBLAS and on the grouped GEMM), summarised by bench/ncu-summary.py into ncu.json;
# NCU=layer: the layer's only; NCU=detail: ncu's sections for the layer's kernels matching NCU_KERNELS;
# NCU_SHAPE: the layer's shape (fine-grained; or mixtral), NCU_PATHS: "cublas grouped" or one of them;
# NCU_METRICS: more metrics for NCU=detail, e.g. "regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio";
# NCU=source: stall samples per SASS line of one grouped GEMM launch (NCU_KERNELS; NCU_ARGS: more ggemm options, e.g.
# "--act" with NCU_KERNELS=grouped_gemm_nn_n256_bf16_act for the fused first GEMM), the top 25 lines in the log)
# (SOAK_SMALL / SOAK_LARGE set the soak's counts), SKIP_EP=1 (the expert-parallel launcher over
# NCCL, one process per GPU: scripts/ep-launch.mjs; EP_BENCH=ITERS adds its bandwidth benchmark on device tensors at
# issue 20's shape into ep-bench.json; EP_LAYER=ITERS: bench/ep-layer-gpu.mjs, the layer's step through forwardParallel /
# backwardParallel over a one-rank NCCL group against forward / backward, into ep-layer.json). MOE_GPU_BUNDLE=DIR packs into / runs from
# another folder than .gpu-bundle (a helper's own bundle beside the lead's; git-ignore it).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${MOE_GPU_BUNDLE:-.gpu-bundle}"
# the Dawn build that WEBGPU=1 carries (an exact version: the npm registry's)
WEBGPU_VERSION=0.6.2
# each line with the seconds since the script began: how long each part took there, for planning
# a run within the device time left (a part's time is the gap to the next line)
say() { printf '\033[1m[gpu-run %ds]\033[0m %s\n' "$SECONDS" "$*"; }

pack() {
  set -e
  export PATH="$HOME/.cargo/bin:$PATH"
  if [[ "${1:-}" != "--no-build" ]]; then
    say "building: native addon, TypeScript, moe-cuda-bench"
    npm run --silent build:native
    npx tsc -p tsconfig.json
    cargo build --release -p moe-cuda --bin moe-cuda-bench
  fi
  mkdir -p "$BUNDLE"
  # node: xz-compressed, rebuilt only when /usr/bin/node changes
  local node_bin
  node_bin="$(command -v node)"
  if [[ ! -f "$BUNDLE/node.xz" || "$node_bin" -nt "$BUNDLE/node.xz" ]]; then
    say "compressing $node_bin ($(du -h "$node_bin" | cut -f1)) with xz"
    xz -T0 -6 -c "$node_bin" > "$BUNDLE/node.xz.tmp" && mv "$BUNDLE/node.xz.tmp" "$BUNDLE/node.xz"
  fi
  rm -rf "$BUNDLE/dist" "$BUNDLE/native" "$BUNDLE/pkg" "$BUNDLE/test" "$BUNDLE/golden" "$BUNDLE/bin" "$BUNDLE/bench" "$BUNDLE/scripts" "$BUNDLE/examples" "$BUNDLE/out"
  mkdir -p "$BUNDLE/native" "$BUNDLE/test" "$BUNDLE/golden" "$BUNDLE/bin" "$BUNDLE/bench" "$BUNDLE/scripts" "$BUNDLE/examples"
  # the expert-parallel launcher (test/gpu/ep-nccl.test.mjs runs it with one rank) and the
  # expert-parallel training example (test/gpu/layer-ep.test.mjs runs it with --device)
  cp scripts/ep-launch.mjs "$BUNDLE/scripts/"
  cp examples/train-ep.mjs "$BUNDLE/examples/"
  cp -r dist "$BUNDLE/dist"
  cp native/*.node "$BUNDLE/native/"
  [[ -d pkg ]] && cp -r pkg "$BUNDLE/pkg"
  cp -r test/gpu "$BUNDLE/test/gpu"
  cp -r test/common "$BUNDLE/test/common"
  # the Hugging Face fixtures (tiny models, a few MB) for test/gpu/hf.test.mjs
  mkdir -p "$BUNDLE/test/fixtures" && cp -r test/fixtures/hf "$BUNDLE/test/fixtures/hf"
  local golden="${MOE_GOLDEN_DIR:-test/fixtures/golden}"
  cp "$golden"/permute.json "$golden"/unpermute.json "$golden"/route.json "$BUNDLE/golden/"
  cp target/release/moe-cuda-bench "$BUNDLE/bin/"
  cp bench/shapes.json bench/shapes.py bench/shapes.mjs bench/gpu_torch_ref.py bench/gpu_torch_experts.py bench/gpu_torch_train.py bench/train-gpu.mjs "$BUNDLE/bench/"
  cp bench/actmem-gpu.mjs bench/actmem-gpu.py bench/ncu-summary.py bench/hbm-rw.py bench/ep-permutes.mjs bench/clock-phases.py bench/cpuprof-summary.py bench/napi-costs.mjs bench/ep-layer-gpu.mjs "$BUNDLE/bench/"
  # WEBGPU=1: the webgpu backend in Node through Dawn (issue 21): the `webgpu` npm package's Linux
  # build (xz) and Debian's Vulkan loader, kept between packs; bench/webgpu-node.mjs and its page code
  # (the suite's test/gpu/webgpu-dawn.test.mjs and its cases, test/common/webgpu-cases.mjs, come with test/)
  if [[ -n "${WEBGPU:-}" ]]; then
    cp bench/webgpu-node.mjs bench/webgpu-bench.mjs bench/webgpu-profile.mjs bench/webgpu-ab.mjs bench/dawn.mjs bench/timing.mjs "$BUNDLE/bench/"
    if [[ ! -f "$BUNDLE/webgpu/dawn.node.xz" || ! -f "$BUNDLE/webgpu/.debs-2" ]]; then
      local tmp
      tmp="$(mktemp -d)"
      say "fetching webgpu@$WEBGPU_VERSION (Dawn for Node), libvulkan1 and the glvnd libraries"
      (cd "$tmp" && npm pack --silent "webgpu@$WEBGPU_VERSION" >/dev/null && tar xzf "webgpu-$WEBGPU_VERSION.tgz" package/index.js package/package.json package/dist/linux-x64/dawn.node)
      mkdir -p "$BUNDLE/webgpu/package"
      cp "$tmp/package/index.js" "$tmp/package/package.json" "$BUNDLE/webgpu/package/"
      xz -T0 -6 -c "$tmp/package/dist/linux-x64/dawn.node" > "$BUNDLE/webgpu/dawn.node.xz"
      local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
      mkdir -p /tmp/amd64/partial
      # shellcheck disable=SC2086
      # NVIDIA's Vulkan ICD is libGLX_nvidia.so.0, which needs glvnd's dispatch libraries
      rm -f "$BUNDLE"/webgpu/*.deb
      apt-get $o update >/dev/null && (cd "$BUNDLE/webgpu" && apt-get $o download libvulkan1 libglvnd0 libglx0 libegl1 libgl1 libopengl0 libgles2 >/dev/null) && touch "$BUNDLE/webgpu/.debs-2"
      rm -rf "$tmp"
    fi
  fi
  rm -rf "$BUNDLE/dist-ab"
  local ab_rev="${AB_REV:-${WEBGPU_AB:-}}"
  if [[ -n "$ab_rev" ]]; then
    # another revision's TypeScript beside dist (its imports of ../pkg and ../native find this tree's)
    local wt
    wt="$(mktemp -d)/ab"
    git worktree add --detach --quiet "$wt" "$ab_rev"
    ln -s "$PWD/node_modules" "$wt/node_modules"
    ln -s "$PWD/pkg" "$wt/pkg"
    (cd "$wt" && npx tsc -p tsconfig.json)
    cp -r "$wt/dist" "$BUNDLE/dist-ab"
    git rev-parse --short "$ab_rev" > "$BUNDLE/dist-ab/REV"
    git worktree remove --force "$wt"
    say "dist-ab: the TypeScript of $ab_rev ($(cat "$BUNDLE/dist-ab/REV"))"
  fi
  # the same module resolution as in the repo: dist/ imports are relative, so the bundle is a
  # small copy of the repo's layout
  printf '{"type":"module"}\n' > "$BUNDLE/package.json"
  say "bundle: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE (the device tool carries at most 64 MiB with the working tree)"
  say "run there: bash scripts/gpu-run.sh remote   (carry: $BUNDLE)"
}

# NCU=1 (issue 19): Nsight Compute's view of the grouped GEMM kernels and of one layer forward +
# backward. ncu serialises kernels, so its durations are each kernel alone (no overlap, no launch
# gaps): their sum next to the layer's wall clock says how much of it is waiting.
ncu_step() {
  local ncu
  ncu=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -1)
  if [[ -z "$ncu" || ! -x "$ncu" ]]; then
    say "NCU=1: no ncu here (PATH, /opt/nvidia/nsight-compute)"
    return
  fi
  say "Nsight Compute: $ncu ($("$ncu" --version 2>&1 | tail -1))"
  local raw="$OUT/ncu-raw"
  mkdir -p "$raw"
  # the metrics this ncu has for this GPU (names differ between chips and versions)
  "$ncu" --query-metrics > "$raw/metrics.txt" 2>&1
  grep -iE "gmma|tensor_op" "$raw/metrics.txt" | head -12
  local want=(gpu__time_duration.sum sm__throughput.avg.pct_of_peak_sustained_elapsed
    sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed
    sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_elapsed
    dram__throughput.avg.pct_of_peak_sustained_elapsed lts__throughput.avg.pct_of_peak_sustained_elapsed
    dram__bytes_read.sum dram__bytes_write.sum)
  local have=() m
  for m in "${want[@]}"; do grep -qE "^${m%%.*}[[:space:]]" "$raw/metrics.txt" && have+=("$m"); done
  local metrics
  metrics=$(IFS=,; echo "${have[*]}")
  if [[ "$NCU" != layer && "$NCU" != detail && "$NCU" != source ]]; then
    say "ncu: the grouped GEMM kernels at the experts' shapes (metrics: $metrics)"
    timeout 400 "$ncu" --clock-control none --cache-control none -k regex:grouped_gemm --metrics "$metrics" --csv \
      "$BUNDLE/bin/moe-cuda-bench" ggemm --no-small --tile tma-store --iters 1 > "$raw/ggemm.csv" 2> "$raw/ggemm.err"
    echo "  exit code $?"
    python3 "$BUNDLE/bench/ncu-summary.py" "$raw/ggemm.csv" --json "$raw/ggemm.json" --min-us 50
  fi
  if [[ "$NCU" == source ]]; then
    # where the warps of one grouped GEMM launch stall, per SASS line (ncu's warp-state sampling):
    # the fine-grained forward x W1 on the default epilogue (NCU_KERNELS picks another kernel,
    # NCU_TILE=bulk / ring those kernels), its lines by stall samples
    say "ncu: stall samples per SASS line of ${NCU_KERNELS:=grouped_gemm_nn_n256_bf16_tma} (moe-cuda-bench ggemm, fine-grained)"
    timeout 300 "$ncu" --clock-control none --cache-control none -k "regex:$NCU_KERNELS" -c 1 --section SourceCounters --page source \
      --print-source sass --csv "$BUNDLE/bin/moe-cuda-bench" ggemm --no-small --no-wgrad --tile "${NCU_TILE:-tma-store}" --shapes fine-grained --iters 1 ${NCU_ARGS:-} \
      > "$raw/source.csv" 2> "$raw/source.err"
    echo "  exit code $?"
    python3 "$BUNDLE/bench/ncu-summary.py" "$raw/source.csv" --source
  fi
  if [[ "$NCU" == detail ]]; then
    # NCU_KERNELS (a regex): those kernels of one layer forward + backward (grouped GEMM path),
    # with ncu's sections (speed of light, warp stalls, occupancy, compute and memory workloads)
    say "ncu: ${NCU_KERNELS:=act_bwdgv|grouped_gemm_wgrad|route_backward} in the layer, sections"
    MOE_DISPATCH_EXPERTS_GEMM=grouped timeout 400 "$ncu" --clock-control none --cache-control none -k "regex:$NCU_KERNELS" \
      --section SpeedOfLight --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section LaunchStats ${NCU_METRICS:+--metrics "$NCU_METRICS"} --csv "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" \
      --shapes "${NCU_SHAPE:-fine-grained}" --warmup 0 --iters 1 > "$raw/detail.csv" 2>&1
    echo "  exit code $?"
    python3 "$BUNDLE/bench/ncu-summary.py" "$raw/detail.csv" --all --json "$raw/detail.json"
  fi
  # the layer (fine-grained): one forward + backward is the launches of a 2-iteration run beyond
  # those of a 1-iteration run
  local gemm n
  for gemm in $([[ "$NCU" == detail || "$NCU" == source ]] || echo "${NCU_PATHS:-cublas grouped}"); do
    for n in 1 2; do
      say "ncu: the layer's kernels, $gemm, $n iteration(s)"
      MOE_DISPATCH_EXPERTS_GEMM=$([[ $gemm == grouped ]] && echo grouped || echo cublas) timeout 300 "$ncu" --clock-control none \
        --cache-control none --metrics gpu__time_duration.sum --csv "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" \
        --shapes "${NCU_SHAPE:-fine-grained}" --warmup 0 --iters "$n" > "$raw/layer-$gemm-$n.csv" 2>&1
      echo "  exit code $?"
    done
    python3 "$BUNDLE/bench/ncu-summary.py" "$raw/layer-$gemm-2.csv" --beyond "$raw/layer-$gemm-1.csv" --json "$raw/layer-$gemm.json"
  done
  python3 - "$raw" "$OUT/ncu.json" <<'PY' || true
import json, os, sys
raw, out = sys.argv[1:]
doc = {}
for name in ('ggemm', 'layer-cublas', 'layer-grouped', 'detail'):
    p = os.path.join(raw, name + '.json')
    if os.path.exists(p):
        doc[name] = json.load(open(p))
json.dump(doc, open(out, 'w'), indent=1)
PY
  tar -C "$OUT" -cJf "$OUT/ncu-raw.tar.xz" ncu-raw && rm -rf "$raw"
}

remote() {
  OUT="${OUT:-$BUNDLE/out}"
  mkdir -p "$OUT"
  local log="$OUT/log.txt"
  exec > >(tee "$log") 2>&1
  say "machine: $(uname -m), $(nproc) cores; $(date -u +%FT%TZ)"
  # (the max SM clock and power limit: compute-bound timings differ between machines with them)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | sed "s/^/  /"
  # NVRTC: the loader's search first, else the usual places; its builtins library sits beside it
  if ! ldconfig -p | grep -q 'libnvrtc.so.13'; then
    local nvrtc
    nvrtc="$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnvrtc.so.13' 2>/dev/null | head -1)"
    [[ -z "$nvrtc" ]] && nvrtc="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib", "libnvrtc.so.13"))' 2>/dev/null)"
    if [[ -n "$nvrtc" && -e "$nvrtc" ]]; then
      export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
  # cuBLAS (the expert GEMMs): the same way
  if ! ldconfig -p | grep -q 'libcublas.so.13'; then
    local cublas
    cublas="$(find /usr/local/cuda*/ /usr/lib /opt -name 'libcublas.so.13' 2>/dev/null | head -1)"
    [[ -z "$cublas" ]] && cublas="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib", "libcublas.so.13"))' 2>/dev/null)"
    if [[ -n "$cublas" && -e "$cublas" ]]; then
      export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
  # NCCL (expert parallelism): the same way; the nvidia-nccl-cu13 wheel puts it in nvidia/nccl/lib
  if ! ldconfig -p | grep -q 'libnccl.so.2'; then
    local nccl
    nccl="$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnccl.so.2' 2>/dev/null | head -1)"
    [[ -z "$nccl" ]] && nccl="$(python3 -c 'import glob, os, nvidia; c = [f for p in nvidia.__path__ for f in sorted(glob.glob(os.path.join(p, "*", "lib", "libnccl.so.2")))]; print(c[0] if c else "")' 2>/dev/null)"
    if [[ -n "$nccl" && -e "$nccl" ]]; then
      export LD_LIBRARY_PATH="$(dirname "$nccl")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
  # NVLink multicast stays off in every process started here (it can take a shared host's GPUs out of service)
  export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  say "libraries: $(ldconfig -p | grep -oE 'libcuda\.so\.1|libnvrtc\.so\.13|libcublas\.so\.13|libnccl\.so\.2' | sort -u | tr '\n' ' ') LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  # a cache folder of our own, empty at the start: the first process compiles, later ones must hit the disk cache
  export MOE_DISPATCH_CACHE_DIR="${MOE_DISPATCH_CACHE_DIR:-/tmp/moe-dispatch-cache}"
  local node=/tmp/moe-node/node
  if [[ ! -x "$node" ]]; then
    mkdir -p /tmp/moe-node
    if command -v xz >/dev/null; then xz -dc "$BUNDLE/node.xz" > "$node"; else python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BUNDLE/node.xz" "$node"; fi
    chmod +x "$node"
  fi
  say "node $("$node" --version)"
  export MOE_GOLDEN_DIR="$BUNDLE/golden"

  say "backends (first process: compiles the kernels)"
  "$node" "$BUNDLE/dist/cli.js" info
  "$node" -e "import('./$BUNDLE/dist/index.js').then((m) => console.log('  nccl:', JSON.stringify(m.ncclInfo())))"
  ls -la "$MOE_DISPATCH_CACHE_DIR" 2>&1 | sed 's/^/  /'

  if [[ -n "${WEBGPU:-}" && -f "$BUNDLE/webgpu/dawn.node.xz" ]]; then
    # Dawn finds the GPU through NVIDIA's Vulkan driver; the loader comes with the bundle. Set up
    # before the suite: MOE_WEBGPU_DAWN makes test/gpu/webgpu-dawn.test.mjs run (it skips without)
    say "webgpu through Dawn: the Vulkan loader, NVIDIA's driver files, dawn.node"
    if ! ldconfig -p | grep -q 'libGLdispatch.so.0' || ! ldconfig -p | grep -q 'libvulkan.so.1'; then
      for f in "$BUNDLE"/webgpu/*.deb; do dpkg -x "$f" /; done
      ldconfig
    fi
    [[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    [[ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ]] && export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    mkdir -p "$BUNDLE/webgpu/package/dist/linux-x64"
    xz -dc "$BUNDLE/webgpu/dawn.node.xz" > "$BUNDLE/webgpu/package/dist/linux-x64/dawn.node"
    MOE_WEBGPU_DAWN="$(cd "$BUNDLE/webgpu/package" && pwd)"
    export MOE_WEBGPU_DAWN
  fi

  if [[ -z "${SKIP_SUITE:-}" ]]; then
    say "GPU suite (node --test)"
    local files=("$BUNDLE/test/gpu/")
    # SUITE_FILES="optim layer-train": only those files of test/gpu (a quick look; the full suite is the default)
    [[ -n "${SUITE_FILES:-}" ]] && { files=(); for f in $SUITE_FILES; do files+=("$BUNDLE/test/gpu/$f.test.mjs"); done; }
    # (a time limit, SUITE_TIMEOUT seconds: a kernel that never finishes must not take the rest of the run with it;
    # the suite takes ~40 s on the H200)
    timeout "${SUITE_TIMEOUT:-420}" "$node" --test --test-reporter=tap --test-reporter-destination="$OUT/gpu-suite.tap" --test-reporter=spec \
      --test-reporter-destination=/dev/null "${files[@]}" ; echo "  exit code $? (124: over SUITE_TIMEOUT)"
    grep -E '^# (\\# )?(cuda|CUDA)' "$OUT/gpu-suite.tap" | head -3
    grep -E '^# (tests|suites|pass|fail|cancelled|skipped|todo|duration_ms)' "$OUT/gpu-suite.tap"
    grep -E '^\s*not ok' "$OUT/gpu-suite.tap" | head -20

    say "moe-dispatch check (random problems through cuda, cpu and wasm)"
    # (into log.txt only: the device tool brings back at most 8 files)
    "$node" "$BUNDLE/dist/cli.js" check --cases 300 | tail -8
  fi
  if [[ -z "${SKIP_EP:-}" ]]; then
    say "expert parallelism over NCCL: one process per GPU, dispatch -> experts -> combine against the single-GPU layer"
    timeout 300 "$node" "$BUNDLE/scripts/ep-launch.mjs" --out "$OUT/ep-launch.json" > /dev/null; echo "  exit code $?"
    grep -E '"(ranks|equivalent|bitIdentical|deterministic|wallMs)"' "$OUT/ep-launch.json" 2>/dev/null | head -5
    if [[ -n "${EP_BENCH:-}" ]]; then
      # EP_BENCH=ITERS: device tensors at issue 20's shape, dispatch / combine against NCCL's all-to-all of the same rows
      say "expert parallelism: the bandwidth benchmark (device tensors, T=8192 a rank, H=7168, E=256, k=8, bf16)"
      timeout 400 "$node" "$BUNDLE/scripts/ep-launch.mjs" --bench "$EP_BENCH" --tokens 8192 --hidden 7168 --experts 256 --topk 8 --inter 64 \
        --repeat 2 --profile --out "$OUT/ep-bench.json" > /dev/null; echo "  exit code $?"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d.get(k) for k in ('ranks','equivalent','bitIdentical','deterministic')})); [print(json.dumps(b)) for b in d.get('bench') or []]; [print(r.get('error')) for r in d['results'] if r.get('error')]" "$OUT/ep-bench.json" 2>&1 | head -12
    fi
    if [[ -n "${EP_LAYER:-}" ]]; then
      say "expert parallelism: the layer's step through a one-rank NCCL group against the one-rank path (bench/ep-layer-gpu.mjs)"
      timeout 300 "$node" "$BUNDLE/bench/ep-layer-gpu.mjs" --dist "$BUNDLE/dist" --iters "$EP_LAYER" --out "$OUT/ep-layer.json"; echo "  exit code $?"
    fi
  fi
  if [[ -z "${SKIP_SOAK:-}" ]]; then
    say "soak: device memory, 100k small + 1k large ops on device tensors"
    timeout 300 "$node" --expose-gc "$BUNDLE/test/gpu/soak.mjs" --small "${SOAK_SMALL:-100000}" --large "${SOAK_LARGE:-1000}" --out "$OUT/soak.json"; echo "  exit code $?"
  fi
  if [[ -z "${SKIP_BENCH:-}" ]]; then
    say "JS per-call overhead"
    "$node" "$BUNDLE/test/gpu/overhead.mjs" --out "$OUT/overhead.json"
    say "moe-cuda-bench (checks at full size, then CUDA-event timings)"
    timeout 300 "$BUNDLE/bin/moe-cuda-bench" run --iters 20 ${BENCH_ARGS:-} --out "$OUT/bench.json"; echo "  exit code $?"
    say "the memory's rates with the dispatch's traffic: copy, permute's and unpermute's bytes, pure write / read (PyTorch, bench/hbm-rw.py)"
    PYTHONUNBUFFERED=1 timeout 120 python3 "$BUNDLE/bench/hbm-rw.py" --out "$OUT/hbm-rw.json"; echo "  exit code $?"
    if [[ -z "${SKIP_EXPERTS:-}" ]]; then
      say "moe-cuda-bench experts (cuBLAS expert GEMMs, experts, dispatch + experts layer)"
      # the SM clock, power and temperature every 250 ms meanwhile (compute-bound timings move
      # with them), summarised into the log
      local clocks=/tmp/moe-clocks.csv
      nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 250 > "$clocks" 2>/dev/null &
      local smi=$!
      timeout 240 "$BUNDLE/bin/moe-cuda-bench" experts --iters 10 --out "$OUT/experts.json"; echo "  exit code $?"
      kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
      python3 - "$clocks" <<'PY' || true
import sys, statistics
rows = [l.split(',') for l in open(sys.argv[1]) if l.count(',') == 2]
cols = list(zip(*[[float(x) for x in r] for r in rows if all(x.strip().replace('.', '', 1).isdigit() for x in r)]))
for name, v in zip(['SM clock MHz', 'power W', 'temperature C'], cols):
    q = statistics.quantiles(v, n=10, method='inclusive') if len(v) > 1 else [v[0]] * 9
    print(f"  during the experts bench: {name} min {min(v):.0f}, p10 {q[0]:.0f}, median {statistics.median(v):.0f}, max {max(v):.0f} ({len(v)} samples)")
PY
    fi
  fi
  if [[ -n "${WEBGPU:-}" && -f "$BUNDLE/webgpu/dawn.node.xz" ]]; then
    say "webgpu in Node through Dawn, next to cuda (bench/webgpu-node.mjs)"
    # the GPU suite's webgpu-dawn.test.mjs (above): its adapter, its counts and any failure
    grep -E '^# webgpu|^(not )?ok [0-9]+ - (webgpu|Dawn)' "$OUT/gpu-suite.tap" 2>/dev/null | head -5
    timeout 240 "$node" "$BUNDLE/bench/webgpu-node.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/dist" ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-node.json"; echo "  exit code $?"
    say "webgpu: each shader's GPU time (timestamp queries), bench/webgpu-profile.mjs"
    timeout 240 "$node" "$BUNDLE/bench/webgpu-profile.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/dist" ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-profile.json"; echo "  exit code $?"
    if [[ -n "${WEBGPU_LISTS:-}" ]]; then
      # WEBGPU_LISTS=1: both again with the list passes dispatched indirectly (--lists indirect; auto is direct on a GPU)
      say "webgpu: the list passes dispatched indirectly (webgpu-node-indirect.json, webgpu-profile-indirect.json)"
      timeout 240 "$node" "$BUNDLE/bench/webgpu-node.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/dist" --lists indirect ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-node-indirect.json"; echo "  exit code $?"
      timeout 240 "$node" "$BUNDLE/bench/webgpu-profile.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/dist" --lists indirect ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-profile-indirect.json"; echo "  exit code $?"
    fi
    if [[ -d "$BUNDLE/dist-ab" ]]; then
      # WEBGPU_AB: the other revision, then this one again (A B A on one machine)
      for run in ab:dist-ab 2:dist; do
        say "webgpu A/B: ${run#*:} (webgpu-node-${run%%:*}.json, webgpu-profile-${run%%:*}.json)"
        timeout 240 "$node" "$BUNDLE/bench/webgpu-node.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/${run#*:}" ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-node-${run%%:*}.json"; echo "  exit code $?"
        timeout 240 "$node" "$BUNDLE/bench/webgpu-profile.mjs" --webgpu "$BUNDLE/webgpu/package" --dist "$BUNDLE/${run#*:}" ${WEBGPU_SHAPE:-} --out "$OUT/webgpu-profile-${run%%:*}.json"; echo "  exit code $?"
      done
      say "webgpu A/B side by side (bench/webgpu-ab.mjs: REV | this tree | again; webgpu-ab.json)"
      "$node" "$BUNDLE/bench/webgpu-ab.mjs" --dir "$OUT" --out "$OUT/webgpu-ab.json"; echo "  exit code $?"
    fi
  fi
  if [[ -n "${GGEMM:-}" ]]; then
    # our grouped GEMM (issue 19): its correctness checks (host reference, cuBLAS, run to run) and timings
    # GGEMM_GROUPS="4 8 16": once for each raster group (MOE_DISPATCH_GG_GROUP), the output in log.txt only
    if [[ -n "${GGEMM_GROUPS:-}" ]]; then
      for group in $GGEMM_GROUPS; do
        say "moe-cuda-bench ggemm, MOE_DISPATCH_GG_GROUP=$group"
        MOE_DISPATCH_GG_GROUP="$group" timeout 300 "$BUNDLE/bin/moe-cuda-bench" ggemm ${GGEMM_ARGS:---iters 3}; echo "  exit code $?"
      done
    elif [[ -n "${GGEMM_ROWS:-}" ]]; then
      # GGEMM_ROWS="768 767": once for each row count an expert (--rows-per-expert), two interleaved rounds, a
      # process each, into one ggemm-rows.json ({"768": [round 1, round 2], ...})
      local rows_dir
      rows_dir="$(mktemp -d)"
      for round in 1 2; do
        for r in $GGEMM_ROWS; do
          say "moe-cuda-bench ggemm --rows-per-expert $r, round $round"
          timeout 300 "$BUNDLE/bin/moe-cuda-bench" ggemm ${GGEMM_ARGS:---iters 3} --rows-per-expert "$r" --out "$rows_dir/$r-$round.json"; echo "  exit code $?"
        done
      done
      python3 - "$rows_dir" "$OUT/ggemm-rows.json" <<'PY'
import glob, json, os, sys
out = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    rows, _ = os.path.basename(f)[:-5].split("-")
    out.setdefault(rows, []).append(json.load(open(f)))
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
    else
      say "moe-cuda-bench ggemm"
      timeout 300 "$BUNDLE/bin/moe-cuda-bench" ggemm ${GGEMM_ARGS:---iters 3} --out "$OUT/ggemm.json"; echo "  exit code $?"
    fi
  fi
  if [[ -n "${CLOCKS:-}" ]]; then
    # issue 19: does our GEMM run at a lower clock than cuBLAS's at the same work (power)? In the
    # Mixtral-like x W1, permute + our kernel ran faster than our kernel alone, back to back
    say "SM clock and power during the token-side GEMMs (bench/clock-phases.py)"
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 20 > "$OUT/smi.csv" &
    local smi=$!
    timeout 300 "$BUNDLE/bin/moe-cuda-bench" ggemm --shapes "${CLOCKS_SHAPES:-mixtral}" --no-small --no-wgrad --tile bulk --iters 50 \
      | while IFS= read -r line; do echo "$(date '+%Y/%m/%d %H:%M:%S.%N') $line"; done > "$OUT/clocks-bench.log"
    kill "$smi" 2>/dev/null
    python3 "$BUNDLE/bench/clock-phases.py" "$OUT/smi.csv" "$OUT/clocks-bench.log" --json "$OUT/clocks.json"; echo "  exit code $?"
  fi
  if [[ -n "${EP_PERMUTES:-}" ]]; then
    say "EP dispatch's permutes alone (bench/ep-permutes.mjs)"
    timeout 120 "$node" "$BUNDLE/bench/ep-permutes.mjs" "$BUNDLE/dist" | tee "$OUT/ep-permutes.txt"; echo "  exit code $?"
  fi
  if [[ -n "${ACT:-}" ]]; then
    say "moe-cuda-bench act (activation kernels: checks, then timings)"
    timeout 300 "$BUNDLE/bin/moe-cuda-bench" act ${ACT_ARGS:---iters 20} --out "$OUT/act.json"; echo "  exit code $?"
  fi
  if [[ -n "${NCU:-}" ]]; then
    ncu_step
  fi
  if [[ -n "${HOSTCOSTS:-}" ]]; then
    # the host's time a backend method (the step's start is where the GPU waits for the host)
    say "host costs a backend method (bench/actmem-gpu.mjs --host-costs $HOSTCOSTS, fine-grained, grouped)"
    MOE_DISPATCH_EXPERTS_GEMM=grouped timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" --shapes fine-grained \
      --iters 5 --host-costs "$HOSTCOSTS" --out "$OUT/hostcosts.json"; echo "  exit code $?"
    if [[ -d "$BUNDLE/dist-ab" ]]; then
      MOE_DISPATCH_EXPERTS_GEMM=grouped timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist-ab" --shapes fine-grained \
        --iters 5 --host-costs "$HOSTCOSTS" --label "rev-$(cat "$BUNDLE/dist-ab/REV")" --out "$OUT/hostcosts-rev.json"; echo "  exit code $?"
    fi
    # the same device entries from Rust, and at the N-API boundary (the addon's functions, the facade's methods)
    timeout 120 "$BUNDLE/bin/moe-cuda-bench" host --out "$OUT/hostcosts-rust.json"; echo "  exit code $?"
    timeout 120 "$node" "$BUNDLE/bench/napi-costs.mjs" --dist "$BUNDLE/dist" --out "$OUT/hostcosts-napi.json"; echo "  exit code $?"
  fi
  if [[ -n "${HOSTPROF:-}" ]]; then
    say "the host's time in the layer's steps (V8's profiler over the timed steps, bench/cpuprof-summary.py)"
    rm -rf "$OUT/prof" && mkdir -p "$OUT/prof"
    # (the timed steps alone: the warm-up's first calls open cuBLAS and load kernels)
    timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" --shapes fine-grained --iters 40 \
      --cpu-profile "$OUT/prof/steps.cpuprofile" --out "$OUT/prof/actmem.json" | grep "forward + backward"; echo "  exit code $?"
    python3 "$BUNDLE/bench/cpuprof-summary.py" "$OUT/prof/steps.cpuprofile" --within forward --top 25 --json "$OUT/hostprof.json"; echo "  exit code $?"
    python3 "$BUNDLE/bench/cpuprof-summary.py" "$OUT/prof/steps.cpuprofile" --within backward --top 15 | head -18
    rm -rf "$OUT/prof"
  fi
  # A part's clocks (ACTMEM_CLOCKS, TRAIN_CLOCKS): `clocks_begin NAME` samples the SM clock, power,
  # temperature and throttle reasons every 50 ms into $OUT/NAME-smi.csv; `clocks_stamp NAME TEXT`
  # stamps the end of each process (bench/clock-phases.py names a phase by the stamp that ends it);
  # `clocks_end NAME` writes each process's clock and power-cap share to $OUT/NAME-clocks.json and
  # drops the raw files (the device tool brings back a few files: the summary keeps what they said).
  local clocks_pid=""
  clocks_begin() {
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 50 \
      > "$OUT/$1-smi.csv" &
    clocks_pid=$!
    clocks_stamp "$1" start
  }
  clocks_stamp() { [[ -n "$clocks_pid" ]] && echo "$(date '+%Y/%m/%d %H:%M:%S.%N') ${*:2}" >> "$OUT/$1-stamps.log"; return 0; }
  clocks_end() {
    [[ -n "$clocks_pid" ]] || return 0
    kill "$clocks_pid" 2>/dev/null
    clocks_pid=""
    say "the clock and power cap of each process (bench/clock-phases.py)"
    python3 "$BUNDLE/bench/clock-phases.py" "$OUT/$1-smi.csv" "$OUT/$1-stamps.log" --json "$OUT/$1-clocks.json"; echo "  exit code $?"
    rm -f "$OUT/$1-smi.csv" "$OUT/$1-stamps.log"
  }
  # LAYER_SHAPES="a,b": ACTMEM's and the training step's shapes (bench/shapes.json's layer shapes;
  # unset: its byDefault ones), passed to each of their processes as --shapes
  local LS=()
  [[ -n "${LAYER_SHAPES:-}" ]] && LS=(--shapes "$LAYER_SHAPES")
  if [[ -n "${ACTMEM:-}" ]]; then
    # issue 19: the layer's forward + backward and its activation memory (what the forward keeps
    # for the backward): ours on the default path (our grouped GEMM on a Hopper GPU), on cuBLAS, on our grouped GEMM with
    # ACTMEM_AB's settings (the path is read once a process),
    # PyTorch's (torch._grouped_mm), interleaved round by round; the parts go into one actmem.json
    # ACTMEM_CLOCKS=1: the clock, power and throttle reasons through the rounds (clocks_begin)
    [[ -n "${ACTMEM_CLOCKS:-}" ]] && clocks_begin actmem
    for round in $(seq 1 "${ACTMEM_ROUNDS:-2}"); do
      # (ours-auto is our grouped GEMM; MOE_DISPATCH_EXPERTS_GEMM=grouped is the same path since the
      # thirty-third session, so it runs only as the label of the A/B variants below)
      say "activation memory, round $round: ours (auto: the default, our grouped GEMM on a Hopper), ours (cuBLAS), PyTorch"
      timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" ${LS+"${LS[@]}"} --out "$OUT/actmem-ours-auto-$round.json"; echo "  exit code $?"
      clocks_stamp actmem "ours-auto, round $round"
      MOE_DISPATCH_EXPERTS_GEMM=cublas timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" ${LS+"${LS[@]}"} --out "$OUT/actmem-ours-cublas-$round.json"; echo "  exit code $?"
      clocks_stamp actmem "ours-cublas, round $round"
      # AB_REV (pack): the grouped path on that revision's TypeScript too (rows named grouped-rev-REV)
      if [[ -d "$BUNDLE/dist-ab" ]]; then
        MOE_DISPATCH_EXPERTS_GEMM=grouped timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist-ab" ${LS+"${LS[@]}"} \
          --label "rev-$(cat "$BUNDLE/dist-ab/REV")" --out "$OUT/actmem-ours-grouped-rev-$round.json"; echo "  exit code $?"
        clocks_stamp actmem "ours-grouped on dist-ab, round $round"
      fi
      # ACTMEM_AB="NAME=value ...": the grouped path again with those settings (its rows are named by them:
      # MOE_DISPATCH_GG_EPILOGUE=ring-half gives grouped-gg-epilogue-ring-half; MOE_DISPATCH_EXPERTS_GEMM=cublas among
      # them: the cuBLAS path with the others); several variants separated by ';', each run in turn
      if [[ -n "${ACTMEM_AB:-}" ]]; then
        IFS=';' read -ra variants <<<"$ACTMEM_AB"
        for v in "${!variants[@]}"; do
          # shellcheck disable=SC2086 # (one or more NAME=value words)
          env MOE_DISPATCH_EXPERTS_GEMM=grouped ${variants[$v]} timeout 200 "$node" "$BUNDLE/bench/actmem-gpu.mjs" --dist "$BUNDLE/dist" ${LS+"${LS[@]}"} \
            --out "$OUT/actmem-ours-grouped-ab$v-$round.json"; echo "  exit code $?"
          clocks_stamp actmem "ours-grouped ${variants[$v]}, round $round"
        done
      fi
      PYTHONUNBUFFERED=1 timeout 200 python3 "$BUNDLE/bench/actmem-gpu.py" ${LS+"${LS[@]}"} --out "$OUT/actmem-torch-$round.json"; echo "  exit code $?"
      clocks_stamp actmem "torch, round $round"
    done
    clocks_end actmem
    python3 "$BUNDLE/bench/actmem-gpu.py" --combine "$OUT" --out "$OUT/actmem.json"; echo "  exit code $?"
  fi
  if [[ -z "${SKIP_TRAIN:-}" ]]; then
    # the training step (issue 18), Rust-driven, JS-driven and PyTorch's, two rounds: Rust, JS,
    # PyTorch (round 1 only), then again. TRAIN_AB="NAME=value": each driver again with that
    # setting right after the default's same run (e.g. MOE_DISPATCH_EXPERTS_GEMM=cublas: the
    # experts on cuBLAS), so that the pairs see the same GPU. TRAIN_CLOCKS=1: the clock, power and
    # throttle reasons every 50 ms and a stamp after each process (bench/clock-phases.py: each
    # process's clock and power-cap share, train.json's "train-clocks")
    [[ -n "${TRAIN_CLOCKS:-}" ]] && clocks_begin train
    # $1: the run's name (train-$1.json); the rest: NAME=value settings for it (TRAIN_AB split into
    # words, as ACTMEM_AB's variants: "A=1 B=2" sets both)
    train_rust() {
      local name=$1; shift
      env "$@" timeout 200 "$BUNDLE/bin/moe-cuda-bench" train --iters 10 ${LS+"${LS[@]}"} --out "$OUT/train-$name.json"; echo "  exit code $?"
      clocks_stamp train "$name"
    }
    train_js() {
      local name=$1; shift
      env "$@" timeout 200 "$node" "$BUNDLE/bench/train-gpu.mjs" --dist "$BUNDLE/dist" ${LS+"${LS[@]}"} --out "$OUT/train-$name.json"; echo "  exit code $?"
      clocks_stamp train "$name"
    }
    # shellcheck disable=SC2086 # (TRAIN_AB: one or more NAME=value words)
    for round in 1 2; do
      say "moe-cuda-bench train, round $round (routeBackward check, then whole training steps)${TRAIN_AB:+; then with $TRAIN_AB}"
      train_rust "rust-$round"
      [[ -n "${TRAIN_AB:-}" ]] && train_rust "rust-ab-$round" $TRAIN_AB
      say "the training step driven from JavaScript (MoELayer on the GPU + AdamW), round $round${TRAIN_AB:+; then with $TRAIN_AB}"
      train_js "js-$round"
      [[ -n "${TRAIN_AB:-}" ]] && train_js "js-ab-$round" $TRAIN_AB
      if [[ $round == 1 ]]; then
        say "PyTorch training step (torch._grouped_mm, AdamW fused)"
        PYTHONUNBUFFERED=1 timeout 200 python3 "$BUNDLE/bench/gpu_torch_train.py" ${LS+"${LS[@]}"} --out "$OUT/train-torch.json"; echo "  exit code $?"
        clocks_stamp train "torch"
      fi
    done
    clocks_end train
    # one file for the device tool (it returns a few files a run): { "train-rust-1": ..., ... }
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "train-*.json"))):
    runs[os.path.basename(f)[:-5]] = json.load(open(f))
    os.remove(f)
json.dump(runs, open(os.path.join(out, "train.json"), "w"))
PY
  fi
  if [[ -z "${SKIP_TORCH:-}" ]]; then
    say "PyTorch reference path"
    PYTHONUNBUFFERED=1 timeout 240 python3 "$BUNDLE/bench/gpu_torch_ref.py" --out "$OUT/torch.json"; echo "  exit code $?"
    say "PyTorch experts and layer"
    PYTHONUNBUFFERED=1 timeout 240 python3 "$BUNDLE/bench/gpu_torch_experts.py" --out "$OUT/torch-experts.json"; echo "  exit code $?"
  fi
  say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  remote) remote ;;
  *) echo "usage: bash scripts/gpu-run.sh pack [--no-build] | remote" >&2; exit 2 ;;
esac
