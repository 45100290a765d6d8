"""RMS norms and the rotary rotation of rows in compiled calls. Decoding: in torch each is 4-10 ops on a few
thousand values, 20-60 us of dispatch where the arithmetic takes ~1 us (five norms and two rotations per
layer). Prompts: torch's ops make float32 copies and several passes; the compiled loops make one pass, split
over the threads by row (V4 Flash, a 256-token chunk in bf16: the per-head q norm 19.4 -> 1.6 ms, the
attention norm 2.0 -> 0.17 ms, the rotation of q and kv 2.0 -> 0.9 ms, 2 threads).
The same operations in float32 as the torch code they replace (`ds4py.model.norms`, `ds4py.model.rope`),
except that the mean of squares is summed in float64 (torch's float32 sum may differ from it in the last
bit). Compiled at first use like `ds4py.formats.kernels`; each function returns None where it does not
apply (not the CPU, other dtypes, autograd, no compiler) and the caller runs torch's."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels

_SOURCE = kernels.csrc("rows.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_rms_rows.restype = None
    lib.ds4py_rms_rows.argtypes = [p, i32, i64, i64, p, i32, f32, i32, p]
    lib.ds4py_rope_rows.restype = None
    lib.ds4py_qkv_rows.restype = None
    lib.ds4py_qkv_rows.argtypes = [p, p, i32, i64, i64, i64, p, i32, f32, p, i64, p]
    lib.ds4py_rope_rows.argtypes = [p, i32, i64, i64, i64, i64, p, i32, p]


_load = kernels.lazy_library("ds4py_rows", _SOURCE, ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"],
                             declare=_declare)


_FLOATS = (torch.float32, torch.bfloat16)


def _applies(x: torch.Tensor) -> bool:
    # cheap checks only: these wrappers run ~20 times per decoded token, where each us counts
    return (x.is_cpu and x.dtype in _FLOATS and x.dim() >= 1 and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled()))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """`norms.rms_norm` (weight given) or `norms.unweighted_rms_norm` (None) of x [..., n] in one call, or None."""
    if not _applies(x) or (weight is not None and (weight.dtype not in _FLOATS or not weight.is_cpu
                                                   or weight.numel() != x.shape[-1])):
        return None
    lib = _load()
    if lib is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    bf = int(x.dtype == torch.bfloat16)
    y = torch.empty_like(x)
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    n = x.shape[-1]
    lib.ds4py_rms_rows(x.data_ptr(), bf, x.numel() // n, n, None if weight is None else weight.data_ptr(),
                       int(weight is not None and weight.dtype == torch.bfloat16), eps, int(bf and weight is None),
                       y.data_ptr())
    return y


def rotation_pairs(rotation: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A complex64 rotation as the C code reads it: contiguous (its memory is (cos, sin) float pairs) and whether
    those pairs are to be conjugated (a conjugate view shares its input's memory; is_conj marks it)."""
    if not rotation.is_contiguous():
        rotation = rotation.contiguous()  # (may resolve the conjugation: read is_conj after)
    return rotation, rotation.is_conj()


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor | None:
    """`rope.rotate` of x [T, ..., hd] by rotation [T, half] (complex64, or its conjugate) in one call, or None."""
    if not _applies(x) or x.dim() < 2 or rotation.dtype != torch.complex64 or not rotation.is_cpu:
        return None
    T, half = x.shape[0], rotation.shape[-1]
    if rotation.numel() != T * half or 2 * half > x.shape[-1]:
        return None
    lib = _load()
    if lib is None:
        return None
    rotation, conj = rotation_pairs(rotation)
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)
    lib.ds4py_rope_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), T, x.numel() // (T * x.shape[-1]), x.shape[-1],
                        half, rotation.data_ptr(), int(conj), y.data_ptr())
    return y


def qkv_rows(q: torch.Tensor, kv: torch.Tensor, heads: int, kv_norm: torch.Tensor, eps: float,
             rotation: torch.Tensor) -> torch.Tensor | None:
    """A prompt's attention projections finished in one call: q [T, heads * hd] normed per head without a weight,
    kv [T, hd] normed with kv_norm, both rotated by rotation [T, half] complex64 -> qkv [T, heads + 1, hd]: the
    values of `unweighted_rms_norm`, `rms_norm`, the concatenation and `rope.rotate` one by one; or None."""
    T, hd = kv.shape[0], kv.shape[-1]
    if (not _applies(q) or q.dtype != kv.dtype or not kv.is_cpu or kv.dim() != 2 or q.shape != (T, heads * hd)
            or kv_norm.dtype not in _FLOATS or not kv_norm.is_cpu or kv_norm.numel() != hd
            or rotation.dtype != torch.complex64 or not rotation.is_cpu or rotation.is_conj()
            or rotation.numel() != T * rotation.shape[-1] or 2 * rotation.shape[-1] > hd):
        return None
    lib = _load()
    if lib is None:
        return None
    q, kv, kv_norm, rotation = q.contiguous(), kv.contiguous(), kv_norm.contiguous(), rotation.contiguous()
    qkv = torch.empty(T, heads + 1, hd, dtype=q.dtype)
    lib.ds4py_qkv_rows(q.data_ptr(), kv.data_ptr(), int(q.dtype == torch.bfloat16), T, heads, hd, kv_norm.data_ptr(),
                       int(kv_norm.dtype == torch.bfloat16), eps, rotation.data_ptr(), rotation.shape[-1],
                       qkv.data_ptr())
    return qkv
