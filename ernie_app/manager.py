"""Lazy, shared, memory-aware model loading for the app.

A model is loaded on its first request, once, however many requests arrive together (the others
wait for the same load and get its result or its error). It goes to the GPU with the most free
memory, is split by layers across GPUs when no single one can hold it, falls back to the CPU when
small enough, and the least recently used idle model is evicted when memory runs short.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import BatchGenerator, load_model, load_processor, load_tokenizer
from models.factory import GENERATION_CONFIG
from models.hub import resolve_checkpoint
from models.loader import default_dtype, model_class, read_config, weight_files

from .registry import CHAT, ModelSpec

Progress = Callable[[float, str], None]
GPU_HEADROOM = 1.15  # KV cache and activations on top of the weights
GPU_RESERVE_BYTES = 1 << 30
QUANTIZE_SETTINGS = ("auto", "int8", "none")


class ModelUnavailable(RuntimeError):
    """A model that cannot be served now; the message is meant for the user."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    tokenizer: object  # the family's tokenizer (models.load_tokenizer picks it)
    generation_config: dict
    placement: str
    weight_bytes: int
    slots: threading.BoundedSemaphore
    processor: object | None = None  # the VL models' image/video processor
    batcher: BatchGenerator | None = None  # text models: concurrent requests decoded together
    step_lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0

    @property
    def on_cpu(self) -> bool:
        return self.placement == "cpu"


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the stored weights (bf16 on the hub), the basis of the memory estimate."""
    return sum(f.stat().st_size for f in weight_files(folder))


def gpu_free_bytes() -> dict[int, int]:
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def split_by_layers(folder: Path, budgets: dict[int, int]) -> dict[str, str]:
    """A device map placing whole decoder layers on GPUs within their byte budgets."""
    from accelerate import infer_auto_device_map

    raw = read_config(folder)
    cls = model_class(raw)
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(raw)).cast(torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=["DecoderLayer", "EncoderLayer", "VisionBlock"])
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in device_map.items()}


def default_cpu_limit_bytes() -> int:
    """Largest model the CPU may hold: ERNIE_STUDIO_CPU_LIMIT_GB, else half the physical memory."""
    if os.environ.get("ERNIE_STUDIO_CPU_LIMIT_GB"):
        return int(float(os.environ["ERNIE_STUDIO_CPU_LIMIT_GB"]) * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class ModelManager:
    """Serves `LoadedModel`s by name; thread-safe."""

    def __init__(
        self,
        registry: dict[str, ModelSpec],
        cpu_limit_bytes: int | None = None,
        max_concurrency: int = 8,
        quantize: str = "auto",
    ) -> None:
        """`quantize`: the CPU weight format of models whose spec does not choose one: "int8"
        (weight-only, half the bytes per token), "none", or "auto" (int8 for the chat models)."""
        if quantize not in QUANTIZE_SETTINGS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_SETTINGS)}, got {quantize!r}")
        self.quantize = quantize
        self.registry = registry
        self.cpu_limit_bytes = default_cpu_limit_bytes() if cpu_limit_bytes is None else cpu_limit_bytes
        self.max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, Future] = {}

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    @contextmanager
    def use(self, name: str, progress: Progress | None = None) -> Iterator[LoadedModel]:
        """The loaded model, protected from eviction while the block runs."""
        loaded = self.get(name, progress)
        with self._lock:
            loaded.users += 1
        try:
            yield loaded
        finally:
            with self._lock:
                loaded.users -= 1

    def get(self, name: str, progress: Progress | None = None) -> LoadedModel:
        if name not in self.registry:
            raise ModelUnavailable(f"Unknown model {name!r}. Available: {', '.join(self.registry)}")
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            future = self._loading.get(name)
            owner = future is None
            if owner:
                future = self._loading[name] = Future()
        if not owner:
            return future.result()  # the same model, or the same error, as the request loading it
        try:
            loaded = self._load(self.registry[name], progress or (lambda fraction, message: None))
        except BaseException as error:
            with self._lock:
                del self._loading[name]
            future.set_exception(error)
            raise
        with self._lock:
            del self._loading[name]
            self._loaded[name] = loaded
        future.set_result(loaded)
        return loaded

    def unload(self, name: str) -> bool:
        """Free a model's memory (requests still using it keep it alive until they finish)."""
        with self._lock:
            loaded = self._loaded.pop(name, None)
        if loaded is None:
            return False
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def generation_defaults(self, name: str) -> dict:
        """generation_config.json of a model, without loading or downloading it when possible:
        from the loaded model, a local folder or the hub cache; else ERNIE 4.5's published one."""
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded.generation_config
        spec = self.registry[name]
        if spec.remote:  # the engine's own defaults are not known here
            return dict(GENERATION_CONFIG)
        path = Path(spec.source) / "generation_config.json"
        if not path.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.source, "generation_config.json", revision=spec.revision)
            path = Path(cached) if isinstance(cached, str) else None
        return json.loads(path.read_text()) if path is not None else dict(GENERATION_CONFIG)

    def fetch(self, spec: ModelSpec, progress: Progress) -> Path:
        """Download (or find) the checkpoint; hub progress bars are tqdm, which the UI mirrors."""
        if spec.remote:
            raise ModelUnavailable(f"{spec.name} is served by the engine at {spec.source}, which only the Chat, "
                                   "Image and Video tabs talk to; there are no weights of it to load here.")
        progress(0.0, f"Fetching {spec.source}")
        return resolve_checkpoint(spec.source, spec.revision)

    def place(self, folder: Path, spec: ModelSpec) -> str | dict[str, str]:
        """Choose a device (or a device map) for the checkpoint, evicting idle models if needed."""
        stored = checkpoint_bytes(folder)
        while True:
            placement = self._try_place(folder, stored)
            if placement is not None:
                return placement
            if not self._evict_one():
                cpu_gib = self.cpu_limit_bytes / 2**30
                raise ModelUnavailable(
                    f"{spec.name} needs about {stored / 2**30:.1f} GiB for its weights; no GPU has that free "
                    f"and it exceeds the CPU limit of {cpu_gib:.1f} GiB (ERNIE_STUDIO_CPU_LIMIT_GB)."
                )

    def _try_place(self, folder: Path, stored: int) -> str | dict[str, str] | None:
        need = int(stored * GPU_HEADROOM) + GPU_RESERVE_BYTES
        free = gpu_free_bytes()
        if free:
            best = max(free, key=free.get)
            if free[best] >= need:
                return f"cuda:{best}"
            if len(free) > 1 and sum(free.values()) >= need:
                budgets = {i: int((f - GPU_RESERVE_BYTES) / GPU_HEADROOM) for i, f in free.items()}
                return split_by_layers(folder, budgets)
        cpu_bytes = stored * default_dtype(torch.device("cpu")).itemsize // 2
        with self._lock:
            used = sum(m.weight_bytes for m in self._loaded.values() if m.on_cpu)
        return "cpu" if used + cpu_bytes <= self.cpu_limit_bytes else None

    def _evict_one(self) -> bool:
        with self._lock:
            idle = next((name for name, m in self._loaded.items() if m.users == 0), None)
        return idle is not None and self.unload(idle)

    def quantize_mode(self, spec: ModelSpec, placement: str | dict) -> str | None:
        """int8 on the CPU where asked (or "auto" for a chat model: batch-1 decoding streams half
        the bytes, ~1.9x faster on 2 cores; see BENCHMARKS.md); GPUs run bf16."""
        setting = spec.quantize or self.quantize
        if placement != "cpu" or setting == "none":
            return None
        return "int8" if setting == "int8" or spec.task == CHAT else None

    def _load(self, spec: ModelSpec, progress: Progress) -> LoadedModel:
        folder = self.fetch(spec, progress)
        placement = self.place(folder, spec)
        where = placement if isinstance(placement, str) else "split across GPUs"
        progress(0.5, f"Loading {spec.name} on {where}")
        started = time.perf_counter()
        model = load_model(folder, device=placement, quantize=self.quantize_mode(spec, placement))
        processor = load_processor(folder) if getattr(model, "takes_media", False) else None
        tokenizer = processor.tokenizer if processor is not None else load_tokenizer(folder)  # loaded once
        config_path = folder / "generation_config.json"
        generation_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # int8 weights are buffers
        progress(1.0, f"Loaded {spec.name} in {time.perf_counter() - started:.1f} s")
        generates_text = hasattr(model, "forward_step") and processor is None
        return LoadedModel(
            spec, model, tokenizer, generation_config, where, weight_bytes,
            slots=threading.BoundedSemaphore(self.max_concurrency), processor=processor,
            batcher=BatchGenerator(model, slots=self.max_concurrency) if generates_text else None,
        )
