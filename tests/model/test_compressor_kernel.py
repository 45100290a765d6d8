"""The compressor's compiled calls against `Compressor`'s torch ops: a prompt's closing windows in one call, and
each decoded token's projections and closing window in one step; ratio 4 (overlapping windows) and 128, float32 and
bf16."""

from __future__ import annotations

import pytest
import torch

from ds4py.cache import CompressorState
from ds4py.formats import Dense
from ds4py.model import compressor_kernel
from ds4py.model.compressor import Compressor
from ds4py.model.rope import Rotary

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


def make(ratio: int, dtype: torch.dtype, gen: torch.Generator) -> Compressor:
    dim, D = 32, 64
    od = 2 * dim if ratio == 4 else dim
    return Compressor(
        wkv=Dense((torch.randn(od, D, generator=gen) * 0.2).to(dtype)),
        wgate=Dense((torch.randn(od, D, generator=gen) * 0.5).to(dtype)),
        ape=torch.randn(ratio, od, generator=gen), norm=1 + 0.1 * torch.randn(dim, generator=gen), ratio=ratio,
        dim=dim, eps=1e-6, rotary=Rotary.make(8, 160000.0, YARN),
    )


def feed(comp: Compressor, x: torch.Tensor, chunks: list[int]) -> tuple[torch.Tensor, CompressorState]:
    state, start = CompressorState(), 0
    for size in chunks:
        entries = comp(x[start:start + size], state)
        start += size
    return entries, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ratio", [4, 128])
def test_closing_windows_equal_the_torch_ops(monkeypatch, ratio, dtype):
    gen = torch.Generator().manual_seed(ratio)
    comp = make(ratio, dtype, gen)
    x = torch.randn(300, 64, generator=gen).to(dtype)
    chunks = [37, 200] + [1] * 63  # a prompt (several windows per call), then decoding (one closing at a time)
    ran, steps = [], []
    real, real_step = compressor_kernel.close_windows, Compressor.step_one
    monkeypatch.setattr("ds4py.model.compressor.close_windows", lambda *a: ran.append(real(*a)) or ran[-1])
    monkeypatch.setattr(Compressor, "step_one", lambda *a: steps.append(real_step(*a)) or steps[-1])
    ours, state = feed(comp, x, chunks)
    if not any(ran):
        pytest.skip("the compressor kernel could not be built here")
    # the prompt's chunks that close windows (ratio 4: both; ratio 128: the second), then every decoded token in
    # one step each (a window closing at tokens 240, 244, ..., 300; ratio 128: at 256)
    assert all(ran) and len(ran) == (1 if ratio == 128 else 2)
    assert len(steps) == 63 and all(s is not None for s in steps)
    monkeypatch.setattr(Compressor, "close_compiled", lambda *a: None)
    monkeypatch.setattr(Compressor, "step_one", lambda *a: None)
    want, ref_state = feed(comp, x, chunks)
    assert ours.shape == want.shape == (300 // ratio, 32) and ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-6  # bf16: a value next to a rounding boundary, one step
    assert (ours.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    # the decoding step's projections are `kernels.linear_pair`'s: for these Dense weights F.linear's values up to
    # float32 summation order
    close = [(state.buffer_kv, ref_state.buffer_kv)]
    if ratio == 4:
        close += [(state.overlap_kv, ref_state.overlap_kv), (state.overlap_gate, ref_state.overlap_gate)]
    for a, b in close:
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=0, atol=tol * 4)  # values ~1-4
