#!/usr/bin/env python3
"""Issue 19's results file from one device run's `ggemm.json` and `actmem.json`.

    python3 bench/grouped-gemm-results.py DIR --date 2026-12-06 --machine "..." --commit "..." \
        --command "..." > bench/results/2026-12-06-grouped-gemm.json

DIR holds what `bash scripts/gpu-run.sh remote` wrote with GGEMM=1 and ACTMEM=1. Each shape gets
the issue's fields: the GEMMs' percentage of the run's measured bf16 rate, FLOP-weighted (forward =
x W1 + a W2; backward = the input gradients + the weight gradients), ours and cuBLAS's; the layer's
forward + backward on each of our paths and PyTorch's; the activation bytes. `layerMs` is our
default path's (`ours-auto`; in runs before it, the fastest path's), named by `layerPath`.
Where the ggemm run timed several kernels (`--tile tma-store,bulk`), `--kernel TEXT` picks the
rows whose kernel name contains TEXT (e.g. "TMA-store": the experts' default since the
twenty-seventh session); without it such a file is an error naming the kernels it holds.
"""

import argparse
import json
import os
import sys

FORWARD = ("x @ W1", "a @ W2")
BACKWARD = ("dy @ W2^T", "dh @ W1^T", "x^T @ dh", "a^T @ dy")


def pct_of_rate(rows, names, key, rate_tflops):
    """FLOP-weighted percentage of the bf16 rate over the named GEMMs, from `key`'s times."""
    picked = [r for r in rows if r["gemm"] in names]
    missing = set(names) - {r["gemm"] for r in picked}
    if missing:
        sys.exit(f"ggemm.json lacks {sorted(missing)} for shape {rows[0]['shape']}")
    flops = sum(r["oursTflops"] * r["oursMs"] * 1e9 for r in picked)  # the same FLOPs for both
    seconds = sum(r[key] for r in picked) / 1e3
    return round(100 * flops / seconds / (rate_tflops * 1e12), 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="the folder with ggemm.json and actmem.json")
    p.add_argument("--date", required=True)
    p.add_argument("--machine", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--kernel", help="the rows of the kernel whose name contains this (where several were timed)")
    a = p.parse_args()
    with open(os.path.join(a.dir, "ggemm.json")) as f:
        ggemm = json.load(f)
    with open(os.path.join(a.dir, "actmem.json")) as f:
        actmem = json.load(f)["summary"]
    rate = ggemm["bf16PeakTflops"]
    if a.kernel:
        ggemm["rows"] = [r for r in ggemm["rows"] if a.kernel in r.get("kernel", "")]
        if not ggemm["rows"]:
            sys.exit(f"ggemm.json has no rows of a kernel named like {a.kernel!r}")
    per_gemm = {}
    for r in ggemm["rows"]:
        per_gemm.setdefault((r["shape"], r["gemm"]), set()).add(r.get("kernel"))
    several = sorted({k for ks in per_gemm.values() if len(ks) > 1 for k in ks})
    if several:
        sys.exit(f"ggemm.json times several kernels a GEMM ({', '.join(several)}): pick one with --kernel")
    shapes = []
    for shape, layer in actmem.items():
        rows = [r for r in ggemm["rows"] if r["shape"] == shape]
        if not rows:
            continue
        ours = {k: v for k, v in layer.items() if k.startswith("ours-") and isinstance(v, dict)}
        torch = layer.get("torch-bf16")
        if not ours or torch is None:
            sys.exit(f"actmem.json's {shape} lacks our layer or torch-bf16")
        # the default path (auto) where the run has it, else the fastest of ours
        best = "ours-auto" if "ours-auto" in ours else min(ours, key=lambda k: ours[k]["layerMs"])
        shapes.append(
            {
                "shape": shape,
                "dims": layer["dims"],
                "gemmForwardPctOfBf16": pct_of_rate(rows, FORWARD, "oursMs", rate),
                "gemmBackwardPctOfBf16": pct_of_rate(rows, BACKWARD, "oursMs", rate),
                "cublasGemmForwardPctOfBf16": pct_of_rate(rows, FORWARD, "cublasMs", rate),
                "cublasGemmBackwardPctOfBf16": pct_of_rate(rows, BACKWARD, "cublasMs", rate),
                "layerMs": round(ours[best]["layerMs"], 3),
                "layerPath": best,
                "torchLayerMs": round(torch["layerMs"], 3),
                "layerVsTorch": round(torch["layerMs"] / ours[best]["layerMs"], 3),
                "activationBytes": ours[best]["activationBytes"],
                "torchActivationBytes": torch["activationBytes"],
                "paths": {
                    k: {
                        "layerMs": round(v["layerMs"], 3),
                        "layerMsRounds": [round(x, 3) for x in v["layerMsRounds"]],
                        "vsTorch": round(torch["layerMs"] / v["layerMs"], 3),
                        "activationBytes": v["activationBytes"],
                        "peakAboveStartBytes": v["peakAboveStartBytes"],
                    }
                    for k, v in sorted(layer.items())
                    if isinstance(v, dict) and "layerMs" in v
                },
                "ggemmRows": [
                    {
                        "gemm": r["gemm"],
                        "oursMs": round(r["oursMs"], 3),
                        "cublasMs": round(r["cublasMs"], 3),
                        "oursPctOfBf16": round(r["oursPctOfBf16"], 1),
                        "cublasPctOfBf16": round(r["cublasPctOfBf16"], 1),
                        "runToRunIdentical": r["runToRunIdentical"],
                        **({"groupsMs": {g: round(t, 3) for g, t in r["groupsMs"].items()}} if "groupsMs" in r else {}),
                    }
                    for r in rows
                ],
            }
        )
    out = {
        "date": a.date,
        "issue": 19,
        "machine": a.machine,
        "device": ggemm["device"],
        "commit": a.commit,
        "command": a.command,
        **({"kernel": a.kernel} if a.kernel else {}),
        "bf16PeakTflops": round(rate, 1),
        "shapes": shapes,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
