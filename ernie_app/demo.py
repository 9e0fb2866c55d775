"""Demo mode: tiny random-weight checkpoints in the official layout, so the whole app runs
end-to-end anywhere in seconds (no download, no GPU). Replies are gibberish by design."""
from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import replace
from pathlib import Path

from models.factory import GENERATION_CONFIG, tiny_config, write_checkpoint, write_ernie_m_checkpoint, write_vl_processor_files
from models.hub import studio_cache

from .registry import CLASSIFY, DEFAULT_MODELS, VISION, ModelSpec

DEMO_VERSION = "v2"  # bump when the demo checkpoints change, so stale caches are not reused
# The thinking demo samples differently from the others (the demo's own choice), so that the
# model switcher visibly moves the sampling sliders.
THINKING_GENERATION_CONFIG = {**GENERATION_CONFIG, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
THINKING_TEMPLATE = (
    "{{ cls_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {{ m.content }}{{ sep_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: <think>\n{% endif %}"
)


def demo_dir() -> Path:
    return studio_cache("demo") / DEMO_VERSION


def write_demo_checkpoint(folder: Path, spec: ModelSpec, seed: int) -> None:
    """A tiny random checkpoint of the built-in model `spec`'s family, in its official layout."""
    if spec.task == CLASSIFY:
        write_ernie_m_checkpoint(folder, seed=seed)
        return
    if spec.task == VISION:
        write_checkpoint(folder, tiny_config("vl"), seed=seed)
        write_vl_processor_files(folder)
        return
    write_checkpoint(folder, tiny_config("moe" if "21B" in spec.name else "dense"), seed=seed)
    if spec.thinking:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = THINKING_TEMPLATE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (folder / "generation_config.json").write_text(json.dumps(THINKING_GENERATION_CONFIG, indent=2))


def demo_models() -> list[ModelSpec]:
    """Write (once) a tiny checkpoint for every built-in model; return their specs, named as the
    real models are (the page marks them as demo models)."""
    specs = []
    for seed, builtin in enumerate(DEFAULT_MODELS):
        folder = demo_dir() / builtin.name
        if not (folder / "config.json").is_file():
            write_demo_checkpoint(folder, builtin, seed)
        specs.append(replace(builtin, source=str(folder), params_b=0.001, random_weights=True))
    return specs


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(endpoint, timeout=timeout).close()
        return True
    except OSError:
        return False


def weights_cached(spec: ModelSpec) -> bool:
    """A local folder, or a hub repo whose config is already in the local cache (never a remote engine)."""
    if spec.remote:
        return False
    if Path(spec.source).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec.source, "config.json", revision=spec.revision), str)
