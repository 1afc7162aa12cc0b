#!/usr/bin/env python3
"""The machine code of kernels, without a GPU: each named kernel's instruction count and its most
frequent opcodes, from a CUBIN that `scripts/check-kernels.sh` kept, disassembled by nvdisasm
(CUDA 13's, from PyPI: nvidia-cuda-nvdisasm, about 10 MB, kept in .cache/nvrtc beside NVRTC).
For a kernel change measured on the GPU, what its code became: e.g. the grouped GEMM epilogue's
bf16 rounding went from about eight integer instructions a value to one F2FP a pair.

  MOE_DISPATCH_CUBIN_OUT=/tmp/k bash scripts/check-kernels.sh sm_90a
  python3 scripts/sass-mix.py /tmp/k/grouped_gemm.cu.sm_90a.cubin [KERNEL ...] [--top N] [--between OP]

KERNEL: exact names (default: every kernel in the file). --between OP: also the opcodes from the
first to the last instruction with opcode OP (e.g. F2FP: an epilogue's conversion stretch)."""
import argparse
import collections
import glob
import os
import re
import stat
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "nvrtc")


def nvdisasm():
    """nvdisasm from the PyPI wheel, fetched once into .cache/nvrtc."""
    tool = os.path.join(CACHE, "nvidia", "cu13", "bin", "nvdisasm")
    if not os.path.exists(tool):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", CACHE, "nvidia-cuda-nvdisasm>=13,<14"],
            check=True,
        )
        wheels = sorted(glob.glob(os.path.join(CACHE, "nvidia_cuda_nvdisasm-*.whl")))
        if not wheels:
            sys.exit("sass-mix: no nvidia-cuda-nvdisasm wheel was downloaded")
        zipfile.ZipFile(wheels[-1]).extractall(CACHE)
    os.chmod(tool, os.stat(tool).st_mode | stat.S_IXUSR)
    return tool


def kernels(cubin):
    """kernel name -> its instructions' opcodes (predicates and modifiers stripped), in order."""
    text = subprocess.run([nvdisasm(), "-c", cubin], check=True, capture_output=True, text=True).stdout
    parts = re.split(r"\n\s*\.text\.(\S+):", text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        ops = []
        for line in body.split("\n"):
            m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)
            if m:
                ops.append(m.group(1))
        out[name] = ops
    return out


def mix(ops, top):
    return ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(top))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cubin")
    p.add_argument("kernel", nargs="*")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--between")
    a = p.parse_args()
    found = kernels(a.cubin)
    names = a.kernel or sorted(found)
    missing = [k for k in names if k not in found]
    if missing:
        sys.exit(f"sass-mix: not in {a.cubin}: {', '.join(missing)}")
    for name in names:
        ops = found[name]
        print(f"{name}: {len(ops)} instructions; {mix(ops, a.top)}")
        if a.between:
            at = [i for i, op in enumerate(ops) if op == a.between]
            if at:
                seg = ops[at[0] : at[-1] + 1]
                print(f"  {a.between} .. {a.between}: {len(seg)} instructions; {mix(seg, a.top)}")


if __name__ == "__main__":
    main()
