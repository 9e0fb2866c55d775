"""Decode-step attention of the 0.3B's shapes (16 query heads, 2 KV heads, head_dim 128) as decoding
meets it: one new query a step over a cache view that grows by a key each step, each call on
another of 18 layers' caches (read from memory, not from the CPU's caches). Side by side in one
run, per layer call: torch's SDPA with `enable_gqa=True`; two matmuls with an fp32 softmax between
(per KV head's folded query group, transformers' eager attention); SDPA with each KV head's query
group folded into the query length (what `models.layers.sdpa` runs without our kernel); and our
kernel (models/decode_attention.c, bf16 on a CPU with AVX512-BF16: what `models.layers.sdpa` runs
there).

    python bench/bench_decode_attention.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import cpu_kernels  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 16, 2, 128, 18


def two_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    folded = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    scores = torch.matmul(folded, k.transpose(-1, -2)).float() * HEAD_DIM**-0.5
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def folded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.reshape(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), k, v)


def per_call_ms(attend, keys: int, dtype: torch.dtype, steps: int = 10) -> float:
    """Mean time of a call, over `steps` steps at keys, keys+1, ... cached keys (views of larger
    caches), each step a call on each layer's cache."""
    shape = (1, KV_HEADS, keys + steps + 64, HEAD_DIM)
    caches = [(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) for _ in range(LAYERS)]
    q = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=dtype)
    attend(q, caches[0][0][:, :, :keys], caches[0][1][:, :, :keys])
    start = time.perf_counter()
    for n in range(keys + 1, keys + 1 + steps):
        for k, v in caches:
            attend(q, k[:, :, :n], v[:, :, :n])
    return (time.perf_counter() - start) / (steps * LAYERS) * 1000


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, our kernel: {'yes' if cpu_kernels.ready else 'not built'}\n")
    print("| dtype | cached keys | SDPA enable_gqa (ms) | two matmuls (ms) | folded SDPA (ms) | our kernel (ms) |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for keys in (192, 2048, 4096):
            gqa = per_call_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), keys, dtype)
            matmuls = per_call_ms(two_matmuls, keys, dtype)
            folded = per_call_ms(folded_sdpa, keys, dtype)
            kernel = "-"
            if dtype == torch.bfloat16 and cpu_kernels.ready:
                kernel = f"{per_call_ms(torch.ops.ernie_studio.decode_attention, keys, dtype):.3f}"
            print(f"| {str(dtype).removeprefix('torch.')} | {keys} | {gqa:.3f} | {matmuls:.3f} | {folded:.3f} | {kernel} |")


if __name__ == "__main__":
    main()
