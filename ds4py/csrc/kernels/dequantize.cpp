namespace {
#if DS4PY_AVX512
// One Q8_0 block -> 32 bf16: the scalar loop's operations 16 lanes at a time (d * q in float32, then the same
// integer round to nearest even), so the same bits. A 4096 x 4096 matrix took 2.95 ms on 2 Zen 5 cores scalar.
inline void q8_0_block_bf16(const uint8_t* blk, uint16_t* o) {
#if defined(__AVX512BF16__) && defined(__F16C__)
  // vcvtne2ps2bf16 rounds to nearest even as store_bf16x16 does, and its flushing of subnormal inputs never
  // applies: |d * q| >= 2^-24 or 0. The AMX tiles' Q8_0 weights come from here (~2x the instructions otherwise).
  uint16_t h;
  std::memcpy(&h, blk, 2);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
  const __m128i q0 = _mm_loadu_si128((const __m128i*)(blk + 2)), q1 = _mm_loadu_si128((const __m128i*)(blk + 18));
  const __m512 lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
  const __m512 hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
  _mm512_storeu_si512((void*)o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#else
  const __m512 d = _mm512_set1_ps(half_at(blk));
  for (int h = 0; h < 2; h++) {
    const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 2 + 16 * h));
    store_bf16x16(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))), o + 16 * h);
  }
#endif
}
#endif

template <int QT, typename Out>
void dequant(const uint8_t* w, int64_t rows, int64_t wstride, int64_t n, Out* out) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    float v[32];
    for (int64_t r = r0; r < r1; r++) {
      for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t* blk = w + r * wstride + b * BB;
#if DS4PY_AVX512
        if constexpr (QT == Q8_0 && sizeof(Out) == 2) {
          q8_0_block_bf16(blk, (uint16_t*)out + r * n + b * 32);
          continue;
        }
#endif
        if (QT == Q8_0) {
          float d = half_at(blk);
          for (int i = 0; i < 32; i++) v[i] = d * (float)(int8_t)blk[2 + i];
        } else {
          float d = E8M0_HALF.v[blk[0]];
          for (int i = 0; i < 16; i++) {
            v[i] = d * (float)KVALUES[blk[1 + i] & 15];
            v[i + 16] = d * (float)KVALUES[blk[1 + i] >> 4];
          }
        }
        Out* o = out + r * n + b * 32;
        if constexpr (sizeof(Out) == 4) {
          std::memcpy(o, v, sizeof(v));
        } else {  // bfloat16, round to nearest even like torch (the values are finite or inf, never NaN)
          for (int i = 0; i < 32; i++) {
            uint32_t u;
            std::memcpy(&u, &v[i], 4);
            o[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
          }
        }
      }
    }
  });
}
}  // namespace

// w rows of ggml blocks (or R16 groups) -> out [rows, n], float32 (bf16 == 0) or bfloat16 bits (bf16 == 1).
extern "C" int ds4py_ggml_dequantize(int qtype, const uint8_t* w, int64_t rows, int64_t wstride, int64_t n,
                                     void* out, int bf16) {
  if (n % 32 || (qtype != Q8_0 && qtype != MXFP4 && qtype != MXFP4_R16) || (qtype == MXFP4_R16 && rows % 16))
    return 1;
  if (qtype == MXFP4_R16) {
    if (bf16) dequant_r16(w, rows, n, (uint16_t*)out);
    else dequant_r16(w, rows, n, (float*)out);
  } else if (qtype == Q8_0) {
    if (bf16) dequant<Q8_0>(w, rows, wstride, n, (uint16_t*)out);
    else dequant<Q8_0>(w, rows, wstride, n, (float*)out);
  } else {
    if (bf16) dequant<MXFP4>(w, rows, wstride, n, (uint16_t*)out);
    else dequant<MXFP4>(w, rows, wstride, n, (float*)out);
  }
  return 0;
}


