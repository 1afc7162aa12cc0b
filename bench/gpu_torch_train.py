"""The PyTorch training step of an MoE layer, the peer of `moe-dispatch train-bench` (issue 18),
timed on the GPU machine at the fine-grained and Mixtral-like shapes:

float32 master weights (router [dim, E], experts' gate|up [E, dim, 2 inter] and down
[E, inter, dim]), cast to bf16 for the step; a softmax top-k router (logits in float32 from the
bf16 operands, softmax over the k picked logits as Mixtral), Megatron's Switch aux loss on the
softmax scores; the reference permute (masked_select + index_select); swiglu experts with
torch._grouped_mm weighted by the routing probs; unpermute (scatter_add); loss = sum(out * g) +
aux; backward; torch.nn.utils.clip_grad_norm_(1.0); torch.optim.AdamW(fused=True); zero_grad.

    python3 bench/gpu_torch_train.py [--out FILE] [--iters N] [--shapes NAMES] (shapes.json's layer shapes; its byDefault ones: fine-grained,mixtral)

Prints and writes the median step time (CUDA events), tokens/s and the peak memory of a step
(torch.cuda.max_memory_allocated, from a reset just before the timed steps).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from shapes import DEFAULT_LAYER, LAYER as SHAPES, layer_names
AUX_COEFF = 1e-2


def moe_forward(x, wr, w1, w2, k):
    """The layer's forward on bf16 `x [T, dim]` and the weights as the GEMMs take them (router
    [dim, E], gate|up [E, dim, 2 inter], down [E, inter, dim]): softmax top-k router (logits in
    float32, softmax over the k picked logits), the Switch aux loss on the softmax scores, the
    reference permute, swiglu experts on torch._grouped_mm weighted by the probs, scatter_add
    unpermute. Returns (out [T, dim], aux). bench/actmem-gpu.py measures the same forward."""
    T, dim = x.shape
    E = wr.shape[1]
    dev = x.device
    logits = (x @ wr).float()
    scores = logits.softmax(-1)
    top = logits.topk(k, dim=-1)
    weights = top.values.softmax(-1)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, top.indices, True)
    probs = torch.zeros(T, E, device=dev).scatter(1, top.indices, weights)
    counts = routing_map.sum(0)
    aux = E * AUX_COEFF / (k * T * T) * (scores.sum(0) * counts.float()).sum()
    rm = routing_map.T.contiguous()
    tok = torch.arange(T, device=dev).unsqueeze(0).expand(E, -1)
    si = tok.masked_select(rm)
    pp = probs.T.contiguous().masked_select(rm)
    px = x.index_select(0, si)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(px, w1, offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = (F.silu(gate.float()) * up.float() * pp[:, None]).to(torch.bfloat16)
    y = torch._grouped_mm(a, w2, offs=offs)
    out = torch.zeros(T, dim, dtype=y.dtype, device=dev).scatter_add_(0, si.unsqueeze(1).expand(-1, dim), y)
    return out, aux


def step_fn(T, dim, inter, E, k, dev):
    g = torch.Generator(device=dev).manual_seed(5)
    wr = torch.nn.Parameter((torch.rand(dim, E, device=dev, generator=g) * 2 - 1) / dim ** 0.5)
    w1 = torch.nn.Parameter((torch.rand(E, dim, 2 * inter, device=dev, generator=g) * 2 - 1) / dim ** 0.5)
    w2 = torch.nn.Parameter((torch.rand(E, inter, dim, device=dev, generator=g) * 2 - 1) / inter ** 0.5)
    params = [wr, w1, w2]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    x = (torch.rand(T, dim, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
    gout = ((torch.rand(T, dim, device=dev, generator=g) * 2 - 1) / (T * dim) ** 0.5).float()

    def step():
        out, aux = moe_forward(x, wr.to(torch.bfloat16), w1.to(torch.bfloat16), w2.to(torch.bfloat16), k)
        loss = (out.float() * gout).sum() + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--shapes", default=DEFAULT_LAYER)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name in layer_names(args.shapes):
        T, dim, inter, E, k = SHAPES[name]
        step, params, opt = step_fn(T, dim, inter, E, k, dev)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        ms = times[len(times) // 2]
        peak = torch.cuda.max_memory_allocated()
        row = {"shape": name, "dims": f"T={T} dim={dim} inter={inter} E={E} k={k}", "torchStepMs": ms, "torchStepMsMin": times[0],
               "tokensPerSecond": T / (ms * 1e-3), "torchPeakBytes": peak}
        rows.append(row)
        print(f"{name:<13} step {ms:8.2f} ms (min {times[0]:.2f})  {row['tokensPerSecond']:12.0f} tokens/s  peak {peak / 2**30:.2f} GiB")
        del step, params, opt
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
