#include "bf16.h"
#include "row_ops.h"

namespace {
// MXFP4 repacked by 16 rows ("R16"): for each group of 16 rows and each block b (32 values), 272 bytes: the 16
// rows' scale bytes, then their 16 bytes of nibbles interleaved 4 bytes at a time: byte 16 + 64v + 4r + k is
// byte j = 4v + k of row r (v = 0..3, r = 0..15, k = 0..3), and a byte holds element j (low nibble) and j + 16
// (high). So each 64-byte load is 4 bytes of all 16 rows, meeting one broadcast 4-byte group of activations,
// the 16 rows' scales come in one 16-byte load, and the dot products land one row per lane: ~5 instructions per
// 64 weights where the ggml layout takes ~15 (its pairs of blocks need shuffles, and their scales gathered
// from 17-byte strides). Same bytes, same values; llama.cpp repacks MXFP4 to interleaved rows on x86 too.
constexpr int64_t R16_BLOCK = 272;

inline int64_t r16_offset(int r, int j) { return 16 + 64 * (j / 4) + 4 * r + j % 4; }

// dst may be src (sstride = nb * 17): each group is copied aside before it is rewritten.
void repack16(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t rows, int64_t nb) {
  at::parallel_for(0, rows / 16, 8, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> tmp(16 * nb * 17);
    for (int64_t g = g0; g < g1; g++) {
      for (int r = 0; r < 16; r++) std::memcpy(tmp.data() + r * nb * 17, src + (g * 16 + r) * sstride, nb * 17);
      for (int64_t b = 0; b < nb; b++) {
        uint8_t* o = dst + (g * nb + b) * R16_BLOCK;
        for (int r = 0; r < 16; r++) {
          const uint8_t* blk = tmp.data() + r * nb * 17 + b * 17;
          o[r] = blk[0];
          for (int j = 0; j < 16; j++) o[r16_offset(r, j)] = blk[1 + j];
        }
      }
    }
  });
}

#if DS4PY_AVX512
// 16 nibble codes (bytes of codes) -> 16 bf16 of d * KVALUES[code]: the scalar loop's operations 16 lanes at a time
// (the float32 product, then the same round to nearest even; the products are finite or inf, never NaN), so the
// same bits, as `q8_0_block_bf16`
inline void mxfp4_codes_bf16(__m128i codes, __m512 d, uint16_t* o) {
  const __m128i k = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)KVALUES), codes);
  store_bf16x16(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(k))), o);
}

// bf16 bits of KVALUES[c] (code 8 is +0, as code 0)
alignas(64) const uint16_t KVALUES_BF16[32] = {
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40c0, 0x4100, 0x4140,
    0x0000, 0xbf80, 0xc000, 0xc040, 0xc080, 0xc0c0, 0xc100, 0xc140};

// One R16 block (16 rows x 32 values) -> bf16 rows o + r * n, when every scale byte e is in [2, 252]: there
// each d * KVALUES[c] = KVALUES[c] * 2^(e - 128) is a normal float32 and exact in bf16 (|KVALUES| <= 12 has 3
// significant bits), so its bits are KVALUES_BF16[c] with (e - 128) added to the exponent field: the exact path's
// bits. Row r's 16 bytes come from a 4 x 4 transpose of the block's 4 bytes x 16 rows loads; then per row one
// word permute does the 32 lookups. Its arithmetic alone: 17 G values/s on 1 Xeon core (the whole 2048 x 4096
// dequantize, its stores the bound: 0.63 -> 0.59 ms on 2 cores); the AMX tiles' weights come from it (amx.cpp).
inline bool r16_block_bf16_fast(const uint8_t* blk, uint16_t* o, int64_t n) {
  const __m128i s = _mm_loadu_si128((const __m128i*)blk);
  const __m128i lo = _mm_max_epu8(s, _mm_set1_epi8(2)), hi = _mm_min_epu8(s, _mm_set1_epi8((char)252));
  if (_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(lo, s), _mm_cmpeq_epi8(hi, s))) != 0xFFFF) return false;
  // in_v lane i dword k: row 4i + k's bytes 4v..4v+3; after the transpose u_k lane i: row 4i + k's 16 bytes
  __m512i in[4];
  for (int v = 0; v < 4; v++) in[v] = _mm512_loadu_si512((const void*)(blk + 16 + 64 * v));
  const __m512i t0 = _mm512_unpacklo_epi32(in[0], in[1]), t1 = _mm512_unpackhi_epi32(in[0], in[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(in[2], in[3]), t3 = _mm512_unpackhi_epi32(in[2], in[3]);
  alignas(64) uint8_t rows[4][64];  // rows[k] + 16 i: row 4i + k
  _mm512_store_si512((void*)rows[0], _mm512_unpacklo_epi64(t0, t2));
  _mm512_store_si512((void*)rows[1], _mm512_unpackhi_epi64(t0, t2));
  _mm512_store_si512((void*)rows[2], _mm512_unpacklo_epi64(t1, t3));
  _mm512_store_si512((void*)rows[3], _mm512_unpackhi_epi64(t1, t3));
  const __m512i table = _mm512_load_si512((const void*)KVALUES_BF16);
  // word lanes 0..15: byte j's low nibble (element j); 16..31: its high nibble (element j + 16)
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i m15 = _mm512_set1_epi16(15), m7 = _mm512_set1_epi16(7);
  for (int r = 0; r < 16; r++) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)(rows[r % 4] + 16 * (r / 4))));
    const __m512i c = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(b), shift), m15);
    const __m512i v = _mm512_permutexvar_epi16(c, table);
    const __m512i e = _mm512_set1_epi16((int16_t)(((int)blk[r] - 128) * 128));
    _mm512_storeu_si512((void*)(o + r * n), _mm512_mask_add_epi16(v, _mm512_test_epi16_mask(c, m7), v, e));
  }
  return true;
}

// One R16 block -> bf16 rows o + r * n: `r16_block_bf16_fast`, or where a scale is subnormal or huge the float32
// products, rounded (the scalar loop's bits either way)
inline void r16_block_bf16(const uint8_t* blk, uint16_t* o, int64_t n) {
  if (r16_block_bf16_fast(blk, o, n)) return;
  for (int r = 0; r < 16; r++) {
    int32_t q4[4];  // row r's bytes j = 4v + k, from the 4 interleaved groups
    for (int v = 0; v < 4; v++) std::memcpy(&q4[v], blk + 16 + 64 * v + 4 * r, 4);
    const __m128i q = _mm_loadu_si128((const __m128i*)q4);
    const __m512 d = _mm512_set1_ps(E8M0_HALF.v[blk[r]]);
    mxfp4_codes_bf16(_mm_and_si128(q, _mm_set1_epi8(15)), d, o + r * n);
    mxfp4_codes_bf16(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15)), d, o + r * n + 16);
  }
}
#endif

template <typename Out>
void dequant_r16(const uint8_t* w, int64_t rows, int64_t n, Out* out) {
  const int64_t nb = n / 32;
  at::parallel_for(0, rows / 16, 2, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++)
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + (g * nb + b) * R16_BLOCK;
#if DS4PY_AVX512
        // 2048 x 4096 to bf16 on 2 Xeon (AMX) cores: 6.5 ms scalar; the long prompts' expert GEMMs wait on it
        if constexpr (sizeof(Out) == 2) {
          r16_block_bf16(blk, (uint16_t*)out + g * 16 * n + b * 32, n);
          continue;
        }
#endif
        for (int r = 0; r < 16; r++) {
          const float d = E8M0_HALF.v[blk[r]];
          Out* o = out + (g * 16 + r) * n + b * 32;
          for (int j = 0; j < 16; j++) {
            const uint8_t q = blk[r16_offset(r, j)];
            const float lo = d * (float)KVALUES[q & 15], hi = d * (float)KVALUES[q >> 4];
            if constexpr (sizeof(Out) == 4) {
              o[j] = lo;
              o[j + 16] = hi;
            } else {
              o[j] = float_to_bf16(lo);
              o[j + 16] = float_to_bf16(hi);
            }
          }
        }
      }
  });
}

// Activations for R16 weights: per row and block the 32 int8 codes (as quantize_acts makes them), the correction
// -12 * (their sum) (the weights are made unsigned, +12, for vpdpbusd) and the scale. Rows are stored by tiles
// (`tile_rows`), a tile's rows side by side in each block.
struct Acts16 {
  int64_t T = 0, nb = 0, tile = 1;
  std::vector<int8_t> q;     // [tiles][nb][tile][32]
  std::vector<int32_t> c;    // [tiles][nb][tile]
  std::vector<float> d;      // [tiles][nb][tile]
  // (row t, block b)'s index in c / d; times 32 in q
  int64_t at(int64_t t, int64_t b) const { return tiled(t, b, nb, tile); }
};

void quantize_acts16(const float* x, int64_t T, int64_t n, Acts16& a) {
  a.T = T;
  a.nb = n / 32;
  a.tile = tile_rows(T);
  const int64_t padded = (T + a.tile - 1) / a.tile * a.tile;
  a.q.assign(padded * a.nb * 32, 0);
  a.c.assign(padded * a.nb, 0);
  a.d.assign(padded * a.nb, 0.0f);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      for (int64_t b = 0; b < a.nb; b++) {
        const int64_t i = a.at(t, b);
        int8_t* q = a.q.data() + i * 32;
        const float d = quantize_block(x + t * n + b * 32, q);  // the codes quantize_acts makes
        int32_t sum = 0;
        for (int k = 0; k < 32; k++) sum += q[k];
        a.c[i] = -12 * sum;
        a.d[i] = d;
      }
  });
}

#if DS4PY_AVX512
// y[t * ystride + r] = dot(row r of the group at wg, activation row t0 + t) for r < 16, t < TT: rows of one tile.
template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  // KVALUES + 12: the e2m1 values (doubled, as ggml stores them) made unsigned
  const __m512i table =
      _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[TT];
  for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();
  const int64_t i0 = a.at(t0, 0), tile = a.tile;  // the tile's rows, `tile` per block
  const int8_t* q0 = a.q.data() + i0 * 32;
  const int32_t* c0 = a.c.data() + i0;
  const float* d0 = a.d.data() + i0;
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    _mm_prefetch((const char*)(blk + 4096), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 128), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 192), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 256), _MM_HINT_T0);
    // the 16 scales 2^(e - 128) (ggml's e8m0 "half"), exact for every e (e < 2 gives the subnormals)
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)blk));
    __m512i bits = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __mmask16 low = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    if (__builtin_expect(low != 0, 0))
      bits = _mm512_mask_mov_epi32(bits, low, _mm512_srlv_epi32(_mm512_set1_epi32(0x00400000),
                                                                 _mm512_sub_epi32(_mm512_set1_epi32(1), e)));
    const __m512 dw = _mm512_castsi512_ps(bits);
    __m512i lo[4], hi[4];
    for (int v = 0; v < 4; v++) {
      const __m512i W = _mm512_loadu_si512(blk + 16 + 64 * v);
      lo[v] = _mm512_shuffle_epi8(table, _mm512_and_si512(W, m4));
      hi[v] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(W, 4), m4));
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {  // unrolled: the accumulators stay in registers
      const int8_t* qc = q0 + (b * tile + t) * 32;
      // each 4-byte group of codes broadcast straight from memory (one load; a copy to int32s went through
      // general registers and a transfer per group)
      auto group = [qc](int k) { return _mm512_broadcastd_epi32(_mm_loadu_si32(qc + 4 * k)); };
      __m512i dot = _mm512_set1_epi32(c0[b * tile + t]), dot2 = _mm512_setzero_si512();
      for (int v = 0; v < 4; v++) {
        dot = _mm512_dpbusd_epi32(dot, lo[v], group(v));       // elements 4v .. 4v + 3
        dot2 = _mm512_dpbusd_epi32(dot2, hi[v], group(4 + v));  // elements 16 + 4v ..
      }
      dot = _mm512_add_epi32(dot, dot2);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(d0[b * tile + t])), acc[t]);
    }
  }
  for (int t = 0; t < TT; t++) _mm512_storeu_ps(y + t * ystride, acc[t]);
}
#elif DS4PY_AVX2
// The AVX512 r16_dot with rows 0-7 and 8-15 in two halves (each 64-byte vector of the group holds rows 0-7 in its
// first 32 bytes): the same exact int32 dots (vpmaddubsw of the unsigned table values, <= 24, and the int8
// activations stays within int16; or AVX-VNNI's vpdpbusd) and the same float steps, so the same bits. The halves
// and groups of R16_AVX2_T rows go in turn, each over all the blocks: a half's 8 vectors of weights and its rows'
// accumulators fit the 16 registers, where both halves of 8 rows at once spilled to the stack.
constexpr int R16_AVX2_T = 4;

// TS activation rows (codes q0, corrections c0, scales d0: a tile's, `tile` apart per block) against the group's
// halves h0 .. h0 + NH - 1 (rows 8 h .. 8 h + 7), over all the blocks in one pass -> y[t * ystride + 8 h + r]
template <int TS, int NH>
inline void r16_halves(const uint8_t* wg, const Acts16& a, const int8_t* q0, const int32_t* c0, const float* d0,
                       int h0, float* y, int64_t ystride) {
  const int64_t tile = a.tile;
  const __m256i table =
      _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[TS][NH];
  for (int t = 0; t < TS; t++)
    for (int u = 0; u < NH; u++) acc[t][u] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    if (h0 == 0)
      for (int l = 0; l < 5; l++) _mm_prefetch((const char*)(blk + 4096 + 64 * l), _MM_HINT_T0);
    __m256 dw[NH];
    __m256i lo[4][NH], hi[4][NH];
    for (int u = 0; u < NH; u++) {
      const int h = h0 + u;
      // 2^(e - 128), exact: e >= 2 through the exponent bits, else the table
      const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 8 * h)));
      dw[u] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
      if (__builtin_expect(_mm256_movemask_epi8(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)) != 0, 0)) {
        float v[8];
        for (int r = 0; r < 8; r++) v[r] = E8M0_HALF.v[blk[8 * h + r]];
        dw[u] = _mm256_loadu_ps(v);
      }
      for (int v = 0; v < 4; v++) {
        const __m256i W = _mm256_loadu_si256((const __m256i*)(blk + 16 + 64 * v + 32 * h));
        lo[v][u] = _mm256_shuffle_epi8(table, _mm256_and_si256(W, m4));
        hi[v][u] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(W, 4), m4));
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TS; t++) {
      const int8_t* qc = q0 + (b * tile + t) * 32;
      auto group = [qc](int k) {  // 4-byte group k of the codes, broadcast
        int32_t g;
        std::memcpy(&g, qc + 4 * k, 4);
        return _mm256_set1_epi32(g);
      };
      const __m256 sd = _mm256_set1_ps(d0[b * tile + t]);
      for (int u = 0; u < NH; u++) {
        __m256i dot = _mm256_set1_epi32(c0[b * tile + t]);
#if defined(__AVXVNNI__)
        // AVX-VNNI (Alder Lake and later without AVX512): vpdpbusd on 32-byte vectors, the same exact int32 sums
        for (int k = 0; k < 4; k++) {
          dot = _mm256_dpbusd_avx_epi32(dot, lo[k][u], group(k));
          dot = _mm256_dpbusd_avx_epi32(dot, hi[k][u], group(4 + k));
        }
#else
        // the products' pairs summed in int16, four vpmaddubsw at a time, before one vpmaddwd: each pair is at
        // most 2 * 24 * 128 = 6144, four 24576 < 32767, so the int32 dot is the same exact sum
        for (int k = 0; k < 4; k += 2) {
          const __m256i p = _mm256_add_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[k][u], group(k)), _mm256_maddubs_epi16(hi[k][u], group(4 + k))),
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[k + 1][u], group(k + 1)),
                               _mm256_maddubs_epi16(hi[k + 1][u], group(5 + k))));
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        }
#endif
        acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[u], sd), acc[t][u]);
      }
    }
  }
  for (int t = 0; t < TS; t++)
    for (int u = 0; u < NH; u++) _mm256_storeu_ps(y + t * ystride + 8 * (h0 + u), acc[t][u]);
}

// a decoding token's single row: both halves at once, the weights read in one pass (the halves in turn were 0.84x
// there, 1.21-1.33x from 2 rows: 8 R16 2048 x 4096 matrices from DRAM, built with -mno-avx512f on a Zen 5 core)
constexpr int R16_BOTH_MAX_T = 1;

template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  const int64_t i0 = a.at(t0, 0);  // the tile's rows, `tile` per block
  if constexpr (TT <= R16_BOTH_MAX_T) {
    r16_halves<TT, 2>(wg, a, a.q.data() + i0 * 32, a.c.data() + i0, a.d.data() + i0, 0, y, ystride);
    return;
  }
  for (int h = 0; h < 2; h++)
    for (int s = 0; s < TT; s += R16_AVX2_T) {
      const int8_t* q0 = a.q.data() + (i0 + s) * 32;
      const int32_t* c0 = a.c.data() + i0 + s;
      const float* d0 = a.d.data() + i0 + s;
      float* ys = y + s * ystride;
      switch (std::min(R16_AVX2_T, TT - s)) {
        case 1: r16_halves<1, 1>(wg, a, q0, c0, d0, h, ys, ystride); break;
        case 2: r16_halves<2, 1>(wg, a, q0, c0, d0, h, ys, ystride); break;
        case 3: r16_halves<3, 1>(wg, a, q0, c0, d0, h, ys, ystride); break;
        default: r16_halves<4, 1>(wg, a, q0, c0, d0, h, ys, ystride); break;
      }
    }
}
#else
template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  float acc[TT][16] = {};
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    for (int r = 0; r < 16; r++) {
      const float dw = E8M0_HALF.v[blk[r]];
      for (int t = 0; t < TT; t++) {
        const int8_t* q = a.q.data() + a.at(t0 + t, b) * 32;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
          const uint8_t c = blk[r16_offset(r, j)];
          s += (int32_t)KVALUES[c & 15] * q[j] + (int32_t)KVALUES[c >> 4] * q[j + 16];
        }
        acc[t][r] += dw * a.d[a.at(t0 + t, b)] * (float)s;
      }
    }
  }
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < 16; r++) y[t * ystride + r] = acc[t][r];
}
#endif

void r16_tile(const uint8_t* wg, const Acts16& a, int64_t t0, int tt, float* y, int64_t ystride) {
  switch (tt) {
    case 1: return r16_dot<1>(wg, a, t0, y, ystride);
    case 2: return r16_dot<2>(wg, a, t0, y, ystride);
    case 3: return r16_dot<3>(wg, a, t0, y, ystride);
    case 4: return r16_dot<4>(wg, a, t0, y, ystride);
    case 5: return r16_dot<5>(wg, a, t0, y, ystride);
    case 6: return r16_dot<6>(wg, a, t0, y, ystride);
    case 7: return r16_dot<7>(wg, a, t0, y, ystride);
    default: return r16_dot<8>(wg, a, t0, y, ystride);
  }
}

// x [T, n] -> y [T, rows] for R16 weights w (rows % 16 == 0, groups of n/32 * 272 bytes)
void r16_linear(const Acts16& a, const uint8_t* w, int64_t rows, float* y) {
  const int64_t groups = rows / 16, gbytes = a.nb * R16_BLOCK;
  at::parallel_for(0, groups, grain_for(16 * a.nb * 32 * a.T, 1), [&](int64_t g0, int64_t g1) {
    for (int64_t c0 = g0; c0 < g1; c0 += 2)  // 32 rows stay in cache while the activation tiles pass
      for (int64_t t0 = 0; t0 < a.T; t0 += TILE_T) {
        const int tt = (int)std::min<int64_t>(TILE_T, a.T - t0);
        for (int64_t g = c0; g < std::min(g1, c0 + 2); g++)
          r16_tile(w + g * gbytes, a, t0, tt, y + t0 * rows + g * 16, rows);
      }
  });
}
}  // namespace

