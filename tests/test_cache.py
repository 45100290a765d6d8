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
