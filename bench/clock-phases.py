#!/usr/bin/env python3
"""The GPU's SM clock and power draw in each phase of a timestamped benchmark log.

gpu-run.sh `CLOCKS=1` samples `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,
temperature.gpu` every 20 ms while `moe-cuda-bench ggemm` runs, and stamps each line the bench
prints with the same clock (`date '+%Y/%m/%d %H:%M:%S.%N'`). A phase is the time between two
printed lines, named by the second (the bench prints a GEMM's line after timing it: cuBLAS's,
then ours). Each phase's samples include host work (checks, setup) where the GPU idles, so the
busy figures take the samples within 80% of the phase's highest power draw. `ACTMEM_CLOCKS=1`
samples every 50 ms through the layer's processes (`ACTMEM=1`) with a fifth column,
`clocks_throttle_reasons.active`, and stamps a line after each process: each phase is then one
process (one path, one round), and `busyPowerCapped` is the share of its busy samples with the
software power cap among the reasons (bit 0x4; nvidia-smi's power draw is an average over about
a second, the reasons are not).

    python3 bench/clock-phases.py SMI.csv BENCH.log [--json OUT] [--match TEXT]

`--match` keeps only the phases whose line contains TEXT (e.g. "x @ W1").
"""
import json
import statistics
import sys
from datetime import datetime


def stamp(text):
    text = text.strip()
    # nvidia-smi: 2026/12/05 20:40:01.123; date: 2026/12/05 20:40:01.123456789
    day, time = text.split(" ")[:2]
    if "." in time:
        whole, frac = time.split(".")
        time = whole + "." + frac[:6]
    return datetime.strptime(day + " " + time, "%Y/%m/%d %H:%M:%S.%f" if "." in time else "%Y/%m/%d %H:%M:%S")


def number(text):
    try:
        return float(text.strip().split(" ")[0])
    except ValueError:
        return None


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    smi_path, log_path = argv[0], argv[1]
    out = argv[argv.index("--json") + 1] if "--json" in argv else None
    match = argv[argv.index("--match") + 1] if "--match" in argv else None
    samples = []
    for line in open(smi_path):
        parts = line.split(",")
        if len(parts) < 4:
            continue
        try:
            t = stamp(parts[0])
        except ValueError:
            continue
        clock, power, temp = number(parts[1]), number(parts[2]), number(parts[3])
        try:
            reasons = int(parts[4].strip(), 16) if len(parts) > 4 else None
        except ValueError:
            reasons = None
        if clock is not None and power is not None:
            samples.append((t, clock, power, temp, reasons))
    lines = []
    for line in open(log_path):
        head = line[:29]
        try:
            lines.append((stamp(head), line[30:].rstrip("\n")))
        except ValueError:
            continue
    phases = []
    for (t0, _), (t1, text) in zip(lines, lines[1:]):
        inside = [s for s in samples if t0 <= s[0] < t1]
        if not inside or (match and match not in text):
            continue
        top = max(s[2] for s in inside)
        busy = [s for s in inside if s[2] >= 0.8 * top]
        phase = {
            "line": text.strip()[:160],
            "seconds": round((t1 - t0).total_seconds(), 3),
            "samples": len(inside),
            "busySamples": len(busy),
            "busySmClockMhz": statistics.median(s[1] for s in busy),
            "busyPowerW": round(statistics.median(s[2] for s in busy), 1),
            "maxPowerW": top,
            "minBusySmClockMhz": min(s[1] for s in busy),
            "maxTemperatureC": max((s[3] for s in inside if s[3] is not None), default=None),
        }
        reasons = [s[4] for s in busy if s[4] is not None]
        if reasons:
            phase["busyPowerCapped"] = round(sum(1 for r in reasons if r & 0x4) / len(reasons), 3)
            # the samples of the whole phase under the power cap, and their clock (the cap's
            # bit is set at the sample's moment, unlike the averaged power)
            capped = [s for s in inside if s[4] is not None and s[4] & 0x4]
            phase["powerCappedSamples"] = len(capped)
            if capped:
                phase["powerCappedSmClockMhz"] = statistics.median(s[1] for s in capped)
        phases.append(phase)
        print(
            f"{phase['busySmClockMhz']:7.0f} MHz {phase['busyPowerW']:6.1f} W (max {top:.0f} W, {len(busy)}/{len(inside)} samples busy, "
            f"min clock {phase['minBusySmClockMhz']:.0f}"
            + (f", power-capped {100 * phase['busyPowerCapped']:.0f}%" if "busyPowerCapped" in phase else "")
            + (f"; {phase['powerCappedSamples']} samples capped at {phase['powerCappedSmClockMhz']:.0f} MHz" if phase.get("powerCappedSamples") else "")
            + f") over {phase['seconds']:.2f} s before: {phase['line'][:110]}"
        )
    if out:
        json.dump({"samples": len(samples), "phases": phases}, open(out, "w"), indent=1)
    return 0 if phases else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
