"""One decoding token's compiled attention against `Attention.attend_one`'s torch ops."""

from __future__ import annotations

import pytest
import torch

from ds4py.model import attention_kernel
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


def test_attend_one_declines_large_problems_and_checks_indices():
    q, window, sinks = torch.randn(64, 512), torch.randn(127, 512), torch.randn(64)
    rotation = torch.ones(1, 32, dtype=torch.complex64)
    assert attention_kernel.attend_one(q, window, None, None, sinks, 0.04, rotation) is None  # V4 Flash's size
    small = attention_kernel.attend_one(q[:2, :32], window[:3, :32], None, None, sinks[:2], 0.2, rotation[:, :4])
    if small is None:
        pytest.skip("the attention kernel could not be built here")
    with pytest.raises(ValueError, match="entry indices"):
        attention_kernel.attend_one(q[:2, :32], window[:3, :32], window[:3, :32], torch.tensor([3]), sinks[:2], 0.2,
                                    rotation[:, :4])
