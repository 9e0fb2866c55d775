"""The compiled decode steps give the eager step's logits and tokens, serve any cache, position
and number of sequences without recompiling, and take over in generate and the BatchGenerator
once ready."""
from __future__ import annotations

import pytest
import torch

from models import BatchGenerator, generate, load_model
from models.compiled import INT8_ROW_BUCKETS, ROW_BUCKETS, CompiledDecode, compile_wanted
from models.factory import tiny_config, write_checkpoint
from models.layers import BatchStep


@pytest.fixture(scope="module", params=[None, "int8"])
def models(request, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config("dense"), tokenizer=False)
    eager = load_model(folder, device="cpu", dtype=torch.float32, quantize=request.param)
    fast = load_model(folder, device="cpu", dtype=torch.float32, quantize=request.param)
    fast.fast_decode = CompiledDecode(fast, background=False)
    expected = INT8_ROW_BUCKETS if request.param == "int8" else ROW_BUCKETS
    assert fast.fast_decode.rows_ready == list(expected), fast.fast_decode.failed
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
            with torch._dynamo.config.patch(error_on_recompile=True):
                logits = fast.fast_decode(BatchStep([(caches[1], start, 1)]), token.view(1))
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(caches[1].keys[-1][:, :, :45], caches[0].keys[-1][:, :, :45], atol=1e-5, rtol=1e-5)


def test_eager_serves_until_a_graph_for_the_rows_is_ready(models):
    eager, _ = models
    pending = CompiledDecode.__new__(CompiledDecode)  # a compile still running
    pending.buckets, pending.rows_ready = ROW_BUCKETS, []
    assert pending(BatchStep([(eager.new_cache(1, 4), 0, 1)]), torch.zeros(1, dtype=torch.long)) is None
    assert pending.one(torch.zeros((1, 1), dtype=torch.long), eager.new_cache(1, 4), 0) is None
    pending.rows_ready = [1]  # the one-row graph only
    three = BatchStep([(eager.new_cache(1, 4), 0, 1) for _ in range(3)])
    assert pending(three, torch.zeros(3, dtype=torch.long)) is None


def test_generate_and_the_batcher_use_the_compiled_steps(models, monkeypatch):
    eager, fast = models
    prompt = torch.randint(3, eager.config.vocab_size, (20,)).tolist()
    rows = []  # the (padded) row count of each compiled call
    one, many = fast.fast_decode._one, fast.fast_decode._many
    monkeypatch.setattr(fast.fast_decode, "_one", lambda *args: rows.append(1) or one(*args))
    monkeypatch.setattr(fast.fast_decode, "_many", lambda ids, positions: rows.append(ids.numel()) or many(ids, positions))
    expected = list(generate(eager, prompt, 12, eos_token_ids=[]))
    assert list(generate(fast, prompt, 12, eos_token_ids=[])) == expected
    assert rows == [1] * 11  # every decode step after the prefill
    batcher = BatchGenerator(fast)
    assert list(batcher.generate(prompt, 12, eos_token_ids=[])) == expected
    assert rows == [1] * 22

    second = torch.randint(3, eager.config.vocab_size, (9,)).tolist()
    long_reply = batcher.generate(prompt, 300, eos_token_ids=[])
    first = [next(long_reply)]
    assert list(batcher.generate(second, 12, eos_token_ids=[])) == list(generate(eager, second, 12, eos_token_ids=[]))
    first.extend(long_reply)  # it went on decoding meanwhile, with the second request in its steps
    assert first == list(generate(eager, prompt, 300, eos_token_ids=[]))
    assert rows.count(4) >= 10 and set(rows) == {1, 4}  # two decoding: the 4-row graph


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


@torch.inference_mode()
def test_compiled_batched_step_equals_eager_for_any_number_of_sequences(models):
    """The graphs of 1, 4 and 8 rows (int8: 1 and 4) serve every number of sequences (more in
    groups), positions and cache sizes, without recompiling."""
    eager, fast = models
    vocab = eager.config.vocab_size
    lengths = [30, 7, 50, 12, 3, 41, 22, 9, 16, 35]
    caches = {}
    for model in (eager, fast):
        caches[model] = [model.new_cache(1, 64 if i % 2 else 128) for i in range(len(lengths))]
        for n, cache in zip(lengths, caches[model]):
            model(torch.arange(3, 3 + n)[None], cache=cache, start=0)
    for sequences in ([0, 1], [0, 1, 2], [2, 0], [0, 1, 2, 3], [3, 1], [4], [0, 1, 2, 3, 4, 5, 6], list(range(10))):
        ids = torch.randint(3, vocab, (len(sequences),))
        steps = [BatchStep([(caches[m][i], lengths[i], 1) for i in sequences]) for m in (eager, fast)]
        expected = eager.forward_step(steps[0], ids, None)
        with torch._dynamo.config.patch(error_on_recompile=True):
            logits = fast.fast_decode(steps[1], ids)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        for i in sequences:
            lengths[i] += 1
    for eager_cache, fast_cache in zip(caches[eager], caches[fast]):
        torch.testing.assert_close(fast_cache.keys[-1][:, :, :53], eager_cache.keys[-1][:, :, :53], atol=1e-5, rtol=1e-5)
