"""Official FP8: e4m3 weights with one UE8M0 (power-of-two) scale per 128x128 block."""

from __future__ import annotations

import torch

from ds4py.formats import Weight

BLOCK = 128
E4M3_MAX = 448.0


def ue8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8 or float8_e8m0fnu) -> float32 2**(byte - 127)."""
    return torch.exp2(scale.view(torch.uint8).float() - 127.0)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """[..., ceil(rows/br), ceil(cols/bc)] block scales -> [..., rows, cols]."""
    s = scale.repeat_interleave(block_rows, dim=-2)[..., :rows, :]
    return s.repeat_interleave(block_cols, dim=-1)[..., :cols]


class FP8Block(Weight):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        self.weight = weight.view(torch.float8_e4m3fn)  # [out, in]
        self.scale = scale.view(torch.uint8)             # [ceil(out/128), ceil(in/128)]
        self.shape = tuple(weight.shape)
        rows, cols = self.shape[-2:]
        expected = (*self.shape[:-2], -(-rows // BLOCK), -(-cols // BLOCK))
        if tuple(self.scale.shape) != expected:
            raise ValueError(f"FP8 scale shape {tuple(self.scale.shape)} does not match {expected} for {self.shape}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape[-2:]
        s = expand_blocks(ue8m0_to_float(self.scale), rows, cols, BLOCK, BLOCK)
        return (self.weight.float() * s).to(dtype)

    def expert(self, e: int) -> FP8Block:
        return FP8Block(self.weight[e], self.scale[e])

    def to(self, device: torch.device | str) -> FP8Block:
        return FP8Block(self.weight.to(device), self.scale.to(device))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel()

    @property
    def kind(self) -> str:
        return "fp8"


def quantize_fp8_block(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (e4m3 weight, UE8M0 uint8 scales): the smallest power-of-two scale per
    block that keeps the block's largest magnitude within e4m3's 448."""
    rows, cols = t.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(br * BLOCK, bc * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = t.float()
    amax = padded.view(br, BLOCK, bc, BLOCK).abs().amax(dim=(1, 3)).clamp(min=1e-30)
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-127, 127)
    scale = (exponent + 127).to(torch.uint8)
    s = expand_blocks(torch.exp2(exponent), rows, cols, BLOCK, BLOCK)
    return (t.float() / s).to(torch.float8_e4m3fn), scale
