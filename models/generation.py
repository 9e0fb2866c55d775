"""Token generation with a KV cache: prefill the prompt once, then one token per step.

`generate` is a Python generator, so a consumer streams tokens as they come and stops the work by
simply not asking for the next one (or calling `.close()`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .ernie4_5 import Ernie45ForCausalLM


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL-style: divide positive, multiply negative logits)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token id from fp32 logits [V]: temperature, then top-k, then top-p (nucleus)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


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
    greedy = not do_sample or temperature <= 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen[ids[0]] = True

    cache = model.new_cache(1, prompt_len + max_new_tokens)
    logits = model(ids, cache=cache, start=0, last_only=True, **media)
    for step in range(max_new_tokens):
        scores = logits[0, -1].float()
        if seen is not None:
            scores = apply_repetition_penalty(scores, seen, repetition_penalty)
        token = scores.argmax() if greedy else sample_token(scores, temperature, top_k, top_p, generator)
        token_id = int(token)
        yield token_id
        if token_id in stop or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[token] = True
        logits = model(token.view(1, 1), cache=cache, start=prompt_len + step)
