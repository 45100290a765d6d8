"""The memory plan's count of the resident weights equals what the built model holds, in each compute
dtype: float tensors converted to it, BF16 matrices kept BF16, norms / hyper-connection parameters /
sinks / routers float32 whatever the dtype, hash tables int64, packed formats as stored."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ds4py
from ds4py.formats import Weight
from ds4py.loaders.open import open_weights
from ds4py.memory.expert_cache import StreamedExperts
from ds4py.memory.plan import weight_bytes
from ds4py.synthetic import make_model


def held_bytes(obj, seen: set[int]) -> int:
    """Bytes of every tensor reachable from obj (dataclasses, lists, dicts, Weights), each storage once."""
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel() * obj.element_size())  # views of a memory map: their own bytes
        if key in seen:
            return 0
        seen.add(key)
        return key[1]
    if isinstance(obj, StreamedExperts):
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(o, seen) for o in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(held_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, Weight):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_counts_what_the_model_holds(tmp_path, dtype):
    path = tmp_path / "tiny.gguf"
    make_model(str(path), preset="tiny", seed=1)
    source = open_weights(path)
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    resident, experts = weight_bytes(source, size)
    model = ds4py.load(str(path), dtype=dtype)
    assert model.memory_plan.mode == "resident"
    held = held_bytes(model.transformer, set())
    assert abs(held - (resident + experts)) <= 0.001 * resident, (held, resident + experts)
