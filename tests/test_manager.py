"""The model manager: lazy single-flight loading, placement, eviction and error propagation."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from ernie_app import manager as manager_module
from ernie_app.manager import ModelManager, ModelUnavailable, checkpoint_bytes
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
    sizes = [checkpoint_bytes(manager_module.Path(demo_registry[n].source)) for n in demo_names[:2]]
    in_memory = manager_module.default_dtype(torch.device("cpu")).itemsize / 2  # files are bf16
    manager = ModelManager(demo_registry, cpu_limit_bytes=int(max(sizes) * in_memory * 1.2), quantize="none")  # room for one
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
    folder = manager_module.Path(demo_registry[demo_names[1]].source)
    stored = checkpoint_bytes(folder)
    need = int(stored * manager_module.GPU_HEADROOM) + manager_module.GPU_RESERVE_BYTES
    manager = ModelManager(demo_registry, cpu_limit_bytes=0)
    spec = demo_registry[demo_names[1]]

    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: need, 1: need + 10})
    assert manager.place(folder, spec) == "cuda:1"

    reserve = manager_module.GPU_RESERVE_BYTES
    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: reserve + stored // 2 + 4096, 1: reserve + stored})
    device_map = manager.place(folder, spec)
    assert set(device_map.values()) == {"cuda:0", "cuda:1"}
    on_cpu = {name: "cpu" for name in device_map}  # the same map must place every tensor
    assert load_model(folder, device=on_cpu, dtype=torch.float32).model.layers[-1].mlp is not None

    monkeypatch.setattr(manager_module, "gpu_free_bytes", lambda: {0: 10, 1: 10})
    with pytest.raises(ModelUnavailable):
        manager.place(folder, spec)


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
