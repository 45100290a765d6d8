"""Products straight from packed weights on a CUDA GPU, as Triton kernels: the GPU side of `ds4py.formats.kernels`.

- `linear(x, raw, qtype)`: x [..., n] @ W.T for W = raw Q8_0 / MXFP4 rows [out, bytes], the GGUF's blocks as they lie
  on the device. Up to GEMV_MAX_T rows of x: one kernel decodes the blocks in registers and sums in float32, so a
  decoding token reads the weights in their packed size (its products are bound by those bytes). Longer prompts:
  the matrix dequantized to x's dtype by one kernel, then torch's GEMM.
- `bf16_linear(x, w)`: the same for a bf16 matrix (the output head), float32 sums for float32 or bf16 x.
- `stack_linear(x, raw, qtype, ids, x_div)`: row p of the result is x's row p // x_div against the matrix ids[p] of an
  expert stack [experts, out, bytes]; ids stay on the device, so a token's routed experts run without the host
  reading the router's choice.

Semantics: the weights' exact values (those of `ggml.ggml_dequantize`), the activations as given (not quantized to
Q8_0 as the CPU kernels do: here the arithmetic is free beside the weights' bytes), float32 products and sums in the
kernel's order (tiles of BLOCK_K columns). Where no GPU is present, the kernels run on CPU tensors through Triton's
interpreter, only when DS4PY_GPU_KERNELS_ON_CPU=1 (the tests: it is slow). DS4PY_NO_GPU_KERNELS=1 turns them off
(dequantize + F.linear on the device instead)."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ds4py.formats import env

Q8_0, MXFP4, BF16 = 8, 39, -1  # ggml type ids; BF16: a plain bf16 matrix
BLOCK_BYTES = {Q8_0: 34, MXFP4: 17}
GEMV_MAX_T = 8  # rows of x the GEMV kernel takes (each re-reads the matrix, mostly from L2); more: dequantize + GEMM
tl = None  # triton.language, imported at the first product (`_kernels`); the kernels' bodies name it


def available() -> bool:
    return not env.flag("DS4PY_NO_GPU_KERNELS") and _installed()


@functools.cache
def _installed() -> bool:
    """Whether Triton can be imported (looked up once: `available` is asked on every product)."""
    return importlib.util.find_spec("triton") is not None


def takes(*tensors: torch.Tensor) -> bool:
    """Whether these tensors' products run here: all on a CUDA device (or, for the tests, all on the CPU with
    DS4PY_GPU_KERNELS_ON_CPU=1 where there is no GPU), with Triton installed, autograd off."""
    if not tensors[0].is_cuda:  # (the CPU's answer first and cheaply: ggml_linear asks ~100 times a token)
        if not env.flag("DS4PY_GPU_KERNELS_ON_CPU") or torch.cuda.is_available() or not all(t.is_cpu for t in tensors):
            return False
    elif not all(t.is_cuda for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return available()


@functools.cache
def _kernels() -> SimpleNamespace:
    """The jit'd kernels and their tile sizes (rows of W and columns per step of one program). Without a GPU they run
    in Triton's interpreter, which must be chosen before Triton is imported; it runs programs one after another,
    so there larger tiles (fewer programs) do the same numpy work in far fewer Python steps."""
    global tl
    interpret = not torch.cuda.is_available()
    if interpret and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language

    if interpret and not triton.knobs.runtime.interpret:
        raise RuntimeError("ds4py: the GPU kernels on the CPU need Triton's interpreter, but Triton was imported "
                           "before it was chosen: set TRITON_INTERPRET=1 before importing triton")

    tl = triton.language
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as jit
    else:
        jit = triton.jit
    global _weights_jit
    _weights_jit = jit(_weights)  # (named from the kernels' bodies)
    return SimpleNamespace(gemv=jit(_gemv), dequantize=jit(_dequantize), cdiv=triton.cdiv,
                           block_r=64 if interpret else 16, block_k=512 if interpret else 256)


def _weights(w_ptr, row_off, c, mask, QTYPE: tl.constexpr):
    """The float32 values of columns c [BK] of the rows that start at row_off [BR] (bytes; elements for BF16) ->
    [BR, BK]."""
    if QTYPE == 8:  # Q8_0 block of 34 bytes: f16 scale, 32 int8
        b = w_ptr + row_off[:, None] + (c // 32 * 34)[None, :]
        lo = tl.load(b, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(b + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        q = tl.load(b + 2 + (c % 32)[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * d
    elif QTYPE == 39:  # MXFP4 block of 17 bytes: E8M0 scale, 16 bytes of e2m1 pairs (element j low, j + 16 high)
        b = w_ptr + row_off[:, None] + (c // 32 * 17)[None, :]
        j = (c % 32)[None, :]
        e = tl.load(b, mask=mask, other=0).to(tl.int32)
        byte = tl.load(b + 1 + j % 16, mask=mask, other=0).to(tl.int32)
        nib = tl.where(j < 16, byte & 15, byte >> 4)
        code = nib & 7  # |value| doubled, as ggml's table: 0 1 2 3 4 6 8 12
        mag = tl.where(code < 2, code, (2 + (code & 1)) << tl.maximum((code >> 1) - 1, 0))
        value = tl.where(nib >= 8, -mag, mag).to(tl.float32)
        # 2^(e - 128) (the scale halved, for the doubled values) as float32 bits: subnormal for e = 0, 1
        bits = tl.where(e < 2, 0x00200000 * (1 + e), (e - 1) << 23)
        w = value * bits.to(tl.float32, bitcast=True)
    else:  # BF16
        w = tl.load(w_ptr + row_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return w


_weights_jit = None  # `_weights` jit'd, made by `_kernels`


def _gemv(x_ptr, x_stride, x_div, w_ptr, w_expert_stride, w_row_stride, ids_ptr, y_ptr, rows, n,
          QTYPE: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[p, r] = sum_c W_p[r, c] x[p // x_div, c] for a tile of BLOCK_R rows r; W_p the matrix ids[p] of a stack
    (HAS_IDS) or the one matrix. Grid: (row tiles, rows of y)."""
    p = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    row_off = r.to(tl.int64) * w_row_stride
    if HAS_IDS:
        row_off += tl.load(ids_ptr + p).to(tl.int64) * w_expert_stride
    x_row = x_ptr + (p // x_div).to(tl.int64) * x_stride
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        cmask = c < n
        xv = tl.load(x_row + c, mask=cmask, other=0.0).to(tl.float32)
        w = _weights_jit(w_ptr, row_off, c, rmask[:, None] & cmask[None, :], QTYPE)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(y_ptr + p.to(tl.int64) * rows + r, acc, mask=rmask)


def _dequantize(w_ptr, w_row_stride, out_ptr, rows, n, QTYPE: tl.constexpr, BF16_BITS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, c] = W[r, c] in out's dtype, a BLOCK_R x BLOCK_K tile per program. BF16_BITS: out is the int16 view of
    a bf16 tensor, rounded here to nearest even (torch's rounding; Triton's interpreter truncates)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < rows)[:, None] & (c < n)[None, :]
    w = _weights_jit(w_ptr, r.to(tl.int64) * w_row_stride, c, mask, QTYPE)
    if BF16_BITS:
        u = w.to(tl.uint32, bitcast=True)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32).to(tl.int16)
    else:
        out = w.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * n + c[None, :], out, mask=mask)


def _columns(raw: torch.Tensor, qtype: int) -> int:
    """The logical columns of raw rows [..., bytes] (elements for BF16)."""
    return raw.shape[-1] if qtype == BF16 else raw.shape[-1] // BLOCK_BYTES[qtype] * 32


def _check(raw: torch.Tensor, qtype: int) -> None:
    if qtype == BF16:
        if raw.dtype != torch.bfloat16 or raw.stride(-1) != 1:
            raise ValueError(f"gpu_kernels: need a bf16 matrix with contiguous rows, got {raw.dtype} {raw.stride()}")
        return
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"gpu_kernels: ggml type {qtype} is not one the kernels decode (Q8_0, MXFP4)")
    if raw.dtype != torch.uint8 or raw.stride(-1) != 1 or raw.shape[-1] % BLOCK_BYTES[qtype]:
        raise ValueError(f"gpu_kernels: need raw uint8 rows of whole {BLOCK_BYTES[qtype]}-byte blocks, got "
                         f"{raw.dtype} {tuple(raw.shape)} strides {raw.stride()}")


def gemv(x: torch.Tensor, raw: torch.Tensor, qtype: int, ids: torch.Tensor | None = None,
         x_div: int = 1) -> torch.Tensor:
    """x [T, n] (any float dtype, rows contiguous) against W = raw [rows, bytes] (or, with ids [P], the stack
    raw [experts, rows, bytes]: row p against matrix ids[p] and x's row p // x_div) -> float32 [T or P, rows]."""
    _check(raw, qtype)
    n = _columns(raw, qtype)
    if x.shape[-1] != n:
        raise ValueError(f"gpu_kernels: x [..., {x.shape[-1]}] does not match the weight's {n} columns")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = raw.shape[-2]
    P = x.shape[0] if ids is None else ids.shape[0]
    y = torch.empty(P, rows, dtype=torch.float32, device=x.device)
    if P and rows:
        k = _kernels()
        k.gemv[(k.cdiv(rows, k.block_r), P)](
            x, x.stride(0), x_div, raw, raw.stride(0) if ids is not None else 0, raw.stride(-2),
            ids if ids is not None else raw, y, rows, n,
            QTYPE=qtype, HAS_IDS=ids is not None, BLOCK_R=k.block_r, BLOCK_K=k.block_k)
    return y


def dequantize(raw: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw Q8_0 / MXFP4 rows [rows, bytes] -> [rows, n] in dtype (the values of `ggml.ggml_dequantize`)."""
    _check(raw, qtype)
    rows, n = raw.shape[0], _columns(raw, qtype)
    out = torch.empty(rows, n, dtype=dtype, device=raw.device)
    if out.numel():
        k = _kernels()
        bf16 = dtype == torch.bfloat16
        k.dequantize[(k.cdiv(rows, k.block_r), k.cdiv(n, k.block_k))](
            raw, raw.stride(0), out.view(torch.int16) if bf16 else out, rows, n, QTYPE=qtype, BF16_BITS=bf16,
            BLOCK_R=k.block_r, BLOCK_K=k.block_k)
    return out


def _rows(x: torch.Tensor) -> int:
    """The number of rows of activations in x [..., n]."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [..., n] @ W.T for raw Q8_0 / MXFP4 rows -> [..., rows] in x's dtype (float32 sums)."""
    T = _rows(x)
    if T > GEMV_MAX_T:
        return F.linear(x, dequantize(raw, qtype, x.dtype))
    y = gemv(x.reshape(T, x.shape[-1]), raw, qtype)
    return y.reshape(*x.shape[:-1], raw.shape[0]).to(x.dtype)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, as_float32: bool = False) -> torch.Tensor | None:
    """x [..., n] @ w.T for a bf16 matrix w [rows, n], up to GEMV_MAX_T rows of x, float32 sums -> [..., rows] in
    x's dtype (float32 with as_float32); None for more rows (torch's GEMM does those)."""
    T = _rows(x)
    if T > GEMV_MAX_T:
        return None
    y = gemv(x.reshape(T, x.shape[-1]), w, BF16).reshape(*x.shape[:-1], w.shape[0])
    return y if as_float32 else y.to(x.dtype)


def stack_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int, ids: torch.Tensor, x_div: int = 1) -> torch.Tensor:
    """Row p: x[p // x_div] @ W[ids[p]].T for an expert stack raw [experts, rows, bytes] and ids [P] on the device
    -> float32 [P, rows]."""
    if raw.dim() != 3:
        raise ValueError(f"gpu_kernels.stack_linear: need a stack [experts, rows, bytes], got {tuple(raw.shape)}")
    return gemv(x, raw, qtype, ids=ids.reshape(-1), x_div=x_div)
