"""Streaming experts through a small LRU cache gives the resident model's logits."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.errors import Ds4pyError
from ds4py.formats import Dense
from ds4py.loaders.memory import from_tensors
from ds4py.memory.plan import parse_size, working_memory
from ds4py.model.init import random_weights


def streaming_source(config, weights):
    source = from_tensors(config, weights)
    for name, t in weights.items():
        if ".ffn.experts." in name:
            source.expert_readers[name] = lambda e, t=t: Dense(t[e].clone())
    return source


def test_parse_size():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("1.5k") == 1536
    with pytest.raises(Ds4pyError, match="8G"):
        parse_size("eight gigs")


def test_streamed_experts_match_resident_and_count_hits():
    config = tiny_config()
    weights = random_weights(config, seed=4)
    ids = torch.randint(0, config.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    resident = ds4py.load(from_tensors(config, weights)).logits(ids)
    streamed = [n for n in weights if n.startswith("layers.") and ".ffn.experts." in n]
    expert_bytes = sum(weights[n].numel() * 4 for n in streamed)
    other_bytes = sum(t.numel() * t.element_size() for n, t in weights.items() if n not in streamed)
    overhead = working_memory(config)
    budget = other_bytes + overhead + expert_bytes * 3 // 5  # room for 60% of the experts
    model = ds4py.load(streaming_source(config, weights), memory_budget=budget)
    assert model.memory_plan.mode == "stream-experts"
    assert (model.logits(ids) - resident).abs().max().item() < 1e-5
    assert model.generate(ids[:50], 8) == ds4py.load(from_tensors(config, weights)).generate(ids[:50], 8)
    stats = model.expert_cache.stats
    assert stats.misses > 0 and stats.evictions > 0 and stats.hits > 0
    assert model.expert_cache.used_bytes <= model.memory_plan.cache_bytes


def test_budget_too_small_for_the_non_expert_weights_is_a_clear_error():
    config = tiny_config()
    weights = random_weights(config, seed=4)
    with pytest.raises(Ds4pyError, match="raise --memory-budget"):
        ds4py.load(streaming_source(config, weights), memory_budget="1M")
