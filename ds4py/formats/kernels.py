"""CPU matrix-vector kernels for ggml Q8_0 and MXFP4 weights kept packed in memory.

`q8_0_linear(x, raw)` / `mxfp4_linear(x, raw)` compute x [T, in] @ W.T for W given as its raw ggml rows
(uint8 [out, in/32*34] or [out, in/32*17]) without dequantizing W. As in llama.cpp, the activations are
first quantized to Q8_0 (per 32 values: int8 codes and one float scale), then every weight block is
multiplied in int8 x int8 -> int32 (AVX512-VNNI `vpdpbusd` where the CPU has it, AVX2's `vpmaddubsw` where it
has that, a plain loop elsewhere) and accumulated in float with the product of the two block scales. The activation
rounding makes the result differ from `F.linear(x, W.dequantize())` by a relative ~0.5%.

The C++ code (ds4py/csrc/kernels/, one file per section, joined by `csrc`) is compiled at first use with
`torch.utils.cpp_extension.load_inline` into $TORCH_EXTENSIONS_DIR or ~/.cache/ds4py/kernels (about 3 s; it
includes only ATen's parallel_for header and is loaded with ctypes, not pybind11) and parallelized over output
rows with `at::parallel_for`, so it follows `torch.set_num_threads`. When it cannot be built (no compiler: one
warning, then the fallback), when the tensors are not on the CPU, or when DS4PY_NO_KERNELS=1, the functions use
`fallback_linear`: dequantize + `F.linear`, exactly what `Weight.linear` did before.
The SIMD code is AVX512-VNNI's, or on CPUs with AVX2 + FMA only its operations in 256-bit halves (the same
values, `isa`); DS4PY_KERNELS_GENERIC=1 builds the portable loop instead (for testing it).

For bf16 or float32 activations with >= BF16_GEMM_MIN_T rows (long prompts; fewer for large Q8_0 matrices, R16 rows
only with AMX: `bf16_gemm_min_t`) on CPUs with a native bf16 GEMM (`bf16_gemm_native`) `ggml_linear` instead
dequantizes W to bf16 with the compiled `dequantize` and calls that GEMM: exactly
F.linear(x, W.dequantize(torch.bfloat16)) for bf16 x, and that of x rounded to bf16, widened back, for float32 x
(`gemm_prompt`). Where the CPU has AMX-BF16, bf16 rows of Q8_0 and R16 matrices up to a few hundred take AMX tiles
fed straight from the blocks instead (`amx_linear`: those values up to float32 summation order; `amx_tiles`).

On a CUDA device `ggml_linear` and `bf16_linear` take the Triton kernels of `ds4py.formats.gpu_kernels` instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
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
# R16 (repacked MXFP4) matrices of that size go to the bf16 products from this many rows where the CPU has
# AMX-BF16 (`amx_bf16`): below R16_AMX_MAX_T rows its tiles fed straight from the blocks (`amx_linear`), from
# there oneDNN's GEMM on a dequantized copy. 2048 x 4096 on 2 Xeon cores with AMX, int8 tiles / AMX tiles time at
# T = 16 / 37 / 64: 1.26 / 1.63 / 2.43 (4096 x 2048: 1.04 / 1.69 / 2.55); the flash-slice's 512-token prompt
# (256 experts, ~12 tokens each), alternated, 264.5 / 271.3 / 275.6 tok/s from 64 / 32 / 16 rows. Without AMX
# the int8 tiles won at every length (`bf16_gemm_min_t`).
R16_GEMM_MIN_T = 16
# Below this many rows that product runs on the tiles straight from the R16 blocks: no bf16 copy of the matrix
# written out and read back, no GEMM set-up. 2048 x 4096 on 2 Xeon cores, (dequantize + GEMM) / tiles time at
# T = 64 / 96 / 192 / 512: 2.14 / 1.78 / 1.30 / 0.61 (4096 x 2048: 2.16 / 1.80 / 1.24 / 0.76); flash-slice-few's
# 512-token prompt (16 experts, ~96 tokens each), alternated: 287.4 -> 359.9 tok/s.
R16_AMX_MAX_T = 256
# Large Q8_0 matrices times bf16 rows take those tiles too where the CPU has AMX, from Q8_AMX_MIN_T rows (before
# BF16_WIDE_MIN_T / BF16_LINEAR_MIN_T) to under Q8_AMX_MAX_T. 2 Xeon cores, alternated, int8 kernel / tiles time
# at T = 8 / 16 / 32: 32768 x 1024 0.69 / 1.37 / 2.39, 4096 x 8192 0.82 / 1.30 / 2.77, 2048 x 4096 0.86 / 1.64 /
# 2.95, 512 x 4096 0.68 / 1.56 / 3.31; (dequantize + GEMM) / tiles at T = 256: 32768 x 1024 1.32, 4096 x 8192 1.23,
# 2048 x 4096 0.72, 1024 x 4096 0.99, so chunks of 256 keep the GEMM (flash-slice-few pp512, alternated, 341.3 /
# 342.2 tok/s without / with tiles at 256; pp128 261.1 -> 285.9, another run 235.7 -> 248.8).
Q8_AMX_MIN_T = 16
Q8_AMX_MAX_T = 256
# bf16 weights: the kernel serves up to this many activation rows (decode, batched decode); longer inputs use
# F.linear (in tiles of BF16_TILE_ROWS output rows when the weight must be converted to x's dtype).
BF16_KERNEL_MAX_T = 16
# 1024 rows (16 MB of float32 at 4096 columns) stay in cache: the 129280 x 4096 head at T=1 took 143 ms vs 678 ms
# with 8192-row tiles (fresh 128 MB buffers); T=256: 1.85 s, the old resident float32 copy 1.99 s.
BF16_TILE_ROWS = 1024

CSRC = Path(__file__).resolve().parents[1] / "csrc"  # the C++ of every compiled library


def csrc(*names: str) -> str:
    """The files `names` of ds4py/csrc concatenated, each line `#include "x.h"` that names a file there replaced by
    that file's text (so the hash that names a build covers what it includes)."""
    text = "".join((CSRC / name).read_text(encoding="utf-8") for name in names)
    return re.sub(r'^#include "([\w/.]+)"\n', lambda m: csrc(m.group(1)), text, flags=re.M)


# RMS norms and the rotary rotation of rows, for `ds4py.model.row_kernels`, the one-token projection here and the
# hyper-connections' collapse (needs <ATen/Parallel.h> and BF16_C before it)
ROW_OPS_C = csrc("row_ops.h")

# bf16 <-> float32 as torch converts, for every compiled library's source (needs <cmath>, <cstdint>, <cstring>)
BF16_C = csrc("bf16.h")

# The clamped SwiGLU of float32 rows (scalar and, where DS4PY_AVX512 or DS4PY_AVX2, 16 or 8 at a time with a
# vectorised exp, the same bits in both), for the experts here and `ds4py.formats.small_gemm`'s (needs <cmath>,
# <algorithm> and immintrin.h under DS4PY_AVX512 / DS4PY_AVX2 before it)
SWIGLU_C = csrc("swiglu.h")

# The sum of 16 float lanes kept as two AVX 256-bit halves in _mm512_reduce_add_ps's order, for the AVX2 code here
# and in the model's kernels (needs immintrin.h, under AVX2, before it)
REDUCE16_C = csrc("reduce16.h")

# This module's library, one section per file: the shared definitions and the activations' Q8_0 rounding
# (common.h), the int8 dots of Q8_0 / MXFP4 rows (ggml_dot), MXFP4 repacked by 16 rows (r16), the products'
# entry point (ggml_linear), dequantize, Q8_0 and R16 products on AMX tiles (amx), bf16 and float32 rows (bf16_linear,
# f32_linear), the experts and the router (experts, moe) and one decoding token's fused projections (decode_plans)
_SOURCE = csrc("kernels/common.h", "kernels/ggml_dot.cpp", "kernels/r16.cpp", "kernels/ggml_linear.cpp",
               "kernels/dequantize.cpp", "kernels/amx.cpp", "kernels/bf16_linear.cpp", "kernels/f32_linear.cpp",
               "kernels/experts.cpp", "kernels/moe.cpp", "kernels/decode_plans.cpp")

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


@functools.cache
def _cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists any of `flags` (read once per set)."""
    return bool(set(_cpu_flags().split()) & set(flags))


def bf16_gemm_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16: oneDNN's bf16 GEMM). There a long
    bf16 prompt's large products dequantize W to bf16 and take that GEMM (`bf16_gemm_min_t`); elsewhere they stay in
    the int8 kernels, as decoding does: on AVX2 torch's bf16 GEMM took 451 ms for a 4096 x 4096 Q8_0 matrix at
    T = 256, the int8 kernel 86 (2 cores). DS4PY_BF16_GEMM=1 or 0 decides instead (for tests)."""
    forced = os.environ.get("DS4PY_BF16_GEMM", "")  # read only for long prompts' large products
    if forced:
        return forced != "0"
    return _cpu_has("avx512_bf16", "amx_bf16")


def amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tiles (oneDNN's bf16 GEMM runs on them), where prompts' R16 experts take the
    bf16 products too (`R16_GEMM_MIN_T`) and shorter prompts' Q8_0 / R16 products run on ds4py's own tiles
    (`amx_tiles`). DS4PY_AMX=1 or 0 decides instead (for tests)."""
    forced = os.environ.get("DS4PY_AMX", "")
    if forced:
        return forced != "0"
    return _cpu_has("amx_bf16")


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
    # The portable loop's float operations as written on every CPU: left to GCC, whether `acc += d * s` became an
    # FMA depended on -mtune (Zen tunings avoid some FMA chains, Intel ones form them), so its bits did too
    cflags = ["-O3", "-march=native", "-fopenmp"] + (["-DDS4PY_GENERIC", "-ffp-contract=off"] if generic else [])
    lib = build_library("ds4py_kernels", _SOURCE, cflags, ["-fopenmp"])
    fn = lib.ds4py_ggml_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.ds4py_kernels_simd.restype = ctypes.c_int
    fn = lib.ds4py_mxfp4_repack16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    fn = lib.ds4py_amx_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
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
    for the bf16 GEMM (where the CPU has it natively). R16 rows only where the CPU has AMX (`amx_bf16`), from
    R16_GEMM_MIN_T rows, for matrices of BF16_GEMM_MIN_VALUES values or more: elsewhere their tiles beat it at every
    chunk size (2048 x 4096 on 2 Zen 5 cores, int8 / bf16 time 0.16 / 0.45 / 0.65 / 0.81 at T = 64 / 256 / 512 /
    1024). ggml MXFP4 rows (even with it at ~64-128) keep BF16_GEMM_MIN_T."""
    if qtype == MXFP4_R16:
        return R16_GEMM_MIN_T if values >= BF16_GEMM_MIN_VALUES and amx_bf16() else 1 << 62
    if qtype != Q8_0 or values < BF16_GEMM_MIN_VALUES:
        return BF16_GEMM_MIN_T
    return BF16_WIDE_MIN_T if cols >= 2048 else BF16_LINEAR_MIN_T


def gemm_prompt(dtype: torch.dtype, T: int, values: int, qtype: int = Q8_0, cols: int = 0) -> bool:
    """Whether T rows of `dtype` activations times a ggml matrix of `values` values, `cols` wide, take dequantize to
    bf16 + the bf16 GEMM instead of the int8 kernel (`bf16_gemm_min_t`, where the CPU has that GEMM natively), or
    for bf16 rows where the CPU has AMX, the tiles fed from the blocks (`amx_linear`: R16_GEMM_MIN_T <= T <
    R16_AMX_MAX_T for R16 rows, Q8_AMX_MIN_T <= T < Q8_AMX_MAX_T for large Q8_0 matrices).
    float32 rows too for Q8_0 matrices of BF16_GEMM_MIN_VALUES values or more (where it was measured): rounded to
    bf16 (2^-9 of each value) they lose less than the kernel's Q8_0 rounding of them (per 32 values, 2^-8 of the
    largest), and the product is faster. Relative error against float64 of a 4096 x 8192 Q8_0 product at T = 512
    on 2 Zen 5 cores: int8 kernel 5.3e-3 in 198 ms, bf16 GEMM 2.9e-3 in 60 ms (32768 x 1024: 5.4e-3 in 104 ms,
    2.9e-3 in 97)."""
    if dtype == torch.float32:
        if qtype != Q8_0 or values < BF16_GEMM_MIN_VALUES:
            return False
    elif dtype != torch.bfloat16:
        return False
    elif qtype == Q8_0 and values >= BF16_GEMM_MIN_VALUES and T >= Q8_AMX_MIN_T and amx_tiles(dtype, T, qtype):
        return True
    return T >= bf16_gemm_min_t(values, qtype, cols) and bf16_gemm_native()


def amx_tiles(dtype: torch.dtype, T: int, qtype: int) -> bool:
    """Whether T rows of `dtype` times a Q8_0 / R16 matrix that `gemm_prompt` sends to the bf16 products run on the
    AMX tiles (`amx_linear`) instead of dequantize + GEMM: bf16 rows, under R16_AMX_MAX_T / Q8_AMX_MAX_T of them,
    where the CPU has AMX-BF16."""
    max_t = R16_AMX_MAX_T if qtype == MXFP4_R16 else Q8_AMX_MAX_T if qtype == Q8_0 else 0
    return dtype == torch.bfloat16 and T < max_t and amx_bf16()


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
    if gemm_prompt(dtype, T, rows * n, qtype, n):
        if amx_tiles(dtype, T, qtype):
            y = amx_linear(x, raw, qtype)
            if y is not None:
                return y
        # long prompts: one fast dequantize to bf16, then the bf16 GEMM beats the per-block int8 kernel
        if dtype == torch.bfloat16:
            return F.linear(x, dequantize(raw, qtype, torch.bfloat16))
        return F.linear(x.bfloat16(), dequantize(raw, qtype, torch.bfloat16)).float()
    xk = x.float() if dtype == torch.float16 else x
    if not xk.is_contiguous():
        xk = xk.contiguous()
    y = _ggml_call(lib, qtype, xk, T, n, raw, 1, (*shape[:-1], rows))
    return y if dtype != torch.float16 else y.to(dtype)


def amx_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """bf16 x [..., n] @ W.T for Q8_0 rows or R16 groups raw [rows, n/32*block_bytes] on the CPU -> [..., rows]
    bf16 on AMX-BF16 tiles, each block dequantized into them (F.linear(x, W.dequantize(bfloat16))'s values up to
    float32 summation order), or None where this build or CPU has no AMX (or no kernels), or for other types."""
    lib = _lib()
    n = x.shape[-1]
    if (lib is None or x.dtype != torch.bfloat16 or not (x.is_cpu and raw.is_cpu) or qtype not in (Q8_0, MXFP4_R16)
            or (qtype == MXFP4_R16 and raw.shape[0] % 16) or n % 32):
        return None
    xc = x if x.is_contiguous() else x.contiguous()
    raw = contiguous_rows(raw, qtype)
    T, rows = x.numel() // n if n else 0, raw.shape[0]
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.bfloat16)
    if lib.ds4py_amx_linear(qtype, xc.data_ptr(), T, n, raw.data_ptr(), raw.stride(0), rows, y.data_ptr()):
        return None
    return y


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
    None where that call does not apply (no kernels, off the CPU, autograd, long prompts (`gemm_prompt`), R16 rows):
    the caller multiplies group by group."""
    qtype = int(qtype)
    T, groups, n = x.shape
    if (qtype not in (Q8_0, MXFP4) or raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[0] % groups
            or n % 32 or raw.shape[1] != n // 32 * BLOCK_BYTES[qtype]):
        return None
    if not (x.is_cpu and raw.is_cpu and x.dtype in (torch.float32, torch.bfloat16)) or (
            x.requires_grad and torch.is_grad_enabled()) or gemm_prompt(x.dtype, T, raw.shape[0] // groups * n,
                                                                        qtype, n):
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

