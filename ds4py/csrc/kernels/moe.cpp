// What one token's whole MoE needs, fixed for a layer (built once in Python, `kernels.MoEPlan`).
struct MoEPlan {
  int64_t n, E;                  // model width; routed experts
  const float* router;           // [E, n] float32 rows, router_stride floats apart
  int64_t router_stride;
  const float* bias;             // [E] or null
  int32_t score, k;              // Score; experts per token
  float scaling, limit;          // routed weights' scaling; SwiGLU clamp
  int64_t inter;                 // the routed experts' inter size
  int64_t stacks[3];             // W1, W3, W2 stacks: expert e's matrix m at stacks[m] + e * expert_bytes[m]
  int64_t expert_bytes[3];
  int64_t strides[3];            // row strides (bytes)
  int32_t qtypes[3];
  int32_t shared;                // shared experts (at most 4), run after the routed ones with weight 1
  int64_t shared_mats[12], shared_strides[12], shared_inter[4];
  int32_t shared_qtypes[12];
};

// The matrices of the routed experts ids[0..n_ids) (from the plan's stacks) and then, when `shared`, of the plan's
// shared experts, laid out as ds4py_experts_one / _many take them.
namespace {
struct PlanExperts {
  std::vector<int64_t> mats, strides, inter;
  std::vector<int32_t> qtypes;

  PlanExperts(const MoEPlan* p, const int64_t* ids, int64_t n_ids, bool shared) {
    for (int64_t j = 0; j < n_ids; j++) {
      for (int m = 0; m < 3; m++) {
        mats.push_back(p->stacks[m] + ids[j] * p->expert_bytes[m]);
        strides.push_back(p->strides[m]);
        qtypes.push_back(p->qtypes[m]);
      }
      inter.push_back(p->inter);
    }
    for (int s = 0; shared && s < p->shared; s++) {
      for (int m = 0; m < 3; m++) {
        mats.push_back(p->shared_mats[3 * s + m]);
        strides.push_back(p->shared_strides[3 * s + m]);
        qtypes.push_back(p->shared_qtypes[3 * s + m]);
      }
      inter.push_back(p->shared_inter[s]);
    }
  }

  int count() const { return (int)inter.size(); }
};
}  // namespace

// One token x [n] (float32, or bf16 bits) through a layer's MoE in one call: router logits (the float32 products
// of ds4py_f32_linear, the same bits), route_row (hash_ids: the token's k ids, or null), then experts_one on the
// chosen experts in ascending id and the shared ones. out [n] (bf16 if outbf16); w [k], ids [k] the routing.
extern "C" int ds4py_moe_one(const MoEPlan* p, const void* x, int xbf16, const int64_t* hash_ids, void* out,
                             int outbf16, float* w, int64_t* ids) {
  const int64_t n = p->n;
  if (n % 32 || p->inter % 32 || p->k < 1 || p->k > p->E || p->shared < 0 || p->shared > 4) return 1;
  for (int m = 0; m < 3; m++)
    if (!expert_qtype(p->qtypes[m])) return 1;
  for (int s = 0; s < 3 * p->shared; s++)
    if (!expert_qtype(p->shared_qtypes[s]) || p->shared_inter[s / 3] % 32) return 1;
  if (hash_ids)
    for (int j = 0; j < p->k; j++)
      if (hash_ids[j] < 0 || hash_ids[j] >= p->E) return 1;
  try {
    const int64_t kp = (n + 15) / 16 * 16;  // as ds4py_f32_linear pads x
    std::vector<float> xf(kp, 0.0f), logits(p->E), scores(p->E);
    widen_to_float(x, xbf16, n, xf.data());
    row_blocks(F32_DOTS, p->router, p->router_stride, n, xf.data(), kp, 1, p->E, logits.data());
    route_row(logits.data(), p->E, p->bias, p->score, p->k, p->scaling, hash_ids, scores.data(), w, ids);
    const PlanExperts ex(p, ids, p->k, true);
    std::vector<float> weights(w, w + p->k);
    weights.resize(ex.count(), 1.0f);  // the shared experts' weight
    experts_one_impl(xf.data(), n, ex.count(), ex.mats.data(), ex.qtypes.data(), ex.strides.data(), ex.inter.data(),
                     weights.data(), p->limit, n, out, outbf16);
  } catch (...) {
    return 2;
  }
  return 0;
}

namespace {
constexpr int64_t MANY_T = 32;  // an expert with this many tokens runs through `linear`, one matrix at a time
// ds4py_experts_many reads rows 32 at a time (rows_tile<32>), as `linear` keeps them in cache while the tiles of
// activations pass: with 16, a long expert's activations were streamed twice as often (1.5x slower at T=256).

// All rows of one matrix against all activation rows, as one `ggml_linear` call: y [a.T, rows].
void matrix_linear(const uint8_t* w, int q, int64_t stride, int64_t rows, const Acts& a, const Acts16& a16, float* y) {
  if (q == MXFP4_R16) r16_linear(a16, w, rows, y);
  else if (q == Q8_0) linear<Q8_0>(&a, rows, w, rows, stride, y);
  else linear<MXFP4>(&a, rows, w, rows, stride, y);
}

// Units [0, first[E]) of E experts (unit u of expert e: first[e] <= u < first[e + 1]) costing cost[e] each, split
// over the threads in ranges of about equal cost: fn(e, u - first[e]) for every unit.
template <typename Fn>
void balanced(const std::vector<int64_t>& first, const std::vector<int64_t>& cost, Fn fn) {
  const int E = (int)first.size() - 1;
  std::vector<int64_t> acc(E + 1, 0);  // cost before expert e's first unit
  for (int e = 0; e < E; e++) acc[e + 1] = acc[e] + (first[e + 1] - first[e]) * cost[e];
  const int64_t parts = 4 * (int64_t)at::get_num_threads(), total = acc[E];
  if (total == 0) return;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      const int64_t c0 = total * p / parts, c1 = total * (p + 1) / parts;  // this part's cost range
      for (int e = 0; e < E; e++) {
        if (acc[e + 1] <= c0 || acc[e] >= c1 || cost[e] == 0) continue;
        // the units of e whose start cost lies in [c0, c1)
        const int64_t n = first[e + 1] - first[e];
        const int64_t a = std::max<int64_t>(0, (c0 - acc[e] + cost[e] - 1) / cost[e]);
        const int64_t b = std::min<int64_t>(n, (c1 - acc[e] + cost[e] - 1) / cost[e]);
        for (int64_t i = a; i < b; i++) fn(e, i);
      }
    }
  });
}
}  // namespace

// T tokens x [T, n] (float32, or bf16 bits) through their experts, in one call: the E experts as in
// ds4py_experts_one (mats, qtypes, strides, inter), run on P (token, expert) pairs grouped by expert: expert e on
// pairs [pairs[e], pairs[e + 1]), pair p on token tok[p] with weight w[p]. out [T, D] = per token the sum over its
// pairs, in pair order, of w * W2 swiglu(W1 x, W3 x); float32 inside, rounded once to bf16 if outbf16. Each
// expert's matrices are read once for all its tokens (32 rows at a time against tiles of 8 of them), the tokens
// quantized once for every expert, and the work of all experts with few tokens split over the threads by cost:
// seven thread-pool rounds where calling the experts one by one took three per expert and Python's overhead
// around each. An expert with many tokens (a shared one) runs as `linear`, matrix by matrix. accumulate: out is
// a float32 [T, D] sum that the pairs are added to, so experts called in turns (streamed ones, read one by one)
// give the same bits as one call: every value is computed the same way whatever else is in the call.
extern "C" int ds4py_experts_many(const void* x, int xbf16, int64_t T, int64_t n, int E, const int64_t* mats,
                                  const int32_t* qtypes, const int64_t* strides, const int64_t* inter,
                                  const int64_t* pairs, const int64_t* tok, const float* w, float limit, int64_t D,
                                  void* out, int outbf16, int accumulate) {
  if (n % 32 || D % 32 || (accumulate && outbf16)) return 1;
  for (int e = 0; e < E; e++) {
    if (inter[e] % 32 || pairs[e + 1] < pairs[e]) return 1;
    for (int m = 0; m < 3; m++)
      if (qtypes[3 * e + m] != Q8_0 && qtypes[3 * e + m] != MXFP4 && qtypes[3 * e + m] != MXFP4_R16) return 1;
  }
  const int64_t P = pairs[E];
  for (int64_t p = 0; p < P; p++)
    if (tok[p] < 0 || tok[p] >= T) return 1;
  try {
    // buffers kept between calls (per thread): fresh ones of several MB were page-faulted in on every call
    thread_local std::vector<float> s_xg, s_h, s_up, s_y, s_acc;
    float* xg = grow(s_xg, P * n);  // the pairs' tokens, in pair order
    at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; p++)
        for (int64_t i = 0; i < n; i++) {
          const int64_t k = tok[p] * n + i;
          xg[p * n + i] = load_float(x, k, xbf16);
        }
    });
    std::vector<Acts> ax(E);  // expert e's tokens, quantized as its W1/W3 read them
    std::vector<Acts16> ax16(E);
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; e++) {
        const int64_t cnt = pairs[e + 1] - pairs[e];
        if (qtypes[3 * e] == MXFP4_R16 || qtypes[3 * e + 1] == MXFP4_R16)
          quantize_acts16(xg + pairs[e] * n, cnt, n, ax16[e]);
        if (qtypes[3 * e] != MXFP4_R16 || qtypes[3 * e + 1] != MXFP4_R16)
          quantize_acts(xg + pairs[e] * n, cnt, n, ax[e]);
      }
    });
    std::vector<int64_t> hbase(E + 1, 0), units(E + 1, 0), cost(E);
    for (int e = 0; e < E; e++) {
      const int64_t cnt = pairs[e + 1] - pairs[e];
      hbase[e + 1] = hbase[e] + cnt * inter[e];
      units[e + 1] = units[e] + 2 * (inter[e] / 32);  // W1's groups of 32 rows, then W3's
      // ~ the tiles' work, and reading the rows; experts with many tokens go matrix by matrix through `linear`:
      // the shared expert of a 256-token chunk ran 1.1x faster so (compute-bound, each thread on its own rows)
      cost[e] = cnt && cnt < MANY_T ? cnt + 4 : 0;
    }
    float *h = grow(s_h, hbase[E]), *up = grow(s_up, hbase[E]);  // expert e: [cnt, inter[e]] from hbase[e]
    for (int e = 0; e < E; e++)
      if (pairs[e + 1] - pairs[e] >= MANY_T)
        for (int m = 0; m < 2; m++)
          matrix_linear((const uint8_t*)mats[3 * e + m], qtypes[3 * e + m], strides[3 * e + m], inter[e], ax[e],
                        ax16[e], (m == 0 ? h : up) + hbase[e]);
    balanced(units, cost, [&](int e, int64_t u) {
      const int64_t I = inter[e], m = u < I / 32 ? 0 : 1, r0 = (u - m * (I / 32)) * 32, cnt = pairs[e + 1] - pairs[e];
      float* dst = (m == 0 ? h : up) + hbase[e];
      for (int64_t t0 = 0; t0 < cnt; t0 += TILE_T)
        rows_tile<32>((const uint8_t*)mats[3 * e + m], qtypes[3 * e + m], strides[3 * e + m], r0, n, ax[e], ax16[e],
                      t0, (int)std::min<int64_t>(TILE_T, cnt - t0), dst + t0 * I + r0, I);
    });
    at::parallel_for(0, hbase[E], 4096, [&](int64_t k0, int64_t k1) {
      swiglu_rows(h + k0, up + k0, k1 - k0, limit);
    });
    std::vector<Acts> ah(E);  // expert e's hidden rows: the activations of its W2
    std::vector<Acts16> ah16(E);
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; e++) {
        const int64_t cnt = pairs[e + 1] - pairs[e];
        if (qtypes[3 * e + 2] == MXFP4_R16) quantize_acts16(h + hbase[e], cnt, inter[e], ah16[e]);
        else quantize_acts(h + hbase[e], cnt, inter[e], ah[e]);
      }
    });
    float* y = grow(s_y, P * D);  // pair p's expert output
    for (int e = 0; e < E; e++)
      if (pairs[e + 1] - pairs[e] >= MANY_T)
        matrix_linear((const uint8_t*)mats[3 * e + 2], qtypes[3 * e + 2], strides[3 * e + 2], D, ah[e], ah16[e],
                      y + pairs[e] * D);
    std::vector<int64_t> dunits(E + 1, 0);
    for (int e = 0; e < E; e++) dunits[e + 1] = dunits[e] + D / 32;
    balanced(dunits, cost, [&](int e, int64_t u) {
      const int64_t cnt = pairs[e + 1] - pairs[e];
      for (int64_t t0 = 0; t0 < cnt; t0 += TILE_T)
        rows_tile<32>((const uint8_t*)mats[3 * e + 2], qtypes[3 * e + 2], strides[3 * e + 2], u * 32, inter[e],
                      ah[e], ah16[e], t0, (int)std::min<int64_t>(TILE_T, cnt - t0), y + (pairs[e] + t0) * D + u * 32,
                      D);
    });
    float* acc = accumulate ? (float*)out : grow(s_acc, T * D);
    at::parallel_for(0, D / 16, 1, [&](int64_t c0, int64_t c1) {  // every token's pairs in pair order
      const int64_t d0 = c0 * 16, d1 = c1 * 16;
      if (!accumulate)
        for (int64_t t = 0; t < T; t++) std::fill(acc + t * D + d0, acc + t * D + d1, 0.0f);
      for (int64_t p = 0; p < P; p++) {
        float* o = acc + tok[p] * D;
        const float* yp = y + p * D;
        for (int64_t d = d0; d < d1; d++) o[d] += w[p] * yp[d];
      }
      if (!accumulate)
        for (int64_t t = 0; t < T; t++)
          for (int64_t d = d0; d < d1; d++) {
            if (outbf16) ((uint16_t*)out)[t * D + d] = float_to_bf16(acc[t * D + d]);
            else ((float*)out)[t * D + d] = acc[t * D + d];
          }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}

// T tokens' routed experts (ids [T, k] into the plan's stacks, weights w [T, k]) and, when `shared`, the plan's
// shared experts on every token, in one ds4py_experts_many call: the pairs grouped by expert in ascending id, the
// tokens ascending within one (a stable sort of the flattened ids), the shared ones after: the pairs and order
// MoE.fused_many hands ds4py_experts_many, so the same bits.
extern "C" int ds4py_moe_many(const MoEPlan* p, const void* x, int xbf16, int64_t T, const int64_t* ids,
                              const float* w, int shared, void* out, int outbf16) {
  const int64_t k = p->k, E = p->E, P = T * k, S = shared ? p->shared : 0;
  for (int64_t i = 0; i < P; i++)
    if (ids[i] < 0 || ids[i] >= E) return 1;
  try {
    std::vector<int64_t> next(E + 1, 0);  // where expert e's pairs start, then the next free slot
    for (int64_t i = 0; i < P; i++) next[ids[i] + 1]++;
    std::vector<int64_t> counts(next.begin() + 1, next.end());
    for (int64_t e = 0; e < E; e++) next[e + 1] += next[e];
    std::vector<int64_t> tok(P + S * T);
    std::vector<float> wts(P + S * T, 1.0f);
    for (int64_t i = 0; i < P; i++) {
      const int64_t j = next[ids[i]]++;
      tok[j] = i / k;
      wts[j] = w[i];
    }
    std::vector<int64_t> used, pairs(1, 0);  // the experts with pairs, ascending; where each one's pairs end
    for (int64_t e = 0; e < E; e++) {
      if (!counts[e]) continue;
      used.push_back(e);
      pairs.push_back(pairs.back() + counts[e]);
    }
    for (int64_t s = 0; s < S; s++) {
      pairs.push_back(pairs.back() + T);
      for (int64_t t = 0; t < T; t++) tok[P + s * T + t] = t;
    }
    const PlanExperts ex(p, used.data(), (int64_t)used.size(), S > 0);
    return ds4py_experts_many(x, xbf16, T, p->n, ex.count(), ex.mats.data(), ex.qtypes.data(), ex.strides.data(),
                              ex.inter.data(), pairs.data(), tok.data(), wts.data(), p->limit, p->n, out, outbf16, 0);
  } catch (...) {
    return 2;
  }
}

