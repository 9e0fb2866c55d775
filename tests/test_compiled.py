"""The compiled decode step gives the eager step's logits and tokens, serves any cache and
position without recompiling, and takes over in generate and the BatchGenerator once ready."""
from __future__ import annotations

import threading

import pytest
import torch

from models import BatchGenerator, generate, load_model
from models.compiled import CompiledDecode, compile_wanted
from models.factory import tiny_config, write_checkpoint


@pytest.fixture(scope="module", params=[None, "int8"])
def models(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config("dense"), tokenizer=False)
    eager = load_model(folder, device="cpu", dtype=torch.float32, quantize=request.param)
    fast = load_model(folder, device="cpu", dtype=torch.float32, quantize=request.param)
    fast.fast_decode = CompiledDecode(fast, background=False)
    assert fast.fast_decode.ready.is_set(), fast.fast_decode.failed
    return eager, fast


@torch.inference_mode()
def test_compiled_step_equals_eager_at_any_position_and_cache(models):
    eager, fast = models
    prompt = torch.randint(3, eager.config.vocab_size, (1, 40))
    for capacity in (64, 300):  # caches of other sizes reuse the graph
        caches = [m.new_cache(1, capacity) for m in (eager, fast)]
        for model, cache in zip((eager, fast), caches):
            model(prompt, cache=cache, start=0)
        for start in range(40, 45):
            token = torch.randint(3, eager.config.vocab_size, (1, 1))
            expected = eager(token, cache=caches[0], start=start)
            torch.testing.assert_close(fast.fast_decode(token, caches[1], start), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(caches[1].keys[-1][:, :, :45], caches[0].keys[-1][:, :, :45], atol=1e-5, rtol=1e-5)


def test_eager_serves_until_the_compiled_step_is_ready(models):
    eager, _ = models
    pending = CompiledDecode.__new__(CompiledDecode)  # a compile still running
    pending.ready = threading.Event()
    assert pending(torch.zeros((1, 1), dtype=torch.long), eager.new_cache(1, 4), 0) is None


def test_generate_and_the_batcher_use_the_compiled_step(models, monkeypatch):
    eager, fast = models
    prompt = torch.randint(3, eager.config.vocab_size, (20,)).tolist()
    calls = []
    original = fast.fast_decode._step
    monkeypatch.setattr(fast.fast_decode, "_step", lambda *args: calls.append(1) or original(*args))
    expected = list(generate(eager, prompt, 12, eos_token_ids=[]))
    assert list(generate(fast, prompt, 12, eos_token_ids=[])) == expected
    assert len(calls) == 11  # every decode step after the prefill
    assert list(BatchGenerator(fast).generate(prompt, 12, eos_token_ids=[])) == expected
    assert len(calls) == 22


def test_compile_by_default_only_where_it_pays(models, monkeypatch, tmp_path):
    eager, _ = models
    moe = load_model(write_checkpoint(tmp_path, tiny_config("moe"), tokenizer=False), device="cpu")
    monkeypatch.setenv("ERNIE_STUDIO_COMPILE", "auto")
    assert compile_wanted(eager, None)  # a dense text model on the CPU
    assert not compile_wanted(eager, False)
    assert not compile_wanted(moe, None) and compile_wanted(moe, True)  # data-dependent routing: only when asked
    monkeypatch.setenv("ERNIE_STUDIO_COMPILE", "0")
    assert not compile_wanted(eager, None) and compile_wanted(eager, True)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert not compile_wanted(eager, True)  # inductor's CPU backend needs a C++ compiler
