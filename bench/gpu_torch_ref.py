"""The reference's unfused PyTorch path (Megatron-Core moe_utils permute / unpermute without the
fused kernels: masked_select + index_select, then multiply + scatter_add) timed on the GPU
machine at the shapes of moe-cuda-bench, next to a device-to-device copy moving the same bytes.

    python3 bench/gpu_torch_ref.py [--out FILE] [--iters N]

Bytes as in moe-cuda-bench: permute reads T*H and writes N*H token elements, unpermute the
reverse; a copy of (those bytes / 2) moves the same number of bytes.
"""
import argparse
import json

import torch

from shapes import DISPATCH


def permute(tokens, routing_map, probs):
    num_tokens, _ = tokens.shape
    num_experts = routing_map.shape[1]
    routing_map = routing_map.bool().T.contiguous()
    token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(num_experts, -1)
    sorted_indices = token_indices.masked_select(routing_map)
    permuted_probs = probs.T.contiguous().masked_select(routing_map)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map):
    _, hidden = restore_shape
    input_dtype = permuted_tokens.dtype
    permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
    permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    output.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output.to(dtype=input_dtype)


def route_ref(logits, bias, k=8, n_groups=8, topk_groups=4, route_scale=2.5):
    """DeepSeek-V3 / NeMo Automodel Gate._route_scores, sigmoid with score-correction bias."""
    T, E = logits.shape
    scores = logits.sigmoid()
    original_scores = scores
    scores = scores + bias
    group_scores = scores.view(T, n_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = group_scores.topk(topk_groups, dim=-1)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_groups, E // n_groups).reshape(T, E)
    scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(scores, k, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, indices


def time_ms(f, iters):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, (T, H, E, k) in DISPATCH.items():
        g = torch.Generator(device=dev).manual_seed(1)
        scores = torch.rand(T, E, device=dev, generator=g)
        idx = scores.topk(k, dim=1).indices
        routing_map = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, idx, True)
        probs = torch.rand(T, E, device=dev, generator=g) * routing_map
        tokens = (torch.rand(T, H, device=dev, generator=g) * 4 - 2).to(torch.bfloat16)
        N = T * k
        nbytes = (T * H + N * H) * 2
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy = time_ms(lambda: dst.copy_(src), args.iters)
        perm, _, sorted_indices = permute(tokens, routing_map, probs)
        results = {
            "copy (same bytes)": copy,
            "reference permute+probs": time_ms(lambda: permute(tokens, routing_map, probs), args.iters),
            "reference unpermute+probs": time_ms(lambda: unpermute(perm, sorted_indices, (T, H), probs, routing_map), args.iters),
        }
        for op, (ms, ms_min) in results.items():
            rows.append({"shape": name, "dims": f"T={T} H={H} E={E} k={k} bf16, N={N}", "op": op, "msMedian": ms, "msMin": ms_min,
                         "bytes": nbytes, "gbPerSecond": nbytes / ms / 1e6, "fractionOfCopy": copy[0] / ms})
        del perm, sorted_indices, src, dst, tokens
        torch.cuda.empty_cache()
    # routing top-k at the DeepSeek-V3 shape (logits 16 MB: launch- and latency-bound)
    g = torch.Generator(device=dev).manual_seed(2)
    logits = torch.rand(16384, 256, device=dev, generator=g) * 8 - 4
    bias = torch.rand(256, device=dev, generator=g) * 0.1
    ms, ms_min = time_ms(lambda: route_ref(logits, bias), args.iters)
    nbytes = 16384 * 256 * 4 * 2 + 16384 * 8 * 8
    rows.append({"shape": "deepseek", "dims": "T=16384 E=256 k=8 sigmoid+bias, groups 4/8, norm, scale 2.5", "op": "reference route (grouped sigmoid top-k)",
                 "msMedian": ms, "msMin": ms_min, "bytes": nbytes, "gbPerSecond": nbytes / ms / 1e6, "fractionOfCopy": 0.0})
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    for r in rows:
        print(f"{r['shape']:<9} {r['op']:<26} {r['msMedian']:9.3f} {r['msMin']:9.3f} {r['gbPerSecond']:8.0f} {100 * r['fractionOfCopy']:7.0f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
