"""The GPU path's Triton kernels (`ds4py.formats.gpu_kernels`) against the plain dequantize + product: on a CUDA device
where there is one, else on the CPU through Triton's interpreter (DS4PY_GPU_KERNELS_ON_CPU=1), the same kernels'
code either way."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.convert import convert
from ds4py.formats import gpu_kernels, kernels
from ds4py.formats.ggml import Q, ggml_dequantize, quantize_q8_0
from ds4py.loaders.official import save_official
from ds4py.model.init import random_weights
from ds4py.model.moe import MoE

pytest.importorskip("triton", reason="Triton is in the test extra: pip install -e '.[test]'")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def on_this_machine(monkeypatch):
    monkeypatch.setenv("DS4PY_GPU_KERNELS_ON_CPU", "1")  # (only read where there is no GPU)


def mxfp4_rows(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random MXFP4 rows [rows, n/32*17]: every nibble, exponents 0..140 (0 and 1 give subnormal scales)."""
    blocks = torch.randint(0, 256, (rows, n // 32, 17), dtype=torch.uint8, generator=gen)
    blocks[..., 0] = torch.randint(0, 141, (rows, n // 32), dtype=torch.uint8, generator=gen)
    blocks[0, 0, 0], blocks[0, 1 % (n // 32), 0] = 0, 1
    blocks[1, 0, 0] = 140
    return blocks.reshape(rows, -1)


def weights(qtype: int, rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the kernels read, its float32 values)."""
    gen = torch.Generator().manual_seed(seed)
    if qtype == gpu_kernels.BF16:
        w = torch.randn(rows, n, generator=gen).bfloat16()
        return w, w.float()
    raw = quantize_q8_0(torch.randn(rows, n, generator=gen)) if qtype == Q.Q8_0 else mxfp4_rows(rows, n, gen)
    return raw, ggml_dequantize(qtype, raw, (rows, n))


def relative_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """|y - x @ w.T| over |x| @ |w|.T (float64): the error a float32 sum of these products may have, ~1e-7."""
    ref = x.double() @ w.double().T
    scale = x.abs().double() @ w.abs().double().T
    return float(((y.double() - ref).abs() / scale.clamp_min(1e-300)).max())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=["q8_0", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_dequantize_gives_the_blocks_values(qtype, dtype):
    raw, w = weights(int(qtype), 70, 96, seed=1)
    out = gpu_kernels.dequantize(raw.to(DEVICE), int(qtype), dtype)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.cpu(), w.to(dtype))  # exact: every value is a float32 (and rounds once to dtype)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4, gpu_kernels.BF16], ids=["q8_0", "mxfp4", "bf16"])
@pytest.mark.parametrize("shape", [(40, 96), (130, 1088)], ids=["small", "tiles"])  # tails of row and column tiles
def test_gemv_is_the_product_summed_in_float32(qtype, shape):
    raw, w = weights(int(qtype), *shape, seed=2)
    x = torch.randn(gpu_kernels.GEMV_MAX_T, shape[1], generator=torch.Generator().manual_seed(3))
    y = gpu_kernels.gemv(x.to(DEVICE), raw.to(DEVICE), int(qtype))
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], shape[0])
    assert relative_error(y.cpu(), x, w) < 1e-5
    # each row of x gives the same bits alone as among others (a decoding token's = a prompt row's)
    assert torch.equal(gpu_kernels.gemv(x[3:4].to(DEVICE), raw.to(DEVICE), int(qtype)).cpu(), y[3:4].cpu())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=["q8_0", "mxfp4"])
def test_stack_rows_pick_their_expert_and_input(qtype):
    """Row p of stack_linear is x[p // x_div] against matrix ids[p]: the same bits as that matrix's own gemv."""
    stack = torch.stack([weights(int(qtype), 48, 64, seed=10 + e)[0] for e in range(5)])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([4, 0, 2, 2, 1, 4])
    y = gpu_kernels.stack_linear(x.to(DEVICE), stack.to(DEVICE), int(qtype), ids.to(DEVICE), x_div=3).cpu()
    for p, e in enumerate(ids.tolist()):
        alone = gpu_kernels.gemv(x[p // 3:p // 3 + 1].to(DEVICE), stack[e].to(DEVICE), int(qtype)).cpu()
        assert torch.equal(y[p:p + 1], alone), p


def test_the_products_route_through_the_kernels_and_back(monkeypatch):
    """ggml_linear and bf16_linear take the kernels for these tensors: the GEMV up to GEMV_MAX_T rows, dequantize +
    torch's product beyond; both within float32 rounding of the plain product. DS4PY_NO_GPU_KERNELS=1 turns them
    off."""
    calls = []
    real = gpu_kernels.gemv
    monkeypatch.setattr(gpu_kernels, "gemv", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    raw, w = weights(int(Q.Q8_0), 64, 128, seed=5)
    for T in (1, gpu_kernels.GEMV_MAX_T, gpu_kernels.GEMV_MAX_T + 1):
        x = torch.randn(T, 128, generator=torch.Generator().manual_seed(T))
        y = kernels.ggml_linear(x.to(DEVICE), raw.to(DEVICE), int(Q.Q8_0))
        assert relative_error(y.cpu(), x, w) < 1e-5
    head, wf = weights(gpu_kernels.BF16, 96, 128, seed=6)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(7))
    y = kernels.bf16_linear(x.to(DEVICE), head.to(DEVICE), as_float32=True)
    assert y.dtype == torch.float32 and relative_error(y.cpu(), x, wf) < 1e-5
    assert calls == [1, gpu_kernels.GEMV_MAX_T, 2]
    monkeypatch.setenv("DS4PY_NO_GPU_KERNELS", "1")
    kernels.ggml_linear(x.to(DEVICE), raw.to(DEVICE), int(Q.Q8_0))
    assert len(calls) == 3


def test_errors_name_what_is_wrong():
    raw, _ = weights(int(Q.Q8_0), 8, 64, seed=8)
    with pytest.raises(ValueError, match="does not match the weight's 64 columns"):
        gpu_kernels.gemv(torch.zeros(1, 32, device=DEVICE), raw.to(DEVICE), int(Q.Q8_0))
    with pytest.raises(ValueError, match="not one the kernels decode"):
        gpu_kernels.dequantize(raw.to(DEVICE), 12)
    with pytest.raises(ValueError, match="whole 34-byte blocks"):
        gpu_kernels.dequantize(raw[:, :33].to(DEVICE), int(Q.Q8_0))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    config = tiny_config()
    official = save_official(random_weights(config, seed=5), config, tmp_path_factory.mktemp("ck") / "tiny", 1 << 30)
    return convert(official, tmp_path_factory.mktemp("gguf") / "tiny.gguf", progress=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_on_the_kernels_gives_the_plain_products_logits(tiny_gguf, monkeypatch, dtype):
    """The tiny model (Q8_0 matrices, MXFP4 experts, a bf16 head) with every packed product on the GPU path (the MoE's
    experts by id, no host sync) against the same model with dequantize + F.linear: a 10-token prompt, then 4
    decoded tokens, logits within float32 rounding (bf16: within bf16's own rounding of the activations)."""
    monkeypatch.setenv("DS4PY_NO_KERNELS", "1")  # (the compiled CPU paths off on both sides)
    prompt = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(9)).tolist()
    steps = [17, 300, 4, 511]

    def run(model):
        cache = model.new_cache()
        out = [model.prefill(prompt, cache)[-1:]]
        out += [model.prefill([t], cache) for t in steps]
        return torch.cat(out).float().cpu()

    monkeypatch.setenv("DS4PY_NO_GPU_KERNELS", "1")
    plain = run(ds4py.load(str(tiny_gguf), device=DEVICE, dtype=dtype))
    monkeypatch.delenv("DS4PY_NO_GPU_KERNELS")
    by_id, gemv = [], []
    real_by_id, real_gemv = MoE.by_id, gpu_kernels.gemv
    monkeypatch.setattr(MoE, "by_id", lambda *a: by_id.append(1) or real_by_id(*a))
    monkeypatch.setattr(gpu_kernels, "gemv", lambda *a, **k: gemv.append(1) or real_gemv(*a, **k))
    fast = run(ds4py.load(str(tiny_gguf), device=DEVICE, dtype=dtype))
    assert len(by_id) == len(steps) * 4 and len(gemv) > 100  # every decoded token's MoE, on every layer
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert float((fast - plain).abs().max()) <= tol * float(plain.abs().max()), (fast - plain).abs().max()
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


COMPILE = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ds4py.formats.gpu_kernels as g

g.tl, g._weights_jit = tl, triton.jit(g._weights)  # what _kernels() does where there is a GPU
gemv, dequantize = triton.jit(g._gemv), triton.jit(g._dequantize)
target = GPUTarget("cuda", 90, 32)  # an H100 / H200
for q in (8, 39, -1):
    for has_ids in (False, True):
        sig = {"x_ptr": "*fp32", "x_stride": "i32", "x_div": "i32", "w_ptr": "*bf16" if q == -1 else "*u8",
               "w_expert_stride": "i64", "w_row_stride": "i32", "ids_ptr": "*i64", "y_ptr": "*fp32", "rows": "i32",
               "n": "i32", "QTYPE": "constexpr", "HAS_IDS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
        k = triton.compile(ASTSource(gemv, sig, constexprs={"QTYPE": q, "HAS_IDS": has_ids, "BLOCK_R": 16,
                                                            "BLOCK_K": 256}), target=target)
        assert k.asm["cubin"], (q, has_ids)
    for bf16 in (False, True) if q != -1 else ():
        sig = {"w_ptr": "*u8", "w_row_stride": "i32", "out_ptr": "*i16" if bf16 else "*fp32", "rows": "i32",
               "n": "i32", "QTYPE": "constexpr", "BF16_BITS": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_K": "constexpr"}
        k = triton.compile(ASTSource(dequantize, sig, constexprs={"QTYPE": q, "BF16_BITS": bf16, "BLOCK_R": 16,
                                                                  "BLOCK_K": 256}), target=target)
        assert k.asm["cubin"], (q, bf16)
print("compiled")
'''


def test_the_kernels_compile_for_a_gpu(tmp_path):
    """What the interpreter does not check: Triton's compiler takes every kernel variant down to a cubin for sm_90
    (it needs no GPU: Triton ships ptxas), in a process where Triton is not in interpreter mode."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
