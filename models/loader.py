"""Load official hub checkpoints (config.json + single or sharded safetensors, or the
pytorch_model.bin that older repos such as ErnieM's ship) into our models.

The model class comes from config.json's architecture. It is built on the meta device, checked
against the files' tensor names and shapes before any memory is allocated, then materialised
directly on the target device and filled one tensor at a time from the memory-mapped files: no
second full copy of the weights in host memory. A .bin is read with torch's weights-only
unpickler, which rebuilds tensors and plain containers only, never arbitrary objects.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .ernie4_5 import DENSE_ARCHITECTURES, MOE_ARCHITECTURES, Ernie45ForCausalLM
from .ernie4_5_vl import VL_ARCHITECTURES, Ernie45VLForConditionalGeneration
from .ernie_m import ErnieMForSequenceClassification, ErnieMModel
from .compiled import CompiledDecode, compile_wanted
from .hub import resolve_checkpoint
from .quantize import QUANTIZE_MODES, quantize_int8

# config.json `architectures[0]` -> model class. A class provides `config_class.from_dict(raw)`,
# `cast`, `checkpoint_targets(names)` (its tensors keyed as a file with those names stores them),
# `ignores_checkpoint_key` and `may_miss_checkpoint_key`.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    **dict.fromkeys(DENSE_ARCHITECTURES + MOE_ARCHITECTURES, Ernie45ForCausalLM),
    **dict.fromkeys(VL_ARCHITECTURES, Ernie45VLForConditionalGeneration),
    "ErnieMModel": ErnieMModel,
    "ErnieMForSequenceClassification": ErnieMForSequenceClassification,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it declares."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16, the checkpoints' own dtype: half the bytes per decoded token. On a CPU without native
    bf16 matmuls (oneDNN reports them) bf16 is slower than fp32, so fp32 there."""
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return torch.bfloat16


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    return json.loads(path.read_text())


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, driven by the index when it is sharded: safetensors when
    there are any, else pytorch_model.bin."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pdparams", ".pt"))
    hint = f" (found {', '.join(others)})" if others else ""
    raise CheckpointError(f"{folder} has no model.safetensors, pytorch_model.bin or index of either{hint}")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin through the weights-only unpickler, memory-mapped unless it is in the
    pre-1.6 (non-zip) format, which cannot be."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:  # a corrupt or unsafe file: torch raises several types
        raise CheckpointError(f"{file} is not a readable PyTorch weights file: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}
    return {key: list(t.shape) for key, t in _load_bin(file).items()}


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a weight file, one tensor at a time."""
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from _load_bin(file).items()


def model_class(raw: dict) -> type[nn.Module]:
    """The model class of a config.json, by its declared architecture."""
    architecture = (raw.get("architectures") or ["<none>"])[0]
    if architecture not in MODEL_CLASSES:
        raise CheckpointError(
            f"architecture {architecture!r} is not supported by load_model "
            f"(supported: {', '.join(MODEL_CLASSES)})"
        )
    return MODEL_CLASSES[architecture]


def check_tensors(model: nn.Module, headers: dict[str, list[int]]) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    targets = model.checkpoint_targets(headers)
    missing = [k for k in targets if k not in headers and not model.may_miss_checkpoint_key(k)]
    unexpected = [k for k in headers if k not in targets and not model.ignores_checkpoint_key(k)]
    misshaped = [
        f"{k}: file {tuple(shape)}, model {tuple(targets[k].shape)}"
        for k, shape in headers.items()
        if k in targets and tuple(shape) != tuple(targets[k].shape)
    ]
    problems = [
        (f"{len(missing)} missing", missing),
        (f"{len(unexpected)} unexpected", unexpected),
        (f"{len(misshaped)} with a wrong shape", misshaped),
    ]
    lines = [f"{title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "") for title, items in problems if items]
    if lines:
        raise CheckpointError("checkpoint does not match its config.json; tensors " + "; ".join(lines))


def load_model(
    path_or_repo_id: str | os.PathLike,
    device: str | torch.device | dict[str, str | torch.device] | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    quantize: str | None = None,
    compile_decode: bool | None = None,
) -> nn.Module:
    """Load an ERNIE checkpoint (hub id or local folder) ready for inference: the model class
    follows config.json's `architectures` (see MODEL_CLASSES): ERNIE 4.5 text or VL, or ErnieM.

    `device` is one device, or a device map {module name: device} (as accelerate's
    `infer_auto_device_map` produces; "" is the whole model) to split a model by layers.
    `quantize="int8"` stores an ERNIE 4.5 model's linear layers and head as int8 with
    per-channel scales (CPU; see models.quantize). `compile_decode` compiles the one-token decode
    step in the background (models.compiled); None: by default for dense text models on the CPU,
    unless ERNIE_STUDIO_COMPILE=0."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    folder = resolve_checkpoint(path_or_repo_id, revision)
    raw = read_config(folder)
    cls = model_class(raw)
    config = cls.config_class.from_dict(raw)
    device_map = device if isinstance(device, dict) else {"": device if device is not None else default_device()}
    devices = [torch.device(d) for d in device_map.values()]
    dtype = dtype or default_dtype(next((d for d in devices if d.type != "cpu"), devices[0]))

    with torch.device("meta"):
        model = cls(config)
    model.cast(dtype).requires_grad_(False).eval()
    files = weight_files(folder)
    headers: dict[str, list[int]] = {}
    for file in files:
        headers.update(tensor_shapes(file))
    check_tensors(model, headers)

    for name, module_device in device_map.items():
        model.get_submodule(name).to_empty(device=module_device)
    unplaced = [name for name, p in model.named_parameters() if p.is_meta]
    if unplaced:
        raise ValueError(f"device map leaves {len(unplaced)} tensors unplaced, e.g. {unplaced[0]}")
    targets = model.checkpoint_targets(headers)
    with torch.no_grad():
        for key, target in targets.items():
            if key not in headers:  # allowed to be absent (see may_miss_checkpoint_key)
                target.zero_()
        for file in files:
            for key, tensor in read_tensors(file):
                if key in targets:  # else ignored (see ignores_checkpoint_key)
                    targets[key].copy_(tensor)
    if quantize is not None:
        if not isinstance(model, Ernie45ForCausalLM):
            raise ValueError(f"quantize={quantize!r} applies to ERNIE 4.5 models, not {cls.__name__}")
        quantize_int8(model)
    if compile_wanted(model, compile_decode):
        model.fast_decode = CompiledDecode(model)
    return model
