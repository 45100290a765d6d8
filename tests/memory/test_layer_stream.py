"""stream-layers builds each streamed block from the source with the same code the resident model used
at load: logits are bit-identical to the resident mode for chunked prefill, decode steps and batched
decode, whether some layers are kept or none, and every forward step builds each streamed layer once."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.loaders.memory import from_tensors
from ds4py.memory.plan import weight_sizes, working_memory
from ds4py.model.init import random_weights
from tests.test_memory import streaming_source

CONFIG = tiny_config()
WEIGHTS = random_weights(CONFIG, seed=4)
IDS = torch.randint(0, CONFIG.vocab_size, (160,), generator=torch.Generator().manual_seed(0)).tolist()


def floor_budget() -> int:
    """The smallest budget stream-layers accepts: shared weights, the largest layer, one token's experts."""
    s = weight_sizes(streaming_source(CONFIG, WEIGHTS), 4)
    return s.shared + max(s.layers) + s.min_cache + working_memory(CONFIG)


def run(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(all logits of 160 tokens in three chunks (past a ratio-128 window), each step's logits of a
    greedy generation of 5 tokens, the logits of one batched decode step over two sequences)."""
    model.prefill_chunk = 64
    logits = model.logits(IDS)
    gen = torch.stack([s.logits for s in model.stream(IDS[:40], 5, lambda lg, _ids: int(lg.argmax()))])
    caches = [model.new_cache(), model.new_cache()]
    model.prefill(IDS[:20], caches[0])
    model.prefill(IDS[50:63], caches[1])
    batch = model.decode_batch([IDS[20], IDS[63]], caches)
    return logits, gen, batch


@pytest.fixture(scope="module")
def resident():
    return run(ds4py.load(from_tensors(CONFIG, WEIGHTS)))


@pytest.mark.parametrize("extra_layers", [0, 2])
def test_stream_layers_logits_equal_resident(resident, extra_layers):
    largest = max(weight_sizes(streaming_source(CONFIG, WEIGHTS), 4).layers)
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=floor_budget() + extra_layers * largest)
    plan = model.memory_plan
    assert plan.mode == "stream-layers"
    kept = len(plan.kept_layers)
    assert (kept == 0) if extra_layers == 0 else (0 < kept < CONFIG.num_hidden_layers)
    for ours, theirs in zip(run(model), resident):
        assert torch.equal(ours, theirs)
    forward_steps = 3 + 5 + 2 + 1  # logits in 3 chunks; prefill + 4 decode steps; two prefills; one batch step
    stats = model.layer_stream.stats
    assert stats.misses == forward_steps * (CONFIG.num_hidden_layers - kept)
    assert stats.hits == forward_steps * kept
    assert stats.bytes_read > 0


def test_stream_layers_speculative_decoding_equals_resident():
    """The MTP block is built from the file for each guess and dropped, as a streamed layer: speculative decoding
    under stream-layers gives the resident model's tokens, each step building the streamed layers once more."""
    from ds4py.model.transformer import StreamedMTP
    from ds4py.speculative import SpeculativeStats, speculative_decode

    resident = ds4py.load(from_tensors(CONFIG, WEIGHTS))
    model = ds4py.load(streaming_source(CONFIG, WEIGHTS), memory_budget=floor_budget())
    assert model.memory_plan.mode == "stream-layers" and isinstance(model.transformer.mtp, StreamedMTP)
    plain = resident.generate(IDS[:90], 20, stop_token_ids=set())
    stats = SpeculativeStats()
    assert [s.token for s in speculative_decode(model, IDS[:90], 20, set(), stats)] == plain
    assert stats.steps > 0
