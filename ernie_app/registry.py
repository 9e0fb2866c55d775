"""The models the app offers: hub repos by default, extendable from the CLI or the environment."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit


CHAT, VISION, CLASSIFY = "chat", "vision", "classify"  # the tabs that offer a model


@dataclass(frozen=True)
class ModelSpec:
    """One selectable model. `source` is a hub repo id, a local folder or the /v1 base URL of an
    OpenAI-compatible engine; `params_b` (billions of parameters) sizes the placement decision
    before anything is downloaded; `task` is the tab that offers it; `quantize` ("int8", "none",
    or None for the app's --quantize setting) chooses the CPU weight format."""

    name: str
    source: str
    task: str = CHAT
    params_b: float = 0.36
    thinking: bool = False
    random_weights: bool = False
    revision: str | None = None
    quantize: str | None = None
    served_id: str | None = None  # the model id a remote engine serves; None asks its /v1/models

    @property
    def remote(self) -> bool:
        """Served by an engine elsewhere (vLLM, FastDeploy, SGLang): nothing to download or load here."""
        return self.source.startswith(("http://", "https://"))

    @property
    def label(self) -> str:
        """The name shown in the page; the API always uses `name`, in every mode."""
        return f"{self.name} · demo, random weights" if self.random_weights else self.name

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        return int(self.params_b * 1e9 * bytes_per_param)


DEFAULT_MODELS = [
    ModelSpec("ERNIE-4.5-0.3B-PT", "baidu/ERNIE-4.5-0.3B-PT", params_b=0.36),
    ModelSpec("ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-21B-A3B-PT", params_b=21.8),
    ModelSpec("ERNIE-4.5-21B-A3B-Thinking", "baidu/ERNIE-4.5-21B-A3B-Thinking", params_b=21.8, thinking=True),
    ModelSpec("ERNIE-4.5-VL-28B-A3B-PT", "baidu/ERNIE-4.5-VL-28B-A3B-PT", VISION, params_b=29.4),
    ModelSpec("ERNIE-4.5-VL-28B-A3B-Thinking", "baidu/ERNIE-4.5-VL-28B-A3B-Thinking", VISION, params_b=29.4, thinking=True),
    ModelSpec("ernie-m-large-mnli-xnli", "MoritzLaurer/ernie-m-large-mnli-xnli", CLASSIFY, params_b=0.56),
    ModelSpec("ernie-m-base-mnli-xnli", "MoritzLaurer/ernie-m-base-mnli-xnli", CLASSIFY, params_b=0.28),
]


def models_for(registry: dict[str, ModelSpec], task: str) -> list[str]:
    """Names of the registry's models that `task`'s tab offers, in registry order."""
    return [name for name, spec in registry.items() if spec.task == task]


REMOTE_ENTRY = re.compile(r"(?:([^=]*)=)?(https?://[^#]+)(?:#(.+))?")


def split_entry(entry: str) -> tuple[str, str, str | None]:
    """(name, source, served id) of one `--models` entry. A URL may hold "=" and ends at "#"; an
    entry without a name is named after the served id, the repo or folder, or the engine's host."""
    remote = REMOTE_ENTRY.fullmatch(entry)
    if remote:
        name, source, served = remote.groups()
        served = served and served.strip()
        fallback = served or urlsplit(source.strip()).netloc
    else:
        name, _, source = entry.rpartition("=")
        served = None
        fallback = source.strip()
    return (name or "").strip() or fallback.rstrip("/").split("/")[-1], source.strip(), served


def parse_model_entries(text: str) -> list[ModelSpec]:
    """Parse `--models` / ERNIE_STUDIO_MODELS: comma-separated `NAME=SOURCE` or bare `SOURCE`
    entries, where SOURCE is a hub id, a local folder or an OpenAI-compatible engine's base URL
    (`http://HOST:PORT/v1`, optionally `#served-id`). A NAME of a built-in model points it at
    SOURCE (e.g. a local copy); other names add models. Sizes and tabs of new entries are guessed
    from the name and the served id or local source ("21B" → MoE size, "-VL-" → image and video,
    "ernie-m" → classification, "Thinking" → reasoning shown apart)."""
    specs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, source, served = split_entry(entry)
        builtin = next((m for m in DEFAULT_MODELS if m.name == name), None)
        if builtin is not None:
            specs.append(replace(builtin, source=source, served_id=served))
            continue
        spec = ModelSpec(name, source, served_id=served)
        both = f"{name} {served or ('' if spec.remote else source)}"
        task = CLASSIFY if "ernie-m" in both.lower() else VISION if "-VL-" in both else CHAT
        size = 29.4 if task == VISION else 21.8 if "21B" in both else 0.36
        specs.append(replace(spec, task=task, params_b=size, thinking="Thinking" in f"{name} {served or ''}"))
    return specs


def build_registry(extra: list[ModelSpec] = (), include_defaults: bool = True) -> dict[str, ModelSpec]:
    """Name → spec, built-ins first; entries in `extra` add to or replace them."""
    registry = {m.name: m for m in DEFAULT_MODELS} if include_defaults else {}
    registry.update({m.name: m for m in extra})
    return registry
