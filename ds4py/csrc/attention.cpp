
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "bf16.h"
#include "rotation.h"

namespace {
// a query's share of a prompt's call below this many multiply-adds goes with others to one thread
constexpr int64_t PAR_MIN_WORK = 32768;

constexpr int64_t LANES = 16;  // keys per block of logits, values per block of an output (head_dim % 16 == 0)

struct Scratch {  // one thread's buffers, kept between calls
  std::vector<float> kf, kt, qf, p;
  void fit(int64_t C, int64_t L, int64_t H, int64_t hd) {
    const int64_t ct = hd * (C + LANES);
    if ((int64_t)kf.size() < C * hd) kf.resize(C * hd);
    if ((int64_t)kt.size() < ct) kt.resize(ct);
    if ((int64_t)p.size() < H * (L + 1)) p.resize(H * (L + 1));
    if ((int64_t)qf.size() < H * hd) qf.resize(H * hd);
  }
};

// n keys (rows of hd, float32 or bf16 bits) -> float32 rows [n, hd] (the weighted sum) and transposed [hd, ld]
// with ld = n + LANES, zero past n (the logits: a block of 16 keys' logits is one vector of sums over d, read
// past the last key without leaving the row)
void widen_keys(const void* const* src, int bf, int64_t n, int64_t hd, float* rows, float* t) {
  const int64_t ld = n + LANES;
  for (int64_t j = 0; j < n; j++) widen_to_float(src[j], bf, hd, rows + j * hd);
  for (int64_t d = 0; d < hd; d++) {
    for (int64_t j = 0; j < n; j++) t[d * ld + j] = rows[j * hd + d];
    std::fill(t + d * ld + n, t + (d + 1) * ld, 0.0f);
  }
}

// The window's keys widened both ways (`widen_keys`). A prompt's queries share them: once per call, not per query.
struct Keys {
  std::vector<float> rows, t;
  int64_t ld = 0;
  void fill(const void* keys, int bf, int64_t n, int64_t hd) {
    std::vector<const void*> src(n);
    for (int64_t j = 0; j < n; j++) src[j] = (const char*)keys + j * hd * (bf ? 2 : 4);
    rows.resize(n * hd);
    t.resize(hd * (n + LANES));
    ld = n + LANES;
    widen_keys(src.data(), bf, n, hd, rows.data(), t.data());
  }
};

// 16 floats as one value (GCC/Clang vector extension: one AVX-512 register, or what the target has); each lane's
// arithmetic is the scalar code's, so sums keep their order and bits
#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(4 * LANES)));
inline void madd(v16& acc, float s, const v16& v) { acc += s * v; }  // fused: s * v + acc rounded once
#else
// two 32-byte halves (GCC kept 64-byte vectors in memory on AVX2), the same fused steps lane by lane
typedef float v8 __attribute__((vector_size(32)));
struct v16 {
  v8 lo, hi;
};
inline void madd(v16& acc, float s, const v16& v) {
  acc.lo += s * v.lo;
  acc.hi += s * v.hi;
}
#endif
static_assert(sizeof(v16) == 4 * LANES, "v16 holds 16 floats");
inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// logits p[h * P + j0 + j] = sum over d (in order) of q[h, d] * keys_t[d, j] for j < n: blocks of 16 keys
// summed in one vector (the keys' transposed rows of stride ld, readable 16 past n)
inline void logits_block(const float* qf, int64_t H, int64_t hd, const float* keys_t, int64_t ld, int64_t n,
                         float* p, int64_t P, int64_t j0) {
  auto put = [&](const v16& acc, int64_t h, int64_t b) {
    float lanes[LANES];
    std::memcpy(lanes, &acc, sizeof lanes);
    for (int64_t l = 0; l < std::min(LANES, n - b); l++) p[h * P + j0 + b + l] = lanes[l];
  };
  for (int64_t b = 0; b < n; b += LANES) {
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) {  // four heads' chains side by side, one load of the keys
      v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      const float* q0 = qf + h * hd;
      for (int64_t d = 0; d < hd; d++) {
        const v16 k = load16(keys_t + d * ld + b);
        madd(a0, q0[d], k);
        madd(a1, q0[hd + d], k);
        madd(a2, q0[2 * hd + d], k);
        madd(a3, q0[3 * hd + d], k);
      }
      put(a0, h, b), put(a1, h + 1, b), put(a2, h + 2, b), put(a3, h + 3, b);
    }
    for (; h < H; h++) {
      v16 acc = {};
      for (int64_t d = 0; d < hd; d++) madd(acc, qf[h * hd + d], load16(keys_t + d * ld + b));
      put(acc, h, b);
    }
  }
}

// acc (16 output values from d0) += sum over j (in order) of p[j] * rows[j, d0 .. d0 + 16), rows [n, hd]
inline v16 weighted16(v16 acc, const float* p, const float* rows, int64_t n, int64_t hd, int64_t d0) {
  for (int64_t j = 0; j < n; j++) madd(acc, p[j], load16(rows + j * hd + d0));
  return acc;
}

// A head's output row [hd] (float32): its last 2 * half channels rotated by rot ((cos, sin) pairs, conjugated when
// conj: the inverse rotation) as ds4py_rope_rows does, then stored to out as float32, or as bf16 bits when bf.
inline void rotate_store(float* row, int64_t hd, const float* rot, int64_t half, int conj, int bf, void* out) {
  const int64_t first = hd - 2 * half;
  for (int64_t i = 0; i < half; i++) {
    const float a = row[first + 2 * i], b = row[first + 2 * i + 1];
    const float c = rot[2 * i], sn = conj ? -rot[2 * i + 1] : rot[2 * i + 1];
    rotate_pair(a, b, c, sn, row[first + 2 * i], row[first + 2 * i + 1]);
  }
  for (int64_t d = 0; d < hd; d++) {
    if (bf) ((uint16_t*)out)[d] = float_to_bf16(row[d]);
    else ((float*)out)[d] = row[d];
  }
}

// One query's heads q [H, hd] over W window keys (keys' from key w0 on) and C more rows[0..C) (the compressed
// entries, in q's dtype; each key is also the value), the sink per head: out [H, hd] =
// softmax([q.k * scale for every key], sink) @ keys, its last 2 * half channels rotated by rot (conjugated when
// conj: the inverse rotation). apart: the window and the entries summed apart and the two sums added in q's
// dtype, as a prompt's torch ops sum them (else one sum, as the one-token ops' single product). BF: q, the rows
// and out bf16 bits (else float32). hd % 16 == 0. Every sum runs in a fixed order (a logit over d, an output
// value over the window's keys, then the entries'), 16 logits or 16 output values side by side.
template <bool BF>
void attend_query(const void* q, int64_t H, int64_t hd, const Keys& keys, int64_t w0, int64_t W,
                  const void* const* rows, int64_t C, bool apart, const float* sinks, float scale, const float* rot,
                  int64_t half, int conj, void* out, Scratch& s) {
  const int64_t L = W + C, P = L + 1;  // a head's logits, then its sink
  s.fit(C, L, H, hd);
  float *kf = s.kf.data(), *kt = s.kt.data(), *qf = s.qf.data(), *p = s.p.data();
  widen_keys(rows, BF, C, hd, kf, kt);
  widen_to_float(q, BF, H * hd, qf);
  logits_block(qf, H, hd, keys.t.data() + w0, keys.ld, W, p, P, 0);
  logits_block(qf, H, hd, kt, C + LANES, C, p, P, W);
  for (int64_t h = 0; h < H; h++) {
    float* ph = p + h * P;
    float mx = sinks[h];
    // torch: the bf16 matmul's output, then .float() * scale
    for (int64_t j = 0; j < L; j++) ph[j] = round_if_bf16(ph[j], BF) * scale;
    for (int64_t j = 0; j < L; j++) mx = std::max(mx, ph[j]);
    ph[L] = sinks[h];
    for (int64_t j = 0; j <= L; j++) ph[j] = std::exp(ph[j] - mx);
    float sum = 0.0f;
    for (int64_t j = 0; j <= L; j++) sum += ph[j];
    for (int64_t j = 0; j < L; j++) ph[j] = round_if_bf16(ph[j] / sum, BF);  // the probabilities in q's dtype
  }
  std::vector<float>& o = s.qf;  // q is no longer needed: each head's output over it
  for (int64_t h = 0; h < H; h++) {
    float* oh = o.data() + h * hd;
    const float* ph = p + h * P;
    const float* win = keys.rows.data() + w0 * hd;
    for (int64_t d0 = 0; d0 < hd; d0 += LANES) {  // 16 output values at a time
      float a[LANES], c[LANES];
      const v16 acc = weighted16(v16{}, ph, win, W, hd, d0);
      if (apart) {  // the window's sum and the entries' apart, then added
        const v16 e = weighted16(v16{}, ph + W, kf, C, hd, d0);
        std::memcpy(a, &acc, sizeof a);
        std::memcpy(c, &e, sizeof c);
        for (int l = 0; l < LANES; l++)
          oh[d0 + l] = round_if_bf16(round_if_bf16(a[l], BF) + round_if_bf16(c[l], BF), BF);
      } else {
        const v16 all = weighted16(acc, ph + W, kf, C, hd, d0);
        std::memcpy(a, &all, sizeof a);
        for (int l = 0; l < LANES; l++) oh[d0 + l] = round_if_bf16(a[l], BF);
      }
    }
    rotate_store(oh, hd, rot, half, conj, BF, (char*)out + h * hd * (BF ? 2 : 4));
  }
}

void attend_query(const void* q, int64_t H, int64_t hd, const Keys& keys, int64_t w0, int64_t W,
                  const void* const* rows, int64_t C, bool apart, const float* sinks, float scale, const float* rot,
                  int64_t half, int conj, int bf, void* out, Scratch& s) {
  if (bf) attend_query<true>(q, H, hd, keys, w0, W, rows, C, apart, sinks, scale, rot, half, conj, out, s);
  else attend_query<false>(q, H, hd, keys, w0, W, rows, C, apart, sinks, scale, rot, half, conj, out, s);
}

// Many large heads (V4 Flash: 64 of 512 over up to 128 + 512 keys, ~40 M multiply-adds): the heads in blocks of
// HB split over the threads, the keys read as stored (no widened or transposed copies), each key row meeting a
// block's queries in one pass. Per head the values of attend_query with one sum, its sums in another order and
// its exp another polynomial (within 2 ulp): a logit as 16 lanes over d, then the lanes added; an output value
// over the keys in order. 16 bf16 values are read as their 8 even ones and 8 odd ones (a shift and a mask, no
// shuffles); q and the output sums are kept in that order ("lane order") and put back at the end. Where torch
// has no native bf16 GEMM (AVX2, 2 cores) its ops took 2.3-2.9 ms for 640 keys, this 1.8; 0.7-1.0 ms for
// 128, this 0.43.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int64_t HB = 8, JB = 16;

// values d0 .. d0 + 16 of a row: bf16, the even ones in a and the odd ones in b; float32, the first 8 and the next 8
template <bool BF>
inline void load16(const void* row, int64_t d0, f8& a, f8& b) {
  if constexpr (BF) {
    i8 v;
    std::memcpy(&v, (const uint16_t*)row + d0, sizeof v);
    const i8 lo = v << 16, hi = v & (int32_t)0xFFFF0000u;
    std::memcpy(&a, &lo, sizeof a);
    std::memcpy(&b, &hi, sizeof b);
  } else {
    std::memcpy(&a, (const float*)row + d0, sizeof a);
    std::memcpy(&b, (const float*)row + d0 + 8, sizeof b);
  }
}

// where lane order puts value i of a group of 16: lanes 0-7 hold a, 8-15 b
template <bool BF>
inline int64_t lane_of(int64_t i) {
  return BF ? (i % 2) * 8 + i / 2 : i;
}

inline f8 splat(float v) { return f8{} + v; }
inline float sum8(const f8& v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for x <= 0 (a logit minus the maximum), 8 at a time: 2^n * p(r), r = x - n ln 2 in two parts, p the
// degree-6 Taylor polynomial (Cephes' expf); 0 below -87.3 (torch gives denormals there, < 1e-38 of the sum)
inline f8 exp8_nonpositive(f8 x) {
  const f8 xc = x < splat(-87.3f) ? splat(-87.3f) : x;
  f8 n = xc * 1.44269504088896341f;
  for (int l = 0; l < 8; l++) n[l] = std::nearbyint(n[l]);
  const f8 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  f8 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  i8 e = __builtin_convertvector(n, i8) + 127;
  e <<= 23;
  f8 scale;
  std::memcpy(&scale, &e, sizeof scale);
  const f8 out = y * scale;
  return x < splat(-87.3f) ? f8{} : out;
}

template <bool BF>
void attend_heads(const void* q, int64_t H, int64_t hd, const void* const* keys, int64_t L, const float* sinks,
                  float scale, const float* rot, int64_t half, int conj, void* out) {
  const int64_t P = (L + 1 + 7) / 8 * 8, es = BF ? 2 : 4;
  at::parallel_for(0, (H + HB - 1) / HB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qf(HB * hd), p(HB * P), o(HB * hd), row(hd);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t h0 = b * HB, nh = std::min(HB, H - h0);
      std::fill(qf.begin(), qf.end(), 0.0f);
      std::fill(p.begin(), p.end(), 0.0f);  // a missing head's probabilities stay 0
      for (int64_t h = 0; h < nh; h++) {  // q in lane order
        widen_to_float((const char*)q + (h0 + h) * hd * es, BF, hd, row.data());
        for (int64_t d = 0; d < hd; d++) qf[h * hd + d / 16 * 16 + lane_of<BF>(d % 16)] = row[d];
      }
      for (int64_t j = 0; j < L; j++) {  // torch: the bf16 matmul's output, then .float() * scale
        f8 acc[HB] = {};
        for (int64_t d = 0; d < hd; d += 16) {
          f8 ka, kb;
          load16<BF>(keys[j], d, ka, kb);
          for (int h = 0; h < HB; h++) {
            f8 qa, qb;
            load16<false>(qf.data() + h * hd, d, qa, qb);
            acc[h] += ka * qa;
            acc[h] += kb * qb;
          }
        }
        for (int64_t h = 0; h < nh; h++) p[h * P + j] = round_if_bf16(sum8(acc[h]), BF) * scale;
      }
      for (int64_t h = 0; h < nh; h++) {  // the softmax with the sink, as attend_query's
        float* ph = p.data() + h * P;
        float mx = sinks[h0 + h];
        for (int64_t j = 0; j < L; j++) mx = std::max(mx, ph[j]);
        ph[L] = sinks[h0 + h];
        for (int64_t j = L + 1; j < P; j++) ph[j] = -INFINITY;  // exp: 0
        for (int64_t j = 0; j < P; j += 8) {
          f8 v;
          std::memcpy(&v, ph + j, sizeof v);
          v = exp8_nonpositive(v - mx);
          std::memcpy(ph + j, &v, sizeof v);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j <= L; j++) sum += ph[j];
        for (int64_t j = 0; j < L; j++) ph[j] = round_if_bf16(ph[j] / sum, BF);
        for (int64_t j = L; j < P; j++) ph[j] = 0.0f;
      }
      // the weighted sum: 16 values of 4 heads at a time over a block of JB keys (in the first cache level), the
      // float32 sums carried from block to block in o (lane order), so each still runs over the keys in order
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += JB) {
        const int64_t j1 = std::min(L, j0 + JB);
        for (int64_t g = 0; g < HB; g += 4)
          for (int64_t d = 0; d < hd; d += 16) {
            f8 acc[4][2];
            for (int h = 0; h < 4; h++) load16<false>(o.data() + (g + h) * hd, d, acc[h][0], acc[h][1]);
            for (int64_t j = j0; j < j1; j++) {
              f8 ka, kb;
              load16<BF>(keys[j], d, ka, kb);
              for (int h = 0; h < 4; h++) {
                const float pj = p[(g + h) * P + j];
                acc[h][0] += pj * ka;
                acc[h][1] += pj * kb;
              }
            }
            for (int h = 0; h < 4; h++) {
              std::memcpy(o.data() + (g + h) * hd + d, &acc[h][0], sizeof(f8));
              std::memcpy(o.data() + (g + h) * hd + d + 8, &acc[h][1], sizeof(f8));
            }
          }
      }
      for (int64_t h = 0; h < nh; h++) {
        const float* oh = o.data() + h * hd;
        for (int64_t d = 0; d < hd; d++) row[d] = round_if_bf16(oh[d / 16 * 16 + lane_of<BF>(d % 16)], BF);
        rotate_store(row.data(), hd, rot, half, conj, BF, (char*)out + (h0 + h) * hd * es);
      }
    }
  });
}
}  // namespace

// q [H, hd], the window's keys [S, hd] (contiguous), the compressed entries (rows of hd, contiguous): all C
// of them (idx null) or the C rows idx[0..C); sinks [H] float32; rot [half] (cos, sin) pairs. out [H, hd] as
// attend_query with one sum. Returns 0, or 1 for an index outside [0, n).
extern "C" int ds4py_attend_one(const void* q, int64_t H, int64_t hd, const void* win, int64_t S,
                                const void* entries, int64_t n, const int64_t* idx, int64_t C, const float* sinks,
                                float scale, const float* rot, int64_t half, int conj, int bf, void* out) {
  if (idx)
    for (int64_t c = 0; c < C; c++)
      if (idx[c] < 0 || idx[c] >= n) return 1;
  std::vector<const void*> rows(C);  // each entry's first value
  const size_t es = bf ? 2 : 4;
  for (int64_t c = 0; c < C; c++) rows[c] = (const char*)entries + (idx ? idx[c] : c) * hd * es;
  thread_local Scratch s;
  thread_local Keys keys;
  keys.fill(win, bf, S, hd);
  attend_query(q, H, hd, keys, 0, S, rows.data(), C, false, sinks, scale, rot, half, conj, bf, out, s);
  return 0;
}

// ds4py_attend_one's arguments and values (up to float32 summation order) with attend_heads: large heads
// (hd % 16 == 0).
extern "C" int ds4py_attend_heads(const void* q, int64_t H, int64_t hd, const void* win, int64_t S,
                                  const void* entries, int64_t n, const int64_t* idx, int64_t C, const float* sinks,
                                  float scale, const float* rot, int64_t half, int conj, int bf, void* out) {
  if (idx)
    for (int64_t c = 0; c < C; c++)
      if (idx[c] < 0 || idx[c] >= n) return 1;
  const size_t es = bf ? 2 : 4;
  std::vector<const void*> keys(S + C);  // the window's keys, then the entries
  for (int64_t j = 0; j < S; j++) keys[j] = (const char*)win + j * hd * es;
  for (int64_t c = 0; c < C; c++) keys[S + c] = (const char*)entries + (idx ? idx[c] : c) * hd * es;
  if (bf) attend_heads<true>(q, H, hd, keys.data(), S + C, sinks, scale, rot, half, conj, out);
  else attend_heads<false>(q, H, hd, keys.data(), S + C, sinks, scale, rot, half, conj, out);
  return 0;
}

namespace {
// whether a prompt's top indices (count of them, -1: none) are all below n
inline bool tops_below(const int64_t* top, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; i++)
    if (top[i] >= n) return false;
  return true;
}

// a prompt's query r's compressed entries (rows of `bytes`) appended to rows: its indexer's top [R, k] row (-1:
// none), or else (visible non-null) the first visible[r] of them, or none (entries null)
template <typename Row>
void add_entries(std::vector<Row>& rows, int64_t r, const void* entries, int64_t n, int64_t bytes,
                 const int64_t* top, int64_t k, const int64_t* visible) {
  const char* e = (const char*)entries;
  if (top) {
    for (int64_t c = 0; c < k; c++)
      if (top[r * k + c] >= 0) rows.push_back((Row)(e + top[r * k + c] * bytes));
  } else if (entries && visible) {
    for (int64_t c = 0; c < std::min(n, visible[r]); c++) rows.push_back((Row)(e + c * bytes));
  }
}
}  // namespace

// R consecutive queries of a prompt q [R, H, hd] (contiguous), keys [S, hd]: the cached window, then the R
// queries' own keys; query r (its key S - R + r) sees the `window` keys ending at its own, then the compressed
// entries [n, hd]: its indexer's top [R, k] (-1: none), or else (visible non-null) the first visible[r] of them,
// or none (entries null); the sink. rot [R, half] pairs. out [R, H, hd] as attend_query with the window summed
// apart. Queries split over the threads. Returns 0, or 1 for a top index >= n.
extern "C" int ds4py_attend_rows(const void* q, int64_t R, int64_t H, int64_t hd, const void* keys, int64_t S,
                                 int64_t window, const void* entries, int64_t n, const int64_t* top, int64_t k,
                                 const int64_t* visible, const float* sinks, float scale, const float* rot,
                                 int64_t half, int conj, int bf, void* out) {
  if (top && !tops_below(top, R * k, n)) return 1;
  const size_t es = bf ? 2 : 4;
  const int64_t most = top ? k : entries ? n : 0;
  const int64_t grain = std::max<int64_t>(1, PAR_MIN_WORK / std::max<int64_t>(1, H * hd * (window + most)));
  Keys all;
  all.fill(keys, bf, S, hd);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    thread_local Scratch s;
    std::vector<const void*> rows;
    rows.reserve(most);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t own = S - R + r, oldest = std::max<int64_t>(0, own - window + 1);
      rows.clear();
      add_entries(rows, r, entries, n, hd * es, top, k, visible);
      attend_query((const char*)q + r * H * hd * es, H, hd, all, oldest, own - oldest + 1, rows.data(), rows.size(),
                   entries != nullptr, sinks, scale, rot + r * 2 * half, half, conj, bf,
                   (char*)out + r * H * hd * es, s);
    }
  });
  return 0;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define DS4PY_AVX512 1  // for exp.h's exp16
#define DS4PY_AVX2 0
namespace {
#include "exp.h"
#include "heads_dot.h"

// A prompt's queries over large bf16 heads (V4 Flash: 64 of 512 over 128 window keys + 512 entries, ~42 M
// multiply-adds a query) with vdpbf16ps, where torch's bf16 matmuls were the faster code: one query at a time
// per thread, each product over pairs (d + 1 then d for a logit, key j + 1 then j for an output value), float32
// sums. The values are attend_query's with the window summed apart (bf16 logits times the scale, the softmax with
// the sink, bf16 probabilities, the window's and the entries' sums rounded to bf16 and added) up to float32
// summation order and its exp (exp16, a polynomial within 2 ulp).
struct DpScratch {
  std::vector<uint32_t> qp, pair;  // q [hd / 2, Hp] and the probabilities [pairs, Hp]: two bf16 per lane
  std::vector<float> logit, o;     // [L, Hp] (then the exps), [H, hd]
  std::vector<float> sums;         // a block of 64 output values' sums: the window's [H, 64], the entries' [H, 64]
  std::vector<uint16_t> prob;      // [L, Hp] bf16 bits
  std::vector<__m512i> kv;         // a block of 64 output values: [pairs, 4] keys j, j + 1 interleaved
};

// float32 -> bf16 bits in 32-bit lanes, rounded to nearest even as float_to_bf16 (finite values)
inline __m512i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
}

inline __m512 bf16_bits_to_float(__m512i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }

// the logits of keys rows[0..L) for q pairs qp [hd / 2, Hp]: logit[j, h] = bf16(q_h . k_j) * scale, for the
// G groups of 16 heads from group g0 (`heads_dot_bf16`, G <= 4 a pass)
template <int G>
void dp_logits(const uint32_t* qp, int64_t Hp, int64_t g0, int64_t P, const uint16_t* const* rows, int64_t L,
               float scale, float* logit) {
  const __m512 sc = _mm512_set1_ps(scale);
  heads_dot_bf16<G>(qp + 16 * g0, Hp, P, L, [&](int64_t j) { return rows[j]; }, [&](int64_t j, const __m512* acc) {
    for (int g = 0; g < G; g++)
      _mm512_storeu_ps(logit + j * Hp + 16 * (g0 + g), _mm512_mul_ps(bf16_bits_to_float(round_bf16(acc[g])), sc));
  });
}

// out values d0 .. d0 + 64 of every head: sum over keys rows[j0 .. j0 + n) of p[j, h] * k_j (pairs j, j + 1 from
// s.pair rows pr0 on), rounded to bf16 -> sums [H, 64] as floats
void dp_values(const uint16_t* const* rows, int64_t n, int64_t d0, const uint32_t* pair, int64_t Hp, int64_t H,
               std::vector<__m512i>& kv, float* sums) {
  const int64_t np = (n + 1) / 2;
  if ((int64_t)kv.size() < np * 4) kv.resize(np * 4);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; p < np; p++)  // lane i of vector v: (k_j[d0 + 16 v + i], k_j+1[...]), zero past the last key
    for (int v = 0; v < 4; v++) {
      const __m256i a = _mm256_loadu_si256((const __m256i*)(rows[2 * p] + d0 + 16 * v));
      const __m256i b = 2 * p + 1 < n ? _mm256_loadu_si256((const __m256i*)(rows[2 * p + 1] + d0 + 16 * v))
                                      : _mm256_setzero_si256();
      kv[p * 4 + v] = _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
    }
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    const int nh = (int)std::min<int64_t>(4, H - h0);
    __m512 acc[4][4];
    for (int h = 0; h < 4; h++)
      for (int v = 0; v < 4; v++) acc[h][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
      const __m512i* k = kv.data() + p * 4;
      for (int h = 0; h < nh; h++) {
        const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair[p * Hp + h0 + h]);
        for (int v = 0; v < 4; v++) acc[h][v] = _mm512_dpbf16_ps(acc[h][v], (__m512bh)k[v], pv);
      }
    }
    for (int h = 0; h < nh; h++)
      for (int v = 0; v < 4; v++)
        _mm512_storeu_ps(sums + (h0 + h) * 64 + 16 * v, bf16_bits_to_float(round_bf16(acc[h][v])));
  }
}

// one query q [H, hd] (bf16) over rows[0..L) (the window's W keys, then the entries), its sinks: out [H, hd] bf16
// as attend_query<true> with the window summed apart when apart. hd % 64 == 0.
void attend_query_dp(const uint16_t* q, int64_t H, int64_t hd, const uint16_t* const* rows, int64_t W, int64_t L,
                     bool apart, const float* sinks, float scale, const float* rot, int64_t half, int conj,
                     uint16_t* out, DpScratch& s) {
  const int64_t Hp = (H + 15) / 16 * 16, P = hd / 2, C = L - W;
  s.qp.assign(P * Hp, 0u);
  uint32_t* qp = s.qp.data();
  for (int64_t p = 0; p < P; p++)  // (local pointers: no reload of the vector's through the stores)
    for (int64_t h = 0; h < H; h++) std::memcpy(qp + p * Hp + h, q + h * hd + 2 * p, 4);
  s.logit.resize(L * Hp);
  for (int64_t g0 = 0; g0 < Hp / 16; g0 += 4) {
    switch (std::min<int64_t>(4, Hp / 16 - g0)) {
      case 1: dp_logits<1>(s.qp.data(), Hp, g0, P, rows, L, scale, s.logit.data()); break;
      case 2: dp_logits<2>(s.qp.data(), Hp, g0, P, rows, L, scale, s.logit.data()); break;
      case 3: dp_logits<3>(s.qp.data(), Hp, g0, P, rows, L, scale, s.logit.data()); break;
      default: dp_logits<4>(s.qp.data(), Hp, g0, P, rows, L, scale, s.logit.data());
    }
  }
  // the softmax with the sink, 16 heads a vector: the maximum, the exps summed over the keys in order and the
  // sink's last, the probabilities rounded to bf16
  s.prob.resize(L * Hp);
  alignas(64) float sk[16];
  for (int64_t g = 0; g < Hp / 16; g++) {
    for (int l = 0; l < 16; l++) sk[l] = 16 * g + l < H ? sinks[16 * g + l] : 0.0f;
    const __m512 sink = _mm512_load_ps(sk);
    __m512 mx = sink;
    for (int64_t j = 0; j < L; j++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s.logit.data() + j * Hp + 16 * g));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
      float* lj = s.logit.data() + j * Hp + 16 * g;
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(lj), mx));
      _mm512_storeu_ps(lj, e);
      sum = _mm512_add_ps(sum, e);
    }
    sum = _mm512_add_ps(sum, exp16(_mm512_sub_ps(sink, mx)));
    for (int64_t j = 0; j < L; j++) {
      const __m512i b = round_bf16(_mm512_div_ps(_mm512_loadu_ps(s.logit.data() + j * Hp + 16 * g), sum));
      _mm256_storeu_si256((__m256i*)(s.prob.data() + j * Hp + 16 * g), _mm512_cvtepi32_epi16(b));
    }
  }
  // the probabilities in pairs per part (the window's, then the entries'), a zero after an odd part's last
  const int64_t pw = (W + 1) / 2, pc = (C + 1) / 2;
  s.pair.resize((pw + pc) * Hp);
  auto prob16 = [&](int64_t j, int64_t g) {  // key j's probabilities of heads 16 g .. 16 g + 16, in 32-bit lanes
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s.prob.data() + j * Hp + 16 * g)));
  };
  auto pairs = [&](int64_t j0, int64_t n, uint32_t* dst) {
    for (int64_t p = 0; p < (n + 1) / 2; p++)
      for (int64_t g = 0; g < Hp / 16; g++) {
        const __m512i hi = 2 * p + 1 < n ? prob16(j0 + 2 * p + 1, g) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + p * Hp + 16 * g, _mm512_or_si512(prob16(j0 + 2 * p, g), _mm512_slli_epi32(hi, 16)));
      }
  };
  pairs(0, W, s.pair.data());
  pairs(W, C, s.pair.data() + pw * Hp);
  s.o.resize(H * hd);
  s.sums.resize(2 * H * 64);
  float *a = s.sums.data(), *c = a + H * 64;  // [H, 64]: the window's sums, the entries'
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    dp_values(rows, W, d0, s.pair.data(), Hp, H, s.kv, a);
    if (apart && C) dp_values(rows + W, C, d0, s.pair.data() + pw * Hp, Hp, H, s.kv, c);
    for (int64_t h = 0; h < H; h++)
      for (int64_t i = 0; i < 64; i++)
        s.o[h * hd + d0 + i] = apart ? round_if_bf16(a[h * 64 + i] + (C ? c[h * 64 + i] : 0.0f), true)
                                     : a[h * 64 + i];
  }
  for (int64_t h = 0; h < H; h++) rotate_store(s.o.data() + h * hd, hd, rot, half, conj, 1, out + h * hd);
}
}  // namespace

// ds4py_attend_rows for bf16 q, keys and entries (bf = 1) with attend_query_dp (hd % 64 == 0): the same arguments
// and values up to float32 summation order (one token, R = 1: `attend_one` with the window and the entries summed
// apart). Returns 0, or 1 for a top index >= n.
extern "C" int ds4py_attend_rows_dp(const void* q, int64_t R, int64_t H, int64_t hd, const void* keys, int64_t S,
                                    int64_t window, const void* entries, int64_t n, const int64_t* top, int64_t k,
                                    const int64_t* visible, const float* sinks, float scale, const float* rot,
                                    int64_t half, int conj, int /* bf */, void* out) {
  if (top && !tops_below(top, R * k, n)) return 1;
  const uint16_t* kb = (const uint16_t*)keys;
  auto keys_of = [&](int64_t r, std::vector<const uint16_t*>& rows) {  // the window's, then the entries -> W
    const int64_t own = S - R + r, oldest = std::max<int64_t>(0, own - window + 1);
    rows.clear();
    for (int64_t j = oldest; j <= own; j++) rows.push_back(kb + j * hd);
    add_entries(rows, r, entries, n, hd * 2, top, k, visible);
    return own - oldest + 1;
  };
  if (R == 1) {  // one token: its heads split over the threads by 16 (each head's values whatever the split)
    std::vector<const uint16_t*> rows;
    const int64_t W = keys_of(0, rows);
    at::parallel_for(0, (H + 15) / 16, 1, [&](int64_t g0, int64_t g1) {
      thread_local DpScratch s;
      const int64_t h0 = 16 * g0, nh = std::min(H, 16 * g1) - h0;
      attend_query_dp((const uint16_t*)q + h0 * hd, nh, hd, rows.data(), W, (int64_t)rows.size(), entries != nullptr,
                      sinks + h0, scale, rot, half, conj, (uint16_t*)out + h0 * hd, s);
    });
    return 0;
  }
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    thread_local DpScratch s;
    std::vector<const uint16_t*> rows;
    for (int64_t r = r0; r < r1; r++) {
      const int64_t W = keys_of(r, rows);
      attend_query_dp((const uint16_t*)q + r * H * hd, H, hd, rows.data(), W, (int64_t)rows.size(),
                      entries != nullptr, sinks, scale, rot + r * 2 * half, half, conj,
                      (uint16_t*)out + r * H * hd, s);
    }
  });
  return 0;
}
#endif

extern "C" int ds4py_attend_dp() {  // 1 where ds4py_attend_rows_dp is built (AVX512-BF16)
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}
