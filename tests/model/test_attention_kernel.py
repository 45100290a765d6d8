"""The compiled attention (one decoding token; a prompt's rows) against `Attention`'s torch ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ds4py.model import attention_kernel
from ds4py.model.attention import Attention
from ds4py.model.rope import rotate


def torch_attend(q, window, entries, top, sinks, scale, rotation):
    """The torch ops of Attention.attend_one."""
    H, hd = q.shape
    keys = window if entries is None else torch.cat([window, entries if top is None else entries[top]])
    logits = torch.mm(q, keys.T).float().mul_(scale)
    probs = torch.softmax(torch.cat([logits, sinks.view(H, 1)], dim=-1), dim=-1).to(q.dtype)
    return rotate(torch.mm(probs[:, :-1], keys).view(1, H, hd), rotation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["window", "all entries", "chosen entries", "no entries yet"])
def test_attend_one_equals_the_torch_ops(dtype, case):
    gen = torch.Generator().manual_seed(len(case))
    H, hd, S, n, half = 4, 32, 7, 30, 4
    q = torch.randn(H, hd, generator=gen).to(dtype)
    window = torch.randn(S, hd, generator=gen).to(dtype)
    entries = {"window": None, "no entries yet": torch.zeros(0, hd)}.get(case, torch.randn(n, hd, generator=gen))
    entries = None if entries is None else entries.to(dtype)
    top = torch.tensor([5, 0, 29, 11]) if case == "chosen entries" else None
    sinks = torch.randn(H, generator=gen)
    angle = torch.rand(1, half, generator=gen) * 6
    rotation = torch.polar(torch.ones_like(angle), angle).conj()  # the inverse rotation, as attend_one passes
    ours = attention_kernel.attend_one(q, window, entries, top, sinks, hd**-0.5, rotation)
    if ours is None:
        pytest.skip("the attention kernel could not be built here")
    want = torch_attend(q, window, entries, top, sinks, hd**-0.5, rotation)
    assert ours.shape == want.shape == (1, H, hd) and ours.dtype == dtype
    # float32: summation order; bf16: a value next to a rounding boundary may round the other way (one bf16 step)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (ours.float() - want.float()).abs().max() <= tol * want.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["window", "all entries", "chosen entries"])
def test_large_heads_equal_the_torch_ops(dtype, case, monkeypatch):
    """Problems over MAX_WORK (V4 Flash's 64 heads of 512) take `attend_heads` where torch has no native bf16
    GEMM: heads in blocks of 8 (12 here: one partial block), the softmax's own exp. Within the small path's
    bounds of torch, and of the small path itself."""
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    gen = torch.Generator().manual_seed(len(case) + 7)
    H, hd, S, n, half = 12, 64, 13, 37, 8
    q = torch.randn(H, hd, generator=gen).to(dtype) * 2
    window = torch.randn(S, hd, generator=gen).to(dtype)
    entries = None if case == "window" else torch.randn(n, hd, generator=gen).to(dtype)
    top = torch.tensor([5, 0, 36, 11, 20]) if case == "chosen entries" else None
    sinks = torch.randn(H, generator=gen)
    angle = torch.rand(1, half, generator=gen) * 6
    rotation = torch.polar(torch.ones_like(angle), angle).conj()
    small = attention_kernel.attend_one(q, window, entries, top, sinks, hd**-0.5, rotation)
    if small is None:
        pytest.skip("the attention kernel could not be built here")
    monkeypatch.setattr(attention_kernel, "MAX_WORK", 1)
    large = attention_kernel.attend_one(q, window, entries, top, sinks, hd**-0.5, rotation)
    want = torch_attend(q, window, entries, top, sinks, hd**-0.5, rotation)
    assert large.shape == want.shape == (1, H, hd) and large.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for got in (large, small):
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert (large.float() - small.float()).abs().max() <= tol * small.float().abs().max()
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")  # oneDNN's bf16 GEMM: torch's ops, or for bf16 the vdpbf16ps call
    native = attention_kernel.attend_one(q, window, entries, top, sinks, hd**-0.5, rotation)
    if dtype == torch.bfloat16 and attention_kernel.dp_heads():
        assert (native.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    else:
        assert native is None


def test_attend_one_checks_indices_and_head_sizes(monkeypatch):
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    q, window, sinks = torch.randn(64, 512), torch.randn(127, 512), torch.randn(64)
    rotation = torch.ones(1, 32, dtype=torch.complex64)
    small = attention_kernel.attend_one(q[:2, :32], window[:3, :32], None, None, sinks[:2], 0.2, rotation[:, :4])
    if small is None:
        pytest.skip("the attention kernel could not be built here")
    assert attention_kernel.attend_one(q, window, None, None, sinks, 0.04, rotation) is not None  # V4 Flash's size
    assert attention_kernel.attend_one(q[:, :40], window[:, :40], None, None, sinks, 0.2, rotation[:, :4]) is None
    for max_work in (attention_kernel.MAX_WORK, 1):  # both paths
        monkeypatch.setattr(attention_kernel, "MAX_WORK", max_work)
        with pytest.raises(ValueError, match="entry indices"):
            attention_kernel.attend_one(q[:2, :32], window[:3, :32], window[:3, :32], torch.tensor([3]), sinks[:2],
                                        0.2, rotation[:, :4])


def rows_against_torch(gen, case, dtype, cached, R, H, hd, window, half, k, n_top):
    """A prompt chunk's R rows for a kind of layer (`case`: window, ratio 128, ratio 4 with n_top entries, or ratio
    4 before any entry), through `attention_kernel.attend_rows` and through the torch ops of Attention.attend_rows
    -> (ours or None, torch's)."""
    ratio = 4
    q = torch.randn(R, H, hd, generator=gen).to(dtype)
    keys = torch.randn(cached + R, hd, generator=gen).to(dtype)
    positions = torch.arange(cached, cached + R)
    n = {"window": 0, "ratio 128": (cached + R) // ratio, "ratio 4": n_top, "ratio 4, no entries yet": 0}[case]
    entries = None if case == "window" else torch.randn(n, hd, generator=gen).to(dtype)
    top = visible = None
    if case.startswith("ratio 4"):
        top = torch.randint(-1, n, (R, k), generator=gen) if n else torch.empty(R, 0, dtype=torch.long)  # as Indexer
    elif case == "ratio 128":
        visible = (positions + 1) // ratio
    sinks = torch.randn(H, generator=gen)
    angle = torch.rand(R, half, generator=gen) * 6
    rotation = torch.polar(torch.ones_like(angle), angle).conj()
    ours = attention_kernel.attend_rows(q, keys, window, entries, top, visible, sinks, hd**-0.5, rotation)
    layer = SimpleNamespace(n_heads=H, head_dim=hd, window=window, sinks=sinks,
                            compressor=None if entries is None else SimpleNamespace(ratio=ratio))
    return ours, rotate(Attention.attend_rows(layer, q, keys, positions, entries, top), rotation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["window", "ratio 128", "ratio 4", "ratio 4, no entries yet"])
@pytest.mark.parametrize("cached", [0, 3, 7], ids=lambda c: f"cached {c}")
def test_attend_rows_equals_the_torch_ops(dtype, case, cached):
    """A prompt chunk's rows: each query over its own window (the cached keys, then the chunk's), the entries
    closed before it (ratio 128) or its indexer's top-k with -1 for none (ratio 4), and the sink."""
    R, H, hd = 21, 4, 32
    ours, want = rows_against_torch(torch.Generator().manual_seed(len(case) + cached), case, dtype, cached, R, H, hd,
                                    window=8, half=4, k=3, n_top=6)
    if ours is None:
        pytest.skip("the attention kernel could not be built here")
    assert ours.shape == want.shape == (R, H, hd) and ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (ours.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_attend_rows_declines_large_problems_and_checks_indices():
    q, keys, sinks = torch.randn(4, 64, 512), torch.randn(131, 512), torch.randn(64)
    rotation = torch.ones(4, 32, dtype=torch.complex64)
    assert attention_kernel.attend_rows(q, keys, 128, None, None, None, sinks, 0.04, rotation) is None  # V4 Flash
    args = (q[:, :2, :32], keys[:6, :32], 8)
    if attention_kernel.attend_rows(*args, None, None, None, sinks[:2], 0.2, rotation[:, :4]) is None:
        pytest.skip("the attention kernel could not be built here")
    assert attention_kernel.attend_rows(q[:, :2, :24], keys[:6, :24], 8, None, None, None, sinks[:2], 0.2,
                                        rotation[:, :4]) is None  # head_dim not a multiple of 16: torch's ops
    with pytest.raises(ValueError, match="entry indices"):
        attention_kernel.attend_rows(*args, keys[:3, :32], torch.full((4, 2), 3), None, sinks[:2], 0.2,
                                     rotation[:, :4])


@pytest.mark.parametrize("case", ["window", "ratio 128", "ratio 4", "ratio 4, no entries yet"])
@pytest.mark.parametrize("H, hd, cached", [(20, 128, 0), (20, 128, 33), (64, 512, 130)])
def test_large_bf16_heads_equal_the_torch_ops(case, H, hd, cached, monkeypatch):
    """A prompt's large bf16 heads (`ds4py_attend_rows_dp`, vdpbf16ps, where the CPU has AVX512-BF16): the torch
    ops' values up to bf16 rounding, for every kind of layer, heads not a multiple of 16, odd numbers of window
    keys and entries (the pairs' zero padding), and V4 Flash's 64 heads of 512 over a full window."""
    if not attention_kernel.dp_heads():
        pytest.skip("no AVX512-BF16 here: large heads take torch's ops")
    monkeypatch.setattr(attention_kernel, "MAX_WORK", 1)  # every size counts as large
    ours, want = rows_against_torch(torch.Generator().manual_seed(H + cached + len(case)), case, torch.bfloat16,
                                    cached, 9, H, hd, window=128 if hd == 512 else 16, half=32, k=24, n_top=41)
    assert ours is not None and ours.dtype == torch.bfloat16
    assert (ours.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


@pytest.mark.parametrize("case", ["window", "all entries", "top entries"])
@pytest.mark.parametrize("H, hd", [(20, 128), (64, 512)])
def test_one_token_large_bf16_heads_equal_the_torch_ops(case, H, hd):
    """One decoding token's large bf16 heads (`attend_one` through `ds4py_attend_rows_dp`, the heads split over the
    threads by 16) against the one-token torch ops, within bf16 rounding."""
    if not attention_kernel.dp_heads():
        pytest.skip("no AVX512-BF16 here: large heads take torch's ops")
    gen = torch.Generator().manual_seed(H + len(case))
    S, n, k = 128, 300, 64
    q = torch.randn(H, hd, generator=gen).bfloat16()
    window = torch.randn(S, hd, generator=gen).bfloat16()
    entries = None if case == "window" else torch.randn(n, hd, generator=gen).bfloat16()
    top = torch.randperm(n, generator=gen)[:k] if case == "top entries" else None
    sinks = torch.randn(H, generator=gen)
    rotation = torch.polar(torch.ones(1, 32), torch.rand(1, 32, generator=gen) * 6).conj()
    ours = attention_kernel.attend_one(q, window, entries, top, sinks, hd**-0.5, rotation)
    assert ours is not None and ours.shape == (1, H, hd)
    want = torch_attend(q, window, entries, top, sinks, hd**-0.5, rotation)
    assert (ours.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


def test_large_bf16_heads_give_a_token_the_same_bits_in_a_prompt_and_decoding(monkeypatch):
    """With the vdpbf16ps call a prompt's query r (all heads in one pass) and the same token decoded alone (its
    window's keys, the heads split over the threads by 16) give the same bits: each head's sums do not depend on
    how the heads or the queries are grouped."""
    if not attention_kernel.dp_heads():
        pytest.skip("no AVX512-BF16 here: large heads take torch's ops")
    monkeypatch.setattr(attention_kernel, "MAX_WORK", 1)  # every size counts as large
    gen = torch.Generator().manual_seed(11)
    R, H, hd, window, n, k, cached = 5, 40, 128, 16, 50, 12, 20
    q = torch.randn(R, H, hd, generator=gen).bfloat16()
    keys = torch.randn(cached + R, hd, generator=gen).bfloat16()
    entries = torch.randn(n, hd, generator=gen).bfloat16()
    top = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(R)])
    sinks = torch.randn(H, generator=gen)
    rotation = torch.polar(torch.ones(R, 16), torch.rand(R, 16, generator=gen) * 6).conj()
    prompt = attention_kernel.attend_rows(q, keys, window, entries, top, None, sinks, hd**-0.5, rotation)
    for r in range(R):
        own = cached + r
        alone = attention_kernel.attend_one(q[r], keys[own - window + 1:own + 1], entries, top[r], sinks, hd**-0.5,
                                            rotation[r:r + 1])
        assert torch.equal(alone[0], prompt[r]), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_attend_one_rotates_as_the_rows_rotation(dtype):
    """One key and sinks of -inf: each head's weight is exactly 1 and its output is the key, so the output's rotation
    is the only rounding, and it is the rows' rotation (`rotate`: ds4py_rope_rows) bit for bit, for the rotation and
    its inverse."""
    gen = torch.Generator().manual_seed(3)
    H, hd, half = 4, 32, 8
    q = torch.randn(H, hd, generator=gen).to(dtype)
    key = (torch.randn(1, hd, generator=gen) * 30).to(dtype)
    sinks = torch.full((H,), float("-inf"))
    angle = torch.rand(1, half, generator=gen) * 6
    for rotation in (torch.polar(torch.ones_like(angle), angle), torch.polar(torch.ones_like(angle), angle).conj()):
        ours = attention_kernel.attend_one(q, key, None, None, sinks, hd**-0.5, rotation)
        if ours is None:
            pytest.skip("the attention kernel could not be built here")
        assert torch.equal(ours, rotate(key.expand(H, hd).reshape(1, H, hd), rotation))
