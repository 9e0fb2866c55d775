"""Resolve a hub repo id or a local folder to a local checkpoint folder."""
from __future__ import annotations

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


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local folder for `path_or_repo_id`.

    An existing folder is used as is. Anything else is treated as a hub repo id and fetched with
    `huggingface_hub.snapshot_download`, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE
    (offline it answers from the cache or raises).
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; expected a checkpoint folder or a hub repo id")
    from huggingface_hub import snapshot_download  # imported lazily: only hub ids need it

    repo_id = str(path_or_repo_id)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns or CHECKPOINT_FILES))
