"""One decoding token's attention over a small cache in one compiled call: the logits of every head against the
window's keys and the compressed entries (all, or the indexer's chosen ones), the sink, the softmax, the
weighted sum and the inverse rotation. In torch (`Attention.attend_one`) these are ~15 ops: ~20 us of dispatch
per layer and token on the tiny model, where the arithmetic takes ~1 us. Larger problems (heads * head_dim *
keys > MAX_WORK: V4 Flash's 64 heads of 512 over up to 640 keys, ~40 M multiply-adds) take another loop, the heads
split over the threads (`attend_heads`), except where torch multiplies bf16 natively (`kernels.bf16_gemm_native`):
there its matmuls are the faster code for one token and their dispatch is noise. A prompt's large bf16 heads on such
CPUs (AVX512-BF16) take `ds4py_attend_rows_dp` instead (`dp_heads`): both products in vdpbf16ps pairs, one query
a thread; 128 queries over 128 window keys and 512 entries, 2 Zen 5 cores: 19.7 ms against torch's 63-68.

The values are torch's up to float32 summation order and the last bit of exp: in bf16 the logits, the
probabilities and the output are rounded to bf16 where torch's bf16 matmuls and conversions round them.
Compiled at first use like `ds4py.formats.kernels`; `attend_one` returns None where it does not apply and the
caller runs torch's ops."""

from __future__ import annotations

import ctypes
import os

import torch

from ds4py.formats import kernels
from ds4py.model import row_kernels

MAX_WORK = 1 << 20  # heads * head_dim * keys up to which the compiled call runs

_SOURCE = kernels.csrc("attention.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_attend_one.restype = i32
    lib.ds4py_attend_one.argtypes = [p, i64, i64, p, i64, p, i64, p, i64, p, f32, p, i64, i32, i32, p]
    lib.ds4py_attend_heads.restype = i32
    lib.ds4py_attend_heads.argtypes = lib.ds4py_attend_one.argtypes
    lib.ds4py_attend_rows.restype = i32
    lib.ds4py_attend_rows.argtypes = [p, i64, i64, i64, p, i64, i64, p, i64, p, i64, p, p, f32, p, i64, i32, i32, p]
    lib.ds4py_attend_dp.restype = i32
    if lib.ds4py_attend_dp():
        lib.ds4py_attend_rows_dp.restype = i32
        lib.ds4py_attend_rows_dp.argtypes = lib.ds4py_attend_rows.argtypes


_load = kernels.lazy_library("ds4py_attend", _SOURCE, ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"],
                             declare=_declare)


def attend_one(q: torch.Tensor, window: torch.Tensor, entries: torch.Tensor | None, top: torch.Tensor | None,
               sinks: torch.Tensor, scale: float, rotation: torch.Tensor) -> torch.Tensor | None:
    """One token's q [H, hd] over the window's keys [S, hd] and the compressed `entries` [n, hd] (all of them, or
    the rows `top` [k] int64 when given), with the sinks [H] float32 -> [1, H, hd] in q's dtype, rotated back by
    `rotation` [1, half] complex64 (a conjugate view: the inverse rotation); or None where the call does not apply."""
    dtype = q.dtype
    C = 0 if entries is None else (entries.shape[0] if top is None else top.numel())
    if (dtype not in (torch.float32, torch.bfloat16) or not (q.is_cpu and window.is_cpu and sinks.is_cpu)
            or q.dim() != 2 or window.dtype != dtype or window.dim() != 2 or window.shape[1] != q.shape[1]
            or sinks.dtype != torch.float32 or sinks.numel() != q.shape[0] or rotation.dtype != torch.complex64
            or (entries is not None and (entries.dtype != dtype or entries.dim() != 2
                                         or entries.shape[1] != q.shape[1] or not entries.is_cpu))
            or (top is not None and (top.dtype != torch.int64 or not top.is_cpu))
            or (q.requires_grad and torch.is_grad_enabled())):
        return None
    large = q.numel() * (window.shape[0] + C) > MAX_WORK
    if large and kernels.bf16_gemm_native():
        if dtype == torch.bfloat16 and q.shape[1] % 64 == 0 and dp_heads():  # vdpbf16ps, the heads over the threads
            S, n = window.shape[0], 0 if entries is None else entries.shape[0]
            return attend_rows(q[None], window, S, entries, None if top is None else top.view(1, -1),
                               None if entries is None or top is not None else torch.tensor([n]), sinks, scale,
                               rotation)
        return None  # torch's bf16 matmuls (oneDNN's native ones) are the faster code there
    H, hd = q.shape
    half = rotation.shape[-1]
    if rotation.numel() != half or 2 * half > hd or hd % 16:
        return None
    lib = _load()
    if lib is None:
        return None
    rotation, conj = row_kernels.rotation_pairs(rotation)
    q, window, sinks = q.contiguous(), window.contiguous(), sinks.contiguous()
    if entries is not None:
        entries = entries.contiguous()
    if top is not None:
        top = top.contiguous()
    out = torch.empty(1, H, hd, dtype=dtype)
    rc = (lib.ds4py_attend_heads if large else lib.ds4py_attend_one)(
        q.data_ptr(), H, hd, window.data_ptr(), window.shape[0],
        None if entries is None else entries.data_ptr(), 0 if entries is None else entries.shape[0],
        None if top is None else top.data_ptr(), C, sinks.data_ptr(), scale, rotation.data_ptr(), half, int(conj),
        int(dtype == torch.bfloat16), out.data_ptr())
    if rc:
        raise ValueError(f"attend_one: entry indices outside [0, {entries.shape[0]})")
    return out


def dp_heads() -> bool:
    """Whether a prompt's large bf16 heads take `ds4py_attend_rows_dp` (vdpbf16ps; the CPU has AVX512-BF16 and the
    build has that code); DS4PY_ATTEND_DP=0 leaves them to torch's ops."""
    if os.environ.get("DS4PY_ATTEND_DP", "") == "0" or not kernels.bf16_gemm_native():
        return False
    lib = _load()
    return lib is not None and bool(lib.ds4py_attend_dp())


def attend_rows(q: torch.Tensor, keys: torch.Tensor, window: int, entries: torch.Tensor | None,
                top: torch.Tensor | None, visible: torch.Tensor | None, sinks: torch.Tensor, scale: float,
                rotation: torch.Tensor) -> torch.Tensor | None:
    """A prompt chunk's R queries q [R, H, hd] over `keys` [S, hd] (the cached window, then the R queries' own):
    each over the `window` keys ending at its own, then its indexer's `top` [R, k] int64 of the compressed
    `entries` [n, hd] (-1: none), or else the first `visible` [R] int64 of them, and the sinks [H] float32 ->
    [R, H, hd] in q's dtype, rotated back by `rotation` [R, half] complex64 (a conjugate view: the inverse
    rotation); or None where the call does not apply (as `attend_one`)."""
    dtype = q.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or q.dim() != 3 or keys.dim() != 2 or keys.dtype != dtype
            or keys.shape[1] != q.shape[2] or keys.shape[0] < q.shape[0] or not (q.is_cpu and keys.is_cpu)
            or sinks.dtype != torch.float32 or sinks.numel() != q.shape[1] or not sinks.is_cpu
            or rotation.dtype != torch.complex64 or (q.requires_grad and torch.is_grad_enabled())):
        return None
    R, H, hd = q.shape
    C = 0
    if entries is not None:
        if entries.dtype != dtype or entries.dim() != 2 or entries.shape[1] != hd or not entries.is_cpu:
            return None
        if top is not None:
            if top.dtype != torch.int64 or top.dim() != 2 or top.shape[0] != R or not top.is_cpu:
                return None
            C = top.shape[1]
        elif visible is None or visible.dtype != torch.int64 or visible.numel() != R or not visible.is_cpu:
            return None
        else:
            C = entries.shape[0]
    half = rotation.shape[-1]
    if rotation.numel() != R * half or 2 * half > hd or hd % 16:
        return None
    large = H * hd * (window + C) > MAX_WORK
    if large and not (dtype == torch.bfloat16 and hd % 64 == 0 and dp_heads()):
        return None  # torch's ops (native bf16 matmuls where the CPU has them)
    lib = _load()
    if lib is None:
        return None
    rotation, conj = row_kernels.rotation_pairs(rotation)
    q, keys, sinks = q.contiguous(), keys.contiguous(), sinks.contiguous()
    if entries is not None:
        entries = entries.contiguous()
        top = None if top is None else top.contiguous()
        visible = None if top is not None else visible.contiguous()
    out = torch.empty(R, H, hd, dtype=dtype)
    rc = (lib.ds4py_attend_rows_dp if large else lib.ds4py_attend_rows)(  # (the first: bf16 large heads)
        q.data_ptr(), R, H, hd, keys.data_ptr(), keys.shape[0], window, None if entries is None else entries.data_ptr(),
        0 if entries is None else entries.shape[0], None if top is None else top.data_ptr(),
        0 if top is None else top.shape[1], None if visible is None else visible.data_ptr(), sinks.data_ptr(), scale,
        rotation.data_ptr(), half, int(conj), int(dtype == torch.bfloat16), out.data_ptr())
    if rc:
        raise ValueError(f"attend_rows: entry indices outside [0, {entries.shape[0]})")
    return out
