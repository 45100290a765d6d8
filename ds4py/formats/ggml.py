"""GGUF tensors in ggml block formats. Q8_0 and MXFP4 (what llama.cpp writes for V4) and the float
types are dequantized here in torch; other ggml types (Q4_K, Q2_K, IQ2_XXS, ...) through the `gguf`
library's reference dequantizers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ds4py.formats import Weight, kernels, small_gemm
from ds4py.formats.fp4 import unpack_codes

Q = GGMLQuantizationType
MXFP4_KVALUES = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)
FLOAT_VIEWS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.I32: torch.int32}


def row_bytes(qtype: Q, n: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ValueError(f"a row of {n} values is not a multiple of {qtype.name}'s block of {block}")
    return n // block * size


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml's E8M0 -> float32 scale, halved (ggml doubles the e2m1 values instead)."""
    return torch.exp2(e.float() - 128.0)


def dequantize_q8_0(raw: torch.Tensor, n: int) -> torch.Tensor:
    blocks = raw.reshape(*raw.shape[:-1], n // 32, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [..., nb, 1]
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(*raw.shape[:-1], n)


def dequantize_mxfp4(raw: torch.Tensor, n: int) -> torch.Tensor:
    blocks = raw.reshape(*raw.shape[:-1], n // 32, 17)
    scale = e8m0_half(blocks[..., :1])
    qs = blocks[..., 1:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).long()  # byte j: element j low, element j+16 high
    return (MXFP4_KVALUES.to(raw.device)[codes] * scale).reshape(*raw.shape[:-1], n)


def ggml_dequantize(qtype: int | Q, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """raw uint8 [..., rows, bytes_per_row] -> float32 `shape`."""
    qtype = Q(qtype)
    n = shape[-1]
    if qtype in FLOAT_VIEWS:
        return raw.contiguous().view(FLOAT_VIEWS[qtype]).reshape(shape).float()
    if qtype == Q.Q8_0:
        return dequantize_q8_0(raw, n).reshape(shape)
    if qtype == Q.MXFP4:
        return dequantize_mxfp4(raw, n).reshape(shape)
    data = gguf_quants.dequantize(raw.cpu().numpy().reshape(-1, raw.shape[-1]), qtype)
    return torch.from_numpy(np.ascontiguousarray(data)).reshape(shape).to(raw.device)


# Q8_0 / MXFP4 matrices of at most this many values keep a bf16 copy for long bf16 prompts (<= 128 KB each: the
# tiny preset's; V4 Flash's smallest, 64 x 4096, is 4x larger and is dequantized per call as before)
SMALL_DEQUANTIZED = 1 << 16


class GGMLWeight(Weight):
    def __init__(self, qtype: int | Q, raw: torch.Tensor, shape: tuple[int, ...]):
        self.qtype = Q(qtype)
        self.shape = tuple(shape)
        self.raw = raw.view(torch.uint8).reshape(*self.shape[:-1], row_bytes(self.qtype, self.shape[-1]))
        self.parts: dict[tuple, GGMLWeight] = {}  # expert(e) / rows(start, stop), made once per decode path
        self.bf16: torch.Tensor | None = None  # a small matrix dequantized once for long bf16 prompts (linear)
        self.packed: small_gemm.Packed | None = None  # and packed for small_gemm

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qtype == Q.I32:
            return self.raw.contiguous().view(torch.int32).reshape(self.shape).to(dtype)
        return ggml_dequantize(self.qtype, self.raw, self.shape).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Q8_0 and MXFP4 matrices on the CPU: the packed-weight kernels of `ds4py.formats.kernels` (they
        quantize x to Q8_0 per 32 values, as llama.cpp does); otherwise dequantize + F.linear."""
        if self.qtype in (Q.Q8_0, Q.MXFP4) and len(self.shape) == 2:
            if (self.shape[0] * self.shape[1] <= SMALL_DEQUANTIZED and x.dtype == torch.bfloat16 and x.is_cpu
                    and x.numel() >= kernels.BF16_GEMM_MIN_T * self.shape[1] and self.raw.is_cpu
                    and not (x.requires_grad and torch.is_grad_enabled())):
                # what ggml_linear does for a long bf16 prompt (dequantize to bf16, then the GEMM), the
                # dequantizing done once: for the tiny model's matrices it cost as much as the product; the
                # product in one compiled call (`small_gemm`: F.linear's values, 2x faster at these sizes)
                if self.bf16 is None:
                    self.bf16 = kernels.dequantize(self.raw, int(self.qtype), torch.bfloat16)
                    self.packed = None if self.bf16 is None else small_gemm.pack(self.bf16)
                if self.bf16 is not None:
                    y = None if self.packed is None else small_gemm.linear(x, self.packed)
                    return y if y is not None else F.linear(x, self.bf16)
            return kernels.ggml_linear(x, self.raw, int(self.qtype))
        return super().linear(x)

    def kernel_rows(self) -> tuple[torch.Tensor, int] | None:
        if self.qtype in (Q.Q8_0, Q.MXFP4) and len(self.shape) == 2:
            return self.raw, int(self.qtype)
        return None

    def stack_rows(self) -> tuple[torch.Tensor, int] | None:
        if self.qtype in (Q.Q8_0, Q.MXFP4) and len(self.shape) == 3:
            return self.raw, int(self.qtype)
        return None

    def expert(self, e: int) -> GGMLWeight:
        """Expert e of a 3-D weight, sharing the packed storage (the view is kept: it is asked for per token)."""
        part = self.parts.get(("expert", e))
        if part is None:
            part = self.parts[("expert", e)] = GGMLWeight(self.qtype, self.raw[e], self.shape[1:])
        return part

    def rows(self, start: int, stop: int) -> GGMLWeight:
        """Rows [start, stop) of a 2-D weight, sharing the packed storage (ggml blocks run along rows)."""
        part = self.parts.get(("rows", start, stop))
        if part is None:
            part = self.parts[("rows", start, stop)] = GGMLWeight(
                self.qtype, self.raw[start:stop], (stop - start, self.shape[1])
            )
        return part

    def to(self, device: torch.device | str) -> GGMLWeight:
        return GGMLWeight(self.qtype, self.raw.to(device), self.shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def kind(self) -> str:
        return self.qtype.name.lower()


class MXFP4Rows16(Weight):
    """MXFP4 repacked by groups of 16 rows (`kernels.repack16`): the bytes and values of the ggml rows it was made
    from, laid out so the CPU kernels multiply them ~2.5x faster (the 16 rows' scales in one load, their nibbles
    interleaved 4 bytes at a time). Made from a GGUF's expert stacks when the kernels are available."""

    def __init__(self, raw: torch.Tensor, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.raw = raw.view(torch.uint8).reshape(*self.shape[:-1], row_bytes(Q.MXFP4, self.shape[-1]))
        self.parts: dict[int, MXFP4Rows16] = {}

    @classmethod
    def repack(cls, w: Weight, in_place: bool = False) -> Weight:
        """`w` repacked where it is MXFP4 on the CPU with a multiple of 16 rows and the kernels are built, else
        `w` itself. in_place: into w's own buffer (a buffer of its own, as streamed experts have)."""
        if (not isinstance(w, GGMLWeight) or w.qtype != Q.MXFP4 or len(w.shape) < 2 or w.shape[-2] % 16
                or w.raw.device.type != "cpu" or (in_place and not w.raw.is_contiguous())):
            return w
        packed = kernels.repack16(w.raw, w.shape[-1], out=w.raw if in_place else None)
        return w if packed is None else cls(packed, w.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if len(self.shape) > 2:
            return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.shape[0])])
        out = kernels.dequantize(self.raw, kernels.MXFP4_R16, dtype)
        return out if out is not None else kernels.r16_dequantize_torch(self.raw, self.shape[-1]).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ggml_linear(x, self.raw, kernels.MXFP4_R16)

    def kernel_rows(self) -> tuple[torch.Tensor, int] | None:
        return (self.raw, kernels.MXFP4_R16) if len(self.shape) == 2 else None

    def stack_rows(self) -> tuple[torch.Tensor, int] | None:
        return (self.raw, kernels.MXFP4_R16) if len(self.shape) == 3 else None

    def expert(self, e: int) -> MXFP4Rows16:
        part = self.parts.get(e)
        if part is None:
            part = self.parts[e] = MXFP4Rows16(self.raw[e], self.shape[1:])
        return part

    def to(self, device: torch.device | str) -> Weight:
        if torch.device(device).type == "cpu":
            return self
        rows = self.raw.reshape(-1, self.raw.shape[-1])  # back to the ggml layout, which every path reads
        ggml = torch.cat([kernels.r16_to_ggml(m) for m in rows.split(self.shape[-2])]) if rows.numel() else rows
        return GGMLWeight(Q.MXFP4, ggml.reshape(self.raw.shape), self.shape).to(device)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def kind(self) -> str:
        return "mxfp4"


def quantize_q8_0(t: torch.Tensor) -> torch.Tensor:
    """float [..., n] -> raw Q8_0 [..., n/32*34], bit-identical to ggml's reference quantize_row_q8_0."""
    x = t.float().reshape(*t.shape[:-1], -1, 32)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = x * inv
    a = v.abs()
    q = torch.sign(v) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))  # round half away from 0
    raw = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=-1)
    return raw.reshape(*t.shape[:-1], -1)


def fp4_to_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Official FP4 ([..., out, in/2] codes, [..., out, in/32] UE8M0) -> raw MXFP4 [..., out, in/32*17].
    Lossless: per group one scale byte then 16 bytes, byte j = element j | element j+16 << 4."""
    codes = unpack_codes(packed)  # [..., out, in]
    groups = codes.reshape(*codes.shape[:-1], -1, 32)
    qs = groups[..., :16] | (groups[..., 16:] << 4)
    raw = torch.cat([scale.view(torch.uint8).unsqueeze(-1), qs], dim=-1)
    return raw.reshape(*packed.shape[:-1], -1)
