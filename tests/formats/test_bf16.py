"""BF16 matrices kept in bf16: the compiled `bf16_linear` kernel against F.linear on float32 upcasts, row
invariance (a row's result is the same alone or in a batch), the tiled F.linear fallback, DS4PY_NO_KERNELS,
and a tiny GGUF model whose BF16 head / embedding stay bf16 in float32 mode with unchanged logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ds4py
from ds4py.formats import BF16Matrix, Dense, kernels
from ds4py.synthetic import make_model


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


SHAPES = ((300, 256), (77, 96), (41, 4096), (9, 17))  # 96, 17: partial 32-value tails; 41, 9: partial row blocks


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
def test_kernel_matches_float_linear(lib, monkeypatch, generic):
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
        assert kernels.available() and not kernels.simd()
    gen = torch.Generator().manual_seed(3 + generic)
    for out, n in SHAPES:
        w = torch.randn(out, n, generator=gen).bfloat16()
        for T in (1, 3, 4, 5, 16):
            x = torch.randn(T, n, generator=gen)
            y = kernels.bf16_linear(x, w)
            assert y.shape == (T, out) and y.dtype == torch.float32
            assert rel_err(y, F.linear(x.double(), w.double())) < 1e-6, (out, n, T)
            assert rel_err(y, F.linear(x, w.float())) < 1e-6
            xb = x.bfloat16()
            yb = kernels.bf16_linear(xb, w)
            ref = F.linear(xb.float(), w.float())
            assert yb.dtype == torch.bfloat16
            # float32 sums in another order, then one rounding: at most one bf16 step from the reference's rounding
            assert torch.allclose(yb.float(), ref.bfloat16().float(), rtol=2 ** -7, atol=1e-6 * ref.abs().max())
            assert rel_err(yb, ref) < 4e-3
            # the head's logits: the bf16 result as float32, rounded in the call
            assert torch.equal(kernels.bf16_linear(xb, w, as_float32=True), yb.float())
            assert torch.equal(kernels.bf16_linear(x, w, as_float32=True), y)
            assert torch.equal(BF16Matrix(w).linear_f32(xb), yb.float())


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
def test_kernel_is_row_invariant(lib, monkeypatch, generic):
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    gen = torch.Generator().manual_seed(7)
    for out, n in SHAPES:
        w = torch.randn(out, n, generator=gen).bfloat16()
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(16, n, generator=gen).to(dtype)
            batch = kernels.bf16_linear(x, w)
            for t in range(16):
                assert torch.equal(batch[t], kernels.bf16_linear(x[t:t + 1], w)[0]), (out, n, dtype, t)
            for t0, t1 in ((0, 3), (5, 10), (2, 16)):
                assert torch.equal(batch[t0:t1], kernels.bf16_linear(x[t0:t1], w))


def test_weight_linear_uses_kernel_keeps_leading_dims(lib):
    gen = torch.Generator().manual_seed(1)
    w = BF16Matrix(torch.randn(40, 128, generator=gen).bfloat16())
    assert w.kind == "bf16" and w.nbytes == 40 * 128 * 2 and w.shape == (40, 128)
    x = torch.randn(2, 5, 128, generator=gen)
    y = w.linear(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    assert rel_err(y, F.linear(x, w.dequantize())) < 1e-6
    assert torch.equal(y, kernels.bf16_linear(x, w.tensor))
    assert w.linear(x[:0]).shape == (0, 5, 40)
    assert torch.equal(w.rows(8, 16).linear(x), y[..., 8:16])
    # more rows than the kernel serves: F.linear
    xl = torch.randn(kernels.BF16_KERNEL_MAX_T + 1, 128, generator=gen)
    assert torch.equal(w.linear(xl), F.linear(xl, w.tensor.float()))
    assert torch.equal(w.linear(xl.bfloat16()), F.linear(xl.bfloat16(), w.tensor))
    with pytest.raises(ValueError):
        BF16Matrix(torch.zeros(4, 4))


def test_tiled_fallback_equals_untiled(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(1000, 64, generator=gen).bfloat16()
    for T in (1, 5, 40):
        x = torch.randn(T, 64, generator=gen)
        ref = F.linear(x, w.float())
        for tile in (1000, 256, 333):
            y = kernels.tiled_linear(x, w, tile=tile)
            assert y.shape == ref.shape and y.dtype == torch.float32
            assert rel_err(y, ref) < 1e-6
        xh = x.half()
        assert torch.equal(kernels.tiled_linear(xh, w, tile=256), F.linear(xh, w.half()))
        xb = x.bfloat16()
        monkeypatch.setenv("DS4PY_BF16_GEMM", "1")  # a CPU with a native bf16 GEMM: torch's
        assert torch.equal(kernels.tiled_linear(xb, w, tile=256), F.linear(xb, w))
        monkeypatch.setenv("DS4PY_BF16_GEMM", "0")  # without: in float32, rounded once
        assert torch.equal(kernels.tiled_linear(xb, w, tile=256), F.linear(xb.float(), w.float()).bfloat16())
        monkeypatch.delenv("DS4PY_BF16_GEMM")


def test_no_kernels_env_uses_the_exact_fallback(monkeypatch):
    monkeypatch.setenv("DS4PY_NO_KERNELS", "1")
    assert not kernels.available()
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(kernels.BF16_TILE_ROWS + 100, 32, generator=gen).bfloat16()  # two tiles
    x = torch.randn(3, 32, generator=gen)
    y = BF16Matrix(w).linear(x)
    assert y.dtype == torch.float32 and rel_err(y, F.linear(x, w.float())) < 1e-6
    assert torch.equal(y[:, :100], F.linear(x, w[:100].float()))
    xb = x.bfloat16()
    assert torch.equal(BF16Matrix(w).linear(xb), F.linear(xb, w))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "tiny.gguf"
    make_model(str(path), preset="tiny", seed=5)
    return str(path)


def test_model_keeps_bf16_head_and_embedding_with_the_same_logits(tiny_gguf):
    model = ds4py.load(tiny_gguf, dtype="float32")
    tr = model.transformer
    assert isinstance(tr.head, BF16Matrix) and tr.head.tensor.dtype == torch.bfloat16
    assert tr.embed.dtype == torch.bfloat16
    # the old behaviour: every float weight and the embedding converted to float32 up-front
    old = ds4py.load(tiny_gguf, dtype="float32")
    old.transformer.head = Dense(tr.head.tensor.float())
    old.transformer.embed = tr.embed.float()
    ids = list(range(1000, 1040))
    for all_logits, n in ((True, 40), (False, 40), (False, 7)):  # 40 rows: F.linear in tiles; 1 row: the kernel
        new_l = model.prefill(ids[:n], model.new_cache(), all_logits=all_logits)
        old_l = old.prefill(ids[:n], old.new_cache(), all_logits=all_logits)
        assert new_l.dtype == torch.float32
        assert rel_err(new_l, old_l) < 1e-5, (all_logits, n)
    assert model.generate(ids[:8], 6) == old.generate(ids[:8], 6)


def test_model_bfloat16_keeps_head_in_bf16(tiny_gguf):
    model = ds4py.load(tiny_gguf, dtype="bfloat16")
    assert isinstance(model.transformer.head, BF16Matrix)
    out = model.prefill([5, 6, 7], model.new_cache())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
