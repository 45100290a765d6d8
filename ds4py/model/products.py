"""Matrix products of bf16 activations (attention's logits and values, batched). Where the CPU multiplies bf16
natively (`kernels.bf16_gemm_native`: AVX512-BF16, AMX) these are torch's bf16 products; elsewhere torch has no
fast bf16 code (on AVX2 a 256-token chunk's window values at V4 Flash's shapes took 1.9 s as bf16, ~1000x the
float32 product's arithmetic), so the operands are widened to float32 (exactly), multiplied there and the result
rounded to bf16 once: what a bf16 product computes (float32 sums of exact products, one rounding) up to the
order of its sums. Other dtypes and devices pass through."""

from __future__ import annotations

import torch

from ds4py.formats import kernels


def _widen(a: torch.Tensor) -> bool:
    """Whether a product with bf16 CPU operand a runs in float32 here."""
    return a.dtype == torch.bfloat16 and a.is_cpu and not kernels.bf16_gemm_native()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _widen(a):
        return torch.mm(a.float(), b.float()).bfloat16()
    return torch.mm(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _widen(a):
        return torch.bmm(a.float(), b.float()).bfloat16()
    return torch.bmm(a, b)


def einsum(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _widen(a):
        return torch.einsum(equation, a.float(), b.float()).bfloat16()
    return torch.einsum(equation, a, b)
