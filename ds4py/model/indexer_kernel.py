"""The lightning indexer's step for one token (decoding) in one compiled call: every compressed entry's score
`sum_h w[h] * relu(q_h . k) / sqrt(head_dim)` and the top k of them. In torch these are ~20 ops (a matmul, the
relu, the head sum, the int64 keys of `indexer.stable_topk`, a top-k): ~35 us of dispatch per layer and token
on the tiny model, where the arithmetic takes ~1 us.

Each score is summed in float32 in a fixed order (the heads 16 at a time over head_dim, then across them),
whatever the number of entries, so it can differ from torch's matmul in the last bits; the top k are chosen as
`stable_topk` chooses (largest first, ties to the earlier entry; -0.0 equals 0.0). Compiled at first use like
`ds4py.formats.kernels`; `index_rows` returns None where it does not apply (not the CPU, other dtypes, more than
MAX_HEADS heads, autograd, no compiler) and the caller runs torch's ops."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels

MAX_HEADS = 128  # the AVX-512 code keeps one accumulator per 16 heads in registers

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
""" + kernels.REDUCE16_C + r"""
#endif
""" + kernels.BF16_C + r"""
namespace {
// totals of entries [j0, j1) (keys kf: their rows widened to float32, hd apart) from qt [hd, 16 G] and wp [16 G]
template <int G>
void score_rows(const float* qt, const float* wp, const float* kf, int64_t hd, int64_t rows, float scale,
                float* totals) {
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps(), sc = _mm512_set1_ps(scale);
  auto finish = [&](const __m512* acc) {  // sum_h w[h] * (max(dot_h, 0) * scale), in this order
    __m512 sum = zero;
    for (int g = 0; g < G; g++)
      sum = _mm512_fmadd_ps(_mm512_loadu_ps(wp + 16 * g), _mm512_mul_ps(_mm512_max_ps(acc[g], zero), sc), sum);
    return _mm512_reduce_add_ps(sum) + 0.0f;  // + 0.0: -0.0 becomes 0.0, as stable_topk's keys
  };
  int64_t j = 0;
  for (; j + 2 <= rows; j += 2) {  // two entries at a time: 2 G independent sums, each q load used twice
    __m512 a[G], b[G];
    for (int g = 0; g < G; g++) a[g] = b[g] = zero;
    const float* k0 = kf + j * hd;
    const float* k1 = k0 + hd;
    for (int64_t d = 0; d < hd; d++) {
      const __m512 v0 = _mm512_set1_ps(k0[d]), v1 = _mm512_set1_ps(k1[d]);
      for (int g = 0; g < G; g++) {
        const __m512 qv = _mm512_loadu_ps(qt + d * 16 * G + 16 * g);
        a[g] = _mm512_fmadd_ps(qv, v0, a[g]);
        b[g] = _mm512_fmadd_ps(qv, v1, b[g]);
      }
    }
    totals[j] = finish(a);
    totals[j + 1] = finish(b);
  }
  for (; j < rows; j++) {
    __m512 a[G];
    for (int g = 0; g < G; g++) a[g] = zero;
    for (int64_t d = 0; d < hd; d++) {
      const __m512 v0 = _mm512_set1_ps(kf[j * hd + d]);
      for (int g = 0; g < G; g++) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qt + d * 16 * G + 16 * g), v0, a[g]);
    }
    totals[j] = finish(a);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // the AVX512 code's operations with each 16-head vector in two halves, and its final sum: its bits
  const __m256 zero = _mm256_setzero_ps(), sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < rows; j++) {
    __m256 a[G][2];
    for (int g = 0; g < G; g++) a[g][0] = a[g][1] = zero;
    for (int64_t d = 0; d < hd; d++) {
      const __m256 v0 = _mm256_set1_ps(kf[j * hd + d]);
      for (int g = 0; g < G; g++)
        for (int h = 0; h < 2; h++)
          a[g][h] = _mm256_fmadd_ps(_mm256_loadu_ps(qt + d * 16 * G + 16 * g + 8 * h), v0, a[g][h]);
    }
    __m256 sum[2] = {zero, zero};
    for (int g = 0; g < G; g++)
      for (int h = 0; h < 2; h++)
        sum[h] = _mm256_fmadd_ps(_mm256_loadu_ps(wp + 16 * g + 8 * h), _mm256_mul_ps(_mm256_max_ps(a[g][h], zero), sc),
                                 sum[h]);
    totals[j] = reduce16(sum[0], sum[1]) + 0.0f;
  }
#else
  for (int64_t j = 0; j < rows; j++) {  // the same operations, lane by lane
    float lanes[16] = {};
    for (int64_t h = 0; h < 16 * G; h++) {
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; d++) dot = std::fma(qt[d * 16 * G + h], kf[j * hd + d], dot);
      lanes[h % 16] = std::fma(wp[h], std::max(dot, 0.0f) * scale, lanes[h % 16]);
    }
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += lanes[l];
    totals[j] = s + 0.0f;
  }
#endif
}

using ScoreRows = void (*)(const float*, const float*, const float*, int64_t, int64_t, float, float*);
const ScoreRows SCORE_ROWS[8] = {score_rows<1>, score_rows<2>, score_rows<3>, score_rows<4>,
                                 score_rows<5>, score_rows<6>, score_rows<7>, score_rows<8>};
}  // namespace

// T queries q [T, H, hd] (float32 or bf16 bits) with head weights w [T, H] float32 over the compressed keys: n
// rows of hd values kstride apart (float32 or bf16 bits), query t seeing entries [0, visible[t]) (all n when
// visible is null) -> totals [T, n]: totals[t, j] = sum_h w[t, h] * (max(q_th . k_j, 0) * scale) for the
// visible j (the rest not written), and top [T, k]: the indices of each query's k largest visible totals,
// largest first, ties to the lower index, then -1 where it sees fewer than k. H <= 128. Returns 0, 1 for bad
// sizes, 2 out of memory.
extern "C" int ds4py_index_rows(const void* q, int qbf, int64_t T, int64_t H, int64_t hd, const float* w,
                                const void* keys, int kbf, int64_t n, int64_t kstride, const int64_t* visible,
                                float scale, int64_t k, float* totals, int64_t* top) {
  if (H < 1 || H > 128 || hd < 1 || k < 0 || k > n) return 1;
  if (visible)
    for (int64_t t = 0; t < T; t++)
      if (visible[t] < 0 || visible[t] > n) return 1;
  try {
    const int64_t G = (H + 15) / 16, Hp = G * 16;
    // per query: q transposed [hd, Hp] and w [Hp], heads zero-padded
    std::vector<float> qt(T * hd * Hp, 0.0f), wp(T * Hp, 0.0f);
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (H * hd)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++)
        for (int64_t h = 0; h < H; h++) {
          wp[t * Hp + h] = w[t * H + h];
          for (int64_t d = 0; d < hd; d++) qt[(t * hd + d) * Hp + h] = load_float(q, (t * H + h) * hd + d, qbf);
        }
    });
    constexpr int64_t BLOCK = 64;  // entries widened to float32 at a time (32 KB at hd = 128)
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    auto seen = [&](int64_t t) { return visible ? visible[t] : n; };
    // a prompt's queries over few entries (at most 2^20 values): the entries widened once for all of them, not
    // once per query and block (the same floats either way)
    std::vector<float> all(T > 1 && n * hd <= (1 << 20) ? n * hd : 0);
    if (!all.empty())
      at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; j++)
          widen_to_float((const char*)keys + j * kstride * (kbf ? 2 : 4), kbf, hd, all.data() + j * hd);
      });
    at::parallel_for(0, T * nb, 4, [&](int64_t u0, int64_t u1) {  // units: (query, block of entries)
      std::vector<float> kf(all.empty() ? BLOCK * hd : 0);
      for (int64_t u = u0; u < u1; u++) {
        const int64_t t = u / nb, j0 = u % nb * BLOCK, rows = std::min(BLOCK, seen(t) - j0);
        if (rows <= 0) continue;
        const float* rows_f = all.empty() ? kf.data() : all.data() + j0 * hd;
        if (all.empty())
          for (int64_t r = 0; r < rows; r++)
            widen_to_float((const char*)keys + (j0 + r) * kstride * (kbf ? 2 : 4), kbf, hd, kf.data() + r * hd);
        SCORE_ROWS[G - 1](qt.data() + t * hd * Hp, wp.data() + t * Hp, rows_f, hd, rows, scale,
                          totals + t * n + j0);
      }
    });
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> order;
      for (int64_t t = t0; t < t1; t++) {
        const int64_t v = seen(t), kk = std::min(k, v);
        const float* tot = totals + t * n;
        order.resize(v);
        for (int64_t j = 0; j < v; j++) order[j] = j;
        std::partial_sort(order.begin(), order.begin() + kk, order.end(), [&](int64_t a, int64_t b) {
          return tot[a] > tot[b] || (tot[a] == tot[b] && a < b);
        });
        for (int64_t i = 0; i < k; i++) top[t * k + i] = i < kk ? order[i] : -1;
      }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_index_rows.restype = i32
    lib.ds4py_index_rows.argtypes = [p, i32, i64, i64, i64, p, p, i32, i64, i64, p, f32, i64, p, p]


_load = kernels.lazy_library("ds4py_index", _SOURCE, ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"],
                             declare=_declare)


def index_rows(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None, scale: float,
               k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """T queries q [T, H, hd] (rotated) with head weights w [T, H] float32 over the compressed keys [n, hd], query
    t seeing entries [0, visible[t]) (None: all) -> (top [T, k] int64: each query's k best visible entries as
    `stable_topk` orders them, then -1 where it sees fewer than k; totals [T, n] float32, the visible entries'
    scores, the rest undefined), or None where the call does not apply."""
    if (not (q.is_cpu and w.is_cpu and keys.is_cpu) or q.dim() != 3 or keys.dim() != 2 or q.shape[2] != keys.shape[1]
            or q.dtype not in (torch.float32, torch.bfloat16) or keys.dtype not in (torch.float32, torch.bfloat16)
            or w.dtype != torch.float32 or tuple(w.shape) != tuple(q.shape[:2]) or q.shape[1] > MAX_HEADS
            or not 0 <= k <= keys.shape[0] or (q.requires_grad and torch.is_grad_enabled())):
        return None
    T, n = q.shape[0], keys.shape[0]
    if visible is not None and (visible.numel() != T or not visible.is_cpu):
        return None
    lib = _load()
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
