
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "bf16.h"
#include "row_ops.h"

namespace {
template <bool BF>
void close_window(const void* kv, const void* gate, int64_t w, int64_t m, int64_t d, int overlap, const void* ape,
                  const void* prev_kv, const void* prev_gate, const float* norm, float eps, const float* inv_freq,
                  int64_t half, int64_t position, void* out, std::vector<float>& ks, std::vector<float>& gs,
                  std::vector<float>& pooled, std::vector<float>& mx, std::vector<float>& sum) {
  const int64_t od = overlap ? 2 * d : d, S = overlap ? 2 * m : m;
  ks.resize(S * d);
  gs.resize(S * d);
  pooled.resize(d);
  // slot s's kv and gated logit per channel: with overlap, slots [0, m) the previous window's first series
  // (channels [0, d); the state's for window 0, empty when there is none), slots [m, 2m) this window's second
  for (int64_t s = 0; s < S; s++) {
    const bool prev = overlap && s < m;
    float *k = ks.data() + s * d, *g = gs.data() + s * d;
    if (prev && w == 0) {  // the state's previous window (or none: empty slots)
      for (int64_t c = 0; c < d; c++) k[c] = prev_kv ? load_float(prev_kv, s * d + c, BF) : 0.0f;
      for (int64_t c = 0; c < d; c++) g[c] = prev_gate ? load_float(prev_gate, s * d + c, BF) : -INFINITY;
      continue;
    }
    const int64_t row = prev ? (w - 1) * m + s : w * m + (s - (overlap ? m : 0));
    const int64_t at = row * od + (overlap && !prev ? d : 0), bias = (row % m) * od + (overlap && !prev ? d : 0);
    for (int64_t c = 0; c < d; c++) k[c] = load_float(kv, at + c, BF);
    for (int64_t c = 0; c < d; c++)
      g[c] = round_if_bf16(load_float(gate, at + c, BF) + load_float(ape, bias + c, BF), BF);
  }
  // softmax over the slots per channel (float32), the weights in the dtype, the gated sum: slots outer, channels
  // inner (the loops over channels vectorize; each channel's sums still run over the slots in order)
  mx.assign(d, -INFINITY);
  sum.assign(d, 0.0f);
  std::fill(pooled.begin(), pooled.end(), 0.0f);
  for (int64_t s = 0; s < S; s++)
    for (int64_t c = 0; c < d; c++) mx[c] = std::max(mx[c], gs[s * d + c]);
  for (int64_t s = 0; s < S; s++)
    for (int64_t c = 0; c < d; c++) gs[s * d + c] = std::exp(gs[s * d + c] - mx[c]);
  for (int64_t s = 0; s < S; s++)
    for (int64_t c = 0; c < d; c++) sum[c] += gs[s * d + c];
  for (int64_t s = 0; s < S; s++)
    for (int64_t c = 0; c < d; c++)
      pooled[c] += round_if_bf16(ks[s * d + c] * round_if_bf16(gs[s * d + c] / sum[c], BF), BF);
  for (int64_t c = 0; c < d; c++) pooled[c] = round_if_bf16(pooled[c], BF);
  std::vector<char> normed(d * (BF ? 2 : 4));
  if (BF) {
    std::vector<uint16_t> p(d);
    for (int64_t c = 0; c < d; c++) p[c] = float_to_bf16(pooled[c]);
    rowops::rms_row<true>(p.data(), d, norm, eps, 0, normed.data());
  } else {
    rowops::rms_row<false>(pooled.data(), d, norm, eps, 0, normed.data());
  }
  const int64_t first = d - 2 * half;  // the rotation at the window's first position, as ds4py_rope_rows
  for (int64_t c = 0; c < first; c++) rowops::store(out, c, load_float(normed.data(), c, BF), BF);
  for (int64_t i = 0; i < half; i++) {
    const float angle = (float)position * inv_freq[i];
    const float co = std::cos(angle), si = std::sin(angle);
    const float a = load_float(normed.data(), first + 2 * i, BF), b = load_float(normed.data(), first + 2 * i + 1, BF);
    rowops::store(out, first + 2 * i, a * co - b * si, BF);
    rowops::store(out, first + 2 * i + 1, a * si + b * co, BF);
  }
}
}  // namespace

// n windows of m tokens closing: kv, gate [n * m, od] (contiguous; od = 2d with overlap, else d), ape [m, od] in
// the same dtype (bf16 bits when bf, else float32); prev_kv, prev_gate [m, d]: the last closed window's first
// series, its gate already biased (overlap; null: none yet, its slots empty). Window w's entry, out row w [d]:
// gate + ape rounded; the slots (overlap: the previous window's first series, then this one's second; else its
// m rows); per channel the softmax over them in float32, rounded; the sum of kv * weight (each product rounded,
// summed in float32 in slot order, rounded); the RMS norm with norm [d] float32 and eps; the last 2 * half
// channels rotated by angle position * inv_freq[i], position = first + w * m. Windows split over the threads.
extern "C" int ds4py_compress_windows(const void* kv, const void* gate, int64_t n, int64_t m, int64_t d, int overlap,
                                      const void* ape, const void* prev_kv, const void* prev_gate, const float* norm,
                                      float eps, const float* inv_freq, int64_t half, int64_t first, int bf,
                                      void* out) {
  if (2 * half > d) return 1;
  try {
    const size_t es = bf ? 2 : 4;
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * d)), [&](int64_t w0, int64_t w1) {
      std::vector<float> ks, gs, pooled, mx, sum;
      for (int64_t w = w0; w < w1; w++) {
        void* row = (char*)out + w * d * es;
        if (bf) close_window<true>(kv, gate, w, m, d, overlap, ape, prev_kv, prev_gate, norm, eps, inv_freq, half,
                                   first + w * m, row, ks, gs, pooled, mx, sum);
        else close_window<false>(kv, gate, w, m, d, overlap, ape, prev_kv, prev_gate, norm, eps, inv_freq, half,
                                 first + w * m, row, ks, gs, pooled, mx, sum);
      }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}

typedef int (*PairFn)(const void* x, int bf, int64_t n, const void* a, const void* b, void* ya, void* yb);

// One decoding token through a compressor: its two projections (pair: the kernels library's ds4py_linear_pair, with
// its Matrix structs a and b; n = x's width) into row p of the pending window's rows kv, gate [m, od]; when that
// row closes the window (p == m - 1), its entry into `entry` [d] as ds4py_compress_windows makes it (prev_kv,
// prev_gate: the previous window's first series, or null) and, with overlap, this window's first series into
// next_kv, next_gate [m, d] (the gate biased by ape, rounded). Returns nonzero where the projections fail.
extern "C" int ds4py_compress_step(const void* x, int bf, int64_t n, void* pair, const void* a, const void* b,
                                   void* kv, void* gate, int64_t p, int64_t m, int64_t d, int overlap,
                                   const void* ape, const void* prev_kv, const void* prev_gate, const float* norm,
                                   float eps, const float* inv_freq, int64_t half, int64_t first, void* entry,
                                   void* next_kv, void* next_gate) {
  const size_t es = bf ? 2 : 4;
  const int64_t od = overlap ? 2 * d : d;
  if (p < 0 || p >= m || 2 * half > d) return 1;
  int rc = ((PairFn)pair)(x, bf, n, a, b, (char*)kv + p * od * es, (char*)gate + p * od * es);
  if (rc || p != m - 1) return rc;
  try {
    std::vector<float> ks, gs, pooled, mx, sum;
    if (bf) close_window<true>(kv, gate, 0, m, d, overlap, ape, prev_kv, prev_gate, norm, eps, inv_freq, half, first,
                               entry, ks, gs, pooled, mx, sum);
    else close_window<false>(kv, gate, 0, m, d, overlap, ape, prev_kv, prev_gate, norm, eps, inv_freq, half, first,
                             entry, ks, gs, pooled, mx, sum);
    if (overlap)
      for (int64_t s = 0; s < m; s++)
        for (int64_t c = 0; c < d; c++) {
          std::memcpy((char*)next_kv + (s * d + c) * es, (const char*)kv + (s * od + c) * es, es);
          const float g = load_float(gate, s * od + c, bf) + load_float(ape, s * od + c, bf);
          rowops::store(next_gate, s * d + c, round_if_bf16(g, bf), bf);
        }
  } catch (...) {
    return 2;
  }
  return 0;
}
