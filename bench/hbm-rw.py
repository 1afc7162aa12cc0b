"""What the GPU's memory does with the dispatch's traffic patterns (issue 19's dispatch target).

permute reads each token row once and writes it k times (T*H read, T*k*H written); unpermute
does the reverse; the benchmark's "device copy" moves (T*H + T*k*H) / 2 bytes each way. If the
memory writes slower than it reads, a write-heavy op cannot reach a copy's time. This measures,
with PyTorch on the same GPU (CUDA events, median of 20 after 3 warm-ups), at the DeepSeek-V3
(T=16384, H=7168, k=8) and Mixtral-like (T=16384, H=4096, k=2) shapes, bf16:

- copy: `dst.copy_(src)` of (T + N) H / 2 elements (the benchmark's reference), N = T k;
- broadcast write: `out.view(T, k, H).copy_(tokens[:, None, :].expand(T, k, H))`: permute's
  bytes (T H read, N H written) with contiguous destinations: the best a permute can do;
- strided read-reduce: `out.copy_(big.view(T, k, H).sum(1))`-like traffic, N H read, T H written
  (unpermute's bytes), as `torch.sum` over k;
- pure write: `buf.fill_(1)`, pure read: `buf.sum(dtype=float32)` (a reduction: bound by reading).

Each as GB/s of the bytes it must move and as a fraction of the copy's rate (for the first three,
which move the same bytes, that is also the copy's time over the op's).

    python3 bench/hbm-rw.py [--out FILE]
"""
import json
import sys

import torch

from gpu_torch_ref import time_ms  # CUDA events, median of iters after 3 warm-ups


def timed(fn):
    return time_ms(fn, 20)[0]


def main(argv):
    out = argv[argv.index('--out') + 1] if '--out' in argv else None
    dev = torch.device('cuda')
    rows = []
    for name, t, h, k in (('deepseek', 16384, 7168, 8), ('mixtral', 16384, 4096, 2)):
        n = t * k
        tokens = torch.randn(t, h, device=dev).to(torch.bfloat16)
        big = torch.empty(n, h, device=dev, dtype=torch.bfloat16)
        half = (t + n) * h // 2
        src = torch.randn(half, device=dev).to(torch.bfloat16)
        dst = torch.empty_like(src)
        elem = 2
        copy_ms = timed(lambda: dst.copy_(src))
        copy_rate = 2 * half * elem / copy_ms / 1e6
        cases = [
            ('copy (same bytes)', copy_ms, 2 * half * elem),
            ('broadcast write (permute bytes: T H read, N H written)', timed(lambda: big.view(t, k, h).copy_(tokens[:, None, :].expand(t, k, h))),
             (t + n) * h * elem),
            ('sum over k (unpermute bytes: N H read, T H written)', timed(lambda: torch.sum(big.view(t, k, h), dim=1, out=tokens)),
             (t + n) * h * elem),
            ('pure write (fill) of N H', timed(lambda: big.fill_(1.0)), n * h * elem),
            ('pure read (sum) of N H', timed(lambda: big.sum(dtype=torch.float32)), n * h * elem),
        ]
        for op, ms, nbytes in cases:
            rate = nbytes / ms / 1e6
            rows.append({'shape': name, 'dims': f'T={t} H={h} k={k} bf16', 'op': op, 'msMedian': ms, 'bytes': nbytes,
                         'gbPerSecond': rate, 'fractionOfCopyRate': rate / copy_rate})
            print(f'{name:<9} {op:<58} {ms:8.4f} ms {rate:8.1f} GB/s  {rate / copy_rate:6.3f} of the copy rate')
        del tokens, big, src, dst
        torch.cuda.empty_cache()
    doc = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'rows': rows}
    if out:
        json.dump(doc, open(out, 'w'), indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
