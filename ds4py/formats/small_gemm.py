"""A prompt's products with small bf16 matrices in one compiled call. Where a matrix holds a few thousand values
(the tiny preset's: 16-256 x 32-64) a 512-token product is ~1M multiply-adds, ~5 us of arithmetic on 2 cores,
but `F.linear` takes 14-24 us (oneDNN's dispatch and threading); a prompt chunk of the tiny preset makes ~50 of
them. Here W is held once transposed as bf16 pairs, columns padded to 16 ([in / 2, out16] 32-bit words); each call
multiplies a tile of 6 activation rows by up to 64 output columns at once (24 AVX-512 accumulators, vdpbf16ps),
tiles split over the threads. `moe` runs a prompt's small experts, routed and shared, through the same tiles.

Values: float32 fused multiply-adds over the input pairs (odd product, then even), each result rounded once to bf16:
those of F.linear on the same bf16 operands up to float32 summation order (oneDNN's blocking; the same bits in
every case tried here), so a result can differ from it by one bf16 unit in the last place. Compiled at first use
like `ds4py.formats.kernels`; `linear` returns None where it does not apply (not the CPU, not bf16, autograd, no
compiler), and the caller runs F.linear."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ds4py.formats import kernels

MAX_VALUES = 1 << 16  # matrices up to this many values (64K: 256 KB as float32) are packed for this call

_SOURCE = kernels.csrc("small_gemm.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ds4py_small_gemm.restype = None
    lib.ds4py_small_gemm.argtypes = [p, i64, i64, i64, p, i64, i64, p]
    lib.ds4py_small_gemm_dpbf16.restype = ctypes.c_int
    lib.ds4py_small_gemm_simd.restype = ctypes.c_int
    lib.ds4py_moe_small.restype = ctypes.c_int
    lib.ds4py_moe_small.argtypes = [p, i64, i64, i64, i64, p, p, i64, p, p, ctypes.c_float, p]


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LOADERS = {g: kernels.lazy_library("ds4py_small_gemm" + "_generic" * g, _SOURCE, _FLAGS + ["-DDS4PY_GENERIC"] * g,
                                    ["-fopenmp"], declare=_declare) for g in (False, True)}


def _load() -> ctypes.CDLL | None:
    return _LOADERS[kernels.generic()]()


def simd() -> bool:
    """Whether the call runs SIMD code here (vdpbf16ps where AVX512-BF16, else AVX2's fused multiply-adds), not the
    portable loop (the same values)."""
    lib = _load()
    return lib is not None and bool(lib.ds4py_small_gemm_simd())


@dataclass
class Packed:
    """A bf16 matrix W [out, in] as the call reads it: transposed as bf16 pairs, columns padded to 16."""

    wp: torch.Tensor  # [(in + 1) // 2, out16] int32: each word W[c, 2p], W[c, 2p + 1] (bf16 bits, low first)
    rows: int         # out
    cols: int         # in


def pack(w: torch.Tensor) -> Packed | None:
    """bf16 W [out, in] (at most MAX_VALUES values, on the CPU) -> its packed form, or None (the call never applies)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_cpu or w.numel() > MAX_VALUES or w.numel() == 0:
        return None
    rows, cols = w.shape
    np16, kp = (rows + 15) // 16 * 16, cols + cols % 2
    padded = torch.zeros(np16, kp, dtype=torch.bfloat16)
    padded[:rows, :cols] = w
    wp = padded.view(torch.int32).T.contiguous()  # [kp / 2, np16]: pair p of column c
    return Packed(wp, rows, cols)


def linear(x: torch.Tensor, packed: Packed) -> torch.Tensor | None:
    """x [..., in] bf16 @ W.T -> [..., out] bf16 in one call, or None where it does not apply."""
    n = packed.cols
    if (x.dtype != torch.bfloat16 or not x.is_cpu or x.shape[-1] != n or (x.requires_grad and torch.is_grad_enabled())
            or x.numel() == 0):
        return None
    lib = _load()
    if lib is None:
        return None
    if x.stride(-1) != 1 or (x.dim() > 2 and not x.is_contiguous()):
        x = x.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, n)
    T = x2.shape[0]
    y = torch.empty(*x.shape[:-1], packed.rows, dtype=torch.bfloat16)
    lib.ds4py_small_gemm(x2.data_ptr(), T, n, x2.stride(0), packed.wp.data_ptr(), packed.rows, packed.wp.shape[1],
                         y.data_ptr())
    return y


@dataclass
class PackedMoE:
    """A layer's experts as ds4py_moe_small reads them: each one's W1, W3, W2 packed (`pack`), routed then shared."""

    mats: torch.Tensor   # [experts * 3] int64: the packed matrices' addresses
    inter: torch.Tensor  # [experts] int64: each expert's W1 rows
    routed: int
    shared: int
    n: int               # the model width
    keep: list           # the Packed matrices the addresses point into


def pack_moe(routed: list[tuple[torch.Tensor, ...]], shared: list[tuple[torch.Tensor, ...]]) -> PackedMoE | None:
    """Experts as bf16 (W1 [inter, n], W3 [inter, n], W2 [n, inter]) trios -> their packed form, or None where one does
    not fit the call (too large, an odd inter, shapes that disagree)."""
    trios = list(routed) + list(shared)
    if not trios:
        return None
    n = trios[0][0].shape[1]
    keep, inter = [], []
    for w1, w3, w2 in trios:
        i = w1.shape[0]
        if w1.shape != (i, n) or w3.shape != (i, n) or w2.shape != (n, i) or i % 2:
            return None
        packed = [pack(w) for w in (w1, w3, w2)]
        if None in packed:
            return None
        keep.extend(packed)
        inter.append(i)
    mats = torch.tensor([p.wp.data_ptr() for p in keep], dtype=torch.int64)
    return PackedMoE(mats, torch.tensor(inter, dtype=torch.int64), len(routed), len(shared), n, keep)


def moe(packed: PackedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
        limit: float) -> torch.Tensor | None:
    """A prompt's routed experts (ids [T, k], weights [T, k] float32) and the shared ones on x [T, n] bf16 in one call
    -> [T, n] bf16: per token the float32 sum, in pair order (ascending expert id, then the shared), of each
    expert's W2 swiglu(W1 x, W3 x) (its hidden rounded to bf16, as a bf16 model's) times its weight, rounded once.
    None where it does not apply."""
    if (x.dtype != torch.bfloat16 or not x.is_cpu or x.dim() != 2 or x.shape[1] != packed.n
            or ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    lib = _load()
    if lib is None:
        return None
    T, k = ids.shape
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(T, packed.n, dtype=torch.bfloat16)
    rc = lib.ds4py_moe_small(x.data_ptr(), T, packed.n, packed.routed, k, ids.data_ptr(), weights.data_ptr(),
                             packed.shared, packed.mats.data_ptr(), packed.inter.data_ptr(), limit, out.data_ptr())
    if rc:
        raise ValueError(f"ds4py_moe_small failed ({rc}): expert ids outside [0, {packed.routed}) or an odd inter"
                         if rc == 1 else f"ds4py_moe_small failed ({rc})")
    return out
