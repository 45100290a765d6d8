"""The SIMD kernels' values, whatever the instruction set: the AVX512 code and the AVX2 code (its operations in
256-bit halves) both compute the sums defined here, in torch, operation by operation: 16 float32 lanes of fused
multiply-adds, then the lanes added in _mm512_reduce_add_ps's order. Equal bits on the build this machine has
(AVX512 or AVX2) mean the same logits on either kind of CPU."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ds4py.formats import kernels
from ds4py.formats.ggml import MXFP4Rows16
from tests.formats.test_kernels import random_weight, torch_threads

KVALUES = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float64)


@pytest.fixture(autouse=True)
def simd(lib):
    if not kernels.simd():
        pytest.skip("no AVX512-VNNI or AVX2 here: only the portable loop runs")
    return kernels.isa()


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once: the product is exact in float64 (operands of <= 24 bits); the sum s in
    float64 misses the exact one by e (TwoSum), which decides where s fell exactly halfway between two float32
    values (there s.float() alone, a second rounding, can go the wrong way: a subnormal scale's products did)."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    e = (p - (s - (s - p))) + (c - (s - p))  # s + e == p + c exactly
    r = s.float()
    other = torch.nextafter(r, torch.where(s > r.double(), torch.inf, -torch.inf).float())  # the far neighbour
    halfway = (s == (r.double() + other.double()) / 2) & (e != 0)
    toward_other = (e > 0) == (other > r)
    return torch.where(halfway & toward_other, other, r)


def reduce16(lanes: torch.Tensor) -> torch.Tensor:
    """[..., 16] float32 -> [...]: lanes i + i+8, then i + i+4, i + i+2, i + i+1 (GCC's _mm512_reduce_add_ps)."""
    t = lanes[..., 8:] + lanes[..., :8]
    t = t[..., 4:] + t[..., :4]
    t = t[..., :2] + t[..., 2:]
    return t[..., 0] + t[..., 1]


def quantize_acts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, n] float32 -> int8 codes [T, nb, 32] (as float64) and scales [T, nb]: amax / 127, codes rounded to
    nearest even of x * (1 / d), as the kernels quantize their activations."""
    b = x.reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(b * inv[..., None]).double(), d


def ggml_blocks(qtype: Q, raw: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw ggml rows -> the blocks' int values [out, nb, 32] (float64) and scales [out, nb] float32."""
    out, nb = raw.shape[0], n // 32
    if qtype == Q.Q8_0:
        blk = raw.reshape(out, nb, 34)
        d = blk[..., :2].contiguous().view(torch.float16).float().reshape(out, nb)
        return blk[..., 2:].contiguous().view(torch.int8).double(), d
    blk = raw.reshape(out, nb, 17)
    qs = blk[..., 1:].long()
    values = KVALUES[torch.cat([qs & 15, qs >> 4], -1)]
    return values, torch.ldexp(torch.ones(out, nb), blk[..., 0].float() - 128)


def ggml_definition(qtype: Q, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The packed Q8_0 / MXFP4 product: per pair of blocks, lanes 0-7 the even block's and 8-15 the odd one's int
    dots of 4 values, times (weight scale * activation scale), into float32 lanes; a missing odd block adds 0."""
    n = x.shape[1]
    wq, wd = ggml_blocks(qtype, raw, n)  # [out, nb, 32], [out, nb]
    xq, xd = quantize_acts(x)             # [T, nb, 32], [T, nb]
    out, nb = wd.shape
    acc = torch.zeros(out, x.shape[0], 16)
    for b in range(0, nb, 2):
        dots, scales = [], []
        for blk in (b, b + 1):
            if blk < nb:
                prod = torch.einsum("ol,tl->otl", wq[:, blk], xq[:, blk]).reshape(out, -1, 8, 4).sum(-1)
                dots.append(prod)
                scales.append((wd[:, blk, None] * xd[None, :, blk]).unsqueeze(-1).expand(-1, -1, 8))
            else:
                dots.append(torch.zeros(out, x.shape[0], 8, dtype=torch.float64))
                scales.append(torch.zeros(out, x.shape[0], 8))
        acc = fma(torch.cat(dots, -1).float(), torch.cat(scales, -1), acc)
    return reduce16(acc).T.contiguous()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=["q8_0", "mxfp4"])
def test_packed_products_are_the_defined_sums(qtype):
    gen = torch.Generator().manual_seed(21 + int(qtype))
    for out, n in ((40, 96), (33, 256)):  # 3 blocks a row (a missing odd block), and 8
        w = random_weight(qtype, out, n, gen)
        for T in (1, 3, 9, 20):  # 9, 20: activation tiles after the first (stored tile by tile), one partial
            x = torch.randn(T, n, generator=gen)
            assert torch.equal(kernels.ggml_linear(x, w.raw, int(qtype)), ggml_definition(qtype, w.raw, x)), (n, T)


def test_mxfp4_rows16_products_are_the_defined_sums():
    """Repacked MXFP4 (16 rows side by side): lane r is row r; per block its exact int dot, times (2^(e - 128) *
    activation scale), fused into the lane: no final sum across lanes. Rows 9 and 20: activation tiles after the
    first (their codes are stored tile by tile), one of them partial."""
    gen = torch.Generator().manual_seed(23)
    out, n = 32, 96
    w = random_weight(Q.MXFP4, out, n, gen)
    w.raw.view(out, n // 32, 17)[:3, 0, 0] = torch.tensor([0, 1, 2], dtype=torch.uint8)  # subnormal scales
    packed = MXFP4Rows16.repack(w)
    wq, wd = ggml_blocks(Q.MXFP4, w.raw, n)
    for T in (1, 4, 6, 9, 20):  # 6: one tile of 6 rows (AVX2: 4 rows, then 2)
        x = torch.randn(T, n, generator=gen)
        xq, xd = quantize_acts(x)
        acc = torch.zeros(T, out)
        for b in range(n // 32):
            dot = xq[:, b] @ wq[:, b].T  # [T, out], exact
            acc = fma(dot.float(), wd[None, :, b] * xd[:, b, None], acc)
        assert torch.equal(packed.linear(x), acc), T


def bf16_definition(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bf16 W [out, k] times float32 x [T, k]: per 32 values, lane l takes values 2l then 2l + 1 (fused), two
    accumulators taking turns over the steps of 32 (a last step of 32 or a partial one into the first), added,
    then summed across lanes."""
    out, k = w.shape
    kp = (k + 31) // 32 * 32
    wf = torch.zeros(out, kp)
    wf[:, :k] = w.float()
    xf = torch.zeros(x.shape[0], kp)
    xf[:, :k] = x
    acc = [torch.zeros(out, x.shape[0], 16), torch.zeros(out, x.shape[0], 16)]
    k64 = k // 64 * 64
    steps = [(i, (i // 32) % 2) for i in range(0, k64, 32)] + [(i, 0) for i in range(k64, kp, 32)]
    for i, u in steps:
        for par in (0, 1):  # the even values of the step, then the odd ones
            wv, xv = wf[:, i + par:i + 32:2], xf[:, i + par:i + 32:2]  # [out, 16], [T, 16]
            acc[u] = fma(wv[:, None, :], xv[None, :, :], acc[u])
    return reduce16(acc[0] + acc[1]).T.contiguous()


def f32_definition(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float32 W times x: lane l takes values 16 s + l (fused), then the lanes summed."""
    out, k = w.shape
    kp = (k + 15) // 16 * 16
    wf, xf = torch.zeros(out, kp), torch.zeros(x.shape[0], kp)
    wf[:, :k], xf[:, :k] = w, x
    acc = torch.zeros(out, x.shape[0], 16)
    for i in range(0, kp, 16):
        acc = fma(wf[:, None, i:i + 16], xf[None, :, i:i + 16], acc)
    return reduce16(acc).T.contiguous()


@pytest.mark.parametrize("k", [64, 96, 200, 1024])
def test_bf16_and_f32_products_are_the_defined_sums(k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=gen).bfloat16()
    wf = torch.randn(21, k, generator=gen)
    for threads in (1, torch.get_num_threads()):
        with torch_threads(threads):
            for T in (1, 2, 3, 5):
                x = torch.randn(T, k, generator=gen)
                assert torch.equal(kernels.bf16_linear(x, w), bf16_definition(w, x)), (k, T)
                assert torch.equal(kernels.f32_linear(x, wf), f32_definition(wf, x)), (k, T)


def exp16(x: torch.Tensor) -> torch.Tensor:
    """The kernels' vectorised e^x (Cephes' expf polynomial), operation by operation: x clamped to [-104, 89],
    k = round(x log2 e), r = x - k ln 2 (two fused steps), p(r) by fused steps, then p 2^k rounded once."""
    x = x.clamp(-104.0, 89.0)
    k = torch.round(x * torch.tensor(1.44269504088896341, dtype=torch.float32))
    r = fma(-k, torch.tensor(0.693359375), x)
    r = fma(-k, torch.tensor(-2.12194440e-4), r)
    p = torch.full_like(x, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fma(p, r, torch.full_like(x, c))
    p = fma(p, r * r, r + 1)
    return (p.double() * torch.pow(2.0, k.double())).float()


def test_swiglu_is_the_defined_exp_and_ops():
    """The experts' clamped SwiGLU: 16 values a step through `exp16`, the rest (n % 16) through expf; checked on
    values whose e^-g overflows, underflows to subnormals and to 0."""
    import ctypes

    gen = torch.Generator().manual_seed(29)
    n = 16 * 7 + 11
    g = torch.randn(n, generator=gen) * 30
    g[:6] = torch.tensor([-100.0, -89.0, 87.5, 95.0, 103.0, 120.0])
    up = torch.randn(n, generator=gen) * 4
    for limit in (0.0, 7.0):
        h = g.clone()
        kernels._lib().ds4py_swiglu(h.data_ptr(), up.data_ptr(), n, ctypes.c_float(limit))
        gc, uc = (g.clamp(max=limit), up.clamp(-limit, limit)) if limit > 0 else (g, up)
        m = n // 16 * 16
        ref = gc[:m] / (1 + exp16(-gc[:m])) * uc[:m]
        assert torch.equal(h[:m], ref), limit
        tail = gc[m:] / (1 + torch.exp(-gc[m:])) * uc[m:]
        assert ((h[m:] - tail).abs() <= tail.abs() * 1e-6).all()


def test_indexer_scores_are_the_defined_sums():
    """The lightning indexer's totals: per head its dot with the key by fused steps over head_dim, then per lane
    (head % 16) w[h] * (relu(dot) * scale) fused across the groups of 16 heads, the lanes summed, + 0.0."""
    from ds4py.model.indexer_kernel import index_rows

    gen = torch.Generator().manual_seed(31)
    T, H, hd, n = 3, 24, 16, 37  # 24 heads: two groups of 16, the second zero-padded
    q, w = torch.randn(T, H, hd, generator=gen), torch.rand(T, H, generator=gen)
    keys, scale = torch.randn(n, hd, generator=gen), hd**-0.5
    out = index_rows(q, w, keys, None, scale, 5)
    assert out is not None
    Hp = 32
    qp, wp = torch.zeros(T, Hp, hd), torch.zeros(T, Hp)
    qp[:, :H], wp[:, :H] = q, w
    dot = torch.zeros(T, Hp, n)
    for d in range(hd):
        dot = fma(qp[:, :, d, None].expand(T, Hp, n), keys[None, None, :, d].expand(T, Hp, n), dot)
    lanes = torch.zeros(T, n, 16)
    for g in range(Hp // 16):
        relu = (dot[:, 16 * g:16 * g + 16].clamp(min=0) * scale).transpose(1, 2)  # [T, n, 16]
        lanes = fma(wp[:, None, 16 * g:16 * g + 16].expand(T, n, 16), relu, lanes)
    assert torch.equal(out[1], reduce16(lanes) + 0.0)
