// Dot products of G groups of 16 heads' bf16 queries with bf16 keys, by vdpbf16ps (needs immintrin.h and
// AVX512-BF16), for the indexer's scores and the attention's logits: qp [P, ld], lane l of group g at
// qp[p * ld + 16 g + l] holding head 16 g + l's values 2p, 2p + 1; key j's bf16 values from key(j). Each lane is
// a chain of fused steps over the pairs, d + 1 then d (vdpbf16ps's order: exact products, float32 sums, values
// below float32's normal range to zero). E keys at a time (E G accumulators, each q load used E times), then one
// at a time; done(j, acc) receives key j's G sums. The same sums whatever E.
template <int G, typename Key, typename Done>
inline void heads_dot_bf16(const uint32_t* qp, int64_t ld, int64_t P, int64_t n, Key key, Done done) {
  constexpr int E = G <= 4 ? 4 : 2;
  auto pair = [](const uint16_t* row, int64_t p) {  // a key's values 2p, 2p + 1 in every lane
    uint32_t u;
    std::memcpy(&u, row + 2 * p, 4);
    return (__m512bh)_mm512_set1_epi32((int)u);
  };
  int64_t j = 0;
  for (; j + E <= n; j += E) {
    __m512 a[E][G];
    const uint16_t* rows[E];
    for (int e = 0; e < E; e++) {
      rows[e] = key(j + e);
      for (int g = 0; g < G; g++) a[e][g] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < P; p++) {
      __m512bh v[E];
      for (int e = 0; e < E; e++) v[e] = pair(rows[e], p);
      for (int g = 0; g < G; g++) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + p * ld + 16 * g);
        for (int e = 0; e < E; e++) a[e][g] = _mm512_dpbf16_ps(a[e][g], qv, v[e]);
      }
    }
    for (int e = 0; e < E; e++) done(j + e, a[e]);
  }
  for (; j < n; j++) {
    __m512 a[G];
    const uint16_t* row = key(j);
    for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
      const __m512bh v = pair(row, p);
      for (int g = 0; g < G; g++) a[g] = _mm512_dpbf16_ps(a[g], (__m512bh)_mm512_loadu_si512(qp + p * ld + 16 * g), v);
    }
    done(j, a);
  }
}
