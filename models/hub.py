"""Resolve a hub repo id or a local folder to a local checkpoint folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

# Everything a text checkpoint needs, and nothing else (no .bin, no Paddle weights, no remote code).
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
]
# ErnieM repos: safetensors if any, else their pytorch_model.bin; the tokenizer's vocab.txt and
# SentencePiece model.
ERNIE_M_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
PICKLED_WEIGHTS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
# ERNIE 4.5 VL repos: the text checkpoint's files plus the image/video processor configs and the
# font the video processor draws timestamps with.
VL_FILES = CHECKPOINT_FILES + [
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "*.ttf",
]


def studio_cache(name: str) -> Path:
    """A folder of our own cache, $ERNIE_STUDIO_CACHE (default ~/.cache/ernie-studio): converted
    tokenizers, built kernels, demo checkpoints."""
    root = os.environ.get("ERNIE_STUDIO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ernie-studio"
    return Path(root) / name


def checkpoint_files(config: dict) -> tuple[list[str], list[str]]:
    """(files to fetch, files to fetch only when those bring no safetensors) for a config.json."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture.startswith("ErnieM"):
        return ERNIE_M_FILES, PICKLED_WEIGHTS
    if architecture.startswith("Ernie4_5_VL"):
        return VL_FILES, []
    return CHECKPOINT_FILES, []


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local folder for `path_or_repo_id`.

    An existing folder is used as is. Anything else is treated as a hub repo id: its config.json
    is fetched first to choose the family's files (unless `allow_patterns` names them), then
    those, with `huggingface_hub`, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE
    (offline it answers from the cache or raises).
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; expected a checkpoint folder or a hub repo id")
    from huggingface_hub import hf_hub_download, snapshot_download  # imported lazily: only hub ids need it

    repo_id = str(path_or_repo_id)
    fallback: list[str] = []
    if allow_patterns is None:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        allow_patterns, fallback = checkpoint_files(config)
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    if fallback and not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=fallback))
    return folder
