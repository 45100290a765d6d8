"""A prompt's products with small bf16 matrices in one compiled call. Where a matrix holds a few thousand values
(the tiny preset's: 16-256 x 32-64) a 512-token product is ~1M multiply-adds, ~5 us of arithmetic on 2 cores,
but `F.linear` takes 16-35 us (oneDNN's dispatch and threading); a prompt chunk of the tiny preset makes ~50 of
them. Here W is held once as float32, transposed and padded to 16 columns ([in, out16]); each call widens a
tile of 6 activation rows to float32 and multiplies it by every 64 output columns at once (24 AVX-512
accumulators), tiles split over the threads.

Values: float32 products and sums in input order, each result rounded once to bf16: those of F.linear on the
same bf16 operands up to float32 summation order (oneDNN's blocking), so a result can differ from it by one bf16
unit in the last place. Compiled at first use like `ds4py.formats.kernels`; `linear` returns None where it does
not apply (not the CPU, not bf16, autograd, no compiler), and the caller runs F.linear."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ds4py.formats import kernels

MAX_VALUES = 1 << 16  # matrices up to this many values (64K: 256 KB as float32) are packed for this call

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && !defined(DS4PY_GENERIC)
#include <immintrin.h>
#define DS4PY_AVX512 1
#else
#define DS4PY_AVX512 0
#endif
""" + kernels.BF16_C + r"""
namespace {
constexpr int TR = 6;   // activation rows per tile
constexpr int NV = 4;   // 16-column vectors per pass

#if DS4PY_AVX512 && defined(__AVX512BF16__)
#define DS4PY_DPBF16 1
// rows [0, R) of the tile times the columns [c0, c0 + 16 * V): xp the tile's bf16 pairs [R, kp / 2] (32-bit words),
// wp W's pairs [kp / 2, np] (word (p, c) = W[c, 2p], W[c, 2p + 1]); vdpbf16ps adds the odd product, then the even
template <int R, int V>
inline void tile(const uint32_t* xp, int64_t kh, const uint32_t* wp, int64_t np, int64_t c0, uint16_t* y, int64_t n) {
  __m512 acc[R][V];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kh; i++) {
    __m512bh w[V];
    for (int v = 0; v < V; v++) w[v] = (__m512bh)_mm512_loadu_si512(wp + i * np + c0 + 16 * v);
    for (int r = 0; r < R; r++) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[r * kh + i]);
      for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, w[v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) {
      const int64_t c = c0 + 16 * v;
      if (c >= n) break;
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(acc[r][v]);
      const int64_t m = std::min<int64_t>(16, n - c);
      _mm256_mask_storeu_epi16(y + r * n + c, (__mmask16)((1u << m) - 1), b);
    }
}

template <int R>
void row_tile(const uint32_t* xp, int64_t kh, const uint32_t* wp, int64_t np, uint16_t* y, int64_t n) {
  for (int64_t c0 = 0; c0 < np; c0 += 16 * NV) {  // up to NV vectors per pass: each broadcast serves them all
    switch (std::min<int64_t>(NV, (np - c0) / 16)) {
      case 1: tile<R, 1>(xp, kh, wp, np, c0, y, n); break;
      case 2: tile<R, 2>(xp, kh, wp, np, c0, y, n); break;
      case 3: tile<R, 3>(xp, kh, wp, np, c0, y, n); break;
      default: tile<R, NV>(xp, kh, wp, np, c0, y, n);
    }
  }
}

using RowTile = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, uint16_t*, int64_t);
const RowTile ROW_TILES[TR] = {row_tile<1>, row_tile<2>, row_tile<3>, row_tile<4>, row_tile<5>, row_tile<6>};
#else
#define DS4PY_DPBF16 0
#endif
}  // namespace

extern "C" int ds4py_small_gemm_dpbf16() { return DS4PY_DPBF16; }

// x bf16 bits [T, k] (row stride xs), wp W's bf16 pairs [kp / 2, np] (kp = k rounded up to even; columns n..np
// and the pad zero) -> y bf16 bits [T, n]: y[t, c] = bf16(sum over pairs p of x[t, 2p + 1] W[c, 2p + 1] then
// x[t, 2p] W[c, 2p]), float32 fused multiply-adds in that order (vdpbf16ps's, whose inputs and output
// flush float32 subnormals, which bf16 activations and weights do not reach).
extern "C" void ds4py_small_gemm(const uint16_t* x, int64_t T, int64_t k, int64_t xs, const uint32_t* wp, int64_t n,
                                 int64_t np, uint16_t* y) {
  const int64_t kh = (k + 1) / 2;
  const int64_t tiles = (T + TR - 1) / TR;
  const int64_t grain = std::max<int64_t>(1, (int64_t)16384 / std::max<int64_t>(TR * kh * np, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t a, int64_t b) {
    std::vector<uint16_t> xt(TR * 2 * kh, 0);  // the tile's rows, each padded to an even length
    for (int64_t tl = a; tl < b; tl++) {
      const int64_t t0 = tl * TR;
      const int tr = (int)std::min<int64_t>(TR, T - t0);
      for (int r = 0; r < tr; r++) std::memcpy(xt.data() + r * 2 * kh, x + (t0 + r) * xs, k * 2);
      const uint32_t* xp = (const uint32_t*)xt.data();
#if DS4PY_DPBF16
      ROW_TILES[tr - 1](xp, kh, wp, np, y + t0 * n, n);
#else
      for (int r = 0; r < tr; r++)
        for (int64_t c = 0; c < n; c++) {
          float s = 0.0f;
          for (int64_t p = 0; p < kh; p++) {
            const uint32_t xw = xp[r * kh + p], ww = wp[p * np + c];
            s = std::fma(bf16_to_float(xw >> 16), bf16_to_float(ww >> 16), s);
            s = std::fma(bf16_to_float(xw & 0xFFFF), bf16_to_float(ww & 0xFFFF), s);
          }
          y[(t0 + r) * n + c] = float_to_bf16(s);
        }
#endif
    }
  });
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ds4py_small_gemm.restype = None
    lib.ds4py_small_gemm.argtypes = [p, i64, i64, i64, p, i64, i64, p]
    lib.ds4py_small_gemm_dpbf16.restype = ctypes.c_int


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LOADERS = {g: kernels.lazy_library("ds4py_small_gemm" + "_generic" * g, _SOURCE, _FLAGS + ["-DDS4PY_GENERIC"] * g,
                                    ["-fopenmp"], declare=_declare) for g in (False, True)}


def _load() -> ctypes.CDLL | None:
    return _LOADERS[kernels.generic()]()


def simd() -> bool:
    """Whether the call runs vdpbf16ps (AVX512-BF16) here, not the portable loop (the same values)."""
    lib = _load()
    return lib is not None and bool(lib.ds4py_small_gemm_dpbf16())


@dataclass
class Packed:
    """A bf16 matrix W [out, in] as the call reads it: float32, transposed, columns padded to 16."""

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
