// What one token's attention projections need, fixed for a layer (built once in Python, `kernels.ProjectPlan`).
struct ProjectPlan {
  int64_t D, q_lora, H, hd;             // model width, q_lora_rank, heads, head_dim
  const uint8_t* w[3];                  // wq_a [q_lora, D], wq_b [H * hd, q_lora], wkv [hd, D]: ggml rows
  int64_t strides[3];                   // their row strides (bytes)
  int32_t qtypes[3];                    // Q8_0 or MXFP4
  const void* q_norm;                   // [q_lora], float32 or bf16 bits (q_norm_bf)
  const void* kv_norm;                  // [hd], likewise
  int32_t q_norm_bf, kv_norm_bf;
  float eps;
};

// One token's attention projections in one call, the values of Attention.project's calls one by one
// (ggml_linear, row_kernels' norms and rotation): q_residual [q_lora] = rms_norm(wq_a x) * q_norm; per head
// q = rms_norm(wq_b q_residual) (unweighted); kv = rms_norm(wkv x) * kv_norm; then q's heads and kv, as
// qkv [H + 1, hd], rotated by rot [half] (cos, sin) pairs. x and the outputs float32, or bf16 bits when bf.
extern "C" int ds4py_project_one(const ProjectPlan* p, const void* x, int bf, const float* rot, int64_t half,
                                 void* q_residual, void* qkv) {
  const int64_t D = p->D, ql = p->q_lora, H = p->H, hd = p->hd;
  if (D % 32 || ql % 32 || 2 * half > hd) return 1;
  for (int m = 0; m < 3; m++)
    if (!row_kind(p->qtypes[m])) return 1;
  try {
    const size_t es = bf ? 2 : 4;
    std::vector<float> xf(std::max(D, ql));
    std::vector<char> a(ql * es), b(H * hd * es), c((H + 1) * hd * es);  // x's dtype, as the torch tensors are
    widen_to_float(x, bf, D, xf.data());
    linear_row(p->qtypes[0], xf.data(), D, p->w[0], ql, p->strides[0], a.data(), bf);
    ds4py_rms_rows(a.data(), bf, 1, ql, p->q_norm, p->q_norm_bf, p->eps, 0, q_residual);
    widen_to_float(q_residual, bf, ql, xf.data());
    linear_row(p->qtypes[1], xf.data(), ql, p->w[1], H * hd, p->strides[1], b.data(), bf);
    ds4py_rms_rows(b.data(), bf, H, hd, nullptr, 0, p->eps, bf, c.data());  // c: q's heads, then kv
    widen_to_float(x, bf, D, xf.data());
    linear_row(p->qtypes[2], xf.data(), D, p->w[2], hd, p->strides[2], a.data(), bf);
    ds4py_rms_rows(a.data(), bf, 1, hd, p->kv_norm, p->kv_norm_bf, p->eps, 0, c.data() + H * hd * es);
    ds4py_rope_rows(c.data(), bf, 1, H + 1, hd, half, rot, 0, qkv);
  } catch (...) {
    return 2;
  }
  return 0;
}

// One token's attention output projection in one call, the values of Attention.output's two calls: the grouped
// wo_a (group g's rows times the g-th n values of out [groups * n]) into o [groups * rg], then wo_b [D, groups * rg]
// times o -> y [D]. out and y float32, or bf16 bits when bf (o rounded to bf16 between, as the tensor is).
extern "C" int ds4py_output_one(const void* out, int bf, int64_t groups, int64_t n, const uint8_t* wo_a, int qa,
                                int64_t rows_a, int64_t stride_a, const uint8_t* wo_b, int qb, int64_t D,
                                int64_t stride_b, void* y) {
  if (n % 32 || rows_a % groups || rows_a % 32 || !row_kind(qa) || !row_kind(qb)) return 1;
  try {
    std::vector<float> xf(std::max(groups * n, rows_a));
    std::vector<char> o(rows_a * (bf ? 2 : 4));
    widen_to_float(out, bf, groups * n, xf.data());
    linear_row(qa, xf.data(), n, wo_a, rows_a, stride_a, o.data(), bf, groups);
    widen_to_float(o.data(), bf, rows_a, xf.data());
    linear_row(qb, xf.data(), rows_a, wo_b, D, stride_b, y, bf);
  } catch (...) {
    return 2;
  }
  return 0;
}

// A layer's output projections for ds4py_output_one_plan (built once, `kernels.OutputPlan`)
struct OutputPlan {
  int64_t groups, n;                  // o_groups, values per group of the attention output
  const uint8_t* wo_a;                // [rows_a, n] ggml rows
  int32_t qa;
  int64_t rows_a, stride_a;
  const uint8_t* wo_b;                // [D, rows_a] ggml rows
  int32_t qb;
  int64_t D, stride_b;
};

// ds4py_output_one with the matrices from a plan: the same call, fewer arguments to convert per token
extern "C" int ds4py_output_one_plan(const OutputPlan* p, const void* out, int bf, void* y) {
  return ds4py_output_one(out, bf, p->groups, p->n, p->wo_a, p->qa, p->rows_a, p->stride_a, p->wo_b, p->qb, p->D,
                          p->stride_b, y);
}

// A matrix as the one-token calls below read it: ggml rows (Q8_0 / MXFP4), bf16 bits (BF16_ROWS) or float32
// (F32_ROWS); stride: bytes between rows.
struct Matrix {
  const void* w;
  int32_t kind;
  int64_t rows, cols, stride;
};

namespace {
// y [rows] = W x for one row x [n] (float32): the values of ds4py_ggml_linear / ds4py_bf16_linear /
// ds4py_f32_linear for T = 1, then rounded to bf16 bits when bf. Returns nonzero for a kind it does not take.
int matvec(const Matrix& m, const float* x, int64_t n, void* y, int bf) {
  if (m.cols != n || !row_kind(m.kind) || (!float_rows(m.kind) && n % 32)) return 1;
  linear_row(m.kind, x, n, (const uint8_t*)m.w, m.rows, m.stride, y, bf);
  return 0;
}
}  // namespace

// One token's products of the same x [n] (float32, or bf16 bits when bf) with two matrices a, b -> ya [a.rows],
// yb [b.rows] in x's dtype, written where the caller says (a compressor's pending window).
extern "C" int ds4py_linear_pair(const void* x, int bf, int64_t n, const Matrix* a, const Matrix* b, void* ya,
                                 void* yb) {
  try {
    std::vector<float> xf(n);
    widen_to_float(x, bf, n, xf.data());
    return matvec(*a, xf.data(), n, ya, bf) || matvec(*b, xf.data(), n, yb, bf) ? 1 : 0;
  } catch (...) {
    return 2;
  }
}

// One token's indexer query: q [H, hd] = wq (H * hd rows) times q_residual [ql], each head's last 2 * half channels
// rotated by rot [half] (cos, sin) pairs as ds4py_rope_rows rotates them; w [H] float32 = (wp [H rows] times
// x [D]) in x's dtype, then times wscale. Inputs and q float32, or bf16 bits when bf.
extern "C" int ds4py_index_query_one(const void* q_residual, int64_t ql, const void* x, int64_t D, int bf,
                                     const Matrix* wq, const Matrix* wp, int64_t H, int64_t hd, const float* rot,
                                     int64_t half, float wscale, void* q, float* w) {
  if (wq->rows != H * hd || wp->rows != H || 2 * half > hd) return 1;
  try {
    const size_t es = bf ? 2 : 4;
    std::vector<float> xf(std::max(ql, D));
    std::vector<char> qr(H * hd * es), wr(H * es);
    widen_to_float(q_residual, bf, ql, xf.data());
    if (matvec(*wq, xf.data(), ql, qr.data(), bf)) return 1;
    ds4py_rope_rows(qr.data(), bf, 1, H, hd, half, rot, 0, q);
    widen_to_float(x, bf, D, xf.data());
    if (matvec(*wp, xf.data(), D, wr.data(), bf)) return 1;
    for (int64_t h = 0; h < H; h++) w[h] = load_float(wr.data(), h, bf) * wscale;
  } catch (...) {
    return 2;
  }
  return 0;
}

// h[i] = the clamped SwiGLU of (h[i], up[i]) for i < n, as the experts compute it (exported for its test)
extern "C" void ds4py_swiglu(float* h, const float* up, int64_t n, float limit) { swiglu_rows(h, up, n, limit); }

extern "C" int ds4py_kernels_simd() { return DS4PY_AVX512 ? 2 : DS4PY_AVX2 ? 1 : 0; }
