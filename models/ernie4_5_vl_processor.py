"""Image, video and prompt processing for ERNIE 4.5 VL, as transformers' Ernie4_5_VLMoeProcessor.

Outputs match transformers 5.23 with its default (torchvision) backend: images are resized on
uint8 tensors with torch's bicubic antialias kernel (what torchvision runs on CPU), normalised in
float32 and cut into rows of 3·14·14 values in the order the vision tower expects. Videos are
sampled, stamped with their time and cut the same way, two frames per temporal patch. Prompts go
through the checkpoint's chat template; each placeholder becomes one token per merged patch.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .chat_template import Span
from .hub import VL_FILES, resolve_checkpoint
from .media import ImageSource, MediaError, VideoInfo, load_image, read_video
from .tokenizer import Tokenizer, load_tokenizer

# What load_processor fetches from a hub repo: the VL files without the weights.
PROCESSOR_FILES = [name for name in VL_FILES if "safetensors" not in name and name != "config.json"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Token strings of the HF v5 VL tokenizer (tokenizer_config.json names them; these are its values).
TOKENS = {
    "image_token": "<|IMAGE_PLACEHOLDER|>",
    "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>",
    "video_end_token": "<|VIDEO_END|>",
}


@dataclass
class VisionConfig:
    """Resize limits and normalisation of one processor (preprocessor_config.json keys)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 6177 * 28 * 28
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    patch_size: int = 14
    merge_size: int = 2


@dataclass
class VideoConfig(VisionConfig):
    """Frame sampling and timestamp drawing on top of the per-frame limits.

    `fps` None samples up to `max_frames` frames evenly over the clip (transformers' behaviour
    without an fps); the default 2 is the rate the model was trained with."""

    min_pixels: int = 299 * 28 * 28
    max_pixels: int = 1196 * 28 * 28
    temporal_patch_size: int = 2
    fps: float | None = 2.0
    min_frames: int = 16
    max_frames: int = 180
    draw_on_frames: bool = True
    font: str | None = None  # a TrueType file; None uses Pillow's built-in font


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the model sees: multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as far as rounding allows. Python's round() (banker's) as the reference."""
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise MediaError(
            f"Images must not be more than {MAX_ASPECT_RATIO} times longer than wide; this one is {width}x{height}."
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialias resize of uint8 [N, C, H, W], computed on uint8 as torchvision does on CPU
    (a float round trip differs by up to 11 levels). An unchanged size is returned as is."""
    if tuple(images.shape[-2:]) == size:
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def normalize(images: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """float32 (x − mean/r) / (std/r) with r the rescale factor: torchvision's fused rescale."""
    mean = torch.tensor(config.mean) * (1.0 / config.rescale_factor)
    std = torch.tensor(config.std) * (1.0 / config.rescale_factor)
    return images.to(torch.float32, copy=True).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))  # in place: 2x faster


def patchify(images: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """[N, C, H, W] → [N·(H/p)·(W/p), C·p·p]: per image, merge blocks row-major, the merge×merge
    patches of a block row-major, each patch channel-major. The resampler merges 4 consecutive rows."""
    n, c, height, width = images.shape
    gh, gw = height // patch, width // patch
    blocks = images.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    return blocks.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(n * gh * gw, c * patch * patch)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [1, 3, H, W] of an RGB image."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()[None]


def sample_frame_indices(info: VideoInfo, fps: float | None, min_frames: int, max_frames: int) -> list[int]:
    """Frame indices as transformers samples: n = duration·fps (every frame without an fps),
    clamped to [min_frames, max_frames] and to the clip, then a float-step arange, truncated."""
    total = info.total_frames
    wanted = total / info.fps * fps if fps is not None else total
    wanted = min(max(wanted, min_frames), max_frames, total)
    return torch.arange(0, total, total / wanted).int().tolist()


def timestamp_text(seconds: float) -> str:
    """`time: HH:MM:SS.ss`, the label drawn on each frame."""
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{rest:05.2f}"


def draw_timestamp(frame: Image.Image, text: str, font: str | None) -> Image.Image:
    """Black text with a white outline in the top-left corner, 10 % of the short side high."""
    size = int(0.1 * min(frame.size))
    face = ImageFont.truetype(font, size) if font else ImageFont.load_default(size)
    ImageDraw.Draw(frame).text((0, 0), text, font=face, fill=(0, 0, 0), stroke_width=int(0.1 * size), stroke_fill=(255, 255, 255))
    return frame


@dataclass
class SampledVideo:
    """A video as the model sees it: the sampled frames (timestamps drawn, resized) with their
    indices in the source and times in seconds, for showing next to the answer."""

    frames: list[Image.Image]
    indices: list[int]
    timestamps: list[float]
    source: VideoInfo


class VLInputs(dict):
    """Model inputs under transformers' keys (input_ids, attention_mask, mm_token_type_ids,
    moe_mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw);
    `videos` keeps each video's sampled frames for display."""

    def __init__(self, data: dict[str, torch.Tensor], videos: list[SampledVideo]) -> None:
        super().__init__(data)
        self.videos = videos


@dataclass
class Ernie45VLProcessor:
    tokenizer: Tokenizer
    image: VisionConfig = field(default_factory=VisionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))

    def __post_init__(self) -> None:
        self.token_ids = {}
        for name, token in self.tokens.items():
            token_id = self.tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token} token; is this an ERNIE 4.5 VL checkpoint?")
            self.token_ids[name] = token_id

    def process_images(self, images: Sequence[ImageSource]) -> dict[str, torch.Tensor]:
        """pixel_values [Σ patches, 588] and image_grid_thw [n, 3] of RGB-converted images."""
        config, rows, grids = self.image, [], []
        factor = config.patch_size * config.merge_size
        for source in images:
            pixels = image_tensor(load_image(source))
            size = smart_resize(*pixels.shape[-2:], factor, config.min_pixels, config.max_pixels)
            rows.append(patchify(normalize(resize_uint8(pixels, size), config), config.patch_size, config.merge_size))
            grids.append([1, size[0] // config.patch_size, size[1] // config.patch_size])
        return {"pixel_values": torch.cat(rows), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def sample_video(self, path: str | os.PathLike, fps: float | None = None, max_frames: int | None = None) -> SampledVideo:
        """Decode and sample `path`, draw timestamps at the source resolution and resize each
        frame to the per-frame limits. `fps` / `max_frames` override the checkpoint's."""
        config = self.video
        fps = config.fps if fps is None else fps
        max_frames = config.max_frames if max_frames is None else max_frames
        info, indices, frames = read_video(path, lambda info: sample_frame_indices(info, fps, config.min_frames, max_frames))
        factor = config.patch_size * config.merge_size
        size = smart_resize(info.height, info.width, factor, config.min_pixels, config.max_pixels)
        timestamps = [index / info.fps for index in indices]
        resized = []
        for frame, seconds in zip(frames, timestamps):
            if config.draw_on_frames:
                draw_timestamp(frame, timestamp_text(seconds), config.font)
            pixels = resize_uint8(image_tensor(frame), size)
            resized.append(Image.fromarray(pixels[0].permute(1, 2, 0).numpy()))
        return SampledVideo(resized, indices, timestamps, info)

    def process_video(self, video: SampledVideo) -> dict[str, torch.Tensor]:
        """pixel_values_videos [T·gh·gw, 588] (frame-major) and video_grid_thw [1, 3]; an odd
        frame count repeats the last frame, as temporal patches pair frames."""
        config = self.video
        frames = video.frames + video.frames[-1:] * (len(video.frames) % config.temporal_patch_size)
        width, height = frames[0].size
        per_frame = (height // config.patch_size) * (width // config.patch_size)
        out = torch.empty(len(frames) * per_frame, 3 * config.patch_size**2)
        for t, frame in enumerate(frames):  # frame by frame: peak memory stays near the output's
            out[t * per_frame : (t + 1) * per_frame] = patchify(normalize(image_tensor(frame), config), config.patch_size, config.merge_size)
        grid = [len(frames), height // config.patch_size, width // config.patch_size]
        return {"pixel_values_videos": out, "video_grid_thw": torch.tensor([grid], dtype=torch.long)}

    def __call__(
        self,
        text: str,
        images: Sequence[ImageSource] = (),
        videos: Sequence[str | os.PathLike | SampledVideo] = (),
        fps: float | None = None,
        max_frames: int | None = None,
        text_spans: Sequence[Span] = (),
    ) -> VLInputs:
        """Encode a rendered prompt holding one image / video placeholder per item, in order
        (`text_spans`: the user's text, where typed special tokens stay text; see Tokenizer.encode)."""
        ids_of = self.token_ids
        ids = self.tokenizer.encode(text, add_special_tokens=True, text_spans=text_spans)
        if ids.count(ids_of["image_token"]) != len(images) or ids.count(ids_of["video_token"]) != len(videos):
            raise ValueError(
                f"the prompt has {ids.count(ids_of['image_token'])} image and {ids.count(ids_of['video_token'])} video "
                f"placeholders for {len(images)} images and {len(videos)} videos"
            )
        data: dict[str, torch.Tensor] = {}
        merge = self.image.merge_size**2
        if images:
            data.update(self.process_images(images))
            ids = _expand(ids, ids_of["image_token"], (data["image_grid_thw"].prod(-1) // merge).tolist())
        sampled = [v if isinstance(v, SampledVideo) else self.sample_video(v, fps, max_frames) for v in videos]
        if sampled:
            outputs = [self.process_video(v) for v in sampled]
            data["pixel_values_videos"] = torch.cat([o["pixel_values_videos"] for o in outputs])
            data["video_grid_thw"] = torch.cat([o["video_grid_thw"] for o in outputs])
            counts = (data["video_grid_thw"].prod(-1) // (self.video.merge_size**2 * self.video.temporal_patch_size)).tolist()
            ids = _expand(ids, ids_of["video_token"], counts)
        ids = torch.tensor([ids], dtype=torch.long)
        mm_types = torch.zeros_like(ids)
        mm_types[ids == ids_of["image_token"]] = 1
        mm_types[ids == ids_of["video_token"]] = 2
        # The MoE routes the start/end delimiters to the vision experts too.
        moe_types = mm_types.clone()
        moe_types[(ids == ids_of["image_start_token"]) | (ids == ids_of["image_end_token"])] = 1
        moe_types[(ids == ids_of["video_start_token"]) | (ids == ids_of["video_end_token"])] = 2
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm_types,
                  "moe_mm_token_type_ids": moe_types, **data}
        return VLInputs(inputs, sampled)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> VLInputs:
        """Render `messages` with the checkpoint's template and encode them with their media.

        Content is a string or a list of parts: {"type": "text", "text"}, {"type": "image",
        "image": PIL image or path} and {"type": "video", "video": path}, as transformers takes
        them ("path" / "url" naming a local file work too). `enable_thinking` False closes the
        think block in the generation prompt, as the PT model expects."""
        images, videos = [], []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else ():
                kind = part.get("type")
                source = part.get(kind, part.get("path", part.get("url")))
                if kind in ("image", "image_url"):
                    images.append(source)
                elif kind in ("video", "video_url"):
                    videos.append(source)
        prompt, spans = self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        return self(prompt, images, videos, fps=fps, max_frames=max_frames, text_spans=spans)


def _expand(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """Replace the i-th `token` by counts[i] copies of it."""
    counts = iter(counts)
    return [copy for i in ids for copy in ([i] * next(counts) if i == token else [i])]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _vision_fields(config: dict) -> dict:
    """VisionConfig fields from a processor config: HF v5 `size.shortest_edge/longest_edge`,
    or the original `min_pixels/max_pixels` (top level or under `size`)."""
    size = config.get("size") or {}
    fields = {
        "min_pixels": size.get("shortest_edge", size.get("min_pixels", config.get("min_pixels"))),
        "max_pixels": size.get("longest_edge", size.get("max_pixels", config.get("max_pixels"))),
        "mean": config.get("image_mean"),
        "std": config.get("image_std"),
        "rescale_factor": config.get("rescale_factor"),
        "patch_size": config.get("patch_size"),
        "merge_size": config.get("merge_size"),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    for key in ("mean", "std"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return fields


def load_processor(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Ernie45VLProcessor:
    """The VL processor of a checkpoint folder or hub repo: processor_config.json (transformers v5
    nests both processors there) or preprocessor_config.json + video_preprocessor_config.json, the
    tokenizer, and the timestamp font the video config names (Pillow's font when it is absent)."""
    folder = resolve_checkpoint(path_or_repo_id, revision, allow_patterns=PROCESSOR_FILES)
    nested = _read_json(folder / "processor_config.json")
    image_config = nested.get("image_processor") or _read_json(folder / "preprocessor_config.json")
    video_config = nested.get("video_processor") or _read_json(folder / "video_preprocessor_config.json")
    video = {
        **_vision_fields(video_config),
        **{k: video_config[k] for k in ("temporal_patch_size", "min_frames", "max_frames", "draw_on_frames") if video_config.get(k) is not None},
    }
    if video_config.get("fps") is not None:
        video["fps"] = float(video_config["fps"])
    font = folder / Path(video_config.get("font") or "Roboto-Regular.ttf").name
    video["font"] = str(font) if font.is_file() else None
    tokenizer = load_tokenizer(folder)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"{folder} holds an ErnieM tokenizer, not an ERNIE 4.5 VL one")
    tokens = {name: tokenizer.config.get(name) or default for name, default in TOKENS.items()}
    return Ernie45VLProcessor(tokenizer, VisionConfig(**_vision_fields(image_config)), VideoConfig(**video), tokens)
