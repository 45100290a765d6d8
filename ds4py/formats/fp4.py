"""Official FP4 routed experts: e2m1 codes two per byte (element 2i in the low nibble), one UE8M0
scale per 32 consecutive elements of a row."""

from __future__ import annotations

import torch

from ds4py.formats import Weight
from ds4py.formats.fp8 import ue8m0_to_float

GROUP = 32
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] bytes -> [..., n] 4-bit codes (low nibble first)."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


class FP4Block(Weight):
    def __init__(self, packed: torch.Tensor, scale: torch.Tensor):
        self.packed = packed.view(torch.uint8)  # [..., out, in/2]
        self.scale = scale.view(torch.uint8)    # [..., out, in/32]
        self.shape = (*self.packed.shape[:-1], self.packed.shape[-1] * 2)
        if tuple(self.scale.shape) != (*self.shape[:-1], self.shape[-1] // GROUP):
            raise ValueError(f"FP4 scale shape {tuple(self.scale.shape)} does not match weight {self.shape}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = E2M1_VALUES.to(self.packed.device)[unpack_codes(self.packed).long()]
        scale = ue8m0_to_float(self.scale).repeat_interleave(GROUP, dim=-1)
        return (values * scale).to(dtype)

    def expert(self, e: int) -> FP4Block:
        return FP4Block(self.packed[e], self.scale[e])

    def to(self, device: torch.device | str) -> FP4Block:
        return FP4Block(self.packed.to(device), self.scale.to(device))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel()

    @property
    def kind(self) -> str:
        return "fp4"


def quantize_fp4(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., out, in] -> (packed uint8 [..., out, in/2], UE8M0 uint8 [..., out, in/32]): per group
    the smallest power-of-two scale that keeps the largest magnitude within 6, values rounded to the
    nearest e2m1 value."""
    x = t.float().reshape(*t.shape[:-1], -1, GROUP)
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = x / torch.exp2(exponent)
    codes = (scaled.unsqueeze(-1) - E2M1_VALUES).abs().argmin(dim=-1).to(torch.uint8)
    codes = codes.reshape(*t.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent.squeeze(-1) + 127).to(torch.uint8)
