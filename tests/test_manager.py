"""The model manager: lazy single-flight loading, placement, eviction and error propagation."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ernie_app import manager as manager_module
from ernie_app.manager import (
    ModelManager, ModelUnavailable, checkpoint_size, cpu_bytes_needed, gpu_bytes_needed, kv_budget_bytes,
)
from models import CheckpointError, load_model


def counting_loads(monkeypatch, delay=0.0):
    """Count real loads (and slow them down so concurrent requests overlap)."""
    calls = []
    original = ModelManager._load

    def load(self, spec, progress):
        calls.append(spec.name)
        time.sleep(delay)
        return original(self, spec, progress)

    monkeypatch.setattr(ModelManager, "_load", load)
    return calls


def room_for_one(registry, names) -> int:
    """A CPU limit that holds any one of these models (of similar sizes) but no two."""
    return int(max(cpu_bytes_needed(*checkpoint_size(registry[n])) for n in names) * 1.2)


def test_lazy_and_loaded_once_under_concurrent_requests(demo_registry, demo_names, monkeypatch):
    calls = counting_loads(monkeypatch, delay=0.3)
    manager = ModelManager(demo_registry)
    assert manager.loaded() == [] and calls == []
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: manager.get(demo_names[1]), range(8)))
    assert calls == [demo_names[1]]
    assert all(r is results[0] for r in results)
    assert results[0].placement == "cpu"  # no GPU here: CPU fallback for a small model
    assert manager.get(demo_names[1]) is results[0] and calls == [demo_names[1]]


def test_load_error_reaches_every_waiting_request(demo_registry, demo_names, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    source = demo_registry[demo_names[0]].source
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text(open(f"{source}/{name}").read())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    registry = {"broken": replace(demo_registry[demo_names[0]], name="broken", source=str(broken))}
    calls = counting_loads(monkeypatch, delay=0.3)
    manager = ModelManager(registry)

    def attempt(_):
        try:
            manager.get("broken")
        except CheckpointError as error:
            return str(error)

    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(attempt, range(8)))
    assert len(calls) == 1
    assert all(e is not None and "missing" in e for e in errors)
    with pytest.raises(CheckpointError):  # a failure is not cached: the next request tries again
        manager.get("broken")
    assert len(calls) == 2


def test_least_recently_used_idle_model_is_evicted(demo_registry, demo_names):
    manager = ModelManager(demo_registry, cpu_limit_bytes=room_for_one(demo_registry, demo_names[:2]), quantize="none")
    first = manager.get(demo_names[0])
    manager.get(demo_names[1])
    assert [m.spec.name for m in manager.loaded()] == [demo_names[1]]
    assert first.model is not None  # a request still holding it keeps working
    with manager.use(demo_names[1]):  # in use: never evicted, so the next load cannot fit
        with pytest.raises(ModelUnavailable, match="CPU limit"):
            manager.get(demo_names[0])
    manager.get(demo_names[0])
    assert [m.spec.name for m in manager.loaded()] == [demo_names[0]]


def test_unknown_model_and_too_big_model_get_clear_messages(demo_registry, demo_names):
    manager = ModelManager(demo_registry, cpu_limit_bytes=1000)
    with pytest.raises(ModelUnavailable, match="Unknown model"):
        manager.get("nope")
    with pytest.raises(ModelUnavailable, match=r"needs about .* GiB.*no GPU"):
        manager.get(demo_names[0])


def test_gpu_placement_prefers_the_emptiest_gpu_then_splits(demo_registry, demo_names, monkeypatch):
    spec = demo_registry[demo_names[1]]
    folder = Path(spec.source)
    config, stored = checkpoint_size(spec)
    need = gpu_bytes_needed(config, stored)
    manager = ModelManager(demo_registry, cpu_limit_bytes=0)

    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: need, 1: need + 10})
    assert manager.place(spec, config, stored) == "cuda:1"

    reserve = manager_module.GPU_RESERVE_BYTES
    share = (need - reserve) * 6 // 10  # weights, activations and KV budget: 60% on each GPU
    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: reserve + share, 1: reserve + share})
    device_map = manager.place(spec, config, stored)
    assert set(device_map.values()) == {"cuda:0", "cuda:1"}
    on_cpu = {name: "cpu" for name in device_map}  # the same map must place every tensor
    assert load_model(folder, device=on_cpu, dtype=torch.float32).model.layers[-1].mlp is not None

    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: 10, 1: 10})
    with pytest.raises(ModelUnavailable):
        manager.place(spec, config, stored)


def test_concurrent_generations_do_not_share_state(demo_registry, demo_names, monkeypatch):
    """Two threads generating on one model get the same tokens as each alone (own KV caches;
    in fp32, where a batched matmul gives each row the bits it gives it alone)."""
    from ernie_app.engine import Sampling, stream_reply

    monkeypatch.setattr("models.loader.default_dtype", lambda device: torch.float32)
    loaded = ModelManager(demo_registry).get(demo_names[1])
    prompts = [[{"role": "user", "content": "alpha"}], [{"role": "user", "content": "一二三 beta"}]]
    sampling = Sampling(max_new_tokens=20, temperature=0.0)
    alone = [list(stream_reply(loaded, p, sampling))[-1].text for p in prompts]
    together = [None, None]

    def run(i):
        together[i] = list(stream_reply(loaded, prompts[i], sampling))[-1].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


class PausingLock:
    """The manager's lock, stopping the thread named `name` right after it first releases it
    (the end of that thread's lookup) until `resume` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paused, self.resume = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()
        if threading.current_thread().name == self.name and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(5)


def loaded_names(manager):
    return [m.spec.name for m in manager.loaded()]


def paused_user(manager, name: str):
    """A thread entering `manager.use(name)`, paused right after its first release of the
    manager's lock; returns it, its lock (`resume` it) and what it saw once inside."""
    manager._lock = lock = PausingLock("user")
    seen = []

    def user():
        with manager.use(name):
            seen.append(loaded_names(manager))

    thread = threading.Thread(target=user, name="user")
    thread.start()
    assert lock.paused.wait(5)
    return thread, lock, seen


def eviction_is_refused(manager, other: str, thread, lock) -> None:
    """Loading `other` needs an eviction, which must fail while the paused user holds its model."""
    try:
        with pytest.raises(ModelUnavailable, match="CPU limit"):
            manager.get(other)
    finally:
        lock.resume.set()
        thread.join(5)


def test_a_model_found_for_use_cannot_be_evicted_before_it_is_counted(demo_registry, demo_names):
    """A request that has found its model, paused before anything else, keeps it: the next load
    cannot evict it to make room."""
    first, second = demo_names[:2]
    manager = ModelManager(demo_registry, cpu_limit_bytes=room_for_one(demo_registry, demo_names[:2]), quantize="none")
    manager.get(first)
    thread, lock, seen = paused_user(manager, first)
    eviction_is_refused(manager, second, thread, lock)
    assert seen == [[first]]


def test_requests_waiting_for_a_load_are_counted_when_it_is_published(demo_registry, demo_names, monkeypatch):
    """A request that joined a load in progress keeps the model even if an eviction comes between
    the load's end and the request waking up."""
    first, second = demo_names[:2]
    manager = ModelManager(demo_registry, cpu_limit_bytes=room_for_one(demo_registry, demo_names[:2]), quantize="none")
    loading, finish = threading.Event(), threading.Event()
    original = ModelManager._load

    def held_load(self, spec, progress):
        if spec.name == first:
            loading.set()
            assert finish.wait(5)
        return original(self, spec, progress)

    monkeypatch.setattr(ModelManager, "_load", held_load)
    owner = threading.Thread(target=manager.get, args=(first,))
    owner.start()
    assert loading.wait(5)
    thread, lock, seen = paused_user(manager, first)  # it has joined the load
    finish.set()
    owner.join(5)  # the load is published; the waiter is still paused
    eviction_is_refused(manager, second, thread, lock)
    assert seen == [[first]]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_load_in_progress_reserves_its_memory(demo_registry, demo_names, monkeypatch, device):
    """Two models that do not fit together, loading at once: the second placement sees the first's
    reservation instead of the same free memory."""
    first, second = demo_names[:2]
    if device == "cpu":
        manager = ModelManager(demo_registry, cpu_limit_bytes=room_for_one(demo_registry, demo_names[:2]), quantize="none")
    else:
        free = int(max(gpu_bytes_needed(*checkpoint_size(demo_registry[n])) for n in (first, second)) * 1.2)
        monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: free})  # not lowered by the load: a snapshot
        manager = ModelManager(demo_registry, cpu_limit_bytes=0)
    placed, finish = threading.Event(), threading.Event()
    original = manager_module.load_model

    def held_load_model(folder, device, **options):  # between the first load's placement and its end
        if Path(folder).resolve() == Path(demo_registry[first].source).resolve():
            placed.set()
            assert finish.wait(5)
        return original(folder, device="cpu", **options)  # a GPU placement is loaded on the CPU here

    monkeypatch.setattr(manager_module, "load_model", held_load_model)
    thread = threading.Thread(target=manager.get, args=(first,), name="first")
    thread.start()
    assert placed.wait(5)
    try:
        with pytest.raises(ModelUnavailable, match="no GPU has that free"):
            manager.get(second)
    finally:
        finish.set()
        thread.join(5)
    assert loaded_names(manager) == [first] and manager.loaded()[0].placement == device


def test_a_failed_load_releases_its_reservation(demo_registry, demo_names, monkeypatch):
    first, second = demo_names[:2]
    manager = ModelManager(demo_registry, cpu_limit_bytes=room_for_one(demo_registry, demo_names[:2]), quantize="none")
    original = manager_module.load_model

    def failing_once(*args, **kwargs):
        monkeypatch.setattr(manager_module, "load_model", original)
        raise OSError("disk error")

    monkeypatch.setattr(manager_module, "load_model", failing_once)
    with pytest.raises(OSError, match="disk error"):
        manager.get(first)
    manager.get(second)
    assert loaded_names(manager) == [second]


def test_fit_is_checked_from_the_hub_listing_before_downloading(demo_registry, demo_names, tmp_path, monkeypatch):
    """A hub model too big for the memory is refused without a download, from the sizes of the
    files it would fetch; one that fits is then downloaded."""
    import huggingface_hub

    spec = demo_registry[demo_names[0]]
    folder = Path(spec.source)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())  # the one file fetched first
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, revision=None: str(tmp_path / filename))
    listing = [SimpleNamespace(rfilename="README.md", size=10**6), SimpleNamespace(rfilename="pytorch_model.bin", size=2**40)]
    listing += [SimpleNamespace(rfilename=f"model-0000{i}-of-00002.safetensors", size=40 * 2**30) for i in (1, 2)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None, files_metadata=False: SimpleNamespace(siblings=listing))
    downloads = []

    def download(source, revision=None):
        downloads.append(source)
        return folder

    monkeypatch.setattr(manager_module, "resolve_checkpoint", download)
    manager = ModelManager({"hub": replace(spec, name="hub", source="example/hub")},
                           cpu_limit_bytes=2 * cpu_bytes_needed(*checkpoint_size(spec)))
    with pytest.raises(ModelUnavailable, match="needs about 80.0 GiB for its weights"):
        manager.get("hub")
    assert downloads == []
    listing[2:] = [SimpleNamespace(rfilename="model.safetensors", size=(folder / "model.safetensors").stat().st_size)]
    assert manager.get("hub").placement == "cpu" and downloads == ["example/hub"]


def test_hub_size_comes_from_the_cache_when_the_hub_does_not_answer(demo_registry, demo_names, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def no_answer(self, repo_id, revision=None, files_metadata=False):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_answer)
    spec = replace(demo_registry[demo_names[0]], source="example/cached")
    cached = Path(demo_registry[demo_names[0]].source)  # stands for the cached snapshot
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, revision=None: str(cached / filename))
    assert checkpoint_size(spec) == checkpoint_size(demo_registry[demo_names[0]])
    (tmp_path / "config.json").write_text((cached / "config.json").read_text())  # a snapshot without weights
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, revision=None: str(tmp_path / filename))
    with pytest.raises(ModelUnavailable, match="not in the local cache"):
        checkpoint_size(spec)


def test_kv_caches_grown_past_their_budget_count_against_the_next_load(demo_registry, demo_names, monkeypatch):
    """While one request's long prompt is being prefilled (its cache grown past the budget), a
    load that would fit beside the model's budget but not beside what it now holds is refused."""
    first, second = demo_names[:2]
    monkeypatch.setattr(manager_module, "KV_BUDGET_TOKENS", 8 * 256)  # what the 8 slots start with
    manager = ModelManager(demo_registry, quantize="none")
    loaded = manager.get(first)
    config, _ = checkpoint_size(demo_registry[first])
    manager.cpu_limit_bytes = (loaded.weight_bytes + kv_budget_bytes(config, torch.device("cpu"))
                               + cpu_bytes_needed(*checkpoint_size(demo_registry[second])))  # both, at their budgets
    grown, resume = threading.Event(), threading.Event()
    forward_step = loaded.model.forward_step

    def held_step(*args, **kwargs):  # the scheduler thread, after the caches are reserved for the step
        grown.set()
        assert resume.wait(5)
        return forward_step(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward_step", held_step)

    def user():
        with manager.use(first) as model:
            list(model.batcher.generate([3 + i % 500 for i in range(600)], max_new_tokens=1))  # a slot grows to 512

    thread = threading.Thread(target=user)
    thread.start()
    assert grown.wait(5)
    try:
        with pytest.raises(ModelUnavailable, match="CPU limit"):
            manager.get(second)
    finally:
        resume.set()
        thread.join(5)
    assert loaded_names(manager) == [first]


def test_a_model_loads_on_a_thread_of_its_own_that_ends_with_the_load(demo_registry, demo_names, monkeypatch):
    """The load's OpenMP pool must not outlive it (see in_own_thread); errors and the caller's
    context (Gradio's progress) cross over."""
    threads, notes = [], []
    original = manager_module.load_model

    def recording_load(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(manager_module, "load_model", recording_load)
    manager = ModelManager(demo_registry)
    manager.get(demo_names[0], progress=lambda fraction, note: notes.append(threading.current_thread()))
    assert threads and threads[0] is not threading.current_thread() and not threads[0].is_alive()
    assert notes and all(t is threads[0] for t in notes)
    variable = manager_module.contextvars.ContextVar("request")
    variable.set("mine")
    assert manager_module.in_own_thread(variable.get) == "mine"
    with pytest.raises(ZeroDivisionError):
        manager_module.in_own_thread(lambda: 1 / 0)
