"""Speculative greedy decoding gives plain greedy decoding's tokens whatever the guesses: the MTP block's own,
always right, always wrong or mixed, across the compressors' window boundaries, stopping where plain decoding
stops."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.errors import Ds4pyError
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights
from ds4py.speculative import SpeculativeStats, speculative_greedy

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return ds4py.load(from_tensors(CONFIG, random_weights(CONFIG, seed=2)))


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, prompt, n, rule=None, stop=frozenset()):
    """Speculative decoding where `rule(i, right)` is the guess at the i-th new token (right: the plain answer)."""
    out, stats = [], SpeculativeStats()
    plain = model.generate(prompt, n, stop_token_ids=set(stop))
    guess = None
    if rule is not None:
        def guess(_hidden):
            i = len(out)  # the guess is at the token after the last one yielded
            return rule(i, plain[i] if i < len(plain) else 0)
    for step in speculative_greedy(model, prompt, n, set(stop), stats, guess):
        out.append(step.token)
    return out, plain, stats


def test_mtp_guesses_give_the_greedy_tokens(model):
    prompt = ids_of(250, 5)
    out, plain, stats = run(model, prompt, 80)  # crosses the ratio-128 boundary at 256 and 20 ratio-4 windows
    assert out == plain
    assert stats.steps > 0


@pytest.mark.parametrize("pattern", ["right", "wrong", "mixed"])
def test_any_guesses_give_the_greedy_tokens(model, pattern):
    prompt = ids_of(130, 6)  # chunks of 64 for the tiny preset: the MTP block follows the prompt across chunks
    model.prefill_chunk = 64
    try:
        rules = {
            "right": lambda i, right: right,
            "wrong": lambda i, right: (right + 1) % CONFIG.vocab_size,
            "mixed": lambda i, right: right if (i // 3) % 2 else (right + 7) % CONFIG.vocab_size,
        }
        out, plain, stats = run(model, prompt, 150, rules[pattern])
    finally:
        model.prefill_chunk = 10_000
    assert out == plain
    expected = {"right": stats.steps, "wrong": 0}.get(pattern)
    if expected is not None:
        assert stats.accepted == expected
    else:
        assert 0 < stats.accepted < stats.steps


def test_stops_where_greedy_stops(model):
    prompt = ids_of(40, 7)
    plain = model.generate(prompt, 30, stop_token_ids=set())
    stop = {plain[11]}  # a token greedy decoding reaches: both stop on its first appearance
    out, ref, _ = run(model, prompt, 30, lambda i, right: right, stop)
    assert out == ref and out[-1] in stop and len(out) <= 12
    for n in (1, 2, 3, 7):  # max_new_tokens reached on an accepted pair's first or second token
        assert run(model, prompt, n, lambda i, right: right)[0] == plain[:n]


def test_fills_the_context_as_greedy_does(model):
    prompt = ids_of(40, 8)
    plain = model.generate(prompt, 25, stop_token_ids=set())
    ctx, model.ctx = model.ctx, len(prompt) + 25  # as plain decoding needs: the guesses need no more
    try:
        out, ref, _ = run(model, prompt, 25, lambda i, right: right)
    finally:
        model.ctx = ctx
    assert out == ref == plain


def test_errors_say_what_to_do(model):
    with pytest.raises(Ds4pyError, match="greedy only"):
        model.generate([1, 2, 3], 4, temperature=0.7, speculative=True)
    config = tiny_config(num_nextn_predict_layers=0)
    plain = ds4py.load(from_tensors(config, random_weights(config, seed=1, mtp=False)))
    with pytest.raises(Ds4pyError, match="MTP block"):
        plain.generate([1, 2, 3], 4, speculative=True)
