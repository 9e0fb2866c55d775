"""Streaming generation for the chat: a conversation in, the reply as it grows out.

One decode step per iteration: a consumer that stops iterating (Stop button, a client that went
away) stops the model work within one step. Concurrent conversations on a text model are decoded
together by its `BatchGenerator` (one forward pass per step for all of them, each with its own KV
cache); the VL models' turns take their steps in turn under the model's step lock.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from collections.abc import Iterator
from dataclasses import dataclass, field

from models import generate

from .manager import LoadedModel

END_OF_SENTENCE = "<|end_of_sentence|>"
DEFAULT_MAX_CONTEXT = 32768
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class UserError(ValueError):
    """Bad input; the message is shown to the user as is."""


@dataclass
class Sampling:
    """Sampling settings; `None` fields take the checkpoint's generation_config.json values."""

    max_new_tokens: int = 1024
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse values the sampler cannot use, with a message naming the setting."""
        def number(value, name: str, low: float, high: float, low_open: bool = False) -> None:
            if value is None:
                return
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value > high or value < low or (low_open and value == low):
                bound = f"above {low:g}" if low_open else f"at least {low:g}"
                raise UserError(f"{name} must be a number {bound} and at most {high:g} (got {value!r}).")

        number(self.max_new_tokens, "Max new tokens", 1, 1 << 20)
        number(self.temperature, "Temperature", 0, 100)
        number(self.top_p, "Top-p", 0, 1, low_open=True)
        number(self.top_k, "Top-k", 0, 1 << 31)
        number(self.repetition_penalty, "Repetition penalty", 0, 100, low_open=True)
        number(self.seed, "Seed", 0, MAX_SEED)
        self.max_new_tokens = int(self.max_new_tokens)
        self.top_k = None if self.top_k is None else int(self.top_k)
        self.seed = None if self.seed is None else int(self.seed)

    def resolved(self, generation_config: dict) -> dict:
        """Keyword arguments for `models.generate`, unset fields filled from the checkpoint."""
        defaults = sampling_defaults(generation_config)
        temperature = defaults["temperature"] if self.temperature is None else self.temperature
        return dict(
            do_sample=temperature > 0,
            temperature=temperature,
            top_p=defaults["top_p"] if self.top_p is None else self.top_p,
            top_k=defaults["top_k"] if self.top_k is None else self.top_k,
            repetition_penalty=defaults["repetition_penalty"] if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
        )


def sampling_defaults(generation_config: dict) -> dict:
    """A checkpoint's sampling settings (greedy is temperature 0); unset values as transformers
    fills them, top_k=50 included."""
    g = generation_config
    return {
        "temperature": g.get("temperature", 1.0) if g.get("do_sample", False) else 0.0,
        "top_p": g.get("top_p", 1.0),
        "top_k": g.get("top_k", 50),
        "repetition_penalty": g.get("repetition_penalty", 1.0),
    }


@dataclass
class Reply:
    """The reply so far. `stop_reason` is set on the last update."""

    text: str = ""
    new_tokens: int = 0
    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    stop_reason: str | None = None
    left_out: int = 0  # the oldest history messages left out so that the conversation fits the context
    videos: list = field(default_factory=list)  # the videos as the model saw them (frames, timestamps)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        if self.new_tokens < 2 or self.last_token_at is None:
            return None
        return (self.new_tokens - 1) / max(self.last_token_at - self.first_token_at, 1e-9)


STOP_REASONS = {
    "eos": "end of answer",
    "stop_string": "stop sequence",
    "max_new_tokens": "max new tokens reached",
    "context": "context limit reached",
    "cancelled": "stopped",
    "timeout": "time limit reached",
}


MEDIA_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def encode_prompt(loaded: LoadedModel, messages: list[dict], media_options: dict) -> tuple[list[int], dict, list]:
    """Prompt token ids, the media tensors `generate` takes and the sampled videos (none for text
    models). Bad messages or media (the processor's MediaError is a ValueError) become UserErrors."""
    try:
        if loaded.processor is None:
            return loaded.tokenizer.encode_chat(messages), {}, []
        options = {"enable_thinking": loaded.spec.thinking, **media_options}
        inputs = loaded.processor.apply_chat_template(messages, **options)
    except ValueError as error:
        raise UserError(str(error)) from None
    return inputs["input_ids"][0].tolist(), {key: inputs[key] for key in MEDIA_INPUTS if key in inputs}, inputs.videos


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """eos ids of generation_config and config, and `<|end_of_sentence|>` (the template's end of
    an assistant turn)."""
    eos = loaded.generation_config.get("eos_token_id", [])
    ids = set(eos if isinstance(eos, list) else [eos]) | set(loaded.model.config.eos_token_ids)
    end_of_sentence = loaded.tokenizer.token_to_id(END_OF_SENTENCE)
    if end_of_sentence is not None:
        ids.add(end_of_sentence)
    return ids


def fit_context(loaded: LoadedModel, messages: list[dict], media_options: dict, context: int,
                reply_tokens: int) -> tuple[list[int], dict, list, int]:
    """`encode_prompt` of the newest messages that fit: whole turns are left out from the oldest
    (the system prompt and the new message always stay) until `reply_tokens` fit after the prompt.
    Returns the prompt's ids, media and videos, and how many messages were left out."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    # Cut points: a conversation may restart at any user message (the last one is the new message).
    cuts = sorted({start, *(i for i in range(start, len(messages)) if messages[i]["role"] == "user")})

    encoded: dict[int, tuple] = {}

    def fits(k: int) -> bool:
        if k not in encoded:
            encoded[k] = encode_prompt(loaded, messages[:start] + messages[cuts[k]:], media_options)
        return len(encoded[k][0]) + reply_tokens <= context

    if fits(0):  # the usual case: one encode
        return *encoded[0], 0
    k, low, high = len(cuts) - 1, 1, len(cuts) - 1  # binary search: fewer tokens the more turns left out
    while low <= high:
        middle = (low + high) // 2
        if fits(middle):
            k, high = middle, middle - 1
        else:
            low = middle + 1
    fits(k)
    ids = encoded[k][0]
    if len(ids) >= context:
        what = "The message and the system prompt are" if start else "The message is"
        fix = "Shorten it, or send fewer or smaller images or frames." if loaded.processor is not None else "Shorten it."
        raise UserError(f"{what} {len(ids):,} tokens long, over the {context:,}-token context of {loaded.spec.name}. {fix}")
    return *encoded[k], cuts[k] - start


def stream_reply(
    loaded: LoadedModel,
    messages: list[dict],
    sampling: Sampling,
    cancel: threading.Event | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    media_options: dict | None = None,
    deadline: float | None = None,
) -> Iterator[Reply]:
    """Yield the growing reply to `messages` ([{"role", "content"}], last one from the user;
    for VL models content may be a list of text / image / video parts, and `media_options`
    (enable_thinking, fps, max_frames) go to the processor). A conversation longer than the
    context loses its oldest turns (`Reply.left_out`); the reply stops at `deadline`
    (time.monotonic())."""
    context = min(max_context, loaded.model.config.max_position_embeddings)
    reply_tokens = min(sampling.max_new_tokens, context // 4)  # room kept for the answer when trimming
    ids, media, videos, left_out = fit_context(loaded, messages, media_options or {}, context, reply_tokens)
    budget = min(sampling.max_new_tokens, context - len(ids))
    stops = stop_token_ids(loaded)
    reply = Reply(prompt_tokens=len(ids), videos=videos, left_out=left_out)
    # Stop tokens never reach the decoder; other special tokens stay visible, since a thinking
    # model's <think>/</think> may be special tokens and the reasoning parser needs them.
    decoder = loaded.tokenizer.stream_decoder(skip_special_tokens=False)
    settings = dict(eos_token_ids=sorted(stops), **sampling.resolved(loaded.generation_config))
    if loaded.batcher is not None:
        tokens, step_lock = loaded.batcher.generate(ids, budget, cancel=cancel, **settings), nullcontext()
    else:
        tokens, step_lock = generate(loaded.model, ids, budget, **settings, **media), loaded.step_lock
    try:
        while True:
            if cancel is not None and cancel.is_set():
                reply.stop_reason = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                reply.stop_reason = "timeout"
                break
            with step_lock:
                token = next(tokens, None)
            if token is None:
                if cancel is not None and cancel.is_set():
                    reply.stop_reason = "cancelled"
                else:
                    reply.stop_reason = "max_new_tokens" if budget == sampling.max_new_tokens else "context"
                break
            now = time.perf_counter()
            reply.first_token_at = reply.first_token_at or now
            reply.last_token_at = now
            reply.new_tokens += 1
            if token in stops:
                reply.stop_reason = "eos"
                break
            reply.text += decoder.push(token)
            cut = min((i for i in (reply.text.find(s) for s in sampling.stop_strings if s) if i >= 0), default=-1)
            if cut >= 0:
                reply.text = reply.text[:cut]
                reply.stop_reason = "stop_string"
                break
            yield reply
    finally:
        tokens.close()  # frees the KV cache now, also when the consumer walked away
    yield reply
