"""Building blocks shared by every ERNIE family: RMSNorm, rotary embeddings, attention with a
preallocated KV cache, and the SwiGLU MLP. Written once, used by the dense, MoE and VL models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the normalised value is cast back to the input dtype *before* the
    weight multiply (the reference's order, which matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies 1 / theta^(2i/D), in fp32 exactly as the reference computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, axis_of_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angles `position * inv_freq`, shape [..., T, D/2], fp32.

    positions: [..., T]; or, for multimodal RoPE, [A, ..., T] positions on A axes (time, height,
    width) with frequency i turning by the position on axis `axis_of_freq[i]`."""
    if axis_of_freq is None:
        angles = positions[..., None].float() * inv_freq
    else:
        angles = positions[axis_of_freq].movedim(0, -1).float() * inv_freq
    return angles.cos(), angles.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head vector (GPT-J / GLM style, not Llama's
    rotate-half). x: [B, H, T, D]; cos/sin: [B or 1, T, D/2]. Math in fp32, result in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: [B, K, capacity, D] each.

    Decode steps write in place and never reallocate, so a step has fixed-shape storage (the
    precondition for CUDA-graph capture). One cache belongs to one generation: concurrent requests
    on a shared model each own a cache, so they cannot corrupt each other's state.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        devices: list[torch.device],
    ) -> None:
        """`devices[i]` holds layer i's entries (a model split across GPUs keeps each layer's
        cache next to its weights)."""
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.capacity = capacity
        # RoPE position minus cache index of the tokens after the prompt: 0 for text; a VL prompt
        # sets it, since its images span fewer positions than tokens.
        self.position_offset: torch.Tensor | int = 0
        self.keys = [torch.zeros(shape, dtype=dtype, device=devices[i]) for i in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=devices[i]) for i in range(num_layers)]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions (the next power of two), keeping the entries: for a
        cache that grows with its conversation, between steps, never within one."""
        if length <= self.capacity:
            return
        self.capacity = 1 << (length - 1).bit_length()
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = old.new_zeros((*old.shape[:2], self.capacity, old.shape[3]))
                store[i][:, :, : old.shape[2]] = old

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Write the new keys/values at positions start.. and attend the queries over 0..end."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache is full: {end} positions needed, capacity {self.capacity}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return sdpa(q, self.keys[layer][:, :, :end], self.values[layer][:, :, :end], start)


class BatchStep:
    """The layout of one forward pass over new tokens of several sequences, each with its own
    cache: the tokens form one row [1, N] (every matmul then streams the weights once for all of
    them), sequence after sequence; attention is per sequence, over its own cache."""

    def __init__(self, segments: list[tuple[KVCache, int, int]]) -> None:
        """segments: (cache, start, length) of each sequence's new tokens, in token order."""
        self.segments = segments
        self.positions = torch.tensor([p for _, start, n in segments for p in range(start, start + n)])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
        """q: [1, H, N, D]; k, v: [1, K, N, D] of the step's tokens. Returns [1, H, N, D]."""
        outs, offset = [], 0
        for cache, begin, n in self.segments:
            rows = slice(offset, offset + n)
            outs.append(cache.attend(layer, q[:, :, rows], k[:, :, rows], v[:, :, rows], begin))
            offset += n
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class Attention(nn.Module):
    """Grouped-query attention with interleaved RoPE, fp32 softmax (SDPA) and an optional KV cache."""

    def __init__(
        self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | BatchStep | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        out = sdpa(q, k, v, 0) if cache is None else cache.attend(layer, q, k, v, start)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries (at positions start..start+T-1) over S = start+T keys."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if T == 1:
        if cpu_kernels.takes(q, k):  # bf16 on a CPU with AVX512-BF16: our kernel, 2x faster at 4k keys
            return torch.ops.ernie_studio.decode_attention(q, k, v)
        # One new query sees every cached key. Its H heads share K key/value heads in groups of
        # G = H/K: folded into the query length, each group is one plain attention per KV head,
        # which CPU SDPA runs 3x (fp32) to 13x (bf16) faster than its enable_gqa path at 4k keys.
        # Two bf16 matmuls over the cache (a view that grows by a key a step) are slower still:
        # oneDNN builds a kernel for every new length (bench/bench_decode_attention.py).
        return F.scaled_dot_product_attention(q.reshape(B, K, H // K, D), k, v).view(B, H, 1, D)
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # A chunk after cached keys (chunked prefill, a follow-up turn): folded the same way, each
    # query group's rows repeating its causal mask; 25% faster than enable_gqa at 129 x 3,192.
    G = H // K
    rows = torch.arange(start, start + T, device=q.device)[:, None]
    mask = (torch.arange(S, device=q.device)[None, :] <= rows).repeat(G, 1)
    return F.scaled_dot_product_attention(q.reshape(B, K, G * T, D), k, v, attn_mask=mask).view(B, H, T, D)
