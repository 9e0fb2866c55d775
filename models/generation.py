"""Token generation with a KV cache: prefill the prompt once, then one token per step.

`generate` is a Python generator, so a consumer streams tokens as they come and stops the work by
simply not asking for the next one (or calling `.close()`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .compiled import decode_step
from .ernie4_5 import Ernie45ForCausalLM


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL-style: divide positive, multiply negative logits)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sampling_distribution(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(candidate ids or None for the whole vocabulary, their probabilities) from fp32 logits [V]:
    temperature, then top-k, then top-p (nucleus), as transformers' warpers do. Top-p works on
    the top-k candidates only, so a token costs one top-k over the vocabulary instead of a sort
    of all of it (103k entries)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, candidates = torch.topk(logits, top_k)
    elif top_p < 1.0:
        values, candidates = torch.sort(logits, descending=True)
    else:
        return None, logits.softmax(-1)
    if top_p < 1.0:
        # Keep the most likely tokens whose mass reaches top_p: drop a token when the mass of the
        # tokens at most as likely as it (itself included) is <= 1 - top_p; never the top one.
        drop = values.flip(0).softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        values = values.masked_fill(drop.flip(0), float("-inf"))
    return candidates, values.softmax(-1)


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token id from fp32 logits [V] (see `sampling_distribution`)."""
    candidates, probs = sampling_distribution(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)[0]
    return choice if candidates is None else candidates[choice]


class Sampler:
    """One request's choice of the next token: repetition penalty over the tokens seen so far,
    then greedy, or sampling with the request's own seeded generator (so concurrent requests
    never share random state)."""

    def __init__(
        self,
        prompt_ids: torch.Tensor,
        vocab_size: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> None:
        device = prompt_ids.device
        self.greedy = not do_sample or temperature <= 0
        self.temperature, self.top_k, self.top_p, self.penalty = temperature, top_k, top_p, repetition_penalty
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt_ids.reshape(-1)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (a 0-d tensor) from one position's logits [V]."""
        scores = logits.float()
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, self.penalty)
        token = scores.argmax() if self.greedy else sample_token(scores, self.temperature, self.top_k, self.top_p, self.generator)
        if self.seen is not None:
            self.seen[token] = True
        return token


@torch.inference_mode()
def generate(
    model: Ernie45ForCausalLM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids for one prompt, stopping after an eos id.

    `eos_token_ids` defaults to the config's eos ids. Greedy unless `do_sample` (a temperature of 0
    also means greedy). `seed` makes sampling reproducible without touching global RNG state.
    A VL model takes the prompt's images and videos (as the processor returns them) at prefill.
    """
    media = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                 pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    media = {name: value for name, value in media.items() if value is not None}  # text models take none
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    prompt_len = ids.shape[1]
    if prompt_len == 0:
        raise ValueError("generate needs at least one prompt token")
    if max_new_tokens <= 0:
        return
    stop = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    sampler = Sampler(ids, model.config.vocab_size, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
    cache = model.new_cache(1, prompt_len + max_new_tokens)
    logits = model(ids, cache=cache, start=0, last_only=True, **media)
    for step in range(max_new_tokens):
        token = sampler(logits[0, -1])
        token_id = int(token)
        yield token_id
        if token_id in stop or step == max_new_tokens - 1:
            return
        logits = decode_step(model, token.view(1, 1), cache, prompt_len + step)
