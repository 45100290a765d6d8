"""`ds4py convert` and the GGUF reader: official FP8/FP4 checkpoint -> llama.cpp's deepseek4 GGUF."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

import ds4py
from ds4py.config import tiny_config
from ds4py.convert import convert
from ds4py.errors import Ds4pyError, ModelFormatError
from ds4py.loaders.memory import from_tensors
from ds4py.loaders.official import save_official
from ds4py.loaders.open import open_weights
from ds4py.model.init import random_weights

CONFIG = tiny_config()
IDS = torch.randint(0, CONFIG.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return save_official(random_weights(CONFIG, seed=3), CONFIG, tmp_path_factory.mktemp("ck") / "tiny", 150_000)


@pytest.fixture(scope="module")
def gguf_path(official, tmp_path_factory):
    return convert(official, tmp_path_factory.mktemp("out") / "tiny.gguf", progress=False)


def test_gguf_metadata_and_types(gguf_path):
    r = GGUFReader(str(gguf_path))
    assert r.fields["general.architecture"].contents() == "deepseek4"
    assert r.fields["deepseek4.attention.compress_ratios"].contents() == CONFIG.compress_ratios
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == "MXFP4"
    assert types["blk.1.attn_q_b.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_tid2eid.weight"] == "I32"
    assert types["token_embd.weight"] == "BF16" and types["blk.1.attn_compressor_ape.weight"] == "F32"
    assert "tokenizer.chat_template" in r.fields


def test_gguf_loads_and_agrees_with_the_checkpoint(official, gguf_path, monkeypatch):
    ck, gg = open_weights(official), open_weights(gguf_path)
    assert gg.kind == "gguf" and gg.config == ck.config
    for name in ("layers.1.ffn.experts.w1", "layers.2.ffn.experts.w2"):  # MXFP4 repack: bit-exact
        assert torch.equal(gg.get(name).dequantize(), ck.get(name).dequantize())
    w_ck = ck.get("layers.1.attn.wq_b.weight").dequantize()
    w_gg = gg.get("layers.1.attn.wq_b.weight").dequantize()
    assert (w_gg - w_ck).abs().max() <= w_ck.abs().max() / 127  # within Q8_0's step
    # the GGUF model computes exactly what its own dequantized weights give (without the CPU kernels) ...
    deq = {n: gg.get(n).dequantize(torch.int32 if n.endswith("tid2eid") else torch.float32) for n in gg.names()}
    kernel_logits = ds4py.load(gguf_path).logits(IDS)
    monkeypatch.setenv("DS4PY_NO_KERNELS", "1")
    ours = ds4py.load(gguf_path).logits(IDS)
    assert (ours - ds4py.load(from_tensors(gg.config, deq)).logits(IDS)).abs().max() < 1e-4
    # ... the Q8_0/MXFP4 kernels (activations rounded to int8 per 32, ~0.55% per matmul) stay close to it:
    # measured mean cosine 0.990 on this random 4-layer model, whose routing amplifies small differences
    cos = torch.nn.functional.cosine_similarity(kernel_logits, ours, dim=-1).mean()
    assert cos > 0.98, cos
    # ... and stays next to the FP8 checkpoint's logits (Q8_0 of FP8 is near-lossless; measured 0.997)
    cos = torch.nn.functional.cosine_similarity(ours, ds4py.load(official).logits(IDS), dim=-1).mean()
    assert cos > 0.98, cos


def test_refuses_existing_output_and_leaves_nothing_on_failure(official, gguf_path, tmp_path, monkeypatch):
    with pytest.raises(Ds4pyError, match="--force"):
        convert(official, gguf_path, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(official, broken)
    sorted(broken.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        convert(broken, tmp_path / "a.gguf", progress=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10, 10))
    with pytest.raises(Ds4pyError, match="free"):
        convert(official, tmp_path / "b.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_failure_mid_write_removes_the_partial_file(official, tmp_path, monkeypatch):
    import ds4py.convert as conv

    calls = {"n": 0}
    real = conv.encode

    def failing(w, p):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("No space left on device")
        return real(w, p)

    monkeypatch.setattr(conv, "encode", failing)
    with pytest.raises(OSError):
        convert(official, tmp_path / "c.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_gguf_of_another_architecture_or_truncated(tmp_path, gguf_path):
    other = tmp_path / "llama.gguf"
    w = GGUFWriter(str(other), "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="'llama', not 'deepseek4'"):
        open_weights(other)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:-5000])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_weights(cut)


def test_unquantized_source_is_laid_out_like_the_official(tmp_path):
    """Float weights under the official names -> Q8_0 where the release has FP8, experts quantized to MXFP4
    (equal to the FP4 quantizer's values), BF16/F32 as the release; and that GGUF requantized again from a
    BF16 GGUF gives the same tensors, with the source's tokenizer metadata."""
    from ds4py.formats.fp4 import FP4Block, quantize_fp4
    from ds4py.tokenizer import default_tokenizer_dir

    weights = random_weights(CONFIG, seed=5)
    floats = save_official(weights, CONFIG, tmp_path / "float", quantize=False)
    shutil.copyfile(default_tokenizer_dir() / "tokenizer.json", floats / "tokenizer.json")
    direct = convert(floats, tmp_path / "direct.gguf", progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(direct)).tensors}
    assert types["blk.1.attn_q_b.weight"] == "Q8_0" and types["blk.1.ffn_gate_exps.weight"] == "MXFP4"
    assert types["token_embd.weight"] == "BF16" and types["blk.1.attn_compressor_ape.weight"] == "F32"
    got = open_weights(direct).get("layers.1.ffn.experts.w1").dequantize()
    assert torch.equal(got, FP4Block(*quantize_fp4(weights["layers.1.ffn.experts.w1"])).dequantize())
    bf16 = convert(floats, tmp_path / "bf16.gguf", type="bf16", experts="bf16", progress=False)
    again = convert(bf16, tmp_path / "again.gguf", progress=False)
    a, b = open_weights(again), open_weights(bf16)
    assert {t.name: t.tensor_type.name for t in GGUFReader(str(again)).tensors} == types
    assert a.metadata["tokenizer.ggml.tokens"] == b.metadata["tokenizer.ggml.tokens"]
    w = b.get("layers.1.attn.wq_b.weight").dequantize()
    assert (a.get("layers.1.attn.wq_b.weight").dequantize() - w).abs().max() <= w.abs().max() / 127
    with pytest.raises(Ds4pyError, match="source GGUF"):
        convert(bf16, bf16, force=True, progress=False)


def test_mtp_block_is_kept_on_request(official, gguf_path, tmp_path):
    """Left out by default (as llama.cpp converts); with `mtp`, written under its official names and read back: the
    MXFP4 experts bit-exact, e_proj within Q8_0's step, and speculative decoding on the GGUF (its kernels' two-token
    and one-token paths) gives the GGUF's own greedy tokens."""
    assert ds4py.load(gguf_path).transformer.mtp is None
    path = convert(official, tmp_path / "mtp.gguf", progress=False, mtp=True)
    ck, gg = open_weights(official), open_weights(path)
    assert torch.equal(gg.get("mtp.0.ffn.experts.w2").dequantize(), ck.get("mtp.0.ffn.experts.w2").dequantize())
    w_ck, w_gg = ck.get("mtp.0.e_proj.weight").dequantize(), gg.get("mtp.0.e_proj.weight").dequantize()
    assert (w_gg - w_ck).abs().max() <= w_ck.abs().max() / 127
    model = ds4py.load(path)
    assert model.transformer.mtp is not None
    prompt = IDS[:200]
    assert model.generate(prompt, 40, stop_token_ids=set(), speculative=True) == model.generate(
        prompt, 40, stop_token_ids=set())
    no_mtp = save_official({k: v for k, v in random_weights(CONFIG, seed=3).items() if not k.startswith("mtp.")},
                           CONFIG, tmp_path / "no-mtp", 150_000)
    with pytest.raises(Ds4pyError, match="no MTP block"):
        convert(no_mtp, tmp_path / "x.gguf", progress=False, mtp=True)
