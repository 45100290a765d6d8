"""Micro-benchmark of the packed-weight CPU kernels (ds4py.formats.kernels).

    python bench/kernels.py [--threads N] [--reps 20]

For a [4096 x 4096] Q8_0 and a [2048 x 4096] MXFP4 weight at T=1 and T=32 it prints ms per call and the
GB/s of packed weight bytes read per call, for: the kernel, the fallback (dequantize + F.linear, what
`Weight.linear` did before) and F.linear on a bf16 weight dequantized once beforehand (x in bf16).
The plain rows call the same weight repeatedly, so at T=1 a weight that fits the L3 cache is read from it;
"cold" rotates over enough copies that it comes from DRAM.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds4py.formats import kernels  # noqa: E402
from ds4py.formats.ggml import GGMLWeight, Q, quantize_q8_0  # noqa: E402


def timeit(fn, reps: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def make(qtype: Q, out: int, n: int) -> GGMLWeight:
    g = torch.Generator().manual_seed(0)
    if qtype == Q.Q8_0:
        raw = quantize_q8_0(torch.randn(out, n, generator=g))
    else:
        blocks = torch.randint(0, 256, (out, n // 32, 17), dtype=torch.uint8, generator=g)
        blocks[..., 0] = torch.randint(118, 131, (out, n // 32), dtype=torch.uint8, generator=g)
        raw = blocks.reshape(out, -1)
    return GGMLWeight(qtype, raw, (out, n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    ok = kernels.available()
    print(f"kernels: {'built/loaded' if ok else 'UNAVAILABLE'} in {time.perf_counter() - t:.1f} s, "
          f"simd={kernels.simd()}, threads={torch.get_num_threads()}")
    print(f"{'weight':<20} {'T':>3}  {'path':<22} {'ms/call':>9} {'GB/s':>7} {'speedup':>8}  rel.err")
    for qtype, out, n in ((Q.Q8_0, 4096, 4096), (Q.MXFP4, 2048, 4096)):
        w = make(qtype, out, n)
        wb = w.dequantize(torch.bfloat16)
        # "cold": rotate over copies totalling > 128 MB (more than the L3) so the weight comes from DRAM
        copies = [w] + [GGMLWeight(w.qtype, w.raw.clone(), w.shape) for _ in range(128_000_000 // w.nbytes)]
        cycle = itertools.cycle(copies)
        gb = w.nbytes / 1e9
        for T in (1, 32):
            x = torch.randn(T, n)
            xb = x.bfloat16()
            ref = F.linear(x, w.dequantize())
            rows = [
                ("kernel (f32 x)", lambda w=w, x=x: w.linear(x)),
                ("kernel cold (f32 x)", lambda x=x, cycle=cycle: next(cycle).linear(x)),
                ("kernel (bf16 x)", lambda w=w, xb=xb: w.linear(xb)),
                ("dequantize+F.linear", lambda w=w, x=x: kernels.fallback_linear(x, w.raw, int(w.qtype))),
                ("F.linear bf16 weight", lambda wb=wb, xb=xb: F.linear(xb, wb)),
            ]
            results = []
            for name, fn in rows:
                if name.startswith("kernel") and not ok:
                    continue
                s = timeit(fn, args.reps if T == 1 else max(3, args.reps // 4))
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                results.append((name, s, err))
            base = dict((r[0], r[1]) for r in results)["dequantize+F.linear"]
            for name, s, err in results:
                print(f"{w.kind + f' [{out}x{n}]':<20} {T:>3}  {name:<22} {s * 1e3:9.3f} {gb / s:7.1f} "
                      f"{base / s:7.1f}x  {err:.3%}")
    print("GB/s = packed weight bytes (Q8_0 34 B / MXFP4 17 B per 32 values) per call / time; "
          "speedup vs dequantize+F.linear; rel.err vs F.linear(x, dequantized f32 weight)")


if __name__ == "__main__":
    main()
