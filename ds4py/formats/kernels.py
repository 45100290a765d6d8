"""CPU matrix-vector kernels for ggml Q8_0 and MXFP4 weights kept packed in memory.

`q8_0_linear(x, raw)` / `mxfp4_linear(x, raw)` compute x [T, in] @ W.T for W given as its raw ggml rows
(uint8 [out, in/32*34] or [out, in/32*17]) without dequantizing W. As in llama.cpp, the activations are
first quantized to Q8_0 (per 32 values: int8 codes and one float scale), then every weight block is
multiplied in int8 x int8 -> int32 (AVX512-VNNI `vpdpbusd` where the CPU has it, AVX2's `vpmaddubsw` where it
has that, a plain loop elsewhere) and accumulated in float with the product of the two block scales. The activation
rounding makes the result differ from `F.linear(x, W.dequantize())` by a relative ~0.5%.

The C++ code is compiled at first use with `torch.utils.cpp_extension.load_inline` into
$TORCH_EXTENSIONS_DIR or ~/.cache/ds4py/kernels (about 3 s; it includes only ATen's parallel_for header
and is loaded with ctypes, not pybind11) and parallelized over output rows with `at::parallel_for`,
so it follows `torch.set_num_threads`. When it cannot be built (no compiler: one warning, then the
fallback), when the tensors are not on the CPU, or when DS4PY_NO_KERNELS=1, the functions use
`fallback_linear`: dequantize + `F.linear`, exactly what `Weight.linear` did before.
The SIMD code is AVX512-VNNI's, or on CPUs with AVX2 + FMA only its operations in 256-bit halves (the same
values, `isa`); DS4PY_KERNELS_GENERIC=1 builds the portable loop instead (for testing it).

For bf16 activations with >= BF16_GEMM_MIN_T rows (long prompts; fewer for large Q8_0 matrices, none for R16
rows: `bf16_gemm_min_t`) on CPUs with a native bf16 GEMM (`bf16_gemm_native`) `ggml_linear` instead dequantizes W to
bf16 with the compiled `dequantize` and calls that GEMM: exactly F.linear(x, W.dequantize(torch.bfloat16)).

On a CUDA device `ggml_linear` and `bf16_linear` take the Triton kernels of `ds4py.formats.gpu_kernels` instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ds4py.formats import env, gpu_kernels

Q8_0 = 8  # ggml type ids (GGMLQuantizationType)
MXFP4 = 39
MXFP4_R16 = 1039  # not a ggml type: MXFP4 repacked by groups of 16 rows (`repack16`), ds4py's own layout
BLOCK_BYTES = {Q8_0: 34, MXFP4: 17, MXFP4_R16: 17}
KIND_BF16, KIND_F32 = -16, -32  # not ggml types: a plain matrix's rows as bf16 bits / float32 values
FLOAT_BYTES = {KIND_BF16: 2, KIND_F32: 4}
ROW_KINDS = (Q8_0, MXFP4, KIND_BF16, KIND_F32)  # what the one-token plans' products take (`plan_rows`)


def row_bytes(kind: int, cols: int) -> int:
    """The bytes of a row of `cols` values in `kind` (a ggml type of BLOCK_BYTES, KIND_BF16 or KIND_F32)."""
    return cols * FLOAT_BYTES[kind] if kind in FLOAT_BYTES else cols // 32 * BLOCK_BYTES[kind]


def row_values(raw: torch.Tensor, kind: int) -> int:
    """The values in a row of raw uint8 rows [..., bytes] of `kind`."""
    if kind in FLOAT_BYTES:
        return raw.shape[-1] // FLOAT_BYTES[kind]
    return raw.shape[-1] // BLOCK_BYTES[kind] * 32


def plan_rows(weight) -> tuple[torch.Tensor, int] | None:
    """(raw uint8 rows, kind) of a CPU weight for the one-token plans (`project_plan`, `output_plan`, `moe_plan`):
    its `kernel_rows` / `stack_rows` (ggml blocks), or the bytes of a float32 / bf16 matrix or stack (`Dense`,
    `BF16Matrix`) as KIND_F32 / KIND_BF16 rows [..., cols * size], whose products the calls make in float32 as
    `f32_linear` / `bf16_linear` (F.linear's values up to summation order). None for anything else."""
    from ds4py.formats import BF16Matrix, Dense

    rows = weight.kernel_rows() or weight.stack_rows()
    if rows is not None or not isinstance(weight, (Dense, BF16Matrix)):
        return rows
    t = weight.tensor
    if (t.dim() not in (2, 3) or not t.is_cpu or t.dtype not in (torch.float32, torch.bfloat16) or t.stride(-1) != 1
            or t.requires_grad or t.storage_offset() * t.element_size() % 4 or t.shape[-1] == 0):
        return None
    return t.view(torch.uint8), KIND_BF16 if t.dtype == torch.bfloat16 else KIND_F32
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
# From this many bf16 activation rows on, ggml_linear dequantizes W to bf16 (compiled, ~11 ms for 4096x4096 on
# 2 Zen4 cores) and uses the bf16 GEMM: measured equal at T=128, 1.8x faster than the int8 kernel at T=512. Only
# where the CPU has a native bf16 GEMM (`bf16_gemm_native`); small matrices take `small_gemm` from here on anyway.
BF16_GEMM_MIN_T = 256
# Large Q8_0 matrices (BF16_GEMM_MIN_VALUES values or more) take that path from fewer rows: with freed memory kept
# (`memory.heap`) and the AVX512 dequantize a 4096 x 4096 matrix costs ~1 ms, not ~11. int8 kernel / bf16 path
# time on 2 Zen 5 cores, T = 16 / 32 / 64: 4096 x 4096 1.12 / 1.56 / 2.39, 4096 x 8192 1.18 / 1.65 / 2.86, 1024 x
# 4096 1.43 / 1.83 / 2.66, 32768 x 1024 0.61 / 0.77 / 1.28 (its dequantize, 2 ms, is most of a short product).
BF16_LINEAR_MIN_T = 64
# and from 32 rows where they are 2048 values wide or more (T = 24 / 32 / 48: 4096 x 2048 1.30 / 1.56 / 1.56,
# 512 x 4096 1.74 / 2.04 / 2.52, 4096 x 4096 1.40 / 1.60 / 2.05; 8192 x 1024 0.93 / 1.10 / 1.56)
BF16_WIDE_MIN_T = 32
# A prompt's routed expert goes to that GEMM (one call per expert, from Python) only when its matrices hold this
# many values: V4 Flash's 2048 x 4096; the tiny preset's 32 x 64 stay in the layer's one grouped call (a 512-token
# chunk's MoE 0.4 ms there, ~3 ms through the per-expert loop).
BF16_GEMM_MIN_VALUES = 1 << 20
# bf16 weights: the kernel serves up to this many activation rows (decode, batched decode); longer inputs use
# F.linear (in tiles of BF16_TILE_ROWS output rows when the weight must be converted to x's dtype).
BF16_KERNEL_MAX_T = 16
# 1024 rows (16 MB of float32 at 4096 columns) stay in cache: the 129280 x 4096 head at T=1 took 143 ms vs 678 ms
# with 8192-row tiles (fresh 128 MB buffers); T=256: 1.85 s, the old resident float32 copy 1.99 s.
BF16_TILE_ROWS = 1024

# RMS norms and the rotary rotation of rows, for `ds4py.model.row_kernels`, the one-token projection here and the
# hyper-connections' collapse (needs <ATen/Parallel.h> and BF16_C before it)
ROW_OPS_C = r"""
namespace rowops {

inline void store(void* p, int64_t i, float f, int bf) {
  if (bf) ((uint16_t*)p)[i] = float_to_bf16(f);
  else ((float*)p)[i] = f;
}

// one row x [n] -> y [n] = x * s (s = rsqrt(mean(x^2) + eps), bf16-rounded when round_scale) * wf[i] (when wf),
// rounded to x's dtype; mean(x^2) summed in float64 (each square exact) over 8 lanes, so the loops vectorize
template <bool BF>
void rms_row(const void* x, int64_t n, const float* wf, float eps, int round_scale, void* y) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) {
      const double v = load_float(x, i + l, BF);
      acc[l] += v * v;
    }
  double ss = 0.0;
  for (; i < n; i++) ss += (double)load_float(x, i, BF) * load_float(x, i, BF);
  for (int l = 0; l < 8; l++) ss += acc[l];
  float s = 1.0f / std::sqrt((float)(ss / n) + eps);
  if (round_scale) s = round_if_bf16(s, 1);
  if (wf) {
    for (int64_t j = 0; j < n; j++) store(y, j, load_float(x, j, BF) * s * wf[j], BF);
  } else {
    for (int64_t j = 0; j < n; j++) store(y, j, load_float(x, j, BF) * s, BF);
  }
}

// rows of this many values or more go to the threads one by one; shorter ones in chunks of about this many values
constexpr int64_t ROWS_GRAIN = 32768;
}  // namespace rowops

// x [R, n] -> y [R, n] = x * rsqrt(mean(x^2) + eps), times w [n] when given, in float32, rounded to x's dtype.
// round_scale (the unweighted bf16 norm): the scale is rounded to bf16 first and x * scale rounded after, as
// torch computes `x * scale.to(bfloat16)` in bf16. Rows split over the threads (a prompt's).
extern "C" void ds4py_rms_rows(const void* x, int bf, int64_t R, int64_t n, const void* w, int wbf, float eps,
                               int round_scale, void* y) {
  const size_t es = bf ? 2 : 4;
  std::vector<float> wf(w ? n : 0);
  for (int64_t i = 0; i < (int64_t)wf.size(); i++) wf[i] = load_float(w, i, wbf);
  const int64_t grain = std::max<int64_t>(1, rowops::ROWS_GRAIN / std::max<int64_t>(n, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const void* xr = (const char*)x + r * n * es;
      void* yr = (char*)y + r * n * es;
      if (bf) rowops::rms_row<true>(xr, n, w ? wf.data() : nullptr, eps, round_scale, yr);
      else rowops::rms_row<false>(xr, n, w ? wf.data() : nullptr, eps, round_scale, yr);
    }
  });
}

// x [T, per_t, hd] -> y: each row's last 2 * half channels, as (re, im) pairs, times row t's rotation
// rot [T, half] (cos, sin) pairs, or its conjugate; in float32, rounded to x's dtype; the other channels copied.
// Tokens split over the threads (a prompt's).
extern "C" void ds4py_rope_rows(const void* x, int bf, int64_t T, int64_t per_t, int64_t hd, int64_t half,
                                const float* rot, int conj, void* y) {
  const int64_t first = hd - 2 * half;
  const size_t esize = bf ? 2 : 4;
  const int64_t grain = std::max<int64_t>(1, rowops::ROWS_GRAIN / std::max<int64_t>(per_t * hd, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      for (int64_t h = 0; h < per_t; h++) {
        const int64_t row = (t * per_t + h) * hd;
        std::memcpy((char*)y + row * esize, (const char*)x + row * esize, first * esize);
        for (int64_t j = 0; j < half; j++) {
          const float a = load_float(x, row + first + 2 * j, bf);
          const float b = load_float(x, row + first + 2 * j + 1, bf);
          const float c = rot[(t * half + j) * 2];
          const float s = conj ? -rot[(t * half + j) * 2 + 1] : rot[(t * half + j) * 2 + 1];
          rowops::store(y, row + first + 2 * j, a * c - b * s, bf);
          rowops::store(y, row + first + 2 * j + 1, a * s + b * c, bf);
        }
      }
  });
}
"""

# bf16 <-> float32 as torch converts, for every compiled library's source (needs <cmath>, <cstdint>, <cstring>)
BF16_C = r"""
inline float bf16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN -> 0x7FC0: what torch's .to(bfloat16) does
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// f rounded to bf16 when bf (bf16_to_float(float_to_bf16(f)): nearest even, NaN -> the quiet NaN), else f;
// branch-free, so the loops around it vectorize
inline float round_if_bf16(float f, int bf) {
  if (!bf) return f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = f != f ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// value i of float32 data, or of bf16 bits when bf
inline float load_float(const void* p, int64_t i, int bf) {
  return bf ? bf16_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

// n values (float32, or bf16 bits when bf) -> float32 dst; the two loops vectorize
inline void widen_to_float(const void* src, int bf, int64_t n, float* dst) {
  if (!bf) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  const uint16_t* b = (const uint16_t*)src;
  for (int64_t i = 0; i < n; i++) {
    const uint32_t u = (uint32_t)b[i] << 16;
    std::memcpy(dst + i, &u, 4);
  }
}
"""

# The clamped SwiGLU of float32 rows (scalar and, where DS4PY_AVX512 or DS4PY_AVX2, 16 or 8 at a time with a
# vectorised exp, the same bits in both), for the experts here and `ds4py.formats.small_gemm`'s (needs <cmath>,
# <algorithm> and immintrin.h under DS4PY_AVX512 / DS4PY_AVX2 before it)
SWIGLU_C = r"""
inline float swiglu(float gate, float up, float limit) {  // clamped SwiGLU, as ds4py.model.moe.swiglu
  if (limit > 0) {
    gate = std::min(gate, limit);
    up = std::min(std::max(up, -limit), limit);
  }
  return gate / (1.0f + std::exp(-gate)) * up;
}

#if DS4PY_AVX512
// e^x for 16 floats: 2^k e^r with k = round(x log2 e), r = x - k ln 2 (ln 2 in two parts), e^r by Cephes' expf
// polynomial: within 2 ulp of expf (std::exp does not vectorise: one call per value cost more than the matmuls
// around it for a prompt's experts). Past 88.7 it overflows to inf and below -103.9 to 0, as expf.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#elif DS4PY_AVX2
// exp16's operations on 8 floats (AVX2 + FMA), the same bits: its scalef(p, k) = p 2^k (k in [-150, 128]) as
// (p 2^k1) 2^k2 with k1 = floor(k / 2), both powers normal floats, so the first product is exact and the second
// rounds once, as scalef does (also to a subnormal, or past the largest float to inf).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(89.0f)), _mm256_set1_ps(-104.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 k1 = _mm256_floor_ps(_mm256_mul_ps(k, _mm256_set1_ps(0.5f)));
  const __m256i e1 = _mm256_cvtps_epi32(k1), e2 = _mm256_cvtps_epi32(_mm256_sub_ps(k, k1));
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

// h[i] = swiglu(h[i], up[i]) for i < n
inline void swiglu_rows(float* h, const float* up, int64_t n, float limit) {
  int64_t i = 0;
#if DS4PY_AVX512
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 g = _mm512_loadu_ps(h + i), u = _mm512_loadu_ps(up + i);
    if (limit > 0) {
      g = _mm512_min_ps(g, lim);
      u = _mm512_min_ps(_mm512_max_ps(u, nlim), lim);
    }
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(silu, u));
  }
#elif DS4PY_AVX2
  // 16 values a step, as the AVX512 code (the same values go to the scalar tail there and here)
  const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.0f);
  for (; i < n / 16 * 16; i += 8) {
    __m256 g = _mm256_loadu_ps(h + i), u = _mm256_loadu_ps(up + i);
    if (limit > 0) {
      g = _mm256_min_ps(g, lim);
      u = _mm256_min_ps(_mm256_max_ps(u, nlim), lim);
    }
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, u));
  }
#endif
  for (; i < n; i++) h[i] = swiglu(h[i], up[i], limit);
}
"""

# The sum of 16 float lanes kept as two AVX 256-bit halves in _mm512_reduce_add_ps's order, for the AVX2 code here
# and in the model's kernels (needs immintrin.h, under AVX2, before it)
REDUCE16_C = r"""
// The sum of 16 float lanes (lo: lanes 0-7, hi: 8-15) in _mm512_reduce_add_ps's order (GCC's: lanes i + i+8,
// then i + i+4, i + i+2, i + i+1), so a 16-lane AVX512 accumulator kept as two 256-bit halves sums to its bits.
inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}
"""

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
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
constexpr int XQ_OFFSET = DS4PY_AVX512 ? 128 : 0;

// a buffer kept between calls (callers make it thread_local): fresh ones of several MB are page-faulted in on
// every call
inline float* grow(std::vector<float>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

#if DS4PY_AVX2
""" + REDUCE16_C + r"""

// int32 lanes i = sum of the four products u[4i + j] * s[4i + j] (u unsigned, s signed; every pair's sum within
// int16, as the callers' values keep it): vpdpbusd's lanes without VNNI
inline __m256i dot4(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif
// Software prefetch distance, bytes ahead of the pair of blocks being read (a thread's rows are contiguous, so
// past a row's end this fetches the next row), by tile height. Weights from DRAM, 2 threads, Q8_0 4096x4096
// T=1/4/8: 0.40/1.11/2.18 ms without, 0.38/0.48/1.50 ms with; MXFP4 2048x4096 T=4/8: 0.35/0.85 -> 0.21/0.46 ms.
constexpr int64_t PF_DIST[TILE_T + 1] = {0, 2048, 2048, 4096, 4096, 4096, 4096, 4096, 4096};

const int8_t KVALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

struct E8M0 {
  float v[256];
  E8M0() { for (int e = 0; e < 256; e++) v[e] = std::ldexp(1.0f, e - 128); }  // ggml's e8m0 "half"
};
const E8M0 E8M0_HALF;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Quantized activations. Per row t: xq[t][nbp*32] = int8 code + XQ_OFFSET (AVX512: +128, unsigned for
// vpdpbusd; portable loop: the int8 code itself, since GCC 12 -O3 miscompiles u8-128 times s8 sums) and
// xs[t][nbp*16] = the block scales, each repeated 8 times (block 2p in [16p, 16p+8), block 2p+1 after)
// so a 512-bit lane group of two blocks multiplies by one vector load. nbp = nb rounded up to even;
// the padding block is code 0 (stored 128) with scale 0.
struct Acts {
  int64_t T, nb, nbp;
  std::vector<uint8_t> q;
  std::vector<float> s;
  const uint8_t* qrow(int64_t t) const { return q.data() + t * nbp * 32; }
  const float* srow(int64_t t) const { return s.data() + t * nbp * 16; }
  static int64_t sidx(int64_t b) { return (b / 2) * 16 + (b % 2) * 8; }
};

// One block of 32 activations -> its int8 codes (round to nearest even) and scale amax / 127, the portable way.
inline float quantize_block(const float* v, int8_t* codes) {
  float amax = 0.0f;
  for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < 32; i++) codes[i] = (int8_t)std::nearbyint(v[i] * id);
  return d;
}

// x row t at x + t * xstride (xstride 0: n, rows back to back)
void quantize_acts(const float* x, int64_t T, int64_t n, Acts& a, int64_t xstride = 0) {
  if (xstride == 0) xstride = n;
  a.T = T;
  a.nb = n / 32;
  a.nbp = (a.nb + 1) / 2 * 2;
  a.q.assign(T * a.nbp * 32, (uint8_t)XQ_OFFSET);
  a.s.assign(T * a.nbp * 16, 0.0f);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const float* xr = x + t * xstride;
      uint8_t* q = a.q.data() + t * a.nbp * 32;
      float* s = a.s.data() + t * a.nbp * 16;
      for (int64_t b = 0; b < a.nb; b++) {
        const float* v = xr + b * 32;
#if DS4PY_AVX512
        __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        __m128i ql = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, vid)));
        __m128i qh = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, vid)));
        __m256i qq = _mm256_xor_si256(_mm256_set_m128i(qh, ql), _mm256_set1_epi8((char)0x80));
        _mm256_storeu_si256((__m256i*)(q + b * 32), qq);
#elif DS4PY_AVX2
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
               v3 = _mm256_loadu_ps(v + 24);
        const __m256 nz = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(nz, v0), _mm256_andnot_ps(nz, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(nz, v2), _mm256_andnot_ps(nz, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid)),
                      i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        // packs interleave 128-bit lanes: [0-3, 8-11, 4-7, 12-15] per pack; the permute puts them back in order
        const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i*)(q + b * 32),
                            _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        const float d = quantize_block(v, (int8_t*)(q + b * 32));
#endif
        for (int k = 0; k < 8; k++) s[Acts::sidx(b) + k] = d;
      }
    }
  });
}

#if DS4PY_AVX512
// Two consecutive weight blocks as 64 int8 values (element order of the activations) and their scales.
template <int QT>
inline void load_pair(const uint8_t* b0, bool second, __m512i& w, __m512& dw) {
  if (QT == Q8_0) {
    const uint8_t* b1 = b0 + 34;
    __m256i w0 = _mm256_loadu_si256((const __m256i*)(b0 + 2));
    __m256i w1 = second ? _mm256_loadu_si256((const __m256i*)(b1 + 2)) : _mm256_setzero_si256();
    w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
    float d0 = half_at(b0), d1 = second ? half_at(b1) : 0.0f;
    dw = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
  } else {
    const uint8_t* b1 = b0 + 17;
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)KVALUES));
    __m128i q0 = _mm_loadu_si128((const __m128i*)(b0 + 1));
    __m128i q1 = second ? _mm_loadu_si128((const __m128i*)(b1 + 1)) : _mm_setzero_si128();
    __m256i qs = _mm256_set_m128i(q1, q0);                                   // [q0, q1]
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(qs), _mm256_srli_epi16(qs, 4), 1);
    both = _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));        // [q0, q0>>4, q1, q1>>4]
    __m512i codes = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
    w = _mm512_shuffle_epi8(table, codes);
    if (!second) w = _mm512_inserti64x4(w, _mm256_setzero_si256(), 1);
    float d0 = E8M0_HALF.v[b0[0]], d1 = second ? E8M0_HALF.v[b1[0]] : 0.0f;
    dw = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
  }
}

// y[t * ystride] = dot(weight row wr, activation row t0 + t) for t < TT.
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  __m512 acc[TT];
  for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();
  const uint8_t* xq[TT];
  const float* xs[TT];
  for (int t = 0; t < TT; t++) { xq[t] = a.qrow(t0 + t); xs[t] = a.srow(t0 + t); }
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  for (int64_t b = 0; b < a.nb; b += 2) {
    __m512i w;
    __m512 dw;
    _mm_prefetch((const char*)(wr + b * BB + PF_DIST[TT]), _MM_HINT_T0);
    load_pair<QT>(wr + b * BB, b + 1 < a.nb, w, dw);
    // the activations are stored +128: dot(x+128, w) - 128*sum(w) = dot(x, w)
    __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w));
    for (int t = 0; t < TT; t++) {
      __m512i dot = _mm512_dpbusd_epi32(init, _mm512_loadu_si512(xq[t] + b * 32), w);
      __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(xs[t] + b * 8));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[t]);
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = _mm512_reduce_add_ps(acc[t]);
}
#elif DS4PY_AVX2
// One weight block's 32 int8 values (element order of the activations) and its scale; a missing block (past the
// row's end: the AVX512 code's zero-padded second of a pair) is zeros.
template <int QT>
inline __m256i load_block(const uint8_t* blk, bool present, float& d) {
  if (!present) {
    d = 0.0f;
    return _mm256_setzero_si256();
  }
  if (QT == Q8_0) {
    d = half_at(blk);
    return _mm256_loadu_si256((const __m256i*)(blk + 2));
  }
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)KVALUES));
  const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 1));
  const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
  d = E8M0_HALF.v[blk[0]];
  return _mm256_shuffle_epi8(table, codes);
}

// The AVX512 row_dot's operations with its 16 lanes in two halves: lanes 0-7 take the even block of each pair,
// 8-15 the odd one. The int8 dot of 4 values per lane is exact either way (here |w| times x with w's sign:
// |w| <= 128, |x| <= 127, so vpmaddubsw's pair sums stay within int16); the float steps and the final sum are
// the AVX512 code's, so the results are its bits.
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  __m256 lo[TT], hi[TT];
  for (int t = 0; t < TT; t++) lo[t] = hi[t] = _mm256_setzero_ps();
  const uint8_t* xq[TT];
  const float* xs[TT];
  for (int t = 0; t < TT; t++) { xq[t] = a.qrow(t0 + t); xs[t] = a.srow(t0 + t); }
  for (int64_t b = 0; b < a.nb; b += 2) {
    _mm_prefetch((const char*)(wr + b * BB + PF_DIST[TT]), _MM_HINT_T0);
    float d0, d1;
    const __m256i w0 = load_block<QT>(wr + b * BB, true, d0), w1 = load_block<QT>(wr + (b + 1) * BB, b + 1 < a.nb, d1);
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
    const __m256 dw0 = _mm256_set1_ps(d0), dw1 = _mm256_set1_ps(d1);
    for (int t = 0; t < TT; t++) {
      const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq[t] + b * 32));
      const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq[t] + b * 32 + 32));
      const __m256 s0 = _mm256_mul_ps(dw0, _mm256_loadu_ps(xs[t] + b * 8));
      const __m256 s1 = _mm256_mul_ps(dw1, _mm256_loadu_ps(xs[t] + b * 8 + 8));
      lo[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(u0, _mm256_sign_epi8(x0, w0))), s0, lo[t]);
      hi[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(u1, _mm256_sign_epi8(x1, w1))), s1, hi[t]);
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = reduce16(lo[t], hi[t]);
}
#else
template <int QT, int TT>
void row_dot(const uint8_t* wr, const Acts& a, int64_t t0, float* y, int64_t ystride) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  float acc[TT] = {};
  int8_t w[32];
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wr + b * BB;
    float dw;
    if (QT == Q8_0) {
      std::memcpy(w, blk + 2, 32);
      dw = half_at(blk);
    } else {
      for (int i = 0; i < 16; i++) {
        w[i] = KVALUES[blk[1 + i] & 15];
        w[i + 16] = KVALUES[blk[1 + i] >> 4];
      }
      dw = E8M0_HALF.v[blk[0]];
    }
    for (int t = 0; t < TT; t++) {
      const int8_t* q = (const int8_t*)a.qrow(t0 + t) + b * 32;
      int32_t s = 0;
      for (int i = 0; i < 32; i++) s += (int32_t)q[i] * (int32_t)w[i];
      acc[t] += dw * a.srow(t0 + t)[Acts::sidx(b)] * (float)s;
    }
  }
  for (int t = 0; t < TT; t++) y[t * ystride] = acc[t];
}
#endif

template <int QT>
void row_tile(const uint8_t* wr, const Acts& a, int64_t t0, int tt, float* y, int64_t ystride) {
  switch (tt) {
    case 1: return row_dot<QT, 1>(wr, a, t0, y, ystride);
    case 2: return row_dot<QT, 2>(wr, a, t0, y, ystride);
    case 3: return row_dot<QT, 3>(wr, a, t0, y, ystride);
    case 4: return row_dot<QT, 4>(wr, a, t0, y, ystride);
    case 5: return row_dot<QT, 5>(wr, a, t0, y, ystride);
    case 6: return row_dot<QT, 6>(wr, a, t0, y, ystride);
    case 7: return row_dot<QT, 7>(wr, a, t0, y, ystride);
    default: return row_dot<QT, 8>(wr, a, t0, y, ystride);
  }
}

// y [T, rows] = rows of w times activations: row r times acts[r / rg] (groups of rg rows, each with its own
// activations: the grouped output projection; one group: rg = rows).
// Group by group, each group's rows split over the threads, so that the threads stream the same activations at
// once (a split of all rows had them read different groups'). With ds4py_ggml_linear's threaded bf16 widening,
// the grouped output projection at T = 256 (8 x 1024 rows of 4096) went 390 -> 320 ms on 2 threads; this part's
// own share was not measured apart.
template <int QT>
void linear(const Acts* acts, int64_t rg, const uint8_t* w, int64_t rows, int64_t wstride, float* y) {
  constexpr int ROW_TILE_T = row_tile_t<QT>();
  const int64_t T = acts[0].T;
  int64_t grain = std::max<int64_t>(1, std::min<int64_t>(CHUNK, rg / (4 * at::get_num_threads())));
  grain = grain_for(acts[0].nb * 32 * T, grain);
  for (int64_t g0 = 0; g0 < rows; g0 += rg)
    at::parallel_for(g0, g0 + rg, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t c0 = r0; c0 < r1; c0 += CHUNK) {
        int64_t c1 = std::min(r1, c0 + CHUNK);
        for (int64_t t0 = 0; t0 < T; t0 += ROW_TILE_T) {
          int tt = (int)std::min<int64_t>(ROW_TILE_T, T - t0);
          for (int64_t r = c0; r < c1; r++)
            row_tile<QT>(w + r * wstride, acts[r / rg], t0, tt, y + t0 * rows + r, rows);
        }
      }
    });
}

}  // namespace

""" + BF16_C + ROW_OPS_C + r"""
namespace {
// MXFP4 repacked by 16 rows ("R16"): for each group of 16 rows and each block b (32 values), 272 bytes: the 16
// rows' scale bytes, then their 16 bytes of nibbles interleaved 4 bytes at a time: byte 16 + 64v + 4r + k is
// byte j = 4v + k of row r (v = 0..3, r = 0..15, k = 0..3), and a byte holds element j (low nibble) and j + 16
// (high). So each 64-byte load is 4 bytes of all 16 rows, meeting one broadcast 4-byte group of activations,
// the 16 rows' scales come in one 16-byte load, and the dot products land one row per lane: ~5 instructions per
// 64 weights where the ggml layout takes ~15 (its pairs of blocks need shuffles, and their scales gathered
// from 17-byte strides). Same bytes, same values; llama.cpp repacks MXFP4 to interleaved rows on x86 too.
constexpr int64_t R16_BLOCK = 272;

inline int64_t r16_offset(int r, int j) { return 16 + 64 * (j / 4) + 4 * r + j % 4; }

// dst may be src (sstride = nb * 17): each group is copied aside before it is rewritten.
void repack16(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t rows, int64_t nb) {
  at::parallel_for(0, rows / 16, 8, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> tmp(16 * nb * 17);
    for (int64_t g = g0; g < g1; g++) {
      for (int r = 0; r < 16; r++) std::memcpy(tmp.data() + r * nb * 17, src + (g * 16 + r) * sstride, nb * 17);
      for (int64_t b = 0; b < nb; b++) {
        uint8_t* o = dst + (g * nb + b) * R16_BLOCK;
        for (int r = 0; r < 16; r++) {
          const uint8_t* blk = tmp.data() + r * nb * 17 + b * 17;
          o[r] = blk[0];
          for (int j = 0; j < 16; j++) o[r16_offset(r, j)] = blk[1 + j];
        }
      }
    }
  });
}

template <typename Out>
void dequant_r16(const uint8_t* w, int64_t rows, int64_t n, Out* out) {
  const int64_t nb = n / 32;
  at::parallel_for(0, rows / 16, 2, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++)
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + (g * nb + b) * R16_BLOCK;
        for (int r = 0; r < 16; r++) {
          const float d = E8M0_HALF.v[blk[r]];
          Out* o = out + (g * 16 + r) * n + b * 32;
          for (int j = 0; j < 16; j++) {
            const uint8_t q = blk[r16_offset(r, j)];
            const float lo = d * (float)KVALUES[q & 15], hi = d * (float)KVALUES[q >> 4];
            if constexpr (sizeof(Out) == 4) {
              o[j] = lo;
              o[j + 16] = hi;
            } else {
              o[j] = float_to_bf16(lo);
              o[j + 16] = float_to_bf16(hi);
            }
          }
        }
      }
  });
}

// Activations for R16 weights: per row and block the 32 int8 codes (as quantize_acts makes them), the correction
// -12 * (their sum) (the weights are made unsigned, +12, for vpdpbusd) and the scale.
struct Acts16 {
  int64_t T = 0, nb = 0;
  std::vector<int8_t> q;     // [T][nb][32]
  std::vector<int32_t> c;    // [T][nb]
  std::vector<float> d;      // [T][nb]
};

void quantize_acts16(const float* x, int64_t T, int64_t n, Acts16& a) {
  a.T = T;
  a.nb = n / 32;
  a.q.assign(T * a.nb * 32, 0);
  a.c.assign(T * a.nb, 0);
  a.d.assign(T * a.nb, 0.0f);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      for (int64_t b = 0; b < a.nb; b++) {
        int8_t* q = a.q.data() + (t * a.nb + b) * 32;
        const float d = quantize_block(x + t * n + b * 32, q);  // the codes quantize_acts makes
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) sum += q[i];
        a.c[t * a.nb + b] = -12 * sum;
        a.d[t * a.nb + b] = d;
      }
  });
}

#if DS4PY_AVX512
// y[t * ystride + r] = dot(row r of the group at wg, activation row t0 + t) for r < 16, t < TT.
template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  // KVALUES + 12: the e2m1 values (doubled, as ggml stores them) made unsigned
  const __m512i table =
      _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[TT];
  for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();
  const int8_t* q0 = a.q.data() + t0 * a.nb * 32;
  const int32_t* c0 = a.c.data() + t0 * a.nb;
  const float* d0 = a.d.data() + t0 * a.nb;
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    _mm_prefetch((const char*)(blk + 4096), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 128), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 192), _MM_HINT_T0);
    _mm_prefetch((const char*)(blk + 4096 + 256), _MM_HINT_T0);
    // the 16 scales 2^(e - 128) (ggml's e8m0 "half"), exact for every e (e < 2 gives the subnormals)
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)blk));
    __m512i bits = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __mmask16 low = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    if (__builtin_expect(low != 0, 0))
      bits = _mm512_mask_mov_epi32(bits, low, _mm512_srlv_epi32(_mm512_set1_epi32(0x00400000),
                                                                 _mm512_sub_epi32(_mm512_set1_epi32(1), e)));
    const __m512 dw = _mm512_castsi512_ps(bits);
    __m512i lo[4], hi[4];
    for (int v = 0; v < 4; v++) {
      const __m512i W = _mm512_loadu_si512(blk + 16 + 64 * v);
      lo[v] = _mm512_shuffle_epi8(table, _mm512_and_si512(W, m4));
      hi[v] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(W, 4), m4));
    }
    for (int t = 0; t < TT; t++) {
      const int8_t* qc = q0 + (t * a.nb + b) * 32;
      int32_t g4[8];
      std::memcpy(g4, qc, 32);
      __m512i dot = _mm512_set1_epi32(c0[t * a.nb + b]);
      for (int v = 0; v < 4; v++) {
        dot = _mm512_dpbusd_epi32(dot, lo[v], _mm512_set1_epi32(g4[v]));      // elements 4v .. 4v + 3
        dot = _mm512_dpbusd_epi32(dot, hi[v], _mm512_set1_epi32(g4[4 + v]));  // elements 16 + 4v ..
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(d0[t * a.nb + b])), acc[t]);
    }
  }
  for (int t = 0; t < TT; t++) _mm512_storeu_ps(y + t * ystride, acc[t]);
}
#elif DS4PY_AVX2
// The AVX512 r16_dot with rows 0-7 and 8-15 in two halves (each 64-byte vector of the group holds rows 0-7 in its
// first 32 bytes): the same exact int32 dots (vpmaddubsw of the unsigned table values, <= 24, and the int8
// activations stays within int16) and the same float steps, so the same bits.
template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  const __m256i table =
      _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[TT][2];
  for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const int8_t* q0 = a.q.data() + t0 * a.nb * 32;
  const int32_t* c0 = a.c.data() + t0 * a.nb;
  const float* d0 = a.d.data() + t0 * a.nb;
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    for (int l = 0; l < 5; l++) _mm_prefetch((const char*)(blk + 4096 + 64 * l), _MM_HINT_T0);
    __m256 dw[2];
    for (int h = 0; h < 2; h++) {  // 2^(e - 128), exact: e >= 2 through the exponent bits, else the table
      const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 8 * h)));
      dw[h] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
      if (__builtin_expect(_mm256_movemask_epi8(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)) != 0, 0)) {
        float v[8];
        for (int r = 0; r < 8; r++) v[r] = E8M0_HALF.v[blk[8 * h + r]];
        dw[h] = _mm256_loadu_ps(v);
      }
    }
    __m256i lo[4][2], hi[4][2];
    for (int v = 0; v < 4; v++)
      for (int h = 0; h < 2; h++) {
        const __m256i W = _mm256_loadu_si256((const __m256i*)(blk + 16 + 64 * v + 32 * h));
        lo[v][h] = _mm256_shuffle_epi8(table, _mm256_and_si256(W, m4));
        hi[v][h] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(W, 4), m4));
      }
    for (int t = 0; t < TT; t++) {
      const int8_t* qc = q0 + (t * a.nb + b) * 32;
      int32_t g4[8];
      std::memcpy(g4, qc, 32);
      const __m256 sd = _mm256_set1_ps(d0[t * a.nb + b]);
      for (int h = 0; h < 2; h++) {
        // the products' pairs summed in int16, four vpmaddubsw at a time, before one vpmaddwd: each pair is at
        // most 2 * 24 * 128 = 6144, four 24576 < 32767, so the int32 dot is the same exact sum
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i dot = _mm256_set1_epi32(c0[t * a.nb + b]);
        for (int k = 0; k < 4; k += 2) {
          const __m256i p = _mm256_add_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[k][h], _mm256_set1_epi32(g4[k])),
                               _mm256_maddubs_epi16(hi[k][h], _mm256_set1_epi32(g4[4 + k]))),
              _mm256_add_epi16(_mm256_maddubs_epi16(lo[k + 1][h], _mm256_set1_epi32(g4[k + 1])),
                               _mm256_maddubs_epi16(hi[k + 1][h], _mm256_set1_epi32(g4[5 + k]))));
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(p, ones));
        }
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[h], sd), acc[t][h]);
      }
    }
  }
  for (int t = 0; t < TT; t++) {
    _mm256_storeu_ps(y + t * ystride, acc[t][0]);
    _mm256_storeu_ps(y + t * ystride + 8, acc[t][1]);
  }
}
#else
template <int TT>
void r16_dot(const uint8_t* wg, const Acts16& a, int64_t t0, float* y, int64_t ystride) {
  float acc[TT][16] = {};
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = wg + b * R16_BLOCK;
    for (int r = 0; r < 16; r++) {
      const float dw = E8M0_HALF.v[blk[r]];
      for (int t = 0; t < TT; t++) {
        const int8_t* q = a.q.data() + ((t0 + t) * a.nb + b) * 32;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
          const uint8_t c = blk[r16_offset(r, j)];
          s += (int32_t)KVALUES[c & 15] * q[j] + (int32_t)KVALUES[c >> 4] * q[j + 16];
        }
        acc[t][r] += dw * a.d[(t0 + t) * a.nb + b] * (float)s;
      }
    }
  }
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < 16; r++) y[t * ystride + r] = acc[t][r];
}
#endif

void r16_tile(const uint8_t* wg, const Acts16& a, int64_t t0, int tt, float* y, int64_t ystride) {
  switch (tt) {
    case 1: return r16_dot<1>(wg, a, t0, y, ystride);
    case 2: return r16_dot<2>(wg, a, t0, y, ystride);
    case 3: return r16_dot<3>(wg, a, t0, y, ystride);
    case 4: return r16_dot<4>(wg, a, t0, y, ystride);
    case 5: return r16_dot<5>(wg, a, t0, y, ystride);
    case 6: return r16_dot<6>(wg, a, t0, y, ystride);
    case 7: return r16_dot<7>(wg, a, t0, y, ystride);
    default: return r16_dot<8>(wg, a, t0, y, ystride);
  }
}

// x [T, n] -> y [T, rows] for R16 weights w (rows % 16 == 0, groups of n/32 * 272 bytes)
void r16_linear(const Acts16& a, const uint8_t* w, int64_t rows, float* y) {
  const int64_t groups = rows / 16, gbytes = a.nb * R16_BLOCK;
  at::parallel_for(0, groups, grain_for(16 * a.nb * 32 * a.T, 1), [&](int64_t g0, int64_t g1) {
    for (int64_t c0 = g0; c0 < g1; c0 += 2)  // 32 rows stay in cache while the activation tiles pass
      for (int64_t t0 = 0; t0 < a.T; t0 += TILE_T) {
        const int tt = (int)std::min<int64_t>(TILE_T, a.T - t0);
        for (int64_t g = c0; g < std::min(g1, c0 + 2); g++)
          r16_tile(w + g * gbytes, a, t0, tt, y + t0 * rows + g * 16, rows);
      }
  });
}
}  // namespace

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

namespace {
#if DS4PY_AVX512
// One Q8_0 block -> 32 bf16: the scalar loop's operations 16 lanes at a time (d * q in float32, then the same
// integer round to nearest even), so the same bits. A 4096 x 4096 matrix took 2.95 ms on 2 Zen 5 cores scalar.
inline void q8_0_block_bf16(const uint8_t* blk, uint16_t* o) {
  const __m512 d = _mm512_set1_ps(half_at(blk));
  for (int h = 0; h < 2; h++) {
    const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 2 + 16 * h));
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i*)(o + 16 * h), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
}
#endif

template <int QT, typename Out>
void dequant(const uint8_t* w, int64_t rows, int64_t wstride, int64_t n, Out* out) {
  constexpr int64_t BB = QT == Q8_0 ? 34 : 17;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    float v[32];
    for (int64_t r = r0; r < r1; r++) {
      for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t* blk = w + r * wstride + b * BB;
#if DS4PY_AVX512
        if constexpr (QT == Q8_0 && sizeof(Out) == 2) {
          q8_0_block_bf16(blk, (uint16_t*)out + r * n + b * 32);
          continue;
        }
#endif
        if (QT == Q8_0) {
          float d = half_at(blk);
          for (int i = 0; i < 32; i++) v[i] = d * (float)(int8_t)blk[2 + i];
        } else {
          float d = E8M0_HALF.v[blk[0]];
          for (int i = 0; i < 16; i++) {
            v[i] = d * (float)KVALUES[blk[1 + i] & 15];
            v[i + 16] = d * (float)KVALUES[blk[1 + i] >> 4];
          }
        }
        Out* o = out + r * n + b * 32;
        if constexpr (sizeof(Out) == 4) {
          std::memcpy(o, v, sizeof(v));
        } else {  // bfloat16, round to nearest even like torch (the values are finite or inf, never NaN)
          for (int i = 0; i < 32; i++) {
            uint32_t u;
            std::memcpy(&u, &v[i], 4);
            o[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
          }
        }
      }
    }
  });
}
}  // namespace

// w rows of ggml blocks (or R16 groups) -> out [rows, n], float32 (bf16 == 0) or bfloat16 bits (bf16 == 1).
extern "C" int ds4py_ggml_dequantize(int qtype, const uint8_t* w, int64_t rows, int64_t wstride, int64_t n,
                                     void* out, int bf16) {
  if (n % 32 || (qtype != Q8_0 && qtype != MXFP4 && qtype != MXFP4_R16) || (qtype == MXFP4_R16 && rows % 16))
    return 1;
  if (qtype == MXFP4_R16) {
    if (bf16) dequant_r16(w, rows, n, (uint16_t*)out);
    else dequant_r16(w, rows, n, (float*)out);
  } else if (qtype == Q8_0) {
    if (bf16) dequant<Q8_0>(w, rows, wstride, n, (uint16_t*)out);
    else dequant<Q8_0>(w, rows, wstride, n, (float*)out);
  } else {
    if (bf16) dequant<MXFP4>(w, rows, wstride, n, (uint16_t*)out);
    else dequant<MXFP4>(w, rows, wstride, n, (float*)out);
  }
  return 0;
}


namespace {
// bf16 weights times float32 activations. Each weight value is widened exactly (bf16 bits << 16) and
// multiplied into float32 accumulators (per weight row and activation row): a row's result is always the same
// sequence of operations, whatever else is computed alongside it (row-invariant).
constexpr int BF_R = 4;  // weight rows per call of the dot table
constexpr int BF_T = 4;  // activation rows sharing each weight load

#if DS4PY_AVX512
// 32 bf16 weights as two float vectors: the even-indexed values (low halves of each 32-bit lane, shifted up)
// and the odd-indexed ones (high halves, masked): one cheap op each. The activations are stored in the
// same order (per 32 values: the 16 even ones, then the 16 odd ones), so the products are unchanged.
// Each (weight row, activation row) sums into two accumulators taking turns over the steps of 32 values (what
// is left after the last full pair of steps, and a zero-padded partial step, goes into the first), whatever G
// rows are read side by side: G = 1 for one activation row (each thread reads one stream, 4 KB prefetched
// ahead: the 129280 x 4096 head 29.0 -> 26.2 ms against 4 rows side by side), 4 for two (each activation load
// serves four rows; more activation rows go two at a time over the same rows, then in L1/L2).
template <int G, int TT>
void bf16_rows(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
               int64_t ystride) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  constexpr int64_t PF = G == 1 ? 2048 : 512;  // prefetch distance in values: 4 KB in one stream, 1 KB in each of 4
  __m512 acc[2][G][TT];
  for (int u = 0; u < 2; u++)
    for (int g = 0; g < G; g++)
      for (int t = 0; t < TT; t++) acc[u][g][t] = _mm512_setzero_ps();
  // 32 weights of each row g (at rows + g * rstride) times activations [i, i + 32) into acc[u]
  auto step = [&](const uint16_t* rows, int64_t rstride, int64_t i, int u) {
    __m512 xe[TT], xo[TT];
    for (int t = 0; t < TT; t++) {
      xe[t] = _mm512_loadu_ps(x + t * kp + i);
      xo[t] = _mm512_loadu_ps(x + t * kp + i + 16);
    }
    for (int g = 0; g < G; g++) {
      const __m512i v = _mm512_loadu_si512((const void*)(rows + g * rstride));
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      for (int t = 0; t < TT; t++) {
        acc[u][g][t] = _mm512_fmadd_ps(we, xe[t], acc[u][g][t]);
        acc[u][g][t] = _mm512_fmadd_ps(wo, xo[t], acc[u][g][t]);
      }
    }
  };
  for (int64_t i = 0; i < k64; i += 64) {
    for (int g = 0; g < G; g++) {
      _mm_prefetch((const char*)(w + g * wstride + i + PF), _MM_HINT_T0);
      _mm_prefetch((const char*)(w + g * wstride + i + PF + 32), _MM_HINT_T0);
    }
    step(w + i, wstride, i, 0);
    step(w + i + 32, wstride, i + 32, 1);
  }
  if (k64 < kf) step(w + k64, wstride, k64, 0);
  if (kf < kp) {  // the last partial 32: weights through zero-padded copies
    uint16_t pad[G][32] = {};
    for (int g = 0; g < G; g++) std::memcpy(pad[g], w + g * wstride + kf, (k - kf) * 2);
    step(&pad[0][0], 32, kf, 0);
  }
  for (int g = 0; g < G; g++)
    for (int t = 0; t < TT; t++) y[t * ystride + g] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][g][t], acc[1][g][t]));
}

// 16 rows (w + r * wstride) times one activation row -> y[0..16): for each row bf16_rows<1, 1>'s operations (the
// same bits), but the 16 final sums reduced side by side: reduce_add_ps's tree (lanes i + i+8, then i + i+4,
// i + i+2, i + i+1) as whole-vector adds across rows. For short rows the reduction was most of a row's work:
// the tiny model's 129280 x 64 head took 5.5x a plain read of its bytes.
void bf16_rows16(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  __m512 s[16];
  for (int r = 0; r < 16; r++) {
    const uint16_t* row = w + r * wstride;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    auto step = [&](const uint16_t* p, int64_t i, __m512& acc) {
      const __m512i v = _mm512_loadu_si512((const void*)p);
      acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(x + i), acc);
      acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), _mm512_loadu_ps(x + i + 16), acc);
    };
    for (int64_t i = 0; i < k64; i += 64) {
      _mm_prefetch((const char*)(row + i + 2048), _MM_HINT_T0);
      _mm_prefetch((const char*)(row + i + 2048 + 32), _MM_HINT_T0);
      step(row + i, i, acc0);
      step(row + i + 32, i + 32, acc1);
    }
    if (k64 < kf) step(row + k64, k64, acc0);
    if (kf < kp) {
      uint16_t pad[32] = {};
      std::memcpy(pad, row + kf, (k - kf) * 2);
      step(pad, kf, acc0);
    }
    s[r] = _mm512_add_ps(acc0, acc1);
  }
  __m512 p[8], q[4], t[2];
  for (int j = 0; j < 8; j++)  // rows 2j, 2j + 1: lanes i + i+8 in lanes [0, 8) and [8, 16)
    p[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0xEE),
                         _mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0x44));
  for (int m = 0; m < 4; m++)  // rows 4m + g in 128-bit block g: i + i+4
    q[m] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * m], p[2 * m + 1], 0xDD),
                         _mm512_shuffle_f32x4(p[2 * m], p[2 * m + 1], 0x88));
  for (int n = 0; n < 2; n++)  // block g: rows 8n + g, 8n + 4 + g, two lanes each: i + i+2
    t[n] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * n], q[2 * n + 1], 0xEE),
                         _mm512_shuffle_ps(q[2 * n], q[2 * n + 1], 0x44));
  // block g: rows g, 4 + g, 8 + g, 12 + g: i + i+1
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0xDD), _mm512_shuffle_ps(t[0], t[1], 0x88));
  const __m512i lane_of_row = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(y, _mm512_permutexvar_ps(lane_of_row, sums));
}

template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  if constexpr (TT == 1) {
    for (int r = 0; r < R; r++) bf16_rows<1, 1>(w + r * wstride, wstride, k, x, kp, y + r, ystride);
  } else if constexpr (TT == 2) {
    if constexpr (R == 4) {
      bf16_rows<4, 2>(w, wstride, k, x, kp, y, ystride);
    } else {
      for (int r = 0; r < R; r++) bf16_rows<1, 2>(w + r * wstride, wstride, k, x, kp, y + r, ystride);
    }
  } else {  // two activation rows at a time (more accumulators than registers otherwise)
    bf16_dot<R, 2>(w, wstride, k, x, kp, y, ystride);
    bf16_dot<R, TT - 2>(w, wstride, k, x + 2 * kp, kp, y + 2 * ystride, ystride);
  }
}
#elif DS4PY_AVX2
// The AVX512 bf16_rows<1, TT> with each 16-lane accumulator in two halves: 32 weights as 16 bf16 (lanes 0-7 of
// the even / odd vectors) and 16 more (lanes 8-15), the activations in the AVX512 order (per 32: 16 even, 16 odd),
// the same fused multiply-adds per lane: one weight row (a row's operations do not depend on the rows beside it)
// times TT activation rows -> each one's two accumulators added, lanes 0-7 in lo[t] and 8-15 in hi[t].
template <int TT>
inline void bf16_row_lanes(const uint16_t* w, int64_t k, const float* x, int64_t kp, __m256* lo, __m256* hi) {
  const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
  const int64_t kf = k / 32 * 32, k64 = k / 64 * 64;
  __m256 acc[2][TT][2];
  for (int u = 0; u < 2; u++)
    for (int t = 0; t < TT; t++) acc[u][t][0] = acc[u][t][1] = _mm256_setzero_ps();
  auto step = [&](const uint16_t* p, int64_t i, int u) {
    for (int h = 0; h < 2; h++) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * h));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      for (int t = 0; t < TT; t++) {
        acc[u][t][h] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + t * kp + i + 8 * h), acc[u][t][h]);
        acc[u][t][h] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + t * kp + i + 16 + 8 * h), acc[u][t][h]);
      }
    }
  };
  for (int64_t i = 0; i < k64; i += 64) {
    _mm_prefetch((const char*)(w + i + 2048), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + i + 2048 + 32), _MM_HINT_T0);
    step(w + i, i, 0);
    step(w + i + 32, i + 32, 1);
  }
  if (k64 < kf) step(w + k64, k64, 0);
  if (kf < kp) {  // the last partial 32: weights through a zero-padded copy
    uint16_t pad[32] = {};
    std::memcpy(pad, w + kf, (k - kf) * 2);
    step(pad, kf, 0);
  }
  for (int t = 0; t < TT; t++) {
    lo[t] = _mm256_add_ps(acc[0][t][0], acc[1][t][0]);
    hi[t] = _mm256_add_ps(acc[0][t][1], acc[1][t][1]);
  }
}

// bf16_row_lanes summed as the AVX512 code sums its lanes: its bits
template <int TT>
void bf16_row(const uint16_t* w, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  __m256 lo[TT], hi[TT];
  bf16_row_lanes<TT>(w, k, x, kp, lo, hi);
  for (int t = 0; t < TT; t++) y[t * ystride] = reduce16(lo[t], hi[t]);
}

// 8 rows (w + r * wstride) times one activation row -> y[0..8): for each row bf16_row<1>'s operations (the same
// bits), but the 8 final sums reduced side by side, each step of reduce16's tree one add across 2-8 rows (the
// reduction was most of a short row's work, as for the AVX512 bf16_rows16).
void bf16_rows8(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y) {
  __m256 t3[8];
  for (int r = 0; r < 8; r++) {
    __m256 lo, hi;
    bf16_row_lanes<1>(w + r * wstride, k, x, kp, &lo, &hi);
    t3[r] = _mm256_add_ps(hi, lo);  // reduce16's first step: lanes i + i+8
  }
  __m256 p[4], q[2];
  for (int j = 0; j < 4; j++)  // rows 2j | 2j + 1 in the two 128-bit halves: i + i+4
    p[j] = _mm256_add_ps(_mm256_permute2f128_ps(t3[2 * j], t3[2 * j + 1], 0x31),
                         _mm256_permute2f128_ps(t3[2 * j], t3[2 * j + 1], 0x20));
  for (int m = 0; m < 2; m++)  // rows 4m, 4m + 2 | 4m + 1, 4m + 3, two lanes each: i + i+2
    q[m] = _mm256_add_ps(_mm256_shuffle_ps(p[2 * m], p[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(p[2 * m], p[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // rows 0, 2, 4, 6 | 1, 3, 5, 7: i + i+1
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm256_storeu_ps(y, _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  if constexpr (TT <= 2) {
    for (int r = 0; r < R; r++) bf16_row<TT>(w + r * wstride, k, x, kp, y + r, ystride);
  } else {
    bf16_dot<R, 2>(w, wstride, k, x, kp, y, ystride);
    bf16_dot<R, TT - 2>(w, wstride, k, x + 2 * kp, kp, y + 2 * ystride, ystride);
  }
}
#else
template <int R, int TT>
void bf16_dot(const uint16_t* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y,
              int64_t ystride) {
  float acc[R][TT][16] = {};
  for (int64_t i = 0; i < k; i += 16) {
    const int64_t n = std::min<int64_t>(16, k - i);
    for (int r = 0; r < R; r++) {
      float wv[16] = {};
      for (int64_t l = 0; l < n; l++) {
        uint32_t u = (uint32_t)w[r * wstride + i + l] << 16;
        std::memcpy(&wv[l], &u, 4);
      }
      for (int t = 0; t < TT; t++)
        for (int l = 0; l < 16; l++) acc[r][t][l] += wv[l] * x[t * kp + i + l];
    }
  }
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) {
      float s = 0.0f;
      for (int l = 0; l < 16; l++) s += acc[r][t][l];
      y[t * ystride + r] = s;
    }
}
#endif

using Bf16Dot = void (*)(const uint16_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
const Bf16Dot BF16_DOTS[BF_R][BF_T] = {
    {bf16_dot<1, 1>, bf16_dot<1, 2>, bf16_dot<1, 3>, bf16_dot<1, 4>},
    {bf16_dot<2, 1>, bf16_dot<2, 2>, bf16_dot<2, 3>, bf16_dot<2, 4>},
    {bf16_dot<3, 1>, bf16_dot<3, 2>, bf16_dot<3, 3>, bf16_dot<3, 4>},
    {bf16_dot<4, 1>, bf16_dot<4, 2>, bf16_dot<4, 3>, bf16_dot<4, 4>},
};

// y [T, rows] = x (padded rows of kp) times w's rows, BF_R weight rows and up to BF_T activation rows per call of
// the dot table (bf16 or float32 weights), the weight rows split over the threads.
template <typename W, typename Dot>
void row_blocks(const Dot (&dots)[BF_R][BF_T], const W* w, int64_t wstride, int64_t k, const float* xp, int64_t kp,
                int64_t T, int64_t rows, float* y) {
  const int64_t nblk = (rows + BF_R - 1) / BF_R;
  const int64_t grain = grain_for(BF_R * k * T,
                                 std::max<int64_t>(1, std::min<int64_t>(16, nblk / (4 * at::get_num_threads()))));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t r = b * BF_R;
      const int rr = (int)std::min<int64_t>(BF_R, rows - r);
      for (int64_t t0 = 0; t0 < T; t0 += BF_T) {
        const int tt = (int)std::min<int64_t>(BF_T, T - t0);
        dots[rr - 1][tt - 1](w + r * wstride, wstride, k, xp + t0 * kp, kp, y + t0 * rows + r, rows);
      }
    }
  });
}
}  // namespace

// x float32 [T, k] contiguous, w bfloat16 bits (row r at w + r*wstride, k values), y float32 [T, rows].
extern "C" int ds4py_bf16_linear(const float* x, int64_t T, int64_t k, const uint16_t* w, int64_t rows,
                                 int64_t wstride, float* y) {
  try {
    // x rows zero-padded to kp; the AVX512 / AVX2 code takes each 32 values as the 16 even ones, then the 16 odd
    const int64_t kp = (k + 31) / 32 * 32;
    std::vector<float> xp(T * kp, 0.0f);
    for (int64_t t = 0; t < T; t++) {
      if (DS4PY_AVX512 || DS4PY_AVX2) {
        for (int64_t i = 0; i < k; i++) xp[t * kp + i / 32 * 32 + (i % 2) * 16 + (i % 32) / 2] = x[t * k + i];
      } else {
        std::memcpy(xp.data() + t * kp, x + t * k, k * 4);
      }
    }
#if DS4PY_AVX512
    if (T == 1) {  // one activation row (decoding): 16 weight rows at a time, then the rest as below
      const int64_t n16 = rows / 16;
      const int64_t grain = grain_for(16 * k,
                                      std::max<int64_t>(1, std::min<int64_t>(16, n16 / (4 * at::get_num_threads()))));
      at::parallel_for(0, n16, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) bf16_rows16(w + b * 16 * wstride, wstride, k, xp.data(), kp, y + b * 16);
      });
      for (int64_t r = n16 * 16; r < rows; r++) bf16_dot<1, 1>(w + r * wstride, wstride, k, xp.data(), kp, y + r, 1);
      return 0;
    }
#elif DS4PY_AVX2
    if (T == 1) {  // as the AVX512 code, 8 rows at a time
      const int64_t n8 = rows / 8;
      const int64_t grain = grain_for(8 * k,
                                      std::max<int64_t>(1, std::min<int64_t>(32, n8 / (4 * at::get_num_threads()))));
      at::parallel_for(0, n8, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) bf16_rows8(w + b * 8 * wstride, wstride, k, xp.data(), kp, y + b * 8);
      });
      for (int64_t r = n8 * 8; r < rows; r++) bf16_dot<1, 1>(w + r * wstride, wstride, k, xp.data(), kp, y + r, 1);
      return 0;
    }
#endif
    row_blocks(BF16_DOTS, w, wstride, k, xp.data(), kp, T, rows, y);
  } catch (...) {
    return 2;
  }
  return 0;
}

// ds4py_bf16_linear, then each result rounded to bf16 in place (still float32): what .to(bfloat16).float() gives,
// without the two passes over a 129280-row head's output
extern "C" int ds4py_bf16_linear_rounded(const float* x, int64_t T, int64_t k, const uint16_t* w, int64_t rows,
                                         int64_t wstride, float* y) {
  const int rc = ds4py_bf16_linear(x, T, k, w, rows, wstride, y);
  if (rc) return rc;
  for (int64_t i = 0; i < T * rows; i++) y[i] = round_if_bf16(y[i], 1);
  return 0;
}

// Repack MXFP4 rows (ggml blocks, row r at src + r * sstride) into the R16 layout at dst (rows % 16 == 0).
extern "C" int ds4py_mxfp4_repack16(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t rows, int64_t n) {
  if (rows % 16 || n % 32) return 1;
  repack16(src, sstride, dst, rows, n / 32);
  return 0;
}

namespace {
// float32 weights times float32 activations, as bf16_dot without the widening: R weight rows, TT activation rows.
#if DS4PY_AVX512
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
  const int64_t kf = k / 16 * 16;
  auto step = [&](int64_t i, bool tail) {  // as bf16_dot: no tail test in the main loop
    __m512 xv[TT];
    for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_ps(x + t * kp + i);
    for (int r = 0; r < R; r++) {
      const float* wp = w + r * wstride + i;
      float pad[16];
      if (tail) {  // the last partial 16: weights through a zero-padded copy
        std::memset(pad, 0, sizeof(pad));
        std::memcpy(pad, wp, (k - kf) * 4);
        wp = pad;
      } else {
        _mm_prefetch((const char*)(w + r * wstride + i + 256), _MM_HINT_T0);
      }
      const __m512 v = _mm512_loadu_ps(wp);
      for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(v, xv[t], acc[r][t]);
    }
  };
  for (int64_t i = 0; i < kf; i += 16) step(i, false);
  if (kf < kp) step(kf, true);
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) y[t * ystride + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#elif DS4PY_AVX2
// the AVX512 f32_dot, each 16-lane accumulator in two halves: its bits
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  for (int r = 0; r < R; r++) {
    __m256 acc[TT][2];
    for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const float* row = w + r * wstride;
    const int64_t kf = k / 16 * 16;
    auto step = [&](const float* wp, int64_t i) {
      const __m256 v0 = _mm256_loadu_ps(wp), v1 = _mm256_loadu_ps(wp + 8);
      for (int t = 0; t < TT; t++) {
        acc[t][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + t * kp + i), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + t * kp + i + 8), acc[t][1]);
      }
    };
    for (int64_t i = 0; i < kf; i += 16) {
      _mm_prefetch((const char*)(row + i + 256), _MM_HINT_T0);
      step(row + i, i);
    }
    if (kf < kp) {
      float pad[16] = {};
      std::memcpy(pad, row + kf, (k - kf) * 4);
      step(pad, kf);
    }
    for (int t = 0; t < TT; t++) y[t * ystride + r] = reduce16(acc[t][0], acc[t][1]);
  }
}
#else
template <int R, int TT>
void f32_dot(const float* w, int64_t wstride, int64_t k, const float* x, int64_t kp, float* y, int64_t ystride) {
  for (int r = 0; r < R; r++)
    for (int t = 0; t < TT; t++) {
      float lanes[16] = {};
      for (int64_t i = 0; i < k; i++) lanes[i % 16] += w[r * wstride + i] * x[t * kp + i];
      float s = 0.0f;
      for (int l = 0; l < 16; l++) s += lanes[l];
      y[t * ystride + r] = s;
    }
}
#endif

using F32Dot = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
const F32Dot F32_DOTS[BF_R][BF_T] = {
    {f32_dot<1, 1>, f32_dot<1, 2>, f32_dot<1, 3>, f32_dot<1, 4>},
    {f32_dot<2, 1>, f32_dot<2, 2>, f32_dot<2, 3>, f32_dot<2, 4>},
    {f32_dot<3, 1>, f32_dot<3, 2>, f32_dot<3, 3>, f32_dot<3, 4>},
    {f32_dot<4, 1>, f32_dot<4, 2>, f32_dot<4, 3>, f32_dot<4, 4>},
};
}  // namespace

// x float32 [T, k] contiguous, w float32 (row r at w + r*wstride, k values), y float32 [T, rows]: small-T
// products of float32 matrices (the routers) on every thread; torch's single-threaded matrix-vector product
// read a router's 4 MB at one core's bandwidth.
extern "C" int ds4py_f32_linear(const float* x, int64_t T, int64_t k, const float* w, int64_t rows,
                                int64_t wstride, float* y) {
  try {
    const int64_t kp = (k + 15) / 16 * 16;
    std::vector<float> xp(T * kp, 0.0f);
    for (int64_t t = 0; t < T; t++) std::memcpy(xp.data() + t * kp, x + t * k, k * 4);
    row_blocks(F32_DOTS, w, wstride, k, xp.data(), kp, T, rows, y);
  } catch (...) {
    return 2;
  }
  return 0;
}

namespace {
""" + SWIGLU_C + r"""
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
  at::parallel_for(0, first[E] / 16, grain_for(32 * n, 2), [&](int64_t u0, int64_t u1) {  // 16 gate + 16 up rows
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
  at::parallel_for(0, D / 16, grain_for(16 * first[E], 2), [&](int64_t u0, int64_t u1) {  // 16 rows of every W2
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
"""

_lock = threading.Lock()
_libs: dict[bool, ctypes.CDLL | None] = {}
_warned = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "ds4py" / "kernels"


_BF16_NATIVE: list[bool] = []


def bf16_gemm_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16: oneDNN's bf16 GEMM). There a long
    bf16 prompt's large products dequantize W to bf16 and take that GEMM (`bf16_gemm_min_t`); elsewhere they stay in
    the int8 kernels, as decoding does: on AVX2 torch's bf16 GEMM took 451 ms for a 4096 x 4096 Q8_0 matrix at
    T = 256, the int8 kernel 86 (2 cores). DS4PY_BF16_GEMM=1 or 0 decides instead (for tests)."""
    forced = os.environ.get("DS4PY_BF16_GEMM", "")  # read only for long prompts' large products
    if forced:
        return forced != "0"
    if not _BF16_NATIVE:
        flags = set(_cpu_flags().split())
        _BF16_NATIVE.append(bool(flags & {"avx512_bf16", "amx_bf16"}))
    return _BF16_NATIVE[0]


def generic() -> bool:
    """DS4PY_KERNELS_GENERIC=1: the compiled libraries that have SIMD code are built without it (for testing)."""
    return env.flag("DS4PY_KERNELS_GENERIC")


def disabled() -> bool:
    """DS4PY_NO_KERNELS=1: every compiled path off, the torch code runs instead."""
    return env.flag("DS4PY_NO_KERNELS")


def build_library(prefix: str, source: str, cflags: list[str], ldflags: list[str] | None = None) -> ctypes.CDLL:
    """Compile C++ `source` with load_inline into the kernel cache and load it with ctypes. The build is
    named by a hash of the source, the flags, this CPU's flags (for -march=native) and torch's version."""
    from torch.utils.cpp_extension import load_inline

    key = hashlib.sha256("\0".join([source, *cflags, _cpu_flags(), torch.__version__]).encode()).hexdigest()
    name = f"{prefix}_{key[:16]}"
    build = _build_root() / name
    build.mkdir(parents=True, exist_ok=True)
    path = load_inline(name, source, extra_cflags=cflags, extra_ldflags=ldflags or [], build_directory=str(build),
                       is_python_module=False, no_implicit_headers=True)
    return ctypes.CDLL(path)


def lazy_library(prefix: str, source: str, cflags: list[str], ldflags: list[str] | None = None,
                 declare: Callable[[ctypes.CDLL], None] = lambda lib: None) -> Callable[[], ctypes.CDLL | None]:
    """A loader of a small compiled library (hyper-connections, row ops): built with `build_library` at its first
    call, `declare` then setting its functions' types, and kept; None when the kernels are disabled or the build
    failed (the callers run their torch code; `_lib` warns about compilers once)."""
    lock, built = threading.Lock(), []

    def load() -> ctypes.CDLL | None:
        if disabled():
            return None
        if not built:
            with lock:
                if not built:
                    try:
                        lib = build_library(prefix, source, cflags, ldflags)
                        declare(lib)
                        built.append(lib)
                    except Exception:
                        built.append(None)
        return built[0]

    return load


def _compile(generic: bool) -> ctypes.CDLL:
    cflags = ["-O3", "-march=native", "-fopenmp",] + (["-DDS4PY_GENERIC"] if generic else [])
    lib = build_library("ds4py_kernels", _SOURCE, cflags, ["-fopenmp"])
    fn = lib.ds4py_ggml_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.ds4py_kernels_simd.restype = ctypes.c_int
    fn = lib.ds4py_mxfp4_repack16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    fn = lib.ds4py_f32_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn = lib.ds4py_experts_one
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int]
    fn = lib.ds4py_experts_many
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn = lib.ds4py_swiglu
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    fn = lib.ds4py_route
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.ds4py_moe_one
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(MoEPlan), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.ds4py_moe_many
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(MoEPlan), ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    fn = lib.ds4py_project_one
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ProjectPlan), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.ds4py_output_one
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn = lib.ds4py_output_one_plan
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(OutputPlan), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    fn = lib.ds4py_linear_pair
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(Matrix), ctypes.POINTER(Matrix),
                   ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.ds4py_index_query_one
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.POINTER(Matrix), ctypes.POINTER(Matrix), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    fn = lib.ds4py_ggml_dequantize
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int]
    for fn in (lib.ds4py_bf16_linear, lib.ds4py_bf16_linear_rounded):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
    return lib


def _lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or the build failed: warned once)."""
    global _warned
    if disabled():
        return None
    portable = generic()
    if portable in _libs:
        return _libs[portable]
    with _lock:
        if portable not in _libs:
            try:
                _libs[portable] = _compile(portable)
            except Exception as e:  # no compiler, no headers, ...: the torch fallback still works
                _libs[portable] = None
                if not _warned:
                    _warned = True
                    warnings.warn(f"ds4py: CPU kernels unavailable, using dequantize + F.linear ({e!r:.300})",
                                  RuntimeWarning, stacklevel=3)
    return _libs[portable]


def available() -> bool:
    return _lib() is not None


def simd() -> bool:
    """Whether the compiled kernels use SIMD code, AVX512-VNNI or AVX2 (the same values), not the portable loop."""
    return isa() != "portable"


def isa() -> str:
    """The compiled kernels' instruction set here: "avx512" (AVX512-VNNI), "avx2" (AVX2 + FMA: the AVX512 code's
    operations in 256-bit halves, its values), or "portable" (the plain loop; also where there are no kernels)."""
    lib = _lib()
    return {2: "avx512", 1: "avx2"}.get(lib.ds4py_kernels_simd() if lib is not None else 0, "portable")


def dequantize(raw: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """raw Q8_0 / MXFP4 rows (or R16 groups) [out, bytes] -> [out, in] float32 or bfloat16 with the compiled code
    (the same values as `ggml_dequantize(...).to(dtype)`), or None where the kernels are unavailable."""
    lib = _lib()
    if lib is None or raw.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or raw.dim() != 2:
        return None
    raw = contiguous_rows(raw, qtype)
    n = raw.shape[1] // BLOCK_BYTES[qtype] * 32
    out = torch.empty(raw.shape[0], n, dtype=dtype)
    if out.numel():
        rc = lib.ds4py_ggml_dequantize(qtype, raw.data_ptr(), raw.shape[0], raw.stride(0), n, out.data_ptr(),
                                       int(dtype == torch.bfloat16))
        if rc:
            raise RuntimeError(f"ds4py_ggml_dequantize failed ({rc})")
    return out


def fallback_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """Dequantize + F.linear: the reference the kernels approximate."""
    from ds4py.formats.ggml import ggml_dequantize

    n = raw.shape[-1] // BLOCK_BYTES[qtype] * 32
    if qtype == MXFP4_R16:
        raw, qtype = r16_to_ggml(raw), MXFP4
    w = ggml_dequantize(qtype, raw, (raw.shape[0], n))
    return F.linear(x, w.to(x.dtype))


def contiguous_rows(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """raw with contiguous rows (ggml types) or contiguous altogether (R16 groups span 16 rows)."""
    if qtype == MXFP4_R16:
        return raw if raw.is_contiguous() else raw.contiguous()
    return raw if raw.stride(1) == 1 else raw.contiguous()


def bf16_gemm_min_t(values: int, qtype: int = Q8_0, cols: int = 0) -> int:
    """The bf16 activation rows from which a Q8_0 / MXFP4 matrix of `values` values, `cols` wide, is dequantized
    for the bf16 GEMM (where the CPU has it natively). R16 rows never are: their tiles beat it at every chunk size
    (2048 x 4096 on 2 Zen 5 cores, int8 / bf16 time 0.16 / 0.45 / 0.65 / 0.81 at T = 64 / 256 / 512 / 1024), and
    ggml MXFP4 rows (even with it at ~64-128) keep BF16_GEMM_MIN_T."""
    if qtype == MXFP4_R16:
        return 1 << 62
    if qtype != Q8_0 or values < BF16_GEMM_MIN_VALUES:
        return BF16_GEMM_MIN_T
    return BF16_WIDE_MIN_T if cols >= 2048 else BF16_LINEAR_MIN_T


def ggml_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [..., in] @ W.T for W = raw ggml Q8_0 / MXFP4 rows [out, in/32*block_bytes] (or MXFP4_R16 groups) ->
    [..., out] in x.dtype (computed in float32). Falls back to `fallback_linear` off the CPU, with autograd, or
    without kernels."""
    # this runs ~100 times per decoded token, where Python's own time is most of a small matrix's: cheap checks
    # first (a tensor made, even a view, costs ~1 us), no conversions or copies the C code can do (it reads bf16
    # x and writes bf16 y itself)
    qtype = int(qtype)
    bb = BLOCK_BYTES.get(qtype)
    if bb is None or raw.dim() != 2 or raw.dtype != torch.uint8 or (qtype == MXFP4_R16 and raw.shape[0] % 16):
        raise ValueError(f"ggml_linear: need raw uint8 [out, bytes] of Q8_0 or MXFP4, got {raw.dtype} {raw.shape}")
    shape = x.shape
    n = shape[-1]
    rows, row_bytes = raw.shape
    if n % 32 or row_bytes != n // 32 * bb:
        raise ValueError(f"ggml_linear: x [..., {n}] does not match raw rows of {row_bytes} bytes")
    dtype = x.dtype
    if qtype != MXFP4_R16 and dtype in FLOAT_INPUTS and gpu_kernels.takes(x, raw):
        return gpu_kernels.linear(x, raw, qtype)  # (a CUDA device: the Triton kernels)
    lib = None
    if x.is_cpu and raw.is_cpu and dtype in FLOAT_INPUTS and not (x.requires_grad and torch.is_grad_enabled()):
        lib = _lib()
    if lib is None:
        return fallback_linear(x, raw, qtype)
    T = x.numel() // n if n else 0
    if dtype == torch.bfloat16 and T >= bf16_gemm_min_t(rows * n, qtype, n) and bf16_gemm_native():
        # long bf16 prompts: one fast dequantize to bf16, then the bf16 GEMM beats the per-block int8 kernel
        return F.linear(x, dequantize(raw, qtype, torch.bfloat16))
    xk = x.float() if dtype == torch.float16 else x
    if not xk.is_contiguous():
        xk = xk.contiguous()
    y = _ggml_call(lib, qtype, xk, T, n, raw, 1, (*shape[:-1], rows))
    return y if dtype != torch.float16 else y.to(dtype)


def _ggml_call(lib: ctypes.CDLL, qtype: int, x: torch.Tensor, T: int, n: int, raw: torch.Tensor,
               groups: int, out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """ds4py_ggml_linear on contiguous float32/bf16 x (T rows of groups * n) -> y `out_shape` (default [T, rows])
    in x's dtype."""
    raw = contiguous_rows(raw, qtype)
    rows = raw.shape[0]
    y = torch.empty(out_shape or (T, rows), dtype=x.dtype)
    if T and rows:
        bf16 = int(x.dtype == torch.bfloat16)
        rc = lib.ds4py_ggml_linear(qtype, x.data_ptr(), bf16, T, n, raw.data_ptr(), rows, raw.stride(0),
                                   y.data_ptr(), bf16, groups)
        if rc:
            raise RuntimeError(f"ds4py_ggml_linear failed ({rc}; {groups} groups)")
    return y


def ggml_grouped_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """x [T, groups, in] and Q8_0 / MXFP4 rows raw [groups * r, in/32*block_bytes] -> [T, groups * r]: group g's
    rows times x[:, g], in one compiled call (the values of `ggml_linear` on each group's rows and x[:, g]).
    None where that call does not apply (no kernels, off the CPU, autograd, long bf16 prompts, R16 rows):
    the caller multiplies group by group."""
    qtype = int(qtype)
    T, groups, n = x.shape
    if (qtype not in (Q8_0, MXFP4) or raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[0] % groups
            or n % 32 or raw.shape[1] != n // 32 * BLOCK_BYTES[qtype]):
        return None
    if not (x.is_cpu and raw.is_cpu and x.dtype in (torch.float32, torch.bfloat16)) or (
            x.requires_grad and torch.is_grad_enabled()) or (
            x.dtype == torch.bfloat16 and T >= bf16_gemm_min_t(raw.shape[0] // groups * n, qtype, n)
            and bf16_gemm_native()):
        return None
    lib = _lib()
    if lib is None:
        return None
    return _ggml_call(lib, qtype, x.contiguous(), T, n, raw, groups)


def q8_0_linear(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    return ggml_linear(x, raw, Q8_0)


def mxfp4_linear(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    return ggml_linear(x, raw, MXFP4)


def tiled_linear(x: torch.Tensor, w: torch.Tensor, tile: int = BF16_TILE_ROWS) -> torch.Tensor:
    """F.linear(x, w.to(x.dtype)) without ever converting all of w: `tile` output rows at a time (a 1 GB
    bf16 head is never expanded to a 4 GB float32 copy). Exact: each tile is the same F.linear. bf16 x and w on a
    CPU without a native bf16 GEMM (`bf16_gemm_native`): both widened to float32 (a tile of w at a time), the
    result rounded to bf16 once (a bf16 GEMM's values up to its summation order; 5x faster on AVX2)."""
    if x.dtype == w.dtype == torch.bfloat16 and x.is_cpu and not bf16_gemm_native():
        return tiled_linear(x.float(), w, tile).bfloat16()
    if w.dtype == x.dtype:
        return F.linear(x, w)
    rows = w.shape[0]
    if rows <= tile:
        return F.linear(x, w.to(x.dtype))
    out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
    for r in range(0, rows, tile):
        out[..., r:r + tile] = F.linear(x, w[r:r + tile].to(x.dtype))
    return out


def bf16_linear(x: torch.Tensor, w: torch.Tensor, as_float32: bool = False) -> torch.Tensor:
    """x [..., in] (float32 or bfloat16) @ w.T for w bfloat16 [out, in] -> [..., out] in x.dtype, with the compiled
    kernel: weights widened exactly to float32, float32 products and sums (bf16 x is widened once; its
    result is rounded once at the end). Each row's result does not depend on the other rows of x. Falls
    back to `tiled_linear` off the CPU, for other dtypes, with autograd, or without kernels. as_float32: the
    result as float32 (`.float()` of it, a bf16 x's rounding done in the call)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError(f"bf16_linear: need a bfloat16 [out, in] weight, got {w.dtype} {tuple(w.shape)}")
    n = x.shape[-1]
    if w.shape[1] != n:
        raise ValueError(f"bf16_linear: x [..., {n}] does not match the weight's {w.shape[1]} columns")
    lib = None
    if x.dtype in FLOAT_INPUTS and w.stride(1) == 1 and gpu_kernels.takes(x, w):
        y = gpu_kernels.bf16_linear(x, w, as_float32)  # (a CUDA device: the Triton kernel, up to its rows)
        if y is not None:
            return y
    elif (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not (x.requires_grad and torch.is_grad_enabled())):
        lib = _lib()
    if lib is None:
        y = tiled_linear(x, w)
        return y.float() if as_float32 else y
    flat = x.dim() == 2  # (a decoding token's [1, in]: no reshapes)
    x2 = x if flat and x.dtype == torch.float32 and x.is_contiguous() else x.reshape(-1, n).float().contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    rows = w.shape[0]
    y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    if x2.shape[0] and rows:
        rounded = x.dtype == torch.bfloat16 and as_float32
        rc = (lib.ds4py_bf16_linear_rounded if rounded else lib.ds4py_bf16_linear)(
            x2.data_ptr(), x2.shape[0], n, w.data_ptr(), rows, w.stride(0), y.data_ptr())
        if rc:
            raise RuntimeError(f"ds4py_bf16_linear failed ({rc})")
    if not flat:
        y = y.reshape(*x.shape[:-1], rows)
    return y if as_float32 else y.to(x.dtype)


def f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w.T for a float32 w [out, in] -> float32 [..., out], with the compiled kernel (float32
    products and sums on every thread) for up to BF16_KERNEL_MAX_T rows; else, and off the CPU or with
    autograd, F.linear."""
    x = x.float()
    n = x.shape[-1]
    T = x.numel() // n if n else 0
    lib = None
    if (w.dtype == torch.float32 and w.dim() == 2 and w.shape[1] == n and T <= BF16_KERNEL_MAX_T and x.is_cpu
            and w.is_cpu and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        lib = _lib()
    if lib is None:
        return F.linear(x, w)
    x2 = x.reshape(-1, n).contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    rows = w.shape[0]
    y = torch.empty(T, rows, dtype=torch.float32)
    if T and rows:
        rc = lib.ds4py_f32_linear(x2.data_ptr(), T, n, w.data_ptr(), rows, w.stride(0), y.data_ptr())
        if rc:
            raise RuntimeError(f"ds4py_f32_linear failed ({rc})")
    return y.reshape(*x.shape[:-1], rows)


def _expert_pointers(experts: list[tuple[torch.Tensor, ...]]) -> tuple[list[int], list[int], list[int]] | None:
    """The experts' raw matrices (W1, W3, W2 each) as the C calls take them: their addresses and row strides in
    order, and each expert's inter size (W1's rows); None unless every one is a CPU matrix with contiguous rows."""
    mats, strides, inter = [], [], []
    for raws in experts:
        for raw in raws:
            if raw.device.type != "cpu" or raw.dim() != 2 or raw.stride(1) != 1:
                return None
            mats.append(raw.data_ptr())
            strides.append(raw.stride(0))
        inter.append(raws[0].shape[0])
    return mats, strides, inter


def experts_one(x: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                qtypes: list[tuple[int, int, int]], weights: list[float], limit: float) -> torch.Tensor | None:
    """One token x [1, D] through several experts: sum_e weights[e] * W2 swiglu(W1 x, W3 x) -> [1, D] in x.dtype,
    each expert given as its raw ggml rows (W1, W3 [inter, D/32*bb], W2 [D, inter/32*bb]) and their qtypes, in
    one compiled call (float32 inside, activations quantized to Q8_0 per 32 as `ggml_linear` does; or plain
    KIND_BF16 / KIND_F32 rows, `plan_rows`, multiplied in float32). None where the kernels do not apply (no
    compiler, not on the CPU, another dtype, autograd)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[0] != 1
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    lib = _lib()
    if lib is None:
        return None
    D = x.shape[-1]
    if D % 16 or any(raws[0].shape[0] % 16 for raws in experts):  # the call works in groups of 16 rows
        return None
    pointers = _expert_pointers(experts)
    if pointers is None:
        return None
    mats, strides, inter = pointers
    x = x.contiguous()
    E = len(experts)
    out = torch.empty(1, D, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    rc = lib.ds4py_experts_one(x.data_ptr(), bf16, D, E, (ctypes.c_int64 * (3 * E))(*mats),
                               (ctypes.c_int32 * (3 * E))(*[q for t in qtypes for q in t]),
                               (ctypes.c_int64 * (3 * E))(*strides), (ctypes.c_int64 * E)(*inter),
                               (ctypes.c_float * E)(*weights), limit, D, out.data_ptr(), bf16)
    if rc:
        raise RuntimeError(f"ds4py_experts_one failed ({rc})")
    return out


def experts_many(x: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 qtypes: list[tuple[int, int, int]], counts: list[int], tokens: torch.Tensor, weights: torch.Tensor,
                 limit: float, into: torch.Tensor | None = None) -> torch.Tensor | None:
    """T tokens x [T, D] through their experts in one compiled call -> [T, D] in x.dtype. Expert e (raw ggml rows
    and qtypes as in `experts_one`) runs on the next counts[e] (token, weight) pairs of `tokens` [P] and `weights`
    [P]; each token's output is the sum of its pairs' weight * W2 swiglu(W1 x, W3 x) in pair order, float32 inside
    (activations quantized to Q8_0 per 32 as `ggml_linear` does). `into`: a float32 [T, D] sum to add to (and
    return), so experts run in several calls sum to the same bits as in one. None where the kernels do not apply."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    lib = _lib()
    if lib is None:
        return None
    T, D = x.shape
    if D % 32 or any(raws[0].shape[0] % 32 for raws in experts) or len(counts) != len(experts):  # rows by 32
        return None
    pointers = _expert_pointers(experts)
    if pointers is None:
        return None
    mats, strides, inter = pointers
    for raws, qts, i in zip(experts, qtypes, inter):
        # W1, W3 [inter, D values], W2 [D, inter values]: the C code reads rows of these lengths
        want = ((i, D), (i, D), (D, i))
        if any(q not in BLOCK_BYTES or tuple(raw.shape) != (r, c // 32 * BLOCK_BYTES[q])
               for raw, q, (r, c) in zip(raws, qts, want)):
            raise ValueError(f"experts_many: an expert's matrices {[tuple(r.shape) for r in raws]} do not match "
                             f"D={D} and its {i} rows")
    E = len(experts)
    pairs = [0]
    for c in counts:
        pairs.append(pairs[-1] + c)
    tokens = tokens.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    if tokens.numel() != pairs[-1] or weights.numel() != pairs[-1]:
        raise ValueError(f"experts_many: {pairs[-1]} pairs counted, {tokens.numel()} tokens, {weights.numel()} weights")
    if into is not None and (into.dtype != torch.float32 or into.shape != (T, D) or not into.is_contiguous()):
        raise ValueError(f"experts_many: into must be float32 [{T}, {D}], contiguous; got {into.dtype} {into.shape}")
    x = x.contiguous()
    out = into if into is not None else torch.empty(T, D, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    rc = lib.ds4py_experts_many(x.data_ptr(), bf16, T, D, E, (ctypes.c_int64 * (3 * E))(*mats),
                                (ctypes.c_int32 * (3 * E))(*[q for t in qtypes for q in t]),
                                (ctypes.c_int64 * (3 * E))(*strides), (ctypes.c_int64 * E)(*inter),
                                (ctypes.c_int64 * (E + 1))(*pairs), tokens.data_ptr(), weights.data_ptr(), limit, D,
                                out.data_ptr(), int(bf16 and into is None), int(into is not None))
    if rc:
        raise RuntimeError(f"ds4py_experts_many failed ({rc})")
    return out


SCORES = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}  # the C code's score functions


def route(logits: torch.Tensor, bias: torch.Tensor | None, score_func: str, k: int, scaling: float,
          hash_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Router logits [T, E] float32 -> (weights [T, k] float32, expert ids [T, k] int64 ascending), in one compiled
    call: the scores `score_func(logits)`, the k largest of scores + bias (ties to the lower id) or the given
    hash_ids [T, k], weights = their scores / (sum + 1e-20) * scaling. `moe_one` routes decode tokens with the same
    code. None where the kernels do not apply."""
    score = SCORES.get(score_func)
    if score is None or not logits.is_cpu or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    if bias is not None and (not bias.is_cpu or bias.dtype != torch.float32 or bias.numel() != logits.shape[1]):
        return None
    lib = _lib()
    if lib is None:
        return None
    T, E = logits.shape
    logits = logits.contiguous()
    if hash_ids is not None:
        hash_ids = hash_ids.to(torch.int64).contiguous()
        if tuple(hash_ids.shape) != (T, k):
            raise ValueError(f"route: hash ids {tuple(hash_ids.shape)} for {T} tokens of {k} experts each")
    bias = None if bias is None else bias.contiguous()
    weights = torch.empty(T, k, dtype=torch.float32)
    ids = torch.empty(T, k, dtype=torch.int64)
    if T:
        rc = lib.ds4py_route(logits.data_ptr(), T, E, None if bias is None else bias.data_ptr(), score, k, scaling,
                             None if hash_ids is None else hash_ids.data_ptr(), weights.data_ptr(), ids.data_ptr())
        if rc:
            raise ValueError(f"ds4py_route failed ({rc}): {k} of {E} experts, or a hash id out of range")
    return weights, ids


class MoEPlan(ctypes.Structure):
    """A layer's MoE as `ds4py_moe_one` reads it (the C struct MoEPlan): addresses into tensors that the plan
    keeps alive in `keep`."""

    _fields_ = [("n", ctypes.c_int64), ("E", ctypes.c_int64), ("router", ctypes.c_void_p),
                ("router_stride", ctypes.c_int64), ("bias", ctypes.c_void_p), ("score", ctypes.c_int32),
                ("k", ctypes.c_int32), ("scaling", ctypes.c_float), ("limit", ctypes.c_float),
                ("inter", ctypes.c_int64), ("stacks", ctypes.c_int64 * 3), ("expert_bytes", ctypes.c_int64 * 3),
                ("strides", ctypes.c_int64 * 3), ("qtypes", ctypes.c_int32 * 3), ("shared", ctypes.c_int32),
                ("shared_mats", ctypes.c_int64 * 12), ("shared_strides", ctypes.c_int64 * 12),
                ("shared_inter", ctypes.c_int64 * 4), ("shared_qtypes", ctypes.c_int32 * 12)]


def moe_plan(router: torch.Tensor, bias: torch.Tensor | None, score_func: str, k: int, scaling: float,
             stacks: list[tuple[torch.Tensor, int]], shared: list[tuple[tuple[torch.Tensor, int], ...]],
             limit: float) -> MoEPlan | None:
    """The plan of a resident MoE for `moe_one`: router [E, n] float32, bias [E] or None, the routed experts' W1,
    W3, W2 stacks as (raw uint8 [E, rows, bytes], qtype) with contiguous rows, and each shared expert's (W1, W3, W2)
    as (raw [rows, bytes], qtype) (`plan_rows`; bf16 / float32 matrices too: their experts then run product by
    product, and `moe_many` stands aside). None where the call does not apply (not CPU, other dtypes or layouts)."""
    score = SCORES.get(score_func)
    E, n = router.shape
    w1, w3, w2 = stacks
    inter = w1[0].shape[1]
    mats = [raw for raw, _ in stacks] + [raw for trio in shared for raw, _ in trio]
    if (score is None or router.dtype != torch.float32 or not router.is_cpu or router.stride(1) != 1
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu or bias.numel() != E))
            or len(shared) > 4 or not 0 < k <= E or n % 32 or inter % 32
            or any(not m.is_cpu or m.dtype != torch.uint8 or m.stride(-1) != 1 for m in mats)
            or any(raw.dim() != 3 or raw.shape[0] != E for raw, _ in stacks)
            or any(q not in BLOCK_BYTES and q not in FLOAT_BYTES
                   for _, q in [*stacks, *(m for trio in shared for m in trio)])):
        return None
    want = ((inter, n), (inter, n), (n, inter))  # W1, W3 [inter, n values], W2 [n, inter values]
    for (raw, q), (r, c) in zip(stacks, want):
        if tuple(raw.shape[1:]) != (r, row_bytes(q, c)):
            return None
    for trio in shared:
        i = trio[0][0].shape[0]
        for (raw, q), (r, c) in zip(trio, ((i, n), (i, n), (n, i))):
            if raw.dim() != 2 or tuple(raw.shape) != (r, row_bytes(q, c)) or i % 32:
                return None
    if bias is not None:
        bias = bias.contiguous()
    plan = MoEPlan(n=n, E=E, router=router.data_ptr(), router_stride=router.stride(0),
                   bias=None if bias is None else bias.data_ptr(), score=score, k=k, scaling=scaling, limit=limit,
                   inter=inter, shared=len(shared))
    for m, (raw, q) in enumerate(stacks):
        plan.stacks[m], plan.expert_bytes[m], plan.strides[m], plan.qtypes[m] = (
            raw.data_ptr(), raw.stride(0), raw.stride(1), q)
    for s, trio in enumerate(shared):
        for m, (raw, q) in enumerate(trio):
            plan.shared_mats[3 * s + m], plan.shared_strides[3 * s + m] = raw.data_ptr(), raw.stride(0)
            plan.shared_qtypes[3 * s + m] = q
        plan.shared_inter[s] = trio[0][0].shape[0]
    plan.keep = (router, bias, mats)
    plan.plain = any(q in FLOAT_BYTES for _, q in [*stacks, *(m for trio in shared for m in trio)])  # (`moe_many`)
    return plan


def moe_one(plan: MoEPlan, x: torch.Tensor, hash_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    """One token x [1, n] through the MoE of `plan` in one compiled call -> (out [1, n] in x.dtype, weights [1, k],
    ids [1, k]): `route` on the router's float32 logits (the bits of `f32_linear`), then `experts_one` on the
    chosen experts in ascending id and the shared ones. hash_ids: the token's [1, k] ids (hash-routed layers).
    None where the kernels do not apply."""
    if not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or x.shape != (1, plan.n) or (
            x.requires_grad and torch.is_grad_enabled()):
        return None
    lib = _lib()
    if lib is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    if hash_ids is not None:
        hash_ids = hash_ids.to(torch.int64).contiguous()
        if hash_ids.numel() != plan.k:
            raise ValueError(f"moe_one: {hash_ids.numel()} hash ids for {plan.k} experts per token")
    bf16 = int(x.dtype == torch.bfloat16)
    out = torch.empty(1, plan.n, dtype=x.dtype)
    weights = torch.empty(1, plan.k, dtype=torch.float32)
    ids = torch.empty(1, plan.k, dtype=torch.int64)
    rc = lib.ds4py_moe_one(plan, x.data_ptr(), bf16, None if hash_ids is None else hash_ids.data_ptr(),
                           out.data_ptr(), bf16, weights.data_ptr(), ids.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_moe_one failed ({rc})")
    return out, weights, ids


def moe_many(plan: MoEPlan, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             shared: bool) -> torch.Tensor | None:
    """T tokens x [T, n] through the routed experts `ids` [T, k] (weights [T, k]) of the MoE of `plan` and, when
    `shared`, its shared experts, in one compiled call -> [T, n] in x.dtype: the pairs, order and values of
    `experts_many` as MoE.fused_many calls it. None where the kernels do not apply."""
    if (not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or x.shape[1] != plan.n
            or tuple(ids.shape) != (x.shape[0], plan.k) or tuple(weights.shape) != tuple(ids.shape)
            or (x.requires_grad and torch.is_grad_enabled()) or plan.plain):  # (the int8 tiles only)
        return None
    lib = _lib()
    if lib is None:
        return None
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    bf16 = int(x.dtype == torch.bfloat16)
    out = torch.empty_like(x)
    rc = lib.ds4py_moe_many(plan, x.data_ptr(), bf16, x.shape[0], ids.data_ptr(), weights.data_ptr(), int(shared),
                            out.data_ptr(), bf16)
    if rc:
        raise RuntimeError(f"ds4py_moe_many failed ({rc}): an expert id outside [0, {plan.E})?")
    return out


class Matrix(ctypes.Structure):
    """A 2-D weight as the one-token C calls read it (the C struct Matrix): its rows' address, kind (Q8_0, MXFP4,
    KIND_BF16, KIND_F32), rows, columns and row stride in bytes."""

    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int32), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("stride", ctypes.c_int64)]


def matrix(weight) -> tuple[Matrix, torch.Tensor] | None:
    """(`Matrix`, the tensor it points into: keep it alive with the Matrix) for a CPU weight the one-token calls
    multiply with `linear`'s values at T = 1: Q8_0 / MXFP4 rows (`kernel_rows`), or a bf16 / float32 matrix
    (`BF16Matrix`, `Dense`; their products then in float32, rounded once: F.linear's up to summation order).
    None for anything else."""
    rows = weight.kernel_rows()
    if rows is not None:
        raw, qtype = rows
        if qtype not in (Q8_0, MXFP4) or not raw.is_cpu or raw.dim() != 2 or raw.stride(1) != 1:
            return None
        cols = raw.shape[1] // BLOCK_BYTES[qtype] * 32
        return Matrix(raw.data_ptr(), qtype, raw.shape[0], cols, raw.stride(0)), raw
    t = getattr(weight, "tensor", None)
    if (t is None or t.dim() != 2 or not t.is_cpu or t.stride(1) != 1 or t.dtype not in (torch.bfloat16, torch.float32)
            or t.requires_grad):
        return None
    kind = KIND_BF16 if t.dtype == torch.bfloat16 else KIND_F32
    return Matrix(t.data_ptr(), kind, t.shape[0], t.shape[1], t.stride(0) * t.element_size()), t


def linear_pair(x: torch.Tensor, a: Matrix, b: Matrix, ya: torch.Tensor, yb: torch.Tensor) -> bool:
    """One token x [1, n]'s products with matrices a and b (`matrix`; n columns each) in one compiled call, written
    into ya [a.rows] and yb [b.rows] (contiguous, x's dtype). False (nothing written) where it does not apply."""
    n = x.shape[-1]
    if (not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() != n or ya.dtype != x.dtype
            or yb.dtype != x.dtype or ya.numel() != a.rows or yb.numel() != b.rows or a.cols != n or b.cols != n
            or not (ya.is_contiguous() and yb.is_contiguous()) or (x.requires_grad and torch.is_grad_enabled())):
        return False
    lib = _lib()
    if lib is None:
        return False
    if not x.is_contiguous():
        x = x.contiguous()
    rc = lib.ds4py_linear_pair(x.data_ptr(), int(x.dtype == torch.bfloat16), n, a, b, ya.data_ptr(), yb.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_linear_pair failed ({rc})")
    return True


def linear_pair_address() -> int | None:
    """The address of the compiled ds4py_linear_pair, for compiled code elsewhere that makes its products through
    it (`compressor_kernel`'s one-token step: one copy of the matrix code); None without the kernels."""
    lib = _lib()
    return None if lib is None else ctypes.cast(lib.ds4py_linear_pair, ctypes.c_void_p).value


def index_query_one(q_residual: torch.Tensor, x: torch.Tensor, wq: Matrix, wp: Matrix, heads: int, head_dim: int,
                    rotation: torch.Tensor, wscale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One token's indexer query in one compiled call: q [1, heads, head_dim] = wq q_residual, rotated by rotation
    [1, half] complex64 (as `rope.rotate`), and the head weights w [1, heads] float32 = (wp x in x's dtype) *
    wscale; or None where it does not apply."""
    dtype = x.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or q_residual.dtype != dtype or not (x.is_cpu and
            q_residual.is_cpu) or x.shape[0] != 1 or q_residual.shape[0] != 1 or rotation.dtype != torch.complex64
            or wq.rows != heads * head_dim or wp.rows != heads or wq.cols != q_residual.shape[-1]
            or wp.cols != x.shape[-1] or (x.requires_grad and torch.is_grad_enabled())):
        return None
    half = rotation.shape[-1]
    if rotation.numel() != half or 2 * half > head_dim:
        return None
    lib = _lib()
    if lib is None:
        return None
    if rotation.is_conj() or not rotation.is_contiguous():
        rotation = rotation.resolve_conj().contiguous()
    q_residual, x = q_residual.contiguous(), x.contiguous()
    q = torch.empty(1, heads, head_dim, dtype=dtype)
    w = torch.empty(1, heads, dtype=torch.float32)
    rc = lib.ds4py_index_query_one(q_residual.data_ptr(), q_residual.shape[-1], x.data_ptr(), x.shape[-1],
                                   int(dtype == torch.bfloat16), wq, wp, heads, head_dim, rotation.data_ptr(), half,
                                   wscale, q.data_ptr(), w.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_index_query_one failed ({rc})")
    return q, w


class ProjectPlan(ctypes.Structure):
    """A layer's attention projections as `ds4py_project_one` reads them (the C struct ProjectPlan): addresses into
    tensors that the plan keeps alive in `keep`."""

    _fields_ = [("D", ctypes.c_int64), ("q_lora", ctypes.c_int64), ("H", ctypes.c_int64), ("hd", ctypes.c_int64),
                ("w", ctypes.c_void_p * 3), ("strides", ctypes.c_int64 * 3), ("qtypes", ctypes.c_int32 * 3),
                ("q_norm", ctypes.c_void_p), ("kv_norm", ctypes.c_void_p), ("q_norm_bf", ctypes.c_int32),
                ("kv_norm_bf", ctypes.c_int32), ("eps", ctypes.c_float)]


def project_plan(wq_a: tuple[torch.Tensor, int], q_norm: torch.Tensor, wq_b: tuple[torch.Tensor, int],
                 wkv: tuple[torch.Tensor, int], kv_norm: torch.Tensor, heads: int, head_dim: int,
                 eps: float) -> ProjectPlan | None:
    """The plan of a layer's attention projections for `project_one`: wq_a, wq_b, wkv as (raw rows, kind)
    (`plan_rows`: Q8_0, MXFP4, bf16 or float32, contiguous rows), the q and kv norm weights (float32 or bf16). None
    where it does not apply."""
    mats = (wq_a, wq_b, wkv)
    if any(q not in ROW_KINDS for _, q in mats):
        return None
    q_lora = q_norm.numel()
    D = row_values(*wq_a)
    want = ((q_lora, D), (heads * head_dim, q_lora), (head_dim, D))  # [rows, values per row]
    if any(raw.dim() != 2 or raw.dtype != torch.uint8 or not raw.is_cpu or raw.stride(1) != 1
           or tuple(raw.shape) != (r, row_bytes(q, c)) or c % 32 for (raw, q), (r, c) in zip(mats, want)):
        return None
    norms = (q_norm.contiguous(), kv_norm.contiguous())
    if (any(n.dtype not in (torch.float32, torch.bfloat16) or not n.is_cpu for n in norms)
            or norms[1].numel() != head_dim):
        return None
    plan = ProjectPlan(D=D, q_lora=q_lora, H=heads, hd=head_dim, q_norm=norms[0].data_ptr(),
                       kv_norm=norms[1].data_ptr(), q_norm_bf=int(norms[0].dtype == torch.bfloat16),
                       kv_norm_bf=int(norms[1].dtype == torch.bfloat16), eps=eps)
    for m, (raw, q) in enumerate(mats):
        plan.w[m], plan.strides[m], plan.qtypes[m] = raw.data_ptr(), raw.stride(0), q
    plan.keep = (mats, norms)
    return plan


def project_one(plan: ProjectPlan, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """One token x [1, D] through its layer's attention projections in one compiled call -> (q_residual [1, q_lora],
    qkv [1, H + 1, hd]: q's heads normed and rotated, then kv), in x's dtype: the values of `ggml_linear`, the
    compiled norms and rotation called one by one. rotation: [1, half] complex64. None where it does not apply."""
    if (not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or x.shape != (1, plan.D)
            or rotation.dtype != torch.complex64 or rotation.is_conj() or not rotation.is_cpu
            or 2 * rotation.shape[-1] > plan.hd or rotation.numel() != rotation.shape[-1]
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    lib = _lib()
    if lib is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    if not rotation.is_contiguous():
        rotation = rotation.contiguous()
    q_residual = torch.empty(1, plan.q_lora, dtype=x.dtype)
    qkv = torch.empty(1, plan.H + 1, plan.hd, dtype=x.dtype)
    rc = lib.ds4py_project_one(plan, x.data_ptr(), int(x.dtype == torch.bfloat16), rotation.data_ptr(),
                               rotation.shape[-1], q_residual.data_ptr(), qkv.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_project_one failed ({rc})")
    return q_residual, qkv


class OutputPlan(ctypes.Structure):
    """A layer's output projections as `ds4py_output_one_plan` reads them (the C struct OutputPlan): addresses into
    tensors that the plan keeps alive in `keep`."""

    _fields_ = [("groups", ctypes.c_int64), ("n", ctypes.c_int64), ("wo_a", ctypes.c_void_p), ("qa", ctypes.c_int32),
                ("rows_a", ctypes.c_int64), ("stride_a", ctypes.c_int64), ("wo_b", ctypes.c_void_p),
                ("qb", ctypes.c_int32), ("D", ctypes.c_int64), ("stride_b", ctypes.c_int64)]


def output_plan(wo_a: tuple[torch.Tensor, int], wo_b: tuple[torch.Tensor, int], groups: int,
                width: int) -> OutputPlan | None:
    """The plan of a layer's output projections for `output_one`: wo_a [groups * r, width / groups] and wo_b
    [D, groups * r] as (raw rows, kind) (`plan_rows`: Q8_0, MXFP4, bf16 or float32); width: heads * head_dim. None
    where it does not apply."""
    (raw_a, qa), (raw_b, qb) = wo_a, wo_b
    n = width // groups if groups else 0
    rows_a, D = raw_a.shape[0], raw_b.shape[0]
    if (n * groups != width or n % 32 or qa not in ROW_KINDS or qb not in ROW_KINDS or rows_a % groups
            or rows_a % 32 or any(not r.is_cpu or r.dim() != 2 or r.dtype != torch.uint8 or r.stride(1) != 1
                                  for r in (raw_a, raw_b))
            or raw_a.shape[1] != row_bytes(qa, n) or raw_b.shape[1] != row_bytes(qb, rows_a)):
        return None
    plan = OutputPlan(groups=groups, n=n, wo_a=raw_a.data_ptr(), qa=qa, rows_a=rows_a, stride_a=raw_a.stride(0),
                      wo_b=raw_b.data_ptr(), qb=qb, D=D, stride_b=raw_b.stride(0))
    plan.keep = (raw_a, raw_b)
    return plan


def output_one(plan: OutputPlan, out: torch.Tensor) -> torch.Tensor | None:
    """One token's attention output out [1, H, hd] -> [1, D] in out's dtype in one compiled call: the grouped wo_a
    (`ggml_grouped_linear`: group g's rows times the g-th slice of out) then wo_b (`ggml_linear`), the same values
    as those two calls. None where it does not apply."""
    if (not out.is_cpu or out.dtype not in (torch.float32, torch.bfloat16) or out.shape[0] != 1
            or out.numel() != plan.groups * plan.n or (out.requires_grad and torch.is_grad_enabled())):
        return None
    lib = _lib()
    if lib is None:
        return None
    if not out.is_contiguous():
        out = out.contiguous()
    y = torch.empty(1, plan.D, dtype=out.dtype)
    rc = lib.ds4py_output_one_plan(plan, out.data_ptr(), int(out.dtype == torch.bfloat16), y.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_output_one failed ({rc})")
    return y


def repack16(raw: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """MXFP4 rows in the ggml layout, raw uint8 [..., rows, n/32*17] with rows % 16 == 0 -> the same bytes
    repacked by groups of 16 rows (the R16 layout the kernels read fastest), into `out` (may be `raw` itself:
    repacked in place) or a new tensor. None where the kernels are unavailable."""
    lib = _lib()
    if lib is None or raw.device.type != "cpu":
        return None
    rows, rb = raw.shape[-2], raw.shape[-1]
    if rows % 16 or n % 32 or rb != n // 32 * 17:
        raise ValueError(f"repack16: need MXFP4 rows of {n} values, a multiple of 16 of them; got {tuple(raw.shape)}")
    raw = raw if raw.is_contiguous() else raw.contiguous()
    out = torch.empty_like(raw) if out is None else out
    stacks = raw.numel() // (rows * rb)
    for i in range(stacks):  # experts one by one: each a [rows, rb] matrix
        off = i * rows * rb
        rc = lib.ds4py_mxfp4_repack16(raw.data_ptr() + off, rb, out.data_ptr() + off, rows, n)
        if rc:
            raise RuntimeError(f"ds4py_mxfp4_repack16 failed ({rc})")
    return out


def r16_to_ggml(raw: torch.Tensor) -> torch.Tensor:
    """R16 rows uint8 [rows, bytes] -> the ggml MXFP4 rows they were repacked from (torch ops, any device)."""
    rows, rb = raw.shape
    nb = rb // 17
    g = raw.reshape(rows // 16, nb, 272)
    scales = g[..., :16]  # [G, nb, 16 rows]
    # byte 16 + 64v + 4r + k is byte j = 4v + k of row r: [G, nb, v, r, k] -> [G, nb, r, j]
    qs = g[..., 16:].reshape(rows // 16, nb, 4, 16, 4).permute(0, 1, 3, 2, 4).reshape(rows // 16, nb, 16, 16)
    blocks = torch.cat([scales.unsqueeze(-1), qs], dim=-1)  # [G, nb, 16, 17]
    return blocks.permute(0, 2, 1, 3).reshape(rows, rb)


def r16_dequantize_torch(raw: torch.Tensor, n: int) -> torch.Tensor:
    from ds4py.formats.ggml import dequantize_mxfp4

    return dequantize_mxfp4(r16_to_ggml(raw), n)

