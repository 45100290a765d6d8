#include "rotation.h"

namespace rowops {

inline void store(void* p, int64_t i, float f, int bf) {
  if (bf) ((uint16_t*)p)[i] = float_to_bf16(f);
  else ((float*)p)[i] = f;
}

// one row x [n] -> y [n] = x * s (s = rsqrt(mean(x^2) + eps), bf16-rounded when round_scale) * wf[i] (when wf),
// rounded to x's dtype; mean(x^2) summed in float64 (each square exact) over 8 lanes, so the loops vectorize
template <bool BF>
void rms_row(const void* x, int64_t n, const float* wf, float eps, int round_scale, void* y) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) {
      const double v = load_float(x, i + l, BF);
      acc[l] += v * v;
    }
  double ss = 0.0;
  for (; i < n; i++) ss += (double)load_float(x, i, BF) * load_float(x, i, BF);
  for (int l = 0; l < 8; l++) ss += acc[l];
  float s = 1.0f / std::sqrt((float)(ss / n) + eps);
  if (round_scale) s = round_if_bf16(s, 1);
  if (wf) {
    for (int64_t j = 0; j < n; j++) store(y, j, load_float(x, j, BF) * s * wf[j], BF);
  } else {
    for (int64_t j = 0; j < n; j++) store(y, j, load_float(x, j, BF) * s, BF);
  }
}

// rows of this many values or more go to the threads one by one; shorter ones in chunks of about this many values
constexpr int64_t ROWS_GRAIN = 32768;
}  // namespace rowops

// x [R, n] -> y [R, n] = x * rsqrt(mean(x^2) + eps), times w [n] when given, in float32, rounded to x's dtype.
// round_scale (the unweighted bf16 norm): the scale is rounded to bf16 first and x * scale rounded after, as
// torch computes `x * scale.to(bfloat16)` in bf16. Rows split over the threads (a prompt's).
extern "C" void ds4py_rms_rows(const void* x, int bf, int64_t R, int64_t n, const void* w, int wbf, float eps,
                               int round_scale, void* y) {
  const size_t es = bf ? 2 : 4;
  std::vector<float> wf(w ? n : 0);
  for (int64_t i = 0; i < (int64_t)wf.size(); i++) wf[i] = load_float(w, i, wbf);
  const int64_t grain = std::max<int64_t>(1, rowops::ROWS_GRAIN / std::max<int64_t>(n, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const void* xr = (const char*)x + r * n * es;
      void* yr = (char*)y + r * n * es;
      if (bf) rowops::rms_row<true>(xr, n, w ? wf.data() : nullptr, eps, round_scale, yr);
      else rowops::rms_row<false>(xr, n, w ? wf.data() : nullptr, eps, round_scale, yr);
    }
  });
}

// x [T, per_t, hd] -> y: each row's last 2 * half channels, as (re, im) pairs, times row t's rotation
// rot [T, half] (cos, sin) pairs, or its conjugate; in float32, rounded to x's dtype; the other channels copied.
// Tokens split over the threads (a prompt's).
extern "C" void ds4py_rope_rows(const void* x, int bf, int64_t T, int64_t per_t, int64_t hd, int64_t half,
                                const float* rot, int conj, void* y) {
  const int64_t first = hd - 2 * half;
  const size_t esize = bf ? 2 : 4;
  const int64_t grain = std::max<int64_t>(1, rowops::ROWS_GRAIN / std::max<int64_t>(per_t * hd, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      for (int64_t h = 0; h < per_t; h++) {
        const int64_t row = (t * per_t + h) * hd;
        std::memcpy((char*)y + row * esize, (const char*)x + row * esize, first * esize);
        for (int64_t j = 0; j < half; j++) {
          const float a = load_float(x, row + first + 2 * j, bf);
          const float b = load_float(x, row + first + 2 * j + 1, bf);
          const float c = rot[(t * half + j) * 2];
          const float s = conj ? -rot[(t * half + j) * 2 + 1] : rot[(t * half + j) * 2 + 1];
          float re, im;
          rotate_pair(a, b, c, s, re, im);
          rowops::store(y, row + first + 2 * j, re, bf);
          rowops::store(y, row + first + 2 * j + 1, im, bf);
        }
      }
  });
}
