"""The packed Q8_0 / MXFP4 CPU kernels against dequantize + F.linear.

The kernels quantize the activations to Q8_0 (int8 per 32 values, as llama.cpp does), so they are not
exact: measured relative error ||y - ref|| / ||ref|| on these random cases is 0.39%..0.61% (both the
AVX512-VNNI and the portable build give the same numbers); the bound is 1%. The first test builds the
extension (~2 s per variant, cached under ~/.cache/ds4py/kernels afterwards).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from ds4py.formats import kernels
from ds4py.formats.ggml import GGMLWeight, quantize_q8_0

REL_ERR = 0.01  # activation int8 rounding: measured <= 0.61%


def random_weight(qtype: Q, out: int, n: int, gen: torch.Generator) -> GGMLWeight:
    if qtype == Q.Q8_0:
        raw = quantize_q8_0(torch.randn(out, n, generator=gen))
    else:
        blocks = torch.randint(0, 256, (out, n // 32, 17), dtype=torch.uint8, generator=gen)
        blocks[..., 0] = torch.randint(118, 131, (out, n // 32), dtype=torch.uint8, generator=gen)
        raw = blocks.reshape(out, -1)
    return GGMLWeight(qtype, raw, (out, n))


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=["q8_0", "mxfp4"])
def test_kernel_matches_dequantized_linear(lib, monkeypatch, qtype, generic):
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
        assert kernels.available() and not kernels.simd()
    gen = torch.Generator().manual_seed(int(qtype) * 2 + generic)
    fn = kernels.q8_0_linear if qtype == Q.Q8_0 else kernels.mxfp4_linear
    for out, n in ((64, 256), (300, 256), (77, 96)):  # 96: an odd number of blocks
        w = random_weight(qtype, out, n, gen)
        for T in (1, 3, 17):
            x = torch.randn(T, n, generator=gen)
            ref = F.linear(x, w.dequantize())
            y = fn(x, w.raw)
            assert y.shape == (T, out) and y.dtype == torch.float32
            assert rel_err(y, ref) < REL_ERR, (out, n, T, rel_err(y, ref))


def test_weight_linear_uses_kernel_keeps_leading_dims_and_dtype(lib):
    gen = torch.Generator().manual_seed(1)
    for qtype in (Q.Q8_0, Q.MXFP4):
        w = random_weight(qtype, 40, 128, gen)
        x = torch.randn(2, 5, 128, generator=gen)
        ref = F.linear(x, w.dequantize())
        y = w.linear(x)
        assert y.shape == (2, 5, 40) and rel_err(y, ref) < REL_ERR
        assert not torch.equal(y, ref)  # really the kernel (the fallback is exact)
        yb = w.linear(x.bfloat16())
        assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < REL_ERR + 0.01
        assert w.linear(x[:0]).shape == (0, 5, 40)


def test_expert_slices_of_a_stack(lib):
    raw = quantize_q8_0(torch.randn(3, 24, 64))
    stack = GGMLWeight(Q.Q8_0, raw, (3, 24, 64))
    x = torch.randn(4, 64)
    for e in range(3):
        w = stack.expert(e)
        assert rel_err(w.linear(x), F.linear(x, w.dequantize())) < REL_ERR


def test_fallback_is_exactly_the_reference(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    for qtype in (Q.Q8_0, Q.MXFP4):
        w = random_weight(qtype, 50, 128, gen)
        x = torch.randn(3, 128, generator=gen)
        ref = F.linear(x, w.dequantize())
        assert torch.equal(kernels.fallback_linear(x, w.raw, int(qtype)), ref)
        monkeypatch.setenv("DS4PY_NO_KERNELS", "1")
        assert not kernels.available()
        assert torch.equal(w.linear(x), ref)
        monkeypatch.delenv("DS4PY_NO_KERNELS")
        # autograd keeps the differentiable fallback
        xg = x.clone().requires_grad_()
        assert torch.equal(w.linear(xg), ref)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken(generic):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_compile", broken)
    monkeypatch.setattr(kernels, "_libs", {})
    monkeypatch.setattr(kernels, "_warned", False)
    w = random_weight(Q.Q8_0, 8, 64, torch.Generator().manual_seed(3))
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="kernels unavailable"):
        y = w.linear(x)
    assert torch.equal(y, F.linear(x, w.dequantize()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.linear(x)


def test_shape_mismatch_is_an_error():
    w = random_weight(Q.Q8_0, 8, 64, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError):
        kernels.q8_0_linear(torch.randn(2, 96), w.raw)


def test_compiled_dequantize_and_long_bf16_prompts_are_exact(lib, monkeypatch):
    """Long bf16 prompts where the CPU has a native bf16 GEMM (here: said to have): W dequantized to bf16, then
    that GEMM (F.linear's values exactly)."""
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    gen = torch.Generator().manual_seed(5)
    for qtype in (Q.Q8_0, Q.MXFP4):
        w = random_weight(qtype, 48, 96, gen)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(kernels.dequantize(w.raw, int(qtype), dtype), w.dequantize(dtype))
        x = torch.randn(kernels.BF16_GEMM_MIN_T, 96, generator=gen).bfloat16()
        assert torch.equal(kernels.ggml_linear(x, w.raw, int(qtype)), F.linear(x, w.dequantize(torch.bfloat16)))
        # a small matrix keeps its bf16 copy (made once) and multiplies it with small_gemm (its own test: F.linear's
        # values up to summation order)
        y, ref = w.linear(x).float(), F.linear(x, w.dequantize(torch.bfloat16)).float()
        assert w.bf16 is not None and torch.equal(w.bf16, w.dequantize(torch.bfloat16))
        assert ((y - ref).abs() <= ref.abs() * 2**-7).all()
        big = random_weight(qtype, 1024, 96, gen)  # 98304 values: dequantized per call
        assert torch.equal(big.linear(x), kernels.ggml_linear(x, big.raw, int(qtype))) and big.bf16 is None
        assert w.linear(x[:3]).shape == (3, 48)  # short inputs: the packed kernel, not the copy
    # every int8 code and random finite fp16 scales, subnormal to 65504 (many products exactly halfway between two
    # bf16 values: ties to even): the vectorized Q8_0 -> bf16 rounding against torch's
    blocks = torch.randint(0, 256, (64, 40, 34), dtype=torch.uint8, generator=gen)
    scales = blocks[..., :2].contiguous().view(torch.float16)
    finite = torch.randn(scales.shape, generator=gen).mul(2.0 ** torch.randint(-24, 16, scales.shape, generator=gen))
    blocks[..., :2] = finite.clamp(-65504, 65504).half().view(torch.uint8).reshape(64, 40, 2)
    w = GGMLWeight(Q.Q8_0, blocks.reshape(64, -1), (64, 40 * 32))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(kernels.dequantize(w.raw, int(Q.Q8_0), dtype), w.dequantize(dtype))


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
def test_outputs_are_bit_identical_to_the_saved_reference(lib, monkeypatch, generic):
    """Speed work on the kernels (prefetching, work splits) must not change a single bit: data/ggml_linear_ref.pt
    holds the outputs of the kernels as of d521e5f for Q8_0 and MXFP4 weights of a few shapes (odd block
    counts, rows not a multiple of the 32-row chunks) at T = 1, 3, 8, 9, for both builds. The portable build's
    MXFP4 one-row tiles (T = 1, and T = 9's last row) were remade when its FMA became explicit: GCC had left that
    one chain unfused under Zen tunings only, so those bits held on AMD machines alone (they moved by at most
    2.2e-5 relative, in the rounding of sums that cancel)."""
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    elif not kernels.simd():
        pytest.skip("this CPU has no AVX512-VNNI: only the portable build runs here")
    assert kernels.available() and kernels.simd() == (not generic)
    cases = torch.load(Path(__file__).parent / "data" / "ggml_linear_ref.pt")
    for threads in (1, torch.get_num_threads()):
        with torch_threads(threads):
            for c in cases:
                for T, ref in zip((1, 3, 8, 9), c["portable" if generic else "simd"]):
                    y = kernels.ggml_linear(c["x"][:T].float(), c["raw"], c["qtype"])
                    assert torch.equal(y, ref), (c["qtype"], tuple(c["raw"].shape), T, threads)
                    yb = kernels.ggml_linear(c["x"][:T], c["raw"], c["qtype"])
                    assert torch.equal(yb, ref.bfloat16())


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=["q8_0", "mxfp4"])
def test_grouped_linear_equals_the_groups_one_by_one(lib, monkeypatch, qtype, generic):
    """The grouped output projection in one call: bit-identical to `ggml_linear` on each group's rows and x slice."""
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    gen = torch.Generator().manual_seed(11 + int(qtype) + generic)
    for groups, r, n in ((4, 24, 96), (2, 40, 256), (1, 8, 64)):
        w = random_weight(qtype, groups * r, n, gen)
        for T in (1, 3, 9):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(T, groups, n, generator=gen).to(dtype)
                y = kernels.ggml_grouped_linear(x, w.raw, int(qtype))
                loop = torch.cat([kernels.ggml_linear(x[:, g], w.raw[g * r:(g + 1) * r], int(qtype))
                                  for g in range(groups)], dim=-1)
                assert y.dtype == dtype and torch.equal(y, loop), (groups, r, n, T, dtype)
    # not for it: long bf16 prompts where the CPU has a native bf16 GEMM (that path), rows that do not split into
    # the groups; without one, long prompts too
    w = random_weight(qtype, 64, 64, gen)
    long = torch.randn(kernels.BF16_GEMM_MIN_T, 2, 64, generator=gen).bfloat16()
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    assert kernels.ggml_grouped_linear(long, w.raw, int(qtype)) is None
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    loop = torch.cat([kernels.ggml_linear(long[:, g], w.raw[g * 32:(g + 1) * 32], int(qtype)) for g in range(2)], -1)
    assert torch.equal(kernels.ggml_grouped_linear(long, w.raw, int(qtype)), loop)
    assert torch.equal(kernels.ggml_linear(long[:, 0], w.raw, int(qtype)),
                       kernels.ggml_linear(long[:, 0].float(), w.raw, int(qtype)).bfloat16())
    assert kernels.ggml_grouped_linear(torch.randn(1, 3, 64), w.raw, int(qtype)) is None


def test_large_matrices_take_the_bf16_gemm_from_fewer_rows(lib, monkeypatch):
    """A Q8_0 matrix of BF16_GEMM_MIN_VALUES values or more is dequantized for the bf16 GEMM from BF16_LINEAR_MIN_T
    bf16 rows (BF16_WIDE_MIN_T where 2048+ values wide; F.linear's values exactly), below that the int8 kernel (the
    float32 input's values, rounded); smaller matrices and ggml MXFP4 rows keep BF16_GEMM_MIN_T, R16 rows keep their
    int8 tiles at any length without AMX, and take the GEMM from R16_GEMM_MIN_T rows with it (under R16_AMX_MAX_T
    rows the AMX tiles straight from the blocks, where the CPU has them). float32 rows take that
    GEMM for the large Q8_0 matrices only (x rounded to bf16, the result widened), else the int8 kernel at any
    length. The grouped call stands aside where each group's matrix would take the GEMM."""
    from ds4py.formats.ggml import MXFP4Rows16

    def int8_kernel(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
        monkeypatch.setenv("DS4PY_BF16_GEMM", "0")  # (no GEMM for any input)
        y = kernels.ggml_linear(x, raw, qtype)
        monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
        return y

    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    monkeypatch.setenv("DS4PY_AMX", "0")  # (the AMX tiles for Q8_0 rows: below)
    gen = torch.Generator().manual_seed(11)
    t, long = kernels.BF16_LINEAR_MIN_T, kernels.BF16_GEMM_MIN_T
    assert t < long
    tall = kernels.BF16_GEMM_MIN_VALUES // 256  # 4096 x 256
    cases = [(random_weight(Q.Q8_0, tall, 256, gen), int(Q.Q8_0), t),
             (random_weight(Q.Q8_0, 64, 256, gen), int(Q.Q8_0), long),
             (random_weight(Q.MXFP4, tall, 256, gen), int(Q.MXFP4), long),
             (random_weight(Q.Q8_0, 512, 2048, gen), int(Q.Q8_0), kernels.BF16_WIDE_MIN_T)]  # wide: from fewer
    for w, qtype, first in cases:
        for rows in sorted({t - 1, t, first - 1, first, long}):
            n = w.shape[1]
            x = torch.randn(rows, n, generator=gen).bfloat16()
            y = kernels.ggml_linear(x, w.raw, qtype)
            gemm = F.linear(x, w.dequantize(torch.bfloat16))
            int8 = int8_kernel(x.float(), w.raw, qtype)
            assert torch.equal(y, gemm if rows >= first else int8.bfloat16()), (qtype, rows)
            assert not torch.equal(gemm, int8.bfloat16()), (qtype, rows)
            large_q8 = qtype == int(Q.Q8_0) and w.shape[0] * n >= kernels.BF16_GEMM_MIN_VALUES
            y32 = kernels.ggml_linear(x.float(), w.raw, qtype)
            assert y32.dtype == torch.float32
            assert torch.equal(y32, gemm.float() if large_q8 and rows >= first else int8), (qtype, rows)
    monkeypatch.setenv("DS4PY_AMX", "1")  # large Q8_0 matrices, bf16 rows: the tiles from Q8_AMX_MIN_T rows
    w = cases[0][0]
    for rows in (kernels.Q8_AMX_MIN_T - 1, kernels.Q8_AMX_MIN_T, kernels.Q8_AMX_MAX_T - 1, kernels.Q8_AMX_MAX_T):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        tiles = kernels.amx_linear(x, w.raw, int(Q.Q8_0))
        assert (tiles is not None) == kernels._cpu_has("amx_bf16")
        if rows < kernels.Q8_AMX_MIN_T:
            want = int8_kernel(x.float(), w.raw, int(Q.Q8_0)).bfloat16()
        elif rows >= kernels.Q8_AMX_MAX_T or tiles is None:
            want = F.linear(x, w.dequantize(torch.bfloat16))
        else:
            want = tiles
        assert torch.equal(kernels.ggml_linear(x, w.raw, int(Q.Q8_0)), want), rows
        y32 = kernels.ggml_linear(x.float(), w.raw, int(Q.Q8_0))  # float32 rows: as without AMX
        assert torch.equal(y32, F.linear(x, w.dequantize(torch.bfloat16)).float() if rows >= t
                           else int8_kernel(x.float(), w.raw, int(Q.Q8_0))), rows
    r16 = MXFP4Rows16.repack(cases[2][0])
    x = torch.randn(long, 256, generator=gen).bfloat16()
    monkeypatch.setenv("DS4PY_AMX", "0")
    assert torch.equal(r16.linear(x), kernels.ggml_linear(x.float(), r16.raw, kernels.MXFP4_R16).bfloat16())
    monkeypatch.setenv("DS4PY_AMX", "1")
    short = x[:kernels.R16_GEMM_MIN_T - 1]
    assert torch.equal(r16.linear(x), F.linear(x, cases[2][0].dequantize(torch.bfloat16)))
    assert torch.equal(r16.linear(short), int8_kernel(short.float(), r16.raw, kernels.MXFP4_R16).bfloat16())
    mid = x[:kernels.R16_AMX_MAX_T - 1]  # under R16_AMX_MAX_T: the tiles straight from the blocks, where there
    tiles = kernels.amx_linear(mid, r16.raw, kernels.MXFP4_R16)
    assert (tiles is not None) == kernels._cpu_has("amx_bf16")
    assert torch.equal(r16.linear(mid), F.linear(mid, cases[2][0].dequantize(torch.bfloat16)) if tiles is None
                       else tiles)
    small = MXFP4Rows16.repack(random_weight(Q.MXFP4, 64, 256, gen))  # under BF16_GEMM_MIN_VALUES: the tiles
    assert torch.equal(small.linear(x), int8_kernel(x.float(), small.raw, kernels.MXFP4_R16).bfloat16())
    monkeypatch.setenv("DS4PY_AMX", "0")
    w = cases[0][0]
    x = torch.randn(t, 2, 256, generator=gen).bfloat16()
    assert kernels.ggml_grouped_linear(x, torch.cat([w.raw, w.raw]), int(Q.Q8_0)) is None
    assert kernels.ggml_grouped_linear(x[:-1], torch.cat([w.raw, w.raw]), int(Q.Q8_0)) is not None
    assert kernels.ggml_grouped_linear(x.float(), torch.cat([w.raw, w.raw]), int(Q.Q8_0)) is None
    assert kernels.ggml_grouped_linear(x[:-1].float(), torch.cat([w.raw, w.raw]), int(Q.Q8_0)) is not None


def test_experts_one_equals_the_kernel_matmuls_one_by_one(lib):
    """The fused one-token MoE call: the same activation quantization and int8 dot products as three
    `ggml_linear` calls per expert, so equal to them up to float32 rounding (swiglu, the sum's order)."""
    from ds4py.model.moe import swiglu

    gen = torch.Generator().manual_seed(6)
    D, inter, limit = 128, 64, 3.0
    experts, qtypes = [], []
    for q13, q2 in ((Q.MXFP4, Q.MXFP4), (Q.MXFP4, Q.MXFP4), (Q.Q8_0, Q.Q8_0)):  # routed, then a shared expert
        trio = (random_weight(q13, inter, D, gen), random_weight(q13, inter, D, gen), random_weight(q2, D, inter, gen))
        experts.append(trio)
        qtypes.append(tuple(int(w.qtype) for w in trio))
    weights = [0.7, 0.2, 1.0]
    x = torch.randn(1, D, generator=gen)
    ref = sum(s * w2.linear(swiglu(w1.linear(x), w3.linear(x), limit)) for s, (w1, w3, w2) in zip(weights, experts))
    exact = sum(s * F.linear(swiglu(F.linear(x.double(), w1.dequantize().double()),
                                    F.linear(x.double(), w3.dequantize().double()), limit), w2.dequantize().double())
                for s, (w1, w3, w2) in zip(weights, experts))
    raws = [tuple(w.raw for w in trio) for trio in experts]
    y = kernels.experts_one(x, raws, qtypes, weights, limit)
    assert y.shape == (1, D) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    # two quantized matmuls in a row, the second on clamped SwiGLU outputs: measured 3.0% (the loop the same)
    assert rel_err(y, exact) < 0.05
    yb = kernels.experts_one(x.bfloat16(), raws, qtypes, weights, limit)
    assert yb.dtype == torch.bfloat16 and rel_err(yb, exact) < 0.06
    assert kernels.experts_one(torch.randn(2, D), raws, qtypes, weights, limit) is None  # one token only


@pytest.mark.parametrize("repacked", [False, True], ids=["ggml", "r16"])
def test_experts_many_equals_the_kernel_matmuls_one_by_one(lib, repacked):
    """T tokens through their experts in one call: each expert's tokens through three `ggml_linear` calls, summed
    per token in pair order, up to float32 rounding. Experts with 0, 1, 3, 12 (tiles of 8) and 40 tokens."""
    from ds4py.formats.ggml import MXFP4Rows16
    from ds4py.model.moe import swiglu

    gen = torch.Generator().manual_seed(12)
    D, inter, limit, T = 128, 64, 3.0, 40  # the shared expert: 40 tokens, past MANY_T (32)
    experts = []
    for q in (Q.MXFP4, Q.MXFP4, Q.MXFP4, Q.MXFP4, Q.Q8_0):  # routed, then a shared expert
        trio = (random_weight(q, inter, D, gen), random_weight(q, inter, D, gen), random_weight(q, D, inter, gen))
        experts.append(tuple(MXFP4Rows16.repack(w) for w in trio) if repacked else trio)
    rows = [[w.kernel_rows() for w in trio] for trio in experts]
    counts = [3, 0, 1, 12, T]
    tokens = torch.cat([torch.tensor([0, 5, 20]), torch.tensor([], dtype=torch.long), torch.tensor([7]),
                        torch.randperm(T, generator=gen)[:12].sort().values, torch.arange(T)])
    weights = torch.rand(tokens.numel(), generator=gen)

    def loop(x: torch.Tensor) -> torch.Tensor:
        out, start = torch.zeros(T, D), 0
        for (w1, w3, w2), c in zip(experts, counts):
            rows_t, w = tokens[start:start + c], weights[start:start + c]
            start += c
            if c:
                h = x[rows_t]
                out.index_add_(0, rows_t, w[:, None] * w2.linear(swiglu(w1.linear(h), w3.linear(h), limit)))
        return out

    x = torch.randn(T, D, generator=gen)
    raws, qtypes = [tuple(r[0] for r in t) for t in rows], [tuple(r[1] for r in t) for t in rows]
    y = kernels.experts_many(x, raws, qtypes, counts, tokens, weights, limit)
    assert y.shape == (T, D) and y.dtype == torch.float32
    assert rel_err(y, loop(x)) < 1e-5
    yb = kernels.experts_many(x.bfloat16(), raws, qtypes, counts, tokens, weights, limit)
    # bf16 in (widened exactly) and the float32 result rounded once: within bf16's half ulp (2^-9) of the loop
    assert yb.dtype == torch.bfloat16 and rel_err(yb, loop(x.bfloat16().float())) < 2**-9
    # experts in turns (streamed ones), adding to one float32 sum: the same bits as one call
    acc, start = torch.zeros(T, D), 0
    for raw, q, c in zip(raws, qtypes, counts):
        kernels.experts_many(x, [raw], [q], [c], tokens[start:start + c], weights[start:start + c], limit, into=acc)
        start += c
    assert torch.equal(acc, y)
    with pytest.raises(ValueError, match="pairs"):
        kernels.experts_many(x, raws, qtypes, counts, tokens[:-1], weights[:-1], limit)
    with pytest.raises(ValueError, match="do not match"):  # W2 given as W1: rows of the wrong length
        kernels.experts_many(x, [(raws[0][0], raws[0][1], raws[0][0])], [qtypes[0]], [3], tokens[:3], weights[:3],
                             limit)


def test_f32_linear_matches_float64_and_falls_back_for_long_inputs(lib):
    gen = torch.Generator().manual_seed(7)
    for T, k, rows in ((1, 4096, 256), (3, 100, 7), (4, 48, 9)):  # k not a multiple of 16, rows not of 4
        x, w = torch.randn(T, k, generator=gen), torch.randn(rows, k, generator=gen)
        y = kernels.f32_linear(x, w)
        exact = x.double() @ w.double().T
        assert y.dtype == torch.float32 and y.shape == (T, rows)
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
    x = torch.randn(kernels.BF16_KERNEL_MAX_T + 1, 32, generator=gen)
    assert torch.equal(kernels.f32_linear(x, w[:, :32].contiguous()), F.linear(x, w[:, :32]))


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
def test_r16_dequantize_matches_torch(lib, monkeypatch, generic):
    """R16 groups -> bf16 (the vectorized loop where AVX512 is): torch's values exactly, for every scale byte
    (subnormal products at 0-1, inf past 2^127 at 255) and every nibble."""
    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    gen = torch.Generator().manual_seed(21)
    rows, n = 32, 32 * 16
    raw = torch.randint(0, 256, (rows, n // 32 * 17), dtype=torch.uint8, generator=gen)
    raw.view(rows, n // 32, 17)[..., 0] = torch.arange(rows * n // 32).reshape(rows, n // 32).to(torch.uint8)
    r16 = kernels.repack16(raw, n)
    ref = kernels.r16_dequantize_torch(r16, n)
    assert torch.isinf(ref).any() and (ref.abs() < 2**-126).logical_and(ref != 0).any()
    assert torch.equal(kernels.dequantize(r16, kernels.MXFP4_R16, torch.bfloat16), ref.bfloat16())
    assert torch.equal(kernels.dequantize(r16, kernels.MXFP4_R16, torch.float32), ref)
    # every block's scales within [2, 252] (each value there, every nibble): the vectorized loop's exponent add
    scales = 2 + torch.arange(rows * n // 32) % 251
    raw.view(rows, n // 32, 17)[..., 0] = scales.reshape(rows, n // 32).to(torch.uint8)
    r16 = kernels.repack16(raw, n)
    assert torch.equal(kernels.dequantize(r16, kernels.MXFP4_R16, torch.bfloat16),
                       kernels.r16_dequantize_torch(r16, n).bfloat16())


def test_amx_tiles_give_the_bf16_gemm_values(lib):
    """R16 groups and Q8_0 rows times bf16 rows on AMX tiles, each block dequantized into them (where the CPU has
    AMX-BF16; None elsewhere): F.linear(x, W.dequantize(bfloat16))'s values up to float32 summation order and the
    bf16 rounding of the sums, for row counts that fill no tile, an odd number of 16-row groups (Q8_0: groups short
    of 16 rows, rows strided apart), 20 blocks (passes of 16 and 4), scale bytes 0-1 (subnormal products) beside
    ordinary ones."""
    gen = torch.Generator().manual_seed(31)
    if not kernels._cpu_has("amx_bf16"):
        x = torch.randn(20, 64, generator=gen).bfloat16()
        r16 = kernels.repack16(random_weight(Q.MXFP4, 16, 64, gen).raw, 64)
        assert kernels.amx_linear(x, r16, kernels.MXFP4_R16) is None
        return
    cases = [(Q.MXFP4, 48, 640, 37), (Q.MXFP4, 32, 96, 1), (Q.MXFP4, 64, 512, 100), (Q.MXFP4, 16, 32, 16),
             (Q.Q8_0, 40, 640, 37), (Q.Q8_0, 7, 96, 20), (Q.Q8_0, 64, 512, 100)]  # Q8_0: partial 16-row groups
    for qtype, rows, n, T in cases:
        w = random_weight(qtype, rows, n, gen)
        if qtype == Q.MXFP4:
            scales = torch.tensor([0, 1, 127])[torch.arange(n // 32) % 3]
            w.raw.view(rows, n // 32, 17)[0, :, 0] = scales.to(torch.uint8)
            raw, kind = kernels.repack16(w.raw, n), kernels.MXFP4_R16
        else:
            raw, kind = torch.cat([w.raw, w.raw], 1)[:, :w.raw.shape[1]], int(Q.Q8_0)  # rows strided apart
        wb = w.dequantize(torch.bfloat16)
        x = torch.randn(T, n, generator=gen).bfloat16()
        y = kernels.amx_linear(x, raw, kind)
        assert y is not None and y.shape == (T, rows) and y.dtype == torch.bfloat16
        exact = x.double() @ wb.double().T
        # (+ 2^-120: the tiles take subnormal bf16 values as 0, as oneDNN's GEMM on them does)
        bound = 2**-8 * exact.abs() + 2**-16 * (x.double().abs() @ wb.double().abs().T) + 2**-120
        assert ((y.double() - exact).abs() <= bound).all(), (rows, n, T)
        assert rel_err(y, F.linear(x, wb)) < 2e-3, (rows, n, T)
        y3 = kernels.amx_linear(x.reshape(1, T, n), raw, kind)  # leading dims kept
        assert torch.equal(y3, y.reshape(1, T, rows))


@pytest.mark.parametrize("generic", [False, True], ids=["simd", "portable"])
def test_mxfp4_repacked_by_16_rows_keeps_values_and_products(lib, monkeypatch, generic):
    """MXFP4Rows16: the same bytes rearranged (back to the ggml rows exactly, dequantized identically) and the same
    quantized products as the ggml-layout kernel, up to float32 summation order; scale bytes 0 and 1 (subnormal
    scales) included."""
    from ds4py.formats.ggml import MXFP4Rows16

    if generic:
        monkeypatch.setenv("DS4PY_KERNELS_GENERIC", "1")
    gen = torch.Generator().manual_seed(8)
    for out, n in ((64, 256), (32, 96)):  # 96: an odd number of blocks
        w = random_weight(Q.MXFP4, out, n, gen)
        w.raw.view(out, n // 32, 17)[0, :, 0] = torch.tensor([0, 1, 2])[torch.arange(n // 32) % 3].to(torch.uint8)
        packed = MXFP4Rows16.repack(w)
        assert isinstance(packed, MXFP4Rows16) and not torch.equal(packed.raw, w.raw)
        assert torch.equal(kernels.r16_to_ggml(packed.raw), w.raw)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(packed.dequantize(dtype), w.dequantize(dtype))
        assert torch.equal(kernels.r16_dequantize_torch(packed.raw, n), w.dequantize())
        x0 = torch.randn(2, n, generator=gen)
        assert torch.equal(kernels.fallback_linear(x0, packed.raw, kernels.MXFP4_R16), F.linear(x0, w.dequantize()))
        for T in (1, 3, 9):
            x = torch.randn(T, n, generator=gen)
            assert rel_err(packed.linear(x), w.linear(x)) < 1e-5, (out, n, T)
            assert rel_err(packed.linear(x.bfloat16()), F.linear(x, w.dequantize())) < REL_ERR + 0.01
        in_place = w.raw.clone()
        kernels.repack16(in_place, n, out=in_place)
        assert torch.equal(in_place, packed.raw)
    odd = random_weight(Q.MXFP4, 24, 64, gen)  # 24 rows: not a multiple of 16, stays as it is
    assert MXFP4Rows16.repack(odd) is odd


def test_experts_one_takes_repacked_experts(lib):
    from ds4py.formats.ggml import MXFP4Rows16

    gen = torch.Generator().manual_seed(9)
    D, inter = 128, 64
    trios = [tuple(random_weight(Q.MXFP4, *shape, gen) for shape in ((inter, D), (inter, D), (D, inter)))
             for _ in range(2)]
    weights, x = [0.6, 0.4], torch.randn(1, D, generator=gen)
    plain = kernels.experts_one(x, [tuple(w.raw for w in t) for t in trios], [(int(Q.MXFP4),) * 3] * 2, weights, 5.0)
    packed = [tuple(MXFP4Rows16.repack(w) for w in t) for t in trios]
    rows = [[w.kernel_rows() for w in t] for t in packed]
    y = kernels.experts_one(x, [tuple(r[0] for r in t) for t in rows], [tuple(r[1] for r in t) for t in rows],
                            weights, 5.0)
    assert all(r[1] == kernels.MXFP4_R16 for t in rows for r in t)
    assert rel_err(y, plain) < 1e-5


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_route_chooses_and_weighs_as_torch(lib, score_func):
    """The compiled routing against the router's torch ops on the same logits: the same experts (ascending), the
    same weights up to exp / log1p's last bit; with a selection bias, with hash ids, and with tied scores (the
    lower id wins)."""
    from ds4py.model.moe import SCORE_FUNCS

    gen = torch.Generator().manual_seed(21)
    T, E, k, scaling = 9, 64, 6, 1.5
    logits = torch.randn(T, E, generator=gen) * 4
    logits[:, 30:] = logits[:, :34].clone()  # ties: experts 30..63 repeat 0..33
    logits[0, :3] = 25.0  # softplus past its threshold (the identity)
    bias = torch.randn(E, generator=gen) * 0.1
    bias[30:] = bias[:34].clone()
    hash_ids = torch.randint(0, E, (T, k), generator=gen)
    for b, h in [(None, None), (bias, None), (None, hash_ids)]:
        weights, ids = kernels.route(logits, b, score_func, k, scaling, h)
        scores = SCORE_FUNCS[score_func](logits)
        if h is not None:
            want = h.sort(dim=-1).values
        else:  # the k largest of scores + bias, ties to the lower id: a stable descending sort's first k
            want = (scores if b is None else scores + b).sort(dim=-1, descending=True, stable=True).indices[:, :k]
            want = want.sort(dim=-1).values
        assert torch.equal(ids, want)
        chosen = scores.gather(1, want)
        torch.testing.assert_close(weights, chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * scaling,
                                   rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="hash id"):
        kernels.route(logits, None, score_func, k, scaling, hash_ids + E)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_one_token_pair_and_indexer_query_give_the_linear_values(lib, dtype):
    """`linear_pair` and `index_query_one` against each weight's own `linear` at T = 1: the same bits for Q8_0,
    MXFP4 and bf16 matrices (the same kernels), F.linear's values up to float32 summation order for a Dense one."""
    from ds4py.formats import BF16Matrix, Dense
    from ds4py.model.rope import rotate

    gen = torch.Generator().manual_seed(31)
    n = 96
    x = torch.randn(1, n, generator=gen).to(dtype)
    exact = [random_weight(Q.Q8_0, 48, n, gen), random_weight(Q.MXFP4, 32, n, gen),
             BF16Matrix(torch.randn(40, n, generator=gen).bfloat16())]
    dense = Dense(torch.randn(24, n, generator=gen).to(dtype))
    for a, b in [(exact[0], exact[1]), (exact[2], dense)]:
        (ma, _), (mb, _) = kernels.matrix(a), kernels.matrix(b)
        ya, yb = torch.empty(a.shape[0], dtype=dtype), torch.empty(b.shape[0], dtype=dtype)
        assert kernels.linear_pair(x, ma, mb, ya, yb)
        assert torch.equal(ya, a.linear(x)[0])
        want = b.linear(x)[0]
        if b is dense:
            tol = 1e-6 if dtype == torch.float32 else 2**-7
            assert (yb.float() - want.float()).abs().max() <= tol * want.float().abs().max()
        else:
            assert torch.equal(yb, want)
    assert not kernels.linear_pair(x[:, :64], ma, mb, ya, yb)  # columns that do not match: declined
    assert kernels.matrix(Dense(torch.zeros(3, 4, 5))) is None

    heads, hd = 4, 12  # the indexer's query: wq [heads * hd, 96] times q_residual, rotated; weights wp [heads, n]
    wq, wp = random_weight(Q.Q8_0, heads * hd, 96, gen), Dense(torch.randn(heads, n, generator=gen).to(dtype))
    q_residual = torch.randn(1, 96, generator=gen).to(dtype)
    angle = torch.rand(1, 3, generator=gen) * 6
    rotation = torch.polar(torch.ones_like(angle), angle)
    q, w = kernels.index_query_one(q_residual, x, kernels.matrix(wq)[0], kernels.matrix(wp)[0], heads, hd, rotation,
                                   0.5)
    assert torch.equal(q, rotate(wq.linear(q_residual).view(1, heads, hd), rotation))
    want = wp.linear(x).float() * 0.5
    assert (w - want).abs().max() <= 2**-7 * want.abs().max()
