"""A cloned cache continues exactly like a cold prefill of the whole sequence (prefix reuse)."""

from __future__ import annotations

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
