
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "bf16.h"
#include "row_ops.h"

// A prompt's attention projections finished in one pass: q [T, H * hd] (wq_b's output) normed per head without a
// weight (ds4py_rms_rows with round_scale = bf), kv [T, hd] (wkv's) normed with w [hd] (float32, or bf16 bits when
// wbf), then both rotated by rot [T, half] (cos, sin) pairs as ds4py_rope_rows rotates -> qkv [T, H + 1, hd]; the
// values of those calls one by one. Tokens split over the threads.
extern "C" void ds4py_qkv_rows(const void* q, const void* kv, int bf, int64_t T, int64_t H, int64_t hd, const void* w,
                               int wbf, float eps, const float* rot, int64_t half, void* qkv) {
  const size_t es = bf ? 2 : 4;
  std::vector<float> wf(hd);
  for (int64_t i = 0; i < hd; i++) wf[i] = load_float(w, i, wbf);
  const int64_t grain = std::max<int64_t>(1, rowops::ROWS_GRAIN / std::max<int64_t>((H + 1) * hd, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<char> normed((H + 1) * hd * es);
    for (int64_t t = t0; t < t1; t++) {
      for (int64_t h = 0; h < H; h++) {
        const void* row = (const char*)q + (t * H + h) * hd * es;
        if (bf) rowops::rms_row<true>(row, hd, nullptr, eps, 1, normed.data() + h * hd * es);
        else rowops::rms_row<false>(row, hd, nullptr, eps, 0, normed.data() + h * hd * es);
      }
      const void* kr = (const char*)kv + t * hd * es;
      if (bf) rowops::rms_row<true>(kr, hd, wf.data(), eps, 0, normed.data() + H * hd * es);
      else rowops::rms_row<false>(kr, hd, wf.data(), eps, 0, normed.data() + H * hd * es);
      ds4py_rope_rows(normed.data(), bf, 1, H + 1, hd, half, rot + t * 2 * half, 0,
                      (char*)qkv + t * (H + 1) * hd * es);
    }
  });
}
