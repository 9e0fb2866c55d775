"""The models the app offers: hub repos by default, extendable from the CLI or the environment."""
from __future__ import annotations

from dataclasses import dataclass, replace


CHAT, VISION, CLASSIFY = "chat", "vision", "classify"  # the tabs that offer a model


@dataclass(frozen=True)
class ModelSpec:
    """One selectable model. `source` is a hub repo id or a local folder; `params_b` (billions of
    parameters) sizes the placement decision before anything is downloaded; `task` is the tab that
    offers it; `quantize` ("int8", "none", or None for the app's --quantize setting) chooses the
    CPU weight format."""

    name: str
    source: str
    task: str = CHAT
    params_b: float = 0.36
    thinking: bool = False
    random_weights: bool = False
    revision: str | None = None
    quantize: str | None = None

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


def parse_model_entries(text: str) -> list[ModelSpec]:
    """Parse `--models` / ERNIE_STUDIO_MODELS: comma-separated `NAME=SOURCE` or bare `SOURCE`
    entries, where SOURCE is a hub id or a local folder. A NAME of a built-in model points it at
    SOURCE (e.g. a local copy); other names add models. Sizes and tabs of new entries are guessed
    from the name ("21B" → MoE size, "-VL-" → image and video, "ernie-m" → classification)."""
    specs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, source = entry.rpartition("=")
        source = source.strip()
        name = name.strip() or source.rstrip("/").split("/")[-1]
        builtin = next((m for m in DEFAULT_MODELS if m.name == name), None)
        if builtin is not None:
            specs.append(replace(builtin, source=source))
        else:
            both = f"{name} {source}"
            task = CLASSIFY if "ernie-m" in both.lower() else VISION if "-VL-" in both else CHAT
            size = 29.4 if task == VISION else 21.8 if "21B" in both else 0.36
            specs.append(ModelSpec(name, source, task, params_b=size, thinking="Thinking" in name))
    return specs


def build_registry(extra: list[ModelSpec] = (), include_defaults: bool = True) -> dict[str, ModelSpec]:
    """Name → spec, built-ins first; entries in `extra` add to or replace them."""
    registry = {m.name: m for m in DEFAULT_MODELS} if include_defaults else {}
    registry.update({m.name: m for m in extra})
    return registry
