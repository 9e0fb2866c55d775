"""int8 weight-only quantization for CPU decoding: half the bytes per token of bf16.

Decoding is memory-bound, so storing the weights as int8 with one scale per output channel
(symmetric, scale = max |w| / 127) halves what each token streams. Activations stay in the model's
dtype. A matmul of a few rows uses torch's int8 weight-pack kernel; more rows (prefill, a large
batch) dequantise the weight and use the regular GEMM, which is faster there. The embedding
shares the int8 table with the tied head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows up to which the int8 kernel beats dequantise + bf16 GEMM on a 2-core AVX-512 CPU
# (1024 x 3072: 0.25 vs 0.49 ms at 1 row, 0.57 vs 0.68 at 8, 0.91 vs 0.72 at 16).
INT8_KERNEL_MAX_ROWS = 8
QUANTIZE_MODES = (None, "int8")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 [N, K], scales [N] in the weight's dtype)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.to(weight.dtype)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] * scales[:, None]).T in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # strided inputs take a slow path
    if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight, scales.to(x.dtype))
    else:
        out = F.linear(rows, weight.to(x.dtype)) * scales.to(x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """A bias-optional Linear whose weight is int8 with per-output-channel scales."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = bias

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_rows(linear.weight.detach()), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x, self.weight, self.scales)
        return out if self.bias is None else out + self.bias


class Int8Embedding(nn.Module):
    """Token embedding from an int8 table: the looked-up rows are dequantised."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise, in place, every Linear of the decoder layers and the head (tied: with the
    embedding). Routers, norms and stacked MoE experts keep their dtype. CPU only: torch's int8
    weight-pack kernel is a CPU kernel."""
    if model.device.type != "cpu":
        raise ValueError("int8 weight-only quantization runs on the CPU; on a GPU use bf16")
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, Int8Linear.of(module))
    if model.lm_head is not None:
        model.lm_head = Int8Linear.of(model.lm_head)
    else:  # tied: one int8 table serves the lookup and the head
        table = quantize_rows(model.model.embed_tokens.weight.detach())
        model.model.embed_tokens, model.lm_head = Int8Embedding(*table), Int8Linear(*table)
    return model
