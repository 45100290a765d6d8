"""Readers of the files users have. Each gives a `WeightSource`: the model config plus lazily read
weights under ds4py's canonical names (the official checkpoint's names, see `names.py`), with the
routed experts of a layer stacked as `layers.{i}.ffn.experts.w1|w2|w3` of shape [experts, out, in].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ds4py.config import ModelConfig
from ds4py.formats import Weight


@dataclass
class WeightSource:
    path: Path
    config: ModelConfig
    # canonical name -> a function that reads the weight (packed where the format allows)
    loaders: dict[str, Callable[[], Weight]]
    # format-specific facts: GGUF metadata (tokenizer, chat template), the file kind, ...
    metadata: dict = field(default_factory=dict)
    kind: str = ""  # "official", "transformers" or "gguf"
    # stacked expert name -> read_expert(e) -> 2-D Weight, reading only that expert's bytes from disk
    # (without touching a memory map), for streaming experts under a memory budget
    expert_readers: dict[str, Callable[[int], Weight]] = field(default_factory=dict)
    # canonical name -> a function that reads the whole weight into fresh memory (not a view of a memory
    # map), for streaming layers under a memory budget: a dropped weight then gives its memory back.
    # Sources whose loaders already read fresh memory (safetensors, tensors in memory) leave it empty.
    tensor_readers: dict[str, Callable[[], Weight]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.loaders)

    def get(self, name: str) -> Weight:
        return self.loaders[name]()

    def read(self, name: str) -> Weight:
        """The weight in memory of its own, to be dropped after use (`get` may return a view of a map)."""
        return self.tensor_readers.get(name, self.loaders[name])()
