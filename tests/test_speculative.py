"""Speculative decoding, greedy, gives plain greedy decoding's tokens whatever the guesses: the MTP block's own,
always right, always wrong or mixed, across the compressors' window boundaries, stopping where plain decoding
stops; sampled, it draws each token from plain sampling's distribution (a chi-square test against the exact one)."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.errors import Ds4pyError
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights
from ds4py.sampling import Sampler, SamplingParams
from ds4py.speculative import SpeculativeStats, speculative_decode

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
        def guess(_hidden, _ids):
            i = len(out)  # the guess is at the token after the last one yielded
            logits = torch.zeros(CONFIG.vocab_size)
            logits[rule(i, plain[i] if i < len(plain) else 0)] = 100.0
            return logits
    for step in speculative_decode(model, prompt, n, set(stop), stats, draft_logits=guess):
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
    config = tiny_config(num_nextn_predict_layers=0)
    plain = ds4py.load(from_tensors(config, random_weights(config, seed=1, mtp=False)))
    with pytest.raises(Ds4pyError, match="MTP block"):
        plain.generate([1, 2, 3], 4, speculative=True)


def chi_square_ok(counts: dict, expected: dict, n: int) -> tuple[bool, float, float]:
    """Pearson's test of `counts` (of n draws) against probabilities `expected`, cells under 5 expected draws pooled;
    the critical value at p = 1e-4 by Wilson and Hilferty's approximation."""
    cells = [k for k, p in expected.items() if p * n >= 5]
    rest = 1 - sum(expected[k] for k in cells)
    stat = sum((counts.get(k, 0) - expected[k] * n) ** 2 / (expected[k] * n) for k in cells)
    observed_rest = n - sum(counts.get(k, 0) for k in cells)
    df = len(cells) - 1
    if rest * n >= 5:
        stat += (observed_rest - rest * n) ** 2 / (rest * n)
        df += 1
    else:
        assert observed_rest <= max(5, 3 * rest * n), "draws outside the distribution's support"
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat < critical, stat, critical


def test_sampled_tokens_have_plain_sampling_distribution(model):
    """The first three tokens of 2000 seeded runs: the pairs (t1, t2) and the third token t3 against their exact
    distributions under top-k 6 at temperature 1, with guesses drawn from a noisy copy of the main model's own
    distribution (about half kept: both the kept guesses and the draws from max(0, p - q) are exercised). A rule
    that keeps every guess, or draws a rejected token from p instead of p - q, fails."""
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = ids_of(30, 11)

    def dist(ids):
        probs = Sampler(params, CONFIG.vocab_size, len(prompt)).probs(model.logits(ids)[-1], ids)
        return {i: float(probs[i]) for i in torch.nonzero(probs).flatten().tolist()}

    pairs, thirds = {}, {}
    p1 = dist(prompt)
    for a, pa in p1.items():
        p2 = dist(prompt + [a])
        for b, pb in p2.items():
            pairs[a, b] = pa * pb
            for c, pc in dist(prompt + [a, b]).items():
                thirds[c] = thirds.get(c, 0.0) + pa * pb * pc

    def noisy(_hidden, ids):
        g = torch.Generator().manual_seed(len(ids) * 1000 + ids[-1])
        return model.logits(ids)[-1] + torch.randn(CONFIG.vocab_size, generator=g) * 0.5

    n, seen_pairs, seen_thirds, stats = 2000, {}, {}, SpeculativeStats()
    for seed in range(n):
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=6, seed=seed), CONFIG.vocab_size, len(prompt))
        a, b, c = (s.token for s in speculative_decode(model, prompt, 3, set(), stats, sampler, noisy))
        seen_pairs[a, b] = seen_pairs.get((a, b), 0) + 1
        seen_thirds[c] = seen_thirds.get(c, 0) + 1
    assert 0.2 < stats.acceptance < 0.8, stats
    for seen, exact in ((seen_pairs, pairs), (seen_thirds, thirds)):
        ok, stat, critical = chi_square_ok(seen, exact, n)
        assert ok, (stat, critical)


@pytest.mark.parametrize("pattern", ["right", "wrong", "mixed"])
def test_a_later_turn_continues_from_the_cache(model, pattern):
    """A cache left by speculative decoding (its MTP block's state with it) continues a longer prompt as a fresh
    speculative run over that whole prompt does (the same tokens, the same MTP logits at every guess, so its state
    came along): after a turn that ran out, after one whose reader stopped early (the generator closed mid-step),
    and from a clone; a cache filled by plain decoding is refused."""
    rules = {"right": lambda i, right: right, "wrong": lambda i, right: (right + 1) % CONFIG.vocab_size,
             "mixed": lambda i, right: right if i % 3 else (right + 3) % CONFIG.vocab_size}
    first = ids_of(70, 12)
    cache = model.new_cache()
    out1 = [s.token for s in speculative_decode(model, first, 9, set(), cache=cache)]
    assert out1 == model.generate(first, 9, stop_token_ids=set())
    second = first + out1 + ids_of(20, 13)
    steps = speculative_decode(model, second, 30, set(), cache=cache)
    out2 = [next(steps).token for _ in range(7)]  # the reader stops after 7 tokens
    steps.close()
    third = second + out2 + ids_of(5, 14)
    plain = model.generate(third, 25, stop_token_ids=set())

    def continued(c):
        out, seen = [], []

        def guess(hidden, _ids):
            seen.append(model.transformer.logits(hidden)[0])  # the MTP block's own logits
            logits = torch.zeros(CONFIG.vocab_size)
            logits[rules[pattern](len(out), plain[len(out)] if len(out) < len(plain) else 0)] = 100.0
            return logits

        for s in speculative_decode(model, third, 25, set(), draft_logits=guess, cache=c):
            out.append(s.token)
        return out, torch.stack(seen)

    fork = cache.clone()
    fresh_tokens, fresh_mtp = continued(None)
    for c in (cache, fork):
        tokens, mtp = continued(c)
        assert tokens == fresh_tokens == plain
        assert (mtp - fresh_mtp).abs().max().item() < 1e-4
    filled = model.new_cache()
    model.prefill(first, filled)
    with pytest.raises(Ds4pyError, match="filled without speculative decoding"):
        next(speculative_decode(model, first + [1, 2], 4, set(), cache=filled))


def test_chunks_yield_between_prompt_chunks(model):
    """With `chunks` (the server's turns), None comes after each prompt chunk but the last, then the same tokens."""
    prompt = ids_of(150, 15)
    model.prefill_chunk = 64
    try:
        out = list(speculative_decode(model, prompt, 6, set(), chunks=True))
    finally:
        model.prefill_chunk = 10_000
    assert out[:2] == [None, None] and None not in out[2:]
    assert [s.token for s in out[2:]] == model.generate(prompt, 6, stop_token_ids=set())
