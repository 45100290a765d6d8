
#include <cstdint>
#include <cstring>

namespace {
typedef int (*HcFn)(const void* plan, const void* out, const void* streams, int bf16, int64_t T, const float* post_in,
                    const float* comb_in, void* next, float* post, float* comb, void* normed);
typedef int (*CollapseFn)(const void* plan, const void* streams, int bf16, int64_t T, float* post, float* comb,
                          void* normed);
typedef int (*ProjectFn)(const void* plan, const void* x, int bf, const float* rot, int64_t half, void* q_residual,
                         void* qkv);
typedef int (*CompressFn)(const void* x, int bf, int64_t n, void* pair, const void* a, const void* b, void* kv,
                          void* gate, int64_t p, int64_t m, int64_t d, int overlap, const void* ape,
                          const void* prev_kv, const void* prev_gate, const float* norm, float eps,
                          const float* inv_freq, int64_t half, int64_t first, void* entry, void* next_kv,
                          void* next_gate);
typedef int (*QueryFn)(const void* q_residual, int64_t ql, const void* x, int64_t D, int bf, const void* wq,
                       const void* wp, int64_t H, int64_t hd, const float* rot, int64_t half, float wscale, void* q,
                       float* w);
typedef int (*TopFn)(const void* q, int qbf, int64_t T, int64_t H, int64_t hd, const float* w, const void* keys,
                     int kbf, int64_t n, int64_t kstride, const int64_t* visible, float scale, int64_t k,
                     float* totals, int64_t* top);
typedef int (*AttendFn)(const void* q, int64_t H, int64_t hd, const void* win, int64_t S, const void* entries,
                        int64_t n, const int64_t* idx, int64_t C, const float* sinks, float scale, const float* rot,
                        int64_t half, int conj, int bf, void* out);
typedef int (*FfnFn)(const void* output, const void* out_plan, const void* hc, const void* moe, const void* moe_plan,
                     const void* heads, int bf16, const void* streams, const float* post_in, const float* comb_in,
                     const int64_t* hash_ids, void* y, void* next, float* post, float* comb, void* normed,
                     void* moe_out, float* w, int64_t* ids);
}  // namespace

// ds4py_compress_step's arguments after x (`block_kernel.Step`; fn null: no compressor)
struct Step {
  void* fn;
  int32_t bf;
  int64_t n;
  void* pair;
  const void* a;
  const void* b;
  void* kv;
  void* gate;
  int64_t p, m, d;
  int32_t overlap;
  const void* ape;
  const void* prev_kv;
  const void* prev_gate;
  const float* norm;
  float eps;
  const float* inv_freq;
  int64_t half, first;
  void* entry;
  void* next_kv;
  void* next_gate;
};

// every argument of a block's calls (`block_kernel.BlockOne`), all float32 or all bf16 bits (bf)
struct BlockOne {
  int32_t bf;
  int64_t D;
  // the attention's collapse (hc_plan's): with the previous block's pending output expanded into the streams
  // first where hc, of the streams alone where collapse (mid = streams then), else x, post_a and comb_a were made
  void* hc;
  void* collapse;
  const void* hc_plan;
  const void* pending;
  const void* streams;
  const float* pending_post;
  const float* pending_comb;
  void* mid;
  float* post_a;
  float* comb_a;
  void* x;
  // the projections; the new key (qkv's last row) copied to window_row, the last of the keys [S, hd]
  void* project;
  const void* project_plan;
  const float* rot;
  int64_t half, H, hd, q_lora;
  void* q_residual;
  void* qkv;
  void* window_row;
  const void* keys;
  int64_t S;
  Step compress, index_compress;
  // the indexer (query null: none, or no entries yet)
  void* query;
  const void* wq;
  const void* wp;
  int64_t index_heads, index_dim;
  const float* index_rot;
  int64_t index_half;
  float wscale;
  void* index_q;
  float* index_w;
  void* top_fn;
  const void* index_keys;
  int64_t index_n, index_stride;
  float index_scale;
  int64_t k;
  float* totals;
  int64_t* top;
  // the attention over the window and the entries (the top-k of them where idx)
  void* attend;
  const void* entries;
  int64_t n;
  const int64_t* idx;
  int64_t C;
  const float* sinks;
  float scale;
  void* heads;
  // hc_kernel's ds4py_ffn_one
  void* ffn;
  void* output;
  const void* out_plan;
  const void* hc_ffn;
  void* moe;
  const void* moe_plan;
  const int64_t* hash_ids;
  void* y;
  void* next;
  float* post;
  float* comb;
  void* normed;
  void* moe_out;
  float* moe_w;
  int64_t* moe_ids;
};

static int step(const Step& s, const void* x) {
  return ((CompressFn)s.fn)(x, s.bf, s.n, s.pair, s.a, s.b, s.kv, s.gate, s.p, s.m, s.d, s.overlap, s.ape, s.prev_kv,
                            s.prev_gate, s.norm, s.eps, s.inv_freq, s.half, s.first, s.entry, s.next_kv, s.next_gate);
}

// The block's calls in `Block.run_one`'s order. Returns 0, or 100 * the failing call (1 collapse, 2 projections,
// 3 / 4 compressors, 5 / 6 indexer, 7 attention, 8 ffn) + its code.
extern "C" int ds4py_block_one(const BlockOne* b) {
  const int bf = b->bf;
  int rc = 0;
  if (b->hc && (rc = ((HcFn)b->hc)(b->hc_plan, b->pending, b->streams, bf, 1, b->pending_post, b->pending_comb,
                                   b->mid, b->post_a, b->comb_a, b->x)))
    return 100 + rc;
  if (!b->hc && b->collapse &&
      (rc = ((CollapseFn)b->collapse)(b->hc_plan, b->streams, bf, 1, b->post_a, b->comb_a, b->x)))
    return 100 + rc;
  if ((rc = ((ProjectFn)b->project)(b->project_plan, b->x, bf, b->rot, b->half, b->q_residual, b->qkv)))
    return 200 + rc;
  const size_t row = (size_t)b->hd * (bf ? 2 : 4);
  if (b->window_row) std::memcpy(b->window_row, (const char*)b->qkv + b->H * row, row);
  if (b->compress.fn && (rc = step(b->compress, b->x))) return 300 + rc;
  if (b->index_compress.fn && (rc = step(b->index_compress, b->x))) return 400 + rc;
  if (b->query) {
    if ((rc = ((QueryFn)b->query)(b->q_residual, b->q_lora, b->x, b->D, bf, b->wq, b->wp, b->index_heads,
                                  b->index_dim, b->index_rot, b->index_half, b->wscale, b->index_q, b->index_w)))
      return 500 + rc;
    if ((rc = ((TopFn)b->top_fn)(b->index_q, bf, 1, b->index_heads, b->index_dim, b->index_w, b->index_keys, bf,
                                 b->index_n, b->index_stride, nullptr, b->index_scale, b->k, b->totals, b->top)))
      return 600 + rc;
  }
  if ((rc = ((AttendFn)b->attend)(b->qkv, b->H, b->hd, b->keys, b->S, b->entries, b->n, b->idx, b->C, b->sinks,
                                  b->scale, b->rot, b->half, 1, bf, b->heads)))
    return 700 + rc;
  if ((rc = ((FfnFn)b->ffn)(b->output, b->out_plan, b->hc_ffn, b->moe, b->moe_plan, b->heads, bf, b->mid,
                            b->post_a, b->comb_a, b->hash_ids, b->y, b->next, b->post, b->comb, b->normed, b->moe_out,
                            b->moe_w, b->moe_ids)))
    return 800 + rc;
  return 0;
}
