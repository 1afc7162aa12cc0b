"""The MoE layer's forward + backward and its activation memory on the GPU (issue 19), PyTorch's:
the layer of bench/gpu_torch_train.py without the optimizer (a softmax top-k router with logits in
float32 from the bf16 operands, softmax over the k picked logits, Megatron's Switch aux loss 0.01
on the softmax scores; the reference permute (masked_select + index_select); swiglu experts on
torch._grouped_mm weighted by the routing probs; unpermute by scatter_add), forward, then
torch.autograd.backward of (out, aux) with out's gradient g given: the peer of
bench/actmem-gpu.mjs (ours). Two variants a shape:

* "bf16": bf16 leaf parameters (router [dim, E], gate|up [E, dim, 2 inter], down [E, inter, dim]),
  as our layer holds them: the headline;
* "f32-masters": float32 parameters cast to bf16 inside the forward (gpu_torch_train.py's step):
  the GEMMs then keep the bf16 weight copies for the backward, which the activation delta counts.

    python3 bench/actmem-gpu.py [--out FILE] [--iters N] [--warmup N] [--shapes NAMES] (shapes.json's layer shapes; its byDefault ones: fine-grained,mixtral)
    python3 bench/actmem-gpu.py --combine DIR --out FILE    (gpu-run.sh ACTMEM=1: DIR's actmem-*.json into one file)

Per shape and variant:
- layerMs: median over `iters` of forward + backward, wall clock from torch.cuda.synchronize() to
  the one after the backward (as ours); eventMs: CUDA events around the same (GPU time).
- activationBytes: torch.cuda.memory_allocated() just after the forward minus just before it:
  the forward's outputs (out, aux: outputBytes) and everything autograd keeps for the backward
  (the caching allocator's bytes: each tensor rounded up to 512 B). x and the parameters exist
  before and are not counted. savedTensors: the tensors autograd saved in another forward
  (saved_tensors_hooks), one entry a storage, the pre-existing x and parameters left out.
- peakBytes: torch.cuda.max_memory_allocated() over forward + backward from
  reset_peak_memory_stats() just before it (the whole process: weights and inputs included);
  peakAboveStartBytes = peak minus memory_allocated() at the reset. gradBytes: x's and the
  parameters' gradients.
"""
import argparse
import gc
import glob
import json
import os
import statistics
import time

from shapes import DEFAULT_LAYER, LAYER as SHAPES, layer_names


def layer(T, dim, inter, E, k, dev, masters):
    """The layer's parameters, input, output gradient and its forward (returns out, aux)."""
    import torch

    # the forward itself is gpu_torch_train.py's (the training step's peer), beside this file
    from gpu_torch_train import moe_forward

    g = torch.Generator(device=dev).manual_seed(5)
    dt = torch.float32 if masters else torch.bfloat16

    def param(*shape, scale):
        return ((torch.rand(*shape, device=dev, generator=g) * 2 - 1) * scale).to(dt).requires_grad_()

    wr = param(dim, E, scale=dim ** -0.5)
    w1 = param(E, dim, 2 * inter, scale=dim ** -0.5)
    w2 = param(E, inter, dim, scale=inter ** -0.5)
    x = (torch.rand(T, dim, device=dev, generator=g) * 2 - 1).to(torch.bfloat16).requires_grad_()
    gout = ((torch.rand(T, dim, device=dev, generator=g) * 2 - 1) / (T * dim) ** 0.5).to(torch.bfloat16)
    low = (lambda w: w.to(torch.bfloat16)) if masters else (lambda w: w)

    def forward():
        return moe_forward(x, low(wr), low(w1), low(w2), k)

    return forward, [wr, w1, w2], x, gout


def measure(name, variant, iters, warmup, dev):
    import torch

    T, dim, inter, E, k = SHAPES[name]
    forward, params, x, gout = layer(T, dim, inter, E, k, dev, variant == "f32-masters")
    leaves = params + [x]

    def backward(out, aux):
        torch.autograd.backward([out, aux], [gout, None])

    def clear():
        for p in leaves:
            p.grad = None

    for _ in range(warmup):
        backward(*forward())
        clear()
    torch.cuda.synchronize()
    walls, events = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        out, aux = forward()
        backward(out, aux)
        b.record()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        events.append(a.elapsed_time(b))
        del out, aux
        clear()
    mem = []
    aux_value = float("nan")
    for _ in range(3):
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, aux = forward()
        after = torch.cuda.memory_allocated()
        output_bytes = out.nbytes + aux.nbytes
        backward(out, aux)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        grad_bytes = sum(p.grad.nbytes for p in leaves)
        after_backward = torch.cuda.memory_allocated()
        aux_value = aux.item()
        del out, aux
        clear()
        torch.cuda.synchronize()
        mem.append({"before": before, "after": after, "outputBytes": output_bytes, "peak": peak, "gradBytes": grad_bytes,
                    "afterBackward": after_backward, "afterDispose": torch.cuda.memory_allocated()})
    # what autograd saves, one entry a storage (another forward, with hooks that only look)
    existing = {t.untyped_storage().data_ptr() for t in leaves}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in existing:
            e = saved.setdefault(st.data_ptr(), {"bytes": st.nbytes(), "views": []})
            e["views"].append(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, aux = forward()
    backward(out, aux)
    del out, aux
    clear()
    gc.collect()
    torch.cuda.synchronize()
    saved_list = sorted(({"bytes": e["bytes"], "as": sorted(set(e["views"]))} for e in saved.values()), key=lambda e: -e["bytes"])
    m = mem[-1]
    walls.sort()
    events.sort()
    N = T * k
    row = {
        "shape": name, "variant": variant, "dims": f"T={T} dim={dim} inter={inter} E={E} k={k}",
        "layerMs": walls[len(walls) // 2], "layerMsMin": walls[0], "layerMsMax": walls[-1], "eventMs": events[len(events) // 2], "iters": iters,
        "activationBytes": m["after"] - m["before"], "outputBytes": m["outputBytes"], "savedBytes": m["after"] - m["before"] - m["outputBytes"],
        "savedTensorsBytes": sum(e["bytes"] for e in saved_list), "savedTensors": saved_list,
        "permutedCopyBytes": N * dim * 2, "baselineBytes": m["before"], "peakBytes": m["peak"], "peakAboveStartBytes": m["peak"] - m["before"],
        "gradBytes": m["gradBytes"],
        "memoryRepeatsAgree": all(r["after"] - r["before"] == m["after"] - m["before"] and r["peak"] - r["before"] == m["peak"] - m["before"] for r in mem),
        "leakBytes": m["afterDispose"] - m["before"], "memoryRepeats": mem, "auxLoss": aux_value,
    }
    gib = 2 ** 30
    print(f"{name:>13} torch ({variant}): forward + backward {row['layerMs']:.3f} ms (events {row['eventMs']:.3f}, min {walls[0]:.3f}); "
          f"activations {row['activationBytes'] / gib:.3f} GiB (outputs {row['outputBytes'] / gib:.3f}, saved tensors {row['savedTensorsBytes'] / gib:.3f} GiB "
          f"in {len(saved_list)} storages); peak {row['peakBytes'] / gib:.3f} GiB ({row['peakAboveStartBytes'] / gib:.3f} above the start); "
          f"repeats agree {row['memoryRepeatsAgree']}, leak {row['leakBytes']} B; aux {aux_value:.6f}", flush=True)
    del forward, params, x, gout, leaves
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run(args):
    import torch

    dev = torch.device("cuda")
    rows = []
    for name in layer_names(args.shapes):
        for variant in ("bf16", "f32-masters"):
            try:
                rows.append(measure(name, variant, args.iters, args.warmup, dev))
            except Exception as e:  # noqa: BLE001 (a failed variant is reported, the others still run)
                print(f"{name:>13} torch ({variant}): failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append({"shape": name, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                gc.collect()
                torch.cuda.empty_cache()
    out = {"who": "torch", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out).replace("NaN", "null"))


def combine(folder, out_path):
    """gpu-run.sh's parts (actmem-ours-auto-R.json, actmem-ours-cublas-R.json, ACTMEM_AB's
    actmem-ours-grouped-abV-R.json, actmem-torch-R.json; actmem-clocks.json kept as it is) into one file: every part under `runs`, and `summary` by shape: the medians over the rounds of
    each round's median time, and the memory figures (the same every round, else a list)."""
    runs = {}
    for f in sorted(glob.glob(os.path.join(folder, "actmem-*.json"))):
        try:
            runs[os.path.basename(f)[:-5]] = json.load(open(f))
        except ValueError as e:
            runs[os.path.basename(f)[:-5]] = {"error": str(e)}
        os.remove(f)
    summary = {}
    for key, part in runs.items():
        for r in part.get("rows", []):
            if "error" in r:
                continue
            who = f"ours-{r['gemm']}" if part.get("who") == "ours" else f"torch-{r['variant']}"
            s = summary.setdefault(r["shape"], {"dims": r["dims"]}).setdefault(who, {"layerMsRounds": []})
            s["layerMsRounds"].append(r["layerMs"])
            for f in ("activationBytes", "outputBytes", "savedBytes", "savedTensorsBytes", "peakBytes", "peakAboveStartBytes", "gradBytes",
                      "permutedCopyBytes", "synchronizationsPerFwdBwd", "savedUnaccountedBytes", "memoryRepeatsAgree", "leakBytes", "hostMs", "timeline"):
                if r.get(f) is not None:
                    s.setdefault(f, [])
                    if r[f] not in s[f]:
                        s[f].append(r[f])
    for shape in summary.values():
        for who, s in shape.items():
            if not isinstance(s, dict):
                continue
            s["layerMs"] = statistics.median(s["layerMsRounds"])
            for f, v in list(s.items()):
                if f != "layerMsRounds" and isinstance(v, list) and len(v) == 1:
                    s[f] = v[0]
        for who in ("ours-auto", "ours-cublas", "ours-grouped"):
            if who in shape and "torch-bf16" in shape:
                shape[f"{who}SpeedupVsTorch"] = shape["torch-bf16"]["layerMs"] / shape[who]["layerMs"]
    with open(out_path, "w") as f:
        f.write(json.dumps({"summary": summary, "runs": runs}).replace("NaN", "null"))
    for name, shape in summary.items():
        for who, s in shape.items():
            if isinstance(s, dict):
                print(f"{name:>13} {who:<18} layer fwd+bwd {s['layerMs']:8.3f} ms (rounds {', '.join(f'{v:.3f}' for v in s['layerMsRounds'])}); "
                      f"activations {s.get('activationBytes')} B; peak above the start {s.get('peakAboveStartBytes')} B")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shapes", default=DEFAULT_LAYER)
    ap.add_argument("--combine", metavar="DIR")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine, args.out or os.path.join(args.combine, "actmem.json"))
    else:
        run(args)


if __name__ == "__main__":
    main()
