"""The PyTorch version of the grouped experts and of the dispatch + experts layer, timed on the GPU
machine at the shapes of `moe-cuda-bench experts` (bf16, swiglu, routing probs), forward + backward
through autograd:

* experts, grouped: torch._grouped_mm over the expert blocks (NeMo Automodel's GroupedExperts
  path), swiglu weighted by the probs;
* experts, loop: one torch.matmul per expert (the reference's fallback);
* layer: the reference's unfused permute (masked_select + index_select), the grouped experts,
  the reference's unpermute (multiply + scatter_add), forward + backward.

    python3 bench/gpu_torch_experts.py [--out FILE] [--iters N] [--shapes NAMES] (shapes.json's layer shapes)
"""
import argparse
import json

import torch
import torch.nn.functional as F

from gpu_torch_ref import time_ms as _time_ms

from shapes import DEFAULT_LAYER, LAYER, layer_names


def time_ms(f, iters):
    """gpu_torch_ref's timing (CUDA events, median), NaN where the call fails (e.g. no backward
    for torch._grouped_mm in this build)."""
    try:
        return _time_ms(f, iters)[0]
    except Exception as e:
        print(f"  failed: {type(e).__name__}: {str(e)[:200]}")
        return float("nan")


def swiglu(h, p):
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float() * p[:, None]).to(h.dtype)


def experts_grouped(x, offs, w1, w2, p):
    h = torch._grouped_mm(x, w1, offs=offs)
    return torch._grouped_mm(swiglu(h, p), w2, offs=offs)


def experts_loop(x, counts, w1, w2, p):
    outs, r0 = [], 0
    for e, c in enumerate(counts):
        if c:
            a = swiglu(x[r0:r0 + c] @ w1[e], p[r0:r0 + c])
            outs.append(a @ w2[e])
        r0 += c
    return torch.cat(outs)


def permute(tokens, routing_map, probs):
    num_tokens = tokens.shape[0]
    rm = routing_map.bool().T.contiguous()
    token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(routing_map.shape[1], -1)
    sorted_indices = token_indices.masked_select(rm)
    permuted_probs = probs.T.contiguous().masked_select(rm)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def unpermute(permuted, sorted_indices, shape):
    out = torch.zeros(shape, dtype=permuted.dtype, device=permuted.device)
    out.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, shape[1]), permuted)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--shapes", default=DEFAULT_LAYER)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    have_grouped = hasattr(torch, "_grouped_mm")
    for name in layer_names(args.shapes):
        T, dim, inter, E, k = LAYER[name]
        g = torch.Generator(device=dev).manual_seed(3)
        idx = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices
        routing_map = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, idx, True)
        w = (torch.rand(T, E, device=dev, generator=g) + 0.5) * routing_map
        probs = w / w.sum(1, keepdim=True)
        hidden = (torch.rand(T, dim, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
        w1 = ((torch.rand(E, dim, 2 * inter, device=dev, generator=g) * 2 - 1) / dim ** 0.5).to(torch.bfloat16).requires_grad_()
        w2 = ((torch.rand(E, inter, dim, device=dev, generator=g) * 2 - 1) / inter ** 0.5).to(torch.bfloat16).requires_grad_()
        counts = routing_map.sum(0).tolist()
        offs = torch.cumsum(routing_map.sum(0), 0).to(torch.int32)
        x, p, sorted_indices = permute(hidden, routing_map, probs)
        x = x.detach().requires_grad_()
        p = p.detach().requires_grad_()
        N = x.shape[0]
        gout = torch.rand(N, dim, device=dev, generator=g).to(torch.bfloat16)
        ghid = torch.rand(T, dim, device=dev, generator=g).to(torch.bfloat16)
        flops = 2 * N * dim * 2 * inter * 3 + 2 * N * inter * dim * 3  # fwd + bwd

        def fb(f):
            def run():
                y = f()
                y.backward(gout)
            return run

        res = {}
        if have_grouped:
            res["experts fwd (torch._grouped_mm)"] = time_ms(lambda: experts_grouped(x, offs, w1, w2, p), args.iters)
            res["experts fwd+bwd (torch._grouped_mm)"] = time_ms(fb(lambda: experts_grouped(x, offs, w1, w2, p)), args.iters)
        res["experts fwd (per-expert loop)"] = time_ms(lambda: experts_loop(x, counts, w1, w2, p), args.iters)
        res["experts fwd+bwd (per-expert loop)"] = time_ms(fb(lambda: experts_loop(x, counts, w1, w2, p)), args.iters)
        hid = hidden.detach().requires_grad_()

        def layer():
            px, pp, si = permute(hid, routing_map, probs)
            y = experts_grouped(px, offs, w1, w2, pp) if have_grouped else experts_loop(px, counts, w1, w2, pp)
            out = unpermute(y, si, (T, dim))
            out.backward(ghid)

        res["layer fwd+bwd (reference permute, experts, unpermute)"] = time_ms(layer, args.iters)
        for op, ms in res.items():
            rows.append({"shape": name, "dims": f"T={T} dim={dim} inter={inter} E={E} k={k} bf16", "op": op, "msMedian": ms,
                         "tflops": (flops if "bwd" in op and "experts" in op else float("nan")) / (ms * 1e-3) / 1e12})
            print(f"{name:<13} {op:<58} {ms:9.3f} ms")
        del w1, w2, x, p, gout, hidden, hid
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "groupedMm": have_grouped, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out).replace("NaN", "null"))


if __name__ == "__main__":
    main()
