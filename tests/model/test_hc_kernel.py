"""The compiled hyper-connection code (the mixing weights, collapse and expand) against the torch ops it replaces:
equal to float32 rounding, and in bf16 within one rounding of the exact value."""

from __future__ import annotations

import pytest
import torch

from ds4py.model import hc_kernel
from ds4py.model.hc_kernel import hc_collapse, hc_expand, hc_weights
from ds4py.model.hyper_connection import HyperConnection


@pytest.mark.parametrize("hc,T", [(4, 1), (4, 37), (2, 5), (4, 300)])
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


def random_hyper(hc: int, D: int, seed: int) -> HyperConnection:
    g = torch.Generator().manual_seed(seed)
    n = (2 + hc) * hc
    return HyperConnection(fn=torch.randn(n, hc * D, generator=g) / D**0.5, base=torch.randn(n, generator=g),
                           scale=torch.rand(3, generator=g) * 3, hc=hc, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)


def torch_collapse(h: HyperConnection, streams: torch.Tensor):
    pre, post, comb = h.weights(streams)
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype), post, comb


# D = 1101: fn of 24 x 4404 float32 (423 KB), past the size from which a prompt's projection goes by chunks, with a
# tail of 4 values after the last 16
@pytest.mark.parametrize("T,D", [(1, 96), (3, 96), (300, 96), (3, 1101), (300, 1101)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_collapse_matches_torch(T, D, dtype):
    h = random_hyper(4, D, T)
    streams = torch.randn(T, 4, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    fused = hc_collapse(streams, h.fn, h.base, h.scale, h.sinkhorn_iters, h.hc_eps, h.norm_eps)
    assert fused is not None, "the compiled collapse did not build"
    x, post, comb = fused
    rx, rpost, rcomb = torch_collapse(h, streams)
    assert x.dtype == dtype and x.shape == (T, D)
    # the projection's float32 sums in another order than torch's matmul, through sigmoids and 20 Sinkhorn steps:
    # ~1e-6 per token, up to 2.3e-6 over 300 tokens
    assert (post - rpost).abs().max() < 5e-6 and (comb - rcomb).abs().max() < 5e-6
    # float32: the same sums in another order; bf16: the same float32 value rounded (ties may round apart)
    # (plus pre's own difference, above, times the streams)
    tol, atol = (1e-6 if dtype == torch.float32 else 2**-7), 5e-6 * streams.float().abs().max()  # bf16: one step
    assert ((x.float() - rx.float()).abs() <= tol * rx.float().abs() + atol).all()


@pytest.mark.parametrize("T", [1, 3, 300])  # 300: a prompt chunk (small streams: still one call)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_collapse_normed_equals_collapse_then_norm(T, dtype):
    """The block's collapse and its RMS norm in one call give the bits of the collapse, then the norm."""
    from ds4py.model.norms import rms_norm

    h = random_hyper(4, 96, T + 1)
    gen = torch.Generator().manual_seed(8)
    streams = torch.randn(T, 4, 96, generator=gen).to(dtype)
    weight = torch.rand(96, generator=gen) + 0.5
    x, post, comb = h.collapse(streams)
    nx, npost, ncomb = h.collapse_normed(streams, weight, 1e-6)
    assert torch.equal(nx, rms_norm(x, weight, 1e-6)) and torch.equal(npost, post) and torch.equal(ncomb, comb)
    fused = hc_collapse(streams, h.fn, h.base, h.scale, h.sinkhorn_iters, h.hc_eps, h.norm_eps, norm=(weight, 1e-6))
    assert fused is not None and torch.equal(fused[0], nx)


@pytest.mark.parametrize("T", [1, 3, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_expand_then_collapse_in_one_call_equals_the_two(T, dtype, monkeypatch):
    """A block's attention expand and its ffn collapse (+ norm) in one call give the bits of the two calls; where
    the call does not apply (here: forced) the two run."""
    from ds4py.model import hyper_connection

    h = random_hyper(4, 96, T + 2)
    gen = torch.Generator().manual_seed(9)
    streams = torch.randn(T, 4, 96, generator=gen).to(dtype)
    out = torch.randn(T, 96, generator=gen).to(dtype)
    weight = torch.rand(96, generator=gen) + 0.5
    _, post, comb = random_hyper(4, 96, T + 3).collapse(streams)
    fused = h.expand_collapse_normed(out, streams, post, comb, weight, 1e-6)
    nxt = HyperConnection.expand(out, streams, post, comb)
    want = (nxt, *h.collapse_normed(nxt, weight, 1e-6))
    assert all(torch.equal(a, b) for a, b in zip(fused, want, strict=True))
    monkeypatch.setattr(hyper_connection, "hc_expand_collapse", lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(h.expand_collapse_normed(out, streams, post, comb, weight, 1e-6),
                                                 want, strict=True))


@pytest.mark.parametrize("T", [2, 300])  # 300: a prefill chunk, split over threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_expand_matches_float64(dtype, T):
    g = torch.Generator().manual_seed(8)
    hc, D = 4, 96
    streams, out = torch.randn(T, hc, D, generator=g).to(dtype), torch.randn(T, D, generator=g).to(dtype)
    _, post, comb = random_hyper(hc, D, 9).weights(streams)
    exact = (comb.double().transpose(-1, -2) @ streams.double()
             + post.double().unsqueeze(-1) * out.double().unsqueeze(-2))
    fused = hc_expand(out, streams, post, comb)
    assert fused is not None and fused.dtype == dtype and fused.shape == (T, hc, D)
    # computed in float32 and rounded once: within half an ulp of the dtype (plus float32 sums) of the exact value
    ulp = 2**-23 if dtype == torch.float32 else 2**-7
    assert ((fused.double() - exact).abs() <= ulp * exact.abs() + 1e-5).all()
    torch_path = HyperConnection.expand_torch(out, streams, post, comb)
    assert ((fused.double() - exact).abs().max() <= (torch_path.double() - exact).abs().max() + 1e-6)


def test_autograd_and_the_switch_use_torch(monkeypatch):
    h = random_hyper(4, 32, 1)
    with monkeypatch.context() as m:
        m.setattr(hc_kernel, "COMPILED_COLLAPSE", False)
        assert hc_collapse(torch.randn(2, 4, 32), h.fn, h.base, h.scale, 20, 1e-6, 1e-6) is None
    s = torch.randn(1, 4, 32, requires_grad=True)
    assert hc_collapse(s, h.fn, h.base, h.scale, 20, 1e-6, 1e-6) is None


@pytest.mark.parametrize("T", [1, 3, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_final_collapse_and_norm_match_torch(T, dtype):
    """The final collapse (HyperHead) and the output norm in one call against HyperHead's torch ops then the norm:
    the same up to the projection's float32 summation order (bf16: one rounding step)."""
    from ds4py.model.hc_kernel import hc_head
    from ds4py.model.hyper_connection import HyperHead
    from ds4py.model.norms import rms_norm

    g = torch.Generator().manual_seed(T)
    D, hc = 96, 4
    head = HyperHead(fn=torch.randn(hc, hc * D, generator=g) / D**0.5, base=torch.randn(hc, generator=g),
                     scale=torch.rand(1, generator=g) * 3, hc_eps=1e-6, norm_eps=1e-6)
    streams = torch.randn(T, hc, D, generator=g).to(dtype)
    weight = torch.rand(D, generator=g) + 0.5
    fused = hc_head(streams, head.fn, head.base, head.scale, head.hc_eps, head.norm_eps, weight, 1e-6)
    assert fused is not None, "the compiled final collapse did not build"
    ref = rms_norm(head(streams), weight, 1e-6)
    assert fused.dtype == dtype and fused.shape == (T, D) and torch.equal(head.normed(streams, weight, 1e-6), fused)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((fused.float() - ref.float()).abs() <= tol * ref.float().abs().max()).all()


# D = 50: 200 values per token, a tail of 8 after the last 16; D = 1101: fn past the size from which a prompt's
# projection goes by chunks (lane sums carried between chunks), a tail of 4
@pytest.mark.parametrize("D", [50, 1101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_prompts_collapse_is_each_tokens_alone(dtype, D):
    """A prompt's tokens are projected four at a time, Sinkhorn-Knopp'd eight at a time: each token's values are
    still those of the token collapsed alone, bit for bit (T = 23: groups and a remainder)."""
    h = random_hyper(4, D, 7)
    streams = torch.randn(23, 4, D, generator=torch.Generator().manual_seed(8)).to(dtype)
    weight = torch.rand(D, generator=torch.Generator().manual_seed(9)) + 0.5
    together = hc_collapse(streams, h.fn, h.base, h.scale, 20, 1e-6, 1e-6, norm=(weight, 1e-6))
    assert together is not None
    for t in range(23):
        alone = hc_collapse(streams[t:t + 1], h.fn, h.base, h.scale, 20, 1e-6, 1e-6, norm=(weight, 1e-6))
        assert all(torch.equal(a[t:t + 1], b) for a, b in zip(together, alone, strict=True)), t
