"""Decode-step attention of the 0.3B's shapes (16 query heads, 2 KV heads, head_dim 128): torch's
SDPA with `enable_gqa=True`, SDPA with each KV head's query group folded into the query length, and
ours (`models.layers.sdpa`: the folded group as two matmuls and an fp32 softmax), side by side in
one run, per layer call.

    python bench/bench_decode_attention.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.layers import sdpa  # noqa: E402


def per_call_ms(fn, repeats: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | cached keys | SDPA enable_gqa (ms) | SDPA folded (ms) | ours (ms) |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for keys in (192, 2048, 4096):
            q = torch.randn(1, 16, 1, 128, dtype=dtype)
            k, v = torch.randn(1, 2, keys, 128, dtype=dtype), torch.randn(1, 2, keys, 128, dtype=dtype)
            reference = per_call_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            folded = per_call_ms(lambda: F.scaled_dot_product_attention(q.view(1, 2, 8, 128), k, v))
            ours = per_call_ms(lambda: sdpa(q, k, v, keys - 1))
            print(f"| {str(dtype).removeprefix('torch.')} | {keys} | {reference:.3f} | {folded:.3f} | {ours:.3f} |")


if __name__ == "__main__":
    main()
