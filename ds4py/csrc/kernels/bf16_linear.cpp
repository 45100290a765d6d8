namespace {
// bf16 weights times float32 activations. Each weight value is widened exactly (bf16 bits << 16) and
// multiplied into float32 accumulators (per weight row and activation row): a row's result is always the same
// sequence of operations, whatever else is computed alongside it (row-invariant).
constexpr int BF_R = 4;  // weight rows per call of the dot table
constexpr int BF_T = 4;  // activation rows sharing each weight load

#if DS4PY_AVX512
// 32 bf16 weights as two float vectors: the even-indexed values (low halves of each 32-bit lane, shifted up)
// and the odd-indexed ones (high halves, masked): one cheap op each. The activations are stored in the
// same order (per 32 values: the 16 even ones, then the 16 odd ones), so the products are unchanged.
// Each (weight row, activation row) sums into two accumulators taking turns over the steps of 32 values (what
// is left after the last full pair of steps, and a zero-padded partial step, goes into the first), whatever G
// rows are read side by side: G = 1 for one activation row (each thread reads one stream, 4 KB prefetched
// ahead: the 129280 x 4096 head 29.0 -> 26.2 ms against 4 rows side by side), 4 for two (each activation load
// serves four rows; more activation rows go two at a time over the same rows, then in L1/L2).
template <int G, int TT>
void bf16_rows(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
               int64_t ystride) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  constexpr int64_t PF = G == 1 ? 2048 : 512;  // prefetch distance in values: 4 KB in one stream, 1 KB in each of 4
  __m512 acc[2][G][TT];
  for (int u = 0; u < 2; u++)
    for (int g = 0; g < G; g++)
      for (int t = 0; t < TT; t++) acc[u][g][t] = _mm512_setzero_ps();
  // 32 weights of each row g (at rows + g * rstride) times activations [i, i + 32) into acc[u]
  auto step = [&](const uint16_t* rows, int64_t rstride, int64_t i, int u) {
    __m512 xe[TT], xo[TT];
    for (int t = 0; t < TT; t++) {
      xe[t] = _mm512_loadu_ps(x + t * kp + i);
      xo[t] = _mm512_loadu_ps(x + t * kp + i + 16);
    }
    for (int g = 0; g < G; g++) {
      const __m512i v = _mm512_loadu_si512((const void*)(rows + g * rstride));
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      for (int t = 0; t < TT; t++) {
        acc[u][g][t] = _mm512_fmadd_ps(we, xe[t], acc[u][g][t]);
        acc[u][g][t] = _mm512_fmadd_ps(wo, xo[t], acc[u][g][t]);
      }
    }
  };
  for (int64_t i = 0; i < k64; i += 64) {
    for (int g = 0; g < G; g++) {
      _mm_prefetch((const char*)(w + g * wstride + i + PF), _MM_HINT_T0);
      _mm_prefetch((const char*)(w + g * wstride + i + PF + 32), _MM_HINT_T0);
    }
    step(w + i, wstride, i, 0);
    step(w + i + 32, wstride, i + 32, 1);
  }
  if (k64 < kf) step(w + k64, wstride, k64, 0);
  if (kf < kp) {  // the last partial 32: weights through zero-padded copies
    uint16_t pad[G][32] = {};
    for (int g = 0; g < G; g++) std::memcpy(pad[g], w + g * wstride + kf, (k - kf) * 2);
    step(&pad[0][0], 32, kf, 0);
  }
  for (int g = 0; g < G; g++)
    for (int t = 0; t < TT; t++) y[t * ystride + g] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][g][t], acc[1][g][t]));
}

// 16 rows (w + r * wstride) times one activation row -> y[0..16): for each row bf16_rows<1, 1>'s operations (the
// same bits), but the 16 final sums reduced side by side: reduce_add_ps's tree (lanes i + i+8, then i + i+4,
// i + i+2, i + i+1) as whole-vector adds across rows. For short rows the reduction was most of a row's work:
// the tiny model's 129280 x 64 head took 5.5x a plain read of its bytes.
void bf16_rows16(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  __m512 s[16];
  for (int r = 0; r < 16; r++) {
    const uint16_t* row = w + r * wstride;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    auto step = [&](const uint16_t* p, int64_t i, __m512& acc) {
      const __m512i v = _mm512_loadu_si512((const void*)p);
      acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(x + i), acc);
      acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), _mm512_loadu_ps(x + i + 16), acc);
    };
    for (int64_t i = 0; i < k64; i += 64) {
      _mm_prefetch((const char*)(row + i + 2048), _MM_HINT_T0);
      _mm_prefetch((const char*)(row + i + 2048 + 32), _MM_HINT_T0);
      step(row + i, i, acc0);
      step(row + i + 32, i + 32, acc1);
    }
    if (k64 < kf) step(row + k64, k64, acc0);
    if (kf < kp) {
      uint16_t pad[32] = {};
      std::memcpy(pad, row + kf, (k - kf) * 2);
      step(pad, kf, acc0);
    }
    s[r] = _mm512_add_ps(acc0, acc1);
  }
  __m512 p[8], q[4], t[2];
  for (int j = 0; j < 8; j++)  // rows 2j, 2j + 1: lanes i + i+8 in lanes [0, 8) and [8, 16)
    p[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0xEE),
                         _mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0x44));
  for (int m = 0; m < 4; m++)  // rows 4m + g in 128-bit block g: i + i+4
    q[m] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * m], p[2 * m + 1], 0xDD),
                         _mm512_shuffle_f32x4(p[2 * m], p[2 * m + 1], 0x88));
  for (int n = 0; n < 2; n++)  // block g: rows 8n + g, 8n + 4 + g, two lanes each: i + i+2
    t[n] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * n], q[2 * n + 1], 0xEE),
                         _mm512_shuffle_ps(q[2 * n], q[2 * n + 1], 0x44));
  // block g: rows g, 4 + g, 8 + g, 12 + g: i + i+1
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0xDD), _mm512_shuffle_ps(t[0], t[1], 0x88));
  const __m512i lane_of_row = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(y, _mm512_permutexvar_ps(lane_of_row, sums));
}

template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  if constexpr (TT == 1) {
    for (int r = 0; r < R; r++) bf16_rows<1, 1>(w + r * wstride, wstride, k, x, kp, y + r, ystride);
  } else if constexpr (TT == 2) {
    if constexpr (R == 4) {
      bf16_rows<4, 2>(w, wstride, k, x, kp, y, ystride);
    } else {
      for (int r = 0; r < R; r++) bf16_rows<1, 2>(w + r * wstride, wstride, k, x, kp, y + r, ystride);
    }
  } else {  // two activation rows at a time (more accumulators than registers otherwise)
    bf16_dot<R, 2>(w, wstride, k, x, kp, y, ystride);
    bf16_dot<R, TT - 2>(w, wstride, k, x + 2 * kp, kp, y + 2 * ystride, ystride);
  }
}
#elif DS4PY_AVX2
// The AVX512 bf16_rows<1, TT> with each 16-lane accumulator in two halves: 32 weights as 16 bf16 (lanes 0-7 of
// the even / odd vectors) and 16 more (lanes 8-15), the activations in the AVX512 order (per 32: 16 even, 16 odd),
// the same fused multiply-adds per lane: one weight row (a row's operations do not depend on the rows beside it)
// times TT activation rows -> each one's two accumulators added, lanes 0-7 in lo[t] and 8-15 in hi[t].
template <int TT>
inline void bf16_row_lanes(const uint16_t* w, int64_t k, const float* x, int64_t kp, __m256* lo, __m256* hi) {
  const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  __m256 acc[2][TT][2];
  for (int u = 0; u < 2; u++)
    for (int t = 0; t < TT; t++) acc[u][t][0] = acc[u][t][1] = _mm256_setzero_ps();
  auto step = [&](const uint16_t* p, int64_t i, int u) {
    for (int h = 0; h < 2; h++) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * h));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      for (int t = 0; t < TT; t++) {
        acc[u][t][h] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + t * kp + i + 8 * h), acc[u][t][h]);
        acc[u][t][h] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + t * kp + i + 16 + 8 * h), acc[u][t][h]);
      }
    }
  };
  for (int64_t i = 0; i < k64; i += 64) {
    _mm_prefetch((const char*)(w + i + 2048), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + i + 2048 + 32), _MM_HINT_T0);
    step(w + i, i, 0);
    step(w + i + 32, i + 32, 1);
  }
  if (k64 < kf) step(w + k64, k64, 0);
  if (kf < kp) {  // the last partial 32: weights through a zero-padded copy
    uint16_t pad[32] = {};
    std::memcpy(pad, w + kf, (k - kf) * 2);
    step(pad, kf, 0);
  }
  for (int t = 0; t < TT; t++) {
    lo[t] = _mm256_add_ps(acc[0][t][0], acc[1][t][0]);
    hi[t] = _mm256_add_ps(acc[0][t][1], acc[1][t][1]);
  }
}

// bf16_row_lanes summed as the AVX512 code sums its lanes: its bits
template <int TT>
void bf16_row(const uint16_t* w, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  __m256 lo[TT], hi[TT];
  bf16_row_lanes<TT>(w, k, x, kp, lo, hi);
  for (int t = 0; t < TT; t++) y[t * ystride] = reduce16(lo[t], hi[t]);
}

// 8 rows (w + r * wstride) times one activation row -> y[0..8): for each row bf16_row<1>'s operations (the same
// bits), but the 8 final sums reduced side by side, each step of reduce16's tree one add across 2-8 rows (the
// reduction was most of a short row's work, as for the AVX512 bf16_rows16).
void bf16_rows8(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y) {
  __m256 t3[8];
  for (int r = 0; r < 8; r++) {
    __m256 lo, hi;
    bf16_row_lanes<1>(w + r * wstride, k, x, kp, &lo, &hi);
    t3[r] = _mm256_add_ps(hi, lo);  // reduce16's first step: lanes i + i+8
  }
  __m256 p[4], q[2];
  for (int j = 0; j < 4; j++)  // rows 2j | 2j + 1 in the two 128-bit halves: i + i+4
    p[j] = _mm256_add_ps(_mm256_permute2f128_ps(t3[2 * j], t3[2 * j + 1], 0x31),
                         _mm256_permute2f128_ps(t3[2 * j], t3[2 * j + 1], 0x20));
  for (int m = 0; m < 2; m++)  // rows 4m, 4m + 2 | 4m + 1, 4m + 3, two lanes each: i + i+2
    q[m] = _mm256_add_ps(_mm256_shuffle_ps(p[2 * m], p[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(p[2 * m], p[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // rows 0, 2, 4, 6 | 1, 3, 5, 7: i + i+1
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm256_storeu_ps(y, _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  if constexpr (TT <= 2) {
    for (int r = 0; r < R; r++) bf16_row<TT>(w + r * wstride, k, x, kp, y + r, ystride);
  } else {
    bf16_dot<R, 2>(w, wstride, k, x, kp, y, ystride);
    bf16_dot<R, TT - 2>(w, wstride, k, x + 2 * kp, kp, y + 2 * ystride, ystride);
  }
}
#else
template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  float acc[R][TT][16] = {};
  for (int64_t i = 0; i < k; i += 16) {
    const int64_t n = std::min<int64_t>(16, k - i);
    for (int r = 0; r < R; r++) {
      float wv[16] = {};
      for (int64_t l = 0; l < n; l++) {
        uint32_t u = (uint32_t)w[r * wstride + i + l] << 16;
        std::memcpy(&wv[l], &u, 4);
      }
      for (int t = 0; t < TT; t++)
        for (int l = 0; l < 16; l++) acc[r][t][l] += wv[l] * x[t * kp + i + l];
    }
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) {
      float s = 0.0f;
      for (int l = 0; l < 16; l++) s += acc[r][t][l];
      y[t * ystride + r] = s;
    }
}
#endif

using Bf16Dot = void (*)(const uint16_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
const Bf16Dot BF16_DOTS[BF_R][BF_T] = {
    {bf16_dot<1, 1>, bf16_dot<1, 2>, bf16_dot<1, 3>, bf16_dot<1, 4>},
    {bf16_dot<2, 1>, bf16_dot<2, 2>, bf16_dot<2, 3>, bf16_dot<2, 4>},
    {bf16_dot<3, 1>, bf16_dot<3, 2>, bf16_dot<3, 3>, bf16_dot<3, 4>},
    {bf16_dot<4, 1>, bf16_dot<4, 2>, bf16_dot<4, 3>, bf16_dot<4, 4>},
};

// y [T, rows] = x (padded rows of kp) times w's rows, BF_R weight rows and up to BF_T activation rows per call of
// the dot table (bf16 or float32 weights), the weight rows split over the threads.
template <typename W, typename Dot>
void row_blocks(const Dot (&dots)[BF_R][BF_T], const W* w, int64_t wstride, int64_t k, const float* xp, int64_t kp,
                int64_t T, int64_t rows, float* y) {
  const int64_t nblk = (rows + BF_R - 1) / BF_R;
  const int64_t grain = grain_for(BF_R * k * T,
                                 std::max<int64_t>(1, std::min<int64_t>(16, nblk / (4 * at::get_num_threads()))));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t r = b * BF_R;
      const int rr = (int)std::min<int64_t>(BF_R, rows - r);
      for (int64_t t0 = 0; t0 < T; t0 += BF_T) {
        const int tt = (int)std::min<int64_t>(BF_T, T - t0);
        dots[rr - 1][tt - 1](w + r * wstride, wstride, k, xp + t0 * kp, kp, y + t0 * rows + r, rows);
      }
    }
  });
}
}  // namespace

// x float32 [T, k] contiguous, w bfloat16 bits (row r at w + r*wstride, k values), y float32 [T, rows].
extern "C" int ds4py_bf16_linear(const float* x, int64_t T, int64_t k, const uint16_t* w, int64_t rows,
                                 int64_t wstride, float* y) {
  try {
    // x rows zero-padded to kp; the AVX512 / AVX2 code takes each 32 values as the 16 even ones, then the 16 odd
    const int64_t kp = (k + 31) / 32 * 32;
    std::vector<float> xp(T * kp, 0.0f);
    for (int64_t t = 0; t < T; t++) {
      if (DS4PY_AVX512 || DS4PY_AVX2) {
        for (int64_t i = 0; i < k; i++) xp[t * kp + i / 32 * 32 + (i % 2) * 16 + (i % 32) / 2] = x[t * k + i];
      } else {
        std::memcpy(xp.data() + t * kp, x + t * k, k * 4);
      }
    }
#if DS4PY_AVX512
    if (T == 1) {  // one activation row (decoding): 16 weight rows at a time, then the rest as below
      const int64_t n16 = rows / 16;
      const int64_t grain = grain_for(16 * k,
                                      std::max<int64_t>(1, std::min<int64_t>(16, n16 / (4 * at::get_num_threads()))));
      dynamic_for(n16, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) bf16_rows16(w + b * 16 * wstride, wstride, k, xp.data(), kp, y + b * 16);
      });
      for (int64_t r = n16 * 16; r < rows; r++) bf16_dot<1, 1>(w + r * wstride, wstride, k, xp.data(), kp, y + r, 1);
      return 0;
    }
#elif DS4PY_AVX2
    if (T == 1) {  // as the AVX512 code, 8 rows at a time
      const int64_t n8 = rows / 8;
      const int64_t grain = grain_for(8 * k,
                                      std::max<int64_t>(1, std::min<int64_t>(32, n8 / (4 * at::get_num_threads()))));
      dynamic_for(n8, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) bf16_rows8(w + b * 8 * wstride, wstride, k, xp.data(), kp, y + b * 8);
      });
      for (int64_t r = n8 * 8; r < rows; r++) bf16_dot<1, 1>(w + r * wstride, wstride, k, xp.data(), kp, y + r, 1);
      return 0;
    }
#endif
    row_blocks(BF16_DOTS, w, wstride, k, xp.data(), kp, T, rows, y);
  } catch (...) {
    return 2;
  }
  return 0;
}

// ds4py_bf16_linear, then each result rounded to bf16 in place (still float32): what .to(bfloat16).float() gives,
// without the two passes over a 129280-row head's output
extern "C" int ds4py_bf16_linear_rounded(const float* x, int64_t T, int64_t k, const uint16_t* w, int64_t rows,
                                         int64_t wstride, float* y) {
  const int rc = ds4py_bf16_linear(x, T, k, w, rows, wstride, y);
  if (rc) return rc;
  for (int64_t i = 0; i < T * rows; i++) y[i] = round_if_bf16(y[i], 1);
  return 0;
}

// Repack MXFP4 rows (ggml blocks, row r at src + r * sstride) into the R16 layout at dst (rows % 16 == 0).
extern "C" int ds4py_mxfp4_repack16(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t rows, int64_t n) {
  if (rows % 16 || n % 32) return 1;
  repack16(src, sstride, dst, rows, n / 32);
  return 0;
}

