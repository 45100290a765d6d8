
inline float bf16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN -> 0x7FC0: what torch's .to(bfloat16) does
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// f rounded to bf16 when bf (bf16_to_float(float_to_bf16(f)): nearest even, NaN -> the quiet NaN), else f;
// branch-free, so the loops around it vectorize
inline float round_if_bf16(float f, int bf) {
  if (!bf) return f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = f != f ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// value i of float32 data, or of bf16 bits when bf
inline float load_float(const void* p, int64_t i, int bf) {
  return bf ? bf16_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

// n values (float32, or bf16 bits when bf) -> float32 dst; the two loops vectorize
inline void widen_to_float(const void* src, int bf, int64_t n, float* dst) {
  if (!bf) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  const uint16_t* b = (const uint16_t*)src;
  for (int64_t i = 0; i < n; i++) {
    const uint32_t u = (uint32_t)b[i] << 16;
    std::memcpy(dst + i, &u, 4);
  }
}
