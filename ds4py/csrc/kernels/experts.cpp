namespace {
#include "swiglu.h"

// N rows [r0, r0 + N) of one matrix (ggml rows at w with row stride `stride`, or R16 groups of `cols` values;
// N a multiple of 16) against activation rows [t0, t0 + tt): y[t * ystride + r].
template <int N>
void rows_tile(const uint8_t* w, int q, int64_t stride, int64_t r0, int64_t cols, const Acts& a, const Acts16& a16,
               int64_t t0, int tt, float* y, int64_t ystride) {
  if (q == MXFP4_R16) {
    for (int g = 0; g < N / 16; g++)
      r16_tile(w + (r0 / 16 + g) * (cols / 32 * R16_BLOCK), a16, t0, tt, y + 16 * g, ystride);
    return;
  }
  for (int r = 0; r < N; r++) {
    const uint8_t* row = w + (r0 + r) * stride;
    if (q == Q8_0) row_tile<Q8_0>(row, a, t0, tt, y + r, ystride);
    else row_tile<MXFP4>(row, a, t0, tt, y + r, ystride);
  }
}
}  // namespace

namespace {
// x [n] float32 times the rows of w -> y [rows]: ds4py_ggml_linear's values for one row of ggml rows (Q8_0, MXFP4),
// ds4py_bf16_linear's / ds4py_f32_linear's for BF16_ROWS / F32_ROWS (float32, or rounded to bf16 bits when bf)
// (groups > 1: x [groups * n], group g's rows / groups rows times its g-th n values, as ds4py_ggml_linear's groups)
void linear_row(int q, const float* x, int64_t n, const uint8_t* w, int64_t rows, int64_t wstride, void* y, int bf,
                int64_t groups = 1) {
  std::vector<float> yf(bf ? rows : 0);
  float* yp = bf ? yf.data() : (float*)y;
  if (float_rows(q)) {
    const int64_t rg = rows / groups;
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t* wg = w + g * rg * wstride;
      const int rc = q == F32_ROWS ? ds4py_f32_linear(x + g * n, 1, n, (const float*)wg, rg, wstride / 4, yp + g * rg)
                                   : ds4py_bf16_linear(x + g * n, 1, n, (const uint16_t*)wg, rg, wstride / 2,
                                                       yp + g * rg);
      if (rc) throw std::bad_alloc();  // (their only failure)
    }
  } else {
    ggml_linear_f32(q, x, 1, n, w, rows, wstride, yp, groups);
  }
  if (bf)
    for (int64_t i = 0; i < rows; i++) ((uint16_t*)y)[i] = float_to_bf16(yf[i]);
}
}  // namespace

namespace {
// ds4py_experts_one on x already float32 (xf [n]); throws std::bad_alloc
void experts_one_impl(const float* xf, int64_t n, int E, const int64_t* mats, const int32_t* qtypes,
                      const int64_t* strides, const int64_t* inter, const float* weights, float limit, int64_t D,
                      void* out, int outbf16) {
  if (std::any_of(qtypes, qtypes + 3 * E, float_rows)) {  // plain matrices: one product at a time (`linear_row`)
    std::vector<float> y(D, 0.0f), part(D);
    for (int e = 0; e < E; e++) {
      std::vector<float> h(inter[e]), up(inter[e]);
      const uint8_t* const* m = (const uint8_t* const*)(mats + 3 * e);
      linear_row(qtypes[3 * e], xf, n, m[0], inter[e], strides[3 * e], h.data(), 0);
      linear_row(qtypes[3 * e + 1], xf, n, m[1], inter[e], strides[3 * e + 1], up.data(), 0);
      swiglu_rows(h.data(), up.data(), inter[e], limit);
      linear_row(qtypes[3 * e + 2], h.data(), inter[e], m[2], D, strides[3 * e + 2], part.data(), 0);
      for (int64_t d = 0; d < D; d++) y[d] += weights[e] * part[d];  // the experts in order, as below
    }
    for (int64_t d = 0; d < D; d++) {
      if (outbf16) ((uint16_t*)out)[d] = float_to_bf16(y[d]);
      else ((float*)out)[d] = y[d];
    }
    return;
  }
  Acts ax;  // x for ggml rows and for R16 groups
  Acts16 ax16;
  quantize_acts(xf, 1, n, ax);
  quantize_acts16(xf, 1, n, ax16);
  // 16 rows of matrix m of expert e from row r0 against a (x or h), into dst[0..16)
  auto rows16 = [&](int e, int m, int64_t r0, int64_t cols, const Acts& a, const Acts16& a16, float* dst) {
    rows_tile<16>((const uint8_t*)mats[3 * e + m], qtypes[3 * e + m], strides[3 * e + m], r0, cols, a, a16, 0, 1,
                  dst, 1);
  };
  std::vector<int64_t> first(E + 1, 0);  // expert e's gate/up rows are [first[e], first[e + 1]) of all
  for (int e = 0; e < E; e++) first[e + 1] = first[e] + inter[e];
  std::vector<float> h(first[E]), up(first[E]);
  dynamic_for(first[E] / 16, grain_for(32 * n, 2), [&](int64_t u0, int64_t u1) {  // 16 gate + 16 up rows
    for (int e = 0; e < E; e++) {
      const int64_t a = std::max(u0 * 16, first[e]), b = std::min(u1 * 16, first[e + 1]);
      for (int m = 0; m < 2; m++)
        for (int64_t i = a; i < b; i += 16) rows16(e, m, i - first[e], n, ax, ax16, (m == 0 ? h : up).data() + i);
      if (b > a) swiglu_rows(h.data() + a, up.data() + a, b - a, limit);
    }
  });
  std::vector<Acts> ah(E);
  std::vector<Acts16> ah16(E);
  for (int e = 0; e < E; e++) {
    if (qtypes[3 * e + 2] == MXFP4_R16) quantize_acts16(h.data() + first[e], 1, inter[e], ah16[e]);
    else quantize_acts(h.data() + first[e], 1, inter[e], ah[e]);
  }
  std::vector<float> y(D, 0.0f);
  dynamic_for(D / 16, grain_for(16 * first[E], 2), [&](int64_t u0, int64_t u1) {  // 16 rows of every W2
    float part[16];
    for (int e = 0; e < E; e++)  // the experts in order for every row
      for (int64_t u = u0; u < u1; u++) {
        rows16(e, 2, u * 16, inter[e], ah[e], ah16[e], part);
        for (int r = 0; r < 16; r++) y[u * 16 + r] += weights[e] * part[r];
      }
  });
  for (int64_t d = 0; d < D; d++) {
    if (outbf16) ((uint16_t*)out)[d] = float_to_bf16(y[d]);
    else ((float*)out)[d] = y[d];
  }
}

bool expert_qtype(int32_t q) { return q == Q8_0 || q == MXFP4 || q == MXFP4_R16 || float_rows(q); }

enum Score { SQRTSOFTPLUS = 0, SIGMOID = 1, SOFTMAX = 2 };

// One token's routing from its router logits [E] (scores [E] scratch): the scores (sqrt(softplus), sigmoid or
// softmax, as torch computes them up to the last bit of exp / log1p), the k experts of the largest scores + bias
// (ties to the lower id), or the k given hash ids; ids[k] ascending and w[k] their scores / (sum + 1e-20) *
// scaling, summed in that order.
void route_row(const float* logits, int64_t E, const float* bias, int score, int k, float scaling,
               const int64_t* hash_ids, float* scores, float* w, int64_t* ids) {
  if (score == SOFTMAX) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; e++) mx = std::max(mx, logits[e]);
    for (int64_t e = 0; e < E; e++) sum += scores[e] = std::exp(logits[e] - mx);
    for (int64_t e = 0; e < E; e++) scores[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; e++) {
      const float v = logits[e];
      scores[e] = score == SIGMOID ? 1.0f / (1.0f + std::exp(-v))
                                   : std::sqrt(v > 20.0f ? v : (float)std::log1p(std::exp((double)v)));
    }
  }
  if (hash_ids) {
    for (int j = 0; j < k; j++) ids[j] = hash_ids[j];
  } else {  // k passes over E: E = 256, k = 6 in V4
    for (int j = 0; j < k; j++) {
      int64_t best = -1;
      float bv = -INFINITY;
      for (int64_t e = 0; e < E; e++) {
        bool taken = false;
        for (int i = 0; i < j; i++) taken |= ids[i] == e;
        const float v = bias ? scores[e] + bias[e] : scores[e];
        if (!taken && (best < 0 || v > bv)) best = e, bv = v;
      }
      ids[j] = best;
    }
  }
  std::sort(ids, ids + k);
  float sum = 0.0f;
  for (int j = 0; j < k; j++) sum += w[j] = scores[ids[j]];
  for (int j = 0; j < k; j++) w[j] = w[j] / (sum + 1e-20f) * scaling;
}
}  // namespace

// One token x [n] (float32, or bf16 bits) through E experts (the routed ones it chose, then the shared ones):
// out [D] = sum_e weights[e] * W2_e swiglu(W1_e x, W3_e x), float32 inside, rounded once to bf16 if outbf16.
// Expert e's matrices are mats[3e + m] for m = W1, W3, W2, with qtypes[3e + m] (Q8_0, MXFP4, MXFP4_R16, or
// BF16_ROWS / F32_ROWS: then every expert's products one by one, `linear_row`) and
// row strides strides[3e + m] bytes (ggml rows; R16 matrices are contiguous groups); W1/W3 have inter[e] rows of
// n values, W2 has D rows of inter[e] values; inter[e] and D are multiples of 16.
// One parallel pass over all gate/up rows of all experts, then one over the output rows: two thread-pool
// rounds where the matmuls one by one took 3E. Work is split in units of 16 rows (an R16 group); each thread
// reads its rows of one matrix after the other (one stream at a time).
extern "C" int ds4py_experts_one(const void* x, int xbf16, int64_t n, int E, const int64_t* mats,
                                 const int32_t* qtypes, const int64_t* strides, const int64_t* inter,
                                 const float* weights, float limit, int64_t D, void* out, int outbf16) {
  if (n % 32 || D % 16) return 1;
  for (int e = 0; e < E; e++) {
    if (inter[e] % 32) return 1;
    for (int m = 0; m < 3; m++)
      if (!expert_qtype(qtypes[3 * e + m])) return 1;
  }
  try {
    std::vector<float> xf(n);
    widen_to_float(x, xbf16, n, xf.data());
    experts_one_impl(xf.data(), n, E, mats, qtypes, strides, inter, weights, limit, D, out, outbf16);
  } catch (...) {
    return 2;
  }
  return 0;
}

// T rows of router logits [T, E] -> w [T, k] float32 and ids [T, k] int64, as route_row (hash_ids: [T, k] or null).
extern "C" int ds4py_route(const float* logits, int64_t T, int64_t E, const float* bias, int score, int k,
                           float scaling, const int64_t* hash_ids, float* w, int64_t* ids) {
  if (k < 1 || k > E || score < SQRTSOFTPLUS || score > SOFTMAX) return 1;
  if (hash_ids)
    for (int64_t i = 0; i < T * k; i++)
      if (hash_ids[i] < 0 || hash_ids[i] >= E) return 1;
  try {  // tokens split over the threads (a prompt's: ~200 ns each); one token runs inline
    at::parallel_for(0, T, grain_for(16 * E, 1), [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(E);
      for (int64_t t = t0; t < t1; t++)
        route_row(logits + t * E, E, bias, score, k, scaling, hash_ids ? hash_ids + t * k : nullptr, scores.data(),
                  w + t * k, ids + t * k);
    });
  } catch (...) {
    return 2;
  }
  return 0;
}

