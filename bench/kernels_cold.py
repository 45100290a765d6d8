"""The packed-weight kernels (ds4py.formats.kernels.ggml_linear) on DeepSeek V4 Flash decode shapes.

    python bench/kernels_cold.py [T ...]      (default: 1 4 8)

For Q8_0 [4096x4096], [1024x4096], [512x4096] and MXFP4 experts [2048x4096], [4096x2048], bf16 x of T rows:
microseconds per call and GB/s of packed weight bytes, "cold" rotating over 256 MB of copies (weights
from DRAM, as in a decode step) and "hot" calling one copy (from the caches where it fits).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds4py.formats import kernels  # noqa: E402
from ds4py.formats.ggml import Q, quantize_q8_0  # noqa: E402

SHAPES = [(Q.Q8_0, 4096, 4096), (Q.Q8_0, 1024, 4096), (Q.Q8_0, 512, 4096), (Q.MXFP4, 2048, 4096),
          (Q.MXFP4, 4096, 2048)]


def make(qtype: Q, out: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if qtype == Q.Q8_0:
        return quantize_q8_0(torch.randn(out, n, generator=g))
    blocks = torch.randint(0, 256, (out, n // 32, 17), dtype=torch.uint8, generator=g)
    blocks[..., 0] = torch.randint(118, 131, (out, n // 32), dtype=torch.uint8, generator=g)
    return blocks.reshape(out, -1)


def main() -> None:
    ts = [int(a) for a in sys.argv[1:]] or [1, 4, 8]
    print(f"kernels simd={kernels.simd()}, threads={torch.get_num_threads()}")
    for qtype, out, n in SHAPES:
        raw = make(qtype, out, n)
        copies = [raw.clone() for _ in range(max(2, 256_000_000 // raw.numel()))]
        line = f"{qtype.name:6} [{out}x{n}]"
        for T in ts:
            x = torch.randn(T, n).bfloat16()
            for hot in (False, True):
                cycle = itertools.cycle(copies[:1] if hot else copies)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for _ in range(200):
                        kernels.ggml_linear(x, next(cycle), int(qtype))
                    best = min(best, (time.perf_counter() - t) / 200)
                line += f" | T={T} {'hot' if hot else 'cold'} {best * 1e6:6.0f} us {raw.numel() / best / 1e9:5.1f} GB/s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
