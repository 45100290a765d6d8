"""Attention's bf16 products: torch's bf16 ones where the CPU has a native bf16 GEMM, else float32 rounded once;
the two agree up to the order of float32 sums (within a bf16 unit of the result)."""

from __future__ import annotations

import torch

from ds4py.model import products


def test_bf16_products_widen_only_without_a_native_gemm(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 24, 40, generator=gen).bfloat16(), torch.randn(4, 40, 8, generator=gen).bfloat16()
    cases = [(products.bmm, (a, b), torch.bmm), (products.mm, (a[0], b[0]), torch.mm),
             (lambda x, y: products.einsum("bij,bjk->bik", x, y), (a, b),
              lambda x, y: torch.einsum("bij,bjk->bik", x, y))]
    for ours, args, theirs in cases:
        monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
        native = ours(*args)
        assert native.dtype == torch.bfloat16 and torch.equal(native, theirs(*args))
        monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
        widened = ours(*args)
        assert widened.dtype == torch.bfloat16 and torch.equal(widened, theirs(*(t.float() for t in args)).bfloat16())
        assert ((widened.float() - native.float()).abs() <= native.float().abs() * 2**-7 + 1e-6).all()
        f32 = tuple(t.float() for t in args)
        assert torch.equal(ours(*f32), theirs(*f32))  # other dtypes pass through
