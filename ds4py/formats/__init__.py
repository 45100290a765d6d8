"""Packed weight formats. Every weight the model uses is a `Weight`: a logical shape plus a way to
dequantize it and to multiply by it. Quantized formats keep their packed bytes in memory.

Implementations:
- `Dense`                      a plain tensor (F32, F16, BF16, I32)
- `BF16Matrix`                 a large BF16 matrix kept in bf16 whatever the compute dtype (output head, ...)
- `ds4py.formats.fp8.FP8Block` official FP8 e4m3 with UE8M0 128x128 block scales
- `ds4py.formats.fp4.FP4Block` official FP4 e2m1 (two per byte, low nibble first), UE8M0 per-32 scales
- `ds4py.formats.ggml.GGMLWeight` a GGUF tensor in a ggml quant type (Q8_0, MXFP4, Q4_K, Q2_K, IQ2_XXS, ...)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Weight:
    """A weight of logical shape `shape` ([out, in] for a matrix, [experts, out, in] for a stack)."""

    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] for a 2-D weight."""
        return F.linear(x, self.dequantize(x.dtype))

    def linear_f32(self, x: torch.Tensor) -> torch.Tensor:
        """`linear(x).float()` (the output head's logits), in one pass where the format has one."""
        return self.linear(x).float()

    def expert(self, e: int) -> Weight:
        """The 2-D weight of expert `e` of a 3-D stack, sharing the packed storage."""
        raise NotImplementedError

    def kernel_rows(self) -> tuple[torch.Tensor, int] | None:
        """(raw uint8 rows, ggml qtype) of a 2-D weight the compiled CPU kernels multiply straight from its
        blocks (Q8_0, MXFP4), else None."""
        return None

    def stack_rows(self) -> tuple[torch.Tensor, int] | None:
        """(raw uint8 [experts, rows, bytes], qtype) of a resident 3-D stack whose experts the compiled CPU kernels
        multiply straight from their blocks (Q8_0, MXFP4, MXFP4_R16), else None."""
        return None

    def to(self, device: torch.device | str) -> Weight:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The format's name as users know it: 'f32', 'bf16', 'fp8', 'q8_0', 'mxfp4', ..."""
        raise NotImplementedError


class Dense(Weight):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.packed = None  # small_gemm's form of a small bf16 matrix (False: it has none), made at first use

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.tensor.to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.tensor
        if w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16:  # a small bf16 matrix: one compiled call
            from ds4py.formats import small_gemm

            if self.packed is None:
                self.packed = small_gemm.pack(w) or False
            y = small_gemm.linear(x, self.packed) if self.packed else None
            if y is not None:
                return y
        if w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16:
            from ds4py.formats import kernels

            return kernels.tiled_linear(x, w)  # (in float32 where the CPU has no native bf16 GEMM)
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    def expert(self, e: int) -> Dense:
        return Dense(self.tensor[e])

    def to(self, device: torch.device | str) -> Dense:
        return Dense(self.tensor.to(device))

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def kind(self) -> str:
        return str(self.tensor.dtype).removeprefix("torch.").replace("float32", "f32").replace(
            "bfloat16", "bf16").replace("float16", "f16")


# BF16 matrices with at least this many values stay bf16 in memory (`BF16Matrix`) instead of being converted to
# the compute dtype: the 129280 x 4096 head would take 4.2 GB in float32 and be read in full every token.
BF16_MATRIX_MIN = 1 << 20


def keeps_bf16(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a float weight of this shape and stored dtype is held as a `BF16Matrix`."""
    return dtype == torch.bfloat16 and len(shape) == 2 and shape[0] * shape[1] >= BF16_MATRIX_MIN


def stays_bf16(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a stored weight is held in bf16 whatever the compute dtype: a BF16 embedding table (its
    gathered rows are converted: the same values, half the memory) and large BF16 matrices (`keeps_bf16`)."""
    return dtype == torch.bfloat16 and (name == "embed.weight" or keeps_bf16(shape, dtype))


class BF16Matrix(Weight):
    """A bfloat16 [out, in] matrix kept in bf16 for any compute dtype. `linear` uses the compiled bf16 kernel
    for up to `kernels.BF16_KERNEL_MAX_T` rows of float32/bfloat16 activations on the CPU (weights widened
    exactly, float32 sums, each row's result independent of the others); otherwise F.linear, converting
    the weight to x's dtype a tile of rows at a time (never a full float32 copy)."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dtype != torch.bfloat16 or tensor.dim() != 2:
            raise ValueError(f"BF16Matrix needs a bfloat16 [out, in] tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.tensor.to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        from ds4py.formats import kernels

        if x.shape[-1] and x.numel() // x.shape[-1] <= kernels.BF16_KERNEL_MAX_T:
            return kernels.bf16_linear(x, self.tensor)
        return kernels.tiled_linear(x, self.tensor)

    def linear_f32(self, x: torch.Tensor) -> torch.Tensor:
        from ds4py.formats import kernels

        if x.shape[-1] and x.numel() // x.shape[-1] <= kernels.BF16_KERNEL_MAX_T:
            return kernels.bf16_linear(x, self.tensor, as_float32=True)
        return kernels.tiled_linear(x, self.tensor).float()

    def rows(self, start: int, stop: int) -> BF16Matrix:
        """Rows [start, stop), sharing the storage."""
        return BF16Matrix(self.tensor[start:stop])

    def to(self, device: torch.device | str) -> BF16Matrix:
        return BF16Matrix(self.tensor.to(device))

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * 2

    @property
    def kind(self) -> str:
        return "bf16"
