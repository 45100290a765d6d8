"""Routed experts read on demand into an LRU cache bounded in bytes.

Only `num_experts_per_tok` of a layer's experts run per token, so with the non-expert weights
resident and the experts streamed from the (memory-mapped) file, memory is bounded by the cache size
instead of the model size. One cache is shared by every layer and projection; its hit rate and the
bytes it read are counted for `ds4py bench` and `/props`.

Read-ahead (`ds4py.memory.read_ahead`) fills the cache from a background thread with `prefetch`, which
never takes the cache above its capacity and never evicts the `pinned` experts (those the running layer
needs) nor the ones its own job is fetching; `prefetched` counts what it read, `prefetch_hits` how many of
those a layer then used.
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
    prefetched: int = 0     # experts read by read-ahead (also counted in bytes_read)
    prefetch_hits: int = 0  # of those, the ones a layer then used

    @property
    def prefetch_hit_rate(self) -> float:
        return self.prefetch_hits / self.prefetched if self.prefetched else 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "bytes_read": self.bytes_read, "evictions": self.evictions,
                "prefetched": self.prefetched, "prefetch_hits": self.prefetch_hits,
                "prefetch_hit_rate": self.prefetch_hit_rate}


class ExpertCache:
    """LRU of loaded expert weights keyed by (stack name, expert id), holding at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.entries: OrderedDict[tuple[str, int], Weight] = OrderedDict()
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.pinned: set[tuple[str, int]] = set()      # the running layer's experts: prefetch keeps them
        self.unused: set[tuple[str, int]] = set()      # prefetched, not used yet
        self.expert_nbytes: dict[str, int] = {}        # stack name -> one expert's bytes, once one is read

    def get(self, key: tuple[str, int], load: Callable[[], Weight]) -> Weight:
        with self.lock:
            w = self.entries.get(key)
            if w is not None:
                self.entries.move_to_end(key)
                self.stats.hits += 1
                if key in self.unused:
                    self.unused.discard(key)
                    self.stats.prefetch_hits += 1
                return w
        w = load()
        with self.lock:
            self.stats.misses += 1
            self.stats.bytes_read += w.nbytes
            self.expert_nbytes[key[0]] = w.nbytes
            self.unused.discard(key)  # prefetched while this read ran: a wasted read, not a hit
            if key not in self.entries:
                self.entries[key] = w
                self.used_bytes += w.nbytes
            while self.used_bytes > self.capacity_bytes and len(self.entries) > 1:
                self._evict(next(iter(self.entries)))
        return w

    def prefetch(self, key: tuple[str, int], load: Callable[[], Weight], keep: set[tuple[str, int]]) -> bool:
        """Read `key` into the cache ahead of use (from the read-ahead thread), making room by evicting
        least recently used entries other than `pinned` and `keep`; skipped (False) when it is already
        cached or there is no such room. Room is made before the read when the stack's expert size is
        known, so the cache never holds more than its capacity."""
        with self.lock:
            if key in self.entries:
                return False
            n = self.expert_nbytes.get(key[0])
            if n is not None and not self._make_room(n, keep):
                return False
        w = load()
        with self.lock:
            self.expert_nbytes[key[0]] = w.nbytes
            if key in self.entries or not self._make_room(w.nbytes, keep):
                return False
            self.entries[key] = w
            self.used_bytes += w.nbytes
            self.unused.add(key)
            self.stats.prefetched += 1
            self.stats.bytes_read += w.nbytes
        return True

    def _make_room(self, n: int, keep: set[tuple[str, int]]) -> bool:
        """Evict LRU entries outside `pinned` and `keep` until `n` more bytes fit (under the lock)."""
        need = self.used_bytes + n - self.capacity_bytes
        victims = []
        for key, w in self.entries.items():
            if need <= 0:
                break
            if key not in self.pinned and key not in keep:
                victims.append(key)
                need -= w.nbytes
        if need > 0:
            return False
        for key in victims:
            self._evict(key)
        return True

    def _evict(self, key: tuple[str, int]) -> None:
        self.used_bytes -= self.entries.pop(key).nbytes
        self.unused.discard(key)
        self.stats.evictions += 1


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

    def prefetch(self, e: int, keep: set[tuple[str, int]]) -> bool:
        """Read expert e into the cache ahead of use (`ExpertCache.prefetch`)."""
        return self.cache.prefetch((self.name, e), lambda: self.read_expert(e).to(self.device), keep)

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
