"""Lazy, shared, memory-aware model loading for the app.

A model is loaded on its first request, once, however many requests arrive together (the others
wait for the same load and get its result or its error). It goes to the GPU with the most free
memory, is split by layers across GPUs when no single one can hold it, falls back to the CPU when
small enough, and the least recently used idle model is evicted when memory runs short.

Races. `use` raises a model's user count in the same lock hold that finds it (or that joins the
load in progress, whose publication then counts every request waiting for it), and eviction takes
a model out under the lock only while its count is zero: a request about to use a model never
loses it. Placements are decided one at a time under the lock, and each reserves its bytes on its
device until the model is published or its load fails, so loads in progress cannot together
overcommit a device. (A GPU being loaded meanwhile counts both its allocations and the
reservation: on the safe side.)

Memory. The fit is checked before anything is downloaded, from the size of the weight files (a
local folder's files; for a hub repo its file listing, or the cached snapshot when the hub does
not answer). A model asks for its weights (plus 15% for activations and 1 GiB on a GPU) and a KV
cache budget: `KV_BUDGET_TOKENS` positions at its bytes per position, one conversation at the
app's default context or 4,096 positions for each of eight batch slots. Setting aside the worst
case, every slot at the full context, would keep the 0.3B model off a 16 GB CPU Space, so caches
may grow past the budget; a CPU model then counts its weights plus what its caches hold
(`BatchGenerator.kv_bytes`), and a GPU's measured free memory includes its caches, so later
placements and evictions see that memory.
"""
from __future__ import annotations

import contextvars
import gc
import json
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from models import BatchGenerator, load_model, load_processor, load_tokenizer
from models.factory import GENERATION_CONFIG
from models.hub import checkpoint_files, resolve_checkpoint
from models.loader import CheckpointError, default_dtype, model_class, read_config, weight_files

from .registry import CHAT, ModelSpec

Progress = Callable[[float, str], None]
GPU_HEADROOM = 1.15  # activations on top of the weights
GPU_RESERVE_BYTES = 1 << 30
KV_BUDGET_TOKENS = 32768  # cache positions set aside per model (see the module docstring)
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
    users: int = 0  # requests inside `ModelManager.use`: never evicted while above zero
    kv_budget: int = 0  # bytes set aside for its KV caches when it was placed

    @property
    def on_cpu(self) -> bool:
        return self.placement == "cpu"

    @property
    def memory_bytes(self) -> int:
        """What it holds: the weights, and the KV budget or what its caches hold if more."""
        kv = self.batcher.kv_bytes if self.batcher is not None else 0
        return self.weight_bytes + max(self.kv_budget, kv)


@dataclass
class _Load:
    """A load in progress: its result, and the requests to count as users once it is published."""

    future: Future = field(default_factory=Future)
    users: int = 0


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the stored weights (bf16 on the hub), the basis of the memory estimate."""
    return sum(f.stat().st_size for f in weight_files(folder))


def hub_checkpoint_size(repo_id: str, revision: str | None) -> tuple[dict, int]:
    """config.json and the weight files' bytes of a hub repo, from its file listing: only the
    config is downloaded. When the hub does not answer (offline, no network), the cached snapshot's
    files, which are what the load would read then."""
    from huggingface_hub import HfApi, hf_hub_download

    config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    config = json.loads(config_file.read_text())
    try:
        listing = HfApi().model_info(repo_id, revision=revision, files_metadata=True).siblings
    except Exception as error:  # its types depend on huggingface_hub's version (requests, httpx)
        try:
            return config, checkpoint_bytes(config_file.parent)
        except CheckpointError:
            raise ModelUnavailable(f"Cannot size {repo_id}: the hub does not answer ({error}) and its "
                                   "weights are not in the local cache.") from error
    sizes = {f.rfilename: f.size or 0 for f in listing if f.rfilename.endswith((".safetensors", ".bin"))}
    for patterns in checkpoint_files(config):  # the files resolve_checkpoint fetches, then its fallback
        matched = [size for name, size in sizes.items() if any(fnmatch(name, p) for p in patterns)]
        if matched:
            return config, sum(matched)
    raise CheckpointError(f"{repo_id} has no weight files that the app loads")


def checkpoint_size(spec: ModelSpec) -> tuple[dict, int]:
    """config.json and the stored weights' bytes of a model, without downloading the weights."""
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return read_config(local), checkpoint_bytes(local)
    return hub_checkpoint_size(spec.source, spec.revision)


def kv_budget_bytes(config: dict, device: torch.device) -> int:
    """KV cache bytes set aside for a model: KV_BUDGET_TOKENS positions of keys and values of
    every layer in the dtype it runs in on `device`; none for encoders (ErnieM)."""
    cls = model_class(config)
    if not hasattr(cls, "new_cache"):
        return 0
    c = cls.config_class.from_dict(config)
    per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * default_dtype(device).itemsize
    return KV_BUDGET_TOKENS * per_position


def gpu_bytes_needed(config: dict, stored: int) -> int:
    """GPU memory asked for a model whose weight files hold `stored` bytes (bf16)."""
    return int(stored * GPU_HEADROOM) + kv_budget_bytes(config, torch.device("cuda")) + GPU_RESERVE_BYTES


def cpu_bytes_needed(config: dict, stored: int) -> int:
    """CPU memory counted for such a model: the weights in the CPU's dtype and the KV budget."""
    cpu = torch.device("cpu")
    return stored * default_dtype(cpu).itemsize // 2 + kv_budget_bytes(config, cpu)


def collect_garbage() -> None:
    """Free the memory of models no longer referenced (their modules hold reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_own_thread(fn: Callable, *args):
    """`fn(*args)` on a new thread that ends with it, in the caller's context (Gradio's progress).

    Each thread that runs parallel torch work keeps an OpenMP thread pool while it lives, and with
    more pool threads alive than cores, libgomp stops spinning between parallel regions: on 2 cores
    a GEMV then takes 1.5-1.8x as long. Loading on its own thread leaves the batcher's scheduler the
    only pool, as the request thread that loaded the model lives on to stream its reply."""
    outcome: dict = {}
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome["value"] = context.run(fn, *args)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="model-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def gpu_free_bytes() -> dict[int, int]:
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def split_by_layers(config: dict, budgets: dict[int, int]) -> dict[str, str]:
    """A device map placing whole decoder layers on GPUs within their byte budgets."""
    from accelerate import infer_auto_device_map

    cls = model_class(config)
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config)).cast(torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=["DecoderLayer", "EncoderLayer", "VisionBlock"])
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in device_map.items()}


def default_cpu_limit_bytes() -> int:
    """Memory the CPU's models may take (weights and KV caches): ERNIE_STUDIO_CPU_LIMIT_GB, else
    half the physical memory."""
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
        self._loading: dict[str, _Load] = {}
        self._pending: dict[str, Counter] = {}  # bytes per device reserved by placements in progress

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    @contextmanager
    def use(self, name: str, progress: Progress | None = None) -> Iterator[LoadedModel]:
        """The loaded model, protected from eviction while the block runs."""
        loaded = self._acquire(name, progress)
        try:
            yield loaded
        finally:
            self._release(loaded)

    def get(self, name: str, progress: Progress | None = None) -> LoadedModel:
        """The loaded model, unprotected: it may be evicted once idle (`use` protects it)."""
        loaded = self._acquire(name, progress)
        self._release(loaded)
        return loaded

    def _acquire(self, name: str, progress: Progress | None) -> LoadedModel:
        """The model, loading it if needed, with its user count raised in the lock hold that finds
        it or joins its load, so that no eviction comes in between."""
        if name not in self.registry:
            raise ModelUnavailable(f"Unknown model {name!r}. Available: {', '.join(self.registry)}")
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
                loaded.users += 1
                return loaded
            load = self._loading.get(name)
            owner = load is None
            if owner:
                load = self._loading[name] = _Load()
            load.users += 1
        if not owner:
            return load.future.result()  # the same model, or the same error, as the request loading it
        try:
            loaded = in_own_thread(self._load, self.registry[name], progress or (lambda fraction, message: None))
        except BaseException as error:
            self._end_load(name)
            load.future.set_exception(error)
            raise
        self._end_load(name, loaded, load.users)
        load.future.set_result(loaded)
        return loaded

    def _end_load(self, name: str, loaded: LoadedModel | None = None, users: int = 0) -> None:
        """Drop a load and its reservation, and publish its model if it loaded, in one lock hold:
        its bytes stay counted throughout, and its users are counted before any eviction sees it."""
        with self._lock:
            del self._loading[name]
            self._pending.pop(name, None)
            if loaded is not None:
                loaded.users = users
                self._loaded[name] = loaded

    def _release(self, loaded: LoadedModel) -> None:
        with self._lock:
            loaded.users -= 1

    def unload(self, name: str) -> bool:
        """Free a model's memory (requests still using it keep it alive until they finish)."""
        with self._lock:
            loaded = self._loaded.pop(name, None)
        if loaded is None:
            return False
        del loaded
        collect_garbage()
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
        progress(0.0, f"Fetching {spec.source}")
        return resolve_checkpoint(spec.source, spec.revision)

    def place(self, spec: ModelSpec, config: dict, stored: int) -> str | dict[str, str]:
        """Choose a device (or a device map) for a checkpoint of `stored` bytes and reserve its
        memory until the load of `spec` ends, evicting idle models if needed."""
        while True:
            with self._lock:
                choice = self._try_place(spec.name, config, stored)
                if choice is not None:
                    placement, reservation = choice
                    self._pending[spec.name] = reservation
                    return placement
                evicted = self._pop_idle()
            if evicted is None:
                cpu_gib = self.cpu_limit_bytes / 2**30
                kv_gib = kv_budget_bytes(config, torch.device("cpu")) / 2**30
                raise ModelUnavailable(
                    f"{spec.name} needs about {stored / 2**30:.1f} GiB for its weights and {kv_gib:.1f} GiB for its "
                    f"KV cache; no GPU has that free and it does not fit in the CPU limit of {cpu_gib:.1f} GiB "
                    "(ERNIE_STUDIO_CPU_LIMIT_GB) beside the models in use."
                )
            del evicted
            collect_garbage()

    def _try_place(self, name: str, config: dict, stored: int) -> tuple[str | dict[str, str], Counter] | None:
        """A placement within what loaded models and the other placements in progress leave free,
        with the bytes per device to reserve for it; called with the lock held."""
        reserved = sum((r for other, r in self._pending.items() if other != name), Counter())
        need = gpu_bytes_needed(config, stored)
        free = {i: f - reserved[f"cuda:{i}"] for i, f in gpu_free_bytes().items()}
        if free:
            best = max(free, key=free.get)
            if free[best] >= need:
                return f"cuda:{best}", Counter({f"cuda:{best}": need})
            if len(free) > 1 and sum(free.values()) >= need:
                weights_per_byte = stored / (need - GPU_RESERVE_BYTES)
                budgets = {i: int((f - GPU_RESERVE_BYTES) * weights_per_byte) for i, f in free.items()}
                # The map may fill every GPU up to its budget: all their free memory is reserved.
                return split_by_layers(config, budgets), Counter({f"cuda:{i}": f for i, f in free.items()})
        need = cpu_bytes_needed(config, stored)
        used = sum(m.memory_bytes for m in self._loaded.values() if m.on_cpu) + reserved["cpu"]
        return ("cpu", Counter(cpu=need)) if used + need <= self.cpu_limit_bytes else None

    def _pop_idle(self) -> LoadedModel | None:
        """Take the least recently used model that no request uses out of the loaded ones; called
        with the lock held, so no request can start using it meanwhile."""
        idle = next((name for name, m in self._loaded.items() if m.users == 0), None)
        return None if idle is None else self._loaded.pop(idle)

    def quantize_mode(self, spec: ModelSpec, placement: str | dict) -> str | None:
        """int8 on the CPU where asked (or "auto" for a chat model: batch-1 decoding streams half
        the bytes, at least as fast as compiled bf16 and 1.6x bf16 uncompiled, in less memory;
        see BENCHMARKS.md); GPUs run bf16."""
        setting = spec.quantize or self.quantize
        if placement != "cpu" or setting == "none":
            return None
        return "int8" if setting == "int8" or spec.task == CHAT else None

    def _load(self, spec: ModelSpec, progress: Progress) -> LoadedModel:
        if spec.remote:
            raise ModelUnavailable(f"{spec.name} is served by the engine at {spec.source}, which only the Chat, "
                                   "Image and Video tabs talk to; there are no weights of it to load here.")
        config, stored = checkpoint_size(spec)
        placement = self.place(spec, config, stored)  # before the download: a model that cannot fit is not fetched
        folder = self.fetch(spec, progress)
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
            kv_budget=kv_budget_bytes(config, torch.device("cpu" if placement == "cpu" else "cuda")),
        )
