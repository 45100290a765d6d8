"""The indexer's compiled scores and top-k (a decoding query, a prompt's rows) against its torch ops (`Indexer.totals`
then `stable_topk`)."""

from __future__ import annotations

import pytest
import torch

from ds4py.model import indexer_kernel
from ds4py.model.indexer import stable_topk


def torch_totals(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    return w[None] @ (q.float() @ keys.float().T).clamp_(min=0).mul_(scale)  # [1, n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H, hd, n, k", [(16, 16, 75, 3), (4, 32, 9, 9), (64, 128, 700, 512), (40, 24, 301, 17)])
def test_one_query_equals_the_torch_ops(H, hd, n, k, dtype):
    """The same scores up to float32 summation order and the same entries in the same order, including ties: a
    third of the entries score exactly 0 (every head's dot negative), where the earlier entry goes first."""
    gen = torch.Generator().manual_seed(H * n)
    q = torch.randn(H, hd, generator=gen).abs().to(dtype)  # q >= 0: keys <= 0 score exactly 0 on every head
    w = torch.randn(H, generator=gen)
    keys = torch.randn(n, hd, generator=gen)
    keys[::3] = -keys[::3].abs()
    keys = keys.to(dtype)
    scale = hd**-0.5
    done = indexer_kernel.index_rows(q[None], w[None], keys, None, scale, k)  # one query seeing every entry
    if done is None:
        pytest.skip("the indexer kernel could not be built here")
    top, totals = done[0], done[1][0]
    want = torch_totals(q, w, keys, scale)
    assert (totals[::3] == 0).all() and not torch.signbit(totals[::3]).any()
    torch.testing.assert_close(totals, want[0], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(top, stable_topk(totals[None], k))  # the order of stable_topk on these scores
    assert torch.equal(top, stable_topk(want, k))  # and on torch's (no near-ties in these cases)


def test_index_rows_declines_what_it_does_not_cover():
    q, w, keys = torch.randn(1, 200, 16), torch.randn(1, 200), torch.randn(10, 16)
    assert indexer_kernel.index_rows(q, w, keys, None, 0.25, 3) is None  # more than MAX_HEADS heads
    assert indexer_kernel.index_rows(q[:, :4], w[:, :4].double(), keys, None, 0.25, 3) is None  # float64 weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_index_rows_equals_the_masked_torch_ops(dtype):
    """A prefill block's queries, each seeing its own closed entries (none, fewer than k, all): the torch path's
    masked scores, stable top k and -1 past what a query sees."""
    gen = torch.Generator().manual_seed(5)
    T, H, hd, n, k = 23, 16, 16, 40, 6
    q = torch.randn(T, H, hd, generator=gen).abs().to(dtype)
    w = torch.randn(T, H, generator=gen)
    keys = torch.randn(n, hd, generator=gen)
    keys[::4] = -keys[::4].abs()  # exact-zero ties
    keys = keys.to(dtype)
    visible = torch.tensor([0, 1, 3, 5, 6, 7] + list(range(10, 27)))[:T].clamp(max=n)
    visible[-1] = n
    scale = hd**-0.5
    done = indexer_kernel.index_rows(q, w, keys, visible, scale, k)
    if done is None:
        pytest.skip("the indexer kernel could not be built here")
    top, totals = done
    want = torch.cat([torch_totals(q[t], w[t], keys, scale) for t in range(T)])  # [T, n]
    seen = torch.arange(n)[None, :] < visible[:, None]
    torch.testing.assert_close(totals[seen], want[seen], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    ref = stable_topk(want.masked_fill(~seen, float("-inf")), k)
    ref = torch.where(ref >= visible[:, None], -1, ref)
    assert torch.equal(top, ref)
    assert (top[0] == -1).all() and (top[1, 1:] == -1).all() and (top[-1] >= 0).all()
