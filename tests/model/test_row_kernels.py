"""The compiled norms and rotation of rows (a decode step's few, a prompt chunk's hundreds) against the torch ops
they replace: float32 equal to its rounding (the mean of squares is summed in another order), bf16 within one
bf16 rounding of torch's."""

from __future__ import annotations

import pytest
import torch

from ds4py.model import norms, row_kernels
from ds4py.model.rope import Rotary, rotate

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def torch_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(row_kernels, "_load", lambda: None)
        return fn(*args)


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 2e-6 if dtype == torch.float32 else 2**-7  # bf16: one step (a tie may round the other way)
    err = (ours.float() - ref.float()).abs()
    return ours.dtype == ref.dtype and bool((err <= tol * ref.float().abs() + 1e-6).all())


@DTYPES
@pytest.mark.parametrize("shape", [(1, 1024), (3, 64, 96), (4096,), (300, 8, 40), (257, 4096)])
def test_compiled_rms_norms_match_torch(monkeypatch, dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    assert row_kernels.rms_norm(x, None, 1e-6) is not None, "the compiled norms did not build"
    for wdtype in (torch.float32, torch.bfloat16):
        w = torch.randn(shape[-1], generator=g).to(wdtype)
        ours = norms.rms_norm(x, w, 1e-6)
        assert close(ours, torch_path(monkeypatch, norms.rms_norm, x, w, 1e-6), dtype)
    ours = norms.unweighted_rms_norm(x, 1e-6)
    assert close(ours, torch_path(monkeypatch, norms.unweighted_rms_norm, x, 1e-6), dtype)


@DTYPES
@pytest.mark.parametrize("shape", [(1, 65, 512), (3, 96), (2, 4, 32), (300, 5, 32), (256, 65, 512)])
def test_compiled_rotation_matches_torch(monkeypatch, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    rot = Rotary.make(16 if shape[-1] > 32 else 8, 10000.0, None).rotation(torch.arange(5, 5 + shape[0]))
    for r in (rot, rot.conj()):
        ours = rotate(x, r)
        assert row_kernels.rotate(x, r) is not None
        assert close(ours, torch_path(monkeypatch, rotate, x, r), dtype)
    assert torch.allclose(rotate(rotate(x.double().float(), rot), rot.conj()), x.float(), atol=1e-5)


def test_rows_on_the_threads_equal_rows_alone():
    """A prompt's rows split over the threads give each row the bits it gets alone (no row depends on another)."""
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    w = torch.rand(96) + 0.5
    whole = row_kernels.rms_norm(x, w, 1e-6)
    assert all(torch.equal(whole[t:t + 1], row_kernels.rms_norm(x[t:t + 1], w, 1e-6)) for t in range(0, 300, 37))
    rot = Rotary.make(8, 10000.0, None).rotation(torch.arange(300))
    whole = row_kernels.rotate(x, rot)
    assert all(torch.equal(whole[t:t + 1], row_kernels.rotate(x[t:t + 1], rot[t:t + 1])) for t in range(0, 300, 37))


@DTYPES
@pytest.mark.parametrize("T", [1, 300])
def test_qkv_rows_equal_the_norms_concatenation_and_rotation(dtype, T):
    """A prompt's q heads and kv normed and rotated in one call: the bits of the compiled calls one by one."""
    gen = torch.Generator().manual_seed(T)
    H, hd = 4, 32
    q, kv = torch.randn(T, H * hd, generator=gen).to(dtype), torch.randn(T, hd, generator=gen).to(dtype)
    weight = torch.rand(hd, generator=gen) + 0.5
    rotation = Rotary.make(8, 10000.0, None).rotation(torch.arange(5, 5 + T))
    ours = row_kernels.qkv_rows(q, kv, H, weight, 1e-6, rotation)
    if ours is None:
        pytest.skip("the row kernels could not be built here")
    q_normed = norms.unweighted_rms_norm(q.view(T, H, hd), 1e-6)
    want = rotate(torch.cat([q_normed, norms.rms_norm(kv, weight, 1e-6).unsqueeze(1)], dim=1), rotation)
    assert ours.shape == (T, H + 1, hd) and torch.equal(ours, want)
    assert row_kernels.qkv_rows(q, kv, H + 1, weight, 1e-6, rotation) is None  # shapes that do not match
