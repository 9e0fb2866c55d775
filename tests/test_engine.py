"""The streaming engine on the demo checkpoints: sampling controls, stop conditions, streaming
text integrity and cancellation."""
from __future__ import annotations

import threading
import time

import pytest

from ernie_app.engine import Sampling, UserError, stop_token_ids, stream_reply
from ernie_app.manager import ModelManager
from models import generate

PROMPT = [{"role": "user", "content": "Tell me a story about the sea."}]


@pytest.fixture(scope="module")
def loaded(demo_registry, demo_names):
    return ModelManager(demo_registry).get(demo_names[0])


def final(loaded, sampling, messages=PROMPT, **kwargs):
    *_, last = stream_reply(loaded, messages, sampling, **kwargs)
    return last


def greedy(**overrides):
    return Sampling(max_new_tokens=24, temperature=0.0, **overrides)


def test_temperature_and_seed(loaded):
    assert final(loaded, greedy()).text == final(loaded, greedy()).text  # greedy is deterministic
    hot = [final(loaded, Sampling(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0, seed=s)).text for s in (1, 1, 2)]
    assert hot[0] == hot[1]  # same seed, same sample
    assert hot[0] != hot[2]  # another seed, another sample
    assert hot[0] != final(loaded, greedy()).text


def test_top_k_and_top_p_narrow_sampling_to_greedy(loaded):
    expected = final(loaded, greedy()).text
    for seed in (3, 4):
        assert final(loaded, Sampling(max_new_tokens=24, temperature=1.5, top_k=1, top_p=1.0, seed=seed)).text == expected
        assert final(loaded, Sampling(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1e-6, seed=seed)).text == expected
    wide = {final(loaded, Sampling(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0, seed=s)).text for s in (3, 4)}
    assert len(wide) == 2


def test_repetition_penalty_changes_greedy_output(loaded):
    plain = final(loaded, greedy(repetition_penalty=1.0))
    penalised = final(loaded, greedy(repetition_penalty=1.8))
    assert plain.text != penalised.text


def test_max_new_tokens(loaded):
    reply = final(loaded, Sampling(max_new_tokens=5, temperature=0.0))
    assert (reply.new_tokens, reply.stop_reason) == (5, "max_new_tokens")
    assert reply.tokens_per_second is not None and reply.time_to_first_token is not None


def test_stops_at_eos_ids_without_showing_them(loaded, monkeypatch):
    ids = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(PROMPT))
    tokens = list(generate(loaded.model, ids, 24, eos_token_ids=[]))
    stop_at = tokens[6]  # declare a token the model will emit an eos id
    monkeypatch.setitem(loaded.generation_config, "eos_token_id", [stop_at])
    reply = final(loaded, greedy())
    assert reply.stop_reason == "eos"
    assert reply.new_tokens == tokens.index(stop_at) + 1
    assert reply.text == loaded.tokenizer.decode(tokens[: tokens.index(stop_at)], skip_special_tokens=True)


def test_end_of_sentence_and_eos_are_stop_tokens(loaded):
    stops = stop_token_ids(loaded)
    assert loaded.tokenizer.token_to_id("<|end_of_sentence|>") in stops
    assert loaded.tokenizer.eos_token_id in stops


def test_stop_strings_cut_the_reply(loaded):
    text = final(loaded, greedy()).text
    stop = text[5:8]
    reply = final(loaded, greedy(stop_strings=(stop,)))
    assert reply.stop_reason == "stop_string"
    assert reply.text == text[: text.find(stop)]


def test_context_limit(loaded):
    prompt_tokens = len(loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(PROMPT)))
    reply = final(loaded, greedy(), max_context=prompt_tokens + 3)
    assert (reply.new_tokens, reply.stop_reason) == (3, "context")
    with pytest.raises(UserError, match="context"):
        final(loaded, greedy(), max_context=prompt_tokens)


def test_a_conversation_longer_than_the_context_loses_its_oldest_turns(loaded):
    system = {"role": "system", "content": "You are terse."}
    turns = [[{"role": "user", "content": f"Question {i}: tell me about the number {i} at length."},
              {"role": "assistant", "content": f"Answer {i}: " + "the sea, the moon and the stars. " * 6}] for i in range(12)]
    new = {"role": "user", "content": "And now?"}
    messages = [system, *(m for turn in turns for m in turn), new]
    encode = loaded.tokenizer.encode_chat
    context = len(encode([system, *turns[-3], *turns[-2], *turns[-1], new])) + 24  # room for about 3 turns
    sampling = Sampling(max_new_tokens=96, temperature=0.0)
    reply_tokens = min(96, context // 4)  # what the trimming keeps free for the reply
    reply = final(loaded, sampling, messages=messages, max_context=context)
    kept_turns = 12 - reply.left_out // 2
    assert reply.left_out % 2 == 0 and 0 < reply.left_out < 24  # whole turns, the oldest first
    kept = [system, *(m for turn in turns[12 - kept_turns:] for m in turn), new]
    assert reply.prompt_tokens == len(encode(kept)) <= context - reply_tokens  # the system prompt is kept
    one_more = [system, *(m for turn in turns[12 - kept_turns - 1:] for m in turn), new]
    assert len(encode(one_more)) > context - reply_tokens  # no more left out than needed
    assert reply.stop_reason is not None and reply.new_tokens > 0
    untouched = final(loaded, sampling, messages=messages, max_context=100_000)
    assert untouched.left_out == 0


def test_a_message_alone_over_the_context_is_refused_with_the_reason(loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 400}]
    with pytest.raises(UserError, match="message and the system prompt are .* over the 64-token context"):
        final(loaded, greedy(), messages=messages, max_context=64)


def test_deadline_stops_the_reply(loaded):
    reply = final(loaded, Sampling(max_new_tokens=200, temperature=0.0), deadline=time.monotonic() - 1)
    assert reply.stop_reason == "timeout" and reply.new_tokens == 0


def test_chinese_and_emoji_stream_without_broken_characters(loaded, monkeypatch):
    text = "你好，世界！😀🎉👍🏽 文心一言 ❤️ done"
    ids = loaded.tokenizer.encode(text)
    assert any(13 <= i < 269 for i in ids)  # byte-fallback pieces are part of the stream

    def scripted(prompt, max_new_tokens, **kwargs):
        yield from ids

    monkeypatch.setattr(loaded.batcher, "generate", scripted)
    replies = [r.text for r in stream_reply(loaded, PROMPT, greedy())]
    assert replies[-1] == text
    assert not any("\ufffd" in r for r in replies)
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:]))


def test_cancellation_stops_the_model(loaded, monkeypatch):
    steps = []
    for method in ("forward_step", "forward"):  # batched steps, and one-request steps
        original = getattr(loaded.model, method)

        def slow_step(*args, original=original, **kwargs):  # the consumer keeps up with a slow model
            steps.append(1)
            time.sleep(0.01)
            return original(*args, **kwargs)

        monkeypatch.setattr(loaded.model, method, slow_step)
    cancel = threading.Event()
    replies = stream_reply(loaded, PROMPT, Sampling(max_new_tokens=500, temperature=0.0), cancel=cancel)
    for i, reply in enumerate(replies):
        if i == 3:
            cancel.set()
    assert reply.stop_reason == "cancelled"
    wait_until_idle(loaded)
    assert 4 <= len(steps) <= 8

    steps.clear()
    replies = stream_reply(loaded, PROMPT, Sampling(max_new_tokens=500, temperature=0.0))
    next(replies), next(replies)
    replies.close()  # the consumer went away (Stop button, closed tab)
    wait_until_idle(loaded)
    assert 2 <= len(steps) <= 8


def wait_until_idle(loaded, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while loaded.batcher.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loaded.batcher.busy


def test_bad_template_input_is_a_user_error(loaded):
    with pytest.raises(UserError):
        final(loaded, greedy(), messages=[{"role": "user"}])


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [("max_new_tokens", 0, "Max new tokens"), ("seed", 2**70, "Seed"), ("seed", -5, "Seed"),
     ("temperature", float("nan"), "Temperature"), ("top_p", 0.0, "Top-p"), ("top_k", -1, "Top-k"),
     ("repetition_penalty", 0.0, "Repetition penalty"), ("temperature", "hot", "Temperature")],
)
def test_bad_sampling_settings_are_refused_by_name(setting, value, named):
    with pytest.raises(UserError, match=f"^{named} must be"):
        Sampling(**{setting: value})


def test_largest_seed_is_accepted(loaded):
    assert final(loaded, Sampling(max_new_tokens=4, temperature=1.0, seed=2**63 - 1)).new_tokens == 4


def test_unset_sampling_takes_the_checkpoint_defaults():
    from ernie_app.engine import sampling_defaults

    ernie = {"do_sample": True, "top_p": 0.8, "temperature": 0.8, "repetition_penalty": 1.0}
    resolved = Sampling().resolved(ernie)
    assert (resolved["do_sample"], resolved["temperature"], resolved["top_p"], resolved["top_k"]) == (True, 0.8, 0.8, 50)
    assert Sampling(top_p=0.5).resolved(ernie)["top_p"] == 0.5
    assert Sampling().resolved({"temperature": 0.7})["do_sample"] is False  # do_sample unset: greedy
    assert sampling_defaults({})["temperature"] == 0.0


def test_vl_prompts_think_only_when_asked(demo_registry):
    from ernie_app.engine import encode_prompt

    name = next(n for n, spec in demo_registry.items() if spec.task == "vision" and not spec.thinking)
    loaded = ModelManager(demo_registry).get(name)
    messages = [{"role": "user", "content": "Hello"}]
    direct, thinking = (loaded.tokenizer.decode(encode_prompt(loaded, messages, {"enable_thinking": t})[0]) for t in (False, True))
    assert direct.endswith("<think>\n\n</think>\n\n") and thinking.endswith("<think>")
