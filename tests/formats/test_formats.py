"""Packed formats against the gguf library's reference (de)quantizers and the format definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from ds4py.formats.fp4 import FP4Block, quantize_fp4
from ds4py.formats.fp8 import FP8Block, quantize_fp8_block
from ds4py.formats.ggml import GGMLWeight, fp4_to_mxfp4, ggml_dequantize, quantize_q8_0

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def test_q8_0_quantize_is_bit_identical_to_ggml():
    x = randn(6, 256) * 3
    ours = quantize_q8_0(x).numpy()
    ref = gq.quantize(x.numpy(), Q.Q8_0)
    assert np.array_equal(ours, ref)
    back = GGMLWeight(Q.Q8_0, torch.from_numpy(ref), (6, 256)).dequantize()
    assert torch.equal(back, torch.from_numpy(gq.dequantize(ref, Q.Q8_0)))
    assert (back - x).abs().max() <= x.abs().max() / 127


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q2_K, Q.IQ2_XXS, Q.Q6_K, Q.BF16, Q.F16])
def test_other_ggml_types_dequantize_like_gguf(qtype):
    block, size = gq.GGML_QUANT_SIZES[qtype]
    rows, n = 3, 512
    if qtype in (Q.BF16, Q.F16):
        raw = gq.quantize(randn(rows, n).numpy(), qtype) if qtype == Q.F16 else None
        if raw is None:
            raw = torch.from_numpy(randn(rows, n).numpy()).to(torch.bfloat16).view(torch.uint8).numpy()
        raw = raw.view(np.uint8).reshape(rows, -1)
    else:
        raw = torch.randint(0, 256, (rows, n // block * size), generator=g, dtype=torch.uint8).numpy()
        if qtype != Q.IQ2_XXS:  # keep the f16 super-block scales finite
            raw = raw.reshape(rows, -1, size)
            raw[..., -4:] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), dtype=np.uint8)
            raw = raw.reshape(rows, -1)
    ours = ggml_dequantize(qtype, torch.from_numpy(raw.copy()), (rows, n))
    ref = gq.dequantize(raw, qtype).reshape(rows, n)
    assert torch.allclose(ours, torch.from_numpy(np.ascontiguousarray(ref)).float(), equal_nan=True)


def test_fp8_block_roundtrip_within_e4m3_error():
    w = randn(300, 200) * 0.05
    q, s = quantize_fp8_block(w)
    assert s.shape == (3, 2) and q.dtype == torch.float8_e4m3fn
    back = FP8Block(q, s).dequantize()
    assert ((back - w).abs() <= w.abs() * 2**-3 + 1e-6).all()  # e4m3 keeps 3 mantissa bits


def test_fp4_roundtrip_and_lossless_mxfp4_repack():
    w = randn(4, 64, 128) * 0.1  # a stack of 4 experts
    packed, scale = quantize_fp4(w)
    fp4 = FP4Block(packed, scale)
    deq = fp4.dequantize()
    assert fp4.shape == (4, 64, 128) and packed.shape == (4, 64, 64) and scale.shape == (4, 64, 4)
    assert (deq - w).abs().max() <= w.abs().max() / 6  # one e2m1 step at the group's top
    mx = GGMLWeight(Q.MXFP4, fp4_to_mxfp4(packed, scale), (4, 64, 128))
    assert torch.equal(mx.dequantize(), deq)  # bit-exact
    assert torch.equal(mx.expert(2).dequantize(), fp4.expert(2).dequantize())
    ref = gq.dequantize(mx.raw.reshape(-1, mx.raw.shape[-1]).numpy(), Q.MXFP4).reshape(4, 64, 128)
    assert torch.equal(torch.from_numpy(ref), deq)
