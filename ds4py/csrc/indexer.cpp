
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#include "reduce16.h"

#endif
#include "bf16.h"

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

#if defined(__AVX512BF16__)
#include "heads_dot.h"

// score_rows for bf16 queries and keys with vdpbf16ps (`heads_dot_bf16`): qp [hd / 2, 16 G] (each lane a head's
// pair of bf16 values d, d + 1) and the keys' bf16 rows themselves (kstride values apart, not widened). The dots'
// order, d + 1 then d, is the one the other ISAs take for bf16 inputs, so the bits are theirs on normal values.
template <int G>
void score_rows_dp(const uint32_t* qp, const float* wp, const uint16_t* keys, int64_t kstride, int64_t hd,
                   int64_t rows, float scale, float* totals) {
  const __m512 zero = _mm512_setzero_ps(), sc = _mm512_set1_ps(scale);
  heads_dot_bf16<G>(qp, 16 * G, hd / 2, rows, [&](int64_t j) { return keys + j * kstride; },
                    [&](int64_t j, const __m512* acc) {  // as score_rows' finish
                      __m512 sum = zero;
                      for (int g = 0; g < G; g++)
                        sum = _mm512_fmadd_ps(_mm512_loadu_ps(wp + 16 * g),
                                              _mm512_mul_ps(_mm512_max_ps(acc[g], zero), sc), sum);
                      totals[j] = _mm512_reduce_add_ps(sum) + 0.0f;
                    });
}

using ScoreRowsDp = void (*)(const uint32_t*, const float*, const uint16_t*, int64_t, int64_t, int64_t, float,
                             float*);
const ScoreRowsDp SCORE_ROWS_DP[8] = {score_rows_dp<1>, score_rows_dp<2>, score_rows_dp<3>, score_rows_dp<4>,
                                      score_rows_dp<5>, score_rows_dp<6>, score_rows_dp<7>, score_rows_dp<8>};
constexpr bool BF16_DOT = true;
#else
constexpr bool BF16_DOT = false;
#endif
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
    auto seen = [&](int64_t t) { return visible ? visible[t] : n; };
    constexpr int64_t BLOCK = 64;  // entries at a time (widened to float32: 32 KB at hd = 128)
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    // bf16 queries and keys: each dot over the pairs of values, d + 1 then d (vdpbf16ps's order; `swap` puts the
    // float32 code's values in that order)
    const bool pairs = qbf && kbf && hd % 2 == 0, swap = pairs && !BF16_DOT;
#if defined(__AVX512BF16__)
    if (pairs) {
      std::vector<uint32_t> qp(T * (hd / 2) * Hp, 0u);  // per query [hd / 2, Hp], heads zero-padded
      std::vector<float> wp(T * Hp, 0.0f);
      const uint16_t* q16 = (const uint16_t*)q;
      at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (H * hd)), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++)
          for (int64_t h = 0; h < H; h++) {
            wp[t * Hp + h] = w[t * H + h];
            for (int64_t p = 0; p < hd / 2; p++)
              std::memcpy(&qp[(t * (hd / 2) + p) * Hp + h], q16 + (t * H + h) * hd + 2 * p, 4);
          }
      });
      at::parallel_for(0, T * nb, 4, [&](int64_t u0, int64_t u1) {  // units: (query, block of entries)
        for (int64_t u = u0; u < u1; u++) {
          const int64_t t = u / nb, j0 = u % nb * BLOCK, rows = std::min(BLOCK, seen(t) - j0);
          if (rows > 0)
            SCORE_ROWS_DP[G - 1](qp.data() + t * (hd / 2) * Hp, wp.data() + t * Hp,
                                 (const uint16_t*)keys + j0 * kstride, kstride, hd, rows, scale, totals + t * n + j0);
        }
      });
    } else
#endif
    {
    // per query: q transposed [hd, Hp] and w [Hp], heads zero-padded
    std::vector<float> qt(T * hd * Hp, 0.0f), wp(T * Hp, 0.0f);
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (H * hd)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++)
        for (int64_t h = 0; h < H; h++) {
          wp[t * Hp + h] = w[t * H + h];
          for (int64_t d = 0; d < hd; d++)
            qt[(t * hd + (swap ? d ^ 1 : d)) * Hp + h] = load_float(q, (t * H + h) * hd + d, qbf);
        }
    });
    auto widen = [&](int64_t j, float* dst) {  // key j as float32, its pairs swapped where `swap`
      widen_to_float((const char*)keys + j * kstride * (kbf ? 2 : 4), kbf, hd, dst);
      if (swap)
        for (int64_t d = 0; d < hd; d += 2) std::swap(dst[d], dst[d + 1]);
    };
    // a prompt's queries over few entries (at most 2^20 values): the entries widened once for all of them, not
    // once per query and block (the same floats either way)
    std::vector<float> all(T > 1 && n * hd <= (1 << 20) ? n * hd : 0);
    if (!all.empty())
      at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; j++) widen(j, all.data() + j * hd);
      });
    at::parallel_for(0, T * nb, 4, [&](int64_t u0, int64_t u1) {  // units: (query, block of entries)
      std::vector<float> kf(all.empty() ? BLOCK * hd : 0);
      for (int64_t u = u0; u < u1; u++) {
        const int64_t t = u / nb, j0 = u % nb * BLOCK, rows = std::min(BLOCK, seen(t) - j0);
        if (rows <= 0) continue;
        const float* rows_f = all.empty() ? kf.data() : all.data() + j0 * hd;
        if (all.empty())
          for (int64_t r = 0; r < rows; r++) widen(j0 + r, kf.data() + r * hd);
        SCORE_ROWS[G - 1](qt.data() + t * hd * Hp, wp.data() + t * Hp, rows_f, hd, rows, scale,
                          totals + t * n + j0);
      }
    });
    }
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> order;
      for (int64_t t = t0; t < t1; t++) {
        const int64_t v = seen(t), kk = std::min(k, v);
        const float* tot = totals + t * n;
        // stable_topk's keys: the score's float order in the high 32 bits, the reversed position in the low ones,
        // so larger is better and ties go to the lower index (the totals are + 0.0: no -0.0)
        order.resize(v);
        for (int64_t j = 0; j < v; j++) {
          int32_t bits;
          std::memcpy(&bits, tot + j, 4);
          order[j] = (int64_t)(bits < 0 ? bits ^ 0x7FFFFFFF : bits) * (int64_t(1) << 32) + (0xFFFFFFFFll - j);
        }
        const auto better = std::greater<int64_t>();
        if (v > 16 * kk) {  // few of many: a heap of k rejects most entries in one comparison
          std::partial_sort(order.begin(), order.begin() + kk, order.end(), better);
        } else {
          if (kk < v) std::nth_element(order.begin(), order.begin() + kk, order.end(), better);
          std::sort(order.begin(), order.begin() + kk, better);
        }
        for (int64_t i = 0; i < kk; i++) order[i] = 0xFFFFFFFFll - (order[i] & 0xFFFFFFFFll);
        for (int64_t i = 0; i < k; i++) top[t * k + i] = i < kk ? order[i] : -1;
      }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}
