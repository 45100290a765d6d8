
inline float swiglu(float gate, float up, float limit) {  // clamped SwiGLU, as ds4py.model.moe.swiglu
  if (limit > 0) {
    gate = std::min(gate, limit);
    up = std::min(std::max(up, -limit), limit);
  }
  return gate / (1.0f + std::exp(-gate)) * up;
}

#include "exp.h"

// h[i] = swiglu(h[i], up[i]) for i < n
inline void swiglu_rows(float* h, const float* up, int64_t n, float limit) {
  int64_t i = 0;
#if DS4PY_AVX512
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 g = _mm512_loadu_ps(h + i), u = _mm512_loadu_ps(up + i);
    if (limit > 0) {
      g = _mm512_min_ps(g, lim);
      u = _mm512_min_ps(_mm512_max_ps(u, nlim), lim);
    }
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(silu, u));
  }
#elif DS4PY_AVX2
  // 16 values a step, as the AVX512 code (the same values go to the scalar tail there and here)
  const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.0f);
  for (; i < n / 16 * 16; i += 8) {
    __m256 g = _mm256_loadu_ps(h + i), u = _mm256_loadu_ps(up + i);
    if (limit > 0) {
      g = _mm256_min_ps(g, lim);
      u = _mm256_min_ps(_mm256_max_ps(u, nlim), lim);
    }
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, u));
  }
#endif
  for (; i < n; i++) h[i] = swiglu(h[i], up[i], limit);
}
