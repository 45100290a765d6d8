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


def pair_order_totals(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The defined sums for bf16 q [T, H, hd] and keys [n, hd]: per head fused steps over head_dim in pairs, d + 1
    then d (exact products: bf16 x bf16 fits float32), then per lane (head % 16) w * (relu(dot) * scale) fused
    across the groups of 16 heads, the lanes summed as _mm512_reduce_add_ps does, + 0.0 -> [T, n]."""
    from tests.formats.test_simd_order import fma, reduce16

    T, H, hd = q.shape
    n, Hp = keys.shape[0], (H + 15) // 16 * 16
    qp, wp = torch.zeros(T, Hp, hd), torch.zeros(T, Hp)
    qp[:, :H], wp[:, :H] = q.float(), w
    kf = keys.float()
    dot = torch.zeros(T, Hp, n)
    for d in [i ^ 1 for i in range(hd)]:
        dot = fma(qp[:, :, d, None].expand(T, Hp, n), kf[None, None, :, d].expand(T, Hp, n), dot)
    lanes = torch.zeros(T, n, 16)
    for g in range(Hp // 16):
        relu = (dot[:, 16 * g:16 * g + 16].clamp(min=0) * scale).transpose(1, 2)  # [T, n, 16]
        lanes = fma(wp[:, None, 16 * g:16 * g + 16].expand(T, n, 16), relu, lanes)
    return reduce16(lanes) + 0.0


@pytest.mark.parametrize("H, hd, n", [(24, 16, 37), (64, 128, 70), (16, 16, 9), (128, 32, 23)])
def test_bf16_scores_are_the_pair_order_sums(H, hd, n):
    """bf16 queries and keys: the totals are the defined pair-order sums bit for bit, on this CPU's build (vdpbf16ps
    where it has AVX512-BF16) and on builds without AVX512-BF16 and without AVX512 (the code other CPUs run). The
    keys are a strided view (rows further apart than head_dim), as a cache's may be."""
    gen = torch.Generator().manual_seed(H + n)
    T = 3
    q = torch.randn(T, H, hd, generator=gen).bfloat16()
    w = torch.rand(T, H, generator=gen)
    keys = torch.randn(n, hd + 6, generator=gen).bfloat16()[:, 3:hd + 3]
    assert keys.stride(0) == hd + 6
    scale = hd**-0.5
    want = pair_order_totals(q, w, keys, scale)
    native = indexer_kernel.index_rows(q, w, keys, None, scale, 5)
    if native is None:
        pytest.skip("the indexer kernel could not be built here")
    assert torch.equal(native[1], want)
    for flags in (["-mno-avx512bf16"], ["-mno-avx512f"]):
        other = indexer_kernel.index_rows(q, w, keys, None, scale, 5, lib=indexer_kernel.build(flags))
        assert torch.equal(other[1], want), flags
        assert torch.equal(other[0], native[0]), flags


def test_top_k_of_many_and_of_few():
    """Both selections (a heap when k is a small part of what a query sees, else select then sort) give stable_topk's
    entries in its order, ties (exact zeros) to the earlier entry."""
    gen = torch.Generator().manual_seed(3)
    H, hd, n = 16, 16, 600
    q = torch.randn(4, H, hd, generator=gen).abs()
    w = torch.randn(4, H, generator=gen)
    keys = torch.randn(n, hd, generator=gen)
    keys[::3] = -keys[::3].abs()  # a third tie at exactly 0
    visible = torch.tensor([600, 300, 40, 7])
    for k in (5, 30, 300):  # 600 > 16 * 5: the heap; 30, 300: select then sort
        top, totals = indexer_kernel.index_rows(q, w, keys, visible, hd**-0.5, k)
        seen = torch.arange(n)[None, :] < visible[:, None]
        ref = stable_topk(totals.masked_fill(~seen, float("-inf")), k)
        assert torch.equal(top, torch.where(ref >= visible[:, None], -1, ref)), k
