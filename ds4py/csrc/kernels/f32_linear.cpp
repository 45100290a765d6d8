namespace {
// float32 weights times float32 activations, as bf16_dot without the widening: R weight rows, TT activation rows.
#if DS4PY_AVX512
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
  const int64_t kf = k / 16 * 16;
  auto step = [&](int64_t i, bool tail) {  // as bf16_dot: no tail test in the main loop
    __m512 xv[TT];
    for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_ps(x + t * kp + i);
    for (int r = 0; r < R; r++) {
      const float* wp = w + r * wstride + i;
      float pad[16];
      if (tail) {  // the last partial 16: weights through a zero-padded copy
        std::memset(pad, 0, sizeof(pad));
        std::memcpy(pad, wp, (k - kf) * 4);
        wp = pad;
      } else {
        _mm_prefetch((const char*)(w + r * wstride + i + 256), _MM_HINT_T0);
      }
      const __m512 v = _mm512_loadu_ps(wp);
      for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(v, xv[t], acc[r][t]);
    }
  };
  for (int64_t i = 0; i < kf; i += 16) step(i, false);
  if (kf < kp) step(kf, true);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) y[t * ystride + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#elif DS4PY_AVX2
// the AVX512 f32_dot, each 16-lane accumulator in two halves: its bits
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  for (int r = 0; r < R; r++) {
    __m256 acc[TT][2];
    for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const float* row = w + r * wstride;
    const int64_t kf = k / 16 * 16;
    auto step = [&](const float* wp, int64_t i) {
      const __m256 v0 = _mm256_loadu_ps(wp), v1 = _mm256_loadu_ps(wp + 8);
      for (int t = 0; t < TT; t++) {
        acc[t][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + t * kp + i), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + t * kp + i + 8), acc[t][1]);
      }
    };
    for (int64_t i = 0; i < kf; i += 16) {
      _mm_prefetch((const char*)(row + i + 256), _MM_HINT_T0);
      step(row + i, i);
    }
    if (kf < kp) {
      float pad[16] = {};
      std::memcpy(pad, row + kf, (k - kf) * 4);
      step(pad, kf);
    }
    for (int t = 0; t < TT; t++) y[t * ystride + r] = reduce16(acc[t][0], acc[t][1]);
  }
}
#else
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) {
      float lanes[16] = {};
      for (int64_t i = 0; i < k; i++) lanes[i % 16] += w[r * wstride + i] * x[t * kp + i];
      float s = 0.0f;
      for (int l = 0; l < 16; l++) s += lanes[l];
      y[t * ystride + r] = s;
    }
}
#endif

using F32Dot = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
const F32Dot F32_DOTS[BF_R][BF_T] = {
    {f32_dot<1, 1>, f32_dot<1, 2>, f32_dot<1, 3>, f32_dot<1, 4>},
    {f32_dot<2, 1>, f32_dot<2, 2>, f32_dot<2, 3>, f32_dot<2, 4>},
    {f32_dot<3, 1>, f32_dot<3, 2>, f32_dot<3, 3>, f32_dot<3, 4>},
    {f32_dot<4, 1>, f32_dot<4, 2>, f32_dot<4, 3>, f32_dot<4, 4>},
};
}  // namespace

// x float32 [T, k] contiguous, w float32 (row r at w + r*wstride, k values), y float32 [T, rows]: small-T
// products of float32 matrices (the routers) on every thread; torch's single-threaded matrix-vector product
// read a router's 4 MB at one core's bandwidth.
extern "C" int ds4py_f32_linear(const float* x, int64_t T, int64_t k, const float* w, int64_t rows,
                                int64_t wstride, float* y) {
  try {
    const int64_t kp = (k + 15) / 16 * 16;
    std::vector<float> xp(T * kp, 0.0f);
    for (int64_t t = 0; t < T; t++) std::memcpy(xp.data() + t * kp, x + t * k, k * 4);
    row_blocks(F32_DOTS, w, wstride, k, xp.data(), kp, T, rows, y);
  } catch (...) {
    return 2;
  }
  return 0;
}

