"""The compiled norms and rotation of a few rows against the torch ops they replace: float32 equal to its
rounding (the mean of squares is summed in another order), bf16 within one bf16 rounding of torch's."""

from __future__ import annotations

import pytest
import torch

from ds4py.model import norms, row_kernels
from ds4py.model.rope import Rotary, rotate

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def torch_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(row_kernels, "MAX_T", -1)
        return fn(*args)


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 2e-6 if dtype == torch.float32 else 2**-7  # bf16: one step (a tie may round the other way)
    err = (ours.float() - ref.float()).abs()
    return ours.dtype == ref.dtype and bool((err <= tol * ref.float().abs() + 1e-6).all())


@DTYPES
@pytest.mark.parametrize("shape", [(1, 1024), (3, 64, 96), (4096,)])
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
@pytest.mark.parametrize("shape", [(1, 65, 512), (3, 96), (2, 4, 32)])
def test_compiled_rotation_matches_torch(monkeypatch, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    rot = Rotary.make(16 if shape[-1] > 32 else 8, 10000.0, None).rotation(torch.arange(5, 5 + shape[0]))
    for r in (rot, rot.conj()):
        ours = rotate(x, r)
        assert row_kernels.rotate(x, r) is not None
        assert close(ours, torch_path(monkeypatch, rotate, x, r), dtype)
    assert torch.allclose(rotate(rotate(x.double().float(), rot), rot.conj()), x.float(), atol=1e-5)


def test_long_inputs_use_torch():
    x = torch.randn(row_kernels.MAX_T + 1, 32)
    assert row_kernels.rms_norm(x, None, 1e-6) is None
    rot = Rotary.make(8, 10000.0, None).rotation(torch.arange(x.shape[0]))
    assert row_kernels.rotate(x, rot) is None
