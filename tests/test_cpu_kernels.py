"""Our decode-attention kernel (models/decode_attention.c) against torch's attention: the same
result within bf16 rounding for every shape it takes, the model's tokens unchanged, and torch's
path wherever the kernel is off or cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels, generate, load_model
from models.factory import tiny_config, write_checkpoint
from models.layers import sdpa

needs_kernel = pytest.mark.skipif(not cpu_kernels.ready, reason="the kernel needs a C compiler and AVX512-BF16")


def cache_views(kv_heads: int, keys: int, head_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as decoding meets them: the first `keys` rows of a larger cache."""
    k, v = (torch.randn(1, kv_heads, keys + 37, head_dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    return k[:, :, :keys], v[:, :, :keys]


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(16, 2, 128), (20, 4, 128), (4, 4, 64), (6, 2, 32), (16, 2, 256)])
@pytest.mark.parametrize("keys", [1, 2, 63, 64, 129, 1000, 4099])
def test_kernel_equals_attention_within_bf16_rounding(heads, kv_heads, head_dim, keys):
    generator = torch.Generator().manual_seed(keys)
    q = (torch.randn(1, heads, 1, head_dim, generator=generator) * 2).to(torch.bfloat16)  # peaked softmax too
    k, v = cache_views(kv_heads, keys, head_dim, generator)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
    ours = torch.ops.ernie_studio.decode_attention(q, k, v)
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    error, torch_error = (ours.float() - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
    assert error <= max(2 * torch_error, 1e-2), (error, torch_error)


@needs_kernel
def test_sdpa_sends_one_token_bf16_attention_to_the_kernel(monkeypatch):
    calls = []
    kernel = torch.ops.ernie_studio.decode_attention
    monkeypatch.setattr(torch.ops.ernie_studio, "decode_attention", lambda *args: calls.append(args) or kernel(*args))
    generator = torch.Generator().manual_seed(0)
    k, v = cache_views(2, 50, 64, generator)
    q = torch.randn(1, 16, 1, 64, generator=generator)
    sdpa(q.bfloat16(), k, v, start=49)
    assert len(calls) == 1
    sdpa(q, k.float(), v.float(), start=49)  # fp32, a prompt chunk and a batch of 2: torch's
    sdpa(torch.randn(1, 16, 3, 64).bfloat16(), k, v, start=47)
    sdpa(q.bfloat16().expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), start=49)
    assert len(calls) == 1


@needs_kernel
def test_greedy_tokens_of_a_bf16_model_are_the_same_with_and_without_the_kernel(tmp_path, monkeypatch):
    config = {**tiny_config("dense"), "head_dim": 64, "num_attention_heads": 8, "num_key_value_heads": 2}
    model = load_model(write_checkpoint(tmp_path, config, tokenizer=False), device="cpu", dtype=torch.bfloat16)
    prompt = torch.randint(3, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    with_kernel = list(generate(model, prompt, 40, eos_token_ids=[]))
    monkeypatch.setattr(cpu_kernels, "ready", False)
    assert list(generate(model, prompt, 40, eos_token_ids=[])) == with_kernel


@pytest.mark.parametrize("environment", [{"ERNIE_STUDIO_CPU_KERNELS": "0"}, {"CC": "no-such-compiler"}])
def test_torch_attention_serves_where_the_kernel_is_off_or_cannot_be_built(environment, tmp_path):
    """In a fresh process (the kernel is loaded at import): `ready` is False, and decoding works."""
    script = ("import torch; from models import cpu_kernels; from models.layers import sdpa; "
              "q, k = torch.randn(1, 16, 1, 64).bfloat16(), torch.randn(1, 2, 9, 64).bfloat16(); "
              "print(cpu_kernels.ready, sdpa(q, k, k, 8).shape)")
    env = {**os.environ, "ERNIE_STUDIO_CACHE": str(tmp_path), **environment}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "False torch.Size([1, 16, 1, 64])"
