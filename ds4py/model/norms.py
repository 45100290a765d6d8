"""RMS norms. Statistics in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4py.model import row_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n] (any float dtype) * rsqrt(mean(x^2) + eps) * weight, in float32, back to x's dtype."""
    compiled = row_kernels.rms_norm(x, weight, eps)  # a few rows (decoding): one call
    if compiled is not None:
        return compiled
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    compiled = row_kernels.rms_norm(x, None, eps)
    if compiled is not None:
        return compiled
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
