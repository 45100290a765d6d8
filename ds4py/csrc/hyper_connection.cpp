
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include "bf16.h"
#include "row_ops.h"

namespace {
// one token's mix [(2 + hc) * hc] -> pre [hc], post [hc] and comb [hc, hc] before Sinkhorn-Knopp: the sigmoids
// and each comb row's softmax, + eps
void hc_gates(const float* m, int hc, const float* base, const float* scale, float eps, float* pr, float* po,
              float* c) {
  for (int i = 0; i < hc; i++) {
    pr[i] = 1.0f / (1.0f + std::exp(-(m[i] * scale[0] + base[i]))) + eps;
    po[i] = 2.0f * (1.0f / (1.0f + std::exp(-(m[hc + i] * scale[1] + base[hc + i]))));
  }
  for (int i = 0; i < hc; i++) {  // softmax over each row, then + eps
    float* r = c + i * hc;
    float mx = -INFINITY;
    for (int j = 0; j < hc; j++) {
      r[j] = m[2 * hc + i * hc + j] * scale[2] + base[2 * hc + i * hc + j];
      mx = r[j] > mx ? r[j] : mx;
    }
    float s = 0.0f;
    for (int j = 0; j < hc; j++) { r[j] = std::exp(r[j] - mx); s += r[j]; }
    for (int j = 0; j < hc; j++) r[j] = r[j] / s + eps;
  }
}

// Sinkhorn-Knopp on one token's comb [hc, hc]: columns normalised every iteration, rows every one but the first
void sinkhorn(float* c, int hc, int iters, float eps) {
  for (int it = 0; it < iters; it++) {
    if (it > 0) {
      for (int i = 0; i < hc; i++) {
        float s = 0.0f;
        for (int j = 0; j < hc; j++) s += c[i * hc + j];
        for (int j = 0; j < hc; j++) c[i * hc + j] /= s + eps;
      }
    }
    for (int j = 0; j < hc; j++) {
      float s = 0.0f;
      for (int i = 0; i < hc; i++) s += c[i * hc + j];
      for (int i = 0; i < hc; i++) c[i * hc + j] /= s + eps;
    }
  }
}

// `sinkhorn` of G tokens' [4, 4] combs side by side (c [G, 16]), each comb one 16-lane vector (GCC / Clang vector
// extension): a row's or a column's sum is four lane shuffles added in the scalar loop's order (0 + first, then
// the rest), and each step's divisions are one vector division, so the values are the scalar loop's bit for bit.
// The G tokens' chains of divisions overlap: V4's hc = 4; a 512-token chunk's 20 iterations took ~165 us alone.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

template <int G>
void sinkhorn4(float* c, int iters, float eps) {
  // lane k = 4 i + j: row i's lanes replicate entry (i, jj) for jj = 0..3 (row sums), column j's entry (ii, j)
  const v16i row_of[4] = {{0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12},
                          {1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13},
                          {2, 2, 2, 2, 6, 6, 6, 6, 10, 10, 10, 10, 14, 14, 14, 14},
                          {3, 3, 3, 3, 7, 7, 7, 7, 11, 11, 11, 11, 15, 15, 15, 15}};
  const v16i col_of[4] = {{0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3},
                          {4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7},
                          {8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11},
                          {12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15}};
  const v16f zero = {}, e = zero + eps;
  v16f m[G];
  std::memcpy(m, c, sizeof m);
  for (int it = 0; it < iters; it++) {
    if (it > 0)
      for (int g = 0; g < G; g++) {
        v16f sum = zero + __builtin_shuffle(m[g], row_of[0]);
        for (int j = 1; j < 4; j++) sum += __builtin_shuffle(m[g], row_of[j]);
        m[g] /= sum + e;
      }
    for (int g = 0; g < G; g++) {
      v16f sum = zero + __builtin_shuffle(m[g], col_of[0]);
      for (int i = 1; i < 4; i++) sum += __builtin_shuffle(m[g], col_of[i]);
      m[g] /= sum + e;
    }
  }
  std::memcpy(c, m, sizeof m);
}

// the mixing weights of tokens [t0, t1): their mix [t1 - t0, (2 + hc) * hc] -> pre, post [T, hc], comb [T, hc, hc]
void hc_weights_range(const float* mix, int64_t t0, int64_t t1, int hc, const float* base, const float* scale,
                      int iters, float eps, float* pre, float* post, float* comb) {
  const int row = (2 + hc) * hc;
  for (int64_t t = t0; t < t1; t++)
    hc_gates(mix + (t - t0) * row, hc, base, scale, eps, pre + t * hc, post + t * hc, comb + t * hc * hc);
  int64_t t = t0;
  if (hc == 4)
    for (; t + 8 <= t1; t += 8) sinkhorn4<8>(comb + t * 16, iters, eps);
  for (; t < t1; t++) {
    if (hc == 4) sinkhorn4<1>(comb + t * 16, iters, eps);
    else sinkhorn(comb + t * hc * hc, hc, iters, eps);
  }
}
}  // namespace

extern "C" void ds4py_hc_weights(const float* mix, int64_t T, int hc, const float* base, const float* scale,
                                 int iters, float eps, float* pre, float* post, float* comb) {
  // tokens are independent: long inputs (prefill) split them over threads; one token runs inline
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    hc_weights_range(mix + t0 * ((2 + hc) * hc), t0, t1, hc, base, scale, iters, eps, pre, post, comb);
  });
}

template <bool BF>
inline float load_value(const void* p, int64_t i) {
  return load_float(p, i, BF);
}

template <bool BF>
inline void store_value(void* p, int64_t i, float f) {
  if (BF) ((uint16_t*)p)[i] = float_to_bf16(f);
  else ((float*)p)[i] = f;
}

namespace {
// The projection's dot products: each (token, row) summed in 16 lanes fused over n (lane l takes i % 16 == l),
// then the lanes in order, then the tail. project_block makes TT tokens' (flat [TT, n], n apart) sums with RR rows
// (w [RR, n], n apart) side by side, out[t * ostride + r]; the blocking changes no value. With AVX-512 each lane
// group is one 64-byte vector; elsewhere two 32-byte halves (GCC kept 64-byte vectors on AVX2 in memory: a
// 512-token chunk's projections took 8.4 ms on one thread).
//
// project_chunk: the lane sums over `len` values (a multiple of 16), carried in memory (`project_chunked` passes a
// chunk at a time): TT tokens' values f (fstride apart) times RR rows' w (wstride apart), token t / row r's 16
// lanes at L + t * lstride + 16 * r, loaded, each lane fused with its products in order, stored back
#if defined(__AVX512F__)
constexpr int PR_TOKENS = 4, PR_ROWS = 4, PR_ROWS1 = 8;  // (rows side by side for one token)

template <int TT, int RR>
inline void project_chunk(const float* f, int64_t fstride, const float* w, int64_t wstride, int64_t len, float* L,
                          int64_t lstride) {
  auto load = [](const float* p) {
    v16f v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  v16f acc[TT][RR];
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < RR; r++) acc[t][r] = load(L + t * lstride + 16 * r);
  for (int64_t i = 0; i < len; i += 16) {
    v16f wv[RR];
    for (int r = 0; r < RR; r++) wv[r] = load(w + r * wstride + i);
    for (int t = 0; t < TT; t++) {
      const v16f x = load(f + t * fstride + i);
      for (int r = 0; r < RR; r++) acc[t][r] += x * wv[r];
    }
  }
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < RR; r++) std::memcpy(L + t * lstride + 16 * r, &acc[t][r], 64);
}
#else
constexpr int PR_TOKENS = 2, PR_ROWS = 2, PR_ROWS1 = 4;
typedef float v8f __attribute__((vector_size(32)));

template <int TT, int RR>
inline void project_chunk(const float* f, int64_t fstride, const float* w, int64_t wstride, int64_t len, float* L,
                          int64_t lstride) {
  auto load = [](const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  v8f lo[TT][RR], hi[TT][RR];
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < RR; r++)
      lo[t][r] = load(L + t * lstride + 16 * r), hi[t][r] = load(L + t * lstride + 16 * r + 8);
  for (int64_t i = 0; i < len; i += 16) {
    v8f wl[RR], wh[RR];
    for (int r = 0; r < RR; r++) wl[r] = load(w + r * wstride + i), wh[r] = load(w + r * wstride + i + 8);
    for (int t = 0; t < TT; t++) {
      const v8f xl = load(f + t * fstride + i), xh = load(f + t * fstride + i + 8);
      for (int r = 0; r < RR; r++) lo[t][r] += xl * wl[r], hi[t][r] += xh * wh[r];
    }
  }
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < RR; r++)
      std::memcpy(L + t * lstride + 16 * r, &lo[t][r], 32), std::memcpy(L + t * lstride + 16 * r + 8, &hi[t][r], 32);
}
#endif

template <int TT, int RR>
inline void project_block(const float* flat, int64_t n, const float* w, float* out, int64_t ostride) {
  float lanes[TT][RR][16] = {};  // [token][row]
  project_chunk<TT, RR>(flat, n, w, n, n / 16 * 16, &lanes[0][0][0], RR * 16);
  for (int t = 0; t < TT; t++) {
    float sum[RR] = {};
    for (int l = 0; l < 16; l++)  // the rows' lane sums side by side, each still in lane order
      for (int r = 0; r < RR; r++) sum[r] += lanes[t][r][l];
    for (int r = 0; r < RR; r++) {
      for (int64_t i = n / 16 * 16; i < n; i++) sum[r] += flat[t * n + i] * w[r * n + i];
      out[t * ostride + r] = sum[r];
    }
  }
}

// mix[j - j0] = fn row j . flat (n values) for rows [j0, j1): PR_ROWS1 rows at a time (independent chains), then
// one by one, each summed as alone
void project_rows(const float* flat, int64_t n, const float* fn, int64_t j0, int64_t j1, float* mix) {
  int64_t j = j0;
  for (; j + PR_ROWS1 <= j1; j += PR_ROWS1) project_block<1, PR_ROWS1>(flat, n, fn + j * n, mix + j - j0, 0);
  for (; j < j1; j++) project_block<1, 1>(flat, n, fn + j * n, mix + j - j0, 0);
}

// project_rows of four tokens at once (flat [4, n] -> mix [4, rows]): rows by tokens side by side, so each load of
// fn serves several tokens; every (token, row) sum is made exactly as project_rows makes it
void project_rows4(const float* flat, int64_t n, const float* fn, int64_t rows, float* mix) {
  int64_t j = 0;
  for (; j + PR_ROWS <= rows; j += PR_ROWS)
    for (int t = 0; t < 4; t += PR_TOKENS)
      project_block<PR_TOKENS, PR_ROWS>(flat + t * n, n, fn + j * n, mix + t * rows + j, rows);
  for (int t = 0; t < 4; t++) project_rows(flat + t * n, n, fn, j, rows, mix + t * rows + j);
}

// Chunks of the projection's values: fn's rows for one (24 x 1024 float32, 96 KB) stay in L2 while every four
// tokens pass, where whole rows (V4 Flash: 24 of 16384, 1.5 MB) came from L3 again for each four.
constexpr int64_t PR_CHUNK = 1024;
constexpr int64_t PR_CHUNKED_BYTES = 1 << 18;  // fn larger than this: prompts' projections go by chunks

// The projection of tokens [t0, t1) (streams [T, n] as stored, each token's values times its norm's scale rs[t -
// t0]) by fn [rows, n], chunk by chunk -> mix [t1 - t0, rows]: each (token, row) in the lanes, order and tail of
// project_block, so the same bits as project_rows of the normed values
template <bool BF>
void project_chunked(const void* streams, int64_t t0, int64_t t1, int64_t n, const float* fn, int rows,
                     const float* rs, float* mix) {
  const int64_t nt = t1 - t0, n16 = n / 16 * 16;
  std::vector<float> lanes(nt * rows * 16, 0.0f), f(4 * PR_CHUNK);  // token t, row j: lanes + (t * rows + j) * 16
  for (int64_t c0 = 0; c0 < n16; c0 += PR_CHUNK) {
    const int64_t len = std::min(PR_CHUNK, n16 - c0);
    for (int64_t tq = 0; tq < nt; tq += 4) {
      const int q = (int)std::min<int64_t>(4, nt - tq);
      for (int s = 0; s < q; s++) {  // the four tokens' chunk, normed as the whole rows are
        const int64_t off = (t0 + tq + s) * n + c0;
        const float r = rs[tq + s];
        for (int64_t i = 0; i < len; i++) f[s * PR_CHUNK + i] = load_value<BF>(streams, off + i) * r;
      }
      float* L = lanes.data() + tq * rows * 16;
      int j = 0;
      if (q == 4)
        for (; j + PR_ROWS <= rows; j += PR_ROWS)
          for (int t = 0; t < 4; t += PR_TOKENS)
            project_chunk<PR_TOKENS, PR_ROWS>(f.data() + t * PR_CHUNK, PR_CHUNK, fn + j * n + c0, n, len,
                                              L + (t * rows + j) * 16, rows * 16);
      for (int s = 0; s < q; s++)
        for (int jj = j; jj < rows; jj++)
          project_chunk<1, 1>(f.data() + s * PR_CHUNK, PR_CHUNK, fn + jj * n + c0, n, len, L + (s * rows + jj) * 16,
                              rows * 16);
    }
  }
  for (int64_t t = 0; t < nt; t++) {
    const int64_t off = (t0 + t) * n;
    for (int64_t i = n16; i < n; i++) f[i - n16] = load_value<BF>(streams, off + i) * rs[t];  // the tail, normed
    for (int j = 0; j < rows; j++) {
      const float* l = lanes.data() + (t * rows + j) * 16;
      float sum = 0.0f;
      for (int k = 0; k < 16; k++) sum += l[k];
      for (int64_t i = n16; i < n; i++) sum += f[i - n16] * fn[j * n + i];
      mix[t * rows + j] = sum;
    }
  }
}
}  // namespace

// head: the final collapse (HyperHead): fn has only the hc rows of pre, and post / comb are not made
template <bool BF>
void hc_collapse(const void* streams, int64_t T, int hc, int64_t D, const float* fn, const float* base,
                 const float* scale, int iters, float hc_eps, float norm_eps, void* x, float* pre, float* post,
                 float* comb, bool head = false) {
  const int rows = head ? hc : (2 + hc) * hc;
  const int64_t n = hc * D;
  // several tokens: split over the threads (each token's projection then runs on one); one token: its projection's
  // rows split over the threads. Every value is computed the same way either way.
  const bool chunked = T > 1 && rows * n * 4 > PR_CHUNKED_BYTES;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
  std::vector<float> flat(chunked ? 0 : (T > 1 ? 4 : 1) * n), mix((t1 - t0) * rows), acc(D), rs(chunked ? t1 - t0 : 0);
  if (chunked) {  // the norms' scales first (the same sums as below), then the projection by chunks
    for (int64_t t = t0; t < t1; t++) {
      double lanes[8] = {};
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        float v[8];
        for (int l = 0; l < 8; l++) v[l] = load_value<BF>(streams, t * n + i + l);
        for (int l = 0; l < 8; l++) lanes[l] += (double)v[l] * v[l];
      }
      for (; i < n; i++) {
        const float v = load_value<BF>(streams, t * n + i);
        lanes[0] += (double)v * v;
      }
      double ss = 0.0;
      for (int l = 0; l < 8; l++) ss += lanes[l];
      rs[t - t0] = 1.0f / std::sqrt((float)(ss / n) + norm_eps);
    }
    project_chunked<BF>(streams, t0, t1, n, fn, rows, rs.data(), mix.data());
  }
  for (int64_t t = chunked ? t1 : t0; t < t1; t++) {
    const int64_t off = t * n;
    const int slot = T > 1 ? (int)((t - t0) % 4) : 0;  // several tokens: normed four at a time, then projected
    float* f = flat.data() + slot * n;
    double lanes[8] = {};  // the mean of squares, in float64 so the order of the sum does not matter
    for (int64_t i = 0; i < n; i++) f[i] = load_value<BF>(streams, off + i);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; l++) lanes[l] += (double)f[i + l] * f[i + l];
    for (; i < n; i++) lanes[0] += (double)f[i] * f[i];
    double ss = 0.0;
    for (int l = 0; l < 8; l++) ss += lanes[l];
    const float r = 1.0f / std::sqrt((float)(ss / n) + norm_eps);
    for (int64_t i = 0; i < n; i++) f[i] *= r;
    float* mx = mix.data() + (t - t0) * rows;
    if (T > 1) {  // (this thread's tokens)
      if (slot == 3) project_rows4(flat.data(), n, fn, rows, mx - 3 * rows);
      else if (t == t1 - 1)
        for (int s = 0; s <= slot; s++) project_rows(flat.data() + s * n, n, fn, 0, rows, mx - (slot - s) * rows);
    } else {
      at::parallel_for(0, rows, std::max<int64_t>(8, 32768 / n), [&](int64_t j0, int64_t j1) {  // small: one thread
        project_rows(f, n, fn, j0, j1, mx + j0);
      });
    }
  }
  if (head) {
    for (int64_t t = t0; t < t1; t++)
      for (int k = 0; k < hc; k++)
        pre[t * hc + k] = 1.0f / (1.0f + std::exp(-(mix[(t - t0) * rows + k] * scale[0] + base[k]))) + hc_eps;
  } else {
    hc_weights_range(mix.data(), t0, t1, hc, base, scale, iters, hc_eps, pre, post, comb);
  }
  for (int64_t t = t0; t < t1; t++) {
    const int64_t off = t * n;
    const float* p = pre + t * hc;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int k = 0; k < hc; k++)
      for (int64_t d = 0; d < D; d++) acc[d] += p[k] * load_value<BF>(streams, off + k * D + d);
    for (int64_t d = 0; d < D; d++) store_value<BF>(x, t * D + d, acc[d]);
  }
  });
}

template <bool BF>
void hc_expand(const void* out, const void* streams, int64_t T, int hc, int64_t D, const float* post,
               const float* comb, void* next) {
  // tokens split over threads in chunks of ~64K values; one token (decoding) runs inline
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / (hc * D)), [&](int64_t t0, int64_t t1) {
  std::vector<float> acc(D);
  for (int64_t t = t0; t < t1; t++) {
    const float* po = post + t * hc;
    const float* c = comb + t * hc * hc;
    for (int k = 0; k < hc; k++) {
      for (int64_t d = 0; d < D; d++) acc[d] = po[k] * load_value<BF>(out, t * D + d);
      for (int j = 0; j < hc; j++) {
        const float w = c[j * hc + k];
        for (int64_t d = 0; d < D; d++) acc[d] += w * load_value<BF>(streams, (t * hc + j) * D + d);
      }
      for (int64_t d = 0; d < D; d++) store_value<BF>(next, (t * hc + k) * D + d, acc[d]);
    }
  }
  });
}

// streams [T, hc, D] (float32, or bf16 bits when bf16) -> x [T, D] (same dtype) = sum_k pre_k * streams_k,
// with pre, post [T, hc] and comb [T, hc, hc] from the normed streams' projection by fn [(2 + hc) * hc, hc * D].
// w (float32, or bf16 bits when wbf) given: also normed [T, D] = the block's RMS norm of x with weight w and
// out_eps, as ds4py_rms_rows computes it from x.
extern "C" int ds4py_hc_collapse(const void* streams, int bf16, int64_t T, int hc, int64_t D, const float* fn,
                                 const float* base, const float* scale, int iters, float hc_eps, float norm_eps,
                                 void* x, float* pre, float* post, float* comb, const void* w, int wbf,
                                 float out_eps, void* normed) {
  try {
    std::vector<char> xs(x ? 0 : T * D * (bf16 ? 2 : 4));  // x and pre may be null (not wanted): scratch then
    std::vector<float> ps(pre ? 0 : T * hc);
    if (!x) x = xs.data();
    if (!pre) pre = ps.data();
    if (bf16) hc_collapse<true>(streams, T, hc, D, fn, base, scale, iters, hc_eps, norm_eps, x, pre, post, comb);
    else hc_collapse<false>(streams, T, hc, D, fn, base, scale, iters, hc_eps, norm_eps, x, pre, post, comb);
    if (w) ds4py_rms_rows(x, bf16, T, D, w, wbf, out_eps, 0, normed);
  } catch (...) {
    return 2;
  }
  return 0;
}

// The final collapse (HyperHead) of streams [T, hc, D] -> x [T, D] = sum_k pre_k * streams_k with pre [T, hc] =
// sigmoid(the normed streams' projection by fn [hc, hc * D] * scale[0] + base) + hc_eps, then normed [T, D] = the
// output norm of x (weight w, out_eps) as ds4py_rms_rows computes it.
extern "C" int ds4py_hc_head(const void* streams, int bf16, int64_t T, int hc, int64_t D, const float* fn,
                             const float* base, const float* scale, float hc_eps, float norm_eps, void* x, float* pre,
                             const void* w, int wbf, float out_eps, void* normed) {
  try {
    std::vector<char> xs(x ? 0 : T * D * (bf16 ? 2 : 4));  // x and pre may be null (not wanted): scratch then
    std::vector<float> ps(pre ? 0 : T * hc);
    if (!x) x = xs.data();
    if (!pre) pre = ps.data();
    if (bf16) hc_collapse<true>(streams, T, hc, D, fn, base, scale, 0, hc_eps, norm_eps, x, pre, nullptr, nullptr, 1);
    else hc_collapse<false>(streams, T, hc, D, fn, base, scale, 0, hc_eps, norm_eps, x, pre, nullptr, nullptr, 1);
    ds4py_rms_rows(x, bf16, T, D, w, wbf, out_eps, 0, normed);
  } catch (...) {
    return 2;
  }
  return 0;
}

// ds4py_hc_expand, then ds4py_hc_collapse of its result (the next sub-block's collapse, with fn / base / scale and
// the norm w), in one call: the same values as the two calls. next [T, hc, D]; normed [T, D]; post, comb as
// ds4py_hc_collapse writes them (the expand reads its own post_in / comb_in first).
extern "C" int ds4py_hc_expand_collapse(const void* out, const void* streams, int bf16, int64_t T, int hc, int64_t D,
                                        const float* post_in, const float* comb_in, void* next, const float* fn,
                                        const float* base, const float* scale, int iters, float hc_eps,
                                        float norm_eps, float* post, float* comb, const void* w, int wbf,
                                        float out_eps, void* normed) {
  if (bf16) hc_expand<true>(out, streams, T, hc, D, post_in, comb_in, next);
  else hc_expand<false>(out, streams, T, hc, D, post_in, comb_in, next);
  return ds4py_hc_collapse(next, bf16, T, hc, D, fn, base, scale, iters, hc_eps, norm_eps, nullptr, nullptr, post,
                           comb, w, wbf, out_eps, normed);
}

// A connection's fixed parameters for ds4py_hc_expand_collapse_plan (built once, `hc_kernel.HcPlan`).
struct HcPlan {
  int64_t hc, D;
  const float *fn, *base, *scale;  // float32, contiguous
  int32_t iters;
  float hc_eps, norm_eps;
  const void* w;                   // the sub-block's norm weight [D], float32 or bf16 bits (wbf)
  int32_t wbf;
  float out_eps;
};

// ds4py_hc_expand_collapse with the collapse's parameters from a plan: the same call, fewer arguments.
extern "C" int ds4py_hc_expand_collapse_plan(const HcPlan* p, const void* out, const void* streams, int bf16,
                                             int64_t T, const float* post_in, const float* comb_in, void* next,
                                             float* post, float* comb, void* normed) {
  return ds4py_hc_expand_collapse(out, streams, bf16, T, (int)p->hc, p->D, post_in, comb_in, next, p->fn, p->base,
                                  p->scale, p->iters, p->hc_eps, p->norm_eps, post, comb, p->w, p->wbf, p->out_eps,
                                  normed);
}

// ds4py_hc_collapse of T tokens' streams with its parameters and the sub-block's norm from a plan -> post, comb and
// the normed x (x and pre not kept): the call `hc_collapse` makes with a norm.
extern "C" int ds4py_hc_collapse_plan(const HcPlan* p, const void* streams, int bf16, int64_t T, float* post,
                                      float* comb, void* normed) {
  return ds4py_hc_collapse(streams, bf16, T, (int)p->hc, p->D, p->fn, p->base, p->scale, p->iters, p->hc_eps,
                           p->norm_eps, nullptr, nullptr, post, comb, p->w, p->wbf, p->out_eps, normed);
}

// A decoding block's second half in one call: its attention output projections (`output` = the kernels'
// ds4py_output_one_plan on `out_plan`), the expand of their result into the streams and the ffn's collapse
// (ds4py_hc_expand_collapse_plan on hc), then the MoE (`moe` = ds4py_moe_one on `moe_plan`): the three calls'
// code in their order, so their values. heads [1, H * hd], streams [1, hc, D], y / normed / moe_out [1, D]
// (all float32, or all bf16 bits when bf16). Returns 0, or 100 / 200 / 300 + the failing call's code.
typedef int (*OutputOneFn)(const void*, const void*, int, void*);
typedef int (*MoeOneFn)(const void*, const void*, int, const int64_t*, void*, int, float*, int64_t*);
extern "C" int ds4py_ffn_one(const void* output, const void* out_plan, const HcPlan* hc, const void* moe,
                             const void* moe_plan, const void* heads, int bf16, const void* streams,
                             const float* post_in, const float* comb_in, const int64_t* hash_ids, void* y,
                             void* next, float* post, float* comb, void* normed, void* moe_out, float* w,
                             int64_t* ids) {
  int rc = ((OutputOneFn)output)(out_plan, heads, bf16, y);
  if (rc) return 100 + rc;
  rc = ds4py_hc_expand_collapse_plan(hc, y, streams, bf16, 1, post_in, comb_in, next, post, comb, normed);
  if (rc) return 200 + rc;
  rc = ((MoeOneFn)moe)(moe_plan, normed, bf16, hash_ids, moe_out, bf16, w, ids);
  return rc ? 300 + rc : 0;
}

// out [T, D], streams [T, hc, D] (both float32, or both bf16 bits) -> next [T, hc, D]:
// next_k = post_k * out + sum_j comb[j, k] * streams_j, in float32, rounded once.
extern "C" void ds4py_hc_expand(const void* out, const void* streams, int bf16, int64_t T, int hc, int64_t D,
                                const float* post, const float* comb, void* next) {
  if (bf16) hc_expand<true>(out, streams, T, hc, D, post, comb, next);
  else hc_expand<false>(out, streams, T, hc, D, post, comb, next);
}
