"""A cloned cache continues exactly like a cold prefill of the whole sequence (prefix reuse)."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights


def test_clone_is_independent_and_exact():
    config = tiny_config()
    model = ds4py.load(from_tensors(config, random_weights(config, seed=7)))
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, config.vocab_size, (261,), generator=g).tolist()
    a = torch.randint(0, config.vocab_size, (9,), generator=g).tolist()
    b = torch.randint(0, config.vocab_size, (70,), generator=g).tolist()
    base = model.new_cache()
    model.prefill(prefix, base)
    snapshot = base.clone()
    out_a = model.prefill(a, base)           # the original moves on
    out_b = model.prefill(b, snapshot)       # the clone takes another branch
    again = model.prefill(a, _reprefill(model, prefix))
    assert torch.allclose(out_a, again, atol=1e-5)
    assert torch.allclose(out_b, model.logits(prefix + b)[-1], atol=1e-5)
    assert base.length == len(prefix) + len(a) and snapshot.length == len(prefix) + len(b)


def _reprefill(model, prefix):
    cache = model.new_cache()
    model.prefill(prefix, cache)
    return cache


def test_decoding_window_lives_in_one_buffer_and_clones_stay_apart():
    """Decoding appends each key to the layer's window rows in place (no new window per token), past the rows'
    wrap-around (2 * window tokens); a clone taken mid-way and the original then decode different tokens (the
    original first, overwriting all its rows), each as a fresh prefill of its whole sequence does."""
    config = tiny_config()
    model = ds4py.load(from_tensors(config, random_weights(config, seed=7)))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (80,), generator=g).tolist()
    other = torch.randint(0, config.vocab_size, (40,), generator=g).tolist()
    cache = model.new_cache()
    model.prefill(ids[:30], cache)
    model.prefill([ids[30]], cache)
    rows = cache.layers[0].window_rows
    assert rows is not None and rows.shape[0] == 2 * config.sliding_window
    for t in ids[31:36]:
        model.prefill([t], cache)
        assert cache.layers[0].window_rows is rows and cache.layers[0].window_in_rows()
    snapshot = cache.clone()
    for t in ids[36:]:  # the original first, over every row of its buffer ...
        out = model.prefill([t], cache)
    for t in other:  # ... then the clone
        out_b = model.prefill([t], snapshot)
    assert torch.allclose(out, model.logits(ids)[-1], atol=1e-5)
    assert torch.allclose(out_b, model.logits(ids[:36] + other)[-1], atol=1e-5)
    assert cache.layers[0].window_rows is not snapshot.layers[0].window_rows


def test_drop_last_leaves_the_state_of_the_other_tokens():
    """After a call of two or three tokens and `drop_last`, decoding goes on exactly as from a cache that was
    never given the dropped token: at every offset of the ratio-4 and ratio-128 windows (the dropped token opening,
    filling or closing one, its window's overlap series included), through the prompt path and the decode path."""
    config = tiny_config()
    model = ds4py.load(from_tensors(config, random_weights(config, seed=7)))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (300,), generator=g).tolist()
    wrong = [(t + 1) % config.vocab_size for t in ids]
    full = model.logits(ids)
    cache = model.new_cache()
    model.prefill(ids[:120], cache)
    n, checked = 120, 0
    while n < 290:
        k = 1 + checked % 2  # calls of two and three tokens, their last a wrong guess
        out = model.prefill(ids[n:n + k] + [wrong[n + k]], cache, all_logits=True)
        assert (out[:k] - full[n:n + k]).abs().max().item() < 1e-4
        cache.drop_last()
        assert cache.tokens == ids[:n + k]
        n += k
        step = model.prefill([ids[n]], cache)  # then one token through the decode path
        assert (step - full[n]).abs().max().item() < 1e-4, f"position {n}"
        n += 1
        checked += 1
    assert checked > 60


def test_drop_last_needs_a_call_of_two_tokens():
    config = tiny_config()
    model = ds4py.load(from_tensors(config, random_weights(config, seed=7)))
    cache = model.new_cache()
    model.prefill([1, 2, 3], cache)
    model.prefill([4], cache)
    with pytest.raises(ValueError, match="two or more tokens"):
        cache.drop_last()
