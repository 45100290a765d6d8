"""Sampling against plain reference computations."""

from __future__ import annotations

import math

import torch

from ds4py.sampling import Sampler, SamplingParams, StopMatcher, apply_penalties, filter_logits, greedy

g = torch.Generator().manual_seed(0)
LOGITS = torch.randn(50, generator=g) * 2


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_top_p_min_p_match_simple_loops():
    probs = torch.softmax(LOGITS, -1).tolist()
    order = sorted(range(50), key=lambda i: -probs[i])
    assert kept(filter_logits(LOGITS.clone(), SamplingParams(top_k=7))) == set(order[:7])
    # top-p: the smallest prefix of the ranking whose mass reaches p
    mass, expected = 0.0, set()
    for i in order:
        expected.add(i)
        mass += probs[i]
        if mass >= 0.8:
            break
    assert kept(filter_logits(LOGITS.clone(), SamplingParams(top_p=0.8))) == expected
    top = max(probs)
    assert kept(filter_logits(LOGITS.clone(), SamplingParams(min_p=0.1))) == {i for i in range(50)
                                                                            if probs[i] >= 0.1 * top}


def test_penalties():
    prev = [3, 3, 5, 9]  # prompt [3], generated [3, 5, 9]
    out = apply_penalties(LOGITS.clone(), SamplingParams(repetition_penalty=1.3), prev, n_prompt=1)
    for i in range(50):
        x = LOGITS[i].item()
        want = (x / 1.3 if x > 0 else x * 1.3) if i in (3, 5, 9) else x
        assert math.isclose(out[i].item(), want, rel_tol=1e-6)
    out = apply_penalties(LOGITS.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prev, 1)
    assert math.isclose(out[3].item(), LOGITS[3].item() - 0.5 - 0.25, rel_tol=1e-6)  # once in the output
    assert out[0].item() == LOGITS[0].item()


def test_greedy_seeded_and_distribution():
    token, info = Sampler(SamplingParams()).sample(LOGITS, [])
    assert token == int(LOGITS.argmax()) and math.isclose(info.logprob, torch.log_softmax(LOGITS, -1).max().item())
    p = SamplingParams(temperature=0.7, seed=42, logprobs=3)
    a = [Sampler(p).sample(LOGITS, [])[0] for _ in range(3)]
    b = [Sampler(p).sample(LOGITS, [])[0] for _ in range(3)]
    assert a == b
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    draws = torch.tensor([s.sample(LOGITS, [])[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=50).float() / 3000
    assert (freq - torch.softmax(LOGITS, -1)).abs().max() < 0.03
    assert len(Sampler(p).sample(LOGITS, [])[1].top) == 3
    k3 = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=5))
    assert {k3.sample(LOGITS, [])[0] for _ in range(500)} <= set(LOGITS.topk(3).indices.tolist())


def test_stop_strings_hold_back_and_trim():
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d> tail") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ate of things") == ("STate of things", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_greedy_is_torch_argmax():
    """numpy's argmax on the CPU: the first of equal maxima, a NaN the largest, as torch.argmax."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(129280, generator=gen), torch.zeros(7), torch.tensor([1.0, 3.0, 3.0, 2.0]),
             torch.tensor([-float("inf"), -float("inf")]), torch.tensor([1.0, float("nan"), 5.0, float("nan")]),
             torch.tensor([float("inf"), 1.0, float("inf")]), torch.randn(50, generator=gen).double(),
             torch.randn(64, generator=gen)[::2], torch.randn(33, generator=gen).bfloat16()]
    ties = torch.randn(1000, generator=gen).round()
    cases.append(ties)
    for logits in cases:
        assert greedy(logits) == int(logits.argmax()), logits
    with torch.inference_mode():
        x = torch.randn(100, generator=gen)
        assert greedy(x) == int(x.argmax())
