"""The GPU path's products (`ds4py.formats.gpu_kernels`) at V4 Flash's shapes on a CUDA device: time per call and the
bytes it reads per second, against a device-to-device copy of as many bytes measured in the same run (the peer: what
this GPU's memory gives), and against torch's own products on the dequantized weights.

    python bench/gpu_kernels.py [--repeats 50]

Needs a CUDA device; prints a table (ratio 1.00x = the copy's bandwidth)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    """Median seconds of one call, with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure(name: str, raw: torch.Tensor, qtype: int, T: int, ids: torch.Tensor | None, repeats: int,
            gen: torch.Generator) -> str:
    """One table row: the kernel's time and bandwidth, a copy of its bytes, torch's product on bf16 weights."""
    from ds4py.formats import gpu_kernels

    n = raw.shape[-1] if qtype == gpu_kernels.BF16 else raw.shape[-1] // gpu_kernels.BLOCK_BYTES[qtype] * 32
    x = torch.randn(T, n, device=raw.device, generator=gen)
    if ids is None:
        nbytes = raw.numel() * raw.element_size()
        dense = raw if qtype == gpu_kernels.BF16 else gpu_kernels.dequantize(raw, qtype, torch.bfloat16)

        def kernel():
            return gpu_kernels.gemv(x, raw, qtype)

        def peer():
            return F.linear(x.bfloat16(), dense)
    else:
        nbytes = ids.numel() * raw[0].numel()
        dense = torch.stack([gpu_kernels.dequantize(raw[e], qtype, torch.bfloat16) for e in ids.tolist()])
        xs = x.bfloat16().expand(ids.numel(), n) if T == 1 else x.bfloat16()  # [pairs, n]

        def kernel():
            return gpu_kernels.stack_linear(x, raw, qtype, ids, x_div=1 if T > 1 else ids.numel())

        def peer():
            return torch.bmm(dense, xs[:, :, None])
    src = torch.empty(nbytes, dtype=torch.uint8, device=raw.device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), repeats)
    t_kernel, t_peer = timed(kernel, repeats), timed(peer, repeats)
    gbs, copy_gbs = nbytes / t_kernel / 1e9, 2 * nbytes / t_copy / 1e9  # (a copy reads and writes its bytes)
    return (f"| {name} | {t_kernel * 1e6:.1f} | {gbs:.0f} | {gbs / copy_gbs:.2f}x | {t_peer * 1e6:.1f} | "
            f"{t_peer / t_kernel:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: this benchmark measures the GPU kernels on one", file=sys.stderr)
        return 2
    from ds4py.formats import gpu_kernels
    from ds4py.formats.ggml import Q, quantize_q8_0

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    def q8(rows, n):
        return quantize_q8_0(torch.randn(rows, n, device=dev, generator=gen))

    def mxfp4(*shape):
        blocks = torch.randint(0, 256, (*shape[:-1], shape[-1] // 32, 17), dtype=torch.uint8, device=dev,
                               generator=gen)
        blocks[..., 0] = torch.randint(110, 130, blocks.shape[:-1], dtype=torch.uint8, device=dev, generator=gen)
        return blocks.reshape(*shape[:-1], -1)

    cases = [  # (name, raw, qtype, T, ids)
        ("wq_b q8_0 32768x1024", q8(32768, 1024), int(Q.Q8_0), 1, None),
        ("wkv q8_0 512x4096", q8(512, 4096), int(Q.Q8_0), 1, None),
        ("shared w1 q8_0 2048x4096", q8(2048, 4096), int(Q.Q8_0), 1, None),
        ("head bf16 129280x4096", torch.randn(129280, 4096, device=dev, generator=gen).bfloat16(),
         gpu_kernels.BF16, 1, None),
        ("experts w1 mxfp4 6 of 256x2048x4096", mxfp4(256, 2048, 4096), int(Q.MXFP4), 1,
         torch.tensor([3, 40, 77, 128, 200, 255], device=dev)),
        ("experts w2 mxfp4 6 of 256x4096x2048", mxfp4(256, 4096, 2048), int(Q.MXFP4), 6,
         torch.tensor([3, 40, 77, 128, 200, 255], device=dev)),
        ("wq_b q8_0 32768x1024, 4 rows", q8(32768, 1024), int(Q.Q8_0), 4, None),
    ]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| product | us/call | GB/s read | vs copy | torch on dequantized | kernel / torch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case in cases:
        print(measure(*case, repeats=args.repeats, gen=gen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
