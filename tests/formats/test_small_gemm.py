"""The small bf16 GEMM against its definition (float32 fused multiply-adds in pair order, one bf16 rounding)
computed in torch, and against F.linear, for both builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from ds4py.formats import Dense, kernels, small_gemm
from tests.formats.test_kernels import random_weight


def definition(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16(sum over pairs p of x[2p + 1] w[2p + 1] then x[2p] w[2p]) in float32: a product of two bf16 values is
    exact in float32, so each float32 add rounds as the fused multiply-add does."""
    x2, w2 = x.reshape(-1, x.shape[-1]).float(), w.float()
    s = torch.zeros(x2.shape[0], w.shape[0])
    for i in range(0, x.shape[-1], 2):
        for j in (i + 1, i):
            if j < x.shape[-1]:
                s = s + x2[:, j:j + 1] * w2[:, j]
    return s.bfloat16().reshape(*x.shape[:-1], w.shape[0])


@pytest.fixture(params=[False, True], ids=["simd", "portable"])
def build(request, monkeypatch):
    if request.param:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    if small_gemm._load() is None:
        pytest.skip("no compiler: the callers use F.linear")
    return request.param


SHAPES = [(512, 32, 64), (300, 16, 64), (7, 256, 32), (1, 5, 3), (13, 17, 33), (64, 48, 96), (6, 64, 64)]


@pytest.mark.parametrize("T, out, n", SHAPES)
def test_small_gemm_is_its_definition(build, T, out, n):
    gen = torch.Generator().manual_seed(T * 1000 + out + n)
    x = torch.randn(T, n, generator=gen).bfloat16()
    w = (torch.randn(out, n, generator=gen) / n**0.5).bfloat16()
    packed = small_gemm.pack(w)
    y = small_gemm.linear(x, packed)
    assert y.dtype == torch.bfloat16 and y.shape == (T, out)
    assert torch.equal(y, definition(x, w))
    # F.linear sums in another order at most: within one bf16 unit in the last place of the result
    ref = F.linear(x, w).float()
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-30).all()


def test_small_gemm_takes_strided_and_batched_inputs(build):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=gen).bfloat16()
    packed = small_gemm.pack(w)
    wide = torch.randn(50, 64, generator=gen).bfloat16()
    x = wide[:, 8:48]  # rows 64 apart
    assert torch.equal(small_gemm.linear(x, packed), definition(x, w))
    x3 = torch.randn(3, 5, 40, generator=gen).bfloat16()
    assert torch.equal(small_gemm.linear(x3, packed), definition(x3, w))


def test_small_gemm_declines_what_it_does_not_take():
    w = torch.randn(8, 16).bfloat16()
    assert small_gemm.pack(w.float()) is None and small_gemm.pack(torch.zeros(300, 300).bfloat16()) is None
    packed = small_gemm.pack(w)
    assert small_gemm.linear(torch.randn(4, 16), packed) is None  # float32 activations: F.linear
    assert small_gemm.linear(torch.randn(4, 15).bfloat16(), packed) is None


def test_small_gemm_simd_and_portable_agree(monkeypatch):
    if small_gemm._load() is None or not small_gemm.simd():
        pytest.skip("no AVX512-BF16 here: only the portable loop runs")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(97, 70, generator=gen).bfloat16()
    packed = small_gemm.pack(torch.randn(40, 70, generator=gen).bfloat16())
    simd = small_gemm.linear(x, packed)
    monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    assert not small_gemm.simd() and torch.equal(small_gemm.linear(x, packed), simd)


def test_weights_use_it_for_bf16_prompts(lib, build, monkeypatch):
    """A small bf16 Dense matrix (any T) and a small Q8_0 / MXFP4 matrix's bf16 copy (long prompts) multiply through
    small_gemm; large ones and float32 activations keep F.linear."""
    gen = torch.Generator().manual_seed(4)
    d = Dense(torch.randn(48, 96, generator=gen).bfloat16())
    for T in (1, 5, 300):
        x = torch.randn(T, 96, generator=gen).bfloat16()
        assert torch.equal(d.linear(x), definition(x, d.tensor))
    xf = torch.randn(5, 96, generator=gen)
    assert torch.equal(d.linear(xf), F.linear(xf, d.tensor.float()))
    big = Dense(torch.randn(1024, 96, generator=gen).bfloat16())
    x = torch.randn(9, 96, generator=gen).bfloat16()
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")  # a CPU with a native bf16 GEMM: torch's
    assert torch.equal(big.linear(x), F.linear(x, big.tensor))
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")  # without: in float32, rounded once
    assert torch.equal(big.linear(x), F.linear(x.float(), big.tensor.float()).bfloat16())
    monkeypatch.delenv("DS4PY_BF16_GEMM")
    for qtype in (Q.Q8_0, Q.MXFP4):
        w = random_weight(qtype, 48, 96, gen)
        x = torch.randn(kernels.BF16_GEMM_MIN_T, 96, generator=gen).bfloat16()
        assert torch.equal(w.linear(x), definition(x, w.dequantize(torch.bfloat16)))


def random_moe(E: int, n: int, inter: int, shared_inter: int, gen: torch.Generator):
    def trio(i):
        return ((torch.randn(i, n, generator=gen) / n**0.5).bfloat16(), (torch.randn(i, n, generator=gen) / n**0.5)
                .bfloat16(), (torch.randn(n, i, generator=gen) / i**0.5).bfloat16())
    return [trio(inter) for _ in range(E)], [trio(shared_inter)]


def moe_definition(routed, shared, x, weights, ids, limit):
    """Pair by pair in float64 from each pair's bf16-rounded hidden (computed by `definition`'s sums, unrounded)."""
    from ds4py.model.moe import swiglu

    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        pairs = sorted(zip(ids[t].tolist(), weights[t].tolist())) + [(len(routed) + s, 1.0) for s in range(len(shared))]
        for e, w in pairs:
            w1, w3, w2 = (routed + shared)[e]
            h = swiglu(x[t].float() @ w1.float().T, x[t].float() @ w3.float().T, limit).bfloat16()
            out[t] += w * (h.double() @ w2.double().T)
    return out


@pytest.mark.parametrize("T", [1, 7, 300])
def test_small_moe_matches_its_definition(build, T):
    gen = torch.Generator().manual_seed(T)
    routed, shared = random_moe(8, 64, 32, 48, gen)
    packed = small_gemm.pack_moe(routed, shared)
    x = torch.randn(T, 64, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=gen)
    out = small_gemm.moe(packed, x, weights, ids, 10.0)
    ref = moe_definition(routed, shared, x, weights, ids, 10.0)
    assert out.dtype == torch.bfloat16 and out.shape == (T, 64)
    # float32 sums (and a hidden value's bf16 rounding that a float32 sum can tip): the final rounding dominates
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4e-3
    # each token's values do not depend on the others
    for t in (0, T - 1):
        alone = small_gemm.moe(packed, x[t:t + 1], weights[t:t + 1], ids[t:t + 1], 10.0)
        assert torch.equal(alone[0], out[t])


def test_small_moe_portable_agrees_with_simd_and_rejects_bad_ids(monkeypatch):
    if small_gemm._load() is None:
        pytest.skip("no compiler")
    gen = torch.Generator().manual_seed(5)
    routed, shared = random_moe(4, 32, 16, 16, gen)
    packed = small_gemm.pack_moe(routed, shared)
    x = torch.randn(40, 32, generator=gen).bfloat16()
    ids, weights = torch.randint(0, 4, (40, 2), generator=gen), torch.rand(40, 2, generator=gen)
    simd = small_gemm.moe(packed, x, weights, ids, 7.0)
    monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    portable = small_gemm.moe(packed, x, weights, ids, 7.0).float()
    # the same sums; the SiLU's exp is the AVX-512 polynomial (within 2 ulp of expf) in one, expf in the other
    assert ((portable - simd.float()).abs() <= simd.float().abs() * 2**-7 + 1e-6).all()
    with pytest.raises(ValueError, match="expert ids"):
        small_gemm.moe(packed, x, weights, ids + 4, 7.0)
    assert small_gemm.pack_moe([(torch.zeros(3, 32).bfloat16(),) * 2 + (torch.zeros(32, 3).bfloat16(),)], []) is None
