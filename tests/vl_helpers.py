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
from PIL import Image
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from models.ernie4_5_vl_processor import TOKENS
from models.factory import VL_FONT_NAME, VL_TEMPLATE, write_tokenizer_files, write_vl_processor_files

VL_SPECIAL_TOKENS = [
    TOKENS["image_token"], TOKENS["image_start_token"], TOKENS["image_end_token"],
    TOKENS["video_start_token"], TOKENS["video_end_token"], TOKENS["video_token"], "<think>", "</think>",
]

FONT_NAME = VL_FONT_NAME


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


def write_vl_processor_checkpoint(folder: Path, nested: bool = False) -> Path:
    """Tokenizer, processor configs (per-processor files, or v5's nested processor_config.json)
    and the font, with the values transformers writes for the real checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    write_vl_tokenizer(folder)
    return write_vl_processor_files(folder, nested)


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
