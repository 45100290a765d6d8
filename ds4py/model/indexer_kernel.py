"""The lightning indexer's step for one token (decoding) in one compiled call: every compressed entry's score
`sum_h w[h] * relu(q_h . k) / sqrt(head_dim)` and the top k of them. In torch these are ~20 ops (a matmul, the
relu, the head sum, the int64 keys of `indexer.stable_topk`, a top-k): ~35 us of dispatch per layer and token
on the tiny model, where the arithmetic takes ~1 us.

Each score is summed in float32 in a fixed order (the heads 16 at a time over head_dim, then across them),
whatever the number of entries, so it can differ from torch's matmul in the last bits; the top k are chosen as
`stable_topk` chooses (largest first, ties to the earlier entry; -0.0 equals 0.0). With bf16 queries and keys (a
bf16 model's) head_dim goes in pairs, d + 1 then d: on CPUs with AVX512-BF16 one `vdpbf16ps` does a pair for 16
heads straight from the cache's bf16 keys (2x the float32 multiply-adds; V4 Flash's 64 heads of 128 at 64K
entries, 2 cores: 4.0-5.4 -> 1.3-1.8 ms a decoding step), elsewhere float32 fused steps in that order, the same
bits on values in float32's normal range. Compiled at first use like
`ds4py.formats.kernels`; `index_rows` returns None where it does not apply (not the CPU, other dtypes, more than
MAX_HEADS heads, autograd, no compiler) and the caller runs torch's ops."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels

MAX_HEADS = 128  # the AVX-512 code keeps one accumulator per 16 heads in registers

_SOURCE = kernels.csrc("indexer.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_index_rows.restype = i32
    lib.ds4py_index_rows.argtypes = [p, i32, i64, i64, i64, p, p, i32, i64, i64, p, f32, i64, p, p]


CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_load = kernels.lazy_library("ds4py_index", _SOURCE, CFLAGS, ["-fopenmp"], declare=_declare)


def build(extra_cflags: list[str]) -> ctypes.CDLL:
    """_SOURCE built with more flags (tests: `-mno-avx512bf16` for the code of CPUs without vdpbf16ps)."""
    lib = kernels.build_library("ds4py_index", _SOURCE, CFLAGS + extra_cflags, ["-fopenmp"])
    _declare(lib)
    return lib


def index_rows(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None, scale: float,
               k: int, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """T queries q [T, H, hd] (rotated) with head weights w [T, H] float32 over the compressed keys [n, hd], query
    t seeing entries [0, visible[t]) (None: all) -> (top [T, k] int64: each query's k best visible entries as
    `stable_topk` orders them, then -1 where it sees fewer than k; totals [T, n] float32, the visible entries'
    scores, the rest undefined), or None where the call does not apply. `lib`: another build of _SOURCE (`build`;
    for tests) instead of this CPU's."""
    if (not (q.is_cpu and w.is_cpu and keys.is_cpu) or q.dim() != 3 or keys.dim() != 2 or q.shape[2] != keys.shape[1]
            or q.dtype not in (torch.float32, torch.bfloat16) or keys.dtype not in (torch.float32, torch.bfloat16)
            or w.dtype != torch.float32 or tuple(w.shape) != tuple(q.shape[:2]) or q.shape[1] > MAX_HEADS
            or not 0 <= k <= keys.shape[0] or (q.requires_grad and torch.is_grad_enabled())):
        return None
    T, n = q.shape[0], keys.shape[0]
    if visible is not None and (visible.numel() != T or not visible.is_cpu):
        return None
    lib = lib or _load()
    if lib is None:
        return None
    if not q.is_contiguous():
        q = q.contiguous()
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    w = w.contiguous()
    if visible is not None:
        visible = visible.to(torch.int64).contiguous()
    totals = torch.empty(T, n, dtype=torch.float32)
    top = torch.empty(T, k, dtype=torch.int64)
    rc = lib.ds4py_index_rows(q.data_ptr(), int(q.dtype == torch.bfloat16), T, q.shape[1], q.shape[2], w.data_ptr(),
                              keys.data_ptr(), int(keys.dtype == torch.bfloat16), n, keys.stride(0),
                              None if visible is None else visible.data_ptr(), scale, k, totals.data_ptr(),
                              top.data_ptr())
    if rc:
        raise ValueError(f"ds4py_index_rows failed ({rc}): a visible count outside [0, {n}]?")
    return top, totals
