// x [T, n] contiguous, float32 (xbf16 == 0) or bfloat16 bits (widened exactly first), w uint8 rows of ggml
// blocks (row r at w + r*wstride; MXFP4_R16: contiguous groups of 16 rows, wstride unused), y [T, rows] float32
// (ybf16 == 0) or the float32 results rounded to bfloat16 as torch rounds: the same values as computing in
// float32 and converting with torch, one call from Python.
// groups > 1: x [T, groups * n], rows % groups == 0, and row r takes the (r / (rows / groups))-th n values of each
// x row (the grouped output projection in one call); Q8_0 / MXFP4 rows only.
namespace {
// ds4py_ggml_linear's work on float32 x [T, groups * n] -> float32 y [T, rows]; throws std::bad_alloc
void ggml_linear_f32(int qtype, const float* xp, int64_t T, int64_t n, const uint8_t* w, int64_t rows,
                     int64_t wstride, float* yp, int64_t groups) {
  if (qtype == MXFP4_R16) {
    Acts16 a;
    quantize_acts16(xp, T, n, a);
    r16_linear(a, w, rows, yp);
  } else {
    std::vector<Acts> acts(groups);  // group g: columns [g * n, (g + 1) * n) of every x row
    for (int64_t g = 0; g < groups; g++) quantize_acts(xp + g * n, T, n, acts[g], groups * n);
    if (qtype == Q8_0) linear<Q8_0>(acts.data(), rows / groups, w, rows, wstride, yp);
    else linear<MXFP4>(acts.data(), rows / groups, w, rows, wstride, yp);
  }
}
}  // namespace

extern "C" int ds4py_ggml_linear(int qtype, const void* x, int xbf16, int64_t T, int64_t n, const uint8_t* w,
                                 int64_t rows, int64_t wstride, void* y, int ybf16, int64_t groups) {
  if (n % 32 || (qtype != Q8_0 && qtype != MXFP4 && qtype != MXFP4_R16) || (qtype == MXFP4_R16 && rows % 16))
    return 1;
  if (groups < 1 || rows % groups || (groups > 1 && qtype == MXFP4_R16)) return 1;
  try {
    // float32 copies kept between calls and converted over the threads: the grouped output projection's bf16
    // x at T = 256 (8.4M values) took ~50 ms to widen into a fresh 34 MB buffer, 12% of the call
    thread_local std::vector<float> s_xf, s_yf;
    const float* xp = (const float*)x;
    const int64_t nx = T * groups * n, ny = T * rows;
    if (xbf16) {
      float* xf = grow(s_xf, nx);
      const uint16_t* xb = (const uint16_t*)x;
      at::parallel_for(0, nx, 1 << 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) xf[i] = bf16_to_float(xb[i]);
      });
      xp = xf;
    }
    float* yp = ybf16 ? grow(s_yf, ny) : (float*)y;
    ggml_linear_f32(qtype, xp, T, n, w, rows, wstride, yp, groups);
    if (ybf16) {
      uint16_t* yb = (uint16_t*)y;
      at::parallel_for(0, ny, 1 << 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) yb[i] = float_to_bf16(yp[i]);
      });
    }
  } catch (...) {
    return 2;
  }
  return 0;
}

