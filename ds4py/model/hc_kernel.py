"""The hyper-connection mixing weights in one compiled call. After the [T, (2 + hc) * hc] projection,
mHC applies sigmoids, a softmax and ~20 Sinkhorn-Knopp iterations to tiny [hc, hc] matrices: ~90 torch
ops of a few values each, twice per layer, whose dispatch cost (~0.35 ms per call) rivals the matmuls in
decoding. Here they run as one C++ loop in float32 (same operations, same order; `expf` may differ from
torch's vectorised exp in the last bit). Compiled at first use like `ds4py.formats.kernels`; without a
compiler, or with DS4PY_NO_KERNELS=1, callers use the torch code."""

from __future__ import annotations

import ctypes
import threading

import torch

from ds4py.formats import kernels

_SOURCE = r"""
#include <cmath>
#include <cstdint>

extern "C" void ds4py_hc_weights(const float* mix, int64_t T, int hc, const float* base, const float* scale,
                                 int iters, float eps, float* pre, float* post, float* comb) {
  const int row = (2 + hc) * hc;
  for (int64_t t = 0; t < T; t++) {
    const float* m = mix + t * row;
    float* pr = pre + t * hc;
    float* po = post + t * hc;
    float* c = comb + t * hc * hc;
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
    for (int it = 0; it < iters; it++) {
      if (it > 0) {  // normalise rows (every iteration but the first)
        for (int i = 0; i < hc; i++) {
          float s = 0.0f;
          for (int j = 0; j < hc; j++) s += c[i * hc + j];
          for (int j = 0; j < hc; j++) c[i * hc + j] /= s + eps;
        }
      }
      for (int j = 0; j < hc; j++) {  // normalise columns
        float s = 0.0f;
        for (int i = 0; i < hc; i++) s += c[i * hc + j];
        for (int i = 0; i < hc; i++) c[i * hc + j] /= s + eps;
      }
    }
  }
}
"""

_lock = threading.Lock()
_lib: list = []


def _load() -> ctypes.CDLL | None:
    if kernels.disabled():
        return None
    if _lib:
        return _lib[0]
    with _lock:
        if not _lib:
            try:
                lib = kernels.build_library("ds4py_hc", _SOURCE, ["-O2"])
                lib.ds4py_hc_weights.restype = None
                lib.ds4py_hc_weights.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_void_p]
                _lib.append(lib)
            except Exception:  # the torch code is the fallback; ds4py.formats.kernels warns about compilers
                _lib.append(None)
    return _lib[0]


def hc_weights(mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """mix [T, (2 + hc) * hc] float32 (CPU) -> pre [T, hc], post [T, hc], comb [T, hc, hc]; None when the
    compiled code is not available (or the tensors are not on the CPU)."""
    if mix.device.type != "cpu" or base.device.type != "cpu":
        return None
    lib = _load()
    if lib is None:
        return None
    mix = mix.float().contiguous()
    base, scale = base.float().contiguous(), scale.float().contiguous()
    T = mix.shape[0]
    pre, post, comb = mix.new_empty(T, hc), mix.new_empty(T, hc), mix.new_empty(T, hc, hc)
    lib.ds4py_hc_weights(mix.data_ptr(), T, hc, base.data_ptr(), scale.data_ptr(), iters, eps, pre.data_ptr(),
                         post.data_ptr(), comb.data_ptr())
    return pre, post, comb
