"""ds4py's model against transformers' DeepseekV4ForCausalLM on tiny random configs (float32)."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights
from tests.model.reference import transformers_model

CONFIGS = {
    # every attention type; 600 tokens = 75 windows of 8, 4 ratio-128 blocks, 150 ratio-4 entries > top-3
    "tiny": tiny_config(),
    "variant": tiny_config(
        hc_mult=2, sliding_window=16, index_topk=5, num_hash_layers=2, compress_ratios=[4, 128, 0, 4, 0],
        num_attention_heads=2, o_groups=1, n_routed_experts=6, num_experts_per_tok=3,
    ),
}


def ids_of(n: int, vocab: int, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    config = CONFIGS[name]
    weights = random_weights(config, seed=1)
    ids = ids_of(600, config.vocab_size)
    with torch.no_grad():
        ref = transformers_model(config, weights)(torch.tensor([ids]), use_cache=False).logits[0].float()
    ours = ds4py.load(from_tensors(config, weights)).logits(ids)
    assert ours.shape == (600, config.vocab_size)
    assert relative_error(ours, ref) < 1e-4  # reached: 9.3e-7 and 8.8e-7 on the two configs


def test_greedy_generation_matches_transformers_cached_generate():
    config = CONFIGS["tiny"]
    weights = random_weights(config, seed=2)
    prompt = ids_of(250, config.vocab_size, seed=5)  # decoding crosses the ratio-128 boundary at 256
    ref_model = transformers_model(config, weights)
    with torch.no_grad():
        ref = ref_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()
    ours = ds4py.load(from_tensors(config, weights)).generate(prompt, max_new_tokens=12, stop_token_ids=set())
    assert ours == ref


@pytest.mark.parametrize("chunk", [1, 7, 128, 200])
def test_chunked_prefill_matches_one_full_pass(chunk):
    config = CONFIGS["tiny"]
    model = ds4py.load(from_tensors(config, random_weights(config, seed=1)))
    ids = ids_of(420 if chunk > 1 else 150, config.vocab_size)
    model.prefill_chunk = 10_000
    full = model.logits(ids)
    model.prefill_chunk = chunk
    assert (model.logits(ids) - full).abs().max().item() < 1e-4


def test_decode_after_prefill_matches_full_pass():
    config = CONFIGS["tiny"]
    model = ds4py.load(from_tensors(config, random_weights(config, seed=1)))
    ids = ids_of(300, config.vocab_size)
    full = model.logits(ids)
    cache = model.new_cache()
    model.prefill(ids[:261], cache)
    for i in range(261, 300):
        step = model.prefill([ids[i]], cache)
        assert (step - full[i]).abs().max().item() < 1e-4, f"position {i}"
