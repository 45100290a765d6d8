"""The compressor's closing windows in one compiled call: for each window the gate plus its position bias, the
softmax over its slots per channel, the gated sum of the kv rows, the RMS norm and the rotation at the window's
first position. In torch (`Compressor.__call__`) these are ~20 ops per call, which a decoding token pays about
once per token on the tiny model (four ratio-4 compressors closing every fourth token, one ratio-128): ~40 us of
dispatch where the arithmetic takes ~1 us. A prompt's windows go in the same call, split over the threads, so
decoding and prefill make the same entries.

The values are torch's up to float32 rounding (fused multiply-adds, the last bit of exp, cos and sin): in bf16
the gated logits, the weights, each product and the sums are rounded to bf16 where torch's bf16 ops round them
(the tests' bf16 entries are torch's bit for bit). The loops run over the channels, 16 to a vector.
Compiled at first use like `ds4py.formats.kernels`; `close_windows` returns None where it does not apply and the
caller runs torch's ops."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels

_SOURCE = kernels.csrc("compressor.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_compress_windows.restype = i32
    lib.ds4py_compress_windows.argtypes = [p, p, i64, i64, i64, i32, p, p, p, p, f32, p, i64, i64, i32, p]
    lib.ds4py_compress_step.restype = i32
    lib.ds4py_compress_step.argtypes = [p, i32, i64, p, p, p, p, p, i64, i64, i64, i32, p, p, p, p, f32, p, i64, i64,
                                        p, p, p]


_load = kernels.lazy_library("ds4py_compress", _SOURCE, ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"],
                             declare=_declare)


def close_windows(kv: torch.Tensor, gate: torch.Tensor, ratio: int, dim: int, overlap: bool, ape: torch.Tensor,
                  prev_kv: torch.Tensor | None, prev_gate: torch.Tensor | None, norm: torch.Tensor, eps: float,
                  inv_freq: torch.Tensor, first: int, out: torch.Tensor) -> bool:
    """The entries of n = kv.shape[0] // ratio closing windows: kv, gate [n * ratio, od] (od = 2 * dim with
    overlap), ape [ratio, od] in their dtype, the previous window's first series prev_kv / prev_gate [ratio, dim]
    (overlap; None: none yet), the norm [dim] float32, the rotation's inv_freq [half] float32 and the first
    window's position -> written into out [n, dim] (contiguous, their dtype). False (nothing written) where the
    call does not apply."""
    dtype = kv.dtype
    od = 2 * dim if overlap else dim
    n = kv.shape[0] // ratio if ratio else 0
    if (dtype not in (torch.float32, torch.bfloat16) or kv.dim() != 2 or kv.shape != gate.shape or kv.shape[1] != od
            or n * ratio != kv.shape[0] or gate.dtype != dtype or ape.dtype != dtype or ape.shape != (ratio, od)
            or norm.dtype != torch.float32 or norm.numel() != dim or inv_freq.dtype != torch.float32
            or 2 * inv_freq.numel() > dim or out.dtype != dtype or out.shape != (n, dim) or not out.is_contiguous()
            or (prev_kv is None) != (prev_gate is None)
            or (prev_kv is not None and (not overlap or prev_kv.dtype != dtype or prev_gate.dtype != dtype
                                         or prev_kv.shape != (ratio, dim) or prev_gate.shape != (ratio, dim)))
            or not all(t.is_cpu for t in (kv, gate, ape, norm, inv_freq, out))
            or (kv.requires_grad and torch.is_grad_enabled())):
        return False
    lib = _load()
    if lib is None:
        return False
    kv, gate, ape = kv.contiguous(), gate.contiguous(), ape.contiguous()
    if prev_kv is not None:
        prev_kv, prev_gate = prev_kv.contiguous(), prev_gate.contiguous()
    rc = lib.ds4py_compress_windows(kv.data_ptr(), gate.data_ptr(), n, ratio, dim, int(overlap), ape.data_ptr(),
                                    None if prev_kv is None else prev_kv.data_ptr(),
                                    None if prev_gate is None else prev_gate.data_ptr(), norm.contiguous().data_ptr(),
                                    eps, inv_freq.contiguous().data_ptr(), inv_freq.numel(), first,
                                    int(dtype == torch.bfloat16), out.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_compress_windows failed ({rc})")
    return True


def step_function():
    """The compiled library's ds4py_compress_step, or None (no compiler): `Compressor.step_one` calls it directly,
    its arguments checked once per plan."""
    lib = _load()
    return None if lib is None else lib.ds4py_compress_step
