"""The official checkpoint layout: FP8/FP4 tensors read lazily, stacked experts, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.errors import ModelFormatError
from ds4py.loaders.memory import from_tensors
from ds4py.loaders.official import save_official
from ds4py.loaders.open import open_weights
from ds4py.model.init import random_weights

CONFIG = tiny_config()
IDS = torch.randint(0, CONFIG.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def weights():
    return random_weights(CONFIG, seed=11)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    return save_official(weights, CONFIG, tmp_path_factory.mktemp("official"), shard_size=200_000)


def test_fp8_fp4_checkpoint_equals_its_dequantized_weights(checkpoint, weights):
    source = open_weights(checkpoint)
    assert source.kind == "official"
    assert len(list(checkpoint.glob("*.safetensors"))) > 1  # sharded, with an index
    kinds = {n: source.get(n).kind for n in ("layers.1.attn.wq_b.weight", "layers.1.ffn.experts.w1", "embed.weight")}
    assert kinds == {"layers.1.attn.wq_b.weight": "fp8", "layers.1.ffn.experts.w1": "fp4", "embed.weight": "bf16"}
    dequantized = {n: source.get(n).dequantize(torch.float32 if not n.endswith("tid2eid") else torch.int32)
                   for n in source.names()}
    quantized_model = ds4py.load(checkpoint)
    reference = ds4py.load(from_tensors(CONFIG, dequantized)).logits(IDS)
    assert (quantized_model.logits(IDS) - reference).abs().max().item() < 1e-4
    # the quantization itself: this random model is chaotic (rounding the weights to bf16 alone moves
    # its logits by 12 %), so ask only that FP8/FP4 keep the logits' direction (measured: 0.92)
    original = ds4py.load(from_tensors(CONFIG, weights)).logits(IDS)
    cos = torch.nn.functional.cosine_similarity(reference, original, dim=-1).mean().item()
    assert cos > 0.85, cos


def test_unquantized_official_layout_is_exact(tmp_path, weights):
    path = save_official(weights, CONFIG, tmp_path / "f32", quantize=False)
    ours = ds4py.load(path).logits(IDS[:100])
    assert (ours - ds4py.load(from_tensors(CONFIG, weights)).logits(IDS[:100])).abs().max().item() < 1e-5


def test_missing_shard_is_named(tmp_path, weights):
    path = save_official(weights, CONFIG, tmp_path / "ck", shard_size=200_000)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFormatError, match=victim.name):
        open_weights(path)


def test_truncated_shard_is_caught_before_reading(tmp_path, weights):
    path = save_official(weights, CONFIG, tmp_path / "ck", shard_size=200_000)
    victim = sorted(path.glob("*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_weights(path)


def test_wrong_shape_and_unknown_architecture(tmp_path, weights):
    bad = dict(weights)
    bad["layers.0.attn.wkv.weight"] = torch.zeros(16, CONFIG.hidden_size)
    path = save_official(bad, CONFIG, tmp_path / "shape")
    with pytest.raises(ModelFormatError, match=r"wkv\.weight has shape \[16, 64\], expected \[32, 64\]"):
        open_weights(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported architecture"):
        open_weights(path)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        open_weights(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="config.json"):
        open_weights(tmp_path)
