"""Partial interleaved RoPE: the rotary slice is the LAST `qk_rope_head_dim` channels of each head,
and channels (2i, 2i+1) form a pair. Sliding-window layers use plain RoPE (`rope_theta`); layers
with a compressor use `compress_rope_theta` with YaRN (no attention-scale factor, as in V4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ds4py.model import row_kernels


def inv_freq(dim: int, base: float, yarn: dict | None = None) -> torch.Tensor:
    """[dim // 2] inverse frequencies, YaRN-corrected when `yarn` is given (truncated correction range)."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    if not yarn:
        return extrapolated
    factor = float(yarn["factor"])
    orig = yarn["original_max_position_embeddings"]
    beta_fast = yarn.get("beta_fast") or 32
    beta_slow = yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - keep) + extrapolated * keep


ROTATION_BLOCK = 256  # a decoding token's rotation is a row of the rotations of this many positions, made at once


@dataclass
class Rotary:
    inv_freq: torch.Tensor  # [rope_dim // 2]
    # the last `rotation` asked for: every layer of a forward pass passes the same positions tensor
    last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # (first position, rotation [ROTATION_BLOCK, rope_dim // 2]) of the block the last decoding token was in
    block: tuple[int, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def make(cls, rope_dim: int, base: float, yarn: dict | None, device: torch.device | str = "cpu") -> Rotary:
        return cls(inv_freq(rope_dim, base, yarn).to(device))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim // 2] in float32."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq
        return freqs.cos(), freqs.sin()

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [T] -> cos + i sin [T, rope_dim // 2] complex64, for `rotate`; computed once for
        the same positions tensor (the layers of one forward pass share it). One position (decoding) is a row of
        its block's rotations (5 torch ops a token -> 1 slice every token; cos and sin are elementwise, so the
        values are the same)."""
        if self.last is None or self.last[0] is not positions:
            if positions.numel() == 1:
                p = int(positions)
                block = self.block
                if block is None or not 0 <= p - block[0] < ROTATION_BLOCK:
                    first = p - p % ROTATION_BLOCK
                    positions_block = torch.arange(first, first + ROTATION_BLOCK, device=positions.device)
                    block = self.block = (first, torch.complex(*self.cos_sin(positions_block)))
                rotation = block[1][p - block[0]:p - block[0] + 1]
            else:
                rotation = torch.complex(*self.cos_sin(positions))
            self.last = (positions, rotation)
        return self.last[1]


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing rope slice of x [T, ..., head_dim] by `rotation` [T, rope_dim // 2]
    (complex cos + i sin; its conjugate is the inverse rotation): channel pairs (2i, 2i+1) are the
    real and imaginary parts of one complex number, multiplied in float32."""
    compiled = row_kernels.rotate(x, rotation)  # a few rows (decoding): one call
    if compiled is not None:
        return compiled
    half = rotation.shape[-1]
    rope_dim = 2 * half
    rotation = rotation.reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (half,))
    pairs = torch.view_as_complex(x[..., -rope_dim:].float().unflatten(-1, (half, 2)))
    rotated = torch.view_as_real(pairs * rotation).flatten(-2)
    return torch.cat([x[..., :-rope_dim], rotated.to(x.dtype)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing rope slice of x [T, ..., head_dim] by cos/sin [T, rope_dim // 2].
    Pass -sin for the inverse rotation."""
    return rotate(x, torch.complex(cos, sin))
