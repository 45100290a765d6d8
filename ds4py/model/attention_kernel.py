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
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
""" + kernels.BF16_C + r"""
namespace {
inline float round_to(float f, int bf) { return bf ? bf16_to_float(float_to_bf16(f)) : f; }

// a query's share of a prompt's call below this many multiply-adds goes with others to one thread
constexpr int64_t PAR_MIN_WORK = 32768;

struct Scratch {  // one thread's buffers, kept between calls
  std::vector<float> kf, kt, p, o, o2;
  void fit(int64_t L, int64_t hd) {
    if ((int64_t)kf.size() < L * hd) kf.resize(L * hd), kt.resize(L * hd);
    if ((int64_t)p.size() < L + 1) p.resize(L + 1);
    if ((int64_t)o.size() < hd) o.resize(hd), o2.resize(hd);
  }
};

// One query's heads q [H, hd] over the L keys rows[0..L) (each key is also the value), the sink per head:
// out [H, hd] = softmax([q.k * scale for every key], sink) @ keys, its last 2 * half channels rotated by rot
// (conjugated when conj: the inverse rotation). The first W keys are summed apart from the rest and the two sums
// added in q's dtype, as a prompt's torch ops sum the window and the compressed entries (W = L: one sum, as the
// one-token ops' single product). bf: q, keys and out bf16 bits (else float32).
void attend_query(const void* q, int64_t H, int64_t hd, const void* const* rows, int64_t L, int64_t W,
                  const float* sinks, float scale, const float* rot, int64_t half, int conj, int bf, void* out,
                  Scratch& s) {
  s.fit(L, hd);
  float *kf = s.kf.data(), *kt = s.kt.data(), *p = s.p.data(), *o = s.o.data(), *o2 = s.o2.data();
  // the keys as rows [L, hd] (for the weighted sum) and transposed [hd, L] (for the logits: the loops over keys
  // vectorize, each key's dot product summed over d in order)
  for (int64_t j = 0; j < L; j++) widen_to_float(rows[j], bf, hd, kf + j * hd);
  for (int64_t j = 0; j < L; j++)
    for (int64_t d = 0; d < hd; d++) kt[d * L + j] = kf[j * hd + d];
  for (int64_t h = 0; h < H; h++) {
    std::fill(p, p + L + 1, 0.0f);
    for (int64_t d = 0; d < hd; d++) {
      const float qd = load_float(q, h * hd + d, bf);
      const float* kd = kt + d * L;
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
    for (int64_t d = 0; d < hd; d++) o[d] = o2[d] = 0.0f;
    for (int64_t j = 0; j < W; j++) {
      const float pj = round_to(p[j] / sum, bf);  // the probabilities in q's dtype
      for (int64_t d = 0; d < hd; d++) o[d] += pj * kf[j * hd + d];
    }
    for (int64_t j = W; j < L; j++) {
      const float pj = round_to(p[j] / sum, bf);
      for (int64_t d = 0; d < hd; d++) o2[d] += pj * kf[j * hd + d];
    }
    if (W < L)
      for (int64_t d = 0; d < hd; d++) o[d] = round_to(o[d], bf) + round_to(o2[d], bf);
    for (int64_t d = 0; d < hd; d++) o[d] = round_to(o[d], bf);
    const int64_t first = hd - 2 * half;
    for (int64_t i = 0; i < half; i++) {  // as ds4py_rope_rows
      const float a = o[first + 2 * i], b = o[first + 2 * i + 1];
      const float c = rot[2 * i], sn = conj ? -rot[2 * i + 1] : rot[2 * i + 1];
      o[first + 2 * i] = a * c - b * sn;
      o[first + 2 * i + 1] = a * sn + b * c;
    }
    for (int64_t d = 0; d < hd; d++) {
      if (bf) ((uint16_t*)out)[h * hd + d] = float_to_bf16(o[d]);
      else ((float*)out)[h * hd + d] = o[d];
    }
  }
}
}  // namespace

// q [H, hd], the window's keys [S, hd] (contiguous), the compressed entries (rows of hd, contiguous): all C
// of them (idx null) or the C rows idx[0..C); sinks [H] float32; rot [half] (cos, sin) pairs. out [H, hd] as
// attend_query with one sum. Returns 0, or 1 for an index outside [0, n).
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
  thread_local Scratch s;
  attend_query(q, H, hd, rows.data(), L, L, sinks, scale, rot, half, conj, bf, out, s);
  return 0;
}

// R consecutive queries of a prompt q [R, H, hd] (contiguous), keys [S, hd]: the cached window, then the R
// queries' own keys; query r (its key S - R + r) sees the `window` keys ending at its own, then the compressed
// entries [n, hd]: its indexer's top [R, k] (-1: none), or else (visible non-null) the first visible[r] of them,
// or none (entries null); the sink. rot [R, half] pairs. out [R, H, hd] as attend_query with the window summed
// apart. Queries split over the threads. Returns 0, or 1 for a top index >= n.
extern "C" int ds4py_attend_rows(const void* q, int64_t R, int64_t H, int64_t hd, const void* keys, int64_t S,
                                 int64_t window, const void* entries, int64_t n, const int64_t* top, int64_t k,
                                 const int64_t* visible, const float* sinks, float scale, const float* rot,
                                 int64_t half, int conj, int bf, void* out) {
  if (top)
    for (int64_t i = 0; i < R * k; i++)
      if (top[i] >= n) return 1;
  const size_t es = bf ? 2 : 4;
  const int64_t most = window + (top ? k : entries ? n : 0);
  const int64_t grain = std::max<int64_t>(1, PAR_MIN_WORK / std::max<int64_t>(1, H * hd * most));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    thread_local Scratch s;
    std::vector<const void*> rows(most);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t own = S - R + r, oldest = std::max<int64_t>(0, own - window + 1);
      int64_t L = 0;
      for (int64_t j = oldest; j <= own; j++) rows[L++] = (const char*)keys + j * hd * es;
      const int64_t W = L;
      if (top) {
        for (int64_t c = 0; c < k; c++)
          if (top[r * k + c] >= 0) rows[L++] = (const char*)entries + top[r * k + c] * hd * es;
      } else if (entries && visible) {
        for (int64_t c = 0; c < std::min(n, visible[r]); c++) rows[L++] = (const char*)entries + c * hd * es;
      }
      attend_query((const char*)q + r * H * hd * es, H, hd, rows.data(), L, W, sinks, scale, rot + r * 2 * half,
                   half, conj, bf, (char*)out + r * H * hd * es, s);
    }
  });
  return 0;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_attend_one.restype = i32
    lib.ds4py_attend_one.argtypes = [p, i64, i64, p, i64, p, i64, p, i64, p, f32, p, i64, i32, i32, p]
    lib.ds4py_attend_rows.restype = i32
    lib.ds4py_attend_rows.argtypes = [p, i64, i64, i64, p, i64, i64, p, i64, p, i64, p, p, f32, p, i64, i32, i32, p]


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
    if H * hd * (window + C) > MAX_WORK or rotation.numel() != R * half or 2 * half > hd:
        return None
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
    rc = lib.ds4py_attend_rows(q.data_ptr(), R, H, hd, keys.data_ptr(), keys.shape[0], window,
                               None if entries is None else entries.data_ptr(),
                               0 if entries is None else entries.shape[0], None if top is None else top.data_ptr(),
                               0 if top is None else top.shape[1], None if visible is None else visible.data_ptr(),
                               sinks.data_ptr(), scale, rotation.data_ptr(), half, int(conj),
                               int(dtype == torch.bfloat16), out.data_ptr())
    if rc:
        raise ValueError(f"attend_rows: entry indices outside [0, {entries.shape[0]})")
    return out
