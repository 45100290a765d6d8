"""Routed experts read on demand into an LRU cache bounded in bytes.

Only `num_experts_per_tok` of a layer's experts run per token, so with the non-expert weights
resident and the experts streamed from the (memory-mapped) file, memory is bounded by the cache size
instead of the model size. One cache is shared by every layer and projection; its hit rate and the
bytes it read are counted for `ds4py bench` and `/props`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4py.formats import Weight


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "bytes_read": self.bytes_read, "evictions": self.evictions}


class ExpertCache:
    """LRU of loaded expert weights keyed by (stack name, expert id), holding at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.entries: OrderedDict[tuple[str, int], Weight] = OrderedDict()
        self.stats = CacheStats()
        self.lock = threading.Lock()

    def get(self, key: tuple[str, int], load: Callable[[], Weight]) -> Weight:
        with self.lock:
            w = self.entries.get(key)
            if w is not None:
                self.entries.move_to_end(key)
                self.stats.hits += 1
                return w
        w = load()
        with self.lock:
            self.stats.misses += 1
            self.stats.bytes_read += w.nbytes
            if key not in self.entries:
                self.entries[key] = w
                self.used_bytes += w.nbytes
            while self.used_bytes > self.capacity_bytes and len(self.entries) > 1:
                _, old = self.entries.popitem(last=False)
                self.used_bytes -= old.nbytes
                self.stats.evictions += 1
        return w


class StreamedExperts(Weight):
    """A [experts, out, in] stack whose experts are read by `read_expert(e)` through an ExpertCache."""

    def __init__(self, name: str, shape: tuple[int, ...], read_expert: Callable[[int], Weight],
                 cache: ExpertCache, expert_nbytes: int, kind: str, device: torch.device | str = "cpu"):
        self.name = name
        self.shape = tuple(shape)
        self.read_expert = read_expert
        self.cache = cache
        self.expert_nbytes = expert_nbytes
        self._kind = kind
        self.device = torch.device(device)

    def expert(self, e: int) -> Weight:
        return self.cache.get((self.name, e), lambda: self.read_expert(e).to(self.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.shape[0])])

    def to(self, device: torch.device | str) -> StreamedExperts:
        return StreamedExperts(self.name, self.shape, self.read_expert, self.cache, self.expert_nbytes,
                               self._kind, device)

    @property
    def nbytes(self) -> int:
        return 0  # nothing resident of its own: the cache holds what is loaded

    @property
    def kind(self) -> str:
        return self._kind
