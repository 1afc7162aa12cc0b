#!/usr/bin/env python3
"""Where the host's time goes, from a V8 CPU profile (`node --cpu-prof`, or bench/actmem-gpu.mjs
`--cpu-profile`).

gpu-run.sh `HOSTPROF=1` profiles the timed steps of one process of `bench/actmem-gpu.mjs` (the
layer's forward + backward on the GPU, sampled every 50 us) and keeps this summary instead of the raw profile: each
function's self time (the samples that stopped in it: for a native binding, the Rust side of the
call and the driver below it) and inclusive time (the samples with it anywhere on the stack),
summed over the profile, the largest first. `--within NAME`: only the samples with a function of
that name on the stack (e.g. `forward`, `backward`: the layer's steps, without the setup).

    python3 bench/cpuprof-summary.py PROFILE.cpuprofile [--top N] [--within NAME] [--json OUT]
"""
import argparse
import json
import sys
from collections import defaultdict


def label(frame):
    """A function's name and place: `name (file:line)`, the file's last two path parts."""
    name = frame.get("functionName") or "(anonymous)"
    url = frame.get("url") or ""
    if not url and name.lower().startswith("cuda"):
        # napi-rs enters every exported function through one native callback, which V8 names
        # after one of them: these samples are the addon's calls, whichever
        return "(the addon's native calls: Rust, the driver)"
    if not url:
        return name
    tail = "/".join(url.split("/")[-2:])
    return f"{name} ({tail}:{frame.get('lineNumber', -1) + 1})"


def summarize(profile, within=None):
    nodes = {n["id"]: n for n in profile["nodes"]}
    parent = {}
    for n in profile["nodes"]:
        for c in n.get("children", []):
            parent[c] = n["id"]

    def stack(node_id):
        out = []
        while node_id is not None:
            out.append(node_id)
            node_id = parent.get(node_id)
        return out

    samples = profile.get("samples", [])
    deltas = profile.get("timeDeltas", [0] * len(samples))
    self_us = defaultdict(float)
    incl_us = defaultdict(float)
    total = 0.0
    # a sample's time is the delta to the next sample (V8 records the delta before each sample)
    for i, node_id in enumerate(samples):
        dt = deltas[i + 1] if i + 1 < len(deltas) else 0
        ids = stack(node_id)
        labels = [label(nodes[j]["callFrame"]) for j in ids]
        if within and not any(nodes[j]["callFrame"].get("functionName") == within for j in ids):
            continue
        total += dt
        self_us[labels[0]] += dt
        for lab in set(labels):
            incl_us[lab] += dt
    return total, self_us, incl_us


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--within", help="only the samples with a function of this name on the stack")
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    with open(a.profile) as f:
        profile = json.load(f)
    total, self_us, incl_us = summarize(profile, a.within)
    if total <= 0:
        print(f"no samples{' within ' + a.within if a.within else ''}", file=sys.stderr)
        return 1
    top_self = sorted(self_us.items(), key=lambda kv: -kv[1])[: a.top]
    top_incl = sorted(incl_us.items(), key=lambda kv: -kv[1])[: a.top]
    scope = f" within {a.within}" if a.within else ""
    print(f"{total / 1e3:.1f} ms of samples{scope}; self time:")
    for lab, us in top_self:
        print(f"  {us / 1e3:9.2f} ms {100 * us / total:5.1f}%  {lab}")
    print("inclusive time:")
    for lab, us in top_incl:
        print(f"  {us / 1e3:9.2f} ms {100 * us / total:5.1f}%  {lab}")
    if a.json:
        row = lambda kv: {"function": kv[0], "ms": round(kv[1] / 1e3, 3), "pct": round(100 * kv[1] / total, 2)}  # noqa: E731
        with open(a.json, "w") as f:
            json.dump({"within": a.within, "sampledMs": round(total / 1e3, 3), "self": [row(kv) for kv in top_self], "inclusive": [row(kv) for kv in top_incl]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
