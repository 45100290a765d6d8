"""The memory plan as the budget shrinks: resident, then stream-experts, then stream-layers keeping
fewer and fewer layers, then a clear error; no plan promises more memory than its budget."""

from __future__ import annotations

import pytest

from ds4py.config import tiny_config
from ds4py.errors import Ds4pyError
from ds4py.loaders.memory import from_tensors
from ds4py.memory.plan import plan_memory, weight_sizes, working_memory
from ds4py.model.init import random_weights
from tests.test_memory import streaming_source

CONFIG = tiny_config()
SOURCE = streaming_source(CONFIG, random_weights(CONFIG, seed=4))
SIZES = weight_sizes(SOURCE, 4)
OVERHEAD = working_memory(CONFIG)
FLOOR = SIZES.shared + max(SIZES.layers) + SIZES.min_cache + OVERHEAD  # stream-layers' smallest budget


def planned_bytes(plan) -> int:
    """What the plan holds at most: resident weights, the expert cache, one streamed layer, working memory."""
    streamed = max((n for i, n in enumerate(SIZES.layers) if i not in plan.kept_layers), default=0)
    return plan.resident_bytes + plan.cache_bytes + (streamed if plan.mode == "stream-layers" else 0) + OVERHEAD


def test_modes_as_the_budget_shrinks():
    everything = SIZES.non_expert + SIZES.experts + OVERHEAD
    assert plan_memory(SOURCE, everything).mode == "resident"
    plan = plan_memory(SOURCE, everything - 1)
    assert plan.mode == "stream-experts" and plan.cache_bytes == SIZES.experts - 1
    plan = plan_memory(SOURCE, SIZES.non_expert + OVERHEAD + SIZES.min_cache)
    assert plan.mode == "stream-experts" and plan.cache_bytes == SIZES.min_cache
    kept_before = CONFIG.num_hidden_layers + 1
    seen = set()
    for budget in range(SIZES.non_expert + OVERHEAD + SIZES.min_cache - 1, FLOOR - 1, -4096):
        plan = plan_memory(SOURCE, budget)
        assert plan.mode == "stream-layers"
        assert planned_bytes(plan) <= budget
        assert len(plan.kept_layers) <= kept_before
        kept_before = len(plan.kept_layers)
        seen.add(kept_before)
        assert plan.streamed_bytes == sum(n for i, n in enumerate(SIZES.layers) if i not in plan.kept_layers)
        assert plan.cache_bytes >= SIZES.min_cache
    assert seen >= {0, 1, CONFIG.num_hidden_layers - 1}  # the sweep passed through every kind of plan
    plan = plan_memory(SOURCE, FLOOR)
    assert plan.kept_layers == () and plan.resident_bytes == SIZES.shared
    assert "stream-layers" in plan.describe() and f"0 of {CONFIG.num_hidden_layers} layers" in plan.describe()
    assert f"{CONFIG.num_hidden_layers} layers (" in plan.describe()


def test_budget_below_streaming_one_layer_at_a_time_says_what_it_needs():
    with pytest.raises(Ds4pyError) as e:
        plan_memory(SOURCE, FLOOR - 1)
    message = str(e.value)
    assert "raise --memory-budget" in message and "one layer at a time" in message
    assert f"needs {FLOOR / 2**20:.1f} MiB" in message
    assert "largest layer" in message and "working memory" in message


def test_without_expert_streaming_there_is_no_streaming_mode():
    weights = random_weights(CONFIG, seed=4)
    with pytest.raises(Ds4pyError, match="cannot stream its experts"):
        plan_memory(from_tensors(CONFIG, weights), FLOOR)


def test_prefill_chunk_follows_the_mode():
    """With many routed experts a resident model prefills in chunks of 512 (`default_prefill_chunk`); a budget
    that fits the weights only with the smaller chunk's working memory keeps them resident at that chunk, and the
    streaming modes plan and run at it."""
    import dataclasses

    from ds4py.engine import default_prefill_chunk

    config = dataclasses.replace(CONFIG, hidden_size=256, n_routed_experts=128, num_experts_per_tok=2)
    source = streaming_source(config, random_weights(config, seed=4))
    sizes = weight_sizes(source, 4)
    assert (default_prefill_chunk(config), default_prefill_chunk(config, streaming=True)) == (512, 256)
    wide, narrow = working_memory(config, 512), working_memory(config, 256)
    assert working_memory(config) == wide and working_memory(config, streaming=True) == narrow
    everything = sizes.non_expert + sizes.experts
    plan = plan_memory(source, everything + wide)
    assert (plan.mode, plan.prefill_chunk) == ("resident", 512)
    plan = plan_memory(source, everything + narrow)
    assert (plan.mode, plan.prefill_chunk) == ("resident", 256)
    plan = plan_memory(source, everything + narrow - 1)
    assert (plan.mode, plan.prefill_chunk) == ("stream-experts", 256)
    assert plan.cache_bytes == sizes.experts - 1
