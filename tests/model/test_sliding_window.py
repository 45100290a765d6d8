"""The blocked sliding window against the plain one: every query scored against every key of the chunk,
the keys outside its window masked."""

from __future__ import annotations

import pytest
import torch

from ds4py.model.sliding_window import WindowBlocks


def plain_window(q: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """q [T, H, hd], keys [S, hd] (the last T are the queries' own) -> softmax-weighted keys [T, H, hd]."""
    T, S = q.shape[0], keys.shape[0]
    key_pos = torch.arange(S) - (S - T)  # the queries are at 0..T-1
    dist = torch.arange(T)[:, None] - key_pos[None, :]
    hidden = (dist < 0) | (dist >= window)
    logits = torch.einsum("thd,sd->ths", q, keys).masked_fill(hidden[:, None], float("-inf"))
    return torch.einsum("ths,sd->thd", logits.softmax(-1), keys)


@pytest.mark.parametrize("T,cached,window", [(1, 0, 8), (7, 0, 8), (7, 7, 8), (40, 3, 8), (33, 127, 128),
                                             (16, 0, 1), (50, 5, 200)])
def test_blocks_equal_the_masked_whole_chunk(T, cached, window):
    g = torch.Generator().manual_seed(T * 1000 + cached)
    q, keys = torch.randn(T, 3, 24, generator=g, dtype=torch.float64), torch.randn(cached + T, 24, generator=g,
                                                                                 dtype=torch.float64)
    w = WindowBlocks.make(keys, T, window)
    logits = w.logits(q).masked_fill(w.hidden, float("-inf"))
    assert logits.shape[:2] == (T, 3)
    ours = w.values(logits.softmax(-1))
    assert torch.allclose(ours, plain_window(q, keys, window), atol=1e-12)


def test_keys_beyond_the_window_are_out_of_reach():
    """A cache holding more than window - 1 keys: the oldest are dropped, not read."""
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(5, 2, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g,
                                                                                dtype=torch.float64)
    w = WindowBlocks.make(keys, 5, 4)
    ours = w.values(w.logits(q).masked_fill(w.hidden, float("-inf")).softmax(-1))
    assert torch.allclose(ours, plain_window(q, keys, 4), atol=1e-12)
