"""Sampling against transformers' logits processors on the same logits: repetition penalty,
temperature, top-k and top-p give the same distribution; seeds make samples reproducible."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models.generation import Sampler, apply_repetition_penalty, sample_token, sampling_distribution

VOCAB = 103424  # ERNIE 4.5's vocabulary: the size that made the sort-based top-p slow


def reference_probs(logits, temperature, top_k, top_p):
    """transformers' warpers in generate's order, then softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits[None].clone())[0].softmax(-1)


def dense(candidates, probs):
    out = torch.zeros(VOCAB)
    return probs if candidates is None else out.index_put((candidates,), probs)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 0, 1.0), (0.7, 50, 1.0), (0.8, 0, 0.9), (1.3, 50, 0.8), (0.6, 20, 0.5), (1.0, 1000, 0.95)])
def test_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    for seed in range(3):
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
        ours = dense(*sampling_distribution(logits, temperature, top_k, top_p))
        expected = reference_probs(logits, temperature, top_k, top_p)
        assert torch.equal(ours > 0, expected > 0)  # the same tokens kept
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(VOCAB) * 3
    seen_ids = torch.randint(0, VOCAB, (40,))
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[seen_ids] = True
    for penalty in (1.3, 0.8):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen_ids[None], logits[None].clone())[0]
        assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


def test_sampler_follows_the_penalised_distribution_and_its_seed():
    prompt = torch.tensor([5, 9, 9, 12])
    logits = torch.zeros(VOCAB)
    logits[[5, 9, 12, 40]] = torch.tensor([6.0, 6.0, 6.0, 5.0])
    greedy = Sampler(prompt, VOCAB, repetition_penalty=2.0)
    assert int(greedy(logits)) == 40  # the seen tokens were penalised below it
    samples = [[int(Sampler(prompt, VOCAB, do_sample=True, top_k=3, seed=s)(logits)) for _ in range(5)] for s in (7, 7, 8)]
    assert samples[0] == samples[1]
    assert all(token in (5, 9, 12) for token in samples[0] + samples[2])


def test_sample_token_draws_from_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2] + [1e-9] * 97))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, top_k=3, generator=generator) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=3)[:3].float() / 4000
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
