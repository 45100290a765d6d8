
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
#if defined(__AVX2__) && defined(__FMA__) && !defined(DS4PY_GENERIC)
#include <immintrin.h>
#define DS4PY_AVX2 1
#else
#define DS4PY_AVX2 0
#endif
#include "bf16.h"

namespace {
#include "swiglu.h"

#if DS4PY_AVX512 && defined(__AVX512BF16__)
constexpr int TR = 6;   // activation rows per tile
#else
constexpr int TR = 8;   // (AVX2: two passes of 4 rows, where 6 ran as 4 + 2 rows, the 2 at half the FMA rate)
#endif
constexpr int NV = 4;   // 16-column vectors per pass

// the tile's results: bf16 bits (BF) or float32, rows ys apart
template <bool BF>
inline void store16(void* y, int64_t i, const float* f, int64_t m) {
  for (int64_t j = 0; j < m; j++) {
    if (BF) ((uint16_t*)y)[i + j] = float_to_bf16(f[j]);
    else ((float*)y)[i + j] = f[j];
  }
}

#if DS4PY_AVX512 && defined(__AVX512BF16__)
#define DS4PY_DPBF16 1
// rows [0, R) of the tile times the columns [c0, c0 + 16 * V): xp the tile's bf16 pairs [R, kh] (32-bit words),
// wp W's pairs [kh, np] (word (p, c) = W[c, 2p], W[c, 2p + 1]); vdpbf16ps adds the odd product, then the even
template <int R, int V, bool BF>
inline void tile(const uint32_t* xp, int64_t kh, const uint32_t* wp, int64_t np, int64_t c0, void* y, int64_t ys,
                 int64_t n) {
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
      const int64_t m = std::min<int64_t>(16, n - c);
      if (BF) {
        const __m256i b = (__m256i)_mm512_cvtneps_pbh(acc[r][v]);
        _mm256_mask_storeu_epi16((uint16_t*)y + r * ys + c, (__mmask16)((1u << m) - 1), b);
      } else {
        _mm512_mask_storeu_ps((float*)y + r * ys + c, (__mmask16)((1u << m) - 1), acc[r][v]);
      }
    }
}

template <int R, bool BF>
void row_tile(const uint32_t* xp, int64_t kh, const uint32_t* wp, int64_t np, void* y, int64_t ys, int64_t n) {
  for (int64_t c0 = 0; c0 < np; c0 += 16 * NV) {  // up to NV vectors per pass: each broadcast serves them all
    switch (std::min<int64_t>(NV, (np - c0) / 16)) {
      case 1: tile<R, 1, BF>(xp, kh, wp, np, c0, y, ys, n); break;
      case 2: tile<R, 2, BF>(xp, kh, wp, np, c0, y, ys, n); break;
      case 3: tile<R, 3, BF>(xp, kh, wp, np, c0, y, ys, n); break;
      default: tile<R, NV, BF>(xp, kh, wp, np, c0, y, ys, n);
    }
  }
}

using RowTile = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, void*, int64_t, int64_t);
const RowTile ROW_TILES[2][TR] = {
    {row_tile<1, false>, row_tile<2, false>, row_tile<3, false>, row_tile<4, false>, row_tile<5, false>,
     row_tile<6, false>},
    {row_tile<1, true>, row_tile<2, true>, row_tile<3, true>, row_tile<4, true>, row_tile<5, true>,
     row_tile<6, true>}};
#else
#define DS4PY_DPBF16 0
#endif

#if !DS4PY_DPBF16 && DS4PY_AVX2
// Without vdpbf16ps (AVX2, or AVX-512 without BF16): the portable loop's operations 8 columns at a time. Rows
// [0, R) of a tile times the columns [c0, c0 + 16): xo, xe the tile's odd and even inputs as float32 [R, kh], wp
// W's pairs [kh, np]; per value fma(odd x, odd w), then fma(even x, even w), as tile_rows' loop (the same bits).
// 4 rows x 16 columns: 8 accumulators, 4 weight vectors and 2 broadcasts in the 16 registers.
constexpr int AR = 4;  // rows per pass

template <int R, bool BF>
inline void tile8(const float* xo, const float* xe, int64_t kh, const uint32_t* wp, int64_t np, int64_t c0, void* y,
                  int64_t ys, int64_t n) {
  const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kh; i++) {
    __m256 we[2], wo[2];
    for (int v = 0; v < 2; v++) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(wp + i * np + c0 + 8 * v));
      we[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      wo[v] = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
    }
    for (int r = 0; r < R; r++) {
      const __m256 o = _mm256_broadcast_ss(xo + r * kh + i), e = _mm256_broadcast_ss(xe + r * kh + i);
      for (int v = 0; v < 2; v++) {
        acc[r][v] = _mm256_fmadd_ps(o, wo[v], acc[r][v]);
        acc[r][v] = _mm256_fmadd_ps(e, we[v], acc[r][v]);
      }
    }
  }
  // constant trip counts: with a data-dependent exit GCC keeps acc in memory, stored on every step of the loop
  // above (a 256 x 256 product at T = 256 28 against 52 GF/s on one thread)
  alignas(32) float f[R][16];
  for (int r = 0; r < R; r++) {
    _mm256_store_ps(f[r], acc[r][0]);
    _mm256_store_ps(f[r] + 8, acc[r][1]);
  }
  const int64_t m = std::min<int64_t>(16, n - c0);
  for (int r = 0; r < R; r++) store16<BF>(y, r * ys + c0, f[r], m);
}

template <bool BF>
void tile_rows_avx2(const uint32_t* xp, int tr, int64_t kh, const uint32_t* wp, int64_t n, int64_t np, void* y,
                    int64_t ys) {
  thread_local std::vector<float> split;  // the tile's odd inputs [tr, kh], then its even ones
  split.resize(2 * TR * kh);
  float *xo = split.data(), *xe = xo + TR * kh;
  for (int64_t j = 0; j < tr * kh; j++) {
    const uint32_t odd = xp[j] & 0xFFFF0000u, even = xp[j] << 16;
    std::memcpy(xo + j, &odd, 4);
    std::memcpy(xe + j, &even, 4);
  }
  for (int r0 = 0; r0 < tr; r0 += AR) {
    void* yr = BF ? (void*)((uint16_t*)y + r0 * ys) : (void*)((float*)y + r0 * ys);
    const float *o = xo + r0 * kh, *e = xe + r0 * kh;
    for (int64_t c0 = 0; c0 < np; c0 += 16) {
      switch (std::min(AR, tr - r0)) {
        case 1: tile8<1, BF>(o, e, kh, wp, np, c0, yr, ys, n); break;
        case 2: tile8<2, BF>(o, e, kh, wp, np, c0, yr, ys, n); break;
        case 3: tile8<3, BF>(o, e, kh, wp, np, c0, yr, ys, n); break;
        default: tile8<AR, BF>(o, e, kh, wp, np, c0, yr, ys, n);
      }
    }
  }
}
#endif

// tr <= TR rows of y [tr, n] (row stride ys; bf16 bits when BF, else float32) = the tile xp (bf16 pairs [tr, kh])
// times W (pairs wp [kh, np]): per value float32 fused multiply-adds over the pairs, odd product then even
template <bool BF>
void tile_rows(const uint32_t* xp, int tr, int64_t kh, const uint32_t* wp, int64_t n, int64_t np, void* y,
               int64_t ys) {
#if DS4PY_DPBF16
  ROW_TILES[BF][tr - 1](xp, kh, wp, np, y, ys, n);
#elif DS4PY_AVX2
  tile_rows_avx2<BF>(xp, tr, kh, wp, n, np, y, ys);
#else
  for (int r = 0; r < tr; r++)
    for (int64_t c = 0; c < n; c++) {
      float s = 0.0f;
      for (int64_t p = 0; p < kh; p++) {
        const uint32_t xw = xp[r * kh + p], ww = wp[p * np + c];
        s = std::fma(bf16_to_float(xw >> 16), bf16_to_float(ww >> 16), s);
        s = std::fma(bf16_to_float(xw & 0xFFFF), bf16_to_float(ww & 0xFFFF), s);
      }
      store16<BF>(y, r * ys + c, &s, 1);
    }
#endif
}
}  // namespace

extern "C" int ds4py_small_gemm_dpbf16() { return DS4PY_DPBF16; }
extern "C" int ds4py_small_gemm_simd() { return DS4PY_DPBF16 ? 2 : DS4PY_AVX2 ? 1 : 0; }

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
      tile_rows<true>((const uint32_t*)xt.data(), tr, kh, wp, n, np, y + t0 * n, n);
    }
  });
}

// A prompt's mixture of experts with small bf16 matrices, in one call. x bf16 bits [T, n]; ids, w [T, k]: each
// token's routed experts (of E) and weights; then S shared experts on every token with weight 1. Expert e (routed
// 0..E-1, then shared E..E+S-1) has W1, W3 [inter[e], n] and W2 [n, inter[e]] as packed pairs at mats[3e..3e+2]
// (see ds4py_small_gemm; inter[e] even). Per (token, expert) pair: h = swiglu(W1 x, W3 x) in float32 (the products
// as ds4py_small_gemm sums them), rounded to bf16, then W2 h in float32; out [T, n] bf16 = per token the sum of its
// pairs' w * W2 h in pair order (routed by ascending expert id, then shared), rounded once. Every pair's values are
// the same whatever the other tokens are. Returns 0, 1 for bad ids or sizes, 2 out of memory.
extern "C" int ds4py_moe_small(const uint16_t* x, int64_t T, int64_t n, int64_t E, int64_t k, const int64_t* ids,
                               const float* w, int64_t S, const int64_t* mats, const int64_t* inter, float limit,
                               uint16_t* out) {
  const int64_t P = T * k, X = E + S;
  for (int64_t i = 0; i < P; i++)
    if (ids[i] < 0 || ids[i] >= E) return 1;
  for (int64_t e = 0; e < X; e++)
    if (inter[e] < 2 || inter[e] % 2) return 1;
  try {
    std::vector<int64_t> start(X + 1, 0);  // expert e's pairs: [start[e], start[e + 1])
    for (int64_t i = 0; i < P; i++) start[ids[i] + 1]++;
    for (int64_t s = 0; s < S; s++) start[E + s + 1] = T;
    for (int64_t e = 0; e < X; e++) start[e + 1] += start[e];
    const int64_t Q = start[X];
    std::vector<int64_t> tok(Q), next(start.begin(), start.end() - 1);
    std::vector<float> wts(Q, 1.0f);
    for (int64_t i = 0; i < P; i++) {  // tokens ascending within an expert (a stable sort of the flattened ids)
      const int64_t j = next[ids[i]]++;
      tok[j] = i / k;
      wts[j] = w[i];
    }
    for (int64_t s = 0; s < S; s++)
      for (int64_t t = 0; t < T; t++) tok[start[E + s] + t] = t;
    std::vector<int64_t> ustart(X + 1, 0);  // units: tiles of TR pairs of one expert
    for (int64_t e = 0; e < X; e++) ustart[e + 1] = ustart[e] + (start[e + 1] - start[e] + TR - 1) / TR;
    const int64_t nh = (n + 1) / 2, np = (n + 15) / 16 * 16;
    int64_t imax = 0;
    for (int64_t e = 0; e < X; e++) imax = std::max(imax, inter[e]);
    const int64_t ip = (imax + 15) / 16 * 16;
    std::vector<float> y(Q * n);  // each pair's W2 h
    at::parallel_for(0, ustart[X], 1, [&](int64_t u0, int64_t u1) {
      std::vector<uint16_t> xt(TR * 2 * nh, 0), ht(TR * imax, 0);
      std::vector<float> h(TR * ip), up(TR * ip);
      int64_t e = 0;
      for (int64_t u = u0; u < u1; u++) {
        while (ustart[e + 1] <= u) e++;
        const int64_t p0 = start[e] + (u - ustart[e]) * TR, I = inter[e], ipe = (I + 15) / 16 * 16;
        const int tr = (int)std::min<int64_t>(TR, start[e + 1] - p0);
        for (int r = 0; r < tr; r++) std::memcpy(xt.data() + r * 2 * nh, x + tok[p0 + r] * n, n * 2);
        const uint32_t* xp = (const uint32_t*)xt.data();
        tile_rows<false>(xp, tr, nh, (const uint32_t*)mats[3 * e], I, ipe, h.data(), I);
        tile_rows<false>(xp, tr, nh, (const uint32_t*)mats[3 * e + 1], I, ipe, up.data(), I);
        swiglu_rows(h.data(), up.data(), tr * I, limit);
        for (int64_t i = 0; i < tr * I; i++) ht[i] = float_to_bf16(h[i]);
        tile_rows<false>((const uint32_t*)ht.data(), tr, I / 2, (const uint32_t*)mats[3 * e + 2], n, np,
                         y.data() + p0 * n, n);
      }
    });
    // every token's pairs in pair order, split over the threads by column
    at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t c0, int64_t c1) {
      const int64_t d0 = c0 * 16, d1 = std::min(n, c1 * 16);
      std::vector<float> acc(T * (d1 - d0), 0.0f);
      for (int64_t q = 0; q < Q; q++) {
        float* o = acc.data() + tok[q] * (d1 - d0);
        const float* yq = y.data() + q * n;
        for (int64_t d = d0; d < d1; d++) o[d - d0] += wts[q] * yq[d];
      }
      for (int64_t t = 0; t < T; t++)
        for (int64_t d = d0; d < d1; d++) out[t * n + d] = float_to_bf16(acc[t * (d1 - d0) + d - d0]);
    });
  } catch (...) {
    return 2;
  }
  return 0;
}
