// Software prefetch distance, bytes ahead of the pair of blocks being read (a thread's rows are contiguous, so
// past a row's end this fetches the next row), by tile height. Weights from DRAM, 2 threads, Q8_0 4096x4096
// T=1/4/8: 0.40/1.11/2.18 ms without, 0.38/0.48/1.50 ms with; MXFP4 2048x4096 T=4/8: 0.35/0.85 -> 0.21/0.46 ms.
constexpr int64_t PF_DIST[TILE_T + 1] = {0, 2048, 2048, 4096, 4096, 4096, 4096, 4096, 4096};

const int8_t KVALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

struct E8M0 {
  float v[256];
  E8M0() { for (int e = 0; e < 256; e++) v[e] = std::ldexp(1.0f, e - 128); }  // ggml's e8m0 "half"
};
const E8M0 E8M0_HALF;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Activation rows stored by tiles of `tile_rows(T)` rows (TILE_T, or all T rows where fewer: a decoded token's one),
// a tile's rows side by side in each item (Acts: a pair of blocks; Acts16: a block), so a kernel walks a tile with
// one pointer (with each row's own, the 8 rows' pointers did not fit the registers). A kernel's row tile never
// crosses one of these (t0 % tile + TT <= tile, as every caller's loop over the rows makes them).
inline int64_t tile_rows(int64_t T) { return std::max<int64_t>(1, std::min<int64_t>(T, TILE_T)); }
// (row t, item k)'s index for `items` items a row and tiles of `tile` rows
inline int64_t tiled(int64_t t, int64_t k, int64_t items, int64_t tile) {
  return ((t / tile) * items + k) * tile + t % tile;
}

// Quantized activations. Per row t and pair of blocks p (blocks 2p, 2p + 1): 64 bytes of int8 codes + XQ_OFFSET
// (AVX512: +128, unsigned for vpdpbusd; portable loop: the int8 code itself, since GCC 12 -O3 miscompiles u8-128
// times s8 sums) and 16 floats of the two block scales, each repeated 8 times, so a 512-bit lane group of two
// blocks multiplies by one vector load. nbp = nb rounded up to even; the padding block is code 0 (stored 128) with
// scale 0. Rows are stored by tiles (`tile_rows`), a tile's rows side by side in each pair ([tiles][pairs][tile][64]
// bytes, [tiles][pairs][tile][16] floats).
struct Acts {
  int64_t T, nb, nbp, tile;
  std::vector<uint8_t> q;
  std::vector<float> s;
  // (row t, pair p)'s index: times 64 in q, times 16 in s
  int64_t at(int64_t t, int64_t p) const { return tiled(t, p, nbp / 2, tile); }
  const uint8_t* qat(int64_t t, int64_t b) const { return q.data() + at(t, b / 2) * 64 + (b % 2) * 32; }
  const float* sat(int64_t t, int64_t b) const { return s.data() + at(t, b / 2) * 16 + (b % 2) * 8; }
};

// One block of 32 activations -> its int8 codes (round to nearest even) and scale amax / 127, the portable way.
inline float quantize_block(const float* v, int8_t* codes) {
  float amax = 0.0f;
  for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < 32; i++) codes[i] = (int8_t)std::nearbyint(v[i] * id);
  return d;
}

// x row t at x + t * xstride (xstride 0: n, rows back to back)
void quantize_acts(const float* x, int64_t T, int64_t n, Acts& a, int64_t xstride = 0) {
  if (xstride == 0) xstride = n;
  a.T = T;
  a.nb = n / 32;
  a.nbp = (a.nb + 1) / 2 * 2;
  a.tile = tile_rows(T);
  const int64_t padded = (T + a.tile - 1) / a.tile * a.tile;
  a.q.assign(padded * a.nbp * 32, (uint8_t)XQ_OFFSET);
  a.s.assign(padded * a.nbp * 16, 0.0f);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const float* xr = x + t * xstride;
      for (int64_t b = 0; b < a.nb; b++) {
        const float* v = xr + b * 32;
        uint8_t* qb = (uint8_t*)a.qat(t, b);  // the block's 32 codes
        float* s = (float*)a.sat(t, b);       // its 8 scale lanes
#if DS4PY_AVX512
        __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        __m128i ql = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, vid)));
        __m128i qh = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, vid)));
        __m256i qq = _mm256_xor_si256(_mm256_set_m128i(qh, ql), _mm256_set1_epi8((char)0x80));
        _mm256_storeu_si256((__m256i*)qb, qq);
#elif DS4PY_AVX2
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
               v3 = _mm256_loadu_ps(v + 24);
        const __m256 nz = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(nz, v0), _mm256_andnot_ps(nz, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(nz, v2), _mm256_andnot_ps(nz, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid)),
                      i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        // packs interleave 128-bit lanes: [0-3, 8-11, 4-7, 12-15] per pack; the permute puts them back in order
        const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i*)qb,
                            _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        const float d = quantize_block(v, (int8_t*)qb);
#endif
        for (int k = 0; k < 8; k++) s[k] = d;
      }
    }
  });
}

#if DS4PY_AVX512
// Two consecutive weight blocks as 64 int8 values (element order of the activations) and their scales.
template <int QT>
inline void load_pair(const uint8_t* b0, bool second, __m512i& w, __m512& dw) {
  if (QT == Q8_0) {
    const uint8_t* b1 = b0 + 34;
    __m256i w0 = _mm256_loadu_si256((const __m256i*)(b0 + 2));
    __m256i w1 = second ? _mm256_loadu_si256((const __m256i*)(b1 + 2)) : _mm256_setzero_si256();
    w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
    float d0 = half_at(b0), d1 = second ? half_at(b1) : 0.0f;
    dw = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
  } else {
    const uint8_t* b1 = b0 + 17;
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)KVALUES));
    __m128i q0 = _mm_loadu_si128((const __m128i*)(b0 + 1));
    __m128i q1 = second ? _mm_loadu_si128((const __m128i*)(b1 + 1)) : _mm_setzero_si128();
    __m256i qs = _mm256_set_m128i(q1, q0);                                   // [q0, q1]
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(qs), _mm256_srli_epi16(qs, 4), 1);
    both = _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));        // [q0, q0>>4, q1, q1>>4]
    __m512i codes = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
    w = _mm512_shuffle_epi8(table, codes);
    if (!second) w = _mm512_inserti64x4(w, _mm256_setzero_si256(), 1);
    float d0 = E8M0_HALF.v[b0[0]], d1 = second ? E8M0_HALF.v[b1[0]] : 0.0f;
    dw = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
  }
}

// y[t * ystride] = dot(weight row wr, activation row t0 + t) for t < TT.
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  __m512 acc[TT];
  for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();
  const uint8_t* xq = a.q.data() + a.at(t0, 0) * 64;  // row t0 + t of pair p: xq + (p * tile + t) * 64
  const float* xs = a.s.data() + a.at(t0, 0) * 16;
  const int64_t tile = a.tile;
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  for (int64_t b = 0; b < a.nb; b += 2, xq += tile * 64, xs += tile * 16) {
    __m512i w;
    __m512 dw;
    _mm_prefetch((const char*)(wr + b * BB + PF_DIST[TT]), _MM_HINT_T0);
    load_pair<QT>(wr + b * BB, b + 1 < a.nb, w, dw);
    // the activations are stored +128: dot(x+128, w) - 128*sum(w) = dot(x, w)
    __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w));
#pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {  // unrolled: the accumulators stay in registers
      __m512i dot = _mm512_dpbusd_epi32(init, _mm512_loadu_si512(xq + t * 64), w);
      __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(xs + t * 16));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[t]);
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = _mm512_reduce_add_ps(acc[t]);
}
#elif DS4PY_AVX2
// One weight block's 32 int8 values (element order of the activations) and its scale; a missing block (past the
// row's end: the AVX512 code's zero-padded second of a pair) is zeros.
template <int QT>
inline __m256i load_block(const uint8_t* blk, bool present, float& d) {
  if (!present) {
    d = 0.0f;
    return _mm256_setzero_si256();
  }
  if (QT == Q8_0) {
    d = half_at(blk);
    return _mm256_loadu_si256((const __m256i*)(blk + 2));
  }
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)KVALUES));
  const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 1));
  const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
  d = E8M0_HALF.v[blk[0]];
  return _mm256_shuffle_epi8(table, codes);
}

// The AVX512 row_dot's operations with its 16 lanes in two halves: lanes 0-7 take the even block of each pair,
// 8-15 the odd one. The int8 dot of 4 values per lane is exact either way (here |w| times x with w's sign:
// |w| <= 128, |x| <= 127, so vpmaddubsw's pair sums stay within int16); the float steps and the final sum are
// the AVX512 code's, so the results are its bits.
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  __m256 lo[TT], hi[TT];
  for (int t = 0; t < TT; t++) lo[t] = hi[t] = _mm256_setzero_ps();
  const uint8_t* xq = a.q.data() + a.at(t0, 0) * 64;  // row t0 + t of pair p: xq + (p * tile + t) * 64
  const float* xs = a.s.data() + a.at(t0, 0) * 16;
  const int64_t tile = a.tile;
  for (int64_t b = 0; b < a.nb; b += 2, xq += tile * 64, xs += tile * 16) {
    _mm_prefetch((const char*)(wr + b * BB + PF_DIST[TT]), _MM_HINT_T0);
    float d0, d1;
    const __m256i w0 = load_block<QT>(wr + b * BB, true, d0), w1 = load_block<QT>(wr + (b + 1) * BB, b + 1 < a.nb, d1);
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
    const __m256 dw0 = _mm256_set1_ps(d0), dw1 = _mm256_set1_ps(d1);
    for (int t = 0; t < TT; t++) {
      const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + t * 64));
      const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + t * 64 + 32));
      const __m256 s0 = _mm256_mul_ps(dw0, _mm256_loadu_ps(xs + t * 16));
      const __m256 s1 = _mm256_mul_ps(dw1, _mm256_loadu_ps(xs + t * 16 + 8));
      lo[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(u0, _mm256_sign_epi8(x0, w0))), s0, lo[t]);
      hi[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(u1, _mm256_sign_epi8(x1, w1))), s1, hi[t]);
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = reduce16(lo[t], hi[t]);
}
#else
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  float acc[TT] = {};
  int8_t w[32];
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wr + b * BB;
    float dw;
    if (QT == Q8_0) {
      std::memcpy(w, blk + 2, 32);
      dw = half_at(blk);
    } else {
      for (int i = 0; i < 16; i++) {
        w[i] = KVALUES[blk[1 + i] & 15];
        w[i + 16] = KVALUES[blk[1 + i] >> 4];
      }
      dw = E8M0_HALF.v[blk[0]];
    }
    for (int t = 0; t < TT; t++) {
      const int8_t* q = (const int8_t*)a.qat(t0 + t, b);
      int32_t s = 0;
      for (int i = 0; i < 32; i++) s += (int32_t)q[i] * (int32_t)w[i];
      // fused as written (the build has -ffp-contract=off: the same bits under every -mtune)
      acc[t] = std::fma(dw * a.sat(t0 + t, b)[0], (float)s, acc[t]);
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = acc[t];
}
#endif

template <int QT>
void row_tile(const uint8_t* wr, const Acts& a, int64_t t0, int tt, float* y, int64_t ystride) {
  switch (tt) {
    case 1: return row_dot<QT, 1>(wr, a, t0, y, ystride);
    case 2: return row_dot<QT, 2>(wr, a, t0, y, ystride);
    case 3: return row_dot<QT, 3>(wr, a, t0, y, ystride);
    case 4: return row_dot<QT, 4>(wr, a, t0, y, ystride);
    case 5: return row_dot<QT, 5>(wr, a, t0, y, ystride);
    case 6: return row_dot<QT, 6>(wr, a, t0, y, ystride);
    case 7: return row_dot<QT, 7>(wr, a, t0, y, ystride);
    default: return row_dot<QT, 8>(wr, a, t0, y, ystride);
  }
}

// y [T, rows] = rows of w times activations: row r times acts[r / rg] (groups of rg rows, each with its own
// activations: the grouped output projection; one group: rg = rows).
// Group by group, each group's rows split over the threads, so that the threads stream the same activations at
// once (a split of all rows had them read different groups'); one tile of activations (a decoded token's) reads
// every group's rows in one round instead of a round per group. With ds4py_ggml_linear's threaded bf16 widening,
// the grouped output projection at T = 256 (8 x 1024 rows of 4096) went 390 -> 320 ms on 2 threads; this part's
// own share was not measured apart.
template <int QT>
void linear(const Acts* acts, int64_t rg, const uint8_t* w, int64_t rows, int64_t wstride, float* y) {
  constexpr int ROW_TILE_T = row_tile_t<QT>();
  const int64_t T = acts[0].T;
  int64_t grain = std::max<int64_t>(1, std::min<int64_t>(CHUNK, rg / (4 * at::get_num_threads())));
  grain = grain_for(acts[0].nb * 32 * T, grain);
  auto run = [&](int64_t r0, int64_t r1) {  // rows [r0, r1)
    for (int64_t c0 = r0; c0 < r1; c0 += CHUNK) {
      int64_t c1 = std::min(r1, c0 + CHUNK);
      for (int64_t t0 = 0; t0 < T; t0 += ROW_TILE_T) {
        int tt = (int)std::min<int64_t>(ROW_TILE_T, T - t0);
        for (int64_t r = c0; r < c1; r++)
          row_tile<QT>(w + r * wstride, acts[r / rg], t0, tt, y + t0 * rows + r, rows);
      }
    }
  };
  if (T <= ROW_TILE_T) {  // one tile of activations (a decoded token): every group's rows in one round
    dynamic_for(rows, grain, run);
    return;
  }
  for (int64_t g0 = 0; g0 < rows; g0 += rg)
    dynamic_for(rg, grain, [&](int64_t r0, int64_t r1) { run(g0 + r0, g0 + r1); });
}

}  // namespace

