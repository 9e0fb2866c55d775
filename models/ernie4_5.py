"""ERNIE 4.5 text models: the dense 0.3B and the MoE 21B-A3B.

Both are Llama-shaped pre-norm decoders (RMSNorm, GQA, SwiGLU, tied head) with interleaved-pair
RoPE; the MoE model swaps the MLP of some layers for a routed mixture with shared experts. Module and
parameter names follow the hub checkpoints, so most tensors load by name.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, Attention, BatchStep, KVCache, RMSNorm, rope_cos_sin, rope_inv_freq

DENSE_ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
MOE_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)


@dataclass
class Ernie45Config:
    """The config.json keys the forward pass depends on. `moe_num_experts == 0` means dense."""

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    moe_num_experts: int = 0
    moe_k: int = 6
    moe_intermediate_size: int = 1536
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    moe_use_aux_free: bool = True
    moe_vision_intermediate_size: int = 0  # VL: width of the image/video experts (0: none)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Ernie45Config:
        """Parse an official config.json (the 2025 originals and transformers v5 rewrites)."""
        architecture = (raw.get("architectures") or [""])[0]
        is_moe = architecture in MOE_ARCHITECTURES or raw.get("model_type") == "ernie4_5_moe"
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        # v5 moves rope_theta into rope_parameters; the hub originals keep it at the top level.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
        values["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        # Dense configs default to head_dim 128 even without the key (the reference's class
        # default); the MoE config has no such default and derives it from the width.
        if "head_dim" not in values and is_moe:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if "num_key_value_heads" not in values:
            values["num_key_value_heads"] = raw.get("num_attention_heads", cls.num_attention_heads)
        if not is_moe:
            values["moe_num_experts"] = 0
        config = cls(**values)
        if config.moe_layer_end_index == -1:
            config.moe_layer_end_index = config.num_hidden_layers - 1
        return config

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.moe_num_experts > 0
            and (index + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= index <= self.moe_layer_end_index
        )


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped GEMM runs on CPU in any float dtype, on CUDA only in bf16 on sm80+."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8


class Experts(nn.Module):
    """All routed experts' weights stacked, so tokens run grouped by expert in two grouped GEMMs."""

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))  # [gate; up] rows
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [N, d]; experts, weights: [N, k]. Returns sum_j weights[:, j] * expert_j(x)."""
        N, k = experts.shape
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0])
        xs = x[order // k]  # token rows grouped by expert
        if grouped_mm_supported(x):
            ends = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(xs, self.gate_up.transpose(1, 2), offs=ends).split(self.hidden, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=ends)
        else:  # one GEMM pair per expert that received tokens
            out = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    gate, up = F.linear(xs[start : start + n], self.gate_up[e]).split(self.hidden, dim=-1)
                    out[start : start + n] = F.linear(F.silu(gate) * up, self.down[e])
                    start += n
        out = out * weights.flatten()[order, None]
        # Back to (token, choice) order, then a deterministic sum over the k choices.
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(N, k, -1).sum(dim=1)


class Router(nn.Module):
    """Router weights [E, d] under the hub names: `weight` for text tokens and, in the VL model,
    `weight_1` for image/video tokens."""

    def __init__(self, dim: int, num_experts: int, modalities: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.weight_1 = nn.Parameter(torch.empty(num_experts, dim)) if modalities == 2 else None


class CorrectionBias(nn.Module):
    """Holds `e_score_correction_bias` [modalities, E] under the checkpoint's `moe_statics` name."""

    def __init__(self, num_experts: int, modalities: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(modalities, num_experts))


class MoE(nn.Module):
    """Top-k routed experts plus always-on shared experts.

    The router runs in fp32: softmax first, then the correction bias is added only to *choose* the
    experts; the mixing weights are the unbiased probabilities of the chosen ones, renormalised.
    The VL model isolates modalities: image/video tokens (`vision_mask`) go to a second set of
    routed experts with its own router and bias row; the shared experts serve every token.
    """

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__()
        d, E, vision = config.hidden_size, config.moe_num_experts, config.moe_vision_intermediate_size
        self.num_experts, self.k, self.norm_min = E, config.moe_k, config.moe_norm_min
        self.gate = Router(d, E, 2 if vision else 1)
        self.moe_statics = CorrectionBias(E, 2 if vision else 1)
        self.experts = Experts(E, d, config.moe_intermediate_size)
        self.vision_experts = Experts(E, d, vision) if vision else None
        shared = config.moe_intermediate_size * config.moe_num_shared_experts
        self.shared_experts = MLP(d, shared, config.use_bias) if shared else None

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if vision_mask is None or not vision_mask.any():
            out = self.route(x, 0)
        else:
            vision = vision_mask.reshape(-1)
            out = torch.empty_like(x)
            for modality, rows in enumerate((~vision, vision)):
                if rows.any():
                    out[rows] = self.route(x[rows], modality)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def route(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        """Routed experts' output for tokens x [N, d] of one modality (0 text, 1 image/video)."""
        router, experts = (self.gate.weight, self.experts) if modality == 0 else (self.gate.weight_1, self.vision_experts)
        probs = F.softmax(F.linear(x.float(), router.float()), dim=-1)
        _, chosen = torch.topk(probs + self.moe_statics.e_score_correction_bias[modality], self.k, dim=-1)
        weights = probs.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return experts(x, chosen, weights.to(x.dtype))

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """The hub files store routed experts one by one, the vision experts numbered after the
        text experts; map those names to views of the stacked weights."""
        views = {}
        for first, experts in ((0, self.experts), (self.num_experts, self.vision_experts)):
            if experts is None:
                continue
            for e in range(self.num_experts):
                views[f"{prefix}.experts.{first + e}.gate_proj.weight"] = experts.gate_up[e, : experts.hidden]
                views[f"{prefix}.experts.{first + e}.up_proj.weight"] = experts.gate_up[e, experts.hidden :]
                views[f"{prefix}.experts.{first + e}.down_proj.weight"] = experts.down[e]
        return views


class DecoderLayer(nn.Module):
    def __init__(self, config: Ernie45Config, index: int) -> None:
        super().__init__()
        c = config
        self.index = index
        self.self_attn = Attention(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.use_bias
        )
        self.mlp = MoE(c) if c.is_moe_layer(index) else MLP(c.hidden_size, c.intermediate_size, c.use_bias)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | BatchStep | None,
        start: int,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.index, start)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, vision_mask) if isinstance(self.mlp, MoE) else self.mlp(h))


class Ernie45Model(nn.Module):
    def __init__(self, config: Ernie45Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Ernie45ForCausalLM(nn.Module):
    """Dense or MoE ERNIE 4.5 causal LM. `forward(ids, cache, start)` returns logits [B, T, V]."""

    config_class = Ernie45Config

    def __init__(self, config: Ernie45Config) -> None:
        super().__init__()
        self.config = config
        self.model = Ernie45Model(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None
        self.fast_decode = None  # a compiled one-token step (models.compiled), set by load_model

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (an int8-quantised model keeps its norms in it)."""
        return self.model.norm.weight.dtype

    def cast(self, dtype: torch.dtype) -> Ernie45ForCausalLM:
        """Cast to `dtype`, keeping the routers and correction biases in fp32 as the checkpoints do."""
        self.to(dtype)
        for module in self.modules():
            if isinstance(module, MoE):
                module.gate.float()
                module.moe_statics.float()
        return self

    def checkpoint_targets(self, names: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Map every checkpoint tensor name to the tensor (or view) it loads into.

        `names` are the checkpoint's own tensor names, from which a model whose files come in
        several layouts picks its layout. Routed experts are stored one tensor per expert in the
        files and stacked here."""
        targets = dict(self.named_parameters())
        for name, module in self.named_modules():
            if isinstance(module, Experts):
                del targets[f"{name}.gate_up"], targets[f"{name}.down"]
            elif isinstance(module, MoE):
                targets.update(module.checkpoint_views(name))
        return targets

    def ignores_checkpoint_key(self, name: str) -> bool:
        """Tensors present in official files that inference does not use."""
        if "mtp" in name:  # multi-token-prediction head (speculative decoding only)
            return True
        return name == "lm_head.weight" and self.lm_head is None  # tied: the embedding is the head

    def may_miss_checkpoint_key(self, name: str) -> bool:
        """Tensors a valid checkpoint may lack; they stay zero. Without aux-free balancing
        (`moe_use_aux_free: false`) there is no correction bias."""
        return name.endswith("e_score_correction_bias") and not self.config.moe_use_aux_free

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        devices = [layer.input_layernorm.weight.device for layer in self.model.layers]
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, capacity, self.dtype, devices)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T] placed at positions start..start+T-1.

        With a cache, keys/values of earlier positions come from it and the new ones are written
        into it. `last_only` computes logits of the last position only (prefill for generation)."""
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions[None], self.inv_freq(x.device))
        return self.decode(x, cos, sin, cache, start, [-1] if last_only else None)

    def forward_step(self, step: BatchStep, input_ids: torch.Tensor, logits_at: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits [1, len(logits_at), V] at the given token indices of one batched step over
        several sequences (`input_ids` [N] in the step's token order)."""
        x = self.model.embed_tokens(input_ids[None])
        cos, sin = rope_cos_sin(step.positions.to(x.device)[None], self.inv_freq(x.device))
        return self.decode(x, cos, sin, step, 0, logits_at)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device)
        return self._inv_freq

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | BatchStep | None,
        start: int,
        logits_at: list[int] | torch.Tensor | None,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits from input embeddings x [B, T, d] and their rotary cos/sin (the decoder stack
        and the head, shared with the VL model), at the token indices `logits_at` (all if None:
        the head is the largest matmul, so generation asks for the rows it samples from only)."""
        for layer in self.model.layers:
            device = layer.input_layernorm.weight.device
            if x.device != device:  # a model split across devices by layers
                x, cos, sin = x.to(device), cos.to(device), sin.to(device)
                vision_mask = None if vision_mask is None else vision_mask.to(device)
            x = layer(x, cos, sin, cache, start, vision_mask)
        x = x if logits_at is None else x[:, logits_at]
        x = self.model.norm(x.to(self.model.norm.weight.device))
        if self.lm_head is not None:  # untied, or quantised
            return self.lm_head(x.to(self.lm_head.weight.device))
        weight = self.model.embed_tokens.weight
        return F.linear(x.to(weight.device), weight)
