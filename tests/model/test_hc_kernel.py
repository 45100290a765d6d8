"""The compiled hyper-connection weights equal the torch ops they replace (to float32 rounding)."""

from __future__ import annotations

import pytest
import torch

from ds4py.model.hc_kernel import hc_weights
from ds4py.model.hyper_connection import HyperConnection


@pytest.mark.parametrize("hc,T", [(4, 1), (4, 37), (2, 5)])
def test_compiled_hc_weights_match_torch(hc, T):
    g = torch.Generator().manual_seed(hc * 100 + T)
    n = (2 + hc) * hc
    h = HyperConnection(fn=torch.randn(n, hc * 64, generator=g), base=torch.randn(n, generator=g),
                        scale=torch.rand(3, generator=g) * 3, hc=hc, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    mix = torch.randn(T, (2 + hc) * hc, generator=g) * 3
    compiled = hc_weights(mix, h.base, h.scale, hc, h.sinkhorn_iters, h.hc_eps)
    assert compiled is not None, "the compiled hyper-connection weights did not build"
    for ours, ref in zip(compiled, h.weights_torch(mix), strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-6
