"""ERNIE 4.5 VL (ERNIE-4.5-VL-28B-A3B): a vision transformer, a resampler and the MoE text decoder
of ernie4_5.py with 3-D RoPE and modality-isolated experts.

Images and videos arrive as the processor returns them: rows of 3x14x14 = 588 patch values, each
2x2 block of patches in consecutive rows, and a (t, h, w) grid in patches per image or video. The
tower encodes every frame on its own; the resampler merges each 2x2 block, and each pair of frames
(an image pairs with itself), into one token; those tokens replace the prompt's placeholder
tokens. In the decoder, positions are (t, h, w) triples and image/video tokens use their own
routed experts.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ernie4_5 import Ernie45Config, Ernie45ForCausalLM
from .layers import KVCache, RMSNorm, apply_interleaved_rope, rope_cos_sin, rope_inv_freq

VL_ARCHITECTURES = ("Ernie4_5_VLMoeForConditionalGeneration", "Ernie4_5_VL_MoeForConditionalGeneration")
TOKEN_KEYS = ("image_token_id", "image_start_token_id", "image_end_token_id",
              "video_token_id", "video_start_token_id", "video_end_token_id")
TEXT, IMAGE, VIDEO = 0, 1, 2
# Our parameter names -> transformers' module names (checkpoints.md §4.6), in which some
# converted uploads store the weights; routed experts are stacked there as here.
TRANSFORMERS_NAMES = [
    (r"^model\.", "model.language_model."),
    (r"^vision_model\.", "model.vision_tower."),
    (r"^resampler_model\.", "model.resampler_model."),
    (r"_linear\.0\.", "_linear.fc1."), (r"_linear\.2\.", "_linear.fc2."), (r"_linear\.3\.", "_linear.ln."),
    (r"mlp\.gate\.weight$", "mlp.text_moe.gate.weight"),
    (r"mlp\.gate\.weight_1$", "mlp.vision_moe.gate.weight"),
    (r"mlp\.experts\.(gate_up|down)$", r"mlp.text_moe.experts.\1_proj"),
    (r"mlp\.vision_experts\.(gate_up|down)$", r"mlp.vision_moe.experts.\1_proj"),
]


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass
class Ernie45VLConfig(Ernie45Config):
    """The text decoder's keys (as Ernie45Config), the vision tower's, and the special token ids."""

    moe_vision_intermediate_size: int = 512
    mlp_layer_types: list[str] = field(default_factory=list)
    mrope_section: tuple[int, int, int] = (22, 22, 20)  # frequencies driven by (h, w, t)
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        h, w, t = self.mrope_section
        if h != w or h + w + t != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} does not split head_dim {self.head_dim}")
        if self.vision.temporal_merge_size != 2:
            raise ValueError("only a temporal merge of 2 frames is supported (as in the reference)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Ernie45VLConfig:
        """Parse the hub's original config.json (flat text keys, list-valued MoE keys, nested
        `vision_config`) or the transformers v5 one (`text_config` and `vision_config`)."""
        nested = "text_config" in raw
        text = raw["text_config"] if nested else raw
        vision = raw.get("vision_config") or {}
        known = {f.name for f in fields(cls)}
        layer_rule = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")
        values = {k: v for k, v in text.items() if k in known and k not in layer_rule and v is not None}
        values.update({k: raw[k] for k in (*TOKEN_KEYS, "eos_token_id", "bos_token_id", "pad_token_id") if raw.get(k) is not None})
        values["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        values.setdefault("num_key_value_heads", text["num_attention_heads"])
        values.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
        text_experts, vision_experts = text["moe_intermediate_size"]
        values["moe_intermediate_size"], values["moe_vision_intermediate_size"] = text_experts, vision_experts
        layers = text["num_hidden_layers"]
        vision_values = dict(
            depth=vision["depth"], hidden_size=vision["hidden_size"], num_heads=vision["num_heads"],
            in_channels=vision.get("in_channels", 3), patch_size=vision.get("patch_size", 14),
        )
        if nested:
            rope = text.get("rope_parameters") or {}
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
            values["rope_theta"] = rope.get("rope_theta", cls.rope_theta)
            values["mrope_section"] = tuple(rope.get("mrope_section", cls.mrope_section))
            values["mlp_layer_types"] = text.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
            vision_values.update(
                intermediate_size=vision.get("intermediate_size", 4 * vision["hidden_size"]),
                spatial_merge_size=vision.get("spatial_merge_size", 2),
                temporal_merge_size=vision.get("temporal_merge_size", 2),
                layer_norm_eps=vision.get("rms_norm_eps", 1e-6),
                rope_theta=(vision.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            )
        else:
            experts = raw["moe_num_experts"]
            values["moe_num_experts"] = experts[0] if isinstance(experts, list) else experts
            values["image_token_id"] = raw.get("image_token_id", raw["im_patch_id"])
            # One text-side layer rule for both expert sets: the widest span of the per-modality keys.
            first = min(_as_list(raw.get("moe_layer_start_index", 1)))
            last = max(_as_list(raw.get("moe_layer_end_index", -1)))
            last = layers - 1 if last == -1 else last
            interval = raw.get("moe_layer_interval", 1)
            values["mlp_layer_types"] = [
                "sparse" if (i + 1) % interval == 0 and first <= i <= last else "dense" for i in range(layers)
            ]
            t = raw.get("freq_allocation", 20)
            hw = (values["head_dim"] // 2 - t) // 2
            values["mrope_section"] = (hw, hw, t)
            vision_values.update(
                intermediate_size=vision["hidden_size"] * vision.get("mlp_ratio", 4),
                spatial_merge_size=raw.get("spatial_conv_size", vision.get("spatial_merge_size", 2)),
                temporal_merge_size=raw.get("temporal_conv_size", 2),
            )
        values["vision"] = VisionConfig(**vision_values)
        return cls(**values)

    def is_moe_layer(self, index: int) -> bool:
        return self.mlp_layer_types[index] == "sparse"


def _as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]


# ---- vision tower -------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    """Bidirectional attention within each frame only: images and frames never see each other."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q | k | v], heads contiguous within each
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[tuple[int, int]]
    ) -> torch.Tensor:
        """x: [N, d] patches of all items; frames: (frame count, patches per frame) per item."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(1, 2, 0, 3)  # [H, N, D] each
        # The tower's RoPE turns the pairs (j, j + D/2). Reordering every head to (0, D/2, 1, D/2 + 1,
        # ...) makes them adjacent pairs for layers.py's rotation; q.k is blind to a common reorder.
        q, k = (apply_interleaved_rope(t.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)[None], cos, sin)[0]
                for t in (q, k))
        out, offset = [], 0
        for count, length in frames:  # all frames of an item in one batched call
            rows = slice(offset, offset + count * length)
            q_, k_, v_ = (t[:, rows].unflatten(1, (count, length)).transpose(0, 1) for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).flatten(0, 1))  # [rows, H, D]
            offset += count * length
        return self.proj(torch.cat(out).flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = VisionAttention(d, config.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(d, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[tuple[int, int]]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.in_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


def patch_positions(t: int, h: int, w: int, merge: int) -> torch.Tensor:
    """(row, col) [2, t*h*w] of every patch on the 14-px grid, in the processor's row order: 2x2
    blocks in raster order, the 4 patches of a block in raster order; repeated per frame."""
    blocks_h, blocks_w, i, j = torch.meshgrid(
        torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge), indexing="ij"
    )
    return torch.stack([(blocks_h * merge + i).flatten(), (blocks_w * merge + j).flatten()]).repeat(1, t)


class VisionTransformer(nn.Module):
    """Patch embedding, 2-D RoPE ViT blocks (no attention across frames), final LayerNorm."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """pixels: [N, 588] rows of all items; grids: (t, h, w) per item, in patches."""
        c = self.config
        device = self.ln.weight.device
        x = self.patch_embed(pixels.to(device))
        positions = torch.cat([patch_positions(t, h, w, c.spatial_merge_size) for t, h, w in grids], dim=1)
        # A head's first half of frequencies turns with the row, the second with the column.
        quarter = c.hidden_size // c.num_heads // 4
        inv_freq = rope_inv_freq(2 * quarter, c.rope_theta, device).repeat(2)
        axis = torch.arange(2, device=device).repeat_interleave(quarter)
        cos, sin = rope_cos_sin(positions.to(device), inv_freq, axis)
        frames = [(t, h * w) for t, h, w in grids]
        for block in self.blocks:
            x = block(x, cos[None], sin[None], frames)
        return self.ln(x)


def merge_mlp(dim_in: int, dim: int, eps: float) -> nn.Sequential:
    """fc1, exact GELU, fc2, LayerNorm (indices 0, 2, 3: the checkpoint's names)."""
    return nn.Sequential(nn.Linear(dim_in, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps))


class Resampler(nn.Module):
    """Merges 2x2 patches, then pairs of frames, into one token each and projects to the text width."""

    def __init__(self, config: Ernie45VLConfig) -> None:
        super().__init__()
        v = config.vision
        self.merge = v.spatial_merge_size
        self.spatial_dim = v.hidden_size * self.merge**2
        self.spatial_linear = merge_mlp(self.spatial_dim, self.spatial_dim, v.layer_norm_eps)
        self.temporal_linear = merge_mlp(2 * self.spatial_dim, self.spatial_dim, v.layer_norm_eps)
        self.mlp = nn.Linear(self.spatial_dim, config.hidden_size)
        self.after_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """x: tower output [N, d] of all items; returns [tokens, text width], item by item."""
        x = self.spatial_linear(x.reshape(-1, self.spatial_dim))  # a block's 4 patches are 4 rows
        pieces, offset = [], 0
        for t, h, w in grids:
            n = h * w // self.merge**2
            frames = x[offset : offset + t * n].view(t, n, -1)
            offset += t * n
            # Frames (2k, 2k+1) form token k (an odd last frame is dropped, as in the reference).
            frames = frames.expand(2, -1, -1) if t == 1 else frames[: t - t % 2]
            pieces.append(frames.unflatten(0, (-1, 2)).transpose(1, 2).flatten(2).flatten(0, 1))
        return self.after_norm(self.mlp(self.temporal_linear(torch.cat(pieces))))


# ---- the model ----------------------------------------------------------------------------------


class Ernie45VLForConditionalGeneration(Ernie45ForCausalLM):
    """ERNIE 4.5 VL MoE. `forward(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw)` returns logits [B, T, V]; the image/video tokens are found in `input_ids`."""

    config_class = Ernie45VLConfig
    takes_media = True  # its prompts go through load_processor (images, videos), not the tokenizer alone

    def __init__(self, config: Ernie45VLConfig) -> None:
        super().__init__(config)
        self.vision_model = VisionTransformer(config.vision)
        self.resampler_model = Resampler(config)
        # 3-D RoPE: frequency i turns with t (row 0), h (1) or w (2) of a token's position. The
        # last mrope_section[2] (slowest) frequencies follow t; before them even ones h, odd ones w.
        h, w, t = config.mrope_section
        self.axis_of_freq = [1 + i % 2 for i in range(h + w)] + [0] * t

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for a prompt (start 0) with its images and videos, or, with `start` > 0, for
        tokens after a cached prompt: their positions continue from the prompt's largest + 1, and
        they route to the text experts, as the reference treats generated tokens."""
        x = self.model.embed_tokens(input_ids)
        B, T = input_ids.shape
        if start == 0:
            kinds, positions = self.prompt_layout(input_ids, image_grid_thw, video_grid_thw)
            x = self.insert_media(x, kinds, pixel_values, image_grid_thw, IMAGE)
            x = self.insert_media(x, kinds, pixel_values_videos, video_grid_thw, VIDEO)
            delimiters = [getattr(self.config, k) for k in TOKEN_KEYS]
            vision_mask = torch.isin(input_ids, torch.tensor(delimiters, device=input_ids.device)) | (kinds != TEXT)
            positions = positions.to(x.device)
            if cache is not None:
                cache.position_offset = positions.amax(dim=(0, 2)) + 1 - T  # [B]
        else:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("images and videos belong to the prompt (start=0)")
            offset = torch.as_tensor(0 if cache is None else cache.position_offset, device=x.device).view(-1, 1)
            positions = (torch.arange(start, start + T, device=x.device) + offset).expand(3, B, T)
            vision_mask = None
        axis = torch.tensor(self.axis_of_freq, device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq(x.device), axis)
        return self.decode(x, cos, sin, cache, start, [-1] if last_only else None, vision_mask)

    def prompt_layout(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholder kinds [B, T] (TEXT, IMAGE, VIDEO) and 3-D positions [3, B, T] of a prompt.

        Text advances all three coordinates by 1 per token. An item with grid (t, h, w) covers
        its merged grid (t/2 for videos, h/2, w/2) from the current position p, token (i, j, k) at
        (p + i, p + j, p + k), after which text resumes at p + max(h, w)/2 (the reference ignores
        a video's length there)."""
        c = self.config
        merge = c.vision.spatial_merge_size
        grids = {IMAGE: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
                 VIDEO: iter([] if video_grid_thw is None else video_grid_thw.tolist())}
        ids = input_ids.cpu()
        kinds = torch.full_like(ids, TEXT)
        kinds[ids == c.image_token_id] = IMAGE
        kinds[ids == c.video_token_id] = VIDEO
        positions = torch.empty(3, *ids.shape, dtype=torch.long)
        for b in range(ids.shape[0]):
            row = kinds[b]
            cuts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist(), len(row)]
            chunks, p = [], 0
            for s, e in zip(cuts, cuts[1:]):
                kind = int(row[s])
                if kind == TEXT:
                    chunks.append(torch.arange(p, p + e - s).expand(3, -1))
                    p += e - s
                    continue
                if kind == IMAGE and s > 0 and ids[b, s - 1] == c.video_start_token_id:
                    kind = VIDEO  # the original processor marks video patches as image ones
                    row[s:e] = VIDEO
                covered = s  # a run may hold several items back to back
                while covered < e:
                    grid = next(grids[kind], None)
                    if grid is None:
                        name = "image" if kind == IMAGE else "video"
                        raise ValueError(f"the prompt has more {name} placeholders than grids")
                    t, h, w = grid[0] // 2 if kind == VIDEO else 1, grid[1] // merge, grid[2] // merge
                    steps = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                    chunks.append(torch.stack(steps).flatten(1) + p)
                    p += max(h, w)
                    covered += t * h * w
                if covered != e:
                    raise ValueError(f"placeholder run of {e - s} tokens does not match its grids ({covered - s})")
            positions[:, b] = torch.cat(chunks, dim=1)
        return kinds.to(input_ids.device), positions

    def insert_media(
        self, x: torch.Tensor, kinds: torch.Tensor, pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, kind: int
    ) -> torch.Tensor:
        """Encode the images (or videos) and write their tokens over the placeholders, in order."""
        name = "image" if kind == IMAGE else "video"
        mask = kinds == kind
        count = int(mask.sum())
        if pixels is None:
            if count:
                raise ValueError(f"the prompt has {count} {name} placeholders but no {name} pixels")
            return x
        grids = grid_thw.tolist()
        features = self.resampler_model(self.vision_model(pixels, grids), grids)
        if features.shape[0] != count:
            raise ValueError(f"{features.shape[0]} {name} tokens from the pixels, {count} placeholders in the prompt")
        x[mask] = features.to(x.device, x.dtype)
        return x

    def checkpoint_targets(self, names: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """The hub's names and those transformers' save_pretrained writes: they differ only in
        the tower's prefix (`vision_model.` or `model.vision_model.`). Routers are stored [d, E].
        Files in transformers' module names (`model.language_model.` ...) load as well."""
        if any(".language_model." in n for n in names):
            return self.transformers_targets()
        tower = "model.vision_model." if any(n.startswith("model.vision_model.") for n in names) else "vision_model."
        targets = {}
        for name, tensor in super().checkpoint_targets().items():
            if name.startswith("vision_model."):
                name = tower + name.removeprefix("vision_model.")
            elif name.startswith("resampler_model."):
                name = "model." + name
            elif name.endswith((".mlp.gate.weight", ".mlp.gate.weight_1")):
                tensor = tensor.T
            targets[name] = tensor
        return targets

    def transformers_targets(self) -> dict[str, torch.Tensor]:
        targets = {}
        for name, tensor in self.named_parameters():
            for pattern, replacement in TRANSFORMERS_NAMES:
                name = re.sub(pattern, replacement, name)
            if name.endswith(".mlp.moe_statics.e_score_correction_bias"):  # one [1, E] row per modality
                stem = name.removesuffix("moe_statics.e_score_correction_bias")
                targets[f"{stem}text_moe.gate.moe_statics.e_score_correction_bias"] = tensor[:1]
                targets[f"{stem}vision_moe.gate.moe_statics.e_score_correction_bias"] = tensor[1:]
            else:
                targets[name] = tensor
        return targets
