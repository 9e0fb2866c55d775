"""Fixtures for the VL processor tests: a tiny checkpoint folder in the HF v5 VL layout, small
videos written with PyAV, and the parts of transformers' VL processor that import here.

transformers' Ernie4_5_VLMoe video processor imports torchvision at module level, and the only
torchvision wheel for this torch does not load (see shared/reference/architecture.md §8.19).
`reference_video_processor` loads that module with a stand-in for the two torchvision helpers it
calls outside resizing (`to_pil_image`, `pil_to_tensor`: plain uint8 CHW <-> PIL conversions), so
its own `sample_frames`, `_convert_timestamp`, `_render_image_with_timestamp` and `_preprocess`
(patch layout) run unchanged. Resizing is never taken from the stand-in.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageFont
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from models.ernie4_5_vl_processor import TOKENS
from models.factory import write_tokenizer_files

VL_SPECIAL_TOKENS = [
    TOKENS["image_token"], TOKENS["image_start_token"], TOKENS["image_end_token"],
    TOKENS["video_start_token"], TOKENS["video_end_token"], TOKENS["video_token"], "<think>", "</think>",
]

# The shape of the HF v5 VL template (architecture.md §4.5): `User: ` + parts without separators,
# numbered Picture / Video markers, a closed think block unless enable_thinking.
VL_TEMPLATE = """\
{%- set count = namespace(image=0, video=0) -%}
{{- '<|begin_of_sentence|>' -}}
{%- for message in messages -%}
  {%- if message.role in ['system', 'user'] -%}
    {%- if message.role == 'user' %}User: {% endif -%}
    {%- if message.content is string -%}{{ message.content }}
    {%- else -%}
      {%- for part in message.content -%}
        {%- if part.type == 'text' -%}{{ part.text }}
        {%- elif part.type in ['image', 'image_url'] -%}
          {%- set count.image = count.image + 1 -%}
          Picture {{ count.image }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>
        {%- elif part.type in ['video', 'video_url'] -%}
          {%- set count.video = count.video + 1 -%}
          Video {{ count.video }}:<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {%- if message.role == 'system' %}{{ '\\n' }}{% endif -%}
  {%- elif message.role == 'assistant' -%}
    {{- '\\nAssistant: ' + message.content + '<|end_of_sentence|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '\\nAssistant: ' -}}
  {{- '<think>' if (enable_thinking is defined and enable_thinking) else '<think>\\n\\n</think>\\n\\n' -}}
{%- endif -%}"""

FONT_NAME = "Roboto-Regular.ttf"


def write_vl_tokenizer(folder: Path) -> None:
    """The factory tokenizer plus the VL special tokens, saved as the HF v5 VL repo saves it
    (tokenizer.json, added tokens in tokenizer_config.json, `image_token` etc. named there)."""
    write_tokenizer_files(folder)
    (folder / "tokenizer.model").unlink()  # the v5 repo's tokenizer.json is the source of truth
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in VL_SPECIAL_TOKENS])
    backend.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for token in VL_SPECIAL_TOKENS:
        config["added_tokens_decoder"][str(backend.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
    config["additional_special_tokens"] = config["additional_special_tokens"] + VL_SPECIAL_TOKENS
    config.update(TOKENS, chat_template=VL_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_font(path: Path) -> None:
    """A TrueType file standing in for the checkpoint's Roboto (Pillow's bundled font)."""
    path.write_bytes(ImageFont.load_default(10).path.getvalue())


def write_vl_processor_checkpoint(folder: Path, nested: bool = False) -> Path:
    """Tokenizer, processor configs (per-processor files, or v5's nested processor_config.json)
    and the font, with the values transformers writes for the real checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    write_vl_tokenizer(folder)
    write_font(folder / FONT_NAME)
    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "patch_size": 14, "merge_size": 2}
    image = {**clip, "image_processor_type": "Ernie4_5_VLMoeImageProcessor", "temporal_patch_size": 1,
             "size": {"shortest_edge": 56 * 56, "longest_edge": 6177 * 28 * 28}}
    video = {**clip, "video_processor_type": "Ernie4_5_VLMoeVideoProcessor", "temporal_patch_size": 2,
             "size": {"shortest_edge": 299 * 28 * 28, "longest_edge": 1196 * 28 * 28}, "min_frames": 16,
             "max_frames": 180, "do_sample_frames": True, "draw_on_frames": True, "font": FONT_NAME, "fps": None}
    if nested:
        (folder / "processor_config.json").write_text(json.dumps({"image_processor": image, "video_processor": video}))
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(image))
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    return folder


def write_video(path: Path, seconds: float, fps: Fraction | int, size: tuple[int, int] = (64, 48), codec: str = "mpeg4") -> Path:
    """A clip whose frames differ (a moving gradient), so a wrong frame index shows in the pixels."""
    width, height = size
    count = round(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()  # writes the header even for a clip without frames
        y, x = np.mgrid[0:height, 0:width]
        for i in range(count):
            rgb = np.stack([(x * 4 + i * 7) % 256, (y * 5 + i * 3) % 256, np.full_like(x, (i * 11) % 256)], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    return module


def reference_video_processor(font: str):
    """transformers' Ernie4_5_VLMoeVideoProcessor class and an instance usable with its sampling,
    timestamp, drawing and layout methods (see the module docstring)."""
    import transformers
    import transformers.video_processing_utils  # noqa: F401  (import before the stand-in is visible)

    functional = _module(
        "torchvision.transforms.functional",
        pil_to_tensor=lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(),
        to_pil_image=lambda tensor: Image.fromarray(tensor.permute(1, 2, 0).numpy()),
    )
    stand_in = {
        "torchvision": _module("torchvision"),
        "torchvision.transforms": _module("torchvision.transforms", functional=functional),
        "torchvision.transforms.functional": functional,
        "torchvision.transforms.v2": _module("torchvision.transforms.v2"),
        "torchvision.transforms.v2.functional": _module("torchvision.transforms.v2.functional"),
    }
    package = Path(transformers.__file__).parent / "models" / "ernie4_5_vl_moe"
    names = {stem: f"transformers.models.ernie4_5_vl_moe.{stem}" for stem in ("image_processing_ernie4_5_vl_moe", "video_processing_ernie4_5_vl_moe")}
    saved = {name: sys.modules.get(name) for name in [*stand_in, *names.values()]}
    try:  # visible only while the two files execute, so nothing else sees a torchvision
        sys.modules.update(stand_in)
        for stem, name in names.items():
            spec = importlib.util.spec_from_file_location(name, package / f"{stem}.py")
            sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        cls = sys.modules[names["video_processing_ernie4_5_vl_moe"]].Ernie4_5_VLMoeVideoProcessor
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    processor = object.__new__(cls)  # no __init__: it needs torchvision; the methods used read only these
    processor.__dict__.update(num_frames=None, font=font)
    return cls, processor
