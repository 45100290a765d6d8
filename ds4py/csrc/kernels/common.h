
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__) \
    && !defined(DS4PY_GENERIC)
#include <immintrin.h>
#define DS4PY_AVX512 1
#define DS4PY_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && !defined(DS4PY_GENERIC)
// AVX2 + FMA without AVX512-VNNI (most desktop CPUs): the AVX512 code's operations in 256-bit halves, the
// same values where the AVX512 code's sums are kept (the int8 dots are exact; float lanes added in its order)
#include <immintrin.h>
#define DS4PY_AVX512 0
#define DS4PY_AVX2 1
#else
#define DS4PY_AVX512 0
#define DS4PY_AVX2 0
#endif

namespace {

constexpr int Q8_0 = 8, MXFP4 = 39;
constexpr int MXFP4_R16 = 1039;  // not a ggml type: ds4py's id for MXFP4 repacked by 16 rows (R16, below)
// Not ggml types either: a plain matrix's rows as bf16 bits or float32 values (the one-token calls take them)
constexpr int BF16_ROWS = -16, F32_ROWS = -32;
inline bool float_rows(int q) { return q == BF16_ROWS || q == F32_ROWS; }
// The kinds of rows the one-token calls multiply by (`linear_row`)
inline bool row_kind(int q) { return q == Q8_0 || q == MXFP4 || float_rows(q); }
constexpr int TILE_T = 8;      // activation rows sharing one load of a weight block
// `linear`'s tile height for Q8_0 rows: AVX2's 16 registers cannot hold 8 rows' 16 accumulators with the block's
// values, so GCC kept them all on the stack (a load and a store per block pair and row). With 4 rows, Q8_0 products
// at T = 256 (8 x 1024 rows of 4096, grouped, then 4096 rows of 8192) and an R16 one took 432 against 729 ms on 2
// threads, the two builds alternated in one process, the same bits (each row's sum does not depend on the tile).
// MXFP4 rows (their nibbles looked up per block) read 40 ms with 8 rows and 42 with 4 in that run: they keep 8.
template <int QT>
constexpr int row_tile_t() { return DS4PY_AVX512 || QT != Q8_0 ? TILE_T : 4; }
constexpr int64_t CHUNK = 32;  // weight rows kept in cache while all activation tiles pass over them
// A thread's share of a call must reach this many multiply-adds before the call is split over the threads: a
// thread-pool round costs a few us, what one thread does in that time (the tiny model's matrices of a few
// thousand values ran ~40 rounds per decoded token for nothing). Row results do not depend on the split.
constexpr int64_t PAR_MIN_WORK = 32768;

// the grain (items per share) for items of `work` multiply-adds each: `grain`, or more where items are small
inline int64_t grain_for(int64_t work, int64_t grain) {
  return std::max<int64_t>(grain, (PAR_MIN_WORK + std::max<int64_t>(work, 1) - 1) / std::max<int64_t>(work, 1));
}
// fn(i0, i1) over [0, n) in chunks of at least `grain` items (about 16 a thread), each taken by whichever thread
// is free next; split only where a share of `grain` items per thread remains (else one call, on this thread), as
// at::parallel_for's grain. A static split waits at its end for the slower thread: on shared machines one core's
// memory reads lag the other's for a while, and in a decoded token of the 3-layer flash-slice-few the two threads
// waited 4 and 8 ms of 59 (perf) in libgomp. Results do not depend on the split (each item's values are computed
// alone).
template <typename Fn>
void dynamic_for(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nt <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(grain, n / (16 * nt));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(chunk, std::memory_order_relaxed)) < n;) fn(i, std::min(n, i + chunk));
  });
}

constexpr int XQ_OFFSET = DS4PY_AVX512 ? 128 : 0;

// a buffer kept between calls (callers make it thread_local): fresh ones of several MB are page-faulted in on
// every call
inline float* grow(std::vector<float>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

#if DS4PY_AVX512
// 16 float32 lanes -> their 16 bf16, rounded to nearest even as `float_to_bf16` (for values that are not NaN)
inline __m256i bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline void store_bf16x16(__m512 v, uint16_t* o) { _mm256_storeu_si256((__m256i*)o, bf16x16(v)); }
#endif

#if DS4PY_AVX2
#include "reduce16.h"


// int32 lanes i = sum of the four products u[4i + j] * s[4i + j] (u unsigned, s signed; every pair's sum within
// int16, as the callers' values keep it): vpdpbusd's lanes without VNNI
inline __m256i dot4(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);  // AVX-VNNI: one instruction, the same exact sums
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif
