"""Read-ahead of the next layer's likely experts changes only when experts are read, never the logits:
prefill and decode-step logits are bit-identical with it on (each predictor) and off, in stream-experts
and stream-layers; hash layers are predicted exactly (every expert they prefetch is used); a prefetch
never takes the cache above its capacity nor evicts the running layer's pinned experts."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.errors import Ds4pyError
from ds4py.formats import Dense
from ds4py.loaders.memory import from_tensors
from ds4py.memory.expert_cache import ExpertCache
from ds4py.memory.plan import weight_sizes, working_memory
from ds4py.model.init import random_weights
from tests.test_memory import streaming_source

CONFIG = tiny_config(n_routed_experts=16, num_experts_per_tok=2, num_hash_layers=2)
WEIGHTS = random_weights(CONFIG, seed=4)
IDS = torch.randint(0, CONFIG.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()


def budget(expert_fraction: float) -> int:
    """Everything but the routed experts resident, and a cache for `expert_fraction` of them."""
    s = weight_sizes(streaming_source(CONFIG, WEIGHTS), 4)
    return s.non_expert + working_memory(CONFIG) + int(s.experts * expert_fraction)


def run(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of 48 tokens in two prefill chunks, each step's logits of a greedy 6-token generation)."""
    model.prefill_chunk = 32
    logits = model.logits(IDS)
    steps = torch.stack([s.logits for s in model.stream(IDS[:20], 6, lambda lg, _ids: int(lg.argmax()))])
    return logits, steps


@pytest.fixture(scope="module")
def without():
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5), read_ahead=False)
    assert model.memory_plan.mode == "stream-experts" and model.transformer.read_ahead is None
    return run(model)


@pytest.mark.parametrize("predictor", ["gate", "previous", "hash"])
def test_read_ahead_logits_equal_without(without, predictor):
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5), read_ahead=predictor)
    assert model.memory_plan.mode == "stream-experts"
    for ours, theirs in zip(run(model), without):
        assert torch.equal(ours, theirs)
    stats, cache = model.expert_cache.stats, model.expert_cache
    assert stats.prefetched > 0 and 0 < stats.prefetch_hits <= stats.prefetched
    assert cache.used_bytes <= cache.capacity_bytes
    assert set(stats.as_dict()) >= {"prefetched", "prefetch_hits", "prefetch_hit_rate"}


def test_read_ahead_in_stream_layers_logits_equal_without():
    s = weight_sizes(streaming_source(CONFIG, WEIGHTS), 4)
    floor = s.shared + max(s.layers) + s.min_cache + working_memory(CONFIG)
    out = []
    for ahead in (False, True):
        model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=floor + s.layers[0], read_ahead=ahead)
        assert model.memory_plan.mode == "stream-layers"
        out.append(run(model))
    for ours, theirs in zip(*out):
        assert torch.equal(ours, theirs)


def test_hash_layers_prefetch_is_exact():
    # a cache for 90% of the experts: a prefetched expert is not evicted by other reads before its layer runs
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.9), read_ahead="hash")
    run(model)
    stats, ahead = model.expert_cache.stats, model.transformer.read_ahead
    assert stats.prefetched > 0 and stats.prefetch_hits == stats.prefetched
    assert ahead.coverage(range(CONFIG.num_hash_layers)) == 1.0
    assert ahead.coverage(range(CONFIG.num_hash_layers, CONFIG.num_hidden_layers)) == 0.0  # not predicted


def test_prefetch_keeps_capacity_and_pinned():
    def load(value):
        return lambda: Dense(torch.full((4,), float(value)))  # 16 bytes

    cache = ExpertCache(capacity_bytes=48)
    for e in range(3):
        cache.get(("w", e), load(e))
    cache.pinned = {("w", 0), ("w", 1)}
    assert cache.prefetch(("w", 3), load(3), keep=set())           # evicts ("w", 2), the only one not pinned
    assert set(cache.entries) == {("w", 0), ("w", 1), ("w", 3)}
    assert not cache.prefetch(("w", 4), load(4), keep={("w", 3)})  # only pinned or kept entries left
    assert not cache.prefetch(("w", 0), load(0), keep=set())       # already cached
    assert cache.used_bytes == 48 and cache.stats.prefetched == 1
    cache.get(("w", 3), load(3))
    assert cache.stats.prefetch_hits == 1 and cache.stats.hits == 1


def test_read_ahead_switch(monkeypatch):
    monkeypatch.delenv("DS4PY_READ_AHEAD", raising=False)
    assert ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5)).transformer.read_ahead is None
    monkeypatch.setenv("DS4PY_READ_AHEAD", "on")
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5))
    assert model.transformer.read_ahead.predictor == "gate"
    monkeypatch.setenv("DS4PY_READ_AHEAD", "previous")
    assert ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5)).transformer.read_ahead.predictor \
        == "previous"
    assert ds4py.load(from_tensors(CONFIG, WEIGHTS), read_ahead=True).transformer.read_ahead is None  # resident
    with pytest.raises(Ds4pyError, match="read-ahead"):
        ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=budget(0.5), read_ahead="oracle")
