"""One decoding token's attention over a small cache in one compiled call: the logits of every head against the
window's keys and the compressed entries (all, or the indexer's chosen ones), the sink, the softmax, the
weighted sum and the inverse rotation. In torch (`Attention.attend_one`) these are ~15 ops: ~20 us of dispatch
per layer and token on the tiny model, where the arithmetic takes ~1 us. Only for small problems
(heads * head_dim * keys <= MAX_WORK): V4 Flash's 64 heads of 512 over 640 keys are ~40 M multiply-adds, where
torch's bf16 matmuls are the faster code and their dispatch is noise.

The values are torch's up to float32 summation order and the last bit of exp: in bf16 the logits, the
probabilities and the output are rounded to bf16 where torch's bf16 matmuls and conversions round them.
Compiled at first use like `ds4py.formats.kernels`; `attend_one` returns None where it does not apply and the
caller runs torch's ops."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels
from ds4py.model import row_kernels

MAX_WORK = 1 << 20  # heads * head_dim * keys up to which the compiled call runs

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
""" + kernels.BF16_C + r"""
namespace {
inline float round_to(float f, int bf) { return bf ? bf16_to_float(float_to_bf16(f)) : f; }
}  // namespace

// q [H, hd], the window's keys [S, hd] (contiguous), the compressed entries (rows of hd, contiguous): all C
// of them (idx null) or the C rows idx[0..C); every key is also the value. sinks [H] float32; rot [half]
// (cos, sin) pairs, conjugated when conj; bf: q, keys, entries and out bf16 bits (else float32).
// out [H, hd] = per head softmax([q.k * scale for every key], sink) @ keys, then its last 2 * half channels
// rotated by rot (the inverse rotation: conj = 1). Returns 0, or 1 for an index outside [0, n).
extern "C" int ds4py_attend_one(const void* q, int64_t H, int64_t hd, const void* win, int64_t S,
                                const void* entries, int64_t n, const int64_t* idx, int64_t C, const float* sinks,
                                float scale, const float* rot, int64_t half, int conj, int bf, void* out) {
  if (idx)
    for (int64_t c = 0; c < C; c++)
      if (idx[c] < 0 || idx[c] >= n) return 1;
  const int64_t L = S + C;
  std::vector<const void*> rows(L);  // each key's first value
  const size_t es = bf ? 2 : 4;
  for (int64_t j = 0; j < S; j++) rows[j] = (const char*)win + j * hd * es;
  for (int64_t c = 0; c < C; c++) rows[S + c] = (const char*)entries + (idx ? idx[c] : c) * hd * es;
  // the keys as rows [L, hd] (for the weighted sum) and transposed [hd, L] (for the logits: the loops over keys
  // vectorize, each key's dot product summed over d in order)
  std::vector<float> kf(L * hd), kt(hd * L), p(L + 1), o(hd);
  for (int64_t j = 0; j < L; j++) widen_to_float(rows[j], bf, hd, kf.data() + j * hd);
  for (int64_t j = 0; j < L; j++)
    for (int64_t d = 0; d < hd; d++) kt[d * L + j] = kf[j * hd + d];
  for (int64_t h = 0; h < H; h++) {
    std::fill(p.begin(), p.end(), 0.0f);
    for (int64_t d = 0; d < hd; d++) {
      const float qd = load_float(q, h * hd + d, bf);
      const float* kd = kt.data() + d * L;
      for (int64_t j = 0; j < L; j++) p[j] += qd * kd[j];
    }
    float mx = sinks[h];
    for (int64_t j = 0; j < L; j++) {
      p[j] = round_to(p[j], bf) * scale;  // torch: the bf16 matmul's output, then .float() * scale
      mx = std::max(mx, p[j]);
    }
    p[L] = sinks[h];
    float sum = 0.0f;
    for (int64_t j = 0; j <= L; j++) sum += p[j] = std::exp(p[j] - mx);
    for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
    for (int64_t j = 0; j < L; j++) {
      const float pj = round_to(p[j] / sum, bf);  // the probabilities in x's dtype
      for (int64_t d = 0; d < hd; d++) o[d] += pj * kf[j * hd + d];
    }
    for (int64_t d = 0; d < hd; d++) o[d] = round_to(o[d], bf);
    const int64_t first = hd - 2 * half;
    for (int64_t i = 0; i < half; i++) {  // as ds4py_rope_rows
      const float a = o[first + 2 * i], b = o[first + 2 * i + 1];
      const float c = rot[2 * i], s = conj ? -rot[2 * i + 1] : rot[2 * i + 1];
      o[first + 2 * i] = a * c - b * s;
      o[first + 2 * i + 1] = a * s + b * c;
    }
    for (int64_t d = 0; d < hd; d++) {
      if (bf) ((uint16_t*)out)[h * hd + d] = float_to_bf16(o[d]);
      else ((float*)out)[h * hd + d] = o[d];
    }
  }
  return 0;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_attend_one.restype = i32
    lib.ds4py_attend_one.argtypes = [p, i64, i64, p, i64, p, i64, p, i64, p, f32, p, i64, i32, i32, p]


_load = kernels.lazy_library("ds4py_attend", _SOURCE, ["-O3", "-march=native"], declare=_declare)


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
            or q.numel() * (window.shape[0] + C) > MAX_WORK or (q.requires_grad and torch.is_grad_enabled())):
        return None
    H, hd = q.shape
    half = rotation.shape[-1]
    if rotation.numel() != half or 2 * half > hd:
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
    rc = lib.ds4py_attend_one(q.data_ptr(), H, hd, window.data_ptr(), window.shape[0],
                              None if entries is None else entries.data_ptr(),
                              0 if entries is None else entries.shape[0], None if top is None else top.data_ptr(), C,
                              sinks.data_ptr(), scale, rotation.data_ptr(), half, int(conj),
                              int(dtype == torch.bfloat16), out.data_ptr())
    if rc:
        raise ValueError(f"attend_one: entry indices outside [0, {entries.shape[0]})")
    return out
