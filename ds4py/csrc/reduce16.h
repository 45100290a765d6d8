
// The sum of 16 float lanes (lo: lanes 0-7, hi: 8-15) in _mm512_reduce_add_ps's order (GCC's: lanes i + i+8,
// then i + i+4, i + i+2, i + i+1), so a 16-lane AVX512 accumulator kept as two 256-bit halves sums to its bits.
inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}
