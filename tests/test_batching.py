"""Continuous batching: requests decoded together give the tokens each gives alone (fp32), join
and leave between steps, keep their own settings and cancellation, prefill in chunks that
interleave with the others' decoding, and reuse the KV cache of a conversation's prefix."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from models import BatchGenerator, generate, load_model
from models.factory import tiny_config, write_checkpoint

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["dense", "moe", "dense-int8"])
def model(request, tmp_path_factory):
    kind, _, quantize = request.param.partition("-")
    folder = write_checkpoint(tmp_path_factory.mktemp(kind), tiny_config(kind), tokenizer=False)
    return load_model(folder, device="cpu", dtype=torch.float32, quantize=quantize or None)


def prompts(model, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def alone(model, prompt, **settings):
    return list(generate(model, prompt, NEW_TOKENS, eos_token_ids=[], **settings))


def together(batcher, requests):
    """Run (prompt, settings) requests from one thread each; their token lists."""
    results = [None] * len(requests)

    def run(i):
        prompt, settings = requests[i]
        results[i] = list(batcher.generate(prompt, NEW_TOKENS, eos_token_ids=[], **settings))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class StepLog:
    """Records each forward pass's segments as (start, length) per sequence: the batched steps,
    and the plain forward of a step with one decoding request (or of `generate`)."""

    def __init__(self, model, monkeypatch):
        self.steps = []
        batched, plain = model.forward_step, model.forward

        def logged_step(step, ids, rows):
            self.steps.append([(start, n) for _, start, n in step.segments])
            return batched(step, ids, rows)

        def logged_forward(ids, cache=None, start=0, **kwargs):
            self.steps.append([(start, ids.shape[1])])
            return plain(ids, cache=cache, start=start, **kwargs)

        monkeypatch.setattr(model, "forward_step", logged_step)
        monkeypatch.setattr(model, "forward", logged_forward)

    @property
    def prefilled(self) -> int:
        return sum(n for step in self.steps for _, n in step if n > 1)


def test_batched_greedy_tokens_equal_each_request_alone(model):
    # more requests than slots (some wait), prompts longer than a chunk and than the initial cache
    batch = prompts(model, [5, 40, 300, 17, 700, 2, 64, 129])
    batcher = BatchGenerator(model, slots=4, chunk_tokens=32, solo_chunk_tokens=100)
    assert together(batcher, [(p, {}) for p in batch]) == [alone(model, p) for p in batch]


def test_each_request_keeps_its_own_sampling_settings_and_seed(model):
    batch = prompts(model, [8, 30, 12, 50])
    settings = [dict(do_sample=True, temperature=0.9, top_k=20, seed=1), {},
                dict(do_sample=True, top_p=0.8, seed=2, repetition_penalty=1.3), dict(repetition_penalty=1.5)]
    batcher = BatchGenerator(model, slots=4)
    assert together(batcher, list(zip(batch, settings))) == [alone(model, p, **s) for p, s in zip(batch, settings)]


def test_stop_ids_end_a_request_and_free_its_slot(model):
    first, second = prompts(model, [10, 10])
    expected = alone(model, first)
    batcher = BatchGenerator(model, slots=1)
    assert list(batcher.generate(first, NEW_TOKENS, eos_token_ids=[expected[3]])) == expected[: expected.index(expected[3]) + 1]
    assert list(batcher.generate(second, NEW_TOKENS, eos_token_ids=[])) == alone(model, second)


def test_cancel_and_close_end_requests_between_steps_without_harming_others(model, monkeypatch):
    keep, cancelled, closed = prompts(model, [20, 20, 20])
    log = StepLog(model, monkeypatch)
    batcher = BatchGenerator(model, slots=3)
    cancel = threading.Event()
    streams = [batcher.generate(p, 500, eos_token_ids=[], **extra) for p, extra in ((keep, {}), (cancelled, {"cancel": cancel}), (closed, {}))]
    heads = [[next(s) for _ in range(3)] for s in streams]
    before = len(log.steps)
    cancel.set()
    streams[2].close()
    list(streams[1])  # ends (with the tokens sampled before the cancel)
    for _ in range(50):
        next(streams[0])
    streams[0].close()
    # The step running when they were ended, and at most one that had started, still had them.
    assert all(len(step) == 1 for step in log.steps[before + 2 :]) and len(log.steps) > before + 5
    assert heads[0] == alone(model, keep)[:3]


def test_prefill_comes_in_chunks_between_the_others_decode_steps(model, monkeypatch):
    decoding, newcomer = prompts(model, [10, 300])
    log = StepLog(model, monkeypatch)
    batcher = BatchGenerator(model, slots=2, chunk_tokens=64, solo_chunk_tokens=256)
    first = batcher.generate(decoding, 40, eos_token_ids=[])
    next(first)
    late = list(batcher.generate(newcomer, NEW_TOKENS, eos_token_ids=[]))
    mixed = [step for step in log.steps if len(step) == 2 and step[1][1] > 1]
    assert len(mixed) >= 300 // 64  # the newcomer's prompt rode along the other's decode steps...
    assert all(step[0][1] == 1 and step[1][1] <= 64 for step in mixed)  # ...a chunk at a time
    first.close()
    assert late == alone(model, newcomer)


def test_cancel_during_a_long_prefill_stops_between_chunks(model, monkeypatch):
    (long_prompt,) = prompts(model, [2000])
    log = StepLog(model, monkeypatch)
    batcher = BatchGenerator(model, slots=1, solo_chunk_tokens=100)
    cancel = threading.Event()
    original = model.forward_step

    def cancel_after_two_chunks(step, ids, rows):
        if len(log.steps) == 2:
            cancel.set()
        return original(step, ids, rows)

    monkeypatch.setattr(model, "forward_step", cancel_after_two_chunks)
    assert list(batcher.generate(long_prompt, NEW_TOKENS, eos_token_ids=[], cancel=cancel)) == []
    assert log.prefilled <= 300


def test_a_follow_up_turn_reuses_the_conversation_prefix(model, monkeypatch):
    (turn1,) = prompts(model, [400])
    batcher = BatchGenerator(model, slots=2)
    reply = list(batcher.generate(turn1, NEW_TOKENS, eos_token_ids=[]))
    turn2 = turn1 + reply + prompts(model, [30], seed=1)[0]
    expected = alone(model, turn2)
    log = StepLog(model, monkeypatch)
    assert list(batcher.generate(turn2, NEW_TOKENS, eos_token_ids=[])) == expected
    # Cached: the first turn and its reply but the last token (sampled, never fed).
    assert log.prefilled == len(turn2) - (len(turn1) + len(reply) - 1)


def test_a_failed_step_fails_its_requests_and_the_next_request_works(model, monkeypatch):
    (prompt,) = prompts(model, [9])
    batcher = BatchGenerator(model, slots=2)
    original = model.forward_step
    monkeypatch.setattr(model, "forward_step", lambda *a: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    with pytest.raises(RuntimeError, match="kernel exploded"):
        list(batcher.generate(prompt, NEW_TOKENS, eos_token_ids=[]))
    monkeypatch.setattr(model, "forward_step", original)
    assert list(batcher.generate(prompt, NEW_TOKENS, eos_token_ids=[])) == alone(model, prompt)


def wait_idle(batcher):
    for _ in range(200):
        if not batcher.busy:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the generator stayed busy")


def test_one_scheduler_thread_runs_every_step_and_goes_idle_between_requests(model, monkeypatch):
    """A new thread per busy period would leave OpenMP pools behind (they halve the compiled step)."""
    (prompt,) = prompts(model, [9])
    batcher = BatchGenerator(model, slots=2)
    threads = set()
    batched = model.forward_step

    def recorded(*args):
        threads.add(threading.current_thread())
        return batched(*args)

    monkeypatch.setattr(model, "forward_step", recorded)
    for _ in range(2):
        together(batcher, [(prompt, {}), (prompt, {})])  # two at once: batched steps
        wait_idle(batcher)
    assert threads == {batcher._thread}
    assert batcher._thread.is_alive()


def test_a_dropped_generator_ends_its_thread_and_a_closed_one_refuses_requests(model):
    (prompt,) = prompts(model, [9])
    batcher = BatchGenerator(model, slots=2)
    list(batcher.generate(prompt, 3, eos_token_ids=[]))
    thread, gone = batcher._thread, weakref.ref(batcher)
    del batcher
    gc.collect()
    thread.join(timeout=5)
    assert gone() is None and not thread.is_alive()

    batcher = BatchGenerator(model, slots=2)
    batcher.close()
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        list(batcher.generate(prompt, 3, eos_token_ids=[]))
