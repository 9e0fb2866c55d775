"""Decode-step attention of the 0.3B's shapes (16 query heads, 2 KV heads, head_dim 128) as decoding
meets it: one new query a step over a cache view that grows by a key each step. Side by side in one
run, per layer call: torch's SDPA with `enable_gqa=True`; two matmuls with an fp32 softmax between
(per KV head's folded query group, transformers' eager attention); and ours
(`models.layers.sdpa`: SDPA with each KV head's query group folded into the query length).

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

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 128


def two_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    folded = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    scores = torch.matmul(folded, k.transpose(-1, -2)).float() * HEAD_DIM**-0.5
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def per_call_ms(attend, keys: int, dtype: torch.dtype, steps: int = 50) -> float:
    """Mean time of `steps` calls at keys, keys+1, ... cached keys (a view of a larger cache)."""
    shape = (1, KV_HEADS, keys + steps + 64, HEAD_DIM)
    k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=dtype)
    attend(q, k[:, :, :keys], v[:, :, :keys])
    start = time.perf_counter()
    for n in range(keys + 1, keys + 1 + steps):
        attend(q, k[:, :, :n], v[:, :, :n])
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | cached keys | SDPA enable_gqa (ms) | two matmuls (ms) | ours (ms) |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for keys in (192, 2048, 4096):
            gqa = per_call_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), keys, dtype)
            matmuls = per_call_ms(two_matmuls, keys, dtype)
            ours = per_call_ms(lambda q, k, v: sdpa(q, k, v, k.shape[2] - 1), keys, dtype)
            print(f"| {str(dtype).removeprefix('torch.')} | {keys} | {gqa:.3f} | {matmuls:.3f} | {ours:.3f} |")


if __name__ == "__main__":
    main()
